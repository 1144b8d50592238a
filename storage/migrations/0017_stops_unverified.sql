-- Whether a stop a position lacks is in doubt only: confirmed, then put in doubt (a gap in the account
-- stream that no listing of the venue answered, a mark through it, its guard restarted) and asked for by its
-- id, not known gone. Uncovered all the same; said "unverified", not "missing", by `tsbot status`, a
-- read-only dashboard and the history (an operator read "missing both" for thirteen positions whose stops
-- the venue held, and would have flattened a protected book).
ALTER TABLE monitoring.positions
    ADD COLUMN stop_loss_unverified boolean NOT NULL DEFAULT false,
    ADD COLUMN trailing_stop_unverified boolean NOT NULL DEFAULT false;

ALTER TABLE monitoring.uncovered_spans DROP CONSTRAINT uncovered_spans_reason_check;
ALTER TABLE monitoring.uncovered_spans ADD CONSTRAINT uncovered_spans_reason_check
    CHECK (reason IN ('not_yet_protected', 'stop_loss_missing', 'trailing_stop_missing', 'both_missing',
                      'unverified'));

-- History (issue 13): what operators used to assemble by hand at the end of a shift.

-- One row per stretch of time a live position lacked a confirmed stop, as the engine recorded it
-- (`positions.unprotected_since` going from NULL to a moment, and back). Written in the same statement as the
-- protection facts that change it, so a span is exactly as durable as those facts (journaled in an outage).
-- `started_at` is the moment protection was lost (the fill, for a position never yet protected); `ended_at`
-- is NULL while the span lasts. `reason` says what was missing when it began; `ended_by` how it ended:
-- `protected` (both stops confirmed again) or `closed` (the position ended while uncovered).
CREATE TABLE monitoring.uncovered_spans (
    id          bigserial PRIMARY KEY,
    account     text NOT NULL,
    position_id bigint NOT NULL REFERENCES monitoring.positions (id) ON DELETE CASCADE,
    symbol      text NOT NULL,
    started_at  timestamptz NOT NULL,
    ended_at    timestamptz CHECK (ended_at >= started_at),
    reason      text NOT NULL
                CHECK (reason IN ('not_yet_protected', 'stop_loss_missing', 'trailing_stop_missing',
                                  'both_missing')),
    ended_by    text CHECK (ended_by IN ('protected', 'closed')),
    exit_reason text,
    CHECK ((ended_at IS NULL) = (ended_by IS NULL))
);
-- A span is named by its position and the moment it began: a write replayed from the journal (once or twice)
-- that opens or ends it again changes nothing.
CREATE UNIQUE INDEX uncovered_spans_identity ON monitoring.uncovered_spans (position_id, started_at);
CREATE INDEX uncovered_spans_open ON monitoring.uncovered_spans (position_id) WHERE ended_at IS NULL;
CREATE INDEX uncovered_spans_account_time ON monitoring.uncovered_spans (account, started_at);

-- The engine's coverage figures on a fixed cadence, per account: the time-weighted coverage of a shift is
-- read from here. `lasting` = uncovered for a grace period or more. `coverage_pct` is NULL with no active
-- position (nothing to cover). Kept for a bounded time (the engine's housekeeping deletes old samples).
CREATE TABLE monitoring.coverage_samples (
    account      text NOT NULL,
    at           timestamptz NOT NULL,
    active       integer NOT NULL CHECK (active >= 0),
    protected    integer NOT NULL CHECK (protected >= 0),
    uncovered    integer NOT NULL CHECK (uncovered >= 0),
    lasting      integer NOT NULL CHECK (lasting >= 0),
    coverage_pct numeric CHECK (coverage_pct BETWEEN 0 AND 100),
    PRIMARY KEY (account, at)
);

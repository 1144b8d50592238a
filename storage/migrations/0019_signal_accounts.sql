-- Whose signal (F16): the account it was added for (`tsbot signals add` and `import` write the configured
-- account's identity; the seeded sim generator its engine's). Only that account's engine claims it. NULL,
-- as any producer writing its own SQL leaves it, is a signal for whichever engine on this database claims
-- it first (one engine per database: that one). Signals added for one account were claimed by another
-- engine sharing the database (an operator: rejected there, "entries paused", and lost).
ALTER TABLE monitoring.signals ADD COLUMN account text;
CREATE INDEX signals_new_account_idx ON monitoring.signals (account, received_at, id) WHERE status = 'new';

-- Who claimed a signal, and when. A signal claimed by an engine that died (or lost its database) before
-- handling it stayed 'taken' forever; now it is expired with a reason: at the next start of the engine
-- that claimed it (its lease key names it), and by any engine once a claim is older than a wave can take.
ALTER TABLE monitoring.signals ADD COLUMN claimed_by text;
ALTER TABLE monitoring.signals ADD COLUMN claimed_at timestamptz;
CREATE INDEX signals_taken_idx ON monitoring.signals (claimed_at) WHERE status = 'taken';

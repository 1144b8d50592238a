-- What the engine holding a lease is doing, written with every heartbeat: 'starting' (reading the venue and
-- restoring: it looks after nothing yet), 'running' (it protects, resolves its entries, moves its managed
-- trails), 'stopping' (its loops are stopped: it looks after nothing any more). Readers count only a
-- running engine heard within 30 s as looking after the account. Rows of engines older than this column
-- read 'running', as those engines were taken to be.
ALTER TABLE monitoring.engine_leases
    ADD COLUMN phase text NOT NULL DEFAULT 'running' CHECK (phase IN ('starting', 'running', 'stopping'));

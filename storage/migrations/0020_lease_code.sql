-- The code the lease's holder runs (F10): the roots of its packages and each source file's digest, taken
-- when its process started. A process that only watches (`tsbot status`, a read-only dashboard) compares
-- them with what is on disk now: a fix installed after the engine started is not running. A headless
-- engine ran old code for hours with nothing saying so but its own log.
ALTER TABLE monitoring.engine_leases ADD COLUMN code_roots text[];
ALTER TABLE monitoring.engine_leases ADD COLUMN code_digests jsonb;

-- Whose account (F16). Every position belongs to one venue account (engine/accounts.py: derived from the
-- venue, e.g. a digest of the API key, not from the free-text label); every query, the reconciler,
-- restore, coverage and health are scoped to it. Rows from before this migration belonged to the only
-- account an installation had: `<exchange>:default` (what the sim venue with the default label is).
ALTER TABLE monitoring.positions ADD COLUMN account text;
UPDATE monitoring.positions SET account = exchange || ':default';
ALTER TABLE monitoring.positions ALTER COLUMN account SET NOT NULL;

-- One live position per account and symbol (two accounts may both hold SFPUSDT).
DROP INDEX monitoring.positions_one_open_per_symbol;
CREATE UNIQUE INDEX positions_one_open_per_symbol
    ON monitoring.positions (account, symbol) WHERE status NOT IN ('closed', 'failed');
CREATE INDEX positions_account_open_idx ON monitoring.positions (account) WHERE status NOT IN ('closed', 'failed');

-- Each engine's health, per account: two engines must not overwrite each other's measurements.
ALTER TABLE monitoring.health ADD COLUMN account text NOT NULL DEFAULT 'sim:default';
ALTER TABLE monitoring.health ALTER COLUMN account DROP DEFAULT;
ALTER TABLE monitoring.health DROP CONSTRAINT health_pkey;
ALTER TABLE monitoring.health ADD PRIMARY KEY (account, component);

-- Events name the account they concern (NULL: the installation's, e.g. migrations).
ALTER TABLE monitoring.events ADD COLUMN account text;

-- The lease names the account by its identity; the holder also records the label its operator gave it, so a
-- second engine refused on the same API key under another label is told which one holds it.
ALTER TABLE monitoring.engine_leases ADD COLUMN label text;

-- A short random token per database, baked into every client order id we send
-- (e.g. "tsb4f2a9c-17-sl0"). The reconciler recognises our orders by it and never touches anything else;
-- a rebuilt database gets a new token, so its position ids can never collide with old orders.
CREATE TABLE monitoring.installation (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    token     text NOT NULL CHECK (token ~ '^[a-z0-9]{6}$'),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO monitoring.installation (token) VALUES (substr(md5(random()::text || clock_timestamp()::text), 1, 6));

-- The engine's latest health evaluation, one row per component, so `tsbot status` and a read-only
-- dashboard see what the engine measured (and how old that measurement is).
CREATE TABLE monitoring.health (
    component    text PRIMARY KEY,
    state        text NOT NULL CHECK (state IN ('healthy', 'degraded', 'critical', 'unknown')),
    summary      text NOT NULL,
    reason       text NOT NULL DEFAULT '',
    measurements jsonb NOT NULL DEFAULT '{}'::jsonb,
    measured_at  timestamptz NOT NULL DEFAULT now()
);

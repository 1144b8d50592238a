-- The monitoring schema. Table and column names are part of the product: operators' existing SQL
-- (e.g. the incident report's coverage query) runs against them unchanged.

CREATE SCHEMA IF NOT EXISTS monitoring;

CREATE FUNCTION monitoring.touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

CREATE TABLE monitoring.waves (
    id                    bigserial PRIMARY KEY,
    started_at            timestamptz NOT NULL DEFAULT now(),
    finished_at           timestamptz,
    signals               integer NOT NULL DEFAULT 0 CHECK (signals >= 0),
    opened                integer NOT NULL DEFAULT 0 CHECK (opened >= 0),
    protected             integer NOT NULL DEFAULT 0 CHECK (protected >= 0),
    failed                integer NOT NULL DEFAULT 0 CHECK (failed >= 0),
    slowest_protection_ms integer CHECK (slowest_protection_ms >= 0)
);
CREATE INDEX waves_started_at_idx ON monitoring.waves (started_at DESC);

-- Any process may insert signals; side and score are not constrained here on purpose: a malformed row
-- must end as status 'rejected' with a reason, not as an insert error nobody sees.
CREATE TABLE monitoring.signals (
    id          bigserial PRIMARY KEY,
    external_id text UNIQUE,
    symbol      text NOT NULL,
    side        text NOT NULL,
    score       numeric,
    received_at timestamptz NOT NULL DEFAULT now(),
    wave_id     bigint REFERENCES monitoring.waves (id),
    status      text NOT NULL DEFAULT 'new'
                CHECK (status IN ('new', 'taken', 'opened', 'rejected', 'expired')),
    reason      text
);
CREATE INDEX signals_new_idx ON monitoring.signals (received_at, id) WHERE status = 'new';

CREATE TABLE monitoring.positions (
    id                          bigserial PRIMARY KEY,
    symbol                      text NOT NULL,
    exchange                    text NOT NULL,
    side                        text NOT NULL CHECK (side IN ('long', 'short')),
    quantity                    numeric NOT NULL CHECK (quantity >= 0),
    entry_price                 numeric CHECK (entry_price > 0),
    current_price               numeric CHECK (current_price > 0),
    stop_loss_price             numeric CHECK (stop_loss_price > 0),
    realized_pnl                numeric,
    status                      text NOT NULL DEFAULT 'pending_entry'
                                CHECK (status IN ('pending_entry', 'entry_placed', 'pending_protection',
                                                  'active', 'closing', 'closed', 'failed')),
    -- true only while the exchange has confirmed the order live; never optimistic, never default-true
    has_stop_loss               boolean NOT NULL DEFAULT false,
    has_trailing_stop           boolean NOT NULL DEFAULT false,
    trailing_activated          boolean NOT NULL DEFAULT false,
    trailing_activation_percent numeric CHECK (trailing_activation_percent >= 0),
    trailing_callback_percent   numeric CHECK (trailing_callback_percent > 0),
    signal_id                   bigint REFERENCES monitoring.signals (id),
    wave_id                     bigint REFERENCES monitoring.waves (id),
    opened_at                   timestamptz,
    protected_at                timestamptz,
    closed_at                   timestamptz,
    updated_at                  timestamptz NOT NULL DEFAULT now(),
    exit_reason                 text
);
-- At most one live position per (exchange, symbol), whatever non-terminal status it is in.
CREATE UNIQUE INDEX positions_one_open_per_symbol
    ON monitoring.positions (exchange, symbol) WHERE status NOT IN ('closed', 'failed');
CREATE INDEX positions_open_idx ON monitoring.positions (status) WHERE status NOT IN ('closed', 'failed');
CREATE INDEX positions_wave_idx ON monitoring.positions (wave_id);
CREATE TRIGGER positions_touch BEFORE UPDATE ON monitoring.positions
    FOR EACH ROW EXECUTE FUNCTION monitoring.touch_updated_at();

-- Keyed by position, never by symbol: a re-opened symbol must not inherit an old side or stop.
CREATE TABLE monitoring.trailing_stop_state (
    position_id          bigint PRIMARY KEY REFERENCES monitoring.positions (id) ON DELETE CASCADE,
    state_version        smallint NOT NULL DEFAULT 1,
    mode                 text NOT NULL CHECK (mode IN ('native', 'managed')),
    state                text NOT NULL CHECK (state IN ('armed', 'active', 'moving', 'triggered', 'stopped')),
    activation_price     numeric NOT NULL CHECK (activation_price > 0),
    peak_price           numeric CHECK (peak_price > 0),
    current_stop_price   numeric CHECK (current_stop_price > 0),
    stop_order_client_id text CHECK (length(stop_order_client_id) <= 36),
    callback_percent     numeric NOT NULL CHECK (callback_percent > 0),
    activation_percent   numeric NOT NULL CHECK (activation_percent >= 0),
    last_move_at         timestamptz,
    update_count         integer NOT NULL DEFAULT 0 CHECK (update_count >= 0),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE TRIGGER trailing_stop_state_touch BEFORE UPDATE ON monitoring.trailing_stop_state
    FOR EACH ROW EXECUTE FUNCTION monitoring.touch_updated_at();

CREATE TABLE monitoring.orders (
    id                bigserial PRIMARY KEY,
    client_order_id   text NOT NULL UNIQUE CHECK (length(client_order_id) BETWEEN 1 AND 36),
    exchange_order_id text,
    position_id       bigint REFERENCES monitoring.positions (id),
    purpose           text NOT NULL CHECK (purpose IN ('entry', 'stop_loss', 'trailing_stop', 'close')),
    side              text NOT NULL CHECK (side IN ('buy', 'sell')),
    type              text NOT NULL CHECK (type IN ('market', 'stop_market', 'trailing_stop_market')),
    quantity          numeric NOT NULL CHECK (quantity > 0),
    trigger_price     numeric CHECK (trigger_price > 0),
    activation_price  numeric CHECK (activation_price > 0),
    callback_percent  numeric CHECK (callback_percent > 0),
    status            text NOT NULL
                      CHECK (status IN ('pending', 'open', 'filled', 'canceled', 'expired', 'rejected',
                                        'unknown')),
    error             text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_position_idx ON monitoring.orders (position_id);
CREATE INDEX orders_live_idx ON monitoring.orders (position_id, purpose)
    WHERE status IN ('pending', 'open', 'unknown');
CREATE TRIGGER orders_touch BEFORE UPDATE ON monitoring.orders
    FOR EACH ROW EXECUTE FUNCTION monitoring.touch_updated_at();

-- Append-only audit log.
CREATE TABLE monitoring.events (
    id          bigserial PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now(),
    severity    text NOT NULL CHECK (severity IN ('debug', 'info', 'warning', 'error', 'critical')),
    type        text NOT NULL,
    symbol      text,
    position_id bigint,
    message     text NOT NULL,
    data        jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX events_created_at_idx ON monitoring.events (created_at);
CREATE INDEX events_severity_idx ON monitoring.events (severity, created_at);
CREATE INDEX events_position_idx ON monitoring.events (position_id) WHERE position_id IS NOT NULL;

CREATE FUNCTION monitoring.events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'monitoring.events is append-only (% refused)', TG_OP;
END;
$$;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON monitoring.events
    FOR EACH ROW EXECUTE FUNCTION monitoring.events_append_only();

-- Who trades which account. The advisory lock is the guarantee; this row says who holds it, so a refused
-- engine (or the dashboard) can show pid, host, version and since.
CREATE TABLE monitoring.engine_leases (
    venue        text NOT NULL,
    account      text NOT NULL,
    pid          integer NOT NULL,
    host         text NOT NULL,
    version      text NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (venue, account)
);

-- New signals wake the engine at once (LISTEN tsbot_signals); it also polls, so a lost notification only
-- delays a signal, never drops it. One notification per statement keeps bulk imports cheap.
CREATE FUNCTION monitoring.notify_new_signals() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tsbot_signals', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER signals_notify AFTER INSERT ON monitoring.signals
    FOR EACH STATEMENT EXECUTE FUNCTION monitoring.notify_new_signals();

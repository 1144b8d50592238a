-- Operator commands for a running engine (`tsbot close SFPUSDT`, the read-only dashboard's keys): a row per
-- command, for one account; the engine that holds that account's lease claims it, executes it through the
-- same methods as the dashboard's keys, and writes the outcome (per position) back into the row, which
-- the sender is waiting on. `expires_at` bounds how long a command may wait to be taken: a flatten sent
-- while no engine ran must not be executed by the engine that starts an hour later.
CREATE TABLE monitoring.commands (
    id           bigserial PRIMARY KEY,
    account      text NOT NULL,
    kind         text NOT NULL CHECK (kind IN (
                     'entries_pause', 'entries_resume', 'protect', 'close', 'flatten', 'restart_protection')),
    args         jsonb NOT NULL DEFAULT '{}',
    requested_by text NOT NULL CHECK (length(requested_by) <= 300),  -- user@host/pid
    reason       text NOT NULL DEFAULT '' CHECK (length(reason) <= 1000),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    picked_at    timestamptz,
    finished_at  timestamptz,
    state        text NOT NULL DEFAULT 'pending' CHECK (state IN (
                     'pending', 'running', 'done', 'partial', 'failed', 'expired')),
    result       jsonb
);
CREATE INDEX commands_pending_idx ON monitoring.commands (account, id) WHERE state = 'pending';

-- A new command wakes its account's engine at once (LISTEN tsbot_commands, on the connection that already
-- listens for signals); the engine also polls, so a lost notification only delays a command.
CREATE FUNCTION monitoring.notify_new_command() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tsbot_commands', NEW.account);
    RETURN NULL;
END;
$$;
CREATE TRIGGER commands_notify AFTER INSERT ON monitoring.commands
    FOR EACH ROW EXECUTE FUNCTION monitoring.notify_new_command();

-- A finished command wakes whoever waits for it (LISTEN tsbot_command_results, payload: the command's id).
CREATE FUNCTION monitoring.notify_command_finished() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state IN ('done', 'partial', 'failed', 'expired') AND OLD.state IS DISTINCT FROM NEW.state THEN
        PERFORM pg_notify('tsbot_command_results', NEW.id::text);
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER commands_finished_notify AFTER UPDATE ON monitoring.commands
    FOR EACH ROW EXECUTE FUNCTION monitoring.notify_command_finished();

-- Who paused entries (user@host/pid of the operator's command or dashboard), beside `paused_by`'s kind.
ALTER TABLE monitoring.entries_control ADD COLUMN requested_by text NOT NULL DEFAULT ''
    CHECK (length(requested_by) <= 300);

-- The last heartbeat of the engine that held the account before this one, when that engine never stopped
-- (killed, crashed, its host gone): from then on nobody moved its managed trails. The holder that took the
-- account over records them as unmoved since then and clears this; a start that fails before it does leaves
-- it for the next holder, instead of its own heartbeat passing for the dead engine's.
ALTER TABLE monitoring.engine_leases ADD COLUMN previous_heard_at timestamptz;

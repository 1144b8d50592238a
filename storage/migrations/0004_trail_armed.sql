-- has_trailing_stop means exactly "a trailing order of ours is live on the exchange" (F4). A managed trail
-- is software: before it activates there is no order at all, and while no engine runs nobody moves its
-- stop. Whether such a trail is armed (an engine holds it and will place and move its stop) is its own
-- fact, reported here, never folded into has_trailing_stop.
ALTER TABLE monitoring.positions ADD COLUMN trail_armed boolean NOT NULL DEFAULT false;

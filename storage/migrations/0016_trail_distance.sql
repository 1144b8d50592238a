-- The price distance a trailing stop of ours trails by, as the venue took it, when the venue trails by a
-- distance and arms at the mark (Bybit's `trailingStop`, set after its activation had passed: the callback
-- of the mark then). A new process tells our trailing stop from one someone set in its place by that
-- distance; worked out from the position's entry price instead, it took ours for someone else's once the
-- position had grown at another price, and set it again (its high-water mark lost). NULL: not recorded
-- (a venue that keeps the callback, an activation price on the order, or a row older than this column).
ALTER TABLE monitoring.orders ADD COLUMN trail_distance numeric CHECK (trail_distance > 0);

-- How long each position was without a hard stop of ours after its fill, in seconds: stamped once, the
-- first time its hard stop is confirmed live. 0 when the stop rode on the entry order (Bybit's order/create
-- with stopLoss, confirmed afterwards as the one the venue holds): the position was born with it. Otherwise
-- the time from the fill being recorded (`opened_at`, the entry's answer) to the confirmation being seen,
-- both on the engine's side; the fill precedes the entry's answer and the stop is live before the answer
-- confirming it, by about the same half round trip each. NULL: no hard stop confirmed yet (or a position
-- opened before this column existed).
ALTER TABLE monitoring.positions ADD COLUMN hard_stop_gap_seconds numeric CHECK (hard_stop_gap_seconds >= 0);

-- The venue changed the position's size while it was open (a stop filled in part, a partial close or an
-- addition by hand): its realized PnL is not known from the last fill alone (a part closed earlier took its
-- own, an addition moved the entry price). Set with the new quantity; a close then records no PnL. Kept
-- here, not in the engine's memory only: a protection restart or a new engine lost it and recorded a figure
-- computed on what was left, wrong and looking exact.
ALTER TABLE monitoring.positions ADD COLUMN size_changed boolean NOT NULL DEFAULT false;

-- Where an engine stopped measuring: its `engine_stopped` event, at its clock's time (the coverage samples'
-- clock). The history ends a coverage sample there; it used to stand on for up to 30 s past a clean stop,
-- counted as measured coverage while no engine measured.
CREATE INDEX events_engine_stopped ON monitoring.events (account, created_at) WHERE type = 'engine_stopped';

-- Since when a live position has lacked a confirmed stop (NULL while it is covered), stamped by the engine
-- that saw it, on its own clock. The time unprotected is measured from it: a restart of the protection
-- manager or of the engine must not start the count again (a crossed CRITICAL line hidden by a restart),
-- and the read-only dashboard shows the same age as the engine.
ALTER TABLE monitoring.positions ADD COLUMN unprotected_since timestamptz;

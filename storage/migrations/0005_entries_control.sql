-- Whether an engine may open positions on an account, and who said so. A pause (by the operator, or by the
-- circuit breaker when protection is failing) outlives the engine: a restart must not quietly reopen
-- entries that were stopped for a reason.
CREATE TABLE monitoring.entries_control (
    venue     text NOT NULL,
    account   text NOT NULL,
    paused    boolean NOT NULL,
    paused_by text NOT NULL CHECK (paused_by IN ('operator', 'breaker', 'lease')),
    reason    text NOT NULL DEFAULT '' CHECK (length(reason) <= 1000),
    since     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (venue, account)
);

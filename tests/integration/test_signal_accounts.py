"""Whose signal (F16). An operator ran the dashboard on account `default` and `tsbot run` on `ops2` over
one database, paused entries on `default`, and added five signals for `ops2` with
`TSBOT_VENUE__ACCOUNT=ops2 tsbot signals add`: two were claimed by the `default` engine and rejected
there ("entries paused"), lost to `ops2`. A signal added for an account is claimed by that account's
engine only; one written without an account (a producer's own SQL) by whichever engine claims first."""

from __future__ import annotations

from storage.database import Database
from storage.repositories import Store


async def test_a_signal_added_for_an_account_is_claimed_by_that_accounts_engine_only(db: Database) -> None:
    default, ops2 = Store(db.pool, "sim:default"), Store(db.pool, "sim:ops2")
    [for_ops2] = await ops2.insert_signals([("SUIUSDT", "long", None, None)], for_account=True)
    [for_default] = await default.insert_signals([("XRPUSDT", "long", None, None)], for_account=True)
    [for_anyone] = await default.insert_signals([("ADAUSDT", "short", None, None)])
    taken_by_default = await default.claim_new_signals(10, "sim:default")
    assert sorted(s.id for s in taken_by_default) == sorted([for_default, for_anyone])
    assert {s.account for s in taken_by_default} == {"sim:default", None}
    taken_by_ops2 = await ops2.claim_new_signals(10, "sim:ops2")
    assert [s.id for s in taken_by_ops2] == [for_ops2]
    assert taken_by_ops2[0].account == "sim:ops2"

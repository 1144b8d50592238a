"""Accounts are separated (issue 10 #6, F16). One database may serve several venue accounts: each engine
restores, reconciles, counts and closes only its own account's positions, and two of them may hold the
same symbol at once. The account identity comes from the venue (a digest of the API key for ccxt venues),
so two labels on one key are one account — that case is refused by the lease, end to end against the
emulator, in test_ccxt_end_to_end.py."""

from __future__ import annotations

from pydantic import SecretStr

from engine.accounts import account_key
from engine.clock import ManualClock
from engine.config import VenueKind, VenueSettings
from engine.venues.sim import SimVenue
from engine.venues.sim.settings import CallKind
from storage.database import Database
from tests.integration.engine_support import make_engine
from tests.integration.test_failure_modes_f1_f5 import (
    SYMBOLS,
    drive_until_covered,
    open_positions,
    restarted,
    settings_for,
)
from tests.support.driving import drive, drive_until

INCIDENT_SQL_FOR_ACCOUNT = (
    "SELECT COUNT(*) AS total, SUM(CASE WHEN has_trailing_stop THEN 1 ELSE 0 END) AS with_ts "
    "FROM monitoring.positions WHERE status = 'active' AND account = $1"
)


def test_the_account_is_the_venue_key_not_the_label() -> None:
    def venue(kind: VenueKind, key: str | None, label: str, testnet: bool = False) -> VenueSettings:
        return VenueSettings(
            kind=kind,
            account=label,
            testnet=testnet,
            api_key=SecretStr(key) if key is not None else None,
            api_secret=SecretStr("s") if key is not None else None,
        )

    main = account_key(venue(VenueKind.BINANCEUSDM, "key-one", "main"))
    assert main == account_key(venue(VenueKind.BINANCEUSDM, "key-one", "second"))  # a label is not an account
    assert main != account_key(venue(VenueKind.BINANCEUSDM, "key-two", "main"))
    assert main != account_key(venue(VenueKind.BINANCEUSDM, "key-one", "main", testnet=True))
    assert main != account_key(venue(VenueKind.BYBIT, "key-one", "main"))
    assert main.startswith("binanceusdm:")
    assert "key-one" not in main
    # The sim venue lives inside one engine: there the label is what tells two of them apart.
    assert account_key(venue(VenueKind.SIM, None, "main")) == "sim:main"
    assert account_key(venue(VenueKind.SIM, None, "second")) == "sim:second"


async def test_an_engine_on_another_account_leaves_the_first_accounts_positions_alone(db: Database) -> None:
    clock = ManualClock()
    settings_main = settings_for(db)
    settings_second = settings_for(db, {"VENUE__ACCOUNT": "second"})
    main = make_engine(settings_main, clock)
    await drive(clock, main.start())
    symbols = SYMBOLS[:6]
    second = make_engine(settings_second, clock)
    try:
        await open_positions(main, clock, symbols)
        await drive_until_covered(main, clock, 6)

        # A second engine, another account, the same database, while the first one trades.
        report = await drive(clock, second.start())
        assert (report.restored, report.reprotected, report.adopted, report.failed) == (0, 0, 0, 0)
        assert second.manager is not None
        assert not second.manager.guards
        venue_second = second.venue
        assert isinstance(venue_second, SimVenue)
        # Well past the reconciler's 30 s and its mass-absence re-checks: nothing of the first account's is
        # touched — not closed in the database, not "re-protected" on the second account's exchange.
        since = clock.monotonic()
        await drive_until(clock, lambda: clock.monotonic() - since >= 60.0, limit=61.0, what="a minute")
        assert venue_second.calls_made.get(CallKind.CREATE_ORDER, 0) == 0
        assert venue_second.calls_made.get(CallKind.CANCEL_ORDER, 0) == 0
        rows = await db.pool.fetch(INCIDENT_SQL_FOR_ACCOUNT, "sim:default")
        assert (rows[0]["total"], rows[0]["with_ts"]) == (6, 6)
        assert second.manager.coverage().active == 0
        assert main.manager is not None
        assert main.manager.coverage().protected == 6
        assert not await db.pool.fetchval(
            "SELECT count(*) FROM monitoring.positions WHERE status IN ('closed', 'failed')"
        )
    finally:
        await drive(clock, main.stop())

    # With the first engine stopped, the second account opens the same symbol the first account holds.
    assert second.store is not None
    await second.store.insert_signals([(symbols[0], "short", None, None)])
    try:
        await drive_until_covered(second, clock, 1)
    finally:
        await drive(clock, second.stop())
    live = await db.pool.fetch(
        "SELECT account, side FROM monitoring.positions WHERE symbol = $1 AND status = 'active' ORDER BY account",
        symbols[0],
    )
    assert [(r["account"], r["side"]) for r in live] == [("sim:default", "long"), ("sim:second", "short")]

    # The first account's engine comes back: it restores its own six, nothing of the second account's.
    again = restarted(main, settings_main, clock)
    report = await drive(clock, again.start())
    try:
        assert (report.restored, report.reprotected, report.failed) == (6, 0, 0)
        assert again.manager is not None
        assert sorted(g.symbol for g in again.manager.guards.values()) == sorted(symbols)
        second_rows = await db.pool.fetch(INCIDENT_SQL_FOR_ACCOUNT, "sim:second")
        assert (second_rows[0]["total"], second_rows[0]["with_ts"]) == (1, 1)
    finally:
        await drive(clock, again.stop())

"""The auditor's readers on real sources: the sim core's oracle view and the engine's real database judge a
protected position clean, and catch what a person does behind the engine's back (a stop cancelled, a
second stop of ours, the position closed on the exchange); the emulator's control API reads the same
truth as the core behind it."""

from __future__ import annotations

from decimal import Decimal

import aiohttp

from engine.clock import ManualClock
from engine.exchange.port import OrderSide
from engine.venues.binance_emulator import BinanceEmulator
from engine.venues.binance_emulator.faults import Target, parse_fault
from engine.venues.binance_emulator.server import running
from engine.venues.bybit_emulator import BybitEmulator
from engine.venues.bybit_emulator import running as running_bybit
from engine.venues.sim.settings import SimVenueSettings
from storage.database import Database
from storage.repositories import OrderPurpose
from tests.chaos.support import ChaosRun, chaos_settings
from tests.support.auditor import (
    AuditLimits,
    BybitEmulatorTruth,
    EmulatorTruth,
    InvariantAuditor,
    Rule,
    SeenPosition,
    SeenStop,
    SimTruth,
)


async def test_the_readers_judge_the_real_venue_and_database_and_catch_what_happens_behind_the_engine(
    db: Database,
) -> None:
    run = ChaosRun(db, chaos_settings(db))
    await run.start()
    try:
        symbol = await run.one_protected_position()
        await run.run_for(25)
        run.auditor.assert_clean()  # a protected position, the database agreeing: nothing to say
        assert run.auditor.figures().positions == 1

        # An engine that is "up" but does nothing: the test stops it and keeps telling the auditor it runs.
        await run.drive(run.engine.stop())
        core, now = run.venue.core, run.clock.now()
        [hard, trailing] = sorted(
            (o for o in core.inspect(now).open_conditional if o.symbol == symbol), key=lambda o: o.type.value
        )
        core.cancel_order(symbol, hard.client_order_id, now)  # by hand, on the exchange
        position = run.held()[symbol]
        twin = trailing.client_order_id[:-1] + "7"  # a second trailing stop of ours (a later generation)
        core.place_trailing_stop_order(
            symbol, position.side.closing_side, position.quantity, Decimal("0.5"), twin, now
        )
        await run.run_for(6)
        seen = {v.rule for v in run.auditor.violations}
        assert seen == {Rule.UNCOVERED, Rule.DUPLICATE}, run.auditor.report()

        core.place_market_order(
            symbol, position.side.closing_side, position.quantity, "hand-close", now, reduce_only=True
        )
        await run.run_for(run.auditor.limits.allowance(Rule.DB_NOT_ON_VENUE) + 1)
        seen = {v.rule for v in run.auditor.violations}
        assert {Rule.ORPHAN, Rule.FLAG_WITHOUT_ORDER, Rule.DB_NOT_ON_VENUE} <= seen, run.auditor.report()
        assert run.auditor.figures().lost_positions == 1
    finally:
        await run.stop()


async def test_the_emulator_truth_reads_what_the_core_behind_it_holds() -> None:
    settings = SimVenueSettings(symbols=["SFPUSDT", "BTCUSDT"], volatility=0.0)
    emulator = BinanceEmulator(settings, api_key="k", api_secret="s", control=True)
    core = emulator.core
    now = emulator.now()
    core.place_market_order("SFPUSDT", OrderSide.BUY, Decimal("300"), "entry-1", now)
    stop = core.markets["SFPUSDT"].round_price(core.mark("SFPUSDT") * Decimal("0.9"))
    core.place_stop_market_order("SFPUSDT", OrderSide.SELL, Decimal("300"), stop, "tsbabc123-1-sl0", now)
    core.place_trailing_stop_order(
        "SFPUSDT", OrderSide.SELL, Decimal("300"), Decimal("0.5"), "tsbabc123-1-ts0", now
    )

    clock = ManualClock(start=now)
    async with running(emulator) as url, aiohttp.ClientSession() as session:
        truth = EmulatorTruth(url)
        try:
            over_http = await truth.read()
            # A ban the venue answers is in force for every request: the truth says so (the reader looked
            # for it where the state does not keep it, and no soak ever counted `fired_banned` or
            # `opening_banned` on this emulator).
            emulator.faults.force((Target.parse("GET:ping"),), parse_fault("ban:30"))
            async with session.get(f"{url}/fapi/v1/ping") as refused:
                assert refused.status == 418
            banned = await truth.read()
        finally:
            await truth.close()
    direct = await SimTruth(core, clock).read()
    assert over_http == direct
    assert [p.symbol for p in over_http.positions] == ["SFPUSDT"]
    assert sorted(s.type for s in over_http.open_stops) == ["stop_market", "trailing_stop_market"]
    assert not over_http.banned
    assert banned.banned


async def test_the_bybit_emulator_truth_reads_a_positions_stops_as_the_fields_they_are() -> None:
    settings = SimVenueSettings(symbols=["SFPUSDT", "BTCUSDT"], volatility=0.0)
    emulator = BybitEmulator(settings, api_key="k", api_secret="s", control=True)
    core = emulator.core
    core.place_market_order("SFPUSDT", OrderSide.SELL, Decimal("300"), "entry-1", emulator.now())
    above = core.markets["SFPUSDT"].round_price(core.mark("SFPUSDT") * Decimal("1.1"))
    distance = core.markets["SFPUSDT"].round_price(core.mark("SFPUSDT") * Decimal("0.01"))

    async with running_bybit(emulator) as url, aiohttp.ClientSession() as session:
        truth = BybitEmulatorTruth(url)
        try:
            bare = await truth.read()
            await _post(session, url, {"symbol": "SFPUSDT", "stopLoss": str(above)})
            hard_only = await truth.read()
            await _post(session, url, {"symbol": "SFPUSDT", "trailingStop": str(distance)})
            both = await truth.read()
        finally:
            await truth.close()

    assert bare.positions == (SeenPosition("SFPUSDT", "short", Decimal("300")),)
    assert bare.open_stops == ()
    hard = SeenStop("SFPUSDT", "stopLoss", "buy", Decimal("300"), "stop_market", OrderPurpose.STOP_LOSS)
    assert hard_only.open_stops == (hard,)
    trailing = SeenStop(
        "SFPUSDT", "trailingStop", "buy", Decimal("300"), "trailing_stop_market", OrderPurpose.TRAILING_STOP
    )
    assert both.open_stops == (hard, trailing)
    assert not both.banned

    audit = InvariantAuditor(None, None, AuditLimits(5.0, 10.0, 2.0), token="abc123", engine_up=True)
    for at, seen in ((0.0, bare), (6.0, hard_only)):
        audit.observe(at, seen, None)
    assert [v.rule for v in audit.violations] == [Rule.UNCOVERED]  # the trailing stop missing past grace
    audit.observe(7.0, both, None)
    assert audit.open_conditions() == []


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, str]) -> None:
    async with session.post(f"{url}/_sim/position-stops", json=body) as response:
        assert response.status == 200, await response.text()

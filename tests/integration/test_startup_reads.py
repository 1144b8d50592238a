"""The reads the start cannot go on without (the markets, the credentials' check, the marks) meet the
venue's transient failures like any other read: tried again with backoff, each retry said. Found in tmux:
with the sim venue answering HTTP 500 now and then, one 500 on `load_markets` ended the start ("The
engine did not start"), leaving the positions on the venue unguarded until an operator started it again."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from engine.clock import ManualClock
from engine.engine import STARTUP_READ_ATTEMPTS, EngineState
from engine.exchange.errors import Retryable
from engine.exchange.port import OrderSide, OrderType
from engine.venues.sim import SimVenue
from engine.venues.sim.settings import CallKind, FaultKind
from storage.database import Database
from tests.integration.engine_support import banned_by_another_client, engine_settings, make_engine
from tests.integration.test_failure_modes_f1_f5 import SYMBOLS, drive_until_covered, open_positions
from tests.support.driving import drive, drive_until
from tui.app import quit_warning


def _engine(db: Database):  # type: ignore[no-untyped-def]
    settings = engine_settings(db.target.dsn)
    clock = ManualClock(start=time.time())
    venue = SimVenue(settings.venue.sim, clock=clock)
    return make_engine(settings, clock, venue), venue, clock


async def test_transient_failures_of_the_start_s_reads_are_tried_again_and_the_engine_starts(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    engine, venue, clock = _engine(db)
    venue.inject_fault(CallKind.LOAD_MARKETS, FaultKind.SERVER_ERROR, 2)
    venue.inject_fault(CallKind.FETCH_BALANCE, FaultKind.NETWORK_ERROR_BEFORE_SEND, 1)
    venue.inject_fault(CallKind.FETCH_MARK_PRICES, FaultKind.SERVER_ERROR, 1)
    with caplog.at_level(logging.WARNING, logger="engine.engine"):
        await drive(clock, engine.start())
    try:
        assert engine.state is EngineState.RUNNING
        assert engine.markets
        assert engine.marks
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("start-up: ")]
        assert len(said) == 4
        assert said[0].startswith("start-up: load_markets failed (")
        assert "trying again in 1.0s (attempt 2 of 6)" in said[0]
        assert "trying again in 2.0s (attempt 3 of 6)" in said[1]
        assert said[2].startswith("start-up: the credentials' check failed (")
        assert said[3].startswith("start-up: fetch_mark_prices failed (")
    finally:
        await drive(clock, engine.stop())


async def test_a_venue_failing_every_attempt_still_ends_the_start_with_its_error(db: Database) -> None:
    engine, venue, clock = _engine(db)
    venue.inject_fault(CallKind.LOAD_MARKETS, FaultKind.SERVER_ERROR, STARTUP_READ_ATTEMPTS)
    with pytest.raises(Retryable, match="load_markets"):
        await drive(clock, engine.start())
    assert engine.state is not EngineState.RUNNING


async def test_the_lease_is_heartbeated_through_a_long_start(db: Database) -> None:
    """Five failed reads of the markets hold the start ~31 s in backoff (1 + 2 + 4 + 8 + 16). The lease's
    heartbeat only began with the engine's loops, so for that long `tsbot status` and a watch said the
    engine holding the account was silent: hung, or its host gone. It heartbeats from the moment it holds
    the lease."""
    engine, venue, clock = _engine(db)
    venue.inject_fault(CallKind.LOAD_MARKETS, FaultKind.SERVER_ERROR, 5)
    heard: set[object] = set()
    phases: set[str] = set()
    began = clock.monotonic()
    starting = asyncio.ensure_future(engine.start())

    async def started() -> bool:
        row = await db.pool.fetchrow("SELECT heartbeat_at, phase FROM monitoring.engine_leases")
        if row is not None and not starting.done():
            heard.add(row["heartbeat_at"])
            phases.add(row["phase"])
        return starting.done()

    await drive_until(clock, started, what="the start")
    try:
        assert starting.result().failed == 0
        assert clock.monotonic() - began >= 31
        # Every 2 s: some 15 heartbeats, each written at its own moment (before: only the lease's taking).
        assert len(heard) >= 10, sorted(map(str, heard))
        # Heard, but starting: it looks after nothing yet, and readers say so (not "running").
        assert phases == {"starting"}

        async def running() -> bool:
            return await db.pool.fetchval("SELECT phase FROM monitoring.engine_leases") == "running"

        await drive_until(clock, running, limit=5, what="the lease running once the engine runs")
    finally:
        await drive(clock, engine.stop())


def _a_venue_holding_a_naked_position(settings, symbol: str) -> tuple[SimVenue, ManualClock]:  # type: ignore[no-untyped-def]
    """A sim venue (virtual time from now) holding a long on `symbol` whose entry filled while no engine
    ran: no stop, no record."""
    clock = ManualClock(start=time.time())
    venue = SimVenue(settings.venue.sim, clock=clock)
    core = venue.core
    market = core.markets[symbol]
    quantity = market.round_quantity(
        max(market.min_notional * 2 / core.mark(symbol), market.min_quantity * 2)
    )
    core.place_market_order(symbol, OrderSide.BUY, quantity, "filled-while-no-engine-ran", clock.now())
    return venue, clock


async def test_a_start_during_a_venue_ban_waits_for_its_end_then_protects_what_the_venue_holds(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """An engine restarted while the venue bans the account (the operator's first remedy after a 418) met
    the ban on its first signed read and ended at once: the ban is not a failure the start retried. The
    position whose entry filled while no engine ran stayed without stops through the ban and after it, until
    someone started the engine again by hand. The start now waits for the ban's end, says so, and the
    naked position has both its stops right after it."""
    settings = engine_settings(
        db.target.dsn,
        {
            "VENUE__SIM__RATE_LIMITS__ORDERS_PER_10S": "12",
            "VENUE__SIM__RATE_LIMITS__BAN_AFTER_VIOLATIONS": "1",
            "VENUE__SIM__RATE_LIMITS__BAN_SECONDS": "20",
        },
    )
    venue, clock = _a_venue_holding_a_naked_position(settings, SYMBOLS[0])
    core = venue.core
    naked, flat = SYMBOLS[0], SYMBOLS[1]
    banned_until = banned_by_another_client(core, clock, flat)
    engine = make_engine(settings, clock, venue)
    with caplog.at_level(logging.WARNING, logger="engine.engine"):
        report = await drive(clock, engine.start())
    try:
        assert engine.state is EngineState.RUNNING
        assert clock.now() >= banned_until
        assert report.adopted == 1
        assert any(
            "the venue refuses us until" in r.getMessage() and "banned for repeated" in r.getMessage()
            for r in caplog.records
        )

        def both_stops_on_the_venue() -> bool:
            truth = core.inspect(clock.now())  # the oracle: what the venue holds
            kinds = {o.type for o in truth.open_conditional if o.symbol == naked}
            return kinds == {OrderType.STOP_MARKET, OrderType.TRAILING_STOP_MARKET}

        await drive_until(clock, both_stops_on_the_venue, limit=5, what="both stops right after the ban")
        assert clock.now() - banned_until < 5
    finally:
        await drive(clock, engine.stop())


async def test_a_stop_asked_while_the_start_protects_positions_lets_it_finish(db: Database) -> None:
    """`tsbot run` gives a start up at SIGTERM while it waits for the venue; a first version gave it up
    anywhere, cancelling it while it was placing stops for the positions the venue held without any: their
    answers lost, the positions left naked, and the exit line said nothing was restored (found in review).
    A start past its waits finishes, and the stop then drains it: the naked position ends with both
    stops."""
    from engine.cli import _start_unless_stopped

    settings = engine_settings(db.target.dsn, {"VENUE__SIM__LATENCY__BY_CALL__CREATE_ORDER__SECONDS": "2.0"})
    naked = SYMBOLS[2]
    venue, clock = _a_venue_holding_a_naked_position(settings, naked)
    core = venue.core
    engine = make_engine(settings, clock, venue)
    stop = asyncio.Event()
    starting = asyncio.ensure_future(_start_unless_stopped(engine, stop))
    await drive_until(
        clock,
        lambda: engine.manager is not None and bool(engine.manager.guards),
        what="the naked one guarded",
    )
    stop.set()  # SIGTERM, while its stops are on their way
    await drive(clock, starting)
    report = await drive(clock, engine.stop())
    kinds = {o.type for o in core.inspect(clock.now()).open_conditional if o.symbol == naked}
    assert kinds == {OrderType.STOP_MARKET, OrderType.TRAILING_STOP_MARKET}
    assert (report.open_positions, report.uncovered) == (1, 0)


async def test_a_start_waiting_out_a_ban_says_why_and_tells_unverified_stops_from_missing_ones(
    db: Database,
) -> None:
    """An operator quit a dashboard whose start was waiting out a ban: its header said "starting", its quit
    dialog "20 positions are UNCOVERED right now … the engine tries to protect them", while the venue held
    all 40 of their stops and nothing said why the start waited. Uncovered they are (nothing has confirmed
    their stops since the restart), and said so; now also why, and that their stops may still be live."""
    settings = engine_settings(
        db.target.dsn,
        {
            "VENUE__SIM__RATE_LIMITS__ORDERS_PER_10S": "12",
            "VENUE__SIM__RATE_LIMITS__BAN_AFTER_VIOLATIONS": "1",
            "VENUE__SIM__RATE_LIMITS__BAN_SECONDS": "30",
        },
    )
    clock = ManualClock(start=time.time())
    venue = SimVenue(settings.venue.sim, clock=clock)
    held = SYMBOLS[3]
    first = make_engine(settings, clock, venue)
    await drive(clock, first.start())
    try:
        await open_positions(first, clock, [held])
        await drive_until_covered(first, clock, 1)
    finally:
        await drive(clock, first.stop())
    core = venue.core
    banned_by_another_client(core, clock, SYMBOLS[4])
    second = make_engine(settings, clock, SimVenue(settings.venue.sim, clock=clock, core=core))
    starting = asyncio.ensure_future(second.start())
    try:
        await drive_until(
            clock, lambda: bool(second.start_waiting_for) or starting.done(), what="the start waiting"
        )
        assert not starting.done(), starting.result()
        grace = float(settings.protection.grace_seconds)
        await drive(clock, clock.sleep(grace + 1))  # its carried record unverified past grace
        snapshot = second.snapshot()
        assert snapshot.state is EngineState.STARTING
        assert "banned" in snapshot.start_waiting_for
        [view] = snapshot.positions
        assert not view.covered
        assert view.stop_loss_unverified
        assert view.trailing_stop_unverified
        warning = quit_warning(snapshot)
        assert f"1 position is UNCOVERED right now ({held}); 1 of them not verified" in warning
        assert "may still be on the exchange" in warning
        assert f"(the start is waiting for the venue: {snapshot.start_waiting_for})" in warning
        # Quitting gives the start up: nothing is sent, and the dialog does not promise otherwise.
        assert "Quitting now gives up the start: nothing is restored or sent" in warning
        assert "tries to protect them" not in warning
        # The venue's truth: both its stops are there all along.
        kinds = {o.type for o in core.inspect(clock.now()).open_conditional if o.symbol == held}
        assert kinds == {OrderType.STOP_MARKET, OrderType.TRAILING_STOP_MARKET}
        await drive(clock, starting)
        assert second.snapshot().start_waiting_for == ""  # the wait is over, and said so
    finally:
        if not starting.done():  # (a failed assertion above) given up as at SIGTERM
            second.interrupt_start()
            await drive(clock, asyncio.gather(starting, return_exceptions=True))
        await drive(clock, second.stop())

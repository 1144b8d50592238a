"""An operator's protection restart while an entry is on its way to the venue (the chaos soak does this
every few minutes under waves). The entry used to finish under the manager it started with: stopped by the
restart, so the position's guard ran in a manager nobody reads (the new one's reconciler saw its stops as
orphans), and the restart meanwhile looked the in-flight entry up, found nothing yet and recorded the
position failed — a live position the engine did not guard."""

from __future__ import annotations

import asyncio

from engine.exchange.port import OrderType
from engine.venues.sim import SimVenue
from engine.venues.sim.settings import CallKind, FaultKind
from storage.database import Database
from storage.repositories import PositionStatus
from tests.integration.test_failure_modes_f1_f5 import SYMBOLS
from tests.integration.test_failure_modes_f6_f12 import _started
from tests.support.driving import drive, drive_until


async def test_an_entry_in_flight_across_a_protection_restart_is_guarded_by_the_new_manager(
    db: Database,
) -> None:
    engine, clock = await _started(db, create_order_seconds=2.0)
    venue = engine.venue
    assert isinstance(venue, SimVenue)
    symbol = SYMBOLS[5]
    try:
        assert engine.store is not None
        assert engine.manager is not None
        old_manager = engine.manager
        await engine.store.insert_signals([(symbol, "long", None, None)])
        await drive_until(
            clock,
            lambda: venue.calls_made.get(CallKind.CREATE_ORDER, 0) == 1,
            what="the entry sent",
            step=0.01,
        )
        restart = asyncio.ensure_future(engine.restart_protection())
        await drive_until(clock, restart.done, what="the protection restart")
        restart.result()
        assert engine.manager is not old_manager

        await drive_until(
            clock,
            lambda: symbol in engine.manager.by_symbol and engine.manager.by_symbol[symbol].covered,
            what="the new manager guarding the position, covered",
        )
        guard = engine.manager.by_symbol[symbol]
        await drive_until(clock, lambda: guard.status is PositionStatus.ACTIVE, what="recorded active")
        assert not old_manager.guards
        # The venue's truth: one position, one hard stop and one trailing stop for it, nothing twice.
        assert [p.symbol for p in venue.core.positions(clock.now())] == [symbol]
        kinds = sorted(o.type for o in venue.core.open_protective_orders(clock.now(), symbol))
        assert kinds == [OrderType.STOP_MARKET, OrderType.TRAILING_STOP_MARKET]
        # It stays guarded through the next reconcile pass (its stops are not taken for orphans).
        await drive(clock, clock.sleep(15.0))
        kinds = sorted(o.type for o in venue.core.open_protective_orders(clock.now(), symbol))
        assert kinds == [OrderType.STOP_MARKET, OrderType.TRAILING_STOP_MARKET]
        assert engine.manager.by_symbol[symbol].covered
    finally:
        await drive(clock, engine.stop())


async def test_two_protection_restarts_asked_together_run_once_and_leave_one_guard_per_position(
    db: Database,
) -> None:
    """The dashboard's `r` and `tsbot restart-protection` at the same moment: the second stopped the
    manager the first was restoring into, so the first's guards ran in a stopped manager, unseen (their
    stops taken for orphans by the new one's reconciler)."""
    engine, clock = await _started(db)
    venue = engine.venue
    assert isinstance(venue, SimVenue)
    symbols = SYMBOLS[30:33]
    try:
        assert engine.store is not None
        await engine.store.insert_signals([(s, "long", None, None) for s in symbols])
        await drive_until(
            clock,
            lambda: engine.manager is not None and engine.manager.coverage().protected == 3,
            what="three positions covered",
        )
        old_manager = engine.manager
        venue.inject_fault(CallKind.FETCH_POSITIONS, FaultKind.TIMEOUT_AFTER_ACCEPT, count=1)  # slow read
        first = asyncio.ensure_future(engine.restart_protection())
        # The first is restoring into its new manager (its venue read is slow) when the second is asked.
        await drive_until(
            clock, lambda: engine.manager is not old_manager, what="the first restart's manager", step=0.01
        )
        second = asyncio.ensure_future(engine.restart_protection())
        fewest_stops = 6

        def answered() -> bool:  # sampled at every step: no stop of ours may vanish meanwhile
            nonlocal fewest_stops
            fewest_stops = min(fewest_stops, len(venue.core.open_protective_orders(clock.now())))
            return first.done() and second.done()

        await drive_until(clock, answered, what="both restarts answered", step=0.05)
        assert fewest_stops == 6  # a reconcile pass against a half-restored manager cancelled them
        assert first.result() == second.result()
        assert first.result().restored == 3
        manager = engine.manager
        assert manager is not None
        assert not manager.stopped
        assert sorted(g.symbol for g in manager.guards.values()) == sorted(symbols)
        guard_tasks = [t for t in asyncio.all_tasks() if t.get_name().startswith("protect-")]
        assert len(guard_tasks) == 3  # one guard per position, all of them the current manager's
        await drive(clock, clock.sleep(15.0))  # through the next reconcile pass: nothing taken for orphans
        for symbol in symbols:
            kinds = sorted(o.type for o in venue.core.open_protective_orders(clock.now(), symbol))
            assert kinds == [OrderType.STOP_MARKET, OrderType.TRAILING_STOP_MARKET], symbol
        assert manager.coverage().protected == 3
    finally:
        await drive(clock, engine.stop())

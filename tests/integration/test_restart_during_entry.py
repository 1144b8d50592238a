"""An operator's protection restart while an entry is on its way to the venue (the chaos soak does this
every few minutes under waves). The entry used to finish under the manager it started with: stopped by the
restart, so the position's guard ran in a manager nobody reads (the new one's reconciler saw its stops as
orphans), and the restart meanwhile looked the in-flight entry up, found nothing yet and recorded the
position failed — a live position the engine did not guard."""

from __future__ import annotations

import asyncio

from engine.exchange.port import OrderType
from engine.venues.sim import SimVenue
from engine.venues.sim.settings import CallKind
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

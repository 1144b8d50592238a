"""Holes a reviewer found in how doubt about a position's stops is kept and lifted, and in guards that
stop running: each left a position counted covered while the venue held no stop of ours for it. Every
test reads the venue's own book (`venue.core`) for what it holds."""

from __future__ import annotations

import logging

import pytest

from engine.clock import ManualClock
from engine.exchange.port import OrderType
from engine.venues.sim import SimVenue
from engine.venues.sim.settings import CallKind, FaultKind
from storage.database import Database
from tests.integration.engine_support import make_engine
from tests.integration.test_failure_modes_f1_f5 import (
    SYMBOLS,
    drive_until_covered,
    open_positions,
    settings_for,
)
from tests.support.driving import drive, drive_until


def _hard_stop_replaced(venue: SimVenue, clock: ManualClock, symbol: str, lost: str | None) -> bool:
    """The venue holds a hard stop of ours on `symbol` other than the one cancelled by hand."""
    return any(
        o.type is OrderType.STOP_MARKET and o.client_order_id != lost
        for o in venue.core.open_protective_orders(clock.now(), symbol)
    )


async def test_a_guard_failing_for_hours_keeps_running(db: Database) -> None:
    """The backoff computed 2 ** (failures - 1): past 1 024 failed passes in a row (some 8 hours of a stop
    refused at the 30 s cap) it overflowed, inside the guard's own failure report, and the guard's task
    died; once the venue took stops again nothing placed one."""
    settings = settings_for(db, {"PROTECTION__RECONCILE_SECONDS": "600"})
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        venue = engine.venue
        assert isinstance(venue, SimVenue)
        venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.SERVER_ERROR, count=10_000_000, stops_only=True)
        [guard] = await open_positions(engine, clock, [SYMBOLS[57]])
        await drive(clock, clock.sleep(60.0))
        guard.failures = 1020  # stands for ~8 h of refused stops at the 30 s cap
        for _ in range(10):
            await drive(clock, clock.sleep(60.0))
        assert guard.failures > 1030
        venue.clear_injected_faults()
        await drive_until_covered(engine, clock, 1, limit=60.0)
    finally:
        await drive(clock, engine.stop())


async def test_a_guard_whose_task_died_is_started_again_and_counts_uncovered_meanwhile(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """A guard's task that ended with its position open (a bug, a cancellation) was said once at CRITICAL
    and never started again: the position kept the coverage it had when the task died, and a stop
    cancelled by hand after that was never placed again (100 % coverage shown 40 s later)."""
    settings = settings_for(db)
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        [guard] = await open_positions(engine, clock, [SYMBOLS[53]])
        await drive_until_covered(engine, clock, 1)
        manager = engine.manager
        assert manager is not None
        manager._tasks[guard.position_id].cancel()
        await drive(clock, clock.sleep(0.1))
        assert not guard.covered  # at once: nothing watches its stops until it runs again
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
        assert any("protection task ended with the position open" in m for m in said), said
        venue = engine.venue
        assert isinstance(venue, SimVenue)
        lost = guard.stop_loss.client_order_id
        venue.core.cancel_order(guard.symbol, lost, clock.now())  # by hand
        grace = float(settings.protection.grace_seconds)
        await drive_until(
            clock,
            lambda: _hard_stop_replaced(venue, clock, guard.symbol, lost),
            limit=grace + 10.0,
            what="the cancelled hard stop placed again",
        )
        await drive_until_covered(engine, clock, 1, limit=10.0)
    finally:
        await drive(clock, engine.stop())

"""A restart on the sim venue is a restart against an exchange that remembers (issue 13, defect 3).

The sim venue used to forget its book when its process stopped: the next start found every position gone,
showed them as phantoms at 0 % coverage and CRITICAL for ~45 s while 139 reduce-only stops were refused
(-2022), and the 0 % stayed in the hour's trend. Here two engines are built the way `tsbot run` builds them
(`build_venue`: the sim venue with its kept book beside `database.data_dir`), on real PostgreSQL: the
second finds the first one's positions and stops on the venue, and coverage never leaves 100 %.
"""

from __future__ import annotations

import asyncio
import logging
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from engine.clock import ManualClock
from engine.engine import Engine, EngineSnapshot, EngineState, sim_book_location
from engine.venues.sim import SimVenue
from engine.venues.sim.settings import CallKind
from storage.database import Database
from tests.integration.test_failure_modes_f1_f5 import (
    SYMBOLS,
    drive_until_covered,
    open_positions,
    settings_for,
)
from tests.support.driving import drive, drive_until

POSITIONS = 8
T = TypeVar("T")


def venue_truth(engine: Engine, clock: ManualClock) -> dict[str, set[str]]:
    """What the venue holds at this instant: each position's symbol and the client ids of its open stops."""
    venue = engine.venue
    assert isinstance(venue, SimVenue)
    held = venue.core.inspect(clock.now())
    stops: dict[str, set[str]] = {p.symbol: set() for p in held.positions}
    for order in held.open_conditional:
        stops.setdefault(order.symbol, set()).add(order.client_order_id)
    return stops


async def drive_until_sampled(clock: ManualClock, awaitable: Awaitable[T], sample: Callable[[], None]) -> T:
    """Drive `awaitable` to completion, calling `sample` at every step of the clock."""
    task = asyncio.ensure_future(awaitable)
    try:
        await drive_until(clock, lambda: sample() or task.done(), what="awaited call")
    finally:
        if not task.done():
            task.cancel()
    return task.result()


def book_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_an_engine_restarted_on_the_sim_finds_its_positions_and_stops_and_stays_at_100_percent(
    db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(db, {"DATABASE__DATA_DIR": str(tmp_path / "pgdata")})
    clock = ManualClock()
    first = Engine(settings, clock=clock, version="test")  # the venue `tsbot run` builds
    await drive(clock, first.start())
    try:
        await open_positions(first, clock, SYMBOLS[:POSITIONS], ["long", "short"] * (POSITIONS // 2))
        await drive_until_covered(first, clock, POSITIONS)
        assert first.manager is not None
        ours = {
            g.symbol: {g.stop_loss.client_order_id, g.trailing_stop.client_order_id}
            for g in first.manager.guards.values()
        }
        assert venue_truth(first, clock) == ours
    finally:
        await drive(clock, first.stop())
    book = sim_book_location(settings)
    assert book.parent == tmp_path / "sim-venue"
    assert book_mode(book) == 0o600

    caplog.clear()
    caplog.set_level(logging.INFO)
    second = Engine(settings, clock=clock, version="test")  # a new process: a new venue, the same book
    samples: list[EngineSnapshot] = []

    def sample() -> None:
        snapshot = second.snapshot()
        if snapshot.positions or snapshot.state is EngineState.RUNNING:
            samples.append(snapshot)
        # The venue's truth, from the moment it opened its book: the same positions with the same stops.
        venue = second.venue
        assert isinstance(venue, SimVenue)
        assert venue.book is not None
        if venue.book_loaded:
            assert venue_truth(second, clock) == ours

    starting = second.start()
    try:
        report = await drive_until_sampled(clock, starting, sample)
        assert (report.restored, report.reprotected, report.adopted, report.failed) == (POSITIONS, 0, 0, 0)
        # Three reconcile passes and more than a grace period, sampled every step.
        await drive_until(
            clock,
            lambda: sample() or (second.reconciler is not None and second.reconciler.runs >= 4),
            limit=60.0,
            what="three reconcile passes after the start-up one",
        )
        venue = second.venue
        assert isinstance(venue, SimVenue)
        sent = {
            kind: venue.calls_made.get(kind, 0) for kind in (CallKind.CREATE_ORDER, CallKind.CANCEL_ORDER)
        }
    finally:
        await drive(clock, second.stop())

    assert samples
    for snapshot in samples:
        assert snapshot.coverage.active == POSITIONS, snapshot.coverage
        assert snapshot.coverage.protected == POSITIONS, snapshot.coverage
        assert snapshot.coverage.uncovered == 0
        assert snapshot.coverage.ts_coverage_pct == 100
        assert snapshot.coverage.sl_coverage_pct == 100
        assert all(view.covered for view in snapshot.positions)
    assert sent == {CallKind.CREATE_ORDER: 0, CallKind.CANCEL_ORDER: 0}  # nothing re-placed, nothing swept
    refused = [
        r.getMessage()
        for r in caplog.records
        if any(sign in r.getMessage() for sign in ("-2022", "-2013", "NotFound", "not found", "no order '"))
    ]
    assert refused == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [r for r in caplog.records if "closed_on_exchange" in r.getMessage()]

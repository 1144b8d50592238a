"""The time unprotected survives a restart (issue 13, defect 6): restarting the TS manager (`R`,
`restart_protection`) showed a position unprotected for 75 s as unprotected for 45 s — the count began again
at the restart (or, on a restored position, at its fill), hiding a crossed CRITICAL line. The moment
protection was lost is now recorded with the position's facts (`positions.unprotected_since`) and a restarted
manager or engine measures from it. The venue's truth (the sim core) says when the stop really went."""

from __future__ import annotations

from engine.clock import ManualClock
from engine.engine import Engine
from engine.venues.sim.settings import CallKind, FaultKind
from protection.manager import PositionGuard
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
from tui.feed import LogEntry, ReadOnlyFeed


async def _wait(clock: ManualClock, seconds: float) -> None:
    until = clock.monotonic() + seconds
    await drive_until(clock, lambda: clock.monotonic() >= until, step=0.5, limit=seconds + 1, what="time")


async def _lose_protection(engine: Engine, clock: ManualClock, guard: PositionGuard) -> float:
    """Every protective order fails from now on (HTTP 500) and the position's stop-loss is cancelled on
    the venue by hand. Returns the moment (monotonic) the venue lost the stop."""
    venue = engine.venue
    venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.SERVER_ERROR, 100_000)
    assert guard.stop_loss.client_order_id is not None
    venue.core.cancel_order(guard.symbol, guard.stop_loss.client_order_id, clock.now())
    lost = clock.monotonic()
    engine.manager.request_reconcile()  # type: ignore[union-attr]
    await drive_until(clock, lambda: not guard.covered, what="the loss seen")
    return lost


def _unprotected_seconds(engine: Engine, position_id: int) -> float | None:
    [view] = [p for p in engine.snapshot().positions if p.position_id == position_id]
    return view.unprotected_seconds


async def _recorded_since(db: Database, position_id: int) -> float | None:
    moment = await db.pool.fetchval(
        "SELECT unprotected_since FROM monitoring.positions WHERE id = $1", position_id
    )
    return None if moment is None else moment.timestamp()


async def test_restarting_protection_keeps_counting_from_when_protection_was_lost(db: Database) -> None:
    settings = settings_for(db, {"PROTECTION__RECONCILE_SECONDS": "5"})
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        [guard] = await open_positions(engine, clock, [SYMBOLS[61]])
        await drive_until_covered(engine, clock, 1)
        await _wait(clock, 100)  # covered for a while: its fill is no measure of its time unprotected
        lost = await _lose_protection(engine, clock, guard)
        await _wait(clock, 75)
        before = _unprotected_seconds(engine, guard.position_id)
        assert before is not None
        assert abs(before - (clock.monotonic() - lost)) < 6  # seen within a reconcile interval of the loss

        await drive(clock, engine.restart_protection())

        manager = engine.manager
        assert manager is not None
        restored = manager.guards[guard.position_id]
        assert restored is not guard
        assert not restored.covered
        after = _unprotected_seconds(engine, guard.position_id)
        assert after is not None
        assert after >= before  # not 45 s for 75 s: the count goes on from the loss …
        assert abs(after - (clock.monotonic() - lost)) < 6  # … not from the restart or the fill
        figures = manager.coverage()
        assert (figures.uncovered, figures.protecting) == (1, 0)  # no fresh grace period either
        assert figures.oldest_unprotected_seconds is not None
        assert figures.oldest_unprotected_seconds >= before
        # The moment is the position's, in the database, on the engine's clock.
        recorded = await _recorded_since(db, guard.position_id)
        assert recorded is not None
        assert abs(recorded - (clock.now() - (clock.monotonic() - lost))) < 6

        await _wait(clock, 10)
        later = _unprotected_seconds(engine, guard.position_id)
        assert later is not None
        assert abs(later - (after + 10)) < 1
    finally:
        await drive(clock, engine.stop())


async def test_a_restarted_engine_measures_the_time_unprotected_from_the_recorded_loss(db: Database) -> None:
    settings = settings_for(
        db, {"PROTECTION__RECONCILE_SECONDS": "5", "PROTECTION__CALL_TIMEOUT_SECONDS": "2"}
    )
    clock = ManualClock()
    engine_a = make_engine(settings, clock)
    await drive(clock, engine_a.start())
    try:
        [guard] = await open_positions(engine_a, clock, [SYMBOLS[62]])
        await drive_until_covered(engine_a, clock, 1)
        await _wait(clock, 100)
        lost = await _lose_protection(engine_a, clock, guard)
        await _wait(clock, 75)
    finally:
        await drive(clock, engine_a.stop())

    engine_b = restarted(engine_a, settings, clock)
    engine_b.venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.SERVER_ERROR, 100_000)
    await drive(clock, engine_b.start())
    try:
        assert engine_b.manager is not None
        restored = engine_b.manager.guards[guard.position_id]
        assert not restored.covered
        after = _unprotected_seconds(engine_b, guard.position_id)
        assert after is not None
        assert abs(after - (clock.monotonic() - lost)) < 6
        figures = engine_b.manager.coverage()
        assert (figures.uncovered, figures.protecting) == (1, 0)
        recorded = await _recorded_since(db, guard.position_id)  # kept, not stamped again at the restart
        assert recorded is not None
        assert abs(recorded - (clock.now() - (clock.monotonic() - lost))) < 6
    finally:
        await drive(clock, engine_b.stop())


async def test_the_read_only_dashboard_shows_the_same_age_and_labels_failures_by_class(db: Database) -> None:
    """The read-only dashboard (another process holds the lease) measured the time unprotected from the
    fill: a position held for an hour that lost its stop 75 s ago showed "1h unprotected". It measures from
    the recorded loss now, and its log rows name a failed stop by class, as the live view does."""
    settings = settings_for(db, {"PROTECTION__RECONCILE_SECONDS": "5"})
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    feed = ReadOnlyFeed(settings, None, interval=1.0)
    try:
        [guard] = await open_positions(engine, clock, [SYMBOLS[63]])
        await drive_until_covered(engine, clock, 1)
        await feed.start()
        await _lose_protection(engine, clock, guard)

        async def server_errors_read() -> bool:
            rows = [e for e in await feed.poll() if e.symbol == guard.symbol]
            seen.extend(rows)
            return any(e.detail.startswith("venue server error") for e in seen)

        seen: list[LogEntry] = []
        await drive_until(clock, server_errors_read, step=0.5, limit=60, what="a server error read back")
        [row] = [e for e in seen if e.detail.startswith("venue server error")][:1]
        assert row.operation == "create stop-loss"
        assert "Timeout" not in row.detail
    finally:
        await drive(clock, engine.stop())
    # The database's clock is not the test's virtual one: put the recorded moments on it, an hour after
    # the fill and 75 s after the loss.
    await db.pool.execute(
        "UPDATE monitoring.positions SET opened_at = now() - interval '1 hour', "
        "unprotected_since = now() - interval '75 seconds' WHERE id = $1",
        guard.position_id,
    )
    try:
        await feed.poll()
        snapshot = feed.snapshot()
        [view] = [p for p in snapshot.positions if p.position_id == guard.position_id]
        assert view.unprotected_seconds is not None
        assert 74 <= view.unprotected_seconds < 90
        assert snapshot.coverage.oldest_unprotected_seconds is not None
        assert 74 <= snapshot.coverage.oldest_unprotected_seconds < 90
    finally:
        await feed.stop()


async def test_a_position_whose_hard_stop_followed_its_fill_records_the_time_without_it(db: Database) -> None:
    """Time without a hard stop, per position (issue 12): on a venue whose entry cannot carry the stop (the
    sim, like Binance), the hard stop is sent after the fill, so the position was without one for at least a
    round trip; the database says how long, once the stop is confirmed."""
    settings = settings_for(db, {})
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        [guard] = await open_positions(engine, clock, [SYMBOLS[62]])
        await drive_until_covered(engine, clock, 1)
        assert engine.store is not None
        position = await drive(clock, engine.store.position(guard.position_id))
        assert position is not None
        assert position.hard_stop_gap_seconds is not None
        assert position.hard_stop_gap_seconds > 0
    finally:
        await drive(clock, engine.stop())

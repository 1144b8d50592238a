"""`Engine.snapshot(views_of=…)`: the dashboard's frame asks for full views of the positions on screen only
(issue 13, P4). The facts every panel needs (counts, coverage, the uncovered set, every position's row) stay
complete and exact; the views it asked for are the very views of the full snapshot."""

from __future__ import annotations

from collections.abc import Sequence

from engine.clock import ManualClock
from engine.venues.sim.settings import CallKind, FaultKind
from protection.coverage import CoverageFigures, PositionCoverage
from storage.database import Database
from tests.integration.engine_support import make_engine
from tests.integration.test_failure_modes_f1_f5 import (
    SYMBOLS,
    drive_until_covered,
    open_positions,
    settings_for,
)
from tests.support.driving import drive, drive_until


async def test_a_snapshot_with_views_of_some_positions_has_every_row_and_figure_and_the_same_views(
    db: Database,
) -> None:
    clock = ManualClock()
    engine = make_engine(settings_for(db, {"PROTECTION__RECONCILE_SECONDS": "5"}), clock)
    await drive(clock, engine.start())
    try:
        guards = await open_positions(engine, clock, SYMBOLS[10:16])
        await drive_until_covered(engine, clock, len(guards))
        # One position loses its stop-loss on the venue, and every new stop fails: uncovered.
        lost = guards[3]
        engine.venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.SERVER_ERROR, 100_000)
        assert lost.stop_loss.client_order_id is not None
        engine.venue.core.cancel_order(lost.symbol, lost.stop_loss.client_order_id, clock.now())
        engine.manager.request_reconcile()  # type: ignore[union-attr]
        grace = engine.manager.config.grace_seconds  # type: ignore[union-attr]
        await drive_until(clock, lambda: not lost.covered, what="the loss seen")
        until = clock.monotonic() + grace + 1
        await drive_until(clock, lambda: clock.monotonic() >= until, step=0.5, what="past the grace period")

        asked: list[tuple[tuple[int, ...], CoverageFigures]] = []
        chosen = {guards[0].position_id, guards[5].position_id}

        def views_of(rows: Sequence[PositionCoverage], figures: CoverageFigures) -> set[int]:
            asked.append((tuple(row.position_id for row in rows), figures))
            return chosen | set(figures.uncovered_ids)  # what a screen asks: its rows and the pinned ones

        full = engine.snapshot()
        scoped = engine.snapshot(views_of)

        ids = sorted(g.position_id for g in guards)
        assert [view.position_id for view in full.positions] == ids
        # The selector saw every position's facts and the figures the snapshot carries.
        [(seen, figures)] = asked
        assert list(seen) == ids
        assert figures == scoped.coverage == full.coverage
        assert scoped.coverage.uncovered_ids == (lost.position_id,)
        assert [row.position_id for row in scoped.rows] == ids
        assert scoped.rows == full.rows
        assert [row.covered for row in scoped.rows] == [view.covered for view in full.positions]
        # Views only of those asked for, each the full snapshot's own (same instant on this clock).
        wanted = sorted(chosen | {lost.position_id})
        assert [view.position_id for view in scoped.positions] == wanted
        by_id = {view.position_id: view for view in full.positions}
        assert list(scoped.positions) == [by_id[position_id] for position_id in wanted]
        uncovered_view = next(v for v in scoped.positions if v.position_id == lost.position_id)
        assert not uncovered_view.covered
        assert uncovered_view.unprotected_seconds is not None
    finally:
        await drive(clock, engine.stop())

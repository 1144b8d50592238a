"""A book of many positions the test sets frame by frame: a `DashboardFeed` over the scenario's frozen
instant whose positions (and the coverage computed from them by the engine's pure core) change when the
test says, to show what the screen does in transitions (a burst of uncovered positions, rows arriving)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from decimal import Decimal

from engine.config import Settings
from engine.engine import (
    EngineSnapshot,
    PlannedOrder,
    PlannedProtection,
    PositionView,
    ProtectionResult,
    ViewSelector,
    coverage_sample,
)
from protection.coverage import PositionCoverage
from tests.tui.scenario import MONO, ScenarioFeed, figures_of

D = Decimal


def book_position(position_id: int, symbol: str, *, uncovered_for: float | None = None) -> PositionView:
    """A long position; with `uncovered_for` it has no confirmed stop since that many seconds."""
    covered = uncovered_for is None
    return PositionView(
        position_id=position_id,
        symbol=symbol,
        side="long",
        quantity=D("123.45"),
        entry_price=D("1.2345"),
        mark_price=D("1.2401"),
        pnl_percent=D("0.45"),
        stop_loss_price=D("1.1975") if covered else None,
        has_stop_loss=covered,
        has_trailing_stop=covered,
        trailing_kind="native",
        trailing_phase="native" if covered else "pending",
        activation_price=D("1.2592"),
        distance_to_activation_percent=D("1.54"),
        trailing_stop_price=None,
        covered=covered,
        unprotected_seconds=uncovered_for,
        last_error=None if covered else "create stop-loss: HTTP 500 from the venue",
    )


class BookFeed(ScenarioFeed):
    def __init__(self, settings: Settings, positions: list[PositionView] | None = None):
        super().__init__(settings)
        self.set_positions(positions or [])

    def set_positions(self, positions: list[PositionView]) -> None:
        figures = figures_of(positions, float(self.settings.protection.grace_seconds))
        self._snapshot = dataclasses.replace(
            self._snapshot,
            positions=tuple(positions),
            coverage=figures,
            coverage_sample=coverage_sample(
                figures, datetime.fromtimestamp(self._snapshot.taken_at, UTC)
            ),  # a frozen instant
        )

    def snapshot(self, views_of: ViewSelector | None = None) -> EngineSnapshot:
        return self._snapshot


class PlanFeed(ScenarioFeed):
    """The scenario with a re-protect plan for `p` and a result with a long failure for one position."""

    FAILURE = "create trailing stop: HTTP 500 from the venue (server error), retry in 8s"

    def plan_reprotect(self) -> list[PlannedProtection]:
        return [
            PlannedProtection(
                103,
                "1000PEPEUSDT",
                "long",
                (
                    PlannedOrder("stop-loss", "stop_market", D("0.009904")),
                    PlannedOrder("trailing stop", "trailing_stop_market", D("0.010363")),
                ),
                "create trailing stop: network error before send",
            ),
            PlannedProtection(
                105, "SOLUSDT", "short", (PlannedOrder("stop-loss", "stop_market", D("146.62")),), None
            ),
        ]

    async def reprotect_uncovered(self, plan: list[PlannedProtection]) -> list[ProtectionResult]:
        return [
            ProtectionResult(103, "1000PEPEUSDT", False, self.FAILURE),
            ProtectionResult(105, "SOLUSDT", True, ""),
        ]


class ScreenScopedBookFeed(BookFeed):
    """A book that builds views the way `Engine.snapshot(views_of)` does: every position's coverage facts
    and the figures always, a full view only of the positions the dashboard asks for. Counts the views
    handed out per snapshot, to see that a frame asks only for what it shows."""

    def __init__(self, settings: Settings, positions: list[PositionView] | None = None):
        self.views_given: list[int] = []
        super().__init__(settings, positions)

    def set_positions(self, positions: list[PositionView]) -> None:
        super().set_positions(positions)
        grace = float(self.settings.protection.grace_seconds)
        self._rows = tuple(
            sorted(
                (
                    PositionCoverage(
                        p.position_id,
                        p.symbol,
                        p.has_stop_loss,
                        p.has_trailing_stop,
                        filled_at=MONO - (p.unprotected_seconds or 600.0),
                        unprotected_since=None if p.covered else MONO - (p.unprotected_seconds or 0.0),
                    )
                    for p in positions
                ),
                key=lambda row: row.position_id,
            )
        )
        assert figures_of(positions, grace) == self._snapshot.coverage

    def snapshot(self, views_of: ViewSelector | None = None) -> EngineSnapshot:
        snapshot = dataclasses.replace(self._snapshot, rows=self._rows)
        if views_of is None:
            return snapshot
        wanted = set(views_of(self._rows, snapshot.coverage))
        views = tuple(p for p in snapshot.positions if p.position_id in wanted)
        self.views_given.append(len(views))
        return dataclasses.replace(snapshot, positions=views)

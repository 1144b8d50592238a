"""A book of many positions the test sets frame by frame: a `DashboardFeed` over the scenario's frozen
instant whose positions (and the coverage computed from them by the engine's pure core) change when the
test says, to show what the screen does in transitions (a burst of uncovered positions, rows arriving)."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

from engine.config import Settings
from engine.engine import EngineSnapshot, PlannedOrder, PlannedProtection, PositionView, ProtectionResult
from tests.tui.scenario import ScenarioFeed, figures_of

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
        self._snapshot = dataclasses.replace(self._snapshot, positions=tuple(positions), coverage=figures)

    def snapshot(self) -> EngineSnapshot:
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

"""Running the dashboard against a real engine in tests: the sim venue on a ManualClock, real PostgreSQL.

The app and the engine share the test's event loop (as they share the app's loop in production). Virtual
time moves only when a test drives it; the app paints on its own (real-time) timer, so a test waits on what
the screen shows with `drive_until`, which gives real time to both the database and the painter.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC

from textual.pilot import Pilot
from textual.widgets import Label, Static

from engine.clock import ManualClock
from engine.config import Settings
from engine.engine import Engine, EngineState
from engine.venues.sim import SimVenue
from storage.database import Database
from tests.integration.engine_support import engine_settings, make_engine
from tests.support.driving import drive, drive_until
from tui.app import DashboardApp
from tui.screens.confirm import ConfirmScreen
from tui.widgets.coverage import CoverageGauge
from tui.widgets.event_log import EventLog
from tui.widgets.positions import PositionsTable
from tui.widgets.status import StatusBar

WALL_FLOOR_SECONDS = 30.0  # `Dashboard.until`'s least wait on the wall clock


def tui_settings(db: Database, overrides: Mapping[str, str] | None = None) -> Settings:
    return engine_settings(
        db.target.dsn,
        {
            "VENUE__SIM__SEED": "42",
            "TUI__REFRESH_PER_SECOND": "30",
            **(overrides or {}),
        },
    )


@dataclass
class Dashboard:
    app: DashboardApp
    pilot: Pilot[int]
    engine: Engine
    clock: ManualClock

    @property
    def venue(self) -> SimVenue:
        return self.engine.venue  # type: ignore[return-value]

    @property
    def positions(self) -> PositionsTable:
        return self.app.query_one(PositionsTable)

    @property
    def log(self) -> EventLog:
        return self.app.query_one(EventLog)

    def status_text(self) -> str:
        bar = self.app.query_one(StatusBar)
        return " ".join(str(label.content) for label in bar.query(Label))

    def confirm_body(self) -> str:
        """The words of the question on screen (a `ConfirmScreen`), as it shows them now."""
        confirm = self.app.screen
        assert isinstance(confirm, ConfirmScreen), confirm
        return str(confirm.query_one("#confirm-body", Static).content)

    def uncovered_text(self) -> str:
        return str(self.app.query_one(CoverageGauge).query_one("#uncovered", Label).content)

    def log_details(self) -> list[str]:
        return [e.detail for e in self.log.shown_entries()]

    async def until(self, condition, what: str = "condition", limit: float = 120.0) -> None:
        """Drive the virtual clock until `condition` holds: `limit` virtual seconds, and at least
        WALL_FLOOR_SECONDS of the wall clock (the app's messages take real time: on a loaded machine 120
        virtual seconds went by in a few seconds of it, before a key press had reached the table)."""
        started = time.monotonic()
        while True:
            try:
                await drive_until(self.clock, condition, limit=limit, what=what)
                return
            except AssertionError:
                if time.monotonic() - started >= WALL_FLOOR_SECONDS:
                    raise

    async def press(self, *keys: str) -> None:
        await self.pilot.press(*keys)
        await self.pilot.pause()

    async def open_positions(self, symbols: list[str], side: str = "long") -> None:
        assert self.engine.store is not None
        assert self.engine.manager is not None
        manager = self.engine.manager
        before = len(manager.guards)
        await self.engine.store.insert_signals([(s, side, None, None) for s in symbols])
        await self.until(lambda: len(manager.guards) == before + len(symbols), f"{symbols} opened")


@contextlib.asynccontextmanager
async def dashboard(
    settings: Settings, *, size: tuple[int, int] = (120, 40), engine: Engine | None = None
) -> AsyncIterator[Dashboard]:
    clock = engine.clock if engine is not None else ManualClock()
    assert isinstance(clock, ManualClock)
    engine = engine or make_engine(settings, clock)
    app = DashboardApp(settings, engine=engine, tz=UTC, code_roots=[])
    try:
        async with app.run_test(size=size) as pilot:
            board = Dashboard(app, pilot, engine, clock)
            yield board
    finally:
        if engine.state is EngineState.RUNNING:
            await drive(clock, engine.stop())


async def started(board: Dashboard) -> Dashboard:
    await board.until(
        lambda: board.app.feed_started and " running " in board.status_text(), "engine running on screen"
    )
    return board

"""The dashboard never claims more than the venue confirmed (issue 13): quitting, the exit line, what is
on screen. Against the real engine (sim venue, ManualClock, real PostgreSQL) unless a frozen instant is
needed for the picture."""

from __future__ import annotations

from engine.engine import EngineState
from engine.venues.sim.settings import CallKind, FaultKind
from engine.venues.sim.universe import UNIVERSE
from storage.database import Database
from tests.tui.harness import dashboard, started, tui_settings
from tui.screens.confirm import ConfirmScreen

SYMBOLS = sorted(UNIVERSE)


async def test_quit_dialog_and_exit_line_never_say_a_position_inside_its_grace_period_keeps_its_stops(
    db: Database,
) -> None:
    """A position inside its grace period has no confirmed stop: the dialog and the exit line counted it
    among those that "keep their stops" (and the exit line said "3 keep their stops … UNCOVERED 1")."""
    settings = tui_settings(
        db,
        {
            "PROTECTION__GRACE_SECONDS": "600",  # the unprotected position stays inside its grace period
            "PROTECTION__CALL_TIMEOUT_SECONDS": "2",
        },
    )
    async with dashboard(settings) as board:
        await started(board)
        await board.open_positions(SYMBOLS[70:72])
        await board.until(lambda: board.engine.snapshot().coverage.protected == 2, "2 covered")
        # The entry executes (its answer lost, resolved by client id); no stop order gets through.
        board.venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.TIMEOUT_AFTER_ACCEPT, 1)
        board.venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.NETWORK_ERROR_BEFORE_SEND, 100_000)
        await board.open_positions([SYMBOLS[72]])
        await board.until(lambda: board.uncovered_text() == "uncovered 0 (1 protecting)", "inside grace")

        await board.press("q")
        confirm = board.app.screen
        assert isinstance(confirm, ConfirmScreen)
        body = str(confirm.query_one("#confirm-body").content)  # type: ignore[attr-defined]
        assert "UNCOVERED" in body  # said of the position inside its grace period
        assert "2 of 3 open positions keep their stops on the exchange" in body
        assert "WARNING: 1 position is UNCOVERED right now, 1 of them inside their grace period" in body
        await board.press("y")
        await board.until(lambda: board.engine.state is EngineState.STOPPED, "engine stopped")
        await board.until(lambda: not board.app.is_running, "app exited")
        summary = board.app.exit_summary()
        assert summary == (
            f"tsbot-tui stopped: 3 open positions: 2 keep their stops on the exchange; UNCOVERED 1 ({SYMBOLS[72]})"
        )
        assert board.app.left_uncovered

"""The dashboard's engine is steered like a headless one: a command sent from elsewhere (`tsbot close`, a
read-only dashboard) is executed by the engine inside the dashboard, and the log panel says so."""

from __future__ import annotations

import logging

import pytest

from engine.commands import send_command
from engine.venues.sim.universe import UNIVERSE
from storage.commands import CommandKind, CommandState
from storage.database import Database
from tests.support.driving import drive
from tests.tui.harness import dashboard, started, tui_settings

SYMBOLS = sorted(UNIVERSE)


async def test_the_dashboards_engine_executes_a_command_sent_from_elsewhere(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="engine.commands")  # the shipped `logging.level` (INFO)
    async with dashboard(tui_settings(db)) as board:
        await started(board)
        await board.open_positions(SYMBOLS[20:22])
        await board.until(lambda: board.engine.snapshot().coverage.protected == 2, "2 covered")
        engine = board.engine
        answer = await drive(
            board.clock,
            send_command(
                db.pool,
                venue=engine.exchange_name,
                account=engine.account_key,
                kind=CommandKind.CLOSE,
                args={"symbol": SYMBOLS[20]},
                reason="from a script",
                wait_seconds=30,
                requested_by="ops@elsewhere/42",
            ),
        )
        assert answer.record is not None
        assert answer.record.state is CommandState.DONE
        assert [p.symbol for p in answer.positions] == [SYMBOLS[20]]
        assert {p.symbol for p in board.venue.core.positions(board.clock.now())} == {SYMBOLS[21]}
        await board.until(lambda: board.positions.shown_symbols() == [SYMBOLS[21]], "row removed")
        await board.until(
            lambda: any(
                f"close symbol={SYMBOLS[20]} from" in d and "ops@elsewhere/42" in d and "from a script" in d
                for d in board.log_details()
            ),
            "the command in the log panel",
        )
        # Shown as information: an operator's routine command counts among no warnings.
        [row] = [e for e in board.log.shown_entries() if f"close symbol={SYMBOLS[20]} from" in e.detail]
        assert row.severity == "info"

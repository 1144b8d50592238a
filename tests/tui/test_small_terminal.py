"""A terminal smaller than the dashboard is laid out for (80×24) cuts panels or hides them: at 40×12 the
health panel and the positions were gone, and nothing said so (an operator in a tmux split). A line says the
size and where the whole picture is, for as long as the terminal stays that small. Read from the screen."""

from __future__ import annotations

from datetime import UTC

import pytest

from engine.venues.sim.universe import UNIVERSE
from tests.tui.book import BookFeed, book_position
from tests.tui.scenario import scenario_settings
from tests.tui.snapshots import screen_text, wait_for
from tui.app import DashboardApp

NOTICE = "panels are cut (h: health in full, u: uncovered positions)"


@pytest.mark.parametrize("size", [(40, 12), (79, 40), (120, 23)], ids=["40x12", "79x40", "120x23"])
async def test_a_terminal_under_80x24_is_told_and_the_notice_goes_once_it_is_large_enough(
    size: tuple[int, int],
) -> None:
    settings = scenario_settings()
    feed = BookFeed(settings, [book_position(1, sorted(UNIVERSE)[0])])
    app = DashboardApp(settings, feed=feed, tz=UTC, code_roots=[])
    columns, rows = size
    async with app.run_test(size=size) as pilot:
        await wait_for(pilot, lambda: NOTICE in " ".join(screen_text(app).split()), "the size notice shown")
        said = " ".join(screen_text(app).split())
        assert f"terminal {columns}×{rows}, under 80×24" in said, said

        await pilot.resize_terminal(80, 24)
        await wait_for(pilot, lambda: "panels are cut" not in screen_text(app), "the size notice gone")
        assert "TS coverage" in screen_text(app)

        await pilot.resize_terminal(60, 20)  # smaller again: said again, with the new size
        await wait_for(
            pilot, lambda: "terminal 60×20" in " ".join(screen_text(app).split()), "the notice with 60×20"
        )

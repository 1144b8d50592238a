"""A position whose mark is stale (older than `health.stale_mark_seconds`) says so on its row: `~` before
the mark; the flag goes when the mark is fresh again, and a fresh row never carries it. Read from the
rendered screen."""

from __future__ import annotations

import dataclasses
from datetime import UTC

from engine.venues.sim.universe import UNIVERSE
from tests.tui.book import BookFeed, book_position
from tests.tui.scenario import scenario_settings
from tests.tui.test_positions_view import screen_text, wait_for
from tui.app import DashboardApp
from tui.widgets.positions import PositionsTable

SYMBOLS = sorted(UNIVERSE)


async def test_a_stale_mark_is_flagged_on_its_row_then_cleared() -> None:
    settings = scenario_settings()
    fresh = book_position(1, SYMBOLS[0])
    stale = dataclasses.replace(book_position(2, SYMBOLS[1]), mark_price=fresh.mark_price, mark_stale=True)
    feed = BookFeed(settings, [fresh, stale])
    app = DashboardApp(settings, feed=feed, tz=UTC, code_roots=[])
    async with app.run_test(size=(160, 48)) as pilot:
        table = app.query_one(PositionsTable)
        await wait_for(pilot, lambda: table.row_count == 2, "both positions shown")
        await wait_for(pilot, lambda: "~1.2401" in screen_text(app), "the stale flag")
        lines = screen_text(app).splitlines()
        flagged = [line for line in lines if "~1.2401" in line]
        assert len(flagged) == 1
        assert SYMBOLS[1] in flagged[0]  # the stale one, and only it
        assert any(SYMBOLS[0] in line and "1.2401" in line and "~" not in line for line in lines)
        feed.set_positions([fresh, dataclasses.replace(stale, mark_stale=False)])
        await wait_for(pilot, lambda: "~1.2401" not in screen_text(app), "the flag cleared")

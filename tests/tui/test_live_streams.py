"""Live streams on the dashboard (issue 11): a position whose mark is stale (older than
`health.stale_mark_seconds`) says so on its row (`~` before the mark; the flag goes when the mark is fresh
again, and a fresh row never carries it); the health panel has a line for the venue's push streams
(connected, last message age, reconnects), and none when the venue runs none. Read from the rendered screen."""

from __future__ import annotations

import dataclasses
from datetime import UTC

from engine.metrics import CallSummary
from engine.venues.sim.universe import UNIVERSE
from protection import health
from tests.tui.book import BookFeed, book_position
from tests.tui.scenario import scenario_settings
from tests.tui.test_positions_view import screen_text, wait_for
from tui.app import DashboardApp
from tui.widgets.health import HealthPanel
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


def _with_streams(feed: BookFeed, *, account_connected: bool) -> None:
    """The feed's health as an engine measures it with an account stream and a mark stream."""
    settings = feed.settings
    calls = CallSummary(calls=10, p50_ms=50.0, p99_ms=80.0, error_rate=0.0, timeouts=0)
    measured = health.HealthMeasurements(
        exchange=health.ExchangeMeasurement(
            calls=calls,
            account_stream=health.StreamMeasurement(
                "account", connected=account_connected, last_event_age_seconds=2.0, reconnects=3
            ),
        ),
        price_feed=health.PriceFeedMeasurement(
            newest_mark_age_seconds=0.4,
            open_positions=0,
            mark_stream=health.StreamMeasurement("marks", connected=True, last_event_age_seconds=0.4),
        ),
    )
    report = health.evaluate_health(measured, health.HealthThresholds.from_settings(settings.health))
    feed._snapshot = dataclasses.replace(feed._snapshot, health=tuple(report.components))


async def test_the_health_panel_shows_the_streams_state_and_none_without_streams() -> None:
    settings = scenario_settings()
    feed = BookFeed(settings, [book_position(1, SYMBOLS[0])])
    app = DashboardApp(settings, feed=feed, tz=UTC, code_roots=[])
    async with app.run_test(size=(160, 48)) as pilot:
        panel = app.query_one(HealthPanel)
        await wait_for(pilot, lambda: "exchange" in screen_text(app), "the health panel painted")
        assert "streams" not in screen_text(app)  # the scenario's venue runs no push stream
        _with_streams(feed, account_connected=True)
        await wait_for(pilot, lambda: "streams" in screen_text(app), "the streams line")
        line = next(line for line in screen_text(app).splitlines() if "streams" in line)
        assert "account up 2.0s ago, 3 reconnects · marks up 0.4s ago" in line
        _with_streams(feed, account_connected=False)
        await wait_for(pilot, lambda: "streams    account DOWN" in screen_text(app), "the stream down, first")
        assert panel.has_class("-degraded")  # the exchange component says why
        assert "Account stream down" in screen_text(app)

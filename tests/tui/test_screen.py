"""The main screen's shape: snapshots at the minimum (80×24) and a large (160×48) terminal, NO_COLOR, the
theme switch, the command palette, and nothing written to stdout/stderr while the app runs.

These read a frozen instant (tests/tui/scenario.py) so that the pictures are byte-stable; the behaviour of
every key against the real engine is in test_keys.py.
"""

from __future__ import annotations

import contextlib
import io
from datetime import UTC

import pytest

from tests.tui.scenario import ScenarioFeed, palette_prompts, scenario_settings
from tests.tui.snapshots import assert_matches_snapshot, svg_to_text
from tui.app import DashboardApp
from tui.widgets.positions import PositionsTable


async def _settled(app: DashboardApp, pilot) -> None:
    """Started, the scenario's events in the log, no toast in the picture, everything painted."""
    for _ in range(200):
        if app.feed_started and app.query_one("#log").row_count >= 5:  # type: ignore[attr-defined]
            break
        await pilot.pause(0.01)
    app.clear_notifications()
    app.paint()
    await pilot.pause()
    await pilot.wait_for_scheduled_animations()


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
async def test_main_screen_snapshot(size: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)  # the pictures are in colour wherever the suite runs
    settings = scenario_settings()
    app = DashboardApp(settings, feed=ScenarioFeed(settings), tz=UTC, code_roots=[])
    async with app.run_test(size=size) as pilot:
        await _settled(app, pilot)
        text = svg_to_text(app.export_screenshot(), *size)
        # At any size: both coverage figures, the health verdict, the uncovered count, the flagged row.
        assert "TS coverage % 6/8" in text
        assert "SL coverage % 7/8" in text
        assert "Health: CRITICAL" in text
        assert "protection CRITICAL" in text
        assert "UNCOVERED 1, oldest 3m32s" in text
        assert "! 1000PEPEUSDT" in " ".join(text.split())
        if size == (160, 48):  # larger terminals show everything
            assert "Waves" in text
            assert "Timeouts and errors" in text
            assert "2,210 ms" in text
        assert_matches_snapshot(app, f"main_{size[0]}x{size[1]}")


async def test_no_color_keeps_every_meaning_in_words(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    settings = scenario_settings()
    app = DashboardApp(settings, feed=ScenarioFeed(settings), tz=UTC, code_roots=[])
    async with app.run_test(size=(120, 40)) as pilot:
        await _settled(app, pilot)
        assert app.no_color
        text = svg_to_text(app.export_screenshot(), 120, 40)
        assert "UNCOVERED 1" in text
        assert "MISSING" in text
        assert "CRITICAL" in text
        assert "! 1000PEPEUSDT" in " ".join(text.split())


async def test_theme_switch_restyles_the_tables() -> None:
    settings = scenario_settings()
    app = DashboardApp(settings, feed=ScenarioFeed(settings), tz=UTC, code_roots=[])
    async with app.run_test(size=(120, 40)) as pilot:
        await _settled(app, pilot)
        table = app.query_one(PositionsTable)
        dark = app.export_screenshot()
        await app.run_action("toggle_dark_light")
        assert app.theme == "textual-light"
        assert not app.current_theme.dark
        app.paint()
        await pilot.pause()
        assert app.export_screenshot() != dark
        assert table.row_text(103).startswith("! 1000PEPEUSDT")  # the marker does not depend on colour


async def test_command_palette_lists_the_registry_and_runs_a_command() -> None:
    settings = scenario_settings()
    app = DashboardApp(settings, feed=ScenarioFeed(settings), tz=UTC, code_roots=[])
    async with app.run_test(size=(120, 40)) as pilot:
        await _settled(app, pilot)
        prompts = await palette_prompts(app, pilot, "show o")
        assert prompts[0] == "Show only uncovered positions  (u)", prompts
        await pilot.press("enter")
        await pilot.pause()
        assert app.query_one(PositionsTable).only_uncovered


async def test_nothing_reaches_stdout_or_stderr_while_the_app_runs() -> None:
    settings = scenario_settings()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        app = DashboardApp(settings, feed=ScenarioFeed(settings), tz=UTC, code_roots=[])
        async with app.run_test(size=(80, 24)) as pilot:
            await _settled(app, pilot)
            import logging

            logging.getLogger("engine.engine").warning("venue unavailable: next attempt in 10s")
            await pilot.pause()
            assert any("venue unavailable" in e.detail for e in app.query_one("#log").shown_entries())  # type: ignore[attr-defined]
    assert out.getvalue() == ""
    assert err.getvalue() == ""

"""Small things an operator trips over (issue 13, defect 13), each read from the screen."""

from __future__ import annotations

import dataclasses
import stat
from datetime import UTC
from decimal import Decimal
from pathlib import Path

from engine.engine import ENTRY_IN_DOUBT_PHASE
from engine.venues.sim.universe import UNIVERSE
from storage.database import Database
from tests.tui.book import BookFeed, book_position
from tests.tui.harness import dashboard, started, tui_settings
from tests.tui.scenario import T0, ScenarioFeed, palette_prompts, scenario_settings
from tests.tui.snapshots import svg_to_text
from tui import formatting
from tui.app import DashboardApp, quit_warning
from tui.feed import LogEntry
from tui.messages import LogEntryAdded
from tui.screens.confirm import ConfirmScreen
from tui.screens.info import HelpScreen
from tui.screens.restart import RestartReportScreen
from tui.widgets.event_log import EventLog
from tui.widgets.positions import COLUMNS, PositionsTable, _trailing_cell

SYMBOLS = sorted(UNIVERSE)


async def _settled(app: DashboardApp, pilot) -> None:
    for _ in range(300):
        if app.feed_started:
            break
        await pilot.pause(0.01)
    app.paint()
    await pilot.pause()


async def test_the_palette_has_one_quit_and_it_is_ours() -> None:
    settings = scenario_settings()
    app = DashboardApp(settings, feed=ScenarioFeed(settings), tz=UTC, code_roots=[])
    async with app.run_test(size=(120, 40)) as pilot:
        await _settled(app, pilot)
        prompts = await palette_prompts(app, pilot, "quit")
        quits = [p for p in prompts if p.lower().startswith("quit")]
        assert quits == ["Quit (exchange stops stay in place)  (q)"], prompts


async def test_the_palettes_keys_open_the_dashboards_own_key_list_at_80_columns() -> None:
    """Textual's "Keys" docked a panel 30 columns wide: at 80×24 it cut the header, the gauge and the tables,
    and wrapped each key's words ("Cycle the / log between / all, …"; an operator)."""
    settings = scenario_settings()
    app = DashboardApp(settings, feed=ScenarioFeed(settings), tz=UTC, code_roots=[])
    async with app.run_test(size=(80, 24)) as pilot:
        await _settled(app, pilot)
        prompts = await palette_prompts(app, pilot, "keys")
        assert prompts[0] == "Keys", prompts
        await pilot.press("enter")
        for _ in range(200):
            if isinstance(app.screen, HelpScreen):
                break
            await pilot.pause(0.01)
        assert isinstance(app.screen, HelpScreen), app.screen
        assert not app.query("HelpPanel")


async def test_an_empty_uncovered_only_view_says_so() -> None:
    settings = scenario_settings()
    feed = BookFeed(settings, [book_position(i, s) for i, s in enumerate(SYMBOLS[:5])])
    app = DashboardApp(settings, feed=feed, tz=UTC, code_roots=[])
    async with app.run_test(size=(120, 40)) as pilot:
        await _settled(app, pilot)
        table = app.query_one(PositionsTable)
        await pilot.press("u")
        await pilot.pause()
        assert table.row_count == 0
        assert "no uncovered position (u: show all)" in str(table.border_title)


async def test_log_counters_cover_the_last_hour_not_the_whole_run() -> None:
    settings = scenario_settings()
    app = DashboardApp(settings, feed=ScenarioFeed(settings), tz=UTC, code_roots=[])
    async with app.run_test(size=(120, 40)) as pilot:
        await _settled(app, pilot)
        log = app.query_one(EventLog)
        for _ in range(200):
            if log.row_count >= 5:
                break
            await pilot.pause(0.01)
        before = dict(log.counts)
        for at in (T0 - 7200, T0 - 5400):  # two hours and ninety minutes before the engine's "now"
            app.post_message(
                LogEntryAdded(LogEntry(at, "error", "OLDUSDT", "create SL", None, "failed", "old"))
            )
        app.post_message(
            LogEntryAdded(LogEntry(T0 - 5, "error", "NEWUSDT", "create SL", None, "failed", "new"))
        )
        await pilot.pause(0.1)
        assert log.counts == {"error": before["error"] + 1, "warning": before["warning"]}
        assert str(log.border_subtitle) == (
            f"{before['error'] + 1} errors, {before['warning']} warnings in the last hour"
        )


async def test_r_puts_its_result_in_the_log_panel(db: Database) -> None:
    async with dashboard(tui_settings(db)) as board:
        await started(board)
        await board.open_positions(SYMBOLS[82:84])
        await board.until(lambda: board.engine.snapshot().coverage.protected == 2, "2 covered")
        await board.press("r")
        assert isinstance(board.app.screen, ConfirmScreen)
        await board.press("y")
        report_screen = board.app.screen
        assert isinstance(report_screen, RestartReportScreen)
        await board.until(lambda: not report_screen.running, "restart finished")
        # Without closing the report: the log panel has it.
        assert any(d.startswith("Protection restarted: restored 2") for d in board.log_details()), (
            board.log_details()
        )
        await board.press("escape")


async def test_panel_borders_stand_out_on_the_light_theme_too() -> None:
    settings = scenario_settings()
    app = DashboardApp(settings, feed=ScenarioFeed(settings), tz=UTC, code_roots=[])
    async with app.run_test(size=(120, 40)) as pilot:
        await _settled(app, pilot)
        for theme in ("textual-dark", "textual-light"):
            app.theme = theme
            await pilot.pause()
            log = app.query_one(EventLog)  # not focused, not alarmed: the plain panel border
            background = log.background_colors[1]
            border = background + log.styles.border_top[1]  # as drawn: blended over the background
            assert abs(border.brightness - background.brightness) >= 0.25, (theme, border, background)


async def test_the_filter_box_is_labelled_while_it_holds_text() -> None:
    settings = scenario_settings()
    app = DashboardApp(settings, feed=ScenarioFeed(settings), tz=UTC, code_roots=[])
    async with app.run_test(size=(120, 40)) as pilot:
        await _settled(app, pilot)
        await pilot.press("slash", *"pepe")
        await pilot.pause()
        text = svg_to_text(app.export_screenshot(), 120, 40)
        line = next((line for line in text.splitlines() if "pepe" in line), "")
        assert "Filter positions and log by symbol: pepe" in line, text
        assert app.query_one(PositionsTable).shown_symbols() == ["1000PEPEUSDT"]
        await pilot.press("escape")
        await pilot.pause()
        assert "Filter positions and log by symbol" not in svg_to_text(app.export_screenshot(), 120, 40)


async def test_escape_from_the_table_clears_a_filter_kept_with_enter() -> None:
    """An operator kept a symbol filter with enter, the position closed, and the table stayed empty: Esc
    from the table did nothing, and the way out was to reopen the box and empty it. Esc on the table now
    clears a kept filter (symbol and uncovered-only) and hides its box; with no filter it does nothing."""
    settings = scenario_settings()
    app = DashboardApp(settings, feed=ScenarioFeed(settings), tz=UTC, code_roots=[])
    async with app.run_test(size=(120, 40)) as pilot:
        await _settled(app, pilot)
        table = app.query_one(PositionsTable)
        everything = table.shown_symbols()
        assert len(everything) > 1
        await pilot.press("slash", *"pepe", "enter", "u")
        await pilot.pause()
        assert table.has_focus
        assert table.shown_symbols() != everything
        assert "Filter positions and log by symbol: pepe" in svg_to_text(app.export_screenshot(), 120, 40)
        await pilot.press("escape")
        await pilot.pause()
        assert table.shown_symbols() == everything
        assert not table.only_uncovered
        assert "Filter positions and log by symbol" not in svg_to_text(app.export_screenshot(), 120, 40)
        await pilot.press("escape")  # nothing to clear: nothing happens (the dashboard stays)
        await pilot.pause()
        assert table.shown_symbols() == everything
        assert app.is_running


async def test_the_theme_choice_is_kept_for_the_next_start(tmp_path) -> None:
    settings = scenario_settings()
    state = tmp_path / "tsbot-tui-ui.json"
    app = DashboardApp(settings, feed=ScenarioFeed(settings), tz=UTC, code_roots=[], ui_state_file=state)
    async with app.run_test(size=(120, 40)) as pilot:
        await _settled(app, pilot)
        assert app.theme == "textual-dark"
        await app.run_action("toggle_dark_light")
        await pilot.pause()
        assert app.theme == "textual-light"
    assert state.stat().st_mode & 0o777 == 0o600

    again = DashboardApp(settings, feed=ScenarioFeed(settings), tz=UTC, code_roots=[], ui_state_file=state)
    async with again.run_test(size=(120, 40)) as pilot:
        await _settled(again, pilot)
        assert again.theme == "textual-light"


def test_a_pnl_that_rounds_to_nothing_reads_zero_not_minus_zero() -> None:
    """An operator read "-0.00%" (in the loss colour) for a position a hair under its entry."""
    assert formatting.signed_percent(Decimal("-0.001")) == "0.00%"
    assert formatting.percent_sign(Decimal("-0.001")) == 0
    assert formatting.signed_percent(Decimal("0.004")) == "0.00%"
    assert formatting.signed_percent(Decimal("-0.006")) == "-0.01%"
    assert formatting.percent_sign(Decimal("-0.006")) == -1
    assert formatting.signed_percent(Decimal("1.25")) == "+1.25%"
    assert formatting.signed_percent(None) == "—"


async def test_a_long_operation_is_cut_on_one_line_not_wrapped_mid_word_at_80x24() -> None:
    """At 80×24 the log panel's narrow Operation column wrapped a logger's name mid-word across three
    lines ("engine.venue" / "s.stream_cli" / "ent", an operator): one line now, cut with "…"."""
    settings = scenario_settings()
    app = DashboardApp(settings, feed=ScenarioFeed(settings), tz=UTC, code_roots=[])
    async with app.run_test(size=(80, 24)) as pilot:
        await _settled(app, pilot)
        await pilot.press("l")
        log = app.query_one(EventLog)
        assert log.narrow
        app.post_message(
            LogEntryAdded(
                LogEntry(T0 - 1, "warning", "", "engine.venues.stream_client", None, "", "marks stream late")
            )
        )
        await pilot.pause(0.1)
        [row] = [r for r in log.ordered_rows if log.get_row(r.key)[-1].plain.endswith("marks stream late")]
        assert row.height == 1
        operation = log.get_row(row.key)[3]
        assert operation.no_wrap
        assert operation.plain == "engine.venues.stream_client"  # whole in the cell; cut only on screen
        # An outcome leading the detail is set apart from it: "paused new entries paused by the operator"
        # read as one run-on phrase (an operator).
        app.post_message(
            LogEntryAdded(
                LogEntry(T0, "info", "", "entries", 0.4, "paused", "new entries paused by the operator")
            )
        )
        await pilot.pause(0.1)
        details = [log.get_row(r.key)[-1].plain for r in log.ordered_rows]
        assert "paused 0.4s: new entries paused by the operator" in details, details


async def test_the_palettes_screenshot_is_saved_beside_the_log_owner_only_and_said_where(
    tmp_path: Path,
) -> None:
    """Textual saved it to ~/Downloads, which a server may not have: "Failed to save screenshot", with no
    path and no reason (an operator). It shows the account's positions: owner-only, like the log."""
    settings = scenario_settings()
    log_file = tmp_path / "logs" / "trading_bot.log"
    app = DashboardApp(settings, feed=ScenarioFeed(settings), tz=UTC, code_roots=[], log_file=str(log_file))
    async with app.run_test(size=(120, 40)) as pilot:
        await _settled(app, pilot)
        prompts = await palette_prompts(app, pilot, "screenshot")
        assert prompts[0] == "Screenshot", prompts
        await pilot.press("enter")
        for _ in range(300):
            if list(log_file.parent.glob("*.svg")):
                break
            await pilot.pause(0.02)
        [saved] = list(log_file.parent.glob("*.svg"))
        assert stat.S_IMODE(saved.stat().st_mode) == 0o600
        assert "<svg" in saved.read_text()
        await pilot.pause(0.1)
        notices = [str(n.message) for n in app._notifications]
        assert any(f"Screenshot saved: {saved}" in n for n in notices), notices


def test_the_trailing_states_words_fit_the_ts_column() -> None:
    """The TS column is 16 wide (14 on a narrow terminal): "closing at market…" read "closing at marke"
    (an operator). Each of its words fits whole."""
    width = next(w for name, _, w in COLUMNS if name == "ts")
    base = book_position(1, sorted(UNIVERSE)[0])
    styles = dict.fromkeys(("missing", "active-trail"), "")
    views = [
        dataclasses.replace(base, closing=True),
        dataclasses.replace(base, trailing_phase=ENTRY_IN_DOUBT_PHASE),
        dataclasses.replace(base, has_trailing_stop=False, trailing_stop_unverified=True),
        dataclasses.replace(base, has_trailing_stop=False),
        dataclasses.replace(base, trailing_phase="waiting", distance_to_activation_percent=Decimal("-12.34")),
        dataclasses.replace(base, distance_to_activation_percent=Decimal(0)),
        dataclasses.replace(base, distance_to_activation_percent=Decimal(0), trailing_follows="last"),
    ]
    for view in views:
        for short, room in ((False, width), (True, 14)):
            text = _trailing_cell(view, styles, short=short).plain  # type: ignore[arg-type]
            assert len(text) <= room, (text, short)


def test_the_quit_warning_speaks_of_one_uncovered_position_in_the_singular() -> None:
    """ "1 position is UNCOVERED right now (DOTUSDT). The engine tries to protect them" (an operator)."""
    symbols = sorted(UNIVERSE)
    one = BookFeed(scenario_settings(), [book_position(1, symbols[0], uncovered_for=30.0)]).snapshot()
    said = " ".join(quit_warning(one).split())
    assert "1 position is UNCOVERED right now" in said, said
    assert "The engine tries to protect it before it stops" in said, said
    assert "them" not in said.split("UNCOVERED right now", 1)[1].split("Managed", 1)[0], said
    two = BookFeed(
        scenario_settings(), [book_position(i, symbols[i], uncovered_for=30.0) for i in (1, 2)]
    ).snapshot()
    assert "The engine tries to protect them before it stops" in " ".join(quit_warning(two).split())

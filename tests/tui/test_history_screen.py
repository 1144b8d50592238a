"""`y`: the history screen (issue 13). Its figures are the database's: seeded through the store (samples) and
as the engine writes them (spans), then read on screen with a real engine on the sim venue, and read-only;
the screen's text is whole at 80×24 and 120×40; an empty history says so; the key is in the help screen and
remappable; escape closes it."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from textual.containers import VerticalScroll

from engine.accounts import account_key
from storage.database import Database
from storage.history import (
    DashboardHistory,
    PeriodCoverage,
    ShiftReport,
    WorstSpan,
    coverage_by_period,
    day_periods,
)
from storage.repositories import CoverageSample, Store
from tests.tui.book import PlanFeed
from tests.tui.harness import dashboard, started, tui_settings
from tests.tui.scenario import scenario_history, scenario_settings
from tests.tui.test_fit import SIZES, flat, screen, settle
from tui.app import DashboardApp
from tui.feed import ReadOnlyFeed
from tui.screens.history import EMPTY, HistoryScreen, day_label, hour_label, period_line, shift_lines

D = Decimal


async def scrolled_text(app: DashboardApp, pilot) -> list[str]:
    """Every line of the history's scroll area as rendered on screen (scrolling it through), in order."""
    scroll = app.screen.query_one("#history-scroll", VerticalScroll)
    lines: dict[int, str] = {}
    await pilot.pause()
    while True:
        rendered = screen(app).splitlines()
        region = scroll.scrollable_content_region  # without the scrollbar
        for row in range(region.y, region.y + region.height):
            lines[int(scroll.scroll_y) + row - region.y] = rendered[row][region.x : region.x + region.width]
        if scroll.scroll_y >= scroll.max_scroll_y:
            break
        before = scroll.scroll_y
        scroll.scroll_to(y=scroll.scroll_y + max(1, region.height - 1), animate=False, immediate=True)
        await pilot.pause()
        assert scroll.scroll_y > before
    return [lines[k].rstrip() for k in sorted(lines)]


def row(lines: list[str], label: str) -> list[str]:
    """The cells of the table row that begins with `label`."""
    found = [line.split() for line in lines if line.strip().startswith(label)]
    assert len(found) == 1, (label, found)
    return found[0][len(label.split()) :]


@SIZES
async def test_history_text_is_whole_and_escape_closes_it(size: tuple[int, int]) -> None:
    settings = scenario_settings()
    app = DashboardApp(settings, feed=PlanFeed(settings), tz=UTC, code_roots=[])
    async with app.run_test(size=size) as pilot:
        await settle(app, pilot)
        await pilot.press("y")
        history_screen = app.screen
        assert isinstance(history_screen, HistoryScreen)
        for _ in range(300):
            if history_screen.history is not None:
                break
            await pilot.pause(0.01)
        lines = await scrolled_text(app, pilot)
        text = flat(" ".join(lines))
        expected = scenario_history(UTC)
        for period in expected.days:
            assert period_line(day_label(period, UTC), period).rstrip() in lines, period
        for period in expected.hours:
            assert period_line(hour_label(period, UTC), period).rstrip() in lines, period
        assert "This shift: since 2023-11-14 21:06 (1h06m)" in text
        assert "worst: 1000PEPEUSDT 3m32s, trailing stop missing, still uncovered" in text
        assert "uncovered spans 3 (1 still open), 4m17s without stops" in text
        # The chart: its title, its 0–100 % axis and the hours under it, on screen whole.
        assert "coverage per hour, last 24 hours" in text
        axis = [line for line in lines if "100%┤" in line or " 0%┤" in line]
        assert len(axis) == 2, lines
        marks = [cell for cell in axis[1].split() if cell in ("·", "-")]
        assert marks == ["·", "-"]  # the hour nobody measured, then the one with nothing open: not bars
        assert "23h" in text
        assert "22h" in text
        assert "their time inside it; worst: the longest's." in text
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, HistoryScreen)


async def _seed(store: Store, db: Database) -> tuple[datetime, int]:
    """Coverage samples and two uncovered spans in the hour two clock hours back (B); returns B and the
    position's id. Samples: 100 % at B, B+10 s, 50 % at B+20 s, 100 % at B+30 s (it stands 30 s: no sample
    follows), none measured until B+20 min: an idle sample (no positions). Measured with positions 60 s,
    weighted (10·100 + 10·100 + 10·50 + 30·100) / 60 = 91.7 %. Spans: B+5 min → B+7 min (120 s) and
    B+50 min → B+70 min (600 s in B's hour, 600 s in the next)."""
    pool = db.pool
    base: datetime = await pool.fetchval("SELECT date_trunc('hour', now()) - interval '2 hours'")
    for seconds, active, protected, pct in (
        (0, 2, 2, "100"),
        (10, 2, 2, "100"),
        (20, 2, 1, "50"),
        (30, 2, 2, "100"),
        (1200, 0, 0, None),
    ):
        await store.record_coverage_sample(
            CoverageSample(
                base + timedelta(seconds=seconds),
                active,
                protected,
                active - protected,
                0,
                None if pct is None else D(pct),
            )
        )
    # The spans, as the engine writes them for a position that lost a stop and got it back.
    position_id = await pool.fetchval(
        "INSERT INTO monitoring.positions (symbol, exchange, side, quantity, entry_price, status, account, "
        "opened_at) VALUES ('SFPUSDT', 'sim', 'long', 10, 2.5, 'closed', $1, $2) RETURNING id",
        store.account,
        base,
    )
    for start, end, reason in ((5, 7, "stop_loss_missing"), (50, 70, "trailing_stop_missing")):
        await pool.execute(
            "INSERT INTO monitoring.uncovered_spans (account, position_id, symbol, started_at, ended_at, "
            "reason, ended_by) VALUES ($1, $2, 'SFPUSDT', $3, $4, $5, 'protected')",
            store.account,
            position_id,
            base + timedelta(minutes=start),
            base + timedelta(minutes=end),
            reason,
        )
    return base, position_id


def _assert_seeded(history: DashboardHistory, base: datetime) -> None:
    hours = {p.since: p for p in history.hours}
    first, second = hours[base], hours[base + timedelta(hours=1)]
    assert first.coverage_pct == D("91.7")
    assert first.lowest_coverage_pct == D("50")
    assert first.measured_seconds == D("90.000")  # 60 s with positions + 30 s idle
    assert (first.uncovered_spans, first.uncovered_seconds, first.worst_seconds) == (
        2,
        D("720.000"),
        D("600.000"),
    )
    assert second.coverage_pct is None
    assert second.measured_seconds == 0
    assert (second.uncovered_spans, second.uncovered_seconds, second.worst_seconds) == (
        1,
        D("600.000"),
        D("600.000"),
    )
    others = [p for p in history.hours if p.since not in (base, base + timedelta(hours=1))]
    assert all(p.measured_seconds == 0 and p.uncovered_spans == 0 for p in others)
    days = {p.since.date(): p for p in history.days}
    day = days[base.date()]
    assert day.coverage_pct == D("91.7")
    assert day.lowest_coverage_pct == D("50")
    if (base + timedelta(hours=1)).date() == base.date():  # both spans inside B's day
        assert (day.uncovered_spans, day.uncovered_seconds, day.worst_seconds) == (
            2,
            D("1320.000"),
            D("1200.000"),
        )
    else:  # B is 23:00: the second span is split at midnight
        assert (day.uncovered_spans, day.uncovered_seconds, day.worst_seconds) == (
            2,
            D("720.000"),
            D("600.000"),
        )
        later = days[base.date() + timedelta(days=1)]
        assert (later.uncovered_spans, later.uncovered_seconds) == (1, D("600.000"))


async def test_the_screen_shows_the_seeded_history_of_a_running_engine(db: Database) -> None:
    async with dashboard(tui_settings(db), size=(120, 40)) as board:
        await started(board)
        assert board.engine.store is not None
        base, _ = await _seed(board.engine.store, db)
        await board.press("y")
        history_screen = board.app.screen
        assert isinstance(history_screen, HistoryScreen)
        await board.until(lambda: history_screen.history is not None, "history read")
        history = history_screen.history
        assert history is not None
        assert history_screen.error is None
        _assert_seeded(history, base)
        # The shift runs since the engine started (its clock's start): it holds both spans, whole.
        assert history.shift is not None
        assert history.shift.uncovered_spans == 2
        assert history.shift.uncovered_seconds == D("1320.000")
        assert history.shift.worst is not None
        assert history.shift.worst.seconds == D("1200.000")

        lines = await scrolled_text(board.app, board.pilot)
        text = flat(" ".join(lines))
        label = f"{base:%H:%M}"
        assert row(lines, label) == ["91.7%", "50.0%", "2", "12m00s", "10m00s"]
        assert row(lines, f"{base + timedelta(hours=1):%H:%M}") == ["—", "—", "1", "10m00s", "10m00s"]
        assert "uncovered spans 2, 22m00s without stops" in text
        assert "worst: SFPUSDT 20m00s, trailing stop missing, ended: protected" in text
        await board.press("escape")
        assert not isinstance(board.app.screen, HistoryScreen)


async def test_an_empty_history_says_so(db: Database) -> None:
    async with dashboard(tui_settings(db), size=(80, 24)) as board:
        await started(board)
        await board.press("y")
        history_screen = board.app.screen
        assert isinstance(history_screen, HistoryScreen)
        await board.until(lambda: history_screen.history is not None, "history read")
        assert history_screen.history is not None
        assert history_screen.history.empty
        text = flat(" ".join(await scrolled_text(board.app, board.pilot)))
        assert flat(EMPTY) in text
        assert "coverage per hour" not in text  # no chart of nothing


async def test_the_read_only_feed_reads_the_same_history(db: Database) -> None:
    settings = tui_settings(db)
    store = Store(db.pool, account_key(settings.venue))
    base, _ = await _seed(store, db)
    feed = ReadOnlyFeed(settings, None)
    await feed.start()
    try:
        history = await feed.history(UTC)
    finally:
        await feed.stop()
    _assert_seeded(history, base)
    assert history.shift is None  # no engine holds the lease: no current shift


@pytest.mark.parametrize("key", ["y", "g"])
async def test_the_history_key_is_in_the_help_screen_and_remappable(db: Database, key: str) -> None:
    settings = tui_settings(db, {} if key == "y" else {"TUI__KEYS__HISTORY": key})
    async with dashboard(settings, size=(120, 40)) as board:
        await started(board)
        await board.press("question_mark")
        table = board.app.screen.query_one("#help-keys")
        assert table.get_row("history")[0] == key  # type: ignore[attr-defined]
        await board.press("escape")
        if key != "y":
            await board.press("y")  # no longer bound
            assert not isinstance(board.app.screen, HistoryScreen)
        await board.press(key)
        assert isinstance(board.app.screen, HistoryScreen)
        await board.press("escape")


@pytest.fixture
def in_berlin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The operator's zone is Europe/Berlin (`TZ`, read by the C library too); restored afterwards."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("in_berlin")
async def test_the_screens_days_are_local_days_by_the_zones_rules_across_a_dst_change(db: Database) -> None:
    """The dashboard without a zone of its own (as `tsbot-tui` runs) takes the operator's with its rules, not
    today's offset: each day is cut at its own local midnight. Berlin leaves summer time on Sun 25 Oct 2026
    (03:00 CEST → 02:00 CET): that Sunday runs from 24 Oct 22:00 UTC to 25 Oct 23:00 UTC, 25 hours, and
    holds a span just after its first minute (00:10 CEST) and one just before its last (23:10 CET). With a
    fixed offset, +01:00 (winter) put the first on Saturday, +02:00 (summer) the second on Monday."""
    tz = HistoryScreen(None).tz
    pool = db.pool
    position_id = await pool.fetchval(
        "INSERT INTO monitoring.positions (symbol, exchange, side, quantity, entry_price, status, account, "
        "opened_at) VALUES ('SFPUSDT', 'sim', 'long', 10, 2.5, 'closed', 'sim:default', $1) RETURNING id",
        datetime(2026, 10, 20, tzinfo=UTC),
    )
    for start in (datetime(2026, 10, 24, 22, 10, tzinfo=UTC), datetime(2026, 10, 25, 22, 10, tzinfo=UTC)):
        await pool.execute(
            "INSERT INTO monitoring.uncovered_spans (account, position_id, symbol, started_at, ended_at, "
            "reason, ended_by) VALUES ('sim:default', $1, 'SFPUSDT', $2, $3, 'stop_loss_missing', 'protected')",
            position_id,
            start,
            start + timedelta(minutes=40),
        )
    until = datetime(2026, 10, 27, 12, tzinfo=UTC)
    days = await coverage_by_period(pool, "sim:default", day_periods(until, tz), sample_stands_seconds=30)
    labels = [day_label(p, tz) for p in days]
    assert labels == [
        "Wed 21 Oct",
        "Thu 22 Oct",
        "Fri 23 Oct",
        "Sat 24 Oct",
        "Sun 25 Oct",
        "Mon 26 Oct",
        "Tue 27 Oct",
    ]
    assert days[0].since == datetime(2026, 10, 20, 22, tzinfo=UTC)  # Wed 21 Oct 00:00 CEST
    sunday = days[4]
    assert (sunday.since, sunday.until) == (
        datetime(2026, 10, 24, 22, tzinfo=UTC),
        datetime(2026, 10, 25, 23, tzinfo=UTC),
    )
    assert (sunday.uncovered_spans, sunday.uncovered_seconds) == (2, D("4800.000"))
    assert [p.uncovered_spans for p in days] == [0, 0, 0, 0, 2, 0, 0]
    assert days[5].since == datetime(2026, 10, 25, 23, tzinfo=UTC)  # Mon 26 Oct 00:00 CET


def test_a_span_under_a_second_is_not_shown_as_no_time_without_stops() -> None:
    """A span the period clips to under a second read "1 span, 0s without stops" (an operator's nit)."""
    since = datetime(2026, 12, 6, 10, tzinfo=UTC)
    period = PeriodCoverage(
        since, since + timedelta(hours=1), D("99.9"), D("50"), D(3600), 1, D("0.4"), D("0.4")
    )
    assert period_line("10:00", period).split()[-3:] == ["1", "<1s", "<1s"]
    worst = WorstSpan(
        7,
        "BTCUSDT",
        since - timedelta(seconds=5),
        since + timedelta(seconds=0.4),
        D("5.4"),
        "entry",
        "both stops confirmed",
    )
    clipped = ShiftReport(
        account="acct",
        since=since,
        until=since + timedelta(hours=1),
        waves=1,
        opened=1,
        protected=1,
        failures={},
        uncovered_spans=1,
        still_uncovered=0,
        uncovered_seconds=D("0.4"),
        worst=worst,
        coverage_pct=D("99.9"),
        lowest_coverage_pct=D("50"),
        measured_seconds=D(3600),
        closes={},
        realized_pnl=D(0),
        closed_without_pnl=0,
    )
    lines = shift_lines(clipped, UTC)
    assert lines[2] == "  uncovered spans 1, <1s without stops", lines
    assert lines[3].startswith("  worst: BTCUSDT 5s, "), lines
    none = dataclasses.replace(clipped, uncovered_spans=0, uncovered_seconds=D(0), worst=None)
    assert shift_lines(none, UTC)[2] == "  uncovered spans 0, 0s without stops"
    # The lowest figure beside no uncovered span says why (an operator read "lowest 0.0%" as an alarm).
    assert shift_lines(none, UTC)[1].startswith(
        "  coverage 99.9% time-weighted, lowest 50.0% (inside grace counted as not covered), "
    ), shift_lines(none, UTC)

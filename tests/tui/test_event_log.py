"""The timeout and error log (issue 13, defect 4): it keeps following the newest row during a burst, `End`
goes to the last row (it scrolled sideways), and an operator who scrolled up to read is not dragged down."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC

from engine.events import EntriesToggled, ProtectionFailed, SignalRejected, WaveFinished
from tests.tui.book import BookFeed, book_position
from tests.tui.scenario import T0, ScenarioFeed, scenario_settings
from tests.tui.snapshots import svg_to_text
from tui.app import DashboardApp
from tui.feed import LogEntry, LogTranslator
from tui.messages import LogEntryAdded
from tui.widgets.event_log import EventLog


def burst(first: int, count: int) -> list[LogEntry]:
    return [
        LogEntry(T0 + i, "error", f"SYM{i}USDT", "create stop-loss", 0.0, "retrying", f"burst row {i}")
        for i in range(first, first + count)
    ]


async def settled(app: DashboardApp, pilot, log: EventLog, rows: int) -> None:
    deadline = time.monotonic() + 30.0  # (the wall clock: on a loaded machine a pause lets the app do less)
    while time.monotonic() < deadline:
        if log.row_count >= rows:
            break
        await pilot.pause(0.01)
    await pilot.pause()
    await pilot.wait_for_scheduled_animations()


async def test_the_log_follows_a_burst_and_end_goes_to_the_last_row() -> None:
    settings = scenario_settings()
    app = DashboardApp(settings, feed=ScenarioFeed(settings), tz=UTC, code_roots=[])
    async with app.run_test(size=(120, 40)) as pilot:
        log = app.query_one(EventLog)
        await settled(app, pilot, log, 6)
        before = log.row_count
        for entry in burst(0, 80):  # faster than frames: all queued before the next refresh
            app.post_message(LogEntryAdded(entry))
        await settled(app, pilot, log, before + 80)
        assert log.scroll_y == log.max_scroll_y > 0
        assert "burst row 79" in svg_to_text(app.export_screenshot(), 120, 40)

        # The operator scrolls up to read: new rows do not drag the view away.
        log.focus()
        await pilot.press("home")
        await pilot.pause()
        assert (log.cursor_row, log.scroll_y) == (0, 0)
        for entry in burst(80, 5):
            app.post_message(LogEntryAdded(entry))
        await settled(app, pilot, log, before + 85)
        assert log.scroll_y == 0

        # End: the newest row (not the rightmost column), and the log follows again.
        await pilot.press("end")
        await settled(app, pilot, log, before + 85)
        assert log.cursor_row == log.row_count - 1
        assert log.scroll_x == 0
        for entry in burst(85, 30):
            app.post_message(LogEntryAdded(entry))
        await settled(app, pilot, log, before + 115)
        assert log.scroll_y == log.max_scroll_y
        assert "burst row 114" in svg_to_text(app.export_screenshot(), 120, 40)


async def test_the_log_keeps_following_a_burst_while_the_screen_is_busy() -> None:
    """With 1 000 positions on screen (frames take long) and errors arriving a few at a time between them,
    the log stopped following: its check "am I at the bottom?" ran before the previous scroll had landed."""
    settings = scenario_settings()
    book = [
        book_position(i, f"S{i:04d}USDT", uncovered_for=60.0 if i % 7 == 0 else None) for i in range(1000)
    ]
    app = DashboardApp(settings, feed=BookFeed(settings, book), tz=UTC, code_roots=[])
    async with app.run_test(size=(120, 40)) as pilot:
        log = app.query_one(EventLog)
        await pilot.pause(0.5)
        before = log.row_count
        for first in range(0, 400, 10):
            for entry in burst(first, 10):
                app.post_message(LogEntryAdded(entry))
            await asyncio.sleep(0.003)  # real time for a frame to start between the bursts
        await settled(app, pilot, log, before + 400)
        await pilot.pause(0.3)
        assert log.scroll_y == log.max_scroll_y > 0
        assert "burst row 399" in svg_to_text(app.export_screenshot(), 120, 40)


def test_rejected_signals_are_said_with_their_own_wave_when_waves_overlap() -> None:
    """A wave finishes in the background (its protection can take minutes) while the next one runs: the
    rejections of the next wave were said with the earlier wave's end, under its id (a reviewer's find).
    Each wave's row names its own; one rejected after its wave ended, or outside any wave, is said alone."""
    translator = LogTranslator()

    def finished(wave_id: int, at: float) -> WaveFinished:
        return WaveFinished(
            at=at, wave_id=wave_id, signals=3, opened=2, protected=2, failed=0, slowest_protection_ms=10
        )

    rows = [
        translator.entry(SignalRejected(at=T0, signal_id=7, symbol="FOOUSDT", reason="unknown", wave_id=2)),
        translator.entry(finished(1, T0 + 1)),
        translator.entry(finished(2, T0 + 2)),
        translator.entry(SignalRejected(at=T0 + 3, signal_id=8, symbol="BARUSDT", reason="late", wave_id=2)),
        translator.entry(
            SignalRejected(at=T0 + 4, signal_id=9, symbol="BAZUSDT", reason="engine stopping", routine=True)
        ),
    ]
    said = [(r.operation, r.severity, r.detail) for r in rows if r is not None]
    assert said == [
        ("signals", "warning", "1 of 3 signals of wave 2 rejected: FOOUSDT: unknown"),
        ("signals", "warning", "signal 8 of wave 2 rejected: BARUSDT: late"),
        ("signals", "info", "signal 9 rejected: BAZUSDT: engine stopping"),
    ]


def test_a_wave_of_one_signal_rejected_is_said_in_the_singular() -> None:
    """ "1 of 1 signals of wave 4 rejected" (r73)."""
    translator = LogTranslator()
    translator.entry(SignalRejected(at=T0, signal_id=7, symbol="FOOUSDT", reason="unknown", wave_id=4))
    row = translator.entry(
        WaveFinished(
            at=T0 + 1, wave_id=4, signals=1, opened=0, protected=0, failed=0, slowest_protection_ms=None
        )
    )
    assert row is not None
    assert row.detail == "1 of 1 signal of wave 4 rejected: FOOUSDT: unknown"


def test_a_pause_is_logged_with_who_paused_and_why() -> None:
    """The breaker's pause was logged as "new entries paused by the operator" while the header said
    "ENTRIES PAUSED (breaker)"."""
    translator = LogTranslator()
    reason = "protection is failing (7 of 11 protective order sends failed in the last 60s)"
    paused = translator.entry(EntriesToggled(at=T0, paused=True, by="breaker", reason=reason))
    resumed = translator.entry(EntriesToggled(at=T0 + 1, paused=False))
    assert paused is not None
    assert resumed is not None
    assert paused.detail == f"new entries paused by the breaker: {reason}"
    assert resumed.detail == "new entries resumed"
    # Only a pause nobody asked for is a warning: the operator's own keys filled the hourly warning count.
    by_hand = translator.entry(EntriesToggled(at=T0 + 2, paused=True, by="operator"))
    assert by_hand is not None
    assert (paused.severity, resumed.severity, by_hand.severity) == ("warning", "info", "info")


def test_a_failure_said_within_the_last_minute_is_no_new_row() -> None:
    """Look-ups that kept failing during a stream gap made a row per retry (160 a minute for 8 positions):
    the guard says a failure once a minute (`repeated` between), and the log shows only those."""
    translator = LogTranslator()
    error = "outcome still unknown: sim fetch_order: HTTP 500 before execution"

    def failed(at: float, *, repeated: bool) -> LogEntry | None:
        event = ProtectionFailed(
            at=at,
            position_id=7,
            symbol="SOLUSDT",
            operation="look up stop-loss",
            error=error,
            retry_in_seconds=1.2,
            repeated=repeated,
        )
        return translator.entry(event)

    first = failed(T0, repeated=False)
    assert first is not None
    assert first.severity == "error"
    assert error in first.detail
    assert failed(T0 + 1.2, repeated=True) is None
    assert failed(T0 + 61, repeated=False) is not None

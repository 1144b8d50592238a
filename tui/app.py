"""`tsbot-tui`: the engine and its dashboard in one process.

The engine runs in the app's event loop. It is started from an exclusive async worker, and from then on its
loops are the engine's own supervised tasks: no widget owns them, and closing a screen or a panel cannot
stop protection. The app follows the engine through `events()` (a worker that posts one message per log row)
and paints from `snapshot()` on a timer (`[tui] refresh_per_second`), so a storm of price ticks costs the
screen nothing more than the next frame. Quitting stops the engine (no new signals) and leaves every stop
on the exchange; if another engine holds the account's lease, the app offers to watch read-only instead.

Nothing is written to stdout or stderr while the app runs: logs go to the log file and, from WARNING up,
to the log panel.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import faulthandler
import gc
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import datetime, tzinfo
from pathlib import Path
from typing import IO, ClassVar

from textual import events, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.driver import Driver
from textual.notifications import SeverityLevel
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Label

from engine.accounts import AccountShared
from engine.cli import OneLineParser, one_line
from engine.code_watch import CodeDifference, SourceWatcher, running_code
from engine.config import ConfigError, Settings, load_config
from engine.credentials import CredentialsRefused
from engine.engine import (
    Engine,
    EngineSnapshot,
    EngineState,
    PositionView,
    StartInterrupted,
    StartupReport,
    package_version,
)
from engine.events import (
    EngineStateChanged,
    EntriesToggled,
    EventsDropped,
    HealthChanged,
    PositionClosed,
    PositionOpened,
    WaveFinished,
)
from engine.exchange.errors import ExchangeError, Rejected
from engine.logs import LogFileError, RedactingFormatter, configure_logging
from engine.metrics_server import MetricsUnavailable
from engine.words import counted, format_duration, keep_their_stops
from protection.coverage import CoverageFigures, PositionCoverage
from protection.health import (
    Component,
    ComponentHealth,
    HealthState,
    HealthThresholds,
    ProtectionMeasurement,
    evaluate_protection,
)
from storage.commands import CommandKind
from storage.embedded import default_data_dir, leave_embedded
from storage.lease import LeaseHeld, LeaseHolder
from tui import formatting, keys
from tui.attention import CriticalAttention
from tui.commands import DashboardCommands
from tui.feed import DashboardFeed, EngineFeed, LogEntry, LogTranslator, ReadOnlyFeed
from tui.messages import (
    CodeChanged,
    CommandDone,
    FeedFailed,
    FeedRefused,
    FeedStarted,
    LogEntryAdded,
    RepaintRequested,
)
from tui.screens.confirm import ConfirmScreen
from tui.screens.health import HealthDetailScreen
from tui.screens.history import HistoryScreen
from tui.screens.info import HelpScreen, LeaseHeldScreen, StartFailedScreen
from tui.screens.position import PositionDetailScreen
from tui.screens.reprotect import ReprotectScreen
from tui.screens.restart import RestartReportScreen
from tui.widgets.coverage import TREND_WINDOW_SECONDS, CoverageGauge
from tui.widgets.event_log import EventLog
from tui.widgets.health import HealthPanel
from tui.widgets.positions import DEFERRED_ROWS_PER_STEP, PositionsTable
from tui.widgets.status import CodeBanner, SizeNotice, StatusBar
from tui.widgets.waves import WavesTable

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
HANGUP_EXIT_SECONDS = 5.0
FRAME_STEP_PAUSE = 0.001  # between taking a frame's snapshot and showing it (see _paint_on_timer)
GC_FREEZE_AFTER_ROWS = 100  # table rows added since the last gc.freeze() that are frozen too (see _show)

# Events after which the operator should see the change now, not at the next frame.
REPAINT_EVENTS = (EntriesToggled, EngineStateChanged, HealthChanged, PositionClosed, EventsDropped)
# Log records the panel does not repeat: the protection manager's are shown from its domain events (with
# latency and outcome), health lines from HealthChanged, entry toggles from EntriesToggled.
PANEL_SKIPPED_LOGGERS = ("protection.manager",)
PANEL_SKIPPED_PREFIXES = ("health_check:", "entries paused", "entries resumed")


def _is_terminal(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


class FilterInput(Input):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "clear_and_leave", "Clear filter", show=False)]

    def action_clear_and_leave(self) -> None:
        self.value = ""
        self.screen.query_one("#filter-bar").remove_class("-visible")
        self.screen.query_one("#positions").focus()


# INFO records shown too (as information: not counted among the warnings): the operator commands the engine
# takes, from this screen or from anywhere else (`tsbot close` from a script): who asked what, and why.
PANEL_INFO_LOGGERS = ("engine.commands",)


class PanelLogHandler(logging.Handler):
    """Log records from WARNING up, into the log panel (redacted like the log file), and the commands the
    engine takes at INFO."""

    def __init__(self, app: DashboardApp, secrets: Iterable[str]):
        super().__init__(logging.INFO)
        self._app = app
        self._redactor = RedactingFormatter(secrets)
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.name.startswith(PANEL_SKIPPED_LOGGERS):
                return
            if record.levelno < logging.WARNING and not (
                record.name in PANEL_INFO_LOGGERS and record.getMessage().startswith("command #")
            ):
                return
            message = self._redactor.redact(record.getMessage())
            if message.startswith(PANEL_SKIPPED_PREFIXES):
                return
            entry = LogEntry(
                record.created,
                record.levelname.lower(),
                "",
                record.name,
                None,
                "",
                message.splitlines()[0][:300] if message else "",
            )
            if threading.get_ident() == self._thread:
                self._app.post_message(LogEntryAdded(entry))
            elif not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._app.post_message, LogEntryAdded(entry))
        except Exception:  # a log handler must never raise into the code that logged
            self.handleError(record)


def _clearing_on_exit(driver_class: type[Driver]) -> type[Driver]:
    """`driver_class`, blanking the dashboard's screen before it gives the terminal back. Resized while it
    ran, a terminal (tmux) gave the shell its screen back with the rows it had not had left as the dashboard
    last drew them: the "stopping" frame, an old clock, broken box characters above the exit line (an
    operator). Blank, they are blank."""

    class ClearingDriver(driver_class):  # type: ignore[misc,valid-type]
        # The terminal hung up: nothing is drawn any more. Textual's writer thread dies on the lost terminal
        # (EIO), and every frame after queued for it until its queue (30) was full and the event loop
        # blocked on it for good: the engine's stop never finished, at 100 % CPU, the account held (opme48).
        terminal_gone = False

        def write(self, data: str) -> None:
            if not self.terminal_gone:
                super().write(data)

        def stop_application_mode(self) -> None:
            self.write("\x1b[H\x1b[2J")  # (still on the dashboard's screen: the shell's is untouched)
            super().stop_application_mode()

        def close(self) -> None:
            if not self.terminal_gone:  # (its writer may be dead with a full queue: a stop would wait on it)
                super().close()

    ClearingDriver.__name__ = ClearingDriver.__qualname__ = f"Clearing{driver_class.__name__}"
    return ClearingDriver


class DashboardApp(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "tsbot-tui"
    BINDINGS: ClassVar[list[BindingType]] = keys.bindings()
    COMMANDS = App.COMMANDS | {DashboardCommands}
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-narrow"), (140, "-wide")]
    VERTICAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-short"), (34, "-tall")]

    def get_driver_class(self) -> type[Driver]:
        return _clearing_on_exit(super().get_driver_class())

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine | None = None,
        feed: DashboardFeed | None = None,
        tz: tzinfo | None = None,
        code_roots: Sequence[Path] | None = None,
        code_check_seconds: float = 5.0,
        secrets: Iterable[str] = (),
        log_file: str = "",
        freeze_gc_after_start: bool = False,
        ui_state_file: Path | None = None,
    ):
        super().__init__()
        self.settings = settings
        self.feed: DashboardFeed = feed if feed is not None else EngineFeed(engine or Engine(settings))
        self.tz = tz
        self.active_keymap = keys.keymap(settings.tui.keys)
        self.thresholds = HealthThresholds.from_settings(settings.health)
        self.log_file = log_file or settings.logging.file
        self._secrets = list(secrets)
        # The fingerprint of the code this process runs, taken at its start (F10). The engine in this process
        # leaves the check to the dashboard (one warning, the banner's).
        if code_roots is None:
            self._watcher: SourceWatcher | None = running_code()
        else:
            self._watcher = SourceWatcher(code_roots) if code_roots else None
        if isinstance(self.feed, EngineFeed):
            self.feed.engine.code_check_seconds = None
        self._code_whose = ""  # whose code the banner speaks of ("": this process's)
        self._holder_watched: tuple[int, str, object] | None = (
            None  # read-only: the lease holder it speaks of
        )
        self._code_check_seconds = code_check_seconds
        self._size_notice: SizeNotice | None = None  # (the terminal's first size comes before the mount)
        self.code_difference: CodeDifference | None = None
        self.feed_started = False
        self.stopping = False
        self.exit_code = EXIT_OK
        self.start_failure = ""  # the one line said on the terminal after the app, when the start failed
        self.last_snapshot: EngineSnapshot | None = None
        self._final_snapshot: EngineSnapshot | None = None
        self.startup_report: StartupReport | None = None
        self.frame_seconds: deque[float] = deque(maxlen=10_000)  # paint durations, for the benchmark
        self._positions_subtitle: str | None = None
        self.detailed_positions: set[int] = set()  # open in a detail view: their full view every frame
        self._frames_shown = 0
        self._log_handler: PanelLogHandler | None = None
        self.read_only_poll_seconds = 1.0
        self._freeze_gc = freeze_gc_after_start
        self._rows_frozen = 0  # the table's `rows_added` at the last gc.freeze()
        self.ui_state_file = ui_state_file  # the operator's screen choices (the theme), kept across starts
        self.hung_up = False
        # The standard streams that are the terminal (a hang-up takes those away); stdout redirected to a
        # file (a service, nohup) still gets the exit line.
        self._terminal_fds = tuple(fd for fd in (0, 1, 2) if _is_terminal(fd))
        self.summary_said = False  # the exit line already written (after a hang-up)
        self.stopped_by = "quit"  # what ended the app, in the words of its exit line ("SIGTERM received")
        self.attention = CriticalAttention(in_tmux=bool(os.environ.get("TMUX")))
        self.running_wave = RunningWave()

    def deliver_screenshot(
        self, filename: str | None = None, path: str | None = None, time_format: str | None = None
    ) -> str | None:
        """The palette's "Screenshot", saved beside the log file (it went to ~/Downloads, which a server may
        not have: "Failed to save screenshot", with no path and no reason; an operator), owner-only (it
        shows the account's positions), its path or the reason it failed said."""
        directory = Path(path) if path else Path(self.log_file).expanduser().absolute().parent
        target = directory / (
            filename or f"tsbot-tui-{datetime.now().strftime(time_format or '%Y-%m-%dT%H_%M_%S')}.svg"
        )
        try:
            directory.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w", encoding="utf-8") as file:
                file.write(self.export_screenshot())
        except OSError as exc:
            self.notify(f"Screenshot not saved: {target}: {exc.strerror or exc}", severity="error")
            return None
        self.notify(f"Screenshot saved: {target} (owner-only)")
        return str(target)

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        """Textual's own palette entries, less its "Quit": ours (with what quitting leaves) is the one. Its
        "Keys" docks a panel a third of the screen wide, which at 80 columns cut the header and the tables
        and wrapped each key's words (an operator): "Keys" opens this app's own key list (`?`)."""
        for command in super().get_system_commands(screen):
            if command.callback in (self.action_show_help_panel, self.action_hide_help_panel):
                yield SystemCommand(
                    "Keys", "Every key of the dashboard and what it does (as ? shows)", self.action_help
                )
            elif command.callback != self.action_quit:
                yield command

    # --- layout --------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield StatusBar(tz=self.tz, id="status")
        yield CodeBanner("", id="code-banner", markup=False)
        yield SizeNotice("", id="size-notice", markup=False)
        with Horizontal(id="top"):
            yield CoverageGauge(thresholds=self.thresholds, id="gauge")
            yield HealthPanel(id="health")
        with Horizontal(id="filter-bar"):  # labelled: once typed into, the placeholder is gone
            yield Label("Filter positions and log by symbol:", id="filter-label")
            yield FilterInput(
                placeholder="part of a symbol (enter: keep, esc: clear)", id="filter", compact=True
            )
        yield PositionsTable(id="positions")
        with Horizontal(id="bottom"):
            yield EventLog(tz=self.tz, id="log")
            yield WavesTable(tz=self.tz, id="waves")
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self.set_keymap(self.active_keymap)
        try:
            self.theme = self.settings.tui.theme
        except Exception:  # an unknown theme name: say so, keep the default
            self.notify(f"tui.theme: no theme named {self.settings.tui.theme!r}", severity="warning")
        saved = load_ui_state(self.ui_state_file).get("theme")
        if isinstance(saved, str) and saved in self.available_themes:
            self.theme = saved  # the operator's last switch wins over the configured default
        self.theme_changed_signal.subscribe(self, lambda theme: self._save_ui_state(theme=theme.name))
        self._status = self.query_one(StatusBar)
        self._banner = self.query_one(CodeBanner)
        self._size_notice = self.query_one(SizeNotice)
        self._size_notice.show_size(*self.size)
        self._gauge = self.query_one(CoverageGauge)
        self._health = self.query_one(HealthPanel)
        self._waves = self.query_one(WavesTable)
        self._positions = self.query_one(PositionsTable)
        self._log_panel = self.query_one(EventLog)
        self._log_handler = PanelLogHandler(self, self._secrets)
        logging.getLogger().addHandler(self._log_handler)
        self._positions.focus()
        self._positions.redraw_within = 1 / self.settings.tui.refresh_per_second
        self.paint()
        self.set_interval(1 / self.settings.tui.refresh_per_second, self._paint_on_timer, name="paint")
        if not self.feed.read_only:
            self.follow_feed()  # before start: timeouts while restoring protection belong in the log
        self.start_feed()
        if self._watcher is not None:
            self.watch_code()

    def on_unmount(self) -> None:
        if self.attention.critical:
            self._write_to_terminal(self.attention.restore())
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler = None

    def _save_ui_state(self, **changes: object) -> None:
        if self.ui_state_file is None:
            return
        state = {**load_ui_state(self.ui_state_file), **changes}
        try:
            fd = os.open(self.ui_state_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "w", encoding="utf-8") as out:
                json.dump(state, out)
        except OSError as exc:  # a screen preference is not worth more than a line in the log
            log.warning("could not save the dashboard's settings to %s: %s", self.ui_state_file, exc)

    # --- painting ------------------------------------------------------------------------------------

    def on_resize(self, event: events.Resize) -> None:
        if self._size_notice is not None:
            self._size_notice.show_size(event.size.width, event.size.height)

    def paint(self) -> None:
        """One frame from the latest snapshot: every widget updates only what changed, in one batch."""
        started = time.perf_counter()
        self._show(self._take_snapshot())
        self.frame_seconds.append(time.perf_counter() - started)

    async def _paint_on_timer(self) -> None:
        """The timer's frame, in steps with the event loop free in between (the snapshot; the panels and
        the table's order and first changed rows; its other changed rows, DEFERRED_ROWS_PER_STEP at a
        time): the engine's work that fell due during a step runs before the next, so the engine waits for
        the longest step, not for all (bench/tui_render.py). A frame painted meanwhile (a key, an event) is
        newer: this one is then dropped rather than shown over it."""
        started = time.perf_counter()
        frame = self._frames_shown
        snapshot = self._take_snapshot()
        taken = time.perf_counter() - started
        # A timer, not sleep(0): a zero sleep resumes ahead of the engine's timers that fell due meanwhile.
        await asyncio.sleep(FRAME_STEP_PAUSE)
        if self._frames_shown != frame:
            return
        started = time.perf_counter()
        self._show(snapshot, defer_rows=True)
        shown = time.perf_counter() - started
        more = True
        while more:  # the rest of the table's changed rows in further steps
            await asyncio.sleep(FRAME_STEP_PAUSE)
            started = time.perf_counter()
            # Also after a newer frame: it left none (every sync resets them).
            more = self._positions.sync_deferred(DEFERRED_ROWS_PER_STEP)
            shown += time.perf_counter() - started
        self.frame_seconds.append(taken + shown)

    def _take_snapshot(self) -> EngineSnapshot:
        if self._final_snapshot is not None:
            # Stopping: the drain still opens and protects the entries already sent, shown as they go (a
            # frozen screen counted them nowhere, and the wave line called them closed); once the engine
            # lets its positions go, the screen keeps the last it tracked: they are all still open on the
            # exchange. (Every position's view: the exit line counts from it.)
            live = self.feed.snapshot()
            if live.positions_tracked:
                self._final_snapshot = live
            snapshot = self._final_snapshot
        else:
            snapshot = self.feed.snapshot(views_of=self._views_to_build)
        # The health panel's protection line from the same figures as the gauge (the engine measures
        # health every few seconds; the two panels must never disagree about the same instant).
        return dataclasses.replace(
            snapshot, health=coherent_health(snapshot, self.thresholds, read_only=self.feed.read_only)
        )

    def _views_to_build(self, rows: Sequence[PositionCoverage], figures: CoverageFigures) -> set[int]:
        """The positions a frame shows in full (the engine builds a view of these only): the table's rows
        on screen, the running wave's (its line counts their state), any open in a detail view."""
        ids = self._positions.rows_on_screen(rows, figures.uncovered_ids)
        ids.update(position_id for _, position_id in self.running_wave.positions)
        ids.update(self.detailed_positions)
        return ids

    def _still_open(self, position_id: int) -> bool:
        """Whether the engine holds this position now (not as the last frame showed it)."""
        now = self.feed.snapshot(views_of=lambda _rows, _figures: {position_id})
        return any(p.position_id == position_id for p in now.positions)

    def position_view(self, position_id: int) -> PositionView | None:
        """A position's latest view: from the last frame, or asked of the engine if the frame had none."""
        snapshot = self.last_snapshot
        if snapshot is not None:
            view = next((p for p in snapshot.positions if p.position_id == position_id), None)
            if view is not None:
                return view
        # Only that position's view is built: a full snapshot built all of them (303 at the test's book,
        # 1 000 in production) whenever the cursor reached a row the last frame had no view of.
        wanted = self.feed.snapshot(views_of=lambda _rows, _figures: {position_id})
        return next((p for p in wanted.positions if p.position_id == position_id), None)

    def on_positions_table_frame_wanted(self, _message: PositionsTable.FrameWanted) -> None:
        self.paint()

    def _show(self, snapshot: EngineSnapshot, *, defer_rows: bool = False) -> None:
        self._frames_shown += 1
        self.last_snapshot = snapshot
        with self.batch_update():
            self._status.show(
                snapshot, watching=self._watching(), stopping=self.stopping, looked_after=self._looked_after()
            )
            self._gauge.show(snapshot)
            self._health.show(snapshot.health)
            self._waves.show(snapshot.waves)
            self._positions.sync(
                snapshot.rows or snapshot.positions,
                snapshot.coverage.uncovered_ids,
                snapshot.positions,
                defer=defer_rows,
            )
            subtitle = wave_line(snapshot, self.running_wave, self.tz)
            if self.feed.read_only and not self._looked_after():
                # Watching with no engine on the account: the rows are the records as the last one left them
                # (a position its stop closed meanwhile still showed, "trail on last", marks frozen: opme48).
                subtitle = "as recorded: no engine checks the venue now"
            if subtitle != self._positions_subtitle:  # setting one repaints the whole table, even unchanged
                self._positions_subtitle = subtitle
                self._positions.border_subtitle = subtitle
        self._write_to_terminal(
            self.attention.update(snapshot.health, f"{snapshot.venue}:{snapshot.account}")
        )
        if self._freeze_gc and self.feed_started:
            self._freeze_new_rows()

    def _freeze_new_rows(self) -> None:
        """The table's rows live as long as their positions: at 1 000 positions some 60 000 objects (cells,
        their spans, row keys) that every full collection traversed, ~35 ms of the event loop each time,
        which set the engine's worst tick delays (bench/tui_render.py). The start's freeze
        (`on_feed_started`) does not hold the rows the table builds after it: all of them again after a
        resize across a column layout (the first resize at start among them) or a filter, a large wave's.
        Once GC_FREEZE_AFTER_ROWS rows were added since the last freeze, a full collection (so that no
        garbage is frozen with them: it would never be freed) and a freeze, once, where every later full
        collection would have traversed them again. A row removed later is still freed: reference counting
        frees it (rows hold no reference cycles)."""
        added = self._positions.rows_added
        if added - self._rows_frozen >= GC_FREEZE_AFTER_ROWS:
            self._rows_frozen = added
            gc.collect()
            gc.freeze()

    def _write_to_terminal(self, sequence: str) -> None:
        """The bell and the window title on CRITICAL (tui/attention.py), written as Textual's own bell()."""
        if sequence and not self.is_headless and self._driver is not None:
            self._driver.write(sequence)

    def _looked_after(self) -> bool:
        """Watching: an engine holds the account, is heard and looks after it (not starting or stopping)."""
        if not self.feed.read_only:
            return True
        holder = getattr(self.feed, "holder", None)
        return holder is not None and not holder.silent and holder.looks_after

    def _watching(self) -> str | None:
        if not self.feed.read_only:
            return None
        holder = getattr(self.feed, "holder", None)
        if holder is None:
            return "no engine running"
        if holder.silent:  # holds the account, not heard: hung, frozen, or its host is gone
            return f"pid {holder.pid}@{holder.host} SILENT {format_duration(holder.silent_seconds)}"
        if not holder.looks_after:  # starting or stopping
            return f"pid {holder.pid}@{holder.host} {holder.phase.upper()}"
        return f"pid {holder.pid}@{holder.host}"  # its version is on the header once, like the live view's

    # --- workers -------------------------------------------------------------------------------------

    @work(exclusive=True, group="engine", exit_on_error=False, description="start the engine")
    async def start_feed(self) -> None:
        try:
            report = await self.feed.start()
        except LeaseHeld as exc:
            log.warning("%s; offering read-only", exc)
            self.post_message(FeedRefused(str(exc), exc.holder))
            return
        except (CredentialsRefused, AccountShared) as exc:  # the operator's configuration: no traceback
            log.error("%s", exc)
            self.exit_code = EXIT_USAGE
            self.post_message(FeedFailed(str(exc)))
            return
        except MetricsUnavailable as exc:  # the metrics port is taken: one line, no traceback
            log.error("%s", exc)
            self.post_message(FeedFailed(str(exc)))
            return
        except StartInterrupted:  # the operator quit while the start waited for the venue
            # Said on the terminal after the app, like `tsbot run`'s line: the dashboard quit during such a
            # start printed nothing and exited 0 (a reviewer), leaving the operator no word of the positions.
            self.start_failure = self.feed.start_given_up_words(self.stopped_by)
            self.exit_code = EXIT_FAILED
            log.warning("%s", self.start_failure)
            return
        except ExchangeError as exc:  # the venue refused the start, or could not be reached: no traceback
            # (Said as `tsbot run` says it: "Retryable: binanceusdm: could not connect …" showed a class name.)
            said = (
                f"the venue refused the start: {exc}"
                if isinstance(exc, Rejected)
                else f"couldn't reach the venue: {exc}"
            )
            log.error("%s", said)
            self.post_message(FeedFailed(said))
            return
        except Exception as exc:
            log.exception("the engine did not start")
            self.post_message(FeedFailed(f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(FeedStarted(report))

    @work(exclusive=True, group="follow", exit_on_error=False, description="follow the engine's events")
    async def follow_feed(self) -> None:
        translator = LogTranslator()
        async for item in self.feed.follow():
            self.running_wave.see(item)
            entry = item if isinstance(item, LogEntry) else translator.entry(item)
            if entry is not None:
                self.post_message(LogEntryAdded(entry))
            if isinstance(item, REPAINT_EVENTS):
                self.post_message(RepaintRequested())

    @work(exclusive=True, group="code-watch", exit_on_error=False, description="compare code on disk")
    async def watch_code(self) -> None:
        while True:
            watching = isinstance(self.feed, ReadOnlyFeed)
            if watching and self._holder_watched != _holder_key(self.feed.holder):
                # Another engine holds the account now (a restart on the fix): its code, not the last one's
                # (the banner named a pid that no longer ran, r76).
                self._watch_the_holders_code(self.feed.holder)
            watcher = self._watcher
            if watcher is None and not watching:
                return
            if watcher is not None:
                difference = await asyncio.to_thread(watcher.check)
                if difference != self.code_difference and watcher is self._watcher:
                    self.post_message(CodeChanged(difference))
            await asyncio.sleep(self._code_check_seconds)

    @work(group="command", exit_on_error=False, description="close a position")
    async def close_selected(self, position_id: int, symbol: str) -> None:
        held = self.feed.close_held_for(position_id)
        if held is not None:
            self.post_message(
                CommandDone(
                    f"Closing {symbol}: held back up to {math.ceil(held)}s by the venue's word (a ban, a "
                    "429's hold, or rate refusals where one more may get the account banned); it goes then. "
                    "See the log for why.",
                    severity="warning",
                )
            )
        try:
            closed = await self.feed.close_position(position_id)
        except Exception as exc:
            log.exception("closing %s failed", symbol)
            self.post_message(CommandDone(f"Closing {symbol} failed: {exc}", severity="error"))
            return
        if closed:
            self.post_message(CommandDone(f"{symbol} closed at market; its stops were cancelled."))
        else:
            self.post_message(
                CommandDone(
                    f"{symbol}: the venue did not confirm the close; the position stays protected.",
                    severity="error",
                )
            )

    @work(exclusive=True, group="shutdown", exit_on_error=False, description="stop the engine and quit")
    async def shutdown(self) -> None:
        self.stopping = True
        self._final_snapshot = self.feed.snapshot()
        self.paint()
        await self.stop_feed()
        if self.hung_up:
            # Nobody may run this process's exit hooks (the watchdog below ends it with os._exit): the
            # embedded server it started or joined is left now, and stopped if nobody else uses it. The
            # exit line is said now to a stdout that is not the lost terminal (a service's log, nohup's):
            # the watchdog ended the process before `main` could, and the file stayed empty (an operator).
            await asyncio.to_thread(self.leave_embedded_database)
            summary = self.exit_summary()
            if summary and 1 not in self._terminal_fds:
                with contextlib.suppress(OSError):
                    os.write(1, (summary + "\n").encode())
                    self.summary_said = True
            # The engine has stopped (the only thing that matters); if restoring a terminal that no longer
            # exists wedges the exit anyway, end the process rather than linger without a screen.
            watchdog = threading.Timer(HANGUP_EXIT_SECONDS, os._exit, args=(self.exit_code,))
            watchdog.daemon = True
            watchdog.start()
        self.exit(self.exit_code)

    def leave_embedded_database(self) -> None:
        database = self.settings.database
        if database.dsn:
            return  # a server we did not start
        try:
            leave_embedded(Path(database.data_dir) if database.data_dir else default_data_dir())
        except Exception:
            log.exception("leaving the embedded PostgreSQL failed")

    def request_shutdown(self, signum: int) -> None:
        """A signal asked us to stop: no confirmation (nobody may be there to answer)."""
        self.stopped_by = f"{signal.Signals(signum).name} received"
        log.warning("%s: stopping the engine; exchange stops stay in place", self.stopped_by)
        if signum == signal.SIGHUP:
            # The terminal is gone and writing to it fails (EIO), which can wedge Textual's output thread on
            # exit (Textualize/textual#5140): point the streams that were the terminal at /dev/null before
            # anything draws. Not one redirected to a file: the exit line went to /dev/null with the rest,
            # and a service's log lost the stop's report (an operator).
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in self._terminal_fds:
                os.dup2(devnull, fd)
            os.close(devnull)
            self.hung_up = True
            driver = self._driver
            if driver is not None and hasattr(driver, "terminal_gone"):
                driver.terminal_gone = True
                # Its input thread would read /dev/null's end without pause until the exit: stopped now.
                driver.disable_input()
        if not self.stopping:
            self.shutdown()

    async def stop_feed(self) -> None:
        """Stop the engine (or the watch); idempotent. A start still in progress ends first: one waiting for
        the venue (a ban's end) gives up, one restoring and protecting positions finishes and is then
        stopped like a running engine (cancelled, the stops it had sent for naked positions lost their
        answers); a watch's start is cancelled."""
        for worker in list(self.workers):
            if worker.group == "engine" and worker.is_running:
                interrupt = getattr(self.feed, "interrupt_start", None)
                if interrupt is not None:
                    interrupt()
                else:
                    worker.cancel()
                with contextlib.suppress(Exception):
                    await worker.wait()
        try:
            await self.feed.stop()
        except Exception:
            log.exception("stopping the engine failed")

    async def _seed_coverage_trend(self) -> None:
        """The gauge's last hour from the database: samples an earlier engine recorded count too."""
        try:
            samples = await self.feed.recent_coverage(TREND_WINDOW_SECONDS)
        except Exception:  # (the trend then starts from this dashboard's samples, as before)
            log.warning("reading the last hour's coverage samples failed", exc_info=True)
            return
        self._gauge.seed_trend(samples)

    # --- messages ------------------------------------------------------------------------------------

    def on_feed_started(self, message: FeedStarted) -> None:
        self.feed_started = True
        self.run_worker(self._seed_coverage_trend(), exclusive=False)
        if self._freeze_gc:
            # Everything built at start (modules, widgets, caches, markets) will live as long as the process:
            # keeping it out of the collector's full passes turns 50-80 ms gen-2 pauses, which stall the
            # engine's loop too, into ~10 ms ones (bench/tui_render.py).
            gc.freeze()
            self._rows_frozen = self._positions.rows_added
        self.startup_report = message.report
        if message.report is not None:
            report = message.report
            self.notify(
                f"Engine started: {report.describe()}",
                title="Start-up",
                severity="warning" if report.failed else "information",
                timeout=8,
            )
        if self.feed.read_only:
            self.notify(
                "Read-only: watching the database; commands are sent to the engine that trades.", timeout=8
            )
            self.follow_feed()
        self.paint()

    def on_feed_refused(self, message: FeedRefused) -> None:
        def answered(read_only: bool | None) -> None:
            if read_only:
                self.feed = ReadOnlyFeed(self.settings, message.holder, interval=self.read_only_poll_seconds)
                self._watch_the_holders_code(message.holder)
                self.watch_code()  # (exclusive: replaces the one watching this process's own code)
                self.start_feed()
            else:
                self.exit_code = EXIT_FAILED
                self.shutdown()

        self.push_screen(LeaseHeldScreen(message.message, message.holder), answered)

    def _watch_the_holders_code(self, holder: LeaseHolder | None) -> None:
        """Read-only, the banner speaks of the code of the engine that trades, not of this dashboard's: it
        compared its own start with the disk, so it said nothing of a fix the engine has been running
        without for longer, and "restart needed" pointed at the wrong process (r75). Its code is recorded
        with its lease; an older version's lease, or another host's engine, cannot be told: no banner."""
        self._holder_watched = _holder_key(holder)
        recorded = None if holder is None else holder.running_code()
        roots = [Path(root) for root in (holder.code_roots or [])] if holder is not None else []
        if (
            holder is None
            or recorded is None
            or holder.host != socket.gethostname()
            or not roots
            or not all(root.is_dir() for root in roots)
        ):
            self._watcher = None
        else:
            self._watcher = SourceWatcher(roots, running=recorded)
            self._code_whose = f"the trading engine (pid {holder.pid})"
        self.code_difference = None
        self._banner.show_difference(None, self.tz)

    def on_feed_failed(self, message: FeedFailed) -> None:
        self.start_failure = message.error

        def closed(_: None) -> None:
            self.exit_code = self.exit_code or EXIT_FAILED
            self.shutdown()

        self.push_screen(StartFailedScreen(message.error, self.log_file), closed)

    def on_log_entry_added(self, message: LogEntryAdded) -> None:
        self._log_panel.add_entry(message.entry)

    def on_repaint_requested(self, _message: RepaintRequested) -> None:
        self.paint()

    def on_code_changed(self, message: CodeChanged) -> None:
        self.code_difference = message.difference
        if isinstance(self.feed, EngineFeed):  # (its engine's figures, /metrics, say what the banner says)
            self.feed.engine.code_difference = message.difference
        self._banner.show_difference(message.difference, self.tz, whose=self._code_whose)
        if message.difference is not None:
            log.warning(
                "code on disk changed since %s started (%s): restart needed",
                self._code_whose or "this dashboard",
                message.difference.describe(),
            )

    def on_command_done(self, message: CommandDone) -> None:
        self.notify(message.text, severity=message.severity, timeout=8)
        self.paint()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter on a position: every field of it, untruncated."""
        if event.data_table is not self._positions or event.row_key.value is None:
            return
        position_id = int(event.row_key.value)
        view = self.position_view(position_id)
        snapshot = self.last_snapshot
        if view is None or snapshot is None:
            return
        self.push_screen(PositionDetailScreen(view, uncovered=position_id in snapshot.coverage.uncovered_ids))

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            self._positions.set_filter(needle=event.value)
            self._log_panel.set_filter(event.value)
            self.paint()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "filter":
            if not event.value:
                self.query_one("#filter-bar").remove_class("-visible")
            self._positions.focus()

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity: SeverityLevel = "information",
        timeout: float | None = None,
        markup: bool = False,
    ) -> None:
        """A toast, and the same line kept in the log panel: a command's result outlives its toast."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)
        if getattr(self, "_log_panel", None) is not None:
            snapshot = self.last_snapshot
            self._log_panel.add_entry(
                LogEntry(
                    snapshot.taken_at if snapshot and snapshot.taken_at else time.time(),
                    {"information": "info"}.get(severity, severity),
                    "",
                    "dashboard",
                    None,
                    "",
                    f"{title}: {message}" if title else message,
                )
            )

    # --- commands ------------------------------------------------------------------------------------

    def _refuse_if_not_trading(self) -> bool:
        """True (and the operator is told why) when trading commands cannot run now."""
        if isinstance(self.feed, ReadOnlyFeed):
            self.notify(self.feed.refusal(), severity="warning", timeout=8)
            return True
        if self.stopping:
            self.notify("The engine is stopping.", severity="warning")
            return True
        snapshot = self.feed.snapshot()
        if snapshot.state is not EngineState.RUNNING:
            self.notify(f"The engine is {snapshot.state.value}; try again once it runs.", severity="warning")
            return True
        return False

    @property
    def _watching_only(self) -> bool:
        """Read-only: commands go to the engine that holds the lease (monitoring.commands)."""
        return isinstance(self.feed, ReadOnlyFeed) and not self.stopping

    @work(group="command", exit_on_error=False, description="send a command to the trading engine")
    async def send_to_engine(self, kind: CommandKind, args: dict[str, object], what: str) -> None:
        """Hand one command to the engine that trades the account; its answer goes to the log panel (one
        row per position) and a notification."""
        feed = self.feed
        if not isinstance(feed, ReadOnlyFeed):
            return
        self.post_message(CommandDone(f"{what}: sent to the engine that trades the account; waiting…"))
        try:
            answer = await feed.send_command(kind, args)
        except Exception as exc:
            log.exception("sending %s to the engine failed", what)
            self.post_message(CommandDone(f"{what}: could not be sent: {exc}", severity="error"))
            return
        for position in answer.positions:
            self.post_message(
                LogEntryAdded(
                    LogEntry(
                        time.time(),
                        "info" if position.ok else "error",
                        position.symbol,
                        kind.value,
                        None,
                        "ok" if position.ok else "failed",
                        position.detail,
                    )
                )
            )
        self.post_message(
            CommandDone(f"{what}: {answer.summary}", severity="information" if answer.ok else "error")
        )

    def action_protect_uncovered(self) -> None:
        if self._watching_only:
            self.send_to_engine(CommandKind.PROTECT, {}, "Re-protect")
            return
        if self._refuse_if_not_trading():
            return
        plan = self.feed.plan_reprotect()
        if not plan:
            figures = self.feed.snapshot().coverage
            extra = f" ({figures.protecting} still inside their grace period)" if figures.protecting else ""
            self.notify(f"Nothing to protect: every position is covered{extra}.")
            return

        def finished(results: object) -> None:
            if isinstance(results, list) and results:
                covered = sum(r.covered for r in results)
                self.notify(
                    f"Re-protect: {covered}/{len(results)} covered.",
                    severity="information" if covered == len(results) else "error",
                )
            self.paint()

        self.push_screen(ReprotectScreen(self.feed, plan), finished)

    def action_restart_protection(self) -> None:
        if not self._watching_only and self._refuse_if_not_trading():
            return

        def confirmed(yes: bool | None) -> None:
            if yes and self._watching_only:
                self.send_to_engine(CommandKind.RESTART_PROTECTION, {}, "Restart protection")
            elif yes:
                self.push_screen(RestartReportScreen(self.feed), lambda _report: self.paint())

        self.push_screen(
            ConfirmScreen(
                "Restart the trailing-stop manager?",
                "The protection manager stops, reloads every open position from the database, verifies each "
                "against the exchange and re-arms. Orders on the exchange stay in place meanwhile; new "
                "signals wait. A report says what was restored, re-protected, adopted or failed.",
                confirm_label="Restart",
            ),
            confirmed,
        )

    def action_toggle_entries(self) -> None:
        if not self._watching_only and self._refuse_if_not_trading():
            return
        snapshot = self.feed.snapshot()
        by = snapshot.entries_paused_by
        if not snapshot.entries_paused or by in ("", "operator"):
            self._toggle_entries()
            return
        # A pause the operator did not make (the breaker's: protection was failing) was lifted by one key,
        # with nothing said of why it was made; it tripped again 25 s later (opme48).
        why = f": {snapshot.entries_pause_reason}" if snapshot.entries_pause_reason else ""

        def confirmed(yes: bool | None) -> None:
            if yes:
                self._toggle_entries()

        self.push_screen(
            ConfirmScreen(
                "Resume new entries?",
                f"Entries were paused by the {by}{why}. Resumed, new signals open positions again; the "
                f"{by} pauses them again if it finds the same.",
                confirm_label="Resume",
            ),
            confirmed,
        )

    def _toggle_entries(self) -> None:
        if self._watching_only:
            paused = not self.feed.snapshot().entries_paused
            kind = CommandKind.ENTRIES_PAUSE if paused else CommandKind.ENTRIES_RESUME
            self.send_to_engine(kind, {}, "Pause entries" if paused else "Resume entries")
            return
        paused = not self.feed.snapshot().entries_paused
        done, answer = self.feed.set_entries_paused(paused)
        if paused:
            self.notify(
                "New entries PAUSED: signals are rejected; open positions stay protected.", severity="warning"
            )
        elif done:
            self.notify("New entries resumed.", severity="information")
        else:  # (it said "resumed" while the engine refused: the database down, the lease lost)
            self.notify(f"Entries NOT resumed: {answer}", severity="error", timeout=15)
        self.paint()

    def action_close_position(self) -> None:
        if not self._watching_only and self._refuse_if_not_trading():
            return
        selected = self._positions.selected_position_id()
        # The engine's current view of it (a row off screen may show text one frame old).
        view = next((p for p in self.feed.snapshot().positions if p.position_id == selected), None)
        if view is None:
            self.notify("No position selected.", severity="warning")
            return
        if view.closing:  # offered again, a second close went after the first (opme48: two toasts)
            self.notify(f"{view.symbol} is being closed already: its close at market is on its way.")
            return

        def confirmed(yes: bool | None) -> None:
            if yes and self._watching_only:
                self.send_to_engine(CommandKind.CLOSE, {"symbol": view.symbol}, f"Close {view.symbol}")
            elif yes and self._still_open(view.position_id):
                self.close_selected(view.position_id, view.symbol)
            elif yes:
                self.notify(f"{view.symbol} is no longer open: nothing to close.", severity="warning")

        def body() -> str:  # read again while the dialog is open: its PnL moves, its stop may close it
            now = self.position_view(view.position_id)
            if now is None:
                return f"{view.symbol} (position {view.position_id}) is no longer open: nothing to close."
            pnl = "" if now.pnl_percent is None else f", PnL {now.pnl_percent:+.2f}%"
            return (
                f"Close {now.side.upper()} {formatting.price(now.quantity)} {now.symbol} (position {now.position_id}) at "
                f"market, reduce-only{pnl}. {_stops_after_close(now)}"
            )

        self.push_screen(
            ConfirmScreen(
                f"Close {view.symbol}?", body(), confirm_label=f"Close {view.symbol}", live_body=body
            ),
            confirmed,
        )

    def action_only_uncovered(self) -> None:
        self._positions.set_filter(only_uncovered=not self._positions.only_uncovered)
        self.paint()

    def action_clear_filters(self) -> None:
        """Esc on the positions table: a kept symbol filter and the uncovered-only view are cleared, the
        filter's box hidden (with neither on, nothing happens)."""
        box = self.query_one(FilterInput)
        if not box.value and not self._positions.only_uncovered:
            return
        box.value = ""  # (its Changed message clears the table's and the log's symbol filter)
        self._positions.set_filter(only_uncovered=False, needle="")
        self._log_panel.set_filter("")
        self.query_one("#filter-bar").remove_class("-visible")
        self.paint()

    def action_filter(self) -> None:
        box = self.query_one(FilterInput)
        self.query_one("#filter-bar").add_class("-visible")
        box.focus()

    def action_focus_log(self) -> None:
        self.screen.add_class("-show-log")
        self._log_panel.focus()

    def action_cycle_log_severity(self) -> None:
        self._log_panel.action_cycle_severity()

    def action_health_detail(self) -> None:
        self.push_screen(HealthDetailScreen(classes="dialog-screen"))

    def action_history(self) -> None:
        self.push_screen(HistoryScreen(self.tz))

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.active_keymap, read_only=self.feed.read_only))

    def action_toggle_dark_light(self) -> None:
        self.theme = "textual-light" if self.current_theme.dark else "textual-dark"

    def action_help_quit(self) -> None:
        """Ctrl+C does not quit (Textual's choice, and an operator's reflex): say which keys do. Textual's own
        notice is written in markup, which this app's notices show as typed ("Press [b]ctrl+q[/b]")."""
        keys = sorted(
            {
                key
                for key, active in self.active_bindings.items()
                if active.binding.action in ("quit", "app.quit")
            }
        )
        if keys:
            self.notify(f"Press {' or '.join(keys)} to quit", title="Do you want to quit?")

    async def action_quit(self) -> None:
        """Quit: the engine stops taking signals; every exchange stop stays in place."""
        if self.stopping:
            return
        snapshot = self.feed.snapshot()
        if self.feed.read_only or not (snapshot.positions or snapshot.entries_sending):
            self.shutdown()
            return
        self.push_screen(
            ConfirmScreen(
                "Quit tsbot-tui?",
                quit_warning(snapshot),
                confirm_label="Quit",
                # A wave, a lost stop, a close while it is open: what quitting leaves is said as it is now.
                live_body=lambda: quit_warning(self.feed.snapshot()),
            ),
            self._quit,
        )

    def _quit(self, yes: bool | None) -> None:
        if yes:
            self.shutdown()

    def exit_summary(self) -> str:
        """One line for the terminal after the app has exited: what the engine's stop left behind."""
        # The stop's own snapshot has every position's view (a frame's has those on screen).
        snapshot = self._final_snapshot or self.last_snapshot
        if isinstance(self.feed, ReadOnlyFeed):
            # Quit without a word, a watching dashboard left the operator wondering what it had stopped.
            # "The engine holding the account protects as before" was said with no engine running (an
            # operator): what is left on the account is said as the watch last saw it.
            holder = self.feed.holder
            if holder is None:
                return (
                    "tsbot-tui stopped: it only watched; no engine holds the account: its positions keep "
                    "only the stops on the exchange, nothing re-protects them (see `tsbot status`)"
                )
            if why := holder.not_looking_after():
                return (
                    f"tsbot-tui stopped: it only watched; the engine holding the account {why}: its "
                    "positions keep only the stops on the exchange for now (see `tsbot status`)"
                )
            return (
                f"tsbot-tui stopped: it only watched; the engine holding the account (pid {holder.pid} on "
                f"{holder.host}) trades and protects as before"
            )
        if snapshot is None or self.feed.read_only or not self.feed_started:
            return ""
        managed = sum(1 for p in snapshot.positions if p.trailing_kind == "managed")
        report = self.feed.stop_report
        if report is None:  # the engine never ran to a stop of its own (a start that failed)
            return ""
        return f"tsbot-tui stopped: {report.describe()}" + (
            f"; {managed} managed trailing stops do not move until restart" if managed else ""
        )

    @property
    def left_uncovered(self) -> bool:
        """The engine stopped with positions uncovered (the exit code says so)."""
        report = self.feed.stop_report
        return report is not None and not report.all_protected


class RunningWave:
    """Positions opened by waves still in progress, followed from the engine's events. The engine lists a
    wave once it has finished (its protection waited for, up to two minutes), so without this the screen
    showed the previous, finished wave while the running one was failing.

    Events carry no wave id, and a wave still waiting for its protection may finish after the next one: the
    set is every position opened since the last moment when every opened position belonged to a finished
    wave (counted from `WaveFinished.opened`). Each of them did open in a wave that is, or was until just
    now, in progress, so the line never claims more than that."""

    def __init__(self) -> None:
        self.positions: list[tuple[float, int]] = []  # (opened at, position id)
        self._opened = 0  # PositionOpened seen
        self._finished = 0  # positions accounted for by WaveFinished
        # When the waves of the set began (`EngineSnapshot.wave_begun`, seen while painting): "since" was
        # the first fill's time, 8 s after a slow wave's start (opme48).
        self._began: float | None = None
        self._next_began: float | None = None  # a wave begun before the set's first position opened

    def note_begun(self, wave_begun: tuple[float, int] | None) -> None:
        if wave_begun is None:
            return
        if self.positions:
            self._began = wave_begun[0] if self._began is None else min(self._began, wave_begun[0])
        else:
            self._next_began = wave_begun[0]

    def see(self, event: object) -> None:
        if isinstance(event, PositionOpened):
            if self._opened <= self._finished:
                self.positions = []
                self._opened = self._finished
                began, self._next_began = self._next_began, None
                self._began = began if began is not None and began <= event.at else None
            self.positions.append((event.at, event.position_id))
            self._opened += 1
        elif isinstance(event, WaveFinished):
            self._finished += event.opened
            if self._finished >= self._opened:
                self.positions = []
        elif isinstance(event, EventsDropped):  # what was missed is unknown: no claim rather than a wrong one
            self.positions = []
            self._finished = self._opened

    @property
    def started_at(self) -> float | None:
        if not self.positions:
            return None
        first = self.positions[0][0]
        return first if self._began is None else min(self._began, first)


def wave_line(snapshot: EngineSnapshot, running: RunningWave, tz: tzinfo | None) -> str:
    """The wave in progress with its state, else the newest finished one, in one line (below 140 columns
    the waves table gives its room to the log)."""
    running.note_begun(snapshot.wave_begun)
    if running.started_at is not None:
        ids = {position_id for _, position_id in running.positions}
        uncovered = set(snapshot.coverage.uncovered_ids)
        shown = [p for p in snapshot.rows or snapshot.positions if p.position_id in ids]
        protected = sum(1 for p in shown if p.covered)
        failing = sum(1 for p in shown if p.position_id in uncovered)
        protecting = len(shown) - protected - failing
        closed = len(ids) - len(shown)
        return (
            f"wave running since {formatting.clock_time(running.started_at, tz)}: "
            f"{len(ids)} opened, {protected} protected"
            + (f", {protecting} protecting" if protecting else "")
            + (f", {failing} UNCOVERED" if failing else "")
            + (f", {closed} closed" if closed else "")
        )
    if snapshot.wave_begun is not None:  # begun, nothing opened yet (its entries waiting for the venue)
        began, signals = snapshot.wave_begun
        return (
            f"wave running since {formatting.clock_time(began, tz)}: {signals} signal{'' if signals == 1 else 's'}, "
            "none opened yet"
        )
    return last_wave(snapshot, tz)


def last_wave(snapshot: EngineSnapshot, tz: tzinfo | None) -> str:
    """The newest finished wave in one line."""
    if not snapshot.waves:
        return "no wave yet"
    wave = snapshot.waves[0]
    slowest = "" if wave.slowest_protection_ms is None else f", slowest {wave.slowest_protection_ms:,} ms"
    failed = f", {wave.failed} FAILED" if wave.failed else ""
    return (
        f"last wave {formatting.clock_time(wave.started_at, tz)}: "
        f"{wave.signals} signal{'' if wave.signals == 1 else 's'}, "
        f"{wave.opened} opened, {wave.protected} protected{failed}{slowest}"
    )


def coherent_health(
    snapshot: EngineSnapshot, thresholds: HealthThresholds, *, read_only: bool
) -> tuple[ComponentHealth, ...]:
    """The snapshot's health with its protection line evaluated from the snapshot's own coverage figures, by
    the engine's rule (`evaluate_protection`): the gauge and the health panel show one instant. (Read-only, a
    line nobody measures any more stays UNKNOWN: the figures behind it are not being kept current.)"""
    figures = snapshot.coverage
    components = list(snapshot.health)
    index = next((i for i, c in enumerate(components) if c.component is Component.PROTECTION), None)
    if index is None or (read_only and components[index].state is HealthState.UNKNOWN):
        return snapshot.health
    recorded = components[index].measurements
    timeouts, unchecked, why = (
        recorded.get("timeouts_last_hour", 0),
        recorded.get("unchecked_seconds"),
        recorded.get("unchecked_why", ""),
    )
    measured = ProtectionMeasurement.of(
        figures,
        timeouts if isinstance(timeouts, int) else 0,
        float(unchecked) if isinstance(unchecked, int | float) else None,
        why if isinstance(why, str) else "",
    )
    components[index] = evaluate_protection(measured, thresholds)
    return tuple(components)


QUIT_NAMES_SHOWN = 5  # uncovered positions the quit dialog names


def _only_unverified(view: PositionView) -> bool:
    """Every stop the position lacks is only unverified (not known missing), and at least one is."""
    return (view.stop_loss_unverified or view.trailing_stop_unverified) and (
        (view.has_stop_loss or view.stop_loss_unverified)
        and (view.has_trailing_stop or view.trailing_stop_unverified)
    )


def _stops_after_close(view: PositionView) -> str:
    """What a close does with the position's stops, by what the venue confirmed of them (the dialog said
    both were cancelled of a position that had neither: an operator)."""
    held = [
        words
        for words, confirmed in (("stop-loss", view.has_stop_loss), ("trailing stop", view.has_trailing_stop))
        if confirmed
    ]
    if len(held) == 2:
        return "Its stop-loss and trailing stop are cancelled after the fill."
    if held:
        return f"Its {held[0]} is cancelled after the fill (it has no other stop confirmed on the exchange)."
    return "None of its stops is confirmed on the exchange; any the venue holds is cancelled after the fill."


def quit_warning(snapshot: EngineSnapshot) -> str:
    """What quitting leaves behind. Only positions whose both stops the venue confirmed are said to keep
    their stops; every other one is UNCOVERED (inside its grace period or not), never both."""
    figures = snapshot.coverage
    managed = sum(1 for p in snapshot.positions if p.trailing_kind == "managed")
    # Managed trails not activated are covered while the engine runs, by the engine: no order of theirs is
    # on the exchange, and nothing places one while it is stopped.
    engine_only = sum(
        1
        for p in snapshot.positions
        if p.covered and p.trailing_kind == "managed" and p.trailing_phase == "waiting"
    )
    unconfirmed = figures.active - figures.protected
    lines = [
        "The engine stops taking signals and stops its loops.",
        f"Exchange stops stay in place: {figures.protected - engine_only} of "
        f"{counted(figures.active, 'open position')} "
        f"{keep_their_stops(figures.protected - engine_only)} on the exchange "
        "(both confirmed by the venue).",
    ]
    if engine_only:
        lines.append(
            f"WARNING: {engine_only} {'position keeps' if engine_only == 1 else 'positions keep'} only "
            "the hard stop: a managed trail has no order on the exchange before it activates, and nothing "
            "places one while the engine is stopped. They are UNCOVERED once it stops."
        )
    if unconfirmed:
        grace = f", {figures.protecting} of them inside their grace period" if figures.protecting else ""
        # Named (the first few), as the exit line names them: "3 positions" told nobody which to look at.
        names = sorted({p.symbol for p in snapshot.positions if not p.covered})
        shown_names = ", ".join(names[:QUIT_NAMES_SHOWN]) + (
            f", +{len(names) - QUIT_NAMES_SHOWN} more" if len(names) > QUIT_NAMES_SHOWN else ""
        )
        # Stops the venue has not confirmed since a doubt (a start that has not read it yet, a gap in the
        # account stream) may well be live: said apart from stops known missing (a start waiting out a ban
        # said 20 positions UNCOVERED while the venue held all 40 of their stops: an operator).
        unverified = sum(1 for p in snapshot.positions if not p.covered and _only_unverified(p))
        doubt = (
            f"; {unverified} of them not verified: their stops were confirmed before and may still be on "
            "the exchange, but the venue has not confirmed them since"
            if unverified
            else ""
        )
        waiting = (
            f" (the start is waiting for the venue: {snapshot.start_waiting_for})"
            if snapshot.start_waiting_for
            else ""
        )
        lines.append(
            f"WARNING: {unconfirmed} {'position is' if unconfirmed == 1 else 'positions are'} UNCOVERED "
            f"right now{grace}"
            + (f" ({shown_names})" if names else "")
            + doubt
            + waiting
            + (
                # (A start waiting for the venue is given up at a quit: nothing is restored or sent. The
                # dialog promised protection the exit line then said had not happened: an operator.)
                ". Quitting now gives up the start: nothing is restored or sent, and "
                f"{'it stays' if unconfirmed == 1 else 'they stay'} UNCOVERED until an engine runs again."
                if snapshot.start_waiting_for
                else (
                    ". The engine tries to protect it before it stops (within the call budget); if it cannot, "
                    "it stays UNCOVERED."
                    if unconfirmed == 1
                    else ". The engine tries to protect them before it stops (within the call budget); any it "
                    "cannot stays UNCOVERED."
                )
            )
        )
    if snapshot.entries_sending:
        n = snapshot.entries_sending
        lines.append(
            f"{n} {'entry is' if n == 1 else 'entries are'} on {'its' if n == 1 else 'their'} way to the venue: "
            "the engine waits for the answers and protects what fills before it stops (the exit line counts "
            "them); no other entry is sent."
        )
    # (Named only when there are some: "Managed trailing stops (0 now)" on Bybit, where managed mode is
    # refused, told an operator of a mode they could not have: an operator.)
    lines.append(
        f"Managed trailing stops ({managed} now) stop moving until the engine is restarted; "
        "native trailing stops keep trailing on the exchange."
        if managed
        else "Trailing stops keep trailing on the exchange."
    )
    return "\n".join(lines)


# --- entry point ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="tsbot-tui",
        description="The engine with its dashboard (same configuration as `tsbot run`).",
    )
    parser.add_argument(
        "--config", metavar="PATH", help="configuration file (default: ./config.toml, else built-in defaults)"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    return parser


def _holder_key(holder: LeaseHolder | None) -> tuple[int, str, object] | None:
    """Which engine holds the account (its pid, host, start), to tell when another one took it."""
    return None if holder is None else (holder.pid, holder.host, holder.started_at)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help / --version (0), or a wrong argument already said in one line (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        loaded = load_config(args.config)
    except ConfigError as exc:
        for line in exc.lines:
            print(one_line(line), file=sys.stderr)
        return EXIT_USAGE
    secrets = loaded.secret_values()
    planned = Path(loaded.settings.logging.file).expanduser()
    absent = [p for p in (planned, *planned.parents) if not p.exists()]  # what configure_logging creates
    try:
        log_file = configure_logging(loaded.settings.logging, secrets)  # the file only: the screen is ours
        engine = Engine(loaded.settings)
    except (LogFileError, ConfigError) as exc:
        print(f"tsbot-tui: {one_line(str(exc), secrets)}", file=sys.stderr)
        return EXIT_USAGE
    # Refused with nothing left behind: the log file (and its directories) made for it are removed again.
    not_a_tty = [name for name, fd in STANDARD_STREAMS.items() if not _is_a_terminal(fd)]
    if not_a_tty:
        named = ", ".join(not_a_tty[:-1]) + " and " + not_a_tty[-1] if len(not_a_tty) > 1 else not_a_tty[0]
        print(
            f"tsbot-tui: needs a terminal: {named} {'is' if len(not_a_tty) == 1 else 'are'} not a tty; "
            "run the engine headless with `tsbot run`",
            file=sys.stderr,
        )
        _remove_unused(absent)
        return EXIT_USAGE
    logging.captureWarnings(True)
    # `kill -USR1 <pid>` writes every thread's stack next to the log: a hung dashboard can be diagnosed.
    # Owner-only, like the log: stacks show what the engine was doing.
    stacks_fd = os.open(
        log_file.with_name("tsbot-tui-stacks.txt"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600
    )
    stacks = open(stacks_fd, "a", encoding="utf-8")  # noqa: SIM115  (open for the process's lifetime)
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    app = DashboardApp(
        loaded.settings,
        engine=engine,
        secrets=secrets,
        log_file=str(log_file),
        freeze_gc_after_start=True,
        ui_state_file=log_file.with_name("tsbot-tui-ui.json"),
    )
    try:
        code = asyncio.run(_serve(app))
    finally:
        _remove_if_empty(stacks, log_file.with_name("tsbot-tui-stacks.txt"))
    summary = app.exit_summary()
    if summary:
        if not app.summary_said:
            print(summary, flush=True)
        if app.left_uncovered and code == EXIT_OK:
            code = EXIT_FAILED
    elif app.start_failure:
        print(f"tsbot-tui: {one_line(app.start_failure, secrets)}", file=sys.stderr)
    return code


# The dashboard reads keys from stdin and draws on stderr (Textual's choice). Its exit summary goes to stdout,
# which may well be a file (`tsbot-tui > shift.txt` keeps the exit line): not required to be a terminal.
STANDARD_STREAMS = {"stdin": 0, "stderr": 2}


def _remove_unused(created: Sequence[Path]) -> None:
    """Remove what was created for a run that never happened, deepest first: an empty file, then empty
    directories (anything written to meanwhile stays)."""
    logging.shutdown()
    for path in created:
        with contextlib.suppress(OSError):
            if path.is_file() and path.stat().st_size == 0:
                path.unlink()
            elif path.is_dir():
                path.rmdir()


def _is_a_terminal(fd: int) -> bool:
    """Without one (`tsbot-tui </dev/null >file`, cron, a service) the dashboard started the engine and
    traded, with nobody to see or press a key, and wrote screen codes into the file: it is refused first."""
    try:
        return os.isatty(fd)
    except OSError:  # closed
        return False


def load_ui_state(path: Path | None) -> dict[str, object]:
    """The saved screen choices ({} when none, or unreadable: a preference never stops the dashboard)."""
    if path is None:
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _remove_if_empty(stacks: IO[str], path: Path) -> None:
    """The stack dump file exists for `kill -USR1`; one nobody asked for is not left behind."""
    faulthandler.unregister(signal.SIGUSR1)
    stacks.close()
    with contextlib.suppress(OSError):
        if path.stat().st_size == 0:
            path.unlink()


async def _serve(app: DashboardApp) -> int:
    # A closed terminal (SIGHUP: tmux kill-session, ssh drop) or SIGTERM stops the engine like `q` does.
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, app.request_shutdown, signum)
    try:
        result = await app.run_async()
    finally:
        # However the app ended (quit, a closed terminal, a crash), the engine stops here, in its own loop.
        await app.stop_feed()
    if result is None:
        return EXIT_FAILED if app.return_code else app.exit_code
    return result


if __name__ == "__main__":
    raise SystemExit(main())

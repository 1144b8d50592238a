"""The top line: mode badge, venue and account, engine state, entries, running version and start time;
and the banner that says the code on disk is no longer the code that runs (F10)."""

from __future__ import annotations

from datetime import tzinfo

from textual import events
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, Static

from engine.code_watch import CodeDifference
from engine.engine import EngineSnapshot, EngineState
from tui import formatting

TIGHT_BELOW = 100  # columns: the header's compact form below this (`app.tcss`, `#status.-tight`)
MODE_BADGES = {"SIM": " SIM ", "LOCAL": " LOCAL ", "TESTNET": " TESTNET ", "LIVE": " ● LIVE · REAL MONEY "}


class StatusBar(Horizontal):
    """One line. State is shown as CSS classes (`-live`, `-testnet`, `-paused`, `-read-only` …)."""

    def __init__(self, *, tz: tzinfo | None, id: str | None = None):
        super().__init__(id=id)
        self._tz = tz
        self._shown: dict[str, str] = {}
        self._labels = {
            name: Label("", id=name)
            for name in ("mode-badge", "venue", "engine-state", "entries", "version", "engine-clock")
        }

    def compose(self) -> ComposeResult:
        yield from self._labels.values()

    def on_resize(self, event: events.Resize) -> None:
        # (the state's words follow at the next `show`)
        self.set_class(event.size.width < TIGHT_BELOW, "-tight")

    def show(
        self,
        snapshot: EngineSnapshot,
        *,
        watching: str | None = None,
        stopping: bool = False,
        looked_after: bool = True,
    ) -> None:
        """`looked_after`: watching, an engine holds the account and is heard (none: no entry goes, and
        "entries on" beside "no engine running" read as if one would, an operator)."""
        mode = snapshot.mode
        for name in ("SIM", "LOCAL", "TESTNET", "LIVE"):
            self.set_class(mode == name, f"-{name.lower()}")
        self.set_class(watching is not None, "-read-only")
        state = "stopping" if stopping else snapshot.state.value
        if state == "starting" and snapshot.start_waiting_for:
            # A start can wait minutes for the venue (a ban's end): "starting" alone read as a hang, and
            # the reason was only in the log panel, not shown at 80×24 (an operator). Shorter when tight:
            # the running version's start time (F10) was cut off at 80 columns.
            state = "starting: venue wait" if self.has_class("-tight") else "starting: waits for the venue"
        if watching is not None:
            state = f"read-only · {watching}"
        entries = ""
        # Watching, the account's record says it (a pause, the breaker's too, is persisted), once read.
        known = watching is None or bool(snapshot.taken_at)
        if known:
            entries = "entries on"
            if not looked_after:
                entries = "NO ENTRIES (no engine)"
            elif watching is None and (stopping or snapshot.state is not EngineState.RUNNING):
                # No signal is taken before the start has finished, nor once the stop has begun: a start
                # waiting out a ban for minutes read "entries on" (an operator). (The state beside it says
                # why: said twice, it pushed the version and start time off an 80-column header.)
                entries = "NO ENTRIES"
            elif snapshot.entries_paused:
                by = snapshot.entries_paused_by
                entries = f"ENTRIES PAUSED ({by})" if by and by != "operator" else "ENTRIES PAUSED"
            elif snapshot.entries_held is not None:  # the venue's word: every signal meanwhile is refused
                entries = f"ENTRIES HELD {formatting.duration(snapshot.entries_held[0])}"
        since = (
            formatting.since(snapshot.started_at, snapshot.taken_at, self._tz) if snapshot.started_at else "—"
        )
        self._set("mode-badge", MODE_BADGES.get(mode, f" {mode} "))
        self._set("venue", f"{snapshot.venue}/{snapshot.account}")
        self._set("engine-state", state)
        self._set("entries", entries)
        self._set("version", f"v{snapshot.version} started {since}")
        self._set(
            "engine-clock", formatting.clock_time(snapshot.taken_at, self._tz) if snapshot.taken_at else ""
        )
        self._labels["entries"].set_class(
            known and entries != "entries on",
            "-paused",
        )
        # "NO ENTRIES" beside a state that is not running says it twice: hidden where columns are short.
        self._labels["entries"].set_class(watching is None and entries == "NO ENTRIES", "-implied")
        self._labels["engine-state"].set_class(state != "running", "-not-running")
        self._labels["engine-state"].set_class(state == "running", "-running")

    def _set(self, widget_id: str, text: str) -> None:
        if self._shown.get(widget_id) != text:
            self._shown[widget_id] = text
            # The clock changes every second at the same width: no layout pass for it.
            self._labels[widget_id].update(text, layout=widget_id != "engine-clock")


# The least terminal the dashboard is laid out for: below it panels are cut or hidden (the health panel, the
# positions), and without a word the operator took what was left for all there is (an operator, at 40×12).
MIN_COLUMNS, MIN_ROWS = 80, 24


class SizeNotice(Static):
    """Hidden while the terminal is at least MIN_COLUMNS × MIN_ROWS; below, says what is cut and how to see
    it whole."""

    def show_size(self, columns: int, rows: int) -> None:
        small = columns < MIN_COLUMNS or rows < MIN_ROWS
        self.set_class(small, "-visible")
        self.update(
            f"terminal {columns}×{rows}, under {MIN_COLUMNS}×{MIN_ROWS}: panels are cut (h: health in full, "
            "u: uncovered positions)"
            if small
            else ""
        )


class CodeBanner(Static):
    """Hidden until the installed code differs from the code this process runs."""

    def show_difference(
        self, difference: CodeDifference | None, tz: tzinfo | None, *, whose: str = ""
    ) -> None:
        """`whose`: the process whose code it is, when not this one's (a read-only dashboard's engine)."""
        self.set_class(difference is not None, "-visible")
        if difference is None:
            self.update("")
            return
        when = formatting.date_time(difference.newest_change, tz) if difference.newest_change else "now"
        said = (
            f"{whose} runs older code than is on disk — restart it"
            if whose
            else "code on disk changed since start — restart needed"
        )
        self.update(f"{said}  ({difference.describe()}; changed {when})")

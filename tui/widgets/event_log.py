"""The timeout and error log: time, severity, symbol, operation, latency, outcome, detail.

Rows arrive one message at a time (they are rare next to price ticks). The symbol filter is shared with the
positions table (`/`); the severity filter cycles with `s` while the log has focus. The newest row is at the
bottom and the view follows it (the cursor on the newest row) until the operator moves up to read; moving
back to the last row, or `End`, follows again. Whether it follows is the operator's choice, kept as state:
a check of the scroll position would be wrong during a burst, when rows arrive faster than the view scrolls.
"""

from __future__ import annotations

import time
from collections import deque
from datetime import tzinfo
from typing import ClassVar

from rich.text import Text
from textual.binding import Binding, BindingType
from textual.events import MouseScrollUp
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey

from tui import formatting
from tui.feed import LogEntry
from tui.widgets.styling import component_style

COLUMNS = (
    ("time", "Time", 8),
    ("severity", "Sev", 4),
    ("symbol", "Symbol", 12),
    ("operation", "Operation", 17),
    ("latency", "Latency", 7),
    ("outcome", "Outcome", 8),
    ("detail", "Detail", 100),
)
# Where the columns above leave Detail less than MIN_DETAIL_WIDTH (80×24: 6 of 80 columns, the rest of the
# detail off screen), latency and outcome move into the detail's first words and the operation narrows.
NARROW_COLUMNS = (
    ("time", "Time", 8),
    ("severity", "Sev", 4),
    ("symbol", "Symbol", 12),
    ("operation", "Operation", 12),
    ("detail", "Detail", 100),
)
COUNT_WINDOW_SECONDS = 3600.0
SEVERITY_LEVELS = (("all", 0), ("warning+", 2), ("error+", 3))
MIN_DETAIL_WIDTH = 30
SEVERITY_SHORT = {"debug": "dbg", "info": "info", "warning": "WARN", "error": "ERR", "critical": "CRIT"}


class EventLog(DataTable[Text]):
    BINDINGS: ClassVar[list[BindingType]] = [
        # Named on the border, not in the footer: at 80 columns it pushed `q Quit` off the footer's edge.
        Binding(
            "s",
            "cycle_severity",
            "Severity",
            tooltip="Cycle the log between all, warnings and errors",
            show=False,
        ),
        Binding("escape", "leave", "Back", show=False),
        Binding("home", "scroll_top", "First row", show=False),
        Binding("end", "scroll_bottom", "Last row", show=False),
    ]
    COMPONENT_CLASSES: ClassVar[set[str]] = DataTable.COMPONENT_CLASSES | {
        "log--info",
        "log--warning",
        "log--error",
        "log--critical",
    }

    def __init__(self, *, tz: tzinfo | None, limit: int = 1000, id: str | None = None):
        super().__init__(id=id, cursor_type="row", zebra_stripes=False)
        self._tz = tz
        self._entries: deque[tuple[int, LogEntry]] = deque()
        self._limit = limit
        self._sequence = 0
        self._severity_index = 0
        self.needle = ""
        self.counts = {"warning": 0, "error": 0}  # in the last COUNT_WINDOW_SECONDS (they used to only grow)
        self._counted: deque[tuple[float, str]] = deque()
        self.following = True
        self.narrow = False  # the narrow columns (`on_resize`)

    def on_mount(self) -> None:
        self._set_columns(COLUMNS)
        self._detail_width = COLUMNS[-1][2]
        self._update_titles()
        self.set_interval(30.0, self._recount_and_show, name="log counts")

    def _set_columns(self, columns: tuple[tuple[str, str, int], ...]) -> None:
        self.clear(columns=True)
        for key, label, width in columns:
            self.add_column(label, key=key, width=width)

    def on_resize(self) -> None:
        """The detail column takes the width the panel has, and long details wrap: at 200 columns it stayed
        100 wide, and wherever it was wider than the panel the end of the line was cut off. Where the full
        columns leave it too little, the narrow ones are used."""
        room = self.size.width - 2 - 2  # the border, a scrollbar
        narrow = room - _fixed(COLUMNS) < MIN_DETAIL_WIDTH
        columns = NARROW_COLUMNS if narrow else COLUMNS
        width = max(MIN_DETAIL_WIDTH if not narrow else 10, room - _fixed(columns))
        if narrow != self.narrow:
            self.narrow = narrow
            self._set_columns(columns)
            self._detail_width = -1
        if width != self._detail_width:
            self._detail_width = width
            self.columns[ColumnKey("detail")].width = width
            self._rebuild()  # row heights are measured when rows are added

    def _now(self) -> float:
        """The engine's clock as the screen last painted it (so the window agrees with the rows' times)."""
        snapshot = getattr(self.app, "last_snapshot", None)
        return snapshot.taken_at if snapshot is not None and snapshot.taken_at else time.time()

    def _recount(self) -> None:
        # Rows arrive roughly in time order; a late one only delays its own expiry.
        horizon = self._now() - COUNT_WINDOW_SECONDS
        while self._counted and self._counted[0][0] < horizon:
            self._counted.popleft()
        self.counts = {"warning": 0, "error": 0}
        for at, key in self._counted:
            if at >= horizon:
                self.counts[key] += 1

    def _recount_and_show(self) -> None:
        self._recount()
        self._update_titles()

    @property
    def min_rank(self) -> int:
        return SEVERITY_LEVELS[self._severity_index][1]

    def add_entry(self, entry: LogEntry) -> None:
        self._sequence += 1
        self._entries.append((self._sequence, entry))
        if entry.severity in ("warning", "error", "critical"):
            self._counted.append((entry.at, "warning" if entry.severity == "warning" else "error"))
            self._recount()
        if len(self._entries) > self._limit:
            old_sequence, _ = self._entries.popleft()
            if str(old_sequence) in self.rows:
                self.remove_row(str(old_sequence))
        if self._shows(entry):
            self._add_row(self._sequence, entry)
            if self.following:
                self._follow()
        self._update_titles()

    def _follow(self) -> None:
        """The cursor on the newest row, and the view on it (once the table knows its new height)."""
        if self.row_count:
            self.move_cursor(row=self.row_count - 1, animate=False, scroll=True)
        self.scroll_end(animate=False, immediate=False, x_axis=False)

    # --- the operator's reading position: following the newest row or not --------------------------

    def action_cursor_up(self) -> None:
        super().action_cursor_up()
        self.following = self.cursor_row >= self.row_count - 1

    def action_cursor_down(self) -> None:
        super().action_cursor_down()
        self.following = self.cursor_row >= self.row_count - 1

    def action_page_up(self) -> None:
        super().action_page_up()
        self.following = self.cursor_row >= self.row_count - 1

    def action_page_down(self) -> None:
        super().action_page_down()
        self.following = self.cursor_row >= self.row_count - 1

    def action_scroll_top(self) -> None:
        """Home: the oldest row; the view stops following."""
        self.following = False
        if self.row_count:
            self.move_cursor(row=0, animate=False)
        self.scroll_to(y=0, animate=False)

    def action_scroll_bottom(self) -> None:
        """End: the newest row, and follow new ones again."""
        self.following = True
        self._follow()

    def _on_mouse_scroll_up(self, event: MouseScrollUp) -> None:
        self.following = False

    def set_filter(self, needle: str) -> None:
        needle = needle.strip().upper()
        if needle != self.needle:
            self.needle = needle
            self._rebuild()

    def action_cycle_severity(self) -> None:
        self._severity_index = (self._severity_index + 1) % len(SEVERITY_LEVELS)
        self._rebuild()

    def action_leave(self) -> None:
        self.screen.remove_class("-show-log")
        self.screen.query_one("#positions").focus()

    def shown_entries(self) -> list[LogEntry]:
        by_sequence = dict(self._entries)
        return [by_sequence[int(row.key.value)] for row in self.ordered_rows if row.key.value]

    def _shows(self, entry: LogEntry) -> bool:
        if entry.rank < self.min_rank:
            return False
        return not self.needle or self.needle in entry.symbol.upper()

    def _rebuild(self) -> None:
        self.clear()
        for sequence, entry in self._entries:
            if self._shows(entry):
                self._add_row(sequence, entry)
        if self.following:
            self._follow()
        self._update_titles()

    def _add_row(self, sequence: int, entry: LogEntry) -> None:
        style = component_style(self, f"log--{entry.severity}", partial=True) or ""
        latency = "" if entry.latency_seconds is None else f"{entry.latency_seconds:.1f}s"
        outcome = Text(entry.outcome, style=style if entry.outcome in ("failed", "retrying") else "")
        head = (
            Text(formatting.clock_time(entry.at, self._tz) if entry.at else ""),
            Text(SEVERITY_SHORT.get(entry.severity, entry.severity), style=style),
            Text(entry.symbol),
            # One line, cut with "…" (the row's detail wraps; a logger's name wrapped mid-word across three
            # lines, "engine.venue" / "s.stream_cli" / "ent", at 80×24: an operator). The whole name is in
            # the log file.
            Text(_short_operation(entry.operation), no_wrap=True, overflow="ellipsis"),
        )
        if self.narrow:  # outcome and latency lead the detail, set apart from it ("paused: new entries …")
            lead = Text(" ").join(t for t in (outcome, Text(latency)) if t.plain)
            detail = Text.assemble(lead, ": " if lead.plain else "", entry.detail)
            cells: tuple[Text, ...] = (*head, detail)
        else:
            cells = (*head, Text(latency, justify="right"), outcome, Text(entry.detail))
        self.add_row(*cells, key=str(sequence), height=None)  # a long detail wraps in its column

    def _update_titles(self) -> None:
        level = SEVERITY_LEVELS[self._severity_index][0]
        extra = f", symbol ~ {self.needle}" if self.needle else ""
        self.border_title = f"Timeouts and errors ({level}{extra}) s: severity"
        errors, warnings = self.counts["error"], self.counts["warning"]
        self.border_subtitle = (
            f"{errors} error{'' if errors == 1 else 's'}, {warnings} warning{'' if warnings == 1 else 's'} "
            "in the last hour"
        )


def _fixed(columns: tuple[tuple[str, str, int], ...]) -> int:
    """The width of every column but Detail, with each column's padding (one cell either side)."""
    return sum(width for _, _, width in columns[:-1]) + 2 * len(columns)


def _short_operation(operation: str) -> str:
    return operation.replace("trailing stop", "TS").replace("stop-loss", "SL")

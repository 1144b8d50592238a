"""The positions table, updated by row key (position id), changed cells only.

A frame compares each `PositionView` with the one it showed last (frozen dataclasses: one equality test),
formats only the rows that changed, and within them updates only the cells whose text changed. Rows are
added and removed by key; the order (uncovered first, then by symbol) is re-sorted only when the set of
rows or a row's coverage changed.

Uncovered rows are pinned: they are the table's fixed rows, drawn at the top whatever the scroll position,
so the operator cannot scroll (or be scrolled) away from them; the title carries their count. The cursor
stays at the top until the operator moves it; from then on it stays on the same position across re-sorts,
so `x` always closes the position the operator is looking at. Home and End go to the first and last row.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import ClassVar

from rich.style import Style
from rich.text import Text
from textual.binding import Binding, BindingType
from textual.events import Click
from textual.widgets import DataTable
from textual.widgets.data_table import RowDoesNotExist

from engine.engine import PositionView
from tui import formatting
from tui.widgets.styling import component_style

COLUMNS = (  # what decides an action first
    ("flag", " ", 1),
    ("symbol", "Symbol", 13),
    ("side", "Side", 5),
    ("pnl", "PnL %", 7),
    ("ts", "TS", 16),
    ("unprotected", "Unprot.", 7),
    ("stop", "Stop", 10),
    ("mark", "Mark", 10),
    ("entry", "Entry", 10),
    ("qty", "Qty", 9),
)
# Below NARROW_BELOW columns (80×24) every column shown is shown whole: side and the trailing state are
# abbreviated, entry and quantity are left to the detail view (Enter), rather than cutting Mark and the rest.
NARROW_BELOW = 100
NARROW_COLUMNS = (
    ("flag", " ", 1),
    ("symbol", "Symbol", 12),
    ("side", "S", 1),
    ("pnl", "PnL %", 7),
    ("ts", "TS", 14),
    ("unprotected", "Unprot", 6),
    ("stop", "Stop", 9),
    ("mark", "Mark", 9),
)
COLUMN_KEYS = tuple(key for key, _, _ in COLUMNS)
# From WIDE_FROM columns the room left over is not left empty: a last column shows each position's last
# error (what an operator otherwise opens the detail view for).
WIDE_FROM = 150
ERROR_COLUMN = ("error", "Last error")
UNCOVERED_FLAG = "!"
PROTECTING_FLAG = "·"

Cells = tuple[Text, ...]


class PositionsTable(DataTable[Text]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("home", "scroll_top", "First row", show=False),
        Binding("end", "scroll_bottom", "Last row", show=False),
    ]
    COMPONENT_CLASSES: ClassVar[set[str]] = DataTable.COMPONENT_CLASSES | {
        "positions--uncovered",
        "positions--missing",
        "positions--gain",
        "positions--loss",
        "positions--active-trail",
    }

    def __init__(self, *, id: str | None = None):
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self._views: dict[int, PositionView] = {}
        self._cells: dict[int, Cells] = {}
        self._uncovered: frozenset[int] = frozenset()
        self._styles: dict[str, Style] = {}
        self._styles_missing = False
        self.only_uncovered = False
        self.needle = ""
        self.total = 0
        self.uncovered_total = 0  # uncovered positions in the book, shown or filtered out
        self._uncovered_shown = 0
        self.narrow = False
        self.error_width: int | None = None
        self._reselect: int | None = None
        self._column_keys: tuple[str, ...] = COLUMN_KEYS
        self.follow_selection = False  # the operator moved the cursor: it stays on that position
        self.cell_updates = 0  # since mount: lets the benchmark and tests see that frames are incremental

    def on_mount(self) -> None:
        self._build_columns()
        self.app.theme_changed_signal.subscribe(self, lambda _theme: self._restyle())

    def on_resize(self) -> None:
        narrow = self.size.width < NARROW_BELOW
        error_width = self._error_width_for(self.size.width)
        if narrow != self.narrow or error_width != self.error_width:
            self.narrow = narrow
            self.error_width = error_width
            self._build_columns()

    @staticmethod
    def _error_width_for(width: int) -> int | None:
        if width < WIDE_FROM:
            return None
        used = sum(w for _, _, w in COLUMNS) + 2 * (len(COLUMNS) + 1)  # cell padding, the new column's too
        return max(20, width - 2 - 2 - used)  # the border, a vertical scrollbar

    def _build_columns(self) -> None:
        """(Re)build the columns for the width; rows are added again by the next frame."""
        columns = NARROW_COLUMNS if self.narrow else COLUMNS
        if self.error_width is not None and not self.narrow:
            columns = (*columns, (*ERROR_COLUMN, self.error_width))
        selected = self.selected_position_id()
        self.clear(columns=True)
        self._cells.clear()
        self._views.clear()
        self._column_keys = tuple(key for key, _, _ in columns)
        for key, label, width in columns:
            self.add_column(label, key=key, width=width)
        self._reselect = selected

    # --- what the app calls --------------------------------------------------------------------------

    def sync(self, positions: Sequence[PositionView], uncovered_ids: Collection[int]) -> None:
        """Bring the table to `positions` (filtered by `only_uncovered` and `needle`).

        Rows outside the viewport keep their last text until they scroll into view (at most one frame
        later): formatting and updating 1 000 rows that nobody sees would cost the engine's event loop
        ~40 ms a frame. Their coverage flag is always current, because it decides the order.
        """
        if not self._styles or self._styles_missing:
            self._load_styles()
        self._uncovered = frozenset(uncovered_ids)
        self.total = len(positions)
        self.uncovered_total = sum(1 for p in positions if p.position_id in self._uncovered)
        wanted = [p for p in positions if self._wanted(p)]
        wanted_ids = {p.position_id for p in wanted}
        reorder = False
        selected = self.selected_position_id()
        for position_id in [k for k in self._cells if k not in wanted_ids]:
            self.remove_row(str(position_id))
            del self._cells[position_id]
            self._views.pop(position_id, None)
            reorder = True
        visible = self._visible_ids()
        for view in wanted:
            position_id = view.position_id
            shown = self._cells.get(position_id)
            if shown is not None:
                if self._views.get(position_id) == view and not self._flag_is_stale(position_id):
                    continue
                if position_id not in visible and shown[0].plain == self._flag_text(view):
                    continue  # off screen and still in the same place: formatted when it scrolls in
            cells = self._format(view)
            self._views[position_id] = view
            self._cells[position_id] = cells
            if shown is None:
                self.add_row(*cells, key=str(position_id))
                reorder = True
                continue
            for column, (before, after) in enumerate(zip(shown, cells, strict=True)):
                if before != after:
                    self.update_cell(str(position_id), self._column_keys[column], after)
                    self.cell_updates += 1
            if shown[0].plain != cells[0].plain:
                reorder = True
        if reorder:
            self.sort("flag", "symbol", key=_order)
            if self._reselect is not None:  # the columns were rebuilt: back to the operator's position
                selected, self._reselect = self._reselect, None
            if self.follow_selection:
                self._keep_cursor_on(selected)
            elif self.cursor_row != 0 and self.row_count:
                self.move_cursor(row=0, animate=False)
        self._pin_uncovered()
        self._update_titles()

    def _pin_uncovered(self) -> None:
        """The uncovered rows (first in the order) are the fixed rows: always on screen. If there are more
        than the viewport holds, two rows stay scrollable and the title says how many are not pinned."""
        uncovered = self._uncovered_shown = sum(
            1 for position_id in self._cells if position_id in self._uncovered
        )
        room = max(1, self.scrollable_content_region.height - 1 - 2)  # the header, two scrollable rows
        pinned = min(uncovered, room)
        if pinned != self.fixed_rows:
            self.fixed_rows = pinned

    def _visible_ids(self) -> set[int]:
        """Position ids of the rows in the viewport (plus a screenful either side, for scrolling), and the
        pinned rows, which are on screen wherever the view is."""
        height = max(1, self.scrollable_content_region.height)
        first = max(0, int(self.scroll_y) - height)
        rows = [
            *self.ordered_rows[: self.fixed_rows],
            *self.ordered_rows[first : int(self.scroll_y) + 2 * height],
        ]
        return {int(row.key.value) for row in rows if row.key.value is not None}

    # --- the operator's cursor -----------------------------------------------------------------------

    def action_cursor_up(self) -> None:
        self.follow_selection = True
        super().action_cursor_up()

    def action_cursor_down(self) -> None:
        self.follow_selection = True
        super().action_cursor_down()

    def action_page_up(self) -> None:
        self.follow_selection = True
        super().action_page_up()

    def action_page_down(self) -> None:
        self.follow_selection = True
        super().action_page_down()

    def action_scroll_top(self) -> None:
        """Home: the first row, and the view back at the top (the cursor no longer follows a position)."""
        self.follow_selection = False
        if self.row_count:
            self.move_cursor(row=0, animate=False)
        self.scroll_to(y=0, animate=False)

    def action_scroll_bottom(self) -> None:
        """End: the last row."""
        self.follow_selection = True
        if self.row_count:
            self.move_cursor(row=self.row_count - 1, animate=False)

    def _on_click(self, _event: Click) -> None:
        # Textual runs DataTable's own click handler too (handlers are dispatched along the MRO).
        self.follow_selection = True

    def set_filter(self, *, only_uncovered: bool | None = None, needle: str | None = None) -> None:
        if only_uncovered is not None:
            self.only_uncovered = only_uncovered
        if needle is not None:
            self.needle = needle.strip().upper()
        self._update_titles()

    def selected_position_id(self) -> int | None:
        if not self.row_count:
            return None
        try:
            row_key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        except Exception:
            return None
        return int(row_key.value) if row_key.value is not None else None

    def selected_view(self) -> PositionView | None:
        position_id = self.selected_position_id()
        return None if position_id is None else self._views.get(position_id)

    def shown_symbols(self) -> list[str]:
        """Symbols in display order (tests and the benchmark read the table through this)."""
        return [self._cells[int(row.key.value)][1].plain for row in self.ordered_rows if row.key.value]

    def row_text(self, position_id: int) -> str:
        cells = self._cells.get(position_id)
        return " ".join(c.plain for c in cells) if cells else ""

    # --- internals -----------------------------------------------------------------------------------

    def _wanted(self, view: PositionView) -> bool:
        if self.only_uncovered and view.covered:
            return False
        return not self.needle or self.needle in view.symbol

    def _flag_is_stale(self, position_id: int) -> bool:
        shown = self._cells.get(position_id)
        return shown is None or (shown[0].plain == UNCOVERED_FLAG) != (position_id in self._uncovered)

    def _flag_text(self, view: PositionView) -> str:
        if view.position_id in self._uncovered:
            return UNCOVERED_FLAG
        return " " if view.covered else PROTECTING_FLAG

    def _keep_cursor_on(self, position_id: int | None) -> None:
        if position_id is None:
            return
        try:
            row = self.get_row_index(str(position_id))
        except RowDoesNotExist:
            return
        if row != self.cursor_row:
            self.move_cursor(row=row, animate=False, scroll=False)

    def _update_titles(self) -> None:
        title = f"Positions {self.total}"
        if self.uncovered_total:
            title += f" · {self.uncovered_total} UNCOVERED"
            hidden = self._uncovered_shown - self.fixed_rows
            if hidden > 0:
                title += f" ({hidden} below the pinned ones)"
        what = "uncovered only" if self.only_uncovered else ""
        if self.needle:
            what = f"{what}, symbol ~ {self.needle}" if what else f"symbol ~ {self.needle}"
        if what:
            title += f" · showing {self.row_count} ({what})"
        if self.only_uncovered and not self.row_count:  # an empty table says why it is empty
            title += " · no uncovered position" + (" matches" if self.needle else "") + " (u: show all)"
        self.border_title = title

    def _load_styles(self) -> None:
        styles = {
            name: component_style(self, f"positions--{name}", partial=True)
            for name in ("uncovered", "missing", "gain", "loss", "active-trail")
        }
        missing = None in styles.values()
        if self._styles_missing and not missing:
            self._views.clear()  # rows formatted plain before the stylesheet applied: format them again
        # Not applied yet (a paint before the stylesheet): plain this frame, read again next frame.
        self._styles_missing = missing
        self._styles = {name: style or Style() for name, style in styles.items()}

    def _restyle(self) -> None:
        """A theme change: styles are baked into cell text, so re-format every row next frame."""
        self._styles = {}
        self._views.clear()

    def _format(self, view: PositionView) -> Cells:
        s = self._styles
        uncovered = view.position_id in self._uncovered
        flag = Text(self._flag_text(view), style=s["uncovered"] if uncovered else "")
        symbol = Text(view.symbol, style=s["uncovered"] if uncovered else "")
        pnl_style = ""
        if view.pnl_percent is not None and view.pnl_percent:
            pnl_style = s["gain"] if view.pnl_percent > 0 else s["loss"]
        # Right-aligned like every other price column (it was the one left-aligned number).
        if view.has_stop_loss:
            stop = Text(formatting.price(view.stop_loss_price), justify="right")
        else:
            stop = Text("missing", style=s["missing"], justify="right")
        if self.narrow:
            return (
                flag,
                symbol,
                Text(view.side[:1].upper()),
                Text(formatting.signed_percent(view.pnl_percent), style=pnl_style, justify="right"),
                _trailing_cell(view, s, short=True),
                Text(
                    formatting.duration(view.unprotected_seconds) if not view.covered else "",
                    style=s["uncovered"] if uncovered else "",
                    justify="right",
                ),
                stop,
                _mark_cell(view, s),
            )
        return (
            flag,
            symbol,
            Text(view.side.upper()),
            Text(formatting.signed_percent(view.pnl_percent), style=pnl_style, justify="right"),
            _trailing_cell(view, s),
            Text(
                formatting.duration(view.unprotected_seconds) if not view.covered else "",
                style=s["uncovered"] if uncovered else "",
                justify="right",
            ),
            stop,
            _mark_cell(view, s),
            Text(formatting.price(view.entry_price), justify="right"),
            Text(formatting.price(view.quantity), justify="right"),
        ) + (
            # Red only while it matters: a covered position's last error is history, not an alarm.
            (Text(view.last_error or "", style=s["missing"] if view.last_error and not view.covered else ""),)
            if self.error_width
            else ()
        )


def _mark_cell(view: PositionView, styles: dict[str, Style]) -> Text:
    """The mark; `~` before it (and the alarm colour) when it is older than `health.stale_mark_seconds`."""
    if view.mark_stale:
        return Text("~" + formatting.price(view.mark_price), style=styles["missing"], justify="right")
    return Text(formatting.price(view.mark_price), justify="right")


def _trailing_cell(view: PositionView, styles: dict[str, Style], *, short: bool = False) -> Text:
    """The trailing stop's state; `short` (narrow terminals) says the same in at most 14 characters."""
    if not view.has_trailing_stop:
        return Text("MISSING", style=styles["missing"])
    phase = view.trailing_phase
    if phase == "waiting" or (phase == "native" and (view.distance_to_activation_percent or 0) > 0):
        distance = view.distance_to_activation_percent
        word = "wait" if short else "waiting"
        return Text(word + ("" if distance is None else f" {distance:+.2f}%"))
    if phase == "native":
        return Text("venue trail" if short else "venue trailing", style=styles["active-trail"])
    stop = view.trailing_stop_price
    if short:
        return Text(f"{phase[:3]} {formatting.price(stop)}", style=styles["active-trail"])
    return Text(f"{phase} @ {formatting.price(stop)}", style=styles["active-trail"])


def _order(values: tuple[Text, Text]) -> tuple[bool, bool, str]:
    flag, symbol = values
    return (flag.plain != UNCOVERED_FLAG, flag.plain != PROTECTING_FLAG, symbol.plain)

"""The positions table, updated by row key (position id), changed cells only, full views of what is shown.

Every frame the table orders and filters every open position from its cheap facts (id, symbol, covered: the
snapshot's `rows`) and asks the engine for full `PositionView`s of the rows on screen only
(`rows_on_screen`, the snapshot's `views_of`): building and comparing 1 000 views a frame was most of a
frame's cost on the engine's event loop. It compares each view with the one it showed last (frozen
dataclasses: one equality test), formats only the rows that changed, and within them updates only the cells
whose text changed; the changed lines are rendered a few at a time, each batch drawn by a screen update of
its own (`_repaint_slice`). Rows are added and removed by key; the order is uncovered first, then still
protecting, then by symbol (and id).

Uncovered rows are pinned: they are the table's fixed rows, drawn at the top whatever the scroll position,
so the operator cannot scroll (or be scrolled) away from them; the title carries their count. The cursor
stays at the top until the operator moves it; from then on it stays on the same position across re-sorts,
so `x` always closes the position the operator is looking at. Home and End go to the first and last row.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from rich.cells import cell_len, set_cell_size
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual._two_way_dict import TwoWayDict
from textual.binding import Binding, BindingType
from textual.coordinate import Coordinate
from textual.events import Click
from textual.geometry import Region
from textual.message import Message
from textual.strip import Strip
from textual.timer import Timer
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey, RowDoesNotExist, RowKey

from engine.engine import ENTRY_IN_DOUBT_PHASE, PositionView
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
# The wide layout needs its columns, a cell's padding either side of each, the border and a vertical scrollbar
# (a fixed 100 cut the last column between 100 and 111: a quantity of 1001 read "100").
CELL_PADDING = 1  # DataTable's default, either side of a cell
NARROW_BELOW = sum(width + 2 * CELL_PADDING for _, _, width in COLUMNS) + 2 + 2
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
ROWS_FORMATTED_AT_ONCE = 3  # by sync(defer=True); the rest in the frame's next steps (sync_deferred)
DEFERRED_ROWS_PER_STEP = 8  # rows a frame's later step formats (sync_deferred's limit, from the app)
VIEW_MARGIN = 1  # rows either side of the viewport with full views (a scroll further paints a frame at once)
LINES_PER_SLICE = 3  # changed table lines redrawn per screen update (see PositionsTable._repaint_slice)
SLICE_SECONDS = 0.02  # between two slices: longer than a screen update (Textual draws at most 60 a second)
# Before a frame's first slice, and from a slice (which renders its lines) to the refresh that has the screen
# update draw them: timers, so each runs in a callback of its own, after the engine's work that fell due
# meanwhile (Textual's sleep does not wait at all below half a millisecond). See _repaint_slice.
STEP_SECONDS = 0.002
PROTECTING_FLAG = "·"

Cells = tuple[Text, ...]


class PositionRow(Protocol):
    """What the table needs of every open position, on screen or not (a `PositionCoverage` of the snapshot's
    `rows`, or a `PositionView`)."""

    @property
    def position_id(self) -> int: ...

    @property
    def symbol(self) -> str: ...

    @property
    def covered(self) -> bool: ...


@dataclass(slots=True)
class _Plan:
    key: tuple[object, ...]
    rows: object  # held: the key has its id
    order: list[int]  # position ids shown, in display order
    flags: dict[int, str]
    symbols: dict[int, str]
    uncovered_total: int  # uncovered positions in the book, shown or filtered out
    uncovered_shown: int
    ranked: list[tuple[int, str, int]]  # (rank, symbol, id) in the facts' order: unchanged, so is the order


class PositionsTable(DataTable[Text]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("home", "scroll_top", "First row", show=False),
        Binding("end", "scroll_bottom", "Last row", show=False),
        # (a filter kept with enter is cleared from the table too, not only from its box: an operator)
        Binding("escape", "app.clear_filters", "Clear filters", show=False),
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
        self._column_key_objects: tuple[ColumnKey, ...] = ()
        self.follow_selection = False  # the operator moved the cursor: it stays on that position
        self.cell_updates = 0  # since mount: lets the benchmark and tests see that frames are incremental
        self.rows_added = 0  # since mount (the app freezes a bulk of new rows out of the collector's passes)
        # Rendered lines and cells by row (see "rendering" below); a row's version moves when its cells do.
        self._row_versions: dict[str | None, int] = {}
        self._versions_given = 0
        # By row key: a row's slots go with it (one dict operation when 990 rows are filtered out).
        self._line_strips: dict[str | None, dict[int, tuple[tuple[object, ...], Strip]]] = {}
        self._cell_lines: dict[
            str | None, dict[str | None, tuple[Text, tuple[object, ...], list[list[Segment]]]]
        ] = {}
        self.lines_rendered = 0  # since mount: table lines rendered anew (the rest came from the cache)
        self._row_keys: dict[int, RowKey] = {}
        self._order: list[int] = []
        self._last_plan: _Plan | None = None
        self._synced_plan: _Plan | None = None  # the plan the last sync brought every row to
        self._window: tuple[int, int] | None = None  # (top, height) when the last frame's views were chosen
        self._frame_asked = False
        self.redraw_within = (
            0.25  # seconds: the frame interval (the app sets it); changed rows redrawn by then
        )
        self._deferred: list[PositionView] = []  # changed rows sync(defer=True) left to sync_deferred
        self._title = ""
        # Position ids whose changed row is not redrawn yet, in the order they changed (a dict: ordered).
        self._repaint_rows: dict[int, None] = {}
        self._repaint_timer: Timer | None = None
        self._rendered_lines: list[int] = []  # rendered by a slice, for _refresh_rendered to refresh
        self._refresh_timer: Timer | None = None
        self._base_style: Style | None = None  # the widget's rich style, until its styles change
        self._row_styles: dict[tuple[int, Style], Style] = {}  # by (header / fixed / even / odd, base)
        self._pass_width: int | None = None
        self._meta_styles: dict[tuple[int, int], Style] = {}

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
        self.fixed_rows = 0  # no row left to pin until the next frame adds them again
        self.clear(columns=True)
        self._forget_renders()
        self._cells.clear()
        self._views.clear()
        self._row_keys.clear()
        self._synced_plan = None  # every row is to be added again
        self._order = []
        self._column_keys = tuple(key for key, _, _ in columns)
        self._column_key_objects = tuple(
            self.add_column(label, key=key, width=width) for key, label, width in columns
        )
        self._reselect = selected

    # --- what the app calls --------------------------------------------------------------------------

    def rows_on_screen(self, rows: Sequence[PositionRow], uncovered_ids: Collection[int]) -> set[int]:
        """Which positions this frame needs a full view of (the engine builds only those: a `ViewSelector`).

        From every position's facts, the same order and filter `sync` applies: the pinned (uncovered) rows,
        the rows in the viewport with VIEW_MARGIN rows either side (for scrolling; a scroll past them paints
        a frame at once), and the cursor's row. Before the table has a size: every row."""
        plan = self._plan(rows, uncovered_ids)
        order = plan.order
        height = self.scrollable_content_region.height
        if height <= 0:
            return set(order)
        top = int(self.scroll_y)
        margin = VIEW_MARGIN
        ids = set(order[: min(plan.uncovered_shown, self._pin_room())])
        ids.update(order[max(0, top - margin) : top + height + margin])
        selected = self.selected_position_id()
        if selected is not None:
            ids.add(selected)
        self._window = (top, height)
        return ids

    def sync(
        self,
        rows: Sequence[PositionRow],
        uncovered_ids: Collection[int],
        views: Sequence[PositionView] = (),
        *,
        defer: bool = False,
    ) -> None:
        """Bring the table to `rows` (every open position, filtered by `only_uncovered` and `needle`).

        Each row of `views` that changed is formatted again, and within it only the cells whose text changed
        are updated. A row without a view (off screen: see `rows_on_screen`) keeps its last text, or shows
        its symbol only if it is new, until it comes into view; its flag, which decides the order, is
        always current. With `defer`, the changed rows past the first ROWS_FORMATTED_AT_ONCE (never a new
        row or one whose flag changed: the order, the pinned rows and the titles are always this
        snapshot's) are left to `sync_deferred`, which the app calls once the event loop has run what fell
        due meanwhile: formatting a screenful of rows in one go blocked the engine's ticks. (A pinned row
        whose flag did not change is deferred like any other: it keeps its place, and its text follows
        a step later in the same frame; pinned rows come first in the order, so they are formatted first.)
        """
        self._deferred = []
        if not self._styles or self._styles_missing:
            self._load_styles()
        self._frame_asked = False
        self._uncovered = frozenset(uncovered_ids)
        plan = self._plan(rows, self._uncovered)
        self.total = len(rows)
        self.uncovered_total = plan.uncovered_total
        flags = plan.flags
        by_id = {view.position_id: view for view in views}
        changed: dict[int, None] = {}  # in display order
        formatted = 0
        reorder = False
        selected = self.selected_position_id()
        if plan is self._synced_plan:
            # The same rows with the same flags as the last sync: the rows without a view have nothing new
            # to show, and walking all 1 000 of them was most of this step (bench/tui_render.py).
            order = [position_id for position_id in plan.order if position_id in by_id]
        else:
            order = plan.order
            for position_id in [k for k in self._cells if k not in flags]:
                self.remove_row(str(position_id))
                self._forget_row(str(position_id))
                del self._cells[position_id]
                self._views.pop(position_id, None)
                self._row_keys.pop(position_id, None)
                reorder = True
        self._synced_plan = plan
        for position_id in order:
            flag = flags[position_id]
            shown = self._cells.get(position_id)
            view = by_id.get(position_id)
            if view is None:
                if shown is None:  # new and off screen: its symbol now, the rest once it is in view
                    cells = self._placeholder(plan.symbols[position_id], flag)
                elif shown[0].plain != flag:
                    cells = (*self._placeholder(plan.symbols[position_id], flag)[:2], *shown[2:])
                else:
                    continue
            elif shown is not None and shown[0].plain == flag and self._views.get(position_id) == view:
                continue
            elif defer and shown is not None and shown[0].plain == flag:
                if formatted >= ROWS_FORMATTED_AT_ONCE:
                    self._deferred.append(view)
                    continue
                formatted += 1
                cells = self._format(view)
                self._views[position_id] = view
            else:
                cells = self._format(view)
                self._views[position_id] = view
            self._cells[position_id] = cells
            row_key = str(position_id)
            if shown is None:
                self._row_keys[position_id] = self.add_row(*cells, key=row_key)
                self.rows_added += 1
                self._row_changed(row_key)
                reorder = True
                continue
            self._update_cells(position_id, shown, cells, changed)
        self._cells_changed(changed)
        if reorder or plan.order != self._order:
            self._apply_order(plan.order)
            if self._reselect is not None:  # the columns were rebuilt: back to the operator's position
                selected, self._reselect = self._reselect, None
            if self.follow_selection:
                self._keep_cursor_on(selected)
            elif self.cursor_row != 0 and self.row_count:
                self.move_cursor(row=0, animate=False)
        self._pin_uncovered(plan)
        self._update_titles()

    def sync_deferred(self, limit: int | None = None) -> bool:
        """The rows `sync(defer=True)` left, in display order, at most `limit` of them: each formatted from
        its view if it is still shown with the same flag (else the next frame has it). True while rows are
        left (the app calls again after the event loop has run what fell due meanwhile)."""
        if limit is None or limit >= len(self._deferred):
            deferred, self._deferred = self._deferred, []
        else:
            deferred, self._deferred = self._deferred[:limit], self._deferred[limit:]
        plan = self._last_plan
        if plan is None:
            self._deferred = []
            return False
        changed: dict[int, None] = {}  # in display order
        for view in deferred:
            position_id = view.position_id
            shown = self._cells.get(position_id)
            if shown is None or shown[0].plain != plan.flags.get(position_id):
                continue
            cells = self._format(view)
            self._views[position_id] = view
            self._cells[position_id] = cells
            self._update_cells(position_id, shown, cells, changed)
        self._cells_changed(changed)
        return bool(self._deferred)

    def _update_cells(self, position_id: int, shown: Cells, cells: Cells, changed: dict[int, None]) -> None:
        data = self._data[self._row_keys[position_id]]
        for column, (before, after) in enumerate(zip(shown, cells, strict=True)):
            if not _drawn_alike(before, after):
                # What `update_cell` does, without its repaint of the whole table (see _repaint_slice).
                data[self._column_key_objects[column]] = after
                self.cell_updates += 1
                if position_id not in changed:
                    changed[position_id] = None
                    self._row_changed(str(position_id))

    def _cells_changed(self, changed: dict[int, None]) -> None:
        if not changed:
            return
        # DataTable's own render caches (behind ours) are stale for these rows. Not by bumping its update
        # count: that also rebuilds its index of 1 000 row offsets, in the next screen update.
        self._line_cache.clear()
        self._cell_render_cache.clear()
        self._row_render_cache.clear()
        self._row_renderable_cache.clear()
        self._repaint_rows.update(changed)
        if self._repaint_timer is None:
            self._repaint_timer = self.set_timer(STEP_SECONDS, self._repaint_slice, name="repaint rows")

    def _repaint_slice(self) -> None:
        """Repaint the changed rows on screen, LINES_PER_SLICE lines per screen update, the next slice a
        screen update later: a screen update that redraws every row at once blocks the event loop, and with
        it the engine, for ~15 ms at 1 000 positions (bench/tui_render.py). Rows go in the order they
        changed (a row changed again keeps its place), so none waits behind rows that change every frame,
        and a slice takes more lines when that is what redraws them all within `redraw_within` (the frame
        interval). A row off screen is dropped here (scrolling repaints the whole view, from the rows'
        current text).

        The slice renders its lines here (`_render_ahead`) and refreshes them STEP_SECONDS later
        (`_refresh_rendered`): the screen update that a refresh brings about follows it at once (before
        the engine's work that fell due meanwhile), so rendering the lines in the same callback as the
        refresh, or in the update, blocked the engine for both."""
        self._repaint_timer = None
        pending = self._repaint_rows
        if not pending:
            return
        header = self.header_height if self.show_header else 0
        fixed = self.fixed_rows
        top = int(self.scroll_y)
        height = self.size.height
        # More lines per slice when there are more rows than slices before the next frame.
        slices = max(1, int(self.redraw_within * 0.8 / SLICE_SECONDS))
        per_slice = max(LINES_PER_SLICE, -(-len(pending) // slices))
        lines: list[int] = []
        for position_id in list(pending):
            if len(lines) == per_slice:
                break
            del pending[position_id]
            row_key = self._row_keys.get(position_id)
            index = None if row_key is None else self._row_locations.get(row_key)
            if index is None:
                continue
            y = header + index if index < fixed else header + index - top
            if (index < fixed or y >= header + fixed) and y < height:
                lines.append(y)
        if lines:
            self._render_ahead(lines)
            self._rendered_lines.extend(lines)
            if self._refresh_timer is None:
                self._refresh_timer = self.set_timer(
                    STEP_SECONDS, self._refresh_rendered, name="refresh rows"
                )
        if pending:
            self._repaint_timer = self.set_timer(SLICE_SECONDS, self._repaint_slice, name="repaint rows")

    def _render_ahead(self, lines: list[int]) -> None:
        """Render these lines (content y) as the next screen update will, into our line cache, where that
        update finds them (`_render_line`; their key has everything that decides their look, so a line
        that changes again meanwhile is rendered anew)."""
        if not self.region or not self.display:
            return
        if self._base_style is None:
            self._base_style = self.rich_style
        self._pseudo_class_state = self.get_pseudo_class_state()  # as DataTable's render_lines sets it
        self._pass_width = self.size.width
        try:
            for y in lines:
                self.render_line(y)
        finally:
            self._pass_width = None

    def _refresh_rendered(self) -> None:
        """Refresh the lines the slices rendered, and style them as the next screen update would (Textual's
        cache of the widget's styled lines, from ours: `render_lines` is what the compositor calls), so
        that update has only to compose them."""
        self._refresh_timer = None
        width, height = self.size
        lines = sorted({y for y in self._rendered_lines if y < height})  # the table may have shrunk
        self._rendered_lines = []
        if not lines:
            return  # (a refresh without regions would repaint the whole table)
        self.refresh(*(Region(0, y, width, 1) for y in lines))
        region = self.region
        if not region or not self.display:
            return
        top = self.content_offset.y
        start = previous = lines[0]
        for y in [*lines[1:], None]:  # one call for each run of adjacent lines
            if y is not None and y == previous + 1:
                previous = y
                continue
            self.render_lines(Region(0, top + start, region.width, previous - start + 1))
            if y is not None:
                start = previous = y

    def _plan(self, rows: Sequence[PositionRow], uncovered_ids: Collection[int]) -> _Plan:
        """The rows shown, their flags and their order (uncovered first, then those still protecting, each
        by symbol), from every position's facts; computed once per snapshot (`rows_on_screen` and `sync`
        of one frame share it)."""
        uncovered = uncovered_ids if isinstance(uncovered_ids, frozenset) else frozenset(uncovered_ids)
        key = (id(rows), uncovered, self.only_uncovered, self.needle)
        plan = self._last_plan
        if plan is not None and plan.key == key and plan.rows is rows:
            return plan
        flags: dict[int, str] = {}
        symbols: dict[int, str] = {}
        ranked: list[tuple[int, str, int]] = []
        uncovered_total = uncovered_shown = 0
        only_uncovered, needle = self.only_uncovered, self.needle
        for row in rows:
            position_id = row.position_id
            covered = row.covered
            if position_id in uncovered:
                uncovered_total += 1
                flag, rank = UNCOVERED_FLAG, 0
            elif covered:
                flag, rank = " ", 2
            else:
                flag, rank = PROTECTING_FLAG, 1
            if (only_uncovered and covered) or (needle and needle not in row.symbol):
                continue
            uncovered_shown += rank == 0
            flags[position_id] = flag
            symbols[position_id] = row.symbol
            ranked.append((rank, row.symbol, position_id))
        if plan is not None and plan.ranked == ranked:  # the same rows in the same states: the same order
            order = plan.order
        else:
            order = [position_id for _, _, position_id in sorted(ranked)]
        plan = _Plan(key, rows, order, flags, symbols, uncovered_total, uncovered_shown, ranked)
        self._last_plan = plan
        return plan

    def _apply_order(self, order: list[int]) -> None:
        """The rows in `order` (what `DataTable.sort` does, from our own order: it includes off-screen rows
        whose cells are not current, and ties go by position id)."""
        keys = self._row_keys
        self._row_locations = TwoWayDict(
            {keys[position_id]: index for index, position_id in enumerate(order)}
        )
        self._order = order
        self._update_count += 1
        self.refresh()

    def _placeholder(self, symbol: str, flag: str) -> Cells:
        style = self._styles.get("uncovered", "") if flag == UNCOVERED_FLAG else ""
        cells = (Text(flag, style=style), Text(symbol, style=style))
        return cells + tuple(Text("") for _ in self._column_keys[2:])

    def _pin_room(self) -> int:
        return max(1, self.scrollable_content_region.height - 1 - 2)  # the header, two scrollable rows

    def _pin_uncovered(self, plan: _Plan) -> None:
        """The uncovered rows (first in the order) are the fixed rows: always on screen. If there are more
        than the viewport holds, two rows stay scrollable and the title says how many are not pinned."""
        self._uncovered_shown = plan.uncovered_shown
        pinned = min(plan.uncovered_shown, self._pin_room())
        if pinned != self.fixed_rows:
            self.fixed_rows = pinned

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        """Scrolled past the rows the last frame formatted: a frame now, not at the next tick."""
        super().watch_scroll_y(old_value, new_value)
        window = self._window
        if window is None or self._frame_asked:
            return
        top, height = window
        margin = VIEW_MARGIN
        if (
            new_value < top - margin
            or new_value + self.scrollable_content_region.height > top + height + margin
        ):
            self._frame_asked = True
            self.post_message(self.FrameWanted())

    class FrameWanted(Message):
        """Rows came into view that the last frame did not format."""

    # --- rendering ------------------------------------------------------------------------------------
    # DataTable keys every render cache (cells, rows, lines) on one counter that each `update_cell` bumps:
    # one changed price re-rendered every visible cell of the table through rich, most of a frame's cost
    # at 1 000 positions (bench/tui_render.py). These two caches are keyed by what decides a line's or a
    # cell's look instead, one slot per row line and per cell, so a frame renders the rows that changed.

    def render_lines(self, crop: Region) -> list[Strip]:
        """A compositor pass. The widget's style and the row styles are resolved through the DOM once until
        the table's styles change (`notify_style_update`), not for every line: that was a third of a line's
        cost, and a screen update now redraws a few lines at a time (`_repaint_slice`)."""
        if self._base_style is None:
            self._base_style = self.rich_style
        self._pass_width = self.size.width
        try:
            return super().render_lines(crop)
        finally:
            self._pass_width = None

    def render_line(self, y: int) -> Strip:
        """DataTable's `render_line` (the header and the pinned rows fixed, the rest scrolled), for rows one
        line high (every row here is), with the resolved style."""
        base_style = self._base_style if self._base_style is not None else self.rich_style
        width = self._pass_width if self._pass_width is not None else self.size.width
        scroll_x, scroll_y = self.scroll_offset
        fixed_height = self.fixed_rows + (self.header_height if self.show_header else 0)
        if y >= fixed_height:
            y += scroll_y
        return self._render_line(y, scroll_x, scroll_x + width, base_style)

    def _get_row_style(self, row_index: int, base_style: Style) -> Style:
        kind = -1 if row_index == -1 else (0 if row_index < self.fixed_rows else 1 + row_index % 2)
        style = self._row_styles.get((kind, base_style))
        if style is None:
            style = self._row_styles[(kind, base_style)] = super()._get_row_style(row_index, base_style)
        return style

    def _cell_meta(self, row_index: int, column_index: int) -> Style:
        """The mouse metadata of a cell, one Style object per cell: rich caches style sums by identity, and a
        new metadata Style per render missed that cache every time."""
        key = (row_index, column_index)
        meta = self._meta_styles.get(key)
        if meta is None:
            if len(self._meta_styles) > 20_000:
                self._meta_styles.clear()
            meta = self._meta_styles[key] = Style.from_meta({"row": row_index, "column": column_index})
        return meta

    def _update_dimensions(self, new_rows: Iterable[RowKey]) -> None:
        """The virtual size, without measuring the new rows' cells: every column here has a set width and
        every row is one line, so the measurement (11 000 cells for 1 000 new rows, ~150 ms of the event
        loop in one go) could not change anything."""
        super()._update_dimensions(())

    def _render_line(self, y: int, x1: int, x2: int, base_style: Style) -> Strip:
        try:
            row_key, line_in_row = self._get_offsets(y)
        except LookupError:
            return super()._render_line(y, x1, x2, base_style)
        cursor_row = self.cursor_coordinate.row
        hover_row = self.hover_coordinate.row
        if row_key is self._header_row_key:
            row_index = -1
            version = 0
        else:
            row_index = self._row_locations.get(row_key)
            if row_index is None:
                return super()._render_line(y, x1, x2, base_style)
            version = self._row_versions.get(row_key.value, 0)
        width = self._pass_width if self._pass_width is not None else self.size.width
        key = (
            version,
            row_index,
            row_index < self.fixed_rows,
            x1,
            x2,
            width,
            base_style,
            self.cursor_type,
            self.show_cursor,
            self._show_hover_cursor,
            row_index == cursor_row,
            row_index == hover_row,
            self._pseudo_class_state,
        )
        row_lines = self._line_strips.setdefault(row_key.value, {})
        cached = row_lines.get(line_in_row)
        if cached is not None and cached[0] == key:
            return cached[1]
        strip = None
        if row_index >= 0 and not x1 and x2 == width:
            strip = self._data_line(row_key, row_index, line_in_row, width, base_style)
        if strip is None:
            strip = super()._render_line(y, x1, x2, base_style)
        row_lines[line_in_row] = (key, strip)
        self.lines_rendered += 1
        return strip

    def _data_line(
        self, row_key: RowKey, row_index: int, line_no: int, width: int, base_style: Style
    ) -> Strip | None:
        """A data row's line, not scrolled sideways, as DataTable's `_render_line` builds it from
        `_render_line_in_row` (the cells, then the row's style out to the widget's edge), without the steps
        that cannot change it here: cropping and measuring a line exactly as wide as the view (every cell is
        laid out to its column's width, by `_render_plain_cell` or rich), looking the row, each column and
        the table's settings up again for every cell. None where DataTable's own way is needed (the table
        wider than the view, row labels, fixed columns)."""
        columns = self._column_key_objects
        if (
            self.cursor_type != "row"
            or self.fixed_columns
            or (self._labelled_row_exists and self.show_row_labels)
            or len(columns) != len(self.columns)
        ):
            return None
        cursor = row_index == self.cursor_coordinate.row
        hover = row_index == self.hover_coordinate.row
        row_style = self._get_row_style(row_index, base_style)
        data = self._data[row_key]
        row_cells = self._cell_lines.setdefault(row_key.value, {})
        fixed = row_index < self.fixed_rows
        show_hover_cursor = self._show_hover_cursor
        pseudo_classes = self._pseudo_class_state
        padding = 2 * self.cell_padding
        all_columns = self.columns
        segments: list[Segment] = []
        table_width = 0
        for column_index, column_key in enumerate(columns):
            column = all_columns[column_key]
            # The column's render width (`Column.get_render_width`, without reading the padding each time).
            cell_width = padding + (column.content_width if column.auto_width else column.width)
            table_width += cell_width
            cell = data[column_key]
            key = (row_index, fixed, row_style, cell_width, cursor, hover, show_hover_cursor, pseudo_classes)
            cached = row_cells.get(column_key.value)  # as `_render_cell` keeps it
            if cached is not None and cached[0] is cell and cached[1] == key:
                segments.extend(cached[2][line_no])
            else:
                segments.extend(
                    self._render_cell(row_index, column_index, row_style, cell_width, cursor, hover)[line_no]
                )
        remaining = width - table_width - self._row_label_column_width
        if remaining < 0:
            return None
        extend_style, _ = self._get_styles_to_render_cell(
            False, False, False, hover, cursor, self.show_cursor, show_hover_cursor, False, False
        )
        segments.append(
            Segment(" " * remaining, row_style + extend_style + self._out_of_bounds_meta(row_index))
        )
        return Strip(segments, width).simplify()

    def _render_line_in_row(
        self,
        row_key: RowKey,
        line_no: int,
        base_style: Style,
        cursor_location: Coordinate,
        hover_location: Coordinate,
    ) -> tuple[list[list[Segment]], list[list[Segment]]]:
        """A data row's segments as DataTable lays them out for a row cursor (its cells, then the row's
        style out to the widget's edge), without its per-call look-ups of styles nobody uses here (the
        header's, row labels', fixed columns')."""
        row_index = self._row_locations.get(row_key) if row_key is not self._header_row_key else None
        if (
            row_index is None
            or self.cursor_type != "row"
            or self.fixed_columns
            or (self._labelled_row_exists and self.show_row_labels)
        ):
            return super()._render_line_in_row(row_key, line_no, base_style, cursor_location, hover_location)
        cursor = row_index == cursor_location.row
        hover = row_index == hover_location.row
        row_style = self._get_row_style(row_index, base_style)
        scrollable: list[list[Segment]] = []
        table_width = 0
        for column_index, column in enumerate(self.ordered_columns):
            width = column.get_render_width(self)
            table_width += width
            lines = self._render_cell(row_index, column_index, row_style, width, cursor=cursor, hover=hover)
            scrollable.append(lines[line_no])
        extend_style, _ = self._get_styles_to_render_cell(
            False, False, False, hover, cursor, self.show_cursor, self._show_hover_cursor, False, False
        )
        extend_style = row_style + extend_style + self._out_of_bounds_meta(row_index)
        remaining = max(0, self.size.width - table_width - self._row_label_column_width)
        scrollable.append([Segment(" " * remaining, extend_style)])
        return [], scrollable

    def _out_of_bounds_meta(self, row_index: int) -> Style:
        meta = self._meta_styles.get((row_index, -1))
        if meta is None:
            meta = self._meta_styles[(row_index, -1)] = Style.from_meta(
                {"row": row_index, "column": 0, "out_of_bounds": True}
            )
        return meta

    def _render_cell(
        self,
        row_index: int,
        column_index: int,
        base_style: Style,
        width: int,
        cursor: bool = False,
        hover: bool = False,
    ) -> list[list[Segment]]:
        if row_index < 0 or column_index < 0:  # the header and row labels: DataTable's own cache
            return super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        row_key = self._row_locations.get_key(row_index)
        column_key = self._column_locations.get_key(column_index)
        cell = self._data[row_key][column_key]
        key = (
            row_index,  # the mouse metadata says which row a click is on
            row_index < self.fixed_rows,
            base_style,
            width,
            cursor,
            hover,
            self._show_hover_cursor,
            self._pseudo_class_state,
        )
        row_cells = self._cell_lines.setdefault(row_key.value, {})
        cached = row_cells.get(column_key.value)
        # The very Text object rendered then (held by the slot, so its identity is its own).
        if cached is not None and cached[0] is cell and cached[1] == key:
            return cached[2]
        if _plain(cell):
            lines = self._render_plain_cell(cell, row_index, column_index, base_style, width, cursor, hover)
        else:
            lines = super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        row_cells[column_key.value] = (cell, key, lines)
        return lines

    def _render_plain_cell(
        self,
        cell: Text,
        row_index: int,
        column_index: int,
        base_style: Style,
        width: int,
        cursor: bool,
        hover: bool,
    ) -> list[list[Segment]]:
        """What DataTable renders through rich for a one-line, one-style cell (the text padded by one
        column either side, cropped or justified to the column; the pre- and post-styles of the cursor
        and the row), built directly: rich's general layout was most of a changed row's cost."""
        is_fixed = row_index < self.fixed_rows or column_index < self.fixed_columns
        component_style, post_style = self._get_styles_to_render_cell(
            False,
            False,
            is_fixed,
            hover,
            cursor,
            self.show_cursor,
            self._show_hover_cursor,
            self.cursor_foreground_priority == "css",
            self.cursor_background_priority == "css",
        )
        pre = base_style + self._cell_meta(row_index, column_index) + component_style
        text_style = pre + self.app.console.get_style(cell.style, default=Style.null()) + post_style
        pad_style = pre + post_style
        room = max(0, width - 2 * self.cell_padding)
        plain = cell.plain
        padding = " " * self.cell_padding
        # A cell in one style is one segment: what the line's `simplify()` would have joined (a segment
        # fewer to divide, filter and compare at every step of a screen update).
        if cell.justify == "right":  # rich: stripped, cropped, then padded on the left in the text's style
            body = _cropped(plain.rstrip(), room)
            body = " " * (room - cell_len(body)) + body
            if text_style == pad_style:
                return [[Segment(padding + body + padding, pad_style)]]
            segments = [Segment(padding, pad_style), Segment(body, text_style), Segment(padding, pad_style)]
        elif cell.justify in (None, "default"):  # cropped; the rest of the column in the padding's style
            body = _cropped(plain, room)
            rest = " " * (room - cell_len(body))
            if not body or text_style == pad_style:
                return [[Segment(padding + body + rest + padding, pad_style)]]
            segments = [
                Segment(padding, pad_style),
                Segment(body, text_style),
                Segment(rest + padding, pad_style),
            ]
        else:  # another justification: rich's own layout
            return super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        return [segments]

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._forget_renders()

    def _row_changed(self, row_key: str) -> None:
        self._versions_given += 1  # never reused: a row removed and added again has a new version
        self._row_versions[row_key] = self._versions_given

    def _forget_row(self, row_key: str) -> None:
        self._row_versions.pop(row_key, None)
        self._line_strips.pop(row_key, None)
        self._cell_lines.pop(row_key, None)

    def _forget_renders(self) -> None:
        self._base_style = None
        self._row_styles.clear()
        self._line_strips.clear()
        self._cell_lines.clear()

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
        if title != self._title:  # setting a border title repaints the whole table, even the same title
            self._title = title
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
        self._forget_renders()

    def _format(self, view: PositionView) -> Cells:
        s = self._styles
        uncovered = view.position_id in self._uncovered
        flag = Text(self._flag_text(view), style=s["uncovered"] if uncovered else "")
        symbol = Text(view.symbol, style=s["uncovered"] if uncovered else "")
        sign = formatting.percent_sign(view.pnl_percent)
        pnl_style = s["gain"] if sign > 0 else s["loss"] if sign < 0 else ""
        # Right-aligned like every other price column (it was the one left-aligned number).
        if view.has_stop_loss:
            stop = Text(formatting.price(view.stop_loss_price), justify="right")
        elif view.stop_loss_unverified:  # in doubt, asked for by its id: not known gone
            stop = Text("unverif?" if self.narrow else "unverified", style=s["missing"], justify="right")
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
        ) + ((error_cell(view, s),) if self.error_width else ())


def error_cell(view: PositionView, styles: Mapping[str, Style]) -> Text:
    """Red while it matters. A covered position's last error is history: shown plain for a minute (what
    just went wrong and recovered), then left to the detail screen, not kept on every healthy row."""
    if not view.last_error:
        return Text("")
    if not view.covered:
        return Text(view.last_error, style=styles["missing"])
    return Text("" if view.last_error_old else view.last_error)


def _drawn_alike(before: Text, after: Text) -> bool:
    """Whether two cells draw the same. Rich's `Text ==` compares the text (and spans) only: a cell whose
    style alone changed (the symbol of a position that turns uncovered, the error of one protected again)
    was never written, and the row kept the look of its last state."""
    return before == after and before.style == after.style and before.justify == after.justify


def _plain(cell: object) -> bool:
    """A cell `_render_plain_cell` lays out (one line in one style, justified left or right)."""
    return (
        isinstance(cell, Text)
        and not cell.spans
        and cell.justify in ("right", None, "default")
        and "\n" not in cell.plain
        and "\t" not in cell.plain
    )


def _cropped(text: str, width: int) -> str:
    """`text` cut to `width` terminal cells (never padded)."""
    return set_cell_size(text, width) if cell_len(text) > width else text


def _mark_cell(view: PositionView, styles: dict[str, Style]) -> Text:
    """The mark; `~` before it (and the alarm colour) when it is older than `health.stale_mark_seconds`."""
    if view.mark_stale:
        return Text("~" + formatting.price(view.mark_price), style=styles["missing"], justify="right")
    return Text(formatting.price(view.mark_price), justify="right")


def _trailing_cell(view: PositionView, styles: dict[str, Style], *, short: bool = False) -> Text:
    """The trailing stop's state; `short` (narrow terminals) says the same in at most 14 characters."""
    if view.trailing_phase == ENTRY_IN_DOUBT_PHASE:  # it may have filled: no stop of ours either way
        return Text("ENTRY?" if short else "ENTRY UNKNOWN", style=styles["missing"])
    if view.closing:  # a close we sent is on its way: the row read "wait +1.67%" for 10 s (opme48)
        return Text("closing…" if short else "closing (market)")  # (16: the column's width)
    if not view.has_trailing_stop:
        if view.trailing_stop_unverified:
            return Text("UNVERIFIED", style=styles["missing"])
        return Text("MISSING", style=styles["missing"])
    phase = view.trailing_phase
    if phase == "waiting" or (phase == "native" and (view.distance_to_activation_percent or 0) > 0):
        distance = view.distance_to_activation_percent
        word = "wait" if short else "waiting"
        return Text(word + ("" if distance is None else f" {distance:+.2f}%"))
    if phase == "native":
        if view.trailing_follows == "last":  # Bybit: follows the last traded price, not the mark
            return Text("trail on last" if short else "trailing on last", style=styles["active-trail"])
        return Text("venue trail" if short else "venue trailing", style=styles["active-trail"])
    stop = view.trailing_stop_price
    if short:
        return Text(f"{phase[:3]} {formatting.price(stop)}", style=styles["active-trail"])
    return Text(f"{phase} @ {formatting.price(stop)}", style=styles["active-trail"])

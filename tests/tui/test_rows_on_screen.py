"""Every row the positions table draws is the row the engine's current view of its position gives.

The table builds full views only for the rows it believes are on screen (`rows_on_screen`), formats only the
rows whose view changed and, within them, writes only the cells that changed. Two operator trials in tmux
saw rows stand still for seconds while the rest of the screen moved on. These tests drive the dashboard
against the real engine (sim venue, real PostgreSQL) and compare each row drawn in the table's viewport with
`PositionsTable._format` of the engine's view built now: its text on the screen and the cells it is drawn
from (text and style), after a few frames.
"""

from __future__ import annotations

import random

from rich.cells import cell_len, set_cell_size
from rich.text import Text

from engine.venues.sim.settings import CallKind, FaultKind
from engine.venues.sim.universe import UNIVERSE
from storage.database import Database
from tests.tui.harness import Dashboard, dashboard, started, tui_settings
from tests.tui.snapshots import screen_text, wait_for
from tui.screens.reprotect import ReprotectScreen
from tui.widgets.positions import UNCOVERED_FLAG

SYMBOLS = sorted(UNIVERSE)


def _cell(text: Text) -> tuple[str, str, str | None]:
    """What a cell draws: its text, its style, its justification (rich's `Text ==` compares the text only)."""
    return text.plain, str(text.style), text.justify


def _expected(board: Dashboard) -> dict[str, tuple[int, tuple[Text, ...]]]:
    """By symbol: the position and the cells `_format` gives for the engine's view of it, built now."""
    snapshot = board.engine.snapshot()
    table = board.positions
    shown_uncovered = table._uncovered
    table._uncovered = frozenset(snapshot.coverage.uncovered_ids)
    try:
        return {view.symbol: (view.position_id, table._format(view)) for view in snapshot.positions}
    finally:
        table._uncovered = shown_uncovered


def _laid_out(cell: Text, width: int) -> str:
    """A cell's text as a line of the table draws it: padded by one column either side, cut to the column."""
    room = width - 2
    plain = cell.plain.rstrip() if cell.justify == "right" else cell.plain
    body = set_cell_size(plain, room) if cell_len(plain) > room else plain
    pad = " " * (room - cell_len(body))
    return " " + (pad + body if cell.justify == "right" else body + pad) + " "


def stale_rows(board: Dashboard) -> list[str]:
    """The rows drawn in the table's viewport whose text on the screen, or whose cells, differ from what
    the engine's current view gives (empty while a dialog covers the table or the table is hidden)."""
    app, table = board.app, board.positions
    if app.screen is not app.screen_stack[0] or not table.display or not table.region:
        return []
    expected = _expected(board)
    lines = screen_text(app).splitlines()
    width, height = app.size
    viewport = table.scrollable_content_region
    widths = [column.get_render_width(table) for column in table.ordered_columns]
    scroll_x = table.scroll_offset.x
    if scroll_x > widths[0]:
        return []  # the symbol column is scrolled away: the rows cannot be told apart
    stale = []
    for y in range(viewport.y + 1, min(viewport.bottom, height)):  # under the header
        line = lines[y].ljust(width)[viewport.x : viewport.x + min(viewport.width, sum(widths) - scroll_x)]
        if not line.strip():
            continue
        symbol = (" " * scroll_x + line)[widths[0] : widths[0] + widths[1]].strip()
        if symbol not in expected:
            stale.append(f"{symbol!r}: drawn, not an open position: {line!r}")
            continue
        position_id, cells = expected[symbol]
        want = "".join(_laid_out(c, w) for c, w in zip(cells, widths, strict=True))
        want = want[scroll_x : scroll_x + len(line)]
        drawn = table.get_row(str(position_id))
        if line.rstrip() != want.rstrip():
            stale.append(f"{symbol}: drawn {line.rstrip()!r}, the view gives {want.rstrip()!r}")
        elif [_cell(c) for c in drawn] != [_cell(c) for c in cells]:
            stale.append(f"{symbol}: cells {[_cell(c) for c in drawn]} != {[_cell(c) for c in cells]}")
    return stale


async def _frames(board: Dashboard, count: int) -> None:
    """Until `count` more frames have been painted and the table has redrawn every changed line."""
    app, table = board.app, board.positions
    shown = len(app.frame_seconds)
    await wait_for(
        board.pilot,
        lambda: (
            len(app.frame_seconds) >= shown + count
            and not table._repaint_rows
            and table._repaint_timer is None
            and table._refresh_timer is None
        ),
        f"{count} frames painted",
    )


async def _rows_current(board: Dashboard, what: str) -> None:
    """Every row drawn is the current view's, within a few frames (the engine may still settle meanwhile:
    a stop's answer recorded while virtual time stands still)."""
    board.app.clear_notifications()
    stale: list[str] = []
    for _ in range(4):
        await _frames(board, 3)
        stale = stale_rows(board)
        if not stale:
            return
    raise AssertionError(f"{what}: rows drawn stale:\n" + "\n".join(stale))


async def test_a_row_that_turns_uncovered_and_is_protected_again_is_drawn_in_its_state_s_style(
    db: Database,
) -> None:
    """A row is formatted in the alarm style while its position is uncovered (its symbol reversed, its last
    error red) and plain once covered. A cell whose text did not change was never written again, whatever
    its style (rich's `Text ==` compares the text only): a position uncovered after its first frame kept
    its plain symbol among the alarms, and once protected again its last error stayed red (from 150
    columns), the look of an uncovered row on a covered one, for as long as the text stayed."""
    settings = tui_settings(
        db, {"PROTECTION__RETRY_INITIAL_SECONDS": "60", "PROTECTION__RETRY_MAX_SECONDS": "600"}
    )
    async with dashboard(settings, size=(160, 48)) as board:
        await started(board)
        first, target = SYMBOLS[2], SYMBOLS[3]
        await board.open_positions([first])
        await board.until(lambda: board.engine.snapshot().coverage.protected == 1, "the first covered")
        board.venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.SERVER_ERROR, 100_000, stops_only=True)
        await board.open_positions([target])
        assert board.engine.manager is not None
        position_id = board.engine.manager.by_symbol[target].position_id
        table = board.positions
        await board.until(
            lambda: table.row_text(position_id).startswith(f"{UNCOVERED_FLAG} {target}"), "shown uncovered"
        )
        await _rows_current(board, "uncovered")

        board.venue.clear_injected_faults()
        await board.press("p")
        screen = board.app.screen
        assert isinstance(screen, ReprotectScreen)
        await board.press("y")
        await board.until(lambda: screen.state == "done", "re-protect finished")
        await board.press("escape")
        await board.until(lambda: table.row_text(position_id).startswith(f"  {target}"), "shown covered")
        assert "HTTP 500" in table.row_text(position_id)  # its error, said plain for a minute
        await _rows_current(board, "protected again")


KEYS = (
    ("down",),
    ("down", "down", "down"),
    ("up",),
    ("pagedown",),
    ("pageup",),
    ("home",),
    ("end",),
    ("u",),
    ("escape",),
    ("slash", "u", "enter"),
    ("slash", "b", "escape"),
    ("h",),  # a dialog left open while the terminal is resized, then closed
    ("question_mark",),
    ("enter",),
)
SIZES = ((80, 24), (60, 20), (120, 40), (200, 60), (100, 30))


async def test_after_random_keys_resizes_and_waves_every_row_drawn_is_the_current_view(db: Database) -> None:
    """Property: after any sequence of keys (cursor, scrolling, the uncovered-only and symbol filters,
    dialogs), terminal resizes across the column layouts and waves arriving (some left uncovered, so rows
    are pinned), once a few frames have been painted every row drawn in the table's viewport is the one
    the engine's view of it gives now. Seeded: the same sequence every run."""
    rng = random.Random(20261207)
    settings = tui_settings(db, {"VENUE__SIM__VOLATILITY": "2.0", "VENUE__SIM__MARK_TICK_SECONDS": "0.2"})
    async with dashboard(settings, size=(80, 24)) as board:
        await started(board)
        free = SYMBOLS[:]
        rng.shuffle(free)
        await board.open_positions([free.pop() for _ in range(30)])
        store = board.engine.store
        assert store is not None
        for step in range(15):
            roll = rng.random()
            if roll < 0.55:
                keys = rng.choice(KEYS)
                await board.press(*keys)
                done = f"keys {' '.join(keys)}"
            elif roll < 0.75:
                size = rng.choice(SIZES)
                await board.pilot.resize_terminal(*size)
                done = f"resize to {size}"
            else:
                symbols = [free.pop() for _ in range(rng.randint(1, 3))]
                if rng.random() < 0.5:  # its stops refused a while: uncovered, pinned, then protected
                    board.venue.inject_fault(
                        CallKind.CREATE_ORDER, FaultKind.SERVER_ERROR, 4 * len(symbols), stops_only=True
                    )
                await store.insert_signals([(s, "long", None, None) for s in symbols])
                done = f"wave {symbols}"
            for _ in range(rng.choice((0, 4, 20, 60))):  # the engine moves on (marks, stops), then holds
                await board.clock.advance(0.05)
                await board.pilot.pause(0.001)
            await _rows_current(board, f"step {step} ({done})")
        if board.app.screen is not board.app.screen_stack[0]:
            await board.press("escape")

"""The positions table in transitions (issue 13, defect 1): uncovered rows are always on screen whatever the
operator or the arriving rows did to the view, the table opens at the top, Home and End go to the first and
last row, and the title carries the uncovered count. Read from the rendered screen."""

from __future__ import annotations

import dataclasses
from datetime import UTC
from decimal import Decimal

import pytest

from engine.venues.sim.universe import UNIVERSE
from tests.tui.book import BookFeed, ScreenScopedBookFeed, book_position
from tests.tui.scenario import scenario_settings
from tests.tui.snapshots import screen_text, wait_for
from tui.app import DashboardApp, quit_warning
from tui.widgets.coverage import CoverageGauge, CoverageTrend
from tui.widgets.positions import ROWS_FORMATTED_AT_ONCE, PositionsTable

SYMBOLS = sorted(UNIVERSE)


async def test_uncovered_rows_stay_on_screen_the_table_opens_at_the_top_and_home_end_move_the_cursor() -> (
    None
):
    settings = scenario_settings()
    last = SYMBOLS[-1]
    feed = BookFeed(settings, [book_position(1, last)])
    app = DashboardApp(settings, feed=feed, tz=UTC, code_roots=[])
    async with app.run_test(size=(80, 24)) as pilot:
        table = app.query_one(PositionsTable)
        await wait_for(pilot, lambda: table.row_count == 1, "the first position shown")

        # Thirty more arrive, all sorting before the first: the table stays at its top.
        book = [book_position(1, last)] + [book_position(10 + i, s) for i, s in enumerate(SYMBOLS[:30])]
        feed.set_positions(book)
        await wait_for(pilot, lambda: table.row_count == 31, "31 positions shown")
        assert (table.cursor_row, table.scroll_y) == (0, 0)
        assert f"  {SYMBOLS[0]}" in screen_text(app)

        # End: the last row (it scrolled sideways), with the view on it.
        await pilot.press("end")
        await pilot.pause()
        assert table.cursor_row == 30
        assert last in screen_text(app)

        # A burst of uncovered positions while the operator is at the bottom: every one is on screen.
        burst = [book_position(100 + i, s, uncovered_for=40.0 + i) for i, s in enumerate(SYMBOLS[40:44])]
        feed.set_positions(book + burst)
        await wait_for(pilot, lambda: table.row_count == 35, "35 positions shown")
        text = screen_text(app)
        for position in burst:
            assert f"! {position.symbol}" in " ".join(text.split()), text
        assert "Positions 35 · 4 UNCOVERED" in text
        selected = table.selected_view()
        assert selected is not None
        assert selected.symbol == last  # the cursor stayed on the position the operator chose

        # Home: the first row and the top of the table.
        await pilot.press("home")
        await pilot.pause()
        assert (table.cursor_row, table.scroll_y) == (0, 0)
        assert table.selected_view().symbol == SYMBOLS[40]  # type: ignore[union-attr]


async def test_more_uncovered_than_the_view_holds_says_how_many_are_not_pinned() -> None:
    settings = scenario_settings()
    book = [book_position(i, s) for i, s in enumerate(SYMBOLS[:20])]
    book += [book_position(100 + i, s, uncovered_for=60.0) for i, s in enumerate(SYMBOLS[50:70])]
    feed = BookFeed(settings, book)
    app = DashboardApp(settings, feed=feed, tz=UTC, code_roots=[])
    async with app.run_test(size=(80, 24)) as pilot:
        table = app.query_one(PositionsTable)
        await wait_for(pilot, lambda: table.row_count == 40, "40 positions shown")
        await wait_for(pilot, lambda: table.fixed_rows > 0, "uncovered rows pinned")
        await pilot.press("end")
        await pilot.pause()
        text = screen_text(app)
        pinned = table.fixed_rows
        assert 0 < pinned < 20
        assert f"Positions 40 · 20 UNCOVERED ({20 - pinned} below the pinned ones)" in text
        flat = " ".join(text.split())
        for symbol in SYMBOLS[50 : 50 + pinned]:
            assert f"! {symbol}" in flat


async def test_a_resize_across_a_column_layout_with_pinned_rows_keeps_the_dashboard_running() -> None:
    """Crossing a column layout (80 → 160 columns) rebuilt the table's columns, which emptied it while its
    pinned-row count stayed: the next render looked up a pinned row that no longer existed (KeyError) and
    ended the dashboard (seen in bench/tui_render.py at start-up)."""
    settings = scenario_settings()
    book = [book_position(i, s) for i, s in enumerate(SYMBOLS[:20])]
    book += [book_position(100 + i, s, uncovered_for=60.0) for i, s in enumerate(SYMBOLS[50:54])]
    feed = BookFeed(settings, book)
    app = DashboardApp(settings, feed=feed, tz=UTC, code_roots=[])
    async with app.run_test(size=(80, 24)) as pilot:
        table = app.query_one(PositionsTable)
        await wait_for(pilot, lambda: table.fixed_rows == 4, "the uncovered rows pinned")
        for size in ((160, 48), (120, 40), (80, 24)):
            await pilot.resize_terminal(*size)
            await pilot.pause()
            await wait_for(pilot, lambda: table.row_count == 24 and table.fixed_rows == 4, f"rows at {size}")
            flat = " ".join(screen_text(app).split())
            for symbol in SYMBOLS[50:54]:
                assert f"! {symbol}" in flat, (size, flat)
            assert "Positions 24 · 4 UNCOVERED" in flat


async def test_a_frame_renders_again_only_the_rows_that_changed_and_shows_their_new_text() -> None:
    """Changed cells only reach the renderer (issue 13, P4): DataTable re-rendered every visible row on any
    cell update. One position's mark moves: one line is rendered anew, and it shows the new mark; the
    cursor moving re-renders the two rows it left and reached, with the highlight where it is now."""
    settings = scenario_settings()
    book = [book_position(i, s) for i, s in enumerate(SYMBOLS[:12], start=1)]
    feed = BookFeed(settings, book)
    app = DashboardApp(settings, feed=feed, tz=UTC, code_roots=[])
    async with app.run_test(size=(120, 40)) as pilot:
        table = app.query_one(PositionsTable)
        await wait_for(pilot, lambda: table.row_count == 12, "12 positions shown")
        await pilot.pause(0.2)  # a few frames of nothing changing: every line is in the cache
        before = table.lines_rendered
        await pilot.pause(0.2)
        assert table.lines_rendered == before  # nothing changed, nothing rendered

        moved = dataclasses.replace(book[4], mark_price=Decimal("7.7777"))
        feed.set_positions([*book[:4], moved, *book[5:]])
        await wait_for(pilot, lambda: "7.7777" in screen_text(app), "the new mark on screen")
        assert table.lines_rendered == before + 1
        line = next(line for line in screen_text(app).splitlines() if "7.7777" in line)
        assert SYMBOLS[4] in line

        before = table.lines_rendered
        await pilot.press("down")
        await pilot.pause(0.1)
        assert table.lines_rendered == before + 2  # the row the cursor left and the one it reached
        assert table.selected_view().symbol == SYMBOLS[1]  # type: ignore[union-attr]


async def test_a_trailing_stop_that_follows_the_last_price_says_so_on_its_row_and_in_its_detail() -> None:
    """A Bybit trailing stop follows the last traded price at a fixed distance (Binance's follows the mark
    at a callback rate): the row and the detail view say which, at 120 and at 80 columns, whole on the
    screen (at 112 columns and wider the row read "venue trail, las": its words were one longer than the
    column; an operator in tmux)."""
    settings = scenario_settings()
    trailing = {"distance_to_activation_percent": Decimal("-0.20"), "trailing_phase": "native"}
    on_last = dataclasses.replace(book_position(1, SYMBOLS[0]), trailing_follows="last", **trailing)
    on_mark = dataclasses.replace(book_position(2, SYMBOLS[1]), **trailing)
    feed = BookFeed(settings, [on_last, on_mark])
    app = DashboardApp(settings, feed=feed, tz=UTC, code_roots=[])
    async with app.run_test(size=(120, 40)) as pilot:
        table = app.query_one(PositionsTable)
        await wait_for(pilot, lambda: table.row_count == 2, "both positions shown")
        assert "trailing on last" in table.row_text(1)
        assert "trailing on last" in screen_text(app)
        assert "venue trailing" in table.row_text(2)
        assert "last" not in table.row_text(2)
        await pilot.press("enter")  # the cursor is on the first row: its detail
        await wait_for(pilot, lambda: "follows the last traded price" in screen_text(app), "detail")
        await pilot.press("escape")
        await pilot.resize_terminal(80, 24)
        await wait_for(pilot, lambda: "trail on last" in table.row_text(1), "the narrow form")


async def test_stops_in_doubt_read_unverified_not_missing_on_the_row_and_in_the_detail() -> None:
    """An operator during a gap in the account stream with the venue unreadable: every row read "missing"
    for stops the venue still held (asked for by their ids). "Missing" invites a stop placed by hand, a
    second one beside ours; the row and the detail say "unverified" (still uncovered), at 120 and 80
    columns, and a stop the venue said is gone still reads "missing"."""
    settings = scenario_settings()
    doubt = {"stop_loss_unverified": True, "trailing_stop_unverified": True}
    in_doubt = dataclasses.replace(book_position(1, SYMBOLS[0], uncovered_for=3.0), **doubt)
    gone = book_position(2, SYMBOLS[1], uncovered_for=3.0)
    feed = BookFeed(settings, [in_doubt, gone])
    app = DashboardApp(settings, feed=feed, tz=UTC, code_roots=[])
    async with app.run_test(size=(120, 40)) as pilot:
        table = app.query_one(PositionsTable)
        await wait_for(pilot, lambda: table.row_count == 2, "both positions shown")
        assert "unverified" in table.row_text(1)
        assert "UNVERIFIED" in table.row_text(1)
        assert "missing" not in table.row_text(1).lower()
        assert "missing" in table.row_text(2)
        assert "MISSING" in table.row_text(2)
        assert "unverified" not in table.row_text(2).lower()
        await pilot.press("enter")  # the cursor is on the first row: its detail
        await wait_for(pilot, lambda: "UNVERIFIED: in doubt" in screen_text(app), "detail")
        assert "MISSING" not in screen_text(app)
        await pilot.press("escape")
        await pilot.resize_terminal(80, 24)
        await wait_for(pilot, lambda: "unverif?" in table.row_text(1), "the narrow form")
        assert "UNVERIFIED" in table.row_text(1)


def test_the_read_only_screen_says_what_each_venue_s_own_capabilities_say() -> None:
    from engine.config import VenueKind
    from engine.venues.binance_venue import BinanceUsdmVenue
    from engine.venues.bybit_venue import BybitLinearVenue
    from engine.venues.ccxt_venue import CcxtVenueConfig
    from tui.feed import native_trailing_follows

    bybit = BybitLinearVenue(CcxtVenueConfig(kind="bybit", api_key="k", api_secret="s"))
    binance = BinanceUsdmVenue(CcxtVenueConfig(kind="binanceusdm", api_key="k", api_secret="s"))
    assert native_trailing_follows(VenueKind.BYBIT) == bybit.capabilities().trailing_stop_follows == "last"
    assert native_trailing_follows(VenueKind.BINANCEUSDM) == binance.capabilities().trailing_stop_follows
    assert native_trailing_follows(VenueKind.SIM) == "mark"


def _big_book() -> tuple[list, list[str], str]:
    """300 covered positions and 3 uncovered ones whose ids and symbols sort after all of them."""
    covered = [book_position(i + 1, f"{SYMBOLS[i % len(SYMBOLS)][:-4]}{i:04d}USDT") for i in range(300)]
    uncovered = [book_position(1000 + i, f"ZZZ{i}USDT", uncovered_for=90.0) for i in range(3)]
    return covered + uncovered, [p.symbol for p in uncovered], max(p.symbol for p in covered)


async def _screen_of(feed: BookFeed, settings, keys: tuple[str, ...] = ()) -> tuple[str, str, list[int]]:
    """The screen's text and the table's title after `keys`, and (a `ScreenScopedBookFeed`) the views
    handed out per snapshot until then: the app's teardown, once the table has no size any more, may
    paint a last frame asking for every row, which says nothing about the frames shown."""
    app = DashboardApp(settings, feed=feed, tz=UTC, code_roots=[])
    async with app.run_test(size=(120, 40)) as pilot:
        table = app.query_one(PositionsTable)
        await wait_for(pilot, lambda: table.row_count == 303 and table.fixed_rows == 3, "the book shown")
        for key in keys:
            await pilot.press(key)
        frames = app._frames_shown
        await wait_for(pilot, lambda: app._frames_shown >= frames + 2, "two more frames")
        title = str(table.border_title)
        return screen_text(app), title, list(getattr(feed, "views_given", []))


async def test_a_frame_builds_views_only_of_the_rows_on_screen_and_shows_what_the_full_snapshot_shows() -> (
    None
):
    """P4: the engine builds a full view only of the positions on screen (`snapshot(views_of=…)`); the
    screen is the same as from a snapshot with every view, at the top and after End, the uncovered rows
    (last by id and symbol) pinned with their whole row and counted in the title."""
    settings = scenario_settings()
    book, uncovered, last = _big_book()
    scoped = ScreenScopedBookFeed(settings, book)
    for keys in ((), ("end",)):
        expected, expected_title, _ = await _screen_of(BookFeed(settings, book), settings, keys)
        shown, title, views_given = await _screen_of(scoped, settings, keys)
        assert shown == expected
        assert title == expected_title
        assert "3 UNCOVERED" in title
        lines = shown.splitlines()
        for symbol in uncovered:
            # (its row: the health line names the oldest uncovered position too)
            [line] = [line for line in lines if symbol in line and line.startswith("│")]
            assert line.lstrip("│ ").startswith("!")
            assert "missing" in line
            assert "1m30s" in line  # its time unprotected: the whole row
        if keys:
            [line] = [line for line in lines if last in line]
            assert "1.2401" in line  # the bottom row, scrolled to, has its full view
        # Not every view every frame: the rows on screen with half a screen either side, the pinned ones.
        assert views_given
        assert views_given[-1] < 100


class TickingTopRows(ScreenScopedBookFeed):
    """Once `tick` is set, the first ten positions' marks move on every snapshot (each frame)."""

    tick = False

    def snapshot(self, views_of=None):  # type: ignore[no-untyped-def]
        if self.tick:
            self.ticks += 1
            mark = Decimal("1.3001") + Decimal(self.ticks % 50) / 10_000
            self.set_positions(
                [dataclasses.replace(p, mark_price=mark) if p.position_id <= 10 else p for p in self.book]
            )
        return super().snapshot(views_of)

    def set_positions(self, positions):  # type: ignore[no-untyped-def]
        self.book = positions
        super().set_positions(positions)


async def test_every_changed_row_on_screen_shows_its_new_text_when_a_frame_formats_them_in_two_steps() -> (
    None
):
    """A timer frame formats the first changed rows with the panels and the rest in a step of its own (P4):
    once a frame that started after the change has run, every row holds the snapshot's text (without its
    last step, a frame formats only the first ROWS_FORMATTED_AT_ONCE). The screen redraws changed rows a
    few at a time, in the order they changed: rows that change every frame (here the top ten, at the
    tests' 30 frames a second) do not keep the others from being redrawn. Then the screen is the one a
    fresh start shows."""
    settings = scenario_settings()
    book = [book_position(i + 1, f"{SYMBOLS[i][:-4]}{i:04d}USDT") for i in range(60)]
    moved = [dataclasses.replace(p, mark_price=Decimal("1.3001"), pnl_percent=Decimal("5.31")) for p in book]
    fresh = DashboardApp(settings, feed=BookFeed(settings, moved), tz=UTC, code_roots=[])
    async with fresh.run_test(size=(120, 70)) as pilot:
        table = fresh.query_one(PositionsTable)
        await wait_for(pilot, lambda: table.row_count == 60 and "1.3001" in screen_text(fresh), "the book")
        expected = screen_text(fresh)
    feed = TickingTopRows(settings, book)
    feed.ticks = 0
    app = DashboardApp(settings, feed=feed, tz=UTC, code_roots=[])
    async with app.run_test(size=(120, 70)) as pilot:
        table = app.query_one(PositionsTable)
        await wait_for(
            pilot, lambda: table.row_count == 60 and "1.2401" in screen_text(app), "the book shown"
        )
        feed.set_positions(moved)
        feed.tick = True
        frames = len(app.frame_seconds)
        # The second timer frame from now began after the change (the first may have begun before it).
        # Read as soon as it has run (wait_for pauses once more, and further frames would fill in the rest).
        for _ in range(500):
            if len(app.frame_seconds) >= frames + 2:
                break
            await pilot.pause(0.005)
        on_screen = [
            p.position_id for p in moved[10:] if f"{SYMBOLS[p.position_id - 1][:-4]}" in screen_text(app)
        ]
        assert len(on_screen) > ROWS_FORMATTED_AT_ONCE
        assert all("1.3001" in table.row_text(position_id) for position_id in on_screen)

        def rows_below_redrawn() -> bool:
            rows = [line for line in screen_text(app).splitlines() if " LONG " in line][10:]
            return len(rows) > ROWS_FORMATTED_AT_ONCE and all("1.3001" in row for row in rows)

        await wait_for(pilot, rows_below_redrawn, "the rows below the ticking ones redrawn")
        assert feed.ticks >= 2  # the top rows kept changing meanwhile
        feed.tick = False
        feed.set_positions(moved)
        await wait_for(pilot, lambda: screen_text(app) == expected, "the screen of a fresh start")


async def test_a_resize_that_rebuilds_the_columns_adds_back_the_rows_off_screen_too() -> None:
    """A frame whose positions' facts are the ones the table last synced walks only the rows it has views
    of (P4: the other 1 000 have nothing new). A resize across a column layout empties the table between
    two such frames: every row, off screen too, must come back, or the table would hold a screenful."""
    settings = scenario_settings()
    book, uncovered, _last = _big_book()
    feed = ScreenScopedBookFeed(settings, book)
    app = DashboardApp(settings, feed=feed, tz=UTC, code_roots=[])
    async with app.run_test(size=(120, 40)) as pilot:
        table = app.query_one(PositionsTable)
        await wait_for(pilot, lambda: table.row_count == 303 and table.fixed_rows == 3, "the book shown")
        assert feed.views_given[-1] < 100  # the rows off screen have no view in a frame
        for size in ((160, 40), (120, 40)):  # across WIDE_FROM: the error column comes and goes
            await pilot.resize_terminal(*size)
            await wait_for(pilot, lambda: table.row_count == 303 and table.fixed_rows == 3, f"rows at {size}")
            await pilot.press("end")
            await wait_for(pilot, lambda: "1.2401" in screen_text(app), f"the last rows at {size}")
            await pilot.press("home")
            assert "Positions 303 · 3 UNCOVERED" in str(table.border_title)
            for symbol in uncovered:
                assert symbol in screen_text(app)


async def test_each_line_of_the_table_is_the_line_textual_s_data_table_renders_at_every_layout() -> None:
    """P4: the table builds a data row's line from its cached cells (`_data_line`) instead of DataTable's
    general path. Every line on screen, rendered both ways — covered, pinned uncovered and the cursor's row,
    at the three column layouts — has the same segments, text and styles alike."""
    from textual.widgets import DataTable

    settings = scenario_settings()
    book = [book_position(i, s) for i, s in enumerate(SYMBOLS[:25], start=1)]
    book += [book_position(100 + i, s, uncovered_for=75.0) for i, s in enumerate(SYMBOLS[60:63])]
    feed = BookFeed(settings, book)
    app = DashboardApp(settings, feed=feed, tz=UTC, code_roots=[])
    async with app.run_test(size=(160, 48)) as pilot:
        table = app.query_one(PositionsTable)
        for size in ((160, 48), (120, 40), (80, 24)):
            await pilot.resize_terminal(*size)
            await wait_for(pilot, lambda: table.row_count == 28 and table.fixed_rows == 3, f"rows at {size}")
            await pilot.press("down", "down")
            await pilot.pause(0.1)
            width = table.size.width
            base = table.rich_style
            compared = 0
            for y in range(1, table.size.height):  # under the header
                table._forget_renders()
                ours = table._render_line(y, 0, width, base)
                table._forget_renders()
                theirs = DataTable._render_line(table, y, 0, width, base)
                assert list(ours.simplify()) == list(theirs.simplify()), (size, y)
                compared += bool(ours.text.strip())
            assert compared >= min(28, table.size.height - 2), size


async def test_rows_the_table_builds_after_the_start_are_kept_out_of_the_collector_s_full_passes() -> None:
    """P4: the start's `gc.freeze()` kept what existed then out of the collector's full passes, not the
    table's rows built afterwards (the first resize across a column layout rebuilds all of them): at 1 000
    positions some 60 000 objects that each full collection traversed, ~35 ms of the engine's loop. Rows
    rebuilt after the start are frozen too, once enough of them were added."""
    import gc

    settings = scenario_settings()
    book = [book_position(i, f"{SYMBOLS[i % len(SYMBOLS)][:-4]}{i:04d}USDT") for i in range(1, 151)]
    app = DashboardApp(
        settings, feed=BookFeed(settings, book), tz=UTC, code_roots=[], freeze_gc_after_start=True
    )
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            table = app.query_one(PositionsTable)
            await wait_for(pilot, lambda: table.row_count == 150 and app.feed_started, "the book shown")
            before = list(table._data.values())  # held: no new row can reuse an old one's id
            await pilot.resize_terminal(160, 48)  # another column layout: every row built again
            await wait_for(
                pilot,
                lambda: (
                    table.row_count == 150
                    and not {id(d) for d in before} & {id(d) for d in table._data.values()}
                ),
                "the rows rebuilt",
            )
            frames = app._frames_shown
            await wait_for(pilot, lambda: app._frames_shown >= frames + 2, "two more frames")
            rows = [table._data[key] for key in table._row_keys.values()]
            assert len(rows) == 150
            tracked = {id(o) for o in gc.get_objects()}  # every generation but the frozen one
            unfrozen = sum(id(row) in tracked for row in rows)
            assert unfrozen == 0, f"{unfrozen} of 150 rows in the collector's generations"
    finally:
        gc.unfreeze()


async def test_every_column_shown_is_shown_whole_at_every_width() -> None:
    """Between 100 and 111 columns, with a full table (its scrollbar shown), the wide layout was kept
    although its columns needed 112: the last one was cut, and a quantity of 1001 read "100" — a number
    that lies. Every width now shows each of its columns whole, or leaves the column out."""
    settings = scenario_settings()
    book = [
        dataclasses.replace(
            book_position(i + 1, symbol), quantity=Decimal("1001"), entry_price=Decimal("12.345")
        )
        for i, symbol in enumerate(SYMBOLS[:60])
    ]
    feed = BookFeed(settings, book)
    app = DashboardApp(settings, feed=feed, tz=UTC, code_roots=[])
    async with app.run_test(size=(160, 40)) as pilot:
        table = app.query_one(PositionsTable)
        await wait_for(pilot, lambda: table.row_count == 60, "the positions shown")
        for width in [*range(98, 116), 149, 150, 151, 159]:
            await pilot.resize_terminal(width, 40)
            # The table is laid out again for the width: its rows come back by the next frames.
            await wait_for(pilot, lambda: f" {SYMBOLS[0]} " in screen_text(app), f"the rows at {width}")
            lines = screen_text(app).splitlines()
            row = next(line for line in lines if f" {SYMBOLS[0]} " in line)
            header = next(line for line in lines if " Symbol " in line)
            for label, whole in (("Qty", "1001"), ("Entry", "12.345")):
                if f" {label}" in header:
                    assert f" {whole}" in row, (width, label, row)


@pytest.mark.parametrize(
    ("uncovered_for", "kind", "subtitle"),
    [(1.0, "protecting", "last hour, low 14.3% (protecting)"), (90.0, "critical", "last hour, low 14.3%")],
    ids=["inside-grace", "past-grace"],
)
async def test_the_trend_alarms_only_when_a_position_is_uncovered_past_its_grace(
    uncovered_for: float, kind: str, subtitle: str
) -> None:
    """A wave's positions have no stops for their first round trip: coverage reads 14.3 % (1 of 7) with
    nothing uncovered (the health panel: "0 uncovered", the digits: protecting). The trend drew that in
    the critical colour and the gauge said "low 14.3%": an alarm with no cause, which an operator learns
    to ignore. It alarms, as the health rule does, only with a position uncovered past its grace."""
    settings = scenario_settings()
    book = [book_position(1, SYMBOLS[0])] + [
        book_position(2 + i, s, uncovered_for=uncovered_for) for i, s in enumerate(SYMBOLS[1:7])
    ]
    feed = BookFeed(settings, book)
    app = DashboardApp(settings, feed=feed, tz=UTC, code_roots=[])
    async with app.run_test(size=(120, 40)) as pilot:
        gauge = app.query_one(CoverageGauge)
        await wait_for(pilot, lambda: gauge.border_subtitle == subtitle, f"the subtitle {subtitle!r}")
        drawn = [d for d in app.query_one(CoverageTrend).slices() if d is not None]
        assert drawn == [(14.3, kind)]


async def test_the_gauge_s_low_is_the_one_the_history_recorded_not_a_sample_of_its_own() -> None:
    """The gauge said "last hour, low 97.5%" while the history screen said 71.4 % for the same hour: each
    sampled coverage every 10 s at its own instants, and a wave's dip of a second was in one set and not
    the other. The gauge draws the engine's samples, the ones the history reads."""
    settings = scenario_settings()
    feed = BookFeed(settings, [book_position(i + 1, s) for i, s in enumerate(SYMBOLS[:7])])
    covered = feed.snapshot()
    assert covered.coverage.protected == 7  # every position covered whenever the dashboard looks
    assert covered.coverage_sample is not None
    # The engine took its sample during a wave: 5 of 7 protected (two inside their grace period).
    dip = dataclasses.replace(covered.coverage_sample, protected=5, coverage_pct=Decimal("71.4"))
    feed._snapshot = dataclasses.replace(covered, coverage_sample=dip)
    app = DashboardApp(settings, feed=feed, tz=UTC, code_roots=[])
    async with app.run_test(size=(120, 40)) as pilot:
        gauge = app.query_one(CoverageGauge)
        want = "last hour, low 71.4% (protecting)"
        await wait_for(pilot, lambda: gauge.border_subtitle == want, f"the subtitle {want!r}")


def test_the_quit_dialog_names_managed_trailing_stops_only_when_there_are_some() -> None:
    """On Bybit, where managed mode is refused, the quit dialog said "Managed trailing stops (0 now) stop
    moving until the engine is restarted" (an operator): a warning about nothing, in the one dialog that
    must be read."""
    settings = scenario_settings()
    native = BookFeed(settings, [book_position(1, SYMBOLS[0])]).snapshot()
    text = quit_warning(native)
    assert "Managed" not in text
    assert "Trailing stops keep trailing on the exchange." in text
    managed = dataclasses.replace(native.positions[0], trailing_kind="managed")
    text = quit_warning(dataclasses.replace(native, positions=(managed,)))
    assert "Managed trailing stops (1 now) stop moving until the engine is restarted" in text

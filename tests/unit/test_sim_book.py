"""The sim venue keeps its book across restarts (issue 13): a new `SimVenue` on the same book file finds
what the last one held — positions, open stops and trailing stops with their venue and client ids and
trailing state, triggering stops and when they fill, ended orders for queries, balances, leverage, the
order-id counter and the marks — written atomically, owner-only, one process at a time."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from engine.clock import ManualClock
from engine.exchange import NotFound, OrderSide, OrderStatus
from engine.venues.sim import SimBookError, SimBookFile, SimVenue, SimVenueSettings
from engine.venues.sim.core import ENDED_ORDER_RETENTION_SECONDS
from engine.venues.sim.venue import BOOK_SAVE_SECONDS

SFP = "SFPUSDT"
BTC = "BTCUSDT"
ETH = "ETHUSDT"
QTY = Decimal("100")


def sim_settings(**extra: object) -> SimVenueSettings:
    return SimVenueSettings.model_validate(
        {"seed": 3, "volatility": 1.0, "latency": {"seconds": 0.0}, "symbols": [SFP, BTC, ETH], **extra}
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=1_750_000_000.0)


@pytest.fixture
def book_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "sim-venue" / "tsbot-default.json"


@pytest.fixture
async def venue(clock: ManualClock, book_path: Path) -> AsyncIterator[SimVenue]:
    made = SimVenue(sim_settings(), clock=clock, book=SimBookFile(book_path))
    await made.connect()
    yield made
    await made.close()


def read_book(path: Path) -> dict:
    return json.loads(path.read_text())


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def files_under(path: Path) -> list[Path]:
    return list(path.rglob("*"))


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


async def reopened(clock: ManualClock, book_path: Path, settings: SimVenueSettings | None = None) -> SimVenue:
    venue = SimVenue(settings or sim_settings(), clock=clock, book=SimBookFile(book_path))
    await venue.connect()
    return venue


async def trade_a_book(venue: SimVenue, clock: ManualClock) -> None:
    """Every kind of thing a book holds: a long with a stop and an armed trailing stop, a short with a
    waiting trailing stop, a stop that fired and sits TRIGGERING for 30 s, a cancelled stop whose client id
    was used again, leverage, fees paid."""
    venue.override_mark_price(SFP, Decimal("0.4500"))
    venue.override_mark_price(BTC, Decimal("95000.0"))
    venue.override_mark_price(ETH, Decimal("3300.00"))
    await venue.set_leverage(BTC, 5)
    await venue.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="sfp-in")
    await venue.create_stop_market_order(
        SFP, OrderSide.SELL, QTY, Decimal("0.4000"), client_order_id="sfp-sl"
    )
    await venue.create_trailing_stop_order(SFP, OrderSide.SELL, QTY, Decimal("1.5"), client_order_id="sfp-ts")
    venue.override_mark_price(SFP, Decimal("0.4600"))  # the armed trail's extreme moves up
    await venue.create_market_order(BTC, OrderSide.SELL, Decimal("0.010"), client_order_id="btc-in")
    await venue.create_trailing_stop_order(
        BTC,
        OrderSide.BUY,
        Decimal("0.010"),
        Decimal("2"),
        client_order_id="btc-ts",
        activation_price=Decimal("90000.0"),
    )
    await venue.create_stop_market_order(
        BTC, OrderSide.BUY, Decimal("0.010"), Decimal("99000.0"), client_order_id="btc-sl"
    )
    await venue.cancel_order(BTC, "btc-sl")
    await venue.create_stop_market_order(
        BTC, OrderSide.BUY, Decimal("0.010"), Decimal("98000.0"), client_order_id="btc-sl"
    )
    await venue.create_market_order(ETH, OrderSide.BUY, Decimal("0.100"), client_order_id="eth-in")
    await venue.create_stop_market_order(
        ETH, OrderSide.SELL, Decimal("0.100"), Decimal("3200.00"), client_order_id="eth-sl"
    )
    venue.set_trigger_delay(30.0, symbol=ETH)
    [fired] = venue.override_mark_price(ETH, Decimal("3199.00"))
    assert fired.status is OrderStatus.TRIGGERED
    await clock.advance(2.0)  # the ticker walks every price on from here


async def test_a_reopened_venue_holds_the_same_book_ids_triggers_and_all(
    clock: ManualClock, book_path: Path, venue: SimVenue
) -> None:
    await trade_a_book(venue, clock)
    now = clock.now()
    before = venue.core.inspect(now)
    balance = await venue.fetch_balance()
    marks = await venue.fetch_mark_prices()
    await venue.close()

    again = await reopened(clock, book_path)
    try:
        after = again.core.inspect(clock.now())
        assert after.positions == before.positions
        assert after.open_conditional == before.open_conditional  # ids, client ids, prices, trail state
        assert after.triggering == before.triggering
        assert {o.client_order_id for o in after.open_conditional} == {"sfp-sl", "sfp-ts", "btc-ts", "btc-sl"}
        assert await again.fetch_balance() == balance
        assert await again.fetch_mark_prices() == marks
        # The armed trail kept its extreme: the trigger level is where it was, not re-armed at today's mark.
        venue_trail = next(o for o in after.open_conditional if o.client_order_id == "sfp-ts")
        assert venue_trail == next(o for o in before.open_conditional if o.client_order_id == "sfp-ts")
        assert (
            again.core.export_book(clock.now())["accounts"]["main"]["orders"]
            == venue.core.export_book(now)["accounts"]["main"]["orders"]
        )
        # Ended orders still answer queries by client id; a reused id answers for its latest order.
        assert (await again.fetch_order(SFP, "sfp-in")).status is OrderStatus.FILLED
        assert (await again.fetch_order(BTC, "btc-sl")).stop_price == Decimal("98000.0")
        assert (await again.fetch_order(BTC, "btc-sl")).status is OrderStatus.NEW
        # The order-id counter goes on: no venue id is handed out twice.
        newest = max(int(o.venue_order_id) for o in (*after.open_conditional, *after.triggering))
        placed = await again.create_stop_market_order(
            SFP, OrderSide.SELL, QTY, Decimal("0.3000"), client_order_id="sfp-sl2"
        )
        assert int(placed.venue_order_id) > newest
        # A leverage set before the restart still applies.
        assert next(p for p in after.positions if p.symbol == BTC).leverage == 5
        # The triggering stop fills when its 30 s are up, as it would have without the restart.
        await clock.advance(29.0)
        assert (await again.fetch_order(ETH, "eth-sl")).status is OrderStatus.FILLED
        assert ETH not in {p.symbol for p in await again.fetch_positions()}
    finally:
        await again.close()


async def test_the_price_walk_continues_from_the_saved_marks(
    clock: ManualClock, book_path: Path, venue: SimVenue
) -> None:
    venue.override_mark_price(SFP, Decimal("0.9000"))  # far from its listing price of 0.45
    await clock.advance(1.0)
    saved = (await venue.fetch_mark_prices([SFP]))[SFP].price
    await venue.close()
    again = await reopened(clock, book_path)
    try:
        assert (await again.fetch_mark_prices([SFP]))[SFP].price == saved
        await clock.advance(3.0)
        walked = (await again.fetch_mark_prices([SFP]))[SFP].price
        assert walked != saved  # it moves on (volatility 1.0) ...
        assert abs(walked - saved) / saved < Decimal("0.05")  # ... from the saved mark, not the listing
    finally:
        await again.close()


async def test_the_book_is_owner_only_and_its_directory_too(book_path: Path, venue: SimVenue) -> None:
    await venue.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="in")
    await venue.close()
    assert file_mode(book_path) == 0o600
    assert file_mode(book_path.parent) == 0o700
    book = read_book(book_path)
    assert book["format"] == "tsbot-sim-book"
    assert SFP in book["core"]["accounts"]["main"]["positions"]


async def test_an_order_is_on_disk_when_it_is_answered_without_a_close(
    clock: ManualClock, book_path: Path, venue: SimVenue
) -> None:
    """An engine killed with SIGKILL never closes its venue. The book was saved up to a save interval after
    a change, so a stop the venue had confirmed (and the engine recorded) was gone from the book after a kill
    in between: the records said covered, the venue held no stop (an operator). An exchange does not confirm
    an order it could forget: the answer, and the account event, wait for the book on disk."""
    events = venue.watch_account()
    await anext(events)  # connected
    await venue.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="in")
    assert SFP in read_book(book_path)["core"]["accounts"]["main"]["positions"]
    await venue.create_stop_market_order(SFP, OrderSide.SELL, QTY, Decimal("0.4000"), client_order_id="sl")
    assert "sl" in json.dumps(read_book(book_path)["core"]["accounts"]["main"])  # at once: no save interval
    venue.core.cancel_order(SFP, "sl", clock.now())  # by hand, on the venue: seen on the account stream

    async def cancelled_event() -> None:
        async for event in events:
            if getattr(getattr(event, "order", None), "status", None) is OrderStatus.CANCELED:
                return

    seen = asyncio.ensure_future(cancelled_event())
    for _ in range(100):  # venue time for the event's delay; no save interval passes
        if seen.done():
            break
        await clock.advance(0.001)
        await asyncio.sleep(0.01)
    await asyncio.wait_for(seen, 5.0)
    [stop] = [
        o for o in read_book(book_path)["core"]["accounts"]["main"]["orders"] if o["client_order_id"] == "sl"
    ]
    assert stop["status"] == "canceled"
    await events.aclose()


async def test_a_change_without_a_call_is_on_disk_one_save_interval_later(
    clock: ManualClock, book_path: Path, venue: SimVenue
) -> None:
    """What no call answers (a price tick moving a trailing stop, an order changed on the venue by hand) is
    saved one save interval of venue time later (the write itself runs on a worker thread, in real time)."""
    venue.core.place_market_order(SFP, OrderSide.BUY, QTY, "by-hand", clock.now())
    assert SFP not in read_book(book_path)["core"]["accounts"].get("main", {}).get("positions", {})
    await clock.advance(BOOK_SAVE_SECONDS)  # and not a moment more
    for _ in range(500):
        if SFP in read_book(book_path)["core"]["accounts"].get("main", {}).get("positions", {}):
            break
        await asyncio.sleep(0.01)  # real time for the worker thread's write, not venue time
    assert SFP in read_book(book_path)["core"]["accounts"]["main"]["positions"]


async def test_a_second_sim_on_the_same_book_is_refused_while_the_first_holds_it(
    clock: ManualClock, book_path: Path, venue: SimVenue
) -> None:
    second = SimVenue(sim_settings(), clock=clock, book=SimBookFile(book_path))
    with pytest.raises(SimBookError, match=rf"in use by another process \(pid {os.getpid()}\)"):
        await second.connect()
    await second.close()  # never connected: it writes nothing
    await venue.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="in")
    await venue.close()
    third = await reopened(clock, book_path)  # the lock went with the first venue's close
    try:
        assert [p.symbol for p in await third.fetch_positions()] == [SFP]
    finally:
        await third.close()


def test_another_process_holding_the_book_is_named_and_its_death_frees_it(book_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys
                from pathlib import Path
                from engine.venues.sim import SimBookFile
                book = SimBookFile(Path({str(book_path)!r}))
                book.open()
                print("held", flush=True)
                sys.stdin.read()
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SimBookError, match=rf"pid {holder.pid}\)"):
            SimBookFile(book_path).open()
    finally:
        holder.kill()
        holder.wait()
    book = SimBookFile(book_path)
    assert book.open() is None  # a killed holder leaves no lock behind
    book.close()


async def test_closing_a_venue_that_never_connected_leaves_the_book_alone(
    clock: ManualClock, book_path: Path, venue: SimVenue
) -> None:
    """An engine refused by the account lease builds its venue and closes it without connecting: that
    must not write an empty book over the real one."""
    await venue.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="in")
    await venue.close()
    written = read_book(book_path)
    await SimVenue(sim_settings(), clock=clock, book=SimBookFile(book_path)).close()
    assert read_book(book_path) == written


async def test_an_unreadable_book_stops_the_connect_with_one_line_naming_it(
    clock: ManualClock, book_path: Path
) -> None:
    torn = '{"format": "tsbot-sim-book", "version": 1, "core": {"accounts": '
    write_text(book_path, torn)
    venue = SimVenue(sim_settings(), clock=clock, book=SimBookFile(book_path))
    with pytest.raises(SimBookError, match=r"cannot be used: not JSON .*move it away"):
        await venue.connect()
    await venue.close()
    with pytest.raises(json.JSONDecodeError):  # refused, not replaced by a fresh book
        read_book(book_path)


async def test_a_book_holding_a_symbol_the_venue_no_longer_lists_is_refused(
    clock: ManualClock, book_path: Path, venue: SimVenue
) -> None:
    venue.override_mark_price(BTC, Decimal("95000.0"))
    await venue.create_market_order(BTC, OrderSide.BUY, Decimal("0.010"), client_order_id="in")
    await venue.close()
    narrower = SimVenue(sim_settings(symbols=[SFP]), clock=clock, book=SimBookFile(book_path))
    with pytest.raises(SimBookError, match="holds positions or orders in BTCUSDT"):
        await narrower.connect()
    await narrower.close()


async def test_a_write_interrupted_by_a_crash_leaves_the_previous_book(
    clock: ManualClock, book_path: Path, venue: SimVenue
) -> None:
    """What a crash between writing the temporary file and renaming it leaves: the previous book whole,
    and a torn temporary file the next open removes."""
    await venue.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="in")
    await venue.close()
    torn = book_path.with_name(f".{book_path.name}.4242.tmp")
    write_text(torn, '{"format": "tsbot-sim-book", "ver')
    again = await reopened(clock, book_path)
    try:
        assert [p.symbol for p in await again.fetch_positions()] == [SFP]
        assert not torn.exists()
    finally:
        await again.close()


def test_sigkill_at_any_moment_of_a_save_leaves_a_whole_book(book_path: Path) -> None:
    """A process saving a large book over and over is killed in the middle of its k-th save: every time,
    the book reads back whole (the last version it finished, or the one it was writing), never torn."""
    writer = textwrap.dedent(
        f"""
        from pathlib import Path
        from engine.venues.sim import SimBookFile
        book = SimBookFile(Path({str(book_path)!r}))
        book.open()
        filler = "x" * 2_000_000
        n = 0
        while True:
            book.save({{"n": n, "filler": filler, "core": {{}}, "walk": {{}}}})
            print(n, flush=True)
            n += 1
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for finished in (0, 1, 3, 6):
        process = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True, env=env)
        assert process.stdout is not None
        while int(process.stdout.readline()) < finished:
            pass
        os.kill(process.pid, signal.SIGKILL)  # somewhere inside the next save
        process.wait()
        process.stdout.close()
        book = SimBookFile(book_path)
        saved = book.open()
        book.close()
        assert saved is not None
        assert len(saved["filler"]) == 2_000_000
        assert saved["n"] >= finished  # the finished version, or the one after it: never an older one


async def test_without_a_book_nothing_is_kept(clock: ManualClock, tmp_path: Path) -> None:
    venue = SimVenue(sim_settings(), clock=clock)
    await venue.connect()
    await venue.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="in")
    await venue.close()
    assert files_under(tmp_path) == []
    fresh = SimVenue(sim_settings(), clock=clock)
    await fresh.connect()
    try:
        with pytest.raises(NotFound):
            await fresh.fetch_order(SFP, "in")
    finally:
        await fresh.close()


async def test_a_captured_book_is_the_book_of_its_instant_whatever_the_venue_does_next(
    clock: ManualClock, venue: SimVenue
) -> None:
    """The book is captured on the event loop and turned into JSON on a worker thread while the venue goes
    on trading: what is written must be the book of the capture's instant, not a mix."""
    await trade_a_book(venue, clock)
    core = venue.core
    captured = core.capture_book(clock.now())
    expected = core.export_book(clock.now())
    await venue.cancel_order(SFP, "sfp-sl")
    venue.override_mark_price(SFP, Decimal("0.5000"))  # moves the armed trail's extreme
    await venue.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="sfp-more")
    await venue.set_leverage(SFP, 3)
    assert type(core).book_of(captured) == expected
    assert core.export_book(clock.now()) != expected


async def test_orders_that_ended_days_ago_are_forgotten_and_open_ones_never(
    clock: ManualClock, book_path: Path, venue: SimVenue
) -> None:
    """Binance stops answering for orders that ended days ago; the kept book forgets them too (the saver
    asks the core hourly), so it stays bounded however long the sim runs. Open stops, however old, stay."""
    venue.override_mark_price(SFP, Decimal("0.4500"))
    await venue.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="in")
    await venue.create_stop_market_order(SFP, OrderSide.SELL, QTY, Decimal("0.4000"), client_order_id="sl")
    await venue.create_stop_market_order(SFP, OrderSide.SELL, QTY, Decimal("0.3000"), client_order_id="old")
    await venue.cancel_order(SFP, "old")
    core = venue.core
    days_later = clock.now() + ENDED_ORDER_RETENTION_SECONDS + 1.0
    assert core.forget_ended_orders(clock.now()) == 0  # nothing is old yet
    assert core.forget_ended_orders(days_later) == 2  # the filled entry and the cancelled stop
    for cid in ("old", "in"):
        with pytest.raises(NotFound):
            core.get_order(SFP, cid, days_later)
    assert core.get_order(SFP, "sl", days_later).status is OrderStatus.NEW
    await venue.close()
    orders = read_book(book_path)["core"]["accounts"]["main"]["orders"]
    assert [o["client_order_id"] for o in orders] == ["sl"]

"""`SimVenue`: the exchange port over the sim core, with seeded latency and faults, driven by a `Clock`.

Each call draws a plan (round-trip latency, fault) and then plays it out on the clock:

* request half of the latency, then the core executes the call at that instant; response half after;
* `network_error_before_send`: nothing reaches the venue → `Retryable`;
* `server_error`: an HTTP 5xx before execution → `Retryable`;
* `timeout_after_accept`, or a latency longer than `request_timeout_seconds`: the venue executes the call
  but the answer never arrives; after the timeout a mutating call raises `OutcomeUnknown` (resolve by
  client order id) and a read raises `Retryable`. The execution is never later than the timeout: the sim
  has no requests that land after the caller gave up.

A mark-price ticker (one owned, named task, started by `connect()` and stopped by `close()`) steps the GBM
walk every `mark_tick_seconds` of clock time, feeds the marks to the core (which fires stops) and to the
`watch_mark_prices` subscribers. No lock anywhere: the core is synchronous, so each core call is atomic on
the event loop, and nothing is held across an await.

Besides the port, the venue has a small control surface for tests and demos: `override_mark_price`,
`inject_fault`, `answer_positions_empty`, `answer_open_orders_empty`, `clear_injected_faults`, and Binance's documented misbehaviour of algo orders:
`set_trigger_delay` (fired stops sit TRIGGERING, or stick there, before their fill) and `set_read_lag`
(a just-placed stop answers "unknown order" for a while). All of it runs on the venue's clock, so a
`ManualClock` plays it out in virtual time.

With a `book` (`SimBookFile`, what `tsbot run` and the dashboard use) the venue keeps its book across
restarts: `connect()` locks and loads it, a saver task (owned, named, like the ticker) writes it within
`BOOK_SAVE_SECONDS` of any change to orders, positions or balances and every `MARKS_SAVE_SECONDS` while
only prices (and with them trailing stops' extremes) move, and `close()` writes it a last time and unlocks
it. The book is captured on the event loop (consistent, ~2 ms at 1 000 positions and 3 000 orders); its
conversion to JSON (~100 ms there) and the write run on a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from engine.clock import Clock, SystemClock
from engine.exchange.errors import (
    Banned,
    ExchangeError,
    FailureClass,
    OutcomeUnknown,
    RateLimited,
    Retryable,
)
from engine.exchange.port import (
    AccountEvent,
    Balance,
    Capabilities,
    Market,
    MarkPrice,
    Order,
    OrderSide,
    StreamGap,
    StreamState,
    VenuePosition,
)
from engine.venues.sim.book import SimBookFile
from engine.venues.sim.core import DEFAULT_ACCOUNT, STUCK, SimCore
from engine.venues.sim.faults import FaultInjector
from engine.venues.sim.prices import GbmWalk
from engine.venues.sim.settings import CallKind, FaultKind, SimVenueSettings
from engine.venues.sim.universe import select_listings
from engine.words import counted

if TYPE_CHECKING:
    from engine.pacing import VenuePacing

FORCED_RETRY_AFTER_SECONDS = 1.0  # what a forced 429 says to wait
# A call whose answer never comes: the client times out, whether or not the venue executed it.
_ANSWER_LOST = frozenset({FaultKind.TIMEOUT_AFTER_ACCEPT, FaultKind.TIMEOUT_NOT_EXECUTED})

logger = logging.getLogger(__name__)

T = TypeVar("T")

_CLOSE_TIMEOUT_SECONDS = 5.0
BOOK_SAVE_SECONDS = 0.25  # a change to orders, positions or balances is on disk within this
MARKS_SAVE_SECONDS = 5.0  # while only prices move, the marks are saved this often
FORGET_ENDED_ORDERS_SECONDS = 3600.0  # how often a kept book drops orders that ended days ago


class _MarkSubscription:
    """One reader of the mark stream: keeps only the latest mark per symbol (coalescing, bounded)."""

    __slots__ = ("latest", "symbols", "wakeup")

    def __init__(self, symbols: frozenset[str] | None) -> None:
        self.symbols = symbols
        self.latest: dict[str, MarkPrice] = {}
        self.wakeup = asyncio.Event()

    def offer(self, mark: MarkPrice) -> None:
        if self.symbols is None or mark.symbol in self.symbols:
            self.latest[mark.symbol] = mark
            self.wakeup.set()


class _AccountSubscription:
    """One reader of the account stream: every event, in order (nothing coalesced), each delivered at its
    due time (the configured delay); while the connection is down, events are lost and a `StreamGap` is
    owed for when it is back."""

    __slots__ = ("down_until", "gap", "queue", "wakeup")

    def __init__(self) -> None:
        self.queue: deque[tuple[float, AccountEvent]] = deque()  # (due, monotonic), event
        self.wakeup = asyncio.Event()
        self.down_until: float | None = None  # monotonic: the connection is down until then
        self.gap: StreamGap | None = None


class SimVenue:
    def __init__(
        self,
        settings: SimVenueSettings | None = None,
        *,
        clock: Clock | None = None,
        core: SimCore | None = None,
        account_id: str = DEFAULT_ACCOUNT,
        book: SimBookFile | None = None,
    ) -> None:
        if book is not None and core is not None:
            raise ValueError("a sim venue keeps a book of its own core only")
        self._settings = settings if settings is not None else SimVenueSettings()
        self._clock: Clock = clock if clock is not None else SystemClock()
        listings = select_listings(self._settings.symbols, self._settings.synthetic_listings)
        self._core = core if core is not None else SimCore(listings, self._settings, now=self._clock.now())
        self._account_id = account_id
        markets = self._core.markets
        self._walk = GbmWalk(
            seed=self._settings.seed,
            initial_prices={symbol: self._core.mark(symbol) for symbol in markets},
            tick_sizes={symbol: market.tick_size for symbol, market in markets.items()},
            volatility={symbol: self._settings.volatility_for(symbol) for symbol in markets},
        )
        self._faults = FaultInjector(self._settings.latency, self._settings.faults, self._settings.seed)
        self._connected_at = self._clock.monotonic()
        self._ticker: asyncio.Task[None] | None = None
        self._subscribers: set[_MarkSubscription] = set()
        self._closed = False
        self._pacing: VenuePacing | None = None
        self._forced_retry_after = FORCED_RETRY_AFTER_SECONDS
        self._empty_position_answers = 0
        self._empty_open_order_answers = 0
        self.calls_made: dict[CallKind, int] = {}  # requests that reached this venue, by kind
        self._book = book
        self._book_loaded = False
        self._saver: asyncio.Task[None] | None = None
        self._book_write: asyncio.Future[None] | None = None  # the book's last write (a thread)
        self._saved_revisions: tuple[int, int] = (-1, -1)  # (book, marks) revisions on disk
        self._marks_saved_at = 0.0  # monotonic
        # The account stream (see `watch_account`) and the mark stream's state, for `stream_states`.
        self._account_subscribers: set[_AccountSubscription] = set()
        self._account_event_delay: float | None = None  # None: the setting's delay
        self._account_last_event_at: float | None = None  # monotonic
        self._account_reconnects = 0
        self._account_down_until: float | None = None  # monotonic end of the venue's stream outage
        self._marks_published_at: float | None = None  # monotonic
        self._mark_stalls: dict[str, float] = {}  # symbol -> monotonic end of its silent stall
        self._mark_freezes: dict[str, float] = {}  # symbol -> monotonic end of its frozen mark

    # ---- lifecycle ---------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return "sim"

    def capabilities(self) -> Capabilities:
        return self._core.capabilities()

    @property
    def core(self) -> SimCore:
        """The exchange-side state; hand it to a new `SimVenue` to model an engine restart."""
        return self._core

    def attach_pacing(self, pacing: VenuePacing) -> None:
        """The sim venue has order budgets only (the engine's order budget paces those); its calls wait in
        the pacer as ccxt's requests do, and it reports its 429s and bans there."""
        self._pacing = pacing

    @property
    def book(self) -> SimBookFile | None:
        return self._book

    @property
    def book_path(self) -> Path | None:
        """The file the venue's book is kept in (None: an in-memory venue)."""
        return None if self._book is None else self._book.path

    @property
    def book_loaded(self) -> bool:
        """The kept book is open and its positions and orders are back in the venue (a book's lock is
        taken before its contents are read and restored: `book.is_open` alone is true a moment sooner)."""
        return self._book is not None and self._book.is_open and self._book_loaded

    async def connect(self) -> None:
        self._ensure_open()
        if self._book is not None and not self._book.is_open:
            await self._open_book(self._book)
        if self._ticker is None:
            self._connected_at = self._clock.monotonic()
            self._ticker = asyncio.create_task(self._run_ticker(), name="sim-venue-mark-ticker")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for name, task in (("mark ticker", self._ticker), ("book saver", self._saver)):
            if task is not None:
                task.cancel()
                done, _ = await asyncio.wait({task}, timeout=_CLOSE_TIMEOUT_SECONDS)
                if not done:
                    logger.error("sim venue: %s did not stop within %.1fs", name, _CLOSE_TIMEOUT_SECONDS)
        self._ticker = self._saver = None
        if self._book_write is not None:  # a save the saver had under way finishes first
            await asyncio.gather(self._book_write, return_exceptions=True)
        if self._book is not None and self._book.is_open:
            try:
                await self._save_book(self._book)
            except Exception:
                logger.exception("sim venue: could not save its book %s at close", self._book.path)
            finally:
                self._book.close()
        for subscription in self._subscribers:
            subscription.wakeup.set()
        for account_subscription in self._account_subscribers:
            account_subscription.wakeup.set()

    async def __aenter__(self) -> SimVenue:
        await self.connect()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    # ---- the port ----------------------------------------------------------------------------------

    async def load_markets(self) -> Mapping[str, Market]:
        return await self._call(CallKind.LOAD_MARKETS, lambda now: dict(self._core.markets))

    async def fetch_mark_prices(self, symbols: Collection[str] | None = None) -> dict[str, MarkPrice]:
        return await self._call(CallKind.FETCH_MARK_PRICES, lambda now: self._core.mark_prices(symbols))

    async def watch_mark_prices(self, symbols: Collection[str] | None = None) -> AsyncIterator[MarkPrice]:
        self._ensure_open()
        subscription = _MarkSubscription(frozenset(symbols) if symbols is not None else None)
        for mark in self._core.mark_prices(symbols).values():
            subscription.offer(mark)
        self._subscribers.add(subscription)
        try:
            while not self._closed:
                await subscription.wakeup.wait()
                subscription.wakeup.clear()
                batch, subscription.latest = subscription.latest, {}
                for mark in batch.values():
                    yield mark
        finally:
            self._subscribers.discard(subscription)

    async def watch_account(self) -> AsyncIterator[AccountEvent]:
        """The account's order and position events as the core makes them (`SimCore.add_account_listener`),
        for this venue's account: first a `StreamGap` ("connected": read the venue's state once, the stream
        carries changes only), then every event in order, each `account_stream.event_delay_seconds` late; a
        dropped connection loses its events and yields a `StreamGap` once it is back. With
        `account_stream.enabled = false` it ends at once: a venue without account stream."""
        self._ensure_open()
        if not self._settings.account_stream.enabled:
            return
        subscription = _AccountSubscription()
        clock = self._clock
        down_until = self._account_down_until
        if down_until is not None and down_until > clock.monotonic():
            # The outage is the venue's: a connection made during it is down too, "connected" once it ends.
            subscription.down_until = down_until
            subscription.gap = StreamGap("account", since=clock.now(), reason="connected")
        if not self._account_subscribers:
            self._core.add_account_listener(self._on_account_event)
        self._account_subscribers.add(subscription)
        try:
            if subscription.down_until is None:
                yield StreamGap("account", since=clock.now(), reason="connected")
            while not self._closed:
                if subscription.down_until is not None:
                    wait = subscription.down_until - clock.monotonic()
                    if wait > 0:
                        await clock.sleep(wait)
                        continue
                    gap, subscription.gap, subscription.down_until = subscription.gap, None, None
                    first = gap is not None and gap.reason == "connected"  # connected during the outage
                    self._account_reconnects += 0 if first else 1
                    logger.info("sim venue: account stream %s", "connected" if first else "connected again")
                    if gap is not None:
                        yield gap
                    continue
                if not subscription.queue:
                    subscription.wakeup.clear()
                    await subscription.wakeup.wait()
                    continue
                due, event = subscription.queue[0]
                wait = due - clock.monotonic()
                if wait > 0:
                    await clock.sleep(wait)  # a drop meanwhile empties the queue: checked again first
                    continue
                await self._book_durable()  # (an event says what the book holds)
                if not subscription.queue or subscription.queue[0][1] is not event:
                    continue  # dropped meanwhile
                subscription.queue.popleft()
                self._account_last_event_at = clock.monotonic()
                yield event
        finally:
            self._account_subscribers.discard(subscription)
            if not self._account_subscribers:
                self._core.remove_account_listener(self._on_account_event)

    def _on_account_event(self, account_id: str, event: AccountEvent) -> None:
        """The core's listener (synchronous): queue the event for every reader, or drop the connection at
        it (a seeded fault)."""
        if account_id != self._account_id or not self._account_subscribers:
            return
        stream = self._settings.account_stream
        if self._faults.drops_account_stream(stream):
            self.drop_account_stream(stream.down_seconds, reason="connection dropped (sim fault)")
            return
        delay = stream.event_delay_seconds if self._account_event_delay is None else self._account_event_delay
        due = self._clock.monotonic() + delay
        for subscription in self._account_subscribers:
            if subscription.down_until is None:
                subscription.queue.append((due, event))
                subscription.wakeup.set()

    def stream_states(self) -> tuple[StreamState, ...]:
        """The mark stream (always: the ticker pushes marks) and, when enabled, the account stream."""
        now = self._clock.monotonic()
        stalled = sorted(s for s, until in self._mark_stalls.items() if until > now)
        states = [
            StreamState(
                name="marks",
                connected=self._ticker is not None and not self._closed,
                last_event_at=self._marks_published_at,
                reconnects=0,
                subscriptions=len(self._subscribers),
                detail=f"silent for {', '.join(stalled)}" if stalled else "",
            )
        ]
        if self._settings.account_stream.enabled:
            readers = self._account_subscribers
            down = any(r.down_until is not None for r in readers)
            states.append(
                StreamState(
                    name="account",
                    connected=bool(readers) and not down and not self._closed,
                    last_event_at=self._account_last_event_at,
                    reconnects=self._account_reconnects,
                    subscriptions=len(readers),
                    detail="dropped, reconnecting" if down else ("" if readers else "nobody subscribed"),
                )
            )
        return tuple(states)

    async def fetch_balance(self) -> Balance:
        return await self._call(CallKind.FETCH_BALANCE, lambda now: self._core.balance(now, self._account_id))

    async def fetch_positions(self, symbol: str | None = None) -> list[VenuePosition]:
        def positions(now: float) -> list[VenuePosition]:
            found = self._core.positions(now, self._account_id)
            if symbol is not None:
                self._core.mark(symbol)  # refuses an unknown symbol (-1121), as the venue does
                return [p for p in found if p.symbol == symbol]
            since_connect = self._clock.monotonic() - self._connected_at
            if since_connect < self._settings.faults.empty_positions_for_seconds:
                logger.debug("sim venue: answering [] for positions %.1fs after connect", since_connect)
                return []
            if self._empty_position_answers > 0:
                self._empty_position_answers -= 1
                logger.info("sim venue: answering [] for all positions (a glitch, as asked)")
                return []
            return found

        return await self._call(CallKind.FETCH_POSITIONS, positions)

    async def fetch_open_protective_orders(self, symbol: str | None = None) -> list[Order]:
        def listed(now: float) -> list[Order]:
            if symbol is None and self._empty_open_order_answers > 0:
                self._empty_open_order_answers -= 1
                logger.info("sim venue: answering [] for all open orders (a glitch, as asked)")
                return []
            return self._core.open_protective_orders(now, symbol, self._account_id)

        return await self._call(CallKind.FETCH_OPEN_ORDERS, listed)

    async def set_leverage(self, symbol: str, leverage: int) -> int:
        return await self._call(
            CallKind.SET_LEVERAGE,
            lambda now: self._core.set_leverage(symbol, leverage, now, self._account_id),
        )

    async def create_market_order(
        self,
        symbol: str,
        side: OrderSide,
        quantity: Decimal,
        *,
        client_order_id: str,
        reduce_only: bool = False,
    ) -> Order:
        return await self._call(
            CallKind.CREATE_ORDER,
            lambda now: self._core.place_market_order(
                symbol,
                side,
                quantity,
                client_order_id,
                now,
                reduce_only=reduce_only,
                account_id=self._account_id,
            ),
            client_order_id=client_order_id,
            market_symbol=symbol,
        )

    async def create_stop_market_order(
        self,
        symbol: str,
        side: OrderSide,
        quantity: Decimal,
        stop_price: Decimal,
        *,
        client_order_id: str,
    ) -> Order:
        return await self._call(
            CallKind.CREATE_ORDER,
            lambda now: self._core.place_stop_market_order(
                symbol, side, quantity, stop_price, client_order_id, now, account_id=self._account_id
            ),
            client_order_id=client_order_id,
            stop=True,
        )

    async def create_trailing_stop_order(
        self,
        symbol: str,
        side: OrderSide,
        quantity: Decimal,
        callback_rate: Decimal,
        *,
        client_order_id: str,
        activation_price: Decimal | None = None,
    ) -> Order:
        return await self._call(
            CallKind.CREATE_ORDER,
            lambda now: self._core.place_trailing_stop_order(
                symbol,
                side,
                quantity,
                callback_rate,
                client_order_id,
                now,
                activation_price=activation_price,
                account_id=self._account_id,
            ),
            client_order_id=client_order_id,
            stop=True,
        )

    async def cancel_order(self, symbol: str, client_order_id: str) -> Order:
        return await self._call(
            CallKind.CANCEL_ORDER,
            lambda now: self._core.cancel_order(symbol, client_order_id, now, self._account_id),
            client_order_id=client_order_id,
        )

    async def fetch_order(self, symbol: str, client_order_id: str) -> Order:
        return await self._call(
            CallKind.FETCH_ORDER,
            lambda now: self._core.get_order(symbol, client_order_id, now, self._account_id),
        )

    # ---- control surface (tests, demos) ------------------------------------------------------------

    def override_mark_price(self, symbol: str, price: Decimal) -> list[Order]:
        """Set a symbol's mark now (the walk continues from it) and return the orders it triggered."""
        market = self._core.markets[symbol]
        on_tick = market.round_price(price)
        self._walk.set_price(symbol, on_tick)
        changed = self._core.set_mark(symbol, on_tick, self._clock.now())
        self._publish(symbol, changed)
        return changed

    def set_trigger_delay(
        self, seconds: float | None, *, symbol: str | None = None, stuck: bool = False
    ) -> None:
        """Make conditional orders that fire from now on sit TRIGGERING (port status `TRIGGERED`) for
        `seconds` of clock time before their fill executes, as Binance's algo orders do between the
        trigger and the matching engine's fill; `stuck=True`: they never fill. None or 0: at once (the
        default). With `symbol`, for that symbol only."""
        if stuck and seconds is not None:
            raise ValueError("a stuck trigger has no delay: pass seconds=None with stuck=True")
        if symbol is not None and symbol not in self._core.markets:
            raise ValueError(f"unknown symbol {symbol!r}")
        self._core.set_trigger_delay(STUCK if stuck else seconds, symbol=symbol)

    def end_stuck_triggers(self, symbol: str) -> int:
        """The fired orders of `symbol` stuck in TRIGGERING (`set_trigger_delay(stuck=True)`) finish now:
        filled if their position is still there, else expired. Returns how many there were."""
        if symbol not in self._core.markets:
            raise ValueError(f"unknown symbol {symbol!r}")
        return self._core.end_stuck_triggers(symbol, self._clock.now())

    def set_read_lag(self, seconds: float) -> None:
        """Conditional orders placed from now on read back as unknown (`fetch_order` and `cancel_order`
        raise `NotFound`, `fetch_open_protective_orders` leaves them out) for `seconds` of clock time, as
        Binance's algo service does right after a placement; they exist, trigger and hold their client id
        meanwhile. `capabilities().read_after_write_seconds` announces it. 0: never (the default)."""
        self._core.set_read_lag(seconds)

    def set_market_fill(self, seconds: float = 0.0, *, share: Decimal = Decimal(1)) -> None:
        """Market orders that open or add to a position, placed from now on, are answered NEW and execute
        `seconds` of clock time later at the mark of then (Bybit's order creation is asynchronous: its
        answer only says the order was accepted), and only `share` of their quantity fills, the rest
        cancelled (an order ending part-filled). The default (0 s, all of it): at once, in full."""
        self._core.set_market_fill(seconds, share=share)

    def set_stop_fill(self, share: Decimal = Decimal(1)) -> None:
        """Fired stops execute only `share` of their quantity, the rest expired (a triggered MARKET order
        in a thin book: Binance ends it EXPIRED with an executed quantity); the position keeps the rest.
        The default, 1: all of it."""
        self._core.set_stop_fill(share)

    def drop_account_stream(self, seconds: float, *, reason: str = "connection dropped (as asked)") -> None:
        """The account stream's connection drops now and is back after `seconds` of clock time: events
        queued and made meanwhile are lost, and each reader gets a `StreamGap` when it is back. A reader
        that connects meanwhile is down too until then."""
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        since = self._clock.now()
        until = self._clock.monotonic() + seconds
        self._account_down_until = max(until, self._account_down_until or until)
        for subscription in self._account_subscribers:
            subscription.queue.clear()
            if subscription.down_until is None:
                subscription.gap = StreamGap("account", since=since, reason=reason)
            subscription.down_until = max(until, subscription.down_until or until)
            subscription.wakeup.set()
        logger.info("sim venue: account stream %s for %.1fs", reason, seconds)

    def delay_account_events(self, seconds: float | None) -> None:
        """Account events made from now on arrive `seconds` late (None: back to the setting)."""
        if seconds is not None and seconds < 0:
            raise ValueError("seconds must be >= 0 (or None)")
        self._account_event_delay = seconds

    def stall_marks(self, symbol: str, seconds: float) -> None:
        """The mark stream stays connected but sends nothing for `symbol` for `seconds` of clock time (a
        silent stall of one subscription); the venue's marks go on moving and firing stops meanwhile."""
        if symbol not in self._core.markets:
            raise ValueError(f"unknown symbol {symbol!r}")
        self._mark_stalls[symbol] = self._clock.monotonic() + seconds

    def freeze_marks(self, symbol: str, seconds: float) -> None:
        """The venue stops computing `symbol`'s mark for `seconds` of clock time: the stream brings none
        and a REST read answers the last one, with its time, again and again (as a venue that stopped
        publishing a symbol's mark does). Its stops see no new mark meanwhile."""
        if symbol not in self._core.markets:
            raise ValueError(f"unknown symbol {symbol!r}")
        self._mark_freezes[symbol] = self._clock.monotonic() + seconds

    def inject_fault(
        self,
        kind: CallKind,
        fault: FaultKind,
        count: int = 1,
        *,
        stops_only: bool = False,
        market_symbol: str | None = None,
    ) -> None:
        self._faults.force(kind, fault, count, stops_only=stops_only, market_symbol=market_symbol)

    def set_forced_retry_after(self, seconds: float) -> None:
        """What an injected 429 (`FaultKind.RATE_LIMITED`) says to wait, its `Retry-After` (1 s unless set):
        the venues' own vary."""
        if seconds <= 0:
            raise ValueError("seconds must be > 0")
        self._forced_retry_after = seconds

    def answer_positions_empty(self, count: int = 1) -> None:
        """The next `count` reads of *all* positions answer `[]` whatever the account holds, at any time
        (not only right after connecting, as `faults.empty_positions_for_seconds` does), as Binance was seen
        to: the incident bot deleted every state on it. A read of one symbol still answers truly."""
        if count < 1:
            raise ValueError("count must be >= 1")
        self._empty_position_answers += count

    def answer_open_orders_empty(self, count: int = 1) -> None:
        """The next `count` listings of *all* open orders answer `[]` whatever the account holds: a listing
        that leaves live orders out (a glitch, or a read lagging past the one the engine counts on, which
        Binance documents only as "seconds"). A look-up by id, or a listing of one symbol, answers truly."""
        if count < 1:
            raise ValueError("count must be >= 1")
        self._empty_open_order_answers += count

    def clear_injected_faults(self) -> None:
        self._faults.clear_forced()
        self._empty_position_answers = 0
        self._empty_open_order_answers = 0

    # ---- the kept book ------------------------------------------------------------------------------

    async def _open_book(self, book: SimBookFile) -> None:
        """Lock and load the book (before anything trades), then start saving it."""
        saved = await asyncio.to_thread(book.open)
        try:
            if saved is not None:
                self._restore(book, saved)
            self._saved_revisions = (self._core.book_revision, self._core.marks_revision)
            if saved is None:
                await self._save_book(book)  # the book exists from the first connect
        except BaseException:
            book.close()
            raise
        self._marks_saved_at = self._clock.monotonic()
        self._book_loaded = True
        self._saver = asyncio.create_task(self._run_saver(book), name="sim-venue-book-saver")

    def _restore(self, book: SimBookFile, saved: dict[str, Any]) -> None:
        try:
            core = saved["core"]
            walk = saved["walk"]
            if not isinstance(core, dict) or not isinstance(walk, dict):
                raise ValueError("malformed book (no core or walk)")
            self._core.restore_book(core)
            latent = {symbol: Decimal(str(price)) for symbol, price in walk.items()}
        except (KeyError, ValueError, ArithmeticError) as exc:
            raise book.unreadable(str(exc)) from None
        for symbol in self._core.markets:
            # The walk continues from where it was: its unquantized price, else the restored mark.
            price = latent.get(symbol)
            self._walk.set_price(
                symbol, price if price is not None and price > 0 else self._core.mark(symbol)
            )
        held = self._core.inspect(self._clock.now(), self._account_id)
        logger.info(
            "sim venue: book %s restored: %s, %s, %d triggering",
            book.path,
            counted(len(held.positions), "position"),
            counted(len(held.open_conditional), "open conditional order"),
            len(held.triggering),
        )

    async def _save_book(self, book: SimBookFile) -> None:
        while self._book_write is not None and not self._book_write.done():  # one write at a time
            await asyncio.wait({self._book_write})
        revisions = (self._core.book_revision, self._core.marks_revision)
        now = self._clock.now()
        captured = self._core.capture_book(now)  # on the loop: consistent, cheap
        walk = self._walk.latent_prices()

        def write() -> None:  # the conversion and the write, off the loop
            core = SimCore.book_of(captured)
            book.save({"saved_at": now, "core": core, "walk": {s: str(p) for s, p in walk.items()}})

        # A cancelled caller (the saver, at close) does not stop the thread: close waits for it, so two
        # writes of one book never overlap (the later one's rename found the temporary file gone, and an
        # older state could land after a newer one). Nor do two callers' writes: each waits for the write
        # under way (`_save_book` is called by the saver and by every answer that waits for its change).
        written = asyncio.ensure_future(asyncio.to_thread(write))

        def saved(done: asyncio.Future[None]) -> None:  # before any waiter resumes: it sees the revision
            if not done.cancelled() and done.exception() is None:
                self._saved_revisions = revisions
                self._marks_saved_at = self._clock.monotonic()

        written.add_done_callback(saved)
        self._book_write = written
        await asyncio.shield(written)

    async def _book_durable(self) -> None:
        """Wait until the book on disk holds every change made so far: an order's answer (and its account
        event) waits for it, as an exchange does not confirm an order it could forget. Confirmed first and
        saved up to a save interval later, a stop the engine had confirmed and recorded was gone from the
        book after a SIGKILL in between, the records "covered" and the venue without it (an operator)."""
        book = self._book
        if book is None or not self._book_loaded or not book.is_open:
            return
        wanted = self._core.book_revision
        while self._saved_revisions[0] < wanted:
            under_way = self._book_write
            if under_way is not None and not under_way.done():
                await asyncio.wait({under_way})  # it may hold this change already
                continue
            try:
                await self._save_book(book)
            except Exception:  # said by the saver, which tries again; the answer does not wait for it
                return

    async def _run_saver(self, book: SimBookFile) -> None:
        failing = False
        forgotten_at = self._clock.monotonic()
        while True:
            await self._clock.sleep(BOOK_SAVE_SECONDS)
            if self._clock.monotonic() - forgotten_at >= FORGET_ENDED_ORDERS_SECONDS:
                forgotten_at = self._clock.monotonic()
                self._core.forget_ended_orders(self._clock.now())
            book_revision, marks_revision = self._saved_revisions
            book_changed = self._core.book_revision != book_revision
            marks_due = (
                self._core.marks_revision != marks_revision
                and self._clock.monotonic() - self._marks_saved_at >= MARKS_SAVE_SECONDS
            )
            if not (book_changed or marks_due):
                continue
            try:
                await self._save_book(book)
            except Exception as exc:
                if not failing:
                    logger.error("sim venue: could not save its book %s (%s); retrying", book.path, exc)
                failing = True
                continue
            if failing:
                logger.info("sim venue: book %s saved again", book.path)
            failing = False

    # ---- internals ---------------------------------------------------------------------------------

    def _ensure_open(self) -> None:
        if self._closed:
            raise RuntimeError("sim venue is closed")

    async def _call(
        self,
        kind: CallKind,
        operation: Callable[[float], T],
        *,
        client_order_id: str | None = None,
        stop: bool = False,
        market_symbol: str | None = None,
    ) -> T:
        self._ensure_open()
        if self._pacing is not None:
            # As every ccxt request does: wait out a 429's hold and a ban (protective calls), or be refused
            # at home during a ban (reads, entries). The sim has no request weight: nothing is booked.
            await self._pacing.requests.acquire({}, mutating=kind.mutates)
        self.calls_made[kind] = self.calls_made.get(kind, 0) + 1
        plan = self._faults.plan(kind, stop=stop, market_symbol=market_symbol)
        timeout = self._settings.request_timeout_seconds
        half = plan.latency / 2
        arrival = min(half, timeout)
        if plan.fault is FaultKind.NETWORK_ERROR_BEFORE_SEND:
            await self._clock.sleep(arrival)
            raise Retryable(f"sim {kind}: network error before the request was sent").answered(
                failure=FailureClass.NOT_SENT
            )
        await self._clock.sleep(arrival)
        if plan.fault is FaultKind.RATE_LIMITED:
            await self._clock.sleep(min(half, timeout - arrival))
            wait = self._forced_retry_after
            if self._pacing is not None:  # a request-rate 429: reported as a ccxt venue reports one
                self._pacing.rate_limited(wait)
            raise RateLimited(wait, f"sim {kind}: HTTP 429 (as asked)").answered(http_status=429)
        if plan.fault is FaultKind.SERVER_ERROR:
            await self._clock.sleep(min(half, timeout - arrival))
            raise Retryable(f"sim {kind}: HTTP 500 before execution").answered(http_status=500)
        answer_lost = plan.fault in _ANSWER_LOST or plan.latency > timeout
        refusal: ExchangeError | None = None
        result: T | None = None
        try:
            if plan.fault is not FaultKind.TIMEOUT_NOT_EXECUTED:
                result = operation(self._clock.now())
        except ExchangeError as error:
            refusal = error
        if kind.mutates:
            await self._book_durable()
        if answer_lost:
            await self._clock.sleep(timeout - arrival)
            logger.info(
                "sim venue: %s answer lost after %.2fs (client id %s)", kind, timeout, client_order_id
            )
            if kind.mutates:
                raise OutcomeUnknown(client_order_id, f"sim {kind}: no answer within {timeout:g}s").answered(
                    failure=FailureClass.TIMEOUT
                )
            raise Retryable(f"sim {kind}: read timed out after {timeout:g}s").answered(
                failure=FailureClass.TIMEOUT
            )
        await self._clock.sleep(half)
        if refusal is not None:
            self._report_pacing(refusal)
            raise refusal
        return result  # type: ignore[return-value]  # set whenever refusal is None

    def _report_pacing(self, refusal: ExchangeError) -> None:
        """A ban or an order-rate refusal reaches the engine's pacer as the ccxt venue reports a 418 or a 429:
        nothing more is sent to a banned account until the ban ends (each refused call would lengthen it)."""
        pacing = self._pacing
        if pacing is None:
            return
        if isinstance(refusal, Banned):
            pacing.banned(refusal.until)
        elif isinstance(refusal, RateLimited):
            pacing.rate_limited(refusal.retry_after, orders_only=True)  # the sim limits order counts only

    async def _run_ticker(self) -> None:
        interval = self._settings.mark_tick_seconds
        while True:
            await self._clock.sleep(interval)
            try:
                self._tick(interval)
            except Exception:
                logger.exception("sim venue: mark tick failed; the ticker keeps running")

    def _tick(self, interval: float) -> None:
        marks = self._walk.step(interval)
        now = self._clock.now()
        for symbol, price in marks.items():
            frozen = self._mark_freezes.get(symbol)
            if frozen is not None:
                if self._clock.monotonic() < frozen:
                    continue
                del self._mark_freezes[symbol]
            changed = self._core.set_mark(symbol, price, now)
            self._publish(symbol, changed)

    def _publish(self, symbol: str, changed: list[Order]) -> None:
        for order in changed:
            logger.info(
                "sim venue: %s %s %s %s (filled %s at %s)",
                order.symbol,
                order.type,
                order.client_order_id,
                order.status,
                order.filled_quantity,
                order.average_price,
            )
        if self._subscribers:
            stall = self._mark_stalls.get(symbol)
            if stall is not None:
                if self._clock.monotonic() < stall:
                    return  # silent for this symbol
                del self._mark_stalls[symbol]
            self._marks_published_at = self._clock.monotonic()
            mark = self._core.mark_prices([symbol])[symbol]
            for subscription in self._subscribers:
                subscription.offer(mark)

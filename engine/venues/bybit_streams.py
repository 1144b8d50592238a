"""Bybit v5 push streams for `BybitLinearVenue`: mark prices from the public `tickers.{symbol}` topic and
the account's order, execution and position changes from the private channel, each on one reconnecting
websocket (the lifecycle shared with Binance: `engine.venues.stream_client`).

Wire (bybit-exchange.github.io/docs/v5/ws/connect and the topic pages):

* public `wss://stream.bybit.com/v5/public/linear`: `{"op": "subscribe", "args": ["tickers.BTCUSDT", ...],
  "req_id": ...}`. A ticker topic sends a `snapshot` (every field), then `delta` messages with only the
  fields that changed: the last mark of each symbol is kept and a delta merged into it, so a delta with no
  `markPrice` still says the mark stands as of its `ts`. Linear tickers push every 100 ms while anything
  changed. Bybit has no all-market ticker topic: every symbol is subscribed by name, `_ARGS_PER_REQUEST`
  per request, and at most 21 000 characters of topics a connection (about 1 400 symbols; more are read
  by REST). A topic silent for `stale_mark_seconds` is subscribed again (an "already subscribed" answer
  means it is only quiet) and its marks come from REST (`fetch_mark_prices`) meanwhile.
* private `wss://stream.bybit.com/v5/private`: `{"op": "auth", "args": [apiKey, expires, signature]}`
  with signature = hex HMAC-SHA256(secret, "GET/realtime" + expires), then `order`, `execution`,
  `position`. Once subscribed after any interruption the stream yields a `StreamGap`. Every
  `subscription_check_seconds` each private topic is subscribed again: "already subscribed" says the venue
  still holds it; a success says it had been forgotten, so events may have been missed: a `StreamGap`.
  An auth refusal (wrong key, wrong signature) is logged once as an error, the private stream stops (it
  does not loop) and `watch_account` ends: the reconciler's polling is then the only source.
* heartbeat: `{"op": "ping"}` (Bybit asks for one every 20 s; we send one when nothing came for half of
  `stall_seconds`); nothing at all for `stall_seconds` is a stall: reconnect.

Ids: the engine's position stops have no id on Bybit (they are the position's `stopLoss` / `trailingStop`,
shown as system-created orders with `stopOrderType` StopLoss / TrailingStop and no `orderLinkId`); the
venue names them (`name_stop`): a fired position stop is told under our id, FILLED, with the volume-
weighted price of its executions from the `execution` topic (or the order's `avgPrice` when the
execution has not arrived). With neither, the FILLED waits for the execution `fill_wait_seconds` at most,
then asks REST (`execution/list` of that order): a lost execution message does not hold a closed
position open until a reconcile pass; should REST not know the price either, the FILLED is told without
one (the exit is known, its price is not: never a made-up price). Orders sent with an `orderLinkId` are
told under it; anything else is not ours and skipped.

A position stop someone else moved (the web UI, another tool on the account: a hard stop at another price,
another trailing distance) is not ours any more: the venue says so (`name_stop` on the stop order's row,
`moved_stops` on the position's row, which carries `stopLoss` and `trailingStop`) and it is told CANCELED
under our id, at once, as a stop someone removed is.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import replace
from decimal import Decimal, InvalidOperation
from typing import Any

import aiohttp

from engine.exchange.port import (
    AccountEvent,
    MarkPrice,
    Order,
    OrderSide,
    OrderStatus,
    OrderType,
    OrderUpdate,
    PositionSide,
    PositionUpdate,
    StreamGap,
    StreamState,
)
from engine.venues.stream_client import (
    MarkTopics,
    Reconnect,
    ReconnectingSocket,
    StatusLedger,
    StreamRefused,
    StreamSettings,
    Supervisor,
    positive_or_none,
    seconds_from_ms,
)
from engine.venues.stream_client import decimal_or_none as _decimal

logger = logging.getLogger(__name__)

PRODUCTION_PUBLIC_URL = "wss://stream.bybit.com/v5/public/linear"
PRODUCTION_PRIVATE_URL = "wss://stream.bybit.com/v5/private"
TESTNET_PUBLIC_URL = "wss://stream-testnet.bybit.com/v5/public/linear"
TESTNET_PRIVATE_URL = "wss://stream-testnet.bybit.com/v5/private"
PRIVATE_TOPICS = ("order", "execution", "position")
MAX_ARGS_CHARS = 21_000
_ARGS_PER_REQUEST = 10
_AUTH_EXPIRES_SECONDS = 10.0
_REPEAT_SECONDS = 1.0
_HOLD_SECONDS = 2.0
_ZERO = Decimal(0)
_STOP_TYPES = {"StopLoss": OrderType.STOP_MARKET, "TrailingStop": OrderType.TRAILING_STOP_MARKET}
_ORDER_STATUS = {
    "Created": OrderStatus.NEW,
    "New": OrderStatus.NEW,
    "PartiallyFilled": OrderStatus.NEW,
    "Untriggered": OrderStatus.NEW,
    "Triggered": OrderStatus.TRIGGERED,  # fired, on its way to a fill: protects nothing any more
    "Filled": OrderStatus.FILLED,
    "Cancelled": OrderStatus.CANCELED,
    "PartiallyFilledCanceled": OrderStatus.CANCELED,
    "Deactivated": OrderStatus.CANCELED,  # the venue removed a stop (the position closed otherwise)
    "Rejected": OrderStatus.EXPIRED,
}

# The venue's view of a position stop it knows under our id: (symbol, stopOrderType's OrderType, the
# closing side, the venue's orderId, the row's triggerPrice, its updatedTime in ms) -> its snapshot (our
# client id, quantity, trigger), or None (not ours, or a row that cannot be the stop's order). CANCELED:
# the row shows the stop moved by someone else (another trigger price): not ours any more.
NameStop = Callable[[str, OrderType, OrderSide, str, Decimal | None, int | None], Order | None]
# The position's row (symbol, the position's side, the row's fields) -> our stops on it whose field holds a
# value someone else set, each as it is now: ended (CANCELED).
MovedStops = Callable[[str, PositionSide, Mapping[str, Any]], list[Order]]
# REST's word on one order's fill: (symbol, the venue's orderId) -> its volume-weighted price, or None.
RestFillPrice = Callable[[str, str], Awaitable[Decimal | None]]
FILL_WAIT_SECONDS = 1.0


def ticker_topic(symbol: str) -> str:
    return f"tickers.{symbol}"


def auth_args(api_key: str, api_secret: str, expires_ms: int) -> list[Any]:
    signature = hmac.new(
        api_secret.encode(), f"GET/realtime{expires_ms}".encode(), hashlib.sha256
    ).hexdigest()
    return [api_key, expires_ms, signature]


async def _op_ping(ws: aiohttp.ClientWebSocketResponse) -> None:
    await ws.send_str('{"op":"ping"}')


class BybitStreams:
    def __init__(
        self,
        *,
        public_url: str,
        private_url: str,
        api_key: str,
        api_secret: str,
        settings: StreamSettings,
        session: Callable[[], aiohttp.ClientSession],
        rest_marks: Callable[[Collection[str] | None], Awaitable[dict[str, MarkPrice]]],
        name_stop: NameStop,
        mark_poll_seconds: float,
        rest_fill_price: RestFillPrice | None = None,
        fill_wait_seconds: float = FILL_WAIT_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
        moved_stops: MovedStops | None = None,
        server_time_ms: Callable[[], int] | None = None,
        resync_clock: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """`server_time_ms`: now on the venue's clock (REST's, corrected for our clock's drift), what the
        auth's `expires` counts from; `resync_clock`: reads the venue's clock again (an auth refused as
        expired, our clock having moved since)."""
        self._public_url = public_url
        self._server_time_ms = server_time_ms or (lambda: int(time.time() * 1000))
        self._resync_clock = resync_clock
        self._private_url = private_url
        self._api_key = api_key
        self._api_secret = api_secret
        self._settings = settings
        self._rest_marks = rest_marks
        self._name_stop = name_stop
        self._moved_stops = moved_stops
        self._rest_fill_price = rest_fill_price
        self._fill_wait_seconds = fill_wait_seconds
        self._mark_poll_seconds = mark_poll_seconds
        self._check_seconds = settings.subscription_check_seconds
        self._monotonic = monotonic
        self._public = ReconnectingSocket("bybit", "marks", settings, session, ping=_op_ping)
        self._private = ReconnectingSocket("bybit", "account", settings, session, ping=_op_ping)
        self._supervisor = Supervisor("bybit")
        self._closed = False
        self._req_ids = 0
        # Marks.
        self._marks = MarkTopics(
            "bybit",
            self._public,
            settings,
            subscribe=self._send_subscribe,
            unsubscribe=self._send_unsubscribe,
            symbols_of=lambda stale, _wanted: sorted(t.split(".", 1)[1] for t in stale),
            rest_marks=rest_marks,
            poll_seconds=mark_poll_seconds,
            on_rest_mark=self._note_offered,
        )
        self._tickers: dict[str, dict[str, Any]] = {}  # symbol -> merged ticker fields
        self._offered: dict[str, MarkPrice] = {}  # symbol -> the last mark passed on (stream or REST)
        # Account.
        self._listeners: list[asyncio.Queue[AccountEvent | None]] = []
        self._started_at = time.time()
        self._live = False  # authenticated and subscribed on the current connection
        self._pending_topics: set[str] = set()
        self._ledger = StatusLedger()
        self._fills: OrderedDict[str, tuple[Decimal, Decimal]] = OrderedDict()  # orderId -> (qty, notional)
        self._awaiting_fill: dict[str, tuple[Order, float]] = {}  # orderId -> (FILLED order sans price, time)
        self._fill_waits: dict[str, asyncio.Task[None]] = {}  # orderId -> its bounded wait, then REST
        self._position_sides: dict[str, PositionSide] = {}
        self._held_cancels: dict[str, list[tuple[Order, float, str]]] = {}  # symbol -> deactivated stops
        self._ended: OrderedDict[str, Order] = OrderedDict()  # client id -> its final state, as told
        self._positions_at: dict[str, float] = {}

    # ---- lifecycle ------------------------------------------------------------------------------------

    async def close(self) -> None:
        self._closed = True
        for queue in self._listeners:
            queue.put_nowait(None)
        self._marks.close()
        waits = list(self._fill_waits.values())
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        await self._supervisor.close()

    def _next_req_id(self, prefix: str) -> str:
        self._req_ids += 1
        return f"{prefix}-{self._req_ids}"

    def _engine_clock(self, at: float | None) -> float | None:
        return None if at is None else self._monotonic() - (time.monotonic() - at)

    def states(self) -> tuple[StreamState, ...]:
        states = []
        tasks = self._supervisor.tasks
        if "marks" in tasks:
            states.append(self._marks.state(self._engine_clock))
        if "account" in tasks:
            states.append(
                StreamState(
                    name="account",
                    connected=self._private.connected and self._live,
                    last_event_at=self._engine_clock(self._private.last_message_at),
                    reconnects=self._private.reconnects,
                    subscriptions=len(PRIVATE_TOPICS) if self._live else 0,
                    detail=self._private.detail if not self._live else "",
                )
            )
        return tuple(states)

    # ---- mark prices ----------------------------------------------------------------------------------

    async def watch_mark_prices(self, symbols: Collection[str] | None) -> AsyncIterator[MarkPrice]:
        """`symbols` by name: Bybit has no all-market ticker topic (the venue passes every market's)."""
        wanted = frozenset(symbols or ())
        topics = [ticker_topic(s) for s in sorted(wanted)]
        async for mark in self._marks.watch(
            topics, wanted, lambda: self._closed, lambda: self._supervisor.start("marks", self._run_public)
        ):
            yield mark

    async def _send_subscribe(self, topics: list[str]) -> None:
        budget = MAX_ARGS_CHARS
        for chunk in _chunks(topics):
            size = sum(len(t) for t in chunk)
            if size > budget:
                logger.warning(
                    "bybit marks stream: past Bybit's 21 000 characters of topics; the rest by REST"
                )
                return
            budget -= size
            await self._public.send({"op": "subscribe", "args": chunk, "req_id": self._next_req_id("sub")})

    async def _send_unsubscribe(self, topics: list[str]) -> None:
        for chunk in _chunks(topics):
            await self._public.send(
                {"op": "unsubscribe", "args": chunk, "req_id": self._next_req_id("unsub")}
            )

    async def _run_public(self) -> None:
        async def url() -> str:
            return self._public_url

        async def on_open(_ws: aiohttp.ClientWebSocketResponse) -> None:
            topics = self._marks.reopened()
            if topics:
                await self._marks.subscribe(topics)

        await self._public.run(url, on_open, self._on_public_message)

    async def _on_public_message(self, payload: Any) -> None:
        if not isinstance(payload, dict):
            return
        if "op" in payload:
            if payload.get("success") is False and "already subscribed" not in str(payload.get("ret_msg")):
                logger.warning(
                    "bybit marks stream: %s refused: %s", payload.get("op"), payload.get("ret_msg")
                )
            return
        topic, data = payload.get("topic"), payload.get("data")
        if not isinstance(topic, str) or not topic.startswith("tickers.") or not isinstance(data, dict):
            return
        symbol = topic[len("tickers.") :]
        self._marks.heard(topic, time.monotonic())
        if payload.get("type") == "snapshot":
            state = self._tickers[symbol] = dict(data)
        else:
            state = self._tickers.setdefault(symbol, {})
            state.update(data)  # a delta carries only what changed
        price = positive_or_none(state.get("markPrice"))
        if price is None:
            return  # a delta before any snapshot: nothing known yet
        mark = MarkPrice(symbol, price, seconds_from_ms(payload.get("ts"), time.time()))
        before = self._offered.get(symbol)
        if (
            before is not None
            and before.price == price
            and mark.timestamp - before.timestamp < _REPEAT_SECONDS
        ):
            return  # an unchanged mark is passed on once a second (its freshness), not ten times
        self._offer(mark)

    def _offer(self, mark: MarkPrice) -> None:
        self._note_offered(mark)
        self._marks.offer(mark)

    def _note_offered(self, mark: MarkPrice) -> None:
        self._offered[mark.symbol] = mark

    # ---- account --------------------------------------------------------------------------------------

    async def watch_account(self) -> AsyncIterator[AccountEvent]:
        if self._closed or self._private.refused is not None:
            return  # refused for good: the reconciler's polling is the only source
        queue: asyncio.Queue[AccountEvent | None] = asyncio.Queue()
        self._listeners.append(queue)
        self._supervisor.start("account", self._run_private)
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._listeners.remove(queue)

    def _emit(self, event: AccountEvent) -> None:
        for queue in self._listeners:
            queue.put_nowait(event)

    async def _run_private(self) -> None:
        checker: asyncio.Task[None] | None = None

        async def url() -> str:
            return self._private_url

        async def on_open(_ws: aiohttp.ClientWebSocketResponse) -> None:
            nonlocal checker
            self._live = False
            self._pending_topics = set(PRIVATE_TOPICS)
            # Counted on the venue's clock: a local clock 10 s behind Bybit's had every auth refused.
            expires = self._server_time_ms() + int(_AUTH_EXPIRES_SECONDS * 1000)
            await self._private.send(
                {"op": "auth", "args": auth_args(self._api_key, self._api_secret, expires), "req_id": "auth"}
            )
            if checker is not None:
                checker.cancel()
            checker = asyncio.create_task(
                self._check_subscriptions(), name="bybit-private-subscription-check"
            )

        try:
            await self._private.run(url, on_open, self._on_private_message)
        finally:
            self._live = False
            if checker is not None:
                checker.cancel()
                await asyncio.gather(checker, return_exceptions=True)
            if self._private.refused is not None:
                for queue in self._listeners:
                    queue.put_nowait(None)  # no account stream: the readers fall back to polling

    async def _check_subscriptions(self) -> None:
        """Ask for each private topic again now and then: "already subscribed" is the venue saying it still
        holds it; a plain success means it had been forgotten (events may be lost): a gap."""
        while True:
            await asyncio.sleep(self._check_seconds)
            if self._live:
                for topic in PRIVATE_TOPICS:
                    await self._private.send({"op": "subscribe", "args": [topic], "req_id": f"check-{topic}"})

    async def _on_private_message(self, payload: Any) -> None:
        if not isinstance(payload, dict):
            return
        op = payload.get("op")
        if op is not None:
            await self._on_private_answer(str(op), payload)
            return
        topic = str(payload.get("topic", "")).split(".", 1)[0]
        rows = payload.get("data")
        if not isinstance(rows, list):
            return
        event_time = seconds_from_ms(payload.get("creationTime"), time.time())
        for row in rows:
            if not isinstance(row, dict) or row.get("category", "linear") != "linear":
                continue
            try:
                if topic == "order":
                    self._on_order(row, event_time)
                elif topic == "execution":
                    self._on_execution(row, event_time)
                elif topic == "position":
                    self._on_position(row, event_time)
            except (KeyError, TypeError, ValueError, InvalidOperation):
                logger.warning("bybit account stream: unreadable %s row skipped", topic)

    async def _on_private_answer(self, op: str, payload: Mapping[str, Any]) -> None:
        success, message = payload.get("success"), str(payload.get("ret_msg") or "")
        req_id = str(payload.get("req_id") or "")
        if op == "auth":
            if not success:
                # Bybit answers an auth whose `expires` has passed (our clock behind its own) with a bare
                # "Params Error": the clock is read again and the connection retried with backoff, not
                # given up for good as a wrong key is.
                if "expire" in message.lower() or message.startswith("Params Error"):
                    await self._resync()
                    raise Reconnect(
                        f"authentication refused as expired ({message}); the venue's clock read again"
                    )
                raise StreamRefused(f"authentication refused by Bybit: {message or 'no reason given'}")
            await self._private.send({"op": "subscribe", "args": list(PRIVATE_TOPICS), "req_id": "topics"})
        elif op == "subscribe" and req_id.startswith("check-"):
            topic = req_id[len("check-") :]
            if success:
                logger.warning(
                    "bybit account stream: the venue had dropped the %s topic; subscribed again", topic
                )
                self._emit(
                    StreamGap(stream="account", since=time.time(), reason=f"the {topic} topic was dropped")
                )
        elif op == "subscribe":
            if not success:
                raise Reconnect(f"subscription refused: {message}")
            self._live = True
            lost_at = self._private.lost_at
            since = lost_at if lost_at is not None else self._started_at
            reason = self._private.last_reason if self._private.reconnects else "stream started"
            self._emit(StreamGap(stream="account", since=since, reason=reason or "connected"))
            logger.info("bybit account stream: live (%s)", reason or "connected")

    async def _resync(self) -> None:
        if self._resync_clock is None:
            return
        try:
            await self._resync_clock()
        except Exception as exc:  # the reconnect's backoff tries again; the REST path says its own failures
            logger.warning("bybit account stream: could not read the venue's clock (%s)", exc)

    def _on_order(self, row: Mapping[str, Any], event_time: float) -> None:
        status_text = str(row.get("orderStatus", ""))
        status = _ORDER_STATUS.get(status_text)
        if status is None:
            return
        order_id, link_id = str(row.get("orderId", "")), str(row.get("orderLinkId") or "")
        stop_type = _STOP_TYPES.get(str(row.get("stopOrderType") or ""))
        if stop_type is not None and not link_id:
            side = OrderSide.BUY if row.get("side") == "Buy" else OrderSide.SELL
            updated = _decimal(row.get("updatedTime"))
            named = self._name_stop(
                str(row["symbol"]),
                stop_type,
                side,
                order_id,
                positive_or_none(row.get("triggerPrice")),
                None if updated is None else int(updated),
            )
            if named is None:
                return  # a stop that is not ours (set by hand, or before we knew it)
            base = named
            if named.status is OrderStatus.CANCELED and status is OrderStatus.NEW:
                # Its order amended to a price we never asked for: moved by someone else, not ours.
                status, status_text = OrderStatus.CANCELED, "Moved"
        elif link_id:
            base = _regular_order(row, link_id)
        else:
            return
        trigger = positive_or_none(row.get("triggerPrice"))
        order = _with(
            base,
            venue_order_id=order_id or base.venue_order_id,
            status=status,
            # (a stop moved by someone else keeps our price: the one at the venue is not ours)
            stop_price=trigger
            if stop_type is OrderType.STOP_MARKET and status_text != "Moved"
            else base.stop_price,
            updated_at=seconds_from_ms(row.get("updatedTime"), event_time),
        )
        if status is OrderStatus.FILLED:
            filled = _decimal(row.get("cumExecQty")) or _ZERO
            # The venue's own average on the row first: the executions summed here may be some of them
            # only (the row can come first), or an earlier order's under the same id (a venue that numbered
            # its orders again after a restart: the next entry was told at the previous one's price).
            price = positive_or_none(row.get("avgPrice")) or self._fill_price(order_id)
            order = _with(order, filled_quantity=filled or order.quantity)
            if price is None:
                # Told once its execution arrives, or after a bounded wait with REST's price.
                self._awaiting_fill[order_id] = (order, event_time)
                if order_id not in self._fill_waits:
                    self._fill_waits[order_id] = asyncio.create_task(
                        self._settle_fill(order_id), name=f"bybit-fill-{order_id}"
                    )
                return
            order = _with(order, average_price=price)
        elif status is OrderStatus.CANCELED and stop_type is None:
            # A derivatives order `Cancelled` "may have an executed qty" (a market order part-filled, the
            # rest cancelled): what filled is a position. Its price is the execution's, else the row's; told
            # without one, the engine asks for the order by id.
            filled = _decimal(row.get("cumExecQty")) or _ZERO
            if filled > 0:
                price = positive_or_none(row.get("avgPrice")) or self._fill_price(order_id)
                order = _with(order, filled_quantity=filled, average_price=price)
        if stop_type is not None and status_text == "Deactivated":
            # Bybit deactivates a position's stops when the position closes: told after the position's
            # next row (it always follows: the position closed, or its stop field went to 0), so a reader
            # sees the position flat before the sibling gone, and does not take the venue's own clean-up
            # for a stop someone removed. Told anyway after `_HOLD_SECONDS` if no row comes.
            held = self._held_cancels.setdefault(order.symbol, [])
            held.append((order, event_time, status_text))
            if len(held) == 1:
                asyncio.get_running_loop().call_later(_HOLD_SECONDS, self._release_held, order.symbol)
            return
        self._tell(order, event_time, status_text)

    def _release_held(self, symbol: str) -> None:
        for order, event_time, reason in self._held_cancels.pop(symbol, []):
            self._tell(order, event_time, reason)

    def _tell(self, order: Order, event_time: float, reason: str) -> None:
        if self._ledger.newer(f"{order.client_order_id}:{order.venue_order_id}", order.status, event_time):
            if order.status.is_final:
                self._ended[order.client_order_id] = order
                while len(self._ended) > 10_000:
                    self._ended.popitem(last=False)
            self._emit(OrderUpdate(order=order, event_time=event_time, reason=reason))

    def ended(self, client_order_id: str) -> Order | None:
        """How the venue said one of our orders ended (filled, cancelled), if the stream told it."""
        return self._ended.get(client_order_id)

    def _fill_price(self, order_id: str) -> Decimal | None:
        qty, notional = self._fills.get(order_id, (_ZERO, _ZERO))
        return notional / qty if qty > 0 else None

    def _on_execution(self, row: Mapping[str, Any], event_time: float) -> None:
        if row.get("execType", "Trade") != "Trade":
            return
        qty, price = positive_or_none(row.get("execQty")), positive_or_none(row.get("execPrice"))
        if qty is None or price is None:
            return
        order_id = str(row.get("orderId", ""))
        total, notional = self._fills.get(order_id, (_ZERO, _ZERO))
        self._fills[order_id] = (total + qty, notional + qty * price)
        self._fills.move_to_end(order_id)
        while len(self._fills) > 10_000:
            self._fills.popitem(last=False)
        waiting = self._awaiting_fill.pop(order_id, None)
        if waiting is not None:
            order, at = waiting
            self._tell(_with(order, average_price=self._fill_price(order_id)), at, "Filled")
            task = self._fill_waits.pop(order_id, None)
            if task is not None:
                task.cancel()

    async def _settle_fill(self, order_id: str) -> None:
        """A FILLED without a price waits `fill_wait_seconds` for its execution; then REST is asked. Either
        way it is told: a fill held back keeps a closed position open (and its sibling working)."""
        try:
            await asyncio.sleep(self._fill_wait_seconds)
            waiting = self._awaiting_fill.get(order_id)
            if waiting is None:
                return
            order = waiting[0]
            price: Decimal | None = None
            if self._rest_fill_price is not None:
                try:
                    price = await self._rest_fill_price(order.symbol, order_id)
                except Exception as error:  # the fill is told all the same, without a price
                    logger.warning(
                        "bybit account stream: %s %s: no execution told and REST could not say its price: %s",
                        order.symbol,
                        order.client_order_id,
                        error,
                    )
            waiting = self._awaiting_fill.pop(order_id, None)
            if waiting is None:
                return  # the execution arrived meanwhile and told it
            order, at = waiting
            price = self._fill_price(order_id) or price
            logger.warning(
                "bybit account stream: %s %s filled; its execution was not told within %gs: %s",
                order.symbol,
                order.client_order_id,
                self._fill_wait_seconds,
                f"price {price} from REST" if price is not None else "told without a price",
            )
            self._tell(_with(order, average_price=price), at, "Filled")
        finally:
            if self._fill_waits.get(order_id) is asyncio.current_task():
                del self._fill_waits[order_id]

    def _on_position(self, row: Mapping[str, Any], event_time: float) -> None:
        symbol = str(row["symbol"])
        index = str(row.get("positionIdx", 0))
        at = seconds_from_ms(row.get("updatedTime"), event_time)
        if at < self._positions_at.get(f"{symbol}:{index}", 0.0):
            return  # an older picture arrived late
        self._positions_at[f"{symbol}:{index}"] = at
        size = _decimal(row.get("size")) or _ZERO
        entry = _decimal(row.get("entryPrice")) or _ZERO
        liquidation = _decimal(row.get("liqPrice"))
        if liquidation is not None and liquidation <= 0:
            liquidation = None
        side_word = row.get("side")
        if index in ("1", "2"):  # hedge mode: 1 is the long side's row, 2 the short side's, flat or not
            sides = [PositionSide.LONG if index == "1" else PositionSide.SHORT]
            size = size if side_word in ("Buy", "Sell") else _ZERO
        elif size and side_word in ("Buy", "Sell"):
            sides = [PositionSide.LONG if side_word == "Buy" else PositionSide.SHORT]
            self._position_sides[symbol] = sides[0]
        else:
            known = self._position_sides.pop(symbol, None)
            sides = [known] if known is not None else [PositionSide.LONG, PositionSide.SHORT]
            size = _ZERO
        for side in sides:
            self._emit(
                PositionUpdate(
                    symbol=symbol,
                    side=side,
                    quantity=size,
                    entry_price=entry,
                    event_time=event_time,
                    liquidation_price=liquidation if size else None,
                )
            )
        if size and self._moved_stops is not None:
            for side in sides:
                for moved in self._moved_stops(symbol, side, row):
                    self._tell(moved, event_time, "Moved")
        self._release_held(symbol)


def _chunks(topics: list[str]) -> list[list[str]]:
    return [topics[i : i + _ARGS_PER_REQUEST] for i in range(0, len(topics), _ARGS_PER_REQUEST)]


def _regular_order(row: Mapping[str, Any], link_id: str) -> Order:
    created = seconds_from_ms(row.get("createdTime"), time.time())
    return Order(
        client_order_id=link_id,
        venue_order_id=str(row.get("orderId", "")),
        symbol=str(row["symbol"]),
        side=OrderSide.BUY if row.get("side") == "Buy" else OrderSide.SELL,
        type=OrderType.MARKET,
        status=OrderStatus.NEW,
        quantity=_decimal(row.get("qty")) or _ZERO,
        filled_quantity=_ZERO,
        average_price=None,
        reduce_only=bool(row.get("reduceOnly", False)),
        stop_price=None,
        activation_price=None,
        callback_rate=None,
        created_at=created,
        updated_at=created,
    )


def _with(order: Order, **changes: Any) -> Order:
    return replace(order, **changes)


__all__ = [
    "PRODUCTION_PRIVATE_URL",
    "PRODUCTION_PUBLIC_URL",
    "TESTNET_PRIVATE_URL",
    "TESTNET_PUBLIC_URL",
    "BybitStreams",
    "auth_args",
]

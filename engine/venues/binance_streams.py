"""Binance USDⓈ-M push streams for `BinanceUsdmVenue`: mark prices over the market stream and the
account's order and position changes over the user-data stream, each on one reconnecting websocket.

Why our own client and not ccxt.pro: ccxt.pro (bundled with ccxt) parses `ORDER_TRADE_UPDATE`,
`ALGO_UPDATE` and `ACCOUNT_UPDATE` into its order and position caches and has `watch_mark_prices`, but it
does not tell its caller when a connection was lost or came back (so nothing would ask the engine to
reconcile what was missed), it does not handle `listenKeyExpired`, it keeps its listen key alive on its
own timer outside the engine's request pacing, it maps a fired algo order's `FINISHED` to "closed"
without the fill, and it has no notion of a silent stall. Those are exactly this product's incident
family, so the wire protocol (small) is spoken here; the REST calls for the listen key still go through
ccxt and the engine's pacer like every request.

Binance routes USDⓈ-M websockets by kind since 2026 (the unrouted legacy URLs were retired on
2026-04-23): mark prices on `/market`, user data on `/private`.

* Market: one connection to `/market/stream?streams=...` (combined form), then `SUBSCRIBE` /
  `UNSUBSCRIBE` with ids for what the watchers want later (`!markPrice@arr@1s` for all symbols, or more
  than `MAX_SYMBOL_STREAMS`; `<symbol>@markPrice@1s` per symbol). What is wanted
  while disconnected is kept and sent on the next connection, with everything else wanted. A stream
  (or symbol) silent for `stale_mark_seconds` is subscribed again and, while it stays silent, its marks
  come from REST (`fetch_mark_prices`) at the poll rate. Only marks newer than the last one yielded per
  symbol are yielded.
* Account: `POST /fapi/v1/listenKey`, connect `/private/ws/<listenKey>`, `PUT` every `listen_key_keepalive_seconds`
  (30 min; the key lives 60). `listenKeyExpired` or a refused keep-alive (-1125) makes a new key and a new
  connection; a keep-alive refused for the rate (a ban) is asked again when the venue says, the stream going
  on. Closing leaves the key to lapse: the account has one, which another client may be using. A reconnect after a connection that lived uses the key in hand, with no REST call, so a stream
  dropped during a REST ban comes back in it (`_key_in_hand`). Once live again after any interruption the stream yields a `StreamGap` naming when events
  may have stopped: the reader reconciles.
* Both: no message (data, pong) for `stall_seconds` while connected is a stall (we ping at half of it):
  the connection is dropped and made again. Reconnects wait an exponential backoff with jitter that only
  resets after a connection stayed up `stable_seconds`, so a venue that drops every connection is not
  hammered (no restart loop).

The listen key is a credential: it appears in no log line, no state, no exception text.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

import aiohttp

from engine.exchange.errors import Banned, ExchangeError, RateLimited
from engine.exchange.port import (
    AccountEvent,
    LeverageChanged,
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
    StreamSettings,
    Supervisor,
)
from engine.venues.stream_client import decimal_or_none as _decimal
from engine.venues.stream_client import positive_or_none as _positive
from engine.venues.stream_client import seconds_from_ms as _seconds

logger = logging.getLogger(__name__)

PRODUCTION_WS_URL = "wss://fstream.binance.com"
DEMO_WS_URL = "wss://fstream.binancefuture.com"
ALL_MARKS_STREAM = "!markPrice@arr@1s"
# Binance: at most 200 streams a connection and 10 incoming messages a second. More symbols than this
# are read from the all-market array instead (filtered here).
MAX_SYMBOL_STREAMS = 100
# A listen key "is valid for 60 minutes after creation" and a PUT (or a POST on an account that has one)
# extends it 60 minutes (`StreamSettings.listen_key_valid_seconds`); a reconnect uses the key in hand within
# the first 50 of them, with no REST call. A keep-alive refused for the rate is asked again up to this close
# to the hour's end.
KEY_END_MARGIN_SECONDS = 5.0
# A connection on a key the venue does not know is closed at once: one that lived this long proves the key.
KEY_PROVEN_SECONDS = 2.0
_URL_STREAMS = 100
_ZERO = Decimal(0)


def mark_stream_name(symbol: str) -> str:
    return f"{symbol.lower()}@markPrice@1s"


def _symbols_of(stale: list[str], wanted: frozenset[str] | None) -> list[str] | None:
    """The symbols silent streams stand for (None: every symbol, the all-market stream)."""
    if wanted is None:
        return None
    if ALL_MARKS_STREAM in stale:
        return sorted(wanted)
    return sorted(s for s in wanted if mark_stream_name(s) in stale)


_HEDGE_SIDES = {"LONG": PositionSide.LONG, "SHORT": PositionSide.SHORT}  # `ps` of a hedge-mode row


class BinanceStreams:
    """The venue's push streams. `rest_marks`, `create_key` and `keep_alive_key` are the venue's own REST
    calls (through ccxt and the engine's pacer)."""

    def __init__(
        self,
        *,
        ws_url: str,
        settings: StreamSettings,
        session: Callable[[], aiohttp.ClientSession],
        rest_marks: Callable[[Collection[str] | None], Awaitable[dict[str, MarkPrice]]],
        create_key: Callable[[], Awaitable[str]],
        keep_alive_key: Callable[[], Awaitable[None]],
        mark_poll_seconds: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`monotonic`: the engine's clock, in which `StreamState.last_event_at` is reported (the
        sockets themselves time stalls in real time)."""
        self._monotonic = monotonic
        self._ws_url = ws_url.rstrip("/")
        self._settings = settings
        self._create_key = create_key
        self._keep_alive_key = keep_alive_key
        self._market = ReconnectingSocket("binance", "marks", settings, session)
        self._account = ReconnectingSocket("binance", "account", settings, session)
        self._supervisor = Supervisor("binance")
        self._tasks = self._supervisor.tasks
        self._closed = False
        # Market stream.
        self._marks = MarkTopics(
            "binance",
            self._market,
            settings,
            subscribe=self._send_subscribe,
            unsubscribe=self._send_unsubscribe,
            symbols_of=_symbols_of,
            rest_marks=rest_marks,
            poll_seconds=mark_poll_seconds,
        )
        self._request_ids = 0
        self._in_url: set[str] = set()  # the streams named in the current connection's URL
        # Account stream.
        self._listeners: list[asyncio.Queue[AccountEvent | None]] = []  # None: the venue closed
        self._listen_key: str | None = None
        self._key_answered_at = -math.inf  # (monotonic) the venue's last answer for the key (POST or PUT)
        self._gap_since: float = time.time()
        self._gap_reason = "stream started"
        self._ledger = StatusLedger()
        self._positions_at: dict[str, float] = {}  # "SYMBOL:ps" -> event time of the last position told
        self._position_sides: dict[str, PositionSide] = {}  # symbol -> side last seen held
        self._child_to_algo: OrderedDict[str, str] = OrderedDict()  # actual order id -> client algo id

    # ---- lifecycle ------------------------------------------------------------------------------------

    def _start(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        self._supervisor.start(name, factory)

    async def close(self) -> None:
        self._closed = True
        for queue in self._listeners:
            queue.put_nowait(None)  # the account watchers end
        self._marks.close()
        await self._supervisor.close()
        # The listen key is left to lapse (an hour after its last keep-alive): the account has one, and
        # another client may use it now. Deleted, it closed the stream of the engine that had just taken
        # the account over (r80: a gap and a reconcile pass at every takeover).
        self._listen_key = None

    def _on_engine_clock(self, at: float | None) -> float | None:
        return None if at is None else self._monotonic() - (time.monotonic() - at)

    def states(self) -> tuple[StreamState, ...]:
        states = []
        if "marks" in self._tasks:
            states.append(self._marks.state(self._on_engine_clock))
        if "account" in self._tasks:
            states.append(
                StreamState(
                    name="account",
                    connected=self._account.connected,
                    last_event_at=self._on_engine_clock(self._account.last_message_at),
                    reconnects=self._account.reconnects,
                    subscriptions=1 if self._account.connected else 0,
                    detail=self._account.detail,
                )
            )
        return tuple(states)

    # ---- mark prices ----------------------------------------------------------------------------------

    async def watch_mark_prices(self, symbols: Collection[str] | None) -> AsyncIterator[MarkPrice]:
        wanted = None if symbols is None else frozenset(symbols)
        if wanted is None or len(wanted) > MAX_SYMBOL_STREAMS:
            names = [ALL_MARKS_STREAM]
        else:
            names = [mark_stream_name(s) for s in sorted(wanted)]
        async for mark in self._marks.watch(
            names, wanted, lambda: self._closed, lambda: self._start("marks", self._run_market)
        ):
            yield mark

    async def _send_subscribe(self, names: list[str]) -> None:
        await self._market.send({"method": "SUBSCRIBE", "params": names, "id": self._next_id()})

    async def _send_unsubscribe(self, names: list[str]) -> None:
        await self._market.send({"method": "UNSUBSCRIBE", "params": names, "id": self._next_id()})

    def _next_id(self) -> int:
        self._request_ids += 1
        return self._request_ids

    async def _run_market(self) -> None:
        async def url() -> str:
            # Stream mode on the market route, what is wanted already in the URL (Binance asks no
            # SUBSCRIBE for it); whatever is wanted later is subscribed on the open connection.
            names = sorted(self._marks.wanted)[:_URL_STREAMS]
            self._in_url = set(names)
            return f"{self._ws_url}/market/stream" + (f"?streams={'/'.join(names)}" if names else "")

        async def on_open(_ws: aiohttp.ClientWebSocketResponse) -> None:
            names = self._marks.reopened()
            if names:
                await self._marks.subscribe(names)

        await self._market.run(url, on_open, self._on_market_message)

    async def _on_market_message(self, payload: Any) -> None:
        if not isinstance(payload, dict):
            return
        if "id" in payload:
            if "error" in payload:
                logger.warning(
                    "binance marks stream: request %s refused: %s", payload.get("id"), payload.get("error")
                )
            return
        name, data = payload.get("stream"), payload.get("data")
        if not isinstance(name, str):
            return
        now = time.monotonic()
        self._marks.heard(name, now)
        rows = data if isinstance(data, list) else [data]
        marks = []
        for row in rows:
            if not isinstance(row, dict) or row.get("e") != "markPriceUpdate":
                continue
            price = _decimal(row.get("p"))
            symbol = row.get("s")
            if price is None or price <= 0 or not isinstance(symbol, str):
                continue
            marks.append(MarkPrice(symbol, price, _seconds(row.get("E"), time.time())))
            if name == ALL_MARKS_STREAM:
                self._marks.heard(mark_stream_name(symbol), now)
        for mark in marks:
            self._marks.offer(mark)

    # ---- account --------------------------------------------------------------------------------------

    async def watch_account(self) -> AsyncIterator[AccountEvent]:
        if self._closed:
            return
        queue: asyncio.Queue[AccountEvent | None] = asyncio.Queue()
        self._listeners.append(queue)
        self._start("account", self._run_account)
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._listeners.remove(queue)

    def _emit(self, event: AccountEvent) -> None:
        for queue in self._listeners:
            queue.put_nowait(event)

    async def _run_account(self) -> None:
        keep_alive: asyncio.Task[None] | None = None

        async def url() -> str:
            if self._key_in_hand():
                logger.info("binance account stream: reconnecting with the listen key in hand (no REST call)")
            else:
                # A POST answers the account's active key (extending it) or a new one: a key the venue
                # dropped without telling us is not retried in a loop.
                self._listen_key = await self._create_key()
                self._key_answered_at = time.monotonic()
            return f"{self._ws_url}/private/ws/{self._listen_key}"

        async def on_open(_ws: aiohttp.ClientWebSocketResponse) -> None:
            nonlocal keep_alive
            if keep_alive is not None:
                keep_alive.cancel()
            keep_alive = asyncio.create_task(self._keep_alive(), name="binance-listen-key-keep-alive")
            since = self._account.lost_at if self._account.lost_at is not None else self._gap_since
            reason = self._account.last_reason if self._account.reconnects else self._gap_reason
            self._emit(StreamGap(stream="account", since=since, reason=reason or "connected"))
            logger.info("binance account stream: live again (%s)", reason or "connected")

        try:
            await self._account.run(url, on_open, self._on_account_message)
        finally:
            if keep_alive is not None:
                keep_alive.cancel()
                await asyncio.gather(keep_alive, return_exceptions=True)

    def _key_in_hand(self) -> bool:
        """The account's listen key may be used again for a new connection without asking the venue: the
        venue answered for it (POST or keep-alive) well within its hour, and the last connection made with
        it lived (the venue closes one on a key it does not know at once) and did not go silent. Each
        reconnect POSTed first: a stream dropped during a REST ban (418, whose text tells a client to use
        the websocket) stayed down for the whole ban, every position unverified meanwhile (an operator on
        the Binance-wire emulator: 3 min 36 s, the venue's stops all in place)."""
        socket = self._account
        return (
            self._listen_key is not None
            and time.monotonic() - self._key_answered_at < self._settings.listen_key_valid_seconds * 5 / 6
            and socket.last_lived >= KEY_PROVEN_SECONDS
            and not socket.last_stalled
        )

    async def _keep_alive(self) -> None:
        # Due a period after the venue's last answer for the key, not after this connection opened: a
        # reconnect on the key in hand extends nothing, and restarting the full period at each one let the
        # key die before its keep-alive came (reviewer r55: reconnects at 20 and 45 minutes, the next
        # keep-alive due at 75, the key dead at 60).
        period = self._settings.listen_key_keepalive_seconds
        delay = max(0.0, self._key_answered_at + period - time.monotonic())
        while True:
            await asyncio.sleep(delay)
            delay = self._settings.listen_key_keepalive_seconds
            try:
                await self._keep_alive_key()
                self._key_answered_at = time.monotonic()
            except (Banned, RateLimited) as error:
                # Refused for the rate (REST only: the websocket goes on). The key lives its hour from the
                # venue's last answer for it: asked again when the venue says, while that hour lasts.
                # A refusal that outlasts the hour keeps the stream to the hour's end all the same (dropped
                # at the refusal, it could not come back: the POST is refused too; a reviewer).
                wait = error.until - time.time() if isinstance(error, Banned) else error.retry_after
                valid = self._settings.listen_key_valid_seconds
                left = self._key_answered_at + valid - time.monotonic()
                margin = min(KEY_END_MARGIN_SECONDS, valid / 12)
                if left > margin:
                    delay = max(0.5, min(max(1.0, wait), left - margin))
                    logger.warning(
                        "binance account stream: listen key keep-alive refused for the rate (%s); asked "
                        "again in %.0fs, the stream goes on",
                        type(error).__name__,
                        delay,
                    )
                    continue
                logger.warning(
                    "binance account stream: listen key keep-alive refused (%s)", type(error).__name__
                )
                self._listen_key = None
                await self._account.drop("listen key keep-alive refused")
                return
            except ExchangeError as error:
                # -1125 (the key is gone) or anything else: a new key and a new connection, with a gap.
                logger.warning(
                    "binance account stream: listen key keep-alive refused (%s)", type(error).__name__
                )
                self._listen_key = None
                await self._account.drop("listen key keep-alive refused")
                return

    async def _on_account_message(self, payload: Any) -> None:
        if not isinstance(payload, dict):
            return
        kind = payload.get("e")
        if kind == "listenKeyExpired":
            self._listen_key = None
            raise Reconnect("listen key expired")
        try:
            if kind == "ALGO_UPDATE":
                self._on_algo_update(payload)
            elif kind == "ORDER_TRADE_UPDATE":
                self._on_order_update(payload)
            elif kind == "ACCOUNT_UPDATE":
                self._on_account_update(payload)
            elif kind == "ACCOUNT_CONFIG_UPDATE" and "ac" in payload:
                config = payload["ac"]
                self._emit(
                    LeverageChanged(
                        symbol=str(config["s"]), leverage=int(config["l"]), event_time=payload["E"] / 1000
                    )
                )
        except (KeyError, TypeError, ValueError, InvalidOperation):
            logger.warning("binance account stream: unreadable %s skipped", kind)

    def _newer(self, key: str, status: OrderStatus, event_time: float) -> bool:
        return self._ledger.newer(key, status, event_time)

    def _on_algo_update(self, payload: Mapping[str, Any]) -> None:
        o = payload["o"]
        event_time = _seconds(payload.get("E"), time.time())
        status_text = o.get("X", "")
        filled = _decimal(o.get("aq")) or _ZERO
        average = _decimal(o.get("ap"))
        if status_text == "NEW":
            status = OrderStatus.NEW
        elif status_text in ("TRIGGERING", "TRIGGERED"):
            status = OrderStatus.TRIGGERED
        elif status_text == "CANCELED":
            status = OrderStatus.CANCELED
        elif status_text == "FINISHED":
            status = OrderStatus.FILLED if filled > 0 else OrderStatus.EXPIRED
        else:  # EXPIRED, REJECTED
            status = OrderStatus.EXPIRED
        if o.get("ai"):
            self._child_to_algo[str(o["ai"])] = str(o["caid"])
            while len(self._child_to_algo) > 10_000:
                self._child_to_algo.popitem(last=False)
        client_id = str(o["caid"])
        if not self._newer(f"algo:{client_id}:{o.get('aid')}", status, event_time):
            return
        order_type = (
            OrderType.TRAILING_STOP_MARKET if o.get("o") == "TRAILING_STOP_MARKET" else OrderType.STOP_MARKET
        )
        order = Order(
            client_order_id=client_id,
            venue_order_id=str(o.get("aid", "")),
            symbol=str(o["s"]),
            side=OrderSide.BUY if o.get("S") == "BUY" else OrderSide.SELL,
            type=order_type,
            status=status,
            quantity=_decimal(o.get("q")) or _ZERO,
            filled_quantity=filled if status is OrderStatus.FILLED else _ZERO,
            average_price=average if status is OrderStatus.FILLED and average and average > 0 else None,
            reduce_only=True,
            stop_price=_positive(o.get("tp")) if order_type is OrderType.STOP_MARKET else None,
            activation_price=None,
            callback_rate=_positive(o.get("cr")),
            created_at=_seconds(payload.get("T"), event_time),
            updated_at=event_time,
        )
        reason = status_text if status_text != status.value.upper() else ""
        self._emit(OrderUpdate(order=order, event_time=event_time, reason=str(o.get("rm") or reason)))

    def _on_order_update(self, payload: Mapping[str, Any]) -> None:
        o = payload["o"]
        if o.get("ot", "MARKET") != "MARKET" or str(o.get("i")) in self._child_to_algo:
            return  # the order a fired algo order placed: its outcome comes with the algo order's FINISHED
        event_time = _seconds(payload.get("E"), time.time())
        status = {
            "NEW": OrderStatus.NEW,
            "PARTIALLY_FILLED": OrderStatus.NEW,
            "FILLED": OrderStatus.FILLED,
            "CANCELED": OrderStatus.CANCELED,
        }.get(o.get("X", ""), OrderStatus.EXPIRED)
        client_id = str(o["c"])
        if not self._newer(f"order:{client_id}:{o.get('i')}", status, event_time):
            return
        filled = _decimal(o.get("z")) or _ZERO
        order = Order(
            client_order_id=client_id,
            venue_order_id=str(o.get("i", "")),
            symbol=str(o["s"]),
            side=OrderSide.BUY if o.get("S") == "BUY" else OrderSide.SELL,
            type=OrderType.MARKET,
            status=status,
            quantity=_decimal(o.get("q")) or _ZERO,
            filled_quantity=filled,
            average_price=_positive(o.get("ap")) if filled > 0 else None,
            reduce_only=bool(o.get("R", False)),
            stop_price=None,
            activation_price=None,
            callback_rate=None,
            created_at=_seconds(o.get("T"), event_time),
            updated_at=event_time,
        )
        self._emit(OrderUpdate(order=order, event_time=event_time, reason=str(o.get("x", ""))))

    def _on_account_update(self, payload: Mapping[str, Any]) -> None:
        event_time = _seconds(payload.get("E"), time.time())
        for row in payload["a"].get("P", []):
            symbol = str(row["s"])
            hedge_side = _HEDGE_SIDES.get(str(row.get("ps", "BOTH")))
            key = f"{symbol}:{row.get('ps', 'BOTH')}"
            if event_time < self._positions_at.get(key, 0.0):
                continue  # an older picture of this symbol (side) arrived late
            self._positions_at[key] = event_time
            amount = _decimal(row.get("pa")) or _ZERO
            entry = _decimal(row.get("ep")) or _ZERO
            if hedge_side is not None:  # hedge mode: each side has its own row, sized without a sign
                sides = [hedge_side]
            elif amount:
                sides = [PositionSide.SHORT if amount < 0 else PositionSide.LONG]
                self._position_sides[symbol] = sides[0]
            else:
                # One-way mode: flat is flat on both sides. Told for the side we last saw held (both when
                # none was seen), so a reader looking the position up by side finds it closed.
                known = self._position_sides.pop(symbol, None)
                sides = [known] if known is not None else [PositionSide.LONG, PositionSide.SHORT]
            for side in sides:
                self._emit(
                    PositionUpdate(
                        symbol=symbol,
                        side=side,
                        quantity=abs(amount),
                        entry_price=entry,
                        event_time=event_time,
                    )
                )

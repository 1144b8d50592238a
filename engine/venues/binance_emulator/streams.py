"""The emulator's websocket streams, on the same loopback server and port as its REST API, with Binance's
paths and shapes (USDⓈ-M Futures, "Websocket Market Streams" and "User Data Streams", after the routed-URL
change: legacy unrouted URLs were retired on 2026-04-23, so only `/market` and `/private` are served):

* market streams (`/market`): raw `/market/ws/<stream>` (the payload as is) and combined
  `/market/stream?streams=<a>/<b>` (each payload wrapped as `{"stream": name, "data": payload}`);
  `/market/ws` alone opens a raw connection with nothing subscribed. `{"method": "SUBSCRIBE" |
  "UNSUBSCRIBE" | "LIST_SUBSCRIPTIONS", "params": [...], "id": n}` is answered `{"result": null | [...],
  "id": n}`. Streams served: `<symbol>@markPrice` (every 3 s) and `<symbol>@markPrice@1s`, `!markPrice@arr`
  and `!markPrice@arr@1s` (every symbol in one array), payload `markPriceUpdate` (`E`, `s`, `p`, `i`, `P`,
  `r`, `T`). At most 200 streams a connection; more than 10 incoming messages in a second closes it;
* the user-data stream (`/private`): `POST|PUT|DELETE /fapi/v1/listenKey` (API key header, no signature;
  served by the REST app, weighed like every request), one key per account, valid 60 minutes of venue
  time after its creation or last keep-alive (POST with a key alive returns it and extends it; PUT with
  none: 400 -1125). `/private/ws/<listenKey>` (or `/private/ws?listenKey=<key>`) pushes
  `ACCOUNT_CONFIG_UPDATE` when `POST /fapi/v1/leverage` changes a symbol's leverage;
  `ORDER_TRADE_UPDATE`, `ALGO_UPDATE` and `ACCOUNT_UPDATE` whenever the sim core changes an order or a
  position of the account, and `listenKeyExpired` when the key lapses (then nothing more on that
  connection);
* the server pings every connection every 3 minutes and closes one that has not answered for 10; a
  connection is closed after 24 hours (venue time: `/_sim/advance` moves it).

Faults (the model shared with the Bybit emulator, `engine.venues.sim.stream_faults`; control API
`POST /_sim/stream-fault`, body `{"fault": ..., ...}`; `POST /_sim/clear-faults` ends the lasting ones): `drop` (close every connection now; with `seconds`, also every connection opened during
those seconds, right after its handshake: a reconnect storm), `stall` (every open connection stays
connected and sends nothing, not even a pong, for `seconds`), `drop_subscription` (the server forgets one
subscription, `stream` or the first it holds, without telling anyone), `expire_listen_key` (the key
lapses now), `delay` (account events leave `ms` milliseconds late, for `seconds` or until cleared),
`reorder` (the next `count` batches of account events go out in reverse order).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from aiohttp import WSMsgType, web

from engine.exchange.errors import ExchangeError, NotFound
from engine.exchange.port import Order, OrderStatus
from engine.venues.sim.core import DEFAULT_ACCOUNT, SimCore
from engine.venues.sim.stream_faults import StreamFaultError, StreamFaults, abort

__all__ = ["StreamFaultError", "StreamHub"]

logger = logging.getLogger(__name__)

LISTEN_KEY_VALIDITY_SECONDS = 3600.0
SERVER_PING_SECONDS = 180.0
PONG_DEADLINE_SECONDS = 600.0
CONNECTION_LIFETIME_SECONDS = 86_400.0
MAX_STREAMS_PER_CONNECTION = 200
MAX_INCOMING_PER_SECOND = 10
CHILD_ORDER_ID_OFFSET = 1_000_000_000  # as the REST app: the regular order a fired algo order places
_TICK_SECONDS = 1.0
_ZERO = Decimal(0)
_KEY_ALPHABET = string.ascii_letters + string.digits


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _text(value: Decimal | None) -> str:
    return "0" if value is None else format(value, "f")


def mark_stream_symbol(name: str) -> str | None:
    """The symbol of a per-symbol mark stream name (`btcusdt@markPrice@1s` → `BTCUSDT`), else None."""
    base, _, rest = name.partition("@")
    if rest in ("markPrice", "markPrice@1s") and base and not base.startswith("!"):
        return base.upper()
    return None


def _is_all_marks(name: str) -> bool:
    return name in ("!markPrice@arr", "!markPrice@arr@1s")


def _every_second(name: str) -> bool:
    return name.endswith("@1s")


@dataclass(eq=False)
class _Connection:
    id: int
    ws: web.WebSocketResponse
    request: web.Request
    kind: str  # "market" | "user"
    path: str
    combined: bool
    opened_at: float  # venue time
    listen_key: str | None = None
    subscriptions: list[str] = field(default_factory=list)  # in subscription order
    stalled_until: float = 0.0  # monotonic
    silenced: bool = False  # its listen key expired: nothing more is sent
    last_pong: float = field(default_factory=time.monotonic)
    incoming: list[float] = field(default_factory=list)  # monotonic times of the last second's messages
    # user connections: events leave in order, each maybe late ((when it may leave, monotonic; the text))
    outbox: asyncio.Queue[tuple[float, str]] | None = None

    def stalled(self) -> bool:
        return time.monotonic() < self.stalled_until


class _AccountWatch:
    """What the account's stream has told: the conditional orders it announced (open or triggering) and
    the positions, so each change of the core becomes Binance's events once."""

    def __init__(self) -> None:
        self.orders: dict[str, Order] = {}  # venue id -> last announced state (open or triggering)
        self.positions: dict[str, tuple[Decimal, Decimal]] = {}  # symbol -> (signed quantity, entry)
        self.market_orders: list[Order] = []  # placed since the last look: announced with the next one
        self.revision = -1


class StreamHub:
    def __init__(self, core: SimCore, now: Callable[[], float]) -> None:
        self._core = core
        self._now = now
        self._connections: dict[int, _Connection] = {}
        self._ids = itertools.count(1)
        self._listen_key: str | None = None
        self._listen_key_expires = 0.0
        self._watch = _AccountWatch()
        self._faults = StreamFaults()
        self.handshakes: dict[str, int] = {"market": 0, "user": 0}
        self._tick = 0

    # ---- routes ---------------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/market/ws", self._serve_raw)
        app.router.add_get("/market/ws/{name}", self._serve_raw)
        app.router.add_get("/market/stream", self._serve_combined)
        app.router.add_get("/private/ws", self._serve_private)
        app.router.add_get("/private/ws/{name}", self._serve_private)
        app.cleanup_ctx.append(self._ticker_context)
        app.on_shutdown.append(self._close_all)

    async def _ticker_context(self, _app: web.Application):  # type: ignore[no-untyped-def]
        task = asyncio.create_task(self._run_ticker(), name="binance-emulator-streams")
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _close_all(self, _app: web.Application) -> None:
        for connection in list(self._connections.values()):
            with contextlib.suppress(Exception):
                await connection.ws.close(code=1001, message=b"server shutting down")

    # ---- listen keys (REST handlers, called by the app after its weight and API-key checks) -------------

    def create_listen_key(self) -> dict[str, Any]:
        now = self._now()
        self._expire_listen_key_if_due(now)
        if self._listen_key is None:
            self._listen_key = "".join(secrets.choice(_KEY_ALPHABET) for _ in range(64))
        self._listen_key_expires = now + LISTEN_KEY_VALIDITY_SECONDS
        return {"listenKey": self._listen_key}

    def keep_alive_listen_key(self) -> dict[str, Any] | None:
        """None: no key alive (the app answers 400 -1125)."""
        now = self._now()
        self._expire_listen_key_if_due(now)
        if self._listen_key is None:
            return None
        self._listen_key_expires = now + LISTEN_KEY_VALIDITY_SECONDS
        return {"listenKey": self._listen_key}

    def delete_listen_key(self) -> dict[str, Any]:
        key, self._listen_key = self._listen_key, None
        if key is not None:
            for connection in self._user_connections(key):  # "DELETE ... will close the stream"
                connection.silenced = True
                self._abort(connection)
        return {}

    def _expire_listen_key_if_due(self, now: float) -> None:
        if self._listen_key is not None and now >= self._listen_key_expires:
            self.expire_listen_key()

    def expire_listen_key(self) -> None:
        key, self._listen_key = self._listen_key, None
        if key is None:
            return
        logger.info("emulator: the listen key expired")
        event = json.dumps({"e": "listenKeyExpired", "E": _ms(self._now()), "listenKey": key})
        for connection in self._user_connections(key):
            self._send_user(connection, event)
            connection.silenced = True

    def _user_connections(self, key: str) -> list[_Connection]:
        return [c for c in self._connections.values() if c.kind == "user" and c.listen_key == key]

    # ---- serving a connection ---------------------------------------------------------------------------

    async def _serve_private(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info.get("name") or request.query.get("listenKey", "")
        if key and self._listen_key is not None and secrets.compare_digest(key, self._listen_key):
            return await self._serve(request, kind="user", combined=False, streams=[], listen_key=key)
        # Binance answers an unknown or expired listen key by closing the socket at once.
        return await self._serve(request, kind="user", combined=False, streams=[], refuse=True)

    async def _serve_raw(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("name", "")
        if name and not self._valid_stream(name):
            # Binance answers an unknown listen key or stream name by closing the socket at once.
            return await self._serve(request, kind="market", combined=False, streams=[], refuse=True)
        return await self._serve(request, kind="market", combined=False, streams=[name] if name else [])

    async def _serve_combined(self, request: web.Request) -> web.StreamResponse:
        names = [n for n in request.query.get("streams", "").split("/") if n]
        if any(not self._valid_stream(n) for n in names):
            return await self._serve(request, kind="market", combined=True, streams=[], refuse=True)
        return await self._serve(request, kind="market", combined=True, streams=names)

    async def _serve(
        self,
        request: web.Request,
        *,
        kind: str,
        combined: bool,
        streams: list[str],
        listen_key: str | None = None,
        refuse: bool = False,
    ) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=False, max_msg_size=1 << 20)
        await ws.prepare(request)
        if refuse:
            await ws.close(code=1008, message=b"invalid stream")
            return ws
        self.handshakes[kind] += 1
        connection = _Connection(
            id=next(self._ids),
            ws=ws,
            request=request,
            kind=kind,
            path=request.path,
            combined=combined,
            opened_at=self._now(),
            listen_key=listen_key,
            subscriptions=list(dict.fromkeys(streams)),
        )
        if self._faults.storming():
            self._abort(connection)
            return ws
        self._connections[connection.id] = connection
        writer: asyncio.Task[None] | None = None
        if kind == "user":
            connection.outbox = asyncio.Queue()
            writer = asyncio.create_task(self._write_user(connection), name=f"emulator-user-{connection.id}")
        try:
            async for message in ws:
                if message.type is WSMsgType.PING:
                    if not connection.stalled():
                        await ws.pong(message.data)
                elif message.type is WSMsgType.PONG:
                    connection.last_pong = time.monotonic()
                elif message.type is WSMsgType.TEXT and not connection.stalled():
                    now = time.monotonic()
                    connection.incoming = [t for t in connection.incoming if now - t < 1.0] + [now]
                    if len(connection.incoming) > MAX_INCOMING_PER_SECOND:
                        logger.info("emulator: connection %d sent too many messages; closed", connection.id)
                        await ws.close(code=1008, message=b"too many requests")
                        break
                    await self._answer_method(connection, message.data)
        finally:
            self._connections.pop(connection.id, None)
            if writer is not None:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
        return ws

    @staticmethod
    def _valid_stream(name: str) -> bool:
        return _is_all_marks(name) or mark_stream_symbol(name) is not None

    async def _answer_method(self, connection: _Connection, text: str) -> None:
        try:
            request = json.loads(text)
            method, params, request_id = request["method"], request.get("params", []), request["id"]
            if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
                raise ValueError("params must be a list of stream names")
        except (ValueError, KeyError, TypeError):
            await connection.ws.send_str(
                json.dumps({"error": {"code": 3, "msg": "Invalid JSON: expected method, params, id"}})
            )
            return
        answer: dict[str, Any]
        if method == "SUBSCRIBE":
            bad = [p for p in params if not self._valid_stream(p) or connection.kind != "market"]
            wanted = [p for p in params if p not in connection.subscriptions]
            if bad:
                answer = {"error": {"code": 2, "msg": f"Invalid request: unknown stream {bad[0]}"}}
            elif len(connection.subscriptions) + len(wanted) > MAX_STREAMS_PER_CONNECTION:
                answer = {"error": {"code": 2, "msg": "Invalid request: too many streams"}}
            else:
                connection.subscriptions.extend(wanted)
                answer = {"result": None}
        elif method == "UNSUBSCRIBE":
            connection.subscriptions = [s for s in connection.subscriptions if s not in params]
            answer = {"result": None}
        elif method == "LIST_SUBSCRIPTIONS":
            answer = {"result": list(connection.subscriptions)}
        else:
            answer = {"error": {"code": 2, "msg": f"Invalid request: unknown method {method!r}"}}
        await connection.ws.send_str(json.dumps({**answer, "id": request_id}))

    # ---- the ticker: marks, expiries, pings, lifetimes, fills that came due -----------------------------

    async def _run_ticker(self) -> None:
        while True:
            await asyncio.sleep(_TICK_SECONDS)
            self._tick += 1
            try:
                await self._tick_once()
            except Exception:
                logger.exception("emulator: stream tick failed; the streams keep running")

    async def _tick_once(self) -> None:
        now = self._now()
        self._expire_listen_key_if_due(now)
        if any(o.status is OrderStatus.TRIGGERED for o in self._watch.orders.values()):
            self._core.inspect(now, DEFAULT_ACCOUNT)  # runs the fills that came due
        self.account_changed()
        marks = self._core.mark_prices()
        for connection in list(self._connections.values()):
            if now - connection.opened_at >= CONNECTION_LIFETIME_SECONDS:
                await connection.ws.close(code=1000, message=b"24 hour limit")
                continue
            if self._tick % int(SERVER_PING_SECONDS / _TICK_SECONDS) == 0 and not connection.stalled():
                if time.monotonic() - connection.last_pong > PONG_DEADLINE_SECONDS:
                    await connection.ws.close(code=1008, message=b"pong timeout")
                    continue
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await connection.ws.ping()
            if connection.kind == "market" and not connection.stalled():
                await self._push_marks(connection, marks, now)

    async def _push_marks(self, connection: _Connection, marks: dict[str, Any], now: float) -> None:
        for name in list(connection.subscriptions):
            if not _every_second(name) and self._tick % 3:
                continue
            if _is_all_marks(name):
                payload: Any = [self._mark_payload(mark, now) for mark in marks.values()]
            else:
                symbol = mark_stream_symbol(name)
                if symbol not in marks:
                    continue
                payload = self._mark_payload(marks[symbol], now)
            message = {"stream": name, "data": payload} if connection.combined else payload
            with contextlib.suppress(ConnectionError, RuntimeError):
                await connection.ws.send_str(json.dumps(message, separators=(",", ":")))

    @staticmethod
    def _mark_payload(mark: Any, now: float) -> dict[str, Any]:
        now_ms = _ms(now)
        return {
            "e": "markPriceUpdate",
            "E": now_ms,
            "s": mark.symbol,
            "p": _text(mark.price),
            "ap": _text(mark.price),
            "i": _text(mark.price),
            "P": _text(mark.price),
            "r": "0.00010000",
            "T": (now_ms // 28_800_000 + 1) * 28_800_000,
        }

    # ---- account events ---------------------------------------------------------------------------------

    def note_market_order(self, order: Order) -> None:
        """A regular (market) order was placed: announced with the next `account_changed`."""
        self._watch.market_orders.append(order)

    def leverage_changed(self, symbol: str, leverage: int, now: float) -> None:
        """The account's leverage on `symbol` changed: Binance pushes `ACCOUNT_CONFIG_UPDATE` with `ac`."""
        self._publish(
            [{"e": "ACCOUNT_CONFIG_UPDATE", "E": _ms(now), "T": _ms(now), "ac": {"s": symbol, "l": leverage}}]
        )

    def account_changed(self) -> None:
        """Compare the core with what the stream has told and push the difference as Binance's events."""
        watch = self._watch
        if watch.revision == self._core.book_revision and not watch.market_orders:
            return
        now = self._now()
        try:
            seen = self._core.inspect(now, DEFAULT_ACCOUNT)
        except ExchangeError:
            return
        watch.revision = self._core.book_revision
        unresolved = False
        events: list[dict[str, Any]] = []
        for order in watch.market_orders:
            events.extend(self._regular_order_events(order, now))
        watch.market_orders.clear()
        current = {o.venue_order_id: o for o in (*seen.open_conditional, *seen.triggering)}
        for venue_id, order in current.items():
            before = watch.orders.get(venue_id)
            if before is None:
                events.append(self._algo_event(order, "NEW", now))
            if order.status is OrderStatus.TRIGGERED and (before is None or before.status is OrderStatus.NEW):
                events.append(self._algo_event(order, "TRIGGERING", now))
            watch.orders[venue_id] = order
        for venue_id, before in list(watch.orders.items()):
            if venue_id in current:
                continue
            try:
                final = self._core.get_order_by_venue_id(before.symbol, venue_id, now, DEFAULT_ACCOUNT)
            except (NotFound, ExchangeError):
                unresolved = True  # not readable yet (read lag, a ban): told on a later look
                continue
            del watch.orders[venue_id]
            events.extend(self._ended_algo_events(before, final, now))
        positions = {
            p.symbol: (p.quantity if p.side.value == "long" else -p.quantity, p.entry_price)
            for p in seen.positions
        }
        changed = [
            s for s in positions.keys() | watch.positions.keys() if positions.get(s) != watch.positions.get(s)
        ]
        if changed:
            events.append(self._account_update(sorted(changed), positions, now))
        watch.positions = positions
        if unresolved:
            watch.revision = -1  # look again on the next tick even if nothing else changes
        if events:
            self._publish(events)

    def _ended_algo_events(self, before: Order, final: Order, now: float) -> list[dict[str, Any]]:
        if final.status is OrderStatus.CANCELED:
            return [self._algo_event(final, "CANCELED", now)]
        events = []
        if before.status is OrderStatus.NEW:
            events.append(self._algo_event(final, "TRIGGERING", now))
        events.append(self._algo_event(final, "TRIGGERED", now, placed=True))
        events.extend(self._child_order_events(final, now))
        events.append(self._algo_event(final, "FINISHED", now, placed=True))
        return events

    def _algo_event(self, order: Order, status: str, now: float, *, placed: bool = False) -> dict[str, Any]:
        finished = status == "FINISHED"
        filled = order.filled_quantity if finished else _ZERO
        average = order.average_price if finished and order.average_price else _ZERO
        return {
            "e": "ALGO_UPDATE",
            "T": _ms(order.updated_at),
            "E": _ms(now),
            "o": {
                "caid": order.client_order_id,
                "aid": int(order.venue_order_id),
                "at": "CONDITIONAL",
                "o": order.type.value.upper(),
                "s": order.symbol,
                "S": order.side.value.upper(),
                "ps": "BOTH",
                "f": "GTC",
                "q": _text(order.quantity),
                "X": status,
                "ai": str(int(order.venue_order_id) + CHILD_ORDER_ID_OFFSET) if placed else "",
                "ap": _text(average),
                "aq": _text(filled),
                "act": "MARKET" if placed else "0",
                "tp": _text(order.stop_price),
                "p": "0",
                "V": "EXPIRE_MAKER",
                "wt": "MARK_PRICE",
                "pm": "NONE",
                "cp": False,
                "pP": False,
                "R": True,
                "tt": _ms(order.updated_at) if status != "NEW" and status != "CANCELED" else 0,
                "gtd": 0,
                "cr": "" if order.callback_rate is None else _text(order.callback_rate),
            },
        }

    def _child_order_events(self, order: Order, now: float) -> list[dict[str, Any]]:
        """The regular order a fired algo order placed: NEW, then its fill or its expiry."""
        child_id = int(order.venue_order_id) + CHILD_ORDER_ID_OFFSET
        client_id = f"autotrigger-{order.venue_order_id}"
        orig_type = order.type.value.upper()
        ended = ("TRADE", "FILLED") if order.status is OrderStatus.FILLED else ("EXPIRED", "EXPIRED")
        return [
            self._order_event(order, child_id, client_id, orig_type, ("NEW", "NEW"), now),
            self._order_event(order, child_id, client_id, orig_type, ended, now),
        ]

    def _regular_order_events(self, order: Order, now: float) -> list[dict[str, Any]]:
        events = [
            self._order_event(
                order, int(order.venue_order_id), order.client_order_id, "MARKET", ("NEW", "NEW"), now
            )
        ]
        if order.status is OrderStatus.FILLED:
            events.append(
                self._order_event(
                    order,
                    int(order.venue_order_id),
                    order.client_order_id,
                    "MARKET",
                    ("TRADE", "FILLED"),
                    now,
                )
            )
        elif order.status.is_final:
            status = order.status.value.upper()
            events.append(
                self._order_event(
                    order, int(order.venue_order_id), order.client_order_id, "MARKET", (status, status), now
                )
            )
        return events

    @staticmethod
    def _order_event(
        order: Order,
        order_id: int,
        client_id: str,
        orig_type: str,
        execution: tuple[str, str],
        now: float,
    ) -> dict[str, Any]:
        execution_type, status = execution
        traded = execution_type == "TRADE"
        average = order.average_price if traded and order.average_price else _ZERO
        filled = order.filled_quantity if traded else _ZERO
        return {
            "e": "ORDER_TRADE_UPDATE",
            "E": _ms(now),
            "T": _ms(order.updated_at),
            "o": {
                "s": order.symbol,
                "c": client_id,
                "S": order.side.value.upper(),
                "o": "MARKET",
                "f": "GTC",
                "q": _text(order.quantity),
                "p": "0",
                "ap": _text(average),
                "sp": "0",
                "x": execution_type,
                "X": status,
                "i": order_id,
                "l": _text(filled),
                "z": _text(filled),
                "L": _text(average),
                "N": "USDT",
                "n": "0",
                "T": _ms(order.updated_at),
                "t": order_id if traded else 0,
                "b": "0",
                "a": "0",
                "m": False,
                "R": order.reduce_only or orig_type != "MARKET",
                "wt": "MARK_PRICE" if orig_type != "MARKET" else "CONTRACT_PRICE",
                "ot": orig_type,
                "ps": "BOTH",
                "cp": False,
                "rp": "0",
                "pP": False,
                "si": 0,
                "ss": 0,
                "V": "EXPIRE_MAKER",
                "pm": "NONE",
                "gtd": 0,
            },
        }

    def _account_update(
        self, symbols: list[str], positions: dict[str, tuple[Decimal, Decimal]], now: float
    ) -> dict[str, Any]:
        balances = []
        with contextlib.suppress(ExchangeError):
            balance = self._core.balance(now, DEFAULT_ACCOUNT)
            wallet = _text(balance.wallet_balance)
            balances.append({"a": balance.asset, "wb": wallet, "cw": wallet, "bc": "0"})
        rows = []
        for symbol in symbols:
            amount, entry = positions.get(symbol, (_ZERO, _ZERO))
            rows.append(
                {
                    "s": symbol,
                    "pa": _text(amount),
                    "ep": _text(entry),
                    "bep": _text(entry),
                    "cr": "0",
                    "up": "0",
                    "mt": "cross",
                    "iw": "0",
                    "ps": "BOTH",
                }
            )
        return {
            "e": "ACCOUNT_UPDATE",
            "E": _ms(now),
            "T": _ms(now),
            "a": {"m": "ORDER", "B": balances, "P": rows},
        }

    def _publish(self, events: list[dict[str, Any]]) -> None:
        events = self._faults.reordered(events)
        if self._listen_key is None:
            return
        texts = [json.dumps(event, separators=(",", ":")) for event in events]
        for connection in self._user_connections(self._listen_key):
            if connection.silenced or connection.stalled():
                continue  # a stalled connection loses what it would have carried
            for text in texts:
                self._send_user(connection, text)

    def _send_user(self, connection: _Connection, text: str) -> None:
        if connection.outbox is not None:
            connection.outbox.put_nowait((self._faults.departure(), text))

    async def _write_user(self, connection: _Connection) -> None:
        assert connection.outbox is not None
        while True:
            departure, text = await connection.outbox.get()
            await self._faults.hold_until(departure)
            if connection.stalled():
                continue
            with contextlib.suppress(ConnectionError, RuntimeError):
                await connection.ws.send_str(text)

    # ---- faults and state (control API) -----------------------------------------------------------------

    async def stage_fault(self, body: dict[str, Any]) -> dict[str, Any]:
        def expire() -> dict[str, Any]:
            had = self._listen_key is not None
            self.expire_listen_key()
            return {"expired": had}

        return self._faults.stage(body, self._connections.values(), expire)

    @staticmethod
    def _abort(connection: _Connection) -> None:
        abort(connection)

    def clear_faults(self) -> None:
        self._faults.clear(self._connections.values())

    def state(self) -> dict[str, Any]:
        """Connections and subscriptions, for tests; never the listen key itself (a credential)."""
        now = self._now()
        return {
            "connections": [
                {
                    "id": c.id,
                    "kind": c.kind,
                    "path": "/private/ws/<listenKey>" if c.kind == "user" else c.path,
                    "combined": c.combined,
                    "subscriptions": list(c.subscriptions),
                    "stalled": c.stalled(),
                    "silenced": c.silenced,
                    "age_seconds": round(now - c.opened_at, 3),
                }
                for c in self._connections.values()
            ],
            "handshakes": dict(self.handshakes),
            "listen_key_alive": self._listen_key is not None,
            "listen_key_expires_in": round(self._listen_key_expires - now, 3) if self._listen_key else None,
        }

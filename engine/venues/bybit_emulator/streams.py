"""The Bybit emulator's websocket streams, on the same loopback server and port as its REST API, with
Bybit v5's paths and shapes (bybit-exchange.github.io/docs/v5/ws/connect, .../websocket/public/ticker,
.../websocket/private/{order,position,execution}):

* public `/v5/public/linear`: `{"op": "subscribe" | "unsubscribe", "args": [topics], "req_id": id}`
  answered `{"success", "ret_msg", "conn_id", "req_id", "op"}`; topic `tickers.{symbol}`: a `snapshot`
  (every field) on subscribing, then `delta` messages carrying only the fields that changed (`markPrice`,
  `lastPrice`, `indexPrice`, ...), each `{"topic", "type", "data", "cs", "ts"}`. Bybit pushes linear
  tickers every 100 ms while something changed; the emulator looks every 100 ms and, for a symbol where
  nothing moved for a second, sends a delta with the symbol alone (its stand-in for the bid/ask/volume
  fields that change many times a second on a live symbol). The args of one connection may total at most
  21 000 characters;
* private `/v5/private`: `{"op": "auth", "args": [apiKey, expires, signature]}` with signature = hex
  HMAC-SHA256(secret, "GET/realtime" + expires), expires (ms) in the future; then topics `order`,
  `position`, `execution` (also `order.linear`, ...), pushed whenever the emulator's book changes:
  `{"id", "topic", "creationTime", "data": [rows]}` with the REST rows' fields (`order`: `orderId`,
  `orderLinkId`, `orderStatus` New/Untriggered/Triggered/Filled/Deactivated, `stopOrderType` StopLoss /
  TrailingStop, `avgPrice`, `cumExecQty`...; `execution`: `execPrice`, `execQty`, `orderId`,
  `stopOrderType`...; `position`: `size`, `side` ("" when flat), `entryPrice`, `stopLoss`,
  `trailingStop`...). A fired position stop is told `Triggered` then `Filled` under the system-created
  order's id. Subscribing to a private topic before auth is refused;
* heartbeat: `{"op": "ping"}` answered (public: `{"success": true, "ret_msg": "pong", "op": "ping"}`;
  private: `{"op": "pong", "args": [ms]}`); a connection silent (no ping, nothing sent to it) for 10
  minutes is closed, as Bybit does.

Faults: the shared model (`engine.venues.sim.stream_faults`), `POST /_sim/stream-fault`; `expire_listen_key`
is refused (Bybit authenticates each private connection, there is no listen key); `lose` takes the next
messages of a private topic (`order`, `execution`, `position`), `blank` empties `avgPrice` in the next
`order` messages that carry one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import time
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import WSMsgType, web

from engine.venues.sim.stream_faults import StreamFaults, abort

logger = logging.getLogger(__name__)

PUBLIC_PATH = "/v5/public/linear"
PRIVATE_PATH = "/v5/private"
PRIVATE_TOPICS = {"order", "position", "execution"}  # with or without `.linear` / `.all`
MAX_ARGS_CHARS = 21_000
IDLE_CLOSE_SECONDS = 600.0
_TICK_SECONDS = 0.1
_QUIET_DELTA_SECONDS = 1.0
_FINAL_ORDER_STATUSES = {"Filled", "Cancelled", "Deactivated", "Rejected", "PartiallyFilledCanceled"}
# What `lose` / `blank` stream faults may name: the private topics, and the fields a row may say it does
# not know (Bybit gives `avgPrice` "" to an order without an average price).
_FAULT_TOPICS: dict[str, tuple[str, ...]] = {"order": ("avgPrice",), "execution": (), "position": ()}
_TICKER_PRICE_FIELDS = ("markPrice", "lastPrice", "indexPrice", "bid1Price", "ask1Price")


@dataclass(frozen=True, slots=True)
class StreamRows:
    orders: dict[str, dict[str, Any]]  # orderId -> row: the new ones and the watched ones
    order_count: int
    executions: list[dict[str, Any]]  # the new ones, oldest first
    execution_count: int
    positions: dict[str, dict[str, Any]]  # symbol -> row, open positions only


class BookView(Protocol):
    """What the hub reads of the emulator: the rows its REST API would answer, and its credentials."""

    def now(self) -> float: ...

    def ticker_row(self, symbol: str, now: float) -> dict[str, Any] | None: ...

    def stream_rows(self, orders_from: int, watched: Collection[str], executions_from: int) -> StreamRows: ...

    def verify_stream_auth(self, api_key: str, expires_ms: int, signature: str) -> str | None:
        """None when the auth args are right, else Bybit's `ret_msg`."""
        ...


def stream_signature(secret: str, expires_ms: int) -> str:
    return hmac.new(secret.encode(), f"GET/realtime{expires_ms}".encode(), hashlib.sha256).hexdigest()


def _private_topic(topic: str) -> str | None:
    base = topic.split(".", 1)[0]
    return base if base in PRIVATE_TOPICS and topic in (base, f"{base}.linear", f"{base}.all") else None


@dataclass(eq=False)
class _Connection:
    id: int
    conn_id: str
    ws: web.WebSocketResponse
    request: web.Request
    private: bool
    subscriptions: list[str] = field(default_factory=list)
    stalled_until: float = 0.0  # monotonic
    authed: bool = False
    last_heard: float = field(default_factory=time.monotonic)  # from the client (data, ping)
    last_sent: float = field(default_factory=time.monotonic)  # to the client (stream data, pong)
    sent: dict[str, tuple[dict[str, Any], float]] = field(default_factory=dict)  # topic -> (row, monotonic)
    outbox: asyncio.Queue[tuple[float, str]] | None = None  # (when it may leave, monotonic; the text)

    def stalled(self) -> bool:
        return time.monotonic() < self.stalled_until


class BybitStreamHub:
    def __init__(self, view: BookView) -> None:
        self._view = view
        self._connections: dict[int, _Connection] = {}
        self._ids = itertools.count(1)
        self._faults = StreamFaults()
        self.handshakes: dict[str, int] = {"public": 0, "private": 0}
        # Bybit cuts a connection "if there is no ping-pong and no stream data sent from server end" for 10
        # minutes: a connection the tickers keep busy is not cut for a client that never pings.
        self.idle_close_seconds = IDLE_CLOSE_SECONDS
        self._told_orders: dict[str, tuple[Any, ...]] = {}  # orderId -> what was told, while it is open
        self._orders_seen = 0
        self._told_executions = 0
        self._told_positions: dict[str, tuple[Any, ...]] = {}
        self._cross_seq = itertools.count(1)

    # ---- routes ---------------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(PUBLIC_PATH, self._serve_public)
        app.router.add_get(PRIVATE_PATH, self._serve_private)
        app.cleanup_ctx.append(self._ticker_context)
        app.on_shutdown.append(self._close_all)

    async def _ticker_context(self, _app: web.Application):  # type: ignore[no-untyped-def]
        task = asyncio.create_task(self._run_ticker(), name="bybit-emulator-streams")
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _close_all(self, _app: web.Application) -> None:
        for connection in list(self._connections.values()):
            with contextlib.suppress(Exception):
                await connection.ws.close(code=1001, message=b"server shutting down")

    async def _serve_public(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, private=False)

    async def _serve_private(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, private=True)

    async def _serve(self, request: web.Request, *, private: bool) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=False, max_msg_size=1 << 20)
        await ws.prepare(request)
        self.handshakes["private" if private else "public"] += 1
        connection = _Connection(next(self._ids), str(uuid.uuid4()), ws, request, private)
        if self._faults.storming():
            abort(connection)
            return ws
        self._connections[connection.id] = connection
        connection.outbox = asyncio.Queue()
        writer = asyncio.create_task(self._write(connection), name=f"bybit-emulator-ws-{connection.id}")
        try:
            async for message in ws:
                if connection.stalled():
                    continue
                connection.last_heard = time.monotonic()
                if message.type is WSMsgType.PING:
                    await ws.pong(message.data)
                elif message.type is WSMsgType.TEXT:
                    await self._answer(connection, message.data)
        finally:
            self._connections.pop(connection.id, None)
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        return ws

    async def _answer(self, connection: _Connection, text: str) -> None:
        try:
            request = json.loads(text)
            op = str(request["op"])
            args = request.get("args", [])
            if not isinstance(args, list):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            await self._reply(connection, {"success": False, "ret_msg": "error:request not json or no op"})
            return
        req_id = request.get("req_id")
        head: dict[str, Any] = {"conn_id": connection.conn_id, "op": op}
        if req_id is not None:
            head["req_id"] = req_id
        if op == "ping":
            if connection.private:
                await self._reply(connection, {**head, "op": "pong", "args": [str(int(time.time() * 1000))]})
            else:
                await self._reply(connection, {"success": True, "ret_msg": "pong", **head})
            return
        if op == "auth":
            refusal = "auth is for the private channel" if not connection.private else self._check_auth(args)
            connection.authed = refusal is None
            await self._reply(connection, {"success": refusal is None, "ret_msg": refusal or "", **head})
            return
        if op not in ("subscribe", "unsubscribe"):
            await self._reply(
                connection, {"success": False, "ret_msg": f"error:handler not found,op:{op}", **head}
            )
            return
        topics = [str(a) for a in args]
        refusal = self._check_topics(connection, topics) if op == "subscribe" else None
        if refusal is not None:
            await self._reply(connection, {"success": False, "ret_msg": refusal, **head})
            return
        if op == "subscribe":
            added = [t for t in dict.fromkeys(topics) if t not in connection.subscriptions]
            connection.subscriptions.extend(added)
            held = [t for t in topics if t not in added]
            if held:  # Bybit refuses a topic the connection holds already (the others are taken)
                await self._reply(
                    connection,
                    {"success": False, "ret_msg": f"error:already subscribed,topic:{held[0]}", **head},
                )
                for topic in added:
                    if topic.startswith("tickers."):
                        self._push_ticker(connection, topic, snapshot=True)
                return
        else:
            connection.subscriptions = [t for t in connection.subscriptions if t not in topics]
            for topic in topics:
                connection.sent.pop(topic, None)
            added = []
        await self._reply(connection, {"success": True, "ret_msg": "", **head})
        for topic in added:
            if topic.startswith("tickers."):
                self._push_ticker(connection, topic, snapshot=True)

    def _check_auth(self, args: list[Any]) -> str | None:
        try:
            key, expires, signature = str(args[0]), int(args[1]), str(args[2])
        except (IndexError, TypeError, ValueError):
            return "Params Error"
        return self._view.verify_stream_auth(key, expires, signature)

    def _check_topics(self, connection: _Connection, topics: list[str]) -> str | None:
        for topic in topics:
            if connection.private:
                if _private_topic(topic) is None:
                    return f"error:handler not found,topic:{topic}"
                if not connection.authed:
                    return "Request not authorized"
            elif not topic.startswith("tickers.") or self._view.ticker_row(topic[8:], 0.0) is None:
                return f"error:handler not found,topic:{topic}"
        if sum(len(t) for t in {*connection.subscriptions, *topics}) > MAX_ARGS_CHARS:
            return f"error:args length exceeds {MAX_ARGS_CHARS} characters"
        return None

    async def _reply(self, connection: _Connection, payload: Mapping[str, Any]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await connection.ws.send_str(json.dumps(payload, separators=(",", ":")))

    def _send(self, connection: _Connection, payload: Mapping[str, Any]) -> None:
        if connection.outbox is not None and not connection.stalled():
            departure = self._faults.departure() if connection.private else 0.0
            connection.outbox.put_nowait((departure, json.dumps(payload, separators=(",", ":"))))

    async def _write(self, connection: _Connection) -> None:
        assert connection.outbox is not None
        while True:
            departure, text = await connection.outbox.get()
            await self._faults.hold_until(departure)
            if connection.stalled():
                continue
            with contextlib.suppress(ConnectionError, RuntimeError):
                await connection.ws.send_str(text)
                connection.last_sent = time.monotonic()

    # ---- public tickers -------------------------------------------------------------------------------

    async def _run_ticker(self) -> None:
        while True:
            await asyncio.sleep(_TICK_SECONDS)
            try:
                await self._tick_once()
            except Exception:
                logger.exception("emulator: stream tick failed; the streams keep running")

    async def _tick_once(self) -> None:
        self.account_changed()
        now = time.monotonic()
        for connection in list(self._connections.values()):
            if now - max(connection.last_heard, connection.last_sent) >= self.idle_close_seconds:
                await connection.ws.close(code=1000, message=b"idle")
                continue
            if connection.private or connection.stalled():
                continue
            for topic in list(connection.subscriptions):
                self._push_ticker(connection, topic, snapshot=False)

    def _push_ticker(self, connection: _Connection, topic: str, *, snapshot: bool) -> None:
        venue_now = self._view.now()
        row = self._view.ticker_row(topic[len("tickers.") :], venue_now)
        if row is None:
            return
        before = connection.sent.get(topic)
        now = time.monotonic()
        if snapshot or before is None:
            data, kind = row, "snapshot"
        else:
            changed = {k: v for k, v in row.items() if k in _TICKER_PRICE_FIELDS and before[0].get(k) != v}
            if not changed and now - before[1] < _QUIET_DELTA_SECONDS:
                return
            data, kind = {"symbol": row["symbol"], **changed}, "delta"
        connection.sent[topic] = (row, now)
        self._send(
            connection,
            {
                "topic": topic,
                "type": kind,
                "data": data,
                "cs": next(self._cross_seq),
                "ts": int(venue_now * 1000),
            },
        )

    # ---- private topics -------------------------------------------------------------------------------

    def account_changed(self) -> None:
        """Compare the book with what the private topics have told and push the difference."""
        rows = self._view.stream_rows(self._orders_seen, list(self._told_orders), self._told_executions)
        self._orders_seen = rows.order_count
        order_rows: list[dict[str, Any]] = []
        for order_id, row in rows.orders.items():
            key = (row.get("orderStatus"), row.get("triggerPrice"), row.get("cumExecQty"), row.get("qty"))
            before = self._told_orders.get(order_id)
            if before == key:
                continue
            if (
                row.get("stopOrderType")
                and row.get("orderStatus") == "Filled"
                and (before is None or before[0] == "Untriggered")
            ):  # a stop that fires is Triggered, then Filled
                order_rows.append({**row, "orderStatus": "Triggered", "cumExecQty": "0", "avgPrice": ""})
            order_rows.append(row)
            if row.get("orderStatus") in _FINAL_ORDER_STATUSES:
                self._told_orders.pop(order_id, None)  # told for good: not looked at again
            else:
                self._told_orders[order_id] = key
        execution_rows = rows.executions
        self._told_executions = rows.execution_count
        positions = rows.positions
        position_rows = []
        for symbol in sorted(positions.keys() | self._told_positions.keys()):
            row = positions.get(symbol)
            key = (
                ()
                if row is None
                else (
                    row["side"],
                    row["size"],
                    row["entryPrice"],
                    row["stopLoss"],
                    row["trailingStop"],
                    row.get("leverage"),
                    row.get("liqPrice"),
                )
            )
            if key == self._told_positions.get(symbol, ()):
                continue
            if row is None:
                row = {
                    "symbol": symbol,
                    "side": "",
                    "size": "0",
                    "entryPrice": "0",
                    "positionIdx": 0,
                    "stopLoss": "0",
                    "trailingStop": "0",
                    "category": "linear",
                }
            position_rows.append(row)
            if key:
                self._told_positions[symbol] = key
            else:
                self._told_positions.pop(symbol, None)
        messages = []
        now_ms = int(self._view.now() * 1000)
        for topic, told in (
            ("order", order_rows),
            ("execution", execution_rows),
            ("position", position_rows),
        ):
            rows = self._faults.outgoing(topic, told) if told else None
            if rows:
                messages.append(
                    {
                        "id": str(uuid.uuid4()),
                        "topic": topic,
                        "creationTime": now_ms,
                        "data": [{"category": "linear", **r} for r in rows],
                    }
                )
        if messages:
            self._publish(self._faults.reordered(messages))

    def _publish(self, messages: list[dict[str, Any]]) -> None:
        for connection in self._connections.values():
            if not connection.private or not connection.authed:
                continue
            for message in messages:
                if any(_private_topic(t) == message["topic"] for t in connection.subscriptions):
                    self._send(connection, message)

    # ---- faults and state -----------------------------------------------------------------------------

    async def stage_fault(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._faults.stage(body, self._connections.values(), topics=_FAULT_TOPICS)

    def clear_faults(self) -> None:
        self._faults.clear(self._connections.values())

    def state(self) -> dict[str, Any]:
        return {
            "connections": [
                {
                    "id": c.id,
                    "kind": "private" if c.private else "public",
                    "authed": c.authed,
                    "subscriptions": list(c.subscriptions),
                    "stalled": c.stalled(),
                }
                for c in self._connections.values()
            ],
            "handshakes": dict(self.handshakes),
        }


__all__ = ["PRIVATE_PATH", "PUBLIC_PATH", "BybitStreamHub", "stream_signature"]

"""The Bybit v5 wire emulator (category linear, unified account, one-way mode): an aiohttp app over the sim
venue's matching core, so the real ccxt adapter trades over real HTTP with real signing on loopback.

It speaks the subset of v5 the adapter uses, with Bybit's paths, parameters, signing, JSON envelope and
error codes (bybit-exchange.github.io/docs/v5):

* public: `GET /v5/market/time`, `/v5/market/instruments-info` (limit + cursor;
  `status`, Trading by default), `/v5/market/tickers`
  (`markPrice` and `lastPrice`, which move separately so that wicks can be staged);
* private, signed: `X-BAPI-API-KEY`, `X-BAPI-TIMESTAMP`, `X-BAPI-RECV-WINDOW`, `X-BAPI-SIGN` = HMAC-SHA256
  over timestamp + key + recvWindow + (query string | JSON body). A wrong key answers 10003, a wrong sign
  10004, a timestamp outside `[server - recvWindow, server + 1000)` 10002;
  `GET /v5/account/wallet-balance` (accountType UNIFIED only), `GET /v5/position/list` (symbol or
  settleCoin, `limit` 1..200 default 20, `cursor`), `POST /v5/position/set-leverage` (110043 when
  unchanged), `POST /v5/order/create` (Market only; 110072 duplicate `orderLinkId`, 110017 reduce-only with
  nothing to reduce, 110007 balance; `stopLoss` with `slTriggerBy`/`tpslMode=Full` on the entry; with the
  `async:SECONDS` fault, executed SECONDS after its answer, `New` meanwhile, as Bybit's creation is
  asynchronous),
  `GET /v5/order/realtime` and `/v5/order/history` (`orderFilter=Order|StopOrder`, by `orderId` /
  `orderLinkId`), `GET /v5/execution/list` (the fills, the stops' fills too, with their price),
  `POST /v5/position/trading-stop` (below).

Business errors are HTTP 200 with `retCode` ≠ 0, as on Bybit. HTTP statuses other than 200 are the IP ban
(403), unknown paths (404) and injected faults.

Position stops (`trading-stop`, tpslMode Full; one-way mode, `positionIdx` 0): they live on the position.
`stopLoss` triggers on `slTriggerBy` (MarkPrice default, or LastPrice) and must lie on the right side of
both the mark and the last price (else 10001 naming `base_price`); `trailingStop` is a price distance that
follows the **last** price (no trigger-by option on Bybit): armed at once, or when the last price reaches
`activePrice` (which must lie beyond the last price for the position's side, else 10001); re-sending a
trailing stop starts its high-water mark again, as Bybit does. `"0"` cancels a stop; values equal to the
current ones answer 34040 "not modified"; no position answers 10001 "zero position". Each stop is shown
as a system-created order in `order/realtime` with `orderFilter=StopOrder` (`stopOrderType` StopLoss /
TrailingStop, `orderStatus` Untriggered, `triggerPrice` the trigger level, or a trailing stop's
`activePrice` when it has one, as Bybit's docs say), sized to the whole
position. When one fires it closes the position at market (Filled, in `order/history` and
`execution/list` with its price); whenever the position reaches 0 (a stop, a reduce-only order) the venue
deactivates what is left.

Limits (`limits.py`): 600 requests per IP per 5 s, over it HTTP 403 and a 10-minute ban; per endpoint per
second, over it 10006 with the `X-Bapi-Limit*` headers on every limited answer. Faults (`faults.py`) as
in the Binance emulator. Control API (loopback callers only, never counted): `POST /_sim/mark` (mark and,
unless `last` is given, last), `POST /_sim/last` (the last price alone: a wick), `POST /_sim/fault`,
`POST /_sim/clear-faults`, `POST /_sim/advance`, `POST /_sim/skew` (the server clock's offset, for clock
drift), `POST /_sim/position-stops` (seed stops straight on a position, as another client would),
`POST /_sim/symbol-status` (an instrument's status: only Trading is listed by default and opens positions),
`POST /_sim/stream-fault` (websocket faults), `GET /_sim/state`.

Websockets on the same port (`streams.py`): the public `tickers` topic and the private `order`,
`execution` and `position` topics, pushed from this book after every request and every price move.
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
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from engine.exchange.errors import (
    Banned,
    DuplicateClientOrderId,
    ExchangeError,
    InsufficientMargin,
    RateLimited,
    RejectCode,
    Rejected,
)
from engine.exchange.port import Market, Order, OrderSide, OrderStatus, PositionSide, VenuePosition
from engine.venues import bybit_limits
from engine.venues.binance_emulator.faults import control_target_texts
from engine.venues.bybit_emulator.faults import (
    TARGETS_BY_CALL,
    EmulatorFaultKind,
    FaultPlan,
    FaultSpecError,
    parse_bybit_fault,
    parse_target,
    require_order_create_target,
)
from engine.venues.bybit_emulator.limits import ENDPOINT_WINDOW_SECONDS, BybitLimiter
from engine.venues.bybit_emulator.streams import BybitStreamHub, StreamRows, stream_signature
from engine.venues.sim.control_api import advance_seconds, control_body, require_loopback, skew_seconds
from engine.venues.sim.core import DEFAULT_ACCOUNT, SimCore
from engine.venues.sim.prices import GbmWalk
from engine.venues.sim.settings import SimVenueSettings
from engine.venues.sim.stream_faults import StreamFaultError
from engine.venues.sim.universe import select_listings

logger = logging.getLogger(__name__)

LOOPBACK_HOST = "127.0.0.1"
_OPEN_STATUSES = frozenset({"New", "Untriggered"})  # what order/realtime lists; order/history the rest
DEFAULT_RECV_WINDOW_MS = 5_000
POSITION_PAGE_DEFAULT, POSITION_PAGE_MAX = 20, 200
ORDER_PAGE_DEFAULT, ORDER_PAGE_MAX = 20, 50
EXECUTION_PAGE_DEFAULT, EXECUTION_PAGE_MAX = 50, 100
INSTRUMENT_PAGE_DEFAULT, INSTRUMENT_PAGE_MAX = 500, 1000
FIRST_PAGE_CURSOR = "first"  # a cursor addressing the first page (the `cursor` fault's, on a first page)
_ZERO = Decimal(0)

# retCodes (v5 "Error Codes")
PARAMS_ERROR = 10001
TIMESTAMP_ERROR = 10002
INVALID_KEY = 10003
SIGN_ERROR = 10004
TOO_MANY_VISITS = 10006
SERVER_ERROR = 10016
NOT_ENOUGH_BALANCE = 110007
REDUCE_ONLY_NOTHING = 110017
LEVERAGE_NOT_MODIFIED = 110043
DUPLICATE_LINK_ID = 110072
SETTLEMENT_IN_PROGRESS = 110063
NO_TRADING_NOW = 110066
# Instrument statuses (v5 "Get Instruments Info"); without a `status` filter the list holds Trading ones only.
INSTRUMENT_STATUSES = frozenset({"PreLaunch", "Trading", "Settling", "Delivering", "Closed"})
NOT_MODIFIED = 34040


class BybitError(Exception):
    """An error answer in Bybit's envelope: HTTP 200 with a retCode, unless `status` says otherwise."""

    def __init__(
        self, code: int, msg: str, *, status: int = 200, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{code} {msg}")
        self.code = code
        self.msg = msg
        self.status = status
        self.headers = headers or {}

    def response(self, now: float) -> web.Response:
        """`now`: the server's clock (the envelope's `time`, which clients read to correct their own)."""
        body = {"retCode": self.code, "retMsg": self.msg, "result": {}, "retExtInfo": {}, "time": _ms(now)}
        return _json(body, status=self.status, headers=self.headers)


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=json.dumps(payload, separators=(",", ":")),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _ok(result: Any, now: float) -> dict[str, Any]:
    return {"retCode": 0, "retMsg": "OK", "result": result, "retExtInfo": {}, "time": _ms(now)}


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _text(value: Decimal | None) -> str:
    return "" if value is None else format(value, "f")


def _side_word(side: OrderSide) -> str:
    return "Buy" if side is OrderSide.BUY else "Sell"


@dataclass(slots=True)
class _StopOrder:
    """A system-created order behind a position stop (what `orderFilter=StopOrder` lists)."""

    order_id: str
    symbol: str
    stop_order_type: str  # "StopLoss" | "TrailingStop"
    side: OrderSide  # the closing side
    trigger_by: str  # "MarkPrice" | "LastPrice"
    trigger_price: Decimal
    created_at: float
    updated_at: float
    status: str = "Untriggered"  # → Filled | Deactivated
    qty: Decimal = _ZERO
    exec_qty: Decimal = _ZERO
    avg_price: Decimal | None = None
    # A trailing stop's `activePrice`: what its order row shows as `triggerPrice` (Bybit's docs: "If
    # stopOrderType=TrailingStop, it is activate price"). One armed at once shows its current level.
    active_price: Decimal | None = None


@dataclass(slots=True)
class _PositionStops:
    stop_loss: _StopOrder | None = None
    trailing: _StopOrder | None = None
    distance: Decimal | None = None
    active_price: Decimal | None = None
    armed: bool = False
    extreme: Decimal | None = None  # the best last price since armed (high for a long, low for a short)
    trailing_set_at: float | None = None  # when trading-stop last set the trailing stop (a reset, on Bybit)


@dataclass(slots=True)
class _RegularOrder:
    order_id: str
    order_link_id: str
    symbol: str
    side: OrderSide
    qty: Decimal
    exec_qty: Decimal
    avg_price: Decimal | None
    reduce_only: bool
    created_at: float
    status: str = "Filled"


@dataclass(frozen=True, slots=True)
class _Execution:
    exec_id: str
    order_id: str
    order_link_id: str
    symbol: str
    side: OrderSide
    price: Decimal
    qty: Decimal
    stop_order_type: str
    time: float
    closed: Decimal  # of it, what closed a position (Bybit's `closedSize`): 0 for an opening trade


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    params: dict[str, Any]
    now: float
    fill_after: float | None = None  # an `async` fault: the market order it places executes this much later


@dataclass(frozen=True, slots=True)
class _Working:
    """A market order accepted and not executed yet (Bybit's asynchronous creation), with what it carries:
    the core's client id for it and the `stopLoss` to set on the position once it fills."""

    client_id: str
    stop_loss: Decimal | None
    trigger_by: str


@dataclass(slots=True)
class _Book:
    stops: dict[str, _PositionStops] = field(default_factory=dict)
    orders: dict[str, _RegularOrder | _StopOrder] = field(default_factory=dict)  # by orderId, in order
    by_link_id: dict[str, str] = field(default_factory=dict)
    executions: list[_Execution] = field(default_factory=list)
    working: dict[str, _Working] = field(default_factory=dict)  # by orderId: accepted, not executed yet


class BybitEmulator:
    def __init__(
        self,
        settings: SimVenueSettings,
        *,
        api_key: str,
        api_secret: str,
        faults: FaultPlan | None = None,
        control: bool = False,
        limiter: BybitLimiter | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not api_key or not api_secret:
            raise ValueError("the emulator needs an API key and secret to verify signatures")
        self._settings = settings
        self._api_key = api_key
        self._secret = api_secret.encode()
        self.faults = faults if faults is not None else FaultPlan(seed=settings.seed)
        self._control = control
        self._wall_clock = wall_clock
        self._offset = 0.0
        self._skew = 0.0  # the server clock's error against the real one (signature timestamps, market/time)
        self.limits = limiter if limiter is not None else BybitLimiter()
        listings = select_listings(settings.symbols, settings.synthetic_listings)
        self.core = SimCore(listings, settings, now=self.now())
        markets = self.core.markets
        self._last: dict[str, Decimal] = {symbol: self.core.mark(symbol) for symbol in markets}
        self.symbol_status: dict[str, str] = {}  # instruments-info status by symbol (none: Trading)
        self._walk = GbmWalk(
            seed=settings.seed,
            initial_prices={symbol: self.core.mark(symbol) for symbol in markets},
            tick_sizes={symbol: market.tick_size for symbol, market in markets.items()},
            volatility={symbol: settings.volatility_for(symbol) for symbol in markets},
        )
        self._book = _Book()
        self._leverages: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._ids_epoch_ms = int(time.time() * 1000)
        self._closing = asyncio.Event()
        self.requests_served = 0
        self.requests_by_endpoint: dict[str, int] = {}  # "METHOD endpoint" -> requests served
        self.stops_attached_to_entries = 0
        self.orders_answered_working = 0  # market orders answered before they executed (`async`)
        self.too_many_visits: dict[str, int] = {}  # 10006 answers of the endpoint limits, by path
        self.streams = BybitStreamHub(self)

    # ---- time ------------------------------------------------------------------------------------------

    def now(self) -> float:
        return self._wall_clock() + self._offset

    def server_time(self) -> float:
        """The clock request timestamps are checked against (real time plus the staged skew)."""
        return time.time() + self._skew

    # ---- the aiohttp app ------------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application()
        route = self._route
        app.router.add_get("/v5/market/time", route("market/time", self._time, signed=False))
        app.router.add_get(
            "/v5/market/instruments-info", route("market/instruments-info", self._instruments, signed=False)
        )
        app.router.add_get("/v5/market/tickers", route("market/tickers", self._tickers, signed=False))
        app.router.add_get("/v5/account/wallet-balance", route("account/wallet-balance", self._wallet))
        app.router.add_get("/v5/position/list", route("position/list", self._position_list))
        app.router.add_post("/v5/position/set-leverage", route("position/set-leverage", self._set_leverage))
        app.router.add_post("/v5/position/trading-stop", route("position/trading-stop", self._trading_stop))
        app.router.add_post("/v5/order/create", route("order/create", self._order_create))
        app.router.add_get("/v5/order/realtime", route("order/realtime", self._order_realtime))
        app.router.add_get("/v5/order/history", route("order/history", self._order_history))
        app.router.add_get("/v5/execution/list", route("execution/list", self._execution_list))
        if self._control:
            app.router.add_post("/_sim/mark", self._control_mark)
            app.router.add_post("/_sim/last", self._control_last)
            app.router.add_post("/_sim/fault", self._control_fault)
            app.router.add_post("/_sim/clear-faults", self._control_clear_faults)
            app.router.add_post("/_sim/advance", self._control_advance)
            app.router.add_post("/_sim/skew", self._control_skew)
            app.router.add_post("/_sim/position-stops", self._control_position_stops)
            app.router.add_post("/_sim/symbol-status", self._control_symbol_status)
            app.router.add_get("/_sim/state", self._control_state)
            app.router.add_post("/_sim/stream-fault", self._control_stream_fault)
        self.streams.add_routes(app)
        app.cleanup_ctx.append(self._mark_ticker_context)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, _app: web.Application) -> None:
        self._closing.set()

    async def _mark_ticker_context(self, _app: web.Application):  # type: ignore[no-untyped-def]
        task = asyncio.create_task(self._run_mark_ticker(), name="bybit-emulator-mark-ticker")
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _run_mark_ticker(self) -> None:
        interval = self._settings.mark_tick_seconds
        while True:
            await asyncio.sleep(interval)
            try:
                for symbol, price in self._walk.step(interval).items():
                    self.set_prices(symbol, mark=price, last=price)
                if self.settle_working(self.now()):
                    self.streams.account_changed()
            except Exception:
                logger.exception("emulator: price tick failed; the ticker keeps running")

    # ---- prices and the stops they fire ----------------------------------------------------------------

    def set_prices(
        self, symbol: str, *, mark: Decimal | None = None, last: Decimal | None = None
    ) -> list[str]:
        """Move the mark and/or the last price (on the tick grid) and run the position stops against them;
        returns the order ids of the stops that fired."""
        market = self.core.markets[symbol]
        now = self.now()
        if mark is not None:
            mark = market.round_price(mark)
            self._walk.set_price(symbol, mark)
            self.core.set_mark(symbol, mark, now)
        if last is not None:
            self._last[symbol] = market.round_price(last)
        fired = self._run_stops(symbol, now)
        if fired:
            self.streams.account_changed()  # a fired stop reaches the private topics at once
        return fired

    def last_price(self, symbol: str) -> Decimal:
        return self._last[symbol]

    def _position(self, symbol: str, now: float) -> VenuePosition | None:
        for position in self.core.inspect(now, DEFAULT_ACCOUNT).positions:
            if position.symbol == symbol:
                return position
        return None

    def _run_stops(self, symbol: str, now: float) -> list[str]:
        stops = self._book.stops.get(symbol)
        if stops is None:
            return []
        position = self._position(symbol, now)
        if position is None:
            self._deactivate(symbol, now)
            return []
        long = position.side.value == "long"
        mark, last = self.core.mark(symbol), self._last[symbol]
        fired: _StopOrder | None = None
        if stops.trailing is not None and stops.distance is not None:
            if not stops.armed and (
                stops.active_price is None
                or (last >= stops.active_price if long else last <= stops.active_price)
            ):
                stops.armed, stops.extreme = True, last
            if stops.armed:
                assert stops.extreme is not None
                stops.extreme = max(stops.extreme, last) if long else min(stops.extreme, last)
                level = stops.extreme - stops.distance if long else stops.extreme + stops.distance
                if level != stops.trailing.trigger_price:
                    stops.trailing.trigger_price, stops.trailing.updated_at = level, now
                if last <= level if long else last >= level:
                    fired = stops.trailing
        if fired is None and stops.stop_loss is not None:
            price = mark if stops.stop_loss.trigger_by == "MarkPrice" else last
            level = stops.stop_loss.trigger_price
            if price <= level if long else price >= level:
                fired = stops.stop_loss
        if fired is None:
            return []
        self._fill_stop(fired, position, now)
        self._deactivate(symbol, now)
        return [fired.order_id]

    def _fill_stop(self, stop: _StopOrder, position: VenuePosition, now: float) -> None:
        close_side = OrderSide.SELL if position.side.value == "long" else OrderSide.BUY
        try:
            order = self.core.place_market_order(
                stop.symbol,
                close_side,
                position.quantity,
                f"bybit-stop-{stop.order_id[:24]}",
                now,
                reduce_only=True,
                account_id=DEFAULT_ACCOUNT,
            )
        except ExchangeError as error:
            logger.warning(
                "emulator: %s %s could not close the position: %s", stop.symbol, stop.order_id, error
            )
            return
        stop.status, stop.updated_at = "Filled", now
        stop.qty, stop.exec_qty, stop.avg_price = (
            position.quantity,
            order.filled_quantity,
            order.average_price,
        )
        self._book.executions.append(
            _Execution(
                self._new_id(),
                stop.order_id,
                "",
                stop.symbol,
                close_side,
                order.average_price or _ZERO,
                order.filled_quantity,
                stop.stop_order_type,
                now,
                order.filled_quantity,
            )
        )
        logger.info(
            "emulator: %s %s fired, closed %s at %s",
            stop.symbol,
            stop.stop_order_type,
            order.filled_quantity,
            order.average_price,
        )

    def _deactivate(self, symbol: str, now: float) -> None:
        """The position is gone: the venue cancels the stops left on it."""
        stops = self._book.stops.pop(symbol, None)
        if stops is None:
            return
        for stop in (stops.stop_loss, stops.trailing):
            if stop is not None and stop.status == "Untriggered":
                stop.status, stop.updated_at = "Deactivated", now

    def _new_id(self) -> str:
        """A new orderId, never given before by any emulator started earlier (Bybit's are UUIDs, never
        reused): the start's time in milliseconds above a count, so ids also rank by age across restarts
        (the pages' order). Numbered again from the seed's first id after a restart, the next entry took
        an earlier one's id and a reader's memory of that id's fills (a reviewer)."""
        return str(uuid.UUID(int=(self._ids_epoch_ms << 64) + next(self._ids)))

    # ---- routing, limits, faults, signing ----------------------------------------------------------------

    def _route(
        self, endpoint: str, handler: Callable[[_Request], Any], *, signed: bool = True
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        path = f"/v5/{endpoint}"

        async def handle(request: web.Request) -> web.Response:
            self.requests_served += 1
            key = f"{request.method} {endpoint}"
            self.requests_by_endpoint[key] = self.requests_by_endpoint.get(key, 0) + 1
            ip = request.remote or LOOPBACK_HOST
            banned_until = self.limits.admit_ip(ip, self.now())
            if banned_until is not None:
                logger.info("emulator: %s %s refused: IP banned", request.method, endpoint)
                return _ip_ban()
            try:
                params = await self._read(request, signed)
            except BybitError as error:
                return error.response(self.server_time())
            headers: dict[str, str] = {}
            if signed:
                count = self.limits.admit_endpoint(path, self.now())
                if count is not None:
                    headers = {
                        bybit_limits.LIMIT_HEADER: str(count.limit),
                        bybit_limits.LIMIT_STATUS_HEADER: str(count.left),
                        bybit_limits.LIMIT_RESET_HEADER: str(count.reset_ms),
                    }
                    if count.refused:
                        self.too_many_visits[path] = self.too_many_visits.get(path, 0) + 1
                        return BybitError(TOO_MANY_VISITS, "Too many visits!", headers=headers).response(
                            self.now()
                        )
            response = await self._serve(request.method, endpoint, handler, params, ip, headers)
            self.streams.account_changed()  # what the request changed reaches the private topics
            for name, value in headers.items():
                response.headers.setdefault(name, value)  # a refusal's own count stands
            return response

        return handle

    async def _serve(
        self,
        method: str,
        endpoint: str,
        handler: Callable[[_Request], Any],
        params: dict[str, Any],
        ip: str,
        limit_headers: dict[str, str],
    ) -> web.Response:
        """Serve one admitted request (`limit_headers`: its endpoint's count, when the endpoint is limited)."""
        fault = self.faults.draw(method, endpoint)
        if self.faults.base_latency_ms:
            await asyncio.sleep(self.faults.base_latency_ms / 1000)
        if fault is not None:
            refusal = _refusal(fault.kind)
            if isinstance(refusal, BybitError) and refusal.code == TOO_MANY_VISITS and limit_headers:
                # Bybit's 10006 carries the endpoint's limit headers, the window full until it frees
                refusal.headers = {
                    **limit_headers,
                    bybit_limits.LIMIT_STATUS_HEADER: "0",
                    bybit_limits.LIMIT_RESET_HEADER: str(_ms(self.now() + ENDPOINT_WINDOW_SECONDS)),
                }
            if fault.kind is EmulatorFaultKind.BAN:  # as on Bybit, the 403 is the start of the IP's ban
                self.limits.ban(ip, self.now())
            if refusal is not None:
                logger.info("emulator: fault %s on %s %s (not executed)", fault.kind, method, endpoint)
                return refusal if isinstance(refusal, web.Response) else refusal.response(self.server_time())
            if fault.kind is EmulatorFaultKind.LATENCY:
                await asyncio.sleep(fault.latency_ms / 1000)
        now = self.now()
        self.settle_working(now)
        fill_after = fault.seconds if fault is not None and fault.kind is EmulatorFaultKind.ASYNC else None
        try:
            result = handler(_Request(method, params, now, fill_after))
            paged = isinstance(result, dict) and "nextPageCursor" in result
            if fault is not None and fault.kind is EmulatorFaultKind.CURSOR and paged:
                logger.info("emulator: fault cursor on %s %s (the page's own cursor)", method, endpoint)
                result["nextPageCursor"] = str(params.get("cursor") or FIRST_PAGE_CURSOR)
            response = _json(_ok(result, self.server_time()))
        except BybitError as error:
            response = error.response(self.server_time())
        except ExchangeError as error:
            response = _translate(error).response(self.server_time())
        if fault is not None and fault.kind is EmulatorFaultKind.UNKNOWN:
            logger.info("emulator: fault unknown on %s %s (executed, answer 502)", method, endpoint)
            return web.Response(status=502, text="<html><body>502 Bad Gateway</body></html>")
        if fault is not None and fault.kind is EmulatorFaultKind.TIMEOUT:
            logger.info("emulator: fault timeout on %s %s (executed, answer held)", method, endpoint)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(fault.hold_seconds):
                    await self._closing.wait()
        return response

    async def _read(self, request: web.Request, signed: bool) -> dict[str, Any]:
        raw_query = request.rel_url.raw_query_string
        body = await request.text() if request.can_read_body else ""
        if signed:
            self._authenticate(request, raw_query if request.method == "GET" else body)
        if request.method == "GET":
            return dict(parse_qsl(raw_query, keep_blank_values=True))
        if not body:
            return {}
        try:
            parsed = json.loads(body)
        except ValueError:
            raise BybitError(PARAMS_ERROR, "params error: request body is not JSON") from None
        if not isinstance(parsed, dict):
            raise BybitError(PARAMS_ERROR, "params error: request body must be a JSON object")
        return parsed

    def _authenticate(self, request: web.Request, payload: str) -> None:
        key = request.headers.get("X-BAPI-API-KEY", "")
        timestamp = request.headers.get("X-BAPI-TIMESTAMP", "")
        recv_window = request.headers.get("X-BAPI-RECV-WINDOW", str(DEFAULT_RECV_WINDOW_MS))
        signature = request.headers.get("X-BAPI-SIGN", "")
        if not key or not hmac.compare_digest(key, self._api_key):
            raise BybitError(INVALID_KEY, "API key is invalid.", status=401)
        expected = hmac.new(self._secret, (timestamp + key + recv_window + payload).encode(), hashlib.sha256)
        if not hmac.compare_digest(expected.hexdigest(), signature):
            raise BybitError(SIGN_ERROR, "error sign! origin_string[redacted]")
        try:
            stamp, window = int(timestamp), int(recv_window)
        except ValueError:
            raise BybitError(PARAMS_ERROR, "params error: X-BAPI-TIMESTAMP / X-BAPI-RECV-WINDOW") from None
        server = _ms(self.server_time())
        if not server - window <= stamp < server + 1000:
            raise BybitError(
                TIMESTAMP_ERROR,
                "invalid request, please check your server timestamp or recv_window param. "
                f"req_timestamp[{stamp}],server_timestamp[{server}],recv_window[{window}]",
            )

    # ---- parameter helpers ------------------------------------------------------------------------------

    def _market(self, params: dict[str, Any]) -> Market:
        if params.get("category") != "linear":
            raise BybitError(PARAMS_ERROR, "params error: category only supports linear in the emulator")
        symbol = str(params.get("symbol", ""))
        market = self.core.markets.get(symbol)
        if market is None:
            raise BybitError(PARAMS_ERROR, f"params error: symbol invalid {symbol!r}")
        return market

    @staticmethod
    def _decimal(params: dict[str, Any], name: str) -> Decimal | None:
        value = params.get(name)
        if value is None or value == "":
            return None
        try:
            number = Decimal(str(value))
        except InvalidOperation:
            raise BybitError(PARAMS_ERROR, f"params error: {name} invalid") from None
        if not number.is_finite() or number < 0:
            raise BybitError(PARAMS_ERROR, f"params error: {name} invalid")
        return number

    @staticmethod
    def _page(params: dict[str, Any], default: int, maximum: int) -> tuple[str | None, int]:
        """(the key after which the page starts, None for the first page; the page's size)."""
        try:
            limit = int(params.get("limit", default))
        except ValueError:
            raise BybitError(PARAMS_ERROR, "params error: limit or cursor invalid") from None
        if not 1 <= limit <= maximum:
            raise BybitError(PARAMS_ERROR, f"params error: limit must be within 1..{maximum}")
        cursor = str(params.get("cursor") or "")
        return (None if cursor in ("", FIRST_PAGE_CURSOR) else cursor), limit

    @staticmethod
    def _paged(
        rows: list[dict[str, Any]], after: str | None, limit: int, key: str, *, newest_first: bool = False
    ) -> tuple[list[dict[str, Any]], str]:
        """A page by key, as Bybit's cursors are: the rows after the last one served (by symbol, or newer
        ids first), not an offset into the list, so a row that ends between two pages shifts nothing (an
        offset skipped the row after it, and the walk read as complete without it: a reviewer)."""

        def rank(text: str) -> Any:
            return uuid.UUID(text).int if newest_first else text

        if after is not None:
            try:
                bound = rank(after)
            except ValueError:
                raise BybitError(PARAMS_ERROR, "params error: cursor invalid") from None
            rows = [r for r in rows if (rank(r[key]) < bound if newest_first else rank(r[key]) > bound)]
        page = rows[:limit]
        return page, str(page[-1][key]) if len(rows) > limit else ""

    # ---- public -----------------------------------------------------------------------------------------

    def _time(self, request: _Request) -> Any:
        server = self.server_time()
        return {"timeSecond": str(int(server)), "timeNano": str(int(server * 1_000_000_000))}

    def _instruments(self, request: _Request) -> Any:
        params = request.params
        if params.get("category") != "linear":
            raise BybitError(PARAMS_ERROR, "params error: category only supports linear in the emulator")
        status = params.get("status", "Trading")
        if status not in INSTRUMENT_STATUSES:
            raise BybitError(PARAMS_ERROR, f"params error: status invalid {status!r}")
        markets = sorted(self.core.markets.values(), key=lambda m: m.symbol)
        if "symbol" in params:
            markets = [m for m in markets if m.symbol == params["symbol"]]
        rows = [
            _instrument(m, status) for m in markets if self.symbol_status.get(m.symbol, "Trading") == status
        ]
        after, limit = self._page(params, INSTRUMENT_PAGE_DEFAULT, INSTRUMENT_PAGE_MAX)
        page, cursor = self._paged(rows, after, limit, "symbol")
        return {"category": "linear", "list": page, "nextPageCursor": cursor}

    def _tickers(self, request: _Request) -> Any:
        params = request.params
        if params.get("category") != "linear":
            raise BybitError(PARAMS_ERROR, "params error: category only supports linear in the emulator")
        symbols = sorted(self.core.markets)
        if "symbol" in params:
            if params["symbol"] not in self.core.markets:
                raise BybitError(PARAMS_ERROR, f"params error: symbol invalid {params['symbol']!r}")
            symbols = [params["symbol"]]
        rows = [self.ticker_row(symbol, request.now) for symbol in symbols]
        return {"category": "linear", "list": rows}

    def ticker_row(self, symbol: str, now: float) -> dict[str, Any] | None:
        """A `tickers` row (REST and the `tickers.{symbol}` topic); None for an unknown symbol."""
        if symbol not in self.core.markets:
            return None
        mark, last = self.core.mark(symbol), self._last[symbol]
        return {
            "symbol": symbol,
            "lastPrice": _text(last),
            "markPrice": _text(mark),
            "indexPrice": _text(mark),
            "bid1Price": _text(last),
            "ask1Price": _text(last),
            "prevPrice24h": _text(last),
            "price24hPcnt": "0",
            "highPrice24h": _text(last),
            "lowPrice24h": _text(last),
            "volume24h": "0",
            "turnover24h": "0",
            "fundingRate": "0.0001",
            "nextFundingTime": str(_ms(now) + 3_600_000),
            "openInterest": "0",
        }

    # ---- account and positions --------------------------------------------------------------------------

    def _wallet(self, request: _Request) -> Any:
        if request.params.get("accountType") != "UNIFIED":
            raise BybitError(PARAMS_ERROR, "accountType only support UNIFIED.")
        balance = self.core.balance(request.now, DEFAULT_ACCOUNT)
        equity = balance.wallet_balance + balance.unrealized_pnl
        coin = {
            "coin": "USDT",
            "equity": _text(equity),
            "usdValue": _text(equity),
            "walletBalance": _text(balance.wallet_balance),
            "unrealisedPnl": _text(balance.unrealized_pnl),
            "availableToWithdraw": "",
            "locked": "0",
            "borrowAmount": "0",
            "cumRealisedPnl": "0",
            "marginCollateral": True,
            "collateralSwitch": True,
        }
        return {
            "list": [
                {
                    "accountType": "UNIFIED",
                    "totalEquity": _text(equity),
                    "totalWalletBalance": _text(balance.wallet_balance),
                    "totalMarginBalance": _text(equity),
                    "totalAvailableBalance": _text(balance.available_balance),
                    "totalPerpUPL": _text(balance.unrealized_pnl),
                    "totalInitialMargin": _text(equity - balance.available_balance),
                    "totalMaintenanceMargin": "0",
                    "accountIMRate": "0",
                    "accountMMRate": "0",
                    "coin": [coin],
                }
            ]
        }

    def _position_row(self, symbol: str, position: VenuePosition | None, now: float) -> dict[str, Any]:
        stops = self._book.stops.get(symbol, _PositionStops())
        mark = self.core.mark(symbol)
        if position is None:
            side, size, entry, pnl, lev, updated = "", _ZERO, _ZERO, _ZERO, 10, now
            liquidation = ""
        else:
            side = "Buy" if position.side.value == "long" else "Sell"
            size, entry, pnl = position.quantity, position.entry_price, position.unrealized_pnl
            lev, updated = position.leverage, position.updated_at
            liquidation = "" if position.liquidation_price is None else _text(position.liquidation_price)
        return {
            "positionIdx": 0,
            "riskId": 1,
            "riskLimitValue": "2000000",
            "symbol": symbol,
            "side": side,
            "size": _text(size),
            "avgPrice": _text(entry),
            "positionValue": _text(size * entry),
            "tradeMode": 0,
            "autoAddMargin": 0,
            "positionStatus": "Normal",
            "leverage": str(lev),
            "markPrice": _text(mark),
            "liqPrice": liquidation,
            "bustPrice": "",
            "positionIM": "0",
            "positionMM": "0",
            "tpslMode": "Full",
            "takeProfit": "0",
            "stopLoss": _text(stops.stop_loss.trigger_price) if stops.stop_loss else "0",
            "trailingStop": _text(stops.distance) if stops.trailing else "0",
            "unrealisedPnl": _text(pnl),
            "curRealisedPnl": "0",
            "cumRealisedPnl": "0",
            "adlRankIndicator": 2 if size else 0,
            "isReduceOnly": False,
            "createdTime": str(_ms(updated)),
            "updatedTime": str(_ms(updated)),
            "seq": 1,
        }

    def _position_list(self, request: _Request) -> Any:
        params = request.params
        if params.get("category") != "linear":
            raise BybitError(PARAMS_ERROR, "params error: category only supports linear in the emulator")
        positions = {p.symbol: p for p in self.core.positions(request.now, DEFAULT_ACCOUNT)}
        if params.get("symbol"):
            symbol = self._market(params).symbol
            rows = [self._position_row(symbol, positions.get(symbol), request.now)]
        elif params.get("settleCoin") == "USDT":
            rows = [self._position_row(s, positions[s], request.now) for s in sorted(positions)]
        else:
            raise BybitError(
                PARAMS_ERROR, "Missing some parameters that must be filled in, symbol or settleCoin"
            )
        after, limit = self._page(params, POSITION_PAGE_DEFAULT, POSITION_PAGE_MAX)
        page, cursor = self._paged(rows, after, limit, "symbol")
        return {"category": "linear", "list": page, "nextPageCursor": cursor}

    def _set_leverage(self, request: _Request) -> Any:
        params = request.params
        market = self._market(params)
        buy, sell = str(params.get("buyLeverage", "")), str(params.get("sellLeverage", ""))
        if buy != sell:
            raise BybitError(PARAMS_ERROR, "buy leverage must equal sell leverage in one-way mode")
        try:
            leverage = int(Decimal(buy))
        except (InvalidOperation, ValueError):
            raise BybitError(PARAMS_ERROR, "params error: buyLeverage invalid") from None
        if not 1 <= leverage <= market.max_leverage:
            raise BybitError(PARAMS_ERROR, f"leverage invalid: 1..{market.max_leverage}")
        current = self._leverage_of(market.symbol, request.now)
        if current == leverage:
            raise BybitError(LEVERAGE_NOT_MODIFIED, "leverage not modified")
        self.core.set_leverage(market.symbol, leverage, request.now, DEFAULT_ACCOUNT)
        self._leverages[market.symbol] = leverage
        return {}

    def _leverage_of(self, symbol: str, now: float) -> int:
        for position in self.core.positions(now, DEFAULT_ACCOUNT):
            if position.symbol == symbol:
                return position.leverage
        return self._leverages.get(
            symbol, min(self._settings.default_leverage, self.core.markets[symbol].max_leverage)
        )

    # ---- orders -----------------------------------------------------------------------------------------

    def _order_create(self, request: _Request) -> Any:
        params = request.params
        market = self._market(params)
        side_word = params.get("side")
        if side_word not in ("Buy", "Sell"):
            raise BybitError(PARAMS_ERROR, "params error: side invalid")
        side = OrderSide.BUY if side_word == "Buy" else OrderSide.SELL
        if params.get("orderType") != "Market":
            raise BybitError(PARAMS_ERROR, "params error: the emulator takes Market orders only")
        if int(params.get("positionIdx", 0) or 0) != 0:
            raise BybitError(PARAMS_ERROR, "position idx not match position mode")
        qty = self._decimal(params, "qty")
        if qty is None or qty <= 0 or not market.is_on_step(qty) or qty < market.min_quantity:
            raise BybitError(PARAMS_ERROR, "Qty invalid")
        link_id = str(params.get("orderLinkId", ""))
        if link_id and link_id in self._book.by_link_id:
            raise BybitError(DUPLICATE_LINK_ID, "OrderLinkedID is duplicate")
        reduce_only = params.get("reduceOnly") in (True, "true", "True")
        status = self.symbol_status.get(market.symbol, "Trading")
        if not reduce_only and status != "Trading":
            if status == "Settling":
                raise BybitError(
                    SETTLEMENT_IN_PROGRESS,
                    f"Settlement in progress! {market.symbol} not available for trades.",
                )
            raise BybitError(NO_TRADING_NOW, "No trading is allowed at the current time")
        position = self._position(market.symbol, request.now)
        if reduce_only and (position is None or (position.side.value == "long") == (side is OrderSide.BUY)):
            raise BybitError(
                REDUCE_ONLY_NOTHING, "current position is zero, cannot fix reduce-only order qty"
            )
        stop_loss = self._decimal(params, "stopLoss")
        trigger_by = str(params.get("slTriggerBy", "LastPrice"))
        if stop_loss is not None and stop_loss > 0:
            if position is not None or reduce_only:
                raise BybitError(PARAMS_ERROR, "the emulator attaches stopLoss to an opening order only")
            if params.get("tpslMode", "Full") != "Full":
                raise BybitError(PARAMS_ERROR, "the emulator supports tpslMode Full only")
            self._check_stop_loss(market, "long" if side is OrderSide.BUY else "short", stop_loss, trigger_by)
        order_id = self._new_id()
        client_id = link_id or f"bybit-{order_id[:28]}"
        placed = self.core.place_market_order(
            market.symbol,
            side,
            qty,
            client_id,
            request.now,
            reduce_only=reduce_only,
            account_id=DEFAULT_ACCOUNT,
            fill_after=request.fill_after,
        )
        record = _RegularOrder(
            order_id, link_id, market.symbol, side, qty, _ZERO, None, reduce_only, request.now, status="New"
        )
        self._book.orders[order_id] = record
        if link_id:
            self._book.by_link_id[link_id] = order_id
        sl = stop_loss if stop_loss is not None and stop_loss > 0 else None
        if placed.status.is_final:
            self._executed(record, sl, trigger_by, placed, request.now)
        else:  # Bybit's asynchronous creation: answered with the ids, New until the core executes it
            self._book.working[order_id] = _Working(client_id, sl, trigger_by)
            self.orders_answered_working += 1
            # Told when it executes (a moment after it comes due, so that the core has it due by then).
            asyncio.get_running_loop().call_later((request.fill_after or 0.0) + 0.005, self._settle_and_tell)
        return {"orderId": order_id, "orderLinkId": link_id}

    def _settle_and_tell(self) -> None:
        if self.settle_working(self.now()):
            self.streams.account_changed()

    def settle_working(self, now: float) -> bool:
        """Market orders whose execution came due by `now`: filled (or ended), with their executions,
        positions and stops. True if any did."""
        settled = False
        for order_id, working in list(self._book.working.items()):
            record = self._book.orders[order_id]
            assert isinstance(record, _RegularOrder)
            order = self.core.get_order(
                record.symbol, working.client_id, now, DEFAULT_ACCOUNT, conditional=False
            )
            if not order.status.is_final:
                continue
            del self._book.working[order_id]
            self._executed(record, working.stop_loss, working.trigger_by, order, now)
            settled = True
        return settled

    def _executed(
        self,
        record: _RegularOrder,
        stop_loss: Decimal | None,
        trigger_by: str,
        executed: Order,
        now: float,
    ) -> None:
        """A market order executed (the core's order, ended): its row, its execution, and the position's
        stops (the `stopLoss` it carried set on the position it opened; all gone if it left none). A
        reduce-only order larger than the position fills what there was, as Bybit's does."""
        filled, price = executed.filled_quantity, executed.average_price
        record.exec_qty, record.avg_price = filled, price
        if executed.status is OrderStatus.FILLED:
            record.status = "Filled"
        else:
            # Bybit: a derivatives order `Cancelled` "may have an executed qty"; `PartiallyFilledCanceled`
            # is spot's alone.
            record.status = "Cancelled"
        position = self._position(record.symbol, now)
        if filled:
            opens = PositionSide.LONG if record.side is OrderSide.BUY else PositionSide.SHORT
            if position is None or position.side is not opens:
                closed = filled  # it closed (part of) a position, all of it
            else:  # it opened or added; a flip closed what it did not open
                closed = max(_ZERO, filled - position.quantity)
            self._book.executions.append(
                _Execution(
                    self._new_id(),
                    record.order_id,
                    record.order_link_id,
                    record.symbol,
                    record.side,
                    price or _ZERO,
                    filled,
                    "",
                    now,
                    closed,
                )
            )
        if position is None or self._flipped(record.symbol, position):
            # Gone, or closed through zero into the other side (one-way mode): the closed position's stops
            # are cancelled with it; the new side has none (but one its entry carried).
            self._deactivate(record.symbol, now)
        if position is not None and stop_loss is not None and filled:
            stops = self._book.stops.setdefault(record.symbol, _PositionStops())
            self.stops_attached_to_entries += 1
            stops.stop_loss = self._new_stop(
                record.symbol, "StopLoss", record.side.opposite, trigger_by, stop_loss, now
            )

    def _flipped(self, symbol: str, position: VenuePosition) -> bool:
        """The symbol's stops close the other side than `position` holds now (it went through zero)."""
        stops = self._book.stops.get(symbol)
        closes = OrderSide.SELL if position.side is PositionSide.LONG else OrderSide.BUY
        return stops is not None and any(
            stop is not None and stop.side is not closes for stop in (stops.stop_loss, stops.trailing)
        )

    def _new_stop(
        self, symbol: str, kind: str, side: OrderSide, trigger_by: str, price: Decimal, now: float
    ) -> _StopOrder:
        stop = _StopOrder(self._new_id(), symbol, kind, side, trigger_by, price, now, now)
        self._book.orders[stop.order_id] = stop
        return stop

    def _check_stop_loss(self, market: Market, side: str, price: Decimal, trigger_by: str) -> None:
        """Bybit refuses a stop loss on the wrong side of its trigger price or of the last price (10001,
        naming the base price it compared with)."""
        if trigger_by not in ("MarkPrice", "LastPrice"):
            raise BybitError(
                PARAMS_ERROR, f"params error: slTriggerBy {trigger_by} not supported by the emulator"
            )
        if not market.is_on_tick(price):
            raise BybitError(
                PARAMS_ERROR, f"params error: stopLoss {price} is not a multiple of {market.tick_size}"
            )
        word = "Buy" if side == "long" else "Sell"
        for base_name, base in (
            (trigger_by, self._base(market.symbol, trigger_by)),
            ("LastPrice", self._last[market.symbol]),
        ):
            if side == "long" and price >= base:
                raise BybitError(
                    PARAMS_ERROR,
                    f"StopLoss:{_text(price)} set for {word} position should lower than base_price:{_text(base)}??{base_name}",
                )
            if side == "short" and price <= base:
                raise BybitError(
                    PARAMS_ERROR,
                    f"StopLoss:{_text(price)} set for {word} position should higher than base_price:{_text(base)}??{base_name}",
                )

    def _base(self, symbol: str, trigger_by: str) -> Decimal:
        return self.core.mark(symbol) if trigger_by == "MarkPrice" else self._last[symbol]

    def _trading_stop(self, request: _Request) -> Any:
        params = request.params
        market = self._market(params)
        if int(params.get("positionIdx", 0) or 0) != 0:
            raise BybitError(PARAMS_ERROR, "position idx not match position mode")
        if params.get("tpslMode", "Full") != "Full":
            raise BybitError(PARAMS_ERROR, "the emulator supports tpslMode Full only")
        if self._decimal(params, "takeProfit"):
            raise BybitError(PARAMS_ERROR, "the emulator does not take profit")
        position = self._position(market.symbol, request.now)
        if position is None:
            raise BybitError(PARAMS_ERROR, "can not set tp/sl/ts for zero position")
        side = position.side.value
        close_side = OrderSide.SELL if side == "long" else OrderSide.BUY
        stops = self._book.stops.setdefault(market.symbol, _PositionStops())
        stop_loss = self._decimal(params, "stopLoss")
        trigger_by = str(params.get("slTriggerBy", "LastPrice"))
        distance = self._decimal(params, "trailingStop")
        active = self._decimal(params, "activePrice")
        last = self._last[market.symbol]
        changed = False
        # Validate everything before changing anything: a refused call leaves the position as it was.
        if stop_loss is not None and stop_loss > 0:
            self._check_stop_loss(market, side, stop_loss, trigger_by)
        if distance is not None and distance > 0:
            if not market.is_on_tick(distance) or (side == "long" and distance >= last):
                raise BybitError(PARAMS_ERROR, f"params error: trailingStop {distance} invalid")
            if active is not None and active > 0:
                if not market.is_on_tick(active):
                    raise BybitError(PARAMS_ERROR, f"params error: activePrice {active} invalid")
                if side == "long" and active <= last:
                    raise BybitError(
                        PARAMS_ERROR,
                        f"TrailingStop:activePrice {_text(active)} set for Buy position should higher than "
                        f"base_price:{_text(last)}??LastPrice",
                    )
                if side == "short" and active >= last:
                    raise BybitError(
                        PARAMS_ERROR,
                        f"TrailingStop:activePrice {_text(active)} set for Sell position should lower than "
                        f"base_price:{_text(last)}??LastPrice",
                    )
        if stop_loss is not None:
            current = stops.stop_loss
            if stop_loss == 0:
                if current is not None:
                    current.status, current.updated_at = "Deactivated", request.now
                    stops.stop_loss, changed = None, True
            elif current is None:
                stops.stop_loss = self._new_stop(
                    market.symbol, "StopLoss", close_side, trigger_by, stop_loss, request.now
                )
                changed = True
            elif (current.trigger_price, current.trigger_by) != (stop_loss, trigger_by):
                current.trigger_price, current.trigger_by, current.updated_at = (
                    stop_loss,
                    trigger_by,
                    request.now,
                )
                changed = True
        if distance is not None:
            current = stops.trailing
            wanted_active = active if active is not None and active > 0 else None
            if distance == 0:
                if current is not None:
                    current.status, current.updated_at = "Deactivated", request.now
                    stops.trailing, stops.distance, stops.active_price = None, None, None
                    stops.armed, stops.extreme, changed = False, None, True
            elif current is None or (stops.distance, stops.active_price) != (distance, wanted_active):
                # A new or changed trailing stop starts over: its high-water mark is the last price now.
                level = last - distance if side == "long" else last + distance
                if current is None:
                    stops.trailing = self._new_stop(
                        market.symbol, "TrailingStop", close_side, "LastPrice", level, request.now
                    )
                else:
                    current.trigger_price, current.updated_at = level, request.now
                stops.trailing.active_price = wanted_active
                stops.distance, stops.active_price = distance, wanted_active
                stops.armed, stops.extreme, stops.trailing_set_at = False, None, request.now
                changed = True
        if not changed:
            raise BybitError(NOT_MODIFIED, "not modified")
        if stops.stop_loss is None and stops.trailing is None:
            self._book.stops.pop(market.symbol, None)
        self._run_stops(market.symbol, request.now)
        return {}

    # ---- order reads ------------------------------------------------------------------------------------

    def _orders_matching(self, params: dict[str, Any], now: float) -> list[_RegularOrder | _StopOrder]:
        if params.get("category") != "linear":
            raise BybitError(PARAMS_ERROR, "params error: category only supports linear in the emulator")
        symbol = params.get("symbol")
        if (
            not symbol
            and params.get("settleCoin") != "USDT"
            and not params.get("orderId")
            and not params.get("orderLinkId")
        ):
            raise BybitError(
                PARAMS_ERROR, "Missing some parameters that must be filled in, symbol or settleCoin"
            )
        if symbol:
            self._market(params)
        self.core.inspect(now, DEFAULT_ACCOUNT)
        wanted_filter = params.get("orderFilter")
        rows = []
        for order in reversed(self._book.orders.values()):
            if symbol and order.symbol != symbol:
                continue
            if params.get("orderId") and order.order_id != params["orderId"]:
                continue
            if params.get("orderLinkId") and (
                not isinstance(order, _RegularOrder) or order.order_link_id != params["orderLinkId"]
            ):
                continue
            is_stop = isinstance(order, _StopOrder)
            if wanted_filter == "StopOrder" and not is_stop:
                continue
            if wanted_filter == "Order" and is_stop:
                continue
            rows.append(order)
        return rows

    def _order_realtime(self, request: _Request) -> Any:
        params = dict(request.params)
        params.setdefault("orderFilter", "Order")
        by_id = bool(params.get("orderId") or params.get("orderLinkId"))
        rows = [
            _order_json(o)
            for o in self._orders_matching(params, request.now)
            if by_id or o.status in _OPEN_STATUSES  # open orders: a working market order, a stop
        ]
        after, limit = self._page(params, ORDER_PAGE_DEFAULT, ORDER_PAGE_MAX)
        page, cursor = self._paged(rows, after, limit, "orderId", newest_first=True)
        return {"category": "linear", "list": page, "nextPageCursor": cursor}

    def _order_history(self, request: _Request) -> Any:
        rows = [
            _order_json(o)
            for o in self._orders_matching(request.params, request.now)
            if o.status not in _OPEN_STATUSES  # ended orders
        ]
        after, limit = self._page(request.params, ORDER_PAGE_DEFAULT, ORDER_PAGE_MAX)
        page, cursor = self._paged(rows, after, limit, "orderId", newest_first=True)
        return {"category": "linear", "list": page, "nextPageCursor": cursor}

    def _execution_list(self, request: _Request) -> Any:
        params = request.params
        if params.get("category") != "linear":
            raise BybitError(PARAMS_ERROR, "params error: category only supports linear in the emulator")
        self.core.inspect(request.now, DEFAULT_ACCOUNT)
        rows = []
        for execution in reversed(self._book.executions):
            if params.get("symbol") and execution.symbol != params["symbol"]:
                continue
            if params.get("orderId") and execution.order_id != params["orderId"]:
                continue
            if params.get("orderLinkId") and execution.order_link_id != params["orderLinkId"]:
                continue
            rows.append(_execution_json(execution))
        after, limit = self._page(params, EXECUTION_PAGE_DEFAULT, EXECUTION_PAGE_MAX)
        page, cursor = self._paged(rows, after, limit, "execId", newest_first=True)
        return {"category": "linear", "list": page, "nextPageCursor": cursor}

    # ---- streams (`streams.py`) ----------------------------------------------------------------------------

    def stream_rows(self, orders_from: int, watched: Collection[str], executions_from: int) -> StreamRows:
        """What the private topics may have to tell: the orders from the `orders_from`th on and those in
        `watched` (still open when last told), the executions from the `executions_from`th on, and every
        open position, as REST rows (a position's `avgPrice` named `entryPrice`, as the topic names it)."""
        now = self.now()
        book = self._book
        orders = {
            order_id: _order_json(order)
            for order_id, order in itertools.islice(book.orders.items(), orders_from, None)
        }
        for order_id in watched:
            if order_id not in orders and order_id in book.orders:
                orders[order_id] = _order_json(book.orders[order_id])
        executions = [_execution_json(e) for e in book.executions[executions_from:]]
        positions = {}
        for position in self.core.positions(now, DEFAULT_ACCOUNT):
            row = self._position_row(position.symbol, position, now)
            row["entryPrice"] = row.pop("avgPrice")
            positions[position.symbol] = row
        return StreamRows(orders, len(book.orders), executions, len(book.executions), positions)

    def verify_stream_auth(self, api_key: str, expires_ms: int, signature: str) -> str | None:
        if not hmac.compare_digest(api_key, self._api_key):
            return "Invalid apikey"
        if expires_ms <= int(self.server_time() * 1000):
            return "Params Error"  # what Bybit answers an auth whose `expires` has passed
        expected = stream_signature(self._secret.decode(), expires_ms)
        if not hmac.compare_digest(signature, expected):
            return "Invalid sign"
        return None

    # ---- control API (tests, rehearsals) ----------------------------------------------------------------

    _require_loopback = staticmethod(require_loopback)

    async def _control_body(self, request: web.Request) -> dict[str, Any]:
        return await control_body(request)

    def _control_symbol_price(self, body: dict[str, Any], name: str = "price") -> tuple[str, Decimal | None]:
        symbol = str(body.get("symbol", ""))
        if symbol not in self.core.markets:
            raise web.HTTPBadRequest(text=f"control API: unknown symbol {symbol!r}")
        if name not in body:
            return symbol, None
        try:
            price = Decimal(str(body[name]))
        except InvalidOperation:
            raise web.HTTPBadRequest(text=f"control API: {name} must be a decimal string") from None
        if not price.is_finite() or price <= 0:
            raise web.HTTPBadRequest(text=f"control API: {name} must be positive")
        return symbol, price

    async def _control_symbol_status(self, request: web.Request) -> web.Response:
        """A symbol's `status` in instruments-info (Settling, Delivering, …): the default list leaves it
        out, and only Trading takes opening orders (110063 while Settling, else 110066); reduce-only orders
        and position stops go on."""
        body = await self._control_body(request)
        symbol, status = str(body.get("symbol", "")), str(body.get("status", ""))
        if symbol not in self.core.markets:
            raise web.HTTPBadRequest(text=f"control API: unknown symbol {symbol!r}")
        if status not in INSTRUMENT_STATUSES:
            raise web.HTTPBadRequest(
                text=f"control API: status must be one of {sorted(INSTRUMENT_STATUSES)}, got {status!r}"
            )
        self.symbol_status[symbol] = status
        return _json({"symbol": symbol, "status": status})

    async def _control_mark(self, request: web.Request) -> web.Response:
        body = await self._control_body(request)
        symbol, price = self._control_symbol_price(body)
        _, last = self._control_symbol_price(body, "last")
        if price is None:
            raise web.HTTPBadRequest(text="control API: price is required")
        fired = self.set_prices(symbol, mark=price, last=price if last is None else last)
        return _json(
            {
                "symbol": symbol,
                "mark": _text(self.core.mark(symbol)),
                "last": _text(self._last[symbol]),
                "triggered": fired,
            }
        )

    async def _control_last(self, request: web.Request) -> web.Response:
        body = await self._control_body(request)
        symbol, price = self._control_symbol_price(body)
        if price is None:
            raise web.HTTPBadRequest(text="control API: price is required")
        fired = self.set_prices(symbol, last=price)
        return _json(
            {
                "symbol": symbol,
                "mark": _text(self.core.mark(symbol)),
                "last": _text(self._last[symbol]),
                "triggered": fired,
            }
        )

    async def _control_fault(self, request: web.Request) -> web.Response:
        body = await self._control_body(request)
        try:
            target_texts = control_target_texts(body, TARGETS_BY_CALL)
            targets = tuple(parse_target(text) for text in target_texts)
            if not targets:
                raise FaultSpecError("no targets")
            fault = parse_bybit_fault(
                str(body.get("fault", "")), hold_seconds=float(body.get("hold_seconds", 30.0))
            )
            require_order_create_target(targets, fault)
            self.faults.force(targets, fault, int(body.get("count", 1)))
        except (FaultSpecError, ValueError) as error:
            raise web.HTTPBadRequest(text=f"control API: {error}") from None
        return _json({"forced": fault.kind.value, "targets": target_texts})

    async def _control_stream_fault(self, request: web.Request) -> web.Response:
        body = await self._control_body(request)
        try:
            staged = await self.streams.stage_fault(body)
        except StreamFaultError as error:
            raise web.HTTPBadRequest(text=f"control API: {error}") from None
        return _json(staged)

    async def _control_clear_faults(self, request: web.Request) -> web.Response:
        self._require_loopback(request)
        self.faults.clear_forced()
        self.streams.clear_faults()
        return _json({})

    async def _control_advance(self, request: web.Request) -> web.Response:
        self._offset += advance_seconds(await self._control_body(request))
        return _json({"now": _ms(self.now())})

    async def _control_skew(self, request: web.Request) -> web.Response:
        self._skew = skew_seconds(await self._control_body(request))
        return _json({"server_time": _ms(self.server_time())})

    async def _control_position_stops(self, request: web.Request) -> web.Response:
        """Set a position's stops as another client (the web UI, a previous process) would have."""
        body = await self._control_body(request)
        symbol, _ = self._control_symbol_price(body)
        params = {"category": "linear", "symbol": symbol, "tpslMode": "Full", "positionIdx": 0}
        params.update(
            {
                k: str(v)
                for k, v in body.items()
                if k in ("stopLoss", "slTriggerBy", "trailingStop", "activePrice")
            }
        )
        try:
            self._trading_stop(_Request("POST", params, self.now()))
        except BybitError as error:
            raise web.HTTPBadRequest(text=f"control API: {error.code} {error.msg}") from None
        self.streams.account_changed()
        return _json({})

    async def _control_state(self, request: web.Request) -> web.Response:
        self._require_loopback(request)
        now = self.now()
        seen = self.core.inspect(now, DEFAULT_ACCOUNT)
        ip = request.remote or LOOPBACK_HOST
        stops = []
        for symbol, held in sorted(self._book.stops.items()):
            stops.append(
                {
                    "symbol": symbol,
                    "stopLoss": _text(held.stop_loss.trigger_price) if held.stop_loss else None,
                    "slTriggerBy": held.stop_loss.trigger_by if held.stop_loss else None,
                    "trailingStop": _text(held.distance) if held.trailing else None,
                    "activePrice": _text(held.active_price) if held.active_price else None,
                    "armed": held.armed,
                    "extreme": _text(held.extreme) if held.extreme is not None else None,
                    "trailingTrigger": _text(held.trailing.trigger_price) if held.trailing else None,
                    "trailingSetAt": _ms(held.trailing_set_at) if held.trailing_set_at is not None else None,
                }
            )
        banned = self.limits.banned_until(ip, now)
        return _json(
            {
                "now": _ms(now),
                "requests_served": self.requests_served,
                "requests_by_endpoint": dict(self.requests_by_endpoint),
                "stops_attached_to_entries": self.stops_attached_to_entries,
                "positions": [
                    {
                        "symbol": p.symbol,
                        "side": p.side.value,
                        "quantity": _text(p.quantity),
                        "liquidationPrice": _text(p.liquidation_price) if p.liquidation_price else None,
                    }
                    for p in seen.positions
                ],
                "position_stops": stops,
                "streams": self.streams.state(),
                "rate": {
                    "ip_requests_5s": self.limits.ip_used(ip, now),
                    "banned_until_ms": _ms(banned) if banned else None,
                },
            }
        )


def _ip_ban() -> web.Response:
    # What Bybit's gateway answers when an IP exceeds its limit: not JSON, and not a retCode.
    return web.Response(status=403, text="403 Forbidden: access too frequent", content_type="text/plain")


def _refusal(kind: EmulatorFaultKind) -> BybitError | web.Response | None:
    if kind is EmulatorFaultKind.BUSY:
        return BybitError(SERVER_ERROR, "Internal server error.")
    if kind is EmulatorFaultKind.ERROR:
        return web.Response(status=500, text="<html><body>500 Internal Server Error</body></html>")
    if kind is EmulatorFaultKind.RATELIMIT:
        return BybitError(TOO_MANY_VISITS, "Too many visits!")
    if kind is EmulatorFaultKind.BAN:
        return _ip_ban()
    return None


def _translate(error: ExchangeError) -> BybitError:
    """The sim core's refusals in Bybit's words."""
    if isinstance(error, DuplicateClientOrderId):
        return BybitError(DUPLICATE_LINK_ID, "OrderLinkedID is duplicate")
    if isinstance(error, InsufficientMargin):
        return BybitError(NOT_ENOUGH_BALANCE, "ab not enough for new order")
    if isinstance(error, RateLimited | Banned):
        return BybitError(TOO_MANY_VISITS, "Too many visits!")
    if isinstance(error, Rejected):
        if error.code == RejectCode.REDUCE_ONLY_REJECTED:
            return BybitError(
                REDUCE_ONLY_NOTHING, "current position is zero, cannot fix reduce-only order qty"
            )
        return BybitError(PARAMS_ERROR, f"params error: {error.reason}")
    return BybitError(SERVER_ERROR, "Internal server error.")


def _instrument(market: Market, status: str) -> dict[str, Any]:
    return {
        "symbol": market.symbol,
        "contractType": "LinearPerpetual",
        "status": status,
        "baseCoin": market.base_asset,
        "quoteCoin": market.quote_asset,
        "settleCoin": "USDT",
        "launchTime": "1585526400000",
        "deliveryTime": "0",
        "deliveryFeeRate": "",
        "priceScale": str(max(0, -market.tick_size.normalize().as_tuple().exponent)),  # type: ignore[operator]
        "leverageFilter": {
            "minLeverage": "1",
            "maxLeverage": f"{market.max_leverage}.00",
            "leverageStep": "0.01",
        },
        "priceFilter": {
            "minPrice": _text(market.tick_size),
            "maxPrice": "1999999.8",
            "tickSize": _text(market.tick_size),
        },
        "lotSizeFilter": {
            "maxOrderQty": "1000000000",
            "maxMktOrderQty": "100000000",
            "minOrderQty": _text(market.min_quantity),
            "qtyStep": _text(market.step_size),
            "postOnlyMaxOrderQty": "1000000000",
            "minNotionalValue": _text(market.min_notional),
        },
        "unifiedMarginTrade": True,
        "fundingInterval": 480,
        "copyTrading": "both",
        "upperFundingRate": "0.005",
        "lowerFundingRate": "-0.005",
    }


def _execution_json(execution: _Execution) -> dict[str, Any]:
    return {
        "symbol": execution.symbol,
        "orderId": execution.order_id,
        "orderLinkId": execution.order_link_id,
        "side": _side_word(execution.side),
        "orderPrice": "0",
        "orderQty": _text(execution.qty),
        "leavesQty": "0",
        "orderType": "Market",
        "stopOrderType": execution.stop_order_type or "UNKNOWN",
        "execFee": "0",
        "execId": execution.exec_id,
        "execPrice": _text(execution.price),
        "execQty": _text(execution.qty),
        "execType": "Trade",
        "execValue": _text(execution.price * execution.qty),
        "execTime": str(_ms(execution.time)),
        "isMaker": False,
        "closedSize": _text(execution.closed),
    }


def _order_json(order: _RegularOrder | _StopOrder) -> dict[str, Any]:
    if isinstance(order, _StopOrder):
        return {
            "orderId": order.order_id,
            "orderLinkId": "",
            "symbol": order.symbol,
            "side": _side_word(order.side),
            "orderType": "Market",
            "price": "0",
            "qty": _text(order.qty),
            "orderStatus": order.status,
            "stopOrderType": order.stop_order_type,
            "triggerPrice": _text(order.active_price or order.trigger_price),
            "triggerBy": order.trigger_by,
            "triggerDirection": 2 if order.side is OrderSide.SELL else 1,
            "cumExecQty": _text(order.exec_qty),
            "avgPrice": _text(order.avg_price) if order.avg_price is not None else "",
            "reduceOnly": True,
            "closeOnTrigger": True,
            "positionIdx": 0,
            "tpslMode": "Full",
            "timeInForce": "IOC",
            "createType": "CreateByStopLoss"
            if order.stop_order_type == "StopLoss"
            else "CreateByTrailingStop",
            "createdTime": str(_ms(order.created_at)),
            "updatedTime": str(_ms(order.updated_at)),
        }
    return {
        "orderId": order.order_id,
        "orderLinkId": order.order_link_id,
        "symbol": order.symbol,
        "side": _side_word(order.side),
        "orderType": "Market",
        "price": "0",
        "qty": _text(order.qty),
        "orderStatus": order.status,
        "stopOrderType": "",
        "triggerPrice": "",
        "triggerBy": "",
        "cumExecQty": _text(order.exec_qty),
        "avgPrice": _text(order.avg_price) if order.avg_price is not None else "",
        "reduceOnly": order.reduce_only,
        "closeOnTrigger": False,
        "positionIdx": 0,
        "timeInForce": "IOC",
        "createType": "CreateByUser",
        "createdTime": str(_ms(order.created_at)),
        "updatedTime": str(_ms(order.created_at)),
    }

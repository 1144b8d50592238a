"""The Binance USDⓈ-M wire emulator: an aiohttp app over the sim venue's matching core.

It speaks the subset of the futures REST API the ccxt adapter uses, with Binance's paths, parameters,
signing rules, JSON shapes, HTTP statuses and error codes:

* public: `GET /fapi/v1/ping`, `/time`, `/exchangeInfo` (filters and `rateLimits`), `/premiumIndex`;
* signed (HMAC-SHA256 over query string + body, `X-MBX-APIKEY`, `timestamp` within `recvWindow`):
  `GET /fapi/v2|v3/balance`, `GET /fapi/v2|v3/positionRisk`, `POST /fapi/v1/leverage`,
  `POST|GET|DELETE /fapi/v1/order` (MARKET orders; conditional types are refused with -4120 as Binance has
  done since the Algo Order migration), `POST|GET|DELETE /fapi/v1/algoOrder` (STOP_MARKET and
  TRAILING_STOP_MARKET, `clientAlgoId`, mark-price triggers), `GET /fapi/v1/openAlgoOrders`;
* API key only (`X-MBX-APIKEY`, no signature): `POST|PUT|DELETE /fapi/v1/listenKey`;
* websockets on the same port: the mark price streams and the user-data stream (`streams.py`).

Errors: 400 with `{"code", "msg"}` (-2021 would trigger, -4045 conditional cap, -2019 margin, -2022
reduce-only, -1111 precision, -4116 / -20132 duplicate ids, -2013 / -2011 unknown orders, -20124 an algo
order no longer open, -1021 timestamp, -1022 signature), 401 -2015 (unknown key), 429 -1003 (IP request
weight, with `Retry-After`), 429 -1015 (order count, no `Retry-After`), 418 -1003 with the ban's end, 503
-1007 (execution status unknown) and 503 -1008 (server busy). Faults per endpoint come from `faults.py`.

Limits, as Binance documents them ("General Info" → "LIMITS"; the table is `binance_limits.py`):

* IP request weight (`limits.py`): every request costs its endpoint's weight in fixed one-minute windows
  (`request_weight_per_minute`, default 2 400), public endpoints too; every answer carries
  `X-MBX-USED-WEIGHT-1M`. Over the limit: 429 -1003 with `Retry-After` (seconds to the window's end); sending
  on during that wait earns a 418 ban (2 min, doubling, at most 3 days) that refuses every request;
* order counts per account (the core's fixed 10 s / 1 min windows): every successful new order (POST order
  and POST algoOrder) carries `X-MBX-ORDER-COUNT-10S` and `X-MBX-ORDER-COUNT-1M`; over the limit: 429 -1015
  "Too many new orders", without a `Retry-After` (Binance promises one only for request weight).

Algo orders follow "Event: Algo Order Update": `algoStatus` NEW → TRIGGERING (the condition met, the order
forwarded to the matching engine; `actualOrderId` still empty) → FINISHED (the regular order it placed,
`actualOrderId`, filled or expired), or CANCELED. Faults may make a fired order sit in TRIGGERING for
seconds or for good, and make a just-placed algo order unknown to GET/DELETE algoOrder and openAlgoOrders
for seconds (seen on Binance: a query right after the placement answers "does not exist"). Client ids
(`newClientOrderId`, `clientAlgoId`) are unique among open orders only: once an order has ended its id may
be sent again, and a query by the id answers for the most recent order that carried it.

The exchange state (balances, positions, orders, marks, rate budget) lives in this process, so an engine
can be killed and restarted against the same "exchange". Venue time is the wall clock plus an offset
that only the control API moves. The server's clock (`/fapi/v1/time`, `serverTime`) is the one request
timestamps are checked against: the real clock plus a staged skew (`/_sim/skew`), so a client whose offset
is off is refused -1021 as by Binance until it reads the server's time again.

Optional control API (served only when `control=True`, loopback callers only, never weighed or banned):
`POST /_sim/mark`, `POST /_sim/symbol-status` (a symbol's exchangeInfo status: only TRADING opens
positions, -4140), `POST /_sim/fault`, `POST /_sim/stream-fault` (websocket faults, see `streams.py`),
`POST /_sim/clear-faults`, `POST /_sim/advance`, `POST /_sim/skew` (the server clock's error, seconds),
`GET /_sim/state` (positions, open and triggering algo
orders, the stream connections and their subscriptions, requests served per endpoint, and the rate:
weight used this minute, order counts, the ban's end).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from engine.exchange.errors import (
    Banned,
    DuplicateClientOrderId,
    ExchangeError,
    InsufficientMargin,
    NotFound,
    RateLimited,
    RejectCode,
    Rejected,
    WouldTriggerImmediately,
)
from engine.exchange.port import Market, Order, OrderSide, OrderStatus, OrderType
from engine.venues.binance_emulator.faults import (
    TARGETS_BY_CALL,
    EmulatorFaultKind,
    Fault,
    FaultPlan,
    FaultSpecError,
    OrderTraits,
    Target,
    control_target_texts,
    parse_fault,
    require_placement_target,
)
from engine.venues.binance_emulator.limits import Admission, RequestWeightLimiter, Verdict
from engine.venues.binance_emulator.streams import StreamFaultError, StreamHub
from engine.venues.binance_limits import ORDER_COUNT_HEADERS, USED_WEIGHT_HEADER, endpoint_cost
from engine.venues.sim.control_api import advance_seconds, control_body, require_loopback, skew_seconds
from engine.venues.sim.core import DEFAULT_ACCOUNT, SimCore
from engine.venues.sim.prices import GbmWalk
from engine.venues.sim.settings import SimVenueSettings
from engine.venues.sim.universe import select_listings

logger = logging.getLogger(__name__)

LOOPBACK_HOST = "127.0.0.1"
DEFAULT_RECV_WINDOW_MS = 5_000
MAX_RECV_WINDOW_MS = 60_000
CHILD_ORDER_ID_OFFSET = 1_000_000_000  # the regular order an algo order places when it triggers
BAN_FAULT_SECONDS = 2.0  # the `ban` fault's ban (Binance's own start at 2 minutes: a test waits less)
_ZERO = Decimal(0)

_MSG_WOULD_TRIGGER = "Order would immediately trigger."
_MSG_MARGIN = "Margin is insufficient."
_MSG_NO_ORDER = "Order does not exist."
_MSG_UNKNOWN_ORDER = "Unknown order sent."
_MSG_ALGO_DONE = "Invalid algo id or it has been completed."
_NEW_ORDER_ENDPOINTS = frozenset({"order", "algoOrder"})  # POST: counted against the order limits


class BinanceError(Exception):
    """An error answer in Binance's format."""

    def __init__(self, status: int, code: int, msg: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {code} {msg}")
        self.status = status
        self.code = code
        self.msg = msg
        self.headers = headers or {}

    def response(self) -> web.Response:
        return _json({"code": self.code, "msg": self.msg}, status=self.status, headers=self.headers)


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    params: dict[str, str]
    now: float  # venue time, seconds


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=json.dumps(payload, separators=(",", ":")),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _text(value: Decimal | None) -> str:
    return "0" if value is None else format(value, "f")


def _decimals(step: Decimal) -> int:
    exponent = step.normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


class BinanceEmulator:
    def __init__(
        self,
        settings: SimVenueSettings,
        *,
        api_key: str,
        api_secret: str,
        faults: FaultPlan | None = None,
        control: bool = False,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """`wall_clock`: where venue time starts from (tests inject a fixed one so that window edges are
        exact); request timestamps are always checked against the real clock."""
        if not api_key or not api_secret:
            raise ValueError("the emulator needs an API key and secret to verify signatures")
        self._settings = settings
        self._api_key = api_key
        self._secret = api_secret.encode()
        self.faults = faults if faults is not None else FaultPlan(seed=settings.seed)
        self._control = control
        self._wall_clock = wall_clock
        self._offset = 0.0
        self._skew = 0.0  # the server clock's error against the real one (`server_time`)
        self._weights = RequestWeightLimiter(settings.rate_limits)
        self.requests_by_endpoint: dict[str, int] = {}  # "METHOD endpoint" -> requests received
        self.symbol_status: dict[str, str] = {}  # exchangeInfo status by symbol (none: TRADING)
        listings = select_listings(settings.symbols, settings.synthetic_listings)
        self.core = SimCore(listings, settings, now=self.now())
        markets = self.core.markets
        self._walk = GbmWalk(
            seed=settings.seed,
            initial_prices={symbol: self.core.mark(symbol) for symbol in markets},
            tick_sizes={symbol: market.tick_size for symbol, market in markets.items()},
            volatility={symbol: settings.volatility_for(symbol) for symbol in markets},
        )
        self.streams = StreamHub(self.core, self.now)
        self._closing = asyncio.Event()
        self.requests_served = 0
        # Requests being served at once, by "METHOD endpoint", and the most seen: how much a client runs
        # in parallel (a pool cap on its side shows here as a ceiling).
        self._in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}

    # ---- time ------------------------------------------------------------------------------------------

    def now(self) -> float:
        return self._wall_clock() + self._offset

    def server_time(self) -> float:
        """The clock request timestamps are checked against and `/fapi/v1/time` answers: real time plus
        the staged skew (the venue's time, `now`, moves by `/_sim/advance` for what it holds)."""
        return time.time() + self._skew

    # ---- the aiohttp app ------------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application()
        route = self._route
        app.router.add_get("/fapi/v1/ping", route("ping", self._ping, signed=False))
        app.router.add_get("/fapi/v1/time", route("time", self._time, signed=False))
        app.router.add_get("/fapi/v1/exchangeInfo", route("exchangeInfo", self._exchange_info, signed=False))
        app.router.add_get("/fapi/v1/premiumIndex", route("premiumIndex", self._premium_index, signed=False))
        for version in ("v2", "v3"):
            app.router.add_get(f"/fapi/{version}/balance", route("balance", self._balance))
            app.router.add_get(f"/fapi/{version}/positionRisk", route("positionRisk", self._position_risk))
        app.router.add_post("/fapi/v1/leverage", route("leverage", self._leverage))
        app.router.add_post("/fapi/v1/order", route("order", self._new_order))
        app.router.add_get("/fapi/v1/order", route("order", self._query_order))
        app.router.add_delete("/fapi/v1/order", route("order", self._cancel_order))
        app.router.add_post("/fapi/v1/algoOrder", route("algoOrder", self._new_algo_order))
        app.router.add_get("/fapi/v1/algoOrder", route("algoOrder", self._query_algo_order))
        app.router.add_delete("/fapi/v1/algoOrder", route("algoOrder", self._cancel_algo_order))
        app.router.add_get("/fapi/v1/openAlgoOrders", route("openAlgoOrders", self._open_algo_orders))
        # User data streams: the API key header, no signature (Binance's USER_STREAM security type).
        app.router.add_post(
            "/fapi/v1/listenKey", route("listenKey", self._new_listen_key, signed=False, keyed=True)
        )
        app.router.add_put(
            "/fapi/v1/listenKey", route("listenKey", self._keep_alive_listen_key, signed=False, keyed=True)
        )
        app.router.add_delete(
            "/fapi/v1/listenKey", route("listenKey", self._delete_listen_key, signed=False, keyed=True)
        )
        self.streams.add_routes(app)
        if self._control:
            app.router.add_post("/_sim/mark", self._control_mark)
            app.router.add_post("/_sim/symbol-status", self._control_symbol_status)
            app.router.add_post("/_sim/fault", self._control_fault)
            app.router.add_post("/_sim/clear-faults", self._control_clear_faults)
            app.router.add_post("/_sim/advance", self._control_advance)
            app.router.add_post("/_sim/skew", self._control_skew)
            app.router.add_get("/_sim/state", self._control_state)
            app.router.add_post("/_sim/stream-fault", self._control_stream_fault)
        app.cleanup_ctx.append(self._mark_ticker_context)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, _app: web.Application) -> None:
        self._closing.set()

    async def _mark_ticker_context(self, _app: web.Application):  # type: ignore[no-untyped-def]
        task = asyncio.create_task(self._run_mark_ticker(), name="binance-emulator-mark-ticker")
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _run_mark_ticker(self) -> None:
        interval = self._settings.mark_tick_seconds
        while True:
            await asyncio.sleep(interval)
            try:
                marks = self._walk.step(interval)
                now = self.now()
                for symbol, price in marks.items():
                    self._log_triggered(self.core.set_mark(symbol, price, now))
                self.streams.account_changed()
            except Exception:
                logger.exception("emulator: mark tick failed; the ticker keeps running")

    def set_mark(self, symbol: str, price: Decimal) -> list[Order]:
        """Override a symbol's mark now (the walk continues from it); returns the orders it triggered."""
        market = self.core.markets[symbol]
        on_tick = market.round_price(price)
        self._walk.set_price(symbol, on_tick)
        changed = self.core.set_mark(symbol, on_tick, self.now())
        self._log_triggered(changed)
        self.streams.account_changed()
        return changed

    @staticmethod
    def _log_triggered(changed: list[Order]) -> None:
        for order in changed:
            logger.info(
                "emulator: %s %s %s %s (filled %s at %s)",
                order.symbol,
                order.type,
                order.client_order_id,
                order.status,
                order.filled_quantity,
                order.average_price,
            )

    def _route(
        self,
        endpoint: str,
        handler: Callable[[_Request], Any],
        *,
        signed: bool = True,
        keyed: bool = False,
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """`signed`: HMAC signature and timestamp (and the API key); `keyed`: the API key header only."""

        async def handle(request: web.Request) -> web.Response:
            self.requests_served += 1
            key = f"{request.method} {endpoint}"
            self.requests_by_endpoint[key] = self.requests_by_endpoint.get(key, 0) + 1
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
            self.max_in_flight[key] = max(self.max_in_flight.get(key, 0), self._in_flight[key])
            try:
                return await handle_counted(request)
            finally:
                self._in_flight[key] -= 1

        async def handle_counted(request: web.Request) -> web.Response:
            ip = request.remote or LOOPBACK_HOST
            raw_query, body, params = await self._read(request)
            # The IP limit comes first and weighs every request that reaches it, signed or not, valid or not.
            weight = endpoint_cost(request.method, request.path).weight_for(params)
            admission = self._weights.admit(ip, weight, self.now())
            if admission.verdict is Verdict.SERVED:
                response = await self._serve(
                    request, endpoint, handler, signed, keyed, ip, raw_query, body, params
                )
            else:
                logger.info(
                    "emulator: %s %s refused by the IP limit (%s, %d used)",
                    request.method,
                    endpoint,
                    admission.verdict.value,
                    admission.used,
                )
                response = self._limit_refusal(ip, admission).response()
            response.headers[USED_WEIGHT_HEADER] = str(self._weights.used(ip, self.now()))
            return response

        return handle

    async def _serve(
        self,
        request: web.Request,
        endpoint: str,
        handler: Callable[[_Request], Any],
        signed: bool,
        keyed: bool,
        ip: str,
        raw_query: str,
        body: str,
        params: dict[str, str],
    ) -> web.Response:
        try:
            if keyed:
                self._require_api_key(request)
            self._authenticate(request, raw_query, body, params, signed)
        except BinanceError as error:
            return error.response()
        fault = self.faults.draw(request.method, endpoint)
        if self.faults.base_latency_ms:
            await asyncio.sleep(self.faults.base_latency_ms / 1000)
        if fault is not None:
            refusal = self._refusal(fault, ip)
            if refusal is not None:
                logger.info(
                    "emulator: fault %s on %s %s (not executed)", fault.kind, request.method, endpoint
                )
                return refusal.response()
            if fault.kind is EmulatorFaultKind.LATENCY:
                await asyncio.sleep(fault.latency_ms / 1000)
        try:
            response = _json(handler(_Request(request.method, params, self.now())))
            if request.method == "POST" and endpoint in _NEW_ORDER_ENDPOINTS:
                counts = self.core.order_counts(self.now(), DEFAULT_ACCOUNT)
                for header, window in ORDER_COUNT_HEADERS.items():
                    response.headers[header] = str(counts[window])
        except BinanceError as error:
            response = error.response()
        except ExchangeError as error:
            response = self._translate(error, endpoint, ip).response()
        self.streams.account_changed()  # what the request changed reaches the user-data stream
        if fault is not None and fault.kind is EmulatorFaultKind.UNKNOWN:
            logger.info("emulator: fault unknown on %s %s (executed, answer 503)", request.method, endpoint)
            return BinanceError(
                503,
                -1007,
                "Timeout waiting for response from backend server. Send status unknown; "
                "execution status unknown.",
            ).response()
        if fault is not None and fault.kind is EmulatorFaultKind.TIMEOUT:
            logger.info(
                "emulator: fault timeout on %s %s (executed, answer held %.0fs)",
                request.method,
                endpoint,
                fault.hold_seconds,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(fault.hold_seconds):
                    await self._closing.wait()
        return response

    def _limit_refusal(self, ip: str, admission: Admission) -> BinanceError:
        if admission.verdict is Verdict.BANNED:
            assert admission.banned_until is not None
            return self._ban(ip, admission.banned_until)
        return self._too_many_requests(ip, admission.retry_after)

    def _too_many_requests(self, ip: str, retry_after: int) -> BinanceError:
        return BinanceError(
            429,
            -1003,
            f"Too many requests; current limit of IP({ip}) is {self._weights.limit} requests per minute. "
            "Please use the websocket for live updates to avoid polling the API.",
            {"Retry-After": str(retry_after)},
        )

    def _ban(self, ip: str, until: float) -> BinanceError:
        return BinanceError(
            418,
            -1003,
            f"Way too many requests; IP({ip}) banned until {_ms(until)}. Please use the websocket for live "
            "updates to avoid bans.",
            {"Retry-After": str(max(1, math.ceil(until - self.now())))},
        )

    def _refusal(self, fault: Fault, ip: str) -> BinanceError | None:
        kind = fault.kind
        if kind is EmulatorFaultKind.BUSY:
            return BinanceError(
                503,
                -1008,
                "Server is currently overloaded with other requests. Please try again in a few minutes.",
            )
        if kind is EmulatorFaultKind.ERROR:
            return BinanceError(500, -1000, "An unknown error occurred while processing the request.")
        if kind is EmulatorFaultKind.RATELIMIT:  # an answer only: the IP's real count is untouched
            return self._too_many_requests(ip, 1)
        if kind is EmulatorFaultKind.BAN:
            # As on Binance, the ban it answers is in force: every request is refused until its end.
            until = self.now() + (fault.seconds or BAN_FAULT_SECONDS)
            self._weights.impose_ban(ip, until, self.now())
            return self._ban(ip, until)
        return None

    def _translate(self, error: ExchangeError, endpoint: str, ip: str) -> BinanceError:
        if isinstance(error, Banned):
            # The core bans the account for order-count violations; Binance's ban is the IP's, and refuses
            # every request from now on, public ones too.
            self._weights.impose_ban(ip, error.until, self.now())
            return self._ban(ip, error.until)
        if isinstance(error, RateLimited):
            limits = self._settings.rate_limits
            counts = self.core.order_counts(self.now(), DEFAULT_ACCOUNT)
            if counts[10.0] >= limits.orders_per_10s:
                limit, interval = limits.orders_per_10s, "TEN_SECONDS"
            else:
                limit, interval = limits.orders_per_minute, "MINUTE"
            # No Retry-After: Binance documents one for the IP limits (429 / 418), not for order counts.
            return BinanceError(
                429, -1015, f"Too many new orders; current limit is {limit} orders per {interval}."
            )
        if isinstance(error, DuplicateClientOrderId):
            if endpoint == "algoOrder":
                return BinanceError(400, -20132, "The client algo id is duplicated")
            return BinanceError(400, -4116, "ClientOrderId is duplicated.")
        if isinstance(error, WouldTriggerImmediately):
            return BinanceError(400, -2021, _MSG_WOULD_TRIGGER)
        if isinstance(error, InsufficientMargin):
            return BinanceError(400, -2019, _MSG_MARGIN)
        if isinstance(error, NotFound):
            return BinanceError(400, -2013, _MSG_NO_ORDER)
        if isinstance(error, Rejected):
            if error.code == RejectCode.MAX_CONDITIONAL_ORDERS:
                return BinanceError(400, -4045, "Reach max stop order limit.")
            return BinanceError(400, int(error.code), error.reason)
        return BinanceError(500, -1000, "An unknown error occurred while processing the request.")

    # ---- signing ----------------------------------------------------------------------------------------

    @staticmethod
    async def _read(request: web.Request) -> tuple[str, str, dict[str, str]]:
        """The raw query string, the raw body, and the parameters of both."""
        raw_query = request.rel_url.raw_query_string
        body = await request.text() if request.can_read_body else ""
        params = dict(parse_qsl(raw_query, keep_blank_values=True))
        params.update(parse_qsl(body, keep_blank_values=True))
        return raw_query, body, params

    def _authenticate(
        self, request: web.Request, raw_query: str, body: str, params: dict[str, str], signed: bool
    ) -> None:
        """Check a SIGNED request's key, signature and timestamp; drops `signature` from `params`."""
        if not signed:
            return
        self._require_api_key(request)
        total = raw_query + body  # Binance signs the query string followed by the body
        payload, separator, signature = total.rpartition("signature=")
        if not separator or (payload and not payload.endswith("&")):
            raise BinanceError(
                400, -1102, "Mandatory parameter 'signature' was not sent, was empty/null, or malformed."
            )
        payload = payload[:-1] if payload.endswith("&") else payload
        expected = hmac.new(self._secret, payload.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            raise BinanceError(400, -1022, "Signature for this request is not valid.")
        try:
            timestamp = int(params.get("timestamp", ""))
            recv_window = int(params.get("recvWindow", DEFAULT_RECV_WINDOW_MS))
        except ValueError:
            raise BinanceError(
                400, -1102, "Mandatory parameter 'timestamp' was not sent, was empty/null, or malformed."
            ) from None
        if not 0 < recv_window <= MAX_RECV_WINDOW_MS:
            raise BinanceError(400, -1131, "recvWindow must be less than 60000")
        server_ms = _ms(self.server_time())
        if timestamp > server_ms + 1000 or server_ms - timestamp > recv_window:
            raise BinanceError(400, -1021, "Timestamp for this request is outside of the recvWindow.")
        params.pop("signature", None)

    def _require_api_key(self, request: web.Request) -> None:
        key = request.headers.get("X-MBX-APIKEY")
        if not key:
            raise BinanceError(400, -2014, "API-key format invalid.")
        if not hmac.compare_digest(key, self._api_key):
            raise BinanceError(401, -2015, "Invalid API-key, IP, or permissions for action.")

    # ---- parameter helpers ------------------------------------------------------------------------------

    @staticmethod
    def _required(params: dict[str, str], name: str) -> str:
        value = params.get(name, "")
        if value == "":
            raise BinanceError(
                400, -1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed."
            )
        return value

    def _decimal(self, params: dict[str, str], name: str) -> Decimal:
        text = self._required(params, name)
        try:
            value = Decimal(text)
        except InvalidOperation:
            raise BinanceError(400, -1130, f"Data sent for parameter '{name}' is not valid.") from None
        if not value.is_finite():
            raise BinanceError(400, -1130, f"Data sent for parameter '{name}' is not valid.")
        return value

    def _market(self, params: dict[str, str]) -> Market:
        symbol = self._required(params, "symbol")
        market = self.core.markets.get(symbol)
        if market is None:
            raise BinanceError(400, -1121, "Invalid symbol.")
        return market

    @staticmethod
    def _side(params: dict[str, str]) -> OrderSide:
        side = params.get("side", "")
        if side not in ("BUY", "SELL"):
            raise BinanceError(400, -1117, "Invalid side.")
        return OrderSide.BUY if side == "BUY" else OrderSide.SELL

    @staticmethod
    def _flag(params: dict[str, str], name: str) -> bool:
        value = params.get(name, "false").lower()
        if value not in ("true", "false"):
            raise BinanceError(400, -1130, f"Data sent for parameter '{name}' is not valid.")
        return value == "true"

    @staticmethod
    def _one_way(params: dict[str, str]) -> None:
        if params.get("positionSide", "BOTH") != "BOTH":
            raise BinanceError(400, -4061, "Order's position side does not match user's setting.")

    # ---- public endpoints -------------------------------------------------------------------------------

    def _ping(self, _request: _Request) -> dict[str, Any]:
        return {}

    def _time(self, request: _Request) -> dict[str, Any]:
        return {"serverTime": _ms(self.server_time())}

    def _exchange_info(self, request: _Request) -> dict[str, Any]:
        limits = self._settings.rate_limits
        return {
            "timezone": "UTC",
            "serverTime": _ms(self.server_time()),
            "futuresType": "U_MARGINED",
            "rateLimits": [
                {
                    "rateLimitType": "REQUEST_WEIGHT",
                    "interval": "MINUTE",
                    "intervalNum": 1,
                    "limit": limits.request_weight_per_minute,
                },
                {
                    "rateLimitType": "ORDERS",
                    "interval": "MINUTE",
                    "intervalNum": 1,
                    "limit": limits.orders_per_minute,
                },
                {
                    "rateLimitType": "ORDERS",
                    "interval": "SECOND",
                    "intervalNum": 10,
                    "limit": limits.orders_per_10s,
                },
            ],
            "exchangeFilters": [],
            "assets": [{"asset": "USDT", "marginAvailable": True, "autoAssetExchange": "-10000"}],
            "symbols": [
                self._symbol_info(market, self.symbol_status.get(market.symbol, "TRADING"))
                for market in self.core.markets.values()
            ],
        }

    @staticmethod
    def _symbol_info(market: Market, status: str) -> dict[str, Any]:
        tick, step = _text(market.tick_size), _text(market.step_size)
        return {
            "symbol": market.symbol,
            "pair": market.symbol,
            "contractType": "PERPETUAL",
            "deliveryDate": 4133404800000,
            "onboardDate": 1569398400000,
            "status": status,
            "maintMarginPercent": "2.5000",
            "requiredMarginPercent": "5.0000",
            "baseAsset": market.base_asset,
            "quoteAsset": market.quote_asset,
            "marginAsset": market.quote_asset,
            "pricePrecision": _decimals(market.tick_size),
            "quantityPrecision": _decimals(market.step_size),
            "baseAssetPrecision": 8,
            "quotePrecision": 8,
            "underlyingType": "COIN",
            "underlyingSubType": [],
            "settlePlan": 0,
            "triggerProtect": "0.0500",
            "liquidationFee": "0.012500",
            "marketTakeBound": "0.05",
            "maxMoveOrderLimit": 10000,
            "filters": [
                {"filterType": "PRICE_FILTER", "minPrice": tick, "maxPrice": "1000000", "tickSize": tick},
                {
                    "filterType": "LOT_SIZE",
                    "minQty": _text(market.min_quantity),
                    "maxQty": "100000000",
                    "stepSize": step,
                },
                {
                    "filterType": "MARKET_LOT_SIZE",
                    "minQty": _text(market.min_quantity),
                    "maxQty": "100000000",
                    "stepSize": step,
                },
                {"filterType": "MAX_NUM_ORDERS", "limit": 200},
                {"filterType": "MAX_NUM_ALGO_ORDERS", "limit": 200},
                {"filterType": "MIN_NOTIONAL", "notional": _text(market.min_notional)},
                {
                    "filterType": "PERCENT_PRICE",
                    "multiplierUp": "1.0500",
                    "multiplierDown": "0.9500",
                    "multiplierDecimal": "4",
                },
            ],
            "orderTypes": [
                "LIMIT",
                "MARKET",
                "STOP",
                "STOP_MARKET",
                "TAKE_PROFIT",
                "TAKE_PROFIT_MARKET",
                "TRAILING_STOP_MARKET",
            ],
            "timeInForce": ["GTC", "IOC", "FOK", "GTX", "GTD"],
        }

    def _premium_index(self, request: _Request) -> Any:
        symbol = request.params.get("symbol")
        if symbol is not None and symbol not in self.core.markets:
            raise BinanceError(400, -1121, "Invalid symbol.")
        marks = self.core.mark_prices([symbol] if symbol else None)
        now_ms = _ms(request.now)
        rows = [
            {
                "symbol": mark.symbol,
                "markPrice": _text(mark.price),
                "indexPrice": _text(mark.price),
                "estimatedSettlePrice": _text(mark.price),
                "lastFundingRate": "0.00010000",
                "interestRate": "0.00010000",
                "nextFundingTime": (now_ms // 28_800_000 + 1) * 28_800_000,
                "time": _ms(mark.timestamp),  # when the mark was last published
            }
            for mark in marks.values()
        ]
        return rows[0] if symbol else rows

    # ---- account ----------------------------------------------------------------------------------------

    def _balance(self, request: _Request) -> Any:
        balance = self.core.balance(request.now, DEFAULT_ACCOUNT)
        return [
            {
                "accountAlias": "SgsR",
                "asset": balance.asset,
                "balance": _text(balance.wallet_balance),
                "crossWalletBalance": _text(balance.wallet_balance),
                "crossUnPnl": _text(balance.unrealized_pnl),
                "availableBalance": _text(balance.available_balance),
                "maxWithdrawAmount": _text(max(balance.available_balance, _ZERO)),
                "marginAvailable": True,
                "updateTime": _ms(request.now),
            }
        ]

    def _position_risk(self, request: _Request) -> Any:
        wanted = request.params.get("symbol")
        rows = []
        for position in self.core.positions(request.now, DEFAULT_ACCOUNT):
            if wanted and position.symbol != wanted:
                continue
            signed = position.quantity if position.side.value == "long" else -position.quantity
            notional = signed * position.mark_price
            rows.append(
                {
                    "symbol": position.symbol,
                    "positionAmt": _text(signed),
                    "entryPrice": _text(position.entry_price),
                    "breakEvenPrice": _text(position.entry_price),
                    "markPrice": _text(position.mark_price),
                    "unRealizedProfit": _text(position.unrealized_pnl),
                    "liquidationPrice": _text(position.liquidation_price or 0),
                    "leverage": str(position.leverage),
                    "maxNotionalValue": "1000000",
                    "marginType": "cross",
                    "isolatedMargin": "0.00000000",
                    "isAutoAddMargin": "false",
                    "positionSide": "BOTH",
                    "notional": _text(notional),
                    "isolatedWallet": "0",
                    "updateTime": _ms(position.updated_at),
                }
            )
        # V2 answers a row for every symbol in one-way mode, flat ones with positionAmt 0: their leverage
        # is the account's setting for them.
        held = {row["symbol"] for row in rows}
        for symbol, leverage in sorted(self.core.leverages(request.now, DEFAULT_ACCOUNT).items()):
            if symbol in held or (wanted and symbol != wanted):
                continue
            rows.append(
                {
                    "symbol": symbol,
                    "positionAmt": "0.000",
                    "entryPrice": "0.0",
                    "breakEvenPrice": "0.0",
                    "markPrice": _text(self.core.mark(symbol)),
                    "unRealizedProfit": "0.00000000",
                    "liquidationPrice": "0",
                    "leverage": str(leverage),
                    "maxNotionalValue": "1000000",
                    "marginType": "cross",
                    "isolatedMargin": "0.00000000",
                    "isAutoAddMargin": "false",
                    "positionSide": "BOTH",
                    "notional": "0",
                    "isolatedWallet": "0",
                    "updateTime": 0,
                }
            )
        return rows

    def _leverage(self, request: _Request) -> Any:
        market = self._market(request.params)
        try:
            leverage = int(self._required(request.params, "leverage"))
        except ValueError:
            raise BinanceError(400, -1130, "Data sent for parameter 'leverage' is not valid.") from None
        applied = self.core.set_leverage(market.symbol, leverage, request.now, DEFAULT_ACCOUNT)
        self.streams.leverage_changed(market.symbol, applied, request.now)
        return {"leverage": applied, "maxNotionalValue": "1000000", "symbol": market.symbol}

    # ---- regular orders ---------------------------------------------------------------------------------

    def _new_order(self, request: _Request) -> Any:
        params = request.params
        market = self._market(params)
        side = self._side(params)
        order_type = params.get("type", "")
        if order_type in ("STOP", "STOP_MARKET", "TAKE_PROFIT", "TAKE_PROFIT_MARKET", "TRAILING_STOP_MARKET"):
            raise BinanceError(
                400,
                -4120,
                "Order type not supported for this endpoint. Please use the Algo Order API endpoints instead.",
            )
        if order_type != "MARKET":
            raise BinanceError(400, -1116, "Invalid orderType.")
        self._one_way(params)
        reduce_only = self._flag(params, "reduceOnly")
        if not reduce_only and self.symbol_status.get(market.symbol, "TRADING") != "TRADING":
            # Settling or delisting: positions may still be reduced, none opened.
            raise BinanceError(400, -4140, "Invalid symbol status for opening position.")
        quantity = self._decimal(params, "quantity")
        client_order_id = self._required(params, "newClientOrderId")
        order = self.core.place_market_order(
            market.symbol,
            side,
            quantity,
            client_order_id,
            request.now,
            reduce_only=reduce_only,
            account_id=DEFAULT_ACCOUNT,
        )
        self.streams.note_market_order(order)
        return self._order_json(order)

    def _find_order(self, request: _Request, *, algo: bool) -> Order:
        """The order a query or cancel names: by client id (the most recent order that carried it, in the
        endpoint's own namespace) or by Binance id (orderId / algoId)."""
        params = request.params
        market = self._market(params)
        id_name, client_name = ("algoId", "clientAlgoId") if algo else ("orderId", "origClientOrderId")
        client_order_id = params.get(client_name)
        if client_order_id:
            return self.core.get_order(
                market.symbol, client_order_id, request.now, DEFAULT_ACCOUNT, conditional=algo
            )
        if not params.get(id_name):
            raise BinanceError(400, -1102, f"Either {id_name} or {client_name} must be sent.")
        try:
            venue_id = int(params[id_name])
        except ValueError:
            raise BinanceError(400, -1130, f"Data sent for parameter '{id_name}' is not valid.") from None
        if not algo and venue_id >= CHILD_ORDER_ID_OFFSET:
            return self._child_order(market.symbol, venue_id - CHILD_ORDER_ID_OFFSET, request.now)
        order = self.core.get_order_by_venue_id(market.symbol, str(venue_id), request.now, DEFAULT_ACCOUNT)
        if (order.type is not OrderType.MARKET) != algo:
            raise NotFound(market.symbol, str(venue_id))  # the other API's namespace
        return order

    def _child_order(self, symbol: str, algo_id: int, now: float) -> Order:
        """The algo order behind a child (the regular order a fired algo order placed), once it exists."""
        order = self.core.get_order_by_venue_id(symbol, str(algo_id), now, DEFAULT_ACCOUNT)
        if order.type is OrderType.MARKET or order.status not in (OrderStatus.FILLED, OrderStatus.EXPIRED):
            raise NotFound(symbol, str(algo_id))
        return order

    def _query_order(self, request: _Request) -> Any:
        venue_id = request.params.get("orderId", "")
        if venue_id.isdigit() and int(venue_id) >= CHILD_ORDER_ID_OFFSET:
            market = self._market(request.params)
            child = self._child_order(market.symbol, int(venue_id) - CHILD_ORDER_ID_OFFSET, request.now)
            return self._child_json(child)
        return self._order_json(self._find_order(request, algo=False))

    def _cancel_order(self, request: _Request) -> Any:
        try:
            order = self._find_order(request, algo=False)
        except NotFound:
            raise BinanceError(400, -2011, _MSG_UNKNOWN_ORDER) from None
        if not order.is_open:  # market orders are always done
            raise BinanceError(400, -2011, _MSG_UNKNOWN_ORDER)
        return self._order_json(self.core.cancel_order(order.symbol, order.client_order_id, request.now))

    @staticmethod
    def _order_json(order: Order) -> dict[str, Any]:
        status = {
            OrderStatus.NEW: "NEW",
            OrderStatus.FILLED: "FILLED",
            OrderStatus.CANCELED: "CANCELED",
            OrderStatus.EXPIRED: "EXPIRED",
        }[order.status]
        average = order.average_price or _ZERO
        return {
            "orderId": int(order.venue_order_id),
            "symbol": order.symbol,
            "status": status,
            "clientOrderId": order.client_order_id,
            "price": "0",
            "avgPrice": _text(average),
            "origQty": _text(order.quantity),
            "executedQty": _text(order.filled_quantity),
            "cumQty": _text(order.filled_quantity),
            "cumQuote": _text(order.filled_quantity * average),
            "timeInForce": "GTC",
            "type": "MARKET",
            "reduceOnly": order.reduce_only,
            "closePosition": False,
            "side": order.side.value.upper(),
            "positionSide": "BOTH",
            "stopPrice": "0",
            "workingType": "CONTRACT_PRICE",
            "priceProtect": False,
            "origType": "MARKET",
            "priceMatch": "NONE",
            "selfTradePreventionMode": "EXPIRE_MAKER",
            "goodTillDate": 0,
            "time": _ms(order.created_at),
            "updateTime": _ms(order.updated_at),
        }

    @staticmethod
    def _child_json(order: Order) -> dict[str, Any]:
        """The regular order a triggered algo order placed (filled, or expired with nothing to reduce)."""
        average = order.average_price or _ZERO
        return {
            "orderId": int(order.venue_order_id) + CHILD_ORDER_ID_OFFSET,
            "symbol": order.symbol,
            "status": "FILLED" if order.status is OrderStatus.FILLED else "EXPIRED",
            "clientOrderId": f"autotrigger-{order.venue_order_id}",
            "price": "0",
            "avgPrice": _text(average),
            "origQty": _text(order.quantity),
            "executedQty": _text(order.filled_quantity),
            "cumQty": _text(order.filled_quantity),
            "cumQuote": _text(order.filled_quantity * average),
            "timeInForce": "GTC",
            "type": "MARKET",
            "reduceOnly": True,
            "closePosition": False,
            "side": order.side.value.upper(),
            "positionSide": "BOTH",
            "stopPrice": "0",
            "workingType": "MARK_PRICE",
            "priceProtect": False,
            "origType": order.type.value.upper(),
            "priceMatch": "NONE",
            "selfTradePreventionMode": "EXPIRE_MAKER",
            "goodTillDate": 0,
            "time": _ms(order.updated_at),
            "updateTime": _ms(order.updated_at),
        }

    # ---- algo (conditional) orders ----------------------------------------------------------------------

    def _new_algo_order(self, request: _Request) -> Any:
        params = request.params
        if params.get("algoType") != "CONDITIONAL":
            raise BinanceError(400, -1130, "Data sent for parameter 'algoType' is not valid.")
        market = self._market(params)
        side = self._side(params)
        self._one_way(params)
        if params.get("workingType", "CONTRACT_PRICE") != "MARK_PRICE":
            # The emulator only models mark-price triggers; the adapter must ask for them.
            raise BinanceError(400, -1130, "Data sent for parameter 'workingType' is not valid.")
        order_type = params.get("type", "")
        client_order_id = self._required(params, "clientAlgoId")
        # Drawn per placement; a forced trait is used up only if the core accepts the order (commit below).
        drawn = self.faults.draw_traits(request.method, "algoOrder")
        traits = {"read_lag": drawn.traits.read_lag, "trigger_delay": drawn.traits.trigger_delay}
        close_position = self._flag(params, "closePosition")
        if not close_position and not self._flag(params, "reduceOnly"):
            # Protective orders only: the sim core's conditional orders are always reduce-only.
            raise BinanceError(400, -1130, "Data sent for parameter 'reduceOnly' is not valid.")
        if close_position and order_type in ("STOP_MARKET", "TAKE_PROFIT_MARKET", "TRAILING_STOP_MARKET"):
            raise BinanceError(400, -1106, "Parameter 'closePosition' sent when not required.")
        if order_type in ("STOP_MARKET", "TAKE_PROFIT_MARKET"):
            # (The engine sends no take-profit: an operator's, or another client's.)
            place = (
                self.core.place_stop_market_order
                if order_type == "STOP_MARKET"
                else self.core.place_take_profit_market_order
            )
            order = place(
                market.symbol,
                side,
                self._decimal(params, "quantity"),
                self._decimal(params, "triggerPrice"),
                client_order_id,
                request.now,
                account_id=DEFAULT_ACCOUNT,
                **traits,
            )
        elif order_type == "TRAILING_STOP_MARKET":
            activation = self._decimal(params, "activatePrice") if params.get("activatePrice") else None
            order = self.core.place_trailing_stop_order(
                market.symbol,
                side,
                self._decimal(params, "quantity"),
                self._decimal(params, "callbackRate"),
                client_order_id,
                request.now,
                activation_price=activation,
                account_id=DEFAULT_ACCOUNT,
                **traits,
            )
        else:
            raise BinanceError(400, -1116, "Invalid orderType.")
        self.faults.commit(drawn)
        if drawn.traits != OrderTraits():
            logger.info("emulator: algo order %s carries %s", client_order_id, drawn.traits)
        return self._algo_json(order)

    def _query_algo_order(self, request: _Request) -> Any:
        return self._algo_json(self._find_order(request, algo=True))

    def _cancel_algo_order(self, request: _Request) -> Any:
        try:
            order = self._find_order(request, algo=True)
        except NotFound:  # never placed, or placed moments ago and not known to the reads yet
            raise BinanceError(400, -2011, _MSG_UNKNOWN_ORDER) from None
        if not order.is_open:  # triggering (in the matching engine's hands), finished or cancelled
            raise BinanceError(400, -20124, _MSG_ALGO_DONE)
        cancelled = self.core.cancel_order(order.symbol, order.client_order_id, request.now)
        return {
            "algoId": int(cancelled.venue_order_id),
            "clientAlgoId": cancelled.client_order_id,
            "code": "200",
            "msg": "success",
        }

    def _open_algo_orders(self, request: _Request) -> Any:
        symbol = request.params.get("symbol")
        if symbol is not None and symbol not in self.core.markets:
            raise BinanceError(400, -1121, "Invalid symbol.")
        orders = self.core.open_protective_orders(request.now, symbol, DEFAULT_ACCOUNT)
        return [self._algo_json(order) for order in orders]

    @staticmethod
    def _algo_json(order: Order) -> dict[str, Any]:
        finished = order.status in (OrderStatus.FILLED, OrderStatus.EXPIRED)
        fired = finished or order.status is OrderStatus.TRIGGERED
        status = {
            OrderStatus.NEW: "NEW",
            OrderStatus.TRIGGERED: "TRIGGERING",  # forwarded to the matching engine, no child order yet
            OrderStatus.FILLED: "FINISHED",
            OrderStatus.EXPIRED: "FINISHED",
            OrderStatus.CANCELED: "CANCELED",
        }[order.status]
        return {
            "algoId": int(order.venue_order_id),
            "clientAlgoId": order.client_order_id,
            "algoType": "CONDITIONAL",
            "orderType": order.type.value.upper(),
            "symbol": order.symbol,
            "side": order.side.value.upper(),
            "positionSide": "BOTH",
            "timeInForce": "GTC",
            "quantity": _text(order.quantity),
            "algoStatus": status,
            "triggerPrice": _text(order.stop_price),
            "price": "0",
            "icebergQuantity": None,
            "selfTradePreventionMode": "EXPIRE_MAKER",
            "workingType": "MARK_PRICE",
            "priceMatch": "NONE",
            "closePosition": False,
            "priceProtect": False,
            "reduceOnly": True,
            "activatePrice": "" if order.activation_price is None else _text(order.activation_price),
            "callbackRate": "" if order.callback_rate is None else _text(order.callback_rate),
            "createTime": _ms(order.created_at),
            "updateTime": _ms(order.updated_at),
            # When it fired; for a finished order the core keeps only when it ended.
            "triggerTime": _ms(order.updated_at) if fired else 0,
            "goodTillDate": 0,
            "actualOrderId": str(int(order.venue_order_id) + CHILD_ORDER_ID_OFFSET) if finished else "",
            "actualPrice": _text(order.average_price) if finished and order.average_price else "",
        }

    # ---- user data streams (listen keys) ----------------------------------------------------------------

    def _new_listen_key(self, _request: _Request) -> Any:
        return self.streams.create_listen_key()

    def _keep_alive_listen_key(self, _request: _Request) -> Any:
        kept = self.streams.keep_alive_listen_key()
        if kept is None:
            raise BinanceError(400, -1125, "This listenKey does not exist.")
        return kept

    def _delete_listen_key(self, _request: _Request) -> Any:
        return self.streams.delete_listen_key()

    # ---- control API (tests, rehearsals) ----------------------------------------------------------------

    _require_loopback = staticmethod(require_loopback)

    async def _control_body(self, request: web.Request) -> dict[str, Any]:
        return await control_body(request)

    async def _control_mark(self, request: web.Request) -> web.Response:
        body = await self._control_body(request)
        symbol = str(body.get("symbol", ""))
        if symbol not in self.core.markets:
            raise web.HTTPBadRequest(text=f"control API: unknown symbol {symbol!r}")
        try:
            price = Decimal(str(body.get("price", "")))
        except InvalidOperation:
            raise web.HTTPBadRequest(text="control API: price must be a decimal string") from None
        changed = self.set_mark(symbol, price)
        return _json(
            {
                "symbol": symbol,
                "mark": _text(self.core.mark(symbol)),
                "triggered": [o.client_order_id for o in changed],
            }
        )

    async def _control_symbol_status(self, request: web.Request) -> web.Response:
        """A symbol's `status` in exchangeInfo (SETTLING, PENDING_TRADING, CLOSE …): only TRADING opens
        positions (-4140); reduce-only orders and stops go on."""
        body = await self._control_body(request)
        symbol, status = str(body.get("symbol", "")), str(body.get("status", ""))
        if symbol not in self.core.markets:
            raise web.HTTPBadRequest(text=f"control API: unknown symbol {symbol!r}")
        if not status.isupper() or not status.replace("_", "").isalpha():
            raise web.HTTPBadRequest(
                text=f"control API: status must be a Binance symbol status, got {status!r}"
            )
        self.symbol_status[symbol] = status
        return _json({"symbol": symbol, "status": status})

    async def _control_fault(self, request: web.Request) -> web.Response:
        body = await self._control_body(request)
        try:
            target_texts = control_target_texts(body, TARGETS_BY_CALL)
            targets = tuple(Target.parse(text) for text in target_texts)
            if not targets:
                raise FaultSpecError("no targets")
            fault = parse_fault(
                str(body.get("fault", "")), hold_seconds=float(body.get("hold_seconds", 30.0))
            )
            require_placement_target(targets, fault)
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
        return _json({"fault": body.get("fault"), **staged})

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

    async def _control_state(self, request: web.Request) -> web.Response:
        """The exchange as it is, for tests: never weighed, never banned, never hidden by read lag."""
        self._require_loopback(request)
        now = self.now()
        ip = request.remote or LOOPBACK_HOST
        seen = self.core.inspect(now, DEFAULT_ACCOUNT)
        bans = [until for until in (seen.banned_until, self._weights.banned_until(ip, now)) if until]
        return _json(
            {
                "now": _ms(now),
                "requests_served": self.requests_served,
                "max_in_flight": dict(self.max_in_flight),
                "positions": [
                    {
                        "symbol": p.symbol,
                        "side": p.side.value,
                        "quantity": _text(p.quantity),
                        "liquidationPrice": _text(p.liquidation_price) if p.liquidation_price else None,
                    }
                    for p in seen.positions
                ],
                "open_algo_orders": [
                    {
                        "symbol": o.symbol,
                        "clientAlgoId": o.client_order_id,
                        "orderType": o.type.value.upper(),
                        "side": o.side.value.upper(),
                        "quantity": _text(o.quantity),
                        "triggerPrice": _text(o.stop_price) if o.stop_price is not None else None,
                    }
                    for o in seen.open_conditional
                ],
                "triggering_algo_orders": [
                    {"clientAlgoId": o.client_order_id, "symbol": o.symbol, "since": _ms(o.updated_at)}
                    for o in seen.triggering
                ],
                "streams": self.streams.state(),
                "requests_by_endpoint": dict(self.requests_by_endpoint),
                "rate": {
                    "used_weight_1m": self._weights.used(ip, now),
                    "order_count_10s": seen.order_counts[10.0],
                    "order_count_1m": seen.order_counts[60.0],
                    "banned_until_ms": _ms(max(bans)) if bans else None,
                },
            }
        )

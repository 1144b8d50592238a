"""The Binance USDⓈ-M wire emulator: an aiohttp app over the sim venue's matching core.

It speaks the subset of the futures REST API the ccxt adapter uses, with Binance's paths, parameters,
signing rules, JSON shapes, HTTP statuses and error codes:

* public: `GET /fapi/v1/ping`, `/time`, `/exchangeInfo` (filters and `rateLimits`), `/premiumIndex`;
* signed (HMAC-SHA256 over query string + body, `X-MBX-APIKEY`, `timestamp` within `recvWindow`):
  `GET /fapi/v2|v3/balance`, `GET /fapi/v2|v3/positionRisk`, `POST /fapi/v1/leverage`,
  `POST|GET|DELETE /fapi/v1/order` (MARKET orders; conditional types are refused with -4120 as Binance has
  done since the Algo Order migration), `POST|GET|DELETE /fapi/v1/algoOrder` (STOP_MARKET and
  TRAILING_STOP_MARKET, `clientAlgoId`, mark-price triggers), `GET /fapi/v1/openAlgoOrders`.

Errors: 400 with `{"code", "msg"}` (-2021 would trigger, -4045 conditional cap, -2019 margin, -2022
reduce-only, -1111 precision, -4116 / -20132 duplicate ids, -2013 / -20124 unknown orders, -1021 timestamp,
-1022 signature), 401 -2015 (unknown key), 429 -1015 with `Retry-After`, 418 -1003 with the ban's end,
503 -1007 (execution status unknown) and 503 -1008 (server busy). Faults per endpoint come from
`faults.py`.

The exchange state (balances, positions, orders, marks, rate budget) lives in this process, so an engine
can be killed and restarted against the same "exchange". Venue time is the wall clock plus an offset
that only the control API moves; request timestamps are always checked against the real clock.

Optional control API (served only when `control=True`, loopback callers only): `POST /_sim/mark`,
`POST /_sim/fault`, `POST /_sim/clear-faults`, `POST /_sim/advance`, `GET /_sim/state`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
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
    FaultPlan,
    FaultSpecError,
    Target,
    parse_fault,
)
from engine.venues.sim.core import DEFAULT_ACCOUNT, SimCore
from engine.venues.sim.prices import GbmWalk
from engine.venues.sim.settings import SimVenueSettings
from engine.venues.sim.universe import select_listings

logger = logging.getLogger(__name__)

LOOPBACK_HOST = "127.0.0.1"
DEFAULT_RECV_WINDOW_MS = 5_000
MAX_RECV_WINDOW_MS = 60_000
CHILD_ORDER_ID_OFFSET = 1_000_000_000  # the regular order an algo order places when it triggers
_ZERO = Decimal(0)

_MSG_WOULD_TRIGGER = "Order would immediately trigger."
_MSG_MARGIN = "Margin is insufficient."
_MSG_NO_ORDER = "Order does not exist."
_MSG_ALGO_DONE = "Invalid algo id or it has been completed."


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


@dataclass(slots=True)
class _Ids:
    """Binance-side ids of core orders: orderId/algoId -> (symbol, client id)."""

    by_venue_id: dict[int, tuple[str, str]] = field(default_factory=dict)


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
    ) -> None:
        if not api_key or not api_secret:
            raise ValueError("the emulator needs an API key and secret to verify signatures")
        self._settings = settings
        self._api_key = api_key
        self._secret = api_secret.encode()
        self.faults = faults if faults is not None else FaultPlan(seed=settings.seed)
        self._control = control
        self._offset = 0.0
        listings = select_listings(settings.symbols, settings.synthetic_listings)
        self.core = SimCore(listings, settings, now=self.now())
        markets = self.core.markets
        self._walk = GbmWalk(
            seed=settings.seed,
            initial_prices={symbol: self.core.mark(symbol) for symbol in markets},
            tick_sizes={symbol: market.tick_size for symbol, market in markets.items()},
            volatility={symbol: settings.volatility_for(symbol) for symbol in markets},
        )
        self._ids = _Ids()
        self._closing = asyncio.Event()
        self.requests_served = 0

    # ---- time ------------------------------------------------------------------------------------------

    def now(self) -> float:
        return time.time() + self._offset

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
        if self._control:
            app.router.add_post("/_sim/mark", self._control_mark)
            app.router.add_post("/_sim/fault", self._control_fault)
            app.router.add_post("/_sim/clear-faults", self._control_clear_faults)
            app.router.add_post("/_sim/advance", self._control_advance)
            app.router.add_get("/_sim/state", self._control_state)
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
            except Exception:
                logger.exception("emulator: mark tick failed; the ticker keeps running")

    def set_mark(self, symbol: str, price: Decimal) -> list[Order]:
        """Override a symbol's mark now (the walk continues from it); returns the orders it triggered."""
        market = self.core.markets[symbol]
        on_tick = market.round_price(price)
        self._walk.set_price(symbol, on_tick)
        changed = self.core.set_mark(symbol, on_tick, self.now())
        self._log_triggered(changed)
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
        self, endpoint: str, handler: Callable[[_Request], Any], *, signed: bool = True
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            self.requests_served += 1
            try:
                params = await self._authenticate(request, signed)
            except BinanceError as error:
                return error.response()
            fault = self.faults.draw(request.method, endpoint)
            if self.faults.base_latency_ms:
                await asyncio.sleep(self.faults.base_latency_ms / 1000)
            if fault is not None:
                refusal = self._refusal(fault.kind)
                if refusal is not None:
                    logger.info(
                        "emulator: fault %s on %s %s (not executed)", fault.kind, request.method, endpoint
                    )
                    return refusal.response()
                if fault.kind is EmulatorFaultKind.LATENCY:
                    await asyncio.sleep(fault.latency_ms / 1000)
            try:
                response = _json(handler(_Request(request.method, params, self.now())))
            except BinanceError as error:
                response = error.response()
            except ExchangeError as error:
                response = self._translate(error, endpoint).response()
            if fault is not None and fault.kind is EmulatorFaultKind.UNKNOWN:
                logger.info(
                    "emulator: fault unknown on %s %s (executed, answer 503)", request.method, endpoint
                )
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
                    await asyncio.wait_for(self._closing.wait(), fault.hold_seconds)
            return response

        return handle

    def _refusal(self, kind: EmulatorFaultKind) -> BinanceError | None:
        if kind is EmulatorFaultKind.BUSY:
            return BinanceError(
                503,
                -1008,
                "Server is currently overloaded with other requests. Please try again in a few minutes.",
            )
        if kind is EmulatorFaultKind.ERROR:
            return BinanceError(500, -1000, "An unknown error occurred while processing the request.")
        if kind is EmulatorFaultKind.RATELIMIT:
            return BinanceError(
                429,
                -1003,
                "Too many requests; current limit is 2400 requests per minute. Please use the websocket for "
                "live updates to avoid polling the API.",
                {"Retry-After": "1"},
            )
        if kind is EmulatorFaultKind.BAN:
            until = self.now() + 2.0
            return BinanceError(
                418,
                -1003,
                f"Way too many requests; IP banned until {_ms(until)}. Please use the websocket for live "
                "updates to avoid bans.",
                {"Retry-After": "2"},
            )
        return None

    def _translate(self, error: ExchangeError, endpoint: str) -> BinanceError:
        if isinstance(error, Banned):
            wait = max(1, math.ceil(error.until - self.now()))
            return BinanceError(
                418,
                -1003,
                f"Way too many requests; IP banned until {_ms(error.until)}. Please use the websocket for live "
                "updates to avoid bans.",
                {"Retry-After": str(wait)},
            )
        if isinstance(error, RateLimited):
            limits = self._settings.rate_limits
            return BinanceError(
                429,
                -1015,
                f"Too many new orders; current limit is {limits.orders_per_10s} orders per TEN_SECONDS.",
                {"Retry-After": str(max(1, math.ceil(error.retry_after)))},
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

    async def _authenticate(self, request: web.Request, signed: bool) -> dict[str, str]:
        raw_query = request.rel_url.raw_query_string
        body = await request.text() if request.can_read_body else ""
        params = dict(parse_qsl(raw_query, keep_blank_values=True))
        params.update(parse_qsl(body, keep_blank_values=True))
        if not signed:
            return params
        key = request.headers.get("X-MBX-APIKEY")
        if not key:
            raise BinanceError(400, -2014, "API-key format invalid.")
        if not hmac.compare_digest(key, self._api_key):
            raise BinanceError(401, -2015, "Invalid API-key, IP, or permissions for action.")
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
        server_ms = _ms(time.time())
        if timestamp > server_ms + 1000 or server_ms - timestamp > recv_window:
            raise BinanceError(400, -1021, "Timestamp for this request is outside of the recvWindow.")
        params.pop("signature", None)
        return params

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
        return {"serverTime": _ms(request.now)}

    def _exchange_info(self, request: _Request) -> dict[str, Any]:
        limits = self._settings.rate_limits
        return {
            "timezone": "UTC",
            "serverTime": _ms(request.now),
            "futuresType": "U_MARGINED",
            "rateLimits": [
                {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 2400},
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
            "symbols": [self._symbol_info(market) for market in self.core.markets.values()],
        }

    @staticmethod
    def _symbol_info(market: Market) -> dict[str, Any]:
        tick, step = _text(market.tick_size), _text(market.step_size)
        return {
            "symbol": market.symbol,
            "pair": market.symbol,
            "contractType": "PERPETUAL",
            "deliveryDate": 4133404800000,
            "onboardDate": 1569398400000,
            "status": "TRADING",
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
                    "liquidationPrice": "0",
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
        return rows

    def _leverage(self, request: _Request) -> Any:
        market = self._market(request.params)
        try:
            leverage = int(self._required(request.params, "leverage"))
        except ValueError:
            raise BinanceError(400, -1130, "Data sent for parameter 'leverage' is not valid.") from None
        applied = self.core.set_leverage(market.symbol, leverage, request.now, DEFAULT_ACCOUNT)
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
        quantity = self._decimal(params, "quantity")
        client_order_id = self._required(params, "newClientOrderId")
        order = self.core.place_market_order(
            market.symbol,
            side,
            quantity,
            client_order_id,
            request.now,
            reduce_only=self._flag(params, "reduceOnly"),
            account_id=DEFAULT_ACCOUNT,
        )
        self._ids.by_venue_id[int(order.venue_order_id)] = (order.symbol, order.client_order_id)
        return self._order_json(order)

    def _find_order(self, request: _Request, *, algo: bool) -> Order:
        params = request.params
        market = self._market(params)
        id_name, client_name = ("algoId", "clientAlgoId") if algo else ("orderId", "origClientOrderId")
        client_order_id = params.get(client_name)
        if not client_order_id and params.get(id_name):
            try:
                venue_id = int(params[id_name])
            except ValueError:
                raise BinanceError(400, -1130, f"Data sent for parameter '{id_name}' is not valid.") from None
            if not algo and venue_id >= CHILD_ORDER_ID_OFFSET:
                return self._child_order(market.symbol, venue_id - CHILD_ORDER_ID_OFFSET, request.now)
            _symbol, client_order_id = self._ids.by_venue_id.get(venue_id, (market.symbol, ""))
        if not client_order_id:
            raise BinanceError(400, -1102, f"Either {id_name} or {client_name} must be sent.")
        order = self.core.get_order(market.symbol, client_order_id, request.now, DEFAULT_ACCOUNT)
        is_algo = order.type is not OrderType.MARKET
        if is_algo != algo:
            raise NotFound(market.symbol, client_order_id)  # the other API's namespace
        return order

    def _child_order(self, symbol: str, algo_id: int, now: float) -> Order:
        _symbol, client_order_id = self._ids.by_venue_id.get(algo_id, (symbol, ""))
        if not client_order_id:
            raise NotFound(symbol, str(algo_id))
        order = self.core.get_order(symbol, client_order_id, now, DEFAULT_ACCOUNT)
        if order.status not in (OrderStatus.FILLED, OrderStatus.EXPIRED):
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
            raise BinanceError(400, -2011, "Unknown order sent.") from None
        if not order.is_open:  # market orders are always done
            raise BinanceError(400, -2011, "Unknown order sent.")
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
        close_position = self._flag(params, "closePosition")
        if not close_position and not self._flag(params, "reduceOnly"):
            # Protective orders only: the sim core's conditional orders are always reduce-only.
            raise BinanceError(400, -1130, "Data sent for parameter 'reduceOnly' is not valid.")
        if order_type == "STOP_MARKET":
            if close_position:
                raise BinanceError(400, -1106, "Parameter 'closePosition' sent when not required.")
            order = self.core.place_stop_market_order(
                market.symbol,
                side,
                self._decimal(params, "quantity"),
                self._decimal(params, "triggerPrice"),
                client_order_id,
                request.now,
                account_id=DEFAULT_ACCOUNT,
            )
        elif order_type == "TRAILING_STOP_MARKET":
            if close_position:
                raise BinanceError(400, -1106, "Parameter 'closePosition' sent when not required.")
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
            )
        else:
            raise BinanceError(400, -1116, "Invalid orderType.")
        self._ids.by_venue_id[int(order.venue_order_id)] = (order.symbol, order.client_order_id)
        return self._algo_json(order)

    def _query_algo_order(self, request: _Request) -> Any:
        return self._algo_json(self._find_order(request, algo=True))

    def _cancel_algo_order(self, request: _Request) -> Any:
        try:
            order = self._find_order(request, algo=True)
        except NotFound:
            raise BinanceError(400, -20124, _MSG_ALGO_DONE) from None
        if not order.is_open:
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
        status = {
            OrderStatus.NEW: "NEW",
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
            "triggerTime": _ms(order.updated_at) if finished else 0,
            "goodTillDate": 0,
            "actualOrderId": str(int(order.venue_order_id) + CHILD_ORDER_ID_OFFSET) if finished else "",
            "actualPrice": _text(order.average_price) if finished and order.average_price else "",
        }

    # ---- control API (tests, rehearsals) ----------------------------------------------------------------

    @staticmethod
    def _require_loopback(request: web.Request) -> None:
        remote = request.remote or ""
        try:
            loopback = ipaddress.ip_address(remote).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise web.HTTPForbidden(text="control API: loopback callers only")

    async def _control_body(self, request: web.Request) -> dict[str, Any]:
        self._require_loopback(request)
        try:
            body = await request.json()
        except (json.JSONDecodeError, ValueError):
            raise web.HTTPBadRequest(text="control API: body must be a JSON object") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="control API: body must be a JSON object")
        return body

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

    async def _control_fault(self, request: web.Request) -> web.Response:
        body = await self._control_body(request)
        try:
            if "call" in body:
                call = str(body["call"])
                if call not in TARGETS_BY_CALL:
                    raise FaultSpecError(f"unknown call {call!r}")
                target_texts: list[str] = list(TARGETS_BY_CALL[call])
            else:
                target_texts = [str(t) for t in body.get("targets", [])]
            targets = tuple(Target.parse(text) for text in target_texts)
            if not targets:
                raise FaultSpecError("no targets")
            fault = parse_fault(
                str(body.get("fault", "")), hold_seconds=float(body.get("hold_seconds", 30.0))
            )
            self.faults.force(targets, fault, int(body.get("count", 1)))
        except (FaultSpecError, ValueError) as error:
            raise web.HTTPBadRequest(text=f"control API: {error}") from None
        return _json({"forced": fault.kind.value, "targets": target_texts})

    async def _control_clear_faults(self, request: web.Request) -> web.Response:
        self._require_loopback(request)
        self.faults.clear_forced()
        return _json({})

    async def _control_advance(self, request: web.Request) -> web.Response:
        body = await self._control_body(request)
        try:
            seconds = float(body.get("seconds", 0))
        except (TypeError, ValueError):
            raise web.HTTPBadRequest(text="control API: seconds must be a number") from None
        if not 0 <= seconds <= 30 * 86_400:
            raise web.HTTPBadRequest(text="control API: seconds must be within 0..2592000")
        self._offset += seconds
        return _json({"now": _ms(self.now())})

    async def _control_state(self, request: web.Request) -> web.Response:
        self._require_loopback(request)
        now = self.now()
        positions = self.core.positions(now, DEFAULT_ACCOUNT) if not self._banned(now) else []
        orders = self.core.open_protective_orders(now, None, DEFAULT_ACCOUNT) if not self._banned(now) else []
        return _json(
            {
                "now": _ms(now),
                "requests_served": self.requests_served,
                "positions": [
                    {"symbol": p.symbol, "side": p.side.value, "quantity": _text(p.quantity)}
                    for p in positions
                ],
                "open_algo_orders": [
                    {
                        "symbol": o.symbol,
                        "clientAlgoId": o.client_order_id,
                        "orderType": o.type.value.upper(),
                        "side": o.side.value.upper(),
                        "quantity": _text(o.quantity),
                    }
                    for o in orders
                ],
            }
        )

    def _banned(self, now: float) -> bool:
        try:
            self.core.check_access(now, DEFAULT_ACCOUNT)
        except Banned:
            return True
        return False

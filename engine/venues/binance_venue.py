"""Binance USDⓈ-M through ccxt: algo (conditional) orders for stops, Binance's error codes and limits,
and its push streams (`binance_streams`), over the shared ccxt plumbing in `ccxt_venue`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection, Mapping
from dataclasses import replace
from decimal import Decimal
from typing import Any

from engine.clock import Clock
from engine.exchange.errors import NotFound, Retryable
from engine.exchange.port import (
    Balance,
    Capabilities,
    Market,
    MarkPrice,
    Order,
    OrderSide,
    OrderStatus,
    OrderType,
    PositionSide,
    RateBudget,
    RequestBudget,
    VenuePosition,
)
from engine.venues import binance_limits
from engine.venues.binance_streams import DEMO_WS_URL, PRODUCTION_WS_URL, BinanceStreams
from engine.venues.ccxt_venue import (
    _ZERO,
    BINANCEUSDM,
    CALLBACK_RATE_MAX,
    CALLBACK_RATE_MIN,
    CcxtVenue,
    CcxtVenueConfig,
    SymbolMap,
    _decimal,
    _positive,
    _rehost,
    _seconds,
    _wire,
)

BINANCE_MAX_CONDITIONAL_ORDERS = 200
BINANCE_DEFAULT_BUDGETS = (
    RateBudget(limit=binance_limits.ORDERS_PER_10_SECONDS, window_seconds=10.0),
    RateBudget(limit=binance_limits.ORDERS_PER_MINUTE, window_seconds=60.0),
)
BINANCE_DEFAULT_REQUEST_BUDGETS = (RequestBudget("weight", binance_limits.REQUEST_WEIGHT_PER_MINUTE, 60.0),)
# Binance's algo service can answer "does not exist" for an order it accepted moments ago
# (freqtrade#12681); a query within this long after a send proves nothing.
BINANCE_READ_AFTER_WRITE_SECONDS = 5.0
# The `recvWindow` sent with every signed request (Binance's own default and the most its docs recommend; ccxt
# sends 10 s unless told): a request that reaches the venue later than this after its timestamp is refused
# (-1021), never run. An entry of unknown outcome is proven absent only this long plus the read lag after its
# answer, and all that while it counts as a position without stops: 10 s of doubt, not 15.
BINANCE_RECV_WINDOW_MS = 5_000
DEFAULT_MAX_LEVERAGE = 125  # Binance publishes leverage brackets only on a private endpoint
_INTERVAL_SECONDS = {"SECOND": 1.0, "MINUTE": 60.0, "HOUR": 3600.0, "DAY": 86_400.0}


_BINANCE_ORDER_STATUS = {
    "NEW": OrderStatus.NEW,
    "PARTIALLY_FILLED": OrderStatus.NEW,
    "FILLED": OrderStatus.FILLED,
    "CANCELED": OrderStatus.CANCELED,
    "EXPIRED": OrderStatus.EXPIRED,
    "EXPIRED_IN_MATCH": OrderStatus.EXPIRED,
    "REJECTED": OrderStatus.EXPIRED,
}
_BINANCE_ORDER_TYPE = {
    "MARKET": OrderType.MARKET,
    "STOP_MARKET": OrderType.STOP_MARKET,
    "TRAILING_STOP_MARKET": OrderType.TRAILING_STOP_MARKET,
    "TAKE_PROFIT_MARKET": OrderType.TAKE_PROFIT_MARKET,
}


# Algo (conditional) order statuses. TRIGGERING / TRIGGERED: the order fired and is on its way through the
# matching engine: it protects nothing any more, and it is not over either. FINISHED: the child order it
# placed says how it ended (`_resolve_triggered`).
_BINANCE_ALGO_STATUS = {
    "NEW": OrderStatus.NEW,
    "TRIGGERING": OrderStatus.TRIGGERED,
    "TRIGGERED": OrderStatus.TRIGGERED,
    "FINISHED": OrderStatus.EXPIRED,
    "CANCELED": OrderStatus.CANCELED,
    "EXPIRED": OrderStatus.EXPIRED,
    "REJECTED": OrderStatus.EXPIRED,
}


_WORKING_ORDERS_KEPT = 10_000  # working algo orders remembered for cancels (2 per open position)


class BinanceUsdmVenue(CcxtVenue):
    kind = BINANCEUSDM
    _ccxt_id = "binanceusdm"

    def __init__(self, config: CcxtVenueConfig, *, clock: Clock | None = None) -> None:
        super().__init__(config, clock=clock)
        self._algo_ids: dict[str, bool] = {}  # client id -> is it an algo (conditional) order
        # Algo orders last seen working (placed, listed or fetched open), by client id: a cancel Binance
        # answers with success ended one of these, so its final state is known without asking again.
        self._working: dict[str, Order] = {}
        self._request_budgets: tuple[RequestBudget, ...] = BINANCE_DEFAULT_REQUEST_BUDGETS
        # Each symbol's leverage as the last positions read stated it, flat symbols included (V2 answers a
        # row for every symbol): `StatesLeverages`.
        self.stated_leverages: dict[str, int] = {}
        self._streams = BinanceStreams(
            ws_url=self._websocket_url(),
            settings=config.streams,
            session=self._stream_session,
            rest_marks=self.fetch_mark_prices,
            create_key=self._create_listen_key,
            keep_alive_key=self._keep_alive_listen_key,
            mark_poll_seconds=config.mark_poll_seconds,
            monotonic=self._clock.monotonic,
        )

    def _websocket_url(self) -> str:
        """The streams' host, derived from the configured URL exactly as the REST hosts are."""
        url = DEMO_WS_URL if self._config.testnet else PRODUCTION_WS_URL
        if self._config.base_url:
            return str(_rehost(url, self._config.base_url.rstrip("/")))
        return url

    def _exchange_options(self) -> dict[str, Any]:
        options = super()._exchange_options()
        options["options"] = {
            "defaultType": "swap",
            "fetchMarkets": {"types": ["linear"]},  # no spot/inverse/option hosts
            "fetchCurrencies": False,  # a private sapi call on another host
            "fetchMargins": False,
            "adjustForTimeDifference": True,  # -1021 otherwise, when the local clock drifts
            "warnOnFetchOpenOrdersWithoutSymbol": False,
            "disableFuturesSandboxWarning": True,
            "recvWindow": BINANCE_RECV_WINDOW_MS,
        }
        return options

    def _configure_urls(self) -> None:
        if not self._config.base_url and self._config.testnet:
            # ccxt retired Binance's futures sandbox in favour of demo trading (demo-fapi.binance.com).
            self._exchange.enable_demo_trading(True)
        super()._configure_urls()

    def capabilities(self) -> Capabilities:
        return Capabilities(
            native_trailing_stop=True,
            callback_rate_min=CALLBACK_RATE_MIN,
            callback_rate_max=CALLBACK_RATE_MAX,
            attach_stop_to_entry=False,
            max_conditional_orders=BINANCE_MAX_CONDITIONAL_ORDERS,
            order_rate_budgets=self._budgets or BINANCE_DEFAULT_BUDGETS,
            read_after_write_seconds=BINANCE_READ_AFTER_WRITE_SECONDS,
            request_window_seconds=BINANCE_RECV_WINDOW_MS / 1000,
            request_budgets=self._request_budgets,
        )

    # ---- pacing -----------------------------------------------------------------------------------------

    def _request_costs(self, method: str, path: str, params: Mapping[str, Any]) -> dict[str, int]:
        return {"weight": binance_limits.endpoint_cost(method, path).weight_for(params)}

    def _observe_limits(self, method: str, path: str, headers: Mapping[str, str]) -> None:
        assert self._pacing is not None
        lowered = {key.lower(): value for key, value in headers.items()}
        used = lowered.get(binance_limits.USED_WEIGHT_HEADER.lower())
        if used is not None:
            self._pacing.requests.observe("weight", int(used))
        orders = self._pacing.orders
        if orders is not None:
            for header, seconds in binance_limits.ORDER_COUNT_HEADERS.items():
                count = lowered.get(header.lower())
                if count is not None:
                    orders.observe(seconds, int(count))

    # ---- push streams (`engine.venues.binance_streams`) -------------------------------------------------

    async def _create_listen_key(self) -> str:
        answer = await self._call(self._exchange.fapiPrivatePostListenKey(), mutating=False)
        key = answer.get("listenKey") if isinstance(answer, dict) else None
        if not key:
            raise Retryable("binanceusdm: no listen key in the answer")
        return str(key)

    async def _keep_alive_listen_key(self) -> None:
        await self._call(self._exchange.fapiPrivatePutListenKey(), mutating=False)

    # ---- markets and market data ------------------------------------------------------------------------

    async def load_markets(self) -> Mapping[str, Market]:
        ex = self._exchange
        info = await self._call(ex.fapiPublicGetExchangeInfo(), mutating=False)
        rate_limits = info.get("rateLimits") or []
        self._budgets = _binance_order_budgets(rate_limits) or BINANCE_DEFAULT_BUDGETS
        self._request_budgets = _binance_request_budgets(rate_limits) or BINANCE_DEFAULT_REQUEST_BUDGETS
        if self._pacing is not None:
            self._pacing.requests.configure(self._request_budgets)
        loaded = await self._call(ex.load_markets(True), mutating=False)
        markets: dict[str, Market] = {}
        pairs: dict[str, str] = {}
        for unified, market in loaded.items():
            raw = market.get("info") or {}
            if not (market.get("linear") and market.get("swap") and market.get("settle") == "USDT"):
                continue
            parsed = _binance_market(raw, market)
            status = str(raw.get("status", "TRADING"))
            if parsed is not None and status != "TRADING":
                # Settling, delisting, halted: no entry goes there, but a position held on it is guarded.
                parsed = dataclasses.replace(parsed, trading=False, status=status)
            if parsed is not None:
                markets[parsed.symbol] = parsed
                pairs[parsed.symbol] = unified
        self._markets = markets
        self._symbols = SymbolMap(pairs)
        return dict(markets)

    async def fetch_mark_prices(self, symbols: Collection[str] | None = None) -> dict[str, MarkPrice]:
        await self._ensure_markets()
        wanted = None if symbols is None else set(symbols)
        if wanted is not None:
            for symbol in wanted:
                self._market(symbol)
        request = {"symbol": next(iter(wanted))} if wanted is not None and len(wanted) == 1 else {}
        rows = await self._read(lambda: self._exchange.fapiPublicGetPremiumIndex(request), "premiumIndex")
        rows = rows if isinstance(rows, list) else [rows]
        marks: dict[str, MarkPrice] = {}
        for row in rows:
            symbol = row.get("symbol")
            price = _positive(row.get("markPrice"))
            if symbol not in self._markets or price is None or (wanted is not None and symbol not in wanted):
                continue
            marks[symbol] = MarkPrice(symbol, price, _seconds(row.get("time"), time.time()))
        return marks

    # ---- account ----------------------------------------------------------------------------------------

    async def fetch_balance(self) -> Balance:
        rows = await self._read(self._exchange.fapiPrivateV2GetBalance, "balance")
        for row in rows:
            if row.get("asset") == "USDT":
                return Balance(
                    asset="USDT",
                    wallet_balance=_decimal(row.get("crossWalletBalance") or row.get("balance"), _ZERO),  # type: ignore[arg-type]
                    unrealized_pnl=_decimal(row.get("crossUnPnl"), _ZERO),  # type: ignore[arg-type]
                    available_balance=_decimal(row.get("availableBalance"), _ZERO),  # type: ignore[arg-type]
                )
        return Balance("USDT", _ZERO, _ZERO, _ZERO)

    async def fetch_positions(self, symbol: str | None = None) -> list[VenuePosition]:
        await self._ensure_markets()
        request = {} if symbol is None else {"symbol": self._market(symbol).symbol}
        rows = await self._read(
            lambda: self._exchange.fapiPrivateV2GetPositionRisk(request), "positionRisk", symbol=symbol
        )
        positions = []
        for row in rows:
            amount = _decimal(row.get("positionAmt"), _ZERO)
            symbol = row.get("symbol")
            if symbol in self._markets and row.get("leverage") is not None:
                # Flat symbols too: what the account is set to before a position opens (`stated_leverages`).
                self.stated_leverages[symbol] = int(_decimal(row.get("leverage"), Decimal(1)))  # type: ignore[arg-type]
            if not amount or symbol not in self._markets:
                continue
            hedge_side = row.get("positionSide", "BOTH")
            side = (
                PositionSide.LONG
                if (hedge_side == "LONG" or (hedge_side == "BOTH" and amount > 0))
                else PositionSide.SHORT
            )
            positions.append(
                VenuePosition(
                    symbol=symbol,
                    side=side,
                    quantity=abs(amount),  # type: ignore[arg-type]
                    entry_price=_decimal(row.get("entryPrice"), _ZERO),  # type: ignore[arg-type]
                    mark_price=_decimal(row.get("markPrice"), _ZERO),  # type: ignore[arg-type]
                    unrealized_pnl=_decimal(row.get("unRealizedProfit"), _ZERO),  # type: ignore[arg-type]
                    leverage=int(_decimal(row.get("leverage"), Decimal(1))),  # type: ignore[arg-type]
                    updated_at=_seconds(row.get("updateTime"), time.time()),
                    liquidation_price=_positive(row.get("liquidationPrice")),
                )
            )
        return positions

    async def fetch_open_protective_orders(self, symbol: str | None = None) -> list[Order]:
        await self._ensure_markets()
        unified = None if symbol is None else self._symbols.unified(symbol)
        found = await self._read(
            lambda: self._exchange.fetch_open_orders(unified, None, None, {"trigger": True}),
            "openAlgoOrders",
            symbol=symbol,
        )
        orders = []
        for item in found:
            info = item.get("info") or {}
            # The take-profits too (an operator's): they are open conditional orders under the same cap as
            # the stops, and counted there (left out, the engine admitted positions whose stops the venue
            # then refused, -4045). Nothing of ours is one.
            if (
                info.get("orderType") in ("STOP_MARKET", "TRAILING_STOP_MARKET", "TAKE_PROFIT_MARKET")
                and info.get("symbol") in self._markets
            ):
                order = self._note_working(self._algo_order(info, None))
                if order.is_open:  # a TRIGGERING stop is not protecting anything
                    orders.append(order)
        return orders

    async def set_leverage(self, symbol: str, leverage: int) -> int:
        await self._ensure_markets()
        self._market(symbol)
        answer = await self._call(
            self._exchange.fapiPrivatePostLeverage({"symbol": symbol, "leverage": leverage}),
            mutating=True,
            symbol=symbol,
        )
        return int(answer.get("leverage", leverage))

    # ---- orders -----------------------------------------------------------------------------------------

    async def create_market_order(
        self,
        symbol: str,
        side: OrderSide,
        quantity: Decimal,
        *,
        client_order_id: str,
        reduce_only: bool = False,
    ) -> Order:
        await self._check_order(symbol, quantity, client_order_id)
        params: dict[str, Any] = {"newClientOrderId": client_order_id}
        if reduce_only:
            params["reduceOnly"] = True
        self._algo_ids[client_order_id] = False
        placed = await self._call(
            self._exchange.create_order(
                self._symbols.unified(symbol), "market", side.value, _wire(quantity), None, params
            ),
            mutating=True,
            symbol=symbol,
            client_order_id=client_order_id,
        )
        order = self._regular_order(placed.get("info") or {})
        if order.status is OrderStatus.NEW:  # acknowledged before the fill: ask once more
            return await self._read_back(symbol, client_order_id, self.fetch_order(symbol, client_order_id))
        return order

    async def create_stop_market_order(
        self,
        symbol: str,
        side: OrderSide,
        quantity: Decimal,
        stop_price: Decimal,
        *,
        client_order_id: str,
    ) -> Order:
        await self._check_order(symbol, quantity, client_order_id, ("stop price", stop_price))
        params = {
            "triggerPrice": _wire(stop_price),
            "reduceOnly": True,
            "workingType": "MARK_PRICE",
            "clientAlgoId": client_order_id,
        }
        return await self._place_algo(symbol, side, quantity, params, client_order_id)

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
        await self._check_order(symbol, quantity, client_order_id, ("activation price", activation_price))
        self._require_callback(callback_rate)
        params: dict[str, Any] = {
            "trailingPercent": _wire(callback_rate),  # → callbackRate
            "reduceOnly": True,  # quantity + reduceOnly: Binance refuses closePosition on trailing orders
            "workingType": "MARK_PRICE",
            "clientAlgoId": client_order_id,
        }
        if activation_price is not None:
            params["activationPrice"] = _wire(activation_price)  # → activatePrice on the algo endpoint
        return await self._place_algo(symbol, side, quantity, params, client_order_id)

    async def _place_algo(
        self, symbol: str, side: OrderSide, quantity: Decimal, params: dict[str, Any], client_order_id: str
    ) -> Order:
        self._algo_ids[client_order_id] = True
        placed = await self._call(
            self._exchange.create_order(
                self._symbols.unified(symbol), "market", side.value, _wire(quantity), None, params
            ),
            mutating=True,
            symbol=symbol,
            client_order_id=client_order_id,
        )
        return self._note_working(self._algo_order(placed.get("info") or {}, None))

    def _note_working(self, order: Order) -> Order:
        if order.is_open:
            if len(self._working) >= _WORKING_ORDERS_KEPT:  # ids whose end we never saw: forget the oldest
                del self._working[next(iter(self._working))]
            self._working[order.client_order_id] = order
        else:
            self._working.pop(order.client_order_id, None)
        return order

    async def cancel_order(self, symbol: str, client_order_id: str) -> Order:
        await self._ensure_markets()
        unified = self._symbols.unified(symbol)
        if self._algo_ids.get(client_order_id) is False:
            cancel = self._exchange.cancel_order(None, unified, {"origClientOrderId": client_order_id})
        else:
            cancel = self._exchange.cancel_order(
                None, unified, {"trigger": True, "clientAlgoId": client_order_id}
            )
        # NotFound: already done (filled, expired, cancelled) or never placed; the order's state says which.
        try:
            await self._call(cancel, mutating=True, symbol=symbol, client_order_id=client_order_id)
        except NotFound:
            return await self.fetch_order(symbol, client_order_id)
        working = self._working.pop(client_order_id, None)
        if working is not None and self._algo_ids.get(client_order_id) is not False:
            # Binance answers an algo cancel with success only when it cancelled a working order: its end
            # is known (one round trip where asking again made two, on the path that closes a position).
            return replace(working, status=OrderStatus.CANCELED, updated_at=self._clock.now())
        return await self.fetch_order(symbol, client_order_id)

    async def fetch_order(self, symbol: str, client_order_id: str) -> Order:
        await self._ensure_markets()
        unified = self._symbols.unified(symbol)
        # An order this process sent is asked for in its own API's namespace only: a stop whose placement
        # was answered 500 cost a look-up of the regular orders with each of its own (half the weight of
        # a naked position's look-ups, for nothing). An id of unknown kind (a new process's) is tried in both.
        hint = self._algo_ids.get(client_order_id)
        attempts = (True, False) if hint is None else (hint,)
        missing: NotFound | None = None
        for algo in attempts:
            try:
                if algo:
                    found = await self._read(
                        lambda: self._exchange.fetch_order(
                            None, unified, {"trigger": True, "clientAlgoId": client_order_id}
                        ),
                        "algoOrder",
                        symbol=symbol,
                        client_order_id=client_order_id,
                    )
                    info = found.get("info") or {}
                    if info.get("symbol") != symbol:
                        raise NotFound(symbol, client_order_id)
                    self._algo_ids[client_order_id] = True
                    order = await self._resolve_triggered(self._algo_order(info, None), info, symbol)
                    return self._note_working(order)
                found = await self._read(
                    lambda: self._exchange.fetch_order(None, unified, {"origClientOrderId": client_order_id}),
                    "order",
                    symbol=symbol,
                    client_order_id=client_order_id,
                )
                info = found.get("info") or {}
                if info.get("symbol") != symbol:
                    raise NotFound(symbol, client_order_id)
                self._algo_ids[client_order_id] = False
                return self._regular_order(info)
            except NotFound as error:
                missing = error  # try the other API's namespace
        raise missing if missing is not None else NotFound(symbol, client_order_id)

    async def _resolve_triggered(self, order: Order, info: Mapping[str, Any], symbol: str) -> Order:
        """A triggered algo order's outcome lives on the regular order it placed (`actualOrderId`)."""
        status = info.get("algoStatus")
        child_id = str(info.get("actualOrderId") or "")
        if status not in ("TRIGGERED", "FINISHED") or not child_id:
            return order
        try:
            child = await self._read(
                lambda: self._exchange.fetch_order(child_id, self._symbols.unified(symbol)),
                "order",
                symbol=symbol,
                client_order_id=order.client_order_id,
            )
        except NotFound:
            return order
        raw = child.get("info") or {}
        filled = _decimal(raw.get("executedQty"), _ZERO)
        child_status = _BINANCE_ORDER_STATUS.get(raw.get("status", ""), OrderStatus.NEW)
        if not child_status.is_final:
            child_status = OrderStatus.TRIGGERED  # still working through the matching engine
        return Order(
            client_order_id=order.client_order_id,
            venue_order_id=order.venue_order_id,
            symbol=order.symbol,
            side=order.side,
            type=order.type,
            status=child_status,
            quantity=order.quantity,
            filled_quantity=filled,  # type: ignore[arg-type]
            average_price=_positive(raw.get("avgPrice")) if filled else None,
            reduce_only=order.reduce_only,
            stop_price=order.stop_price,
            activation_price=order.activation_price,
            callback_rate=order.callback_rate,
            created_at=order.created_at,
            updated_at=_seconds(raw.get("updateTime"), order.updated_at),
        )

    # ---- parsing ----------------------------------------------------------------------------------------

    @staticmethod
    def _regular_order(info: Mapping[str, Any]) -> Order:
        filled = _decimal(info.get("executedQty"), _ZERO)
        created = _seconds(info.get("time") or info.get("updateTime"), time.time())
        return Order(
            client_order_id=str(info.get("clientOrderId", "")),
            venue_order_id=str(info.get("orderId", "")),
            symbol=str(info.get("symbol", "")),
            side=OrderSide.BUY if info.get("side") == "BUY" else OrderSide.SELL,
            type=_BINANCE_ORDER_TYPE.get(info.get("origType") or info.get("type", ""), OrderType.MARKET),
            status=_BINANCE_ORDER_STATUS.get(info.get("status", ""), OrderStatus.NEW),
            quantity=_decimal(info.get("origQty"), _ZERO),  # type: ignore[arg-type]
            filled_quantity=filled,  # type: ignore[arg-type]
            average_price=_positive(info.get("avgPrice")) if filled else None,
            reduce_only=bool(info.get("reduceOnly", False)),
            stop_price=_positive(info.get("stopPrice")),
            activation_price=_positive(info.get("activatePrice")),
            callback_rate=_positive(info.get("priceRate")),
            created_at=created,
            updated_at=_seconds(info.get("updateTime"), created),
        )

    @staticmethod
    def _algo_order(info: Mapping[str, Any], _child: Mapping[str, Any] | None) -> Order:
        status_text = info.get("algoStatus", "NEW")
        status = _BINANCE_ALGO_STATUS.get(status_text, OrderStatus.NEW)
        order_type = _BINANCE_ORDER_TYPE.get(info.get("orderType", ""), OrderType.STOP_MARKET)
        created = _seconds(info.get("createTime"), time.time())
        return Order(
            client_order_id=str(info.get("clientAlgoId", "")),
            venue_order_id=str(info.get("algoId", "")),
            symbol=str(info.get("symbol", "")),
            side=OrderSide.BUY if info.get("side") == "BUY" else OrderSide.SELL,
            type=order_type,
            status=status,
            quantity=_decimal(info.get("quantity"), _ZERO),  # type: ignore[arg-type]
            filled_quantity=_ZERO,
            average_price=None,
            reduce_only=bool(info.get("reduceOnly", True)) or bool(info.get("closePosition", False)),
            stop_price=_positive(info.get("triggerPrice"))
            if order_type in (OrderType.STOP_MARKET, OrderType.TAKE_PROFIT_MARKET)
            else None,
            activation_price=_positive(info.get("activatePrice")),
            callback_rate=_positive(info.get("callbackRate")),
            created_at=created,
            # A fired order's time is when it fired (`triggerTime`): what the patience with a stop
            # sitting TRIGGERING counts from.
            updated_at=_seconds(
                (info.get("triggerTime") if status is OrderStatus.TRIGGERED else None)
                or info.get("updateTime"),
                created,
            ),
        )


def _binance_rate_limits(rate_limits: list[Mapping[str, Any]], kind: str) -> list[tuple[int, float]]:
    """(limit, window seconds) of each `exchangeInfo.rateLimits` entry of `kind`, shortest window first."""
    found = []
    for entry in rate_limits:
        if entry.get("rateLimitType") != kind:
            continue
        seconds = _INTERVAL_SECONDS.get(str(entry.get("interval", "")))
        try:
            limit, count = int(entry.get("limit", 0)), int(entry.get("intervalNum", 1))
        except (TypeError, ValueError):
            continue
        if seconds is not None and limit > 0 and count > 0:
            found.append((limit, seconds * count))
    return sorted(found, key=lambda item: item[1])


def _binance_order_budgets(rate_limits: list[Mapping[str, Any]]) -> tuple[RateBudget, ...]:
    return tuple(RateBudget(limit, seconds) for limit, seconds in _binance_rate_limits(rate_limits, "ORDERS"))


def _binance_request_budgets(rate_limits: list[Mapping[str, Any]]) -> tuple[RequestBudget, ...]:
    """The IP weight budget (the one-minute window the `X-MBX-USED-WEIGHT-1M` header reports)."""
    return tuple(
        RequestBudget("weight", limit, seconds)
        for limit, seconds in _binance_rate_limits(rate_limits, "REQUEST_WEIGHT")
        if seconds == 60.0
    )


def _binance_market(raw: Mapping[str, Any], market: Mapping[str, Any]) -> Market | None:
    filters = {f.get("filterType"): f for f in raw.get("filters", [])}
    tick = _positive(filters.get("PRICE_FILTER", {}).get("tickSize"))
    step = _positive(filters.get("LOT_SIZE", {}).get("stepSize"))
    if tick is None or step is None:
        return None
    min_quantity = _positive(filters.get("LOT_SIZE", {}).get("minQty")) or step
    min_notional = _decimal(filters.get("MIN_NOTIONAL", {}).get("notional"), _ZERO)
    leverage = ((market.get("limits") or {}).get("leverage") or {}).get("max")
    return Market(
        symbol=str(raw.get("symbol")),
        base_asset=str(raw.get("baseAsset", market.get("base", ""))),
        quote_asset=str(raw.get("quoteAsset", market.get("quote", ""))),
        tick_size=tick,
        step_size=step,
        min_quantity=max(min_quantity, step),
        min_notional=min_notional,  # type: ignore[arg-type]
        max_leverage=int(leverage) if leverage else DEFAULT_MAX_LEVERAGE,
    )


__all__ = ["BinanceUsdmVenue"]

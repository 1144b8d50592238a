"""The exchange port for Bybit linear perpetuals (v5, category linear) over the shared ccxt plumbing.

Bybit specifics: the hard stop and the trailing stop are position-level
(`POST /v5/position/trading-stop`: `stopLoss` with `slTriggerBy=MarkPrice`, `trailingStop` as a price
distance with `activePrice`, `positionIdx` for one-way or hedge mode). They carry no client order id on
Bybit's side; the adapter keeps the caller's id and answers `fetch_order` from the position's current
stop fields. Setting a position stop again replaces it, so a retried call can never leave two stops.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from engine.clock import Clock
from engine.exchange.errors import DuplicateClientOrderId, NotFound, RejectCode, Rejected, Retryable
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
from engine.venues import bybit_limits
from engine.venues.ccxt_venue import (
    _ZERO,
    BYBIT,
    CALLBACK_RATE_MAX,
    CALLBACK_RATE_MIN,
    CcxtVenue,
    CcxtVenueConfig,
    SymbolMap,
    _decimal,
    _positive,
    _seconds,
    _wire,
)

BYBIT_DEFAULT_BUDGETS = (
    RateBudget(limit=bybit_limits.ENDPOINT_LIMITS_PER_SECOND["/v5/order/create"], window_seconds=1.0),
)
BYBIT_REQUEST_BUDGETS = (
    RequestBudget(bybit_limits.IP_BUDGET_KEY, bybit_limits.IP_REQUESTS_PER_5_SECONDS, 5.0),
    *(RequestBudget(path, limit, 1.0) for path, limit in bybit_limits.ENDPOINT_LIMITS_PER_SECOND.items()),
)

# ---- Bybit linear ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class _PositionStop:
    """A position-level stop we set on Bybit, remembered under the caller's client id."""

    client_order_id: str
    symbol: str
    side: OrderSide
    type: OrderType
    quantity: Decimal
    stop_price: Decimal | None
    activation_price: Decimal | None
    callback_rate: Decimal | None
    distance: Decimal | None
    created_at: float
    status: OrderStatus = OrderStatus.NEW
    updated_at: float = 0.0


class BybitLinearVenue(CcxtVenue):
    kind = BYBIT
    _ccxt_id = "bybit"

    def __init__(self, config: CcxtVenueConfig, *, clock: Clock | None = None) -> None:
        super().__init__(config, clock=clock)
        self._stops: dict[str, _PositionStop] = {}
        self._hedge_mode: bool | None = None

    def _exchange_options(self) -> dict[str, Any]:
        options = super()._exchange_options()
        options["options"] = {
            "defaultType": "swap",
            "defaultSubType": "linear",
            "fetchMarkets": {"types": ["linear"]},
            "fetchCurrencies": False,
            "adjustForTimeDifference": False,
            "enableUnifiedAccount": True,
            "enableUnifiedMargin": False,
        }
        return options

    def _configure_urls(self) -> None:
        if not self._config.base_url and self._config.testnet:
            self._exchange.set_sandbox_mode(True)  # api-testnet.bybit.com
        super()._configure_urls()

    def capabilities(self) -> Capabilities:
        return Capabilities(
            native_trailing_stop=True,
            callback_rate_min=CALLBACK_RATE_MIN,
            callback_rate_max=CALLBACK_RATE_MAX,
            attach_stop_to_entry=False,
            max_conditional_orders=10_000,  # position-level stops are not orders on Bybit
            order_rate_budgets=BYBIT_DEFAULT_BUDGETS,
            request_budgets=BYBIT_REQUEST_BUDGETS,
        )

    def _request_costs(self, method: str, path: str, params: Mapping[str, Any]) -> dict[str, int]:
        costs = {bybit_limits.IP_BUDGET_KEY: 1}
        if path in bybit_limits.ENDPOINT_LIMITS_PER_SECOND:
            costs[path] = 1
        return costs

    def _observe_limits(self, method: str, path: str, headers: Mapping[str, str]) -> None:
        assert self._pacing is not None
        lowered = {key.lower(): value for key, value in headers.items()}
        limit = lowered.get(bybit_limits.LIMIT_HEADER.lower())
        left = lowered.get(bybit_limits.LIMIT_STATUS_HEADER.lower())
        if limit is not None and left is not None and path in bybit_limits.ENDPOINT_LIMITS_PER_SECOND:
            self._pacing.requests.observe(path, max(0, int(limit) - int(left)), limit=int(limit))

    async def load_markets(self) -> Mapping[str, Market]:
        loaded = await self._call(self._exchange.load_markets(True), mutating=False)
        markets: dict[str, Market] = {}
        pairs: dict[str, str] = {}
        for unified, market in loaded.items():
            raw = market.get("info") or {}
            if not (market.get("linear") and market.get("swap") and market.get("settle") == "USDT"):
                continue
            if raw.get("status", "Trading") != "Trading":
                continue
            price_filter = raw.get("priceFilter") or {}
            lot = raw.get("lotSizeFilter") or {}
            tick, step = _positive(price_filter.get("tickSize")), _positive(lot.get("qtyStep"))
            if tick is None or step is None:
                continue
            leverage = _decimal((raw.get("leverageFilter") or {}).get("maxLeverage"), Decimal(1))
            symbol = str(raw.get("symbol"))
            markets[symbol] = Market(
                symbol=symbol,
                base_asset=str(raw.get("baseCoin", market.get("base", ""))),
                quote_asset=str(raw.get("quoteCoin", market.get("quote", ""))),
                tick_size=tick,
                step_size=step,
                min_quantity=max(_positive(lot.get("minOrderQty")) or step, step),
                min_notional=_decimal(lot.get("minNotionalValue"), _ZERO),  # type: ignore[arg-type]
                max_leverage=max(1, int(leverage)),  # type: ignore[arg-type]
            )
            pairs[symbol] = unified
        self._markets = markets
        self._symbols = SymbolMap(pairs)
        return dict(markets)

    async def fetch_mark_prices(self, symbols: Collection[str] | None = None) -> dict[str, MarkPrice]:
        await self._ensure_markets()
        wanted = None if symbols is None else set(symbols)
        request: dict[str, Any] = {"category": "linear"}
        if wanted is not None and len(wanted) == 1:
            request["symbol"] = next(iter(wanted))
        answer = await self._call(self._exchange.publicGetV5MarketTickers(request), mutating=False)
        stamp = _seconds(answer.get("time"), time.time())
        marks = {}
        for row in (answer.get("result") or {}).get("list", []):
            symbol, price = row.get("symbol"), _positive(row.get("markPrice"))
            if symbol in self._markets and price is not None and (wanted is None or symbol in wanted):
                marks[symbol] = MarkPrice(symbol, price, stamp)
        return marks

    async def fetch_balance(self) -> Balance:
        answer = await self._call(
            self._exchange.privateGetV5AccountWalletBalance({"accountType": "UNIFIED", "coin": "USDT"}),
            mutating=False,
        )
        for account in (answer.get("result") or {}).get("list", []):
            for coin in account.get("coin", []):
                if coin.get("coin") == "USDT":
                    wallet = _decimal(coin.get("walletBalance"), _ZERO)
                    unrealized = _decimal(coin.get("unrealisedPnl"), _ZERO)
                    available = _decimal(account.get("totalAvailableBalance"), None)
                    if available is None:
                        available = _decimal(coin.get("availableToWithdraw"), _ZERO)
                    return Balance("USDT", wallet, unrealized, available)  # type: ignore[arg-type]
        return Balance("USDT", _ZERO, _ZERO, _ZERO)

    async def _position_rows(self, symbol: str | None = None) -> list[Mapping[str, Any]]:
        request: dict[str, Any] = {"category": "linear"}
        if symbol is None:
            request["settleCoin"] = "USDT"
        else:
            request["symbol"] = symbol
        answer = await self._call(
            self._exchange.privateGetV5PositionList(request), mutating=False, symbol=symbol
        )
        rows = [
            row for row in (answer.get("result") or {}).get("list", []) if _decimal(row.get("size"), _ZERO)
        ]
        if rows:
            self._hedge_mode = any(int(row.get("positionIdx", 0) or 0) != 0 for row in rows)
        return rows

    async def fetch_positions(self, symbol: str | None = None) -> list[VenuePosition]:
        await self._ensure_markets()
        positions = []
        for row in await self._position_rows(symbol):
            symbol = row.get("symbol")
            if symbol not in self._markets:
                continue
            positions.append(
                VenuePosition(
                    symbol=symbol,
                    side=PositionSide.LONG if row.get("side") == "Buy" else PositionSide.SHORT,
                    quantity=_decimal(row.get("size"), _ZERO),  # type: ignore[arg-type]
                    entry_price=_decimal(row.get("avgPrice"), _ZERO),  # type: ignore[arg-type]
                    mark_price=_decimal(row.get("markPrice"), _ZERO),  # type: ignore[arg-type]
                    unrealized_pnl=_decimal(row.get("unrealisedPnl"), _ZERO),  # type: ignore[arg-type]
                    leverage=int(_decimal(row.get("leverage"), Decimal(1))),  # type: ignore[arg-type]
                    updated_at=_seconds(row.get("updatedTime"), time.time()),
                )
            )
        return positions

    async def fetch_open_protective_orders(self, symbol: str | None = None) -> list[Order]:
        await self._ensure_markets()
        rows = await self._position_rows(symbol)
        orders = []
        for row in rows:
            native = row.get("symbol")
            if native not in self._markets:
                continue
            for stop in self._stops_for(native):
                current = self._current(stop, row)
                if current.is_open:
                    orders.append(current)
        return orders

    async def set_leverage(self, symbol: str, leverage: int) -> int:
        await self._ensure_markets()
        market = self._market(symbol)
        if not 1 <= leverage <= market.max_leverage:
            raise Rejected(
                RejectCode.INVALID_LEVERAGE, f"leverage {leverage} outside 1..{market.max_leverage}"
            )
        try:
            await self._call(
                self._exchange.privatePostV5PositionSetLeverage(
                    {
                        "category": "linear",
                        "symbol": symbol,
                        "buyLeverage": str(leverage),
                        "sellLeverage": str(leverage),
                    }
                ),
                mutating=True,
                symbol=symbol,
            )
        except Rejected as refused:
            if refused.code != 110043:  # "leverage not modified": already set
                raise
        return leverage

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
        request = {
            "category": "linear",
            "symbol": symbol,
            "side": "Buy" if side is OrderSide.BUY else "Sell",
            "orderType": "Market",
            "qty": _wire(quantity),
            "orderLinkId": client_order_id,
            "positionIdx": self._position_idx(side, reduce_only),
        }
        if reduce_only:
            request["reduceOnly"] = True
        await self._call(
            self._exchange.privatePostV5OrderCreate(request),
            mutating=True,
            symbol=symbol,
            client_order_id=client_order_id,
        )
        return await self._fetch_regular(symbol, client_order_id)

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
        self._require_unused(client_order_id)
        request = {
            "category": "linear",
            "symbol": symbol,
            "tpslMode": "Full",
            "stopLoss": _wire(stop_price),
            "slTriggerBy": "MarkPrice",
            "positionIdx": self._position_idx(side, reduce_only=True),
        }
        await self._call(
            self._exchange.privatePostV5PositionTradingStop(request),
            mutating=True,
            symbol=symbol,
            client_order_id=client_order_id,
        )
        now = time.time()
        stop = _PositionStop(
            client_order_id,
            symbol,
            side,
            OrderType.STOP_MARKET,
            quantity,
            stop_price,
            None,
            None,
            None,
            now,
            updated_at=now,
        )
        self._remember(stop)
        return self._snapshot(stop)

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
        await self._ensure_markets()
        market = self._market(symbol)
        self._require_grid(market, quantity, ("activation price", activation_price))
        self._require_client_order_id(client_order_id)
        self._require_callback(callback_rate)
        self._require_unused(client_order_id)
        reference = activation_price
        if reference is None:
            marks = await self.fetch_mark_prices([symbol])
            if symbol not in marks:
                raise Retryable(f"{self.kind} {symbol}: no mark price to size the trailing distance")
            reference = marks[symbol].price
        # Bybit trails by a price distance: the callback percent of the price it arms at, on the tick grid.
        distance = max(market.round_price(reference * callback_rate / 100, ROUND_HALF_UP), market.tick_size)
        request: dict[str, Any] = {
            "category": "linear",
            "symbol": symbol,
            "tpslMode": "Full",
            "trailingStop": _wire(distance),
            "positionIdx": self._position_idx(side, reduce_only=True),
        }
        if activation_price is not None:
            request["activePrice"] = _wire(activation_price)
        await self._call(
            self._exchange.privatePostV5PositionTradingStop(request),
            mutating=True,
            symbol=symbol,
            client_order_id=client_order_id,
        )
        now = time.time()
        stop = _PositionStop(
            client_order_id,
            symbol,
            side,
            OrderType.TRAILING_STOP_MARKET,
            quantity,
            None,
            activation_price,
            callback_rate,
            distance,
            now,
            updated_at=now,
        )
        self._remember(stop)
        return self._snapshot(stop)

    async def cancel_order(self, symbol: str, client_order_id: str) -> Order:
        await self._ensure_markets()
        stop = self._stops.get(client_order_id)
        if stop is None or stop.symbol != symbol:
            return await self._fetch_regular(symbol, client_order_id)
        rows = await self._position_rows(symbol)
        current = self._current(stop, rows[0] if rows else None)
        if not current.is_open:
            return current
        field_name = "stopLoss" if stop.type is OrderType.STOP_MARKET else "trailingStop"
        await self._call(
            self._exchange.privatePostV5PositionTradingStop(
                {
                    "category": "linear",
                    "symbol": symbol,
                    "tpslMode": "Full",
                    field_name: "0",  # 0 removes the stop
                    "positionIdx": self._position_idx(stop.side, reduce_only=True),
                }
            ),
            mutating=True,
            symbol=symbol,
            client_order_id=client_order_id,
        )
        stop.status, stop.updated_at = OrderStatus.CANCELED, time.time()
        return self._snapshot(stop)

    async def fetch_order(self, symbol: str, client_order_id: str) -> Order:
        await self._ensure_markets()
        stop = self._stops.get(client_order_id)
        if stop is not None and stop.symbol == symbol:
            rows = await self._position_rows(symbol)
            return self._current(stop, rows[0] if rows else None)
        return await self._fetch_regular(symbol, client_order_id)

    # ---- Bybit internals --------------------------------------------------------------------------------

    def _position_idx(self, side: OrderSide, reduce_only: bool) -> int:
        """0 in one-way mode; in hedge mode 1 (long side) / 2 (short side) of the position concerned."""
        if not self._hedge_mode:
            return 0
        buys_long = side is OrderSide.BUY
        long_position = buys_long != reduce_only
        return 1 if long_position else 2

    def _require_unused(self, client_order_id: str) -> None:
        if client_order_id in self._stops:
            raise DuplicateClientOrderId(client_order_id)

    def _remember(self, stop: _PositionStop) -> None:
        # A new position stop of a kind replaces the previous one of that kind on the same position.
        for other in self._stops_for(stop.symbol):
            if other.type is stop.type and other.status is OrderStatus.NEW:
                other.status, other.updated_at = OrderStatus.CANCELED, stop.created_at
        self._stops[stop.client_order_id] = stop

    def _stops_for(self, symbol: str) -> list[_PositionStop]:
        return [stop for stop in self._stops.values() if stop.symbol == symbol]

    def _current(self, stop: _PositionStop, row: Mapping[str, Any] | None) -> Order:
        """The stop's state from the position's fields: gone with the position → it fired (or was closed)."""
        if stop.status is OrderStatus.NEW:
            if row is None or not _decimal(row.get("size"), _ZERO):
                stop.status, stop.updated_at = OrderStatus.FILLED, time.time()
            else:
                field_name = "stopLoss" if stop.type is OrderType.STOP_MARKET else "trailingStop"
                if not _positive(row.get(field_name)):
                    stop.status, stop.updated_at = OrderStatus.CANCELED, time.time()
        return self._snapshot(stop)

    @staticmethod
    def _snapshot(stop: _PositionStop) -> Order:
        filled = stop.quantity if stop.status is OrderStatus.FILLED else _ZERO
        return Order(
            client_order_id=stop.client_order_id,
            venue_order_id=f"{stop.symbol}:{'sl' if stop.type is OrderType.STOP_MARKET else 'ts'}",
            symbol=stop.symbol,
            side=stop.side,
            type=stop.type,
            status=stop.status,
            quantity=stop.quantity,
            filled_quantity=filled,
            average_price=None,
            reduce_only=True,
            stop_price=stop.stop_price,
            activation_price=stop.activation_price,
            callback_rate=stop.callback_rate,
            created_at=stop.created_at,
            updated_at=stop.updated_at or stop.created_at,
        )

    async def _fetch_regular(self, symbol: str, client_order_id: str) -> Order:
        request = {"category": "linear", "symbol": symbol, "orderLinkId": client_order_id}
        for method in (self._exchange.privateGetV5OrderRealtime, self._exchange.privateGetV5OrderHistory):
            answer = await self._call(
                method(request), mutating=False, symbol=symbol, client_order_id=client_order_id
            )
            rows = (answer.get("result") or {}).get("list", [])
            if rows:
                return _bybit_order(rows[0])
        raise NotFound(symbol, client_order_id)


_BYBIT_ORDER_STATUS = {
    "New": OrderStatus.NEW,
    "PartiallyFilled": OrderStatus.NEW,
    "Untriggered": OrderStatus.NEW,
    "Created": OrderStatus.NEW,
    "Filled": OrderStatus.FILLED,
    "Cancelled": OrderStatus.CANCELED,
    "PartiallyFilledCanceled": OrderStatus.CANCELED,
    "Deactivated": OrderStatus.CANCELED,
    "Rejected": OrderStatus.EXPIRED,
    "Triggered": OrderStatus.NEW,
}


def _bybit_order(row: Mapping[str, Any]) -> Order:
    filled = _decimal(row.get("cumExecQty"), _ZERO)
    created = _seconds(row.get("createdTime"), time.time())
    return Order(
        client_order_id=str(row.get("orderLinkId", "")),
        venue_order_id=str(row.get("orderId", "")),
        symbol=str(row.get("symbol", "")),
        side=OrderSide.BUY if row.get("side") == "Buy" else OrderSide.SELL,
        type=OrderType.MARKET,
        status=_BYBIT_ORDER_STATUS.get(str(row.get("orderStatus", "")), OrderStatus.NEW),
        quantity=_decimal(row.get("qty"), _ZERO),  # type: ignore[arg-type]
        filled_quantity=filled,  # type: ignore[arg-type]
        average_price=_positive(row.get("avgPrice")) if filled else None,
        reduce_only=bool(row.get("reduceOnly", False)),
        stop_price=None,
        activation_price=None,
        callback_rate=None,
        created_at=created,
        updated_at=_seconds(row.get("updatedTime"), created),
    )


__all__ = ["BYBIT_DEFAULT_BUDGETS", "BYBIT_REQUEST_BUDGETS", "BybitLinearVenue"]

"""The exchange port for Bybit linear perpetuals (v5, category linear) over the shared ccxt plumbing.

Bybit specifics: the hard stop and the trailing stop are position-level
(`POST /v5/position/trading-stop`: `stopLoss` with `slTriggerBy=MarkPrice`, `trailingStop` as a price
distance with `activePrice`, `positionIdx` for one-way or hedge mode). They carry no client order id on
Bybit's side; the adapter keeps the caller's id and answers `fetch_order` from the position's current
stop fields. Setting a position stop again replaces it, so a retried call can never leave two stops.

One trading-stop call takes `stopLoss` and `trailingStop` together. The hard stop that replaces the one
that rode on the entry (corrected from the fill) is therefore not a call of its own when the position's
trailing stop is on its way: it waits for that call (`RIDE_WAIT_SECONDS` at most) and rides in it, sent
in the same request; the attached stop protects the position meanwhile. Should the combined call be
refused, each stop is sent alone and gets its own verdict.

Anyone with the account's key (Bybit's web UI, another tool) can set those fields to other values. A field
holding a value we did not ask for (another stop price, another trailing distance) is not our stop: it is
not listed among our open stops, a look-up of ours finds it ended, and the account stream tells it
cancelled, so the engine sets its own again. What we asked for is what the adapter last sent for that
position (the working stop, or one still on its way, so that our own moves never read as someone else's),
compared on the tick grid.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import time
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from decimal import ROUND_HALF_UP, Decimal
from functools import partial
from typing import Any

from engine.clock import Clock
from engine.exchange.errors import (
    DuplicateClientOrderId,
    ExchangeError,
    FailureClass,
    NotFound,
    OutcomeUnknown,
    RejectCode,
    Rejected,
    Retryable,
)
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
from engine.pacing import CallTicket, current_ticket
from engine.venues import bybit_limits
from engine.venues.bybit_streams import (
    PRODUCTION_PRIVATE_URL,
    PRODUCTION_PUBLIC_URL,
    TESTNET_PRIVATE_URL,
    TESTNET_PUBLIC_URL,
    BybitStreams,
)
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
    _rehost,
    _seconds,
    _wire,
)

# The `recv_window` sent with every signed request (ccxt's default, set here so the engine knows it): a request
# that reaches the venue later than this after its timestamp is refused (10002), never run.
BYBIT_RECV_WINDOW_MS = 5_000
BYBIT_DEFAULT_BUDGETS = (
    RateBudget(limit=bybit_limits.ENDPOINT_LIMITS_PER_SECOND["/v5/order/create"], window_seconds=1.0),
)
# The stops are position fields set by trading-stop, counted in that endpoint's own rolling second.
BYBIT_PROTECTIVE_BUDGETS = (
    RateBudget(
        limit=bybit_limits.ENDPOINT_LIMITS_PER_SECOND["/v5/position/trading-stop"], window_seconds=1.0
    ),
)
BYBIT_REQUEST_BUDGETS = (
    RequestBudget(bybit_limits.IP_BUDGET_KEY, bybit_limits.IP_REQUESTS_PER_5_SECONDS, 5.0),
    # Bybit counts each endpoint's rolling second at the request's arrival: sends are spread, not burst.
    *(
        RequestBudget(path, limit, 1.0, spread=True)
        for path, limit in bybit_limits.ENDPOINT_LIMITS_PER_SECOND.items()
    ),
)

logger = logging.getLogger(__name__)

# ---- Bybit linear ---------------------------------------------------------------------------------------


# Bybit keeps no client id for a position stop; the engine's ids name their purpose (protection.order_ids:
# `…-sl<n>` a hard stop, `…-ts<n>` a trailing stop), which is how a new process finds which of the
# position's stops an id it persisted stands for. Ids outside that scheme are never adopted.
_STOP_KIND_IN_ID = re.compile(r"-(sl|ts)\d+$")
_PARAMS_ERROR = 10001  # trading-stop on a flat position: "can not set tp/sl/ts for zero position"
_NOT_MODIFIED = 34040  # trading-stop: the values sent are the ones the position holds already
_POSITION_PAGE = 200  # position/list: limit 1..200 (default 20), then nextPageCursor
_ORDER_PAGE = 50  # order/realtime: limit 1..50
_EXECUTION_PAGE = 100  # execution/list: limit 1..100
RIDE_WAIT_SECONDS = 2.0  # a corrected hard stop waits this long at most for its trailing stop's call
_TRADING_STOP_PATH = "/v5/position/trading-stop"
# Instrument statuses Bybit's default list leaves out that can still hold a position (a settlement, a
# delisting): loaded beside it, no entry goes there (`Market.trading`), a position held there is guarded.
HELD_ONLY_STATUSES = ("Settling", "Delivering")
_CLOCK_SLACK_SECONDS = 1.0  # the venue's clock against ours, when a venue time is compared with our own
# How long after one of our stops replaced another in a position's field the replaced value may still be read
# there without alarm: a read lagging our own write, or a late stream row. Later, it is not what we asked for.
_EARLIER_VALUE_SECONDS = 5.0
_MERGED_REMEMBERED = 1024  # hard stops remembered as sent in another call (`rode_in_call`)
_FIELD = {OrderType.STOP_MARKET: "stopLoss", OrderType.TRAILING_STOP_MARKET: "trailingStop"}
_STOP_ORDER_TYPE = {OrderType.STOP_MARKET: "StopLoss", OrderType.TRAILING_STOP_MARKET: "TrailingStop"}


@dataclass(slots=True)
class _PositionStop:
    """A position-level stop on Bybit, remembered under the caller's client id.

    `confirmed` is False while the trading-stop call that set it has no answer yet (or lost it): until the
    position shows the value, the stop may not exist."""

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
    venue_order_id: str = ""
    confirmed: bool = True
    filled_quantity: Decimal = _ZERO
    average_price: Decimal | None = None
    from_entry: bool = False  # rode on an entry this process sent and saw filled
    # The value someone else set in the position's field in its place (it is then not ours): said once.
    displaced_by: Decimal | None = None


@dataclass(frozen=True, slots=True)
class _RecordedStop:
    """What an earlier process recorded a stop of ours was set to (`BybitLinearVenue.expect_recorded`)."""

    stop_price: Decimal | None
    callback_rate: Decimal | None
    activation_price: Decimal | None
    side: OrderSide | None = None  # the side that closes its position (its order's side)
    distance: Decimal | None = None  # a trailing stop's distance as it was taken (`Order.trail_distance`)
    symbol: str | None = None  # its position's (a start's list of open stops names it: see there)
    # When its record was written (epoch; before it was sent): a fill of its kind since then is its own.
    recorded_at: float | None = None


@dataclass(slots=True, eq=False)
class _Rider:
    """A hard stop riding in its position's trailing-stop call: its fields, and how the call ended for
    it (its order; None: go alone; or the call's error)."""

    stop: _PositionStop
    fields: dict[str, Any]
    done: asyncio.Future[Order | None]
    ticket: CallTicket | None
    merged: bool = False


@dataclass(slots=True, eq=False)
class _Carrier:
    """A trailing-stop call not sent yet: the hard stop that joins it goes out in its request."""

    key: tuple[str, OrderSide]
    rider: _Rider | None = None  # one: a position has one hard stop
    sent: bool = False


def _field_stop(
    client_order_id: str,
    symbol: str,
    side: OrderSide,
    order_type: OrderType,
    row: Mapping[str, Any],
    value: Decimal,
    *,
    activation_price: Decimal | None = None,
    callback_rate: Decimal | None = None,
) -> _PositionStop:
    """A stop of ours named from its position's row (a new process): `value` is what its field holds for
    it, the hard stop's price or the trailing distance; a trailing stop's activation and callback, if known."""
    hard = order_type is OrderType.STOP_MARKET
    return _PositionStop(
        client_order_id,
        symbol,
        side,
        order_type,
        _decimal(row.get("size"), _ZERO),  # type: ignore[arg-type]
        value if hard else None,
        None if hard else activation_price,
        None if hard else callback_rate,
        None if hard else value,
        time.time(),
    )


def _on_side(row: Mapping[str, Any], side: OrderSide) -> bool:
    """A stop order's (or its execution's) row is on `side`, the side closing our position: in hedge mode
    the other position's stop of the same kind is not ours (its id, its price, its fill). A row without a
    side says nothing against it."""
    shown = row.get("side")
    return not shown or shown == ("Sell" if side is OrderSide.SELL else "Buy")


def _trailing_distance(market: Market, reference: Decimal, callback_rate: Decimal) -> Decimal:
    """Bybit trails by a price distance: the callback percent of the price it arms at, on the tick grid."""
    return max(market.round_price(reference * callback_rate / 100, ROUND_HALF_UP), market.tick_size)


def _our_distance(
    market: Market,
    value: Decimal,
    callback_rate: Decimal,
    activation_price: Decimal | None,
    row: Mapping[str, Any],
) -> bool:
    """`value`, a position's trailing distance, is the one our trailing stop would have. It went out on
    the tick grid of its day (Bybit changes a symbol's tick size and keeps the stops it holds), an unknown
    tick off the exact callback of its activation: within a tenth of that (or a tick), it is ours. One armed
    at the mark trails by the callback of the mark then, which nobody recorded; what bounds that mark is
    known (`_armed_at_mark_bounds`). A doubled or tenfold trail (someone's, set while no engine ran) is not
    ours."""
    tick = market.tick_size
    if activation_price is not None:
        exact = activation_price * callback_rate / 100
        return abs(value - exact) <= max(tick, exact / 10)
    bounds = _armed_at_mark_bounds(row, callback_rate)
    if bounds is None:
        return False
    low, high = bounds
    return low - tick <= value <= high + tick


# Room for the last price (which Bybit's trail follows) against the mark the row shows, and for rounding.
_ARMED_SLACK = Decimal("0.05")


def _armed_at_mark_bounds(row: Mapping[str, Any], callback_rate: Decimal) -> tuple[Decimal, Decimal] | None:
    """The distances a trailing stop of ours armed at the mark can have: the callback of the mark then. A
    long's trail is armed at or past its activation, above the entry, and has not fired, so the best price
    since (at least that mark) is within the callback above today's mark; a short's, mirrored. So the
    distance lies between the callback of the entry and of today's mark over (1 - callback) for a long, of
    today's mark over (1 + callback) and of the entry for a short. Wherever the mark was when it armed (a
    re-send long after the fill), ours is inside; someone's tenfold trail is not unless the price moved
    tenfold. None: the row does not say its entry, mark or side."""
    entry, mark = _positive(row.get("avgPrice")), _positive(row.get("markPrice"))
    if entry is None or mark is None or row.get("side") not in ("Buy", "Sell"):
        return None
    fraction = callback_rate / 100
    if row.get("side") == "Buy":
        low, high = entry * fraction, mark * fraction / (1 - fraction)
    else:
        low, high = mark * fraction / (1 + fraction), entry * fraction
    return min(low, high) * (1 - _ARMED_SLACK), max(low, high) * (1 + _ARMED_SLACK)


# The trailing-stop call the current task is making (the request hook reads it).
_CARRYING: contextvars.ContextVar[_Carrier | None] = contextvars.ContextVar("bybit_carrying", default=None)


class BybitLinearVenue(CcxtVenue):
    kind = BYBIT
    _ccxt_id = "bybit"

    def __init__(self, config: CcxtVenueConfig, *, clock: Clock | None = None) -> None:
        super().__init__(config, clock=clock)
        self._stops: dict[str, _PositionStop] = {}
        # What stops an earlier process recorded were set to, by id (`expect_recorded`).
        self._recorded: dict[str, _RecordedStop] = {}
        self._hedge_mode: bool | None = None
        self._waiting_riders: dict[tuple[str, OrderSide], _Rider] = {}  # hard stops awaiting a trailing call
        self._carriers: dict[tuple[str, OrderSide], _Carrier] = {}  # trailing-stop calls not sent yet
        # Hard stops whose last send went in their trailing stop's call (`rode_in_call`), newest last.
        self._merged: dict[str, None] = {}
        self.riders_carried = 0  # hard stops sent in their trailing stop's call (no call of their own)
        # Why the last whole listing of our stops stood on part of its reads ("" when it read them all): a
        # reconcile pass on it has not checked every stop (`Engine._reconcile_pass`).
        self.listing_unchecked = ""
        self._rows_unread = ""  # why the stop orders' list was last not read
        public, private = (
            (TESTNET_PUBLIC_URL, TESTNET_PRIVATE_URL)
            if config.testnet
            else (PRODUCTION_PUBLIC_URL, PRODUCTION_PRIVATE_URL)
        )
        if config.base_url:  # the streams' host follows the configured URL exactly as the REST hosts do
            public, private = (str(_rehost(url, config.base_url.rstrip("/"))) for url in (public, private))
        self._bybit_streams = BybitStreams(
            public_url=public,
            private_url=private,
            api_key=config.api_key,
            api_secret=config.api_secret,
            settings=config.streams,
            session=self._stream_session,
            rest_marks=self.fetch_mark_prices,
            name_stop=self._stream_stop,
            moved_stops=self._stream_moved,
            mark_poll_seconds=config.mark_poll_seconds,
            rest_fill_price=self._execution_price,
            monotonic=self._clock.monotonic,
            server_time_ms=lambda: int(self._exchange.nonce()),  # ccxt's clock, drift-corrected
            resync_clock=lambda: self._exchange.load_time_difference(),
        )
        self._streams = self._bybit_streams

    def _exchange_options(self) -> dict[str, Any]:
        options = super()._exchange_options()
        options["options"] = {
            "defaultType": "swap",
            "defaultSubType": "linear",
            "fetchMarkets": {"types": ["linear"]},
            "fetchCurrencies": False,
            "adjustForTimeDifference": True,  # a drifting clock would answer 10002 forever
            "enableUnifiedAccount": True,
            "enableUnifiedMargin": False,
            "recvWindow": BYBIT_RECV_WINDOW_MS,
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
            attach_stop_to_entry=True,  # order/create takes stopLoss: the position is born with its stop
            max_conditional_orders=10_000,  # position-level stops are not orders on Bybit
            order_rate_budgets=BYBIT_DEFAULT_BUDGETS,
            request_budgets=BYBIT_REQUEST_BUDGETS,
            protective_rate_budgets=BYBIT_PROTECTIVE_BUDGETS,
            trailing_stop_follows="last",  # trading-stop's trailingStop tracks LastPrice, no trigger-by option
            stream_new_proves_live=False,  # a stop order's row is named after the stop it can be (`_stream_stop`)
            stops_are_orders=False,  # stopLoss and trailingStop are the position's fields
            request_window_seconds=BYBIT_RECV_WINDOW_MS / 1000,
            liquidation_price_streamed=True,  # the position topic's liqPrice
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

    # ---- push streams (`engine.venues.bybit_streams`) ---------------------------------------------------

    def _stream_symbols(self, symbols: Collection[str] | None) -> Collection[str]:
        return sorted(self._markets) if symbols is None else symbols  # Bybit has no all-market topic

    def _stream_stop(
        self,
        symbol: str,
        order_type: OrderType,
        side: OrderSide,
        venue_order_id: str,
        trigger: Decimal | None = None,
        updated_ms: int | None = None,
    ) -> Order | None:
        """Our id for a system-created stop order of this kind and closing side, told by the stream.

        Each stop we set is a venue order of its own, and the stream can be late: the row of an earlier
        stop (the previous position's, or one we replaced) may arrive after the current stop was set. So a
        row is named after the working stop only if it can be that stop's order: the venue order it is
        known under, or (not known yet) a hard stop's own trigger price and a state no older than the stop,
        for a trailing stop also an order no other stop of ours is known under. Else after the stop known
        under that venue order, else after an earlier stop it fits; else it is not named (skipped: the
        reconciler's reads stay the net). The working stop's order at a price none of ours ever asked for,
        in a state newer than the stop, is that stop moved by someone else: it is ended, and named with
        the status CANCELED (any other named stop with NEW: the row says how it stands)."""
        kind = [s for s in self._stops_for(symbol) if s.type is order_type and s.side is side]

        def fits(stop: _PositionStop) -> bool:
            if stop.venue_order_id:
                return stop.venue_order_id == venue_order_id
            if (
                order_type is OrderType.STOP_MARKET
                and trigger is not None
                and stop.stop_price is not None
                and trigger != stop.stop_price
            ):
                return False  # a hard stop's order at another price: an earlier stop's
            if updated_ms is not None and updated_ms < (stop.created_at - _CLOCK_SLACK_SECONDS) * 1000:
                return False  # a state from before this stop was set
            return order_type is OrderType.STOP_MARKET or not any(
                other is not stop and other.venue_order_id == venue_order_id for other in kind
            )

        working = next((s for s in reversed(kind) if s.status is OrderStatus.NEW), None)
        stop = working if working is not None and fits(working) else None
        if stop is None and venue_order_id:
            stop = next((s for s in reversed(kind) if s.venue_order_id == venue_order_id), None)
        if stop is None:
            stop = next((s for s in reversed(kind) if s is not working and fits(s)), None)
        if stop is None:
            return None
        if venue_order_id and not stop.venue_order_id:
            stop.venue_order_id = venue_order_id
        if (
            stop is working
            and order_type is OrderType.STOP_MARKET
            and trigger is not None
            and (updated_ms is None or updated_ms >= stop.created_at * 1000)
        ):
            # Its order at a price we never asked for, in a state newer than the stop: moved by someone
            # else (told cancelled: not our stop any more). A price of ours is ours, or a late row.
            self._moved_by_someone(stop, trigger)
        named = self._snapshot(stop)
        if stop.status is OrderStatus.CANCELED and stop.displaced_by is not None:
            return named  # CANCELED: moved by someone else, not ours any more
        return replace(named, status=OrderStatus.NEW)  # the row tells how it stands

    def _stream_moved(self, symbol: str, side: PositionSide, fields: Mapping[str, Any]) -> list[Order]:
        """Our working stops on this position whose field the stream's position row shows holding a value we
        never asked for: moved by someone else, each told cancelled (not ours any more). A field at 0 is
        the stop removed, which its order's own row tells."""
        closing = OrderSide.SELL if side is PositionSide.LONG else OrderSide.BUY
        moved = []
        for stop in self._stops_for(symbol):
            if stop.side is not closing or stop.status is not OrderStatus.NEW:
                continue
            value = _positive(fields.get(_FIELD[stop.type]))
            if value is not None and self._moved_by_someone(stop, value):
                moved.append(self._snapshot(stop))
        return moved

    async def _execution_price(self, symbol: str, venue_order_id: str) -> Decimal | None:
        """The volume-weighted price of one order's executions (`execution/list` by orderId), or None."""
        answer = await self._read(
            partial(
                self._exchange.privateGetV5ExecutionList,
                {"category": "linear", "symbol": symbol, "orderId": venue_order_id, "limit": _EXECUTION_PAGE},
            ),
            "execution/list",
            symbol=symbol,
        )
        total = notional = _ZERO
        for row in (answer.get("result") or {}).get("list", []):
            if str(row.get("orderId", "")) != venue_order_id or row.get("execType", "Trade") != "Trade":
                continue
            qty, price = _positive(row.get("execQty")), _positive(row.get("execPrice"))
            if qty is not None and price is not None:
                total, notional = total + qty, notional + qty * price
        return notional / total if total > 0 else None

    async def load_markets(self) -> Mapping[str, Market]:
        # ccxt's list is Bybit's default one (Trading, and PreLaunch which it asks for too). A symbol being
        # settled or delisted is left out of it, yet a position held there needs its stops guarded (and
        # shown): those statuses are asked for beside it.
        loaded, *others = await asyncio.gather(
            self._call(self._exchange.load_markets(True), mutating=False),
            *(self._instruments(status) for status in HELD_ONLY_STATUSES),
            return_exceptions=True,
        )
        if isinstance(loaded, BaseException):
            raise loaded
        for status, rows in zip(HELD_ONLY_STATUSES, others, strict=True):
            if isinstance(rows, BaseException):
                if not isinstance(rows, Rejected):
                    raise rows  # a transient failure: the load is asked again (the start retries it)
                # Refused (the filter not taken): not fatal, the trading markets are what entries need. A
                # position held on such a symbol is then named NOT GUARDED in the start-up report.
                logger.warning(
                    "%s: the venue refused to list its %s instruments (%s); a position on one is not guarded",
                    self.kind,
                    status,
                    rows,
                )
        markets: dict[str, Market] = {}
        pairs: dict[str, str] = {}
        for unified, market in loaded.items():
            if not (market.get("linear") and market.get("swap") and market.get("settle") == "USDT"):
                continue
            parsed = _market_of(market.get("info") or {})
            if parsed is not None:
                markets[parsed.symbol] = parsed
                pairs[parsed.symbol] = unified
        for rows in others:
            if isinstance(rows, BaseException):
                continue
            for raw in rows:
                if raw.get("contractType") != "LinearPerpetual" or raw.get("settleCoin") != "USDT":
                    continue
                parsed = _market_of(raw)
                if parsed is not None and parsed.symbol not in markets:
                    markets[parsed.symbol] = parsed
        self._markets = markets
        self._symbols = SymbolMap(pairs)
        if self._hedge_mode is None and markets:
            # The position mode, once, before any entry: a symbol's rows say it even when flat (one row
            # in one-way mode, two in hedge mode). Otherwise a wave's first entries would each ask.
            try:
                await self._position_rows(min(markets))
            except ExchangeError as error:  # best effort: the first entry asks again
                logger.info("%s: position mode not read at start (%s)", self.kind, error)
        return dict(markets)

    async def _instruments(self, status: str) -> list[dict[str, Any]]:
        """Every linear instrument in `status` (all pages)."""
        request: dict[str, Any] = {"category": "linear", "status": status, "limit": 1000}
        return await self._walk(
            self._exchange.publicGetV5MarketInstrumentsInfo, request, "market/instruments-info", ("symbol",)
        )

    async def _walk(
        self,
        method: Any,
        request: dict[str, Any],
        what: str,
        key: tuple[str, ...],
        *,
        symbol: str | None = None,
    ) -> list[dict[str, Any]]:
        """Every row of a cursor-paged list, each once (by `key`, the latest read kept).

        Bybit has served a page whose `nextPageCursor` addresses that same page again (nautilus_trader
        #5019): a walk waiting for the empty cursor then never ends. A cursor is asked for twice at most
        (once more in case the venue moves on); given again, it ends the walk when its page was short (the
        last one: nothing follows it), and fails the read when the page was full, since the rows after it
        cannot be reached: an incomplete listing read as complete would say positions or stops are gone
        that are not."""
        rows: dict[tuple[Any, ...], dict[str, Any]] = {}
        asked: Counter[str] = Counter()
        while True:
            answer = await self._read(partial(method, dict(request)), what, symbol=symbol)
            result = answer.get("result") or {}
            page = result.get("list") or []
            for row in page:
                rows[tuple(row.get(field) for field in key)] = row
            cursor = result.get("nextPageCursor")
            if not cursor:
                return list(rows.values())
            asked[request.get("cursor", "")] += 1
            if asked[cursor] >= 2:  # asked for twice already, and given again: it does not move on
                if len(page) < int(request["limit"]):
                    logger.info(
                        "%s %s: the last page gave its own cursor again; the walk ends", self.kind, what
                    )
                    return list(rows.values())
                raise Retryable(
                    f"{self.kind} {what}: the venue gave a full page's cursor again ({cursor!r}); the rows "
                    "after it cannot be read, so the listing is incomplete"
                ).answered(failure=FailureClass.SERVER_ERROR)
            request["cursor"] = cursor

    async def fetch_mark_prices(self, symbols: Collection[str] | None = None) -> dict[str, MarkPrice]:
        await self._ensure_markets()
        wanted = None if symbols is None else set(symbols)
        request: dict[str, Any] = {"category": "linear"}
        if wanted is not None and len(wanted) == 1:
            request["symbol"] = next(iter(wanted))
        answer = await self._read(partial(self._exchange.publicGetV5MarketTickers, request), "market/tickers")
        stamp = _seconds(answer.get("time"), time.time())
        marks = {}
        for row in (answer.get("result") or {}).get("list", []):
            symbol, price = row.get("symbol"), _positive(row.get("markPrice"))
            if symbol in self._markets and price is not None and (wanted is None or symbol in wanted):
                marks[symbol] = MarkPrice(symbol, price, stamp)
        return marks

    async def fetch_balance(self) -> Balance:
        answer = await self._read(
            partial(
                self._exchange.privateGetV5AccountWalletBalance, {"accountType": "UNIFIED", "coin": "USDT"}
            ),
            "account/wallet-balance",
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
        """Every open position (all pages: the default page holds 20), or the symbol's."""
        request: dict[str, Any] = {"category": "linear", "limit": _POSITION_PAGE}
        if symbol is None:
            request["settleCoin"] = "USDT"
        else:
            request["symbol"] = symbol
        rows = await self._walk(
            self._exchange.privateGetV5PositionList,
            request,
            "position/list",
            ("symbol", "positionIdx", "side"),
            symbol=symbol,
        )
        if rows:  # empty rows say the mode too (positionIdx 1/2 in hedge mode)
            self._hedge_mode = any(int(row.get("positionIdx", 0) or 0) != 0 for row in rows)
        return [row for row in rows if _decimal(row.get("size"), _ZERO)]

    async def _stop_order_rows_if_read(self, symbol: str | None) -> list[Mapping[str, Any]] | None:
        """`_stop_order_rows`, or None when that read fails: the listing stands on the positions' stop fields
        (what is live), without the orders' ids and the check of an unarmed trail's activation this time.
        One failing order list (a cursor the venue gave again on a full page) failed every listing, so every
        reconcile pass, while a stop removed by hand showed on `position/list` (an operator: 70-110 s
        without stops, every screen at 100 %)."""
        try:
            return await self._stop_order_rows(symbol)
        except ExchangeError as error:
            self._rows_unread = f"{self.kind} order/realtime not read: {error}"
            if symbol is not None:
                logger.info("%s order/realtime %s: the stop orders not read (%s)", self.kind, symbol, error)
            return None

    async def _stop_order_rows(self, symbol: str | None) -> list[Mapping[str, Any]]:
        """The system-created orders behind the position stops (`orderFilter=StopOrder`), all pages."""
        request: dict[str, Any] = {"category": "linear", "orderFilter": "StopOrder", "limit": _ORDER_PAGE}
        if symbol is None:
            request["settleCoin"] = "USDT"
        else:
            request["symbol"] = symbol
        rows = await self._walk(
            self._exchange.privateGetV5OrderRealtime, request, "order/realtime", ("orderId",), symbol=symbol
        )
        return [
            row
            for row in rows
            if row.get("stopOrderType") in ("StopLoss", "TrailingStop")
            and row.get("orderStatus") in ("Untriggered", "New", "Active")
        ]

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
                    liquidation_price=_positive(row.get("liqPrice")),
                )
            )
        return positions

    async def fetch_open_protective_orders(self, symbol: str | None = None) -> list[Order]:
        """Our stops the venue holds: the positions' stop fields holding what we asked for there (a value
        someone else set is not our stop), with the stop orders behind them (which carry the venue's order
        id and a trailing stop's current trigger level)."""
        await self._ensure_markets()
        rows = await self._position_rows(symbol)
        listed, unchecked = await self._open_protective_orders(symbol, rows)
        if symbol is None:  # (a whole listing's, finished: what a reconcile pass stands on)
            was, self.listing_unchecked = self.listing_unchecked, unchecked
            if unchecked and not was:
                logger.warning(
                    "%s: %s; stops listed from the positions' fields until it answers (a trailing stop's "
                    "activation moved by someone else goes unseen meanwhile)",
                    self.kind,
                    unchecked,
                )
            elif was and not unchecked:
                logger.info("%s: the listing of our stops checks every stop again", self.kind)
        return listed

    async def _open_protective_orders(
        self, symbol: str | None, rows: list[Mapping[str, Any]]
    ) -> tuple[list[Order], str]:
        """The listing, and why part of it went unchecked ("" when nothing did): an unarmed trailing stop's
        activation, on the stop orders' list only, when that list could not be read. (Its ids, also from
        that list, are no check: the positions' fields say what is live.)"""
        listed = []
        for stop in list(self._stops.values()):
            if stop.status is not OrderStatus.NEW or not stop.confirmed or stop.symbol not in self._markets:
                continue
            if symbol is not None and stop.symbol != symbol:
                continue
            row = _row_closed_by(rows, stop.symbol, stop.side)
            value = _positive(row.get(_FIELD[stop.type])) if row is not None else None
            if value is None:
                continue  # gone
            if self._asked_for(stop, value) or self._was_ours(stop, value):
                # What we asked for, or what one of ours asked for before: a read that lags our own
                # change (the hard stop corrected from the fill, a resize) is no alarm.
                listed.append(stop)
            else:
                # Another value than ours (said once when nobody of ours ever asked for it): not our
                # stop. Not listed; our look-up of it finds it ended, and ours is set again.
                self._note_displaced(stop, value)
        stop_rows: list[Mapping[str, Any]] | None = None
        unread = False  # the stop orders' read failed: not asked again in this listing
        # A trailing stop not armed yet shows its activation on its order's row, not on the position's.
        # (Judged once set a while: a row read soon after our own change may lag it.)
        unarmed = [
            s
            for s in listed
            if s.type is OrderType.TRAILING_STOP_MARKET
            and s.activation_price is not None
            and time.time() - s.updated_at >= _EARLIER_VALUE_SECONDS
        ]
        unchecked = ""
        if unarmed or any(not stop.venue_order_id for stop in listed):  # the venue's ids, read once per stop
            stop_rows = await self._stop_order_rows_if_read(symbol)
            unread = stop_rows is None
            if unread and unarmed:
                unchecked = self._rows_unread
            for stop in listed if stop_rows is not None else ():
                if not stop.venue_order_id:
                    self._attach_venue_order(stop, stop_rows)
        for stop in unarmed if stop_rows is not None else ():
            assert stop.activation_price is not None
            row = _row_closed_by(rows, stop.symbol, stop.side)
            shown = self._activation_off(
                stop.symbol, stop.activation_price, stop.side, stop_rows, row or {}, stop.venue_order_id
            )
            if shown is not None and not any(
                o.activation_price == shown
                for o in self._kin(stop)
                if o is not stop and o.status is OrderStatus.NEW
            ):
                # Its activation moved out of reach, the distance kept (the field we read alone): a trail that
                # never arms, listed ours while the engine ran (only a restart looked; a reviewer). Not ours.
                logger.warning(
                    "%s %s: the trailing stop's activation is %s, not our %s (%s): moved by someone else, so "
                    "not our stop; ours is set again",
                    self.kind,
                    stop.symbol,
                    _wire(shown),
                    _wire(stop.activation_price),
                    stop.client_order_id,
                )
                stop.status, stop.updated_at = OrderStatus.CANCELED, time.time()
                listed.remove(stop)
        # A new process holds no stop in memory: the stops the last one recorded are named from the rows
        # just read (the same checks as a look-up by id). Listed, a start confirms them at once; unlisted,
        # every position showed "both stops missing" until its guard looked each id up (a span of about a
        # second recorded for every position at every start, while the venue held both stops).
        recorded = [
            (cid, entry.symbol)
            for cid, entry in self._recorded.items()
            if entry.symbol is not None
            and entry.symbol in self._markets
            and (symbol is None or entry.symbol == symbol)
            and cid not in self._stops
        ]
        for cid, on in sorted(recorded):
            order_type = self._kind_held(on, cid)
            if order_type is None:
                continue
            if stop_rows is None and not unread:
                stop_rows = await self._stop_order_rows_if_read(symbol)
                unread = stop_rows is None
            if stop_rows is None:
                # Not named this time (each is looked up by its id, which needs that list too): the
                # recorded stops go unchecked, and are uncovered until it answers.
                unchecked = unchecked or self._rows_unread
                break
            of_symbol = [r for r in rows if r.get("symbol") == on]
            named = await self._named(on, cid, order_type, of_symbol, stop_rows)
            if named is not None and named.status is OrderStatus.NEW:
                listed.append(named)
        return [self._snapshot(stop) for stop in listed], unchecked

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
        if self._hedge_mode is None:
            # The account's position mode decides positionIdx; a symbol's rows say it even when flat (in
            # hedge mode two empty rows, positionIdx 1 and 2), so a first entry does not guess one-way.
            await self._position_rows(symbol)
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
        return await self._read_back(symbol, client_order_id, self._fetch_regular(symbol, client_order_id))

    async def create_market_order_with_stop(
        self,
        symbol: str,
        side: OrderSide,
        quantity: Decimal,
        stop_price: Decimal,
        *,
        client_order_id: str,
        stop_client_order_id: str,
    ) -> Order:
        """The entry with its hard stop on it (`stopLoss`, `slTriggerBy=MarkPrice`, `tpslMode=Full`): the
        position never exists without it. The stop is then ours under `stop_client_order_id`."""
        await self._check_order(symbol, quantity, client_order_id, ("stop price", stop_price))
        self._require_client_order_id(stop_client_order_id)
        self._require_unused(stop_client_order_id)
        if self._hedge_mode is None:
            await self._position_rows(symbol)
        stop = _PositionStop(
            stop_client_order_id,
            symbol,
            side.opposite,
            OrderType.STOP_MARKET,
            quantity,
            stop_price,
            None,
            None,
            None,
            time.time(),
            confirmed=False,  # until the entry is known filled: then the position carries it
        )
        self._stops[stop_client_order_id] = stop
        request: dict[str, Any] = {
            "category": "linear",
            "symbol": symbol,
            "side": "Buy" if side is OrderSide.BUY else "Sell",
            "orderType": "Market",
            "qty": _wire(quantity),
            "orderLinkId": client_order_id,
            "positionIdx": self._position_idx(side, reduce_only=False),
            "stopLoss": _wire(stop_price),
            "slTriggerBy": "MarkPrice",
            "tpslMode": "Full",
        }
        try:
            await self._call(
                self._exchange.privatePostV5OrderCreate(request),
                mutating=True,
                symbol=symbol,
                client_order_id=client_order_id,
            )
        except OutcomeUnknown:
            raise  # the stop stays unconfirmed: the position says whether it came with it
        except ExchangeError:
            self._forget(stop)
            raise
        # Unread (the error says the outcome is unknown), the stop stays unconfirmed as above
        order = await self._read_back(symbol, client_order_id, self._fetch_regular(symbol, client_order_id))
        if order.status is OrderStatus.FILLED:
            stop.confirmed, stop.quantity, stop.updated_at = True, order.filled_quantity, time.time()
            stop.from_entry = True
            self._remember(stop)
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
        self._require_unused(client_order_id)
        now = time.time()
        stop = _PositionStop(
            client_order_id, symbol, side, OrderType.STOP_MARKET, quantity, stop_price, None, None, None, now
        )
        row = None if self._opened_here(symbol, side) else await self._protected_row(symbol, side)
        if row is not None and _decimal(row.get("stopLoss")) == stop_price:
            # The position holds this stop already (sent by us before a restart, or by a call whose answer
            # was lost): take it as ours. Sending it again would only earn 34040.
            return self._adopted(stop, row)
        request = {
            "category": "linear",
            "symbol": symbol,
            "tpslMode": "Full",
            "stopLoss": _wire(stop_price),
            "slTriggerBy": "MarkPrice",
            "positionIdx": self._position_idx(side, reduce_only=True),
        }
        if self._opened_here(symbol, side):
            carried = await self._ride(stop, request)
            if carried is not None:
                return carried
        return await self._set_position_stop(stop, request)

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
        row = None if self._opened_here(symbol, side) else await self._protected_row(symbol, side)
        now = time.time()
        live = None if row is None else _positive(row.get("trailingStop"))
        trailing = [o for o in self._stops_for(symbol) if o.type is OrderType.TRAILING_STOP_MARKET]
        if (
            row is not None
            and live is not None
            and not any(other.status is OrderStatus.NEW for other in trailing)
            and not any(other.side is side and other.displaced_by is not None for other in trailing[-1:])
            and _our_distance(market, live, callback_rate, activation_price, row)
        ):
            # A trailing stop is working on the position and we hold none in memory (a restart, or a lost
            # answer): take it as ours. Sending one again would restart its high-water mark on Bybit and give
            # back the profit it has locked in. Not when ours was last found moved by someone else: that
            # one is theirs, and ours is set again; nor when its distance is not the one ours would have
            # (someone else's, set while no engine ran).
            stop = _PositionStop(
                client_order_id,
                symbol,
                side,
                OrderType.TRAILING_STOP_MARKET,
                quantity,
                None,
                activation_price,
                callback_rate,
                live,
                now,
            )
            return self._adopted(stop, row)
        reference = activation_price
        if reference is None:
            marks = await self.fetch_mark_prices([symbol])
            if symbol not in marks:
                raise Retryable(f"{self.kind} {symbol}: no mark price to size the trailing distance")
            reference = marks[symbol].price
        distance = _trailing_distance(market, reference, callback_rate)
        request: dict[str, Any] = {
            "category": "linear",
            "symbol": symbol,
            "tpslMode": "Full",
            "trailingStop": _wire(distance),
            "positionIdx": self._position_idx(side, reduce_only=True),
        }
        if activation_price is not None:
            request["activePrice"] = _wire(activation_price)
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
        )
        return await self._set_position_stop(stop, request)

    async def cancel_order(self, symbol: str, client_order_id: str) -> Order:
        await self._ensure_markets()
        stop = await self._stop_for(symbol, client_order_id)
        if stop is None:
            return await self._fetch_regular(symbol, client_order_id)
        current = await self._resolve(stop)
        if not current.is_open:
            return current
        try:
            await self._call(
                self._exchange.privatePostV5PositionTradingStop(
                    {
                        "category": "linear",
                        "symbol": symbol,
                        "tpslMode": "Full",
                        _FIELD[stop.type]: "0",  # 0 removes the stop
                        "positionIdx": self._position_idx(stop.side, reduce_only=True),
                    }
                ),
                mutating=True,
                symbol=symbol,
                client_order_id=client_order_id,
            )
        except Rejected as refused:
            if refused.code != _NOT_MODIFIED:  # already gone: what became of it is read below
                raise
            return await self._resolve(stop)
        stop.status, stop.updated_at = OrderStatus.CANCELED, time.time()
        return self._snapshot(stop)

    async def fetch_order(self, symbol: str, client_order_id: str) -> Order:
        await self._ensure_markets()
        stop = await self._stop_for(symbol, client_order_id)
        if stop is not None:
            return await self._resolve(stop)
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
        """An id is refused while a stop under it may be live; once its stop has ended it is free again."""
        held = self._stops.get(client_order_id)
        if held is not None and held.status is OrderStatus.NEW:
            raise DuplicateClientOrderId(client_order_id)

    async def _protected_row(self, symbol: str, side: OrderSide) -> Mapping[str, Any]:
        """The position a stop of `side` would close; refused when there is none or it would grow it."""
        rows = await self._position_rows(symbol)
        if not rows:
            raise Rejected(RejectCode.REDUCE_ONLY_REJECTED, f"{self.kind} {symbol}: no position to protect")
        row = _row_closed_by(rows, symbol, side)
        if row is None:
            raise Rejected(
                RejectCode.REDUCE_ONLY_REJECTED,
                f"{self.kind} {symbol}: a {side.value} stop would increase the position, not close it",
            )
        return row

    def _opened_here(self, symbol: str, side: OrderSide) -> bool:
        """The position a stop of `side` closes is one this process opened, its hard stop on the entry,
        and that stop is working: the position is there, `side` closes it, and any trailing stop on it is
        one we set (a restart finds the position's stops by reading it). No need to read the position
        before setting its stops (one round trip on every stop's path); should it have closed meanwhile,
        trading-stop refuses ("zero position") as the read would have."""
        return self._hedge_mode is not None and any(
            other.from_entry and other.side is side and other.confirmed and other.status is OrderStatus.NEW
            for other in self._stops_for(symbol)
        )

    async def _ride(self, stop: _PositionStop, request: Mapping[str, Any]) -> Order | None:
        """Send the hard stop `stop` in its position's trailing-stop call, when that call is on its way and
        not sent yet, or comes within `RIDE_WAIT_SECONDS`: its order once that call set it. None: it goes
        alone (the trailing stop is set or already sent, none came, or the combined call was refused)."""
        key = (stop.symbol, stop.side)
        self._merged.pop(stop.client_order_id, None)  # (a send of it again rides, or not, anew)
        carrier = self._carriers.get(key)
        if carrier is not None and carrier.rider is not None:
            return None
        if carrier is None and any(
            other.type is OrderType.TRAILING_STOP_MARKET
            and other.side is stop.side
            and other.status is OrderStatus.NEW
            for other in self._stops_for(stop.symbol)
        ):
            return None  # the trailing stop is set, or its call is on the wire
        if carrier is None and key in self._waiting_riders:
            return None
        rider = _Rider(
            stop,
            {name: request[name] for name in ("stopLoss", "slTriggerBy")},
            asyncio.get_running_loop().create_future(),
            current_ticket(),
        )
        stop.confirmed = False  # until the call it rides in is answered
        self._stops[stop.client_order_id] = stop
        if carrier is not None:
            carrier.rider = rider
        else:
            self._waiting_riders[key] = rider
        if rider.ticket is not None:
            rider.ticket.begin_wait(self._clock.monotonic())  # queued behind another call: no timeout runs
        try:
            try:
                async with asyncio.timeout(RIDE_WAIT_SECONDS):
                    result = await asyncio.shield(rider.done)
            except TimeoutError:
                if self._waiting_riders.get(key) is rider:
                    del self._waiting_riders[key]
                    return None  # no trailing-stop call came: alone
                result = await rider.done  # taken by a call meanwhile: its answer decides
        except OutcomeUnknown:
            raise  # remembered unconfirmed: the position says later whether it came
        except BaseException:
            if self._stops.get(stop.client_order_id) is stop and not stop.confirmed:
                del self._stops[stop.client_order_id]
            raise
        finally:
            if self._waiting_riders.get(key) is rider:
                del self._waiting_riders[key]
            if rider.ticket is not None:
                rider.ticket.end_wait(self._clock.monotonic())
        return result

    def rode_in_call(self, client_order_id: str) -> bool:
        """Whether this hard stop's send went in its trailing stop's call: that call's outcome is its own
        (said and counted once, by the trailing stop), whatever ended its wait (its own time limit too)."""
        return client_order_id in self._merged

    async def before_request(self, method: str, path: str, params: Mapping[str, Any]) -> None:
        await super().before_request(method, path, params)
        carrier = _CARRYING.get()
        if carrier is None or carrier.sent or path != _TRADING_STOP_PATH or not isinstance(params, dict):
            return
        # The trailing-stop call is about to leave (its pacing is done): a hard stop riding in it goes in
        # the same request, and its call's clock starts now.
        carrier.sent = True
        if self._carriers.get(carrier.key) is carrier:
            del self._carriers[carrier.key]
        rider = carrier.rider
        if rider is not None:
            params.update(rider.fields)
            rider.merged = True
            self._merged[rider.stop.client_order_id] = None
            while len(self._merged) > _MERGED_REMEMBERED:
                del self._merged[next(iter(self._merged))]
            if rider.ticket is not None:
                rider.ticket.end_wait(self._clock.monotonic())

    async def _set_position_stop(
        self, stop: _PositionStop, request: Mapping[str, Any], *, carry: bool = True
    ) -> Order:
        """Send a position stop; an answer lost leaves it remembered as unconfirmed (found or not later).
        A trailing stop carries the hard stop waiting to ride in its call (`_ride`)."""
        key = (stop.symbol, stop.side)
        if carry and stop.type is OrderType.TRAILING_STOP_MARKET and key not in self._carriers:
            carrier = _Carrier(key, self._waiting_riders.pop(key, None))
            self._carriers[key] = carrier
            token = _CARRYING.set(carrier)
            try:
                return await self._carry(stop, request, carrier)
            finally:
                _CARRYING.reset(token)
                if self._carriers.get(key) is carrier:
                    del self._carriers[key]
        return await self._send_position_stop(stop, request)

    async def _carry(self, stop: _PositionStop, request: Mapping[str, Any], carrier: _Carrier) -> Order:
        """The trailing stop's call, with the hard stop riding in it if one joined before it left."""
        try:
            placed = await self._send_position_stop(stop, request)
        except BaseException as error:
            rider = carrier.rider
            if rider is None or rider.done.done():
                raise
            if not rider.merged:
                rider.done.set_result(None)  # it never left with this call: alone
                raise
            if isinstance(error, Rejected):
                # Which of the two was refused? Each is sent alone and gets its own verdict.
                rider.done.set_result(None)
                logger.info(
                    "%s %s: trading-stop with both stops refused (%s); sending each alone",
                    self.kind,
                    stop.symbol,
                    error,
                )
                return await self._set_position_stop(stop, request, carry=False)
            if isinstance(error, ExchangeError):
                rider.done.set_exception(error)  # the same outcome for both (not executed, or unknown)
            else:
                rider.done.set_exception(
                    OutcomeUnknown(
                        rider.stop.client_order_id,
                        f"{self.kind} {stop.symbol}: trading-stop interrupted ({type(error).__name__})",
                    )
                )
            # Said to the rider's own call, if it still waits: one cancelled with it (the engine stopping)
            # never reads it, and asyncio printed "Future exception was never retrieved" on the terminal.
            rider.done.exception()
            raise
        rider = carrier.rider
        if rider is not None and not rider.done.done():
            if rider.merged:
                rider.stop.confirmed, rider.stop.updated_at = True, time.time()
                self._remember(rider.stop)
                self.riders_carried += 1
                rider.done.set_result(self._snapshot(rider.stop))
            else:
                rider.done.set_result(None)
        return placed

    def _forget(self, stop: _PositionStop) -> None:
        """Forget `stop` (refused, or not on the venue), unless its id is another's by now: a look-up by id
        and a send of the same id can overlap (the look-up forgot it, and the send's refusal then failed
        with a KeyError instead of saying the venue's words: a guard's pass lost on a flipped position)."""
        if self._stops.get(stop.client_order_id) is stop:
            del self._stops[stop.client_order_id]

    async def _send_position_stop(self, stop: _PositionStop, request: Mapping[str, Any]) -> Order:
        stop.confirmed = False
        self._stops[stop.client_order_id] = stop
        try:
            await self._call(
                self._exchange.privatePostV5PositionTradingStop(dict(request)),
                mutating=True,
                symbol=stop.symbol,
                client_order_id=stop.client_order_id,
            )
        except OutcomeUnknown:
            raise
        except Rejected as refused:
            if refused.code != _NOT_MODIFIED:
                self._forget(stop)
                if refused.code == _PARAMS_ERROR and "zero position" in str(refused):
                    raise Rejected(
                        RejectCode.REDUCE_ONLY_REJECTED, f"{self.kind} {stop.symbol}: no position to protect"
                    ) from refused
                raise
            # 34040: the position holds exactly these values already; the stop is there.
        except ExchangeError:
            self._forget(stop)
            raise
        stop.confirmed, stop.updated_at = True, time.time()
        self._remember(stop)
        return self._snapshot(stop)

    def _adopted(self, stop: _PositionStop, row: Mapping[str, Any]) -> Order:
        stop.quantity = _decimal(row.get("size"), stop.quantity) or stop.quantity
        stop.updated_at = stop.created_at
        self._remember(stop)
        logger.info(
            "%s %s: adopted the position's live %s as %s",
            self.kind,
            stop.symbol,
            _FIELD[stop.type],
            stop.client_order_id,
        )
        return self._snapshot(stop)

    def _remember(self, stop: _PositionStop) -> None:
        # A new position stop of a kind replaces the earlier ones of that kind on the same position (not a
        # later one still on its way: its own answer or look-up decides it).
        for other in self._stops_for(stop.symbol):
            if (
                other is not stop
                and other.type is stop.type
                and other.status is OrderStatus.NEW
                and other.created_at <= stop.created_at
            ):
                other.status, other.updated_at = OrderStatus.CANCELED, stop.created_at
        self._stops[stop.client_order_id] = stop

    def _stops_for(self, symbol: str) -> list[_PositionStop]:
        return [stop for stop in self._stops.values() if stop.symbol == symbol]

    def _same(self, symbol: str, value: Decimal | None, other: Decimal | None) -> bool:
        """Equal on the symbol's tick grid (Bybit writes "0.4500" for 0.45; a value off the grid rounds)."""
        if value is None or other is None:
            return False
        market = self._markets.get(symbol)
        return value == other if market is None else abs(value - other) * 2 < market.tick_size

    @staticmethod
    def _value(stop: _PositionStop) -> Decimal | None:
        """What the stop holds in its position's field: the hard stop's price, the trailing distance."""
        return stop.stop_price if stop.type is OrderType.STOP_MARKET else stop.distance

    def _kin(self, stop: _PositionStop) -> list[_PositionStop]:
        """Our stops in the same field of the same position: the same symbol, kind and closing side."""
        return [o for o in self._stops_for(stop.symbol) if o.type is stop.type and o.side is stop.side]

    def _asked_for(self, stop: _PositionStop, value: Decimal) -> bool:
        """`value` is what we last asked the position's field to hold: this stop's, or that of one of ours
        on its way to replace it (our own move, a resize, a corrected hard stop), whose answer has not come."""
        return any(
            self._same(stop.symbol, value, self._value(o))
            for o in self._kin(stop)
            if o is stop or o.status is OrderStatus.NEW
        )

    def _was_ours(self, stop: _PositionStop, value: Decimal) -> bool:
        """`value` is one that a stop of ours in the same field asked for lately: one replaced less than
        `_EARLIER_VALUE_SECONDS` ago (a read that lags our own change, a late row). Any earlier value, at
        any age, used to pass: a field set back to our hard stop before its correction from the fill (by
        someone, or by a write of ours that landed late over the newer one) was listed as our stop for
        the position's life, at a price the engine did not hold; and an earlier position's values on the
        symbol counted too."""
        now = time.time()
        return any(
            self._same(stop.symbol, value, self._value(o))
            and (
                o is stop
                or o.status is OrderStatus.NEW
                # (from the replacement's confirmation, when it came later: a slow answer)
                or now - max(o.updated_at, stop.updated_at) <= _EARLIER_VALUE_SECONDS
            )
            for o in self._kin(stop)
        )

    def _note_displaced(self, stop: _PositionStop, value: Decimal) -> bool:
        """The field of our confirmed stop holds `value`, not what we asked for. Said (once, at WARNING) when
        none of ours ever asked for it, nor was it found taking one of ours' place before: someone else moved
        the stop. An earlier value of ours is a read that lags our own change, or a late row: nothing said.
        True when said."""
        if not stop.confirmed or stop.displaced_by is not None or self._asked_for(stop, value):
            return False
        if self._was_ours(stop, value) or any(
            self._same(stop.symbol, value, o.displaced_by) for o in self._kin(stop)
        ):
            return False
        stop.displaced_by = value
        logger.warning(
            "%s %s: the position's %s is %s, not our %s (%s): moved by someone else, so not our stop; "
            "ours is set again",
            self.kind,
            stop.symbol,
            _FIELD[stop.type],
            _wire(value),
            _wire(self._value(stop)) if self._value(stop) is not None else "?",
            stop.client_order_id,
        )
        return True

    def _moved_by_someone(self, stop: _PositionStop, value: Decimal) -> bool:
        """The account stream shows our working stop's field at `value`: if someone else moved it there, it
        is ended (cancelled: not ours any more) as of now. True when it was."""
        if not self._note_displaced(stop, value):
            return False
        stop.status, stop.updated_at = OrderStatus.CANCELED, time.time()
        return True

    async def _stop_for(self, symbol: str, client_order_id: str) -> _PositionStop | None:
        """The stop under this id: remembered, or (a new process) the position's live stop of the kind the
        id names, when no other id of ours holds it. None: not a position stop we can name."""
        stop = self._stops.get(client_order_id)
        if stop is not None:
            return stop if stop.symbol == symbol else None
        order_type = self._kind_held(symbol, client_order_id)
        if order_type is None:
            return None
        rows = await self._position_rows(symbol)
        named = await self._named(symbol, client_order_id, order_type, rows, None)
        return named if named is not None else self._ended_while_away(symbol, client_order_id, order_type)

    def _ended_while_away(
        self, symbol: str, client_order_id: str, order_type: OrderType
    ) -> _PositionStop | None:
        """A recorded stop of an earlier process that its position no longer holds: asked as such, its fill
        is looked for in the executions since it was recorded (`_resolve`; not found, it is not there). It
        was "not on the exchange" and its position `closed_on_exchange` without a PnL, though the venue had
        its fill and price (its order id there was never read: an operator, a stop fired while no engine
        ran)."""
        recorded = self._recorded.get(client_order_id)
        if recorded is None or recorded.side is None or recorded.recorded_at is None:
            return None
        stop = _PositionStop(
            client_order_id,
            symbol,
            recorded.side,
            order_type,
            _ZERO,
            recorded.stop_price,
            recorded.activation_price,
            recorded.callback_rate,
            recorded.distance,
            recorded.recorded_at,
            confirmed=False,  # not known set: no fill found, it is not there (as before)
        )
        return stop

    def _kind_held(self, symbol: str, client_order_id: str) -> OrderType | None:
        """The kind of stop the id names, when no stop of ours of that kind works on the symbol (else None:
        that one is ours, not this id)."""
        match = _STOP_KIND_IN_ID.search(client_order_id)
        if match is None:
            return None
        order_type = OrderType.STOP_MARKET if match.group(1) == "sl" else OrderType.TRAILING_STOP_MARKET
        if any(o.type is order_type and o.status is OrderStatus.NEW for o in self._stops_for(symbol)):
            return None
        return order_type

    async def _named(
        self,
        symbol: str,
        client_order_id: str,
        order_type: OrderType,
        rows: list[Mapping[str, Any]],
        stop_rows: list[Mapping[str, Any]] | None,
    ) -> _PositionStop | None:
        """A new process names the position's live stop of `order_type` (`_kind_held`: none of ours of that
        kind works there) as this id (`_stop_for`), from the symbol's position rows read (and the stop
        order rows, read here when not given)."""
        recorded = self._recorded.get(client_order_id)
        if recorded is not None and recorded.side is not None:
            # The recorded stop's own position (in hedge mode the other side's stop is not ours).
            own = _row_closed_by(rows, symbol, recorded.side)
            held = [own] if own is not None and _positive(own.get(_FIELD[order_type])) else []
        else:
            held = [row for row in rows if _positive(row.get(_FIELD[order_type]))]
        if len(held) != 1:
            return None  # nothing of that kind on the venue (or one per side in hedge mode: which is ours?)
        row = held[0]
        value = _positive(row.get(_FIELD[order_type]))
        side = OrderSide.SELL if row.get("side") == "Buy" else OrderSide.BUY
        assert value is not None
        expected = self._recorded_value(symbol, client_order_id, order_type, row)
        if expected is not None and not self._holds_recorded(symbol, client_order_id, order_type, value, row):
            if self._earlier_recorded_holds(symbol, client_order_id, order_type, value, row):
                # Another stop of ours the last process recorded for this field holds it: this one (a
                # correction, a resize written ahead) never took effect, or does not show yet. Not named:
                # its look-up proves it absent (or not) as any unsent order's.
                return None
            return self._displaced_while_away(client_order_id, symbol, side, order_type, row, expected, value)
        if stop_rows is None:
            stop_rows = await self._stop_order_rows(symbol)
        activation = self._moved_activation(symbol, client_order_id, order_type, side, stop_rows, row)
        if activation is not None:
            return self._activation_moved_while_away(client_order_id, symbol, side, row, value, activation)
        stop = _field_stop(client_order_id, symbol, side, order_type, row, value)
        self._attach_venue_order(stop, stop_rows)
        self._adopted(stop, row)
        return stop

    def _moved_activation(
        self,
        symbol: str,
        client_order_id: str,
        order_type: OrderType,
        side: OrderSide,
        stop_rows: list[Mapping[str, Any]],
        position: Mapping[str, Any],
    ) -> Decimal | None:
        """The activation price the venue's order behind our recorded trailing stop shows, when it is not
        the recorded one and still ahead of the mark (None: it is ours, or reached, or nothing to compare).
        The position's row carries the distance only; the order's `triggerPrice` is a trailing stop's
        activation (Bybit's docs), so an activation moved out of reach while no engine ran, the distance
        kept, showed nowhere else: the trail that would never arm was restored as ours. A price behind the
        mark is a trail that has armed (or a level, if the venue shows an armed trail's level there, as the
        docs do not say it does not): not an alarm."""
        recorded = self._recorded.get(client_order_id)
        if (
            order_type is not OrderType.TRAILING_STOP_MARKET
            or recorded is None
            or recorded.activation_price is None
        ):
            return None
        return self._activation_off(symbol, recorded.activation_price, side, stop_rows, position)

    def _activation_off(
        self,
        symbol: str,
        expected: Decimal,
        side: OrderSide,
        stop_rows: list[Mapping[str, Any]],
        position: Mapping[str, Any],
        venue_order_id: str = "",
    ) -> Decimal | None:
        """The activation the venue's trailing-stop order on this side shows when it is not `expected` and
        still ahead of the mark (None: `expected`, or reached: an armed trail's level is behind the mark)."""
        for row in stop_rows:
            if (
                row.get("symbol") == symbol
                and row.get("stopOrderType") == "TrailingStop"
                and _on_side(row, side)
                and (not venue_order_id or str(row.get("orderId", "")) == venue_order_id)
            ):
                shown = _positive(row.get("triggerPrice"))
                mark = _positive(position.get("markPrice"))
                tick = self._market(symbol).tick_size
                if shown is None or abs(shown - expected) < tick:
                    return None
                if mark is None:  # nothing says it has armed: another activation is not ours
                    return shown
                ahead = shown > mark if side is OrderSide.SELL else shown < mark  # (SELL closes a long)
                return shown if ahead else None
        return None

    def _activation_moved_while_away(
        self,
        client_order_id: str,
        symbol: str,
        side: OrderSide,
        row: Mapping[str, Any],
        distance: Decimal,
        activation: Decimal,
    ) -> _PositionStop:
        """Our recorded trailing stop, its activation moved by someone else: ended as of now (cancelled: not
        ours), said once, and remembered so that ours is set again, not theirs adopted."""
        recorded = self._recorded[client_order_id]
        stop = self._recorded_stop(
            client_order_id, symbol, side, OrderType.TRAILING_STOP_MARKET, row, distance
        )
        stop.status, stop.updated_at, stop.confirmed = OrderStatus.CANCELED, time.time(), True
        stop.displaced_by = distance
        logger.warning(
            "%s %s: the position's trailing stop has activePrice %s, not our %s (%s): moved by someone else, "
            "so not our stop; ours is set again",
            self.kind,
            symbol,
            _wire(activation),
            _wire(recorded.activation_price),
            client_order_id,
        )
        return stop

    def expect_recorded(
        self,
        client_order_id: str,
        *,
        side: OrderSide | None = None,
        stop_price: Decimal | None = None,
        callback_rate: Decimal | None = None,
        activation_price: Decimal | None = None,
        trail_distance: Decimal | None = None,
        symbol: str | None = None,
        recorded_at: float | None = None,
    ) -> None:
        """`ChecksRecordedStops`: what an earlier process set the stop under this id to, and the side that
        closes its position. A look-up of an id this process does not hold took the position's field,
        whatever it held, for that stop: a hard stop someone widened while no engine ran was restored as
        ours (and, in hedge mode, the other side's stop when ours had none)."""
        self._recorded[client_order_id] = _RecordedStop(
            stop_price, callback_rate, activation_price, side, trail_distance, symbol, recorded_at
        )

    def forget_recorded(self, client_order_ids: Iterable[str]) -> None:
        """`ChecksRecordedStops`: their position ended."""
        for client_order_id in client_order_ids:
            self._recorded.pop(client_order_id, None)

    def _earlier_recorded_holds(
        self,
        symbol: str,
        client_order_id: str,
        order_type: OrderType,
        value: Decimal,
        row: Mapping[str, Any],
    ) -> bool:
        """`value` is what another recorded stop of ours in the same field of the same position was set to."""
        match = _STOP_KIND_IN_ID.search(client_order_id)
        assert match is not None
        position = client_order_id[: match.start()]
        for other in self._recorded:
            found = _STOP_KIND_IN_ID.search(other)
            if other == client_order_id or found is None or other[: found.start()] != position:
                continue
            if found.group(1) != match.group(1):
                continue
            if self._holds_recorded(symbol, other, order_type, value, row):
                return True
        return False

    def _recorded_value(
        self, symbol: str, client_order_id: str, order_type: OrderType, row: Mapping[str, Any]
    ) -> Decimal | None:
        """The value the position's field held for this recorded stop, as sent on today's grid: the hard
        stop's price, or the trailing distance: as it was taken, when recorded; else what its callback gave
        at its activation price, or for one armed at the mark, at the position's entry price (the mark then
        was not recorded). None: nothing recorded to check."""
        recorded = self._recorded.get(client_order_id)
        if recorded is None:
            return None
        if order_type is OrderType.STOP_MARKET:
            return recorded.stop_price
        if recorded.distance is not None:
            return recorded.distance
        reference = recorded.activation_price or _positive(row.get("avgPrice"))
        if reference is None or recorded.callback_rate is None:
            return None
        return _trailing_distance(self._market(symbol), reference, recorded.callback_rate)

    def _holds_recorded(
        self,
        symbol: str,
        client_order_id: str,
        order_type: OrderType,
        value: Decimal,
        row: Mapping[str, Any],
    ) -> bool:
        """`value`, in the position's field, is the recorded stop's as far as the venue can show it: a hard
        stop within one tick of its price (Bybit shows a stop set before a tick-size change on the new
        grid), a trailing distance near ours (`_our_distance`)."""
        recorded = self._recorded.get(client_order_id)
        expected = self._recorded_value(symbol, client_order_id, order_type, row)
        if recorded is None or expected is None:
            return False
        market = self._market(symbol)
        if order_type is OrderType.STOP_MARKET:
            return abs(value - expected) < market.tick_size
        if recorded.distance is not None:
            # As it was taken: a tick's room for a tick-size change since (the venue keeps the stop).
            return abs(value - recorded.distance) <= market.tick_size
        assert recorded.callback_rate is not None
        return _our_distance(market, value, recorded.callback_rate, recorded.activation_price, row)

    def _displaced_while_away(
        self,
        client_order_id: str,
        symbol: str,
        side: OrderSide,
        order_type: OrderType,
        row: Mapping[str, Any],
        expected: Decimal,
        value: Decimal,
    ) -> _PositionStop:
        """Our recorded stop, whose field holds another value: someone else's in its place. Ended as of now
        (cancelled: not ours), said once, and remembered so that ours is set again, not theirs adopted."""
        stop = self._recorded_stop(client_order_id, symbol, side, order_type, row, expected)
        self._moved_by_someone(stop, value)
        return stop

    def _recorded_stop(
        self,
        client_order_id: str,
        symbol: str,
        side: OrderSide,
        order_type: OrderType,
        row: Mapping[str, Any],
        value: Decimal,
    ) -> _PositionStop:
        """Our recorded stop named from its position's row at its recorded value, remembered under its id."""
        recorded = self._recorded[client_order_id]
        stop = _field_stop(
            client_order_id,
            symbol,
            side,
            order_type,
            row,
            value,
            activation_price=recorded.activation_price,
            callback_rate=recorded.callback_rate,
        )
        self._stops[client_order_id] = stop
        return stop

    def _attach_venue_order(self, stop: _PositionStop, stop_rows: list[Mapping[str, Any]]) -> None:
        """The venue's order behind our stop: its id, when it was made, a trailing stop's current level."""
        for row in stop_rows:
            if (
                row.get("symbol") == stop.symbol
                and row.get("stopOrderType") == _STOP_ORDER_TYPE[stop.type]
                and _on_side(row, stop.side)
            ):
                stop.venue_order_id = str(row.get("orderId") or stop.venue_order_id)
                stop.created_at = min(stop.created_at, _seconds(row.get("createdTime"), stop.created_at))
                if stop.type is OrderType.TRAILING_STOP_MARKET:
                    stop.stop_price = _positive(row.get("triggerPrice"))
                return

    async def _resolve(self, stop: _PositionStop) -> Order:
        """The stop's state from the venue: its value in the position's field → working; gone → filled if
        the venue has an execution of it (with its price), else cancelled (the position was closed
        otherwise, or the stop removed or replaced); an unconfirmed stop the position never showed was never
        set (NotFound)."""
        if stop.status is not OrderStatus.NEW:
            return self._snapshot(stop)
        told = self._bybit_streams.ended(stop.client_order_id)
        if told is not None and not (told.status is OrderStatus.FILLED and told.average_price is None):
            # The account stream said how it ended (Bybit deactivates a closed position's stops); a fill it
            # told without a price is read from the execution list below.
            stop.confirmed, stop.status, stop.updated_at = True, told.status, told.updated_at
            stop.filled_quantity, stop.average_price = told.filled_quantity, told.average_price
            stop.venue_order_id = told.venue_order_id or stop.venue_order_id
            return self._snapshot(stop)
        row = _row_closed_by(await self._position_rows(stop.symbol), stop.symbol, stop.side)
        value = _positive(row.get(_FIELD[stop.type])) if row is not None else None
        expected = stop.stop_price if stop.type is OrderType.STOP_MARKET else stop.distance
        # Only its own value is this stop: another in the field is a later stop's, maybe the next
        # position's on the symbol (taken for this one, its cancel cleared that position's stop).
        if value is not None and self._same(stop.symbol, value, expected):
            if not stop.confirmed:  # its call's answer never came: the position shows it set
                stop.confirmed = True
                # It replaced the stop of its kind it was sent to replace: that one is no longer ours to
                # cancel (a cancel is the field set to 0, which would clear this one).
                self._remember(stop)
            return self._snapshot(stop)
        if value is not None:
            self._note_displaced(stop, value)
        fill = await self._stop_fill(stop)
        if fill is None and not stop.confirmed:
            self._forget(stop)
            raise NotFound(stop.symbol, stop.client_order_id)
        stop.confirmed, stop.updated_at = True, time.time()
        if fill is None:
            stop.status = OrderStatus.CANCELED
        else:
            stop.status, (stop.filled_quantity, stop.average_price, stop.venue_order_id) = (
                OrderStatus.FILLED,
                fill,
            )
        return self._snapshot(stop)

    async def _stop_fill(self, stop: _PositionStop) -> tuple[Decimal, Decimal, str] | None:
        """The venue's execution of this stop since it was set: (quantity, average price, order id)."""
        answer = await self._read(
            partial(
                self._exchange.privateGetV5ExecutionList,
                {"category": "linear", "symbol": stop.symbol, "limit": _EXECUTION_PAGE},
            ),
            "execution/list",
            symbol=stop.symbol,
            client_order_id=stop.client_order_id,
        )
        rows = (answer.get("result") or {}).get("list", [])
        # On the venue's clock: ours less the offset ccxt measured (ms, ours minus the venue's), a second
        # of slack. And not before the latest trade that opened a position on this side: an earlier
        # position's stop on the symbol filled before this one's opened (its fill and PnL were taken for a
        # position closed by hand, and a hard stop removed by hand recorded filled, a reviewer).
        offset = int(self._exchange.options.get("timeDifference") or 0)
        since_ms = int(stop.created_at * 1000) - offset - 1000
        opening = OrderSide.BUY if stop.side is OrderSide.SELL else OrderSide.SELL
        since_ms = max(
            [since_ms]
            + [
                int(row.get("execTime") or 0)
                for row in rows
                if row.get("side")
                and _on_side(row, opening)
                and row.get("execType", "Trade") == "Trade"
                and _decimal(row.get("closedSize"), _ZERO) == _ZERO
            ]
        )
        fills: dict[str, list[tuple[Decimal, Decimal]]] = {}
        for row in rows:
            if (
                row.get("stopOrderType") != _STOP_ORDER_TYPE[stop.type]
                or row.get("execType", "Trade") != "Trade"
                or not _on_side(row, stop.side)
            ):
                continue
            if int(row.get("execTime") or 0) < since_ms:
                continue
            qty, price = _positive(row.get("execQty")), _positive(row.get("execPrice"))
            if qty is not None and price is not None:
                fills.setdefault(str(row.get("orderId", "")), []).append((qty, price))
        if not fills:
            return None
        order_id, parts = next(iter(fills.items()))  # newest first: the latest execution of this kind
        total = sum((qty for qty, _ in parts), _ZERO)
        average = sum((qty * price for qty, price in parts), _ZERO) / total
        return total, average, order_id

    def _snapshot(self, stop: _PositionStop) -> Order:
        return Order(
            client_order_id=stop.client_order_id,
            venue_order_id=stop.venue_order_id
            or f"{stop.symbol}:{'sl' if stop.type is OrderType.STOP_MARKET else 'ts'}:{int(stop.created_at * 1e6)}",
            symbol=stop.symbol,
            side=stop.side,
            type=stop.type,
            status=stop.status,
            quantity=stop.quantity,
            filled_quantity=stop.filled_quantity if stop.status is OrderStatus.FILLED else _ZERO,
            average_price=stop.average_price if stop.status is OrderStatus.FILLED else None,
            reduce_only=True,
            stop_price=stop.stop_price,
            activation_price=stop.activation_price,
            callback_rate=stop.callback_rate,
            created_at=stop.created_at,
            updated_at=stop.updated_at or stop.created_at,
            trail_distance=stop.distance if stop.type is OrderType.TRAILING_STOP_MARKET else None,
        )

    async def _fetch_regular(self, symbol: str, client_order_id: str) -> Order:
        request = {"category": "linear", "symbol": symbol, "orderLinkId": client_order_id}
        for method, what in (
            (self._exchange.privateGetV5OrderRealtime, "order/realtime"),
            (self._exchange.privateGetV5OrderHistory, "order/history"),
        ):
            answer = await self._read(
                partial(method, request), what, symbol=symbol, client_order_id=client_order_id
            )
            rows = (answer.get("result") or {}).get("list", [])
            if rows:
                return _bybit_order(rows[0])
        raise NotFound(symbol, client_order_id)


def _row_closed_by(rows: list[Mapping[str, Any]], symbol: str, side: OrderSide) -> Mapping[str, Any] | None:
    """The open position of `symbol` that an order of `side` reduces (a SELL reduces the long one)."""
    wanted = "Buy" if side is OrderSide.SELL else "Sell"
    return next((row for row in rows if row.get("symbol") == symbol and row.get("side") == wanted), None)


def _market_of(raw: Mapping[str, Any]) -> Market | None:
    """A linear instrument row of instruments-info as a `Market` (None without its tick or step)."""
    price_filter = raw.get("priceFilter") or {}
    lot = raw.get("lotSizeFilter") or {}
    tick, step = _positive(price_filter.get("tickSize")), _positive(lot.get("qtyStep"))
    if tick is None or step is None:
        return None
    leverage = _decimal((raw.get("leverageFilter") or {}).get("maxLeverage"), Decimal(1))
    status = str(raw.get("status", "Trading"))
    return Market(
        symbol=str(raw.get("symbol")),
        base_asset=str(raw.get("baseCoin", "")),
        quote_asset=str(raw.get("quoteCoin", "")),
        tick_size=tick,
        step_size=step,
        min_quantity=max(_positive(lot.get("minOrderQty")) or step, step),
        min_notional=_decimal(lot.get("minNotionalValue"), _ZERO),  # type: ignore[arg-type]
        max_leverage=max(1, int(leverage)),  # type: ignore[arg-type]
        # Settling, delisting: no entry goes there, but a position held on it is guarded.
        trading=status == "Trading",
        status=status,
    )


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


__all__ = ["BYBIT_DEFAULT_BUDGETS", "BYBIT_PROTECTIVE_BUDGETS", "BYBIT_REQUEST_BUDGETS", "BybitLinearVenue"]

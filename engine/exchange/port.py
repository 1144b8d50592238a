"""The exchange port: the only way the engine talks to a venue.

Modelled on ccxt's unified semantics, with three deliberate differences:

* symbols are exchange-native (`SFPUSDT`), never ccxt-unified (`SFP/USDT:USDT`); one mapping lives at the
  adapter edge;
* prices and quantities are `Decimal`, already quantized by the caller to the market's tick and step
  (a venue rejects anything else with `RejectCode.BAD_PRECISION` rather than rounding silently);
* every order-creating call carries a caller-chosen client order id (the idempotency key, at most 36
  characters of `[A-Za-z0-9._:/-]`). Like Binance, a venue refuses an id only while an order with it is
  *open*: an id whose order has ended may be accepted again. One id can never give two live orders, and an
  ambiguous outcome is resolved with `fetch_order(symbol, client_order_id)` — but a venue may answer
  `NotFound` for an order it accepted moments ago (read-after-write lag, `Capabilities.read_after_write_seconds`),
  so "absent" is proven only once that window has passed since the last send.

Protective orders are always reduce-only and trigger on the mark price. Errors are the types in
`engine.exchange.errors`; any method may also raise `Retryable`, `RateLimited`, `Banned` or
`OutcomeUnknown` (reads only raise the first three).
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Collection, Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pathlib import Path

    from engine.pacing import VenuePacing

MAX_CLIENT_ORDER_ID_LENGTH = 36
CLIENT_ORDER_ID_PATTERN = re.compile(r"^[.A-Z:/a-z0-9_-]{1,36}$")


class OrderSide(StrEnum):
    BUY = "buy"
    SELL = "sell"

    @property
    def opposite(self) -> OrderSide:
        return OrderSide.SELL if self is OrderSide.BUY else OrderSide.BUY


class PositionSide(StrEnum):
    LONG = "long"
    SHORT = "short"

    @property
    def closing_side(self) -> OrderSide:
        """The order side that reduces a position of this side."""
        return OrderSide.SELL if self is PositionSide.LONG else OrderSide.BUY


class OrderType(StrEnum):
    MARKET = "market"
    STOP_MARKET = "stop_market"
    TRAILING_STOP_MARKET = "trailing_stop_market"
    # Never sent by the engine: an operator's (or another client's) take-profit, seen on the account. It
    # fills the venue's cap on open conditional orders like the stops.
    TAKE_PROFIT_MARKET = "take_profit_market"


class OrderStatus(StrEnum):
    NEW = "new"  # accepted and working (a conditional order waiting for its trigger)
    TRIGGERED = (
        "triggered"  # a conditional order that fired and is on its way to a fill (Binance TRIGGERING /
    )
    # TRIGGERED): no longer protecting anything, not final either
    FILLED = "filled"
    CANCELED = "canceled"
    EXPIRED = "expired"  # triggered with nothing to reduce, so it ended without a fill

    @property
    def is_open(self) -> bool:
        """Working on the venue: a protective order in this state protects its position."""
        return self is OrderStatus.NEW

    @property
    def is_final(self) -> bool:
        return self in (OrderStatus.FILLED, OrderStatus.CANCELED, OrderStatus.EXPIRED)


@dataclass(frozen=True, slots=True)
class Market:
    symbol: str
    base_asset: str
    quote_asset: str
    tick_size: Decimal
    step_size: Decimal
    min_quantity: Decimal
    min_notional: Decimal
    max_leverage: int
    # Open for new positions. A market the venue lists in another state (settling, delisting, halted) is
    # still a market: a position held on it is guarded and its stops kept, but no entry is sent there.
    trading: bool = True
    status: str = "TRADING"  # the venue's own word for it

    def round_price(self, price: Decimal, rounding: str = ROUND_HALF_UP) -> Decimal:
        return (price / self.tick_size).to_integral_value(rounding=rounding) * self.tick_size

    def round_quantity(self, quantity: Decimal, rounding: str = ROUND_DOWN) -> Decimal:
        return (quantity / self.step_size).to_integral_value(rounding=rounding) * self.step_size

    def is_on_tick(self, price: Decimal) -> bool:
        return price % self.tick_size == 0

    def is_on_step(self, quantity: Decimal) -> bool:
        return quantity % self.step_size == 0


@dataclass(frozen=True, slots=True)
class MarkPrice:
    symbol: str
    price: Decimal
    timestamp: float  # epoch seconds at the venue


@dataclass(frozen=True, slots=True)
class Balance:
    asset: str
    wallet_balance: Decimal  # deposits + realized PnL − fees
    unrealized_pnl: Decimal
    available_balance: Decimal  # what new positions may use as initial margin

    @property
    def margin_balance(self) -> Decimal:
        return self.wallet_balance + self.unrealized_pnl


@dataclass(frozen=True, slots=True)
class VenuePosition:
    symbol: str
    side: PositionSide
    quantity: Decimal  # always > 0; the direction is `side`
    entry_price: Decimal
    mark_price: Decimal
    unrealized_pnl: Decimal
    leverage: int
    updated_at: float
    # Where the venue would liquidate it (its mark price crossing this), as the venue states it
    # (Binance `liquidationPrice`, Bybit `liqPrice`); None where it states none (0, empty: no liquidation
    # price at this leverage and margin).
    liquidation_price: Decimal | None = None


@dataclass(frozen=True, slots=True)
class Order:
    client_order_id: str
    venue_order_id: str
    symbol: str
    side: OrderSide
    type: OrderType
    status: OrderStatus
    quantity: Decimal
    filled_quantity: Decimal
    average_price: Decimal | None  # None until something filled
    reduce_only: bool
    stop_price: Decimal | None  # STOP_MARKET trigger (mark price)
    activation_price: Decimal | None  # TRAILING_STOP_MARKET arming price
    callback_rate: Decimal | None  # TRAILING_STOP_MARKET, percent (1 = 1 %)
    created_at: float
    updated_at: float
    # TRAILING_STOP_MARKET on a venue that trails by a price distance (Bybit): the distance it took. None
    # where the venue keeps the callback rate itself.
    trail_distance: Decimal | None = None

    @property
    def is_open(self) -> bool:
        return self.status.is_open


@dataclass(frozen=True, slots=True)
class OrderUpdate:
    """The venue pushed a change of one of the account's orders (Binance `ORDER_TRADE_UPDATE` and
    `ALGO_UPDATE`, Bybit's `order` topic), already translated: `order.client_order_id` is the id we sent
    (for a fired conditional order, the conditional order's id, not the child order's), `order.status` and
    `order.average_price` say how it stands after the event."""

    order: Order
    event_time: float  # epoch seconds at the venue
    reason: str = ""  # the venue's words for why (e.g. an expiry reason), for logs


@dataclass(frozen=True, slots=True)
class PositionUpdate:
    """The venue pushed a position's new size (Binance `ACCOUNT_UPDATE`, Bybit's `position` topic).
    `quantity` 0 means flat on that side."""

    symbol: str
    side: PositionSide
    quantity: Decimal
    entry_price: Decimal
    event_time: float  # epoch seconds at the venue
    # The liquidation price the venue pushed with it (Bybit's `position` topic `liqPrice`, the sim); None
    # where the stream carries none (Binance's ACCOUNT_UPDATE) or states none.
    liquidation_price: Decimal | None = None


@dataclass(frozen=True, slots=True)
class StreamGap:
    """The account stream was interrupted (reconnect, expired listen key, silent stall): events between
    `since` and now may be lost, so the reader must read the venue's state again (reconcile). Also the
    first item after (re)connecting, once the stream is live again."""

    stream: str
    since: float  # epoch seconds at the venue (or local wall clock) when events may have stopped
    reason: str


@dataclass(frozen=True, slots=True)
class LeverageChanged:
    """The account's leverage on a symbol was changed (Binance `ACCOUNT_CONFIG_UPDATE` with `ac`): by
    anyone with the key, the operator's web UI say. A position's liquidation price moves with it."""

    symbol: str
    leverage: int
    event_time: float  # epoch seconds at the venue


AccountEvent = OrderUpdate | PositionUpdate | StreamGap | LeverageChanged


@dataclass(frozen=True, slots=True)
class StreamState:
    """How one of the venue's push streams is doing, for health and the dashboard."""

    name: str  # "marks", "account"
    connected: bool
    last_event_at: float | None  # monotonic, of the last message of any kind (None: nothing yet)
    reconnects: int
    subscriptions: int = 0  # streams/topics subscribed right now
    detail: str = ""  # why it is not connected, or what it falls back to (e.g. "REST polling")


@dataclass(frozen=True, slots=True)
class RateBudget:
    limit: int
    window_seconds: float


@dataclass(frozen=True, slots=True)
class RequestBudget:
    """A request limit of the venue beside its order budgets: `limit` units per `window_seconds` under a
    `key` naming what is counted (`"weight"`: Binance's IP request weight; an endpoint path: one of
    Bybit's per-endpoint limits; `"ip"`: Bybit's per-IP request count)."""

    key: str
    limit: int
    window_seconds: float
    # Sends spread at least `window_seconds / limit` apart (less the pacer's headroom), not let out in a
    # burst when the window frees: for a venue that counts a rolling window at the request's *arrival*
    # (Bybit), a burst released the instant our window frees lands in the venue's window beside the
    # previous burst when the two arrive skewed by even a few milliseconds.
    spread: bool = False


@dataclass(frozen=True, slots=True)
class Capabilities:
    native_trailing_stop: bool
    callback_rate_min: Decimal  # percent
    callback_rate_max: Decimal  # percent
    attach_stop_to_entry: bool  # can a stop ride on the entry order itself
    max_conditional_orders: int  # per account
    order_rate_budgets: tuple[RateBudget, ...]
    # Seconds after a send during which a query may still answer "no such order" for an order the venue
    # accepted (Binance's algo service; 0 for a venue that reads its own writes at once).
    read_after_write_seconds: float = 0.0
    # How long after its timestamp the venue still runs a signed request (its `recvWindow`, as we send it);
    # an older one is refused unrun. 0: nothing runs after the client gave up (the sim venue).
    request_window_seconds: float = 0.0
    request_budgets: tuple[RequestBudget, ...] = ()  # limits on requests (not orders); paced by the engine
    # Where the venue counts protective orders apart from entries (Bybit: position/trading-stop has its own
    # per-second limit, order/create another), their budgets; empty: they share `order_rate_budgets`.
    protective_rate_budgets: tuple[RateBudget, ...] = ()
    # The price a native trailing stop follows: "mark" (Binance: callback rate on the mark price) or "last"
    # (Bybit: a fixed price distance from the last traded price, no trigger-by option).
    trailing_stop_follows: str = "mark"
    # The account stream names an order by the client id the venue holds it under, so its NEW proves that
    # order live (Binance, the sim). Bybit's position stops carry no client id: the adapter names a stop
    # order after the stop it can be, which proves nothing about a stop whose own answer has not come.
    stream_new_proves_live: bool = True
    # Each stop is an order of its own, cancelled by its id (Binance, the sim): one can outlive its position
    # (a fired stop still TRIGGERING). False: the stops are fields of the position (Bybit), which the venue
    # clears when the position closes; a closed position leaves none to sweep.
    stops_are_orders: bool = True
    # The account stream pushes a position's liquidation price with its size (Bybit's position topic, the
    # sim). False (Binance's ACCOUNT_UPDATE carries none): the engine reads the positions after a fill.
    liquidation_price_streamed: bool = False


@runtime_checkable
class ExchangePort(Protocol):
    @property
    def name(self) -> str:
        """A short venue id for logs and metrics (`sim`, `binance`)."""
        ...

    def capabilities(self) -> Capabilities: ...

    async def connect(self) -> None:
        """Open the session (start streams). Idempotent."""
        ...

    def attach_pacing(self, pacing: VenuePacing) -> None:
        """Pace every request through the engine's budgets from now on (a venue with no request limits of
        its own keeps the reference and sends as it did)."""
        ...

    async def close(self) -> None:
        """Stop streams and background tasks. Orders on the venue are left as they are."""
        ...

    async def load_markets(self) -> Mapping[str, Market]: ...

    async def fetch_mark_prices(self, symbols: Collection[str] | None = None) -> dict[str, MarkPrice]:
        """Snapshot of mark prices; all markets when `symbols` is None."""
        ...

    def watch_mark_prices(self, symbols: Collection[str] | None = None) -> AsyncIterator[MarkPrice]:
        """Stream of mark prices. Coalescing: a slow reader gets the latest price per symbol, never a
        backlog. Ends when the venue is closed."""
        ...

    def watch_account(self) -> AsyncIterator[AccountEvent]:
        """The account's order and position changes as the venue pushes them, from the call on, in the
        venue's order. After any interruption it yields a `StreamGap` (the reader reconciles: what was
        missed is not replayed). A venue with no account stream ends at once: the reconciler's polling is
        then the only source. Ends when the venue is closed."""
        ...

    def stream_states(self) -> tuple[StreamState, ...]:
        """The state of each push stream the venue runs (empty: everything is polled)."""
        ...

    async def fetch_balance(self) -> Balance: ...

    async def fetch_positions(self, symbol: str | None = None) -> list[VenuePosition]:
        """Open positions, of one symbol or all. An empty list of all positions may be a venue glitch
        (seen in production right after connecting): a position missing from it is confirmed gone only by
        asking for its symbol alone."""
        ...

    async def fetch_open_protective_orders(self, symbol: str | None = None) -> list[Order]:
        """Open conditional orders, of one symbol or all: STOP_MARKET and TRAILING_STOP_MARKET (ours and
        others'), and others' TAKE_PROFIT_MARKET, which share the venue's cap on open conditional orders."""
        ...

    async def set_leverage(self, symbol: str, leverage: int) -> int: ...

    async def create_market_order(
        self,
        symbol: str,
        side: OrderSide,
        quantity: Decimal,
        *,
        client_order_id: str,
        reduce_only: bool = False,
    ) -> Order: ...

    async def create_stop_market_order(
        self,
        symbol: str,
        side: OrderSide,
        quantity: Decimal,
        stop_price: Decimal,
        *,
        client_order_id: str,
    ) -> Order:
        """Reduce-only stop that triggers on the mark price (a SELL stop when mark <= stop_price)."""
        ...

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
        """Reduce-only trailing stop on the mark price. A SELL arms when mark >= activation_price (at once
        when None), then triggers at highest mark × (1 − callback_rate / 100); BUY mirrors it."""
        ...

    async def cancel_order(self, symbol: str, client_order_id: str) -> Order:
        """Cancel by client order id and return the order's final state. Cancelling an order that is no
        longer open is not an error: the returned status says what happened to it (filled, expired)."""
        ...

    async def fetch_order(self, symbol: str, client_order_id: str) -> Order: ...


@runtime_checkable
class ChecksRecordedStops(Protocol):
    """A venue whose stops are values in a field of the position that anyone with the account's key may
    change (Bybit's `stopLoss` and `trailingStop`): a new process cannot tell our stop from one set in its
    place while no engine ran. It is told what each stop an earlier process recorded was set to (a hard
    stop's price; a trailing stop's callback and activation), and answers a look-up of that id with the
    stop ended (cancelled, someone else's in its place) when the field holds another value. A trailing
    stop's distance, when recorded (`Order.trail_distance`), is the value itself: one armed at the mark has
    no activation price to work it out from."""

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
    ) -> None: ...

    def forget_recorded(self, client_order_ids: Iterable[str]) -> None:
        """Their position ended: what was recorded for these stops is no one's any more (judged against
        the next position on the symbol, it cried "moved by someone else")."""
        ...


@runtime_checkable
class StatesLeverages(Protocol):
    """A venue adapter whose positions read states every symbol's leverage, flat ones too (Binance's V2
    `positionRisk` in one-way mode): what a position opened there will have."""

    stated_leverages: Mapping[str, int]


@runtime_checkable
class ReadsVenueTime(Protocol):
    """A venue adapter that reads the venue's time again when a request's timestamp is refused (Binance
    -1021, Bybit 10002: `ClockRefused`), beside the refusal."""

    async def venue_time_read(self, limit: float, since: float = -math.inf) -> bool:
        """Until the venue's time being read again has been read (at once if none is being read), at most
        `limit` seconds; whether it was read successfully at or after `since` (monotonic, the engine's
        clock: a refusal's moment) — False when the read failed, is still under way at `limit`, or none
        was made for it."""
        ...


@runtime_checkable
class KeptInAFile(Protocol):
    """A venue that is a file of this program's (the sim venue's kept book): an operator starts a fresh
    exchange by moving it away, where a real account's orders would have to be cancelled on the venue."""

    @property
    def book_path(self) -> Path | None: ...


@runtime_checkable
class AttachesStopToEntry(Protocol):
    """A venue whose entry order can carry the position's hard stop (`Capabilities.attach_stop_to_entry`,
    Bybit: `order/create` with `stopLoss`): the position is born with its stop, never naked. The stop is
    then a protective order like any other, known under `stop_client_order_id` (`fetch_order`,
    `cancel_order`), a reduce-only stop on the mark price for the filled quantity."""

    async def create_market_order_with_stop(
        self,
        symbol: str,
        side: OrderSide,
        quantity: Decimal,
        stop_price: Decimal,
        *,
        client_order_id: str,
        stop_client_order_id: str,
    ) -> Order: ...

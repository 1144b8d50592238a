"""The sim venue's matching core: synchronous, I/O-free, every call takes `now` (epoch seconds).

It holds what an exchange holds — markets, mark prices, accounts (balance, one-way positions, orders) and
the order-rate budget — and applies Binance USDⓈ-M rules to them. Time only enters through `now`, so the
same sequence of calls gives the same state, and the same core can sit behind the async `SimVenue` or
behind an HTTP emulator that speaks Binance's wire format.

Rules modelled (Binance code in brackets):

* market orders fill at once at mark ± slippage (adverse, rounded away from the caller to the tick),
  taker fee on notional; non-reduce-only orders must meet the minimum notional [-4164] and fit the
  available margin [-2019]; quantities and prices must already sit on step and tick [-1111];
* one-way positions, weighted-average entry, a market order may flip a position;
* reduce-only orders that would open or increase a position are rejected [-2022]; a reduce-only market
  order larger than the position closes it and no more;
* STOP_MARKET (reduce-only, mark price): SELL fires when mark <= stop, BUY when mark >= stop; placing one
  that would fire at once is rejected [-2021];
* TAKE_PROFIT_MARKET (reduce-only, mark price; never sent by the engine, an operator's): SELL fires when
  mark >= stop, BUY when mark <= stop;
* TRAILING_STOP_MARKET (reduce-only, mark price, callback 0.1–10 %): see `trailing.py`; an activation price
  already reached (SELL: activation <= mark; BUY: activation >= mark) is rejected [-2021], a missing one
  arms at the current mark;
* at most `max_conditional_orders` open conditional orders per account [-4045];
* a client order id is refused while an order with it is still open or triggering [-4116 / -20132]; once
  that order has ended (filled, cancelled, expired) the id may be used again, and a query by it answers
  for the most recent order that carried it ("New Order" / "New Algo Order": `newClientOrderId` and
  `clientAlgoId` are "unique among open orders"). Ids follow Binance's pattern [-4015];
* a triggered stop fills against the position, capped at its size; with nothing to reduce it expires
  without a fill. Stops are never cancelled because a position closed: that orphan is the caller's to
  clean up;
* a fired conditional order may sit in TRIGGERING before its fill ("Event: Algo Order Update": NEW →
  TRIGGERING, the condition met and the order forwarded to the matching engine → TRIGGERED → FINISHED).
  Meanwhile its port status is `OrderStatus.TRIGGERED`: it is no longer an open conditional order, the
  position is still there, the id is still taken and a cancel changes nothing. The delay is instant by
  default, a number of seconds, or endless ("stuck"); due fills run at the start of every call that takes
  `now`, at the mark of that moment;
* a conditional order may read back as unknown for a while after it was placed (read-after-write lag, seen
  on Binance's algo service): queries and cancels by its ids answer `NotFound` and the open-order list
  leaves it out, yet it exists, triggers and holds its client id;
* a market order that opens or adds to a position may work before it fills (`set_market_fill`: Bybit's
  asynchronous order creation, whose answer only says the order was accepted): answered and read NEW,
  executed when due at the mark of then; and it may end part-filled, the rest cancelled (port status
  EXPIRED with a filled quantity). Closing orders always execute at once, in full;
* order budget in fixed windows (default 300 / 10 s and 1 200 / min): over budget gives
  `RateLimited(retry_after)`; `ban_after_violations` violations within `violation_window_seconds` give
  `Banned(until)`, the ban doubling each time up to `max_ban_seconds`; while banned every call is refused.
  `order_counts` tells what the current windows hold (Binance's `X-MBX-ORDER-COUNT-*` headers).

`inspect` is the test oracle: the account as it is, through bans and read lag.

`capture_book` / `book_of` / `restore_book`: the whole book as JSON values and back, so the venue keeps it
across restarts (`engine.venues.sim.book` writes it); `book_revision` / `marks_revision` say when it moved.

Each position states the price its mark would be liquidated at (`VenuePosition.liquidation_price`),
worked out as isolated margin would from its entry, its leverage and a maintenance margin rate of
`MAINTENANCE_MARGIN_RATE`, rounded a tick towards the entry (none at leverage 1 for a long).

Not modelled: liquidation itself (a mark through that price liquidates nothing), cross margin's
liquidation price, funding, leverage brackets, limit orders and an order book, partial fills of
stops and closes, hedge mode, price bands, open-order margin, cancels counting against any budget.
"""

from __future__ import annotations

import heapq
import itertools
import math
import operator
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields, replace
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

from engine.exchange.errors import (
    Banned,
    DuplicateClientOrderId,
    InsufficientMargin,
    NotFound,
    RateLimited,
    RejectCode,
    Rejected,
    WouldTriggerImmediately,
)
from engine.exchange.port import (
    CLIENT_ORDER_ID_PATTERN,
    AccountEvent,
    Balance,
    Capabilities,
    Market,
    MarkPrice,
    Order,
    OrderSide,
    OrderStatus,
    OrderType,
    OrderUpdate,
    PositionSide,
    PositionUpdate,
    RateBudget,
    VenuePosition,
)
from engine.venues.sim.settings import SimVenueSettings
from engine.venues.sim.trailing import TrailingStopState
from engine.venues.sim.universe import Listing

DEFAULT_ACCOUNT = "main"
QUOTE_ASSET = "USDT"
STUCK = math.inf  # a trigger delay that never ends: the fired order stays TRIGGERING
CALLBACK_RATE_MIN = Decimal("0.1")
CALLBACK_RATE_MAX = Decimal("10")
# Binance answers queries for ended orders for a limited time (3 days for cancelled/expired ones); the
# kept book drops ended orders older than this, so it does not grow without end.
ENDED_ORDER_RETENTION_SECONDS = 3 * 24 * 3600.0
# The maintenance margin rate of the lowest notional bracket (Binance 0.4–1 %, Bybit 0.5 % for the large
# symbols): one rate for every symbol here.
MAINTENANCE_MARGIN_RATE = Decimal("0.005")
_ZERO = Decimal(0)
_BPS = Decimal(10_000)


def liquidation_price(
    market: Market, long: bool, entry_price: Decimal, leverage: int, maintenance: Decimal
) -> Decimal | None:
    """Isolated margin's liquidation price: where the position's loss leaves only its maintenance margin
    (long: entry × (1 − 1/leverage) / (1 − maintenance); short: entry × (1 + 1/leverage) / (1 + maintenance)),
    rounded a tick towards the entry. None where no mark above 0 liquidates it."""
    inverse = Decimal(1) / Decimal(leverage)
    if long:
        price = entry_price * (1 - inverse) / (1 - maintenance)
        rounded = market.round_price(price, ROUND_CEILING)
        return rounded if rounded > 0 else None
    price = entry_price * (1 + inverse) / (1 + maintenance)
    return market.round_price(price, ROUND_FLOOR)


def _fires_at_price(order_type: OrderType, side: OrderSide, price: Decimal, mark: Decimal) -> bool:
    """A stop fires when the mark falls to its price (a SELL; a BUY when it rises to it), a take-profit when
    the mark rises to it (a SELL; a BUY when it falls to it)."""
    falls_to = (side is OrderSide.SELL) == (order_type is OrderType.STOP_MARKET)
    return mark <= price if falls_to else mark >= price


@dataclass(slots=True)
class _OrderRecord:
    client_order_id: str
    venue_order_id: str
    symbol: str
    side: OrderSide
    type: OrderType
    quantity: Decimal
    reduce_only: bool
    created_at: float
    stop_price: Decimal | None = None
    activation_price: Decimal | None = None
    callback_rate: Decimal | None = None
    trailing: TrailingStopState | None = None
    status: OrderStatus = OrderStatus.NEW
    filled_quantity: Decimal = _ZERO
    average_price: Decimal | None = None
    updated_at: float = 0.0
    # Binance-side misbehaviour carried by this order: seconds it reads as unknown after placement, and
    # seconds it sits TRIGGERING once fired (None: whatever the core's setting is when it fires).
    visible_at: float = 0.0
    trigger_delay: float | None = None
    # A working market order (`set_market_fill`): the share of its quantity that fills when it comes due.
    fill_share: Decimal | None = None

    @property
    def conditional(self) -> bool:
        return self.type is not OrderType.MARKET

    def snapshot(self) -> Order:
        return Order(
            client_order_id=self.client_order_id,
            venue_order_id=self.venue_order_id,
            symbol=self.symbol,
            side=self.side,
            type=self.type,
            status=self.status,
            quantity=self.quantity,
            filled_quantity=self.filled_quantity,
            average_price=self.average_price,
            reduce_only=self.reduce_only,
            stop_price=self.stop_price,
            activation_price=self.activation_price,
            callback_rate=self.callback_rate,
            created_at=self.created_at,
            updated_at=self.updated_at,
        )


@dataclass(slots=True)
class _PositionRecord:
    quantity: Decimal  # signed: > 0 long, < 0 short
    entry_price: Decimal
    updated_at: float


@dataclass(slots=True)
class _RateState:
    windows: dict[float, tuple[int, int]] = field(default_factory=dict)  # window -> (index, count)
    violations: deque[float] = field(default_factory=deque)
    banned_until: float = 0.0
    bans: int = 0


@dataclass(slots=True)
class _Account:
    wallet: Decimal
    name: str = DEFAULT_ACCOUNT  # its id in the core's accounts (what account listeners are told)
    leverage: dict[str, int] = field(default_factory=dict)
    positions: dict[str, _PositionRecord] = field(default_factory=dict)
    # Every order ever, by client id, oldest first (an id is reused once its order has ended), and by
    # venue id.
    orders: dict[str, list[_OrderRecord]] = field(default_factory=dict)
    by_venue_id: dict[str, _OrderRecord] = field(default_factory=dict)
    triggering: dict[str, _OrderRecord] = field(default_factory=dict)  # fired, fill pending; by venue id
    open_conditional: dict[str, dict[str, _OrderRecord]] = field(
        default_factory=dict
    )  # symbol -> id -> order
    open_conditional_count: int = 0
    rate: _RateState = field(default_factory=_RateState)


@dataclass(frozen=True, slots=True)
class _Execution:
    quantity: Decimal
    price: Decimal


@dataclass(frozen=True, slots=True)
class Inspection:
    """An account as it is, for test oracles: no ban refuses it and no read lag hides anything."""

    positions: tuple[VenuePosition, ...]
    open_conditional: tuple[Order, ...]  # placement order; read-lagged ones included
    triggering: tuple[Order, ...]  # fired, fill pending (`updated_at` is when they fired)
    order_counts: Mapping[float, int]  # see `SimCore.order_counts`
    banned_until: float | None  # None when not banned
    rate_violations: int = 0  # refused for the rate within `violation_window_seconds`, toward a ban
    bans: int = 0  # every ban so far
    orders_placed: int = 0  # every order the venue took (a refused one is not), ended ones it forgot aside


class SimCore:
    def __init__(self, listings: Mapping[str, Listing], settings: SimVenueSettings, now: float) -> None:
        self._settings = settings
        self._markets: dict[str, Market] = {symbol: listing.market for symbol, listing in listings.items()}
        self._marks: dict[str, Decimal] = {
            symbol: listing.initial_price for symbol, listing in listings.items()
        }
        self._mark_times: dict[str, float] = dict.fromkeys(listings, now)
        self._accounts: dict[str, _Account] = {}
        self._next_order_id = 1
        # Deferred fills, of fired orders and working market orders: (due, sequence, account, order). Stuck
        # ones never come due.
        self._due: list[tuple[float, int, _Account, _OrderRecord]] = []
        self._sequence = itertools.count()
        self._trigger_delay: float | None = None
        self._trigger_delay_by_symbol: dict[str, float | None] = {}
        self._read_lag = 0.0
        self._market_fill: tuple[float, Decimal] = (0.0, Decimal(1))  # see `set_market_fill`
        self._stop_fill_share = Decimal(1)  # see `set_stop_fill`
        # Called, synchronously and in the venue's order, with (account id, event) for every change of an
        # order's status and of a position: what a venue's account stream pushes (see `add_account_listener`).
        self._account_listeners: list[Callable[[str, AccountEvent], None]] = []
        # Bumped by every change to what the book holds (orders, positions, balances, order budgets) and to
        # the marks: a keeper of the book saves when they move (see `engine.venues.sim.book`).
        self.book_revision = 0
        self.marks_revision = 0

    # ---- market data -------------------------------------------------------------------------------

    @property
    def markets(self) -> Mapping[str, Market]:
        return self._markets

    def capabilities(self) -> Capabilities:
        return Capabilities(
            native_trailing_stop=True,
            callback_rate_min=CALLBACK_RATE_MIN,
            callback_rate_max=CALLBACK_RATE_MAX,
            attach_stop_to_entry=False,
            max_conditional_orders=self._settings.max_conditional_orders,
            order_rate_budgets=tuple(
                RateBudget(limit=limit, window_seconds=window) for window, limit in self._budgets()
            ),
            read_after_write_seconds=self._read_lag,
            liquidation_price_streamed=True,
        )

    def _budgets(self) -> tuple[tuple[float, int], ...]:
        limits = self._settings.rate_limits
        return ((10.0, limits.orders_per_10s), (60.0, limits.orders_per_minute))

    # ---- venue behaviour (tests, rehearsals) -------------------------------------------------------

    def set_trigger_delay(self, seconds: float | None, *, symbol: str | None = None) -> None:
        """How long a conditional order that fires from now on sits TRIGGERING before its fill executes.

        None or 0: at once (the default); `STUCK` (math.inf): never. With `symbol`, for that symbol only;
        without, for every symbol that has no setting of its own. A delay given at placement wins.
        """
        delay = _checked_seconds(seconds, "trigger delay")
        if symbol is None:
            self._trigger_delay = delay
        else:
            self._trigger_delay_by_symbol[self._market(symbol).symbol] = delay

    def end_stuck_triggers(self, symbol: str, now: float) -> int:
        """Forward now the fired orders of `symbol` stuck in TRIGGERING (a `STUCK` delay): their fill runs
        at the next call, as any fill due (reduce-only: with no position to reduce, they expire). Returns
        how many there were."""
        due = {id(entry[3]) for entry in self._due}
        ended = 0
        for account in self._accounts.values():
            for order in account.triggering.values():
                if order.symbol == symbol and id(order) not in due:
                    heapq.heappush(self._due, (now, next(self._sequence), account, order))
                    ended += 1
        return ended

    def set_stop_fill(self, share: Decimal = Decimal(1)) -> None:
        """How much of a fired stop's quantity executes when its fill comes: `share` (rounded down to the
        step), the rest expired, as a triggered MARKET order in a thin book ends on Binance (status
        EXPIRED with an executed quantity: "MARKET orders that partially fill"). The position keeps the
        rest. The default, 1: all of it."""
        if not 0 < share <= 1:
            raise ValueError(f"stop fill share must be in (0, 1], not {share}")
        self._stop_fill_share = share

    def set_read_lag(self, seconds: float) -> None:
        """Conditional orders placed from now on read back as unknown for `seconds` (0: never)."""
        self._read_lag = _checked_seconds(seconds, "read lag") or 0.0

    def set_market_fill(self, seconds: float = 0.0, *, share: Decimal = Decimal(1)) -> None:
        """How market orders that open or add to a position, placed from now on, execute: `seconds` after
        they are accepted (answered and read as NEW meanwhile, as Bybit's asynchronous order creation
        does), at the mark of that moment, and only `share` of their quantity (rounded down to the step;
        the rest cancelled, the order ending part-filled: Bybit `PartiallyFilledCanceled`, Binance
        `EXPIRED` with an executed quantity). The default, 0 s and all of it: at once, in full. Closing
        (reduce-only) orders always execute at once."""
        delay = _checked_seconds(seconds, "market fill delay") or 0.0
        if delay == STUCK:
            raise ValueError("market fill delay must be finite")
        if not 0 < share <= 1:
            raise ValueError(f"market fill share must be in (0, 1], not {share}")
        self._market_fill = (delay, share)

    def add_account_listener(self, listener: Callable[[str, AccountEvent], None]) -> None:
        """Be told of every account event as it happens: `listener(account_id, event)` with an
        `OrderUpdate` whenever an order is placed (NEW), cancelled, fires (TRIGGERED), fills (FILLED, with
        its average price) or expires, and a `PositionUpdate` whenever a position's size changes (0: flat).
        Nothing is coalesced: these are events, not marks. A listener must not call back into the core."""
        self._account_listeners.append(listener)

    def remove_account_listener(self, listener: Callable[[str, AccountEvent], None]) -> None:
        if listener in self._account_listeners:
            self._account_listeners.remove(listener)

    def _order_event(self, account: _Account, order: _OrderRecord, now: float) -> None:
        if self._account_listeners:
            event = OrderUpdate(order=order.snapshot(), event_time=now)
            for listener in tuple(self._account_listeners):
                listener(account.name, event)

    def _position_event(
        self,
        account: _Account,
        symbol: str,
        side: PositionSide,
        quantity: Decimal,
        entry: Decimal,
        now: float,
    ) -> None:
        if self._account_listeners:
            leverage = self._leverage(account, symbol)
            liquidation = (
                liquidation_price(
                    self._markets[symbol], side is PositionSide.LONG, entry, leverage, MAINTENANCE_MARGIN_RATE
                )
                if quantity
                else None
            )
            event = PositionUpdate(
                symbol=symbol,
                side=side,
                quantity=quantity,
                entry_price=entry,
                event_time=now,
                liquidation_price=liquidation,
            )
            for listener in tuple(self._account_listeners):
                listener(account.name, event)

    def mark(self, symbol: str) -> Decimal:
        return self._marks[self._market(symbol).symbol]

    def mark_prices(self, symbols: Collection[str] | None = None) -> dict[str, MarkPrice]:
        wanted = self._marks.keys() if symbols is None else [self._market(s).symbol for s in symbols]
        return {s: MarkPrice(symbol=s, price=self._marks[s], timestamp=self._mark_times[s]) for s in wanted}

    def change_tick_size(self, symbol: str, tick_size: Decimal) -> None:
        """The venue changes a symbol's price step (Binance's PRICE_FILTER, Bybit's priceFilter.tickSize;
        both do, announced ahead). Orders already placed keep their prices, off the new grid or not; every
        price sent from now on must be on it."""
        if tick_size <= 0:
            raise ValueError(f"tick size must be positive, not {tick_size}")
        self._markets[symbol] = replace(self._markets[symbol], tick_size=tick_size)

    def set_mark(self, symbol: str, price: Decimal, now: float) -> list[Order]:
        """Publish a new mark and run the conditional orders of `symbol` against it.

        Returns the orders that changed: deferred fills that came due (filled or expired), then the orders
        this mark fired (triggered, filled or expired), in the order they were placed.
        """
        market = self._market(symbol)
        if price <= 0 or not market.is_on_tick(price):
            raise ValueError(f"mark for {symbol} must be a positive multiple of {market.tick_size}")
        changed = self._settle(now)  # fills that came due before this mark existed
        self._marks[symbol] = price
        self._mark_times[symbol] = now
        self.marks_revision += 1
        for account in self._accounts.values():
            working = account.open_conditional.get(symbol)
            if not working:
                continue
            for order in list(working.values()):
                # A trailing stop's arming and extreme move with the marks, and are kept with them.
                if self._fires(order, price):
                    self._fire(account, order, now)
                    changed.append(order.snapshot())
        if changed:
            self.book_revision += 1
        return changed

    # ---- account reads -----------------------------------------------------------------------------

    def check_access(self, now: float, account_id: str = DEFAULT_ACCOUNT) -> None:
        """Raise `Banned` while the account is banned; every call starts with this."""
        self._enter(now, account_id)

    def order_counts(self, now: float, account_id: str = DEFAULT_ACCOUNT) -> dict[float, int]:
        """New orders counted in the current fixed window of each order budget, keyed by the window's
        length in seconds (10.0, 60.0): what Binance reports in `X-MBX-ORDER-COUNT-10S` / `-1M`."""
        rate = self._account(account_id).rate
        counts = {}
        for window, _limit in self._budgets():
            index, count = rate.windows.get(window, (None, 0))
            counts[window] = count if index == math.floor(now / window) else 0
        return counts

    def inspect(self, now: float, account_id: str = DEFAULT_ACCOUNT) -> Inspection:
        """The account as it is (see `Inspection`); due fills run first, nothing is refused or hidden."""
        self._settle(now)
        account = self._account(account_id)
        triggering = sorted(account.triggering.values(), key=lambda o: int(o.venue_order_id))
        banned = account.rate.banned_until
        return Inspection(
            positions=tuple(self._positions(account)),
            open_conditional=tuple(
                o.snapshot() for working in account.open_conditional.values() for o in working.values()
            ),
            triggering=tuple(o.snapshot() for o in triggering),
            order_counts=self.order_counts(now, account_id),
            banned_until=banned if now < banned else None,
            rate_violations=sum(
                1
                for v in account.rate.violations
                if v > now - self._settings.rate_limits.violation_window_seconds
            ),
            bans=account.rate.bans,
            orders_placed=len(account.by_venue_id),
        )

    def balance(self, now: float, account_id: str = DEFAULT_ACCOUNT) -> Balance:
        account = self._enter(now, account_id)
        unrealized = sum((self._unrealized(symbol, p) for symbol, p in account.positions.items()), _ZERO)
        return Balance(
            asset=QUOTE_ASSET,
            wallet_balance=account.wallet,
            unrealized_pnl=unrealized,
            available_balance=self._available(account),
        )

    def positions(self, now: float, account_id: str = DEFAULT_ACCOUNT) -> list[VenuePosition]:
        return self._positions(self._enter(now, account_id))

    def _positions(self, account: _Account) -> list[VenuePosition]:
        return [
            VenuePosition(
                symbol=symbol,
                side=PositionSide.LONG if record.quantity > 0 else PositionSide.SHORT,
                quantity=abs(record.quantity),
                entry_price=record.entry_price,
                mark_price=self._marks[symbol],
                unrealized_pnl=self._unrealized(symbol, record),
                leverage=self._leverage(account, symbol),
                updated_at=record.updated_at,
                liquidation_price=liquidation_price(
                    self._markets[symbol],
                    record.quantity > 0,
                    record.entry_price,
                    self._leverage(account, symbol),
                    MAINTENANCE_MARGIN_RATE,
                ),
            )
            for symbol, record in account.positions.items()
        ]

    def open_protective_orders(
        self, now: float, symbol: str | None = None, account_id: str = DEFAULT_ACCOUNT
    ) -> list[Order]:
        account = self._enter(now, account_id)
        if symbol is not None:
            working = [*account.open_conditional.get(self._market(symbol).symbol, {}).values()]
        else:
            working = [order for orders in account.open_conditional.values() for order in orders.values()]
        return [order.snapshot() for order in working if order.visible_at <= now]

    def get_order(
        self,
        symbol: str,
        client_order_id: str,
        now: float,
        account_id: str = DEFAULT_ACCOUNT,
        *,
        conditional: bool | None = None,
    ) -> Order:
        """The most recent order of `symbol` with this client id; `conditional` narrows the search to
        conditional (algo) or regular orders, as Binance's two query endpoints do."""
        account = self._enter(now, account_id)
        return self._find(account, symbol, client_order_id, now, conditional).snapshot()

    def get_order_by_venue_id(
        self, symbol: str, venue_order_id: str, now: float, account_id: str = DEFAULT_ACCOUNT
    ) -> Order:
        account = self._enter(now, account_id)
        order = account.by_venue_id.get(venue_order_id)
        if order is None or order.symbol != symbol or now < order.visible_at:
            raise NotFound(symbol, venue_order_id)
        return order.snapshot()

    # ---- account writes ----------------------------------------------------------------------------

    def set_leverage(self, symbol: str, leverage: int, now: float, account_id: str = DEFAULT_ACCOUNT) -> int:
        account = self._enter(now, account_id)
        market = self._market(symbol)
        if not 1 <= leverage <= market.max_leverage:
            raise Rejected(
                RejectCode.INVALID_LEVERAGE, f"leverage {leverage} outside 1..{market.max_leverage}"
            )
        account.leverage[symbol] = leverage
        self.book_revision += 1
        return leverage

    def place_market_order(
        self,
        symbol: str,
        side: OrderSide,
        quantity: Decimal,
        client_order_id: str,
        now: float,
        *,
        reduce_only: bool = False,
        account_id: str = DEFAULT_ACCOUNT,
        fill_after: float | None = None,
    ) -> Order:
        """`fill_after`: this opening order's own delay before it executes (None: `set_market_fill`'s)."""
        account = self._enter(now, account_id)
        market = self._admit_order(account, symbol, quantity, client_order_id, now)
        if not reduce_only and quantity * self._marks[symbol] < market.min_notional:
            raise Rejected(RejectCode.MIN_NOTIONAL, f"notional must be no smaller than {market.min_notional}")
        delay, share = (0.0, Decimal(1)) if reduce_only else self._market_fill
        if fill_after is not None and not reduce_only:
            delay = _checked_seconds(fill_after, "market fill delay") or 0.0
            if delay == STUCK:
                raise ValueError("market fill delay must be finite")
        if delay or share != 1:
            order = self._record(
                account, symbol, side, OrderType.MARKET, quantity, client_order_id, now, reduce_only
            )
            order.fill_share = share
            self._order_event(account, order, now)  # NEW: accepted, working
            if delay:
                heapq.heappush(self._due, (now + delay, next(self._sequence), account, order))
            else:
                self._fill_working(account, order, now)
            return order.snapshot()
        execution = self._execute(account, symbol, side, quantity, now, reduce_only=reduce_only)
        order = self._record(
            account, symbol, side, OrderType.MARKET, quantity, client_order_id, now, reduce_only
        )
        order.status = OrderStatus.FILLED
        order.filled_quantity = execution.quantity
        order.average_price = execution.price
        self._order_event(account, order, now)
        return order.snapshot()

    def place_stop_market_order(
        self,
        symbol: str,
        side: OrderSide,
        quantity: Decimal,
        stop_price: Decimal,
        client_order_id: str,
        now: float,
        *,
        account_id: str = DEFAULT_ACCOUNT,
        read_lag: float | None = None,
        trigger_delay: float | None = None,
    ) -> Order:
        """A reduce-only STOP_MARKET on the mark. `read_lag` / `trigger_delay`: this order's own
        misbehaviour (None: the core's settings, see `set_read_lag` / `set_trigger_delay`)."""
        return self._place_at_price(
            OrderType.STOP_MARKET,
            symbol,
            side,
            quantity,
            stop_price,
            client_order_id,
            now,
            account_id=account_id,
            read_lag=read_lag,
            trigger_delay=trigger_delay,
        )

    def _place_at_price(
        self,
        order_type: OrderType,
        symbol: str,
        side: OrderSide,
        quantity: Decimal,
        stop_price: Decimal,
        client_order_id: str,
        now: float,
        *,
        account_id: str,
        read_lag: float | None,
        trigger_delay: float | None,
    ) -> Order:
        """A reduce-only conditional order that fires at `stop_price` on the mark (`_fires`); one that would
        fire at once is rejected [-2021]."""
        read_lag = _checked_seconds(read_lag, "read lag")
        trigger_delay = _checked_seconds(trigger_delay, "trigger delay")
        account = self._enter(now, account_id)
        market = self._admit_order(account, symbol, quantity, client_order_id, now)
        self._require_on_tick(market, stop_price, "stop price")
        self._require_reduces(account, symbol, side)
        if _fires_at_price(order_type, side, stop_price, self._marks[symbol]):
            raise WouldTriggerImmediately()
        self._require_conditional_room(account)
        order = self._record(account, symbol, side, order_type, quantity, client_order_id, now, True)
        order.stop_price = stop_price
        self._track_conditional(account, order, now, read_lag, trigger_delay)
        self._order_event(account, order, now)
        return order.snapshot()

    def place_take_profit_market_order(
        self,
        symbol: str,
        side: OrderSide,
        quantity: Decimal,
        stop_price: Decimal,
        client_order_id: str,
        now: float,
        *,
        account_id: str = DEFAULT_ACCOUNT,
        read_lag: float | None = None,
        trigger_delay: float | None = None,
    ) -> Order:
        """A reduce-only TAKE_PROFIT_MARKET on the mark (the engine sends none: an operator's take-profit):
        SELL fires when mark >= stop, BUY when mark <= stop; one that would fire at once is rejected
        [-2021]. It takes a place under the cap on open conditional orders like any stop."""
        return self._place_at_price(
            OrderType.TAKE_PROFIT_MARKET,
            symbol,
            side,
            quantity,
            stop_price,
            client_order_id,
            now,
            account_id=account_id,
            read_lag=read_lag,
            trigger_delay=trigger_delay,
        )

    def place_trailing_stop_order(
        self,
        symbol: str,
        side: OrderSide,
        quantity: Decimal,
        callback_rate: Decimal,
        client_order_id: str,
        now: float,
        *,
        activation_price: Decimal | None = None,
        account_id: str = DEFAULT_ACCOUNT,
        read_lag: float | None = None,
        trigger_delay: float | None = None,
    ) -> Order:
        """A reduce-only TRAILING_STOP_MARKET on the mark; `read_lag` / `trigger_delay` as for stops."""
        read_lag = _checked_seconds(read_lag, "read lag")
        trigger_delay = _checked_seconds(trigger_delay, "trigger delay")
        account = self._enter(now, account_id)
        market = self._admit_order(account, symbol, quantity, client_order_id, now)
        if not CALLBACK_RATE_MIN <= callback_rate <= CALLBACK_RATE_MAX:
            raise Rejected(
                RejectCode.INVALID_PARAMETER,
                f"callback rate {callback_rate} outside {CALLBACK_RATE_MIN}..{CALLBACK_RATE_MAX}",
            )
        mark = self._marks[symbol]
        if activation_price is not None:
            self._require_on_tick(market, activation_price, "activation price")
        self._require_reduces(account, symbol, side)
        if activation_price is None:
            state = TrailingStopState(side, callback_rate, mark, armed=True, extreme=mark)
        else:
            # Binance: a SELL's activation must be above the latest (mark) price, a BUY's below it.
            crossed = activation_price <= mark if side is OrderSide.SELL else activation_price >= mark
            if crossed:
                raise WouldTriggerImmediately()
            state = TrailingStopState(side, callback_rate, activation_price)
        self._require_conditional_room(account)
        order = self._record(
            account, symbol, side, OrderType.TRAILING_STOP_MARKET, quantity, client_order_id, now, True
        )
        order.activation_price = activation_price
        order.callback_rate = callback_rate
        order.trailing = state
        self._track_conditional(account, order, now, read_lag, trigger_delay)
        self._order_event(account, order, now)
        return order.snapshot()

    def cancel_order(
        self, symbol: str, client_order_id: str, now: float, account_id: str = DEFAULT_ACCOUNT
    ) -> Order:
        """Cancel the open order with this id; an order that is no longer open (triggering, or ended) is
        left as it is and returned as it is."""
        account = self._enter(now, account_id)
        order = self._find(account, symbol, client_order_id, now)
        if order.status.is_open:
            self._untrack_conditional(account, order)
            order.status = OrderStatus.CANCELED
            order.updated_at = now
            self.book_revision += 1
            self._order_event(account, order, now)
        return order.snapshot()

    # ---- internals ---------------------------------------------------------------------------------

    def _enter(self, now: float, account_id: str) -> _Account:
        """What every account call does first: run the fills that came due, refuse a banned account."""
        self._settle(now)
        account = self._account(account_id)
        if now < account.rate.banned_until:
            raise Banned(account.rate.banned_until)
        return account

    def _account(self, account_id: str) -> _Account:
        account = self._accounts.get(account_id)
        if account is None:
            account = _Account(wallet=self._settings.starting_balance, name=account_id)
            self._accounts[account_id] = account
        return account

    def _market(self, symbol: str) -> Market:
        market = self._markets.get(symbol)
        if market is None:
            raise Rejected(RejectCode.BAD_SYMBOL, f"invalid symbol {symbol!r}")
        return market

    def leverages(self, now: float, account_id: str = DEFAULT_ACCOUNT) -> dict[str, int]:
        """Every symbol's leverage on the account (set, or the default), held or not."""
        account = self._enter(now, account_id)
        return {symbol: self._leverage(account, symbol) for symbol in self._markets}

    def _leverage(self, account: _Account, symbol: str) -> int:
        default = min(self._settings.default_leverage, self._markets[symbol].max_leverage)
        return account.leverage.get(symbol, default)

    @staticmethod
    def _find(
        account: _Account,
        symbol: str,
        client_order_id: str,
        now: float,
        conditional: bool | None = None,
    ) -> _OrderRecord:
        for order in reversed(account.orders.get(client_order_id, ())):
            if order.symbol == symbol and conditional in (None, order.conditional):
                if now < order.visible_at:  # reads do not know it yet: they see what came before
                    continue
                return order
        raise NotFound(symbol, client_order_id)

    def _admit_order(
        self, account: _Account, symbol: str, quantity: Decimal, client_order_id: str, now: float
    ) -> Market:
        """Checks shared by every new order, in the venue's order: budget, id, symbol, quantity."""
        self._consume_order_budget(account.rate, now)
        if not CLIENT_ORDER_ID_PATTERN.fullmatch(client_order_id):
            raise Rejected(
                RejectCode.INVALID_CLIENT_ORDER_ID, "client order id is not valid (1-36 of [.A-Za-z0-9:/_-])"
            )
        used = account.orders.get(client_order_id)
        # An id is refused while an order with it is live, so only the latest order with it can be.
        if used and not used[-1].status.is_final:
            raise DuplicateClientOrderId(client_order_id)
        market = self._market(symbol)
        if quantity <= 0:
            raise Rejected(RejectCode.QUANTITY_TOO_SMALL, "quantity must be greater than zero")
        if not market.is_on_step(quantity):
            raise Rejected(
                RejectCode.BAD_PRECISION, f"quantity {quantity} is not a multiple of {market.step_size}"
            )
        if quantity < market.min_quantity:
            raise Rejected(RejectCode.QUANTITY_TOO_SMALL, f"quantity below minimum {market.min_quantity}")
        return market

    def _consume_order_budget(self, rate: _RateState, now: float) -> None:
        self.book_revision += 1  # counts or violations change whatever the outcome
        counts: list[tuple[float, int, int]] = []
        for window, limit in self._budgets():
            index = math.floor(now / window)
            stored_index, count = rate.windows.get(window, (index, 0))
            if stored_index != index:
                count = 0
            if count >= limit:
                self._record_violation(rate, now)
                raise RateLimited(retry_after=(index + 1) * window - now)
            counts.append((window, index, count))
        for window, index, count in counts:
            rate.windows[window] = (index, count + 1)

    def _record_violation(self, rate: _RateState, now: float) -> None:
        limits = self._settings.rate_limits
        rate.violations.append(now)
        while rate.violations and rate.violations[0] <= now - limits.violation_window_seconds:
            rate.violations.popleft()
        if len(rate.violations) >= limits.ban_after_violations:
            duration = min(limits.ban_seconds * 2**rate.bans, limits.max_ban_seconds)
            rate.bans += 1
            rate.violations.clear()
            rate.banned_until = now + duration
            raise Banned(rate.banned_until)

    @staticmethod
    def _require_on_tick(market: Market, price: Decimal, what: str) -> None:
        if price <= 0 or not market.is_on_tick(price):
            raise Rejected(
                RejectCode.BAD_PRECISION, f"{what} {price} is not a positive multiple of {market.tick_size}"
            )

    @staticmethod
    def _require_reduces(account: _Account, symbol: str, side: OrderSide) -> None:
        position = account.positions.get(symbol)
        reduces = position is not None and (position.quantity > 0) == (side is OrderSide.SELL)
        if not reduces:
            raise Rejected(
                RejectCode.REDUCE_ONLY_REJECTED, "reduce-only order would open or increase a position"
            )

    def _require_conditional_room(self, account: _Account) -> None:
        if account.open_conditional_count >= self._settings.max_conditional_orders:
            raise Rejected(
                RejectCode.MAX_CONDITIONAL_ORDERS,
                f"reached the limit of {self._settings.max_conditional_orders} open conditional orders",
            )

    def _record(
        self,
        account: _Account,
        symbol: str,
        side: OrderSide,
        order_type: OrderType,
        quantity: Decimal,
        client_order_id: str,
        now: float,
        reduce_only: bool,
    ) -> _OrderRecord:
        order = _OrderRecord(
            client_order_id=client_order_id,
            venue_order_id=str(self._next_order_id),
            symbol=symbol,
            side=side,
            type=order_type,
            quantity=quantity,
            reduce_only=reduce_only,
            created_at=now,
            updated_at=now,
        )
        self._next_order_id += 1
        account.orders.setdefault(client_order_id, []).append(order)
        account.by_venue_id[order.venue_order_id] = order
        return order

    def _track_conditional(
        self,
        account: _Account,
        order: _OrderRecord,
        now: float,
        read_lag: float | None,
        trigger_delay: float | None,
    ) -> None:
        order.visible_at = now + (self._read_lag if read_lag is None else read_lag)
        order.trigger_delay = trigger_delay
        account.open_conditional.setdefault(order.symbol, {})[order.client_order_id] = order
        account.open_conditional_count += 1

    @staticmethod
    def _untrack_conditional(account: _Account, order: _OrderRecord) -> None:
        working = account.open_conditional.get(order.symbol, {})
        if working.pop(order.client_order_id, None) is not None:
            account.open_conditional_count -= 1

    @staticmethod
    def _fires(order: _OrderRecord, mark: Decimal) -> bool:
        if order.type in (OrderType.STOP_MARKET, OrderType.TAKE_PROFIT_MARKET):
            assert order.stop_price is not None
            return _fires_at_price(order.type, order.side, order.stop_price, mark)
        assert order.trailing is not None
        order.trailing = order.trailing.observe(mark)
        return order.trailing.triggers_at(mark)

    def _fire(self, account: _Account, order: _OrderRecord, now: float) -> None:
        self._untrack_conditional(account, order)
        order.updated_at = now
        delay = order.trigger_delay
        if delay is None:
            delay = self._trigger_delay_by_symbol.get(order.symbol, self._trigger_delay)
        order.status = OrderStatus.TRIGGERED  # the stream says so even when the fill follows at once
        self._order_event(account, order, now)
        if delay:  # forwarded to the matching engine, not filled yet: TRIGGERING on Binance
            account.triggering[order.venue_order_id] = order
            if delay < STUCK:
                heapq.heappush(self._due, (now + delay, next(self._sequence), account, order))
            return
        self._fill_fired(account, order, now)

    def _settle(self, now: float) -> list[Order]:
        """Execute the deferred fills due by `now`, earliest first; returns them."""
        settled: list[Order] = []
        while self._due and self._due[0][0] <= now:
            _due, _seq, account, order = heapq.heappop(self._due)
            order.updated_at = now
            if order.conditional:
                del account.triggering[order.venue_order_id]
                self._fill_fired(account, order, now)
            else:
                self._fill_working(account, order, now)
            settled.append(order.snapshot())
        if settled:
            self.book_revision += 1
        return settled

    def _fill_fired(self, account: _Account, order: _OrderRecord, now: float) -> None:
        position = account.positions.get(order.symbol)
        if position is None or (position.quantity > 0) != (order.side is OrderSide.SELL):
            order.status = OrderStatus.EXPIRED  # nothing to reduce: the orphan case
            self._order_event(account, order, now)
            return
        quantity = order.quantity
        if self._stop_fill_share != 1:
            quantity = self._markets[order.symbol].round_quantity(quantity * self._stop_fill_share)
        if quantity <= 0:
            order.status = OrderStatus.EXPIRED  # nothing of it executed
            self._order_event(account, order, now)
            return
        execution = self._execute(account, order.symbol, order.side, quantity, now, reduce_only=True)
        order.status = OrderStatus.FILLED if quantity == order.quantity else OrderStatus.EXPIRED
        order.filled_quantity = execution.quantity
        order.average_price = execution.price
        self._order_event(account, order, now)

    def _fill_working(self, account: _Account, order: _OrderRecord, now: float) -> None:
        """A working market order executes: its share of the quantity (`set_market_fill`), the rest
        cancelled; refused by then (margin, a quantity below the step) it expires with nothing filled."""
        market = self._markets[order.symbol]
        share = order.fill_share if order.fill_share is not None else Decimal(1)
        quantity = market.round_quantity(order.quantity * share) if share != 1 else order.quantity
        order.updated_at = now
        try:
            if quantity <= 0:
                raise Rejected(RejectCode.QUANTITY_TOO_SMALL, "nothing of it fills")
            execution = self._execute(
                account, order.symbol, order.side, quantity, now, reduce_only=order.reduce_only
            )
        except (Rejected, InsufficientMargin):
            order.status = OrderStatus.EXPIRED
        else:
            order.filled_quantity = execution.quantity
            order.average_price = execution.price
            order.status = OrderStatus.FILLED if execution.quantity == order.quantity else OrderStatus.EXPIRED
        self._order_event(account, order, now)

    def _fill_price(self, symbol: str, side: OrderSide) -> Decimal:
        market = self._markets[symbol]
        mark = self._marks[symbol]
        slip = self._settings.slippage_bps / _BPS
        if side is OrderSide.BUY:
            return market.round_price(mark * (1 + slip), ROUND_CEILING)
        return max(market.round_price(mark * (1 - slip), ROUND_FLOOR), market.tick_size)

    def _unrealized(self, symbol: str, position: _PositionRecord) -> Decimal:
        return (self._marks[symbol] - position.entry_price) * position.quantity

    def _initial_margin(self, account: _Account) -> Decimal:
        return sum(
            (
                abs(p.quantity) * self._marks[s] / self._leverage(account, s)
                for s, p in account.positions.items()
            ),
            _ZERO,
        )

    def _available(self, account: _Account) -> Decimal:
        unrealized = sum((self._unrealized(s, p) for s, p in account.positions.items()), _ZERO)
        return account.wallet + unrealized - self._initial_margin(account)

    def _execute(
        self,
        account: _Account,
        symbol: str,
        side: OrderSide,
        quantity: Decimal,
        now: float,
        *,
        reduce_only: bool,
    ) -> _Execution:
        position = account.positions.get(symbol)
        held = position.quantity if position else _ZERO
        direction = 1 if side is OrderSide.BUY else -1
        opposes = held != 0 and (held > 0) != (direction > 0)
        if reduce_only:
            if not opposes:
                raise Rejected(
                    RejectCode.REDUCE_ONLY_REJECTED, "reduce-only order would open or increase a position"
                )
            quantity = min(quantity, abs(held))
        price = self._fill_price(symbol, side)
        closing = min(quantity, abs(held)) if opposes else _ZERO
        opening = quantity - closing
        fee = quantity * price * self._settings.taker_fee_rate
        realized = _ZERO
        if position is not None and closing:
            realized = (price - position.entry_price) * closing * (1 if held > 0 else -1)
        if opening:
            leverage = self._leverage(account, symbol)
            released = closing * self._marks[symbol] / leverage if closing else _ZERO
            required = opening * price / leverage + fee
            if required > self._available(account) + released + realized:
                raise InsufficientMargin()
        account.wallet += realized - fee
        new_quantity = held + direction * quantity
        if new_quantity == 0:
            del account.positions[symbol]
        elif position is None or closing == abs(held):
            account.positions[symbol] = _PositionRecord(new_quantity, price, now)
        elif opening:  # adding to a position on the same side
            entry = (abs(held) * position.entry_price + opening * price) / (abs(held) + opening)
            position.quantity, position.entry_price, position.updated_at = new_quantity, entry, now
        else:  # partial reduction keeps the entry price
            position.quantity, position.updated_at = new_quantity, now
        if new_quantity == 0:  # flat on the side it held
            side_held = PositionSide.LONG if held > 0 else PositionSide.SHORT
            self._position_event(account, symbol, side_held, _ZERO, price, now)
        else:
            record = account.positions[symbol]
            side_now = PositionSide.LONG if new_quantity > 0 else PositionSide.SHORT
            self._position_event(account, symbol, side_now, abs(new_quantity), record.entry_price, now)
        return _Execution(quantity=quantity, price=price)

    # ---- the book, kept across restarts ---------------------------------------------------------------

    def forget_ended_orders(self, now: float) -> int:
        """Drop ended orders older than `ENDED_ORDER_RETENTION_SECONDS` (Binance stops answering for them),
        so a long-running sim's book stays bounded; returns how many went."""
        oldest_kept = now - ENDED_ORDER_RETENTION_SECONDS
        forgotten = 0
        for account in self._accounts.values():
            old = [
                o for o in account.by_venue_id.values() if o.updated_at < oldest_kept and o.status.is_final
            ]
            for order in old:
                del account.by_venue_id[order.venue_order_id]
                same_id = account.orders[order.client_order_id]
                same_id.remove(order)
                if not same_id:
                    del account.orders[order.client_order_id]
            forgotten += len(old)
        if forgotten:
            self.book_revision += 1
        return forgotten

    def export_book(self, now: float) -> dict[str, Any]:
        """Everything the venue holds, as plain JSON values: `book_of(capture_book(now))`."""
        return self.book_of(self.capture_book(now))

    def capture_book(self, now: float) -> BookCapture:
        """The book at this instant, cheaply: references to immutable values only (Decimals, strings,
        frozen trailing states, copied containers), so it stays consistent while the core goes on, and
        `book_of` turns it into JSON values anywhere — a worker thread — off the event loop. Ended orders
        older than `ENDED_ORDER_RETENTION_SECONDS` are left out, as Binance stops answering for them."""
        due = {order.venue_order_id: at for at, _seq, _account, order in self._due}
        oldest_kept = now - ENDED_ORDER_RETENTION_SECONDS
        accounts = []
        for account_id, account in self._accounts.items():
            rate = account.rate
            accounts.append(
                (
                    account_id,
                    account.wallet,
                    dict(account.leverage),
                    [(s, p.quantity, p.entry_price, p.updated_at) for s, p in account.positions.items()],
                    [  # by venue id in placement order: a reused client id's orders keep their order
                        (_ORDER_VALUES(order), due.get(order.venue_order_id) if due else None)
                        for order in account.by_venue_id.values()
                        if order.updated_at >= oldest_kept or not order.status.is_final
                    ],
                    (dict(rate.windows), list(rate.violations), rate.banned_until, rate.bans),
                )
            )
        return BookCapture(self._next_order_id, dict(self._marks), dict(self._mark_times), accounts)

    @staticmethod
    def book_of(capture: BookCapture) -> dict[str, Any]:
        """A captured book as plain JSON values (prices and sizes as decimal strings): marks, the order-id
        counter, and per account the balance, leverage, positions, order budgets and orders (open,
        triggering with when their fill comes due, and ended ones for their queries)."""
        accounts: dict[str, Any] = {}
        for account_id, wallet, leverage, positions, orders, rate in capture.accounts:
            windows, violations, banned_until, bans = rate
            accounts[account_id] = {
                "wallet": str(wallet),
                "leverage": leverage,
                "positions": {
                    symbol: {"quantity": str(q), "entry_price": str(entry), "updated_at": at}
                    for symbol, q, entry, at in positions
                },
                "orders": [_order_to_book(values, due_at) for values, due_at in orders],
                "rate": {
                    "windows": [[w, i, c] for w, (i, c) in windows.items()],
                    "violations": violations,
                    "banned_until": banned_until,
                    "bans": bans,
                },
            }
        return {
            "next_order_id": capture.next_order_id,
            "marks": {s: [str(price), capture.mark_times[s]] for s, price in capture.marks.items()},
            "accounts": accounts,
        }

    def restore_book(self, book: Mapping[str, Any]) -> None:
        """Load what `export_book` wrote into this core, which must not have traded yet. Raises
        `ValueError` (naming what is wrong) for a book that does not fit: malformed, or holding positions or
        orders in symbols this core does not list. Marks of symbols it lists are taken from the book."""
        if self._next_order_id != 1 or any(a.positions or a.by_venue_id for a in self._accounts.values()):
            raise ValueError("a book is restored into a core that has not traded only")
        try:
            accounts = {account_id: _account_from_book(data) for account_id, data in book["accounts"].items()}
            next_order_id = int(book["next_order_id"])
            marks = {s: (Decimal(p), float(t)) for s, (p, t) in book["marks"].items()}
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
            raise ValueError(f"malformed book ({type(exc).__name__}: {exc})") from None
        held = {
            symbol
            for account, _due in accounts.values()
            for symbol in [
                *account.positions,
                *(o.symbol for o in account.by_venue_id.values() if not o.status.is_final),
            ]
        }
        unlisted = sorted(held - self._markets.keys())
        if unlisted:
            raise ValueError(
                f"it holds positions or orders in {', '.join(unlisted)}, which this sim venue does not list"
            )
        for symbol, (price, at) in marks.items():
            if symbol in self._markets and price > 0:
                self._marks[symbol], self._mark_times[symbol] = price, at
        self._next_order_id = max(
            next_order_id,
            1 + max((int(v) for a, _d in accounts.values() for v in a.by_venue_id), default=0),
        )
        for account_id, (account, due) in accounts.items():
            account.name = account_id
            self._accounts[account_id] = account
            for at, order in due:
                heapq.heappush(self._due, (at, next(self._sequence), account, order))
        self.book_revision += 1
        self.marks_revision += 1


def _checked_seconds(seconds: float | None, what: str) -> float | None:
    """A delay in seconds: None, or a number >= 0 (math.inf allowed: never)."""
    if seconds is None:
        return None
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"{what} must be >= 0 seconds (or None), got {seconds}")
    return float(seconds)


def _decimal_or_none(value: str | None) -> Decimal | None:
    return None if value is None else Decimal(value)


def _str_or_none(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _seconds_to_book(seconds: float | None) -> float | str | None:
    return "stuck" if seconds == STUCK else seconds


def _seconds_from_book(value: float | str | None) -> float | None:
    if value == "stuck":
        return STUCK
    return None if value is None else float(value)


_ORDER_FIELDS = tuple(f.name for f in fields(_OrderRecord))
_ORDER_VALUES = operator.attrgetter(*_ORDER_FIELDS)


@dataclass(frozen=True, slots=True)
class BookCapture:
    """`SimCore.capture_book`: the book at one instant, as references to immutable values."""

    next_order_id: int
    marks: dict[str, Decimal]
    mark_times: dict[str, float]
    accounts: list[tuple[Any, ...]]


def _order_to_book(values: tuple[Any, ...], due_at: float | None) -> dict[str, Any]:
    order = dict(zip(_ORDER_FIELDS, values, strict=True))
    trail: TrailingStopState | None = order["trailing"]
    return {
        "client_order_id": order["client_order_id"],
        "venue_order_id": order["venue_order_id"],
        "symbol": order["symbol"],
        "side": order["side"].value,
        "type": order["type"].value,
        "quantity": str(order["quantity"]),
        "reduce_only": order["reduce_only"],
        "created_at": order["created_at"],
        "stop_price": _str_or_none(order["stop_price"]),
        "activation_price": _str_or_none(order["activation_price"]),
        "callback_rate": _str_or_none(order["callback_rate"]),
        "trailing": None
        if trail is None
        else {
            "side": trail.side.value,
            "callback_rate": str(trail.callback_rate),
            "activation_price": str(trail.activation_price),
            "armed": trail.armed,
            "extreme": _str_or_none(trail.extreme),
        },
        "status": order["status"].value,
        "filled_quantity": str(order["filled_quantity"]),
        "average_price": _str_or_none(order["average_price"]),
        "updated_at": order["updated_at"],
        "visible_at": order["visible_at"],
        "trigger_delay": _seconds_to_book(order["trigger_delay"]),
        # A triggering order's fill, or a working market order's: when it comes due (None: stuck, or none).
        "due_at": due_at,
        "fill_share": _str_or_none(order["fill_share"]),
    }


def _order_from_book(data: Mapping[str, Any]) -> _OrderRecord:
    trail = data["trailing"]
    order = _OrderRecord(
        client_order_id=str(data["client_order_id"]),
        venue_order_id=str(int(data["venue_order_id"])),
        symbol=str(data["symbol"]),
        side=OrderSide(data["side"]),
        type=OrderType(data["type"]),
        quantity=Decimal(data["quantity"]),
        reduce_only=bool(data["reduce_only"]),
        created_at=float(data["created_at"]),
        stop_price=_decimal_or_none(data["stop_price"]),
        activation_price=_decimal_or_none(data["activation_price"]),
        callback_rate=_decimal_or_none(data["callback_rate"]),
        trailing=None
        if trail is None
        else TrailingStopState(
            side=OrderSide(trail["side"]),
            callback_rate=Decimal(trail["callback_rate"]),
            activation_price=Decimal(trail["activation_price"]),
            armed=bool(trail["armed"]),
            extreme=_decimal_or_none(trail["extreme"]),
        ),
        status=OrderStatus(data["status"]),
        filled_quantity=Decimal(data["filled_quantity"]),
        average_price=_decimal_or_none(data["average_price"]),
        updated_at=float(data["updated_at"]),
        visible_at=float(data["visible_at"]),
        trigger_delay=_seconds_from_book(data["trigger_delay"]),
        fill_share=_decimal_or_none(data.get("fill_share")),  # absent from books written before it
    )
    if order.type in (OrderType.STOP_MARKET, OrderType.TAKE_PROFIT_MARKET) and order.stop_price is None:
        raise ValueError(f"stop order {order.venue_order_id} has no stop price")
    if order.type is OrderType.TRAILING_STOP_MARKET and order.trailing is None:
        raise ValueError(f"trailing stop {order.venue_order_id} has no trailing state")
    return order


def _account_from_book(data: Mapping[str, Any]) -> tuple[_Account, list[tuple[float, _OrderRecord]]]:
    """An account and its triggering orders' due fills (stuck ones never come due)."""
    rate = data["rate"]
    account = _Account(
        wallet=Decimal(data["wallet"]),
        leverage={str(s): int(x) for s, x in data["leverage"].items()},
        positions={
            str(symbol): _PositionRecord(
                quantity=Decimal(p["quantity"]),
                entry_price=Decimal(p["entry_price"]),
                updated_at=float(p["updated_at"]),
            )
            for symbol, p in data["positions"].items()
        },
        rate=_RateState(
            windows={float(w): (int(i), int(c)) for w, i, c in rate["windows"]},
            violations=deque(float(v) for v in rate["violations"]),
            banned_until=float(rate["banned_until"]),
            bans=int(rate["bans"]),
        ),
    )
    if any(p.quantity == 0 for p in account.positions.values()):
        raise ValueError("a position of quantity 0")
    due: list[tuple[float, _OrderRecord]] = []
    for item in data["orders"]:  # oldest first: a reused client id's list keeps its order
        order = _order_from_book(item)
        if order.venue_order_id in account.by_venue_id:
            raise ValueError(f"order id {order.venue_order_id} twice")
        account.orders.setdefault(order.client_order_id, []).append(order)
        account.by_venue_id[order.venue_order_id] = order
        if order.status.is_open and order.conditional:
            account.open_conditional.setdefault(order.symbol, {})[order.client_order_id] = order
            account.open_conditional_count += 1
        elif order.status is OrderStatus.TRIGGERED:
            account.triggering[order.venue_order_id] = order
            due_at = item.get("due_at")
            if due_at is not None:
                due.append((float(due_at), order))
        elif order.status is OrderStatus.NEW and item.get("due_at") is not None:  # a working market order
            due.append((float(item["due_at"]), order))
    return account, due

"""Request pacing, owned by the engine on every venue: what the venue limits, kept below its limit, with
protection first.

Three pieces:

* **Lanes.** Every venue call runs in a lane: `PROTECTIVE` (a guard placing, verifying or cancelling its
  stops, or closing its position), `ENTRY` (opening a position), `READ` (reconcile, marks, balance). The
  lane rides on a context variable set by whoever starts the call (`call_with_send_timeout`), so the venue
  adapter can pace a request by its lane without every port method growing a parameter. A call started
  without a lane is a read.
* **`RequestPacer`**, the venue's request limits beside the order budget (`engine.order_budget`): Binance's
  IP request weight (2 400 / min, per-endpoint weights), Bybit's per-endpoint limits. Each budget is a
  sliding window of weighted sends kept `headroom` (10 %) below the venue's own limit, which also keeps
  every fixed window the venue counts in below it. Waiting requests go strictly by lane (within a lane,
  its writes before its reads), then first come first served; reads may use at most `READ_SHARE` of the
  budget, and a guard's look-ups of its stops `LOOK_UP_SHARE`, so a burst of reads can never take the
  room a protective write needs (30 naked positions' look-ups once spent a minute's weight in 20 s, and
  no stop could be sent for 35 s after the venue took stops again). The venue's own count (response headers) wins over ours when it is
  higher (another process on the same IP or account). A 429 holds every lane until its `Retry-After`; a
  418 ban refuses entries and reads at once (`Banned`) while protective requests wait for its end: a guard
  retries when the venue says it may, not on its own backoff clock.
* **Send-relative timeouts.** `call_with_send_timeout` gives a call its budget from the moment its request
  is sent: time spent waiting for pacing is measured (`BudgetWaits`, shown by health as "waiting for
  budget p99") but never counted toward the call's timeout, so a queue for budget can never turn into the
  incident's "Timeout creating trailing stop".
"""

from __future__ import annotations

import asyncio
import contextvars
import math
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol, TypeVar

from engine.clock import Clock, end_all, first_of
from engine.exchange.errors import Banned, Withheld
from engine.exchange.port import RequestBudget
from engine.metrics import CallStats, CallSummary, CumulativeHistogram

T = TypeVar("T")

DEFAULT_HEADROOM = 0.10  # stay this share below every limit the venue announces
READ_SHARE = 0.8  # reads may fill at most this share of what we allow ourselves
LOOK_UP_SHARE = 0.95  # a guard's look-ups: the rest is kept for the stops it sends


class Lane(IntEnum):
    """Who is asking; a lower value goes first."""

    PROTECTIVE = 0
    ENTRY = 1
    READ = 2


@dataclass(slots=True)
class CallTicket:
    """One venue call: its lane and how long it has waited for budget (possibly over several requests)."""

    lane: Lane
    waited: float = 0.0
    waiting_since: float | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # Until the call's first request is sent: why it must not be sent now (None: it may go). Asked while
    # that request waits for budget (`RequestPacer.acquire` raises `Withheld`), and again on `recheck()`.
    withhold: Callable[[], str | None] | None = None

    def begin_wait(self, now: float) -> None:
        if self.waiting_since is None:
            self.waiting_since = now
            self.changed.set()

    def end_wait(self, now: float) -> float:
        """Stop the wait clock; returns this wait's length."""
        if self.waiting_since is None:
            return 0.0
        waited = max(0.0, now - self.waiting_since)
        self.waited += waited
        self.waiting_since = None
        self.changed.set()
        return waited


_CURRENT_CALL: contextvars.ContextVar[CallTicket | None] = contextvars.ContextVar(
    "tsbot_current_call", default=None
)


def current_ticket() -> CallTicket | None:
    return _CURRENT_CALL.get()


def current_lane() -> Lane:
    ticket = _CURRENT_CALL.get()
    return Lane.READ if ticket is None else ticket.lane


def start_with_own_ticket(awaitable: Awaitable[T]) -> asyncio.Future[T]:
    """Run `awaitable` as a task in the current call's lane, its waits for budget on a ticket of its own
    (a second request sent for a call whose first is out: its wait stops no clock of that call)."""
    ticket = _CURRENT_CALL.get()
    token = _CURRENT_CALL.set(None if ticket is None else CallTicket(ticket.lane))
    try:
        return asyncio.ensure_future(awaitable)
    finally:
        _CURRENT_CALL.reset(token)


class BudgetWaits:
    """How long calls waited for budget (order budget and request budgets), per lane, for health."""

    def __init__(self, window_s: float = 300.0) -> None:
        self._stats = CallStats(window_s=window_s)

    def record(self, at: float, waited: float, lane: Lane) -> None:
        self._stats.record(at, max(0.0, waited), True, lane.name.lower())

    def summary(self, now: float, lane: Lane | None = None) -> CallSummary:
        return self._stats.summary(now, None if lane is None else lane.name.lower())

    @property
    def histogram(self) -> CumulativeHistogram:
        """Every wait since start, per lane (`protective`, `entry`, `read`), in cumulative buckets."""
        return self._stats.histogram


@dataclass(slots=True)
class _WeightedWindow:
    venue_limit: int
    seconds: float
    headroom: float
    spread: bool = False
    sends: deque[tuple[float, int]] = field(default_factory=deque)
    total: int = 0
    last_send: float | None = None  # kept past the window's pruning, for `spread`

    @property
    def limit(self) -> int:
        """What we allow ourselves: the venue's limit less the headroom (at least 1)."""
        return max(1, math.floor(self.venue_limit * (1.0 - self.headroom)))

    def prune(self, now: float) -> None:
        sends = self.sends
        while sends and sends[0][0] <= now - self.seconds:
            self.total -= sends.popleft()[1]

    def wait_for(self, units: int, limit: int, now: float) -> float:
        """Seconds until `units` more fit under `limit` (the window as it stands at `now`, pruned)."""
        if units <= 0:
            return 0.0
        spaced = 0.0
        if self.spread and self.last_send is not None:
            spaced = max(0.0, self.last_send + self.seconds * units / self.limit - now)
        if self.total + units <= limit:
            return spaced
        excess = self.total + units - limit
        freed = 0
        for sent_at, sent_units in self.sends:
            freed += sent_units
            if freed >= excess:
                return max(spaced, sent_at + self.seconds - now)
        return self.seconds  # more units than the window can ever hold: one whole window

    def add(self, now: float, units: int) -> None:
        if units > 0:
            self.sends.append((now, units))
            self.total += units
            self.last_send = now


class RequestPacer:
    """Paces a venue's requests under its request budgets; see the module docstring."""

    def __init__(
        self,
        budgets: Sequence[RequestBudget],
        clock: Clock,
        *,
        waits: BudgetWaits | None = None,
        headroom: float = DEFAULT_HEADROOM,
    ) -> None:
        self._clock = clock
        self._headroom = headroom
        self._windows: dict[str, _WeightedWindow] = {
            b.key: _WeightedWindow(b.limit, b.window_seconds, headroom, b.spread) for b in budgets
        }
        self.waits = waits if waits is not None else BudgetWaits()
        self._queue: list[tuple[int, int]] = []  # (rank, sequence) of waiting requests, sorted
        # What each waiting request costs, and the share of a budget it may fill (`_read_share`).
        self._waiting: dict[tuple[int, int], tuple[Mapping[str, int], float]] = {}
        self._sequence = 0
        self._changed = asyncio.Event()
        self._hold_until = 0.0
        self._banned_until = 0.0  # monotonic
        self._banned_until_epoch = 0.0
        self.requests_sent = 0
        self.requests_waited = 0

    # --- what the venue tells us ---------------------------------------------------------------------

    def configure(self, budgets: Sequence[RequestBudget]) -> None:
        """Adopt the limits the venue announced (e.g. `exchangeInfo.rateLimits`), keeping what was used."""
        for budget in budgets:
            window = self._windows.get(budget.key)
            if window is None:
                self._windows[budget.key] = _WeightedWindow(
                    budget.limit, budget.window_seconds, self._headroom, budget.spread
                )
            else:
                window.venue_limit, window.seconds = budget.limit, budget.window_seconds
                window.spread = budget.spread
        self._notify()

    def observe(self, key: str, used: int, *, limit: int | None = None) -> None:
        """The venue's own count of what is used in `key`'s window. Ours is at least the venue's for our
        own traffic (every send we count was counted by the venue no earlier); a higher count means someone
        else spends this budget too, so the difference is booked now."""
        window = self._windows.get(key)
        if window is None:
            return
        if limit is not None and limit > 0 and limit != window.venue_limit:
            window.venue_limit = limit
        now = self._clock.monotonic()
        window.prune(now)
        if used > window.total:
            window.add(now, used - window.total)

    def hold(self, seconds: float, *, banned: bool = False, banned_until_epoch: float | None = None) -> None:
        """The venue said stop (429: for `seconds`; 418 ban: until its end)."""
        now = self._clock.monotonic()
        self._hold_until = max(self._hold_until, now + max(0.0, seconds))
        if banned:
            self._banned_until = max(self._banned_until, now + max(0.0, seconds))
            self._banned_until_epoch = max(
                self._banned_until_epoch,
                banned_until_epoch if banned_until_epoch is not None else self._clock.now() + seconds,
            )
        self._notify()

    # --- figures -------------------------------------------------------------------------------------

    def used_fraction(self) -> float:
        """The fullest budget's share of the venue's limit used now (0..1)."""
        now = self._clock.monotonic()
        fractions = []
        for window in self._windows.values():
            window.prune(now)
            fractions.append(window.total / window.venue_limit)
        return max(fractions, default=0.0)

    @property
    def waiting_now(self) -> int:
        """Requests waiting for budget now."""
        return len(self._queue)

    def banned_for(self) -> float | None:
        left = self._banned_until - self._clock.monotonic()
        return left if left > 0 else None

    def held_for(self) -> float | None:
        """Seconds left before a request may go again (a 429's hold or a ban), or None."""
        left = self._hold_until - self._clock.monotonic()
        return left if left > 0 else None

    def budgets(self) -> tuple[RequestBudget, ...]:
        return tuple(RequestBudget(k, w.venue_limit, w.seconds, w.spread) for k, w in self._windows.items())

    # --- sending -------------------------------------------------------------------------------------

    async def acquire(self, costs: Mapping[str, int], *, mutating: bool = True) -> None:
        """Wait until a request costing `costs` (units per budget key) may be sent, then book it. A
        `mutating` one (an order's send) ends its call's `withhold`: a read before it (a position mode
        asked first) does not."""
        lane = current_lane()
        ticket = current_ticket()
        clock = self._clock
        self._refuse_if_banned(lane)
        _refuse_if_withheld(ticket)
        capped = _read_share(lane, mutating)
        me = (_rank(lane, capped < 1.0), self._sequence + 1)
        if self._wait_time(costs, capped) == 0.0 and not self._held_back(me, costs):
            self._book(costs, ticket if mutating else None)
            return
        self._sequence += 1
        self._queue.append(me)
        self._queue.sort()
        self._waiting[me] = (costs, capped)
        started = clock.monotonic()
        if ticket is not None:
            ticket.begin_wait(started)
        self.requests_waited += 1
        try:
            while True:
                self._refuse_if_banned(lane)
                _refuse_if_withheld(ticket)
                wait = self._wait_time(costs, capped)
                clear = not self._held_back(me, costs)
                if clear and wait == 0.0:
                    break
                await first_of(clock.sleep(wait if clear else 3600.0), self._changed.wait())
        finally:
            self._queue.remove(me)
            del self._waiting[me]
            now = clock.monotonic()
            if ticket is not None:
                ticket.end_wait(now)
            self.waits.record(now, now - started, lane)
            self._notify()
        self._book(costs, ticket if mutating else None)

    def _held_back(self, me: tuple[int, int], costs: Mapping[str, int]) -> bool:
        """Whether a waiting request ahead of `me` (a higher rank, or the same rank and earlier) would be
        sent later if `me` were sent now. Only such a one holds `me` back: a request waiting for one
        endpoint's budget (a spread trading-stop) does not hold back one for another endpoint (an entry's
        order/create), which Bybit counts apart."""
        for ahead in self._queue:
            if ahead >= me:
                break
            waiting, capped = self._waiting[ahead]
            if self._wait_time(waiting, capped) == 0.0 or self._would_delay(waiting, capped, costs):
                return True  # it may go now (and goes first), or my send would make it wait longer
        return False

    def _would_delay(self, waiting: Mapping[str, int], capped: float, costs: Mapping[str, int]) -> bool:
        now = self._clock.monotonic()
        for key, units in costs.items():
            window = self._windows.get(key)
            if window is None or units <= 0 or waiting.get(key, 0) <= 0:
                continue
            window.prune(now)
            limit = _share(window.limit, capped)
            wanted = min(waiting[key], limit)
            before = window.wait_for(wanted, limit, now)
            last_send = window.last_send
            window.add(now, units)
            after = window.wait_for(wanted, limit, now)
            window.sends.pop()
            window.total -= units
            window.last_send = last_send
            if after > before:
                return True
        return False

    def _refuse_if_banned(self, lane: Lane) -> None:
        if lane is not Lane.PROTECTIVE and self._banned_until > self._clock.monotonic():
            raise Banned(self._banned_until_epoch, "the venue banned this IP; only protective requests wait")

    def _wait_time(self, costs: Mapping[str, int], capped: float) -> float:
        now = self._clock.monotonic()
        wait = max(0.0, self._hold_until - now)
        for key, units in costs.items():
            window = self._windows.get(key)
            if window is None:
                continue
            window.prune(now)
            limit = _share(window.limit, capped)
            wait = max(wait, window.wait_for(min(units, limit), limit, now))
        return wait

    def _book(self, costs: Mapping[str, int], ticket: CallTicket | None) -> None:
        if ticket is not None:
            ticket.withhold = None  # its first request goes now: what follows (a read-back) is not withheld
        now = self._clock.monotonic()
        for key, units in costs.items():
            window = self._windows.get(key)
            if window is not None:
                window.add(now, units)
        self.requests_sent += 1
        self._notify()

    def recheck(self) -> None:
        """Something a waiting request's `withhold` asks changed (the engine began stopping, entries were
        paused): every waiter asks again now."""
        self._notify()

    def _notify(self) -> None:
        # Wake every waiter once: each re-checks its place and the windows. A fresh event for the next round.
        self._changed.set()
        self._changed = asyncio.Event()


def _read_share(lane: Lane, mutating: bool) -> float:
    """The share of a budget a request may fill: a write all of it, the read lane's reads `READ_SHARE`, a
    guard's (or an entry's) look-ups `LOOK_UP_SHARE`. Those look-ups went uncapped, and 30 naked positions'
    filled a minute's weight, leaving their stops no room; capped at `READ_SHARE`, another process holding
    the IP's weight past 72 % starved a guard's look-up of a stop the venue held (a reviewer)."""
    if lane is Lane.READ:
        return READ_SHARE
    return 1.0 if mutating else LOOK_UP_SHARE


def _rank(lane: Lane, read: bool) -> int:
    """A waiting request's place: by lane, and within the protective and entry lanes writes before reads
    (a stop to send goes before the look-ups of others)."""
    return 2 * int(lane) + read


def _share(limit: int, share: float) -> int:
    """What a request may fill of a budget we allow ourselves `limit` of."""
    return limit if share >= 1.0 else max(1, math.floor(limit * share))


def _refuse_if_withheld(ticket: CallTicket | None) -> None:
    if ticket is not None and ticket.withhold is not None and (reason := ticket.withhold()) is not None:
        raise Withheld(reason)


class OrderCounts(Protocol):
    """The part of the order budget a venue adapter feeds (`engine.order_budget.OrderBudget`)."""

    def observe(self, window_seconds: float, used: int) -> None: ...

    def hold_until(self, monotonic_deadline: float, *, banned: bool = False) -> None: ...

    def rate_refused(self) -> None: ...


@dataclass(slots=True)
class VenuePacing:
    """What the engine hands a venue adapter (`ExchangePort.attach_pacing`): the request pacer every
    request goes through, and the order budget the venue's own counts and refusals are reported to."""

    requests: RequestPacer
    orders: OrderCounts | None = None
    clock: Clock | None = None

    def rate_limited(self, retry_after: float, *, orders_only: bool = False) -> None:
        """The venue answered 429: requests (or, for an order-count 429, orders) wait `retry_after` s.
        Either is one refusal toward a ban: the order budget holds entries back once they pile up."""
        if self.orders is not None:
            self.orders.rate_refused()
        if orders_only:
            if self.orders is not None and self.clock is not None:
                self.orders.hold_until(self.clock.monotonic() + retry_after)
            return
        self.requests.hold(retry_after)

    def banned(self, until_epoch: float) -> None:
        """The venue answered 418: nothing is sent until the ban ends (protective requests wait for it)."""
        clock = self.clock
        seconds = max(0.0, until_epoch - (clock.now() if clock is not None else until_epoch))
        self.requests.hold(seconds, banned=True, banned_until_epoch=until_epoch)
        if self.orders is not None and clock is not None:
            self.orders.hold_until(clock.monotonic() + seconds, banned=True)


async def call_with_send_timeout(
    clock: Clock, seconds: float, awaitable: Awaitable[T], lane: Lane, ticket: CallTicket | None = None
) -> T:
    """Run a venue call in `lane` and raise `TimeoutError` once it has spent `seconds` *sending*: time
    spent waiting for budget (the ticket's waits; pass a ticket to read them afterwards) does not count."""
    ticket = CallTicket(lane) if ticket is None else ticket
    token = _CURRENT_CALL.set(ticket)
    try:
        work = asyncio.ensure_future(awaitable)  # the task copies the context: the ticket goes with it
    finally:
        _CURRENT_CALL.reset(token)
    started = clock.monotonic()
    try:
        while not work.done():
            ticket.changed.clear()
            if ticket.waiting_since is not None:
                deadline = None  # queued for budget: no clock runs against the call
            else:
                deadline = started + ticket.waited + seconds
                if clock.monotonic() >= deadline:
                    raise TimeoutError(f"no answer within {seconds:g}s")
            waiters = {work, asyncio.ensure_future(ticket.changed.wait())}
            if deadline is not None:
                waiters.add(asyncio.ensure_future(clock.sleep(deadline - clock.monotonic())))
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                await end_all(*(waiters - {work}))
        return work.result()
    finally:
        await end_all(work)


__all__ = [
    "DEFAULT_HEADROOM",
    "READ_SHARE",
    "BudgetWaits",
    "CallTicket",
    "Lane",
    "OrderCounts",
    "RequestBudget",
    "RequestPacer",
    "VenuePacing",
    "call_with_send_timeout",
    "current_lane",
    "current_ticket",
]

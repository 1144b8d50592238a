"""Protection: every position gets a hard stop and a trailing stop on the exchange, confirmed, or it is
visibly uncovered and retried. The incident's failing open (log a timeout, carry on with no trailing stop)
cannot happen here.

Shape: one `PositionGuard` per live position, each with its own task. A guard serialises everything that
touches its position (place, resolve, move, close) by being a single task, so no lock exists, let alone one
held across I/O (F1); positions never wait for each other, so a wave of N positions is protected in
parallel, paced only by the venue's order budget, where protective orders go first.

A guard converges: it compares what its position needs (hard stop, trailing stop or managed trail) with
what the exchange has confirmed, and sends what is missing. Every send is recorded in `monitoring.orders`
before it leaves, under a deterministic client order id. A timeout or `OutcomeUnknown` is resolved by
fetching that id: found → confirmed; proven absent → sent again with the *same* id; still unknown → retried
later. Never a blind second order (F2). `has_stop_loss` / `has_trailing_stop` are written only from
confirmations (F4). A managed trail moves its stop make-before-break: the new stop is confirmed before the
old one is cancelled (F5). A stop the venue would trigger at once means the price is already through it:
the position is closed reduce-only at market (F8), if so configured.

The mark-price path (`on_mark`) is synchronous and never awaits protection: it feeds the pure trailing core
and, when the core decides a move, wakes the guard (F1).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_DOWN, ROUND_UP, Decimal
from enum import StrEnum
from typing import Any, TypeVar

from engine.clock import Clock, end_all, first_of, monotonic_of, wait_event, wait_for_all
from engine.events import (
    EventBus,
    PositionClosed,
    ProtectionConfirmed,
    ProtectionFailed,
    ProtectionTimedOut,
    StopMoved,
)
from engine.exchange.errors import (
    Banned,
    ClockRefused,
    DuplicateClientOrderId,
    ExchangeError,
    FailureClass,
    NotFound,
    OutcomeUnknown,
    RateLimited,
    RejectCode,
    Rejected,
    Retryable,
    Withheld,
    WouldTriggerImmediately,
    failure_class,
)
from engine.exchange.port import (
    Capabilities,
    ChecksRecordedStops,
    ExchangePort,
    Market,
    Order,
    OrderSide,
    OrderStatus,
    PositionSide,
    ReadsVenueTime,
    StatesLeverages,
)
from engine.metrics import CallStats, EventCounter
from engine.order_budget import OrderBudget
from engine.pacing import CallTicket, Lane, call_with_send_timeout
from engine.words import counted
from protection import trailing
from protection.coverage import CoverageFigures, PositionCoverage, coverage_figures, kept_fact
from protection.order_ids import client_order_id, installation_of, parse_client_order_id
from storage.batching import CoalescingWriter
from storage.repositories import (
    OrderPurpose,
    OrderRecord,
    OrderRecordStatus,
    OrderStatusRow,
    PositionRecord,
    PositionStatus,
    ProtectionFactsRow,
    Severity,
    Store,
    TrailingStateRecord,
)

log = logging.getLogger(__name__)
MANUAL_CLOSE = "manual"  # the exit reason of an operator's close (the only close not retried)

_HUNDRED = Decimal(100)
# A fill's liquidation price is read this long after it, so the positions a wave fills together are read
# in a few requests (a hard stop that may lie near the figure waits for it: kept short).
LIQUIDATION_READ_GATHER_SECONDS = 0.1
# A read of the liquidation prices that fails is tried again this long after, this many times in all; then
# the reconciler's next pass reads them.
LIQUIDATION_READ_RETRY_SECONDS = 1.0
LIQUIDATION_READ_ATTEMPTS = 3
# The most a maintenance margin rate is taken to be when judging, from a leverage alone, whether a stop may
# lie near the liquidation price (the venues' lowest brackets: 0.4–1 %).
MAINTENANCE_RATE_BOUND = Decimal("0.01")
# A liquidation price the stream pushed before the position's guard existed is the guard's if this recent
# (its entry's answer takes a round trip or a few; a flat push in between forgets it).
STREAMED_LIQUIDATION_FRESH_SECONDS = 30.0
# A position's size pushed this long before its guard's fill time is still the fill's own push (the entry's
# answer comes a round trip or a few after the venue told it).
FILL_PUSH_SLACK_SECONDS = 5.0
_T = TypeVar("_T")


class TrailingKind(StrEnum):
    NATIVE = "native"
    MANAGED = "managed"


@dataclass(frozen=True, slots=True)
class StopListing:
    """The venue's open orders read at an engine's stop: their client ids, and when the read was asked (the
    engine's monotonic clock)."""

    ids: frozenset[str]
    asked_at: float
    positions: frozenset[tuple[str, str]]  # (symbol, side) of the positions the venue holds


@dataclass(frozen=True, slots=True)
class ProtectionConfig:
    stop_loss_percent: Decimal
    activation_percent: Decimal
    callback_percent: Decimal
    call_timeout_seconds: float
    grace_seconds: float
    retry_initial_seconds: float
    retry_max_seconds: float
    close_on_would_trigger: bool
    trailing_mode: str  # auto | native | managed
    min_move_interval_seconds: Decimal
    min_improvement_percent: Decimal
    emergency_move_percent: Decimal
    # How long a position may be uncovered before the circuit breaker pauses entries (grace × its factor).
    breaker_uncovered_seconds: float = float("inf")

    @classmethod
    def from_settings(cls, settings: Any) -> ProtectionConfig:
        return cls(
            stop_loss_percent=settings.stop_loss_percent,
            activation_percent=settings.activation_percent,
            callback_percent=settings.callback_percent,
            call_timeout_seconds=float(settings.call_timeout_seconds),
            grace_seconds=float(settings.grace_seconds),
            retry_initial_seconds=float(settings.retry_initial_seconds),
            retry_max_seconds=float(settings.retry_max_seconds),
            close_on_would_trigger=settings.close_on_would_trigger,
            trailing_mode=str(settings.trailing.mode),
            min_move_interval_seconds=settings.trailing.min_move_interval_seconds,
            min_improvement_percent=settings.trailing.min_improvement_percent,
            emergency_move_percent=settings.trailing.emergency_move_percent,
            breaker_uncovered_seconds=float(settings.grace_seconds * settings.breaker.uncovered_factor),
        )

    def trailing_kind(self, capabilities: Capabilities) -> TrailingKind:
        """The trail new positions get (a restored one keeps its own: `ProtectionManager.guard`)."""
        native_ok = (
            capabilities.native_trailing_stop
            and capabilities.callback_rate_min <= self.callback_percent <= capabilities.callback_rate_max
        )
        if self.trailing_mode == "managed" or (self.trailing_mode == "auto" and not native_ok):
            return TrailingKind.MANAGED
        return TrailingKind.NATIVE


def stop_loss_price(side: PositionSide, entry: Decimal, percent: Decimal, market: Market) -> Decimal:
    """Entry ∓ percent, on tick, rounded away from the entry so it can never sit closer than asked."""
    if side is PositionSide.LONG:
        return market.round_price(entry * (1 - percent / _HUNDRED), ROUND_DOWN)
    return market.round_price(entry * (1 + percent / _HUNDRED), ROUND_UP)


# A hard stop the venue would liquidate the position before reaching is placed this share of the way back
# from the liquidation price towards the entry: far enough inside that the mark crossing it leaves a stop
# market order time to fill before the liquidation engine takes the position.
LIQUIDATION_MARGIN_SHARE = Decimal("0.2")
# A hard stop is moved once it lies nearer the liquidation price than this share of the way back (at it or
# beyond it, certainly): nearer, its stop market order has no time to fill before the liquidation. Moved
# to the fifth, it is moved again only once the figure has crept three twentieths of the way towards it
# (cross margin's moves with the account's other positions at every read), not at every tick.
LIQUIDATION_BAND_SHARE = Decimal("0.05")


def stop_inside_liquidation(
    side: PositionSide,
    entry: Decimal,
    liquidation: Decimal,
    market: Market,
    share: Decimal = LIQUIDATION_MARGIN_SHARE,
) -> Decimal | None:
    """The hard stop `share` of the way back from `liquidation` towards the entry, on tick, rounded towards
    the entry (the farthest that fires before the venue liquidates, with room for the stop's fill); None
    where the venue's figure is not on the losing side of the entry (nothing to keep the stop inside of)."""
    distance = entry - liquidation
    if (distance <= 0) if side is PositionSide.LONG else (distance >= 0):
        return None
    price = liquidation + distance * share
    return market.round_price(price, ROUND_UP if side is PositionSide.LONG else ROUND_DOWN)


def stop_beyond(side: PositionSide, stop: Decimal, limit: Decimal) -> bool:
    """`stop` lies further from the entry than `limit` (below it for a long, above it for a short)."""
    return stop < limit if side is PositionSide.LONG else stop > limit


def never_fires(side: PositionSide, stop: Decimal, liquidation: Decimal) -> bool:
    """A hard stop at `stop` never fires before the venue liquidates at `liquidation`: it lies beyond it,
    or on it (the mark that reaches one reaches the other)."""
    return stop == liquidation or stop_beyond(side, stop, liquidation)


def activation_price(side: PositionSide, entry: Decimal, percent: Decimal, market: Market) -> Decimal:
    if side is PositionSide.LONG:
        return market.round_price(entry * (1 + percent / _HUNDRED), ROUND_UP)
    return market.round_price(entry * (1 - percent / _HUNDRED), ROUND_DOWN)


@dataclass(slots=True)
class ProtectiveOrder:
    """One protective order of a guard: its id, what it should be, and what the exchange confirmed."""

    purpose: OrderPurpose
    generation: int = 0
    client_order_id: str | None = None
    price: Decimal | None = None  # stop trigger (stop-loss, managed trail) or activation (native trail)
    confirmed: bool = False
    confirmed_at: float = 0.0  # monotonic time of the confirmation (the reconciler ignores newer ones)
    maybe_sent: bool = False  # the venue may have it: resolve by id before sending anything
    arm_now: bool = False  # native trail: activation already passed, arm at the current mark
    sent_at: float | None = None  # monotonic time the last send began (see `left_at`)
    send_ticket: CallTicket | None = None  # that send's call: how long it waited for the venue's pacing
    sent_this_run: bool = False  # this process sent it (a confirmation is a creation, not a restore)
    fired_at: float | None = None  # monotonic time we first saw it fired but not finished (TRIGGERING)
    ended_as: OrderStatus | None = None  # how the venue said its last id ended (filled, cancelled …)
    ended_id: str | None = None  # the id `ended_as` is of
    ended_at: float | None = None  # and when, on the venue's clock (epoch seconds), when its answer said so
    recorded_id: str | None = None  # the id this process already wrote ahead (a retry writes nothing more)
    # Its last send, by this process, had no clear answer (HTTP 500, -1007, a timeout) and was not itself a
    # send again: inside the venue's read lag it may be sent again once with its id (`_Outcome.UNSEEN`).
    # Nothing else that leaves an order in doubt allows that (a fired stop, a restored one).
    may_send_again: bool = False
    # Monotonic time its last unclear answer came (None: none since its last send): a send that reached
    # the venue late (a 500 answered after seconds, a lost answer) shows one read lag after that at most.
    unclear_at: float | None = None
    # Monotonic time the first of its unclear answers came, sends again with its id included: while the
    # venue's request budget is half spent it is sent again without a look-up only within one read lag of
    # that (a reviewer: anchored to the last send, the look-up never came, and a stop the venue held after
    # a lost answer stayed "uncovered" for as long as answers were lost).
    unclear_since: float | None = None
    # Its id was sent more than once (a send again after an unclear answer): the venue may have held two
    # copies under it one after the other, and an end the stream tells may be the earlier copy's.
    sent_again: bool = False
    # Set when the account stream tells it live while it is not confirmed (`PositionGuard.hear_live`): a
    # late answer's wait takes that word at once.
    heard_live: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)
    # The id it had when a confirmed stop was put in doubt (a gap in the account stream no listing answered
    # for, a mark through it): until the venue says, it is *unverified*, not missing: it may well be live
    # (an operator who read "missing" and placed a stop by hand would have put a second one beside it).
    doubted_id: str | None = None
    doubted_at: float = 0.0  # when (monotonic) it was put in doubt: a listing asked later may vouch for it
    # In doubt, and the account stream has since said it was cancelled or expired: shown missing, not
    # unverified (`PositionGuard.stop_loss_unverified`); still a doubt for the entries' hold until a listing
    # or its look-up by id settles it (`doubt_pending`).
    told_ended: bool = False
    # Put in doubt because a listing of the venue's open orders left it out (`OrderMissing`), and not settled
    # yet: the loss is said once the venue says the stop ended (or it is given up unsettled), not at the
    # listing's miss: a live stop a listing left out was said as protection lost, an alarm, an event and a
    # ProtectionFailed, for a stop that never left (`PositionGuard._missed_gone`).
    missed_by_listing: bool = False
    # Found live by a start (not sent by this process): when the venue placed it (epoch seconds, the venue's
    # clock). The position is protected since its stops went live, not since the start found them.
    live_since: float | None = None

    def doubt(self, at: float) -> None:
        """Put this confirmed stop in doubt (as of `at`): unverified, asked for by its id before anything
        is sent (never a second stop)."""
        self.confirmed = False
        self.maybe_sent = True
        self.doubted_id = self.client_order_id
        self.doubted_at = at
        self.told_ended = False

    @property
    def unverified(self) -> bool:
        """Confirmed once, then put in doubt, and asked for by its id with no answer yet: uncovered all the
        same, but not known gone (neither proven absent, nor fired; one that ended has a new id by then:
        `ended_as` is the last id's, and kept the next generation's doubt from ever being said)."""
        return (
            not self.confirmed
            and self.maybe_sent
            and self.doubted_id is not None
            and self.doubted_id == self.client_order_id
            and self.fired_at is None
        )

    def left_at(self, now: float) -> float | None:
        """When its last send left for the venue (monotonic; a "not found" sooner than the venue's read lag
        after it proves nothing): the send's start plus its waits for the venue's pacing (a 429's
        Retry-After, a ban), `now` while it still waits. Counted from the start, a stop held 2 s by the
        pacer was taken for absent while the venue's reads still lagged its placement, and sent again."""
        if self.sent_at is None:
            return None
        ticket = self.send_ticket
        if ticket is None:
            return self.sent_at
        if ticket.waiting_since is not None:
            return now
        return self.sent_at + ticket.waited


# How long a fired stop gets to fill before we close its position at market: a normal TRIGGERING ends well
# within a second (the venue forwards the order to its matching engine at once), so a second, or this many
# order round trips on a slow venue; never more than this share of the grace period.
_STOP_PURPOSES = (OrderPurpose.STOP_LOSS, OrderPurpose.TRAILING_STOP)
STUCK_TRIGGER_SECONDS = 1.0
EXIT_SETTLE_LOOKS = 3  # read lags after a position's end, its unreadable stops are looked up this often
STUCK_TRIGGER_ROUND_TRIPS = 3
STUCK_TRIGGER_SHARE = 0.5
STUCK_CHECK_MIN_SECONDS = 0.5  # the least a stuck stop's re-check may take (a round trip)
CLOSE_WAIT_SAID_SECONDS = 0.5  # a close still waiting for the venue's order window this long is said
CLOSE_EDGE_RECHECK_SECONDS = 0.5  # a close held while a refusal would be a ban's looks again this often
# A protective create whose answer is this late (in order round trips, and never before the venue's
# read-after-write lag or this floor) is looked up by its client id while the call goes on.
FIRST_RETRY_MIN_SECONDS = 0.05  # the least a naked position's first retry waits (a round trip, unknown yet)
CLOCK_READ_WAITED_SHARE = 0.9  # a refused timestamp's wait for the venue's time, waited out at this share
LATE_ANSWER_ROUND_TRIPS = 4
# A venue's read-after-write lag counts from when the order reached it, a one-way trip after our send; a
# look reaches it a one-way trip after it leaves. So a look proves an order absent only once it left this
# long after the lag's end (on a venue with a lag): sent right at the end, it could arrive just before the
# order shows, and a live stop was reported "not on the exchange" and sent again (refused as a duplicate).
READ_LAG_MARGIN_SECONDS = 0.25
# An engine's stop records the stops its last listing lacks within this: above the store's write timeout
# (storage.resilient.WRITE_TIMEOUT_SECONDS, 2 s) and its journal append, so that a database frozen since its
# last write has the record journaled, not abandoned (at 2 s it was abandoned: r62).
MISSING_AT_STOP_WRITE_SECONDS = 4.0
RECORDS_AT_STOP_SECONDS = 4.0  # a stopping manager waits this long at most for its `record_surely` writes
LEFTOVER_QUICK_GRACES = 3  # a closed position's leftover stops: asked again quickly for this many graces
ABSENCE_MARGIN_MAX_SECONDS = 2.0  # the one-way trip counted at most (an unclear answer's own time counts too)
LATE_ANSWER_MIN_SECONDS = 0.5
# Stops the account stream told live that are kept (the latest), for `ProtectionManager.streamed_live`.
STREAMED_LIVE_KEPT = 1024
REPEATED_FAILURE_SAID_EVERY_SECONDS = 60.0  # a cancel that keeps failing is said again this often
# A stop the venue answered placed and that neither its cancel nor its look-up can find is taken for gone
# only this long after they first could not: the venue's reads lag its writes "for seconds" (Binance's
# algo orders), and past the lag we count on (5 s) such a stop is still live. Taken for cancelled, a closed
# position's stop stayed on the venue, its symbol took a new position, and the old stop cut it (a reviewer,
# a 16 s lag on the Binance-wire emulator). Beyond this the order is taken as ended and forgotten by the
# venue: the symbol is not held for ever on a stop nobody can find.
PLACED_UNSEEN_LIMIT_SECONDS = 120.0
# From this share of the venue's request budget used, a stop within its read lag is looked up once, at
# the lag's end, not every retry step.
LOOK_UPS_SPARSE_FROM_BUDGET_USED = 0.5
NAKED_RETRY_CEILING_MIN_SECONDS = 2.0  # a naked position past grace waits at most max(grace, this) to retry
MAX_DOUBLINGS = 32  # a backoff doubles at most this often (far past any cap; a float's range is not)
GUARD_RESTARTS_SAID_EVERY_SECONDS = 60.0


# What a failed look-up of a stop by its id is called ("look up stop-loss failed"): not "verify …", which
# names the venue's word that a stop is gone (`protection_lost`); the dashboard's log took every failed
# look-up during a stream gap for a stop found gone, and said "placed 77 s after it was found gone" of
# stops that were live all along and never sent again.
LOOK_UP = "look up"
STOPS_PER_POSITION = 2  # a hard stop and a trailing stop (a managed trail's once it activates)


class _Outcome(StrEnum):
    CONFIRMED = "confirmed"
    RETRY = "retry"  # transient, or still unknown: try again after backoff
    ABSENT = "absent"  # proven not on the venue: the same id may be sent
    UNSEEN = "unseen"  # not visible yet within the venue's read lag: sent again with the same id (`_ensure`)
    BREACHED = "breached"  # would trigger immediately
    GONE = "gone"  # the order ended (filled/cancelled/expired) before we saw it live
    FIRED = "fired"  # it triggered and is on its way to a fill: it protects nothing, and it is not over


class _CloseNotSent(Exception):
    """A close at market the venue did not execute (`Retryable`): `_close` sends it again."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


@dataclass(slots=True)
class GuardReport:
    position_id: int
    symbol: str
    restored_orders: int = 0  # orders found live on the exchange from before
    created_orders: int = 0  # orders we had to send
    first_pass_ok: bool = False


@dataclass(frozen=True, slots=True)
class ExitEvidence:
    """One of our stops filled: the position is (probably) gone, and this is why and at what price."""

    exit_reason: str  # stop_loss | trailing_stop
    exit_price: Decimal | None
    client_order_id: str
    seen_at: float  # monotonic
    venue_at: float | None = None  # when the venue filled it (epoch), as the account stream told it


@dataclass(slots=True)
class GuardCommand:
    """Something another part of the engine asks of a guard; the guard's own task applies it, in order,
    between its protection passes (a checker reports facts, the owner applies them). `done` gets the
    outcome: (ok, detail)."""

    done: asyncio.Future[tuple[bool, str]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    urgent = False  # interrupt a protection pass in flight (what it sent is resolved by id afterwards)
    ends_position = False  # may end the position: applied even while a close waits for its order slot

    def settle(self, ok: bool, detail: str) -> None:
        if not self.done.done():
            self.done.set_result((ok, detail))


@dataclass(slots=True)
class PositionGone(GuardCommand):
    """The venue no longer holds the position (confirmed flat): record why and stop guarding it."""

    exit_reason: str = "closed_on_exchange"
    exit_price: Decimal | None = None
    urgent = True
    ends_position = True


@dataclass(slots=True)
class ClosePosition(GuardCommand):
    """Close the position reduce-only at market (operator, breached stop, stuck trigger)."""

    exit_reason: str = "manual"
    urgent = True


@dataclass(slots=True)
class PositionHeld(GuardCommand):
    """The venue listed the position in an answer read at `seen_at` (monotonic)."""

    seen_at: float = 0.0


@dataclass(slots=True)
class QuantityChanged(GuardCommand):
    """The venue holds a different quantity than our stops cover (added to or reduced by hand, a partial
    fill): the stops are resized to it, make-before-break."""

    quantity: Decimal = Decimal(0)
    # When the venue was asked (monotonic): a size read before the one last applied is older news (a pass
    # that read the position before the stream told it grew would shrink its stops back).
    seen_at: float = float("inf")


@dataclass(slots=True)
class OrderMissing(GuardCommand):
    """A confirmed stop of ours was not in the venue's open orders read at `seen_at` (monotonic)."""

    client_order_id: str = ""
    seen_at: float = 0.0


@dataclass(slots=True)
class StopsUnverified(GuardCommand):
    """The account stream may have missed events since before `noted_at` (monotonic: when its gap was
    told), and no listing of the venue's open orders asked since has answered within the grace period:
    a stop confirmed before then may have been cancelled, or have expired, unseen. Each such stop is asked
    for by its id again, and counts uncovered until the venue says it is live."""

    noted_at: float = 0.0
    # Only these ids (a listing answered, but did not check them); None: every stop confirmed before then.
    ids: frozenset[str] | None = None


@dataclass(slots=True)
class LiquidationStated(GuardCommand):
    """The venue states where it would liquidate the position (`VenuePosition.liquidation_price`): a hard
    stop beyond that price would never fire, the venue liquidating first."""

    price: Decimal = Decimal(0)


@dataclass(slots=True)
class StuckTriggerCheck(GuardCommand):
    """A fired stop's patience is over: check it (within what is left of the grace period) and close the
    position at market if it is still working its way to a fill. Urgent: a pass stuck in a slow read must
    not hold it back."""

    urgent = True


@dataclass(slots=True)
class StreamOrderUpdate(GuardCommand):
    """The venue's account stream said how one of this position's orders stands (`order`), at
    `event_time` (the venue's epoch seconds). A fill closes the position at once; a fired stop makes it
    uncovered and starts the stop's patience (both urgent); a stop of ours cancelled or expired by someone
    else is re-placed now."""

    order: Order | None = None
    event_time: float = 0.0

    @property  # type: ignore[override]
    def urgent(self) -> bool:
        # Both go before a pass in flight: a fill ends the position, and a fired stop's patience must not
        # wait behind a pass held up by a slow read (15 s through a ban in the chaos soak).
        return self.order is not None and self.order.status in (OrderStatus.FILLED, OrderStatus.TRIGGERED)

    @property  # type: ignore[override]
    def ends_position(self) -> bool:
        return self.order is not None and self.order.status is OrderStatus.FILLED


@dataclass(slots=True)
class StreamPositionUpdate(GuardCommand):
    """The venue's account stream pushed this position's size (0: flat on our side) at `event_time`."""

    quantity: Decimal = Decimal(0)
    event_time: float = 0.0
    liquidation_price: Decimal | None = None  # where the venue pushes it with the size (Bybit, the sim)

    @property  # type: ignore[override]
    def urgent(self) -> bool:  # flat: with a fill of ours, the position ends now
        return self.quantity == 0

    @property  # type: ignore[override]
    def ends_position(self) -> bool:
        return self.quantity == 0


class PositionGuard:
    """Everything about one position's protection, driven by one task."""

    def __init__(
        self,
        manager: ProtectionManager,
        position: PositionRecord,
        market: Market,
        kind: TrailingKind,
        *,
        filled_at: float,
    ):
        if position.entry_price is None:
            raise ValueError(f"position {position.id} has no fill price; it cannot be protected yet")
        self._m = manager
        self.position_id = position.id
        self.symbol = position.symbol
        self.side = PositionSide(position.side)
        self.quantity = position.quantity
        self.entry_price = position.entry_price
        self.status = position.status
        self.market = market
        self.kind = kind
        self.closing_side: OrderSide = self.side.closing_side
        self.filled_at = filled_at
        # Since when it lacks a confirmed stop (monotonic), and the same moment on the wall clock, fixed
        # once: it is written with the facts, so a restarted manager or engine measures the time
        # unprotected from when protection was really lost, not from its own start.
        self.unprotected_since: float | None = filled_at
        self.unprotected_since_epoch: float | None = manager.clock.now() - (
            manager.clock.monotonic() - filled_at
        )
        self.protected_at: float | None = None
        self._crossed: set[OrderPurpose] = set()  # stops the mark went through since the last check
        # Waiting out its own backoff after failed passes (not the venue's word): woken when another guard's
        # pass goes through after failures of its own (`ProtectionManager.failing_guards_try_now`).
        self.backing_off = False
        # A restored position the last engine left filled and never protected: without stops since then if
        # this guard has to send one (not if it finds them live), which its first covered facts record.
        self.naked_since: datetime | None = None

        config = manager.config
        # The trail the position was opened with (recorded with it): settings changed between runs are
        # for new positions. A restart re-placed a lost native trail of a 0.5 % position at the new 2 %,
        # beside its recorded activation (r72).
        self._opened_trail = (
            position.trailing_callback_percent
            if position.trailing_callback_percent is not None
            else config.callback_percent,
            position.trailing_activation_percent
            if position.trailing_activation_percent is not None
            else config.activation_percent,
        )
        self.callback_percent, self.activation_percent = self._opened_trail
        self.stop_loss = ProtectiveOrder(
            OrderPurpose.STOP_LOSS,
            price=stop_loss_price(self.side, self.entry_price, config.stop_loss_percent, market),
        )
        self.trailing_stop = ProtectiveOrder(
            OrderPurpose.TRAILING_STOP,
            price=activation_price(self.side, self.entry_price, self.activation_percent, market)
            if kind is TrailingKind.NATIVE
            else None,
        )
        self.trail: trailing.TrailingState | None = None
        self.trail_persisted = False
        self.pending_move: trailing.PlaceStop | trailing.MoveStop | None = None
        self._replacement: ProtectiveOrder | None = None  # a managed move's new stop, while in flight
        # A managed move the last engine sent and never saw answered (it stopped or died in between): the
        # new stop may be live on the venue. Resolved by its id before anything else is done to the trail.
        self._restored_move: ProtectiveOrder | None = None
        self._move_finishing = False  # a move confirmed, its trail recorded and the old stop cancelled next
        self._next_trail_generation = 0
        # Per purpose, the least generation not used yet by an order of this position (`skip_used_ids`).
        self._unused_generation: dict[OrderPurpose, int] = {}
        if kind is TrailingKind.MANAGED:
            self.trail = trailing.TrailingState.start(self.trail_params())

        self.closed = False
        # A close we sent is in flight: the position is on its way out on purpose. Its stops stay on the
        # venue until the close fills, so it is as covered as it was; shown as "closing", never an alarm.
        self.closing = False
        self.closed_as = ""  # the exit reason it was recorded closed with (`stop_breached`: by the engine)
        self.close_held_back = False  # its close waits for its place in the venue's windows: nothing sent
        # Seconds at most its close waits while a refusal would be a ban's (`_close_turn`), or None.
        self._close_held_at_edge: float | None = None
        # Its fill was this engine's entry's, just now (not a restored or adopted position): a first protection
        # later than grace is a span from it (`_write_facts`).
        self.fresh_fill = False
        # The account stream's word on the close in flight (its client id), kept for `_close_at_market`:
        # the venue's answer when the call's own answer is late or lost.
        self._closing_cid: str | None = None
        self._closing_reason = ""  # the exit reason of the close in flight
        self._close_heard: Order | None = None
        self._close_told = asyncio.Event()
        self._ending_told = asyncio.Event()  # a command that may end the position is queued
        self.failures = 0
        self._failures_in_grace = 0  # the most failures a naked position's grace capped (`_retry_delay`)
        # When a loss timed from its end on the venue (`_uncovered_since_its_end`) was found: its retries'
        # grace counts from here (it could not be acted on before).
        self._loss_found_at: float | None = None
        self._last_error: str | None = None
        self.last_error_at: float | None = None  # monotonic: when `last_error` was last said
        self.restarts = 0  # times its task died with the position open and was started again
        self.restart_said_at: float | None = None
        # A failure said in full (ERROR, event row, dashboard): (operation, error) → when (monotonic). The
        # same failure again within `REPEATED_FAILURE_SAID_EVERY_SECONDS` is a line at INFO: look-ups that
        # kept failing during a stream gap said 160 ERROR lines a minute for 8 positions.
        self._failure_said: dict[tuple[str, str, bool], float] = {}
        self._commands: deque[GuardCommand] = deque()
        self.retry_at: float | None = None  # the venue named when to try again (Retry-After, ban end)
        # Managed moves failed in a row: no new move is decided before `_moves_resume_at` (their backoff,
        # counted apart from the passes', which a converged pass resets), whatever the marks say.
        self._move_failures = 0
        self._moves_resume_at: float | None = None
        self.check_fired_soon = False  # the mark crossed one of our stops: ask the venue how it stands
        self._native_extreme: Decimal | None = None  # best mark since the native trailing stop armed
        self._native_extreme_of: str | None = None  # the trailing order (client id) that extreme is for
        self._native_armed_of: str | None = None  # the native trailing order (client id) known armed
        # Whether the venue's trail follows the mark, as the marks we see do (read once: every mark asks).
        self.trails_on_mark = manager.venue.capabilities().trailing_stop_follows == "mark"
        self.size_changed = False  # the venue changed the position's size while guarded: its PnL is unknown
        # The liquidation price the venue stated last (a reconcile pass's position read), and whether a hard
        # stop beyond it was said (once per position: the venue's figure moves with every read).
        self.liquidation_price: Decimal | None = None
        self._beyond_liquidation_said = False
        self._placed_inside_said = False  # its first hard stop placed inside the figure, not as configured
        # Its first hard stop waits for the read of its liquidation price (`liquidation_read_for`), not
        # written or sent yet: a figure read meanwhile sets its price directly.
        self.awaiting_liquidation = False
        self._superseded: list[ProtectiveOrder] = []  # resized-away stops, cancelled once the new ones live
        # A closed position's stops whose cancels are on their way (client id → sent at): a manager stopped
        # meanwhile hands them to the next one, which cancels them before the symbol takes a new position.
        self.retiring: dict[str, float | None] = {}
        # A hard stop that rode on the entry: the price the fill gives it, when that is more than a tick
        # away (replaced once confirmed), and the attached stop while its replacement is on its way.
        self._attached_correction: Decimal | None = None
        self._attached_holds: ProtectiveOrder | None = None
        self._entry_carried: str | None = None  # the client id of the hard stop this run's entry carried
        self._correction_rides = False  # sent beside the trailing stop, in its call (this pass)
        # A stop of ours filled: sending stops for a position that is gone would only be refused (-2022);
        # the reconciler settles it with this evidence, or clears it if the venue still holds the position.
        self.exit_evidence: ExitEvidence | None = None
        # The venue's word that the position is gone (monotonic time): one of our stops refused for reducing
        # nothing, or deactivated after the account stream said flat. No stop is sent until the
        # reconciler's answer (flat: the position is closed; held: protected again).
        self.said_gone_at: float | None = None
        # Ended while the venue holds another position on the symbol (turned, or opened by hand after our
        # stop filled): that one is adopted by a reconcile pass asked for as soon as this guard is done.
        self.adopt_after_end = False
        self._pass: asyncio.Future[bool] | None = None  # the protection pass in flight
        self._stuck_timer: asyncio.Task[None] | None = None  # asks for a StuckTriggerCheck when patience ends
        self._fact: PositionCoverage | None = None  # the last coverage(), given again while nothing changed
        # The account stream's word on the position: when it last said its size (venue epoch seconds; an
        # older event is out of order and ignored) and whether that was "flat".
        self._stream_position_at = float("-inf")
        self._quantity_seen_at = float("-inf")  # (monotonic) when the size last applied was the venue's
        self.venue_flat_at: float | None = None
        # The fill on the wall clock: a pushed size older than the position itself is about an earlier one.
        self.opened_epoch = manager.clock.now() - (manager.clock.monotonic() - filled_at)
        self.wake = asyncio.Event()
        self.protected = asyncio.Event()  # covered for the first time (set once)
        self.ended = asyncio.Event()  # its position is over, on the record (`closed`)
        # Covered as of the last pass's verdict: cleared when a stop goes missing, set again once both are
        # confirmed. What a stop waits on: a position protected once and then missing a stop is waited for.
        self.covered_now = asyncio.Event()
        # Set once a pass reached a verdict: covered, or not for a reason of its own. A pass that ended only
        # waiting out the venue's read-after-write lag (an order sent, not readable yet) has none: the
        # start-up report waits for the look-up after the lag instead of calling live stops failed.
        self.first_pass = asyncio.Event()
        self._waiting_out_lag = False  # this pass found an order not readable yet within the lag window
        self._failed_this_pass = False  # this pass met a failure (`_note_failure`, a create that failed)
        self._interrupted = False  # the last pass was cut short by an urgent command
        self.passes_started = 0  # protection passes begun so far
        self._last_finished_pass = 0  # the number of the last pass that ended (converged or not)
        self._pass_finished = asyncio.Event()
        self.report = GuardReport(self.position_id, self.symbol)
        self._written_facts: tuple[Any, ...] | None = None

    async def protected_or_ended(self) -> None:
        """Until its position is covered for the first time, or is over (closed before it ever was: a stop
        that would trigger at once closes it at market, and its wave waited 120 s for a protection that
        could not come; r72)."""
        await first_of(self.protected.wait(), self.ended.wait())

    # --- facts ---------------------------------------------------------------------------------------

    def trail_params(
        self, *, callback_percent: Decimal | None = None, activation_percent: Decimal | None = None
    ) -> trailing.TrailingParams:
        """The trail's parameters; a restore passes the percents the trail was started with, so a config
        change between runs cannot silently re-shape a live trail (without them: those the position was
        opened with)."""
        config = self._m.config
        opened_callback, opened_activation = self._opened_trail
        self.callback_percent = callback_percent if callback_percent is not None else opened_callback
        self.activation_percent = activation_percent if activation_percent is not None else opened_activation
        return trailing.TrailingParams(
            side=self.side,
            entry_price=self.entry_price,
            activation_percent=self.activation_percent,
            callback_percent=self.callback_percent,
            tick_size=self.market.tick_size,
            min_move_interval_seconds=config.min_move_interval_seconds,
            min_improvement_percent=config.min_improvement_percent,
            emergency_move_percent=config.emergency_move_percent,
        )

    @property
    def last_error(self) -> str | None:
        """The last failure said for this position (kept when it recovers: history, dated `last_error_at`)."""
        return self._last_error

    @last_error.setter
    def last_error(self, error: str | None) -> None:
        self._last_error = error
        self.last_error_at = self._m.clock.monotonic() if error is not None else None

    @property
    def watched_stops(self) -> tuple[ProtectiveOrder, ...]:
        """The stops whose confirmation counts for this position's cover, each watched for the venue's word
        (the account stream, a listing, a look-up by id, a gap's doubt, a mark through it): its hard and
        trailing stops, and, while the hard stop that rode on the entry is being replaced from the fill,
        that one too. It is the hard stop meanwhile: removed by hand or fired, the position showed covered
        for as long as its correction kept failing (Bybit, a reviewer)."""
        held = self._attached_holds
        if held is None:
            return (self.stop_loss, self.trailing_stop)
        return (self.stop_loss, self.trailing_stop, held)

    @property
    def has_stop_loss(self) -> bool:
        holds = self._attached_holds  # an attached hard stop being replaced from the fill price
        return (self.stop_loss.confirmed or (holds is not None and holds.confirmed)) and not self.closed

    @property
    def live_stop_loss_price(self) -> Decimal | None:
        """The price of the hard stop the venue holds: the confirmed one's, or, while an attached stop is
        being replaced from the fill, the attached one's (it protects the position until its replacement is
        confirmed). The correction's price was shown and recorded as the stop's while the venue held the
        other. None when no hard stop of ours is live."""
        if self.closed:
            return None
        if self.stop_loss.confirmed:
            return self.stop_loss.price
        holds = self._attached_holds
        return holds.price if holds is not None and holds.confirmed else None

    @property
    def stop_loss_unverified(self) -> bool:
        """The hard stop is in doubt, not known gone (`ProtectiveOrder.unverified`, and not said ended by the
        account stream since)."""
        order = self.stop_loss
        return not self.closed and not self.has_stop_loss and order.unverified and not order.told_ended

    @property
    def trailing_stop_unverified(self) -> bool:
        """The trailing stop is in doubt, not known gone (as `stop_loss_unverified`)."""
        order = self.trailing_stop
        return not self.closed and not self.trailing_in_place and order.unverified and not order.told_ended

    @property
    def has_trailing_stop(self) -> bool:
        """A trailing order of ours is confirmed live on the exchange (native: the trailing stop; managed:
        the stop the trail placed and moves). What `positions.has_trailing_stop` records."""
        return self.trailing_stop.confirmed and not self.closed

    def _native_armed(self, order: ProtectiveOrder) -> bool:
        """The native trailing order under its current id is armed on the venue: sent armed at the mark, or
        its activation reached by a mark since (this engine's, or the last one's, as recorded). Inferred
        from marks only where the venue's trail follows the mark (Bybit's follows the last price)."""
        return (
            self.kind is TrailingKind.NATIVE
            and order.client_order_id is not None
            and (order.arm_now or self._native_armed_of == order.client_order_id)
        )

    @property
    def native_trail_armed(self) -> bool:
        """The venue's trailing stop (native) is armed, as far as the marks since it was placed tell: sent
        armed at the mark, or its activation price reached by a mark. Once armed the venue keeps it so when
        the price pulls back under the activation (it trails from its best mark): it is not "waiting"."""
        order = self.trailing_stop
        return (
            self.kind is TrailingKind.NATIVE
            and order.confirmed
            and (order.price is None or self._native_armed(order))
        )

    @property
    def trail_armed(self) -> bool:
        """Managed mode: this engine holds the trail (persisted, not over) and will place and move its stop."""
        return (
            not self.closed
            and self.kind is TrailingKind.MANAGED
            and self.trail_persisted
            and self.trail is not None
            and not self.trail.phase.is_terminal
        )

    def protection_words(self) -> str:
        """What protects the position now, in the words of a failure's line: "unprotected" only when
        neither stop may be on the venue. A Bybit position whose hard stop rode on its entry (not verified
        yet) was said "unprotected" for its trailing stop's failure, and one whose stop was only in doubt
        for a failed look-up too (an operator)."""
        if self.covered:
            return "still protected by its confirmed stops"
        if self.has_stop_loss:
            return "without its trailing stop (its hard stop is live)"
        if self.trailing_in_place:
            if self.kind is TrailingKind.MANAGED and (self.trail is None or self.trail.stop_price is None):
                # Armed, not activated: no order of it is on the venue, and it moves nothing below the price
                # ("its trailing protection is live" was said of a position with no order at all: r79).
                return "unprotected (its managed trail has no stop on the venue before it activates)"
            return "without its hard stop (its trailing protection is live)"
        held = self._attached_holds
        hard = _stop_state(held if held is not None and not self.stop_loss.maybe_sent else self.stop_loss)
        if held is not None and hard == "sent, not confirmed":
            hard = "carried by its entry, not verified yet"
        trailing = _stop_state(self.trailing_stop)
        if hard == trailing == "missing":
            return "unprotected"
        return f"uncovered (hard stop {hard}, trailing stop {trailing})"

    @property
    def trailing_in_place(self) -> bool:
        """The trailing protection is in place: native, its order is live; managed, the trail is armed and
        any stop it has placed is live (before activation there is no order yet, by design)."""
        if self.kind is TrailingKind.NATIVE:
            return self.has_trailing_stop
        assert self.trail is not None or not self.trail_armed
        return self.trail_armed and (
            self.trail is None or self.trail.stop_price is None or self.has_trailing_stop
        )

    @property
    def covered(self) -> bool:
        return self.has_stop_loss and self.trailing_in_place

    @property
    def covered_without_engine(self) -> bool:
        """Both stops are orders the venue holds: what protects the position once no engine runs (a managed
        trail before it activates has no order, and nothing places one while the engine is stopped)."""
        return self.has_stop_loss and self.has_trailing_stop

    @property
    def move_in_flight(self) -> bool:
        """A managed move's new stop has been sent (or was left in flight by the last run or an interrupted
        pass) and not resolved, or it is confirmed and the old stop's cancel is on its way (a clean stop
        that came in between left both stops live: `finish_moves` waits for it)."""
        return self._replacement is not None or self._restored_move is not None or self._move_finishing

    def coverage(self) -> PositionCoverage:
        covered = self.covered
        if not covered and self.unprotected_since is None:
            # Coverage just lost (a stop fired, or was found gone) and the pass has not written it yet: it
            # is timed from now, not from the fill (which read as "uncovered for as long as it was held").
            self.unprotected_since = self._m.clock.monotonic()
            self.unprotected_since_epoch = self._m.clock.now()
        self._fact = kept_fact(
            self._fact,
            self.position_id,
            self.symbol,
            self.has_stop_loss,
            self.trailing_in_place,
            self.filled_at,
            None if covered else self.unprotected_since,
        )
        return self._fact

    def _current_orders(self) -> list[ProtectiveOrder]:
        current = (
            self.stop_loss,
            self.trailing_stop,
            self._replacement,
            self._restored_move,
            *self._superseded,
        )
        return [o for o in current if o is not None and o.client_order_id]

    def order_ids(self) -> set[str]:
        """Client ids this guard considers current (anything else of ours for this position is stale)."""
        return {o.client_order_id for o in self._current_orders() if o.client_order_id}

    def absent_unproven(self, cid: str, asked_at: float, recorded_at: float | None) -> bool:
        """Whether the venue's "no such order" for our order `cid`, asked at `asked_at` (monotonic), proves
        nothing yet: its read lag after the send still runs. Timed from this guard's knowledge of its send,
        or else from its record's writing (`recorded_at`, monotonic; written before it was sent)."""
        for order in self._current_orders():
            if order.client_order_id == cid:
                if not (order.confirmed or order.maybe_sent):
                    # Its every send refused with nothing executed: not on the venue, lag or no lag. (Each
                    # refused send restarted the lag's clock, and a gone position stayed `active` for as
                    # long as the venue failed the stop: 127 s; r73.)
                    return False
                provable_at = self._absence_provable_at(order, asked_at)
                return provable_at is not None and asked_at < provable_at
        window = self._m.absence_window()
        return window > 0 and recorded_at is not None and asked_at < recorded_at + window

    # --- the task ------------------------------------------------------------------------------------

    def hear_live(self, client_order_id: str) -> bool:
        """The account stream says our order `client_order_id` is live (NEW). Woken when it is one of this
        guard's stops not confirmed yet (its answer late or lost, or a move left in flight); True then."""
        waiting = [
            o
            for o in (self.stop_loss, self.trailing_stop, self._restored_move, self._replacement)
            if o is not None and o.client_order_id == client_order_id and not o.confirmed
        ]
        if self.closed or not waiting:
            return False
        for order in waiting:
            order.heard_live.set()
        self.wake.set()
        return True

    def submit(self, command: GuardCommand) -> asyncio.Future[tuple[bool, str]]:
        """Hand the guard a command; its task applies it. An urgent one interrupts a pass in flight."""
        if self.closed:
            command.settle(isinstance(command, PositionGone | ClosePosition), "position already closed")
            return command.done
        if self._m.stopped:  # its task is gone (a protection restart): queued, it would never be answered
            command.settle(False, "the guard stopped (protection restarting)")
            return command.done
        self._commands.append(command)
        withdraws = self._withdraws_cover(command)
        if (command.urgent or withdraws) and self._pass is not None and not self._pass.done():
            self._pass.cancel()
        if command.ends_position or withdraws or self._fires_a_confirmed_stop(command):
            self._ending_told.set()  # taken by a close waiting for its turn, too
        self.wake.set()
        return command.done

    def _withdraws_cover(self, command: GuardCommand) -> bool:
        """The venue's word that a confirmed stop of ours is gone (the stream's cancel or expiry, the
        reconciler's "not among the open orders"): it interrupts a pass in flight too. Queued behind one, it
        waited as long as the pass's sends did (a slow venue; a ban's end for a trailing move), the position
        counted covered by a stop the venue no longer held."""
        if isinstance(command, StreamOrderUpdate):
            order = command.order
            if order is None or order.status not in (OrderStatus.CANCELED, OrderStatus.EXPIRED):
                return False
            cid, seen_at = order.client_order_id, float("inf")
        elif isinstance(command, OrderMissing):
            cid, seen_at = command.client_order_id, command.seen_at - self._m.read_after_write_seconds
        elif isinstance(command, StopsUnverified):
            return any(_doubted_by(o, command) for o in self.watched_stops)
        else:
            return False
        return any(
            o.confirmed and o.client_order_id == cid and o.confirmed_at < seen_at for o in self.watched_stops
        )

    def _fires_a_confirmed_stop(self, command: GuardCommand) -> bool:
        """The account stream's word that a confirmed stop of ours fired (TRIGGERING): it protects nothing
        from then on. A close held while the hard stop covers its position (`_close_turn`) takes it at
        once: held behind the close, a hard stop fired and stuck kept the close waiting 8.8 s with no stop
        of ours working, and the position said covered by it (r93)."""
        if not isinstance(command, StreamOrderUpdate) or command.order is None:
            return False
        order = command.order
        return order.status is OrderStatus.TRIGGERED and any(
            o.confirmed and o.client_order_id == order.client_order_id for o in self.watched_stops
        )

    async def run(self) -> None:
        clock = self._m.clock
        try:
            while not self.closed:
                if self._commands:
                    await self._apply(self._commands.popleft())
                    continue
                converged = await self._one_pass()
                # A pass a command interrupted has not tried everything yet (a protection restart's report
                # counted a wave's new positions "failed" when the account stream's word on their fills
                # cut their first passes short): the first pass is the first one that ran to its end.
                if (converged or not self._waiting_out_lag) and not self._interrupted:
                    self.first_pass.set()
                if self.closed or self._commands:
                    continue
                if converged:
                    self._failure_said.clear()  # the next failure is a new one: said in full
                    if self.failures:  # after failed passes: the venue may take the others' stops again too
                        self._m.failing_guards_try_now(self)
                    self.failures = self._failures_in_grace = 0
                    await self.wake.wait()
                else:
                    # One per pass, however many of its orders failed. A pass that only waited out the
                    # venue's read lag met no failure: counted, it made the first real failure after a 5 s
                    # lag back off as a sixth (30 s, its position without a hard stop, in a soak).
                    if self._failed_this_pass or not self._waiting_out_lag:
                        self.failures += 1
                    delay = self._retry_delay(self.failures)
                    # (held by the venue's word, a Retry-After or a ban's end, it is not woken early)
                    self.backing_off = self.retry_at is None
                    self.retry_at = None
                    try:
                        await first_of(self.wake.wait(), clock.sleep(delay))
                    finally:
                        self.backing_off = False
                self.wake.clear()
        finally:
            # Ended (its position gone before any pass: a stop that fired while no engine ran, closed by the
            # start's reconcile) or stopped: nothing to wait for. A start waited out its whole budget (30 s)
            # for this guard's first pass, with nothing else running meanwhile (a reviewer). Not a task that
            # died: the guard is started again, and its first pass is still to come.
            if self.closed or self._m.stopped:
                self.first_pass.set()
            if self._pass is not None and not self._pass.done():
                self._pass.cancel()
            if self._stuck_timer is not None:
                self._stuck_timer.cancel()
            for command in self._commands:
                if self.closed and isinstance(command, PositionGone | ClosePosition):
                    command.settle(True, "position already closed")  # (asked twice, or as it ended)
                else:
                    command.settle(False, "the guard stopped")
            # Answered: a guard started again after its task died must not carry them out (an operator's
            # close answered "the guard stopped" went at market a backoff later).
            self._commands.clear()

    async def wait_pass_started_after(self, started: int) -> None:
        """Until a pass begun after the `started`-th has ended (or the guard closed): what an operator's
        re-protect reports, not a pass that was already failing when it was asked for."""
        while self._last_finished_pass <= started and not self.closed:
            self._pass_finished.clear()
            await self._pass_finished.wait()

    async def _one_pass(self) -> bool:
        """One protection pass, in a task of its own so an urgent command can interrupt it."""
        self.passes_started += 1
        number = self.passes_started
        self._waiting_out_lag = False
        self._failed_this_pass = False
        self._interrupted = False
        try:
            return await self._run_pass()
        finally:
            self._last_finished_pass = number
            self._pass_finished.set()

    async def _run_pass(self) -> bool:
        self._pass = asyncio.ensure_future(self._converge())
        try:
            await asyncio.wait({self._pass})
        except asyncio.CancelledError:
            self._pass.cancel()
            await asyncio.gather(self._pass, return_exceptions=True)
            raise
        if self._pass.cancelled():
            self._interrupted = True
            return False  # interrupted by a command: it runs next, then the pass again
        exc = self._pass.exception()
        if exc is not None:  # a bug or a DB failure must not end protection: log, retry
            self._note_failure("protect", f"{type(exc).__name__}: {exc}", log_exception=exc)
            return False
        return self._pass.result()

    async def _apply(self, command: GuardCommand) -> None:
        try:
            if isinstance(command, PositionGone):
                await self._finish(exit_reason=command.exit_reason, exit_price=command.exit_price)
                command.settle(True, command.exit_reason)
            elif isinstance(command, ClosePosition):
                ok = await self._close(exit_reason=command.exit_reason)
                command.settle(ok, "closed" if ok else (self.last_error or "close failed"))
            elif isinstance(command, OrderMissing):
                command.settle(self._order_missing(command), command.client_order_id)
            elif isinstance(command, StopsUnverified):
                command.settle(self._stops_unverified(command), "")
            elif isinstance(command, PositionHeld):
                command.settle(self._position_held(command), "")
            elif isinstance(command, QuantityChanged):
                command.settle(await self._quantity_changed(command), str(command.quantity))
            elif isinstance(command, LiquidationStated):
                command.settle(await self._liquidation_stated(command), str(command.price))
            elif isinstance(command, StuckTriggerCheck):
                await self._check_fired()
                command.settle(True, "")
            elif isinstance(command, StreamOrderUpdate):
                command.settle(await self._stream_order_update(command), "")
            elif isinstance(command, StreamPositionUpdate):
                command.settle(await self._stream_position_update(command), "")
        except asyncio.CancelledError:
            command.settle(False, "the guard stopped")
            raise
        except Exception as exc:
            self._note_failure(type(command).__name__, f"{type(exc).__name__}: {exc}", log_exception=exc)
            command.settle(False, f"{type(exc).__name__}: {exc}")

    def stop_may_be_near_liquidation(self, leverage: int) -> bool:
        """From the leverage the venue last stated for the symbol alone, whether the configured hard stop
        may lie near the liquidation price: the figure lies about 1/leverage less the maintenance rate from
        the entry. At the default 3 %: from about 25x."""
        if leverage <= 1:
            return False
        distance = Decimal(1) / Decimal(leverage) - MAINTENANCE_RATE_BOUND
        percent = self._m.config.stop_loss_percent / _HUNDRED
        return percent >= distance * (1 - LIQUIDATION_BAND_SHARE)

    async def liquidation_read(self, price: Decimal) -> None:
        """The venue's liquidation price, read after the fill: applied at once while the first hard stop
        waits for it (its price set before it is written and sent), else as a command of the guard's own."""
        if self.awaiting_liquidation:
            await self._liquidation_stated(LiquidationStated(price=price))
        else:
            self.liquidation_price = price
            if self.stop_limit_for_liquidation(price) is not None:
                self.submit(LiquidationStated(price=price))

    def _too_near_liquidation(self, stop: Decimal | None, liquidation: Decimal) -> bool:
        """A hard stop at `stop` would not close the position before the venue liquidates it at
        `liquidation`: at it, beyond it, or nearer it than `LIQUIDATION_BAND_SHARE` of the way back."""
        if stop is None:
            return False
        band = stop_inside_liquidation(
            self.side, self.entry_price, liquidation, self.market, LIQUIDATION_BAND_SHARE
        )
        return band is not None and (
            never_fires(self.side, stop, liquidation) or stop_beyond(self.side, stop, band)
        )

    def stop_limit_for_liquidation(self, liquidation: Decimal) -> Decimal | None:
        """Where the hard stop goes, inside the venue's liquidation price `liquidation`, when a stop this
        guard holds or is about to send is too near it (`_too_near_liquidation`); None otherwise. A stop
        further inside is left: it fires first (moving any stop in the last fifth said "beyond" of stops that
        were not, and replaced them at every tick cross margin's figure crept: a reviewer)."""
        limit = stop_inside_liquidation(self.side, self.entry_price, liquidation, self.market)
        if limit is None:
            return None
        prices = [self.stop_loss.price, self._attached_correction]
        if self._attached_holds is not None:
            prices.append(self._attached_holds.price)
        if any(self._too_near_liquidation(p, liquidation) for p in prices):
            return limit
        return None

    async def _liquidation_stated(self, command: LiquidationStated) -> bool:
        """A hard stop beyond the liquidation price never fires: it is moved inside it (tightened only:
        never moved back out when the figure moves away), the position uncovered until the venue confirms
        the new stop (the old one is no cover). The first move of a position is said as an ERROR, later
        ones (the figure crept past the moved stop) as a WARNING, each with an event."""
        self.liquidation_price = command.price
        limit = self.stop_limit_for_liquidation(command.price)
        if limit is None or self.closed or self.close_sent or self.exit_evidence is not None:
            return False
        m = self._m
        order, held, side = self.stop_loss, self._attached_holds, self.side
        prices = [held.price if held is not None else None, order.price, self._attached_correction]
        was = next(p for p in prices if p is not None and self._too_near_liquidation(p, command.price))
        where = (
            "lies at"
            if was == command.price
            else "lies beyond"
            if stop_beyond(side, was, command.price)
            else "lies within a twentieth of the way from"
        )
        on_venue = held is not None or order.confirmed or order.maybe_sent or order.recorded_id is not None
        if not on_venue:
            # Not sent yet (it waited for the figure, or the figure came first): placed inside it at once.
            # Said, for the configuration meets the venue's leverage there, but no stop was ever lost.
            text = (
                f"{self.symbol}: the configured hard stop at {was} would lie {where.removeprefix('lies ')} the "
                f"liquidation price the venue states ({command.price}): placed at {limit} instead"
            )
            log.warning("%s", text)
            if not self._placed_inside_said:
                self._placed_inside_said = True
                m.spawn_event_write(
                    Severity.WARNING, "stop_beyond_liquidation", text, self.symbol, self.position_id
                )
            order.price = limit
            self._attached_correction = None if self._attached_correction is None else limit
            self.wake.set()
            return True
        text = (
            f"{self.symbol}: the hard stop at {was} {where} the liquidation price the venue states "
            f"({command.price}): the venue would liquidate the position before it fires or fills; moving it "
            f"to {limit}"
        )
        severity = Severity.WARNING if self._beyond_liquidation_said else Severity.ERROR
        self._beyond_liquidation_said = True
        log.log(logging.ERROR if severity is Severity.ERROR else logging.WARNING, "%s", text)
        m.spawn_event_write(severity, "stop_beyond_liquidation", text, self.symbol, self.position_id)
        # On the dashboard's errors too, as a stop lost (its replacement's confirmation says it is back):
        # the ERROR line alone reached the log file, and the panel said "0 errors" over five moves.
        m.publish(
            ProtectionFailed(
                at=m.clock.now(),
                position_id=self.position_id,
                symbol=self.symbol,
                operation="verify stop-loss",
                error=f"{where} the liquidation price {command.price}: moving it to {limit}",
                retry_in_seconds=0.0,
            )
        )
        if self._too_near_liquidation(self._attached_correction, command.price):
            self._attached_correction = limit
        if held is not None and self._too_near_liquidation(held.price, command.price):
            self._attached_holds = None  # no cover (it stays among the superseded, cancelled once covered)
            held.confirmed = False
        if order.price is not None and not self._too_near_liquidation(order.price, command.price):
            self.wake.set()  # (only the held one lay beyond: its correction is the stop to come)
            return True
        if self._may_be_live(order):
            self._supersede(order)
        order.maybe_sent = False
        order.price = limit
        self.wake.set()
        return True

    def _may_be_live(self, order: ProtectiveOrder) -> bool:
        """Whether the venue may hold `order` under its current id: confirmed, maybe sent, or an id the venue
        answered placed (`ProtectionManager.placed_ids`) that a look-up took for absent past the read lag we
        count on, or whose send again was refused: it may be live all the same (r84, r85)."""
        cid = order.client_order_id
        return bool(cid) and (order.confirmed or order.maybe_sent or cid in self._m.placed_ids)

    def _supersede(self, order: ProtectiveOrder) -> None:
        """`order`, which the venue may hold, goes to the superseded stops (cancelled once the position is
        covered again), and it takes its next id: a stop replaced (resized, moved inside liquidation)."""
        if self._may_be_live(order):
            self._superseded.append(
                ProtectiveOrder(
                    order.purpose,
                    generation=order.generation,
                    client_order_id=order.client_order_id,
                    confirmed=order.confirmed,
                    maybe_sent=order.maybe_sent,
                    # Its cancel may come inside the venue's read-after-write lag: "unknown order" then
                    # proves nothing (without it, both sizes stayed live until the reconciler).
                    sent_at=order.sent_at,
                    send_ticket=order.send_ticket,
                )
            )
            if order.missed_by_listing and self._m.venue.capabilities().stops_are_orders:
                # A listing's miss of it goes with it: its cancel's answer settles it (`_cancel_quietly`).
                self._superseded[-1].missed_by_listing = True
                order.missed_by_listing = False
        self._fresh_id(order)

    async def _quantity_changed(self, command: QuantityChanged) -> bool:
        """Resize the stops to the venue's quantity: new ones first, the old ones cancelled once the new
        are confirmed (a stop for the wrong size is still better than none meanwhile)."""
        m = self._m
        if command.seen_at < self._quantity_seen_at:
            return False  # read before the size applied last was told
        self._quantity_seen_at = max(self._quantity_seen_at, min(command.seen_at, m.clock.monotonic()))
        if command.quantity <= 0 or command.quantity == self.quantity or self.exit_evidence is not None:
            return False
        self.size_changed = True
        if not m.venue.capabilities().stops_are_orders:
            # The stops are the position's own (Bybit's trading-stop, tpslMode Full): they close whatever
            # it holds, at any size. Sent again, the trailing stop restarted from the mark (its activation
            # passed: armed anew), giving back up to a callback of what it had trailed.
            log.info(
                "%s: the venue holds %s (was %s); its stops cover the whole position, nothing to resize",
                self.symbol,
                command.quantity,
                self.quantity,
            )
            await m.store.set_position_quantity(self.position_id, command.quantity)
            self.quantity = command.quantity
            return True
        log.warning(
            "%s: the venue holds %s where our stops cover %s; placing stops for %s",
            self.symbol,
            command.quantity,
            self.quantity,
            command.quantity,
        )
        await m.store.set_position_quantity(self.position_id, command.quantity)
        m.spawn_event_write(
            Severity.WARNING,
            "quantity_changed",
            f"{self.symbol}: venue quantity {command.quantity}, stops covered {self.quantity}: resizing them",
            self.symbol,
            self.position_id,
        )
        self.quantity = command.quantity
        restored_move, self._restored_move = self._restored_move, None
        if restored_move is not None:
            # A move the last run left in flight was for the old size: not adopted, cancelled with the
            # other resized-away stops once the new ones are live.
            self._superseded.append(restored_move)
            if self.trail is not None and self.trail.phase is trailing.TrailingPhase.MOVING:
                self.trail = trailing.on_stop_failed(self.trail)
        for order in (self.stop_loss, self.trailing_stop):
            self._supersede(order)
            order.maybe_sent = False
        self.wake.set()
        return True

    # --- the account stream's facts ---------------------------------------------------------------------

    async def _stream_order_update(self, command: StreamOrderUpdate) -> bool:
        """Apply what the venue pushed about one of our orders. Only an order this guard considers current
        is acted on: an event for an earlier generation, a superseded size or an id we already moved past
        (a late or repeated event) changes nothing, so nothing regresses (a NEW after FILLED, a second
        CANCELED); our own cancels never hit a current confirmed order (`_cancel_quietly` un-confirms it
        first, and a finished guard takes no command), so they cause no re-placement."""
        update = command.order
        if update is None or self.closed:
            return False
        cid = update.client_order_id
        target = next(
            (o for o in self.watched_stops if o.client_order_id and o.client_order_id == cid),
            None,
        )
        if target is None:
            return False
        m = self._m
        status = update.status
        if status is OrderStatus.FILLED:
            reason = "trailing_stop" if target.purpose is OrderPurpose.TRAILING_STOP else "stop_loss"
            self.exit_evidence = ExitEvidence(
                reason, update.average_price, cid, m.clock.monotonic(), venue_at=update.updated_at
            )
            target.ended_as = OrderStatus.FILLED
            target.ended_id = cid
            target.maybe_sent = False
            self._fresh_id(target)
            # (INFO: a stop that fills is the exit the product exists to make; said at WARNING, with its
            # "fired", it was most of a soak's WARNINGs, two for every normal exit)
            log.info(
                "%s: %s %s filled at %s (account stream)",
                self.symbol,
                stop_words(target.purpose),
                cid,
                update.average_price,
            )
            m.spawn_order_status(OrderStatusRow(cid, OrderRecordStatus.FILLED, update.venue_order_id))
            if self.venue_flat_at is not None:
                await self._finish(exit_reason=reason, exit_price=update.average_price)
            else:
                m.request_reconcile()  # the venue's position read settles it (flat, or a partial fill)
            return True
        if status is OrderStatus.TRIGGERED:
            if target.fired_at is not None or not (target.confirmed or target.maybe_sent):
                return False
            # It protects nothing now and is not over: uncovered until the venue says how it ended (the
            # stream's fill, or the guard's own look-up; when its patience ends `_check_fired` acts).
            target.confirmed = False
            target.maybe_sent = True
            target.fired_at = m.clock.monotonic()
            target.missed_by_listing = False  # (it fired: why a listing left it out, nobody's hand)
            self._arm_stuck_check()
            # (INFO: it fills milliseconds later as a rule; one that does not is an ERROR once its
            # patience ends, `_check_fired`)
            log.info(
                "%s: %s %s fired (account stream); uncovered until it fills",
                self.symbol,
                stop_words(target.purpose),
                cid,
            )
            self.wake.set()
            return True
        if status in (OrderStatus.CANCELED, OrderStatus.EXPIRED):
            if not target.confirmed:
                if target.unverified and not target.told_ended and self.venue_flat_at is None:
                    # In doubt (a gap in the stream, a restart): the venue has now said it ended. Shown
                    # missing, not "unverified, not known gone" — said so for minutes while a ban kept the
                    # look-up from being made (a reviewer, on Bybit). Still a doubt for the entries' hold,
                    # until the look-up by id (or a listing) settles it. (Not the venue's own clean-up of a
                    # position the stream said flat.)
                    log.warning(
                        "%s: %s %s %s on the venue (account stream) while in doubt; asking the venue",
                        self.symbol,
                        stop_words(target.purpose),
                        cid,
                        status.value,
                    )
                    target.told_ended = True
                self.wake.set()  # in flight or fired: the guard's look-up by id settles it
                return False
            if target.sent_again and self.venue_flat_at is None:
                # Its id went out more than once: this end may be an earlier copy's, one that someone else
                # cancelled before a later send placed the copy this guard confirmed. Taken at its word, a
                # second hard stop was placed beside the live copy for 9.6 s (a reviewer). Asked by id first.
                log.warning(
                    "%s: %s %s %s on the venue (account stream), its id sent more than once: asking the venue "
                    "which copy ended",
                    self.symbol,
                    stop_words(target.purpose),
                    cid,
                    status.value,
                )
                target.confirmed = False
                target.maybe_sent = True
                target.sent_again = False  # (asked once: the next word on this id is taken as it comes)
                self.wake.set()
                return True
            # After the stream said the position went flat, the venue deactivates what is left on it (Bybit
            # does): nobody removed a stop. Said at ERROR, with a stop "re-placed" into "no position".
            cleaned_up = self.venue_flat_at is not None and self.exit_evidence is None
            if cleaned_up:
                log.info(
                    "%s: %s %s %s with its position (the account stream said flat); asking the venue",
                    self.symbol,
                    stop_words(target.purpose),
                    cid,
                    status.value,
                )
            else:
                self._ended_by_someone(cid, target.purpose, status, "account stream")
            m.spawn_order_status(OrderStatusRow(cid, record_status_of(status), update.venue_order_id))
            target.ended_as = status
            target.ended_id = cid
            target.maybe_sent = False
            self._fresh_id(target)  # un-confirmed: the next pass sends a new one (or asks the venue first)
            if cleaned_up:
                self._said_gone(m.clock.monotonic())
            else:
                self.wake.set()
            return True
        return False  # NEW: our own send's answer confirms it

    async def _stream_position_update(self, command: StreamPositionUpdate) -> bool:
        """Apply the venue's pushed size. Flat with a fill of ours: the position is over (closed with the
        fill's price and reason, the sibling cancelled). Flat without one: never believed alone (no stop is
        cancelled before the position is confirmed flat); the reconciler asks the venue now. A size of its
        own: the stops are resized; still held after our stop filled: protected again."""
        if self.closed:
            return False
        if command.event_time < max(self._stream_position_at, self.opened_epoch):
            if (
                command.quantity
                and command.liquidation_price is not None
                and self.liquidation_price is None
                and command.event_time >= self.opened_epoch - FILL_PUSH_SLACK_SECONDS
            ):
                # The fill's own push, told before its entry's answer made this guard: its size is no news,
                # its liquidation price is this position's (the first this guard hears of).
                await self._liquidation_stated(LiquidationStated(price=command.liquidation_price))
            return False  # out of order (a newer size was applied), or about an earlier position
        evidence = self.exit_evidence
        if (
            command.quantity
            and evidence is not None
            and evidence.venue_at
            and command.event_time < evidence.venue_at
        ):
            # A size the venue told before our stop filled, delivered after the fill's own event (a venue
            # orders events within one stream only): older news, not the position still held.
            return False
        self._stream_position_at = command.event_time
        m = self._m
        if command.quantity == 0:
            self.venue_flat_at = command.event_time
            evidence = self.exit_evidence
            if evidence is not None:
                await self._finish(exit_reason=evidence.exit_reason, exit_price=evidence.exit_price)
            elif not any(o.fired_at is not None for o in self.watched_stops):
                m.request_reconcile()  # nothing of ours fired: the venue is asked (closed by hand?)
            # else one of our stops fired: its fill is on its way (the stream's, or the guard's look-up)
            return True
        self.venue_flat_at = None
        if self.exit_evidence is not None:
            self._position_held(PositionHeld(seen_at=m.clock.monotonic()))
        # As of when the venue told it (its event time on our clock), not when it arrived: a size the
        # stream delivers late is older than a pass's read asked after it was told (recorded even when
        # unchanged).
        told_at = monotonic_of(m.clock, command.event_time)
        await self._quantity_changed(QuantityChanged(quantity=command.quantity, seen_at=told_at))
        if command.liquidation_price is not None:
            # Pushed with the fill on Bybit: the stop is kept inside it at once, not a reconcile pass later.
            await self._liquidation_stated(LiquidationStated(price=command.liquidation_price))
        return True

    async def _cancel_superseded(self) -> bool:
        """Cancel the resized-away stops (together); those whose cancel failed stay listed for the next
        pass. True when none is left."""
        orders = list(self._superseded)
        gone = await asyncio.gather(*(self._cancel_quietly(order) for order in orders))
        self._drop_superseded(order for order, done in zip(orders, gone, strict=True) if done)
        return not self._superseded

    def _take_trailing_stop(self, new: ProtectiveOrder) -> ProtectiveOrder | None:
        """Make `new` the trail's stop (a move confirmed); the old one, if the venue may hold it, is listed as
        superseded at once, before anything awaits, and returned for `_retire`. Listed until the venue
        says it is gone, it is cancelled again by the next pass, or with the position's end, whatever
        interrupts its cancel (an urgent command): dropped before that, an old stop stayed live after a
        close."""
        old, self.trailing_stop = self.trailing_stop, new
        if not self._may_be_live(old) or not self._m.venue.capabilities().stops_are_orders:
            if old.missed_by_listing:
                # A listing left it out and nothing will cancel it: said lost now (a managed trail's stop
                # cancelled by hand while a move was in flight went silent: r87). Cancelled, its cancel's
                # answer says (`_cancel_quietly`).
                self._missed_gone(old)
            return None
        self._superseded.append(old)
        return old

    async def _retire(self, order: ProtectiveOrder | None) -> None:
        """Cancel a superseded stop now (`_take_trailing_stop`); it stays listed if the cancel fails."""
        if order is not None and await self._cancel_quietly(order):
            self._drop_superseded([order])

    def _drop_superseded(self, gone: Iterable[ProtectiveOrder]) -> None:
        ids = {id(order) for order in gone}
        self._superseded = [order for order in self._superseded if id(order) not in ids]

    def _position_held(self, command: PositionHeld) -> bool:
        """A stop of ours filled, or the venue said the position was gone (`said_gone_at`), yet the venue
        still holds it, in an answer read after that (a partial fill, a flip): protect it again."""
        said_at = self.said_gone_at
        if said_at is not None and command.seen_at > said_at:
            log.warning(
                "%s: the venue said the position was gone, yet holds it; protecting it again", self.symbol
            )
            self.said_gone_at = None
            self.wake.set()
            return True
        evidence = self.exit_evidence
        if evidence is None or command.seen_at <= evidence.seen_at:
            return False
        log.warning(
            "%s: our %s %s filled but the venue still holds the position; protecting it again",
            self.symbol,
            evidence.exit_reason.replace("_", " "),
            evidence.client_order_id,
        )
        self.exit_evidence = None
        self.wake.set()
        return True

    def _order_missing(self, command: OrderMissing) -> bool:
        """The reconciler did not see one of our confirmed stops: put it in doubt (the guard looks it up by
        id, and replaces it if it is gone). A confirmation newer than the venue's answer stands."""
        m = self._m
        for order in self.watched_stops:
            if order.client_order_id != command.client_order_id or not order.confirmed:
                continue
            if order.confirmed_at >= command.seen_at - m.read_after_write_seconds:
                return False
            # Unverified, looked up by its id before anything is sent (a filled stop means the position
            # is going; a live one is confirmed again, nothing said but this).
            order.doubt(command.seen_at)
            order.missed_by_listing = True
            m.streamed_live.pop(command.client_order_id, None)  # the venue's read is newer than that word
            return True
        for order in self._superseded:
            if order.client_order_id == command.client_order_id and order.confirmed:
                # Replaced since the listing (a resize in the same pass): nothing looks it up now, but its
                # cancel's answer says whether it was live (`_cancel_quietly`): said lost then if it had
                # ended (r86), nothing if it was live (said at once, a glitching listing's live stops were
                # said lost: r87). Where the stops are the position's fields (Bybit), no cancel answers so:
                # said at once.
                if self._m.venue.capabilities().stops_are_orders:
                    order.missed_by_listing = True
                else:
                    self._missed_gone(order)
                return False
        return False

    def news_withdraws_cover(self) -> bool:
        """A command its task has not applied yet may end the position, or is the venue's word that a
        confirmed stop is gone."""
        return any(c.ends_position or self._withdraws_cover(c) for c in self._commands)

    def doubt_pending(self) -> bool:
        """A stop of it is in doubt, or will be once its task applies a doubt already told."""
        return any(o.unverified for o in self.watched_stops) or any(
            isinstance(c, StopsUnverified) for c in self._commands
        )

    def doubt_every_stop(self) -> None:
        """Nothing has watched this guard's stops for a while (its task died): each confirmed one is
        unverified until it is found live by its id (never sent again blind)."""
        for order in self.watched_stops:
            if order.confirmed and order.client_order_id:
                order.doubt(self._m.clock.monotonic())
        self.wake.set()

    def _stops_unverified(self, command: StopsUnverified) -> bool:
        """Stops confirmed before the stream's gap was told are asked for again (`StopsUnverified`); one
        confirmed since (its own answer, a look-up, the stream live again) stands."""
        doubted = False
        for order in self.watched_stops:
            if _doubted_by(order, command):
                order.doubt(command.noted_at)
                self._m.streamed_live.pop(order.client_order_id, None)
                doubted = True
        if doubted:
            self.wake.set()
        return doubted

    async def _converge(self) -> bool:
        if self.check_fired_soon and self.exit_evidence is None:
            self.check_fired_soon = False
            await self._check_crossed()
        if self.said_gone_at is not None and self.exit_evidence is None:
            await self._write_facts()
            return False  # uncovered; nothing sent into "no position" before the reconciler's answer
        if self.exit_evidence is not None:
            if self.venue_flat_at is not None:
                # Our stop filled and the account stream said flat: the position is over, now (applied by
                # this task, between passes).
                evidence = self.exit_evidence
                self._commands.append(
                    PositionGone(exit_reason=evidence.exit_reason, exit_price=evidence.exit_price)
                )
                return False
            await self._write_facts()
            return (
                False  # uncovered, and nothing to send for a position that is gone: the reconciler settles it
            )
        written = self._written_facts
        if (
            written is not None
            and not self.closed
            and ((written[0] and not self.has_stop_loss) or (written[1] and not self.has_trailing_stop))
        ):
            # A confirmation was withdrawn (the reconciler found the order gone): the database must stop
            # claiming it now, not after the venue round trips that re-protect it (F4).
            await self._write_facts()
        # The hard stop and the trailing protection are independent orders of this one position: they go
        # out together (two round trips from fill to covered, not three). Still one task per position.
        self._correction_rides = await self._correct_with_trailing_stop()
        steps: list[Awaitable[bool]] = []
        if not self.stop_loss.confirmed:
            steps.append(self._ensure_hard_stop())
        if self.kind is TrailingKind.NATIVE:
            if not self.trailing_stop.confirmed:
                steps.append(self._ensure_confirmed(self.trailing_stop, self._send_native_trailing))
        else:
            steps.append(self._ensure_trail())
        # Every branch finishes before the pass ends, even when one fails: a failed branch must not leave
        # its sibling running on (a managed move sending a second replacement).
        results = await asyncio.gather(*steps, return_exceptions=True)
        self._correction_rides = False
        for result in results:
            if isinstance(result, BaseException):
                raise result
        if not self.closed:
            await self._check_fired()
        if not self.closed and self._attached_correction is not None and self.stop_loss.confirmed:
            self._replace_attached_stop_loss()
        if not self.closed:
            await self._write_facts()
        if self._attached_holds is not None and self.stop_loss.confirmed:
            self._attached_holds = None  # its replacement is live: the attached stop may go now
        superseded_gone = True
        if self._superseded and self.covered and self._attached_holds is None:
            superseded_gone = await self._cancel_superseded()
        return all(results) and superseded_gone and not self.closed

    async def _ensure_hard_stop(self) -> bool:
        """The hard stop, in this pass. When the correction of the stop that rode on the entry went beside
        the trailing stop (`_correct_with_trailing_stop`) and did not get through, the attached stop is
        verified now: it is the position's hard stop until the corrected one is confirmed."""
        confirmed = await self._ensure_confirmed(self.stop_loss, self._send_stop_loss)
        held = self._attached_holds
        if not confirmed and not self.closed and held is not None and held.maybe_sent and not held.confirmed:
            # Not yet verified, or put in doubt since (found missing by a listing, a gap in the account
            # stream, a mark through it): asked for by its id, as the other stops are.
            outcome = await self._resolve(held, LOOK_UP)
            if outcome in (_Outcome.GONE, _Outcome.ABSENT) and held is self._attached_holds:
                self._fresh_id(held)  # let go: the position is without a hard stop until its correction
        return confirmed

    async def _ensure_confirmed(
        self, order: ProtectiveOrder, send: Callable[[str], Awaitable[Order]]
    ) -> bool:
        if self.closed:
            return True
        return await self._ensure(order, send) is _Outcome.CONFIRMED

    # --- one protective order ------------------------------------------------------------------------

    async def _ensure(self, order: ProtectiveOrder, send: Callable[[str], Awaitable[Order]]) -> _Outcome:
        m = self._m
        if order.client_order_id is None:
            order.client_order_id = client_order_id(
                m.token, self.position_id, order.purpose, order.generation
            )
        cid = order.client_order_id
        if order.maybe_sent:
            found = await self._resolve(
                order, LOOK_UP, unseen=order.may_send_again and order.fired_at is None
            )
            if found is _Outcome.CONFIRMED:
                self.report.restored_orders += 1
                return found
            said = order.missed_by_listing  # (cleared by `_next_generation`)
            if found is _Outcome.GONE:
                filled = order.ended_as is OrderStatus.FILLED
                fired = order.fired_at is not None  # (cleared by `_next_generation`)
                outcome = self._next_generation(order)
                if filled:
                    return outcome  # the position is probably gone: the reconciler settles it first
                # Cancelled or expired without a fill: the position is naked now; replace it at once.
                if (
                    order.ended_as is OrderStatus.CANCELED
                    and not fired
                    and self._ended_unseen(cid, order, already_said=said)
                ):
                    await self._write_facts()  # uncovered since its end on the venue (one write, then placed)
                return await self._ensure(order, send)
            if found not in (_Outcome.ABSENT, _Outcome.UNSEEN):
                return found
            # Proven absent, or not seen yet: sent with the same id. The venue takes one open order per
            # client id, so a send whose outcome was unknown is sent again at once instead of after its
            # read lag (5 s on Binance): one that never reached the venue (an HTTP 500, a lost request)
            # is placed now, one that did is refused as a duplicate. Once: then it is waited for.

        if order is self.stop_loss and not order.confirmed and order.recorded_id != cid:
            await m.liquidation_read_for(self)  # (a first hard stop, where the figure may matter)
        if order.price is not None:
            # A price restored from its record may be off the symbol's grid of today (the venue changed its
            # step; the order it holds keeps its price, and so does the guard until it sends another).
            order.price = self.onto_grid(order.price, order.purpose)
        await self._record_ahead(order, cid)
        # A replacement of the stop that rode on the entry may wait: that stop protects the position meanwhile.
        # Sent beside its trailing stop (`_ensure_hard_stop`) it takes no slot: it rides in that call.
        correction = order is self.stop_loss and self._attached_holds is not None
        # Riding in its trailing stop's call (Bybit): one call, one attempt, one failure, said by the
        # trailing stop (6 refused calls were 11 failure events, and the breaker's count doubled). It may
        # still go alone (the combined call refused, or none left in time): then its failure is its own.
        rides = correction and self._correction_rides
        probe_at = None
        if not rides:
            probe_at = await m.budget.acquire_protective(deferrable=correction)
        if m.draining:  # the manager is being replaced: its successor sends it (never taken, handed over)
            m.budget.order_answered(probe_at, room=False)
            return _Outcome.RETRY
        # Sent again after an unknown outcome (UNSEEN): the earlier send may still be on the venue whatever
        # this one's answer says, and it is the one the venue's reads show first.
        resend, earlier_send = order.maybe_sent, (order.sent_at, order.send_ticket)
        order.may_send_again = False
        if resend:
            order.sent_again = True
        else:
            order.unclear_at = None
        started = m.clock.monotonic()
        order.sent_at, order.send_ticket = started, None
        order.sent_this_run = True
        # From here until a definite answer the venue may hold it (an interrupted pass leaves it to be
        # resolved by id, and a finishing position cancels it).
        order.maybe_sent = True
        if not (
            resend or rides
        ):  # (a send again of the same order is no new attempt: it halved the error rate)
            m.protective_attempts.add(m.clock.monotonic())
        # Until the answer is applied (confirmed, refused, resolved): a stop draining for a protection
        # restart waits for that, so the next manager knows what it knew (`stop(drain=True)`).
        with m.sending():
            try:
                placed = await m.budget.sent(probe_at, self._create(order, send(cid)))
                if isinstance(placed, _Outcome):  # decided by a look-up while the answer was late
                    return self._next_generation(order) if placed is _Outcome.GONE else placed
            except (OutcomeUnknown, TimeoutError) as exc:
                shared = rides and self._rode_in_call(cid)
                if not (resend or shared):  # (the same attempt's: counted once)
                    if rides:  # it went alone after all: an attempt of its own
                        m.protective_attempts.add(m.clock.monotonic())
                    m.protective_failures.add(m.clock.monotonic())
                latency = m.clock.monotonic() - started
                order.maybe_sent = True
                # Sent again with the same id once; then waited for (looked up until its read lag proves
                # it absent) — unless the venue's request budget is half spent: then sent again at the
                # retry cadence with no look-up between (a duplicate is refused if the venue holds it).
                # Looked up four times a cycle, 60 stops refused for minutes spent a minute's weight in
                # 20 s, and nothing could be sent for 40 s: naked 25 s after the venue took stops again.
                if not resend or order.unclear_since is None:
                    order.unclear_since = m.clock.monotonic()
                order.may_send_again = not resend or self._resend_unlooked(order, m.clock.monotonic())
                order.unclear_at = m.clock.monotonic()
                await m.store.set_order_status(
                    cid, OrderRecordStatus.UNKNOWN, error=_short(exc) or "no answer"
                )
                outcome = await self._resolve(order, "resolve", unseen=order.may_send_again)
                if outcome is _Outcome.UNSEEN and not resend:
                    self.retry_at = m.clock.monotonic()  # sent again by the next pass, at once
                # resolved: it was placed after all; retrying: absent (resent with the same id) or still unknown
                self._create_failed(
                    order, cid, exc, latency, resolved=outcome is _Outcome.CONFIRMED, rode=shared
                )
                if outcome is _Outcome.GONE:
                    return self._next_generation(order)
                if outcome is not _Outcome.CONFIRMED:
                    return _Outcome.RETRY
                return outcome
            except asyncio.CancelledError:
                # Interrupted before its answer (a protection restart's drain, an urgent command): the
                # answer is cut off by our own hand, as unclear as a lost one.
                order.may_send_again = not resend
                order.unclear_at = m.clock.monotonic()
                raise
            except DuplicateClientOrderId:
                order.maybe_sent = True
                if resend:
                    order.sent_at, order.send_ticket = earlier_send
                outcome = await self._resolve(order, "resolve duplicate")
                if outcome is _Outcome.GONE:
                    return self._next_generation(order)
                return _Outcome.RETRY if outcome is _Outcome.ABSENT else outcome
            except WouldTriggerImmediately as exc:
                if resend and not (
                    order.purpose is OrderPurpose.TRAILING_STOP and self.kind is TrailingKind.NATIVE
                ):
                    # The mark is through the stop (the hard stop, a managed trail's) whether or not the first
                    # send is on the venue (if it is, it fires): the position is closed now, not after the
                    # lag. The first send stays the order's (cancelled with the position if it is live). A
                    # native trail is re-armed under a new id: that waits for the first send's fate.
                    order.sent_at, order.send_ticket = earlier_send
                    return await self._breached(order)
                if resend:
                    return self._resend_refused(order, cid, exc, m.clock.monotonic() - started, earlier_send)
                order.maybe_sent = False
                await m.store.set_order_status(cid, OrderRecordStatus.REJECTED, error=_short(exc))
                return await self._breached(order)
            except (RateLimited, Banned, Retryable, Rejected) as exc:
                if resend:
                    return self._resend_refused(order, cid, exc, m.clock.monotonic() - started, earlier_send)
                order.maybe_sent = False  # the venue said it did not execute it
                if isinstance(exc, Rejected) and exc.code == RejectCode.REDUCE_ONLY_REJECTED:
                    await self._refused(order, cid, exc)
                    return self._refused_as_gone(order, exc)
                shared = rides and self._rode_in_call(cid)
                if rides and not shared:  # it went alone after all: an attempt of its own
                    m.protective_attempts.add(m.clock.monotonic())
                if not isinstance(exc, RateLimited | Banned | ClockRefused) and not shared:
                    m.protective_failures.add(m.clock.monotonic())
                # A rate-limit answer is the venue's pacing ("not now, at T"), not a failing protection path:
                # it is retried at T and, should it leave the position naked, the breaker's uncovered and
                # coverage rules see that. Counting it here paused entries on a one-second burst. So is a
                # refused timestamp, the venue's word on our clock: sent again once the adapter has read the
                # venue's time (`_refused`); eight hard stops refused for 2 s paused entries (18 of 34).
                latency = m.clock.monotonic() - started
                await self._refused(order, cid, exc)
                self._create_failed(order, cid, exc, latency, resolved=False, rode=shared)
                return _Outcome.RETRY
            if rides and not self._rode_in_call(cid):  # it went alone after all: an attempt of its own
                m.protective_attempts.add(m.clock.monotonic())
            return await self._accept(order, placed, m.clock.monotonic() - started)

    def _rode_in_call(self, cid: str) -> bool:
        """The venue sent this order in another order's call (Bybit's hard stop in its trailing stop's)."""
        rode = getattr(self._m.venue, "rode_in_call", None)
        return bool(rode is not None and rode(cid))

    def _resend_refused(
        self,
        order: ProtectiveOrder,
        cid: str,
        exc: ExchangeError,
        latency: float,
        earlier_send: tuple[float | None, CallTicket | None],
    ) -> _Outcome:
        """A send again (UNSEEN) was refused: that says nothing of the earlier send, which may be on the venue
        all the same. The order keeps its id, its record and its earlier send's time (the venue's reads
        show that one first) and is resolved by that id. "Nothing to reduce" (-2022: the first send filled,
        or the position went) is the venue's word on the position, asked about as any; a rate limit's
        hold is kept."""
        m = self._m
        order.sent_at, order.send_ticket = earlier_send
        if isinstance(exc, Rejected) and exc.code == RejectCode.REDUCE_ONLY_REJECTED:
            return self._refused_as_gone(order, exc)
        if isinstance(exc, RateLimited | Banned):
            self.retry_at = m.clock.monotonic() + m.hold_orders_for(exc)
        # (Not counted toward the breaker: the attempt's unclear answer was.)
        self._create_failed(order, cid, exc, latency, resolved=False)
        return _Outcome.RETRY

    def _refused_as_gone(self, order: ProtectiveOrder, exc: Rejected) -> _Outcome:
        """The venue refused a stop for reducing nothing (-2022): it holds no position this stop closes.
        That is the venue's word on the position, not a failing protection path: counted as a failure, a
        position closed during a protection restart (the close's answer lost with the old manager, Bybit's
        stops deactivated with the position) had its guard send stops into that refusal until the breaker
        paused entries. No stop is sent until the reconciler has asked the venue: flat (and this word
        with it) closes the position; held protects it again. Uncovered meanwhile, as it must be."""
        m = self._m
        if self.said_gone_at is None:
            log.warning(
                "%s: the venue refused the %s: %s; asking the venue whether the position is gone",
                self.symbol,
                stop_words(order.purpose),
                _short(exc),
            )
        self._said_gone(m.clock.monotonic())
        return _Outcome.RETRY

    def _said_gone(self, at: float) -> None:
        """The venue's word that the position is gone (monotonic `at`): nothing is sent for it until the
        reconciler has asked the venue (`said_gone_at`)."""
        self.said_gone_at = at
        self._m.request_reconcile()
        self.wake.set()

    def onto_grid(self, price: Decimal, purpose: OrderPurpose) -> Decimal:
        """A price to send, on the symbol's tick grid of today: a venue changes a symbol's price step (the
        orders it holds keep theirs), and a recorded price off the new grid was refused on every send.
        Rounded the protective way: a stop (the hard stop, a managed trail's) nearer the mark, a native
        trail's activation nearer the entry."""
        if self.market.is_on_tick(price):
            return price
        stop = purpose is OrderPurpose.STOP_LOSS or self.kind is TrailingKind.MANAGED
        up = stop == (self.side is PositionSide.LONG)
        return self.market.round_price(price, ROUND_UP if up else ROUND_DOWN)

    async def _record_ahead(self, order: ProtectiveOrder, cid: str) -> None:
        """Written ahead once per id: the id is the idempotency key."""
        if order.recorded_id == cid:
            return
        m = self._m
        native_trailing = order.purpose is OrderPurpose.TRAILING_STOP and self.kind is TrailingKind.NATIVE
        await m.store.record_order(
            client_order_id=cid,
            position_id=self.position_id,
            purpose=order.purpose,
            side=self.closing_side.value,
            type="trailing_stop_market" if native_trailing else "stop_market",
            quantity=self.quantity,
            trigger_price=None if native_trailing else order.price,
            activation_price=order.price if native_trailing and not order.arm_now else None,
            callback_percent=self.callback_percent if native_trailing else None,
        )
        order.recorded_id = cid

    async def _create(self, order: ProtectiveOrder, create: Awaitable[Order]) -> Order | _Outcome:
        """The create call, and meanwhile, once its answer is late, look-ups of the order by its client id.

        An answer can be lost after the venue executed the request; waiting out the call budget (10 s)
        then kept a position that was protected on the venue "uncovered" in the engine's eyes for that
        long: a false alarm, and the breaker counting it. The order is visible by its id one read-after-
        write lag after the venue took it, so from then on it is looked for, every retry step, while the
        call goes on. A look-up that finds it decides (live, fired or ended: the late answer would say
        no more); one that does not find it changes nothing (a slow venue may still be working on the
        request, which is never given up for it): the call goes on to its answer or its budget, as
        before. The look-up waits for the request to have left: time queued for budget does not count."""
        m = self._m
        ticket = order.send_ticket = CallTicket(Lane.PROTECTIVE)
        call = asyncio.ensure_future(m.call(create, "create_order", ticket=ticket))
        look_after = max(m.read_after_write_seconds, m.late_answer_seconds())
        started = m.clock.monotonic()
        handed_off = False
        try:
            while True:
                late = await _until_late(m.clock, call, ticket, look_after, order.heard_live)
                if call.done():
                    break
                if not late and order.client_order_id not in m.streamed_live:
                    order.heard_live.clear()  # (an earlier word, since ended)
                    continue
                look_up = asyncio.ensure_future(
                    self._resolve(order, "late answer: look up", absent_means_send=False)
                )
                try:
                    await first_of(asyncio.shield(call), asyncio.shield(look_up))
                finally:
                    await end_all(look_up)  # the answer came first: it decides, the look-up ends
                if look_up.cancelled():
                    continue
                outcome = look_up.result()
                if outcome in (_Outcome.CONFIRMED, _Outcome.GONE, _Outcome.FIRED):
                    # Settled by the venue itself. Not a failure: a slow answer is still on its way, and
                    # the call goes on in the background to its answer or its budget, measured as any call
                    # (a lost answer shows there as the timeout it is).
                    log.info(
                        "%s: %s %s %s %.1fs after it was sent, before its answer came",
                        self.symbol,
                        stop_words(order.purpose),
                        order.client_order_id,
                        _LATE_ANSWER_WORDS[outcome],
                        m.clock.monotonic() - started - ticket.waited,
                    )
                    m.let_finish(call)
                    handed_off = True
                    if outcome is _Outcome.CONFIRMED:
                        self.report.created_orders += 1
                    return outcome
                # Not visible yet (read lag), not there yet (a slow venue still working on the request:
                # the request is not given up, it may land), or the look-up failed: look again later.
                order.maybe_sent = True
                look_after = m.config.retry_initial_seconds
            return call.result()
        finally:
            if not handed_off and not call.done():
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)

    async def _resolve(
        self, order: ProtectiveOrder, why: str, *, absent_means_send: bool = True, unseen: bool = False
    ) -> _Outcome:
        """Ask the venue for this id: CONFIRMED (live), GONE (ended), ABSENT (never arrived), RETRY (unknown).
        `absent_means_send=False`: the request is still in flight, so "absent" is said quietly. `unseen`:
        "not found" within the venue's read lag is UNSEEN (the caller sends the same id again), not RETRY."""
        m = self._m
        cid = order.client_order_id
        assert cid is not None
        asked_at = m.clock.monotonic()
        try:
            # The account stream's word that it is live spares the look-up, and needs no read lag waited out
            # (an answer lost after the venue placed the stop kept the position uncovered for that lag).
            told = m.streamed_live.get(cid) or m.listed_since(cid, order.doubted_at)
            proof_at = self._absence_provable_at(order, asked_at)
            if (
                told is None
                and unseen
                and proof_at is not None
                and asked_at < proof_at
                and self._resend_unlooked(order, asked_at)
            ):
                # Within the read lag "not found" proves nothing, and the same id sent again is refused if
                # the venue holds it: with the request budget half spent, the look-up is spared (30 naked
                # positions' look-ups spent a minute's weight in 20 s, and nothing went out for 35 s).
                log.info(
                    "%s: %s %s sent again with the same id without a look-up (within the venue's read lag, "
                    "with its request budget %.0f%% used)",
                    self.symbol,
                    stop_words(order.purpose),
                    cid,
                    m.requests_used() * 100,
                )
                return _Outcome.UNSEEN
            found = told or await m.read(lambda: m.venue.fetch_order(self.symbol, cid), "fetch_order")
        except NotFound:
            # Judged by when the look left (its answer may come after the window's end, and prove nothing).
            proof_at = self._absence_provable_at(order, asked_at)
            if proof_at is not None and asked_at < proof_at and unseen:
                log.info(
                    "%s: %s %s not visible yet (the venue's reads lag its writes by up to %gs); sending it "
                    "again with the same id (the venue refuses a duplicate of an open order)",
                    self.symbol,
                    stop_words(order.purpose),
                    cid,
                    m.read_after_write_seconds,
                )
                return _Outcome.UNSEEN
            if proof_at is not None and asked_at < proof_at:
                # The venue may not show an order it accepted moments ago (read-after-write lag): "not
                # found" proves nothing yet. Still unconfirmed (so uncovered), asked again. Waiting out a documented lag is not a failure: said as information (an
                # ERROR per look was noise that hid the real failures).
                # Within the window the order may show at any moment: asked again at the first retry
                # step, and no later than the window's end (then "not found" proves it absent). With the
                # venue's request budget half spent, only at the window's end: 30 positions refused for
                # minutes spent a minute's weight in 20 s on such look-ups, and nothing could be sent for
                # the next 40 s (a reviewer: naked 25 s after the venue took stops again).
                left = max(0.0, proof_at - m.clock.monotonic())
                pressed = m.requests_used() >= LOOK_UPS_SPARSE_FROM_BUDGET_USED
                wait = left if pressed else min(m.config.retry_initial_seconds, left)
                log.info(
                    "%s: %s %s not visible yet (the venue's reads lag its writes by up to %gs); "
                    "asking again in %.1fs",
                    self.symbol,
                    stop_words(order.purpose),
                    cid,
                    m.read_after_write_seconds,
                    wait,
                )
                self.retry_at = m.clock.monotonic() + wait
                self._waiting_out_lag = True
                return _Outcome.RETRY
            order.maybe_sent = False  # proven absent: the same id may be sent
            order.doubted_id = None  # (missing, not unverified: the venue said so)
            if order.missed_by_listing or cid in m.placed_ids:
                # The venue had it live (it answered it placed, listed it, or a listing of ours missed it
                # once confirmed), and past its read lag it does not know the id: it was removed, or ended
                # and forgotten (Binance forgets a cancelled order with no fill). Said lost once, whichever
                # manager finds it: a protection restart while a listing's miss was being looked up sent
                # it again with a WARNING only (r87), and saying every unsettled miss as the old guard
                # stopped said live stops lost (r88).
                order.missed_by_listing = True
                self._missed_gone(order)
            if not absent_means_send:
                return _Outcome.ABSENT
            log.warning(
                "%s %s for %s: order %s is not on the exchange; sending it",
                why,
                stop_words(order.purpose),
                self.symbol,
                cid,
            )
            return _Outcome.ABSENT
        except (ExchangeError, TimeoutError) as exc:
            if isinstance(exc, RateLimited | Banned):
                # The venue said when it answers again: asked then, not on our backoff clock (a look-up
                # that met a 2 s ban waited 8 s in an emulator soak, its position without a hard stop).
                self.retry_at = m.clock.monotonic() + refusal_seconds(exc, m.clock)
            self._note_failure(f"{why} {stop_words(order.purpose)}", f"outcome still unknown: {_short(exc)}")
            return _Outcome.RETRY
        if found.status is OrderStatus.NEW:
            # `maybe_sent` stays set until `_accept` has marked it confirmed: a pass interrupted in
            # between (an operator's close) must still find it to cancel.
            return await self._accept(order, found, None)
        if found.status is OrderStatus.TRIGGERED:
            return self._fired(order, found.updated_at)
        order.maybe_sent = False
        order.ended_as = found.status
        order.ended_id = cid
        # (an order's last update is its end; one that was never updated after its creation says nothing)
        order.ended_at = found.updated_at if found.updated_at > found.created_at else None
        if found.status is OrderStatus.FILLED:
            self.exit_evidence = ExitEvidence(
                "trailing_stop" if order.purpose is OrderPurpose.TRAILING_STOP else "stop_loss",
                found.average_price,
                cid,
                m.clock.monotonic(),
            )
        # A fill found here is what the next manager needs to close the position with its price: recorded
        # even if a protection restart cancels this guard meanwhile (cancelled mid-write, the next manager
        # sent the filled stop's kind again, was refused, and recorded the position `closed_on_exchange`
        # without its PnL: a clean-clone CI and 1 run in 15 here under load).
        await m.record_surely(
            m.store.set_order_status(
                cid, record_status_of(found.status), exchange_order_id=found.venue_order_id
            )
        )
        return _Outcome.GONE

    def _resend_unlooked(self, order: ProtectiveOrder, now: float) -> bool:
        """Whether an order of unclear outcome is sent again with its id without a look-up first: while the
        venue's request budget is half spent, and only within one read lag of its first unclear answer
        (then it is looked up: a venue that took it shows it by then)."""
        m = self._m
        since = order.unclear_since
        return (
            m.requests_used() >= LOOK_UPS_SPARSE_FROM_BUDGET_USED
            and since is not None
            and now < since + m.read_after_write_seconds + READ_LAG_MARGIN_SECONDS
        )

    def _absence_provable_at(self, order: ProtectiveOrder, now: float) -> float | None:
        """From when "no such order" proves `order` absent (monotonic; None: at once, a venue without a read
        lag or an order with no known send): the absence window after its send left, and never before a
        read lag after its last unclear answer (it may have reached the venue just before that answer)."""
        m = self._m
        left_at = order.left_at(now)
        if m.read_after_write_seconds <= 0 or left_at is None:
            return None
        at = left_at + m.absence_window()
        if order.unclear_at is not None:
            at = max(at, order.unclear_at + m.read_after_write_seconds + READ_LAG_MARGIN_SECONDS)
        return at

    def _ended_unseen(self, cid: str, order: ProtectiveOrder, *, already_said: bool = False) -> bool:
        """A stop of ours found cancelled on the venue by its look-up (by hand), its end unseen when it came
        (the stream missed it, or no engine ran): protection lost, said as the stream's word on it is. Not
        one that fired (it may end expired, part-filled), nor one that expired; not where the venue ends a
        position's stops with it (Bybit: the position may be gone, which the reconciler settles), nor after
        a fill of its sibling, our own close, or the stream's word that the position is flat. Not said again
        when the reconciler said it (`already_said`: a listing left it out); its time uncovered is set all
        the same."""
        m = self._m
        status = order.ended_as
        if (
            status is None
            or self.exit_evidence is not None  # its sibling filled: the venue may end this one with it
            or self.close_sent
            or self.venue_flat_at is not None
            or not m.venue.capabilities().stops_are_orders
        ):
            return False
        timed = self._uncovered_since_its_end(order)
        if not already_said:
            self._ended_by_someone(cid, order.purpose, status, "found by its id")
        return timed

    def _uncovered_since_its_end(self, order: ProtectiveOrder) -> bool:
        """A stop found ended after the fact (a listing missed it, the account stream was down): the
        position has been uncovered since the venue ended it, not since we found out. The shift report and
        the grace period said 0.024 s where the venue had lacked the stop 10.26 s (an operator on the
        Binance-wire emulator, the stream dropped). Never before we last confirmed the stop, nor in the
        future (the venue's clock against ours). True when that moved the spell's start: the caller writes
        it before the stop is placed again (the record's open span then starts earlier too; written after,
        the placement's "covered" would have ended the span as first found)."""
        m = self._m
        if order.ended_at is None:
            return False  # its end's time unknown
        now = m.clock.monotonic()
        since = max(order.confirmed_at, monotonic_of(m.clock, order.ended_at))
        if since >= now or (self.unprotected_since is not None and self.unprotected_since <= since):
            return False  # (uncovered since earlier already: a listing that missed it said so)
        self.unprotected_since = since
        self.unprotected_since_epoch = m.clock.now() - (now - since)
        self._loss_found_at = now
        return True

    def _missed_gone(self, order: ProtectiveOrder) -> None:
        """A stop a listing of open orders left out (`missed_by_listing`) is let go without being found live:
        said as protection lost now, once, unless the venue says it filled, or its position is ending (its
        sibling filled, our own close, the stream's word that it is flat: the venue ends a position's stops
        with it), or that it expired (the venue's own end). Found cancelled by its id (or by our cancel's
        answer, `_cancel_quietly`): said as such. Else (proven absent by its id, or given up before its
        look-up answered: a Bybit stop that rode on the entry) in the reconciler's words of before: nothing
        proves it is still there."""
        order.missed_by_listing = False
        cid = order.client_order_id
        if cid is None:
            return
        ended = order.ended_as if order.ended_id == cid else None
        if (
            # (expired: the venue's own end, a fired stop's part fill among them: nobody's hand, as in
            # `_ended_unseen`; a fired stop that part-filled was said "no longer on the exchange": r87)
            ended in (OrderStatus.FILLED, OrderStatus.EXPIRED)
            or self.exit_evidence is not None
            or self.close_sent
            or self.venue_flat_at is not None
        ):
            return
        if ended is not None:
            self._ended_by_someone(cid, order.purpose, ended, "found by its id after a listing left it out")
            return
        what = stop_words(order.purpose)
        log.error(
            "%s: %s %s is no longer on the exchange (a listing of open orders left it out, and the venue did "
            "not show it live since); re-protecting",
            self.symbol,
            what,
            cid,
        )
        self._m.protection_lost(
            self.symbol,
            self.position_id,
            what,
            f"{cid} is no longer on the exchange",
            f"{self.symbol}: {what} {cid} is no longer on the exchange (triggered, cancelled or expired); "
            "re-protecting",
        )

    def _ended_by_someone(self, cid: str, purpose: OrderPurpose, status: OrderStatus, told_by: str) -> None:
        """One of our stops ended on the venue by someone else's hand: protection lost (the log's ERROR, the
        event, the alert), however it was learned (`told_by`). Where the stops are the position's own fields
        (Bybit), "cancelled" is how the adapter tells that the field no longer holds our value: someone set
        another (the adapter's WARNING names both) or cleared it; said so, not "canceled" (opme50)."""
        what = stop_words(purpose)
        if self._m.venue.capabilities().stops_are_orders:
            ended = f"was {status.value} on the venue"
        else:
            ended = "no longer holds our value on the venue's position (changed or cleared)"
        # A position being closed at market gets no new stop: the close goes (one held waiting for room goes
        # at once, `_close_turn`). "Re-placing it now" was said there, and nothing was placed (r93).
        then = "the close at market goes" if self.closing else "re-placing it now"
        log.error("%s: %s %s %s, not by us (%s); %s", self.symbol, what, cid, ended, told_by, then)
        self._m.protection_lost(
            self.symbol,
            self.position_id,
            what,
            f"{cid} {ended.removeprefix('was ')}, not by us",
            f"{self.symbol}: {what} {cid} {ended.removeprefix('was ')}, not by us; "
            + ("the close at market goes" if self.closing else "re-placing"),
        )

    def _next_generation(self, order: ProtectiveOrder) -> _Outcome:
        """The order with the current id ended (cancelled by someone, expired, or filled): the next pass
        uses a new id. A filled stop means the position is probably gone; the reconciler settles that."""
        self._fresh_id(order)
        order.confirmed = False
        self._m.request_reconcile()
        return _Outcome.RETRY

    def _fired(self, order: ProtectiveOrder, venue_fired_at: float) -> _Outcome:
        """The stop fired and has not finished: the position should be closing. It is uncovered until the
        venue says how it ended; past the grace period `_check_fired` acts on it. Its patience counts from
        when the venue says it fired (`venue_fired_at`, epoch seconds; 0: unknown), not from when we saw
        it: a guard that finds it after a protection restart (or a ban) does not wait out a second
        patience before closing at market."""
        m = self._m
        order.confirmed = False
        order.maybe_sent = True  # ask again: it ends FILLED (position gone) or not at all
        order.missed_by_listing = False  # (it fired: why a listing left it out, nobody's hand)
        if order.fired_at is None:
            # At least one round trip from now all the same: a venue clock ahead of ours must not make a
            # stop that fired a moment ago "stuck" at first sight (its close would race its own fill).
            patience = m.stuck_trigger_patience()
            least = max(m.order_round_trip_seconds, STUCK_CHECK_MIN_SECONDS)
            age = m.clock.now() - venue_fired_at if venue_fired_at > 0 else 0.0
            order.fired_at = m.clock.monotonic() - min(max(age, 0.0), max(0.0, patience - least))
            self._arm_stuck_check()
            log.warning(
                "%s: %s %s fired and is still working its way to a fill (TRIGGERING); the position is uncovered "
                "until the venue says how it ended",
                self.symbol,
                stop_words(order.purpose),
                order.client_order_id,
            )
            m.request_reconcile()
        return _Outcome.FIRED

    async def _check_crossed(self) -> None:
        """The mark went through a stop of ours: look both up (in parallel). A fill is exit evidence and
        the reconciler closes the position at once (cancelling the sibling); TRIGGERING leaves it uncovered.
        A stop the mark went through has most likely fired, and a fired stop protects nothing: it is not
        counted until the venue says it is still live (an operator watched a position the venue had closed
        shown "both stops confirmed" for the 9.5 minutes of a ban that refused every look-up). Asked for by
        its id before anything is sent: never a second stop."""
        crossed, self._crossed = self._crossed, set()
        for order in self.watched_stops:
            if order.purpose in crossed and order.confirmed and order.client_order_id:
                order.doubt(self._m.clock.monotonic())
        asked = [
            o
            for o in self.watched_stops
            if o.client_order_id and (o.confirmed or (o.purpose in crossed and o.maybe_sent))
        ]
        outcomes = await asyncio.gather(*(self._resolve(o, "check after the mark crossed") for o in asked))
        timed = False
        for order, outcome in zip(asked, outcomes, strict=True):
            if outcome is _Outcome.GONE:
                cid, fired = order.client_order_id, order.fired_at is not None
                cancelled = order.ended_as is OrderStatus.CANCELED
                if cid and cancelled and not fired:
                    # Cancelled by someone (said as elsewhere), the sibling or the stop the mark went through
                    # alike: a stop that fired ends filled or expired, never cancelled. Taken for a fire, a
                    # stop cancelled by hand and then wicked through was said nowhere (r87). Said once:
                    # by `_missed_gone` (in `_fresh_id`) if a listing left it out.
                    timed = self._ended_unseen(cid, order, already_said=order.missed_by_listing) or timed
                elif order.purpose in crossed:
                    # The mark went through it and it ended filled or expired (it may have fired and expired,
                    # a thin book): a listing's miss of it is no one's hand (`_missed_gone`).
                    order.missed_by_listing = False
                self._fresh_id(order)
            elif outcome is _Outcome.ABSENT:
                order.confirmed = False  # proven not on the venue: this pass sends it again (the same id)
        if timed:
            await self._write_facts()
        if self.exit_evidence is not None or _Outcome.FIRED in outcomes:
            self._m.request_reconcile()

    def _arm_stuck_check(self) -> None:
        """When a fired stop's patience ends, its check interrupts whatever the guard is doing."""
        if self._stuck_timer is not None and not self._stuck_timer.done():
            return
        patience = self._m.stuck_trigger_patience()
        fired = [o.fired_at for o in self.watched_stops if o.fired_at is not None]
        if fired:  # from the first one's firing (the venue's time when it said it)
            patience = max(0.0, min(fired) + patience - self._m.clock.monotonic())

        async def at_patience_end() -> None:
            await self._m.clock.sleep(patience)
            if any(o.fired_at is not None for o in self.watched_stops):
                self.submit(StuckTriggerCheck())

        self._stuck_timer = asyncio.ensure_future(at_patience_end())
        self._stuck_timer.set_name(f"stuck-check-{self.symbol}-{self.position_id}")

    async def _check_fired(self) -> None:
        """A stop that fired but has not filled within its patience (`stuck_trigger_patience`) while the
        position is still open (seen on Binance: TRIGGERING that never finishes): close the position
        reduce-only at market, which is what the stop was doing — within grace of the trigger, the
        close's own round trip included."""
        m = self._m
        patience = m.stuck_trigger_patience()
        stuck = [
            o
            for o in self.watched_stops
            if o.fired_at is not None and m.clock.monotonic() - o.fired_at >= patience - 1e-6
        ]
        if self.closed:
            return
        if not stuck:  # patience grew with the round trip since the check was armed: check again later
            if any(o.fired_at is not None for o in self.watched_stops):
                self._arm_stuck_check()
            return
        # A late answer, and at most half of what is left of the grace period, bounds the look-ups (a read
        # whose answer never came waited its whole call timeout); the rest is the close's. Without an answer
        # the stop is taken as still fired, and the close is reduce-only, so a position already flat
        # refuses it and nothing is over-closed.
        left = max(
            min((m.config.grace_seconds - patience) / 2, m.late_answer_seconds()), STUCK_CHECK_MIN_SECONDS
        )
        asked_at = m.clock.monotonic()
        look_ups = asyncio.ensure_future(
            asyncio.gather(
                asyncio.gather(*(self._resolve(order, "re-check fired") for order in stuck)),
                m.read(lambda: m.venue.fetch_positions(self.symbol), "fetch_positions"),
                return_exceptions=True,
            )
        )
        answered = False
        try:
            await first_of(asyncio.shield(look_ups), m.clock.sleep(left))
            answered = look_ups.done()
        finally:
            # No answer in time, or the check itself was cancelled (the manager stopping): the look-ups
            # end with it, they change nothing afterwards.
            await end_all(look_ups)
        if answered:
            outcomes, positions = look_ups.result()
        else:
            outcomes, positions = None, None
            log.warning(
                "%s: no answer about the fired stop or the position within %.1fs; closing anyway (reduce-only)",
                self.symbol,
                left,
            )
        if isinstance(outcomes, BaseException) and not isinstance(outcomes, ExchangeError | TimeoutError):
            raise outcomes
        if isinstance(positions, BaseException) and not isinstance(positions, ExchangeError | TimeoutError):
            raise positions
        read = isinstance(positions, list)
        held = None
        if isinstance(positions, list):
            held = next((p for p in positions if p.symbol == self.symbol and p.side is self.side), None)
        gone = read and held is None  # the venue says flat: the reconciler settles it, nothing is sent
        fired_at = min(o.fired_at or asked_at for o in stuck)
        if isinstance(outcomes, list):
            still = []
            for order, outcome in zip(stuck, outcomes, strict=True):
                if outcome in (_Outcome.FIRED, _Outcome.RETRY):  # a failed look-up proves nothing
                    still.append(order)
                elif outcome is _Outcome.GONE:
                    # It ended (a fill, or part of one with the rest expired): its id is spent, the next stop
                    # is a new order. Said unless the venue says the position is gone (its sibling filled).
                    if order.ended_as is not OrderStatus.FILLED and not gone:
                        log.warning(
                            "%s: fired %s %s ended %s on the venue with the position %s; a new one goes out",
                            self.symbol,
                            stop_words(order.purpose),
                            order.client_order_id,
                            order.ended_as.value if order.ended_as else "",
                            f"holding {held.quantity}" if held is not None else "not read (still held?)",
                        )
                    self._next_generation(order)
                else:  # it never reached the venue after all: the same id may be sent
                    order.fired_at = None
            if self.exit_evidence is not None:
                # A stop of ours filled (found in this check): the position is going; the reconciler closes
                # it. Closed at market on top of that, a flat position refused it, with a false ERROR.
                m.request_reconcile()
                return
            if held is not None and held.quantity != self.quantity:
                # Part of it executed: the new stops are for what is left (not the old size, and then a
                # resize). Read at the look-ups' start.
                await self._quantity_changed(QuantityChanged(quantity=held.quantity, seen_at=asked_at))
            if not still:
                if gone:
                    self._said_gone(asked_at)  # no new stop into no position before the reconciler's word
                return
            stuck = still
        if gone:
            self._said_gone(asked_at)
            return
        said = {o.client_order_id for o in stuck} <= m.stuck_said
        log.log(
            logging.INFO if said else logging.ERROR,
            "%s: %s fired %.1fs ago and has not filled while the position is still open; closing reduce-only "
            "at market%s",
            self.symbol,
            ", ".join(stop_words(o.purpose) for o in stuck),
            m.clock.monotonic() - fired_at,
            " (again: the last close did not get through)" if said else "",
        )
        if not said:
            # Once per stuck stop: a close the venue held back (a 429) was decided again by the next pass,
            # a second ERROR and event for the same stop within 0.2 s (a sim soak). Marked said once its
            # event is written (a pass interrupted during the write says it again, with the event).
            await m.store.record_event(
                Severity.ERROR,
                "stop_stuck_triggering",
                f"{self.symbol}: a fired stop did not fill within {patience:g}s; closing at market",
                symbol=self.symbol,
                position_id=self.position_id,
            )
            m.stuck_said.update(o.client_order_id for o in stuck if o.client_order_id)
        self.submit(ClosePosition(exit_reason="stop_not_filled"))

    def correct_attached_stop_loss(self, from_fill: Decimal) -> None:
        """The hard stop rode on the entry, priced from the mark before the fill. More than a tick from
        the price the fill gives, it is replaced by a stop at that price once it is confirmed."""
        attached = self.stop_loss
        self._entry_carried = attached.client_order_id  # sent by this run, on its entry
        if attached.price is not None and abs(attached.price - from_fill) > self.market.tick_size:
            self._attached_correction = from_fill

    async def _correct_with_trailing_stop(self) -> bool:
        """A pass that sends the native trailing stop of a position whose attached hard stop needs
        correcting (its first, or a retry of both), on a venue whose entry carries the stop (Bybit):
        trading-stop takes stopLoss and trailingStop together, so the correction goes in this pass, beside
        the trailing stop, and rides in its call instead of being a second call after it. Written ahead
        here, so its send reaches the venue first and waits there for the trailing stop's. The attached
        stop stays the hard stop until the corrected one is confirmed (unverified until then, as it was
        before its verification)."""
        if (
            self.closed
            or self.kind is not TrailingKind.NATIVE
            or self.trailing_stop.confirmed
            or self.trailing_stop.maybe_sent
            or not self._m.venue.capabilities().attach_stop_to_entry
        ):
            return False
        attached = self.stop_loss
        if (
            self._attached_correction is not None
            and self._attached_holds is None
            and attached.client_order_id is not None
            and (attached.confirmed or attached.maybe_sent)
        ):
            self._replace_attached_stop_loss()
        elif self._attached_holds is None or attached.confirmed or attached.maybe_sent:
            return False  # no correction to send now
        if attached.client_order_id is None:
            attached.client_order_id = client_order_id(
                self._m.token, self.position_id, attached.purpose, attached.generation
            )
        await self._record_ahead(attached, attached.client_order_id)
        return True

    def _replace_attached_stop_loss(self) -> None:
        """The confirmed attached stop goes to the superseded list, still counted as the hard stop until
        its replacement is confirmed (it covers the whole position meanwhile: no false alarm), and is
        cancelled after, as a resized-away stop is."""
        attached = self.stop_loss
        assert self._attached_correction is not None
        held = ProtectiveOrder(
            attached.purpose,
            generation=attached.generation,
            client_order_id=attached.client_order_id,
            confirmed=attached.confirmed,  # not yet verified: verified if its replacement fails
            maybe_sent=True,
        )
        held.price = attached.price  # what the venue holds until the replacement is confirmed
        self._superseded.append(held)
        self._attached_holds = held
        self._fresh_id(attached)
        attached.maybe_sent = False
        attached.price, self._attached_correction = self._attached_correction, None
        self.wake.set()  # the replacement goes out in the next pass, at once

    def _fresh_id(self, order: ProtectiveOrder) -> None:
        """The next id for `order` (a managed trail's stops share one sequence with its moves). A native
        trail the venue had armed (a mark reached its activation) is sent again armed at the mark: sent
        with its activation again after the price had pulled back (a resize, a re-placement), the venue
        took it unarmed, and the position kept only its hard stop where it had trailed. The entry's hard
        stop held while its correction goes (`_attached_holds`) gets no new id: ended, it is let go, and the
        correction, sent until confirmed, is the hard stop to come (its id stays among the superseded, to
        be cancelled if it is still live after all). A stop a listing left out that leaves unsettled is said
        lost here (`_missed_gone`)."""
        if order.missed_by_listing:
            self._missed_gone(order)
        if order is self._attached_holds:
            order.confirmed = False
            self._attached_holds = None
            self.wake.set()
            return
        if order is self.trailing_stop and self._native_armed(order):
            order.arm_now = True
        if order.purpose is OrderPurpose.TRAILING_STOP and self.kind is TrailingKind.MANAGED:
            order.generation = self._next_trail_generation
            self._next_trail_generation += 1
        else:
            order.generation = max(order.generation + 1, self._unused_generation.get(order.purpose, 0))
        order.client_order_id = None
        order.sent_again = False
        order.fired_at = None
        order.confirmed = False
        order.may_send_again = False
        order.unclear_at = None
        order.missed_by_listing = False

    def skip_used_ids(self, client_order_ids: Iterable[str]) -> None:
        """This position's earlier ids (its ended orders, an earlier engine's) are never sent again: a
        restored guard numbered from its live orders only, so a stop that filled just before a protection
        restart had its id sent again by the new guard, refused, and the fill's record overwritten
        `rejected` (the position then recorded `closed_on_exchange` without its PnL). One id, one order."""
        for cid in client_order_ids:
            key = parse_client_order_id(cid, self._m.token)
            if key is None or key.position_id != self.position_id:
                continue
            if key.purpose is OrderPurpose.TRAILING_STOP:
                self._next_trail_generation = max(self._next_trail_generation, key.generation + 1)
            unused = max(self._unused_generation.get(key.purpose, 0), key.generation + 1)
            self._unused_generation[key.purpose] = unused
        for order in (self.stop_loss, self.trailing_stop):
            if order.client_order_id is None:
                order.generation = max(order.generation, self.unused_generation(order.purpose))

    def unused_generation(self, purpose: OrderPurpose) -> int:
        """The least generation of `purpose` no order of this position has used (as `skip_used_ids` was told)."""
        return self._unused_generation.get(purpose, 0)

    async def _accept(self, order: ProtectiveOrder, placed: Order, latency: float | None) -> _Outcome:
        m = self._m
        cid = order.client_order_id
        assert cid is not None
        if placed.status is OrderStatus.TRIGGERED:
            return self._fired(order, placed.updated_at)
        if placed.status is not OrderStatus.NEW:
            await m.store.set_order_status(
                cid, record_status_of(placed.status), exchange_order_id=placed.venue_order_id
            )
            return _Outcome.GONE
        await m.order_status_writer.write(
            cid,
            OrderStatusRow(
                cid,
                OrderRecordStatus.OPEN,
                exchange_order_id=placed.venue_order_id,
                trail_distance=placed.trail_distance,
            ),
        )
        order.confirmed = True
        m.placed_ids.add(cid)
        order.doubted_id = None
        if order.missed_by_listing:
            log.info(
                "%s: %s %s is live on the venue (found by its id): the listing of open orders that left it "
                "out was wrong; nothing lost",
                self.symbol,
                stop_words(order.purpose),
                cid,
            )
            order.missed_by_listing = False
        order.confirmed_at = m.clock.monotonic()
        order.maybe_sent = False
        order.may_send_again = False
        order.fired_at = None
        order.live_since = placed.created_at or None if latency is None and not order.sent_this_run else None
        # The stream's word has served: were the stop's end missed later (a message lost), only the venue's
        # own read may confirm it again, not this word.
        m.streamed_live.pop(cid, None)
        if latency is not None:
            self.report.created_orders += 1
        price = placed.stop_price if placed.stop_price is not None else placed.activation_price
        self._announce(order, placed)
        m.publish(
            ProtectionConfirmed(
                at=m.clock.now(),
                position_id=self.position_id,
                symbol=self.symbol,
                purpose=order.purpose.value,
                client_order_id=cid,
                latency_seconds=latency or 0.0,
                price=price,
            )
        )
        return _Outcome.CONFIRMED

    def _announce(self, order: ProtectiveOrder, placed: Order) -> None:
        """One log line per order id and run: "Created …" for what this run sent (the operators count
        those lines), "Restored …" for an order found live from before. A managed trail's stop is logged
        by its move."""
        m = self._m
        cid = placed.client_order_id or order.client_order_id
        if cid in m.announced or (
            order.purpose is OrderPurpose.TRAILING_STOP and self.kind is TrailingKind.MANAGED
        ):
            return
        m.announced.add(cid)
        # (The hard stop this run's entry carried is a creation too: it was logged "Restored"; an operator.)
        verb = "Created" if order.sent_this_run or cid == self._entry_carried else "Restored"
        if order.purpose is OrderPurpose.TRAILING_STOP:
            # A venue's read may leave out what the guard sent (Bybit's position shows the trail's distance,
            # not its callback): the line says what is known ("activation now, callback None%" was false).
            # (One armed at the mark has no activation: it said the old one, "activation 0.182417"; an operator.)
            activation = (
                placed.activation_price
                if placed.activation_price is not None
                else None
                if order.arm_now
                else order.price
            )
            if placed.callback_rate is not None:
                trail = f"callback {placed.callback_rate}%"
            elif placed.trail_distance is not None:
                trail = f"distance {placed.trail_distance}"
            else:
                trail = "callback not shown by the venue"
            log.info(
                "%s trailing stop for %s: activation %s, %s (client id %s)",
                verb,
                self.symbol,
                activation if activation is not None else "now",
                trail,
                cid,
            )
        else:
            log.info("%s stop-loss for %s at %s (client id %s)", verb, self.symbol, placed.stop_price, cid)

    async def _refused(self, order: ProtectiveOrder, cid: str, exc: ExchangeError) -> None:
        m = self._m
        if isinstance(exc, RateLimited | Banned):
            # The venue said when it will take orders again: retry then, not on our own backoff clock.
            self.retry_at = m.clock.monotonic() + m.hold_orders_for(exc)
        elif isinstance(exc, ClockRefused) and isinstance(m.venue, ReadsVenueTime):
            # Sent again, signed anew, as soon as the adapter has read the venue's time: on its own backoff
            # it went with the old offset and was refused again every few tenths of a second. Waited for
            # no longer than its backoff or a quarter of grace (a read answering 9 s late kept a hard stop
            # off 9.5 s where a resend went through in 1.5 s), and sent at once only after a read that
            # succeeded or that wait: a read failing fast, the clock still wrong, made a resend loop with
            # no backoff (82 sends in 20 s; r70). (A read made since this send left: an older one set the
            # offset the refusal was signed with.)
            sent_at = order.sent_at if order.sent_at is not None else m.clock.monotonic()
            failures = self._move_failures if order is self._replacement else self.failures
            wait = max(self._retry_delay(failures + 1, predicted=True), float(m.config.grace_seconds) / 4)
            began = m.clock.monotonic()
            read = await m.venue.venue_time_read(wait, since=sent_at)
            if read or m.clock.monotonic() - began >= wait * CLOCK_READ_WAITED_SHARE:
                self.retry_at = m.clock.monotonic()
        if cid in m.placed_ids:
            # A send again of an id the venue answered placed (a look-up took it for absent past the lag):
            # its first copy may be live, so its record stays `open` (written `pending`, an engine restart
            # took its "unknown order" for proof, r85), and a refused id is replaced, kept for its cancel.
            if isinstance(exc, Rejected):
                self._supersede(order)
            return
        if isinstance(exc, Rejected):
            await m.store.set_order_status(cid, OrderRecordStatus.REJECTED, error=_short(exc))
            # A rejected id is spent on the venue; the next attempt needs a fresh one.
            self._fresh_id(order)
        else:
            await m.store.set_order_status(cid, OrderRecordStatus.PENDING, error=_short(exc))

    def _create_failed(
        self,
        order: ProtectiveOrder,
        cid: str,
        exc: BaseException,
        latency: float,
        *,
        resolved: bool,
        rode: bool = False,
    ) -> None:
        """One failed protective create, reported once and by what happened (`FailureClass`): one log line
        with the symbol, the stop, the class, the venue's code and the elapsed time; one domain event (a
        `ProtectionTimedOut` for a real timeout only); one `monitoring.events` row of kind
        `protection_<class>`. "Timeout creating …" is said of real timeouts only: an HTTP 500 answered at
        once is a server error, and the operators' grep must not count it."""
        m = self._m
        failure = failure_class(exc)
        what = stop_words(order.purpose)
        if rode and not resolved:
            # The same call as its trailing stop's, whose failure is said (and counted) once, there; the
            # hard stop that rode on the entry holds meanwhile.
            self._failed_this_pass = True
            log.info(
                "%s: the correction of its hard stop (%s) rode in the trailing stop's call and failed with it "
                "(%s): said once, there",
                self.symbol,
                cid,
                _short(exc) or type(exc).__name__,
            )
            return
        code = exc.venue_code if isinstance(exc, ExchangeError) else None
        status = exc.http_status if isinstance(exc, ExchangeError) else None
        detail = _short(exc) if str(exc) else f"no answer within {m.config.call_timeout_seconds:g}s"
        answer = ", ".join(
            part
            for part in (
                f"class {failure.value}",
                f"HTTP {status}" if status is not None else "",
                f"venue code {code}" if code is not None else "no venue code",
                f"client id {cid}",
            )
            if part
        )
        still_covered = self.covered
        retry_in: float | None = None
        if resolved:
            state, severity = "it was placed after all (found by its client order id)", Severity.WARNING
        else:
            # A managed move waits its own backoff (`_moves_resume_at`); the rest, the next failed pass's.
            failures = self._move_failures if order is self._replacement else self.failures
            retry_in = self._retry_delay(failures + 1, predicted=True)
            state = f"{self.symbol} {self.protection_words()}, retrying in {retry_in:.1f}s"
            severity = Severity.WARNING if still_covered else Severity.ERROR
            self.last_error = f"create {what}: {_FAILURE_WORDS[failure]} ({detail})"
            self._failed_this_pass = True
        message = (
            f"{_FAILURE_PHRASE[failure]} {what} for {self.symbol} after {latency:.1f}s ({answer}): {detail}; "
            f"{state}"
        )
        # The same refusal again within a minute (a venue failing every stop while a naked position is
        # tried once per grace period) is a line at INFO and no events row, as `_note_failure` says its
        # repeats: 40 positions refused for 90 s wrote 1 519 ERROR rows. Timeouts are said each time (each
        # took the call budget; the operators' grep counts them).
        repeated_since = None
        if not resolved and failure is not FailureClass.TIMEOUT:
            now = m.clock.monotonic()
            key = (f"create {what}", f"{failure.value} {status} {code}", still_covered)
            said_at = self._failure_said.get(key)
            if said_at is not None and now - said_at < REPEATED_FAILURE_SAID_EVERY_SECONDS:
                repeated_since = now - said_at
            else:
                self._failure_said[key] = now
        if repeated_since is not None:
            log.info(
                "%s (again: said %.0fs ago, said again once a minute while it lasts)", message, repeated_since
            )
        else:
            log.log(logging.WARNING if severity is Severity.WARNING else logging.ERROR, "%s", message)
        outcome = "resolved" if resolved else "retrying"
        if failure is FailureClass.TIMEOUT:
            m.timeouts.add(m.clock.monotonic())
            m.publish(
                ProtectionTimedOut(
                    at=m.clock.now(),
                    position_id=self.position_id,
                    symbol=self.symbol,
                    operation=f"create {what}",
                    latency_seconds=latency,
                    outcome=outcome,
                )
            )
        else:
            m.publish(
                ProtectionFailed(
                    at=m.clock.now(),
                    position_id=self.position_id,
                    symbol=self.symbol,
                    operation=f"create {what}",
                    error=detail,
                    retry_in_seconds=retry_in,
                    failure_class=failure.value,
                    venue_code=code,
                    http_status=status,
                    latency_seconds=latency,
                    outcome=outcome,
                    repeated=repeated_since is not None,
                )
            )
        if repeated_since is not None:
            return  # (counted by the metrics all the same; recorded once a minute)
        m.spawn_event_write(
            severity,
            f"protection_{failure.value}",
            message,
            self.symbol,
            self.position_id,
            data={
                "client_order_id": cid,
                "stop": order.purpose.value,
                "failure_class": failure.value,
                "venue_code": code,
                "http_status": status,
                "latency_seconds": round(latency, 3),
                "outcome": outcome,
                "retry_in_seconds": None if retry_in is None else round(retry_in, 3),
            },
        )

    async def _breached(self, order: ProtectiveOrder) -> _Outcome:
        m = self._m
        if (
            order.purpose is OrderPurpose.TRAILING_STOP
            and self.kind is TrailingKind.NATIVE
            and not order.arm_now
        ):
            # The activation price is already behind us: arm the trailing stop at the current mark.
            log.warning(
                "%s: trailing stop activation already passed; arming it at the current mark", self.symbol
            )
            order.arm_now = True
            self._fresh_id(order)
            return await self._ensure(order, self._send_native_trailing)
        if order.purpose is OrderPurpose.STOP_LOSS:
            message = f"{self.symbol}: price already through the stop-loss at {order.price} (would trigger immediately)"
            if m.config.close_on_would_trigger:
                await self._close_breached("stop-loss", order.price)
                return _Outcome.BREACHED
            log.error("%s: left open (close_on_would_trigger = false); uncovered", message)
            await m.store.record_event(
                Severity.CRITICAL,
                "stop_breached",
                message + ": left open, uncovered",
                symbol=self.symbol,
                position_id=self.position_id,
            )
            self._note_failure("create stop-loss", "price already through the stop")
            return _Outcome.RETRY
        self._note_failure(f"create {stop_words(order.purpose)}", "would trigger immediately")
        return _Outcome.BREACHED

    # --- managed trail -------------------------------------------------------------------------------

    async def _ensure_trail(self) -> bool:
        m = self._m
        assert self.trail is not None
        move_resolved = True
        if self._restored_move is not None:
            move_resolved = await self._resume_move()
            if self.exit_evidence is not None or self.closed:
                return False  # the new stop filled: the position is going; the reconciler settles it
        if self.trail.stop_price is not None and not self.trailing_stop.confirmed:
            # The trail has a stop and the venue no longer (or not yet) confirms it: (re)place it at the
            # trail's current stop, whatever happened to the last one (cancelled, refused, lost).
            if self.trailing_stop.price is None:
                self.trailing_stop.price = self.onto_grid(self.trail.stop_price, OrderPurpose.TRAILING_STOP)
            outcome = await self._ensure(self.trailing_stop, self._send_trail_stop(self.trailing_stop))
            if outcome is _Outcome.BREACHED and m.config.close_on_would_trigger:
                await self._close_breached("trailing stop", self.trailing_stop.price)
                return False
            if outcome is not _Outcome.CONFIRMED:
                return False
            if self.trailing_stop.sent_this_run:
                # The trail's record names the stop that is live now (a re-placed one has a new id): a
                # restart must find it, not the one that was lost.
                await self._save_trail()
            if self.trailing_stop.sent_this_run and self.trailing_stop.client_order_id not in m.announced:
                m.announced.add(self.trailing_stop.client_order_id or "")
                log.info(
                    "Created trailing stop for %s at %s (managed, replacing a lost one, client id %s)",
                    self.symbol,
                    self.trailing_stop.price,
                    self.trailing_stop.client_order_id,
                )
        if not self.trail_persisted:
            await self._save_trail()
        if not move_resolved:
            return False  # a move of the last engine is still unresolved: nothing new is decided meanwhile
        move = self.pending_move
        if move is None:
            return True
        if m.moves_frozen:
            return True  # stopping: no new move is sent (the confirmed stop stays; the next start trails on)
        new_price = move.stop_price if isinstance(move, trailing.PlaceStop) else move.new_stop_price
        # Written ahead: the trail is `moving`, with the peak that decided the move, before the new stop is
        # sent (its order row, with its id and price, is written ahead by `_ensure`). An engine that stops
        # or dies before the answer leaves a record the next one resolves against the venue.
        await self._save_trail()
        replacement = ProtectiveOrder(
            OrderPurpose.TRAILING_STOP, generation=self._next_trail_generation, price=new_price
        )
        self._next_trail_generation += 1
        self._replacement = replacement
        try:
            outcome = await self._ensure(replacement, self._send_trail_stop(replacement))
        except BaseException:
            if replacement.maybe_sent:
                # Interrupted (an urgent command, the guard stopping, a failed write) with the new stop
                # perhaps on the venue: it is resolved by its id as a restart resolves a move left in flight
                # (`_resume_move`), and a position that ends meanwhile cancels it. Forgotten, it stayed live
                # after a close, and the next pass sent the same move again under the next generation
                # (three stops live at once).
                self._restored_move = replacement
                self.pending_move = None
            raise
        finally:
            self._replacement = None
        self.pending_move = None
        if outcome is not _Outcome.CONFIRMED and replacement.maybe_sent:
            # Its outcome still unknown (no clear answer, not visible yet): resolved by its id, the trail
            # `moving` meanwhile (no new move decided). Given up, it was left live beside the next move's.
            self._restored_move = replacement
            return False
        if outcome is not _Outcome.CONFIRMED:
            self.trail = trailing.on_stop_failed(self.trail)
            if outcome is not _Outcome.BREACHED:  # the next try waits the backoff its failure logged
                self._move_failures += 1
                self._moves_resume_at = m.clock.monotonic() + self._retry_delay(self._move_failures)
            await self._save_trail()  # no longer `moving`: the record says the old stop is the trail's
            if replacement.client_order_id and not replacement.maybe_sent:
                # Never reached the venue (or was refused): close the row; the next move takes a new id.
                # An outcome still unknown stays 'unknown': if it turns up live the reconciler cancels it.
                record = await m.store.order_by_client_id(replacement.client_order_id)
                if record is not None and record.status is OrderRecordStatus.PENDING:
                    await m.store.set_order_status(
                        replacement.client_order_id, OrderRecordStatus.CANCELED, error="move abandoned"
                    )
            if outcome is _Outcome.BREACHED and m.config.close_on_would_trigger:
                # The price fell through the trail's new level before the venue had the stop: the trail is
                # breached. The old, looser stop was left alone while the position stayed open below the
                # trail's level, nothing more sent (r79: 60 s, 0.9 % under the stop the peak decided).
                await self._close_breached("trailing stop", new_price)
                return False
            return outcome is _Outcome.BREACHED  # breached, left open by configuration: the old stop stays
        self._move_finishing = True
        try:
            await self._move_confirmed(move, replacement, new_price)
        finally:
            self._move_finishing = False
        return True

    async def _close_breached(self, stop: str, level: Decimal | None) -> None:
        """The `stop` ("stop-loss", "trailing stop") at `level` was refused as already crossed: its level is
        breached, closed reduce-only at market (`stop_breached`: the engine closed it, no stop fired)."""
        message = f"{self.symbol}: price already through the {stop} at {level} (would trigger immediately)"
        log.error("%s: closing reduce-only at market", message)
        await self._m.store.record_event(
            Severity.ERROR,
            "stop_breached",
            message + ": closing at market",
            symbol=self.symbol,
            position_id=self.position_id,
        )
        self.submit(ClosePosition(exit_reason="stop_breached"))

    async def _move_confirmed(
        self,
        move: trailing.PlaceStop | trailing.MoveStop,
        replacement: ProtectiveOrder,
        new_price: Decimal,
    ) -> None:
        """The move's new stop is live: the trail's own, recorded, said, and the old one cancelled."""
        m = self._m
        assert self.trail is not None
        old = self.trailing_stop
        self.trail = trailing.on_stop_confirmed(self.trail, new_price, m.clock.now())
        self._move_failures = 0
        retired = self._take_trailing_stop(replacement)
        await self._save_trail()
        reason = move.reason.value if isinstance(move, trailing.MoveStop) else "activation"
        log.info("Moved trailing stop for %s from %s to %s (%s)", self.symbol, old.price, new_price, reason)
        if not old.client_order_id:
            log.info(
                "Created trailing stop for %s at %s (managed, client id %s)",
                self.symbol,
                new_price,
                replacement.client_order_id,
            )
        m.publish(
            StopMoved(
                at=m.clock.now(),
                position_id=self.position_id,
                symbol=self.symbol,
                old_stop=old.price,
                new_stop=new_price,
                reason=reason,
            )
        )
        await self._retire(retired)

    async def _resume_move(self) -> bool:
        """Resolve the move the last engine left in flight (its trail recorded `moving`), by the new stop's
        client id: live → adopted as the trail's stop, and only then the old one cancelled; never reached
        the venue, or ended without a fill → the move failed, the old stop (verified, or re-placed at the
        trail's stop, or the position closed if that would trigger) stays; filled → exit evidence. False
        while the venue's answer is still unknown (both ids stay current: the reconciler cancels neither)."""
        move = self._restored_move
        assert move is not None and move.client_order_id is not None and self.trail is not None
        if move.confirmed:  # listed by the venue's open orders at start-up
            outcome = _Outcome.CONFIRMED
        else:
            # (Absent: said below as the move's end, not as "sending it": it is not sent again.)
            outcome = await self._resolve(move, "resume the trailing stop move to", absent_means_send=False)
        if outcome is _Outcome.RETRY:
            return False
        self._restored_move = None
        self._move_finishing = True  # (until the old stop's cancel is done: `move_in_flight`)
        try:
            return await self._move_resumed(move, outcome)
        finally:
            self._move_finishing = False

    async def _move_resumed(self, move: ProtectiveOrder, outcome: _Outcome) -> bool:
        """`_resume_move` once the venue's word on the move's new stop is known."""
        m = self._m
        assert move.client_order_id is not None and self.trail is not None
        left_by = "this run" if move.sent_this_run else "the last run"
        if outcome in (_Outcome.CONFIRMED, _Outcome.FIRED):
            old = self.trailing_stop
            assert move.price is not None
            try:
                self.trail = trailing.on_stop_confirmed(self.trail, move.price, m.clock.now())
            except (trailing.InvalidTrailingState, trailing.UnexpectedTrailingEvent) as exc:
                # Only a record written before moves were written ahead can get here (its peak is older
                # than the move's). The stop is kept as a superseded one: cancelled once the trail's own
                # stop is confirmed, never before.
                log.error(
                    "%s: the trailing stop %s left in flight by %s cannot be adopted (%s); the trail keeps %s",
                    self.symbol,
                    move.client_order_id,
                    left_by,
                    exc,
                    old.client_order_id,
                )
                if self.trail.phase is trailing.TrailingPhase.MOVING:
                    self.trail = trailing.on_stop_failed(self.trail)
                self._superseded.append(move)
                await self._save_trail()
                return True
            retired = self._take_trailing_stop(move)
            if retired is not None and outcome is _Outcome.FIRED:
                retired = None  # the new one fired: the old stays until it has filled (superseded)
            await self._save_trail()
            log.info(
                "Resumed the trailing stop move for %s left in flight by %s: the stop at %s is live "
                "(client id %s)%s",
                self.symbol,
                left_by,
                move.price,
                move.client_order_id,
                f"; cancelling the old one at {old.price} ({old.client_order_id})"
                if old.client_order_id
                else "",
            )
            m.publish(
                StopMoved(
                    at=m.clock.now(),
                    position_id=self.position_id,
                    symbol=self.symbol,
                    old_stop=old.price,
                    new_stop=move.price,
                    reason="resumed",
                )
            )
            await self._retire(retired)
            return True
        # ABSENT (never reached the venue) or GONE (cancelled, expired, or filled: exit evidence).
        self.trail = trailing.on_stop_failed(self.trail)
        await self._save_trail()
        log.warning(
            "%s: the trailing stop move left in flight by %s did not take effect (%s is %s); the trail "
            "keeps its stop at %s",
            self.symbol,
            left_by,
            move.client_order_id,
            "not on the venue" if outcome is _Outcome.ABSENT else (move.ended_as or "gone"),
            self.trail.stop_price,
        )
        if outcome is _Outcome.ABSENT:
            record = await m.store.order_by_client_id(move.client_order_id)
            if record is not None and record.status in (OrderRecordStatus.PENDING, OrderRecordStatus.UNKNOWN):
                await m.store.set_order_status(
                    move.client_order_id, OrderRecordStatus.CANCELED, error="move abandoned"
                )
        return True

    def _send_trail_stop(self, order: ProtectiveOrder) -> Callable[[str], Awaitable[Order]]:
        def send(cid: str) -> Awaitable[Order]:
            assert order.price is not None
            return self._m.venue.create_stop_market_order(
                self.symbol, self.closing_side, self.quantity, order.price, client_order_id=cid
            )

        return send

    async def _save_trail(self) -> None:
        assert self.trail is not None
        state = self.trail
        await self._m.store.save_trailing_state(
            self.position_id,
            mode=self.kind.value,
            state=state.phase.value,
            activation_price=state.activation_price,
            callback_percent=self.callback_percent,
            activation_percent=self.activation_percent,
            peak_price=state.peak_price,
            current_stop_price=state.stop_price,
            stop_order_client_id=self.trailing_stop.client_order_id if state.stop_price is not None else None,
            last_move_at=_datetime(state.last_move_at),
            update_count=state.update_count,
        )
        self.trail_persisted = True

    def on_mark(self, price: Decimal, at: float) -> None:
        """Synchronous, allocation-free in the common case; never awaits (the price path must not wait)."""
        if self.closed:
            return
        crossed = self._crossed_stops(price)
        if crossed:
            # The mark went through one of our stops: it has probably fired. Ask the venue now rather than
            # at the next reconcile pass, so the sibling stop is cancelled and the position closed within a
            # round trip or two, not up to `reconcile_seconds` later.
            self.check_fired_soon = True
            self._crossed.update(crossed)
            self.wake.set()
        if self.trail is None:
            return
        self.trail, decision = trailing.on_mark(self.trail, price, at)
        if decision is not trailing.HOLD:
            resume = self._moves_resume_at
            if resume is not None:
                if self._m.clock.monotonic() < resume:
                    # A failed move's backoff: the peak is followed, the move is not sent before it has
                    # passed (decided again by each mark, it was sent again at every tick).
                    self.trail = trailing.on_stop_failed(self.trail)
                    return
                self._moves_resume_at = None
            self.pending_move = decision  # type: ignore[assignment]
            self.wake.set()

    def _crossed_stops(self, mark: Decimal) -> list[OrderPurpose]:
        """Which of our confirmed stops `mark` went through (by purpose)."""
        long = self.side is PositionSide.LONG
        crossed: list[OrderPurpose] = []
        for order in self.watched_stops:
            # A stop-market (the hard stop, or a managed trail's stop) fires at its price.
            at_price = order.purpose is OrderPurpose.STOP_LOSS or self.kind is TrailingKind.MANAGED
            if not (order.confirmed and at_price and order.price is not None):
                continue
            if (mark <= order.price) if long else (mark >= order.price):
                crossed.append(order.purpose)
        if self.kind is TrailingKind.NATIVE and self.trailing_stop.confirmed:
            # The venue's trail is not ours to see: follow it from the marks (arms at the activation price,
            # fires a callback below the best mark since). A new trailing order starts unarmed again.
            cid = self.trailing_stop.client_order_id
            if self._native_extreme_of != cid:
                self._native_extreme, self._native_extreme_of = None, cid
            activation = self.trailing_stop.price
            armed = (
                activation is None
                or self.trailing_stop.arm_now
                or self._native_armed_of == cid
                or ((mark >= activation) if long else (mark <= activation))
            )
            if armed and self._native_armed_of != cid and self.trails_on_mark:
                # Armed on the venue from now on (the venue's trail follows the mark as ours does): shown
                # so, sent again so, and recorded (a pass writes it) for the next engine to know.
                self._native_armed_of = cid
                self.wake.set()
            if armed or self._native_extreme is not None:
                best = self._native_extreme
                self._native_extreme = (
                    mark if best is None else (max(best, mark) if long else min(best, mark))
                )
                fraction = self.callback_percent / _HUNDRED
                trigger = (
                    self._native_extreme * (1 - fraction) if long else self._native_extreme * (1 + fraction)
                )
                if (mark <= trigger) if long else (mark >= trigger):
                    crossed.append(OrderPurpose.TRAILING_STOP)
        return crossed

    # --- sending -------------------------------------------------------------------------------------

    def _send_stop_loss(self, cid: str) -> Awaitable[Order]:
        assert self.stop_loss.price is not None
        return self._m.venue.create_stop_market_order(
            self.symbol, self.closing_side, self.quantity, self.stop_loss.price, client_order_id=cid
        )

    def _send_native_trailing(self, cid: str) -> Awaitable[Order]:
        order = self.trailing_stop
        return self._m.venue.create_trailing_stop_order(
            self.symbol,
            self.closing_side,
            self.quantity,
            self.callback_percent,
            client_order_id=cid,
            activation_price=None if order.arm_now else order.price,
        )

    # --- closing -------------------------------------------------------------------------------------

    @property
    def close_sent(self) -> bool:
        """Our close at market has gone to the venue and not ended (not while it waits for its turn)."""
        return self.closing and self._closing_cid is not None

    async def request_close(self, exit_reason: str = MANUAL_CLOSE) -> tuple[bool, str]:
        """Close the position reduce-only at market, through the guard's own task (so nothing it is
        sending can outlive the position). Returns (closed, detail)."""
        return await self.submit(ClosePosition(exit_reason=exit_reason))

    async def _close(self, *, exit_reason: str) -> bool:
        """Close at market (reduce-only), then finish. True when the venue confirmed. On failure the
        position is `active` again (never left `closing`, which no operator query counts). Meanwhile the
        guard is `closing`, whatever ends the attempt."""
        self.closing = True
        self._closing_reason = exit_reason
        m = self._m
        # A close the venue did not execute (busy, a 5xx before execution, an answer lost and the order not
        # on the venue) is sent again, with a new id, while one and a half call budgets from the first send
        # last (the last attempt ends within two and a half, inside `tsbot close`'s 30 s wait): `tsbot
        # flatten` gave up on fifteen positions after one -1008 each, and the same command a moment later
        # closed them all.
        deadline = m.clock.monotonic() + 1.5 * m.config.call_timeout_seconds
        delay = max(m.config.retry_initial_seconds, 0.1)
        try:
            while True:
                try:
                    return await self._close_at_market(exit_reason=exit_reason)
                except _CloseNotSent as not_sent:
                    if m.clock.monotonic() + delay > deadline:
                        self._note_failure(
                            "close position", not_sent.error, retried=self._closing_reason != MANUAL_CLOSE
                        )
                        m.request_reconcile()
                        return False
                    log.warning(
                        "%s: the close was not executed (%s); sending it again in %.1fs",
                        self.symbol,
                        not_sent.error,
                        delay,
                    )
                    await m.clock.sleep(delay)
                    delay *= 2
        finally:
            self.closing = False
            self._closing_cid = self._close_heard = None
            self._closing_reason = ""

    async def _close_at_market(self, *, exit_reason: str) -> bool:
        m = self._m
        cid = client_order_id(
            m.token, self.position_id, OrderPurpose.CLOSE, m.next_close_generation(self.position_id)
        )
        # An order like any other for the venue's order counts: it waits out a 429's hold and a ban
        # (sent into either it is refused, and three refusals within a minute get the account banned);
        # the position is `closing` only once it goes (a restart meanwhile leaves it `active`).
        placed, probe_at = await self._close_slot()
        if not placed:
            return True  # over while the close waited: nothing to send
        try:
            await m.store.record_order(
                client_order_id=cid,
                position_id=self.position_id,
                purpose=OrderPurpose.CLOSE,
                side=self.closing_side.value,
                type="market",
                quantity=self.quantity,
            )
            await m.store.set_position_status(self.position_id, PositionStatus.CLOSING)
        except BaseException:
            m.budget.order_answered(probe_at, room=False)  # never sent: the orders behind it go on
            raise
        # An answer lost after the venue filled the close would hold the position's stops live on a flat
        # symbol (and the symbol closed to new positions) for the whole call budget: the account stream's
        # word, or the order found by its id once the answer is late, ends the wait (`create_or_find`).
        self._closing_cid, self._close_heard = cid, None
        self._close_told.clear()
        sent_at = m.clock.monotonic()
        try:
            filled = await m.budget.sent(
                probe_at,
                m.create_or_find(
                    m.venue.create_market_order(
                        self.symbol, self.closing_side, self.quantity, client_order_id=cid, reduce_only=True
                    ),
                    lambda: m.venue.fetch_order(self.symbol, cid),
                    f"close {self.symbol}",
                    Lane.PROTECTIVE,
                    known=lambda: self._close_heard,
                    told=self._close_told,
                ),
            )
        except (RateLimited, Banned) as exc:
            m.hold_orders_for(exc)
            await self._close_failed(cid, _short(exc), OrderRecordStatus.REJECTED)
            return False
        except (OutcomeUnknown, TimeoutError):
            try:
                filled = await self._close_looked_up(cid, sent_at)
            except NotFound as exc:
                # Not on the venue once its read lag is over: never executed (Bybit answers a busy server
                # with an unknown outcome, and one such answer ended a flatten that the same command, a
                # moment later, carried out whole). Sent again like a close the venue refused unexecuted.
                self._closing_cid = None
                await m.store.set_order_status(
                    cid, OrderRecordStatus.REJECTED, error=f"not executed: {_short(exc)}"
                )
                await m.store.set_position_status(self.position_id, self._open_status())
                raise _CloseNotSent(f"no answer, and the venue does not have it: {_short(exc)}") from exc
            except (ExchangeError, TimeoutError) as exc:
                await self._close_failed(cid, f"outcome unknown: {_short(exc)}", OrderRecordStatus.UNKNOWN)
                return False
        except Rejected as exc:
            if exc.code != RejectCode.REDUCE_ONLY_REJECTED:
                await self._close_failed(cid, _short(exc), OrderRecordStatus.REJECTED)
                return False
            await m.store.set_order_status(cid, OrderRecordStatus.REJECTED, error=_short(exc))
            await m.store.set_position_status(self.position_id, self._open_status())
            if await self._gone_after_refusal(exc):
                return True
            await self._close_failed(cid, _short(exc), None)
            return False
        except Retryable as exc:  # not executed: the caller sends it again while its budget lasts
            self._closing_cid = None  # nothing of it is on its way (`close_sent`) while it waits to go again
            await m.store.set_order_status(cid, OrderRecordStatus.REJECTED, error=_short(exc))
            await m.store.set_position_status(self.position_id, self._open_status())
            raise _CloseNotSent(_short(exc)) from exc
        except ExchangeError as exc:
            await self._close_failed(cid, _short(exc), OrderRecordStatus.REJECTED)
            return False
        except asyncio.CancelledError:
            # Stopped with the close on its way (the engine stopping): the position is `active` again until
            # the venue says it is flat (the next start looks the close up by its id); `closing`, it was out
            # of the operators' SQL while the engine was down.
            with contextlib.suppress(Exception):
                await asyncio.shield(m.store.set_position_status(self.position_id, self._open_status()))
            raise
        await m.store.set_order_status(
            cid, record_status_of(filled.status), exchange_order_id=filled.venue_order_id
        )
        if filled.status is not OrderStatus.FILLED:
            await self._close_failed(cid, f"close order {filled.status.value}", None)
            return False
        await self._finish(exit_reason=exit_reason, exit_price=filled.average_price)
        return True

    async def _close_looked_up(self, cid: str, sent_at: float) -> Order:
        """A close whose answer never came, asked for by its id; "no such order" is asked again until the
        venue's read lag after its send is over (before, it proves nothing), then raised (`NotFound`)."""
        m = self._m
        while True:
            asked_at = m.clock.monotonic()  # judged by when the look left, as `cancel_by_id` is
            try:
                return await m.read(lambda: m.venue.fetch_order(self.symbol, cid), "fetch_order")
            except NotFound:
                if asked_at - sent_at >= m.absence_window():
                    raise
                await m.clock.sleep(max(0.0, sent_at + m.absence_window() - m.clock.monotonic()))

    async def _close_slot(self) -> tuple[bool, float | None]:
        """Wait for the close's place in the venue's order windows (`OrderBudget.acquire_close`, through a
        429's hold or a ban: seconds, or minutes) while applying, as they come, the commands that can end
        the position (its stop's fill, the position flat, the reconciler's word): they used to wait behind
        the close in the guard's task, and a chaos soak saw a filled stop's sibling live on a flat symbol
        for the rest of a hold. (True, probe) once the place is taken, as `acquire_close` returns it;
        (False, None) once the position is over."""
        m = self._m
        started = m.clock.monotonic()
        said = False
        while True:
            slot = asyncio.ensure_future(self._close_turn())
            try:
                while not slot.done() and not self._close_wait_taken():
                    self._ending_told.clear()
                    self.close_held_back = True
                    if said:
                        await first_of(asyncio.shield(slot), self._ending_told.wait())
                        continue
                    await first_of(
                        asyncio.shield(slot), self._ending_told.wait(), m.clock.sleep(CLOSE_WAIT_SAID_SECONDS)
                    )
                    said = self._say_close_waits(slot)
            except BaseException:
                await end_all(slot)
                if not slot.cancelled() and slot.exception() is None:  # a place taken, never sent
                    m.budget.order_answered(slot.result(), room=False)
                raise
            finally:
                self.close_held_back = False
            await end_all(slot)
            if not slot.cancelled():  # the place came as the wait ended: the close goes
                if said:
                    log.info(
                        "%s: the close at market goes, %.1fs after it began to wait for the venue",
                        self.symbol,
                        m.clock.monotonic() - started,
                    )
                return True, slot.result()
            await self._apply_while_closing()
            if self.closed:
                return False, None

    async def _close_turn(self) -> float | None:
        """The close's place in the venue's order windows (`OrderBudget.acquire_close`). A close its position
        can wait for, its hard stop confirmed (a trailing stop's stuck in TRIGGERING, or breached), first
        waits while its refusal would be a ban's (`OrderBudget.discretionary_held_for`, as an operator's
        close does): two of a sim soak's three bans began with such a close sent into a window another
        client had just filled, with two refusals remembered, and each ban held every stop and close of
        every position back with it (20 s there, 2 minutes and up on Binance). A close the hard stop does
        not cover (its own stop stuck: the price is through it) goes at once; a hard stop lost meanwhile
        ends the wait (`_close_slot` starts the turn again once it has applied that news)."""
        m = self._m
        budget = m.budget
        # Not past the point where the wait itself would be "protection failing": the breaker pauses
        # entries once a position is uncovered grace × its factor, and the close needs a grace period to
        # go and be answered. Held to the refusals' minute, such closes waited up to 33 s and tripped the
        # breaker three times in a 10-minute soak (soak73); past this point the close goes, as before.
        since = self.unprotected_since if self.unprotected_since is not None else m.clock.monotonic()
        until = since + m.config.breaker_uncovered_seconds - m.config.grace_seconds
        while self._closing_reason != MANUAL_CLOSE and self.has_stop_loss:
            held = budget.discretionary_held_for()
            left = until - m.clock.monotonic()
            if held is None or left <= 0:
                budget.take_discretionary_turn()
                break
            self._close_held_at_edge = min(held, left)
            await budget.room_shown(min(held, left, CLOSE_EDGE_RECHECK_SECONDS))
        self._close_held_at_edge = None
        return await budget.acquire_close()

    def _say_close_waits(self, slot: asyncio.Future[float | None]) -> bool:
        """A close still waiting for its place after CLOSE_WAIT_SAID_SECONDS is said (WARNING), with how long
        at most and why: a stuck stop's close waited 2.5 s and 8 s in silence in sim soaks while its position
        had no working stop. True once said (or nothing to say: it went)."""
        if slot.done():
            return False
        budget = self._m.budget
        if self._closing_reason == MANUAL_CLOSE and (
            budget.held_for() is not None or budget.requests_held_for() is not None
        ):
            return True  # an operator's close held by a ban or a 429's hold: the engine says it, once (r88)
        if self._close_held_at_edge is not None:
            message = (
                f"{self.symbol}: the close at market waits up to {self._close_held_at_edge:.1f}s: the venue "
                "refused orders for its rate lately, and one more refusal may get the account banned, every "
                "stop held back with it; the position keeps its confirmed hard stop meanwhile (should it be "
                "lost, the close goes at once)"
            )
            log.warning("%s", message)
            # Recorded too, as an operator's held close is: the dashboards and a watch showed the position
            # "closing at market" for up to a minute with nothing sent and no reason (r93).
            self._m.spawn_event_write(Severity.WARNING, "close_held", message, self.symbol, self.position_id)
            return True
        waits = budget.close_waits()
        if waits is None:
            return False  # (it goes now)
        seconds, why = waits
        log.warning("%s: the close at market waits up to %.1fs: %s", self.symbol, seconds, why)
        return True

    def _close_wait_taken(self) -> bool:
        """A command a close waiting for its turn applies at once is queued (`news_withdraws_cover`): waiting
        behind the close, the position was counted covered, by the gauge and the records, for a whole ban
        with no hard stop on the venue."""
        return self.news_withdraws_cover() or any(self._fires_a_confirmed_stop(c) for c in self._commands)

    async def _apply_while_closing(self) -> None:
        """Apply what `_close_wait_taken` takes; a stop lost meanwhile is said in the records at once."""
        withdrawn = False
        while (
            command := self._take(
                lambda c: c.ends_position or self._withdraws_cover(c) or self._fires_a_confirmed_stop(c)
            )
        ) is not None:
            withdrawn = withdrawn or not command.ends_position
            await self._apply(command)
        if withdrawn and not self.closed:
            await self._write_facts()

    async def _gone_after_refusal(self, refusal: Rejected) -> bool:
        """The venue refused the close for reducing nothing (-2022): it holds no position on our side now,
        most likely ended an instant before by a stop of ours (or by hand). The reconciler asks the venue
        (`_said_gone`); its answer is applied here as it comes: gone ends the position, and the close is
        done (True); held, or no answer within the call budget, and the close failed (False). Answered
        "close failed" at once, a closed position had its operator told it was still open, and an error
        logged and counted."""
        m = self._m
        log.warning(
            "%s: the venue refused the close: %s; asking the venue whether the position is gone",
            self.symbol,
            _short(refusal),
        )
        self._said_gone(m.clock.monotonic())
        deadline = m.clock.monotonic() + float(m.config.call_timeout_seconds)
        while not self.closed and self.said_gone_at is not None:
            answer = self._take(lambda c: c.ends_position or isinstance(c, PositionHeld))
            if answer is not None:
                await self._apply(answer)
                continue
            left = deadline - m.clock.monotonic()
            if left <= 0:
                break
            self.wake.clear()
            await first_of(self.wake.wait(), m.clock.sleep(left))
        return self.closed

    def _take(self, match: Callable[[GuardCommand], bool]) -> GuardCommand | None:
        command = next((c for c in self._commands if match(c)), None)
        if command is not None:
            self._commands.remove(command)
        return command

    def hear_close(self, order: Order) -> bool:
        """The account stream says how a close of ours ended: True when it is the close in flight (taken by
        `_close_at_market` as the venue's answer, whether or not the call's own answer comes)."""
        if not order.status.is_final or order.client_order_id != self._closing_cid:
            return False
        self._close_heard = order
        self._close_told.set()
        return True

    def _open_status(self) -> PositionStatus:
        """Still open on the venue as far as we know: a status the operators' SQL counts (not `closing`)."""
        live = PositionStatus.ACTIVE if self.covered else self.status
        if live not in (PositionStatus.ACTIVE, PositionStatus.PENDING_PROTECTION):
            live = PositionStatus.ACTIVE
        return live

    async def _close_failed(self, cid: str, error: str, status: OrderRecordStatus | None) -> None:
        m = self._m
        if status is not None:
            await m.store.set_order_status(cid, status, error=error)
        await m.store.set_position_status(self.position_id, self._open_status())
        # The engine's own closes (a stop breached, a fired stop that did not fill) are decided again by
        # the next pass; the operator's is not retried: said as such ("retrying" left it open, unsaid).
        self._note_failure("close position", error, retried=self._closing_reason != MANUAL_CLOSE)
        m.request_reconcile()  # the reconciler finds out whether the venue closed it after all

    async def _finish(self, *, exit_reason: str, exit_price: Decimal | None) -> None:
        """The position is gone on the venue: record why (first: a failed write leaves the guard open and
        the reconciler asks again), then cancel what is left of ours and stop guarding."""
        if self.closed:
            return
        m = self._m
        pnl = None
        # Unknown once the venue changed the position's size: a part closed earlier (a stop filled in part,
        # a partial close by hand) took its own PnL, and an addition moved the entry price; computed on what
        # was left at the end, the figure was wrong and looked exact.
        if exit_price is not None and not self.size_changed:
            direction = 1 if self.side is PositionSide.LONG else -1
            pnl = (exit_price - self.entry_price) * self.quantity * direction
        # Both stops (and any superseded generation) at once; one whose cancel fails is not left to the
        # next reconcile pass: the manager keeps cancelling it within grace, and the symbol takes no new
        # position until it is gone (an old stop for the old quantity would act on the new position).
        # Known as retiring from before the position is recorded closed: a manager stopped from here on
        # hands them to the next one (which restores no guard for a closed position).
        # (And one the venue answered placed that a look-up took for absent past the lag we count on: it may
        # be live all the same, and left uncancelled it freed the symbol beside the new position, r84.)
        ours = [order for order in (self.stop_loss, self.trailing_stop) if self._may_be_live(order)]
        ours.extend(self._superseded)
        if self._restored_move is not None and self._restored_move.client_order_id:
            ours.append(
                self._restored_move
            )  # a move the last engine left in flight may have reached the venue
        now = m.clock.monotonic()
        self.retiring = {o.client_order_id: o.left_at(now) for o in ours if o.client_order_id is not None}
        try:
            await m.store.close_position(self.position_id, exit_reason=exit_reason, realized_pnl=pnl)
        except BaseException:
            self.retiring = {}  # still open: its stops are its own again
            raise
        self.closed = True
        self.closed_as = exit_reason
        self.ended.set()
        self._pass_finished.set()  # nobody waits for a pass of a closed position
        self._superseded.clear()
        self._restored_move = None
        if self.trail is not None and not self.trail.phase.is_terminal:
            self.trail = (
                trailing.on_stop_triggered(self.trail)
                if exit_reason == "trailing_stop"
                else trailing.on_trailing_stopped(self.trail)
            )
            try:
                await self._save_trail()
            except Exception:
                log.exception("%s: could not record the final trailing state", self.symbol)
        cancelled = await asyncio.gather(*(self._cancel_quietly(order) for order in ours))
        self.retiring = {}
        left = {
            order.client_order_id: order.left_at(m.clock.monotonic())
            for order, done in zip(ours, cancelled, strict=True)
            if not done and order.client_order_id is not None
        }
        log.info(
            "Position %s %s closed: %s, realized PnL %s before fees",
            self.position_id,
            self.symbol,
            exit_reason,
            pnl,
        )
        m.publish(
            PositionClosed(
                at=m.clock.now(),
                position_id=self.position_id,
                symbol=self.symbol,
                exit_reason=exit_reason,
                realized_pnl=pnl,
            )
        )
        m.spawn_event_write(
            Severity.INFO,
            "position_closed",
            f"{self.symbol} closed: {exit_reason}",
            self.symbol,
            self.position_id,
            data={"realized_pnl": str(pnl) if pnl is not None else None},
        )
        self.wake.set()
        m.forget_placed(self.position_id, keep=left.keys())  # (filled, or cancelled: nothing more to ask)
        m.forget(self)
        if left:
            m.sweep_leftovers(self.symbol, left)

    async def _cancel_quietly(self, order: ProtectiveOrder) -> bool:
        """Cancel one of our orders: True when it is gone from the venue, False when the cancel failed
        (the caller says who tries again)."""
        cid = order.client_order_id
        assert cid is not None
        order.confirmed = False
        m = self._m
        missed = order.missed_by_listing
        gone = await m.cancel_by_id(
            self.symbol, cid, sent_at=order.left_at(m.clock.monotonic()), tell_end=missed
        )
        if missed and gone:
            # A listing had left it out: our cancel's answer settles it. It cancelled a live stop: nothing
            # was lost. The stop had ended before: said (`_missed_gone`), as its look-up would have.
            if cid in m.ended_before_cancel:
                ended = m.ended_before_cancel.pop(cid)  # (None: the venue did not know it)
                order.ended_as, order.ended_id = ended, cid if ended is not None else None
                self._missed_gone(order)
            else:
                order.missed_by_listing = False
        return gone

    # --- bookkeeping ---------------------------------------------------------------------------------

    def _retry_delay(self, failures: int, *, predicted: bool = False) -> float:
        """When to try again after `failures` failed passes in a row. The venue's word comes first (a
        Retry-After or a ban's end: then, not later). Otherwise the backoff doubles — but not past a
        quarter of the grace period during a naked position's first grace period, and its first retry is
        one round trip later: it is retried several times within grace however often it failed, where
        doubling used to leave it naked for 1 + 2 + 4 s after three refusals. Past grace (the venue keeps
        failing) the doubling resumes from that quarter of grace, up to grace itself: no hot loop, and no
        naked position left waiting out a long backoff after the venue recovered. (It resumed from the count:
        the first failure past grace after five within it backed off `retry_max_seconds`, 30 s naked on a
        venue that took the stop a moment later.)"""
        m = self._m
        now = m.clock.monotonic()
        if self.retry_at is not None:
            return max(0.0, self.retry_at - now)
        delay = m.backoff(failures)
        grace = m.config.grace_seconds
        since = self.unprotected_since
        if since is not None and self._loss_found_at is not None:
            # A loss found after the fact is timed from its end on the venue, maybe past grace already; its
            # re-placement is tried at the grace cadence from when it was found, not on the doubling
            # (1, 2, 4 … s: naked 10.4 s after the find where 7.8 s, a reviewer).
            since = max(since, self._loss_found_at)
        if not self.covered and since is not None and now - since < grace:
            delay = min(delay, grace / 4)
            if not predicted:  # (a failure's log line says the next delay ahead: it counts nothing)
                self._failures_in_grace = max(self._failures_in_grace, failures)
            if failures <= 1:
                # A naked position's first failed pass is tried again one round trip later: what was
                # refused is sent again at once (a definite "not executed" may go with the same id; an
                # unknown outcome is looked up first). Only further failures back off.
                delay = min(delay, max(m.order_round_trip_seconds, FIRST_RETRY_MIN_SECONDS))
        elif not self.covered:
            if self._failures_in_grace:
                steps = max(1, failures - self._failures_in_grace)
                delay = min(delay, grace / 4 * 2 ** min(steps, MAX_DOUBLINGS))
            # However long the venue has refused, a naked position is tried at least once per grace period:
            # the doubling went on to `retry_max_seconds`, and a venue that took stops again a moment after
            # a minute of refusals left it naked up to 30 s more (the venue's own word, above, comes first).
            delay = min(delay, max(grace, NAKED_RETRY_CEILING_MIN_SECONDS))
        fired = [o.fired_at for o in self.watched_stops if o.fired_at is not None]
        if fired:
            # A fired stop that has not filled is closed at market once its patience ends (`_check_fired`):
            # the next pass is then, not when a backoff doubled past grace says (it left one 31 s naked).
            due = min(fired) + m.stuck_trigger_patience() - now
            delay = min(delay, max(due, min(m.config.retry_initial_seconds, grace / 4)))
        return delay

    def _note_failure(
        self,
        operation: str,
        error: str,
        *,
        log_exception: BaseException | None = None,
        retried: bool = True,
    ) -> None:
        m = self._m
        self.last_error = f"{operation}: {error}"
        self._failed_this_pass = True
        # The next pass's order waits for the venue to take orders again (a 429's hold, a ban): say when.
        retry_in = (
            max(self._retry_delay(self.failures + 1, predicted=True), m.budget.held_for() or 0.0)
            if retried
            else None
        )
        then = f"retrying in {retry_in:.1f}s" if retry_in is not None else "not retried: ask again to retry"
        # Only say "unprotected" when it is true: a failed trail move leaves the confirmed stops in place.
        still_covered = self.covered
        state = self.protection_words()
        now = m.clock.monotonic()
        key = (operation, error, still_covered)  # (one first said while covered is news once uncovered)
        said_at = self._failure_said.get(key)
        repeated = (
            log_exception is None
            and said_at is not None
            and now - said_at < REPEATED_FAILURE_SAID_EVERY_SECONDS
        )
        if not repeated:
            self._failure_said[key] = now
        log.log(
            logging.INFO
            if repeated
            else logging.ERROR
            if log_exception is not None or not still_covered
            else logging.WARNING,
            "%s %s: %s failed (%s); %s%s",
            self.symbol,
            state,
            operation,
            error,
            then,
            f" (again: said {now - said_at:.0f}s ago, said again once a minute while it lasts)"
            if repeated and said_at is not None
            else "",
            exc_info=log_exception,
        )
        m.publish(
            ProtectionFailed(
                at=m.clock.now(),
                position_id=self.position_id,
                symbol=self.symbol,
                operation=operation,
                error=error,
                retry_in_seconds=retry_in,
                repeated=repeated,
            )
        )
        if repeated:
            return  # (counted by the metrics all the same; recorded once a minute)
        m.spawn_event_write(
            Severity.WARNING if still_covered else Severity.ERROR,
            "protection_failed",
            f"{self.symbol} {state}: {operation} failed: {error}",
            self.symbol,
            self.position_id,
        )

    def prime_written_facts(self, position: PositionRecord) -> None:
        """Remember the facts the database holds for this position, so an unchanged first pass (a restored
        position whose stops are all still live) writes nothing."""
        self._written_facts = (
            position.has_stop_loss,
            position.has_trailing_stop,
            position.stop_loss_price if position.has_stop_loss else None,
            position.trailing_activated
            if self.trail is not None or (self.kind is TrailingKind.NATIVE and position.has_trailing_stop)
            else None,
            position.status,
            position.trail_armed,
            position.unprotected_since,
            position.stop_loss_unverified,
            position.trailing_stop_unverified,
        )

    def resume_unprotected_since(self, moment: datetime) -> None:
        """A restored position was already unprotected since `moment` (recorded by the manager or engine
        before this one): its time unprotected goes on from there, and its grace period is long over if
        it began before that moment."""
        clock = self._m.clock
        since = monotonic_of(clock, moment.timestamp())
        self.unprotected_since = since
        self.unprotected_since_epoch = moment.timestamp()
        self.filled_at = min(self.filled_at, since)
        # Found uncovered by this guard now: its retries start at the grace cadence, not on the doubling of
        # a spell long past grace (`_retry_delay`; a reviewer).
        self._loss_found_at = clock.monotonic()

    def covered_until_now(self) -> None:
        """Its record says both stops were confirmed: an uncovered spell, if any, begins when first seen."""
        self.unprotected_since = None
        self.unprotected_since_epoch = None

    def facts_written(self) -> bool:
        """The database holds exactly what this guard knows now."""
        return self._written_facts is not None and self._written_facts == self._facts(
            self._m.clock.monotonic()
        )

    def _native_armed_fact(self) -> bool | None:
        """`trailing_activated` of a native trail: whether the trailing order live now is known armed (None
        while none is confirmed: the record keeps what it says). Of the order live now, not of the position:
        one a managed trail or an earlier order left True was restored armed, waiting for its activation."""
        order = self.trailing_stop
        if self.trail is not None or self.kind is not TrailingKind.NATIVE or not order.confirmed:
            return None
        return self._native_armed(order)

    def _facts(self, now: float) -> tuple[Any, ...]:
        covered = self.covered
        past_grace = now - self.filled_at >= self._m.config.grace_seconds
        # Active once covered, or once the grace period is over: an uncovered position past grace must
        # count in the operators' SQL (status = 'active'), never hide in pending_protection.
        status = PositionStatus.ACTIVE if covered or past_grace else PositionStatus.PENDING_PROTECTION
        return (
            self.has_stop_loss,
            self.has_trailing_stop,
            self.live_stop_loss_price,
            self.trail.stop_price is not None if self.trail is not None else self._native_armed_fact(),
            status,
            self.trail_armed,
            None if covered else _datetime(self.unprotected_since_epoch),
            self.stop_loss_unverified,
            self.trailing_stop_unverified,
        )

    def _protected_from(self) -> datetime | None:
        """When the venue placed the stops that cover the position, if a start found every one of them live
        (the later of their creation times, on the venue's clock); None if any was placed by this process
        (then it is protected as of now)."""
        live = [self.stop_loss.live_since]
        if self.kind is TrailingKind.NATIVE or self.trailing_stop.confirmed:
            live.append(self.trailing_stop.live_since)
        if any(at is None for at in live):
            return None
        return _datetime(max(at for at in live if at is not None))

    async def write_facts_now(self) -> None:
        """`_write_facts` from outside the guard's task: only while that task is not running (it died)."""
        await self._write_facts()

    async def _write_facts(self) -> None:
        m = self._m
        now = m.clock.monotonic()
        covered = self.covered
        late_first = None  # a first protection later than the grace period: uncovered from the fill
        if covered:
            if self.protected_at is None:
                if (
                    self.fresh_fill
                    and now - self.filled_at > m.config.grace_seconds
                    and self.naked_since is None
                ):
                    late_first = _datetime(m.clock.now() - (now - self.filled_at))
                self.protected_at = now
                self.protected.set()
            self.covered_now.set()
            self.unprotected_since = None  # every time: the next loss is timed from its own start
            self.unprotected_since_epoch = None
            self._loss_found_at = None
        else:
            self.covered_now.clear()
            if self.unprotected_since is None:
                self.unprotected_since = now
                self.unprotected_since_epoch = m.clock.now()
        facts = self._facts(now)
        self.report.first_pass_ok = covered
        if facts == self._written_facts:
            return  # the database already says exactly this
        naked_from = self.naked_since if covered and self.report.created_orders > 0 else None
        # Stops confirmed 6–9 s after the fill (grace 5 s) showed UNCOVERED and tripped the breaker, and the
        # history kept nothing of it: `tsbot report` said 0.5 s uncovered (opme48). Within grace, no span.
        naked_from = naked_from or late_first
        self.naked_since = None  # (uncovered, its span begins at the fill the guard was timed from)
        written = await m.facts_writer.write(
            self.position_id,
            ProtectionFactsRow(
                position_id=self.position_id,
                has_stop_loss=facts[0],
                has_trailing_stop=facts[1],
                stop_loss_price=facts[2],
                trailing_activated=facts[3],
                status=facts[4],
                trail_armed=facts[5],
                unprotected_since=facts[6],
                observed_at=_datetime(m.clock.now()),  # an uncovered span these facts end, ends now
                uncovered_from=naked_from,
                stop_loss_unverified=facts[7],
                trailing_stop_unverified=facts[8],
                protected_from=self._protected_from() if covered else None,
                hard_stop_from=_datetime(self.stop_loss.live_since) if self.stop_loss.confirmed else None,
            ),
        )
        self.status = written if written is not None else facts[4]
        self._written_facts = facts


class ProtectionManager:
    """Owns the guards. `protect()` is non-blocking; `on_mark()` is synchronous."""

    def __init__(
        self,
        *,
        venue: ExchangePort,
        store: Store,
        budget: OrderBudget,
        clock: Clock,
        events: EventBus,
        config: ProtectionConfig,
        token: str,
        markets: Mapping[str, Market],
        call_stats: CallStats | None = None,
        requests_used: Callable[[], float] | None = None,
    ):
        self.venue = venue
        # The fullest of the venue's request budgets, as a share used (0..1): look-ups grow sparse when high.
        self.requests_used = requests_used if requests_used is not None else lambda: 0.0
        self.store = store
        self.budget = budget
        self.clock = clock
        self.events = events
        self.config = config
        self.token = token
        self.markets = markets
        capabilities = venue.capabilities()
        self.kind = config.trailing_kind(capabilities)
        self.read_after_write_seconds = capabilities.read_after_write_seconds
        self.stream_new_proves_live = capabilities.stream_new_proves_live
        self.call_stats = call_stats if call_stats is not None else CallStats()
        # The guards' writes of confirmed facts and order states, one statement per event-loop turn: a
        # wave confirms a hundred stops at once, a restart verifies a thousand positions.
        self.facts_writer: CoalescingWriter[int, ProtectionFactsRow, PositionStatus] = CoalescingWriter(
            self._write_facts_batch, name="protection-facts"
        )
        self.order_status_writer: CoalescingWriter[str, OrderStatusRow, None] = CoalescingWriter(
            self._write_order_statuses, name="order-statuses"
        )
        # Our stops whose latest word on the account stream is NEW (live), by client id: any later word
        # (filled, fired, cancelled, expired) or a gap in the stream forgets it (`note_streamed`).
        self.streamed_live: OrderedDict[str, Order] = OrderedDict()
        # Stops in doubt that a listing of the venue's open orders, asked a read lag after the doubt came,
        # showed live: taken as the venue's word by their guards' next look (its look-up by id may keep
        # failing while listings answer: the position stayed uncovered, the breaker paused entries).
        self.listed_live: OrderedDict[str, tuple[Order, float]] = OrderedDict()  # id → (order, asked at)
        self.timeouts = EventCounter()
        # Protective order sends and those that failed (refused, timed out, outcome unknown): the breaker's
        # error rate.
        self.protective_attempts = EventCounter()
        self.protective_failures = EventCounter()
        self.order_round_trip_seconds = (
            0.0  # moving average of answered create_order calls (budget look-ahead)
        )
        self._records_in_flight: set[asyncio.Future[Any]] = set()  # `record_surely`
        self.stopped = False  # no guard runs any more: nothing may act in this manager's name
        self.moves_frozen = False  # stopping: managed moves already sent finish, no new one is sent
        self.announced: set[str] = set()  # order ids logged as created / restored in this run
        # The fired stops whose close at market was said (ERROR, event): once per stop, across protection
        # restarts too (the next manager's guard said it again, r93).
        self.stuck_said: set[str] = set()
        self.guards: dict[int, PositionGuard] = {}
        self.by_symbol: dict[str, PositionGuard] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._close_generations: dict[int, int] = {}
        self._background: set[asyncio.Task[Any]] = set()
        # Positions filled since the venue's positions were last read for their liquidation price, and the
        # read that will (`_read_liquidations`).
        self._liquidation_unread: set[int] = set()
        self._liquidation_read: asyncio.Task[None] | None = None
        # Filled positions whose first hard stop waits for the read of their liquidation price (by id: set
        # once it is read, or the read failed), and the leverage the venue last stated by symbol.
        self._liquidation_known: dict[int, asyncio.Event] = {}
        self.leverage_seen: dict[str, int] = {}
        # The account stream's liquidation price of a position it pushed before a guard held it (by symbol:
        # its side, the price, the venue's event time), for that guard.
        self.streamed_liquidation: dict[str, tuple[PositionSide, Decimal, float]] = {}
        # Symbols whose size the account stream told while no guard had them (an entry's fill on its way,
        # and maybe someone else's order beside it): the guard to come asks the venue once it exists.
        self.sized_unguarded: dict[str, tuple[PositionSide, Decimal]] = {}
        # Stops of ours still live on symbols whose positions ended, being cancelled again (by symbol).
        self.leftovers: dict[str, dict[str, float | None]] = {}
        self.foreign_stops_seen = 0  # open stops on the account not ours, at the last reconcile pass
        # Open orders another installation of this program (another database's token) holds on the account,
        # by token, at the last reconcile pass: two engines trade one account (`saw_other_installations`).
        self.other_installations: dict[str, int] = {}
        # Symbols another installation's orders were seen on, while the venue holds a position there: its
        # position stays its own through a moment without an order of its there (a stop being replaced, one
        # TRIGGERING, one not readable yet): adopted then, it got a second pair of stops (r74).
        self.other_installation_symbols: set[str] = set()
        # This database's orders for positions recorded under another account identity (another API key of
        # the same venue account): left alone (`saw_other_identities`).
        self.other_identity_orders: set[str] = set()
        self._other_identities: set[str] = set()
        self._told_recorded: dict[int, set[str]] = {}  # the recorded stops told to the venue, by position
        self._unfinished_told: set[str] = set()  # fired stops of closed positions already said (once each)
        # Stops the venue answered placed, listed, or the record holds open: "unknown order" to a cancel of
        # one proves nothing (`cancel_by_id`), whatever became of its `confirmed` since (a listing's lag, a
        # doubt). Handed to the next manager with the stops it was still cancelling.
        self.placed_ids: set[str] = set()
        # How a stop a listing had left out had ended before our cancel reached it (None: the venue did not
        # know it), for the cancels that ask (`cancel_by_id(tell_end=True)`); absent: our cancel ended it.
        self.ended_before_cancel: dict[str, OrderStatus | None] = {}
        # Those of them being cancelled that neither a cancel nor a look-up has found, since when.
        self.placed_unseen: dict[str, float] = {}
        self._cancel_failure_said: dict[str, float] = {}  # failing cancels, by id: when last said (monotonic)
        self.handed_over: dict[str, dict[str, float | None]] = {}  # set by `stop`
        # Set by `stop`: `never_taken()` and `confirmed_within_lag()`, for the manager that replaces this one.
        self.handed_over_unsent: frozenset[str] = frozenset()
        self.handed_over_confirmed: dict[str, float] = {}
        self.handed_over_vouched: dict[str, float] = {}
        self.handed_over_left: dict[str, float] = {}
        self.handed_over_unclear: frozenset[str] = frozenset()
        # What the manager this one replaces knew of its stops and the venue cannot tell yet (set before any
        # position is protected here; `_restore`): ids it never took, and ids it confirmed within its lag.
        self.known_unsent: frozenset[str] = frozenset()
        self.known_confirmed: Mapping[str, float] = {}
        self.known_left_at: Mapping[str, float] = {}
        # Sends whose answer never came (lost, or cut off by the restart): sent again at once with their id.
        self.known_unclear: frozenset[str] = frozenset()
        self._sweepers: dict[str, asyncio.Task[None]] = {}
        self._reconcile_requested = asyncio.Event()
        # The account stream may have missed events (a gap told at `_gap_noted_at`, monotonic; from
        # `_unheard_since`) and no listing of the venue asked since has answered: see `stream_gap`.
        self._gap_noted_at: float | None = None
        self._unheard_since: float | None = None
        self._doubt_came_at: float | None = None  # `stops_in_doubt_since`
        self._doubt_timer: asyncio.Task[None] | None = None
        # Protective orders whose answer is awaited, and whether a stop is letting them finish (`stop`).
        self._sending = 0
        self._nothing_sending = asyncio.Event()
        self._nothing_sending.set()
        self.draining = False

    # --- lifecycle -----------------------------------------------------------------------------------

    def failing_guards_try_now(self, recovered: PositionGuard) -> None:
        """`recovered`'s pass went through after failed ones: the venue takes stops again, maybe. The guards
        backing off on their own clock try now, not when a doubled backoff says: an operator cleared a burst
        of refused stops and watched positions stay naked 16 to 30 s more, each on its own retry clock. (Not
        those held by the venue's word: a Retry-After or a ban's end is waited out.)"""
        for guard in self.guards.values():
            if guard is not recovered and guard.backing_off and not guard.closed:
                guard.wake.set()

    @property
    def trails_managed(self) -> bool:
        """Whether any trail here is the engine's own: the mode's, or a position's kept from its opening."""
        return self.kind is TrailingKind.MANAGED or any(
            g.kind is TrailingKind.MANAGED for g in self.guards.values()
        )

    def protect(
        self,
        position: PositionRecord,
        *,
        filled_at: float | None = None,
        live_orders: Iterable[OrderRecord] = (),
        trail_record: TrailingStateRecord | None = None,
        venue_open_orders: Mapping[str, Order] | None = None,
        attached_stop_loss: OrderRecord | None = None,
        used_order_ids: Iterable[str] = (),
        naked_since: datetime | None = None,
        fresh_fill: bool = False,
    ) -> PositionGuard:
        """Start guarding a filled position. Restored positions pass their DB orders and trail record;
        those orders are verified against the venue before anything new is sent: an order found in
        `venue_open_orders` (the venue's open protective orders, read once for every position at start-up)
        is confirmed by it, and only the others are looked up one by one. `attached_stop_loss`: the hard
        stop that rode on the entry order (a venue with `attach_stop_to_entry`), verified like a restored
        one and replaced from the fill price when it is more than a tick off. `naked_since`: a restored
        position never protected, with nothing recorded of it: without stops since then if any of its stops
        has to be sent (see `PositionGuard.naked_since`). `fresh_fill`: a fill this engine's entry just got;
        its first hard stop may wait for the venue's liquidation price (`liquidation_read_for`)."""
        if self.stopped:  # a guard here would run unseen by the manager that replaced this one
            raise RuntimeError(f"protection manager stopped: position {position.id} not guarded here")
        if position.id in self.guards:
            return self.guards[position.id]
        market = self.markets[position.symbol]
        kind = self.kind
        if trail_record is not None and trail_record.mode == TrailingKind.MANAGED.value:
            # A position keeps the trail it was opened with: the mode applies to new positions. Restored as
            # native after a switch, a managed trail's STOP_MARKET passed for a trailing stop and nothing
            # moved it again (r79: 5.6 % past it for 77 s, TS 100 % said).
            kind = TrailingKind.MANAGED
        guard = PositionGuard(
            self,
            position,
            market,
            kind,
            filled_at=self.clock.monotonic() if filled_at is None else filled_at,
        )
        guard.naked_since = naked_since
        guard.fresh_fill = fresh_fill
        if position.unprotected_since is not None:
            guard.resume_unprotected_since(position.unprotected_since)
        elif position.has_stop_loss and position.trailing_in_place:
            # Covered when last recorded: should this guard find its stops unconfirmed, they are missing from
            # now on, not since the fill (a restart showed 2m31s unprotected for one covered a second before).
            guard.covered_until_now()
        from_fill = guard.stop_loss.price
        self._restore(guard, position, live_orders, trail_record)
        guard.skip_used_ids(used_order_ids)
        # Its closes too: a close id sent again (an earlier close refused or expired, then a restart) would
        # be two venue orders under one record.
        self._close_generations[position.id] = max(
            self._close_generations.get(position.id, 0), guard.unused_generation(OrderPurpose.CLOSE)
        )
        if attached_stop_loss is not None and from_fill is not None:
            self._restore(guard, position, [attached_stop_loss], None)
            guard.correct_attached_stop_loss(from_fill)
        if venue_open_orders is not None:
            self._confirm_from_snapshot(guard, position, live_orders, venue_open_orders)
        else:
            self._unverified_on_record(guard, live_orders)
        self.guards[position.id] = guard
        self.by_symbol[position.symbol] = guard
        self._run_guard(guard, guard.run())
        told = self.sized_unguarded.pop(position.symbol, None)
        if told is not None and told != (guard.side, guard.quantity):
            # The stream told another size before this guard existed: the venue is read now. Another
            # client's order beside our entry (385 where ours was 285) was seen only at the next periodic
            # pass, the stops short of the position for up to `reconcile_seconds` (r82).
            self.request_reconcile()
        streamed = self.streamed_liquidation.pop(position.symbol, None)
        if (
            streamed is not None
            and streamed[0] is guard.side
            and self.clock.now() - streamed[2] < STREAMED_LIQUIDATION_FRESH_SECONDS
        ):
            guard.submit(LiquidationStated(price=streamed[1]))
        if self.venue.capabilities().liquidation_price_streamed:
            return guard  # (told with the fill's size, before this guard or to it)
        leverage = self.leverage_seen.get(position.symbol)
        if leverage is None and isinstance(self.venue, StatesLeverages):
            leverage = self.venue.stated_leverages.get(position.symbol)  # (read while it was flat)
        if fresh_fill and leverage is not None and guard.stop_may_be_near_liquidation(leverage):
            self._liquidation_known[position.id] = asyncio.Event()
        self._liquidation_unread.add(position.id)
        if self._liquidation_read is None or self._liquidation_read.done():
            self._liquidation_read = self._in_background(self._read_liquidations(), "liquidation-read")
        return guard

    async def _read_liquidations(self) -> None:
        """The venue's positions read once for the liquidation prices of those just filled (the positions of
        a wave together): a hard stop beyond one is moved at once, not at the next reconcile pass (up to
        `reconcile_seconds` with a stop that never fires, counted covered: a reviewer, 4.5–10.6 s after each
        fill on both venues, and a 100x long closed 0.06 above its liquidation price). Where the account
        stream pushes the figure with the fill (Bybit, the sim) nothing is read: Binance's carries none. A
        read that fails is left to the reconciler's next pass."""
        await self.clock.sleep(LIQUIDATION_READ_GATHER_SECONDS)
        failed = 0
        while self._liquidation_unread and not self.stopped:
            wanted, self._liquidation_unread = self._liquidation_unread, set()
            try:
                held = await self.read(self.venue.fetch_positions, "fetch_positions", Lane.READ)
            except (ExchangeError, TimeoutError) as exc:
                # The hard stops that waited for it go as configured now (never held back by a failing
                # read); the read is tried again, and a stop it finds too near is moved then.
                self._liquidation_told(wanted)
                failed += 1
                if failed >= LIQUIDATION_READ_ATTEMPTS:
                    log.warning(
                        "liquidation prices of %s not read (%s); the next reconcile pass reads them",
                        counted(len(wanted), "position"),
                        exc,
                    )
                    return
                log.info(
                    "liquidation prices not read (%s): read again in %gs", exc, LIQUIDATION_READ_RETRY_SECONDS
                )
                self._liquidation_unread |= wanted
                await self.clock.sleep(LIQUIDATION_READ_RETRY_SECONDS)
                continue
            for position in held:
                self.leverage_seen[position.symbol] = position.leverage
                guard = self.by_symbol.get(position.symbol)
                liquidation = position.liquidation_price
                if (
                    guard is None
                    or guard.position_id not in wanted
                    or guard.closed
                    or position.side.value != guard.side.value
                    or liquidation is None
                ):
                    continue
                await guard.liquidation_read(liquidation)
            self._liquidation_told(wanted)

    def leverage_changed(self, symbol: str, leverage: int) -> None:
        """The venue says the symbol's leverage changed (Binance's stream): the position's liquidation price
        moved with it, and is read now, not at the next reconcile pass (a stop the new figure passed lay
        beyond it 9.3 s, counted covered: a reviewer)."""
        self.leverage_seen[symbol] = leverage
        guard = self.by_symbol.get(symbol)
        if guard is None or guard.closed or self.stopped:
            return
        log.info(
            "%s: the venue says its leverage is now %dx; reading its liquidation price", symbol, leverage
        )
        self._liquidation_unread.add(guard.position_id)
        if self._liquidation_read is None or self._liquidation_read.done():
            self._liquidation_read = self._in_background(self._read_liquidations(), "liquidation-read")

    def _liquidation_told(self, position_ids: Iterable[int]) -> None:
        """The hard stops of these positions that wait for their liquidation price may go now."""
        for position_id in position_ids:
            event = self._liquidation_known.pop(position_id, None)
            if event is not None:
                event.set()

    async def liquidation_read_for(self, guard: PositionGuard) -> None:
        """Before a position's first hard stop is written and sent, where the venue's stream carries no
        liquidation price and the leverage the venue last stated for the symbol puts the stop near it: wait
        for the read of it after the fill (a tenth of a second and a round trip; at most half the grace
        period), so the stop goes once, inside it. Sent as configured and moved a moment later, every
        position of a high-leverage wave took a third order: 95 positions at up to 125x filled Binance's
        10-second order window, 70 waited uncovered past grace for it, and the breaker paused entries (a
        reviewer). Not where the symbol's leverage is not known yet (judged from its maximum, every first
        hard stop of a symbol allowing 25x or more waited a round trip: at 2 s, a 50-signal wave took 9.3 s
        to protect where it took 4.6 s)."""
        event = self._liquidation_known.get(guard.position_id)
        if event is None:
            return
        cap = float(self.config.grace_seconds) / 2
        if LIQUIDATION_READ_GATHER_SECONDS + 2 * self.order_round_trip_seconds > cap:
            # The read cannot answer within the wait: the stop goes now, and is moved after the read (at a
            # 2 s round trip, waiting held every such hard stop back 4.1 s of a 5 s grace: a reviewer).
            self._liquidation_known.pop(guard.position_id, None)
            return
        guard.awaiting_liquidation = True
        try:
            await wait_event(self.clock, event, float(self.config.grace_seconds) / 2)
        finally:
            guard.awaiting_liquidation = False
            self._liquidation_known.pop(guard.position_id, None)

    def _run_guard(self, guard: PositionGuard, run: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(run, name=f"protect-{guard.symbol}-{guard.position_id}")
        self._tasks[guard.position_id] = task
        task.add_done_callback(functools.partial(self._guard_ended, guard))

    def tell_recorded(self, position: PositionRecord, live_orders: Iterable[OrderRecord]) -> None:
        """Tell a venue whose stops anyone may change (`ChecksRecordedStops`) what the records say each stop
        of `position` that may be live was set to: before the start reads the venue's open stops, so the
        list names them (and again as each guard restores them: the same facts)."""
        if not isinstance(self.venue, ChecksRecordedStops):
            return
        for record in live_orders:
            key = parse_client_order_id(record.client_order_id, self.token)
            if key is None or key.position_id != position.id or key.purpose not in _STOP_PURPOSES:
                continue
            self._told_recorded.setdefault(position.id, set()).add(record.client_order_id)
            self.venue.expect_recorded(
                record.client_order_id,
                side=_order_side(record.side),
                stop_price=record.trigger_price,
                callback_rate=record.callback_percent,
                activation_price=record.activation_price,
                trail_distance=record.trail_distance,
                symbol=position.symbol,
                recorded_at=record.created_at.timestamp(),
            )

    def _restore(
        self,
        guard: PositionGuard,
        position: PositionRecord,
        live_orders: Iterable[OrderRecord],
        trail_record: TrailingStateRecord | None,
    ) -> None:
        live_orders = list(live_orders)
        self.tell_recorded(position, live_orders)
        for record in live_orders:
            key = parse_client_order_id(record.client_order_id, self.token)
            if key is None or key.position_id != position.id:
                continue
            if record.status is OrderRecordStatus.OPEN or record.client_order_id in self.known_confirmed:
                self.placed_ids.add(record.client_order_id)  # (the venue answered it placed, or listed it)
            if key.purpose is OrderPurpose.STOP_LOSS:
                target = guard.stop_loss
            elif key.purpose is OrderPurpose.TRAILING_STOP:
                target = guard.trailing_stop
                guard._next_trail_generation = max(guard._next_trail_generation, key.generation + 1)
            else:
                continue
            managed_trail = guard.kind is TrailingKind.MANAGED and key.purpose is OrderPurpose.TRAILING_STOP
            if (
                target.client_order_id is not None
                and key.generation != target.generation
                and not managed_trail
            ):
                # Two generations of one kind that may both be live: a resize (or a re-placement) the last
                # run left under way. The older stays ours until the newer is live, then is cancelled
                # (make-before-break): taken for a duplicate at once, it left the position without that
                # stop while the newer was still being proven absent. (A managed trail's generations are
                # its moves: the trail's record and the move in flight say which is which, below.)
                if key.generation > target.generation:  # the one kept so far is the older
                    older_id, older_generation, older_sent = (
                        target.client_order_id,
                        target.generation,
                        target.sent_at,
                    )
                else:
                    older_id, older_generation = record.client_order_id, key.generation
                    older_sent = self._sent_at_of(record)
                guard._superseded.append(
                    ProtectiveOrder(
                        key.purpose,
                        generation=older_generation,
                        client_order_id=older_id,
                        maybe_sent=True,
                        sent_at=older_sent,
                    )
                )
            if target.client_order_id is None or key.generation > target.generation:
                target.client_order_id = record.client_order_id
                target.generation = key.generation
                confirmed_at = self.known_confirmed.get(record.client_order_id)
                if confirmed_at is not None:  # the venue's own answer, which no read can check yet
                    target.confirmed, target.confirmed_at = True, confirmed_at
                    target.maybe_sent = False
                else:
                    # The last manager knew the venue never took it (refused "not now", or held back by
                    # the order budget): sent as soon as the guard may, not after the venue's read lag.
                    target.maybe_sent = record.client_order_id not in self.known_unsent
                    if record.client_order_id in self.known_unclear:  # its answer never came: once more
                        target.may_send_again = True
                        target.unclear_at = self.clock.monotonic()
                # When it was sent, on our monotonic clock: a "not found" within the venue's read lag of it
                # proves nothing. The last manager knew when it left; the record, when it was written.
                left_at = self.known_left_at.get(record.client_order_id)
                target.sent_at = left_at if left_at is not None else self._sent_at_of(record)
                if record.trigger_price is not None and key.purpose is OrderPurpose.STOP_LOSS:
                    target.price = record.trigger_price
                if guard.kind is TrailingKind.MANAGED and key.purpose is OrderPurpose.TRAILING_STOP:
                    target.price = record.trigger_price
                elif key.purpose is OrderPurpose.TRAILING_STOP and record.type == "trailing_stop_market":
                    # The venue's trail is the one sent, not one worked out afresh from today's settings:
                    # its activation as recorded, or none (armed at the mark: `arm_now`). Taken as waiting
                    # for an activation it never had, its firing went unwatched and the screen said "waiting".
                    target.arm_now = record.activation_price is None
                    if record.callback_percent is not None:  # (what the venue was sent, sent again)
                        guard.callback_percent = record.callback_percent
                    if record.activation_price is not None:
                        target.price = record.activation_price
                        if position.trailing_activated and guard.trails_on_mark:
                            # A mark reached its activation under the last engine: the venue armed it.
                            guard._native_armed_of = record.client_order_id
        if (
            guard.kind is TrailingKind.MANAGED
            and trail_record is not None
            and trail_record.mode == TrailingKind.MANAGED.value
        ):
            try:
                guard.trail = _restored_trail(guard, trail_record)
                if guard.trail.phase is trailing.TrailingPhase.MOVING:
                    # A place or move was in flight when the last engine stopped: its new stop may be live.
                    # Resolved by its id before anything else (`_resume_move`); none recorded → it died.
                    guard._restored_move = self._move_in_flight(guard, live_orders, trail_record)
                    if guard._restored_move is None:
                        guard.trail = trailing.on_stop_failed(guard.trail)
                else:
                    # The trail is what the database holds (it was just read from it): armed as it was, not
                    # "missing" until the first pass writes it again (every row MISSING after a restart).
                    guard.trail_persisted = True
                if (
                    trail_record.stop_order_client_id
                    and guard.trailing_stop.client_order_id != trail_record.stop_order_client_id
                ):
                    key = parse_client_order_id(trail_record.stop_order_client_id, self.token)
                    guard.trailing_stop.client_order_id = trail_record.stop_order_client_id
                    guard.trailing_stop.generation = key.generation if key else 0
                    # (The send time the loop above gave it was the move's, a later record's.)
                    guard.trailing_stop.sent_at = self.known_left_at.get(trail_record.stop_order_client_id)
                    guard.trailing_stop.price = trail_record.current_stop_price
                    guard.trailing_stop.maybe_sent = True
                restored_move = guard._restored_move
                if restored_move is not None and (
                    guard.trailing_stop.client_order_id == restored_move.client_order_id
                ):
                    # The first placement was in flight: the trail has no stop of its own yet.
                    guard.trailing_stop = ProtectiveOrder(OrderPurpose.TRAILING_STOP)
            except (trailing.InvalidTrailingState, trailing.InvalidTrailingParams) as exc:
                log.error(
                    "%s: persisted trailing state refused (%s); starting the trail afresh from the fill price",
                    position.symbol,
                    exc,
                )
                self.spawn_event_write(
                    Severity.ERROR,
                    "trail_restore_refused",
                    f"{position.symbol}: {exc}",
                    position.symbol,
                    position.id,
                )
                guard.trail = trailing.TrailingState.start(guard.trail_params())
                guard._restored_move = None

    def _unverified_on_record(self, guard: PositionGuard, live_orders: Iterable[OrderRecord]) -> None:
        """Restored with no venue listing to check them against (a protection restart whose snapshot never
        came: a ban): the stops the record has live are in doubt until their look-ups answer, uncovered,
        but *unverified*, not missing. Every row read MISSING while the venue held all 150 stops, which
        invites a stop by hand beside the live one (an operator, `r` during a ban)."""
        recorded_live = {r.client_order_id for r in live_orders if r.status is OrderRecordStatus.OPEN}
        now = self.clock.monotonic()
        for order in (guard.stop_loss, guard.trailing_stop):
            if order.client_order_id in recorded_live and order.maybe_sent and not order.confirmed:
                order.doubt(now)

    def _sent_at_of(self, record: OrderRecord) -> float:
        """When a recorded order left, on our monotonic clock, as far as its record tells (its creation)."""
        return monotonic_of(self.clock, record.created_at.timestamp())

    def _move_in_flight(
        self,
        guard: PositionGuard,
        live_orders: Iterable[OrderRecord],
        trail_record: TrailingStateRecord,
    ) -> ProtectiveOrder | None:
        """The new stop of the move a `moving` trail was making: the latest trailing-stop generation written
        ahead after the trail's recorded stop (every send is recorded before it goes out), if it may be live."""
        recorded = (
            parse_client_order_id(trail_record.stop_order_client_id, self.token)
            if trail_record.stop_order_client_id
            else None
        )
        latest: OrderRecord | None = None
        latest_generation = recorded.generation if recorded is not None else -1
        for record in live_orders:
            key = parse_client_order_id(record.client_order_id, self.token)
            if (
                key is None
                or key.position_id != guard.position_id
                or key.purpose is not OrderPurpose.TRAILING_STOP
                or record.trigger_price is None
                or key.generation <= latest_generation
            ):
                continue
            latest, latest_generation = record, key.generation
        if latest is None:
            return None
        return ProtectiveOrder(
            OrderPurpose.TRAILING_STOP,
            generation=latest_generation,
            client_order_id=latest.client_order_id,
            price=latest.trigger_price,
            maybe_sent=True,
            # When it left, as the last manager knew it (a protection restart). A crash's successor knows
            # only that it left before the crash, so before now: the record's writing came before any wait
            # for order budget or a ban's end, and a move that waited 9 s was proven "absent" while the
            # venue's reads still lagged its placement, given up (recorded `canceled` while live), made
            # again, and its first new stop cancelled later as a duplicate. The old stop protects while
            # its absence is proven a read lag from now.
            sent_at=self.known_left_at.get(latest.client_order_id, self.clock.monotonic()),
            recorded_id=latest.client_order_id,
        )

    def _confirm_from_snapshot(
        self,
        guard: PositionGuard,
        position: PositionRecord,
        live_orders: Iterable[OrderRecord],
        venue_open_orders: Mapping[str, Order],
    ) -> None:
        """Confirm restored orders the venue listed as open, with no round trip; write only what changed."""
        now = self.clock.monotonic()
        records = {r.client_order_id: r for r in live_orders}
        for order in (guard.stop_loss, guard.trailing_stop):
            cid = order.client_order_id
            found = venue_open_orders.get(cid) if cid else None
            if cid is None or found is None or not order.maybe_sent:
                continue
            order.confirmed, order.confirmed_at, order.maybe_sent = True, now, False
            self.placed_ids.add(cid)
            order.live_since = found.created_at or None
            guard.report.restored_orders += 1
            record = records.get(cid)
            # (A trail recorded without the distance the venue took, before the column existed: recorded
            # now, or every later start would judge it by the entry price, not by what it was set to.)
            if (
                record is None
                or record.status is not OrderRecordStatus.OPEN
                or (record.trail_distance is None and found.trail_distance is not None)
            ):
                self.spawn_order_status(
                    OrderStatusRow(
                        cid, OrderRecordStatus.OPEN, found.venue_order_id, trail_distance=found.trail_distance
                    )
                )
        move = guard._restored_move
        if move is not None and move.client_order_id in venue_open_orders:
            # The move the last engine left in flight reached the venue: its guard adopts it first thing.
            found = venue_open_orders[move.client_order_id]
            move.confirmed, move.confirmed_at, move.maybe_sent = True, now, False
            self.placed_ids.add(found.client_order_id)
            record = records.get(move.client_order_id)
            if record is None or record.status is not OrderRecordStatus.OPEN:
                self.spawn_order_status(
                    OrderStatusRow(move.client_order_id, OrderRecordStatus.OPEN, found.venue_order_id)
                )
        # What the database says now: the first pass writes only if the confirmed facts differ from it.
        guard.prime_written_facts(position)
        guard.size_changed = position.size_changed  # its PnL stays unknown across restarts

    async def record_surely(self, write: Awaitable[_T]) -> _T:
        """A record the next manager must find: run to its end even if the caller is cancelled (a protection
        restart stops this manager's guards), and waited for by `stop` before it hands over."""
        task = asyncio.ensure_future(write)
        self._records_in_flight.add(task)
        task.add_done_callback(self._records_in_flight.discard)
        return await asyncio.shield(task)

    def spawn_order_status(self, row: OrderStatusRow) -> None:
        """Record an order's state without making the caller wait (coalesced; failures are logged)."""

        async def write() -> None:
            try:
                await self.order_status_writer.write(row.client_order_id, row)
            except Exception:
                log.exception("could not record order %s as %s", row.client_order_id, row.status.value)

        self._in_background(write(), f"order-status-{row.client_order_id}")

    def _guard_ended(self, guard: PositionGuard, task: asyncio.Task[None]) -> None:
        """A guard's task ended. With its position closed, or the manager stopping, that is its end. Otherwise
        it died (a bug; a cancellation nobody asked for) while its position is open: said at CRITICAL (once
        a minute for a guard that keeps dying), its stops count unverified at once (nothing has looked at
        them since), and it is started again, a backoff step later each time. Before, a dead guard was one
        log line: its position kept the coverage it had when it died, and a stop cancelled after that was
        never placed again."""
        if self.stopped or guard.closed or self._tasks.get(guard.position_id) is not task:
            return
        why = "cancelled" if task.cancelled() else repr(task.exception())
        guard.restarts += 1
        delay = self.backoff(guard.restarts - 1)
        guard.doubt_every_stop()
        self._spawn_facts_write(guard)  # the records say so now, not at its next pass (a backoff later)
        now = self.clock.monotonic()
        if guard.restart_said_at is None or now - guard.restart_said_at >= GUARD_RESTARTS_SAID_EVERY_SECONDS:
            guard.restart_said_at = now
            message = (
                f"{guard.symbol}: its protection task ended with the position open ({why}; {guard.restarts} "
                f"time(s)); its stops count unverified until it is started again, in {delay:.1f}s, and finds them"
            )
            log.critical("%s", message, exc_info=task.exception() if not task.cancelled() else None)
            self.spawn_event_write(
                Severity.CRITICAL, "guard_restarted", message, guard.symbol, guard.position_id
            )
        self._run_guard(guard, self._run_again(guard, delay))

    def _in_background(self, work: Coroutine[Any, Any, _T], name: str) -> asyncio.Task[_T]:
        """Run `work` as a task the manager tracks until it ends (a stop cancels and awaits them all)."""
        task = asyncio.create_task(work, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _spawn_facts_write(self, guard: PositionGuard) -> None:
        async def write() -> None:
            try:
                await guard.write_facts_now()
            except Exception:
                log.exception("%s: could not record its stops as unverified", guard.symbol)

        self._in_background(write(), f"facts-{guard.position_id}")

    async def _run_again(self, guard: PositionGuard, delay: float) -> None:
        await self.clock.sleep(delay)
        await guard.run()

    async def cancel_by_id(
        self, symbol: str, cid: str, *, sent_at: float | None = None, tell_end: bool = False
    ) -> bool:
        """Cancel one of our orders by client id: True when it is gone from the venue (cancelled now, or
        already ended), False when the venue did not say so. "Unknown order" within the venue's
        read-after-write lag of its send (`sent_at`) proves nothing: it may show up a moment later. Nor
        does a cancel that leaves a fired stop TRIGGERING: its fill, reduce-only, would still come, and
        would close a new position of the same side on the symbol (a soak saw 1354 short cut to 27.8)."""
        # "Unknown order" is judged by when the cancel left (the venue judged it on arrival, a trip before
        # its answer): judged on the answer's arrival, a cancel that reached the venue before the stop
        # showed was taken for proof it was gone, and the live stop was recorded cancelled and forgotten.
        asked_at = self.clock.monotonic()
        asked_epoch = self.clock.now()
        try:
            # Idempotent like a read: sent again once its answer is late, the first answer settles it (a
            # second cancel of a cancelled order answers "unknown order": gone). A lost answer held the
            # position's other cancels, and their retries, for the whole call budget.
            final = await self.read(lambda: self.venue.cancel_order(symbol, cid), "cancel_order")
            await self._record_cancel_outcome(cid, record_status_of(final.status))
            ours = final.status is OrderStatus.CANCELED and final.updated_at >= asked_epoch
            if tell_end and final.status.is_final and not ours:
                self.ended_before_cancel[cid] = final.status  # (it had ended before this cancel came)
            if final.status is OrderStatus.FILLED:  # a stop of ours that ended its position, maybe
                key = parse_client_order_id(cid, self.token)
                if key is not None and key.purpose in _STOP_PURPOSES:
                    # (only a record closed `closed_on_exchange` for want of this evidence takes it: r74,
                    # a restart within the stop's read lag left it so, the settlement's look-ups lost)
                    self.settle_exit_soon(key.position_id, key.purpose, final)
            if not final.status.is_final:  # fired, not finished: it can still fill, cancelled or not
                if cid not in self._unfinished_told:  # said once: the sweep asks again every few seconds
                    self._unfinished_told.add(cid)
                    log.warning(
                        "%s: %s fired and has not finished on the venue; no new position on %s until it has",
                        symbol,
                        cid,
                        symbol,
                    )
                return False
        except NotFound:
            if sent_at is not None and asked_at - sent_at < self.absence_window():
                log.info("%s: %s not visible yet to cancel (read-after-write lag); trying again", symbol, cid)
                return False
            if tell_end:
                self.ended_before_cancel[cid] = None  # unknown to the venue: it ended before (how: unsaid)
            if cid in self.placed_ids and self.venue.capabilities().stops_are_orders:
                # (Where stops are the position's own fields, Bybit's, there is no order to lag: a stop the
                # position does not hold is gone.)
                gone = await self._placed_stop_ended(symbol, cid)
                if not gone:
                    self.ended_before_cancel.pop(cid, None)  # (not settled: asked again by the next cancel)
                return gone
            await self._record_cancel_outcome(cid, OrderRecordStatus.CANCELED)
        except (ExchangeError, TimeoutError) as exc:
            level = logging.DEBUG if self.cancel_failure_said_lately(cid) else logging.WARNING
            log.log(level, "%s: cancelling %s failed (%s); trying again", symbol, cid, _short(exc))
            return False
        self._cancel_failure_said.pop(cid, None)
        self._gone(cid)
        return True

    def note_placed(self, order: Order) -> None:
        """The venue's word that our stop `order` is live (the account stream's NEW, a listing): "unknown
        order" to its cancel is no proof from now on, and its record says `open`, for a next process too
        (its answer lost, the record said `pending`, and an engine restart took its "unknown order" for
        proof: r85)."""
        cid = order.client_order_id
        if cid in self.placed_ids:
            return
        self.placed_ids.add(cid)

        async def write() -> None:
            # Only over a record that does not know it yet: written blindly, in the background, a NEW
            # overtook the fill recorded since and set a filled stop's record back to `open`.
            # (Not journaled: the word is kept in memory meanwhile, and a database down is said elsewhere.)
            try:
                await self.store.mark_order_live_if_unsettled(cid, order.venue_order_id or None)
            except Exception as exc:
                log.info("order %s not recorded as live (%s)", cid, type(exc).__name__)

        self._in_background(write(), f"order-live-{cid}")

    def _gone(self, cid: str) -> None:
        self.placed_ids.discard(cid)
        self.placed_unseen.pop(cid, None)

    def forget_placed(self, position_id: int, keep: Collection[str]) -> None:
        """The ended position's ids, but those still being cancelled (`keep`): every generation it used,
        the current ones and those that ended before (a stop that filled, one proven gone)."""
        for cid in [c for c in self.placed_ids if c not in keep]:
            key = parse_client_order_id(cid, self.token)
            if key is not None and key.position_id == position_id:
                self.placed_ids.discard(cid)

    async def _placed_stop_ended(self, symbol: str, cid: str) -> bool:
        """A stop the venue answered placed, whose cancel answered "unknown order" past the read lag we
        count on: gone only if its look-up by id finds it ended (its status recorded), or if neither has
        found it for PLACED_UNSEEN_LIMIT_SECONDS. Found live, the next cancel gets it."""
        now = self.clock.monotonic()
        found: Order | None
        try:
            found = await self.read(lambda: self.venue.fetch_order(symbol, cid), "fetch_order")
        except NotFound:
            first = self.placed_unseen.get(cid)
            if first is None:
                self.placed_unseen[cid] = now
                log.warning(
                    "%s: %s, which the venue answered placed, cannot be found to cancel past its read lag "
                    "(%.0fs): not taken for cancelled, and no new position on %s until it is seen ended",
                    symbol,
                    cid,
                    self.read_after_write_seconds,
                    symbol,
                )
                return False
            if now - first < PLACED_UNSEEN_LIMIT_SECONDS:
                return False
            log.warning(
                "%s: %s not found on the venue for %.0fs since; taken as ended", symbol, cid, now - first
            )
            found = None
        except (ExchangeError, TimeoutError) as exc:
            log.info("%s: looking %s up to cancel it failed (%s); trying again", symbol, cid, _short(exc))
            return False
        if found is not None and not found.status.is_final:
            log.info("%s: %s is live on the venue after all; cancelling it again", symbol, cid)
            self.placed_unseen.pop(cid, None)  # (its 120 s count from a later miss, if any)
            return False
        status = OrderRecordStatus.CANCELED if found is None else record_status_of(found.status)
        await self._record_cancel_outcome(cid, status)
        if found is not None and found.status is OrderStatus.FILLED:
            key = parse_client_order_id(cid, self.token)
            if key is not None and key.purpose in _STOP_PURPOSES:
                self.settle_exit_soon(key.position_id, key.purpose, found)
        self._gone(cid)
        self._cancel_failure_said.pop(cid, None)
        return True

    async def _record_cancel_outcome(self, cid: str, status: OrderRecordStatus) -> None:
        """What the venue said of a cancel, on the order's row. Ours by its id, a stop may have no row in
        this database (an earlier run's, a database restored from a backup): the venue's word stands, and
        the sweep goes on (the missing row ended it, and freed its symbol beside a live sibling)."""
        try:
            await self.store.set_order_status(cid, status)
        except LookupError:
            log.info("cancel: %s has no record in this database; the venue says it is %s", cid, status.value)

    def cancel_failure_said_lately(self, cid: str) -> bool:
        """Whether a failed cancel of `cid` was said within the last `REPEATED_FAILURE_SAID_EVERY_SECONDS`
        (if not, it counts as said now). Said when it begins, then once a minute while it lasts: the sweep
        and the reconciler ask again every few seconds, and the same WARNING every 5 s for minutes buried
        the rest of the log."""
        now = self.clock.monotonic()
        said = self._cancel_failure_said.get(cid)
        if said is not None and now - said < REPEATED_FAILURE_SAID_EVERY_SECONDS:
            return True
        self._cancel_failure_said[cid] = now
        return False

    def sweep_leftovers(
        self, symbol: str, orders: Mapping[str, float | None], *, at_once: bool = False
    ) -> None:
        """Stops of ours left live on a symbol whose position ended (their cancel failed, or they were
        not visible yet): cancel them again, a quarter of the grace period apart at first (`at_once`: the
        first time now), until the venue says they are gone. Until then the symbol takes no new position
        (`leftovers`). `orders`: client id → when it was sent (monotonic, None if not by this process)."""
        pending = self.leftovers.setdefault(symbol, {})
        pending.update(orders)
        # A stopped manager starts nothing: its stop has cancelled its tasks, and a sweep started after
        # (a reconcile pass that outlived it) would cancel on through a closed venue with nobody to end it.
        if symbol in self._sweepers or self.stopped:
            return
        self._sweepers[symbol] = self._in_background(self._sweep(symbol, at_once), f"sweep-{symbol}")

    def unfinished_cancels(self) -> dict[str, dict[str, float | None]]:
        """Stops of closed positions not cancelled yet, by symbol: those being swept and those whose
        guard's cancels are on their way (what a restart hands to the next manager)."""
        found = {symbol: dict(orders) for symbol, orders in self.leftovers.items() if orders}
        for guard in self.guards.values():
            if guard.retiring:  # closed, or being recorded closed
                found.setdefault(guard.symbol, {}).update(guard.retiring)
        return found

    def never_taken(self) -> frozenset[str]:
        """Ids of the open positions' stops that the venue never took, as this manager knows: refused with
        "not executed" (a 429, a ban, a network error before the send) or still waiting for the order
        budget, and not on their way (a send in flight, or cancelled in flight, is `maybe_sent`). Their
        records say `pending` (written ahead, the id kept for the retry): a restart hands this to the next
        manager, which would otherwise look them up first and wait out the venue's read-after-write lag
        (5 s on Binance) before sending them (the emulator's chaos soak saw a position 5.2 s without its
        hard stop that way)."""
        return frozenset(
            order.client_order_id
            for guard in self.guards.values()
            if not guard.closed
            for order in (guard.stop_loss, guard.trailing_stop)
            if order.client_order_id and not order.maybe_sent and not order.confirmed
        )

    def left_unsettled(self) -> dict[str, float]:
        """The open positions' stops the venue may hold but has not confirmed (`maybe_sent`), with when
        their last send left for the venue (monotonic, `ProtectiveOrder.left_at`): a restart hands them to
        the next manager, whose look-ups judge the venue's read lag from that, not from the record's
        creation (written before the send waited for budget: a "not found" within the lag was proof)."""
        now = self.clock.monotonic()
        left: dict[str, float] = {}
        for guard in self.guards.values():
            if guard.closed:
                continue
            for order in (guard.stop_loss, guard.trailing_stop, guard._restored_move):
                if order is None:
                    continue
                at = order.left_at(now)
                if order.client_order_id and order.maybe_sent and not order.confirmed and at is not None:
                    left[order.client_order_id] = at
        return left

    def unclear_sends(self) -> frozenset[str]:
        """The open positions' stops whose last send had no clear answer and may be sent again once with
        their id (`ProtectiveOrder.may_send_again`): a restart hands them to the next manager, which would
        otherwise wait out the venue's read lag before sending one that never reached it (the Binance-wire
        soak: 8.6 s without a trailing stop)."""
        return frozenset(
            order.client_order_id
            for guard in self.guards.values()
            if not guard.closed
            for order in (guard.stop_loss, guard.trailing_stop)
            if order.client_order_id
            and order.may_send_again
            and not order.confirmed
            and order.fired_at is None
        )

    def confirmed_within_lag(self) -> dict[str, float]:
        """The open positions' stops the venue's answer confirmed less than its read-after-write lag ago, with
        when (monotonic): a restart hands them to the next manager, which cannot read them back before the
        lag ends. It counted such a position uncovered for up to 5 s after the restart, past grace: a false
        alarm for the gauge and the breaker. (Older confirmations are verified on the venue as ever; the
        reconciler checks these once its list can show them.)"""
        return self.confirmed_stops(within=self.absence_window())

    def confirmed_stops(
        self, *, within: float | None = None, without: Collection[int] = ()
    ) -> dict[str, float]:
        """The open positions' confirmed stops (those confirmed less than `within` seconds ago; not those of
        the positions `without`), with when (monotonic)."""
        now = self.clock.monotonic()
        return {
            order.client_order_id: order.confirmed_at
            for guard in self.guards.values()
            if not guard.closed and guard.position_id not in without
            for order in (guard.stop_loss, guard.trailing_stop)
            if order.client_order_id
            and order.confirmed
            and (within is None or now - order.confirmed_at < within)
        }

    async def _sweep(self, symbol: str, at_once: bool = False) -> None:
        grace = self.config.grace_seconds
        delay = max(0.25, grace / 4)
        started = self.clock.monotonic()
        try:
            if at_once:
                delay = 0.0
            while pending := self.leftovers.get(symbol):
                await self.clock.sleep(delay)
                cids = sorted(pending)
                gone = await asyncio.gather(
                    *(self.cancel_by_id(symbol, cid, sent_at=pending[cid]) for cid in cids),
                    return_exceptions=True,
                )
                for cid, done in zip(cids, gone, strict=True):
                    if isinstance(done, BaseException):  # (not the venue's word: said, and asked again)
                        log.error("%s: cancelling %s failed (%r); trying again", symbol, cid, done)
                    elif done:
                        del pending[cid]
                delay = min(max(delay, 0.125) * 2, grace)
                if self.clock.monotonic() - started < LEFTOVER_QUICK_GRACES * grace:
                    # A quarter of grace apart at most at first: doubling (1.25, 2.5, 5 s), three refused
                    # cancels in a row (busy, a ban, busy) left a closed position's stop live 8.8 s.
                    delay = min(delay, max(0.25, grace / 4))
                # One the venue cannot show yet (its read lag) is asked again right when it can: the
                # doubled step went past that, and a stop of a position closed 4 s into its stops' lag was
                # still live on the flat symbol past the grace period.
                now = self.clock.monotonic()
                lag = self.absence_window()
                visible = [sent + lag for sent in pending.values() if sent is not None and sent + lag > now]
                if visible:
                    delay = min(delay, min(visible) - now)
            log.info("%s: the stops left by its closed position are cancelled", symbol)
        finally:
            self.leftovers.pop(symbol, None)
            self._sweepers.pop(symbol, None)

    async def leftovers_cancelled(self, symbol: str, within: float) -> bool:
        """Wait (up to `within` seconds) until no stop of a closed position of ours is left on `symbol`.
        A stopped manager knows nothing any more (it handed its leftovers to the next one): False."""
        sweeper = self._sweepers.get(symbol)
        if self.stopped:
            return False
        if sweeper is None:
            return True
        timer = asyncio.ensure_future(self.clock.sleep(within))
        try:
            await asyncio.wait({sweeper, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            await asyncio.gather(timer, return_exceptions=True)
        return symbol not in self.leftovers and not self.stopped

    def forget(self, guard: PositionGuard) -> None:
        told = self._told_recorded.pop(guard.position_id, None)
        if told and isinstance(self.venue, ChecksRecordedStops):
            self.venue.forget_recorded(told)  # its position ended: judged against the next, a false alarm
        self.guards.pop(guard.position_id, None)
        if self.by_symbol.get(guard.symbol) is guard:
            del self.by_symbol[guard.symbol]
        self._tasks.pop(guard.position_id, None)
        if guard.adopt_after_end:  # (not the next periodic pass: the venue's position waits unprotected)
            self.request_reconcile()

    async def _write_facts_batch(
        self, facts: Mapping[int, ProtectionFactsRow]
    ) -> Mapping[int, PositionStatus]:
        return await self.store.set_protection_facts_many(list(facts.values()))

    async def _write_order_statuses(self, updates: Mapping[str, OrderStatusRow]) -> Mapping[str, None]:
        await self.store.set_order_statuses_many(list(updates.values()))
        return {}

    async def finish_moves(self, within: float) -> int:
        """Before a clean stop: no managed trail sends a new move any more, and the moves already sent are
        given up to `within` seconds to finish (the new stop confirmed and recorded, the old one cancelled —
        or the move failed and the old stop kept), so that no engine leaves two trailing stops behind. A
        move still unresolved then stays recorded as `moving` with its new stop's id (written ahead), which
        the next start resolves against the venue. Returns how many were still in flight."""
        self.moves_frozen = True
        in_flight = [g for g in self.guards.values() if g.move_in_flight and not g.closed]
        if not in_flight:
            return 0
        log.info(
            "stopping: letting %d managed trailing stop moves in flight finish (up to %.0fs)",
            len(in_flight),
            within,
        )
        left = await wait_for_all(
            self.clock, within, [g.wait_pass_started_after(g.passes_started - 1) for g in in_flight]
        )
        if left:
            log.warning(
                "stopping: %d managed trailing stop moves still unanswered after %.0fs; recorded as moving, "
                "the next start resolves them on the venue",
                left,
                within,
            )
        return left

    async def finish_closes(self, within: float) -> int:
        """Before a clean stop: closes at market already under way are given up to `within` seconds to end
        (filled and recorded, or refused and the position kept with its stops). Cut short, one left its
        record `active` with the close `pending` while the venue closed it, and the exit line counted it
        among the positions keeping their stops (opme48). Returns how many were still under way."""
        # Only those on their way to the venue: one held back (a ban, a 429's hold) has sent nothing and
        # waits for the venue's word, minutes maybe; waited for, the stop took 25 s and then said it
        # "unanswered" (r81). It is given up with the stop, nothing sent.
        closing = [g for g in self.guards.values() if g.closing and not g.close_held_back and not g.closed]
        if not closing:
            return 0
        log.info("stopping: letting %d closes at market under way finish (up to %.0fs)", len(closing), within)
        deadline = self.clock.monotonic() + within
        # Until each close's own call has answered (its position may be known closed a moment sooner, by the
        # stream: cut there, the operator's `x` was answered "not confirmed" of a position that closed).
        while (
            left := [g for g in closing if g.closing and not g.close_held_back]
        ) and self.clock.monotonic() < deadline:
            await self.clock.sleep(0.05)
        if left:
            log.warning(
                "stopping: %d closes at market still unanswered after %.0fs (%s): the next start reads them "
                "on the venue",
                len(left),
                within,
                ", ".join(g.symbol for g in left),
            )
        return len(left)

    @contextlib.contextmanager
    def sending(self) -> Iterator[None]:
        """Around a protective order's call, until its answer (`stop(drain=True)` waits for these)."""
        self._sending += 1
        self._nothing_sending.clear()
        try:
            yield
        finally:
            self._sending -= 1
            if self._sending == 0:
                self._nothing_sending.set()

    async def stop(self, *, drain: bool = False, listed: StopListing | None = None) -> None:
        """Stop every guard task. Orders on the exchange stay where they are; the cancels of closed
        positions' stops that were not finished are kept in `handed_over` for the next manager.

        `listed`: the venue's open orders read at an engine's stop (only under its own lease). A confirmed
        stop they lack (`unlisted`) is recorded missing once the guards are stopped: the record said the
        stop was there, and the next start, inside a ban, called it "not verified" where the stop had
        proved it missing (a reviewer).

        `drain` (a protection restart): no protective order is sent from now on, and those on their way
        get their answers first, for as long as an answer normally takes (`late_answer_seconds`, at least
        a second). Cancelled in flight, a stop's answer is lost by our own hand: the next manager had to
        look each one up and, on a venue with a read-after-write lag, wait that lag out (5 s on Binance)
        before sending it again; the emulator's chaos soak saw a wave's positions 7 s without stops so."""
        if drain and not self.stopped:
            self.draining = True
            within = max(1.0, self.late_answer_seconds())
            if not await wait_event(self.clock, self._nothing_sending, within):
                log.warning(
                    "protection restart: %d protective orders still unanswered after %.1fs; the next "
                    "manager looks them up",
                    self._sending,
                    within,
                )
        self.stopped = True
        self.handed_over = self.unfinished_cancels()
        # Guards with news not applied yet that withdraws a stop's cover or ends the position (the stream's
        # cancel of a stop, queued behind a pass): their stops' confirmations are not carried, as the cancel of
        # their tasks drops that news. (Not other news: the echo of our own cancel of a moved trail's old stop
        # left a managed trail's guard in doubt after a restart in a ban, "failed 1", r89.)
        with_news = {g.position_id for g in self.guards.values() if g.news_withdraws_cover()}
        tasks = list(self._tasks.values()) + list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._records_in_flight:  # (`record_surely`: what the next manager reads must be there)
            await wait_for_all(
                self.clock,
                RECORDS_AT_STOP_SECONDS,
                [asyncio.shield(t) for t in list(self._records_in_flight)],
            )
        self.handed_over_unsent, self.handed_over_confirmed = self.never_taken(), self.confirmed_within_lag()
        # Every stop confirmed, where no gap in the account stream waits for a listing: what the stream keeps
        # true (its cancel or expiry would have un-confirmed one). A restart that cannot list the venue
        # (a ban) keeps these covered rather than counting every position uncovered with no news at all.
        self.handed_over_vouched = (
            self.confirmed_stops(without=with_news) if self._gap_noted_at is None else {}
        )
        self.handed_over_left = self.left_unsettled()
        self.handed_over_unclear = self.unclear_sends()
        if listed is not None:
            await self._record_missing_at_stop(listed)
        await self.facts_writer.close()
        await self.order_status_writer.close()
        self._tasks.clear()
        self._background.clear()
        self.guards.clear()
        self.by_symbol.clear()

    # --- the price path ------------------------------------------------------------------------------

    def on_mark(self, symbol: str, price: Decimal, at: float) -> None:
        guard = self.by_symbol.get(symbol)
        if guard is not None:
            guard.on_mark(price, at)

    # --- figures -------------------------------------------------------------------------------------

    def coverage(self) -> CoverageFigures:
        return coverage_figures(
            (g.coverage() for g in self.open_guards()), self.clock.monotonic(), self.config.grace_seconds
        )

    def open_guards(self) -> list[PositionGuard]:
        """Guards of positions still open. A closed one stays in `guards` only while its leftover stops are
        cancelled: its position is gone, so it is neither covered nor uncovered (counting it uncovered, with
        its age as time unprotected, was the manual close's false CRITICAL)."""
        return [g for g in self.guards.values() if not g.closed]

    @property
    def protective_orders_per_position(self) -> int:
        """What one new position will send: the hard stop, plus a native trailing order (a managed trail
        sends its first stop only once it activates, paced like any other protective order)."""
        return 2 if self.kind is TrailingKind.NATIVE else 1

    def uncovered(self) -> list[PositionGuard]:
        return [g for g in self.open_guards() if not g.covered]

    def conditional_orders_held(self) -> int:
        """The stops that may be live on the account now, at most: every guard's current, replacement and
        superseded ones, the leftovers of closed positions still being cancelled, and the stops not ours
        the last reconcile pass saw (the operator's, another client's). An open position counts its two
        stops at least, placed or not: a managed trail's stop comes once it activates, and one the venue
        refused gave its id up and is tried again. Counted by the ids it held, each made room for another
        entry, whose stops then filled what its own would need."""
        return (
            sum(
                len(g.order_ids()) if g.closed else max(STOPS_PER_POSITION, len(g.order_ids()))
                for g in self.guards.values()
            )
            + sum(len(orders) for orders in self.leftovers.values())
            + self.foreign_stops_seen
        )

    # --- helpers for guards --------------------------------------------------------------------------

    async def call(
        self,
        awaitable: Awaitable[Any],
        kind: str,
        lane: Lane = Lane.PROTECTIVE,
        *,
        ticket: CallTicket | None = None,
    ) -> Any:
        """One venue call under the protection call budget, measured for health. The budget runs from
        the moment the request is sent: a wait for rate budget (`engine.pacing`) is measured apart and
        never times a call out. Pass a `ticket` (of `lane`) to watch the call's budget waits."""
        ticket = CallTicket(lane) if ticket is None else ticket
        started = self.clock.monotonic()
        ok = timed_out = withheld = abandoned = False
        try:
            result = await call_with_send_timeout(
                self.clock, self.config.call_timeout_seconds, awaitable, lane, ticket
            )
            ok = True
            return result
        except (NotFound, Rejected):
            ok = True  # the venue answered
            raise
        except (TimeoutError, OutcomeUnknown) as exc:
            timed_out = failure_class(exc) is FailureClass.TIMEOUT  # a 500 answered at once is no timeout
            raise
        except Withheld:
            withheld = True
            raise
        except asyncio.CancelledError:
            # Given up by us (a look-up whose create's answer came first, a stop): the venue's answer was
            # never waited for, so it says nothing of the venue. Counted failed, a fault-free venue read
            # "Exchange errors: 29.5% of 95 calls (fetch_order 28 failed)", DEGRADED (opme51).
            abandoned = True
            raise
        finally:
            now = self.clock.monotonic()
            latency = max(0.0, now - started - ticket.waited)
            if not withheld and not abandoned:  # never sent, or never waited for: nothing to measure
                self.call_stats.record(now, latency, ok, kind, timed_out=timed_out)
            if ok and kind == "create_order":
                previous = self.order_round_trip_seconds
                self.order_round_trip_seconds = latency if previous == 0.0 else 0.8 * previous + 0.2 * latency

    def absence_window(self) -> float:
        """How long after a send left "no such order" proves nothing (0: at once, on a venue without a read
        lag): the venue's read-after-write lag counted from the order's arrival, a one-way trip of an order
        round trip after its send, and at least READ_LAG_MARGIN_SECONDS. Counted with the margin alone, a
        create answered in 2 s (it reached the venue after 1 s) was proven absent while it waited to show,
        and a managed move taken for failed left its live stop beside the next move's."""
        lag = self.read_after_write_seconds
        if lag <= 0:
            return 0.0
        return lag + min(
            max(READ_LAG_MARGIN_SECONDS, self.order_round_trip_seconds / 2), ABSENCE_MARGIN_MAX_SECONDS
        )

    def hold_orders_for(self, refusal: RateLimited | Banned) -> float:
        """The venue refused an order for its rate (429) or a ban (418): no order goes out until it said
        it takes them again. Returns the seconds of that hold."""
        wait = refusal_seconds(refusal, self.clock)
        self.budget.hold_until(self.clock.monotonic() + wait, banned=isinstance(refusal, Banned))
        return wait

    def let_finish(self, call: asyncio.Future[Any]) -> None:
        """A venue call whose answer is no longer needed (a look-up or a second read settled it first)
        runs on to its answer or its budget in the background, so that its measurement stays true (a
        slow answer is a slow call, a lost one a timeout); the manager's stop cancels it. One already done
        has its failure looked at (an answer not used is no error: unlooked-at, asyncio logged it as one,
        with a traceback, in the emulator soak)."""
        if call.done():
            if not call.cancelled():
                call.exception()
            return

        async def finish() -> None:
            with contextlib.suppress(Exception):
                await call

        self._in_background(finish(), "finish-late-answer")

    def late_answer_seconds(self) -> float:
        """How long after its send an order call's answer counts as late (and is looked for)."""
        return max(LATE_ANSWER_MIN_SECONDS, LATE_ANSWER_ROUND_TRIPS * self.order_round_trip_seconds)

    def stuck_trigger_patience(self) -> float:
        """How long a fired stop gets to fill before its position is closed at market (`_check_fired`)."""
        venue_time = max(STUCK_TRIGGER_SECONDS, STUCK_TRIGGER_ROUND_TRIPS * self.order_round_trip_seconds)
        return min(venue_time, self.config.grace_seconds * STUCK_TRIGGER_SHARE)

    async def create_or_find(
        self,
        request: Awaitable[Order],
        find: Callable[[], Awaitable[Order]],
        what: str,
        lane: Lane,
        *,
        known: Callable[[], Order | None] | None = None,
        told: asyncio.Event | None = None,
        withhold: Callable[[], str | None] | None = None,
    ) -> Order:
        """An order call whose answer can be lost (`request`), and meanwhile, once that answer is late,
        look-ups of the order by its client id (`find`, raising `NotFound` while the venue does not show
        it) every retry step: the first of the answer and a found order wins. An entry whose answer was
        lost after the venue filled it left the position naked for the whole call budget (10 s) before
        anything looked for it. Were neither to come, the call's own timeout or error is raised. `known`:
        what is already known of the order without asking (the account stream's word, which `told` is set
        for): taken as the venue's answer as soon as it is told, the answer still on its way or not, and
        tried before each look-up, which it then spares (a look-up not sent is no call in the venue's
        figures). `withhold`: asked while the order waits for rate budget, why it must not be sent now
        (`CallTicket.withhold`): it is then withheld, never sent (`Withheld`)."""
        ticket = CallTicket(lane, withhold=withhold)
        call = asyncio.ensure_future(self.call(request, "create_order", lane, ticket=ticket))
        started = self.clock.monotonic()
        look_after = self.late_answer_seconds()
        handed_off = False
        try:
            while True:
                late = await _until_late(self.clock, call, ticket, look_after, told)
                told_order = known() if known is not None else None
                if told_order is not None and not call.done():
                    log.info(
                        "%s %s: its end is known (%s) before its answer came",
                        what,
                        told_order.client_order_id,
                        told_order.status.value,
                    )
                    self.let_finish(call)
                    handed_off = True
                    return told_order
                if not late:
                    if call.done():
                        break
                    if told is not None:
                        told.clear()  # told of something else than its end (kept no more): wait on
                    continue
                look_up = asyncio.ensure_future(self.read(find, "fetch_order", lane))
                try:
                    await first_of(asyncio.shield(call), asyncio.shield(look_up))
                finally:
                    await end_all(look_up)  # the answer came first: it decides
                if look_up.done() and not look_up.cancelled() and look_up.exception() is None:
                    found: Order = look_up.result()
                    log.info(
                        "%s %s found %s by its client order id %.1fs after it was sent, before its answer came",
                        what,
                        found.client_order_id,
                        found.status.value,
                        self.clock.monotonic() - started - ticket.waited,
                    )
                    self.let_finish(call)
                    handed_off = True
                    return found
                look_after = self.config.retry_initial_seconds  # not there (yet), or the look-up failed
            return call.result()
        finally:
            if not handed_off and not call.done():
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)

    async def read(self, make: Callable[[], Awaitable[_T]], kind: str, lane: Lane = Lane.PROTECTIVE) -> _T:
        """An idempotent read (`make()` builds the request), hedged: once its answer is late —
        `LATE_ANSWER_ROUND_TRIPS` order round trips after it was sent, at least `LATE_ANSWER_MIN_SECONDS`
        — the same read is sent once more and the first answer wins. An answer lost after the venue
        executed the read used to hold whatever waited on it for the whole call budget (10 s): a
        protection restart's reconcile, during which no guard runs, or a fired stop's check.

        While the first is out, a copy that fails is sent again after the pause its failure calls for
        (the venue's Retry-After, else the retry backoff): a refused second copy left only the lost first
        to wait for, and a Bybit soak had a position without its trailing stop for 9.6 s so. Once every
        copy has failed, the last failure is raised."""
        ticket = CallTicket(lane)
        first = asyncio.ensure_future(self.call(make(), kind, lane, ticket=ticket))
        copies = [first]
        try:
            if not await _until_late(self.clock, first, ticket, self.late_answer_seconds()):
                return first.result()
            failures = 0
            while True:
                latest = asyncio.ensure_future(self.call(make(), kind, lane))
                copies.append(latest)
                while not latest.done() and _answer_among(copies) is None:
                    await asyncio.wait(
                        [c for c in copies if not c.done()], return_when=asyncio.FIRST_COMPLETED
                    )
                if _answer_among(copies) is None:
                    # The latest copy failed while an earlier one is still out (or none is: then it says why).
                    failures += 1
                    error = latest.exception()
                    assert error is not None
                    out = [c for c in copies if not c.done()]
                    if not out:
                        raise error
                    pause = (
                        refusal_seconds(error, self.clock)
                        if isinstance(error, RateLimited | Banned)
                        else self.backoff(failures)
                    )
                    await first_of(self.clock.sleep(pause), *(asyncio.shield(c) for c in out))
                answer = _answer_among(copies)
                if answer is not None:
                    for other in copies:
                        if other is not answer:
                            self.let_finish(other)
                    copies.clear()
                    return answer.result()
                if all(c.done() for c in copies):  # every copy failed: the latest says why
                    failure = latest.exception()
                    assert failure is not None
                    raise failure
        finally:
            left = [t for t in copies if not t.done()]
            for task in left:
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)
            for task in copies:  # (finished copies whose failure nobody used: looked at, not left to asyncio)
                if task.done() and not task.cancelled():
                    task.exception()

    def backoff(self, failures: int) -> float:
        if failures <= 0:
            return self.config.retry_initial_seconds
        # (The exponent capped: 2.0 ** 1024 overflows, and some 8 hours of a stop refused at the 30 s cap
        # raised it inside the guard's own failure report, which ended the guard.)
        doublings = min(failures - 1, MAX_DOUBLINGS)
        return min(self.config.retry_max_seconds, self.config.retry_initial_seconds * 2**doublings)

    def next_close_generation(self, position_id: int) -> int:
        generation = self._close_generations.get(position_id, 0)
        self._close_generations[position_id] = generation + 1
        return generation

    def publish(self, event: Any) -> None:
        self.events.publish(event)

    def settle_exit_later(self, guard: PositionGuard, client_order_ids: Iterable[str]) -> None:
        """`guard`'s position is over, recorded `closed_on_exchange` for want of evidence while these stops
        of it could not be read yet (the venue's read lag after their send): once they can be, one found
        filled settles the record (the exit's reason, its realized PnL). The position's end is not held up
        for it: its other stops are cancelled at once (held for the lag, a trailing stop stayed live on a
        flat symbol 8.8 s in a chaos run)."""
        position_id, symbol = guard.position_id, guard.symbol
        purposes = {
            cid: key.purpose
            for cid in client_order_ids
            if (key := parse_client_order_id(cid, self.token)) is not None and key.purpose in _STOP_PURPOSES
        }

        async def settle() -> None:
            for _ in range(EXIT_SETTLE_LOOKS):  # (the venue's lag can outlast one window: looked again)
                await self.clock.sleep(self.absence_window())
                for cid, purpose in purposes.items():
                    try:
                        found = await self.read(
                            lambda cid=cid: self.venue.fetch_order(symbol, cid), "fetch_order"
                        )
                    except (ExchangeError, TimeoutError):
                        continue
                    if found.status is OrderStatus.FILLED and found.average_price is not None:
                        await self.settle_exit_from_fill(position_id, purpose, found)
                        return
            log.info(
                "%s: position %d stays closed_on_exchange: its stops %s not found filled",
                symbol,
                position_id,
                ", ".join(purposes),
            )

        if purposes:
            self._settle_in_background(settle(), symbol, position_id)

    def settle_exit_soon(self, position_id: int, purpose: OrderPurpose, filled: Order) -> None:
        """`settle_exit_from_fill`, in the background (the account stream's word on a stop's fill)."""
        if filled.average_price is not None:
            self._settle_in_background(
                self.settle_exit_from_fill(position_id, purpose, filled), filled.symbol, position_id
            )

    def _settle_in_background(self, work: Coroutine[Any, Any, None], symbol: str, position_id: int) -> None:
        """A position's exit record settled off the caller's path; a failure leaves the record as it is,
        said (not raised into nobody's hands)."""

        async def guarded() -> None:
            try:
                await work
            except Exception as exc:
                log.warning("%s: the exit of position %d not settled (%s)", symbol, position_id, exc)

        self._in_background(guarded(), f"exit-{position_id}")

    async def settle_exit_from_fill(self, position_id: int, purpose: OrderPurpose, filled: Order) -> None:
        """Our stop `filled` ended `position_id`: its record, closed `closed_on_exchange` for want of that
        evidence, takes the stop's reason and PnL (nothing changes a record that says otherwise)."""
        assert filled.average_price is not None
        reason = "trailing_stop" if purpose is OrderPurpose.TRAILING_STOP else "stop_loss"
        with contextlib.suppress(LookupError):  # (a stop with no row here: the venue's word stands)
            await self.store.set_order_status(
                filled.client_order_id, OrderRecordStatus.FILLED, exchange_order_id=filled.venue_order_id
            )
        pnl = await self.store.settle_unexplained_exit(position_id, reason, filled.average_price)
        if pnl is not False:
            log.info(
                "Position %d %s: its end was our %s %s after all (found filled at %s once the venue showed "
                "it): exit %s, realized PnL %s before fees",
                position_id,
                filled.symbol,
                stop_words(purpose),
                filled.client_order_id,
                filled.average_price,
                reason,
                pnl,
            )

    def other_installation_sent(self, cid: str) -> bool:
        """Whether `cid` is this program's id from another installation (another database's token)."""
        token = installation_of(cid)
        return token is not None and token != self.token

    def other_installations_in(self, open_orders: Iterable[Order]) -> dict[str, int]:
        """How many of `open_orders` each other installation of this program sent, by its token."""
        seen: dict[str, int] = {}
        for order in open_orders:
            token = installation_of(order.client_order_id)
            if token is not None and token != self.token:
                seen[token] = seen.get(token, 0) + 1
        return seen

    def saw_other_installations(self, open_orders: Iterable[Order]) -> None:
        """Note the open orders of other installations of this program on the account (a listing's): two
        engines trading one account from two databases, each adopting the other's positions and stopping
        them twice (an operator: 168 stops for 41 positions, and neither engine said a word). Said at
        CRITICAL when one appears; the breaker pauses entries for as long as they are there."""
        seen = self.other_installations_in(open_orders)
        self.other_installation_symbols |= {
            o.symbol for o in open_orders if self.other_installation_sent(o.client_order_id)
        }
        for token in sorted(seen.keys() - self.other_installations.keys()):
            message = (
                f"another installation of tsbot trades this account: the venue holds "
                f"{counted(seen[token], 'open order')} of another database (client ids tsb{token}-…); its "
                "positions are left to it, and entries are paused by the breaker (resumed by the operator "
                "once they are gone)"
            )
            log.critical("%s", message)
            self.spawn_event_write(Severity.CRITICAL, "other_installation", message, None, None)
        self.other_installations = seen

    def saw_other_identities(self, theirs: Mapping[str, Sequence[Order]]) -> None:
        """Note this database's orders on the venue account for positions recorded under other account
        identities (by identity), a listing's: left alone and never adopted; said at CRITICAL when one
        appears, and the breaker pauses entries while they are there (as another installation's)."""
        self.other_identity_orders = {o.client_order_id for orders in theirs.values() for o in orders}
        self.other_installation_symbols |= {o.symbol for orders in theirs.values() for o in orders}
        for account in sorted(theirs.keys() - self._other_identities):
            message = (
                f"another identity of this venue account trades it from this database: the venue holds "
                f"{counted(len(theirs[account]), 'open order')} this database recorded for account {account} "
                "(another API key of the account, or the testnet setting flipped); its positions are left to "
                "its engine, and entries are paused by the breaker (resumed by the operator once they are "
                "gone). One engine per venue account"
            )
            log.critical("%s", message)
            self.spawn_event_write(Severity.CRITICAL, "other_identity", message, None, None)
        self._other_identities = set(theirs)
        self.other_installations.update({f"identity {a}": len(o) for a, o in theirs.items()})

    def request_reconcile(self) -> None:
        self._reconcile_requested.set()

    def stream_gap(self, since: float, *, read_now: bool = True) -> None:
        """The account stream may have missed events since `since` (monotonic): a cancel or an expiry of a
        confirmed stop among them. The venue's open orders are read now (a reconcile pass). If no listing
        asked from now on has answered within the grace period, every stop confirmed before now is in
        doubt (`StopsUnverified`): its position counts uncovered until its guard has found it live by id.
        Before, a stalled stream and refused reads left positions counted covered by stops the venue no
        longer held (an operator watched 88 s of it, and an exit line saying "uncovered 0")."""
        now = self.clock.monotonic()
        self._unheard_since = since if self._unheard_since is None else min(self._unheard_since, since)
        self._gap_noted_at = now
        self.note_streamed(None)  # a word missed may have ended what was told live
        if read_now:  # (not asked by the reconcile loop itself, which reads the venue next)
            self.request_reconcile()
        if self._doubt_timer is not None and not self._doubt_timer.done():
            # Its grace runs from the first gap no listing has answered for: told again (before each pass
            # while the stream stays down, at each reconnect of a flapping one) it restarted, and passes
            # more often than the grace period kept the doubt from ever coming (a hard stop cancelled by
            # hand, a minute "covered").
            return
        self._doubt_timer = self._in_background(self._doubt_unless_listed(), "stream-gap-doubt")

    def venue_listed(self, asked_at: float, checked: Collection[str]) -> None:
        """A listing of the venue's positions and open orders asked at `asked_at` (monotonic) answered, and
        the stops in `checked` (client ids) were checked against it: what the stream missed before then is
        known for them. A stop confirmed before the gap that it did not check (its position left out of the
        list, a close on its way, inside the venue's read lag) is in doubt now: the listing cannot vouch
        for it, and before, it lifted the doubt for every guard all the same."""
        noted = self._gap_noted_at
        if noted is None or asked_at < noted:
            return
        self._gap_noted_at = self._unheard_since = self._doubt_came_at = None
        if self._doubt_timer is not None:
            self._doubt_timer.cancel()
            self._doubt_timer = None
        for guard in self.guards.values():
            if guard.closed:
                continue
            unchecked = frozenset(
                o.client_order_id
                for o in guard.watched_stops
                if o.confirmed
                and o.client_order_id is not None
                and o.confirmed_at < noted
                and o.client_order_id not in checked
            )
            if unchecked:
                log.info(
                    "%s: the venue's listing did not check %s (a gap in the account stream before it): "
                    "unverified until found by id",
                    guard.symbol,
                    ", ".join(sorted(unchecked)),
                )
                guard.submit(StopsUnverified(noted_at=noted, ids=unchecked))
            elif not guard.covered:  # stops in doubt are looked up now, not at a backoff's end
                guard.wake.set()

    @property
    def stops_in_doubt_since(self) -> float | None:
        """Since when (monotonic) the stops confirmed before a gap in the account stream are in doubt, no
        listing of the venue having answered since (None: no such doubt). No entry goes meanwhile: its
        stops could not be verified either, and an operator watched a wave open five positions 6 s into
        such a doubt, 3 s before the breaker paused entries. Over once a listing answers, or once no stop
        is in doubt any more (each found live, or placed again, by its id)."""
        if self._doubt_came_at is not None and not any(
            g.doubt_pending() for g in self.guards.values() if not g.closed
        ):
            self._doubt_came_at = None
        return self._doubt_came_at

    @property
    def gap_pending_since(self) -> float | None:
        """When (monotonic) a gap in the account stream was told that no listing of the venue has answered
        for since, or None."""
        return self._gap_noted_at

    async def _record_missing_at_stop(self, listed: StopListing) -> None:
        """The stops `listed` lacks, recorded missing (their guards' tasks are over), each position's facts
        written within MISSING_AT_STOP_WRITE_SECONDS all together."""
        lacking = [(guard, self.unlisted(guard, listed)) for guard in self.open_guards()]
        lacking = [(guard, orders) for guard, orders in lacking if orders]
        for _guard, orders in lacking:
            for order in orders:
                order.confirmed = False
                order.doubted_id = None  # missing, not in doubt: the venue's list lacks it
        if not lacking:
            return
        try:
            async with asyncio.timeout(MISSING_AT_STOP_WRITE_SECONDS):
                await asyncio.gather(*(guard.write_facts_now() for guard, _orders in lacking))
        except Exception:
            log.exception("could not record the stops missing at the stop")

    def unlisted(self, guard: PositionGuard, listed: StopListing) -> list[ProtectiveOrder]:
        """`guard`'s confirmed stops the venue's open orders (`listed`) lack, among those confirmed longer than
        the venue's read lag before the listing was asked (one confirmed since may not show in it yet; the
        reconciler's rule): fired (a stop TRIGGERING is no open order), cancelled or ended, the account
        stream's word not come yet. None of a position the same read shows gone (a stop that filled, its
        word not come: the position is over, and its stops with it)."""
        if (guard.symbol, guard.side.value) not in listed.positions:
            return []
        return [
            o
            for o in guard.watched_stops
            if o.confirmed
            and o.client_order_id not in listed.ids
            and o.confirmed_at < listed.asked_at - self.read_after_write_seconds
        ]

    def in_doubt_only(self, guard: PositionGuard, listed: StopListing | None = None) -> bool:
        """`guard`'s position lacks no stop the venue is known not to hold: each is confirmed, or in doubt
        (confirmed once, not verified since a gap in the venue's news), and the listing at the stop (if
        any) lacks none of them."""
        if listed is not None and self.unlisted(guard, listed):
            return False
        stops = (guard.stop_loss, guard.trailing_stop)
        return all(o.client_order_id is not None and (o.confirmed or o.unverified) for o in stops)

    def unverified(self, guard: PositionGuard, listed: StopListing | None = None) -> bool:
        """What an engine stopping now cannot vouch for in `guard`'s stops: one the venue's open orders read
        at the stop (`listed`) lack (`unlisted`); without that listing, one confirmed before a gap in the
        account stream that is still pending (its doubt may not have come due yet)."""
        if listed is not None and self.unlisted(guard, listed):
            return True
        noted = self._gap_noted_at
        if noted is None or (listed is not None and listed.asked_at >= noted):
            return False
        return any(o.confirmed and o.confirmed_at < noted for o in guard.watched_stops)

    async def _doubt_unless_listed(self) -> None:
        # The grace period, and never less than a listing's answer normally takes (a slow one that answers
        # is no doubt: its stops are checked against it). What is in doubt then is every stop confirmed
        # before the latest telling of the gap (a listing since would have ended it).
        await self.clock.sleep(max(self.config.grace_seconds, self.late_answer_seconds()))
        noted_at = self._gap_noted_at
        if noted_at is None or self.stopped:
            return
        doubted = [
            g
            for g in self.guards.values()
            if not g.closed
            and any(o.confirmed and o.confirmed_at < noted_at for o in (g.stop_loss, g.trailing_stop))
        ]
        if not doubted:
            return
        self._doubt_came_at = self.clock.monotonic()
        unheard = self._unheard_since if self._unheard_since is not None else noted_at
        log.warning(
            "account stream: events may be lost since %.0fs ago and no listing of the venue's open orders "
            "has answered since: the stops of %s are unverified (uncovered) until each is found "
            "live by its id",
            self.clock.monotonic() - unheard,
            counted(len(doubted), "position"),
        )
        for guard in doubted:
            guard.submit(StopsUnverified(noted_at=noted_at))

    def note_listed(self, order: Order, asked_at: float) -> None:
        """A listing asked at `asked_at` (monotonic) showed `order`, one of our stops in doubt, live."""
        self.listed_live[order.client_order_id] = (order, asked_at)
        self.listed_live.move_to_end(order.client_order_id)
        while len(self.listed_live) > STREAMED_LIVE_KEPT:
            self.listed_live.popitem(last=False)

    def listed_since(self, cid: str, doubted_at: float) -> Order | None:
        """The listing's word that stop `cid` is live, if it saw the venue as of after `doubted_at` (a read
        lag later: a lagging read may still list a stop cancelled just before); used once."""
        kept = self.listed_live.pop(cid, None)
        if kept is None or kept[1] - self.read_after_write_seconds < doubted_at:
            return None
        return kept[0]

    def note_streamed(self, order: Order | None) -> bool:
        """The account stream's latest word on one of our stops (None: a gap, every word forgotten). True
        when it is kept as the venue's word that the stop is live (a NEW, where the stream names orders by
        the venue's own client ids: `Capabilities.stream_new_proves_live`)."""
        if order is None:
            self.streamed_live.clear()
            return False
        self.streamed_live.pop(order.client_order_id, None)
        if order.status is OrderStatus.NEW and self.stream_new_proves_live:
            self.note_placed(order)  # (its answer lost, the close began before this word)
            self.streamed_live[order.client_order_id] = order
            while len(self.streamed_live) > STREAMED_LIVE_KEPT:
                self.streamed_live.popitem(last=False)
            return True
        return False

    @property
    def reconcile_requested(self) -> asyncio.Event:
        return self._reconcile_requested

    def protection_lost(self, symbol: str, position_id: int, what: str, error: str, message: str) -> None:
        """A position's stop is gone, not by us: the position is unprotected until its guard replaces it
        (at once), so that is shown (`ProtectionFailed`), not only logged (F12), and recorded as an event."""
        self.publish(
            ProtectionFailed(
                at=self.clock.now(),
                position_id=position_id,
                symbol=symbol,
                operation=f"verify {what}",
                error=error,
                retry_in_seconds=0.0,
            )
        )
        self.spawn_event_write(Severity.ERROR, "protection_lost", message, symbol, position_id)

    def spawn_event_write(
        self,
        severity: Severity,
        type_: str,
        message: str,
        symbol: str | None,
        position_id: int | None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        """Record an audit event without making the caller wait on the DB; failures are logged (F12)."""

        async def write() -> None:
            try:
                await self.store.record_event(
                    severity, type_, message, symbol=symbol, position_id=position_id, data=data
                )
            except Exception:
                log.exception("could not record event %s for %s: %s", type_, symbol, message)

        self._in_background(write(), f"event-{type_}")


# How each class of failed protective create starts its log line and event message. "Timeout creating
# trailing stop for SYMBOL" is the operators' grep: it is said of real timeouts only.
_LATE_ANSWER_WORDS = {
    _Outcome.CONFIRMED: "found live by its client order id",
    _Outcome.FIRED: "found fired by its client order id",
    _Outcome.GONE: "found ended by its client order id",
}

_FAILURE_PHRASE = {
    FailureClass.TIMEOUT: "Timeout creating",
    FailureClass.UNKNOWN_OUTCOME: "Unknown outcome creating",
    FailureClass.REJECTED: "Rejected creating",
    FailureClass.SERVER_ERROR: "Server error creating",
    FailureClass.RATE_LIMITED: "Rate limited creating",
    FailureClass.NOT_SENT: "Could not send",
}
_FAILURE_WORDS = {
    FailureClass.TIMEOUT: "timed out",
    FailureClass.UNKNOWN_OUTCOME: "outcome unknown",
    FailureClass.REJECTED: "rejected",
    FailureClass.SERVER_ERROR: "server error",
    FailureClass.RATE_LIMITED: "rate limited",
    FailureClass.NOT_SENT: "not sent",
}


def _stop_state(order: ProtectiveOrder) -> str:
    """A stop that does not protect now, as far as it is known: in doubt, sent and not confirmed, missing."""
    if order.unverified:
        return "in doubt"
    if order.maybe_sent and order.client_order_id is not None:
        return "sent, not confirmed"
    return "missing"


def stop_words(purpose: OrderPurpose) -> str:
    """A protective order's name in messages: \"stop-loss\", \"trailing stop\"."""
    return (
        "trailing stop"
        if purpose is OrderPurpose.TRAILING_STOP
        else "stop-loss"
        if purpose is OrderPurpose.STOP_LOSS
        else purpose.value
    )


def record_status_of(status: OrderStatus) -> OrderRecordStatus:
    """How an order the venue told us of is recorded."""
    return {
        OrderStatus.NEW: OrderRecordStatus.OPEN,
        OrderStatus.TRIGGERED: OrderRecordStatus.UNKNOWN,  # fired, not final: it may still fill
        OrderStatus.FILLED: OrderRecordStatus.FILLED,
        OrderStatus.CANCELED: OrderRecordStatus.CANCELED,
        OrderStatus.EXPIRED: OrderRecordStatus.EXPIRED,
    }[status]


def refusal_seconds(refusal: RateLimited | Banned, clock: Clock) -> float:
    """How long the venue said it refuses us: a 429's Retry-After, or what is left of a ban."""
    if isinstance(refusal, RateLimited):
        return refusal.retry_after
    return max(0.0, refusal.until - clock.now())


def _doubted_by(order: ProtectiveOrder, command: StopsUnverified) -> bool:
    """`order` is one of the stops `command` puts in doubt: confirmed before the gap was told, and named
    by it when it names ids."""
    return (
        order.confirmed
        and order.client_order_id is not None
        and order.confirmed_at < command.noted_at
        and (command.ids is None or order.client_order_id in command.ids)
    )


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _datetime(epoch: float | None) -> datetime | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz=UTC)


def _order_side(value: str) -> OrderSide | None:
    """A recorded order's side (None: one this version does not know)."""
    try:
        return OrderSide(value)
    except ValueError:
        return None


async def _until_late(
    clock: Clock,
    call: asyncio.Future[Any],
    ticket: CallTicket,
    after: float,
    told: asyncio.Event | None = None,
) -> bool:
    """Wait for `call` until its answer is `after` seconds late, counted from when it was sent (time queued
    for budget, on `ticket`, does not count); True if it is still unanswered then. False as soon as it is
    answered, or `told` is set."""
    started, waited_before = clock.monotonic(), ticket.waited
    while not call.done() and not (told is not None and told.is_set()):
        now = clock.monotonic()
        due = started + (ticket.waited - waited_before) + after
        if ticket.waiting_since is None and now >= due:
            return True
        nap = LATE_ANSWER_MIN_SECONDS if ticket.waiting_since is not None else due - now
        ticket.changed.clear()
        wakes = [asyncio.shield(call), ticket.changed.wait(), clock.sleep(nap)]
        if told is not None:
            wakes.append(told.wait())
        await first_of(*wakes)
    return False


def _answer_among(copies: Iterable[asyncio.Future[_T]]) -> asyncio.Future[_T] | None:
    """The first copy of a read the venue answered (a "not found" or a refusal is an answer too)."""
    for copy in copies:
        if copy.done() and not copy.cancelled():
            error = copy.exception()
            if error is None or isinstance(error, NotFound | Rejected):
                return copy
    return None


__all__ = [
    "PositionGuard",
    "ProtectionConfig",
    "ProtectionManager",
    "StopListing",
    "TrailingKind",
]


# How far a recorded trail's activation may lie from today's and still be the same position's trail on
# another tick grid (a venue changed the symbol's price step): a fraction of the price, far above any tick.
_REGRID_TOLERANCE = Decimal("0.005")


def _restored_trail(guard: PositionGuard, record: TrailingStateRecord) -> trailing.TrailingState:
    """The trail as recorded, checked by the state machine. A venue that changed the symbol's tick size
    meanwhile (Binance and Bybit do; the stop it holds keeps its price) left the record off today's grid:
    its activation worked out again differs, its stop is off the grid, and the whole trail was refused (an
    ERROR, and a trail started afresh from the fill: its peak lost, the next stop placed looser than the
    one on the venue). Such a record is put on today's grid instead: today's activation, the peak at
    least that, the stop rounded the loose way (never tighter than the trail allows) inside its bounds.
    The guard's order keeps the stop's recorded price, which is what the venue holds."""
    params = guard.trail_params(
        callback_percent=record.callback_percent, activation_percent=record.activation_percent
    )
    fields = {
        "phase": record.state,
        "activation_price": record.activation_price,
        "peak_price": record.peak_price,
        "stop_price": record.current_stop_price,
        "last_move_at": record.last_move_at.timestamp() if record.last_move_at else None,
        "update_count": record.update_count,
    }
    try:
        return trailing.TrailingState.restore(**fields, params=params)
    except trailing.InvalidTrailingState:
        activation, stop = record.activation_price, record.current_stop_price
        off_grid = activation != params.activation_price or (
            stop is not None and not guard.market.is_on_tick(stop)
        )
        if (
            not off_grid  # on today's grid and refused: corrupt, never made to fit
            or activation is None
            or abs(activation - params.activation_price) > activation * _REGRID_TOLERANCE
        ):
            raise
    peak, stop = record.peak_price, record.current_stop_price
    if peak is not None and params.is_better(params.activation_price, peak):
        peak = params.activation_price
    if stop is not None and peak is not None:
        loose = ROUND_DOWN if params.is_long else ROUND_UP
        stop = guard.market.round_price(stop, loose)
        loosest, tightest = params.trail_price(params.activation_price), params.trail_price(peak)
        if params.is_better(loosest, stop):
            stop = loosest
        if params.is_better(stop, tightest):
            stop = tightest
    regridded = trailing.TrailingState.restore(
        **{**fields, "activation_price": params.activation_price, "peak_price": peak, "stop_price": stop},
        params=params,
    )
    log.info(
        "%s: trail restored onto today's tick grid %s (activation %s, stop %s as recorded: %s, %s)",
        guard.symbol,
        guard.market.tick_size,
        params.activation_price,
        stop,
        record.activation_price,
        record.current_stop_price,
    )
    return regridded

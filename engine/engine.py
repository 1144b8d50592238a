"""The Engine facade: what `tsbot run` and the dashboard drive.

It owns the lifecycle: database (migrated), the account lease (one engine per venue account, F9), the
venue, the order budget, the protection manager and its reconciler, the signal consumer and wave runner,
the mark-price feed, the health check. Every background loop is a named, supervised task that is restarted
with backoff when it fails and whose failure is logged (nothing is fire-and-forget). Stopping cancels them
and leaves every order on the exchange in place.

The UI reads `snapshot()`, follows `events()`, and sends commands (`reprotect_uncovered`,
`restart_protection`, `pause_entries` / `resume_entries`, `close_position`); it never reaches inside. A
process that does not trade (`tsbot close`, a read-only dashboard) sends the same commands through
`monitoring.commands`, which the engine's command loop (engine/commands.py) executes with these methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_DOWN, Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar, cast

from engine.account_stream import AccountStreamReader
from engine.accounts import AccountShared, account_key
from engine.alerts import Alerter, EngineObserver
from engine.clock import Clock, SystemClock, end_all, first_of, monotonic_of, wait_event, wait_for_all
from engine.code_watch import CodeDifference, SourceWatcher, running_code
from engine.commands import CommandRunner, ProtectionRestartRefused, requester_identity
from engine.config import ConfigError, Settings, VenueKind, real_venue_problems, venue_mode
from engine.credentials import check_credentials
from engine.events import (
    EngineEvent,
    EngineStateChanged,
    EntriesToggled,
    EventBus,
    HealthChanged,
    PositionOpened,
    SignalRejected,
    WaveFinished,
)
from engine.exchange.errors import (
    Banned,
    ClockRefused,
    ExchangeError,
    InsufficientMargin,
    NotFound,
    OutcomeUnknown,
    RateLimited,
    Rejected,
    Retryable,
    Withheld,
)
from engine.exchange.port import (
    AccountEvent,
    AttachesStopToEntry,
    ExchangePort,
    KeptInAFile,
    Market,
    MarkPrice,
    Order,
    OrderSide,
    OrderUpdate,
    PositionSide,
    PositionUpdate,
    ReadsVenueTime,
    VenuePosition,
)
from engine.last_stop import forget_last_stop, last_stop_path, record_last_stop
from engine.metrics import CallStats
from engine.metrics_server import MetricsServer
from engine.order_budget import EntryPromise, OrderBudget
from engine.pacing import DEFAULT_HEADROOM, BudgetWaits, Lane, RequestPacer, VenuePacing
from engine.signal_input import BadSignal, parse_score, parse_side
from engine.signals import SignalConsumer, SignalWave, SimSignalGenerator
from engine.venues.stream_client import NOT_STARTED
from engine.words import counted, format_duration, keep_their_stops
from protection import health
from protection.breaker import BreakerInputs, BreakerSettings, trip_reasons
from protection.coverage import (
    CoverageFigures,
    PositionCoverage,
    coverage_figures,
    percent,
    rows_by_position,
)
from protection.manager import (
    STOPS_PER_POSITION,
    PositionGuard,
    ProtectionConfig,
    ProtectionManager,
    StopListing,
    TrailingKind,
    record_status_of,
    stop_loss_price,
    stop_words,
)
from protection.order_ids import client_order_id, parse_client_order_id
from protection.reconciler import Reconciler, ReconcileReport, VenueSnapshot
from storage.commands import NEW_COMMAND_CHANNEL, CommandQueue
from storage.database import (
    UNREACHABLE_ERRORS,
    Database,
    DatabaseDown,
    DatabaseUnavailable,
    answers,
    is_unreachable,
    open_database,
)
from storage.embedded import default_data_dir, detach_embedded
from storage.journal import WriteJournal
from storage.lease import (
    EngineLease,
    LeaseHeld,
    LeasePhase,
    current_holder,
    end_own_lost_session,
    is_own_lease,
)
from storage.outage import DatabaseWatch, journal_path
from storage.repositories import (
    LIVE_ORDER_STATUSES,
    CoverageSample,
    HealthRow,
    OrderPurpose,
    OrderRecord,
    OrderRecordStatus,
    PositionAlreadyOpen,
    PositionRecord,
    PositionStatus,
    Severity,
    SignalRecord,
    SignalStatus,
    TrailingStateRecord,
)
from storage.resilient import ResilientStore

log = logging.getLogger(__name__)
T = TypeVar("T")

STARTUP_UNKNOWN_SECONDS = 30.0  # an empty position list this soon after connecting is "unknown" (F3)
WAVE_PROTECTION_WAIT_SECONDS = 120.0
START_WAIT_SAID_SECONDS = 5.0  # a start's wait for the venue this long is said on the terminal as it waits
WAVE_AT_STOP_WRITE_SECONDS = 2.0  # a stop's record of a wave it interrupts, at most
SILENT_MARKS_POLL_SECONDS = 2.0  # a held symbol's marks by REST while the stream leaves it out
SILENT_MARKS_ONE_BY_ONE = 3  # up to this many such symbols are read one by one (a lighter request each)
MARKETS_REFRESH_SECONDS = 300.0  # the venue's markets read again: a delisting begins, a settlement ends
# Room kept under the venue's cap on open conditional orders for stop moves (`Engine._no_room_for_stops`):
# a twentieth of the cap, at least one position's worth.
CONDITIONAL_SPARE_MIN = 2
CONDITIONAL_SPARE_DIVISOR = 20
STREAM_FIRST_CONNECT_SECONDS = 10.0  # a stream's first connection is not "down" before this
STREAM_CHECK_SECONDS = 1.0  # how often the reconcile loop looks whether the account stream is down
STREAM_DOWN_RECONCILE_MIN_SECONDS = 1.0  # the shortest reconcile interval while that stream is down
HEALTH_REPEAT_SECONDS = 60.0  # a lasting degraded or critical component is said again this often
HOUSEKEEPING_SECONDS = 60.0
CODE_CHECK_SECONDS = 60.0  # a headless engine compares the code on disk with its own this often (F10)
# The coverage history (monitoring.coverage_samples): one sample of the gauge's figures this often, kept this
# long (older ones are deleted by the housekeeping).
COVERAGE_SAMPLE_SECONDS = 10.0
# Reconcile passes failing one after another for this many intervals: health says the stops go unchecked.
UNCHECKED_PASSES = 3
COVERAGE_RETENTION_SECONDS = 30 * 86400.0
ENTRIES_PAUSED = "entries paused"  # why a signal that arrived while entries were paused was rejected
ALREADY_HELD = "symbol already has an open position"
TWICE_IN_WAVE = "symbol appears twice in this wave"
ENGINE_STOPPING = "engine stopping"
STALE_CLAIM_SECONDS = 600.0  # a wave handles its signals in seconds; ten minutes taken is abandoned
LEASE_CHECK_SECONDS = 2.0
ENTRY_RATE_LIMIT_ATTEMPTS = (
    5  # an entry refused by a rate limit or for its timestamp (not executed) is sent this many times at most
)
# An entry refused for its timestamp (our clock off from the venue's) is sent again, signed anew, once the
# venue's time, read again beside the refusal, has been read (waited for this long at most: resent 1 s
# apart without waiting, a read answering 9 s late left five refusals in 4.5 s and the signals rejected, a
# reviewer), and this long after.
ENTRY_CLOCK_READ_WAIT_SECONDS = 10.0
ENTRY_CLOCK_RESEND_SECONDS = 0.2
ENTRY_IN_DOUBT_PHASE = "entry outcome unknown"  # the trailing phase shown for an entry in doubt (no stops)
# A protection restart waits this many late answers for the venue's snapshot before its guards start without
# it (the account stream's fills wait for the guards meanwhile).
RESTART_SNAPSHOT_LATE_ANSWERS = 3
# The venue's snapshot for a restore: read this many times at most (a pause between) before each order is
# looked up on its own.
SNAPSHOT_ATTEMPTS = 3
SNAPSHOT_RETRY_SECONDS = 0.25
# An entry of unknown outcome may be a position with no stop: its look-ups back off no further than this (a
# read of one order by id; the protective backoff's 30 s left one waiting 23 s after the venue answered again).
ENTRY_SETTLE_MAX_BACKOFF_SECONDS = 4.0
# An operator's close held back while a refusal would be a ban's looks again this often at whether its
# position still has both stops (one missing, the close goes at once).
OPERATOR_CLOSE_RECHECK_SECONDS = 0.5
# ... and is held no longer than this: `tsbot close` waits 30 s for its answer, and the commands behind it
# wait too. Twice the venue's 10 s order window: the window another client had just filled has turned over.
OPERATOR_CLOSE_HOLD_MAX_SECONDS = 20.0
# How far ahead of the venue's clock a request's timestamp may be and still run (Binance and Bybit both take
# one up to 1 s ahead): a request signed by a clock that runs fast can run this long past its window.
VENUE_TIMESTAMP_LEAD_SECONDS = 1.0
# An entry's look-up due when "no such order" becomes proof is asked this long after that moment (clocks of
# one process: a hair, so that the answer is read after the moment, not just before it).
ABSENCE_PROOF_MARGIN_SECONDS = 0.05
# A read the start needs (markets, credentials, marks) is tried this many times while its failures are
# transient (_startup_read): 1 + 2 + 4 + 8 + 16 s of backoff at the default retry settings.
STARTUP_READ_ATTEMPTS = 6
STREAMED_ENTRIES_KEPT = 256  # entries' ends told by the account stream, the latest (_entry_streamed)
LEASE_SAY_EVERY_SECONDS = 60.0  # an unreachable database is said once a minute, not once per retry
# A protection restart past its grace period looks this often at whether it leaves something unlooked-after
# (the lease then says `starting`): an entry may reach the venue, or fill, in the middle of a restart.
RESTART_EXPOSURE_POLL_SECONDS = 0.25


def package_version() -> str:
    try:
        return importlib.metadata.version("tsbot-tui")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class EngineState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class StartInterrupted(Exception):
    """A start given up while it waited for the venue (a ban's end, a retry's backoff): nothing was restored
    or traded, and everything it had opened is released (`Engine.interrupt_start`)."""


@dataclass(frozen=True, slots=True)
class StartupReport:
    restored: int  # positions whose protection was found live on the exchange
    reprotected: int  # positions that needed new protective orders
    adopted: int  # positions the venue had and the database did not
    failed: int  # positions still uncovered after the first pass
    failed_symbols: tuple[str, ...] = ()
    # Uncovered because the venue refused their stops for reducing nothing: gone from the venue as far
    # as it says, being confirmed by the reconciler (not a protection failure; still uncovered until then).
    gone_symbols: tuple[str, ...] = ()
    # Entries from before the start whose outcome the venue has not told yet (each may be a position without
    # stops: counted uncovered until settled), and open positions on symbols the venue does not list as
    # trading (no guard can act on them: left as they are, said here and logged at ERROR).
    in_doubt_symbols: tuple[str, ...] = ()
    unlisted_symbols: tuple[str, ...] = ()
    # Open in the records, found ended on the venue by the start (a stop that fired while no engine ran, a
    # venue that lost them): closed. Unsaid, a start that closed six positions read "restored 0,
    # re-protected 0, adopted 0, failed 0" (a reviewer).
    closed_symbols: tuple[str, ...] = ()
    # Closed at market by the start itself: a stop it had to place again was already crossed (said as found
    # ended on the venue, r79), or a fired stop never filled.
    breached_symbols: tuple[str, ...] = ()
    # A protection restart that could not list the venue: positions whose stops it kept as the manager it
    # replaced had them confirmed, the account stream unbroken since (checked once the venue answers).
    kept_unread_symbols: tuple[str, ...] = ()

    def describe(self) -> str:
        text = f"restored {self.restored}, re-protected {self.reprotected}, adopted {self.adopted}, failed {self.failed}"
        text += f" ({', '.join(self.failed_symbols)})" if self.failed_symbols else ""
        if self.closed_symbols:
            text += f"; closed {len(self.closed_symbols)}, found ended on the venue: {', '.join(self.closed_symbols)}"
        if self.breached_symbols:
            text += (
                f"; closed {len(self.breached_symbols)} at market, a stop already crossed: "
                f"{', '.join(self.breached_symbols)}"
            )
        if self.gone_symbols:
            text += f"; gone from the venue, being confirmed: {', '.join(self.gone_symbols)}"
        if self.in_doubt_symbols:
            text += f"; entries of unknown outcome, counted uncovered: {', '.join(self.in_doubt_symbols)}"
        if self.unlisted_symbols:
            text += f"; NOT GUARDED, symbol not trading on the venue: {', '.join(self.unlisted_symbols)}"
        if self.kept_unread_symbols:
            text += (
                f"; the venue could not be read: {len(self.kept_unread_symbols)} kept as the running manager "
                "had them confirmed, the account stream unbroken since (checked once the venue answers)"
            )
        return text


@dataclass(frozen=True, slots=True)
class StopReport:
    """What a stop leaves behind: the open positions (their stops stay on the exchange), how many of them
    are uncovered, and entries whose outcome is still unknown (counted as uncovered: they may have filled)."""

    open_positions: int
    uncovered: int
    unresolved_entries: int = 0
    uncovered_symbols: tuple[str, ...] = ()
    # Of the uncovered, managed trails not activated: their hard stop stays, their trail has no order.
    trails_without_order: int = 0
    # Another engine took the account: the open positions are its to protect (and to count) from now on.
    taken_over: bool = False
    # Of the uncovered, those whose stops are in doubt (not confirmed since a gap in the venue's news), none
    # known gone: "UNCOVERED 22" alone, of positions whose 44 stops the venue held, invited a second stop
    # placed by hand (an operator).
    unverified_symbols: tuple[str, ...] = ()

    @property
    def all_protected(self) -> bool:
        return self.uncovered == 0 and self.unresolved_entries == 0

    @property
    def covered(self) -> int:
        """Open positions whose both stops the venue confirmed: the only ones that keep their stops."""
        return self.open_positions - self.uncovered

    def describe(self) -> str:
        positions = counted(self.open_positions, "open position")
        if self.taken_over:
            return (
                f"{positions} left to the engine that took the account; this one no longer protects "
                f"{'it' if self.open_positions == 1 else 'them'}"
            )
        if self.all_protected:  # "uncovered 0" said outright: operators read (and grep) the exit line for it
            return f"{positions} {keep_their_stops(self.open_positions)} on the exchange; uncovered 0"
        # Only the covered ones are said to keep their stops; the others (inside their grace period or not)
        # are uncovered, and no position is counted in both claims.
        return (
            f"{positions}: {self.covered} {keep_their_stops(self.covered)} "
            f"on the exchange; UNCOVERED {self.uncovered + self.unresolved_entries}"
            + (f" ({', '.join(self.uncovered_symbols)})" if self.uncovered_symbols else "")
            + (
                f", {counted(self.unresolved_entries, 'entry', 'entries')} of unknown outcome"
                if self.unresolved_entries
                else ""
            )
            + (f"; {self._unverified_words()}" if self.unverified_symbols else "")
            + (
                f"; {self.trails_without_order} of them "
                f"{'keeps' if self.trails_without_order == 1 else 'keep'} only "
                f"{'its' if self.trails_without_order == 1 else 'their'} hard stop: a managed trail has no "
                "order on the exchange before it activates"
                if self.trails_without_order
                else ""
            )
        )

    def _unverified_words(self) -> str:
        return unverified_words(len(self.unverified_symbols), self.uncovered)


def unverified_words(unverified: int, of: int) -> str:
    """Of `of` positions uncovered, `unverified` only for doubt (none of their stops known gone)."""
    which = "all of them" if unverified == of else f"{unverified} of them"
    return (
        f"{which} unverified: their stops not checked on the venue since a gap in its news, none known "
        "gone (check them on the venue before placing any by hand)"
    )


@dataclass(frozen=True, slots=True)
class PlannedOrder:
    purpose: str
    kind: str  # stop_market | trailing_stop_market | managed trail
    price: Decimal | None


@dataclass(frozen=True, slots=True)
class PlannedProtection:
    position_id: int
    symbol: str
    side: str
    orders: tuple[PlannedOrder, ...]
    last_error: str | None


@dataclass(frozen=True, slots=True)
class ProtectionResult:
    position_id: int
    symbol: str
    covered: bool
    detail: str


# How long a failure stays in the dashboard's "Last error" column once its position is covered again.
LAST_ERROR_FRESH_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class PositionView:
    position_id: int
    symbol: str
    side: str
    quantity: Decimal
    entry_price: Decimal | None  # None: an entry of unknown outcome (it may not have filled)
    mark_price: Decimal | None
    pnl_percent: Decimal | None
    stop_loss_price: Decimal | None
    has_stop_loss: bool
    has_trailing_stop: bool
    trailing_kind: str
    trailing_phase: str  # waiting | active | moving | native | ...
    activation_price: Decimal | None
    distance_to_activation_percent: Decimal | None
    trailing_stop_price: Decimal | None
    covered: bool
    unprotected_seconds: float | None
    last_error: str | None
    closing: bool = False  # a close we sent is in flight: on its way out on purpose, not an alarm
    mark_stale: bool = False  # its mark is older than `health.stale_mark_seconds`: the price shown is old
    trailing_follows: str = "mark"  # the price its trailing stop follows: "mark", or "last" (Bybit's native)
    # A stop not confirmed because its confirmation is in doubt (a gap in the account stream, a mark through
    # it), asked for by its id: shown "unverified", not "missing" (uncovered all the same).
    stop_loss_unverified: bool = False
    trailing_stop_unverified: bool = False
    # `last_error` was said more than LAST_ERROR_FRESH_SECONDS ago: on a covered row it is old history, left
    # out of the table (the detail screen keeps it). A flag, not an age: a view that changes every tick would
    # format every row again on every refresh.
    last_error_old: bool = False
    # The price the venue would liquidate it at, as the venue last stated it (None: not read yet, or none).
    liquidation_price: Decimal | None = None


@dataclass(frozen=True, slots=True)
class WaveView:
    wave_id: int
    started_at: float
    signals: int
    opened: int
    protected: int
    failed: int
    slowest_protection_ms: int | None


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    state: EngineState
    version: str
    started_at: float
    venue: str
    account: str
    mode: str  # SIM | LOCAL | TESTNET | LIVE (`venue_mode`)
    entries_paused: bool
    positions: tuple[PositionView, ...]
    coverage: CoverageFigures
    health: tuple[health.ComponentHealth, ...]
    waves: tuple[WaveView, ...]
    taken_at: float
    entries_paused_by: str = ""  # operator | breaker | lease
    entries_pause_reason: str = ""
    entries_held: tuple[float, str] | None = None  # held back by the venue's word: seconds left, why
    # Every order waits for the venue's word, stops too (`Engine.orders_held`): seconds left, why.
    orders_held: tuple[float, str] | None = None
    # Every open position's coverage facts, by position id (what `coverage` counts): the cheap row of each
    # position (id, symbol, covered). `positions` holds a view of every one of them, or, from
    # `snapshot(views_of=…)`, of those the selector asked for.
    rows: tuple[PositionCoverage, ...] = ()
    # Entries sent whose answer is still on its way (not yet positions, nor in doubt): a stop waits for them
    # and protects what fills.
    entries_sending: int = 0
    # False once a stop has let the positions go (their guards stopped): the positions are then no longer
    # in a snapshot, though every one is still open on the venue. Until then a stop's drain opens and
    # protects positions like a running engine, and its snapshots show them.
    positions_tracked: bool = True
    # The last coverage sample the engine took for the history (`monitoring.coverage_samples`): the gauge's
    # trend draws these, so its "low" and the history screen's are the same samples' figures.
    coverage_sample: CoverageSample | None = None
    # What the start is waiting for at the venue now (a ban's end, a read to try again), "" when it is not:
    # a dashboard said "starting" and every carried position UNCOVERED, and nothing said why (an operator).
    start_waiting_for: str = ""
    # The wave in progress (when it began, how many signals), None between waves: one whose entries wait for
    # the venue opened nothing for 30 s, and the dashboard said "no wave yet" meanwhile (an operator).
    wave_begun: tuple[float, int] | None = None


@dataclass(frozen=True, slots=True)
class RecordedOrders:
    """A position's orders as recorded (`Engine._recorded_orders`)."""

    live: list[OrderRecord]  # those that may be live on the venue
    attached_stop_loss: OrderRecord | None  # the hard stop its entry carried, where the venue carries one
    used_ids: list[str]  # every client id its orders have used

    def protect(
        self, manager: ProtectionManager, position: PositionRecord, *, filled_at: float | None = None
    ) -> PositionGuard:
        """Guard `position` on these records: the live ones verified, the carried stop corrected from the
        fill, no used id sent again."""
        return manager.protect(
            position,
            filled_at=filled_at,
            live_orders=self.live,
            attached_stop_loss=self.attached_stop_loss,
            used_order_ids=self.used_ids,
        )


# A restore's reads from the database (`Engine._restore_records`): the open positions, the orders of each
# that may be live and the ids each has used (by position id), and the trail records.
_RestoreRecords = tuple[
    list[PositionRecord],
    dict[int, list[OrderRecord]],
    dict[int, list[str]],
    dict[int, TrailingStateRecord],
    # Stops that may be live on closed positions, by symbol: their records' ages, and whether placed (`open`).
    dict[str, dict[str, tuple[float, bool]]],
]


# Given every open position's coverage facts (by position id) and the coverage figures, which positions
# need a full view: a screen asks for the rows it shows (engine.snapshot's `views_of`).
ViewSelector = Callable[[Sequence[PositionCoverage], CoverageFigures], Collection[int]]


@dataclass(slots=True)
class _CarriedProtection:
    """While the protection manager restarts: the last verified state of each position, shown until the
    new manager has the venue's word on it. Stops that are on the venue are not "missing" because our
    manager restarted (every row MISSING and 0/20 for seconds after `r`). It stands in only until the new
    manager's guards exist: they are created from one venue snapshot, so a stop really absent from the venue
    shows uncovered at once; without a usable snapshot each guard shows its own (unconfirmed: uncovered)
    state, because then nothing vouches for its stops."""

    views: dict[int, PositionView]
    coverage: dict[int, PositionCoverage]
    since: float = 0.0  # monotonic: the restart began
    # Managed trails armed, not activated: no order on the venue, and nobody moves them while the manager
    # restarts. Counted in place for a grace period (a restart takes a round trip or two: no false dip at
    # every `r`); from then on missing their trailing stop, as the lease's `starting` makes every reader
    # count them; at once in a stop's report (nobody will move them).
    trails_without_order: frozenset[int] = frozenset()
    guards_created: bool = False
    # A start's carried records: whether the record had both stops confirmed (an unverified position is
    # not one the record says uncovered).
    covered_on_record: dict[int, bool] = dataclasses.field(default_factory=dict)

    def fact(self, position_id: int, now: float, grace: float) -> PositionCoverage:
        if now - self.since >= grace:
            return self.left_by_a_stop(position_id)
        return self.coverage[position_id]

    def left_by_a_stop(self, position_id: int) -> PositionCoverage:
        """What protects the position once no engine runs: the orders the venue holds."""
        fact = self.coverage[position_id]
        if position_id not in self.trails_without_order:
            return fact
        since = self.since if fact.unprotected_since is None else fact.unprotected_since
        return dataclasses.replace(fact, has_trailing_stop=False, unprotected_since=since)

    def unverified_from(
        self, now: float, why: str = "not verified: the protection restart waits for the database"
    ) -> None:
        """Nothing verifies these positions from `now` on (a restart waiting for the database, a start
        waiting for the venue): each counts as without confirmed stops since then, uncovered once past its
        grace period."""
        for position_id, fact in self.coverage.items():
            self.coverage[position_id] = dataclasses.replace(
                fact,
                has_stop_loss=False,
                has_trailing_stop=False,
                unprotected_since=now if fact.unprotected_since is None else fact.unprotected_since,
            )
            view = self.views[position_id]
            self.views[position_id] = dataclasses.replace(
                view,
                has_stop_loss=False,
                has_trailing_stop=False,
                # The stops it had are unverified, not missing: every row read MISSING while a start waited
                # out a ban, the venue holding both stops of 8 of 9 (an operator).
                stop_loss_unverified=view.has_stop_loss or view.stop_loss_unverified,
                trailing_stop_unverified=(view.has_trailing_stop or view.trailing_stop_unverified)
                and position_id not in self.trails_without_order,  # (a managed trail: no order to verify)
                covered=False,
                last_error=why,
            )

    def view_at(self, position_id: int, now: float, grace: float) -> PositionView:
        view = self.views[position_id]
        fact = self.fact(position_id, now, grace)
        if fact.covered or fact.unprotected_since is None:
            return view
        if view.covered:  # a managed trail the restart has not moved for a grace period
            view = dataclasses.replace(
                view,
                has_trailing_stop=False,
                covered=False,
                last_error="the managed trail is not moved while the protection manager restarts",
            )
        return dataclasses.replace(view, unprotected_seconds=now - fact.unprotected_since)


def _conditional_spare(cap: int) -> int:
    """The room kept under the venue's cap on open conditional orders for stop moves."""
    return max(CONDITIONAL_SPARE_MIN, cap // CONDITIONAL_SPARE_DIVISOR)


def entries_toggle_level(*, paused: bool, by: str) -> int:
    """How loud a change of the entries' state is: a pause the operator did not ask for (the breaker, the
    lease, the database) is a warning; an operator's pause or resume, or a resume, is routine (counted as
    a warning, it filled the log panel's warning count with the operator's own keys)."""
    return logging.WARNING if paused and by not in ("", "operator") else logging.INFO


class EntryNotSentAgain(Exception):
    """An entry the venue refused for its rate (it never ran) is not sent again: the engine is stopping,
    or entries were paused while it waited for room."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


NO_POSITION_ON_RECORD = "no open position on the record"


@dataclass(frozen=True, slots=True)
class _StartLeft:
    """What a start that did not finish leaves: in words, the symbols uncovered, the entries of unknown
    outcome on the record."""

    words: str
    uncovered: list[str]
    unknown_entries: list[str]


@dataclass(slots=True)
class EntryInDoubt:
    """An entry sent whose outcome the venue has not told: its answer lost, the look-ups by its id failing.
    It may have filled, so it counts as a position without stops from its send, and its symbol stays held,
    until a look-up settles it. The chaos soak recorded one `failed` after a single failed look-up: the
    venue held it with no stop of ours for 68 s, the reconciler's list answering [] on most passes."""

    position_id: int
    symbol: str
    side: PositionSide
    quantity: Decimal
    client_order_id: str
    sent_at: float = 0.0  # monotonic: the last send of the entry (its time unprotected counts from here)
    # Monotonic: when its outcome became unknown (every send of it was before); "no such order" proves it
    # absent only a request window and a read lag after this (`Engine._absence_provable_in`).
    unknown_at: float = 0.0
    # Left by an earlier run (`Engine._doubt_restored_entry`): the monotonic moment from which the breaker
    # judges it, when this engine could first have settled it (the venue's proof of absence). Its time
    # without stops on every surface still counts from its send.
    judged_from: float = 0.0
    error: str = ""
    # The venue answered it accepted and working, not filled yet (Bybit's asynchronous creation answers New
    # as a matter of course): no alarm, unlike an answer lost (`Engine._settle`). Counted uncovered alike.
    working: str = ""  # its status on the venue then ("new", "partially_filled")
    # Set when the account stream told the entry's outcome (`Engine._entry_streamed`): the look-ups stop.
    heard: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    # Set once it is settled; `guard` is then the position it turned out to be (None: it never executed).
    ended: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    guard: PositionGuard | None = None
    # The reconciler adopted what the venue holds on its symbol into its record (`Engine._adopt`): that
    # record is the adopted position's from then on, whatever the entry's own answer says. `flipped`: it
    # holds the other side (not the entry's). The entry's answer and an adoption take turns: `adopting` is
    # set once an adoption under way ends, `answering` once the answer is being applied (no adoption then).
    adopted: bool = False
    flipped: bool = False
    adopting: asyncio.Event | None = None
    answering: bool = False

    def coverage(self, *, judged: bool = False) -> PositionCoverage:
        """Its facts; `judged`: as the breaker judges them (see `judged_from`)."""
        since = max(self.sent_at, self.judged_from) if judged else self.sent_at
        return PositionCoverage(self.position_id, self.symbol, False, False, since, since)

    def view_at(self, now: float, mark: Decimal | None) -> PositionView:
        return _unguarded_view(
            (self.position_id, self.symbol, self.side.value, self.quantity),
            None,  # not known: nothing says it filled, or at what price
            mark,
            ENTRY_IN_DOUBT_PHASE,
            now - self.sent_at,
            self.error,
        )


@dataclass(slots=True)
class _AwaitingGuard:
    """A position filled that no guard has yet, a position without stops until then: its fill being
    recorded (the database may take seconds to answer), or the protection manager restarting."""

    position_id: int
    symbol: str
    side: str
    quantity: Decimal
    entry_price: Decimal | None
    filled_at: float  # monotonic
    why: str = "filled, its record being written: no stop yet"

    def coverage(self, *, judged: bool = False) -> PositionCoverage:
        return PositionCoverage(self.position_id, self.symbol, False, False, self.filled_at, self.filled_at)

    def view_at(self, now: float, mark: Decimal | None) -> PositionView:
        return _unguarded_view(
            (self.position_id, self.symbol, self.side, self.quantity),
            self.entry_price,
            mark,
            "waiting for its guard",
            now - self.filled_at,
            self.why,
        )


def _unguarded_view(
    who: tuple[int, str, str, Decimal],
    entry_price: Decimal | None,
    mark: Decimal | None,
    phase: str,
    unprotected_seconds: float,
    error: str,
) -> PositionView:
    """The row of a position no guard has (yet): no stop of ours, uncovered. `who`: its id, symbol, side
    and quantity."""
    position_id, symbol, side, quantity = who
    return PositionView(
        position_id=position_id,
        symbol=symbol,
        side=side,
        quantity=quantity,
        entry_price=entry_price,
        mark_price=mark,
        pnl_percent=None,
        stop_loss_price=None,
        has_stop_loss=False,
        has_trailing_stop=False,
        trailing_kind="—",
        trailing_phase=phase,
        activation_price=None,
        distance_to_activation_percent=None,
        trailing_stop_price=None,
        covered=False,
        unprotected_seconds=unprotected_seconds,
        last_error=error,
    )


# The loops `Engine._start_watching_the_venue` starts: a start that fails after stops them.
WATCHING_THE_VENUE = ("mark-feed", "silent-marks", "markets", "marks-to-db", "reconciler", "account-stream")


class _Supervisor:
    """Runs named loops; a loop that fails is logged and restarted with backoff. Nothing unowned."""

    def __init__(self, clock: Clock):
        self._clock = clock
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.restarts: dict[str, int] = {}
        self.database_back: Callable[[], Awaitable[None]] | None = None

    HEALTHY_RUN_SECONDS = 60.0  # a loop that ran this long before failing starts its backoff afresh

    def start(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        self._tasks[name] = asyncio.create_task(self._run(name, loop), name=name)

    async def stop_one(self, name: str, grace_seconds: float = 10.0) -> None:
        """Stop one loop and wait until it has (a pass in flight is cancelled, not left running), within
        `grace_seconds`: a loop cancelled inside a database call on a frozen server waits on that server
        (asyncpg sends it the cancel), and the engine's stop must not wait with it."""
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            _done, pending = await asyncio.wait({task}, timeout=grace_seconds)
            if pending:
                log.error("task %s did not stop within %.0fs", name, grace_seconds)

    async def _run(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        delay = 1.0
        while True:
            started = self._clock.monotonic()
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except DatabaseDown as exc:  # said once per interval by the database watch, not per loop
                log.debug("%s waits for the database: %s", name, exc)
                await self._clock.sleep(1.0)
                if self.database_back is not None:
                    await self.database_back()
            except Exception:
                if self._clock.monotonic() - started >= self.HEALTHY_RUN_SECONDS:
                    delay = 1.0  # it had recovered: this is a new failure, not the same one again
                self.restarts[name] = self.restarts.get(name, 0) + 1
                log.exception("%s failed; restarting in %.0fs", name, delay)
                await self._clock.sleep(delay)
                delay = min(delay * 2, 60.0)

    async def stop(self, grace_seconds: float = 10.0) -> None:
        for task in self._tasks.values():
            task.cancel()
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks.values(), timeout=grace_seconds)
            for task in pending:
                log.error("task %s did not stop within %.0fs", task.get_name(), grace_seconds)
        self._tasks.clear()


def connection_pool_size(settings: Settings) -> int:
    """HTTP connections to the venue: enough for the largest burst the engine makes at once (every entry
    of a wave in flight, then each one's two stops together, plus the entries of the next wave and the
    reads), so no protective order ever queues for a connection."""
    return 4 * settings.signals.max_concurrent_entries + 64


def sim_book_location(settings: Settings) -> Path:
    """The sim venue's kept book: beside the embedded database's data directory, one per database and
    account label (a database at a DSN is named by a digest of the DSN)."""
    from engine.venues.sim import sim_book_path

    db = settings.database
    data_dir = Path(db.data_dir) if db.data_dir else default_data_dir()
    database = f"dsn-{hashlib.sha256(db.dsn.encode()).hexdigest()[:12]}" if db.dsn else db.name
    return sim_book_path(data_dir, database, settings.venue.account)


def build_venue(settings: Settings, clock: Clock) -> ExchangePort:
    if settings.venue.kind is VenueKind.SIM:
        from engine.venues.sim import SimBookFile, SimVenue

        book = SimBookFile(sim_book_location(settings)) if settings.venue.sim.keep_book else None
        return SimVenue(settings.venue.sim, clock=clock, book=book)
    problems = real_venue_problems(settings.venue)
    if problems:
        raise ConfigError(problems)
    from engine.venues.ccxt_venue import CcxtVenueConfig, build_ccxt_venue
    from engine.venues.ip_bans import ip_ban_record_path

    venue = settings.venue
    assert venue.api_key is not None and venue.api_secret is not None
    config = CcxtVenueConfig(
        kind=venue.kind.value,
        api_key=venue.api_key.get_secret_value(),
        api_secret=venue.api_secret.get_secret_value(),
        testnet=venue.testnet,
        base_url=venue.base_url,
        # The engine's own budget (from the moment a request is sent) times calls out; this is the net.
        request_timeout_seconds=float(settings.protection.call_timeout_seconds) + 1.0,
        ip_ban_record=ip_ban_record_path(settings.logging.file),
        max_connections=connection_pool_size(settings),
    )
    return build_ccxt_venue(config, clock=clock)


class Engine:
    def __init__(
        self,
        settings: Settings,
        *,
        venue: ExchangePort | None = None,
        clock: Clock | None = None,
        version: str | None = None,
        generate_signals: bool | None = None,
    ):
        self.settings = settings
        self.clock = clock or SystemClock()
        self.venue = venue or build_venue(settings, self.clock)
        self.version = version or package_version()
        self.account_key = account_key(settings.venue)  # whose account: every query is scoped to it (F16)
        self.events_bus = EventBus()
        self.state = EngineState.STOPPED
        self.started_at = 0.0
        # (symbol, why, routine) by wave, until said
        self._rejected_in_wave: dict[int, list[tuple[str, str, bool]]] = {}
        # F10: the code this process runs (fingerprinted at its start, recorded with the lease), checked
        # against the disk every `code_check_seconds` (None: not by the engine; the dashboard checks itself).
        self.code: SourceWatcher = running_code()
        self.code_check_seconds: float | None = CODE_CHECK_SECONDS
        self.code_difference: CodeDifference | None = None
        self.entries_paused = False  # what `_validate` obeys: a persisted pause, or no lease
        self._positions_let_go = False  # a stop has stopped the guards (`EngineSnapshot.positions_tracked`)
        self.entries_paused_by = ""  # operator | breaker | lease ("" when entries are on)
        self.entries_pause_reason = ""
        self.lease_lost_since: float | None = None  # monotonic; None while the lease is held
        self.fatal: str | None = None  # why the engine stopped itself (another engine took the account)
        self._persisted_pause: tuple[bool, str, str] = (False, "", "")  # (paused, by, reason) in the database
        # When the breaker's pause began (epoch seconds), and whether an earlier run's pause was carried here.
        self._breaker_paused_at: float | None = None
        self._breaker_pause_carried = False
        self._breaker_healthy_since: float | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.startup_report: StartupReport | None = None
        self._previous_heard: datetime | None = None  # the last engine's last heartbeat, when it left things
        self._generate = (
            settings.signals.source.value == "sim" if generate_signals is None else generate_signals
        )
        self._supervisor = _Supervisor(self.clock)
        self._db: Database | None = None
        self._lease: EngineLease | None = None
        self._heard: asyncio.Task[None] | None = None  # heartbeats while `_lease_heartbeat` does not run
        self._beat: asyncio.Future[None] | None = None  # its heartbeat in flight
        self._heard_phase = LeasePhase.STARTING  # what it writes
        # What the lease's watcher writes: `starting` while a protection restart has no guards yet.
        self._running_phase = LeasePhase.RUNNING
        self._running_phase_changed = asyncio.Event()  # the watcher writes it at once
        self.store: ResilientStore | None = None  # journals the protection path's writes in an outage
        self.db_watch: DatabaseWatch | None = None
        self.manager: ProtectionManager | None = None
        self.reconciler: Reconciler | None = None
        # The venue's account events, read by a supervised loop and handed to the guards (the reconciler
        # stays the safety net); None before the loops start.
        self.account_stream: AccountStreamReader | None = None
        self._stream_mark_at_restart: tuple[int, int] | None = None  # `_restart_protection`
        self.consumer: SignalConsumer | None = None
        self.commands: CommandRunner | None = None
        self.markets: dict[str, Market] = {}
        self.marks: dict[str, MarkPrice] = {}
        self._mark_received_at: dict[str, float] = {}  # monotonic, per symbol: its mark's age on our clock
        self._mark_streamed_at: dict[str, float] = {}  # monotonic, per symbol: its last mark from the stream
        self._last_mark_at: float | None = None
        self._last_wave_at: float | None = None
        self._connected_at = 0.0
        self._loops_started_at = 0.0  # monotonic: when the background loops (the streams' readers) started
        self._account_seen_down_at: float | None = None  # monotonic, as `stale_streams` saw it down first
        self._streams_seen_up: set[str] = set()  # the venue's push streams seen connected since the start
        self._in_flight: set[str] = set()
        # Entries of unknown outcome, by symbol (their symbols stay in `_in_flight`), and the tasks settling them.
        self._in_doubt: dict[str, EntryInDoubt] = {}
        self._sending: dict[str, EntryInDoubt] = {}  # entries on their way, by client id (`_send_entry`)
        # Of those, entries the venue refused for its rate (not executed), waiting to be sent again.
        self._refused_waiting: set[str] = set()
        self._rows: tuple[PositionCoverage, ...] = ()  # the last snapshot's facts (rows_by_position)
        # Entries of ours the account stream said ended (filled, or not), by client id, the latest kept:
        # the evidence that settles an entry in doubt, which may only become one after its event came.
        self._streamed_entries: dict[str, Order] = {}
        self._settlers: set[asyncio.Task[None]] = set()
        self._waves: deque[WaveView] = deque(maxlen=50)
        self._coverage_sample: CoverageSample | None = None  # the last taken for the history
        self.start_waits_for = ""  # what the start last waited for at the venue (said if it is given up)
        self.start_waiting_for = ""  # what it waits for now ("" once the wait is over)
        # The start waits for the venue long enough to be said as it waits (a ban), not a quick retry.
        self.start_waiting = asyncio.Event()
        # The last reconcile pass that answered (monotonic; the start's read counts), and why the passes
        # since failed ("" while they answer): health says when the venue's stops go unchecked.
        self._reconciled_at: float | None = None
        self._reconcile_failed = ""
        self._lease_since: datetime | None = None  # when this engine first took the account's lease
        self._start_interrupted = asyncio.Event()  # `interrupt_start`: the start's waits end, it gives up
        self._wave_tasks: set[asyncio.Task[None]] = set()
        self._health: tuple[health.ComponentHealth, ...] = ()
        self._call_stats = CallStats()
        self.budget_waits = BudgetWaits()
        self.stop_report: StopReport | None = None
        self._draining = False  # stopping: no new signal is claimed, no unsent entry is sent
        self._stop_begun = asyncio.Event()  # wakes what waits to send an entry: it is not sent now
        self._health_wake = asyncio.Event()  # the health check runs now, not at its interval
        self._wave_in_progress: asyncio.Future[None] | None = None
        self._wave_begun: tuple[float, int] | None = None  # the wave in progress: when, how many signals
        self._ran = False  # its start finished: it looked after the account's positions
        self.request_pacer: RequestPacer | None = None
        self.order_budget: OrderBudget | None = None
        self._venue_pacing: VenuePacing | None = None
        self._stopped = asyncio.Event()
        self._token = ""
        self.alerter = Alerter.from_settings(  # None without alert URLs
            settings.alerts, self.clock, source=f"{self.exchange_name}:{settings.venue.account}"
        )
        self._carried: _CarriedProtection | None = None  # while the protection manager restarts
        self._records_timer: asyncio.Future[None] | None = None  # `_carry_the_records`' grace
        # Positions filled while the protection manager restarts, until the new manager guards them.
        self._awaiting_guard: dict[int, _AwaitingGuard] = {}
        self._alerts_started = False
        self.start_left: str | None = None  # a start that did not finish: what it leaves, in words
        self._records_read = False  # the start has read the open positions on the record
        self._records_pending: list[str] = []  # ... and the entries it left pending (no fill recorded)
        # Cleared while the protection manager restarts: an entry that fills meanwhile waits for the new
        # manager (the one it started under is stopped; a guard there would run unseen).
        self._protection_ready = asyncio.Event()
        self._protection_ready.set()
        # Cleared while the protection manager restarts, until the new one has reconciled the venue's list
        # (stale stops found cancelled): entries wait for it.
        self._entries_handed_over = asyncio.Event()
        self._entries_handed_over.set()
        self._restart: asyncio.Task[StartupReport] | None = None  # the protection restart under way
        self.health_measured_at: float | None = None  # monotonic time of the last health measurement
        # `/metrics` and `/healthz` ([metrics]), bound at start: None unless enabled.
        self.metrics_server = MetricsServer(self, settings.metrics) if settings.metrics.enabled else None

    # --- lifecycle -----------------------------------------------------------------------------------

    @property
    def exchange_name(self) -> str:
        return self.venue.name

    @property
    def call_stats(self) -> CallStats:
        """Every venue call's latency and outcome (the health rules' window, the metrics' histograms)."""
        return self._call_stats

    @property
    def health_components(self) -> tuple[health.ComponentHealth, ...]:
        """The last health measurement, per component (empty before the first)."""
        return self._health

    def current_health(self, figures: CoverageFigures | None = None) -> tuple[health.ComponentHealth, ...]:
        """The last health measurement, its protection component judged again from the coverage of this
        instant (`figures`, when the caller has them). Between two measurements (5 s by default) /healthz
        and the dashboard paired a verdict on stops lost a moment ago, or found again, with live figures
        that said otherwise (an operator saw "critical" beside "uncovered 0")."""
        manager = self.manager
        if not self._health:
            return self._health
        if figures is None:
            figures = self.coverage()
        now = self.clock.monotonic()
        # (between two managers, a protection restart's, the facts carried through it: no timeouts counted)
        timeouts = manager.timeouts.count(now, 3600.0) if manager is not None else 0
        live = health.evaluate_protection(
            health.ProtectionMeasurement.of(figures, timeouts, *self._stops_unchecked(now)),
            health.HealthThresholds.from_settings(self.settings.health),
        )
        return tuple(live if c.component is health.Component.PROTECTION else c for c in self._health)

    @property
    def mode(self) -> str:
        return venue_mode(self.settings.venue)

    async def start(self) -> StartupReport:
        """Open everything, restore and verify protection, then start trading. Raises `LeaseHeld` when
        another engine trades this account (nothing is touched then)."""
        self._set_state(EngineState.STARTING)
        self.started_at = self.clock.now()
        db = self.settings.database
        password = db.password.get_secret_value() if db.password else None
        try:
            self._db = await open_database(
                db.dsn,
                db.data_dir,
                db.name,
                password=password,
                min_size=db.pool_min_size,
                max_size=db.pool_max_size,
                command_timeout=float(db.command_timeout_seconds),
            )
        except BaseException:
            await self._stop_metrics()
            raise
        try:
            self._lease = await self._acquire_lease(LeasePhase.STARTING)
            # The metrics port after the lease: a second engine on this account (whose port the first one
            # holds) is told who trades it, not that the port is taken. Before anything else is touched.
            if self.metrics_server is not None:
                await self.metrics_server.bind()
                self._supervisor.start("metrics", self.metrics_server.serve)
                self._supervisor.start("metrics-failures", self.metrics_server.count_failures)
            self._keep_heard(LeasePhase.STARTING)
            self.store = ResilientStore(self._db.pool, self.account_key)
            self._token = await self.store.installation_token()
            await self._replay_left_journal()
            await self._record_trails_a_dead_engine_left()
            await self._carry_the_records()
            self._start_alerts()  # a start may wait out a ban for minutes: what it carries is alerted on
            control = await self.store.entries_control(self.exchange_name, self.account_key)
            if control is not None and control.paused:
                self._persisted_pause = (True, control.paused_by, control.reason)
                if control.paused_by == "breaker":
                    self._breaker_paused_at = control.since.timestamp()
                    self._breaker_pause_carried = True
                self._apply_entries_state()
                log.warning(
                    "entries stay paused (by %s since %s: %s): only the operator resumes them",
                    control.paused_by,
                    control.since.isoformat(timespec="seconds"),
                    control.reason or "no reason given",
                )
            # Pacing first: every request from the very first one goes through the engine's budgets.
            self.request_pacer = RequestPacer(
                self.venue.capabilities().request_budgets, self.clock, waits=self.budget_waits
            )
            self._venue_pacing = VenuePacing(self.request_pacer, None, self.clock)
            self.venue.attach_pacing(self._venue_pacing)
            await self.venue.connect()
            self._connected_at = self.clock.monotonic()
            self.markets = dict(await self._startup_read("load_markets", self.venue.load_markets))
            self._say_the_conditional_order_cap()
            # A signed read before anything is restored or traded. A wrong key or secret stops
            # the start here (CredentialsRefused: one line, exit 2) instead of running with every order refused.
            await self._startup_read("the credentials' check", lambda: check_credentials(self.venue))
            # The order budget as the venue announced it (exchangeInfo), kept across protection restarts:
            # the venue's counts do not reset when our manager does.
            self.order_budget = OrderBudget(
                self.venue.capabilities().order_rate_budgets,
                self.clock,
                round_trip=lambda: self.manager.order_round_trip_seconds if self.manager is not None else 0.0,
                headroom=DEFAULT_HEADROOM,
                waits=self.budget_waits,
                protective_budgets=self.venue.capabilities().protective_rate_budgets,
                probe_patience_seconds=float(self.settings.protection.call_timeout_seconds),
                requests_held=self.request_pacer.held_for,
            )
            self._venue_pacing.orders = self.order_budget
            self.marks = await self._startup_read("fetch_mark_prices", self.venue.fetch_mark_prices)
            self._last_mark_at = self.clock.monotonic()
            self._mark_received_at = dict.fromkeys(self.marks, self._last_mark_at)
            self._mark_streamed_at = dict(self._mark_received_at)
            self.startup_report = await self._start_protection()
            self._carried = None  # (the records carried through the start: its guards know better now)
            self._end_records_timer()
            # Signals our last run claimed and never handled (it died holding them): expired, with a reason.
            expired = await self.store.expire_claimed_signals(claimed_by=self._claimer)
            if expired:
                log.warning(
                    "%s claimed by this engine's last run never handled: expired", counted(expired, "signal")
                )
            # Once the entries it left are settled (those still in the venue's read lag are looked up in
            # the background): a wave finished before counted them not opened.
            self._spawn(self._finish_waves_a_dead_engine_left(list(self._settlers)), "finish-waves-left")
            log.info("engine started: %s", self.startup_report.describe())
            await self.store.record_event(
                Severity.INFO,
                "engine_started",
                f"engine {self.version} started: {self.startup_report.describe()}",
            )
        except BaseException as exc:  # the lease (and its heartbeat) ends with a start that does not finish
            # What it leaves, counted while its guards still say it (after they stopped, "no open position").
            _guards, carried_ids, facts = self._protection_facts()
            # The venue's watchers first (as a protection restart stops its reconciler first): a reconcile
            # pass that outlived the manager adopted into it, or started a sweep nobody would end.
            await self._stop_watching_the_venue()
            if self.manager is not None:  # and so do its guards: none acts for an account no engine holds
                await _quietly(self.manager.stop())
            settlers = list(self._settlers)  # (entries from before the start, looked up in the background)
            for task in settlers:
                task.cancel()
            await asyncio.gather(*settlers, return_exceptions=True)
            left = self._what_the_start_leaves(carried_ids, facts)
            self.start_left = left.words
            if self._lease is not None and self._records_read:  # (refused the account, it says nothing)
                record_last_stop(
                    self._last_stop_path(),
                    stopped_at=_utc(self.clock.now()),
                    open_positions=len(facts) + len(left.unknown_entries),
                    uncovered=tuple(left.uncovered),
                    unresolved_entries=len(left.unknown_entries),
                    said=f"the start did not finish; {left.words}",
                )
            try:
                await self._release()  # the lease first: the alert's delivery may take seconds
            finally:
                await self._alert_start_given_up(exc, left)
            raise
        self._start_loops()
        # What the last holder left is this engine's now: the next holder dates from this one's heartbeat.
        # Not before the start has run: a start given up in a ban's wait after a kill -9 said it while the
        # dead engine's waves were not finished yet, and the start after it dated that engine (and its
        # waves) by the given-up start's heartbeat, 15 s late (r77). (Journaled, the trails' record lands
        # later: the next holder must still know the time.)
        if self._lease is not None and self.store is not None and not self.store.down:
            self._lease.handed_over()
        # The positions are this engine's to protect now (not before: a start that fails protects nothing,
        # and the last stop's record must still say what was left then).
        forget_last_stop(self._last_stop_path())
        self._set_state(EngineState.RUNNING)
        self._ran = True
        return self.startup_report

    def _start_alerts(self) -> None:
        """The alerts' delivery and checks, once: from the start (its records carried), not from its end. A
        start waiting out a ban for minutes, positions without stops on the record, alerted nothing, nor did
        one given up on (a reviewer)."""
        alerter = self.alerter
        if alerter is None or self._alerts_started:
            return
        self._alerts_started = True
        alerter.start()
        self._supervisor.start("alerts", lambda: alerter.watch(EngineObserver(self)))

    def _what_the_start_leaves(self, carried_ids: list[int], facts: list[PositionCoverage]) -> _StartLeft:
        """A start that does not finish: what it leaves. `facts` are taken before its guards stopped. A
        position a guard has is judged as the guard found it; one only carried from the record is uncovered
        if the record says so, else not verified (the venue did not vouch for it: "nine uncovered" was said
        of nine the record had one of uncovered, an operator); an entry the record left pending that nothing
        settled is of unknown outcome (it may be a position without stops: left out, a reviewer saw a naked
        position reported UNKNOWN)."""
        if not self._records_read:
            return _StartLeft("the record of its positions was not read", [], [])
        carried = set(carried_ids)
        on_record = self._carried.covered_on_record if self._carried is not None else {}
        uncovered: list[str] = []
        unverified = 0
        for fact in facts:
            if fact.position_id in carried and on_record.get(fact.position_id, False):
                unverified += 1
            elif fact.position_id in carried or not fact.covered:
                uncovered.append(fact.symbol)
        held = {f.symbol for f in facts}
        unknown = sorted(s for s in self._records_pending if s not in held)
        count = len(facts) + len(unknown)
        if not count:
            return _StartLeft(NO_POSITION_ON_RECORD, [], [])
        words = f"{count} open position{'s' if count != 1 else ''}{' on the record' if carried else ''}"
        if uncovered:
            words += f", {len(uncovered)} uncovered ({', '.join(sorted(uncovered)[:10])})"
        if unverified:
            words += f", {unverified} not verified (the venue was not read)"
        if unknown:
            words += f", {len(unknown)} entr{'ies' if len(unknown) != 1 else 'y'} of unknown outcome ({', '.join(unknown[:10])})"
        if not (uncovered or unverified or unknown):
            words += ", each with both stops confirmed on the venue"
        return _StartLeft(words, sorted(uncovered), unknown)

    async def _alert_start_given_up(self, exc: BaseException, left: _StartLeft) -> None:
        """A start that does not finish says so off-screen, with what it leaves: nothing protects those
        positions but the stops already on the venue."""
        alerter = self.alerter
        if alerter is None or not self._alerts_started:
            return
        try:
            await self._supervisor.stop_one("alerts")
        except Exception:
            log.exception("stopping the alerts' checks failed")
        why = str(exc) or type(exc).__name__
        protected = not (left.uncovered or left.unknown_entries)
        alerter.engine_stopped(f"the start did not finish ({why[:200]}); {left.words}", protected, None)
        await alerter.close()

    async def _carry_the_records(self) -> None:
        """Until the start's guards exist (its reads of the venue may wait out a ban for minutes), the open
        positions on the record are shown and counted as the record has them, for a grace period; past it,
        unverified (uncovered): nothing has read the venue. The dashboard, /healthz and /metrics said
        "Positions 0, uncovered 0" for the 10 minutes a start waited out a ban, while the venue held 21
        positions, 2 of them without a stop (an operator)."""
        assert self.store is not None
        recorded = await self.store.open_positions()
        positions = [p for p in recorded if p.entry_price is not None]
        self._records_pending = sorted(p.symbol for p in recorded if p.entry_price is None)
        self._records_read = True
        if not positions:
            return
        now = self.clock.monotonic()
        coverage = {
            p.id: PositionCoverage(
                p.id,
                p.symbol,
                p.has_stop_loss,
                p.has_trailing_stop,
                self._monotonic_of(p.opened_at),
                None if p.is_covered else self._monotonic_of(p.unprotected_since or p.opened_at),
            )
            for p in positions
        }
        views = {
            p.id: dataclasses.replace(
                _unguarded_view(
                    (p.id, p.symbol, p.side, p.quantity),
                    p.entry_price,
                    None,
                    "not verified yet",
                    0.0,
                    "",
                ),
                stop_loss_price=p.stop_loss_price,
                has_stop_loss=p.has_stop_loss,
                has_trailing_stop=p.has_trailing_stop,
                covered=p.is_covered,
                unprotected_seconds=None,
                # (Uncovered on the record: a stop found missing before, or a managed trail nobody moved.)
                last_error=None
                if p.is_covered
                else "uncovered on the record; the start has not read the venue yet",
            )
            for p in positions
        }
        carried = self._carried = _CarriedProtection(
            views=views,
            coverage=coverage,
            since=now,
            covered_on_record={p.id: p.is_covered for p in positions},
        )
        # Not a background task (a stop waits for those): cancelled once the start's guards exist.
        self._records_timer = asyncio.ensure_future(self._records_unverified_after_grace(carried))

    def _end_records_timer(self) -> None:
        timer, self._records_timer = self._records_timer, None
        if timer is not None:
            timer.cancel()

    async def _records_unverified_after_grace(self, carried: _CarriedProtection) -> None:
        await self.clock.sleep(self._grace_seconds())
        if self._carried is carried and not carried.guards_created:
            log.warning(
                "start: the venue not read after %.0fs; %s on the record count%s as unverified "
                "(uncovered) until it is read",
                self._grace_seconds(),
                "the 1 open position"
                if len(carried.views) == 1
                else f"the {len(carried.views)} open positions",
                "s" if len(carried.views) == 1 else "",
            )
            carried.unverified_from(carried.since, "not verified: the start has not read the venue yet")

    async def _startup_read(self, what: str, read: Callable[[], Awaitable[T]]) -> T:
        """A venue read the start cannot go on without (the markets, the credentials' check, the marks). A
        failure that says the venue may answer next time (not executed, no answer, rate limited) is tried
        again with backoff, each retry said; before, one HTTP 500 on the markets ended the start ("the
        engine did not start"), the positions on the venue left unguarded until an operator started it
        again. A ban is waited out, however long, without counting as an attempt: the start is what
        protects the positions the venue holds, and nothing can reach the venue before the ban's end
        anyway (before, a restart inside a ban ended at once and protected nothing after it). A refusal (a
        wrong key, a rejected request) still ends it at once."""
        protection = self.settings.protection
        delay = float(protection.retry_initial_seconds)
        attempt = 1
        while True:
            try:
                return await read()
            except Banned as exc:
                left = exc.until - self.clock.now()
                if left <= 0:  # a ban said over already: an ordinary failed attempt
                    if attempt == STARTUP_READ_ATTEMPTS:
                        raise
                    attempt += 1
                    await self._start_wait(delay, f"{what}: {exc}")
                    delay = min(delay * 2, float(protection.retry_max_seconds))
                    continue
                log.warning(
                    "start-up: the venue refuses us until %s (%s left: %s); %s waits for that end "
                    "(a stop gives the start up meanwhile)",
                    datetime.fromtimestamp(exc.until, tz=UTC).strftime("%H:%M:%S UTC"),
                    format_duration(left),
                    exc,  # the venue's own words: a ban, or a 403 that is something else (a region block)
                    what,
                )
                await self._start_wait(left, f"{what}: {exc}")
            except (Retryable, OutcomeUnknown, RateLimited, TimeoutError) as exc:
                if attempt == STARTUP_READ_ATTEMPTS:
                    raise
                wait = max(delay, exc.retry_after) if isinstance(exc, RateLimited) else delay
                log.warning(
                    "start-up: %s failed (%s); trying again in %.1fs (attempt %d of %d)",
                    what,
                    exc,
                    wait,
                    attempt + 1,
                    STARTUP_READ_ATTEMPTS,
                )
                await self._start_wait(wait, f"{what} failed: {exc}")
                delay = min(delay * 2, float(protection.retry_max_seconds))
                attempt += 1

    def interrupt_start(self) -> None:
        """Ask a start that waits for the venue (a ban's end, a retry's backoff) to give up
        (`StartInterrupted`, everything released as for a failed start). A start past those waits, restoring
        and protecting positions, is not cut short: it finishes, and a stop then drains it (cut in the
        middle, stops already sent for naked positions lost their answers)."""
        self._start_interrupted.set()

    def start_given_up_words(self, who: str) -> str:
        """One line for a start given up while it waited for the venue (`StartInterrupted`): `who` says what
        ended it ("stopped", "quit", "--duration 5 ended"). What the record holds, not "they keep the stops
        they had": one there had none (an operator)."""
        left = self.start_left or "nothing known of the positions"
        waited = f" ({self.start_waits_for})" if self.start_waits_for else ""
        kept = (
            "any position on the venue keeps only the stops it had"  # (one opened by hand, say)
            if left == NO_POSITION_ON_RECORD
            else "the positions on the venue keep only the stops they had"
        )
        return (
            f"{who} during the start-up, while it waited for the venue{waited}: nothing was restored or "
            f"traded; {left}; {kept} (see `tsbot status`)"
        )

    async def _start_wait(self, seconds: float, why: str) -> None:
        """Wait `seconds` for the venue (`why`: what it waits for), unless the start is given up."""
        self.start_waits_for = self.start_waiting_for = why
        if seconds >= START_WAIT_SAID_SECONDS:
            self.start_waiting.set()
        try:
            interrupted = await wait_event(self.clock, self._start_interrupted, seconds)
        finally:
            self.start_waiting_for = ""
        if interrupted:
            raise StartInterrupted("the start was given up while it waited for the venue")

    def _start_watching_the_venue(self) -> None:
        """The loops that bring the venue's news to the guards: the account stream, the periodic reconcile,
        the marks and the markets. Started once the start's guards exist, before it waits for their first
        passes (up to 3 × the call timeout): started after, one stop whose answer was lost held them all
        off, and a stop cancelled meanwhile on another position went unseen until the start had finished
        (a reviewer, on the Binance-wire emulator). A start that fails after stops them again."""
        self._loops_started_at = self.clock.monotonic()
        self._reconciled_at = self._loops_started_at  # the start read the venue
        sup = self._supervisor
        sup.start("mark-feed", self._mark_feed)
        sup.start("silent-marks", self._silent_marks_by_rest)
        sup.start("markets", self._markets_loop)
        sup.start("marks-to-db", self._marks_to_db)
        sup.start("reconciler", self._reconcile_loop)
        self.account_stream = AccountStreamReader(
            self.venue,
            lambda: self.manager,  # restart_protection swaps it: each event goes to the manager of the moment
            self.clock,
            reconcile_seconds=float(self.settings.protection.reconcile_seconds),
            protection_ready=self._protection_ready,
            unrouted=self._entry_streamed,
        )
        sup.start("account-stream", self.account_stream.run)

    async def _stop_watching_the_venue(self) -> None:
        """A start that fails once it watches the venue: those loops end with it, as its guards do (all at
        once: each has its grace on a frozen database)."""
        await asyncio.gather(*(self._supervisor.stop_one(name) for name in WATCHING_THE_VENUE))

    def _start_loops(self) -> None:
        assert self.store is not None and self._db is not None
        sup = self._supervisor
        sup.start("health", self._health_loop)
        sup.start("lease-heartbeat", self._lease_heartbeat)
        self._start_alerts()
        db = self.settings.database
        self.db_watch = DatabaseWatch(
            self._db,
            self.store,
            self.clock,
            probe_timeout_seconds=float(db.probe_timeout_seconds),
            on_change=self._database_changed,
        )
        sup.start("database-watch", self.db_watch.run)
        sup.database_back = self.store.wait_up
        self.consumer = SignalConsumer(
            self.store,
            self.clock,
            listen_dsn=self._db.target.dsn,
            listen_password=db.password.get_secret_value() if db.password else None,
            wave_window_seconds=self.settings.signals.wave_window_ms / 1000,
            claimed_by=self._claimer,
            on_listen_attempted=self._health_wake.set,
        )
        # Operator commands (`tsbot close`, the read-only dashboard) wake it on the signals' LISTEN connection.
        consumer = self.consumer
        self.commands = CommandRunner(
            self,
            CommandQueue(self._db.pool, self.account_key),
            self.clock,
            listening=lambda: consumer.listening,
        )
        consumer.also_listen(NEW_COMMAND_CHANNEL, self.commands.notified)
        sup.start("commands", self.commands.run)
        sup.start("housekeeping", self._housekeeping)
        if self.code_check_seconds:
            sup.start("code-watch", self._watch_code)
        sup.start("coverage-samples", self._sample_coverage)
        sup.start("signals", self._wave_loop)
        if self._generate:
            generator = SimSignalGenerator(
                self.store,
                self.clock,
                sorted(symbol for symbol, market in self.markets.items() if market.trading),
                wave_size=self.settings.signals.wave_size,
                wave_interval_seconds=float(self.settings.signals.wave_interval_seconds),
                seed=self.settings.signals.seed,
            )
            sup.start("sim-signals", generator.run)

    async def stop(self, *, drain: bool = True) -> StopReport:
        """Stop taking signals, let every entry already sent reach "both stops confirmed" (bounded by the
        call budget), then stop every task; exchange orders stay in place. The report counts what is still
        uncovered (and entries of unknown outcome) so the caller can say so and exit non-zero.

        `drain=False` stops at once, abandoning whatever is in flight, as a crash would (drills and tests
        of what a restart finds)."""
        if self.state in (EngineState.STOPPING, EngineState.STOPPED):
            await self._stopped.wait()
            return self.stop_report or StopReport(0, 0)
        self._set_state(EngineState.STOPPING)
        self._stop_begun.set()
        self._end_records_timer()
        if self.request_pacer is not None:  # entries waiting for the venue's rate are not sent
            self.request_pacer.recheck()
        self._drop_database_if_down()
        budget = float(self.settings.protection.call_timeout_seconds)
        if drain:
            await self._drain_entries(budget)
            if self.manager is not None:  # a managed trail's move in flight finishes, or is left recorded
                await self.manager.finish_moves(budget)
                # A close at market already under way ends within two and a half call budgets, its tries
                # again included (`PositionGuard._close`): cut short, its record stayed `closing`.
                await self.manager.finish_closes(2.5 * budget)
        await self._supervisor.stop()
        self._keep_heard(LeasePhase.STOPPING)  # the rest of the stop can take a while; the watcher is gone
        try:
            # Positions a protection restart under way carries, their new guards not created yet: counted as
            # last verified (not verified at all while the restart waits for the database), not left out.
            carried = self._carried
            carried_facts = (
                [carried.left_by_a_stop(i) for i in carried.coverage]
                if carried and not carried.guards_created
                else []
            )
            carried_facts += [w.coverage() for w in self._awaiting_guard.values()]
            # From here the drain is over and what the engine tracks only shrinks (a restart cancelled below
            # hands its carried positions over to no guard): a snapshot no longer shows every position.
            self._positions_let_go = True
            if self._restart is not None and not self._restart.done():  # a protection restart under way
                self._restart.cancel()
                await asyncio.gather(self._restart, return_exceptions=True)
            in_progress = [self._wave_in_progress] if self._wave_in_progress is not None else []
            # A wave shielded from its loop stops with it; an entry still in doubt stays so (counted below).
            stopping = [*self._wave_tasks, *in_progress, *self._settlers]
            for task in stopping:
                task.cancel()
            await asyncio.gather(*stopping, return_exceptions=True)
            writes = [t for t in self._background if t is not asyncio.current_task()]
            if writes:  # records still being written (entries control): let them land, briefly
                await wait_for_all(self.clock, 5.0, [asyncio.shield(t) for t in writes])
            report = StopReport(0, 0)
            managed = False  # any managed trail among the positions (they stop moving with the engine)
            if self.manager is not None:
                manager = self.manager
                listed = await self._listing_at_stop()
                still_open = manager.open_guards()
                for guard in still_open if listed is not None else ():
                    for order in manager.unlisted(guard, listed):
                        log.error(
                            "%s: %s %s is not among the venue's open orders at the stop (fired, cancelled or "
                            "ended, not told yet): not kept",
                            guard.symbol,
                            stop_words(order.purpose),
                            order.client_order_id,
                        )
                guarded = {g.position_id for g in still_open}
                unguarded = [f for f in carried_facts if f.position_id not in guarded]
                # What stays without the engine: a managed trail is armed only while it runs. A stop that
                # a gap in the account stream put in doubt, with no listing of the venue since, is not
                # vouched for (its doubt may not have come due before the stop).
                uncovered = sorted(
                    [
                        g.symbol
                        for g in still_open
                        if not g.covered_without_engine or manager.unverified(g, listed)
                    ]
                    + [f.symbol for f in unguarded if not f.covered]
                )
                report = StopReport(
                    len(still_open) + len(unguarded),
                    len(uncovered),
                    self._entries_unresolved(),
                    tuple(uncovered),
                    unverified_symbols=tuple(
                        sorted(
                            g.symbol
                            for g in still_open
                            if g.symbol in uncovered and manager.in_doubt_only(g, listed)
                        )
                    ),
                    trails_without_order=sum(
                        1
                        for g in still_open
                        if g.covered and not g.covered_without_engine and not manager.unverified(g, listed)
                    )
                    + sum(  # (a hard stop not verified, the restart waiting for the database, is not kept)
                        1
                        for f in unguarded
                        if carried is not None
                        and f.position_id in carried.trails_without_order
                        and f.has_stop_loss
                    ),
                )
                if self.fatal is not None:  # what this engine saw last is not what the new holder protects
                    report = StopReport(report.open_positions, 0, taken_over=True)
                managed = manager.trails_managed  # (of its guards, before they are stopped)
                # The stops the listing lacks recorded missing: only under its own lease (the rows are then
                # its own).
                await manager.stop(
                    listed=listed if self._holds_the_lease() and not report.taken_over else None
                )
                # Only under its own lease: another engine may hold the account (`fatal`, or the lease lost
                # and not yet found taken), the rows its own, its trails armed.
                if managed and self.store is not None and self._holds_the_lease():
                    try:  # nobody moves a managed trail now: none is armed (has_trailing_stop stays venue truth)
                        await self.store.disarm_managed_trails()
                    except Exception:
                        log.exception("could not record the managed trails as disarmed")
            self.stop_report = report
            # For `tsbot status`, the database gone. Not when another engine took the account (its positions
            # are not this one's to report left); a lease lost with the database, not known taken, still is.
            if self._lease is not None and not report.taken_over:
                record_last_stop(
                    self._last_stop_path(),
                    stopped_at=_utc(self.clock.now()),
                    open_positions=report.open_positions,
                    uncovered=report.uncovered_symbols,
                    unverified=report.unverified_symbols,
                    unresolved_entries=report.unresolved_entries,
                    said=report.describe(),
                )
            if self.alerter is not None:
                self.alerter.engine_stopped(report.describe(), report.all_protected, self.fatal)
            if self.store is not None:
                try:
                    await self.store.record_event(
                        Severity.WARNING
                        if report.taken_over
                        else Severity.INFO
                        if report.all_protected
                        else Severity.ERROR,
                        "engine_stopped",
                        f"engine stopped; {report.describe()}",
                        # On the coverage samples' clock: the history ends this engine's last sample here. Not
                        # an engine whose account was taken: the new holder measures on.
                        at=_utc(self.clock.now()),
                        data=None if report.taken_over else {"ends_coverage_samples": True},
                    )
                except Exception:
                    log.exception("could not record the stop event")
                # Not over the rows of an engine that took the account: the next start replays them first.
                if self.store.has_journal and not self.store.down and self._holds_the_lease():
                    with contextlib.suppress(DatabaseDown):
                        await self.store.replay_journal()
                await self.store.close()  # writes still journaled stay on disk: the next start replays them
            log.log(
                logging.INFO if report.all_protected else logging.ERROR,
                "engine stopped: %s%s",
                report.describe(),
                "; managed trailing stops do not move until the engine runs again"
                if managed and report.open_positions
                else "",
            )
        finally:  # the lease (and its heartbeat) ends with the stop, even one that fails
            await self._release()
        if self.alerter is not None:
            await self.alerter.close()  # a few seconds at most, even with a dead receiver
        self._set_state(EngineState.STOPPED)
        self.events_bus.close()
        self._stopped.set()
        return report

    async def _manager_with_symbol_clear(self, symbol: str, within: float) -> ProtectionManager | None:
        """The protection manager once no stop of a closed position of ours is left on `symbol` (None if
        that takes longer than `within`). During a protection restart the one that knows is the next
        manager, once it has reconciled the venue's list: a restart that begins while this waits is
        waited for, and the question asked again of the new manager."""
        deadline = self.clock.monotonic() + within
        while True:
            if not self._entries_handed_over.is_set():
                await self._entries_handed_over.wait()
                deadline = self.clock.monotonic() + within  # the budget runs from the hand-over
            if self._draining or self.state is not EngineState.RUNNING:
                return None  # the engine began stopping meanwhile: an entry not sent yet is never sent
            manager = self.manager
            assert manager is not None
            clear = await manager.leftovers_cancelled(symbol, max(0.0, deadline - self.clock.monotonic()))
            if manager is self.manager and self._entries_handed_over.is_set():
                # A stopped manager here is no restart's (the engine is stopping): no entry then.
                return manager if clear and not manager.stopped else None

    def _protection_handed_over(self) -> bool:
        """No protection restart is between managers (the new one guards what the old one did)."""
        return self._protection_ready.is_set() and self.manager is not None and not self.manager.stopped

    async def _drain_entries(self, budget: float) -> None:
        """Claim nothing more; entries not sent yet are rejected; entries already sent finish, and the
        positions they open get their stops (each bounded by the call budget)."""
        self._draining = True
        if self.consumer is not None:
            self.consumer.stop_claiming()
        await self._supervisor.stop_one("sim-signals")
        if self._wave_in_progress is not None:
            await wait_for_all(self.clock, 2 * budget, [asyncio.shield(self._wave_in_progress)])
        await self._supervisor.stop_one("signals")
        if self._settlers:  # entries of unknown outcome: the venue gets the call budget to settle them
            log.warning(
                "stopping: waiting up to %.0fs for %s of unknown outcome",
                budget,
                counted(len(self._settlers), "entry", "entries"),
            )
            await wait_for_all(self.clock, budget, [asyncio.shield(t) for t in list(self._settlers)])
        if self._restart is not None and not self._restart.done():
            # A protection restart under way: its new guards are what protects, and mid-restart the guards
            # read here would be the old manager's (cleared) or none yet. Waited for, within the budget.
            await wait_for_all(self.clock, budget, [asyncio.shield(self._restart)])
        manager = self.manager
        if manager is not None:
            # Never protected yet, or protected once and missing a stop now (its guard sending it again):
            # each waited for until a pass confirms both its stops (`covered_now`, cleared here in case the
            # loss is known before a pass has said it).
            uncovered = [g for g in manager.guards.values() if not g.covered and not g.closed]
            for g in uncovered:
                g.covered_now.clear()
            pending = [self._protected_or_ended(g) for g in uncovered]
            if pending:
                log.warning(
                    "stopping: waiting up to %.0fs for %s to be protected",
                    budget,
                    counted(len(pending), "position"),
                )
                await wait_for_all(self.clock, budget, pending)

    async def _protected_or_ended(self, guard: PositionGuard) -> None:
        """Until a pass confirms both the guard's stops, or its position ends (a stop of it fired, and it
        closes): a fired stop's position is never covered again, and the stop waited the whole budget."""
        while not (guard.closed or guard.covered_now.is_set()):
            await wait_event(self.clock, guard.covered_now, 0.25)

    async def protection_in_place(self, seconds: float) -> bool:
        """Wait, up to `seconds`, until no protection restart is between managers (the new one guards what
        the old one did); whether none is. What reads the guards (a flatten) found none mid-restart."""
        if not self._protection_handed_over():
            await wait_event(self.clock, self._protection_ready, seconds)
        return self._protection_handed_over()

    async def wave_under_way_settled(self) -> bool:
        """Wait, within twice the call budget, for the wave under way if there is one: once entries are paused
        its entries not sent yet are not sent and those sent get their answer and, filled, their guard.
        Whether there was one."""
        wave = self._wave_in_progress
        if wave is None or wave.done():
            return False
        budget = float(self.settings.protection.call_timeout_seconds)
        await wait_for_all(self.clock, 2 * budget, [asyncio.shield(wave)])
        return True

    @property
    def breaker_pause_reason(self) -> str | None:
        """Why the circuit breaker paused entries while its pause stands (None: it does not), whatever else
        holds them meanwhile: a database outage or a lost lease shows as the pause (`entries_paused_by`),
        yet the breaker's stays until it is lifted (its alert said RECOVERED during an outage, then tripped
        again with the figures of before)."""
        paused, by, reason = self._persisted_pause
        return reason if paused and by == "breaker" else None

    def breaker_pause_began(self) -> tuple[float, bool] | None:
        """While the breaker's pause stands: when it began (epoch seconds) and whether it was carried over
        from an earlier run (persisted: only the operator resumes it)."""
        if self.breaker_pause_reason is None or self._breaker_paused_at is None:
            return None
        return self._breaker_paused_at, self._breaker_pause_carried

    def entries_in_doubt(self) -> list[EntryInDoubt]:
        """Entries whose outcome the venue has not told yet, each counted as a position without stops (one
        a guard has taken over meanwhile is counted by its guard)."""
        guarded = self.manager.guards if self.manager is not None else {}
        return [d for d in self._in_doubt.values() if d.position_id not in guarded]

    def _entries_unresolved(self) -> int:
        """Entries whose outcome the venue has not told (in flight, or in doubt and left so by the stop)."""
        return len(self._in_flight | self._in_doubt.keys())

    async def _stop_metrics(self) -> None:
        if self.metrics_server is not None:
            await self._supervisor.stop_one("metrics")
            await self._supervisor.stop_one("metrics-failures")
            await self.metrics_server.close()

    def _drop_database_if_down(self) -> None:
        """A stop while the database is known down (a frozen server answers nothing, not even the cancel of
        a statement in flight) waits on none of it: the connections are dropped, so whatever was waiting
        on them ends now, and every write of the stop goes to the journal the next start replays."""
        if self.store is None or not self.store.down:
            return
        log.warning("stopping while the database is down: its connections are dropped; writes stay journaled")
        self._drop_database()

    def _drop_database(self) -> None:
        """The pool's and the lease's connections dropped without a word to the server."""
        if self._db is not None:
            self._db.pool.terminate()
        if self._lease is not None:
            self._lease.drop()

    async def _release(self) -> None:
        await self._stop_keeping_heard()
        await self._stop_metrics()
        try:
            await self.venue.close()
        except Exception:
            log.exception("closing the venue failed")
        probe = float(self.settings.database.probe_timeout_seconds)
        silent = self._db is not None and not await answers(self._db.target, within=probe)
        if silent:
            # A server that does not answer (frozen) answers no goodbye either: the lease's and the pool's
            # each waited their bound, and the embedded server's stop at exit waited until it thawed (a start
            # on a frozen server exited only as it thawed, 30 s on; an operator's drill, reproduced).
            log.warning("the database does not answer: its connections are dropped without a word")
            self._drop_database()
            assert self._db is not None
            embedded = self._db.target.embedded
            if embedded is not None:
                # Left running as it is, as a command leaves one it finds frozen: its next user (an engine
                # restarts its own) or `tsbot status` deals with it.
                await asyncio.to_thread(detach_embedded, embedded.data_dir)
                log.warning(
                    "the embedded PostgreSQL in %s does not answer: left as it is, not stopped",
                    embedded.data_dir,
                )
            return
        if self._lease is not None:
            # Its last word `stopping`: a start given up (a refused key, Ctrl-C in a ban's wait) left
            # `starting`, which `tsbot status` reads, with no engine holding the lease, as one killed; so did
            # a stop after the lease went with a database session (written through the pool then). Not a
            # start given up after an engine that ended without stopping: nothing has looked after its
            # positions since, and status must still say so (a reviewer).
            took_over_a_crash = self._lease.previous_phase in (LeasePhase.RUNNING, LeasePhase.STARTING)
            if self._ran or not took_over_a_crash:
                with contextlib.suppress(Exception):
                    if self._lease.alive():
                        await self._lease.heartbeat(LeasePhase.STOPPING)
                    elif self._db is not None:
                        await self._lease.say_stopping_through(self._db.pool)
            try:
                await self._lease.release()
            except Exception:
                log.exception("releasing the account lease failed")
        if self._db is not None:
            await self._db.close()

    async def _replay_left_journal(self) -> None:
        """What an earlier run journaled while its database was unreachable, and could not replay before it
        died or stopped, goes into the database before anything is restored from it."""
        assert self.store is not None
        path = journal_path(self.settings.logging.file, self._token, self.exchange_name, self.account_key)
        self.store.attach_journal(WriteJournal(path), self._token)
        replayed = await self.store.replay_journal()
        if replayed:
            log.warning(
                "replayed %s an earlier run journaled while the database was away", counted(replayed, "write")
            )

    async def _record_trails_a_dead_engine_left(self) -> None:
        """An engine that ended without stopping (SIGKILL, a crash, its host gone) left its managed trails
        armed in the record. Nobody moved them from its last heartbeat on; a trail without an order on the
        venue was no trailing protection from then, yet the history showed none of that time. They are
        recorded as a stop records them, unmoved since that heartbeat, before anything is restored (the
        restore then ends those spans when it has the trails in hand)."""
        assert self.store is not None and self._lease is not None
        heard = self._lease.previous_heard_at
        if heard is None:
            return
        # A run that lost its database wrote its journal on past its last heartbeat (replayed just before).
        journaled = self.store.newest_replayed_at
        if journaled is not None and journaled > heard:
            heard = journaled
        self._previous_heard = heard
        if self._lease.previous_phase in (LeasePhase.RUNNING, LeasePhase.STARTING):
            # Running (or starting) at its last heartbeat, and the lock free: it never stopped. Said whatever
            # it left (a kill -9 with no wave nor managed trail in flight left no trace: an operator).
            ended = (
                f"the last engine on this account ended without stopping (killed, crashed, or its host gone; "
                f"last heard {heard.isoformat(timespec='seconds')}): nothing watched its positions from then "
                "until this start"
            )
            log.warning(ended)
            await self.store.record_event(Severity.WARNING, "last_engine_ended_unstopped", ended)
        left = await self.store.disarm_managed_trails(at=heard)
        # The coverage series: the dead engine's last sample stood on over the time nobody measured; from its
        # last heartbeat it is what the records give (positions it left without both stops, not protected).
        await self.store.record_coverage_sample(
            await self.store.coverage_left_at(heard, self._grace_seconds())
        )
        if left:
            message = (
                f"the last engine on this account left {left} managed trail{'' if left == 1 else 's'} armed "
                f"(killed, crashed, or stopped without its lease; last heard "
                f"{heard.isoformat(timespec='seconds')}): not moved since; those without an order on the venue "
                "are counted without their trailing stop from then until restored"
            )
            log.warning(message)
            await self.store.record_event(Severity.WARNING, "engine_ended_unstopped", message)

    async def _finish_waves_a_dead_engine_left(self, settlers: list[asyncio.Task[None]]) -> None:
        """Waves the last engine began and never finished stayed "running" in the record for ever, 0 opened,
        0 protected, while their positions had opened (an operator's kill -9 mid-wave). Once the entries it
        left are settled (`settlers`), they are finished as of its last heartbeat, and the start says how
        the last engine ended: without stopping (running or starting at its last heartbeat), or in its stop
        (killed or hung while stopping, or a stop that cancelled a wave before its figures were taken: a
        stop otherwise records its waves as they stand)."""
        assert self.store is not None and self._lease is not None
        heard, taken_at = self._previous_heard, self._lease_since
        if heard is None or taken_at is None:
            return
        if settlers:
            await asyncio.wait(settlers)
        waves = await self.store.finish_waves_left(heard=heard, taken_at=taken_at)
        if not waves:
            return
        told = "; ".join(
            f"wave {w.id}: {w.signals} signal{'' if w.signals == 1 else 's'}, {w.opened} opened, "
            f"{w.protected} protected by it"
            for w in waves
        )
        how = (
            "stopped before they finished (killed or hung in its stop, or a stop that gave up on a wave before "
            "its figures were taken"
            if self._lease.previous_phase == LeasePhase.STOPPING
            else "ended without stopping (killed, crashed, or its host gone"
        )
        message = (
            f"the last engine on this account {how}; last heard {heard.isoformat(timespec='seconds')}) in the "
            f"middle of {len(waves)} wave{'' if len(waves) == 1 else 's'}, recorded as finished then: {told}"
        )
        log.warning(message)
        await self.store.record_event(Severity.WARNING, "engine_ended_unstopped", message)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def _set_state(self, state: EngineState, detail: str = "") -> None:
        self.state = state
        self.events_bus.publish(EngineStateChanged(at=self.clock.now(), state=state.value, detail=detail))

    # --- protection start / restart ------------------------------------------------------------------

    async def _start_protection(
        self,
        handover: Callable[[], None] | None = None,
        unfinished_cancels: Mapping[str, Mapping[str, float | None]] | None = None,
        never_taken: frozenset[str] = frozenset(),
        confirmed_within_lag: Mapping[str, float] | None = None,
        left_unsettled: Mapping[str, float] | None = None,
    ) -> StartupReport:
        """Restore every open position and verify it against the venue in a constant number of round
        trips, whatever the number of positions: the database in three queries, the venue's positions and
        open protective orders read once (together), entries left pending by the last run resolved in
        parallel, and every guard started at once. Orders the venue lists are confirmed by that list; only
        the others are looked up, each by its own guard, in parallel. Positions with nothing on the venue
        are therefore re-protected first and together (never one after another: F15)."""
        assert self.store is not None and self.order_budget is not None
        # The database first: a manager installed before a read that failed had no guard, and its reconciler
        # cancelled every stop of ours as an orphan (a restart while the database was down).
        positions, orders_by_position, ids_by_position, trails, closed_stops = await self._restore_records(
            restart=handover is not None
        )
        previous = self.manager if handover is not None else None
        self.manager = ProtectionManager(
            venue=self.venue,
            store=self.store,
            budget=self.order_budget,
            clock=self.clock,
            events=self.events_bus,
            config=ProtectionConfig.from_settings(self.settings.protection),
            token=self._token,
            markets=self.markets,
            call_stats=self._call_stats,
            requests_used=self._requests_used,
        )
        # What the last manager knew of its stops that the venue cannot tell yet (a protection restart).
        self.manager.known_unsent = never_taken
        self.manager.known_confirmed = confirmed_within_lag or {}
        self.manager.known_left_at = left_unsettled or {}
        if previous is not None:
            self.manager.known_unclear = previous.handed_over_unclear
            # The breaker's error window and the order round trip go on across a protection restart: a
            # restart wiped the failures, and an operator's resume refused while stops failed went through.
            self.manager.protective_attempts = previous.protective_attempts
            self.manager.protective_failures = previous.protective_failures
            self.manager.order_round_trip_seconds = previous.order_round_trip_seconds
            # The account stream's word that stops are live: a move whose answer was lost is resolved by it.
            self.manager.streamed_live = previous.streamed_live
            # Stops not ours the last pass saw still fill the venue's cap until the next pass says otherwise.
            self.manager.foreign_stops_seen = previous.foreign_stops_seen
            # A stuck stop's close, said once: not again by the next manager's guard (r93).
            self.manager.stuck_said = previous.stuck_said
            # Stops the venue answered placed, and since when those being cancelled went unfound: "unknown
            # order" to the next manager's cancel proves nothing either. Forgotten, a restart took it for
            # proof and freed the symbol beside a closed position's live stops (r83).
            self.manager.placed_ids |= previous.placed_ids
            self.manager.placed_unseen.update(previous.placed_unseen)
        # Stops of closed positions the last manager was still cancelling: cancelled now, and until they
        # are gone their symbols take no new position (an old stop would act on the new position).
        for symbol, orders in (unfinished_cancels or {}).items():
            self.manager.sweep_leftovers(symbol, orders, at_once=True)
        # And those the records say may be live on closed positions: a new process knew nothing of the last
        # one's, and a fired stop still TRIGGERING is in no list of open orders (its fill, reduce-only, cut
        # the next position on its symbol). Asked for by id: one gone is marked so and frees its symbol.
        # (Only where stops are orders of their own: on Bybit the venue clears a closed position's stops, and
        # a cancel by a closed position's id was taken for the open position's stop on the symbol.)
        if not self.venue.capabilities().stops_are_orders:
            closed_stops = {}
        # Each as sent when its record was written (just before its send): one the venue cannot show yet (a
        # stop that filled within its read lag, as a restart came) is asked again once it can, not taken
        # for gone at the first "unknown order" and recorded cancelled with its position's exit unsettled.
        now = self.clock.monotonic()
        for symbol, ages in closed_stops.items():
            known = (unfinished_cancels or {}).get(symbol, {})
            # (Those the record has `open` the venue answered placed: as in the last manager, its "unknown
            # order" is no proof they are gone.)
            self.manager.placed_ids.update(cid for cid, (_, placed) in ages.items() if placed)
            if fresh := {cid: now - age for cid, (age, _) in ages.items() if cid not in known}:
                self.manager.sweep_leftovers(symbol, fresh, at_once=True)
        self.reconciler = Reconciler(
            manager=self.manager,
            venue=self.venue,
            store=self.store,
            clock=self.clock,
            connected_at=self._connected_at,
            startup_unknown_seconds=STARTUP_UNKNOWN_SECONDS,
            adopt=self._adopt,
            # An entry in doubt is not skipped: a position the venue's list shows on its symbol is adopted
            # into its record (its look-ups by id may fail for long; the list is evidence too).
            entries_in_flight=lambda: self._in_flight - self._in_doubt.keys(),
        )
        for position in positions:
            self.manager.tell_recorded(position, orders_by_position.get(position.id, ()))
        snapshot = await self._restore_snapshot(restart=handover is not None)
        if snapshot is not None and handover is None:
            self._refuse_a_shared_account(snapshot.open_orders)
            await self._refuse_another_identity(snapshot.open_orders)
        venue_orders = snapshot.open_orders_by_id() if snapshot is not None else None
        # An empty answer this soon after connecting may be a venue glitch (F3): it confirms nothing, so
        # every order is looked up on its own rather than believed gone.
        if snapshot is not None and not snapshot.positions and positions:
            venue_orders = None
        # A restart that cannot list the venue (a ban): the stops the last manager had confirmed, with no gap
        # in the account stream since, stay confirmed (the stream's cancel or expiry reaches the new guards)
        # and are checked once a listing answers. Counted in doubt, a ban's positions went from covered to
        # 0 % with no news at all, and past grace the breaker paused entries while the venue held every stop
        # (the sim chaos soak).
        # (Not where the snapshot answered with no positions: its open orders answered, and what they lack
        # is looked up by id, r89.)
        vouched: Mapping[str, float] = {}
        mark = self._account_stream_mark()
        if (
            snapshot is None
            and previous is not None
            and previous.handed_over_vouched
            and mark is not None
            and mark == self._stream_mark_at_restart
        ):
            vouched = previous.handed_over_vouched
            self.manager.known_confirmed = {**vouched, **self.manager.known_confirmed}
            log.warning(
                "protection restart: the stops the running manager had confirmed (%d) are kept, the account "
                "stream unbroken since; checked once the venue answers",
                len(vouched),
            )
        # An entry this engine has on its way (a protection restart mid-wave) is its own coroutine's to
        # resolve: looked up now it may not be on the venue yet, and would be recorded failed while it fills.
        restorable = [
            p
            for p in positions
            if self._restorable(p) and not (_entry_pending(p) and p.symbol in self._in_flight)
        ]
        manager = self.manager

        def protect(position: PositionRecord) -> PositionGuard:
            return manager.protect(
                position,
                filled_at=self._monotonic_of(position.opened_at),
                live_orders=orders_by_position.get(position.id, ()),
                trail_record=trails.get(position.id),
                venue_open_orders=venue_orders,
                used_order_ids=ids_by_position.get(position.id, ()),
                naked_since=_left_never_protected(position),
            )

        pending = [p for p in restorable if _entry_pending(p)]
        # Their symbols are held while they are looked up: the start-up reconcile runs beside the look-ups
        # (a position opened by hand while no engine ran waited for the slowest look-up, 8 s in a review,
        # before its stops went) and adopts none of them; an entry left in doubt keeps its symbol held.
        looked_up = {p.symbol for p in pending} - self._in_flight
        self._in_flight |= looked_up

        async def protect_once_filled(position: PositionRecord) -> PositionGuard | None:
            try:
                filled = await self._resolve_entry(position)
            finally:
                if position.symbol in looked_up and position.symbol not in self._in_doubt:
                    self._in_flight.discard(position.symbol)
            return None if filled is None or manager.stopped else protect(filled)

        async def reconcile_at_start() -> int:
            if snapshot is None:
                return 0
            assert self.reconciler is not None
            try:
                return len((await self.reconciler.reconcile_once(snapshot)).adopted)
            except (ExchangeError, TimeoutError) as exc:
                log.error("start-up reconcile failed (%s); the periodic reconciler will retry", exc)
                return 0

        # Positions known filled are guarded at once (those without stops get them a round trip after the
        # venue's answer); each entry left pending is looked up, and guarded on its own answer: none waits
        # for the slowest look-up (the call budget), as every guard once did.
        guards = [protect(p) for p in restorable if not _entry_pending(p)]
        if handover is not None:  # the guards exist: the account's events reach them from now on
            handover()
        # (Each runs to its end whatever the others do, look-ups included; the first exception is raised
        # after: none is left running on, writing records or guarding, with nobody waiting for it.)
        *resolved, adopted = await asyncio.gather(
            *(protect_once_filled(p) for p in pending), reconcile_at_start(), return_exceptions=True
        )
        for outcome in (*resolved, adopted):
            if isinstance(outcome, BaseException):
                raise outcome
        assert isinstance(adopted, int)
        guards += [g for g in resolved if isinstance(g, PositionGuard)]
        if self._carried is not None:  # from here on each position shows what the new guards know
            self._carried.guards_created = True
        # What this report is about: the positions restored and adopted here (not those that entries or
        # the reconcile loop add once the restart has handed over).
        waited = list(self.manager.guards.values())
        if handover is not None:
            handover()  # the reconciler too: it runs while the report waits for the first passes
        else:  # the start: the venue's news reaches the guards while their first passes run
            self._start_watching_the_venue()
        await self._wait_first_pass(waited)
        # Covered by kept stops only, still (not one found ended, fired or replaced since, r89): not
        # "restored", nothing found them live.
        kept_unread = tuple(
            sorted(
                g.symbol
                for g in guards
                if g.covered
                and g.report.created_orders == 0  # (one that got a stop again is "re-protected", once)
                and any(o.confirmed and o.client_order_id in vouched for o in g.watched_stops)
            )
        )
        restored = sum(
            1 for g in guards if g.covered and g.report.created_orders == 0 and g.symbol not in kept_unread
        )
        uncovered = [g for g in waited if not g.covered and not g.closed]
        failed = sorted(g.symbol for g in uncovered if g.said_gone_at is None)
        gone = tuple(sorted(g.symbol for g in uncovered if g.said_gone_at is not None))
        reprotected = sum(1 for g in guards if g.covered and g.report.created_orders > 0)
        in_doubt = tuple(
            sorted(d.symbol for d in self._in_doubt.values() if d.position_id not in manager.guards)
        )
        unlisted = tuple(sorted(p.symbol for p in positions if p.symbol not in self.markets))
        ended = {g.position_id: g for g in (*guards, *waited) if g.closed}
        by_the_start = {"stop_breached", "stop_not_filled"}  # the start closed them at market itself
        closed = tuple(sorted(g.symbol for g in ended.values() if g.closed_as not in by_the_start))
        breached = tuple(sorted(g.symbol for g in ended.values() if g.closed_as in by_the_start))
        return StartupReport(
            restored,
            reprotected,
            adopted,
            len(failed),
            tuple(failed),
            gone,
            in_doubt,
            unlisted,
            closed,
            breached,
            kept_unread,
        )

    async def _restore_records(self, *, restart: bool) -> _RestoreRecords:
        """What a restore reads from the database: the open positions, the orders of each that may be live,
        the ids each has used, and the trail records. At start-up a database that does not answer fails
        the start. A protection restart waits for it (or for a read that fails otherwise to succeed), said
        once and retried with backoff, at once when the database is back: the old manager is stopped by
        then, and until the new guards exist the positions show as last verified, counted uncovered after
        their grace period (nothing verifies them meanwhile); the reconciler stays stopped, so nothing of
        ours is cancelled."""
        assert self.store is not None
        store = self.store
        delay = float(self.settings.protection.retry_initial_seconds)
        waiting_since: float | None = None
        while True:
            answers = await asyncio.gather(
                store.open_positions(),
                store.live_orders_of_open_positions(),
                store.order_ids_of_open_positions(),
                store.trailing_states_of_open_positions(),
                store.live_stops_of_closed_positions(),
                return_exceptions=True,
            )
            failure = next((a for a in answers if isinstance(a, BaseException)), None)
            if failure is None:
                if waiting_since is not None:
                    log.warning(
                        "protection restart: the database answers again after %.0fs; restoring",
                        self.clock.monotonic() - waiting_since,
                    )
                return cast(_RestoreRecords, tuple(answers))
            if not restart or not isinstance(failure, Exception):
                raise failure
            if waiting_since is None:
                waiting_since = self.clock.monotonic()
                if self._carried is not None:
                    self._carried.unverified_from(waiting_since)
                outage = isinstance(failure, (DatabaseUnavailable, *UNREACHABLE_ERRORS))
                log.critical(
                    "protection restart: %s (%s); no guard runs until the read succeeds, positions keep "
                    "the stops already on the exchange and count uncovered past their grace period; retried "
                    "with backoff",
                    "the database does not answer" if outage else "reading the database failed",
                    str(failure) or type(failure).__name__,
                )
            if store.down:  # tried again as soon as it is back, not a backoff step later
                await wait_for_all(self.clock, delay, [store.wait_up()])
            else:
                await self.clock.sleep(delay)
            delay = min(delay * 2, float(self.settings.protection.retry_max_seconds))

    def _refuse_a_shared_account(self, open_orders: Sequence[Order]) -> None:
        """A start on an account whose venue holds orders another installation of this program sent (another
        database's client ids) is refused before anything is restored, adopted or traded: a second
        installation adopted the first one's 36 positions and stopped each a second time (an operator)."""
        assert self.manager is not None
        others = self.manager.other_installations_in(open_orders)  # (nothing said: the start is refused)
        if not others:
            return
        tokens = ", ".join(f"tsb{token}-… ({count})" for token, count in sorted(others.items()))
        book = self.venue.book_path if isinstance(self.venue, KeptInAFile) else None
        # The sim venue's orders cannot be cancelled by hand: its book is what an operator moves away.
        gone = (
            f"the sim venue's book is {book}: move it away (no engine running) for a fresh sim exchange"
            if book is not None
            else "cancel its orders on the venue"
        )
        raise AccountShared(
            f"venue {self.venue.name}: the account holds {counted(sum(others.values()), 'open order')} of "
            f"another tsbot installation (client ids {tokens}: another database); one engine per account. "
            f"Stop that engine (or, if it is gone for good, {gone}) and start again; nothing was traded"
        )

    async def _refuse_another_identity(self, open_orders: Sequence[Order]) -> None:
        """A start on a venue account whose orders this database sent for positions it records under another
        account identity, whose engine runs, is refused: another API key of the same venue account (or its
        testnet setting flipped) is another identity and lease, with this database's token. Started, it
        adopted the first engine's positions as not recorded for it, and each cancelled the other's stops as
        orphans at every pass (r80). One whose engine does not run (a key replaced) is said, not refused."""
        assert self.manager is not None and self.store is not None
        ours: dict[int, int] = {}
        for order in open_orders:
            key = parse_client_order_id(order.client_order_id, self._token)
            if key is not None:
                ours[key.position_id] = ours.get(key.position_id, 0) + 1
        if not ours:
            return
        elsewhere: dict[str, int] = {}
        for position_id, account in (await self.store.accounts_of_positions(ours)).items():
            if account != self.account_key:
                elsewhere[account] = elsewhere.get(account, 0) + ours[position_id]
        assert self._db is not None
        for account, orders in sorted(elsewhere.items()):
            holder = await current_holder(self._db.pool, self.exchange_name, account)
            if holder is not None:  # (a silent one too: frozen, it goes on once it thaws)
                raise AccountShared(
                    f"venue {self.venue.name}: the account holds {counted(orders, 'open order')} this database "
                    f"recorded for account {account}, traded by {holder.describe()}: another API key (or testnet "
                    "setting) of the same venue account; one engine per venue account. Stop that engine and "
                    "start again; nothing was traded"
                )
            log.warning(
                "venue %s: the account holds %s this database recorded for account %s, whose engine does not "
                "run (its API key replaced by this one?): its positions are adopted as found on the venue",
                self.venue.name,
                counted(orders, "open order"),
                account,
            )

    async def _restore_snapshot(self, *, restart: bool) -> VenueSnapshot | None:
        """The venue's positions and protective orders for a restore (None: each order is looked up by its
        own guard, but those a protection restart keeps, said apart). A protection restart waits for it only
        `RESTART_SNAPSHOT_LATE_ANSWERS` late answers: until the new guards exist the account stream's fills
        wait for them, and a snapshot held by a ban and a lost answer kept two stop fills unread for 28 s in
        the chaos soak."""
        assert self.reconciler is not None and self.manager is not None
        instead = "the guards start without it" if restart else "every order is looked up on its own"
        started = self.clock.monotonic()
        patience = RESTART_SNAPSHOT_LATE_ANSWERS * self.manager.late_answer_seconds() if restart else math.inf
        for attempt in range(1, SNAPSHOT_ATTEMPTS + 1):
            read = asyncio.ensure_future(self.reconciler.take_snapshot(Lane.PROTECTIVE))
            try:
                left = patience - (self.clock.monotonic() - started)
                if math.isfinite(left) and (
                    left <= 0 or await wait_for_all(self.clock, left, [asyncio.shield(read)])
                ):
                    log.warning(
                        "protection restart: the venue's snapshot is not back after %.1fs; %s",
                        patience,
                        instead,
                    )
                    return None
                return await read
            except (ExchangeError, TimeoutError) as exc:
                # One refused request of its three or four failed the whole read, and each order was then
                # looked up on its own: a hundred look-ups for fifty positions, under the same faults and
                # limits, left a Bybit soak's restart with every position unverified and the breaker
                # tripped. Read again first, at the venue's word (a ban waits for nobody).
                pause = exc.retry_after if isinstance(exc, RateLimited) else SNAPSHOT_RETRY_SECONDS
                remaining = patience - (self.clock.monotonic() - started)
                # (Said as what reads it: "start-up:" during a protection restart misled an operator.)
                who = "protection restart" if restart else "start-up"
                if isinstance(exc, Banned) or attempt == SNAPSHOT_ATTEMPTS or pause >= remaining:
                    log.error("%s: the venue did not answer (%s); %s", who, exc, instead)
                    return None
                log.warning(
                    "%s: reading the venue's positions and stops failed (%s); asked again in %.1fs "
                    "(attempt %d of %d)",
                    who,
                    exc,
                    pause,
                    attempt,
                    SNAPSHOT_ATTEMPTS,
                )
            finally:
                await end_all(read)
            await self.clock.sleep(pause)
        return None

    def _monotonic_of(self, moment: datetime | None) -> float:
        """A wall-clock moment on the engine's monotonic clock (now for an unknown or future one): a restored
        position's time unprotected counts from its fill, not from the restart."""
        if moment is None:
            return self.clock.monotonic()
        return monotonic_of(self.clock, moment.timestamp())

    async def _wait_first_pass(self, guards: Sequence[PositionGuard]) -> None:
        if not guards:
            return
        budget = float(self.settings.protection.call_timeout_seconds) * 3
        await wait_for_all(self.clock, budget, [g.first_pass.wait() for g in guards])

    def _restorable(self, position: PositionRecord) -> bool:
        if position.symbol in self.markets:
            return True
        log.error(
            "position %s: %s is not listed on %s; left as it is",
            position.id,
            position.symbol,
            self.exchange_name,
        )
        return False

    async def _resolve_entry(self, position: PositionRecord) -> PositionRecord | None:
        """An entry from before a restart: filled → protect it; never executed or refused → the position
        failed; unknown (the venue does not answer, or cannot prove it absent yet) → in doubt, counted as a
        position without stops and settled in the background (a failed read left it to the reconciler's
        list, which may answer [] for a while)."""
        assert self.store is not None and self.manager is not None
        if position.status is PositionStatus.PENDING_ENTRY:
            # Recorded and never sent: an entry goes only once its record is `entry_placed`. (A write the
            # last engine gave up on in a database outage, committed at the thaw.) Not an entry in doubt:
            # it was counted uncovered and held entries until the venue could prove it absent.
            await self._restored_entry_failed(position, "entry never sent", OrderRecordStatus.REJECTED)
            return None
        cid = client_order_id(self._token, position.id, OrderPurpose.ENTRY, 0)
        doubt = EntryInDoubt(
            position.id,
            position.symbol,
            PositionSide(position.side),
            position.quantity,
            cid,
            sent_at=self._monotonic_of(position.updated_at),
            # When the last process last sent it is not known, only that it was before now: "no such
            # order" proves nothing until the venue's request window and read lag have passed since.
            unknown_at=self.clock.monotonic(),
        )
        asked_at = self.clock.monotonic()
        try:
            order: Order | None = await self.manager.read(
                lambda: self.venue.fetch_order(position.symbol, cid), "fetch_order"
            )
        except NotFound as exc:
            if self._absence_provable_in(doubt, asked_at) > 0:  # (an answer is as old as its question)
                return self._doubt_restored_entry(position, doubt, exc, awaiting_proof=True)
            order = None
        except (ExchangeError, TimeoutError) as exc:
            return self._doubt_restored_entry(position, doubt, exc)
        if order is not None and not _entry_ended(order):  # still working: a position once it fills
            return self._doubt_restored_entry(position, doubt, _entry_not_ended(order))
        return await self._restored_entry_outcome(position, order)

    def _doubt_restored_entry(
        self,
        position: PositionRecord,
        doubt: EntryInDoubt,
        why: BaseException | str,
        *,
        awaiting_proof: bool = False,
    ) -> None:
        """`awaiting_proof`: the venue said "no such order" too soon after the start to prove it."""
        doubt.error = f"entry outcome unknown after a restart: {str(why) or type(why).__name__}"
        self._doubt_entry(doubt, functools.partial(self._restored_entry_settled, position, doubt))
        if awaiting_proof:
            # Counted uncovered from its send, perhaps minutes ago; no failure of this engine's protection
            # until the venue could have told (a killed engine's entries tripped the breaker at every start,
            # and the pause outlived their proof of absence seconds later). Entries wait meanwhile
            # (`_validate`). One the venue could not be asked about, or said is working, is judged from its
            # send: nothing is to come that would settle it (a reviewer saw a filled one behind failing
            # look-ups hidden from the breaker for 25 s while three new entries went).
            doubt.judged_from = self._absence_provable_at(doubt)
        return None

    async def _restored_entry_settled(
        self, position: PositionRecord, doubt: EntryInDoubt, order: Order | None
    ) -> None:
        """An entry from before a restart, in doubt at start-up, answered: recorded, and protected if filled.
        Adopted from the venue's list meanwhile, it is its guard's: only the entry's fill is recorded (its
        fill recorded again put the guarded position back to `pending_protection` for good)."""
        assert self.store is not None
        if await self._adopted_before_answer(doubt):
            if order is not None and order.filled_quantity > 0:
                await self.store.set_order_status(
                    order.client_order_id, OrderRecordStatus.FILLED, exchange_order_id=order.venue_order_id
                )
            # The venue holds a position on the symbol, the entry's record its own now: opened.
            await self._signal_settled(position, position, None)
            # (Its all-clear says what it became: "nothing open on the venue from it" was said of a position
            # open and guarded, r82.)
            doubt.guard = self.manager.guards.get(position.id) if self.manager is not None else None
            self._in_doubt.pop(doubt.symbol, None)
            log.info(
                "position %s %s: its entry from before the restart is settled; guarded",
                position.id,
                position.symbol,
            )
            return
        filled = await self._restored_entry_outcome(position, order)
        if filled is not None:
            recorded = await self._recorded_orders(position.id)
            if not self._protection_handed_over():
                await self._protection_ready.wait()
            assert self.manager is not None
            doubt.guard = recorded.protect(self.manager, filled, filled_at=doubt.sent_at)
            log.warning(
                "position %s %s: its entry from before the restart filled at %s; protecting it",
                position.id,
                position.symbol,
                filled.entry_price,
            )
        self._in_doubt.pop(doubt.symbol, None)

    async def _restored_entry_outcome(
        self, position: PositionRecord, order: Order | None
    ) -> PositionRecord | None:
        """What the venue said of an entry from before a restart, recorded: the filled position, or None
        (failed)."""
        assert self.store is not None
        if order is None:
            await self._restored_entry_failed(position, "entry not placed", OrderRecordStatus.REJECTED)
            return None
        if order.filled_quantity > 0 and order.average_price is not None:
            # Filled, or ended part-filled (the rest cancelled or expired): a position of what filled.
            await self.store.set_order_status(
                order.client_order_id, OrderRecordStatus.FILLED, exchange_order_id=order.venue_order_id
            )
            # (filled while no engine knew: without stops since, whenever this start protects it)
            filled_at = _utc(order.updated_at)
            filled = await self.store.record_fill(
                position.id,
                order.filled_quantity,
                order.average_price,
                filled_at=filled_at,
                unprotected_since=filled_at,
            )
            await self._signal_settled(position, filled, None)
            return filled
        await self._restored_entry_failed(
            position, f"entry {order.status.value}", record_status_of(order.status)
        )
        return None

    async def _restored_entry_failed(
        self, position: PositionRecord, reason: str, entry_status: OrderRecordStatus
    ) -> None:
        """An entry from before a restart that opened no position, recorded as a live one that fails is:
        its order ended as the venue said, the stop it carried (Bybit) with it, an `entry_failed` event, the
        position failed and its signal rejected. Only the last two were written: the entry's order stayed
        `unknown` and the carried stop `pending` on a failed position, with no event (found in a review)."""
        assert self.store is not None
        settled = f"{reason} (settled after a restart)"
        for record in await self.store.orders_for_position(position.id, LIVE_ORDER_STATUSES):
            entry = record.purpose is OrderPurpose.ENTRY
            await self.store.set_order_status(
                record.client_order_id,
                entry_status if entry else OrderRecordStatus.REJECTED,
                error=settled if entry else f"the entry it rode on: {settled}",
            )
        await self.store.set_position_status(position.id, PositionStatus.FAILED, exit_reason=reason)
        await self.store.record_event(
            Severity.WARNING,
            "entry_failed",
            f"{position.symbol}: {settled}",
            symbol=position.symbol,
            position_id=position.id,
        )
        await self._signal_settled(position, None, reason)

    async def _signal_settled(
        self, position: PositionRecord, filled: PositionRecord | None, reason: str | None
    ) -> None:
        """The signal of an entry from before a restart, said as it went once the venue settled the entry
        (the start-up leaves it `taken` while the entry is in flight)."""
        assert self.store is not None
        if position.signal_id is None:
            return
        status = SignalStatus.OPENED if filled is not None else SignalStatus.REJECTED
        await self.store.finish_signal(position.signal_id, status, reason, wave_id=position.wave_id)

    async def _adopt(self, venue_position: VenuePosition, held: Sequence[VenuePosition]) -> None:
        """Guard a position the venue holds (`held`: all it holds on the symbol, read alone) that no guard
        tracks: into the open record of its symbol if there is one (an entry in doubt), else a new one."""
        assert self.store is not None and self.manager is not None
        try:
            # The trail it gets is today's, recorded as a position opened here records its own: a restart
            # with other settings re-placed an adopted position's lost trail at those (r73).
            position = await self.store.create_position(
                symbol=venue_position.symbol,
                exchange=self.exchange_name,
                side=venue_position.side.value,
                quantity=venue_position.quantity,
                status=PositionStatus.PENDING_PROTECTION,
                trailing_activation_percent=self.settings.protection.activation_percent,
                trailing_callback_percent=self.settings.protection.callback_percent,
            )
        except PositionAlreadyOpen:
            position = await self.store.open_position_for_symbol(self.exchange_name, venue_position.symbol)
            if position is None or position.id in self.manager.guards:
                return
        doubt = self._in_doubt.get(venue_position.symbol)
        if doubt is None and venue_position.symbol in self._in_flight:
            return  # an entry's answer is being applied to its record: the next pass sees the outcome
        if doubt is None or doubt.position_id != position.id:
            await self._adopt_into(position, venue_position, held)
            return
        if doubt.answering:
            return  # the entry's own answer is being applied to its record: the next pass sees the outcome
        doubt.adopting = asyncio.Event()
        try:
            sent = self.clock.now() - (self.clock.monotonic() - doubt.sent_at)
            doubt.flipped = await self._adopt_into(
                position, venue_position, held, entry_sent_at=datetime.fromtimestamp(sent, tz=UTC)
            )
            # Its own answer, when it comes, neither fills nor fails this record again (`_entry_answered`),
            # and its guard counts it from here.
            doubt.adopted = True
            self._in_doubt.pop(venue_position.symbol, None)
            log.warning(
                "%s: the entry of unknown outcome is held on the venue (its list): protected as position %s",
                venue_position.symbol,
                position.id,
            )
        finally:
            doubt.adopting.set()

    async def _adopt_into(
        self,
        position: PositionRecord,
        venue_position: VenuePosition,
        held: Sequence[VenuePosition],
        *,
        entry_sent_at: datetime | None = None,
    ) -> bool:
        """Fill `position` in from what the venue holds and guard it; whether its side was flipped to the
        venue's. `entry_sent_at`: when the entry of unknown outcome whose record it is was sent (the held
        position is taken for its fill: without stops since then)."""
        assert self.store is not None and self.manager is not None
        flipped = venue_position.side.value != position.side
        if flipped:
            ours = next((p for p in held if p.side.value == position.side), None)
            if ours is not None:  # hedge mode: the record's own side is held too; that one is the entry's
                venue_position, flipped = ours, False
        recorded = await self._recorded_orders(position.id)
        if flipped:
            # The venue's side, not the record's: a long entry in doubt whose symbol shows a short (an
            # operator's trade) kept "long", and a long's stops cannot reduce a short; it was never protected.
            # Nothing the record carried is the held position's (on Bybit the long's hard stop, sent again at
            # its price on a short, would be refused as through the mark and close the short at market).
            log.error(
                "position %s %s: recorded %s, the venue holds %s %s; protected as the venue holds it",
                position.id,
                venue_position.symbol,
                position.side,
                venue_position.side.value,
                venue_position.quantity,
            )
            reason = (
                f"the venue holds {venue_position.side.value} {venue_position.symbol}, not {position.side}"
            )
            for order in recorded.live:
                if order.purpose is not OrderPurpose.ENTRY:
                    await self.store.set_order_status(
                        order.client_order_id, OrderRecordStatus.REJECTED, error=reason
                    )
            recorded = RecordedOrders([], None, recorded.used_ids)
        filled_at = _utc(venue_position.updated_at)
        # An entry of ours whose answer never came, held: without stops since it filled, and not before it
        # was sent (the venue's time may be an earlier trade's). Not a position of the other side: someone
        # else's trade, never ours to protect before this engine saw it.
        naked_since = None
        if entry_sent_at is not None and not flipped:
            naked_since = entry_sent_at if filled_at is None else max(filled_at, entry_sent_at)
        position = await self.store.record_fill(
            position.id,
            venue_position.quantity,
            venue_position.entry_price,
            filled_at=filled_at,
            side=venue_position.side.value if flipped else None,
            unprotected_since=naked_since,
        )
        await self.store.record_event(
            Severity.WARNING,
            "position_adopted",
            f"adopted {venue_position.symbol} {venue_position.side.value} {venue_position.quantity} found on the venue",
            symbol=venue_position.symbol,
            position_id=position.id,
        )
        # Adopted into its own record (an entry in doubt): its orders as recorded (on Bybit the hard stop
        # its entry carried) are verified, and no id it used is sent again.
        recorded.protect(self.manager, position)
        return flipped

    async def _recorded_orders(self, position_id: int) -> RecordedOrders:
        """A position's orders as recorded, for a guard that starts on a record with a past (an entry of
        unknown outcome settled or adopted): those that may be live are verified, not sent again blindly;
        the hard stop its entry carried (a venue with `attach_stop_to_entry`) is corrected from the fill
        like any carried stop; and no client id it used is sent again, whatever became of its order."""
        assert self.store is not None
        orders = await self.store.orders_for_position(position_id, tuple(OrderRecordStatus))
        live = [o for o in orders if o.status in LIVE_ORDER_STATUSES]
        carried = self.venue.capabilities().attach_stop_to_entry
        attached = next((o for o in live if o.purpose is OrderPurpose.STOP_LOSS), None) if carried else None
        return RecordedOrders(live, attached, [o.client_order_id for o in orders])

    async def restart_protection(self) -> StartupReport:
        """Stop the TS manager, reload from the database, verify against the venue, re-arm. Asked again
        while one runs (the dashboard's key and a `tsbot restart-protection` together), the asker gets that
        restart's report: two interleaved restarts stopped each other's manager mid-restore. Refused
        (`ProtectionRestartRefused`) while the database is unreachable: a restart reloads every position
        from it, and the running guards protect without it."""
        running = self._restart
        if running is None or running.done():
            if self.db_watch is not None and self.db_watch.down:
                message = (
                    "refused: the database is unreachable; a restart reloads every position from it, so the "
                    "running guards keep protecting until it is back"
                )
                log.warning("restart protection %s", message)
                raise ProtectionRestartRefused(message)
            running = self._restart = asyncio.ensure_future(self._restart_protection())
            running.set_name("restart-protection")
        return await asyncio.shield(running)

    async def _restart_protection(self) -> StartupReport:
        """The reconcile loop is stopped first (a pass in flight is cancelled and awaited): a pass that
        outlived its manager saw every order of ours as an orphan and cancelled them all."""
        assert self.manager is not None
        log.info("restarting the protection manager on operator request")
        # The account stream as the restart begins: a break during it (a drop and a reconnect, its gap held
        # for the new guards) means it vouches for nothing the old manager knew (r90).
        self._stream_mark_at_restart = self._account_stream_mark()
        await self._supervisor.stop_one("reconciler")
        now = self.clock.monotonic()
        still_open = self.manager.open_guards()
        trails_without_order = frozenset(
            g.position_id for g in still_open if g.covered and not g.covered_without_engine
        )
        self._carried = _CarriedProtection(
            views={g.position_id: self._position_view(g, now) for g in still_open},
            coverage={g.position_id: g.coverage() for g in still_open},
            since=now,
            trails_without_order=trails_without_order,
        )
        self._protection_ready.clear()
        self._entries_handed_over.clear()
        # Until the new manager has its guards, nobody moves a managed trail or resolves an entry. Past a
        # grace period the lease says so (its readers then count neither as looked after), as the carried
        # state does; within it, a restart's round trips are no alarm.
        said_starting = asyncio.ensure_future(self._say_starting_after(self._grace_seconds(), self._carried))
        stream_watched = asyncio.ensure_future(self._doubt_carried_on_a_stream_break(self._carried))
        handed_over = 0

        def hand_over() -> None:
            """In two steps, as soon as each can be taken, not once every guard's first pass has ended (a
            pass through a ban held a restart 37 s in the chaos soak, a stop's fill unread all along):
            the guards exist (the account's events wait for them), then the venue's list is reconciled
            (the reconcile loop runs again)."""
            nonlocal handed_over
            handed_over += 1
            if handed_over == 1:
                self._carried = None
                self._protection_ready.set()
                said_starting.cancel()
                stream_watched.cancel()
                self._say_running_phase(LeasePhase.RUNNING)
            elif handed_over == 2:
                self._entries_handed_over.set()
                if self.state is EngineState.RUNNING:
                    self._supervisor.start("reconciler", self._reconcile_loop)
                    # At once, not an interval later: a close or a cancel the old manager had under way
                    # when it was stopped may have left a stop of ours on a flat symbol.
                    assert self.manager is not None
                    self.manager.request_reconcile()

        try:
            await self.manager.stop(drain=True)  # what is on its way gets its answer
            old = self.manager
            self.startup_report = await self._start_protection(
                hand_over,
                old.handed_over,
                old.handed_over_unsent,
                old.handed_over_confirmed,
                old.handed_over_left,
            )
        finally:
            while handed_over < 2:  # a restart that failed still hands over what it has
                hand_over()
        report = self.startup_report
        troubled = bool(
            report.failed
            or report.gone_symbols
            or report.in_doubt_symbols
            or report.unlisted_symbols
            or report.kept_unread_symbols
        )
        log.log(logging.WARNING if troubled else logging.INFO, "protection restarted: %s", report.describe())
        assert self.store is not None
        # An operator's request that went well is no warning (a read-only watcher counted each as one); one
        # that left positions uncovered is.
        await self.store.record_event(
            Severity.WARNING if troubled else Severity.INFO, "protection_restarted", report.describe()
        )
        return report

    # --- loops ---------------------------------------------------------------------------------------

    async def _mark_feed(self) -> None:
        assert self.manager is not None
        async for mark in self.venue.watch_mark_prices():
            self._mark_streamed_at[mark.symbol] = self.clock.monotonic()
            self._take_mark(mark)

    def _take_mark(self, mark: MarkPrice, *, by_rest: bool = False) -> None:
        known = self.marks.get(mark.symbol)
        # Older than the one held: a REST answer overtaken by the stream. By REST, the same one again is no
        # news either: a venue that stopped publishing a mark answers it unchanged, and taken, it made the
        # frozen mark look fresh (its staleness, in health and alerts, went quiet).
        if known is not None and (
            mark.timestamp <= known.timestamp if by_rest else mark.timestamp < known.timestamp
        ):
            return
        self.marks[mark.symbol] = mark
        self._last_mark_at = self._mark_received_at[mark.symbol] = self.clock.monotonic()
        manager = self.manager  # restart_protection swaps it
        if manager is not None:
            manager.on_mark(mark.symbol, mark.price, mark.timestamp)

    async def _silent_marks_by_rest(self) -> None:
        """A held symbol whose marks the stream has not brought for half `health.stale_mark_seconds` has them
        read by REST every `SILENT_MARKS_POLL_SECONDS` until the stream brings them again. The stream's own
        fallback watches its streams: one for every symbol (Binance's `!markPrice@arr`) stays fresh while
        it leaves a symbol out, and that symbol's trail froze (F13: "6 of 7 positions frozen"). Half: the
        first read lands before the mark is stale (begun at the threshold itself, every such gap raised a
        stale-mark alarm, and its recovery, while the REST reads were on their way)."""
        silent: set[str] = set()
        failing = False  # said once per run of failures (a ban can last days)
        limit = float(self.settings.health.stale_mark_seconds) / 2
        while True:
            await self.clock.sleep(SILENT_MARKS_POLL_SECONDS)
            manager = self.manager
            if manager is None or manager.stopped:
                continue
            now = self.clock.monotonic()
            held = {g.symbol for g in manager.open_guards()}
            quiet = {s for s in held if now - self._mark_streamed_at.get(s, self._connected_at) > limit}
            for back in sorted(silent - quiet):
                if back in held:
                    log.info("marks of %s come from the stream again", back)
            began = sorted(quiet - silent)
            silent = quiet
            if began:
                log.warning(
                    "marks of %s silent on the stream for more than %gs: read by REST meanwhile",
                    ", ".join(began),
                    limit,
                )
            if not quiet:
                continue
            # A few symbols one by one (Binance weighs premiumIndex 1 with a symbol, 10 without), else one read.
            wanted = (
                [[s] for s in sorted(quiet)] if len(quiet) <= SILENT_MARKS_ONE_BY_ONE else [sorted(quiet)]
            )
            answers = await asyncio.gather(
                *(
                    manager.read(
                        functools.partial(self.venue.fetch_mark_prices, symbols),
                        "fetch_mark_prices",
                        Lane.READ,
                    )
                    for symbols in wanted
                ),
                return_exceptions=True,
            )
            failures = [a for a in answers if isinstance(a, BaseException)]
            for failure in failures:
                # (A read cancelled under us, by a protection restart's manager, is a failed read; this
                # loop's own cancellation raises from the gather.)
                if not isinstance(failure, ExchangeError | TimeoutError | asyncio.CancelledError):
                    raise failure
            if failures and not failing:
                log.warning(
                    "marks of %s by REST failed (%s); they go stale until a read succeeds",
                    ", ".join(sorted(quiet)),
                    failures[0],
                )
            failing = bool(failures)
            for answer in answers:
                if isinstance(answer, dict):
                    for mark in answer.values():
                        if mark.symbol in quiet:
                            self._take_mark(mark, by_rest=True)

    async def refresh_markets(self) -> None:
        """Read the venue's markets again, so entries follow what the venue does now: a symbol that stopped
        trading mid-run (a delisting: Binance SETTLING) refuses them before anything is sent, one trading
        again takes them (read once at start, it was refused until a restart). A symbol the venue no
        longer lists stays known; the guards keep the markets they were given."""
        manager = self.manager
        if manager is None:
            return
        fresh = await manager.read(self.venue.load_markets, "load_markets", Lane.READ)
        for symbol, market in fresh.items():
            old = self.markets.get(symbol)
            if old is not None and old.trading != market.trading:
                if market.trading:
                    log.info("%s trades again on %s: entries go there", symbol, self.exchange_name)
                else:
                    log.warning(
                        "%s is no longer trading on %s (%s): no entry goes there; a position on it stays guarded",
                        symbol,
                        self.exchange_name,
                        market.status,
                    )
            self.markets[symbol] = market

    async def _markets_loop(self) -> None:
        failing = False  # said once per run of failures
        while True:
            await self.clock.sleep(MARKETS_REFRESH_SECONDS)
            try:
                await self.refresh_markets()
            except (ExchangeError, TimeoutError) as exc:
                if not failing:
                    log.warning(
                        "the venue's markets were not read again (%s); their statuses stay as last read", exc
                    )
                failing = True
                continue
            failing = False

    async def _marks_to_db(self) -> None:
        assert self.store is not None
        while True:
            await self.clock.sleep(1.0)
            if self.manager is None:
                continue
            batch = [
                (g.position_id, self.marks[g.symbol].price)
                for g in self.manager.guards.values()
                if g.symbol in self.marks
            ]
            await self.store.update_marks(batch)

    def _reconcile_interval(self, stream_down: bool) -> float:
        """Between two reconcile passes: `reconcile_seconds`, and half the grace period at most while the
        account stream is down. Then the venue's listing is all that tells a stop gone, and a stop removed
        by hand stayed missing up to 10 s, past grace, while every surface said covered (an operator on the
        Binance-wire emulator, the stream dropped). The reads' lane keeps the passes within the venue's
        budget (at most 80 % of it), which may space them further."""
        interval = float(self.settings.protection.reconcile_seconds)
        if stream_down:  # (not back to back with a grace of 0, which the configuration allows: a reviewer)
            half_grace = max(
                STREAM_DOWN_RECONCILE_MIN_SECONDS, float(self.settings.protection.grace_seconds) / 2
            )
            interval = min(interval, half_grace)
        return interval

    async def _reconcile_loop(self) -> None:
        interval = self._reconcile_interval(stream_down=False)
        due = self.clock.monotonic() + interval
        down_told = False
        while True:
            manager = self.manager
            assert manager is not None
            # Woken each STREAM_CHECK_SECONDS to look at the account stream: an outage is a gap from its
            # first look, not from the next pass (up to `reconcile_seconds` later; an operator on the Bybit
            # emulator saw a dropped stream's doubt come 15 s after the drop).
            wait = min(STREAM_CHECK_SECONDS, max(0.0, due - self.clock.monotonic()))
            asked = await wait_event(self.clock, manager.reconcile_requested, wait)
            # An account stream that stays down tells no gap until it is back: its events are lost
            # meanwhile, so each pass is the venue's read after a gap (from its last message). Told once
            # per outage, the first listing that answered cleared it, and a stop cancelled after that
            # went unseen while later listings failed.
            down_since = self._account_stream_down_since()
            if down_since is None:
                down_told = False
            elif not down_told:
                down_told = True
                manager.stream_gap(down_since)  # (asks for a pass now)
                asked = True
            if not asked and self.clock.monotonic() < due:
                continue
            manager.reconcile_requested.clear()
            interval = self._reconcile_interval(stream_down=down_since is not None)
            due = self.clock.monotonic() + interval
            if down_since is not None:
                manager.stream_gap(down_since, read_now=False)
            try:
                await self._reconcile_pass()
            except (ExchangeError, TimeoutError) as exc:
                log.warning("reconcile: venue unavailable (%s); next attempt in %.0fs", exc, interval)
            except DatabaseDown:  # adopting needs the database; the rest of the pass went on without it
                log.debug("reconcile: the database is unreachable; adoption waits for it")

    def _stops_unchecked(self, now: float) -> tuple[float | None, str]:
        """How long no reconcile pass has checked the venue's stops, every one since failing, once that is
        `UNCHECKED_PASSES` passes' time or more (None before: a pass that fails now and then is no alarm);
        and why the last one failed."""
        if not self._reconcile_failed or self._reconciled_at is None:
            return None, ""
        unchecked = now - self._reconciled_at
        limit = UNCHECKED_PASSES * float(self.settings.protection.reconcile_seconds)
        return (unchecked, self._reconcile_failed) if unchecked >= limit else (None, "")

    async def reconcile_now(self) -> ReconcileReport:
        return await self._reconcile_pass()

    async def _reconcile_pass(self) -> ReconcileReport:
        """One pass, and whether it checked the venue's stops (`_stops_unchecked`): not when it failed, when
        it took an empty list right after connecting for unknown, or when the venue's listing stood on
        part of its reads (Bybit's positions' stop fields without the stop orders: an activation moved by
        someone else goes unseen meanwhile)."""
        assert self.reconciler is not None
        try:
            report = await self.reconciler.reconcile_once()
        except DatabaseDown:  # the venue's part of the pass ran (adopting needs the database)
            self._book_pass(self.reconciler.last_unchecked)
            raise
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self._reconcile_failed = str(exc) or type(exc).__name__
            raise
        self._book_pass(report.skipped or self.reconciler.last_unchecked)
        return report

    def _book_pass(self, partial: str) -> None:
        """A pass that answered: a check of the venue's stops, unless `partial` says why it was not one."""
        if partial:
            self._reconcile_failed = partial
        else:
            self._reconciled_at, self._reconcile_failed = self.clock.monotonic(), ""

    def _last_stop_path(self) -> Path:
        return last_stop_path(self.settings.logging.file, self.exchange_name, self.account_key)

    @property
    def _claimer(self) -> str:
        """Who claims signals: this engine's account, whatever the process."""
        return self.account_key

    async def _housekeeping(self) -> None:
        """Every minute: signals left claimed longer than any wave takes (by any engine) are expired, and
        this account's coverage samples older than the retention are deleted."""
        assert self.store is not None
        while True:
            await self.clock.sleep(HOUSEKEEPING_SECONDS)
            await self.store.delete_coverage_samples_before(
                _utc(self.clock.now() - COVERAGE_RETENTION_SECONDS)
            )
            expired = await self.store.expire_claimed_signals(older_than_seconds=STALE_CLAIM_SECONDS)
            if expired:
                log.warning(
                    "%s claimed more than %.0fs ago never handled: expired",
                    counted(expired, "signal"),
                    STALE_CLAIM_SECONDS,
                )

    async def _watch_code(self) -> None:
        """F10: a fix installed while the engine runs is not running. The dashboard says so on a banner; a
        headless engine said nothing (a reviewer: `tsbot run` on the 06:49 code, the fix on disk at 06:53,
        status "OK"). Said at WARNING when the difference appears or changes, and when it is gone."""
        assert self.code_check_seconds
        while True:
            await self.clock.sleep(self.code_check_seconds)
            difference = await asyncio.to_thread(self.code.check)
            if difference == self.code_difference:
                continue
            self.code_difference = difference
            if difference is None:
                log.info("the code on disk is the code this engine runs again")
                continue
            when = (
                f"newest change {datetime.fromtimestamp(difference.newest_change, UTC):%H:%M:%S} UTC"
                if difference.newest_change
                else "removed"  # (every changed file gone: no time to say, not 1970's)
            )
            log.warning(
                "code on disk changed since this engine started (%s; %s): it runs the code of its start; "
                "restart it to run the change",
                difference.describe(),
                when,
            )

    async def _sample_coverage(self) -> None:
        """Every `COVERAGE_SAMPLE_SECONDS`: the coverage the gauge shows, into the history (journaled in an
        outage like the protection path's writes). The shift report's time-weighted coverage is read there."""
        assert self.store is not None
        due = self.clock.monotonic()
        while True:
            self._coverage_sample = coverage_sample(self.coverage(), _utc(self.clock.now()))
            await self.store.record_coverage_sample(self._coverage_sample)
            # On a fixed grid: a slow write does not push every later sample back (a write slower than
            # the cadence skips the samples it overlapped rather than bunching them).
            now = self.clock.monotonic()
            due += COVERAGE_SAMPLE_SECONDS
            if due <= now:
                due += math.ceil((now - due) / COVERAGE_SAMPLE_SECONDS) * COVERAGE_SAMPLE_SECONDS
                due = due if due > now else due + COVERAGE_SAMPLE_SECONDS
            await self.clock.sleep(due - now)

    def _keep_heard(self, phase: LeasePhase) -> None:
        """Heartbeat the lease while its watcher (`_lease_heartbeat`) does not run: through the start's
        reads and restore (retries with backoff alone can pass 30 s), and from the supervisor's stop to the
        release. An engine not heard for `LEASE_SILENT_SECONDS` is reported hung, or its host gone (`tsbot
        status`, a watch); a slow start or stop is neither. Losing the lease meanwhile is the watcher's to
        find once it runs, or the stop's."""
        self._heard_phase = phase  # a task still running (a stop right after a start) writes it from now
        if self._heard is None or self._heard.done():
            self._heard = asyncio.create_task(self._heartbeat_only(), name="lease-heard")

    async def _heartbeat_only(self) -> None:
        while True:  # at once, then every LEASE_CHECK_SECONDS: a stop of a second is said `stopping` too
            lease = self._lease
            if lease is not None and lease.alive():
                await self._beat_done()
                # Not cancelled with this task: a heartbeat cancelled mid-query leaves the lease's connection
                # busy with the cancellation when the release (or the watcher) uses it next.
                self._beat = asyncio.ensure_future(lease.heartbeat(self._heard_phase))
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._beat)
            await self.clock.sleep(LEASE_CHECK_SECONDS)

    async def _beat_done(self) -> None:
        """The last heartbeat in flight has ended (within LEASE_TIMEOUT_SECONDS); a cancel of the caller does
        not cancel it."""
        beat = self._beat
        if beat is not None:
            await asyncio.wait({beat})
            if self._beat is beat:
                self._beat = None

    async def _stop_keeping_heard(self) -> None:
        task, self._heard = self._heard, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
        await self._beat_done()

    async def _lease_heartbeat(self) -> None:
        """Keep the account lease: heartbeat it; when its connection dies, stop entries at once (protection
        goes on), say so once per interval, and take it again. If another engine holds it meanwhile, this
        one stops at once and sends nothing more (`fatal`); `tsbot run` then exits non-zero."""
        await self._stop_keeping_heard()  # the start's heartbeats end before this one's (one query at a time)
        if self._lease is not None and self._lease.alive():
            with contextlib.suppress(Exception):  # running from now, not 2 s later (a failure: found below)
                await self._lease.heartbeat(self._running_phase)
        said_at = -math.inf
        while True:
            if await wait_event(self.clock, self._running_phase_changed, LEASE_CHECK_SECONDS):
                self._running_phase_changed.clear()
            lease = self._lease
            if lease is not None and lease.alive():
                try:
                    await lease.heartbeat(self._running_phase)
                    continue
                except Exception as exc:
                    log.warning("account lease heartbeat failed (%s): the lease is lost", type(exc).__name__)
                    await _quietly(lease.release())
            now = self.clock.monotonic()
            if self.lease_lost_since is None:
                self.lease_lost_since = now
                self._apply_entries_state()
                # A warning, not a critical: it is usually taken again at once (an operator read "CRITICAL
                # the account lease is lost" and, a moment later, "taken again after 0.0s"). Not taken again,
                # it is said as an error once per interval below; taken by another engine, as critical.
                log.warning(
                    "the account lease is lost: entries stop until it is taken again; open positions stay "
                    "protected"
                )
            try:
                self._lease = await self._acquire_lease(self._running_phase)
                # What it found is this engine's own heartbeat from before the loss: nothing was left
                # unlooked-after that a later start should date from it.
                self._lease.handed_over()
            except LeaseHeld as exc:
                if is_own_lease(exc.holder, self._lease_since):
                    say = now - said_at >= LEASE_SAY_EVERY_SECONDS
                    if not await self._end_own_lost_session(say) and say:
                        said_at = now
                    continue
                self.fatal = f"another engine took the account: {exc}"
                log.critical("%s; this engine stops and sends nothing more", self.fatal)
                self._spawn(self.stop(drain=False), "stop-after-lease-lost")
                return
            except Exception as exc:
                if now - said_at >= LEASE_SAY_EVERY_SECONDS and not (self.db_watch and self.db_watch.down):
                    said_at = now
                    log.error(
                        "account lease lost for %.0fs and cannot be taken again (%s: %s); entries stay paused",
                        now - self.lease_lost_since,
                        type(exc).__name__,
                        str(exc)[:200],
                    )
                continue
            log.warning("account lease taken again after %.1fs", now - self.lease_lost_since)
            self.lease_lost_since = None
            self._apply_entries_state()

    async def _end_own_lost_session(self, say_failure: bool) -> bool:
        """The lease is still held by this engine's own session from before the loss (the server keeps it
        until it notices the close): not another engine. That session is ended; the next attempt takes the
        lease. True when it was; a failure is said when `say_failure` (once per interval)."""
        assert self._db is not None and self._lease_since is not None
        db = self.settings.database
        try:
            ended = await end_own_lost_session(
                self._db.target.dsn,
                self.exchange_name,
                self.account_key,
                self._lease_since,
                db.password.get_secret_value() if db.password else None,
            )
        except Exception as exc:
            ended, why = None, f"{type(exc).__name__}: {str(exc)[:200]}"
        else:
            why = "" if ended is not None else "the server did not end it"
        if ended is not None:
            log.warning(
                "the account lease was still held by this engine's own lost session (server pid %s): ended; "
                "taking the lease again",
                ended,
            )
            return True
        if say_failure:
            log.error(
                "the account lease is still held by this engine's own lost session and could not be ended "
                "(%s); entries stay paused, trying again",
                why,
            )
        return False

    async def _doubt_carried_on_a_stream_break(self, carried: _CarriedProtection) -> None:
        """While a protection restart carries the positions' last verified state: the account stream down or
        broken (a drop and a reconnect) may have lost a stop's cancel, and nothing lists the venue until the
        new guards exist. As the running manager does, the carried stops are unverified, from the break on,
        once a grace period has passed with no listing: a position whose hard stop was cancelled by hand
        during such a break read covered for the whole restart (12 s behind a slow snapshot; 5.8 s without
        a restart, r90). At once, every position of a restart read uncovered for a harmless 0.3 s drop
        until the snapshot came (r91)."""
        broken_at: float | None = None
        while not carried.guards_created:
            now = self.clock.monotonic()
            if broken_at is None and (
                self._account_stream_mark() != self._stream_mark_at_restart
                or self._account_stream_down_since() is not None
            ):
                broken_at = now
            if broken_at is not None and now - broken_at >= self._grace_seconds():
                carried.unverified_from(
                    broken_at,
                    "not verified: the account stream is down or broke, and the venue has not been listed since",
                )
                return
            await self.clock.sleep(STREAM_CHECK_SECONDS)

    async def _say_starting_after(self, seconds: float, carried: _CarriedProtection) -> None:
        """`starting` on the lease once a protection restart has lasted `seconds`, as soon as it leaves
        something unlooked-after: managed trails it does not move, or entries sent that it does not settle
        or guard (cancelled at the hand-over). An entry admitted but still waiting for room in the order
        budget has not reached the venue: it was counted, and the lease cried wolf on a restart that left
        nothing exposed. Stops on the venue protect without it, and the health loop goes on measuring: no
        alarm for those either."""
        await self.clock.sleep(seconds)
        while not (
            carried.trails_without_order
            or self._entries_on_their_way()
            or self._in_doubt
            or self._awaiting_guard
        ):
            await self.clock.sleep(RESTART_EXPOSURE_POLL_SECONDS)
        self._say_running_phase(LeasePhase.STARTING)

    def grace_seconds(self) -> float:
        """The protection grace period, in seconds (a position's stops may take this long to be confirmed)."""
        return self._grace_seconds()

    def _grace_seconds(self) -> float:
        return float(self.settings.protection.grace_seconds)

    def _holds_the_lease(self) -> bool:
        return self.fatal is None and self._lease is not None and self._lease.alive()

    def _say_running_phase(self, phase: LeasePhase) -> None:
        self._running_phase = phase
        self._running_phase_changed.set()

    async def _acquire_lease(self, phase: LeasePhase = LeasePhase.RUNNING) -> EngineLease:
        assert self._db is not None
        db = self.settings.database
        lease = await EngineLease.acquire(
            self._db.target.dsn,
            self.exchange_name,
            self.account_key,
            self.version,
            db.password.get_secret_value() if db.password else None,
            label=self.settings.venue.account,
            phase=phase,
            # Taken again (lost to a database restart): `tsbot status` kept saying the holder started then.
            since=self._lease_since,
            code=(self.code.roots, self.code.running),
        )
        if self._lease_since is None:
            self._lease_since = lease.started_at
        return lease

    # --- waves ---------------------------------------------------------------------------------------

    async def _wave_loop(self) -> None:
        assert self.consumer is not None
        async for wave in self.consumer.waves():
            if self._draining:
                for signal in wave.signals:
                    await self._reject(signal, ENGINE_STOPPING, None, routine=True)
                return
            self._wave_begun = (self.clock.now(), len(wave.signals))
            wave_task = self._wave_in_progress = asyncio.ensure_future(self.process_wave(wave))
            try:
                await asyncio.shield(wave_task)
            except Exception:
                self.consumer.wave_failed()  # (its signals not handled yet are taken again)
                raise
            finally:
                # Cut loose from this loop (the stop cancels it), a wave under way stays known until it
                # ends: the stop waits for it, then cancels it, instead of leaving it to send on its own.
                if wave_task.done():
                    self._wave_in_progress = self._wave_begun = None
                else:
                    wave_task.add_done_callback(self._wave_ended)

    def _wave_ended(self, task: asyncio.Future[None]) -> None:
        if self._wave_in_progress is task:
            self._wave_in_progress = self._wave_begun = None

    async def process_wave(self, wave: SignalWave) -> None:
        assert self.store is not None and self.manager is not None
        started = self.clock.now()
        self._last_wave_at = self.clock.monotonic()
        wave_id = await self.store.start_wave(len(wave.signals))
        accepted: list[tuple[SignalRecord, PositionSide, Decimal]] = []
        seen: set[str] = set()
        # A pause nobody asked for (the breaker, the lease, the database) is said as a warning: so is the wave
        # it rejects (its line stayed INFO, below what a headless run's operator reads; r74).
        loud_pause = (
            self.entries_paused
            and entries_toggle_level(paused=True, by=self.entries_paused_by or "") == logging.WARNING
        )
        for signal in wave.signals:
            reason, side, quantity = self._validate(signal, seen, pending=len(accepted))
            if reason is not None:
                # A symbol already held, or twice in a wave, is the routine of a signal source that repeats
                # itself (the sim's seeded waves, many providers): said, not warned of; it padded the
                # dashboard's warning count (an operator). A pause nobody asked for loses signals: warned.
                routine = reason in (ALREADY_HELD, TWICE_IN_WAVE) or (
                    reason == ENTRIES_PAUSED and not loud_pause
                )
                await self._reject(signal, reason, wave_id, routine=routine)
                continue
            seen.add(signal.symbol)
            accepted.append((signal, side, quantity))

        queue: asyncio.Queue[tuple[SignalRecord, PositionSide, Decimal]] = asyncio.Queue()
        for item in accepted:
            queue.put_nowait(item)
        opened: list[PositionGuard] = []
        doubts: list[EntryInDoubt] = []

        async def worker() -> None:
            while not queue.empty():
                signal, side, quantity = queue.get_nowait()
                if self._draining:  # not sent yet, and the engine is stopping: never sent
                    await self._reject(signal, ENGINE_STOPPING, wave_id, routine=True)
                    continue
                try:
                    outcome = await self._open_position(signal, side, quantity, wave_id)
                except Exception as exc:
                    # One signal's failure ends neither the wave nor its other workers (a failed gather
                    # left them running unawaited while the signals were taken again: handled twice).
                    await self._signal_not_handled(signal, wave_id, exc)
                    continue
                if isinstance(outcome, PositionGuard):
                    opened.append(outcome)
                elif isinstance(outcome, EntryInDoubt):
                    doubts.append(outcome)

        workers = min(len(accepted), self.settings.signals.max_concurrent_entries)
        await asyncio.gather(*(worker() for _ in range(workers)))
        # Those accepted and then not sent (a pause, the venue's hold) are rejected too: "7 accepted, 0
        # opened" was all a headless run said of seven operator signals rejected (an operator).
        rejected = self._rejected_in_wave.pop(wave_id, [])
        lost = any(not routine for _, _, routine in rejected)
        log.log(
            logging.WARNING if lost else logging.INFO,
            "wave %d: %s, %d accepted, %d opened%s%s",
            wave_id,
            counted(len(wave.signals), "signal"),
            len(accepted),
            len(opened),
            f", {len(doubts)} of unknown outcome" if doubts else "",
            f", {len(rejected)} rejected (the first: {rejected[0][0]}: {rejected[0][1]})" if rejected else "",
        )
        task = asyncio.create_task(
            self._finish_wave(wave_id, started, len(wave.signals), opened, doubts), name=f"wave-{wave_id}"
        )
        self._wave_tasks.add(task)
        task.add_done_callback(self._wave_tasks.discard)

    async def _signal_not_handled(self, signal: SignalRecord, wave_id: int, exc: Exception) -> None:
        """A wave's signal whose handling failed. The database away: taken again once it answers (if it got
        no position: `SignalConsumer.wave_failed`). Anything else is a defect: said with its traceback, and
        the signal rejected so (taken again, it would fail every wave)."""
        if isinstance(exc, DatabaseDown) or is_unreachable(exc):
            log.warning(
                "wave %d: signal %d (%s) not handled, the database stopped answering (%s); taken again once "
                "it answers",
                wave_id,
                signal.id,
                signal.symbol,
                type(exc).__name__,
            )
            assert self.consumer is not None
            self.consumer.wave_failed()
            return
        log.exception("wave %d: signal %d (%s): handling it failed", wave_id, signal.id, signal.symbol)
        try:
            await self._reject(signal, f"internal error: {type(exc).__name__}", wave_id)
        except Exception:
            log.exception("wave %d: signal %d could not be recorded rejected", wave_id, signal.id)

    def _validate(
        self, signal: SignalRecord, seen: set[str], pending: int
    ) -> tuple[str | None, PositionSide, Decimal]:
        assert self.manager is not None
        side = PositionSide.LONG
        try:
            side = PositionSide(parse_side(signal.side))
            parse_score(signal.score)
        except BadSignal as exc:
            return str(exc), side, Decimal(0)
        if self.entries_paused:
            return ENTRIES_PAUSED, side, Decimal(0)
        if inherited := [d for d in self._in_doubt.values() if d.judged_from > 0]:
            provable = max(d.judged_from for d in inherited) - self.clock.monotonic()
            until = (
                f"until the venue can say, in {provable:.0f}s"
                if provable > 0
                else "until the venue answers for them (it could say by now; the breaker judges them)"
            )
            return (
                f"entries held: {len(inherited)} {'entry' if len(inherited) == 1 else 'entries'} from before "
                f"the restart of unknown outcome (each may be a position without stops) {until}",
                side,
                Decimal(0),
            )
        if (doubt_since := self.manager.stops_in_doubt_since) is not None:
            return (
                "entries held: the account stream had a gap and no listing of the venue has answered "
                f"since, {format_duration(self.clock.monotonic() - doubt_since)} ago: the open positions' stops are "
                "unverified, and a new position's could not be verified either",
                side,
                Decimal(0),
            )
        market = self.markets.get(signal.symbol)
        if market is None:
            return f"unknown symbol {signal.symbol} on {self.exchange_name}", side, Decimal(0)
        if not market.trading:
            return (
                f"{signal.symbol} is not trading on {self.exchange_name} ({market.status})",
                side,
                Decimal(0),
            )
        if signal.symbol in seen:
            return TWICE_IN_WAVE, side, Decimal(0)
        held = set(self.manager.by_symbol)
        carried = self._carried
        if carried is not None:  # a protection restart before its guards exist: the positions it carries
            held.update(view.symbol for view in carried.views.values())
        if signal.symbol in held or signal.symbol in self._in_flight:
            return ALREADY_HELD, side, Decimal(0)
        open_positions = max(len(self.manager.guards), len(carried.views) if carried is not None else 0)
        if open_positions + len(self._in_flight) + pending >= self.settings.signals.max_positions:
            return f"max_positions ({self.settings.signals.max_positions}) reached", side, Decimal(0)
        if (no_room := self._no_room_for_stops(pending)) is not None:
            return no_room, side, Decimal(0)
        mark = self.marks.get(signal.symbol)
        if mark is None:
            return "no mark price yet", side, Decimal(0)
        quantity = market.round_quantity(self.settings.signals.position_size_usd / mark.price, ROUND_DOWN)
        if quantity < market.min_quantity or quantity * mark.price < market.min_notional:
            return (
                f"size below min notional ({self.settings.signals.position_size_usd} USD → {quantity} × {mark.price} "
                f"< {market.min_notional})",
                side,
                Decimal(0),
            )
        return None, side, quantity

    def _say_the_conditional_order_cap(self) -> None:
        """Once, at start: a `max_positions` whose stops would not fit under the venue's cap (with room for
        moves) is not what the engine will open; said so, with the figure it will."""
        capabilities = self.venue.capabilities()
        if not capabilities.stops_are_orders:
            return
        cap = capabilities.max_conditional_orders
        spare = _conditional_spare(cap)
        fits = (cap - spare) // STOPS_PER_POSITION
        if self.settings.signals.max_positions > fits:
            log.warning(
                "signals.max_positions is %d, but the venue holds at most %d conditional orders per account: "
                "at most %d positions are opened (their two stops each, %d kept for stop moves)",
                self.settings.signals.max_positions,
                cap,
                fits,
                spare,
            )

    def _no_room_for_stops(self, pending: int) -> str | None:
        """Why a new position's stops would not fit under the venue's cap on open conditional orders
        (Binance: 200 per account), keeping room for stop moves (a make-before-break move or a resize
        needs its new stop live beside the old); None where they fit, or where stops are no orders of
        their own (Bybit). Admitted, its stops were refused (-4045) and it stayed naked until another
        position closed; a full book also refused every move, so a managed trail stopped trailing."""
        capabilities = self.venue.capabilities()
        if not capabilities.stops_are_orders or self.manager is None:
            return None
        cap = capabilities.max_conditional_orders
        spare = _conditional_spare(cap)
        held = self.manager.conditional_orders_held()
        if self._carried is not None:  # a protection restart before its guards exist
            held = max(held, STOPS_PER_POSITION * len(self._carried.views))
        coming = STOPS_PER_POSITION * (len(self._in_flight) + pending)
        if held + coming + STOPS_PER_POSITION + spare <= cap:
            return None
        foreign = self.manager.foreign_stops_seen
        return (
            f"no room for its stops: the venue holds at most {cap} conditional orders per account "
            f"({held - foreign} ours live, {foreign} not ours, {coming} for entries on their way, "
            f"{spare} kept for stop moves)"
        )

    def _not_to_be_sent(self) -> str | None:
        """Why an entry admitted and not sent yet must not be sent now (None: it may go): the engine began
        stopping (a stop sends no entry it has not sent; it only finishes those sent), entries were paused
        while it waited, or the venue's word holds entries back now (a ban, rate refusals piled up: the
        entries admitted before waited out the 429's hold and went at its end, with the stops queued behind
        the same hold; an operator saw 11 positions opened after the header said "ENTRIES HELD")."""
        if self._draining or self.state is not EngineState.RUNNING:
            return ENGINE_STOPPING
        if self.entries_paused:
            return self._paused_before_sent()
        refusal = self.order_budget.entry_refusal() if self.order_budget is not None else None
        return _not_kept(refusal) if refusal is not None else None

    def _paused_before_sent(self) -> str:
        """The reason of an entry a wave accepted and a pause stopped before it was sent: a pause stops
        every entry not sent yet, not only the next wave's (the incident's waves kept opening positions while
        their stops failed)."""
        why = f": {self.entries_pause_reason}" if self.entries_pause_reason else ""
        return f"entries paused by the {self.entries_paused_by or 'operator'} before it was sent{why}"

    async def _reject(
        self, signal: SignalRecord, reason: str, wave_id: int | None, *, routine: bool = False
    ) -> None:
        """`routine`: turned away in the ordinary course (`SignalRejected.routine`), not a signal lost."""
        assert self.store is not None
        await self.store.finish_signal(signal.id, SignalStatus.REJECTED, reason, wave_id=wave_id)
        if wave_id is not None:
            self._rejected_in_wave.setdefault(wave_id, []).append((signal.symbol, reason, routine))
        log.info("signal %s %s %s rejected: %s", signal.id, signal.symbol, signal.side, reason)
        self.events_bus.publish(
            SignalRejected(
                at=self.clock.now(),
                signal_id=signal.id,
                symbol=signal.symbol,
                reason=reason,
                wave_id=wave_id,
                routine=routine,
            )
        )

    async def _open_position(
        self, signal: SignalRecord, side: PositionSide, quantity: Decimal, wave_id: int
    ) -> PositionGuard | EntryInDoubt | None:
        """The signal's position, guarded; the entry in doubt when its outcome is not known (settled in the
        background); None when no position was opened."""
        assert self.store is not None and self.manager is not None
        manager = self.manager
        stops = manager.protective_orders_per_position
        if self.venue.capabilities().attach_stop_to_entry and isinstance(self.venue, AttachesStopToEntry):
            # The hard stop rides on the entry: no send of its own is promised (one moved by the fill is
            # replaced by a protective send that goes first anyway). Promised, it stayed booked for good.
            stops -= 1
        self._in_flight.add(signal.symbol)
        settling = False  # in doubt: `_settle` frees the symbol once the outcome is known
        promise: EntryPromise | None = None
        try:
            # A stop of the symbol's last position whose cancel failed is being cancelled again: the new
            # position waits for it (an old stop for the old quantity would act on the new position).
            manager = await self._manager_with_symbol_clear(
                signal.symbol, float(self.settings.protection.call_timeout_seconds)
            )
            if manager is None:
                if self._draining or self.state is not EngineState.RUNNING:
                    reason = ENGINE_STOPPING
                elif self.manager is None or self.manager.stopped:
                    reason = "the protection manager is stopped (its restart failed)"
                else:
                    reason = "a stop of its closed position could not be cancelled yet"
                await self._reject(signal, reason, wave_id, routine=reason == ENGINE_STOPPING)
                return None
            try:
                promise = await manager.budget.acquire_entry(stops)
            except Banned as exc:
                await self._reject(signal, f"venue refuses requests for now: {exc}", wave_id)
                return None
            except RateLimited as exc:  # refusals piled up: the next could be a ban's (`OrderBudget`)
                await self._reject(signal, _not_kept(exc), wave_id)
                return None
            # Paused while it waited for room (the breaker, say, while stops were refused), or stopping.
            if (not_sent := self._not_to_be_sent()) is not None:
                manager.budget.release_promise(promise)  # (its probe, if it was one, ends below)
                await self._reject(signal, not_sent, wave_id, routine=not_sent == ENGINE_STOPPING)
                return None
            try:
                position = await self.store.create_position(
                    symbol=signal.symbol,
                    exchange=self.exchange_name,
                    side=side.value,
                    quantity=quantity,
                    signal_id=signal.id,
                    wave_id=wave_id,
                    trailing_activation_percent=self.settings.protection.activation_percent,
                    trailing_callback_percent=self.settings.protection.callback_percent,
                )
            except PositionAlreadyOpen:
                manager.budget.release_promise(promise)
                await self._reject(signal, ALREADY_HELD, wave_id, routine=True)
                return None
            cid = client_order_id(self._token, position.id, OrderPurpose.ENTRY, 0)
            order_side = OrderSide.BUY if side is PositionSide.LONG else OrderSide.SELL
            await self.store.record_order(
                client_order_id=cid,
                position_id=position.id,
                purpose=OrderPurpose.ENTRY,
                side=order_side.value,
                type="market",
                quantity=quantity,
            )
            # Where the venue allows it (Bybit), the hard stop rides on the entry: no naked moment at all.
            stop_record = await self._record_attached_stop(signal.symbol, side, quantity, position.id)
            await self.store.set_position_status(position.id, PositionStatus.ENTRY_PLACED)

            def entry_call() -> Awaitable[Any]:
                if stop_record is not None and isinstance(self.venue, AttachesStopToEntry):
                    assert stop_record.trigger_price is not None
                    return self.venue.create_market_order_with_stop(
                        signal.symbol,
                        order_side,
                        quantity,
                        stop_record.trigger_price,
                        client_order_id=cid,
                        stop_client_order_id=stop_record.client_order_id,
                    )
                return self.venue.create_market_order(
                    signal.symbol, order_side, quantity, client_order_id=cid
                )

            if (not_sent := self._not_to_be_sent()) is not None:  # while it was recorded: not sent
                return await self._entry_failed(
                    signal, position.id, cid, not_sent, wave_id, promise, stop_record
                )
            doubt = EntryInDoubt(position.id, signal.symbol, side, quantity, cid)
            try:
                order = await self._send_entry(entry_call, doubt, promise)
                if not _entry_ended(order):  # accepted, not filled yet (asked once more already)
                    doubt.working = order.status.value
                    raise OutcomeUnknown(cid, _entry_not_ended(order))
            except (OutcomeUnknown, TimeoutError) as exc:
                # It may have filled: settled by its id in the background (the wave does not wait on a venue
                # that does not answer), counted uncovered meanwhile, its symbol held until then.
                doubt.error = f"entry outcome unknown: {str(exc) or type(exc).__name__}"
                self._doubt_entry(
                    doubt,
                    functools.partial(self._entry_settled, signal, doubt, wave_id, promise, stop_record),
                )
                settling = True
                return doubt
            except InsufficientMargin as exc:
                return await self._entry_failed(
                    signal,
                    position.id,
                    cid,
                    f"insufficient margin: {exc.reason}",
                    wave_id,
                    promise,
                    stop_record,
                )
            except (EntryNotSentAgain, Withheld) as exc:
                return await self._entry_failed(
                    signal, position.id, cid, exc.reason, wave_id, promise, stop_record
                )
            except (Rejected, ExchangeError) as exc:
                why = _not_kept(exc) if isinstance(exc, RateLimited) else str(exc)
                return await self._entry_failed(
                    signal, position.id, cid, f"entry refused: {why}", wave_id, promise, stop_record
                )
            return await self._entry_answered(signal, side, position.id, order, wave_id, promise, stop_record)
        finally:
            if promise is not None:  # a probe that never reached the venue (a failed write) ends here
                manager.budget.entry_answered(promise, room=False)
            if not settling:
                self._in_flight.discard(signal.symbol)

    async def _entry_answered(
        self,
        signal: SignalRecord,
        side: PositionSide,
        position_id: int,
        order: Order,
        wave_id: int,
        promise: EntryPromise,
        stop_record: OrderRecord | None,
        *,
        doubt: EntryInDoubt | None = None,
    ) -> PositionGuard | None:
        """The venue's word on an entry (its answer, or its order found by id): a fill is a position to
        protect now; anything else failed it."""
        assert self.store is not None
        cid = order.client_order_id
        if doubt is not None and await self._adopted_before_answer(doubt):
            return await self._adopted_entry_answered(signal, doubt, order, wave_id, promise)
        if order.filled_quantity <= 0 or order.average_price is None:
            if doubt is not None:
                self._in_doubt.pop(doubt.symbol, None)
            return await self._entry_failed(
                signal, position_id, cid, f"entry {order.status.value}", wave_id, promise, stop_record
            )
        # Filled — or ended part-filled (cancelled, expired): a position of what did fill, protected as such.
        # Its time unprotected counts from the answer, a restart or not (for an entry in doubt, from its
        # send); until its guard exists it is a position without stops (an entry in doubt is counted as one
        # already): its record's writes may wait seconds for the database (a hung server, up to the write
        # timeout), and a protection restart for the database too, and it was counted nowhere meanwhile
        # (the gauge, the exit line), its grace counted from after the writes.
        filled_at = self.clock.monotonic() if doubt is None else doubt.sent_at
        if doubt is None:
            self._awaiting_guard[position_id] = _AwaitingGuard(
                position_id, signal.symbol, side.value, order.filled_quantity, order.average_price, filled_at
            )
        try:
            await self.store.set_order_status(
                cid, OrderRecordStatus.FILLED, exchange_order_id=order.venue_order_id
            )
            venue_filled_at = None if doubt is None else _utc(order.updated_at)
            filled = await self.store.record_fill(
                position_id,
                order.filled_quantity,
                order.average_price,
                filled_at=venue_filled_at,
                unprotected_since=venue_filled_at,  # (an entry in doubt: without stops since it filled)
            )
            if not self._protection_handed_over():  # guarded by the manager the restart brings up
                waiting = self._awaiting_guard.get(position_id)
                if waiting is not None:
                    waiting.why = "filled while the protection manager restarts: no stop yet"
                await self._protection_ready.wait()
        finally:
            self._awaiting_guard.pop(position_id, None)
        manager = self.manager
        assert manager is not None
        guard = manager.protect(filled, filled_at=filled_at, attached_stop_loss=stop_record, fresh_fill=True)
        if doubt is not None:  # its guard counts it from now on
            self._in_doubt.pop(doubt.symbol, None)
        await self.store.finish_signal(signal.id, SignalStatus.OPENED, wave_id=wave_id)
        log.info(
            "Opened %s %s %s at %s (position %s)%s",
            side.value,
            f"{order.filled_quantity:f}",  # plain digits: a quantity read "2.5E+2" in the operators' grep
            signal.symbol,
            f"{order.average_price:f}" if order.average_price is not None else None,
            position_id,
            ""
            if doubt is None
            else f"; its outcome known {self.clock.monotonic() - doubt.sent_at:.1f}s after it was sent",
        )
        self.events_bus.publish(
            PositionOpened(
                at=self.clock.now(),
                position_id=position_id,
                symbol=signal.symbol,
                side=side.value,
                quantity=order.filled_quantity,
                entry_price=order.average_price,
            )
        )
        return guard

    async def _adopted_before_answer(self, doubt: EntryInDoubt) -> bool:
        """The entry's answer takes its turn: an adoption of its record under way is waited for; whether its
        record was adopted (the answer changes nothing in it then). Else no adoption starts from now on."""
        if doubt.adopting is not None:
            await doubt.adopting.wait()
        if doubt.adopted:
            return True
        doubt.answering = True
        # (a guard on its record without an adoption of this doubt: adopted before the doubt was known)
        return self.manager is not None and doubt.position_id in self.manager.guards

    async def _adopted_entry_answered(
        self, signal: SignalRecord, doubt: EntryInDoubt, order: Order, wave_id: int, promise: EntryPromise
    ) -> PositionGuard | None:
        """The answer of an entry in doubt whose record the reconciler adopted the venue's position into
        meanwhile: the record is the guard's (filling it in again read it back as unprotected, or reopened it
        once closed; failing it marked a guarded position `failed`). Only the entry order and the signal
        are told."""
        assert self.store is not None and self.manager is not None
        self._in_doubt.pop(doubt.symbol, None)
        guard = self.manager.guards.get(doubt.position_id)
        if order.filled_quantity > 0 and order.average_price is not None:
            await self.store.set_order_status(
                order.client_order_id, OrderRecordStatus.FILLED, exchange_order_id=order.venue_order_id
            )
            await self.store.finish_signal(signal.id, SignalStatus.OPENED, wave_id=wave_id)
            log.info(
                "%s: the entry in doubt is found filled; position %s, adopted from the venue's list%s",
                signal.symbol,
                doubt.position_id,
                ", holds the other side (the venue's net position)" if doubt.flipped else "",
            )
            return guard
        reason = (
            f"entry {order.status.value}; the position the venue holds on {signal.symbol} is position "
            f"{doubt.position_id}, adopted"
        )
        # (its promise is not released: the adopted guard's stops take its place in the order budget)
        await self.store.set_order_status(order.client_order_id, OrderRecordStatus.REJECTED, error=reason)
        await self._reject(signal, reason, wave_id)
        return None

    def _doubt_entry(self, doubt: EntryInDoubt, settle: Callable[[Order | None], Awaitable[object]]) -> None:
        """From now on `doubt` counts as a position without stops and holds its symbol, and a task asks the
        venue for it by its id until it answers (`_entry_by_id`), then hands the answer to `settle`."""
        doubt.unknown_at = self.clock.monotonic()
        self._in_doubt[doubt.symbol] = doubt
        self._in_flight.add(doubt.symbol)
        task = asyncio.create_task(self._settle(doubt, settle), name=f"settle-entry-{doubt.symbol}")
        self._settlers.add(task)
        task.add_done_callback(self._settlers.discard)

    async def _settle(self, doubt: EntryInDoubt, settle: Callable[[Order | None], Awaitable[object]]) -> None:
        """Said once (log, event, its entry order recorded `unknown` for the operators' SQL and a read-only
        dashboard); settled once the venue answers, and tried again, with backoff, should settling fail (a
        database error, say: the symbol held for good was the alternative). Cancelled (the engine
        stopping), it stays in doubt and holds its symbol: the stop report counts it, and the next start
        settles it from its record."""
        symbol = doubt.symbol
        if doubt.working:
            # Routine on Bybit (41 in a 10-minute soak, each filled 2 s on): said at ERROR, then as a warning
            # and its settling as another (40 warnings for a 20-signal wave, opme50), an alarm an operator
            # learns to skip. Information: its time without stops still counts, and past grace it is an
            # alarm (the gauge, health, the breaker).
            log.info(
                "%s (position %s): the venue has the entry %s, not filled yet; counted uncovered until its "
                "fill is known, asked for by its id (%s)",
                symbol,
                doubt.position_id,
                doubt.working,
                doubt.client_order_id,
            )
        else:
            log.error(
                "%s (position %s): %s; counted uncovered, asked for by its id (%s) until the venue answers",
                symbol,
                doubt.position_id,
                doubt.error,
                doubt.client_order_id,
            )
        recorded = False
        delay = float(self.settings.protection.retry_initial_seconds)
        try:
            while symbol in self._in_doubt:
                if not recorded:
                    recorded = await self._record_doubt(doubt)
                try:
                    await settle(await self._entry_by_id(doubt))
                except Exception:
                    doubt.answering = False  # asked again: the venue's list may adopt it meanwhile
                    log.exception(
                        "%s: settling the entry of unknown outcome failed; counted uncovered, tried again in "
                        "%.0fs",
                        symbol,
                        delay,
                    )
                    await self.clock.sleep(delay)
                    delay = min(delay * 2, float(self.settings.protection.retry_max_seconds))
        finally:
            if symbol not in self._in_doubt:  # settled; else (the engine stopping) its symbol stays held
                self._in_flight.discard(symbol)
                doubt.ended.set()
                # The all-clear where the alarm was read (stderr shows warnings): the doubt said at ERROR and
                # its settling only at INFO left a headless run's operator with the alarm alone. (A working
                # entry raised none: its settling is information too.)
                log.log(
                    logging.INFO if doubt.working else logging.WARNING,
                    "%s (position %s): the entry of unknown outcome is settled: %s",
                    symbol,
                    doubt.position_id,
                    "filled, and guarded" if doubt.guard is not None else "nothing open on the venue from it",
                )

    async def _record_doubt(self, doubt: EntryInDoubt) -> bool:
        assert self.store is not None
        try:
            await self.store.set_order_status(
                doubt.client_order_id, OrderRecordStatus.UNKNOWN, error=doubt.error[:500]
            )
            # (A working entry is no alarm here either: the watch's log panel tails these events, r83.)
            await self.store.record_event(
                Severity.INFO if doubt.working else Severity.ERROR,
                "entry_outcome_unknown",
                f"{doubt.symbol}: the venue has the entry {doubt.working}, not filled yet; counted uncovered "
                "until its fill is known"
                if doubt.working
                else f"{doubt.symbol}: {doubt.error}; counted uncovered, asked for by its id until the venue "
                "answers",
                symbol=doubt.symbol,
                position_id=doubt.position_id,
            )
        except Exception as exc:  # the venue's answer matters more than the record of the doubt
            log.warning("%s: could not record the entry of unknown outcome yet (%s)", doubt.symbol, exc)
            return False
        return True

    async def _entry_settled(
        self,
        signal: SignalRecord,
        doubt: EntryInDoubt,
        wave_id: int,
        promise: EntryPromise,
        stop_record: OrderRecord | None,
        order: Order | None,
    ) -> None:
        """A wave's entry in doubt, answered: filled → protected like any entry; no such order (proven) or
        refused → failed, and its signal rejected."""
        if order is not None:
            doubt.guard = await self._entry_answered(
                signal, doubt.side, doubt.position_id, order, wave_id, promise, stop_record, doubt=doubt
            )
            return
        adopted = await self._adopted_before_answer(doubt)  # (counted as a doubt until it is decided)
        self._in_doubt.pop(doubt.symbol, None)
        assert self.store is not None and self.manager is not None
        if adopted:  # the venue's list showed it: adopted, not absent
            doubt.guard = self.manager.guards.get(doubt.position_id)
            if doubt.flipped:  # what it holds is the other side: not this entry's
                await self._reject(
                    signal,
                    f"entry not placed; the {doubt.symbol} position the venue holds, the other side, is "
                    f"position {doubt.position_id}, adopted",
                    wave_id,
                )
                return
            log.warning(
                "%s: no order by the entry's id, but the venue holds the position: kept as position %s",
                doubt.symbol,
                doubt.position_id,
            )
            await self.store.finish_signal(signal.id, SignalStatus.OPENED, wave_id=wave_id)
            return
        await self._entry_failed(
            signal,
            doubt.position_id,
            doubt.client_order_id,
            "entry not placed (the venue has no order by its id)",
            wave_id,
            promise,
            stop_record,
        )

    def _absence_provable_in(self, doubt: EntryInDoubt, asked_at: float) -> float:
        """Seconds until "no such order", to a look-up asked at `asked_at` (an answer is as old as its
        question), proves the entry was never executed; 0 or less: it does. Its every send was before its
        outcome became unknown, and the venue runs no request older than its request window (the
        `recvWindow` we send: 5 s to Binance and to Bybit, and a timestamp up to 1 s ahead of its clock),
        nor fails to show one it ran after its read lag. Sent and held up before it left (a pacing wait
        inside the call), a request is still younger than the moment its outcome became unknown. Were the
        venue to run one later still (Binance's -1007 "execution status unknown" names no bound), the
        reconciler adopts what its list shows."""
        return self._absence_provable_at(doubt) - asked_at

    def _absence_provable_at(self, doubt: EntryInDoubt) -> float:
        """The monotonic moment from which "no such order" proves `doubt` never executed (see above)."""
        capabilities = self.venue.capabilities()
        window = (
            capabilities.request_window_seconds
            + VENUE_TIMESTAMP_LEAD_SECONDS
            + capabilities.read_after_write_seconds
        )
        return doubt.unknown_at + window

    def _entry_streamed(self, event: AccountEvent) -> None:
        """An account event no guard took: if it says an entry of ours ended, kept as that entry's outcome,
        and an entry in doubt by that id stops asking for it. The chaos soak's entries in doubt waited
        10 s for the look-ups to answer while the stream had told their fill within milliseconds. A position
        nobody guards and no entry of ours is on its way to (opened by hand, or turned) asks for a reconcile
        pass, which adopts it: it waited for the next periodic one (r78: a short opened by hand a second
        after our long's stop filled sat 7.9 s without a stop, counted nowhere)."""
        if isinstance(event, PositionUpdate):
            manager = self.manager
            awaited = event.symbol in self._in_flight or any(
                d.symbol == event.symbol for d in self._in_doubt.values()
            )
            if (
                manager is not None
                and event.quantity
                and not awaited
                and event.symbol not in manager.other_installation_symbols  # (its own, not to adopt)
            ):
                manager.request_reconcile()
            return
        if not isinstance(event, OrderUpdate) or not _entry_ended(event.order):
            return  # (a fill told without its price: asked for by id, which answers with it)
        order = event.order
        key = parse_client_order_id(order.client_order_id, self._token)
        if key is None or key.purpose is not OrderPurpose.ENTRY:
            return
        streamed = self._streamed_entries
        streamed.pop(order.client_order_id, None)
        streamed[order.client_order_id] = order
        while len(streamed) > STREAMED_ENTRIES_KEPT:
            del streamed[next(iter(streamed))]
        sending = self._sending.get(order.client_order_id)
        if sending is not None:  # told before its answer came back: that is the venue's word
            sending.heard.set()
        for doubt in self._in_doubt.values():
            if doubt.client_order_id == order.client_order_id:
                doubt.heard.set()

    async def _unless_streamed(self, doubt: EntryInDoubt, work: Awaitable[T]) -> tuple[bool, T | None]:
        """(True, `work`'s result), or (False, None) as soon as the account stream told the entry's outcome
        (`work` is then cancelled: a look-up held up by a ban need not be waited out)."""
        task = asyncio.ensure_future(work)
        heard = asyncio.ensure_future(doubt.heard.wait())
        try:
            await asyncio.wait({task, heard}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return True, task.result()
            return False, None
        finally:
            await end_all(task, heard)

    async def _entry_by_id(self, doubt: EntryInDoubt) -> Order | None:
        """The entry as the venue has it: told by the account stream, or asked by its client id with backoff
        until the venue answers; None once "no such order" proves it was never executed
        (`_absence_provable_in`)."""
        protection = self.settings.protection
        delay = float(protection.retry_initial_seconds)
        while True:
            streamed = self._streamed_entries.get(doubt.client_order_id)
            if streamed is not None:
                log.info(
                    "%s: the account stream told the entry's outcome (%s)", doubt.symbol, streamed.status
                )
                return streamed
            doubt.heard.clear()  # (told, but the outcome is no longer kept: asked for by id)
            manager = self.manager
            assert manager is not None
            asked_at = self.clock.monotonic()
            try:
                answered, order = await self._unless_streamed(
                    doubt,
                    manager.read(
                        lambda: self.venue.fetch_order(doubt.symbol, doubt.client_order_id),
                        "fetch_order",
                        Lane.ENTRY,
                    ),
                )
                if not answered:
                    continue
                assert order is not None
            except NotFound:
                provable_in = self._absence_provable_in(doubt, asked_at)
                if provable_in <= 0:
                    return None
                provable_in = self._absence_provable_in(doubt, self.clock.monotonic())
                doubt.error = "entry outcome unknown: not on the venue yet (its reads may lag)"
                # Asked again the moment the answer can prove it (the backoff's step after that moment
                # held a never-executed entry in doubt up to 4 s longer, counted as a naked position).
                pause = min(delay, provable_in + ABSENCE_PROOF_MARGIN_SECONDS)
            except (ExchangeError, TimeoutError) as exc:
                doubt.error = f"entry outcome unknown: {exc}"
                pause = delay
            else:
                if _entry_ended(order):
                    return order
                # Accepted and working (Binance NEW / PARTIALLY_FILLED, Bybit New / PartiallyFilled): not
                # an answer yet — failing it here was a naked position once it filled a moment later.
                doubt.error = f"entry outcome unknown: {_entry_not_ended(order)}"
                pause = delay
            await self._unless_streamed(doubt, self.clock.sleep(pause))
            delay = min(delay * 2, float(protection.retry_max_seconds), ENTRY_SETTLE_MAX_BACKOFF_SECONDS)

    async def _send_entry(
        self, entry_call: Callable[[], Awaitable[Any]], doubt: EntryInDoubt, promise: EntryPromise
    ) -> Any:
        """Send an entry. A rate-limit answer (Bybit 10006, HTTP 429) means it was not executed: it is sent
        again, with the same id, once the venue says its window has room (Bybit's reset timestamp, a
        `Retry-After`), a few times; before, the refused entry was lost with its signal. An answer that is
        late is not waited out: the entry is looked for by its id meanwhile (a filled entry is a position
        to protect now). Each answer tells the order budget whether the venue's windows had room (the
        entries that wait for a probe's answer, `OrderBudget.entry_answered`)."""
        manager = self.manager
        assert manager is not None
        symbol, cid = doubt.symbol, doubt.client_order_id
        self._sending[cid] = doubt
        try:
            for attempt in range(1, ENTRY_RATE_LIMIT_ATTEMPTS + 1):
                doubt.sent_at = self.clock.monotonic()  # were its outcome to stay unknown, counted from here
                try:
                    order = await manager.create_or_find(
                        entry_call(),
                        lambda: self.venue.fetch_order(symbol, cid),
                        f"entry {symbol}",
                        Lane.ENTRY,
                        known=lambda: self._streamed_entries.get(cid),
                        told=doubt.heard,
                        withhold=self._not_to_be_sent,  # while it waits for the venue's rate: not sent
                    )
                except (RateLimited, ClockRefused) as exc:
                    # Refused for the venue's rate, or for its timestamp (our clock off from the venue's,
                    # read again meanwhile): it never ran, and goes again with the same id. A refused
                    # timestamp failed the signal, the first entry after the venue's clock moved (an
                    # operator on the Bybit emulator, its clock 8 s off).
                    rated = isinstance(exc, RateLimited)
                    manager.budget.entry_answered(promise, room=not rated)
                    if attempt == ENTRY_RATE_LIMIT_ATTEMPTS:
                        raise
                    wait = exc.retry_after if isinstance(exc, RateLimited) else ENTRY_CLOCK_RESEND_SECONDS
                    log.info(
                        "entry %s %s (%s): sent again in %.3fs",
                        symbol,
                        "rate limited" if rated else "refused for its timestamp",
                        exc,
                        wait,
                    )
                    # (Refused: it never ran.) A stop that begins meanwhile ends the wait: not sent again.
                    self._refused_waiting.add(cid)
                    try:
                        if not rated and isinstance(self.venue, ReadsVenueTime):
                            await self._until_venue_time_read(self.venue)
                        await wait_event(self.clock, self._stop_begun, max(0.0, wait))
                        if (not_sent := self._not_to_be_sent()) is not None:
                            raise EntryNotSentAgain(not_sent) from exc
                        promise = await manager.budget.acquire_resend(promise)
                    finally:
                        self._refused_waiting.discard(cid)
                    if (not_sent := self._not_to_be_sent()) is not None:
                        manager.budget.entry_answered(promise, room=False)  # its probe never went
                        raise EntryNotSentAgain(not_sent) from exc
                    continue
                except BaseException:
                    manager.budget.entry_answered(promise, room=False)
                    raise
                manager.budget.entry_answered(promise, room=True)
                return order
            raise AssertionError("unreachable")
        finally:
            self._sending.pop(cid, None)

    async def _until_venue_time_read(self, venue: ReadsVenueTime) -> None:
        """Until the venue's time, read again after a refused timestamp, has been read (at most
        ENTRY_CLOCK_READ_WAIT_SECONDS), or a stop begins."""
        await first_of(venue.venue_time_read(ENTRY_CLOCK_READ_WAIT_SECONDS), self._stop_begun.wait())

    async def _record_attached_stop(
        self, symbol: str, side: PositionSide, quantity: Decimal, position_id: int
    ) -> OrderRecord | None:
        """The hard stop to send on the entry (written ahead like every order), priced from the mark the
        entry was sized on; None where the venue cannot carry a stop on an entry."""
        assert self.store is not None and self.manager is not None
        if not (
            self.venue.capabilities().attach_stop_to_entry and isinstance(self.venue, AttachesStopToEntry)
        ):
            return None
        mark, market = self.marks.get(symbol), self.markets.get(symbol)
        if mark is None or market is None:
            return None
        price = stop_loss_price(side, mark.price, self.manager.config.stop_loss_percent, market)
        return await self.store.record_order(
            client_order_id=client_order_id(self._token, position_id, OrderPurpose.STOP_LOSS, 0),
            position_id=position_id,
            purpose=OrderPurpose.STOP_LOSS,
            side=side.closing_side.value,
            type="stop_market",
            quantity=quantity,
            trigger_price=price,
        )

    async def _entry_failed(
        self,
        signal: SignalRecord,
        position_id: int,
        cid: str,
        reason: str,
        wave_id: int,
        promise: EntryPromise,
        stop_record: OrderRecord | None = None,
    ) -> None:
        assert self.store is not None and self.manager is not None
        self.manager.budget.release_promise(promise)
        await self.store.set_order_status(cid, OrderRecordStatus.REJECTED, error=reason[:500])
        if stop_record is not None:  # the stop it carried went with it
            await self.store.set_order_status(
                stop_record.client_order_id, OrderRecordStatus.REJECTED, error=reason[:500]
            )
        await self.store.set_position_status(position_id, PositionStatus.FAILED, exit_reason=reason[:200])
        await self.store.record_event(
            Severity.WARNING,
            "entry_failed",
            f"{signal.symbol}: {reason}",
            symbol=signal.symbol,
            position_id=position_id,
        )
        await self._reject(signal, reason, wave_id)
        return None

    async def _finish_wave(
        self,
        wave_id: int,
        started: float,
        signals: int,
        opened: list[PositionGuard],
        doubts: Sequence[EntryInDoubt] = (),
    ) -> None:
        """The wave's figures once its positions are protected (or WAVE_PROTECTION_WAIT_SECONDS passed). Its
        entries of unknown outcome are waited for within the same time: one that turns out filled is a
        position of the wave like the others; one still unknown at the end counts as opened and not
        protected (it may be a position without stops). Before, they were left out: "7 signals, 3 opened,
        3 protected" while a fourth was on the venue without a stop."""
        assert self.store is not None
        waiting_since = self.clock.monotonic()
        try:
            if doubts:
                await wait_for_all(self.clock, WAVE_PROTECTION_WAIT_SECONDS, [d.ended.wait() for d in doubts])
            left = max(0.0, WAVE_PROTECTION_WAIT_SECONDS - (self.clock.monotonic() - waiting_since))
            await wait_for_all(
                self.clock, left, [g.protected_or_ended() for g in self._wave_guards(opened, doubts)]
            )
            # (In the try: a stop's cancel landing during this write abandoned it, and the wave stayed
            # `running` with its figures 0 — the mid-wave stop test, twice in three clean-clone runs.
            # Written again as they stand below; a wave already finished is not written over.)
            opened_count, protected, failed, slowest_ms = await self._write_wave_figures(
                wave_id, self._wave_guards(opened, doubts), doubts
            )
        except asyncio.CancelledError:
            # The engine stops (its drain has waited for the protection it could): the figures as they
            # stand, written within a moment. Left `running`, the next start said the last engine "stopped
            # before they finished (killed or hung in its stop …)" after a clean stop (an operator).
            # Only under its own lease: stopped because another engine took the account, it would write
            # over the wave that engine finished (r59).
            if self._holds_the_lease():
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(WAVE_AT_STOP_WRITE_SECONDS):
                        await self._write_wave_figures(wave_id, self._wave_guards(opened, doubts), doubts)
            raise
        view = WaveView(wave_id, started, signals, opened_count, protected, failed, slowest_ms)
        # Newest first by when each began: a wave whose protection finishes after the next one began is
        # kept in its place (kept in finishing order, the panel read 06:22:34, 06:21:54, 06:22:14).
        waves = self._waves
        newer = sum(1 for w in waves if w.started_at > started)
        if newer < len(waves) or len(waves) < (waves.maxlen or 0):  # (else older than every one kept)
            if len(waves) == waves.maxlen:
                waves.pop()  # the oldest goes
            waves.insert(newer, view)
        self.events_bus.publish(
            WaveFinished(
                at=self.clock.now(),
                wave_id=wave_id,
                signals=signals,
                opened=opened_count,
                protected=protected,
                failed=failed,
                slowest_protection_ms=slowest_ms,
            )
        )

    @staticmethod
    def _wave_guards(opened: list[PositionGuard], doubts: Sequence[EntryInDoubt]) -> list[PositionGuard]:
        """The wave's positions: those it opened, and its entries of unknown outcome found filled since."""
        return [*opened, *(d.guard for d in doubts if d.guard is not None)]

    async def _write_wave_figures(
        self, wave_id: int, opened: list[PositionGuard], doubts: Sequence[EntryInDoubt]
    ) -> tuple[int, int, int, int | None]:
        """Record the wave finished with its figures as they stand: opened, protected, failed (an entry
        still of unknown outcome counts opened and not protected), the slowest protection in ms."""
        assert self.store is not None
        protected = [g for g in opened if g.protected_at is not None]
        slowest = max(((g.protected_at - g.filled_at) for g in protected), default=None)  # type: ignore[operator]
        slowest_ms = None if slowest is None else round(slowest * 1000)
        unknown = sum(1 for d in doubts if not d.ended.is_set())
        failed = len(opened) + unknown - len(protected)
        opened_count = len(opened) + unknown
        await self.store.finish_wave(
            wave_id,
            opened=opened_count,
            protected=len(protected),
            failed=failed,
            slowest_protection_ms=slowest_ms,
        )
        return opened_count, len(protected), failed, slowest_ms

    # --- health --------------------------------------------------------------------------------------

    async def measure_health(self) -> health.HealthReport:
        assert self.store is not None and self.manager is not None and self.db_watch is not None
        reading = await self.db_watch.measure()
        database = health.DatabaseMeasurement(**dataclasses.asdict(reading))
        # Read the clock after the probe's await: a mark that arrived meanwhile must not have a negative age.
        now = self.clock.monotonic()
        figures = self.coverage()
        streams = self._stream_measurements(now)
        held = self.entries_held()
        measurements = health.HealthMeasurements(
            exchange=health.ExchangeMeasurement(
                calls=self._call_stats.summary(now),
                recent=self._call_stats.summary(now, last_s=health.EXCHANGE_RECENT_SECONDS),
                budget_used_percent=self._budget_used_fraction() * 100,
                banned_for_seconds=self._banned_for(),
                budget_wait_p99_ms=self.budget_waits.summary(now).p99_ms,
                account_stream=streams.get("account"),
            ),
            price_feed=health.PriceFeedMeasurement(
                newest_mark_age_seconds=None if self._last_mark_at is None else now - self._last_mark_at,
                open_positions=figures.active,
                stale_mark_symbols=self.stale_mark_symbols(now),
                mark_stream=streams.get("marks"),
            ),
            database=database,
            protection=health.ProtectionMeasurement.of(
                figures, self.manager.timeouts.count(now, 3600.0), *self._stops_unchecked(now)
            ),
            signals=health.SignalsMeasurement(
                last_wave_age_seconds=None if self._last_wave_at is None else now - self._last_wave_at,
                listen_connected=self.consumer.listening,
                entries_paused=self.entries_paused,
                paused_by=self.entries_paused_by,
                pause_reason=self.entries_pause_reason,
                entries_held_for_seconds=held[0] if held is not None else None,
                entries_held_why=held[1] if held is not None else "",
            )
            if self.consumer is not None and self.consumer.listen_attempted
            else None,
        )
        return health.evaluate_health(
            measurements, health.HealthThresholds.from_settings(self.settings.health)
        )

    def _stream_measurements(self, now: float) -> dict[str, health.StreamMeasurement]:
        """The venue's push streams as health measures them, by name. A stream still making its first
        connection, within STREAM_FIRST_CONNECT_SECONDS of the loops' start, is not measured yet: the first
        check ran 2 ms before the account stream was up and said it "down" (DEGRADED) at every start."""
        starting = now - self._loops_started_at < STREAM_FIRST_CONNECT_SECONDS
        states = self.venue.stream_states()
        self._streams_seen_up.update(state.name for state in states if state.connected)
        return {
            state.name: health.StreamMeasurement(
                name=state.name,
                connected=state.connected,
                last_event_age_seconds=None
                if state.last_event_at is None
                else max(0.0, now - state.last_event_at),
                reconnects=state.reconnects,
                detail=state.detail,
            )
            for state in states
            if (state.connected or state.detail != NOT_STARTED)
            and not (starting and state.name not in self._streams_seen_up)
        }

    def mark_is_stale(self, symbol: str, now: float) -> bool:
        """This symbol's mark is older than `health.stale_mark_seconds` on our clock (or never came)."""
        received = self._mark_received_at.get(symbol)
        return received is None or now - received > float(self.settings.health.stale_mark_seconds)

    def stale_mark_symbols(self, now: float) -> tuple[str, ...]:
        """The symbols of open positions whose own mark is stale; a symbol nobody holds never counts."""
        manager = self.manager
        if manager is None or manager.stopped:
            return ()
        return tuple(sorted({g.symbol for g in manager.open_guards() if self.mark_is_stale(g.symbol, now)}))

    async def _listing_at_stop(self) -> StopListing | None:
        """At a stop: the venue's open orders, read now within half the call budget, or None (no answer):
        what the stop's report may vouch for. From memory alone, a hard stop that fired (TRIGGERING, no
        longer listed) a moment before a SIGTERM whose word the account stream had not brought yet was said
        kept (a reviewer, on the Binance-wire emulator)."""
        if self.reconciler is None or self.fatal is not None:  # (taken over: the stops are another's now)
            return None
        budget = float(self.settings.protection.call_timeout_seconds) / 2
        listing = asyncio.ensure_future(self.reconciler.take_snapshot())
        await wait_for_all(self.clock, budget, [listing])
        if not listing.done() or listing.cancelled() or listing.exception() is not None:
            why = (
                f"no answer within {budget:g}s"
                if not listing.done() or listing.cancelled()
                else str(listing.exception())
            )
            log.warning("at stop: the venue's open orders not read (%s); what stays is said from memory", why)
            return None
        snapshot = listing.result()
        return StopListing(
            frozenset(o.client_order_id for o in snapshot.open_orders),
            snapshot.taken_at,
            frozenset((p.symbol, p.side.value) for p in snapshot.positions),
        )

    def _account_stream_mark(self) -> tuple[int, int] | None:
        """While the venue's account stream is read and connected (what it tells of our stops, a cancel or an
        expiry, reaches the guards): its reconnects and the gaps it has told, which any break since changes;
        else None. None on a venue with none (polling only: a restart kept a stop cancelled by hand covered
        for as long as the listings failed, 74 s, r89)."""
        reader = self.account_stream
        if reader is None or reader.polling_only or not reader.streaming:
            return None
        for state in self.venue.stream_states():
            if state.name == "account" and state.connected:
                return state.reconnects, reader.gaps_read
        return None

    def _account_stream_down_since(self) -> float | None:
        """Since when (monotonic: its last message) the venue's account stream is down, or None while it is
        up, not started, or the venue has none."""
        for state in self.venue.stream_states():
            if state.name == "account" and not state.connected and state.detail != NOT_STARTED:
                return state.last_event_at if state.last_event_at is not None else self._connected_at
        return None

    def entries_held(self) -> tuple[float, str] | None:
        """Entries held back by the venue's word (a ban, rate refusals piled up): seconds left, and why."""
        return self.order_budget.entries_held() if self.order_budget is not None else None

    def stale_streams(self, now: float) -> tuple[tuple[str, float], ...]:
        """What the alerts call stale streams, with seconds since their last message: the marks of each held
        symbol whose own mark is stale, and the account stream while it is down (its silence while up is no
        fault: an account with nothing happening sends nothing) for `health.stale_mark_seconds` or more: an
        alert "no message for 0.0s" came at every start and every reconnect, its RECOVERED a second later."""
        found = [
            (f"marks {symbol}", now - self._mark_received_at.get(symbol, self._connected_at))
            for symbol in self.stale_mark_symbols(now)
        ]
        down = False
        for state in self.venue.stream_states():
            if state.name == "account" and not state.connected and state.detail != NOT_STARTED:
                down = True
                if self._account_seen_down_at is None:
                    self._account_seen_down_at = now
                if now - self._account_seen_down_at >= float(self.settings.health.stale_mark_seconds):
                    since = state.last_event_at if state.last_event_at is not None else self._connected_at
                    found.append(("account", max(0.0, now - since)))
        if not down:
            self._account_seen_down_at = None
        return tuple(found)

    def _check_breaker(self) -> None:
        """Protection failing → entries pause by themselves (persisted); they resume only by the operator,
        or after `auto_resume_seconds` of healthy protection when configured."""
        if self.manager is None:
            return
        settings = BreakerSettings.from_settings(self.settings.protection, self.settings.health)
        now = self.clock.monotonic()
        reasons = self._breaker_reasons(settings)
        paused, by, _reason = self._persisted_pause
        if reasons:
            self._breaker_healthy_since = None
            if not paused:
                # Its figures are of this moment (the header and `tsbot status` show them later, beside a
                # refused resume's figures of its own moment): said with the time they were taken.
                at = datetime.fromtimestamp(self.clock.now(), UTC).strftime("%H:%M:%S")
                reason = f"{'; '.join(reasons)}, as of {at} UTC"
                log.error("circuit breaker: protection is failing (%s): entries paused", reason)
                self.pause_entries(by="breaker", reason=reason)
            return
        if not (paused and by == "breaker" and settings.auto_resume_seconds > 0):
            return
        if self._breaker_healthy_since is None:
            self._breaker_healthy_since = now
        elif now - self._breaker_healthy_since >= settings.auto_resume_seconds:
            self._breaker_healthy_since = None
            self.resume_entries(
                by="breaker", reason=f"protection healthy for {settings.auto_resume_seconds:.0f}s"
            )  # (refused while the database is down or the lease lost: it says so itself)

    def _breaker_reasons(self, settings: BreakerSettings | None = None) -> list[str]:
        """Why the circuit breaker would pause entries now (empty: protection is healthy)."""
        manager = self.manager
        if manager is None:
            return []
        if settings is None:
            settings = BreakerSettings.from_settings(self.settings.protection, self.settings.health)
        now = self.clock.monotonic()
        window = settings.error_window_seconds
        return trip_reasons(
            BreakerInputs(
                # Entries in doubt included: each may be a position without stops. Not the managed trails a
                # protection restart has not moved yet: the operator's restart is no failing path, and no
                # entry is sent until it ends (a pause would outlast it, waiting for a resume by hand).
                # Entries in doubt that an earlier run left are judged from when this engine could settle them.
                self._coverage(unmoved_trails=False, judged=True),
                self._grace_seconds(),
                manager.protective_attempts.count(now, window),
                manager.protective_failures.count(now, window),
                sum(manager.other_installations.values()),
            ),
            settings,
        )

    def _requests_used(self) -> float:
        """The fullest of the venue's request budgets, as a share used (the order budget apart)."""
        return self.request_pacer.used_fraction() if self.request_pacer is not None else 0.0

    def _budget_used_fraction(self) -> float:
        fractions = [b.used_fraction() for b in (self.order_budget, self.request_pacer) if b is not None]
        return max(fractions, default=0.0)

    def _banned_for(self) -> float | None:
        left = [b.banned_for() for b in (self.order_budget, self.request_pacer) if b is not None]
        return max((x for x in left if x is not None), default=None)

    async def _health_loop(self) -> None:
        assert self.store is not None
        interval = float(self.settings.health.interval_seconds)
        previous: dict[str, str] = {}
        warned_at: dict[
            str, float
        ] = {}  # when a component's lasting degraded or critical state was last said
        while True:
            report = await self.measure_health()
            self._health = tuple(report.components)
            self.health_measured_at = self.clock.monotonic()
            self._check_breaker()
            for component in report.components:
                line = "health_check: " + health.log_line(component)
                state = component.state.value
                # While the database watch says a known outage once a minute, what it causes is not repeated.
                said = (
                    self.db_watch is not None and self.db_watch.down and component.component in _OUTAGE_SAID
                )
                changed = previous.get(component.component) != state
                now = self.clock.monotonic()
                if state in ("degraded", "critical"):
                    # Said when it begins, then once a minute while it lasts (not at every check: the same
                    # line every 5 s filled the log, and `tsbot run`'s terminal, while a component stayed
                    # degraded; its figures are in `tsbot status` and on the dashboard meanwhile).
                    again = now - warned_at.get(component.component, -math.inf) >= HEALTH_REPEAT_SECONDS
                    if (changed or again) and not (said and not changed):
                        log.warning(line)
                        warned_at[component.component] = now
                elif changed:
                    log.info(line)
                if previous.get(component.component) != state:
                    self.events_bus.publish(
                        HealthChanged(
                            at=self.clock.now(),
                            component=str(component.component),
                            state=state,
                            summary=component.summary,
                            reason=component.reason,
                        )
                    )
                previous[component.component] = state
            await self.store.save_health(
                [
                    HealthRow(
                        component=str(c.component),
                        state=c.state.value,
                        summary=c.summary,
                        reason=c.reason,
                        measurements=_jsonable(c.measurements),
                    )
                    for c in report.components
                ]
            )
            await wait_event(self.clock, self._health_wake, interval)
            self._health_wake.clear()

    def _database_changed(self) -> None:
        """The database watch found it gone, or back: entries follow at once, and so does the health check
        (its row said "ok, round trip 1 ms" for 4 s under a header that said entries paused for it)."""
        self._apply_entries_state()
        self._health_wake.set()

    # --- what the UI reads ---------------------------------------------------------------------------

    def snapshot(self, views_of: ViewSelector | None = None) -> EngineSnapshot:
        """The engine at this instant. The counts, the coverage figures and every position's coverage facts
        (`rows`) always cover every open position; a full `PositionView` (Decimal PnL and distance, the
        trailing state) is built for each position, or, with `views_of`, only for those it picks from the
        facts and figures: a dashboard shows a screenful of 1 000 positions, and building the other views
        every frame was a quarter of the frame's cost on the engine's event loop (bench/tui_render.py)."""
        now = self.clock.monotonic()
        guards, carried_ids, facts = self._protection_facts()
        manager = self.manager
        # (before the manager exists, the positions on the record a start carries: `_carry_the_records`)
        coverage = (
            coverage_figures(facts, now, self._grace_seconds())
            if manager is not None or facts
            else _empty_coverage()
        )
        rows = self._rows = rows_by_position(facts, self._rows)
        wanted = None if views_of is None else set(views_of(rows, coverage))
        views = [
            self._position_view(guard, now)
            for guard in guards
            if wanted is None or guard.position_id in wanted
        ]
        carried = self._carried
        if carried is not None:
            views.extend(
                carried.view_at(position_id, now, self._grace_seconds())
                for position_id in carried_ids
                if wanted is None or position_id in wanted
            )
        shown = {view.position_id for view in views}
        for unguarded in self._unguarded():
            if unguarded.position_id not in shown and (wanted is None or unguarded.position_id in wanted):
                mark = self.marks.get(unguarded.symbol)
                views.append(unguarded.view_at(now, mark.price if mark else None))
                shown.add(unguarded.position_id)
        return EngineSnapshot(
            state=self.state,
            version=self.version,
            started_at=self.started_at,
            venue=self.exchange_name,
            account=self.settings.venue.account,
            mode=self.mode,
            entries_paused=self.entries_paused,
            entries_paused_by=self.entries_paused_by,
            entries_pause_reason=self.entries_pause_reason,
            entries_held=self.entries_held(),
            orders_held=self.orders_held(),
            positions=tuple(sorted(views, key=_by_position_id)),
            coverage=coverage,
            health=self.current_health(coverage),
            waves=tuple(self._waves),
            taken_at=self.clock.now(),
            rows=rows,
            entries_sending=len(self._entries_on_their_way()),
            positions_tracked=not self._positions_let_go,
            coverage_sample=self._coverage_sample,
            start_waiting_for=self.start_waiting_for,
            wave_begun=self._wave_begun,
        )

    def _entries_on_their_way(self) -> set[str]:
        """Client ids of the entries sent whose answer is still on its way (one refused for the rate and
        waiting to be sent again never ran, and a stop never sends it)."""
        return self._sending.keys() - self._refused_waiting

    def coverage(self) -> CoverageFigures:
        """Coverage as the snapshot shows it (the health check and the gauge read the same figures)."""
        return self._coverage(unmoved_trails=True)

    def _coverage(self, *, unmoved_trails: bool, judged: bool = False) -> CoverageFigures:
        now = self.clock.monotonic()
        # (the facts only: cheap per scrape)
        _guards, _carried, facts = self._protection_facts(unmoved_trails, judged=judged)
        if self.manager is None and not facts:
            return _empty_coverage()
        return coverage_figures(facts, now, self._grace_seconds())

    @property
    def starting(self) -> bool:
        return self.state is EngineState.STARTING

    def coverage_facts(self) -> list[PositionCoverage]:
        """Each open position's coverage facts, as the gauge counts them (see `_protection_facts`)."""
        return self._protection_facts()[2]

    def _protection_facts(
        self, unmoved_trails: bool = True, *, judged: bool = False
    ) -> tuple[list[PositionGuard], list[int], list[PositionCoverage]]:
        """Each open position's coverage facts, with where its view comes from: its guard, or, while the
        protection manager restarts and before the new guards exist, the last verified state
        (`_CarriedProtection`, by position id). Closed positions (their leftover stops being cancelled) are
        gone: not shown, not counted. `judged`: entries in doubt as the breaker judges them."""
        manager = self.manager
        carried = self._carried
        guards: list[PositionGuard] = []
        carried_ids: list[int] = []
        facts: list[PositionCoverage] = []
        shown: set[int] = set()
        if manager is not None and not manager.stopped:
            guards = manager.open_guards()
            for guard in guards:
                shown.add(guard.position_id)
                facts.append(guard.coverage())
        if carried is not None and not carried.guards_created:
            now, grace = self.clock.monotonic(), self._grace_seconds()
            for position_id in carried.views.keys() - shown:
                carried_ids.append(position_id)
                facts.append(
                    carried.fact(position_id, now, grace) if unmoved_trails else carried.coverage[position_id]
                )
                shown.add(position_id)
        for unguarded in self._unguarded():
            if unguarded.position_id not in shown:
                facts.append(unguarded.coverage(judged=judged))
                shown.add(unguarded.position_id)
        return guards, carried_ids, facts

    def _unguarded(self) -> list[_AwaitingGuard | EntryInDoubt]:
        """Positions no guard has, each a position without stops: filled while the protection manager
        restarts, and entries of unknown outcome (they may have filled)."""
        return [*self._awaiting_guard.values(), *self._in_doubt.values()]

    def _position_view(self, guard: PositionGuard, now: float) -> PositionView:
        mark = self.marks.get(guard.symbol)
        price = mark.price if mark else None
        pnl = None
        if price is not None:
            direction = 1 if guard.side is PositionSide.LONG else -1
            pnl = ((price - guard.entry_price) / guard.entry_price * 100 * direction).quantize(
                Decimal("0.01")
            )
        if guard.kind is TrailingKind.MANAGED:
            activation = guard.trail.activation_price if guard.trail else None
        else:  # a native trail armed (at the mark, or by a mark past its activation) is trailing, not waiting
            activation = None if guard.native_trail_armed else guard.trailing_stop.price
        distance = None
        if activation is not None and price is not None:
            direction = 1 if guard.side is PositionSide.LONG else -1
            distance = ((activation - price) / price * 100 * direction).quantize(Decimal("0.01"))
        if guard.kind is TrailingKind.MANAGED and guard.trail is not None:
            phase = "waiting" if guard.trail.phase.value == "armed" else guard.trail.phase.value
            trail_stop = guard.trail.stop_price
        else:
            phase = "native" if guard.trailing_stop.confirmed else "pending"
            trail_stop = None
        unprotected = (
            None if guard.covered or guard.unprotected_since is None else now - guard.unprotected_since
        )
        return PositionView(
            position_id=guard.position_id,
            symbol=guard.symbol,
            side=guard.side.value,
            quantity=guard.quantity,
            entry_price=guard.entry_price,
            mark_price=price,
            pnl_percent=pnl,
            stop_loss_price=guard.live_stop_loss_price or guard.stop_loss.price,
            has_stop_loss=guard.has_stop_loss,
            has_trailing_stop=guard.trailing_in_place,
            trailing_kind=guard.kind.value,
            trailing_phase=phase,
            activation_price=activation,
            distance_to_activation_percent=distance,
            trailing_stop_price=trail_stop,
            covered=guard.covered,
            unprotected_seconds=unprotected,
            last_error=guard.last_error,
            last_error_old=guard.last_error_at is not None
            and now - guard.last_error_at > LAST_ERROR_FRESH_SECONDS,
            closing=guard.closing,
            mark_stale=self.mark_is_stale(guard.symbol, now),
            trailing_follows=(
                self.venue.capabilities().trailing_stop_follows
                if guard.kind is TrailingKind.NATIVE
                else "mark"
            ),
            stop_loss_unverified=guard.stop_loss_unverified,
            trailing_stop_unverified=guard.trailing_stop_unverified,
            liquidation_price=guard.liquidation_price,
        )

    async def events(self) -> AsyncIterator[EngineEvent]:
        async for event in self.events_bus.subscribe():
            yield event

    # --- commands ------------------------------------------------------------------------------------

    def plan_reprotect(self) -> list[PlannedProtection]:
        """Which uncovered positions would get which orders, without sending anything."""
        assert self.manager is not None
        # Named as the venue holds them: Bybit's stops are fields of the position set by one trading-stop
        # call, not orders (its plan named Binance's order types: an operator).
        orders_of_their_own = self.venue.capabilities().stops_are_orders
        hard = "stop_market" if orders_of_their_own else "position stop-loss (trading-stop)"
        trailing = "trailing_stop_market" if orders_of_their_own else "position trailing stop (trading-stop)"
        plan = []
        for guard in sorted(self.manager.uncovered(), key=lambda g: g.position_id):
            orders = []
            if not guard.has_stop_loss:
                orders.append(PlannedOrder("stop_loss", hard, guard.stop_loss.price))
            if not guard.trailing_in_place:
                if guard.kind is TrailingKind.NATIVE:
                    orders.append(PlannedOrder("trailing_stop", trailing, guard.trailing_stop.price))
                else:
                    orders.append(
                        PlannedOrder(
                            "trailing_stop",
                            "managed trail",
                            guard.trail.activation_price if guard.trail else None,
                        )
                    )
            plan.append(
                PlannedProtection(
                    guard.position_id, guard.symbol, guard.side.value, tuple(orders), guard.last_error
                )
            )
        return plan

    async def reprotect_uncovered(
        self, plan: list[PlannedProtection] | None = None
    ) -> list[ProtectionResult]:
        """Run the plan now (skipping any backoff) and report per position."""
        assert self.manager is not None
        plan = self.plan_reprotect() if plan is None else plan
        guards = [self.manager.guards[p.position_id] for p in plan if p.position_id in self.manager.guards]
        started = {guard.position_id: guard.passes_started for guard in guards}
        for guard in guards:
            guard.failures = 0
            guard.wake.set()
        # The result of a pass begun after the request: one already under way (failing, say, against a venue
        # that has since recovered) says nothing about it.
        budget = float(self.settings.protection.call_timeout_seconds) * 3
        # While the venue takes no order (a ban, a 429's hold) the passes wait for its end: waited for when it
        # ends within the budget; past it, answered now. Every position read "NOT covered: rate limited"
        # after a 30 s spinner during a known ban (opme49).
        held = self.orders_held()
        if held is None or held[0] < budget:
            budget += held[0] if held is not None else 0.0
            await wait_for_all(
                self.clock, budget, [g.wait_pass_started_after(started[g.position_id]) for g in guards]
            )
            held = self.orders_held()
        results = []
        for item in plan:
            guard = self.manager.guards.get(item.position_id)
            if guard is None:
                results.append(ProtectionResult(item.position_id, item.symbol, False, "position closed"))
            else:
                if guard.covered:
                    detail = "covered"
                elif held is not None:
                    detail = f"waits: {held[1]}; its orders go then"
                else:
                    detail = guard.last_error or "still protecting"
                results.append(ProtectionResult(item.position_id, item.symbol, guard.covered, detail))
        assert self.store is not None
        await self.store.record_event(
            Severity.WARNING,
            "reprotect_requested",
            f"operator re-protect: {sum(r.covered for r in results)}/{len(results)} covered",
        )
        return results

    def pause_entries(self, by: str = "operator", reason: str = "", who: str = "") -> None:
        """Stop opening positions (open positions stay protected); persisted, so a restart keeps it. `who`:
        the operator's user@host/pid (this process's when the dashboard's key says it)."""
        if by == "operator" and not who:
            who = requester_identity()
        if by == "breaker" and self._breaker_paused_at is None:
            self._breaker_paused_at, self._breaker_pause_carried = self.clock.now(), False
        self._persisted_pause = (True, by, reason)
        self._apply_entries_state()
        log.log(
            entries_toggle_level(paused=True, by=by),
            "entries paused by the %s%s",
            by,
            f": {reason}" if reason else "",
        )
        self._persist_entries_control(True, by, reason, who)

    def resume_entries(self, who: str = "", *, by: str = "operator", reason: str = "") -> tuple[bool, str]:
        """Open positions again; refused while this engine does not hold the account's lease, and the
        operator's while protection is failing (the breaker would pause them again at its next look, a
        wave's entries perhaps sent meanwhile). `by="breaker"`: its own resume after a healthy stretch,
        recorded as such (it was recorded as the operator's, with this process's user@host)."""
        if self.db_watch is not None and self.db_watch.down:
            message = "refused: the database is unreachable; entries stay paused until it is back"
            log.warning("resume entries %s", message)
            return False, message
        if self.lease_lost_since is not None:
            message = "refused: this engine has lost the account lease; entries stay paused until it is back"
            log.warning("resume entries %s", message)
            return False, message
        if by == "operator" and (failing := self._breaker_reasons()):
            message = f"refused: protection is failing now ({'; '.join(failing)}); entries stay paused"
            log.warning("resume entries %s", message)
            return False, message
        self._persisted_pause = (False, by, "")
        self._breaker_paused_at, self._breaker_pause_carried = None, False
        self._apply_entries_state()
        log.log(
            entries_toggle_level(paused=False, by=by),
            "entries resumed by the %s%s",
            by,
            f": {reason}" if reason else "",
        )
        if by == "operator" and not who:
            who = requester_identity()
        self._persist_entries_control(False, by, reason, who)
        held = self.entries_held()
        if held is not None:  # resumed, but the venue's word still holds them back: said, not "on"
            return True, f"entries on, held back by the venue for another {held[0]:.0f}s: {held[1]}"
        return True, "entries on"

    def _apply_entries_state(self) -> None:
        """What entries do now: the persisted pause, or paused because the lease is gone."""
        paused, by, reason = self._persisted_pause
        if self.lease_lost_since is not None:
            paused, by, reason = True, "lease", "the account lease is lost (another engine may take over)"
        if self.db_watch is not None and self.db_watch.down:  # a position could not be recorded
            paused, by, reason = True, "database", "the database is unreachable; positions stay protected"
        changed = paused != self.entries_paused or (by, reason) != (
            self.entries_paused_by,
            self.entries_pause_reason,
        )
        self.entries_paused = paused
        self.entries_paused_by = by if paused else ""
        self.entries_pause_reason = reason if paused else ""
        if changed:
            if paused and self.request_pacer is not None:  # entries waiting for the venue's rate: not sent
                self.request_pacer.recheck()
            self.events_bus.publish(
                EntriesToggled(
                    at=self.clock.now(),
                    paused=paused,
                    by=by if paused else "",
                    reason=reason if paused else "",
                )
            )

    def _persist_entries_control(self, paused: bool, by: str, reason: str, who: str = "") -> None:
        store = self.store
        if store is None:
            return
        at = _utc(self.clock.now())

        async def write() -> None:
            try:
                await store.set_entries_control(
                    self.exchange_name,
                    self.account_key,
                    paused=paused,
                    paused_by=by,
                    reason=reason,
                    at=at,  # (the engine's clock: a write journaled in an outage keeps its time)
                    requested_by=who,
                )
                await store.record_event(
                    Severity.WARNING
                    if entries_toggle_level(paused=paused, by=by) >= logging.WARNING
                    else Severity.INFO,
                    "entries_paused" if paused else "entries_resumed",
                    f"entries {'paused' if paused else 'resumed'} by the {by}"
                    + (f" ({who})" if who else "")
                    + (f": {reason}" if reason else ""),
                )
            except Exception:
                log.exception("could not record that entries are %s", "paused" if paused else "on")

        self._spawn(write(), "entries-control")

    def _spawn(self, coroutine: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coroutine)
        task.set_name(name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close_position(self, position_id: int) -> bool:
        assert self.manager is not None
        guard = self.manager.guards.get(position_id)
        if guard is None:
            return False
        guard = await self._operator_close_turn(guard)
        if guard is None or guard.closed:  # ended while the close waited (its stop filled): closed
            return guard is not None
        closed, _detail = await guard.request_close()
        return closed

    async def _record_quietly(
        self, severity: Severity, kind: str, message: str, guard: PositionGuard
    ) -> None:
        """An event for the operators' log; one that cannot be written now is only in the log file."""
        if self.store is None:
            return
        try:
            await self.store.record_event(
                severity, kind, message, symbol=guard.symbol, position_id=guard.position_id
            )
        except Exception as exc:
            log.warning("could not record the %s event (%s)", kind, exc)

    def operator_close_held_for(self, position_id: int) -> float | None:
        """Seconds at most an operator's close of this position would be held back now
        (`_operator_close_turn`), or None: it would go at once."""
        manager, budget = self.manager, self.order_budget
        guard = manager.guards.get(position_id) if manager is not None else None
        if guard is None or budget is None or guard.closed:
            return None
        # The venue takes no order before then (a ban, a 429's hold, on orders or on the request weight): any
        # close. (The order budget's alone left a close held by a weight 429 unsaid on the dashboard, r92.)
        orders_held = self.orders_held()
        waits = orders_held[0] if orders_held is not None else None
        if not guard.covered:
            return waits
        held = budget.discretionary_held_for()
        held = None if held is None else min(held, OPERATOR_CLOSE_HOLD_MAX_SECONDS)
        return held if waits is None else max(waits, held or 0.0)

    async def _operator_close_turn(self, guard: PositionGuard) -> PositionGuard | None:
        """An operator's close of a position its confirmed stops protect waits while the venue's refusal of it
        would be a ban's (`OrderBudget.discretionary_held_for`): a ban holds every stop of every position
        back for minutes on Binance. It waits here, not in the guard's task, which goes on protecting
        meanwhile; should the position lose a stop, the close goes at once, and it waits no more than
        `OPERATOR_CLOSE_HOLD_MAX_SECONDS` (an operator's command is answered within its wait). Held closes
        go one per answer that showed room (a flatten's, woken together by one answer, went as a burst).
        Returns the position's guard as it is now (a protection restart meanwhile replaces it), or None if
        none guards it any more."""
        budget = self.order_budget
        position_id = guard.position_id
        started = self.clock.monotonic()
        said = False
        while True:
            manager = self.manager
            if manager is None or manager.stopped:  # a protection restart between managers
                if not await self.protection_in_place(OPERATOR_CLOSE_RECHECK_SECONDS):
                    continue
                manager = self.manager
                assert manager is not None
            current = manager.guards.get(position_id)
            if current is None:
                return guard if guard.closed else None
            guard = current
            if budget is not None and not said and not guard.closed:
                said = self._say_close_waits_for_the_venue(guard, budget)
            if budget is None or guard.closed or not guard.covered:
                return guard
            held = budget.discretionary_held_for()
            left = OPERATOR_CLOSE_HOLD_MAX_SECONDS - (self.clock.monotonic() - started)
            if held is None or left <= 0:
                budget.take_discretionary_turn()
                return guard
            if not said:
                said = True
                message = (
                    f"close of position {guard.position_id} {guard.symbol} held back up to "
                    f"{math.ceil(min(held, left))}s: the venue refused orders for its rate lately, and one more "
                    "refusal may get the account banned, every stop held back with it; the position keeps its "
                    "confirmed stops meanwhile"
                )
                log.warning("%s", message)
                # Recorded too: an operator who sent it from a watch sees why it waits, in the watch's log.
                self._spawn(
                    self._record_quietly(Severity.WARNING, "close_held", message, guard), "close-held"
                )
            await budget.room_shown(min(held, left, OPERATOR_CLOSE_RECHECK_SECONDS))

    def orders_held(self) -> tuple[float, str] | None:
        """Seconds before the venue takes our orders again, every order waiting meanwhile, protective ones
        too (a ban of our requests, a 429's hold), with why ("the venue bans our requests until 12:03:44
        UTC"); None when none waits for that."""
        budget, pacer = self.order_budget, self.request_pacer
        orders = budget.held_for() if budget is not None else None
        # Every order is a request too: a 429 on the request weight (a read's) holds them all (r90: `p`
        # spun 30 s with nothing said while such a hold ran 60 s).
        requests = pacer.held_for() if pacer is not None else None
        waits = max((w for w in (orders, requests) if w is not None), default=None)
        if waits is None:
            return None
        # (a ban of our requests: Binance bans the IP with a 418, the sim bans the account)
        if self._banned_for() is not None:
            why = "bans our requests"
        elif orders is not None and orders >= waits:
            why = "refuses orders for its rate"
        else:
            why = "refuses requests for their weight"
        until = datetime.fromtimestamp(math.ceil(self.clock.now() + waits), tz=UTC).strftime("%H:%M:%S UTC")
        return waits, f"the venue {why} until {until}"

    def _say_close_waits_for_the_venue(self, guard: PositionGuard, budget: OrderBudget) -> bool:
        """An operator's close that will wait for the venue to take orders again (a ban, a 429's hold: every
        order waits, protective ones too) is said as it is asked for, in the log and in the events a
        `tsbot close` and a watch follow: during a ban the close waited minutes in silence (the dashboard
        said nothing, `tsbot close --wait-seconds 5` ended in "no answer"), then went. True once said."""
        held = self.orders_held()
        if held is None or held[0] < OPERATOR_CLOSE_RECHECK_SECONDS:
            return False
        waits, why = held
        message = (
            f"close of position {guard.position_id} {guard.symbol} held back up to {math.ceil(waits)}s: "
            f"{why} (every order waits, stops too); it goes then"
        )
        log.warning("%s", message)
        self._spawn(self._record_quietly(Severity.WARNING, "close_held", message, guard), "close-held")
        return True


async def _quietly(awaitable: Awaitable[Any]) -> None:
    try:
        await awaitable
    except Exception:
        log.debug("ignored while cleaning up", exc_info=True)


# Health components an outage of the database degrades, whose lines the database watch's own say.
_OUTAGE_SAID = frozenset({health.Component.DATABASE, health.Component.SIGNALS})


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)


def coverage_sample(figures: CoverageFigures, at: datetime) -> CoverageSample:
    """A history sample of coverage figures: positions inside their grace period count as active and not
    protected (they are not, yet), as `uncovered` does not count them."""
    return CoverageSample(
        at=at,
        active=figures.active,
        protected=figures.protected,
        uncovered=figures.uncovered,
        lasting=figures.lasting,
        coverage_pct=percent(figures.protected, figures.active),
    )


def _entry_ended(order: Order) -> bool:
    """Whether the venue's word on an entry settles it: ended, and if anything filled, at a known price (a
    position's stops are priced from its fill). Bybit's stream tells a fill without its price when the
    execution message is lost: that is a position whose price is still to be asked, not a failed entry."""
    return order.status.is_final and (order.filled_quantity <= 0 or order.average_price is not None)


def _entry_not_ended(order: Order) -> str:
    if order.status.is_final:
        return f"the venue has it {order.status.value} without its fill price yet"
    return f"the venue has it {order.status.value}, not filled yet"


_ENTRY_SENT = (PositionStatus.PENDING_ENTRY, PositionStatus.ENTRY_PLACED)


def _not_kept(exc: RateLimited) -> str:
    """Why a signal was not sent for the venue's rate. Not "retry after": nothing retries a rejected signal
    (an operator waited for it to)."""
    return (
        f"{exc.detail}; not sent, and not kept for later (entries go again in {math.ceil(exc.retry_after)}s)"
    )


def _left_never_protected(position: PositionRecord) -> datetime | None:
    """A restored position the last engine recorded filled and never protected, with nothing recorded of
    its naked time (killed in its first pass: a guard's first facts are written with its stops): its fill.
    Only our own entries' (one adopted from the venue was not ours to protect before its adoption)."""
    if position.protected_at is not None or position.unprotected_since is not None:
        return None
    return position.opened_at if position.signal_id is not None else None


def _entry_pending(position: PositionRecord) -> bool:
    return position.status in _ENTRY_SENT or position.entry_price is None


def _by_position_id(item: PositionCoverage | PositionView) -> int:
    return item.position_id


def _empty_coverage() -> CoverageFigures:
    return CoverageFigures(0, 0, 0, 0, 0, 0, None, 0, None, None, ())


def _jsonable(values: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dict(values).items():
        out[str(key)] = str(value) if isinstance(value, Decimal) else value
    return out


__all__ = ["Engine", "EngineSnapshot", "EngineState", "StartupReport", "StopReport"]

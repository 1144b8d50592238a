"""What the dashboard watches: a port with two implementations.

`EngineFeed` runs the engine in this process (the app's event loop) and trades; `ReadOnlyFeed` watches the
database of an engine that runs elsewhere (another process holds the account lease) and hands the
operator's commands to that engine through `monitoring.commands` (as `tsbot close` does).
The screen only ever sees `EngineSnapshot` values and `LogEntry` rows, whichever feed it has.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, tzinfo
from decimal import Decimal
from typing import Any, Protocol

from engine.accounts import account_key
from engine.cli import COVERAGE_SAMPLE_STANDS_SECONDS
from engine.commands import CommandAnswer, send_command
from engine.config import Settings, VenueKind, venue_mode
from engine.engine import (
    Engine,
    EngineSnapshot,
    EngineState,
    EntryInDoubt,
    PlannedProtection,
    PositionView,
    ProtectionResult,
    StartupReport,
    StopReport,
    ViewSelector,
    WaveView,
    entries_toggle_level,
)
from engine.events import (
    EngineEvent,
    EngineStateChanged,
    EntriesToggled,
    EventsDropped,
    HealthChanged,
    PositionClosed,
    ProtectionConfirmed,
    ProtectionFailed,
    ProtectionTimedOut,
    SignalRejected,
    WaveFinished,
)
from engine.exchange.port import PositionSide
from engine.words import counted, format_duration
from protection.coverage import CoverageFigures, PositionCoverage, coverage_figures
from protection.health import Component, ComponentHealth, HealthState, entries_held_recorded
from protection.manager import stop_words
from storage.commands import CommandKind
from storage.database import Database, error_words, open_database
from storage.history import DashboardHistory
from storage.lease import LeaseHolder, current_holder
from storage.repositories import (
    EventRecord,
    HealthRow,
    OrderPurpose,
    OrderRecord,
    OrderRecordStatus,
    PositionRecord,
    PositionStatus,
    Severity,
    Store,
    TrailingStateRecord,
)
from tui.formatting import clock_time

log = logging.getLogger(__name__)

SEVERITY_RANK = {"debug": 0, "info": 1, "warning": 2, "error": 3, "critical": 4}


class ReadOnly(Exception):
    """A command was sent to a feed that only watches."""


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One row of the timeout and error log."""

    at: float  # epoch seconds
    severity: str  # info | warning | error | critical
    symbol: str
    operation: str
    latency_seconds: float | None
    outcome: str  # resolved | retrying | failed | closed | a state | ""
    detail: str

    @property
    def rank(self) -> int:
        return SEVERITY_RANK.get(self.severity, 1)


# The log panel's words for each class of failed protective call (engine.exchange.errors.FailureClass).
FAILURE_LABELS = {
    "timeout": "timed out",
    "unknown_outcome": "outcome unknown (answer lost)",
    "rejected": "rejected by the venue",
    "server_error": "venue server error",
    "rate_limited": "rate limited",
    "not_sent": "not sent (venue unreachable)",
}


def entry_for_event(event: EngineEvent) -> LogEntry | None:
    """The log row for a domain event, or None for events that only change the snapshot."""
    match event:
        case ProtectionTimedOut():
            return LogEntry(
                event.at,
                "warning" if event.outcome == "resolved" else "error",
                event.symbol,
                event.operation,
                event.latency_seconds,
                event.outcome,
                "timed out; outcome resolved by client order id"
                if event.outcome == "resolved"
                else "timed out; the position stays uncovered until confirmed",
            )
        case ProtectionFailed() if event.failure_class is not None:
            # A protective call that failed, labelled by what happened: a 500 is a server error, not a timeout.
            resolved = event.outcome == "resolved"
            answer = ", ".join(
                part
                for part in (
                    f"HTTP {event.http_status}" if event.http_status is not None else "",
                    f"code {event.venue_code}" if event.venue_code is not None else "",
                )
                if part
            )
            label = FAILURE_LABELS.get(event.failure_class, event.failure_class.replace("_", " "))
            then = (
                "outcome resolved by client order id"
                if resolved
                else f"retry in {event.retry_in_seconds:.0f}s"
                if event.retry_in_seconds is not None
                else "the position stays uncovered until confirmed"
            )
            return LogEntry(
                event.at,
                "warning" if resolved else "error",
                event.symbol,
                event.operation,
                event.latency_seconds,
                event.outcome or "retrying",
                f"{label}{f' ({answer})' if answer else ''}; {then}: {event.error}",
            )
        case ProtectionFailed():
            retrying = event.retry_in_seconds is not None
            detail = event.error + (f" (retry in {event.retry_in_seconds:.0f}s)" if retrying else "")
            return LogEntry(
                event.at,
                "error",
                event.symbol,
                event.operation,
                None,
                "retrying" if retrying else "failed",
                detail,
            )
        case PositionClosed():
            pnl = "" if event.realized_pnl is None else f", realized PnL {event.realized_pnl:.2f} before fees"
            return LogEntry(event.at, "info", event.symbol, "close", None, "closed", event.exit_reason + pnl)
        case HealthChanged():
            severity = {"critical": "error", "degraded": "warning"}.get(event.state, "info")
            return LogEntry(
                event.at,
                severity,
                "",
                f"health {event.component}",
                None,
                event.state,
                event.reason or event.summary,
            )
        case EventsDropped():
            return LogEntry(
                event.at,
                "warning",
                "",
                "event stream",
                None,
                "dropped",
                f"{event.count} events dropped while the screen was busy; the tables re-read the engine",
            )
        case EntriesToggled():
            loud = entries_toggle_level(paused=event.paused, by=event.by) >= logging.WARNING
            return LogEntry(
                event.at,
                "warning" if loud else "info",
                "",
                "entries",
                None,
                "paused" if event.paused else "resumed",
                _entries_detail(event),
            )
    return None


def _entries_detail(event: EntriesToggled) -> str:
    """Who paused entries and why (the breaker, the lease, the database or an operator), as the header says."""
    if not event.paused:
        return "new entries resumed"
    return f"new entries paused by the {event.by or 'operator'}" + (
        f": {event.reason}" if event.reason else ""
    )


# Rejections that say what the header already says (entries paused, the engine stopping): no warning.
def _rejections_entry(at: float, rejected: list[SignalRejected], what: str) -> LogEntry:
    """One log row for `rejected`, each named with why: a warning unless the engine said every one was turned
    away in the ordinary course (`SignalRejected.routine`), as its log's wave line does."""
    routine = all(r.routine for r in rejected)
    named = "; ".join(f"{r.symbol}: {r.reason}" for r in rejected)
    return LogEntry(at, "info" if routine else "warning", "", "signals", None, "rejected", f"{what}: {named}")


def _rejected_alone(event: SignalRejected) -> LogEntry:
    wave = "" if event.wave_id is None else f" of wave {event.wave_id}"
    return _rejections_entry(event.at, [event], f"signal {event.signal_id}{wave} rejected")


class LogTranslator:
    """Domain events → log rows for the app's follower. It remembers each component's health, so a fault and
    its recovery are logged but a steady "healthy" (or the first "healthy" after start) is not, and engine
    state changes are left to the status line."""

    def __init__(self) -> None:
        self._health: dict[str, str] = {}
        # (position id, "create <stop>") of a protective order logged failed, or found gone from the venue
        # ("verify <stop>"), and not placed since: when that was first said, and what was said then.
        self._failing: dict[tuple[int, str], tuple[float, str]] = {}
        self._rejected: dict[int, list[SignalRejected]] = {}  # by wave, until its end: said with it
        self._waves_ended: set[int] = set()

    def entry(self, event: EngineEvent) -> LogEntry | None:
        if isinstance(event, EngineStateChanged):
            return None
        if isinstance(event, ProtectionFailed | ProtectionTimedOut):
            if event.operation.startswith("create ") and event.outcome != "resolved":
                self._failing.setdefault(
                    (event.position_id, event.operation), (event.at, "its first failure")
                )
            elif event.operation.startswith("verify "):  # gone from the venue, not by us: replaced next
                stop = event.operation.removeprefix("verify ")
                # (or found beyond the venue's liquidation price: it could not fire, and is moved inside)
                found = (
                    "it was found beyond the liquidation price"
                    if "liquidation price" in event.error
                    else "it was found gone from the venue"
                )
                self._failing.setdefault((event.position_id, f"create {stop}"), (event.at, found))
            if isinstance(event, ProtectionFailed) and event.repeated:
                return None  # said within the last minute: a row per retry buried the rest
        elif isinstance(event, ProtectionConfirmed):
            return self._placed(event)
        elif isinstance(event, SignalRejected):
            if event.wave_id is None or event.wave_id in self._waves_ended:
                return _rejected_alone(event)  # outside a wave, or after its end (settled in the background)
            self._rejected.setdefault(event.wave_id, []).append(event)
            return None
        elif isinstance(event, WaveFinished):
            return self._wave_rejections(event)
        elif isinstance(event, PositionClosed):
            for key in [key for key in self._failing if key[0] == event.position_id]:
                del self._failing[key]
        if isinstance(event, HealthChanged):
            before = self._health.get(event.component)
            self._health[event.component] = event.state
            alarm = ("degraded", "critical")
            if event.state not in alarm and before not in alarm:
                return None
            if event.state not in alarm:
                return LogEntry(
                    event.at,
                    "info",
                    "",
                    f"health {event.component}",
                    None,
                    event.state,
                    f"recovered from {before}: {event.summary}",
                )
        return entry_for_event(event)

    def _wave_rejections(self, event: WaveFinished) -> LogEntry | None:
        """The signals the wave rejected, each with why, in one row (they were only INFO lines of the log
        file: the dashboard said "3 signals, 1 opened" and nothing of the other two)."""
        self._waves_ended.add(event.wave_id)
        while len(self._waves_ended) > 1_000:
            self._waves_ended.discard(min(self._waves_ended))
        rejected = self._rejected.pop(event.wave_id, [])
        if not rejected:
            return None
        return _rejections_entry(
            event.at,
            rejected,
            f"{len(rejected)} of {counted(event.signals, 'signal')} of wave {event.wave_id} rejected",
        )

    def _placed(self, event: ProtectionConfirmed) -> LogEntry | None:
        """A stop whose send was logged failed went out after all: said, so the panel's last word on it is
        not "retrying" (an operator read a row left that way as the engine still failing). A stop placed
        at its first try says nothing: the positions table shows it."""
        operation = f"create {stop_words(OrderPurpose(event.purpose))}"
        failing = self._failing.pop((event.position_id, operation), None)
        if failing is None:
            return None
        first, after = failing
        return LogEntry(
            event.at,
            "info",
            event.symbol,
            operation,
            event.latency_seconds,
            "resolved",
            f"placed {max(0.0, event.at - first):.1f}s after {after}"
            + (f" (client id {event.client_order_id})" if event.client_order_id else ""),
        )


class DashboardFeed(Protocol):
    read_only: bool
    settings: Settings

    async def start(self) -> StartupReport | None: ...

    async def stop(self) -> None: ...

    def snapshot(self, views_of: ViewSelector | None = None) -> EngineSnapshot:
        """The engine's snapshot; with `views_of`, full position views at least for the positions it picks
        (a feed may give more), every position's facts and figures always."""
        ...

    def follow(self) -> AsyncIterator[EngineEvent | LogEntry]: ...

    def plan_reprotect(self) -> list[PlannedProtection]: ...

    async def reprotect_uncovered(self, plan: list[PlannedProtection]) -> list[ProtectionResult]: ...

    async def restart_protection(self) -> StartupReport: ...

    @property
    def stop_report(self) -> StopReport | None:
        """What the engine's stop left behind (None: no engine of ours stopped, e.g. read-only)."""
        ...

    def set_entries_paused(self, paused: bool) -> tuple[bool, str]:
        """Pause or resume entries: (done, the engine's answer; a resume can be refused)."""
        ...

    async def close_position(self, position_id: int) -> bool: ...

    def close_held_for(self, position_id: int) -> float | None:
        """Seconds at most a close of this position would wait for the venue's order window now (a refusal
        of it would get the account banned), or None: it goes at once."""
        ...

    async def position_orders(self, position_id: int) -> list[OrderRecord]:
        """A position's orders that may be live on the venue, as recorded (the detail view)."""
        ...

    async def history(self, tz: tzinfo) -> DashboardHistory:
        """Coverage per hour (24 h) and per day (7 days, days in `tz`), uncovered spans, the current shift:
        read from the database (`monitoring.coverage_samples`, `monitoring.uncovered_spans`)."""
        ...

    async def recent_coverage(self, seconds: float) -> list[TrendSample]:
        """The coverage samples recorded in the last `seconds` (before this dashboard started too)."""
        ...


class EngineFeed:
    """The engine in this process. Its loops are its own tasks: no widget owns them."""

    read_only = False

    def __init__(self, engine: Engine):
        self.engine = engine
        self.settings = engine.settings

    async def start(self) -> StartupReport:
        return await self.engine.start()

    def interrupt_start(self) -> None:
        self.engine.interrupt_start()

    def start_given_up_words(self, who: str) -> str:
        return self.engine.start_given_up_words(who)

    async def stop(self) -> None:
        # Only a running engine is stopped: a start that failed or was cancelled has released everything.
        if self.engine.state is EngineState.RUNNING:
            await self.engine.stop()

    @property
    def stop_report(self) -> StopReport | None:
        return self.engine.stop_report

    def snapshot(self, views_of: ViewSelector | None = None) -> EngineSnapshot:
        return self.engine.snapshot(views_of)

    async def follow(self) -> AsyncIterator[EngineEvent | LogEntry]:
        async for event in self.engine.events():
            yield event

    def plan_reprotect(self) -> list[PlannedProtection]:
        if self.engine.manager is None:
            return []
        return self.engine.plan_reprotect()

    async def reprotect_uncovered(self, plan: list[PlannedProtection]) -> list[ProtectionResult]:
        return await self.engine.reprotect_uncovered(plan)

    async def restart_protection(self) -> StartupReport:
        return await self.engine.restart_protection()

    def set_entries_paused(self, paused: bool) -> tuple[bool, str]:
        if paused:
            self.engine.pause_entries()
            return True, "entries paused"
        return self.engine.resume_entries()

    async def close_position(self, position_id: int) -> bool:
        return await self.engine.close_position(position_id)

    def close_held_for(self, position_id: int) -> float | None:
        return self.engine.operator_close_held_for(position_id)

    async def position_orders(self, position_id: int) -> list[OrderRecord]:
        if self.engine.store is None:
            return []
        return await self.engine.store.live_orders_for_position(position_id)

    async def recent_coverage(self, seconds: float) -> list[TrendSample]:
        if self.engine.store is None:
            return []
        return await _recent_coverage(self.engine.store, self.engine.clock.now(), seconds)

    async def history(self, tz: tzinfo) -> DashboardHistory:
        if self.engine.store is None:
            raise RuntimeError("the engine has no database yet")
        started = self.engine.snapshot().started_at
        return await self.engine.store.dashboard_history(
            shift_since=_shift_start(started),
            tz=tz,
            sample_stands_seconds=COVERAGE_SAMPLE_STANDS_SECONDS,
        )


# One sample of the coverage trend: when (epoch seconds), coverage %, whether a position was uncovered past
# its grace period then.
TrendSample = tuple[float, Decimal | None, bool]


async def _recent_coverage(store: Store, now: float, seconds: float) -> list[TrendSample]:
    since = datetime.fromtimestamp(now - seconds, UTC)
    return [
        (s.at.timestamp(), s.coverage_pct, s.uncovered > 0) for s in await store.coverage_samples_since(since)
    ]


def native_trailing_follows(kind: VenueKind) -> str:
    """The price a native trailing stop follows on this venue, as its capabilities say
    (`Capabilities.trailing_stop_follows`): the read-only screen has no venue to ask."""
    return "last" if kind is VenueKind.BYBIT else "mark"


class ReadOnlyFeed:
    """Watches the database another engine writes: positions, coverage, health, waves, events.

    Polls once per `interval` seconds from the app's follow worker; holds no tasks of its own. The engine
    methods raise `ReadOnly`: trading belongs to the engine that holds the lease; `send_command` asks that
    engine to do it, and returns its answer.
    """

    read_only = True
    stop_report: StopReport | None = None  # it stops no engine

    def __init__(self, settings: Settings, holder: LeaseHolder | None, *, interval: float = 1.0):
        self.settings = settings
        self.holder = holder
        self.interval = interval
        self._database: Database | None = None
        self._store: Store | None = None
        self._last_event_id = 0
        self._backlog: list[LogEntry] = []  # the log rows read at the start, for `follow` to yield first
        self._snapshot = _empty_snapshot(settings, EngineState.STARTING, holder)
        # (monotonic) when the poll now waiting began, or the first of those failing since the last full answer
        self._asking_since: float | None = None
        self._failure: str | None = None  # why the last poll failed, if it did since the last full answer
        # Past this without a full answer the screen says so (a poll takes tens of milliseconds).
        self.unanswered_after = max(3 * interval, float(settings.database.probe_timeout_seconds))
        self.command_wait_seconds = 30.0

    async def start(self) -> None:
        db = self.settings.database
        self._database = await open_database(
            db.dsn,
            db.data_dir,
            db.name,
            password=db.password.get_secret_value() if db.password else None,
            min_size=1,
            max_size=2,
            command_timeout=float(db.command_timeout_seconds),
            migrate=False,
        )
        self._store = Store(self._database.pool, account_key(self.settings.venue))
        events = await self._store.recent_events(limit=1)
        # Start the log from the last 50 warnings so the operator sees recent trouble at once (`follow`
        # yields them first: they were read here and dropped, so a watch opened on trouble showed none).
        self._last_event_id = events[0].id - 50 if events else 0
        self._backlog = await self.poll()
        return None

    async def stop(self) -> None:
        if self._database is not None:
            await self._database.close()
            self._database = None

    def snapshot(self, views_of: ViewSelector | None = None) -> EngineSnapshot:
        """The last one read (every view: small). With no full answer from the database for
        `unanswered_after` seconds, its database line says so, and as of when the rest is: the screen of a
        watch on a frozen database kept saying "Health: ok", "uncovered 0" for its 35 s (an operator)."""
        if self._asking_since is None or self._database is None:
            return self._snapshot
        # Timed from the start of the poll still waiting, not from the end of the last answer: the pause
        # between polls and a burst of 2 000 events taken in made a healthy database "4 s silent" (r59).
        silent = time.monotonic() - self._asking_since
        if silent < self.unanswered_after or not self._snapshot.taken_at:
            return self._snapshot
        as_of = clock_time(self._snapshot.taken_at, None)
        failure = self._failure
        words = (
            f"the watch has had no answer from the database for {format_duration(silent)}"
            if failure is None or failure.startswith("TimeoutError")
            else f"the watch's reads of the database have failed for {format_duration(silent)} ({failure})"
        )
        unanswered = ComponentHealth(
            Component.DATABASE,
            HealthState.CRITICAL,
            "no answer" if failure is None or failure.startswith("TimeoutError") else "reads fail",
            f"{words}: everything shown is as of {as_of} and may have changed since",
            {},
        )
        health = [h for h in self._snapshot.health if h.component is not Component.DATABASE]
        return replace(self._snapshot, health=(unanswered, *health))

    async def follow(self) -> AsyncIterator[EngineEvent | LogEntry]:
        backlog, self._backlog = self._backlog, []
        for entry in backlog:
            yield entry
        while self._database is not None:
            try:
                for entry in await self.poll():
                    yield entry
            except Exception as exc:  # the database may restart under us: say so and keep watching
                self._failure = error_words(exc)[:200]  # (a timeout's row said "failed" and nothing more)
                log.warning("read-only watch: reading the database failed: %s", self._failure)
                yield LogEntry(time.time(), "error", "", "read-only watch", None, "failed", self._failure)
            await asyncio.sleep(self.interval)

    async def poll(self) -> list[LogEntry]:
        """Re-read everything; returns the log rows of events recorded since the previous poll."""
        assert self._database is not None and self._store is not None
        if self._asking_since is None:
            self._asking_since = time.monotonic()
        pool, store, settings = self._database.pool, self._store, self.settings
        now_dt: datetime = await pool.fetchval("SELECT now()")
        now = now_dt.timestamp()
        positions = await store.open_positions()
        trails = await store.trailing_states_of_open_positions()
        live_orders = await store.live_orders_of_open_positions()
        entries = await store.entries_not_filled()
        # Asked after the records: with no holder now, an entry seen `pending` above was left by an engine
        # that no longer holds the account (one taking it since wrote nothing that was read).
        self.holder = await current_holder(pool, settings.venue.kind.value, account_key(settings.venue))
        health_rows = await store.latest_health()
        sample = await store.latest_coverage_sample()
        waves = await store.recent_waves(limit=50)
        # By id from the last one read: the newest 200 by time dropped the older of a burst (a ban's
        # protection failures), and replayed events, which keep their own older times.
        fresh = await store.events_after(self._last_event_id, limit=1000, min_severity=Severity.INFO)
        control = await store.entries_control(settings.venue.kind.value, account_key(settings.venue))
        # Entries of unknown outcome (their entry order `unknown`, or `pending` with no engine to answer it —
        # none holds the account, or the one holding it does not look after it): counted as the engine does.
        resolving = self.holder is not None and self.holder.looks_after  # not silent, starting, stopping
        # A managed trail is the trailing protection only while its engine moves it (as in the status query).
        live = [
            p if resolving else replace(p, trail_armed=False) for p in positions if p.entry_price is not None
        ]
        doubts = [
            d
            for p in positions
            if (d := _in_doubt(p, entries.get(p.id), now, resolving=resolving)) is not None
        ]
        grace = float(settings.protection.grace_seconds)
        coverage = coverage_figures(
            [
                *(
                    PositionCoverage(
                        p.id,
                        p.symbol,
                        p.has_stop_loss,
                        p.trailing_in_place,
                        _epoch(p.opened_at, now),
                        None if p.is_covered else _epoch(p.unprotected_since or p.opened_at, now),
                    )
                    for p in live
                ),
                *(d.coverage() for d in doubts),
            ],
            now,
            grace,
        )
        prices = {p.id: p.current_price for p in positions}
        stale_after = float(settings.health.interval_seconds) * 3
        nobody_measures = self._nobody_measures()
        self._snapshot = EngineSnapshot(
            state=EngineState.RUNNING if self.holder is not None else EngineState.STOPPED,
            version=self.holder.version if self.holder else "—",
            started_at=self.holder.started_at.timestamp() if self.holder else 0.0,
            venue=settings.venue.kind.value,
            account=settings.venue.account,
            mode=venue_mode(settings.venue),
            entries_paused=control is not None and control.paused,
            entries_paused_by=control.paused_by if control is not None and control.paused else "",
            entries_pause_reason=control.reason if control is not None and control.paused else "",
            entries_held=None if nobody_measures else _entries_held(health_rows, now, stale_after),
            positions=tuple(
                _position_view(
                    p,
                    trails.get(p.id),
                    _trailing_order(live_orders.get(p.id, ())),
                    now,
                    native_trailing_follows(settings.venue.kind),
                )
                for p in live
            )
            + tuple(d.view_at(now, prices.get(d.position_id)) for d in doubts),
            coverage=coverage,
            health=tuple(
                record
                for row in health_rows
                if (record := _health(row, now, stale_after, nobody_measures)) is not None
            ),
            waves=tuple(
                WaveView(
                    w.id,
                    w.started_at.timestamp(),
                    w.signals,
                    w.opened,
                    w.protected,
                    w.failed,
                    w.slowest_protection_ms,
                )
                for w in waves
            ),
            taken_at=now,
            coverage_sample=sample,
        )
        if fresh:
            self._last_event_id = fresh[-1].id
        self._asking_since, self._failure = None, None
        return [_entry_for_record(e) for e in fresh if e.severity is not Severity.INFO or e.symbol]

    def _nobody_measures(self) -> str:
        """Why no engine measures the account's health now ("": the one holding it does)."""
        if self.holder is None:
            return "no engine is running"
        why = self.holder.not_looking_after()
        return f"the engine holding the account {why}" if why else ""

    async def recent_coverage(self, seconds: float) -> list[TrendSample]:
        if self._store is None:
            return []
        return await _recent_coverage(self._store, time.time(), seconds)

    async def history(self, tz: tzinfo) -> DashboardHistory:
        if self._store is None:
            raise ReadOnly("read-only: the watch is not connected to the database")
        # The shift of the engine that holds the lease (none runs: no current shift).
        return await self._store.dashboard_history(
            shift_since=_shift_start(self._snapshot.started_at),
            tz=tz,
            sample_stands_seconds=COVERAGE_SAMPLE_STANDS_SECONDS,
        )

    def plan_reprotect(self) -> list[PlannedProtection]:
        raise ReadOnly(self.refusal())

    async def reprotect_uncovered(self, plan: list[PlannedProtection]) -> list[ProtectionResult]:
        raise ReadOnly(self.refusal())

    async def restart_protection(self) -> StartupReport:
        raise ReadOnly(self.refusal())

    def set_entries_paused(self, paused: bool) -> tuple[bool, str]:
        raise ReadOnly(self.refusal())

    async def close_position(self, position_id: int) -> bool:
        raise ReadOnly(self.refusal())

    def close_held_for(self, position_id: int) -> float | None:
        return None  # (its close is a command: the engine that takes it answers)

    async def send_command(
        self, kind: CommandKind, args: Mapping[str, Any] | None = None, reason: str = ""
    ) -> CommandAnswer:
        """Hand a command to the engine that trades the account and wait for its answer."""
        if self._database is None:
            raise ReadOnly("read-only: the watch is not connected to the database")
        db = self.settings.database
        return await send_command(
            self._database.pool,
            venue=self.settings.venue.kind.value,
            account=account_key(self.settings.venue),
            kind=kind,
            args=args,
            reason=reason or "from the read-only dashboard",
            wait_seconds=self.command_wait_seconds,
            listen_dsn=self._database.target.dsn,
            listen_password=db.password.get_secret_value() if db.password else None,
        )

    async def position_orders(self, position_id: int) -> list[OrderRecord]:
        if self._store is None:
            return []
        return await self._store.live_orders_for_position(position_id)

    def refusal(self) -> str:
        who = self.holder.describe() if self.holder else "no engine (none is running)"
        return f"read-only: this dashboard watches the database; the account is traded by {who}"


def _shift_start(started_at: float) -> datetime | None:
    """The current shift begins when the running engine started (epoch 0: no engine runs)."""
    return datetime.fromtimestamp(started_at, UTC) if started_at > 0 else None


def _in_doubt(
    p: PositionRecord, entry: OrderRecord | None, now: float, *, resolving: bool = True
) -> EntryInDoubt | None:
    """The engine's entry in doubt, as its records show it (as the uncovered query reads them): a position
    not filled whose entry order is `unknown` (the engine writes it so when the entry's outcome stays
    unknown), or anything but `rejected` when no engine is `resolving` it (the one that sent it died before
    its answer, or before it wrote the fill: it may have filled, or did)."""
    if p.entry_price is not None or p.status is not PositionStatus.ENTRY_PLACED:
        return None
    unanswered = entry is not None and entry.status is not OrderRecordStatus.REJECTED and not resolving
    if entry is None or (entry.status is not OrderRecordStatus.UNKNOWN and not unanswered):
        return None
    return EntryInDoubt(
        p.id,
        p.symbol,
        PositionSide(p.side),
        p.quantity,
        entry.client_order_id,
        sent_at=_epoch(p.updated_at, now),
        error=entry.error
        or (
            "entry filled, its price not recorded: no engine looks after the account to protect it"
            if unanswered and entry.status is OrderRecordStatus.FILLED
            else "entry outcome unknown: no engine looks after the account to learn it"
            if unanswered
            else "entry outcome unknown"
        ),
    )


def _epoch(value: datetime | None, default: float) -> float:
    return value.timestamp() if value is not None else default


def _trailing_order(orders: Iterable[OrderRecord]) -> OrderRecord | None:
    return next((o for o in orders if o.purpose is OrderPurpose.TRAILING_STOP), None)


def _position_view(
    p: PositionRecord,
    trail: TrailingStateRecord | None,
    trailing_order: OrderRecord | None,
    now: float,
    trailing_follows: str = "mark",
) -> PositionView:
    """The same view the engine builds for its own screen, from what it recorded: a native trailing stop's
    activation is its order's (as the engine's view takes it from the order), so both screens say
    "waiting +1.45%" of the same position, not one of them "venue trailing"."""
    assert p.entry_price is not None
    direction = 1 if p.side == "long" else -1
    mark = p.current_price
    pnl = None
    if mark is not None:
        pnl = ((mark - p.entry_price) / p.entry_price * 100 * direction).quantize(Decimal("0.01"))
    if trail is not None and trail.mode == "managed":
        activation: Decimal | None = trail.activation_price
    elif p.trailing_activated and p.has_trailing_stop:
        activation = None  # the engine recorded the venue's trail armed: trailing, not waiting (as its view)
    elif trailing_order is not None and trailing_order.activation_price is not None:
        activation = trailing_order.activation_price
    else:
        activation = trail.activation_price if trail else None
    distance = None
    if activation is not None and mark is not None:
        distance = ((activation - mark) / mark * 100 * direction).quantize(Decimal("0.01"))
    if trail is not None and trail.mode == "managed":
        phase = "waiting" if trail.state == "armed" else trail.state
    else:
        phase = "native" if p.has_trailing_stop else "pending"
    return PositionView(
        position_id=p.id,
        symbol=p.symbol,
        side=p.side,
        quantity=p.quantity,
        entry_price=p.entry_price,
        mark_price=mark,
        pnl_percent=pnl,
        stop_loss_price=p.stop_loss_price,
        has_stop_loss=p.has_stop_loss,
        # A managed trail has no order before it activates: armed by its engine, that is protection in place.
        has_trailing_stop=p.trailing_in_place,
        trailing_kind=trail.mode if trail else "native",
        trailing_phase=phase,
        activation_price=activation,
        distance_to_activation_percent=distance,
        trailing_stop_price=trail.current_stop_price if trail else None,
        covered=p.is_covered,
        # From when the engine saw protection lost (it survives restarts), else from the fill.
        unprotected_seconds=None if p.is_covered else now - _epoch(p.unprotected_since or p.opened_at, now),
        last_error=None,
        trailing_follows="mark" if trail is not None and trail.mode == "managed" else trailing_follows,
        # The engine's record: a stop the position lacks is in doubt, not known gone.
        stop_loss_unverified=p.stop_loss_unverified and not p.has_stop_loss,
        trailing_stop_unverified=p.trailing_stop_unverified and not p.trailing_in_place,
    )


def _entries_held(rows: Sequence[HealthRow], now: float, stale_after: float) -> tuple[float, str] | None:
    """Entries held back by the venue's word, as the engine's last fresh signals measurement says (seconds
    left now, why): the watch's header said "entries on" while its health panel said they were held."""
    for row in rows:
        if row.component != Component.SIGNALS.value or row.measured_at is None:
            continue
        age = now - row.measured_at.timestamp()
        return None if age > stale_after else entries_held_recorded(row.measurements, age)
    return None


def _health(row: HealthRow, now: float, stale_after: float, nobody_measures: str) -> ComponentHealth | None:
    """The engine's last measurement; UNKNOWN when nobody measures any more (F11: never a stale green):
    `nobody_measures` says why no engine does ("": one does). None for a component this version does not
    know (written by a newer engine)."""
    age = None if row.measured_at is None else now - row.measured_at.timestamp()
    if row.component not in Component._value2member_map_:
        return None
    component = Component(row.component)
    if nobody_measures or age is None or age > stale_after:
        why = nobody_measures or f"last measurement {format_duration(age or 0)} old"
        return ComponentHealth(component, HealthState.UNKNOWN, row.summary or "not measured", why, {})
    state = HealthState(row.state) if row.state in HealthState._value2member_map_ else HealthState.UNKNOWN
    reason = row.reason if state is not HealthState.HEALTHY else ""
    if state is not HealthState.HEALTHY and not reason:
        reason = "no reason recorded"
    return ComponentHealth(component, state, row.summary or "—", reason, dict(row.measurements))


def _entry_for_record(event: EventRecord) -> LogEntry:
    data = event.data or {}
    latency = data.get("latency_seconds")
    operation = event.type.replace("_", " ")
    detail = event.message
    failure = data.get("failure_class")
    if isinstance(failure, str) and failure in FAILURE_LABELS:
        # A failed protective create, as the live view labels it: the stop, then what happened.
        operation = "create trailing stop" if data.get("stop") == "trailing_stop" else "create stop-loss"
        detail = f"{FAILURE_LABELS[failure]}: {event.message}"
    return LogEntry(
        at=event.created_at.timestamp(),
        severity=event.severity.value,
        symbol=event.symbol or "",
        operation=operation,
        latency_seconds=float(latency) if isinstance(latency, int | float) else None,
        outcome=str(data.get("outcome", "")),
        detail=detail,
    )


def _empty_snapshot(settings: Settings, state: EngineState, holder: LeaseHolder | None) -> EngineSnapshot:
    return EngineSnapshot(
        state=state,
        version=holder.version if holder else "—",
        started_at=holder.started_at.timestamp() if holder else 0.0,
        venue=settings.venue.kind.value,
        account=settings.venue.account,
        mode=venue_mode(settings.venue),
        entries_paused=False,
        positions=(),
        coverage=CoverageFigures(0, 0, 0, 0, 0, 0, None, 0, None, None, ()),
        health=(),
        waves=(),
        taken_at=0.0,
    )

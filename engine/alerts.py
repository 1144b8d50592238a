"""Alerts off-screen: what an operator who is not looking at the dashboard is told, through apprise
(Telegram, Slack, Discord, ntfy, e-mail, json:// and form:// webhooks).

Two halves, like the health check:

* the rule core (pure: an observation and the time in, alerts out): `conditions()` says what is wrong
  now, `step()` turns that into alerts with dedup, escalation and recovery. No clock, no I/O.
* the shell (`Alerter`): reads the engine's state every `check_seconds` (`observe_engine`), feeds the
  core, and hands each batch of alerts to one delivery task per notification URL.

Rules (times on the engine's clock; `R.x` is an `[alerts]` setting):

    condition           when                                                     level
    ------------------  -------------------------------------------------------  -------------------------
    coverage_low        coverage < R.coverage_below_percent while a position is   WARNING; CRITICAL below
                        uncovered past its grace period (without its stops for    R.coverage_critical_percent
                        one); positions within it are not counted (a wave being
                        protected, a stop-out settling is no fault)
    position_uncovered  a position uncovered >= R.uncovered_seconds (one per      WARNING
                        position: its symbol and time unprotected are named)
    breaker_tripped     entries paused by the circuit breaker                    WARNING
    lease_lost          the account lease is lost (entries paused)               WARNING
    database_down       the database does not answer (protection goes on)        WARNING
    stream_stale        a held symbol's mark older than health.stale_mark_seconds WARNING
                        ("marks SYMBOL"), or the account stream down ("account")
    engine_stopped      the engine stopped (the exit line, with the uncovered    CRITICAL when something is
                        count); sent once                                        uncovered or it was forced

* dedup: a condition is sent when it starts; while it lasts it is not sent again, except a reminder at
  most every R.repeat_minutes;
* escalation: a WARNING that lasts R.escalate_after_seconds, or that worsens (coverage below the critical
  line), is sent again at once as CRITICAL (once per episode);
* recovery: when a condition clears, a RECOVERED message says how long it lasted.

Alerts found in one check go out as one notification. Delivery never blocks or slows the engine: each
URL has its own queue and task; a send that does not finish within R.send_timeout_seconds (real time: it is
real network I/O) is abandoned and retried later with backoff; the first failure of a streak is logged
(naming the URL's scheme and number, never the URL: it holds a token), the rest quietly until it recovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from engine.clock import Clock
from engine.config import AlertsSettings, ConfigError, alert_url_scheme, alert_urls
from engine.words import counted, format_duration
from protection.coverage import coverage_figures, percent

if TYPE_CHECKING:
    from engine.engine import Engine

log = logging.getLogger(__name__)

MAX_LINES = 25  # lines of one notification; the rest are counted ("… and 14 more")
QUEUE_LIMIT = 200  # notifications waiting per URL; beyond it the oldest are dropped (and counted)
RETRY_INITIAL_SECONDS = 2.0
RETRY_MAX_SECONDS = 60.0
FINAL_FLUSH_SECONDS = 5.0  # at most this long is a stop held up to send its last alert


# --- the rule core ---------------------------------------------------------------------------------------


class Level(StrEnum):
    WARNING = "WARNING"
    CRITICAL = "CRITICAL"

    @property
    def rank(self) -> int:
        return 1 if self is Level.WARNING else 2


class AlertKind(StrEnum):
    COVERAGE_LOW = "coverage_low"
    POSITION_UNCOVERED = "position_uncovered"
    BREAKER_TRIPPED = "breaker_tripped"
    LEASE_LOST = "lease_lost"
    DATABASE_DOWN = "database_down"
    STREAM_STALE = "stream_stale"
    ENGINE_STOPPED = "engine_stopped"


class Status(StrEnum):
    NEW = "new"
    ESCALATED = "escalated"
    REMINDER = "still"
    RECOVERED = "recovered"
    EVENT = "event"


@dataclass(frozen=True, slots=True)
class UncoveredPosition:
    position_id: int
    symbol: str
    unprotected_seconds: float
    has_stop_loss: bool = False  # confirmed on the exchange
    has_trailing_stop: bool = False

    @property
    def lacks(self) -> str:
        """What it lacks, in the alert's words: "no confirmed stop" was said of a position whose trailing
        stop the venue held, and an operator might place a second one by hand (an operator)."""
        if self.has_stop_loss:
            return "trailing stop not confirmed on the exchange; its hard stop is"
        if self.has_trailing_stop:
            return "hard stop not confirmed on the exchange; its trailing stop is"
        return "no confirmed stop on the exchange"


@dataclass(frozen=True, slots=True)
class Observation:
    """What the engine says at one instant: the only input of the rules."""

    active: int
    protected: int
    uncovered: tuple[UncoveredPosition, ...] = ()  # past their grace period
    protecting: int = 0  # uncovered but still within their grace period (a wave being protected)
    # Of `uncovered`, those without their stops for less than a grace period (a stop-out settling, a stop
    # being put back): named if they last (`position_uncovered`), not counted against coverage until then.
    brief: int = 0
    breaker_reason: str | None = None  # entries paused by the breaker: why
    breaker_seconds: float = 0.0  # how long that pause has stood
    breaker_carried: bool = False  # an earlier run's pause, carried over this engine's start
    lease_lost_seconds: float | None = None
    database_down_seconds: float | None = None
    database_problem: str = ""
    stale_streams: tuple[tuple[str, float], ...] = ()  # (stream, seconds since its last message)


@dataclass(frozen=True, slots=True)
class AlertRules:
    coverage_below_percent: Decimal
    coverage_critical_percent: Decimal
    uncovered_seconds: float
    escalate_after_seconds: float
    repeat_seconds: float

    @classmethod
    def from_settings(cls, settings: AlertsSettings) -> AlertRules:
        return cls(
            coverage_below_percent=settings.coverage_below_percent,
            coverage_critical_percent=settings.coverage_critical_percent,
            uncovered_seconds=float(settings.uncovered_seconds),
            escalate_after_seconds=float(settings.escalate_after_seconds),
            repeat_seconds=float(settings.repeat_minutes) * 60,
        )


@dataclass(frozen=True, slots=True)
class Condition:
    """Something wrong now. `key` is its identity for dedup (one per position for uncovered ones)."""

    key: str
    kind: AlertKind
    level: Level  # as observed: CRITICAL when it is already past its critical line
    text: str
    subject: str = ""  # the symbol, the stream
    stood_seconds: float = 0.0  # how long it had stood when first found (one carried over a restart)


@dataclass(frozen=True, slots=True)
class Episode:
    """A condition from the check that found it until the check that finds it gone."""

    condition: Condition
    started_at: float
    level_sent: Level
    last_sent_at: float


@dataclass(frozen=True, slots=True)
class Alert:
    key: str
    kind: AlertKind
    level: Level | None  # None: recovered
    status: Status
    text: str
    lasted_seconds: float = 0.0

    def line(self) -> str:
        if self.status is Status.RECOVERED:
            return f"RECOVERED: {self.text}"
        label = {Status.ESCALATED: " (escalated)", Status.REMINDER: " (still)"}.get(self.status, "")
        return f"{self.level}{label}: {self.text}"


_RECOVERED = {
    AlertKind.COVERAGE_LOW: "coverage is back above {threshold}%",
    AlertKind.POSITION_UNCOVERED: "{subject} is protected again (or closed)",
    AlertKind.BREAKER_TRIPPED: "entries are no longer paused by the circuit breaker",
    AlertKind.LEASE_LOST: "the account lease is held again",
    AlertKind.DATABASE_DOWN: "the database answers again",
    AlertKind.STREAM_STALE: "stream {subject} is fresh again",
}


def conditions(observed: Observation, rules: AlertRules) -> tuple[Condition, ...]:
    """What is wrong in `observed`, by the rules in the module docstring."""
    found: list[Condition] = []
    # Positions still within their grace period are not counted: a wave being protected is not a fault, and
    # counting it would raise and clear the alarm on every wave while one old position stays uncovered.
    # Nor, as the breaker and the health check judge, positions that lost a stop less than a grace period
    # ago: two stop-outs of 36 settling in the same second read "coverage 94.4%" (opme51).
    judged = observed.active - observed.protecting - observed.brief
    lasting = len(observed.uncovered) - observed.brief
    coverage = percent(observed.protected, judged)
    if lasting > 0 and coverage is not None and coverage < rules.coverage_below_percent:
        critical = coverage < rules.coverage_critical_percent
        found.append(
            Condition(
                AlertKind.COVERAGE_LOW.value,
                AlertKind.COVERAGE_LOW,
                Level.CRITICAL if critical else Level.WARNING,
                f"coverage {coverage}% ({observed.protected}/{judged} "
                "protected past grace), below "
                f"{rules.coverage_critical_percent if critical else rules.coverage_below_percent}%; "
                f"{lasting} uncovered past grace",
            )
        )
    for position in sorted(observed.uncovered, key=lambda p: (-p.unprotected_seconds, p.symbol)):
        if position.unprotected_seconds >= rules.uncovered_seconds:
            found.append(
                Condition(
                    f"{AlertKind.POSITION_UNCOVERED.value}:{position.position_id}",
                    AlertKind.POSITION_UNCOVERED,
                    Level.WARNING,
                    f"{position.symbol} uncovered for {format_duration(position.unprotected_seconds)} "
                    f"({position.lacks})",
                    subject=position.symbol,
                )
            )
    if observed.breaker_reason is not None:
        why = observed.breaker_reason or "no reason given"
        # One carried over a restart is no new trip (it was alerted when it tripped): said as what it is, and
        # timed from its trip, not from the start that found it.
        text = (
            f"circuit breaker pause carried over from the last run, {format_duration(observed.breaker_seconds)} "
            f"old: entries stay paused until the operator resumes them ({why})"
            if observed.breaker_carried
            else f"circuit breaker tripped: entries paused ({why})"
        )
        found.append(
            Condition(
                AlertKind.BREAKER_TRIPPED.value,
                AlertKind.BREAKER_TRIPPED,
                Level.WARNING,
                text,
                stood_seconds=observed.breaker_seconds,
            )
        )
    if observed.lease_lost_seconds is not None:
        found.append(
            Condition(
                AlertKind.LEASE_LOST.value,
                AlertKind.LEASE_LOST,
                Level.WARNING,
                f"account lease lost for {format_duration(observed.lease_lost_seconds)}: entries paused, "
                "open positions stay protected",
            )
        )
    if observed.database_down_seconds is not None:
        found.append(
            Condition(
                AlertKind.DATABASE_DOWN.value,
                AlertKind.DATABASE_DOWN,
                Level.WARNING,
                f"database unreachable for {format_duration(observed.database_down_seconds)}"
                + (f" ({observed.database_problem})" if observed.database_problem else "")
                + ": entries paused, protection goes on",
            )
        )
    for stream, age in observed.stale_streams:
        found.append(
            Condition(
                f"{AlertKind.STREAM_STALE.value}:{stream}",
                AlertKind.STREAM_STALE,
                Level.WARNING,
                f"stream {stream} stale: no message for {format_duration(age)}",
                subject=stream,
            )
        )
    return tuple(found)


def step(
    episodes: Mapping[str, Episode], current: Iterable[Condition], now: float, rules: AlertRules
) -> tuple[dict[str, Episode], list[Alert]]:
    """One check: the episodes going on after it, and the alerts to send (dedup, escalation, recovery)."""
    alerts: list[Alert] = []
    after: dict[str, Episode] = {}
    for condition in current:
        if condition.key in after:
            continue
        episode = episodes.get(condition.key)
        if episode is None:
            # (One found standing past the escalation line is said at its escalated level at once: said at
            # its own, it was escalated by the next check, two alerts a second apart.)
            level = condition.level
            if condition.stood_seconds >= rules.escalate_after_seconds:
                level = Level.CRITICAL
            after[condition.key] = Episode(condition, now - condition.stood_seconds, level, now)
            alerts.append(Alert(condition.key, condition.kind, level, Status.NEW, condition.text))
            continue
        lasted = now - episode.started_at
        level = condition.level
        if lasted >= rules.escalate_after_seconds:
            level = Level.CRITICAL
        if level.rank > episode.level_sent.rank:
            status: Status | None = Status.ESCALATED
        elif now - episode.last_sent_at >= rules.repeat_seconds:
            status = Status.REMINDER
            level = max(level, episode.level_sent, key=lambda lv: lv.rank)
        else:
            status = None
        if status is None:
            after[condition.key] = replace(episode, condition=condition)
            continue
        after[condition.key] = Episode(condition, episode.started_at, level, now)
        alerts.append(Alert(condition.key, condition.kind, level, status, condition.text, lasted))
    for key, episode in episodes.items():
        if key in after:
            continue
        lasted = now - episode.started_at
        condition = episode.condition
        text = _RECOVERED[condition.kind].format(
            subject=condition.subject, threshold=rules.coverage_below_percent
        )
        alerts.append(
            Alert(
                key,
                condition.kind,
                None,
                Status.RECOVERED,
                f"{text} after {format_duration(lasted)} (was: {condition.text})",
                lasted,
            )
        )
    return after, alerts


def stopped_alert(exit_line: str, all_protected: bool, fatal: str | None) -> Alert:
    """The engine stopped: the exit line (open positions, uncovered count), CRITICAL when something is
    uncovered or the engine was made to stop."""
    text = f"engine stopped: {exit_line}" + (f" ({fatal})" if fatal else "")
    level = Level.WARNING if all_protected and not fatal else Level.CRITICAL
    return Alert(AlertKind.ENGINE_STOPPED.value, AlertKind.ENGINE_STOPPED, level, Status.EVENT, text)


class NotifyKind(StrEnum):
    """apprise's notification types."""

    INFO = "info"
    SUCCESS = "success"
    WARNING = "warning"
    FAILURE = "failure"


@dataclass(frozen=True, slots=True)
class Notification:
    title: str
    body: str
    kind: NotifyKind


def compose(alerts: Sequence[Alert], source: str, at: float | None = None) -> Notification:
    """One notification for the alerts of one check: the worst level in the title, one line each, and the
    check's time (`at`, epoch seconds) last: a backlog delivered once a receiver is back read as current."""
    levels = [a.level for a in alerts if a.level is not None]
    worst = max(levels, key=lambda lv: lv.rank) if levels else None
    kind = {Level.CRITICAL: NotifyKind.FAILURE, Level.WARNING: NotifyKind.WARNING}.get(
        worst,  # type: ignore[arg-type]
        NotifyKind.SUCCESS,
    )
    head = alerts[0].line() if alerts else ""
    more = f" (+{len(alerts) - 1} more)" if len(alerts) > 1 else ""
    title = f"{worst or 'RECOVERED'} tsbot {source}: {head}{more}"
    lines = [a.line() for a in alerts[:MAX_LINES]]
    if len(alerts) > MAX_LINES:
        lines.append(f"… and {len(alerts) - MAX_LINES} more")
    if at is not None:
        lines.append(f"(as of {datetime.fromtimestamp(at, UTC):%Y-%m-%d %H:%M:%S} UTC)")
    return Notification(title[:250], "\n".join(lines), kind)


# --- reading the engine ----------------------------------------------------------------------------------


RESTART_HOLD_SECONDS = 60.0  # longest a protection restart is waited for before reading its manager anyway


class EngineObserver:
    """The engine's state as the rules read it (None: nothing to judge now).

    While the operator's protection restart (`r`) builds its new manager, that manager knows only some of
    the positions and none of their stops yet: read then, every uncovered position would "recover" and be
    alerted again a second later. So a new manager is read once the restart has finished (its start-up
    report is in), or after `RESTART_HOLD_SECONDS` if it never finishes: never silent for long."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._manager: object | None = None
        self._report: object | None = None
        self._switched_at: float | None = None

    def __call__(self) -> Observation | None:
        engine = self._engine
        manager = engine.manager
        now = engine.clock.monotonic()
        if manager is None:
            # A start before its guards exist: the positions on the record it carries (unverified once a
            # grace period passes without the venue read).
            return observe_engine(engine, now) if engine.starting else None
        if manager is not self._manager:
            if self._manager is None:  # the first look: the engine's start is over
                self._manager, self._report = manager, engine.startup_report
            elif self._switched_at is None:
                self._switched_at = now
                return None
            elif engine.startup_report is self._report and now - self._switched_at < RESTART_HOLD_SECONDS:
                return None
            else:
                self._manager, self._report, self._switched_at = manager, engine.startup_report, None
        if manager.stopped:  # being replaced: its guards no longer say anything
            return None
        return observe_engine(engine, now)


def observe_engine(engine: Engine, now: float) -> Observation:
    # Every open position as the gauge counts it: the guards', the entries of unknown outcome (each may be
    # a position without stops) and the fills waiting for their guard (a slow database holds the record's
    # write): those last were counted uncovered by the gauge, /metrics and the exit line, not here.
    facts = engine.coverage_facts()
    figures = coverage_figures(facts, engine.clock.monotonic(), engine.grace_seconds())
    by_id = {f.position_id: f for f in facts}
    uncovered = []
    for position_id in figures.uncovered_ids:
        fact = by_id.get(position_id)
        if fact is not None and fact.unprotected_since is not None:
            uncovered.append(
                UncoveredPosition(
                    position_id,
                    fact.symbol,
                    max(0.0, now - fact.unprotected_since),
                    has_stop_loss=fact.has_stop_loss,
                    has_trailing_stop=fact.has_trailing_stop,
                )
            )
    watch = engine.db_watch
    down_for = watch.down_for() if watch is not None else None
    return Observation(
        active=figures.active,
        protected=figures.protected,
        uncovered=tuple(uncovered),
        protecting=figures.protecting,
        brief=figures.uncovered - figures.lasting,
        breaker_reason=engine.breaker_pause_reason,
        breaker_seconds=0.0
        if (began := engine.breaker_pause_began()) is None
        else engine.clock.now() - began[0],
        breaker_carried=began is not None and began[1],
        lease_lost_seconds=None if engine.lease_lost_since is None else now - engine.lease_lost_since,
        database_down_seconds=down_for,
        database_problem=str(getattr(watch, "problem", "") or "")[:200] if down_for is not None else "",
        stale_streams=engine.stale_streams(now),
    )


# --- delivery --------------------------------------------------------------------------------------------


class Notifier(Protocol):
    name: str  # what may be logged: scheme and number, never the URL

    async def send(self, notification: Notification) -> None:
        """Deliver, or raise (any exception: the channel retries later)."""


class DeliveryRefused(Exception):
    pass


class AppriseNotifier:
    """One notification URL, through apprise (imported only when alerts are configured)."""

    def __init__(self, url: str, number: int, timeout_seconds: float | None = None):
        import apprise

        # apprise narrates each POST at DEBUG, URL included; its failures are ours to say, once.
        logging.getLogger("apprise").setLevel(logging.ERROR)
        self.name = f"{alert_url_scheme(url)}:// #{number}"
        self._apprise = apprise.Apprise()
        self._sending = False  # a send's thread has not returned yet (set here, cleared by that thread)
        if not self._apprise.add(url):
            raise ConfigError(
                [
                    f"alerts.urls: entry {number} ({alert_url_scheme(url)}://…) is not a notification URL "
                    "apprise can send to: check its scheme and parts"
                ]
            )
        if timeout_seconds is not None:
            # A send given up on must not leave its worker thread waiting on the socket much longer (a stop
            # would wait for it at exit): the connection and read timeouts are at most the send timeout.
            for service in self._apprise:
                for name in ("socket_connect_timeout", "socket_read_timeout"):
                    current = getattr(service, name, None)
                    if isinstance(current, int | float):
                        setattr(service, name, min(float(current), timeout_seconds))

    async def send(self, notification: Notification) -> None:
        """Sent from a thread of this URL's own, a daemon one. apprise's own sends ran in worker threads
        shared by every URL, which Python waits for at exit: a receiver that answers a byte at a time (no
        socket timeout gives up on it) kept the process alive after its stop, exit code never given, and,
        each abandoned send holding a shared worker, starved every other URL's alerts. A send is abandoned
        by its caller's timeout; its thread may go on, and this URL sends nothing new until it returns."""
        if self._sending:
            raise DeliveryRefused("its previous send has not returned yet")
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[bool] = loop.create_future()

        def deliver() -> None:
            try:
                # Each service's own send, in this thread (`Apprise.notify` hands it to its shared pool).
                result: bool | BaseException = all(
                    service.notify(
                        body=notification.body, title=notification.title, notify_type=notification.kind.value
                    )
                    for service in self._apprise
                )
            except Exception as exc:  # handed to the caller, which says it
                result = exc
            # Returned: the next send may go (before the answer is handed over, which frees the caller to
            # send the next one at once: judged by the thread still being alive, that one was refused).
            self._sending = False
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, answer, result)

        if not any(True for _ in self._apprise):
            raise DeliveryRefused("no service to send to")  # (never counted delivered for sending nothing)
        self._sending = True
        try:
            threading.Thread(target=deliver, name=f"alerts {self.name}", daemon=True).start()
        except BaseException:  # (no thread could start: nothing is under way)
            self._sending = False
            raise
        if not await answer:
            raise DeliveryRefused("the receiver did not accept it")


def _settle(answer: asyncio.Future[bool], result: bool | BaseException) -> None:
    if answer.done():  # abandoned (its wait timed out or was cancelled)
        return
    if isinstance(result, BaseException):
        answer.set_exception(result)
    else:
        answer.set_result(result)


class _Channel:
    """One URL's queue and its delivery task: a slow or dead receiver holds up only itself."""

    def __init__(self, notifier: Notifier, timeout_seconds: float, retry_initial_seconds: float):
        self.notifier = notifier
        self.timeout_seconds = timeout_seconds
        self.retry_initial_seconds = retry_initial_seconds
        self.queue: deque[Notification] = deque()
        self.dropped = 0
        self.delivered = 0
        self.failures = 0  # in the current streak
        self.ready = asyncio.Event()
        self.sending = False
        self.retry_now = asyncio.Event()  # set: a backoff in progress ends at once (a stop's last alert)

    def offer(self, notification: Notification, *, first: bool = False) -> None:
        """Queued last, or `first`: next (the one being sent, if any, is not sent again)."""
        if len(self.queue) >= QUEUE_LIMIT:
            # The oldest that is not CRITICAL goes (never the one being sent), else the oldest: a one-off
            # CRITICAL was dropped while the repeats behind it were kept (a reviewer).
            kept = 1 if self.sending else 0  # (the one being sent, or retried in its backoff)
            index = next(
                (i for i in range(kept, len(self.queue)) if self.queue[i].kind is not NotifyKind.FAILURE),
                kept,
            )
            del self.queue[index]
            self.dropped += 1
        if first:
            self.queue.appendleft(notification)
        else:
            self.queue.append(notification)
        self.ready.set()

    @property
    def idle(self) -> bool:
        return not self.queue and not self.sending

    async def run(self) -> None:
        """Supervised: an unexpected error is logged and the loop goes on after a pause."""
        while True:
            try:
                await self._deliver()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("alerts via %s: delivery loop failed; restarting", self.notifier.name)
                await asyncio.sleep(RETRY_INITIAL_SECONDS)

    async def _deliver(self) -> None:
        delay = self.retry_initial_seconds
        while True:
            if not self.queue:
                self.ready.clear()
                await self.ready.wait()
                continue
            head = notification = self.queue[0]
            told = self.dropped  # said with this send: drops during it are said with the next
            if told:
                notification = replace(
                    notification, body=f"{notification.body}\n({told} alerts were dropped)"
                )
            self.sending = True
            started = time.monotonic()
            try:
                async with asyncio.timeout(self.timeout_seconds):
                    await self.notifier.send(notification)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                reason = (
                    f"no answer within {self.timeout_seconds:g}s"
                    if isinstance(exc, TimeoutError)
                    else f"{type(exc).__name__}: {exc}"
                )
                if self.failures == 1:
                    log.warning(
                        "alerts via %s not delivered (%s); retrying with backoff, said again when delivered",
                        self.notifier.name,
                        reason[:200],
                    )
                else:
                    log.debug("alerts via %s still not delivered (%s)", self.notifier.name, reason[:200])
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self.retry_now.wait()
                self.retry_now.clear()  # once: a stop's last try, not a loop without backoff
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                continue
            finally:
                self.sending = False
            with contextlib.suppress(ValueError):  # (it may have been dropped meanwhile, or one put ahead)
                self.queue.remove(head)
            self.dropped -= told
            self.delivered += 1
            delay = self.retry_initial_seconds
            if self.failures:
                log.warning(
                    "alerts via %s delivered again after %d failed attempts",
                    self.notifier.name,
                    self.failures,
                )
                self.failures = 0
            else:
                log.debug("alert via %s delivered in %.2fs", self.notifier.name, time.monotonic() - started)


class Alerter:
    """The shell: watches the engine, keeps the episodes, hands batches to the channels."""

    def __init__(
        self,
        settings: AlertsSettings,
        clock: Clock,
        *,
        source: str,
        notifiers: Sequence[Notifier],
        retry_initial_seconds: float = RETRY_INITIAL_SECONDS,
    ):
        self.settings = settings
        self.rules = AlertRules.from_settings(settings)
        self.clock = clock
        self.source = source
        self.episodes: dict[str, Episode] = {}
        self.sent: list[Alert] = []  # every alert handed to delivery, newest last (bounded)
        self._channels = [
            _Channel(n, float(settings.send_timeout_seconds), retry_initial_seconds) for n in notifiers
        ]
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def from_settings(cls, settings: AlertsSettings, clock: Clock, *, source: str) -> Alerter | None:
        """None when no URL is configured. Raises `ConfigError` for a URL apprise cannot send to."""
        urls = alert_urls(settings.urls)
        if not urls:
            return None
        timeout = float(settings.send_timeout_seconds)
        notifiers = [AppriseNotifier(url, number, timeout) for number, url in enumerate(urls, start=1)]
        return cls(settings, clock, source=source, notifiers=notifiers)

    def start(self) -> None:
        for number, channel in enumerate(self._channels, start=1):
            self._tasks.append(asyncio.create_task(channel.run(), name=f"alerts-delivery-{number}"))

    async def watch(self, read: Callable[[], Observation | None]) -> None:
        """The check loop (run by the engine's supervisor)."""
        while True:
            observed = read()
            if observed is not None:
                self.check(observed)
            await self.clock.sleep(float(self.settings.check_seconds))

    def check(self, observed: Observation) -> list[Alert]:
        self.episodes, alerts = step(
            self.episodes, conditions(observed, self.rules), self.clock.monotonic(), self.rules
        )
        self._send(alerts)
        return alerts

    def engine_stopped(self, exit_line: str, all_protected: bool, fatal: str | None) -> None:
        """The stop's alert, ahead of any backlog (a stop waits seconds only for its last alert: behind stale
        ones it could miss them, a reviewer)."""
        self._send([stopped_alert(exit_line, all_protected, fatal)], first=True)

    def _send(self, alerts: list[Alert], *, first: bool = False) -> None:
        if not alerts:
            return
        for alert in alerts:
            (log.info if alert.level is not Level.CRITICAL else log.warning)("alert: %s", alert.line())
        self.sent = [*self.sent, *alerts][-1000:]
        notification = compose(alerts, self.source, self.clock.now())
        for channel in self._channels:
            channel.offer(notification, first=first)

    async def close(self) -> None:
        """Let what is queued go out, for a few seconds at most, then stop the delivery tasks."""
        if not self._tasks:  # never started (the engine's start failed): nothing can go out
            return
        budget = min(FINAL_FLUSH_SECONDS, float(self.settings.send_timeout_seconds))
        deadline = time.monotonic() + budget
        # A receiver in its backoff (up to a minute) is tried once more now: the last alert ("engine
        # stopped, UNCOVERED") was given up at once after any failure of the streak, the receiver back or
        # not. One that fails again is not waited for.
        failed_before = {id(c): c.failures for c in self._channels}
        for channel in self._channels:
            channel.retry_now.set()
        while any(not c.idle for c in self._channels) and time.monotonic() < deadline:
            if all(c.failures > failed_before[id(c)] for c in self._channels if not c.idle):
                break  # every receiver with something left failed again: do not wait out its backoff
            await asyncio.sleep(0.05)
        left = sum(len(c.queue) for c in self._channels)
        if left:  # (one whose send was abandoned to a slow receiver may still arrive)
            log.warning("alerts: %s not confirmed delivered at stop", counted(left, "notification"))
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

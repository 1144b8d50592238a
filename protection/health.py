"""The health rules, as pure functions: measurements + thresholds → one health record per component.

The health check shell measures (times a trivial query, reads the call stats, counts coverage from
confirmed facts) and calls `evaluate_health`; this module only decides. No clock, no I/O, no asyncio:
every input is an argument, so each rule is example- and property-tested at its boundaries.

Why it is built this way (F11, "health that lies"): the old bot hard-coded HEALTHY for half its
components and raised a false DEGRADED 1 561 times a day until nobody looked. So here

* every state comes from a measurement, and the record carries that measurement: `summary` (one human
  line with the numbers), `measurements` (the raw numbers, JSON-friendly) and, when not healthy,
  `reason` (the cause, one phrase). `ComponentHealth` refuses a non-healthy state without a reason;
* a component with no measurement yet is UNKNOWN, never HEALTHY;
* a condition that is already resolved (a timeout that was retried and the position is covered) or
  that the operator chose (entries paused) is shown in the summary but raises no alarm.

Rules (`T.x` is a `HealthThresholds` field; all causes of the winning severity are joined in `reason`)::

    component   state     when
    ----------  --------  ---------------------------------------------------------------------------------
    any         unknown   no measurement passed (None): "not measured yet"
    exchange    critical  banned by the venue (banned_for_seconds > 0)
                critical  error rate >= 50 % over at least 5 calls, unless the last 5 calls all answered
                degraded  p99 latency > T.exchange_latency_degraded_ms over the calls of the last minute
                degraded  error rate >= 10 % over the calls of the last minute (any number of calls);
                          the summary shows the whole window's figures
                degraded  rate budget used >= 80 %
                degraded  the venue's account stream is down (fills are learned by polling meanwhile);
                          the summary says its state: connected, last message age, reconnects
                unknown   no calls completed in the window (and none of the above)
                healthy   otherwise
    price_feed  critical  open positions and no mark price ever received (nobody is watching prices)
                critical  open positions and newest mark older than 3 × T.mark_price_stale_seconds
                degraded  newest mark older than T.mark_price_stale_seconds
                degraded  some open position's own mark older than T.stale_mark_seconds (symbols nobody
                          holds never count); the summary says the mark stream's state
                unknown   no mark price received yet and no open positions
                healthy   otherwise
    database    critical  the probe query failed (its error is the reason); during an outage the reason says
                          for how long and how many protective writes wait in the local journal
                degraded  writes journaled during an outage are still being replayed
                degraded  probe round trip > T.database_latency_degraded_ms
                healthy   otherwise
    protection  healthy   no open positions ("no open positions" is a measurement)
                critical  coverage < T.coverage_critical_percent while some position is uncovered
                          past its grace period; coverage = positions with both stops confirmed, and the
                          reason names the stop that is short ("Low TS coverage: 42.3% (30/71)")
                critical  oldest uncovered position uncovered > T.uncovered_critical_seconds
                degraded  any position uncovered past its grace period
                healthy   every position past grace is covered; timeouts in the last hour are shown in
                          the summary but never alarm on their own
    signals     degraded  LISTEN connection down (polling fallback only)
                degraded  entries held back by the venue's word (a ban, rate refusals piled up)
                unknown   no wave received yet
                healthy   otherwise; "entries paused" is shown in the summary, not an alarm

Coverage percents are `Decimal`, rounded half up to one decimal like SQL's `ROUND(x, 1)`, and compared
with the threshold *as shown*: the reason never says "Low TS coverage: 95.0%" against a 95 % limit.
The rule compares the share of positions with *both* stops (never above the TS or the SL share), so a
low TS or SL share always trips it, and one more uncovered position can never make it healthier — which
a rule on the TS share alone would allow when the newcomer has its trailing stop but no stop-loss.
Coverage alarms need a position uncovered past grace because a wave being protected is not a fault:
seven positions opened a second ago have no stops yet, and calling that CRITICAL for a few seconds on
every wave is exactly the false alarm that trained the operator to ignore the old one.
"Uncovered past its grace period" is without its stops for a grace period or more (from its fill, or
from the moment it lost a stop), as the breaker and the alerts judge: a stop-out settling, or a stop
being put back, is shown uncovered at once and alarms only if it lasts.

Overall state = the worst component by `critical > degraded > unknown > healthy`. UNKNOWN ranks above
HEALTHY because "not measured" must never read as "fine", and below DEGRADED because a missing
measurement (the first seconds after start, before a component's first measurement) is not evidence of a fault, while a
measured fault is: the overall state should name the fault. No components at all is UNKNOWN.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Context, Decimal
from enum import StrEnum
from typing import Any

from engine.metrics import CallSummary
from engine.words import counted, format_duration
from protection.coverage import CoverageFigures

__all__ = [
    "DISPLAY_NAMES",
    "EXCHANGE_BUDGET_DEGRADED_PERCENT",
    "EXCHANGE_ERROR_RATE_CRITICAL",
    "EXCHANGE_ERROR_RATE_DEGRADED",
    "EXCHANGE_MIN_CALLS_FOR_CRITICAL",
    "PRICE_FEED_CRITICAL_FACTOR",
    "Component",
    "ComponentHealth",
    "DatabaseMeasurement",
    "ExchangeMeasurement",
    "HealthMeasurements",
    "HealthReport",
    "HealthState",
    "HealthThresholds",
    "JsonValue",
    "PriceFeedMeasurement",
    "ProtectionMeasurement",
    "SignalsMeasurement",
    "StreamMeasurement",
    "coverage_percent",
    "evaluate_database",
    "evaluate_exchange",
    "evaluate_health",
    "evaluate_price_feed",
    "evaluate_protection",
    "evaluate_signals",
    "format_duration",
    "log_level",
    "log_line",
    "stream_words",
    "worst_state",
]

# Fixed parts of the rules (the configurable parts are in HealthThresholds).
EXCHANGE_ERROR_RATE_CRITICAL = 0.5
EXCHANGE_ERROR_RATE_DEGRADED = 0.1
EXCHANGE_MIN_CALLS_FOR_CRITICAL = 5  # one failed call out of one is a blip, not an outage
EXCHANGE_RECENT_SECONDS = 60.0  # latency and error rate are judged over the calls of this last stretch
EXCHANGE_BUDGET_DEGRADED_PERCENT = 80.0
PRICE_FEED_CRITICAL_FACTOR = 3

JsonValue = int | float | str | bool | None

_ONE_DECIMAL = Decimal("0.1")
_HUNDRED = Decimal(100)
# Private so that a caller changing the thread's decimal context cannot change a shown percent.
_DECIMAL = Context(prec=28, rounding=ROUND_HALF_UP)
_MAX_ERROR_TEXT = 160


class HealthState(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    CRITICAL = "critical"
    UNKNOWN = "unknown"

    @property
    def severity(self) -> int:
        """Rank for "worst of": healthy 0 < unknown 1 < degraded 2 < critical 3."""
        return _SEVERITY[self]


_SEVERITY = {
    HealthState.HEALTHY: 0,
    HealthState.UNKNOWN: 1,
    HealthState.DEGRADED: 2,
    HealthState.CRITICAL: 3,
}


class Component(StrEnum):
    EXCHANGE = "exchange"
    PRICE_FEED = "price_feed"
    DATABASE = "database"
    PROTECTION = "protection"
    SIGNALS = "signals"


# The names operators grep for in logs/trading_bot.log ("Trailing Stop System: degraded - …").
DISPLAY_NAMES: Mapping[Component, str] = {
    Component.EXCHANGE: "Exchange",
    Component.PRICE_FEED: "Price Feed",
    Component.DATABASE: "Database",
    Component.PROTECTION: "Trailing Stop System",
    Component.SIGNALS: "Signals",
}


def worst_state(states: Iterable[HealthState]) -> HealthState:
    """The most severe of `states`; UNKNOWN when there are none."""
    return max(states, key=_SEVERITY.__getitem__, default=HealthState.UNKNOWN)


# ----------------------------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class ComponentHealth:
    """One component's verdict and the measurement behind it. `measurements` is a plain dict of JSON
    values (Decimals as strings) for the UI and the event log; treat it as read-only."""

    component: Component
    state: HealthState
    summary: str
    reason: str
    measurements: dict[str, JsonValue]

    def __post_init__(self) -> None:
        if not self.summary:
            raise ValueError(f"{self.component}: a health record needs a summary")
        if self.state is HealthState.HEALTHY and self.reason:
            raise ValueError(f"{self.component}: healthy with a reason ({self.reason!r})")
        if self.state is not HealthState.HEALTHY and not self.reason:
            raise ValueError(f"{self.component}: {self.state} without a reason (no alarm without a cause)")


@dataclass(frozen=True, slots=True)
class HealthReport:
    """Every component's record, in `Component` order, and the overall (worst) state."""

    components: tuple[ComponentHealth, ...]

    @property
    def state(self) -> HealthState:
        return worst_state(c.state for c in self.components)

    def __getitem__(self, component: Component | str) -> ComponentHealth:
        for record in self.components:
            if record.component == component:
                return record
        raise KeyError(component)


# -------------------------------------------------------------------------------------------- thresholds


@dataclass(frozen=True, slots=True)
class HealthThresholds:
    coverage_critical_percent: Decimal = Decimal(95)
    uncovered_critical_seconds: float = 60.0
    mark_price_stale_seconds: float = 5.0
    exchange_latency_degraded_ms: int = 2500
    database_latency_degraded_ms: int = 200
    stale_mark_seconds: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.coverage_critical_percent, Decimal):
            raise TypeError("coverage_critical_percent must be a Decimal")
        if not Decimal(0) <= self.coverage_critical_percent <= _HUNDRED:
            raise ValueError(
                f"coverage_critical_percent must be 0..100, got {self.coverage_critical_percent}"
            )
        for name in (
            "uncovered_critical_seconds",
            "mark_price_stale_seconds",
            "exchange_latency_degraded_ms",
            "database_latency_degraded_ms",
            "stale_mark_seconds",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")

    @classmethod
    def from_settings(cls, settings: Any) -> HealthThresholds:
        """From any object with the same-named attributes (the app's `[health]` settings section)."""
        coverage = settings.coverage_critical_percent
        return cls(
            coverage_critical_percent=coverage if isinstance(coverage, Decimal) else Decimal(str(coverage)),
            uncovered_critical_seconds=float(settings.uncovered_critical_seconds),
            mark_price_stale_seconds=float(settings.mark_price_stale_seconds),
            exchange_latency_degraded_ms=int(settings.exchange_latency_degraded_ms),
            database_latency_degraded_ms=int(settings.database_latency_degraded_ms),
            stale_mark_seconds=float(getattr(settings, "stale_mark_seconds", 10.0)),
        )


# ---------------------------------------------------------------------------------------- measurements


def _require_count(owner: str, **counts: int) -> None:
    for name, value in counts.items():
        if value < 0:
            raise ValueError(f"{owner}.{name} must be >= 0, got {value}")


def _require_age(owner: str, **ages: float | None) -> None:
    for name, value in ages.items():
        if value is not None and not value >= 0:  # also refuses NaN
            raise ValueError(f"{owner}.{name} must be None or >= 0 seconds, got {value}")


@dataclass(frozen=True, slots=True)
class StreamMeasurement:
    """One of the venue's push streams ("account", "marks"): connected or not, seconds since its last
    message (None: none yet), reconnects so far, and the venue's words on it."""

    name: str
    connected: bool
    last_event_age_seconds: float | None
    reconnects: int = 0
    detail: str = ""

    def __post_init__(self) -> None:
        _require_age("StreamMeasurement", last_event_age_seconds=self.last_event_age_seconds)
        _require_count("StreamMeasurement", reconnects=self.reconnects)


@dataclass(frozen=True, slots=True)
class ExchangeMeasurement:
    """Venue calls over the stats window; the share of the rate budget used (None: the venue did not
    say); seconds left of a ban (None or 0: not banned)."""

    calls: CallSummary
    # The calls of the last `EXCHANGE_RECENT_SECONDS` (None: judged on the window): what says the venue is
    # slow or failing now. The window's figures are shown; judged on them, a few seconds of latency kept
    # the exchange DEGRADED, and `tsbot status` and /healthz failing, for five minutes after it recovered.
    recent: CallSummary | None = None
    budget_used_percent: float | None = None
    banned_for_seconds: float | None = None
    budget_wait_p99_ms: float | None = None  # how long calls waited for rate budget (None: none waited)
    # The venue's account stream (None: the venue has none, everything is polled).
    account_stream: StreamMeasurement | None = None

    def __post_init__(self) -> None:
        _require_age(
            "ExchangeMeasurement",
            banned_for_seconds=self.banned_for_seconds,
            budget_wait_p99_ms=self.budget_wait_p99_ms,
        )
        if self.budget_used_percent is not None and not self.budget_used_percent >= 0:
            raise ValueError(f"budget_used_percent must be None or >= 0, got {self.budget_used_percent}")


@dataclass(frozen=True, slots=True)
class PriceFeedMeasurement:
    """Age of the newest mark price received (None: none yet), and how many positions are open; of those,
    the ones whose own mark is stale (older than the stale-mark limit); the mark stream's state."""

    newest_mark_age_seconds: float | None
    open_positions: int
    stale_mark_symbols: tuple[str, ...] = ()
    mark_stream: StreamMeasurement | None = None

    def __post_init__(self) -> None:
        _require_age("PriceFeedMeasurement", newest_mark_age_seconds=self.newest_mark_age_seconds)
        _require_count("PriceFeedMeasurement", open_positions=self.open_positions)
        if len(self.stale_mark_symbols) > self.open_positions:
            raise ValueError("PriceFeedMeasurement: more stale marks than open positions")


@dataclass(frozen=True, slots=True)
class DatabaseMeasurement:
    """One probe of a trivial query: its round trip, or the error it failed with (exactly one). During an
    outage: how long the database has been unreachable, and the protective writes waiting for it in the
    local journal (`journal_depth`, also while they are being replayed)."""

    round_trip_ms: float | None = None
    error: str | None = None
    down_for_seconds: float | None = None
    journal_depth: int = 0

    def __post_init__(self) -> None:
        if (self.round_trip_ms is None) == (self.error is None):
            raise ValueError("DatabaseMeasurement needs exactly one of round_trip_ms and error")
        _require_age(
            "DatabaseMeasurement", round_trip_ms=self.round_trip_ms, down_for_seconds=self.down_for_seconds
        )
        _require_count("DatabaseMeasurement", journal_depth=self.journal_depth)


@dataclass(frozen=True, slots=True)
class ProtectionMeasurement:
    """Coverage counted per position from confirmed exchange facts (F4, F11), not from row counts.

    `protected_positions` have both stops confirmed; the rest are uncovered, and
    `uncovered_past_grace` of those have been without their stops for the protection grace period or
    longer (the rest are still being protected: a new position, a stop-out settling, a stop put back).
    `ts_covered` / `sl_covered` count positions whose trailing stop / hard stop-loss is confirmed.
    `oldest_uncovered_seconds` is how long the longest-uncovered position has been so (None when every
    position is protected). `timeouts_last_hour` counts protection timeouts, resolved or not."""

    active_positions: int
    protected_positions: int
    ts_covered: int
    sl_covered: int
    uncovered_past_grace: int
    oldest_uncovered_seconds: float | None
    timeouts_last_hour: int = 0
    # Of the uncovered within grace (still being protected), those with that stop confirmed already.
    protecting_ts_covered: int = 0
    protecting_sl_covered: int = 0
    oldest_uncovered_symbol: str = ""  # named in the alarm: an operator acts on a symbol, not a count
    # How long the venue's stops have gone unchecked by a reconcile pass (every pass since failed), once that
    # is past a few passes' time; None while the passes answer. Why the last one failed.
    unchecked_seconds: float | None = None
    unchecked_why: str = ""

    @classmethod
    def of(
        cls,
        figures: CoverageFigures,
        timeouts_last_hour: int,
        unchecked_seconds: float | None = None,
        unchecked_why: str = "",
    ) -> ProtectionMeasurement:
        """From the coverage figures the gauge shows (the health check and the dashboard read one rule).
        Judged past grace: the positions without their stops for a grace period (`lasting`), as the breaker
        and the alerts judge them. Counting every uncovered position opened before the grace period, a
        stop-out settling in the same second made it CRITICAL ("Low coverage: 94.4% (34/36 past grace)",
        two stop-outs of 36, opme51); the gauge shows them uncovered at once all the same."""
        return cls(
            unchecked_seconds=unchecked_seconds,
            unchecked_why=unchecked_why,
            active_positions=figures.active,
            protected_positions=figures.protected,
            ts_covered=figures.with_trailing_stop,
            sl_covered=figures.with_stop_loss,
            uncovered_past_grace=figures.lasting,
            oldest_uncovered_seconds=figures.oldest_unprotected_seconds
            if figures.uncovered
            else (None if figures.protected == figures.active else 0.0),
            timeouts_last_hour=timeouts_last_hour,
            protecting_ts_covered=figures.protecting_with_trailing_stop + figures.brief_with_trailing_stop,
            protecting_sl_covered=figures.protecting_with_stop_loss + figures.brief_with_stop_loss,
            oldest_uncovered_symbol=figures.oldest_unprotected_symbol if figures.uncovered else "",
        )

    def __post_init__(self) -> None:
        name = "ProtectionMeasurement"
        _require_count(
            name,
            active_positions=self.active_positions,
            protected_positions=self.protected_positions,
            ts_covered=self.ts_covered,
            sl_covered=self.sl_covered,
            uncovered_past_grace=self.uncovered_past_grace,
            timeouts_last_hour=self.timeouts_last_hour,
        )
        _require_age(
            name,
            oldest_uncovered_seconds=self.oldest_uncovered_seconds,
            unchecked_seconds=self.unchecked_seconds,
        )
        if max(self.ts_covered, self.sl_covered) > self.active_positions:
            raise ValueError(f"{name}: more covered than active positions ({self})")
        if self.protected_positions > min(self.ts_covered, self.sl_covered):
            raise ValueError(f"{name}: a protected position has both stops, so counts in ts and sl ({self})")
        if self.uncovered_past_grace > self.uncovered_positions:
            raise ValueError(f"{name}: more uncovered past grace than uncovered ({self})")
        protecting = self.uncovered_positions - self.uncovered_past_grace
        if max(self.protecting_ts_covered, self.protecting_sl_covered) > protecting:
            raise ValueError(f"{name}: more stops within grace than positions within grace ({self})")
        if self.uncovered_positions == 0 and self.oldest_uncovered_seconds is not None:
            raise ValueError(f"{name}: an oldest uncovered age with nothing uncovered ({self})")
        if self.uncovered_past_grace > 0 and self.oldest_uncovered_seconds is None:
            raise ValueError(f"{name}: positions uncovered past grace need the oldest uncovered age ({self})")

    @property
    def uncovered_positions(self) -> int:
        return self.active_positions - self.protected_positions

    @property
    def protected_percent(self) -> Decimal | None:
        return coverage_percent(self.protected_positions, self.active_positions)

    @property
    def ts_coverage_percent(self) -> Decimal | None:
        return coverage_percent(self.ts_covered, self.active_positions)

    @property
    def sl_coverage_percent(self) -> Decimal | None:
        return coverage_percent(self.sl_covered, self.active_positions)


@dataclass(frozen=True, slots=True)
class SignalsMeasurement:
    """Age of the last signal wave (None: none yet), whether the LISTEN connection is up, and whether
    the operator paused new entries."""

    last_wave_age_seconds: float | None
    listen_connected: bool
    entries_paused: bool = False
    paused_by: str = ""  # operator | breaker | lease | database (the last three say it elsewhere too)
    pause_reason: str = ""
    # Entries held back by the venue's word (a ban, rate refusals piled up): seconds left, and why.
    entries_held_for_seconds: float | None = None
    entries_held_why: str = ""

    def __post_init__(self) -> None:
        _require_age(
            "SignalsMeasurement",
            last_wave_age_seconds=self.last_wave_age_seconds,
            entries_held_for_seconds=self.entries_held_for_seconds,
        )


@dataclass(frozen=True, slots=True)
class HealthMeasurements:
    """Everything one health check measured; None = that component has not been measured yet."""

    exchange: ExchangeMeasurement | None = None
    price_feed: PriceFeedMeasurement | None = None
    database: DatabaseMeasurement | None = None
    protection: ProtectionMeasurement | None = None
    signals: SignalsMeasurement | None = None


# ------------------------------------------------------------------------------------------ formatting


def coverage_percent(covered: int, total: int) -> Decimal | None:
    """`100 × covered / total` rounded half up to one decimal (SQL's ROUND(x, 1)); None for no total."""
    if total == 0:
        return None
    return _DECIMAL.divide(_DECIMAL.multiply(Decimal(covered), _HUNDRED), Decimal(total)).quantize(
        _ONE_DECIMAL, context=_DECIMAL
    )


def _failed(calls: CallSummary) -> str:
    """Which calls failed, for the error rate's line: a rate nothing explained sent an operator to the log
    for every DEGRADED."""
    return f" ({calls.failed_words} failed)" if calls.failed_kinds else ""


def _number(value: float) -> str:
    """`12` for whole numbers, else one decimal: `79.6`."""
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _one_line(text: str) -> str:
    line = " ".join(text.split()) or "unknown error"
    return line if len(line) <= _MAX_ERROR_TEXT else line[: _MAX_ERROR_TEXT - 1] + "…"


def _verdict(
    component: Component,
    measurements: dict[str, JsonValue],
    summary: str,
    critical: list[str],
    degraded: list[str],
    unknown: str = "",
) -> ComponentHealth:
    """The most severe non-empty cause list wins; every cause at that severity is in the reason."""
    if critical:
        state, reason = HealthState.CRITICAL, "; ".join(critical)
    elif degraded:
        state, reason = HealthState.DEGRADED, "; ".join(degraded)
    elif unknown:
        state, reason = HealthState.UNKNOWN, unknown
    else:
        state, reason = HealthState.HEALTHY, ""
    return ComponentHealth(component, state, summary, reason, measurements)


def _not_measured(component: Component) -> ComponentHealth:
    return ComponentHealth(component, HealthState.UNKNOWN, "not measured yet", "Not measured yet", {})


# ------------------------------------------------------------------------------------------------ rules


def evaluate_exchange(measured: ExchangeMeasurement | None, thresholds: HealthThresholds) -> ComponentHealth:
    component = Component.EXCHANGE
    if measured is None:
        return _not_measured(component)
    calls = measured.calls
    budget = measured.budget_used_percent
    banned = measured.banned_for_seconds is not None and measured.banned_for_seconds > 0
    error_rate = calls.error_rate
    critical: list[str] = []
    degraded: list[str] = []

    parts: list[str] = []
    if banned:
        parts.append(f"banned for {format_duration(measured.banned_for_seconds or 0.0)}")
        critical.append(
            f"Banned by the exchange for another {format_duration(measured.banned_for_seconds or 0.0)}"
        )
    if calls.calls == 0 or error_rate is None or calls.p50_ms is None or calls.p99_ms is None:
        parts.append("no calls in the window")
    else:
        error_text = f"{error_rate * 100:.1f}"
        parts.append(
            f"p50 {calls.p50_ms:.0f} ms, p99 {calls.p99_ms:.0f} ms, "
            f"errors {error_text} % of {counted(calls.calls, 'call')}"
        )
        # The window's rate keeps a recovered venue's errors for minutes (with the account stream up, the
        # engine makes a call every few seconds): once the last calls all answered, it is no outage any
        # more (`tsbot status` paged CRITICAL for five minutes with every stop confirmed).
        recovered = calls.ok_since_last_error >= EXCHANGE_MIN_CALLS_FOR_CRITICAL
        since = f"; the last {calls.ok_since_last_error} answered" if recovered and calls.errors else ""
        if (
            error_rate >= EXCHANGE_ERROR_RATE_CRITICAL
            and calls.calls >= EXCHANGE_MIN_CALLS_FOR_CRITICAL
            and not recovered
        ):
            critical.append(f"Exchange errors: {error_text}% of {calls.calls} calls{_failed(calls)}")
        # Slow or failing now, not minutes ago: judged over the last minute's calls (none: nothing says so).
        recent = calls if measured.recent is None else measured.recent
        lately = "" if measured.recent is None else " in the last minute"
        if (
            not critical
            and recent.error_rate is not None
            and recent.error_rate >= EXCHANGE_ERROR_RATE_DEGRADED
        ):
            # Why not critical, said in either case: a higher rate over the last minute than the window's
            # critical one, graded lower with nothing said, read as backwards (an operator).
            degraded.append(
                f"Exchange errors: {recent.error_rate * 100:.1f}% of {counted(recent.calls, 'call')}{lately}"
                f"{_failed(recent)}{since}"
            )
        if recent.p99_ms is not None and recent.p99_ms > thresholds.exchange_latency_degraded_ms:
            degraded.append(
                f"Slow exchange: p99 {recent.p99_ms:.0f} ms{lately} "
                f"(limit {thresholds.exchange_latency_degraded_ms} ms)"
            )
        window_bad = calls.p99_ms > thresholds.exchange_latency_degraded_ms or (
            error_rate >= EXCHANGE_ERROR_RATE_DEGRADED
        )
        if window_bad and recent is not calls and recent.p99_ms is not None and recent.error_rate is not None:
            # The window's figures are shown, the last minute's judged: beside a verdict of "ok" the window's
            # read as one that lied (opme48: "ok · p99 10009 ms, errors 47.9 %").
            parts[-1] += (
                f" (the last minute: p99 {recent.p99_ms:.0f} ms, errors {recent.error_rate * 100:.1f} % of "
                f"{counted(recent.calls, 'call')})"
            )
    parts.append("budget unknown" if budget is None else f"budget {_number(budget)} %")
    if budget is not None and budget >= EXCHANGE_BUDGET_DEGRADED_PERCENT:
        degraded.append(f"Rate budget {_number(budget)}% used")
    wait_p99 = measured.budget_wait_p99_ms
    if wait_p99 is not None and wait_p99 >= 1.0:
        parts.append(f"waiting for budget p99 {wait_p99:.0f} ms")
    if calls.timeouts:
        parts.append(counted(calls.timeouts, "timeout"))
    stream = measured.account_stream
    if stream is not None:
        parts.append(_stream_words(stream))
        if not stream.connected:
            degraded.append(
                f"Account stream down{f' ({stream.detail})' if stream.detail else ''}: fills and cancels "
                "are learned by polling"
            )

    measurements: dict[str, JsonValue] = {
        "calls": calls.calls,
        "p50_ms": calls.p50_ms,
        "p99_ms": calls.p99_ms,
        "error_rate": error_rate,
        "timeouts": calls.timeouts,
        "budget_used_percent": budget,
        "banned_for_seconds": measured.banned_for_seconds,
        "budget_wait_p99_ms": wait_p99,
        **_stream_values(stream),
    }
    unknown = "No exchange calls in the window" if calls.calls == 0 else ""
    return _verdict(component, measurements, ", ".join(parts), critical, degraded, unknown)


def evaluate_price_feed(
    measured: PriceFeedMeasurement | None, thresholds: HealthThresholds
) -> ComponentHealth:
    component = Component.PRICE_FEED
    if measured is None:
        return _not_measured(component)
    age = measured.newest_mark_age_seconds
    open_positions = counted(measured.open_positions, "open position")
    stale_after = thresholds.mark_price_stale_seconds
    critical_after = stale_after * PRICE_FEED_CRITICAL_FACTOR
    critical: list[str] = []
    degraded: list[str] = []
    unknown = ""

    if age is None:
        summary = f"no mark price yet, {open_positions}"
        if measured.open_positions:
            critical.append(f"No mark price received with {open_positions}")
        else:
            unknown = "No mark price received yet"
    else:
        summary = f"newest mark {format_duration(age)} old, {open_positions}"
        if age > critical_after and measured.open_positions:
            critical.append(
                f"Mark prices stale: newest {format_duration(age)} old with {open_positions} "
                f"(critical after {format_duration(critical_after)})"
            )
        elif age > stale_after:
            degraded.append(
                f"Mark prices stale: newest {format_duration(age)} old (limit {format_duration(stale_after)})"
            )

    stale = measured.stale_mark_symbols
    if stale:
        summary += f", {counted(len(stale), 'stale mark')}"
        shown = ", ".join(stale[:5]) + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")
        degraded.append(
            f"Stale marks on {counted(len(stale), 'position')} ({shown}): older than "
            f"{format_duration(thresholds.stale_mark_seconds)}"
        )
    if measured.mark_stream is not None:
        summary += f", {_stream_words(measured.mark_stream)}"
    measurements: dict[str, JsonValue] = {
        "newest_mark_age_seconds": age,
        "open_positions": measured.open_positions,
        "stale_mark_positions": len(stale),
        "stale_mark_symbols": ",".join(stale),
        **_stream_values(measured.mark_stream),
    }
    return _verdict(component, measurements, summary, critical, degraded, unknown)


def _stream_words(stream: StreamMeasurement) -> str:
    """`account stream up, last message 2s ago, 1 reconnect` / `account stream down (why)`. A message, not an
    event: the account stream's age counts every message the venue sent (its pongs too: a quiet account read
    "last event 2.1s ago", opme49); the marks stream's counts its data only."""
    state = "up" if stream.connected else "down"
    words = f"{stream.name} stream {state}"
    if stream.detail:
        words += f" ({stream.detail})"
    age = stream.last_event_age_seconds
    words += ", no message yet" if age is None else f", last message {format_duration(age)} ago"
    return words + f", {counted(stream.reconnects, 'reconnect')}"


def _stream_values(stream: StreamMeasurement | None) -> dict[str, JsonValue]:
    if stream is None:
        return {}
    prefix = f"{stream.name}_stream"
    return {
        f"{prefix}_connected": stream.connected,
        f"{prefix}_last_event_age_seconds": stream.last_event_age_seconds,
        f"{prefix}_reconnects": stream.reconnects,
    }


def evaluate_database(measured: DatabaseMeasurement | None, thresholds: HealthThresholds) -> ComponentHealth:
    component = Component.DATABASE
    if measured is None:
        return _not_measured(component)
    critical: list[str] = []
    degraded: list[str] = []
    journaled = measured.journal_depth
    if measured.error is not None:
        error = _one_line(measured.error)
        if measured.down_for_seconds is not None:
            down_for = format_duration(measured.down_for_seconds)
            summary = f"unreachable for {down_for}: {error}; {journaled} protective writes journaled"
            critical.append(
                f"Database unreachable for {down_for} ({error}); {journaled} protective writes journaled "
                "locally, entries paused"
            )
        else:
            summary = f"probe query failed: {error}"
            critical.append(f"Database query failed: {error}")
    else:
        round_trip = measured.round_trip_ms or 0.0
        summary = f"round trip {round_trip:.0f} ms"
        if round_trip > thresholds.database_latency_degraded_ms:
            degraded.append(
                f"Slow database: round trip {round_trip:.0f} ms (limit {thresholds.database_latency_degraded_ms} ms)"
            )
        if journaled:
            summary += f"; {journaled} journaled writes being replayed"
            degraded.append(f"{journaled} writes journaled during an outage not replayed yet")
    measurements: dict[str, JsonValue] = {
        "round_trip_ms": measured.round_trip_ms,
        "error": measured.error,
        "down_for_seconds": measured.down_for_seconds,
        "journal_depth": journaled,
    }
    return _verdict(component, measurements, summary, critical, degraded)


def evaluate_protection(
    measured: ProtectionMeasurement | None, thresholds: HealthThresholds
) -> ComponentHealth:
    component = Component.PROTECTION
    if measured is None:
        return _not_measured(component)
    active = measured.active_positions
    uncovered = measured.uncovered_positions
    past_grace = measured.uncovered_past_grace
    oldest = measured.oldest_uncovered_seconds
    protected_percent = measured.protected_percent
    ts_percent = measured.ts_coverage_percent
    sl_percent = measured.sl_coverage_percent
    measurements: dict[str, JsonValue] = {
        "active_positions": active,
        "protected_positions": measured.protected_positions,
        "uncovered_positions": uncovered,
        "uncovered_past_grace": past_grace,
        "oldest_uncovered_seconds": oldest,
        "ts_covered": measured.ts_covered,
        "sl_covered": measured.sl_covered,
        "protected_percent": None if protected_percent is None else str(protected_percent),
        "ts_coverage_percent": None if ts_percent is None else str(ts_percent),
        "sl_coverage_percent": None if sl_percent is None else str(sl_percent),
        "timeouts_last_hour": measured.timeouts_last_hour,
        "unchecked_seconds": measured.unchecked_seconds,
        "unchecked_why": measured.unchecked_why,
    }
    # The reconciler's passes are the check of what the account stream says: while they fail, a stop lost
    # with its event lost too goes unseen (an operator: 70-110 s without stops, every screen at 100 %).
    unchecked: list[str] = []
    if measured.unchecked_seconds is not None and active:
        unchecked.append(
            f"Stops not checked against the venue for {format_duration(measured.unchecked_seconds)} "
            f"(reconcile failing: {_one_line(measured.unchecked_why)[:160]}): a stop lost meanwhile is seen "
            "only if the account stream tells it"
        )
    timeouts = (
        f", {counted(measured.timeouts_last_hour, 'timeout')} in the last hour"
        if measured.timeouts_last_hour
        else ""
    )
    # No open positions: nothing to protect, and that is a measurement, not a missing one.
    if protected_percent is None or ts_percent is None or sl_percent is None:
        return _verdict(component, measurements, f"no open positions{timeouts}", [], [])

    uncovered_text = f"{uncovered} uncovered"
    if past_grace != uncovered:
        uncovered_text += f" ({past_grace} past grace)"
    if oldest is not None:
        uncovered_text += f", oldest {format_duration(oldest)}"
    summary = (
        f"TS {ts_percent} % ({measured.ts_covered}/{active}), SL {sl_percent} % ({measured.sl_covered}/{active}), "
        f"{uncovered_text}{timeouts}"
    )

    critical: list[str] = []
    degraded: list[str] = list(unchecked)
    if past_grace:
        # Judged over the positions past their grace period, as the alerts and the breaker judge it: a wave
        # still being protected beside one old uncovered position made it CRITICAL until the wave was
        # covered, every wave (and read as if the whole wave were missing its stops).
        limit = thresholds.coverage_critical_percent
        protecting = uncovered - past_grace
        judged = active - protecting
        where = f"/{judged} past grace)" if protecting else f"/{judged})"
        judged_protected = coverage_percent(measured.protected_positions, judged)
        judged_ts = measured.ts_covered - measured.protecting_ts_covered
        judged_sl = measured.sl_covered - measured.protecting_sl_covered
        ts_judged = coverage_percent(judged_ts, judged)
        sl_judged = coverage_percent(judged_sl, judged)
        assert judged_protected is not None and ts_judged is not None and sl_judged is not None
        if judged_protected < limit:
            if ts_judged < limit:
                critical.append(f"Low TS coverage: {ts_judged}% ({judged_ts}{where}")
            if sl_judged < limit:
                critical.append(f"Low SL coverage: {sl_judged}% ({judged_sl}{where}")
            if ts_judged >= limit and sl_judged >= limit:  # each stop missing on different positions
                critical.append(
                    f"Low coverage: {judged_protected}% ({measured.protected_positions}{where} with both stops"
                )
        degraded.append(f"{counted(past_grace, 'position')} uncovered past grace")
    if oldest is not None and oldest > thresholds.uncovered_critical_seconds:
        named = f"{measured.oldest_uncovered_symbol}, " if measured.oldest_uncovered_symbol else ""
        critical.append(
            f"Position uncovered for {format_duration(oldest)} "
            f"({named}limit {format_duration(thresholds.uncovered_critical_seconds)})"
        )
    return _verdict(component, measurements, summary, critical, degraded)


def evaluate_signals(measured: SignalsMeasurement | None, thresholds: HealthThresholds) -> ComponentHealth:
    del thresholds  # no configurable signal thresholds (yet); the parameter keeps the rules uniform
    component = Component.SIGNALS
    if measured is None:
        return _not_measured(component)
    age = measured.last_wave_age_seconds
    parts = [
        "no wave yet" if age is None else f"last wave {format_duration(age)} ago",
        "LISTEN up" if measured.listen_connected else "LISTEN down (polling)",
    ]
    degraded = [] if measured.listen_connected else ["LISTEN connection down: polling fallback only"]
    if measured.entries_paused:  # the operator's choice: shown, not an alarm
        by = measured.paused_by
        parts.append("entries paused" + (f" by the {by}" if by and by != "operator" else ""))
        if by == "breaker":
            # Not the operator's choice: protection was failing, and the account is out of the market until
            # someone (or `auto_resume_seconds`) resumes. An alarm with its cause, not a silent header word.
            degraded.append(
                # Its reason is what it saw when it paused (a restart carries the pause over): said as then,
                # not read as the state of now ("1 position uncovered" with none uncovered).
                "Entries paused by the circuit breaker "
                f"(when it paused: {measured.pause_reason or 'no reason given'})"
            )
    held = measured.entries_held_for_seconds
    if held is not None and not measured.entries_paused:
        # Not the operator's choice either: every signal until then is refused ("entries on" said nothing).
        parts.append(f"entries held back {format_duration(held)}")
        degraded.append(f"Entries held back for another {format_duration(held)}: {measured.entries_held_why}")
    measurements: dict[str, JsonValue] = {
        "last_wave_age_seconds": age,
        "listen_connected": measured.listen_connected,
        "entries_paused": measured.entries_paused,
        "paused_by": measured.paused_by if measured.entries_paused else "",
        "entries_held_for_seconds": held,
        "entries_held_why": measured.entries_held_why if held is not None else "",
    }
    # No wave since the start is no missing measurement: the consumer runs and listens, and signals may come
    # once an hour. It was UNKNOWN, which made the overall health (and `tsbot status`, exit 3) "unknown"
    # after every restart with every position protected (an operator's find).
    return _verdict(component, measurements, ", ".join(parts), [], degraded, "")


def evaluate_health(measurements: HealthMeasurements, thresholds: HealthThresholds) -> HealthReport:
    """Every component, in `Component` order."""
    return HealthReport(
        (
            evaluate_exchange(measurements.exchange, thresholds),
            evaluate_price_feed(measurements.price_feed, thresholds),
            evaluate_database(measurements.database, thresholds),
            evaluate_protection(measurements.protection, thresholds),
            evaluate_signals(measurements.signals, thresholds),
        )
    )


# ------------------------------------------------------------------------------------------------ logging


def log_line(component: ComponentHealth) -> str:
    """The operators' grep format, e.g. `Trailing Stop System: critical - Low TS coverage: 42.3% (30/71)`;
    the reason when not healthy, the summary when healthy. The engine prefixes `health_check: `."""
    detail = component.reason or component.summary
    return f"{DISPLAY_NAMES[component.component]}: {component.state} - {detail}"


def log_level(state: HealthState) -> int:
    """INFO when healthy, WARNING when degraded or unknown (not measured is not fine), ERROR when
    critical: anything that can leave a position unprotected is logged at WARNING or above (F12)."""
    if state is HealthState.HEALTHY:
        return logging.INFO
    if state is HealthState.CRITICAL:
        return logging.ERROR
    return logging.WARNING


def entries_held_recorded(measurements: Mapping[str, object], age_seconds: float) -> tuple[float, str] | None:
    """Entries held back by the venue's word, from a signals measurement recorded `age_seconds` ago (the
    engine's health row): seconds left now and why, or None. What a read-only watch and `tsbot status` say
    beside "entries on"."""
    held = measurements.get("entries_held_for_seconds")
    if not isinstance(held, int | float) or isinstance(held, bool) or held - age_seconds <= 0:
        return None
    why = measurements.get("entries_held_why")
    return held - age_seconds, why if isinstance(why, str) else ""


def stream_words(measured: Iterable[Mapping[str, Any]]) -> list[tuple[str, bool, str]]:
    """Each push stream the components' measurements name (`<name>_stream_connected` …), as (name,
    connected, words), e.g. `account up 2.0s ago, 1 reconnect`, those down first. Empty when the venue
    runs none (polled). The dashboard's `streams` line and `tsbot status`'s."""
    found: list[tuple[str, bool, str]] = []
    suffix = "_stream_connected"
    for values in measured:
        for key, connected in values.items():
            if not key.endswith(suffix):
                continue
            name = key[: -len(suffix)]
            age = values.get(f"{name}_stream_last_event_age_seconds")
            reconnects = values.get(f"{name}_stream_reconnects") or 0
            words = f"{name} {'up' if connected else 'DOWN'}"
            words += (
                " (no message yet)" if not isinstance(age, int | float) else f" {format_duration(age)} ago"
            )
            if reconnects:
                words += f", {reconnects} reconnect{'s' if reconnects != 1 else ''}"
            found.append((name, bool(connected), words))
    found.sort(key=lambda item: item[1])  # a stream that is down first
    return found

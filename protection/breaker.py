"""The circuit breaker: entries stop by themselves while protection is failing (the incident's other half).

While the incident's stops were timing out, waves kept opening positions: uncovered went 7 → 14 → 17 and
coverage fell to 29 % with entries on. The breaker is a pure rule over what the engine measures; the
engine evaluates it every health interval and, when it trips, pauses entries, says why everywhere (log,
event, dashboard header, `tsbot status`) and persists the pause. Only the operator resumes, or — when
`auto_resume_seconds` is set — a healthy stretch that long.

It trips on any of:

* a position uncovered past grace for longer than `uncovered_factor` × grace (one stuck position is
  already a failing protection path, not a blip);
* coverage below `coverage_floor_percent` among positions past their grace period, with at least two of
  them failing (one alone is the rule above's), counting as failing those without their stops for a grace
  period or more (young positions still being protected, and a
  stop that just fired or is being replaced, do not count against it: no false alarm at every wave or
  every fill);
* protective order sends failing: at least `min_attempts` in the last `error_window_seconds`, and at least
  `error_rate` of them failed (refused, timed out, or answered with an unknown outcome). A rate-limit
  answer (429, 418) is not a failure here: the venue named when to come back and the stop is sent then;
  if that leaves positions naked, the two rules above say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from engine.words import counted, format_duration
from protection.coverage import CoverageFigures

# The coverage rule is about a failing path, several positions at once (the incident: 7 → 14 → 17); one
# position alone is the first rule's, after `uncovered_factor` grace periods. Without this, in a book of
# fewer than 20 one position in doubt for a grace period (a verification answered 500) paused entries.
COVERAGE_RULE_MIN_FAILING = 2


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    uncovered_factor: float = 3.0
    coverage_floor_percent: Decimal = Decimal(95)
    error_rate: float = 0.5
    error_window_seconds: float = 60.0
    min_attempts: int = 6
    auto_resume_seconds: float = 0.0  # 0: only the operator resumes

    @classmethod
    def from_settings(cls, protection: object, health: object) -> BreakerSettings:
        breaker = protection.breaker  # type: ignore[attr-defined]
        return cls(
            uncovered_factor=float(breaker.uncovered_factor),
            coverage_floor_percent=Decimal(health.coverage_critical_percent),  # type: ignore[attr-defined]
            error_rate=float(breaker.error_rate),
            error_window_seconds=float(breaker.error_window_seconds),
            min_attempts=int(breaker.min_attempts),
            auto_resume_seconds=float(breaker.auto_resume_seconds),
        )


@dataclass(frozen=True, slots=True)
class BreakerInputs:
    coverage: CoverageFigures
    grace_seconds: float
    protective_attempts: int  # protective order sends in the error window
    protective_failures: int  # of those, refused / timed out / unknown
    # Open orders of another installation of this program on the account (another database's client ids):
    # two engines trading one account, each blind to the other's positions.
    other_installation_orders: int = 0


def trip_reasons(inputs: BreakerInputs, settings: BreakerSettings) -> list[str]:
    """Why entries must stop now; empty when protection is working."""
    reasons = []
    coverage = inputs.coverage
    limit = inputs.grace_seconds * settings.uncovered_factor
    oldest = coverage.oldest_unprotected_seconds
    if coverage.uncovered and oldest is not None and oldest >= limit:
        reasons.append(
            f"{coverage.uncovered} position(s) uncovered, the oldest for {format_duration(oldest)} "
            f"(more than {settings.uncovered_factor:g} × grace {inputs.grace_seconds:g}s)"
        )
    judged = coverage.active - coverage.protecting  # past their grace period
    if judged > 0 and coverage.lasting >= COVERAGE_RULE_MIN_FAILING:
        # Failing are those without their stops for a grace period: a stop that just fired (TRIGGERING)
        # or is being replaced makes its position uncovered on the gauge at once, not a failing path.
        covered_pct = Decimal(100) * (judged - coverage.lasting) / judged
        if covered_pct < settings.coverage_floor_percent:
            reasons.append(
                f"coverage {covered_pct.quantize(Decimal('0.1'))} % of {judged} position(s) past grace "
                f"(floor {settings.coverage_floor_percent} %)"
            )
    attempts, failures = inputs.protective_attempts, inputs.protective_failures
    if attempts >= settings.min_attempts and failures / attempts >= settings.error_rate:
        reasons.append(
            f"{failures} of {attempts} protective order sends failed in the last "
            f"{settings.error_window_seconds:g}s"
        )
    if inputs.other_installation_orders:
        reasons.append(
            f"another installation of tsbot trades this account "
            f"({counted(inputs.other_installation_orders, 'open order')} of another database on the venue)"
        )
    return reasons


__all__ = ["BreakerInputs", "BreakerSettings", "trip_reasons"]

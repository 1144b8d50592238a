"""Coverage figures from each position's facts, at one instant."""

from __future__ import annotations

from protection.coverage import PositionCoverage, coverage_figures
from protection.health import HealthState, HealthThresholds, ProtectionMeasurement, evaluate_protection


def test_a_loss_timed_after_the_instant_the_figures_are_for_is_no_negative_age() -> None:
    """The facts are read after `now` was taken, and a stop that fired in between is timed from when its
    loss was first seen: a hair after `now`. The age is 0, not -0.00005 s; the health loop's measurement
    refused the negative age and the loop crashed and restarted, a traceback in the chaos soak's log."""
    now = 1000.0
    facts = [PositionCoverage(7, "BTCUSDT", False, True, filled_at=900.0, unprotected_since=now + 0.00005)]
    figures = coverage_figures(facts, now, grace_seconds=5.0)
    assert figures.uncovered_ids == (7,)
    assert figures.oldest_unprotected_seconds == 0.0
    ProtectionMeasurement.of(figures, 0)  # accepted: no ValueError


def _book(now: float, uncovered_for: dict[int, float], size: int = 36) -> list[PositionCoverage]:
    """`size` positions held for an hour, all covered but those in `uncovered_for` (id: seconds without a
    stop; each keeps its trailing stop)."""
    return [
        PositionCoverage(
            i,
            f"S{i}USDT",
            i not in uncovered_for,
            True,
            filled_at=now - 3600.0,
            unprotected_since=now - uncovered_for[i] if i in uncovered_for else None,
        )
        for i in range(1, size + 1)
    ]


def test_a_stop_out_a_moment_ago_is_shown_uncovered_but_is_no_alarm() -> None:
    """An operator (opme51): two positions of 36 stopped out in the same millisecond, and until their
    closes were settled (well within the grace period) the health panel said `protection critical: Low
    coverage: 94.4% (34/36 past grace)`, an ERROR in the log panel, and the gauge turned red; on the wire
    a single stop-out read `degraded: 1 position uncovered past grace`. "Past grace" counted positions
    *opened* longer than a grace period ago, however briefly they had been without a stop, where the
    breaker and the alerts judge positions without their stops for a grace period. They are still shown
    uncovered at once (the gauge's count); the alarm comes once that lasts a grace period."""
    now, grace = 10_000.0, 5.0
    thresholds = HealthThresholds()
    brief = coverage_figures(_book(now, {3: 0.2, 9: 0.2}), now, grace_seconds=grace)
    assert brief.uncovered_ids == (3, 9)  # shown at once
    verdict = evaluate_protection(ProtectionMeasurement.of(brief, 0), thresholds)
    assert verdict.state is HealthState.HEALTHY, verdict
    assert "2 uncovered" in verdict.summary
    lasting = coverage_figures(_book(now, {3: 6.0, 9: 6.0}), now, grace_seconds=grace)
    verdict = evaluate_protection(ProtectionMeasurement.of(lasting, 0), thresholds)
    assert verdict.state is HealthState.CRITICAL, verdict
    assert "Low SL coverage: 94.4% (34/36)" in verdict.reason
    mixed = coverage_figures(_book(now, {3: 6.0, 9: 0.2}), now, grace_seconds=grace)
    verdict = evaluate_protection(ProtectionMeasurement.of(mixed, 0), thresholds)
    assert verdict.state is HealthState.DEGRADED, verdict  # (one of 35 judged: 97.1 %, above the floor)
    assert "1 position uncovered past grace" in verdict.reason

"""Coverage figures from each position's facts, at one instant."""

from __future__ import annotations

from protection.coverage import PositionCoverage, coverage_figures
from protection.health import ProtectionMeasurement


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

"""Health rules for the live streams (issue 11): per-position stale marks and the account stream's state."""

from __future__ import annotations

import pytest

from engine.metrics import CallSummary
from protection.health import (
    ExchangeMeasurement,
    HealthState,
    HealthThresholds,
    PriceFeedMeasurement,
    StreamMeasurement,
    evaluate_exchange,
    evaluate_price_feed,
)

CALLS = CallSummary(calls=10, p50_ms=50.0, p99_ms=80.0, error_rate=0.0, timeouts=0)
T = HealthThresholds(stale_mark_seconds=10.0)


def test_a_position_with_a_stale_mark_degrades_the_price_feed_and_is_named() -> None:
    health = evaluate_price_feed(
        PriceFeedMeasurement(newest_mark_age_seconds=0.5, open_positions=3, stale_mark_symbols=("SFPUSDT",)),
        T,
    )
    assert health.state is HealthState.DEGRADED
    assert "SFPUSDT" in health.reason
    assert "10s" in health.reason
    assert health.measurements["stale_mark_positions"] == 1
    assert "1 stale mark" in health.summary


def test_no_stale_mark_no_alarm() -> None:
    health = evaluate_price_feed(PriceFeedMeasurement(newest_mark_age_seconds=0.5, open_positions=3), T)
    assert health.state is HealthState.HEALTHY
    assert health.measurements["stale_mark_positions"] == 0


def test_more_stale_marks_than_positions_is_refused() -> None:
    with pytest.raises(ValueError, match="more stale marks"):
        PriceFeedMeasurement(newest_mark_age_seconds=0.5, open_positions=0, stale_mark_symbols=("A",))


def test_the_account_stream_state_is_in_the_exchange_summary_and_down_degrades() -> None:
    up = StreamMeasurement("account", connected=True, last_event_age_seconds=2.0, reconnects=1)
    health = evaluate_exchange(ExchangeMeasurement(calls=CALLS, account_stream=up), T)
    assert health.state is HealthState.HEALTHY
    assert "account stream up, last message 2.0s ago, 1 reconnect" in health.summary
    assert health.measurements["account_stream_connected"] is True
    assert health.measurements["account_stream_reconnects"] == 1
    down = StreamMeasurement("account", connected=False, last_event_age_seconds=None, detail="dropped")
    health = evaluate_exchange(ExchangeMeasurement(calls=CALLS, account_stream=down), T)
    assert health.state is HealthState.DEGRADED
    assert "Account stream down (dropped)" in health.reason


def test_a_venue_without_account_stream_raises_nothing() -> None:
    health = evaluate_exchange(ExchangeMeasurement(calls=CALLS), T)
    assert health.state is HealthState.HEALTHY
    assert "stream" not in health.summary


def test_the_mark_stream_state_is_in_the_price_feed_summary() -> None:
    marks = StreamMeasurement("marks", connected=True, last_event_age_seconds=0.3)
    health = evaluate_price_feed(
        PriceFeedMeasurement(newest_mark_age_seconds=0.3, open_positions=1, mark_stream=marks), T
    )
    assert "marks stream up" in health.summary
    assert health.state is HealthState.HEALTHY

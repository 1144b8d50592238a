"""CallStats and EventCounter: percentiles against a sorted reference, window expiry, bounded memory."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.metrics import EMPTY_SUMMARY, CallStats, CallSummary, EventCounter, nearest_rank


def reference_percentile(values: list[float], percent: int) -> float:
    """The smallest value with at least `percent` % of all values at or below it (nearest rank, by
    definition rather than by index arithmetic)."""
    ordered = sorted(values)
    for value in ordered:
        at_or_below = sum(1 for v in ordered if v <= value)
        if at_or_below * 100 >= percent * len(ordered):
            return value
    raise AssertionError("unreachable")


# -------------------------------------------------------------------------------------------- percentiles


@pytest.mark.parametrize(
    ("values", "percent", "expected"),
    [
        ([7.0], 50, 7.0),
        ([7.0], 99, 7.0),
        ([1.0, 2.0], 50, 1.0),
        ([1.0, 2.0], 99, 2.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.0),
        ([float(i) for i in range(1, 101)], 99, 99.0),
        ([float(i) for i in range(1, 101)], 100, 100.0),
        ([float(i) for i in range(1, 201)], 99, 198.0),
    ],
)
def test_nearest_rank_examples(values: list[float], percent: int, expected: float) -> None:
    assert nearest_rank(values, percent) == expected


def test_nearest_rank_refuses_nothing_and_bad_percents() -> None:
    with pytest.raises(ValueError, match="no values"):
        nearest_rank([], 50)
    for percent in (0, 101, -1):
        with pytest.raises(ValueError, match="percent"):
            nearest_rank([1.0], percent)


@settings(max_examples=200)
@given(
    latencies_ms=st.lists(st.integers(min_value=0, max_value=60_000), min_size=1, max_size=300),
    percent=st.integers(min_value=1, max_value=100),
)
def test_nearest_rank_matches_the_definition(latencies_ms: list[int], percent: int) -> None:
    values = [float(v) for v in latencies_ms]
    assert nearest_rank(sorted(values), percent) == reference_percentile(values, percent)


@settings(max_examples=150)
@given(latencies_ms=st.lists(st.integers(min_value=0, max_value=60_000), min_size=1, max_size=300))
def test_summary_percentiles_match_a_sorted_reference(latencies_ms: list[int]) -> None:
    stats = CallStats(window_s=300)
    for i, ms in enumerate(latencies_ms):
        stats.record(at=i * 0.5, latency_s=ms / 1000, ok=True, kind="fetch_positions")

    summary = stats.summary(now=len(latencies_ms) * 0.5)

    seconds = [ms / 1000 for ms in latencies_ms]
    assert summary.calls == len(latencies_ms)
    assert summary.p50_ms == reference_percentile(seconds, 50) * 1000
    assert summary.p99_ms == reference_percentile(seconds, 99) * 1000
    assert summary.p50_ms <= summary.p99_ms


# ---------------------------------------------------------------------------------------------- summary


def test_no_calls_is_an_empty_summary_not_a_perfect_one() -> None:
    summary = CallStats().summary(now=1000.0)
    assert summary == EMPTY_SUMMARY
    assert summary.calls == 0
    assert summary.p50_ms is None
    assert summary.p99_ms is None
    assert summary.error_rate is None
    assert summary.errors == 0


def test_error_rate_and_timeouts_count_outcomes() -> None:
    stats = CallStats(window_s=60)
    outcomes = [(True, False)] * 6 + [(False, True)] * 3 + [(False, False)]  # (ok, timed out)
    for i, (ok, timed_out) in enumerate(outcomes):
        stats.record(at=float(i), latency_s=0.05, ok=ok, kind="create_order", timed_out=timed_out)

    summary = stats.summary(now=10.0)

    assert summary.calls == 10
    assert summary.error_rate == pytest.approx(0.4)
    assert summary.errors == 4
    assert summary.timeouts == 3


def test_summary_of_one_kind_of_call() -> None:
    stats = CallStats(window_s=60)
    for i in range(10):
        stats.record(at=float(i), latency_s=0.02, ok=True, kind="fetch_positions")
    stats.record(at=10.0, latency_s=10.0, ok=False, kind="create_order", timed_out=True)
    stats.record(at=11.0, latency_s=0.3, ok=True, kind="create_order")

    orders = stats.summary(now=12.0, kind="create_order")
    assert orders == CallSummary(
        calls=2,
        p50_ms=300.0,
        p99_ms=10_000.0,
        error_rate=0.5,
        timeouts=1,
        ok_since_last_error=1,
        failed_kinds=(("create_order", 1),),
    )
    assert stats.summary(now=12.0).calls == 12
    assert stats.summary(now=12.0, kind="cancel_order") == EMPTY_SUMMARY


def test_latencies_are_reported_in_milliseconds() -> None:
    stats = CallStats()
    stats.record(at=1.0, latency_s=0.048, ok=True, kind="fetch_positions")
    summary = stats.summary(now=1.0)
    assert summary.p50_ms == pytest.approx(48.0)
    assert summary.p99_ms == pytest.approx(48.0)


def test_window_is_half_open_and_expires_old_calls() -> None:
    stats = CallStats(window_s=300)
    stats.record(at=0.0, latency_s=9.0, ok=False, kind="create_order", timed_out=True)
    stats.record(at=100.0, latency_s=0.1, ok=True, kind="fetch_positions")
    stats.record(at=299.0, latency_s=0.2, ok=True, kind="fetch_positions")

    assert stats.summary(now=299.9).calls == 3  # all inside (now - 300, now]
    at_boundary = stats.summary(now=300.0)  # the call at exactly now - window is out
    assert at_boundary == CallSummary(
        calls=2, p50_ms=100.0, p99_ms=200.0, error_rate=0.0, timeouts=0, ok_since_last_error=2
    )
    assert stats.summary(now=400.0).calls == 1
    assert stats.summary(now=599.0) == EMPTY_SUMMARY
    assert len(stats) == 0


def test_a_recovered_venue_stops_looking_broken_once_the_errors_leave_the_window() -> None:
    stats = CallStats(window_s=60)
    for i in range(10):
        stats.record(at=float(i), latency_s=10.0, ok=False, kind="create_order", timed_out=True)
    for i in range(10):
        stats.record(at=100.0 + i, latency_s=0.05, ok=True, kind="fetch_positions")

    summary = stats.summary(now=110.0)
    assert summary.error_rate == 0.0
    assert summary.timeouts == 0
    assert summary.p99_ms == pytest.approx(50.0)


# ------------------------------------------------------------------------------------------------ memory


def test_memory_is_bounded_by_the_window() -> None:
    stats = CallStats(window_s=60, max_samples=1_000_000)
    for second in range(10_000):
        stats.record(at=float(second), latency_s=0.01, ok=True, kind="fetch_positions")
        assert len(stats) <= 60
    assert stats.dropped == 0  # expiry is not a drop


def test_memory_is_bounded_by_the_cap_and_the_truncation_is_counted() -> None:
    stats = CallStats(window_s=300, max_samples=100)
    for i in range(5_000):
        stats.record(at=1.0, latency_s=i / 1000, ok=True, kind="fetch_positions")
        assert len(stats) <= 100
    assert stats.dropped == 4_900

    summary = stats.summary(now=1.0)
    assert summary.calls == 100
    # the most recent 100 calls (latencies 4.900 .. 4.999 s) are the ones described
    assert summary.p50_ms == pytest.approx(4949.0)
    assert summary.p99_ms == pytest.approx(4998.0)


@pytest.mark.parametrize("latency", [-0.001, math.nan])
def test_record_refuses_impossible_latencies(latency: float) -> None:
    with pytest.raises(ValueError, match="latency_s"):
        CallStats().record(at=1.0, latency_s=latency, ok=True, kind="fetch_positions")


@pytest.mark.parametrize(("window_s", "max_samples"), [(0, 10), (-1, 10), (math.nan, 10), (60, 0)])
def test_call_stats_refuses_bad_bounds(window_s: float, max_samples: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        CallStats(window_s=window_s, max_samples=max_samples)


# ----------------------------------------------------------------------------------------- EventCounter


def test_event_counter_counts_a_trailing_window() -> None:
    counter = EventCounter(horizon_s=3600)
    for at in (10.0, 20.0, 30.0, 3000.0):
        counter.add(at)

    assert counter.count(now=3000.0, window_s=3600) == 4
    assert counter.count(now=3000.0, window_s=2980) == 2  # (20, 3000]: 20 is out
    assert counter.count(now=3000.0, window_s=2990) == 3  # (10, 3000]: 10 is out
    assert counter.count(now=3000.0, window_s=2991) == 4
    assert counter.count(now=2999.0, window_s=3000) == 3  # an event after `now` is not counted
    assert counter.count(now=3610.0, window_s=3600) == 3  # 10.0 fell out of (10, 3610]
    assert counter.count(now=7000.0, window_s=3600) == 0
    assert len(counter) == 0


def test_event_counter_keeps_out_of_order_events_sorted() -> None:
    counter = EventCounter(horizon_s=100)
    for at in (50.0, 10.0, 40.0, 30.0):
        counter.add(at)
    assert counter.count(now=50.0, window_s=15) == 2  # (35, 50]: 40 and 50
    assert counter.count(now=50.0, window_s=25) == 3  # (25, 50]: 30, 40 and 50
    assert counter.count(now=50.0, window_s=45) == 4


def test_event_counter_refuses_a_window_beyond_its_horizon() -> None:
    counter = EventCounter(horizon_s=3600)
    with pytest.raises(ValueError, match="window_s"):
        counter.count(now=0.0, window_s=3601)
    with pytest.raises(ValueError, match="window_s"):
        counter.count(now=0.0, window_s=0)


def test_event_counter_memory_is_bounded() -> None:
    counter = EventCounter(horizon_s=60, max_events=1_000)
    for i in range(20_000):
        counter.add(i / 100)  # 100 events a second: the cap, not the horizon, binds
        assert len(counter) <= 1_000
    assert counter.dropped == 19_000
    assert len(counter._times) <= 2 * 1_000 + 64  # the dead prefix is compacted away
    assert counter.count(now=200.0, window_s=60) == 1_000


@settings(max_examples=150)
@given(
    events=st.lists(st.integers(min_value=0, max_value=20_000), max_size=400),
    now=st.integers(min_value=0, max_value=25_000),
    window=st.integers(min_value=1, max_value=3_600),
)
def test_event_counter_matches_a_reference(events: list[int], now: int, window: int) -> None:
    counter = EventCounter(horizon_s=3_600)
    for at in sorted(events):
        counter.add(float(at))
    newest = max(events, default=0)
    now = max(now, newest)  # asked at or after the last event, as the shell does

    expected = sum(1 for at in events if now - window < at <= now)
    assert counter.count(now=float(now), window_s=float(window)) == expected


def test_the_summary_counts_the_calls_answered_since_the_newest_failure() -> None:
    stats = CallStats(window_s=300.0)
    for at, ok in (
        (1.0, True),
        (2.0, False),
        (3.0, True),
        (4.0, True),
        (5.0, False),
        (6.0, True),
        (7.0, True),
    ):
        stats.record(at, 0.1, ok, "fetch_order")
    assert stats.summary(8.0).ok_since_last_error == 2
    stats.record(9.0, 0.1, False, "fetch_order")
    assert stats.summary(10.0).ok_since_last_error == 0
    clean = CallStats(window_s=300.0)
    for at in (1.0, 2.0, 3.0):
        clean.record(at, 0.1, True, "fetch_order")
    assert clean.summary(4.0).ok_since_last_error == 3


def test_a_summary_of_the_last_stretch_of_the_window_counts_only_its_calls() -> None:
    stats = CallStats(window_s=300.0)
    stats.record(10.0, 2.5, False, "create_order")
    stats.record(250.0, 0.05, True, "create_order")
    stats.record(280.0, 0.07, True, "fetch_order")
    whole = stats.summary(290.0)
    assert (whole.calls, whole.p99_ms, whole.error_rate) == (3, 2500.0, 1 / 3)
    recent = stats.summary(290.0, last_s=60.0)
    assert (recent.calls, recent.p99_ms, recent.error_rate) == (2, 70.0, 0.0)
    assert stats.summary(290.0, "fetch_order", last_s=60.0).calls == 1

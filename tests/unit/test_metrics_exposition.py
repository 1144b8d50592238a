"""The pure parts of the metrics endpoint: the cumulative histograms behind `/metrics` and the `/healthz`
verdict (engine state, freshness and the worst component)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.config import ConfigError, load_config
from engine.metrics import LATENCY_BUCKETS, CallStats, CumulativeHistogram
from engine.metrics_server import health_verdict
from protection.health import Component, ComponentHealth, HealthState


@given(st.lists(st.floats(min_value=0, max_value=500, allow_nan=False), max_size=200))
def test_histogram_buckets_are_cumulative_and_count_every_observation(latencies: list[float]) -> None:
    histogram = CumulativeHistogram()
    for seconds in latencies:
        histogram.record("create_order", seconds)
    counts = histogram.counts("create_order")
    assert counts.count == len(latencies)
    for bound, cumulative in zip(counts.bounds, counts.buckets, strict=True):
        assert cumulative == sum(1 for s in latencies if s <= bound)  # Prometheus' `le`: at most the bound
    assert counts.total_seconds == pytest.approx(sum(latencies))


def test_call_stats_keep_every_call_in_the_histogram_after_the_window_expires() -> None:
    stats = CallStats(window_s=10)
    stats.record(1.0, 0.2, True, "create_order")
    stats.record(2.0, 11.0, False, "create_order", timed_out=True)
    stats.record(3.0, 0.05, False, "fetch_order")
    assert stats.summary(100.0).calls == 0  # the rolling window forgot them ...
    create = stats.histogram.counts("create_order")  # ... the exported counters never do
    assert (create.count, create.errors, create.timeouts) == (2, 1, 1)
    assert create.buckets[LATENCY_BUCKETS.index(0.25)] == 1
    assert create.buckets[LATENCY_BUCKETS.index(10.0)] == 1
    assert create.buckets[LATENCY_BUCKETS.index(30.0)] == 2
    assert stats.histogram.labels() == ["create_order", "fetch_order"]


def _component(component: Component, state: HealthState) -> ComponentHealth:
    reason = "" if state is HealthState.HEALTHY else f"{component} is {state}"
    return ComponentHealth(component, state, f"{component} summary", reason, {})


ALL_HEALTHY = tuple(_component(c, HealthState.HEALTHY) for c in Component)


def _with(component: Component, state: HealthState) -> tuple[ComponentHealth, ...]:
    return tuple(_component(c.component, state) if c.component is component else c for c in ALL_HEALTHY)


@pytest.mark.parametrize(
    ("engine_state", "components", "age", "status", "http", "said"),
    [
        ("running", ALL_HEALTHY, 1.0, "ok", 200, "all 5 components healthy"),
        ("running", _with(Component.EXCHANGE, HealthState.DEGRADED), 1.0, "degraded", 200, "exchange:"),
        ("running", _with(Component.PROTECTION, HealthState.CRITICAL), 1.0, "critical", 503, "protection:"),
        ("running", _with(Component.SIGNALS, HealthState.UNKNOWN), 1.0, "unknown", 503, "signals:"),
        ("running", ALL_HEALTHY, 15.5, "unknown", 503, "last health measurement is 15s old"),
        ("running", (), None, "unknown", 503, "no health measured yet"),
        ("starting", ALL_HEALTHY, 1.0, "unknown", 503, "the engine is starting"),
        ("stopping", ALL_HEALTHY, 1.0, "unknown", 503, "the engine is stopping"),
    ],
)
def test_healthz_verdict(
    engine_state: str,
    components: tuple[ComponentHealth, ...],
    age: float | None,
    status: str,
    http: int,
    said: str,
) -> None:
    verdict = health_verdict(
        engine_state=engine_state, components=components, measured_age_seconds=age, stale_after_seconds=15
    )
    assert (verdict.status, verdict.http_status) == (status, http)
    assert said in verdict.reason


def test_critical_outranks_degraded_and_unknown() -> None:
    components = (
        _component(Component.EXCHANGE, HealthState.DEGRADED),
        _component(Component.SIGNALS, HealthState.UNKNOWN),
        _component(Component.PROTECTION, HealthState.CRITICAL),
    )
    verdict = health_verdict(
        engine_state="running", components=components, measured_age_seconds=0, stale_after_seconds=15
    )
    assert (verdict.status, verdict.http_status) == ("critical", 503)
    assert verdict.reason == "protection: protection is critical"


def test_metrics_are_off_and_on_loopback_by_default(tmp_path) -> None:
    metrics = load_config(None, environ={}, cwd=tmp_path).settings.metrics
    assert (metrics.enabled, metrics.host, metrics.port) == (False, "127.0.0.1", 9464)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("TSBOT_METRICS__HOST", "example.com", "metrics.host: must be an IP address like 127.0.0.1"),
        ("TSBOT_METRICS__PORT", "70000", 'metrics.port: must be between 0 and 65535, got "70000"'),
        ("TSBOT_METRICS__ENABLED", "yes", "metrics.enabled: must be true or false"),
    ],
)
def test_bad_metrics_settings_are_one_line_each(tmp_path, variable: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(None, environ={variable: value}, cwd=tmp_path)
    assert len(raised.value.lines) == 1
    assert raised.value.lines[0].startswith(f"{variable}: {expected}")


def test_an_explicit_address_is_accepted(tmp_path) -> None:
    environ = {"TSBOT_METRICS__HOST": "0.0.0.0", "TSBOT_METRICS__ENABLED": "true"}
    metrics = load_config(None, environ=environ, cwd=tmp_path).settings.metrics
    assert (metrics.enabled, metrics.host) == (True, "0.0.0.0")

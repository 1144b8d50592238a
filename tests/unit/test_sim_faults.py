"""Seeded latency distributions and fault draws, and the settings that configure them."""

from __future__ import annotations

import random
import statistics
from collections import Counter

import pytest
from pydantic import ValidationError

from engine.venues.sim.faults import FaultInjector, sample_latency
from engine.venues.sim.settings import (
    CallKind,
    FaultKind,
    FaultSettings,
    LatencyDistribution,
    LatencySettings,
    SimVenueSettings,
)


def samples(distribution: LatencyDistribution, n: int = 2000, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [sample_latency(distribution, rng) for _ in range(n)]


def test_fixed_latency_is_exact() -> None:
    assert set(samples(LatencyDistribution(distribution="fixed", seconds=0.3), n=10)) == {0.3}


def test_uniform_latency_expresses_two_seconds_with_jitter() -> None:
    drawn = samples(LatencyDistribution(distribution="uniform", seconds=2.0, jitter_seconds=0.5))
    assert all(1.5 <= value <= 2.5 for value in drawn)
    assert min(drawn) < 1.6
    assert max(drawn) > 2.4


def test_lognormal_latency_has_the_configured_median_and_respects_the_cap() -> None:
    drawn = samples(LatencyDistribution(distribution="lognormal", seconds=2.0, sigma=0.5, cap_seconds=4.0))
    assert statistics.median(drawn) == pytest.approx(2.0, rel=0.1)
    assert max(drawn) == 4.0


def plans(injector: FaultInjector, kind: CallKind, n: int) -> list[tuple[float, FaultKind | None]]:
    return [(p.latency, p.fault) for p in (injector.plan(kind) for _ in range(n))]


def noisy() -> tuple[LatencySettings, FaultSettings]:
    return (
        LatencySettings(distribution="uniform", seconds=1.0, jitter_seconds=0.5),
        FaultSettings(network_error_before_send=0.1, server_error=0.1, timeout_after_accept=0.1),
    )


def test_same_seed_gives_the_same_plans_and_another_seed_other_plans() -> None:
    assert plans(FaultInjector(*noisy(), seed=3), CallKind.CREATE_ORDER, 200) == plans(
        FaultInjector(*noisy(), seed=3), CallKind.CREATE_ORDER, 200
    )
    assert plans(FaultInjector(*noisy(), seed=3), CallKind.CREATE_ORDER, 200) != plans(
        FaultInjector(*noisy(), seed=4), CallKind.CREATE_ORDER, 200
    )


def test_fault_frequencies_follow_the_probabilities() -> None:
    injector = FaultInjector(*noisy(), seed=9)
    counts = Counter(fault for _, fault in plans(injector, CallKind.CREATE_ORDER, 6000))
    drawn = (FaultKind.NETWORK_ERROR_BEFORE_SEND, FaultKind.SERVER_ERROR, FaultKind.TIMEOUT_AFTER_ACCEPT)
    for fault in drawn:
        assert counts[fault] / 6000 == pytest.approx(0.1, abs=0.02)
    assert counts[FaultKind.RATE_LIMITED] == 0  # forced only: no probability draws it
    assert counts[None] / 6000 == pytest.approx(0.7, abs=0.03)


def test_forced_faults_come_first_and_only_for_their_call_kind() -> None:
    injector = FaultInjector(LatencySettings(), FaultSettings(), seed=1)
    injector.force(CallKind.CANCEL_ORDER, FaultKind.SERVER_ERROR, count=2)

    assert injector.plan(CallKind.CREATE_ORDER).fault is None
    assert [injector.plan(CallKind.CANCEL_ORDER).fault for _ in range(3)] == [
        FaultKind.SERVER_ERROR,
        FaultKind.SERVER_ERROR,
        None,
    ]
    injector.force(CallKind.FETCH_ORDER, FaultKind.NETWORK_ERROR_BEFORE_SEND)
    injector.clear_forced()
    assert injector.plan(CallKind.FETCH_ORDER).fault is None


def test_per_call_overrides_apply_to_that_call_only() -> None:
    latency = LatencySettings(seconds=0.05, by_call={CallKind.CREATE_ORDER: LatencyDistribution(seconds=2.0)})
    faults = FaultSettings(by_call={CallKind.CREATE_ORDER: {"timeout_after_accept": 1.0}})
    injector = FaultInjector(latency, faults, seed=1)

    create = injector.plan(CallKind.CREATE_ORDER)
    read = injector.plan(CallKind.FETCH_POSITIONS)
    assert (create.latency, create.fault) == (2.0, FaultKind.TIMEOUT_AFTER_ACCEPT)
    assert (read.latency, read.fault) == (0.05, None)


@pytest.mark.parametrize(
    "bad",
    [
        {"faults": {"server_error": 0.6, "timeout_after_accept": 0.6}},
        {"faults": {"server_error": 1.5}},
        {"latency": {"distribution": "uniform", "seconds": 1.0, "jitter_seconds": 2.0}},
        {"latency": {"distribution": "gaussian"}},
        {"latency": {"by_call": {"teleport": {"seconds": 1.0}}}},
        {"symbols": ["NOPEUSDT"]},
        {"symbols": ["BTCUSDT", "BTCUSDT"]},
        {"volatility_by_symbol": {"BTCUSDT": -1.0}},
        {"rate_limits": {"ban_seconds": 600, "max_ban_seconds": 60}},
        {"rate_limits": {"orders_per_10s": 0}},
        {"mark_tick_seconds": 0},
        {"slippage_bps": -1},
        {"unknown_key": 1},
        {"faults": {"typo_probability": 0.1}},
    ],
)
def test_invalid_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        SimVenueSettings.model_validate(bad)


def test_defaults_are_calm_and_match_binance_limits() -> None:
    settings = SimVenueSettings()
    assert settings.faults.for_call(CallKind.CREATE_ORDER) == FaultSettings()
    assert (settings.rate_limits.orders_per_10s, settings.rate_limits.orders_per_minute) == (300, 1200)
    assert settings.max_conditional_orders == 200

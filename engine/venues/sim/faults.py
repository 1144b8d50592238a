"""Seeded latency and fault draws for the sim venue, per call kind.

One plan per call: how long the round trip takes and which fault (if any) hits it. Latency and faults use
separate generators, both seeded from the venue seed, so changing a latency setting does not move which
calls fail. A test (or the contract harness) can also force the next faults of a call kind; forced faults
are consumed before any random draw.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

from engine.venues.sim.settings import (
    AccountStreamSettings,
    CallKind,
    FaultKind,
    FaultSettings,
    LatencyDistribution,
    LatencySettings,
)


@dataclass(frozen=True, slots=True)
class CallPlan:
    latency: float  # round trip, seconds
    fault: FaultKind | None


def sample_latency(distribution: LatencyDistribution, rng: random.Random) -> float:
    match distribution.distribution:
        case "fixed":
            value = distribution.seconds
        case "uniform":
            value = rng.uniform(
                distribution.seconds - distribution.jitter_seconds,
                distribution.seconds + distribution.jitter_seconds,
            )
        case "lognormal":
            value = distribution.seconds * math.exp(distribution.sigma * rng.gauss(0.0, 1.0))
    return min(max(0.0, value), distribution.cap_seconds)


class FaultInjector:
    def __init__(self, latency: LatencySettings, faults: FaultSettings, seed: int) -> None:
        self._latency = latency
        self._faults = faults
        self._latency_rng = random.Random(f"latency:{seed}")
        self._fault_rng = random.Random(f"faults:{seed}")
        self._forced: dict[CallKind, deque[FaultKind]] = {}
        self._forced_stops: deque[FaultKind] = deque()  # placements of conditional orders only
        self._forced_market: dict[str, deque[FaultKind]] = {}  # market orders of one symbol only
        self._stream_rng = random.Random(f"stream:{seed}")

    def drops_account_stream(self, stream: AccountStreamSettings) -> bool:
        """Whether the account stream's connection drops at this event (seeded, one draw per event, apart
        from the calls' draws so a stream setting does not move which calls fail)."""
        if stream.drop_probability <= 0:
            return False
        return self._stream_rng.random() < stream.drop_probability

    def force(
        self,
        kind: CallKind,
        fault: FaultKind,
        count: int = 1,
        *,
        stops_only: bool = False,
        market_symbol: str | None = None,
    ) -> None:
        """Make the next `count` calls of `kind` suffer `fault`, whatever the probabilities say; with
        `stops_only`, the next `count` placements of conditional orders (Binance takes them at an endpoint
        of their own, the Algo API, which can refuse while orders go through); with `market_symbol`, the
        next `count` market orders of that symbol (one symbol's book that the venue cannot match)."""
        if count < 1:
            raise ValueError("count must be >= 1")
        if (stops_only or market_symbol is not None) and kind is not CallKind.CREATE_ORDER:
            raise ValueError("stops_only and market_symbol apply to create_order")
        if market_symbol is not None:
            queue = self._forced_market.setdefault(market_symbol, deque())
        else:
            queue = self._forced_stops if stops_only else self._forced.setdefault(kind, deque())
        queue.extend([fault] * count)

    def clear_forced(self) -> None:
        self._forced.clear()
        self._forced_stops.clear()
        self._forced_market.clear()

    def plan(self, kind: CallKind, *, stop: bool = False, market_symbol: str | None = None) -> CallPlan:
        latency = sample_latency(self._latency.for_call(kind), self._latency_rng)
        forced = self._forced_stops if stop and self._forced_stops else self._forced.get(kind)
        if market_symbol is not None and self._forced_market.get(market_symbol):
            forced = self._forced_market[market_symbol]
        if forced:
            return CallPlan(latency=latency, fault=forced.popleft())
        return CallPlan(latency=latency, fault=self._draw_fault(kind))

    def _draw_fault(self, kind: CallKind) -> FaultKind | None:
        probabilities = self._faults.for_call(kind)
        draw = self._fault_rng.random()  # one draw per call, always, to keep the sequence stable
        threshold = probabilities.network_error_before_send
        if draw < threshold:
            return FaultKind.NETWORK_ERROR_BEFORE_SEND
        threshold += probabilities.server_error
        if draw < threshold:
            return FaultKind.SERVER_ERROR
        threshold += probabilities.timeout_after_accept
        if draw < threshold:
            return FaultKind.TIMEOUT_AFTER_ACCEPT
        return None

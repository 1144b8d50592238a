"""Seeded geometric Brownian motion for mark prices, one independent stream per symbol.

Each symbol draws from its own generator seeded by `(seed, symbol)`, so the same seed gives the same path
for a symbol whatever else is listed or how often other symbols are stepped. The shock is a float; the
multiplier is applied to a `Decimal` latent price, and the published mark is that latent price quantized
to the tick. Keeping the latent price unquantized matters on cheap coins: with a coarse tick a one-second
move rounds to zero, and a walk that stored the rounded price would never move.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from decimal import Decimal

SECONDS_PER_YEAR = 365.0 * 24.0 * 3600.0


class GbmWalk:
    """Zero-drift GBM: S(t+dt) = S(t) · exp(−σ²dt/2 + σ√dt·Z), σ annualised, dt in seconds."""

    def __init__(
        self,
        *,
        seed: int,
        initial_prices: Mapping[str, Decimal],
        tick_sizes: Mapping[str, Decimal],
        volatility: Mapping[str, float],
    ) -> None:
        self._latent: dict[str, Decimal] = dict(initial_prices)
        self._ticks = dict(tick_sizes)
        self._volatility = dict(volatility)
        self._rngs = {symbol: random.Random(f"gbm:{seed}:{symbol}") for symbol in initial_prices}

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(self._latent)

    def price(self, symbol: str) -> Decimal:
        """The current mark: the latent price on the tick grid, never below one tick."""
        tick = self._ticks[symbol]
        on_grid = (self._latent[symbol] / tick).to_integral_value() * tick
        return max(on_grid, tick)

    def set_price(self, symbol: str, price: Decimal) -> None:
        """Move a symbol's walk to `price` (a test or operator override); the walk continues from there."""
        if price <= 0:
            raise ValueError("price must be positive")
        self._latent[symbol] = price

    def latent_prices(self) -> dict[str, Decimal]:
        """Each symbol's unquantized price: what a restart needs for the walk to continue where it was."""
        return dict(self._latent)

    def step(self, dt_seconds: float) -> dict[str, Decimal]:
        """Advance every symbol by `dt_seconds` and return the new marks."""
        if dt_seconds < 0:
            raise ValueError("dt must be >= 0")
        years = dt_seconds / SECONDS_PER_YEAR
        for symbol, rng in self._rngs.items():
            shock = rng.gauss(0.0, 1.0)  # drawn even when sigma is 0, so paths do not depend on sigma
            sigma = self._volatility.get(symbol, 0.0)
            if sigma == 0.0 or years == 0.0:
                continue
            multiplier = math.exp(-0.5 * sigma * sigma * years + sigma * math.sqrt(years) * shock)
            self._latent[symbol] = self._latent[symbol] * Decimal(repr(multiplier))
        return {symbol: self.price(symbol) for symbol in self._latent}

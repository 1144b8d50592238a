"""GBM mark prices: seeded, per-symbol independent, on the tick grid."""

from __future__ import annotations

import itertools
import math
import statistics
from decimal import Decimal

import pytest

from engine.venues.sim.prices import SECONDS_PER_YEAR, GbmWalk
from engine.venues.sim.universe import UNIVERSE


def walk(seed: int, symbols: list[str], volatility: float = 2.0) -> GbmWalk:
    return GbmWalk(
        seed=seed,
        initial_prices={s: UNIVERSE[s].initial_price for s in symbols},
        tick_sizes={s: UNIVERSE[s].market.tick_size for s in symbols},
        volatility=dict.fromkeys(symbols, volatility),
    )


def path(w: GbmWalk, symbol: str, steps: int, dt: float = 1.0) -> list[Decimal]:
    return [w.step(dt)[symbol] for _ in range(steps)]


def test_same_seed_same_prices_and_another_seed_other_prices() -> None:
    first = path(walk(1, ["BTCUSDT", "SFPUSDT"]), "SFPUSDT", 200, dt=60.0)
    again = path(walk(1, ["BTCUSDT", "SFPUSDT"]), "SFPUSDT", 200, dt=60.0)
    other = path(walk(2, ["BTCUSDT", "SFPUSDT"]), "SFPUSDT", 200, dt=60.0)

    assert first == again
    assert first != other


def test_a_symbols_path_does_not_depend_on_which_other_symbols_are_listed() -> None:
    alone = path(walk(5, ["SUIUSDT"]), "SUIUSDT", 100, dt=60.0)
    crowded = path(walk(5, ["BTCUSDT", "SUIUSDT", "XCNUSDT"]), "SUIUSDT", 100, dt=60.0)
    assert alone == crowded


@pytest.mark.parametrize("symbol", ["BTCUSDT", "XCNUSDT", "1000RATSUSDT", "PIPPINUSDT"])
def test_marks_stay_positive_on_the_tick_and_cheap_coins_still_move(symbol: str) -> None:
    tick = UNIVERSE[symbol].market.tick_size
    marks = path(walk(3, [symbol], volatility=1.0), symbol, 3600)

    assert all(mark > 0 and mark % tick == 0 for mark in marks)
    assert len(set(marks)) > 1


def test_zero_volatility_keeps_prices_still() -> None:
    w = walk(3, ["ETHUSDT"], volatility=0.0)
    assert set(path(w, "ETHUSDT", 50)) == {UNIVERSE["ETHUSDT"].initial_price}


def test_log_returns_have_the_configured_volatility() -> None:
    sigma, dt = 3.0, 3600.0
    w = walk(11, ["BTCUSDT"], volatility=sigma)
    marks = [float(m) for m in path(w, "BTCUSDT", 2000, dt=dt)]
    returns = [math.log(b / a) for a, b in itertools.pairwise(marks)]

    expected = sigma * math.sqrt(dt / SECONDS_PER_YEAR)
    assert statistics.stdev(returns) == pytest.approx(expected, rel=0.1)


def test_set_price_moves_the_walk_which_continues_from_there() -> None:
    w = walk(3, ["SFPUSDT"], volatility=0.0)
    w.set_price("SFPUSDT", Decimal("0.3333"))
    assert w.step(1.0)["SFPUSDT"] == Decimal("0.3333")
    with pytest.raises(ValueError, match="positive"):
        w.set_price("SFPUSDT", Decimal(0))

"""F7 (wrong numbers), the pure part: the stop-loss and activation prices a guard computes from the fill.

The old bot computed a LONG stop with the SHORT formula and mixed floats into Decimal arithmetic. These
properties pin the formulas down for any tick size, fill and percent: Decimal in, Decimal out, on tick,
on the protective side of the entry (long below / short above for the stop, the opposite for activation),
never closer than asked and never more than one tick further, and long and short mirror each other to
within one tick.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.exchange.port import Market, PositionSide
from engine.venues.sim.core import MAINTENANCE_MARGIN_RATE, liquidation_price
from engine.venues.sim.universe import UNIVERSE
from protection.manager import activation_price, stop_beyond, stop_inside_liquidation, stop_loss_price

TICKS = [Decimal(t) for t in ("0.00001", "0.0001", "0.001", "0.01", "0.10", "0.5", "1")]


def market(tick: Decimal) -> Market:
    return Market(
        symbol="TESTUSDT",
        base_asset="TEST",
        quote_asset="USDT",
        tick_size=tick,
        step_size=Decimal(1),
        min_quantity=Decimal(1),
        min_notional=Decimal(5),
        max_leverage=20,
    )


@st.composite
def fills(draw: st.DrawFn) -> tuple[Market, Decimal]:
    """A market and a fill price on its tick (a venue fill always is), from 1 tick to 10^7 ticks."""
    tick = draw(st.sampled_from(TICKS))
    ticks = draw(st.integers(min_value=1, max_value=10_000_000))
    return market(tick), ticks * tick


# The configuration's ranges: stop_loss_percent 0.1..50, activation_percent 0..100 (two decimals).
stop_percents = st.integers(min_value=10, max_value=5000).map(lambda n: Decimal(n) / 100)
activation_percents = st.integers(min_value=0, max_value=10_000).map(lambda n: Decimal(n) / 100)


def on_tick(price: Decimal, m: Market) -> bool:
    return price % m.tick_size == 0


@settings(max_examples=300, deadline=None)
@given(fill=fills(), percent=stop_percents)
def test_stop_loss_is_on_tick_on_the_losing_side_and_never_closer_than_asked(
    fill: tuple[Market, Decimal], percent: Decimal
) -> None:
    m, entry = fill
    distance = entry * percent / 100
    long_stop = stop_loss_price(PositionSide.LONG, entry, percent, m)
    short_stop = stop_loss_price(PositionSide.SHORT, entry, percent, m)
    for stop in (long_stop, short_stop):
        assert isinstance(stop, Decimal)
        assert on_tick(stop, m)
    # A long's stop sits below the entry, a short's above: never the other formula.
    assert long_stop < entry < short_stop
    # At least the asked distance away, and less than one tick more than that.
    assert entry - distance - m.tick_size < long_stop <= entry - distance
    assert entry + distance <= short_stop < entry + distance + m.tick_size


@settings(max_examples=300, deadline=None)
@given(fill=fills(), percent=activation_percents)
def test_activation_is_on_tick_on_the_winning_side_and_never_closer_than_asked(
    fill: tuple[Market, Decimal], percent: Decimal
) -> None:
    m, entry = fill
    distance = entry * percent / 100
    long_activation = activation_price(PositionSide.LONG, entry, percent, m)
    short_activation = activation_price(PositionSide.SHORT, entry, percent, m)
    for activation in (long_activation, short_activation):
        assert isinstance(activation, Decimal)
        assert on_tick(activation, m)
    assert short_activation <= entry <= long_activation
    if percent > 0:
        assert long_activation > entry
    assert entry + distance <= long_activation < entry + distance + m.tick_size
    assert entry - distance - m.tick_size < short_activation <= entry - distance


@settings(max_examples=300, deadline=None)
@given(fill=fills(), stop=stop_percents, activation=activation_percents)
def test_long_and_short_mirror_each_other_within_one_tick(
    fill: tuple[Market, Decimal], stop: Decimal, activation: Decimal
) -> None:
    m, entry = fill
    long_stop_gap = entry - stop_loss_price(PositionSide.LONG, entry, stop, m)
    short_stop_gap = stop_loss_price(PositionSide.SHORT, entry, stop, m) - entry
    assert abs(long_stop_gap - short_stop_gap) < m.tick_size
    long_activation_gap = activation_price(PositionSide.LONG, entry, activation, m) - entry
    short_activation_gap = entry - activation_price(PositionSide.SHORT, entry, activation, m)
    assert abs(long_activation_gap - short_activation_gap) < m.tick_size
    # A long's stop is computed like a short's activation (both below the entry, rounded down), and a
    # short's stop like a long's activation: the sides cannot be swapped without the price moving.
    assert stop_loss_price(PositionSide.LONG, entry, stop, m) == activation_price(
        PositionSide.SHORT, entry, stop, m
    )
    assert stop_loss_price(PositionSide.SHORT, entry, stop, m) == activation_price(
        PositionSide.LONG, entry, stop, m
    )


@settings(max_examples=200, deadline=None)
@given(fill=fills(), percent=stop_percents)
def test_a_worse_fill_moves_the_stop_with_it(fill: tuple[Market, Decimal], percent: Decimal) -> None:
    """The stop follows the fill: a long filled higher gets a stop no lower, a short filled lower a stop
    no higher (so a stop computed from the signal's price instead of the fill would be wrong)."""
    m, entry = fill
    worse = entry + m.tick_size * 10
    assert stop_loss_price(PositionSide.LONG, worse, percent, m) >= stop_loss_price(
        PositionSide.LONG, entry, percent, m
    )
    if entry - m.tick_size * 10 > 0:
        lower = entry - m.tick_size * 10
        assert stop_loss_price(PositionSide.SHORT, lower, percent, m) <= stop_loss_price(
            PositionSide.SHORT, entry, percent, m
        )


@pytest.mark.parametrize("symbol", sorted(UNIVERSE))
def test_every_listed_market_gives_on_tick_stops_at_the_default_percents(symbol: str) -> None:
    listing = UNIVERSE[symbol]
    m, entry = listing.market, listing.initial_price
    for side in PositionSide:
        for price in (
            stop_loss_price(side, entry, Decimal(3), m),
            activation_price(side, entry, Decimal("1.5"), m),
        ):
            assert isinstance(price, Decimal)
            assert price > 0
            assert on_tick(price, m)


def test_float_prices_are_refused_not_silently_mixed() -> None:
    """The old bot's float/Decimal TypeErrors came from mixing them deep inside; here a float fill is
    refused at once, loudly, rather than producing a slightly-off stop."""
    m = market(Decimal("0.0001"))
    with pytest.raises(TypeError):
        stop_loss_price(PositionSide.LONG, 0.45, Decimal(3), m)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        activation_price(PositionSide.SHORT, 0.45, Decimal("1.5"), m)  # type: ignore[arg-type]


# --- liquidation: the sim's stated price, and the hard stop kept inside it ---------------------------------

leverages = st.integers(min_value=1, max_value=125)


@settings(max_examples=300, deadline=None)
@given(fill=fills(), leverage=leverages, side=st.sampled_from(list(PositionSide)))
def test_a_stop_kept_inside_liquidation_is_on_tick_between_it_and_the_entry_and_fires_first(
    fill: tuple[Market, Decimal], leverage: int, side: PositionSide
) -> None:
    """Where the venue states a liquidation price on the losing side of the entry, the hard stop kept
    inside it lies strictly inside it and not past the entry, on tick, and a stop further out is
    `stop_beyond` it; one nearer the entry is not."""
    m, entry = fill
    liquidation = liquidation_price(m, side is PositionSide.LONG, entry, leverage, MAINTENANCE_MARGIN_RATE)
    if liquidation is None:
        assert side is PositionSide.LONG  # only a long at 1x has none above 0
        assert leverage == 1
        return
    assert on_tick(liquidation, m)
    limit = stop_inside_liquidation(side, entry, liquidation, m)
    if liquidation == entry:  # (the figure a tick from an entry a few ticks above 0, rounded onto it)
        assert limit is None
        return
    assert limit is not None
    assert on_tick(limit, m)
    # Strictly inside the liquidation price; rounded towards the entry, it may land on the entry where the
    # two are a few ticks apart (a price a few ticks above 0), never past it.
    if side is PositionSide.LONG:
        assert liquidation < limit <= entry
    else:
        assert entry <= limit < liquidation
    beyond = liquidation - m.tick_size if side is PositionSide.LONG else liquidation + m.tick_size
    assert stop_beyond(side, beyond, limit)
    assert not stop_beyond(side, limit, limit)
    assert not stop_beyond(side, entry, limit)


def test_the_sims_liquidation_price_is_isolated_margins_rounded_towards_the_entry() -> None:
    """Worked by hand: entry 100, maintenance 0.5 %: a long at 10x 100 × 0.9 / 0.995 = 90.452… → 90.46, at
    50x 98.492… → 98.50; a short at 50x 100 × 1.02 / 1.005 = 101.492… → 101.49; a long at 1x none. The
    stop kept inside: a fifth of the way back (98.50 + 0.30 = 98.80; 101.49 − 0.298 → 101.19)."""
    m = market(Decimal("0.01"))
    rate = MAINTENANCE_MARGIN_RATE
    assert liquidation_price(m, True, Decimal(100), 10, rate) == Decimal("90.46")
    assert liquidation_price(m, True, Decimal(100), 50, rate) == Decimal("98.50")
    assert liquidation_price(m, False, Decimal(100), 50, rate) == Decimal("101.49")
    assert liquidation_price(m, True, Decimal(100), 1, rate) is None
    assert stop_inside_liquidation(PositionSide.LONG, Decimal(100), Decimal("98.50"), m) == Decimal("98.80")
    assert stop_inside_liquidation(PositionSide.SHORT, Decimal(100), Decimal("101.49"), m) == Decimal(
        "101.19"
    )
    # A figure on the winning side of the entry (a glitch, or cross margin's) moves nothing.
    assert stop_inside_liquidation(PositionSide.LONG, Decimal(100), Decimal(101), m) is None
    assert stop_inside_liquidation(PositionSide.SHORT, Decimal(100), Decimal(99), m) is None

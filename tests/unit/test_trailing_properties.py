"""Property tests for the venue's trailing-stop semantics (pure state, and the core against a reference)."""

from __future__ import annotations

import itertools
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.exchange import OrderSide, OrderStatus
from engine.venues.sim.core import SimCore
from engine.venues.sim.settings import SimVenueSettings
from engine.venues.sim.trailing import TrailingStopState
from engine.venues.sim.universe import select_listings

TICK = Decimal("0.0001")
BASE = 5000  # ticks: 0.5000
callbacks = st.sampled_from([Decimal(c) for c in ("0.1", "0.5", "1", "2.5", "5", "10")])
paths = st.lists(st.integers(min_value=1, max_value=2 * BASE), min_size=1, max_size=40)
activations = st.integers(min_value=1, max_value=2 * BASE)


def prices(ticks: list[int]) -> list[Decimal]:
    return [t * TICK for t in ticks]


def replay(state: TrailingStopState, marks: list[Decimal]) -> list[tuple[TrailingStopState, bool]]:
    out = []
    for mark in marks:
        state = state.observe(mark)
        out.append((state, state.triggers_at(mark)))
    return out


@settings(deadline=None, max_examples=150)
@given(path=paths, activation=activations, callback=callbacks, side=st.sampled_from(list(OrderSide)))
def test_never_triggers_before_activation(
    path: list[int], activation: int, callback: Decimal, side: OrderSide
) -> None:
    marks = prices(path)
    a = activation * TICK
    reached = [(m >= a) if side is OrderSide.SELL else (m <= a) for m in marks]

    for index, (state, fired) in enumerate(replay(TrailingStopState(side, callback, a), marks)):
        if not any(reached[: index + 1]):
            assert not state.armed
            assert not fired
            assert state.trigger_level is None


@settings(deadline=None, max_examples=150)
@given(path=paths, activation=activations, callback=callbacks, side=st.sampled_from(list(OrderSide)))
def test_trigger_level_only_moves_in_the_positions_favour(
    path: list[int], activation: int, callback: Decimal, side: OrderSide
) -> None:
    levels = [
        s.trigger_level for s, _ in replay(TrailingStopState(side, callback, activation * TICK), prices(path))
    ]
    armed = [level for level in levels if level is not None]

    for earlier, later in itertools.pairwise(armed):
        assert later >= earlier if side is OrderSide.SELL else later <= earlier


@settings(deadline=None, max_examples=150)
@given(path=paths, activation=st.integers(min_value=BASE // 2, max_value=BASE * 3 // 2), callback=callbacks)
def test_long_and_short_mirror_each_other(path: list[int], activation: int, callback: Decimal) -> None:
    """Reflect the path around the activation price: the BUY stop arms exactly when the SELL stop does,
    tracks the reflected extreme, and keeps its trigger level the same distance beyond that extreme."""
    a = activation * TICK
    marks = prices(path)
    mirrored = [2 * a - m for m in marks]

    sells = replay(TrailingStopState(OrderSide.SELL, callback, a), marks)
    buys = replay(TrailingStopState(OrderSide.BUY, callback, a), mirrored)

    for (sell, _), (buy, _) in zip(sells, buys, strict=True):
        assert sell.armed == buy.armed
        if sell.armed:
            assert sell.extreme is not None
            assert buy.extreme is not None
            assert buy.extreme == 2 * a - sell.extreme
            sell_gap = sell.extreme - sell.trigger_level  # type: ignore[operator]
            buy_gap = buy.trigger_level - buy.extreme  # type: ignore[operator]
            assert sell_gap == sell.extreme * callback / 100
            assert buy_gap == buy.extreme * callback / 100


def reference_fill_index(
    side: OrderSide, activation: Decimal, callback: Decimal, marks: list[Decimal]
) -> int | None:
    """Binance's rule written out plainly: SELL arms at mark >= activation, fires at mark <= highest × (1 − c)."""
    extreme: Decimal | None = None
    for index, mark in enumerate(marks):
        if side is OrderSide.SELL:
            if extreme is None and mark >= activation:
                extreme = mark
            if extreme is not None:
                extreme = max(extreme, mark)
                if mark <= extreme * (1 - callback / 100):
                    return index
        else:
            if extreme is None and mark <= activation:
                extreme = mark
            if extreme is not None:
                extreme = min(extreme, mark)
                if mark >= extreme * (1 + callback / 100):
                    return index
    return None


@settings(deadline=None, max_examples=100)
@given(
    path=st.lists(st.integers(min_value=BASE // 2, max_value=BASE * 2), min_size=1, max_size=30),
    offset=st.integers(min_value=1, max_value=BASE // 2),
    callback=callbacks,
    side=st.sampled_from(list(OrderSide)),
)
def test_the_core_fills_exactly_where_the_reference_rule_says(
    path: list[int], offset: int, callback: Decimal, side: OrderSide
) -> None:
    core = SimCore(select_listings(["SFPUSDT"]), SimVenueSettings(slippage_bps=Decimal(0)), now=0.0)
    start = BASE * TICK
    core.set_mark("SFPUSDT", start, 0.0)
    entry = OrderSide.BUY if side is OrderSide.SELL else OrderSide.SELL
    core.place_market_order("SFPUSDT", entry, Decimal(100), "in", 0.0)
    activation = (BASE + offset if side is OrderSide.SELL else BASE - offset) * TICK
    # buys see the path mirrored downwards, so both sides meet comparable moves
    marks = prices(path) if side is OrderSide.SELL else [max(TICK, 2 * start - m) for m in prices(path)]
    core.place_trailing_stop_order(
        "SFPUSDT", side, Decimal(100), callback, "ts", 0.0, activation_price=activation
    )

    filled_at = None
    for index, mark in enumerate(marks):
        core.set_mark("SFPUSDT", mark, float(index + 1))
        if core.get_order("SFPUSDT", "ts", 0.0).status is OrderStatus.FILLED:
            filled_at = index
            break

    assert filled_at == reference_fill_index(side, activation, callback, marks)

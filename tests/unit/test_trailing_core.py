"""The pure managed trailing-stop core: examples for each rule, then hypothesis properties over arbitrary
price paths, shell outcomes (confirm / fail / still in flight) and timings, for both sides."""

from __future__ import annotations

import decimal
import itertools
from dataclasses import dataclass
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.exchange.port import PositionSide
from protection.trailing import (
    HOLD,
    InvalidTrailingParams,
    InvalidTrailingState,
    MoveReason,
    MoveStop,
    PlaceStop,
    TrailingDecision,
    TrailingParams,
    TrailingPhase,
    TrailingState,
    UnexpectedTrailingEvent,
    on_mark,
    on_stop_confirmed,
    on_stop_failed,
    on_stop_triggered,
    on_trailing_stopped,
)

LONG, SHORT = PositionSide.LONG, PositionSide.SHORT


def make_params(side: PositionSide = LONG, **overrides: object) -> TrailingParams:
    values: dict[str, object] = {
        "side": side,
        "entry_price": Decimal("100.00"),
        "activation_percent": Decimal("1.5"),
        "callback_percent": Decimal("0.5"),
        "tick_size": Decimal("0.01"),
        "min_move_interval_seconds": Decimal("1"),
        "min_improvement_percent": Decimal("0.1"),
        "emergency_move_percent": Decimal("1"),
    }
    values.update(overrides)
    return TrailingParams(**values)  # type: ignore[arg-type]


def active_state(
    side: PositionSide, peak: str, stop: str, at: float = 0.0, **overrides: object
) -> TrailingState:
    """A trail that activated at `peak` and whose first stop the exchange confirmed at `stop`."""
    state, decision = on_mark(TrailingState.start(make_params(side, **overrides)), Decimal(peak), at)
    assert isinstance(decision, PlaceStop)
    return on_stop_confirmed(state, Decimal(stop), at)


# ------------------------------------------------------------------------------------------------ params


def test_activation_price_is_on_tick_and_rounded_into_profit() -> None:
    assert make_params(
        LONG, entry_price=Decimal("100.003"), tick_size=Decimal("0.01")
    ).activation_price == Decimal("101.51")  # 101.503045 rounded up
    assert make_params(
        SHORT, entry_price=Decimal("100.003"), tick_size=Decimal("0.01")
    ).activation_price == Decimal("98.50")  # 98.502955 rounded down


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"callback_percent": Decimal("0")}, "callback_percent"),
        ({"callback_percent": Decimal("10.01")}, "callback_percent"),
        ({"callback_percent": 0.5}, "must be a Decimal"),
        ({"entry_price": 100.0}, "must be a Decimal"),
        ({"entry_price": Decimal("NaN")}, "finite"),
        ({"entry_price": Decimal("0")}, "entry_price"),
        ({"tick_size": Decimal("0")}, "tick_size"),
        ({"activation_percent": Decimal("-1")}, "activation_percent"),
        ({"min_move_interval_seconds": Decimal("-1")}, "min_move_interval_seconds"),
        ({"side": "long"}, "PositionSide"),
    ],
)
def test_params_refuse_values_that_would_make_a_wrong_stop(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidTrailingParams, match=message):
        make_params(**overrides)


# ------------------------------------------------------------------------------------------------- armed


def test_armed_holds_below_activation_without_allocating() -> None:
    state = TrailingState.start(make_params(LONG))
    new_state, decision = on_mark(state, Decimal("101.49"), 1.0)
    assert new_state is state
    assert decision is HOLD


def test_long_activation_places_the_first_stop_rounded_down() -> None:
    state, decision = on_mark(TrailingState.start(make_params(LONG)), Decimal("101.55"), 1.0)
    # 101.55 × 0.995 = 101.04225 → down to 101.04, away from the mark.
    assert decision == PlaceStop(Decimal("101.04"))
    assert (state.phase, state.peak_price, state.stop_price) == (
        TrailingPhase.MOVING,
        Decimal("101.55"),
        None,
    )


def test_short_activation_places_the_first_stop_rounded_up() -> None:
    state, decision = on_mark(TrailingState.start(make_params(SHORT)), Decimal("98.45"), 1.0)
    # 98.45 × 1.005 = 98.94225 → up to 98.95, away from the mark.
    assert decision == PlaceStop(Decimal("98.95"))
    assert (state.phase, state.peak_price) == (TrailingPhase.MOVING, Decimal("98.45"))


def test_short_does_not_activate_on_a_rise() -> None:
    state = TrailingState.start(make_params(SHORT))
    assert on_mark(state, Decimal("150"), 1.0) == (state, HOLD)


# ------------------------------------------------------------------------------------------------ active


def test_long_moves_when_the_trail_improves_enough_after_the_interval() -> None:
    state = active_state(LONG, peak="101.50", stop="100.99", at=10.0)
    state, decision = on_mark(state, Decimal("102.00"), 11.0)
    assert decision == MoveStop(Decimal("101.49"), Decimal("100.99"), MoveReason.TRAIL)
    assert state.phase is TrailingPhase.MOVING
    assert state.stop_price == Decimal("100.99")  # nothing changes until the exchange confirms (F4)


def test_short_moves_down_when_the_trail_improves_enough_after_the_interval() -> None:
    state = active_state(SHORT, peak="98.50", stop="99.00", at=10.0)  # 98.9925 rounded up
    _, decision = on_mark(state, Decimal("98.00"), 11.0)
    assert decision == MoveStop(Decimal("98.49"), Decimal("99.00"), MoveReason.TRAIL)


def test_a_move_waits_for_the_interval_and_then_happens_without_a_new_peak() -> None:
    state = active_state(LONG, peak="101.50", stop="100.99", at=10.0)
    state, decision = on_mark(state, Decimal("102.00"), 10.5)
    assert decision is HOLD
    held = state
    state, decision = on_mark(held, Decimal("101.90"), 10.9)
    assert (state, decision) == (held, HOLD)
    _, decision = on_mark(held, Decimal("101.90"), 11.0)
    assert decision == MoveStop(Decimal("101.49"), Decimal("100.99"), MoveReason.TRAIL)


def test_an_improvement_below_the_minimum_holds() -> None:
    state = active_state(LONG, peak="101.50", stop="100.99", at=10.0)
    # trail 101.09 is only 0.099 % above 100.99.
    _, decision = on_mark(state, Decimal("101.60"), 20.0)
    assert decision is HOLD


def test_emergency_moves_at_once_regardless_of_the_interval() -> None:
    state = active_state(LONG, peak="101.50", stop="100.99", at=10.0)
    # trail 103.48 lags by 2.5 % > 1 %: move although only 0.1 s passed.
    _, decision = on_mark(state, Decimal("104.00"), 10.1)
    assert decision == MoveStop(Decimal("103.48"), Decimal("100.99"), MoveReason.EMERGENCY)


def test_short_emergency_moves_at_once() -> None:
    state = active_state(SHORT, peak="98.50", stop="99.00", at=10.0)
    _, decision = on_mark(state, Decimal("96.00"), 10.1)
    assert decision == MoveStop(Decimal("96.48"), Decimal("99.00"), MoveReason.EMERGENCY)


def test_no_stop_at_or_through_the_mark_after_a_pullback() -> None:
    state = active_state(LONG, peak="101.50", stop="100.99", at=10.0)
    state, decision = on_mark(state, Decimal("102.40"), 10.5)  # trail 101.88, waits for the interval
    assert decision is HOLD
    # The mark fell back onto the trail: a stop there would trigger at once (F8). Hold.
    state, decision = on_mark(state, Decimal("101.88"), 12.0)
    assert decision is HOLD
    _, decision = on_mark(state, Decimal("101.89"), 12.0)
    assert decision == MoveStop(Decimal("101.88"), Decimal("100.99"), MoveReason.TRAIL)


def test_active_without_a_new_peak_returns_the_same_state() -> None:
    state = active_state(LONG, peak="101.50", stop="100.99", at=10.0)
    new_state, decision = on_mark(state, Decimal("101.20"), 30.0)
    assert new_state is state
    assert decision is HOLD


# ------------------------------------------------------------------------------------- moving / outcomes


def test_moving_tracks_the_peak_but_holds() -> None:
    state, _ = on_mark(TrailingState.start(make_params(LONG)), Decimal("101.50"), 1.0)
    state, decision = on_mark(state, Decimal("110.00"), 100.0)
    assert decision is HOLD
    assert (state.phase, state.peak_price) == (TrailingPhase.MOVING, Decimal("110.00"))
    same, decision = on_mark(state, Decimal("109.00"), 101.0)
    assert (same, decision) == (state, HOLD)
    assert same is state


def test_confirm_makes_the_stop_active_and_counts_it() -> None:
    state, _ = on_mark(TrailingState.start(make_params(LONG)), Decimal("101.50"), 1.0)
    state = on_stop_confirmed(state, Decimal("100.99"), 1.25)
    assert (state.phase, state.stop_price, state.last_move_at, state.update_count) == (
        TrailingPhase.ACTIVE,
        Decimal("100.99"),
        1.25,
        1,
    )


def test_failed_first_stop_goes_back_to_armed_keeping_the_peak_and_retries() -> None:
    state, _ = on_mark(TrailingState.start(make_params(LONG)), Decimal("102.00"), 1.0)
    state = on_stop_failed(state)
    assert (state.phase, state.peak_price, state.stop_price) == (TrailingPhase.ARMED, Decimal("102.00"), None)
    _, decision = on_mark(state, Decimal("101.80"), 2.0)
    assert decision == PlaceStop(Decimal("101.49"))  # still trails the best mark seen, 102.00


def test_failed_move_goes_back_to_active_with_the_old_stop_and_retries() -> None:
    state = active_state(LONG, peak="101.50", stop="100.99", at=10.0)
    state, _ = on_mark(state, Decimal("102.00"), 11.0)
    state = on_stop_failed(state)
    assert (state.phase, state.stop_price, state.update_count) == (TrailingPhase.ACTIVE, Decimal("100.99"), 1)
    _, decision = on_mark(state, Decimal("101.95"), 11.1)
    assert decision == MoveStop(Decimal("101.49"), Decimal("100.99"), MoveReason.TRAIL)


def test_outcomes_without_anything_in_flight_are_refused() -> None:
    state = active_state(LONG, peak="101.50", stop="100.99")
    with pytest.raises(UnexpectedTrailingEvent):
        on_stop_confirmed(state, Decimal("101.00"), 1.0)
    with pytest.raises(UnexpectedTrailingEvent):
        on_stop_failed(state)


def test_a_confirmed_stop_that_decreases_protection_is_refused() -> None:
    state = active_state(LONG, peak="101.50", stop="100.99", at=10.0)
    state, _ = on_mark(state, Decimal("102.00"), 11.0)
    with pytest.raises(InvalidTrailingState, match="only moves in the position's favour"):
        on_stop_confirmed(state, Decimal("100.99"), 11.2)  # the old stop again: no improvement
    with pytest.raises(InvalidTrailingState, match="cannot be a long trailing stop"):
        on_stop_confirmed(state, Decimal("100.98"), 11.2)  # looser than any trail could be


def test_terminal_phases_ignore_marks() -> None:
    state = on_stop_triggered(active_state(LONG, peak="101.50", stop="100.99"))
    assert state.phase is TrailingPhase.TRIGGERED
    assert on_mark(state, Decimal("200"), 1.0) == (state, HOLD)
    assert on_stop_triggered(state) is state
    with pytest.raises(UnexpectedTrailingEvent):
        on_trailing_stopped(state)
    assert on_trailing_stopped(TrailingState.start(make_params())).phase is TrailingPhase.STOPPED


def test_the_callers_decimal_context_cannot_change_a_stop() -> None:
    with decimal.localcontext() as context:
        context.prec = 3
        context.rounding = decimal.ROUND_UP
        _, decision = on_mark(TrailingState.start(make_params(LONG)), Decimal("101.55"), 1.0)
    assert decision == PlaceStop(Decimal("101.04"))


# ------------------------------------------------------------------------------------------------ restore


def restore(params: TrailingParams | None = None, **overrides: object) -> TrailingState:
    fields: dict[str, object] = {
        "phase": "active",
        "activation_price": Decimal("101.50"),
        "peak_price": Decimal("102.00"),
        "stop_price": Decimal("101.20"),
        "last_move_at": 1_700_000_000.0,
        "update_count": 3,
    }
    fields.update(overrides)
    return TrailingState.restore(params=params or make_params(LONG), **fields)  # type: ignore[arg-type]


def test_restore_rebuilds_a_working_state() -> None:
    state = restore()
    assert (state.phase, state.trail_price, state.wanted_move) == (
        TrailingPhase.ACTIVE,
        Decimal("101.49"),
        MoveReason.TRAIL,
    )
    _, decision = on_mark(state, Decimal("101.90"), 1_700_000_100.0)
    assert decision == MoveStop(Decimal("101.49"), Decimal("101.20"), MoveReason.TRAIL)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"phase": "ACTIVE"}, "legacy phase 'ACTIVE'"),
        ({"phase": "Armed"}, "legacy phase"),
        ({"phase": "open"}, "unknown phase 'open'"),
        ({"activation_price": Decimal("101.49")}, "does not match"),
        (
            {"stop_price": Decimal("102.70")},
            "cannot be a long trailing stop",
        ),  # a short's stop, above the peak
        (
            {"stop_price": Decimal("99.00")},
            "cannot be a long trailing stop",
        ),  # looser than any trail could be
        ({"stop_price": Decimal("101.205")}, "tick grid"),
        ({"stop_price": 101.2}, "positive finite Decimal"),
        ({"peak_price": Decimal("101.00")}, "has not reached"),
        ({"peak_price": None}, "without a peak_price"),
        ({"stop_price": None}, "'active' without a stop_price"),
        ({"phase": "armed"}, "armed means no trailing stop"),
        ({"update_count": -1}, "update_count"),
        ({"update_count": 0}, "update_count 0"),
        ({"last_move_at": float("nan")}, "last_move_at"),
    ],
)
def test_restore_refuses_what_the_state_machine_could_not_have_produced(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidTrailingState, match=message):
        restore(**overrides)


def test_restore_refuses_callback_zero() -> None:
    with pytest.raises(InvalidTrailingParams, match="callback_percent"):
        restore(make_params(LONG, callback_percent=Decimal("0")))


def test_restore_refuses_a_long_row_for_a_short_position() -> None:
    with pytest.raises(InvalidTrailingState):
        restore(make_params(SHORT))  # activation 98.50 ≠ 101.50, and the stop is on the long side


# ------------------------------------------------------------------------------------ property: the driver

TICKS = [Decimal("0.01"), Decimal("0.1"), Decimal("0.0001"), Decimal("0.5")]


@dataclass(frozen=True)
class Step:
    move_basis_points: int  # the mark moves this much of the entry price (rounded to ticks)
    elapsed_tenths: int  # venue time passes by this many tenths of a second
    shell_outcome: str  # what the shell reports before this mark if something is in flight


@dataclass(frozen=True)
class Scenario:
    entry_ticks: int
    tick_size: Decimal
    callback_percent: Decimal
    activation_percent: Decimal
    min_move_interval_seconds: Decimal
    min_improvement_percent: Decimal
    emergency_move_percent: Decimal
    steps: tuple[Step, ...]

    def params(self, side: PositionSide) -> TrailingParams:
        return TrailingParams(
            side=side,
            entry_price=self.tick_size * self.entry_ticks,
            activation_percent=self.activation_percent,
            callback_percent=self.callback_percent,
            tick_size=self.tick_size,
            min_move_interval_seconds=self.min_move_interval_seconds,
            min_improvement_percent=self.min_improvement_percent,
            emergency_move_percent=self.emergency_move_percent,
        )

    def mark_ticks(self) -> list[int]:
        """The path in whole ticks, kept within (0, 2·entry) so its reflection is a price too."""
        ticks, path = self.entry_ticks, []
        for step in self.steps:
            ticks += self.entry_ticks * step.move_basis_points // 10_000
            ticks = min(max(ticks, 1), 2 * self.entry_ticks - 1)
            path.append(ticks)
        return path


def decimals(*values: str) -> st.SearchStrategy[Decimal]:
    return st.sampled_from([Decimal(value) for value in values])


scenarios = st.builds(
    Scenario,
    entry_ticks=st.integers(2_000, 200_000),
    tick_size=st.sampled_from(TICKS),
    callback_percent=decimals("0.1", "0.3", "0.5", "1", "2.5", "10"),
    activation_percent=decimals("0", "0.5", "1.5", "3"),
    min_move_interval_seconds=decimals("0", "1", "5"),
    min_improvement_percent=decimals("0", "0.1", "0.5"),
    emergency_move_percent=decimals("0", "0.5", "1", "3"),
    steps=st.lists(
        st.builds(
            Step,
            move_basis_points=st.integers(-150, 150),
            elapsed_tenths=st.integers(0, 20),
            shell_outcome=st.sampled_from(["confirm", "confirm", "fail", "in_flight"]),
        ),
        min_size=1,
        max_size=60,
    ).map(tuple),
)
sides = st.sampled_from([LONG, SHORT])


@dataclass(frozen=True)
class Tick:
    before: TrailingState  # after the shell's report, just before the mark
    mark: Decimal
    at: float
    after: TrailingState
    decision: TrailingDecision


def run(scenario: Scenario, side: PositionSide, mark_ticks: list[int] | None = None) -> list[Tick]:
    """Feed the path through the core, playing a shell that confirms, fails or keeps waiting on whatever
    is in flight, as the scenario says."""
    params = scenario.params(side)
    state = TrailingState.start(params)
    in_flight: Decimal | None = None
    tenths = 0
    trace = []
    for step, ticks in zip(
        scenario.steps, scenario.mark_ticks() if mark_ticks is None else mark_ticks, strict=True
    ):
        tenths += step.elapsed_tenths
        at = 1_700_000_000 + tenths / 10
        if state.phase is TrailingPhase.MOVING and step.shell_outcome == "confirm":
            state, in_flight = on_stop_confirmed(state, in_flight, at), None
        elif state.phase is TrailingPhase.MOVING and step.shell_outcome == "fail":
            state, in_flight = on_stop_failed(state), None
        mark = scenario.tick_size * ticks
        after, decision = on_mark(state, mark, at)
        trace.append(Tick(state, mark, at, after, decision))
        if isinstance(decision, PlaceStop):
            in_flight = decision.stop_price
        elif isinstance(decision, MoveStop):
            in_flight = decision.new_stop_price
        state = after
    return trace


def decided_price(decision: TrailingDecision) -> Decimal | None:
    if isinstance(decision, PlaceStop):
        return decision.stop_price
    if isinstance(decision, MoveStop):
        return decision.new_stop_price
    return None


PROPERTY_SETTINGS = settings(deadline=None, max_examples=200)


# -------------------------------------------------------------------------------------------- properties


@PROPERTY_SETTINGS
@given(scenario=scenarios, side=sides)
def test_no_decision_before_the_mark_reaches_activation(scenario: Scenario, side: PositionSide) -> None:
    params = scenario.params(side)
    reached = False
    for tick in run(scenario, side):
        reached = reached or not params.is_better(params.activation_price, tick.mark)
        if not reached:
            assert tick.decision is HOLD
            assert tick.after.phase is TrailingPhase.ARMED
            assert tick.after.peak_price is None


@PROPERTY_SETTINGS
@given(scenario=scenarios, side=sides)
def test_the_stop_only_moves_in_the_positions_favour(scenario: Scenario, side: PositionSide) -> None:
    params = scenario.params(side)
    trace = run(scenario, side)
    for tick in trace:
        if isinstance(tick.decision, PlaceStop):
            assert tick.before.stop_price is None
        if isinstance(tick.decision, MoveStop):
            assert tick.decision.old_stop_price == tick.before.stop_price
            assert params.is_better(tick.decision.new_stop_price, tick.decision.old_stop_price)

    # A retry after a failure may decide the same price again, never a looser one.
    decided = [price for tick in trace if (price := decided_price(tick.decision)) is not None]
    confirmed = [
        price
        for tick in trace
        for price in (tick.before.stop_price, tick.after.stop_price)
        if price is not None
    ]
    for levels in (decided, confirmed):
        for earlier, later in itertools.pairwise(levels):
            assert not params.is_better(earlier, later), f"{side} stop went from {earlier} to {later}"


@PROPERTY_SETTINGS
@given(scenario=scenarios, side=sides)
def test_no_decision_is_at_or_through_the_mark(scenario: Scenario, side: PositionSide) -> None:
    params = scenario.params(side)
    for tick in run(scenario, side):
        price = decided_price(tick.decision)
        if price is not None:
            assert params.is_better(tick.mark, price), f"{side} stop {price} at/through mark {tick.mark}"
            assert price % params.tick_size == 0


@PROPERTY_SETTINGS
@given(scenario=scenarios, side=sides)
def test_no_decision_while_a_stop_is_in_flight(scenario: Scenario, side: PositionSide) -> None:
    for tick in run(scenario, side):
        if tick.before.phase is TrailingPhase.MOVING:
            assert tick.decision is HOLD
            assert tick.after.phase is TrailingPhase.MOVING
        if tick.decision is not HOLD:
            assert tick.after.phase is TrailingPhase.MOVING


@PROPERTY_SETTINGS
@given(scenario=scenarios, side=sides)
def test_moves_respect_the_interval_unless_the_stop_lags_past_the_emergency(
    scenario: Scenario, side: PositionSide
) -> None:
    params = scenario.params(side)
    emergency = scenario.emergency_move_percent / 100
    for tick in run(scenario, side):
        if not isinstance(tick.decision, MoveStop):
            continue
        old, new = tick.decision.old_stop_price, tick.decision.new_stop_price
        lag = abs(new - old) / old
        if tick.decision.reason is MoveReason.EMERGENCY:
            assert lag > emergency
        else:
            assert lag <= emergency
            assert lag >= scenario.min_improvement_percent / 100
            assert tick.at - tick.before.last_move_at >= params.min_move_interval


@PROPERTY_SETTINGS
@given(scenario=scenarios, side=sides)
def test_a_tick_that_changes_nothing_returns_the_same_state_and_hold(
    scenario: Scenario, side: PositionSide
) -> None:
    for tick in run(scenario, side):
        if tick.decision is HOLD and tick.after.peak_price == tick.before.peak_price:
            assert tick.after is tick.before


@PROPERTY_SETTINGS
@given(scenario=scenarios, side=sides)
def test_every_reachable_state_survives_a_restore(scenario: Scenario, side: PositionSide) -> None:
    params = scenario.params(side)
    for tick in run(scenario, side):
        state = tick.after
        restored = TrailingState.restore(
            phase=state.phase.value,
            activation_price=state.activation_price,
            peak_price=state.peak_price,
            stop_price=state.stop_price,
            last_move_at=state.last_move_at,
            update_count=state.update_count,
            params=params,
        )
        assert restored == state


@PROPERTY_SETTINGS
@given(scenario=scenarios)
def test_long_and_short_mirror_each_other(scenario: Scenario) -> None:
    """The mirror is the reflection about the entry, p ↦ 2·entry − p, with the same parameters.

    It is exact on the tick grid (entry is on it, and reflection turns "round up" into "round down"), so
    activation prices, activation ticks and peaks must mirror exactly. It cannot mirror every later
    decision exactly, and no price mirror can: the trail is a percent of the price, and the reflection
    changes the price level (a long trailing 110 keeps 0.5 % × 110 behind, the short's mirror at 90 keeps
    0.5 % × 90). So after activation the mirror is stated in relative terms: each side's trail sits the
    same callback percent behind its own peak, on its own protective side, up to one tick of rounding away
    from the mark. Together with the side-generic properties above, a LONG using the SHORT formula (F7)
    cannot pass."""
    entry = scenario.tick_size * scenario.entry_ticks
    long_params, short_params = scenario.params(LONG), scenario.params(SHORT)
    assert short_params.activation_price == 2 * entry - long_params.activation_price

    path = scenario.mark_ticks()
    mirrored_path = [2 * scenario.entry_ticks - ticks for ticks in path]
    long_trace = run(scenario, LONG, path)
    short_trace = run(scenario, SHORT, mirrored_path)

    callback = scenario.callback_percent / 100
    tick_size = scenario.tick_size
    first_decision_seen = False
    for long_tick, short_tick in zip(long_trace, short_trace, strict=True):
        assert short_tick.mark == 2 * entry - long_tick.mark
        long_peak, short_peak = long_tick.after.peak_price, short_tick.after.peak_price
        assert (long_peak is None) == (short_peak is None)
        if long_peak is None:
            continue
        assert short_peak == 2 * entry - long_peak

        long_gap = long_peak * (1 - callback) - long_tick.after.trail_price  # rounded down, below the peak
        short_gap = short_tick.after.trail_price - short_peak * (1 + callback)  # rounded up, above the peak
        assert 0 <= long_gap < tick_size
        assert 0 <= short_gap < tick_size

        if not first_decision_seen:
            # Activation is the same tick on both sides, and it always places the first stop there.
            assert type(long_tick.decision) is type(short_tick.decision) is PlaceStop
            first_decision_seen = True

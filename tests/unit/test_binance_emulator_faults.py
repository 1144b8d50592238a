"""The emulator's order traits in the fault grammar: `lag:SECONDS`, `triggering:SECONDS` and `stuck` are
drawn when an algo order is placed and stay with that order."""

from __future__ import annotations

import math

import pytest

from engine.venues.binance_emulator import FaultSpecError, parse_fault_spec
from engine.venues.binance_emulator.faults import (
    EmulatorFaultKind,
    FaultPlan,
    OrderTraits,
    Target,
    parse_fault,
)

PLACE_ALGO = ("POST", "algoOrder")


def test_the_order_traits_parse_with_their_arguments() -> None:
    rules = parse_fault_spec("POST:algoOrder=lag:3@0.5, algoOrder=triggering:5,*=stuck@0.01")

    assert [(r.target, r.fault.kind, r.probability) for r in rules] == [
        (Target("POST", "algoOrder"), EmulatorFaultKind.LAG, 0.5),
        (Target(None, "algoOrder"), EmulatorFaultKind.TRIGGERING, 1.0),
        (Target(None, "*"), EmulatorFaultKind.STUCK, 0.01),
    ]
    assert rules[0].fault.seconds == 3.0
    assert rules[1].fault.seconds == 5.0
    assert parse_fault("lag:0.25").seconds == 0.25
    # A ban's length (the default, 0, means the emulator's 2 s), which a test of a long ban needs.
    assert (parse_fault("ban").seconds, parse_fault("ban:120").seconds) == (0.0, 120.0)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("algoOrder=lag", "lag needs seconds, e.g. lag:3, got 'lag'"),
        ("algoOrder=lag:soon", "lag needs seconds, e.g. lag:3, got 'lag:soon'"),
        ("algoOrder=lag:-1", "lag must be within 0..3600 seconds, got -1"),
        ("algoOrder=lag:nan", "lag must be within 0..3600 seconds, got nan"),
        ("algoOrder=triggering", "triggering needs seconds, e.g. triggering:5, got 'triggering'"),
        ("algoOrder=triggering:90000", "triggering must be within 0..86400 seconds, got 90000"),
        ("algoOrder=stuck:5", "fault 'stuck' takes no argument, got 'stuck:5'"),
        ("positionRisk=lag:3", "lag is drawn when an algo order is placed: target POST:algoOrder"),
        ("GET:algoOrder=stuck", "stuck is drawn when an algo order is placed: target POST:algoOrder"),
        ("POST:order=async:0.5", "async is Bybit's asynchronous order creation"),
        ("*=ban:soon", "ban takes seconds, e.g. ban:120, got 'ban:soon'"),
        ("*=ban:0", "ban must be within 0..259200 seconds (Binance's longest, 3 days), got 0"),
        ("*=ban:300000", "ban must be within 0..259200 seconds"),
    ],
)
def test_bad_order_traits_name_the_bad_part(spec: str, message: str) -> None:
    with pytest.raises(FaultSpecError) as raised:
        parse_fault_spec(spec)
    assert str(raised.value).startswith(message)


def test_traits_are_drawn_for_algo_placements_only_and_never_as_request_faults() -> None:
    plan = FaultPlan(parse_fault_spec("*=lag:3,*=triggering:5,POST:algoOrder=timeout"), seed=1)

    assert plan.draw("GET", "algoOrder") is None
    assert plan.draw("POST", "algoOrder").kind is EmulatorFaultKind.TIMEOUT  # type: ignore[union-attr]
    assert plan.draw_traits("POST", "order").traits == OrderTraits()
    assert plan.draw_traits(*PLACE_ALGO).traits == OrderTraits(read_lag=3.0, trigger_delay=5.0)


def test_stuck_outlasts_any_triggering_delay() -> None:
    plan = FaultPlan(parse_fault_spec("algoOrder=triggering:5,algoOrder=stuck"), seed=1)

    assert plan.draw_traits(*PLACE_ALGO).traits.trigger_delay == math.inf


def test_a_forced_trait_waits_for_an_accepted_algo_placement() -> None:
    plan = FaultPlan(seed=1)
    plan.force((Target("POST", "order"), Target("POST", "algoOrder")), parse_fault("triggering:5"), count=1)

    assert plan.draw("POST", "order") is None  # a regular order neither consumes nor suffers it
    refused = plan.draw_traits(*PLACE_ALGO)
    assert refused.traits.trigger_delay == 5.0  # offered, but the venue refused the order: not used up
    placed = plan.draw_traits(*PLACE_ALGO)
    plan.commit(placed)
    assert placed.traits.trigger_delay == 5.0
    assert plan.draw_traits(*PLACE_ALGO).traits == OrderTraits()

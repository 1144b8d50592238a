"""The Bybit emulator's fault grammar: Binance's request faults on Bybit's endpoints, Binance's algo-order
traits refused, and `async:SECONDS`, Bybit's asynchronous order creation, on `POST order/create` only."""

from __future__ import annotations

import pytest

from engine.venues.binance_emulator.faults import EmulatorFaultKind, FaultSpecError, Target
from engine.venues.bybit_emulator.faults import parse_fault_spec


def test_async_parses_with_its_seconds_on_order_create() -> None:
    rules = parse_fault_spec("POST:order/create=async:0.5@0.2,order/create=async:2,*=async:0.1")

    assert [(r.target, r.fault.kind, r.fault.seconds, r.probability) for r in rules] == [
        (Target("POST", "order/create"), EmulatorFaultKind.ASYNC, 0.5, 0.2),
        (Target(None, "order/create"), EmulatorFaultKind.ASYNC, 2.0, 1.0),
        (Target(None, "*"), EmulatorFaultKind.ASYNC, 0.1, 1.0),
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("order/create=async", "async needs seconds, e.g. async:0.5, got 'async'"),
        ("order/create=async:-1", "async must be within 0..60 seconds, got -1"),
        (
            "GET:order/realtime=async:1",
            "async is drawn when a market order is placed: target POST:order/create",
        ),
        ("position/trading-stop=async:1", "async is drawn when a market order is placed"),
        ("order/create=triggering:2", "triggering is a Binance algo-order trait; Bybit has no such orders"),
    ],
)
def test_bad_async_rules_name_the_bad_part(spec: str, message: str) -> None:
    with pytest.raises(FaultSpecError) as raised:
        parse_fault_spec(spec)
    assert str(raised.value).startswith(message)

"""The Bybit emulator's fault grammar: Binance's request faults on Bybit's endpoints, Binance's algo-order
traits refused, and `async:SECONDS`, Bybit's asynchronous order creation, on `POST order/create` only."""

from __future__ import annotations

import pytest

from engine.venues.binance_emulator.faults import EmulatorFaultKind, FaultSpecError, Target
from engine.venues.binance_emulator.faults import parse_fault_spec as binance_fault_spec
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
        ("POST:order/create=cursor", "cursor is about a paged list: target one of market/instruments-info"),
        ("position/list=cursor:1", "fault 'cursor' takes no argument"),
        ("*=ban:30", "Bybit's 403 ban lasts its 10 minutes (`ban` takes no seconds here)"),
    ],
)
def test_bad_async_rules_name_the_bad_part(spec: str, message: str) -> None:
    with pytest.raises(FaultSpecError) as raised:
        parse_fault_spec(spec)
    assert str(raised.value).startswith(message)


def test_cursor_parses_on_the_paged_lists() -> None:
    rules = parse_fault_spec("GET:position/list=cursor@0.1,order/realtime=cursor,*=cursor")

    assert [(r.target, r.fault.kind, r.probability) for r in rules] == [
        (Target("GET", "position/list"), EmulatorFaultKind.CURSOR, 0.1),
        (Target(None, "order/realtime"), EmulatorFaultKind.CURSOR, 1.0),
        (Target(None, "*"), EmulatorFaultKind.CURSOR, 1.0),
    ]


def test_the_binance_emulator_refuses_bybits_cursor_fault() -> None:
    with pytest.raises(FaultSpecError) as raised:
        binance_fault_spec("positionRisk=cursor")
    assert "Binance's lists are not paged" in str(raised.value)

"""The chaos soak's schedule (bench/chaos_soak.py) misbehaves the way it says it does: its staged faults on a
held symbol's fired stops end with that symbol's position, as its note and its fault counts say."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from engine.clock import ManualClock
from engine.exchange import OrderSide, OrderStatus
from engine.venues.binance_emulator import faults as binance_faults
from engine.venues.bybit_emulator import faults as bybit_faults
from engine.venues.sim import SimVenue
from engine.venues.sim.core import SimCore
from engine.venues.sim.settings import SimVenueSettings
from engine.venues.sim.universe import select_listings

T0 = 6000.0
SFP = "SFPUSDT"
QTY = Decimal("100")
ENTRY, STOP, PAST_THE_STOP = Decimal("0.4500"), Decimal("0.4000"), Decimal("0.3990")


@pytest.fixture
def chaos_soak(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "bench"))  # its sibling modules
    return importlib.import_module("chaos_soak")


def _fired_stop(core: SimCore, n: int, now: float) -> OrderStatus:
    """Open a long on SFP, give it a stop, cross the stop: what the fired stop is at once."""
    core.set_mark(SFP, ENTRY, now)
    core.place_market_order(SFP, OrderSide.BUY, QTY, f"entry-{n}", now)
    core.place_stop_market_order(SFP, OrderSide.SELL, QTY, STOP, f"sl-{n}", now)
    [fired] = core.set_mark(SFP, PAST_THE_STOP, now + 1)
    return fired.status


@pytest.mark.parametrize("fault", ["delay", "stick"])
def test_a_held_symbols_trigger_fault_ends_with_its_position(chaos_soak: ModuleType, fault: str) -> None:
    """The 2 s delay was never lifted: every later position on a symbol it once hit had its stops sit
    TRIGGERING, so the soak staged far more unfilled stops than its 5 % rate and its counts said."""
    core = SimCore(
        select_listings([SFP, "BTCUSDT"]), SimVenueSettings.model_validate({"slippage_bps": 0}), now=T0
    )
    triggers = chaos_soak.HeldSymbolTriggers(SimVenue(core=core, clock=ManualClock()))
    getattr(triggers, fault)(SFP)
    assert _fired_stop(core, 1, T0) is OrderStatus.TRIGGERED
    core.place_market_order(
        SFP, OrderSide.SELL, QTY, "close-1", T0 + 2, reduce_only=True
    )  # the engine's close
    assert not core.inspect(T0 + 2).positions

    triggers.lift_where_gone(held=set())

    assert _fired_stop(core, 2, T0 + 10) is OrderStatus.FILLED
    assert not core.inspect(T0 + 11).positions


def test_a_symbol_already_misbehaving_takes_no_second_delay(chaos_soak: ModuleType) -> None:
    core = SimCore(select_listings([SFP]), SimVenueSettings(), now=T0)
    triggers = chaos_soak.HeldSymbolTriggers(SimVenue(core=core, clock=ManualClock()))
    triggers.stick(SFP)
    assert not triggers.delay(SFP)  # not counted: it would not change what the venue does
    triggers.lift_where_gone(held={SFP})
    assert _fired_stop(core, 1, T0) is OrderStatus.TRIGGERED


def test_a_stuck_trigger_ends_once_its_position_is_gone(chaos_soak: ModuleType) -> None:
    """A stuck order the sim never ended kept its symbol closed to new positions for the rest of a soak
    (the engine waits for a fired stop to end: its fill could close whatever the symbol holds next)."""
    core = SimCore(select_listings([SFP]), SimVenueSettings.model_validate({"slippage_bps": 0}), now=T0)
    clock = ManualClock(start=T0)
    triggers = chaos_soak.HeldSymbolTriggers(SimVenue(core=core, clock=clock))
    triggers.stick(SFP)
    assert _fired_stop(core, 1, T0) is OrderStatus.TRIGGERED
    core.place_market_order(SFP, OrderSide.SELL, QTY, "close-1", T0 + 2, reduce_only=True)

    triggers.lift_where_gone(held=set())

    assert core.get_order(SFP, "sl-1", T0 + 3).status is OrderStatus.EXPIRED


@pytest.mark.parametrize(
    ("venue", "parse"),
    [("emulator", binance_faults.parse_fault_spec), ("bybit-emulator", bybit_faults.parse_fault_spec)],
)
def test_each_emulators_fault_mix_is_one_it_runs_and_split_as_said(
    chaos_soak: ModuleType, venue: str, parse: Callable[[str], tuple[Any, ...]]
) -> None:
    args = chaos_soak.parse_args(["--minutes", "1", "--venue", venue, "--fault-rate", "0.05"])
    rules = parse(chaos_soak.venue_faults(args))  # what `tsbot sim-exchange --faults` would refuse
    on_every_call = [r for r in rules if r.target.endpoint == "*"]
    assert sum(r.probability for r in on_every_call) == pytest.approx(0.05)
    faults = {r.fault.kind.value for r in rules}
    assert ("ban" in faults) is (venue == "emulator")  # Bybit's 403 would ban the run for 10 minutes
    assert chaos_soak.venue_faults(chaos_soak.parse_args(["--minutes", "1"])) is None  # the sim's own

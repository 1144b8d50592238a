"""How the contract suite drives a venue from outside: the port plus a small harness.

The tests talk to a venue only through `ExchangePort` and `VenueHarness`. The harness is what a test can
do that a trading engine cannot: set a mark price, let time pass, force the next call of a kind to fail.
For the sim venue it wraps the venue's control surface and a `ManualClock`; for the Binance-wire emulator
(a later issue) it will speak to the emulator's control endpoint and let real time pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol, TypeVar

from engine.clock import ManualClock
from engine.exchange.port import ExchangePort
from engine.venues.sim import CallKind, FaultKind, SimVenue, SimVenueSettings
from engine.venues.sim.settings import LatencySettings

T = TypeVar("T")


class VenueHarness(Protocol):
    async def set_mark_price(self, symbol: str, price: Decimal) -> None:
        """Make `price` the symbol's mark now; conditional orders see it before this returns."""
        ...

    async def advance(self, seconds: float) -> None:
        """Let `seconds` of venue time pass."""
        ...

    async def drive(self, awaitable: Awaitable[T]) -> T:
        """Await a port call that needs time to pass (latency, timeouts) and return its result."""
        ...

    async def fail_next(self, call: CallKind, fault: FaultKind, count: int = 1) -> None:
        """Make the next `count` calls of kind `call` suffer `fault`."""
        ...


@dataclass(frozen=True, slots=True)
class ContractSubject:
    port: ExchangePort
    harness: VenueHarness


class SimHarness:
    _DRIVE_STEP_SECONDS = 0.25
    _DRIVE_LIMIT_SECONDS = 3600.0

    def __init__(self, venue: SimVenue, clock: ManualClock) -> None:
        self._venue = venue
        self._clock = clock

    async def set_mark_price(self, symbol: str, price: Decimal) -> None:
        self._venue.override_mark_price(symbol, price)

    async def advance(self, seconds: float) -> None:
        await self._clock.advance(seconds)

    async def drive(self, awaitable: Awaitable[T]) -> T:
        task = asyncio.ensure_future(awaitable)
        waited = 0.0
        await self._clock.settle()
        while not task.done():
            if waited >= self._DRIVE_LIMIT_SECONDS:
                task.cancel()
                raise AssertionError(f"call still pending after {waited:.0f}s of venue time")
            await self._clock.advance(self._DRIVE_STEP_SECONDS)
            waited += self._DRIVE_STEP_SECONDS
        return task.result()

    async def fail_next(self, call: CallKind, fault: FaultKind, count: int = 1) -> None:
        self._venue.inject_fault(call, fault, count)


@asynccontextmanager
async def sim_subject() -> AsyncIterator[ContractSubject]:
    """The sim venue as the contract suite sees it: prices still unless a test moves them, no latency, no
    random faults, Binance's default limits."""
    clock = ManualClock()
    settings = SimVenueSettings(seed=7, volatility=0.0, latency=LatencySettings(seconds=0.0))
    venue = SimVenue(settings, clock=clock)
    await venue.connect()
    try:
        yield ContractSubject(port=venue, harness=SimHarness(venue, clock))
    finally:
        await venue.close()

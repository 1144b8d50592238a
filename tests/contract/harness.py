"""How the contract suite drives a venue from outside: the port plus a small harness.

The tests talk to a venue only through `ExchangePort` and `VenueHarness`. The harness is what a test can
do that a trading engine cannot: set a mark price, let time pass, force the next call of a kind to fail.
For the sim venue it wraps the venue's control surface and a `ManualClock`; for the ccxt adapter it speaks
to the Binance-wire emulator's loopback control endpoint, and the adapter speaks real HTTP to the emulator.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol, TypeVar

import aiohttp
import pytest

from engine.clock import ManualClock
from engine.exchange.port import ExchangePort
from engine.venues.binance_emulator import BinanceEmulator, running
from engine.venues.binance_venue import BinanceUsdmVenue
from engine.venues.bybit_emulator import BybitEmulator, BybitLimiter
from engine.venues.bybit_emulator import running as running_bybit
from engine.venues.bybit_venue import BybitLinearVenue
from engine.venues.ccxt_venue import CcxtVenueConfig
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

    async def clear_faults(self) -> None:
        """Forget the faults forced with `fail_next` that no call has met yet."""
        ...

    async def delay_triggers(self, seconds: float) -> None:
        """Conditional orders placed from now on sit `seconds` of venue time in TRIGGERING once they fire
        (Binance: forwarded to the matching engine, not filled yet). Call it before placing them."""
        ...

    async def lag_reads(self, seconds: float) -> None:
        """Conditional orders placed from now on read back as unknown for `seconds` of venue time."""
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

    async def clear_faults(self) -> None:
        self._venue.clear_injected_faults()

    async def delay_triggers(self, seconds: float) -> None:
        # The sim applies its delay when an order fires, not when it is placed: the same for a test that
        # sets it before placing.
        self._venue.set_trigger_delay(seconds)

    async def lag_reads(self, seconds: float) -> None:
        self._venue.set_read_lag(seconds)


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


# ---- the ccxt adapter against the Binance-wire emulator (real ccxt, real HTTP, real signing) ------------

EMULATOR_API_KEY = "contract-test-key"
EMULATOR_API_SECRET = "contract-test-secret"
_ADAPTER_TIMEOUT_SECONDS = 1.0  # short, so "answer lost" tests take a second, not ten

_FROM_NOW_ON = 1_000_000  # placements a forced order trait lasts for

_EMULATOR_FAULTS = {
    FaultKind.TIMEOUT_AFTER_ACCEPT: "timeout",  # executed, the answer held back past the client's timeout
    FaultKind.RATE_LIMITED: "ratelimit",  # HTTP 429 with Retry-After: 1, not executed
    FaultKind.SERVER_ERROR: "busy",  # HTTP 503 -1008: refused before execution
}


class EmulatorHarness:
    """Drives the emulator through its loopback control API; venue time moves with `/_sim/advance` (the
    emulator's clock skips ahead, request signatures are still checked against the real clock)."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self._session = session
        self._base_url = base_url

    async def _post(self, path: str, body: dict[str, object]) -> None:
        async with self._session.post(f"{self._base_url}{path}", json=body) as response:
            if response.status != 200:
                raise AssertionError(f"emulator control {path}: {response.status} {await response.text()}")

    async def set_mark_price(self, symbol: str, price: Decimal) -> None:
        await self._post("/_sim/mark", {"symbol": symbol, "price": str(price)})

    async def advance(self, seconds: float) -> None:
        await self._post("/_sim/advance", {"seconds": seconds})

    async def drive(self, awaitable: Awaitable[T]) -> T:
        return await awaitable  # real time passes by itself

    async def fail_next(self, call: CallKind, fault: FaultKind, count: int = 1) -> None:
        emulated = _EMULATOR_FAULTS.get(fault)
        if emulated is None:
            pytest.skip(
                "a request over real HTTP always reaches the server, so 'failed before it was sent' cannot be "
                "staged on the emulator; connection refused → Retryable is covered in "
                "tests/unit/test_ccxt_error_translation.py"
            )
        await self._post(
            "/_sim/fault",
            {
                "call": call.value,
                "fault": emulated,
                "count": count,
                "hold_seconds": _ADAPTER_TIMEOUT_SECONDS * 3,
            },
        )

    async def clear_faults(self) -> None:
        await self._post("/_sim/clear-faults", {})

    async def delay_triggers(self, seconds: float) -> None:
        await self._force_trait(f"triggering:{seconds:g}")

    async def lag_reads(self, seconds: float) -> None:
        await self._force_trait(f"lag:{seconds:g}")

    async def _force_trait(self, fault: str) -> None:
        # A forced order trait is used up by accepted algo placements only: "from now on" for a test.
        body = {"targets": ["POST:algoOrder"], "fault": fault, "count": _FROM_NOW_ON}
        await self._post("/_sim/fault", body)


@asynccontextmanager
async def ccxt_binance_subject() -> AsyncIterator[ContractSubject]:
    """The ccxt adapter (`binanceusdm`) talking to a fresh emulator on a free loopback port."""
    settings = SimVenueSettings(seed=7, volatility=0.0, symbols=["SFPUSDT", "BTCUSDT", "ETHUSDT"])
    emulator = BinanceEmulator(
        settings, api_key=EMULATOR_API_KEY, api_secret=EMULATOR_API_SECRET, control=True
    )
    async with running(emulator) as base_url, aiohttp.ClientSession() as control:
        venue = BinanceUsdmVenue(
            CcxtVenueConfig(
                kind="binanceusdm",
                api_key=EMULATOR_API_KEY,
                api_secret=EMULATOR_API_SECRET,
                base_url=base_url,
                request_timeout_seconds=_ADAPTER_TIMEOUT_SECONDS,
                mark_poll_seconds=0.05,
            )
        )
        await venue.connect()
        try:
            await venue.load_markets()
            yield ContractSubject(port=venue, harness=EmulatorHarness(control, base_url))
        finally:
            await venue.close()


# ---- the ccxt adapter against the Bybit v5 emulator (real ccxt, real HTTP, real signing) -----------------

_BYBIT_FAULTS = {
    FaultKind.TIMEOUT_AFTER_ACCEPT: "timeout",
    FaultKind.RATE_LIMITED: "ratelimit",  # HTTP 200 retCode 10006, not executed
    FaultKind.SERVER_ERROR: "busy",  # HTTP 200 retCode 10016: Bybit's server error
}


class BybitEmulatorHarness(EmulatorHarness):
    """The Bybit emulator's control API: marks move the last price with them (no wick unless a test asks),
    faults by port call; Binance's algo-order traits have no Bybit counterpart."""

    async def fail_next(self, call: CallKind, fault: FaultKind, count: int = 1) -> None:
        emulated = _BYBIT_FAULTS.get(fault)
        if emulated is None:
            pytest.skip(
                "a request over real HTTP always reaches the server, so 'failed before it was sent' cannot be "
                "staged on the emulator"
            )
        await self._post(
            "/_sim/fault",
            {
                "call": call.value,
                "fault": emulated,
                "count": count,
                "hold_seconds": _ADAPTER_TIMEOUT_SECONDS * 3,
            },
        )

    async def delay_triggers(self, seconds: float) -> None:
        pytest.skip("Bybit: a fired position stop closes the position at once; there is no TRIGGERING state")

    async def lag_reads(self, seconds: float) -> None:
        pytest.skip("Bybit: position stops are read back from the position itself, which shows them at once")


@asynccontextmanager
async def ccxt_bybit_subject() -> AsyncIterator[ContractSubject]:
    """The ccxt adapter (`bybit`) talking to a fresh Bybit v5 emulator on a free loopback port."""
    settings = SimVenueSettings(seed=7, volatility=0.0, symbols=["SFPUSDT", "BTCUSDT", "ETHUSDT"])
    emulator = BybitEmulator(
        settings,
        api_key=EMULATOR_API_KEY,
        api_secret=EMULATOR_API_SECRET,
        control=True,
        limiter=BybitLimiter(),
    )
    async with running_bybit(emulator) as base_url, aiohttp.ClientSession() as control:
        venue = BybitLinearVenue(
            CcxtVenueConfig(
                kind="bybit",
                api_key=EMULATOR_API_KEY,
                api_secret=EMULATOR_API_SECRET,
                base_url=base_url,
                request_timeout_seconds=_ADAPTER_TIMEOUT_SECONDS,
                mark_poll_seconds=0.05,
            )
        )
        await venue.connect()
        try:
            await venue.load_markets()
            yield ContractSubject(port=venue, harness=BybitEmulatorHarness(control, base_url))
        finally:
            await venue.close()

"""Reads whose answers are lost, on both wire emulators through the real adapters, ccxt and HTTP: the venue
executes the read and holds its answer (`timeout`: the client hears nothing until its own timeout).

A Bybit chaos soak had trailing stops missing for 6–10 s, each behind one `GET /v5/position/list` (the
read before a position's stop is set) whose answer was held: the stop went out only when the call's
10 s budget ran out. A late read is now sent once more and the first answer wins
(`engine.venues.read_hedge`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from engine.exchange import OrderSide, OrderStatus, Retryable
from engine.venues import binance_emulator, bybit_emulator
from engine.venues.binance_venue import BinanceUsdmVenue
from engine.venues.bybit_venue import BybitLinearVenue
from engine.venues.ccxt_venue import CcxtVenue, CcxtVenueConfig
from engine.venues.read_hedge import HEDGE_BURST
from engine.venues.sim import SimVenueSettings

KEY, SECRET = "hedge-key", "hedge-secret"
SYMBOL = "SFPUSDT"  # 0.4500, tick 0.0001, step 1
QTY = Decimal("100")
# The adapters' own request timeout, far beyond the waits below: without a second request, a read whose
# answer is held is answered by nothing within them.
PATIENT = 30.0
WITHIN = 8.0  # what each step below is given (hedged, the answer comes about half a second after sending)


@contextlib.asynccontextmanager
async def exchange(kind: str, request_timeout: float = PATIENT) -> AsyncIterator[tuple[CcxtVenue, Any]]:
    """The adapter of `kind`, connected to its emulator, and a function forcing faults on the emulator."""
    settings = SimVenueSettings(seed=5, volatility=0.0, symbols=[SYMBOL, "BTCUSDT"])
    if kind == "bybit":
        emulator: Any = bybit_emulator.BybitEmulator(settings, api_key=KEY, api_secret=SECRET, control=True)
        serve = bybit_emulator.running
    else:
        emulator = binance_emulator.BinanceEmulator(settings, api_key=KEY, api_secret=SECRET, control=True)
        serve = binance_emulator.running
    async with serve(emulator) as url, aiohttp.ClientSession() as control:
        config = CcxtVenueConfig(
            kind=kind, api_key=KEY, api_secret=SECRET, base_url=url, request_timeout_seconds=request_timeout
        )
        adapter: CcxtVenue = BybitLinearVenue(config) if kind == "bybit" else BinanceUsdmVenue(config)

        async def force(call: str, count: int = 1) -> None:
            body = {"call": call, "fault": "timeout", "count": count, "hold_seconds": 60}
            async with control.post(f"{url}/_sim/fault", json=body) as response:
                assert response.status == 200, await response.text()

        async with adapter:
            await adapter.load_markets()
            yield adapter, force


async def test_a_positions_stop_is_set_though_the_read_before_it_lost_its_answer() -> None:
    async with exchange("bybit") as (adapter, force):
        # Opened without a stop on the entry: setting its stops starts with reading the position.
        await adapter.create_market_order(SYMBOL, OrderSide.BUY, QTY, client_order_id="tsbhedge1-1-en0")
        await force("fetch_positions")
        placed = await asyncio.wait_for(
            adapter.create_trailing_stop_order(
                SYMBOL, OrderSide.SELL, QTY, Decimal("1"), client_order_id="tsbhedge1-1-ts0"
            ),
            WITHIN,
        )
        found = await adapter.fetch_order(SYMBOL, "tsbhedge1-1-ts0")

    assert placed.status is OrderStatus.NEW
    assert (found.status, found.client_order_id) == (OrderStatus.NEW, "tsbhedge1-1-ts0")
    assert (adapter.hedges.hedged, adapter.hedges.won) == (1, 1)


@pytest.mark.parametrize("kind", ["binanceusdm", "bybit"])
async def test_a_stops_look_up_whose_answer_is_lost_is_answered_by_asking_again(kind: str) -> None:
    async with exchange(kind) as (adapter, force):
        await adapter.create_market_order(SYMBOL, OrderSide.BUY, QTY, client_order_id="tsbhedge2-1-en0")
        await adapter.create_stop_market_order(
            SYMBOL, OrderSide.SELL, QTY, Decimal("0.4000"), client_order_id="tsbhedge2-1-sl0"
        )
        await force("fetch_order" if kind == "binanceusdm" else "fetch_positions")
        found = await asyncio.wait_for(adapter.fetch_order(SYMBOL, "tsbhedge2-1-sl0"), WITHIN)

    assert (found.status, found.stop_price) == (OrderStatus.NEW, Decimal("0.4000"))
    assert adapter.hedges.hedged == 1


async def test_hedges_are_rationed_when_many_answers_are_lost_at_once() -> None:
    # A venue losing every answer must not get every read twice: the credit (HEDGE_BURST, earned back a
    # tenth per answered read) is spent, then late reads wait for their own answer, here the adapter's
    # 3 s timeout.
    lost = int(HEDGE_BURST) + 2
    async with exchange("binanceusdm", request_timeout=3.0) as (adapter, force):
        await force("fetch_positions", count=lost)
        results = await asyncio.gather(
            *(adapter.fetch_positions(SYMBOL) for _ in range(lost)), return_exceptions=True
        )

    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == lost - int(HEDGE_BURST)
    assert all(isinstance(error, Retryable) for error in failed), failed
    assert (adapter.hedges.hedged, adapter.hedges.unhedged) == (int(HEDGE_BURST), lost - int(HEDGE_BURST))

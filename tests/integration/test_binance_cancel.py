"""Cancelling a stop on Binance through the real adapter, ccxt and HTTP against the emulator: the answer
says how the order ended, in one round trip where Binance's answer proves it (the close path cancels the
sibling of a fired stop, so every extra request there is time a closed position stays open in our books)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp

from engine.exchange.port import OrderSide, OrderStatus
from engine.venues.binance_emulator import BinanceEmulator, running
from engine.venues.binance_venue import BinanceUsdmVenue
from engine.venues.ccxt_venue import CcxtVenueConfig
from engine.venues.sim.settings import SimVenueSettings

KEY, SECRET = "cancel-key", "cancel-secret"
SYMBOL = "SFPUSDT"


def _venue(base_url: str) -> BinanceUsdmVenue:
    return BinanceUsdmVenue(
        CcxtVenueConfig(kind="binanceusdm", api_key=KEY, api_secret=SECRET, base_url=base_url)
    )


@contextlib.asynccontextmanager
async def _exchange() -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    settings = SimVenueSettings(seed=3, volatility=0.0, symbols=[SYMBOL])
    emulator = BinanceEmulator(settings, api_key=KEY, api_secret=SECRET, control=True)
    async with running(emulator) as base_url, aiohttp.ClientSession() as control:
        yield base_url, control


async def _requests(control: aiohttp.ClientSession, base_url: str) -> dict[str, int]:
    async with control.get(f"{base_url}/_sim/state") as response:
        assert response.status == 200
        state: dict[str, Any] = await response.json()
    return state["requests_by_endpoint"]  # type: ignore[no-any-return]


async def _long_with_stop(venue: BinanceUsdmVenue, cid: str) -> Decimal:
    mark = (await venue.fetch_mark_prices([SYMBOL]))[SYMBOL].price
    await venue.create_market_order(SYMBOL, OrderSide.BUY, Decimal(100), client_order_id=f"{cid}-e")
    stop = (mark * Decimal("0.9")).quantize(Decimal("0.0001"))
    await venue.create_stop_market_order(SYMBOL, OrderSide.SELL, Decimal(100), stop, client_order_id=cid)
    return stop


async def test_cancelling_a_working_stop_takes_one_request_and_says_cancelled() -> None:
    async with _exchange() as (base_url, control), _venue(base_url) as venue:
        await venue.load_markets()
        stop = await _long_with_stop(venue, "c1-sl")
        before = await _requests(control, base_url)

        final = await venue.cancel_order(SYMBOL, "c1-sl")

        after = await _requests(control, base_url)
        assert final.status is OrderStatus.CANCELED
        assert (final.client_order_id, final.stop_price, final.quantity) == ("c1-sl", stop, Decimal(100))
        sent = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
        assert sent == {"DELETE algoOrder": 1}
        assert await venue.fetch_open_protective_orders(SYMBOL) == []


async def test_a_stop_that_already_filled_is_told_filled_not_cancelled() -> None:
    async with _exchange() as (base_url, control), _venue(base_url) as venue:
        await venue.load_markets()
        stop = await _long_with_stop(venue, "c2-sl")
        body = {"symbol": SYMBOL, "price": str(stop - Decimal("0.0010"))}
        async with control.post(f"{base_url}/_sim/mark", json=body) as response:
            assert response.status == 200

        final = await venue.cancel_order(SYMBOL, "c2-sl")

        assert final.status is OrderStatus.FILLED
        assert final.average_price is not None


async def test_a_stop_from_before_a_restart_is_cancelled_and_told_cancelled() -> None:
    async with _exchange() as (base_url, _control):
        async with _venue(base_url) as first:
            await first.load_markets()
            await _long_with_stop(first, "c3-sl")
        async with _venue(base_url) as second:  # knows nothing of the order: asks the venue how it ended
            await second.load_markets()
            final = await second.cancel_order(SYMBOL, "c3-sl")
            assert final.status is OrderStatus.CANCELED
            assert await second.fetch_open_protective_orders(SYMBOL) == []

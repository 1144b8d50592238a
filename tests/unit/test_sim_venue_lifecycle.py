"""SimVenue's Binance lifecycle knobs in virtual time: stops that sit TRIGGERING (or stick there) before
their fill, and algo orders that read back as unknown for a while after placement."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from engine.clock import ManualClock
from engine.exchange import NotFound, OrderSide, OrderStatus
from engine.venues.sim import SimVenue, SimVenueSettings

SFP = "SFPUSDT"
QTY = Decimal("100")
STOP = Decimal("0.4000")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=1_750_000_000.0)


@pytest.fixture
async def venue(clock: ManualClock) -> AsyncIterator[SimVenue]:
    settings = SimVenueSettings.model_validate(
        {"seed": 1, "volatility": 0.0, "latency": {"seconds": 0.0}, "symbols": [SFP, "BTCUSDT"]}
    )
    made = SimVenue(settings, clock=clock)
    await made.connect()
    yield made
    await made.close()


async def long_with_stop(venue: SimVenue, cid: str = "sl") -> None:
    venue.override_mark_price(SFP, Decimal("0.4500"))
    await venue.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id=f"in-{cid}")
    await venue.create_stop_market_order(SFP, OrderSide.SELL, QTY, STOP, client_order_id=cid)


async def position(venue: SimVenue) -> Decimal:
    return sum((p.quantity for p in await venue.fetch_positions() if p.symbol == SFP), Decimal(0))


async def test_a_delayed_trigger_reports_triggered_then_fills_once_the_clock_passes_its_deadline(
    clock: ManualClock, venue: SimVenue
) -> None:
    venue.set_trigger_delay(5.0)
    await long_with_stop(venue)

    [fired] = venue.override_mark_price(SFP, Decimal("0.3990"))
    assert fired.status is OrderStatus.TRIGGERED
    await clock.advance(4.0)
    assert (await venue.fetch_order(SFP, "sl")).status is OrderStatus.TRIGGERED
    assert await venue.fetch_open_protective_orders(SFP) == []
    assert await position(venue) == QTY

    await clock.advance(1.0)

    assert (await venue.fetch_order(SFP, "sl")).status is OrderStatus.FILLED
    assert await position(venue) == 0


async def test_a_stuck_trigger_never_fills_and_the_default_comes_back_with_none(
    clock: ManualClock, venue: SimVenue
) -> None:
    venue.set_trigger_delay(None, stuck=True)
    await long_with_stop(venue, "stuck")
    venue.override_mark_price(SFP, Decimal("0.3990"))

    await clock.advance(600.0)

    assert (await venue.fetch_order(SFP, "stuck")).status is OrderStatus.TRIGGERED
    assert await position(venue) == QTY

    venue.set_trigger_delay(None)  # instant again, for orders that fire from now on
    await venue.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="in-2")
    await venue.create_stop_market_order(SFP, OrderSide.SELL, QTY, Decimal("0.3900"), client_order_id="sl-2")
    [filled] = venue.override_mark_price(SFP, Decimal("0.3890"))
    assert filled.status is OrderStatus.FILLED


async def test_a_delay_for_one_symbol_only(clock: ManualClock, venue: SimVenue) -> None:
    venue.set_trigger_delay(10.0, symbol="BTCUSDT")
    await long_with_stop(venue)

    [fired] = venue.override_mark_price(SFP, Decimal("0.3990"))

    assert fired.status is OrderStatus.FILLED


def test_bad_trigger_delays_are_refused(venue: SimVenue) -> None:
    with pytest.raises(ValueError, match="trigger delay must be >= 0"):
        venue.set_trigger_delay(-1.0)
    with pytest.raises(ValueError, match="trigger delay must be >= 0"):
        venue.set_trigger_delay(math.nan)
    with pytest.raises(ValueError, match="a stuck trigger has no delay"):
        venue.set_trigger_delay(5.0, stuck=True)
    with pytest.raises(ValueError, match="unknown symbol 'NOPEUSDT'"):
        venue.set_trigger_delay(1.0, symbol="NOPEUSDT")


async def test_read_lag_hides_a_new_stop_from_reads_for_its_seconds_of_venue_time(
    clock: ManualClock, venue: SimVenue
) -> None:
    venue.set_read_lag(2.0)
    assert venue.capabilities().read_after_write_seconds == 2.0
    await long_with_stop(venue)

    with pytest.raises(NotFound):
        await venue.fetch_order(SFP, "sl")
    with pytest.raises(NotFound):
        await venue.cancel_order(SFP, "sl")
    assert await venue.fetch_open_protective_orders() == []

    await clock.advance(2.0)

    found: Any = await venue.fetch_order(SFP, "sl")
    assert (found.status, found.stop_price) == (OrderStatus.NEW, STOP)
    assert [o.client_order_id for o in await venue.fetch_open_protective_orders()] == ["sl"]

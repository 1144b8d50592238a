"""The sim venue's account stream: every order and position change pushed in order, per account, with its
faults (dropped connection → StreamGap, delayed events), and a venue without stream ending at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from engine.clock import ManualClock
from engine.exchange import OrderSide, OrderStatus
from engine.exchange.port import AccountEvent, OrderUpdate, PositionUpdate, StreamGap
from engine.venues.sim import SimVenue, SimVenueSettings
from engine.venues.sim.core import SimCore
from engine.venues.sim.universe import select_listings

SFP = "SFPUSDT"
QTY = Decimal("100")


def settings(**overrides: Any) -> SimVenueSettings:
    base: dict[str, Any] = {"seed": 1, "volatility": 0.0, "latency": {"seconds": 0.0}, "keep_book": False}
    return SimVenueSettings.model_validate(base | overrides)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=1_750_000_000.0)


class Reader:
    """Reads a venue's account stream into a list, in a task of its own."""

    def __init__(self, venue: SimVenue) -> None:
        self.events: list[AccountEvent] = []
        self.ended = asyncio.Event()
        self._task = asyncio.create_task(self._read(venue))

    async def _read(self, venue: SimVenue) -> None:
        try:
            async for event in venue.watch_account():
                self.events.append(event)
        finally:
            self.ended.set()

    def orders(self) -> list[tuple[str, OrderStatus]]:
        return [(e.order.client_order_id, e.order.status) for e in self.events if isinstance(e, OrderUpdate)]

    def positions(self) -> list[tuple[str, Decimal]]:
        return [(e.symbol, e.quantity) for e in self.events if isinstance(e, PositionUpdate)]

    def gaps(self) -> list[StreamGap]:
        return [e for e in self.events if isinstance(e, StreamGap)]

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@pytest.fixture
async def venue(clock: ManualClock) -> AsyncIterator[SimVenue]:
    venue = SimVenue(settings(), clock=clock)
    await venue.connect()
    yield venue
    await venue.close()


async def settle(clock: ManualClock) -> None:
    for _ in range(5):
        await clock.advance(0)
        await asyncio.sleep(0)


async def call(clock: ManualClock, awaitable: Any) -> Any:
    task = asyncio.ensure_future(awaitable)
    while not task.done():
        await clock.advance(0.01)
    return task.result()


async def test_every_order_and_position_change_is_pushed_in_order(
    venue: SimVenue, clock: ManualClock
) -> None:
    reader = Reader(venue)
    await settle(clock)
    assert [g.reason for g in reader.gaps()] == ["connected"]  # first item: read the venue once
    await call(clock, venue.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="entry-1"))
    mark = venue.core.mark(SFP)
    stop_price = venue.core.markets[SFP].round_price(mark * Decimal("0.9"))
    await call(
        clock,
        venue.create_stop_market_order(SFP, OrderSide.SELL, QTY, stop_price, client_order_id="sl-1"),
    )
    await call(
        clock,
        venue.create_trailing_stop_order(
            SFP, OrderSide.SELL, QTY, Decimal("1"), client_order_id="ts-1", activation_price=mark * 2
        ),
    )
    venue.override_mark_price(SFP, stop_price)  # fires the stop-loss: triggered, filled, flat
    await call(clock, venue.cancel_order(SFP, "ts-1"))
    await settle(clock)
    assert reader.orders() == [
        ("entry-1", OrderStatus.FILLED),
        ("sl-1", OrderStatus.NEW),
        ("ts-1", OrderStatus.NEW),
        ("sl-1", OrderStatus.TRIGGERED),
        ("sl-1", OrderStatus.FILLED),
        ("ts-1", OrderStatus.CANCELED),
    ]
    filled = [e for e in reader.events if isinstance(e, OrderUpdate) and e.order.status is OrderStatus.FILLED]
    assert filled[-1].order.average_price is not None
    assert filled[-1].order.average_price <= stop_price
    assert reader.positions() == [(SFP, QTY), (SFP, Decimal(0))]
    states = {s.name: s for s in venue.stream_states()}
    assert states["account"].connected
    assert states["account"].subscriptions == 1
    assert states["account"].last_event_at is not None
    await reader.stop()


async def test_a_dropped_connection_loses_its_events_and_owes_a_gap(
    venue: SimVenue, clock: ManualClock
) -> None:
    reader = Reader(venue)
    await settle(clock)
    venue.drop_account_stream(2.0)
    await call(clock, venue.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="lost-1"))
    assert not {s.name: s for s in venue.stream_states()}["account"].connected
    await clock.advance(2.5)
    await settle(clock)
    await call(clock, venue.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="seen-1"))
    await settle(clock)
    assert [g.reason for g in reader.gaps()] == ["connected", "connection dropped (as asked)"]
    assert [cid for cid, _status in reader.orders()] == ["seen-1"]  # lost-1 went with the connection
    state = {s.name: s for s in venue.stream_states()}["account"]
    assert state.connected
    assert state.reconnects == 1
    await reader.stop()


async def test_a_reader_that_connects_while_the_stream_is_down_gets_nothing_until_it_is_back(
    venue: SimVenue, clock: ManualClock
) -> None:
    """The outage is the venue's, not one connection's: a reader that connects during it (an engine's
    stream task that subscribed a moment after the drop) hears nothing until it ends, then "connected"."""
    venue.drop_account_stream(2.0)
    reader = Reader(venue)
    await settle(clock)
    await call(clock, venue.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="lost-1"))
    await settle(clock)
    assert reader.events == []
    assert not {s.name: s for s in venue.stream_states()}["account"].connected
    await clock.advance(2.5)
    await settle(clock)
    await call(clock, venue.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="seen-1"))
    await settle(clock)
    assert [g.reason for g in reader.gaps()] == ["connected"]
    assert [cid for cid, _status in reader.orders()] == ["seen-1"]
    assert {s.name: s for s in venue.stream_states()}["account"].connected
    await reader.stop()


async def test_delayed_events_arrive_late_and_in_order(venue: SimVenue, clock: ManualClock) -> None:
    reader = Reader(venue)
    await settle(clock)
    venue.delay_account_events(3.0)
    await call(clock, venue.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="late-1"))
    await call(clock, venue.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="late-2"))
    await clock.advance(1.0)
    await settle(clock)
    assert reader.orders() == []
    await clock.advance(2.5)
    await settle(clock)
    assert [cid for cid, _ in reader.orders()] == ["late-1", "late-2"]
    await reader.stop()


async def test_events_of_another_account_are_not_pushed(clock: ManualClock) -> None:
    venue_settings = settings()
    core = SimCore(select_listings(venue_settings.symbols, 0), venue_settings, now=clock.now())
    mine = SimVenue(venue_settings, clock=clock, core=core, account_id="mine")
    theirs = SimVenue(venue_settings, clock=clock, core=core, account_id="theirs")
    await mine.connect()
    await theirs.connect()
    reader = Reader(mine)
    await settle(clock)
    await call(clock, theirs.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="theirs-1"))
    await call(clock, mine.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="mine-1"))
    await settle(clock)
    assert [cid for cid, _ in reader.orders()] == ["mine-1"]
    await reader.stop()
    await mine.close()
    await theirs.close()


async def test_a_venue_without_account_stream_ends_at_once(clock: ManualClock) -> None:
    venue = SimVenue(settings(account_stream={"enabled": False}), clock=clock)
    await venue.connect()
    reader = Reader(venue)
    await asyncio.wait_for(reader.ended.wait(), 5)
    assert reader.events == []
    assert [s.name for s in venue.stream_states()] == ["marks"]
    await venue.close()


async def test_seeded_drops_end_in_a_gap(clock: ManualClock) -> None:
    venue = SimVenue(settings(account_stream={"drop_probability": 1.0, "down_seconds": 1.0}), clock=clock)
    await venue.connect()
    reader = Reader(venue)
    await settle(clock)
    await call(clock, venue.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="dropped-1"))
    await clock.advance(1.5)
    await settle(clock)
    assert reader.orders() == []
    assert [g.reason for g in reader.gaps()] == ["connected", "connection dropped (sim fault)"]
    await reader.stop()
    await venue.close()

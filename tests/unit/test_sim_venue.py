"""SimVenue: latency and faults played out on the clock, the mark ticker, lifecycle, start-up glitches."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from decimal import Decimal
from typing import Any

import pytest

from engine.clock import ManualClock
from engine.exchange import ExchangePort, OrderSide, OrderStatus, OutcomeUnknown, Retryable
from engine.exchange.errors import RateLimited
from engine.pacing import RequestPacer, VenuePacing
from engine.venues.sim import SimVenue, SimVenueSettings
from engine.venues.sim.settings import CallKind, FaultKind
from engine.venues.sim.venue import FORCED_RETRY_AFTER_SECONDS

SFP = "SFPUSDT"
QTY = Decimal("100")


def settings(**overrides: Any) -> SimVenueSettings:
    base: dict[str, Any] = {"seed": 1, "volatility": 0.0, "latency": {"seconds": 0.0}}
    return SimVenueSettings.model_validate(base | overrides)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=1_750_000_000.0)


async def elapsed(clock: ManualClock, call: Awaitable[Any]) -> tuple[float, Any]:
    """Run `call` while moving time; returns (clock seconds it took, result or raised exception)."""

    async def timed() -> tuple[float, Any]:
        started = clock.monotonic()
        try:
            outcome: Any = await call
        except Exception as error:
            outcome = error
        return clock.monotonic() - started, outcome

    task = asyncio.create_task(timed())
    while not task.done():
        await clock.advance(0.5)
    return task.result()


@pytest.fixture
async def venue_factory(clock: ManualClock) -> AsyncIterator[Any]:
    made: list[SimVenue] = []

    def make(venue_settings: SimVenueSettings, **kwargs: Any) -> SimVenue:
        venue = SimVenue(venue_settings, clock=clock, **kwargs)
        made.append(venue)
        return venue

    yield make
    for venue in made:
        await venue.close()


async def test_sim_venue_implements_the_port(venue_factory: Any) -> None:
    venue = venue_factory(settings())
    assert isinstance(venue, ExchangePort)
    assert venue.name == "sim"
    caps = venue.capabilities()
    assert caps.native_trailing_stop
    assert not caps.attach_stop_to_entry
    assert (caps.callback_rate_min, caps.callback_rate_max) == (Decimal("0.1"), Decimal("10"))
    assert [(b.limit, b.window_seconds) for b in caps.order_rate_budgets] == [(300, 10.0), (1200, 60.0)]


async def test_a_call_takes_its_latency_of_clock_time(clock: ManualClock, venue_factory: Any) -> None:
    venue = venue_factory(settings(latency={"seconds": 0.4}))
    task = asyncio.create_task(venue.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="in"))
    await clock.advance(0.39)
    assert not task.done()
    await clock.advance(0.01)
    assert task.done()
    assert task.result().status is OrderStatus.FILLED


async def test_the_incidents_two_seconds_per_call_with_jitter(clock: ManualClock, venue_factory: Any) -> None:
    venue = venue_factory(
        settings(latency={"distribution": "uniform", "seconds": 2.0, "jitter_seconds": 0.5})
    )
    durations = [(await elapsed(clock, venue.fetch_balance()))[0] for _ in range(20)]

    assert all(1.5 <= d <= 2.5 for d in durations)
    assert len(set(durations)) > 1


async def test_latency_beyond_the_request_timeout_is_an_ambiguous_outcome(
    clock: ManualClock, venue_factory: Any
) -> None:
    venue = venue_factory(
        settings(
            request_timeout_seconds=5.0,
            latency={"seconds": 0.0, "by_call": {"create_order": {"seconds": 30.0}}},
        )
    )
    took, outcome = await elapsed(
        clock, venue.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="slow")
    )

    assert isinstance(outcome, OutcomeUnknown)
    assert took == pytest.approx(5.0)
    assert (await venue.fetch_order(SFP, "slow")).status is OrderStatus.FILLED


async def test_configured_timeout_probability_hits_writes_and_reads_differently(
    clock: ManualClock, venue_factory: Any
) -> None:
    venue = venue_factory(
        settings(
            faults={
                "by_call": {
                    "create_order": {"timeout_after_accept": 1.0},
                    "fetch_balance": {"timeout_after_accept": 1.0},
                }
            }
        )
    )
    _, created = await elapsed(clock, venue.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="t"))
    _, read = await elapsed(clock, venue.fetch_balance())

    assert isinstance(created, OutcomeUnknown)
    assert isinstance(read, Retryable)
    assert (await venue.fetch_order(SFP, "t")).status is OrderStatus.FILLED


async def test_positions_read_empty_for_the_first_seconds_after_connect(
    clock: ManualClock, venue_factory: Any
) -> None:
    venue = venue_factory(settings(faults={"empty_positions_for_seconds": 10.0}))
    await venue.connect()
    await venue.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="in")

    assert await venue.fetch_positions() == []
    await clock.advance(9.9)
    assert await venue.fetch_positions() == []
    await clock.advance(0.1)
    assert [p.symbol for p in await venue.fetch_positions()] == [SFP]


async def test_positions_read_empty_when_told_to_at_any_time(clock: ManualClock, venue_factory: Any) -> None:
    venue = venue_factory(settings())
    await venue.connect()
    await venue.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="in")
    await clock.advance(60.0)

    venue.answer_positions_empty(2)
    assert await venue.fetch_positions() == []
    assert [p.symbol for p in await venue.fetch_positions(SFP)] == [SFP]  # one symbol's read stays true
    assert await venue.fetch_positions() == []
    assert [p.symbol for p in await venue.fetch_positions()] == [SFP]
    venue.answer_positions_empty(5)
    venue.clear_injected_faults()
    assert [p.symbol for p in await venue.fetch_positions()] == [SFP]


async def test_the_ticker_moves_marks_with_the_clock_and_the_same_seed_gives_the_same_marks(
    clock: ManualClock, venue_factory: Any
) -> None:
    volatile = settings(volatility=2.0, symbols=["BTCUSDT", SFP], mark_tick_seconds=1.0)
    first, second = venue_factory(volatile), venue_factory(volatile)
    before = await first.fetch_mark_prices()
    await first.connect()
    await second.connect()

    await clock.advance(30.0)

    after_first, after_second = await first.fetch_mark_prices(), await second.fetch_mark_prices()
    assert after_first[SFP].price != before[SFP].price
    assert after_first[SFP].timestamp == clock.now()
    assert {s: m.price for s, m in after_first.items()} == {s: m.price for s, m in after_second.items()}


async def test_the_stream_coalesces_to_the_latest_mark(clock: ManualClock, venue_factory: Any) -> None:
    venue = venue_factory(settings(volatility=2.0, symbols=[SFP]))
    await venue.connect()
    stream = venue.watch_mark_prices([SFP])
    assert (await anext(stream)).symbol == SFP  # the snapshot at subscription

    await clock.advance(10.0)  # ten ticks, nobody reading

    latest = await anext(stream)
    assert latest.price == (await venue.fetch_mark_prices([SFP]))[SFP].price
    assert latest.timestamp == clock.now()
    await stream.aclose()


async def test_the_ticker_fires_stops_without_anyone_calling(clock: ManualClock, venue_factory: Any) -> None:
    venue = venue_factory(settings(volatility=3.0, symbols=[SFP], mark_tick_seconds=60.0))
    await venue.connect()
    await venue.create_market_order(SFP, OrderSide.BUY, Decimal("1000"), client_order_id="in")
    mark = (await venue.fetch_mark_prices([SFP]))[SFP].price
    await venue.create_trailing_stop_order(
        SFP, OrderSide.SELL, Decimal("1000"), Decimal("0.5"), client_order_id="ts"
    )

    for _ in range(24 * 60):
        await clock.advance(60.0)
        if not (await venue.fetch_order(SFP, "ts")).is_open:
            break

    fired = await venue.fetch_order(SFP, "ts")
    assert fired.status is OrderStatus.FILLED
    assert fired.average_price != mark
    assert await venue.fetch_positions() == []


async def test_close_stops_the_ticker_ends_streams_and_refuses_calls(
    clock: ManualClock, venue_factory: Any
) -> None:
    venue = venue_factory(settings())
    await venue.connect()
    await venue.connect()  # idempotent: still one ticker
    await clock.settle()
    assert clock.sleepers == 1
    stream = venue.watch_mark_prices([SFP])
    await anext(stream)
    waiting = asyncio.create_task(anext(stream))
    await clock.settle()

    await venue.close()
    await clock.settle()

    assert clock.sleepers == 0
    with pytest.raises(StopAsyncIteration):
        await waiting
    with pytest.raises(RuntimeError, match="closed"):
        await venue.fetch_balance()
    await venue.close()  # idempotent


async def test_a_new_session_on_the_same_core_sees_the_exchange_state(
    clock: ManualClock, venue_factory: Any
) -> None:
    first = venue_factory(settings())
    await first.create_market_order(SFP, OrderSide.BUY, QTY, client_order_id="in")
    await first.create_stop_market_order(SFP, OrderSide.SELL, QTY, Decimal("0.4000"), client_order_id="sl")
    await first.close()

    restarted = venue_factory(settings(), core=first.core)  # the exchange outlives the engine process

    assert [p.quantity for p in await restarted.fetch_positions()] == [QTY]
    assert [o.client_order_id for o in await restarted.fetch_open_protective_orders()] == ["sl"]


async def test_a_forced_429_holds_the_engines_next_requests_for_its_retry_after(
    clock: ManualClock, venue_factory: Any
) -> None:
    """Rehearsal = production: a ccxt venue reports an HTTP 429 to the engine's pacer, which sends nothing
    more until its Retry-After. The sim venue raised its forced 429 without telling the pacer, so under
    the sim the engine went on sending at once what it would hold on Binance."""
    venue = venue_factory(settings(latency={"seconds": 0.05}))
    venue.attach_pacing(VenuePacing(RequestPacer(venue.capabilities().request_budgets, clock), None, clock))
    venue.inject_fault(CallKind.FETCH_POSITIONS, FaultKind.RATE_LIMITED)
    took, refused = await elapsed(clock, venue.fetch_positions())
    assert isinstance(refused, RateLimited)
    assert refused.retry_after == FORCED_RETRY_AFTER_SECONDS
    took, answered = await elapsed(clock, venue.fetch_mark_prices([SFP]))
    assert SFP in answered
    # Held for what was left of the Retry-After when it was asked, then one call's latency.
    assert took >= FORCED_RETRY_AFTER_SECONDS - 0.5

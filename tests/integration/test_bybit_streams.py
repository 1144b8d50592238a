"""Bybit's push streams on the real path: the venue's websocket client (`engine.venues.bybit_streams`)
against the Bybit emulator's streams over loopback (same server and port as its REST API, Bybit v5's
paths and shapes). Every fault the control API can stage must end with fresh marks, the subscriptions
back and a `StreamGap` for the account stream; a fired position stop must come back under our id."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest

from engine.exchange.errors import Retryable
from engine.exchange.port import (
    OrderSide,
    OrderStatus,
    OrderUpdate,
    PositionUpdate,
)
from engine.venues.binance_emulator.faults import Target
from engine.venues.bybit_emulator import BybitEmulator, running
from engine.venues.bybit_emulator.faults import parse_bybit_fault
from engine.venues.bybit_venue import BybitLinearVenue
from engine.venues.ccxt_venue import CcxtVenueConfig
from engine.venues.sim.settings import SimVenueSettings
from engine.venues.stream_client import StreamSettings
from tests.support.stream_rig import StreamRig, reading
from tests.support.waiting import wait_until

KEY, SECRET = "bybit-streams-key", "bybit-streams-secret"
SYMBOL = "SFPUSDT"
TOPIC = f"tickers.{SYMBOL}"
PRIVATE = ["execution", "order", "position"]  # sorted
FAST = StreamSettings(
    stall_seconds=1.5,
    stale_mark_seconds=2.5,
    backoff_initial_seconds=0.2,
    backoff_max_seconds=2.0,
    stable_seconds=3.0,
    subscription_check_seconds=1.0,
)


@dataclass
class Rig(StreamRig):
    venue: BybitLinearVenue
    emulator: BybitEmulator

    def fresh_mark_since(self, moment: float, symbol: str = SYMBOL) -> bool:
        return super().fresh_mark_since(moment, symbol)

    async def streams(self) -> dict[str, Any]:
        return (await self.state())["streams"]

    async def subscriptions(self, kind: str) -> list[str]:
        state = await self.streams()
        return sorted(s for c in state["connections"] if c["kind"] == kind for s in c["subscriptions"])

    async def open_position_with_stops(self, name: str) -> Decimal:
        """A long with its hard stop (`<name>-sl1`) and trailing stop (`<name>-ts1`); returns the stop."""
        mark = (await self.venue.fetch_mark_prices([SYMBOL]))[SYMBOL].price
        await self.venue.create_market_order(SYMBOL, OrderSide.BUY, Decimal(100), client_order_id=f"{name}-e")
        stop = (mark * Decimal("0.9")).quantize(Decimal("0.0001"))
        await self.venue.create_stop_market_order(
            SYMBOL, OrderSide.SELL, Decimal(100), stop, client_order_id=f"{name}-sl1"
        )
        await self.venue.create_trailing_stop_order(
            SYMBOL,
            OrderSide.SELL,
            Decimal(100),
            Decimal(5),
            client_order_id=f"{name}-ts1",
            activation_price=(mark * Decimal("1.05")).quantize(
                Decimal("0.0001")
            ),  # unarmed: the hard stop fires
        )
        return stop


def _states(r: Rig) -> dict[str, Any]:
    return {s.name: s for s in r.venue.stream_states()}


def _stream_marks_since(r: Rig, moment: float) -> bool:
    """Fresh from the stream itself, with no symbol read by REST any more."""
    return r.stream_marks_since(moment) and "REST" not in _states(r)["marks"].detail


def _venue(base_url: str, settings: StreamSettings, key: str = KEY) -> BybitLinearVenue:
    return BybitLinearVenue(
        CcxtVenueConfig(
            kind="bybit",
            api_key=key,
            api_secret=SECRET,
            base_url=base_url,
            mark_poll_seconds=0.2,
            streams=settings,
        )
    )


@contextlib.asynccontextmanager
async def rig(settings: StreamSettings = FAST, symbols: list[str] | None = None) -> AsyncIterator[Rig]:
    sim = SimVenueSettings(seed=7, volatility=0.0, symbols=["SFPUSDT", "BTCUSDT", "ETHUSDT"])
    emulator = BybitEmulator(sim, api_key=KEY, api_secret=SECRET, control=True)
    async with running(emulator) as base_url, aiohttp.ClientSession() as control:
        venue = _venue(base_url, settings)
        await venue.connect()
        await venue.load_markets()
        subject = Rig(venue, emulator, base_url, control)
        async with reading(subject, symbols):
            yield subject


async def test_a_fired_position_stop_reaches_watch_account_with_our_id_and_the_fill_price() -> None:
    async with rig(symbols=[SYMBOL]) as r:
        stop = await r.open_position_with_stops("p1")
        await wait_until(
            lambda: bool(r.updates("p1-sl1")) and bool(r.updates("p1-ts1")), what="both stops told"
        )
        fired = await r.post("/_sim/mark", {"symbol": SYMBOL, "price": str(stop - Decimal("0.001"))})
        assert len(fired["triggered"]) == 1
        await wait_until(lambda: r.filled("p1-sl1"), what="the hard stop's fill")
        statuses = [u.order.status for u in r.updates("p1-sl1")]
        assert statuses == [OrderStatus.NEW, OrderStatus.TRIGGERED, OrderStatus.FILLED]
        filled = r.updates("p1-sl1")[-1].order
        assert filled.venue_order_id == fired["triggered"][0]
        assert filled.filled_quantity == Decimal(100)
        assert filled.average_price is not None
        assert filled.average_price <= stop
        # The venue's own fill price: what a query of the order answers (from execution/list).
        queried = await r.venue.fetch_order(SYMBOL, "p1-sl1")
        assert queried.average_price == filled.average_price
        # The sibling the venue deactivated is told cancelled under our id; the position told flat.
        await wait_until(
            lambda: any(u.order.status is OrderStatus.CANCELED for u in r.updates("p1-ts1")), what="sibling"
        )
        flat = [e for e in r.account if isinstance(e, PositionUpdate) and e.symbol == SYMBOL]
        assert flat[-1].quantity == 0
        assert flat[-1].side.value == "long"
        # Bybit's own clean-up of the sibling is told after the position is told flat, so a reader does
        # not take it for a stop someone removed from an open position.
        cancelled = next(u for u in r.updates("p1-ts1") if u.order.status is OrderStatus.CANCELED)
        assert r.account.index(flat[-1]) < r.account.index(cancelled)
        # Only our ids: the venue's closing order has no orderLinkId of ours.
        assert {e.order.client_order_id for e in r.account if isinstance(e, OrderUpdate)} == {
            "p1-e",
            "p1-sl1",
            "p1-ts1",
        }


async def test_a_fill_whose_execution_arrives_first_still_carries_the_execution_price() -> None:
    async with rig(symbols=[SYMBOL]) as r:
        stop = await r.open_position_with_stops("p2")
        await wait_until(lambda: bool(r.updates("p2-ts1")), what="the stops told")
        await r.post("/_sim/stream-fault", {"fault": "reorder", "count": 1})  # position, execution, order
        await r.post("/_sim/mark", {"symbol": SYMBOL, "price": str(stop - Decimal("0.001"))})
        await wait_until(lambda: r.filled("p2-sl1"), what="the fill")
        filled = r.updates("p2-sl1")[-1].order
        queried = await r.venue.fetch_order(SYMBOL, "p2-sl1")
        assert filled.average_price == queried.average_price
        assert [u.order.status for u in r.updates("p2-sl1")] == [
            OrderStatus.NEW,
            OrderStatus.TRIGGERED,
            OrderStatus.FILLED,
        ]


async def test_a_wick_delta_without_mark_price_keeps_the_mark_and_the_stream_fresh() -> None:
    """Bybit's ticker deltas carry only what changed: a move of the last price alone has no `markPrice`."""
    async with rig(symbols=[SYMBOL]) as r:
        await r.post("/_sim/mark", {"symbol": SYMBOL, "price": "0.5"})
        await wait_until(lambda: r.marks[-1][1].price == Decimal("0.5"), what="the new mark")
        moved_at = time.monotonic()
        await r.post("/_sim/last", {"symbol": SYMBOL, "price": "0.52"})
        await wait_until(lambda: r.fresh_mark_since(moved_at + 1.0), what="marks after the wick")
        assert all(m.price == Decimal("0.5") for at, m in r.marks if at > moved_at)
        assert _stream_marks_since(r, moved_at)


async def _fault_and_recover(r: Rig, fault: dict[str, Any], *, expect_gap: bool) -> None:
    gaps_before = len(r.gaps())
    staged_at = time.monotonic()
    await r.post("/_sim/stream-fault", fault)
    if expect_gap:
        await wait_until(lambda: len(r.gaps()) > gaps_before, within=20, what=f"a StreamGap after {fault}")
    await wait_until(lambda: r.fresh_mark_since(staged_at), within=20, what=f"a fresh mark after {fault}")
    await wait_until(
        lambda: _stream_marks_since(r, staged_at),
        within=20,
        what=f"marks from the stream again after {fault}",
    )

    async def everything_subscribed() -> bool:
        return await r.subscriptions("public") == [TOPIC] and await r.subscriptions("private") == PRIVATE

    await wait_until(everything_subscribed, within=20, what=f"every subscription back after {fault}")
    # And the account stream carries events again.
    name = f"after-{fault['fault']}"
    stop = await r.open_position_with_stops(name)
    await r.post("/_sim/mark", {"symbol": SYMBOL, "price": str(stop - Decimal("0.001"))})
    await wait_until(lambda: r.filled(f"{name}-sl1"), within=20, what=f"a fill told after {fault}")


@pytest.mark.parametrize(
    ("fault", "expect_gap"),
    [
        ({"fault": "drop"}, True),
        ({"fault": "stall", "seconds": 30}, True),
        ({"fault": "drop_subscription", "stream": TOPIC}, False),
        ({"fault": "drop_subscription", "stream": "order"}, True),
    ],
    ids=["drop", "stall", "drop-ticker-topic", "drop-order-topic"],
)
async def test_each_stream_fault_ends_with_fresh_marks_the_subscriptions_back_and_a_gap(
    fault: dict[str, Any], expect_gap: bool
) -> None:
    async with rig(symbols=[SYMBOL]) as r:
        await _fault_and_recover(r, fault, expect_gap=expect_gap)
        states = _states(r)
        assert states["marks"].connected
        assert states["account"].connected
        assert states["marks"].subscriptions == 1
        assert states["account"].subscriptions == 3


async def test_delayed_account_events_are_told_late_but_told() -> None:
    async with rig(symbols=[SYMBOL]) as r:
        await r.post("/_sim/stream-fault", {"fault": "delay", "ms": 300})
        stop = await r.open_position_with_stops("p3")
        await r.post("/_sim/mark", {"symbol": SYMBOL, "price": str(stop - Decimal("0.001"))})
        await wait_until(lambda: r.filled("p3-sl1"), what="the delayed fill")
        await r.post("/_sim/clear-faults", {})


async def test_the_listen_key_fault_is_refused_on_bybit() -> None:
    async with (
        rig(symbols=[SYMBOL]) as r,
        r.control.post(f"{r.base_url}/_sim/stream-fault", json={"fault": "expire_listen_key"}) as response,
    ):
        assert response.status == 400
        assert "no listen key" in await response.text()


async def test_a_reconnect_storm_does_not_spin() -> None:
    """The venue drops every connection for 4 s: the client backs off (bounded attempts), then recovers."""
    async with rig(symbols=[SYMBOL]) as r:
        before = (await r.streams())["handshakes"]
        staged_at = time.monotonic()
        await r.post("/_sim/stream-fault", {"fault": "drop", "seconds": 4})
        await wait_until(
            lambda: len(r.gaps()) >= 2, within=30, what="the account stream back after the storm"
        )
        await wait_until(lambda: _stream_marks_since(r, staged_at + 4), within=30, what="marks back")
        after = (await r.streams())["handshakes"]
        # Backoff 0.2 s doubling (jitter 0.5-1x) to 2 s: within 4 s at most ~7 attempts per stream.
        # A client reconnecting at once would make hundreds.
        for kind in ("public", "private"):
            assert after[kind] - before[kind] <= 10, (kind, before, after)
        assert await r.subscriptions("public") == [TOPIC]


async def test_a_wrong_api_key_is_one_clear_error_not_a_loop(caplog: pytest.LogCaptureFixture) -> None:
    sim = SimVenueSettings(seed=7, volatility=0.0, symbols=[SYMBOL])
    emulator = BybitEmulator(sim, api_key=KEY, api_secret=SECRET, control=True)
    async with running(emulator) as base_url:
        venue = _venue(base_url, FAST, key="not-the-key")
        await venue.connect()
        try:
            events = [event async for event in venue.watch_account()]  # ends: no account stream
            assert events == []
            state = _states_of(venue)["account"]
            assert not state.connected
            assert "authentication refused" in state.detail
            assert "Invalid apikey" in state.detail
            assert emulator.streams.handshakes["private"] == 1
            # Asked again, it does not connect again.
            assert [event async for event in venue.watch_account()] == []
            assert emulator.streams.handshakes["private"] == 1
            errors = [
                r for r in caplog.records if r.levelname == "ERROR" and "authentication refused" in r.message
            ]
            assert len(errors) == 1
            assert SECRET not in caplog.text
        finally:
            await venue.close()


def _states_of(venue: BybitLinearVenue) -> dict[str, Any]:
    return {s.name: s for s in venue.stream_states()}


async def test_a_short_positions_fired_stop_is_told_under_our_id() -> None:
    """The stop order closing a short buys: it is named by its kind and its closing side."""
    async with rig(symbols=[SYMBOL]) as r:
        mark = (await r.venue.fetch_mark_prices([SYMBOL]))[SYMBOL].price
        await r.venue.create_market_order(SYMBOL, OrderSide.SELL, Decimal(100), client_order_id="s1-e")
        stop = (mark * Decimal("1.1")).quantize(Decimal("0.0001"))
        await r.venue.create_stop_market_order(
            SYMBOL, OrderSide.BUY, Decimal(100), stop, client_order_id="s1-sl1"
        )
        await wait_until(lambda: bool(r.updates("s1-sl1")), what="the stop told")
        await r.post("/_sim/mark", {"symbol": SYMBOL, "price": str(stop + Decimal("0.001"))})
        await wait_until(lambda: r.filled("s1-sl1"), what="the short's stop filled")
        filled = r.updates("s1-sl1")[-1].order
        assert filled.side is OrderSide.BUY
        assert filled.average_price is not None
        assert filled.average_price >= stop
        flat = [e for e in r.account if isinstance(e, PositionUpdate) and e.symbol == SYMBOL]
        assert flat[-1].quantity == 0
        assert flat[-1].side.value == "short"


async def test_cancelling_a_sibling_the_venue_already_deactivated_asks_nothing() -> None:
    """Once the stream told that Bybit removed the sibling with the closed position, the close path's
    cancel of it is answered from what was told: no trading-stop, no position or execution read."""
    async with rig(symbols=[SYMBOL]) as r:
        stop = await r.open_position_with_stops("p4")
        await wait_until(lambda: bool(r.updates("p4-ts1")), what="the stops told")
        await r.post("/_sim/mark", {"symbol": SYMBOL, "price": str(stop - Decimal("0.001"))})
        await wait_until(
            lambda: any(u.order.status is OrderStatus.CANCELED for u in r.updates("p4-ts1")), what="sibling"
        )
        before = dict(r.emulator.requests_by_endpoint)
        cancelled = await r.venue.cancel_order(SYMBOL, "p4-ts1")
        assert cancelled.status is OrderStatus.CANCELED
        assert r.emulator.requests_by_endpoint == before
        filled = await r.venue.fetch_order(SYMBOL, "p4-sl1")  # the filled one, from the stream as well
        assert filled.status is OrderStatus.FILLED
        assert filled.average_price == r.updates("p4-sl1")[-1].order.average_price


async def test_a_fired_stop_whose_execution_is_lost_is_told_filled_with_the_venues_price() -> None:
    """F6: the order topic says Filled without an average price (Bybit's "" for an order without one) and
    the execution message that would give it never arrives. The fill is told all the same, with the
    price the venue's execution list gives, not held until a reconcile pass finds it."""
    async with rig(symbols=[SYMBOL]) as r:
        stop = await r.open_position_with_stops("p5")
        await wait_until(lambda: bool(r.updates("p5-ts1")), what="the stops told")
        await r.post("/_sim/stream-fault", {"fault": "lose", "topic": "execution", "count": 1})
        await r.post("/_sim/stream-fault", {"fault": "blank", "topic": "order", "field": "avgPrice"})
        fired = await r.post("/_sim/mark", {"symbol": SYMBOL, "price": str(stop - Decimal("0.001"))})
        assert len(fired["triggered"]) == 1
        await wait_until(lambda: r.filled("p5-sl1"), within=30, what="the fill of the stop")
        filled = r.updates("p5-sl1")[-1].order
        assert filled.venue_order_id == fired["triggered"][0]
        assert filled.filled_quantity == Decimal(100)
        executions = await _executions_of(r, fired["triggered"][0])
        assert len(executions) == 1
        assert filled.average_price == Decimal(executions[0]["execPrice"])


async def test_a_lost_execution_with_rest_failing_too_is_told_filled_without_a_made_up_price() -> None:
    """With neither the execution message nor REST's execution list, the fill is still told (the position
    is over), without a price rather than a guessed one; once REST answers, a query gives the real one."""
    async with rig(symbols=[SYMBOL]) as r:
        stop = await r.open_position_with_stops("p6")
        await wait_until(lambda: bool(r.updates("p6-ts1")), what="the stops told")
        await r.post("/_sim/fault", {"targets": ["GET:execution/list"], "fault": "error", "count": 100})
        await r.post("/_sim/stream-fault", {"fault": "lose", "topic": "execution", "count": 1})
        await r.post("/_sim/stream-fault", {"fault": "blank", "topic": "order", "field": "avgPrice"})
        fired = await r.post("/_sim/mark", {"symbol": SYMBOL, "price": str(stop - Decimal("0.001"))})
        await wait_until(lambda: r.filled("p6-sl1"), within=30, what="the fill of the stop")
        filled = r.updates("p6-sl1")[-1].order
        assert filled.average_price is None
        assert filled.filled_quantity == Decimal(100)
        await r.post("/_sim/clear-faults", {})
        queried = await r.venue.fetch_order(SYMBOL, "p6-sl1")
        assert queried.status is OrderStatus.FILLED
        executions = await _executions_of(r, fired["triggered"][0])
        assert queried.average_price == Decimal(executions[0]["execPrice"])


async def test_the_lose_and_blank_faults_name_a_topic_and_a_field_the_venue_has() -> None:
    async with rig(symbols=[SYMBOL]) as r:
        for body, says in (
            ({"fault": "lose", "topic": "tickers"}, "unknown topic"),
            ({"fault": "blank", "topic": "execution", "field": "execPrice"}, "no field"),
            ({"fault": "blank", "topic": "order", "field": "qty"}, "no field"),
        ):
            async with r.control.post(f"{r.base_url}/_sim/stream-fault", json=body) as response:
                assert response.status == 400
                assert says in await response.text()


async def _executions_of(r: Rig, order_id: str) -> list[dict[str, Any]]:
    """The venue's own execution rows of one order, as `execution/list` answers them (signed here, as
    Bybit documents: HMAC-SHA256 over timestamp + key + recvWindow + query string)."""
    query = urlencode({"category": "linear", "symbol": SYMBOL, "orderId": order_id})
    stamp, window = str(int(time.time() * 1000)), "5000"
    sign = hmac.new(SECRET.encode(), (stamp + KEY + window + query).encode(), hashlib.sha256).hexdigest()
    headers = {
        "X-BAPI-API-KEY": KEY,
        "X-BAPI-TIMESTAMP": stamp,
        "X-BAPI-RECV-WINDOW": window,
        "X-BAPI-SIGN": sign,
    }
    async with r.control.get(f"{r.base_url}/v5/execution/list?{query}", headers=headers) as response:
        answer = await response.json()
    assert answer["retCode"] == 0, answer
    return list(answer["result"]["list"])


async def test_late_events_of_an_earlier_positions_stop_are_not_named_after_the_current_stop() -> None:
    """F7: Bybit's position stops carry no id of ours, and a new stop is a new venue order. The events of
    the previous position's hard stop (fired, filled) arrive late, after a new position on the symbol got
    its own hard stop: they are told under the old stop's id, never under the new one's (which would say
    a stop still protecting a live position fired and filled)."""
    async with rig(symbols=[SYMBOL]) as r:
        stop = await r.open_position_with_stops("q1")
        await wait_until(
            lambda: bool(r.updates("q1-sl1")) and bool(r.updates("q1-ts1")), what="the first stops told"
        )
        await r.post("/_sim/stream-fault", {"fault": "delay", "ms": 1500})
        fired = await r.post("/_sim/mark", {"symbol": SYMBOL, "price": str(stop - Decimal("0.001"))})
        assert len(fired["triggered"]) == 1
        mark = (await r.venue.fetch_mark_prices([SYMBOL]))[SYMBOL].price
        second = (mark * Decimal("0.8")).quantize(Decimal("0.0001"))
        await r.venue.create_market_order_with_stop(
            SYMBOL, OrderSide.BUY, Decimal(100), second, client_order_id="q2-e", stop_client_order_id="q2-sl1"
        )
        await wait_until(
            lambda: bool(r.updates("q2-sl1")), within=30, what="the late events, then the new stop's"
        )
        await r.post("/_sim/clear-faults", {})
        assert r.filled("q1-sl1")
        assert r.updates("q1-sl1")[-1].order.venue_order_id == fired["triggered"][0]
        assert [u.order.status for u in r.updates("q2-sl1")] == [OrderStatus.NEW]
        assert r.updates("q2-sl1")[-1].order.venue_order_id != fired["triggered"][0]
        current = await r.venue.fetch_order(SYMBOL, "q2-sl1")
        assert current.status is OrderStatus.NEW
        assert current.stop_price == second


async def test_late_events_of_an_earlier_stop_never_seen_are_not_named_after_the_current_stop() -> None:
    """F7, the old stop's venue order unknown (its first event late as well): the late rows carry the old
    trigger price, which is not the current stop's, so they are not named after it."""
    async with rig(symbols=[SYMBOL]) as r:
        await r.post("/_sim/stream-fault", {"fault": "delay", "ms": 1500})
        stop = await r.open_position_with_stops("u1")
        fired = await r.post("/_sim/mark", {"symbol": SYMBOL, "price": str(stop - Decimal("0.001"))})
        assert len(fired["triggered"]) == 1
        mark = (await r.venue.fetch_mark_prices([SYMBOL]))[SYMBOL].price
        second = (mark * Decimal("0.8")).quantize(Decimal("0.0001"))
        await r.venue.create_market_order_with_stop(
            SYMBOL, OrderSide.BUY, Decimal(100), second, client_order_id="u2-e", stop_client_order_id="u2-sl1"
        )
        await wait_until(lambda: bool(r.updates("u2-sl1")), within=30, what="the new stop told")
        await r.post("/_sim/clear-faults", {})
        assert [u.order.status for u in r.updates("u2-sl1")] == [OrderStatus.NEW]
        assert r.updates("u2-sl1")[-1].order.venue_order_id != fired["triggered"][0]
        assert r.filled("u1-sl1")  # the old one's fill, under its own id
        assert (await r.venue.fetch_order(SYMBOL, "u2-sl1")).status is OrderStatus.NEW


async def test_a_late_deactivation_of_the_previous_trailing_stop_is_not_named_after_the_current_one() -> None:
    """F7, a trailing stop: the previous position's trailing stop, deactivated by Bybit when its position
    closed, is told late, after the new position on the symbol got its own trailing stop. A trailing
    stop's trigger moves, so the venue order the row is known under decides: told as the old stop's
    cancel, never as "the new trailing stop was cancelled on the venue" (which re-places a live stop)."""
    async with rig(symbols=[SYMBOL]) as r:
        stop = await r.open_position_with_stops("t1")
        await wait_until(
            lambda: bool(r.updates("t1-sl1")) and bool(r.updates("t1-ts1")), what="the first stops told"
        )
        await r.post("/_sim/stream-fault", {"fault": "delay", "ms": 1500})
        await r.post("/_sim/mark", {"symbol": SYMBOL, "price": str(stop - Decimal("0.001"))})
        mark = (await r.venue.fetch_mark_prices([SYMBOL]))[SYMBOL].price
        await r.venue.create_market_order_with_stop(
            SYMBOL,
            OrderSide.BUY,
            Decimal(100),
            (mark * Decimal("0.8")).quantize(Decimal("0.0001")),
            client_order_id="t2-e",
            stop_client_order_id="t2-sl1",
        )
        await r.venue.create_trailing_stop_order(
            SYMBOL,
            OrderSide.BUY.opposite,
            Decimal(100),
            Decimal(5),
            client_order_id="t2-ts1",
            activation_price=(mark * Decimal("1.05")).quantize(Decimal("0.0001")),
        )
        await wait_until(
            lambda: bool(r.updates("t2-ts1")), within=30, what="the late rows, then the new stop's"
        )
        await r.post("/_sim/clear-faults", {})
        assert any(u.order.status is OrderStatus.CANCELED for u in r.updates("t1-ts1"))
        assert [u.order.status for u in r.updates("t2-ts1")] == [OrderStatus.NEW]
        assert (await r.venue.fetch_order(SYMBOL, "t2-ts1")).status is OrderStatus.NEW


async def test_an_entry_cancelled_part_filled_is_told_with_what_filled_and_its_price() -> None:
    """Bybit: a derivatives order `Cancelled` "may have an executed qty" (`PartiallyFilledCanceled` is
    spot's alone). A market entry that filled 40 of 100 and had the rest cancelled was read off the `order`
    topic as cancelled with nothing filled: the engine took the entry for failed and the 40 the venue held
    waited, without a trailing stop, for a reconcile pass to adopt them. The stream now tells the 40 at
    the execution's price, as a query of the order does (and the emulator says `Cancelled`, not spot's
    status)."""
    async with rig(symbols=[SYMBOL]) as r:
        r.emulator.core.set_market_fill(0.0, share=Decimal("0.4"))
        await r.venue.create_market_order(SYMBOL, OrderSide.BUY, Decimal(100), client_order_id="p9-e")
        await wait_until(
            lambda: any(u.order.status.is_final for u in r.updates("p9-e")), what="the entry's end told"
        )
        told = next(u.order for u in r.updates("p9-e") if u.order.status.is_final)
        queried = await r.venue.fetch_order(SYMBOL, "p9-e")
        assert queried.filled_quantity == Decimal(40)
        assert (told.status, told.filled_quantity) == (OrderStatus.CANCELED, Decimal(40))
        assert told.average_price == queried.average_price
        assert told.average_price is not None


async def test_a_local_clock_behind_the_venues_still_gets_the_account_stream() -> None:
    """The auth's `expires` was counted on our own clock while REST corrects for its drift: with the
    local clock 30 s behind Bybit's, REST worked and every auth was refused. Bybit says so with a bare
    "Params Error", which the reader took for a wrong key: the account stream stopped for good (fills and
    fired stops heard only by polling) until the engine was restarted, even once the clock was right. It
    now counts `expires` on the venue's clock, as REST does."""
    sim = SimVenueSettings(seed=7, volatility=0.0, symbols=[SYMBOL])
    emulator = BybitEmulator(sim, api_key=KEY, api_secret=SECRET, control=True)
    async with running(emulator) as base_url, aiohttp.ClientSession() as control:
        async with control.post(f"{base_url}/_sim/skew", json={"seconds": 30}) as answer:
            assert answer.status == 200  # our clock is 30 s behind the venue's
        venue = _venue(base_url, FAST)
        await venue.connect()
        await venue.load_markets()
        subject = Rig(venue, emulator, base_url, control)
        async with reading(subject, [SYMBOL]):  # entered once the account stream is live
            assert _states_of(venue)["account"].connected
            assert emulator.streams.handshakes["private"] == 1


async def test_an_auth_refused_as_expired_is_tried_again_with_the_venues_clock_read_again() -> None:
    """Our clock moved after the venue's was read (a clock step, a suspended VM): Bybit refuses the next
    auth with "Params Error". That is no wrong key: the clock is read again and the stream comes back."""
    async with rig(symbols=[SYMBOL]) as r:
        async with r.control.post(f"{r.base_url}/_sim/skew", json={"seconds": 30}) as answer:
            assert answer.status == 200
        before = len(r.gaps())
        await r.post("/_sim/stream-fault", {"fault": "drop"})
        await wait_until(lambda: len(r.gaps()) > before, within=20, what="the account stream back")
        assert _states_of(r.venue)["account"].connected
        # The first, the one after the drop that was refused, and the one with the clock read again.
        assert r.emulator.streams.handshakes["private"] == 3


async def test_a_signed_call_refused_for_its_timestamp_reads_the_venues_clock_again_at_once() -> None:
    """The venue's clock moved against ours after it was read (an operator's `/_sim/skew -8`): every signed
    REST call was refused with 10002 until the markets' reload re-read it, up to 5 minutes. A stop removed
    by hand meanwhile stayed unreplaced 3 min 13 s. The first refusal reads the venue's time again, so the
    caller's next try goes through."""
    async with rig(symbols=[SYMBOL]) as r:
        await r.venue.fetch_positions()  # signed, with the clock as read at the start
        async with r.control.post(f"{r.base_url}/_sim/skew", json={"seconds": -8}) as answer:
            assert answer.status == 200  # the venue's clock is now 8 s behind ours
        with pytest.raises(Retryable) as refused:
            await r.venue.fetch_positions()
        assert refused.value.venue_code == 10002
        # The venue's time read again beside the refusal (which is not held for it): the next try is
        # signed right, at once, not after the next reload of markets.

        async def signed_right() -> bool:
            try:
                return await r.venue.fetch_positions() == []
            except Retryable:
                return False

        await wait_until(signed_right, within=5.0, what="a signed call taken again")


async def test_a_clock_that_moves_again_soon_after_a_read_is_read_again() -> None:
    """The venue's clock moved 60 s, was read, then moved back 1.5 s later: the next refusals, signed with
    the offset just read, found the time read again only 5 s after the first read (42 hard stops off up to
    9.4 s and the breaker tripped, a reviewer). A refusal a second after the last read reads it again."""
    async with rig(symbols=[SYMBOL]) as r:
        await r.venue.fetch_positions()

        async def skew(seconds: float) -> None:
            async with r.control.post(f"{r.base_url}/_sim/skew", json={"seconds": seconds}) as answer:
                assert answer.status == 200

        async def signed_right() -> bool:
            try:
                return await r.venue.fetch_positions() == []
            except Retryable:
                return False

        await skew(60)
        with pytest.raises(Retryable):
            await r.venue.fetch_positions()
        await wait_until(signed_right, within=5.0, what="signed right after the first read")
        read_at = time.monotonic()
        await asyncio.sleep(1.5)
        await skew(0)  # back: the offset just read is 60 s wrong now
        await wait_until(signed_right, within=10.0, what="signed right after the clock moved back")
        # Read again at the first refusal after it, not 5 s after the first read.
        assert time.monotonic() - read_at < 4.0, time.monotonic() - read_at


async def test_a_call_refused_for_its_timestamp_is_not_held_while_the_venues_clock_is_read() -> None:
    """Every caller refused with 10002 waited for the venue's time to be read again before its refusal was
    raised: with that read slow (up to the HTTP timeout, as long as a call's whole budget), a protective
    create ran out its budget and was taken for an outcome unknown (a reviewer: three refused calls raised
    after 8.0 s). The refusal is raised as it came; the read goes on beside it."""
    async with rig(symbols=[SYMBOL]) as r:
        await r.venue.fetch_positions()
        async with r.control.post(f"{r.base_url}/_sim/skew", json={"seconds": -8}) as answer:
            assert answer.status == 200
        r.emulator.faults.force((Target("GET", "market/time"),), parse_bybit_fault("latency:3000"), count=1)
        with pytest.raises(Retryable):
            await r.venue.fetch_positions()
        # Raised before the time read (held 3 s by the venue) has answered: a call at once is still refused.
        with pytest.raises(Retryable):
            await r.venue.fetch_positions()


async def test_a_connection_the_venue_keeps_busy_is_not_cut_as_idle() -> None:
    """Bybit cuts a connection after 10 minutes "if there is no ping-pong and no stream data sent from
    server end". The emulator counted only what the client sent: the marks connection, busy with tickers
    and so never pinged by our client, was cut every 10 minutes in rehearsal (144 reconnects a day that
    production does not have). Here the idle limit is 3 s and the client pings after 2 s of silence."""
    quiet = StreamSettings(stall_seconds=4.0, stale_mark_seconds=5.0, subscription_check_seconds=60.0)
    async with rig(quiet, symbols=[SYMBOL]) as r:
        r.emulator.streams.idle_close_seconds = 3.0
        before = dict(r.emulator.streams.handshakes)
        await asyncio.sleep(5.0)  # tickers every second: the marks connection never goes quiet
        assert r.emulator.streams.handshakes == before
        assert _states(r)["marks"].connected
        assert _states(r)["account"].connected  # silent, but pinged before the limit


async def test_a_fill_after_the_venue_restarted_carries_its_own_price_not_an_earlier_orders() -> None:
    """The Bybit emulator stopped and started again on its port, its book lost; the account stream came
    back, and the next entry on the symbol was told filled at the previous entry's price (ten times its
    own: the position's stops were then placed from it, and closed it at market; a reviewer). The
    emulator numbered its orders again from the same start, and the stream took the price it had summed
    from an order id's executions before the venue's own average on the order's row. The row's average
    comes first now (the executions' sum where the row has none), and the emulator's ids, as Bybit's,
    are never given twice."""
    sim = SimVenueSettings(seed=7, volatility=0.0, symbols=["SFPUSDT", "BTCUSDT", "ETHUSDT"])
    first = BybitEmulator(sim, api_key=KEY, api_secret=SECRET, control=True)
    async with contextlib.AsyncExitStack() as stack:
        control = await stack.enter_async_context(aiohttp.ClientSession())
        serving = running(first)
        base_url = await serving.__aenter__()
        port = int(base_url.rsplit(":", 1)[1])
        venue = _venue(base_url, FAST)
        await venue.connect()
        stack.push_async_callback(venue.close)
        await venue.load_markets()
        r = Rig(venue, first, base_url, control)
        await stack.enter_async_context(reading(r, [SYMBOL]))
        await venue.create_market_order(SYMBOL, OrderSide.BUY, Decimal(100), client_order_id="a-e")
        await wait_until(lambda: r.filled("a-e"), what="the first entry told filled")
        first_price = r.updates("a-e")[-1].order.average_price
        assert first_price is not None
        await serving.__aexit__(None, None, None)  # the venue gone, its book with it

        second = BybitEmulator(sim, api_key=KEY, api_secret=SECRET, control=True)
        await stack.enter_async_context(running(second, port))
        r.emulator = second
        await r.post("/_sim/mark", {"symbol": SYMBOL, "price": str(first_price * 2)})
        await wait_until(lambda: len(r.gaps()) == 2, within=30.0, what="the account stream back")
        await venue.create_market_order(SYMBOL, OrderSide.BUY, Decimal(100), client_order_id="b-e")
        await wait_until(lambda: r.filled("b-e"), what="the second entry told filled")
        told = r.updates("b-e")[-1].order
        queried = await venue.fetch_order(SYMBOL, "b-e")
        assert queried.average_price is not None
        assert queried.average_price > first_price  # (the case: its fill is at the new price)
        assert told.average_price == queried.average_price

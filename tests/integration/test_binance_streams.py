"""Binance's push streams on the real path: the venue's websocket client against the emulator's streams
over loopback (same server and port as its REST API, Binance's paths and shapes). The emulator is the
venue's truth; every fault the control API can stage must end with fresh marks, the subscriptions back
and a `StreamGap` for the account stream, so nothing is missed silently."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from engine.exchange.errors import Banned
from engine.exchange.port import (
    MarkPrice,
    OrderSide,
    OrderStatus,
    OrderUpdate,
    PositionUpdate,
    StreamState,
)
from engine.venues.binance_emulator import BinanceEmulator, running
from engine.venues.binance_streams import KEY_PROVEN_SECONDS, PRODUCTION_WS_URL, StreamSettings
from engine.venues.binance_venue import BinanceUsdmVenue
from engine.venues.ccxt_venue import CcxtVenueConfig
from engine.venues.sim.settings import SimVenueSettings
from tests.support.stream_rig import StreamRig, reading
from tests.support.waiting import wait_until

KEY, SECRET = "streams-key", "streams-secret"
SYMBOL = "SFPUSDT"
FAST = StreamSettings(
    stall_seconds=1.5,
    stale_mark_seconds=2.5,
    backoff_initial_seconds=0.2,
    backoff_max_seconds=2.0,
    stable_seconds=3.0,
)


@dataclass
class Rig(StreamRig):
    venue: BinanceUsdmVenue
    emulator: BinanceEmulator

    def fresh_mark_since(self, moment: float, symbol: str = SYMBOL) -> bool:
        return super().fresh_mark_since(moment, symbol)

    async def market_subscriptions(self) -> list[str]:
        state = await self.state()
        return [
            s for c in state["streams"]["connections"] if c["kind"] == "market" for s in c["subscriptions"]
        ]

    async def user_connected(self) -> bool:
        state = await self.state()
        return any(c["kind"] == "user" and not c["silenced"] for c in state["streams"]["connections"])

    async def open_position_with_stop(self, client_id: str) -> Decimal:
        mark = (await self.venue.fetch_mark_prices([SYMBOL]))[SYMBOL].price
        await self.venue.create_market_order(
            SYMBOL, OrderSide.BUY, Decimal(100), client_order_id=f"{client_id}-e"
        )
        stop = (mark * Decimal("0.9")).quantize(Decimal("0.0001"))
        await self.venue.create_stop_market_order(
            SYMBOL, OrderSide.SELL, Decimal(100), stop, client_order_id=client_id
        )
        return stop


def _keeping_alive(every: float, *, valid: float = 3600.0) -> StreamSettings:
    """Fast stream timings with a keep-alive `every` seconds and a key's hour of `valid` seconds, and no
    stall for 30 s (a silent connection is not what these tests stage)."""
    return StreamSettings(
        stall_seconds=30.0,
        stale_mark_seconds=2.5,
        backoff_initial_seconds=0.2,
        backoff_max_seconds=2.0,
        stable_seconds=3.0,
        listen_key_keepalive_seconds=every,
        listen_key_valid_seconds=valid,
    )


@contextlib.asynccontextmanager
async def rig(settings: StreamSettings = FAST, symbols: list[str] | None = None) -> AsyncIterator[Rig]:
    sim = SimVenueSettings(seed=7, volatility=0.0, symbols=["SFPUSDT", "BTCUSDT", "ETHUSDT"])
    emulator = BinanceEmulator(sim, api_key=KEY, api_secret=SECRET, control=True)
    async with running(emulator) as base_url, aiohttp.ClientSession() as control:
        venue = BinanceUsdmVenue(
            CcxtVenueConfig(
                kind="binanceusdm",
                api_key=KEY,
                api_secret=SECRET,
                base_url=base_url,
                mark_poll_seconds=0.2,
                streams=settings,
            )
        )
        await venue.connect()
        await venue.load_markets()
        subject = Rig(venue, emulator, base_url, control)
        async with reading(subject, symbols):
            await wait_until(subject.user_connected, what="the user-data connection")
            yield subject


async def test_a_fired_stop_reaches_watch_account_with_our_id_and_the_fill_price() -> None:
    async with rig() as r:
        stop = await r.open_position_with_stop("stop-1")
        await wait_until(
            lambda: any(u.order.status is OrderStatus.NEW for u in r.updates("stop-1")), what="NEW"
        )
        fired = await r.post("/_sim/mark", {"symbol": SYMBOL, "price": str(stop - Decimal("0.001"))})
        assert fired["triggered"] == ["stop-1"]
        await wait_until(
            lambda: any(u.order.status is OrderStatus.FILLED for u in r.updates("stop-1")), what="the fill"
        )
        statuses = [u.order.status for u in r.updates("stop-1")]
        assert statuses == [OrderStatus.NEW, OrderStatus.TRIGGERED, OrderStatus.FILLED]
        filled = r.updates("stop-1")[-1].order
        assert filled.filled_quantity == Decimal(100)
        assert filled.average_price is not None
        assert filled.average_price <= stop
        # The fill price is the venue's own (what a query of the order answers).
        queried = await r.venue.fetch_order(SYMBOL, "stop-1")
        assert queried.average_price == filled.average_price
        flat = [e for e in r.account if isinstance(e, PositionUpdate) and e.symbol == SYMBOL]
        assert flat[-1].quantity == 0
        # The child order the algo order placed is not told as an order of its own.
        assert all(
            e.order.client_order_id in ("stop-1", "stop-1-e") for e in r.account if isinstance(e, OrderUpdate)
        )


async def test_a_stop_sitting_in_triggering_is_told_triggered_before_it_fills() -> None:
    async with rig() as r:
        await r.post("/_sim/fault", {"targets": ["POST:algoOrder"], "fault": "triggering:1.5", "count": 1})
        stop = await r.open_position_with_stop("stop-t")
        await r.post("/_sim/mark", {"symbol": SYMBOL, "price": str(stop - Decimal("0.001"))})
        await wait_until(
            lambda: any(u.order.status is OrderStatus.TRIGGERED for u in r.updates("stop-t")),
            what="TRIGGERED",
        )
        assert not any(u.order.status is OrderStatus.FILLED for u in r.updates("stop-t"))
        await wait_until(
            lambda: any(u.order.status is OrderStatus.FILLED for u in r.updates("stop-t")),
            what="the deferred fill",
        )


async def test_a_cancelled_stop_is_told_cancelled() -> None:
    async with rig() as r:
        await r.open_position_with_stop("stop-c")
        await r.venue.cancel_order(SYMBOL, "stop-c")
        await wait_until(
            lambda: any(u.order.status is OrderStatus.CANCELED for u in r.updates("stop-c")), what="CANCELED"
        )


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
    subscriptions = await r.market_subscriptions()
    assert subscriptions == [f"{SYMBOL.lower()}@markPrice@1s"]
    assert await r.user_connected()
    # And the account stream carries events again.
    stop = await r.open_position_with_stop(f"after-{fault['fault']}")
    await r.post("/_sim/mark", {"symbol": SYMBOL, "price": str(stop - Decimal("0.001"))})
    await wait_until(
        lambda: any(u.order.status is OrderStatus.FILLED for u in r.updates(f"after-{fault['fault']}")),
        within=20,
        what=f"a fill told after {fault}",
    )


def _stream_marks_since(r: Rig, moment: float) -> bool:
    return r.stream_marks_since(moment)


@pytest.mark.parametrize(
    ("fault", "expect_gap"),
    [
        ({"fault": "drop"}, True),
        ({"fault": "stall", "seconds": 30}, True),
        ({"fault": "drop_subscription"}, False),
        ({"fault": "expire_listen_key"}, True),
    ],
    ids=["drop", "stall", "drop-subscription", "expire-listen-key"],
)
async def test_each_stream_fault_ends_with_fresh_marks_the_subscription_back_and_a_gap(
    fault: dict[str, Any], expect_gap: bool
) -> None:
    async with rig(symbols=[SYMBOL]) as r:
        await _fault_and_recover(r, fault, expect_gap=expect_gap)
        states = {s.name: s for s in r.venue.stream_states()}
        assert states["marks"].connected
        assert states["account"].connected
        assert states["marks"].subscriptions == 1


async def test_delayed_and_reordered_account_events_still_end_in_the_final_state() -> None:
    async with rig(symbols=[SYMBOL]) as r:
        await r.post("/_sim/stream-fault", {"fault": "delay", "ms": 300})
        await r.post("/_sim/stream-fault", {"fault": "reorder", "count": 5})
        stop = await r.open_position_with_stop("stop-r")
        await wait_until(lambda: bool(r.updates("stop-r")), what="the placement told")
        await r.post("/_sim/mark", {"symbol": SYMBOL, "price": str(stop - Decimal("0.001"))})
        await wait_until(
            lambda: any(u.order.status is OrderStatus.FILLED for u in r.updates("stop-r")), what="the fill"
        )
        # In reverse order the fill came first: what came after it (TRIGGERED) must not undo it. A marker
        # order placed afterwards arrives after the whole batch (one connection delivers in order).
        await r.venue.create_market_order(SYMBOL, OrderSide.BUY, Decimal(100), client_order_id="marker")
        await wait_until(lambda: bool(r.updates("marker")), what="the marker, after the whole batch")
        assert [u.order.status for u in r.updates("stop-r")] == [OrderStatus.NEW, OrderStatus.FILLED]
        await r.post("/_sim/clear-faults", {})


async def test_a_reconnect_storm_does_not_spin() -> None:
    """The venue drops every connection for 4 s: the client backs off (bounded attempts), then recovers."""
    async with rig(symbols=[SYMBOL]) as r:
        before = (await r.state())["streams"]["handshakes"]
        staged_at = time.monotonic()
        await r.post("/_sim/stream-fault", {"fault": "drop", "seconds": 4})
        await wait_until(
            lambda: len(r.gaps()) >= 2, within=30, what="the account stream back after the storm"
        )
        await wait_until(lambda: _stream_marks_since(r, staged_at + 4), within=30, what="marks back")
        after = (await r.state())["streams"]["handshakes"]
        # Backoff 0.2 s doubling (jitter 0.5-1x) to 2 s: within 4 s at most ~7 attempts per stream.
        # A client reconnecting at once would make hundreds.
        for kind in ("market", "user"):
            assert after[kind] - before[kind] <= 10, (kind, before, after)
        assert (await r.market_subscriptions()) == [f"{SYMBOL.lower()}@markPrice@1s"]


async def test_the_account_streams_last_message_is_not_moved_by_connections_the_venue_closes_at_once() -> (
    None
):
    """The venue closes every connection straight after its handshake for a while. The account stream's
    "last message" was set at each connection's opening: its age, on /metrics and in the stale-stream alert
    ("no message for 0.7s"), went back to nothing at every attempt through a minute of silence (r75). It is
    the time of the last frame the venue sent."""
    async with rig(symbols=[SYMBOL]) as r:

        def account() -> StreamState:
            return {s.name: s for s in r.venue.stream_states()}["account"]

        await wait_until(lambda: account().connected, what="the account stream up")
        await r.post("/_sim/stream-fault", {"fault": "drop", "seconds": 6})
        dropped_at = time.monotonic()
        before = (await r.state())["streams"]["handshakes"]["user"]
        heard: list[float | None] = []
        while time.monotonic() - dropped_at < 5.5:  # (within the storm: nothing can come)
            heard.append(account().last_event_at)
            await asyncio.sleep(0.05)
        assert (await r.state())["streams"]["handshakes"]["user"] - before >= 2  # connections were opened
        late = [at - dropped_at for at in heard if at is not None and at > dropped_at + 0.2]
        assert not late, (
            f"last message moved {len(late)} times into the storm, the latest {max(late):.1f}s in"
        )


async def test_a_subscription_asked_for_while_disconnected_is_sent_on_reconnect() -> None:
    async with rig(symbols=[SYMBOL]) as r:
        await r.post("/_sim/stream-fault", {"fault": "drop", "seconds": 1.5})
        await wait_until(
            lambda: not {s.name: s for s in r.venue.stream_states()}["marks"].connected, what="disconnected"
        )
        second: list[MarkPrice] = []

        async def read_btc() -> None:
            async for mark in r.venue.watch_mark_prices(["BTCUSDT"]):
                second.append(mark)

        task = asyncio.create_task(read_btc())
        try:
            await wait_until(
                lambda: {s.name: s for s in r.venue.stream_states()}["marks"].connected,
                within=20,
                what="back",
            )
            await wait_until(
                lambda: _has_subscription(r, "btcusdt@markPrice@1s"), within=20, what="BTC subscribed"
            )
            await wait_until(lambda: bool(second), what="a BTC mark")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _has_subscription(r: Rig, name: str) -> bool:
    return name in await r.market_subscriptions()


async def test_all_market_marks_stream_and_rest_fallback_while_it_is_stale() -> None:
    async with rig(symbols=None) as r:
        assert await r.market_subscriptions() == ["!markPrice@arr@1s"]
        await wait_until(
            lambda: {m.symbol for _, m in r.marks} >= {"SFPUSDT", "BTCUSDT", "ETHUSDT"}, what="all"
        )
        staged_at = time.monotonic()
        await r.post("/_sim/stream-fault", {"fault": "stall", "seconds": 60})
        # REST keeps the marks coming while the stream is silent, then the stream is made again.
        await wait_until(
            lambda: r.fresh_mark_since(staged_at, "BTCUSDT"), within=20, what="marks while stalled"
        )
        await wait_until(lambda: _stream_marks_since(r, staged_at), within=20, what="the stream back")
        assert await r.market_subscriptions() == ["!markPrice@arr@1s"]


async def test_a_rest_fallback_that_keeps_failing_is_said_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An operator during a ban: "marks: REST fallback failed (Banned); marks go stale" once a second, 116
    times in a row. Said when it begins, then once a minute while it lasts."""
    caplog.set_level(logging.DEBUG, logger="engine.venues.stream_client")
    settings = StreamSettings(stall_seconds=60.0, stale_mark_seconds=1.0)  # silent, not reconnected
    async with rig(settings=settings, symbols=None) as r:
        await wait_until(lambda: {m.symbol for _, m in r.marks} >= {"BTCUSDT"}, what="marks")
        await r.post("/_sim/fault", {"targets": ["GET:premiumIndex"], "fault": "error", "count": 100_000})
        await r.post("/_sim/stream-fault", {"fault": "stall", "seconds": 60})

        def failures(level: int) -> int:
            return sum(
                1 for x in caplog.records if x.levelno == level and "REST fallback failed" in x.getMessage()
            )

        await wait_until(lambda: failures(logging.DEBUG) >= 3, within=30, what="the fallback failing again")
        assert failures(logging.WARNING) == 1
        # Said as what is polled: every symbol (it said "REST polling for 1 symbol(s)": a reviewer). (Here
        # the silent stream is not reconnected: the fallback lasts, and its words with it.)
        marks = {s.name: s for s in r.venue.stream_states()}["marks"]
        assert marks.detail.startswith("REST polling for every symbol"), marks.detail


async def test_a_refused_keep_alive_makes_a_new_listen_key_and_a_gap() -> None:
    """The key vanished without the `listenKeyExpired` reaching us (the connection was silent then): the
    next keep-alive is refused with -1125 and the client makes a new key, reconnects and reports a gap."""
    settings = _keeping_alive(1.0)
    async with rig(settings=settings, symbols=[SYMBOL]) as r:
        await r.post("/_sim/stream-fault", {"fault": "stall", "seconds": 5})
        await r.post("/_sim/stream-fault", {"fault": "expire_listen_key"})
        await wait_until(lambda: len(r.gaps()) >= 2, within=20, what="a gap after the refused keep-alive")
        assert "keep-alive" in r.gaps()[-1].reason
        await wait_until(r.user_connected, what="the new user-data connection")


async def test_a_stream_dropped_during_a_rest_ban_comes_back_in_it_on_the_key_in_hand() -> None:
    """An operator on the Binance-wire emulator: the account stream dropped during a 418 ban stayed down for
    the whole ban (3 min 36 s), because each reconnect asked for its listen key by REST first, and the ban
    refused that; the engine, blind, counted every position unverified while the venue held all their
    stops. Binance's 418 tells a client to use the websocket: the key in hand (well within its hour, its
    last connection lived) connects again with no REST call, and the stream tells a fill within the ban."""
    async with rig(symbols=[SYMBOL]) as r:
        stop = await r.open_position_with_stop("in-ban")
        await asyncio.sleep(KEY_PROVEN_SECONDS + 0.5)  # the connection has lived: the key is proven
        await r.post("/_sim/fault", {"targets": ["*"], "fault": "ban:60"})
        with pytest.raises(Banned):
            await r.venue.fetch_positions()  # meets the fault: the IP is banned for 60 s from here
        banned_until = time.monotonic() + 60
        gaps = len(r.gaps())
        await r.post("/_sim/stream-fault", {"fault": "drop"})
        await wait_until(lambda: len(r.gaps()) > gaps, within=15, what="the account stream live again")
        await r.post("/_sim/mark", {"symbol": SYMBOL, "price": str(stop - Decimal("0.001"))})
        await wait_until(
            lambda: any(u.order.status is OrderStatus.FILLED for u in r.updates("in-ban")),
            within=15,
            what="the fill told during the ban",
        )
        assert time.monotonic() < banned_until  # (the ban still holds: every REST request is refused)
        with pytest.raises(Banned):
            await r.venue.fetch_positions()


async def test_reconnects_on_the_key_in_hand_keep_its_keep_alive_on_time() -> None:
    """A reconnect on the key in hand extends nothing: each one restarted the keep-alive's full period, so
    reconnects closer together than that period never extended the key, and it died within its hour
    (reviewer r55: reconnects at 20 and 45 minutes, the next keep-alive due at 75, the key dead at 60). The
    keep-alive is due a period after the venue's last answer for the key, whatever reconnects between."""
    period = 5.0  # longer than the reconnects' spacing: restarted at each one, it never came
    settings = _keeping_alive(period)
    async with rig(settings=settings, symbols=[SYMBOL]) as r:
        began = time.monotonic()
        for _ in range(5):  # a drop every ~3 s, each connection proving the key (reused every time)
            await asyncio.sleep(KEY_PROVEN_SECONDS + 0.5)
            gaps = len(r.gaps())
            await r.post("/_sim/stream-fault", {"fault": "drop"})
            await wait_until(lambda n=gaps: len(r.gaps()) > n, within=5, what="the reconnect")
        expires_in = (await r.state())["streams"]["listen_key_expires_in"]
        # Extended within the last period (and a second's slack), not only by the POST at the start.
        elapsed = time.monotonic() - began
        assert elapsed > period + 2.0, elapsed
        assert expires_in > 3600 - (period + 1.0), (expires_in, elapsed)


async def test_a_keep_alive_refused_in_a_ban_is_asked_again_after_it_and_the_stream_goes_on() -> None:
    """The listen key's keep-alive met a ban: the stream was dropped and the key forgotten, so the stream
    stayed down until the ban ended (its reconnect needs a POST). The key lives an hour from its last
    extension: the keep-alive is asked again when the ban ends, and the stream goes on meanwhile."""
    settings = _keeping_alive(1.0)
    async with rig(settings=settings, symbols=[SYMBOL]) as r:
        stop = await r.open_position_with_stop("keep-ban")
        gaps = len(r.gaps())
        await r.post("/_sim/fault", {"targets": ["PUT:listenKey"], "fault": "ban:4"})
        await asyncio.sleep(6)  # the keep-alive met the ban, then went again once it had ended
        assert len(r.gaps()) == gaps, [g.reason for g in r.gaps()]  # the stream never went down
        await r.post("/_sim/mark", {"symbol": SYMBOL, "price": str(stop - Decimal("0.001"))})
        await wait_until(
            lambda: any(u.order.status is OrderStatus.FILLED for u in r.updates("keep-ban")),
            what="the fill told on the same connection",
        )
        assert len(r.gaps()) == gaps


async def test_a_keep_alive_refused_by_a_ban_longer_than_the_keys_hour_keeps_the_stream_to_its_end() -> None:
    """A keep-alive refused by a ban that outlasts the key's hour dropped the stream at once (and its key),
    though the key was good to the hour's end; its reconnect's POST was refused too, so the stream stayed
    down for the rest of the ban (a reviewer). It goes on until the hour is about to end."""
    settings = _keeping_alive(1.0, valid=12.0)  # the hour, scaled (the emulator's key lives its real hour)
    async with rig(settings=settings, symbols=[SYMBOL]) as r:
        gaps = len(r.gaps())
        await r.post("/_sim/fault", {"targets": ["PUT:listenKey"], "fault": "ban:4000"})
        await asyncio.sleep(6)  # the keep-alive met the ban (longer than any key's hour) at 1 s
        assert len(r.gaps()) == gaps, [g.reason for g in r.gaps()]
        assert await r.user_connected()


async def test_the_listen_key_is_in_no_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with rig(symbols=[SYMBOL]) as r:
        async with r.control.post(f"{r.base_url}/fapi/v1/listenKey", headers={"X-MBX-APIKEY": KEY}) as answer:
            key = (await answer.json())["listenKey"]  # Binance answers the account's active key
        await r.post("/_sim/stream-fault", {"fault": "expire_listen_key"})
        await wait_until(lambda: len(r.gaps()) >= 2, within=20, what="the new key in use")
        assert "listenKey" in caplog.text  # ccxt narrated the calls, masked
        assert key not in caplog.text
        assert key not in repr(r.venue.stream_states())


def test_the_stream_host_derives_from_the_configured_url_like_rest() -> None:
    production = BinanceUsdmVenue(
        CcxtVenueConfig(kind="binanceusdm", api_key="k", api_secret="s", testnet=False)
    )
    rehearsal = BinanceUsdmVenue(
        CcxtVenueConfig(kind="binanceusdm", api_key="k", api_secret="s", base_url="http://127.0.0.1:9")
    )
    assert production._websocket_url() == PRODUCTION_WS_URL
    assert rehearsal._websocket_url() == "ws://127.0.0.1:9"
    assert production._config.streams == rehearsal._config.streams  # no stream setting depends on the URL


async def test_a_stop_fired_while_its_reads_still_lag_is_told_once_readable() -> None:
    """A stop fired within its read-after-write lag: the venue cannot say how it ended yet. The stream
    tells the fill once it can, even if nothing else changes on the account meanwhile."""
    async with rig(symbols=[SYMBOL]) as r:
        await r.post("/_sim/fault", {"targets": ["POST:algoOrder"], "fault": "lag:1.5", "count": 1})
        stop = await r.open_position_with_stop("stop-lag")
        await r.post("/_sim/mark", {"symbol": SYMBOL, "price": str(stop - Decimal("0.001"))})
        await wait_until(
            lambda: any(u.order.status is OrderStatus.FILLED for u in r.updates("stop-lag")),
            what="the fill told after the lag",
        )


async def test_closing_the_venue_ends_its_watchers() -> None:
    async with rig(symbols=[SYMBOL]) as r:
        account = r.venue.watch_account()
        marks = r.venue.watch_mark_prices([SYMBOL])
        first = asyncio.ensure_future(anext(account))
        await anext(marks)
        await r.venue.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(first, 10)
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(marks), 10)


async def test_a_listen_key_deleted_by_another_client_is_replaced() -> None:
    """Another process on the same API key deleted the account's listen key (Binance closes the stream):
    the client makes a new key rather than retrying the dead one, and reports the gap."""
    async with rig(symbols=[SYMBOL]) as r:
        headers = {"X-MBX-APIKEY": KEY}
        async with r.control.delete(f"{r.base_url}/fapi/v1/listenKey", headers=headers) as deleted:
            assert deleted.status == 200
        await wait_until(lambda: len(r.gaps()) >= 2, within=20, what="the stream live again on a new key")
        await wait_until(r.user_connected, what="the new user-data connection")
        stop = await r.open_position_with_stop("after-delete")
        await r.post("/_sim/mark", {"symbol": SYMBOL, "price": str(stop - Decimal("0.001"))})
        await wait_until(
            lambda: any(u.order.status is OrderStatus.FILLED for u in r.updates("after-delete")),
            what="a fill told on the new key",
        )


async def test_a_closed_short_is_told_flat_on_its_side_and_an_orphan_stop_expired() -> None:
    async with rig(symbols=[SYMBOL]) as r:
        mark = (await r.venue.fetch_mark_prices([SYMBOL]))[SYMBOL].price
        await r.venue.create_market_order(SYMBOL, OrderSide.SELL, Decimal(100), client_order_id="short-e")
        stop = (mark * Decimal("1.1")).quantize(Decimal("0.0001"))
        await r.venue.create_stop_market_order(
            SYMBOL, OrderSide.BUY, Decimal(100), stop, client_order_id="sl-s"
        )
        # Closed by hand: the stop is left with nothing to reduce.
        await r.venue.create_market_order(
            SYMBOL, OrderSide.BUY, Decimal(100), client_order_id="short-x", reduce_only=True
        )

        def positions() -> list[PositionUpdate]:
            return [e for e in r.account if isinstance(e, PositionUpdate) and e.symbol == SYMBOL]

        await wait_until(lambda: any(p.quantity == 0 for p in positions()), what="flat")
        assert [(p.side.value, p.quantity) for p in positions()] == [("short", 100), ("short", 0)]
        await r.post("/_sim/mark", {"symbol": SYMBOL, "price": str(stop + Decimal("0.001"))})
        await wait_until(
            lambda: any(u.order.status is OrderStatus.EXPIRED for u in r.updates("sl-s")), what="expired"
        )
        expired = r.updates("sl-s")[-1].order
        assert expired.filled_quantity == 0
        assert expired.average_price is None


async def test_a_fired_trailing_stop_is_told_with_our_id_and_its_fill() -> None:
    async with rig(symbols=[SYMBOL]) as r:
        mark = (await r.venue.fetch_mark_prices([SYMBOL]))[SYMBOL].price
        await r.venue.create_market_order(SYMBOL, OrderSide.BUY, Decimal(100), client_order_id="trail-e")
        await r.venue.create_trailing_stop_order(
            SYMBOL, OrderSide.SELL, Decimal(100), Decimal(1), client_order_id="trail-1"
        )
        await wait_until(lambda: bool(r.updates("trail-1")), what="NEW")
        placed = r.updates("trail-1")[0].order
        assert (placed.callback_rate, placed.stop_price) == (Decimal(1), None)
        await r.post("/_sim/mark", {"symbol": SYMBOL, "price": str(mark * Decimal("0.98"))})
        await wait_until(
            lambda: any(u.order.status is OrderStatus.FILLED for u in r.updates("trail-1")), what="the fill"
        )
        filled = r.updates("trail-1")[-1].order
        assert filled.average_price == (await r.venue.fetch_order(SYMBOL, "trail-1")).average_price


async def test_the_marks_streams_last_event_is_its_last_data_not_a_pong() -> None:
    """The venue forgot the mark subscription (`drop_subscription`): the connection stays up and answers
    pings, no mark comes. The stream's "last event" counted every frame, pongs and acks included: the
    metric and the health words said "marks up 0.5s ago" through 26 s of silence while the newest mark
    aged (a reviewer). It is the last data now."""
    async with rig(symbols=[SYMBOL]) as r:
        await wait_until(lambda: _stream_marks_since(r, time.monotonic() - 1.0), what="marks flowing")
        await r.post("/_sim/stream-fault", {"fault": "drop_subscription"})
        dropped_at = time.monotonic()
        # Idle for half the stall time, the client pings and the venue answers: a frame, no data.
        await asyncio.sleep(FAST.stall_seconds * 0.8)
        marks = {s.name: s for s in r.venue.stream_states()}["marks"]
        assert marks.connected
        assert marks.last_event_at is not None
        assert marks.last_event_at <= dropped_at + 0.2, (marks.last_event_at - dropped_at, marks)


async def test_a_client_closing_leaves_the_accounts_listen_key_to_the_others() -> None:
    """Binance gives an account one listen key. An engine stopping deleted it, and with it the user-data
    stream of the engine that had just taken the account over (r80: "closed by the venue; reconnecting"
    at every takeover, a gap and a reconcile pass). A closing client leaves the key; it lapses on its own
    an hour after its last keep-alive."""
    async with rig(symbols=[SYMBOL]) as r:
        other = BinanceUsdmVenue(
            CcxtVenueConfig(
                kind="binanceusdm",
                api_key=KEY,
                api_secret=SECRET,
                base_url=r.base_url,
                mark_poll_seconds=0.2,
                streams=FAST,
            )
        )
        await other.connect()
        await other.load_markets()
        told: list[object] = []

        async def read() -> None:
            async for event in other.watch_account():
                told.append(event)

        reader = asyncio.create_task(read())
        try:
            await wait_until(lambda: len(told) >= 1, what="the other client's stream live")
            gaps_before = len(r.gaps())
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await other.close()
        await asyncio.sleep(2.0)  # (a closed stream is said within the backoff's first step, 0.2 s)
        assert len(r.gaps()) == gaps_before, r.gaps()
        assert await r.user_connected()


async def test_an_account_stream_whose_reconnect_a_ban_refuses_is_back_right_after_the_ban() -> None:
    """A reviewer (r82): the listen key gone during a 418 ban, the account stream's reconnect needs a POST,
    which the ban refuses; each refusal said when the ban ends, yet the reconnect kept its exponential
    backoff and came 17 s after the ban's end (up to 30 s), fills and cancels learned only by polling
    meanwhile. The venue's word sets the next attempt: right after the ban."""
    settings = StreamSettings(
        stall_seconds=30.0,  # (the production backoff: 0.5 s doubling to 30 s)
        stale_mark_seconds=2.5,
        backoff_initial_seconds=0.5,
        backoff_max_seconds=30.0,
        stable_seconds=30.0,
    )
    async with rig(settings=settings, symbols=[SYMBOL]) as r:
        ban = 25.0
        await r.post("/_sim/fault", {"targets": ["*"], "fault": f"ban:{ban:g}"})
        with pytest.raises(Banned):
            await r.venue.fetch_positions()  # meets the fault: the IP is banned from here
        banned_until = time.monotonic() + ban
        await r.post("/_sim/stream-fault", {"fault": "expire_listen_key"})

        async def dropped() -> bool:
            return not await r.user_connected()

        await wait_until(dropped, within=10, what="the account stream dropped")
        await wait_until(r.user_connected, within=ban + 35, what="the account stream back")
        back = time.monotonic() - banned_until
        assert back < 2.5, f"back {back:.1f}s after the ban's end"

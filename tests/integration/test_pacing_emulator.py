"""Production pacing on the real path: the engine and ccxt against the Binance-wire emulator over loopback,
configured exactly as for a real Binance account (only the URL differs). The emulator is the venue's truth:
what it counted, refused and served at once."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp

from engine.clock import SystemClock
from engine.exchange.errors import RateLimited
from engine.order_budget import OrderBudget
from engine.pacing import Lane, RequestPacer, VenuePacing, call_with_send_timeout
from engine.venues.binance_emulator import BinanceEmulator, FaultPlan, running
from engine.venues.binance_emulator.faults import parse_fault_spec
from engine.venues.binance_limits import USED_WEIGHT_HEADER
from engine.venues.binance_venue import BinanceUsdmVenue
from engine.venues.ccxt_venue import CcxtVenueConfig
from engine.venues.sim.settings import SimVenueSettings
from storage.database import Database
from tests.integration.engine_support import binance_wire_engine
from tests.support.binance_client import BinanceClient
from tests.support.waiting import wait_until

KEY, SECRET = "pacing-key", "pacing-secret"


def _binance(base_url: str) -> BinanceUsdmVenue:
    return BinanceUsdmVenue(
        CcxtVenueConfig(kind="binanceusdm", api_key=KEY, api_secret=SECRET, base_url=base_url)
    )


async def test_the_venues_weight_count_reaches_the_pacer_and_heavy_reads_wait() -> None:
    """Another process spends this IP's weight (the emulator counts it; its `X-MBX-USED-WEIGHT-1M` says
    so): the pacer books the venue's count and a heavy read waits below the limit instead of drawing a
    429 (and, if the client kept going, a 418 ban)."""
    settings = SimVenueSettings(seed=3, volatility=0.0, symbols=["SFPUSDT", "BTCUSDT"])
    emulator = BinanceEmulator(settings, api_key=KEY, api_secret=SECRET, control=True)
    async with running(emulator) as base_url, aiohttp.ClientSession() as session:
        venue, pacer = _paced(base_url)
        try:
            await venue.load_markets()
            other = BinanceClient(session, base_url, KEY, SECRET)
            for _ in range(50):  # another client: 50 × 40 = 2 000 of the minute's 2 400
                answer = await other.signed("GET", "/fapi/v1/openAlgoOrders")
                assert answer.status == 200
            used_by_venue = int(answer.headers[USED_WEIGHT_HEADER])
            assert used_by_venue >= 2000
            await venue.fetch_mark_prices(["SFPUSDT"])
            assert pacer.used_fraction() * 2400 >= used_by_venue
            # A heavy read (40) would cross the share reads may use: it waits instead of being sent.
            clock = SystemClock()
            heavy = asyncio.create_task(
                call_with_send_timeout(clock, 10.0, venue.fetch_open_protective_orders(), Lane.READ)
            )
            await asyncio.sleep(0.5)
            assert not heavy.done()
            heavy.cancel()
            await asyncio.gather(heavy, return_exceptions=True)
            assert venue.refusals == {}
        finally:
            await venue.close()


async def test_a_429_holds_every_request_until_its_retry_after() -> None:
    settings = SimVenueSettings(seed=3, volatility=0.0, symbols=["SFPUSDT", "BTCUSDT"])
    emulator = BinanceEmulator(settings, api_key=KEY, api_secret=SECRET, control=True)
    async with running(emulator) as base_url, aiohttp.ClientSession() as session:
        venue, _pacer = _paced(base_url)
        try:
            await venue.load_markets()
            forced = await session.post(
                f"{base_url}/_sim/fault", json={"call": "fetch_positions", "fault": "ratelimit", "count": 1}
            )
            assert forced.status == 200
            with contextlib.suppress(RateLimited):
                await venue.fetch_positions()
            assert venue.refusals == {429: 1}
            clock = SystemClock()
            started = time.monotonic()
            held = asyncio.create_task(
                call_with_send_timeout(clock, 10.0, venue.fetch_positions(), Lane.PROTECTIVE)
            )
            await asyncio.sleep(0.5)
            assert not held.done()  # held until the venue's Retry-After (1 s), not sent into a ban
            assert await held == []
            assert time.monotonic() - started >= 0.9
            assert venue.refusals == {429: 1}
        finally:
            await venue.close()


def _paced(base_url: str) -> tuple[BinanceUsdmVenue, RequestPacer]:
    venue = _binance(base_url)
    clock = SystemClock()
    pacer = RequestPacer(venue.capabilities().request_budgets, clock)
    budget = OrderBudget(venue.capabilities().order_rate_budgets, clock)
    venue.attach_pacing(VenuePacing(pacer, budget, clock))
    return venue, pacer


async def test_a_wave_larger_than_cctxs_pool_sends_all_its_stops_at_once(db: Database) -> None:
    """ccxt's own HTTP pool stops at 100 connections: a wave of 60 needs 120 stop requests at once, so the
    last positions needed a third round trip. The engine's pool is sized for its largest burst: the
    emulator sees every stop of the wave in flight together, and every position is protected."""
    sim = SimVenueSettings(seed=5, volatility=0.0, max_conditional_orders=400)
    # 5 s per stop: on a loaded machine the wave's 60 entries are answered over a second or more (ccxt
    # builds and signs each), and the stops of the first must still be in flight when the last are sent.
    # (Only the stops: every request that slow made the start and the entries take 50 s.)
    emulator = BinanceEmulator(
        sim,
        api_key=KEY,
        api_secret=SECRET,
        control=True,
        faults=FaultPlan(parse_fault_spec("POST:algoOrder=latency:5000")),
    )
    async with running(emulator) as base_url:
        engine = binance_wire_engine(
            db.target.dsn,
            base_url,
            KEY,
            SECRET,
            {
                "SIGNALS__MAX_CONCURRENT_ENTRIES": "60",
                "SIGNALS__MAX_POSITIONS": "100",
                "SIGNALS__WAVE_WINDOW_MS": "0",
            },
        )
        await engine.start()
        try:
            assert engine.store is not None
            assert engine.manager is not None
            symbols = sorted(emulator.core.markets)[:60]
            await engine.store.insert_signals([(s, "long", None, None) for s in symbols])
            manager = engine.manager
            await wait_until(
                lambda: len(manager.guards) == 60 and all(g.covered for g in manager.guards.values()),
                within=60.0,
                what="60 positions protected",
            )
            assert emulator.max_in_flight["POST algoOrder"] >= 101  # more than ccxt's pool could carry
            assert len(emulator.core.inspect(emulator.now()).open_conditional) == 120
        finally:
            await engine.stop()


async def test_entries_waiting_out_a_429_are_not_sent_once_the_refusals_hold_entries_back(
    db: Database,
) -> None:
    """A wave's stops drew 429s (another client filled the IP's weight): two refusals hold entries back, and
    the header said "ENTRIES HELD". The entries admitted before, waiting for the 429's Retry-After, still went
    the moment it ended, and their positions had no stop while every stop queued behind the same hold (an
    operator saw 11 positions opened after "ENTRIES HELD", 3 runs of 3). Judged on the venue: no entry it
    executed was sent after entries were held back."""
    sim = SimVenueSettings(seed=5, volatility=0.0)
    emulator = BinanceEmulator(sim, api_key=KEY, api_secret=SECRET, control=True)
    async with running(emulator) as base_url, aiohttp.ClientSession() as session:
        engine = binance_wire_engine(
            db.target.dsn,
            base_url,
            KEY,
            SECRET,
            # Three entries at a time: the rest are still to go when the first positions' stops draw their
            # 429s (with 20 at once a quiet machine sent all 15 first, and the test proved nothing).
            {"SIGNALS__MAX_CONCURRENT_ENTRIES": "3", "SIGNALS__WAVE_WINDOW_MS": "0"},
        )
        await engine.start()
        held_at: list[float] = []

        async def watch() -> None:
            while not held_at:
                if engine.order_budget is not None and engine.order_budget.entries_held() is not None:
                    held_at.append(time.time())
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        try:
            assert engine.store is not None
            burst = {"targets": ["POST:algoOrder"], "count": 8, "fault": "ratelimit"}
            async with session.post(f"{base_url}/_sim/fault", json=burst) as answer:
                assert answer.status == 200
            symbols = sorted(emulator.core.markets)[:15]
            await engine.store.insert_signals([(s, "long", None, None) for s in symbols])
            await wait_until(
                lambda: db.pool.fetchval(
                    "SELECT count(*) = 0 FROM monitoring.signals WHERE status IN ('new', 'taken')"
                ),
                within=60.0,
                what="every signal settled",
            )
            await asyncio.sleep(1.0)  # (an entry that would still go at a hold's end)
            positions = emulator.core.inspect(emulator.now()).positions
            assert held_at, "the refusals never held entries back"
            late = [
                (p.symbol, p.updated_at - held_at[0]) for p in positions if p.updated_at > held_at[0] + 0.6
            ]
            assert not late, (
                late
            )  # (a send already under way reaches the venue a moment later; the 429 held those for 1 s)
            assert len(positions) < len(symbols)  # the others were held back, not sent
        finally:
            watcher.cancel()
            await engine.stop()

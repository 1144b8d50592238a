"""An entry refused for its timestamp is sent again, signed anew, not failed with its signal (Bybit 10002,
and Binance -1021 on its emulator's skewed clock).

An operator on the Bybit-wire emulator moved the venue's clock 8 s against ours (`/_sim/skew`): the next
entry was refused with 10002 ("invalid request, please check your server timestamp or recv_window param")
and its signal was rejected ("entry refused"), although the request never ran and the adapter read the
venue's time again at once. Such an entry is now sent again with the same id a moment later (as one
refused for the venue's rate is), and the position opens and is protected."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest

from engine.engine import Engine
from engine.events import SignalRejected
from engine.venues.binance_emulator import BinanceEmulator
from engine.venues.binance_emulator import running as running_binance
from engine.venues.binance_emulator.faults import Target, parse_fault
from engine.venues.bybit_emulator import BybitEmulator
from engine.venues.bybit_emulator.faults import parse_bybit_fault
from engine.venues.sim.settings import SimVenueSettings
from storage.database import Database
from tests.integration.engine_support import binance_wire_engine, rejections
from tests.integration.test_bybit_wave_pacing import KEY, SECRET, _all_covered, bybit_engine
from tests.support.waiting import wait_until


@pytest.mark.parametrize("time_read_ms", [2000, 9000])
async def test_an_entry_refused_for_its_timestamp_is_sent_again_and_its_position_protected(
    db: Database, caplog: pytest.LogCaptureFixture, time_read_ms: int
) -> None:
    """`time_read_ms`: how late the venue answers the read of its time. At 9 s the entry, sent again every
    second with the old offset, was refused five times and its signal rejected (a reviewer): it waits for
    the read now, and is refused once or twice, not five times."""
    caplog.set_level(logging.INFO)
    emulator = BybitEmulator(
        SimVenueSettings(seed=5, volatility=0.0), api_key=KEY, api_secret=SECRET, control=True
    )
    # (No reconcile pass in between: the entry is the first signed call after the clock moved.)
    async with bybit_engine(db, emulator, {"PROTECTION__RECONCILE_SECONDS": "3600"}) as (engine, rejected):
        base_url = engine.settings.venue.base_url
        symbol = sorted(emulator.core.markets)[2]
        # The reconciler's first pass done (a signed read): the entry is the next signed call.
        await wait_until(
            lambda: engine.reconciler is not None and engine.reconciler.runs >= 1,
            within=10.0,
            what="the first reconcile pass",
        )
        async with (
            aiohttp.ClientSession() as control,
            control.post(f"{base_url}/_sim/skew", json={"seconds": -8}) as answer,
        ):
            assert answer.status == 200  # the venue's clock now 8 s behind the one the engine read
        # Its time, read again at the first refusal (the wave's own read of the venue, before the entry),
        # answers late: the entry goes out meanwhile, signed with the old offset, and is refused.
        emulator.faults.force(
            (Target("GET", "market/time"),), parse_bybit_fault(f"latency:{time_read_ms}"), count=1
        )
        assert engine.store is not None
        await engine.store.insert_signals([(symbol, "long", None, None)])
        await _all_covered(engine, 1, "the position opened and protected")
        assert rejected == []
        refused = [
            r.getMessage()
            for r in caplog.records
            if r.getMessage().startswith(f"entry {symbol} refused for its timestamp")
        ]
        assert refused, "the entry was never refused: the case did not happen"
        assert len(refused) <= 2, refused  # (once before the read, maybe once as it lands; not five)
        assert all("10002" in line for line in refused)
        status = await db.pool.fetchval("SELECT status FROM monitoring.signals WHERE symbol = $1", symbol)
        assert status != "rejected"


async def test_stops_refused_for_their_timestamp_are_sent_again_after_the_time_read_and_trip_nothing(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """The venue's clock moves 8 s while eight positions are open, and someone removes their hard stops
    (Bybit's web UI): every guard's replacement is refused with 10002 until the adapter has read the
    venue's time again, which answers 2 s late. Each guard sent its stop again on its own backoff, signed
    with the old offset, and was refused again; the refusals counted toward the breaker's failure rate as
    a failing protection path, and it paused entries (until the operator resumes them) for a clock the
    adapter fixed by itself a moment later. A timestamp refusal is the venue's word on our clock, as a
    rate limit's is on our pace: the stop goes again once the time is read, and the breaker counts it not;
    should positions stay naked, its uncovered rules say so."""
    caplog.set_level(logging.INFO)
    emulator = BybitEmulator(
        SimVenueSettings(seed=7, volatility=0.0), api_key=KEY, api_secret=SECRET, control=True
    )
    async with bybit_engine(db, emulator, {"PROTECTION__RECONCILE_SECONDS": "3600"}) as (engine, rejected):
        assert engine.store is not None
        symbols = sorted(emulator.core.markets)[:8]
        await engine.store.insert_signals([(symbol, "long", None, None) for symbol in symbols])
        await _all_covered(engine, len(symbols), "eight positions protected")
        base_url = engine.settings.venue.base_url
        caplog.clear()
        async with aiohttp.ClientSession() as control:
            async with control.post(f"{base_url}/_sim/skew", json={"seconds": -8}) as answer:
                assert answer.status == 200
            emulator.faults.force((Target("GET", "market/time"),), parse_bybit_fault("latency:2000"), count=1)
            for symbol in symbols:
                body = {"symbol": symbol, "stopLoss": "0"}
                async with control.post(f"{base_url}/_sim/position-stops", json=body) as answer:
                    assert answer.status == 200, await answer.text()
        await _all_covered(engine, len(symbols), "the hard stops replaced")
        refused = [
            r.getMessage().split("client id ", 1)[1].split(")", 1)[0]
            for r in caplog.records
            if r.getMessage().startswith("Rejected creating stop-loss") and "10002" in r.getMessage()
        ]
        assert refused, "no stop was refused for its timestamp: the case did not happen"
        # Once, or twice where the read is slower than the wait for it (a quarter of grace; before: three
        # for one stop, sent again on the backoff of a naked position, a round trip).
        assert max(Counter(refused).values()) <= 2, Counter(refused)
        # The breaker is judged at each health measurement: the next one, after the refusals.
        measured = engine.health_measured_at
        await wait_until(lambda: engine.health_measured_at != measured, within=30.0, what="a health check")
        assert engine.entries_paused_by == "", engine.entries_pause_reason
        assert rejected == []


@asynccontextmanager
async def _protected_on_bybit(
    db: Database, count: int
) -> AsyncIterator[tuple[Engine, BybitEmulator, list[str]]]:
    """An engine on the Bybit-wire emulator with `count` long positions, each with both stops confirmed."""
    emulator = BybitEmulator(
        SimVenueSettings(seed=7, volatility=0.0), api_key=KEY, api_secret=SECRET, control=True
    )
    async with bybit_engine(db, emulator, {"PROTECTION__RECONCILE_SECONDS": "3600"}) as (engine, _rejected):
        assert engine.store is not None
        symbols = sorted(emulator.core.markets)[:count]
        await engine.store.insert_signals([(symbol, "long", None, None) for symbol in symbols])
        await _all_covered(engine, count, "the positions protected")
        yield engine, emulator, symbols


async def _bybit_stops_removed_with_the_clock_off(
    engine: Engine, emulator: BybitEmulator, skew: float, time_fault: str, symbols: list[str]
) -> None:
    """The emulator's clock moved `skew` seconds, its time read failing as `time_fault` says, and the hard
    stops of `symbols` removed by another client (Bybit's web UI)."""
    base_url = engine.settings.venue.base_url
    async with aiohttp.ClientSession() as control:
        async with control.post(f"{base_url}/_sim/skew", json={"seconds": skew}) as answer:
            assert answer.status == 200
        emulator.faults.force((Target("GET", "market/time"),), parse_bybit_fault(time_fault), count=100_000)
        for symbol in symbols:
            body = {"symbol": symbol, "stopLoss": "0"}
            async with control.post(f"{base_url}/_sim/position-stops", json=body) as answer:
                assert answer.status == 200, await answer.text()


async def test_a_clock_fixed_before_the_slow_time_read_answers_gets_the_stop_back_without_it(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """The venue's clock moved 8 s and came back a second later; its time read answers 9 s late. The
    guard waited for that read before sending its stop again: the hard stop was off the venue 9.5 s, where
    the guard's own backoff had it back in 1.5 s (r70). It waits at most a quarter of grace for the read."""
    caplog.set_level(logging.INFO)
    async with _protected_on_bybit(db, 2) as (engine, emulator, symbols):
        caplog.clear()
        await _bybit_stops_removed_with_the_clock_off(engine, emulator, -8, "latency:9000", symbols)
        await wait_until(
            lambda: any("10002" in r.getMessage() for r in caplog.records), within=10.0, what="a refusal"
        )
        await asyncio.sleep(1.0)
        base_url = engine.settings.venue.base_url
        async with (
            aiohttp.ClientSession() as control,
            control.post(f"{base_url}/_sim/skew", json={"seconds": 0}) as answer,
        ):
            assert answer.status == 200
        await _all_covered(engine, len(symbols), "the hard stops back")
        # Back before the slow read answered: the guard did not wait for it.
        assert not [r for r in caplog.records if "its time read again" in r.getMessage()]


async def test_a_clock_that_stays_wrong_is_not_a_resend_loop(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """The venue's clock 60 s off and its time read failing at once: each refusal started a read that
    failed at once, and the guard sent its stop again with no wait at all, 82 sends in 20 s for three
    positions and six WARNING lines a second (r70). The resends keep the guard's backoff, and the failing
    read is said once a minute."""
    caplog.set_level(logging.DEBUG, logger="engine.venues.ccxt_venue")
    caplog.set_level(logging.INFO)
    async with _protected_on_bybit(db, 3) as (engine, emulator, symbols):
        caplog.clear()
        await _bybit_stops_removed_with_the_clock_off(engine, emulator, 60, "error", symbols)
        await asyncio.sleep(6.0)
        refused: dict[str, list[float]] = {}
        for record in caplog.records:
            if (
                record.getMessage().startswith("Rejected creating stop-loss")
                and "10002" in record.getMessage()
            ):
                cid = record.getMessage().split("client id ", 1)[1].split(")", 1)[0]
                refused.setdefault(cid, []).append(record.created)
        assert refused, "no stop was refused: the case did not happen"
        # On the guard's backoff: its first retry a round trip on, then a quarter of grace (1.25 s) apart,
        # where the loop sent each again as fast as the pacer let it.
        quick = {
            cid: [round(b - a, 3) for a, b in itertools.pairwise(times) if b - a < 1.25 / 2]
            for cid, times in refused.items()
        }
        assert all(len(gaps) <= 1 for gaps in quick.values()), quick
        failed_reads = [r for r in caplog.records if "reading its time failed" in r.getMessage()]
        assert len([r for r in failed_reads if r.levelno >= logging.WARNING]) == 1, len(failed_reads)


@asynccontextmanager
async def _on_binance(
    db: Database, emulator: BinanceEmulator
) -> AsyncIterator[tuple[Engine, list[SignalRejected]]]:
    """An engine on the Binance-wire emulator, configured as for a real account; the signals it rejects."""
    async with running_binance(emulator) as base_url:
        overrides = {"SIGNALS__WAVE_WINDOW_MS": "0", "PROTECTION__RECONCILE_SECONDS": "3600"}
        engine = binance_wire_engine(db.target.dsn, base_url, KEY, SECRET, overrides)
        await engine.start()
        try:
            async with rejections(engine) as rejected:
                yield engine, rejected
        finally:
            await engine.stop()


async def test_binance_refuses_a_skewed_timestamp_and_the_entry_and_stops_go_again_after_the_time_read(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """The Binance-wire emulator checked timestamps against the real clock and had no way to move its own:
    the -1021 path (ccxt's time difference read again, the request sent again) was rehearsed on Bybit's
    emulator only. Its server clock now moves (`/_sim/skew`), as a drifting host's against Binance's does:
    the entry is refused -1021, sent again once the time is read, and opened; stops removed meanwhile by
    another client are replaced the same way; no signal is rejected and the breaker stays still."""
    caplog.set_level(logging.INFO)
    emulator = BinanceEmulator(
        SimVenueSettings(seed=5, volatility=0.0), api_key=KEY, api_secret=SECRET, control=True
    )
    async with _on_binance(db, emulator) as (engine, rejected):
        base_url = engine.settings.venue.base_url
        symbols = sorted(emulator.core.markets)[2:5]
        async with aiohttp.ClientSession() as control:
            async with control.post(f"{base_url}/_sim/skew", json={"seconds": -8}) as answer:
                assert answer.status == 200, await answer.text()
            # The time read answers late: the entry goes out meanwhile, signed with the old offset.
            emulator.faults.force((Target("GET", "time"),), parse_fault("latency:2000"), count=1)
            assert engine.store is not None
            await engine.store.insert_signals([(symbols[0], "long", None, None)])
            await _all_covered(engine, 1, "the position opened and protected")
            refused = [
                r.getMessage()
                for r in caplog.records
                if r.getMessage().startswith(f"entry {symbols[0]} refused for its timestamp")
            ]
            assert refused, "the entry was never refused: the case did not happen"
            assert all("-1021" in line for line in refused), refused

            await engine.store.insert_signals([(s, "long", None, None) for s in symbols[1:]])
            await _all_covered(engine, 3, "three positions protected")
            caplog.clear()
            # The clock moves again (ccxt signs with a 10 s window: 15 s behind is out of it), and another
            # client removes the hard stops.
            async with control.post(f"{base_url}/_sim/skew", json={"seconds": 15}) as answer:
                assert answer.status == 200
            emulator.faults.force((Target("GET", "time"),), parse_fault("latency:2000"), count=1)
            manager = engine.manager
            assert manager is not None
            removed = {guard.stop_loss.client_order_id for guard in manager.guards.values()}
            for guard in list(manager.guards.values()):
                stop = guard.stop_loss.client_order_id
                assert stop is not None
                emulator.core.cancel_order(guard.symbol, stop, emulator.now())
        await wait_until(
            lambda: all(
                g.stop_loss.confirmed and g.stop_loss.client_order_id not in removed
                for g in manager.guards.values()
            ),
            within=30.0,
            what="the hard stops replaced",
        )
        refused_stops = [
            r.getMessage()
            for r in caplog.records
            if r.getMessage().startswith("Rejected creating stop-loss") and "-1021" in r.getMessage()
        ]
        assert refused_stops, [r.getMessage() for r in caplog.records if "1021" in r.getMessage()]
        measured = engine.health_measured_at
        await wait_until(lambda: engine.health_measured_at != measured, within=30.0, what="a health check")
        assert engine.entries_paused_by == "", engine.entries_pause_reason
        assert rejected == []

"""How long from a stop firing on the venue until its sibling is cancelled and the position is closed in the
database: by the account stream, and by polling alone, against one round trip.

    python bench/fire_to_close.py --latency-ms 50 [--fires 20] [--venue sim|emulator|emulator-bybit] [--json]

Set-up (not timed): an embedded PostgreSQL in a temporary directory, a fresh database per mode; the venue
with volatility 0 (prices stand still, nothing fires by itself) and every call taking L ms round trip
(`--venue sim`: the in-process sim venue; `--venue emulator`: `tsbot sim-exchange` in its own process and
the engine on real ccxt/HTTP, configured as for a real Binance account, only `venue.base_url` differing);
the real `Engine` on the `SystemClock`, configured through `load_config` as an operator would (no file,
`TSBOT_*` values), signals from `monitoring.signals`. `--fires` positions are opened in one wave (distinct
symbols, long) and the bench waits until every one has both stops confirmed.

Measured, in real time, one position at a time (a pause of `--gap-s` between them): time zero is just
before the bench moves the symbol's mark 3 ticks through the hard stop (sim: `override_mark_price`;
emulator: its control API `POST /_sim/mark`), which fires the stop on the venue at once (no trigger
delay). Done is the engine's `PositionClosed` event, which `_finish` publishes after the position is
recorded closed in the database and after the sibling stop's cancel was answered (so the cancel's answer
is in the figure, not just its arrival). Each close is then checked on the truth: the row is `closed`
with `exit_reason = 'stop_loss'`, and the venue holds no order of ours on the symbol.

Modes:

* `streams_ms`: the venue's account stream on (the default of both venues).
* `polling_ms`: the same venue seen through a wrapper whose `watch_account()` ends at once — a venue
  without account stream — so the engine learns of the fill by polling only: the guard's own look-up when
  the mark crosses its stop, then a reconcile pass (`reconcile_seconds` as configured, 10 s by default).
* `round_trip_ms`: the median of 20 `fetch_mark_prices` calls made by the bench through the same venue.

Every figure is a median over the fires (and `*_max_ms` the worst). Target: streams_ms <= 2 x round_trip_ms.
With `--venue emulator` the stream is the venue client's (`watch_account` of the Binance venue module;
`--venue emulator-bybit`: the Bybit emulator and venue module, whose position stops fire the same way):
`account_stream` in the JSON says whether the engine read one (`false`: the client has none yet, and
streams_ms is polling too).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from emulator_process import EmulatorProcess, emulator_process
from global_lock import CountingVenue

from engine.clock import SystemClock
from engine.config import Settings, load_config
from engine.engine import Engine, build_venue
from engine.events import PositionClosed
from engine.exchange.port import AccountEvent, ExchangePort, StreamState
from engine.venues.sim import SimVenue
from engine.venues.sim.universe import UNIVERSE
from protection.manager import PositionGuard
from storage.database import ensure_database_exists
from storage.embedded import EmbeddedPostgres, start_embedded

POLL_SECONDS = 0.002
ROUND_TRIPS = 20


class WithoutAccountStream(CountingVenue):
    """The wrapped venue as a venue without account stream: everything else unchanged."""

    async def watch_account(self) -> AsyncIterator[AccountEvent]:
        return
        yield  # an async generator that ends at once

    def stream_states(self) -> tuple[StreamState, ...]:
        return tuple(s for s in self.inner.stream_states() if s.name != "account")


@dataclass(slots=True)
class ModeResult:
    mode: str
    fires: int
    median_ms: float | None
    max_ms: float | None
    values_ms: list[float] = field(default_factory=list)
    account_stream: bool = False
    round_trip_ms: float | None = None
    failures: list[str] = field(default_factory=list)


def load_settings(environ: dict[str, str]) -> Settings:
    return load_config(None, environ=environ, cwd=Path("/nonexistent-bench-config-dir")).settings


def engine_environ(args: argparse.Namespace, dsn: str) -> dict[str, str]:
    return {
        "TSBOT_DATABASE__DSN": dsn,
        "TSBOT_SIGNALS__SOURCE": "postgres",
        "TSBOT_SIGNALS__WAVE_WINDOW_MS": "0",
        "TSBOT_SIGNALS__MAX_POSITIONS": str(max(100, args.fires)),
        "TSBOT_VENUE__SIM__SEED": str(args.seed),
        "TSBOT_VENUE__SIM__VOLATILITY": "0",
        "TSBOT_VENUE__SIM__LATENCY__SECONDS": f"{args.latency_ms / 1000:g}",
        "TSBOT_VENUE__SIM__KEEP_BOOK": "false",
        "TSBOT_PROTECTION__RECONCILE_SECONDS": f"{args.reconcile_seconds:g}",
        "TSBOT_LOGGING__FILE": str(Path(tempfile.gettempdir()) / f"tsbot-fire-{os.getpid()}.log"),
    }


async def fresh_database(server: EmbeddedPostgres) -> str:
    dbname = f"bench_{uuid.uuid4().hex[:12]}"
    await ensure_database_exists(server.dsn("postgres"), dbname)
    return dbname


async def measure(args: argparse.Namespace, server: EmbeddedPostgres, mode: str) -> ModeResult:
    dbname = await fresh_database(server)
    environ = engine_environ(args, server.dsn(dbname))
    if args.venue in ("emulator", "emulator-bybit"):
        workdir = Path(tempfile.mkdtemp(prefix="tsbot-fire-emulator-"))
        sim = {"TSBOT_VENUE__SIM__VOLATILITY": "0"}
        wire = "bybit" if args.venue == "emulator-bybit" else "binance"
        with emulator_process(
            workdir, latency_ms=round(args.latency_ms), seed=args.seed, settings=sim, venue=wire
        ) as emulator:
            environ.update(emulator.engine_environ())
            return await _measure(args, server, dbname, mode, load_settings(environ), emulator)
    return await _measure(args, server, dbname, mode, load_settings(environ), None)


async def _measure(
    args: argparse.Namespace,
    server: EmbeddedPostgres,
    dbname: str,
    mode: str,
    settings: Settings,
    emulator: EmulatorProcess | None,
) -> ModeResult:
    clock = SystemClock()
    inner: ExchangePort = (
        SimVenue(settings.venue.sim, clock=clock) if emulator is None else build_venue(settings, clock)
    )
    venue: ExchangePort = WithoutAccountStream(inner) if mode == "polling" else inner
    engine = Engine(settings, venue=venue, clock=clock, version="bench", generate_signals=False)
    closed_at: dict[int, float] = {}

    async def follow() -> None:
        async for event in engine.events():
            if isinstance(event, PositionClosed):
                closed_at[event.position_id] = time.monotonic()

    follower = asyncio.create_task(follow(), name="bench-events")
    await asyncio.sleep(0)
    result = ModeResult(mode=mode, fires=0, median_ms=None, max_ms=None)
    session = aiohttp.ClientSession() if emulator is not None else None
    try:
        await engine.start()
        assert engine.store is not None and engine.manager is not None
        for _ in range(5000):
            if engine.consumer is not None and engine.consumer.listening:
                break
            await asyncio.sleep(POLL_SECONDS)
        await asyncio.sleep(1.0)
        symbols = sorted(UNIVERSE)[: args.fires]
        await engine.store.insert_signals([(s, "long", None, None) for s in symbols])
        manager = engine.manager
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            guards = [manager.by_symbol.get(s) for s in symbols]
            if all(g is not None and g.covered for g in guards):
                break
            await asyncio.sleep(0.05)
        else:
            result.failures.append("not every position was protected within 120 s")
            return result
        await asyncio.sleep(args.gap_s)
        result.account_stream = engine.account_stream is not None and not engine.account_stream.polling_only
        trips = []
        for _ in range(ROUND_TRIPS):
            started = time.monotonic()
            await venue.fetch_mark_prices([symbols[0]])
            trips.append(time.monotonic() - started)
        result.round_trip_ms = statistics.median(trips) * 1000
        conn = await asyncpg.connect(server.dsn(dbname))
        try:
            for symbol in symbols:
                guard = manager.by_symbol[symbol]
                elapsed = await _fire_and_wait(guard, inner, emulator, session, closed_at)
                if elapsed is None:
                    result.failures.append(f"{symbol}: not closed within 60 s")
                    continue
                problem = await _check_truth(conn, guard, inner, emulator, session)
                if problem:
                    result.failures.append(f"{symbol}: {problem}")
                result.values_ms.append(elapsed * 1000)
                await asyncio.sleep(args.gap_s)
        finally:
            await conn.close()
        result.fires = len(result.values_ms)
        if result.values_ms:
            result.median_ms = statistics.median(result.values_ms)
            result.max_ms = max(result.values_ms)
        return result
    finally:
        await engine.stop()
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        if session is not None:
            await session.close()


async def _fire_and_wait(
    guard: PositionGuard,
    inner: ExchangePort,
    emulator: EmulatorProcess | None,
    session: aiohttp.ClientSession | None,
    closed_at: dict[int, float],
) -> float | None:
    assert guard.stop_loss.price is not None
    through = guard.stop_loss.price - 3 * guard.market.tick_size
    started = time.monotonic()
    if emulator is None:
        assert isinstance(inner, SimVenue)
        inner.override_mark_price(guard.symbol, through)
    else:
        assert session is not None
        body = {"symbol": guard.symbol, "price": str(through)}
        async with session.post(f"{emulator.url}/_sim/mark", json=body) as response:
            response.raise_for_status()
    while time.monotonic() - started < 60:
        done = closed_at.get(guard.position_id)
        if done is not None:
            return done - started
        await asyncio.sleep(POLL_SECONDS)
    return None


async def _check_truth(
    conn: asyncpg.Connection,
    guard: PositionGuard,
    inner: ExchangePort,
    emulator: EmulatorProcess | None,
    session: aiohttp.ClientSession | None,
) -> str:
    row = await conn.fetchrow(
        "SELECT status, exit_reason FROM monitoring.positions WHERE id = $1", guard.position_id
    )
    if row is None or row["status"] != "closed" or row["exit_reason"] != "stop_loss":
        return f"row says {dict(row) if row else None}"
    if emulator is None:
        assert isinstance(inner, SimVenue)
        left = [
            o.client_order_id
            for o in inner.core.open_protective_orders(time.time())
            if o.symbol == guard.symbol
        ]
    else:
        state = await emulator.state()
        if emulator.kind == "bybit":  # position stops: the ones still on the symbol's position
            left = [
                f"{k}:{v}"
                for p in state["position_stops"]
                if p["symbol"] == guard.symbol  # type: ignore[index, union-attr]
                for k, v in p.items()
                if k in ("stopLoss", "trailingStop") and v
            ]
        else:
            left = [o["clientAlgoId"] for o in state["open_algo_orders"] if o["symbol"] == guard.symbol]  # type: ignore[index, union-attr]
    return f"orders left on the venue: {left}" if left else ""


async def bench(args: argparse.Namespace, server: EmbeddedPostgres) -> dict[str, Any]:
    streams = await measure(args, server, "streams")
    polling = await measure(args, server, "polling")
    round_trip = statistics.median(
        [r for r in (streams.round_trip_ms, polling.round_trip_ms) if r is not None] or [0.0]
    )
    return {
        "venue": args.venue,
        "latency_ms": args.latency_ms,
        "fires": args.fires,
        "streams_ms": streams.median_ms,
        "polling_ms": polling.median_ms,
        "round_trip_ms": round_trip,
        "target_met": streams.median_ms is not None and streams.median_ms <= 2 * round_trip,
        "streams_max_ms": streams.max_ms,
        "polling_max_ms": polling.max_ms,
        "account_stream": streams.account_stream,
        "reconcile_seconds": args.reconcile_seconds,
        "failures": streams.failures + polling.failures,
        "modes": {"streams": asdict(streams), "polling": asdict(polling)},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-ms", type=float, default=50.0, help="round trip of every venue call")
    parser.add_argument("--fires", type=int, default=20, help="stops fired per mode (the median is reported)")
    parser.add_argument("--venue", choices=("sim", "emulator", "emulator-bybit"), default="sim")
    parser.add_argument("--reconcile-seconds", type=float, default=10.0, help="protection.reconcile_seconds")
    parser.add_argument("--gap-s", type=float, default=0.3, help="pause between fires")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    parser.add_argument("--log-level", default="ERROR", help="engine log level on stderr")
    args = parser.parse_args(argv)
    if not 1 <= args.fires <= len(UNIVERSE):
        parser.error(f"--fires must be within 1..{len(UNIVERSE)}")
    if not 0 < args.latency_ms <= 10_000:
        parser.error("--latency-ms must be within (0, 10000]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    workdir = Path(tempfile.mkdtemp(prefix="tsbot-fire-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    server = start_embedded(workdir / "pgdata")
    summary = asyncio.run(bench(args, server))
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"fire -> sibling cancelled and closed in the DB, median of {args.fires} ({args.venue}, "
            f"{args.latency_ms:g} ms round trip):\n"
            f"  streams  {_ms(summary['streams_ms'])} (max {_ms(summary['streams_max_ms'])})"
            f"{'' if summary['account_stream'] else '  [no account stream: polling]'}\n"
            f"  polling  {_ms(summary['polling_ms'])} (max {_ms(summary['polling_max_ms'])})\n"
            f"  round trip {_ms(summary['round_trip_ms'])}; target streams <= 2 x round trip: "
            f"{'met' if summary['target_met'] else 'NOT met'}"
        )
        for failure in summary["failures"]:
            print(f"  failure: {failure}")
    return 0 if not summary["failures"] else 1


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


__all__ = ["Decimal"]

if __name__ == "__main__":
    sys.exit(main())

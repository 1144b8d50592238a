"""How long the engine takes to restore and verify every open position after a restart, and what it
costs per position.

    python bench/restore.py --positions 1000 --latency-ms 50 [--venue sim|emulator] [--runs 3] [--json]

Set-up, per run (not timed): a fresh database in an embedded PostgreSQL started in a temporary directory
for this invocation; a fresh venue: the in-process sim venue (`--venue sim`) or `tsbot sim-exchange` in its
own process reached through real ccxt and HTTP exactly as a real Binance account (`--venue emulator`), every
call taking L ms. A first engine opens N positions through the signal table as it would in production and
protects them (hard stop + native trailing stop each, confirmed), then stops as `tsbot run` stops: every
stop stays on the venue. The venue keeps its state (the sim venue's core is handed to a new `SimVenue`,
as a restart would find a real exchange; the emulator process simply keeps running). The set-up lifts the
venue's order budget (the bench measures restore, not the wave) and widens the sim universe with synthetic
`SYNnnnUSDT` listings (`venue.sim.synthetic_listings`) when N > 84, as the wave bench does; prices stand still so nothing triggers.

Measured, in real time: a second engine on the same database and venue, `await engine.start()`, from the
call until it returns — which it does once every position has been restored from the database, verified
against the venue and had its first protection pass (the start-up report: restored / re-protected /
adopted / failed). Figures:

* `seconds`: start() to return, including the database, the lease, markets and marks;
* `failed`, `restored`, `reprotected`: the start-up report;
* `venue_calls_per_position`: port calls the second engine made during start(), over N;
* `db_round_trips_per_position`: transactions committed in the engine's database (PostgreSQL's own
  `pg_stat_database.xact_commit`, read after a flush) from before start() until after the engine stopped
  again, over N. Every statement outside an explicit transaction is one. The constant cost of starting
  and stopping (lease, migrations check, events) is included.
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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
from emulator_process import emulator_process
from global_lock import CountingVenue
from wave_protection import bench_listings, load_settings

from engine.clock import SystemClock
from engine.engine import Engine, build_venue
from engine.venues.sim import SimVenue
from engine.venues.sim.core import SimCore
from engine.venues.sim.universe import UNIVERSE
from storage.database import ensure_database_exists
from storage.embedded import EmbeddedPostgres, start_embedded

POLL_SECONDS = 0.05
VENUES = ("sim", "emulator")
log = logging.getLogger("bench.restore")


@dataclass(slots=True)
class RunResult:
    run: int
    seconds: float
    restored: int
    reprotected: int
    adopted: int
    failed: int
    venue_calls: dict[str, int]
    venue_calls_per_position: float
    db_round_trips: int
    db_round_trips_per_position: float
    setup_seconds: float


def _environ(args: argparse.Namespace, dsn: str, seed: int) -> dict[str, str]:
    return {
        "TSBOT_DATABASE__DSN": dsn,
        "TSBOT_SIGNALS__SOURCE": "postgres",
        "TSBOT_SIGNALS__WAVE_WINDOW_MS": "0",
        "TSBOT_SIGNALS__MAX_POSITIONS": str(args.positions),
        "TSBOT_SIGNALS__MAX_CONCURRENT_ENTRIES": "100",
        "TSBOT_VENUE__SIM__SEED": str(seed),
        "TSBOT_VENUE__SIM__VOLATILITY": "0",
        "TSBOT_VENUE__SIM__LATENCY__SECONDS": f"{args.latency_ms / 1000:g}",
        "TSBOT_VENUE__SIM__STARTING_BALANCE": "100000000",
        "TSBOT_VENUE__SIM__MAX_CONDITIONAL_ORDERS": str(max(200, 2 * args.positions + 10)),
        "TSBOT_VENUE__SIM__SYNTHETIC_LISTINGS": str(max(0, args.positions - len(UNIVERSE))),
        "TSBOT_VENUE__SIM__RATE_LIMITS__ORDERS_PER_10S": "100000",
        "TSBOT_VENUE__SIM__RATE_LIMITS__ORDERS_PER_MINUTE": "1000000",
    }


async def _transactions(dsn: str, dbname: str) -> int:
    """Committed transactions of `dbname` so far, after asking every backend's pending stats to flush."""
    await asyncio.sleep(1.2)  # backends report their statistics at most once a second when idle
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        return await conn.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1", dbname
        )
    finally:
        await conn.close()


async def _open_positions(engine: Engine, count: int, symbols: Sequence[str]) -> None:
    assert engine.store is not None and engine.manager is not None
    await engine.store.insert_signals(
        [(symbol, "long" if i % 2 == 0 else "short", None, None) for i, symbol in enumerate(symbols[:count])]
    )
    deadline = time.monotonic() + 600.0
    while time.monotonic() < deadline:
        guards = engine.manager.guards
        if len(guards) >= count and all(g.covered for g in guards.values()):
            return
        await asyncio.sleep(POLL_SECONDS)
    raise RuntimeError(f"set-up: only {len(engine.manager.guards)} of {count} positions protected in 600 s")


async def run_once(args: argparse.Namespace, server: EmbeddedPostgres, run: int) -> RunResult:
    dbname = f"restore_{uuid.uuid4().hex[:12]}"
    await ensure_database_exists(server.dsn("postgres"), dbname)
    environ = _environ(args, server.dsn(dbname), args.seed + run)
    listings, _ = bench_listings(args.positions)
    if args.venue == "emulator":
        workdir = Path(tempfile.mkdtemp(prefix="tsbot-restore-emulator-"))
        sim_settings = {k: v for k, v in environ.items() if k.startswith("TSBOT_VENUE__SIM__")}
        with emulator_process(
            workdir, latency_ms=args.latency_ms, seed=args.seed + run, settings=sim_settings
        ) as emulator:
            environ.update(emulator.engine_environ())
            return await _measure(args, server, dbname, run, environ, list(listings), None)
    clock = SystemClock()
    settings = load_settings(environ)
    core = SimCore(listings, settings.venue.sim, now=clock.now())
    return await _measure(args, server, dbname, run, environ, list(listings), core)


async def _measure(
    args: argparse.Namespace,
    server: EmbeddedPostgres,
    dbname: str,
    run: int,
    environ: dict[str, str],
    symbols: list[str],
    core: SimCore | None,
) -> RunResult:
    settings = load_settings(environ)
    clock = SystemClock()

    def venue() -> Any:
        if core is None:
            return build_venue(settings, clock)
        return SimVenue(settings.venue.sim, clock=clock, core=core)

    setup_started = time.monotonic()
    first = Engine(settings, venue=venue(), clock=clock, version="bench", generate_signals=False)
    await first.start()
    try:
        await _open_positions(first, args.positions, symbols)
    finally:
        await first.stop()
    setup_seconds = time.monotonic() - setup_started

    before = await _transactions(server.dsn("postgres"), dbname)
    counting = CountingVenue(venue())
    second = Engine(settings, venue=counting, clock=clock, version="bench", generate_signals=False)
    started = time.monotonic()
    report = await second.start()
    seconds = time.monotonic() - started
    calls = dict(counting.calls)
    await second.stop()
    after = await _transactions(server.dsn("postgres"), dbname)
    round_trips = max(0, after - before - 1)  # our own reading connection's snapshot query
    return RunResult(
        run=run + 1,
        seconds=seconds,
        restored=report.restored,
        reprotected=report.reprotected,
        adopted=report.adopted,
        failed=report.failed,
        venue_calls=calls,
        venue_calls_per_position=sum(calls.values()) / args.positions,
        db_round_trips=round_trips,
        db_round_trips_per_position=round_trips / args.positions,
        setup_seconds=setup_seconds,
    )


async def bench(args: argparse.Namespace, server: EmbeddedPostgres) -> dict[str, Any]:
    results = []
    for run in range(args.runs):
        result = await run_once(args, server, run)
        results.append(result)
        if not args.json:
            print(
                f"run {result.run}: {result.seconds:.2f} s to restore {args.positions} positions "
                f"(restored {result.restored}, re-protected {result.reprotected}, failed {result.failed}); "
                f"{result.venue_calls_per_position:.4f} venue calls and {result.db_round_trips_per_position:.4f} "
                f"database round trips per position; venue calls {result.venue_calls}; set-up {result.setup_seconds:.1f} s",
                flush=True,
            )

    def median(name: str) -> float:
        return statistics.median(getattr(r, name) for r in results)

    return {
        "venue": args.venue,
        "positions": args.positions,
        "latency_ms": args.latency_ms,
        "runs": args.runs,
        "seconds": median("seconds"),
        "failed": max(r.failed for r in results),
        "restored": median("restored"),
        "venue_calls_per_position": median("venue_calls_per_position"),
        "db_round_trips_per_position": median("db_round_trips_per_position"),
        "values": {"seconds": [r.seconds for r in results]},
        "all_runs": [asdict(r) for r in results],
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time to restore and verify N open positions after a restart."
    )
    parser.add_argument("--positions", type=int, required=True, help="N: open positions to restore")
    parser.add_argument("--latency-ms", type=int, default=50, help="round trip of every venue call")
    parser.add_argument("--venue", choices=VENUES, default="sim")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    parser.add_argument("--log-level", default="ERROR")
    args = parser.parse_args(argv)
    if not 1 <= args.positions <= 5000:
        parser.error("--positions must be within 1..5000")
    if not 0 <= args.latency_ms <= 60_000:
        parser.error("--latency-ms must be within 0..60000")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    workdir = Path(tempfile.mkdtemp(prefix="tsbot-restore-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    server = start_embedded(workdir / "pgdata")
    summary = asyncio.run(bench(args, server))
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{args.venue}: restore of {args.positions} positions at {args.latency_ms} ms per call: median "
            f"{summary['seconds']:.2f} s (runs: {', '.join(f'{v:.2f}' for v in summary['values']['seconds'])}); "
            f"failed {summary['failed']}; {summary['venue_calls_per_position']:.4f} venue calls and "
            f"{summary['db_round_trips_per_position']:.4f} database round trips per position"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

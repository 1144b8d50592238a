"""What a scrape of `/metrics` and `/healthz` costs an engine holding N protected positions.

    python bench/metrics_scrape.py --positions 1000 [--scrapes 50] [--json]

Set-up (not timed): an embedded PostgreSQL in a temporary directory, one engine on the sim venue with
`[metrics] enabled = true` on 127.0.0.1 and an ephemeral port, N positions opened through the signal table
and protected (as `bench/restore.py` does). Then, in real time, `--scrapes` sequential GETs of `/metrics`
and of `/healthz` over loopback HTTP from the engine's own process and loop (so the figure is what the
engine's loop spends: the collector reads the guards' coverage facts, the histograms, the budgets, the last
health; nothing is asked of the database). Figures: p50 / p99 / max of the round trip per path, and the
size of the exposition text.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from restore import _environ, _open_positions
from wave_protection import bench_listings, load_settings

from engine.clock import SystemClock
from engine.engine import Engine
from engine.metrics import nearest_rank
from engine.venues.sim import SimVenue
from engine.venues.sim.core import SimCore
from storage.database import ensure_database_exists
from storage.embedded import EmbeddedPostgres, start_embedded


async def _get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


async def bench(args: argparse.Namespace, server: EmbeddedPostgres) -> dict[str, Any]:
    dbname = f"scrape_{uuid.uuid4().hex[:12]}"
    await ensure_database_exists(server.dsn("postgres"), dbname)
    args.latency_ms = 0
    environ = {
        **_environ(args, server.dsn(dbname), args.seed),
        "TSBOT_METRICS__ENABLED": "true",
        "TSBOT_METRICS__PORT": "0",
    }
    listings, _ = bench_listings(args.positions)
    settings = load_settings(environ)
    clock = SystemClock()
    core = SimCore(listings, settings.venue.sim, now=clock.now())
    engine = Engine(
        settings,
        venue=SimVenue(settings.venue.sim, clock=clock, core=core),
        clock=clock,
        version="bench",
        generate_signals=False,
    )
    await engine.start()
    try:
        await _open_positions(engine, args.positions, list(listings))
        assert engine.metrics_server is not None and engine.metrics_server.port is not None
        port = engine.metrics_server.port
        figures: dict[str, Any] = {}
        for path in ("/metrics", "/healthz"):
            seconds = []
            size = 0
            for _ in range(args.scrapes):
                started = time.perf_counter()
                answer = await _get(port, path)
                seconds.append(time.perf_counter() - started)
                size = len(answer)
            ordered = sorted(seconds)
            figures[path] = {
                "p50_ms": round(nearest_rank(ordered, 50) * 1000, 2),
                "p99_ms": round(nearest_rank(ordered, 99) * 1000, 2),
                "max_ms": round(ordered[-1] * 1000, 2),
                "mean_ms": round(statistics.fmean(ordered) * 1000, 2),
                "bytes": size,
            }
        # The same work without the HTTP round trip: what one scrape costs the engine's loop, in CPU.
        from prometheus_client.exposition import generate_latest

        for name, build in (
            ("collect_metrics", lambda: generate_latest(engine.metrics_server.registry)),  # type: ignore[union-attr]
            ("collect_healthz", engine.metrics_server.collector.healthz),
            ("engine_coverage", engine.coverage),
        ):
            cpu = []
            for _ in range(args.scrapes):
                started = time.perf_counter()
                build()
                cpu.append(time.perf_counter() - started)
                await asyncio.sleep(0)
            ordered = sorted(cpu)
            figures[name] = {
                "p50_ms": round(nearest_rank(ordered, 50) * 1000, 2),
                "p99_ms": round(nearest_rank(ordered, 99) * 1000, 2),
            }
        covered = engine.coverage().protected
    finally:
        await engine.stop()
    return {"positions": args.positions, "protected": covered, "scrapes": args.scrapes, **figures}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="What a /metrics scrape costs at N positions.")
    parser.add_argument("--positions", type=int, default=1000)
    parser.add_argument("--scrapes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not 1 <= args.positions <= 5000 or args.scrapes < 1:
        parser.error("--positions must be within 1..5000 and --scrapes at least 1")
    logging.basicConfig(level="ERROR", stream=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="tsbot-scrape-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    server = start_embedded(workdir / "pgdata")
    summary = asyncio.run(bench(args, server))
    if args.json:
        print(json.dumps(summary))
    else:
        for name in ("collect_metrics", "collect_healthz", "engine_coverage"):
            f = summary[name]
            print(f"{name} (in-process CPU): p50 {f['p50_ms']} ms, p99 {f['p99_ms']} ms")
        for path in ("/metrics", "/healthz"):
            f = summary[path]
            print(
                f"{path} at {summary['positions']} positions ({summary['protected']} protected): "
                f"p50 {f['p50_ms']} ms, p99 {f['p99_ms']} ms, max {f['max_ms']} ms over {args.scrapes} "
                f"scrapes; {f['bytes']} bytes"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

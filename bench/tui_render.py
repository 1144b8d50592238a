"""What the dashboard costs the engine: frame time and the engine's tick latency at 1 000 positions.

    python bench/tui_render.py [--positions 1000] [--ticks-per-second 10] [--seconds 10] [--fps 4]
                               [--size 160x48] [--json]

Set-up: the real `DashboardApp`, headless at `--size` (Textual composes and renders every frame exactly as
on a terminal; only the bytes go nowhere), fed by a synthetic feed of `--positions` positions (1 % of them
uncovered, a mix of trailing states). The sim venue has 84 symbols, so 1 000 positions cannot come from the
real engine; the feed builds its `EngineSnapshot` the way `Engine.snapshot(views_of)` does (every
position's coverage facts and the figures, then a `PositionView` with the same Decimal PnL and distance
arithmetic for each position the dashboard asks for), so the snapshot's cost is in the frame.

Load: an "engine" task on the same event loop delivers `--ticks-per-second` mark ticks to every position
(1 000 × 10 = 10 000 ticks/s) in batches every 10 ms, like the engine's mark feed does.

Measured:
- frame: the app's `paint()` (snapshot + every widget's diff and cell updates), p50 / p99 / max, and the
  cells updated per frame;
- engine tick lateness: for every batch, how late it ran against its schedule (loop lag: anything that
  blocks the event loop — our paint, Textual's layout and render — shows here), p50 / p99 / max; measured
  with the app running, and without the app (headless) for the same length of time just before and just
  after the app phase (the machine's load drifts: a baseline on one side only flatters or blames the app);
  `lateness_p99_ratio` is the app phase's p99 over the headless p99 (both headless phases together);
- CPU seconds of the process in each phase (time.process_time: what the app adds to the engine's work).

`--engine-thread` runs the engine's ticks on an event loop of their own in another thread, in every
phase: the "engine on its own thread" option, measured (tsbot-tui runs both on one loop).
`--runs N` repeats the whole measurement N times in one invocation and reports each run and the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

from engine.config import Settings, load_config
from engine.engine import (
    EngineSnapshot,
    EngineState,
    PlannedProtection,
    PositionView,
    ProtectionResult,
    StartupReport,
    ViewSelector,
)
from engine.events import EngineEvent
from engine.venues.sim.universe import UNIVERSE
from protection.coverage import PositionCoverage, coverage_figures, kept_fact, rows_by_position
from tui.app import DashboardApp
from tui.feed import LogEntry
from tui.widgets.positions import PositionsTable

BATCH_SECONDS = 0.01
CENT = Decimal("0.01")


class SyntheticFeed:
    """`positions` positions whose marks an engine-like task moves; snapshots built like the engine's."""

    read_only = False

    def __init__(self, settings: Settings, positions: int, seed: int):
        self.settings = settings
        rng = random.Random(seed)
        symbols = sorted(UNIVERSE)
        self.rows = []
        for index in range(positions):
            base = Decimal(str(round(rng.uniform(0.01, 500), 4)))
            side = "long" if index % 2 else "short"
            covered = index % 100 != 0
            self.rows.append(
                {
                    "id": index + 1,
                    "symbol": f"{symbols[index % len(symbols)][:-4]}{index:04d}USDT",
                    "side": side,
                    "entry": base,
                    "qty": Decimal(str(rng.randint(1, 900))),
                    "stop": base * (Decimal("0.97") if side == "long" else Decimal("1.03")),
                    "activation": base * (Decimal("1.015") if side == "long" else Decimal("0.985")),
                    "covered": covered,
                    "filled_at": -rng.uniform(10, 3000),
                }
            )
        self.marks = [row["entry"] for row in self.rows]
        self.started_at = time.time()
        self.ticks = 0
        self._facts: dict[int, PositionCoverage] = {}
        self._rows: tuple[PositionCoverage, ...] = ()

    def tick(self, first: int, count: int, rng: random.Random) -> None:
        """One batch of mark ticks (what the engine's mark feed does per message)."""
        marks = self.marks
        for i in range(first, first + count):
            index = i % len(marks)
            marks[index] = (marks[index] * Decimal(str(1 + rng.uniform(-0.0005, 0.0005)))).quantize(
                Decimal("0.0001")
            )
        self.ticks += count

    async def start(self) -> StartupReport:
        return StartupReport(0, 0, 0, 0)

    async def stop(self) -> None:
        return None

    def snapshot(self, views_of: ViewSelector | None = None) -> EngineSnapshot:
        """As `Engine.snapshot(views_of)`: every position's coverage facts and the figures, then a full view
        of each position the selector picks (all of them without one)."""
        now = time.monotonic() - self._mono0 if hasattr(self, "_mono0") else 0.0
        facts = []
        for row in self.rows:
            # As a guard's coverage(): its last fact again unless one of the facts changed.
            covered = row["covered"]
            fact = self._facts[row["id"]] = kept_fact(
                self._facts.get(row["id"]),
                row["id"],
                row["symbol"],
                covered,
                covered,
                row["filled_at"],
                None if covered else row["filled_at"],
            )
            facts.append(fact)
        figures = coverage_figures(facts, now, 5.0)
        rows = self._rows = rows_by_position(facts, self._rows)
        wanted = None if views_of is None else set(views_of(rows, figures))
        views = []
        for row, mark in zip(self.rows, self.marks, strict=True):
            if wanted is not None and row["id"] not in wanted:
                continue
            direction = 1 if row["side"] == "long" else -1
            entry: Decimal = row["entry"]
            pnl = ((mark - entry) / entry * 100 * direction).quantize(CENT)
            distance = ((row["activation"] - mark) / mark * 100 * direction).quantize(CENT)
            covered = row["covered"]
            views.append(
                PositionView(
                    position_id=row["id"],
                    symbol=row["symbol"],
                    side=row["side"],
                    quantity=row["qty"],
                    entry_price=entry,
                    mark_price=mark,
                    pnl_percent=pnl,
                    stop_loss_price=row["stop"],
                    has_stop_loss=covered,
                    has_trailing_stop=covered,
                    trailing_kind="managed",
                    trailing_phase="waiting",
                    activation_price=row["activation"],
                    distance_to_activation_percent=distance,
                    trailing_stop_price=None,
                    covered=covered,
                    unprotected_seconds=None if covered else now - row["filled_at"],
                    last_error=None,
                )
            )
        return EngineSnapshot(
            state=EngineState.RUNNING,
            version="bench",
            started_at=self.started_at,
            venue="sim",
            account="bench",
            mode="SIM",
            entries_paused=False,
            positions=tuple(sorted(views, key=lambda view: view.position_id)),
            coverage=figures,
            health=(),
            waves=(),
            taken_at=time.time(),
            rows=rows,
        )

    async def follow(self) -> AsyncIterator[EngineEvent | LogEntry]:
        self._mono0 = time.monotonic()
        await asyncio.Event().wait()  # no events: the load is all marks
        yield  # pragma: no cover

    def plan_reprotect(self) -> list[PlannedProtection]:
        return []

    async def reprotect_uncovered(self, plan: list[PlannedProtection]) -> list[ProtectionResult]:
        return []

    async def restart_protection(self) -> StartupReport:
        return StartupReport(0, 0, 0, 0)

    def set_entries_paused(self, paused: bool) -> tuple[bool, str]:
        return True, "entries paused" if paused else "entries on"

    async def close_position(self, position_id: int) -> bool:
        return False


async def engine_ticks(feed: SyntheticFeed, per_second: int, seconds: float, seed: int) -> list[float]:
    """Deliver the ticks in 10 ms batches on schedule; returns each batch's lateness in seconds."""
    rng = random.Random(seed)
    per_batch = max(1, round(len(feed.rows) * per_second * BATCH_SECONDS))
    lateness: list[float] = []
    start = time.perf_counter()
    batch = 0
    cursor = 0
    while (elapsed := time.perf_counter() - start) < seconds:
        due = start + batch * BATCH_SECONDS
        lateness.append(max(0.0, time.perf_counter() - due))
        feed.tick(cursor, per_batch, rng)
        cursor += per_batch
        batch += 1
        next_due = start + batch * BATCH_SECONDS
        await asyncio.sleep(max(0.0, next_due - time.perf_counter()))
    del elapsed
    return lateness


async def engine_phase(args: argparse.Namespace, feed: SyntheticFeed) -> list[float]:
    """The engine's ticks on the app's event loop (as tsbot-tui runs it), or with `--engine-thread` on a
    loop of their own in another thread: what that architecture would give (the GIL is then what the
    two share)."""
    if not args.engine_thread:
        return await engine_ticks(feed, args.ticks_per_second, args.seconds, args.seed)
    return await asyncio.to_thread(
        lambda: asyncio.run(engine_ticks(feed, args.ticks_per_second, args.seconds, args.seed))
    )


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    ordered = sorted(values)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
        "max_ms": round(ordered[-1] * 1000, 3),
    }


async def headless_phase(args: argparse.Namespace, settings: Settings) -> tuple[list[float], float]:
    """The same load with no app: the engine's own lateness and CPU."""
    feed = SyntheticFeed(settings, args.positions, args.seed)
    cpu = time.process_time()
    lateness = await engine_phase(args, feed)
    return lateness, time.process_time() - cpu


async def run(args: argparse.Namespace) -> dict[str, object]:
    environ = {
        "TSBOT_TUI__REFRESH_PER_SECOND": str(args.fps),
        "TSBOT_LOGGING__FILE": "/tmp/tsbot-bench/trading_bot.log",
    }
    settings = load_config(None, environ=environ, cwd=Path("/nonexistent-config-dir")).settings
    width, height = (int(v) for v in args.size.split("x"))

    before, cpu_before = await headless_phase(args, settings)

    feed = SyntheticFeed(settings, args.positions, args.seed)
    app = DashboardApp(settings, feed=feed, code_roots=[], freeze_gc_after_start=True)
    async with app.run_test(size=(width, height)) as pilot:
        await pilot.pause(0.5)  # first full frame: every row added
        table = app.query_one(PositionsTable)
        app.frame_seconds.clear()
        cells_before = table.cell_updates
        cpu = time.process_time()
        lateness = await engine_phase(args, feed)
        cpu_app = time.process_time() - cpu
        frames = list(app.frame_seconds)
        cells = table.cell_updates - cells_before
        rows = table.row_count

    after, cpu_after = await headless_phase(args, settings)
    headless = percentiles(before + after)
    with_app = percentiles(lateness)
    return {
        "positions": args.positions,
        "rows_in_table": rows,
        "ticks_per_second_total": round(feed.ticks / args.seconds),
        "seconds": args.seconds,
        "size": args.size,
        "refresh_per_second": args.fps,
        "engine_thread": args.engine_thread,
        "frames": len(frames),
        "frame_paint": percentiles(frames),
        "cell_updates_per_frame": round(cells / max(1, len(frames))),
        "engine_tick_lateness_with_app": with_app,
        "engine_tick_lateness_baseline": headless,
        "engine_tick_lateness_headless_before": percentiles(before),
        "engine_tick_lateness_headless_after": percentiles(after),
        "lateness_p99_ratio": round(with_app["p99_ms"] / max(headless["p99_ms"], 1e-3), 2),
        "cpu_seconds": {
            "headless_before": round(cpu_before, 3),
            "with_app": round(cpu_app, 3),
            "headless_after": round(cpu_after, 3),
        },
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def medians(runs: list[dict[str, object]]) -> dict[str, object]:
    """The median of every figure over the runs (nested one level: the percentile and CPU groups)."""
    result: dict[str, object] = {}
    for key, value in runs[0].items():
        if isinstance(value, dict):
            result[key] = {k: statistics.median(r[key][k] for r in runs) for k in value}  # type: ignore[index]
        elif isinstance(value, int | float) and not isinstance(value, bool):
            result[key] = statistics.median(r[key] for r in runs)  # type: ignore[misc]
        else:
            result[key] = value
    return result


async def run_all(args: argparse.Namespace) -> dict[str, object]:
    runs = [await run(args) for _ in range(args.runs)]
    if len(runs) == 1:
        return runs[0]
    return {**medians(runs), "runs": len(runs), "each_run": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--positions", type=int, default=1000)
    parser.add_argument("--ticks-per-second", type=int, default=10, help="mark ticks per position per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fps", type=int, default=4, help="[tui] refresh_per_second")
    parser.add_argument("--size", default="160x48")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--engine-thread",
        action="store_true",
        help="run the engine's ticks on their own event loop in another thread (in every phase)",
    )
    parser.add_argument("--runs", type=int, default=1, help="repeat the measurement; figures are medians")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    result = asyncio.run(run_all(args))
    if args.json:
        print(json.dumps(result))
        return 0
    paint = result["frame_paint"]
    with_app = result["engine_tick_lateness_with_app"]
    base = result["engine_tick_lateness_baseline"]
    print(
        f"{result['positions']} positions, {result['ticks_per_second_total']} mark ticks/s, "
        f"{result['refresh_per_second']} frames/s at {result['size']} for {result['seconds']:g}s"
        + (f" (medians of {result['runs']} runs)" if "runs" in result else "")
    )
    print(
        f"frame paint (snapshot + diff + cell updates): p50 {paint['p50_ms']} ms, p99 {paint['p99_ms']} ms, "  # type: ignore[index]
        f"max {paint['max_ms']} ms over {result['frames']} frames; "  # type: ignore[index]
        f"{result['cell_updates_per_frame']} cells updated per frame"
    )
    print(
        f"engine tick lateness with the app: p50 {with_app['p50_ms']} ms, p99 {with_app['p99_ms']} ms, "  # type: ignore[index]
        f"max {with_app['max_ms']} ms (baseline without the app: p50 {base['p50_ms']} ms, "  # type: ignore[index]
        f"p99 {base['p99_ms']} ms, max {base['max_ms']} ms, before and after the app phase)"  # type: ignore[index]
    )
    cpu = result["cpu_seconds"]
    print(
        f"p99 ratio app/headless: {result['lateness_p99_ratio']}; CPU seconds: headless before "
        f"{cpu['headless_before']}, with the app {cpu['with_app']}, headless after {cpu['headless_after']}"  # type: ignore[index]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

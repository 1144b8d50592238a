"""How long a wave of N signals takes from insertion until its last position is protected, against the
fastest any engine could do it on the same venue.

    python bench/wave_protection.py --signals N --latency-ms L [--venue sim|emulator] [--jitter-pct J]
        [--design per-position|global-lock] [--timeout-s 10] [--runs R] [--json]

`--venue sim` (default) runs the in-process sim venue. `--venue emulator` runs the real production path:
`tsbot sim-exchange` in its own process (Binance's wire format, its request weights, order counts and limit
headers), and the engine talking to it through real ccxt, real HTTP and real signing, configured exactly as
for a real Binance account (`venue.kind = "binanceusdm"`; only `venue.base_url` differs). Every call then
pays L twice over loopback HTTP in the emulator (its `--latency-ms`), and the engine paces every request
itself (ccxt's throttle is off on every URL).

Set-up, per run (not timed): a fresh database in an embedded PostgreSQL started in a temporary directory
for this invocation, migrated by the engine itself; a fresh sim venue (volatility 0, so no stop ever
triggers and prices stand still; every call takes L ms round trip, or L ± J % uniform with `--jitter-pct`;
no injected faults; the sim's own client timeout set to 300 s so that only the engine's budget can time a
call out); the real `Engine` on the real `SystemClock`, configured through `load_config` as an operator
would (`TSBOT_*` variables, no config file), started with `await engine.start()` (markets, marks and the
start-up reconcile take a few round trips, before the wave). Signals come from `monitoring.signals`
(`signals.source = "postgres"`), as from any outside provider. The wave goes into a running engine: the
bench waits until the signal consumer's LISTEN is up, then `--settle-s` (1 s) more, so the insert does not
collide with the engine's start-up (with no settle, the insert races the consumer's first claim and a
NOTIFY can be lost; see `wave_started_seconds`).

Measured, in real time: the N signals (distinct symbols, alternately long and short) are inserted in ONE
transaction with `Store.insert_signals`. Time zero is the moment just before that insert starts; nothing
is subtracted (the insert, the NOTIFY, the claim, the database writes are all in). A position is protected
when the engine's own guard records it as covered, i.e. both its hard stop and its native trailing stop
are confirmed by the venue (`PositionGuard.protected_at`, the engine's monotonic clock, which is the same
`time.monotonic` the bench reads). `protect_seconds` = last position protected − time zero; it is reported
only when every opened position got protected (else null, with `positions_protected` and
`last_protected_seconds`). A run is abandoned after `--deadline-s` (default: generous, see `--help`).

Also counted: `timeouts` — `ProtectionTimedOut` events (a protective order call that exceeded
`protection.call_timeout_seconds`, the incident's "Timeout creating trailing stop"); `call_timeouts` — every
venue call of the engine that timed out (entries and look-ups included); `positions_timed_out` and
`protected_within_timeout` (positions covered no later than the call timeout after their fill: the
incident's coverage); `wave_started_seconds` (when the engine began the wave, from `monitoring.waves`);
`rate_limited` — `RateLimited` (HTTP 429) plus `Banned` (HTTP 418) answers of the venue, counted by a
pass-through wrapper (`bench/global_lock.py: CountingVenue`).

The lower bound (`lower_bound_seconds`), with L the round trip, for a client that honours the venue's
order budgets (limit B orders per window W seconds; the sim, like Binance USDⓈ-M, has 300/10 s and
1 200/60 s; read from the venue's `capabilities().order_rate_budgets`):

* critical path: a position needs its entry fill before its stops can be placed, and both stops are
  independent, so at least 2 round trips from the first send: 2·L.
* rate bound: the wave needs 3N orders (entry + hard stop + trailing stop each). Kept as a sliding window
  (never more than B sends in any W seconds — the only schedule that is safe whatever the venue's window
  alignment, and the one the engine's `OrderBudget` keeps), the k-th send (k = 1, 2, …) can go no earlier
  than floor((k − 1) / B) · W after the first. The last order of the wave is a protective one whose
  answer comes L after it is sent: rate bound = max over budgets of floor((3N − 1) / B) · W, plus L.
  (Likewise the last entry goes no earlier than floor((N − 1) / B) · W, plus 2·L; this term only matters
  when L > W, but it is in the max.)
* the budgets are those the engine allows itself: the venue's less its 10 % headroom (`engine.pacing`),
  e.g. 270 / 10 s and 1 080 / min for Binance's 300 and 1 200. The venue's own limits are in the JSON too.
* lower_bound = max(critical path, rate bound, entry term), computed by `lower_bound()` below; the JSON's
  `lower_bound.binding` says which term it is. Examples: N = 50, L = 2 s: max(4, 0 + 2) = 4 s. N = 300, L = 2 s:
  max(4, floor(899 / 300) · 10 + 2) = 22 s (the 1 200/min budget gives floor(899 / 1200) · 60 = 0).

The rate bound assumes all N entries could go out in the first window and the 2N stops after; the engine
deliberately does not do that (protection first: an entry is admitted only when the budget also holds its
two stops and every stop already promised). Under that rule a window of W seconds can admit at most
floor(B / 3) entries, so the last entry goes no earlier than floor((N − 1) / floor(B / 3)) · W and is
protected 2·L later; this is reported as `reserved_budget_bound_seconds` (N = 300, L = 2 s: 24 s), for
information. `ratio` is always protect_seconds / lower_bound_seconds.

Configuration choices, all printed with the results:

* `signals.wave_window_ms` = 0 by default (`--wave-window-ms`): the whole wave is inserted in one
  transaction, so the consumer's first claim already takes all N and the window would only add a fixed
  wait before processing (signal batching, not protection). Give 500 (the engine default) to include it.
* `signals.max_concurrent_entries` = min(N, max(50, floor(B₁₀ / 3))) by default (`--max-concurrent-entries`):
  the 10-second budget admits at most floor(300 / 3) = 100 protected entries at once, all at the very
  start of a wave; fewer entry workers than that would let the worker pool, not the venue, pace that first
  burst (at 50, the second 50 entries would start one round trip late), while more than 100 can never all
  be admitted together and only wait in the budget. For N ≤ 50 this is the engine default of 50 (an
  engine never runs more workers than the wave has entries).
* `signals.max_positions` = max(100, N); `venue.sim.max_conditional_orders` = max(200, 2N) (the sim's
  per-account cap of 200 open stops would otherwise refuse the stops of positions 101+).
* N > 84: the sim universe lists 84 perpetuals and the engine allows one open position per symbol, so the
  bench widens it with `venue.sim.synthetic_listings` = N − 84: synthetic `SYN001USDT`, … whose price, tick,
  step, minimum notional and leverage copy a real listing's (cycling through the table). The venue's
  `load_markets()` (the emulator's `exchangeInfo`) returns them like any other market, so the engine trades
  them end to end.

`--design global-lock` (bench-only, `bench/global_lock.py: GlobalLockVenue`) wraps the venue so that both
protective-order calls take one shared `asyncio.Lock` and hold it across the venue round trip: the
incident's design. The engine's per-call timeout then includes the wait for the lock.

With `--runs R` (default 3) the runs are made one after another in this invocation (each on a fresh
database and venue); the report gives the median of each figure and every run's value. The figures are
wall-clock measurements on a shared machine: the database and the bench share its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from emulator_process import emulator_process
from global_lock import CountingAttachingVenue, CountingVenue, GlobalLockVenue

from engine.clock import SystemClock
from engine.config import Settings, load_config
from engine.engine import Engine, build_venue
from engine.events import PositionOpened, ProtectionTimedOut, SignalRejected
from engine.exchange.port import AttachesStopToEntry, RateBudget
from engine.pacing import DEFAULT_HEADROOM
from engine.venues import bybit_limits
from engine.venues.sim import SimVenue
from engine.venues.sim.core import SimCore
from engine.venues.sim.universe import UNIVERSE, Listing, select_listings
from protection.manager import PositionGuard
from storage.database import ensure_database_exists
from storage.embedded import EmbeddedPostgres, start_embedded

ORDERS_PER_POSITION = 3  # entry + hard stop + trailing stop
CRITICAL_PATH_ROUND_TRIPS = 2  # entry, then both stops together
BYBIT_CRITICAL_PATH_ROUND_TRIPS = 3  # entry with its hard stop, its fill read back, the trailing stop
ENGINE_DEFAULT_CONCURRENT_ENTRIES = 50
DESIGNS = ("per-position", "global-lock")
VENUES = ("sim", "emulator", "emulator-bybit")
POLL_SECONDS = 0.02

log = logging.getLogger("bench.wave_protection")


# --- the lower bound -------------------------------------------------------------------------------------


def earliest_send(k: int, budgets: Sequence[RateBudget]) -> float:
    """Seconds after the first send at which the k-th send (1-based) can go out at the earliest, when no
    more than `limit` sends may fall within any `window_seconds` (sliding windows, all budgets at once)."""
    if k < 1:
        raise ValueError("k counts from 1")
    return max((((k - 1) // b.limit) * b.window_seconds for b in budgets), default=0.0)


@dataclass(frozen=True, slots=True)
class LowerBound:
    critical_path_seconds: float  # 2 round trips
    rate_bound_seconds: float  # last of the 3N sends under the budgets, plus its round trip
    entry_rate_bound_seconds: float  # last of the N entries under the budgets, plus 2 round trips
    seconds: float  # the largest of the three
    binding: str  # which one it is
    reserved_budget_bound_seconds: float  # under the engine's protection-first admission (information)


def lower_bound(signals: int, latency_s: float, budgets: Sequence[RateBudget]) -> LowerBound:
    """The fastest a wave of `signals` positions can be protected (see the module docstring)."""
    critical = CRITICAL_PATH_ROUND_TRIPS * latency_s
    rate = earliest_send(ORDERS_PER_POSITION * signals, budgets) + latency_s
    entries = earliest_send(signals, budgets) + CRITICAL_PATH_ROUND_TRIPS * latency_s
    terms = {"critical_path": critical, "rate_budget": rate, "entry_rate_budget": entries}
    binding = max(terms, key=lambda name: (terms[name], name == "critical_path"))
    reserved = (
        max(
            (((signals - 1) // max(1, b.limit // ORDERS_PER_POSITION)) * b.window_seconds for b in budgets),
            default=0.0,
        )
        + CRITICAL_PATH_ROUND_TRIPS * latency_s
    )
    return LowerBound(
        critical_path_seconds=critical,
        rate_bound_seconds=rate,
        entry_rate_bound_seconds=entries,
        seconds=terms[binding],
        binding=binding,
        reserved_budget_bound_seconds=max(reserved, terms[binding]),
    )


def bybit_lower_bound(signals: int, latency_s: float) -> tuple[LowerBound, tuple[RateBudget, ...]]:
    """The same bound on Bybit, where the entry carries the hard stop (order/create with stopLoss) and the
    trailing stop is one `trading-stop` call. order/create answers with ids only, so the fill price (which
    the trailing stop is priced from) takes a second round trip (order/realtime): 3 round trips on the
    critical path; N trailing stops under the engine's trading-stop budget (Bybit's 10/s per account less
    the headroom), each sent no earlier than its entry's fill is known (2 L) and answered L later; N
    entries under the order/create budget (Bybit's 10/s for linear less the headroom: 9/s), each protected 3
    round trips later. The two are counted apart, as Bybit counts them (each endpoint its own rolling
    second). A hard stop the fill moved by more than a tick costs the engine one more trading-stop call,
    not counted here: a client could set it in the trailing stop's call. Returns the bound and the budgets."""
    trading_stop = RateBudget(
        math.floor(
            bybit_limits.ENDPOINT_LIMITS_PER_SECOND["/v5/position/trading-stop"] * (1 - DEFAULT_HEADROOM)
        ),
        1.0,
    )
    order_create = RateBudget(
        math.floor(bybit_limits.ENDPOINT_LIMITS_PER_SECOND["/v5/order/create"] * (1 - DEFAULT_HEADROOM)), 1.0
    )
    critical = BYBIT_CRITICAL_PATH_ROUND_TRIPS * latency_s
    rate = 2 * latency_s + earliest_send(signals, [trading_stop]) + latency_s
    entries = earliest_send(signals, [order_create]) + BYBIT_CRITICAL_PATH_ROUND_TRIPS * latency_s
    terms = {"critical_path": critical, "rate_budget": rate, "entry_rate_budget": entries}
    binding = max(terms, key=lambda name: (terms[name], name == "critical_path"))
    bound = LowerBound(
        critical_path_seconds=critical,
        rate_bound_seconds=rate,
        entry_rate_bound_seconds=entries,
        seconds=terms[binding],
        binding=binding,
        reserved_budget_bound_seconds=terms[binding],
    )
    return bound, (trading_stop, order_create)


# --- the venue's universe --------------------------------------------------------------------------------


def bench_listings(signals: int) -> tuple[dict[str, Listing], bool]:
    """The real universe, widened with synthetic `SYNnnnUSDT` listings (`venue.sim.synthetic_listings`)
    when `signals` needs more symbols than it has. Returns the listings and whether any is synthetic."""
    extra = max(0, signals - len(UNIVERSE))
    return select_listings((), extra), extra > 0


# --- one run ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class RunResult:
    run: int
    protect_seconds: float | None  # None: not every opened position was protected before the deadline
    last_protected_seconds: float | None
    ratio: float | None
    timeouts: int
    timeouts_by_operation: dict[str, int]
    positions_timed_out: int  # distinct positions with at least one protection timeout
    protected_within_timeout: int  # positions covered no later than timeout_s after their fill
    call_timeouts: int
    rate_limited: int
    banned: int
    signals_rejected: int
    positions_opened: int
    positions_protected: int
    insert_seconds: float
    wave_started_seconds: float | None  # the engine's `monitoring.waves.started_at` of the wave
    first_fill_seconds: float | None
    last_fill_seconds: float | None
    fill_to_protected_median_seconds: float | None
    fill_to_protected_max_seconds: float | None
    protective_orders_sent: int
    lock_wait_max_seconds: float | None = None
    budget_wait_p99_ms: float | None = None  # how long calls waited for rate budget during the wave
    http_refusals: dict[int, int] = field(default_factory=dict)  # emulator: HTTP 429 / 418 by status
    reject_reasons: dict[str, int] = field(default_factory=dict)
    # Per position, the time from its fill until a hard stop of ours was live (monitoring.positions
    # .hard_stop_gap_seconds): the longest, and how many positions had none recorded when the run ended.
    hard_stop_gap_max_s: float | None = None
    hard_stop_gap_unmeasured: int = 0


def engine_environ(args: argparse.Namespace, dsn: str, seed: int) -> dict[str, str]:
    latency_s = args.latency_ms / 1000
    environ = {
        "TSBOT_DATABASE__DSN": dsn,
        "TSBOT_SIGNALS__SOURCE": "postgres",
        "TSBOT_SIGNALS__WAVE_WINDOW_MS": str(args.wave_window_ms),
        "TSBOT_SIGNALS__MAX_POSITIONS": str(max(100, args.signals)),
        "TSBOT_SIGNALS__MAX_CONCURRENT_ENTRIES": str(args.max_concurrent_entries),
        "TSBOT_VENUE__SIM__SEED": str(seed),
        "TSBOT_VENUE__SIM__VOLATILITY": "0",
        "TSBOT_VENUE__SIM__LATENCY__SECONDS": f"{latency_s:g}",
        "TSBOT_VENUE__SIM__REQUEST_TIMEOUT_SECONDS": "300",
        "TSBOT_VENUE__SIM__MAX_CONDITIONAL_ORDERS": str(max(200, 2 * args.signals)),
        "TSBOT_PROTECTION__CALL_TIMEOUT_SECONDS": f"{args.timeout_s:g}",
    }
    if args.jitter_pct > 0:
        environ["TSBOT_VENUE__SIM__LATENCY__DISTRIBUTION"] = "uniform"
        environ["TSBOT_VENUE__SIM__LATENCY__JITTER_SECONDS"] = f"{latency_s * args.jitter_pct / 100:g}"
    return environ


def sim_budgets() -> tuple[RateBudget, ...]:
    """The sim venue's order budgets as it announces them (`capabilities().order_rate_budgets`); the
    emulator announces the same in `exchangeInfo.rateLimits` (the same `[venue.sim]` settings)."""
    return tuple(SimCore({}, load_settings({}).venue.sim, now=0.0).capabilities().order_rate_budgets)


def engine_budgets(venue_budgets: Sequence[RateBudget]) -> tuple[RateBudget, ...]:
    """What the engine allows itself of each venue budget (its headroom below the venue's limit)."""
    return tuple(
        RateBudget(max(1, math.floor(b.limit * (1.0 - DEFAULT_HEADROOM))), b.window_seconds)
        for b in venue_budgets
    )


def load_settings(environ: dict[str, str]) -> Settings:
    # A directory that cannot hold a config.toml: defaults + the environment above, nothing else.
    return load_config(None, environ=environ, cwd=Path("/nonexistent-bench-config-dir")).settings


async def run_once(
    args: argparse.Namespace, server: EmbeddedPostgres, run: int, listings: dict[str, Listing], bound: float
) -> RunResult:
    if args.venue.startswith("emulator"):
        sim_settings = {
            "TSBOT_VENUE__SIM__VOLATILITY": "0",
            "TSBOT_VENUE__SIM__MAX_CONDITIONAL_ORDERS": str(max(200, 2 * args.signals)),
            "TSBOT_VENUE__SIM__SYNTHETIC_LISTINGS": str(max(0, args.signals - len(UNIVERSE))),
        }
        workdir = Path(tempfile.mkdtemp(prefix="tsbot-wave-emulator-"))
        with emulator_process(
            workdir,
            latency_ms=round(args.latency_ms),
            seed=args.seed + run,
            settings=sim_settings,
            venue="bybit" if args.venue == "emulator-bybit" else "binance",
        ) as emulator:
            dbname = await _fresh_database(server)
            environ = {**engine_environ(args, server.dsn(dbname), args.seed + run)}
            environ.update(emulator.engine_environ())
            return await _run_wave(
                args, server, run, dbname, listings, bound, load_settings(environ), environ
            )
    dbname = await _fresh_database(server)
    settings = load_settings(engine_environ(args, server.dsn(dbname), args.seed + run))
    return await _run_wave(args, server, run, dbname, listings, bound, settings, None)


async def _fresh_database(server: EmbeddedPostgres) -> str:
    dbname = f"bench_{uuid.uuid4().hex[:12]}"
    await ensure_database_exists(server.dsn("postgres"), dbname)
    return dbname


async def _run_wave(
    args: argparse.Namespace,
    server: EmbeddedPostgres,
    run: int,
    dbname: str,
    listings: dict[str, Listing],
    bound: float,
    settings: Settings,
    emulator_environ: dict[str, str] | None,
) -> RunResult:
    clock = SystemClock()
    if emulator_environ is None:
        inner = SimVenue(
            settings.venue.sim, clock=clock, core=SimCore(listings, settings.venue.sim, now=clock.now())
        )
    else:
        inner = build_venue(settings, clock)  # exactly what `tsbot run` builds for a real Binance account
    if args.design == "global-lock":
        venue = GlobalLockVenue(inner)
    elif isinstance(inner, AttachesStopToEntry):
        venue = CountingAttachingVenue(inner)
    else:
        venue = CountingVenue(inner)
    engine = Engine(settings, venue=venue, clock=clock, version="bench", generate_signals=False)

    opened: dict[int, PositionGuard] = {}
    rejected: dict[str, int] = {}
    timeouts: dict[str, int] = {}
    timed_out_positions: set[int] = set()

    async def follow() -> None:
        async for event in engine.events():
            if isinstance(event, PositionOpened):
                assert engine.manager is not None
                opened[event.position_id] = engine.manager.guards[event.position_id]
            elif isinstance(event, SignalRejected):
                rejected[event.reason] = rejected.get(event.reason, 0) + 1
            elif isinstance(event, ProtectionTimedOut):
                timeouts[event.operation] = timeouts.get(event.operation, 0) + 1
                timed_out_positions.add(event.position_id)

    follower = asyncio.create_task(follow(), name="bench-events")
    await asyncio.sleep(0)  # subscribed before anything is published
    try:
        await engine.start()
        assert engine.store is not None and engine.manager is not None
        # Insert into a running engine, as a provider would: LISTEN up and the start-up burst over.
        for _ in range(round(10.0 / POLL_SECONDS)):
            if engine.consumer is not None and engine.consumer.listening:
                break
            await asyncio.sleep(POLL_SECONDS)
        await asyncio.sleep(args.settle_s)
        calls_before = engine.manager.call_stats.summary(clock.monotonic()).timeouts
        symbols = list(listings)[: args.signals]
        rows = [(symbol, "long" if i % 2 == 0 else "short", None, None) for i, symbol in enumerate(symbols)]
        t0_wall, t0 = clock.now(), clock.monotonic()
        await engine.store.insert_signals(rows)
        inserted = clock.monotonic()

        deadline = t0 + args.deadline_s
        while clock.monotonic() < deadline:
            resolved = len(opened) + sum(rejected.values()) >= args.signals
            if resolved and all(g.protected_at is not None for g in opened.values()):
                break
            await asyncio.sleep(POLL_SECONDS)

        protected = [g for g in opened.values() if g.protected_at is not None]
        all_protected = (
            len(opened) + sum(rejected.values()) >= args.signals and len(protected) == len(opened) > 0
        )
        last = max((g.protected_at - t0 for g in protected), default=None)  # type: ignore[operator]
        fills = [g.filled_at - t0 for g in opened.values()]
        fill_to_protected = [g.protected_at - g.filled_at for g in protected]  # type: ignore[operator]
        protect = last if all_protected else None
        wave_started = await _first_wave_started(server.dsn(dbname))
        gaps = [p.hard_stop_gap_seconds for p in [await engine.store.position(i) for i in opened] if p]
        measured = [float(g) for g in gaps if g is not None]
        lock_waits = venue.lock_waits if isinstance(venue, GlobalLockVenue) else None
        waits = engine.budget_waits.summary(clock.monotonic())
        return RunResult(
            run=run + 1,
            protect_seconds=protect,
            last_protected_seconds=last,
            ratio=None if protect is None else protect / bound,
            timeouts=sum(timeouts.values()),
            timeouts_by_operation=dict(timeouts),
            positions_timed_out=len(timed_out_positions),
            protected_within_timeout=sum(1 for d in fill_to_protected if d <= args.timeout_s),
            call_timeouts=engine.manager.call_stats.summary(clock.monotonic()).timeouts - calls_before,
            rate_limited=venue.rate_limited + venue.banned,
            banned=venue.banned,
            signals_rejected=sum(rejected.values()),
            positions_opened=len(opened),
            positions_protected=len(protected),
            insert_seconds=inserted - t0,
            wave_started_seconds=None if wave_started is None else wave_started - t0_wall,
            first_fill_seconds=min(fills, default=None),
            last_fill_seconds=max(fills, default=None),
            fill_to_protected_median_seconds=statistics.median(fill_to_protected)
            if fill_to_protected
            else None,
            fill_to_protected_max_seconds=max(fill_to_protected, default=None),
            protective_orders_sent=engine.manager.budget.protective_sent,
            lock_wait_max_seconds=max(lock_waits, default=0.0) if lock_waits is not None else None,
            budget_wait_p99_ms=waits.p99_ms,
            http_refusals=dict(getattr(inner, "refusals", {})),
            reject_reasons=dict(rejected),
            hard_stop_gap_max_s=max(measured, default=None),
            hard_stop_gap_unmeasured=len(opened) - len(measured),
        )
    finally:
        await engine.stop()
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)


async def _first_wave_started(dsn: str) -> float | None:
    """When the engine began processing the wave (epoch seconds, the database's clock = this host's)."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(
            "SELECT extract(epoch FROM started_at)::float8 FROM monitoring.waves ORDER BY id LIMIT 1"
        )
    finally:
        await conn.close()


# --- the invocation --------------------------------------------------------------------------------------


def _median(values: Sequence[float | None]) -> float | None:
    """Median, with a missing value (a run that did not finish) ranked as worse than any other."""
    if not values:
        return None
    ranked = sorted(values, key=lambda v: math.inf if v is None else v)
    n = len(ranked)
    middle = ranked[(n - 1) // 2 : n // 2 + 1]
    if any(v is None for v in middle):
        return None
    if len(middle) == 1 or middle[0] == middle[1]:
        return middle[0]
    return (middle[0] + middle[1]) / 2  # type: ignore[operator]


async def bench(args: argparse.Namespace, server: EmbeddedPostgres) -> dict[str, Any]:
    listings, synthetic = bench_listings(args.signals)
    venue_budgets = sim_budgets()
    budgets = engine_budgets(venue_budgets)
    bound = lower_bound(args.signals, args.latency_ms / 1000, budgets)
    formula = "max(2*L, max_b(floor((3N-1)/B_b)*W_b) + L, max_b(floor((N-1)/B_b)*W_b) + 2*L)"
    if args.venue == "emulator-bybit":
        bound, budgets = bybit_lower_bound(args.signals, args.latency_ms / 1000)
        venue_budgets = budgets
        formula = "max(3*L, 2*L + floor((N-1)/B_trading_stop)*1s + L, floor((N-1)/B_order_create)*1s + 3*L)"
    results = []
    for run in range(args.runs):
        result = await run_once(args, server, run, listings, bound.seconds)
        results.append(result)
        if not args.json:
            print(_run_line(result), flush=True)

    def values(name: str) -> list[Any]:
        return [getattr(r, name) for r in results]

    refusals = [sum(r.http_refusals.values()) + r.rate_limited for r in results]
    summary: dict[str, Any] = {
        "venue": args.venue,
        "design": args.design,
        "signals": args.signals,
        "latency_ms": args.latency_ms,
        "jitter_pct": args.jitter_pct,
        "timeout_s": args.timeout_s,
        "runs": args.runs,
        "protect_seconds": _median(values("protect_seconds")),
        "lower_bound_seconds": bound.seconds,
        "ratio": _median(values("ratio")),
        "timeouts": _median(values("timeouts")),
        "rate_limited": _median(values("rate_limited")),
        "rate_limit_rejections": _median(refusals),
        "max_rate_limit_rejections": max(refusals),
        "entries_rejected": _median(values("signals_rejected")),
        "budget_wait_p99_ms": _median(values("budget_wait_p99_ms")),
        "positions_protected": _median(values("positions_protected")),
        "positions_timed_out": _median(values("positions_timed_out")),
        "protected_within_timeout": _median(values("protected_within_timeout")),
        "hard_stop_gap_max_s": max((v for v in values("hard_stop_gap_max_s") if v is not None), default=None),
        "hard_stop_gap_unmeasured": max(values("hard_stop_gap_unmeasured")),
        "median": {
            name: _median(values(name))
            for name in (
                "protect_seconds",
                "ratio",
                "timeouts",
                "call_timeouts",
                "rate_limited",
                "positions_protected",
                "last_protected_seconds",
                "last_fill_seconds",
                "fill_to_protected_max_seconds",
            )
        },
        "values": {
            name: values(name)
            for name in (
                "protect_seconds",
                "ratio",
                "timeouts",
                "rate_limited",
                "positions_protected",
                "positions_timed_out",
                "protected_within_timeout",
            )
        },
        "max_timeouts": max(values("timeouts")),
        "max_rate_limited": max(values("rate_limited")),
        "lower_bound": {
            "seconds": bound.seconds,
            "binding": bound.binding,
            "critical_path_seconds": bound.critical_path_seconds,
            "rate_bound_seconds": bound.rate_bound_seconds,
            "entry_rate_bound_seconds": bound.entry_rate_bound_seconds,
            "reserved_budget_bound_seconds": bound.reserved_budget_bound_seconds,
            "budgets": [{"limit": b.limit, "window_seconds": b.window_seconds} for b in budgets],
            "venue_budgets": [{"limit": b.limit, "window_seconds": b.window_seconds} for b in venue_budgets],
            "formula": formula,
        },
        "config": {
            "wave_window_ms": args.wave_window_ms,
            "max_concurrent_entries": args.max_concurrent_entries,
            "max_positions": max(100, args.signals),
            "max_conditional_orders": max(200, 2 * args.signals),
            "synthetic_symbols": max(0, args.signals - len(UNIVERSE)) if synthetic else 0,
            "deadline_s": args.deadline_s,
            "seed": args.seed,
            "settle_s": args.settle_s,
        },
        "all_runs": [asdict(r) for r in results],
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    return summary


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _run_line(r: RunResult) -> str:
    text = (
        f"run {r.run}: protected {r.positions_protected}/{r.positions_opened} "
        f"(rejected {r.signals_rejected}), last at {_fmt(r.last_protected_seconds)} s, "
        f"ratio {_fmt(r.ratio, 3)}, timeouts {r.timeouts} (all calls {r.call_timeouts}), "
        f"{r.positions_timed_out} positions timed out, {r.protected_within_timeout} covered within the "
        f"timeout of their fill, rate-limited {r.rate_limited}; wave claimed at {_fmt(r.wave_started_seconds)} s, fills {_fmt(r.first_fill_seconds)}–{_fmt(r.last_fill_seconds)} s, "
        f"fill→protected max {_fmt(r.fill_to_protected_max_seconds)} s"
    )
    if r.lock_wait_max_seconds is not None:
        text += f", longest lock wait {_fmt(r.lock_wait_max_seconds)} s"
    if r.reject_reasons:
        text += f"; rejects {r.reject_reasons}"
    return text


def print_human(s: dict[str, Any]) -> None:
    lb = s["lower_bound"]
    cfg = s["config"]
    print(
        f"{s['venue']}: wave of {s['signals']} signals, {s['latency_ms']:g} ms per call"
        + (f" ± {s['jitter_pct']:g} %" if s["jitter_pct"] else "")
        + f", design {s['design']}, call timeout {s['timeout_s']:g} s, {s['runs']} runs"
    )
    print(
        f"  config: wave_window_ms {cfg['wave_window_ms']}, max_concurrent_entries "
        f"{cfg['max_concurrent_entries']}, synthetic symbols {cfg['synthetic_symbols']}"
    )
    print(
        f"  lower bound {lb['seconds']:.2f} s ({lb['binding']}): critical path 2×L = "
        f"{lb['critical_path_seconds']:.2f} s, rate bound {lb['rate_bound_seconds']:.2f} s "
        f"(3N = {3 * s['signals']} orders under "
        + ", ".join(f"{b['limit']}/{b['window_seconds']:g} s" for b in lb["budgets"])
        + f", + L); protection-first admission bound {lb['reserved_budget_bound_seconds']:.2f} s"
    )
    values = s["values"]
    print(
        f"  wave start → last position protected: median {_fmt(s['protect_seconds'])} s "
        f"(runs: {', '.join(_fmt(v) for v in values['protect_seconds'])})"
    )
    print(
        f"  ratio to the lower bound: median {_fmt(s['ratio'], 3)} "
        f"(runs: {', '.join(_fmt(v, 3) for v in values['ratio'])})"
    )
    print(
        f"  protection timeouts: median {_fmt(s['timeouts'], 0)} (runs: {values['timeouts']}); "
        f"rate-limit rejections: median {_fmt(s['rate_limit_rejections'], 0)} (max {s['max_rate_limit_rejections']}); "
        f"entries rejected: median {_fmt(s['entries_rejected'], 0)}; waiting for budget p99 "
        f"{_fmt(s['budget_wait_p99_ms'], 0)} ms"
    )
    print(
        f"  positions protected: median {_fmt(s['positions_protected'], 0)} of {s['signals']} "
        f"(runs: {values['positions_protected']}); positions with a timeout: median "
        f"{_fmt(s['positions_timed_out'], 0)} (runs: {values['positions_timed_out']}); covered within "
        f"{s['timeout_s']:g} s of their fill: median {_fmt(s['protected_within_timeout'], 0)} "
        f"(runs: {values['protected_within_timeout']})"
    )
    print(
        f"  time without a hard stop after the fill, longest of all runs: {_fmt(s['hard_stop_gap_max_s'], 3)} s"
        + (
            f" ({s['hard_stop_gap_unmeasured']} positions not measured)"
            if s["hard_stop_gap_unmeasured"]
            else ""
        )
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time from a wave of N signals to its last position protected, on the sim venue.",
    )
    parser.add_argument(
        "--signals", type=int, required=True, help="N: signals in the wave (distinct symbols)"
    )
    parser.add_argument("--latency-ms", type=float, required=True, help="L: round trip of every venue call")
    parser.add_argument("--jitter-pct", type=float, default=0.0, help="uniform jitter, ± percent of L")
    parser.add_argument("--design", choices=DESIGNS, default="per-position")
    parser.add_argument(
        "--venue",
        choices=VENUES,
        default="sim",
        help="sim: the in-process sim venue; emulator: tsbot sim-exchange over real ccxt/HTTP (production pacing)",
    )
    parser.add_argument("--timeout-s", type=float, default=10.0, help="protection.call_timeout_seconds")
    parser.add_argument("--runs", type=int, default=3, help="runs in this invocation; the median is reported")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    parser.add_argument("--wave-window-ms", type=int, default=0, help="signals.wave_window_ms (default 0)")
    parser.add_argument(
        "--max-concurrent-entries",
        type=int,
        default=None,
        help="signals.max_concurrent_entries (default min(N, max(50, floor(orders_per_10s / 3))))",
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="give a run up this long after the insert (default 4 × lower bound + 120)",
    )
    parser.add_argument(
        "--settle-s",
        type=float,
        default=1.0,
        help="wait this long after the engine has started and its LISTEN is up before inserting the wave",
    )
    parser.add_argument("--seed", type=int, default=42, help="sim seed of run 1 (run i uses seed + i − 1)")
    parser.add_argument(
        "--log-level", default="WARNING", help="engine log level on stderr (WARNING, ERROR, CRITICAL …)"
    )
    args = parser.parse_args(argv)
    if args.signals < 1:
        parser.error("--signals must be at least 1")
    if not 0 < args.latency_ms <= 60_000:
        parser.error("--latency-ms must be within (0, 60000]")
    if not 0 <= args.jitter_pct <= 100:
        parser.error("--jitter-pct must be within [0, 100]")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.venue.startswith("emulator") and args.design != "per-position":
        parser.error("--design global-lock wraps the sim venue only")
    if args.max_concurrent_entries is None:
        per_10s = load_settings({}).venue.sim.rate_limits.orders_per_10s
        args.max_concurrent_entries = min(
            args.signals, max(ENGINE_DEFAULT_CONCURRENT_ENTRIES, per_10s // ORDERS_PER_POSITION)
        )
    args.max_concurrent_entries = max(1, min(500, args.max_concurrent_entries))
    if args.deadline_s is None:
        bound = lower_bound(args.signals, args.latency_ms / 1000, engine_budgets(sim_budgets()))
        args.deadline_s = 4 * bound.seconds + 120
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    workdir = Path(tempfile.mkdtemp(prefix="tsbot-wave-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # runs after the server's own atexit stop
    server = start_embedded(workdir / "pgdata")
    summary = asyncio.run(bench(args, server))
    if args.json:
        print(json.dumps(summary))
    else:
        print_human(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

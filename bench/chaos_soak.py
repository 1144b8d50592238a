"""Chaos soak: a running engine, waves of signals, moving marks and faults of every kind, judged on the
venue's truth for N minutes of real time.

    python bench/chaos_soak.py --minutes N [--fault-rate 0.05] [--venue sim|emulator|bybit-emulator] [--json]
        [--wave-every 4] [--wave-size 5] [--volatility 20] [--seed 42] [--breaker-auto-resume 30]
        [--details DIR] [--log-level INFO]

Set-up (not measured): an embedded PostgreSQL in a temporary directory and a fresh database; the real
`Engine` on the real `SystemClock`, configured through `load_config` from `TSBOT_*` variables as an operator
would (shipped protection settings: grace 5 s, reconcile 10 s, call budget 10 s, native trailing stops;
signals from `monitoring.signals`), started with `await engine.start()`. The faults are on from the first
request, so a start can fail (a 429 on `exchangeInfo`, say): it is tried again with a new engine, up to 5
times, and the failures are reported (`failed_starts`).

* `--venue sim` (default): the in-process sim venue (50 ms per call), its marks a random walk at
  `--volatility` (annualised; 20 moves a mark ~0.36 % a second, so hard stops and trailing stops fire and
  positions close and re-open all the time), every call failing with probability `--fault-rate`, split
  evenly between a network error before send, an HTTP 5xx before execution and a lost answer after
  execution (ambiguous), and conditional orders reading back as unknown for 1 s after placement (read-
  after-write lag, announced by the venue as Binance's is). Its order budget is Binance's (300 / 10 s,
  1 200 / min); three refused orders within a minute ban the account for 5 s, doubling up to 20 s (418
  bursts; Binance's own bans start at 2 minutes).
* `--venue emulator`: `tsbot sim-exchange` in its own process (`bench/emulator_process.py`), the engine
  talking to it through real ccxt, HTTP and signing, with `--faults` at `--fault-rate` on every endpoint,
  split evenly between `timeout` (executed, answer held back), `unknown` (503 -1007), `busy` (503 -1008),
  `error` (500), `ratelimit` (429) and `ban` (418, 2 s), plus, on stop placements, `lag:1`
  (read-after-write lag) and `triggering:2` (a fired stop sits 2 s TRIGGERING) at the same rate and
  `stuck` at a fifth of it; marks from the emulator's own walk at `--volatility`.
* `--venue bybit-emulator`: `tsbot sim-exchange --venue bybit` the same way (the engine's venue kind
  `bybit`), its `--faults` at `--fault-rate` on every endpoint, split evenly between `timeout`, `unknown`
  (HTTP 502), `busy` (10016), `error` (500) and `ratelimit` (10006 with its endpoint's limit headers),
  plus entries executed asynchronously (`POST:order/create=async:2`: answered at once, filled 2 s later)
  at the same rate, and `cursor` (a page giving its own cursor again) on `position/list` and
  `order/realtime` at each request fault's rate; no `ban` (`bybit_emulator_faults` says why). Bybit's stops are fields of the
  position, read as such by the auditor (`BybitEmulatorTruth`).

Every `--wave-every` seconds a wave of `--wave-size` signals on symbols neither the venue holds nor the
engine guards is inserted into `monitoring.signals` (alternately long and short). Every second, each of
these happens with probability `--fault-rate` (sim venue: all of them; emulator: the engine's own
commands only): the venue answers the next position read with `[]` (`answer_positions_empty`); a held
symbol's fired stops sit TRIGGERING 2 s, or stick in TRIGGERING, until its position is gone (then a stuck
one expires: `HeldSymbolTriggers`); another client on the account fills the 10-second order window (HTTP 429 for
what is left of it, 418 bans if violations pile up); the operator closes a position (`close_position`);
the operator restarts the protection manager (`restart_protection`). After `--minutes`, waves and
scheduled faults stop and the run drains for one reconcile interval plus slack plus 5 s (the per-call
faults go on), so that whatever is in progress is judged; then the engine is stopped.

Measured by the invariant auditor (`tests/support/auditor.py`), which reads the venue's truth (the sim
core's oracle view, or the emulator's `GET /_sim/state`) and the engine's database every 200 ms:

* `time_weighted_coverage_pct`: Σ over every venue position of the seconds it had a live hard stop and a
  live trailing stop of ours closing it, ÷ Σ of the seconds it was open (left Riemann sum over samples;
  a fired, TRIGGERING stop is not live);
* `unprotected_seconds_by_cause` (of `open_seconds`, the position-seconds the venue held): the seconds
  without both stops split by why, at each sample: `fired` (one of the position's stops fired and the
  venue has not finished filling it: TRIGGERING, the venue's own time until the engine's patience ends
  and it closes the position at market), `fired_banned` (the same while the venue bans the engine: that
  close cannot be sent before the ban ends), `opening` (a new position's first stops on their way, within
  grace of it appearing), `opening_banned` (the same while the venue bans the engine: no stop can be
  placed before the ban ends), `other` (a stop lost, refused or not yet replaced: the engine's to answer
  for);
* `opening_s_per_position`: how `opening` and `opening_banned` together spread over the positions: the
  median, 90th percentile and maximum per position, and how many positions were seen without their first
  stops at all;
* `worst_unprotected_s`: the longest run of consecutive samples in which one venue position lacked one
  of its stops, from its first unprotected sample to the first protected one (resolution 200 ms);
* `duplicates`: incidents of two live stops of ours of one kind on one symbol (never allowed);
* `lost_positions`: incidents of a database position the venue does not hold, or a venue position the
  database does not know, lasting more than one reconcile interval plus slack (the call budget);
* `violations`: every rule's incidents (`uncovered`, `orphan`, `quantity`, `flag_without_order`, ... as
  the auditor defines them, with the engine's grace period), `violation_details` the first few of them;
* `faults_injected`: the scheduled ones by kind, counted by this bench, and every fault the engine met on
  its venue calls by kind (`engine_saw_*`: counted by a pass-through wrapper around the venue, the way
  `bench/global_lock.py: CountingVenue` counts refusals);
* `venue_answers`: the venue's ordinary refusals the engine met (unknown orders, would-trigger, …), not
  faults; `venue_calls`: the engine's venue calls by kind;
* `positions_opened` (venue positions seen), `positions_closed` (database, by exit reason), `waves`,
  `signals` (by final status), `rejected_by_reason` (the rejected ones by reason, numbers folded),
  `order_round_trip_s` (the largest of the engine's moving averages of
  answered order calls, read every second);
* `breaker`: how often the circuit breaker paused entries (`trips`), how often they were resumed, and
  for how many seconds of the run entries were paused. The breaker trips under these faults (it should:
  protection *is* failing at times), and once tripped only the operator resumes by default, which would
  leave most of a long run without waves; `--breaker-auto-resume S` (default 30) stands in for that
  operator with the product's own `protection.breaker.auto_resume_seconds`.

The targets (`targets`): coverage ≥ 99.9 %, worst unprotected ≤ one order round trip + grace, 0
duplicates, 0 lost positions; each reported as met or not. No tuning happens here: the figures are what
the engine does.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import logging
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support.auditor

from emulator_process import emulator_process
from global_lock import CountingVenue

from engine.clock import SystemClock
from engine.config import Settings, load_config
from engine.engine import Engine, build_venue
from engine.exchange.errors import (
    Banned,
    DuplicateClientOrderId,
    ExchangeError,
    NotFound,
    OutcomeUnknown,
    RateLimited,
    Rejected,
    Retryable,
    WouldTriggerImmediately,
)
from engine.exchange.port import OrderSide
from engine.venues.sim import SimVenue
from engine.venues.sim.universe import UNIVERSE
from storage.database import ensure_database_exists
from storage.embedded import EmbeddedPostgres, start_embedded
from tests.support.auditor import (
    AuditLimits,
    BybitEmulatorTruth,
    EmulatorTruth,
    InvariantAuditor,
    PostgresTruth,
    SimTruth,
    VenueTruth,
)

T = TypeVar("T")
SAMPLE_SECONDS = 0.2
DRAIN_EXTRA_SECONDS = 5.0
TARGET_COVERAGE_PCT = 99.9


class FaultCountingVenue(CountingVenue):
    """The wrapped venue, unchanged; every fault of a venue call counted by kind (`errors`), and the
    venue's ordinary refusals apart (`answers`: an unknown order, a stop that would trigger at once, …)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.errors: Counter[str] = Counter()
        self.answers: Counter[str] = Counter()

    async def _counted(self, call: str, awaitable: Awaitable[T]) -> T:
        self.calls[call] = self.calls.get(call, 0) + 1
        try:
            return await awaitable
        except (NotFound, WouldTriggerImmediately, DuplicateClientOrderId, Rejected) as exc:
            self.answers[_kind(exc)] += 1
            raise
        except (ExchangeError, TimeoutError) as exc:
            self.errors[_kind(exc)] += 1
            raise

    def __getattr__(self, name: str) -> Any:  # the sim venue's control surface, unchanged
        return getattr(self.inner, name)


def _kind(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, OutcomeUnknown):
        return "ambiguous_write"
    if isinstance(exc, RateLimited):
        return "http_429"
    if isinstance(exc, Banned):
        return "http_418"
    if isinstance(exc, Retryable):
        if "network error" in text:
            return "network_error"
        if "HTTP 500" in text:
            return "server_error"
        if "timed out" in text:
            return "read_timeout"
        return "retryable"
    if isinstance(exc, TimeoutError):
        return "call_budget_timeout"
    if isinstance(exc, Rejected):
        return f"rejected:{exc.code}"
    return type(exc).__name__


# --- configuration ---------------------------------------------------------------------------------------


def engine_environ(args: argparse.Namespace, dsn: str) -> dict[str, str]:
    third = args.fault_rate / 3
    return {
        "TSBOT_DATABASE__DSN": dsn,
        "TSBOT_SIGNALS__SOURCE": "postgres",
        "TSBOT_SIGNALS__MAX_POSITIONS": "100",
        "TSBOT_VENUE__SIM__SEED": str(args.seed),
        "TSBOT_VENUE__SIM__VOLATILITY": f"{args.volatility:g}",
        "TSBOT_VENUE__SIM__LATENCY__SECONDS": "0.05",
        "TSBOT_VENUE__SIM__FAULTS__NETWORK_ERROR_BEFORE_SEND": f"{third:g}",
        "TSBOT_VENUE__SIM__FAULTS__SERVER_ERROR": f"{third:g}",
        "TSBOT_VENUE__SIM__FAULTS__TIMEOUT_AFTER_ACCEPT": f"{third:g}",
        # 418 bursts, not Binance's 2-minute-and-doubling bans: three refused orders within a minute ban
        # the account for 5 s, doubling up to 20 s.
        "TSBOT_VENUE__SIM__RATE_LIMITS__BAN_SECONDS": "5",
        "TSBOT_VENUE__SIM__RATE_LIMITS__MAX_BAN_SECONDS": "20",
        # The operator who would look at the cause and resume entries: the breaker resumes them itself
        # after this long without a reason to trip (0: entries stay paused once it trips).
        "TSBOT_PROTECTION__BREAKER__AUTO_RESUME_SECONDS": f"{args.breaker_auto_resume:g}",
    }


def spread(values: Sequence[float]) -> dict[str, float | int]:
    """The median, 90th percentile and maximum of per-position seconds, and how many are above zero."""
    ordered = sorted(values)
    if not ordered:
        return {"positions": 0, "with_any": 0, "median": 0.0, "p90": 0.0, "max": 0.0}
    return {
        "positions": len(ordered),
        "with_any": sum(1 for v in ordered if v > 0),
        "median": round(statistics.median(ordered), 3),
        "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 3),
        "max": round(ordered[-1], 3),
    }


def emulator_faults(rate: float) -> str:
    request_faults = ("timeout", "unknown", "busy", "error", "ratelimit", "ban")
    each = rate / len(request_faults)
    rules = [f"*={fault}@{each:g}" for fault in request_faults]
    rules += [f"POST:algoOrder=lag:1@{rate:g}", f"POST:algoOrder=triggering:2@{rate:g}"]
    rules += [f"POST:algoOrder=stuck@{rate / 5:g}"]
    return ",".join(rules)


def bybit_emulator_faults(rate: float) -> str:
    """The Bybit emulator's: its request faults at `rate` on every endpoint, and entries executed as Bybit
    documents order creation (asynchronously: filled 2 s after their answer) at `rate`. No `ban`: Bybit's
    403 bans the IP for 10 minutes, and only past 600 requests in 5 s, which the engine's pacer never
    reaches; one would stop every request of the run for 10 minutes, on Bybit as on its emulator."""
    request_faults = ("timeout", "unknown", "busy", "error", "ratelimit")
    each = rate / len(request_faults)
    rules = [f"*={fault}@{each:g}" for fault in request_faults]
    rules += [f"POST:order/create=async:2@{rate:g}"]
    # Pages that give their own cursor again, on the paged lists the engine reads.
    rules += [f"GET:{endpoint}=cursor@{each:g}" for endpoint in ("position/list", "order/realtime")]
    return ",".join(rules)


def venue_faults(args: argparse.Namespace) -> str | None:
    """The `--faults` SPEC the emulator of `--venue` runs with (None: the sim venue's own faults)."""
    if args.venue == "emulator":
        return emulator_faults(args.fault_rate)
    if args.venue == "bybit-emulator":
        return bybit_emulator_faults(args.fault_rate)
    return None


def load_settings(environ: dict[str, str]) -> Settings:
    return load_config(None, environ=environ, cwd=Path("/nonexistent-bench-config-dir")).settings


# --- the soak --------------------------------------------------------------------------------------------


class HeldSymbolTriggers:
    """The sim venue's fired stops on chosen held symbols sit TRIGGERING (2 s, or for good) until that
    symbol's position is gone; then a stuck one finishes (it expires: nothing left to reduce), and the next
    position on the symbol starts with a venue that fills at once. A stuck order the venue never ended
    would hold its symbol closed to new positions for the rest of the run: the engine waits for a fired
    stop to end before it opens anything there (it could close whatever the symbol holds next)."""

    DELAY_SECONDS = 2.0

    def __init__(self, sim: SimVenue) -> None:
        self.sim = sim
        self._misbehaving: set[str] = set()

    def lift_where_gone(self, held: set[str]) -> None:
        for symbol in sorted(self._misbehaving - held):
            self.sim.set_trigger_delay(None, symbol=symbol)
            self.sim.end_stuck_triggers(symbol)
            self._misbehaving.discard(symbol)

    def delay(self, symbol: str) -> bool:
        """Fired stops on `symbol` sit TRIGGERING for 2 s; False (nothing done) if it misbehaves already."""
        if symbol in self._misbehaving:
            return False
        self.sim.set_trigger_delay(self.DELAY_SECONDS, symbol=symbol)
        self._misbehaving.add(symbol)
        return True

    def stick(self, symbol: str) -> None:
        """Fired stops on `symbol` stay TRIGGERING for good."""
        self.sim.set_trigger_delay(None, symbol=symbol, stuck=True)
        self._misbehaving.add(symbol)


class Soak:
    def __init__(
        self, args: argparse.Namespace, engine: Engine, venue: FaultCountingVenue, truth: VenueTruth, dsn: str
    ) -> None:
        self.args = args
        self.engine = engine
        self.venue = venue
        self.sim: SimVenue | None = venue.inner if isinstance(venue.inner, SimVenue) else None
        self.rng = random.Random(f"chaos-soak:{args.seed}")
        self.auditor = InvariantAuditor(
            truth, PostgresTruth(dsn), AuditLimits.from_settings(engine.settings), clock=SystemClock()
        )
        self.scheduled: Counter[str] = Counter()
        self.waves = 0
        self.round_trip = 0.0  # the largest of the engine's order round-trip estimates seen
        self._symbols = sorted(UNIVERSE)
        self._triggers = HeldSymbolTriggers(self.sim) if self.sim is not None else None
        self._commands: set[asyncio.Task[Any]] = set()
        self.entries_paused_seconds = 0.0  # seconds of the run with entries paused (sampled every second)

    def held(self) -> set[str]:
        if self.sim is not None:
            return {p.symbol for p in self.sim.core.inspect(self.engine.clock.now()).positions}
        manager = self.engine.manager
        return set(manager.by_symbol) if manager is not None else set()

    async def wave(self) -> None:
        manager = self.engine.manager
        busy = self.held() | (set(manager.by_symbol) if manager is not None else set())
        free = [s for s in self._symbols if s not in busy]
        chosen = self.rng.sample(free, min(self.args.wave_size, len(free)))
        assert self.engine.store is not None
        await self.engine.store.insert_signals(
            [(s, "long" if i % 2 == 0 else "short", None, None) for i, s in enumerate(chosen)]
        )
        self.waves += 1

    def command(self, awaitable: Awaitable[Any], name: str) -> None:
        async def run() -> None:
            try:
                await awaitable
            except Exception as exc:  # a failed command is a figure too
                self.scheduled[f"{name}_failed"] += 1
                logging.getLogger("chaos-soak").warning("%s failed: %r", name, exc)

        task = asyncio.create_task(run(), name=f"soak-{name}")
        self._commands.add(task)
        task.add_done_callback(self._commands.discard)

    def scheduled_faults(self) -> None:
        """One second's worth of scheduled faults, each with probability `--fault-rate`."""
        rate, rng = self.args.fault_rate, self.rng
        manager = self.engine.manager
        held = sorted(self.held())
        if self.sim is not None and self._triggers is not None:
            self._triggers.lift_where_gone(set(held))
            if rng.random() < rate:
                self.sim.answer_positions_empty(1)
                self.scheduled["empty_positions_answer"] += 1
            if held and rng.random() < rate and self._triggers.delay(rng.choice(held)):
                self.scheduled["trigger_delay_2s"] += 1
            if held and rng.random() < rate:
                self._triggers.stick(rng.choice(held))
                self.scheduled["stuck_trigger"] += 1
            if rng.random() < rate and self._fill_order_window():
                self.scheduled["order_window_filled_429"] += 1
        if manager is not None and manager.guards and rng.random() < rate:
            self.command(self.engine.close_position(rng.choice(sorted(manager.guards))), "operator_close")
            self.scheduled["operator_close"] += 1
        restarting = any(t.get_name() == "soak-protection_restart" for t in self._commands)
        if not restarting and rng.random() < rate:
            self.command(self.engine.restart_protection(), "protection_restart")
            self.scheduled["protection_restart"] += 1

    def _fill_order_window(self) -> bool:
        """Another client on the account sends refused orders (reduce-only on a flat symbol, counted as
        every new order is) until the 10-second window is full, keeping the minute's window 100 short."""
        assert self.sim is not None
        core, now = self.sim.core, self.engine.clock.now()
        limits = self.engine.settings.venue.sim.rate_limits
        counts = core.order_counts(now)
        room = min(limits.orders_per_10s - counts[10.0], limits.orders_per_minute - 100 - counts[60.0])
        flat = next((s for s in self._symbols if s not in self.held()), None)
        if room <= 0 or flat is None:
            return False
        for i in range(room):
            try:
                core.place_market_order(
                    flat, OrderSide.SELL, Decimal(1), f"nb{int(now)}-{i}", now, reduce_only=True
                )
            except (RateLimited, Banned):
                break
            except ExchangeError:
                pass
        return True

    async def run(self) -> None:
        self.auditor.engine_up(True)
        deadline = time.monotonic() + self.args.minutes * 60
        next_wave = time.monotonic()
        async with self.auditor.sampling(SAMPLE_SECONDS):
            while time.monotonic() < deadline:
                manager = self.engine.manager  # (a protection restart replaces it)
                if manager is not None:
                    self.round_trip = max(self.round_trip, manager.order_round_trip_seconds)
                if time.monotonic() >= next_wave:
                    await self.wave()
                    next_wave += self.args.wave_every
                self.scheduled_faults()
                await asyncio.sleep(1.0)
                if self.engine.entries_paused:
                    self.entries_paused_seconds += 1.0
            limits = self.auditor.limits
            await asyncio.sleep(
                limits.reconcile_seconds + limits.reconcile_slack_seconds + DRAIN_EXTRA_SECONDS
            )
            for task in list(self._commands):
                task.cancel()
            await asyncio.gather(*self._commands, return_exceptions=True)
        self.auditor.engine_up(False)


async def soak(args: argparse.Namespace, server: EmbeddedPostgres, workdir: Path) -> dict[str, Any]:
    dbname = f"soak_{uuid.uuid4().hex[:12]}"
    await ensure_database_exists(server.dsn("postgres"), dbname)
    dsn = server.dsn(dbname)
    environ = engine_environ(args, dsn)
    clock = SystemClock()
    faults = venue_faults(args)
    if faults is not None:
        emulator_settings = {"TSBOT_VENUE__SIM__VOLATILITY": f"{args.volatility:g}"}
        bybit = args.venue == "bybit-emulator"
        with emulator_process(
            workdir / "emulator",
            latency_ms=0,
            seed=args.seed,
            settings=emulator_settings,
            faults=faults,
            venue="bybit" if bybit else "binance",
        ) as emulator:
            environ.update(emulator.engine_environ())
            settings = load_settings(environ)
            truth: VenueTruth = BybitEmulatorTruth(emulator.url) if bybit else EmulatorTruth(emulator.url)
            return await _soak(
                args, settings, lambda: FaultCountingVenue(build_venue(settings, clock)), truth, dsn
            )
    settings = load_settings(environ)
    core = SimVenue(settings.venue.sim, clock=clock).core

    def sim_session() -> FaultCountingVenue:  # a new connection to the same exchange account
        sim = SimVenue(settings.venue.sim, clock=clock, core=core)
        sim.set_read_lag(1.0)
        return FaultCountingVenue(sim)

    return await _soak(args, settings, sim_session, SimTruth(core, clock), dsn)


START_ATTEMPTS = 5


async def _soak(
    args: argparse.Namespace,
    settings: Settings,
    connect: Callable[[], FaultCountingVenue],
    truth: VenueTruth,
    dsn: str,
) -> dict[str, Any]:
    """Start the engine (the faults are on from the first request: a start that fails is tried again
    with a new engine, as an operator would, up to `START_ATTEMPTS` times), then soak."""
    started = time.monotonic()
    failed_starts: list[str] = []
    while True:
        venue = connect()
        engine = Engine(settings, venue=venue, clock=SystemClock(), version="chaos-soak")  # type: ignore[arg-type]
        try:
            await engine.start()
            break
        except (ExchangeError, TimeoutError) as exc:
            failed_starts.append(f"{type(exc).__name__}: {exc}"[:200])
            if len(failed_starts) >= START_ATTEMPTS:
                raise
    run = Soak(args, engine, venue, truth, dsn)
    try:
        await run.run()
        round_trip = run.round_trip
        conn = await asyncpg.connect(dsn)
        try:
            closed = await conn.fetch(
                "SELECT exit_reason, count(*) AS n FROM monitoring.positions WHERE status = 'closed' GROUP BY 1"
            )
            signals = await conn.fetch("SELECT status, count(*) AS n FROM monitoring.signals GROUP BY 1")
            # Why signals were turned away, numbers folded (a run's rejections vary 229–406 of 750 on the
            # sim: which reasons move with it).
            rejections = await conn.fetch(
                "SELECT regexp_replace(reason, '[0-9][0-9.]*', 'N', 'g') AS why, count(*) AS n "
                "FROM monitoring.signals WHERE status = 'rejected' GROUP BY 1 ORDER BY 2 DESC LIMIT 12"
            )
            pauses = await conn.fetch(
                "SELECT type, message FROM monitoring.events WHERE type IN ('entries_paused', 'entries_resumed')"
            )
        finally:
            await conn.close()
    finally:
        with contextlib.suppress(Exception):
            await engine.stop()
        await run.auditor.close()
    figures = run.auditor.figures()
    grace = float(settings.protection.grace_seconds)
    worst_target = round_trip + grace
    coverage = figures.time_weighted_coverage_pct
    faults = dict(run.scheduled) | {f"engine_saw_{k}": v for k, v in sorted(venue.errors.items())}
    return {
        "venue": args.venue,
        "minutes": args.minutes,
        "fault_rate": args.fault_rate,
        "seed": args.seed,
        "volatility": args.volatility,
        "wall_seconds": round(time.monotonic() - started, 1),
        "time_weighted_coverage_pct": None if coverage is None else round(coverage, 4),
        "worst_unprotected_s": round(figures.worst_unprotected_s, 3),
        "worst_unprotected_symbol": figures.worst_unprotected_symbol,
        "open_seconds": round(figures.open_seconds, 3),
        "unprotected_seconds_by_cause": {
            cause: round(seconds, 3)
            for cause, seconds in sorted(figures.unprotected_seconds_by_cause.items())
        },
        "opening_s_per_position": spread(
            [
                a + b
                for a, b in zip(
                    run.auditor.unprotected_per_position("opening"),
                    run.auditor.unprotected_per_position("opening_banned"),
                    strict=True,
                )
            ]
        ),
        "duplicates": figures.duplicates,
        "lost_positions": figures.lost_positions,
        "violations": dict(figures.violations),
        "violation_details": run.auditor.report().splitlines()[:12],
        "all_violations": run.auditor.report().splitlines(),
        "faults_injected": faults,
        "failed_starts": failed_starts,
        "venue_answers": dict(venue.answers),
        "venue_calls": dict(venue.calls),
        "positions_opened": figures.positions,
        "positions_closed": {r["exit_reason"]: r["n"] for r in closed},
        "waves": run.waves,
        "signals": {r["status"]: r["n"] for r in signals},
        "rejected_by_reason": {r["why"]: r["n"] for r in rejections},
        "order_round_trip_s": round(round_trip, 4),
        "breaker": {
            "trips": sum(1 for r in pauses if r["type"] == "entries_paused" and "breaker" in r["message"]),
            "resumes": sum(1 for r in pauses if r["type"] == "entries_resumed"),
            "entries_paused_s": run.entries_paused_seconds,
            "auto_resume_s": args.breaker_auto_resume,
        },
        "samples": figures.samples,
        "seconds_audited": round(figures.seconds_audited, 1),
        "settings": {
            "grace_seconds": grace,
            "reconcile_seconds": float(settings.protection.reconcile_seconds),
            "call_timeout_seconds": float(settings.protection.call_timeout_seconds),
            "wave_every_s": args.wave_every,
            "wave_size": args.wave_size,
            "emulator_faults": venue_faults(args),
        },
        "targets": {
            "coverage_pct_at_least": TARGET_COVERAGE_PCT,
            "coverage_met": coverage is not None and coverage >= TARGET_COVERAGE_PCT,
            "worst_unprotected_s_at_most": round(worst_target, 3),
            "worst_unprotected_met": figures.worst_unprotected_s <= worst_target,
            "duplicates_met": figures.duplicates == 0,
            "lost_positions_met": figures.lost_positions == 0,
        },
    }


def print_human(report: dict[str, Any]) -> None:
    targets = report["targets"]
    print(
        f"chaos soak on {report['venue']}: {report['minutes']:g} min, fault rate {report['fault_rate']:g}, "
        f"{report['waves']} waves, {report['positions_opened']} positions, {report['samples']} samples"
    )
    print(
        f"  time-weighted coverage {report['time_weighted_coverage_pct']} % (target ≥ "
        f"{targets['coverage_pct_at_least']} %: {'met' if targets['coverage_met'] else 'NOT met'})"
    )
    print(
        f"  worst unprotected {report['worst_unprotected_s']} s on {report['worst_unprotected_symbol']} "
        f"(target ≤ {targets['worst_unprotected_s_at_most']} s: "
        f"{'met' if targets['worst_unprotected_met'] else 'NOT met'})"
    )
    print(
        f"  unprotected seconds by cause {report['unprotected_seconds_by_cause']} "
        f"of {report['open_seconds']} position-seconds open"
    )
    print(f"  duplicates {report['duplicates']}, lost positions {report['lost_positions']}")
    print(f"  violations {report['violations']}")
    for line in report["violation_details"]:
        print(f"  {line}")
    print(f"  faults {report['faults_injected']}")
    print(f"  closed {report['positions_closed']}; signals {report['signals']}")
    print(f"  breaker {report['breaker']}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Waves under faults of every kind, judged on the venue's truth."
    )
    parser.add_argument("--minutes", type=float, required=True, help="N: minutes of waves and faults")
    parser.add_argument("--fault-rate", type=float, default=0.05, help="probability of each fault (0..1)")
    parser.add_argument("--venue", choices=("sim", "emulator", "bybit-emulator"), default="sim")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    parser.add_argument("--wave-every", type=float, default=4.0, help="seconds between waves")
    parser.add_argument("--wave-size", type=int, default=5, help="signals per wave")
    parser.add_argument("--volatility", type=float, default=20.0, help="annualised volatility of the marks")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--details", type=Path, default=None, help="also write every violation and the engine's log here"
    )
    parser.add_argument(
        "--breaker-auto-resume",
        type=float,
        default=30.0,
        help="seconds without a reason to trip after which the circuit breaker resumes entries (the "
        "operator's resume; 0: never, the shipped default, so a long run soaks an engine with entries paused)",
    )
    parser.add_argument(
        "--log-level",
        choices=("DEBUG", "INFO", "WARNING"),
        default="WARNING",
        help="the engine's log level in the --details log (INFO shows every send and answer)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= 24 * 60:
        parser.error("--minutes must be within (0, 1440]")
    if not 0 <= args.fault_rate <= 1:
        parser.error("--fault-rate must be within [0, 1]")
    if args.wave_every <= 0 or args.wave_size < 1:
        parser.error("--wave-every must be positive and --wave-size at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="tsbot-chaos-soak-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # after the server's own atexit stop
    # The engine logs plenty at WARNING under faults: to a file, never over the figures.
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        filename=str(workdir / "soak.log"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    server = start_embedded(workdir / "pgdata")
    report = asyncio.run(soak(args, server, workdir))
    if args.details is not None:
        args.details.mkdir(parents=True, exist_ok=True)
        (args.details / "violations.txt").write_text("\n".join(report.pop("all_violations")) + "\n")
        shutil.copy(workdir / "soak.log", args.details / "soak.log")
    else:
        report.pop("all_violations")
    if args.json:
        print(json.dumps(report))
    else:
        print_human(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

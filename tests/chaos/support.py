"""Running a fault schedule on the sim venue in virtual time, with the invariant auditor sampling every step.

A `ChaosRun` owns one engine (the real `Engine`, real PostgreSQL, the sim venue on a `ManualClock`) and an
`InvariantAuditor` reading the sim core's oracle view and the engine's database. Every drive step yields a
moment of real time (database I/O), moves virtual time by `STEP`, then samples: the auditor sees the venue
at every step of the schedule, faults and all. Faults are made only through the venue's own knobs
(settings, `inject_fault`, `answer_positions_empty`, `set_trigger_delay`, `set_read_lag`,
`override_mark_price`, orders another client sends on the same account) and through the engine's own
commands (close a position, restart protection, stop and start): nothing is patched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import itertools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any, TypeVar

from engine.clock import ManualClock
from engine.config import Settings
from engine.exchange.errors import Banned, RateLimited, Rejected
from engine.exchange.port import OrderSide
from engine.venues.sim import SimVenue
from engine.venues.sim.universe import UNIVERSE
from storage.database import Database
from tests.integration.engine_support import engine_settings, make_engine
from tests.support.auditor import AuditLimits, InvariantAuditor, PostgresTruth, SimTruth

T = TypeVar("T")

SYMBOLS = sorted(UNIVERSE)
STEP = 0.2  # virtual seconds per drive step, and per sample


def chaos_settings(db: Database, overrides: Mapping[str, str] | None = None) -> Settings:
    """The shipped protection settings (grace 5 s, reconcile 10 s, call budget 10 s, native trailing) on a
    calm sim venue whose client gives up after 3 s; each schedule adds its faults."""
    return engine_settings(
        db.target.dsn,
        {"SIGNALS__MAX_POSITIONS": "100", "VENUE__SIM__REQUEST_TIMEOUT_SECONDS": "3", **(overrides or {})},
    )


# Known engine defects, each shown by its own strict xfail schedule. A family schedule that would trip over
# one of them tolerates exactly that one, by name, so that it keeps guarding everything else.

NAKED_BACKOFF = (
    "D2: a naked position's refused stops wait the guard's exponential backoff (one failure count for both "
    "stops, on top of any Retry-After), so three failures leave it naked past grace; tolerated up to 3 x "
    "grace; see test_call_faults.py::test_three_refused_stops_in_a_row_are_retried_within_grace"
)


def tolerating(base: Settings | AuditLimits, *defects: str) -> AuditLimits:
    """The auditor's limits (from the engine's settings, or given), with the named known defects
    tolerated."""
    limits = base if isinstance(base, AuditLimits) else AuditLimits.from_settings(base)
    if NAKED_BACKOFF in defects:
        limits = dataclasses.replace(limits, uncovered_seconds=3 * limits.grace_seconds)
    return limits


class ChaosRun:
    def __init__(
        self,
        db: Database | None,
        settings: Settings,
        *,
        limits: AuditLimits | None = None,
        clock: ManualClock | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.clock = clock or ManualClock()
        self.venue = SimVenue(settings.venue.sim, clock=self.clock)
        self.engine = make_engine(settings, self.clock, self.venue)
        dsn = settings.database.dsn
        assert dsn, "a chaos run needs the database's DSN in its settings"
        self.auditor = InvariantAuditor(
            SimTruth(self.venue.core, self.clock),
            PostgresTruth(dsn),
            limits or AuditLimits.from_settings(settings),
            clock=self.clock,
        )
        self._symbols = itertools.cycle(SYMBOLS)
        self._background: list[asyncio.Future[Any]] = []
        self.signals = 0
        self.signal_ids: dict[str, int] = {}  # each symbol's latest signal

    # --- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.drive(self.engine.start())
        self.auditor.engine_up(True)
        await self.step()

    async def stop(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self.auditor.engine_up(False)
        if self.engine.state.value != "stopped":
            await self.drive(self.engine.stop())
        await self.auditor.close()

    async def restart_engine(self, settings: Settings | None = None) -> None:
        """Stop the engine and start a new one (a new process) on the same venue account and database;
        the auditor keeps sampling throughout and is told the engine is down in between."""
        self.auditor.engine_up(False)
        await self.drive(self.engine.stop())
        settings = settings or self.settings
        self.venue = SimVenue(settings.venue.sim, clock=self.clock, core=self.venue.core)
        self.engine = make_engine(settings, self.clock, self.venue)
        await self.drive(self.engine.start())
        self.auditor.engine_up(True)

    def background(self, awaitable: Awaitable[Any]) -> asyncio.Future[Any]:
        """Run an engine command while the schedule goes on driving (the operator does not wait)."""
        task = asyncio.ensure_future(awaitable)
        self._background.append(task)
        return task

    async def finish_background(self, *, limit: float = 120.0) -> list[Any]:
        await self.until(lambda: all(t.done() for t in self._background), limit=limit, what="commands done")
        results = [t.result() for t in self._background]
        self._background.clear()
        return results

    # --- time ----------------------------------------------------------------------------------------

    async def step(self, seconds: float = STEP) -> None:
        await self.database_round_trips()
        await self.clock.advance(seconds)
        await self.auditor.sample()

    async def database_round_trips(self, *, at_most: float = 0.5) -> None:
        """Real time for the engine's database I/O: wait until its pool is idle (up to `at_most` real
        seconds), so that a round trip, ~1 ms in production, does not cost a whole virtual step (15
        sequential writes at 0.2 s a step would be 3 virtual seconds of a position "without stops"). On a
        loaded machine (three test workers on two cores) a round trip can take tens of milliseconds: a
        50 ms allowance let virtual time outrun a wave's writes until "a wave filled" gave up at 30 s."""
        await asyncio.sleep(0.001)
        store = self.engine.store
        if store is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + at_most
        while store.round_trips_in_flight() and loop.time() < deadline:  # noqa: ASYNC110 (a pool has no event)
            await asyncio.sleep(0.0005)

    async def run_for(self, seconds: float) -> None:
        for _ in range(round(seconds / STEP)):
            await self.step()

    async def run_at_real_rate(self, seconds: float) -> None:
        """Virtual time follows real time (a step per STEP of real time), while something outside the
        virtual clock is broken for real seconds (a frozen or dead database); the auditor reads the
        venue only meanwhile."""
        for _ in range(round(seconds / STEP)):
            await asyncio.sleep(STEP)
            await self.clock.advance(STEP)
            await self.auditor.sample(read_database=False)

    async def until(
        self,
        condition: Callable[[], bool | Awaitable[bool]],
        *,
        limit: float = 120.0,
        what: str = "condition",
    ) -> float:
        elapsed = 0.0
        while True:
            result = condition()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return elapsed
            if elapsed >= limit:
                raise AssertionError(f"{what}: not reached after {limit:g} virtual seconds")
            await self.step()
            elapsed += STEP

    async def drive(self, awaitable: Awaitable[T], *, limit: float = 300.0) -> T:
        task = asyncio.ensure_future(awaitable)
        try:
            await self.until(task.done, limit=limit, what="awaited call")
        finally:
            if not task.done():
                task.cancel()
        return task.result()

    # --- the venue's truth ---------------------------------------------------------------------------

    def held(self) -> dict[str, Any]:
        """The venue's positions now, by symbol (the oracle view: no read lag, no ban)."""
        return {p.symbol: p for p in self.venue.core.inspect(self.clock.now()).positions}

    # --- signals -------------------------------------------------------------------------------------

    def free_symbols(self, n: int) -> list[str]:
        """The next `n` symbols (round robin) the venue does not hold and the engine does not guard."""
        manager = self.engine.manager
        busy = set(self.held()) | (set(manager.by_symbol) if manager is not None else set())
        chosen: list[str] = []
        for _ in range(len(SYMBOLS)):
            symbol = next(self._symbols)
            if symbol not in busy and symbol not in chosen:
                chosen.append(symbol)
                if len(chosen) == n:
                    break
        return chosen

    async def wave(
        self, n: int, symbols: Sequence[str] | None = None, sides: Sequence[str] | None = None
    ) -> list[str]:
        """Insert one wave of `n` signals (alternately long and short, unless `sides` says), as any signal
        provider would."""
        assert self.engine.store is not None
        chosen = list(symbols) if symbols is not None else self.free_symbols(n)
        if sides is None:
            sides = ["long" if (self.signals + i) % 2 == 0 else "short" for i in range(len(chosen))]
        ids = await self.engine.store.insert_signals(
            [(s, side, None, None) for s, side in zip(chosen, sides, strict=True)]
        )
        self.signal_ids.update(zip(chosen, ids, strict=True))
        self.signals += len(chosen)
        return chosen

    async def one_protected_position(self, *, sides: Sequence[str] | None = None) -> str:
        """A wave of one signal, filled and protected (both stops confirmed and written): its symbol."""
        [symbol] = await self.opened(await self.wave(1, sides=sides))
        await self.until(self.converged, limit=30, what="the position protected")
        return symbol

    async def one_protected_position_id(self) -> tuple[str, int]:
        """`one_protected_position`, with the id of its position (what an operator's close names)."""
        symbol = await self.one_protected_position()
        manager = self.engine.manager
        assert manager is not None
        return symbol, manager.by_symbol[symbol].position_id

    async def opened(self, symbols: Sequence[str], *, limit: float = 30.0) -> list[str]:
        """Drive until the venue holds at least one of `symbols`; returns those it holds."""
        await self.until(lambda: bool(set(symbols) & set(self.held())), limit=limit, what="a wave filled")
        return [s for s in symbols if s in self.held()]

    # --- marks ---------------------------------------------------------------------------------------

    def move_mark(self, symbol: str, factor: str) -> None:
        """Set `symbol`'s mark to its position's entry × factor; the venue fires whatever that crosses."""
        entry = self.held()[symbol].entry_price
        self.venue.override_mark_price(symbol, entry * Decimal(factor))

    def against(self, symbol: str, percent: str) -> str:
        """The factor that moves `symbol`'s position `percent` % against it."""
        change = Decimal(percent) / 100
        return str(1 - change if self.held()[symbol].side.value == "long" else 1 + change)

    def rate_violations(self) -> int:
        """Requests the venue refused for its rate within its ban's count window (the oracle view)."""
        return self.venue.core.inspect(self.clock.now()).rate_violations

    async def until_signal_ends(self, symbol: str, *, limit: float = 30.0) -> str:
        """Drive until the symbol's latest signal is opened or rejected; returns "opened", or
        "rejected: <its reason>"."""
        store = self.engine.store
        assert store is not None
        signal_id = self.signal_ids[symbol]
        ended: list[str] = []

        async def done() -> bool:
            record = await store.signal(signal_id)
            assert record is not None
            if record.status.value in ("opened", "rejected"):
                ended[:] = [record.status.value + (f": {record.reason}" if record.reason else "")]
            return bool(ended)

        await self.until(done, limit=limit, what=f"signal {signal_id} ended")
        return ended[0]

    def banned_for(self) -> float | None:
        """Seconds left of the venue's ban of the account (the oracle view), or None."""
        until = self.venue.core.inspect(self.clock.now()).banned_until
        return None if until is None else until - self.clock.now()

    async def a_window_starts(self) -> None:
        """Drive to just after the start of one of the venue's 10-second order windows."""
        await self.until(lambda: 1.0 <= self.clock.now() % 10 < 1.0 + STEP, limit=11, what="a window's start")

    # --- another client on the same account ----------------------------------------------------------

    def neighbour_fills_order_window(self, symbol: str) -> int:
        """Another process on the account sends orders until the venue's 10-second order window is full
        (reduce-only orders on a flat symbol: refused, yet counted, as every new order is). The engine's
        next orders meet HTTP 429 until the window ends. Returns how many it sent."""
        core, now = self.venue.core, self.clock.now()
        room = self.settings.venue.sim.rate_limits.orders_per_10s - core.order_counts(now)[10.0]
        sent = 0
        for i in range(max(0, room)):
            try:
                core.place_market_order(
                    symbol, OrderSide.SELL, Decimal(1), f"nb{int(now)}-{i}", now, reduce_only=True
                )
            except Rejected:
                pass
            except (RateLimited, Banned):
                break
            sent += 1
        return sent

    # --- settling and the verdict --------------------------------------------------------------------

    def converged(self) -> bool:
        """Every guard covered and written, and the engine guards exactly what the venue holds."""
        manager = self.engine.manager
        if manager is None:
            return False
        return all(g.covered and g.facts_written() for g in manager.guards.values()) and set(
            manager.by_symbol
        ) == set(self.held())

    async def settle(self, *, limit: float = 120.0) -> None:
        """The faults are over: let the engine converge, then give the database rules one full reconcile
        interval (+ slack) of samples, so that any disagreement left over would be judged."""
        await self.until(self.converged, limit=limit, what="the engine converged with the venue")
        limits = self.auditor.limits
        await self.run_for(limits.reconcile_seconds + limits.reconcile_slack_seconds + 1.0)

    def verdict(self, *, coverage_at_least: float) -> str:
        """Assert that the auditor saw no violation and that time-weighted coverage reached the floor;
        returns the figures as one line (shown with `pytest -s`)."""
        self.auditor.assert_clean()
        figures = self.auditor.figures()
        assert figures.time_weighted_coverage_pct is not None, "no position was ever open"
        assert figures.time_weighted_coverage_pct >= coverage_at_least, figures.as_dict()
        line = (
            f"{figures.positions} positions, coverage {figures.time_weighted_coverage_pct:.3f} %, worst "
            f"unprotected {figures.worst_unprotected_s:.2f} s ({figures.worst_unprotected_symbol}), "
            f"{figures.samples} samples over {figures.seconds_audited:.0f} virtual s"
        )
        print(f"\nchaos: {line}")
        return line

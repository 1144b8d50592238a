"""The Engine facade: what `tsbot run` and the dashboard drive.

It owns the lifecycle: database (migrated), the account lease (one engine per venue account, F9), the
venue, the order budget, the protection manager and its reconciler, the signal consumer and wave runner,
the mark-price feed, the health check. Every background loop is a named, supervised task that is restarted
with backoff when it fails and whose failure is logged (nothing is fire-and-forget). Stopping cancels them
and leaves every order on the exchange in place.

The UI reads `snapshot()`, follows `events()`, and sends commands (`reprotect_uncovered`,
`restart_protection`, `pause_entries` / `resume_entries`, `close_position`); it never reaches inside.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from enum import StrEnum
from typing import Any

from engine.clock import Clock, SystemClock, wait_for_all
from engine.config import ConfigError, Settings, VenueKind, real_venue_problems
from engine.credentials import check_credentials
from engine.events import (
    EngineEvent,
    EngineStateChanged,
    EntriesToggled,
    EventBus,
    HealthChanged,
    PositionOpened,
    SignalRejected,
    WaveFinished,
)
from engine.exchange.errors import ExchangeError, InsufficientMargin, NotFound, OutcomeUnknown, Rejected
from engine.exchange.port import (
    ExchangePort,
    Market,
    MarkPrice,
    OrderSide,
    OrderStatus,
    PositionSide,
    VenuePosition,
)
from engine.metrics import CallStats
from engine.order_budget import OrderBudget
from engine.signal_input import BadSignal, parse_score, parse_side
from engine.signals import SignalConsumer, SignalWave, SimSignalGenerator
from protection import health
from protection.coverage import CoverageFigures
from protection.manager import PositionGuard, ProtectionConfig, ProtectionManager, TrailingKind
from protection.order_ids import client_order_id
from protection.reconciler import Reconciler, ReconcileReport
from storage.database import Database, open_database
from storage.lease import EngineLease
from storage.repositories import (
    HealthRow,
    OrderPurpose,
    OrderRecordStatus,
    PositionAlreadyOpen,
    PositionRecord,
    PositionStatus,
    Severity,
    SignalRecord,
    SignalStatus,
    Store,
)

log = logging.getLogger(__name__)

STARTUP_UNKNOWN_SECONDS = 30.0  # an empty position list this soon after connecting is "unknown" (F3)
WAVE_PROTECTION_WAIT_SECONDS = 120.0


def package_version() -> str:
    try:
        return importlib.metadata.version("tsbot-tui")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class EngineState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class StartupReport:
    restored: int  # positions whose protection was found live on the exchange
    reprotected: int  # positions that needed new protective orders
    adopted: int  # positions the venue had and the database did not
    failed: int  # positions still uncovered after the first pass
    failed_symbols: tuple[str, ...] = ()

    def describe(self) -> str:
        text = f"restored {self.restored}, re-protected {self.reprotected}, adopted {self.adopted}, failed {self.failed}"
        return text + (f" ({', '.join(self.failed_symbols)})" if self.failed_symbols else "")


@dataclass(frozen=True, slots=True)
class PlannedOrder:
    purpose: str
    kind: str  # stop_market | trailing_stop_market | managed trail
    price: Decimal | None


@dataclass(frozen=True, slots=True)
class PlannedProtection:
    position_id: int
    symbol: str
    side: str
    orders: tuple[PlannedOrder, ...]
    last_error: str | None


@dataclass(frozen=True, slots=True)
class ProtectionResult:
    position_id: int
    symbol: str
    covered: bool
    detail: str


@dataclass(frozen=True, slots=True)
class PositionView:
    position_id: int
    symbol: str
    side: str
    quantity: Decimal
    entry_price: Decimal
    mark_price: Decimal | None
    pnl_percent: Decimal | None
    stop_loss_price: Decimal | None
    has_stop_loss: bool
    has_trailing_stop: bool
    trailing_kind: str
    trailing_phase: str  # waiting | active | moving | native | ...
    activation_price: Decimal | None
    distance_to_activation_percent: Decimal | None
    trailing_stop_price: Decimal | None
    covered: bool
    unprotected_seconds: float | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class WaveView:
    wave_id: int
    started_at: float
    signals: int
    opened: int
    protected: int
    failed: int
    slowest_protection_ms: int | None


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    state: EngineState
    version: str
    started_at: float
    venue: str
    account: str
    mode: str  # SIM | TESTNET | LIVE
    entries_paused: bool
    positions: tuple[PositionView, ...]
    coverage: CoverageFigures
    health: tuple[health.ComponentHealth, ...]
    waves: tuple[WaveView, ...]
    taken_at: float


class _Supervisor:
    """Runs named loops; a loop that fails is logged and restarted with backoff. Nothing unowned."""

    def __init__(self, clock: Clock):
        self._clock = clock
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.restarts: dict[str, int] = {}

    def start(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        self._tasks[name] = asyncio.create_task(self._run(name, loop), name=name)

    async def _run(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        delay = 1.0
        while True:
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                self.restarts[name] = self.restarts.get(name, 0) + 1
                log.exception("%s failed; restarting in %.0fs", name, delay)
                await self._clock.sleep(delay)
                delay = min(delay * 2, 60.0)

    async def stop(self, grace_seconds: float = 10.0) -> None:
        for task in self._tasks.values():
            task.cancel()
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks.values(), timeout=grace_seconds)
            for task in pending:
                log.error("task %s did not stop within %.0fs", task.get_name(), grace_seconds)
        self._tasks.clear()


def build_venue(settings: Settings, clock: Clock) -> ExchangePort:
    if settings.venue.kind is VenueKind.SIM:
        from engine.venues.sim import SimVenue

        return SimVenue(settings.venue.sim, clock=clock)
    problems = real_venue_problems(settings.venue)
    if problems:
        raise ConfigError(problems)
    from engine.venues.ccxt_venue import CcxtVenueConfig, build_ccxt_venue

    venue = settings.venue
    assert venue.api_key is not None and venue.api_secret is not None
    config = CcxtVenueConfig(
        kind=venue.kind.value,
        api_key=venue.api_key.get_secret_value(),
        api_secret=venue.api_secret.get_secret_value(),
        testnet=venue.testnet,
        base_url=venue.base_url,
    )
    return build_ccxt_venue(config, clock=clock)


class Engine:
    def __init__(
        self,
        settings: Settings,
        *,
        venue: ExchangePort | None = None,
        clock: Clock | None = None,
        version: str | None = None,
        generate_signals: bool | None = None,
    ):
        self.settings = settings
        self.clock = clock or SystemClock()
        self.venue = venue or build_venue(settings, self.clock)
        self.version = version or package_version()
        self.events_bus = EventBus()
        self.state = EngineState.STOPPED
        self.started_at = 0.0
        self.entries_paused = False
        self.startup_report: StartupReport | None = None
        self._generate = (
            settings.signals.source.value == "sim" if generate_signals is None else generate_signals
        )
        self._supervisor = _Supervisor(self.clock)
        self._db: Database | None = None
        self._lease: EngineLease | None = None
        self.store: Store | None = None
        self.manager: ProtectionManager | None = None
        self.reconciler: Reconciler | None = None
        self.consumer: SignalConsumer | None = None
        self.markets: dict[str, Market] = {}
        self.marks: dict[str, MarkPrice] = {}
        self._last_mark_at: float | None = None
        self._last_wave_at: float | None = None
        self._connected_at = 0.0
        self._in_flight: set[str] = set()
        self._waves: deque[WaveView] = deque(maxlen=50)
        self._wave_tasks: set[asyncio.Task[None]] = set()
        self._health: tuple[health.ComponentHealth, ...] = ()
        self._call_stats = CallStats()
        self._stopped = asyncio.Event()
        self._token = ""

    # --- lifecycle -----------------------------------------------------------------------------------

    @property
    def exchange_name(self) -> str:
        return self.venue.name

    @property
    def mode(self) -> str:
        if self.settings.venue.kind is VenueKind.SIM:
            return "SIM"
        return "TESTNET" if self.settings.venue.testnet else "LIVE"

    async def start(self) -> StartupReport:
        """Open everything, restore and verify protection, then start trading. Raises `LeaseHeld` when
        another engine trades this account (nothing is touched then)."""
        self._set_state(EngineState.STARTING)
        self.started_at = self.clock.now()
        db = self.settings.database
        password = db.password.get_secret_value() if db.password else None
        self._db = await open_database(
            db.dsn,
            db.data_dir,
            db.name,
            password=password,
            min_size=db.pool_min_size,
            max_size=db.pool_max_size,
            command_timeout=float(db.command_timeout_seconds),
        )
        try:
            self._lease = await EngineLease.acquire(
                self._db.target.dsn, self.exchange_name, self.settings.venue.account, self.version, password
            )
            self.store = Store(self._db.pool)
            self._token = await self.store.installation_token()
            await self.venue.connect()
            self._connected_at = self.clock.monotonic()
            self.markets = dict(await self.venue.load_markets())
            # Issue 14: a signed read before anything is restored or traded. A wrong key or secret stops
            # the start here (CredentialsRefused: one line, exit 2) instead of running with every order refused.
            await check_credentials(self.venue)
            self.marks = await self.venue.fetch_mark_prices()
            self._last_mark_at = self.clock.monotonic()
            self.startup_report = await self._start_protection()
        except BaseException:
            await self._release()
            raise
        log.info("engine started: %s", self.startup_report.describe())
        await self.store.record_event(
            Severity.INFO,
            "engine_started",
            f"engine {self.version} started: {self.startup_report.describe()}",
        )
        self._start_loops()
        self._set_state(EngineState.RUNNING)
        return self.startup_report

    def _start_loops(self) -> None:
        assert self.store is not None and self._db is not None
        sup = self._supervisor
        sup.start("mark-feed", self._mark_feed)
        sup.start("marks-to-db", self._marks_to_db)
        sup.start("reconciler", self._reconcile_loop)
        sup.start("health", self._health_loop)
        sup.start("lease-heartbeat", self._lease_heartbeat)
        db = self.settings.database
        self.consumer = SignalConsumer(
            self.store,
            self.clock,
            listen_dsn=self._db.target.dsn,
            listen_password=db.password.get_secret_value() if db.password else None,
            wave_window_seconds=self.settings.signals.wave_window_ms / 1000,
        )
        sup.start("signals", self._wave_loop)
        if self._generate:
            generator = SimSignalGenerator(
                self.store,
                self.clock,
                sorted(self.markets),
                wave_size=self.settings.signals.wave_size,
                wave_interval_seconds=float(self.settings.signals.wave_interval_seconds),
                seed=self.settings.signals.seed,
            )
            sup.start("sim-signals", generator.run)

    async def stop(self) -> None:
        """Stop taking signals and stop every task; exchange orders stay in place."""
        if self.state in (EngineState.STOPPING, EngineState.STOPPED):
            return
        self._set_state(EngineState.STOPPING)
        await self._supervisor.stop()
        for task in list(self._wave_tasks):
            task.cancel()
        await asyncio.gather(*self._wave_tasks, return_exceptions=True)
        left = 0
        if self.manager is not None:
            left = len(self.manager.guards)
            await self.manager.stop()
        if self.store is not None:
            try:
                await self.store.record_event(
                    Severity.INFO,
                    "engine_stopped",
                    f"engine stopped; {left} positions keep their exchange stops",
                )
            except Exception:
                log.exception("could not record the stop event")
        log.info(
            "engine stopped: %d open positions keep their stops on the exchange%s",
            left,
            "; managed trailing stops do not move until the engine runs again"
            if self.manager and self.manager.kind is TrailingKind.MANAGED and left
            else "",
        )
        await self._release()
        self._set_state(EngineState.STOPPED)
        self.events_bus.close()
        self._stopped.set()

    async def _release(self) -> None:
        try:
            await self.venue.close()
        except Exception:
            log.exception("closing the venue failed")
        if self._lease is not None:
            try:
                await self._lease.release()
            except Exception:
                log.exception("releasing the account lease failed")
        if self._db is not None:
            await self._db.close()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def _set_state(self, state: EngineState, detail: str = "") -> None:
        self.state = state
        self.events_bus.publish(EngineStateChanged(at=self.clock.now(), state=state.value, detail=detail))

    # --- protection start / restart ------------------------------------------------------------------

    async def _start_protection(self) -> StartupReport:
        assert self.store is not None
        budget = OrderBudget(
            self.venue.capabilities().order_rate_budgets,
            self.clock,
            round_trip=lambda: self.manager.order_round_trip_seconds if self.manager is not None else 0.0,
        )
        self.manager = ProtectionManager(
            venue=self.venue,
            store=self.store,
            budget=budget,
            clock=self.clock,
            events=self.events_bus,
            config=ProtectionConfig.from_settings(self.settings.protection),
            token=self._token,
            markets=self.markets,
            call_stats=self._call_stats,
        )
        self.reconciler = Reconciler(
            manager=self.manager,
            venue=self.venue,
            store=self.store,
            clock=self.clock,
            connected_at=self._connected_at,
            startup_unknown_seconds=STARTUP_UNKNOWN_SECONDS,
            adopt=self._adopt,
            entries_in_flight=lambda: set(self._in_flight),
        )
        guards: list[PositionGuard] = []
        for position in await self.store.open_positions():
            guard = await self._restore_position(position)
            if guard is not None:
                guards.append(guard)
        await self._wait_first_pass(guards)
        adopted = 0
        try:
            report = await self.reconciler.reconcile_once()
            adopted = len(report.adopted)
            await self._wait_first_pass(list(self.manager.guards.values()))
        except (ExchangeError, TimeoutError) as exc:
            log.error("start-up reconcile failed (%s); the periodic reconciler will retry", exc)
        restored = sum(1 for g in guards if g.covered and g.report.created_orders == 0)
        failed = [g.symbol for g in self.manager.guards.values() if not g.covered]
        reprotected = sum(1 for g in guards if g.covered and g.report.created_orders > 0)
        return StartupReport(restored, reprotected, adopted, len(failed), tuple(sorted(failed)))

    async def _wait_first_pass(self, guards: Sequence[PositionGuard]) -> None:
        if not guards:
            return
        budget = float(self.settings.protection.call_timeout_seconds) * 3
        await wait_for_all(self.clock, budget, [g.first_pass.wait() for g in guards])

    async def _restore_position(self, position: PositionRecord) -> PositionGuard | None:
        assert self.store is not None and self.manager is not None
        if position.symbol not in self.markets:
            log.error(
                "position %s: %s is not listed on %s; left as it is",
                position.id,
                position.symbol,
                self.exchange_name,
            )
            return None
        if (
            position.status in (PositionStatus.PENDING_ENTRY, PositionStatus.ENTRY_PLACED)
            or position.entry_price is None
        ):
            position = await self._resolve_entry(position)
            if position is None:
                return None
        orders = await self.store.live_orders_for_position(position.id)
        trail = await self.store.trailing_state(position.id)
        return self.manager.protect(position, live_orders=orders, trail_record=trail)

    async def _resolve_entry(self, position: PositionRecord) -> PositionRecord | None:
        """An entry from before a restart: filled → protect it; never sent or refused → the position failed."""
        assert self.store is not None
        cid = client_order_id(self._token, position.id, OrderPurpose.ENTRY, 0)
        try:
            order = await self.venue.fetch_order(position.symbol, cid)
        except NotFound:
            await self.store.set_position_status(
                position.id, PositionStatus.FAILED, exit_reason="entry not placed"
            )
            return None
        if order.status is OrderStatus.FILLED and order.average_price is not None:
            await self.store.set_order_status(
                cid, OrderRecordStatus.FILLED, exchange_order_id=order.venue_order_id
            )
            return await self.store.record_fill(position.id, order.filled_quantity, order.average_price)
        await self.store.set_position_status(
            position.id, PositionStatus.FAILED, exit_reason=f"entry {order.status.value}"
        )
        return None

    async def _adopt(self, venue_position: VenuePosition) -> None:
        assert self.store is not None and self.manager is not None
        try:
            position = await self.store.create_position(
                symbol=venue_position.symbol,
                exchange=self.exchange_name,
                side=venue_position.side.value,
                quantity=venue_position.quantity,
                status=PositionStatus.PENDING_PROTECTION,
            )
        except PositionAlreadyOpen:
            position = await self.store.open_position_for_symbol(self.exchange_name, venue_position.symbol)
            if position is None or position.id in self.manager.guards:
                return
        position = await self.store.record_fill(
            position.id, venue_position.quantity, venue_position.entry_price
        )
        await self.store.record_event(
            Severity.WARNING,
            "position_adopted",
            f"adopted {venue_position.symbol} {venue_position.side.value} {venue_position.quantity} found on the venue",
            symbol=venue_position.symbol,
            position_id=position.id,
        )
        self.manager.protect(position)

    async def restart_protection(self) -> StartupReport:
        """Stop the TS manager, reload from the database, verify against the venue, re-arm."""
        assert self.manager is not None
        log.warning("restarting the protection manager on operator request")
        await self.manager.stop()
        self.startup_report = await self._start_protection()
        log.info("protection restarted: %s", self.startup_report.describe())
        assert self.store is not None
        await self.store.record_event(
            Severity.WARNING, "protection_restarted", self.startup_report.describe()
        )
        return self.startup_report

    # --- loops ---------------------------------------------------------------------------------------

    async def _mark_feed(self) -> None:
        assert self.manager is not None
        async for mark in self.venue.watch_mark_prices():
            self.marks[mark.symbol] = mark
            self._last_mark_at = self.clock.monotonic()
            manager = self.manager  # restart_protection swaps it
            if manager is not None:
                manager.on_mark(mark.symbol, mark.price, mark.timestamp)

    async def _marks_to_db(self) -> None:
        assert self.store is not None
        while True:
            await self.clock.sleep(1.0)
            if self.manager is None:
                continue
            batch = [
                (g.position_id, self.marks[g.symbol].price)
                for g in self.manager.guards.values()
                if g.symbol in self.marks
            ]
            await self.store.update_marks(batch)

    async def _reconcile_loop(self) -> None:
        interval = float(self.settings.protection.reconcile_seconds)
        while True:
            manager = self.manager
            assert manager is not None
            woke = asyncio.ensure_future(manager.reconcile_requested.wait())
            slept = asyncio.ensure_future(self.clock.sleep(interval))
            try:
                await asyncio.wait({woke, slept}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                woke.cancel()
                slept.cancel()
            manager.reconcile_requested.clear()
            assert self.reconciler is not None
            try:
                await self.reconciler.reconcile_once()
            except (ExchangeError, TimeoutError) as exc:
                log.warning("reconcile: venue unavailable (%s); next attempt in %.0fs", exc, interval)

    async def reconcile_now(self) -> ReconcileReport:
        assert self.reconciler is not None
        return await self.reconciler.reconcile_once()

    async def _lease_heartbeat(self) -> None:
        while True:
            await self.clock.sleep(10.0)
            assert self._lease is not None
            if not self._lease.alive():
                log.critical(
                    "the account lease connection is gone: stopping entries (another engine may take over)"
                )
                self.entries_paused = True
                raise RuntimeError("account lease lost")
            await self._lease.heartbeat()

    # --- waves ---------------------------------------------------------------------------------------

    async def _wave_loop(self) -> None:
        assert self.consumer is not None
        async for wave in self.consumer.waves():
            await self.process_wave(wave)

    async def process_wave(self, wave: SignalWave) -> None:
        assert self.store is not None and self.manager is not None
        started = self.clock.now()
        self._last_wave_at = self.clock.monotonic()
        wave_id = await self.store.start_wave(len(wave.signals))
        accepted: list[tuple[SignalRecord, PositionSide, Decimal]] = []
        seen: set[str] = set()
        for signal in wave.signals:
            reason, side, quantity = self._validate(signal, seen, pending=len(accepted))
            if reason is not None:
                await self._reject(signal, reason, wave_id)
                continue
            seen.add(signal.symbol)
            accepted.append((signal, side, quantity))

        queue: asyncio.Queue[tuple[SignalRecord, PositionSide, Decimal]] = asyncio.Queue()
        for item in accepted:
            queue.put_nowait(item)
        opened: list[PositionGuard] = []

        async def worker() -> None:
            while not queue.empty():
                signal, side, quantity = queue.get_nowait()
                guard = await self._open_position(signal, side, quantity, wave_id)
                if guard is not None:
                    opened.append(guard)

        workers = min(len(accepted), self.settings.signals.max_concurrent_entries)
        await asyncio.gather(*(worker() for _ in range(workers)))
        log.info(
            "wave %d: %d signals, %d accepted, %d opened",
            wave_id,
            len(wave.signals),
            len(accepted),
            len(opened),
        )
        task = asyncio.create_task(
            self._finish_wave(wave_id, started, len(wave.signals), opened), name=f"wave-{wave_id}"
        )
        self._wave_tasks.add(task)
        task.add_done_callback(self._wave_tasks.discard)

    def _validate(
        self, signal: SignalRecord, seen: set[str], pending: int
    ) -> tuple[str | None, PositionSide, Decimal]:
        assert self.manager is not None
        side = PositionSide.LONG
        try:
            side = PositionSide(parse_side(signal.side))
            parse_score(signal.score)
        except BadSignal as exc:
            return str(exc), side, Decimal(0)
        if self.entries_paused:
            return "entries paused", side, Decimal(0)
        market = self.markets.get(signal.symbol)
        if market is None:
            return f"unknown symbol {signal.symbol} on {self.exchange_name}", side, Decimal(0)
        if signal.symbol in seen:
            return "symbol appears twice in this wave", side, Decimal(0)
        if signal.symbol in self.manager.by_symbol or signal.symbol in self._in_flight:
            return "symbol already has an open position", side, Decimal(0)
        if len(self.manager.guards) + len(self._in_flight) + pending >= self.settings.signals.max_positions:
            return f"max_positions ({self.settings.signals.max_positions}) reached", side, Decimal(0)
        mark = self.marks.get(signal.symbol)
        if mark is None:
            return "no mark price yet", side, Decimal(0)
        quantity = market.round_quantity(self.settings.signals.position_size_usd / mark.price, ROUND_DOWN)
        if quantity < market.min_quantity or quantity * mark.price < market.min_notional:
            return (
                f"size below min notional ({self.settings.signals.position_size_usd} USD → {quantity} × {mark.price} "
                f"< {market.min_notional})",
                side,
                Decimal(0),
            )
        return None, side, quantity

    async def _reject(self, signal: SignalRecord, reason: str, wave_id: int) -> None:
        assert self.store is not None
        await self.store.finish_signal(signal.id, SignalStatus.REJECTED, reason, wave_id=wave_id)
        log.info("signal %s %s %s rejected: %s", signal.id, signal.symbol, signal.side, reason)
        self.events_bus.publish(
            SignalRejected(at=self.clock.now(), signal_id=signal.id, symbol=signal.symbol, reason=reason)
        )

    async def _open_position(
        self, signal: SignalRecord, side: PositionSide, quantity: Decimal, wave_id: int
    ) -> PositionGuard | None:
        assert self.store is not None and self.manager is not None
        manager = self.manager
        promise = manager.protective_orders_per_position
        self._in_flight.add(signal.symbol)
        try:
            await manager.budget.acquire_entry(promise)
            try:
                position = await self.store.create_position(
                    symbol=signal.symbol,
                    exchange=self.exchange_name,
                    side=side.value,
                    quantity=quantity,
                    signal_id=signal.id,
                    wave_id=wave_id,
                    trailing_activation_percent=self.settings.protection.activation_percent,
                    trailing_callback_percent=self.settings.protection.callback_percent,
                )
            except PositionAlreadyOpen:
                manager.budget.release_promise(promise)
                await self._reject(signal, "symbol already has an open position", wave_id)
                return None
            cid = client_order_id(self._token, position.id, OrderPurpose.ENTRY, 0)
            order_side = OrderSide.BUY if side is PositionSide.LONG else OrderSide.SELL
            await self.store.record_order(
                client_order_id=cid,
                position_id=position.id,
                purpose=OrderPurpose.ENTRY,
                side=order_side.value,
                type="market",
                quantity=quantity,
            )
            await self.store.set_position_status(position.id, PositionStatus.ENTRY_PLACED)
            try:
                order = await manager.call(
                    self.venue.create_market_order(signal.symbol, order_side, quantity, client_order_id=cid),
                    "create_order",
                )
            except (OutcomeUnknown, TimeoutError):
                try:
                    order = await manager.call(self.venue.fetch_order(signal.symbol, cid), "fetch_order")
                except (ExchangeError, TimeoutError) as exc:
                    return await self._entry_failed(
                        signal, position.id, cid, f"entry outcome unknown: {exc}", wave_id, promise
                    )
            except InsufficientMargin as exc:
                return await self._entry_failed(
                    signal, position.id, cid, f"insufficient margin: {exc.reason}", wave_id, promise
                )
            except (Rejected, ExchangeError) as exc:
                return await self._entry_failed(
                    signal, position.id, cid, f"entry refused: {exc}", wave_id, promise
                )
            if order.status is not OrderStatus.FILLED or order.average_price is None:
                return await self._entry_failed(
                    signal, position.id, cid, f"entry {order.status.value}", wave_id, promise
                )
            await self.store.set_order_status(
                cid, OrderRecordStatus.FILLED, exchange_order_id=order.venue_order_id
            )
            filled = await self.store.record_fill(position.id, order.filled_quantity, order.average_price)
            guard = manager.protect(filled)
            await self.store.finish_signal(signal.id, SignalStatus.OPENED, wave_id=wave_id)
            log.info(
                "Opened %s %s %s at %s (position %s)",
                side.value,
                order.filled_quantity,
                signal.symbol,
                order.average_price,
                position.id,
            )
            self.events_bus.publish(
                PositionOpened(
                    at=self.clock.now(),
                    position_id=position.id,
                    symbol=signal.symbol,
                    side=side.value,
                    quantity=order.filled_quantity,
                    entry_price=order.average_price,
                )
            )
            return guard
        finally:
            self._in_flight.discard(signal.symbol)

    async def _entry_failed(
        self, signal: SignalRecord, position_id: int, cid: str, reason: str, wave_id: int, promise: int
    ) -> None:
        assert self.store is not None and self.manager is not None
        self.manager.budget.release_promise(promise)
        await self.store.set_order_status(cid, OrderRecordStatus.REJECTED, error=reason[:500])
        await self.store.set_position_status(position_id, PositionStatus.FAILED, exit_reason=reason[:200])
        await self.store.record_event(
            Severity.WARNING,
            "entry_failed",
            f"{signal.symbol}: {reason}",
            symbol=signal.symbol,
            position_id=position_id,
        )
        await self._reject(signal, reason, wave_id)
        return None

    async def _finish_wave(
        self, wave_id: int, started: float, signals: int, opened: list[PositionGuard]
    ) -> None:
        assert self.store is not None
        await wait_for_all(self.clock, WAVE_PROTECTION_WAIT_SECONDS, [g.protected.wait() for g in opened])
        protected = [g for g in opened if g.protected_at is not None]
        slowest = max(((g.protected_at - g.filled_at) for g in protected), default=None)  # type: ignore[operator]
        slowest_ms = None if slowest is None else round(slowest * 1000)
        failed = len(opened) - len(protected)
        await self.store.finish_wave(
            wave_id,
            opened=len(opened),
            protected=len(protected),
            failed=failed,
            slowest_protection_ms=slowest_ms,
        )
        view = WaveView(wave_id, started, signals, len(opened), len(protected), failed, slowest_ms)
        self._waves.appendleft(view)
        self.events_bus.publish(
            WaveFinished(
                at=self.clock.now(),
                wave_id=wave_id,
                signals=signals,
                opened=len(opened),
                protected=len(protected),
                failed=failed,
                slowest_protection_ms=slowest_ms,
            )
        )

    # --- health --------------------------------------------------------------------------------------

    async def measure_health(self) -> health.HealthReport:
        assert self.store is not None and self.manager is not None and self._db is not None
        started = time.perf_counter()
        try:
            await self._db.pool.fetchval("SELECT 1")
            database = health.DatabaseMeasurement(round_trip_ms=(time.perf_counter() - started) * 1000)
        except Exception as exc:
            database = health.DatabaseMeasurement(error=f"{type(exc).__name__}: {exc}"[:200])
        # Read the clock after the probe's await: a mark that arrived meanwhile must not have a negative age.
        now = self.clock.monotonic()
        figures = self.manager.coverage()
        measurements = health.HealthMeasurements(
            exchange=health.ExchangeMeasurement(
                calls=self._call_stats.summary(now),
                budget_used_percent=self.manager.budget.used_fraction() * 100,
                banned_for_seconds=self.manager.budget.banned_for(),
            ),
            price_feed=health.PriceFeedMeasurement(
                newest_mark_age_seconds=None if self._last_mark_at is None else now - self._last_mark_at,
                open_positions=figures.active,
            ),
            database=database,
            protection=health.ProtectionMeasurement(
                active_positions=figures.active,
                protected_positions=figures.protected,
                ts_covered=figures.with_trailing_stop,
                sl_covered=figures.with_stop_loss,
                uncovered_past_grace=figures.uncovered,
                oldest_uncovered_seconds=figures.oldest_unprotected_seconds
                if figures.uncovered
                else (None if figures.protected == figures.active else 0.0),
                timeouts_last_hour=self.manager.timeouts.count(now, 3600.0),
            ),
            signals=health.SignalsMeasurement(
                last_wave_age_seconds=None if self._last_wave_at is None else now - self._last_wave_at,
                listen_connected=self.consumer.listening,
                entries_paused=self.entries_paused,
            )
            if self.consumer is not None and self.consumer.listen_attempted
            else None,
        )
        return health.evaluate_health(
            measurements, health.HealthThresholds.from_settings(self.settings.health)
        )

    async def _health_loop(self) -> None:
        assert self.store is not None
        interval = float(self.settings.health.interval_seconds)
        previous: dict[str, str] = {}
        while True:
            report = await self.measure_health()
            self._health = tuple(report.components)
            for component in report.components:
                line = "health_check: " + health.log_line(component)
                state = component.state.value
                if state in ("degraded", "critical"):
                    log.warning(line)
                elif previous.get(component.component) != state:
                    log.info(line)
                if previous.get(component.component) != state:
                    self.events_bus.publish(
                        HealthChanged(
                            at=self.clock.now(),
                            component=str(component.component),
                            state=state,
                            summary=component.summary,
                            reason=component.reason,
                        )
                    )
                previous[component.component] = state
            await self.store.save_health(
                [
                    HealthRow(
                        component=str(c.component),
                        state=c.state.value,
                        summary=c.summary,
                        reason=c.reason,
                        measurements=_jsonable(c.measurements),
                    )
                    for c in report.components
                ]
            )
            await self.clock.sleep(interval)

    # --- what the UI reads ---------------------------------------------------------------------------

    def snapshot(self) -> EngineSnapshot:
        manager = self.manager
        now = self.clock.monotonic()
        views: list[PositionView] = []
        if manager is not None:
            for guard in manager.guards.values():
                views.append(self._position_view(guard, now))
        coverage = manager.coverage() if manager is not None else _empty_coverage()
        return EngineSnapshot(
            state=self.state,
            version=self.version,
            started_at=self.started_at,
            venue=self.exchange_name,
            account=self.settings.venue.account,
            mode=self.mode,
            entries_paused=self.entries_paused,
            positions=tuple(sorted(views, key=lambda v: v.position_id)),
            coverage=coverage,
            health=self._health,
            waves=tuple(self._waves),
            taken_at=self.clock.now(),
        )

    def _position_view(self, guard: PositionGuard, now: float) -> PositionView:
        mark = self.marks.get(guard.symbol)
        price = mark.price if mark else None
        pnl = None
        if price is not None:
            direction = 1 if guard.side is PositionSide.LONG else -1
            pnl = ((price - guard.entry_price) / guard.entry_price * 100 * direction).quantize(
                Decimal("0.01")
            )
        activation = (
            guard.trailing_stop.price
            if guard.kind is TrailingKind.NATIVE
            else (guard.trail.activation_price if guard.trail else None)
        )
        distance = None
        if activation is not None and price is not None:
            direction = 1 if guard.side is PositionSide.LONG else -1
            distance = ((activation - price) / price * 100 * direction).quantize(Decimal("0.01"))
        if guard.kind is TrailingKind.MANAGED and guard.trail is not None:
            phase = "waiting" if guard.trail.phase.value == "armed" else guard.trail.phase.value
            trail_stop = guard.trail.stop_price
        else:
            phase = "native" if guard.trailing_stop.confirmed else "pending"
            trail_stop = None
        unprotected = (
            None if guard.covered or guard.unprotected_since is None else now - guard.unprotected_since
        )
        return PositionView(
            position_id=guard.position_id,
            symbol=guard.symbol,
            side=guard.side.value,
            quantity=guard.quantity,
            entry_price=guard.entry_price,
            mark_price=price,
            pnl_percent=pnl,
            stop_loss_price=guard.stop_loss.price,
            has_stop_loss=guard.has_stop_loss,
            has_trailing_stop=guard.has_trailing_stop,
            trailing_kind=guard.kind.value,
            trailing_phase=phase,
            activation_price=activation,
            distance_to_activation_percent=distance,
            trailing_stop_price=trail_stop,
            covered=guard.covered,
            unprotected_seconds=unprotected,
            last_error=guard.last_error,
        )

    async def events(self) -> AsyncIterator[EngineEvent]:
        async for event in self.events_bus.subscribe():
            yield event

    # --- commands ------------------------------------------------------------------------------------

    def plan_reprotect(self) -> list[PlannedProtection]:
        """Which uncovered positions would get which orders, without sending anything."""
        assert self.manager is not None
        plan = []
        for guard in sorted(self.manager.uncovered(), key=lambda g: g.position_id):
            orders = []
            if not guard.has_stop_loss:
                orders.append(PlannedOrder("stop_loss", "stop_market", guard.stop_loss.price))
            if not guard.has_trailing_stop:
                if guard.kind is TrailingKind.NATIVE:
                    orders.append(
                        PlannedOrder("trailing_stop", "trailing_stop_market", guard.trailing_stop.price)
                    )
                else:
                    orders.append(
                        PlannedOrder(
                            "trailing_stop",
                            "managed trail",
                            guard.trail.activation_price if guard.trail else None,
                        )
                    )
            plan.append(
                PlannedProtection(
                    guard.position_id, guard.symbol, guard.side.value, tuple(orders), guard.last_error
                )
            )
        return plan

    async def reprotect_uncovered(
        self, plan: list[PlannedProtection] | None = None
    ) -> list[ProtectionResult]:
        """Run the plan now (skipping any backoff) and report per position."""
        assert self.manager is not None
        plan = self.plan_reprotect() if plan is None else plan
        guards = [self.manager.guards[p.position_id] for p in plan if p.position_id in self.manager.guards]
        for guard in guards:
            guard.failures = 0
            guard.first_pass.clear()
            guard.wake.set()
        await self._wait_first_pass(guards)
        results = []
        for item in plan:
            guard = self.manager.guards.get(item.position_id)
            if guard is None:
                results.append(ProtectionResult(item.position_id, item.symbol, False, "position closed"))
            else:
                detail = "covered" if guard.covered else (guard.last_error or "still protecting")
                results.append(ProtectionResult(item.position_id, item.symbol, guard.covered, detail))
        assert self.store is not None
        await self.store.record_event(
            Severity.WARNING,
            "reprotect_requested",
            f"operator re-protect: {sum(r.covered for r in results)}/{len(results)} covered",
        )
        return results

    def pause_entries(self) -> None:
        self.entries_paused = True
        log.warning("entries paused by the operator")
        self.events_bus.publish(EntriesToggled(at=self.clock.now(), paused=True))

    def resume_entries(self) -> None:
        self.entries_paused = False
        log.warning("entries resumed by the operator")
        self.events_bus.publish(EntriesToggled(at=self.clock.now(), paused=False))

    async def close_position(self, position_id: int) -> bool:
        assert self.manager is not None
        guard = self.manager.guards.get(position_id)
        if guard is None:
            return False
        return await guard.close(exit_reason="manual")


def _empty_coverage() -> CoverageFigures:
    return CoverageFigures(0, 0, 0, 0, 0, 0, None, None, None, ())


def _jsonable(values: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dict(values).items():
        out[str(key)] = str(value) if isinstance(value, Decimal) else value
    return out


__all__ = ["Engine", "EngineSnapshot", "EngineState", "StartupReport"]

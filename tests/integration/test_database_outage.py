"""Issue 10, item 4: the database goes away under a running engine, for real.

The engine runs on the sim venue (virtual time) against an embedded PostgreSQL of this module's own, which
it owns (no DSN), so it is the engine's to restart. Its postmaster is SIGKILLed (and kept from coming back
for a while by a lock file naming a live process, as a stale one would), or SIGSTOPped (alive, answering no
new connection). While it is away, protection goes on — the venue's own state is the oracle — and its
writes go to the journal; the engine restarts the server, the journal is replayed (every order row there,
none twice), the lease is taken again, and the log says it in a handful of lines, without a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from decimal import Decimal
from pathlib import Path

import asyncpg
import psutil
import pytest

from engine.clock import ManualClock, SystemClock
from engine.commands import ProtectionRestartRefused
from engine.config import Settings
from engine.engine import Engine
from engine.events import SignalRejected
from engine.exchange.port import OrderSide, OrderType
from engine.venues.sim import SimVenue
from engine.venues.sim.settings import CallKind, LatencyDistribution, LatencySettings
from protection.health import Component, HealthState
from protection.manager import PositionGuard
from storage.embedded import (
    EmbeddedPostgres,
    PostmasterState,
    postmaster_state,
    restart_embedded,
    stop_embedded,
)
from storage.outage import DatabaseWatch
from storage.repositories import PositionStatus
from tests.integration.engine_support import engine_settings, make_engine
from tests.support.driving import drive, drive_until
from tests.support.owned_postgres import (
    StaleSocketLock,
    freeze_server,
    kill_postmaster,
    postmaster_pid,
    resume,
    start_owned,
    stop_postmaster,
)
from tests.support.waiting import wait_until

COVERED_BEFORE = "SFPUSDT"  # covered before the outage; one of its stops is cancelled by hand during it
FILLED_DURING = "ALLUSDT"  # its entry is on the venue when the database dies; the fill's answer comes after
OPENED_AFTER = "JUPUSDT"  # entries work again once the database is back


@pytest.fixture(scope="module")
def owned_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    server = start_owned(tmp_path_factory.mktemp("outage-pg") / "pgdata")
    yield server
    if postmaster_state(server.data_dir)[0] is PostmasterState.DEAD:
        restart_embedded(server.data_dir)
    stop_embedded(server.data_dir)


def _settings(
    server: EmbeddedPostgres, tmp_path: Path, overrides: Mapping[str, str] | None = None
) -> tuple[Settings, str]:
    name = f"outage_{uuid.uuid4().hex[:12]}"
    settings = engine_settings(
        "",  # no DSN: the embedded server in data_dir, which this engine then owns
        {
            "DATABASE__DATA_DIR": str(server.data_dir),
            "DATABASE__NAME": name,
            "DATABASE__PROBE_TIMEOUT_SECONDS": "1",
            "LOGGING__FILE": str(tmp_path / "logs" / "trading_bot.log"),
            **(overrides or {}),
        },
    )
    return settings, server.dsn(name)


async def _open(engine: Engine, clock: ManualClock, symbol: str, side: str = "long") -> PositionGuard:
    assert engine.store is not None
    assert engine.manager is not None
    manager = engine.manager
    await engine.store.insert_signals([(symbol, side, None, None)])
    await drive_until(clock, lambda: symbol in manager.by_symbol, what=f"{symbol} opened")
    guard = manager.by_symbol[symbol]
    await drive_until(
        clock, lambda: guard.covered and guard.status is PositionStatus.ACTIVE, what=f"{symbol} covered"
    )
    return guard


def _slow_orders(settings: Settings, clock: ManualClock) -> SimVenue:
    """A sim venue whose orders take a second: an entry is on the venue half a second before its answer
    is back."""
    sim = settings.venue.sim.model_copy(
        update={
            "latency": LatencySettings(
                seconds=0.05, by_call={CallKind.CREATE_ORDER: LatencyDistribution(seconds=1.0)}
            )
        }
    )
    return SimVenue(sim, clock=clock)


def _stops_on_venue(venue: SimVenue, clock: ManualClock) -> dict[str, Counter[OrderType]]:
    """The venue's truth: our open protective orders, by symbol and kind."""
    found: dict[str, Counter[OrderType]] = {}
    for order in venue.core.open_protective_orders(clock.now()):
        found.setdefault(order.symbol, Counter())[order.type] += 1
    return found


def _loud(records: list[logging.LogRecord]) -> list[str]:
    return [f"{r.levelname} {r.name}: {r.getMessage()}" for r in records if r.levelno >= logging.WARNING]


async def _rows(dsn: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(query)
    finally:
        await conn.close()


async def test_a_killed_postmaster_does_not_stop_protection_and_the_engine_brings_it_back(
    owned_server: EmbeddedPostgres, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings, dsn = _settings(owned_server, tmp_path)
    clock = ManualClock()
    venue = _slow_orders(settings, clock)
    engine = make_engine(settings, clock, venue)
    await drive(clock, engine.start())
    stale_lock = StaleSocketLock(owned_server)
    try:
        store, manager, watch = engine.store, engine.manager, engine.db_watch
        assert store is not None
        assert manager is not None
        assert watch is not None
        guard_a = await _open(engine, clock, COVERED_BEFORE)
        lost = guard_a.stop_loss.client_order_id
        assert lost is not None

        await store.insert_signals([(FILLED_DURING, "short", None, None)])
        await drive_until(
            clock,
            lambda: any(p.symbol == FILLED_DURING for p in venue.core.positions(clock.now())),
            step=0.01,
            what="the entry executed on the venue",
        )
        assert FILLED_DURING not in manager.by_symbol  # its answer is still on its way

        # The database dies, and cannot come back for now: its socket's lock file names a live process.
        first_record = len(caplog.records)
        killed = kill_postmaster(owned_server.data_dir)
        stale_lock.hold()
        # ... and one of our stops vanishes from the exchange (cancelled by hand).
        venue.core.cancel_order(COVERED_BEFORE, lost, clock.now())
        await drive_until(clock, lambda: watch.down, what="the outage noticed")
        outage_started = clock.monotonic()
        manager.request_reconcile()

        def protected() -> bool:
            guard_c = manager.by_symbol.get(FILLED_DURING)
            return (
                guard_c is not None
                and guard_c.covered
                and guard_a.covered
                and guard_a.stop_loss.client_order_id != lost
            )

        await drive_until(clock, protected, what="both positions protected while the database is away")
        guard_c = manager.by_symbol[FILLED_DURING]
        assert watch.down  # still away: everything above happened without it
        # The venue's truth: one hard stop and one trailing stop each, the cancelled one replaced.
        assert _stops_on_venue(venue, clock) == {
            COVERED_BEFORE: Counter({OrderType.STOP_MARKET: 1, OrderType.TRAILING_STOP_MARKET: 1}),
            FILLED_DURING: Counter({OrderType.STOP_MARKET: 1, OrderType.TRAILING_STOP_MARKET: 1}),
        }
        assert lost not in {o.client_order_id for o in venue.core.open_protective_orders(clock.now())}
        # Each was recorded before it was sent: in the journal, the database being away.
        sent_during = {
            guard_a.stop_loss.client_order_id,
            guard_c.stop_loss.client_order_id,
            guard_c.trailing_stop.client_order_id,
        }
        assert sent_during <= store.journaled_order_ids
        # Nothing sent twice: two entries, four stops, one replacement.
        assert venue.calls_made[CallKind.CREATE_ORDER] == 7
        # No guard is in backoff because of the database.
        assert (guard_a.failures, guard_c.failures) == (0, 0)
        # Entries wait for the database (a position could not be recorded); protection did not.
        assert (engine.entries_paused, engine.entries_paused_by) == (True, "database")
        assert engine.resume_entries()[0] is False
        report = await engine.measure_health()
        database = next(c for c in report.components if c.component is Component.DATABASE)
        assert database.state is HealthState.CRITICAL
        assert "unreachable for" in database.reason
        assert database.measurements["journal_depth"] == store.journal_depth > 0

        # The lock goes away: the engine starts the server again, replays, takes the lease again.
        stale_lock.release()
        await drive_until(
            clock,
            lambda: not watch.down and engine.lease_lost_since is None and not engine.entries_paused,
            what="the database back, the lease held, entries on",
        )
        outage_seconds = clock.monotonic() - outage_started
        assert watch.restarts == 1
        assert postmaster_pid(owned_server.data_dir) != killed
        assert not store.has_journal
        assert not list((tmp_path / "logs").glob("tsbot-journal-*"))  # replayed and removed
        outage_records = caplog.records[first_record:]

        # The database now holds every order, once, with the venue's outcome; the positions' flags agree.
        orders = {
            r["client_order_id"]: r["status"] for r in await _rows(dsn, "SELECT * FROM monitoring.orders")
        }
        a, c = guard_a.position_id, guard_c.position_id
        token = engine._token
        assert orders == {
            f"tsb{token}-{a}-en0": "filled",
            f"tsb{token}-{a}-sl0": "canceled",
            f"tsb{token}-{a}-sl1": "open",
            f"tsb{token}-{a}-ts0": "open",
            f"tsb{token}-{c}-en0": "filled",
            f"tsb{token}-{c}-sl0": "open",
            f"tsb{token}-{c}-ts0": "open",
        }
        positions = {
            r["symbol"]: r for r in await _rows(dsn, "SELECT * FROM monitoring.positions ORDER BY id")
        }
        for symbol in (COVERED_BEFORE, FILLED_DURING):
            row = positions[symbol]
            assert (row["status"], row["has_stop_loss"], row["has_trailing_stop"]) == ("active", True, True)
        assert positions[FILLED_DURING]["entry_price"] == guard_c.entry_price
        assert [
            r["status"] for r in await _rows(dsn, "SELECT status FROM monitoring.signals ORDER BY id")
        ] == [
            "opened",
            "opened",
        ]
        assert not await _rows(
            dsn,
            "SELECT data->>'write_id' FROM monitoring.events WHERE data ? 'write_id' "
            "GROUP BY 1 HAVING count(*) > 1",
        )
        assert await _rows(dsn, "SELECT 1 FROM monitoring.events WHERE type = 'protection_lost'")

        # Said once, back once, no traceback; a handful of lines in all (one more per minute away).
        loud = _loud(outage_records)
        assert not [r for r in outage_records if r.exc_info], loud
        assert [r.levelname for r in outage_records if r.getMessage().startswith("database unreachable")] == [
            "ERROR"
        ], loud
        back = [r for r in outage_records if r.getMessage().startswith("database back after")]
        assert [r.levelname for r in back] == ["WARNING"], loud
        assert "journaled writes replayed" in back[0].getMessage()
        assert len(loud) <= 12 + 3 * math.ceil(outage_seconds / 60), loud
        print(
            f"\nkilled postmaster: {len(loud)} lines at WARNING or above over {outage_seconds:.0f}s (virtual) "
            f"of outage; {store.replayed_writes} journaled writes replayed:\n  " + "\n  ".join(loud)
        )

        # Entries work again.
        guard_d = await _open(engine, clock, OPENED_AFTER)
        assert guard_d.covered
    finally:
        stale_lock.release()
        await drive(clock, engine.stop())


async def test_a_postmaster_that_stops_answering_is_found_by_its_probe_killed_and_started_again(
    owned_server: EmbeddedPostgres, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings, dsn = _settings(owned_server, tmp_path)
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    stopped: int | None = None
    try:
        store, manager, watch = engine.store, engine.manager, engine.db_watch
        assert store is not None
        assert manager is not None
        assert watch is not None
        venue = engine.venue
        assert isinstance(venue, SimVenue)
        guard = await _open(engine, clock, COVERED_BEFORE)
        lost = guard.trailing_stop.client_order_id
        assert lost is not None

        first_record = len(caplog.records)
        stopped = stop_postmaster(owned_server.data_dir)  # its existing connections still work
        await drive_until(clock, lambda: watch.down, what="a probe got no answer")
        assert postmaster_pid(owned_server.data_dir) == stopped  # one silent probe is not enough to kill it
        venue.core.cancel_order(COVERED_BEFORE, lost, clock.now())
        manager.request_reconcile()
        await drive_until(
            clock,
            lambda: guard.trailing_stop.confirmed and guard.trailing_stop.client_order_id != lost,
            what="the trailing stop replaced",
        )
        assert guard.trailing_stop.client_order_id in store.journaled_order_ids
        assert _stops_on_venue(venue, clock) == {
            COVERED_BEFORE: Counter({OrderType.STOP_MARKET: 1, OrderType.TRAILING_STOP_MARKET: 1})
        }

        await drive_until(
            clock,
            lambda: not watch.down and engine.lease_lost_since is None and not engine.entries_paused,
            what="the silent server killed and started again, the lease held",
        )
        assert watch.restarts == 1
        assert postmaster_pid(owned_server.data_dir) != stopped
        assert not store.has_journal
        rows = await _rows(
            dsn,
            "SELECT o.client_order_id, o.status, p.has_stop_loss, p.has_trailing_stop FROM monitoring.orders o "
            "JOIN monitoring.positions p ON p.id = o.position_id WHERE o.purpose = 'trailing_stop'",
        )
        assert {r["client_order_id"]: r["status"] for r in rows} == {
            lost: "canceled",
            guard.trailing_stop.client_order_id: "open",
        }
        assert all(r["has_stop_loss"] and r["has_trailing_stop"] for r in rows)

        records = caplog.records[first_record:]
        loud = _loud(records)
        assert not [r for r in records if r.exc_info], loud
        messages = [r.getMessage() for r in records]
        assert sum(m.startswith("database unreachable (no answer within 1s)") for m in messages) == 1, loud
        assert sum("stopped answering and was killed" in m for m in messages) == 1, loud
        assert sum(m.startswith("database back after") for m in messages) == 1, loud
        assert len(loud) <= 12, loud
        print(f"\nstopped postmaster: {len(loud)} lines at WARNING or above:\n  " + "\n  ".join(loud))
    finally:
        if stopped is not None:
            resume(stopped)
        await drive(clock, engine.stop())


async def test_a_whole_server_frozen_is_killed_with_its_backends_and_started_again_while_they_stay_frozen(
    owned_server: EmbeddedPostgres, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator froze the postmaster and all its backends. The engine killed the postmaster alone: the
    frozen backends held its shared memory, every start was refused until they were let go (the lease lost
    26 s and 32 s), and the restart then said the postmaster "had died". Killed with its backends, the
    server starts again while they would still be frozen, and the log says it was killed."""
    caplog.set_level(logging.INFO)
    settings, _dsn = _settings(owned_server, tmp_path)
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    frozen: list[int] = []
    try:
        watch = engine.db_watch
        assert watch is not None
        first_record = len(caplog.records)
        frozen = freeze_server(owned_server.data_dir)
        await drive_until(clock, lambda: watch.down, what="a probe got no answer")
        await drive_until(
            clock,
            lambda: not watch.down and engine.lease_lost_since is None,
            limit=120,
            what="the frozen server killed and started again, the lease held (nothing resumed)",
        )
        assert watch.restarts == 1
        assert postmaster_pid(owned_server.data_dir) != frozen[0]
        assert not any(
            psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in frozen
        )
        messages = [r.getMessage() for r in caplog.records[first_record:]]
        assert sum("stopped answering and was killed" in m for m in messages) == 1, messages
        assert not [m for m in messages if "had died" in m], messages
    finally:
        for pid in frozen:
            resume(pid)
        await drive(clock, engine.stop())


async def test_a_journal_left_by_an_engine_that_stopped_during_an_outage_is_replayed_first_at_the_next_start(
    owned_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    """An engine dies while its database is away: what it journaled is on disk, and the next engine writes
    it into the database before restoring anything from it — so it restores the replacement stop the first
    one placed, instead of chasing the cancelled one, and sends nothing."""
    settings, dsn = _settings(owned_server, tmp_path)
    clock = ManualClock()
    engine_a = make_engine(settings, clock)
    await drive(clock, engine_a.start())
    stale_lock = StaleSocketLock(owned_server)
    try:
        assert engine_a.manager is not None
        guard = await _open(engine_a, clock, COVERED_BEFORE)
        lost = guard.stop_loss.client_order_id
        kill_postmaster(owned_server.data_dir)
        stale_lock.hold()  # the engine cannot start it again before it dies
        engine_a.venue.core.cancel_order(COVERED_BEFORE, lost, clock.now())  # type: ignore[attr-defined]
        engine_a.manager.request_reconcile()
        await drive_until(
            clock,
            lambda: guard.stop_loss.confirmed and guard.stop_loss.client_order_id != lost,
            what="the stop-loss replaced during the outage",
        )
        replacement = guard.stop_loss.client_order_id
    finally:
        await drive(clock, engine_a.stop(drain=False))  # as if it died
    [journal] = (tmp_path / "logs").glob("tsbot-journal-*.jsonl")
    assert (journal.stat().st_mode & 0o777) == 0o600
    assert replacement in journal.read_text()

    stale_lock.release()
    venue_b = SimVenue(settings.venue.sim, clock=clock, core=engine_a.venue.core)  # type: ignore[attr-defined]
    engine_b = make_engine(settings, clock, venue_b)
    report = await drive(clock, engine_b.start())  # its start brings the dead server back first
    try:
        assert not journal.exists()
        assert (report.restored, report.reprotected, report.failed) == (1, 0, 0)
        assert venue_b.calls_made.get(CallKind.CREATE_ORDER, 0) == 0  # nothing sent: it was all there
        assert engine_b.manager is not None
        assert engine_b.manager.by_symbol[COVERED_BEFORE].stop_loss.client_order_id == replacement
        statuses = {
            r["client_order_id"]: r["status"]
            for r in await _rows(dsn, "SELECT client_order_id, status FROM monitoring.orders")
        }
        assert (statuses[lost], statuses[replacement]) == ("canceled", "open")
    finally:
        await drive(clock, engine_b.stop())


@pytest.mark.parametrize("when", ["outage-known", "outage-begins-with-the-restart"])
async def test_a_protection_restart_while_the_database_is_down_cancels_nothing_and_hides_nothing(
    owned_server: EmbeddedPostgres, tmp_path: Path, when: str
) -> None:
    """A protection restart (the dashboard's `r`, a command read just before) during an outage: the new
    manager was installed before its read of the database failed, with no guard, so its reconciler found
    every stop of ours an orphan and cancelled it, and the positions left the coverage figures (found in
    a review). Now a restart asked while the outage is known is refused (the running guards keep
    protecting); one whose outage begins with it waits for the database, the positions counted as not
    verified meanwhile, and nothing is cancelled; once the database answers it restores them."""
    settings, _dsn = _settings(owned_server, tmp_path)
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    stale_lock = StaleSocketLock(owned_server)
    try:
        watch = engine.db_watch
        assert watch is not None
        guard = await _open(engine, clock, COVERED_BEFORE)
        venue = engine.venue
        assert isinstance(venue, SimVenue)
        both = {COVERED_BEFORE: Counter({OrderType.STOP_MARKET: 1, OrderType.TRAILING_STOP_MARKET: 1})}
        assert _stops_on_venue(venue, clock) == both
        kill_postmaster(owned_server.data_dir)
        stale_lock.hold()  # it cannot be started again for now
        if when == "outage-known":
            await drive_until(clock, lambda: watch.down, what="the outage noticed")
            with pytest.raises(ProtectionRestartRefused, match="the database is unreachable"):
                await engine.restart_protection()
            restart = None
        else:  # asked before anything noticed the outage
            restart = asyncio.ensure_future(engine.restart_protection())
        await drive_until(clock, lambda: clock.monotonic() > 40, limit=60, what="40 s of outage")
        # The venue's truth: the stops are where they were.
        assert _stops_on_venue(venue, clock) == both
        figures = engine.coverage()
        if restart is None:  # the running guard protects on
            assert engine.manager is not None
            assert not engine.manager.stopped
            assert engine.manager.by_symbol[COVERED_BEFORE] is guard
            assert (figures.active, figures.protected) == (1, 1)
        else:  # counted, as not verified: nothing runs to verify it until the database answers
            assert not restart.done()
            assert (figures.active, figures.uncovered) == (1, 1)
        stale_lock.release()
        await drive_until(clock, lambda: not watch.down, limit=120, what="the database back")
        back_at = clock.monotonic()
        if restart is None:
            restart = asyncio.ensure_future(engine.restart_protection())
        report = await drive(clock, restart)
        # At once, not a backoff step later (up to `retry_max_seconds`, 30 s, with nothing guarding). (The
        # restore's database reads are real I/O while virtual time runs on: 2 s was ~40 ms of real time.)
        assert clock.monotonic() - back_at < 10.0
        assert (report.restored, report.reprotected, report.failed) == (1, 0, 0)
        assert _stops_on_venue(venue, clock) == both
        await drive_until(clock, lambda: engine.coverage().protected == 1, what="counted protected")
    finally:
        stale_lock.release()
        await drive(clock, engine.stop())


@pytest.mark.parametrize("trailing_mode", ["native", "managed"])
async def test_a_stop_while_a_protection_restart_waits_for_the_database_counts_its_positions(
    owned_server: EmbeddedPostgres, tmp_path: Path, trailing_mode: str
) -> None:
    """Stopped while a protection restart waits for the database: the old manager's guards were gone and
    the new ones not there yet, so the exit line said "0 open positions … uncovered 0" while the venue
    held a position nothing had verified since. Now the positions the restart carries are counted, each
    as it was last verified (here: not verified, so uncovered), and nothing of ours is cancelled. A managed
    trail's position is not said to keep its hard stop: nothing verified it (a reviewer's finding)."""
    settings, _dsn = _settings(owned_server, tmp_path, {"PROTECTION__TRAILING__MODE": trailing_mode})
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    stale_lock = StaleSocketLock(owned_server)
    try:
        await _open(engine, clock, COVERED_BEFORE)
        venue = engine.venue
        assert isinstance(venue, SimVenue)
        kill_postmaster(owned_server.data_dir)
        stale_lock.hold()
        restart = asyncio.ensure_future(engine.restart_protection())
        await drive_until(clock, lambda: clock.monotonic() > 20, limit=30, what="20 s of outage")
        # The restart's reads fail in real time, the clock is driven faster: the stop comes once it waits
        # (a loaded CI run stopped before the first read had failed: still "as last verified").
        await drive_until(
            clock,
            lambda: any("not verified" in (v.last_error or "") for v in engine.snapshot().positions),
            what="the restart waiting for the database",
        )
        assert not restart.done()
    finally:
        report = await drive(clock, engine.stop(drain=False))
        stale_lock.release()
    assert (report.open_positions, report.uncovered, report.uncovered_symbols) == (1, 1, (COVERED_BEFORE,))
    assert "UNCOVERED 1" in report.describe()
    assert "keep only their hard stop" not in report.describe()
    trail = {"native": {OrderType.TRAILING_STOP_MARKET: 1}, "managed": {}}[trailing_mode]  # not activated
    assert _stops_on_venue(venue, clock) == {COVERED_BEFORE: Counter({OrderType.STOP_MARKET: 1, **trail})}
    with pytest.raises(asyncio.CancelledError):
        await restart


async def test_a_position_filled_while_a_protection_restart_waits_for_the_database_is_counted(
    owned_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    """An entry on its way when a protection restart begins, the database dying with it: its fill waits
    for the new manager, which waits for the database. That position, without a stop on the venue, was
    counted nowhere: not in the gauge, and the exit line said "0 open positions … uncovered 0" (found in a
    review). Now it is a position without stops until a guard has it: uncovered past its grace period, and
    in the exit line."""
    settings, _dsn = _settings(owned_server, tmp_path)
    clock = ManualClock()
    venue = _slow_orders(settings, clock)
    engine = make_engine(settings, clock, venue)
    await drive(clock, engine.start())
    stale_lock = StaleSocketLock(owned_server)
    try:
        assert engine.store is not None
        await engine.store.insert_signals([(FILLED_DURING, "short", None, None)])
        await drive_until(
            clock,
            lambda: any(p.symbol == FILLED_DURING for p in venue.core.positions(clock.now())),
            step=0.01,
            what="the entry executed on the venue",
        )
        restart = asyncio.ensure_future(engine.restart_protection())
        kill_postmaster(owned_server.data_dir)
        stale_lock.hold()
        # (Its fill's record waits for the database until the outage is noticed, then is journaled.)
        await drive_until(clock, lambda: engine.coverage().uncovered == 1, limit=60, what="counted uncovered")
        assert not restart.done()
        assert _stops_on_venue(venue, clock) == {}  # the venue's truth: nothing guards it yet
        assert engine.coverage().active == 1
        assert [v.symbol for v in engine.snapshot().positions] == [FILLED_DURING]
    finally:
        report = await drive(clock, engine.stop(drain=False))
        stale_lock.release()
    assert (report.open_positions, report.uncovered, report.uncovered_symbols) == (1, 1, (FILLED_DURING,))


async def test_a_protection_restart_whose_read_fails_otherwise_waits_and_cancels_nothing(
    owned_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    """The database answers, but a restore's read fails (here a table renamed under the engine; a disk
    full, a corrupt row): the restart gave up after stopping the old manager, handed over a stopped one,
    and the positions left the gauge with no guard running (found in a review). Now it waits for the read
    to succeed, the positions counted as not verified, nothing cancelled, and then restores them."""
    settings, dsn = _settings(owned_server, tmp_path)
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        await _open(engine, clock, COVERED_BEFORE)
        venue = engine.venue
        assert isinstance(venue, SimVenue)
        both = {COVERED_BEFORE: Counter({OrderType.STOP_MARKET: 1, OrderType.TRAILING_STOP_MARKET: 1})}
        await _rows(dsn, "ALTER TABLE monitoring.trailing_stop_state RENAME TO trailing_stop_state_away")
        restart = asyncio.ensure_future(engine.restart_protection())
        await drive_until(
            clock, lambda: engine.coverage().uncovered == 1, limit=60, what="counted as not verified"
        )
        await drive(clock, clock.sleep(10.0))  # and it stays so, nothing cancelled
        assert not restart.done()
        assert _stops_on_venue(venue, clock) == both
        assert (engine.coverage().active, engine.coverage().uncovered) == (1, 1)
        await _rows(dsn, "ALTER TABLE monitoring.trailing_stop_state_away RENAME TO trailing_stop_state")
        report = await drive(clock, restart)
        assert (report.restored, report.reprotected, report.failed) == (1, 0, 0)
        assert _stops_on_venue(venue, clock) == both
    finally:
        await drive(clock, engine.stop())


async def test_signals_claimed_when_the_database_died_are_handled_once_it_is_back(
    owned_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    """An operator's drill: signals imported, the database frozen a moment later. The claim had taken them
    (`taken`) when the next read of the wave failed: the wave was never started, and they stayed `taken`,
    in no wave, with no log line, until a later start (or ten minutes) expired them: trades gone silently
    while the engine ran. Once the database is back, the engine takes them again as a wave of its own: each
    is opened (and protected), or rejected with why if entries are still paused then (the account lease is
    taken again a moment after the database is back; a signal is never kept for later)."""
    settings, dsn = _settings(owned_server, tmp_path, {"SIGNALS__WAVE_WINDOW_MS": "500"})
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        store, manager, watch = engine.store, engine.manager, engine.db_watch
        assert store is not None
        assert manager is not None
        assert watch is not None
        symbols = ["SFPUSDT", "ALLUSDT", "JUPUSDT"]
        await store.insert_signals([(s, "long", None, None) for s in symbols])

        async def claimed() -> bool:
            rows = await _rows(dsn, "SELECT count(*) AS n FROM monitoring.signals WHERE status = 'taken'")
            return rows[0]["n"] == len(symbols)

        # Taken; the consumer waits out the wave window (virtual time, which only moves when driven).
        await wait_until(claimed, within=10, what="the signals claimed")
        await _database_dies_and_signals_settle(owned_server, watch, clock, dsn, limit=120)
        rows = await _rows(dsn, "SELECT symbol, status, reason, wave_id FROM monitoring.signals")
        for row in rows:
            assert row["wave_id"] is not None, dict(row)
            if row["status"] == "opened":
                await drive_until(
                    clock,
                    lambda symbol=row["symbol"]: (
                        symbol in manager.by_symbol and manager.by_symbol[symbol].covered
                    ),
                    what=f"{row['symbol']} protected",
                )
            else:
                assert (row["status"], row["reason"].startswith("entries paused")) == ("rejected", True), (
                    dict(row)
                )
    finally:
        await drive(clock, engine.stop())


async def test_a_frozen_database_is_said_in_health_as_no_answer_not_an_empty_timeout(
    owned_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    """An operator froze the embedded server (SIGSTOP on the postmaster and its backends): the dashboard's
    critical line read "Database query failed: TimeoutError:", the timeout's empty text. It says what
    happened: no answer within the probe timeout."""
    settings, _dsn = _settings(owned_server, tmp_path)
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    frozen: list[int] = []
    try:
        watch = engine.db_watch
        assert watch is not None
        frozen = freeze_server(owned_server.data_dir)
        reading = await watch.measure()
        assert reading.error == "no answer within 1s"
    finally:
        for pid in frozen:
            resume(pid)
        await drive(clock, engine.stop())


async def test_a_wave_whose_entries_meet_the_database_going_away_says_one_outcome_per_signal(
    owned_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    """The database dies mid-wave, the first entries on their way. Each signal ends with one outcome, the
    venue's truth agreeing: opened (its position on the venue, protected) or rejected with why (entries wait
    for the database: not sent), never both, never sent twice."""
    settings, dsn = _settings(
        owned_server, tmp_path, {"SIGNALS__MAX_CONCURRENT_ENTRIES": "2", "SIGNALS__MAX_POSITIONS": "20"}
    )
    clock = ManualClock()
    venue = _slow_orders(settings, clock)
    engine = make_engine(settings, clock, venue)
    await drive(clock, engine.start())
    rejected: list[SignalRejected] = []

    async def follow() -> None:
        async for event in engine.events():
            if isinstance(event, SignalRejected):
                rejected.append(event)

    follower = asyncio.create_task(follow())
    try:
        store, manager, watch = engine.store, engine.manager, engine.db_watch
        assert store is not None
        assert manager is not None
        assert watch is not None
        symbols = ["SFPUSDT", "ALLUSDT", "JUPUSDT", "AXSUSDT", "DOTUSDT", "ADAUSDT"]
        await store.insert_signals([(s, "long", None, None) for s in symbols])
        await drive_until(
            clock,
            lambda: len(venue.core.positions(clock.now())) >= 1,
            step=0.01,
            what="the first entries on the venue",
        )
        await _database_dies_and_signals_settle(owned_server, watch, clock, dsn, limit=60)
        await drive(clock, clock.sleep(5))
        rows = {
            r["symbol"]: r["status"]
            for r in await _rows(dsn, "SELECT symbol, status FROM monitoring.signals")
        }
        opened = sorted(s for s, status in rows.items() if status == "opened")
        assert sorted(rows) == sorted(symbols)
        assert set(rows.values()) <= {"opened", "rejected"}
        assert opened  # (the entries on their way when it died)
        assert sorted(p.symbol for p in venue.core.positions(clock.now())) == opened  # none sent twice
        # Covered, each: one whose signal was taken again once the database was back may have opened in
        # the last virtual seconds, its stops on their way (a loaded clean-clone run looked then).
        await drive_until(
            clock,
            lambda: all(s in manager.by_symbol and manager.by_symbol[s].covered for s in opened),
            limit=60,
            what="every opened position protected",
        )
        assert sorted(e.symbol for e in rejected) == sorted(s for s in symbols if s not in opened)
    finally:
        follower.cancel()
        await drive(clock, engine.stop())


async def _database_dies_and_signals_settle(
    server: EmbeddedPostgres, watch: DatabaseWatch, clock: ManualClock, dsn: str, *, limit: float
) -> None:
    """The postmaster SIGKILLed; once the engine has it back, no signal is left taken (each opened or
    rejected), within `limit` virtual seconds."""
    kill_postmaster(server.data_dir)
    await drive_until(clock, lambda: watch.down, what="the outage noticed")
    await drive_until(clock, lambda: not watch.down, limit=120, what="the database back")

    async def settled() -> bool:
        rows = await _rows(dsn, "SELECT count(*) AS n FROM monitoring.signals WHERE status = 'taken'")
        return rows[0]["n"] == 0

    await drive_until(clock, settled, limit=limit, what="every signal settled")


async def test_a_frozen_database_is_timed_from_its_first_unanswered_request_and_said_in_health_at_once(
    owned_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    """An operator froze the server for 9.7 s: the engine said "database back after 6s" and, at 8.2 s,
    "unreachable for 4.0s": an outage was timed from the end of the probe that found it, not from when that
    probe was asked. Meanwhile the health row said "ok, round trip 1 ms" under a header that said entries
    paused for the database: the health check ran at its interval only, and its save could wait on the
    frozen server for good (a statement inside a transaction was not given up when the outage was declared).
    On the engine's real clock: the probe's timeouts are real time."""
    settings, _dsn = _settings(owned_server, tmp_path)
    clock = SystemClock()
    engine = Engine(settings, venue=SimVenue(settings.venue.sim, clock=clock), clock=clock, version="test")
    await engine.start()
    frozen: list[int] = []
    try:
        watch = engine.db_watch
        assert watch is not None
        measured = engine.health_measured_at
        await wait_until(lambda: engine.health_measured_at != measured, within=10.0, what="a health check")
        await asyncio.sleep(0.2)  # its save is done: the next check is 5 s away
        frozen = freeze_server(owned_server.data_dir)
        await wait_until(lambda: watch.down, within=15.0, what="the outage noticed")
        noticed_at = clock.monotonic()
        down_for = watch.down_for()
        assert down_for is not None
        assert down_for >= 1.0  # the probe's own timeout at least: asked, and never answered

        def database_row() -> str:
            return next(c.state.value for c in engine.health_components if c.component == "database")

        await wait_until(lambda: database_row() == "critical", within=15.0, what="the health row says so")
        assert engine.health_measured_at is not None
        assert engine.health_measured_at - noticed_at < 1.0  # not at the 5 s interval, nor never
    finally:
        for pid in frozen:
            resume(pid)
        await engine.stop()


async def test_a_reconcile_pass_with_an_order_of_ours_without_a_guard_goes_on_while_the_database_is_down(
    owned_server: EmbeddedPostgres, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pass reads whose orders of ours without a guard are (another identity's of this database?). With the
    database down the read is not made (or given up after 2 s: a protection restart waits for the pass in
    flight), the passes go on, and such an order, whose it is not known, is not cancelled."""
    settings, _dsn = _settings(owned_server, tmp_path, {"PROTECTION__RECONCILE_SECONDS": "2"})
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    stale_lock = StaleSocketLock(owned_server)
    try:
        watch = engine.db_watch
        assert watch is not None
        guard = await _open(engine, clock, COVERED_BEFORE)
        venue = engine.venue
        assert isinstance(venue, SimVenue)
        market = engine.markets["ALLUSDT"]
        mark = venue.core.mark("ALLUSDT")
        # Ours by token, of a position this engine does not guard (another identity's, or one it lost).
        token = guard.stop_loss.client_order_id.split("-")[0]  # type: ignore[union-attr]
        unguarded = f"{token}-999-sl0"
        venue.core.place_market_order(
            "ALLUSDT", OrderSide.BUY, market.min_quantity * 100, "by-hand", clock.now()
        )
        venue.core.place_stop_market_order(
            "ALLUSDT",
            OrderSide.SELL,
            market.min_quantity * 100,
            market.round_price(mark * Decimal("0.9")),
            unguarded,
            clock.now(),
        )
        kill_postmaster(owned_server.data_dir)
        stale_lock.hold()
        await drive_until(clock, lambda: watch.down, what="the outage noticed")
        caplog.clear()
        reconciler = engine.reconciler
        assert reconciler is not None
        runs = reconciler.runs
        await drive_until(clock, lambda: reconciler.runs >= runs + 5, limit=60, what="five passes")
        failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reconciler failed")]
        assert failed == [], failed
        live = {o.client_order_id for o in venue.core.open_protective_orders(clock.now())}
        assert unguarded in live
    finally:
        stale_lock.release()
        await drive(clock, engine.stop())

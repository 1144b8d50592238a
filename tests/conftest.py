"""Shared fixtures: one real embedded PostgreSQL per test session, a fresh database per test.

Each test database is created from a template that already carries the migrated schema, so a test starts
from exactly what `tsbot db migrate` produces, in ~50 ms. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from storage.database import Database, DatabaseTarget, create_pool, ensure_database_exists
from storage.embedded import EmbeddedPostgres, stop_embedded
from storage.migrator import apply_migrations
from tests.support.owned_postgres import start_owned

TEMPLATE_DB = "tsbot_template"
# pytest-timeout shows the threads' stacks when a test runs out of time; an async test's are the event
# loop's, idle in its selector. So a few seconds before, every asyncio task's stack goes to the test's
# stderr (shown with the failure): what each was awaiting.
TASKS_SHOWN_BEFORE_TIMEOUT_SECONDS = 3.0


def _show_tasks_of_the_main_threads_loop() -> None:
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    while frame is not None and not isinstance(frame.f_locals.get("self"), asyncio.AbstractEventLoop):
        frame = frame.f_back
    if frame is None:
        return
    loop = frame.f_locals["self"]
    lines = ["~~~ asyncio tasks before the timeout, each down its chain of awaits ~~~"]
    for task in asyncio.all_tasks(loop):
        lines.append(f"--- {task.get_name()}")
        awaited: object = task.get_coro()
        while awaited is not None:
            code_frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
            if code_frame is None:
                code_frame = getattr(awaited, "gi_frame", None)
            if code_frame is not None:
                code = code_frame.f_code
                lines.append(f"    {code.co_filename}:{code_frame.f_lineno} in {code.co_name}")
            else:
                lines.append(f"    {awaited!r}")
            awaited = (
                getattr(awaited, "cr_await", None)
                or getattr(awaited, "ag_await", None)
                or getattr(awaited, "gi_yieldfrom", None)
            )
    print("\n".join(lines), file=sys.stderr, flush=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    marker = item.get_closest_marker("timeout")
    timeout = float(marker.args[0] if marker and marker.args else item.config.getini("timeout") or 0)
    timer = None
    if timeout > TASKS_SHOWN_BEFORE_TIMEOUT_SECONDS:
        timer = threading.Timer(
            timeout - TASKS_SHOWN_BEFORE_TIMEOUT_SECONDS, _show_tasks_of_the_main_threads_loop
        )
        timer.daemon = True
        timer.start()
    try:
        return (yield)
    finally:
        if timer is not None:
            timer.cancel()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Finalize what the tests left for the garbage collector now, before the terminal summary imports
    and parses modules. A task that failed with nobody reading its outcome (asyncpg's pool leaves one when
    a connection's release is cancelled as the server dies) is logged, traceback formatted, when the
    collector finds it; on CPython 3.11, found in the middle of an `ast.parse` that nesting corrupts the
    parser's recursion count, and the run ended "SystemError: AST constructor recursion depth mismatch"
    with every test passed (`tests/unit/test_call_cancellation.py` has our own such leak)."""
    gc.collect()


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    # (Each test's database from the template, and every commit, waited for the disk: `start_owned`.)
    server = start_owned(tmp_path_factory.mktemp("embedded-pg") / "pgdata")

    async def prepare_template() -> None:
        await ensure_database_exists(server.dsn("postgres"), TEMPLATE_DB)
        conn = await asyncpg.connect(server.dsn(TEMPLATE_DB))
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()

    asyncio.run(prepare_template())
    yield server
    # Subprocesses killed with SIGKILL (restart tests) never leave the server's user list, so the session
    # stops its server itself instead of leaving a PostgreSQL behind.
    stop_embedded(server.data_dir)


async def _create_database(server: EmbeddedPostgres, template: str) -> str:
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(server.dsn("postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await admin.close()
    return name


async def _drop_database(server: EmbeddedPostgres, name: str) -> None:
    admin = await asyncpg.connect(server.dsn("postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def empty_database(pg_server: EmbeddedPostgres) -> AsyncIterator[str]:
    """The name of a brand-new database with no schema at all."""
    name = await _create_database(pg_server, "template0")
    yield name
    await _drop_database(pg_server, name)


@pytest.fixture
async def migrated_database(pg_server: EmbeddedPostgres) -> AsyncIterator[str]:
    """The name of a fresh database carrying the migrated schema."""
    name = await _create_database(pg_server, TEMPLATE_DB)
    yield name
    await _drop_database(pg_server, name)


@pytest.fixture
async def db(pg_server: EmbeddedPostgres, migrated_database: str) -> AsyncIterator[Database]:
    """A pool on a fresh migrated database."""
    target = DatabaseTarget(dsn=pg_server.dsn(migrated_database), embedded=pg_server)
    pool = await create_pool(target, min_size=1, max_size=5)
    database = Database(pool=pool, target=target, migrations_applied=[])
    yield database
    await database.close()


@pytest.fixture
def project_root() -> Path:
    return Path(__file__).resolve().parent.parent

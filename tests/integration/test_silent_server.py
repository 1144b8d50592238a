"""A PostgreSQL server that accepts a connection of our own and then answers nothing on it (frozen, or cut
off from this host alone), staged by a loopback proxy in front of the real server: each such connection's
work fails within its bound instead of waiting for good. (The pool's statements carry `command_timeout`;
the LISTEN connections are in test_commands.py and test_signal_consumer.py.)"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from storage.database import (
    Database,
    DatabaseDown,
    DatabaseTarget,
    DatabaseUnavailable,
    create_pool,
    ensure_database_exists,
    open_database,
)
from storage.lease import LEASE_TIMEOUT_SECONDS, EngineLease
from storage.migrator import MIGRATION_LOCK_KEY
from storage.resilient import ResilientStore
from tests.support.pg_proxy import SilentFromProxy


async def test_taking_the_lease_from_a_server_gone_silent_fails_within_its_bound(
    db: Database, pg_server
) -> None:
    """Else the engine's lease loop, taking the lease again after a loss, waited on it for good (entries
    paused all the while), as would a start; then, bounded, a start said "internal error (a bug …):
    TimeoutError:" (a reviewer)."""
    # Its transaction's BEGIN (a simple query) is the first thing it sends: it goes unanswered.
    proxy = await SilentFromProxy.in_front_of(pg_server.socket_dir, db.target.dsn, silent_from=b"Q")
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout(LEASE_TIMEOUT_SECONDS * 3):
            with pytest.raises(DatabaseUnavailable, match="no answer taking the account lease within 10 s"):
                await EngineLease.acquire(proxy.dsn, "sim", "sim:default", "test")
    except TimeoutError:
        pytest.fail(f"taking the lease still waited after {LEASE_TIMEOUT_SECONDS * 3:g}s")
    finally:
        await proxy.close()
    took = loop.time() - started
    assert proxy.held == 1
    # Its BEGIN's bound, not a goodbye's on top (that waited as long again). One line, no "internal error".
    assert took < LEASE_TIMEOUT_SECONDS + 3, took
    # Nothing was taken: an engine on the server itself takes the lease at once.
    lease = await EngineLease.acquire(db.target.dsn, "sim", "sim:default", "test")
    await lease.release()


async def test_making_sure_the_database_exists_on_a_server_gone_silent_fails_within_its_bound(
    db: Database, pg_server
) -> None:
    """Every open on embedded defaults (`tsbot run`, the dashboard, each command) first makes sure its
    database exists, on a connection of its own whose statements had no time limit."""
    proxy = await SilentFromProxy.in_front_of(
        pg_server.socket_dir, pg_server.dsn("postgres"), silent_from=b"P"
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout(30):
            with pytest.raises(DatabaseUnavailable, match=r"no answer within 2 s"):
                await ensure_database_exists(proxy.dsn, "never_made", connect_timeout=2)
    except TimeoutError:
        pytest.fail("making sure of the database still waited after 30 s")
    finally:
        await proxy.close()
    took = loop.time() - started
    assert proxy.held == 1
    assert took < 2 + 2, took  # its statement's bound (a goodbye on top waited as long again)


async def test_a_schema_check_that_gets_no_answer_says_so_in_one_line(db: Database) -> None:
    """A start whose database froze while it checked its schema said "internal error (a bug, not your
    input): TimeoutError:" with a traceback (an operator's drill, reproduced twice). Staged here by another
    session holding the migration lock, which the check then waits for past its statement bound."""
    holder = await asyncpg.connect(db.target.dsn)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        with pytest.raises(DatabaseUnavailable) as refused:
            async with asyncio.timeout(30):
                await open_database(db.target.dsn, command_timeout=1)
    finally:
        await holder.close()
    assert str(refused.value) == (
        f"database {db.target.display}: no answer within 1 s while its schema was checked (a server that "
        "stopped answering, or another tsbot migrating it)"
    )


async def test_a_read_the_server_does_not_answer_says_no_answer_not_an_empty_timeout(
    db: Database, pg_server
) -> None:
    """`tsbot run` started on a server that froze ended with "the database is unreachable (TimeoutError: )"
    (an operator): a timeout carries no text of its own."""
    proxy = await SilentFromProxy.in_front_of(pg_server.socket_dir, db.target.dsn, silent_from=None)
    target = DatabaseTarget(dsn=proxy.dsn)
    pool = await create_pool(target, min_size=1, max_size=1, command_timeout=1)
    try:
        store = ResilientStore(pool)
        proxy.go_silent()
        with pytest.raises(DatabaseDown) as down:
            async with asyncio.timeout(30):
                await store.entries_control("sim", "sim:default")
    finally:
        await proxy.close()
        pool.terminate()
    assert str(down.value) == "the database is unreachable (TimeoutError: no answer in time)"


async def test_a_connection_made_again_on_a_server_gone_silent_waits_a_statements_time(
    db: Database, pg_server
) -> None:
    """The pool's connections were made with the minute a first start allows: a start on a server that
    froze (or any query after an outage dropped the connections) waited for a new connection until the
    server thawed (an operator's drill, reproduced). Made again on a silent server, one fails within the
    statements' bound."""
    proxy = await SilentFromProxy.in_front_of(pg_server.socket_dir, db.target.dsn, silent_from=None)
    database = await open_database(proxy.dsn, min_size=1, max_size=1, command_timeout=1, migrate=False)
    loop = asyncio.get_running_loop()
    failed: BaseException | None = None
    try:
        proxy.go_silent()
        async with database.pool.acquire() as dropped:  # (as after an outage: the connection made again)
            dropped.terminate()
        started = loop.time()
        try:
            async with asyncio.timeout(30):
                await database.pool.fetchval("SELECT 1")
        except (TimeoutError, OSError) as exc:
            failed = exc
        took = loop.time() - started
    finally:
        await proxy.close()
        database.pool.terminate()
    assert isinstance(failed, TimeoutError | OSError)
    assert took < 1 + 2, f"{took:.1f}s"

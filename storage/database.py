"""Opening the database: an external server from `database.dsn`, or the embedded one; one asyncpg pool."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from storage.embedded import EmbeddedPostgres, default_data_dir, detach_embedded, start_embedded
from storage.migrator import Migration, apply_migrations

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_SECONDS = 10.0  # a graceful close of the pool, before its connections are dropped


class DatabaseUnavailable(RuntimeError):
    """The database could not be reached or prepared; the message names it (password redacted)."""


class InvalidDsn(ValueError):
    """`database.dsn` is not a DSN the driver accepts (a configuration error); the message names it."""


class DatabaseDown(DatabaseUnavailable):
    """The running engine's database is unreachable right now (refused, reset, not answering). Loops that
    need it wait for it to come back; the protection path writes to the local journal instead."""


# What "the database cannot be reached" looks like from asyncpg: the socket (refused, reset, gone), no answer
# in time, the connection or the server going away (08xxx, 57P01-03: shutting down, crashed, starting up),
# a cancelled statement, no connection slot. Constraint violations and other SQL errors are not in it: they
# are bugs, and surface as they are.
UNREACHABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.QueryCanceledError,
    asyncpg.TooManyConnectionsError,
    DatabaseDown,
)


def error_words(exc: BaseException) -> str:
    """An error as `Type: text`; a timeout has no text of its own, so it says "no answer in time" (operators
    read "the database is unreachable (TimeoutError: )")."""
    text = str(exc) or ("no answer in time" if isinstance(exc, TimeoutError) else "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_unreachable(exc: BaseException) -> bool:
    if isinstance(exc, UNREACHABLE_ERRORS):
        return True
    # A connection that broke under a statement can leave asyncpg's protocol in a state it reports as an
    # internal error ("cannot switch to state …; another operation is in progress"); a schema-cache miss is
    # the one internal error that is not about the connection.
    return isinstance(exc, asyncpg.InternalClientError) and not isinstance(
        exc, asyncpg.OutdatedSchemaCacheError
    )


@dataclass(frozen=True, slots=True)
class DatabaseTarget:
    """Where to connect. `password` is kept out of `dsn` so the DSN can be shown."""

    dsn: str
    password: str | None = None
    embedded: EmbeddedPostgres | None = None

    @property
    def display(self) -> str:
        return redact_dsn(self.dsn)


# The password of a URL's user part: from the first `:` after `://` (the user may be empty) to the last `@`
# of the URL (an unescaped `@` or `/` may be inside the password: generated ones hold `/`); and a
# `password=` parameter. A URL whose path or query holds an `@` is masked further than its password: no harm.
_DSN_PASSWORD = re.compile(r"(://[^:/@\s]*):\S*@")
# A parameter's name starts where no name character precedes it: each run of them is tried once (without
# it, a long word with no `=` was scanned from each of its characters: quadratic, a 100 kB argument hung).
_PARAM = re.compile(r"(?<![A-Za-z0-9%_.~-])([A-Za-z0-9%_.~-]+=)([^&\s]+)")


def _masked_param(match: re.Match[str]) -> str:
    """A `name=value` whose name, once unescaped, ends in "password" (`password`, `sslpassword`, and
    `ssl%70assword`, which the driver reads as `sslpassword` too: a reviewer saw it shown whole)."""
    name = match.group(1)
    return f"{name}***" if urllib.parse.unquote(name[:-1]).lower().endswith("password") else match.group(0)


def redact_dsn(text: str) -> str:
    """`postgresql://user:secret@host/db` -> `postgresql://user:***@host/db`, also with no user name or an
    `@` inside the password, and password parameters: in a DSN, or in any text that quotes one."""
    return _PARAM.sub(_masked_param, _DSN_PASSWORD.sub(r"\1:***@", text))


async def resolve_target(
    dsn: str, data_dir: str, name: str, password: str | None = None, *, connect_timeout: float = 60.0
) -> DatabaseTarget:
    """An explicit DSN as given; otherwise start (or join) the embedded server and make sure `name` exists."""
    if dsn:
        return DatabaseTarget(dsn=dsn, password=password)
    directory = Path(data_dir) if data_dir else default_data_dir()
    embedded = await asyncio.to_thread(start_embedded, directory)
    try:
        await ensure_database_exists(embedded.dsn("postgres"), name, connect_timeout=connect_timeout)
    except DatabaseUnavailable as exc:
        # A live postmaster that answers nothing (stopped with SIGSTOP, hung, its host overloaded): joined, it
        # held a command for a minute, then "internal error: TimeoutError" (an operator's flatten, so), and
        # the exit another minute, stopping it.
        await asyncio.to_thread(detach_embedded, directory)
        raise DatabaseUnavailable(
            f"embedded PostgreSQL in {embedded.data_dir} (pid {embedded.pid}) is running but does not answer: "
            f"{exc}"
        ) from None
    return DatabaseTarget(dsn=embedded.dsn(name), embedded=embedded)


async def ensure_database_exists(
    admin_dsn: str, name: str, template: str | None = None, *, connect_timeout: float = 60.0
) -> bool:
    """Create database `name` if missing; True when it was created now. Each statement, like the connect,
    is answered within `connect_timeout`: a server that froze once it had accepted held every start and
    command on embedded defaults for good (a reviewer: `tsbot run`, `tsbot flatten`, the dashboard's quit)."""
    try:
        conn = await asyncpg.connect(admin_dsn, timeout=connect_timeout, command_timeout=connect_timeout)
    except TimeoutError:
        raise DatabaseUnavailable(f"no answer within {connect_timeout:g} s") from None
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            return False
        clause = f" TEMPLATE {_quote_ident(template)}" if template else ""
        try:
            await conn.execute(f"CREATE DATABASE {_quote_ident(name)}{clause}")
        except asyncpg.DuplicateDatabaseError:
            return False  # another process created it between our check and our create
        except asyncpg.UniqueViolationError as exc:
            # Another creating it at the same moment: PostgreSQL says so as a unique violation on the
            # catalog (`tsbot run` and `tsbot signals import` started together on a fresh server: the loser
            # died with "internal error" and a traceback).
            if exc.constraint_name != "pg_database_datname_index":
                raise
            return False
        return True
    except TimeoutError:
        conn.terminate()  # (its goodbye would wait as long again: asyncpg cancels the statement first)
        raise DatabaseUnavailable(f"no answer within {connect_timeout:g} s") from None
    finally:
        if not conn.is_closed():
            await close_within(conn, within=connect_timeout)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(
    target: DatabaseTarget,
    *,
    min_size: int = 1,
    max_size: int = 10,
    command_timeout: float = 10.0,
    connect_timeout: float = 60.0,
) -> asyncpg.Pool:
    try:
        return await asyncpg.create_pool(
            target.dsn,
            password=target.password,
            min_size=min_size,
            max_size=max_size,
            command_timeout=command_timeout,
            timeout=connect_timeout,
            init=_init_connection,
        )
    except TimeoutError:
        raise DatabaseUnavailable(
            f"database {target.display}: cannot connect: no answer within {connect_timeout:g} s"
        ) from None
    except (OSError, asyncpg.PostgresError) as exc:
        raise DatabaseUnavailable(f"database {target.display}: cannot connect: {exc}") from None
    except (asyncpg.ClientConfigurationError, ValueError) as exc:
        raise InvalidDsn(f"database.dsn: {target.display}: not a DSN asyncpg accepts: {exc}") from None


@dataclass(slots=True)
class Database:
    """The pool plus what it points at. `close()` releases the pool (the embedded server outlives it)."""

    pool: asyncpg.Pool
    target: DatabaseTarget
    migrations_applied: list[Migration]

    async def close(self, within: float = CLOSE_TIMEOUT_SECONDS) -> None:
        """Close the pool's connections, gracefully within `within` seconds: a frozen server never answers the
        goodbye (nor the cancel of a statement in flight), so past it they are dropped."""
        try:
            async with asyncio.timeout(within):
                await self.pool.close()
        except TimeoutError:
            log.warning(
                "the database did not answer the pool's close within %.0fs; connections dropped", within
            )
            self.pool.terminate()


async def open_database(
    dsn: str = "",
    data_dir: str = "",
    name: str = "tsbot",
    *,
    password: str | None = None,
    min_size: int = 1,
    max_size: int = 10,
    command_timeout: float = 10.0,
    migrate: bool = True,
    connect_timeout: float = 60.0,
) -> Database:
    target = await resolve_target(dsn, data_dir, name, password, connect_timeout=connect_timeout)
    pool = await create_pool(
        target,
        min_size=min_size,
        max_size=max_size,
        command_timeout=command_timeout,
        # The server has just answered: its connections (and every one made again later, after an outage)
        # get a statement's time, not the minute a first start allows. A start on a server that froze
        # waited for a connection until it thawed (an operator's drill, reproduced).
        connect_timeout=min(connect_timeout, command_timeout),
    )
    applied: list[Migration] = []
    if migrate:
        try:
            async with pool.acquire() as conn:
                applied = await apply_migrations(conn)
        except BaseException as exc:
            pool.terminate()  # (a goodbye to a server that does not answer waited for good)
            if isinstance(exc, TimeoutError) or (isinstance(exc, Exception) and is_unreachable(exc)):
                # A start on a server that froze then said "internal error (a bug …): TimeoutError:" (an
                # operator's drill, reproduced).
                if isinstance(exc, TimeoutError):
                    why = (
                        f"no answer within {command_timeout:g} s while its schema was checked (a server that "
                        "stopped answering, or another tsbot migrating it)"
                    )
                else:  # (a server killed under it, say: neither the time nor those causes fit, r59)
                    why = f"{type(exc).__name__}: {exc} while its schema was checked"
                raise DatabaseUnavailable(f"database {target.display}: {why}") from None
            raise
        for migration in applied:
            log.info("applied migration %s to %s", migration.filename, target.display)
    return Database(pool=pool, target=target, migrations_applied=applied)


async def listening_connection(
    dsn: str, password: str | None, channels: Mapping[str, Callable[..., object]], *, within: float
) -> asyncpg.Connection:
    """A connection of its own that LISTENs on `channels`, set up within `within` seconds as a whole. The
    connect alone was bounded: a server that froze once it had accepted held the LISTEN statement for good
    (a `tsbot flatten` hung past 90 s; the engine's signal loop would have waited with it). Past `within`,
    or on any error, the connection is dropped and the error raised (TimeoutError for the time)."""
    conn: asyncpg.Connection | None = None
    try:
        async with asyncio.timeout(within):
            conn = await asyncpg.connect(dsn, password=password, timeout=within)
            for channel, callback in channels.items():
                await conn.add_listener(channel, callback)
    except BaseException:
        if conn is not None:
            conn.terminate()
        raise
    return conn


async def close_within(conn: asyncpg.Connection, *, within: float) -> None:
    """Close a connection of its own, politely within `within` seconds, then dropped: a frozen server never
    answers the goodbye."""
    try:
        await conn.close(timeout=within)
    except Exception:
        conn.terminate()


async def answers(target: DatabaseTarget, *, within: float) -> bool:
    """Whether the server answers a fresh connection's `SELECT 1` within `within` seconds (the connection is
    dropped after, not closed politely)."""
    conn: asyncpg.Connection | None = None
    try:
        async with asyncio.timeout(within):
            conn = await asyncpg.connect(target.dsn, password=target.password, timeout=within)
            await conn.fetchval("SELECT 1")
    except Exception:
        return False
    finally:
        if conn is not None:
            conn.terminate()
    return True

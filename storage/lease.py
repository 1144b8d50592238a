"""One engine per (venue, account): a PostgreSQL advisory lock held for the engine's whole life.

The lock lives on a dedicated connection (a pooled connection would drop it on release). Whoever holds it
also writes a row in `monitoring.engine_leases`, so anyone refused can say who has it. If the dedicated
connection dies, the lock is gone: `alive()` turns false and the engine must stop trading.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg

from engine.words import format_duration
from storage.database import DatabaseUnavailable, close_within

LEASE_NAMESPACE = 0x7473  # "ts": first key of the two-key advisory lock
RECORDING_NAMESPACE = 0x7472  # held only while a lease attempt takes the lock and records itself
# A server that stopped answering must not hold the lease watcher forever: a heartbeat or an attempt to
# take the lease that gets no answer within this fails (the lease counts as lost, and is tried again).
LEASE_TIMEOUT_SECONDS = 10.0
# An engine heartbeats its lease every 2 s (`engine.engine.LEASE_CHECK_SECONDS`), from taking it to releasing
# it, with its phase. One not heard for this long still holds the lock but looks after nothing: it is hung or
# frozen, or its host is gone (the server keeps a vanished client's session, and its lock, until TCP says the
# peer is gone). Readers (`tsbot status`, the operators' query, a watch-only dashboard) count an engine as
# looking after the account only while it is heard and running: one starting or stopping does not (yet, or
# any more) resolve entries or move managed trails.
LEASE_SILENT_SECONDS = 30


class LeasePhase(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


@dataclass(frozen=True, slots=True)
class LeaseHolder:
    venue: str
    account: str
    pid: int
    host: str
    version: str
    started_at: datetime
    heartbeat_at: datetime
    label: str | None = None  # what the holder's operator calls the account (`venue.account`)
    phase: str = LeasePhase.RUNNING  # as of its last heartbeat
    silent_seconds: float = 0.0  # since its last heartbeat, by the database's clock
    # The code it runs (F10): its packages' roots on its host, and each source file's digest (JSON text).
    code_roots: list[str] | None = None
    code_digests: str | dict[str, str] | None = None  # (as the connection's jsonb codec reads it)

    def running_code(self) -> dict[str, str] | None:
        """The digests of the code the holder runs, by file (None: not recorded, an older version's)."""
        digests: Any = self.code_digests
        if isinstance(digests, str):
            try:
                digests = json.loads(digests)
            except ValueError:
                return None
        return digests if isinstance(digests, dict) and digests else None

    @property
    def silent(self) -> bool:
        """Not heard for `LEASE_SILENT_SECONDS`: it holds the account but looks after nothing."""
        return self.silent_seconds > LEASE_SILENT_SECONDS

    @property
    def looks_after(self) -> bool:
        """Heard and running: it protects the account's positions, resolves its entries, moves its trails."""
        return not self.silent and self.phase == LeasePhase.RUNNING

    def not_looking_after(self) -> str:
        """Why it does not look after the account, for an operator ("" when it does)."""
        if self.silent:
            return f"is silent: {self.describe()}"
        if self.phase != LeasePhase.RUNNING:
            return f"is {self.phase}: {self.describe()}"
        return ""

    def describe(self) -> str:
        named = f" (account label {self.label!r})" if self.label else ""
        return (
            f"pid {self.pid} on {self.host}{named}, version {self.version}, "
            f"since {self.started_at.isoformat(timespec='seconds')}"
        ) + (
            f", not heard for {format_duration(self.silent_seconds)} (hung, or its host is gone)"
            if self.silent
            else ""
        )


class LeaseHeld(Exception):
    """Another engine trades this account."""

    def __init__(self, venue: str, account: str, holder: LeaseHolder | None):
        who = holder.describe() if holder else "an engine that did not record itself"
        super().__init__(f"account {account!r} on {venue} is already traded by {who}")
        self.holder = holder


def lease_key(venue: str, account: str) -> str:
    return f"{venue}/{account}"


def is_own_lease(holder: LeaseHolder | None, since: datetime | None) -> bool:
    """`holder` is this process's own lease, first taken at `since`: after a lost connection the server may
    still keep the old session and its lock (until it notices the close), and an attempt to take the lease
    again reads this engine's own row. Another engine's row names its own start (engines in one process,
    tests, share a pid)."""
    return (
        holder is not None
        and since is not None
        and holder.pid == os.getpid()
        and holder.host == socket.gethostname()
        and holder.started_at == since
    )


async def _connect(dsn: str, password: str | None) -> asyncpg.Connection:
    """A connection of the lease's own, each of its statements bounded: a server that froze once it had
    accepted held a start (or the lease taken again after a loss) on its BEGIN for good."""
    return await asyncpg.connect(
        dsn, password=password, timeout=LEASE_TIMEOUT_SECONDS, command_timeout=LEASE_TIMEOUT_SECONDS
    )


async def end_own_lost_session(
    dsn: str, venue: str, account: str, since: datetime, password: str | None = None
) -> int | None:
    """End the server's session that still holds the lease for this process (`is_own_lease`): its client
    side is gone. Only while the row names this process and its start, checked in the same statement (a
    row another engine wrote meanwhile names its own). Serialised with attempts to take the lease (the
    recording lock): an engine that took the lock meanwhile has committed its row before this reads it (its
    lock shows at once, its row only once committed: read before, the row still named us, and the other
    engine's session was ended). The backend's pid, or None: nothing ended."""
    conn = await _connect(dsn, password)
    try:
        async with conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                RECORDING_NAMESPACE,
                lease_key(venue, account),
                timeout=LEASE_TIMEOUT_SECONDS,
            )
            return await conn.fetchval(
                f"""
                WITH lost AS MATERIALIZED (
                    SELECT l.pid FROM pg_locks l
                    JOIN monitoring.engine_leases e
                      ON e.venue = $1 AND e.account = $2 AND e.pid = $3 AND e.host = $4 AND e.started_at = $5
                    WHERE l.locktype = 'advisory' AND l.granted
                      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                      AND l.classid = {LEASE_NAMESPACE}::oid AND l.objid = hashtext($1 || '/' || $2)::oid
                      AND l.objsubid = 2 AND l.pid <> pg_backend_pid())
                SELECT pid FROM lost WHERE pg_terminate_backend(pid)
                """,
                venue,
                account,
                os.getpid(),
                socket.gethostname(),
                since,
                timeout=LEASE_TIMEOUT_SECONDS,
            )
    finally:
        await close_within(conn, within=LEASE_TIMEOUT_SECONDS)


class EngineLease:
    """Held while the engine trades. Use `acquire()`; `release()` on shutdown."""

    def __init__(self, conn: asyncpg.Connection, venue: str, account: str):
        self._conn = conn
        self.venue = venue
        self.account = account
        # The last heartbeat of the engine that held the account before (None: it never was held), read
        # before this one recorded itself: where an engine that died without stopping stopped looking.
        self.previous_heard_at: datetime | None = None
        self.previous_phase: str | None = None  # the last holder's phase at its last heartbeat
        self._hand_over = False  # `handed_over`: the next heartbeat clears the row's previous holder
        self.started_at: datetime | None = None  # when this holder took the lease first (the row says it)

    @classmethod
    async def acquire(
        cls,
        dsn: str,
        venue: str,
        account: str,
        version: str,
        password: str | None = None,
        label: str | None = None,
        phase: LeasePhase = LeasePhase.RUNNING,
        since: datetime | None = None,
        code: tuple[Sequence[str], Mapping[str, str]] | None = None,
    ) -> EngineLease:
        """`since`: when this holder first took the lease (an engine taking it again after losing it, a
        database restart, say: readers keep its start, not the moment it was taken again). `code`: the
        roots and file digests of the code this process runs (`engine.code_watch.running_code`)."""
        conn = await _connect(dsn, password)
        key = lease_key(venue, account)
        try:
            # Attempts are serialised by a transaction-scoped lock, so that an engine refused in a race reads
            # the holder row only once the winner has committed it (not a stale or missing one).
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                    RECORDING_NAMESPACE,
                    key,
                    timeout=LEASE_TIMEOUT_SECONDS,
                )
                got = await conn.fetchval(
                    "SELECT pg_try_advisory_lock($1, hashtext($2))", LEASE_NAMESPACE, key
                )
                if not got:
                    holder = await _holder(conn, venue, account)
                else:
                    # The last holder's heartbeat, or, when it never recorded what the holder before it
                    # left (its start failed first), that holder's: see `handed_over`.
                    before = await conn.fetchrow(
                        "SELECT heartbeat_at, previous_heard_at, phase FROM monitoring.engine_leases "
                        "WHERE venue = $1 AND account = $2",
                        venue,
                        account,
                    )
                    previous = (
                        None if before is None else before["previous_heard_at"] or before["heartbeat_at"]
                    )
                    # `running` at its last heartbeat and the lock free: it ended without stopping.
                    previous_phase = None if before is None else before["phase"]
                    started_at = await conn.fetchval(
                        """
                        INSERT INTO monitoring.engine_leases
                            (venue, account, pid, host, version, label, phase, previous_heard_at, started_at,
                             code_roots, code_digests)
                        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, COALESCE($9, now()), $10, $11::jsonb)
                        ON CONFLICT (venue, account) DO UPDATE
                        SET pid = EXCLUDED.pid, host = EXCLUDED.host, version = EXCLUDED.version,
                            label = EXCLUDED.label, started_at = EXCLUDED.started_at, heartbeat_at = now(),
                            phase = EXCLUDED.phase, previous_heard_at = EXCLUDED.previous_heard_at,
                            code_roots = EXCLUDED.code_roots, code_digests = EXCLUDED.code_digests
                        RETURNING started_at
                        """,
                        venue,
                        account,
                        os.getpid(),
                        socket.gethostname(),
                        version,
                        label,
                        phase.value,
                        previous,
                        since,
                        None if code is None else list(code[0]),
                        None if code is None else json.dumps(dict(code[1]), sort_keys=True),
                    )
            if not got:
                raise LeaseHeld(venue, account, holder)
        except TimeoutError:
            # No answer: its goodbye would wait as long again (asyncpg's cancel of the statement first).
            conn.terminate()
            raise DatabaseUnavailable(
                f"no answer taking the account lease within {LEASE_TIMEOUT_SECONDS:g} s"
            ) from None
        except BaseException:
            await close_within(conn, within=LEASE_TIMEOUT_SECONDS)
            raise
        lease = cls(conn, venue, account)
        lease.previous_heard_at = previous
        lease.previous_phase = previous_phase
        lease.started_at = started_at
        return lease

    def alive(self) -> bool:
        return not self._conn.is_closed()

    def drop(self) -> None:
        """Drop the connection without a word to the server (one known down answers nothing): the lock
        ends with its session once the server notices."""
        self._conn.terminate()

    def handed_over(self) -> None:
        """What the last holder left (its managed trails) is recorded: the next holder dates from this
        one's heartbeat, not the one before. Written by the next heartbeat: the lease's connection serves
        one statement at a time, and the heartbeat's task is its only user (a write of its own here met
        a heartbeat in flight: "another operation is in progress", and the start failed)."""
        self.previous_heard_at = None
        self._hand_over = True

    async def heartbeat(self, phase: LeasePhase = LeasePhase.RUNNING) -> None:
        clearing = self._hand_over
        await self._conn.execute(
            "UPDATE monitoring.engine_leases SET heartbeat_at = now(), phase = $3, "
            "previous_heard_at = CASE WHEN $4 THEN NULL ELSE previous_heard_at END "
            "WHERE venue = $1 AND account = $2",
            self.venue,
            self.account,
            phase.value,
            clearing,
            timeout=LEASE_TIMEOUT_SECONDS,
        )
        if clearing:
            self._hand_over = False

    async def say_stopping_through(self, pool: Any) -> None:
        """Its row says `stopping`, written through `pool` when its own session is gone (the lease lost
        with a database session, the engine stopping meanwhile): only while the row is still this holder's
        (its pid, host and start), never another engine's that took the account since."""
        await pool.execute(
            "UPDATE monitoring.engine_leases SET phase = $3 WHERE venue = $1 AND account = $2 "
            "AND pid = $4 AND host = $5 AND started_at = $6",
            self.venue,
            self.account,
            LeasePhase.STOPPING.value,
            os.getpid(),
            socket.gethostname(),
            self.started_at,
            timeout=LEASE_TIMEOUT_SECONDS,
        )

    async def release(self) -> None:
        """Unlock and close, each within `LEASE_TIMEOUT_SECONDS`; a server that does not answer (frozen)
        gets the connection dropped instead: the lock ends with its session once the server notices."""
        if self._conn.is_closed():
            return
        try:
            await self._conn.execute(
                "SELECT pg_advisory_unlock($1, hashtext($2))",
                LEASE_NAMESPACE,
                lease_key(self.venue, self.account),
                timeout=LEASE_TIMEOUT_SECONDS,
            )
        finally:
            try:
                await self._conn.close(timeout=LEASE_TIMEOUT_SECONDS)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                self._conn.terminate()


def lease_held_sql(venue: str, account: str) -> str:
    """An SQL condition, true while an engine holds the lease of `venue` and `account` (SQL expressions: a
    parameter, or a column such as `l.venue`): its advisory lock is granted in this database. Advisory locks
    are per database, so an engine of the same account on another database of the server is not counted."""
    return f"""EXISTS (
        SELECT 1 FROM pg_locks
        WHERE locktype = 'advisory' AND granted
          AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND classid = {LEASE_NAMESPACE}::oid AND objid = hashtext({venue} || '/' || {account})::oid
          AND objsubid = 2)"""


def engine_looks_after_sql(lease: str) -> str:
    """An SQL condition on a `monitoring.engine_leases` row (`lease`: its alias), true while its engine holds
    the lease, runs, and was heard within `LEASE_SILENT_SECONDS` (`LeaseHolder.looks_after`)."""
    return (
        f"{lease}.phase = '{LeasePhase.RUNNING.value}' "
        f"AND {lease}.heartbeat_at > now() - interval '{LEASE_SILENT_SECONDS} seconds' "
        f"AND {lease_held_sql(f'{lease}.venue', f'{lease}.account')}"
    )


async def current_holder(pool: asyncpg.Pool, venue: str, account: str) -> LeaseHolder | None:
    """Who holds the lease now (None when nobody does), for read-only watchers; one not `looks_after` (silent,
    starting, stopping) holds it but looks after nothing."""
    async with pool.acquire() as conn:
        return await holder_on(conn, venue, account)


async def holder_on(conn: asyncpg.Connection, venue: str, account: str) -> LeaseHolder | None:
    """`current_holder` read on the caller's connection (inside its transaction, its snapshot)."""
    held = await conn.fetchval(f"SELECT {lease_held_sql('$1::text', '$2::text')}", venue, account)
    return await _holder(conn, venue, account) if held else None


async def _holder(conn: asyncpg.Connection, venue: str, account: str) -> LeaseHolder | None:
    row = await conn.fetchrow(
        """
        SELECT *, GREATEST(EXTRACT(EPOCH FROM now() - heartbeat_at), 0)::float8 AS silent_seconds
        FROM monitoring.engine_leases WHERE venue = $1 AND account = $2
        """,
        venue,
        account,
    )
    if row is None:
        return None
    # Only the columns this version knows: a newer one may have added some (it migrates the database).
    return LeaseHolder(**{k: v for k, v in dict(row).items() if k in _HOLDER_FIELDS})


_HOLDER_FIELDS = frozenset(LeaseHolder.__dataclass_fields__)

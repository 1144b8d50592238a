"""Operator commands in `monitoring.commands`, for one account: queued by a sender (`tsbot close`, the
read-only dashboard), claimed and answered by the engine that trades the account.

A command is claimed at most once (`FOR UPDATE SKIP LOCKED`), only by its own account's engine, and only
before it expires; the sender withdraws what nobody took in time, so nothing is executed long after the
operator gave up waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg

from storage.database import close_within, listening_connection

NEW_COMMAND_CHANNEL = "tsbot_commands"
RESULT_CHANNEL = "tsbot_command_results"
LISTENER_SETUP_SECONDS = 5.0  # connect and LISTEN, as a whole
LISTENER_CLOSE_SECONDS = 2.0
MAX_REQUESTER_CHARS = 300
MAX_REASON_CHARS = 1000


class CommandKind(StrEnum):
    ENTRIES_PAUSE = "entries_pause"
    ENTRIES_RESUME = "entries_resume"
    PROTECT = "protect"
    CLOSE = "close"
    FLATTEN = "flatten"
    RESTART_PROTECTION = "restart_protection"


class CommandState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"  # everything it was asked worked
    PARTIAL = "partial"  # some positions did, some did not
    FAILED = "failed"
    EXPIRED = "expired"  # nobody took it in time (withdrawn by its sender)

    @property
    def finished(self) -> bool:
        return self in (CommandState.DONE, CommandState.PARTIAL, CommandState.FAILED, CommandState.EXPIRED)


@dataclass(frozen=True, slots=True)
class CommandRecord:
    id: int
    account: str
    kind: CommandKind
    args: Mapping[str, Any]
    requested_by: str
    reason: str
    created_at: datetime
    expires_at: datetime
    picked_at: datetime | None
    finished_at: datetime | None
    state: CommandState
    result: Mapping[str, Any] | None


def _command(row: Mapping[str, Any]) -> CommandRecord:
    # Only the columns this version knows: a newer one may have added some (it migrates the database).
    values = {k: v for k, v in dict(row).items() if k in CommandRecord.__dataclass_fields__}
    values["kind"] = CommandKind(values["kind"])
    values["state"] = CommandState(values["state"])
    values["args"] = values["args"] or {}
    return CommandRecord(**values)


class CommandQueue:
    """The commands of one account."""

    def __init__(self, pool: asyncpg.Pool, account: str):
        self._pool = pool
        self.account = account

    async def submit(
        self,
        kind: CommandKind,
        args: Mapping[str, Any],
        *,
        requested_by: str,
        reason: str,
        expires_in_seconds: float,
    ) -> CommandRecord:
        row = await self._pool.fetchrow(
            """
            INSERT INTO monitoring.commands (account, kind, args, requested_by, reason, expires_at)
            VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))
            RETURNING *
            """,
            self.account,
            kind.value,
            dict(args),
            requested_by[:MAX_REQUESTER_CHARS],
            reason[:MAX_REASON_CHARS],
            float(expires_in_seconds),
        )
        return _command(row)

    async def claim_next(self) -> CommandRecord | None:
        """The oldest pending command of this account that has not expired, now `running`; None if none.
        Expired ones met on the way are marked so (their sender has given up on them)."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """
                UPDATE monitoring.commands SET state = 'expired', finished_at = now(),
                    result = jsonb_build_object('ok', false, 'summary', 'expired before an engine took it')
                WHERE account = $1 AND state = 'pending' AND expires_at <= now()
                """,
                self.account,
            )
            row = await conn.fetchrow(
                """
                UPDATE monitoring.commands SET state = 'running', picked_at = now()
                WHERE id = (
                    SELECT id FROM monitoring.commands
                    WHERE account = $1 AND state = 'pending' AND expires_at > now()
                    ORDER BY id LIMIT 1
                    FOR UPDATE SKIP LOCKED
                )
                RETURNING *
                """,
                self.account,
            )
        return _command(row) if row else None

    async def finish(self, command_id: int, state: CommandState, result: Mapping[str, Any]) -> None:
        await self._pool.execute(
            """
            UPDATE monitoring.commands SET state = $3, result = $4, finished_at = now()
            WHERE id = $1 AND account = $2 AND state = 'running'
            """,
            command_id,
            self.account,
            state.value,
            dict(result),
        )

    async def fail_left_running(self, why: str) -> int:
        """Commands of this account an earlier engine took and never answered (it stopped or died)."""
        result = await self._pool.execute(
            """
            UPDATE monitoring.commands SET state = 'failed', finished_at = now(),
                result = jsonb_build_object('ok', false, 'summary', $2::text)
            WHERE account = $1 AND state = 'running'
            """,
            self.account,
            why,
        )
        return int(result.split()[-1])

    async def withdraw(self, command_id: int) -> bool:
        """Expire a command nobody has taken yet; False when an engine already took it."""
        row = await self._pool.fetchval(
            """
            UPDATE monitoring.commands SET state = 'expired', finished_at = now(),
                result = jsonb_build_object('ok', false, 'summary', 'withdrawn: no engine took it in time')
            WHERE id = $1 AND account = $2 AND state = 'pending'
            RETURNING id
            """,
            command_id,
            self.account,
        )
        return row is not None

    async def get(self, command_id: int) -> CommandRecord | None:
        row = await self._pool.fetchrow(
            "SELECT * FROM monitoring.commands WHERE id = $1 AND account = $2", command_id, self.account
        )
        return _command(row) if row else None

    async def wait_finished(
        self,
        command_id: int,
        timeout_seconds: float,
        *,
        listen_dsn: str | None = None,
        listen_password: str | None = None,
        poll_seconds: float = 0.5,
        keep_waiting: Callable[[CommandRecord], Awaitable[bool]] | None = None,
        check_every_seconds: float = 2.0,
    ) -> CommandRecord | None:
        """The command once finished (woken by NOTIFY, with a poll as the safety net), or its latest state
        when `timeout_seconds` of real time pass first, or when `keep_waiting` (asked every
        `check_every_seconds`) says no; None if it does not exist."""
        woke = asyncio.Event()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        listener: asyncpg.Connection | None = None
        if listen_dsn is not None:  # (without it, or failing, the poll alone)
            with contextlib.suppress(OSError, TimeoutError, asyncpg.PostgresError):
                listener = await listening_connection(
                    listen_dsn,
                    listen_password,
                    {RESULT_CHANNEL: lambda *_: woke.set()},
                    within=min(LISTENER_SETUP_SECONDS, timeout_seconds),
                )
        next_check = loop.time() + check_every_seconds
        try:
            while True:
                woke.clear()
                record = await self.get(command_id)
                if record is None or record.state.finished:
                    return record
                now = loop.time()
                if now >= deadline:
                    return record
                if keep_waiting is not None and now >= next_check:
                    next_check = now + check_every_seconds
                    if not await keep_waiting(record):
                        return record
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(deadline - now, poll_seconds)):
                        await woke.wait()
        finally:
            if listener is not None:
                await close_within(listener, within=LISTENER_CLOSE_SECONDS)


__all__ = [
    "NEW_COMMAND_CHANNEL",
    "RESULT_CHANNEL",
    "CommandKind",
    "CommandQueue",
    "CommandRecord",
    "CommandState",
]

"""Operator commands for a running engine, through `monitoring.commands` (storage/commands.py).

Two sides:

* `CommandRunner`, one supervised loop of the engine: claims its account's commands (woken by NOTIFY on the
  connection that already listens for signals, with a poll as the safety net), executes each through the
  same Engine methods as the dashboard's keys, writes the per-position answer into the row, and records it
  in `monitoring.events` (`command_<kind>`, with who asked and why). One command at a time, in order.
* `send_command`, for a process that does not trade (`tsbot close`, the read-only dashboard): refuses at
  once when no engine holds the account's lease, queues the command, waits for the answer, and withdraws
  it if nobody took it in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from engine.clock import Clock, wait_event
from engine.words import counted
from storage.commands import CommandKind, CommandQueue, CommandRecord, CommandState
from storage.database import DatabaseDown, is_unreachable
from storage.lease import LeaseHolder, LeasePhase, current_holder
from storage.repositories import Severity

if TYPE_CHECKING:
    from engine.engine import Engine, EntryInDoubt

log = logging.getLogger(__name__)


class ProtectionRestartRefused(Exception):
    """A protection restart (the dashboard's key, this command) that cannot be done now; the message says
    why, in one line."""


T = TypeVar("T")

_LOG_LEVELS = {Severity.INFO: logging.INFO, Severity.WARNING: logging.WARNING, Severity.ERROR: logging.ERROR}

LEFT_RUNNING = "no answer: the engine stopped, or lost its database, while executing it"
STOPPED_WHILE_RUNNING = (
    "not finished: the engine stopped while executing it; anything it had sent to the venue by then may "
    "have been executed (see `tsbot status`), nothing more is sent for it"
)
POLL_SECONDS = 1.0  # while LISTEN is down, a command waits at most this long
LISTENING_POLL_SECONDS = 5.0  # while it is up, the poll is only the safety net
STOPPED_ANSWER_SECONDS = 2.0  # the stop's answer to a command it interrupts, at most
HOLDER_CHECK_SECONDS = 2.0  # how often a waiting sender checks that the engine is still there


def requester_identity() -> str:
    """Who is asking: user@host/pid (what `tsbot status` shows as who paused entries)."""
    try:
        user = getpass.getuser()
    except Exception:  # no name for this uid (a bare container): the uid says it
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}/{os.getpid()}"


@dataclass(frozen=True, slots=True)
class PositionOutcome:
    symbol: str
    ok: bool
    detail: str
    position_id: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {"position_id": self.position_id, "symbol": self.symbol, "ok": self.ok, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    ok: bool
    summary: str
    positions: tuple[PositionOutcome, ...] = ()
    failed_inside: bool = False  # our own error halfway (some positions may have been acted on): an error

    @property
    def severity(self) -> Severity:
        """How it is logged and recorded: an operator's command done is no warning (routine commands made
        the log panel's "18 warnings in the last hour" an operator's own doing); one refused before it
        acted on anything (no position there, the engine not running) is a warning; one that failed on a
        position, on the venue's word, an error."""
        if self.ok:
            return Severity.INFO
        if self.failed_inside or any(not p.ok for p in self.positions):
            return Severity.ERROR
        return Severity.WARNING

    @property
    def state(self) -> CommandState:
        if self.ok:
            return CommandState.DONE
        return CommandState.PARTIAL if any(p.ok for p in self.positions) else CommandState.FAILED

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "summary": self.summary, "positions": [p.as_json() for p in self.positions]}


class CommandRunner:
    """The engine's side: executes its account's commands one at a time."""

    def __init__(
        self,
        engine: Engine,
        queue: CommandQueue,
        clock: Clock,
        *,
        listening: Callable[[], bool] = lambda: False,
        poll_seconds: float = POLL_SECONDS,
    ):
        self._engine = engine
        self._queue = queue
        self._clock = clock
        self._listening = listening
        self._poll = poll_seconds
        self._wake = asyncio.Event()
        self.executed = 0

    def notified(self, *args: object) -> None:
        """NOTIFY tsbot_commands (payload: the account): wake when it is ours."""
        payload = args[3] if len(args) >= 4 else None
        if payload is None or payload == self._queue.account:
            self._wake.set()

    async def run(self) -> None:
        """Until cancelled. An unreachable database is `DatabaseDown` (the supervisor waits for it quietly);
        a command taken and not answered then is failed when the loop starts again."""
        left = await _reachable(self._queue.fail_left_running(LEFT_RUNNING))
        if left:
            log.warning("%s taken earlier never answered: marked failed", counted(left, "command"))
        while True:
            self._wake.clear()  # before claiming: a NOTIFY during the claim wakes the next wait
            command = await _reachable(self._queue.claim_next())
            if command is None:
                await self._wait()
                continue
            await self._execute(command)

    async def _wait(self) -> None:
        interval = max(self._poll, LISTENING_POLL_SECONDS) if self._listening() else self._poll
        await wait_event(self._clock, self._wake, interval)

    async def _execute(self, command: CommandRecord) -> None:
        who = command.requested_by
        # An operator's routine request is no alarm (it filled the dashboard's warning count): what comes of
        # it says at its own level when it is refused or fails.
        log.info(
            "command #%d %s%s from %s%s",
            command.id,
            command.kind.value,
            "".join(f" {key}={value}" for key, value in command.args.items()),
            who,
            f": {command.reason}" if command.reason else "",
        )
        try:
            outcome = await self._dispatch(command)
        except asyncio.CancelledError:  # the engine stops: its answer now, not `running` until a next start
            await self._answer_stopped(command)
            raise
        except Exception as exc:  # a bug: the sender is told, the loop goes on
            log.exception("command #%d %s failed", command.id, command.kind.value)
            outcome = CommandOutcome(
                False, f"internal error: {type(exc).__name__}: {exc}", failed_inside=True
            )
        try:
            await _reachable(self._queue.finish(command.id, outcome.state, outcome.as_json()))
        except asyncio.CancelledError:
            # The engine stops while the answer is written (a stop lets a close under way end, then stops
            # this loop): written still, or the command stayed `running` with its outcome known.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(STOPPED_ANSWER_SECONDS):
                    await self._queue.finish(command.id, outcome.state, outcome.as_json())
            raise
        self.executed += 1
        log.log(
            _LOG_LEVELS[outcome.severity],
            "command #%d %s: %s",
            command.id,
            command.kind.value,
            outcome.summary,
        )
        store = self._engine.store
        assert store is not None
        await store.record_event(
            outcome.severity,
            f"command_{command.kind.value}",
            f"{command.kind.value.replace('_', ' ')} by {who}"
            + (f" ({command.reason})" if command.reason else "")
            + f": {outcome.summary}",
            symbol=command.args.get("symbol") if isinstance(command.args.get("symbol"), str) else None,
            data={
                "command_id": command.id,
                "requested_by": who,
                "reason": command.reason,
                "args": dict(command.args),
                "state": outcome.state.value,
                "positions": [p.as_json() for p in outcome.positions],
            },
        )

    async def _answer_stopped(self, command: CommandRecord) -> None:
        """Failed with STOPPED_WHILE_RUNNING, within STOPPED_ANSWER_SECONDS (the database may be what is
        failing: a next start then answers it as left running)."""
        outcome = CommandOutcome(False, STOPPED_WHILE_RUNNING, failed_inside=True)
        try:
            async with asyncio.timeout(STOPPED_ANSWER_SECONDS):
                await self._queue.finish(command.id, outcome.state, outcome.as_json())
        except Exception as exc:
            log.warning(
                "command #%d: its answer at the stop not written (%s)", command.id, type(exc).__name__
            )
            return
        log.warning("command #%d %s: %s", command.id, command.kind.value, STOPPED_WHILE_RUNNING)

    async def _dispatch(self, command: CommandRecord) -> CommandOutcome:
        engine = self._engine
        if engine.manager is None or engine.state.value != "running":
            return CommandOutcome(False, f"the engine is {engine.state.value}; try again once it runs")
        kind = command.kind
        if kind is CommandKind.ENTRIES_PAUSE:
            engine.pause_entries(by="operator", reason=command.reason, who=command.requested_by)
            return CommandOutcome(
                True, "entries paused: new signals are rejected; open positions stay protected"
            )
        if kind is CommandKind.ENTRIES_RESUME:
            ok, message = engine.resume_entries(who=command.requested_by, reason=command.reason)
            return CommandOutcome(ok, message)
        if kind is CommandKind.PROTECT:
            return await self._protect(command.args.get("symbol"))
        if kind is CommandKind.CLOSE:
            return await self._close(str(command.args.get("symbol", "")))
        if kind is CommandKind.FLATTEN:
            return await self._flatten(command)
        if kind is CommandKind.RESTART_PROTECTION:
            try:
                report = await engine.restart_protection()
            except ProtectionRestartRefused as exc:
                return CommandOutcome(False, str(exc))
            failed = tuple(
                PositionOutcome(s, False, "uncovered after the restart") for s in report.failed_symbols
            )
            return CommandOutcome(report.failed == 0, report.describe(), failed)
        return CommandOutcome(False, f"unknown command {kind.value}")

    async def _protect(self, symbol: Any) -> CommandOutcome:
        engine = self._engine
        manager = engine.manager
        assert manager is not None
        plan = engine.plan_reprotect()
        if isinstance(symbol, str):
            guard = manager.by_symbol.get(symbol)
            if guard is None:
                return CommandOutcome(False, f"no open position on {symbol}")
            plan = [item for item in plan if item.symbol == symbol]
            if not plan:
                detail = "covered: both stops confirmed" if guard.covered else "being protected now"
                return CommandOutcome(
                    True,
                    f"{symbol}: nothing to do",
                    (PositionOutcome(symbol, True, detail, guard.position_id),),
                )
        if not plan:
            doubts = engine.entries_in_doubt()
            if doubts and not isinstance(
                symbol, str
            ):  # not "every position is covered": they may be positions
                return CommandOutcome(
                    False,
                    f"nothing to send: {counted(len(doubts), 'entry', 'entries')} of unknown outcome "
                    f"{'is' if len(doubts) == 1 else 'are'} being asked for by {'its id' if len(doubts) == 1 else 'their ids'} "
                    "(counted uncovered; protected once the venue shows "
                    f"{'it' if len(doubts) == 1 else 'them'})",
                    tuple(_doubt_outcome(d) for d in doubts),
                )
            protecting = sum(1 for g in manager.guards.values() if not g.covered)
            extra = f" ({protecting} inside their grace period are being protected)" if protecting else ""
            return CommandOutcome(True, f"nothing to protect: every position is covered{extra}")
        results = await engine.reprotect_uncovered(plan)
        outcomes = tuple(PositionOutcome(r.symbol, r.covered, r.detail, r.position_id) for r in results)
        covered = sum(r.covered for r in results)
        return CommandOutcome(covered == len(results), f"{covered}/{len(results)} covered", outcomes)

    async def _close(self, symbol: str) -> CommandOutcome:
        manager = self._engine.manager
        assert manager is not None
        guard = manager.by_symbol.get(symbol)
        if guard is None:
            return CommandOutcome(False, f"no open position on {symbol}")
        outcome = await self._close_one(guard.position_id, symbol)
        return CommandOutcome(outcome.ok, f"{symbol}: {outcome.detail}", (outcome,))

    async def _close_one(self, position_id: int, symbol: str) -> PositionOutcome:
        engine = self._engine
        manager = engine.manager
        assert manager is not None
        guard = manager.guards.get(position_id)
        closed = await engine.close_position(position_id)
        if not closed:
            why = (guard.last_error if guard is not None else None) or "the venue did not confirm the close"
            return PositionOutcome(
                symbol, False, f"NOT closed ({why}); the position stays protected", position_id
            )
        # The close cancels both stops; one whose cancel failed is cancelled again by the manager. The
        # answer waits for that (bounded) so it says what the venue holds.
        budget = float(engine.settings.protection.call_timeout_seconds)
        how = await self._how_closed(position_id)
        if await manager.leftovers_cancelled(symbol, 2 * budget):
            return PositionOutcome(symbol, True, f"{how}; its stops are cancelled", position_id)
        return PositionOutcome(
            symbol,
            False,
            f"{how}, but a stop of it is still being cancelled (retrying)",
            position_id,
        )

    async def _how_closed(self, position_id: int) -> str:
        """ "closed at market", or, when the position ended otherwise first (its stop filled while the close
        waited its turn), how it did, as recorded."""
        store = self._engine.store
        try:
            record = await store.position(position_id) if store is not None else None
        except Exception as exc:  # (the database down: the close went, its record is journaled)
            log.warning("position %s: how it closed is not readable now (%s)", position_id, exc)
            return "closed"
        ended = {
            "stop_loss": "by its hard stop",
            "trailing_stop": "by its trailing stop",
            "closed_on_exchange": "on the venue",
        }
        reason = record.exit_reason if record is not None else None
        if reason not in ended:
            return "closed at market"
        return f"closed {ended[reason]} before the close went"

    async def _flatten(self, command: CommandRecord) -> CommandOutcome:
        """Entries pause first (else the next wave reopens what is closed), then every position closes at
        once; a position whose entry was in flight meanwhile is closed in a further round."""
        engine = self._engine
        engine.pause_entries(
            by="operator",
            reason=f"flatten{': ' + command.reason if command.reason else ''}",
            who=command.requested_by,
        )
        # Mid protection restart there is no guard to close: the restart hands over first (before, "0/0
        # closed, ok" while the venue held every position).
        budget = float(engine.settings.protection.call_timeout_seconds)
        if not await engine.protection_in_place(3 * budget):
            return CommandOutcome(
                False,
                "nothing closed: a protection restart is under way and has not handed over yet; entries "
                "paused (ask again once it has)",
            )
        manager = engine.manager
        assert manager is not None
        outcomes: dict[int, PositionOutcome] = {}

        def open_now() -> list[tuple[int, str]]:
            return [
                (g.position_id, g.symbol)
                for g in list(manager.guards.values())
                if g.position_id not in outcomes
            ]

        for _round in range(3):
            todo = open_now()
            # A wave under way: its entries already sent get their answer (those not sent yet are not sent),
            # and what they opened is closed too; before, "all closed" came while they were opening.
            if not todo and await engine.wave_under_way_settled():
                todo = open_now()
            if not todo:
                break
            done = await asyncio.gather(*(self._close_one(pid, symbol) for pid, symbol in todo))
            outcomes.update((o.position_id or 0, o) for o in done)
            if any(not o.ok for o in done):
                break  # what failed stays open and protected; the operator decides what next
        # An entry of unknown outcome may be a position: not closed (nothing says it exists), not "all closed".
        doubts = tuple(_doubt_outcome(d) for d in engine.entries_in_doubt())
        results = tuple(sorted([*outcomes.values(), *doubts], key=lambda o: o.symbol))
        closed = sum(o.ok for o in results)
        left = len(manager.guards) + len(doubts)
        ok = closed == len(results) and left == 0
        summary = f"{closed}/{len(results)} closed; entries paused (resume with `tsbot entries resume`)"
        if left:
            summary += f"; {counted(left, 'position')} still open"
        return CommandOutcome(ok, summary, results)


def _doubt_outcome(doubt: EntryInDoubt) -> PositionOutcome:
    return PositionOutcome(
        doubt.symbol,
        False,
        "entry of unknown outcome: not closed (the venue has not shown it yet); protected once it does",
        doubt.position_id,
    )


async def _reachable(awaitable: Awaitable[T]) -> T:
    try:
        return await awaitable
    except Exception as exc:
        if is_unreachable(exc):
            raise DatabaseDown(f"commands: {type(exc).__name__}: {exc}") from exc
        raise


# --- the sender's side --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandAnswer:
    """What became of a command: `record` once sent; `no_engine` when no engine trades the account (nothing
    was executed); `problem` says why there is no final answer."""

    record: CommandRecord | None
    holder: LeaseHolder | None = None
    no_engine: bool = False
    problem: str = ""
    positions: tuple[PositionOutcome, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.record is not None and self.record.state is CommandState.DONE

    @property
    def summary(self) -> str:
        if self.problem:
            return self.problem
        result = self.record.result if self.record is not None else None
        return str((result or {}).get("summary", ""))


def positions_of(record: CommandRecord | None) -> tuple[PositionOutcome, ...]:
    result = record.result if record is not None else None
    items: Sequence[Mapping[str, Any]] = (result or {}).get("positions") or ()
    return tuple(
        PositionOutcome(str(p.get("symbol")), bool(p.get("ok")), str(p.get("detail")), p.get("position_id"))
        for p in items
    )


def not_taken(holder: LeaseHolder | None, account: str) -> CommandAnswer | None:
    """The answer, at once, when no engine would take a command for `account`: none holds it, or the one
    holding it is silent (not heard for 30 s: hung, frozen, its host gone) or stopping. None: send it."""
    if holder is None:
        return CommandAnswer(
            None, no_engine=True, problem=f"no engine is running for account {account}; nothing was sent"
        )
    if holder.silent or holder.phase == LeasePhase.STOPPING:  # one starting takes it once it runs
        return CommandAnswer(
            None,
            holder,
            no_engine=True,
            problem=f"the engine holding account {account} {holder.not_looking_after()}; nothing was sent",
        )
    return None


async def send_command(
    pool: asyncpg.Pool,
    *,
    venue: str,
    account: str,
    kind: CommandKind,
    args: Mapping[str, Any] | None = None,
    reason: str = "",
    wait_seconds: float = 30.0,
    requested_by: str | None = None,
    listen_dsn: str | None = None,
    listen_password: str | None = None,
) -> CommandAnswer:
    """Queue a command for the engine that trades `account` and wait (up to `wait_seconds`) for its answer."""
    try:
        holder = await current_holder(pool, venue, account)
    except Exception as exc:
        if not is_unreachable(exc):
            raise
        return CommandAnswer(
            None,
            problem=f"the database stopped answering ({type(exc).__name__}): nothing was sent to the engine",
        )
    refused = not_taken(holder, account)
    if refused is not None:
        return refused
    queue = CommandQueue(pool, account)
    try:
        record = await queue.submit(
            kind,
            args or {},
            requested_by=requested_by or requester_identity(),
            reason=reason,
            expires_in_seconds=wait_seconds,
        )
    except Exception as exc:
        if not is_unreachable(exc):
            raise
        return CommandAnswer(
            None,
            holder,
            problem=f"the database stopped answering while the command was being recorded ({type(exc).__name__}): "
            f"it may have been recorded, and then the engine may carry it out within {wait_seconds:g}s if the "
            "database comes back by then (see `tsbot status` and monitoring.commands)",
        )

    async def engine_still_there(latest: CommandRecord) -> bool:
        return latest.state is not CommandState.PENDING or (
            await current_holder(pool, venue, account) is not None
        )

    try:
        latest = await queue.wait_finished(
            record.id,
            wait_seconds,
            listen_dsn=listen_dsn,
            listen_password=listen_password,
            keep_waiting=engine_still_there,
            check_every_seconds=HOLDER_CHECK_SECONDS,
        )
    except Exception as exc:
        if not is_unreachable(exc):
            raise
        return _lost_after_recording(record, holder, exc)
    try:
        return await _settled(queue, record, latest, holder, pool, venue, account, wait_seconds)
    except Exception as exc:
        if not is_unreachable(exc):
            raise
        return _lost_after_recording(record, holder, exc)


def _lost_after_recording(
    record: CommandRecord, holder: LeaseHolder | None, exc: BaseException
) -> CommandAnswer:
    """Recorded, then the database went away: the command can be neither followed nor withdrawn, and the
    engine may have taken it, or still take it until it expires. It was said "internal error", and an
    operator's flatten then closed the whole book 26 s later (an operator's drill)."""
    log.info("command #%d: the database stopped answering", record.id, exc_info=exc)  # (the file only)
    expiry = record.expires_at.astimezone(UTC).strftime("%H:%M:%S UTC")
    return CommandAnswer(
        record,
        holder,
        problem=f"command #{record.id} was recorded, then the database stopped answering ({type(exc).__name__}); "
        f"it cannot be withdrawn: the engine may have taken it already, or may still take it until {expiry} if "
        "the database is back by then (see `tsbot status` and monitoring.commands)",
    )


async def _settled(
    queue: CommandQueue,
    record: CommandRecord,
    latest: CommandRecord | None,
    holder: LeaseHolder | None,
    pool: asyncpg.Pool,
    venue: str,
    account: str,
    wait_seconds: float,
) -> CommandAnswer:
    """What became of a recorded command once its wait ended: finished, withdrawn, or taken and unanswered."""
    if (
        latest is not None
        and latest.state is CommandState.PENDING
        and await current_holder(pool, venue, account) is None
        and await queue.withdraw(record.id)
    ):
        return CommandAnswer(
            await queue.get(record.id),
            holder,
            no_engine=True,
            problem=f"the engine for account {account} stopped before it took command #{record.id}; "
            "it was withdrawn, nothing was done",
        )
    if latest is not None and latest.state.finished:
        return CommandAnswer(latest, holder, positions=positions_of(latest))
    with contextlib.suppress(asyncpg.PostgresError, OSError):
        if await queue.withdraw(record.id):
            # Why, where the lease says (a start waiting out a ban: "did not take command" alone told an
            # operator nothing; an operator).
            why = ""
            if holder is not None and not holder.silent and holder.phase != LeasePhase.RUNNING:
                why = f": it is {holder.phase}" + (
                    " (a start waits for the venue's first answers, a ban's end included)"
                    if holder.phase == LeasePhase.STARTING
                    else ""
                )
            return CommandAnswer(
                await queue.get(record.id),
                holder,
                problem=f"the engine ({holder.describe()}) did not take command #{record.id} within "
                f"{wait_seconds:g}s{why}; it was withdrawn, nothing was done",
            )
    return CommandAnswer(
        latest,
        holder,
        problem=f"the engine took command #{record.id} but has not answered within {wait_seconds:g}s; it may "
        "still finish (see `tsbot status` and monitoring.events)",
    )


__all__ = [
    "CommandAnswer",
    "CommandOutcome",
    "CommandRunner",
    "PositionOutcome",
    "positions_of",
    "requester_identity",
    "send_command",
]

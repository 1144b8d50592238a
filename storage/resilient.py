"""The Store the engine, its guards and its reconciler use: protection goes on when PostgreSQL is away.

Every protective order is recorded before it is sent. With the database unreachable that rule used to stop
protection altogether (a lost stop was not replaced: its guard could not record the replacement). Here the
writes of the protection path go to a local write-ahead journal (`storage.journal`) when the database cannot
take them, and the caller proceeds as if they were written:

    record_order, set_order_status, set_order_statuses_many, set_protection_facts_many, save_trailing_state,
    close_position, set_position_status, set_position_quantity, record_event, and — so that an entry whose
    fill arrives during an outage is protected at once and its wave accounted for — record_fill,
    finish_signal and finish_wave; set_entries_control (a breaker pause during an outage persists),
    disarm_managed_trails (an engine stopping during an outage) and record_coverage_sample (the coverage
    series has no hole where the database was). The uncovered spans (monitoring.uncovered_spans) are written
    by the facts and close statements themselves, so they are journaled with them.

"Cannot take" means unreachable (`storage.database.UNREACHABLE_ERRORS`: refused, reset, no answer within
`write_timeout_seconds`, the server shutting down or starting up). A constraint violation or any other SQL
error is a bug and is raised as before. Once one write is journaled, every covered write goes to the journal
until it has been replayed, so no write overtakes an earlier one.

Reads the guards and the reconciler make on that path answer from memory while writes are journaled:
`order_by_client_id` from the orders this process recorded, changed or read (restored at start-up included);
`orders_for_position` (`live_orders_for_position` with it) lists those of the position in the statuses asked
for (those that may be live, or filled). An order only the database knows
(one this process never saw) is not found; the reconciler then looks at the guard's current orders only,
which is all it needs to find a filled stop. Every other query (entries, signals, health, the dashboard)
fails at once with `DatabaseDown` while the database is known to be away, and waits for the journal to be
replayed before it runs once it is back (nothing written directly overtakes a journaled write).

Replay (`replay_journal`) writes the entries in order, each safe to repeat: `record_order` is ON CONFLICT DO
NOTHING; status, facts, trailing-state, close and quantity writes set absolute values (COALESCE keeps the
first `closed_at` / `protected_at`, which carry the journaled time); events carry a `write_id` and their
time, and one already there is not added again. So a replay interrupted by a crash and run again changes
nothing, and nothing is lost or duplicated. A write the database refuses at replay (a bug) is logged at
ERROR and kept in `<journal>.rejected`; the rest goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg

from engine.words import counted
from storage.database import DatabaseDown, error_words, is_unreachable
from storage.journal import JournalContents, JournalEntry, WriteJournal, write_private
from storage.repositories import (
    DEFAULT_ACCOUNT,
    CoverageSample,
    EntriesControl,
    HealthRow,
    OrderPurpose,
    OrderRecord,
    OrderRecordStatus,
    OrderStatusRow,
    PositionRecord,
    PositionStatus,
    ProtectionFactsRow,
    Severity,
    SignalStatus,
    Store,
    TrailingStateRecord,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_LIVE_POSITION_STATUSES = (PositionStatus.PENDING_PROTECTION, PositionStatus.ACTIVE)


# How long a protection-path write may wait for the database before it is journaled instead. A hung server
# (frozen, not refusing) otherwise holds every guard's write-ahead record, and so its stops, for this long:
# well inside the 5 s grace period, well above a loaded server's slowest ordinary write.
WRITE_TIMEOUT_SECONDS = 2.0


def _forget_abandoned(abandoned: set[asyncio.Future[Any]]) -> Callable[[asyncio.Future[Any]], None]:
    def done(future: asyncio.Future[Any]) -> None:
        abandoned.discard(future)
        if not future.cancelled():
            future.exception()  # retrieved: an abandoned statement's failure was already handled

    return done


def _now() -> datetime:
    # A stand-in for the server's now(): rows written later from the journal carry the time of the write.
    return datetime.now(UTC)


class ResilientStore(Store):
    """A `Store` whose protection-path writes survive a database outage (see the module docstring)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        account: str = DEFAULT_ACCOUNT,
        *,
        write_timeout_seconds: float = WRITE_TIMEOUT_SECONDS,
        remembered: int = 20_000,
    ):
        self._direct = Store(pool, account)  # what a replay writes through: no journal, no gate
        super().__init__(_GuardedPool(pool, self), account)  # type: ignore[arg-type]
        self._write_timeout = write_timeout_seconds
        self._remembered = remembered
        self._journal: WriteJournal | None = None
        self._database = ""  # installation token the journal's entries are for
        self._down = False
        self._down_event = asyncio.Event()
        self._up_event = asyncio.Event()
        self._up_event.set()
        self.suspected = asyncio.Event()  # a write found the database unreachable: look now
        self.last_error: str | None = None
        self._applied = 0  # journal entries already replayed (from the start of the journal)
        # When the newest entry a replay wrote was made (its writer's clock): a journal left by a run that
        # died wrote on until then.
        self.newest_replayed_at: datetime | None = None
        self._replay_task: asyncio.Task[int] | None = None
        self._closed = False  # the engine stopped: nothing may be written in its name any more
        self._orders: OrderedDict[str, OrderRecord] = OrderedDict()
        self._positions: OrderedDict[int, PositionRecord] = OrderedDict()
        self.journaled: Counter[str] = Counter()  # writes journaled by this process, by operation
        self.journaled_order_ids: set[str] = set()  # orders recorded through the journal
        self.replayed_writes = 0
        self.rejected_writes = 0
        self._abandoned: set[asyncio.Future[Any]] = set()  # statements given up on, still being cancelled

    # --- the journal ---------------------------------------------------------------------------------

    def attach_journal(self, journal: WriteJournal, database: str) -> JournalContents:
        """Journal to `journal` from now on, for the database whose installation token is `database`.
        Loads what an earlier process left there (replay it with `replay_journal`)."""
        contents = journal.load()
        foreign = [e for e in contents.entries if e.database != database]
        if foreign:
            aside = journal.path.with_name(f"{journal.path.name}.other-database-{int(_now().timestamp())}")
            write_private(aside, journal.path.read_bytes())
            log.error(
                "journal %s: %s written for another database (not %s), not replayed here: kept in %s",
                journal.path,
                counted(len(foreign), "entry", "entries"),
                database,
                aside,
            )
        self._journal = journal
        self._database = database
        return contents

    @property
    def journal_path(self) -> str | None:
        return str(self._journal.path) if self._journal is not None else None

    @property
    def journal_depth(self) -> int:
        """Writes waiting in the journal for the database."""
        return 0 if self._journal is None else len(self._journal) - self._applied

    @property
    def has_journal(self) -> bool:
        """The journal holds writes (replayed or not) that a replay has yet to finish with."""
        return self._journal is not None and len(self._journal) > 0

    @property
    def down(self) -> bool:
        """The database is known to be unreachable (said by the watch, undone by a successful replay)."""
        return self._down

    def mark_down(self, reason: str) -> None:
        """The database is unreachable: covered writes go to the journal at once, other queries fail at
        once (a write already waiting for it gives up and is journaled)."""
        self.last_error = reason
        if not self._down:
            self._down = True
            self._down_event.set()
            self._up_event.clear()

    def _mark_up(self) -> None:
        if self._down:
            self._down = False
            self._down_event.clear()
            self._up_event.set()

    async def wait_up(self) -> None:
        await self._up_event.wait()

    def describe_outage(self) -> str:
        return f"the database is unreachable ({self.last_error or 'no answer'})"

    async def replay_journal(self) -> int:
        """Write every journaled entry into the database, in order, then remove the journal; returns how
        many were replayed. One replay at a time (concurrent callers share it). Raises `DatabaseDown` if
        the database is still unreachable (what was replayed stays replayed)."""
        if self._journal is None:
            self._mark_up()
            return 0
        task = self._replay_task
        if task is None:
            task = self._replay_task = asyncio.create_task(self._replay(), name="journal-replay")
            task.add_done_callback(self._replay_done)
        return await asyncio.shield(task)

    def _replay_done(self, task: asyncio.Task[int]) -> None:
        self._replay_task = None
        if not task.cancelled():
            task.exception()  # retrieved here; every caller sees it through its own await

    async def close(self) -> None:
        """Stop using the journal (its entries, if any, stay on disk for the next start). A covered write
        after this raises `DatabaseDown` instead of being journaled for a run that has ended."""
        self._closed = True
        task = self._replay_task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._journal is not None:
            await self._journal.close()

    async def _replay(self) -> int:
        journal = self._journal
        assert journal is not None
        replayed = 0
        while True:
            while self._applied < len(journal):
                replayed += await self._apply(journal.entry(self._applied))
                self._applied += 1
            await journal.wait_durable()
            # Appends are written before their first await: with nothing new now, nothing is in between.
            if self._applied == len(journal):
                if len(journal):
                    journal.clear()
                self._applied = 0
                break
        self.replayed_writes += replayed
        self._mark_up()
        return replayed

    async def _apply(self, entry: JournalEntry) -> bool:
        """Write `entry` into the database: True when it was, False when it changed nothing (another
        database's, no such row) or the database refused it (kept aside)."""
        if entry.database != self._database:
            return False  # kept aside at attach time
        replay = _REPLAY.get(entry.op)
        try:
            if replay is None:
                raise ValueError(f"unknown journal operation {entry.op!r}")
            async with asyncio.timeout(self._write_timeout):
                await replay(self._direct, entry)
            self.newest_replayed_at = max(self.newest_replayed_at or entry.at, entry.at)
        except LookupError:
            return False  # no such row: the write would have changed nothing then either
        except Exception as exc:
            if is_unreachable(exc):
                self._note_unreachable(exc)
                raise DatabaseDown(self.describe_outage()) from exc
            self._reject(entry, exc)
            return False
        return True

    def _reject(self, entry: JournalEntry, exc: Exception) -> None:
        self.rejected_writes += 1
        assert self._journal is not None
        rejected = self._journal.path.with_name(self._journal.path.name + ".rejected")
        write_private(rejected, entry.line(), append=True)
        log.error(
            "journal: %s write #%d from %s refused by the database at replay (%s: %s); kept in %s",
            entry.op,
            entry.seq,
            entry.at.isoformat(timespec="seconds"),
            type(exc).__name__,
            str(exc)[:200],
            rejected,
        )

    # --- how a covered write is made -----------------------------------------------------------------

    def _journaling(self) -> bool:
        """Covered writes go to the journal: the database is down, or the journal holds writes (until a
        replay has removed it, even those already replayed: a crash before the removal replays them again,
        and must not overwrite a newer direct write)."""
        return self._journal is not None and (self._down or len(self._journal) > 0)

    async def _try_live(self, live: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
        """(True, result) when the database took it; (False, None) when it must be journaled."""
        if self._closed:
            raise DatabaseDown("the store is closed: the engine stopped")
        if self._journal is None:
            return True, await live()
        if self._journaling() and not await self._replayed_in_time():
            return False, None
        try:
            return True, await self._attempt(live(), self._write_timeout)
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            self._note_unreachable(exc)
            return False, None

    async def _replayed_in_time(self) -> bool:
        """While a replay runs against a database that answers, a covered write waits for it (as long as a
        write may take anyway) and then goes straight to the database. Appending instead would let writers
        that keep writing outrun a replay made one statement at a time, and the database would never count
        as back. False: still journaling (down, no replay running, or the replay took too long)."""
        task = self._replay_task
        if task is None or self._down:
            return False
        declared = asyncio.ensure_future(self._down_event.wait())
        try:
            await asyncio.wait(
                {task, declared}, timeout=self._write_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            declared.cancel()
            await asyncio.gather(declared, return_exceptions=True)
        return not self._journaling()

    async def _attempt(self, work: Awaitable[T], limit_seconds: float | None) -> T:
        """Await `work`, giving up when the database is declared down meanwhile or after `limit_seconds`."""
        task = asyncio.ensure_future(work)
        declared = asyncio.ensure_future(self._down_event.wait())
        try:
            await asyncio.wait({task, declared}, timeout=limit_seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            declared.cancel()
            if not task.done():
                # Cancelled, but not waited for: cancelling a statement asks the server to cancel it, and a
                # frozen server never answers — waiting here held every write (and the stops behind them)
                # for the whole freeze. The statement ends when the server answers or its connection dies.
                task.cancel()
                self._abandoned.add(task)
                task.add_done_callback(_forget_abandoned(self._abandoned))
            elif not task.cancelled():
                # Retrieved here as well: a caller cancelled as the statement failed leaves by the exception
                # below and never reads it ("Task exception was never retrieved", seen in a database
                # outage test). The result path still raises it.
                task.exception()
            await asyncio.gather(declared, return_exceptions=True)
        if not task.done() or task.cancelled():
            if self._down:
                raise DatabaseDown(self.describe_outage())
            raise TimeoutError(f"no answer from the database within {limit_seconds:g}s")
        return task.result()

    def _note_unreachable(self, exc: BaseException) -> None:
        self.last_error = error_words(exc)[:200]
        self.suspected.set()

    async def _append(self, op: str, args: dict[str, Any]) -> JournalEntry:
        assert self._journal is not None
        entry = await self._journal.append(op, args, database=self._database, at=_now())
        self.journaled[op] += 1
        self.suspected.set()  # whoever watches the database replays it once it answers
        return entry

    async def _ready_for_direct(self) -> None:
        """Before a query that is not covered: refuse at once while the database is down; replay first
        while writes await replay."""
        if self._down:
            raise DatabaseDown(self.describe_outage())
        if self._journal is not None and len(self._journal) > 0:
            await self.replay_journal()

    # --- covered writes ------------------------------------------------------------------------------

    async def record_order(
        self,
        *,
        client_order_id: str,
        purpose: OrderPurpose,
        side: str,
        type: str,
        quantity: Decimal,
        position_id: int | None = None,
        trigger_price: Decimal | None = None,
        activation_price: Decimal | None = None,
        callback_percent: Decimal | None = None,
        status: OrderRecordStatus = OrderRecordStatus.PENDING,
        created_at: datetime | None = None,
    ) -> OrderRecord:
        kwargs: dict[str, Any] = {
            "client_order_id": client_order_id,
            "purpose": purpose,
            "side": side,
            "type": type,
            "quantity": quantity,
            "position_id": position_id,
            "trigger_price": trigger_price,
            "activation_price": activation_price,
            "callback_percent": callback_percent,
            "status": status,
            "created_at": created_at,
        }
        ok, record = await self._try_live(lambda: Store.record_order(self, **kwargs))
        if ok:
            assert record is not None
            return self._remember_order(record)
        entry = await self._append("record_order", _encode(kwargs))
        self.journaled_order_ids.add(client_order_id)
        known = self._orders.get(client_order_id)
        if known is not None:
            return known  # the first intent stands, as in the database
        return self._remember_order(
            OrderRecord(
                id=0,
                client_order_id=client_order_id,
                exchange_order_id=None,
                position_id=position_id,
                purpose=purpose,
                side=side,
                type=type,
                quantity=quantity,
                trigger_price=trigger_price,
                activation_price=activation_price,
                callback_percent=callback_percent,
                status=status,
                error=None,
                created_at=created_at or entry.at,
                updated_at=entry.at,
            )
        )

    async def set_order_status(
        self,
        client_order_id: str,
        status: OrderRecordStatus,
        *,
        exchange_order_id: str | None = None,
        error: str | None = None,
        trail_distance: Decimal | None = None,
    ) -> OrderRecord | None:  # type: ignore[override]
        """As `Store.set_order_status`; while the database is unreachable the write is journaled, and an
        order this process no longer remembers (more than `remembered` orders since it last touched it) gives
        None: its row is updated at replay. Not a missing row: no write of a guard or a reconcile pass may
        fail for an outage."""
        ok, record = await self._try_live(
            lambda: Store.set_order_status(
                self,
                client_order_id,
                status,
                exchange_order_id=exchange_order_id,
                error=error,
                trail_distance=trail_distance,
            )
        )
        if ok:
            assert record is not None
            return self._remember_order(record)
        row = OrderStatusRow(client_order_id, status, exchange_order_id, error, trail_distance)
        entry = await self._append("set_order_status", _encode_status_row(row))
        known = self._orders.get(client_order_id)
        if known is None:  # (applied at replay if the row exists there)
            return None
        return self._remember_order(_order_with_status(known, row, entry.at))

    async def set_order_statuses_many(self, updates: Sequence[OrderStatusRow]) -> None:
        if not updates:
            return
        ok, _ = await self._try_live(lambda: Store.set_order_statuses_many(self, updates))
        at = _now()
        if not ok:
            entry = await self._append(
                "set_order_statuses_many", {"rows": [_encode_status_row(u) for u in updates]}
            )
            at = entry.at
        for update in updates:
            known = self._orders.get(update.client_order_id)
            if known is not None:
                self._remember_order(_order_with_status(known, update, at))

    async def set_protection_facts_many(
        self, facts: Sequence[ProtectionFactsRow], *, at: datetime | None = None
    ) -> dict[int, PositionStatus]:
        if not facts:
            return {}
        ok, statuses = await self._try_live(lambda: Store.set_protection_facts_many(self, facts, at=at))
        if ok:
            assert statuses is not None
            for fact in facts:
                known = self._positions.get(fact.position_id)
                if known is not None and fact.position_id in statuses:
                    self._remember_position(_position_with_facts(known, fact, at or _now()))
            return statuses
        entry = await self._append("set_protection_facts_many", {"facts": [_encode_facts(f) for f in facts]})
        result: dict[int, PositionStatus] = {}
        for fact in facts:
            known = self._positions.get(fact.position_id)
            if known is None or known.status.is_terminal:
                continue
            updated = self._remember_position(_position_with_facts(known, fact, entry.at))
            result[fact.position_id] = updated.status
        return result

    async def save_trailing_state(
        self,
        position_id: int,
        *,
        mode: str,
        state: str,
        activation_price: Decimal,
        callback_percent: Decimal,
        activation_percent: Decimal,
        peak_price: Decimal | None = None,
        current_stop_price: Decimal | None = None,
        stop_order_client_id: str | None = None,
        last_move_at: datetime | None = None,
        update_count: int = 0,
    ) -> TrailingStateRecord:
        kwargs: dict[str, Any] = {
            "mode": mode,
            "state": state,
            "activation_price": activation_price,
            "callback_percent": callback_percent,
            "activation_percent": activation_percent,
            "peak_price": peak_price,
            "current_stop_price": current_stop_price,
            "stop_order_client_id": stop_order_client_id,
            "last_move_at": last_move_at,
            "update_count": update_count,
        }
        ok, record = await self._try_live(lambda: Store.save_trailing_state(self, position_id, **kwargs))
        if ok:
            assert record is not None
            return record
        entry = await self._append("save_trailing_state", {"position_id": position_id, **_encode(kwargs)})
        return TrailingStateRecord(position_id=position_id, state_version=1, updated_at=entry.at, **kwargs)

    async def close_position(
        self,
        position_id: int,
        *,
        exit_reason: str,
        realized_pnl: Decimal | None,
        at: datetime | None = None,
    ) -> PositionRecord:
        ok, record = await self._try_live(
            lambda: Store.close_position(
                self, position_id, exit_reason=exit_reason, realized_pnl=realized_pnl, at=at
            )
        )
        if ok:
            assert record is not None
            return self._remember_position(record)
        entry = await self._append(
            "close_position",
            {"position_id": position_id, "exit_reason": exit_reason, "realized_pnl": _text(realized_pnl)},
        )
        known = self._known_position(position_id)
        return self._remember_position(
            dataclasses.replace(
                known,
                status=PositionStatus.CLOSED,
                exit_reason=exit_reason,
                realized_pnl=realized_pnl if realized_pnl is not None else known.realized_pnl,
                closed_at=known.closed_at or entry.at,
                has_stop_loss=False,
                has_trailing_stop=False,
                trail_armed=False,
                updated_at=entry.at,
            )
        )

    async def set_position_status(
        self,
        position_id: int,
        status: PositionStatus,
        *,
        exit_reason: str | None = None,
        at: datetime | None = None,
    ) -> PositionRecord:
        ok, record = await self._try_live(
            lambda: Store.set_position_status(self, position_id, status, exit_reason=exit_reason, at=at)
        )
        if ok:
            assert record is not None
            return self._remember_position(record)
        entry = await self._append(
            "set_position_status",
            {"position_id": position_id, "status": status.value, "exit_reason": exit_reason},
        )
        known = self._known_position(position_id)
        terminal = status.is_terminal
        return self._remember_position(
            dataclasses.replace(
                known,
                status=status,
                exit_reason=exit_reason if exit_reason is not None else known.exit_reason,
                closed_at=(known.closed_at or entry.at) if terminal else known.closed_at,
                has_stop_loss=False if terminal else known.has_stop_loss,
                has_trailing_stop=False if terminal else known.has_trailing_stop,
                updated_at=entry.at,
            )
        )

    async def set_position_quantity(self, position_id: int, quantity: Decimal) -> None:
        ok, _ = await self._try_live(lambda: Store.set_position_quantity(self, position_id, quantity))
        if not ok:
            await self._append(
                "set_position_quantity", {"position_id": position_id, "quantity": str(quantity)}
            )
        known = self._positions.get(position_id)
        if known is not None:
            self._remember_position(dataclasses.replace(known, quantity=quantity))

    async def record_fill(
        self,
        position_id: int,
        quantity: Decimal,
        entry_price: Decimal,
        *,
        filled_at: datetime | None = None,
        side: str | None = None,
        unprotected_since: datetime | None = None,
    ) -> PositionRecord:
        ok, record = await self._try_live(
            lambda: Store.record_fill(
                self,
                position_id,
                quantity,
                entry_price,
                filled_at=filled_at,
                side=side,
                unprotected_since=unprotected_since,
            )
        )
        if ok:
            assert record is not None
            return self._remember_position(record)
        known = self._known_position(position_id)  # before journaling: without it nothing can be protected
        entry = await self._append(
            "record_fill",
            {
                "position_id": position_id,
                "quantity": str(quantity),
                "entry_price": str(entry_price),
                "filled_at": (filled_at or _now()).isoformat(),
                "side": side,
                "unprotected_since": None if unprotected_since is None else unprotected_since.isoformat(),
            },
        )
        if known.protected_at is not None or known.unprotected_since is not None:
            unprotected_since = known.unprotected_since
        return self._remember_position(
            dataclasses.replace(
                known,
                unprotected_since=unprotected_since,
                side=side or known.side,
                quantity=quantity,
                entry_price=entry_price,
                current_price=known.current_price or entry_price,
                status=PositionStatus.PENDING_PROTECTION,
                opened_at=known.opened_at or filled_at or entry.at,
                updated_at=entry.at,
            )
        )

    async def finish_signal(
        self, signal_id: int, status: SignalStatus, reason: str | None = None, *, wave_id: int | None = None
    ) -> None:
        ok, _ = await self._try_live(
            lambda: Store.finish_signal(self, signal_id, status, reason, wave_id=wave_id)
        )
        if not ok:
            await self._append(
                "finish_signal",
                {"signal_id": signal_id, "status": status.value, "reason": reason, "wave_id": wave_id},
            )

    async def set_entries_control(
        self,
        venue: str,
        account: str,
        *,
        paused: bool,
        paused_by: str,
        reason: str,
        at: datetime | None = None,
        requested_by: str = "",
    ) -> EntriesControl:
        state = {"paused": paused, "paused_by": paused_by, "reason": reason, "requested_by": requested_by}
        ok, control = await self._try_live(
            lambda: Store.set_entries_control(self, venue, account, **state, at=at)
        )
        if ok:
            assert control is not None
            return control
        entry = await self._append("set_entries_control", {"venue": venue, "account": account, **state})
        return EntriesControl(
            paused=paused,
            paused_by=paused_by,
            reason=reason[:1000],
            since=entry.at,
            requested_by=requested_by,
        )

    async def disarm_managed_trails(self, *, at: datetime | None = None) -> int:
        ok, count = await self._try_live(lambda: Store.disarm_managed_trails(self, at=at))
        if ok:
            assert count is not None
            return count
        # As of `at` (a dead engine's last heartbeat), or of the write itself: replayed at either, not later.
        await self._append("disarm_managed_trails", {"at": None if at is None else at.isoformat()})
        return 0

    async def finish_wave(
        self, wave_id: int, *, opened: int, protected: int, failed: int, slowest_protection_ms: int | None
    ) -> None:
        counts = {"opened": opened, "protected": protected, "failed": failed}
        ok, _ = await self._try_live(
            lambda: Store.finish_wave(self, wave_id, **counts, slowest_protection_ms=slowest_protection_ms)
        )
        if not ok:
            await self._append(
                "finish_wave", {"wave_id": wave_id, **counts, "slowest_protection_ms": slowest_protection_ms}
            )

    async def record_event(
        self,
        severity: Severity,
        type: str,
        message: str,
        *,
        symbol: str | None = None,
        position_id: int | None = None,
        data: Mapping[str, Any] | None = None,
        at: datetime | None = None,
        write_id: str | None = None,
    ) -> int:
        if self._journal is None:
            return await Store.record_event(
                self,
                severity,
                type,
                message,
                symbol=symbol,
                position_id=position_id,
                data=data,
                at=at,
                write_id=write_id,
            )
        # Every event written here carries an id and its time, so a write that reached the database before
        # its answer was lost, and is then replayed from the journal, is not added twice.
        at = at or _now()
        write_id = write_id or uuid.uuid4().hex[:16]
        ok, event_id = await self._try_live(
            lambda: Store.record_event(
                self,
                severity,
                type,
                message,
                symbol=symbol,
                position_id=position_id,
                data=data,
                at=at,
                write_id=write_id,
            )
        )
        if ok:
            assert event_id is not None
            return event_id
        await self._append(
            "record_event",
            {
                "severity": severity.value,
                "type": type,
                "message": message,
                "symbol": symbol,
                "position_id": position_id,
                "data": dict(data or {}),
                "at": at.isoformat(),
                "write_id": write_id,
            },
        )
        return 0

    async def record_coverage_sample(self, sample: CoverageSample) -> None:
        # Journaled like the rest: the shift's time-weighted coverage has no hole where the database was.
        ok, _ = await self._try_live(lambda: Store.record_coverage_sample(self, sample))
        if not ok:
            await self._append("record_coverage_sample", _encode(dataclasses.asdict(sample)))

    async def save_health(self, components: Sequence[HealthRow]) -> None:
        """The latest health, which the next save replaces: while the database is away it is not kept (the
        engine still evaluates, logs and shows it), so the health loop goes on through an outage."""

        # Given up at the write timeout or once the outage is declared, not awaited: a save in flight when the
        # server froze, or the journal replay it waits for, held the health loop, and the breaker it checks,
        # for the whole freeze. (Not by cutting the connection: a COMMIT the server took would be reported
        # failed.)
        async def save() -> None:
            await self._ready_for_direct()  # (a replay under way is shared, and not cancelled by a give-up)
            await Store.save_health(self._direct, components)

        try:
            await self._attempt(save(), self._write_timeout)
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            self._note_unreachable(exc)
            log.debug("health not saved: %s", exc)

    # --- covered reads -------------------------------------------------------------------------------

    async def order_by_client_id(self, client_order_id: str) -> OrderRecord | None:
        ok, record = await self._try_live(lambda: Store.order_by_client_id(self, client_order_id))
        if ok:
            return self._remember_order(record) if record is not None else None
        return self._orders.get(client_order_id)

    async def orders_for_position(
        self, position_id: int, statuses: Collection[OrderRecordStatus]
    ) -> list[OrderRecord]:
        ok, records = await self._try_live(lambda: Store.orders_for_position(self, position_id, statuses))
        if ok:
            assert records is not None
            return [self._remember_order(r) for r in records]
        return sorted(
            (o for o in self._orders.values() if o.position_id == position_id and o.status in statuses),
            key=lambda o: (o.created_at, o.client_order_id),
        )

    # --- reads that teach the memory (not covered) ---------------------------------------------------

    async def create_position(self, **kwargs: Any) -> PositionRecord:
        return self._remember_position(await Store.create_position(self, **kwargs))

    async def position(self, position_id: int) -> PositionRecord | None:
        record = await Store.position(self, position_id)
        return self._remember_position(record) if record is not None else None

    async def open_position_for_symbol(self, exchange: str, symbol: str) -> PositionRecord | None:
        record = await Store.open_position_for_symbol(self, exchange, symbol)
        return self._remember_position(record) if record is not None else None

    async def open_positions(self) -> list[PositionRecord]:
        return [self._remember_position(p) for p in await Store.open_positions(self)]

    async def live_orders_of_open_positions(self) -> dict[int, list[OrderRecord]]:
        found = await Store.live_orders_of_open_positions(self)
        for records in found.values():
            for record in records:
                self._remember_order(record)
        return found

    # --- memory --------------------------------------------------------------------------------------

    def _remember_order(self, record: OrderRecord) -> OrderRecord:
        self._orders[record.client_order_id] = record
        self._orders.move_to_end(record.client_order_id)
        while len(self._orders) > self._remembered:
            self._orders.popitem(last=False)
        return record

    def _remember_position(self, record: PositionRecord) -> PositionRecord:
        self._positions[record.id] = record
        self._positions.move_to_end(record.id)
        while len(self._positions) > self._remembered:
            self._positions.popitem(last=False)
        return record

    def _known_position(self, position_id: int) -> PositionRecord:
        known = self._positions.get(position_id)
        if known is None:
            raise LookupError(f"no row for {position_id!r} known while the database is unreachable")
        return known


class _GuardedPool:
    """The pool as the inherited `Store` queries see it: refused at once while the database is down, held
    until the journal is replayed while writes await replay, and given up when the database is declared
    down meanwhile. Unreachable errors come out as `DatabaseDown`."""

    def __init__(self, pool: asyncpg.Pool, store: ResilientStore):
        self._pool = pool
        self._store = store

    def get_size(self) -> int:
        return self._pool.get_size()

    def get_idle_size(self) -> int:
        return self._pool.get_idle_size()

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> Any:
        return await self._call(lambda: self._pool.fetch(query, *args, **kwargs))

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        return await self._call(lambda: self._pool.fetchrow(query, *args, **kwargs))

    async def fetchval(self, query: str, *args: Any, **kwargs: Any) -> Any:
        return await self._call(lambda: self._pool.fetchval(query, *args, **kwargs))

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> Any:
        return await self._call(lambda: self._pool.execute(query, *args, **kwargs))

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        acquiring: asyncio.Future[asyncpg.Connection] | None = None

        def start() -> asyncio.Future[asyncpg.Connection]:
            nonlocal acquiring
            acquiring = asyncio.ensure_future(self._pool.acquire())
            return acquiring

        try:
            connection = await self._call(start)
        except BaseException:
            # Cancelled just as the pool handed the connection over: give it back, or the pool never closes.
            handed_over = acquiring is not None and acquiring.done() and not acquiring.cancelled()
            if handed_over and acquiring.exception() is None:  # type: ignore[union-attr]
                await self._pool.release(acquiring.result())  # type: ignore[union-attr]
            raise
        try:
            yield connection
        except Exception as exc:
            if is_unreachable(exc) and not isinstance(exc, DatabaseDown):
                self._store._note_unreachable(exc)
                raise DatabaseDown(self._store.describe_outage()) from exc
            raise
        finally:
            await self._pool.release(connection)

    async def _call(self, work: Callable[[], Awaitable[T]]) -> T:
        store = self._store
        await store._ready_for_direct()
        try:
            return await store._attempt(work(), None)
        except Exception as exc:
            if is_unreachable(exc) and not isinstance(exc, DatabaseDown):
                store._note_unreachable(exc)
                raise DatabaseDown(store.describe_outage()) from exc
            raise


# --- pure helpers: what a write does to a remembered row, and the journal's argument encoding ----------


def _order_with_status(order: OrderRecord, row: OrderStatusRow, at: datetime) -> OrderRecord:
    return dataclasses.replace(
        order,
        status=row.status,
        exchange_order_id=row.exchange_order_id
        if row.exchange_order_id is not None
        else order.exchange_order_id,
        error=row.error if row.error is not None else order.error,
        trail_distance=row.trail_distance if row.trail_distance is not None else order.trail_distance,
        updated_at=at,
    )


def _position_with_facts(position: PositionRecord, fact: ProtectionFactsRow, at: datetime) -> PositionRecord:
    if position.status.is_terminal:
        return position  # a late write never resurrects a closed position's flags
    activated = position.trailing_activated if fact.trailing_activated is None else fact.trailing_activated
    # Both stops in place, as the database's write says: a managed trail armed and not activated is one.
    both = fact.has_stop_loss and (fact.has_trailing_stop or (fact.trail_armed and not activated))
    return dataclasses.replace(
        position,
        has_stop_loss=fact.has_stop_loss,
        has_trailing_stop=fact.has_trailing_stop,
        stop_loss_price=fact.stop_loss_price,
        trailing_activated=fact.trailing_activated
        if fact.trailing_activated is not None
        else position.trailing_activated,
        trail_armed=fact.trail_armed,
        unprotected_since=fact.unprotected_since,
        stop_loss_unverified=fact.stop_loss_unverified,
        trailing_stop_unverified=fact.trailing_stop_unverified,
        protected_at=(position.protected_at or at) if both else position.protected_at,
        status=fact.status if position.status in _LIVE_POSITION_STATUSES else position.status,
        updated_at=at,
    )


def _text(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _decimal(value: Any) -> Decimal | None:
    return None if value is None else Decimal(value)


def _when(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _encode(values: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-safe: Decimals as exact strings, times in ISO 8601, enums by value."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Decimal):
            out[key] = str(value)
        elif isinstance(value, datetime):
            out[key] = value.isoformat()
        elif isinstance(value, OrderPurpose | OrderRecordStatus | PositionStatus):
            out[key] = value.value
        else:
            out[key] = value
    return out


def _encode_status_row(row: OrderStatusRow) -> dict[str, Any]:
    return {
        "client_order_id": row.client_order_id,
        "status": row.status.value,
        "exchange_order_id": row.exchange_order_id,
        "error": row.error,
        "trail_distance": None if row.trail_distance is None else str(row.trail_distance),
    }


def _decode_status_row(args: Mapping[str, Any]) -> OrderStatusRow:
    distance = args.get("trail_distance")  # absent from a journal an older version wrote
    return OrderStatusRow(
        args["client_order_id"],
        OrderRecordStatus(args["status"]),
        args.get("exchange_order_id"),
        args.get("error"),
        None if distance is None else Decimal(distance),
    )


def _encode_facts(fact: ProtectionFactsRow) -> dict[str, Any]:
    return {
        "position_id": fact.position_id,
        "has_stop_loss": fact.has_stop_loss,
        "has_trailing_stop": fact.has_trailing_stop,
        "stop_loss_price": _text(fact.stop_loss_price),
        "trailing_activated": fact.trailing_activated,
        "status": fact.status.value,
        "trail_armed": fact.trail_armed,
        "unprotected_since": None if fact.unprotected_since is None else fact.unprotected_since.isoformat(),
        "observed_at": None if fact.observed_at is None else fact.observed_at.isoformat(),
        "uncovered_from": None if fact.uncovered_from is None else fact.uncovered_from.isoformat(),
        "stop_loss_unverified": fact.stop_loss_unverified,
        "trailing_stop_unverified": fact.trailing_stop_unverified,
        "protected_from": None if fact.protected_from is None else fact.protected_from.isoformat(),
        "hard_stop_from": None if fact.hard_stop_from is None else fact.hard_stop_from.isoformat(),
    }


def _decode_facts(args: Mapping[str, Any]) -> ProtectionFactsRow:
    return ProtectionFactsRow(
        position_id=int(args["position_id"]),
        has_stop_loss=bool(args["has_stop_loss"]),
        has_trailing_stop=bool(args["has_trailing_stop"]),
        stop_loss_price=_decimal(args["stop_loss_price"]),
        trailing_activated=args["trailing_activated"],
        status=PositionStatus(args["status"]),
        trail_armed=bool(args["trail_armed"]),
        unprotected_since=_when(args.get("unprotected_since")),  # absent in a journal from before 0010
        observed_at=_when(args.get("observed_at")),  # absent in a journal from before 0011
        uncovered_from=_when(args.get("uncovered_from")),
        # (absent in a journal from before 0017)
        stop_loss_unverified=bool(args.get("stop_loss_unverified", False)),
        trailing_stop_unverified=bool(args.get("trailing_stop_unverified", False)),
        protected_from=_when(args.get("protected_from")),  # (absent in a journal from before it)
        hard_stop_from=_when(args.get("hard_stop_from")),
    )


async def _replay_record_order(store: Store, entry: JournalEntry) -> None:
    a = entry.args
    await store.record_order(
        client_order_id=a["client_order_id"],
        purpose=OrderPurpose(a["purpose"]),
        side=a["side"],
        type=a["type"],
        quantity=Decimal(a["quantity"]),
        position_id=a["position_id"],
        trigger_price=_decimal(a["trigger_price"]),
        activation_price=_decimal(a["activation_price"]),
        callback_percent=_decimal(a["callback_percent"]),
        status=OrderRecordStatus(a["status"]),
        created_at=_when(a["created_at"]) or entry.at,
    )


async def _replay_set_order_status(store: Store, entry: JournalEntry) -> None:
    row = _decode_status_row(entry.args)
    await store.set_order_status(
        row.client_order_id,
        row.status,
        exchange_order_id=row.exchange_order_id,
        error=row.error,
        trail_distance=row.trail_distance,
    )


async def _replay_set_order_statuses_many(store: Store, entry: JournalEntry) -> None:
    await store.set_order_statuses_many([_decode_status_row(r) for r in entry.args["rows"]])


async def _replay_set_protection_facts_many(store: Store, entry: JournalEntry) -> None:
    await store.set_protection_facts_many([_decode_facts(f) for f in entry.args["facts"]], at=entry.at)


async def _replay_save_trailing_state(store: Store, entry: JournalEntry) -> None:
    a = entry.args
    await store.save_trailing_state(
        int(a["position_id"]),
        mode=a["mode"],
        state=a["state"],
        activation_price=Decimal(a["activation_price"]),
        callback_percent=Decimal(a["callback_percent"]),
        activation_percent=Decimal(a["activation_percent"]),
        peak_price=_decimal(a["peak_price"]),
        current_stop_price=_decimal(a["current_stop_price"]),
        stop_order_client_id=a["stop_order_client_id"],
        last_move_at=_when(a["last_move_at"]),
        update_count=int(a["update_count"]),
    )


async def _replay_close_position(store: Store, entry: JournalEntry) -> None:
    a = entry.args
    await store.close_position(
        int(a["position_id"]),
        exit_reason=a["exit_reason"],
        realized_pnl=_decimal(a["realized_pnl"]),
        at=entry.at,
    )


async def _replay_set_position_status(store: Store, entry: JournalEntry) -> None:
    a = entry.args
    await store.set_position_status(
        int(a["position_id"]), PositionStatus(a["status"]), exit_reason=a["exit_reason"], at=entry.at
    )


async def _replay_set_position_quantity(store: Store, entry: JournalEntry) -> None:
    await store.set_position_quantity(int(entry.args["position_id"]), Decimal(entry.args["quantity"]))


async def _replay_record_fill(store: Store, entry: JournalEntry) -> None:
    a = entry.args
    await store.record_fill(
        int(a["position_id"]),
        Decimal(a["quantity"]),
        Decimal(a["entry_price"]),
        filled_at=_when(a["filled_at"]) or entry.at,
        side=a.get("side"),  # (journals written before it had no side: the recorded one)
        unprotected_since=_when(a.get("unprotected_since")),
    )


async def _replay_finish_signal(store: Store, entry: JournalEntry) -> None:
    a = entry.args
    await store.finish_signal(
        int(a["signal_id"]), SignalStatus(a["status"]), a["reason"], wave_id=a["wave_id"]
    )


async def _replay_set_entries_control(store: Store, entry: JournalEntry) -> None:
    a = entry.args
    await store.set_entries_control(
        a["venue"],
        a["account"],
        paused=bool(a["paused"]),
        paused_by=a["paused_by"],
        reason=a["reason"],
        at=entry.at,
        requested_by=a.get("requested_by", ""),
    )


async def _replay_disarm_managed_trails(store: Store, entry: JournalEntry) -> None:
    at = entry.args.get("at")
    await store.disarm_managed_trails(at=entry.at if at is None else datetime.fromisoformat(at))


async def _replay_finish_wave(store: Store, entry: JournalEntry) -> None:
    a = entry.args
    await store.finish_wave(
        int(a["wave_id"]),
        opened=int(a["opened"]),
        protected=int(a["protected"]),
        failed=int(a["failed"]),
        slowest_protection_ms=a["slowest_protection_ms"],
        at=entry.at,
    )


async def _replay_record_event(store: Store, entry: JournalEntry) -> None:
    a = entry.args
    await store.record_event(
        Severity(a["severity"]),
        a["type"],
        a["message"],
        symbol=a["symbol"],
        position_id=a["position_id"],
        data=a["data"],
        at=_when(a["at"]) or entry.at,
        write_id=a["write_id"],
    )


async def _replay_record_coverage_sample(store: Store, entry: JournalEntry) -> None:
    a = entry.args
    await store.record_coverage_sample(
        CoverageSample(
            at=datetime.fromisoformat(a["at"]),
            active=int(a["active"]),
            protected=int(a["protected"]),
            uncovered=int(a["uncovered"]),
            lasting=int(a["lasting"]),
            coverage_pct=_decimal(a["coverage_pct"]),
        )
    )


_REPLAY: dict[str, Callable[[Store, JournalEntry], Awaitable[None]]] = {
    "record_order": _replay_record_order,
    "set_order_status": _replay_set_order_status,
    "set_order_statuses_many": _replay_set_order_statuses_many,
    "set_protection_facts_many": _replay_set_protection_facts_many,
    "save_trailing_state": _replay_save_trailing_state,
    "close_position": _replay_close_position,
    "set_position_status": _replay_set_position_status,
    "set_position_quantity": _replay_set_position_quantity,
    "record_fill": _replay_record_fill,
    "finish_signal": _replay_finish_signal,
    "finish_wave": _replay_finish_wave,
    "set_entries_control": _replay_set_entries_control,
    "disarm_managed_trails": _replay_disarm_managed_trails,
    "record_event": _replay_record_event,
    "record_coverage_sample": _replay_record_coverage_sample,
}

COVERED_WRITES = tuple(_REPLAY)

__all__ = ["COVERED_WRITES", "ResilientStore"]

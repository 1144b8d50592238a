"""Queries, named after what they answer. Every hot-path lookup is by key (position id, client order id,
(exchange, symbol)) through an index; nothing reads all open positions to find one.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum
from typing import Any, TypeVar

import asyncpg

from engine.words import counted
from storage import history
from storage.lease import engine_looks_after_sql

log = logging.getLogger(__name__)

R = TypeVar("R")

# A rejection reason quotes what was sent (a symbol, a side): whatever its size, what is stored is bounded.
MAX_REASON_CHARS = 500


class PositionStatus(StrEnum):
    PENDING_ENTRY = "pending_entry"
    ENTRY_PLACED = "entry_placed"
    PENDING_PROTECTION = "pending_protection"
    ACTIVE = "active"
    CLOSING = "closing"
    CLOSED = "closed"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self in (PositionStatus.CLOSED, PositionStatus.FAILED)


class OrderPurpose(StrEnum):
    ENTRY = "entry"
    STOP_LOSS = "stop_loss"
    TRAILING_STOP = "trailing_stop"
    CLOSE = "close"


class OrderRecordStatus(StrEnum):
    PENDING = "pending"  # recorded, not yet answered by the venue
    OPEN = "open"
    FILLED = "filled"
    CANCELED = "canceled"
    EXPIRED = "expired"
    REJECTED = "rejected"
    UNKNOWN = "unknown"  # the venue may or may not have it: resolve by client order id


# An order of ours in one of these may be live on the venue.
LIVE_ORDER_STATUSES = frozenset(
    {OrderRecordStatus.PENDING, OrderRecordStatus.OPEN, OrderRecordStatus.UNKNOWN}
)


class Severity(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


TERMINAL_STATUSES = tuple(s.value for s in PositionStatus if s.is_terminal)


class PositionAlreadyOpen(Exception):
    """(exchange, symbol) already has a non-terminal position."""

    def __init__(self, exchange: str, symbol: str):
        super().__init__(f"{symbol} on {exchange} already has an open position")
        self.exchange = exchange
        self.symbol = symbol


@dataclass(frozen=True, slots=True)
class PositionRecord:
    id: int
    symbol: str
    exchange: str
    side: str
    quantity: Decimal
    entry_price: Decimal | None
    current_price: Decimal | None
    stop_loss_price: Decimal | None
    realized_pnl: Decimal | None
    status: PositionStatus
    has_stop_loss: bool
    has_trailing_stop: bool
    trailing_activated: bool
    trailing_activation_percent: Decimal | None
    trailing_callback_percent: Decimal | None
    signal_id: int | None
    wave_id: int | None
    opened_at: datetime | None
    protected_at: datetime | None
    closed_at: datetime | None
    updated_at: datetime
    exit_reason: str | None
    trail_armed: bool = False  # a managed trail held (and moved) by a running engine
    account: str = "sim:default"  # whose venue account (engine/accounts.py)
    unprotected_since: datetime | None = None  # since when it lacks a confirmed stop (None: covered)
    # A stop it lacks that is in doubt (asked for by its id), not known gone: "unverified", not "missing".
    stop_loss_unverified: bool = False
    trailing_stop_unverified: bool = False
    # Seconds from its fill until a hard stop of ours was live (0: it rode on the entry); None: not yet.
    hard_stop_gap_seconds: Decimal | None = None
    size_changed: bool = False  # the venue changed its size while open: its realized PnL is unknown

    @property
    def trailing_in_place(self) -> bool:
        """A trailing order is live, or a managed trail is armed by its engine and has no stop yet."""
        return self.has_trailing_stop or (self.trail_armed and not self.trailing_activated)

    @property
    def is_covered(self) -> bool:
        return self.has_stop_loss and self.trailing_in_place


@dataclass(frozen=True, slots=True)
class EntriesControl:
    """Whether entries are paused on an account, by whom and why (persisted: a pause outlives a restart)."""

    paused: bool
    paused_by: str  # operator | breaker | lease
    reason: str
    since: datetime
    requested_by: str = ""  # the operator's user@host/pid, when an operator said it


@dataclass(frozen=True, slots=True)
class ProtectionFactsRow:
    """What the exchange confirmed for one position, as `set_protection_facts_many` writes it."""

    position_id: int
    has_stop_loss: bool
    has_trailing_stop: bool
    stop_loss_price: Decimal | None
    trailing_activated: bool | None
    status: PositionStatus  # the live status it should have: pending_protection or active
    trail_armed: bool = False
    unprotected_since: datetime | None = None  # since when it lacks a confirmed stop; None: covered
    # When the writer saw these facts, on its clock: an uncovered span these facts end, ends then.
    observed_at: datetime | None = None
    # An uncovered stretch the record does not have, begun then: a position the last engine left filled and
    # never protected (killed in its first pass) whose stops this engine had to send. Covered facts end it.
    uncovered_from: datetime | None = None
    # A stop it lacks that is in doubt (asked for by its id), not known gone: "unverified", not "missing".
    stop_loss_unverified: bool = False
    trailing_stop_unverified: bool = False
    # When the venue says its stops went live (the later of the two's creation, on the venue's clock), for
    # stops a start found already placed: the position is protected since then, not since that start (a
    # killed engine's wave read "1 protected, 6 failed" while the venue held every stop, a reviewer).
    protected_from: datetime | None = None
    # When the venue says its hard stop went live, for one a start found already placed: its gap from the
    # fill is measured to then (it was measured to the restart while `protected_from` said the stops were
    # live long before: "protected in 1 s" and "9.3 s without a hard stop", a reviewer).
    hard_stop_from: datetime | None = None


@dataclass(frozen=True, slots=True)
class OrderStatusRow:
    client_order_id: str
    status: OrderRecordStatus
    exchange_order_id: str | None = None
    error: str | None = None
    trail_distance: Decimal | None = None  # a trailing stop armed at the mark: its distance, as taken


@dataclass(frozen=True, slots=True)
class OrderRecord:
    id: int
    client_order_id: str
    exchange_order_id: str | None
    position_id: int | None
    purpose: OrderPurpose
    side: str
    type: str
    quantity: Decimal
    trigger_price: Decimal | None
    activation_price: Decimal | None
    callback_percent: Decimal | None
    status: OrderRecordStatus
    error: str | None
    created_at: datetime
    updated_at: datetime
    trail_distance: Decimal | None = None  # see migration 0016


@dataclass(frozen=True, slots=True)
class EventRecord:
    id: int
    created_at: datetime
    severity: Severity
    type: str
    symbol: str | None
    position_id: int | None
    message: str
    data: dict[str, Any]
    account: str | None = None


@dataclass(frozen=True, slots=True)
class Coverage:
    """What the incident report's SQL answers, plus stop-loss coverage. Percentages are None with no
    active positions (the SQL would divide by zero)."""

    active: int
    with_stop_loss: int
    with_trailing_stop: int  # a trailing order live on the venue
    with_managed_trail: int  # none, but a managed trail armed by the engine that looks after the account
    coverage_pct: Decimal | None  # TS coverage: either of the two
    stop_loss_coverage_pct: Decimal | None


@dataclass(frozen=True, slots=True)
class CoverageSample:
    """The engine's coverage at one moment (a row of monitoring.coverage_samples). `coverage_pct`:
    protected / active, None with no active position."""

    at: datetime
    active: int
    protected: int
    uncovered: int  # past the grace period
    lasting: int  # of those, uncovered for a grace period or more
    coverage_pct: Decimal | None


class SignalStatus(StrEnum):
    NEW = "new"
    TAKEN = "taken"
    OPENED = "opened"
    REJECTED = "rejected"
    EXPIRED = "expired"


class DuplicateExternalId(Exception):
    def __init__(self, external_id: str):
        super().__init__(f"a signal with external id {external_id!r} already exists")
        self.external_id = external_id


@dataclass(frozen=True, slots=True)
class SignalRecord:
    id: int
    external_id: str | None
    symbol: str
    side: str
    score: Decimal | None
    received_at: datetime
    wave_id: int | None
    status: SignalStatus
    reason: str | None
    claimed_by: str | None = None
    claimed_at: datetime | None = None
    account: str | None = None  # the account it is for (None: any engine on the database may take it)


@dataclass(frozen=True, slots=True)
class WaveRecord:
    id: int
    started_at: datetime
    finished_at: datetime | None
    signals: int
    opened: int
    protected: int
    failed: int
    slowest_protection_ms: int | None


@dataclass(frozen=True, slots=True)
class TrailingStateRecord:
    position_id: int
    state_version: int
    mode: str
    state: str
    activation_price: Decimal
    peak_price: Decimal | None
    current_stop_price: Decimal | None
    stop_order_client_id: str | None
    callback_percent: Decimal
    activation_percent: Decimal
    last_move_at: datetime | None
    update_count: int
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class HealthRow:
    component: str
    state: str
    summary: str
    reason: str
    measurements: Mapping[str, Any]
    measured_at: datetime | None = None


def _record(record_type: type[R], row: Mapping[str, Any], **enums: type[StrEnum]) -> R:
    """A record dataclass from a row, its enum columns parsed (an unknown value fails loudly here). Columns
    the record does not know are left out: a newer version's migration may have added them while this one
    runs (its `SELECT *` reads would fail on every row otherwise)."""
    known = record_type.__dataclass_fields__  # type: ignore[attr-defined]
    values = {column: value for column, value in dict(row).items() if column in known}
    for column, enum in enums.items():
        values[column] = enum(values[column])
    return record_type(**values)


def _signal(row: Mapping[str, Any]) -> SignalRecord:
    return _record(SignalRecord, row, status=SignalStatus)


def _position(row: Mapping[str, Any]) -> PositionRecord:
    return _record(PositionRecord, row, status=PositionStatus)


def _order(row: Mapping[str, Any]) -> OrderRecord:
    return _record(OrderRecord, row, purpose=OrderPurpose, status=OrderRecordStatus)


def _event(row: Mapping[str, Any]) -> EventRecord:
    return _record(EventRecord, row, severity=Severity)


_SEVERITY_RANK = {s: i for i, s in enumerate(Severity)}

# What a position without its stops lacked, from its row (`{row}`: the alias of monitoring.positions). The
# trailing protection is in place as `PositionRecord.trailing_in_place` says.
_UNCOVERED_REASON = """
    CASE WHEN {row}.protected_at IS NULL THEN 'not_yet_protected'
         WHEN NOT ({row}.has_stop_loss OR {row}.stop_loss_unverified)
              AND NOT ({row}.has_trailing_stop OR ({row}.trail_armed AND NOT {row}.trailing_activated)
                       OR {row}.trailing_stop_unverified)
             THEN 'both_missing'
         WHEN NOT ({row}.has_stop_loss OR {row}.stop_loss_unverified) THEN 'stop_loss_missing'
         WHEN NOT ({row}.has_trailing_stop OR ({row}.trail_armed AND NOT {row}.trailing_activated)
                   OR {row}.trailing_stop_unverified) THEN 'trailing_stop_missing'
         ELSE 'unverified' END"""

# The time a position was without a hard stop of ours after its fill, stamped when its hard stop is first
# confirmed (`{p}`: the row of monitoring.positions, `{seen}`: when the confirmation is written, a little
# after it was seen: never less than the gap was). 0 when the stop rode on the entry: a hard stop of the
# position recorded before its fill and not known failed.
_HARD_STOP_GAP = """
    CASE WHEN EXISTS (SELECT 1 FROM monitoring.orders AS o
                      WHERE o.position_id = {p}.id AND o.purpose = 'stop_loss'
                        AND o.created_at <= {p}.opened_at AND o.status IN ('pending', 'open'))
         THEN 0
         ELSE GREATEST(0, EXTRACT(EPOCH FROM {seen} - COALESCE({p}.opened_at, {seen}))) END"""
# The database's clock, as `opened_at` (the engine's may be another, e.g. in a rehearsal); at the replay of
# a journaled write, the moment it was made (`$9`: `at`): the confirmation came then, not when the database
# was back (the gap read as the whole outage).
_SEEN_AT = "COALESCE($9::timestamptz, now())"
# In `set_protection_facts_many`: a hard stop a start found live was live since the venue placed it.
_HARD_STOP_SEEN_AT = "COALESCE(f.hard_stop_from, $9::timestamptz, now())"

# A position that ends (closed, failed) ends its open uncovered span, if any, when it ended (`{at}`: the
# statement's parameter with that moment, NULL for now). A CTE after `closed AS (UPDATE … RETURNING *)`.
_END_SPANS_ON_CLOSE = """ended AS (
                UPDATE monitoring.uncovered_spans AS s
                SET ended_at = GREATEST(s.started_at, COALESCE({at}::timestamptz, now())), ended_by = 'closed',
                    exit_reason = c.exit_reason
                FROM closed AS c
                WHERE s.position_id = c.id AND s.ended_at IS NULL AND c.status IN ('closed', 'failed')
            )"""


DEFAULT_ACCOUNT = "sim:default"  # the sim venue with the default label (engine/accounts.py)


# The uncovered positions of an account: live ones without both stops confirmed, filled at least `grace`
# ago, and entries of unknown outcome. Whether an engine looks after the account decides two things (the
# lease is the advisory lock `storage.lease` takes, pg_locks shows it, so the query knows without the
# engine; one not heard for `LEASE_SILENT_SECONDS` — hung, frozen, its host gone — holds the lock and looks
# after nothing, as does one starting or stopping, so they count as none):
# - The engine records an entry `pending`, and its position `entry_placed`, before it sends it. An engine
#   heard is resolving such an entry (it counts it itself: in flight, then in doubt once its outcome is
#   unknown, recorded `unknown`). With none (the engine died — SIGKILL, a crash — while the answer was
#   outstanding), an entry not known to have failed may have filled, with no stop, and nobody will find
#   out: it is uncovered.
# - A managed trail (`trail_armed`, no order before it activates) is the trailing protection only while its
#   engine runs and moves it; with none, only a trailing order on the venue counts.
# An entry of unknown outcome its engine is settling counts from its send plus the grace, as the engine counts
# it (a look at status during the seconds its look-up takes raised an alarm the engine did not).
# A position `closing` (its close at market on its way) is still open: without its stops (a close because a
# stop was breached or fired unfilled), it is uncovered, above all when its engine died mid-close.
# The operators' query in the README is this one, with the grace and the account filled in.
UNCOVERED_POSITIONS_SQL = f"""
    WITH engine AS (
        SELECT EXISTS (SELECT 1 FROM monitoring.engine_leases AS l
                       WHERE l.account = {{account}} AND {engine_looks_after_sql("l")}) AS looks_after)
    SELECT p.* FROM monitoring.positions AS p, engine
    WHERE ((p.status IN ('pending_protection', 'active', 'closing')
            AND NOT (p.has_stop_loss
                     AND (p.has_trailing_stop OR (p.trail_armed AND NOT p.trailing_activated AND engine.looks_after))))
           OR (p.status = 'entry_placed' AND EXISTS (
               SELECT 1 FROM monitoring.orders AS o
               WHERE o.position_id = p.id AND o.purpose = 'entry'
                 AND (o.status = 'unknown' OR (o.status <> 'rejected' AND NOT engine.looks_after))
                 AND (NOT engine.looks_after OR o.created_at <= now() - {{grace}}))))
      AND (p.opened_at IS NULL OR p.opened_at <= now() - {{grace}}) AND p.account = {{account}}
    ORDER BY p.opened_at NULLS FIRST, p.id
"""


class Store:
    """All reads and writes of the monitoring schema, over one pool, for one venue account: positions,
    coverage, health and entries control are that account's only (F16). Signals and waves are shared."""

    def __init__(self, pool: asyncpg.Pool, account: str = DEFAULT_ACCOUNT):
        self._pool: asyncpg.Pool | asyncpg.Connection = pool
        self.account = account

    @classmethod
    def on_connection(cls, conn: asyncpg.Connection, account: str = DEFAULT_ACCOUNT) -> Store:
        """A store whose reads go through one connection: inside its transaction they see one snapshot (a
        look such as `tsbot status` whose figures must agree). Its reads only: writes that open a
        transaction of their own take a connection from a pool."""
        store = cls.__new__(cls)
        store._pool = conn
        store.account = account
        return store

    def round_trips_in_flight(self) -> int:
        """Connections of the pool busy with a statement now (test harnesses on virtual time wait for
        them before moving the clock: a database round trip takes no virtual time)."""
        return self._pool.get_size() - self._pool.get_idle_size()

    # --- positions ---------------------------------------------------------------------------------------

    async def create_position(
        self,
        *,
        symbol: str,
        exchange: str,
        side: str,
        quantity: Decimal,
        status: PositionStatus = PositionStatus.PENDING_ENTRY,
        signal_id: int | None = None,
        wave_id: int | None = None,
        trailing_activation_percent: Decimal | None = None,
        trailing_callback_percent: Decimal | None = None,
    ) -> PositionRecord:
        try:
            row = await self._pool.fetchrow(
                """
                INSERT INTO monitoring.positions
                    (symbol, exchange, side, quantity, status, signal_id, wave_id,
                     trailing_activation_percent, trailing_callback_percent, account)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                RETURNING *
                """,
                symbol,
                exchange,
                side,
                quantity,
                status.value,
                signal_id,
                wave_id,
                trailing_activation_percent,
                trailing_callback_percent,
                self.account,
            )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == "positions_one_open_per_symbol":
                raise PositionAlreadyOpen(exchange, symbol) from None
            raise
        return _position(row)

    async def position(self, position_id: int) -> PositionRecord | None:
        row = await self._pool.fetchrow("SELECT * FROM monitoring.positions WHERE id = $1", position_id)
        return _position(row) if row else None

    async def open_position_for_symbol(self, exchange: str, symbol: str) -> PositionRecord | None:
        row = await self._pool.fetchrow(
            """
            SELECT * FROM monitoring.positions
            WHERE exchange = $1 AND symbol = $2 AND status <> ALL($3::text[]) AND account = $4
            """,
            exchange,
            symbol,
            TERMINAL_STATUSES,
            self.account,
        )
        return _position(row) if row else None

    async def active_positions(self) -> list[PositionRecord]:
        rows = await self._pool.fetch(
            "SELECT * FROM monitoring.positions WHERE status = 'active' AND account = $1 ORDER BY id",
            self.account,
        )
        return [_position(r) for r in rows]

    async def open_positions(self) -> list[PositionRecord]:
        """Every non-terminal position (what the exchange may hold), oldest first."""
        rows = await self._pool.fetch(
            "SELECT * FROM monitoring.positions WHERE status <> ALL($1::text[]) AND account = $2 ORDER BY id",
            TERMINAL_STATUSES,
            self.account,
        )
        return [_position(r) for r in rows]

    async def set_position_status(
        self,
        position_id: int,
        status: PositionStatus,
        *,
        exit_reason: str | None = None,
        at: datetime | None = None,
    ) -> PositionRecord:
        """`at`: when it happened, if not now (a write replayed from the journal)."""
        row = await self._pool.fetchrow(
            f"""
            WITH closed AS (
                UPDATE monitoring.positions
                SET status = $2,
                    exit_reason = COALESCE($3, exit_reason),
                    closed_at = CASE WHEN $2 = ANY($4::text[]) THEN COALESCE(closed_at, $5::timestamptz, now())
                                     ELSE closed_at END,
                    has_stop_loss = CASE WHEN $2 = ANY($4::text[]) THEN false ELSE has_stop_loss END,
                    has_trailing_stop = CASE WHEN $2 = ANY($4::text[]) THEN false ELSE has_trailing_stop END
                WHERE id = $1 AND status <> ALL($4::text[])
                RETURNING *
            ), {_END_SPANS_ON_CLOSE.format(at="$5")}
            SELECT * FROM closed
            """,
            position_id,
            status.value,
            exit_reason,
            TERMINAL_STATUSES,
            at,
        )
        return await self._written_unless_ended(row, position_id, f"status {status.value}")

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
        """The entry filled: quantity and the fill price, which every stop is computed from. `filled_at` is
        the venue's fill time when it is known and not now (an entry found filled at a restart): the time
        unprotected is counted from it, not from when we noticed. `side`: the side the venue holds, when it
        is not the one recorded (a position adopted from the venue's list into an entry's record).
        `unprotected_since`: a fill learned late (an entry's answer lost, or filled while no engine ran) has
        been without stops since then: its uncovered span begins here, in the same statement, however soon
        its stops are confirmed (a position protected on its first pass has none, and this one's naked time
        was before that pass). Not for a position ever protected."""
        row = await self._pool.fetchrow(
            f"""
            WITH filled AS (
                UPDATE monitoring.positions AS p
                SET quantity = $2, entry_price = $3, current_price = COALESCE(p.current_price, $3),
                    status = 'pending_protection', opened_at = COALESCE(p.opened_at, $4, now()),
                    side = COALESCE($5, p.side),
                    unprotected_since = CASE WHEN $6::timestamptz IS NULL OR p.protected_at IS NOT NULL
                                             THEN p.unprotected_since
                                             ELSE COALESCE(p.unprotected_since, $6::timestamptz) END
                FROM monitoring.positions AS old
                WHERE p.id = $1 AND old.id = $1 AND p.status <> ALL($7::text[])
                RETURNING p.*, old.unprotected_since AS was
            ), started AS (
                INSERT INTO monitoring.uncovered_spans (account, position_id, symbol, started_at, reason)
                SELECT account, id, symbol, unprotected_since, {_UNCOVERED_REASON.format(row="filled")}
                FROM filled WHERE unprotected_since IS NOT NULL AND was IS NULL
                ON CONFLICT (position_id, started_at) DO NOTHING
            )
            SELECT * FROM filled
            """,
            position_id,
            quantity,
            entry_price,
            filled_at,
            side,
            unprotected_since,
            TERMINAL_STATUSES,
        )
        return await self._written_unless_ended(row, position_id, "its fill")

    async def set_protection_facts(
        self,
        position_id: int,
        *,
        has_stop_loss: bool,
        has_trailing_stop: bool,
        stop_loss_price: Decimal | None,
        trailing_activated: bool | None = None,
    ) -> PositionRecord:
        """Record what the exchange confirmed. `protected_at` is stamped the first time both are live, the
        hard stop gap the first time the hard stop is."""
        row = await self._pool.fetchrow(
            f"""
            UPDATE monitoring.positions
            SET has_stop_loss = $2, has_trailing_stop = $3, stop_loss_price = $4,
                trailing_activated = COALESCE($5, trailing_activated),
                protected_at = CASE WHEN $2 AND $3 THEN COALESCE(protected_at, now()) ELSE protected_at END,
                hard_stop_gap_seconds = CASE WHEN $2 AND hard_stop_gap_seconds IS NULL
                                             THEN {_HARD_STOP_GAP.format(p="monitoring.positions", seen="now()")}
                                             ELSE hard_stop_gap_seconds END
            WHERE id = $1
            RETURNING *
            """,
            position_id,
            has_stop_loss,
            has_trailing_stop,
            stop_loss_price,
            trailing_activated,
        )
        return _position(self._require(row, position_id))

    async def set_protection_facts_many(
        self, facts: Sequence[ProtectionFactsRow], *, at: datetime | None = None
    ) -> dict[int, PositionStatus]:
        """Many positions' confirmed facts in one statement (see `set_protection_facts`), each with the
        status it should have while live (`pending_protection` or `active`; a position in any other status
        keeps it). Closed and failed positions are left alone: a late write must not resurrect a flag.
        Returns the status each updated position has afterwards."""
        if not facts:
            return {}
        # One statement, so a span is exactly as durable as the facts that open or end it (a journaled write
        # replays both). `old` is the row before this update: a change of `unprotected_since` is a span
        # beginning (NULL → t) or ending (t → NULL; t → t' ends one and begins the next). A span is keyed
        # by (position, start), so a replay that repeats the change writes nothing new.
        rows = await self._pool.fetch(
            f"""
            WITH changed AS (
                UPDATE monitoring.positions AS p
                SET has_stop_loss = f.sl, has_trailing_stop = f.ts, stop_loss_price = f.sl_price,
                    trailing_activated = COALESCE(f.activated, p.trailing_activated), trail_armed = f.armed,
                    unprotected_since = f.since, stop_loss_unverified = f.sl_unverified,
                    trailing_stop_unverified = f.ts_unverified,
                    -- Both stops in place: a managed trail armed and not activated (no order yet) is one.
                    protected_at = CASE WHEN f.sl AND (f.ts OR (f.armed AND NOT COALESCE(f.activated, p.trailing_activated)))
                                        THEN COALESCE(p.protected_at,
                                                      -- (never before its fill: the venue's clock is not ours)
                                                      CASE WHEN f.protected_from IS NOT NULL
                                                           THEN GREATEST(f.protected_from, p.opened_at) END,
                                                      $9::timestamptz, now())
                                        ELSE p.protected_at END,
                    hard_stop_gap_seconds = CASE WHEN f.sl AND p.hard_stop_gap_seconds IS NULL
                                                 THEN {_HARD_STOP_GAP.format(p="p", seen=_HARD_STOP_SEEN_AT)}
                                                 ELSE p.hard_stop_gap_seconds END,
                    status = CASE WHEN p.status IN ('pending_protection', 'active') THEN f.status ELSE p.status END
                FROM unnest($1::bigint[], $2::bool[], $3::bool[], $4::numeric[], $5::bool[], $6::text[],
                            $8::bool[], $10::timestamptz[], $11::timestamptz[], $12::timestamptz[],
                            $13::bool[], $14::bool[], $15::timestamptz[], $16::timestamptz[])
                         AS f(id, sl, ts, sl_price, activated, status, armed, since, observed, naked_from,
                              sl_unverified, ts_unverified, protected_from, hard_stop_from),
                     monitoring.positions AS old
                WHERE p.id = f.id AND old.id = f.id AND p.status <> ALL($7::text[])
                RETURNING p.id, p.status, p.account, p.symbol, p.unprotected_since AS since,
                          -- (a stretch the record lacks, of a position never protected: ended by covered
                          -- facts as if the record had it; a replay finds it protected and adds nothing)
                          COALESCE(old.unprotected_since,
                                   CASE WHEN p.unprotected_since IS NULL AND old.protected_at IS NULL
                                        THEN f.naked_from END) AS was,
                          f.observed,
                          {_UNCOVERED_REASON.format(row="old")} AS was_reason,
                          {_UNCOVERED_REASON.format(row="p")} AS reason
            ), moved AS (
                -- Still uncovered, since earlier than recorded (a stop found ended after the fact, timed from
                -- its end on the venue): the open span starts earlier, not a zero-length one and another.
                UPDATE monitoring.uncovered_spans AS s SET started_at = c.since
                FROM changed AS c
                WHERE c.was IS NOT NULL AND c.since < c.was
                  AND s.position_id = c.id AND s.started_at = c.was AND s.ended_at IS NULL
                RETURNING s.position_id
            ), ended AS (
                INSERT INTO monitoring.uncovered_spans
                    (account, position_id, symbol, started_at, ended_at, reason, ended_by)
                SELECT account, id, symbol, was, GREATEST(was, COALESCE(since, observed, $9::timestamptz, now())),
                       was_reason, 'protected'
                FROM changed WHERE was IS NOT NULL AND was IS DISTINCT FROM since
                  AND id NOT IN (SELECT position_id FROM moved)
                ON CONFLICT (position_id, started_at) DO UPDATE
                    SET ended_at = EXCLUDED.ended_at, ended_by = EXCLUDED.ended_by
                    WHERE monitoring.uncovered_spans.ended_at IS NULL
            ), started AS (
                INSERT INTO monitoring.uncovered_spans (account, position_id, symbol, started_at, reason)
                SELECT account, id, symbol, since, reason
                FROM changed WHERE since IS NOT NULL AND since IS DISTINCT FROM was
                  AND id NOT IN (SELECT position_id FROM moved)
                ON CONFLICT (position_id, started_at) DO NOTHING
            )
            SELECT id, status FROM changed
            """,
            [f.position_id for f in facts],
            [f.has_stop_loss for f in facts],
            [f.has_trailing_stop for f in facts],
            [f.stop_loss_price for f in facts],
            [f.trailing_activated for f in facts],
            [f.status.value for f in facts],
            TERMINAL_STATUSES,
            [f.trail_armed for f in facts],
            at,
            [f.unprotected_since for f in facts],
            [f.observed_at for f in facts],
            [f.uncovered_from for f in facts],
            [f.stop_loss_unverified for f in facts],
            [f.trailing_stop_unverified for f in facts],
            [f.protected_from for f in facts],
            [f.hard_stop_from for f in facts],
        )
        return {r["id"]: PositionStatus(r["status"]) for r in rows}

    async def disarm_managed_trails(self, *, at: datetime | None = None) -> int:
        """No engine moves managed trails any more (it stopped): none of them is armed. One not activated
        has no order: its position lacks its trailing protection from now on, and its record says since
        when (the next start times it from here, not from its fill)."""
        # One statement with the span it begins (as `set_protection_facts_many`: a change of
        # `unprotected_since` from NULL begins one), so the history shows the stop's uncovered time as it runs.
        return int(
            await self._pool.fetchval(
                f"""
                WITH changed AS (
                    UPDATE monitoring.positions AS p
                    SET trail_armed = false,
                        unprotected_since = CASE
                            WHEN p.has_trailing_stop OR p.status NOT IN ('pending_protection', 'active')
                            THEN p.unprotected_since
                            -- (a replay: as of the stop, or of a fill after it, another engine's)
                            ELSE COALESCE(p.unprotected_since,
                                          CASE WHEN $2::timestamptz IS NULL THEN now()
                                               ELSE GREATEST($2::timestamptz, p.opened_at) END) END
                    FROM monitoring.positions AS old
                    WHERE p.trail_armed AND p.account = $1 AND old.id = p.id
                    RETURNING p.id, p.account, p.symbol, p.unprotected_since AS since,
                              old.unprotected_since AS was, {_UNCOVERED_REASON.format(row="p")} AS reason
                ), started AS (
                    INSERT INTO monitoring.uncovered_spans (account, position_id, symbol, started_at, reason)
                    SELECT account, id, symbol, since, reason FROM changed WHERE since IS NOT NULL AND was IS NULL
                    ON CONFLICT (position_id, started_at) DO NOTHING
                )
                SELECT count(*) FROM changed
                """,
                self.account,
                at,  # a replayed write: when it was made (the stop), not the replay's time
            )
        )

    async def settle_unexplained_exit(
        self, position_id: int, exit_reason: str, exit_price: Decimal
    ) -> Decimal | bool | None:
        """A position recorded closed `closed_on_exchange` for want of evidence, whose evidence came after
        (one of our stops found filled, at `exit_price`): its exit reason and realized PnL (unknown once the
        venue changed its size). The PnL written (None: unknown), or False when the record says otherwise
        already."""
        row = await self._pool.fetchrow(
            """
            UPDATE monitoring.positions
            SET exit_reason = $2,
                realized_pnl = CASE WHEN size_changed OR entry_price IS NULL THEN NULL
                               ELSE ($3::numeric - entry_price) * quantity
                                    * CASE WHEN side = 'long' THEN 1 ELSE -1 END END
            WHERE id = $1 AND account = $4 AND status = 'closed' AND exit_reason = 'closed_on_exchange'
              AND realized_pnl IS NULL
            RETURNING realized_pnl
            """,
            position_id,
            exit_reason,
            exit_price,
            self.account,
        )
        return False if row is None else row["realized_pnl"]

    async def close_position(
        self,
        position_id: int,
        *,
        exit_reason: str,
        realized_pnl: Decimal | None,
        at: datetime | None = None,
    ) -> PositionRecord:
        """The venue confirmed the position flat: closed, why, its realized PnL and no stops, in one write
        (a reader never sees it closed without the rest)."""
        row = await self._pool.fetchrow(
            f"""
            WITH closed AS (
                UPDATE monitoring.positions
                SET status = 'closed', exit_reason = $2,
                    realized_pnl = CASE WHEN size_changed THEN NULL ELSE COALESCE($3, realized_pnl) END,
                    closed_at = COALESCE(closed_at, $4::timestamptz, now()), has_stop_loss = false,
                    has_trailing_stop = false,
                    trail_armed = false
                WHERE id = $1 AND status <> ALL($5::text[])
                RETURNING *
            ), {_END_SPANS_ON_CLOSE.format(at="$4")}
            SELECT * FROM closed
            """,
            position_id,
            exit_reason,
            realized_pnl,
            at,
            TERMINAL_STATUSES,
        )
        return await self._written_unless_ended(row, position_id, f"a close ({exit_reason})")

    async def _written_unless_ended(self, row: Any, position_id: int, what: str) -> PositionRecord:
        """The row a write returned; none when the position had already ended (closed or failed): an
        ended position is never written again (a late fill would have reopened a closed one, to be
        restored and "protected"; a second close overwrote the first's reason and PnL). Its row as it
        stands then, the write said and dropped."""
        if row is not None:
            return _position(row)
        current = _position(
            self._require(
                await self._pool.fetchrow("SELECT * FROM monitoring.positions WHERE id = $1", position_id),
                position_id,
            )
        )
        if current.status.is_terminal:
            log.warning(
                "position %s is %s already: %s not recorded over it", position_id, current.status.value, what
            )
        return current

    async def set_position_quantity(self, position_id: int, quantity: Decimal) -> None:
        """The venue holds `quantity` (what its stops are sized to from now on); its PnL is unknown since
        (`size_changed`)."""
        await self._pool.execute(
            "UPDATE monitoring.positions SET size_changed = size_changed OR quantity <> $2, quantity = $2 "
            "WHERE id = $1",
            position_id,
            quantity,
        )

    async def set_realized_pnl(self, position_id: int, realized_pnl: Decimal) -> None:
        await self._pool.execute(
            "UPDATE monitoring.positions SET realized_pnl = $2 WHERE id = $1", position_id, realized_pnl
        )

    async def update_marks(self, marks: Sequence[tuple[int, Decimal]]) -> None:
        """Batch current_price for many positions in one round trip."""
        if not marks:
            return
        await self._pool.execute(
            """
            UPDATE monitoring.positions AS p SET current_price = m.price
            FROM unnest($1::bigint[], $2::numeric[]) AS m(id, price)
            WHERE p.id = m.id
            """,
            [position_id for position_id, _ in marks],
            [price for _, price in marks],
        )

    async def uncovered_positions(self, grace_seconds: float = 0.0) -> list[PositionRecord]:
        """Live positions missing a confirmed stop-loss or trailing stop, filled at least `grace_seconds`
        ago (younger ones are still being protected, as the engine's gauge counts them), and entries of
        unknown outcome: their entry order `unknown` (they may have filled, with no stop of ours), or sent
        (recorded `pending`) by an engine that no longer looks after the account, so that nobody will
        learn their outcome (`UNCOVERED_POSITIONS_SQL`). A managed trail counts while its engine does."""
        rows = await self._pool.fetch(
            UNCOVERED_POSITIONS_SQL.format(grace="make_interval(secs => $1)", account="$2"),
            float(grace_seconds),
            self.account,
        )
        return [_position(r) for r in rows]

    async def coverage(self) -> Coverage:
        """The incident report's coverage query (same WHERE, same rounding), plus stop-loss coverage. Its TS
        coverage counts a managed trail (armed, no order before it activates) while its engine looks after
        the account, as the uncovered list does: in managed mode it read ~0 % with nothing uncovered."""
        row = await self._pool.fetchrow(
            f"""
            WITH engine AS (
                SELECT EXISTS (SELECT 1 FROM monitoring.engine_leases AS l
                               WHERE l.account = $1 AND {engine_looks_after_sql("l")}) AS looks_after),
            p AS (
                SELECT has_stop_loss, has_trailing_stop,
                       (NOT has_trailing_stop AND trail_armed AND NOT trailing_activated AND engine.looks_after)
                           AS managed
                FROM monitoring.positions, engine
                WHERE status = 'active' AND account = $1)
            SELECT COUNT(*) AS total,
                   COALESCE(SUM(CASE WHEN has_stop_loss THEN 1 ELSE 0 END), 0) AS with_sl,
                   COALESCE(SUM(CASE WHEN has_trailing_stop THEN 1 ELSE 0 END), 0) AS with_ts,
                   COALESCE(SUM(CASE WHEN managed THEN 1 ELSE 0 END), 0) AS with_managed,
                   ROUND(100.0 * SUM(CASE WHEN has_trailing_stop OR managed THEN 1 ELSE 0 END)
                         / NULLIF(COUNT(*), 0), 1) AS coverage_pct,
                   ROUND(100.0 * SUM(CASE WHEN has_stop_loss THEN 1 ELSE 0 END) / NULLIF(COUNT(*), 0), 1)
                       AS sl_pct
            FROM p
            """,
            self.account,
        )
        return Coverage(
            active=row["total"],
            with_stop_loss=row["with_sl"],
            with_trailing_stop=row["with_ts"],
            with_managed_trail=row["with_managed"],
            coverage_pct=row["coverage_pct"],
            stop_loss_coverage_pct=row["sl_pct"],
        )

    # --- orders ------------------------------------------------------------------------------------------

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
        """Record an order before it is sent. Idempotent by client order id: a second call returns the
        existing row unchanged (the id is the idempotency key, so the first intent stands). `created_at`:
        when it was recorded, if not now (a write replayed from the journal)."""
        row = await self._pool.fetchrow(
            """
            WITH inserted AS (
                INSERT INTO monitoring.orders
                    (client_order_id, position_id, purpose, side, type, quantity,
                     trigger_price, activation_price, callback_percent, status, created_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, COALESCE($11::timestamptz, now()))
                ON CONFLICT (client_order_id) DO NOTHING
                RETURNING *
            )
            SELECT * FROM inserted
            UNION ALL
            SELECT * FROM monitoring.orders WHERE client_order_id = $1
            LIMIT 1
            """,
            client_order_id,
            position_id,
            purpose.value,
            side,
            type,
            quantity,
            trigger_price,
            activation_price,
            callback_percent,
            status.value,
            created_at,
        )
        return _order(row)

    async def order_by_client_id(self, client_order_id: str) -> OrderRecord | None:
        row = await self._pool.fetchrow(
            "SELECT * FROM monitoring.orders WHERE client_order_id = $1", client_order_id
        )
        return _order(row) if row else None

    async def set_order_status(
        self,
        client_order_id: str,
        status: OrderRecordStatus,
        *,
        exchange_order_id: str | None = None,
        error: str | None = None,
        trail_distance: Decimal | None = None,
    ) -> OrderRecord:
        row = await self._pool.fetchrow(
            """
            UPDATE monitoring.orders
            SET status = $2, exchange_order_id = COALESCE($3, exchange_order_id), error = COALESCE($4, error),
                trail_distance = COALESCE($5, trail_distance)
            WHERE client_order_id = $1
            RETURNING *
            """,
            client_order_id,
            status.value,
            exchange_order_id,
            error,
            trail_distance,
        )
        return _order(self._require(row, client_order_id))

    async def mark_order_live_if_unsettled(self, client_order_id: str, exchange_order_id: str | None) -> bool:
        """The venue's word that an order of ours is live, where the record does not know it yet (`pending`,
        `unknown`): `open`. Never over an end already recorded (that word may have been overtaken by a fill
        or a cancel recorded since). Whether it changed the record."""
        changed = await self._pool.fetchval(
            """
            UPDATE monitoring.orders
            SET status = 'open', exchange_order_id = COALESCE($2, exchange_order_id)
            WHERE client_order_id = $1 AND status IN ('pending', 'unknown')
            RETURNING true
            """,
            client_order_id,
            exchange_order_id,
        )
        return bool(changed)

    async def set_order_statuses_many(self, updates: Sequence[OrderStatusRow]) -> None:
        """Many orders' statuses in one statement (see `set_order_status`)."""
        if not updates:
            return
        await self._pool.execute(
            """
            UPDATE monitoring.orders AS o
            SET status = u.status, exchange_order_id = COALESCE(u.exchange_order_id, o.exchange_order_id),
                error = COALESCE(u.error, o.error), trail_distance = COALESCE(u.trail_distance, o.trail_distance)
            FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::numeric[])
                 AS u(client_order_id, status, exchange_order_id, error, trail_distance)
            WHERE o.client_order_id = u.client_order_id
            """,
            [u.client_order_id for u in updates],
            [u.status.value for u in updates],
            [u.exchange_order_id for u in updates],
            [u.error for u in updates],
            [u.trail_distance for u in updates],
        )

    async def live_orders_of_open_positions(self) -> dict[int, list[OrderRecord]]:
        """For restart, in one query: every order of ours that may be live, by open position."""
        rows = await self._pool.fetch(
            """
            SELECT o.* FROM monitoring.orders o
            JOIN monitoring.positions p ON p.id = o.position_id
            WHERE o.status IN ('pending', 'open', 'unknown') AND p.status <> ALL($1::text[]) AND p.account = $2
            ORDER BY o.id
            """,
            TERMINAL_STATUSES,
            self.account,
        )
        orders: dict[int, list[OrderRecord]] = {}
        for row in rows:
            orders.setdefault(row["position_id"], []).append(_order(row))
        return orders

    async def stops_sent_unanswered(
        self, position_ids: Sequence[int]
    ) -> dict[int, dict[OrderPurpose, str | None]]:
        """For `tsbot status`: which stops of these positions were sent and have no answer on the record:
        not confirmed, yet maybe on the venue (a Bybit hard stop that rode on its entry, an engine killed
        before the answer). `pending` (written ahead, sent or about to be), or `unknown` the venue never told
        us an id for (its answer lost; one with an id is a stop that fired, which protects nothing, or one
        in doubt, said so by its own flag). For each, the refusal its last send met, if the record holds one:
        a refusal that executed nothing stays `pending` with its error, and the same id is sent again, which
        the record does not show (a reviewer read "may be on the exchange" of a stop refused at every send,
        another "missing" of one sent again and taken)."""
        rows = await self._pool.fetch(
            """
            SELECT DISTINCT ON (position_id, purpose) position_id, purpose, error FROM monitoring.orders
            WHERE position_id = ANY($1::bigint[]) AND purpose IN ('stop_loss', 'trailing_stop')
              AND (status = 'pending' OR (status = 'unknown' AND exchange_order_id IS NULL))
            ORDER BY position_id, purpose, id DESC
            """,
            list(position_ids),
        )
        sent: dict[int, dict[OrderPurpose, str | None]] = {}
        for row in rows:
            sent.setdefault(row["position_id"], {})[OrderPurpose(row["purpose"])] = row["error"]
        return sent

    async def accounts_of_positions(self, position_ids: Collection[int]) -> dict[int, str]:
        """The account each of these positions is recorded for, whichever it is: this database's orders on a
        venue account name positions, and another identity of the same venue account (another API key of
        it, the testnet setting flipped) records its own under another account (r80)."""
        rows = await self._pool.fetch(
            "SELECT id, account FROM monitoring.positions WHERE id = ANY($1::bigint[])", list(position_ids)
        )
        return {row["id"]: row["account"] for row in rows}

    async def live_stops_of_closed_positions(
        self, within_hours: float = 24.0
    ) -> dict[str, dict[str, tuple[float, bool]]]:
        """For restart: our stops the records say may still be live (`pending`, `open`, `unknown` — a fired
        stop not finished is `unknown`) on positions ended in the last `within_hours`, by symbol, each with
        the age of its record in seconds (written just before its send: a look-up within the venue's read lag
        of that proves nothing) and whether the venue answered it placed (`open`: its "unknown order" is no
        proof it is gone). The last run was cancelling them (or waiting for a fired one to end, or for
        one that filled to show) when it stopped; the venue's open orders do not list a fired stop still
        TRIGGERING, so nothing else tells the next start of it."""
        rows = await self._pool.fetch(
            """
            SELECT p.symbol, o.client_order_id, o.status = 'open' AS placed,
                   greatest(0, extract(epoch FROM now() - o.created_at))::float8 AS age
            FROM monitoring.orders o
            JOIN monitoring.positions p ON p.id = o.position_id
            WHERE o.status IN ('pending', 'open', 'unknown') AND o.purpose IN ('stop_loss', 'trailing_stop')
              AND p.status = ANY($1::text[]) AND p.account = $2
              AND coalesce(p.closed_at, o.updated_at) > now() - make_interval(secs => $3)
            ORDER BY o.id
            """,
            TERMINAL_STATUSES,
            self.account,
            within_hours * 3600.0,
        )
        found: dict[str, dict[str, tuple[float, bool]]] = {}
        for row in rows:
            found.setdefault(row["symbol"], {})[row["client_order_id"]] = (row["age"], row["placed"])
        return found

    async def entries_not_filled(self) -> dict[int, OrderRecord]:
        """The entry order of each position sent and not filled as far as the records go (`entry_placed`),
        whatever the order's own status: one written `filled` by an engine killed before the fill's price
        is a position with no stop (the uncovered query lists it once no engine looks after the account)."""
        rows = await self._pool.fetch(
            """
            SELECT DISTINCT ON (o.position_id) o.* FROM monitoring.orders o
            JOIN monitoring.positions p ON p.id = o.position_id
            WHERE o.purpose = 'entry' AND p.status = 'entry_placed' AND p.account = $1
            ORDER BY o.position_id, o.id DESC
            """,
            self.account,
        )
        return {row["position_id"]: _order(row) for row in rows}

    async def order_ids_of_open_positions(self) -> dict[int, list[str]]:
        """For restart, in one query: the client ids of every order of ours of each open position, ended
        ones included (an id is sent once: `PositionGuard.skip_used_ids`)."""
        rows = await self._pool.fetch(
            """
            SELECT o.position_id, o.client_order_id FROM monitoring.orders o
            JOIN monitoring.positions p ON p.id = o.position_id
            WHERE p.status <> ALL($1::text[]) AND p.account = $2
            ORDER BY o.id
            """,
            TERMINAL_STATUSES,
            self.account,
        )
        ids: dict[int, list[str]] = {}
        for row in rows:
            ids.setdefault(row["position_id"], []).append(row["client_order_id"])
        return ids

    async def live_orders_for_position(self, position_id: int) -> list[OrderRecord]:
        """Orders of ours that may be live on the exchange (open, pending or unknown)."""
        return await self.orders_for_position(position_id, LIVE_ORDER_STATUSES)

    async def orders_for_position(
        self, position_id: int, statuses: Collection[OrderRecordStatus]
    ) -> list[OrderRecord]:
        """The position's orders of ours in these statuses, oldest first."""
        rows = await self._pool.fetch(
            """
            SELECT * FROM monitoring.orders
            WHERE position_id = $1 AND status = ANY($2::text[])
            ORDER BY id
            """,
            position_id,
            [status.value for status in statuses],
        )
        return [_order(r) for r in rows]

    # --- signals and waves -------------------------------------------------------------------------------

    async def insert_signal(
        self,
        symbol: str,
        side: str,
        *,
        score: Decimal | None = None,
        external_id: str | None = None,
        for_account: bool = False,
    ) -> SignalRecord:
        """`for_account`: this store's account's only (see `insert_signals`)."""
        try:
            row = await self._pool.fetchrow(
                """
                INSERT INTO monitoring.signals (symbol, side, score, external_id, account)
                VALUES ($1, $2, $3, $4, $5) RETURNING *
                """,
                symbol,
                side,
                score,
                external_id,
                self.account if for_account else None,
            )
        except asyncpg.UniqueViolationError:
            raise DuplicateExternalId(external_id or "") from None
        return _signal(row)

    async def insert_signals(
        self, rows: Sequence[tuple[str, str, Decimal | None, str | None]], *, for_account: bool = False
    ) -> list[int]:
        """Insert many (symbol, side, score, external_id) in one transaction: all or none. `for_account`:
        claimed by this store's account's engine only; otherwise (as SQL a producer writes leaves them) by
        whichever engine on the database claims them first."""
        account = self.account if for_account else None
        async with self._pool.acquire() as conn, conn.transaction():
            ids = []
            for symbol, side, score, external_id in rows:
                try:
                    ids.append(
                        await conn.fetchval(
                            "INSERT INTO monitoring.signals (symbol, side, score, external_id, account) "
                            "VALUES ($1, $2, $3, $4, $5) RETURNING id",
                            symbol,
                            side,
                            score,
                            external_id,
                            account,
                        )
                    )
                except asyncpg.UniqueViolationError:
                    raise DuplicateExternalId(external_id or "") from None
            return ids

    async def claim_new_signals(self, limit: int = 500, claimed_by: str | None = None) -> list[SignalRecord]:
        """Take the oldest new signals of this account (or of none: any engine's), each exactly once across
        every process (SKIP LOCKED)."""
        rows = await self._pool.fetch(
            """
            UPDATE monitoring.signals AS s SET status = 'taken', claimed_by = $2, claimed_at = now()
            FROM (
                SELECT id FROM monitoring.signals
                WHERE status = 'new' AND (account IS NULL OR account = $3)
                ORDER BY received_at, id LIMIT $1 FOR UPDATE SKIP LOCKED
            ) AS claimed
            WHERE s.id = claimed.id
            RETURNING s.*
            """,
            limit,
            claimed_by,
            self.account,
        )
        return sorted((_signal(r) for r in rows), key=lambda r: (r.received_at, r.id))

    async def release_signals(self, signal_ids: Sequence[int], claimed_by: str | None) -> int:
        """Put back, untouched (`new`), signals `claimed_by` took and did not hand to a wave: an engine
        stopping in its wave window claims nothing (they sat `taken`, with no reason, until the next start
        expired them). The number put back."""
        if not signal_ids:
            return 0
        status = await self._pool.execute(
            """
            UPDATE monitoring.signals AS s SET status = 'new', claimed_by = NULL, claimed_at = NULL
            WHERE s.id = ANY($1::bigint[]) AND s.status = 'taken' AND s.claimed_by IS NOT DISTINCT FROM $2
              AND s.wave_id IS NULL
              AND NOT EXISTS (SELECT 1 FROM monitoring.positions p WHERE p.signal_id = s.id)
            """,
            list(signal_ids),
            claimed_by,
        )
        return int(status.split()[-1])

    async def reclaim_signals(self, claimed_by: str) -> list[SignalRecord]:
        """Signals `claimed_by` took and nobody handles: claimed, then the claim's answer or the wave's
        first writes lost to the database (no position, no wave). Taken again, oldest first; their claim
        time kept (a signal left taken for long is expired by the housekeeping, however often retaken).
        A position such a signal got and never sent (`pending_entry`: an entry goes only once its record
        is `entry_placed`) is one whose write the engine gave up on in an outage, committed at the thaw: it
        fails, `entry never sent`, and the signal is taken again. It held its symbol for the whole run,
        and its signal `taken`, while the venue held nothing (a reviewer, a frozen server)."""
        async with self._pool.acquire() as conn, conn.transaction():
            never_sent = await conn.fetch(
                """
                UPDATE monitoring.positions AS p
                SET status = 'failed', exit_reason = 'entry never sent', closed_at = now()
                FROM monitoring.signals AS s
                WHERE s.id = p.signal_id AND p.status = 'pending_entry' AND p.account = $2
                  AND s.status = 'taken' AND s.claimed_by = $1 AND s.wave_id IS NULL
                RETURNING p.id, p.symbol
                """,
                claimed_by,
                self.account,
            )
            if never_sent:
                ids = [r["id"] for r in never_sent]
                await conn.execute(
                    "UPDATE monitoring.orders SET status = 'rejected', error = 'entry never sent' "
                    "WHERE position_id = ANY($1::bigint[]) AND status = 'pending'",
                    ids,
                )
                log.warning(
                    "signals: %s recorded and never sent (their wave gave them up to a database "
                    "outage): failed, their signals taken again (%s)",
                    counted(len(never_sent), "position"),
                    ", ".join(r["symbol"] for r in never_sent),
                )
            rows = await conn.fetch(
                """
                SELECT s.* FROM monitoring.signals AS s
                WHERE s.status = 'taken' AND s.claimed_by = $1 AND s.wave_id IS NULL
                  AND NOT EXISTS (
                      SELECT 1 FROM monitoring.positions p WHERE p.signal_id = s.id AND p.status <> 'failed'
                  )
                  AND NOT EXISTS (
                      SELECT 1 FROM monitoring.positions p
                      WHERE p.signal_id = s.id AND p.status = 'failed' AND p.exit_reason <> 'entry never sent'
                  )
                """,
                claimed_by,
            )
        return sorted((_signal(r) for r in rows), key=lambda r: (r.received_at, r.id))

    async def expire_claimed_signals(
        self, *, claimed_by: str | None = None, older_than_seconds: float | None = None
    ) -> int:
        """Settle signals left 'taken': those `claimed_by` an engine (its earlier run died holding them), or
        claimed longer ago than `older_than_seconds` by anyone. One that never got a position is expired,
        with the reason; one whose entry filled is `opened` (its position open or ended); one whose position
        ended unfilled is `rejected` with the position's exit reason; one whose entry is still in flight is
        left to the engine settling that entry. Returns how many were expired."""
        rows = await self._pool.fetch(
            """
            WITH left_taken AS (
                SELECT s.id, s.claimed_at, p.status AS position_status, p.entry_price, p.exit_reason
                FROM monitoring.signals s
                LEFT JOIN LATERAL (
                    SELECT status, entry_price, exit_reason FROM monitoring.positions
                    WHERE signal_id = s.id ORDER BY id DESC LIMIT 1
                ) p ON true
                WHERE s.status = 'taken'
                  AND (($1::text IS NOT NULL AND s.claimed_by = $1)
                       OR ($2::float8 IS NOT NULL AND s.claimed_at < now() - make_interval(secs => $2))
                       OR s.claimed_at IS NULL AND $2::float8 IS NOT NULL)
            )
            UPDATE monitoring.signals s
            SET status = CASE
                    WHEN t.position_status IS NULL THEN 'expired'
                    WHEN t.entry_price IS NOT NULL THEN 'opened'
                    ELSE 'rejected' END,
                reason = CASE
                    WHEN t.position_status IS NULL THEN
                        'claimed by an engine that stopped before handling it (claimed '
                        || to_char(t.claimed_at, 'YYYY-MM-DD HH24:MI:SS') || ')'
                    WHEN t.entry_price IS NOT NULL THEN NULL
                    ELSE coalesce(t.exit_reason, 'entry failed') END
            FROM left_taken t
            WHERE s.id = t.id
              AND (t.position_status IS NULL OR t.position_status = ANY($3::text[]) OR t.entry_price IS NOT NULL)
            RETURNING s.status
            """,
            claimed_by,
            older_than_seconds,
            TERMINAL_STATUSES,
        )
        return sum(1 for row in rows if row["status"] == SignalStatus.EXPIRED.value)

    async def finish_signal(
        self, signal_id: int, status: SignalStatus, reason: str | None = None, *, wave_id: int | None = None
    ) -> None:
        if reason is not None and len(reason) > MAX_REASON_CHARS:
            reason = f"{reason[:MAX_REASON_CHARS]}… [{len(reason):,} characters, cut]"
        await self._pool.execute(
            "UPDATE monitoring.signals SET status = $2, reason = $3, wave_id = COALESCE($4, wave_id) WHERE id = $1",
            signal_id,
            status.value,
            reason,
            wave_id,
        )

    async def signal(self, signal_id: int) -> SignalRecord | None:
        row = await self._pool.fetchrow("SELECT * FROM monitoring.signals WHERE id = $1", signal_id)
        return _signal(row) if row else None

    async def start_wave(self, signals: int) -> int:
        return await self._pool.fetchval(
            "INSERT INTO monitoring.waves (signals) VALUES ($1) RETURNING id", signals
        )

    async def finish_wave(
        self,
        wave_id: int,
        *,
        opened: int,
        protected: int,
        failed: int,
        slowest_protection_ms: int | None,
        at: datetime | None = None,
    ) -> None:
        await self._pool.execute(
            """
            UPDATE monitoring.waves
            SET finished_at = COALESCE($6::timestamptz, now()), opened = $2, protected = $3, failed = $4,
                slowest_protection_ms = $5
            WHERE id = $1 AND finished_at IS NULL
            """,
            wave_id,
            opened,
            protected,
            failed,
            slowest_protection_ms,
            at,
        )

    async def finish_waves_left(self, *, heard: datetime, taken_at: datetime) -> list[WaveRecord]:
        """Waves an engine of this account began and never finished (it ended without stopping, last heard
        at `heard`; this engine took the account at `taken_at`): finished as of its last heartbeat (or their
        start, if later). Opened: their positions that filled (whenever: a fill after the engine died opened
        a position all the same); protected: those it gave both stops (before `taken_at`); failed: the rest,
        opened and not protected in time. A wave with no position of this account is left alone (signals
        and waves are shared: it may be another account's engine's, under way)."""
        rows = await self._pool.fetch(
            """
            WITH figures AS (
                SELECT p.wave_id AS id,
                       count(*) FILTER (WHERE p.opened_at IS NOT NULL) AS opened,
                       count(*) FILTER (WHERE p.protected_at < $3) AS protected,
                       max(EXTRACT(EPOCH FROM p.protected_at - p.opened_at) * 1000)
                           FILTER (WHERE p.protected_at < $3) AS slowest
                FROM monitoring.positions AS p
                JOIN monitoring.waves AS w ON w.id = p.wave_id
                WHERE w.finished_at IS NULL AND p.account = $1
                GROUP BY p.wave_id
            )
            UPDATE monitoring.waves AS w
            SET finished_at = GREATEST(w.started_at, $2), opened = f.opened, protected = f.protected,
                failed = f.opened - f.protected, slowest_protection_ms = round(f.slowest)::int
            FROM figures AS f
            WHERE w.id = f.id AND w.finished_at IS NULL
            RETURNING w.*
            """,
            self.account,
            heard,
            taken_at,
        )
        return sorted((_record(WaveRecord, r) for r in rows), key=lambda w: w.id)

    async def recent_waves(self, limit: int = 20) -> list[WaveRecord]:
        rows = await self._pool.fetch(
            "SELECT * FROM monitoring.waves ORDER BY started_at DESC, id DESC LIMIT $1", limit
        )
        return [_record(WaveRecord, r) for r in rows]

    # --- trailing-stop state ------------------------------------------------------------------------------

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
        row = await self._pool.fetchrow(
            """
            INSERT INTO monitoring.trailing_stop_state
                (position_id, mode, state, activation_price, peak_price, current_stop_price,
                 stop_order_client_id, callback_percent, activation_percent, last_move_at, update_count)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
            ON CONFLICT (position_id) DO UPDATE SET
                mode = EXCLUDED.mode, state = EXCLUDED.state, activation_price = EXCLUDED.activation_price,
                peak_price = EXCLUDED.peak_price, current_stop_price = EXCLUDED.current_stop_price,
                stop_order_client_id = EXCLUDED.stop_order_client_id,
                callback_percent = EXCLUDED.callback_percent, activation_percent = EXCLUDED.activation_percent,
                last_move_at = EXCLUDED.last_move_at, update_count = EXCLUDED.update_count
            RETURNING *
            """,
            position_id,
            mode,
            state,
            activation_price,
            peak_price,
            current_stop_price,
            stop_order_client_id,
            callback_percent,
            activation_percent,
            last_move_at,
            update_count,
        )
        return _record(TrailingStateRecord, row)

    async def trailing_state(self, position_id: int) -> TrailingStateRecord | None:
        row = await self._pool.fetchrow(
            "SELECT * FROM monitoring.trailing_stop_state WHERE position_id = $1", position_id
        )
        return _record(TrailingStateRecord, row) if row else None

    async def trailing_states_of_open_positions(self) -> dict[int, TrailingStateRecord]:
        """For restart: every persisted trailing state whose position is still live, by position id."""
        rows = await self._pool.fetch(
            """
            SELECT t.* FROM monitoring.trailing_stop_state t
            JOIN monitoring.positions p ON p.id = t.position_id
            WHERE p.status <> ALL($1::text[]) AND p.account = $2
            """,
            TERMINAL_STATUSES,
            self.account,
        )
        return {r["position_id"]: _record(TrailingStateRecord, r) for r in rows}

    # --- entries control ----------------------------------------------------------------------------------

    async def entries_control(self, venue: str, account: str) -> EntriesControl | None:
        row = await self._pool.fetchrow(
            "SELECT paused, paused_by, reason, since, requested_by FROM monitoring.entries_control "
            "WHERE venue = $1 AND account = $2",
            venue,
            account,
        )
        return _record(EntriesControl, row) if row else None

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
        row = await self._pool.fetchrow(
            """
            INSERT INTO monitoring.entries_control (venue, account, paused, paused_by, reason, since, requested_by)
            VALUES ($1, $2, $3, $4, $5, COALESCE($6::timestamptz, now()), $7)
            ON CONFLICT (venue, account) DO UPDATE SET
                paused = EXCLUDED.paused, paused_by = EXCLUDED.paused_by, reason = EXCLUDED.reason,
                since = EXCLUDED.since, requested_by = EXCLUDED.requested_by
            RETURNING paused, paused_by, reason, since, requested_by
            """,
            venue,
            account,
            paused,
            paused_by,
            reason[:1000],
            at,
            requested_by[:300],
        )
        return _record(EntriesControl, row)

    # --- installation and health ----------------------------------------------------------------------

    async def installation_token(self) -> str:
        return await self._pool.fetchval("SELECT token FROM monitoring.installation")

    async def save_health(self, components: Sequence[HealthRow]) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            for row in components:
                await conn.execute(
                    """
                    INSERT INTO monitoring.health
                        (component, state, summary, reason, measurements, measured_at, account)
                    VALUES ($1, $2, $3, $4, $5, now(), $6)
                    ON CONFLICT (account, component) DO UPDATE SET
                        state = EXCLUDED.state, summary = EXCLUDED.summary, reason = EXCLUDED.reason,
                        measurements = EXCLUDED.measurements, measured_at = EXCLUDED.measured_at
                    """,
                    row.component,
                    row.state,
                    row.summary,
                    row.reason,
                    dict(row.measurements),
                    self.account,
                )

    async def latest_health(self) -> list[HealthRow]:
        rows = await self._pool.fetch(
            "SELECT component, state, summary, reason, measurements, measured_at FROM monitoring.health "
            "WHERE account = $1 ORDER BY component",
            self.account,
        )
        return [_record(HealthRow, r) for r in rows]

    # --- history -----------------------------------------------------------------------------------------

    async def record_coverage_sample(self, sample: CoverageSample) -> None:
        """One sample of the coverage series. Idempotent by (account, time): a replayed sample is kept once."""
        await self._pool.execute(
            """
            INSERT INTO monitoring.coverage_samples
                (account, at, active, protected, uncovered, lasting, coverage_pct)
            VALUES ($1, $2, $3, $4, $5, $6, $7)
            ON CONFLICT (account, at) DO NOTHING
            """,
            self.account,
            sample.at,
            sample.active,
            sample.protected,
            sample.uncovered,
            sample.lasting,
            sample.coverage_pct,
        )

    async def coverage_left_at(self, at: datetime, grace_seconds: float) -> CoverageSample:
        """The coverage the records give from `at`, the last heartbeat of an engine that ended without
        stopping (read before anything is restored): its open positions, those it opened after that
        heartbeat too, protected when both stops were confirmed (no managed trail is armed with no engine
        to move it). Its last sample stood over the time nobody measured (up to 30 s), 8 of
        8 protected while a kill had left 7 positions without their trailing stop (an operator's find).
        As a running engine counts them: one without its stops is uncovered only past its grace period at
        `at`, and lasting once without them for that long (a kill 1.25 s after a wave's fills recorded all
        six uncovered and lasting while their stops were on their way; another operator's find)."""
        row = await self._pool.fetchrow(
            """
            SELECT count(*) AS active,
                   count(*) FILTER (WHERE has_stop_loss AND has_trailing_stop) AS protected,
                   count(*) FILTER (WHERE NOT (has_stop_loss AND has_trailing_stop) AND opened_at <= $2)
                       AS uncovered,
                   count(*) FILTER (
                       WHERE NOT (has_stop_loss AND has_trailing_stop)
                         AND COALESCE(unprotected_since, opened_at) <= $2
                   ) AS lasting
            FROM monitoring.positions
            WHERE account = $1 AND status IN ('pending_protection', 'active', 'closing')
              AND opened_at IS NOT NULL
            """,
            self.account,
            at - timedelta(seconds=grace_seconds),
        )
        active, protected = int(row["active"]), int(row["protected"])
        return CoverageSample(
            at=at,
            active=active,
            protected=protected,
            uncovered=int(row["uncovered"]),
            lasting=int(row["lasting"]),
            coverage_pct=None
            if not active
            else (Decimal(100) * protected / active).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP),
        )

    async def latest_coverage_sample(self) -> CoverageSample | None:
        """The account's last sample of the coverage series (a watch draws the trend the engine records)."""
        row = await self._pool.fetchrow(
            """
            SELECT at, active, protected, uncovered, lasting, coverage_pct FROM monitoring.coverage_samples
            WHERE account = $1 ORDER BY at DESC LIMIT 1
            """,
            self.account,
        )
        return None if row is None else CoverageSample(**dict(row))

    async def coverage_samples_since(self, moment: datetime) -> list[CoverageSample]:
        """The account's samples from `moment` on, oldest first (the dashboard's last hour, across starts)."""
        rows = await self._pool.fetch(
            """
            SELECT at, active, protected, uncovered, lasting, coverage_pct FROM monitoring.coverage_samples
            WHERE account = $1 AND at >= $2 ORDER BY at
            """,
            self.account,
            moment,
        )
        return [CoverageSample(**dict(row)) for row in rows]

    async def delete_coverage_samples_before(self, moment: datetime) -> int:
        """Retention: this account's samples older than `moment` go. Returns how many."""
        result = await self._pool.execute(
            "DELETE FROM monitoring.coverage_samples WHERE account = $1 AND at < $2", self.account, moment
        )
        return int(result.split()[-1])

    async def dashboard_history(
        self, *, shift_since: datetime | None, tz: tzinfo, sample_stands_seconds: float
    ) -> history.DashboardHistory:
        """This account's history as the dashboard shows it (per hour, per day, the current shift)."""
        return await history.dashboard_history(
            self._pool,
            self.account,
            shift_since=shift_since,
            tz=tz,
            sample_stands_seconds=sample_stands_seconds,
        )

    # --- events ------------------------------------------------------------------------------------------

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
        """Append an event. With `write_id` (and `at`, its time) the write is idempotent: an event with the
        same time and `data.write_id` already there is not added again (a write replayed from the journal
        after the first attempt did reach the database)."""
        if write_id is None:
            return await self._pool.fetchval(
                """
                INSERT INTO monitoring.events (severity, type, message, symbol, position_id, data, created_at, account)
                VALUES ($1, $2, $3, $4, $5, $6, COALESCE($7::timestamptz, now()), $8) RETURNING id
                """,
                severity.value,
                type,
                message,
                symbol,
                position_id,
                dict(data or {}),
                at,
                self.account,
            )
        if at is None:
            raise ValueError("an idempotent event write needs its time (at)")
        # events_created_at_idx finds the earlier copy, if any, by its time.
        return await self._pool.fetchval(
            """
            WITH earlier AS (
                SELECT id FROM monitoring.events WHERE created_at = $7 AND data->>'write_id' = $8
            ), inserted AS (
                INSERT INTO monitoring.events (severity, type, message, symbol, position_id, data, created_at, account)
                SELECT $1, $2, $3, $4, $5, $6, $7, $9
                WHERE NOT EXISTS (SELECT 1 FROM earlier)
                RETURNING id
            )
            SELECT id FROM inserted UNION ALL SELECT id FROM earlier LIMIT 1
            """,
            severity.value,
            type,
            message,
            symbol,
            position_id,
            {**dict(data or {}), "write_id": write_id},
            at,
            write_id,
            self.account,
        )

    async def recent_events(
        self, limit: int = 100, min_severity: Severity = Severity.DEBUG
    ) -> list[EventRecord]:
        """Newest first, at or above `min_severity`."""
        wanted = [s.value for s in Severity if _SEVERITY_RANK[s] >= _SEVERITY_RANK[min_severity]]
        rows = await self._pool.fetch(
            """
            SELECT * FROM monitoring.events
            WHERE severity = ANY($1::text[]) AND (account = $3 OR account IS NULL)
            ORDER BY created_at DESC, id DESC LIMIT $2
            """,
            wanted,
            limit,
            self.account,
        )
        return [_event(r) for r in rows]

    async def last_event_id(self) -> int:
        """The id of the newest event recorded (0 for none): a reader that wants only what comes next
        follows `events_after` from here."""
        return int(await self._pool.fetchval("SELECT coalesce(max(id), 0) FROM monitoring.events"))

    async def events_after(
        self, after_id: int, limit: int = 1000, min_severity: Severity = Severity.DEBUG
    ) -> list[EventRecord]:
        """The events recorded after the one with id `after_id`, oldest first, at most `limit` (a reader
        that follows the log asks again from the last it got: none is skipped, however many come at once,
        and a replayed event, recorded late with its own older time, is not missed)."""
        wanted = [s.value for s in Severity if _SEVERITY_RANK[s] >= _SEVERITY_RANK[min_severity]]
        rows = await self._pool.fetch(
            """
            SELECT * FROM monitoring.events
            WHERE id > $4 AND severity = ANY($1::text[]) AND (account = $3 OR account IS NULL)
            ORDER BY id LIMIT $2
            """,
            wanted,
            limit,
            self.account,
            after_id,
        )
        return [_event(r) for r in rows]

    @staticmethod
    def _require(row: Any, key: object) -> Any:
        if row is None:
            raise LookupError(f"no row for {key!r}")
        return row

"""The invariant auditor: the venue's truth, sampled while faults happen, judged against the engine's
database (CONVENTIONS 17: a checker in the manner of Jepsen's, history in, verdict and figures out).

Each `sample()` reads what the venue holds — through a `VenueTruth`: `SimTruth` (the sim core's oracle view,
`SimCore.inspect`, which no ban refuses and no read lag hides), `EmulatorTruth` or `BybitEmulatorTruth`
(`GET /_sim/state` of `tsbot sim-exchange --control`, Binance's wire or Bybit's, never weighed nor
banned) — and what the engine's database says
(`monitoring.positions` joined with `monitoring.orders` by position, our orders recognised by the client-id
token of `monitoring.installation`), and hands both to `observe()`, which is pure: a test can feed it a
hand-built timeline. With a `ManualClock` the test calls `sample()` at each drive step; in real time
`sampling()` runs a background task that samples every ~200 ms.

A *condition* is a fact seen in one sample (e.g. "SFPUSDT held without a live trailing stop of ours"). It
starts at the first sample that shows it and ends at the first sample that no longer does; it becomes a
*violation* once it has lasted longer than its rule's allowance. Each incident is reported once, with when
it started, when it was judged a violation and how long it lasted. Positions are matched by symbol (one-way
mode: one position per symbol). "Ours" means the client id carries this installation's token
(`protection.order_ids.parse_client_order_id`); a stop of ours is a hard stop (`sl`) or a trailing stop
(`ts`, a native trailing order or a managed trail's stop) by the purpose in its id. On Bybit the stops are
fields of the position, with no id: each is ours, by the field it is.

The rules (allowances from `AuditLimits`, i.e. the engine's own settings):

* `uncovered` — a venue position without a live hard stop and a live trailing stop of ours that close it
  (side and quantity), past `grace_seconds` (or `uncovered_seconds` where a schedule says so), while the
  engine is up. A fired stop (TRIGGERING) is not live.
* `duplicate` — more than one live stop of ours of one kind on one symbol (allowance 0: never; a managed
  trail's make-before-break may set `duplicate_overlap_seconds`). Counted whatever the engine's state:
  a duplicate outlives the engine that placed it.
* `quantity` — a live stop of ours whose quantity differs from its symbol's position, past grace.
* `orphan` — a live stop of ours on a symbol with no position (or one it would not reduce), past grace
  (or `orphan_seconds` where a schedule says so), while the engine is up. A stop of a position that was
  just closed is fine within grace.
* `flag_without_order` — `has_stop_loss` / `has_trailing_stop` true in the database while none of that
  position's orders of that purpose is live on the venue, past one reconcile interval (+ slack).
* `db_not_on_venue` — a position the database holds open (`pending_protection`, `active`, `closing`) that
  the venue does not hold (symbol and side), past one reconcile interval (+ slack), while the engine is up.
* `venue_not_in_db` — a venue position the database does not know (no row of that symbol and side in any
  live status), past one reconcile interval (+ slack), while the engine is up.

"While the engine is up" is what the test says (`engine_up(True/False)`); when the engine comes up, the
gated conditions start afresh (it gets its allowance from its start). When the database cannot be read
(it went away), the database rules keep their conditions as they were and judge them at the next read.

Figures (`figures()`), from the same samples: every venue position is an *episode* (a symbol held on one
side, from the first sample that shows it to the first that does not). Over consecutive samples t_i,
t_{i+1}, each episode present at t_i adds t_{i+1} − t_i to its open time, and to its protected time if it
was protected at t_i (both stops live, closing it, quantity at least the position's). Time-weighted
coverage = Σ protected / Σ open over all episodes, engine up or not (exchange stops protect a position
whatever the engine does). Worst time unprotected = the longest run of consecutive unprotected samples of
one episode, from its first unprotected sample to the first protected one (or its end). Resolution: one
sampling interval.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any, Protocol

import aiohttp
import asyncpg

from engine.clock import Clock, SystemClock
from engine.venues.sim.core import DEFAULT_ACCOUNT, SimCore
from protection.order_ids import parse_client_order_id
from storage.repositories import OrderPurpose

# ----------------------------------------------------------------------------------------- what is seen


@dataclass(frozen=True, slots=True)
class SeenPosition:
    symbol: str
    side: str  # long | short
    quantity: Decimal

    @property
    def closing_side(self) -> str:
        return "sell" if self.side == "long" else "buy"


@dataclass(frozen=True, slots=True)
class SeenStop:
    symbol: str
    client_order_id: str
    side: str  # buy | sell
    quantity: Decimal
    type: str  # stop_market | trailing_stop_market
    # A position-level stop (Bybit's `stopLoss` / `trailingStop` fields): the venue names its purpose and
    # keeps no client id (`client_order_id` then says which field it is). None: an order, ours by its id.
    purpose: OrderPurpose | None = None


@dataclass(frozen=True, slots=True)
class VenueView:
    """The venue's truth at one instant: positions, live conditional orders (read-lagged ones included),
    and fired ones that have not finished (TRIGGERING: not live)."""

    positions: tuple[SeenPosition, ...]
    open_stops: tuple[SeenStop, ...]
    triggering: tuple[SeenStop, ...] = ()
    banned: bool = False  # the venue refuses every request of the engine now (an HTTP 418 ban)


@dataclass(frozen=True, slots=True)
class DbPosition:
    id: int
    symbol: str
    side: str
    quantity: Decimal
    status: str
    has_stop_loss: bool
    has_trailing_stop: bool
    stop_loss_ids: frozenset[str] = frozenset()
    trailing_stop_ids: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class DbView:
    positions: tuple[DbPosition, ...]


DB_OPEN = frozenset({"pending_protection", "active", "closing"})  # the database says the venue holds it
DB_KNOWN = DB_OPEN | {"pending_entry", "entry_placed"}  # the database knows the position (or its entry)


# ----------------------------------------------------------------------------------------- the venues


class VenueTruth(Protocol):
    async def read(self) -> VenueView: ...


class SimTruth:
    """The sim core's oracle view (`SimCore.inspect`): nothing refused, nothing hidden by read lag."""

    def __init__(self, core: SimCore, clock: Clock, account_id: str = DEFAULT_ACCOUNT) -> None:
        self._core = core
        self._clock = clock
        self._account = account_id

    async def read(self) -> VenueView:
        seen = self._core.inspect(self._clock.now(), self._account)
        return VenueView(
            positions=tuple(SeenPosition(p.symbol, p.side.value, p.quantity) for p in seen.positions),
            open_stops=tuple(_sim_stop(o) for o in seen.open_conditional),
            triggering=tuple(_sim_stop(o) for o in seen.triggering),
            banned=seen.banned_until is not None,
        )


def _sim_stop(order: Any) -> SeenStop:
    return SeenStop(order.symbol, order.client_order_id, order.side.value, order.quantity, order.type.value)


class _ControlApiTruth:
    """`GET /_sim/state` of a wire emulator over loopback HTTP (its control API, never weighed nor banned)."""

    def __init__(self, base_url: str, *, timeout_seconds: float = 2.0) -> None:
        self._url = f"{base_url.rstrip('/')}/_sim/state"
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    async def _state(self) -> dict[str, Any]:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        async with self._session.get(self._url) as response:
            response.raise_for_status()
            return await response.json()

    @staticmethod
    def _positions(state: Mapping[str, Any]) -> tuple[SeenPosition, ...]:
        return tuple(SeenPosition(p["symbol"], p["side"], Decimal(p["quantity"])) for p in state["positions"])

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class EmulatorTruth(_ControlApiTruth):
    """The Binance-wire emulator's state: its positions, open and triggering algo orders, its ban."""

    async def read(self) -> VenueView:
        state = await self._state()
        return VenueView(
            positions=self._positions(state),
            open_stops=tuple(
                SeenStop(
                    o["symbol"],
                    o["clientAlgoId"],
                    o["side"].lower(),
                    Decimal(o["quantity"]),
                    o["orderType"].lower(),
                )
                for o in state["open_algo_orders"]
            ),
            triggering=tuple(
                SeenStop(o["symbol"], o["clientAlgoId"], "", Decimal(0), "")
                for o in state.get("triggering_algo_orders", ())
            ),
            banned=state["rate"].get("banned_until_ms") is not None,
        )


class BybitEmulatorTruth(_ControlApiTruth):
    """The Bybit-wire emulator's state. Bybit's stops are fields of the position (`stopLoss`, and
    `trailingStop` with its optional `activePrice`), set by trading-stop: each closes the whole position
    (tpslMode Full), and none carries a client id, so each is seen by its purpose (`SeenStop.purpose`). A
    fired one closes the position at once (nothing sits TRIGGERING); a stop left on a symbol the account
    no longer holds would be seen reducing nothing (an orphan)."""

    async def read(self) -> VenueView:
        state = await self._state()
        positions = self._positions(state)
        held = {p.symbol: p for p in positions}
        stops = []
        for fields in state["position_stops"]:
            position = held.get(fields["symbol"])
            side, quantity = (position.closing_side, position.quantity) if position else ("", Decimal(0))
            for field_name, kind, purpose in (
                ("stopLoss", "stop_market", OrderPurpose.STOP_LOSS),
                ("trailingStop", "trailing_stop_market", OrderPurpose.TRAILING_STOP),
            ):
                if fields.get(field_name) is not None:
                    stops.append(SeenStop(fields["symbol"], field_name, side, quantity, kind, purpose))
        return VenueView(
            positions=positions,
            open_stops=tuple(stops),
            banned=state["rate"].get("banned_until_ms") is not None,
        )


# ----------------------------------------------------------------------------------------- the database

_DB_POSITIONS = """
SELECT p.id, p.symbol, p.side, p.quantity, p.status, p.has_stop_loss, p.has_trailing_stop,
       COALESCE(array_agg(o.client_order_id) FILTER (WHERE o.purpose = 'stop_loss'), '{}') AS stop_loss_ids,
       COALESCE(array_agg(o.client_order_id) FILTER (WHERE o.purpose = 'trailing_stop'), '{}') AS trailing_ids
FROM monitoring.positions p
LEFT JOIN monitoring.orders o ON o.position_id = p.id
WHERE p.status NOT IN ('closed', 'failed')
GROUP BY p.id
"""


class PostgresTruth:
    """The engine's database as the operators' SQL sees it, on a connection of the auditor's own (a
    database that goes away is reported as unreadable, and reconnected to at the next sample)."""

    def __init__(self, dsn: str, *, timeout_seconds: float = 2.0) -> None:
        self._dsn = dsn
        self._timeout = timeout_seconds
        self._conn: asyncpg.Connection | None = None

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self._dsn, timeout=self._timeout)
        return self._conn

    async def token(self) -> str | None:
        conn = await self._connection()
        return await conn.fetchval("SELECT token FROM monitoring.installation", timeout=self._timeout)

    async def read(self) -> DbView:
        conn = await self._connection()
        rows = await conn.fetch(_DB_POSITIONS, timeout=self._timeout)
        return DbView(
            tuple(
                DbPosition(
                    id=r["id"],
                    symbol=r["symbol"],
                    side=r["side"],
                    quantity=Decimal(r["quantity"]),
                    status=r["status"],
                    has_stop_loss=r["has_stop_loss"],
                    has_trailing_stop=r["has_trailing_stop"],
                    stop_loss_ids=frozenset(r["stop_loss_ids"]),
                    trailing_stop_ids=frozenset(r["trailing_ids"]),
                )
                for r in rows
            )
        )

    async def close(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            self._conn.terminate()
        self._conn = None


# ----------------------------------------------------------------------------------------- the rules


class Rule(StrEnum):
    UNCOVERED = "uncovered"
    DUPLICATE = "duplicate"
    QUANTITY = "quantity"
    ORPHAN = "orphan"
    FLAG_WITHOUT_ORDER = "flag_without_order"
    DB_NOT_ON_VENUE = "db_not_on_venue"
    VENUE_NOT_IN_DB = "venue_not_in_db"


_DB_RULES = frozenset({Rule.FLAG_WITHOUT_ORDER, Rule.DB_NOT_ON_VENUE, Rule.VENUE_NOT_IN_DB})
_ALWAYS = frozenset({Rule.DUPLICATE})  # judged whether the engine is up or not


@dataclass(frozen=True, slots=True)
class AuditLimits:
    grace_seconds: float
    reconcile_seconds: float
    # The reconcile pass that notices a change takes round trips of its own (a snapshot, exit evidence by
    # id, the guard's database write): the database may lag the venue by one interval plus this.
    reconcile_slack_seconds: float
    duplicate_overlap_seconds: float = 0.0
    # Managed trailing mode has no trailing order before the trail activates: then only the hard stop is
    # required of a position (the trail's stop, once placed, still counts towards coverage).
    trailing_order_required: bool = True
    # How long a position may go without its stops, and a stop of ours outlive its position; None: the
    # grace period. A schedule that knowingly tolerates a known defect says so here, by name.
    uncovered_seconds: float | None = None
    orphan_seconds: float | None = None

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> AuditLimits:
        protection = settings.protection
        values: dict[str, Any] = {
            "grace_seconds": float(protection.grace_seconds),
            "reconcile_seconds": float(protection.reconcile_seconds),
            "reconcile_slack_seconds": float(protection.call_timeout_seconds),
        }
        values.update(overrides)
        return cls(**values)

    def allowance(self, rule: Rule) -> float:
        if rule is Rule.DUPLICATE:
            return self.duplicate_overlap_seconds
        if rule in _DB_RULES:
            return self.reconcile_seconds + self.reconcile_slack_seconds
        if rule is Rule.ORPHAN and self.orphan_seconds is not None:
            return self.orphan_seconds
        if rule is Rule.UNCOVERED and self.uncovered_seconds is not None:
            return self.uncovered_seconds
        return self.grace_seconds


@dataclass(slots=True)
class Violation:
    rule: Rule
    symbol: str
    started_at: float  # first sample that showed the condition (auditor time)
    detected_at: float  # first sample past the allowance
    detail: str
    ended_at: float | None = None  # first sample that no longer showed it; None: still there
    last_seen_at: float = 0.0

    def duration(self, now: float) -> float:
        return (self.ended_at if self.ended_at is not None else max(now, self.last_seen_at)) - self.started_at


@dataclass(slots=True)
class _Condition:
    since: float
    detail: str
    violation: Violation | None = None


@dataclass(slots=True)
class _Episode:
    symbol: str
    side: str
    opened_at: float
    open_seconds: float = 0.0
    protected_seconds: float = 0.0
    protected: bool = False
    unprotected_since: float | None = None
    worst_unprotected: float = 0.0
    closed_at: float | None = None
    cause: str = ""  # why it was unprotected at the last sample (see `_cause`)
    unprotected_by_cause: dict[str, float] = field(default_factory=dict)

    def unprotected_stretch(self, now: float) -> float:
        return 0.0 if self.unprotected_since is None else now - self.unprotected_since


@dataclass(frozen=True, slots=True)
class AuditFigures:
    samples: int
    seconds_audited: float
    positions: int  # venue position episodes seen
    open_seconds: float
    protected_seconds: float
    time_weighted_coverage_pct: float | None  # None: no position was ever open
    worst_unprotected_s: float
    worst_unprotected_symbol: str | None
    violations: Mapping[str, int]
    duplicates: int
    lost_positions: int
    venue_read_failures: int
    db_read_failures: int
    unprotected_seconds_by_cause: Mapping[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "seconds_audited": round(self.seconds_audited, 3),
            "positions": self.positions,
            "open_seconds": round(self.open_seconds, 3),
            "protected_seconds": round(self.protected_seconds, 3),
            "time_weighted_coverage_pct": None
            if self.time_weighted_coverage_pct is None
            else round(self.time_weighted_coverage_pct, 4),
            "worst_unprotected_s": round(self.worst_unprotected_s, 3),
            "worst_unprotected_symbol": self.worst_unprotected_symbol,
            "violations": dict(self.violations),
            "duplicates": self.duplicates,
            "lost_positions": self.lost_positions,
            "venue_read_failures": self.venue_read_failures,
            "db_read_failures": self.db_read_failures,
            "unprotected_seconds_by_cause": {
                cause: round(seconds, 3)
                for cause, seconds in sorted(self.unprotected_seconds_by_cause.items())
            },
        }


class InvariantAuditor:
    def __init__(
        self,
        venue: VenueTruth | None,
        database: PostgresTruth | None,
        limits: AuditLimits,
        *,
        token: str | None = None,
        clock: Clock | None = None,
        engine_up: bool = False,
    ) -> None:
        self.venue = venue
        self.database = database
        self.limits = limits
        self.token = token
        self._clock = clock or SystemClock()
        self._up = engine_up
        self._conditions: dict[tuple[Rule, str, str], _Condition] = {}
        self.violations: list[Violation] = []
        self._episodes: dict[str, _Episode] = {}
        self._finished: list[_Episode] = []
        self._origin: float | None = None
        self._last_sample: float | None = None
        self.samples = 0
        self.venue_read_failures = 0
        self.db_read_failures = 0
        self.last_db_error: str | None = None

    # --- driving -------------------------------------------------------------------------------------

    def engine_up(self, up: bool, now: float | None = None) -> None:
        """What the test knows: the engine runs (True) or is stopped, killed, not started yet (False)."""
        if up == self._up:
            return
        self._up = up
        # Either way the gated conditions start afresh: an engine gets its allowance from its start, and
        # nothing is asked of an engine that is down.
        self._close_where(lambda rule: rule not in _ALWAYS, self._now(now))

    async def sample(self, now: float | None = None, *, read_database: bool = True) -> None:
        """Read the venue and the database once and judge them. `read_database=False`: the venue only
        (the database rules keep their conditions for the next read), e.g. while the database is frozen
        and a read would only wait out its timeout."""
        assert self.venue is not None, "no venue to sample"
        try:
            view = await self.venue.read()
        except Exception:  # the venue's control API did not answer: nothing seen, nothing judged
            self.venue_read_failures += 1
            return
        db_view = None
        if self.database is not None and (read_database or self.token is None):
            try:
                if self.token is None:
                    self.token = await self.database.token()
                db_view = await self.database.read()
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self.db_read_failures += 1
                self.last_db_error = f"{type(exc).__name__}: {exc}"
                with contextlib.suppress(Exception):
                    await self.database.close()
        if self.token is None:  # our orders cannot be told from anyone else's yet: nothing judged
            return
        self.observe(self._now(now), view, db_view)

    @contextlib.asynccontextmanager
    async def sampling(self, interval: float = 0.2) -> AsyncIterator[InvariantAuditor]:
        """Sample every `interval` seconds of the auditor's clock in a background task (real time)."""

        async def loop() -> None:
            while True:
                await self.sample()
                await self._clock.sleep(interval)

        task = asyncio.create_task(loop(), name="invariant-auditor")
        try:
            yield self
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]  # a bug in the auditor must not pass silently

    async def close(self) -> None:
        for source in (self.venue, self.database):
            closer = getattr(source, "close", None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer()

    # --- judging (pure) ------------------------------------------------------------------------------

    def observe(self, now: float, venue: VenueView, db: DbView | None) -> None:
        """Judge one sample: the venue's truth at `now`, and the database (None: could not be read)."""
        if self.token is None:
            raise RuntimeError("the auditor needs the installation token to recognise our orders")
        if self._origin is None:
            self._origin = now
        self._account(now, venue)
        self.samples += 1
        seen = self._venue_conditions(venue)
        judged: set[Rule] = {Rule.DUPLICATE}
        if self._up:
            judged |= {Rule.UNCOVERED, Rule.QUANTITY, Rule.ORPHAN}
        if db is not None:
            seen.update(self._db_conditions(venue, db))
            if self._up:
                judged |= _DB_RULES
        for key, detail in seen.items():
            if key[0] not in judged:
                continue
            condition = self._conditions.get(key)
            if condition is None:
                condition = self._conditions[key] = _Condition(since=now, detail=detail)
            condition.detail = detail
            allowance = self.limits.allowance(key[0])
            if condition.violation is None and (allowance <= 0 or now - condition.since > allowance):
                condition.violation = Violation(key[0], key[1], condition.since, now, detail)
                self.violations.append(condition.violation)
            if condition.violation is not None:
                condition.violation.last_seen_at = now
                condition.violation.detail = detail
        for key in [k for k in self._conditions if k[0] in judged and k not in seen]:
            self._end(key, now)

    def _our_stops(self, venue: VenueView) -> dict[str, list[tuple[SeenStop, OrderPurpose]]]:
        """The live stops of ours by symbol, each with its purpose: an order by the purpose in its id (this
        installation's token), a position-level stop by the field it is (the venue's stops of the account's
        own positions: nobody else sets them there)."""
        token = self.token
        assert token is not None
        ours: dict[str, list[tuple[SeenStop, OrderPurpose]]] = {}
        for stop in venue.open_stops:
            purpose = stop.purpose
            if purpose is None:
                key = parse_client_order_id(stop.client_order_id, token)
                purpose = None if key is None else key.purpose
            if purpose in (OrderPurpose.STOP_LOSS, OrderPurpose.TRAILING_STOP):
                ours.setdefault(stop.symbol, []).append((stop, purpose))
        return ours

    def _venue_conditions(self, venue: VenueView) -> dict[tuple[Rule, str, str], str]:
        found: dict[tuple[Rule, str, str], str] = {}
        positions = {p.symbol: p for p in venue.positions}
        ours = self._our_stops(venue)
        for symbol, stops in ours.items():
            for purpose in (OrderPurpose.STOP_LOSS, OrderPurpose.TRAILING_STOP):
                ids = sorted(s.client_order_id for s, p in stops if p is purpose)
                if len(ids) > 1:
                    found[(Rule.DUPLICATE, symbol, purpose.value)] = (
                        f"{len(ids)} live {purpose.value}: {', '.join(ids)}"
                    )
            position = positions.get(symbol)
            for stop, _purpose in stops:
                if position is None or stop.side != position.closing_side:
                    held = (
                        "no position"
                        if position is None
                        else f"a {position.side} position it would not reduce"
                    )
                    found[(Rule.ORPHAN, symbol, stop.client_order_id)] = (
                        f"our {stop.type} {stop.client_order_id} live on {held}"
                    )
                elif stop.quantity != position.quantity:
                    found[(Rule.QUANTITY, symbol, stop.client_order_id)] = (
                        f"our {stop.type} {stop.client_order_id} for {stop.quantity}, position {position.quantity}"
                    )
        for position in venue.positions:
            missing = self._missing_protection(position, ours.get(position.symbol, ()))
            if missing:
                fired = [s.client_order_id for s in venue.triggering if s.symbol == position.symbol]
                found[(Rule.UNCOVERED, position.symbol, "")] = (
                    f"{position.side} {position.quantity} without a live {' or '.join(missing)} of ours"
                    + (f" (fired, not finished: {', '.join(fired)})" if fired else "")
                )
        return found

    def _missing_protection(
        self, position: SeenPosition, stops: Iterable[tuple[SeenStop, OrderPurpose]]
    ) -> list[str]:
        protecting = {
            purpose
            for stop, purpose in stops
            if stop.side == position.closing_side and stop.quantity >= position.quantity
        }
        missing = []
        if OrderPurpose.STOP_LOSS not in protecting:
            missing.append("hard stop")
        if OrderPurpose.TRAILING_STOP not in protecting and self.limits.trailing_order_required:
            missing.append("trailing stop")
        return missing

    def _db_conditions(self, venue: VenueView, db: DbView) -> dict[tuple[Rule, str, str], str]:
        found: dict[tuple[Rule, str, str], str] = {}
        live = {s.client_order_id for s in venue.open_stops if s.purpose is None}
        # A position-level stop has no id: whichever of the position's orders of its purpose set it
        live_fields = {(s.symbol, s.purpose) for s in venue.open_stops if s.purpose is not None}
        held = {(p.symbol, p.side) for p in venue.positions}
        for row in db.positions:
            if row.status in DB_OPEN:
                for flag, ids, what, purpose in (
                    (row.has_stop_loss, row.stop_loss_ids, "has_stop_loss", OrderPurpose.STOP_LOSS),
                    (
                        row.has_trailing_stop,
                        row.trailing_stop_ids,
                        "has_trailing_stop",
                        OrderPurpose.TRAILING_STOP,
                    ),
                ):
                    if flag and not ids & live and (row.symbol, purpose) not in live_fields:
                        found[(Rule.FLAG_WITHOUT_ORDER, row.symbol, f"{row.id}:{what}")] = (
                            f"position {row.id} {what} true, none of its orders live "
                            f"({', '.join(sorted(ids)) or 'none recorded'})"
                        )
                if (row.symbol, row.side) not in held:
                    found[(Rule.DB_NOT_ON_VENUE, row.symbol, str(row.id))] = (
                        f"position {row.id} {row.side} {row.quantity} is '{row.status}' in the database, "
                        "the venue does not hold it"
                    )
        known = {(r.symbol, r.side) for r in db.positions if r.status in DB_KNOWN}
        for position in venue.positions:
            if (position.symbol, position.side) not in known:
                found[(Rule.VENUE_NOT_IN_DB, position.symbol, position.side)] = (
                    f"the venue holds {position.side} {position.quantity}, the database knows no such position"
                )
        return found

    def _end(self, key: tuple[Rule, str, str], now: float) -> None:
        condition = self._conditions.pop(key)
        if condition.violation is not None:
            condition.violation.ended_at = now

    def _close_where(self, predicate: Any, now: float) -> None:
        for key in [k for k in self._conditions if predicate(k[0])]:
            self._end(key, now)

    # --- figures -------------------------------------------------------------------------------------

    def _account(self, now: float, venue: VenueView) -> None:
        if self._last_sample is not None:
            elapsed = now - self._last_sample
            for episode in self._episodes.values():
                episode.open_seconds += elapsed
                if episode.protected:
                    episode.protected_seconds += elapsed
                else:
                    causes = episode.unprotected_by_cause
                    causes[episode.cause] = causes.get(episode.cause, 0.0) + elapsed
        self._last_sample = now
        present = {p.symbol: p for p in venue.positions}
        stops = self._our_stops(venue)
        for symbol, episode in list(self._episodes.items()):
            position = present.get(symbol)
            if position is None or position.side != episode.side:
                self._close_episode(episode, now)
                self._finished.append(self._episodes.pop(symbol))
        for symbol, position in present.items():
            episode = self._episodes.get(symbol)
            if episode is None:
                episode = self._episodes[symbol] = _Episode(symbol, position.side, opened_at=now)
            episode.protected = not self._missing_protection(position, stops.get(symbol, ()))
            episode.cause = "" if episode.protected else self._cause(episode, venue, now)
            if episode.protected:
                episode.worst_unprotected = max(episode.worst_unprotected, episode.unprotected_stretch(now))
                episode.unprotected_since = None
            elif episode.unprotected_since is None:
                episode.unprotected_since = now

    def _cause(self, episode: _Episode, venue: VenueView, now: float) -> str:
        """Why a position lacks a stop: `fired` (one of its stops fired and the venue has not finished
        filling it: TRIGGERING), `fired_banned` (the same while the venue bans the engine: its close at
        market cannot be sent), `opening` (its first stops on their way, within grace of the position
        appearing), `opening_banned` (the same while the venue bans the engine: no stop can be placed
        before the ban ends), else `other` (lost, refused or not yet replaced: what the engine must answer
        for)."""
        if any(stop.symbol == episode.symbol for stop in venue.triggering):
            return "fired_banned" if venue.banned else "fired"
        if now - episode.opened_at <= self.limits.grace_seconds and episode.protected_seconds == 0.0:
            return "opening_banned" if venue.banned else "opening"
        return "other"

    @staticmethod
    def _close_episode(episode: _Episode, now: float) -> None:
        episode.worst_unprotected = max(episode.worst_unprotected, episode.unprotected_stretch(now))
        episode.unprotected_since = None
        episode.closed_at = now

    def figures(self) -> AuditFigures:
        now = self._last_sample if self._last_sample is not None else 0.0
        episodes = [*self._finished, *self._episodes.values()]
        open_seconds = sum(e.open_seconds for e in episodes)
        protected_seconds = sum(e.protected_seconds for e in episodes)
        worst, worst_symbol = 0.0, None
        for episode in episodes:
            stretch = max(episode.worst_unprotected, episode.unprotected_stretch(now))
            if stretch > worst:
                worst, worst_symbol = stretch, episode.symbol
        counts: dict[str, int] = {}
        for violation in self.violations:
            counts[violation.rule.value] = counts.get(violation.rule.value, 0) + 1
        return AuditFigures(
            samples=self.samples,
            seconds_audited=0.0 if self._origin is None else now - self._origin,
            positions=len(episodes),
            open_seconds=open_seconds,
            protected_seconds=protected_seconds,
            time_weighted_coverage_pct=100.0 * protected_seconds / open_seconds if open_seconds else None,
            worst_unprotected_s=worst,
            worst_unprotected_symbol=worst_symbol,
            violations=counts,
            duplicates=counts.get(Rule.DUPLICATE.value, 0),
            lost_positions=counts.get(Rule.DB_NOT_ON_VENUE.value, 0)
            + counts.get(Rule.VENUE_NOT_IN_DB.value, 0),
            venue_read_failures=self.venue_read_failures,
            db_read_failures=self.db_read_failures,
            unprotected_seconds_by_cause=_summed(e.unprotected_by_cause for e in episodes),
        )

    def unprotected_per_position(self, cause: str) -> list[float]:
        """Each position episode's seconds unprotected for `cause` (0.0 where it had none), in the order
        they were first seen: how a total spreads over the positions (one long stretch, or a little each)."""
        episodes = sorted([*self._finished, *self._episodes.values()], key=lambda e: e.opened_at)
        return [e.unprotected_by_cause.get(cause, 0.0) for e in episodes]

    def open_conditions(self) -> list[tuple[Rule, str, str]]:
        """Conditions the last samples showed and that have not ended (violations or not yet): empty
        when the venue, the database and the rules agree."""
        return [(key[0], key[1], c.detail) for key, c in self._conditions.items()]

    # --- verdict -------------------------------------------------------------------------------------

    def report(self) -> str:
        now = self._last_sample if self._last_sample is not None else 0.0
        origin = self._origin or 0.0
        lines = []
        for v in sorted(self.violations, key=lambda v: (v.started_at, v.rule, v.symbol)):
            state = "still there" if v.ended_at is None else f"ended t={v.ended_at - origin:.2f}s"
            lines.append(
                f"  [{v.rule.value}] {v.symbol} from t={v.started_at - origin:.2f}s for {v.duration(now):.2f}s "
                f"(allowed {self.limits.allowance(v.rule):g}s; {state}): {v.detail}"
            )
        return "\n".join(lines)

    def assert_clean(self) -> None:
        if self.samples == 0:
            raise AssertionError("the auditor never sampled: a checker that saw nothing proves nothing")
        if self.violations:
            raise AssertionError(
                f"{len(self.violations)} invariant violation(s) on the venue's truth:\n{self.report()}"
            )

    def _now(self, now: float | None) -> float:
        return self._clock.monotonic() if now is None else now


def _summed(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for part in parts:
        for key, seconds in part.items():
            total[key] = total.get(key, 0.0) + seconds
    return total


__all__ = [
    "AuditFigures",
    "AuditLimits",
    "DbPosition",
    "DbView",
    "EmulatorTruth",
    "InvariantAuditor",
    "PostgresTruth",
    "Rule",
    "SeenPosition",
    "SeenStop",
    "SimTruth",
    "VenueTruth",
    "VenueView",
    "Violation",
]

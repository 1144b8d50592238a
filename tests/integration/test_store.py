"""The monitoring schema and the repositories, against a real embedded PostgreSQL."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from storage.database import Database
from storage.embedded import EmbeddedPostgres
from storage.lease import LEASE_NAMESPACE, EngineLease, LeasePhase, current_holder
from storage.repositories import (
    OrderPurpose,
    OrderRecordStatus,
    PositionAlreadyOpen,
    PositionStatus,
    ProtectionFactsRow,
    Severity,
    Store,
)
from tests.support.records import entry_recorded

# Verbatim from the incident report: operators' SQL must keep working.
INCIDENT_COVERAGE_SQL = (
    "SELECT COUNT(*) AS total, SUM(CASE WHEN has_trailing_stop THEN 1 ELSE 0 END) AS with_ts, "
    "ROUND(100.0 * SUM(CASE WHEN has_trailing_stop THEN 1 ELSE 0 END) / COUNT(*), 1) AS coverage_pct "
    "FROM monitoring.positions WHERE status='active';"
)


async def _active_position(store: Store, symbol: str, *, trailing: bool, stop: bool = True) -> int:
    position = await store.create_position(symbol=symbol, exchange="sim", side="long", quantity=Decimal("1"))
    await store.record_fill(position.id, Decimal("1"), Decimal("100"))
    await store.set_protection_facts(
        position.id, has_stop_loss=stop, has_trailing_stop=trailing, stop_loss_price=Decimal("97")
    )
    await store.set_position_status(position.id, PositionStatus.ACTIVE)
    return position.id


async def test_incident_sql_runs_unchanged_and_matches_store_coverage(db: Database) -> None:
    store = Store(db.pool)
    for i in range(74):
        await _active_position(store, f"C{i}USDT", trailing=i < 27)
    # Terminal positions must not count, whatever their flags said while live.
    closed = await _active_position(store, "GONEUSDT", trailing=True)
    await store.set_position_status(closed, PositionStatus.CLOSED, exit_reason="stop_loss")

    row = await db.pool.fetchrow(INCIDENT_COVERAGE_SQL)
    coverage = await store.coverage()

    assert (row["total"], row["with_ts"], row["coverage_pct"]) == (74, 27, Decimal("36.5"))
    assert (coverage.active, coverage.with_trailing_stop, coverage.coverage_pct) == (74, 27, Decimal("36.5"))
    assert coverage.with_stop_loss == 74
    assert coverage.stop_loss_coverage_pct == Decimal("100.0")


async def test_coverage_with_no_active_positions_is_unknown_not_zero(db: Database) -> None:
    coverage = await Store(db.pool).coverage()
    assert coverage.active == 0
    assert coverage.coverage_pct is None


async def test_one_non_terminal_position_per_account_and_symbol(db: Database) -> None:
    store = Store(db.pool)
    first = await store.create_position(symbol="SFPUSDT", exchange="sim", side="long", quantity=Decimal("5"))
    with pytest.raises(PositionAlreadyOpen, match="SFPUSDT on sim already has an open position"):
        await store.create_position(symbol="SFPUSDT", exchange="sim", side="short", quantity=Decimal("5"))
    # Every non-terminal status holds the slot, not only 'active'.
    for status in (PositionStatus.ENTRY_PLACED, PositionStatus.PENDING_PROTECTION, PositionStatus.CLOSING):
        await store.set_position_status(first.id, status)
        with pytest.raises(PositionAlreadyOpen):
            await store.create_position(symbol="SFPUSDT", exchange="sim", side="long", quantity=Decimal("1"))
    # Another account (here on another venue), same symbol: allowed.
    other = Store(db.pool, account="bybit:0123456789abcdef")
    await other.create_position(symbol="SFPUSDT", exchange="bybit", side="long", quantity=Decimal("1"))
    await store.set_position_status(first.id, PositionStatus.CLOSED, exit_reason="manual")
    reopened = await store.create_position(
        symbol="SFPUSDT", exchange="sim", side="short", quantity=Decimal("2")
    )
    assert reopened.id != first.id
    assert (await store.open_position_for_symbol("sim", "SFPUSDT")).id == reopened.id


async def test_protection_flags_default_false_and_are_cleared_when_the_position_ends(db: Database) -> None:
    store = Store(db.pool)
    created = await store.create_position(
        symbol="ALLUSDT", exchange="sim", side="short", quantity=Decimal("3")
    )
    assert (created.has_stop_loss, created.has_trailing_stop, created.trailing_activated) == (
        False,
        False,
        False,
    )

    filled = await store.record_fill(created.id, Decimal("3"), Decimal("0.4512"))
    assert filled.status is PositionStatus.PENDING_PROTECTION
    assert filled.entry_price == Decimal("0.4512")
    assert filled.opened_at is not None

    half = await store.set_protection_facts(
        created.id, has_stop_loss=True, has_trailing_stop=False, stop_loss_price=Decimal("0.4647")
    )
    assert half.protected_at is None, "protected_at waits for both stops"
    both = await store.set_protection_facts(
        created.id, has_stop_loss=True, has_trailing_stop=True, stop_loss_price=Decimal("0.4647")
    )
    assert both.protected_at is not None
    assert both.is_covered

    closed = await store.set_position_status(created.id, PositionStatus.CLOSED, exit_reason="trailing_stop")
    assert (closed.has_stop_loss, closed.has_trailing_stop) == (False, False)
    assert closed.closed_at is not None
    assert closed.exit_reason == "trailing_stop"


async def test_an_ended_position_is_never_written_open_again_nor_its_close_overwritten(db: Database) -> None:
    """A late fill turned a closed position back to `pending_protection` (listed open, to be restored and
    "protected"), a second close overwrote the first's reason and PnL, and a status write reopened it (a
    reviewer, at the SQL level: a journal replayed twice after a crash is one way there)."""
    store = Store(db.pool)
    position_id = await _active_position(store, "ENDUSDT", trailing=True)
    closed = await store.close_position(position_id, exit_reason="stop_loss", realized_pnl=Decimal("-2"))
    assert closed.status is PositionStatus.CLOSED

    late = await store.record_fill(position_id, Decimal("1"), Decimal("101"))
    assert late.status is PositionStatus.CLOSED
    assert late.entry_price == Decimal("100")
    again = await store.close_position(position_id, exit_reason="manual", realized_pnl=Decimal("5"))
    assert (again.exit_reason, again.realized_pnl) == ("stop_loss", Decimal("-2"))
    reopened = await store.set_position_status(position_id, PositionStatus.ACTIVE)
    assert reopened.status is PositionStatus.CLOSED
    assert position_id not in {p.id for p in await store.open_positions()}
    row = await db.pool.fetchrow(
        "SELECT status, exit_reason, realized_pnl, entry_price FROM monitoring.positions WHERE id = $1",
        position_id,
    )
    assert dict(row) == {
        "status": "closed",
        "exit_reason": "stop_loss",
        "realized_pnl": Decimal("-2"),
        "entry_price": Decimal("100"),
    }

    failed = await store.create_position(
        symbol="FAILUSDT", exchange="sim", side="long", quantity=Decimal("1")
    )
    await store.set_position_status(failed.id, PositionStatus.FAILED, exit_reason="entry_failed")
    assert (await store.record_fill(failed.id, Decimal("1"), Decimal("3"))).status is PositionStatus.FAILED


async def test_schema_checks_refuse_values_outside_the_contract(db: Database) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await db.pool.execute(
            "INSERT INTO monitoring.positions (account, symbol, exchange, side, quantity) "
            "VALUES ('sim:default', 'X', 'sim', 'LONG', 1)"
        )
    with pytest.raises(asyncpg.CheckViolationError):
        await db.pool.execute(
            "INSERT INTO monitoring.positions (account, symbol, exchange, side, quantity, status) "
            "VALUES ('sim:default', 'X', 'sim', 'long', 1, 'ACTIVE')"
        )


async def test_uncovered_positions_lists_live_positions_missing_either_stop(db: Database) -> None:
    store = Store(db.pool)
    covered = await _active_position(store, "AUSDT", trailing=True)
    no_ts = await _active_position(store, "BUSDT", trailing=False)
    no_sl = await _active_position(store, "CUSDT", trailing=True, stop=False)
    pending = await store.create_position(symbol="DUSDT", exchange="sim", side="long", quantity=Decimal("1"))
    await store.record_fill(pending.id, Decimal("1"), Decimal("10"))

    uncovered = {p.id for p in await store.uncovered_positions()}

    assert uncovered == {no_ts, no_sl, pending.id}
    assert covered not in uncovered


def _readme_uncovered_sql() -> str:
    """The operators' list of uncovered positions, as the README gives it (grace 5 s, the default)."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```sql\n")[1:]]
    (query,) = [b for b in blocks if "SELECT id, symbol, side, status" in b]
    return query


async def test_an_entry_left_pending_is_uncovered_once_no_engine_holds_the_account(
    db: Database, pg_server: EmbeddedPostgres
) -> None:
    """The engine records an entry `pending` and its position `entry_placed` before it sends it. Killed while
    the answer is outstanding, it leaves them so: the venue may hold a filled position without a stop. While
    an engine holds the account's lease it is resolving the entry (and counts it itself); with none, nobody
    is: uncovered. Before: never listed, engine or none."""
    assert LEASE_NAMESPACE == 29811  # the README's query names the lease's lock by it
    store = Store(db.pool)
    await _active_position(store, "AUSDT", trailing=True)  # covered: never listed
    naked = await _active_position(store, "BUSDT", trailing=False)
    # A managed trail: no order on the venue before it activates; armed by the engine that moves it.
    managed = await _active_position(store, "GUSDT", trailing=False)
    await db.pool.execute("UPDATE monitoring.positions SET trail_armed = true WHERE id = $1", managed)
    await db.pool.execute("UPDATE monitoring.positions SET opened_at = now() - interval '1 minute'")
    in_flight = await entry_recorded(store, "CUSDT")
    in_doubt = await entry_recorded(store, "DUSDT", answered=OrderRecordStatus.UNKNOWN)
    await db.pool.execute(  # in doubt for a minute: past grace
        "UPDATE monitoring.orders SET created_at = now() - interval '1 minute' WHERE position_id = $1",
        in_doubt,
    )
    # In doubt since just now: an engine looking after the account is settling it within its grace (and
    # counts it itself); with none, nobody is.
    fresh_doubt = await entry_recorded(store, "HUSDT", answered=OrderRecordStatus.UNKNOWN)
    # Killed between recording the refusal and the failed position: the entry is known not to have filled.
    await entry_recorded(store, "EUSDT", answered=OrderRecordStatus.REJECTED)
    # Killed before the send (the position not `entry_placed` yet): never sent.
    await entry_recorded(store, "FUSDT", sent=False)

    async def listed() -> tuple[set[int], set[int]]:
        by_store = {p.id for p in await store.uncovered_positions(5.0)}
        by_sql = {r["id"] for r in await db.pool.fetch(_readme_uncovered_sql())}
        return by_store, by_sql

    lease = await EngineLease.acquire(db.target.dsn, "sim", "sim:default", "test")
    try:
        # An engine holds the account: it is sending the entry, and moving the managed trail; only the
        # one in doubt counts.
        assert await listed() == ({naked, in_doubt},) * 2
        # It holds the lock but has not heartbeated for 31 s (hung, frozen, its host gone: the server keeps
        # the session): nobody is resolving the entry, nor moving the trail.
        await db.pool.execute("UPDATE monitoring.engine_leases SET heartbeat_at = now() - interval '31 s'")
        assert await listed() == ({naked, managed, in_flight, in_doubt, fresh_doubt},) * 2
        holder = await current_holder(db.pool, "sim", "sim:default")
        assert holder is not None
        assert holder.silent
        assert re.search(r"not heard for (3[1-9]|[4-9]\d)s \(hung, or its host is gone\)", holder.describe())
        await lease.heartbeat()  # heard again
        assert await listed() == ({naked, in_doubt},) * 2
        holder = await current_holder(db.pool, "sim", "sim:default")
        assert holder is not None
        assert (holder.silent, holder.looks_after) == (False, True)
        # Heard, but stopping (its loops are gone): nobody resolves the entry or moves the trail.
        await lease.heartbeat(LeasePhase.STOPPING)
        assert await listed() == ({naked, managed, in_flight, in_doubt, fresh_doubt},) * 2
    finally:
        await lease.release()
    # An engine starting (reading the venue, restoring) does not look after the account yet either: what a
    # killed run left is listed until it runs.
    lease = await EngineLease.acquire(db.target.dsn, "sim", "sim:default", "test", phase=LeasePhase.STARTING)
    try:
        assert await listed() == ({naked, managed, in_flight, in_doubt, fresh_doubt},) * 2
        holder = await current_holder(db.pool, "sim", "sim:default")
        assert holder is not None
        assert (holder.silent, holder.looks_after, holder.phase) == (False, False, "starting")
        await lease.heartbeat(LeasePhase.RUNNING)
        assert await listed() == ({naked, in_doubt},) * 2
    finally:
        await lease.release()
    # The engine is gone: nobody will learn the entry's outcome, nor move the trail (a SIGKILL leaves it
    # recorded armed).
    assert await listed() == ({naked, managed, in_flight, in_doubt, fresh_doubt},) * 2

    # An engine of the same account on another database of the server is not this database's engine.
    elsewhere = await asyncpg.connect(pg_server.dsn("postgres"))
    try:
        await elsewhere.execute("SELECT pg_advisory_lock(29811, hashtext('sim/sim:default'))")
        assert await listed() == ({naked, managed, in_flight, in_doubt, fresh_doubt},) * 2
        assert await current_holder(db.pool, "sim", "sim:default") is None
    finally:
        await elsewhere.close()


async def test_record_order_is_idempotent_by_client_order_id(db: Database) -> None:
    store = Store(db.pool)
    position = await store.create_position(
        symbol="SUIUSDT", exchange="sim", side="long", quantity=Decimal("10")
    )
    first = await store.record_order(
        client_order_id="tsb-1-sl-0",
        position_id=position.id,
        purpose=OrderPurpose.STOP_LOSS,
        side="sell",
        type="stop_market",
        quantity=Decimal("10"),
        trigger_price=Decimal("1.9400"),
    )
    again = await store.record_order(
        client_order_id="tsb-1-sl-0",
        position_id=position.id,
        purpose=OrderPurpose.STOP_LOSS,
        side="sell",
        type="stop_market",
        quantity=Decimal("99"),
        trigger_price=Decimal("1.0"),
    )
    assert again == first
    assert await db.pool.fetchval("SELECT count(*) FROM monitoring.orders") == 1

    opened = await store.set_order_status("tsb-1-sl-0", OrderRecordStatus.OPEN, exchange_order_id="778")
    assert opened.status is OrderRecordStatus.OPEN
    assert opened.exchange_order_id == "778"
    assert [o.client_order_id for o in await store.live_orders_for_position(position.id)] == ["tsb-1-sl-0"]
    await store.set_order_status("tsb-1-sl-0", OrderRecordStatus.CANCELED)
    assert await store.live_orders_for_position(position.id) == []
    assert (await store.order_by_client_id("tsb-1-sl-0")).status is OrderRecordStatus.CANCELED


async def test_client_order_ids_longer_than_36_chars_are_refused(db: Database) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await Store(db.pool).record_order(
            client_order_id="x" * 37,
            purpose=OrderPurpose.ENTRY,
            side="buy",
            type="market",
            quantity=Decimal("1"),
        )


async def test_events_are_append_only_and_filtered_by_severity(db: Database) -> None:
    store = Store(db.pool)
    await store.record_event(Severity.INFO, "position_opened", "opened SFPUSDT", symbol="SFPUSDT")
    event_id = await store.record_event(
        Severity.ERROR,
        "protection_timeout",
        "Timeout creating trailing stop for ALLUSDT",
        symbol="ALLUSDT",
        data={"latency_ms": 10012, "outcome": "retrying"},
    )
    errors = await store.recent_events(min_severity=Severity.WARNING)
    assert [e.id for e in errors] == [event_id]
    assert errors[0].data == {"latency_ms": 10012, "outcome": "retrying"}
    assert len(await store.recent_events()) == 2

    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await db.pool.execute("UPDATE monitoring.events SET message = 'rewritten'")
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await db.pool.execute("DELETE FROM monitoring.events")


async def test_update_marks_sets_current_price_in_one_batch(db: Database) -> None:
    store = Store(db.pool)
    a = await _active_position(store, "AUSDT", trailing=True)
    b = await _active_position(store, "BUSDT", trailing=True)
    await store.update_marks([(a, Decimal("101.5")), (b, Decimal("99.25"))])
    assert (await store.position(a)).current_price == Decimal("101.5")
    assert (await store.position(b)).current_price == Decimal("99.25")


@pytest.mark.parametrize(
    ("trail_armed", "activated", "protected"),
    [(True, False, True), (True, True, False), (False, False, False)],
    ids=["armed", "activated-without-its-order", "not-armed"],
)
async def test_protected_at_counts_an_armed_managed_trail_as_the_trailing_stop(
    db: Database, trail_armed: bool, activated: bool, protected: bool
) -> None:
    """A managed trail has no order before it activates: armed, it is the trailing protection (coverage and
    the uncovered query count it), so the hard stop confirmed stamps `protected_at`. It waited for a
    trailing order: a managed position read never protected. Once activated, the trail's stop order is."""
    store = Store(db.pool)
    created = await store.create_position(
        symbol="SFPUSDT", exchange="sim", side="long", quantity=Decimal("3")
    )
    await store.record_fill(created.id, Decimal("3"), Decimal("0.4512"))
    fact = ProtectionFactsRow(
        created.id,
        has_stop_loss=True,
        has_trailing_stop=False,
        stop_loss_price=Decimal("0.4377"),
        trailing_activated=activated,
        status=PositionStatus.ACTIVE,
        trail_armed=trail_armed,
    )
    await store.set_protection_facts_many([fact])
    position = await store.position(created.id)
    assert position is not None
    assert (position.protected_at is not None) is protected


async def test_a_finished_wave_is_never_written_over(db: Database) -> None:
    """An engine stopped because another took the account writes, at its stop, the wave it was
    interrupted in; that engine may have finished the wave already (the dead engine's waves, as of its last
    heartbeat): its record stands (r59)."""
    store = Store(db.pool, "sim:default")
    wave = await store.start_wave(7)
    await store.finish_wave(wave, opened=3, protected=3, failed=0, slowest_protection_ms=120)
    await store.finish_wave(wave, opened=7, protected=0, failed=7, slowest_protection_ms=None)
    row = await db.pool.fetchrow(
        "SELECT opened, protected, failed, slowest_protection_ms FROM monitoring.waves"
    )
    assert tuple(row) == (3, 3, 0, 120)

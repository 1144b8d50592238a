"""The protection path's store across a real outage: a server of the test's own is SIGKILLed; the guards'
writes go to the journal (the caller proceeds), their reads answer from memory, everything else refuses
at once; once the server is started again the journal is replayed in order — nothing lost, nothing
duplicated, and replaying it a second time (a crash before the journal was removed) changes nothing."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from storage.database import DatabaseDown, DatabaseTarget, create_pool
from storage.embedded import (
    EmbeddedPostgres,
    PostmasterState,
    postmaster_state,
    restart_embedded,
    stop_embedded,
)
from storage.journal import WriteJournal, read_journal
from storage.repositories import (
    OrderPurpose,
    OrderRecordStatus,
    OrderStatusRow,
    PositionStatus,
    ProtectionFactsRow,
    Severity,
)
from storage.resilient import ResilientStore
from tests.support.owned_postgres import create_migrated_database, kill_postmaster, start_owned


@pytest.fixture(scope="module")
def owned_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    server = start_owned(tmp_path_factory.mktemp("owned-pg") / "pgdata")
    yield server
    if postmaster_state(server.data_dir)[0] is PostmasterState.DEAD:
        restart_embedded(server.data_dir)
    stop_embedded(server.data_dir)


@dataclass
class Owned:
    server: EmbeddedPostgres
    pool: asyncpg.Pool
    dsn: str
    journal: Path


@pytest.fixture
async def owned(owned_server: EmbeddedPostgres, tmp_path: Path) -> AsyncIterator[Owned]:
    if postmaster_state(owned_server.data_dir)[0] is PostmasterState.DEAD:
        restart_embedded(owned_server.data_dir)
    name = await create_migrated_database(owned_server)
    dsn = owned_server.dsn(name)
    pool = await create_pool(DatabaseTarget(dsn=dsn), min_size=1, max_size=4)  # with the jsonb codec
    yield Owned(owned_server, pool, dsn, tmp_path / "logs" / "journal.jsonl")
    pool.terminate()


async def _store(owned: Owned) -> tuple[ResilientStore, str]:
    store = ResilientStore(owned.pool, write_timeout_seconds=5.0)
    token = await store.installation_token()
    store.attach_journal(WriteJournal(owned.journal), token)
    return store, token


async def _bring_back(owned: Owned) -> None:
    restart_embedded(owned.server.data_dir)
    await owned.pool.expire_connections()


async def _dump(dsn: str) -> dict[str, list[dict[str, object]]]:
    """Every row the protection path writes, without the bookkeeping column a repeated UPDATE touches."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = {
            "positions": "SELECT * FROM monitoring.positions ORDER BY id",
            "orders": "SELECT * FROM monitoring.orders ORDER BY client_order_id",
            "trailing": "SELECT * FROM monitoring.trailing_stop_state ORDER BY position_id",
            "events": "SELECT * FROM monitoring.events ORDER BY id",
            "signals": "SELECT * FROM monitoring.signals ORDER BY id",
        }
        dump = {}
        for table, query in tables.items():
            dump[table] = [
                {k: v for k, v in dict(r).items() if k != "updated_at"} for r in await conn.fetch(query)
            ]
        return dump
    finally:
        await conn.close()


async def _open_position(store: ResilientStore) -> int:
    position = await store.create_position(
        symbol="SFPUSDT",
        exchange="sim",
        side="long",
        quantity=Decimal("100"),
        status=PositionStatus.ENTRY_PLACED,
    )
    await store.record_fill(position.id, Decimal("100"), Decimal("0.5000"))
    await store.record_order(
        client_order_id=f"tsbx-{position.id}-sl0",
        position_id=position.id,
        purpose=OrderPurpose.STOP_LOSS,
        side="sell",
        type="stop_market",
        quantity=Decimal("100"),
        trigger_price=Decimal("0.4850"),
    )
    await store.set_order_status(f"tsbx-{position.id}-sl0", OrderRecordStatus.OPEN, exchange_order_id="v1")
    return position.id


async def _protect_during_outage(store: ResilientStore, position_id: int) -> None:
    """What a guard and the reconciler write while the database is away: the stop-loss was cancelled by
    hand and is replaced (a new generation), the trailing stop is placed, the facts are recorded."""
    sl0, sl1, ts0 = (f"tsbx-{position_id}-{suffix}" for suffix in ("sl0", "sl1", "ts0"))
    await store.set_order_status(sl0, OrderRecordStatus.CANCELED)
    for cid, purpose, kind, price in (
        (sl1, OrderPurpose.STOP_LOSS, "stop_market", Decimal("0.4850")),
        (ts0, OrderPurpose.TRAILING_STOP, "trailing_stop_market", None),
    ):
        await store.record_order(
            client_order_id=cid,
            position_id=position_id,
            purpose=purpose,
            side="sell",
            type=kind,
            quantity=Decimal("100"),
            trigger_price=price,
            activation_price=Decimal("0.5075") if price is None else None,
            callback_percent=Decimal("0.5") if price is None else None,
        )
    await store.set_order_statuses_many(
        [
            OrderStatusRow(sl1, OrderRecordStatus.OPEN, "v2"),
            # The distance the venue took for the trail (Bybit): a new process tells ours by it.
            OrderStatusRow(ts0, OrderRecordStatus.OPEN, "v3", trail_distance=Decimal("0.0025")),
        ]
    )
    statuses = await store.set_protection_facts_many(
        [
            ProtectionFactsRow(
                position_id=position_id,
                has_stop_loss=True,
                has_trailing_stop=True,
                stop_loss_price=Decimal("0.4850"),
                trailing_activated=False,
                status=PositionStatus.ACTIVE,
            )
        ]
    )
    assert statuses == {position_id: PositionStatus.ACTIVE}  # answered from memory, as the database would
    await store.save_trailing_state(
        position_id,
        mode="native",
        state="armed",
        activation_price=Decimal("0.5075"),
        callback_percent=Decimal("0.5"),
        activation_percent=Decimal("1.5"),
    )
    await store.record_event(
        Severity.ERROR,
        "protection_lost",
        f"SFPUSDT: stop-loss {sl0} is no longer on the exchange; re-protecting",
        symbol="SFPUSDT",
        position_id=position_id,
        data={"client_order_id": sl0},
    )


async def test_a_killed_server_does_not_stop_protection_and_the_journal_replays_every_write(
    owned: Owned,
) -> None:
    store, _token = await _store(owned)
    position_id = await _open_position(store)
    kill_postmaster(owned.server.data_dir)

    await _protect_during_outage(store, position_id)
    # Every write went to the journal, owner-only, and the store says how many wait.
    assert store.journal_depth == 7
    assert sorted(store.journaled) == [
        "record_event",
        "record_order",
        "save_trailing_state",
        "set_order_status",
        "set_order_statuses_many",
        "set_protection_facts_many",
    ]
    assert (owned.journal.stat().st_mode & 0o777) == 0o600
    # The guard's reads answer from what this process knows.
    sl1 = await store.order_by_client_id(f"tsbx-{position_id}-sl1")
    assert sl1 is not None
    assert (sl1.status, sl1.exchange_order_id) == (OrderRecordStatus.OPEN, "v2")
    live = await store.live_orders_for_position(position_id)
    assert {o.client_order_id: o.trail_distance for o in live} == {
        f"tsbx-{position_id}-sl1": None,
        f"tsbx-{position_id}-ts0": Decimal("0.0025"),
    }
    # Anything else refuses at once rather than hang or pretend.
    with pytest.raises(DatabaseDown):
        await store.coverage()

    await asyncio.sleep(1.5)  # the outage lasts: the replay comes well after the writes
    await _bring_back(owned)
    assert await store.replay_journal() == 7
    assert not owned.journal.exists()
    assert store.journal_depth == 0
    assert not store.down

    conn = await asyncpg.connect(owned.dsn)
    try:
        orders = {
            r["client_order_id"]: (r["status"], r["exchange_order_id"], r["trail_distance"])
            for r in await conn.fetch("SELECT * FROM monitoring.orders")
        }
        position = await conn.fetchrow("SELECT * FROM monitoring.positions WHERE id = $1", position_id)
        events = await conn.fetch(
            "SELECT data->>'client_order_id' AS cid, data->>'write_id' AS write_id FROM monitoring.events "
            "WHERE type = 'protection_lost'"
        )
        trail = await conn.fetchrow(
            "SELECT * FROM monitoring.trailing_stop_state WHERE position_id = $1", position_id
        )
    finally:
        await conn.close()
    assert orders == {
        f"tsbx-{position_id}-sl0": ("canceled", "v1", None),
        f"tsbx-{position_id}-sl1": ("open", "v2", None),
        f"tsbx-{position_id}-ts0": ("open", "v3", Decimal("0.0025")),
    }
    assert (position["status"], position["has_stop_loss"], position["has_trailing_stop"]) == (
        "active",
        True,
        True,
    )
    # Rows carry the time of the write, not the time of the replay: the hard stop confirmed a moment after
    # the fill was recorded as without a hard stop for the whole outage (`tsbot report`'s "longest").
    assert position["protected_at"] < datetime.now(UTC) - timedelta(milliseconds=1)
    assert position["hard_stop_gap_seconds"] is not None
    assert position["hard_stop_gap_seconds"] < 1
    assert len(events) == 1
    assert events[0]["cid"] == f"tsbx-{position_id}-sl0"
    assert events[0]["write_id"]  # what makes the event's replay idempotent
    assert trail["activation_price"] == Decimal("0.5075")
    # Back to writing directly.
    await store.set_order_status(f"tsbx-{position_id}-ts0", OrderRecordStatus.OPEN)
    assert not owned.journal.exists()


async def test_a_stops_disarm_journaled_in_an_outage_is_replayed_as_of_the_stop(owned: Owned) -> None:
    """A managed-mode engine stopping while the database is down journals the disarm of its trails; the
    next start replays it, maybe hours later. The positions lacked their trailing protection from the
    stop on, but the replay stamped its own time (and began the uncovered span then): the downtime was
    missing from `tsbot report` (a reviewer's finding)."""
    store, _token = await _store(owned)
    position_id = await _open_position(store)
    await owned.pool.execute(
        "UPDATE monitoring.positions SET status = 'active', has_stop_loss = true, trail_armed = true, "
        "protected_at = now() WHERE id = $1",
        position_id,
    )
    kill_postmaster(owned.server.data_dir)
    stopped_at = datetime.now(UTC)
    assert await store.disarm_managed_trails() == 0  # journaled
    assert store.journaled == {"disarm_managed_trails": 1}
    await asyncio.sleep(1.0)  # the downtime
    await _bring_back(owned)
    # Meanwhile another engine opened a position, its trail armed, and was killed: not unmoved since
    # before its fill (a reviewer's finding).
    later = await owned.pool.fetchval(
        "INSERT INTO monitoring.positions (account, symbol, exchange, side, quantity, entry_price, status, "
        "has_stop_loss, trail_armed, opened_at, protected_at) VALUES ($1, 'AXSUSDT', 'sim', 'long', 1, 2, "
        "'active', true, true, now(), now()) RETURNING id",
        store.account,
    )
    replayed_at = datetime.now(UTC)
    [journaled] = read_journal(owned.journal).entries
    assert store.newest_replayed_at is None
    assert await store.replay_journal() == 1
    # (What the next start dates a dead run's managed trails from, when its journal ran past its heartbeat.)
    assert store.newest_replayed_at == journaled.at
    row = await owned.pool.fetchrow("SELECT * FROM monitoring.positions WHERE id = $1", position_id)
    span = await owned.pool.fetchrow(
        "SELECT * FROM monitoring.uncovered_spans WHERE position_id = $1", position_id
    )
    assert row["trail_armed"] is False
    assert stopped_at <= row["unprotected_since"] < replayed_at - timedelta(seconds=0.5)
    assert (span["started_at"], span["ended_at"]) == (row["unprotected_since"], None)
    other = await owned.pool.fetchrow("SELECT * FROM monitoring.positions WHERE id = $1", later)
    assert other["unprotected_since"] == other["opened_at"]


async def test_a_disarm_journaled_as_of_a_dead_engines_heartbeat_is_replayed_as_of_it(owned: Owned) -> None:
    """A start that records a killed engine's trails as unmoved since that engine's last heartbeat, with
    the database away: the journal kept the write, not its date, and the replay dated the trails from the
    start (the dead engine's downtime missing again, a reviewer's finding)."""
    store, _token = await _store(owned)
    position_id = await _open_position(store)
    await owned.pool.execute(
        "UPDATE monitoring.positions SET status = 'active', has_stop_loss = true, trail_armed = true, "
        "protected_at = now(), opened_at = now() - interval '1 hour' WHERE id = $1",
        position_id,
    )
    heard = datetime.now(UTC) - timedelta(minutes=10)
    kill_postmaster(owned.server.data_dir)
    assert await store.disarm_managed_trails(at=heard) == 0  # journaled
    await _bring_back(owned)
    assert await store.replay_journal() == 1
    row = await owned.pool.fetchrow("SELECT * FROM monitoring.positions WHERE id = $1", position_id)
    assert row["trail_armed"] is False
    assert row["unprotected_since"] == heard


async def test_a_fill_learned_late_in_an_outage_is_replayed_uncovered_from_the_fill_and_a_live_one_is_not(
    owned: Owned,
) -> None:
    """An entry whose answer was lost (or that filled while no engine ran), recorded filled while the
    database is down: its position was without stops from its fill, and the replay must begin its uncovered
    span there. A fill answered live has none: a position protected on its first pass has no span."""
    store, _token = await _store(owned)
    late, live = [
        await store.create_position(
            symbol=symbol,
            exchange="sim",
            side="long",
            quantity=Decimal("1"),
            status=PositionStatus.ENTRY_PLACED,
        )
        for symbol in ("SFPUSDT", "AXSUSDT")
    ]
    filled_at = datetime.now(UTC) - timedelta(seconds=40)
    kill_postmaster(owned.server.data_dir)
    record = await store.record_fill(
        late.id, Decimal("1"), Decimal("2"), filled_at=filled_at, unprotected_since=filled_at
    )
    assert record.unprotected_since == filled_at  # (what a guard resumes from, the database away)
    assert (await store.record_fill(live.id, Decimal("1"), Decimal("2"))).unprotected_since is None
    assert store.journaled == {"record_fill": 2}
    await _bring_back(owned)
    assert await store.replay_journal() == 2
    rows = {
        r["id"]: r
        for r in await owned.pool.fetch("SELECT id, opened_at, unprotected_since FROM monitoring.positions")
    }
    spans = await owned.pool.fetch(
        "SELECT position_id, started_at, ended_at, reason FROM monitoring.uncovered_spans"
    )
    assert rows[late.id]["unprotected_since"] == rows[late.id]["opened_at"] == filled_at
    assert rows[live.id]["unprotected_since"] is None
    assert [tuple(s) for s in spans] == [(late.id, filled_at, None, "not_yet_protected")]


async def test_a_status_write_for_an_order_no_longer_remembered_is_journaled_not_an_error(
    owned: Owned,
) -> None:
    """During an outage the store answers from what it remembers (the last `remembered` orders touched).
    A stop's status write for an order older than that raised LookupError, as if the row did not exist: the
    guard's or the reconcile pass's write failed (the pass ended there) while the write itself was journaled
    and would land. It is journaled and applied at replay, and says nothing is remembered of the order."""
    store = ResilientStore(owned.pool, write_timeout_seconds=5.0, remembered=2)
    store.attach_journal(WriteJournal(owned.journal), await store.installation_token())
    position_id = await _open_position(store)  # its stop-loss, then two more orders: the first forgotten
    for n in (1, 2):
        await store.record_order(
            client_order_id=f"tsbx-{position_id}-ts{n}",
            position_id=position_id,
            purpose=OrderPurpose.TRAILING_STOP,
            side="sell",
            type="trailing_stop_market",
            quantity=Decimal("100"),
        )
    kill_postmaster(owned.server.data_dir)
    forgotten = f"tsbx-{position_id}-sl0"
    assert await store.set_order_status(forgotten, OrderRecordStatus.FILLED) is None
    assert store.journaled == {"set_order_status": 1}
    await _bring_back(owned)
    assert await store.replay_journal() == 1
    status = await owned.pool.fetchval(
        "SELECT status FROM monitoring.orders WHERE client_order_id = $1", forgotten
    )
    assert status == OrderRecordStatus.FILLED.value


async def test_replaying_a_journal_a_second_time_changes_nothing(owned: Owned) -> None:
    """A crash after the replay and before the journal was removed: the next start replays it again."""
    store, token = await _store(owned)
    position_id = await _open_position(store)
    kill_postmaster(owned.server.data_dir)
    await _protect_during_outage(store, position_id)
    await store.close_position(position_id, exit_reason="stop_loss", realized_pnl=Decimal("-1.5"))
    copy = owned.journal.with_name("copy.jsonl")
    shutil.copy(owned.journal, copy)

    await _bring_back(owned)
    assert await store.replay_journal() == 8
    once = await _dump(owned.dsn)

    shutil.copy(copy, owned.journal)
    again = ResilientStore(owned.pool)
    again.attach_journal(WriteJournal(owned.journal), token)
    assert await again.replay_journal() == 8
    assert await _dump(owned.dsn) == once
    assert len(once["events"]) == 1
    [position] = once["positions"]
    assert (position["status"], position["exit_reason"], position["realized_pnl"]) == (
        "closed",
        "stop_loss",
        Decimal("-1.5"),
    )


async def test_a_journal_left_by_a_crashed_process_is_replayed_by_the_next_and_a_torn_line_ignored(
    owned: Owned,
) -> None:
    store, token = await _store(owned)
    position_id = await _open_position(store)
    kill_postmaster(owned.server.data_dir)
    await _protect_during_outage(store, position_id)
    # The process dies while appending one more line: half of it reached the file.
    with owned.journal.open("ab") as f:
        f.write(b'{"seq":99,"at":"2025-01-01T00:00:00+00:00","db":"' + token.encode() + b'","op":"close_po')
    assert read_journal(owned.journal).torn_tail

    await _bring_back(owned)
    next_run = ResilientStore(owned.pool)
    contents = next_run.attach_journal(WriteJournal(owned.journal), token)
    assert contents.torn_tail
    assert await next_run.replay_journal() == 7
    assert not owned.journal.exists()
    dump = await _dump(owned.dsn)
    assert {o["client_order_id"]: o["status"] for o in dump["orders"]} == {
        f"tsbx-{position_id}-sl0": "canceled",
        f"tsbx-{position_id}-sl1": "open",
        f"tsbx-{position_id}-ts0": "open",
    }
    assert dump["positions"][0]["status"] == "active"  # the torn close never happened


async def test_a_constraint_violation_is_a_bug_and_is_raised_not_journaled(owned: Owned) -> None:
    store, _token = await _store(owned)
    position_id = await _open_position(store)
    with pytest.raises(asyncpg.CheckViolationError):
        await store.record_order(
            client_order_id=f"tsbx-{position_id}-ts0",
            position_id=position_id,
            purpose=OrderPurpose.TRAILING_STOP,
            side="sell",
            type="trailing_stop_market",
            quantity=Decimal("0"),
        )
    assert store.journal_depth == 0
    assert not owned.journal.exists()


async def test_a_journaled_write_the_driver_cannot_encode_is_set_aside_not_taken_for_an_outage(
    owned: Owned,
) -> None:
    """A write whose arguments the driver refuses to encode ("invalid input for query argument") must not be
    taken for "database unreachable": at replay the database would be declared down again, every 2 s, for
    ever, and the next start fail on the same line (a reviewer's suspicion: asyncpg's client-side
    `DataError` is an `InterfaceError`, which counts as unreachable). asyncpg raises the SQL state's
    `DataError` here, a `PostgresError`: like a constraint the database refuses, the line is kept aside in
    `.rejected` and the replay goes on. This test holds that."""
    store, token = await _store(owned)
    position_id = await _open_position(store)
    await store.record_order(
        client_order_id=f"tsbx-{position_id}-ts0",
        position_id=position_id,
        purpose=OrderPurpose.TRAILING_STOP,
        side="sell",
        type="trailing_stop_market",
        quantity=Decimal("100"),
        activation_price=Decimal("0.5075"),
        callback_percent=Decimal("0.5"),
    )
    bad = {"client_order_id": f"tsbx-{position_id}-sl0", "status": "open", "exchange_order_id": 12345}
    good = {"client_order_id": f"tsbx-{position_id}-ts0", "status": "open", "exchange_order_id": "v9"}
    owned.journal.parent.mkdir(mode=0o700, exist_ok=True)
    with owned.journal.open("ab") as f:
        for seq, args in enumerate((bad, good), start=1):
            record = {"seq": seq, "at": "2026-01-01T00:00:00+00:00", "db": token, "op": "set_order_status"}
            f.write((json.dumps({**record, "args": args}) + "\n").encode())
    # A `.rejected` left wider than owner-only (by hand, or an older version): made 0600 again when written.
    rejected_path = owned.journal.with_name(owned.journal.name + ".rejected")
    rejected_path.write_bytes(b"")
    rejected_path.chmod(0o644)
    next_run = ResilientStore(owned.pool)
    next_run.attach_journal(WriteJournal(owned.journal), token)
    assert await next_run.replay_journal() == 1  # the one refused is not counted as replayed
    assert rejected_path.stat().st_mode & 0o777 == 0o600
    assert not next_run.down
    assert not owned.journal.exists()
    assert next_run.rejected_writes == 1
    rejected = owned.journal.with_name(owned.journal.name + ".rejected").read_text()
    assert '"exchange_order_id": 12345' in rejected or '"exchange_order_id":12345' in rejected
    ts0 = await next_run.order_by_client_id(f"tsbx-{position_id}-ts0")
    assert ts0 is not None
    assert (ts0.status, ts0.exchange_order_id) == (OrderRecordStatus.OPEN, "v9")


async def test_a_replay_catches_up_with_writers_that_keep_writing(owned: Owned) -> None:
    """Found by the restore benchmark on a loaded machine: one write slower than the timeout sent every
    write to the journal, and the replay — one statement at a time — never caught up with 300 guards that
    kept appending, so the database never counted as back and entries stayed paused for good. The replay
    must finish while writers go on, and their writes reach the database afterwards."""
    store, _token = await _store(owned)
    position_id = await _open_position(store)
    kill_postmaster(owned.server.data_dir)
    await _protect_during_outage(store, position_id)
    await _bring_back(owned)

    writes = 0
    stop = asyncio.Event()

    async def keep_writing(worker: int) -> None:
        nonlocal writes
        while not stop.is_set():
            writes += 1
            await store.save_trailing_state(
                position_id,
                mode="native",
                state="armed",
                activation_price=Decimal("0.5075") + Decimal(writes) / Decimal(10_000),
                callback_percent=Decimal("0.5"),
                activation_percent=Decimal("1.5"),
            )
            await asyncio.sleep(0)

    writers = [asyncio.create_task(keep_writing(i)) for i in range(20)]
    try:
        # A liveness bound, not a speed figure: on the old code the replay never ends at all.
        async with asyncio.timeout(60):
            await store.replay_journal()
        assert not store.down
        assert store.journal_depth == 0
    finally:
        stop.set()
        await asyncio.gather(*writers)
    # Writes after the replay go straight to the database, and the last one written is what it holds.
    last = Decimal("0.5075") + Decimal(writes + 1) / Decimal(10_000)
    await store.save_trailing_state(
        position_id,
        mode="native",
        state="armed",
        activation_price=last,
        callback_percent=Decimal("0.5"),
        activation_percent=Decimal("1.5"),
    )
    assert not owned.journal.exists()
    conn = await asyncpg.connect(owned.dsn)
    try:
        held = await conn.fetchval(
            "SELECT activation_price FROM monitoring.trailing_stop_state WHERE position_id = $1", position_id
        )
    finally:
        await conn.close()
    assert held == last

"""Signals claimed exactly once, NOTIFY on insert, waves, trailing-state persistence, the engine lease."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from decimal import Decimal

import asyncpg
import pytest

from engine.clock import ManualClock
from engine.engine import Engine
from storage.database import Database
from storage.lease import EngineLease, LeaseHeld, current_holder
from storage.repositories import DuplicateExternalId, PositionStatus, SignalStatus, Store
from tests.integration.engine_support import engine_settings, make_engine
from tests.support.driving import drive, drive_until

# Every venue call takes 1 s: a protection restart's reads outlast its half-second grace period. Native
# trails (orders on the venue): only entries can make a restart leave something unlooked-after.
SLOW_NATIVE_RESTART = {
    "VENUE__SIM__LATENCY__SECONDS": "1",
    "PROTECTION__GRACE_SECONDS": "0.5",
    "PROTECTION__TRAILING__MODE": "native",
    "VENUE__SIM__RATE_LIMITS__BAN_AFTER_VIOLATIONS": "1000",
}


async def test_concurrent_claimers_take_each_signal_exactly_once(db: Database) -> None:
    store = Store(db.pool)
    await store.insert_signals([(f"S{i}USDT", "long", None, f"ext-{i}") for i in range(200)])

    async def claim_all() -> list[int]:
        taken: list[int] = []
        while batch := await store.claim_new_signals(limit=7):
            taken += [s.id for s in batch]
        return taken

    results = await asyncio.gather(*(claim_all() for _ in range(4)))
    every_claim = [signal_id for result in results for signal_id in result]
    assert len(every_claim) == 200
    assert len(set(every_claim)) == 200
    assert await db.pool.fetchval("SELECT count(*) FROM monitoring.signals WHERE status = 'taken'") == 200


async def test_claims_come_oldest_first_and_finished_signals_keep_their_reason(db: Database) -> None:
    store = Store(db.pool)
    first = await store.insert_signal("SFPUSDT", "long", score=Decimal("0.8"), external_id="a")
    second = await store.insert_signal("ALLUSDT", "short")
    claimed = await store.claim_new_signals()
    assert [s.id for s in claimed] == [first.id, second.id]
    assert all(s.status is SignalStatus.TAKEN for s in claimed)
    assert await store.claim_new_signals() == []

    wave_id = await store.start_wave(signals=2)
    await store.finish_signal(first.id, SignalStatus.OPENED, wave_id=wave_id)
    await store.finish_signal(
        second.id, SignalStatus.REJECTED, "symbol already has an open position", wave_id=wave_id
    )
    rejected = await store.signal(second.id)
    assert rejected.status is SignalStatus.REJECTED
    assert rejected.reason == "symbol already has an open position"
    assert rejected.wave_id == wave_id


async def test_duplicate_external_id_is_refused_and_a_batch_is_all_or_nothing(db: Database) -> None:
    store = Store(db.pool)
    await store.insert_signal("SFPUSDT", "long", external_id="dup")
    with pytest.raises(DuplicateExternalId, match="'dup'"):
        await store.insert_signal("SFPUSDT", "long", external_id="dup")
    with pytest.raises(DuplicateExternalId):
        await store.insert_signals([("AUSDT", "long", None, "new-1"), ("BUSDT", "long", None, "dup")])
    assert await db.pool.fetchval("SELECT count(*) FROM monitoring.signals") == 1


async def test_inserting_signals_notifies_listeners(db: Database) -> None:
    listener = await asyncpg.connect(db.target.dsn)
    woke = asyncio.Event()
    try:
        await listener.add_listener("tsbot_signals", lambda *_: woke.set())
        await Store(db.pool).insert_signal("SUIUSDT", "long")
        await asyncio.wait_for(woke.wait(), timeout=5)
    finally:
        await listener.close()


async def test_waves_are_recorded_and_listed_newest_first(db: Database) -> None:
    store = Store(db.pool)
    older = await store.start_wave(signals=7)
    newer = await store.start_wave(signals=3)
    await store.finish_wave(older, opened=7, protected=7, failed=0, slowest_protection_ms=2104)
    waves = await store.recent_waves()
    assert [w.id for w in waves] == [newer, older]
    assert (waves[1].opened, waves[1].protected, waves[1].slowest_protection_ms) == (7, 7, 2104)
    assert waves[1].finished_at is not None
    assert waves[0].finished_at is None


async def test_trailing_state_is_keyed_by_position_and_restored_only_for_live_positions(db: Database) -> None:
    store = Store(db.pool)
    old = await store.create_position(symbol="SFPUSDT", exchange="sim", side="long", quantity=Decimal("10"))
    await store.save_trailing_state(
        old.id,
        mode="managed",
        state="active",
        activation_price=Decimal("0.5075"),
        callback_percent=Decimal("0.5"),
        activation_percent=Decimal("1.5"),
        peak_price=Decimal("0.5200"),
        current_stop_price=Decimal("0.5174"),
        stop_order_client_id="tsb-1-ts-1",
        update_count=3,
    )
    await store.set_position_status(old.id, PositionStatus.CLOSED, exit_reason="trailing_stop")
    # The same symbol re-opened on the other side must not inherit anything.
    new = await store.create_position(symbol="SFPUSDT", exchange="sim", side="short", quantity=Decimal("10"))
    saved = await store.save_trailing_state(
        new.id,
        mode="native",
        state="armed",
        activation_price=Decimal("0.4925"),
        callback_percent=Decimal("0.5"),
        activation_percent=Decimal("1.5"),
    )
    assert saved.peak_price is None
    assert saved.update_count == 0

    restored = await store.trailing_states_of_open_positions()
    assert set(restored) == {new.id}
    assert restored[new.id].state == "armed"
    assert (await store.trailing_state(old.id)).current_stop_price == Decimal("0.5174")

    updated = await store.save_trailing_state(
        new.id,
        mode="native",
        state="active",
        activation_price=Decimal("0.4925"),
        callback_percent=Decimal("0.5"),
        activation_percent=Decimal("1.5"),
        peak_price=Decimal("0.4800"),
        update_count=1,
    )
    assert (updated.state, updated.peak_price, updated.update_count) == ("active", Decimal("0.4800"), 1)

    with pytest.raises(asyncpg.CheckViolationError):
        await store.save_trailing_state(
            new.id,
            mode="managed",
            state="ACTIVE",  # legacy upper-case enum values are refused at the database too
            activation_price=Decimal("0.4925"),
            callback_percent=Decimal("0.5"),
            activation_percent=Decimal("1.5"),
        )


async def test_a_second_engine_on_the_same_account_is_refused_and_told_who_holds_it(db: Database) -> None:
    first = await EngineLease.acquire(db.target.dsn, "sim", "main", "0.1.0")
    try:
        with pytest.raises(LeaseHeld) as refused:
            await EngineLease.acquire(db.target.dsn, "sim", "main", "0.2.0")
        holder = refused.value.holder
        assert holder is not None
        assert (holder.pid, holder.version) == (os.getpid(), "0.1.0")
        assert f"pid {os.getpid()}" in str(refused.value)
        assert (await current_holder(db.pool, "sim", "main")).version == "0.1.0"

        # Another account on the same venue is independent.
        other = await EngineLease.acquire(db.target.dsn, "sim", "second", "0.1.0")
        await other.release()
    finally:
        await first.release()

    assert await current_holder(db.pool, "sim", "main") is None
    again = await EngineLease.acquire(db.target.dsn, "sim", "main", "0.3.0")
    assert again.alive()
    await again.release()
    assert not again.alive()


async def test_the_lease_is_freed_when_the_holding_connection_dies(db: Database) -> None:
    first = await EngineLease.acquire(db.target.dsn, "sim", "main", "0.1.0")
    # Simulate the holder process vanishing: the server ends its session, and with it the lock.
    await db.pool.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()"
    )
    second = await EngineLease.acquire(db.target.dsn, "sim", "main", "0.2.0")
    try:
        assert (await current_holder(db.pool, "sim", "main")).version == "0.2.0"
    finally:
        await second.release()
        await first.release()


async def test_a_holder_that_died_is_dated_by_its_last_heartbeat_even_past_a_start_that_failed(
    db: Database,
) -> None:
    """The next holder learns when the last one was last heard (its managed trails were unmoved from then:
    it records them so and says it has, `handed_over`). A start that failed in between (after taking the
    lease, before recording them) overwrote the row's heartbeat with its own: the holder after it dated the
    dead engine's trails from that failed start, hiding the time between."""

    async def heard() -> object:
        return await db.pool.fetchval(
            "SELECT heartbeat_at FROM monitoring.engine_leases WHERE account = 'main'"
        )

    async def die() -> None:  # the holder's process vanishes: the server ends its session, and its lock
        await db.pool.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND pid <> pg_backend_pid()"
        )

    killed = await EngineLease.acquire(db.target.dsn, "sim", "main", "0.1.0")
    assert killed.previous_heard_at is None  # the account's first holder
    await killed.heartbeat()
    killed_heard = await heard()
    await die()
    failed = await EngineLease.acquire(db.target.dsn, "sim", "main", "0.1.0")
    assert failed.previous_heard_at == killed_heard
    await failed.heartbeat()
    await failed.release()  # its start failed before recording what the killed one left
    later = await EngineLease.acquire(db.target.dsn, "sim", "main", "0.1.0")
    assert later.previous_heard_at == killed_heard  # not the failed start's heartbeat
    later.handed_over()  # (written by its next heartbeat)
    assert later.previous_heard_at is None
    await later.heartbeat()
    later_heard = await heard()
    await later.release()
    last = await EngineLease.acquire(db.target.dsn, "sim", "main", "0.1.0")
    try:
        assert last.previous_heard_at == later_heard
    finally:
        await last.release()
        await killed.release()


async def test_a_hand_over_said_while_a_heartbeat_is_in_flight_is_written_by_the_heartbeat(
    db: Database,
) -> None:
    """The start said it had recorded what the last holder left by a write of its own on the lease's
    connection; a heartbeat in flight on that connection made it fail ("another operation is in
    progress", a clean-clone chaos run) and the start with it. The heartbeat writes it instead."""
    first = await EngineLease.acquire(db.target.dsn, "sim", "main", "0.1.0")
    await first.heartbeat()
    await db.pool.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND pid <> pg_backend_pid()"
    )
    lease = await EngineLease.acquire(db.target.dsn, "sim", "main", "0.1.0")
    try:
        assert lease.previous_heard_at is not None
        beating = asyncio.ensure_future(lease.heartbeat())
        await asyncio.sleep(0)  # the heartbeat's statement is on the connection
        lease.handed_over()
        await beating
        await lease.heartbeat()
        previous = await db.pool.fetchval(
            "SELECT previous_heard_at FROM monitoring.engine_leases WHERE account = 'main'"
        )
        assert previous is None
    finally:
        await lease.release()
        await first.release()


async def test_signals_an_engine_died_holding_are_expired_with_a_reason(db: Database) -> None:
    """Signals claimed at a crash or an outage stayed 'taken' forever. The engine that claimed them expires
    them when it starts again; any engine expires a claim older than any wave takes."""

    store = Store(db.pool)
    await store.insert_signals([("SFPUSDT", "long", None, "mine"), ("ALLUSDT", "long", None, "theirs")])
    [mine] = await store.claim_new_signals(limit=1, claimed_by="sim:default")  # this engine's last run
    [theirs] = await store.claim_new_signals(limit=1, claimed_by="sim:other")  # another account's engine
    clock = ManualClock()
    engine = make_engine(engine_settings(db.target.dsn), clock)
    await drive(clock, engine.start())
    try:
        mine_now, theirs_now = await store.signal(mine.id), await store.signal(theirs.id)
        assert mine_now is not None
        assert theirs_now is not None
        assert mine_now.status is SignalStatus.EXPIRED
        assert mine_now.reason is not None
        assert mine_now.reason.startswith("claimed by an engine that stopped before handling it")
        assert theirs_now.status is SignalStatus.TAKEN  # maybe mid-wave: not this engine's to judge yet
        await db.pool.execute(
            "UPDATE monitoring.signals SET claimed_at = now() - interval '20 minutes' WHERE id = $1",
            theirs.id,
        )

        async def theirs_expired() -> bool:
            row = await store.signal(theirs.id)
            return row is not None and row.status is SignalStatus.EXPIRED

        await drive_until(clock, theirs_expired, step=1.0, what="a stale claim expired")
    finally:
        await drive(clock, engine.stop())


async def _kill_lease_connection(db: Database, key: str) -> None:
    """What a database restart or a network cut does to the lease: its backend goes away."""
    from storage.lease import LEASE_NAMESPACE

    pid = await db.pool.fetchval(
        """
        SELECT pid FROM pg_locks
        WHERE locktype = 'advisory' AND granted AND classid = $1::oid AND objid = hashtext($2)::oid
          AND objsubid = 2
        """,
        LEASE_NAMESPACE,
        key,
    )
    assert pid is not None
    # Until it has gone, and its lock with it: pg_terminate_backend only signals it (a clean-clone CI's
    # next statement found the lock still held).
    assert await db.pool.fetchval("SELECT pg_terminate_backend($1, 10000)", pid)


async def test_a_lost_lease_stops_entries_refuses_resume_and_is_taken_again(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    from engine.events import EntriesToggled

    clock = ManualClock()
    engine = make_engine(engine_settings(db.target.dsn), clock)
    await drive(clock, engine.start())
    toggles: list[EntriesToggled] = []

    async def follow() -> None:
        async for event in engine.events():
            if isinstance(event, EntriesToggled):
                toggles.append(event)

    follower = asyncio.create_task(follow())
    started = "SELECT started_at FROM monitoring.engine_leases WHERE account = 'sim:default'"
    try:
        assert not engine.entries_paused
        first_taken = await db.pool.fetchval(started)
        await asyncio.sleep(0.01)  # the database's clock moves on: a retake dated now() would differ
        await _kill_lease_connection(db, "sim/sim:default")
        # The engine may take the lease again within one step of the clock (a loaded clean-clone run never
        # sampled the pause): what it announced is read instead of sampling its state.
        await drive_until(
            clock,
            lambda: any(t.paused and t.by == "lease" for t in toggles),
            what="entries paused by the lost lease",
        )
        if engine.lease_lost_since is not None:  # still lost: no resume without the lease
            assert engine.resume_entries()[0] is False
        await drive_until(clock, lambda: engine.lease_lost_since is None, what="lease taken again")
        await drive_until(clock, lambda: not toggles[-1].paused, what="entries announced on again")
        assert not engine.entries_paused
        assert engine.fatal is None
        # Taken again at once: said as a warning, not a critical alarm (an operator read "CRITICAL the
        # account lease is lost" and, a moment later, "taken again after 0.0s").
        assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.CRITICAL]
        assert any("the account lease is lost" in r.getMessage() for r in caplog.records)
        # Its own heartbeat from before the loss is nobody's to date a dead engine's trails from: were it
        # killed hours later, the next start would have dated its trails unmoved since this retake.
        await drive_until(
            clock,
            lambda: db.pool.fetchval(
                "SELECT previous_heard_at IS NULL FROM monitoring.engine_leases WHERE account = 'sim:default'"
            ),
            what="the retaken lease names no previous holder",
        )
        # Still the holder that started then: `tsbot status` said "since" the retake, the dashboard's
        # header the start (seen after an embedded server's restart).
        assert await db.pool.fetchval(started) == first_taken
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await drive(clock, engine.stop())


async def test_an_engine_whose_lease_another_engine_took_stops_and_sends_nothing_more(db: Database) -> None:
    from engine.engine import EngineState
    from engine.venues.sim.settings import CallKind

    clock = ManualClock()
    engine = make_engine(engine_settings(db.target.dsn), clock)
    await drive(clock, engine.start())
    other: EngineLease | None = None
    try:
        await _kill_lease_connection(db, "sim/sim:default")
        other = await EngineLease.acquire(db.target.dsn, "sim", "sim:default", "other-engine")
        await drive_until(
            clock, lambda: engine.state is EngineState.STOPPED, what="the engine stopped itself"
        )
        assert engine.fatal is not None
        assert "another engine took the account" in engine.fatal
        writes = {
            k: engine.venue.calls_made.get(k, 0) for k in (CallKind.CREATE_ORDER, CallKind.CANCEL_ORDER)
        }
        await clock.advance(60.0)
        assert {k: engine.venue.calls_made.get(k, 0) for k in writes} == writes
    finally:
        if other is not None:
            await other.release()
        await drive(clock, engine.stop())


async def test_a_lease_still_held_by_the_engines_own_lost_session_is_taken_back_not_given_up(
    db: Database,
) -> None:
    """A stall of the database (a paused host, a partition) fails the lease's heartbeat: the engine drops
    its connection and takes the lease again. The server still holds the old session, and its lock, until
    it notices the close (tens of seconds, or hours when the close is lost): the attempt is refused, and
    the holder row it reads is this engine's own. It was taken for another engine: the engine stopped
    itself, "another engine took the account" naming its own pid, and nothing guarded its positions any
    more (a reviewer's find). Its own lost session is ended and the lease taken back. (A connection of
    the test holds the lock here in place of the lost session the server still keeps.)"""
    from engine.engine import EngineState
    from storage.lease import LEASE_NAMESPACE

    clock = ManualClock()
    engine = make_engine(engine_settings(db.target.dsn), clock)
    await drive(clock, engine.start())
    lost = await asyncpg.connect(db.target.dsn)
    try:
        lost_pid = await lost.fetchval("SELECT pg_backend_pid()")
        await _kill_lease_connection(db, "sim/sim:default")
        assert await lost.fetchval(
            "SELECT pg_try_advisory_lock($1, hashtext($2))", LEASE_NAMESPACE, "sim/sim:default"
        )
        holder = await current_holder(db.pool, "sim", "sim:default")
        assert holder is not None
        assert (holder.pid, holder.host) == (os.getpid(), __import__("socket").gethostname())
        await drive_until(clock, lambda: engine.lease_lost_since is not None, what="the loss found")
        await drive_until(clock, lambda: engine.lease_lost_since is None, what="the lease taken back")
        assert engine.fatal is None
        assert engine.state is EngineState.RUNNING
        assert not engine.entries_paused
        gone = await db.pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", lost_pid)
        assert gone == 0
    finally:
        with contextlib.suppress(Exception):
            await lost.close(timeout=1)
        await drive(clock, engine.stop())


async def test_ending_our_own_lost_session_never_ends_another_engine_taking_the_lease_meanwhile(
    db: Database,
) -> None:
    """Between our refused attempt (the row names us) and the end of our lost session, the server may free
    the lock and another engine take it: its lock shows at once, its row only once committed. Read
    before its commit, the row still named us, and the other engine's session was ended (a reviewer's
    find). Attempts are serialised by the recording lock: ours waits for the other's commit, then finds
    the row names it, and ends nothing."""
    from storage.lease import LEASE_NAMESPACE, RECORDING_NAMESPACE, end_own_lost_session, lease_key

    ours = await EngineLease.acquire(db.target.dsn, "sim", "race", "ours")
    since = ours.started_at
    assert since is not None
    ours.drop()  # our session is gone; wait until the server has let the lock go
    key = lease_key("sim", "race")

    async def free() -> bool:
        held = await db.pool.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = $1::oid "
            "AND objid = hashtext($2)::oid AND objsubid = 2",
            LEASE_NAMESPACE,
            key,
        )
        return held == 0

    for _ in range(200):
        if await free():
            break
        await asyncio.sleep(0.05)
    other = await asyncpg.connect(db.target.dsn)
    try:
        other_pid = await other.fetchval("SELECT pg_backend_pid()")
        taking = other.transaction()
        await taking.start()
        await other.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", RECORDING_NAMESPACE, key)
        assert await other.fetchval("SELECT pg_try_advisory_lock($1, hashtext($2))", LEASE_NAMESPACE, key)
        await other.execute(
            "UPDATE monitoring.engine_leases SET pid = 1, host = 'other-host', started_at = now() "
            "WHERE venue = 'sim' AND account = 'race'"
        )
        ending = asyncio.ensure_future(end_own_lost_session(db.target.dsn, "sim", "race", since))
        await asyncio.sleep(0.5)
        await taking.commit()
        assert await ending is None
        assert await other.fetchval("SELECT pg_backend_pid()") == other_pid  # still alive
    finally:
        await other.close()


async def test_the_lease_says_what_the_engine_does_from_its_start_to_its_stop(db: Database) -> None:
    """Every heartbeat writes the engine's phase: readers count it as looking after the account only while
    it runs. Its stop writes `stopping` at once: the loops are gone from then on, and a stop shorter than a
    heartbeat's 2 s never said so (the lease read `running` until released)."""

    clock = ManualClock()
    engine = make_engine(engine_settings(db.target.dsn), clock)
    await drive(clock, engine.start())
    try:

        async def running() -> bool:
            return await db.pool.fetchval("SELECT phase FROM monitoring.engine_leases") == "running"

        await drive_until(clock, running, what="running once started")
        holder = await current_holder(db.pool, "sim", "sim:default")
        assert holder is not None
        assert holder.looks_after
    finally:
        await drive(clock, engine.stop())
    assert await db.pool.fetchval("SELECT phase FROM monitoring.engine_leases") == "stopping"
    assert await current_holder(db.pool, "sim", "sim:default") is None  # and released


@pytest.mark.parametrize("trailing_mode", ["managed", "native"])
async def test_the_lease_says_starting_while_a_protection_restart_leaves_trails_unmoved(
    db: Database, trailing_mode: str
) -> None:
    """A protection restart stops the manager, then a new one restores every position from the venue: in
    between, nobody moves a managed trail, closes at it or resolves an entry in flight. The lease read
    `running` all along, so status and the watches counted the armed trails as protection. Once the
    restart has lasted a grace period it reads `starting` until the new manager has its guards, and
    `running` again after (within the grace period a restart's round trips are no alarm). With nothing
    left unlooked-after (native trails are orders on the venue, no entry sent and not settled: one that
    arrives meanwhile waits for the restart's end) it stays `running`: the health loop goes on measuring,
    and `starting` made status say nobody did."""
    from tests.integration.engine_support import make_engine
    from tests.integration.test_failure_modes_f1_f5 import (
        SYMBOLS,
        drive_until_covered,
        open_positions,
        settings_for,
    )
    from tests.support.driving import drive, drive_until

    clock = ManualClock()
    # Every venue call takes 3 s: the restart's reads of the venue outlast the 1 s grace period.
    overrides = {
        "VENUE__SIM__LATENCY__SECONDS": "3",
        "PROTECTION__GRACE_SECONDS": "1",
        "PROTECTION__TRAILING__MODE": trailing_mode,
    }
    engine = make_engine(settings_for(db, overrides), clock)
    await drive(clock, engine.start())
    try:

        async def phase() -> str:
            return await db.pool.fetchval("SELECT phase FROM monitoring.engine_leases")

        await drive_until(clock, lambda: _is(phase(), "running"), what="running once started")
        await open_positions(engine, clock, SYMBOLS[:1])  # a position for the restart to restore
        await drive_until_covered(engine, clock, 1)
        store = engine.store
        assert store is not None

        async def a_signal() -> None:  # a signal meanwhile: its entry waits for the restart's end
            await store.insert_signals([(SYMBOLS[1], "long", None, None)])

        phases, took = await _phases_through_a_restart(db, engine, clock, meanwhile=a_signal)
        assert took > 2.0  # (the phase is written at once when it changes)
        assert phases == ({"running", "starting"} if trailing_mode == "managed" else {"running"})
        await drive_until(clock, lambda: _is(phase(), "running"), limit=10, what="running once restarted")
        holder = await current_holder(db.pool, "sim", "sim:default")
        assert holder is not None
        assert holder.looks_after
    finally:
        await drive(clock, engine.stop())


@pytest.mark.parametrize("sent_during_the_restart", [False, True])
async def test_an_entry_waiting_for_order_budget_counts_once_sent(
    db: Database, sent_during_the_restart: bool
) -> None:
    """An entry admitted before a protection restart but still waiting for room in the venue's order window
    has not reached the venue: nothing of it is exposed. The lease said `starting` for it once the restart
    passed its grace period (every entry in flight counted as sent), and status said nobody looked after
    the account while native stops sat on the venue: a false alarm. When room comes in the middle of a
    long restart, it is sent and fills, and its position waits for the new manager's guard: from then on
    it counts (the restart is looked at until it ends, not once at the grace mark)."""
    from engine.venues.sim.settings import CallKind
    from tests.integration.engine_support import make_engine
    from tests.integration.test_failure_modes_f1_f5 import (
        SYMBOLS,
        drive_until_covered,
        open_positions,
        settings_for,
    )
    from tests.support.driving import drive, drive_until

    clock = ManualClock()
    # One position (an entry and its two stops) leaves too little room in the venue's 10 s order window
    # for the next.
    overrides = {**SLOW_NATIVE_RESTART, "VENUE__SIM__RATE_LIMITS__ORDERS_PER_10S": "4"}
    if sent_during_the_restart:  # the restart's read of the venue's positions outlasts the window
        overrides["VENUE__SIM__LATENCY__BY_CALL"] = '{"fetch_positions": {"seconds": 15}}'
    engine = make_engine(settings_for(db, overrides), clock)
    await drive(clock, engine.start())
    try:

        async def phase() -> str:
            return await db.pool.fetchval("SELECT phase FROM monitoring.engine_leases")

        venue = engine.venue
        await drive_until(clock, lambda: _is(phase(), "running"), what="running once started")
        await open_positions(engine, clock, SYMBOLS[:1])
        await drive_until_covered(engine, clock, 1)
        sent = venue.calls_made.get(CallKind.CREATE_ORDER, 0)
        assert engine.store is not None
        await engine.store.insert_signals([(SYMBOLS[1], "long", None, None)])
        await drive_until(
            clock, lambda: SYMBOLS[1] in engine._in_flight, step=0.05, what="the entry admitted"
        )
        phases, took = await _phases_through_a_restart(db, engine, clock)
        assert took > 1.0  # past its grace period
        entry_sent = venue.calls_made.get(CallKind.CREATE_ORDER, 0) > sent
        assert entry_sent is sent_during_the_restart
        assert phases == ({"running", "starting"} if sent_during_the_restart else {"running"})
        await drive_until_covered(engine, clock, 2)
    finally:
        await drive(clock, engine.stop())


async def test_an_entry_the_venue_refused_for_its_rate_is_no_reason_for_starting(db: Database) -> None:
    """An entry the venue refused for its rate (HTTP 429: not executed) waits for the venue's Retry-After
    and room in the window before it is sent again: nothing of it is on the venue. A protection restart
    meanwhile said `starting` for it past its grace period (it was still counted as on its way)."""
    from decimal import Decimal as D

    from engine.exchange.port import OrderSide
    from engine.venues.sim.settings import CallKind
    from tests.integration.engine_support import make_engine
    from tests.integration.test_failure_modes_f1_f5 import (
        SYMBOLS,
        drive_until_covered,
        open_positions,
        settings_for,
    )
    from tests.support.driving import drive, drive_until

    clock = ManualClock()
    overrides = {**SLOW_NATIVE_RESTART, "VENUE__SIM__RATE_LIMITS__ORDERS_PER_10S": "20"}
    engine = make_engine(settings_for(db, overrides), clock)
    await drive(clock, engine.start())
    try:

        async def phase() -> str:
            return await db.pool.fetchval("SELECT phase FROM monitoring.engine_leases")

        venue = engine.venue
        await open_positions(engine, clock, SYMBOLS[:1])
        await drive_until_covered(engine, clock, 1)
        await drive_until(clock, lambda: 1.0 <= clock.now() % 10 < 1.2, step=0.1, what="a window's start")
        core, now = venue.core, clock.now()
        for i in range(20 - core.order_counts(now)[10.0]):  # another client of the account fills it
            with contextlib.suppress(Exception):
                core.place_market_order(SYMBOLS[9], OrderSide.SELL, D(1), f"nb-{i}", now, reduce_only=True)
        sent = venue.calls_made.get(CallKind.CREATE_ORDER, 0)
        assert engine.store is not None
        await engine.store.insert_signals([(SYMBOLS[1], "long", None, None)])
        await drive_until(
            clock,
            lambda: venue.calls_made.get(CallKind.CREATE_ORDER, 0) == sent + 1,
            step=0.05,
            what="the entry sent",
        )
        await drive(clock, clock.sleep(1.2))  # and refused (its answer a second later)
        assert SYMBOLS[1] not in {p.symbol for p in venue.core.inspect(clock.now()).positions}
        phases, took = await _phases_through_a_restart(db, engine, clock)
        assert took > 1.0  # past its grace period
        assert venue.calls_made.get(CallKind.CREATE_ORDER, 0) == sent + 1  # still waiting to go again
        assert phases == {"running"}
        await drive_until_covered(engine, clock, 2)
    finally:
        await drive(clock, engine.stop())


async def _phases_through_a_restart(
    db: Database,
    engine: Engine,
    clock: ManualClock,
    *,
    meanwhile: Callable[[], Awaitable[None]] | None = None,
) -> tuple[set[str], float]:
    """A protection restart, driven to its end: the lease phases seen meanwhile, and how long it took.
    `meanwhile`: done right after the restart begins."""
    from tests.support.driving import drive_until

    restart = asyncio.ensure_future(engine.restart_protection())
    began = clock.monotonic()
    if meanwhile is not None:
        await meanwhile()
    phases: set[str] = set()

    async def restarted() -> bool:
        phases.add(await db.pool.fetchval("SELECT phase FROM monitoring.engine_leases"))
        return restart.done()

    await drive_until(clock, restarted, step=0.1, limit=60, what="the restart done")
    await restart
    return phases, clock.monotonic() - began


async def _is(value: Awaitable[str], expected: str) -> bool:
    return await value == expected


async def test_readers_of_this_version_take_rows_with_columns_a_newer_version_added(db: Database) -> None:
    """A newer `tsbot` (even `tsbot status`) migrates the database while this version's engine or watch may
    still run. Its readers built their records from every column (`SELECT *`): one column more in a table,
    and every read of it failed (an engine whose lease was lost could never take it again)."""
    store = Store(db.pool)
    position = await store.create_position(symbol="AUSDT", exchange="sim", side="long", quantity=Decimal("1"))
    await store.insert_signals([("BUSDT", "long", None, None)])
    lease = await EngineLease.acquire(db.target.dsn, "sim", "sim:default", "test")
    try:
        tables = await db.pool.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'monitoring'"
        )
        for table in tables:
            await db.pool.execute(
                f'ALTER TABLE monitoring."{table["table_name"]}" ADD COLUMN from_a_newer_version int DEFAULT 1'
            )
        holder = await current_holder(db.pool, "sim", "sim:default")
        assert holder is not None
        assert holder.pid == os.getpid()
        assert [p.id for p in await store.open_positions()] == [position.id]
        assert [s.symbol for s in await store.claim_new_signals(10, claimed_by="test")] == ["BUSDT"]
        assert await store.latest_health() == []
        assert await store.recent_waves(limit=5) == []
        assert await store.entries_control("sim", "sim:default") is None
    finally:
        await lease.release()


@pytest.mark.parametrize("found_taken", [True, False], ids=["stopped-itself", "stopped-before-it-found-out"])
async def test_an_engine_whose_account_another_took_leaves_the_new_holders_rows_alone(
    db: Database, found_taken: bool
) -> None:
    """An engine whose lease was lost and taken by another stops itself (`fatal`). Its stop disarmed every
    managed trail of the account and opened an uncovered span on each: the rows the new holder guards, its
    trails armed. Its guards write only what changes, so status and the report said those positions were
    missing their trailing stop for as long as nothing changed (a reviewer's finding). The same when it was
    stopped after its lease's session ended (`pg_terminate_backend`, a network cut) and before its lease
    check found the account taken. Only under its own lease does a stop write the account's rows. And an
    engine that stopped itself does not count the new holder's positions as its own uncovered ones (an
    ERROR "UNCOVERED 1" in the account's log, every watch of it showing it)."""
    from engine.engine import EngineState
    from tests.integration.engine_support import make_engine
    from tests.integration.test_failure_modes_f1_f5 import (
        SYMBOLS,
        drive_until_covered,
        open_positions,
        settings_for,
    )
    from tests.support.driving import drive, drive_until

    clock = ManualClock()
    engine = make_engine(settings_for(db, {"PROTECTION__TRAILING__MODE": "managed"}), clock)
    await drive(clock, engine.start())
    other: EngineLease | None = None
    try:
        [guard] = await open_positions(engine, clock, [SYMBOLS[11]])
        await drive_until_covered(engine, clock, 1)
        await _kill_lease_connection(db, "sim/sim:default")
        other = await EngineLease.acquire(db.target.dsn, "sim", "sim:default", "other-engine")
        if found_taken:
            await drive_until(clock, lambda: engine.state is EngineState.STOPPED, what="stopped itself")
            assert engine.fatal
        else:
            await drive(clock, engine.stop())
        row = await db.pool.fetchrow(
            "SELECT trail_armed, unprotected_since FROM monitoring.positions WHERE id = $1", guard.position_id
        )
        assert (row["trail_armed"], row["unprotected_since"]) == (True, None)
        assert await db.pool.fetchval("SELECT count(*) FROM monitoring.uncovered_spans") == 0
        if found_taken:
            report = engine.stop_report
            assert report is not None
            assert report.describe() == (
                "1 open position left to the engine that took the account; this one no longer protects it"
            )
            event = await db.pool.fetchrow(
                "SELECT severity, message FROM monitoring.events WHERE type = 'engine_stopped'"
            )
            assert event["severity"] == "warning"
            assert "UNCOVERED" not in event["message"]
    finally:
        if other is not None:
            await other.release()
        await drive(clock, engine.stop())


async def test_a_claimed_signal_left_taken_is_said_as_its_position_went(db: Database) -> None:
    """An engine that died after its entry's position was recorded, before its signal was: the next start
    expired the signal as "claimed by an engine that stopped before handling it" even when it had opened a
    position (the shift's history then said the signal never traded). A signal left taken is now said as
    its position went; one whose entry is still being settled is left to that; one with no position is
    expired, with the reason."""
    from decimal import Decimal

    from storage.repositories import PositionStatus

    store = Store(db.pool)
    await store.insert_signals(
        [(symbol, "long", None, None) for symbol in ("SFPUSDT", "ALLUSDT", "ETCUSDT", "BTCUSDT", "AXSUSDT")]
    )
    opened, failed, in_flight, untouched, still_open = await store.claim_new_signals(
        limit=5, claimed_by="sim:default"
    )

    async def position(signal_id: int, symbol: str):  # type: ignore[no-untyped-def]
        return await store.create_position(
            symbol=symbol, exchange="sim", side="long", quantity=Decimal(1), signal_id=signal_id
        )

    closed = await position(opened.id, opened.symbol)
    await store.record_fill(closed.id, Decimal(1), Decimal("1.5"))
    await store.close_position(closed.id, exit_reason="stop_loss", realized_pnl=Decimal("-0.1"))
    refused = await position(failed.id, failed.symbol)
    await store.set_position_status(refused.id, PositionStatus.FAILED, exit_reason="entry rejected -2019")
    await position(in_flight.id, in_flight.symbol)  # pending_entry: its engine settles it
    active = await position(still_open.id, still_open.symbol)  # filled, open: it opened a position
    await store.record_fill(active.id, Decimal(1), Decimal("2.5"))

    assert await store.expire_claimed_signals(claimed_by="sim:default") == 1
    said = {
        s.id: (s.status, s.reason)
        for s in [await store.signal(x.id) for x in (opened, failed, in_flight, still_open)]
        if s
    }
    assert said == {
        opened.id: (SignalStatus.OPENED, None),
        still_open.id: (SignalStatus.OPENED, None),
        failed.id: (SignalStatus.REJECTED, "entry rejected -2019"),
        in_flight.id: (SignalStatus.TAKEN, None),
    }
    expired = await store.signal(untouched.id)
    assert expired is not None
    assert expired.status is SignalStatus.EXPIRED
    assert expired.reason is not None
    assert expired.reason.startswith("claimed by an engine that stopped before handling it")


async def test_the_signals_are_measured_as_soon_as_listen_was_tried_not_at_the_next_health_check(
    db: Database,
) -> None:
    """The first health check of a start runs before the signals' LISTEN has been tried: "not measured
    yet", and `tsbot status` said UNKNOWN (exit 3) for the 5 s to the next check after every start (an
    operator). The check runs again once LISTEN was tried; the saved row is what status reads."""
    clock = ManualClock()
    engine = make_engine(engine_settings(db.target.dsn), clock)
    await drive(clock, engine.start())
    try:

        async def saved() -> str | None:
            return await db.pool.fetchval("SELECT state FROM monitoring.health WHERE component = 'signals'")

        started = clock.monotonic()
        await drive_until(clock, lambda: _known(saved()), step=0.05, limit=10.0, what="signals measured")
        assert clock.monotonic() - started < 1.0  # not the 5 s health interval
    finally:
        await drive(clock, engine.stop())


async def _known(state: Awaitable[str | None]) -> bool:
    return (await state) not in (None, "unknown")


async def test_a_start_given_up_leaves_its_lease_stopping_not_starting(db: Database) -> None:
    """`tsbot status` says open positions an engine left against its will CRITICAL: the lease row still
    `running` or `starting` with nobody holding it means killed or crashed. A start that gave up (a key the
    venue refuses, Ctrl-C while it waits out a ban) left `starting` too, and so would have been a crash to
    status: it ends its lease `stopping`, as a stop does (the terminal already said why)."""
    from engine.clock import SystemClock
    from engine.credentials import CredentialsRefused
    from engine.venues.binance_emulator import BinanceEmulator, running
    from engine.venues.binance_venue import BinanceUsdmVenue
    from engine.venues.ccxt_venue import CcxtVenueConfig
    from engine.venues.sim import SimVenueSettings

    emulator = BinanceEmulator(SimVenueSettings(seed=7, symbols=["SFPUSDT"]), api_key="k", api_secret="s")
    async with running(emulator) as url:
        venue = BinanceUsdmVenue(
            CcxtVenueConfig(kind="binanceusdm", api_key="k", api_secret="not-the-secret", base_url=url)
        )
        engine = Engine(engine_settings(db.target.dsn), venue=venue, clock=SystemClock(), version="test")
        with pytest.raises(CredentialsRefused):
            await engine.start()
        phase = await db.pool.fetchval("SELECT phase FROM monitoring.engine_leases")
        assert phase == "stopping"

        # After an engine that ended without stopping (its row left `running`), a start given up does not
        # write `stopping` over it: nothing has looked after its positions since (a reviewer).
        await db.pool.execute("UPDATE monitoring.engine_leases SET phase = 'running'")
        venue = BinanceUsdmVenue(
            CcxtVenueConfig(kind="binanceusdm", api_key="k", api_secret="not-the-secret", base_url=url)
        )
        again = Engine(engine_settings(db.target.dsn), venue=venue, clock=SystemClock(), version="test")
        with pytest.raises(CredentialsRefused):
            await again.start()
    phase = await db.pool.fetchval("SELECT phase FROM monitoring.engine_leases")
    assert phase == "starting"


async def test_a_stop_after_the_lease_went_with_its_session_still_says_stopping(db: Database) -> None:
    """A reviewer: an engine whose lease went with a database session (the embedded server killed) and which
    was stopped before it took the lease again left its row `running`: `tsbot status` said it ended without
    stopping, and the next start logged so. Its row says `stopping`, written through the pool, only while
    it is still this engine's."""
    clock = ManualClock()
    engine = make_engine(engine_settings(db.target.dsn), clock)
    await drive(clock, engine.start())
    lease = engine._lease
    assert lease is not None
    lease.drop()  # its session gone, as with the server's restart
    await drive(clock, engine.stop())
    assert await db.pool.fetchval("SELECT phase FROM monitoring.engine_leases") == "stopping"

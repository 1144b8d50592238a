"""Holes a reviewer found in how doubt about a position's stops is kept and lifted, and in guards that
stop running: each left a position counted covered while the venue held no stop of ours for it. Every
test reads the venue's own book (`venue.core`) for what it holds."""

from __future__ import annotations

import asyncio
import logging

import pytest

from engine.alerts import observe_engine
from engine.clock import ManualClock
from engine.config import Settings
from engine.exchange.port import OrderType
from engine.venues.sim import SimVenue
from engine.venues.sim.settings import CallKind, FaultKind
from protection.health import Component, HealthState
from protection.manager import ClosePosition
from storage.database import Database
from tests.integration.engine_support import make_engine, reads_fail
from tests.integration.test_failure_modes_f1_f5 import (
    SYMBOLS,
    drive_until_covered,
    open_positions,
    settings_for,
)
from tests.support.driving import drive, drive_until


async def _until_hard_stop_replaced(
    settings: Settings, clock: ManualClock, venue: SimVenue, symbol: str, lost: str | None
) -> None:
    """Drive until the venue holds a hard stop of ours on `symbol` other than the one cancelled by hand (the
    lost stop found gone and placed again), within the grace period and a few round trips of retries."""

    def replaced() -> bool:
        return any(
            o.type is OrderType.STOP_MARKET and o.client_order_id != lost
            for o in venue.core.open_protective_orders(clock.now(), symbol)
        )

    grace = float(settings.protection.grace_seconds)
    await drive_until(clock, replaced, limit=grace + 10.0, what="the cancelled hard stop placed again")


async def test_a_stream_down_with_passes_more_often_than_grace_still_puts_stops_in_doubt(
    db: Database,
) -> None:
    """The reconcile loop tells the stream's outage again before every pass, and each telling restarted
    the doubt's grace period: with passes every 3 s (grace 2 s, a listing's late answer more) the doubt
    never came, and a position whose hard stop was cancelled by hand showed covered for the whole minute
    the venue held none."""
    settings = settings_for(db, {"PROTECTION__RECONCILE_SECONDS": "3"})
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        [guard] = await open_positions(engine, clock, [SYMBOLS[51]])
        await drive_until_covered(engine, clock, 1)
        venue = engine.venue
        assert isinstance(venue, SimVenue)
        reads_fail(venue, CallKind.FETCH_OPEN_ORDERS)
        venue.drop_account_stream(600.0)
        lost = guard.stop_loss.client_order_id
        venue.core.cancel_order(guard.symbol, lost, clock.now())  # by hand, unseen
        await _until_hard_stop_replaced(settings, clock, venue, guard.symbol, lost)
    finally:
        await drive(clock, engine.stop())


async def test_a_listing_that_leaves_the_position_out_does_not_vouch_for_its_stops(db: Database) -> None:
    """A gap pending, a hard stop cancelled by hand in it; the next listing answered no positions (past the
    start-up window): the guard was never checked against it, yet the listing lifted the doubt for every
    guard, and the position stayed covered while later listings failed."""
    settings = settings_for(db, {"PROTECTION__RECONCILE_SECONDS": "600"})
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        await drive(clock, clock.sleep(31.0))  # past the start-up window (an empty answer is news then)
        [guard] = await open_positions(engine, clock, [SYMBOLS[52]])
        await drive_until_covered(engine, clock, 1)
        venue = engine.venue
        assert isinstance(venue, SimVenue)
        reconciler = engine.reconciler
        assert reconciler is not None
        reads_fail(venue, CallKind.FETCH_OPEN_ORDERS)
        venue.drop_account_stream(3.0)
        lost = guard.stop_loss.client_order_id
        venue.core.cancel_order(guard.symbol, lost, clock.now())  # by hand, unseen
        await drive(clock, clock.sleep(2.5))  # the passes while it is down fail
        venue.clear_injected_faults()
        venue.answer_positions_empty(1)
        runs = reconciler.runs
        await drive_until(clock, lambda: reconciler.runs > runs, limit=5.0, what="a pass")
        reads_fail(venue, CallKind.FETCH_OPEN_ORDERS)
        await _until_hard_stop_replaced(settings, clock, venue, guard.symbol, lost)
    finally:
        await drive(clock, engine.stop())


async def test_a_close_in_flight_at_the_listing_does_not_have_its_stops_vouched_for(db: Database) -> None:
    """A close on its way is skipped by the listing's check (its stops going is the close's doing), yet the
    listing lifted the doubt of a gap in which its hard stop was cancelled by hand; the close then failed,
    and the position said "still protected by its confirmed stops" with none on the venue."""
    settings = settings_for(db, {"PROTECTION__RECONCILE_SECONDS": "600"})
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        [guard] = await open_positions(engine, clock, [SYMBOLS[55]])
        await drive_until_covered(engine, clock, 1)
        venue = engine.venue
        assert isinstance(venue, SimVenue)
        reconciler = engine.reconciler
        assert reconciler is not None
        venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.TIMEOUT_NOT_EXECUTED, count=100)
        closing = asyncio.ensure_future(engine.close_position(guard.position_id))
        await drive_until(clock, lambda: guard.close_sent, limit=5.0, what="the close sent")
        venue.drop_account_stream(0.3)
        lost = guard.stop_loss.client_order_id
        venue.core.cancel_order(guard.symbol, lost, clock.now())  # by hand, unseen
        runs = reconciler.runs
        await drive_until(clock, lambda: reconciler.runs > runs, limit=5.0, what="a pass")
        reads_fail(venue, CallKind.FETCH_OPEN_ORDERS)
        await drive_until(clock, closing.done, limit=60.0, what="the close given up")
        assert closing.result() is False
        venue.clear_injected_faults()
        reads_fail(venue, CallKind.FETCH_OPEN_ORDERS)
        await _until_hard_stop_replaced(settings, clock, venue, guard.symbol, lost)
    finally:
        await drive(clock, engine.stop())


async def test_a_stop_cancelled_while_a_close_waits_for_its_turn_uncovers_the_position_at_once(
    db: Database,
) -> None:
    """An operator's close waiting out a ban applied only what could end the position: the account
    stream's word that the hard stop was cancelled by hand waited behind it, and the gauge, the records
    and `tsbot status` said covered for the whole wait while the venue held no hard stop."""
    settings = settings_for(db)
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        [guard] = await open_positions(engine, clock, [SYMBOLS[56]])
        await drive_until_covered(engine, clock, 1)
        venue = engine.venue
        assert isinstance(venue, SimVenue)
        assert engine.order_budget is not None
        engine.order_budget.hold_until(clock.monotonic() + 60.0, banned=True)
        closing = asyncio.ensure_future(engine.close_position(guard.position_id))
        await drive(clock, clock.sleep(0.5))
        assert guard.closing
        lost = guard.stop_loss.client_order_id
        venue.core.cancel_order(guard.symbol, lost, clock.now())  # by hand; the stream tells it
        await drive_until(clock, lambda: not guard.covered, limit=2.0, what="uncovered")
        await drive(clock, clock.sleep(1.0))
        recorded = await db.pool.fetchval(
            "SELECT has_stop_loss FROM monitoring.positions WHERE id = $1", guard.position_id
        )
        assert recorded is False  # the records say so too (what `tsbot status` reads)
        assert guard.closing  # (still waiting for the ban's end)
        await drive_until(clock, closing.done, limit=90.0, what="the close done after the ban")
        assert closing.result() is True
        assert guard.symbol not in {p.symbol for p in venue.core.positions(clock.now())}
    finally:
        await drive(clock, engine.stop())


async def test_a_guard_failing_for_hours_keeps_running(db: Database) -> None:
    """The backoff computed 2 ** (failures - 1): past 1 024 failed passes in a row (some 8 hours of a stop
    refused at the 30 s cap) it overflowed, inside the guard's own failure report, and the guard's task
    died; once the venue took stops again nothing placed one."""
    settings = settings_for(db, {"PROTECTION__RECONCILE_SECONDS": "600"})
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        venue = engine.venue
        assert isinstance(venue, SimVenue)
        venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.SERVER_ERROR, count=10_000_000, stops_only=True)
        [guard] = await open_positions(engine, clock, [SYMBOLS[57]])
        await drive(clock, clock.sleep(60.0))
        guard.failures = 1020  # stands for ~8 h of refused stops at the 30 s cap
        for _ in range(10):  # (in 1 s steps: the passes come every 30 s)
            await drive(clock, clock.sleep(60.0), step=1.0)
        assert guard.failures > 1030
        venue.clear_injected_faults()
        await drive_until_covered(engine, clock, 1, limit=60.0)
    finally:
        await drive(clock, engine.stop())


async def test_a_guard_whose_task_died_is_started_again_and_counts_uncovered_meanwhile(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """A guard's task that ended with its position open (a bug, a cancellation) was said once at CRITICAL
    and never started again: the position kept the coverage it had when the task died, and a stop
    cancelled by hand after that was never placed again (100 % coverage shown 40 s later)."""
    settings = settings_for(db)
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        [guard] = await open_positions(engine, clock, [SYMBOLS[53]])
        await drive_until_covered(engine, clock, 1)
        manager = engine.manager
        assert manager is not None
        manager._tasks[guard.position_id].cancel()
        await drive(clock, clock.sleep(0.1))
        assert not guard.covered  # at once: nothing watches its stops until it runs again
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
        assert any("protection task ended with the position open" in m for m in said), said

        async def recorded_unverified() -> bool:
            row = await db.pool.fetchrow(
                "SELECT has_stop_loss, stop_loss_unverified FROM monitoring.positions WHERE id = $1",
                guard.position_id,
            )
            return row is not None and tuple(row) == (False, True)

        # The records too, before it runs again (what `tsbot status` and the operators' SQL read).
        await drive_until(clock, recorded_unverified, limit=0.8, what="recorded before the restart")
        venue = engine.venue
        assert isinstance(venue, SimVenue)
        lost = guard.stop_loss.client_order_id
        venue.core.cancel_order(guard.symbol, lost, clock.now())  # by hand
        await _until_hard_stop_replaced(settings, clock, venue, guard.symbol, lost)
        await drive_until_covered(engine, clock, 1, limit=10.0)
    finally:
        await drive(clock, engine.stop())


async def test_a_listing_that_shows_stops_in_doubt_live_confirms_them(db: Database) -> None:
    """Stops put in doubt by a gap are looked up by their ids; with the look-ups failing, listings that
    answered and showed both stops live did not lift the doubt: the position stayed uncovered (a false
    alarm), ERROR lines kept coming and the breaker paused entries."""
    settings = settings_for(db)
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        [guard] = await open_positions(engine, clock, [SYMBOLS[58]])
        await drive_until_covered(engine, clock, 1)
        venue = engine.venue
        assert isinstance(venue, SimVenue)
        reads_fail(venue, CallKind.FETCH_OPEN_ORDERS, CallKind.FETCH_ORDER)
        venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.SERVER_ERROR, count=100_000, stops_only=True)
        venue.drop_account_stream(1.0)
        await drive_until(clock, lambda: not guard.covered, limit=10.0, what="in doubt")
        venue.clear_injected_faults()
        venue.inject_fault(CallKind.FETCH_ORDER, FaultKind.SERVER_ERROR, count=100_000)
        reconcile = float(settings.protection.reconcile_seconds)
        await drive_until(clock, lambda: guard.covered, limit=reconcile + 5.0, what="confirmed by a listing")
        assert not engine.snapshot().entries_paused
    finally:
        await drive(clock, engine.stop())


async def test_a_fill_whose_record_waits_for_the_database_counts_as_a_position_without_stops(
    db: Database,
) -> None:
    """A reviewer's find: between an entry's answer (filled) and its guard, the engine awaited two
    writes (the entry's status, the fill), each of which may wait seconds for a hung database before it
    is journaled; meanwhile the position was in no guard and counted nowhere (the gauge, the exit line),
    and its grace period began after the writes. It is counted from the answer, as a position without
    stops."""
    settings = settings_for(db, {"VENUE__SIM__LATENCY__BY_CALL": '{"create_order": {"seconds": 0.5}}'})
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        assert engine.store is not None
        manager = engine.manager
        assert manager is not None
        symbol = SYMBOLS[59]

        async def entry_recorded() -> bool:
            return bool(
                await db.pool.fetchval(
                    "SELECT count(*) FROM monitoring.orders WHERE purpose = 'entry' AND status = 'pending'"
                )
            )

        await engine.store.insert_signals([(symbol, "long", None, None)])
        await drive_until(clock, entry_recorded, limit=30.0, what="the entry sent")  # (a database write)
        async with db.pool.acquire() as connection, connection.transaction():
            # The entry's answer is on its way: its writes wait for this lock (a slow database).
            await connection.execute("LOCK TABLE monitoring.orders IN EXCLUSIVE MODE")
            answered_by = clock.monotonic() + 0.5
            await drive_until(
                clock,
                lambda: clock.monotonic() > answered_by + 0.2 and not engine.snapshot().entries_sending,
                limit=5.0,
                what="the entry answered",
            )
            assert not manager.guards  # (its record still waits for the database)
            figures = engine.coverage()
            assert figures.active == 1, figures  # counted: a position without stops
            assert figures.protected == 0, figures
            observed = observe_engine(engine, clock.monotonic())  # the alerts count it too (a reviewer)
            assert (observed.active, observed.protected) == (1, 0), observed
            [view] = engine.snapshot().positions
            assert view.symbol == symbol
            assert not view.covered
        await drive_until_covered(engine, clock, 1, limit=10.0)
    finally:
        await drive(clock, engine.stop())


async def test_no_entry_goes_while_the_stops_are_in_doubt(db: Database) -> None:
    """An operator: the account stream down, the venue's reads failing, every stop in doubt ("unverified
    (uncovered)" in the log); 6 s later a wave opened five positions, whose stops could not be verified
    either, and the breaker paused entries only 3 s after that. While the doubt lasts, a signal is
    rejected, saying why; once a listing answers, entries go again."""
    settings = settings_for(db, {"PROTECTION__RECONCILE_SECONDS": "600"})
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        [guard] = await open_positions(engine, clock, [SYMBOLS[62]])
        await drive_until_covered(engine, clock, 1)
        venue = engine.venue
        assert isinstance(venue, SimVenue)
        assert engine.store is not None
        reads_fail(venue)
        venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.SERVER_ERROR, count=100_000, stops_only=True)
        venue.drop_account_stream(5.0)
        await drive_until(clock, lambda: not guard.covered, limit=10.0, what="in doubt")
        await engine.store.insert_signals([(SYMBOLS[63], "long", None, None)])

        async def answered(symbol: str) -> tuple[str, str | None] | None:
            row = await db.pool.fetchrow(
                "SELECT status, reason FROM monitoring.signals WHERE symbol = $1 AND status NOT IN "
                "('new', 'taken')",
                symbol,
            )
            return None if row is None else (row["status"], row["reason"])

        await drive_until(clock, lambda: answered(SYMBOLS[63]), limit=10.0, what="the signal answered")
        status, reason = await answered(SYMBOLS[63]) or ("", "")
        assert status == "rejected"
        assert reason is not None
        assert reason.startswith("entries held: the account stream had a gap"), reason
        assert SYMBOLS[63] not in {p.symbol for p in venue.core.positions(clock.now())}
        venue.clear_injected_faults()
        await drive_until_covered(engine, clock, 1, limit=30.0)
        assert engine.manager is not None
        assert engine.manager.stops_in_doubt_since is None  # (every stop found live by its id)
        if engine.entries_paused:  # the breaker's own pause (coverage 0 % past grace), the operator's to lift
            engine.resume_entries("tester")
        await open_positions(engine, clock, [SYMBOLS[64]])  # entries go again
    finally:
        await drive(clock, engine.stop())


async def test_a_guard_started_again_does_not_carry_out_a_command_already_answered(db: Database) -> None:
    """A reviewer's find: a guard's task that died settled its queued commands ("the guard stopped") but
    kept them, and the guard started again carried them out: an operator's close answered as not done went
    at market a backoff later."""
    settings = settings_for(db)
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        [guard] = await open_positions(engine, clock, [SYMBOLS[65]])
        await drive_until_covered(engine, clock, 1)
        manager = engine.manager
        assert manager is not None
        answer = guard.submit(ClosePosition())
        manager._tasks[guard.position_id].cancel()
        await drive(clock, clock.sleep(0.1))
        assert answer.done()
        assert answer.result()[0] is False
        await drive_until_covered(engine, clock, 1, limit=10.0)  # started again, protecting
        await drive(clock, clock.sleep(5.0))
        assert guard.symbol in {p.symbol for p in engine.venue.core.positions(clock.now())}
        assert not guard.closed
    finally:
        await drive(clock, engine.stop())


async def test_a_stop_whose_earlier_generation_ended_is_said_unverified_in_doubt(db: Database) -> None:
    """A reviewer's find: a hard stop cancelled by hand (seen, placed again under a new id) kept the old
    id's end (`ended_as`), so the new stop put in doubt by a later gap never read "unverified": "missing"
    (inviting a stop placed by hand), and the hold on entries lifted at once."""
    settings = settings_for(db, {"PROTECTION__RECONCILE_SECONDS": "600"})
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        [guard] = await open_positions(engine, clock, [SYMBOLS[66]])
        await drive_until_covered(engine, clock, 1)
        venue = engine.venue
        assert isinstance(venue, SimVenue)
        first = guard.stop_loss.client_order_id
        venue.core.cancel_order(guard.symbol, first, clock.now())  # by hand, seen by the stream
        await drive_until(
            clock,
            lambda: guard.covered and guard.stop_loss.client_order_id != first,
            limit=10.0,
            what="placed again",
        )
        reads_fail(venue)
        venue.drop_account_stream(5.0)
        await drive_until(clock, lambda: not guard.covered, limit=10.0, what="in doubt")
        assert guard.stop_loss_unverified
        assert engine.manager is not None
        assert engine.manager.stops_in_doubt_since is not None  # (entries held meanwhile)
        venue.clear_injected_faults()
        await drive_until_covered(engine, clock, 1, limit=40.0)
    finally:
        await drive(clock, engine.stop())


async def test_a_stop_in_doubt_the_stream_says_was_cancelled_is_missing_not_unverified(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """A reviewer, on Bybit inside a ban: a stop in doubt (a gap in the account stream) was removed by
    someone, and the stream, back, said so; the venue could not be asked by id (the ban), and the stop read
    "unverified: in doubt, not known gone" for minutes, the dashboard's quit dialog saying it "may still be
    on the exchange". The stream's word makes it missing (the look-up by id still settles it)."""
    settings = settings_for(db, {"PROTECTION__RECONCILE_SECONDS": "600"})
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        [guard] = await open_positions(engine, clock, [SYMBOLS[67]])
        await drive_until_covered(engine, clock, 1)
        venue = engine.venue
        assert isinstance(venue, SimVenue)
        reads_fail(venue)
        venue.drop_account_stream(2.0)
        await drive_until(clock, lambda: not guard.covered, limit=10.0, what="in doubt")
        assert guard.stop_loss_unverified
        await drive(clock, clock.sleep(3.0))  # the stream back, the look-ups by id still refused
        assert guard.stop_loss_unverified
        cid, trailing = guard.stop_loss.client_order_id, guard.trailing_stop.client_order_id
        assert cid is not None
        assert trailing is not None
        for gone in (cid, trailing):  # by hand; the stream tells it
            venue.core.cancel_order(guard.symbol, gone, clock.now())
        await drive_until(
            clock,
            lambda: not (guard.stop_loss_unverified or guard.trailing_stop_unverified),
            limit=2.0,
            what="said missing",
        )
        assert not {cid, trailing} & {
            o.client_order_id for o in venue.core.open_protective_orders(clock.now())
        }
        assert not guard.has_stop_loss
        assert any("while in doubt" in r.getMessage() for r in caplog.records)
        # Still a doubt for the entries' hold: nothing has read the venue since the gap (the first version
        # of this fix lifted the hold on the stream's word alone: r62).
        assert engine.manager is not None
        assert engine.manager.stops_in_doubt_since is not None
        venue.clear_injected_faults()
        await drive_until_covered(engine, clock, 1, limit=40.0)  # placed again once the venue answers
    finally:
        await drive(clock, engine.stop())


async def test_stops_confirmed_within_the_read_lag_of_a_gap_s_listing_stay_covered(db: Database) -> None:
    """A false alarm of this session's own fix: a listing vouches only for the stops it checked, and a stop
    confirmed within the venue's read lag of it is not checked (the listing may not show it yet). Those were
    put in doubt: after a restart on the Binance emulator (a 5 s read lag), the stops just placed counted
    uncovered again, with a second span each in the history. Their confirmation is as fresh as the
    listing: they stay covered."""
    settings = settings_for(db, {"PROTECTION__RECONCILE_SECONDS": "600"})
    clock = ManualClock()
    engine = make_engine(settings, clock, read_lag=5.0)
    await drive(clock, engine.start())
    try:
        [guard] = await open_positions(engine, clock, [SYMBOLS[67]])
        await drive_until(clock, lambda: guard.covered, limit=10.0, what="covered")
        venue = engine.venue
        assert isinstance(venue, SimVenue)
        venue.drop_account_stream(0.3)  # a gap, its listing within the read lag of the stops' confirmation
        for _ in range(40):
            await drive(clock, clock.sleep(0.1))
            assert guard.covered
    finally:
        await drive(clock, engine.stop())


async def test_reconcile_passes_that_keep_failing_are_said_in_protection_health(db: Database) -> None:
    """Every reconcile pass failed (one failing order list) while the account stream lost its events: a
    stop removed by hand went unseen 70-110 s, and health said protection healthy, 100 %, the exchange
    only degraded for its errors (an operator, on the Bybit emulator). The passes are the check of what
    the stream says: health says when they have not checked the venue's stops for three intervals."""
    settings = settings_for(db, {"PROTECTION__RECONCILE_SECONDS": "5"})
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        await open_positions(engine, clock, [SYMBOLS[57]])
        await drive_until_covered(engine, clock, 1)
        venue = engine.venue
        assert isinstance(venue, SimVenue)
        reads_fail(venue, CallKind.FETCH_OPEN_ORDERS)
        await drive(clock, clock.sleep(8))  # a pass or so failed: no alarm for that
        health = await drive(clock, engine.measure_health())
        assert health[Component.PROTECTION].state is HealthState.HEALTHY, health[Component.PROTECTION].reason
        await drive(clock, clock.sleep(12))
        health = await drive(clock, engine.measure_health())
        protection = health[Component.PROTECTION]
        assert protection.state is HealthState.DEGRADED
        assert "Stops not checked against the venue for " in protection.reason
        assert "reconcile failing: sim fetch_open_orders: HTTP 500" in protection.reason
        [live] = [c for c in engine.current_health() if c.component is Component.PROTECTION]
        assert live.state is HealthState.DEGRADED  # /healthz and the dashboard judge it so too
        assert "Stops not checked against the venue for " in live.reason

        venue.clear_injected_faults()
        await drive(clock, engine.reconcile_now())  # an operator's pass counts as a check too (a reviewer)
        health = await drive(clock, engine.measure_health())
        assert health[Component.PROTECTION].state is HealthState.HEALTHY, health[Component.PROTECTION].reason
    finally:
        await drive(clock, engine.stop())

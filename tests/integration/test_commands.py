"""Operator commands (monitoring.commands) on their own and through an in-process engine (sim venue,
ManualClock, real PostgreSQL): claimed once, only by their own account's engine, never after they expired;
a close the venue refuses is answered as failed and leaves the position protected; a flatten that closes
some positions only is partial; a command an earlier engine took and never answered is failed at start."""

from __future__ import annotations

import asyncio
import logging

import pytest

from engine.clock import ManualClock
from engine.commands import LEFT_RUNNING, send_command
from engine.venues.sim.settings import CallKind, FaultKind
from storage.commands import CommandKind, CommandQueue, CommandState
from storage.database import Database
from storage.lease import EngineLease, LeasePhase
from tests.integration.engine_support import make_engine
from tests.integration.test_failure_modes_f1_f5 import (
    SYMBOLS,
    drive_until_covered,
    open_positions,
    settings_for,
)
from tests.support.driving import drive, drive_until
from tests.support.pg_proxy import SilentFromProxy


async def test_a_command_is_claimed_once_and_only_by_its_own_account(db: Database) -> None:
    mine, theirs = CommandQueue(db.pool, "sim:main"), CommandQueue(db.pool, "sim:other")
    sent = await mine.submit(
        CommandKind.CLOSE, {"symbol": "SFPUSDT"}, requested_by="op@host/1", reason="", expires_in_seconds=60
    )
    assert sent.state is CommandState.PENDING
    assert await theirs.claim_next() is None
    # Several claimers at once (two engines racing, should the lease ever allow it): one gets it.
    claims = await asyncio.gather(*(mine.claim_next() for _ in range(4)))
    taken = [c for c in claims if c is not None]
    assert [c.id for c in taken] == [sent.id]
    assert taken[0].state is CommandState.RUNNING
    assert taken[0].picked_at is not None
    assert not await mine.withdraw(sent.id)  # taken: too late to withdraw
    await mine.finish(sent.id, CommandState.DONE, {"ok": True, "summary": "x", "positions": []})
    await theirs.finish(sent.id, CommandState.FAILED, {"ok": False})  # another account cannot touch it
    final = await mine.get(sent.id)
    assert final is not None
    assert final.state is CommandState.DONE
    assert await theirs.get(sent.id) is None


async def test_an_expired_command_is_never_claimed(db: Database) -> None:
    queue = CommandQueue(db.pool, "sim:main")
    stale = await queue.submit(
        CommandKind.FLATTEN, {"all": True}, requested_by="op@host/1", reason="", expires_in_seconds=0
    )
    assert await queue.claim_next() is None
    record = await queue.get(stale.id)
    assert record is not None
    assert record.state is CommandState.EXPIRED
    withdrawn = await queue.submit(
        CommandKind.CLOSE, {"symbol": "SFPUSDT"}, requested_by="op@host/1", reason="", expires_in_seconds=60
    )
    assert await queue.withdraw(withdrawn.id)
    assert await queue.claim_next() is None


async def test_a_close_the_venue_refuses_fails_and_a_flatten_that_closes_some_is_partial(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator's close the venue refuses is not retried (the next close is the operator's): it is said
    so. Its line said "retrying in 1.0s" and the dashboard's log "retrying", and nothing ever retried it."""
    settings = settings_for(db)
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        await open_positions(engine, clock, SYMBOLS[10:13])
        await drive_until_covered(engine, clock, 3)
        assert engine.store is not None

        async def command(kind: CommandKind, args: dict[str, object]):  # type: ignore[no-untyped-def]
            return await drive(
                clock,
                send_command(
                    db.pool,
                    venue=engine.exchange_name,
                    account=engine.account_key,
                    kind=kind,
                    args=args,
                    reason="test",
                    wait_seconds=30,
                ),
            )

        venue = engine.venue
        # Refused each time it is sent (a close the venue did not execute is sent again within the budget).
        venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.NETWORK_ERROR_BEFORE_SEND, 1000)  # type: ignore[attr-defined]
        refused = await command(CommandKind.CLOSE, {"symbol": SYMBOLS[10]})
        venue.clear_injected_faults()  # type: ignore[attr-defined]
        assert refused.record is not None
        assert refused.record.state is CommandState.FAILED
        [outcome] = refused.positions
        assert outcome.symbol == SYMBOLS[10]
        assert not outcome.ok
        assert outcome.detail.startswith("NOT closed (")
        assert "the position stays protected" in outcome.detail
        assert SYMBOLS[10] in engine.manager.by_symbol  # type: ignore[union-attr]
        await drive_until_covered(engine, clock, 3)  # still protected on the venue
        said = [r.getMessage() for r in caplog.records if "close position failed" in r.getMessage()]
        assert len(said) == 1, said
        assert said[0].endswith("; not retried: ask again to retry"), said
        closes_sent = venue.calls_made[CallKind.CREATE_ORDER]  # type: ignore[attr-defined]
        await drive(clock, clock.sleep(10.0))
        assert venue.calls_made[CallKind.CREATE_ORDER] == closes_sent  # type: ignore[attr-defined]
        assert {p.symbol for p in venue.core.positions(clock.now())} == set(SYMBOLS[10:13])  # type: ignore[attr-defined]

        # One symbol's market orders refused every time (its close is sent again within the budget, and
        # fails): the flatten closes the others and says which it did not.
        venue.inject_fault(  # type: ignore[attr-defined]
            CallKind.CREATE_ORDER, FaultKind.NETWORK_ERROR_BEFORE_SEND, 1000, market_symbol=SYMBOLS[11]
        )
        partial = await command(CommandKind.FLATTEN, {"all": True})
        assert partial.record is not None
        assert partial.record.state is CommandState.PARTIAL
        assert sorted(p.ok for p in partial.positions) == [False, True, True]
        assert engine.entries_paused  # a flatten pauses entries first
        held = {p.symbol for p in venue.core.positions(clock.now())}  # type: ignore[attr-defined]
        assert len(held) == 1
        assert {p.symbol for p in partial.positions if not p.ok} == held
        assert {o.symbol for o in venue.core.open_protective_orders(clock.now())} == held  # type: ignore[attr-defined]
    finally:
        await drive(clock, engine.stop())


async def test_a_command_an_earlier_engine_took_and_never_answered_is_failed_at_start(db: Database) -> None:
    settings = settings_for(db)
    clock = ManualClock()
    engine = make_engine(settings, clock)
    queue = CommandQueue(db.pool, engine.account_key)
    left = await queue.submit(
        CommandKind.RESTART_PROTECTION, {}, requested_by="op@host/1", reason="", expires_in_seconds=60
    )
    assert (await queue.claim_next()) is not None  # the engine that took it died before answering
    await drive(clock, engine.start())
    try:

        async def failed() -> bool:
            record = await queue.get(left.id)
            return record is not None and record.state is CommandState.FAILED

        await drive_until(clock, failed, what="the orphaned command marked failed")
        record = await queue.get(left.id)
        assert record is not None
        assert record.result is not None
        assert record.result["summary"] == LEFT_RUNNING
    finally:
        await drive(clock, engine.stop())


async def test_a_command_the_engine_stops_in_the_middle_of_is_answered_at_its_stop(db: Database) -> None:
    """An operator's close, refused by the venue again and again, then the engine stopped: the command
    stayed `running` in monitoring.commands with no engine to finish it, until some later start (an
    operator). The stop lets the close end within its budget (opme48), and the command is answered with
    its outcome."""
    settings = settings_for(db)
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    stopped = False
    try:
        await open_positions(engine, clock, SYMBOLS[20:21])
        await drive_until_covered(engine, clock, 1)
        venue = engine.venue
        # Refused each time it is sent: the close goes on trying within its budget.
        venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.NETWORK_ERROR_BEFORE_SEND, 1000)  # type: ignore[attr-defined]
        queue = CommandQueue(db.pool, engine.account_key)
        sent = await queue.submit(
            CommandKind.CLOSE,
            {"symbol": SYMBOLS[20]},
            requested_by="op@host/1",
            reason="",
            expires_in_seconds=60,
        )

        async def taken() -> bool:
            record = await queue.get(sent.id)
            return record is not None and record.state is CommandState.RUNNING

        await drive_until(clock, taken, step=0.01, what="the close taken")
        # Its close order recorded (written before each send): the engine is in the middle of it. Stopped at
        # the command's claim alone, a loaded CI run stopped it before its execution began, which the stop
        # answers rightly otherwise ("the engine is stopping; try again once it runs": nothing was sent).
        await drive_until(
            clock,
            lambda: db.pool.fetchval("SELECT count(*) > 0 FROM monitoring.orders WHERE purpose = 'close'"),
            step=0.01,
            what="the close being sent",
        )
        stopped = True
        await drive(clock, engine.stop())
        record = await queue.get(sent.id)
        assert record is not None
        assert record.state is CommandState.FAILED, record
        assert record.result is not None
        assert record.result["summary"].startswith(f"{SYMBOLS[20]}: NOT closed ("), record.result
    finally:
        if not stopped:
            await drive(clock, engine.stop())


async def test_a_command_wakes_the_engine_by_notify_without_waiting_for_a_poll(db: Database) -> None:
    """Virtual time stands still while the command is sent: no poll can fire, only NOTIFY wakes the loop."""
    settings = settings_for(db)
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        assert engine.consumer is not None
        consumer = engine.consumer
        await drive_until(clock, lambda: consumer.listening, what="LISTEN up")
        frozen_at = clock.monotonic()
        answer = await asyncio.wait_for(
            send_command(
                db.pool,
                venue=engine.exchange_name,
                account=engine.account_key,
                kind=CommandKind.ENTRIES_PAUSE,
                reason="by notify",
                wait_seconds=30,
                requested_by="op@host/7",
            ),
            timeout=30,
        )
        assert clock.monotonic() == frozen_at
        assert answer.ok, answer.summary
        assert engine.entries_paused
        assert engine.entries_pause_reason == "by notify"
    finally:
        await drive(clock, engine.stop())


async def test_an_operators_routine_commands_say_nothing_at_warning(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator's pause, resume and protection restart, done as asked, are no alarm: each is logged
    at INFO (and recorded as its `command_<kind>` event). Logged at WARNING, each filled the dashboard's
    warning count (an operator in tmux saw 8 in an hour, all of them his own commands), where real warnings
    got lost."""
    settings = settings_for(db)
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        await open_positions(engine, clock, [SYMBOLS[30]])
        await drive_until_covered(engine, clock, 1)
        caplog.clear()
        caplog.set_level(logging.INFO)
        for kind in (CommandKind.ENTRIES_PAUSE, CommandKind.ENTRIES_RESUME, CommandKind.RESTART_PROTECTION):
            sent = asyncio.ensure_future(
                send_command(
                    db.pool,
                    venue=engine.exchange_name,
                    account=engine.account_key,
                    kind=kind,
                    reason="routine",
                    wait_seconds=30,
                    requested_by="op@host/7",
                )
            )
            await drive_until(clock, sent.done, what=f"{kind} answered")
            assert sent.result().ok, sent.result().summary
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert said == []
        # Nor in the account's events, which a read-only dashboard's log panel counts from.
        loud = await db.pool.fetch(
            "SELECT type, message FROM monitoring.events WHERE severity IN ('warning', 'error', 'critical') "
            "AND created_at >= now() - interval '1 hour'"
        )
        assert [dict(r) for r in loud] == []
        assert any(r.levelno == logging.INFO and "command #" in r.getMessage() for r in caplog.records)
    finally:
        await drive(clock, engine.stop())


async def test_a_command_an_engine_still_starting_does_not_take_says_it_is_starting(db: Database) -> None:
    """`tsbot close` while the engine's start waited out a ban said only "did not take command within 5s"
    (an operator): the lease says the engine is starting, and the answer says so."""
    lease = await EngineLease.acquire(db.target.dsn, "sim", "sim:default", "test", phase=LeasePhase.STARTING)
    try:
        answer = await send_command(
            db.pool,
            venue="sim",
            account="sim:default",
            kind=CommandKind.CLOSE,
            args={"symbol": "SFPUSDT"},
            wait_seconds=0.5,
        )
    finally:
        await lease.release()
    assert answer.problem is not None
    assert "did not take command" in answer.problem
    assert (
        ": it is starting (a start waits for the venue's first answers, a ban's end included)"
        in answer.problem
    )


async def test_a_wait_whose_listener_the_server_stops_answering_ends_on_time(db: Database, pg_server) -> None:
    """A `tsbot flatten` hung past 90 s in a clean-clone CI: the database froze while the sender set up its
    LISTEN connection, whose connect was bounded but whose LISTEN statement was not. The wait carries on by
    polling, and its answer comes within its time."""
    queue = CommandQueue(db.pool, "sim:main")
    sent = await queue.submit(
        CommandKind.FLATTEN, {"all": True}, requested_by="op@host/1", reason="", expires_in_seconds=60
    )
    # The LISTEN statement's first message goes unanswered.
    proxy = await SilentFromProxy.in_front_of(pg_server.socket_dir, db.target.dsn, silent_from=b"P")
    started = asyncio.get_running_loop().time()
    try:
        async with asyncio.timeout(30):
            latest = await queue.wait_finished(sent.id, 3.0, listen_dsn=proxy.dsn)
    except TimeoutError:
        pytest.fail("a wait of 3 s still waited after 30 s: its LISTEN held it")
    finally:
        await proxy.close()
    took = asyncio.get_running_loop().time() - started
    assert proxy.held == 1  # the LISTEN was sent and never answered
    assert latest is not None
    assert latest.state is CommandState.PENDING
    assert took < 3.0 + 1.0, took  # its own time, and a poll

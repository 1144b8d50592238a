"""Signals flow from monitoring.signals into waves: NOTIFY wake-up, polling fallback, wave window."""

from __future__ import annotations

import asyncio
import contextlib
from decimal import Decimal

import pytest

from engine.clock import ManualClock, SystemClock
from engine.signals import LISTEN_SETUP_TIMEOUT_SECONDS, SignalConsumer, SimSignalGenerator
from storage.database import Database
from storage.repositories import Store
from tests.support.driving import drive_until
from tests.support.pg_proxy import SilentFromProxy
from tests.support.waiting import wait_until


async def _next_wave(consumer: SignalConsumer):
    iterator = consumer.waves()
    try:
        return await asyncio.wait_for(anext(iterator), timeout=10)
    finally:
        await iterator.aclose()


async def test_notify_wakes_the_consumer_long_before_its_poll(db: Database) -> None:
    store = Store(db.pool)
    # Polling once an hour: only the NOTIFY can deliver this signal within the test's timeout.
    consumer = SignalConsumer(
        store, SystemClock(), listen_dsn=db.target.dsn, wave_window_seconds=0, poll_interval_seconds=3600
    )
    waiting = asyncio.create_task(_next_wave(consumer))
    await wait_until(lambda: consumer.listening, what="the LISTEN connection")
    await store.insert_signal("SFPUSDT", "long")
    wave = await waiting
    assert [s.symbol for s in wave.signals] == ["SFPUSDT"]


async def test_polling_delivers_when_there_is_no_listener(db: Database) -> None:
    store = Store(db.pool)
    consumer = SignalConsumer(
        store, SystemClock(), listen_dsn=None, wave_window_seconds=0, poll_interval_seconds=0.05
    )
    waiting = asyncio.create_task(_next_wave(consumer))
    await store.insert_signal("ALLUSDT", "short")
    wave = await waiting
    assert [(s.symbol, s.side) for s in wave.signals] == [("ALLUSDT", "short")]


async def test_a_lost_listener_is_re_established_and_nothing_is_missed(db: Database) -> None:
    store = Store(db.pool)
    consumer = SignalConsumer(
        store, SystemClock(), listen_dsn=db.target.dsn, wave_window_seconds=0, poll_interval_seconds=0.1
    )
    waiting = asyncio.create_task(_next_wave(consumer))
    await wait_until(lambda: consumer.listener_connections == 1, what="the LISTEN connection")
    killed = await db.pool.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() AND query LIKE 'LISTEN%'"
    )
    assert killed == 1
    await wait_until(lambda: consumer.listener_connections == 2, what="LISTEN to be re-established")
    await store.insert_signal("SUIUSDT", "long")
    wave = await waiting
    assert [s.symbol for s in wave.signals] == ["SUIUSDT"]


async def test_polling_carries_on_when_listen_cannot_connect(db: Database, pg_server) -> None:
    store = Store(db.pool)
    consumer = SignalConsumer(
        store,
        SystemClock(),
        listen_dsn=pg_server.dsn("no_such_database"),
        wave_window_seconds=0,
        poll_interval_seconds=0.05,
    )
    waiting = asyncio.create_task(_next_wave(consumer))
    await store.insert_signal("NMRUSDT", "short")
    wave = await waiting
    assert [s.symbol for s in wave.signals] == ["NMRUSDT"]
    assert consumer.listener_connections == 0


async def test_polling_carries_on_when_the_listen_statement_is_never_answered(
    db: Database, pg_server
) -> None:
    """The server accepts the LISTEN connection, then answers nothing on it (frozen, or partitioned from it
    alone): the connect was bounded but the LISTEN statement was not, and the loop waited on it for good."""
    store = Store(db.pool)
    # The LISTEN statement's first message goes unanswered.
    proxy = await SilentFromProxy.in_front_of(pg_server.socket_dir, db.target.dsn, silent_from=b"P")
    consumer = SignalConsumer(
        store,
        SystemClock(),
        listen_dsn=proxy.dsn,
        wave_window_seconds=0,
        poll_interval_seconds=0.05,
    )
    iterator = consumer.waves()
    try:
        await store.insert_signal("KSMUSDT", "long")
        try:
            wave = await asyncio.wait_for(anext(iterator), timeout=LISTEN_SETUP_TIMEOUT_SECONDS + 15)
        except TimeoutError:
            pytest.fail(f"no wave after {LISTEN_SETUP_TIMEOUT_SECONDS + 15:g}s: the LISTEN held the loop")
    finally:
        await iterator.aclose()
        await proxy.close()
    assert [s.symbol for s in wave.signals] == ["KSMUSDT"]
    assert proxy.held >= 1  # its LISTEN was sent, and never answered
    assert not consumer.listening


async def test_signals_arriving_within_the_window_form_one_wave(db: Database) -> None:
    store = Store(db.pool)
    clock = ManualClock()
    consumer = SignalConsumer(
        store, clock, listen_dsn=None, wave_window_seconds=0.5, poll_interval_seconds=0.1
    )
    iterator = consumer.waves()
    waiting = asyncio.create_task(anext(iterator))
    try:
        await store.insert_signals([("AUSDT", "long", None, None), ("BUSDT", "short", None, None)])

        async def first_two_taken_and_window_open() -> bool:
            taken = await db.pool.fetchval("SELECT count(*) FROM monitoring.signals WHERE status = 'taken'")
            return taken == 2 and clock.sleepers == 1

        # Polls until it finds them (a claim may still be in flight when time first moves), then the
        # wave window opens: at most one step of it has passed when the third signal arrives.
        await drive_until(clock, first_two_taken_and_window_open, step=0.05, what="the wave window to open")
        await store.insert_signals([("CUSDT", "long", None, None)])
        await clock.advance(0.5)
        wave = await asyncio.wait_for(waiting, timeout=10)
        assert [s.symbol for s in wave.signals] == ["AUSDT", "BUSDT", "CUSDT"]
    finally:
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await waiting
        await iterator.aclose()


def test_sim_generator_is_seeded_and_picks_distinct_symbols() -> None:
    symbols = [f"S{i}USDT" for i in range(40)]

    def waves(seed: int) -> list[list[tuple[str, str]]]:
        generator = SimSignalGenerator(
            None, ManualClock(), symbols, wave_size=7, wave_interval_seconds=20, seed=seed
        )  # type: ignore[arg-type]
        return [generator.next_wave() for _ in range(5)]

    assert waves(7) == waves(7)
    assert waves(7) != waves(8)
    for wave in waves(7):
        assert len(wave) == 7
        assert len({symbol for symbol, _ in wave}) == 7
        assert {side for _, side in wave} <= {"long", "short"}


async def test_sim_generator_inserts_a_wave_at_once_then_one_per_interval(db: Database) -> None:
    clock = ManualClock()
    generator = SimSignalGenerator(
        Store(db.pool), clock, ["AUSDT", "BUSDT", "CUSDT"], wave_size=2, wave_interval_seconds=20, seed=1
    )
    task = asyncio.create_task(generator.run())
    try:
        await wait_until(lambda: generator.waves_generated == 1 and clock.sleepers == 1, what="first wave")
        assert await db.pool.fetchval("SELECT count(*) FROM monitoring.signals") == 2
        await clock.advance(20)
        await wait_until(lambda: generator.waves_generated == 2, what="second wave")
        assert await db.pool.fetchval("SELECT count(*) FROM monitoring.signals") == 4
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_signal_whose_position_write_was_given_up_but_landed_is_taken_again_and_the_record_failed(
    db: Database,
) -> None:
    """A wave gave up a signal's position write in a database outage, and the server committed it at the
    thaw: a `pending_entry` record, never sent (an entry goes only once its record is `entry_placed`).
    Taking failed signals again skipped every signal with a position, so the signal stayed `taken` and the
    record held its symbol for the rest of the run ("symbol already has an open position" for later
    signals) while the venue held nothing (a reviewer, every process of the server stopped 8 s). The
    record fails, `entry never sent`, and the signal is taken again."""
    store = Store(db.pool)
    consumer = SignalConsumer(
        store,
        SystemClock(),
        listen_dsn=None,
        wave_window_seconds=0,
        poll_interval_seconds=0.05,
        claimed_by="me",
    )
    (signal_id,) = await store.insert_signals([("ORDIUSDT", "long", None, None)])
    first = await _next_wave(consumer)
    assert [s.id for s in first.signals] == [signal_id]
    landed = await store.create_position(
        symbol="ORDIUSDT", exchange="sim", side="long", quantity=Decimal(1), signal_id=signal_id
    )
    consumer.wave_failed()  # the wave's write raised: the database stopped answering

    again = await _next_wave(consumer)
    assert [s.id for s in again.signals] == [signal_id]
    row = await db.pool.fetchrow(
        "SELECT status, exit_reason FROM monitoring.positions WHERE id = $1", landed.id
    )
    assert (row["status"], row["exit_reason"]) == ("failed", "entry never sent")
    # The symbol is free again: the signal's next attempt gets a record of its own.
    retry = await store.create_position(
        symbol="ORDIUSDT", exchange="sim", side="long", quantity=Decimal(1), signal_id=signal_id
    )
    assert retry.id != landed.id

"""Account events that arrive while the protection manager restarts (the chaos soak restarts it every few
minutes under waves). They went to the new manager before it had restored its guards ("of no position we
guard") and were lost: a stop that filled meanwhile was learned again only by polling, the position stayed
active in the database and its sibling stop live on the venue for two reconcile passes (20-22 s in the
soak, three positions counted lost). They now wait until the new manager guards its positions."""

from __future__ import annotations

import asyncio
import time

from engine.clock import ManualClock
from engine.venues.sim import SimVenue
from engine.venues.sim.settings import CallKind, FaultKind
from storage.database import Database
from tests.integration.engine_support import engine_settings, make_engine, until_closed_in_db
from tests.integration.test_failure_modes_f1_f5 import SYMBOLS, drive_until_covered, open_positions
from tests.support.driving import drive, drive_until


async def test_a_stop_filling_while_protection_restarts_closes_its_position_without_waiting_for_polling(
    db: Database,
) -> None:
    settings = engine_settings(
        db.target.dsn,
        {"SIGNALS__MAX_POSITIONS": "100", "VENUE__SIM__LATENCY__BY_CALL__FETCH_POSITIONS__SECONDS": "2.0"},
    )
    # Virtual time from the wall clock's now: a restored position's fill time comes from the database's
    # clock, and the venue's events are ordered against it.
    clock = ManualClock(start=time.time())
    # The restart's read of the venue's positions takes 2 s: the stop fires while it is under way.
    venue = SimVenue(settings.venue.sim, clock=clock)
    engine = make_engine(settings, clock, venue)
    await drive(clock, engine.start())
    try:
        [guard] = await open_positions(engine, clock, [SYMBOLS[20]])
        await drive_until_covered(engine, clock, 1)
        old_manager = engine.manager
        restart = asyncio.ensure_future(engine.restart_protection())
        # The new manager exists (events go to it) but has not restored its guards yet: it is reading the
        # venue. In the soak that read met a 10 s timeout, and five fills found "no position we guard".
        await drive_until(
            clock, lambda: engine.manager is not old_manager, what="the new manager created", step=0.01
        )
        assert not engine.manager.guards
        # That read fails, and so do the next position reads (the reconcile passes asked for at once):
        # only the account stream can tell the position is flat.
        venue.inject_fault(CallKind.FETCH_POSITIONS, FaultKind.SERVER_ERROR, count=4)
        assert guard.stop_loss.price is not None
        venue.override_mark_price(guard.symbol, guard.stop_loss.price - 3 * guard.market.tick_size)
        await drive_until(clock, restart.done, what="the protection restart")
        restarted_at = clock.monotonic()
        await until_closed_in_db(db, clock, guard.position_id)
        # Within a couple of round trips of the restart, not two reconcile passes (10 s each) later.
        assert clock.monotonic() - restarted_at < 3.0
        row = await db.pool.fetchrow("SELECT * FROM monitoring.positions WHERE id = $1", guard.position_id)
        assert row["exit_reason"] == "stop_loss"
        assert venue.core.positions(clock.now()) == []
        await drive_until(
            clock,
            lambda: not venue.core.open_protective_orders(clock.now(), guard.symbol),
            what="the sibling stop cancelled",
            limit=3.0,
        )
    finally:
        await drive(clock, engine.stop())


async def test_a_stop_filling_while_a_slow_first_pass_holds_the_restart_is_learned_at_once(
    db: Database,
) -> None:
    """The restart hands over as soon as its guards exist: the chaos soak saw a restart take 37 s through
    a ban, most of it waiting for every guard's first pass, while a stop's fill sat in the account stream
    and its position counted as lost. One position's first pass here takes 6 s (its trailing stop is gone
    and every order call takes 6 s); another's stop fills meanwhile and is recorded at once."""
    settings = engine_settings(
        db.target.dsn,
        {
            "SIGNALS__MAX_POSITIONS": "100",
            "VENUE__SIM__LATENCY__BY_CALL__CREATE_ORDER__SECONDS": "6.0",
            "VENUE__SIM__LATENCY__BY_CALL__FETCH_POSITIONS__SECONDS": "1.0",
        },
    )
    clock = ManualClock(start=time.time())
    venue = SimVenue(settings.venue.sim, clock=clock)
    engine = make_engine(settings, clock, venue)
    await drive(clock, engine.start())
    try:
        fills, slow = await open_positions(engine, clock, [SYMBOLS[21], SYMBOLS[22]])
        await drive_until_covered(engine, clock, 2)
        old_manager = engine.manager
        restart = asyncio.ensure_future(engine.restart_protection())
        await drive_until(
            clock, lambda: engine.manager is not old_manager, what="the new manager created", step=0.01
        )
        # While the new manager reads the venue (1 s), a trailing stop is cancelled there (by hand).
        assert slow.trailing_stop.client_order_id is not None
        venue.core.cancel_order(slow.symbol, slow.trailing_stop.client_order_id, clock.now())
        await drive_until(
            clock,
            lambda: len(engine.manager.guards) == 2,
            what="the new guards created",
            step=0.01,
        )
        assert fills.stop_loss.price is not None
        venue.override_mark_price(fills.symbol, fills.stop_loss.price - 3 * fills.market.tick_size)
        fired_at = clock.monotonic()
        await until_closed_in_db(db, clock, fills.position_id)
        closed_after = clock.monotonic() - fired_at
        assert not restart.done()  # the slow first pass still holds the restart's report
        assert closed_after < 2.0, closed_after
        report = await drive(clock, restart)
        # The report counts what its first passes left: one re-protected, the other closed by its stop.
        assert (report.reprotected, report.failed) == (1, 0)
        row = await db.pool.fetchrow("SELECT * FROM monitoring.positions WHERE id = $1", fills.position_id)
        assert row["exit_reason"] == "stop_loss"
    finally:
        await drive(clock, engine.stop())


async def test_a_stop_filling_while_a_restarts_venue_snapshot_is_late_is_learned_without_waiting_for_it(
    db: Database,
) -> None:
    """The chaos soak saw a protection restart's venue snapshot wait through a ban and a lost answer (30 s)
    while two stops filled: their fills waited in the account stream for guards that did not exist yet, and
    both positions counted as lost. The restart now waits a few late answers for the snapshot, then starts
    its guards without it (each verifies its own orders): a fill meanwhile is recorded at once."""
    settings = engine_settings(
        db.target.dsn,
        {
            "SIGNALS__MAX_POSITIONS": "100",
            # Every read of all positions takes 8 s: the restart's snapshot is late, the start's too.
            "VENUE__SIM__LATENCY__BY_CALL__FETCH_POSITIONS__SECONDS": "8.0",
        },
    )
    clock = ManualClock(start=time.time())
    venue = SimVenue(settings.venue.sim, clock=clock)
    engine = make_engine(settings, clock, venue)
    await drive(clock, engine.start())
    try:
        [fills, other] = await open_positions(engine, clock, [SYMBOLS[23], SYMBOLS[24]])
        await drive_until_covered(engine, clock, 2)
        restart = asyncio.ensure_future(engine.restart_protection())
        await drive_until(clock, lambda: engine._carried is not None, what="the restart begun", step=0.01)
        assert fills.stop_loss.price is not None
        venue.override_mark_price(fills.symbol, fills.stop_loss.price - 3 * fills.market.tick_size)
        fired_at = clock.monotonic()
        await until_closed_in_db(db, clock, fills.position_id)
        assert clock.monotonic() - fired_at < 4.0, clock.monotonic() - fired_at
        report = await drive(clock, restart)
        assert report.failed == 0
        assert engine.manager is not None
        assert engine.manager.by_symbol[other.symbol].covered
        live = {o.client_order_id for o in venue.core.open_protective_orders(clock.now(), other.symbol)}
        assert live == {
            other.stop_loss.client_order_id,
            other.trailing_stop.client_order_id,
        }  # kept, not re-sent
    finally:
        await drive(clock, engine.stop())


async def test_a_signal_during_a_protection_restart_counts_the_positions_it_restores(db: Database) -> None:
    """While the protection manager restarts, the new one has no guards until it has read the venue: the
    signal checks counted 0 open positions then, and let a wave past `max_positions`."""
    settings = engine_settings(
        db.target.dsn,
        {"SIGNALS__MAX_POSITIONS": "2", "VENUE__SIM__LATENCY__BY_CALL__FETCH_POSITIONS__SECONDS": "2.0"},
    )
    clock = ManualClock(start=time.time())
    venue = SimVenue(settings.venue.sim, clock=clock)
    engine = make_engine(settings, clock, venue)
    await drive(clock, engine.start())
    try:
        await open_positions(engine, clock, [SYMBOLS[23], SYMBOLS[24]])
        await drive_until_covered(engine, clock, 2)
        old_manager = engine.manager
        restart = asyncio.ensure_future(engine.restart_protection())
        await drive_until(
            clock, lambda: engine.manager is not old_manager, what="the new manager created", step=0.01
        )
        assert engine.store is not None
        [signal_id] = await engine.store.insert_signals([(SYMBOLS[25], "long", None, None)])
        await drive_until(
            clock,
            lambda: db.pool.fetchval(
                "SELECT status IN ('opened', 'rejected', 'expired') FROM monitoring.signals WHERE id = $1",
                signal_id,
            ),
            what="the signal handled",
        )
        row = await db.pool.fetchrow("SELECT status, reason FROM monitoring.signals WHERE id = $1", signal_id)
        assert (row["status"], row["reason"]) == ("rejected", "max_positions (2) reached")
        await drive(clock, restart)
        assert len(venue.core.positions(clock.now())) == 2
    finally:
        await drive(clock, engine.stop())

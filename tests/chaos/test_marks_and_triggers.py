"""Fault schedules where the market moves: marks crossing live stops (hard and trailing stops fire, the
positions close, the symbols re-open in later waves), marks already through a stop before it is placed
(the venue refuses it as "would trigger immediately": the engine closes at market), fired stops that sit
TRIGGERING before their fill, and fired stops that never fill. Virtual time, the auditor at every step."""

from __future__ import annotations

import pytest

from engine.engine import STARTUP_UNKNOWN_SECONDS
from engine.exchange.port import OrderSide, PositionUpdate
from engine.venues.sim.settings import CallKind, FaultKind
from protection.coverage import coverage_figures
from protection.manager import PositionGuard, ProtectionManager
from protection.reconciler import Reconciler
from protection.stream_events import route_account_event
from storage.database import Database
from tests.chaos.support import ChaosRun, chaos_settings
from tests.support.auditor import AuditLimits

SLOW_ORDERS = {"VENUE__SIM__LATENCY__BY_CALL__CREATE_ORDER__SECONDS": "1.0"}


async def fire_hard_stop(run: ChaosRun, symbol: str) -> None:
    run.move_mark(symbol, run.against(symbol, "5"))  # 3 % stop: crossed


async def fire_trailing_stop(run: ChaosRun, symbol: str) -> None:
    """1.5 % in the position's favour (activation), then 1 % back from there (callback 0.5 %)."""
    favour = run.against(symbol, "-2")
    run.move_mark(symbol, favour)
    await run.step()
    back = run.against(symbol, "-0.98")  # 2 % up, then about 1 % down from the peak
    run.move_mark(symbol, back)


async def marks_schedule(run: ChaosRun, *, waves: int = 5) -> None:
    """Each wave: one held position's hard stop is crossed, another's trailing stop fires, and one of the
    new wave's positions has its mark pushed through its stop level between its fill and its stops'
    arrival (breach → closed at market). The next wave signals the closed symbols again: re-opened once
    the engine has seen them closed (a signal for a symbol it still guards is rejected)."""
    reopen: list[str] = []
    for _ in range(waves):
        symbols = reopen + run.free_symbols(5 - len(reopen))
        reopen = []
        await run.wave(len(symbols), symbols)
        filled = await run.opened(symbols)
        run.move_mark(filled[0], run.against(filled[0], "4"))  # its stops are on their way: breach
        await run.run_for(3.0)
        covered = [
            g.symbol for g in run.engine.manager.guards.values() if g.covered and g.symbol in run.held()
        ]
        for symbol in covered[:1]:
            await fire_hard_stop(run, symbol)
            reopen.append(symbol)
        for symbol in covered[1:2]:
            await fire_trailing_stop(run, symbol)
            reopen.append(symbol)
        await run.run_for(9.0)


async def test_marks_crossing_stops_close_positions_and_symbols_reopen(db: Database) -> None:
    settings = chaos_settings(db, SLOW_ORDERS)
    run = ChaosRun(db, settings)
    await run.start()
    try:
        await marks_schedule(run)
        await run.settle()
        run.verdict(coverage_at_least=85.0)
        closed = await db.pool.fetch(
            "SELECT exit_reason, count(*) AS n FROM monitoring.positions WHERE status = 'closed' GROUP BY 1"
        )
        reasons = {r["exit_reason"]: r["n"] for r in closed}
        assert reasons.get("stop_breached", 0) >= 3, reasons
        assert reasons.get("stop_loss", 0) >= 3, reasons
        assert reasons.get("trailing_stop", 0) >= 3, reasons
    finally:
        await run.stop()


async def test_fired_stops_that_sit_triggering_before_their_fill(db: Database) -> None:
    """Binance's NEW → TRIGGERING → FINISHED: every fired stop sits 2 s TRIGGERING (protecting nothing)
    before its fill closes the position."""
    settings = chaos_settings(db, SLOW_ORDERS)
    run = ChaosRun(db, settings)
    run.venue.set_trigger_delay(2.0)
    await run.start()
    try:
        await marks_schedule(run)
        await run.settle()
        run.verdict(coverage_at_least=85.0)
    finally:
        await run.stop()


async def past_the_start_up_window(run: ChaosRun) -> None:
    """In its first 30 s after connecting, the engine takes an empty position list for "unknown" (F3)
    and closes only positions whose own stop it saw filled: these schedules run after that window."""
    await run.until(lambda: run.clock.monotonic() > STARTUP_UNKNOWN_SECONDS + 1, limit=60, what="30 s up")


async def after_a_reconcile(run: ChaosRun) -> None:
    """Drive until the reconciler has just finished a pass: the next one is a full interval away."""
    reconciler = run.engine.reconciler
    assert reconciler is not None
    runs = reconciler.runs
    await run.until(lambda: reconciler.runs > runs, limit=15, what="a reconcile pass")
    await run.run_for(0.5)


async def test_a_filled_stops_sibling_is_cancelled_within_grace(db: Database) -> None:
    run = ChaosRun(db, chaos_settings(db))
    await run.start()
    try:
        await past_the_start_up_window(run)
        symbols = [await run.one_protected_position()]
        await after_a_reconcile(run)
        await fire_hard_stop(run, symbols[0])
        await run.settle()
        run.verdict(coverage_at_least=0.0)
    finally:
        await run.stop()


async def test_a_stuck_trigger_is_closed_within_grace(db: Database) -> None:
    run = ChaosRun(db, chaos_settings(db))
    await run.start()
    try:
        await past_the_start_up_window(run)
        symbols = [await run.one_protected_position()]
        run.venue.set_trigger_delay(None, stuck=True)
        await after_a_reconcile(run)
        await fire_hard_stop(run, symbols[0])
        await run.until(lambda: not run.held(), limit=60, what="closed at market")
        await run.settle()
        run.verdict(coverage_at_least=0.0)
    finally:
        await run.stop()


async def test_a_stop_that_fills_while_its_close_waits_out_a_429_ends_the_position_at_once(
    db: Database,
) -> None:
    """A hard stop fires and sits TRIGGERING 2.5 s. Past its 1 s patience the engine closes the position at
    market, into an order window another client on the account has just filled: HTTP 429, and the next
    close waits for the window's end, ~8 s away. The stop fills meanwhile: the position is over, and its
    trailing stop is ours on a flat symbol. It must be cancelled within grace, not once the close's wait
    ends (a chaos soak saw it live for 6 s on a flat symbol: the account stream's fill waited behind a
    close waiting out a hold, in the guard's own task)."""
    run = ChaosRun(db, chaos_settings(db))
    await run.start()
    try:
        await past_the_start_up_window(run)
        symbol = await run.one_protected_position()
        run.venue.set_trigger_delay(2.5, symbol=symbol)
        await run.a_window_starts()
        spare = next(s for s in run.free_symbols(2) if s != symbol)
        assert run.neighbour_fills_order_window(spare) > 0
        await fire_hard_stop(run, symbol)
        await run.until(lambda: symbol not in run.held(), limit=5, what="the stop filled")
        assert run.banned_for() is None
        await run.settle()
        run.verdict(coverage_at_least=0.0)
    finally:
        await run.stop()


async def test_a_new_position_never_shares_its_symbol_with_an_old_stop(db: Database) -> None:
    settings = chaos_settings(db)
    run = ChaosRun(db, settings)
    await run.start()
    try:
        await past_the_start_up_window(run)
        symbol = await run.one_protected_position(sides=["long"])
        await after_a_reconcile(run)
        # the close cancels what is left: the filled hard stop first, then the trailing stop (both fail)
        run.venue.inject_fault(CallKind.CANCEL_ORDER, FaultKind.NETWORK_ERROR_BEFORE_SEND, 2)
        await fire_hard_stop(run, symbol)  # flat on the venue; the trailing stop is left behind

        async def closed_in_the_database() -> bool:
            return (
                await db.pool.fetchval(
                    "SELECT count(*) FROM monitoring.positions WHERE symbol = $1 AND status = 'closed'",
                    symbol,
                )
                == 1
            )

        await run.until(closed_in_the_database, limit=20, what="the engine saw the position closed")
        await run.opened(await run.wave(1, [symbol], sides=["long"]))  # the operator's next signal
        await run.settle()
        run.verdict(coverage_at_least=0.0)
    finally:
        await run.stop()


async def test_a_stop_that_just_fired_is_uncovered_since_it_fired_not_since_the_fill(db: Database) -> None:
    """A position held 30 s has its hard stop fire (2 s TRIGGERING, as Binance's algo orders may sit).
    It is uncovered from that moment, and for that long: the coverage figures used to time it from the
    fill until the guard's pass wrote its facts, so a health check or breaker evaluation in between saw
    "uncovered for 30 s" and paused entries (a false alarm seen in a loaded run of the schedule above)."""
    settings = chaos_settings(db)
    run = ChaosRun(db, settings)
    run.venue.set_trigger_delay(2.0)
    await run.start()
    try:
        symbol = await run.one_protected_position()
        await run.run_for(30.0)
        manager = run.engine.manager
        assert manager is not None
        guard = manager.by_symbol[symbol]
        moved_at = run.clock.monotonic()
        await fire_hard_stop(run, symbol)
        await run.until(lambda: not guard.covered, limit=2.0, what="the hard stop fired")
        seen_at = run.clock.monotonic()
        figures = coverage_figures(
            [guard.coverage()], seen_at + 6.0, float(settings.protection.grace_seconds)
        )
        # Seen 6 s after the guard heard it fired: uncovered since it fired (between the mark's move and the
        # guard's hearing, a step or two of virtual time apart on a loaded machine: 6.15 s once), not for the
        # 36 s since the fill (to within float rounding: the moment it fired comes from the stream event's
        # epoch time, mapped onto the clock's monotonic seconds; one run read 6.000000000000007)
        assert figures.oldest_unprotected_seconds is not None
        assert 6.0 - 1e-6 <= figures.oldest_unprotected_seconds <= seen_at + 6.0 - moved_at + 1e-6
    finally:
        await run.stop()


def _resizing_run(db: Database) -> ChaosRun:
    """A run whose audit allows the overlap of a resize: it places the new stops before it cancels the old
    ones (make-before-break), both live for about a round trip, by design."""
    settings = chaos_settings(db)
    return ChaosRun(db, settings, limits=AuditLimits.from_settings(settings, duplicate_overlap_seconds=1.0))


async def _one_guarded(
    run: ChaosRun, *, sides: list[str] | None = None
) -> tuple[str, Reconciler, ProtectionManager, PositionGuard]:
    """One protected position, with the reconciler and the manager that guard it, and its guard."""
    symbol = await run.one_protected_position(sides=sides)
    reconciler, manager = run.engine.reconciler, run.engine.manager
    assert reconciler is not None
    assert manager is not None
    return symbol, reconciler, manager, manager.by_symbol[symbol]


async def test_a_snapshot_taken_before_a_stop_filled_adopts_no_phantom(db: Database) -> None:
    """A reconcile pass reads the venue, then a hard stop fills and its guard closes the position before
    the pass compares: the snapshot still lists the position, which no guard tracks any more. It must
    not be adopted as an unknown position of the venue's (the soak saw phantoms made this way: 'active'
    for a minute while the venue was flat, their stops refused -2022 over and over); a fresh read of that
    symbol decides."""
    settings = chaos_settings(db)
    run = ChaosRun(db, settings)
    await run.start()
    try:
        symbol, reconciler, manager, _guard = await _one_guarded(run)
        stale = await run.drive(reconciler.take_snapshot())
        assert symbol in {p.symbol for p in stale.positions}
        await fire_hard_stop(run, symbol)
        await run.until(
            lambda: symbol not in manager.by_symbol and symbol not in run.held(), limit=10.0, what="closed"
        )
        await run.until(lambda: not manager.guards, limit=10.0, what="its guard gone")
        report = await run.drive(reconciler.reconcile_once(stale))
        assert report.adopted == []
        open_rows = await db.pool.fetchval(
            "SELECT count(*) FROM monitoring.positions WHERE symbol = $1 AND status <> 'closed'", symbol
        )
        assert open_rows == 0
        await run.settle()
        run.verdict(coverage_at_least=0.0)
    finally:
        await run.stop()


async def test_a_stop_that_filled_after_the_passs_read_is_not_recorded_cancelled(db: Database) -> None:
    """A reconcile pass read the venue's open orders; the hard stop filled and its guard closed the position
    before the pass compared. The pass took the filled stop (and its sibling, cancelled by the guard) for
    orphans: whatever its cancel answered, it overwrote the stop's `filled` record with `cancelled` and
    raised a WARNING "cancelled our orphan" for an order that had closed the position. Now the cancel's
    answer is what is recorded, and only an order the cancel ended is said to be cancelled by it."""
    settings = chaos_settings(db)
    run = ChaosRun(db, settings)
    await run.start()
    try:
        symbol, reconciler, manager, guard = await _one_guarded(run)
        hard_stop = guard.stop_loss.client_order_id
        stale = await run.drive(reconciler.take_snapshot())
        assert hard_stop in {o.client_order_id for o in stale.open_orders}
        await fire_hard_stop(run, symbol)
        await run.until(lambda: not manager.guards, limit=10.0, what="closed, its guard gone")
        report = await run.drive(reconciler.reconcile_once(stale))
        status = await db.pool.fetchval(
            "SELECT status FROM monitoring.orders WHERE client_order_id = $1", hard_stop
        )
        assert status == "filled"
        assert hard_stop not in report.orphans_cancelled
        said = await db.pool.fetch(
            "SELECT message FROM monitoring.events WHERE type = 'orphan_cancelled' AND symbol = $1", symbol
        )
        assert [r["message"] for r in said if hard_stop in r["message"]] == []
        await run.settle()
        run.verdict(coverage_at_least=0.0)
    finally:
        await run.stop()


async def test_a_pass_read_before_the_position_grew_does_not_shrink_its_stops(db: Database) -> None:
    """A reconcile pass read the venue's positions; the operator then added to the position by hand, and
    the account stream's size had the stops resized to it. The pass, comparing afterwards, resized them
    back to the size it had read: the venue held the bigger position with reduce-only stops for the
    smaller one until the next pass (a stop-out in between would have left the difference naked). A
    size read before the one applied is now ignored."""
    run = _resizing_run(db)
    await run.start()
    try:
        symbol, reconciler, _manager, guard = await _one_guarded(run, sides=["long"])
        stale = await run.drive(reconciler.take_snapshot())
        before = run.held()[symbol].quantity
        run.venue.core.place_market_order(symbol, OrderSide.BUY, before, "by-hand-1", run.clock.now())
        await run.until(lambda: guard.quantity == 2 * before and guard.covered, limit=10, what="resized up")
        await run.drive(reconciler.reconcile_once(stale))
        await run.run_for(2.0)  # whatever the pass asked for has been sent
        live = run.venue.core.open_protective_orders(run.clock.now(), symbol)
        assert sorted(o.quantity for o in live) == [2 * before, 2 * before]
        assert guard.quantity == 2 * before
        await run.settle()
        run.verdict(coverage_at_least=0.0)
    finally:
        await run.stop()


async def test_a_size_the_stream_delivers_late_does_not_outrank_a_newer_read(db: Database) -> None:
    """The operator added to the position and the stream lost that message; a reconcile pass then read the
    bigger size. Before its comparison, the stream delivered late a size told before the addition: taken
    as of its arrival, it outranked the pass's read and the stops kept covering the smaller size until
    the next pass. A size the stream tells is now dated by the venue's event time."""
    run = _resizing_run(db)
    await run.start()
    try:
        symbol, reconciler, manager, guard = await _one_guarded(run, sides=["long"])
        await run.run_for(5.0)
        before = run.held()[symbol].quantity
        told_before_the_addition = run.clock.now()
        run.venue.drop_account_stream(3600)  # the addition's message is lost
        await run.run_for(1.0)
        run.venue.core.place_market_order(symbol, OrderSide.BUY, before, "by-hand-1", run.clock.now())
        fresh = await run.drive(reconciler.take_snapshot())
        late = PositionUpdate(
            symbol=symbol,
            side=guard.side,
            quantity=before,
            entry_price=run.held()[symbol].entry_price,
            event_time=told_before_the_addition,
        )
        route_account_event(manager, late)
        await run.run_for(0.2)
        await run.drive(reconciler.reconcile_once(fresh))
        await run.run_for(2.0)
        live = run.venue.core.open_protective_orders(run.clock.now(), symbol)
        assert sorted(o.quantity for o in live) == [2 * before, 2 * before]
        await run.settle()
        run.verdict(coverage_at_least=0.0)
    finally:
        await run.stop()


@pytest.mark.parametrize("restart", [False, True], ids=["same-process", "across-a-restart"])
async def test_a_new_position_waits_until_the_old_positions_fired_stop_has_finished(
    db: Database, restart: bool
) -> None:
    """A fired stop sat TRIGGERING (4 s here); after the patience the engine closed the position at
    market, and the symbol was free at once: the cancel of the fired stop answered it as it was (still
    triggering), which counted as gone. The next signal on the symbol opened a new position of the same
    side, and the old stop's fill, reduce-only, then closed most of it (a chaos soak: 1354 short left at
    27.8, the engine resizing its stops and two live stops of each kind for 10 s). A fired stop is gone
    only once the venue says it ended: until then the symbol takes no new position.

    Across a restart (the stop TRIGGERING 40 s): the engine kept the fired stop it waited for in memory
    only, and the venue's open orders leave such a stop out, so a new process's orphan pass never saw it
    and took the next signal at once. The next start reads the stops its records say may still be live on
    closed positions, and the symbol waits for the venue to end them."""
    settings = chaos_settings(db)
    run = ChaosRun(db, settings)
    await run.start()
    try:
        await past_the_start_up_window(run)
        symbol = await run.one_protected_position(sides=["long"])
        delay = 40.0 if restart else 4.0
        run.venue.set_trigger_delay(delay, symbol=symbol)
        await fire_hard_stop(run, symbol)
        await run.until(lambda: symbol not in run.held(), limit=10, what="closed at market")
        run.venue.set_trigger_delay(None, symbol=symbol)
        if restart:
            await run.restart_engine()
            assert run.venue.core.inspect(run.clock.now()).triggering, "the old stop is still TRIGGERING"
        # The next signal on the symbol, at once, the same side: it waits for the fired stop's end.
        await run.wave(1, symbols=[symbol], sides=["long"])
        await run.run_for(delay + 5.0)
        await run.wave(1, symbols=[symbol], sides=["long"])  # in case the first was turned away meanwhile
        await run.until(lambda: symbol in run.held() and run.converged(), limit=20, what="re-opened")
        await run.settle()
        run.verdict(coverage_at_least=0.0)  # no quantity or duplicate rule broken on the way
        rows = await db.pool.fetch(
            "SELECT quantity, exit_reason FROM monitoring.positions WHERE symbol = $1 ORDER BY id", symbol
        )
        assert [r["exit_reason"] for r in rows][:1] == ["stop_not_filled"]
        held = run.held()[symbol].quantity
        assert held == rows[-1]["quantity"], "the old stop's fill reduced the new position"
    finally:
        await run.stop()

"""Fault schedules where the venue's answers mislead: position lists that come back empty although the
account holds positions (at start-up and long after it), and stops that read back as "does not exist" for
seconds after they were placed (read-after-write lag) while a tenth of the order answers are lost.
Virtual time, the auditor at every step."""

from __future__ import annotations

import pytest

from engine.engine import STARTUP_UNKNOWN_SECONDS
from engine.exchange.port import OrderSide, OrderType
from engine.venues.sim.settings import CallKind, FaultKind
from storage.database import Database
from tests.chaos.support import (
    NAKED_BACKOFF,
    ChaosRun,
    chaos_settings,
    tolerating,
)
from tests.support.auditor import AuditLimits


async def test_single_empty_position_answers_change_nothing(db: Database) -> None:
    """Every 22 s the venue answers one position read with `[]` (past the start-up window too): one answer
    proves nothing, so nothing is closed, cancelled or adopted because of it."""
    run = ChaosRun(db, chaos_settings(db))
    await run.start()
    try:
        for _ in range(3):
            await run.wave(5)
            await run.run_for(4)
            run.venue.answer_positions_empty(1)
            await run.run_for(18)
        await run.settle()
        run.verdict(coverage_at_least=99.0)
        closed = await db.pool.fetchval("SELECT count(*) FROM monitoring.positions WHERE status = 'closed'")
        assert closed == 0
    finally:
        await run.stop()


async def test_two_empty_position_answers_in_a_row_close_nothing(db: Database) -> None:
    run = ChaosRun(db, chaos_settings(db))
    await run.start()
    try:
        await run.opened(await run.wave(4))
        await run.until(lambda: run.clock.monotonic() > STARTUP_UNKNOWN_SECONDS + 1, limit=60, what="30 s up")
        run.venue.answer_positions_empty(2)
        await run.run_for(30)
        await run.settle()
        run.verdict(coverage_at_least=0.0)
    finally:
        await run.stop()


async def test_read_after_write_lag_while_order_answers_are_lost(db: Database) -> None:
    """Stops read back as unknown for 3 s after placement (Binance's algo service) while 10 % of the
    order answers are lost: an ambiguous placement is resolved by id, and a "not found" inside the lag
    window proves nothing, so no stop is ever sent twice."""
    settings = chaos_settings(
        db,
        {
            "VENUE__SIM__FAULTS__BY_CALL__CREATE_ORDER__TIMEOUT_AFTER_ACCEPT": "0.1",
            "VENUE__SIM__FAULTS__BY_CALL__CANCEL_ORDER__TIMEOUT_AFTER_ACCEPT": "0.1",
        },
    )
    run = ChaosRun(db, settings, limits=tolerating(settings, NAKED_BACKOFF))
    run.venue.set_read_lag(3.0)
    await run.start()
    try:
        for _ in range(6):
            await run.wave(5)
            await run.run_for(4)
            manager = run.engine.manager
            assert manager is not None
            if manager.guards:
                run.background(run.engine.close_position(min(manager.guards)))
            await run.run_for(4)
        await run.finish_background()
        run.venue.clear_injected_faults()
        await run.settle()
        run.verdict(coverage_at_least=97.0)
    finally:
        await run.stop()


async def test_positions_missing_from_a_glitched_list_are_looked_into_together(db: Database) -> None:
    """The venue's list of positions comes back empty (a glitch) while ten positions are held. Each one
    is looked into (its stops by id, its symbol alone) before anything is believed gone; those look-ups
    are independent, so they go together: with reads taking 1 s, one pass takes a few round trips, not
    three reads per position one after another (30 s here; a protection restart waited on it with no
    guard running)."""
    slow_reads = {
        "VENUE__SIM__LATENCY__BY_CALL__FETCH_ORDER__SECONDS": "1.0",
        "VENUE__SIM__LATENCY__BY_CALL__FETCH_POSITIONS__SECONDS": "1.0",
    }
    settings = chaos_settings(db, slow_reads)
    run = ChaosRun(db, settings)
    await run.start()
    try:
        symbols = await run.wave(10)
        await run.opened(symbols)
        await run.until(run.converged, limit=60, what="the wave protected")
        await run.run_for(STARTUP_UNKNOWN_SECONDS + 1.0)  # an empty list right after connecting is skipped
        run.venue.answer_positions_empty(1)
        started = run.clock.monotonic()
        report = await run.drive(run.engine.reconcile_now(), limit=60.0)
        took = run.clock.monotonic() - started
        assert report.closed == []  # nothing believed gone on a glitch
        assert took < 10.0, f"one pass took {took:.1f} virtual s"
        await run.settle()
        run.verdict(coverage_at_least=0.0)
    finally:
        await run.stop()


async def test_stops_resized_within_the_read_lag_do_not_stay_live_beside_their_replacements(
    db: Database,
) -> None:
    """Another client halves a position right after its stops were sent, inside the venue's read-after-
    write lag. The engine places stops for the new size, then cancels the old ones: "unknown order" then
    proves nothing, but the resize listed the old stops without their send times, so the answer counted
    as gone, and both generations stayed live until the reconciler's next pass (a chaos soak: two live
    stops of each kind for 10 s). They are now cancelled again once the venue can see them."""
    settings = chaos_settings(db)
    lag = 1.0
    # The new stops go first, the old ones are cancelled once the venue can see them: an overlap of the
    # lag and the guard's next pass (its retry step), by design (a stop for the wrong size beats none
    # meanwhile). Before, the overlap lasted until the reconciler's pass: 8.2 s here.
    overlap = lag + 2.0
    run = ChaosRun(
        db, settings, limits=AuditLimits.from_settings(settings, duplicate_overlap_seconds=overlap)
    )
    run.venue.set_read_lag(lag)
    await run.start()
    try:
        [symbol] = await run.opened(await run.wave(1, sides=["long"]))
        manager = run.engine.manager
        assert manager is not None
        await run.until(lambda: symbol in manager.by_symbol, limit=5, what="guarded")
        guard = manager.by_symbol[symbol]
        await run.until(
            lambda: guard.stop_loss.sent_at is not None and guard.trailing_stop.sent_at is not None,
            limit=5,
            what="both stops sent",
        )
        held = run.held()[symbol].quantity
        half = run.venue.core.markets[symbol].round_quantity(held / 2)
        run.venue.core.place_market_order(
            symbol, OrderSide.SELL, half, "another-client-1", run.clock.now(), reduce_only=True
        )
        await run.until(lambda: guard.quantity == held - half, limit=5, what="the resize")
        await run.settle()
        run.verdict(coverage_at_least=90.0)
    finally:
        await run.stop()


async def _protected_within_grace(run: ChaosRun) -> None:
    """The position gets both stops, and was never without one past grace; no rule broken (no duplicate)."""
    await run.until(run.converged, limit=30, what="the position protected")
    figures = run.auditor.figures()
    assert figures.worst_unprotected_s < float(run.settings.protection.grace_seconds), figures.as_dict()
    await run.settle()
    run.verdict(coverage_at_least=0.0)


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(FaultKind.TIMEOUT_NOT_EXECUTED, id="lost-on-its-way"),
        pytest.param(FaultKind.TIMEOUT_AFTER_ACCEPT, id="placed-answer-lost"),
    ],
)
async def test_a_stop_whose_outcome_is_unknown_inside_the_read_lag_is_sent_again_with_its_id(
    db: Database, fault: FaultKind
) -> None:
    """On a venue whose reads lag its writes by 5 s (Binance's algo service) a stop's answer is lost (the
    client gives up after 3 s). Lost on its way, the stop is not on the venue: it used to be waited for
    through the rest of the lag before it was sent again, and its position was naked past the 5 s grace
    period. It is now sent again at once with the same id: the venue places it, or, when the first send
    did reach it, refuses the duplicate, so there is never a second stop of a kind."""
    settings = chaos_settings(db)
    run = ChaosRun(db, settings)
    run.venue.set_read_lag(5.0)
    await run.start()
    try:
        run.venue.inject_fault(CallKind.CREATE_ORDER, fault, stops_only=True)
        await run.opened(await run.wave(1))
        await _protected_within_grace(run)
    finally:
        await run.stop()


def our_stop_loss_live(run: ChaosRun, symbol: str) -> bool:
    return any(
        o.symbol == symbol and o.type is OrderType.STOP_MARKET
        for o in run.venue.core.inspect(run.clock.now()).open_conditional
    )


async def closed_in_db(run: ChaosRun, symbol: str) -> str | None:
    """The exit reason of `symbol`'s position once the database records it closed."""
    assert run.db is not None
    return await run.db.pool.fetchval(
        "SELECT exit_reason FROM monitoring.positions WHERE symbol = $1 AND status = 'closed'", symbol
    )


async def test_a_stop_that_fired_inside_the_read_lag_is_not_sent_again(db: Database) -> None:
    """A hard stop confirmed a moment ago fires (it sits TRIGGERING 0.6 s) while the venue's reads still
    lag its placement: the fired stop is in doubt until it fills, but nothing about it is sent again. Only
    a send whose answer was unclear may be sent again with its id inside the lag; a fired stop was too,
    costing an order slot per fired stop (and, where the venue frees the id once the stop triggered, a
    second stop on a position that is closing)."""
    run = ChaosRun(db, chaos_settings(db))
    run.venue.set_read_lag(5.0)
    run.venue.set_trigger_delay(0.6)
    await run.start()
    try:
        [symbol] = await run.opened(await run.wave(1, sides=["long"]))
        await run.until(run.converged, limit=10, what="the position protected")
        creates = run.venue.calls_made[CallKind.CREATE_ORDER]
        run.move_mark(symbol, run.against(symbol, "10"))  # through the hard stop, inside its read lag
        await run.until(lambda: closed_in_db(run, symbol), limit=10, what="the position closed")
        assert await closed_in_db(run, symbol) == "stop_loss"
        assert run.venue.calls_made[CallKind.CREATE_ORDER] == creates, "a fired stop was sent again"
        await run.settle()
        run.verdict(coverage_at_least=0.0)
    finally:
        await run.stop()


async def test_a_stop_sent_again_into_a_flat_position_asks_whether_the_position_is_gone(db: Database) -> None:
    """Both stops' answers are lost (the venue placed them); the hard stop fills before the client gives
    up, the account stream's word on it late. Sent again with their ids inside the read lag, they are
    refused for reducing nothing (-2022): that is the venue's word on the position, which is asked about
    and closed. It used to count as a failed protective send (toward the breaker) logged as an error."""
    run = ChaosRun(db, chaos_settings(db))
    run.venue.set_read_lag(5.0)
    await run.start()
    try:
        run.venue.delay_account_events(10.0)
        run.venue.inject_fault(
            CallKind.CREATE_ORDER, FaultKind.TIMEOUT_AFTER_ACCEPT, count=2, stops_only=True
        )
        [symbol] = await run.opened(await run.wave(1, sides=["long"]))
        await run.until(lambda: our_stop_loss_live(run, symbol), limit=5, what="the hard stop placed")
        run.move_mark(symbol, run.against(symbol, "10"))
        assert symbol not in run.held()
        await run.until(lambda: closed_in_db(run, symbol), limit=15, what="the position closed")
        assert run.db is not None
        refused = await run.db.pool.fetchval(
            "SELECT count(*) FROM monitoring.events WHERE type = 'protection_rejected'"
        )
        assert refused == 0
        await run.settle()
        run.verdict(coverage_at_least=0.0)
    finally:
        await run.stop()


async def test_a_hard_stop_sent_again_through_the_mark_closes_the_position_at_once(db: Database) -> None:
    """Both stops' sends are lost on their way (nothing placed) and the mark goes through the hard stop's
    price meanwhile. Sent again with its id inside the read lag, the hard stop would trigger at once
    (-2021): the position is closed at market then. It used to wait out the rest of the lag before the
    stop was sent a third time, refused again, and only then closed (naked through its stop)."""
    run = ChaosRun(db, chaos_settings(db))
    run.venue.set_read_lag(5.0)
    await run.start()
    try:
        run.venue.inject_fault(
            CallKind.CREATE_ORDER, FaultKind.TIMEOUT_NOT_EXECUTED, count=2, stops_only=True
        )
        [symbol] = await run.opened(await run.wave(1, sides=["long"]))
        opened_at = run.clock.monotonic()
        run.move_mark(symbol, run.against(symbol, "10"))
        await run.until(lambda: closed_in_db(run, symbol), limit=15, what="the position closed")
        assert await closed_in_db(run, symbol) == "stop_breached"
        # The client gives up on the sends after 3 s; then a look-up, the send again, the close: round trips.
        assert run.clock.monotonic() - opened_at < 4.5
        await run.settle()
        run.verdict(coverage_at_least=0.0)
    finally:
        await run.stop()


async def test_a_stop_whose_answer_a_protection_restart_cut_off_is_sent_again_at_once_with_its_id(
    db: Database,
) -> None:
    """A stop's request was lost on its way (the client gives up after 3 s) and the operator restarted the
    protection manager meanwhile. The new manager knew only that the stop might be on the venue: it
    waited out the venue's read lag (5 s) before sending it again, and the position was naked past grace
    (the Binance-wire soak: 8.6 s). What the old manager knew is handed over: a send whose answer never
    came, by its hand or the venue's, is sent again at once with its id, as within one manager."""
    settings = chaos_settings(db)
    run = ChaosRun(db, settings)
    run.venue.set_read_lag(5.0)
    await run.start()
    try:
        creates = run.venue.calls_made.get(CallKind.CREATE_ORDER, 0)
        run.venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.TIMEOUT_NOT_EXECUTED, stops_only=True)
        await run.opened(await run.wave(1))
        await run.until(
            lambda: run.venue.calls_made.get(CallKind.CREATE_ORDER, 0) >= creates + 3,
            limit=10,
            what="stops sent",
        )
        await run.drive(run.engine.restart_protection())
        await _protected_within_grace(run)
    finally:
        await run.stop()

"""Failure families F6-F9, F11 and F12 of the production bot (shared/FAILURE_MODES.md), each reproduced
against the real sim venue and a real PostgreSQL, on virtual time. Every test names its family and the
situation; what it asserts is what the product must guarantee there. (F10 belongs to the dashboard.)

Nothing is mocked: situations are made with the venue's own controls (fault injection, latency settings,
`override_mark_price`, a second account on the same sim core) and with orders sent through the port.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping
from decimal import ROUND_DOWN, ROUND_UP, Decimal

import asyncpg
import pytest

from engine.accounts import AccountShared
from engine.clock import ManualClock
from engine.config import Settings
from engine.engine import Engine, EngineState
from engine.events import (
    EngineEvent,
    EventBus,
    EventsDropped,
    HealthChanged,
    PositionClosed,
    ProtectionFailed,
    ProtectionTimedOut,
    SignalRejected,
)
from engine.exchange.port import Order, OrderSide, OrderStatus, OrderType, PositionSide
from engine.venues.sim import SimVenue
from engine.venues.sim.settings import CallKind, FaultKind, LatencyDistribution, LatencySettings
from protection.health import Component, HealthState
from protection.manager import PositionGuard, stop_loss_price
from protection.order_ids import client_order_id
from storage.database import Database
from storage.lease import LeaseHeld
from storage.repositories import OrderPurpose, PositionAlreadyOpen, PositionStatus, SignalStatus, Store
from tests.integration.engine_support import engine_settings, make_engine
from tests.support.driving import drive, drive_until

SYMBOL = "SFPUSDT"


# --- helpers -----------------------------------------------------------------------------------------


async def _started(
    db: Database,
    overrides: Mapping[str, str] | None = None,
    *,
    create_order_seconds: float | None = None,
    read_lag_seconds: float | None = None,
    clock: ManualClock | None = None,
    venue: SimVenue | None = None,
) -> tuple[Engine, ManualClock]:
    """A started engine on `db`. `create_order_seconds` makes only order creation slow (entries and stops
    alike), every other call keeps the default 50 ms; `read_lag_seconds` is the venue's read-after-write
    lag on conditional orders."""
    settings = engine_settings(db.target.dsn, overrides)
    clock = clock or ManualClock()
    if venue is None and create_order_seconds is not None:
        sim = settings.venue.sim.model_copy(
            update={
                "latency": LatencySettings(
                    seconds=0.05,
                    by_call={CallKind.CREATE_ORDER: LatencyDistribution(seconds=create_order_seconds)},
                )
            }
        )
        venue = SimVenue(sim, clock=clock)
    if read_lag_seconds is not None:
        assert venue is not None, "a read lag needs the venue built here"
        venue.set_read_lag(read_lag_seconds)
    engine = make_engine(settings, clock, venue)
    await drive(clock, engine.start())
    return engine, clock


async def _finished_signals(store: Store, ids: list[int]) -> bool:
    for signal_id in ids:
        signal = await store.signal(signal_id)
        if signal is None or signal.status in (SignalStatus.NEW, SignalStatus.TAKEN):
            return False
    return True


async def _open(engine: Engine, clock: ManualClock, symbol: str, side: str = "long") -> int:
    """Send one signal and wait until its position is covered; returns the position id."""
    assert engine.store is not None
    assert engine.manager is not None
    await engine.store.insert_signals([(symbol, side, None, None)])
    await drive_until(clock, lambda: symbol in engine.manager.by_symbol, what=f"{symbol} to open")
    guard = engine.manager.by_symbol[symbol]
    await drive_until(
        clock,
        lambda: guard.covered and guard.status is PositionStatus.ACTIVE,
        what=f"{symbol} covered and recorded active",
    )
    return guard.position_id


async def _restarted(
    engine: Engine, clock: ManualClock, settings: Settings, venue: SimVenue | None = None
) -> tuple[Engine, PositionGuard]:
    """A new engine process on the same sim account (`engine`'s core, or `venue` built on it) and database,
    started, with SYMBOL's position restored and covered: the engine and that position's guard."""
    assert isinstance(engine.venue, SimVenue)
    second = make_engine(
        settings, clock, venue or SimVenue(settings.venue.sim, clock=clock, core=engine.venue.core)
    )
    await drive(clock, second.start())
    assert second.manager is not None
    await drive_until(
        clock,
        lambda: SYMBOL in second.manager.by_symbol and second.manager.by_symbol[SYMBOL].covered,
        what="restored",
    )
    return second, second.manager.by_symbol[SYMBOL]


def _collect(engine: Engine) -> tuple[list[EngineEvent], asyncio.Task[None]]:
    """Follow `engine.events()` in a task, as the dashboard does; the list fills as events arrive."""
    seen: list[EngineEvent] = []

    async def follow() -> None:
        async for event in engine.events():
            seen.append(event)

    return seen, asyncio.create_task(follow(), name="test-event-follower")


# --- F6: duplicates and orphans ----------------------------------------------------------------------


async def test_f6_same_symbol_twice_in_a_wave_and_again_next_wave_gives_one_position(db: Database) -> None:
    """F6 (duplicates): two signals for one symbol in the same wave, then a third in the next wave. The old
    bot opened the same position twice, 766 ms apart. Here: one position, one protection, the other
    signals `rejected` with the reason, and the venue holds one position of the first signal's size."""
    engine, clock = await _started(db)
    try:
        store, manager = engine.store, engine.manager
        assert store is not None
        assert manager is not None
        first_wave = await store.insert_signals([(SYMBOL, "long", None, None), (SYMBOL, "short", None, None)])
        await drive_until(clock, lambda: _finished_signals(store, first_wave), what="first wave handled")
        opened, twice = [await store.signal(i) for i in first_wave]
        assert opened is not None
        assert twice is not None
        assert opened.status is SignalStatus.OPENED
        assert (twice.status, twice.reason) == (SignalStatus.REJECTED, "symbol appears twice in this wave")
        await drive_until(clock, lambda: manager.by_symbol[SYMBOL].covered, what="covered")

        next_wave = await store.insert_signals([(SYMBOL, "short", None, None)])
        await drive_until(clock, lambda: _finished_signals(store, next_wave), what="second wave handled")
        again = await store.signal(next_wave[0])
        assert again is not None
        assert (again.status, again.reason) == (SignalStatus.REJECTED, "symbol already has an open position")

        rows = await db.pool.fetch("SELECT * FROM monitoring.positions WHERE symbol = $1", SYMBOL)
        assert len(rows) == 1
        assert (rows[0]["side"], rows[0]["status"], rows[0]["signal_id"]) == ("long", "active", opened.id)
        venue_positions = await drive(clock, engine.venue.fetch_positions())
        assert [(p.symbol, p.side, p.quantity) for p in venue_positions] == [
            (SYMBOL, PositionSide.LONG, rows[0]["quantity"])
        ]
        # One entry order, one stop-loss, one trailing stop: nothing was sent for the rejected signals.
        orders = await db.pool.fetch("SELECT purpose FROM monitoring.orders ORDER BY id")
        assert sorted(o["purpose"] for o in orders) == ["entry", "stop_loss", "trailing_stop"]
        assert len(await drive(clock, engine.venue.fetch_open_protective_orders())) == 2
    finally:
        await drive(clock, engine.stop())


async def test_f6_database_refuses_a_second_live_position_per_symbol_in_every_non_terminal_status(
    db: Database,
) -> None:
    """F6 (duplicates, the last line of defence): whatever path tries to create a second position for an
    (exchange, symbol) that already has one in *any* non-terminal status, PostgreSQL refuses it; a closed or
    failed position does not block a new one, and another exchange is another key."""
    store = Store(db.pool)
    live = [s for s in PositionStatus if not s.is_terminal]
    assert {s.value for s in live} == {
        "pending_entry",
        "entry_placed",
        "pending_protection",
        "active",
        "closing",
    }
    for status in live:
        symbol = f"DUP{status.value.upper().replace('_', '')}USDT"
        first = await store.create_position(
            symbol=symbol, exchange="sim", side="long", quantity=Decimal(1), status=status
        )
        with pytest.raises(PositionAlreadyOpen):
            await store.create_position(symbol=symbol, exchange="sim", side="short", quantity=Decimal(1))
        # Not only through the Store: the database itself holds the rule.
        with pytest.raises(asyncpg.UniqueViolationError):
            await db.pool.execute(
                "INSERT INTO monitoring.positions (account, symbol, exchange, side, quantity, status) "
                "VALUES ('sim:default', $1, 'sim', 'long', 1, $2)",
                symbol,
                PositionStatus.ACTIVE.value,
            )
        # Another account (here another venue's) may hold the same symbol at the same time.
        other_account = await Store(db.pool, account="binanceusdm:0123456789abcdef").create_position(
            symbol=symbol, exchange="binanceusdm", side="long", quantity=Decimal(1)
        )
        assert other_account.id != first.id
        terminal = PositionStatus.CLOSED if status is PositionStatus.ACTIVE else PositionStatus.FAILED
        await store.set_position_status(first.id, terminal)
        reopened = await store.create_position(
            symbol=symbol, exchange="sim", side="short", quantity=Decimal(1)
        )
        assert reopened.status is PositionStatus.PENDING_ENTRY
    counts = await db.pool.fetch(
        "SELECT account, symbol, count(*) AS n FROM monitoring.positions "
        "WHERE status NOT IN ('closed', 'failed') GROUP BY account, symbol"
    )
    assert all(row["n"] == 1 for row in counts)


async def test_f6_reconciler_cancels_our_orphans_and_duplicates_and_never_touches_foreign_orders(
    db: Database,
) -> None:
    """F6 (orphans): stops left behind by closed positions, and a second stop of ours for a live position,
    are cancelled by the reconciler, which recognises them by our client-id token. The old bot's cleaner
    deleted real stops; here the live position's current stop-loss and trailing stop stay, and orders
    without our token (placed by hand, by another installation, or on another account) are left alone."""
    engine, clock = await _started(db)
    try:
        assert engine.store is not None
        assert engine.manager is not None
        token = await engine.store.installation_token()
        live_id = await _open(engine, clock, SYMBOL)
        closed_id = await _open(engine, clock, "ALLUSDT")
        assert await drive(clock, engine.close_position(closed_id))
        guard = engine.manager.guards[live_id]
        current = {guard.stop_loss.client_order_id, guard.trailing_stop.client_order_id}
        assert None not in current
        qty = guard.quantity
        stop_at = guard.stop_loss.price
        assert stop_at is not None
        below = stop_at - Decimal("0.0100")  # another valid stop level, further away

        venue = engine.venue
        orphan_of_closed = client_order_id(token, closed_id, OrderPurpose.STOP_LOSS, 5)
        orphan_of_unknown = client_order_id(token, 987_654, OrderPurpose.TRAILING_STOP, 0)
        duplicate = client_order_id(token, live_id, OrderPurpose.STOP_LOSS, 7)
        by_hand = "manual-stop-by-operator"
        other_install = client_order_id("zz99zz", live_id, OrderPurpose.STOP_LOSS, 9)
        for cid in (orphan_of_closed, duplicate, by_hand, other_install):
            await drive(
                clock, venue.create_stop_market_order(SYMBOL, OrderSide.SELL, qty, below, client_order_id=cid)
            )
        await drive(
            clock,
            venue.create_trailing_stop_order(
                SYMBOL, OrderSide.SELL, qty, Decimal(1), client_order_id=orphan_of_unknown
            ),
        )
        # Another account on the same exchange, with an order that even carries our token.
        assert isinstance(venue, SimVenue)
        other_account = SimVenue(engine.settings.venue.sim, clock=clock, core=venue.core, account_id="other")
        await drive(clock, other_account.connect())
        try:
            await drive(
                clock,
                other_account.create_market_order(SYMBOL, OrderSide.BUY, qty, client_order_id="other-entry"),
            )
            foreign_account_cid = client_order_id(token, 987_655, OrderPurpose.STOP_LOSS, 0)
            await drive(
                clock,
                other_account.create_stop_market_order(
                    SYMBOL, OrderSide.SELL, qty, below, client_order_id=foreign_account_cid
                ),
            )

            report = await drive(clock, engine.reconcile_now())

            assert sorted(report.orphans_cancelled) == sorted(
                [orphan_of_closed, orphan_of_unknown, duplicate]
            )
            for cid in (orphan_of_closed, orphan_of_unknown, duplicate):
                assert (await drive(clock, venue.fetch_order(SYMBOL, cid))).status is OrderStatus.CANCELED
            for cid in (*current, by_hand, other_install):
                assert (await drive(clock, venue.fetch_order(SYMBOL, cid))).status is OrderStatus.NEW, cid
            assert (
                await drive(clock, other_account.fetch_order(SYMBOL, foreign_account_cid))
            ).status is OrderStatus.NEW
            assert guard.covered
            assert guard.order_ids() == current
            open_now = {o.client_order_id for o in await drive(clock, venue.fetch_open_protective_orders())}
            assert open_now == current | {by_hand, other_install}
            events = await db.pool.fetch(
                "SELECT severity, message FROM monitoring.events WHERE type = 'orphan_cancelled' ORDER BY id"
            )
            assert len(events) == 3
            assert all(e["severity"] == "warning" for e in events)
            assert {
                cid
                for cid in (orphan_of_closed, orphan_of_unknown, duplicate)
                if any(cid in e["message"] for e in events)
            } == {
                orphan_of_closed,
                orphan_of_unknown,
                duplicate,
            }

            # A second pass finds nothing more to do: what is left is current or not ours.
            again = await drive(clock, engine.reconcile_now())
            assert again.orphans_cancelled == []
            assert again.closed == []
            assert again.reprotected == []
        finally:
            await drive(clock, other_account.close())
    finally:
        await drive(clock, engine.stop())


# --- F7: wrong numbers ---------------------------------------------------------------------------------


async def test_f7_stop_and_activation_come_from_the_fill_price_for_long_and_short(db: Database) -> None:
    """F7 (wrong numbers): the old bot computed the stop from the signal price instead of the fill, and a
    LONG stop with the SHORT formula. With 50 bps of slippage the fill is far from the mark the signal saw;
    every protective price must come from the fill, on tick, below for a long and above for a short, as
    Decimals, under the exchange-native symbol everywhere."""
    engine, clock = await _started(db, {"VENUE__SIM__SLIPPAGE_BPS": "50"})
    try:
        assert engine.store is not None
        assert engine.manager is not None
        marks = await drive(clock, engine.venue.fetch_mark_prices(["BTCUSDT", "DEXEUSDT"]))
        assert (marks["BTCUSDT"].price, marks["DEXEUSDT"].price) == (Decimal("95000.00"), Decimal("10.000"))
        long_id = await _open(engine, clock, "BTCUSDT", "long")
        short_id = await _open(engine, clock, "DEXEUSDT", "short")
        token = await engine.store.installation_token()

        # Hand-computed from the fill (mark ± 0.5 %, rounded against us): stop 3 % away rounded away from
        # the entry, activation 1.5 % away rounded away from the entry. From the mark they would have been
        # 92150.00 / 96425.00 and 10.300 / 9.850.
        expected = {
            long_id: ("BTCUSDT", Decimal("95475.00"), Decimal("92610.70"), Decimal("96907.20")),
            short_id: ("DEXEUSDT", Decimal("9.950"), Decimal("10.249"), Decimal("9.800")),
        }
        open_orders = await drive(clock, engine.venue.fetch_open_protective_orders())
        venue_positions = {p.symbol: p for p in await drive(clock, engine.venue.fetch_positions())}
        views = {v.position_id: v for v in engine.snapshot().positions}
        for position_id, (symbol, fill, stop, activation) in expected.items():
            entry = await drive(
                clock,
                engine.venue.fetch_order(symbol, client_order_id(token, position_id, OrderPurpose.ENTRY, 0)),
            )
            assert entry.average_price == fill
            assert venue_positions[symbol].entry_price == fill
            row = await db.pool.fetchrow("SELECT * FROM monitoring.positions WHERE id = $1", position_id)
            assert (row["symbol"], row["entry_price"], row["stop_loss_price"]) == (symbol, fill, stop)
            assert row["has_stop_loss"]
            assert row["has_trailing_stop"]
            mine = {o.type: o for o in open_orders if o.symbol == symbol}
            assert mine[OrderType.STOP_MARKET].stop_price == stop
            assert mine[OrderType.TRAILING_STOP_MARKET].activation_price == activation
            recorded = {
                r["purpose"]: r
                for r in await db.pool.fetch(
                    "SELECT * FROM monitoring.orders WHERE position_id = $1", position_id
                )
            }
            assert recorded["stop_loss"]["trigger_price"] == stop
            assert recorded["trailing_stop"]["activation_price"] == activation
            view = views[position_id]
            assert (view.entry_price, view.stop_loss_price, view.activation_price) == (fill, stop, activation)
            for value in (view.entry_price, view.stop_loss_price, view.activation_price, view.quantity):
                assert isinstance(value, Decimal)
        long_view, short_view = views[long_id], views[short_id]
        assert long_view.stop_loss_price < long_view.entry_price < long_view.activation_price  # type: ignore[operator]
        assert short_view.activation_price < short_view.entry_price < short_view.stop_loss_price  # type: ignore[operator]
        assert {o.side for o in open_orders if o.symbol == "BTCUSDT"} == {OrderSide.SELL}
        assert {o.side for o in open_orders if o.symbol == "DEXEUSDT"} == {OrderSide.BUY}
        assert all(o.reduce_only for o in open_orders)
        # The same function the guard uses agrees with the hand computation, and not from the mark.
        btc = engine.markets["BTCUSDT"]
        assert stop_loss_price(PositionSide.LONG, Decimal("95475.00"), Decimal(3), btc) == Decimal("92610.70")
        assert stop_loss_price(PositionSide.LONG, Decimal("95000.00"), Decimal(3), btc) != Decimal("92610.70")
    finally:
        await drive(clock, engine.stop())


async def test_f7_a_restored_trailing_stop_keeps_the_activation_it_was_sent_with(db: Database) -> None:
    """F7 (wrong numbers) across a restart whose settings changed: positions opened under
    `activation_percent = 1.5` keep the trailing stop the venue holds, activating at 1.5 % over the fill.
    The next engine, started with 3 %, restores that order and must show (and, if it ever sends the trail
    again, send) the activation the venue's order has, not one worked out afresh from its own settings."""
    engine, clock = await _started(db)
    assert engine.manager is not None
    guard = engine.manager.guards[await _open(engine, clock, SYMBOL)]
    position_id, sent = guard.position_id, guard.trailing_stop.price
    await drive(clock, engine.stop())
    settings = engine_settings(db.target.dsn, {"PROTECTION__ACTIVATION_PERCENT": "3"})
    second, _restored = await _restarted(engine, clock, settings)
    try:
        live = await drive(clock, second.venue.fetch_open_protective_orders(SYMBOL))
        assert [o.activation_price for o in live if o.type is OrderType.TRAILING_STOP_MARKET] == [sent]
        view = second.snapshot().positions[0]
        assert (view.position_id, view.activation_price) == (position_id, sent)
    finally:
        await drive(clock, second.stop())


async def test_f7_stops_restored_after_a_tick_size_change_are_sent_again_on_the_new_grid(
    db: Database,
) -> None:
    """F7 (wrong numbers) across a venue's tick-size change: Binance and Bybit change a symbol's price step
    (announced ahead; orders already placed keep their prices). A position protected under the old step
    restores its stops from their records; when they must be sent again (here cancelled by hand), the
    recorded prices are off the new grid, and every send was refused (-1111 precision) for good: the
    position stayed naked, retried for ever. They are sent on the new grid, each rounded the protective way
    (a long's stop-loss up, nearer the mark; its activation down, sooner)."""
    settings = engine_settings(db.target.dsn)
    engine, clock = await _started(db)
    assert engine.manager is not None
    guard = engine.manager.guards[await _open(engine, clock, SYMBOL)]
    position_id, stop, activation = guard.position_id, guard.stop_loss.price, guard.trailing_stop.price
    assert stop is not None
    assert activation is not None
    coarser = guard.market.tick_size * 10
    assert stop % coarser != 0
    assert activation % coarser != 0
    await drive(clock, engine.stop())
    core = engine.venue.core  # type: ignore[attr-defined]
    core.change_tick_size(SYMBOL, coarser)

    second, restored = await _restarted(engine, clock, settings)
    try:
        assert restored.position_id == position_id
        # Until it sends another, the guard says what the venue holds: the old price, off the new grid.
        assert second.snapshot().positions[0].stop_loss_price == stop
        for order in await drive(clock, second.venue.fetch_open_protective_orders(SYMBOL)):
            await drive(clock, second.venue.cancel_order(SYMBOL, order.client_order_id))  # by hand

        def live() -> dict[OrderType, Order]:
            return {o.type: o for o in core.open_protective_orders(clock.now(), SYMBOL)}

        await drive_until(
            clock, lambda: len(live()) == 2 and restored.covered, what="protected again on the new grid"
        )
        live_now = live()
        assert live_now[OrderType.STOP_MARKET].stop_price == (
            (stop / coarser).to_integral_value(ROUND_UP) * coarser
        )
        assert live_now[OrderType.TRAILING_STOP_MARKET].activation_price == (
            (activation / coarser).to_integral_value(ROUND_DOWN) * coarser
        )
    finally:
        await drive(clock, second.stop())


async def test_f7_a_managed_trail_restored_after_a_tick_size_change_keeps_its_peak_and_its_stop(
    db: Database,
) -> None:
    """F7 across a tick-size change, managed trailing: the recorded trail (activation, stop) was on the old
    grid, so its activation worked out again on the new one differed and the state machine refused the whole
    trail: an ERROR and a `trail_restore_refused` event, the trail started afresh from the fill, its peak
    lost (the next stop placed from the mark, looser than the one on the venue). It is restored onto the new
    grid instead: its peak kept, its stop on the venue left as it is."""
    overrides = {"PROTECTION__TRAILING__MODE": "managed"}
    settings = engine_settings(db.target.dsn, overrides)
    engine, clock = await _started(db, overrides)
    assert engine.manager is not None
    guard = engine.manager.guards[await _open(engine, clock, SYMBOL)]
    assert guard.trail is not None
    assert isinstance(engine.venue, SimVenue)
    engine.venue.override_mark_price(SYMBOL, guard.trail.activation_price * Decimal("1.03"))
    await drive_until(
        clock,
        lambda: guard.trail is not None and guard.trail.stop_price is not None and guard.trailing_in_place,
        what="the trail's stop placed",
    )
    await drive_until(clock, guard.facts_written, what="recorded")
    position_id = guard.position_id
    trail_stop = guard.trailing_stop.client_order_id
    peak, stop = guard.trail.peak_price, guard.trail.stop_price
    assert peak is not None
    assert stop is not None
    await drive(clock, engine.stop())
    core = engine.venue.core
    coarser = guard.market.tick_size * 10
    assert stop % coarser != 0
    core.change_tick_size(SYMBOL, coarser)

    venue = SimVenue(settings.venue.sim, clock=clock, core=core)
    # Meanwhile the mark eased off the peak (still above the stop): a trail started afresh would take it
    # for its peak; the restored one keeps its own.
    venue.override_mark_price(
        SYMBOL, (peak * Decimal("0.998") / coarser).to_integral_value(ROUND_DOWN) * coarser
    )
    second, restored = await _restarted(engine, clock, settings, venue)
    try:
        assert restored.position_id == position_id
        assert restored.trail is not None
        assert restored.trail.peak_price == peak  # not started afresh from the fill
        assert restored.trailing_stop.client_order_id == trail_stop  # the venue's stop kept, not replaced
        assert restored.trailing_stop.price == stop
        refused = await db.pool.fetchval(
            "SELECT count(*) FROM monitoring.events WHERE type = 'trail_restore_refused'"
        )
        assert refused == 0
        live = [
            o for o in core.open_protective_orders(clock.now(), SYMBOL) if o.client_order_id == trail_stop
        ]
        assert [o.stop_price for o in live] == [stop]
    finally:
        await drive(clock, second.stop())


# --- F8: price already through the stop ----------------------------------------------------------------


async def _crash_before_the_stop_lands(
    engine: Engine, clock: ManualClock, symbol: str
) -> tuple[int, Decimal]:
    """Open a long with 2 s per order call; the moment the entry is answered (the stops are on their way,
    landing 1 s later) the mark drops ten ticks below the stop-loss level."""
    assert engine.store is not None
    assert engine.manager is not None
    await engine.store.insert_signals([(symbol, "long", None, None)])
    await drive_until(clock, lambda: symbol in engine.manager.by_symbol, what=f"{symbol} filled")
    guard = engine.manager.by_symbol[symbol]
    assert guard.stop_loss.price is not None
    assert not guard.stop_loss.confirmed
    crash = guard.stop_loss.price - 10 * guard.market.tick_size
    assert isinstance(engine.venue, SimVenue)
    engine.venue.override_mark_price(symbol, crash)
    return guard.position_id, guard.stop_loss.price


async def test_f8_stop_that_would_trigger_immediately_closes_the_position_reduce_only(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """F8 (price already through the stop): the mark falls through a long's stop-loss level between the
    fill and the stop's arrival, so the venue refuses the stop (-2021 "would immediately trigger"). The old
    bot looped on -2021 or called the TS "activated" with nothing on the exchange. The protection goal is
    already breached: the position is closed reduce-only at market, logged with the symbol, recorded as an
    event with exit_reason 'stop_breached', and no stop of it is left open on the venue."""
    caplog.set_level(logging.INFO)
    engine, clock = await _started(db, create_order_seconds=2.0)
    seen, follower = _collect(engine)
    try:
        position_id, stop = await _crash_before_the_stop_lands(engine, clock, SYMBOL)
        await drive_until(
            clock,
            lambda: db.pool.fetchval(
                "SELECT status = 'closed' FROM monitoring.positions WHERE id = $1", position_id
            ),
            what="position closed",
        )
        row = await db.pool.fetchrow("SELECT * FROM monitoring.positions WHERE id = $1", position_id)
        assert row["exit_reason"] == "stop_breached"
        assert not row["has_stop_loss"]
        assert not row["has_trailing_stop"]
        assert row["realized_pnl"] < 0
        orders = {
            r["purpose"]: r
            for r in await db.pool.fetch(
                "SELECT * FROM monitoring.orders WHERE position_id = $1", position_id
            )
        }
        assert orders["stop_loss"]["status"] == "rejected"
        assert "immediately trigger" in orders["stop_loss"]["error"]
        assert orders["close"]["status"] == "filled"
        close = await drive(clock, engine.venue.fetch_order(SYMBOL, orders["close"]["client_order_id"]))
        assert close.reduce_only
        assert close.side is OrderSide.SELL
        assert close.status is OrderStatus.FILLED
        assert await drive(clock, engine.venue.fetch_positions()) == []
        assert await drive(clock, engine.venue.fetch_open_protective_orders(SYMBOL)) == []
        event = await db.pool.fetchrow("SELECT * FROM monitoring.events WHERE type = 'stop_breached'")
        assert event["severity"] == "error"
        assert event["symbol"] == SYMBOL
        assert event["position_id"] == position_id
        assert f"{SYMBOL}: price already through the stop-loss at {stop}" in event["message"]
        assert "closing at market" in event["message"]
        assert any(
            r.levelno >= logging.ERROR
            and r.name == "protection.manager"
            and SYMBOL in r.getMessage()
            and "closing reduce-only" in r.getMessage()
            for r in caplog.records
        )
        await drive_until(clock, lambda: any(isinstance(e, PositionClosed) for e in seen), what="event")
        closed = [e for e in seen if isinstance(e, PositionClosed)]
        assert [(e.position_id, e.exit_reason) for e in closed] == [(position_id, "stop_breached")]
        assert engine.manager is not None
        assert engine.manager.guards == {}
        # Its wave is over with it: it waited 120 s for a protection that could never come (r72: waves
        # `running` for as long as that, then finished by the next start as left by a dead engine).
        wave = "SELECT * FROM monitoring.waves WHERE id = (SELECT wave_id FROM monitoring.positions WHERE id = $1)"
        await drive_until(
            clock,
            lambda: db.pool.fetchval(f"SELECT finished_at IS NOT NULL FROM ({wave}) w", position_id),
            limit=10,
            what="its wave finished",
        )
        finished = await db.pool.fetchrow(wave, position_id)
        assert (finished["opened"], finished["protected"], finished["failed"]) == (1, 0, 1)
    finally:
        await drive(clock, engine.stop())
        await follower


async def test_f8_with_close_on_would_trigger_off_the_position_stays_open_visibly_uncovered(
    db: Database,
) -> None:
    """F8 with `protection.close_on_would_trigger = false`: the same breach leaves the position open, but
    never silently: a CRITICAL event, a ProtectionFailed engine event, counted uncovered in coverage, the
    health check and the operators' SQL; it keeps retrying and is covered as soon as the price is back."""
    engine, clock = await _started(
        db, {"PROTECTION__CLOSE_ON_WOULD_TRIGGER": "false"}, create_order_seconds=2.0
    )
    seen, follower = _collect(engine)
    try:
        assert engine.manager is not None
        position_id, stop = await _crash_before_the_stop_lands(engine, clock, SYMBOL)
        await drive_until(
            clock, lambda: engine.manager.coverage().uncovered == 1, what="uncovered past grace"
        )
        await drive_until(
            clock,
            lambda: db.pool.fetchval(
                "SELECT status = 'active' FROM monitoring.positions WHERE id = $1", position_id
            ),
            what="counted active in the database",
        )
        guard = engine.manager.guards[position_id]
        figures = engine.manager.coverage()
        assert (figures.active, figures.protected, figures.uncovered_ids) == (1, 0, (position_id,))
        assert not guard.has_stop_loss
        assert guard.has_trailing_stop
        view = engine.snapshot().positions[0]
        assert not view.covered
        assert view.unprotected_seconds is not None
        assert view.last_error is not None
        assert "price already through the stop" in view.last_error
        row = await db.pool.fetchrow("SELECT * FROM monitoring.positions WHERE id = $1", position_id)
        assert (row["status"], row["has_stop_loss"], row["exit_reason"]) == ("active", False, None)
        assert (await engine.store.coverage()).stop_loss_coverage_pct == Decimal("0.0")  # type: ignore[union-attr]
        events = await db.pool.fetch("SELECT * FROM monitoring.events WHERE type = 'stop_breached'")
        assert events
        assert all(e["severity"] == "critical" and e["symbol"] == SYMBOL for e in events)
        assert "left open, uncovered" in events[0]["message"]
        assert any(isinstance(e, ProtectionFailed) and e.symbol == SYMBOL for e in seen)
        assert not any(isinstance(e, PositionClosed) for e in seen)
        health = await engine.measure_health()
        assert health[Component.PROTECTION].state is HealthState.CRITICAL
        assert "Low SL coverage: 0.0% (0/1)" in health[Component.PROTECTION].reason
        assert [p.symbol for p in await drive(clock, engine.venue.fetch_positions())] == [SYMBOL]

        # The price comes back above the stop: the next retry places it and the position is covered.
        assert isinstance(engine.venue, SimVenue)
        engine.venue.override_mark_price(SYMBOL, stop + 20 * guard.market.tick_size)
        await drive_until(clock, lambda: guard.covered, what="covered after the price recovered", limit=120)
        stops = [
            o
            for o in await drive(clock, engine.venue.fetch_open_protective_orders(SYMBOL))
            if o.type is OrderType.STOP_MARKET
        ]
        assert [o.stop_price for o in stops] == [stop]
    finally:
        await drive(clock, engine.stop())
        await follower


async def test_f8_a_trailing_stop_armed_at_the_mark_is_shown_and_restored_as_armed(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """F8, the trailing stop's side: the mark passes a long's activation price between the fill and the
    trailing stop's arrival, so the venue would refuse the activation (-2021) and the guard arms the trail
    at the current mark instead (no activation price on the order). The venue's trail is then armed and
    following the mark. When the mark eases back under the activation the position had planned, the
    dashboard must not say "waiting" for an activation the venue's order does not have, neither in the
    engine that placed it nor in the next one, which restores it from its record: that engine must know
    the trail is armed (it watches the marks for it firing), not wait for a price the order never had."""
    caplog.set_level(logging.INFO, logger="protection.manager")
    settings = engine_settings(db.target.dsn)
    engine, clock = await _started(db, create_order_seconds=2.0)
    assert engine.store is not None
    assert engine.manager is not None
    await engine.store.insert_signals([(SYMBOL, "long", None, None)])
    await drive_until(clock, lambda: SYMBOL in engine.manager.by_symbol, what=f"{SYMBOL} filled")
    guard = engine.manager.by_symbol[SYMBOL]
    position_id, activation = guard.position_id, guard.trailing_stop.price
    assert activation is not None
    assert not guard.trailing_stop.confirmed
    tick = guard.market.tick_size
    assert isinstance(engine.venue, SimVenue)
    engine.venue.override_mark_price(SYMBOL, activation + 10 * tick)

    def venue_trail() -> list:
        live = engine.venue.core.open_protective_orders(clock.now(), SYMBOL)  # type: ignore[attr-defined]
        return [o for o in live if o.type is OrderType.TRAILING_STOP_MARKET]

    await drive_until(clock, lambda: bool(venue_trail()) and guard.covered, what="trail armed at the mark")
    assert [o.activation_price for o in venue_trail()] == [None]  # armed at the mark on the venue
    # Its line says so: it said the activation it was not sent with (an operator).
    created = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Created trailing stop")]
    assert created
    assert all("activation now" in line for line in created), created
    # Back under the planned activation, far above the trail's trigger (0.5 % under its best mark).
    engine.venue.override_mark_price(SYMBOL, activation - 2 * tick)
    await drive(clock, asyncio.sleep(1.0))
    assert venue_trail(), "the venue's trail has not fired"
    view = engine.snapshot().positions[0]
    assert (view.position_id, view.has_trailing_stop, view.trailing_phase) == (position_id, True, "native")
    assert (view.activation_price, view.distance_to_activation_percent) == (None, None)
    await drive(clock, engine.stop())

    second, _restored = await _restarted(engine, clock, settings)
    try:
        assert [o.activation_price for o in venue_trail()] == [None]
        view = second.snapshot().positions[0]
        assert (view.position_id, view.has_trailing_stop) == (position_id, True)
        assert (view.activation_price, view.distance_to_activation_percent) == (None, None)
        # The restored engine follows the armed trail: the mark through its trigger ends the position as
        # the venue's trailing stop, and nothing of it is left on the venue.
        second.venue.override_mark_price(SYMBOL, activation * Decimal("0.99"))  # type: ignore[attr-defined]
        await drive_until(
            clock,
            lambda: db.pool.fetchval(
                "SELECT exit_reason FROM monitoring.positions WHERE id = $1 AND status = 'closed'",
                position_id,
            ),
            what="closed by the trail",
        )
        row = await db.pool.fetchrow("SELECT * FROM monitoring.positions WHERE id = $1", position_id)
        assert row["exit_reason"] == "trailing_stop"
        # The close is recorded before the hard stop left behind is cancelled (record first): it goes soon.
        await drive_until(
            clock,
            lambda: not second.venue.core.open_protective_orders(clock.now(), SYMBOL),  # type: ignore[attr-defined]
            what="the hard stop cancelled",
            limit=10,
        )
    finally:
        await drive(clock, second.stop())


async def test_f8_a_native_trail_the_venue_armed_is_not_waiting_when_the_price_pulls_back(
    db: Database,
) -> None:
    """F8 (an operator's find in tmux): the mark reaches a long's activation price, so the venue arms its
    trailing stop, then eases back under the activation. The venue's trail stays armed, trailing from its
    best mark, half a percent from closing the position; the dashboard said "waiting +0.05%" (a trail not
    armed yet, away from its activation) because it judged by where the mark is now. Armed once the mark
    has reached the activation: shown as the venue's trail, by the next engine too (recorded), and the
    venue's truth agrees (it fires)."""
    settings = engine_settings(db.target.dsn)
    engine, clock = await _started(db)
    await engine.store.insert_signals([(SYMBOL, "long", None, None)])  # type: ignore[union-attr]
    manager = engine.manager
    assert manager is not None
    await drive_until(
        clock,
        lambda: SYMBOL in manager.by_symbol and manager.by_symbol[SYMBOL].covered,
        what=f"{SYMBOL} covered",
    )
    guard = manager.by_symbol[SYMBOL]
    activation, tick = guard.trailing_stop.price, guard.market.tick_size
    assert activation is not None
    assert isinstance(engine.venue, SimVenue)
    view = engine.snapshot().positions[0]
    assert view.activation_price == activation  # not reached yet: waiting for it
    assert view.distance_to_activation_percent is not None
    assert view.distance_to_activation_percent > 0
    engine.venue.override_mark_price(SYMBOL, activation + 10 * tick)  # the venue arms its trail
    await drive(clock, asyncio.sleep(0.5))
    engine.venue.override_mark_price(SYMBOL, activation - 2 * tick)  # under the activation again
    await drive(clock, asyncio.sleep(0.5))
    view = engine.snapshot().positions[0]
    assert (view.trailing_phase, view.has_trailing_stop) == ("native", True)
    assert (view.activation_price, view.distance_to_activation_percent) == (None, None)
    await drive(clock, engine.stop())

    second, restored = await _restarted(engine, clock, settings)
    try:
        # The next engine knows it armed (the mark it armed at went by under the last one).
        assert restored.trailing_stop.client_order_id == guard.trailing_stop.client_order_id
        view = second.snapshot().positions[0]
        assert (view.activation_price, view.distance_to_activation_percent) == (None, None)
        # The venue's truth: its trail is armed, so a fall of the callback from the best mark fires it.
        second.venue.override_mark_price(SYMBOL, (activation + 10 * tick) * Decimal("0.99"))  # type: ignore[attr-defined]
        await drive_until(
            clock,
            lambda: db.pool.fetchval(
                "SELECT exit_reason FROM monitoring.positions WHERE id = $1 AND status = 'closed'",
                guard.position_id,
            ),
            what="closed by the venue's armed trail",
        )
        exit_reason = await db.pool.fetchval(
            "SELECT exit_reason FROM monitoring.positions WHERE id = $1", guard.position_id
        )
        assert exit_reason == "trailing_stop"
    finally:
        await drive(clock, second.stop())


async def test_f8_a_native_trail_the_venue_armed_is_sent_again_armed_when_the_position_is_resized(
    db: Database,
) -> None:
    """F8 with a resize (reviewer's find): the venue armed the trail (a mark reached its activation), the
    price pulled back under the activation, and the position's size changed (someone added to it). The
    stops are placed again for the new size; the trailing stop went with its activation again, so the
    venue took it unarmed, waiting for a price already passed, and the position kept only its hard stop
    where it had trailed half a percent under its best mark. It goes armed at the mark."""
    engine, clock = await _started(db)
    try:
        assert engine.store is not None
        assert engine.manager is not None
        await engine.store.insert_signals([(SYMBOL, "long", None, None)])
        await drive_until(
            clock,
            lambda: SYMBOL in engine.manager.by_symbol and engine.manager.by_symbol[SYMBOL].covered,
            what=f"{SYMBOL} covered",
        )
        guard = engine.manager.by_symbol[SYMBOL]
        activation, tick, first = (
            guard.trailing_stop.price,
            guard.market.tick_size,
            guard.trailing_stop.client_order_id,
        )
        assert activation is not None
        venue = engine.venue
        assert isinstance(venue, SimVenue)
        venue.override_mark_price(SYMBOL, activation + 10 * tick)  # the venue arms its trail
        await drive(clock, asyncio.sleep(0.5))
        venue.override_mark_price(SYMBOL, activation - 2 * tick)  # under the activation again
        await drive(clock, asyncio.sleep(0.5))
        venue.core.place_market_order(SYMBOL, OrderSide.BUY, guard.quantity, "someone-else-1", clock.now())
        grown = guard.quantity * 2

        def trails() -> list:
            live = venue.core.open_protective_orders(clock.now(), SYMBOL)
            return [o for o in live if o.type is OrderType.TRAILING_STOP_MARKET]

        engine.manager.request_reconcile()
        await drive_until(
            clock,
            lambda: [o.quantity for o in trails()] == [grown] and guard.covered,
            what="the trail placed again for the new size",
            limit=60,
        )
        [trail] = trails()
        assert trail.client_order_id != first
        assert trail.activation_price is None, "sent again unarmed, waiting for an activation already passed"
        view = engine.snapshot().positions[0]
        assert (view.activation_price, view.distance_to_activation_percent) == (None, None)
    finally:
        await drive(clock, engine.stop())


# --- F9: two writers -----------------------------------------------------------------------------------


def _engine_on(db: Database, clock: ManualClock, core: object | None, version: str) -> Engine:
    """An engine on `db` trading the default account of the sim exchange `core` (a new one when None)."""
    settings = engine_settings(db.target.dsn)
    venue = SimVenue(settings.venue.sim, clock=clock, core=core)  # type: ignore[arg-type]
    return Engine(settings, venue=venue, clock=clock, version=version)


async def test_f9_a_second_engine_on_the_same_account_is_refused_names_the_holder_and_touches_nothing(
    db: Database,
) -> None:
    """F9 (two writers): the old bot ran two processes on one account for hours (a pid file with a relative
    path). A second engine on the same database and account is refused at start with `LeaseHeld` naming
    the holder (pid, host, version, since); it sent nothing to the venue and wrote no position or order;
    the first keeps trading. Once the first stops, a new engine can start and takes over its positions."""
    clock = ManualClock()
    first = _engine_on(db, clock, None, "1.0-first")
    await drive(clock, first.start())
    core = first.venue.core  # type: ignore[attr-defined]
    try:
        position_id = await _open(first, clock, SYMBOL)
        positions_before = await db.pool.fetch("SELECT id, status FROM monitoring.positions ORDER BY id")
        orders_before = await db.pool.fetch(
            "SELECT client_order_id, status FROM monitoring.orders ORDER BY id"
        )
        open_before = {o.client_order_id for o in core.open_protective_orders(clock.now())}

        second = _engine_on(db, clock, core, "2.0-second")
        with pytest.raises(LeaseHeld) as refused:
            await drive(clock, second.start())
        holder = refused.value.holder
        assert holder is not None
        assert (holder.pid, holder.host, holder.version) == (os.getpid(), socket.gethostname(), "1.0-first")
        assert holder.started_at is not None
        assert (
            f"pid {os.getpid()} on {socket.gethostname()} (account label 'default'), version 1.0-first, since"
            in str(refused.value)
        )
        # Refused before anything else: no markets loaded, no store, no protection, nothing sent or written.
        assert second.markets == {}
        assert second.store is None
        assert second.manager is None
        assert second.state is not EngineState.RUNNING
        assert (
            await db.pool.fetch("SELECT id, status FROM monitoring.positions ORDER BY id") == positions_before
        )
        assert (
            await db.pool.fetch("SELECT client_order_id, status FROM monitoring.orders ORDER BY id")
            == orders_before
        )
        assert {o.client_order_id for o in core.open_protective_orders(clock.now())} == open_before
        assert [p.symbol for p in core.positions(clock.now())] == [SYMBOL]

        # The first engine still trades.
        await _open(first, clock, "ALLUSDT")
        assert first.state is EngineState.RUNNING
    finally:
        await drive(clock, first.stop())

    third = _engine_on(db, clock, core, "3.0-third")
    report = await drive(clock, third.start())
    try:
        assert third.state is EngineState.RUNNING
        assert report.restored == 2
        assert report.failed == 0
        assert position_id in third.manager.guards  # type: ignore[union-attr]
        lease = await db.pool.fetchrow("SELECT * FROM monitoring.engine_leases")
        assert (lease["pid"], lease["version"]) == (os.getpid(), "3.0-third")
    finally:
        await drive(clock, third.stop())


async def _another_installation_opens(engine: Engine, clock: ManualClock, symbol: str) -> list[str]:
    """What another installation of tsbot (another database: its own token) does on the same venue
    account: opens a long on `symbol` and stops it, under its own client ids. Returns the stops' ids."""
    venue = engine.venue
    assert isinstance(venue, SimVenue)
    market = engine.markets[symbol]
    quantity = market.round_quantity(Decimal(100) / venue.core.mark(symbol)) or market.min_quantity
    entry = client_order_id("zz99zz", 1, OrderPurpose.ENTRY, 0)
    await drive(clock, venue.create_market_order(symbol, OrderSide.BUY, quantity, client_order_id=entry))
    stop = client_order_id("zz99zz", 1, OrderPurpose.STOP_LOSS, 0)
    below = market.round_price(venue.core.mark(symbol) * Decimal("0.97"))
    await drive(
        clock, venue.create_stop_market_order(symbol, OrderSide.SELL, quantity, below, client_order_id=stop)
    )
    return [stop]


async def test_f9_a_start_on_an_account_another_installation_trades_is_refused_and_trades_nothing(
    db: Database,
) -> None:
    """F9/F16 (two writers, two databases): a second installation of tsbot on the same exchange account
    (its own database, so its own lease) started, adopted the first one's 36 positions and put a second
    pair of stops on each (an operator: 168 conditional orders for 41 positions), and neither engine said
    a word. The venue's orders carry each installation's token: a start that finds another's is refused,
    one line naming them, before anything is restored, adopted or sent."""
    clock = ManualClock()
    settings = engine_settings(db.target.dsn)
    venue = SimVenue(settings.venue.sim, clock=clock)
    engine = Engine(settings, venue=venue, clock=clock, version="test")
    await drive(clock, venue.connect())
    engine.markets = dict(await drive(clock, venue.load_markets()))
    theirs = await _another_installation_opens(engine, clock, SYMBOL)
    placed = venue.core.inspect(clock.now()).orders_placed
    with pytest.raises(AccountShared) as refused:
        await drive(clock, engine.start())
    said = str(refused.value)
    assert said.startswith("venue sim: the account holds 1 open order of another tsbot installation "), said
    assert "(client ids tsbzz99zz-… (1): another database); one engine per account" in said
    assert said.endswith("nothing was traded")
    assert venue.core.inspect(clock.now()).orders_placed == placed  # nothing sent
    assert [o.client_order_id for o in venue.core.open_protective_orders(clock.now())] == theirs
    assert await db.pool.fetchval("SELECT count(*) FROM monitoring.positions") == 0
    # Nothing said of a pause or of positions left to it: the engine never ran (r74).
    assert (
        await db.pool.fetchval("SELECT count(*) FROM monitoring.events WHERE type = 'other_installation'")
        == 0
    )


async def test_f16_a_second_identity_of_one_venue_account_on_one_database_is_refused_while_the_first_runs(
    db: Database,
) -> None:
    """Two API keys of one venue account (or one key with `venue.testnet` flipped) on one database are two
    account identities, two leases, one token: the second engine started, adopted the first one's positions
    as not recorded for it, and each cancelled the other's stops as orphans at every pass (r80: 168 and 216
    cancels in 80 s, positions without a stop in 27 of 554 samples, status OK for both). Here two labels
    share one sim venue, as two identities share a real account. The venue's orders carry this database's
    token and name positions recorded for another identity whose engine runs: the start is refused."""
    clock = ManualClock()
    first, _ = await _started(db, {"VENUE__ACCOUNT": "first"}, clock=clock)
    try:
        await _open(first, clock, SYMBOL)
        venue = first.venue
        assert isinstance(venue, SimVenue)
        placed = venue.core.inspect(clock.now()).orders_placed
        second = make_engine(engine_settings(db.target.dsn, {"VENUE__ACCOUNT": "second"}), clock, venue)
        with pytest.raises(AccountShared) as refused:
            await drive(clock, second.start())
        said = str(refused.value)
        assert said.startswith(
            "venue sim: the account holds 2 open orders this database recorded for account sim:first, traded "
            "by pid "
        ), said
        assert said.endswith("nothing was traded"), said
        assert venue.core.inspect(clock.now()).orders_placed == placed  # nothing sent, nothing cancelled
        assert first.manager is not None
        assert all(g.covered for g in first.manager.guards.values())
    finally:
        await drive(clock, first.stop())


async def test_f16_a_second_identity_appearing_on_the_venue_account_is_left_alone_and_pauses_entries(
    db: Database,
) -> None:
    """The start-up refusal above is passed by a second identity started while the first held no order (it
    was flat): it then opened positions, and the first engine, at its next passes, adopted them as not
    recorded for it and cancelled their stops as orphans, and the second cancelled the first's back (r81:
    41 and 36 cancels in 70 s, status OK). Orders this database sent for another identity's positions are
    that identity's: left alone, said at CRITICAL, and entries paused by the breaker."""
    clock = ManualClock()
    first, _ = await _started(
        db, {"VENUE__ACCOUNT": "first", "PROTECTION__RECONCILE_SECONDS": "2"}, clock=clock
    )
    second = None
    try:
        venue = first.venue
        assert isinstance(venue, SimVenue)
        second = make_engine(engine_settings(db.target.dsn, {"VENUE__ACCOUNT": "second"}), clock, venue)
        await drive(clock, second.start())  # (the first holds no order: nothing refuses it)
        await _open(second, clock, SYMBOL)
        assert second.manager is not None
        guard = second.manager.by_symbol[SYMBOL]
        theirs = {guard.stop_loss.client_order_id, guard.trailing_stop.client_order_id}
        assert first.manager is not None
        runs = first.reconciler.runs if first.reconciler is not None else 0
        await drive_until(
            clock,
            lambda: first.reconciler is not None and first.reconciler.runs >= runs + 3,
            what="three passes of the first engine",
        )
        live = {o.client_order_id for o in venue.core.open_protective_orders(clock.now())}
        assert theirs <= live, "the first engine cancelled the second identity's stops"
        # (Whether the first adopted the position before the second's stops were on the venue is a race no
        # order can settle yet: then both protect it, neither cancelling the other's stops.)
        await drive_until(clock, lambda: first.entries_paused_by == "breaker", what="the breaker's pause")
        said = await db.pool.fetchval(
            "SELECT message FROM monitoring.events WHERE type = 'other_identity' AND severity = 'critical'"
        )
        assert said is not None
        assert "sim:second" in said, said
        assert guard.covered
    finally:
        if second is not None:
            await drive(clock, second.stop())
        await drive(clock, first.stop())


async def test_f9_another_installation_appearing_on_the_account_pauses_entries_and_is_not_adopted(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """The same, the other installation starting after this engine: its position and stops appear on the
    account. Its position was adopted and stopped a second time, and entries went on. It is said at
    CRITICAL, left to that installation (no stop of ours on it), and the breaker pauses entries while
    its orders are there."""
    engine, clock = await _started(db)
    try:
        assert engine.manager is not None
        await _open(engine, clock, "ALLUSDT")
        theirs = await _another_installation_opens(engine, clock, SYMBOL)
        await drive(clock, engine.reconcile_now())
        await drive_until(clock, lambda: engine.entries_paused, limit=30, what="entries paused")
        assert engine.entries_paused_by == "breaker"
        assert "another installation of tsbot trades this account" in engine.entries_pause_reason
        assert SYMBOL not in engine.manager.by_symbol  # not adopted
        venue = engine.venue
        assert isinstance(venue, SimVenue)
        on_symbol = [o.client_order_id for o in venue.core.open_protective_orders(clock.now(), SYMBOL)]
        assert on_symbol == theirs
        critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
        assert any("another installation of tsbot trades this account" in m for m in critical), critical
        # A moment without an order of its there (its stop being replaced, say): still its position. Adopted
        # then, it got a second pair of stops (r74).
        venue.core.cancel_order(SYMBOL, theirs[0], clock.now())
        await drive(clock, engine.reconcile_now())
        await drive(clock, clock.sleep(2.0))
        assert SYMBOL not in engine.manager.by_symbol
        assert venue.core.open_protective_orders(clock.now(), SYMBOL) == []
    finally:
        await drive(clock, engine.stop())


async def test_f9_two_engines_starting_at_the_same_moment_only_one_trades(db: Database) -> None:
    """F9 (two writers, the race): two engines started concurrently on one account; exactly one runs, the
    other gets `LeaseHeld` naming the winner, and signals are traded once."""
    clock = ManualClock()
    a = _engine_on(db, clock, None, "race-a")
    b = _engine_on(db, clock, a.venue.core, "race-b")  # type: ignore[attr-defined]
    outcomes = await drive(clock, asyncio.gather(a.start(), b.start(), return_exceptions=True))
    winners = [e for e, o in zip((a, b), outcomes, strict=True) if not isinstance(o, BaseException)]
    losers = [o for o in outcomes if isinstance(o, BaseException)]
    try:
        assert len(winners) == 1
        assert len(losers) == 1
        assert isinstance(losers[0], LeaseHeld)
        assert losers[0].holder is not None
        assert losers[0].holder.version == winners[0].version
        winner = winners[0]
        await _open(winner, clock, SYMBOL)
        assert await db.pool.fetchval("SELECT count(*) FROM monitoring.positions") == 1
        assert len(a.venue.core.positions(clock.now())) == 1  # type: ignore[attr-defined]
    finally:
        for engine in (a, b):
            await drive(clock, engine.stop())


def _supervised_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Engine loops (health, reconciler, ...) that failed and were restarted by the supervisor."""
    return [r.getMessage() for r in caplog.records if "failed; restarting" in r.getMessage()]


# --- F11: health that lies -----------------------------------------------------------------------------


async def test_f11_health_is_computed_from_measurements_and_a_calm_run_raises_no_alarm(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """F11 (health that lies): the old bot hard-coded HEALTHY for half its components and raised a false
    DEGRADED 1 561 times a day. Here: right after start nothing unmeasured reads healthy (signals unknown
    until the consumer has tried LISTEN), protection with every position covered is healthy *and* shows its figures, the
    exchange shows call latencies it measured, the health loop writes `monitoring.health` every interval,
    and a calm run (start, a wave, protection) never raises a degraded or critical state."""
    settings_overrides = {"HEALTH__INTERVAL_SECONDS": "1"}
    settings = engine_settings(db.target.dsn, settings_overrides)
    clock = ManualClock()
    engine = make_engine(settings, clock)
    seen, follower = _collect(engine)
    await asyncio.sleep(0)  # the follower subscribes before the engine publishes anything
    await drive(clock, engine.start())
    try:
        assert engine.store is not None
        assert engine.manager is not None
        report = await engine.measure_health()
        signals = report[Component.SIGNALS]
        # No wave yet is no fault: unknown until the consumer has tried LISTEN, healthy once it listens (its
        # listening is what is measured; "unknown" until a signal came made every restart's health, and
        # `tsbot status`, "unknown" with every position protected).
        assert (signals.state, signals.summary) in (
            (HealthState.UNKNOWN, "not measured yet"),
            (HealthState.HEALTHY, "no wave yet, LISTEN up"),
        ), signals
        assert signals.measurements.get("last_wave_age_seconds") is None
        protection = report[Component.PROTECTION]
        assert (protection.state, protection.summary) == (HealthState.HEALTHY, "no open positions")
        assert protection.measurements["active_positions"] == 0
        exchange = report[Component.EXCHANGE]
        assert exchange.state is HealthState.HEALTHY
        assert exchange.measurements["calls"] >= 2  # the start-up reconcile: positions and open orders
        assert exchange.measurements["p50_ms"] == pytest.approx(50.0)  # the sim's 50 ms per call
        assert "p50 50 ms" in exchange.summary
        # Not "healthy" while something is unmeasured.
        assert report.state is (
            HealthState.UNKNOWN if signals.state is HealthState.UNKNOWN else HealthState.HEALTHY
        )

        ids = await engine.store.insert_signals(
            [(SYMBOL, "long", None, None), ("ALLUSDT", "short", None, None)]
        )
        await drive_until(clock, lambda: _finished_signals(engine.store, ids), what="wave handled")  # type: ignore[arg-type]
        await drive_until(
            clock,
            lambda: (
                len(engine.manager.guards) == 2
                and all(
                    g.covered and g.status is PositionStatus.ACTIVE for g in engine.manager.guards.values()
                )
            ),
            what="both covered",
        )
        report = await engine.measure_health()
        protection = report[Component.PROTECTION]
        assert protection.state is HealthState.HEALTHY
        assert protection.reason == ""
        assert protection.summary.startswith("TS 100.0 % (2/2), SL 100.0 % (2/2), 0 uncovered")
        assert (
            protection.measurements["active_positions"],
            protection.measurements["protected_positions"],
        ) == (2, 2)
        assert protection.measurements["ts_coverage_percent"] == "100.0"
        assert report[Component.SIGNALS].state is HealthState.HEALTHY
        assert report.state is HealthState.HEALTHY
        coverage = await engine.store.coverage()  # the operators' SQL agrees with the gauge
        assert (coverage.active, coverage.coverage_pct) == (2, Decimal("100.0"))

        # The health loop writes every component, each with the measurement behind its state.
        started_rows = clock.now()
        await drive_until(clock, lambda: clock.now() - started_rows >= 2.5, what="a few health intervals")
        rows = {r["component"]: r for r in await db.pool.fetch("SELECT * FROM monitoring.health")}
        assert set(rows) == {c.value for c in Component}
        for row in rows.values():
            assert row["state"] == "healthy", row
            assert row["summary"]
            assert row["measurements"]
        assert rows["protection"]["measurements"]["protected_positions"] == 2
        assert rows["protection"]["summary"].startswith("TS 100.0 % (2/2)")
        assert rows["exchange"]["measurements"]["calls"] > 0
        assert rows["database"]["measurements"]["round_trip_ms"] is not None
        assert rows["price_feed"]["measurements"]["newest_mark_age_seconds"] is not None
    finally:
        await drive(clock, engine.stop())
        await follower
    changes = [e for e in seen if isinstance(e, HealthChanged)]
    assert changes, "the health loop published its states"
    alarms = [e for e in changes if e.state in ("degraded", "critical")]
    assert alarms == [], f"a calm run raised alarms: {alarms}"
    assert all(e.reason for e in changes if e.state != "healthy")
    # The health loop's first look: unknown if the consumer had not tried LISTEN yet, healthy if it listened
    # already (which one comes first is the event loop's order: a full run on two loaded cores saw the
    # consumer first). Never healthy unmeasured: then its summary would not say LISTEN is up.
    first_signals = next(e for e in changes if e.component == "signals")
    assert (first_signals.state, first_signals.summary) in (
        ("unknown", "not measured yet"),
        ("healthy", "no wave yet, LISTEN up"),
    ), first_signals
    assert _supervised_failures(caplog) == []


async def _open_then_break_protection(
    engine: Engine, clock: ManualClock, symbol: str, fault: FaultKind, count: int
) -> int:
    """Open a long (2 s per order call); once the entry has filled on the venue, and before its stops are
    sent, the next `count` order creations suffer `fault`. Returns the position id."""
    assert engine.store is not None
    assert engine.manager is not None
    assert isinstance(engine.venue, SimVenue)
    venue = engine.venue
    await engine.store.insert_signals([(symbol, "long", None, None)])
    await drive_until(
        clock, lambda: any(p.symbol == symbol for p in venue.core.positions(clock.now())), what="entry filled"
    )
    assert symbol not in engine.manager.by_symbol  # the entry's answer is still on its way
    venue.inject_fault(CallKind.CREATE_ORDER, fault, count)
    await drive_until(clock, lambda: symbol in engine.manager.by_symbol, what="position guarded")
    return engine.manager.by_symbol[symbol].position_id


async def test_f11_a_position_uncovered_past_grace_is_critical_with_the_coverage_as_the_reason(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """F11 (health that lies, the other way): the venue refuses every protective order. Within the grace
    period a wave being protected is no alarm; past it, protection is CRITICAL with the coverage figures
    as the reason ("Low TS coverage: 0.0% (0/1)"), the exchange shows the errors it measured, the health
    rows say so, and the alarm clears by itself once the position is covered."""
    engine, clock = await _started(db, {"HEALTH__INTERVAL_SECONDS": "1"}, create_order_seconds=2.0)
    try:
        assert engine.manager is not None
        position_id = await _open_then_break_protection(
            engine, clock, SYMBOL, FaultKind.NETWORK_ERROR_BEFORE_SEND, 10_000
        )
        early = (await engine.measure_health())[Component.PROTECTION]
        assert early.state is HealthState.HEALTHY, early  # protecting, within grace: not a fault
        assert early.measurements["uncovered_positions"] == 1
        assert early.measurements["uncovered_past_grace"] == 0

        await drive_until(clock, lambda: engine.manager.coverage().uncovered == 1, what="past grace")
        report = await engine.measure_health()
        protection = report[Component.PROTECTION]
        assert protection.state is HealthState.CRITICAL
        assert "Low TS coverage: 0.0% (0/1)" in protection.reason
        assert "Low SL coverage: 0.0% (0/1)" in protection.reason
        assert protection.measurements["uncovered_past_grace"] == 1
        exchange = report[Component.EXCHANGE]
        assert exchange.state in (HealthState.DEGRADED, HealthState.CRITICAL)
        assert exchange.measurements["error_rate"] > 0
        assert "Exchange errors" in exchange.reason

        # A minute later the age of the hole is part of the reason too.
        await drive_until(
            clock, lambda: (engine.manager.coverage().oldest_unprotected_seconds or 0) > 61, what="a minute"
        )
        protection = (await engine.measure_health())[Component.PROTECTION]
        assert "Position uncovered for 1m" in protection.reason
        await drive_until(
            clock,
            lambda: db.pool.fetchval(
                "SELECT state = 'critical' FROM monitoring.health WHERE component = 'protection'"
            ),
            what="health row written",
        )
        row = await db.pool.fetchrow("SELECT * FROM monitoring.health WHERE component = 'protection'")
        assert "Low TS coverage: 0.0% (0/1)" in row["reason"]
        assert row["measurements"]["uncovered_past_grace"] == 1

        # The venue recovers; the operator re-protects; the alarm clears, because its cause is gone.
        assert isinstance(engine.venue, SimVenue)
        engine.venue.clear_injected_faults()
        results = await drive(clock, engine.reprotect_uncovered())
        assert [(r.position_id, r.covered) for r in results] == [(position_id, True)]
        protection = (await engine.measure_health())[Component.PROTECTION]
        assert (protection.state, protection.reason) == (HealthState.HEALTHY, "")
    finally:
        await drive(clock, engine.stop())
    assert _supervised_failures(caplog) == []  # the health loop measured throughout, never crashed


# --- F12: invisible failures ---------------------------------------------------------------------------


def _loud(caplog: pytest.LogCaptureFixture, logger: str, *needles: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == logger and r.levelno >= logging.WARNING and all(n in r.getMessage() for n in needles)
    ]


async def test_f12_a_protective_order_that_keeps_failing_is_logged_recorded_and_published(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """F12 (invisible failures): the old bot logged exceptions at DEBUG under INFO and its event queue
    overflowed silently. A protective order that keeps failing is logged at WARNING or above with the
    symbol, recorded in `monitoring.events` (an HTTP 500: `protection_server_error`), and published to the
    dashboard as `ProtectionFailed` with its class."""
    caplog.set_level(logging.INFO)
    engine, clock = await _started(db, create_order_seconds=2.0)
    seen, follower = _collect(engine)
    try:
        position_id = await _open_then_break_protection(engine, clock, SYMBOL, FaultKind.SERVER_ERROR, 4)
        await drive_until(
            clock,
            lambda: db.pool.fetchval(
                "SELECT count(*) >= 2 FROM monitoring.events WHERE type = 'protection_server_error'"
            ),
            what="failures recorded",
        )
        # Said of a position neither of whose stops is live: "unprotected", or, while the other's send is
        # on its way, which it is ("uncovered (hard stop sent, not confirmed, …)": a loaded run).
        for what in ("stop-loss", "trailing stop"):
            said = _loud(caplog, "protection.manager", f"Server error creating {what} for {SYMBOL}")
            assert said, what
            assert any(
                f"{SYMBOL} unprotected" in r.getMessage() or f"{SYMBOL} uncovered (" in r.getMessage()
                for r in said
            ), [r.getMessage() for r in said]
        rows = await db.pool.fetch("SELECT * FROM monitoring.events WHERE type = 'protection_server_error'")
        assert all(
            (r["severity"], r["symbol"], r["position_id"]) == ("error", SYMBOL, position_id) for r in rows
        )
        failed = [e for e in seen if isinstance(e, ProtectionFailed)]
        assert {e.operation for e in failed} >= {"create stop-loss", "create trailing stop"}
        assert {e.failure_class for e in failed if e.operation.startswith("create")} == {"server_error"}
        assert all(e.symbol == SYMBOL and e.position_id == position_id for e in failed)
        assert all(e.retry_in_seconds is not None and e.retry_in_seconds > 0 for e in failed)
        # The faults run out: the retries (not a human) cover the position.
        assert engine.manager is not None
        await drive_until(
            clock, lambda: engine.manager.guards[position_id].covered, what="covered by retries"
        )
    finally:
        await drive(clock, engine.stop())
        await follower


async def test_f12_a_protective_order_timeout_is_logged_recorded_and_published(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """F12 on the incident's own failure, "Timeout creating trailing stop for SFPUSDT": the venue accepts
    the stops but the answers are lost, its reads show new stops only 12 s later, past the 10 s call
    budget, and its account stream is as late (whose NEW would otherwise settle them at once), so nothing
    can settle them before the calls time out. Each timeout is logged with the
    symbol, recorded as a `protection_timeout` event, published as `ProtectionTimedOut` (outcome
    "retrying": still unknown), and resolved by client order id once the venue shows the order (one order
    each on the venue, not a blind second one)."""
    caplog.set_level(logging.INFO)
    engine, clock = await _started(db, create_order_seconds=2.0, read_lag_seconds=12.0)
    seen, follower = _collect(engine)
    try:
        assert engine.manager is not None
        assert isinstance(engine.venue, SimVenue)
        engine.venue.delay_account_events(12.0)
        position_id = await _open_then_break_protection(
            engine, clock, SYMBOL, FaultKind.TIMEOUT_AFTER_ACCEPT, 2
        )
        guard = engine.manager.guards[position_id]
        await drive_until(clock, lambda: guard.covered, what="covered")
        assert _loud(caplog, "protection.manager", "Timeout creating stop-loss for " + SYMBOL)
        assert _loud(caplog, "protection.manager", "Timeout creating trailing stop for " + SYMBOL)
        await drive_until(
            clock,
            lambda: db.pool.fetchval(
                "SELECT count(*) = 2 FROM monitoring.events WHERE type = 'protection_timeout'"
            ),
            what="timeouts recorded",
        )
        rows = await db.pool.fetch("SELECT * FROM monitoring.events WHERE type = 'protection_timeout'")
        assert all(r["symbol"] == SYMBOL and r["severity"] in ("warning", "error") for r in rows)
        timed_out = [e for e in seen if isinstance(e, ProtectionTimedOut)]
        assert sorted(e.operation for e in timed_out) == ["create stop-loss", "create trailing stop"]
        assert all(e.symbol == SYMBOL and e.outcome == "retrying" for e in timed_out)
        assert engine.manager.timeouts.count(clock.monotonic(), 3600) == 2
        open_orders = await drive(clock, engine.venue.fetch_open_protective_orders(SYMBOL))
        assert sorted(o.type for o in open_orders) == [OrderType.STOP_MARKET, OrderType.TRAILING_STOP_MARKET]
    finally:
        await drive(clock, engine.stop())
        await follower


async def test_f12_a_stop_that_vanished_from_the_exchange_is_loud_and_replaced(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """F12 (and F4): someone cancels a position's stop-loss on the exchange. The position is unprotected
    until we notice; that must not be silent: the reconciler's listing misses it (a WARNING; the position
    uncovered at once), its look-up by id finds it cancelled, and that is logged at ERROR with the symbol,
    recorded as an event and published as `ProtectionFailed` — once (the listing's miss and the look-up's
    finding were a second ERROR, a second `protection_lost`, a second alert for one stop) — and the guard
    places a new stop (a new client id)."""
    caplog.set_level(logging.INFO)
    # The reconciler's path (the safety net): a venue without account stream, which would re-place the stop
    # before any pass (tests/integration/test_account_stream.py covers that path).
    engine, clock = await _started(db, {"VENUE__SIM__ACCOUNT_STREAM__ENABLED": "false"})
    seen, follower = _collect(engine)
    try:
        assert engine.manager is not None
        position_id = await _open(engine, clock, SYMBOL)
        guard = engine.manager.guards[position_id]
        old = guard.stop_loss.client_order_id
        assert old is not None
        await drive(clock, engine.venue.cancel_order(SYMBOL, old))  # by hand, on the exchange

        report = await drive(clock, engine.reconcile_now())
        assert report.reprotected == [SYMBOL]
        assert not guard.covered  # uncovered from the listing's miss, before any look-up
        assert _loud(caplog, "protection.reconciler", SYMBOL, old, "not in the venue's list of open orders")
        await drive_until(clock, lambda: guard.covered, what="re-protected")
        await drive(clock, clock.sleep(2.0))
        said = [r for r in caplog.records if old in r.getMessage() and r.levelno >= logging.ERROR]
        assert [(r.levelno, r.name) for r in said] == [(logging.ERROR, "protection.manager")]
        assert "was canceled on the venue, not by us" in said[0].getMessage()
        lost = await db.pool.fetch(
            "SELECT severity, message FROM monitoring.events WHERE type = 'protection_lost' AND symbol = $1",
            SYMBOL,
        )
        assert [(r["severity"], "canceled on the venue, not by us" in r["message"]) for r in lost] == [
            ("error", True)
        ]
        failed = [e for e in seen if isinstance(e, ProtectionFailed) and e.position_id == position_id]
        assert len(failed) == 1
        new = guard.stop_loss.client_order_id
        assert new is not None
        assert new != old
        stops = [
            o
            for o in await drive(clock, engine.venue.fetch_open_protective_orders(SYMBOL))
            if o.type is OrderType.STOP_MARKET
        ]
        assert [o.client_order_id for o in stops] == [new]
    finally:
        await drive(clock, engine.stop())
        await follower


async def test_f12_a_live_stop_a_listing_left_out_is_found_live_not_placed_twice(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """A listing of open orders that leaves a live stop out (a venue's glitch, or a read that lags past the
    one we count on) makes the position uncovered at once (nothing tells it from a stop cancelled by hand
    until the look-up); its look-up by id finds both stops live: confirmed again, nothing sent (no second
    stop beside the first), and no protection lost said: no ERROR, no `protection_lost` event, no
    `ProtectionFailed` (each was said for these two stops, which never left the venue)."""
    caplog.set_level(logging.INFO)
    engine, clock = await _started(db, {"VENUE__SIM__ACCOUNT_STREAM__ENABLED": "false"})
    seen, follower = _collect(engine)
    try:
        assert engine.manager is not None
        assert isinstance(engine.venue, SimVenue)
        position_id = await _open(engine, clock, SYMBOL)
        guard = engine.manager.guards[position_id]
        stops = {guard.stop_loss.client_order_id, guard.trailing_stop.client_order_id}
        await drive(clock, clock.sleep(10.0))  # (confirmed well before the listing: no read lag excuses it)
        sent = engine.venue.calls_made.get(CallKind.CREATE_ORDER, 0)
        engine.venue.answer_open_orders_empty(1)

        report = await drive(clock, engine.reconcile_now())
        assert report.reprotected == [SYMBOL, SYMBOL]  # (both of its stops)
        assert not guard.covered  # uncovered from the listing's miss, before any look-up
        assert guard.stop_loss_unverified  # not known gone: asked for by its id
        await drive_until(clock, lambda: guard.covered, what="confirmed again by its look-up")
        await drive(clock, clock.sleep(2.0))
        assert {guard.stop_loss.client_order_id, guard.trailing_stop.client_order_id} == stops
        assert engine.venue.calls_made.get(CallKind.CREATE_ORDER, 0) == sent
        held = [o for o in await drive(clock, engine.venue.fetch_open_protective_orders(SYMBOL))]
        assert {o.client_order_id for o in held} == stops
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        assert [e for e in seen if isinstance(e, ProtectionFailed)] == []
        found_live = [r for r in caplog.records if "found by its id" in r.getMessage()]
        assert len([r for r in found_live if "nothing lost" in r.getMessage()]) == 2
        missed = _loud(caplog, "protection.reconciler", SYMBOL, "not in the venue's list of open orders")
        assert [r.levelno for r in missed] == [logging.WARNING, logging.WARNING]
    finally:
        await drive(clock, engine.stop())
        await follower
    # (after the stop: its background event writes are done)
    assert (
        await db.pool.fetchval("SELECT count(*) FROM monitoring.events WHERE type = 'protection_lost'") == 0
    )


async def test_f12_a_slow_event_subscriber_is_told_how_many_events_it_missed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """F12 (the old bot's event queue overflowed and dropped events silently): a subscriber that falls
    behind never blocks the publisher, and instead of silent loss it receives `EventsDropped(count)` in
    place of what was dropped, then the newest events; the drop is logged at WARNING."""
    caplog.set_level(logging.INFO)
    bus = EventBus(per_subscriber_limit=3)
    stream = bus.subscribe()
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)  # subscribed, waiting
    assert bus.subscribers == 1
    for n in range(10):
        bus.publish(SignalRejected(at=float(n), signal_id=n, symbol=SYMBOL, reason="test"))
    received = [await first]
    for _ in range(3):
        received.append(await anext(stream))
    assert isinstance(received[0], EventsDropped)
    assert received[0].count == 7
    assert [e.signal_id for e in received[1:]] == [7, 8, 9]  # type: ignore[attr-defined]
    assert received[0].count + 3 == bus.published  # every event is accounted for
    assert any(r.levelno == logging.WARNING and "7 events dropped" in r.getMessage() for r in caplog.records)
    # Keeping up afterwards: nothing more is dropped.
    bus.publish(SignalRejected(at=10.0, signal_id=10, symbol=SYMBOL, reason="test"))
    following = await anext(stream)
    assert not isinstance(following, EventsDropped)
    assert following.signal_id == 10
    bus.close()
    with pytest.raises(StopAsyncIteration):
        await anext(stream)

"""An engine stopped in the middle of a managed trailing stop's move, and started again (a new engine on the
same venue account and database).

A managed move is make-before-break: the new stop generation is placed, and only once the venue confirms
it is the old one cancelled and the move recorded. Here the venue takes 2 s to answer a create (it places
the order after 1 s), and engine A stops — cleanly (`engine.stop()`) or as a crash would (`drain=False`) —
while the new stop is live on the venue and its answer has not arrived, or before the venue has it at all.
Engine B must resolve the move against the venue: adopt the new stop if it is live (and then cancel the
old one), fall back to the old one if the new never arrived, and in every case keep the trail's peak, so
that the stop is never looser than the one the trail had decided on.

The oracle is the venue's truth, read at every drive step from the sim core (no read lag, no ban): our
live trailing stops on the symbol, their prices; and the invariant auditor on top (coverage, duplicates,
orphans, database against venue).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal

import asyncpg
import pytest

from engine.clock import ManualClock
from engine.config import Settings
from engine.exchange.port import Order
from engine.venues.sim import SimVenue
from engine.venues.sim.settings import CallKind, FaultKind
from protection.manager import PositionGuard, StuckTriggerCheck
from protection.order_ids import parse_client_order_id
from protection.trailing import TrailingPhase
from storage.database import Database
from storage.repositories import OrderPurpose
from tests.chaos.support import STEP, ChaosRun, chaos_settings
from tests.integration.engine_support import make_engine

# The venue places a create after 1 s and answers it after 2 s: a window in which the new stop is live and
# the engine does not know it yet.
MANAGED_SLOW_CREATES = {
    "PROTECTION__TRAILING__MODE": "managed",
    "VENUE__SIM__LATENCY__BY_CALL__CREATE_ORDER__SECONDS": "2.0",
}
DOWNTIME_SECONDS = 3.0
# A position closed by the operator some 4.5–7 s after its entry (sooner when the account stream's NEW
# confirms the move before its answer), of which its opening (the entry's fill until both stops are
# confirmed) is about 1.2 s: the only time it is uncovered.
CLOSED_EARLY_COVERAGE = 70.0


def live_trailing_stops(run: ChaosRun, symbol: str) -> list[Order]:
    """Our live trailing stops on `symbol`, as the venue holds them at this instant (oracle view)."""
    token = run.auditor.token
    assert token is not None
    return [
        o
        for o in run.venue.core.inspect(run.clock.now()).open_conditional
        if o.symbol == symbol
        and (key := parse_client_order_id(o.client_order_id, token)) is not None
        and key.purpose is OrderPurpose.TRAILING_STOP
    ]


def generation(run: ChaosRun, order: Order) -> int:
    assert run.auditor.token is not None
    key = parse_client_order_id(order.client_order_id, run.auditor.token)
    assert key is not None
    return key.generation


class StopWatch:
    """Checks the venue's truth for one long position's trailing stop at every step: never a moment
    without one once the first is live, and the best live one never looser than `floor` (the tightest stop
    the venue has been seen to hold since the move was sent, or the one the trail decided on)."""

    def __init__(self, run: ChaosRun, symbol: str) -> None:
        self.run = run
        self.symbol = symbol
        self.floor: Decimal | None = None
        self.most_live = 0
        self.samples = 0
        self.allow_none = False  # before the trail's first stop, or while the test has taken them away

    def check(self) -> None:
        live = live_trailing_stops(self.run, self.symbol)
        self.samples += 1
        self.most_live = max(self.most_live, len(live))
        if not live and self.allow_none:
            return
        assert live, f"{self.symbol}: no trailing stop of ours on the venue"
        best = max(o.stop_price for o in live if o.stop_price is not None)
        if self.floor is not None:
            assert best >= self.floor, (
                f"{self.symbol}: the venue's tightest trailing stop is {best}, looser than {self.floor} "
                f"(live: {[(o.client_order_id, o.stop_price) for o in live]})"
            )

    async def step(self) -> None:
        await self.run.step()
        self.check()

    async def until(self, condition, *, limit: float, what: str) -> None:  # type: ignore[no-untyped-def]
        elapsed = 0.0
        while not condition():
            assert elapsed < limit, f"{what}: not reached after {limit:g} virtual seconds"
            await self.step()
            elapsed += 0.2


@dataclasses.dataclass
class MoveInFlight:
    """Engine A's position, its trail's stop before the move (None: the move is the first placement), the
    peak that decided the move, the stop it decided on, and the new stop if the venue had placed it."""

    symbol: str
    position_id: int
    entry_price: Decimal
    old: Order | None
    peak: Decimal
    wanted: Decimal
    new: Order | None
    watch: StopWatch


async def a_move_in_flight(
    run: ChaosRun,
    *,
    placed: bool,
    first_stop: bool = False,
    before: Callable[[], Awaitable[None] | None] | None = None,
) -> MoveInFlight:
    """Open a long, let its managed trail place its first stop (unless `first_stop`: that placement is the
    move), then push the mark to a new peak and drive until the move's new stop is live on the venue
    (`placed`) or only just sent (the venue places a create after 1 s)."""
    symbol = await run.one_protected_position(sides=["long"])
    manager = run.engine.manager
    assert manager is not None
    guard = manager.by_symbol[symbol]
    market = run.engine.markets[symbol]
    watch = StopWatch(run, symbol)
    old = None
    if not first_stop:
        run.venue.override_mark_price(symbol, market.round_price(guard.entry_price * Decimal("1.02")))
        await run.until(
            lambda: (
                guard.trail is not None
                and guard.trail.phase is TrailingPhase.ACTIVE
                and guard.pending_move is None
                and guard.trailing_stop.confirmed
                and len(live_trailing_stops(run, symbol)) == 1
            ),
            what="the first trailing stop",
        )
        await run.until(
            lambda: db_trail_state(run, guard.position_id, "active"), what="the first trailing stop recorded"
        )
        (old,) = live_trailing_stops(run, symbol)
        watch.check()
    else:
        watch.allow_none = True  # no trailing stop yet: the hard stop protects until the trail activates

    # The move: a new peak; the engine sends the new stop, the venue places it after 1 s.
    if before is not None and (preparing := before()) is not None:
        await preparing
    peak = market.round_price(guard.entry_price * Decimal("1.04"))
    run.venue.override_mark_price(symbol, peak)
    assert guard.trail is not None
    wanted = guard.trail.params.trail_price(peak)
    assert old is None or wanted > old.stop_price
    new = None
    if placed:
        before = 0 if old is None else 1
        # (Up to 20 s: after a `before` that got the account banned for 10 s, the move waits for the ban's
        # end and takes its 1 s on top; a CI saw it live 10.2 s after the peak.)
        await watch.until(
            lambda: len(live_trailing_stops(run, symbol)) == before + 1, limit=20, what="the new stop live"
        )
        new = max(live_trailing_stops(run, symbol), key=lambda o: generation(run, o))
        assert new.stop_price == wanted
        watch.floor = new.stop_price  # the venue holds it: protection may never fall below it again
        watch.allow_none = False
    else:
        await watch.until(
            lambda: guard.trail is not None and guard.trail.phase is TrailingPhase.MOVING,
            limit=10,
            what="the move decided",
        )
        await watch.step()  # sent (0.2 s of the 1 s it takes the venue to place it)
        assert len(live_trailing_stops(run, symbol)) == (0 if old is None else 1)
    return MoveInFlight(symbol, guard.position_id, guard.entry_price, old, peak, wanted, new, watch)


async def db_trail_state(run: ChaosRun, position_id: int, state: str) -> bool:
    assert run.db is not None
    return bool(
        await run.db.pool.fetchval(
            "SELECT state = $2 FROM monitoring.trailing_stop_state WHERE position_id = $1", position_id, state
        )
    )


def guard_of(run: ChaosRun, move: MoveInFlight) -> PositionGuard:
    manager = run.engine.manager
    assert manager is not None
    return manager.guards[move.position_id]


async def restarted(
    run: ChaosRun, settings: Settings, move: MoveInFlight, *, drain: bool, meanwhile: Callable[[], None]
) -> None:
    """Engine A stops (cleanly, or as a crash would: `drain=False`) before the create's answer arrives;
    `meanwhile` changes the venue while no engine runs; then engine B starts on the same account and
    database (its start waits for every guard's first pass, which may close the position)."""
    run.auditor.engine_up(False)
    await run.drive(run.engine.stop(drain=drain))
    move.watch.check()
    meanwhile()
    for _ in range(round(DOWNTIME_SECONDS / 0.2)):
        await move.watch.step()
    run.venue = SimVenue(settings.venue.sim, clock=run.clock, core=run.venue.core)
    run.engine = make_engine(settings, run.clock, run.venue)
    await run.drive(run.engine.start())
    run.auditor.engine_up(True)
    move.watch.check()


async def restart(
    run: ChaosRun, settings: Settings, move: MoveInFlight, *, drain: bool, meanwhile: Callable[[], None]
) -> PositionGuard:
    """`restarted`, for a position engine B guards: returns B's guard of it."""
    await restarted(run, settings, move, drain=drain, meanwhile=meanwhile)
    return guard_of(run, move)


def set_mark(run: ChaosRun, move: MoveInFlight, factor: str) -> None:
    market = run.engine.markets[move.symbol]
    run.venue.override_mark_price(move.symbol, market.round_price(move.entry_price * Decimal(factor)))


async def settles_at_the_trails_stop(
    run: ChaosRun,
    settings: Settings,
    move: MoveInFlight,
    guard: PositionGuard,
    *,
    within: float | None = None,
) -> Order:
    """Within the grace period: one trailing stop of ours, at the price the trail decided on, which the
    engine, the database and the venue all name; and so through a full reconcile interval (the reconciler
    finds nothing stale). Returns the live stop."""
    symbol, wanted = move.symbol, move.wanted

    def settled() -> bool:
        live = live_trailing_stops(run, symbol)
        return (
            len(live) == 1
            and live[0].stop_price == wanted
            and guard.trail is not None
            and guard.trail.phase is TrailingPhase.ACTIVE
            and guard.trail.stop_price == wanted
            and guard.trailing_stop.confirmed
            and guard.trailing_stop.client_order_id == live[0].client_order_id
        )

    # (A move the venue never had is made again by B: until then the old stop protects.)
    limit = float(settings.protection.grace_seconds) if within is None else within
    await move.watch.until(settled, limit=limit, what="one stop, at the trail's")
    move.watch.floor = wanted
    (live,) = live_trailing_stops(run, symbol)
    assert run.db is not None
    db = run.db

    async def recorded() -> asyncpg.Record:
        return await db.pool.fetchrow(
            "SELECT * FROM monitoring.trailing_stop_state WHERE position_id = $1", move.position_id
        )

    # The trail's record is written just after the memory the venue agrees with (a loaded clean-clone run
    # read "moving" the moment the move settled): given time to land. A write is real I/O while the steps
    # are virtual time: loaded CIs still read "moving" after five steps (CI 254), and after 25 steps with
    # 50 ms of real time each (CI 260). Real time first, up to 20 s of it, and a virtual step only every
    # tenth look (virtual time running on faster than the database is what a loaded machine does to it).
    row = await recorded()
    for look in range(400):
        if row["state"] == "active" and row["current_stop_price"] == wanted:
            break
        if look % 10 == 9:
            await move.watch.step()
        await asyncio.sleep(0.05)
        row = await recorded()
    assert row["state"] == "active"
    assert row["peak_price"] >= move.peak
    assert row["current_stop_price"] == wanted
    assert row["stop_order_client_id"] == live.client_order_id
    for _ in range(round((float(settings.protection.reconcile_seconds) + 2) / 0.2)):
        await move.watch.step()
    assert live_trailing_stops(run, symbol) == [live]
    assert move.watch.most_live <= 2
    return live


async def closed_leaving_no_trailing_stop(run: ChaosRun, move: MoveInFlight) -> None:
    """The operator closes the position mid-move: the close answers, the venue holds no position, and
    (the cancels going out with the close's end, a round trip later) no trailing stop of ours. One whose
    cancel the venue could not do yet (its read lag, a loaded CI 234 run) is cancelled again within the
    grace period, its symbol held meanwhile: never live on a symbol free for the next position."""
    assert await run.drive(run.engine.close_position(move.position_id), limit=10.0)
    assert move.symbol not in run.held()
    await run.step()
    manager = run.engine.manager
    assert manager is not None
    grace = float(run.engine.settings.protection.grace_seconds)
    waited = 0.0
    while live_trailing_stops(run, move.symbol):
        # Held while the closed position's guard finishes (its cancels go out with its end: on a loaded
        # machine, a virtual step after the close's answer, CI 262) or while its leftovers are swept: an
        # entry on the symbol waits for both.
        held = move.symbol in manager.by_symbol or move.symbol in manager.leftovers
        assert held, "a trailing stop of ours outlived the close, its symbol free"
        assert waited < grace, "a trailing stop of ours outlived the close by the grace period"
        await run.step()
        waited += STEP


def chaos_run(
    db: Database, overrides: dict[str, str] | None = None, *, clock: ManualClock | None = None
) -> tuple[ChaosRun, Settings]:
    settings = chaos_settings(db, {**MANAGED_SLOW_CREATES, **(overrides or {})})
    run = ChaosRun(db, settings, clock=clock)
    # Make-before-break has both stops live for a move's round trips, and a stop mid-move leaves both live
    # until the next engine resolves them: the auditor allows that overlap (the downtime and a restart);
    # the tests hold the restarted engine to one stop within the grace period.
    # Before its activation a managed trail has no order: the auditor asks for the hard stop only, and the
    # `StopWatch` asks for a trailing stop at every step once the trail has placed one.
    run.auditor.limits = dataclasses.replace(
        run.auditor.limits, duplicate_overlap_seconds=20.0, trailing_order_required=False
    )
    return run, settings


@pytest.mark.parametrize(
    ("drain", "placed", "first_stop"),
    [
        pytest.param(True, True, False, id="clean-stop-new-stop-live"),
        pytest.param(False, True, False, id="crash-new-stop-live"),
        pytest.param(False, False, False, id="crash-before-the-venue-has-it"),
        pytest.param(False, True, True, id="crash-first-stop-live"),
    ],
)
async def test_an_engine_stopped_mid_move_resolves_the_move_on_restart(
    db: Database, drain: bool, placed: bool, first_stop: bool
) -> None:
    run, settings = chaos_run(db)
    await run.start()
    try:
        move = await a_move_in_flight(run, placed=placed, first_stop=first_stop)
        # While no engine runs the mark falls back a little (below the peak, above the new stop): the
        # restarted engine can only know the peak from what A recorded.
        guard = await restart(
            run, settings, move, drain=drain, meanwhile=lambda: set_mark(run, move, "1.038")
        )
        assert guard.trail is not None
        assert guard.trail.peak_price is not None
        assert guard.trail.peak_price >= move.peak, (
            f"the restored trail lost its peak: {guard.trail.peak_price} < {move.peak}"
        )
        live = await settles_at_the_trails_stop(run, settings, move, guard)
        if move.new is not None:  # the live new stop was adopted, not replaced by another generation
            assert live.client_order_id == move.new.client_order_id
        await run.settle()
        run.verdict(coverage_at_least=85.0)  # the opening takes two 2 s round trips
    finally:
        await run.stop()


async def test_a_move_whose_new_stop_filled_while_no_engine_ran_closes_with_that_fill(db: Database) -> None:
    """Killed mid-move, the new stop live; while no engine runs the mark falls through it (not through the
    old one) and the venue fills it. The restarted engine closed the position `closed_on_exchange` with
    no PnL when the new stop could not be read yet (Binance's read lag after its placement, 5 s): r72 on
    the Binance wire, a trailing stop's profit recorded as a close nobody explains. A stop of ours not
    readable yet proves nothing: the position is closed once it can be read, with its fill."""
    run, settings = chaos_run(db)
    run.venue.set_read_lag(5.0)
    await run.start()
    try:
        # Another position on the account: the venue's list is not empty (an empty one right after a start
        # proves nothing, and is asked again).
        other = await run.one_protected_position(sides=["short"])
        # (The account stream late, as the reviewer's was: the move's new stop is known by its answer only.)
        move = await a_move_in_flight(run, placed=True, before=lambda: run.venue.delay_account_events(8.0))
        assert move.symbol != other
        assert move.old is not None
        assert move.new is not None
        old, new = move.old.stop_price, move.new.stop_price
        assert old is not None
        assert new is not None
        market = run.engine.markets[move.symbol]
        through = market.round_price((old + new) / 2)

        def through_the_new_stop() -> None:
            move.watch.allow_none, move.watch.floor = True, None  # (the position ends: no stop is wanted)
            run.venue.override_mark_price(move.symbol, through)

        await restarted(run, settings, move, drain=False, meanwhile=through_the_new_stop)
        assert move.symbol not in run.held()
        assert run.db is not None
        pool = run.db.pool

        async def settled() -> bool:  # (closed at once; its record settled once the stop can be read)
            reason = await pool.fetchval(
                "SELECT exit_reason FROM monitoring.positions WHERE id = $1", move.position_id
            )
            return bool(reason == "trailing_stop")

        for _ in range(round(20 / 0.2)):
            if await settled():
                break
            await run.step()
        row = await pool.fetchrow("SELECT * FROM monitoring.positions WHERE id = $1", move.position_id)
        assert row["status"] == "closed"
        assert row["exit_reason"] == "trailing_stop", dict(row)
        assert row["realized_pnl"] is not None
        assert row["realized_pnl"] > 0  # (the new stop lies above the entry)
    finally:
        await run.stop()


async def test_a_move_left_in_flight_whose_old_stop_was_cancelled_meanwhile_is_adopted(db: Database) -> None:
    """While no engine runs, someone cancels the old stop on the venue: the new one, live, is adopted as it
    is — nothing is placed again, and the position is never without a trailing stop."""
    run, settings = chaos_run(db)
    await run.start()
    try:
        move = await a_move_in_flight(run, placed=True)
        assert move.old is not None
        old = move.old
        guard = await restart(
            run,
            settings,
            move,
            drain=False,
            meanwhile=lambda: run.venue.core.cancel_order(move.symbol, old.client_order_id, run.clock.now()),
        )
        live = await settles_at_the_trails_stop(run, settings, move, guard)
        assert move.new is not None
        assert live.client_order_id == move.new.client_order_id
        await run.settle()
        run.verdict(coverage_at_least=85.0)
    finally:
        await run.stop()


async def test_a_move_left_in_flight_with_both_stops_gone_is_placed_again(db: Database) -> None:
    """While no engine runs, both trailing stops are cancelled on the venue: engine B places the trail's
    stop again within the grace period of its start, and trails on to the stop its peak gives."""
    run, settings = chaos_run(db)
    await run.start()
    try:
        move = await a_move_in_flight(run, placed=True)

        def cancel_both() -> None:
            for order in live_trailing_stops(run, move.symbol):
                run.venue.core.cancel_order(move.symbol, order.client_order_id, run.clock.now())
            move.watch.allow_none, move.watch.floor = True, None  # taken away by hand while no engine runs

        guard = await restart(run, settings, move, drain=False, meanwhile=cancel_both)
        move.watch.allow_none = False
        await settles_at_the_trails_stop(run, settings, move, guard)
        await run.settle()
        run.verdict(coverage_at_least=0.0)  # no stop while no engine ran: the test took them away
    finally:
        await run.stop()


async def test_a_move_left_in_flight_with_both_stops_gone_and_the_mark_through_them_closes(
    db: Database,
) -> None:
    """While no engine runs, both trailing stops are cancelled on the venue and the mark falls through the
    trail's stop (not the hard stop's): a stop there would trigger at once, so engine B closes the position
    reduce-only at market, within the grace period of its start, and leaves no stop of ours behind."""
    run, settings = chaos_run(db)
    await run.start()
    try:
        move = await a_move_in_flight(run, placed=True)

        def cancel_both_then_fall() -> None:
            for order in live_trailing_stops(run, move.symbol):
                run.venue.core.cancel_order(move.symbol, order.client_order_id, run.clock.now())
            move.watch.allow_none, move.watch.floor = True, None
            set_mark(run, move, "1.005")

        await restarted(run, settings, move, drain=False, meanwhile=cancel_both_then_fall)
        await run.until(
            lambda: move.symbol not in run.held(),
            limit=float(settings.protection.grace_seconds),
            what="the position closed at market",
        )
        assert run.db is not None
        await run.until(
            lambda: run.db.pool.fetchval(
                "SELECT status = 'closed' FROM monitoring.positions WHERE id = $1", move.position_id
            ),
            limit=float(settings.protection.grace_seconds),
            what="the position recorded closed",
        )
        row = await run.db.pool.fetchrow(
            "SELECT status, exit_reason FROM monitoring.positions WHERE id = $1", move.position_id
        )
        assert row["exit_reason"] == "stop_breached"  # closed by the engine: no trailing stop fired (r79)
        await run.settle()
        run.verdict(coverage_at_least=0.0)
        token = run.auditor.token
        assert not [
            o
            for o in run.venue.core.inspect(run.clock.now()).open_conditional
            if o.symbol == move.symbol and parse_client_order_id(o.client_order_id, token or "") is not None
        ]
    finally:
        await run.stop()


async def test_a_clean_stop_lets_a_move_in_flight_finish(db: Database) -> None:
    """Before a clean stop the protection manager lets the managed moves already sent finish
    (`finish_moves`, bounded by the call budget): the new stop is confirmed and recorded and the old one
    cancelled before the engine goes, so no engine leaves two trailing stops behind; no new move is sent
    meanwhile. The next engine restores that one stop and sends nothing."""
    run, settings = chaos_run(db)
    run.auditor.limits = dataclasses.replace(run.auditor.limits, duplicate_overlap_seconds=0.0)
    # (a move's make-before-break overlap is judged here by the test itself, below)
    await run.start()
    try:
        move = await a_move_in_flight(run, placed=True)
        assert move.new is not None
        manager = run.engine.manager
        assert manager is not None
        left = await run.drive(manager.finish_moves(float(settings.protection.call_timeout_seconds)))
        assert left == 0
        assert [o.client_order_id for o in live_trailing_stops(run, move.symbol)] == [
            move.new.client_order_id
        ]
        # A new peak now decides no move: the engine is stopping.
        set_mark(run, move, "1.06")
        for _ in range(10):
            await move.watch.step()
        assert [o.client_order_id for o in live_trailing_stops(run, move.symbol)] == [
            move.new.client_order_id
        ]
        assert await db_trail_state(run, move.position_id, "active")

        def one_stop_meanwhile() -> None:
            move.watch.most_live = 0  # from here on: one trailing stop, never two

        guard = await restart(run, settings, move, drain=True, meanwhile=one_stop_meanwhile)
        assert move.watch.most_live == 1
        assert guard.trailing_stop.client_order_id == move.new.client_order_id
        assert guard.trail is not None
        assert guard.trail.stop_price == move.wanted
    finally:
        await run.stop()


async def test_the_engine_s_clean_stop_finishes_a_move_in_flight(db: Database) -> None:
    """`Engine.stop()` itself (the operator's quit, SIGTERM) lets a managed move already sent finish
    before the engine goes: afterwards the venue holds exactly the new trailing stop and the database
    names it, with the trail `active` (it used to go with both stops live and the trail's record stale)."""
    run, _settings = chaos_run(db)
    run.auditor.limits = dataclasses.replace(run.auditor.limits, duplicate_overlap_seconds=0.0)
    await run.start()
    try:
        move = await a_move_in_flight(run, placed=True)
        assert move.new is not None
        run.auditor.engine_up(False)
        await run.drive(run.engine.stop())
        assert [o.client_order_id for o in live_trailing_stops(run, move.symbol)] == [
            move.new.client_order_id
        ]
        assert await db_trail_state(run, move.position_id, "active")
    finally:
        await run.stop()


async def test_a_protection_restart_mid_move_adopts_the_live_new_stop(db: Database) -> None:
    """The operator restarts the protection manager (`R`) while a move's new stop is live and unanswered:
    the new manager restores the trail from the database (written ahead as `moving`) and adopts that stop,
    as a restarted engine does; the venue's stop never falls back to the old one."""
    run, settings = chaos_run(db)
    await run.start()
    try:
        move = await a_move_in_flight(run, placed=True)
        assert move.new is not None
        report = await run.drive(run.engine.restart_protection())
        assert report.failed == 0, report.describe()
        guard = guard_of(run, move)
        assert guard.trail is not None
        assert guard.trail.peak_price is not None
        assert guard.trail.peak_price >= move.peak
        live = await settles_at_the_trails_stop(run, settings, move, guard)
        assert live.client_order_id == move.new.client_order_id
        await run.settle()
        run.verdict(coverage_at_least=85.0)
    finally:
        await run.stop()


async def test_a_close_while_a_move_is_in_flight_cancels_the_moves_new_stop(db: Database) -> None:
    """The operator closes the position while a move's new stop is live on the venue and its answer has
    not come: the close interrupts the guard's pass, and the new stop, which the venue holds, goes with the
    position. It used to be forgotten by the interrupted pass and left live on the flat symbol until a
    reconcile pass found it (a reduce-only stop the next position on that symbol would meet)."""
    run, _settings = chaos_run(db)
    await run.start()
    try:
        move = await a_move_in_flight(run, placed=True)
        assert move.new is not None
        await closed_leaving_no_trailing_stop(run, move)
        await run.settle()
        run.verdict(coverage_at_least=CLOSED_EARLY_COVERAGE)
    finally:
        await run.stop()


async def test_a_command_that_interrupts_a_move_in_flight_does_not_send_a_second_new_stop(
    db: Database,
) -> None:
    """An urgent command (a fired stop's check) interrupts the guard's pass while a move's new stop is
    live on the venue and unanswered: the next pass resolves that stop by its id and adopts it. It used to
    forget it and send the same move again under the next generation, so three trailing stops of ours were
    live at once and the first new one was cancelled later as an orphan."""
    run, settings = chaos_run(db)
    await run.start()
    try:
        move = await a_move_in_flight(run, placed=True)
        assert move.new is not None
        guard = guard_of(run, move)
        checked = guard.submit(StuckTriggerCheck())
        await move.watch.until(checked.done, limit=5, what="the check applied")
        live = await settles_at_the_trails_stop(run, settings, move, guard)
        assert live.client_order_id == move.new.client_order_id
        await run.settle()
        run.verdict(coverage_at_least=85.0)
    finally:
        await run.stop()


async def test_a_close_while_a_moves_old_stop_is_being_cancelled_cancels_it(db: Database) -> None:
    """The operator closes the position right after a move's new stop is confirmed, while the old stop's
    cancel is on its way (the venue takes 2 s to answer a cancel, 1 s to act on it): neither stop of ours
    is left live once the close has answered. The old one used to be dropped with the interrupted cancel
    and left live on the flat symbol until a reconcile pass found it."""
    run, _settings = chaos_run(db, {"VENUE__SIM__LATENCY__BY_CALL__CANCEL_ORDER__SECONDS": "2.0"})
    await run.start()
    try:
        move = await a_move_in_flight(run, placed=True)
        assert move.new is not None
        assert move.old is not None
        guard = guard_of(run, move)
        new_id = move.new.client_order_id
        await move.watch.until(
            lambda: guard.trailing_stop.client_order_id == new_id, limit=5, what="the new stop confirmed"
        )
        assert move.old in live_trailing_stops(run, move.symbol)  # its cancel has not reached the venue
        await closed_leaving_no_trailing_stop(run, move)
        await run.settle()
        run.verdict(coverage_at_least=CLOSED_EARLY_COVERAGE)
    finally:
        await run.stop()


async def test_a_move_whose_answer_is_lost_inside_the_read_lag_is_resolved_not_made_again(
    db: Database,
) -> None:
    """The move's new stop is placed by the venue, its answer lost (the client gives up after 3 s), and the
    venue's reads lag its writes by 5 s: the move's outcome stays unknown for seconds. It is resolved by
    its id, the trail `moving` meanwhile, and the live new stop adopted. It used to be given up at once:
    the old stop kept as the trail's, the next mark made the same move again under the next generation,
    and three trailing stops of ours were live (the first new one until a reconcile pass found it)."""
    run, settings = chaos_run(db)
    run.venue.set_read_lag(5.0)
    await run.start()
    try:

        def answer_lost() -> None:
            run.venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.TIMEOUT_AFTER_ACCEPT, stops_only=True)

        move = await a_move_in_flight(run, placed=True, before=answer_lost)
        assert move.new is not None
        guard = guard_of(run, move)
        # Adopted once the venue shows it: its read lag after it was placed, and the old one's cancel.
        live = await settles_at_the_trails_stop(run, settings, move, guard, within=8.0)
        assert live.client_order_id == move.new.client_order_id
        await run.settle()
        run.verdict(coverage_at_least=85.0)
    finally:
        await run.stop()


async def test_a_crashed_engines_move_that_waited_for_order_budget_is_adopted_not_made_again(
    db: Database,
) -> None:
    """A move is written ahead, then waits for room in the venue's order window, and only then goes out;
    the engine dies before its answer. The next engine knew of its send only the record's time, seconds
    before the send: with the venue's reads lagging 5 s, "not found" came past that window while the new
    stop was live but not shown yet. The move was abandoned (its record `canceled` while live), made
    again under the next generation, and the first new stop cancelled later as a duplicate. The send can
    have left no later than the crash, before the new engine began: its absence is proven only a read lag
    after that."""
    # The engine's clock on the database's, from now: an order's record is dated by the database, and its
    # age read against the engine's clock (on the default test clock, years apart, a record is never old).
    run, settings = chaos_run(
        db,
        {"VENUE__SIM__RATE_LIMITS__BAN_AFTER_VIOLATIONS": "1", "VENUE__SIM__RATE_LIMITS__BAN_SECONDS": "10"},
        clock=ManualClock(start=time.time()),
    )
    run.venue.set_read_lag(5.0)
    await run.start()
    try:
        decided: list[float] = []

        async def window_held() -> None:
            # Another client of the account fills the order window; an entry of ours meets its 429, and
            # the venue bans the account for 10 s, past the window: every order of ours waits for its end.
            await run.a_window_starts()
            spare, lone = run.free_symbols(2)
            assert run.neighbour_fills_order_window(spare) > 0
            await run.wave(1, symbols=[lone])
            assert (await run.until_signal_ends(lone)).startswith("rejected: entry refused: banned")
            decided.append(run.clock.now())

        move = await a_move_in_flight(run, placed=True, before=window_held)
        assert move.new is not None
        assert move.new.created_at - decided[0] > 4.0  # written ahead, it waited for the window, then went
        assert run.db is not None
        guard = await restart(
            run, settings, move, drain=False, meanwhile=lambda: set_mark(run, move, "1.038")
        )
        live = await settles_at_the_trails_stop(run, settings, move, guard, within=10.0)
        assert live.client_order_id == move.new.client_order_id
        status = await run.db.pool.fetchval(
            "SELECT status FROM monitoring.orders WHERE client_order_id = $1", move.new.client_order_id
        )
        assert status == "open"
        assert move.watch.most_live <= 2
        await run.settle()
        run.verdict(coverage_at_least=80.0)
    finally:
        await run.stop()


async def test_a_managed_stop_sent_again_through_the_mark_closes_the_position_at_once(db: Database) -> None:
    """Someone cancels the managed trail's stop; its re-placement is lost on its way (nothing placed) while
    the venue's reads lag its writes by 5 s, and the mark falls through the trail's stop meanwhile. Sent
    again with its id inside the lag, it would trigger at once (-2021): the position is closed at market
    then, as for the hard stop. It used to wait out the rest of the lag, send a third time, be refused
    again, and only then close, the price through the trail's stop all along."""
    run, _settings = chaos_run(db)
    run.venue.set_read_lag(5.0)
    await run.start()
    try:
        move = await a_move_in_flight(run, placed=True)
        assert move.new is not None
        guard = guard_of(run, move)
        await move.watch.until(
            lambda: (
                guard.trailing_stop.client_order_id == move.new.client_order_id  # type: ignore[union-attr]
                and not guard.move_in_flight
            ),
            limit=10,
            what="the move settled",
        )
        for _ in range(28):  # past the read lag: the venue can find the stop to cancel it by hand
            await move.watch.step()
        move.watch.allow_none = True  # (the test takes the trail's stop away)
        move.watch.floor = None
        run.venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.TIMEOUT_NOT_EXECUTED, stops_only=True)
        run.venue.core.cancel_order(move.symbol, move.new.client_order_id, run.clock.now())  # by hand
        cancelled_at = run.clock.monotonic()
        set_mark(run, move, "1.03")  # below the trail's stop (the move's), above the hard stop
        await run.until(lambda: move.symbol not in run.held(), limit=15, what="the position closed")
        # The client gives up on the re-placement after 3 s; then a look-up, the send again refused (2 s,
        # as every create here), the close (2 s): ~7.2 s. Waiting out the lag first took ~10 s.
        assert run.clock.monotonic() - cancelled_at < 8.5
        await run.settle()
        run.verdict(coverage_at_least=0.0)
    finally:
        await run.stop()

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

import dataclasses
from decimal import Decimal

import pytest

from engine.exchange.port import Order
from engine.venues.sim import SimVenue
from protection.order_ids import parse_client_order_id
from protection.trailing import TrailingPhase
from storage.database import Database
from storage.repositories import OrderPurpose
from tests.chaos.support import ChaosRun, chaos_settings
from tests.integration.engine_support import make_engine

# The venue places a create after 1 s and answers it after 2 s: a window in which the new stop is live and
# the engine does not know it yet.
MANAGED_SLOW_CREATES = {
    "PROTECTION__TRAILING__MODE": "managed",
    "VENUE__SIM__LATENCY__BY_CALL__CREATE_ORDER__SECONDS": "2.0",
}
DOWNTIME_SECONDS = 3.0


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

    def check(self) -> None:
        live = live_trailing_stops(self.run, self.symbol)
        self.samples += 1
        self.most_live = max(self.most_live, len(live))
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


@pytest.mark.parametrize(
    ("drain", "placed"),
    [
        pytest.param(True, True, id="clean-stop-new-stop-live"),
        pytest.param(False, True, id="crash-new-stop-live"),
        pytest.param(False, False, id="crash-before-the-venue-has-it"),
    ],
)
async def test_an_engine_stopped_mid_move_resolves_the_move_on_restart(
    db: Database, drain: bool, placed: bool
) -> None:
    settings = chaos_settings(db, MANAGED_SLOW_CREATES)
    run = ChaosRun(db, settings)
    # Make-before-break has both stops live for a move's round trips, and a crash leaves both live until
    # the next engine resolves them: the auditor allows that overlap (the downtime and a restart); the
    # test below holds the restarted engine to one stop within the grace period.
    run.auditor.limits = dataclasses.replace(run.auditor.limits, duplicate_overlap_seconds=20.0)
    await run.start()
    try:
        (symbol,) = await run.opened(await run.wave(1, sides=["long"]))
        await run.until(run.converged, what="protected")
        manager = run.engine.manager
        assert manager is not None
        guard = manager.by_symbol[symbol]
        market = run.engine.markets[symbol]
        watch = StopWatch(run, symbol)

        # Activation: the trail's first stop, confirmed and recorded.
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
            lambda: db.pool.fetchval(
                "SELECT state = 'active' FROM monitoring.trailing_stop_state WHERE position_id = $1",
                guard.position_id,
            ),
            what="the first trailing stop recorded",
        )
        (old,) = live_trailing_stops(run, symbol)
        watch.check()

        # The move: a new peak; the engine sends the new stop, the venue places it after 1 s.
        peak = market.round_price(guard.entry_price * Decimal("1.04"))
        run.venue.override_mark_price(symbol, peak)
        assert guard.trail is not None
        wanted = guard.trail.params.trail_price(peak)
        assert wanted > old.stop_price
        if placed:
            await watch.until(
                lambda: len(live_trailing_stops(run, symbol)) == 2, limit=10, what="the new stop live"
            )
            new = max(live_trailing_stops(run, symbol), key=lambda o: generation(run, o))
            assert new.stop_price == wanted
            watch.floor = new.stop_price  # the venue holds it: protection may never fall below it again
        else:
            await watch.until(
                lambda: guard.trail is not None and guard.trail.phase is TrailingPhase.MOVING,
                limit=10,
                what="the move decided",
            )
            await watch.step()  # sent (0.2 s of the 1 s it takes the venue to place it)
            assert len(live_trailing_stops(run, symbol)) == 1

        # Engine A stops before the create's answer arrives.
        run.auditor.engine_up(False)
        await run.drive(run.engine.stop(drain=drain))
        watch.check()
        # While no engine runs the mark falls back a little (below the peak, above the new stop): the
        # restarted engine can only know the peak from what A recorded.
        run.venue.override_mark_price(symbol, market.round_price(guard.entry_price * Decimal("1.038")))
        for _ in range(round(DOWNTIME_SECONDS / 0.2)):
            await watch.step()

        run.venue = SimVenue(settings.venue.sim, clock=run.clock, core=run.venue.core)
        run.engine = make_engine(settings, run.clock, run.venue)
        await run.drive(run.engine.start())
        run.auditor.engine_up(True)
        watch.check()
        manager_b = run.engine.manager
        assert manager_b is not None
        guard_b = manager_b.guards[guard.position_id]
        assert guard_b.trail is not None
        assert guard_b.trail.peak_price is not None
        assert guard_b.trail.peak_price >= peak, (
            f"the restored trail lost its peak: {guard_b.trail.peak_price} < {peak}"
        )

        # Within the grace period: one trailing stop, at the price the trail decided on, which the
        # engine, the database and the venue all name.
        def settled() -> bool:
            live = live_trailing_stops(run, symbol)
            return (
                len(live) == 1
                and live[0].stop_price == wanted
                and guard_b.trail is not None
                and guard_b.trail.phase is TrailingPhase.ACTIVE
                and guard_b.trail.stop_price == wanted
                and guard_b.trailing_stop.confirmed
                and guard_b.trailing_stop.client_order_id == live[0].client_order_id
            )

        # (A move the venue never had is made again by B: until then the old stop protects.)
        await watch.until(
            settled, limit=float(settings.protection.grace_seconds), what="one stop, at the trail's"
        )
        watch.floor = wanted
        if placed:
            # The live new stop was adopted, not replaced by a third generation.
            (live,) = live_trailing_stops(run, symbol)
            assert live.client_order_id == new.client_order_id
        row = await db.pool.fetchrow(
            "SELECT * FROM monitoring.trailing_stop_state WHERE position_id = $1", guard.position_id
        )
        assert row["state"] == "active"
        assert row["peak_price"] >= peak
        assert row["current_stop_price"] == wanted
        assert row["stop_order_client_id"] == live_trailing_stops(run, symbol)[0].client_order_id

        # And it stays so through a full reconcile interval (the reconciler sees nothing stale).
        for _ in range(round((float(settings.protection.reconcile_seconds) + 2) / 0.2)):
            await watch.step()
        assert len(live_trailing_stops(run, symbol)) == 1
        assert watch.most_live <= 2
        await run.settle()
        run.verdict(coverage_at_least=85.0)  # the opening takes two 2 s round trips
    finally:
        await run.stop()

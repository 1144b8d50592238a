"""A stop someone else moved on Bybit is not our stop.

Bybit holds a position's stops as fields of the position (`stopLoss`, and `trailingStop` a price
distance): anyone with the account's key (Bybit's web UI, another tool) can set them to other values with
`POST /v5/position/trading-stop`. The engine listed its stop whenever the field was positive, whatever its
value, and the stream's row of the amended stop order was told NEW (dropped): a hard stop moved far away,
or a trailing distance widened, left the position shown covered at our price for good. A stop removed by
someone else was caught at once; one moved never was.

Here the operator is another client of the same account, signing its own trading-stop call. The position
must show uncovered at once (an event, a WARNING naming the symbol), and the engine must set its own
values on the position again; by the account stream, and with the stream silent, by the reconciler. Our
own moves (the hard stop that rode on the entry corrected from the fill, the trailing stop set) never
read as moved."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from engine.engine import Engine
from engine.venues.binance_emulator.faults import Target
from engine.venues.bybit_emulator import BybitEmulator, running
from engine.venues.bybit_emulator.faults import parse_bybit_fault
from engine.venues.sim.settings import SimVenueSettings
from protection.health import Component, HealthState
from protection.manager import PositionGuard
from storage.database import Database
from tests.integration.test_bybit_wave_pacing import KEY, SECRET, _one_protected, bybit_engine, engine_on
from tests.support.waiting import wait_until

SYMBOL = "SFPUSDT"
TICK = Decimal("0.0001")


def _emulator() -> BybitEmulator:
    """The Bybit emulator, with its control API, on SYMBOL and one other symbol, prices still."""
    return BybitEmulator(
        SimVenueSettings(seed=11, volatility=0.0, symbols=[SYMBOL, "BTCUSDT"]),
        api_key=KEY,
        api_secret=SECRET,
        control=True,
    )


async def _as_operator(base_url: str, **fields: str) -> None:
    """`POST /v5/position/trading-stop` as another client of the account would send it."""
    await _signed(base_url, "position/trading-stop", {"tpslMode": "Full", "positionIdx": 0, **fields})


async def _signed(base_url: str, endpoint: str, fields: dict[str, str | int]) -> None:
    """`POST /v5/<endpoint>` on SYMBOL as another client of the account (the same key, its own signature:
    HMAC-SHA256 over timestamp + key + recvWindow + body)."""
    body = json.dumps({"category": "linear", "symbol": SYMBOL, **fields})
    stamp, window = str(int(time.time() * 1000)), "5000"
    sign = hmac.new(SECRET.encode(), (stamp + KEY + window + body).encode(), hashlib.sha256).hexdigest()
    headers = {
        "X-BAPI-API-KEY": KEY,
        "X-BAPI-TIMESTAMP": stamp,
        "X-BAPI-RECV-WINDOW": window,
        "X-BAPI-SIGN": sign,
        "Content-Type": "application/json",
    }
    url = f"{base_url}/v5/{endpoint}"
    async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as answer:
        payload = await answer.json()
    assert payload["retCode"] == 0, payload


async def _held(base_url: str) -> dict[str, Any]:
    """The position's stop fields as the venue holds them."""
    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/_sim/state") as answer:
        state = await answer.json()
    return next(s for s in state["position_stops"] if s["symbol"] == SYMBOL)


async def _lost(db: Database) -> int:
    return int(
        await db.pool.fetchval(
            "SELECT count(*) FROM monitoring.events WHERE type = 'protection_lost' AND symbol = $1", SYMBOL
        )
    )


async def _settled(guard: PositionGuard, base_url: str) -> dict[str, Any]:
    """Both stops confirmed, the venue holding the hard stop at the guard's price (the one that rode on the
    entry corrected from the fill, if it was): what the venue holds then."""

    async def done() -> bool:
        held = await _held(base_url)
        return (
            guard.covered
            and guard.stop_loss.price is not None
            and held["stopLoss"] is not None
            and Decimal(held["stopLoss"]) == guard.stop_loss.price
            and held["trailingStop"] is not None
        )

    await wait_until(done, within=30.0, what="the position's stops settled")
    return await _held(base_url)


# Who finds it: the account stream (the reconciler waits an hour), by the position's row (which carries
# both fields) or, those rows lost, by the hard stop's amended order row; or, every account message lost,
# the reconciler (every second). The reconciler's interval, and the account topics whose messages are lost.
PATHS: dict[str, tuple[str, tuple[str, ...]]] = {
    "stream": ("3600", ()),
    "order-row": ("3600", ("position",)),
    "reconciler": ("1", ("order", "position")),
}


async def _protected_by_an_engine_that_stops(
    db: Database, base_url: str, overrides: dict[str, str]
) -> dict[str, Any]:
    """An engine opens and protects a position on SYMBOL, then stops (its stops stay on the position, as
    they must): the position's stop fields as it left them."""
    async with engine_on(db, base_url, overrides) as engine:
        guard = await _one_protected(engine, SYMBOL)
        return await _settled(guard, base_url)


async def _set_again_by_the_next_engine(
    engine: Engine, base_url: str, field: str, ours: dict[str, Any]
) -> None:
    """The next engine, on a position whose `field` someone changed while none ran, sets our value there
    again: the position re-protected (not restored), covered, its other stop left alone."""

    async def set_again() -> bool:
        held = (await _held(base_url))[field]
        return bool(held) and Decimal(held) == Decimal(ours[field])

    await wait_until(set_again, within=15.0, what="our own value set on the position again")
    assert engine.manager is not None
    [guard] = engine.manager.guards.values()
    await wait_until(lambda: guard.covered, within=8.0, what="the position covered again")
    report = engine.startup_report
    assert report is not None
    assert (report.restored, report.reprotected) == (0, 1), report.describe()
    other = "trailingStop" if field == "stopLoss" else "stopLoss"
    assert Decimal((await _held(base_url))[other]) == Decimal(ours[other])  # left alone


@pytest.mark.parametrize(
    ("moved", "path"),
    [
        ("stopLoss", "stream"),
        ("stopLoss", "order-row"),
        ("stopLoss", "reconciler"),
        ("trailingStop", "stream"),
        ("trailingStop", "reconciler"),
    ],
)
async def test_a_stop_moved_by_someone_else_is_uncovered_at_once_and_set_again_at_our_value(
    db: Database, caplog: pytest.LogCaptureFixture, moved: str, path: str
) -> None:
    emulator = _emulator()
    reconcile_seconds, lost_topics = PATHS[path]
    overrides = {"PROTECTION__RECONCILE_SECONDS": reconcile_seconds}
    async with bybit_engine(db, emulator, overrides) as (engine, _rejected):
        base_url = engine.settings.venue.base_url
        guard = await _one_protected(engine, SYMBOL)
        ours = await _settled(guard, base_url)
        assert await _lost(db) == 0  # our own corrections and settings are not "moved"
        before = {
            "stopLoss": guard.stop_loss.client_order_id,
            "trailingStop": guard.trailing_stop.client_order_id,
        }
        # Far from ours, and valid on the venue: a hard stop at half our price, a trailing distance ten
        # times ours (but short of the price).
        factor = Decimal("0.5") if moved == "stopLoss" else Decimal(10)
        value = (Decimal(ours[moved]) * factor).quantize(TICK)
        for topic in lost_topics:
            await emulator.streams.stage_fault({"fault": "lose", "topic": topic, "count": 1000})
        caplog.set_level(logging.WARNING)
        fields = {moved: str(value)}
        if moved == "stopLoss":
            fields["slTriggerBy"] = "MarkPrice"
        await _as_operator(base_url, **fields)
        assert Decimal((await _held(base_url))[moved]) == value

        async def restored() -> bool:
            held = await _held(base_url)
            return held[moved] is not None and Decimal(held[moved]) == Decimal(ours[moved])

        # Uncovered at once, said loudly; then our own value on the position again, under a new id.
        await wait_until(lambda: _lost(db), within=8.0, what="the moved stop said lost")
        await wait_until(restored, within=8.0, what="our own value set on the position again")
        await wait_until(lambda: guard.covered, within=8.0, what="the position covered again")
        purpose = guard.stop_loss if moved == "stopLoss" else guard.trailing_stop
        assert purpose.client_order_id != before[moved]
        warned = [
            r
            for r in caplog.records
            if r.levelno >= logging.WARNING and SYMBOL in r.getMessage() and moved in r.getMessage()
        ]
        assert warned, [r.getMessage() for r in caplog.records]
        # Said as what it is: our value no longer on the position, not an order "canceled" (opme50).
        lost_lines = [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.ERROR and SYMBOL in r.getMessage() and "not by us" in r.getMessage()
        ]
        assert lost_lines, [r.getMessage() for r in caplog.records]
        assert all("changed or cleared" in m and "canceled" not in m for m in lost_lines), lost_lines
        # The other stop was left alone, and our value stays: no flapping once restored.
        other = "trailingStop" if moved == "stopLoss" else "stopLoss"
        held = await _held(base_url)
        assert Decimal(held[other]) == Decimal(ours[other])
        lost = await _lost(db)
        await wait_until(lambda: guard.covered, within=1.0, what="still covered")
        assert await _lost(db) == lost


async def test_a_trailing_stop_moved_is_set_again_not_taken_as_ours_where_we_read_the_position_first(
    db: Database,
) -> None:
    """Once the hard stop that rode on the entry is no longer the position's (here: moved by someone, ours
    set again), a trailing stop is placed after reading the position, and one found working there with
    none of ours in memory used to be adopted (a restart, a lost answer). The one someone else set in the
    place of ours is not ours: ours is set again, at our distance."""
    emulator = _emulator()
    async with bybit_engine(db, emulator, {"PROTECTION__RECONCILE_SECONDS": "3600"}) as (engine, _rejected):
        base_url = engine.settings.venue.base_url
        guard = await _one_protected(engine, SYMBOL)
        ours = await _settled(guard, base_url)
        for moved, factor in (("stopLoss", Decimal("0.5")), ("trailingStop", Decimal(10))):
            value = (Decimal(ours[moved]) * factor).quantize(TICK)
            await _as_operator(base_url, **{moved: str(value)})

            async def restored(field: str = moved) -> bool:
                held = await _held(base_url)
                return held[field] is not None and Decimal(held[field]) == Decimal(ours[field])

            await wait_until(restored, within=8.0, what=f"our own {moved} set on the position again")
            await wait_until(lambda: guard.covered, within=8.0, what="the position covered again")
        assert await _lost(db) == 2


@pytest.mark.parametrize("moved", ["stopLoss", "trailingStop", "activePrice"])
async def test_a_stop_moved_while_no_engine_ran_is_not_restored_as_ours(
    db: Database, caplog: pytest.LogCaptureFixture, moved: str
) -> None:
    """An engine stops (its stops stay on the position, as they must); someone moves one; the next engine
    restores the position. It took whatever value the field held as its own stop (`Restored …`), so a
    hard stop widened to half the price, or a trailing distance ten times ours, was shown and recorded as
    our protection for as long as the position lived; so was a trailing stop whose activation alone was
    moved out of reach (the position's row has no activation: the stop's order row shows it). It is someone
    else's: said loudly (a WARNING naming the field), the position re-protected, not restored, and ours set
    again."""
    emulator = _emulator()
    async with running(emulator) as base_url:
        overrides = {"PROTECTION__RECONCILE_SECONDS": "3600"}
        ours = await _protected_by_an_engine_that_stops(db, base_url, overrides)
        assert await _lost(db) == 0
        factor = {"stopLoss": Decimal("0.5"), "trailingStop": Decimal(10), "activePrice": Decimal(2)}[moved]
        assert ours[moved] is not None
        value = (Decimal(ours[moved]) * factor).quantize(TICK)
        fields = {moved: str(value)}
        if moved == "stopLoss":
            fields["slTriggerBy"] = "MarkPrice"
        if moved == "activePrice":  # the distance kept: the trail activates only at twice the price
            fields["trailingStop"] = ours["trailingStop"]
        await _as_operator(base_url, **fields)
        assert Decimal((await _held(base_url))[moved]) == value
        caplog.set_level(logging.WARNING)
        async with engine_on(db, base_url, overrides) as engine:
            await _set_again_by_the_next_engine(engine, base_url, moved, ours)
            if moved == "activePrice":
                assert Decimal((await _held(base_url))["trailingStop"]) == Decimal(ours["trailingStop"])
        warned = [
            r
            for r in caplog.records
            if r.levelno >= logging.WARNING and SYMBOL in r.getMessage() and moved in r.getMessage()
        ]
        assert warned, [r.getMessage() for r in caplog.records]


async def test_a_restart_leaves_the_open_positions_stops_alone_for_a_closed_positions_record(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """A restart sweeps the stops its records say may be live on closed positions (a fired stop still
    TRIGGERING on Binance is in no list of open orders). On Bybit the stops are the position's fields,
    which the venue clears when the position closes: a closed position's stop record left `pending` (its
    send refused for the rate, then the position closed) was cancelled by id, and Bybit's adapter, finding
    no stop of that id, took the open position's trailing stop on the same symbol for it and cleared it.
    On a venue whose stops are the position's, nothing is swept for a closed position."""
    emulator = _emulator()
    async with running(emulator) as base_url:
        overrides = {"PROTECTION__RECONCILE_SECONDS": "3600"}
        async with engine_on(db, base_url, overrides) as engine:
            guard = await _one_protected(engine, SYMBOL)
            ours = await _settled(guard, base_url)
            token = engine._token
        # An earlier position on the symbol, closed, whose trailing stop's record stayed `pending`.
        closed = await db.pool.fetchval(
            "INSERT INTO monitoring.positions (symbol, exchange, side, quantity, status, account, closed_at, "
            "exit_reason) SELECT symbol, exchange, side, quantity, 'closed', account, now(), 'stop_loss' "
            "FROM monitoring.positions WHERE id = $1 RETURNING id",
            guard.position_id,
        )
        await db.pool.execute(
            "INSERT INTO monitoring.orders (client_order_id, position_id, purpose, side, type, quantity, status) "
            "VALUES ($1, $2, 'trailing_stop', 'sell', 'trailing_stop_market', 1, 'pending')",
            f"tsb{token}-{closed}-ts0",
            closed,
        )
        set_before = emulator.requests_by_endpoint.get("POST position/trading-stop", 0)
        caplog.set_level(logging.INFO)
        async with engine_on(db, base_url, overrides) as engine:
            assert engine.manager is not None
            [restored] = engine.manager.guards.values()
            await wait_until(lambda: restored.covered, within=8.0, what="the open position restored")
            await engine.manager.leftovers_cancelled(SYMBOL, 5.0)
            report = engine.startup_report
            assert report is not None
            # Restored as it was: not cleared by the sweep and set again.
            assert (report.restored, report.reprotected) == (1, 0), report.describe()
            held = await _held(base_url)
            assert (held["stopLoss"], held["trailingStop"]) == (ours["stopLoss"], ours["trailingStop"])
            # Nothing was set on the position: no cancel (trailingStop 0) taken for the closed position's.
            assert emulator.requests_by_endpoint.get("POST position/trading-stop", 0) == set_before
        # The open position's stop was never taken for the closed position's (the adapter said so).
        assert not [r.getMessage() for r in caplog.records if f"-{closed}-ts0" in r.getMessage()]


async def test_a_position_flipped_by_hand_is_closed_on_the_record_and_its_new_side_protected(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """Someone sells twice the long on the venue (one-way mode: the long closes, a short opens), and Bybit
    cancels the long's stops with it. The long must end on the record, and the short, which no signal of
    ours opened, must get both stops of its own side on the venue."""
    emulator = _emulator()
    async with bybit_engine(db, emulator, {"PROTECTION__RECONCILE_SECONDS": "1"}) as (engine, _rejected):
        base_url = engine.settings.venue.base_url
        guard = await _one_protected(engine, SYMBOL)
        await _settled(guard, base_url)
        await _signed(
            base_url,
            "order/create",
            {"side": "Sell", "orderType": "Market", "qty": str(guard.quantity * 2), "positionIdx": 0},
        )

        async def short_protected() -> bool:
            async with aiohttp.ClientSession() as session, session.get(f"{base_url}/_sim/state") as answer:
                state = await answer.json()
            position = next(p for p in state["positions"] if p["symbol"] == SYMBOL)
            held = next((f for f in state["position_stops"] if f["symbol"] == SYMBOL), {})
            return (
                position["side"] == "short"
                and held.get("stopLoss") is not None
                and Decimal(held["stopLoss"]) > emulator.core.mark(SYMBOL)
                and held.get("trailingStop") is not None
            )

        await wait_until(short_protected, within=20.0, what="the short protected on the venue")

        async def recorded() -> bool:
            rows = await db.pool.fetch("SELECT side, status FROM monitoring.positions ORDER BY id")
            return [(r["side"], r["status"]) for r in rows] == [("long", "closed"), ("short", "active")]

        await wait_until(recorded, within=5.0, what="the long closed and the short active on the record")
        assert not any("KeyError" in r.getMessage() for r in caplog.records)


async def test_a_trailing_stops_activation_moved_while_the_engine_runs_is_not_taken_as_ours(
    db: Database,
) -> None:
    """Someone keeps our trailing distance and moves only its activation out of reach (a trail that never
    arms). The position's row carries the distance alone, so the engine running listed the stop as ours,
    covered, with no event, until a restart looked at the order's row (a reviewer: 8 s at a reconcile a
    second). The reconciler now reads the activation too: the stop is not ours, and ours is set again."""
    emulator = _emulator()
    async with bybit_engine(db, emulator, {"PROTECTION__RECONCILE_SECONDS": "1"}) as (engine, _rejected):
        base_url = engine.settings.venue.base_url
        guard = await _one_protected(engine, SYMBOL)
        ours = await _settled(guard, base_url)
        before = guard.trailing_stop.client_order_id
        await asyncio.sleep(5.5)  # (a stop is judged by its order's row once set a while)
        far = (Decimal(ours["activePrice"]) * 3).quantize(TICK)
        async with aiohttp.ClientSession() as session:
            answer = await session.post(
                f"{base_url}/_sim/position-stops",
                json={"symbol": SYMBOL, "trailingStop": ours["trailingStop"], "activePrice": str(far)},
            )
            assert answer.status == 200, await answer.text()
        assert Decimal((await _held(base_url))["activePrice"]) == far

        async def ours_again() -> bool:
            return Decimal((await _held(base_url))["activePrice"]) == Decimal(ours["activePrice"])

        await wait_until(lambda: _lost(db), within=8.0, what="the moved trailing stop said lost")
        await wait_until(ours_again, within=8.0, what="our activation set on the position again")
        await wait_until(lambda: guard.covered, within=8.0, what="covered again")
        assert guard.trailing_stop.client_order_id != before


async def test_a_listing_without_the_stop_orders_is_said_unchecked_in_protection_health(db: Database) -> None:
    """With order/realtime failing, the listing stands on the positions' stop fields: a stop removed is
    seen, but an unarmed trail's activation moved by someone else is not (its row is on the orders' list).
    Those passes counted as checks, and health said protection healthy, 100 %, while the trail would never
    arm (a reviewer). They do not count: after three passes' time health is degraded, and says why."""
    emulator = _emulator()
    async with bybit_engine(db, emulator, {"PROTECTION__RECONCILE_SECONDS": "1"}) as (engine, _rejected):
        base_url = engine.settings.venue.base_url
        guard = await _one_protected(engine, SYMBOL)
        await _settled(guard, base_url)
        emulator.faults.force((Target("GET", "order/realtime"),), parse_bybit_fault("error"), count=100_000)

        def said() -> str:
            [protection] = [c for c in engine.current_health() if c.component is Component.PROTECTION]
            return protection.reason if protection.state is HealthState.DEGRADED else ""

        await wait_until(
            lambda: "Stops not checked against the venue" in said(), within=15.0, what="degraded"
        )
        assert "order/realtime not read" in said()
        assert guard.covered  # its stops are on the position: no alarm on them

        emulator.faults.clear_forced()
        await wait_until(lambda: not said(), within=15.0, what="checked again")


async def test_a_pass_whose_listing_is_older_than_a_replaced_stop_says_nothing_cancelled(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """soak65 (Bybit emulator): "reconcile: cancelled our duplicate (not the current order) …-sl0", a WARNING
    and an `orphan_cancelled` event, 8 times in 10 minutes. Each pass had read the positions just before
    the guard replaced its hard stop (the one that rode on the entry, corrected from the fill): the listing
    still showed the old value, and its "cancel" found the field holding the new stop's value, and
    answered the old one ended. Nothing was cancelled, and nothing was a duplicate: Bybit holds one value
    per field. Here the replacement is our own value set again after someone moved it, and the pass runs
    on a listing read before."""
    emulator = _emulator()
    async with bybit_engine(db, emulator, {"PROTECTION__RECONCILE_SECONDS": "3600"}) as (engine, _rejected):
        base_url = engine.settings.venue.base_url
        guard = await _one_protected(engine, SYMBOL)
        ours = await _settled(guard, base_url)
        assert engine.reconciler is not None
        stale = await engine.reconciler.take_snapshot()
        old = guard.stop_loss.client_order_id
        assert old in {o.client_order_id for o in stale.open_orders}
        await _as_operator(
            base_url, stopLoss=str((Decimal(ours["stopLoss"]) / 2).quantize(TICK)), slTriggerBy="MarkPrice"
        )

        async def ours_again() -> bool:
            held = await _held(base_url)
            return (
                guard.covered
                and guard.stop_loss.client_order_id != old
                and held["stopLoss"] is not None
                and Decimal(held["stopLoss"]) == Decimal(ours["stopLoss"])
            )

        await wait_until(ours_again, within=8.0, what="our own value set again under a new id")
        caplog.set_level(logging.INFO)
        report = await engine.reconciler.reconcile_once(stale)
        said = [r.getMessage() for r in caplog.records if old is not None and old in r.getMessage()]
        assert not [m for m in said if "cancelled our" in m], said
        assert report.orphans_cancelled == [], report
        events = await db.pool.fetchval(
            "SELECT count(*) FROM monitoring.events WHERE type = 'orphan_cancelled' AND symbol = $1", SYMBOL
        )
        assert events == 0
        held = await _held(base_url)
        assert Decimal(held["stopLoss"]) == Decimal(ours["stopLoss"])  # (the field keeps our stop)
        assert guard.covered


@pytest.mark.parametrize("cleared", ["stopLoss", "trailingStop"])
async def test_a_stop_cleared_while_no_engine_ran_is_said_lost_and_set_again(
    db: Database, caplog: pytest.LogCaptureFixture, cleared: str
) -> None:
    """An engine stops; someone clears one of the position's stops (the field set to 0); the next engine
    finds the position held without it. A reviewer read that such a stop, found cleared by its look-up after
    a restart, would go unsaid (Bybit ends a closed position's stops with it, so a cleared field alone is no
    proof of a hand). It is said: once, as protection lost (an ERROR and one event), the position counted
    re-protected, and our value set on the position again, the other stop left alone."""
    emulator = _emulator()
    async with running(emulator) as base_url:
        overrides = {"PROTECTION__RECONCILE_SECONDS": "3600"}
        ours = await _protected_by_an_engine_that_stops(db, base_url, overrides)
        await _as_operator(base_url, **{cleared: "0"})
        assert not Decimal((await _held(base_url))[cleared] or 0)
        caplog.set_level(logging.WARNING)
        async with engine_on(db, base_url, overrides) as engine:
            await _set_again_by_the_next_engine(engine, base_url, cleared, ours)
        assert await _lost(db) == 1
        errors = [
            r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and SYMBOL in r.getMessage()
        ]
        assert len(errors) == 1, errors
        assert "is no longer on the exchange" in errors[0], errors

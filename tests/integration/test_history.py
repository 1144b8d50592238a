"""History (issue 13): per-position uncovered spans and the coverage series, written by a real engine on the
sim venue (virtual time) into real PostgreSQL. The venue's truth says when a stop really went and came back."""

from __future__ import annotations

import dataclasses
import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import asyncpg

from engine.clock import ManualClock
from engine.engine import COVERAGE_RETENTION_SECONDS, COVERAGE_SAMPLE_SECONDS, HOUSEKEEPING_SECONDS
from engine.exchange.errors import FailureClass
from engine.venues.sim.settings import CallKind, FaultKind
from storage import history
from storage.database import Database
from storage.history import PROTECTION_FAILURE_CLASSES
from storage.repositories import CoverageSample, PositionStatus, ProtectionFactsRow, Severity, Store
from tests.integration.engine_support import make_engine
from tests.integration.test_failure_modes_f1_f5 import (
    SYMBOLS,
    drive_until_covered,
    open_positions,
    settings_for,
)
from tests.support.driving import drive, drive_until


async def _wait(clock: ManualClock, seconds: float) -> None:
    until = clock.monotonic() + seconds
    await drive_until(clock, lambda: clock.monotonic() >= until, step=0.5, limit=seconds + 1, what="time")


async def _spans(db: Database) -> list[asyncpg.Record]:
    return await db.pool.fetch("SELECT * FROM monitoring.uncovered_spans ORDER BY id")


async def _samples(db: Database) -> list[asyncpg.Record]:
    return await db.pool.fetch("SELECT * FROM monitoring.coverage_samples ORDER BY at")


def test_the_report_knows_every_failure_class_the_engine_records() -> None:
    assert set(PROTECTION_FAILURE_CLASSES) == {c.value for c in FailureClass}


async def test_a_stop_removed_on_the_venue_is_an_uncovered_span_until_it_is_protected_again(
    db: Database,
) -> None:
    settings = settings_for(db, {"PROTECTION__RECONCILE_SECONDS": "5"})
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        [guard] = await open_positions(engine, clock, [SYMBOLS[64]])
        await drive_until_covered(engine, clock, 1)
        await _wait(clock, 60)
        assert await _spans(db) == []  # protected on its first pass: nothing was ever recorded uncovered

        # The venue loses the stop-loss (cancelled by hand); every replacement fails with HTTP 500 for now.
        venue = engine.venue
        venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.SERVER_ERROR, 100_000)
        assert guard.stop_loss.client_order_id is not None
        venue.core.cancel_order(guard.symbol, guard.stop_loss.client_order_id, clock.now())
        lost_at = clock.now()
        await drive_until(clock, lambda: not guard.covered, what="the loss seen")
        await drive_until(clock, lambda: guard.facts_written(), what="the loss written")
        [span] = await _spans(db)
        assert (span["position_id"], span["symbol"], span["account"]) == (
            guard.position_id,
            guard.symbol,
            engine.account_key,
        )
        assert (span["reason"], span["ended_at"], span["ended_by"]) == ("stop_loss_missing", None, None)
        # Seen within a reconcile interval of the venue's loss.
        assert lost_at <= span["started_at"].timestamp() <= lost_at + 5

        # Restarting the protection manager meanwhile neither ends the span nor begins another.
        await _wait(clock, 20)
        await drive(clock, engine.restart_protection())
        assert engine.manager is not None
        guard = engine.manager.guards[guard.position_id]
        await drive_until(clock, lambda: guard.facts_written(), what="the restored guard's facts written")
        assert await _spans(db) == [span]

        await _wait(clock, 22)
        venue.clear_injected_faults()
        await drive_until(clock, lambda: guard.covered and guard.facts_written(), what="protected again")
        regained_at = clock.now()  # the venue holds the new stop-loss from the pass that just confirmed it
        [span] = await _spans(db)
        assert span["ended_by"] == "protected"
        assert span["ended_at"] is not None
        assert span["ended_at"].timestamp() <= regained_at
        duration = (span["ended_at"] - span["started_at"]).total_seconds()
        # The venue was without the stop for (regained - lost); the span is that, less at most the reconcile
        # interval it took to notice, and never more.
        assert regained_at - lost_at - 5 <= duration <= regained_at - lost_at
        assert duration >= 42
    finally:
        await drive(clock, engine.stop())


async def test_coverage_is_sampled_on_its_cadence_and_says_when_a_position_was_uncovered(
    db: Database,
) -> None:
    settings = settings_for(db, {"PROTECTION__RECONCILE_SECONDS": "5", "PROTECTION__GRACE_SECONDS": "5"})
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        [guard] = await open_positions(engine, clock, [SYMBOLS[65]])
        await drive_until_covered(engine, clock, 1)
        await _wait(clock, 35)
        engine.venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.SERVER_ERROR, 100_000)
        assert guard.stop_loss.client_order_id is not None
        engine.venue.core.cancel_order(guard.symbol, guard.stop_loss.client_order_id, clock.now())
        await drive_until(clock, lambda: not guard.covered, what="the loss seen")
        await _wait(clock, 30)
    finally:
        # (The stop waits, up to the call budget, for the position to have its stop again: it samples on.)
        await drive(clock, engine.stop())
    stopped_sampling = clock.now()

    samples = await _samples(db)
    times = [s["at"].timestamp() for s in samples]
    assert len(samples) >= 7
    # On a fixed grid of the engine's clock, however long each write took.
    assert all(abs(b - a - COVERAGE_SAMPLE_SECONDS) < 1e-3 for a, b in itertools.pairwise(times))
    assert times[-1] <= stopped_sampling
    assert {s["account"] for s in samples} == {engine.account_key}
    protected = [s for s in samples if s["active"] == 1 and s["protected"] == 1]
    assert protected
    assert all(s["coverage_pct"] == Decimal("100.0") and s["uncovered"] == 0 for s in protected)
    # Past the grace period the lost stop shows: 0 % with one uncovered, lasting once it passed grace again.
    lost = [s for s in samples if s["uncovered"] == 1]
    assert len(lost) >= 2
    assert all((s["active"], s["protected"], s["coverage_pct"]) == (1, 0, Decimal("0.0")) for s in lost)
    assert lost[-1]["lasting"] == 1
    assert samples[-1]["uncovered"] == 1  # nothing was sampled after it as if it were covered


async def _position(store: Store, symbol: str) -> int:
    position = await store.create_position(
        symbol=symbol,
        exchange="sim",
        side="long",
        quantity=Decimal("10"),
        status=PositionStatus.ENTRY_PLACED,
    )
    await store.record_fill(position.id, Decimal("10"), Decimal("2.5"))
    return position.id


def facts_row(
    position_id: int,
    *,
    covered: bool,
    since: datetime | None,
    observed: datetime,
    stop_price: Decimal = Decimal("2.4"),
) -> ProtectionFactsRow:
    """What a guard writes: the trailing stop in place, the hard stop there or not."""
    return ProtectionFactsRow(
        position_id=position_id,
        has_stop_loss=covered,
        has_trailing_stop=True,
        stop_loss_price=stop_price if covered else None,
        trailing_activated=False,
        status=PositionStatus.ACTIVE,
        unprotected_since=since,
        observed_at=observed,
    )


async def test_a_position_that_ends_uncovered_ends_its_span_and_a_repeated_write_records_nothing_twice(
    db: Database,
) -> None:
    store = Store(db.pool, "sim:default")
    t0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    first = await _position(store, "SFPUSDT")
    second = await _position(store, "ALLUSDT")
    # First protected, then it loses its stop-loss at t0+60 s and gets it back at t0+90 s.
    covered = facts_row(first, covered=True, since=None, observed=t0)
    lost = facts_row(
        first, covered=False, since=t0 + timedelta(seconds=60), observed=t0 + timedelta(seconds=60)
    )
    back = facts_row(first, covered=True, since=None, observed=t0 + timedelta(seconds=90))
    # The other one never got its stop-loss (uncovered since its fill) and is closed by hand.
    never = facts_row(second, covered=False, since=t0, observed=t0)
    for batch in ([covered, never], [lost], [back], [lost], [back]):  # the last two: a journal replayed again
        await store.set_protection_facts_many(batch)
    await store.close_position(second, exit_reason="manual", realized_pnl=Decimal("-0.25"))
    await store.close_position(second, exit_reason="manual", realized_pnl=Decimal("-0.25"))

    rows = await db.pool.fetch("SELECT * FROM monitoring.uncovered_spans ORDER BY position_id, started_at")
    assert [
        (r["position_id"], r["started_at"], r["ended_at"], r["reason"], r["ended_by"], r["exit_reason"])
        for r in rows
    ][:1] == [
        (
            first,
            t0 + timedelta(seconds=60),
            t0 + timedelta(seconds=90),
            "stop_loss_missing",
            "protected",
            None,
        )
    ]
    assert len(rows) == 2
    other = rows[1]
    assert (other["position_id"], other["started_at"], other["reason"]) == (second, t0, "not_yet_protected")
    assert (other["ended_by"], other["exit_reason"]) == ("closed", "manual")
    assert other["ended_at"] is not None
    assert other["ended_at"] > t0


async def test_a_stretch_the_record_lacks_is_ended_by_covered_facts_and_only_where_the_record_has_none(
    db: Database,
) -> None:
    """A guard restored on a position the last engine left filled and never protected, that had to send
    its stops, writes covered facts carrying when the position's naked time began (`uncovered_from`): one
    span, ended then, in the same statement. Where the record already has a stretch, it is the one ended;
    facts that are not covered begin theirs at their own `unprotected_since`; a repeated write adds nothing."""
    store = Store(db.pool)
    t0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
    naked, recorded, uncovered = [await _position(store, s) for s in ("SFPUSDT", "ALLUSDT", "AXSUSDT")]
    await store.set_protection_facts_many(
        [
            facts_row(
                recorded, covered=False, since=t0 + timedelta(seconds=5), observed=t0 + timedelta(seconds=5)
            )
        ]
    )
    at = t0 + timedelta(seconds=40)
    ended = [
        dataclasses.replace(facts_row(i, covered=True, since=None, observed=at), uncovered_from=t0)
        for i in (naked, recorded)
    ]
    began = dataclasses.replace(
        facts_row(uncovered, covered=False, since=t0, observed=at), uncovered_from=t0 - timedelta(seconds=9)
    )
    for _ in range(2):  # (a journal replayed again)
        await store.set_protection_facts_many([*ended, began])
    spans = {
        s["position_id"]: (s["started_at"], s["ended_at"], s["reason"], s["ended_by"])
        for s in await _spans(db)
    }
    assert len(await _spans(db)) == 3, [tuple(r) for r in await _spans(db)]
    assert spans[naked] == (t0, at, "not_yet_protected", "protected")
    assert spans[recorded] == (t0 + timedelta(seconds=5), at, "not_yet_protected", "protected")
    assert spans[uncovered] == (t0, None, "not_yet_protected", None)


async def test_the_housekeeping_deletes_this_accounts_samples_past_their_retention(db: Database) -> None:
    settings = settings_for(db)
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        now = datetime.fromtimestamp(clock.now(), tz=UTC)
        kept = now - timedelta(seconds=COVERAGE_RETENTION_SECONDS) + timedelta(hours=1)
        old = now - timedelta(seconds=COVERAGE_RETENTION_SECONDS) - timedelta(hours=1)
        for account, at in ((engine.account_key, old), (engine.account_key, kept), ("sim:other", old)):
            await Store(db.pool, account).record_coverage_sample(
                CoverageSample(at, 1, 1, 0, 0, Decimal("100.0"))
            )

        async def old_gone() -> bool:
            return not await db.pool.fetchval(
                "SELECT count(*) FROM monitoring.coverage_samples WHERE account = $1 AND at = $2",
                engine.account_key,
                old,
            )

        gone = False
        for _ in range(int(HOUSEKEEPING_SECONDS) + 30):
            await _wait(clock, 1)
            if gone := await old_gone():
                break
        assert gone
        left = {
            (r["account"], r["at"]) for r in await db.pool.fetch("SELECT * FROM monitoring.coverage_samples")
        }
        assert (engine.account_key, kept) in left
        assert ("sim:other", old) in left  # another account's history is its own engine's to keep
    finally:
        await drive(clock, engine.stop())


async def test_per_period_figures_clip_a_lasting_span_and_a_sample_across_the_period_boundaries(
    db: Database,
) -> None:
    """The history screen's per-period query: a span still open counts up to each period's end (and the
    window's), a sample that stands across a boundary is split between the two periods, and another
    account's rows count nowhere."""
    pool = db.pool
    store, other = Store(pool, "sim:default"), Store(pool, "sim:other")
    base: datetime = await pool.fetchval("SELECT date_trunc('hour', now()) - interval '3 hours'")
    boundary = base + timedelta(hours=1)
    # 0 % at 15 s before the boundary, 100 % at 5 s after it; the second stands its 30 s.
    await store.record_coverage_sample(
        CoverageSample(boundary - timedelta(seconds=15), 1, 0, 1, 0, Decimal(0))
    )
    await store.record_coverage_sample(
        CoverageSample(boundary + timedelta(seconds=5), 1, 1, 0, 0, Decimal(100))
    )
    await other.record_coverage_sample(CoverageSample(boundary, 1, 0, 1, 0, Decimal(0)))
    position_id = await pool.fetchval(
        "INSERT INTO monitoring.positions (symbol, exchange, side, quantity, entry_price, status, account, "
        "opened_at) VALUES ('SFPUSDT', 'sim', 'long', 10, 2.5, 'active', 'sim:default', $1) RETURNING id",
        base,
    )
    await pool.execute(
        "INSERT INTO monitoring.uncovered_spans (account, position_id, symbol, started_at, reason) "
        "VALUES ('sim:default', $1, 'SFPUSDT', $2, 'not_yet_protected')",
        position_id,
        boundary - timedelta(minutes=10),
    )
    until = boundary + timedelta(minutes=30)
    first, second = await history.coverage_by_period(
        pool, "sim:default", [(base, boundary), (boundary, until)], sample_stands_seconds=30
    )
    # Before the boundary: 15 s at 0 %; after it: 5 s at 0 % then 30 s at 100 %.
    assert (first.measured_seconds, first.coverage_pct, first.lowest_coverage_pct) == (
        Decimal("15.000"),
        Decimal("0.0"),
        Decimal(0),
    )
    assert (second.measured_seconds, second.coverage_pct) == (Decimal("35.000"), Decimal("85.7"))
    # The open span: 10 min in the first hour, up to the window's end (30 min) in the second.
    assert (first.uncovered_spans, first.uncovered_seconds, first.worst_seconds) == (
        1,
        Decimal("600.000"),
        Decimal("600.000"),
    )
    assert (second.uncovered_spans, second.uncovered_seconds) == (1, Decimal("1800.000"))


async def test_the_sample_a_killed_engine_leaves_counts_positions_inside_their_grace_as_a_running_one_does(
    db: Database,
) -> None:
    """From a killed engine's last heartbeat the series holds what the records give. A kill 1.25 s after a
    wave's fills recorded all six positions uncovered and lasting, their stops on their way (live on the
    venue 0.5 s later): a running engine counts a position without its stops uncovered only past its grace
    period, and lasting once it lacked them that long (an operator's find)."""
    store = Store(db.pool)
    heard = datetime(2026, 12, 6, 0, 42, 6, tzinfo=UTC)
    old, young = heard - timedelta(seconds=30), heard - timedelta(seconds=1.25)
    ids = {}
    for name, symbol, filled in (
        ("protected", "SFPUSDT", old),
        ("naked", "ALLUSDT", old),
        ("young", "AXSUSDT", young),
        ("lost", "BCHUSDT", old),
    ):
        position = await store.create_position(
            symbol=symbol,
            exchange="sim",
            side="long",
            quantity=Decimal(10),
            status=PositionStatus.ENTRY_PLACED,
        )
        await store.record_fill(position.id, Decimal(10), Decimal("2.5"), filled_at=filled)
        ids[name] = position.id
    await store.set_protection_facts_many(
        [
            facts_row(ids["protected"], covered=True, since=None, observed=old),
            facts_row(ids["naked"], covered=False, since=old, observed=old),
            facts_row(ids["young"], covered=False, since=young, observed=young),
            # Covered for long, its hard stop lost 2 s before the heartbeat: uncovered, not for a grace yet.
            facts_row(ids["lost"], covered=False, since=heard - timedelta(seconds=2), observed=heard),
        ]
    )
    sample = await store.coverage_left_at(heard, 5.0)
    assert (sample.active, sample.protected, sample.uncovered, sample.lasting) == (4, 1, 2, 1), sample


async def test_the_hours_are_the_operators_clock_hours_in_a_zone_half_an_hour_off_utc(db: Database) -> None:
    """In Asia/Kolkata (UTC+05:30) the screen's hours are 09:00–10:00 IST, not 09:30–10:30 cut at UTC's :00
    and labelled `09h` on the chart: a span from 10 to 50 minutes into a local hour is all in that hour,
    40 minutes, not 20 in one and 20 in the next."""
    kolkata = ZoneInfo("Asia/Kolkata")
    pool = db.pool
    now = await history.now(pool)
    hour = now.astimezone(kolkata).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    position_id = await pool.fetchval(
        "INSERT INTO monitoring.positions (symbol, exchange, side, quantity, entry_price, status, account, "
        "opened_at) VALUES ('SFPUSDT', 'sim', 'long', 10, 2.5, 'closed', 'sim:default', $1) RETURNING id",
        hour,
    )
    await pool.execute(
        "INSERT INTO monitoring.uncovered_spans (account, position_id, symbol, started_at, ended_at, "
        "reason, ended_by) VALUES ('sim:default', $1, 'SFPUSDT', $2, $3, 'stop_loss_missing', 'protected')",
        position_id,
        hour + timedelta(minutes=10),
        hour + timedelta(minutes=50),
    )
    shown = await history.dashboard_history(
        pool, "sim:default", shift_since=None, tz=kolkata, sample_stands_seconds=30
    )
    assert len(shown.hours) == 24
    assert [f"{p.since.astimezone(kolkata):%M}" for p in shown.hours] == ["00"] * 24
    touched = [p for p in shown.hours if p.uncovered_spans]
    assert [(p.since, p.until, p.uncovered_seconds) for p in touched] == [
        (hour, hour + timedelta(hours=1), Decimal("2400.000"))
    ]


async def test_a_clean_stop_ends_the_measured_time_where_the_engine_stopped(db: Database) -> None:
    """The last sample stood on for up to 30 s past a clean stop, counted as measured coverage while no engine
    measured (a reviewer, from reading). The engine's stop ends it."""
    settings = settings_for(db, {"PROTECTION__RECONCILE_SECONDS": "5"})
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        await open_positions(engine, clock, [SYMBOLS[66]])
        await drive_until_covered(engine, clock, 1)
        await _wait(clock, 25)
    finally:
        await drive(clock, engine.stop())
    stopped = datetime.fromtimestamp(clock.now(), UTC)
    samples = await _samples(db)
    first, last = samples[0]["at"], samples[-1]["at"]
    assert (stopped - last).total_seconds() < COVERAGE_SAMPLE_SECONDS + 1

    report = await history.shift_report(
        db.pool, engine.account_key, first, stopped + timedelta(minutes=5), sample_stands_seconds=30
    )
    ran = Decimal(str((stopped - first).total_seconds()))
    assert abs(report.measured_seconds - ran) < 1, (report.measured_seconds, ran)
    [period] = await history.coverage_by_period(
        db.pool, engine.account_key, [(first, stopped + timedelta(minutes=5))], sample_stands_seconds=30
    )
    assert period.measured_seconds == report.measured_seconds


async def test_only_the_measuring_engines_own_stop_ends_its_samples(db: Database) -> None:
    """An engine whose account another engine took writes its stop event too: that stop ended the new
    holder's samples while it measured on (a reviewer). Only a stop that ends this account's measuring
    (its event says so) cuts a sample."""
    pool = db.pool
    base: datetime = await pool.fetchval("SELECT date_trunc('hour', now()) - interval '2 hours'")
    until = base + timedelta(minutes=5)
    measured = []
    for account, event in (
        ("sim:taken", ("engine stopped; taken over", 12, None)),
        ("sim:stopped", ("engine stopped", 35, {"ends_coverage_samples": True})),
    ):
        store = Store(pool, account)
        for seconds in (0, 10, 20, 30):
            await store.record_coverage_sample(
                CoverageSample(base + timedelta(seconds=seconds), 1, 1, 0, 0, Decimal(100))
            )
        message, after, data = event
        await store.record_event(
            Severity.INFO, "engine_stopped", message, at=base + timedelta(seconds=after), data=data
        )
        report = await history.shift_report(pool, account, base, until, sample_stands_seconds=30)
        [period] = await history.coverage_by_period(pool, account, [(base, until)], sample_stands_seconds=30)
        assert report.measured_seconds == period.measured_seconds
        measured.append(report.measured_seconds)
    # Taken over: 30 s of samples, the last standing its 30 s. Stopped: up to the stop, 5 s past the last.
    assert measured == [Decimal("60.000"), Decimal("35.000")]


async def test_a_first_protection_later_than_grace_is_an_uncovered_span_from_the_fill(db: Database) -> None:
    """Stops that reached the venue 6–9 s after the fill (grace 5 s): the dashboard said UNCOVERED and the
    breaker tripped, and the history recorded nothing, `tsbot report` "uncovered: 0.554 s" (opme48). A first
    protection later than the grace period is a span from the fill; one within it is the opening's round
    trip, no span."""
    # (A stop is confirmed when the venue takes it, by the account stream: half the round trip, 6 s here.)
    latency = '{"create_order": {"distribution": "fixed", "seconds": 12.0}}'
    settings = settings_for(
        db, {"VENUE__SIM__LATENCY__BY_CALL": latency, "VENUE__SIM__REQUEST_TIMEOUT_SECONDS": "20"}
    )
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        (guard,) = await open_positions(engine, clock, [SYMBOLS[70]])
        await drive_until_covered(engine, clock, 1)
        await drive_until(
            clock,
            lambda: db.pool.fetchval(
                "SELECT count(*) = 1 FROM monitoring.uncovered_spans WHERE ended_at IS NOT NULL"
            ),
            what="the span recorded",
        )
        [span] = await _spans(db)
        assert span["position_id"] == guard.position_id
        assert span["ended_by"] == "protected"
        lasted = (span["ended_at"] - span["started_at"]).total_seconds()
        assert 5.0 < lasted <= 9.0, lasted  # from the fill to both stops confirmed (6 s after they left)
    finally:
        await drive(clock, engine.stop())

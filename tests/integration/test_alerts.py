"""Alerts off-screen, end to end: a real engine on the sim venue with the embedded PostgreSQL sends its
alerts through apprise to a real HTTP receiver on 127.0.0.1 (`json://` URLs).

The engine runs on a ManualClock (the rules' times are virtual); delivery is real network I/O in real time.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from engine.clock import ManualClock
from engine.config import LoadedConfig, Settings
from engine.engine import Engine
from engine.exchange.port import OrderType
from engine.logs import RedactingFormatter
from engine.venues.sim import SimVenue
from engine.venues.sim.settings import CallKind, FaultKind
from engine.venues.sim.universe import UNIVERSE
from storage.database import Database
from storage.embedded import (
    EmbeddedPostgres,
    PostmasterState,
    postmaster_state,
    restart_embedded,
    stop_embedded,
)
from tests.integration.engine_support import engine_settings, make_engine
from tests.integration.test_failure_modes_f1_f5 import (
    killed_after_protecting,
)
from tests.support.driving import drive, drive_until
from tests.support.owned_postgres import StaleSocketLock, kill_postmaster, start_owned
from tests.support.webhook import Delivery, WebhookReceiver

SYMBOLS = sorted(UNIVERSE)
TOKEN = "s3cr3t-T0KEN-9f8e7d6c5b4a"  # the part of the webhook URL that is a secret


@pytest.fixture
async def receiver():
    server = await WebhookReceiver().start()
    yield server
    await server.close()


def alert_settings(db: Database, url: str, overrides: Mapping[str, str] | None = None):
    return engine_settings(
        db.target.dsn,
        {
            "SIGNALS__MAX_POSITIONS": "100",
            "PROTECTION__GRACE_SECONDS": "5",
            "ALERTS__URLS": url,
            "ALERTS__UNCOVERED_SECONDS": "10",
            "ALERTS__ESCALATE_AFTER_SECONDS": "30",
            "ALERTS__REPEAT_MINUTES": "60",
            "ALERTS__SEND_TIMEOUT_SECONDS": "2",
            **(overrides or {}),
        },
    )


async def until_delivered(clock: ManualClock, receiver: WebhookReceiver, *words: str, count: int = 1) -> None:
    """Drive virtual time until `count` deliveries contain every word (delivery itself takes real time)."""
    await drive_until(
        clock,
        lambda: len(receiver.matching(*words)) >= count,
        step=0.02,
        limit=600.0,
        what=f"alert with {words} delivered",
    )


async def open_failing(engine: Engine, clock: ManualClock, symbols: list[str]) -> None:
    """Open positions whose stops the venue then refuses (HTTP 500 on every stop placement, while entries
    go through: Binance takes stops at an endpoint of their own)."""
    assert engine.store is not None
    venue = engine.venue
    venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.SERVER_ERROR, count=1_000_000, stops_only=True)
    await engine.store.insert_signals([(s, "long", None, None) for s in symbols])
    assert engine.manager is not None
    manager = engine.manager
    await drive_until(clock, lambda: len(manager.guards) == len(symbols), what="positions opened")


def stops_on_venue(engine: Engine, clock: ManualClock, symbol: str) -> list[OrderType]:
    return sorted(o.type for o in engine.venue.core.open_protective_orders(clock.now(), symbol))


async def test_an_uncovered_position_is_alerted_once_escalated_and_its_recovery_sent(
    db: Database, receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = alert_settings(
        db,
        receiver.url(f"/hooks/{TOKEN}"),
        {
            # This test is about the one position's alert: coverage and breaker alerts stay out of it.
            "ALERTS__COVERAGE_BELOW_PERCENT": "0",
            "ALERTS__COVERAGE_CRITICAL_PERCENT": "0",
            "PROTECTION__BREAKER__MIN_ATTEMPTS": "100000",
        },
    )
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    symbol = SYMBOLS[11]
    try:
        await open_failing(engine, clock, [symbol])
        assert engine.manager is not None
        guard = engine.manager.by_symbol[symbol]

        # The alert arrives naming the symbol and how long it has been unprotected (past the 10 s line).
        await until_delivered(clock, receiver, symbol, "uncovered for")
        (first,) = receiver.matching(symbol, "uncovered for")
        assert first.path == f"/hooks/{TOKEN}"
        assert first.payload["type"] == "warning"
        assert first.payload["title"].startswith("WARNING tsbot sim:default: WARNING: ")
        age = int(re.search(rf"{symbol} uncovered for (\d+)s", first.payload["message"]).group(1))
        assert 10 <= age < 30
        assert not guard.covered
        assert stops_on_venue(engine, clock, symbol) == []  # the venue's truth: really unprotected

        # While it lasts (and before the escalation line) it is not sent again …
        started = clock.monotonic()
        await drive_until(clock, lambda: clock.monotonic() - started >= 15, what="15 s more uncovered")
        assert len(receiver.matching(symbol)) == 1
        # … until it has lasted 30 s: then once more, as CRITICAL.
        await until_delivered(clock, receiver, symbol, "CRITICAL (escalated)")
        escalated = receiver.matching(symbol, "CRITICAL (escalated)")
        assert len(escalated) == 1
        assert escalated[0].payload["type"] == "failure"
        assert len(receiver.matching(symbol)) == 2

        # Re-protected: the recovery message follows, and the stops are on the venue.
        engine.venue.clear_injected_faults()
        results = await drive(clock, engine.reprotect_uncovered(engine.plan_reprotect()))
        assert [(r.symbol, r.covered) for r in results] == [(symbol, True)]
        await until_delivered(clock, receiver, symbol, "RECOVERED")
        (recovered,) = receiver.matching(symbol, "RECOVERED")
        assert recovered.payload["type"] == "success"
        assert "protected again" in recovered.payload["message"]
        assert stops_on_venue(engine, clock, symbol) == sorted(
            [OrderType.STOP_MARKET, OrderType.TRAILING_STOP_MARKET]
        )
        assert len(receiver.matching(symbol)) == 3
    finally:
        await drive(clock, engine.stop())

    # The stop is said too: the exit line with the uncovered count.
    await until_delivered(clock, receiver, "engine stopped")
    (stopped,) = receiver.matching("engine stopped")
    assert "1 open position keeps its stops on the exchange; uncovered 0" in stopped.payload["message"]
    # The URL's token is in no log line as the log handlers write it (masked there, like every secret):
    # urllib3 does name the path it posts to at DEBUG, apprise's own lines included.
    raw = "\n".join(r.getMessage() for r in caplog.records)
    assert TOKEN in raw  # (so the masking below is what keeps it out)
    redactor = RedactingFormatter(LoadedConfig(settings=settings, path=None).secret_values())
    written = "\n".join(redactor.format(r) for r in caplog.records)
    assert "alert: WARNING" in written
    assert "POST /hooks/***" in written
    assert TOKEN not in written


async def test_a_breaker_trip_is_alerted(db: Database, receiver: WebhookReceiver) -> None:
    settings = alert_settings(db, receiver.url("/breaker"))
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        await open_failing(engine, clock, SYMBOLS[60:63])
        await drive_until(clock, lambda: engine.entries_paused_by == "breaker", what="the breaker tripped")
        await until_delivered(clock, receiver, "circuit breaker tripped: entries paused")
        (tripped,) = receiver.matching("circuit breaker tripped")
        assert engine.entries_pause_reason in tripped.payload["message"]
        # The coverage alarm went out as well (none of those past grace protected: 0 %, CRITICAL).
        await until_delivered(clock, receiver, "CRITICAL: coverage 0.0% (0/")
        assert receiver.matching("coverage 0.0%")[0].payload["type"] == "failure"
    finally:
        await drive(clock, engine.stop())
    await until_delivered(clock, receiver, "engine stopped", "UNCOVERED 3")
    assert receiver.matching("engine stopped")[0].payload["type"] == "failure"


async def test_a_breaker_pause_carried_over_a_restart_is_said_carried_and_timed_from_its_trip(
    db: Database, receiver: WebhookReceiver
) -> None:
    """A breaker pause persists over a restart (only the operator resumes it). The next engine alerted
    "circuit breaker tripped" as if protection had just failed again, and its recovery "after 4s" timed the
    pause from the restart, not from the trip an hour before (an operator)."""
    clock = ManualClock()
    engine_a = make_engine(alert_settings(db, receiver.url("/a")), clock)
    await drive(clock, engine_a.start())
    try:
        engine_a.pause_entries(by="breaker", reason="2 positions uncovered past 15s")
        await until_delivered(clock, receiver, "circuit breaker tripped")
    finally:
        await drive(clock, engine_a.stop())
    await clock.advance(3600.0)  # an hour with no engine

    engine_b = make_engine(alert_settings(db, receiver.url("/b")), clock)
    await drive(clock, engine_b.start())
    try:

        def of_b(*words: str) -> list[Delivery]:
            return [d for d in receiver.matching(*words) if d.path == "/b"]

        await drive_until(clock, lambda: of_b("circuit breaker"), step=0.02, what="engine B's breaker alert")
        [carried] = of_b("circuit breaker")
        assert "tripped" not in carried.text, carried.text
        assert "carried over" in carried.text, carried.text
        assert "2 positions uncovered past 15s" in carried.text, carried.text
        assert "1h00m" in carried.text, carried.text  # how long it has stood
        # Past the escalation line (30 s) already: said CRITICAL at once, not escalated a check later.
        assert carried.text.startswith("CRITICAL"), carried.text
        await drive(clock, clock.sleep(5.0))
        assert len(of_b("circuit breaker")) == 1, [d.text for d in of_b("circuit breaker")]
        assert engine_b.resume_entries()[0]
        await drive_until(
            clock, lambda: of_b("no longer paused by the circuit breaker"), step=0.02, what="its recovery"
        )
        [recovered] = of_b("no longer paused by the circuit breaker")
        assert "after 1h00m" in recovered.text, recovered.text
    finally:
        await drive(clock, engine_b.stop())


async def test_a_receiver_that_never_answers_does_not_delay_protection(db: Database) -> None:
    hanging = await WebhookReceiver(hang=True).start()
    settings = alert_settings(
        db, hanging.url(f"/dead/{TOKEN}"), {"PROTECTION__BREAKER__MIN_ATTEMPTS": "100000"}
    )
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        # An uncovered position: its alert goes to a receiver that accepts and never answers …
        await open_failing(engine, clock, [SYMBOLS[20]])
        assert engine.alerter is not None
        await drive_until(clock, lambda: hanging.connections >= 1, step=0.02, what="the alert being sent")
        assert hanging.deliveries == []
        # … while the venue recovers and a new wave opens: every position gets its stops on the venue,
        # as soon as it would without alerts (the protection path never waits for a delivery).
        engine.venue.clear_injected_faults()
        assert engine.store is not None
        fresh = SYMBOLS[30:35]
        await engine.store.insert_signals([(s, "long", None, None) for s in fresh])
        manager = engine.manager
        assert manager is not None
        await drive_until(
            clock,
            lambda: all(s in manager.by_symbol and manager.by_symbol[s].covered for s in fresh),
            what="the new wave protected",
        )
        for symbol in fresh:
            assert stops_on_venue(engine, clock, symbol) == sorted(
                [OrderType.STOP_MARKET, OrderType.TRAILING_STOP_MARKET]
            )
        assert hanging.deliveries == []  # still nothing delivered: the receiver is dead
        # The stop is bounded too: a few seconds at most for the last alert, then the engine is stopped.
    finally:
        report = await drive(clock, engine.stop())
        await hanging.close()
    assert engine.state.value == "stopped"
    assert report.open_positions == 6


async def test_a_protection_restart_is_no_false_recovery_and_no_second_alert(
    db: Database, receiver: WebhookReceiver
) -> None:
    """`r` rebuilds the protection manager: while the new one is still loading, it knows none of the
    positions. Read then, the uncovered position would "recover" and be alerted again a moment later."""
    settings = alert_settings(
        db,
        receiver.url("/restart"),
        {
            "ALERTS__COVERAGE_BELOW_PERCENT": "0",
            "ALERTS__COVERAGE_CRITICAL_PERCENT": "0",
            "ALERTS__CHECK_SECONDS": "0.2",
            "ALERTS__ESCALATE_AFTER_SECONDS": "3600",
            "PROTECTION__BREAKER__MIN_ATTEMPTS": "100000",
            "PROTECTION__BREAKER__UNCOVERED_FACTOR": "1000",
            "VENUE__SIM__LATENCY__SECONDS": "1",  # the restart's venue reads take seconds: checks land in it
        },
    )
    # Virtual wall time from the real one: a restored position's fill time comes from the database's clock.
    clock = ManualClock(start=time.time())
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    symbol = SYMBOLS[40]
    try:
        await open_failing(engine, clock, [symbol])
        await until_delivered(clock, receiver, symbol, "uncovered for")
        await drive(clock, engine.restart_protection())
        assert engine.manager is not None
        assert not engine.manager.by_symbol[symbol].covered
        started = clock.monotonic()
        await drive_until(clock, lambda: clock.monotonic() - started >= 5, what="5 s after the restart")
        assert engine.alerter is not None
        assert [a.status.value for a in engine.alerter.sent if symbol in a.text] == ["new"]
        assert len(receiver.matching(symbol)) == 1
    finally:
        await drive(clock, engine.stop())


@pytest.fixture(scope="module")
def owned_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """An embedded server of this module's own, which a test may kill."""
    server = start_owned(tmp_path_factory.mktemp("alerts-pg") / "pgdata")
    yield server
    if postmaster_state(server.data_dir)[0] is PostmasterState.DEAD:
        restart_embedded(server.data_dir)
    stop_embedded(server.data_dir)


def _on_owned_server(
    server: EmbeddedPostgres, receiver: WebhookReceiver, tmp_path: Path, path: str
) -> Settings:
    """An engine on the embedded server in `server`'s data_dir (which it then owns), alerting to `path`."""
    return engine_settings(
        "",
        {
            "DATABASE__DATA_DIR": str(server.data_dir),
            "DATABASE__NAME": f"alerts_{uuid.uuid4().hex[:12]}",
            "DATABASE__PROBE_TIMEOUT_SECONDS": "1",
            "LOGGING__FILE": str(tmp_path / "logs" / "trading_bot.log"),
            "ALERTS__URLS": receiver.url(path),
        },
    )


async def test_a_database_outage_and_the_lost_lease_are_alerted_and_their_recovery_sent(
    owned_server: EmbeddedPostgres, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    settings = _on_owned_server(owned_server, receiver, tmp_path, "/outage")
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    stale_lock = StaleSocketLock(owned_server)
    try:
        watch = engine.db_watch
        assert watch is not None
        kill_postmaster(owned_server.data_dir)
        stale_lock.hold()  # it cannot come back until the test lets it
        await drive_until(clock, lambda: watch.down, what="the outage noticed")
        await until_delivered(clock, receiver, "WARNING: database unreachable for")
        await until_delivered(clock, receiver, "WARNING: account lease lost for")
        assert receiver.matching("database unreachable")[0].payload["type"] == "warning"

        stale_lock.release()
        await drive_until(
            clock,
            lambda: not watch.down and engine.lease_lost_since is None,
            what="the database back, the lease held",
        )
        await until_delivered(clock, receiver, "RECOVERED: the database answers again")
        await until_delivered(clock, receiver, "RECOVERED: the account lease is held again")
        assert len(receiver.matching("WARNING: database unreachable")) == 1  # said once while it lasted
    finally:
        stale_lock.release()
        await drive(clock, engine.stop())


async def test_a_breaker_pause_that_outlasts_a_database_outage_is_not_said_recovered_and_tripped_again(
    owned_server: EmbeddedPostgres, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    """While the database is away, entries show as paused by it, and the breaker's pause persisted under
    it: its alert said "RECOVERED: entries are no longer paused by the circuit breaker" a few seconds into
    the outage, then "circuit breaker tripped" again once the database was back, with figures 44 s old
    (an operator). The breaker's pause is one pause until it is lifted: tripped once, never recovered."""
    settings = _on_owned_server(owned_server, receiver, tmp_path, "/breaker")
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        engine.pause_entries(by="breaker", reason="coverage 82.4 % of 17 position(s) past grace")
        await until_delivered(clock, receiver, "circuit breaker tripped")
        watch = engine.db_watch
        assert watch is not None
        kill_postmaster(owned_server.data_dir)
        await drive_until(clock, lambda: watch.down, what="the outage noticed")
        assert engine.entries_paused_by == "database"
        await until_delivered(clock, receiver, "WARNING: database unreachable for")
        await drive_until(clock, lambda: not watch.down, what="the database back")
        await until_delivered(clock, receiver, "RECOVERED: the database answers again")
        started = clock.monotonic()
        await drive_until(clock, lambda: clock.monotonic() - started >= 10, what="10 s on")
        assert engine.entries_paused_by == "breaker"
        assert receiver.matching("no longer paused by the circuit breaker") == []
        assert len(receiver.matching("circuit breaker tripped")) == 1
    finally:
        await drive(clock, engine.stop())


async def _killed_holding(
    db: Database, receiver: WebhookReceiver, symbols: list[str]
) -> tuple[Engine, ManualClock, Settings, int]:
    """An engine that protected a position on each of `symbols` and died (no drain); its stop alert
    delivered. Returns it, the clock, its settings and how many deliveries came before the next engine."""
    settings = alert_settings(db, receiver.url(f"/hooks/{TOKEN}"))
    clock = ManualClock()
    first = await killed_after_protecting(settings, clock, symbols)
    await until_delivered(clock, receiver, "engine stopped")
    return first, clock, settings, len(receiver.deliveries)


async def _given_up(
    clock: ManualClock, starting: asyncio.Future, receiver: WebhookReceiver, before: int, match: str
) -> str:
    """Drive a start until it fails (its error matching `match`) and its alert is delivered: the alert."""
    try:
        await drive_until(clock, starting.done, step=0.05, limit=600.0, what="the start given up")
        with pytest.raises(Exception, match=match):
            starting.result()

        def said() -> list[str]:
            return [d.text for d in receiver.deliveries[before:] if "the start did not finish" in d.text]

        await drive_until(
            clock, lambda: bool(said()), step=0.02, limit=60.0, what="the given-up start alerted"
        )
    finally:
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
    [given_up] = said()
    return given_up


async def test_a_start_that_cannot_read_the_venue_alerts_what_its_records_hold_and_that_it_gave_up(
    db: Database, receiver: WebhookReceiver
) -> None:
    """The alerts began only once a start had finished: a start waiting out a ban for minutes, positions on
    the record unverified (uncovered), alerted nothing, and one given up on said nothing either (a
    reviewer). They run from the start, on the records it carries."""
    first, clock, settings, before = await _killed_holding(db, receiver, SYMBOLS[30:32])
    second = make_engine(settings, clock, SimVenue(settings.venue.sim, clock=clock, core=first.venue.core))
    second.venue.inject_fault(CallKind.LOAD_MARKETS, FaultKind.NETWORK_ERROR_BEFORE_SEND, count=1_000)
    starting = asyncio.ensure_future(second.start())
    await drive_until(
        clock,
        lambda: any("uncovered for" in d.text for d in receiver.deliveries[before:]),
        step=0.02,
        limit=600.0,
        what="the carried positions alerted uncovered during the start",
    )
    given_up = await _given_up(clock, starting, receiver, before, "load_markets")
    # What the record holds: both covered on it, neither verified (the venue was never read). Not
    # "2 uncovered": the record says covered (an operator saw nine "uncovered" of which the record had one).
    assert "2 open positions on the record, 2 not verified (the venue was not read)" in given_up
    assert given_up.startswith("WARNING")  # as a stop leaving covered positions says it


async def test_a_start_given_up_once_its_guards_exist_alerts_the_positions_they_guarded(
    db: Database, receiver: WebhookReceiver
) -> None:
    """Given up after its guards existed (here its last write refused), the start's alert counted the
    positions once the guards had stopped, and those had left the count: "no open position on the record",
    at WARNING, while the venue held two (a reviewer). They are counted before the guards stop."""
    first, clock, settings, before = await _killed_holding(db, receiver, SYMBOLS[33:35])
    await db.pool.execute(
        """
        CREATE FUNCTION monitoring.refuse_start_event() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN RAISE EXCEPTION 'the events table refuses this write'; END $$;
        CREATE TRIGGER refuse_start_event BEFORE INSERT ON monitoring.events
        FOR EACH ROW WHEN (NEW.type = 'engine_started') EXECUTE FUNCTION monitoring.refuse_start_event();
        """
    )
    second = make_engine(settings, clock, SimVenue(settings.venue.sim, clock=clock, core=first.venue.core))
    given_up = await _given_up(
        clock, asyncio.ensure_future(second.start()), receiver, before, "refuses this write"
    )
    assert "2 open positions, each with both stops confirmed on the venue" in given_up, given_up
    assert sorted(p.symbol for p in first.venue.core.positions(clock.now())) == sorted(SYMBOLS[33:35])

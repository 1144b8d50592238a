"""The opt-in Prometheus endpoint and `/healthz` (issue 13, "Metrics"): a real engine on the sim venue and
the embedded PostgreSQL, scraped over loopback HTTP on the port the engine bound. The figures are checked
against the venue's truth (a stop removed on the sim core makes a position uncovered) and against the
engine's own; the text must parse as Prometheus exposition format."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.clock import ManualClock
from engine.config import MetricsSettings
from engine.engine import Engine
from engine.metrics_server import MetricsUnavailable
from engine.venues.sim.settings import CallKind, FaultKind
from storage.database import Database
from storage.embedded import EmbeddedPostgres
from storage.lease import LeaseHeld
from tests.integration.engine_support import make_engine
from tests.integration.test_database_outage import COVERED_BEFORE, owned_server  # noqa: F401  (fixture)
from tests.integration.test_database_outage import _open as open_one
from tests.integration.test_database_outage import _settings as outage_settings
from tests.integration.test_failure_modes_f1_f5 import (
    SYMBOLS,
    drive_until_covered,
    open_positions,
    settings_for,
)
from tests.support.driving import drive, drive_until
from tests.support.owned_postgres import resume, stop_postmaster

METRICS_ON = {"METRICS__ENABLED": "true", "METRICS__PORT": "0"}


async def http_get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, dict[str, str], str]:
    """One HTTP/1.1 GET over a plain socket: (status, headers, body)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert int(headers["content-length"]) == len(body)
    return status, headers, body.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition text, by (name, sorted labels); parsing fails on malformed text."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


async def scrape(engine: Engine) -> dict:
    server = engine.metrics_server
    assert server is not None
    assert server.port
    status, headers, body = await http_get(server.port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    return samples(body)


async def healthz(engine: Engine) -> tuple[int, dict]:
    server = engine.metrics_server
    assert server is not None
    assert server.port
    status, headers, body = await http_get(server.port, "/healthz")
    assert headers["content-type"] == "application/json"
    return status, json.loads(body)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 another socket listens on."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    try:
        yield holder.getsockname()[1]
    finally:
        holder.close()


async def test_metrics_follow_the_venue_truth_and_healthz_turns_503_when_critical(db: Database) -> None:
    settings = settings_for(
        db,
        {
            **METRICS_ON,
            "PROTECTION__RECONCILE_SECONDS": "5",
            "HEALTH__UNCOVERED_CRITICAL_SECONDS": "20",
        },
    )
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        symbols = [SYMBOLS[70], SYMBOLS[71], SYMBOLS[72]]
        guards = await open_positions(engine, clock, symbols)
        await drive_until_covered(engine, clock, 3)
        await drive_until(
            clock, lambda: engine.health_components and engine.coverage().protected == 3, what="health"
        )
        await drive_until(
            clock,
            lambda: all(c.state.value == "healthy" for c in engine.health_components),
            what="every component healthy",
        )

        found = await scrape(engine)
        assert value(found, "tsbot_engine_state", state="running") == 1
        assert value(found, "tsbot_open_positions") == 3
        assert value(found, "tsbot_positions_protected") == 3
        assert value(found, "tsbot_positions_uncovered") == 0
        assert value(found, "tsbot_oldest_unprotected_seconds") == 0
        for stop in ("hard_stop", "trailing_stop", "both"):
            assert value(found, "tsbot_coverage_percent", stop=stop) == 100.0
        assert value(found, "tsbot_database_up") == 1
        # The sim venue's push streams (issue 11), and no position with a stale mark.
        assert value(found, "tsbot_stream_connected", stream="account") == 1
        assert value(found, "tsbot_stream_connected", stream="marks") == 1
        assert value(found, "tsbot_stream_reconnects_total", stream="account") == 0
        assert value(found, "tsbot_stale_mark_positions") == 0
        assert value(found, "tsbot_database_journal_depth") == 0
        assert value(found, "tsbot_entries_paused") == 0
        assert value(found, "tsbot_circuit_breaker_tripped") == 0
        # Every protective order the venue holds went through the histogram of create_order calls.
        creates = engine.call_stats.histogram.counts("create_order")
        assert value(found, "tsbot_venue_call_seconds_count", kind="create_order") == creates.count >= 3 + 6
        assert (
            value(found, "tsbot_venue_call_seconds_bucket", kind="create_order", le="+Inf") == creates.count
        )
        assert value(found, "tsbot_protective_orders_sent_total") == engine.order_budget.protective_sent >= 6  # type: ignore[union-attr]
        assert 0 < value(found, "tsbot_rate_budget_used_ratio", budget="orders") <= 1
        assert ("tsbot_budget_wait_seconds_count", (("lane", "protective"),)) in found
        assert value(found, "tsbot_protection_failures_total", **{"class": "server_error"}) == 0
        status, body = await healthz(engine)
        assert (status, body["status"], body["uncovered"], body["open_positions"]) == (200, "ok", 0, 3)
        # Named as `tsbot status` names it (it said "default" where status said "sim:default").
        assert (body["account"], body["account_label"]) == ("sim:default", "default")

        # The venue loses one hard stop, and every protective order fails from now on (HTTP 500).
        victim = guards[1]
        engine.venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.SERVER_ERROR, 100_000)
        assert victim.stop_loss.client_order_id is not None
        engine.venue.core.cancel_order(victim.symbol, victim.stop_loss.client_order_id, clock.now())
        engine.manager.request_reconcile()  # type: ignore[union-attr]
        await drive_until(clock, lambda: not victim.covered, what="the loss seen")
        await drive_until(
            clock, lambda: engine.coverage().uncovered == 1 and engine.coverage().lasting == 1, what="lasting"
        )

        async def failure_counted() -> bool:
            # (virtual time runs on while the guard records the stop before sending it: on a loaded machine
            # "lasting" came before the failed send's event reached the endpoint, once in a clean clone)
            found = await scrape(engine)
            return value(found, "tsbot_protection_failures_total", **{"class": "server_error"}) >= 1

        await drive_until(clock, failure_counted, what="the failed re-placement counted")
        found = await scrape(engine)
        assert value(found, "tsbot_positions_uncovered") == 1
        assert value(found, "tsbot_positions_protected") == 2
        assert value(found, "tsbot_coverage_percent", stop="hard_stop") == pytest.approx(200 / 3)
        assert value(found, "tsbot_coverage_percent", stop="trailing_stop") == 100.0
        assert value(found, "tsbot_coverage_percent", stop="both") == pytest.approx(200 / 3)
        assert value(found, "tsbot_positions_uncovered_lasting") == 1
        truth = engine.coverage().oldest_unprotected_seconds
        assert truth is not None
        assert value(found, "tsbot_oldest_unprotected_seconds") == pytest.approx(truth, abs=0.5)
        assert value(found, "tsbot_protection_failures_total", **{"class": "server_error"}) >= 1
        assert value(found, "tsbot_venue_call_errors_total", kind="create_order") >= 1

        # Past the critical line, health says CRITICAL and /healthz answers 503 with the reason.
        await drive_until(
            clock,
            lambda: any(c.state.value == "critical" for c in engine.health_components),
            what="protection critical",
        )
        status, body = await healthz(engine)
        assert status == 503
        assert body["status"] == "critical"
        assert "protection" in body["reason"]
        assert body["uncovered"] == 1
        assert body["coverage_percent"] == 66.7  # 2 of 3 with both stops, rounded as the gauge's SQL
        assert body["components"]["protection"] == "critical"
        found = await scrape(engine)
        assert value(found, "tsbot_health_severity", component="protection") == 3
        assert value(found, "tsbot_healthz_ok") == 0

        # Uncovered for more than 3 grace periods: the breaker pauses entries, and the metrics say so.
        await drive_until(clock, lambda: engine.entries_paused_by == "breaker", what="the breaker tripped")
        found = await scrape(engine)
        assert value(found, "tsbot_circuit_breaker_tripped") == 1
        assert value(found, "tsbot_entries_paused") == 1
    finally:
        await drive(clock, engine.stop())
    # Stopped: nothing listens any more.
    with pytest.raises(ConnectionRefusedError):
        await http_get(engine.metrics_server.port, "/healthz")  # type: ignore[union-attr,arg-type]


async def test_healthz_and_the_dashboard_judge_protection_at_this_instant_not_at_the_last_measurement(
    db: Database,
) -> None:
    """Health is measured every interval; between two measurements /healthz said "ok" beside "uncovered 1"
    (and "critical" beside "uncovered 0" once the stop was back, an operator's find). The protection
    component is judged from the figures it is shown with."""
    settings = settings_for(
        db, {**METRICS_ON, "PROTECTION__RECONCILE_SECONDS": "5", "HEALTH__INTERVAL_SECONDS": "120"}
    )
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        guards = await open_positions(engine, clock, [SYMBOLS[73], SYMBOLS[74]])
        await drive_until_covered(engine, clock, 2)
        measured = engine.health_measured_at
        assert measured is not None
        status, body = await healthz(engine)
        assert (status, body["status"], body["uncovered"]) == (200, "ok", 0)

        victim = guards[0]
        engine.venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.SERVER_ERROR, 100_000)
        assert victim.stop_loss.client_order_id is not None
        engine.venue.core.cancel_order(victim.symbol, victim.stop_loss.client_order_id, clock.now())
        engine.manager.request_reconcile()  # type: ignore[union-attr]
        await drive_until(clock, lambda: engine.coverage().uncovered == 1, what="uncovered")
        # Judged once it has lasted a grace period, as the breaker and the alerts judge (a stop-out settling
        # is no alarm: test_coverage_figures.py); shown uncovered meanwhile.
        status, body = await healthz(engine)
        assert (status, body["uncovered"]) == (200, 1)
        await drive(clock, clock.sleep(float(settings.protection.grace_seconds)))
        assert engine.coverage().uncovered == 1
        assert engine.health_measured_at == measured  # no measurement since: the next is minutes away

        status, body = await healthz(engine)  # 1 of 2 past grace with both stops: under the critical line
        assert (status, body["status"], body["uncovered"]) == (503, "critical", 1)
        assert body["components"]["protection"] == "critical"
        assert "Low SL coverage: 50.0% (1/2)" in body["reason"]
        found = await scrape(engine)
        assert value(found, "tsbot_health_severity", component="protection") == 3
        assert value(found, "tsbot_healthz_ok") == 0
        shown = {c.component: c.state.value for c in engine.snapshot().health}
        assert shown["protection"] == "critical"
    finally:
        await drive(clock, engine.stop())


async def test_disabled_by_default_nothing_listens(db: Database) -> None:
    settings = settings_for(db)
    assert settings.metrics.enabled is False
    assert (settings.metrics.host, settings.metrics.port) == ("127.0.0.1", 9464)
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        assert engine.metrics_server is None
        assert not any(t.get_name().startswith("metrics") for t in asyncio.all_tasks())
    finally:
        await drive(clock, engine.stop())


async def test_a_port_in_use_stops_the_start_with_one_line_naming_it(db: Database, busy_port: int) -> None:
    settings = settings_for(db, {"METRICS__ENABLED": "true", "METRICS__PORT": str(busy_port)})
    clock = ManualClock()
    engine = make_engine(settings, clock)
    with pytest.raises(MetricsUnavailable) as raised:
        await drive(clock, engine.start())
    message = str(raised.value)
    assert "\n" not in message
    assert f"127.0.0.1:{busy_port}" in message
    assert "already in use" in message
    assert engine.store is None  # stopped before the database was opened: nothing touched
    assert not any(t.get_name().startswith("metrics") for t in asyncio.all_tasks())


async def test_two_engines_in_one_process_keep_their_own_figures(db: Database) -> None:
    """Each engine has a registry of its own: two of them (two accounts) in one process do not collide."""
    clock = ManualClock()
    first = make_engine(settings_for(db, {**METRICS_ON, "VENUE__ACCOUNT": "one"}), clock)
    second = make_engine(settings_for(db, {**METRICS_ON, "VENUE__ACCOUNT": "two"}), clock)
    await drive(clock, first.start())
    try:
        await drive(clock, second.start())
        try:
            one, two = await scrape(first), await scrape(second)
            # The account as status and /healthz name it, the label beside it (a reviewer: "default" here
            # beside "sim:default" there).
            labels = {"mode": "SIM", "venue": "sim", "version": "test"}
            assert value(one, "tsbot_engine_info", account="sim:one", account_label="one", **labels) == 1
            assert value(two, "tsbot_engine_info", account="sim:two", account_label="two", **labels) == 1
            assert (
                "tsbot_engine_info",
                (
                    ("account", "sim:two"),
                    ("account_label", "two"),
                    ("mode", "SIM"),
                    ("venue", "sim"),
                    ("version", "test"),
                ),
            ) not in one
            assert first.metrics_server.port != second.metrics_server.port  # type: ignore[union-attr]
        finally:
            await drive(clock, second.stop())
    finally:
        await drive(clock, first.stop())


async def test_a_silent_or_garbled_client_does_not_hold_up_a_scrape(db: Database) -> None:
    settings = settings_for(db, METRICS_ON)
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        server = engine.metrics_server
        assert server is not None
        assert server.port
        # A client that connects and says nothing, held open across the scrape and the engine's stop.
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            found = await scrape(engine)
            assert value(found, "tsbot_engine_state", state="running") == 1
            # Not HTTP: the connection is closed unanswered.
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"\x16\x03\x01 hello\r\n\r\n")
            await writer.drain()
            assert await reader.read() == b""
            writer.close()
            await writer.wait_closed()
            # Only GET and HEAD; unknown paths are 404.
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            assert (await reader.read()).startswith(b"HTTP/1.1 405 ")
            writer.close()
            await writer.wait_closed()
            status, _headers, _body = await http_get(server.port, "/metrics/../etc/passwd")
            assert status == 404
            await drive(clock, engine.stop())
            assert await idle_reader.read() == b""  # the engine's stop closed it, unanswered
        finally:
            idle_writer.close()
    finally:
        await drive(clock, engine.stop())


async def test_a_frozen_database_shows_as_down_with_its_journal_and_scrapes_still_answer(
    owned_server: EmbeddedPostgres,  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
) -> None:
    """The postmaster stops answering (SIGSTOP): the scrape reads nothing from the database, so it answers
    at once, saying the database is down and how many protective writes wait in the journal; once the
    engine has the server back, up again and the journal empty."""
    settings, _dsn = outage_settings(owned_server, tmp_path)
    settings = settings.model_copy(update={"metrics": MetricsSettings(enabled=True, port=0)})
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    stopped: int | None = None
    try:
        store, manager, watch = engine.store, engine.manager, engine.db_watch
        assert store is not None
        assert manager is not None
        assert watch is not None
        guard = await open_one(engine, clock, COVERED_BEFORE)
        assert value(await scrape(engine), "tsbot_database_up") == 1

        stopped = stop_postmaster(owned_server.data_dir)
        await drive_until(clock, lambda: watch.down, what="a probe got no answer")
        lost = guard.trailing_stop.client_order_id
        assert lost is not None
        engine.venue.core.cancel_order(COVERED_BEFORE, lost, clock.now())
        manager.request_reconcile()
        await drive_until(
            clock,
            lambda: guard.trailing_stop.confirmed and guard.trailing_stop.client_order_id != lost,
            what="the trailing stop replaced, its writes journaled",
        )
        depth_before = store.journal_depth
        found = await scrape(engine)
        assert value(found, "tsbot_database_up") == 0
        # The scrape says the depth at its moment: the engine may journal a write more while it is read (a
        # loaded CI run scraped 5 and then read 6 from the store).
        assert 1 <= depth_before <= value(found, "tsbot_database_journal_depth") <= store.journal_depth
        assert value(found, "tsbot_entries_paused") == 1  # a position could not be recorded
        status, body = await healthz(engine)  # from memory: answered while the database is frozen
        assert body["entries_paused"] is True
        assert status in (200, 503)

        await drive_until(clock, lambda: not watch.down and not store.has_journal, what="the database back")
        found = await scrape(engine)
        assert value(found, "tsbot_database_up") == 1
        assert value(found, "tsbot_database_journal_depth") == 0
    finally:
        if stopped is not None:
            resume(stopped)
        await drive(clock, engine.stop())


async def test_a_second_engine_on_the_account_is_told_who_holds_it_not_that_the_port_is_taken(
    db: Database,
) -> None:
    """With metrics on, a second engine on the same configuration (a second `tsbot-tui` in another tmux
    window) met the first one's metrics port before its lease and said only "metrics: cannot listen on
    127.0.0.1:…: the address is already in use": no word of the engine trading the account, no offer to
    watch it read-only. The lease is asked first; the holder is named."""
    clock = ManualClock()
    free = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    on_one_port = {"METRICS__ENABLED": "true", "METRICS__PORT": str(port)}
    first = make_engine(settings_for(db, on_one_port), clock)
    second = make_engine(settings_for(db, on_one_port), clock)
    await drive(clock, first.start())
    try:
        with pytest.raises(LeaseHeld) as held:
            await drive(clock, second.start())
        assert held.value.holder is not None
        assert held.value.holder.pid == os.getpid()
        # The first one's endpoint is untouched: it still answers with its own figures.
        figures = await scrape(first)
        assert (
            value(
                figures,
                "tsbot_engine_info",
                account="sim:default",
                account_label="default",
                mode="SIM",
                venue="sim",
                version="test",
            )
            == 1
        )
    finally:
        await drive(clock, first.stop())

"""The dashboard never claims more than the venue confirmed (issue 13): quitting, the exit line, what is
on screen. Against the real engine (sim venue, ManualClock, real PostgreSQL) unless a frozen instant is
needed for the picture."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from rich.style import Style

from engine.accounts import account_key
from engine.cli import _status_report
from engine.clock import ManualClock
from engine.code_watch import SourceWatcher
from engine.config import LoadedConfig
from engine.engine import Engine, EngineSnapshot, EngineState
from engine.events import EventsDropped, PositionOpened, WaveFinished
from engine.venues.sim.settings import CallKind, FaultKind
from engine.venues.sim.universe import UNIVERSE
from protection.health import Component, ComponentHealth, HealthState
from storage.database import Database
from storage.lease import EngineLease, LeasePhase
from storage.repositories import CoverageSample, HealthRow, OrderRecordStatus, Severity, Store
from tests.integration.engine_support import make_engine
from tests.support.driving import drive, drive_until
from tests.support.pg_proxy import SilentFromProxy
from tests.support.records import entry_recorded
from tests.support.waiting import wait_until
from tests.tui.harness import Dashboard, dashboard, started, tui_settings
from tests.tui.snapshots import svg_to_text
from tui import formatting
from tui.app import RunningWave, wave_line
from tui.feed import ReadOnlyFeed
from tui.formatting import clock_time
from tui.screens.info import LeaseHeldScreen
from tui.screens.position import PositionDetailScreen
from tui.widgets.coverage import CoverageGauge
from tui.widgets.positions import error_cell
from tui.widgets.status import CodeBanner

SYMBOLS = sorted(UNIVERSE)
STYLES = {"missing": Style(color="red")}


async def test_quit_dialog_and_exit_line_never_say_a_position_inside_its_grace_period_keeps_its_stops(
    db: Database,
) -> None:
    """A position inside its grace period has no confirmed stop: the dialog and the exit line counted it
    among those that "keep their stops" (and the exit line said "3 keep their stops … UNCOVERED 1")."""
    settings = tui_settings(
        db,
        {
            "PROTECTION__GRACE_SECONDS": "600",  # the unprotected position stays inside its grace period
            "HEALTH__UNCOVERED_CRITICAL_SECONDS": "900",
            "PROTECTION__CALL_TIMEOUT_SECONDS": "2",
        },
    )
    async with dashboard(settings) as board:
        await started(board)
        await board.open_positions(SYMBOLS[70:72])
        await board.until(lambda: board.engine.snapshot().coverage.protected == 2, "2 covered")
        # The entry executes (its answer lost, resolved by client id); no stop order gets through.
        board.venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.TIMEOUT_AFTER_ACCEPT, 1)
        board.venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.NETWORK_ERROR_BEFORE_SEND, 100_000)
        await board.open_positions([SYMBOLS[72]])
        await board.until(lambda: board.uncovered_text() == "uncovered 0 (1 protecting)", "inside grace")

        await board.press("q")
        body = board.confirm_body()
        assert "UNCOVERED" in body  # said of the position inside its grace period
        assert "2 of 3 open positions keep their stops on the exchange" in body
        assert (
            f"WARNING: 1 position is UNCOVERED right now, 1 of them inside their grace period ({SYMBOLS[72]})"
            in body
        )
        await board.press("y")
        await board.until(lambda: board.engine.state is EngineState.STOPPED, "engine stopped")
        await board.until(lambda: not board.app.is_running, "app exited")
        summary = board.app.exit_summary()
        assert summary == (
            f"tsbot-tui stopped: 3 open positions: 2 keep their stops on the exchange; UNCOVERED 1 ({SYMBOLS[72]})"
        )
        assert board.app.left_uncovered


async def test_the_quit_dialog_says_what_quitting_leaves_now_not_when_it_opened(db: Database) -> None:
    """The dialog's words were those of the moment `q` was pressed: left open while a wave came, it said
    "2 of 2 open positions keep their stops" over a third position without any, and `y` then quit on it."""
    settings = tui_settings(
        db,
        {
            "PROTECTION__GRACE_SECONDS": "600",
            "HEALTH__UNCOVERED_CRITICAL_SECONDS": "900",
            "PROTECTION__CALL_TIMEOUT_SECONDS": "2",
        },
    )
    async with dashboard(settings) as board:
        await started(board)
        await board.open_positions(SYMBOLS[74:76])
        await board.until(lambda: board.engine.snapshot().coverage.protected == 2, "2 covered")
        await board.press("q")
        confirm = board.app.screen
        body = board.confirm_body
        assert "2 of 2 open positions keep their stops on the exchange" in body()
        assert "UNCOVERED" not in body()
        # While it is open, a position comes whose stops the venue does not take.
        board.venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.TIMEOUT_AFTER_ACCEPT, 1)
        board.venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.NETWORK_ERROR_BEFORE_SEND, 100_000)
        await board.open_positions([SYMBOLS[76]])
        await board.until(
            lambda: "2 of 3 open positions keep their stops" in body(), "the dialog says 2 of 3"
        )
        assert "WARNING: 1 position is UNCOVERED right now" in body()
        assert f"inside their grace period ({SYMBOLS[76]})." in body()  # named
        assert board.app.screen is confirm  # the same dialog, its words brought up to date
        await board.press("n")


async def test_enter_on_a_position_shows_every_field_and_its_stop_orders_venue_ids(db: Database) -> None:
    async with dashboard(tui_settings(db), size=(80, 24)) as board:
        await started(board)
        symbol = SYMBOLS[80]
        await board.open_positions([symbol])
        await board.until(lambda: board.engine.snapshot().coverage.protected == 1, "covered")
        await board.until(lambda: board.positions.shown_symbols() == [symbol], "shown")
        # The detail view opens on what the screen last painted: wait for a painted frame that has it covered.
        await board.until(
            lambda: board.app.last_snapshot is not None and board.app.last_snapshot.coverage.protected == 1,
            "a covered frame painted",
        )
        # The venue's liquidation price, pushed with the fill (the sim's stream, as Bybit's), painted too.
        await board.until(
            lambda: (
                board.app.last_snapshot is not None
                and board.app.last_snapshot.positions[0].liquidation_price is not None
            ),
            "its liquidation price painted",
        )
        view = board.engine.snapshot().positions[0]
        assert view.liquidation_price is not None
        assert board.engine.store is not None
        orders = await board.engine.store.live_orders_for_position(view.position_id)
        assert {o.purpose.value for o in orders} == {"stop_loss", "trailing_stop"}

        await board.press("enter")
        screen = board.app.screen
        assert isinstance(screen, PositionDetailScreen)
        await board.until(lambda: screen.orders is not None, "orders read")
        await board.pilot.pause()
        text = " ".join(svg_to_text(board.app.export_screenshot(), 80, 24).split())
        for field in (
            "symbol",
            "side",
            "quantity",
            "entry",
            "mark",
            "stop-loss",
            "trailing stop",
            "liquidation",
            "last error",
        ):
            assert field in text, field
        assert symbol in text
        assert f"quantity {formatting.price(view.quantity)}" in text
        assert f"entry {formatting.price(view.entry_price)}" in text
        assert "covered: both stops confirmed by the venue" in text
        detail = str(screen.query_one("#position-detail").content)  # type: ignore[attr-defined]
        # Its kind once ("native, native" said it twice: a native trail's phase is the venue's).
        assert re.search(
            r"trailing stop +native, activation [0-9.]+ \(\+[0-9.]+% away\), follows the mark price", detail
        ), detail
        assert (
            f"liquidation       {formatting.price(view.liquidation_price)} as the venue states it" in detail
        )
        for order in orders:  # the venue's ids, and ours, for both stops
            assert order.exchange_order_id
            assert f"venue id {order.exchange_order_id}" in detail
            assert order.client_order_id in detail
        # At 80×24 the text was cut after the stop-loss's row, the close hint with it, and nothing scrolled
        # (opme48): it scrolls within the screen, its hint always shown.
        assert "esc / enter: close" in text, text
        await board.press("end")
        await board.pilot.pause()
        bottom = " ".join(svg_to_text(board.app.export_screenshot(), 80, 24).split())
        assert all(order.client_order_id in bottom for order in orders), bottom
        await board.press("escape")
        assert not isinstance(board.app.screen, PositionDetailScreen)


async def test_gauge_health_and_wave_line_show_the_same_instant_while_a_wave_is_failing(db: Database) -> None:
    """The gauge counted an uncovered position while the health panel still said protection ok (it showed
    the engine's last health check, up to an interval old), and the wave line showed the last finished wave
    while the running one was failing."""
    settings = tui_settings(db, {"HEALTH__INTERVAL_SECONDS": "600"})  # no health check during the test
    async with dashboard(settings) as board:
        await started(board)
        await board.open_positions(SYMBOLS[74:76])
        await board.until(lambda: bool(board.engine.snapshot().waves), "the first wave finished")
        await board.until(
            lambda: "2 opened, 2 protected" in str(board.positions.border_subtitle), "wave line"
        )

        board.venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.TIMEOUT_AFTER_ACCEPT, 1)
        board.venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.NETWORK_ERROR_BEFORE_SEND, 100_000)
        await board.open_positions([SYMBOLS[76]])
        await board.until(lambda: board.uncovered_text().startswith("UNCOVERED 1"), "gauge: 1 uncovered")
        await board.pilot.pause()
        text = svg_to_text(board.app.export_screenshot(), 120, 40)
        assert "UNCOVERED 1" in text
        assert re.search(r"Health: (DEGRADED|CRITICAL)", text), text
        assert re.search(r"protection\s+(DEGRADED|CRITICAL)", text), text
        subtitle = str(board.positions.border_subtitle)
        assert subtitle.startswith("wave running since"), subtitle
        assert subtitle.endswith("1 opened, 0 protected, 1 UNCOVERED"), subtitle


async def test_read_only_shows_the_trailing_stop_as_the_live_view_does_and_the_version_once(
    db: Database,
) -> None:
    """Read-only said "venue trailing" where the trader's own screen said "waiting +1.45%" (same position,
    same facts), and the header showed the version twice."""
    settings = tui_settings(db)
    clock = ManualClock()
    trader = make_engine(settings, clock)
    await drive(clock, trader.start())
    try:
        assert trader.store is not None
        await trader.store.insert_signals([(SYMBOLS[78], "long", None, None)])
        await drive_until(clock, lambda: trader.snapshot().coverage.protected == 1, what="covered")
        live = trader.snapshot().positions[0]
        assert live.trailing_phase == "native"
        assert live.distance_to_activation_percent is not None
        assert live.distance_to_activation_percent > 0  # not yet activated: the live view says "waiting"
        async with dashboard(settings, engine=make_engine(settings, clock)) as board:
            board.app.read_only_poll_seconds = 0.05
            await board.until(lambda: isinstance(board.app.screen, LeaseHeldScreen), "lease refusal shown")
            await board.press("o")
            await board.until(
                lambda: board.positions.shown_symbols() == [SYMBOLS[78]], "the trader's position"
            )
            await board.until(lambda: board.positions.row_text(live.position_id) != "", "row formatted")
            row = board.positions.row_text(live.position_id)
            assert "venue trailing" not in row
            assert re.search(r"waiting \+\d+\.\d\d%", row), row
            # The venue arms the trail (a mark reaches its activation), then the price eases back: both
            # screens say it trails (the read-only one said "waiting" from the order's activation).
            assert trader.manager is not None
            guard = trader.manager.by_symbol[SYMBOLS[78]]
            activation, tick = guard.trailing_stop.price, guard.market.tick_size
            assert activation is not None
            trader.venue.override_mark_price(SYMBOLS[78], activation + 10 * tick)  # type: ignore[attr-defined]
            await board.until(lambda: guard.native_trail_armed, "armed on the venue")
            trader.venue.override_mark_price(SYMBOLS[78], activation - 2 * tick)  # type: ignore[attr-defined]
            await board.until(
                lambda: "venue trailing" in board.positions.row_text(live.position_id),
                "trailing in the watch",
            )
            assert trader.snapshot().positions[0].activation_price is None
            status = board.status_text()
            assert status.count("vtest") == 1, status
            assert "SILENT" not in status, status
            await board.press("q")
            await board.until(lambda: not board.app.is_running, "app exited")
    finally:
        await drive(clock, trader.stop())


async def test_a_watch_names_a_holder_not_heard_for_30_s(db: Database) -> None:
    """The account is held by an engine that has not heartbeated for 31 s (hung, frozen, its host gone):
    the refusal and the watch's header say so, rather than showing it as the engine trading."""
    settings = tui_settings(db)
    clock = ManualClock()
    lease = await EngineLease.acquire(db.target.dsn, "sim", account_key(settings.venue), "test")
    try:
        await db.pool.execute("UPDATE monitoring.engine_leases SET heartbeat_at = now() - interval '31 s'")
        async with dashboard(settings, engine=make_engine(settings, clock)) as board:
            board.app.read_only_poll_seconds = 0.05
            await board.until(lambda: isinstance(board.app.screen, LeaseHeldScreen), "lease refusal shown")

            def refusal_names_it() -> bool:
                shown = " ".join(svg_to_text(board.app.export_screenshot(), 120, 40).split())
                return (
                    re.search(r"already traded by pid \d+ .* not heard for (3[1-9]|[4-9]\d)s \(hung", shown)
                    is not None
                )

            await board.until(refusal_names_it, "the refusal naming the silent holder")
            # Named once: the dialog said the holder's pid, host and version twice (an operator).
            body = str(board.app.screen.query_one("#lease-body").content)  # type: ignore[attr-defined]
            assert len(re.findall(r"pid \d+ on ", body)) == 1, body
            await board.press("o")
            await board.until(
                lambda: re.search(r"pid \d+@\S+ SILENT (3[1-9]|[4-9]\d)s", board.status_text()) is not None,
                "the silent holder named in the header",
            )
            await board.press("q")
            await board.until(lambda: not board.app.is_running, "app exited")
    finally:
        await lease.release()


async def test_a_read_only_dashboard_says_when_the_trading_engine_runs_older_code_than_is_on_disk(
    db: Database, tmp_path: Path
) -> None:
    """F10 (r75): a read-only dashboard compared the code on disk with its own start, not with the trading
    engine's: a fix installed after the engine started and before the dashboard did was never said, and
    "restart needed" pointed at the dashboard. The engine's code is recorded with its lease: the banner
    speaks of it."""
    settings = tui_settings(db)
    clock = ManualClock()
    package = tmp_path / "engine"
    package.mkdir()
    (package / "engine.py").write_text("TIMEOUT = 10\n")
    running = SourceWatcher([package])
    lease = await EngineLease.acquire(
        db.target.dsn, "sim", account_key(settings.venue), "test", code=(running.roots, running.running)
    )
    try:
        (package / "engine.py").write_text("TIMEOUT = 30  # the fix, installed while the engine ran\n")
        async with dashboard(settings, engine=make_engine(settings, clock)) as board:
            board.app.read_only_poll_seconds = 0.05
            board.app._code_check_seconds = 0.05
            await board.until(lambda: isinstance(board.app.screen, LeaseHeldScreen), "lease refusal shown")
            await board.press("o")
            banner = board.app.query_one(CodeBanner)
            await board.until(lambda: banner.has_class("-visible"), "the banner")
            text = str(banner.content)
            assert text.startswith("the trading engine (pid "), text
            assert "runs older code than is on disk" in text, text
            assert "engine/engine.py" in text, text
            (package / "engine.py").write_text("TIMEOUT = 10\n")  # the engine's code again: no banner
            await board.until(lambda: not banner.has_class("-visible"), "the banner gone")
            (package / "engine.py").write_text("TIMEOUT = 30  # the fix\n")
            await board.until(lambda: banner.has_class("-visible"), "the banner again")
            # The engine restarted on the fix: another holder, whose code is the disk's. The banner named the
            # old engine's pid for as long as the dashboard ran (r76).
            await lease.release()
            fixed = SourceWatcher([package])
            lease = await EngineLease.acquire(
                db.target.dsn, "sim", account_key(settings.venue), "test", code=(fixed.roots, fixed.running)
            )
            await board.until(lambda: not banner.has_class("-visible"), "the banner gone with the old engine")
            await board.press("q")
            await board.until(lambda: not board.app.is_running, "app exited")
    finally:
        await lease.release()


def _opened(position_id: int, at: float) -> PositionOpened:
    return PositionOpened(
        at=at,
        position_id=position_id,
        symbol=f"S{position_id}USDT",
        side="long",
        quantity=Decimal(1),
        entry_price=Decimal(1),
    )


def _finished(opened: int, at: float) -> WaveFinished:
    return WaveFinished(
        at=at,
        wave_id=0,
        signals=opened,
        opened=opened,
        protected=opened,
        failed=0,
        slowest_protection_ms=None,
    )


def test_the_running_wave_line_never_drops_a_wave_still_in_progress() -> None:
    """A wave whose protection is failing waits up to two minutes; the next wave may open and finish first.
    Events carry no wave id: the line keeps every position since the oldest unfinished wave."""
    wave = RunningWave()
    for position_id, at in ((1, 10.0), (2, 10.1)):  # wave A: two positions, protection failing
        wave.see(_opened(position_id, at))
    wave.see(_opened(3, 30.0))  # wave B, 20 s later
    wave.see(_finished(1, 30.5))  # B finishes first: A is still running
    assert [p for _, p in wave.positions] == [1, 2, 3]
    assert wave.started_at == 10.0
    wave.see(_finished(2, 130.0))  # A gives up waiting
    assert wave.started_at is None
    wave.see(_opened(4, 150.0))  # the next wave starts afresh
    assert [p for _, p in wave.positions] == [4]
    wave.see(EventsDropped(at=151.0, count=40))  # missed events: no claim rather than a wrong one
    assert wave.started_at is None


async def test_a_wave_whose_entries_wait_for_the_venue_is_said_running_before_anything_opened(
    db: Database,
) -> None:
    """An operator: a wave held up by the venue's rate refusals (40 × 10006) took 30 s with every signal
    refused, and the positions panel said "no wave yet" all that time: the line followed the positions a
    wave opened, and this one had opened none. A wave in progress is said from its start."""
    clock = ManualClock()
    engine = make_engine(tui_settings(db), clock)
    await drive(clock, engine.start())
    try:
        assert engine.store is not None
        assert engine.request_pacer is not None
        engine.request_pacer.hold(20.0)  # the venue said wait: the wave's entries wait for it
        await engine.store.insert_signals([(s, "long", None, None) for s in sorted(UNIVERSE)[10:13]])
        await drive_until(clock, lambda: engine.snapshot().wave_begun is not None, what="the wave begun")
        snapshot = engine.snapshot()
        assert snapshot.positions == ()
        running = RunningWave()
        line = wave_line(snapshot, running, UTC)
        assert re.fullmatch(r"wave running since \d\d:\d\d:\d\d: 3 signals, none opened yet", line), line
        began = clock_time(snapshot.wave_begun[0], UTC)  # type: ignore[index]
        assert line == f"wave running since {began}: 3 signals, none opened yet"
        await drive_until(
            clock, lambda: engine.snapshot().wave_begun is None, limit=120, what="the wave ended"
        )
        assert not wave_line(engine.snapshot(), RunningWave(), UTC).startswith("wave running")
        # Its positions opened 20 s after it began: the line says when the wave began, not the first fill
        # (opme48: "since 09:17:57" of a wave begun at 09:17:49).
        for view in engine.snapshot().positions:
            running.see(
                PositionOpened(
                    at=clock.now(),
                    position_id=view.position_id,
                    symbol=view.symbol,
                    side=view.side,
                    quantity=view.quantity,
                    entry_price=view.entry_price,
                )
            )
        assert wave_line(engine.snapshot(), running, UTC).startswith(f"wave running since {began}: 3 opened")
    finally:
        await drive(clock, engine.stop())


async def test_the_gauges_last_hour_includes_what_an_earlier_engine_recorded(db: Database) -> None:
    """An operator: the gauge's "last hour, low …" started over at each start, and read "low 100.0%" minutes
    after coverage had dipped to 70 % with ten positions without their trailing stop (the engine restarted
    in between). The last hour comes from the database's samples, whoever recorded them."""
    settings = tui_settings(db)
    clock = ManualClock()
    engine = make_engine(settings, clock)
    store = Store(db.pool, account_key(settings.venue))
    dip = CoverageSample(
        at=datetime.fromtimestamp(clock.now() - 600, UTC),
        active=10,
        protected=7,
        uncovered=3,
        lasting=3,
        coverage_pct=Decimal("70.0"),
    )
    older = dataclasses.replace(
        dip, at=datetime.fromtimestamp(clock.now() - 7200, UTC), coverage_pct=Decimal("10.0")
    )
    for sample in (dip, older):
        await store.record_coverage_sample(sample)
    async with dashboard(settings, engine=engine) as board:
        await started(board)
        gauge = board.app.query_one(CoverageGauge)
        await board.until(
            lambda: "low 70.0%" in str(gauge.border_subtitle), "the earlier dip in the last hour"
        )
        assert "10.0%" not in str(gauge.border_subtitle)  # (two hours ago: not the last hour)


async def test_an_entry_of_unknown_outcome_is_a_flagged_row_and_counted_uncovered(db: Database) -> None:
    """An entry whose answer was lost and whose look-ups fail may have filled: the screen shows it as a
    row of its own, flagged, with "ENTRY UNKNOWN" where its trailing stop would be (not "MISSING": nothing
    says there is a position), no entry price, and the gauge counts it uncovered past its grace period."""
    settings = tui_settings(
        db, {"VENUE__SIM__REQUEST_TIMEOUT_SECONDS": "2", "PROTECTION__GRACE_SECONDS": "5"}
    )
    async with dashboard(settings) as board:
        await started(board)
        assert board.engine.store is not None
        # The account stream down too: its fill event would settle the entry (the look-ups are not needed).
        board.venue.drop_account_stream(100_000)
        board.venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.TIMEOUT_AFTER_ACCEPT, 1)
        board.venue.inject_fault(CallKind.FETCH_ORDER, FaultKind.NETWORK_ERROR_BEFORE_SEND, 100_000)
        # And the venue's position list unread: with the stream down the venue is read every half grace
        # period, and its list shows the position, which settles the entry before its grace ends.
        board.venue.inject_fault(CallKind.FETCH_POSITIONS, FaultKind.NETWORK_ERROR_BEFORE_SEND, 100_000)
        await board.engine.store.insert_signals([(SYMBOLS[77], "long", None, None)])
        await board.until(lambda: board.uncovered_text().startswith("UNCOVERED 1"), "gauge: 1 uncovered")
        await board.pilot.pause()
        text = " ".join(svg_to_text(board.app.export_screenshot(), 120, 40).split())
        assert f"! {SYMBOLS[77]}" in text
        assert "ENTRY UNKNOWN" in text
        assert "MISSING" not in text
        # A read-only dashboard, reading what the engine recorded, counts and shows it the same way.
        feed = ReadOnlyFeed(settings, None)
        await drive(board.clock, feed.start())
        try:
            snapshot = feed.snapshot()
        finally:
            await feed.stop()
        assert (snapshot.coverage.active, snapshot.coverage.protected) == (1, 0)
        [view] = snapshot.positions
        assert (view.symbol, view.trailing_phase, view.entry_price) == (
            SYMBOLS[77],
            "entry outcome unknown",
            None,
        )


async def test_a_read_only_dashboard_says_when_the_database_stops_answering_it(
    db: Database, pg_server
) -> None:
    """A watch on a frozen database kept its last screen for the 35 s of the freeze: "Health: ok", "entries
    on", "uncovered 0", its clock stopped, while the engine had lost its lease and paused entries (an
    operator). Within its bound it says the database does not answer, and as of when the rest is."""
    proxy = await SilentFromProxy.in_front_of(pg_server.socket_dir, db.target.dsn, silent_from=None)
    # (Its statements' own bound short: a poll cancelled at the end waits for its cancel to be refused.)
    settings = tui_settings(db, {"DATABASE__DSN": proxy.dsn, "DATABASE__COMMAND_TIMEOUT_SECONDS": "1"})
    feed = ReadOnlyFeed(settings, None, interval=0.2)
    bound = float(settings.database.probe_timeout_seconds)  # (3 polls of 0.2 s are less)
    watching: asyncio.Task[None] | None = None
    try:
        await feed.start()

        async def watch() -> None:
            async for _ in feed.follow():
                pass

        watching = asyncio.create_task(watch())
        answered = feed.snapshot()
        assert all(
            h.component is not Component.DATABASE or h.state is not HealthState.CRITICAL
            for h in answered.health
        )
        proxy.go_silent()
        silenced = time.monotonic()

        def database_line() -> ComponentHealth | None:
            return next((h for h in feed.snapshot().health if h.component is Component.DATABASE), None)

        await wait_until(
            lambda: (line := database_line()) is not None and line.state is HealthState.CRITICAL,
            within=bound + 5,
            what="the database line critical",
        )
        took = time.monotonic() - silenced
        line = database_line()
        assert line is not None
        assert re.fullmatch(
            r"the watch has had no answer from the database for [\d.]+s: everything shown is as of "
            r"\d\d:\d\d:\d\d and may have changed since",
            line.reason,
        ), line.reason
        assert took < bound + 2, took
        assert feed.snapshot().taken_at == answered.taken_at  # the rest as it was read
    finally:
        if watching is not None:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        await proxy.close()  # (its connections dropped: the watch's goodbye does not wait for an answer)
        await feed.stop()


async def test_a_read_only_dashboards_database_line_counts_only_a_read_still_waiting(db: Database) -> None:
    """Timed from the end of the last answer, the pause between polls and the time the dashboard took to
    take in a burst of events counted as silence: a healthy database was said "no answer for 4s",
    critical, with the bell, during a burst of 2 000 events (r59). Only a read still waiting counts."""
    feed = ReadOnlyFeed(tui_settings(db), None, interval=0.2)
    await feed.start()
    try:
        await asyncio.sleep(feed.unanswered_after + 0.5)  # no poll meanwhile: nothing is waiting
        quiet = feed.snapshot()
        await feed.poll()
        answered = feed.snapshot()
    finally:
        await feed.stop()
    for snapshot in (quiet, answered):
        assert all(
            h.component is not Component.DATABASE or h.state is not HealthState.CRITICAL
            for h in snapshot.health
        ), snapshot.health


async def test_a_read_only_dashboards_database_line_says_why_its_reads_fail(db: Database) -> None:
    """A database that answers each read with an error (a schema the watch does not match, say) is not
    "no answer": the line says the reads fail, and the error (r59)."""
    feed = ReadOnlyFeed(tui_settings(db), None, interval=0.2)
    await feed.start()
    watching: asyncio.Task[None] | None = None
    try:
        await db.pool.execute("ALTER TABLE monitoring.waves RENAME TO waves_elsewhere")

        async def watch() -> None:
            async for _ in feed.follow():
                pass

        watching = asyncio.create_task(watch())

        def database_line() -> ComponentHealth | None:
            return next((h for h in feed.snapshot().health if h.component is Component.DATABASE), None)

        await wait_until(
            lambda: (line := database_line()) is not None and line.state is HealthState.CRITICAL,
            within=feed.unanswered_after + 5,
            what="the database line critical",
        )
        line = database_line()
        assert line is not None
        assert re.fullmatch(
            r"the watch's reads of the database have failed for [\d.]+s \(UndefinedTableError: relation "
            r'"monitoring\.waves" does not exist\): everything shown is as of \d\d:\d\d:\d\d and may have '
            r"changed since",
            line.reason,
        ), line.reason
    finally:
        if watching is not None:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        await feed.stop()


async def test_a_read_only_dashboard_counts_an_entry_its_dead_engine_left_pending(db: Database) -> None:
    """An engine killed while its entry's answer is outstanding leaves the entry `pending` and its position
    `entry_placed`: it may have filled, with no stop. A read-only dashboard leaves it to the engine holding
    the account (it is that engine's entry in flight); with none, or one silent, it counts and shows it as an
    entry of unknown outcome. Before: never, so the gauge of a watch on a dead engine's account said nothing;
    and nothing while the engine holding it was silent."""
    settings = tui_settings(db, {"PROTECTION__GRACE_SECONDS": "0"})
    store = Store(db.pool, account_key(settings.venue))
    position_id = await entry_recorded(store, SYMBOLS[3], quantity=Decimal("2"))

    async def watched() -> EngineSnapshot:
        feed = ReadOnlyFeed(settings, None)
        await feed.start()
        try:
            return feed.snapshot()
        finally:
            await feed.stop()

    lease = await EngineLease.acquire(db.target.dsn, "sim", account_key(settings.venue), "test")
    try:
        running = await watched()
        # Still holding the account, but not heard for 31 s (hung, frozen, its host gone): nobody learns it.
        await db.pool.execute("UPDATE monitoring.engine_leases SET heartbeat_at = now() - interval '31 s'")
        silent = await watched()
    finally:
        await lease.release()
    assert (running.coverage.active, running.coverage.uncovered, running.positions) == (0, 0, ())
    assert (silent.coverage.active, silent.coverage.uncovered_ids) == (1, (position_id,))

    dead = await watched()
    assert (dead.coverage.active, dead.coverage.protected, dead.coverage.uncovered_ids) == (
        1,
        0,
        (position_id,),
    )
    [view] = dead.positions
    assert (view.symbol, view.trailing_phase, view.entry_price) == (SYMBOLS[3], "entry outcome unknown", None)
    assert view.last_error == "entry outcome unknown: no engine looks after the account to learn it"


async def test_a_read_only_dashboard_counts_a_managed_trail_only_while_its_engine_is_heard(
    db: Database,
) -> None:
    """A managed trail has no order on the venue before it activates: it is the trailing protection only
    while its engine moves it. A watch counted it protected whatever the engine did: held by an engine not
    heard for 31 s (hung, frozen, its host gone) or by none (a SIGKILL leaves it recorded armed)."""
    settings = tui_settings(db, {"PROTECTION__GRACE_SECONDS": "0", "PROTECTION__TRAILING__MODE": "managed"})
    account = account_key(settings.venue)
    position_id = await db.pool.fetchval(
        "INSERT INTO monitoring.positions (account, symbol, exchange, side, quantity, entry_price, status, "
        "has_stop_loss, has_trailing_stop, trail_armed, trailing_activated, opened_at, protected_at) "
        "VALUES ($1, $2, 'sim', 'long', 1, 2, 'active', true, false, true, false, "
        "now() - interval '1 minute', now() - interval '1 minute') RETURNING id",
        account,
        SYMBOLS[4],
    )

    async def uncovered() -> tuple[int, ...]:
        feed = ReadOnlyFeed(settings, None)
        await feed.start()
        try:
            return feed.snapshot().coverage.uncovered_ids
        finally:
            await feed.stop()

    lease = await EngineLease.acquire(db.target.dsn, "sim", account, "test")
    try:
        assert await uncovered() == ()
        await db.pool.execute("UPDATE monitoring.engine_leases SET heartbeat_at = now() - interval '31 s'")
        assert await uncovered() == (position_id,)
    finally:
        await lease.release()
    assert await uncovered() == (position_id,)


async def test_a_watchs_health_names_the_engine_that_does_not_measure(db: Database) -> None:
    """The engine's last measurements are shown as unknown once no engine looks after the account. The
    reason said "no engine is running" also while an engine held it, silent (hung, its host gone) or still
    starting: the operator looked for a dead process while one was there, frozen. It names that engine."""
    settings = tui_settings(db)
    account = account_key(settings.venue)
    await Store(db.pool, account).save_health([HealthRow("exchange", "healthy", "answers in 50 ms", "", {})])

    async def venue_health() -> tuple[str, str]:
        feed = ReadOnlyFeed(settings, None)
        await feed.start()
        try:
            [health] = feed.snapshot().health
        finally:
            await feed.stop()
        return health.state.value, health.reason

    lease = await EngineLease.acquire(db.target.dsn, "sim", account, "test")
    try:
        await lease.heartbeat(LeasePhase.RUNNING)
        assert await venue_health() == ("healthy", "")
        await db.pool.execute("UPDATE monitoring.engine_leases SET phase = 'starting'")
        state, reason = await venue_health()
        assert state == "unknown"
        assert re.fullmatch(r"the engine holding the account is starting: pid \d+ on .*", reason), reason
        await db.pool.execute(
            "UPDATE monitoring.engine_leases SET phase = 'running', heartbeat_at = now() - interval '31 s'"
        )
        state, reason = await venue_health()
        assert state == "unknown"
        assert re.fullmatch(
            r"the engine holding the account is silent: pid \d+ on .*not heard for \d+s.*", reason
        )
    finally:
        await lease.release()
    assert await venue_health() == ("unknown", "no engine is running")


@pytest.mark.parametrize(
    ("answered", "listed"),
    [
        (OrderRecordStatus.FILLED, True),
        (OrderRecordStatus.CANCELED, True),
        (OrderRecordStatus.REJECTED, False),
    ],
)
async def test_a_watch_counts_every_entry_a_dead_engine_left_unsettled_as_status_does(
    db: Database, answered: OrderRecordStatus, listed: bool
) -> None:
    """An engine killed between writing its entry's answer (`filled`) and the fill's price leaves the
    position `entry_placed`: a filled position, no stop. Status and the operators' query list every entry
    not rejected once no engine looks after the account; the watch read only live orders (pending, open,
    unknown), so it showed no position and nothing uncovered (a reviewer's finding)."""
    settings = tui_settings(db, {"PROTECTION__GRACE_SECONDS": "0"})
    store = Store(db.pool, account_key(settings.venue))
    position_id = await entry_recorded(store, SYMBOLS[5], answered=answered)
    feed = ReadOnlyFeed(settings, None)
    await feed.start()
    try:
        snapshot = feed.snapshot()
    finally:
        await feed.stop()
    by_status = [p.id for p in await store.uncovered_positions(0)]
    assert by_status == ([position_id] if listed else [])
    assert snapshot.coverage.uncovered_ids == tuple(by_status)
    assert [v.position_id for v in snapshot.positions] == by_status
    if answered is OrderRecordStatus.FILLED:
        [view] = snapshot.positions
        assert view.last_error == (
            "entry filled, its price not recorded: no engine looks after the account to protect it"
        )


async def test_a_watchs_log_misses_no_event_of_a_burst_nor_one_recorded_late(db: Database) -> None:
    """A watch read the newest 200 events by time at each poll: a burst of more between two polls (a ban's
    protection failures, one per guard) lost its oldest, and an event replayed from the journal, recorded
    late with its own older time, fell outside the window. It reads on from the last event it got."""
    settings = tui_settings(db)
    store = Store(db.pool, account_key(settings.venue))
    feed = ReadOnlyFeed(settings, None)
    await feed.start()
    try:
        for i in range(300):
            await store.record_event(
                Severity.WARNING, "protection_failed", f"failure {i}", symbol=SYMBOLS[i % 7]
            )
        # Replayed from the journal after an outage: written now, dated an hour ago.
        await store.record_event(
            Severity.ERROR,
            "protection_lost",
            "replayed",
            symbol=SYMBOLS[8],
            at=datetime.now(UTC) - timedelta(hours=1),
            write_id="journal-1",
        )
        rows = await feed.poll()
    finally:
        await feed.stop()
    assert [r.detail for r in rows] == [f"failure {i}" for i in range(300)] + ["replayed"]


@contextlib.asynccontextmanager
async def _watching(db: Database) -> AsyncIterator[tuple[Engine, Dashboard]]:
    """An engine trading the account, and a dashboard watching it read-only, its header read once."""
    settings = tui_settings(db)
    clock = ManualClock()
    trader = make_engine(settings, clock)
    await drive(clock, trader.start())
    try:
        async with dashboard(settings, engine=make_engine(settings, clock)) as board:
            board.app.read_only_poll_seconds = 0.05
            await board.until(lambda: isinstance(board.app.screen, LeaseHeldScreen), "lease refusal shown")
            await board.press("o")
            await board.until(lambda: "entries on" in board.status_text(), "entries on, watched")
            yield trader, board
            await board.press("q")
            await board.until(lambda: not board.app.is_running, "app exited")
    finally:
        await drive(clock, trader.stop())


async def test_a_watch_says_whether_the_engine_it_watches_takes_entries(db: Database) -> None:
    """The read-only header left the entries state out: a pause (the operator's, or the breaker's when
    protection fails) was invisible to whoever watched, while the trader's screen and `tsbot status` said
    ENTRIES PAUSED; and `e` there toggled blind. It says what the account's record says."""
    async with _watching(db) as (trader, board):
        trader.pause_entries(by="breaker", reason="coverage 42.0 % below 95 %")
        await board.until(
            lambda: "ENTRIES PAUSED (breaker)" in board.status_text(), "the breaker's pause, watched"
        )


async def test_a_watch_whose_engine_is_gone_does_not_say_entries_are_on(db: Database) -> None:
    """After the engine it watched was killed, the read-only header said "no engine running" beside
    "entries on", in normal colours (an operator): no entry goes with no engine. Its exit line then said
    "the engine holding the account trades and protects as before" (another operator): it says none does."""
    async with _watching(db) as (trader, board):
        await drive(trader.clock, trader.stop(drain=False))  # (its lease released: as dead as a watch sees)
        await board.until(lambda: "no engine running" in board.status_text(), "the engine gone, watched")
        await board.until(lambda: "NO ENTRIES (no engine)" in board.status_text(), "no entries said")
        assert "entries on" not in board.status_text()
        assert board.app.exit_summary() == (
            "tsbot-tui stopped: it only watched; no engine holds the account: its positions keep only the "
            "stops on the exchange, nothing re-protects them (see `tsbot status`)"
        )


async def test_a_watchs_exit_line_names_an_engine_that_holds_the_account_without_looking_after_it(
    db: Database,
) -> None:
    """The engine holding the account, silent (hung, its host gone): not "trades and protects as before"."""
    async with _watching(db) as (_trader, board):
        await db.pool.execute("UPDATE monitoring.engine_leases SET heartbeat_at = now() - interval '31 s'")
        feed = board.app.feed
        assert isinstance(feed, ReadOnlyFeed)
        await board.until(lambda: feed.holder is not None and feed.holder.silent, "the holder seen silent")
        said = board.app.exit_summary()
        assert re.fullmatch(
            r"tsbot-tui stopped: it only watched; the engine holding the account is silent: pid \d+ on "
            r".*not heard for \d+s.*: its positions keep only the stops on the exchange for now "
            r"\(see `tsbot status`\)",
            said,
        ), said


async def test_a_watch_says_entries_are_held_back_by_the_venue_as_its_health_panel_does(db: Database) -> None:
    """A reviewer's find: the read-only header said "entries on" while its own health panel (the engine's
    last signals measurement) said entries were held back by the venue's rate refusals."""
    async with _watching(db) as (trader, board):
        trader.venue.inject_fault(CallKind.CREATE_ORDER, FaultKind.RATE_LIMITED, 2)  # type: ignore[attr-defined]
        assert trader.store is not None
        await trader.store.insert_signals([(SYMBOLS[30], "long", None, None)])
        await board.until(lambda: "ENTRIES HELD" in board.status_text(), "held back, watched", limit=30.0)
        # `tsbot status` says it too ("entries: on" beside a signals line saying they were held back).
        settings = trader.settings
        status = await _status_report(LoadedConfig(settings, None), account_key(settings.venue))
        assert status["entries"] == "held", status["entries"]
        assert "refused 2 requests for its rate" in status["entries_held"]["why"]
        await board.until(lambda: "entries on" in board.status_text(), "on again, watched", limit=90.0)


@contextlib.asynccontextmanager
async def _one_protected_and_three_entries_on_their_way(
    db: Database, symbols: list[str]
) -> AsyncIterator[Dashboard]:
    """A dashboard on a slow venue (6 s per order): a position protected on the first symbol, then the
    entries of the other three on their way."""
    settings = tui_settings(
        db,
        {
            "VENUE__SIM__LATENCY__BY_CALL__CREATE_ORDER__SECONDS": "6",
            "PROTECTION__CALL_TIMEOUT_SECONDS": "10",
        },
    )
    async with dashboard(settings) as board:
        await started(board)
        await board.open_positions(symbols[:1])
        await board.until(lambda: board.engine.snapshot().coverage.protected == 1, "1 covered")
        assert board.engine.store is not None
        await board.engine.store.insert_signals([(s, "long", None, None) for s in symbols[1:]])
        await board.until(lambda: board.engine.snapshot().entries_sending == 3, "3 entries on their way")
        yield board


async def test_the_quit_dialog_says_entries_on_their_way(db: Database) -> None:
    """On a slow venue, `q` right after a wave was sent: the dialog counted the open positions only ("1 of
    1 … keep their stops") while three entries were on their way, which the stop then waited for and
    protected; the exit line said 4 open positions. The dialog says them."""
    async with _one_protected_and_three_entries_on_their_way(db, SYMBOLS[60:64]) as board:
        await board.press("q")
        body = board.confirm_body()
        assert "1 of 1 open position keeps its stops on the exchange" in body
        assert "3 entries are on their way to the venue" in body
        await board.press("n")


async def test_while_quitting_the_screen_shows_the_positions_the_stop_opens_and_protects(
    db: Database,
) -> None:
    """`q` with three entries on their way on a slow venue: the stop waits for them and protects what
    fills. The screen froze at the moment of `q`: the three new positions were in no count (the gauge said
    1/1, "uncovered 0") and the wave line called them "closed", though all were open and protecting. The
    screen follows the drain until the engine lets its positions go, then keeps that picture."""
    async with _one_protected_and_three_entries_on_their_way(db, SYMBOLS[64:68]) as board:
        await board.press("q")
        await board.press("y")
        await board.until(
            lambda: board.engine.manager is not None and len(board.engine.manager.guards) == 4,
            "the drain's three positions opened",
        )
        await board.until(
            lambda: board.app.last_snapshot is not None and board.app.last_snapshot.coverage.active == 4,
            "the screen counts the four open positions",
        )
        assert "closed" not in board.positions.border_subtitle, board.positions.border_subtitle
        await board.until(lambda: board.engine.state is EngineState.STOPPED, "engine stopped")
        await board.until(lambda: not board.app.is_running, "app exited")
        assert board.app.last_snapshot is not None
        assert board.app.last_snapshot.coverage.active == 4  # kept after the engine let them go
        summary = board.app.exit_summary()
        assert summary.startswith("tsbot-tui stopped: 4 open positions"), summary


async def test_a_recovered_failure_leaves_the_error_column_after_a_minute_and_stays_in_the_detail(
    db: Database,
) -> None:
    """A stop that failed once and was placed on the retry kept its "Last error" on the fully protected row
    for as long as the position lived (an operator saw it 25 s on, then for good): history read as an alarm."""
    settings = tui_settings(db)
    clock = ManualClock()
    engine = make_engine(settings, clock)
    await drive(clock, engine.start())
    try:
        assert engine.store is not None
        engine.venue.inject_fault(
            CallKind.CREATE_ORDER, FaultKind.NETWORK_ERROR_BEFORE_SEND, 1, stops_only=True
        )  # type: ignore[attr-defined]
        await engine.store.insert_signals([(SYMBOLS[79], "long", None, None)])
        await drive_until(clock, lambda: engine.snapshot().coverage.protected == 1, what="covered")
        view = engine.snapshot().positions[0]
        assert view.covered
        assert view.last_error is not None
        assert "network error" in view.last_error
        assert not view.last_error_old
        cell = error_cell(view, STYLES)
        assert "network error" in cell.plain
        assert cell.style == ""
        await drive(clock, clock.sleep(61))
        view = engine.snapshot().positions[0]
        assert view.covered
        assert view.last_error_old
        assert error_cell(view, STYLES).plain == ""
        assert view.last_error is not None  # the detail screen still says what went wrong
    finally:
        await drive(clock, engine.stop())

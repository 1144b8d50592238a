"""The dashboard when the engine cannot start (issue 14): a key the venue refuses is the operator's
configuration (exit 2), said on screen and again as one line on the terminal afterwards; no traceback."""

from __future__ import annotations

import logging
import socket
from datetime import UTC

import pytest

from engine.clock import SystemClock
from engine.engine import Engine
from engine.venues.binance_emulator import BinanceEmulator, running
from engine.venues.binance_venue import BinanceUsdmVenue
from engine.venues.ccxt_venue import CcxtVenueConfig
from engine.venues.sim import SimVenue, SimVenueSettings
from storage.database import Database
from tests.support.waiting import wait_until
from tests.tui.harness import tui_settings
from tui.app import EXIT_FAILED, EXIT_USAGE, DashboardApp
from tui.screens.info import StartFailedScreen


async def _start_failed(db: Database, venue: BinanceUsdmVenue) -> DashboardApp:
    """The dashboard on `venue`, run until its start-failed screen, which is dismissed: the app, ended."""
    settings = tui_settings(db)
    engine = Engine(settings, venue=venue, clock=SystemClock(), version="test")
    app = DashboardApp(settings, engine=engine, tz=UTC, code_roots=[])
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(
            lambda: isinstance(app.screen, StartFailedScreen), within=60, what="the start-failed screen"
        )
        await pilot.press("enter")
        await wait_until(lambda: not app.is_running, within=30, what="the app to exit")
    return app


async def test_a_refused_key_shows_why_and_exits_2(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    emulator = BinanceEmulator(
        SimVenueSettings(seed=7, symbols=["SFPUSDT"]), api_key="tui-test-key", api_secret="tui-test-secret"
    )
    async with running(emulator) as url:
        venue = BinanceUsdmVenue(
            CcxtVenueConfig(
                kind="binanceusdm", api_key="tui-test-key", api_secret="not-the-secret", base_url=url
            )
        )
        with caplog.at_level(logging.ERROR):
            app = await _start_failed(db, venue)
    assert app.exit_code == EXIT_USAGE
    assert app.start_failure.startswith(
        "venue binanceusdm refused the API key at start (code -1022: Signature for this request is not valid.)"
    )
    assert "not-the-secret" not in app.start_failure
    assert not any(record.exc_info for record in caplog.records)  # the operator's doing: no traceback logged


async def test_an_unreachable_venue_is_said_as_tsbot_run_says_it_without_a_class_name(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """The start-failed screen and the exit line said "Retryable: binanceusdm: could not connect to …":
    an internal class name, and a traceback in the log, for a venue that is not there (an operator)."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    venue = BinanceUsdmVenue(
        CcxtVenueConfig(kind="binanceusdm", api_key="k", api_secret="s", base_url=f"http://127.0.0.1:{port}")
    )
    with caplog.at_level(logging.ERROR):
        app = await _start_failed(db, venue)
    assert app.exit_code == EXIT_FAILED
    assert app.start_failure.startswith(
        f"couldn't reach the venue: binanceusdm: could not connect to 127.0.0.1:{port}"
    ), app.start_failure
    assert not any(record.exc_info for record in caplog.records)


async def test_a_metrics_port_in_use_is_said_on_screen_and_exits_1(db: Database) -> None:
    """`[metrics]` enabled on a port another process holds: the dashboard's engine does not start, the
    screen names host:port and why, and the app exits 1."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        settings = tui_settings(db, {"METRICS__ENABLED": "true", "METRICS__PORT": str(port)})
        clock = SystemClock()
        engine = Engine(
            settings, venue=SimVenue(settings.venue.sim, clock=clock), clock=clock, version="test"
        )
        app = DashboardApp(settings, engine=engine, tz=UTC, code_roots=[])
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_until(
                lambda: isinstance(app.screen, StartFailedScreen), within=30, what="the start-failed screen"
            )
            await pilot.press("enter")
            await wait_until(lambda: not app.is_running, within=30, what="the app to exit")
    finally:
        holder.close()
    assert app.exit_code == EXIT_FAILED
    assert f"metrics: cannot listen on 127.0.0.1:{port}: the address is already in use" in app.start_failure
    assert app.start_failure.startswith("metrics:")  # the operator's setting, said as such: no class name
    assert "\n" not in app.start_failure
    assert engine.store is None  # nothing was opened

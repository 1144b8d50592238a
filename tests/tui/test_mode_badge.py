"""The header's badge names where orders go. `venue.testnet` only picks the venue's own hosts; a `base_url`
replaces them all, so on the local emulator the badge said TESTNET, a place no order went (an operator in
tmux on `tsbot sim-exchange`). Read from the screen."""

from __future__ import annotations

from datetime import UTC
from pathlib import Path

import pytest

from engine.config import load_config
from tests.tui.book import BookFeed
from tests.tui.snapshots import screen_text, wait_for
from tui.app import DashboardApp

CASES = [
    ({}, "SIM"),
    ({"TSBOT_VENUE__KIND": "binanceusdm", "TSBOT_VENUE__BASE_URL": "http://127.0.0.1:8900"}, "LOCAL"),
    ({"TSBOT_VENUE__KIND": "bybit", "TSBOT_VENUE__BASE_URL": "http://localhost:8901/"}, "LOCAL"),
    ({"TSBOT_VENUE__KIND": "bybit", "TSBOT_VENUE__BASE_URL": "http://[::1]:8901"}, "LOCAL"),
    ({"TSBOT_VENUE__KIND": "bybit", "TSBOT_VENUE__BASE_URL": "http://[::ffff:127.0.0.1]:8901"}, "LOCAL"),
    ({"TSBOT_VENUE__KIND": "bybit", "TSBOT_VENUE__BASE_URL": "http://LOCALHOST.:8901"}, "LOCAL"),
    # A local forwarder (ssh -L, a proxy) to the venue's mainnet is real money: `testnet = false` wins (r93).
    (
        {
            "TSBOT_VENUE__KIND": "binanceusdm",
            "TSBOT_VENUE__BASE_URL": "http://127.0.0.1:8443",
            "TSBOT_VENUE__TESTNET": "false",
        },
        "● LIVE · REAL MONEY",
    ),
    ({"TSBOT_VENUE__KIND": "binanceusdm"}, "TESTNET"),
    # Another machine may be anything: the flag the operator set stands (never told "LOCAL").
    ({"TSBOT_VENUE__KIND": "binanceusdm", "TSBOT_VENUE__BASE_URL": "https://fapi.example.net"}, "TESTNET"),
    (
        {
            "TSBOT_VENUE__KIND": "binanceusdm",
            "TSBOT_VENUE__BASE_URL": "https://fapi.example.net",
            "TSBOT_VENUE__TESTNET": "false",
        },
        "● LIVE · REAL MONEY",
    ),
]


@pytest.mark.parametrize(
    ("environ", "badge"),
    CASES,
    ids=[
        "sim",
        "loopback",
        "localhost",
        "ipv6",
        "ipv4-mapped",
        "trailing-dot",
        "local-forwarder-to-mainnet",
        "testnet",
        "remote",
        "live",
    ],
)
async def test_the_header_badge_names_where_orders_go(environ: dict[str, str], badge: str) -> None:
    settings = load_config(
        None,
        environ={
            "TSBOT_TUI__REFRESH_PER_SECOND": "30",
            "TSBOT_LOGGING__FILE": "/tmp/tsbot-tui-tests/log",
            **environ,
        },
        cwd=Path("/nonexistent-config-dir"),
    ).settings
    app = DashboardApp(settings, feed=BookFeed(settings), tz=UTC, code_roots=[])
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, lambda: badge in screen_text(app).splitlines()[0], f"the badge {badge!r}")
        header = screen_text(app).splitlines()[0]
        others = {"SIM", "LOCAL", "TESTNET", "LIVE"} - set(badge.replace("●", "").replace("·", "").split())
        assert not [word for word in others if word in header.split()], header

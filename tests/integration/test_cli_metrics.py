"""`tsbot run` with `[metrics] enabled = true`: the headless engine serves /metrics and /healthz on loopback,
and a port another process holds stops it with one line and exit 1 (no traceback)."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_cli_run import _start, tsbot, workdir  # noqa: F401  (the fixture)
from tests.integration.test_metrics_endpoint import http_get
from tests.support.waiting import wait_until

SERVING = re.compile(r"metrics: serving /metrics and /healthz on http://127\.0\.0\.1:(\d+)")


def _enable_metrics(directory: Path, port: int) -> None:
    config = directory / "config.toml"
    text = config.read_text()
    section = "[metrics]\n"
    assert section in text
    head, tail = text.split(section, 1)
    tail = tail.replace("enabled = false", "enabled = true", 1).replace("port = 9464", f"port = {port}", 1)
    config.write_text(head + section + tail)


async def test_run_serves_metrics_on_loopback(workdir: Path) -> None:  # noqa: F811
    _enable_metrics(workdir, 0)
    process = _start("run", cwd=workdir)
    log = workdir / "logs" / "trading_bot.log"
    try:

        def bound_port() -> int | None:
            found = SERVING.search(log.read_text()) if log.exists() else None
            return int(found.group(1)) if found else None

        await wait_until(lambda: bound_port() is not None, within=60, what="the metrics endpoint bound")
        port = bound_port()
        assert port

        async def positions_protected() -> bool:
            status, _headers, body = await http_get(port, "/metrics")
            assert status == 200
            figures = {
                sample.name: sample.value
                for family in text_string_to_metric_families(body)
                for sample in family.samples
                if not sample.labels
            }
            return (
                figures.get("tsbot_open_positions", 0) >= 1
                and figures.get("tsbot_positions_protected") == (figures["tsbot_open_positions"])
            )

        await wait_until(positions_protected, within=60, what="positions opened and protected, as scraped")
        status, _headers, body = await http_get(port, "/healthz")
        assert status in (200, 503)
        assert '"engine": "running"' in body
    finally:
        process.send_signal(signal.SIGTERM)
        _out, err = await asyncio.to_thread(process.communicate, timeout=60)
    assert process.returncode == 0, err
    assert "Traceback" not in err


async def test_run_with_the_metrics_port_taken_is_one_line_and_exit_1(workdir: Path) -> None:  # noqa: F811
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    try:
        port = holder.getsockname()[1]
        _enable_metrics(workdir, port)
        result = await asyncio.to_thread(tsbot, "run", "--duration", "5", cwd=workdir)
    finally:
        holder.close()
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        f"tsbot: metrics: cannot listen on 127.0.0.1:{port}: the address is already in use"
    )
    assert result.stdout == ""  # nothing started: no start-up line


async def test_run_with_a_metrics_host_no_interface_has_points_at_the_host(workdir: Path) -> None:  # noqa: F811
    """`cannot listen on 10.255.255.1:…: no interface of this machine has that address (set [metrics] port
    …)` pointed the operator at the setting that was right (an operator): the host is named."""
    _enable_metrics(workdir, 0)
    config = workdir / "config.toml"
    config.write_text(config.read_text().replace('host = "127.0.0.1"', 'host = "10.255.255.1"', 1))
    result = await asyncio.to_thread(tsbot, "run", "--duration", "5", cwd=workdir)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == (
        "tsbot: metrics: cannot listen on 10.255.255.1:0: no interface of this machine has that address "
        "(set [metrics] host / TSBOT_METRICS__HOST, or enabled = false)"
    )

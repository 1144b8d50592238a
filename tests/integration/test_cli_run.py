"""`tsbot run` as operators run it: headless, on the default configuration (sim venue, embedded
PostgreSQL), stopped by --duration or SIGTERM; a second engine on the same account is refused."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import uuid
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from storage.embedded import EmbeddedPostgres
from tests.support.waiting import wait_until

TSBOT = str(Path(sys.executable).with_name("tsbot"))
INCIDENT_COVERAGE_SQL = (
    "SELECT COUNT(*) AS total, SUM(CASE WHEN has_trailing_stop THEN 1 ELSE 0 END) AS with_ts, "
    "ROUND(100.0 * SUM(CASE WHEN has_trailing_stop THEN 1 ELSE 0 END) / COUNT(*), 1) AS coverage_pct "
    "FROM monitoring.positions WHERE status='active';"
)


@pytest.fixture
def workdir(tmp_path: Path, pg_server: EmbeddedPostgres, project_root: Path) -> Path:
    """The shipped config.toml, pointed at the session's embedded server and a new database, with waves
    every 2 s so a short run sees several."""
    text = (project_root / "config.toml").read_text()
    text = text.replace('data_dir = ""', f'data_dir = "{pg_server.data_dir}"', 1)
    text = text.replace('name = "tsbot"', f'name = "run_{uuid.uuid4().hex[:12]}"', 1)
    text = text.replace("wave_interval_seconds = 20", "wave_interval_seconds = 2", 1)
    (tmp_path / "config.toml").write_text(text)
    return tmp_path


def tsbot(*args: str, cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TSBOT, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _start(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [TSBOT, *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _start_with(args: list[str], *, cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [TSBOT, *args],
        cwd=cwd,
        env={**_env(), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _start_on_terminal(terminal: int, *args: str, cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [TSBOT, *args], cwd=cwd, env=_env(), stdin=terminal, stdout=terminal, stderr=terminal
    )


async def _positions_active(dsn: str) -> bool:
    """The engine's database holds active positions (False while it cannot be read yet)."""
    try:
        conn = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError):
        return False
    try:
        return bool(
            await conn.fetchval(
                "SELECT to_regclass('monitoring.positions') IS NOT NULL AND "
                "(SELECT count(*) FROM monitoring.positions WHERE status = 'active') > 0"
            )
        )
    except asyncpg.PostgresError:
        return False
    finally:
        await conn.close()


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TSBOT_")}


def _dsn(pg_server: EmbeddedPostgres, workdir: Path) -> str:
    name = (workdir / "config.toml").read_text().split('name = "run_')[1].split('"')[0]
    return pg_server.dsn(f"run_{name}")


async def test_run_for_a_duration_protects_every_position_and_status_agrees(
    workdir: Path, pg_server: EmbeddedPostgres
) -> None:
    result = await asyncio.to_thread(tsbot, "run", "--duration", "8", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "SIM on sim" in result.stdout
    assert "start-up: restored 0, re-protected 0, adopted 0, failed 0" in result.stdout
    assert re.search(r"(keeps its|keep their) stops on the exchange", result.stdout), result.stdout

    conn = await asyncpg.connect(_dsn(pg_server, workdir))
    try:
        row = await conn.fetchrow(INCIDENT_COVERAGE_SQL)
        waves = await conn.fetchval("SELECT count(*) FROM monitoring.waves")
    finally:
        await conn.close()
    assert waves >= 2
    assert row["total"] >= 7
    assert row["coverage_pct"] == Decimal("100.0")

    status = await asyncio.to_thread(tsbot, "status", "--json", cwd=workdir)
    assert status.returncode == 3, status.stderr  # unknown: the engine stopped, nothing is measuring
    report = json.loads(status.stdout)
    assert report["state"] == "unknown"
    assert report["active"] == row["total"]
    assert report["with_trailing_stop"] == row["with_ts"]
    assert Decimal(str(report["coverage_pct"])) == row["coverage_pct"]
    assert report["uncovered"] == []
    assert report["engine"] is None  # it stopped
    assert {c["component"] for c in report["health"]["components"]} == {
        "exchange",
        "price_feed",
        "database",
        "protection",
        "signals",
    }
    assert report["health"]["streams"] == []  # measured by no engine: not shown as if up now
    log = (workdir / "logs" / "trading_bot.log").read_text()
    assert "Created trailing stop for " in log
    assert "health_check: Trailing Stop System: healthy" in log
    assert "Timeout creating" not in log


async def test_sigterm_stops_cleanly_and_a_second_engine_is_refused(
    workdir: Path, pg_server: EmbeddedPostgres
) -> None:
    first = _start("run", cwd=workdir)
    try:
        await wait_until(
            lambda: _positions_active(_dsn(pg_server, workdir)),
            within=60,
            what="the first engine to open positions",
        )

        second = await asyncio.to_thread(tsbot, "run", "--duration", "5", cwd=workdir)
        assert second.returncode == 1
        assert f"is already traded by pid {first.pid}" in second.stderr
        assert "this engine will not trade" in second.stderr

        status = json.loads((await asyncio.to_thread(tsbot, "status", "--json", cwd=workdir)).stdout)
        assert status["engine"]["pid"] == first.pid

        # As a monitoring check: the running engine's own health makes the verdict, and the exit code.
        said: list[str] = []

        async def status_says_ok() -> bool:
            check = await asyncio.to_thread(tsbot, "status", cwd=workdir)
            said[:] = [check.stdout]
            return check.returncode == 0 and check.stdout.startswith("OK: all 5 components healthy\n")

        await wait_until(status_says_ok, within=60, what="`tsbot status` to say OK (exit 0) for the engine")
        # Its health lines are the dashboard's: the five components and the venue's streams (the sim's
        # account and marks), which status left out (an operator counted five lines beside the dashboard's six).
        [streams] = [line for line in said[0].splitlines() if line.startswith("  streams ")]
        when = r"(\(no message yet\)|[0-9.hms]+ ago)"
        assert re.fullmatch(rf"  streams +account up {when}; marks up {when}", streams), said[0]

        first.send_signal(signal.SIGTERM)
        out, err = await asyncio.to_thread(first.communicate, timeout=60)
        assert first.returncode == 0, err
        assert re.search(r"(keeps its|keep their) stops on the exchange", out), out
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()

    conn = await asyncpg.connect(_dsn(pg_server, workdir))
    try:
        # Stopping leaves positions as they are (their stops stay on the exchange), and says so.
        assert await conn.fetchval("SELECT count(*) FROM monitoring.positions WHERE status = 'closed'") == 0
        assert (
            await conn.fetchval("SELECT count(*) FROM monitoring.events WHERE type = 'engine_stopped'") == 1
        )
    finally:
        await conn.close()


def test_bad_duration_is_a_usage_error(workdir: Path) -> None:
    result = tsbot("run", "--duration", "-1", cwd=workdir)
    assert result.returncode == 2
    assert result.stderr == (
        "tsbot: --duration must be a positive number of seconds, at most 31622400 (366 days), got -1\n"
    )


async def test_a_closed_terminal_stops_the_engine_like_sigterm(
    workdir: Path, pg_server: EmbeddedPostgres
) -> None:
    """SIGHUP (the terminal closed, an ssh session dropped) killed `tsbot run` at once (exit 129), leaving
    whatever was in flight. It now stops the same orderly way as SIGTERM."""
    engine = _start("run", cwd=workdir)
    try:
        await wait_until(
            lambda: _positions_active(_dsn(pg_server, workdir)), within=60, what="positions open"
        )
        engine.send_signal(signal.SIGHUP)
        out, err = await asyncio.to_thread(engine.communicate, timeout=60)
        assert engine.returncode == 0, err
        assert re.search(r"(keeps its|keep their) stops on the exchange", out), out
        assert "UNCOVERED" not in out
        # Said in the log, with the signal's name (a stop nobody meant left no line saying why: a reviewer).
        log = (workdir / "logs" / "trading_bot.log").read_text()
        assert "SIGHUP received: stopping the engine; exchange stops stay in place" in log
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()


async def test_a_terminal_gone_before_the_exit_line_is_no_internal_error(
    workdir: Path, pg_server: EmbeddedPostgres
) -> None:
    """`tmux kill-session` on a pane running `tsbot run`: the terminal is gone and SIGHUP follows. The stop
    was orderly, then printing its exit line to the terminal that no longer exists raised OSError (EIO):
    "tsbot run: internal error" and a traceback in the log, exit 1, after a clean stop (an operator's find).
    The exit line is still in the log, and the exit code is the stop's."""
    main, terminal = pty.openpty()
    engine = _start_on_terminal(terminal, "run", cwd=workdir)
    os.close(terminal)
    try:
        dsn = _dsn(pg_server, workdir)

        await wait_until(lambda: _positions_active(dsn), within=60, what="positions open")
        os.close(main)  # the terminal is gone
        main = -1
        engine.send_signal(signal.SIGHUP)
        code = await asyncio.to_thread(engine.wait, 60)
    finally:
        if main >= 0:
            os.close(main)
        if engine.poll() is None:
            engine.kill()
            engine.wait()
    log = (workdir / "logs" / "trading_bot.log").read_text()
    assert "internal error" not in log
    assert code == 0
    assert "engine stopped: " in log
    assert re.search(r"(keeps its|keep their) stops on the exchange", log)


async def test_a_start_waiting_out_a_ban_stops_at_sigterm(workdir: Path) -> None:
    """A start waits out a venue's ban (Bybit's 403 is a 10-minute IP ban, Binance's grow to days): the
    positions the venue holds are protected at its end. SIGTERM, Ctrl-C and a closed terminal were heard
    only once the engine had started, so for all that time the process could not be stopped but by
    SIGKILL, and it held the account's lease. It now gives the start up at once and says so. While it
    waits, the terminal says why (it stayed blank: the warnings were held until the engine ran, an
    operator)."""
    keys = {"TSBOT_VENUE__API_KEY": "key", "TSBOT_VENUE__API_SECRET": "secret"}
    emulator = _start_with(
        ["sim-exchange", "--venue", "bybit", "--port", "0", "--faults", "market/instruments-info=ban"],
        cwd=workdir,
        env=keys,
    )
    try:
        assert emulator.stdout is not None
        url = emulator.stdout.readline().split(" on ", 1)[1].split(" ", 1)[0]
        engine = _start_with(
            ["run"], cwd=workdir, env={**keys, "TSBOT_VENUE__KIND": "bybit", "TSBOT_VENUE__BASE_URL": url}
        )
        said: list[str] = []
        assert engine.stderr is not None
        reader = threading.Thread(target=lambda: said.extend(engine.stderr or ()), daemon=True)
        reader.start()
        try:
            await wait_until(
                lambda: any("the venue refuses us until" in line for line in said),
                within=60,
                what="the start's wait said on the terminal",
            )
            engine.send_signal(signal.SIGTERM)
            await asyncio.to_thread(engine.wait, 30)
            await asyncio.to_thread(reader.join, 10)  # (the thread reads stderr to its end)
            out = engine.stdout.read() if engine.stdout else ""
        finally:
            if engine.poll() is None:
                engine.kill()
                engine.wait()
        err = said[-1] if said else ""
        assert engine.returncode == 1, (out, said)
        assert all(line.startswith("WARNING ") for line in said[:-1]), said  # then one line, the last
        assert "SIGTERM received during the start-up, while it waited for the venue (" in err
        # (the venue's 403 in its words, or, asked again inside the ban, the pacer's own refusal)
        waited = err.split("while it waited for the venue (load_markets: ", 1)[1].split("): nothing", 1)[0]
        assert "banned" in waited, err
        assert waited.endswith(" UTC"), err  # with the ban's end
        assert " UTC): nothing was restored" in err
        assert "Traceback" not in out + "".join(said)
    finally:
        emulator.send_signal(signal.SIGTERM)
        emulator.communicate(timeout=30)

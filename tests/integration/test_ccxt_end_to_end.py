"""End to end on the real-venue path: `tsbot run` with `kind = "binanceusdm"` trades `tsbot sim-exchange`
over loopback HTTP through real ccxt with real signing. A wave of signals gets protected (coverage 100 %);
the engine is then SIGKILLed while a wave is being protected and restarted against the same "exchange":
every position is protected again, no stop of ours is duplicated on the emulator, nothing is lost in the
database."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from storage.embedded import EmbeddedPostgres
from tests.support.waiting import wait_until

TSBOT = str(Path(sys.executable).with_name("tsbot"))
API_KEY = "e2e-emulator-key"
API_SECRET = "e2e-emulator-secret"
# Protective orders answer 300 ms late, so a wave spends a visible moment "filled but not yet protected":
# that is where the engine gets killed.
EMULATOR_FAULTS = "POST:algoOrder=latency:300"


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TSBOT_")}
    env["TSBOT_VENUE__API_KEY"] = API_KEY
    env["TSBOT_VENUE__API_SECRET"] = API_SECRET
    env.update(extra or {})
    return env


def _start(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [TSBOT, *args], cwd=cwd, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _stop(process: subprocess.Popen[str]) -> tuple[str, str]:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()


def _emulator_state(base_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base_url}/_sim/state", timeout=5) as response:  # loopback only
        return json.load(response)


@pytest.fixture
def workdir(tmp_path: Path, pg_server: EmbeddedPostgres, project_root: Path) -> Path:
    text = (project_root / "config.toml").read_text()
    text = text.replace('data_dir = ""', f'data_dir = "{pg_server.data_dir}"', 1)
    text = text.replace('name = "tsbot"', f'name = "ccxt_{uuid.uuid4().hex[:12]}"', 1)
    text = text.replace("wave_interval_seconds = 20", "wave_interval_seconds = 2", 1)
    text = text.replace('kind = "sim"', 'kind = "binanceusdm"', 1)
    (tmp_path / "config.toml").write_text(text)
    return tmp_path


@pytest.fixture
async def emulator(workdir: Path):  # type: ignore[no-untyped-def]
    """`tsbot sim-exchange` on a free loopback port; the engine's config points at it."""
    process = _start("sim-exchange", "--port", "0", "--control", "--faults", EMULATOR_FAULTS, cwd=workdir)
    try:
        assert process.stdout is not None
        first = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), timeout=30)
        assert first.startswith("sim-exchange: Binance USDⓈ-M emulator on http://127.0.0.1:"), first
        base_url = first.split(" on ", 1)[1].split(" ", 1)[0]
        config = workdir / "config.toml"
        config.write_text(config.read_text().replace('base_url = ""', f'base_url = "{base_url}"', 1))
        yield base_url
    finally:
        _out, err = _stop(process)
        assert process.returncode == 0, err


def _dsn(pg_server: EmbeddedPostgres, workdir: Path) -> str:
    name = (workdir / "config.toml").read_text().split('name = "ccxt_')[1].split('"')[0]
    return pg_server.dsn(f"ccxt_{name}")


async def _fetch(dsn: str, query: str) -> list[asyncpg.Record]:
    try:
        conn = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError):
        return []
    try:
        return await conn.fetch(query)
    except asyncpg.PostgresError:
        return []
    finally:
        await conn.close()


ACTIVE = (
    "SELECT id, symbol, side, quantity, has_stop_loss, has_trailing_stop FROM monitoring.positions "
    "WHERE status = 'active'"
)
IN_FLIGHT = (
    "SELECT count(*) AS n FROM monitoring.positions WHERE status IN ('pending_entry', 'entry_placed', "
    "'pending_protection') OR (status = 'active' AND NOT (has_stop_loss AND has_trailing_stop))"
)


async def _fully_protected(dsn: str, at_least: int) -> bool:
    rows = await _fetch(dsn, ACTIVE)
    in_flight = await _fetch(dsn, IN_FLIGHT)
    return (
        len(rows) >= at_least
        and all(r["has_stop_loss"] and r["has_trailing_stop"] for r in rows)
        and bool(in_flight)
        and in_flight[0]["n"] == 0
    )


async def test_a_killed_engine_restarts_onto_the_emulator_with_every_position_protected_and_no_duplicates(
    workdir: Path, pg_server: EmbeddedPostgres, emulator: str
) -> None:
    dsn = _dsn(pg_server, workdir)

    # 1. A wave arrives and is protected: coverage 100 %.
    first = _start("run", cwd=workdir)
    try:
        await wait_until(lambda: _fully_protected(dsn, 7), within=60, what="the first wave to be protected")
        rows = await _fetch(dsn, ACTIVE)
        assert len(rows) >= 7
        assert all(r["has_stop_loss"] and r["has_trailing_stop"] for r in rows)
        protected_before = len(rows)

        # 2. SIGKILL while a later wave is between fill and protection.
        async def mid_wave() -> bool:
            found = await _fetch(dsn, IN_FLIGHT)
            return bool(found) and found[0]["n"] > 0

        await wait_until(mid_wave, within=60, what="a wave in flight")
        first.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.wait, 30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == -signal.SIGKILL
    unprotected_at_kill = (await _fetch(dsn, IN_FLIGHT))[0]["n"]

    # 3. Restart against the same emulator: restored / re-protected, nothing duplicated.
    second = _start("run", cwd=workdir)
    try:
        await wait_until(
            lambda: _fully_protected(dsn, protected_before), within=60, what="every position protected again"
        )
        out, err = _stop(second)
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    assert second.returncode == 0, err
    assert "LIVE" not in out
    assert "on binanceusdm" in out
    startup = next(line for line in out.splitlines() if line.startswith("start-up:"))
    # Entries the kill left in flight may still be in doubt at the start (named, counted uncovered until
    # settled); every position is protected all the same (checked above and below).
    assert startup.split(";")[0].endswith("failed 0"), startup

    # Every position the exchange holds is in the database, active and protected, and vice versa.
    state = _emulator_state(emulator)
    rows = await _fetch(dsn, ACTIVE)
    in_db = {(r["symbol"], r["side"], Decimal(r["quantity"])) for r in rows}
    on_exchange = {(p["symbol"], p["side"], Decimal(p["quantity"])) for p in state["positions"]}
    assert in_db == on_exchange
    assert all(r["has_stop_loss"] and r["has_trailing_stop"] for r in rows)
    assert (await _fetch(dsn, IN_FLIGHT))[0]["n"] == 0

    # Exactly one hard stop and one trailing stop of ours per position on the exchange: no duplicates.
    ours = [o for o in state["open_algo_orders"] if o["clientAlgoId"].startswith("tsb")]
    per_position = Counter((o["symbol"], o["orderType"]) for o in ours)
    assert set(per_position.values()) == {1}, per_position
    assert {symbol for symbol, _ in per_position} == {symbol for symbol, _, _ in in_db}
    assert sum(1 for _, kind in per_position if kind == "STOP_MARKET") == len(in_db)
    assert sum(1 for _, kind in per_position if kind == "TRAILING_STOP_MARKET") == len(in_db)

    # The database's live orders are exactly the exchange's open stops.
    live = await _fetch(
        dsn,
        "SELECT client_order_id FROM monitoring.orders WHERE status IN ('pending', 'open', 'unknown') "
        "AND purpose IN ('stop_loss', 'trailing_stop')",
    )
    assert {r["client_order_id"] for r in live} == {o["clientAlgoId"] for o in ours}

    log = (workdir / "logs" / "trading_bot.log").read_text()
    assert "Created trailing stop for " in log
    assert API_SECRET not in log
    assert API_KEY not in log
    print(
        f"\nccxt e2e: {protected_before} protected before the kill, {unprotected_at_kill} in flight at SIGKILL, "
        f"{len(rows)} protected after restart ({startup}); {len(ours)} stops of ours on the emulator"
    )


async def test_two_labels_on_one_api_key_are_one_account_and_the_second_engine_is_refused(
    workdir: Path, pg_server: EmbeddedPostgres, emulator: str
) -> None:
    """Issue 10 #6: `venue.account` is a label; the account is what the API key trades. A second engine
    started on the same key under another label is refused by the lease (naming who holds it), instead of
    starting beside the first and cancelling its stops."""
    dsn = _dsn(pg_server, workdir)
    first = _start("run", cwd=workdir, env={"TSBOT_VENUE__ACCOUNT": "main"})
    try:
        await wait_until(lambda: _fully_protected(dsn, 7), within=60, what="the first wave to be protected")
        stops_before = {o["clientAlgoId"] for o in _emulator_state(emulator)["open_algo_orders"]}

        second = _start("run", cwd=workdir, env={"TSBOT_VENUE__ACCOUNT": "second"})
        out, err = await asyncio.to_thread(second.communicate, None, 60)
        assert second.returncode == 1, (out, err)
        assert "Traceback" not in err
        refusal = err.strip().splitlines()
        assert len(refusal) == 1, err
        assert "already traded by pid" in refusal[0], refusal[0]
        assert "account label 'main'" in refusal[0], refusal[0]
        assert API_KEY not in err

        # The first engine's stops are all still on the exchange and it still trades.
        stops_after = {o["clientAlgoId"] for o in _emulator_state(emulator)["open_algo_orders"]}
        assert stops_before <= stops_after
        assert first.poll() is None
        await wait_until(
            lambda: _fully_protected(dsn, 7), within=60, what="the first engine still protecting"
        )
    finally:
        out, err = _stop(first)
    assert first.returncode == 0, err

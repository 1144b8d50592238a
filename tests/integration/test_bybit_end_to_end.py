"""End to end on Bybit: `tsbot run` with `kind = "bybit"` trades `tsbot sim-exchange --venue bybit` over
loopback HTTP through real ccxt with real signing. A wave of signals gets protected; the engine is then
SIGKILLed while a wave is being protected and restarted against the same "exchange": every position is
protected again, each holds exactly one hard stop and one trailing stop, no trailing stop set before the
kill was set again (on Bybit that restarts its high-water mark), nothing is lost in the database."""

from __future__ import annotations

import asyncio
import signal
import uuid
from decimal import Decimal
from pathlib import Path

import pytest

from storage.embedded import EmbeddedPostgres
from tests.integration.test_ccxt_end_to_end import (
    ACTIVE,
    API_KEY,
    API_SECRET,
    IN_FLIGHT,
    _dsn,
    _emulator_state,
    _fetch,
    _fully_protected,
    _start,
    _stop,
)
from tests.support.waiting import wait_until

# Position stops answer 300 ms late, so a wave spends a visible moment "filled but not yet protected".
EMULATOR_FAULTS = "POST:position/trading-stop=latency:300"


@pytest.fixture
def workdir(tmp_path: Path, pg_server: EmbeddedPostgres, project_root: Path) -> Path:
    text = (project_root / "config.toml").read_text()
    text = text.replace('data_dir = ""', f'data_dir = "{pg_server.data_dir}"', 1)
    text = text.replace('name = "tsbot"', f'name = "ccxt_{uuid.uuid4().hex[:12]}"', 1)
    text = text.replace("wave_interval_seconds = 20", "wave_interval_seconds = 2", 1)
    text = text.replace('kind = "sim"', 'kind = "bybit"', 1)
    (tmp_path / "config.toml").write_text(text)
    return tmp_path


@pytest.fixture
async def emulator(workdir: Path):  # type: ignore[no-untyped-def]
    process = _start(
        "sim-exchange",
        "--venue",
        "bybit",
        "--port",
        "0",
        "--control",
        "--faults",
        EMULATOR_FAULTS,
        cwd=workdir,
    )
    try:
        assert process.stdout is not None
        first = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), timeout=30)
        assert first.startswith("sim-exchange: Bybit v5 (linear) emulator on http://127.0.0.1:"), first
        base_url = first.split(" on ", 1)[1].split(" ", 1)[0]
        config = workdir / "config.toml"
        config.write_text(config.read_text().replace('base_url = ""', f'base_url = "{base_url}"', 1))
        yield base_url
    finally:
        _out, err = _stop(process)
        assert process.returncode == 0, err


async def test_a_killed_engine_restarts_onto_bybit_with_every_position_protected_and_no_trailing_reset(
    workdir: Path, pg_server: EmbeddedPostgres, emulator: str
) -> None:
    dsn = _dsn(pg_server, workdir)

    first = _start("run", cwd=workdir)
    try:
        await wait_until(lambda: _fully_protected(dsn, 7), within=60, what="the first wave to be protected")
        protected_before = len(await _fetch(dsn, ACTIVE))

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
    # The hard stops the first run's entries carried are its creations: logged "Created", never "Restored"
    # (nothing was there to restore before it), so the operators' grep counts them.
    first_log = (workdir / "logs" / "trading_bot.log").read_text()
    assert first_log.count("Created stop-loss for ") >= protected_before
    assert "Restored stop-loss for " not in first_log
    trailing_before = {
        s["symbol"]: s["trailingSetAt"]
        for s in _emulator_state(emulator)["position_stops"]
        if s["trailingStop"]
    }

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
    assert "on bybit" in out
    startup = next(line for line in out.splitlines() if line.startswith("start-up:"))
    assert startup.split(";")[0].endswith("failed 0"), startup  # (then any entries still in doubt, named)

    state = _emulator_state(emulator)
    rows = await _fetch(dsn, ACTIVE)
    in_db = {(r["symbol"], r["side"], Decimal(r["quantity"])) for r in rows}
    on_exchange = {(p["symbol"], p["side"], Decimal(p["quantity"])) for p in state["positions"]}
    assert in_db == on_exchange
    assert all(r["has_stop_loss"] and r["has_trailing_stop"] for r in rows)
    assert (await _fetch(dsn, IN_FLIGHT))[0]["n"] == 0

    # Every position holds one hard stop and one trailing stop (Bybit keeps one of each per position).
    stops = {s["symbol"]: s for s in state["position_stops"]}
    assert set(stops) == {symbol for symbol, _, _ in in_db}
    assert all(s["stopLoss"] and s["trailingStop"] for s in stops.values())
    # A trailing stop working before the kill was never set again: its high-water mark survived.
    assert trailing_before
    assert {symbol: stops[symbol]["trailingSetAt"] for symbol in trailing_before} == trailing_before

    # Beyond Binance: every entry carried its hard stop (order/create with stopLoss), so no position was
    # ever without one; trading-stop set the trailing stops (and a hard stop only where the fill moved it).
    assert state["stops_attached_to_entries"] >= len(rows)
    # What the database says each hard stop is, the venue holds (those the fill moved were corrected).
    claimed = await _fetch(
        dsn, "SELECT symbol, stop_loss_price FROM monitoring.positions WHERE status = 'active'"
    )
    assert {r["symbol"]: Decimal(r["stop_loss_price"]) for r in claimed} == {
        symbol: Decimal(s["stopLoss"]) for symbol, s in stops.items()
    }

    log = (workdir / "logs" / "trading_bot.log").read_text()
    assert API_SECRET not in log
    assert API_KEY not in log
    print(
        f"\nbybit e2e: {protected_before} protected before the kill, {len(trailing_before)} trailing stops kept, "
        f"{len(rows)} protected after restart ({startup}); {state['stops_attached_to_entries']} hard stops "
        f"rode on their entries, {state['requests_by_endpoint'].get('POST position/trading-stop', 0)} trading-stop "
        "calls"
    )

"""`tsbot run` stopped and started again on the default configuration (sim venue, embedded PostgreSQL):
the sim venue kept its book, so the second run restores every position the first one left, with nothing
re-placed and no reduce-only stop refused (issue 13: restarting `make run` showed phantom positions at
0 % with a -2022 storm)."""

from __future__ import annotations

import asyncio
import stat
from decimal import Decimal
from pathlib import Path

import asyncpg

from storage.embedded import EmbeddedPostgres
from tests.integration.test_cli_run import INCIDENT_COVERAGE_SQL, _dsn, tsbot, workdir

__all__ = ["workdir"]  # the fixture, shared with test_cli_run


def book_of(pg_server: EmbeddedPostgres, workdir: Path) -> Path:
    name = (workdir / "config.toml").read_text().split('name = "')[1].split('"')[0]
    return pg_server.data_dir.parent / "sim-venue" / f"{name}-default.json"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_a_second_tsbot_run_restores_what_the_first_left_on_the_sim(
    workdir: Path, pg_server: EmbeddedPostgres
) -> None:
    first = await asyncio.to_thread(tsbot, "run", "--duration", "8", cwd=workdir)
    assert first.returncode == 0, first.stderr
    conn = await asyncpg.connect(_dsn(pg_server, workdir))
    try:
        left = await conn.fetchval("SELECT count(*) FROM monitoring.positions WHERE status = 'active'")
    finally:
        await conn.close()
    assert left >= 7
    book = book_of(pg_server, workdir)
    assert mode(book) == 0o600

    second = await asyncio.to_thread(tsbot, "run", "--duration", "6", cwd=workdir)
    assert second.returncode == 0, second.stderr
    assert f"start-up: restored {left}, re-protected 0, adopted 0, failed 0" in second.stdout
    assert "; uncovered 0" in second.stdout
    log = (workdir / "logs" / "trading_bot.log").read_text()
    assert "-2022" not in log
    assert "closed_on_exchange" not in log
    conn = await asyncpg.connect(_dsn(pg_server, workdir))
    try:
        row = await conn.fetchrow(INCIDENT_COVERAGE_SQL)
    finally:
        await conn.close()
    assert row["total"] >= left
    assert row["coverage_pct"] == Decimal("100.0")

"""`tsbot report`: the shift summary, run as an operator would, over a history seeded in the database with
known figures (the rows an engine writes), including rows of another account and rows outside the window
that must not count."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from storage.embedded import EmbeddedPostgres
from tests.integration.test_cli import _clean_env, _db_name, tsbot

ACCOUNT = "sim:default"  # the sim venue with the default label
OTHER = "sim:other"


@pytest.fixture
def workdir(tmp_path: Path, pg_server: EmbeddedPostgres) -> Path:
    """A working directory whose config.toml uses the session's embedded server and a new database."""
    name = f"report_{uuid.uuid4().hex[:12]}"
    (tmp_path / "config.toml").write_text(f'[database]\ndata_dir = "{pg_server.data_dir}"\nname = "{name}"\n')
    return tmp_path


def _at(base: datetime, minutes: float) -> datetime:
    return base + timedelta(minutes=minutes)


async def _seed(dsn: str) -> datetime:
    """The history of a shift; returns its base moment B (the window under test starts at B + 60 min)."""
    conn = await asyncpg.connect(dsn)
    try:
        base: datetime = await conn.fetchval("SELECT date_trunc('minute', now()) - interval '3 hours'")

        async def wave(minutes: float) -> int:
            return await conn.fetchval(
                "INSERT INTO monitoring.waves (started_at, finished_at) VALUES ($1, $1) RETURNING id",
                _at(base, minutes),
            )

        async def position(
            symbol: str,
            *,
            opened: float,
            protected: float | None,
            closed: float | None = None,
            exit_reason: str | None = None,
            pnl: str | None = None,
            wave_id: int | None = None,
            account: str = ACCOUNT,
        ) -> int:
            return await conn.fetchval(
                """
                INSERT INTO monitoring.positions
                    (symbol, exchange, side, quantity, entry_price, status, account, wave_id, opened_at,
                     protected_at, closed_at, exit_reason, realized_pnl)
                VALUES ($1, 'sim', 'long', 10, 2.5, $2, $3, $4, $5, $6, $7, $8, $9::numeric)
                RETURNING id
                """,
                symbol,
                "active" if closed is None else "closed",
                account,
                wave_id,
                _at(base, opened),
                None if protected is None else _at(base, protected),
                None if closed is None else _at(base, closed),
                exit_reason,
                pnl,
            )

        async def span(
            position_id: int, start: float, end: float, reason: str, ended_by: str, account: str = ACCOUNT
        ) -> None:
            await conn.execute(
                """
                INSERT INTO monitoring.uncovered_spans
                    (account, position_id, symbol, started_at, ended_at, reason, ended_by)
                SELECT $1, id, symbol, $3, $4, $5, $6 FROM monitoring.positions WHERE id = $2
                """,
                account,
                position_id,
                _at(base, start),
                _at(base, end),
                reason,
                ended_by,
            )

        async def event(type_: str, minutes: float, account: str = ACCOUNT) -> None:
            await conn.execute(
                "INSERT INTO monitoring.events (severity, type, message, created_at, account) "
                "VALUES ('error', $1, 'seeded', $2, $3)",
                type_,
                _at(base, minutes),
                account,
            )

        # An entry the venue refused inside the window: it opened nothing.
        await conn.execute(
            """
            INSERT INTO monitoring.positions
                (symbol, exchange, side, quantity, entry_price, status, account, closed_at, exit_reason)
            VALUES ('ARBUSDT', 'sim', 'long', 10, 2.5, 'failed', $1, $2,
                    'entry refused: sim create_order: HTTP 500 before execution')
            """,
            ACCOUNT,
            _at(base, 95),
        )
        await wave(30)  # before the window
        w2 = await wave(70)
        await wave(80)  # opened nothing: it counts (it cannot be anyone else's)
        w4 = await wave(90)  # another account's wave

        p1 = await position(
            "SFPUSDT", opened=65, protected=65.1, closed=100, exit_reason="stop_loss", pnl="-1.50", wave_id=w2
        )
        # Its hard stop followed the fill by a quarter second (stamped by the engine when it is confirmed).
        await conn.execute("UPDATE monitoring.positions SET hard_stop_gap_seconds = 0.25 WHERE id = $1", p1)
        await position(
            "ALLUSDT",
            opened=75,
            protected=75.1,
            closed=110,
            exit_reason="trailing_stop",
            pnl="3.25",
            wave_id=w2,
        )
        p3 = await position("JUPUSDT", opened=85, protected=None, closed=120, exit_reason="manual")
        p4 = await position(
            "DOGEUSDT", opened=20, protected=20.1, closed=95, exit_reason="stop_loss", pnl="-0.75"
        )
        p5 = await position(
            "SFPUSDT",
            opened=91,
            protected=91.1,
            closed=119,
            exit_reason="manual",
            pnl="100",
            wave_id=w4,
            account=OTHER,
        )
        await position("XRPUSDT", opened=90, protected=90.1)  # still open, protected

        await span(p4, 21, 22, "stop_loss_missing", "protected")  # before the window
        await span(p4, 50, 62, "trailing_stop_missing", "protected")  # 120 s inside
        await span(p1, 66, 66 + 45.5 / 60, "stop_loss_missing", "protected")  # 45.5 s
        await span(p3, 85, 120, "not_yet_protected", "closed")  # 2100 s: the worst
        await span(p5, 92, 118, "both_missing", "protected", account=OTHER)

        for type_, minutes in (
            ("protection_timeout", 61),
            ("protection_timeout", 62),
            ("protection_server_error", 63),
            ("protection_server_error", 64),
            ("protection_server_error", 65),
            ("protection_rejected", 59),  # before the window
            ("protection_failed", 66),  # not a failure class
        ):
            await event(type_, minutes)
        await event("protection_timeout", 67, account=OTHER)

        # A sample every 10 s from B+60 min to B+100 min: 100 % for 20 min, 50 % for 10 min, then no position.
        await conn.execute(
            """
            INSERT INTO monitoring.coverage_samples (account, at, active, protected, uncovered, lasting, coverage_pct)
            SELECT $1, $2::timestamptz + k * interval '10 seconds',
                   CASE WHEN k < 180 THEN 2 ELSE 0 END,
                   CASE WHEN k < 120 THEN 2 WHEN k < 180 THEN 1 ELSE 0 END,
                   CASE WHEN k >= 120 AND k < 180 THEN 1 ELSE 0 END, 0,
                   CASE WHEN k < 120 THEN 100.0 WHEN k < 180 THEN 50.0 END
            FROM generate_series(0, 240) AS k
            """,
            ACCOUNT,
            _at(base, 60),
        )
        # Just before the window (its time inside is nil), and another account's sample inside it.
        for account, minutes in ((ACCOUNT, 60 - 10 / 60), (OTHER, 70 + 5 / 60)):
            await conn.execute(
                "INSERT INTO monitoring.coverage_samples VALUES ($1, $2, 1, 0, 1, 1, 0.0)",
                account,
                _at(base, minutes),
            )
        return base
    finally:
        await conn.close()


async def _seeded(workdir: Path, pg_server: EmbeddedPostgres) -> datetime:
    migrated = tsbot("db", "migrate", cwd=workdir)
    assert migrated.returncode == 0, migrated.stderr
    return await _seed(pg_server.dsn(_db_name(workdir)))


async def test_the_shift_report_adds_up_the_seeded_history(
    workdir: Path, pg_server: EmbeddedPostgres
) -> None:
    base = await _seeded(workdir, pg_server)
    since = _at(base, 60).isoformat()

    human = tsbot("report", "--since", since, cwd=workdir)
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert lines[0].startswith(f"shift report for {ACCOUNT} (label 'default'): ")
    for expected in (
        "waves:                2",
        "positions opened:     4",
        "  protected:          3 (1 never protected)",
        "protection failures:  5",
        "fill to hard stop:    longest 0.250 s; 1 of 1 waited for theirs after the fill",
        "  timeout             2",
        "  server_error        3",
        "  rejected            0",
        "uncovered:            2265.500 s (37m45s) in 3 spans",
        "coverage:             83.3 % time-weighted (lowest 50.0 %, inside grace counted as not covered), "
        "2430.000 s measured",
        "closes:               4",
        "  stop_loss           2",
        "  trailing_stop       1",
        "  manual              1",
        "realized PnL:         1.00 before fees (1 of the closes without a known PnL)",
        "entries not opened:   1",
        "  entry refused       1",
    ):
        assert expected in lines, f"{expected!r} not in:\n{human.stdout}"
    [worst] = [line for line in lines if line.startswith("  worst:")]
    assert "2100.000 s (35m), #" in worst
    assert "JUPUSDT" in worst
    assert "(not_yet_protected; ended: closed)" in worst

    machine = tsbot("report", "--since", since, "--json", cwd=workdir)
    assert machine.returncode == 0, machine.stderr
    report = json.loads(machine.stdout)
    assert report["account"] == ACCOUNT
    assert datetime.fromisoformat(report["since"]) == _at(base, 60)
    assert (report["waves"], report["opened"], report["protected"]) == (2, 4, 3)
    assert report["failures"] == {
        "timeout": 2,
        "unknown_outcome": 0,
        "rejected": 0,
        "server_error": 3,
        "rate_limited": 0,
        "not_sent": 0,
    }
    assert (report["uncovered_spans"], report["still_uncovered"], report["uncovered_seconds"]) == (
        3,
        0,
        "2265.500",
    )
    assert report["worst"]["seconds"] == "2100.000"
    assert (report["worst"]["symbol"], report["worst"]["ended_by"]) == ("JUPUSDT", "closed")
    assert (report["coverage_pct"], report["lowest_coverage_pct"], report["measured_seconds"]) == (
        "83.3",
        "50.0",
        "2430.000",
    )
    # An entry refused opened nothing: it is no close (a shift report counted 96 of them as closes).
    assert report["closes"] == {"stop_loss": 2, "manual": 1, "trailing_stop": 1}
    assert report["entries_not_opened"] == {"entry refused": 1}
    assert Decimal(report["realized_pnl"]) == Decimal("1.00")
    assert report["closed_without_pnl"] == 1

    # Back from now: the whole seeded history is inside 8 hours.
    wide = json.loads(tsbot("report", "--since", "8h", "--json", cwd=workdir).stdout)
    assert (wide["waves"], wide["opened"], wide["protected"]) == (3, 5, 4)
    assert wide["uncovered_spans"] == 4
    assert Decimal(wide["uncovered_seconds"]) == Decimal("2925.500")  # + the 60 s span and all 12 min of p4's


async def test_an_empty_history_says_so_rather_than_inventing_figures(workdir: Path) -> None:
    assert tsbot("db", "migrate", cwd=workdir).returncode == 0
    result = tsbot("report", "--since", "1h", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "uncovered:            0.000 s in 0 spans" in result.stdout
    assert "coverage:             n/a (no sample with active positions), 0.000 s measured" in result.stdout
    assert "realized PnL:         0 before fees" in result.stdout.splitlines()


def test_a_wrong_since_is_one_line_naming_it_and_exit_2(workdir: Path) -> None:
    for wrong in ("yesterday", "0h", "8x", "2999-01-01T00:00", ""):
        result = tsbot("report", "--since", wrong, cwd=workdir)
        assert result.returncode == 2, (wrong, result.stderr)
        assert result.stdout == ""
        [line] = result.stderr.splitlines()
        assert line.startswith("tsbot: --since "), line
        assert "Traceback" not in result.stderr


def test_an_unreachable_database_is_one_line_and_a_failure(tmp_path: Path) -> None:
    # Nothing listens on the discard port of loopback: refused at once.
    env = _clean_env(TSBOT_DATABASE__DSN="postgresql://tsbot@127.0.0.1:9/tsbot")
    result = tsbot("report", "--since", "8h", cwd=tmp_path, env=env)
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("tsbot: database "), line
    assert "127.0.0.1:9" in line

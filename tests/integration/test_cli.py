"""The `tsbot` console script, run as an operator would, against the session's embedded PostgreSQL.

Each test points `database.data_dir` at the session server (so the subprocess joins it rather than
starting another) and uses its own database name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from storage.embedded import EmbeddedPostgres

TSBOT = str(Path(sys.executable).with_name("tsbot"))
INCIDENT_COVERAGE_SQL = (
    "SELECT COUNT(*) AS total, SUM(CASE WHEN has_trailing_stop THEN 1 ELSE 0 END) AS with_ts, "
    "ROUND(100.0 * SUM(CASE WHEN has_trailing_stop THEN 1 ELSE 0 END) / COUNT(*), 1) AS coverage_pct "
    "FROM monitoring.positions WHERE status='active';"
)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TSBOT_")}
    env.update(extra)
    return env


def tsbot(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TSBOT, *args], cwd=cwd, env=env or _clean_env(), capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def workdir(tmp_path: Path, pg_server: EmbeddedPostgres) -> Path:
    """A working directory whose config.toml uses the session's embedded server and a new database."""
    name = f"cli_{uuid.uuid4().hex[:12]}"
    (tmp_path / "config.toml").write_text(f'[database]\ndata_dir = "{pg_server.data_dir}"\nname = "{name}"\n')
    return tmp_path


def _db_name(workdir: Path) -> str:
    return (workdir / "config.toml").read_text().split('name = "')[1].split('"')[0]


def test_db_migrate_applies_once_then_reports_up_to_date(workdir: Path, pg_server: EmbeddedPostgres) -> None:
    first = tsbot("db", "migrate", cwd=workdir)
    assert first.returncode == 0, first.stderr
    assert "applied 0001_monitoring.sql" in first.stdout
    assert f"?host={pg_server.socket_dir}" in first.stdout

    second = tsbot("db", "migrate", cwd=workdir)
    assert second.returncode == 0, second.stderr
    assert "database is up to date" in second.stdout
    assert (workdir / "logs" / "trading_bot.log").exists()


async def test_the_cli_joins_the_running_server_and_leaves_it_running(
    workdir: Path, pg_server: EmbeddedPostgres
) -> None:
    assert tsbot("db", "migrate", cwd=workdir).returncode == 0
    # The subprocess has exited; the server it joined is still ours and still answers.
    conn = await asyncpg.connect(pg_server.dsn(_db_name(workdir)))
    try:
        assert await conn.fetchval("SELECT pg_backend_pid()") > 0
        assert await conn.fetchval("SELECT count(*) FROM monitoring.schema_migrations") >= 1
    finally:
        await conn.close()


async def test_status_json_agrees_with_the_incident_sql(workdir: Path, pg_server: EmbeddedPostgres) -> None:
    assert tsbot("db", "migrate", cwd=workdir).returncode == 0
    conn = await asyncpg.connect(pg_server.dsn(_db_name(workdir)))
    try:
        for i in range(7):
            await conn.execute(
                "INSERT INTO monitoring.positions (account, symbol, exchange, side, quantity, entry_price, status, "
                "has_stop_loss, has_trailing_stop, opened_at) VALUES ('sim:default', $1, 'sim', 'long', 1, 2, 'active', "
                "true, $2, "
                "now() - interval '1 minute')",
                f"S{i}USDT",
                i < 5,
            )
        # Opened a moment ago, no stops yet: within the grace period, but no engine looks after the account,
        # so nothing will protect it: listed as uncovered at once (with an engine it would not be yet).
        await conn.execute(
            "INSERT INTO monitoring.positions (account, symbol, exchange, side, quantity, entry_price, status, "
            "opened_at) VALUES ('sim:default', 'NEWUSDT', 'sim', 'short', 1, 2, 'pending_protection', now())"
        )
        sql_row = await conn.fetchrow(INCIDENT_COVERAGE_SQL)
    finally:
        await conn.close()

    result = tsbot("status", "--json", cwd=workdir)
    # No engine measures, but the records show two positions uncovered and nothing protects them: critical.
    assert result.returncode == 2, result.stderr
    status = json.loads(result.stdout)
    assert (status["state"], status["reason"]) == (
        "critical",
        "3 positions uncovered (S5USDT, S6USDT, NEWUSDT) and no engine protecting them: none holds the account "
        "sim:default",
    )
    assert status["active"] == sql_row["total"] == 7
    assert status["with_trailing_stop"] == sql_row["with_ts"] == 5
    assert Decimal(str(status["coverage_pct"])) == sql_row["coverage_pct"] == Decimal("71.4")
    assert status["with_stop_loss"] == 7
    assert sorted(p["symbol"] for p in status["uncovered"]) == ["NEWUSDT", "S5USDT", "S6USDT"]

    human = tsbot("status", cwd=workdir)
    # No engine checks the venue: the figures are the records', and say so (an operator read "100.0%",
    # "uncovered: 0" while two stops had been cancelled on the venue since).
    assert (
        "TS coverage:        71.4% of the active positions (in the records: no engine checks the venue now)\n"
        "uncovered:          3 (in the records: no engine checks the venue now)\n"
    ) in human.stdout
    assert status["entries"] == "on"
    # The rows above were the sim venue's default account's: the status names it, as the SQL should.
    assert (status["account"], status["account_label"]) == ("sim:default", "default")
    assert "account:            sim:default (label 'default')" in human.stdout
    # Every value in one column (the trailing stops' count stood two places right of the others').
    assert "active positions:   7\nwith stop-loss:     7\nwith trailing stop: 5\n" in human.stdout


async def test_status_says_entries_are_paused_by_whom_and_why(
    workdir: Path, pg_server: EmbeddedPostgres
) -> None:
    assert tsbot("db", "migrate", cwd=workdir).returncode == 0
    conn = await asyncpg.connect(pg_server.dsn(_db_name(workdir)))
    try:
        await conn.execute(
            "INSERT INTO monitoring.entries_control (venue, account, paused, paused_by, reason) "
            "VALUES ('sim', 'sim:default', true, 'breaker', '2 of 9 protective order sends failed')"
        )
    finally:
        await conn.close()
    status = json.loads(tsbot("status", "--json", cwd=workdir).stdout)
    assert status["entries"] == "paused"
    assert status["entries_paused"]["by"] == "breaker"
    assert status["entries_paused"]["reason"] == "2 of 9 protective order sends failed"
    human = tsbot("status", cwd=workdir).stdout
    assert "entries:            PAUSED by the breaker since " in human
    assert human.rstrip().count("\n") > 3


def test_incident_sql_runs_through_db_psql(workdir: Path) -> None:
    assert tsbot("db", "migrate", cwd=workdir).returncode == 0
    result = tsbot("db", "psql", "--", "-X", "-A", "-t", "-c", INCIDENT_COVERAGE_SQL, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0||"  # no active positions: count 0, sums NULL


def test_bad_config_value_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[protection]\ncallback_percent = 0\n")
    for args in (("config", "show"), ("db", "migrate"), ("status",)):
        result = tsbot(*args, cwd=tmp_path)
        assert result.returncode == 2
        assert (
            result.stderr == "config.toml: protection.callback_percent: must be between 0.1 and 10, got 0\n"
        )
        assert result.stdout == ""


def test_config_show_names_sources_and_hides_secrets(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[signals]\nwave_size = 9\n")
    env = _clean_env(TSBOT_VENUE__API_SECRET="sekrit-value-1", TSBOT_PROTECTION__CALLBACK_PERCENT="0.8")
    result = tsbot("config", "show", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "sekrit-value-1" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("wave_size = 9") and line.endswith("# file") for line in lines)
    assert any(
        line.startswith("callback_percent = 0.8")
        and line.endswith("# env TSBOT_PROTECTION__CALLBACK_PERCENT")
        for line in lines
    )
    assert any(line.startswith("stop_loss_percent = 3") and line.endswith("# default") for line in lines)
    assert any(
        line.startswith('api_secret = "<redacted>"') and line.endswith("# env TSBOT_VENUE__API_SECRET")
        for line in lines
    )


def test_explicit_config_path_and_unknown_database_server_fail_cleanly(tmp_path: Path) -> None:
    missing = tsbot("status", "--config", str(tmp_path / "absent.toml"), cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr == f"{tmp_path / 'absent.toml'}: config file not found\n"

    (tmp_path / "ext.toml").write_text(
        f'[database]\ndsn = "postgresql://bot@/tsbot?host={tmp_path}/no-such-socket-dir"\n'
    )
    env = _clean_env(TSBOT_DATABASE__PASSWORD="never-shown-pw")
    unreachable = tsbot("status", "--config", str(tmp_path / "ext.toml"), cwd=tmp_path, env=env)
    assert unreachable.returncode == 3  # the monitoring convention's unknown
    assert unreachable.stdout.startswith("UNKNOWN: database postgresql://bot@/tsbot")
    assert "cannot connect" in unreachable.stdout
    assert "never-shown-pw" not in unreachable.stdout + unreachable.stderr
    migrate = tsbot("db", "migrate", "--config", str(tmp_path / "ext.toml"), cwd=tmp_path, env=env)
    assert migrate.returncode == 1
    assert migrate.stderr.startswith("tsbot: database postgresql://bot@/tsbot")
    assert "cannot connect" in migrate.stderr
    assert "never-shown-pw" not in migrate.stderr


async def _signal_rows(pg_server: EmbeddedPostgres, workdir: Path) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(pg_server.dsn(_db_name(workdir)))
    try:
        return await conn.fetch(
            "SELECT symbol, side, score, external_id, status, account FROM monitoring.signals ORDER BY id"
        )
    finally:
        await conn.close()


async def test_signals_add_inserts_a_new_row(workdir: Path, pg_server: EmbeddedPostgres) -> None:
    result = tsbot("signals", "add", "sfpusdt", "LONG", "--score", "0.75", "--id", "tv-1", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "SFPUSDT long" in result.stdout
    # For the configured account: only its engine takes it (another on the database, another account's).
    other = tsbot(
        "signals",
        "add",
        "ALLUSDT",
        "short",
        cwd=workdir,
        env={**_clean_env(), "TSBOT_VENUE__ACCOUNT": "ops2"},
    )
    assert other.returncode == 0, other.stderr
    rows = await _signal_rows(pg_server, workdir)
    assert [tuple(r) for r in rows] == [
        ("SFPUSDT", "long", Decimal("0.75"), "tv-1", "new", "sim:default"),
        ("ALLUSDT", "short", None, None, "new", "sim:ops2"),
    ]

    duplicate = tsbot("signals", "add", "ALLUSDT", "short", "--id", "tv-1", cwd=workdir)
    assert duplicate.returncode == 2
    assert duplicate.stderr == (
        "tsbot: signal: a signal with external id 'tv-1' already exists; nothing was inserted\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("SFPUSDT", "up"), "tsbot: signal: side must be long or short, got 'up'\n"),
        (
            ("SFPUSDT", "long", "--score", "high"),
            "tsbot: signal: score must be a finite number between -1e12 and 1e12 with at most 30 digits after "
            "the point, got 'high'\n",
        ),
        (("SFP/USDT", "long"), "tsbot: signal: symbol must be exchange-native letters and digits"),
    ],
)
def test_signals_add_refuses_bad_input_with_one_line(
    workdir: Path, args: tuple[str, ...], message: str
) -> None:
    result = tsbot("signals", "add", *args, cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.startswith(message)
    assert result.stderr.count("\n") == 1


async def test_signals_import_is_all_or_nothing(workdir: Path, pg_server: EmbeddedPostgres) -> None:
    bad = workdir / "bad.jsonl"
    bad.write_text(
        '{"symbol": "SFPUSDT", "side": "long"}\n\n{"symbol": "ALLUSDT", "side": "short", "score": 1.5}\n'
        '{"symbol": "SUIUSDT", "side": "sideways"}\n'
    )
    refused = tsbot("signals", "import", str(bad), cwd=workdir)
    assert refused.returncode == 2
    assert refused.stderr == f"tsbot: {bad}:4: side must be long or short, got 'sideways'\n"

    good = workdir / "good.jsonl"
    good.write_text(
        '{"symbol": "SFPUSDT", "side": "long", "id": "a"}\n{"symbol": "ALLUSDT", "side": "short", "score": 1.5}\n'
    )
    assert tsbot("db", "migrate", cwd=workdir).returncode == 0
    assert await _signal_rows(pg_server, workdir) == []
    imported = tsbot("signals", "import", str(good), cwd=workdir)
    assert imported.returncode == 0, imported.stderr
    assert "2 signals imported" in imported.stdout
    rows = await _signal_rows(pg_server, workdir)
    assert [(r["symbol"], r["side"], r["score"]) for r in rows] == [
        ("SFPUSDT", "long", None),
        ("ALLUSDT", "short", Decimal("1.5")),
    ]

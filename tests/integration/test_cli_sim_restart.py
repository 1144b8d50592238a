"""`tsbot run` stopped and started again on the default configuration (sim venue, embedded PostgreSQL):
the sim venue kept its book, so the second run restores every position the first one left, with nothing
re-placed and no reduce-only stop refused (issue 13: restarting `make run` showed phantom positions at
0 % with a -2022 storm)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import stat
import subprocess
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path

import asyncpg

from storage.embedded import EmbeddedPostgres
from tests.integration.test_cli_run import INCIDENT_COVERAGE_SQL, _dsn, _start, _start_with, tsbot, workdir
from tests.support.waiting import wait_until

__all__ = ["workdir"]  # the fixture, shared with test_cli_run


def book_of(pg_server: EmbeddedPostgres, workdir: Path) -> Path:
    name = (workdir / "config.toml").read_text().split('name = "')[1].split('"')[0]
    return pg_server.data_dir.parent / "sim-venue" / f"{name}-default.json"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def _killed_once(
    process: subprocess.Popen[str],
    condition: Callable[[], Awaitable[object]],
    what: str,
    *,
    settle: float = 0.0,
) -> None:
    """SIGKILL `process` once `condition` holds (and `settle` seconds more): an engine that dies there."""
    try:
        await wait_until(condition, within=60, what=what)
        await asyncio.sleep(settle)
        process.kill()
        await asyncio.to_thread(process.wait, 30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def _at_least(count: Awaitable[int], n: int) -> bool:
    return await count >= n


async def test_a_second_tsbot_run_restores_what_the_first_left_on_the_sim(
    workdir: Path, pg_server: EmbeddedPostgres
) -> None:
    # Stopped (SIGTERM, as a terminal's Ctrl-C or a service manager does) once seven positions are open: an
    # 8 s `--duration` opened none on a loaded CI, its start taking the time.
    dsn = _dsn(pg_server, workdir)

    async def active() -> int:
        try:
            conn = await asyncpg.connect(dsn)
        except (OSError, asyncpg.PostgresError):
            return 0
        try:
            return int(
                await conn.fetchval("SELECT count(*) FROM monitoring.positions WHERE status = 'active'")
            )
        except asyncpg.PostgresError:
            return 0
        finally:
            await conn.close()

    first = _start("run", cwd=workdir)
    try:
        await wait_until(lambda: _at_least(active(), 7), within=60, what="7 positions open")
        first.send_signal(signal.SIGTERM)
        _out, err = await asyncio.to_thread(first.communicate, timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err
    left = await active()
    assert left >= 7
    book = book_of(pg_server, workdir)
    assert mode(book) == 0o600

    second = await asyncio.to_thread(tsbot, "run", "--duration", "6", cwd=workdir)
    assert second.returncode == 0, second.stderr
    assert f"start-up: restored {left}, re-protected 0, adopted 0, failed 0" in second.stdout
    assert "; uncovered 0" in second.stdout
    assert "ended without stopping" not in second.stderr  # (the first stopped: no crash to say)
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


async def test_a_fresh_database_on_a_kept_sim_book_is_refused_naming_the_book_to_move_away(
    workdir: Path, pg_server: EmbeddedPostgres
) -> None:
    """An operator deleted the database to start over; the sim venue's book (the exchange) kept the first
    installation's positions and stops. The start is refused, as on a real venue (one engine per account),
    but it told a sim operator to "cancel its orders on the venue", which the sim has no way to do: it now
    names the book to move away for a fresh sim exchange."""
    first = await asyncio.to_thread(tsbot, "run", "--duration", "6", cwd=workdir)
    assert first.returncode == 0, first.stderr
    book = book_of(pg_server, workdir)
    assert book.exists()
    name = (workdir / "config.toml").read_text().split('name = "')[1].split('"')[0]
    admin = await asyncpg.connect(pg_server.dsn("postgres"))
    try:
        await admin.execute(f'DROP DATABASE "{name}"')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()

    refused = await asyncio.to_thread(tsbot, "run", "--duration", "6", cwd=workdir)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    [line] = [x for x in refused.stderr.splitlines() if "another tsbot installation" in x]
    assert (
        f"the sim venue's book is {book}: move it away (no engine running) for a fresh sim exchange" in line
    )
    assert "Traceback" not in refused.stderr
    book.rename(book.with_suffix(".json.old"))
    fresh = await asyncio.to_thread(tsbot, "run", "--duration", "4", cwd=workdir)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert "start-up: restored 0, re-protected 0, adopted 0, failed 0" in fresh.stdout


async def test_a_killed_managed_mode_engine_leaves_its_unmoved_trails_on_the_record(
    workdir: Path, pg_server: EmbeddedPostgres
) -> None:
    """Item 13 of issue 10 (the record hides exposure), for managed trails: a managed trail armed and not
    activated has no order on the venue; only its engine moves it. A stopped engine records each such trail
    as unmoved from its stop (an uncovered span), but one killed (SIGKILL, a crash, its host gone) wrote
    nothing: the next start restored the trails as armed all along, and the history and `tsbot report`
    showed no time without trailing protection for the engine's downtime. The next engine records them
    unmoved from the dead engine's last heartbeat until it restores them, and says so."""
    config = workdir / "config.toml"
    text = config.read_text()
    assert text.count('mode = "auto"') == 1
    assert text.count("wave_interval_seconds = 2\n") == 1
    # One wave: killed once it is protected, with nothing in flight (the sim venue, in the engine's process,
    # dies with it; what it held is on disk within `BOOK_SAVE_SECONDS`).
    config.write_text(
        text.replace('mode = "auto"', 'mode = "managed"').replace(
            "wave_interval_seconds = 2\n", "wave_interval_seconds = 600\n"
        )
    )
    dsn = _dsn(pg_server, workdir)

    async def armed_trails() -> list[int]:
        try:
            conn = await asyncpg.connect(dsn)
        except (OSError, asyncpg.PostgresError):
            return []
        try:
            return [
                r["id"]
                for r in await conn.fetch(
                    "SELECT id FROM monitoring.positions WHERE status = 'active' AND has_stop_loss "
                    "AND trail_armed AND NOT trailing_activated AND NOT has_trailing_stop"
                )
            ]
        except asyncpg.PostgresError:
            return []
        finally:
            await conn.close()

    await _killed_once(
        _start("run", cwd=workdir), armed_trails, "managed trails armed, no order yet", settle=1.0
    )
    conn = await asyncpg.connect(dsn)
    try:
        armed = await conn.fetch(
            "SELECT id, opened_at FROM monitoring.positions WHERE status = 'active' AND trail_armed "
            "AND NOT trailing_activated AND NOT has_trailing_stop"
        )
        heard = await conn.fetchval("SELECT heartbeat_at FROM monitoring.engine_leases")
        killed = await conn.fetchval("SELECT now()")
    finally:
        await conn.close()
    assert armed
    await asyncio.sleep(3.0)  # the downtime: nobody moves those trails

    second = await asyncio.to_thread(tsbot, "run", "--duration", "6", cwd=workdir)
    # (Its own stop leaves the trails unmoved again: uncovered at exit, said so, exit 1.)
    assert second.returncode == 1, second.stderr
    assert "keep only their hard stop: a managed trail has no order" in second.stderr
    said = re.search(r"the last engine on this account left (\d+) managed trails? armed", second.stderr)
    assert said is not None, second.stderr
    assert int(said.group(1)) >= len(armed)  # (those whose trail had an order on the venue too)
    conn = await asyncpg.connect(dsn)
    try:
        spans = {
            r["position_id"]: r
            for r in await conn.fetch(
                "SELECT position_id, started_at, ended_at, reason FROM monitoring.uncovered_spans "
                "WHERE started_at <= $1",
                killed,
            )
        }
        event = await conn.fetchval(
            "SELECT message FROM monitoring.events WHERE type = 'engine_ended_unstopped'"
        )
    finally:
        await conn.close()
    for row in armed:
        span = spans.get(row["id"])
        assert span is not None, f"position {row['id']}: no uncovered span for the dead engine's downtime"
        assert span["reason"] == "trailing_stop_missing"
        # From its last heartbeat (it may have died right after), or its fill if that came later.
        assert span["started_at"] == max(heard, row["opened_at"])
        assert span["ended_at"] is not None
        assert (span["ended_at"] - killed).total_seconds() >= 3.0
    assert event is not None
    assert said.group(0) in event
    # The kill itself is said once, whatever it left (a kill -9 with nothing in flight left no trace).
    assert "the last engine on this account ended without stopping (killed, crashed" in second.stderr
    conn = await asyncpg.connect(dsn)
    try:
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM monitoring.events WHERE type = 'last_engine_ended_unstopped'"
            )
            == 1
        )
    finally:
        await conn.close()
    report = json.loads((await asyncio.to_thread(tsbot, "report", "--json", cwd=workdir)).stdout)
    assert report["uncovered_spans"] >= len(armed)
    assert Decimal(report["uncovered_seconds"]) >= 3 * len(armed)


async def test_a_wave_an_engine_killed_mid_wave_left_is_finished_as_of_its_last_heartbeat_and_said(
    workdir: Path, pg_server: EmbeddedPostgres
) -> None:
    """An operator's kill -9 mid-wave: the wave's row stayed "4 signals, 0 opened, 0 protected", never
    finished, while all 4 positions had opened, and the next start said only "restored 11, re-protected 4",
    not that the last engine had died. The next start finishes it as of the dead engine's last heartbeat,
    with what its positions did by then, and says (WARNING, event `engine_ended_unstopped`) that the last
    engine ended without stopping."""
    dsn = _dsn(pg_server, workdir)

    async def wave_under_way() -> int | None:
        try:
            conn = await asyncpg.connect(dsn)
        except (OSError, asyncpg.PostgresError):
            return None
        try:
            return await conn.fetchval(
                "SELECT w.id FROM monitoring.waves w WHERE w.finished_at IS NULL AND EXISTS "
                "(SELECT 1 FROM monitoring.positions p WHERE p.wave_id = w.id)"
            )
        except asyncpg.PostgresError:
            return None
        finally:
            await conn.close()

    slow_entries = {"TSBOT_VENUE__SIM__LATENCY__BY_CALL": '{"create_order": {"seconds": 4}}'}
    await _killed_once(
        _start_with(["run"], cwd=workdir, env=slow_entries),
        wave_under_way,
        "a wave under way with its entries sent",
    )
    conn = await asyncpg.connect(dsn)
    try:
        left = [
            r["id"] for r in await conn.fetch("SELECT id FROM monitoring.waves WHERE finished_at IS NULL")
        ]
        heard = await conn.fetchval("SELECT heartbeat_at FROM monitoring.engine_leases")
        killed = await conn.fetchval("SELECT now()")
    finally:
        await conn.close()
    assert left

    second = await asyncio.to_thread(tsbot, "run", "--duration", "4", cwd=workdir)
    assert "the last engine on this account ended without stopping" in second.stderr, second.stderr
    conn = await asyncpg.connect(dsn)
    try:
        waves = {
            r["id"]: r for r in await conn.fetch("SELECT * FROM monitoring.waves WHERE id = ANY($1)", left)
        }
        positions = await conn.fetch(
            "SELECT wave_id, opened_at, protected_at FROM monitoring.positions WHERE wave_id = ANY($1)", left
        )
        event = await conn.fetchval(
            "SELECT message FROM monitoring.events WHERE type = 'engine_ended_unstopped'"
        )
    finally:
        await conn.close()
    for wave_id in left:
        wave = waves[wave_id]
        of_wave = [p for p in positions if p["wave_id"] == wave_id]
        assert wave["finished_at"] == max(heard, wave["started_at"])
        assert wave["opened"] == sum(p["opened_at"] is not None for p in of_wave)
        protected = sum(p["protected_at"] is not None and p["protected_at"] < killed for p in of_wave)
        assert (wave["protected"], wave["failed"]) == (protected, wave["opened"] - protected)
        assert f"wave {wave_id}: {wave['signals']} signals" in event


async def test_a_position_an_engine_killed_in_its_first_pass_is_on_the_record_uncovered_from_its_fill(
    workdir: Path, pg_server: EmbeddedPostgres
) -> None:
    """Killed after an entry's fill and before its stops reached the venue, an engine leaves the position
    naked and its record silent (a guard writes its first facts with its stops). The next start sends its
    stops on its first pass, and the position's naked time, from the fill to then, was on no record: the
    history and `tsbot report` must show it. A position whose stops the dead engine had placed has none."""
    dsn = _dsn(pg_server, workdir)

    async def first_pass_under_way() -> list[int] | None:
        try:
            conn = await asyncpg.connect(dsn)
        except (OSError, asyncpg.PostgresError):
            return None
        try:
            rows = await conn.fetch(
                "SELECT id FROM monitoring.positions WHERE opened_at IS NOT NULL AND protected_at IS NULL "
                "AND status = 'pending_protection'"
            )
            return [r["id"] for r in rows] or None
        except asyncpg.PostgresError:
            return None
        finally:
            await conn.close()

    # Every order call of the sim answers 3 s late: the entry's fill, then 3 s before its stops are placed.
    slow_orders = {"TSBOT_VENUE__SIM__LATENCY__BY_CALL": '{"create_order": {"seconds": 3}}'}
    await _killed_once(
        _start_with(["run"], cwd=workdir, env=slow_orders),
        first_pass_under_way,
        "a position filled with its stops on their way",
        settle=0.6,  # (the sim's book is on disk within 0.25 s of a fill; its stops are 3 s away)
    )
    naked = await first_pass_under_way()
    assert naked
    conn = await asyncpg.connect(dsn)
    try:
        killed = await conn.fetchval("SELECT now()")
        heard = await conn.fetchval("SELECT heartbeat_at FROM monitoring.engine_leases")
        covered_before = [
            r["id"]
            for r in await conn.fetch("SELECT id FROM monitoring.positions WHERE protected_at IS NOT NULL")
        ]
    finally:
        await conn.close()
    await asyncio.sleep(1)  # no engine runs
    # (its stops recorded as sent and not found: a look proves them absent only after the venue's read lag)
    second = await asyncio.to_thread(tsbot, "run", "--duration", "10", cwd=workdir)
    assert second.returncode == 0, second.stderr
    conn = await asyncpg.connect(dsn)
    try:
        positions = {
            r["id"]: r
            for r in await conn.fetch("SELECT id, opened_at, protected_at FROM monitoring.positions")
        }
        spans = await conn.fetch("SELECT * FROM monitoring.uncovered_spans ORDER BY started_at")
    finally:
        await conn.close()
    for position_id in naked:
        position = positions[position_id]
        assert position["protected_at"] is not None, (position, second.stderr)
        assert position["protected_at"] > killed  # (the second engine placed its stops)
        [span] = [s for s in spans if s["position_id"] == position_id]
        assert span["started_at"] == position["opened_at"]
        assert killed < span["ended_at"] <= position["protected_at"]  # (seen, then written)
        assert (span["reason"], span["ended_by"]) == ("not_yet_protected", "protected")
    assert not [s for s in spans if s["position_id"] in covered_before]
    report = json.loads((await asyncio.to_thread(tsbot, "report", "--json", cwd=workdir)).stdout)
    assert report["uncovered_spans"] == len(naked)
    assert Decimal(report["uncovered_seconds"]) >= len(naked) * Decimal("1")
    # The coverage series: the dead engine's last sample no longer stands over the time nobody measured;
    # from its last heartbeat it is what the records give, the naked positions not protected.
    conn = await asyncpg.connect(dsn)
    try:
        left = await conn.fetchrow("SELECT * FROM monitoring.coverage_samples WHERE at = $1", heard)
    finally:
        await conn.close()
    assert left is not None
    assert left["active"] - left["protected"] >= len(naked), dict(left)
    assert left["coverage_pct"] < 100

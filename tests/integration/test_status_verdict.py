"""`tsbot status` as a monitoring check (Nagios / Icinga plugin convention), run as a monitoring system would:
the exit code is the verdict (0 ok, 1 degraded, 2 critical, 3 unknown), the first line says it, `--json`
carries it. Before: it exited 0 while the health was CRITICAL, hung for a minute on a frozen database, said
"no stop-loss, trailing" without saying which stop was missing.

The engine's side is the real one: the account lease taken the way an engine takes it, health rows written
by the Store an engine writes them with; the database is the real embedded PostgreSQL, frozen (SIGSTOP) and
stopped for real."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from engine.accounts import account_key
from engine.code_watch import SourceWatcher
from engine.config import load_config
from storage.database import DatabaseTarget, create_pool
from storage.embedded import EmbeddedPostgres, stop_embedded
from storage.journal import WriteJournal
from storage.lease import EngineLease, LeasePhase, current_holder
from storage.outage import journal_path
from storage.repositories import HealthRow, Store
from tests.support.owned_postgres import create_migrated_database, resume, start_owned, stop_postmaster
from tests.support.records import entry_recorded
from tests.support.waiting import wait_until

TSBOT = str(Path(sys.executable).with_name("tsbot"))
# Only a guard against a hang (the defect): a status that answers never comes near it.
HANG_GUARD_SECONDS = 40

BAN_REFUSAL = (
    "binanceusdm JJJUSDT: banned for repeated rate-limit violations (HTTP 418); until 2026-12-07 11:40:04 UTC"
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TSBOT_")}
    env.update(extra)
    return env


def tsbot(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TSBOT, *args],
        cwd=cwd,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_SECONDS,
    )


GRACE_30S = {"TSBOT_PROTECTION__GRACE_SECONDS": "30"}


@pytest.fixture
async def workdir(tmp_path: Path, pg_server: EmbeddedPostgres) -> AsyncIterator[Path]:
    """config.toml on the session's embedded server, with a migrated database of this test's own."""
    name = f"status_{uuid.uuid4().hex[:12]}"
    (tmp_path / "config.toml").write_text(f'[database]\ndata_dir = "{pg_server.data_dir}"\nname = "{name}"\n')
    admin = await asyncpg.connect(pg_server.dsn("postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE tsbot_template')
    finally:
        await admin.close()
    yield tmp_path
    admin = await asyncpg.connect(pg_server.dsn("postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def _dsn(pg_server: EmbeddedPostgres, workdir: Path) -> str:
    name = (workdir / "config.toml").read_text().split('name = "')[1].split('"')[0]
    return pg_server.dsn(name)


class EngineSide:
    """What a running engine leaves in the database for status to read: the lease it holds, its health."""

    def __init__(self, dsn: str, account: str = "sim:default", venue: str = "sim"):
        self.dsn, self.account, self.venue = dsn, account, venue
        self.lease: EngineLease | None = None

    async def take_lease(self, code: SourceWatcher | None = None) -> None:
        self.lease = await EngineLease.acquire(
            self.dsn,
            self.venue,
            self.account,
            "test",
            label="default",
            code=None if code is None else (code.roots, code.running),
        )

    async def drop_lease(self) -> None:
        if self.lease is not None:
            await self.lease.release()
            self.lease = None

    async def measure(self, *states: tuple[str, str, str]) -> None:
        pool = await create_pool(DatabaseTarget(dsn=self.dsn), min_size=1, max_size=1)
        try:
            await Store(pool, self.account).save_health(
                [
                    HealthRow(component=c, state=s, summary=f"{c} measured", reason=r, measurements={})
                    for c, s, r in states
                ]
            )
        finally:
            await pool.close()

    async def execute(self, sql: str, *params: object) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(sql, *params)
        finally:
            await conn.close()


@pytest.fixture
async def engine_side(pg_server: EmbeddedPostgres, workdir: Path) -> AsyncIterator[EngineSide]:
    side = EngineSide(_dsn(pg_server, workdir))
    yield side
    await side.drop_lease()


HEALTHY = [
    ("database", "healthy", ""),
    ("exchange", "healthy", ""),
    ("protection", "healthy", ""),
]


@pytest.mark.parametrize(
    ("states", "code", "verdict", "reason"),
    [
        (HEALTHY, 0, "ok", "all 3 components healthy"),
        (
            [*HEALTHY[:2], ("protection", "degraded", "2 positions uncovered within grace")],
            1,
            "degraded",
            "protection: 2 positions uncovered within grace",
        ),
        (
            [
                ("database", "healthy", ""),
                ("exchange", "degraded", "error rate 12%"),
                ("protection", "critical", "TS coverage 60.0% below 95%"),
            ],
            2,
            "critical",
            "protection: TS coverage 60.0% below 95%",
        ),
    ],
)
async def test_the_exit_code_is_the_verdict_of_the_engines_health(
    workdir: Path,
    engine_side: EngineSide,
    states: list[tuple[str, str, str]],
    code: int,
    verdict: str,
    reason: str,
) -> None:
    await engine_side.take_lease()
    await engine_side.measure(*states)

    human = tsbot("status", cwd=workdir)
    assert human.returncode == code, human.stdout + human.stderr
    assert human.stdout.splitlines()[0] == f"{verdict.upper()}: {reason}"
    assert human.stderr == ""

    machine = tsbot("status", "--json", cwd=workdir)
    assert machine.returncode == code
    report = json.loads(machine.stdout)
    assert (report["state"], report["reason"]) == (verdict, reason)
    assert report["engine"]["pid"] == os.getpid()


async def test_an_engine_running_older_code_than_is_on_disk_is_degraded_and_named(
    workdir: Path, engine_side: EngineSide, tmp_path: Path
) -> None:
    """F10 (r75): `tsbot run` on the 06:49 code, the fix on disk at 06:53; status said "OK", its JSON held
    no word of it, and nothing but the engine's own log could. The engine records the code it runs with
    its lease; status compares it with the disk (on the engine's host): DEGRADED, naming the files. The
    same code, or an engine on another host (its files are not these), is no alarm."""
    package = tmp_path / "protection"
    package.mkdir()
    (package / "health.py").write_text("HEALTHY = True\n")
    await engine_side.take_lease(SourceWatcher([package]))
    await engine_side.measure(*HEALTHY)
    same = tsbot("status", cwd=workdir)
    assert (same.returncode, same.stdout.splitlines()[0]) == (0, "OK: all 3 components healthy"), same.stdout

    (package / "health.py").write_text("HEALTHY = True  # r75 fix on disk\n")
    # (Fresh, as a running engine's rows are: status runs take seconds each on a loaded machine.)
    await engine_side.measure(*HEALTHY)
    human = tsbot("status", cwd=workdir)
    assert human.returncode == 1, human.stdout + human.stderr
    assert human.stdout.splitlines()[0] == (
        f"DEGRADED: code: the engine (pid {os.getpid()}) runs older code than is on disk "
        "(protection/health.py changed since it started); restart it to run them"
    )
    machine = json.loads(tsbot("status", "--json", cwd=workdir).stdout)
    assert machine["engine"]["code_changed_on_disk"] == ["protection/health.py"]

    await engine_side.execute("UPDATE monitoring.engine_leases SET host = 'another-host'")
    await engine_side.measure(*HEALTHY)
    elsewhere = tsbot("status", cwd=workdir)
    assert (elsewhere.returncode, elsewhere.stdout.splitlines()[0]) == (0, "OK: all 3 components healthy")


async def test_nothing_measuring_is_unknown_never_ok(workdir: Path, engine_side: EngineSide) -> None:
    # Healthy rows, but no engine holds the account: whoever wrote them is gone.
    await engine_side.measure(*HEALTHY)
    gone = tsbot("status", "--json", cwd=workdir)
    assert gone.returncode == 3, gone.stdout + gone.stderr
    report = json.loads(gone.stdout)
    assert report["state"] == "unknown"
    assert report["reason"] == "no engine is measuring: none holds the account sim:default"
    assert report["engine"] is None

    # An engine holds the account but has measured nothing yet.
    await engine_side.execute("DELETE FROM monitoring.health")
    await engine_side.take_lease()
    silent = tsbot("status", cwd=workdir)
    assert silent.returncode == 3
    assert silent.stdout.splitlines()[0] == "UNKNOWN: no engine has measured health yet"

    # It holds the account, but its last measurement is an hour old (its health loop is stuck).
    await engine_side.measure(*HEALTHY)
    await engine_side.execute("UPDATE monitoring.health SET measured_at = now() - interval '1 hour'")
    stale = tsbot("status", "--json", cwd=workdir)
    assert stale.returncode == 3
    report = json.loads(stale.stdout)
    assert report["state"] == "unknown"
    assert report["reason"].startswith("database: stale: last measurement 1h00m old"), report["reason"]

    # A stale component does not hide a fresh critical one: critical wins.
    await engine_side.measure(("protection", "critical", "3 positions uncovered for 75s"))
    mixed = tsbot("status", "--json", cwd=workdir)
    assert mixed.returncode == 2
    assert json.loads(mixed.stdout)["reason"] == "protection: 3 positions uncovered for 75s"


async def test_uncovered_positions_say_which_stop_is_missing(workdir: Path, engine_side: EngineSide) -> None:
    for symbol, has_stop_loss, has_trailing_stop in (
        ("AAAUSDT", False, True),
        ("BBBUSDT", True, False),
        ("CCCUSDT", False, False),
    ):
        await engine_side.execute(
            "INSERT INTO monitoring.positions (account, symbol, exchange, side, quantity, entry_price, status, "
            "has_stop_loss, has_trailing_stop, opened_at) "
            "VALUES ('sim:default', $1, 'sim', 'long', 1, 2, 'active', $2, $3, now() - interval '1 minute')",
            symbol,
            has_stop_loss,
            has_trailing_stop,
        )
    # Two entries sent, not filled as far as the records go: one in flight (its entry order pending, sent by
    # the engine that holds the account), one whose outcome the engine could not learn (its entry order
    # `unknown`: it may have filled).
    # (An entry of unknown outcome sent just now is the engine's to settle within its grace, as it counts
    # it: FFFUSDT's look-up is under way; a look at status then raised an alarm the engine did not.)
    await engine_side.take_lease()
    for symbol, entry_status, age in (
        ("DDDUSDT", "pending", timedelta(minutes=1)),
        ("EEEUSDT", "unknown", timedelta(minutes=1)),
        ("FFFUSDT", "unknown", timedelta(0)),
    ):
        await engine_side.execute(
            "WITH p AS (INSERT INTO monitoring.positions (account, symbol, exchange, side, quantity, status) "
            "VALUES ('sim:default', $1, 'sim', 'long', 1, 'entry_placed') RETURNING id) "
            "INSERT INTO monitoring.orders "
            "(client_order_id, position_id, purpose, side, type, quantity, status, created_at) "
            "SELECT 'x-' || p.id || '-en0', p.id, 'entry', 'buy', 'market', 1, $2, now() - $3::interval FROM p",
            symbol,
            entry_status,
            age,
        )
    # In doubt, not known gone (an operator read "missing both" for stops the venue held): GGG's both, HHH's
    # hard stop (its trailing stop known gone).
    for symbol, sl_doubt, ts_doubt in (("GGGUSDT", True, True), ("HHHUSDT", True, False)):
        await engine_side.execute(
            "INSERT INTO monitoring.positions (account, symbol, exchange, side, quantity, entry_price, status, "
            "has_stop_loss, has_trailing_stop, stop_loss_unverified, trailing_stop_unverified, opened_at) "
            "VALUES ('sim:default', $1, 'sim', 'long', 1, 2, 'active', false, false, $2, $3, "
            "now() - interval '1 minute')",
            symbol,
            sl_doubt,
            ts_doubt,
        )
    # Sent with no answer on the record (an operator read "missing both" after a kill -9 of a Bybit position
    # whose entry had carried its hard stop): III's hard stop sent, its answer never recorded. A stop whose
    # last send was refused with nothing executed (recorded pending with its error: JJJ) is sent again with
    # the same id, which the record does not show: said as it is (one reviewer read "may be on the exchange"
    # of a stop refused at every send, another plain "missing" of one sent again and taken). One the venue
    # took and that fired (unknown, with the venue's id: KKK) protects nothing.
    for symbol, status, error, venue_id in (
        ("IIIUSDT", "pending", None, None),
        # (Said whole: it was cut at 80 characters, "… (HTTP 418); until;", the ban's end lost: an operator.)
        ("JJJUSDT", "pending", BAN_REFUSAL, None),
        ("KKKUSDT", "unknown", None, "9001"),
    ):
        await engine_side.execute(
            "WITH p AS (INSERT INTO monitoring.positions (account, symbol, exchange, side, quantity, "
            "entry_price, status, has_stop_loss, has_trailing_stop, opened_at) "
            "VALUES ('sim:default', $1, 'sim', 'long', 1, 2, 'active', false, false, "
            "now() - interval '1 minute') RETURNING id) "
            "INSERT INTO monitoring.orders "
            "(client_order_id, position_id, purpose, side, type, quantity, status, error, exchange_order_id) "
            "SELECT 'x-' || p.id || '-sl0', p.id, 'stop_loss', 'sell', 'stop_market', 1, $2, $3, $4 FROM p",
            symbol,
            status,
            error,
            venue_id,
        )
    doubt = "unverified: in doubt, asked for by id, not known gone"
    sent = "sent, no answer on the record: it may be on the exchange"
    refused = f"its last send refused: {BAN_REFUSAL}; the engine sends it again"
    # (A grace of 30 s for FFF's, sent just now: two `tsbot status` runs outlasted the default 5 s on a loaded
    # machine, and the second listed it.)
    report = json.loads(tsbot("status", "--json", cwd=workdir, **GRACE_30S).stdout)
    assert {p["symbol"]: p["missing"] for p in report["uncovered"]} == {
        "AAAUSDT": "hard stop",
        "BBBUSDT": "trailing stop",
        "CCCUSDT": "both (hard stop and trailing stop)",
        "EEEUSDT": "both (the entry's outcome is unknown: it may have filled)",
        "GGGUSDT": f"hard stop ({doubt}) and trailing stop ({doubt})",
        "HHHUSDT": f"hard stop ({doubt}) and trailing stop",
        "IIIUSDT": f"hard stop ({sent}) and trailing stop",
        "JJJUSDT": f"hard stop ({refused}) and trailing stop",
        "KKKUSDT": "both (hard stop and trailing stop)",
    }
    assert {p["symbol"]: p["unverified"] for p in report["uncovered"] if p["unverified"]} == {
        "GGGUSDT": ["hard stop", "trailing stop"],
        "HHHUSDT": ["hard stop"],
    }
    human = tsbot("status", cwd=workdir, **GRACE_30S).stdout
    lines = [line.strip() for line in human.splitlines()[1:] if "USDT" in line]  # below the verdict
    assert sorted(line.split(": ", 1)[1] for line in lines) == sorted(
        [
            "missing hard stop",
            "missing trailing stop",
            "missing both (hard stop and trailing stop)",
            "missing both (the entry's outcome is unknown: it may have filled)",
            f"missing hard stop ({doubt}) and trailing stop ({doubt})",
            f"missing hard stop ({doubt}) and trailing stop",
            f"missing hard stop ({sent}) and trailing stop",
            f"missing hard stop ({refused}) and trailing stop",
            "missing both (hard stop and trailing stop)",
        ]
    )
    assert "no stop-loss" not in human
    # The engine looking after the account sends the refused stop again ("whether it was sent again is not on
    # the record" was said while its guard did, r70); with none, nothing does.
    await engine_side.drop_lease()
    unwatched = json.loads(tsbot("status", "--json", cwd=workdir).stdout)
    assert {p["symbol"]: p["missing"] for p in unwatched["uncovered"]}["JJJUSDT"] == (
        f"hard stop (its last send refused: {BAN_REFUSAL}; no engine looks after the account to send it "
        "again) and trailing stop"
    )


async def test_with_no_engine_a_naked_position_is_listed_at_once_not_after_its_grace(
    workdir: Path, engine_side: EngineSide
) -> None:
    """An operator: `tsbot status` a few seconds after a kill -9 did not list two positions filled and
    never protected (one with a hard stop only, one with none): they appeared once their grace period had
    passed. A grace period is the time an engine takes to protect a position; with none looking after the
    account, nothing will, and status lists them at once. With an engine running, the grace still applies."""
    await engine_side.execute(
        "INSERT INTO monitoring.positions (account, symbol, exchange, side, quantity, entry_price, status, "
        "has_stop_loss, has_trailing_stop, opened_at) "
        "VALUES ('sim:default', 'ARBUSDT', 'sim', 'long', 1, 2, 'pending_protection', false, false, now())"
    )
    alone = json.loads(tsbot("status", "--json", cwd=workdir).stdout)
    assert [p["symbol"] for p in alone["uncovered"]] == ["ARBUSDT"]
    await engine_side.take_lease()
    await engine_side.measure(*HEALTHY)
    # (A grace of 30 s: at the default 5 s a loaded run's status process took longer than that to start.)
    minded = json.loads(tsbot("status", "--json", cwd=workdir, **GRACE_30S).stdout)
    assert minded["uncovered"] == []  # (inside its grace: its engine is protecting it)


async def test_with_an_engine_running_the_uncovered_list_is_never_under_an_ok_verdict(
    workdir: Path, engine_side: EngineSide
) -> None:
    """With an engine heard and its health rows all healthy (up to a health interval old, or disagreeing
    with the records), status said "OK: all 3 components healthy", exit 0, and listed an uncovered
    position below that line: a check keyed on the exit code never paged. The list is part of the
    verdict: at least degraded, naming the positions; a position still inside its grace is not listed
    (a grace of 30 s: at the default 5 s a loaded run's third look counted the young one past it)."""
    await engine_side.take_lease()
    await engine_side.measure(*HEALTHY)
    for symbol, age in (("XUSDT", timedelta(minutes=1)), ("YUSDT", timedelta(0))):
        await engine_side.execute(
            "INSERT INTO monitoring.positions (account, symbol, exchange, side, quantity, entry_price, status, "
            "has_stop_loss, has_trailing_stop, opened_at) "
            "VALUES ('sim:default', $1, 'sim', 'long', 1, 2, 'active', true, false, now() - $2::interval)",
            symbol,
            age,
        )
    # One that lost a stop a moment ago (a stop-out settling, a stop being put back) is listed at once, and
    # judged by the verdict once that lasts a grace period, as the engine's health judges it (r86: DEGRADED
    # where the health said healthy).
    await engine_side.execute(
        "INSERT INTO monitoring.positions (account, symbol, exchange, side, quantity, entry_price, status, "
        "has_stop_loss, has_trailing_stop, opened_at, unprotected_since) "
        "VALUES ('sim:default', 'ZUSDT', 'sim', 'long', 1, 2, 'active', true, false, now() - interval '1 minute', "
        "now())"
    )
    human = tsbot("status", cwd=workdir, **GRACE_30S)
    assert human.returncode == 1, human.stdout + human.stderr
    assert human.stdout.splitlines()[0] == (
        "DEGRADED: protection: 1 position uncovered (XUSDT) past grace in the records"
    )
    listed = json.loads(tsbot("status", "--json", cwd=workdir, **GRACE_30S).stdout)["uncovered"]
    assert sorted(p["symbol"] for p in listed) == ["XUSDT", "ZUSDT"]
    # The protection component saying the same is not said a second time (an operator), another one is.
    await engine_side.measure(
        ("protection", "degraded", "1 uncovered, oldest 60s"), ("exchange", "degraded", "Exchange errors 12%")
    )
    again = tsbot("status", cwd=workdir, **GRACE_30S)
    assert again.stdout.splitlines()[0] == (
        "DEGRADED: protection: 1 position uncovered (XUSDT) past grace in the records; exchange: Exchange errors 12%"
    )
    # A critical health line still decides: the uncovered list does not soften it.
    await engine_side.measure(("protection", "critical", "Low TS coverage: 50.0% (1/2)"))
    critical = tsbot("status", "--json", cwd=workdir, **GRACE_30S)
    assert critical.returncode == 2
    assert json.loads(critical.stdout)["reason"] == "protection: Low TS coverage: 50.0% (1/2)"


async def test_a_position_left_closing_without_its_stops_is_uncovered(
    workdir: Path, engine_side: EngineSide
) -> None:
    """An engine killed while a close at market was on its way (a stop breached, or fired and not filled:
    its stops gone) left the row `closing`, which the uncovered list left out: status said "UNKNOWN: no
    engine is measuring" over a position open on the venue without a stop. A close with its stops still
    live (the operator's) is not uncovered."""
    for symbol, stops in (("XUSDT", False), ("YUSDT", True)):
        await engine_side.execute(
            "INSERT INTO monitoring.positions (account, symbol, exchange, side, quantity, entry_price, status, "
            "has_stop_loss, has_trailing_stop, opened_at) "
            "VALUES ('sim:default', $1, 'sim', 'long', 1, 2, 'closing', $2, $2, now() - interval '1 minute')",
            symbol,
            stops,
        )
    looked = tsbot("status", "--json", cwd=workdir)
    assert looked.returncode == 2, looked.stdout + looked.stderr
    report = json.loads(looked.stdout)
    assert [(p["symbol"], p["status"]) for p in report["uncovered"]] == [("XUSDT", "closing")]
    assert report["reason"].startswith("1 position uncovered (XUSDT) and no engine protecting it")


# Holds the account's lease as an engine does: heartbeating it every 2 s (`LEASE_CHECK_SECONDS`).
LEASE_HOLDER = """
import asyncio, sys
from storage.lease import EngineLease

async def hold() -> None:
    lease = await EngineLease.acquire(sys.argv[1], "sim", "sim:default", "doomed", label="default")
    print("held", flush=True)
    while True:
        await asyncio.sleep(2)
        await lease.heartbeat()

asyncio.run(hold())
"""


@contextlib.asynccontextmanager
async def engine_with_an_entry_in_flight(
    engine_side: EngineSide,
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """A process holding the account as an engine does (heartbeating), its health measured, and the id of
    an entry recorded `pending` (its position `entry_placed`) as `Engine._open_position` writes it."""
    engine = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LEASE_HOLDER, engine_side.dsn, stdout=asyncio.subprocess.PIPE, env=_env()
    )
    try:
        assert engine.stdout is not None
        assert await asyncio.wait_for(engine.stdout.readline(), HANG_GUARD_SECONDS) == b"held\n"
        await engine_side.measure(*HEALTHY)
        pool = await create_pool(DatabaseTarget(dsn=engine_side.dsn), min_size=1, max_size=1)
        try:
            position_id = await entry_recorded(
                Store(pool, engine_side.account), "DDDUSDT", quantity=Decimal("3")
            )
        finally:
            await pool.close()
        yield engine, position_id
    finally:
        if engine.returncode is None:
            engine.kill()
            await engine.wait()


async def test_an_entry_left_pending_by_an_engine_killed_before_its_answer_is_uncovered_and_critical(
    workdir: Path, engine_side: EngineSide
) -> None:
    """The engine records an entry `pending` and its position `entry_placed`, then sends it. SIGKILLed while
    the answer is outstanding, it leaves them so for good, and the venue may hold the filled position with
    no stop. While an engine holds the account it is that engine's entry in flight (it counts it itself):
    not listed, no alarm. Once none does, nobody will learn its outcome: listed as uncovered, and the
    verdict is critical. Before: not listed, and `UNKNOWN: no engine is measuring` (exit 3)."""
    async with engine_with_an_entry_in_flight(engine_side) as (engine, position_id):
        running = tsbot("status", "--json", cwd=workdir)
        assert running.returncode == 0, running.stdout + running.stderr
        report = json.loads(running.stdout)
        assert (report["state"], report["uncovered"]) == ("ok", [])
        assert report["engine"]["pid"] == engine.pid

        engine.kill()  # SIGKILL: the answer never comes, the rows stay as they are
        assert await asyncio.wait_for(engine.wait(), HANG_GUARD_SECONDS) == -signal.SIGKILL
        pool = await create_pool(DatabaseTarget(dsn=engine_side.dsn), min_size=1, max_size=1)
        try:
            for _ in range(100):  # its server backend notices the closed socket, and the lock goes
                if await current_holder(pool, "sim", engine_side.account) is None:
                    break
                await asyncio.sleep(0.1)
        finally:
            await pool.close()

    dead = tsbot("status", "--json", cwd=workdir)
    assert dead.returncode == 2, dead.stdout + dead.stderr
    report = json.loads(dead.stdout)
    assert report["engine"] is None
    assert (report["state"], report["reason"]) == (
        "critical",
        "1 position uncovered (DDDUSDT) and no engine protecting it: none holds the account sim:default",
    )
    assert [(p["position_id"], p["symbol"], p["status"], p["missing"]) for p in report["uncovered"]] == [
        (position_id, "DDDUSDT", "entry_placed", "both (the entry's outcome is unknown: it may have filled)")
    ]

    human = tsbot("status", cwd=workdir)
    assert human.returncode == 2, human.stdout + human.stderr
    lines = human.stdout.splitlines()
    assert lines[0] == f"CRITICAL: {report['reason']}"
    assert "engine:             not running" in lines
    assert "uncovered:          1 (in the records: no engine checks the venue now)" in lines
    assert (
        f"  #{position_id} DDDUSDT long (entry_placed): missing both (the entry's outcome is unknown: it may "
        "have filled)"
    ) in lines


async def test_an_engine_holding_the_account_but_not_heard_counts_as_none(
    workdir: Path, engine_side: EngineSide
) -> None:
    """An engine frozen (SIGSTOP), hung, or on a host that vanished keeps its database session, and so the
    account's lock: the server lets go only once TCP gives up on the peer (hours by default). It writes no
    heartbeat: not heard for 30 s, it counts as no engine, and its entry in flight as uncovered. Before: the
    status said `ok` and listed nothing while the entry's outcome was nobody's to learn."""
    async with engine_with_an_entry_in_flight(engine_side) as (engine, _position_id):
        heard = tsbot("status", "--json", cwd=workdir)
        assert heard.returncode == 0, heard.stdout + heard.stderr
        report = json.loads(heard.stdout)
        assert (report["state"], report["uncovered"], report["engine"]["silent"]) == ("ok", [], False)

        engine.send_signal(signal.SIGSTOP)  # frozen: its session and its lock stay
        # What 9m44s of that silence leaves (the test does not wait it out): its last heartbeat that old.
        # Said in the unit the health lines use ("584 s" beside "9m44s" was two ways of one thing).
        await engine_side.execute(
            "UPDATE monitoring.engine_leases SET heartbeat_at = now() - interval '584 seconds'"
        )
        silent = tsbot("status", "--json", cwd=workdir)
        assert silent.returncode == 2, silent.stdout + silent.stderr
        report = json.loads(silent.stdout)
        assert report["state"] == "critical"
        assert report["reason"].startswith(
            "1 position uncovered (DDDUSDT) and no engine protecting it: the engine holding the account "
            f"sim:default is silent: pid {engine.pid} on "
        )
        assert re.search(r", not heard for 9m(4[4-9]|5\d)s \(hung, or its host is gone\)$", report["reason"])
        assert [p["symbol"] for p in report["uncovered"]] == ["DDDUSDT"]
        assert (report["engine"]["pid"], report["engine"]["silent"]) == (engine.pid, True)
        assert report["engine"]["heard_seconds_ago"] >= 584
        human = tsbot("status", cwd=workdir).stdout.splitlines()
        assert human[0].startswith("CRITICAL: 1 position uncovered (DDDUSDT) and no engine protecting it: ")
        assert any(
            re.match(
                r"engine: +SILENT for 9m(4[4-9]|5\d)s: holds the account but looks after nothing \(pid ",
                line,
            )
            for line in human
        ), human

        engine.send_signal(signal.SIGCONT)  # thawed: it heartbeats again, and nothing is left to alarm on
        for _ in range(50):
            again = tsbot("status", "--json", cwd=workdir)
            if again.returncode == 0:
                break
            await asyncio.sleep(0.2)
        report = json.loads(again.stdout)
        assert (report["state"], report["uncovered"], report["engine"]["silent"]) == ("ok", [], False)


async def test_a_managed_trail_counts_in_the_ts_coverage_while_its_engine_looks_after_it(
    workdir: Path, engine_side: EngineSide
) -> None:
    """In managed mode the trailing protection is the engine's own trail: no order on the venue before it
    activates (`trail_armed`). Status counted only trailing orders in its TS coverage: 0 % while nothing was
    uncovered, a false alarm on every managed-mode account. It counts an armed trail while the engine moving
    it looks after the account, as the uncovered list does; with the engine silent, neither counts it."""
    await engine_side.execute(
        "INSERT INTO monitoring.positions (account, symbol, exchange, side, quantity, entry_price, status, "
        "has_stop_loss, has_trailing_stop, trail_armed, trailing_activated, opened_at) "
        "VALUES ('sim:default', 'AAAUSDT', 'sim', 'long', 1, 2, 'active', true, false, true, false, "
        "now() - interval '1 minute'), "
        "('sim:default', 'BBBUSDT', 'sim', 'long', 1, 2, 'active', true, true, false, false, "
        "now() - interval '1 minute')"
    )
    await engine_side.take_lease()
    assert engine_side.lease is not None
    await engine_side.lease.heartbeat()
    await engine_side.measure(*HEALTHY)
    looked_after = tsbot("status", "--json", cwd=workdir)
    assert looked_after.returncode == 0, looked_after.stdout + looked_after.stderr
    report = json.loads(looked_after.stdout)
    assert (report["with_trailing_stop"], report["with_managed_trail"], report["uncovered"]) == (1, 1, [])
    assert Decimal(str(report["coverage_pct"])) == Decimal("100.0")
    human = tsbot("status", cwd=workdir).stdout.splitlines()
    assert "TS coverage:        100.0% of the active positions" in human, human
    assert "managed trails:     1 (armed: the engine moves a stop once they activate)" in human, human

    await engine_side.execute(
        "UPDATE monitoring.engine_leases SET heartbeat_at = now() - interval '31 seconds'"
    )
    silent = json.loads(tsbot("status", "--json", cwd=workdir).stdout)
    assert (silent["state"], silent["with_managed_trail"]) == ("critical", 0)
    assert [p["symbol"] for p in silent["uncovered"]] == ["AAAUSDT"]
    assert Decimal(str(silent["coverage_pct"])) == Decimal("50.0")


@pytest.mark.parametrize("engine", ["goes-quiet", "stops"])
async def test_status_reads_every_figure_from_one_snapshot(
    workdir: Path, engine_side: EngineSide, engine: str
) -> None:
    """Status read its figures statement by statement: an engine that went quiet (or stopped) between them
    left the coverage counting its managed trail, and nothing uncovered, beside an engine "not heard" (or
    none) and a critical verdict. The reads now share one snapshot, and the account's lock, which no
    snapshot holds, is read before and after them. Made deterministic with a real lock: status is held on
    the health table (read third) while the engine goes quiet or stops, then let go."""
    await engine_side.execute(
        "INSERT INTO monitoring.positions (account, symbol, exchange, side, quantity, entry_price, status, "
        "has_stop_loss, has_trailing_stop, trail_armed, trailing_activated, opened_at) "
        "VALUES ('sim:default', 'AAAUSDT', 'sim', 'long', 1, 2, 'active', true, false, true, false, "
        "now() - interval '1 minute')"
    )
    await engine_side.take_lease()
    assert engine_side.lease is not None
    await engine_side.lease.heartbeat()
    await engine_side.measure(*HEALTHY)
    locker = await asyncpg.connect(engine_side.dsn)
    watcher = await asyncpg.connect(engine_side.dsn)  # (a transaction sees one picture of the activity)
    try:
        held = locker.transaction()
        await held.start()
        await locker.execute("LOCK TABLE monitoring.health IN ACCESS EXCLUSIVE MODE")
        status = asyncio.ensure_future(asyncio.to_thread(tsbot, "status", "--json", cwd=workdir))

        async def waiting_on_the_lock() -> bool:
            return bool(
                await watcher.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE '%monitoring.health%'"
                )
            )

        await wait_until(waiting_on_the_lock, within=30, what="status held on the health table")
        if engine == "goes-quiet":
            await engine_side.execute(
                "UPDATE monitoring.engine_leases SET heartbeat_at = now() - interval '31 seconds'"
            )
        else:
            await engine_side.drop_lease()  # its lock released: no engine holds the account
        await held.rollback()
        result = await status
    finally:
        await locker.close()
        await watcher.close()
    report = json.loads(result.stdout)
    looks_after = report["engine"] is not None and not report["engine"]["silent"]
    said = (looks_after, report["with_managed_trail"], [p["symbol"] for p in report["uncovered"]])
    if engine == "goes-quiet":
        assert said == (True, 1, []), said  # as it was when the look began, every figure alike
        assert report["state"] == "ok", report["reason"]
    else:  # the lock is read live: the look is made again, every figure as it is now
        assert said == (False, 0, ["AAAUSDT"]), said


async def test_status_says_the_records_are_behind_a_journal_no_engine_has_replayed(
    workdir: Path, engine_side: EngineSide
) -> None:
    """An engine that stopped while the database was down leaves the writes it journaled (a stop replaced,
    a position closed) for its next start: the records status reads are behind by them, and a position
    they show uncovered, or covered, may no longer be. Status said nothing of it."""
    await engine_side.measure(*HEALTHY)
    conn = await asyncpg.connect(engine_side.dsn)
    try:
        token = await conn.fetchval("SELECT token FROM monitoring.installation")
    finally:
        await conn.close()
    journal = WriteJournal(
        journal_path(str(workdir / "logs" / "trading_bot.log"), token, "sim", "sim:default")
    )
    journal.load()
    for op in ("set_order_status", "record_event"):
        entry = await journal.append(op, {}, database=token, at=datetime.now(UTC))
        await journal.wait_durable(entry.seq)
    result = tsbot("status", "--json", cwd=workdir)
    assert result.returncode == 3, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["journaled_writes_pending"] == 2
    assert report["reason"] == (
        "no engine is measuring: none holds the account sim:default; the records are 2 writes behind: the last "
        f"engine journaled them while the database was down ({workdir / 'logs'}/tsbot-journal-"
        f"{token}-sim-sim_default.jsonl), and its next start replays them"
    )
    # An engine looking after the account replays its own journal: nothing to say then.
    await engine_side.take_lease()
    assert engine_side.lease is not None
    await engine_side.lease.heartbeat()
    running = json.loads(tsbot("status", "--json", cwd=workdir).stdout)
    assert (running["state"], running["journaled_writes_pending"]) == ("ok", 0)


async def test_an_engine_starting_or_stopping_is_said_and_counts_as_none(
    workdir: Path, engine_side: EngineSide
) -> None:
    """An engine starting (reading the venue, restoring) or stopping (its loops gone) holds the account but
    looks after nothing: status says which, and measures nothing from it."""
    engine_side.lease = await EngineLease.acquire(
        engine_side.dsn, "sim", engine_side.account, "test", label="default", phase=LeasePhase.STARTING
    )
    await engine_side.measure(*HEALTHY)
    for phase, said in ((LeasePhase.STARTING, "yet"), (LeasePhase.STOPPING, "any more")):
        await engine_side.lease.heartbeat(phase)
        result = tsbot("status", "--json", cwd=workdir)
        assert result.returncode == 3, result.stdout + result.stderr
        report = json.loads(result.stdout)
        assert report["state"] == "unknown"
        assert report["reason"].startswith(
            f"no engine is measuring: the engine holding the account sim:default is {phase}: pid {os.getpid()} on "
        )
        assert (report["engine"]["phase"], report["engine"]["silent"]) == (phase, False)
        human = tsbot("status", cwd=workdir).stdout.splitlines()
        upper = phase.upper()
        assert any(
            line.startswith(
                f"engine:             {upper}: holds the account but looks after nothing {said} (pid "
            )
            for line in human
        ), human
    await engine_side.lease.heartbeat(LeasePhase.RUNNING)
    # (Measured again, as a running engine does every 5 s: four status runs on a loaded machine outlasted
    # three health intervals, and the first measurement read stale.)
    await engine_side.measure(*HEALTHY)
    running = tsbot("status", "--json", cwd=workdir)
    assert running.returncode == 0, running.stdout + running.stderr
    assert json.loads(running.stdout)["engine"]["phase"] == "running"


async def test_a_start_that_has_not_read_the_venue_past_grace_leaves_the_positions_unverified(
    workdir: Path, engine_side: EngineSide
) -> None:
    """A start waiting out a ban holds the account and cannot read the venue: past a grace period the engine
    counts every carried position unverified (uncovered), and `tsbot status` said "uncovered: 0 (in the
    records)" beside it (an operator, 10 minutes of a Bybit ban). A start younger than grace is let be."""
    await engine_side.execute(
        "INSERT INTO monitoring.positions (account, symbol, exchange, side, quantity, entry_price, status, "
        "has_stop_loss, has_trailing_stop, opened_at) "
        "VALUES ('sim:default', 'ZZZUSDT', 'sim', 'long', 1, 2, 'active', true, true, now() - interval '1 hour')"
    )
    for age, listed in ((timedelta(0), False), (timedelta(minutes=1), True)):
        await engine_side.drop_lease()
        engine_side.lease = await EngineLease.acquire(
            engine_side.dsn,
            "sim",
            engine_side.account,
            "test",
            label="default",
            phase=LeasePhase.STARTING,
            since=datetime.now(UTC) - age,
        )
        report = json.loads(tsbot("status", "--json", cwd=workdir).stdout)
        missing = {p["symbol"]: p["missing"] for p in report["uncovered"]}
        if not listed:
            assert (report["state"], missing) == ("unknown", {}), report
            continue
        assert report["state"] == "critical", report
        assert missing == {
            "ZZZUSDT": "both (unverified: the engine starting has not read the venue yet; their stops were on "
            "it when last confirmed)"
        }


async def test_open_positions_an_engine_left_against_its_will_are_critical_and_a_stop_on_purpose_is_not(
    workdir: Path, engine_side: EngineSide
) -> None:
    """An operator froze an engine (SIGSTOP) with 46 positions and killed another (kill -9) with 58, then
    removed stops by hand: the venue held naked positions for 46 s and 16 s while `tsbot status` said
    UNKNOWN and "uncovered 0" (the records' last word). Open positions an engine left against its will —
    silent while it holds the account, or ended without stopping — are CRITICAL: nothing verifies or
    replaces their stops. A stop on purpose (the lease left `stopping`) stays UNKNOWN: the operator knows."""
    await engine_side.execute(
        "INSERT INTO monitoring.positions (account, symbol, exchange, side, quantity, entry_price, status, "
        "has_stop_loss, has_trailing_stop, stop_loss_price, opened_at, protected_at) VALUES "
        "('sim:default', 'ARBUSDT', 'sim', 'long', 1, 2, 'active', true, true, 1.9, now(), now()), "
        "('sim:default', 'OPUSDT', 'sim', 'long', 1, 2, 'active', true, true, 1.9, now(), now())"
    )
    await engine_side.take_lease()
    await engine_side.measure(*HEALTHY)
    minded = tsbot("status", "--json", cwd=workdir)
    assert minded.returncode == 0, minded.stdout + minded.stderr

    # Frozen: it holds the account, unheard for 31 s.
    await engine_side.execute(
        "UPDATE monitoring.engine_leases SET heartbeat_at = now() - interval '31 seconds'"
    )
    frozen = tsbot("status", "--json", cwd=workdir)
    assert frozen.returncode == 2, frozen.stdout + frozen.stderr
    reason = json.loads(frozen.stdout)["reason"]
    assert reason.startswith(
        "2 open positions and no engine protecting them: the engine holding the account sim:default is silent"
    ), reason
    assert reason.endswith("; nothing verifies or replaces their stops meanwhile"), reason

    # Killed: the lock went with its session; its lease row still says `running`.
    await engine_side.drop_lease()
    killed = tsbot("status", "--json", cwd=workdir)
    assert killed.returncode == 2, killed.stdout + killed.stderr
    reason = json.loads(killed.stdout)["reason"]
    assert re.match(
        rf"2 open positions and no engine protecting them: the last engine \(pid {os.getpid()} on .+\) ended "
        r"without stopping \(killed, crashed, or its host gone\), last heard 3\ds ago",
        reason,
    ), reason
    human = tsbot("status", cwd=workdir).stdout.splitlines()
    assert human[0].startswith("CRITICAL: 2 open positions and no engine protecting them: "), human

    # Its lease gone with a database session while it lives on this host (an outage: it takes the lease
    # again within seconds): no alarm in that window (a reviewer).
    script = workdir / "tsbot"
    script.write_text("import time\ntime.sleep(60)\n")
    alive = await asyncio.create_subprocess_exec(sys.executable, str(script), "run")
    try:
        await engine_side.execute(
            "UPDATE monitoring.engine_leases SET pid = $1, heartbeat_at = now()", alive.pid
        )
        living = tsbot("status", "--json", cwd=workdir)
        assert living.returncode == 3, living.stdout + living.stderr
        # Alive but not heard for 31 s (frozen, its lease gone meanwhile): no longer on its way back.
        await engine_side.execute(
            "UPDATE monitoring.engine_leases SET heartbeat_at = now() - interval '31 seconds'"
        )
        frozen = tsbot("status", "--json", cwd=workdir)
        assert frozen.returncode == 2, frozen.stdout + frozen.stderr
        assert "lives but lost its lease and has not been heard for 3" in json.loads(frozen.stdout)["reason"]
    finally:
        alive.kill()
        await alive.wait()
    gone = tsbot("status", "--json", cwd=workdir)
    assert gone.returncode == 2, gone.stdout + gone.stderr
    await engine_side.execute("UPDATE monitoring.engine_leases SET pid = $1", os.getpid())

    # Ended in its start (a start that failed, or killed then): still nobody watching, against the plan.
    await engine_side.execute("UPDATE monitoring.engine_leases SET phase = 'starting'")
    starting = json.loads(tsbot("status", "--json", cwd=workdir).stdout)
    assert starting["state"] == "critical"
    assert "ended while starting" in starting["reason"], starting["reason"]

    # Stopped on purpose: the stop wrote `stopping`, and the exit line told the operator what it left.
    await engine_side.execute("UPDATE monitoring.engine_leases SET phase = 'stopping'")
    stopped = tsbot("status", "--json", cwd=workdir)
    assert stopped.returncode == 3, stopped.stdout + stopped.stderr
    assert (
        json.loads(stopped.stdout)["reason"] == "no engine is measuring: none holds the account sim:default"
    )

    # No open position: nothing to alarm on, whoever left.
    await engine_side.execute("UPDATE monitoring.engine_leases SET phase = 'running'")
    await engine_side.execute("UPDATE monitoring.positions SET status = 'closed', closed_at = now()")
    flat = tsbot("status", "--json", cwd=workdir)
    assert flat.returncode == 3, flat.stdout + flat.stderr


async def test_status_lists_only_the_configured_accounts_positions(
    workdir: Path, pg_server: EmbeddedPostgres, engine_side: EngineSide
) -> None:
    binance_env = {
        "TSBOT_VENUE__KIND": "binanceusdm",
        "TSBOT_VENUE__API_KEY": "status-test-key-1",
        "TSBOT_VENUE__API_SECRET": "status-test-secret-1",
    }
    binance = account_key(load_config(None, environ=binance_env, cwd=workdir).settings.venue)
    assert binance.startswith("binanceusdm-testnet:")
    for account, symbol in (("sim:default", "SIMUSDT"), (binance, "BINUSDT"), ("sim:other", "OTHUSDT")):
        await engine_side.execute(
            "INSERT INTO monitoring.positions (account, symbol, exchange, side, quantity, entry_price, status, "
            "has_stop_loss, has_trailing_stop, opened_at) "
            "VALUES ($1, $2, 'x', 'long', 1, 2, 'active', false, false, now() - interval '1 minute')",
            account,
            symbol,
        )
    on_binance = json.loads(tsbot("status", "--json", cwd=workdir, **binance_env).stdout)
    assert on_binance["account"] == binance
    assert [p["symbol"] for p in on_binance["uncovered"]] == ["BINUSDT"]
    assert on_binance["active"] == 1

    on_sim = tsbot("status", cwd=workdir)
    assert "SIMUSDT" in on_sim.stdout
    assert "BINUSDT" not in on_sim.stdout
    assert "OTHUSDT" not in on_sim.stdout
    assert "active positions:   1" in on_sim.stdout


# --- the database away ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """An embedded PostgreSQL of this module's own: it is frozen and stopped here, never the session's."""
    server = start_owned(tmp_path_factory.mktemp("status-pg") / "pgdata")
    yield server
    stop_embedded(server.data_dir)


async def test_a_frozen_database_is_unknown_in_seconds_not_a_hang(
    own_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    name = await create_migrated_database(own_server)
    (tmp_path / "config.toml").write_text(
        f'[database]\ndata_dir = "{own_server.data_dir}"\nname = "{name}"\n'
    )
    dsn = f"postgresql://postgres@/{name}?host={own_server.socket_dir}"
    (tmp_path / "dsn.toml").write_text(f'[database]\ndsn = "{dsn}"\n')

    pid = stop_postmaster(own_server.data_dir)  # SIGSTOP: alive, answers nothing
    try:
        for args in (("status",), ("status", "--config", "dsn.toml")):
            frozen = tsbot(*args, cwd=tmp_path)
            assert frozen.returncode == 3, frozen.stdout + frozen.stderr
            assert frozen.stdout == (
                f"UNKNOWN: database postgresql://postgres@/{name}?host={own_server.socket_dir}: "
                "cannot connect: no answer within 3 s\n"
            )
            assert frozen.stderr == ""
        as_json = tsbot("status", "--json", cwd=tmp_path)
        assert as_json.returncode == 3
        report = json.loads(as_json.stdout)
        assert report["state"] == "unknown"
        assert report["reason"].endswith("cannot connect: no answer within 3 s")
    finally:
        resume(pid)

    # Thawed, it answers again: readable, and still unknown (no engine measures this account).
    thawed = tsbot("status", "--json", cwd=tmp_path)
    assert thawed.returncode == 3, thawed.stderr
    assert json.loads(thawed.stdout)["reason"].startswith("no engine is measuring")


async def test_a_stopped_database_is_unknown_with_one_line_naming_it(
    own_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    """Runs last in this module: it stops the module's server."""
    name = await create_migrated_database(own_server)
    dsn = f"postgresql://postgres@/{name}?host={own_server.socket_dir}"
    (tmp_path / "config.toml").write_text(
        f'[database]\ndata_dir = "{own_server.data_dir}"\nname = "{name}"\n'
    )
    (tmp_path / "dsn.toml").write_text(f'[database]\ndsn = "{dsn}"\n')
    stop_embedded(own_server.data_dir)

    embedded = tsbot("status", cwd=tmp_path)
    assert embedded.returncode == 3, embedded.stdout + embedded.stderr
    assert embedded.stdout.startswith(
        f"UNKNOWN: database: no embedded PostgreSQL is running in {own_server.data_dir} "
    )
    assert embedded.stdout.count("\n") == 1
    assert embedded.stderr == ""

    external = tsbot("status", "--config", "dsn.toml", cwd=tmp_path)
    assert external.returncode == 3, external.stdout + external.stderr
    assert external.stdout.startswith(f"UNKNOWN: database {dsn}: cannot connect: ")
    assert external.stdout.count("\n") == 1
    assert external.stderr == ""
    assert "Traceback" not in external.stdout + external.stderr

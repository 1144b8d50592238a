"""`tsbot run` as operators run it, on the embedded PostgreSQL it starts itself, whose postmaster is
SIGKILLed under it (the OOM killer, an operator's `kill -9`). Before: nothing restarted it, the lease was
lost for good, `tsbot status` said "not running" while the engine traded, and the log filled with
tracebacks. Now the engine starts the server again, takes the lease again, trades on with every position
protected, and says so in a few lines."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from engine import cli
from storage.embedded import TSBOT_COMMANDS, PostmasterState, _tsbot_command, postmaster_state
from tests.support.owned_postgres import freeze_server, kill_postmaster, resume, stop_postmaster
from tests.support.waiting import wait_until

TSBOT = str(Path(sys.executable).with_name("tsbot"))


@pytest.fixture
def workdir(tmp_path: Path, project_root: Path) -> Path:
    """The shipped config.toml with an embedded server of this test's own (the engine starts it and owns
    it), waves every 2 s, and a short probe timeout."""
    text = (project_root / "config.toml").read_text()
    text = text.replace('data_dir = ""', f'data_dir = "{tmp_path / "pgdata"}"', 1)
    text = text.replace("wave_interval_seconds = 20", "wave_interval_seconds = 2", 1)
    text = text.replace("probe_timeout_seconds = 3", "probe_timeout_seconds = 1", 1)
    (tmp_path / "config.toml").write_text(text)
    yield tmp_path
    # A run that failed half-way must not leave a server behind.
    state, pid = postmaster_state(tmp_path / "pgdata")
    if state is PostmasterState.RUNNING and pid is not None:
        os.kill(pid, signal.SIGINT)  # fast shutdown
        deadline = time.monotonic() + 30
        while (
            postmaster_state(tmp_path / "pgdata")[0] is PostmasterState.RUNNING
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TSBOT_")}


def _start_run(workdir: Path) -> subprocess.Popen[str]:
    return _start(workdir, {}, "run")


def _start(workdir: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [TSBOT, *args],
        cwd=workdir,
        env={**_env(), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _dsn(data_dir: Path) -> str:
    socket_dir = (data_dir / "postmaster.pid").read_text().splitlines()[4].strip()
    return f"postgresql://postgres@/tsbot?host={socket_dir}"


async def _fetch(data_dir: Path, query: str) -> list[asyncpg.Record] | None:
    try:
        conn = await asyncpg.connect(_dsn(data_dir), timeout=2)
    except (OSError, TimeoutError, IndexError, asyncpg.PostgresError):
        return None
    try:
        return await conn.fetch(query)
    except asyncpg.PostgresError:
        return None
    finally:
        conn.terminate()


ACTIVE = "SELECT id, has_stop_loss, has_trailing_stop FROM monitoring.positions WHERE status = 'active'"
IN_FLIGHT = (
    "SELECT id FROM monitoring.positions WHERE status IN ('pending_entry', 'entry_placed', 'pending_protection') "
    "OR (status = 'active' AND NOT (has_stop_loss AND has_trailing_stop))"
)


async def _protected(data_dir: Path, more_than: int) -> bool:
    """More than `more_than` active positions, all with both stops recorded, none being opened."""
    active, in_flight = await _fetch(data_dir, ACTIVE), await _fetch(data_dir, IN_FLIGHT)
    if active is None or in_flight is None:
        return False
    return (
        len(active) > more_than
        and all(r["has_stop_loss"] and r["has_trailing_stop"] for r in active)
        and not in_flight
    )


async def test_a_killed_postmaster_under_tsbot_run_is_started_again_and_the_engine_trades_on(
    workdir: Path,
) -> None:
    data_dir = workdir / "pgdata"
    engine = _start_run(workdir)
    try:
        await wait_until(lambda: _protected(data_dir, 6), within=60, what="the first wave protected")
        protected_before = len(await _fetch(data_dir, ACTIVE) or [])
        killed = await asyncio.to_thread(kill_postmaster, data_dir)

        def started_again() -> bool:
            state, pid = postmaster_state(data_dir)
            return state is PostmasterState.RUNNING and pid != killed

        await wait_until(started_again, within=30, what="the engine to start its server again")

        async def status_shows_the_engine() -> bool:
            result = await asyncio.to_thread(
                subprocess.run,
                [TSBOT, "status", "--json"],
                cwd=workdir,
                env=_env(),
                capture_output=True,
                text=True,
                timeout=60,
            )
            if result.returncode not in (0, 1, 2, 3) or not result.stdout.startswith("{"):
                return False
            holder = json.loads(result.stdout).get("engine")
            return holder is not None and holder["pid"] == engine.pid

        await wait_until(status_shows_the_engine, within=30, what="`tsbot status` to show the engine running")
        # Entries resumed: later waves open positions, and every one is protected.
        await wait_until(
            lambda: _protected(data_dir, protected_before),
            within=30,
            what="positions opened after the restart",
        )
        assert engine.poll() is None  # it never stopped
    finally:
        if engine.poll() is None:
            engine.send_signal(signal.SIGTERM)
        try:
            out, err = await asyncio.to_thread(engine.communicate, timeout=60)
        except subprocess.TimeoutExpired:
            engine.kill()
            out, err = engine.communicate()
    assert engine.returncode == 0, err
    stopped = next(line for line in out.splitlines() if line.startswith("stopped:"))
    assert stopped.endswith("uncovered 0"), stopped

    log = (workdir / "logs" / "trading_bot.log").read_text()
    assert "Traceback" not in log
    assert log.count("database unreachable (") == 1
    assert log.count("embedded PostgreSQL restarted") == 1
    assert log.count("database back after") == 1
    assert not list((workdir / "logs").glob("tsbot-journal-*"))
    lines = log.splitlines()
    start = next(i for i, line in enumerate(lines) if "database unreachable (" in line)
    end = next(i for i, line in enumerate(lines) if "database back after" in line)
    loud = [line for line in lines[start : end + 1] if " - INFO - " not in line and " - DEBUG - " not in line]
    assert len(loud) <= 10, "\n".join(loud)
    # The server it started again is still its own: it stops with the engine, as the first one would have.
    assert postmaster_state(data_dir)[0] is PostmasterState.DEAD
    print(
        f"\ntsbot run: {len(loud)} lines at WARNING or above from the outage to its end:\n  "
        + "\n  ".join(loud)
    )


async def test_the_next_tsbot_command_starts_a_killed_embedded_server_again(workdir: Path) -> None:
    """No engine was left to restart it (it died too): the postmaster's pid stays a zombie in a container
    whose init does not reap, which pgserver and PostgreSQL both took for a live server, so every later
    command failed with "cannot connect". The next command starts it again."""
    data_dir = workdir / "pgdata"
    await asyncio.to_thread(_start_and_abandon, data_dir)
    killed = await asyncio.to_thread(kill_postmaster, data_dir)

    # (`tsbot status` only looks: it says the server is down, and leaves starting it to the commands that
    # need it.)
    status = await asyncio.to_thread(_tsbot, workdir, "status")
    assert status.returncode == 3, status.stderr
    assert status.stdout.startswith("UNKNOWN: database: no embedded PostgreSQL is running in ")
    migrate = await asyncio.to_thread(_tsbot, workdir, "db", "migrate")
    assert migrate.returncode == 0, migrate.stderr
    log = (workdir / "logs" / "trading_bot.log").read_text()
    assert f"embedded PostgreSQL started again: data {data_dir.resolve()}, pid " in log
    assert f"(pid {killed} had died)" in log
    # The abandoned starter never said it left; it is gone, so no user is left once migrate exits: the
    # server stops (it used to count the dead starter as a user for good, and ran on with nobody).
    state, _ = postmaster_state(data_dir)
    assert state is PostmasterState.DEAD


@pytest.mark.parametrize(
    ("script", "args", "said"),
    [
        ("tsbot", ["db", "psql"], "(tsbot db) still uses it (no engine among them: `tsbot run` starts it)"),
        # (a reviewer: `--config` before the subcommand hid the engine, and the operator was told to start one)
        (
            "tsbot",
            ["--config", "p.toml", "run"],
            "(tsbot run) still uses it (an engine starts the server it uses again within seconds): ask again",
        ),
        # (a dashboard may only be watching another engine's account: no promise)
        (
            "tsbot-tui",
            ["--config", "p.toml"],
            "(tsbot-tui) still uses it (a dashboard running its engine starts it again within seconds, a "
            "watching one does not: ask again, or start `tsbot run`)",
        ),
    ],
    ids=["not-an-engine", "config-first", "dashboard"],
)
def test_status_on_an_embedded_server_down_under_its_users_names_them(
    workdir: Path, project_root: Path, script: str, args: list[str], said: str
) -> None:
    """An operator's drill: the postmaster killed under a running engine, then `tsbot status` before the
    engine had started it again. It said "no embedded PostgreSQL is running (an engine starts it: `tsbot
    run`)", beside the engine that was running. It names the tsbot processes still using the server now,
    and promises no restart where none of them is an engine; a listed pid that another program runs now (a
    reviewer: reused after a reboot) is none of them. (The user here is a script named `tsbot` that starts
    the server and stays: a real engine would start the server again before the look, and `tsbot db psql`
    ends with its psql when the server dies.)"""
    data_dir = workdir / "pgdata"
    program = workdir / "bin" / script
    program.parent.mkdir()
    program.write_text(_START_AND_STAY)
    user = subprocess.Popen(
        [sys.executable, str(program), *args],
        cwd=project_root,
        env={**_env(), "STAY_DATA_DIR": str(data_dir)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert user.stdout is not None
        assert user.stdout.readline() == "started\n"
        kill_postmaster(data_dir)
        status = _tsbot(workdir, "status")
    finally:
        user.kill()
        user.wait()
    assert status.returncode == 3, status.stderr
    assert status.stdout == (
        f"UNKNOWN: database: the embedded PostgreSQL in {data_dir.resolve()} is down while pid {user.pid} {said}\n"
    ), status.stdout

    other = subprocess.Popen(["sleep", "60"])
    try:
        (data_dir / ".handle_pids.json").write_text(json.dumps([other.pid]))
        reused = _tsbot(workdir, "status")
    finally:
        other.kill()
        other.wait()
    assert reused.stdout.startswith("UNKNOWN: database: no embedded PostgreSQL is running in "), reused.stdout


# Starts the embedded server, says so, and stays (a user of it) until its stdin closes or it is killed.
_START_AND_STAY = (
    "import os, sys\nfrom pathlib import Path\nsys.path.insert(0, '.')\nfrom storage.embedded import start_embedded\n"
    "start_embedded(Path(os.environ['STAY_DATA_DIR']))\nprint('started', flush=True)\nsys.stdin.read()\n"
)


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["/v/bin/python3", "/v/bin/tsbot", "run"], "tsbot run"),
        (["/v/bin/tsbot", "--config", "/srv/tsbot-prod.toml", "run"], "tsbot run"),
        (["/v/bin/tsbot", "--conf", "prod.toml", "run"], "tsbot run"),  # argparse takes abbreviations
        (["/v/bin/tsbot", "--config=prod.toml", "status"], "tsbot status"),
        (["python3", "-X", "dev", "-I", "/v/bin/tsbot", "run"], "tsbot run"),
        (["python3", "-m", "engine.cli", "--config", "p.toml", "run"], "tsbot run"),
        (["/v/bin/tsbot-tui", "--conf", "live.toml"], "tsbot-tui"),  # no subcommands: nothing appended
        (["python3", "-mengine.cli", "run"], "tsbot run"),
        (["python3", "-um", "engine.cli", "run"], "tsbot run"),
        (["python3", "--check-hash-based-pycs", "always", "/v/bin/tsbot", "run"], "tsbot run"),
        (["/v/bin/tsbot", "mysecret"], "tsbot"),  # only tsbot's own subcommands are shown
        (["python3", "-c", "print()", "/v/bin/tsbot"], None),
        (["python3", "-m", "http.server"], None),
        (["sleep", "60"], None),
    ],
)
def test_a_processs_tsbot_command_is_read_past_options_and_shows_no_value(
    argv: list[str], command: str | None
) -> None:
    """What `tsbot status` calls a user of a down embedded server (reviewers: `tsbot --conf prod run` was
    "tsbot prod", no engine, its option's value shown; `python -X dev …/tsbot run` was no tsbot at all)."""
    assert _tsbot_command(argv) == command


def test_the_subcommands_status_may_show_are_tsbots() -> None:
    assert {command.split()[0] for command in cli._HANDLERS} == TSBOT_COMMANDS


async def test_a_command_after_an_engine_was_killed_leaves_its_server_running_for_status_to_read(
    workdir: Path,
) -> None:
    """A `tsbot run` killed with SIGKILL leaves its positions with nobody protecting them, and its embedded
    server running: `tsbot status` says CRITICAL. A `tsbot signals add` then joined that server and, as its
    last user (the dead engine forgotten), stopped it: status said "UNKNOWN: database: no embedded
    PostgreSQL is running", exit 3, while still nothing protected the positions (an operator). A command
    leaves a server it found running as it found it."""
    data_dir = workdir / "pgdata"
    engine = _start_run(workdir)
    try:
        await wait_until(lambda: _protected(data_dir, 0), within=60, what="a wave protected")
    finally:
        engine.kill()
        await asyncio.to_thread(engine.communicate, timeout=60)
    before = await asyncio.to_thread(_tsbot, workdir, "status")
    assert before.returncode == 2, before.stdout + before.stderr
    assert "ended without stopping" in before.stdout.splitlines()[0], before.stdout
    added = await asyncio.to_thread(_tsbot, workdir, "signals", "add", "SFPUSDT", "long")
    assert added.returncode == 0, added.stderr
    assert postmaster_state(data_dir)[0] is PostmasterState.RUNNING
    after = await asyncio.to_thread(_tsbot, workdir, "status")
    assert after.returncode == 2, after.stdout + after.stderr
    assert "ended without stopping" in after.stdout.splitlines()[0], after.stdout


def _start_and_abandon(data_dir: Path) -> None:
    """The embedded server in `data_dir` started by a process that then exits without saying it leaves."""
    starter = subprocess.run(
        [sys.executable, "-c", _START_AND_ABANDON, str(data_dir)], capture_output=True, text=True, timeout=60
    )
    assert starter.returncode == 0, starter.stderr


# Starts the embedded server and exits without saying so (SIGKILL-like: pgserver's exit hook never runs).
_START_AND_ABANDON = (
    "import os, sys; from pathlib import Path; from storage.embedded import start_embedded; "
    "start_embedded(Path(sys.argv[1])); os._exit(0)"
)


def _tsbot(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TSBOT, *args], cwd=workdir, env=_env(), capture_output=True, text=True, timeout=90)


async def test_a_command_on_an_embedded_server_that_does_not_answer_says_so_in_seconds(workdir: Path) -> None:
    """An operator's drill: the embedded postmaster frozen (SIGSTOP) under a running engine, then `tsbot
    flatten --all --yes`. The command joined the frozen server, waited a minute for a connection, then said
    "internal error (a bug, not your input): TimeoutError:", and, its last user, waited another minute at
    exit trying to stop it. It now says in one line, within the probe budget, that the server runs and does
    not answer, that nothing was sent (an operator could not tell whether the close went), and leaves the
    server as it is."""
    data_dir = workdir / "pgdata"
    await asyncio.to_thread(_start_and_abandon, data_dir)
    stopped = stop_postmaster(data_dir)
    try:
        began = time.monotonic()
        flatten = await asyncio.to_thread(_tsbot, workdir, "flatten", "--all", "--yes")
        took = time.monotonic() - began
    finally:
        resume(stopped)
    assert flatten.returncode == 1, flatten.stderr
    assert flatten.stderr == (
        f"tsbot: flatten: embedded PostgreSQL in {data_dir.resolve()} (pid {stopped}) is running but does not "
        "answer: no answer within 3 s; nothing was sent to the engine\n"
    )
    assert took < 60  # (a bound for a loaded machine; it used to take two minutes)
    assert postmaster_state(data_dir) == (PostmasterState.RUNNING, stopped)  # left as it was


async def test_a_flatten_whose_answer_the_database_took_away_says_it_may_still_be_carried_out(
    workdir: Path,
) -> None:
    """An operator's drill: `tsbot flatten --all --yes`, the database frozen a moment later. The command
    said "internal error (a bug, not your input): ConnectionRefusedError", exit 1, and 26 s later, the
    database back, the engine closed the whole book: an operator told it failed would retry or hedge by
    hand. It says the command was recorded and may still be carried out, and until when."""
    data_dir = workdir / "pgdata"
    engine = _start_run(workdir)
    frozen: list[int] = []
    try:
        await wait_until(lambda: _protected(data_dir, 0), within=60, what="positions protected")
        engine.send_signal(signal.SIGSTOP)  # (it takes commands at once: held until the database is frozen)
        flatten = _start_flatten(workdir)

        async def recorded() -> bool:
            return bool(await _fetch(data_dir, "SELECT id FROM monitoring.commands"))

        await wait_until(recorded, within=30, what="the command recorded")
        frozen = freeze_server(data_dir)
        out, err = await asyncio.to_thread(flatten.communicate, timeout=90)
    finally:
        for pid in frozen:
            resume(pid)
        engine.send_signal(signal.SIGCONT)
        engine.send_signal(signal.SIGTERM)
        await asyncio.to_thread(engine.communicate, timeout=90)
    assert flatten.returncode == 1, out + err
    assert "internal error" not in err
    assert "flatten: no answer: command #1 was recorded, then the database stopped answering (" in err, err
    assert "the engine may have taken it already, or may still take it until " in err, err
    assert len(err.strip().splitlines()) == 1, err  # (one line: no warning repeating it)


def _start_flatten(workdir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [TSBOT, "flatten", "--all", "--yes", "--wait-seconds", "60"],
        cwd=workdir,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_a_start_stopped_on_a_frozen_server_exits_at_once_and_leaves_the_server_as_it_is(
    workdir: Path,
) -> None:
    """An operator's drill: the whole embedded server frozen under a start, which gives up. The process
    said its line and then waited for the server to thaw before exiting: the lease's and the pool's
    goodbyes waited their bounds, and the embedded server's stop at exit as long as the freeze lasted.
    Staged here with a start waiting out the Bybit emulator's 403 ban, the server then frozen, then SIGTERM:
    it exits within seconds, and the frozen server is left as it is (its next user deals with it)."""
    keys = {"TSBOT_VENUE__API_KEY": "key", "TSBOT_VENUE__API_SECRET": "secret"}
    emulator = _start(
        workdir,
        keys,
        "sim-exchange",
        "--venue",
        "bybit",
        "--port",
        "0",
        "--faults",
        "market/instruments-info=ban",
    )
    frozen: list[int] = []
    try:
        assert emulator.stdout is not None
        url = emulator.stdout.readline().split(" on ", 1)[1].split(" ", 1)[0]
        engine = _start(workdir, {**keys, "TSBOT_VENUE__KIND": "bybit", "TSBOT_VENUE__BASE_URL": url}, "run")
        try:
            log = workdir / "logs" / "trading_bot.log"
            await wait_until(
                lambda: log.exists() and "the venue refuses us until" in log.read_text(),
                within=60,
                what="the start waiting out the ban",
            )
            frozen = freeze_server(workdir / "pgdata")
            began = time.monotonic()
            engine.send_signal(signal.SIGTERM)
            try:
                out, err = await asyncio.to_thread(engine.communicate, timeout=60)
            except subprocess.TimeoutExpired:
                pytest.fail("still running 60 s after SIGTERM, the server frozen")
            took = time.monotonic() - began
        finally:
            if engine.poll() is None:
                engine.kill()
                engine.wait()
        assert engine.returncode == 1, (out, err)
        assert (
            "SIGTERM received during the start-up, while it waited for the venue (" in err.splitlines()[-1]
        ), err
        assert "Traceback" not in out + err
        assert took < 15, f"{took:.1f}s"  # (the probe's 1 s, not the goodbyes' and the stop's waits)
        assert postmaster_state(workdir / "pgdata") == (PostmasterState.RUNNING, frozen[0])  # left as it is
    finally:
        for pid in frozen:
            resume(pid)
        emulator.send_signal(signal.SIGTERM)
        emulator.communicate(timeout=30)

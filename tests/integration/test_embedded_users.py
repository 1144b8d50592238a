"""The embedded PostgreSQL stops when the last tsbot process using it exits (README): pgserver counts its
users in the data directory's `.handle_pids.json`, and the last one to leave stops the server. A process
killed with SIGKILL never leaves: its pid stayed listed for good, so after one killed engine the server ran on
after every later user had exited cleanly, for ever. Real processes, a real server in a fresh directory."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from storage.embedded import PostmasterState, _failure_words, postmaster_state
from tests.integration.test_cli_run import TSBOT, _env

ROOT = Path(__file__).resolve().parents[2]

# A user of the server in `argv[1]`: it joins, then exits ("exit"), is killed ("kill"), or stops the server
# whoever else uses it ("stop": whoever owns the directory's lifetime, here the test, whatever happened).
USE_AND = """
import logging, os, signal, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO)  # (what it says of the server, to stderr)
from storage.embedded import start_embedded, stop_embedded
start_embedded(Path(sys.argv[1]))
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[2] == "stop":
    stop_embedded(Path(sys.argv[1]))
"""


def _user(data_dir: Path, end: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", USE_AND, str(data_dir), end],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def _no_server_left(data_dir: Path) -> None:
    if postmaster_state(data_dir)[0] is PostmasterState.RUNNING:
        _user(data_dir, "stop")


def _stopped_within(data_dir: Path, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if postmaster_state(data_dir)[0] is PostmasterState.DEAD:
            return True
        time.sleep(0.1)
    return False


def test_a_killed_users_pid_does_not_keep_the_server_running_after_the_last_user_leaves(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "pgdata"
    killed = _user(data_dir, "kill")
    assert killed.returncode == -9, killed.stderr
    state, pid = postmaster_state(data_dir)
    assert state is PostmasterState.RUNNING  # the killed user never left: the server runs on, as it should
    assert pid is not None
    try:
        listed = json.loads((data_dir / ".handle_pids.json").read_text())
        assert len(listed) == 1
        left = _user(data_dir, "exit")
        assert left.returncode == 0, left.stderr
        assert _stopped_within(data_dir, 15.0), (
            f"the server still runs after its last user left; users listed: "
            f"{(data_dir / '.handle_pids.json').read_text()}"
        )
        assert json.loads((data_dir / ".handle_pids.json").read_text()) == []
    finally:
        _no_server_left(data_dir)


def test_a_killed_user_left_a_zombie_does_not_keep_the_server_running(tmp_path: Path) -> None:
    """The killed user's parent never reaped it (a container whose init does not, or this test): its pid
    still exists, as a zombie, and counted as a user it kept the server running after the last one left."""
    data_dir = tmp_path / "pgdata"
    killed = subprocess.Popen([sys.executable, "-c", USE_AND, str(data_dir), "kill"], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and psutil.Process(killed.pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.1)
        assert psutil.Process(killed.pid).status() == psutil.STATUS_ZOMBIE  # not reaped: still exists
        left = _user(data_dir, "exit")
        assert left.returncode == 0, left.stderr
        assert _stopped_within(data_dir, 15.0), "the server still runs after its last live user left"
    finally:
        killed.wait()
        _no_server_left(data_dir)


def test_a_failed_server_program_is_said_by_its_name_and_status_not_its_command_tuple() -> None:
    """An operator's `tsbot close`, while the server could not start again, printed the command tuple
    pgserver had run (every option of pg_ctl). Said now as the program's name and its exit status."""
    with pytest.raises(subprocess.CalledProcessError) as failed:
        subprocess.run(["/bin/sh", "-c", "exit 3"], check=True)
    assert _failure_words(failed.value) == "sh exited with status 3"
    assert _failure_words(OSError("disk full")) == "OSError: disk full"


def test_a_stale_pid_file_naming_another_server_neither_joins_nor_kills_it(tmp_path: Path) -> None:
    """After a crash and a reboot, `postmaster.pid` of a stopped data directory can name a pid that is now
    another installation's live postmaster (r80). Taken for this directory's server, it was joined (its
    socket: "FileNotFoundError" at connect), and at exit pgserver's clean-up stopped it, then killed it:
    another installation's database gone. A postmaster runs in its data directory: one that does not is
    not this directory's, and the pid file is stale."""
    other, ours = tmp_path / "other", tmp_path / "ours"
    assert _user(other, "kill").returncode == -9  # a server left running, as another installation's
    try:
        state, other_pid = postmaster_state(other)
        assert state is PostmasterState.RUNNING
        assert other_pid is not None
        assert _user(ours, "exit").returncode == 0  # ours: made, then stopped by its last user
        assert _stopped_within(ours, 15.0)
        (ours / "postmaster.pid").write_text((other / "postmaster.pid").read_text())  # the stale file
        assert postmaster_state(ours) == (PostmasterState.DEAD, other_pid)

        used = _user(ours, "exit")
        assert used.returncode == 0, used.stderr
        assert f"(pid {other_pid} its postmaster.pid named another server's)" in used.stderr, used.stderr
        assert psutil.pid_exists(other_pid)
        assert postmaster_state(other) == (PostmasterState.RUNNING, other_pid)  # untouched, still serving
        assert _stopped_within(ours, 15.0)  # ours started, served, and stopped with its last user
    finally:
        _no_server_left(other)
        _no_server_left(ours)


def test_a_command_leaving_a_running_server_running_does_not_say_it_does_not_answer(tmp_path: Path) -> None:
    """A command (`tsbot entries`, `close`, `signals add` …) on an embedded server an engine started leaves it
    running at its exit, and said so in the engine's log as "left embedded PostgreSQL in … running (it does
    not answer)" while it answered in a millisecond (opme48): false evidence of a hung database for whoever
    greps the log in an incident."""
    data_dir = tmp_path / "pgdata"
    assert _user(data_dir, "kill").returncode == -9  # a server left running by its engine
    log = tmp_path / "trading_bot.log"
    try:
        env = {
            **_env(),
            "TSBOT_DATABASE__DATA_DIR": str(data_dir),
            "TSBOT_LOGGING__FILE": str(log),
        }
        added = subprocess.run(
            [TSBOT, "signals", "add", "SFPUSDT", "long"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env=env,
        )
        assert added.returncode == 0, added.stderr
        assert postmaster_state(data_dir)[0] is PostmasterState.RUNNING  # left running, as it should
        said = log.read_text()
        assert "left embedded PostgreSQL" in said, said
        assert "does not answer" not in said, said
    finally:
        _no_server_left(data_dir)


def test_a_restart_after_a_crash_waits_out_a_recovery_longer_than_pg_ctls_ten_seconds(tmp_path: Path) -> None:
    """A server killed with SIGKILL recovers when started again. pgserver gives `pg_ctl -w` 10 s; a recovery
    that took longer (a loaded machine) was called a failed start while the server went on recovering, and
    the restart tried again over it ("lock file already exists"). It is waited for now, and joined.

    Staged with a recovery that waits 13 s once: an archive recovery whose first `restore_command` sleeps
    (run in the data directory; every fetch then fails, and the server ends recovery on its own WAL)."""
    data_dir = tmp_path / "pg"
    assert _user(data_dir, "kill").returncode == -9  # a server left running by a killed user
    try:
        state, pid = postmaster_state(data_dir)
        assert state is PostmasterState.RUNNING
        assert pid is not None
        psutil.Process(pid).kill()  # the crash
        assert _stopped_within(data_dir, 15.0)
        (data_dir / "recovery.signal").write_text("")
        with (data_dir / "postgresql.auto.conf").open("a") as conf:
            conf.write("\nhot_standby = off\n")  # (not ready until its recovery ends)
            conf.write("restore_command = 'test -f slow_once || { touch slow_once; sleep 13; }; exit 1'\n")

        started = time.monotonic()
        used = _user(data_dir, "exit")
        took = time.monotonic() - started
        assert used.returncode == 0, used.stderr[-2000:]
        assert "still starting after 10 s" in used.stderr, used.stderr[-2000:]
        assert "started again" in used.stderr, used.stderr[-2000:]
        assert took > 10.0, took  # (the staging held it past pg_ctl's 10 s)
        assert (data_dir / "slow_once").exists()
        assert _stopped_within(data_dir, 15.0)  # served, then stopped by its last user
    finally:
        _no_server_left(data_dir)

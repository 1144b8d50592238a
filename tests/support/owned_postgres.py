"""An embedded PostgreSQL of a test's own, for making the database unreachable for real: its postmaster is
SIGKILLed or SIGSTOPped (never the session's shared server)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import asyncpg

from storage.embedded import EmbeddedPostgres, PostmasterState, postmaster_state, start_embedded
from storage.migrator import apply_migrations

# What the tests' servers need not do: reach the disk before a commit returns (the kernel has it; a killed
# postmaster, which tests do, loses nothing so). Without it, a killed server's restart first synced its whole
# data directory (10 s on a loaded machine, past `pg_ctl`'s patience), and every commit waited for the disk.
QUICK_DISK = ("fsync", "full_page_writes")


def start_owned(data_dir: Path) -> EmbeddedPostgres:
    """A tests' embedded server in `data_dir` (the session's, or a module's own), started, with `QUICK_DISK`
    off."""
    server = start_embedded(data_dir)
    with (server.data_dir / "postgresql.conf").open("a") as conf:
        conf.writelines(f"{setting} = off\n" for setting in QUICK_DISK)
    os.kill(server.pid, signal.SIGHUP)  # (both take effect on a reload)
    return server


async def create_migrated_database(server: EmbeddedPostgres) -> str:
    name = f"own_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server.dsn("postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(server.dsn(name))
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()
    return name


def postmaster_pid(data_dir: Path) -> int:
    state, pid = postmaster_state(data_dir)
    assert state is PostmasterState.RUNNING, state
    assert pid is not None
    return pid


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                # The fields after the command (which may hold spaces) start with the state, then the ppid.
                if int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == pid:
                    children.append(int(entry.name))
    return children


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def kill_postmaster(data_dir: Path) -> int:
    """SIGKILL the postmaster, as the OOM killer or an operator would; returns its pid once it is dead and
    its backends have noticed and ended. Until then a backend still answers the connection it serves (on a
    loaded machine a test's first writes went through to the "dead" server)."""
    pid = postmaster_pid(data_dir)
    backends = _children(pid)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    # The killed one, not whichever runs: an engine that owns the server may have started a new one already
    # (then a new postmaster runs, and this waited for it to die until its deadline).
    while postmaster_state(data_dir) == (PostmasterState.RUNNING, pid) or any(map(_running, backends)):
        assert time.monotonic() < deadline, "the killed postmaster or one of its backends is still running"
        time.sleep(0.01)
    return pid


def stop_postmaster(data_dir: Path) -> int:
    """SIGSTOP the postmaster: alive, but it answers no new connection (its existing backends still do)."""
    pid = postmaster_pid(data_dir)
    os.kill(pid, signal.SIGSTOP)
    return pid


def freeze_server(data_dir: Path) -> list[int]:
    """SIGSTOP the postmaster and every backend, as an operator's drill (or a frozen host) does: nothing
    answers, every connection stays open. The pids stopped, to `resume` each."""
    import psutil

    postmaster = postmaster_pid(data_dir)
    frozen = [postmaster, *(p.pid for p in psutil.Process(postmaster).children())]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    return frozen


def resume(pid: int) -> None:
    """SIGCONT a stopped postmaster, if it is still there (the engine may have replaced it)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


class StaleSocketLock:
    """A lock file on the server's socket that names a live process other than a postmaster, as one left
    by a crashed server whose pid was reused: PostgreSQL refuses to start until it is gone. The process
    runs as the server's user (PostgreSQL ignores a pid it may not signal: it cannot be a rival server)."""

    def __init__(self, server: EmbeddedPostgres):
        port = (server.data_dir / "postmaster.pid").read_text().splitlines()[3].strip()
        self.path = server.socket_dir / f".s.PGSQL.{port}.lock"
        self._owner = server.data_dir.stat().st_uid
        self._holder: subprocess.Popen[bytes] | None = None

    def hold(self) -> None:
        as_owner = {"user": self._owner} if self._owner != os.getuid() else {}
        self._holder = subprocess.Popen(["sleep", "300"], **as_owner)  # type: ignore[call-overload]
        self.path.write_text(f"{self._holder.pid}\n")

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self._holder is not None:
            self._holder.kill()
            self._holder.wait()
            self._holder = None

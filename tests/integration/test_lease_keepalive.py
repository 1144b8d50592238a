"""The account lease's session on a PostgreSQL reached over TCP: the server finds a vanished engine host.

An engine host that vanishes (power cut, network gone) sends nothing more; the server keeps its session, and
the lease's advisory lock, until TCP says the peer is gone: with the system's keepalive defaults that is more
than two hours (Linux: 7 200 s idle, then 9 probes 75 s apart), and no engine can take the account meanwhile.
The lease's session asks the server for keepalives after 10 s idle, 5 s apart, 3 of them: the server ends
the session about 25 s after the host vanished, and the lock with it.

Making a peer vanish on loopback needs privileges the tests do not have; what the test reads is the server's
own socket for the lease's session: its keepalive timer, in the kernel's table of TCP sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from storage.embedded import psql_executable
from storage.lease import LEASE_NAMESPACE, EngineLease
from storage.migrator import apply_migrations

PROC_NET_TCP = Path("/proc/net/tcp")
KEEPALIVE_TIMER = 2  # /proc/net/tcp's `tr` column: the keepalive timer is pending
TICKS_PER_SECOND = 100  # its `tm->when` is in clock ticks (USER_HZ)

pytestmark = pytest.mark.skipif(not PROC_NET_TCP.exists(), reason="reads Linux's /proc/net/tcp")


@pytest.fixture
def tcp_postgres(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A PostgreSQL of this test's own, listening on 127.0.0.1 only (the embedded one has no TCP port)."""
    data = tmp_path / "pgdata"
    data.mkdir()
    user = "pgserver" if os.geteuid() == 0 else None  # initdb and postgres refuse to run as root
    if user is not None:
        for path in (tmp_path, *tmp_path.parents):  # let the server's user reach its directory
            if path.stat().st_mode & 0o055 != 0o055:
                path.chmod(path.stat().st_mode | 0o055)
        shutil.chown(data, user)
    bin_dir = psql_executable().parent  # the embedded server's binaries
    subprocess.run(
        [bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust"],
        check=True,
        capture_output=True,
        user=user,
        timeout=120,
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [bin_dir / "postgres", "-D", data, "-k", data, "-c", "listen_addresses=127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        user=user,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres", port
    finally:
        server.terminate()
        server.wait(timeout=30)


@contextlib.asynccontextmanager
async def _connected(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test's server, once it accepts them."""
    for _ in range(300):
        try:
            conn = await asyncpg.connect(dsn, timeout=5)
        except (OSError, asyncpg.CannotConnectNowError):
            await asyncio.sleep(0.1)
            continue
        try:
            yield conn
        finally:
            await conn.close()
        return
    raise AssertionError(f"the test's PostgreSQL did not come up: {dsn}")


def _keepalive_due_seconds(server_port: int, client_port: int) -> float | None:
    """When the server's socket of that connection sends its next keepalive probe (None: no such timer)."""
    for line in PROC_NET_TCP.read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, timer = fields[1], fields[2], fields[5]
        if local.endswith(f":{server_port:04X}") and remote.endswith(f":{client_port:04X}"):
            kind, when = timer.split(":")
            return int(when, 16) / TICKS_PER_SECOND if int(kind, 16) == KEEPALIVE_TIMER else None
    raise AssertionError(f"no socket from port {server_port} to {client_port} in {PROC_NET_TCP}")


async def test_the_leases_session_has_the_server_probe_a_silent_engine_host_within_seconds(
    tcp_postgres: tuple[str, int],
) -> None:
    dsn, port = tcp_postgres
    async with _connected(dsn) as admin:
        await apply_migrations(admin)
        lease = await EngineLease.acquire(dsn, "sim", "sim:default", "test")
        try:
            client_port = await admin.fetchval(
                "SELECT a.client_port FROM pg_locks AS l JOIN pg_stat_activity AS a USING (pid) "
                "WHERE l.locktype = 'advisory' AND l.classid = $1 AND l.granted",
                LEASE_NAMESPACE,
            )
            assert client_port is not None
            due: float | None = None
            for _ in range(50):  # the timer shows once the last answer's bytes are acknowledged
                due = _keepalive_due_seconds(port, client_port)
                if due is not None:
                    break
                await asyncio.sleep(0.1)
            # The system's default is 7 200 s idle before the first probe.
            assert due is not None
            assert due <= 10.0
        finally:
            await lease.release()

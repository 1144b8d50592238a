"""Is the code on disk still the code that runs? (F10: the fix sat on disk for hours, unused.)

A process fingerprints the source of the packages it runs when it starts (`running_code`); the dashboard
re-checks every few seconds, a headless engine every minute. A check costs one `stat` per file: a file's
content is hashed again only when its size or mtime moved, so touching a file without changing it does not
raise the banner, and editing it back does lower it. An engine records its fingerprint with its lease: a
process that only watches (`tsbot status`, a read-only dashboard) compares the engine's code, not its own,
with what is on disk.
"""

from __future__ import annotations

import hashlib
import socket
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

WATCHED_SUFFIXES = (".py", ".sql", ".tcss")


@dataclass(frozen=True, slots=True)
class CodeDifference:
    changed: tuple[str, ...]  # relative paths whose content differs, was added or was removed
    newest_change: float  # mtime (epoch seconds) of the newest changed file still on disk, 0 when none

    def describe(self, limit: int = 3) -> str:
        shown = ", ".join(self.changed[:limit])
        more = len(self.changed) - limit
        return shown + (f" and {more} more" if more > 0 else "")


def package_roots(package_names: Iterable[str] = ("engine", "protection", "storage", "tui")) -> list[Path]:
    """The directories the running packages were imported from."""
    import importlib

    roots = []
    for name in package_names:
        module = importlib.import_module(name)
        if module.__file__:
            roots.append(Path(module.__file__).resolve().parent)
    return roots


class SourceWatcher:
    """Compares the source under `roots` with what it was when the watcher was created.

    `only_loaded`: only the files this process runs count: a module's source once it is imported (a
    headless engine imports no dashboard module: a change to the dashboard's stylesheet told it to restart
    for nothing, r76), the migrations, and the dashboard's stylesheets once the dashboard runs. A file that
    cannot be read (another user's, owner-only) cannot be told: never a difference."""

    def __init__(
        self, roots: Sequence[Path], running: Mapping[str, str] | None = None, *, only_loaded: bool = False
    ):
        """`running`: the digests of the code that runs, when it is another process's (recorded with its
        lease: only those files are compared); by default what is on disk now."""
        self._roots = [Path(root) for root in roots]
        self._stats: dict[Path, tuple[int, int]] = {}
        self._hashes: dict[Path, str] = {}
        self._paths: dict[str, Path] = {}
        self._unreadable: set[str] = set()
        self._only_loaded = only_loaded
        self._recorded = running is not None
        self._running = dict(running) if running is not None else self._digests()

    @property
    def files(self) -> int:
        return len(self._running)

    @property
    def roots(self) -> list[str]:
        return [str(root) for root in self._roots]

    @property
    def running(self) -> dict[str, str]:
        """Each file's digest (by its path under its root's parent) in the code that runs: with
        `only_loaded`, those of the files this process runs now (what its lease records)."""
        scope = self._scope()
        return {name: digest for name, digest in self._running.items() if scope is None or name in scope}

    def check(self) -> CodeDifference | None:
        """None while the source is what was running; otherwise what differs."""
        current = self._digests()
        names = set(self._running) if self._recorded else set(current) | set(self._running)
        scope = self._scope()
        changed = sorted(
            name
            for name in names
            if name not in self._unreadable
            and (scope is None or name in scope)
            and current.get(name) != self._running.get(name)
        )
        if not changed:
            return None
        newest = 0.0
        for name in changed:
            path = self._paths.get(name)
            if path is not None and path.exists():
                newest = max(newest, path.stat().st_mtime)
        return CodeDifference(tuple(changed), newest)

    def _scope(self) -> set[str] | None:
        """The files that count (None: all of them)."""
        if not self._only_loaded:
            return None
        loaded = {
            Path(file).resolve()
            for module in list(sys.modules.values())
            if isinstance(file := getattr(module, "__file__", None), str)
        }
        dashboard = "tui.app" in sys.modules
        return {
            name
            for name, path in self._paths.items()
            if path.suffix == ".sql" or (path.suffix == ".tcss" and dashboard) or path.resolve() in loaded
        }

    def _digests(self) -> dict[str, str]:
        digests: dict[str, str] = {}
        seen: set[Path] = set()
        unreadable: set[str] = set()
        for root in self._roots:
            if not root.is_dir():
                continue
            for path in root.rglob("*"):
                if path.suffix not in WATCHED_SUFFIXES or "__pycache__" in path.parts:
                    continue
                name = str(path.relative_to(root.parent))
                try:
                    info = path.stat()
                except OSError:
                    continue  # removed while walking: absent from this round
                seen.add(path)
                self._paths[name] = path
                stat_key = (info.st_size, info.st_mtime_ns)
                if self._stats.get(path) != stat_key or path not in self._hashes:
                    try:
                        self._hashes[path] = hashlib.sha256(path.read_bytes()).hexdigest()
                    except OSError:
                        unreadable.add(name)  # (cannot be told: not counted changed)
                        continue
                    self._stats[path] = stat_key
                digests[name] = self._hashes[path]
        for gone in set(self._hashes) - seen:
            self._hashes.pop(gone, None)
            self._stats.pop(gone, None)
        self._unreadable = unreadable
        return digests


_RUNNING: SourceWatcher | None = None


def running_code() -> SourceWatcher:
    """The fingerprint of the code this process runs, taken at the first call (the CLI's entry points make
    it as they start, before any work): every engine of the process records it, and checks against it."""
    global _RUNNING
    if _RUNNING is None:
        _RUNNING = SourceWatcher(package_roots(), only_loaded=True)
    return _RUNNING


def recorded_code_behind(
    host: str, roots: Sequence[str] | None, running: Mapping[str, str] | None
) -> CodeDifference | None:
    """What differs between the code another process of this host runs (its `roots` and `running` digests,
    recorded with its lease) and what is on disk now. None when nothing does, or when it cannot be told:
    not recorded (an older version's lease), another host's, or its roots gone from this one."""
    if not roots or running is None or host != socket.gethostname():
        return None
    paths = [Path(root) for root in roots]
    if not all(path.is_dir() for path in paths):
        return None
    return SourceWatcher(paths, running=running).check()

"""Is the code on disk still the code that runs? (F10: the fix sat on disk for hours, unused.)

At start the dashboard fingerprints the source of the packages it runs; a worker re-checks every few
seconds. A check costs one `stat` per file: a file's content is hashed again only when its size or mtime
moved, so touching a file without changing it does not raise the banner, and editing it back does lower it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
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
    """Compares the source under `roots` with what it was when the watcher was created."""

    def __init__(self, roots: Sequence[Path]):
        self._roots = [Path(root) for root in roots]
        self._stats: dict[Path, tuple[int, int]] = {}
        self._hashes: dict[Path, str] = {}
        self._running = self._digests()

    @property
    def files(self) -> int:
        return len(self._running)

    def check(self) -> CodeDifference | None:
        """None while the source is what was running; otherwise what differs."""
        current = self._digests()
        changed = sorted(
            name for name in set(current) | set(self._running) if current.get(name) != self._running.get(name)
        )
        if not changed:
            return None
        newest = 0.0
        for root in self._roots:
            for name in changed:
                path = root.parent / name
                if path.exists():
                    newest = max(newest, path.stat().st_mtime)
        return CodeDifference(tuple(changed), newest)

    def _digests(self) -> dict[str, str]:
        digests: dict[str, str] = {}
        seen: set[Path] = set()
        for root in self._roots:
            if not root.is_dir():
                continue
            for path in root.rglob("*"):
                if path.suffix not in WATCHED_SUFFIXES or "__pycache__" in path.parts:
                    continue
                try:
                    info = path.stat()
                except OSError:
                    continue  # removed while walking: absent from this round
                seen.add(path)
                stat_key = (info.st_size, info.st_mtime_ns)
                if self._stats.get(path) != stat_key or path not in self._hashes:
                    try:
                        self._hashes[path] = hashlib.sha256(path.read_bytes()).hexdigest()
                    except OSError:
                        continue
                    self._stats[path] = stat_key
                digests[str(path.relative_to(root.parent))] = self._hashes[path]
        for gone in set(self._hashes) - seen:
            self._hashes.pop(gone, None)
            self._stats.pop(gone, None)
        return digests

"""A local write-ahead journal for the protection path, for when PostgreSQL cannot be reached.

A guard records every protective order before it sends it. With the database away that record cannot be
written, and a guard that waits for it protects nothing (the incident of issue 10: a lost stop was not
replaced because its guard could not record the replacement). So a write the database cannot take is
appended here instead, and the caller proceeds only once it is on disk: one JSON object per line, written
whole by a single `write` and fsync'd (appends that arrive together share one fsync). When the database is
back `ResilientStore` replays the entries into it, in order, and removes the file. A process that dies with
entries here leaves them for the next start, which replays them before anything else.

One line: `{"seq": 7, "at": "2025-01-01T00:00:00.000001+00:00", "db": "4f2a9c", "op": "record_order",
"args": {...}}` — `db` is the database's installation token (entries are never replayed into another
database), `at` the wall-clock time of the write (replayed rows carry it, not the replay's time).

The file reveals trading activity: it is created owner-only (0600) and kept so. A crash can tear only the
last line (an append is one write of one whole line); a torn last line is ignored, and cut off before the
next append, because its writer never got past the append and so never acted on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FILE_MODE = 0o600
DIRECTORY_MODE = 0o700


def make_private_dirs(directory: Path) -> None:
    """Create `directory` and any missing parent, each owner-only (existing ones are left as they are)."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(mode=DIRECTORY_MODE)


def write_private(path: Path, data: bytes, *, append: bool = False) -> None:
    """Write `data` to `path`, owner-only from its creation (not made so after: it shows trading activity),
    and made owner-only again when it existed wider."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


class JournalError(RuntimeError):
    """The journal cannot be written (disk full, permissions): the write it carried did not happen."""


@dataclass(frozen=True, slots=True)
class JournalEntry:
    seq: int
    at: datetime
    database: str  # the installation token of the database the write is meant for
    op: str
    args: dict[str, Any]

    def line(self) -> bytes:
        record = {
            "seq": self.seq,
            "at": self.at.isoformat(),
            "db": self.database,
            "op": self.op,
            "args": self.args,
        }
        return (json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n").encode()

    @classmethod
    def parse(cls, line: bytes) -> JournalEntry:
        record = json.loads(line)
        at = datetime.fromisoformat(record["at"])
        if at.tzinfo is None:
            raise ValueError("entry time without a time zone")
        return cls(
            seq=int(record["seq"]),
            at=at,
            database=str(record["db"]),
            op=str(record["op"]),
            args=dict(record["args"]),
        )


@dataclass(slots=True)
class JournalContents:
    """What a journal file held: its entries in order, and what could not be read."""

    entries: list[JournalEntry] = field(default_factory=list)
    torn_tail: bool = False  # the last line was cut short by a crash mid-append: ignored
    unreadable_lines: list[int] = field(default_factory=list)  # 1-based; not the last line
    good_length: int = 0  # bytes up to the end of the last whole line


def read_journal(path: Path) -> JournalContents:
    """Parse a journal file (missing: empty). Never raises on content; see `JournalContents`."""
    contents = JournalContents()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return contents
    lines = data.split(b"\n")
    # A file ending in "\n" splits into its lines plus one empty string; anything else after the last
    # newline is a line whose append never finished.
    tail = lines.pop()
    if tail:
        contents.torn_tail = True
    offset = 0
    last = len(lines) - 1
    for number, line in enumerate(lines, start=1):
        try:
            contents.entries.append(JournalEntry.parse(line))
        except (ValueError, KeyError, TypeError):
            if number - 1 == last and not tail:
                # The last newline-terminated line itself is unparseable: as torn as a missing newline.
                contents.torn_tail = True
                break
            contents.unreadable_lines.append(number)
        offset += len(line) + 1
        contents.good_length = offset
    return contents


class WriteJournal:
    """The journal file and the entries appended to it since it was last cleared (kept in memory too)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._entries: list[JournalEntry] = []
        self._next_seq = 1
        self._written = 0  # highest seq handed to the OS
        self._synced = 0  # highest seq known to be on disk
        self._directory_synced = False
        self._sync_task: asyncio.Task[None] | None = None
        self.appended = 0  # entries appended by this process (figures)

    # --- reading -------------------------------------------------------------------------------------

    def load(self) -> JournalContents:
        """Read what an earlier process left (call once, before appending). A torn last line is cut off the
        file; unreadable lines in the middle are reported (the file is kept aside for inspection)."""
        contents = read_journal(self.path)
        if contents.unreadable_lines:
            aside = self.path.with_name(f"{self.path.name}.unreadable-{int(datetime.now(UTC).timestamp())}")
            write_private(aside, self.path.read_bytes())
            log.error(
                "journal %s: lines %s are unreadable and cannot be replayed; the file is kept as %s",
                self.path,
                ", ".join(map(str, contents.unreadable_lines)),
                aside,
            )
        if contents.torn_tail:
            os.truncate(self.path, contents.good_length)
            log.warning(
                "journal %s: its last line was cut short by a crash mid-append; ignored (its writer never "
                "acted on it)",
                self.path,
            )
        self._entries = list(contents.entries)
        if self._entries:
            self._next_seq = max(e.seq for e in self._entries) + 1
            self._written = self._synced = self._next_seq - 1
        return contents

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[JournalEntry]:
        return list(self._entries)

    def entry(self, index: int) -> JournalEntry:
        return self._entries[index]

    # --- writing -------------------------------------------------------------------------------------

    async def append(self, op: str, args: dict[str, Any], *, database: str, at: datetime) -> JournalEntry:
        """Append one write and return once it is on disk. The line is written before the first await, so
        entries are in the order of the calls. Raises `JournalError` when it cannot be written."""
        entry = JournalEntry(self._next_seq, at, database, op, args)
        line = entry.line()
        try:
            fd = self._open()
            size = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError:
                os.ftruncate(fd, size)  # never leave half a line for the next append to follow
                raise
        except OSError as exc:
            raise JournalError(f"journal {self.path}: cannot append ({exc.strerror or exc})") from exc
        self._next_seq += 1
        self._written = entry.seq
        self._entries.append(entry)
        self.appended += 1
        await self.wait_durable(entry.seq)
        return entry

    async def wait_durable(self, seq: int | None = None) -> None:
        """Until every entry up to `seq` (default: all written) is on disk; concurrent appends share one
        fsync."""
        target = self._written if seq is None else seq
        while self._synced < target:
            task = self._sync_task
            if task is None:
                task = self._sync_task = asyncio.create_task(self._sync(), name="journal-fsync")
            try:
                await asyncio.shield(task)
            except OSError as exc:
                raise JournalError(f"journal {self.path}: cannot sync ({exc.strerror or exc})") from exc

    async def _sync(self) -> None:
        try:
            target, fd = self._written, self._fd
            if fd is not None:
                sync_directory = not self._directory_synced
                await asyncio.to_thread(_fsync, fd, self.path.parent if sync_directory else None)
                self._directory_synced = True
            self._synced = max(self._synced, target)
        finally:
            self._sync_task = None

    def clear(self) -> None:
        """Everything was replayed: remove the file and forget the entries. Only with nothing being synced
        (await `wait_durable()` first); appends after this start a new file."""
        if self._sync_task is not None:
            raise RuntimeError("journal cleared while an fsync is in flight")
        self._close_fd()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._entries = []
        self._directory_synced = False

    async def close(self) -> None:
        """Flush and close the file (its entries stay for the next start)."""
        with contextlib.suppress(JournalError):
            await self.wait_durable()
        self._close_fd()

    def _open(self) -> int:
        if self._fd is not None:
            return self._fd
        make_private_dirs(self.path.parent)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, FILE_MODE)
        if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)  # an existing file made wider by hand: owner-only again
        self._fd = fd
        return fd

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def _fsync(fd: int, directory: Path | None) -> None:
    os.fsync(fd)
    if directory is not None:  # the file's own name must survive a crash too
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


__all__ = ["JournalContents", "JournalEntry", "JournalError", "WriteJournal", "read_journal"]

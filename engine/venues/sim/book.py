"""The sim venue's book on disk, so the sim keeps it across restarts as a real exchange does.

A real exchange still holds your positions, stops and balance after your bot stops; a sim that forgot them
made every restart find its positions gone (phantom positions at 0 % coverage, reduce-only stops refused
with -2022). `SimBookFile` keeps the sim's book — positions, open and triggering orders with their venue
and client ids, ended orders (for queries by id), balances, leverage, order budgets, the order-id counter,
the marks and the price walk — in one JSON file:

* written atomically: a temporary file beside it (owner-only, 0600: it reveals trading activity) is
  written, fsync'd and renamed over the book, then the directory is fsync'd. A crash at any moment leaves
  either the previous book or the new one, never a torn one; a temporary file a crash left is removed the
  next time the book is opened.
* one process at a time: opening the book takes an exclusive lock (`flock` on `<book>.lock`, which
  holds the holder's pid) that is held until the venue closes. A second sim on the same book — another
  engine on the same database and account label, a test — is refused with the holder's pid instead of
  both writing it. The lock dies with its process, so a crashed engine never blocks the next start.

The file is the venue's truth, kept apart from the engine's own records (the database): nothing of the
engine reads it except the sim venue.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Any

from engine.exchange.errors import ExchangeError

log = logging.getLogger(__name__)

BOOK_FORMAT = "tsbot-sim-book"
BOOK_VERSION = 1


class SimBookError(ExchangeError):
    """The sim venue cannot open its book (in use by another process, unreadable, or does not fit)."""


class SimBookFile:
    """One book file; `open()` locks and reads it, `save()` replaces it atomically, `close()` unlocks."""

    def __init__(self, path: Path) -> None:
        self.path = path.expanduser().absolute()
        self._lock_fd: int | None = None

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    @property
    def is_open(self) -> bool:
        return self._lock_fd is not None

    def open(self) -> dict[str, Any] | None:
        """Take the book's lock and read it: its contents, or None when there is no book yet. Raises
        `SimBookError` when another process holds it or it cannot be read."""
        if self._lock_fd is not None:
            raise RuntimeError(f"sim venue book {self.path} is already open")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SimBookError(f"sim venue book {self.path}: cannot open it: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SimBookError(
                f"sim venue book {self.path} is in use by another process (pid {holder}): one sim venue "
                "per book"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        try:
            self._remove_torn_writes()
            return self._read()
        except BaseException:
            self.close()
            raise

    def save(self, book: dict[str, Any]) -> None:
        """Replace the book with `book` atomically and durably (blocking: run it off the event loop)."""
        if self._lock_fd is None:
            raise RuntimeError(f"sim venue book {self.path} is not open")
        data = json.dumps(
            {"format": BOOK_FORMAT, "version": BOOK_VERSION, **book}, separators=(",", ":")
        ).encode()
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.fchmod(fd, 0o600)  # a file a crash left with other bits keeps none of them
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self.path)
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)  # the rename itself survives a power loss
            finally:
                os.close(directory)
        except OSError as exc:
            raise SimBookError(f"sim venue book {self.path}: cannot write it: {exc.strerror}") from None

    def close(self) -> None:
        """Release the lock (the book stays)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the descriptor releases the flock

    def _read(self) -> dict[str, Any] | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SimBookError(f"sim venue book {self.path}: cannot read it: {exc.strerror}") from None
        try:
            book = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self.unreadable(f"not JSON ({exc})") from None
        if not isinstance(book, dict) or book.get("format") != BOOK_FORMAT:
            raise self.unreadable("not a sim venue book")
        if book.get("version") != BOOK_VERSION:
            raise self.unreadable(f"version {book.get('version')!r}, this sim reads {BOOK_VERSION}")
        return book

    def unreadable(self, why: str) -> SimBookError:
        return SimBookError(
            f"sim venue book {self.path} cannot be used: {why}; move it away to start a fresh sim exchange"
        )

    def _remove_torn_writes(self) -> None:
        for leftover in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                leftover.unlink()
                log.info("sim venue book: removed %s, a write a crash interrupted", leftover)


def sim_book_path(data_dir: Path, database: str, account: str) -> Path:
    """Where the sim venue of one database and account label keeps its book: `sim-venue/` beside the
    embedded database's data directory, one file per (database name, account label). A database of another
    name starts a fresh sim exchange; one made again under the same name meets the book's orders as another
    installation's, and its start is refused naming this file."""
    return data_dir.expanduser().absolute().parent / "sim-venue" / f"{database}-{account}.json"


__all__ = ["SimBookError", "SimBookFile", "sim_book_path"]

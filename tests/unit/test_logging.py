"""Secrets never reach the log file, whatever the code logs."""

from __future__ import annotations

import logging
from pathlib import Path

from engine.config import LoggingSettings
from engine.logs import configure_logging


def test_secrets_and_dsn_passwords_are_redacted_at_the_handler(tmp_path: Path) -> None:
    path = configure_logging(
        LoggingSettings(file=str(tmp_path / "logs" / "trading_bot.log")), secrets=["apikey-XYZ", "topsecret"]
    )
    try:
        log = logging.getLogger("tsbot.test")
        log.warning("Created trailing stop for SFPUSDT with key %s", "apikey-XYZ")
        log.error("cannot connect to postgresql://bot:pw123@db/tsbot?sslmode=require&password=topsecret")
        for handler in logging.getLogger().handlers:
            handler.flush()
        text = path.read_text()
    finally:
        for handler in list(logging.getLogger().handlers):
            logging.getLogger().removeHandler(handler)
            handler.close()
    assert "Created trailing stop for SFPUSDT with key ***" in text
    assert "apikey-XYZ" not in text
    assert "pw123" not in text
    assert "topsecret" not in text
    assert "postgresql://bot:***@db/tsbot" in text

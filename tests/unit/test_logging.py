"""Secrets never reach the log file, whatever the code logs."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from engine.config import LoggingSettings
from engine.logs import MAX_LOG_MESSAGE_CHARS, LogFileError, RedactingFormatter, configure_logging


@pytest.fixture
def unwritable(tmp_path: Path) -> Path:
    """A directory this process cannot create files in (root ignores modes, but not sysfs)."""
    if os.geteuid() == 0:
        return Path("/sys")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return locked


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


def test_a_short_secret_is_masked_where_it_stands_alone_not_inside_every_word() -> None:
    """An operator's test secret `s`: every log line read "engine.venue***.binance_emulator.***erver …
    ***erving". A real key is tens of characters; one this short is masked as a token of its own."""
    formatter = RedactingFormatter(["s", "0123456789abcdef", "abc123"])
    said = formatter.redact("engine.venues.binance_emulator.server serving; secret=s key 0123456789abcdef")
    assert said == "engine.venues.binance_emulator.server serving; secret=*** key ***"
    # From six characters a secret is masked wherever it stands, glued to other text too.
    assert (
        formatter.redact("apikey=abc123x origin_string[1796abc1235000]")
        == "apikey=***x origin_string[1796***5000]"
    )


def _close_root_handlers() -> None:
    for handler in list(logging.getLogger().handlers):
        logging.getLogger().removeHandler(handler)
        handler.close()


def test_the_log_file_and_the_directory_we_create_are_private(tmp_path: Path) -> None:
    path = configure_logging(LoggingSettings(file=str(tmp_path / "new" / "logs" / "trading_bot.log")))
    try:
        logging.getLogger("tsbot.test").warning("Created trailing stop for SFPUSDT")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
        # A rotated-in file is private too.
        handler = next(h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler))
        handler.doRollover()  # type: ignore[attr-defined]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        _close_root_handlers()


def test_a_huge_message_is_cut_in_the_log(tmp_path: Path) -> None:
    path = configure_logging(LoggingSettings(file=str(tmp_path / "trading_bot.log")))
    try:
        log = logging.getLogger("tsbot.test")
        log.info("signal 1 %s long rejected: unknown symbol %s on sim", "Z" * 1_000_000, "Z" * 1_000_000)
        log.info("next line")
        for handler in logging.getLogger().handlers:
            handler.flush()
        lines = path.read_text().splitlines()
    finally:
        _close_root_handlers()
    assert len(lines) == 2
    assert len(lines[0]) <= MAX_LOG_MESSAGE_CHARS + 200
    assert lines[0].endswith("[2,000,047 characters, cut]")
    assert lines[1].endswith("next line")


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        (lambda tmp, _: tmp, "Is a directory"),
        (lambda tmp, _: tmp / "a-file" / "trading_bot.log", "Not a directory"),
        (lambda tmp, _: tmp / "a-file" / "logs" / "trading_bot.log", "Not a directory"),
        (lambda _, locked: locked / "trading_bot.log", "Permission denied"),
        (
            lambda _, locked: locked / "logs" / "trading_bot.log",
            "not permitted" if os.geteuid() == 0 else "Permission denied",
        ),
    ],
)
def test_a_log_file_that_cannot_be_written_is_one_line(  # type: ignore[no-untyped-def]
    tmp_path: Path, unwritable: Path, where, reason: str
) -> None:
    (tmp_path / "a-file").write_text("")
    path = where(tmp_path, unwritable)
    with pytest.raises(LogFileError) as caught:
        configure_logging(LoggingSettings(file=str(path)))
    assert str(caught.value).startswith(f"logging.file: cannot write the log file {path}: ")
    assert reason in str(caught.value)

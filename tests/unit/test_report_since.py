"""`tsbot report --since`: what an operator types, read as the start of the window (or refused naming it)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from engine.cli import UsageError, parse_since

NOW = datetime(2026, 12, 2, 16, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "back"),
    [
        ("8h", timedelta(hours=8)),
        ("90m", timedelta(minutes=90)),
        ("2d", timedelta(days=2)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("45s", timedelta(seconds=45)),
        (" 8H ", timedelta(hours=8)),
        ("1d2h3m4s", timedelta(days=1, hours=2, minutes=3, seconds=4)),
    ],
)
def test_a_duration_goes_back_from_now(text: str, back: timedelta) -> None:
    assert parse_since(text, NOW) == NOW - back


def test_a_time_with_a_zone_is_taken_as_it_is() -> None:
    assert parse_since("2026-12-02T08:00+02:00", NOW) == datetime(2026, 12, 2, 6, 0, tzinfo=UTC)
    assert parse_since("2026-12-01T08:00:00Z", NOW) == datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def test_a_time_without_a_zone_is_the_operators_local_time() -> None:
    since = parse_since("2026-12-01T08:00", NOW)
    assert since == datetime(2026, 12, 1, 8, 0).astimezone()
    assert since.utcoffset() == datetime(2026, 12, 1, 8, 0).astimezone().utcoffset()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("yesterday", "expected 8h, 90m"),
        ("8x", "expected 8h, 90m"),
        ("", "expected 8h, 90m"),
        ("h", "expected 8h, 90m"),
        ("-8h", "expected 8h, 90m"),
        ("0h", "the window is empty"),
        ("400d", "at most 366 days back"),
        ("9" * 40 + "d", "at most 366 days back"),
        ("2026-12-02T17:00+00:00", "is not in the past"),
    ],
)
def test_anything_else_is_refused_naming_since(text: str, says: str) -> None:
    with pytest.raises(UsageError) as refused:
        parse_since(text, NOW)
    message = str(refused.value)
    assert message.startswith(f"--since {text!r}: ")
    assert says in message
    assert "\n" not in message


def test_the_zone_of_the_answer_does_not_matter_to_the_window() -> None:
    cest = timezone(timedelta(hours=2))
    assert parse_since("1h", NOW.astimezone(cest)) == NOW - timedelta(hours=1)

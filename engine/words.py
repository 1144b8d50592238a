"""Words an operator reads: counts (`1 open position`, `2 open positions`), spans of time (`9m44s`, one
way everywhere), and how often a lasting failure is said."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """`count` and its noun, singular for one (`plural` where it is not the noun and an s: `entries`)."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {plural if plural is not None else noun + 's'}"


def format_duration(seconds: float) -> str:
    """Compact and floored: `7.2s`, `45s`, `1m52s`, `3h12m`, `2d03h`."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{math.floor(seconds * 10) / 10:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def keep_their_stops(count: int) -> str:
    """The verb of "N positions keep their stops", agreeing with `count`."""
    return "keeps its stops" if count == 1 else "keep their stops"


@dataclass(slots=True)
class SaidEvery:
    """A lasting failure's log level: WARNING when it begins and once per `seconds` while it lasts, DEBUG
    in between (a failure met every second was said 116 times in a row, and buried the rest)."""

    seconds: float
    said_at: float = -math.inf  # (monotonic) when it was last said at WARNING

    def level(self, now: float) -> int:
        if now - self.said_at < self.seconds:
            return logging.DEBUG
        self.said_at = now
        return logging.WARNING

    def ended(self) -> None:
        """It is over: the next failure is a new one, said at once."""
        self.said_at = -math.inf


__all__ = ["SaidEvery", "counted", "keep_their_stops"]

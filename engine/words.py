"""Counts said in words an operator reads: `1 open position`, `2 open positions`."""

from __future__ import annotations


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """`count` and its noun, singular for one (`plural` where it is not the noun and an s: `entries`)."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {plural if plural is not None else noun + 's'}"


__all__ = ["counted"]

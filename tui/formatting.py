"""How values read on screen: prices as the venue gave them, ages as "3m12s", times in one time zone."""

from __future__ import annotations

from datetime import datetime, tzinfo
from decimal import Decimal


def price(value: Decimal | None) -> str:
    if value is None:
        return "—"
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


_HUNDREDTH = Decimal("0.01")


def percent_sign(value: Decimal | None) -> int:
    """-1, 0 or 1: the sign of a percentage as `signed_percent` shows it (to the hundredth)."""
    if value is None:
        return 0
    shown = value.quantize(_HUNDREDTH)
    return 0 if not shown else (1 if shown > 0 else -1)


def signed_percent(value: Decimal | None) -> str:
    """+1.25% / -0.40%; a value that rounds to nothing is 0.00% (it read "-0.00%", in the loss colour)."""
    if value is None:
        return "—"
    if not percent_sign(value):
        return "0.00%"
    return f"{value.quantize(_HUNDREDTH):+.2f}%"


def percent(value: Decimal | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def duration(seconds: float | None) -> str:
    """Compact age: 4s, 3m12s, 2h05m, 3d04h."""
    if seconds is None:
        return "—"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def clock_time(epoch: float, tz: tzinfo | None) -> str:
    return datetime.fromtimestamp(epoch, tz).strftime("%H:%M:%S")


def date_time(epoch: float, tz: tzinfo | None) -> str:
    return datetime.fromtimestamp(epoch, tz).strftime("%Y-%m-%d %H:%M:%S")


def since(epoch: float, now: float, tz: tzinfo | None) -> str:
    """A start time as short as it can be: the time alone on the same day, else the date too."""
    start, today = datetime.fromtimestamp(epoch, tz), datetime.fromtimestamp(now or epoch, tz)
    if start.date() == today.date():
        return start.strftime("%H:%M:%S")
    return start.strftime("%Y-%m-%d %H:%M")


def milliseconds(value: int | float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f} ms"


def short_milliseconds(value: int | float | None) -> str:
    """At most 7 cells: milliseconds under 10 s, seconds with a tenth from there ("75.4 s", "120.0 s")."""
    if value is None or value < 10_000:
        return milliseconds(value)
    return f"{value / 1000:.1f} s"

"""What a guard said of its retries, read from its own log lines: the schedule it chose, which virtual-time
bounds cannot pin under load (each pass waits for real database writes while the clock runs on)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

_RETRYING_IN = re.compile(r"retrying in (\d+\.\d)s")


def stop_loss_retry_delays(records: Iterable[logging.LogRecord], symbol: str) -> list[float]:
    """The delays, in order, that a guard gave each failed placement of `symbol`'s hard stop."""
    delays = []
    for record in records:
        message = record.getMessage()
        if f"creating stop-loss for {symbol}" in message and (found := _RETRYING_IN.search(message)):
            delays.append(float(found.group(1)))
    return delays

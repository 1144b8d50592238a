"""Driving an engine on a ManualClock against real PostgreSQL.

Virtual time moves in small steps; between steps the loop yields a moment of real time so that database
round trips (real I/O) complete. Venue latency, timeouts and retry backoffs are then exact in virtual time
and a test of "2 s per call, 10 s budget" runs in well under a second of venue waiting.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

from engine.clock import ManualClock

T = TypeVar("T")


async def drive_until(
    clock: ManualClock,
    condition: Callable[[], bool | Awaitable[bool]],
    *,
    step: float = 0.05,
    limit: float = 600.0,
    what: str = "condition",
) -> float:
    """Advance `clock` until `condition` holds; returns the virtual seconds it took."""
    elapsed = 0.0
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return elapsed
        if elapsed >= limit:
            raise AssertionError(f"{what}: not reached after {limit:g} virtual seconds")
        await asyncio.sleep(0.001)  # real time for database I/O
        await clock.advance(step)
        elapsed += step


async def drive(
    clock: ManualClock, awaitable: Awaitable[T], *, step: float = 0.05, limit: float = 600.0
) -> T:
    """Run `awaitable` to completion while driving the clock; returns its result."""
    task = asyncio.ensure_future(awaitable)
    try:
        await drive_until(clock, task.done, step=step, limit=limit, what="awaited call")
    finally:
        if not task.done():
            task.cancel()
    return task.result()

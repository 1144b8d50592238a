"""The engine's supervisor: a loop that fails is restarted with backoff, and the backoff starts afresh once
the loop had recovered (it never reset: a loop failing once an hour ended up waiting a minute each time)."""

from __future__ import annotations

import asyncio
import itertools

from engine.clock import ManualClock
from engine.engine import _Supervisor


async def test_backoff_doubles_on_repeated_failures_and_resets_after_a_healthy_run() -> None:
    clock = ManualClock()
    supervisor = _Supervisor(clock)
    starts: list[float] = []
    run_for = [0.0, 0.0, 0.0, 120.0, 0.0]  # seconds each run lasts before it fails

    async def loop() -> None:
        starts.append(clock.monotonic())
        index = len(starts) - 1
        if index >= len(run_for):
            await asyncio.Event().wait()  # the last run stays up
        await clock.sleep(run_for[index])
        raise RuntimeError("failed")

    supervisor.start("loop", loop)
    await clock.settle()
    for _ in range(400):
        await clock.advance(1.0)
    await supervisor.stop()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # 1 s, 2 s, 4 s after quick failures; after the 120 s healthy run the backoff is 1 s again, then 2 s.
    assert gaps == [1.0, 2.0, 4.0, 121.0, 2.0]
    assert supervisor.restarts["loop"] == 5


async def test_stop_one_cancels_a_loop_and_waits_for_it() -> None:
    clock = ManualClock()
    supervisor = _Supervisor(clock)
    stopped = asyncio.Event()

    async def loop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()

    supervisor.start("loop", loop)
    await clock.settle()
    await supervisor.stop_one("loop")
    assert stopped.is_set()

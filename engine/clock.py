"""Injectable time: wall clock, monotonic clock and sleeping, behind one small protocol.

Everything that waits or timestamps takes a `Clock`, so production uses `SystemClock` and tests use
`ManualClock`, whose sleeps complete only when the test advances time: no real waiting, and the order in
which sleepers wake is deterministic (by deadline, then by the order they went to sleep).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Awaitable, Iterable
from typing import Any, Protocol, TypeVar, runtime_checkable

T = TypeVar("T")


@runtime_checkable
class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock time in epoch seconds."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards; only differences are meaningful."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ManualClock:
    """A clock that moves only when told to.

    `await clock.sleep(s)` parks the caller until a test calls `await clock.advance(...)` far enough.
    `advance` wakes sleepers one deadline at a time, setting the time to that deadline first, and lets the
    event loop run the woken tasks before moving on, so a loop that sleeps again inside the advanced window
    (a ticker) runs once per period, as it would in real time.
    """

    # Loop iterations granted to woken tasks after each wake-up; enough for a few awaits chained on
    # already-completed futures, which is all the venue and the engine do between two sleeps.
    _SETTLE_ITERATIONS = 20

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._wall_offset = start
        self._elapsed = 0.0
        self._sequence = itertools.count()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._wall_offset + self._elapsed

    def monotonic(self) -> float:
        return self._elapsed

    @property
    def sleepers(self) -> int:
        """How many sleeps are waiting for time to move (cancelled ones excluded)."""
        return sum(1 for _, _, future in self._sleepers if not future.done())

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._elapsed + seconds, next(self._sequence), future))
        await future

    async def advance(self, seconds: float) -> None:
        """Move time forward by `seconds`, waking every sleeper whose deadline falls inside the window."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        target = self._elapsed + seconds
        await self.settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, future = heapq.heappop(self._sleepers)
            self._elapsed = max(self._elapsed, deadline)
            if not future.done():
                future.set_result(None)
                await self.settle()
        self._elapsed = target
        await self.settle()

    async def settle(self) -> None:
        """Let ready tasks run without moving time."""
        for _ in range(self._SETTLE_ITERATIONS):
            await asyncio.sleep(0)


def monotonic_of(clock: Clock, epoch: float) -> float:
    """A wall-clock moment (epoch seconds: a venue's timestamp, a record's) on `clock`'s monotonic scale;
    a moment in the future (the other clock ahead of ours) counts as now."""
    return clock.monotonic() - max(0.0, clock.now() - epoch)


async def end_all(*futures: asyncio.Future[Any]) -> None:
    """Cancel those of `futures` still running and wait until every one has ended, its outcome read. A
    task that had already failed when its waiter was cancelled was left unread: asyncio then logs "Task
    exception was never retrieved" with a traceback whenever the garbage collector finds it (after an
    engine's stop, in the operator's log; on CPython 3.11, in the middle of another `ast.parse`, a
    SystemError about the parser's recursion depth)."""
    for future in futures:
        future.cancel()  # (nothing, for one already done)
    await asyncio.gather(*futures, return_exceptions=True)


async def first_of(*awaitables: Awaitable[Any]) -> None:
    """Until the first of `awaitables` is done; none of them outlives the call (the others are cancelled
    and awaited)."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await end_all(*tasks)


async def wait_event(clock: Clock, event: asyncio.Event, seconds: float) -> bool:
    """Wait until `event` is set or `seconds` pass on `clock`, whichever comes first; returns whether the
    event was set. Neither waiter outlives the call."""
    await first_of(event.wait(), clock.sleep(seconds))
    return event.is_set()


async def with_timeout(clock: Clock, seconds: float, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, but raise `TimeoutError` once `seconds` have passed on `clock` (not on the
    event loop's own clock), so budgets mean the same in production and in virtual-time tests."""
    work = asyncio.ensure_future(awaitable)
    timer = asyncio.ensure_future(clock.sleep(seconds))
    try:
        await asyncio.wait({work, timer}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        raise TimeoutError(f"no answer within {seconds:g}s")
    finally:
        await end_all(work, timer)


async def wait_for_all(clock: Clock, seconds: float, awaitables: Iterable[Awaitable[object]]) -> int:
    """Wait until every awaitable is done or `seconds` pass on `clock`; returns how many were still
    pending (they are cancelled)."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    if not tasks:
        return 0
    timer = asyncio.ensure_future(clock.sleep(seconds))
    try:
        pending = set(tasks)
        while pending and not timer.done():
            _done, pending = await asyncio.wait(pending | {timer}, return_when=asyncio.FIRST_COMPLETED)
            pending.discard(timer)
        return sum(1 for task in tasks if not task.done())
    finally:
        await end_all(timer, *tasks)

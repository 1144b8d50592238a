"""Coalesced writes: many tasks each await their own small write; one statement carries them all.

A wave of fifty positions confirms a hundred stops within a few milliseconds, and a restart verifies a
thousand positions at once. Written one row at a time that is a hundred or a thousand round trips to
PostgreSQL, queued behind each other in the pool. `CoalescingWriter` gathers the writes submitted while
the event loop turns and hands them to one `flush` call; every submitter gets its own row's result (or
the statement's exception). A key written twice before the flush keeps its last value, and both callers
get the result of that write.

Nothing waits on a timer: the flush runs as soon as the submitters have yielded, so a lone write costs
one round trip as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
R = TypeVar("R")

# Loop turns a flush waits before it runs, so writes submitted by tasks woken together join it.
_GATHER_TURNS = 2


class CoalescingWriter(Generic[K, V, R]):
    def __init__(self, flush: Callable[[Mapping[K, V]], Awaitable[Mapping[K, R]]], *, name: str) -> None:
        self._flush = flush
        self._name = name
        self._pending: dict[K, V] = {}
        self._waiters: dict[K, list[asyncio.Future[R | None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self.flushes = 0
        self.rows_written = 0

    async def write(self, key: K, value: V) -> R | None:
        """Submit `value` for `key` and wait for the statement that writes it: its result for `key`
        (None when the flush reported nothing for it), or its exception."""
        future: asyncio.Future[R | None] = asyncio.get_running_loop().create_future()
        self._pending[key] = value
        self._waiters.setdefault(key, []).append(future)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"coalesced-{self._name}")
        return await future

    async def close(self) -> None:
        """Stop a flush in flight (its submitters see the cancellation)."""
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        try:
            while self._pending:
                for _ in range(_GATHER_TURNS):
                    await asyncio.sleep(0)
                batch, self._pending = self._pending, {}
                waiters, self._waiters = self._waiters, {}
                try:
                    results = await self._flush(batch)
                except asyncio.CancelledError:
                    for futures in waiters.values():
                        for future in futures:
                            future.cancel()
                    raise
                except Exception as exc:
                    for futures in waiters.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    continue
                self.flushes += 1
                self.rows_written += len(batch)
                for key, futures in waiters.items():
                    for future in futures:
                        if not future.done():
                            future.set_result(results.get(key))
        finally:
            self._task = None
            leftover, self._waiters = self._waiters, {}
            self._pending = {}
            for futures in leftover.values():
                for future in futures:
                    if not future.done():
                        future.cancel()


__all__ = ["CoalescingWriter"]

"""A mark reader is cancelled (the engine stops, the dashboard quits) just as a mark arrives. On Python
3.11, `asyncio.wait_for` returns the finished wait's result instead of raising when the cancellation lands
after the waited-on event fired but before the waiting task resumed: the cancellation was lost, the reader
went on polling, and whoever awaited it (a stop, a test's teardown) waited for ever. Seen once in ~20
clean-clone CI runs as a hung Binance-stream test; reproduced here at that exact moment."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

from engine.exchange.port import MarkPrice
from engine.venues.stream_client import MarkWatcher, fresh_marks

# Only a guard against the hang (the defect): a cancelled reader ends within a loop iteration or two.
HANG_GUARD_SECONDS = 5.0


async def test_a_mark_reader_cancelled_as_a_mark_arrives_ends() -> None:
    watcher = MarkWatcher(None)
    seen: list[MarkPrice] = []

    async def fallback(_silent: list[str]) -> None:
        return None

    async def read() -> None:
        async for mark in fresh_marks(
            watcher, closed=lambda: False, stale=list, fallback=fallback, poll_seconds=0.5
        ):
            seen.append(mark)

    reader = asyncio.create_task(read())
    watcher.offer(MarkPrice("BTCUSDT", Decimal("100"), time.time()))
    await asyncio.sleep(0.05)
    assert [m.price for m in seen] == [Decimal("100")]  # and the reader waits for the next mark
    watcher.offer(MarkPrice("BTCUSDT", Decimal("101"), time.time()))
    await asyncio.sleep(0)  # the wait for the event has finished; the reader has not resumed yet
    reader.cancel()
    done, _ = await asyncio.wait({reader}, timeout=HANG_GUARD_SECONDS)
    assert done == {reader}, "the cancelled reader is still running"
    assert reader.cancelled()

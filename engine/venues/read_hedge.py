"""Hedged reads for the ccxt venues: a read whose answer is late is sent once more, the first answer wins.

A venue sometimes executes a request and never answers it (a dropped connection, an overloaded gateway):
the client learns nothing until its own timeout, 10 s and more. For an order call that is an ambiguous
outcome, settled by looking the order up. For a read it is pure waiting, and a read is often a step
inside a protective call: on Bybit, setting a position's stop first reads the position. A Bybit chaos soak
had trailing stops missing for 6–10 s, each behind one `GET /v5/position/list` whose answer was held.

Reads are idempotent, so once one is late — `HEDGE_ROUND_TRIPS` of the venue's usual read round trip
after it was *sent* (time queued in the pacer does not count), never sooner than `HEDGE_MIN_SECONDS` —
the same request goes out once more and whichever answers first is the answer. Once sent, the second copy
decides: should the first answer after all, and succeed, its answer is taken; a failure of the late first
copy waits for the second. The technique is the "hedged request" of Dean and Barroso's "The Tail at
Scale" (2013).

Hedges are rationed so that a venue slow on every request does not get twice the load: each answered
read earns `HEDGE_SHARE` of a hedge, up to `HEDGE_BURST`, and a hedge spends one. A read with no hedge to
spend simply waits for its answer, as before.

The same on every URL: the emulators and the real venues get the same hedges.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from engine.clock import Clock, end_all
from engine.pacing import start_with_own_ticket

log = logging.getLogger(__name__)

T = TypeVar("T")

HEDGE_ROUND_TRIPS = 4.0  # late: this many usual read round trips after the request was sent ...
HEDGE_MIN_SECONDS = 0.5  # ... and never sooner than this
HEDGE_SHARE = 0.1  # hedges earned per answered read: at most ~10 % more reads than asked for
HEDGE_BURST = 5.0  # hedges that can be spent at once (a burst of reads lost together)
_SMOOTHING = 0.2  # weight of the newest round trip in the usual one

# Set by the pacer's hook (`mark_sent`) when the request of the read running in this context is sent.
_SENT: contextvars.ContextVar[asyncio.Event | None] = contextvars.ContextVar("tsbot_read_sent", default=None)


def mark_sent() -> None:
    """The request of the current read leaves now (its wait for rate budget is over)."""
    sent = _SENT.get()
    if sent is not None:
        sent.set()


class ReadHedger:
    """The hedging policy of one venue connection: when a read is late, and how many hedges are left."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.round_trip_seconds = 0.0  # smoothed; 0 until a read has been answered
        self.credit = HEDGE_BURST
        self.hedged = 0  # reads sent a second time
        self.won = 0  # ... and answered first by the second copy
        self.unhedged = 0  # late reads that found no hedge to spend

    def late_after(self) -> float:
        return max(HEDGE_MIN_SECONDS, HEDGE_ROUND_TRIPS * self.round_trip_seconds)

    async def read(self, make: Callable[[], Awaitable[T]], what: str) -> T:
        """`make()` builds the read's request (called again for the hedge); raises what the deciding copy
        raised."""
        first, sent = self._start(make)
        try:
            await _sent_or_done(first, sent)
            if first.done():
                return first.result()  # answered, or failed, before it left (a ban, a refused signature)
            sent_at = self._clock.monotonic()
            if await _answered_within(self._clock, first, self.late_after()) or self.credit < 1.0:
                if not first.done():
                    self.unhedged += 1
                result = await first
                self._answered(self._clock.monotonic() - sent_at)
                return result
            self.credit -= 1.0
            self.hedged += 1
            log.debug(
                "%s: no answer %.2fs after it was sent; asked again", what, self._clock.monotonic() - sent_at
            )
            second, _ = self._start(make, own_ticket=True)
            try:
                return await self._decide(first, second)
            finally:
                await end_all(second)
        finally:
            await end_all(first)

    async def _decide(self, first: asyncio.Future[T], second: asyncio.Future[T]) -> T:
        await asyncio.wait({first, second}, return_when=asyncio.FIRST_COMPLETED)
        if first.done() and not first.cancelled() and first.exception() is None:
            return first.result()
        result = await second  # the late first failed, or the second came first: the second decides
        self.won += 1
        return result

    def _start(
        self, make: Callable[[], Awaitable[T]], *, own_ticket: bool = False
    ) -> tuple[asyncio.Future[T], asyncio.Event]:
        sent = asyncio.Event()
        token = _SENT.set(sent)
        try:
            # The hedge waits for rate budget under a ticket of its own: its wait must not stop the clock
            # of the call it serves, whose first request is out.
            task = start_with_own_ticket(make()) if own_ticket else asyncio.ensure_future(make())
        finally:
            _SENT.reset(token)
        return task, sent

    def _answered(self, seconds: float) -> None:
        previous = self.round_trip_seconds
        self.round_trip_seconds = (
            seconds if previous == 0.0 else (1 - _SMOOTHING) * previous + _SMOOTHING * seconds
        )
        self.credit = min(HEDGE_BURST, self.credit + HEDGE_SHARE)


async def _sent_or_done(task: asyncio.Future[T], sent: asyncio.Event) -> None:
    waiter = asyncio.ensure_future(sent.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)


async def _answered_within(clock: Clock, task: asyncio.Future[T], seconds: float) -> bool:
    timer = asyncio.ensure_future(clock.sleep(seconds))
    try:
        await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
        await asyncio.gather(timer, return_exceptions=True)
    return task.done()

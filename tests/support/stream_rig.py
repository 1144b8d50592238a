"""What the stream tests of both venues share: a venue reading its streams against its emulator over
loopback, every account event and mark it yields recorded, and the emulator's control API at hand."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from engine.exchange.port import AccountEvent, MarkPrice, OrderStatus, OrderUpdate, StreamGap
from engine.venues.ccxt_venue import CcxtVenue
from tests.support.waiting import wait_until


@dataclass
class StreamRig:
    venue: CcxtVenue
    emulator: Any
    base_url: str
    control: aiohttp.ClientSession
    account: list[AccountEvent] = field(default_factory=list)
    marks: list[tuple[float, MarkPrice]] = field(default_factory=list)  # (monotonic when yielded, mark)

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self.control.post(f"{self.base_url}{path}", json=body) as response:
            assert response.status == 200, await response.text()
            return await response.json()

    async def state(self) -> dict[str, Any]:
        async with self.control.get(f"{self.base_url}/_sim/state") as response:
            assert response.status == 200
            return await response.json()

    def gaps(self) -> list[StreamGap]:
        return [e for e in self.account if isinstance(e, StreamGap)]

    def updates(self, client_id: str) -> list[OrderUpdate]:
        return [
            e for e in self.account if isinstance(e, OrderUpdate) and e.order.client_order_id == client_id
        ]

    def filled(self, client_id: str) -> bool:
        return any(u.order.status is OrderStatus.FILLED for u in self.updates(client_id))

    def fresh_mark_since(self, moment: float, symbol: str) -> bool:
        return any(at > moment and mark.symbol == symbol for at, mark in self.marks)

    def stream_marks_since(self, moment: float) -> bool:
        """The marks stream is connected and its data is fresh again (not only REST fallback)."""
        marks = {s.name: s for s in self.venue.stream_states()}["marks"]
        return marks.connected and marks.last_event_at is not None and marks.last_event_at > moment


@contextlib.asynccontextmanager
async def reading(rig: StreamRig, symbols: Collection[str] | None) -> AsyncIterator[None]:
    """The venue's account and mark streams read into `rig` until the block ends; entered once the
    account stream told its first gap (live) and a first mark came."""

    async def read_account() -> None:
        async for event in rig.venue.watch_account():
            rig.account.append(event)

    async def read_marks() -> None:
        async for mark in rig.venue.watch_mark_prices(symbols):
            rig.marks.append((time.monotonic(), mark))

    tasks = [asyncio.create_task(read_account()), asyncio.create_task(read_marks())]
    try:
        await wait_until(lambda: len(rig.gaps()) == 1, what="the account stream live")
        await wait_until(lambda: bool(rig.marks), what="a first mark")
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await rig.venue.close()

"""Bench-only venue wrappers for `bench/wave_protection.py`. Nothing in the engine imports this module.

* `CountingVenue` delegates every port call to the venue it wraps, counts the calls by name, and counts
  what the venue refused for its budget: `RateLimited` (HTTP 429) and `Banned` (HTTP 418). It changes no
  behaviour.
* `GlobalLockVenue` is the incident's design, rebuilt on purpose for comparison: the protective-order
  calls (`create_stop_market_order`, `create_trailing_stop_order`) take ONE `asyncio.Lock` shared by all
  positions and hold it for the whole venue round trip, so a wave's protective orders go out one at a
  time. The engine's `protection.call_timeout_seconds` budget wraps the call from the outside, so the time
  spent queueing for the lock counts against it, exactly as it did in production: with 2 s per call and a
  10 s budget, the calls queued behind the first few time out. A timed-out call is cancelled by the engine
  (it leaves the lock queue, or abandons its venue call while holding the lock); the engine then resolves
  the order by client order id and retries, as it would against any slow venue.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Collection, Mapping
from decimal import Decimal
from typing import Any, TypeVar

from engine.exchange.errors import Banned, RateLimited
from engine.exchange.port import (
    AccountEvent,
    Balance,
    Capabilities,
    ExchangePort,
    Market,
    MarkPrice,
    Order,
    OrderSide,
    StreamState,
    VenuePosition,
)

T = TypeVar("T")


class CountingVenue:
    """The wrapped venue, unchanged, plus counters of budget refusals (by call name)."""

    def __init__(self, inner: ExchangePort) -> None:
        self.inner = inner
        self.rate_limited = 0
        self.banned = 0
        self.refusals: dict[str, int] = {}
        self.calls: dict[str, int] = {}  # every port call made, by name

    async def _counted(self, call: str, awaitable: Awaitable[T]) -> T:
        self.calls[call] = self.calls.get(call, 0) + 1
        try:
            return await awaitable
        except RateLimited:
            self.rate_limited += 1
            self.refusals[call] = self.refusals.get(call, 0) + 1
            raise
        except Banned:
            self.banned += 1
            self.refusals[call] = self.refusals.get(call, 0) + 1
            raise

    # ---- the port, by delegation -------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.inner.name

    def capabilities(self) -> Capabilities:
        return self.inner.capabilities()

    def attach_pacing(self, pacing: Any) -> None:
        self.inner.attach_pacing(pacing)

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    async def load_markets(self) -> Mapping[str, Market]:
        return await self._counted("load_markets", self.inner.load_markets())

    async def fetch_mark_prices(self, symbols: Collection[str] | None = None) -> dict[str, MarkPrice]:
        return await self._counted("fetch_mark_prices", self.inner.fetch_mark_prices(symbols))

    def watch_mark_prices(self, symbols: Collection[str] | None = None) -> AsyncIterator[MarkPrice]:
        return self.inner.watch_mark_prices(symbols)

    def watch_account(self) -> AsyncIterator[AccountEvent]:
        return self.inner.watch_account()

    def stream_states(self) -> tuple[StreamState, ...]:
        return self.inner.stream_states()

    async def fetch_balance(self) -> Balance:
        return await self._counted("fetch_balance", self.inner.fetch_balance())

    async def fetch_positions(self, symbol: str | None = None) -> list[VenuePosition]:
        return await self._counted("fetch_positions", self.inner.fetch_positions(symbol))

    async def fetch_open_protective_orders(self, symbol: str | None = None) -> list[Order]:
        return await self._counted("fetch_open_orders", self.inner.fetch_open_protective_orders(symbol))

    async def set_leverage(self, symbol: str, leverage: int) -> int:
        return await self._counted("set_leverage", self.inner.set_leverage(symbol, leverage))

    async def create_market_order(
        self,
        symbol: str,
        side: OrderSide,
        quantity: Decimal,
        *,
        client_order_id: str,
        reduce_only: bool = False,
    ) -> Order:
        return await self._counted(
            "create_market_order",
            self.inner.create_market_order(
                symbol, side, quantity, client_order_id=client_order_id, reduce_only=reduce_only
            ),
        )

    async def create_stop_market_order(
        self,
        symbol: str,
        side: OrderSide,
        quantity: Decimal,
        stop_price: Decimal,
        *,
        client_order_id: str,
    ) -> Order:
        return await self._counted(
            "create_stop_market_order",
            self.inner.create_stop_market_order(
                symbol, side, quantity, stop_price, client_order_id=client_order_id
            ),
        )

    async def create_trailing_stop_order(
        self,
        symbol: str,
        side: OrderSide,
        quantity: Decimal,
        callback_rate: Decimal,
        *,
        client_order_id: str,
        activation_price: Decimal | None = None,
    ) -> Order:
        return await self._counted(
            "create_trailing_stop_order",
            self.inner.create_trailing_stop_order(
                symbol,
                side,
                quantity,
                callback_rate,
                client_order_id=client_order_id,
                activation_price=activation_price,
            ),
        )

    async def cancel_order(self, symbol: str, client_order_id: str) -> Order:
        return await self._counted("cancel_order", self.inner.cancel_order(symbol, client_order_id))

    async def fetch_order(self, symbol: str, client_order_id: str) -> Order:
        return await self._counted("fetch_order", self.inner.fetch_order(symbol, client_order_id))


class GlobalLockVenue(CountingVenue):
    """The incident's design: every protective-order call holds one shared lock across its venue I/O."""

    def __init__(self, inner: ExchangePort) -> None:
        super().__init__(inner)
        self._lock = asyncio.Lock()
        self.lock_waits: list[float] = []  # seconds each protective call queued before it got the lock
        self.abandoned_in_queue = 0  # calls cancelled (engine timeout) while still waiting for the lock

    async def _locked(self, awaitable: Awaitable[T]) -> T:
        queued = time.monotonic()
        try:
            await self._lock.acquire()
        except asyncio.CancelledError:
            self.abandoned_in_queue += 1
            if asyncio.iscoroutine(awaitable):
                awaitable.close()  # never started: close it so no "never awaited" warning
            raise
        try:
            self.lock_waits.append(time.monotonic() - queued)
            return await awaitable
        finally:
            self._lock.release()

    async def create_stop_market_order(
        self,
        symbol: str,
        side: OrderSide,
        quantity: Decimal,
        stop_price: Decimal,
        *,
        client_order_id: str,
    ) -> Order:
        return await self._locked(
            super().create_stop_market_order(
                symbol, side, quantity, stop_price, client_order_id=client_order_id
            )
        )

    async def create_trailing_stop_order(
        self,
        symbol: str,
        side: OrderSide,
        quantity: Decimal,
        callback_rate: Decimal,
        *,
        client_order_id: str,
        activation_price: Decimal | None = None,
    ) -> Order:
        return await self._locked(
            super().create_trailing_stop_order(
                symbol,
                side,
                quantity,
                callback_rate,
                client_order_id=client_order_id,
                activation_price=activation_price,
            )
        )


__all__ = ["CountingVenue", "GlobalLockVenue"]


class CountingAttachingVenue(CountingVenue):
    """`CountingVenue` for a venue whose entry can carry the hard stop (Bybit): the engine sees the
    ability through the wrapper, as it would on the venue itself."""

    async def create_market_order_with_stop(
        self,
        symbol: str,
        side: Any,
        quantity: Any,
        stop_price: Any,
        *,
        client_order_id: str,
        stop_client_order_id: str,
    ) -> Any:
        return await self._counted(
            "create_market_order",
            self.inner.create_market_order_with_stop(  # type: ignore[attr-defined]
                symbol,
                side,
                quantity,
                stop_price,
                client_order_id=client_order_id,
                stop_client_order_id=stop_client_order_id,
            ),
        )

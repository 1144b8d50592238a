"""Domain events: what the engine tells the dashboard and the log, in the engine's own words.

Subscribers get their own bounded queue. A subscriber that falls behind never blocks the engine and never
loses events silently: the oldest events are dropped and an `EventsDropped` with the count is delivered
in their place, so the reader knows to re-read the snapshot (F12).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from engine.words import counted

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineEvent:
    at: float  # wall-clock epoch seconds


@dataclass(frozen=True, slots=True, kw_only=True)
class PositionOpened(EngineEvent):
    position_id: int
    symbol: str
    side: str
    quantity: Decimal
    entry_price: Decimal


@dataclass(frozen=True, slots=True, kw_only=True)
class ProtectionConfirmed(EngineEvent):
    position_id: int
    symbol: str
    purpose: str  # stop_loss | trailing_stop
    client_order_id: str | None
    latency_seconds: float
    price: Decimal | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ProtectionTimedOut(EngineEvent):
    """A protective call got no answer within its budget (a real timeout, and only that: an HTTP 500 or a
    dropped connection is a `ProtectionFailed` with its own `failure_class`)."""

    position_id: int
    symbol: str
    operation: str
    latency_seconds: float
    outcome: str  # resolved | retrying | failed | closed
    failure_class: str = "timeout"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProtectionFailed(EngineEvent):
    """A protection step failed. For a protective order the venue did not take, `failure_class` says what
    happened (`engine.exchange.errors.FailureClass`: unknown_outcome, rejected, server_error, rate_limited,
    not_sent), with the venue's code and the call's latency; None for failures that were no venue call."""

    position_id: int
    symbol: str
    operation: str
    error: str
    retry_in_seconds: float | None
    failure_class: str | None = None
    venue_code: int | None = None
    http_status: int | None = None
    latency_seconds: float | None = None
    outcome: str | None = None  # resolved (by client order id) | retrying; None: not a call's outcome
    # The same failure of the same position said within the last minute: counted, not shown again.
    repeated: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class StopMoved(EngineEvent):
    position_id: int
    symbol: str
    old_stop: Decimal | None
    new_stop: Decimal
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PositionClosed(EngineEvent):
    position_id: int
    symbol: str
    exit_reason: str
    realized_pnl: Decimal | None


@dataclass(frozen=True, slots=True, kw_only=True)
class SignalRejected(EngineEvent):
    signal_id: int
    symbol: str
    reason: str
    wave_id: int | None = None  # None: rejected outside a wave (the engine stopping before it began)
    # Turned away in the ordinary course (its symbol already held or repeated in its wave, the operator's own
    # pause, the engine stopping): information. Any other rejection is a signal lost, said as a warning.
    routine: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class WaveFinished(EngineEvent):
    wave_id: int
    signals: int
    opened: int
    protected: int
    failed: int
    slowest_protection_ms: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthChanged(EngineEvent):
    component: str
    state: str
    summary: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class EntriesToggled(EngineEvent):
    paused: bool
    by: str = ""  # who paused: operator, breaker, lease, database ("" when resumed)
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineStateChanged(EngineEvent):
    state: str
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class EventsDropped(EngineEvent):
    count: int


@dataclass(slots=True)
class _Subscriber:
    limit: int
    queue: deque[EngineEvent] = field(default_factory=deque)
    dropped: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False


class EventBus:
    def __init__(self, per_subscriber_limit: int = 10_000):
        self._limit = per_subscriber_limit
        self._subscribers: list[_Subscriber] = []
        self.published = 0

    def publish(self, event: EngineEvent) -> None:
        """Never blocks, never raises: the engine's paths call this inline."""
        self.published += 1
        for subscriber in self._subscribers:
            if len(subscriber.queue) >= subscriber.limit:
                subscriber.queue.popleft()
                subscriber.dropped += 1
            subscriber.queue.append(event)
            subscriber.ready.set()

    async def subscribe(self) -> AsyncIterator[EngineEvent]:
        subscriber = _Subscriber(self._limit)
        self._subscribers.append(subscriber)
        try:
            while not subscriber.closed:
                await subscriber.ready.wait()
                subscriber.ready.clear()
                if subscriber.dropped:
                    dropped, subscriber.dropped = subscriber.dropped, 0
                    log.warning("event subscriber fell behind: %s dropped", counted(dropped, "event"))
                    at = subscriber.queue[0].at if subscriber.queue else 0.0
                    yield EventsDropped(at=at, count=dropped)
                while subscriber.queue:
                    yield subscriber.queue.popleft()
        finally:
            self._subscribers.remove(subscriber)

    def close(self) -> None:
        for subscriber in self._subscribers:
            subscriber.closed = True
            subscriber.ready.set()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)


def describe(event: EngineEvent) -> dict[str, Any]:
    """A JSON-friendly dict of an event (type plus fields)."""
    data: dict[str, Any] = {"type": type(event).__name__}
    for name in event.__dataclass_fields__:
        value = getattr(event, name)
        data[name] = str(value) if isinstance(value, Decimal) else value
    return data

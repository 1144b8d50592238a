"""The stream faults both wire emulators stage through `POST /_sim/stream-fault` (body `{"fault": ...}`;
`POST /_sim/clear-faults` ends the lasting ones), on whatever connections the venue's stream hub holds:

* `drop`: close every connection now as a network drop does (no close frame); with `seconds`, also every
  connection opened during those seconds, right after its handshake (a reconnect storm);
* `stall`: every open connection stays connected and sends nothing, not even a pong, for `seconds`;
* `drop_subscription`: the server forgets one subscription (`stream`, or the first it holds) without
  telling anyone;
* `expire_listen_key`: the venue's account credential for the stream lapses (Binance's listen key; a
  venue without one refuses the fault);
* `delay`: account events leave `ms` milliseconds late, for `seconds` or until cleared;
* `reorder`: the next `count` batches of account events go out in reverse order;
* `lose`: the next `count` account messages of `topic` never leave (the venue lost them: no gap, no
  reconnect, nothing tells the client);
* `blank`: the next `count` account messages of `topic` whose rows carry `field` leave with it empty
  (`""`, as a venue says "not known": Bybit's order topic gives `avgPrice` "" to orders without one).

`lose` and `blank` name a venue's own topics and fields: a hub offers them (`stage(..., topics=...)`)
or refuses both.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from aiohttp import web

logger = logging.getLogger(__name__)

T = TypeVar("T")


class StreamFaultKind(StrEnum):
    DROP = "drop"
    STALL = "stall"
    DROP_SUBSCRIPTION = "drop_subscription"
    EXPIRE_LISTEN_KEY = "expire_listen_key"
    DELAY = "delay"
    REORDER = "reorder"
    LOSE = "lose"
    BLANK = "blank"


class StreamFaultError(ValueError):
    """A stream fault the control API cannot stage; the message says why."""


class FaultedConnection(Protocol):
    id: int
    request: web.Request
    subscriptions: list[str]
    stalled_until: float  # monotonic


class StreamFaults:
    """The staged stream faults of one emulator and how they act on its connections."""

    def __init__(self) -> None:
        self.storm_until = 0.0  # monotonic: connections opened before it are closed after the handshake
        self.delay_ms = 0
        self.delay_until = math.inf
        self.reorder_batches = 0
        self.lose: dict[str, int] = {}  # topic -> messages still to lose
        self.blank: dict[tuple[str, str], int] = {}  # (topic, field) -> messages still to blank

    def storming(self) -> bool:
        return time.monotonic() < self.storm_until

    def stage(
        self,
        body: dict[str, Any],
        connections: Iterable[FaultedConnection],
        expire_key: Callable[[], dict[str, Any]] | None = None,
        topics: Mapping[str, Collection[str]] | None = None,
    ) -> dict[str, Any]:
        """Stage `body`'s fault. `topics`: the account topics a `lose` may name, each with the row fields
        a `blank` may empty (None: this venue's streams stage neither)."""
        try:
            kind = StreamFaultKind(str(body.get("fault", "")))
        except ValueError:
            expected = ", ".join(k.value for k in StreamFaultKind)
            raise StreamFaultError(
                f"unknown stream fault {body.get('fault')!r}: expected one of {expected}"
            ) from None
        connections = list(connections)
        seconds = self._number(body, "seconds", 0.0, 86_400.0)
        if kind is StreamFaultKind.DROP:
            if seconds:
                self.storm_until = time.monotonic() + seconds
            for connection in connections:
                abort(connection)
            logger.info("emulator: dropped %d stream connections", len(connections))
            return {"dropped": len(connections)}
        if kind is StreamFaultKind.STALL:
            if not seconds:
                raise StreamFaultError("stall needs seconds > 0")
            for connection in connections:
                connection.stalled_until = time.monotonic() + seconds
            return {"stalled": len(connections)}
        if kind is StreamFaultKind.DROP_SUBSCRIPTION:
            wanted = body.get("stream")
            for connection in connections:
                for name in connection.subscriptions:
                    if wanted in (None, name):
                        connection.subscriptions.remove(name)
                        logger.info("emulator: forgot the subscription %s", name)
                        return {"dropped": name, "connection": connection.id}
            raise StreamFaultError(f"no connection holds the subscription {wanted or '(any)'}")
        if kind is StreamFaultKind.EXPIRE_LISTEN_KEY:
            if expire_key is None:
                raise StreamFaultError("this venue's streams have no listen key to expire")
            return expire_key()
        if kind is StreamFaultKind.DELAY:
            self.delay_ms = int(self._number(body, "ms", 0.0, 600_000.0))
            self.delay_until = time.monotonic() + seconds if seconds else math.inf
            return {"delay_ms": self.delay_ms}
        count = int(self._number(body, "count", 1.0, 1_000_000.0) or 1)
        if kind is StreamFaultKind.REORDER:
            self.reorder_batches = count
            return {"reorder_batches": count}
        if topics is None:
            raise StreamFaultError(f"this venue's streams cannot {kind.value} messages by topic")
        topic = str(body.get("topic", ""))
        if topic not in topics:
            raise StreamFaultError(f"unknown topic {topic!r}: expected one of {', '.join(sorted(topics))}")
        if kind is StreamFaultKind.LOSE:
            self.lose[topic] = count
            return {"lose": topic, "count": count}
        name = str(body.get("field", ""))
        if name not in topics[topic]:
            fields = ", ".join(sorted(topics[topic])) or "none"
            raise StreamFaultError(f"{topic} rows have no field {name!r} to blank: expected one of {fields}")
        self.blank[(topic, name)] = count
        return {"blank": name, "topic": topic, "count": count}

    def outgoing(self, topic: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """An account message's rows as they leave: None when a `lose` fault takes the message, rows
        with a field emptied while a `blank` fault lasts."""
        if self.lose.get(topic, 0) > 0:
            self.lose[topic] -= 1
            logger.info("emulator: an account message of %s lost (%d rows)", topic, len(rows))
            return None
        for (blank_topic, name), left in self.blank.items():
            if blank_topic != topic or left <= 0 or not any(row.get(name) for row in rows):
                continue
            self.blank[(blank_topic, name)] = left - 1
            logger.info("emulator: an account message of %s sent with %s blank", topic, name)
            rows = [{**row, name: ""} if name in row else row for row in rows]
        return rows

    def reordered(self, events: list[T]) -> list[T]:
        """A batch of account events as it leaves: reversed while a `reorder` fault lasts."""
        if self.reorder_batches > 0 and len(events) > 1:
            self.reorder_batches -= 1
            logger.info("emulator: %d account events sent in reverse order", len(events))
            return list(reversed(events))
        return events

    def departure(self) -> float:
        """When an account event put out now leaves (monotonic): `delay_ms` later while a `delay` fault
        lasts, else now. Each event is late by the delay, not by the delays of the events queued before
        it: a slow stream is late, it does not slow down (a burst of three messages arrived 1, 2 and 3 s
        late under a 1 s delay)."""
        now = time.monotonic()
        if self.delay_ms and now < self.delay_until:
            return now + self.delay_ms / 1000
        return now

    @staticmethod
    async def hold_until(departure: float) -> None:
        """Wait for an event's `departure` (from `departure()`)."""
        wait = departure - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    def clear(self, connections: Iterable[FaultedConnection]) -> None:
        self.storm_until = 0.0
        self.delay_ms = 0
        self.delay_until = math.inf
        self.reorder_batches = 0
        self.lose.clear()
        self.blank.clear()
        for connection in connections:
            connection.stalled_until = 0.0

    @staticmethod
    def _number(body: dict[str, Any], name: str, low: float, high: float) -> float:
        try:
            value = float(body.get(name, low))
        except (TypeError, ValueError):
            raise StreamFaultError(f"{name} must be a number") from None
        if not low <= value <= high:
            raise StreamFaultError(f"{name} must be within {low:g}..{high:g}")
        return value


def abort(connection: FaultedConnection) -> None:
    """The connection breaks as a network drop does: no close frame, the TCP connection just ends."""
    transport = connection.request.transport
    if transport is not None:
        transport.abort()

"""What every venue's push-stream client shares: one reconnecting websocket with backoff, jitter, stall
detection and the counters behind `StreamState`, and the coalescing mark watcher.

The lifecycle is the venue-independent half of the incident family these streams answer (restart loops,
silent disconnects, stale subscriptions): a connection that ends for any reason is made again after an
exponential backoff with jitter that only resets once a connection stayed up `stable_seconds` (a venue
that drops every connection is not hammered); no message at all (data, pong) for `stall_seconds` while
connected is a stall, so the connection is dropped and made again (we ping at half of it). What a venue
adds: its URL, what to send once connected (subscriptions, authentication), how to ping (a websocket ping
frame on Binance, `{"op": "ping"}` on Bybit) and how to read a message. A venue's refusal that no retry
can mend (a wrong API key) raises `StreamRefused`: the socket stops, says why, and does not loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import aiohttp

from engine.exchange.errors import ExchangeError
from engine.exchange.port import MarkPrice, OrderStatus

logger = logging.getLogger(__name__)

_MAX_MESSAGE_BYTES = 16 << 20  # the all-market array of a large universe

WS_CLOSED_TYPES = (
    aiohttp.WSMsgType.CLOSE,
    aiohttp.WSMsgType.CLOSING,
    aiohttp.WSMsgType.CLOSED,
    aiohttp.WSMsgType.ERROR,
)


@dataclass(frozen=True, slots=True)
class StreamSettings:
    stall_seconds: float = 10.0  # connected but nothing received (not even a pong) this long: reconnect
    stale_mark_seconds: float = 3.0  # a wanted mark stream silent this long: resubscribe, REST meanwhile
    backoff_initial_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    stable_seconds: float = 30.0  # a connection that lived this long resets the backoff
    listen_key_keepalive_seconds: float = 1800.0  # Binance: every 30 min (a key lives 60)
    subscription_check_seconds: float = 30.0  # Bybit: ask for each private topic again this often
    connect_timeout_seconds: float = 10.0

    def __post_init__(self) -> None:
        if self.stall_seconds <= 0 or self.stale_mark_seconds <= 0 or self.backoff_initial_seconds <= 0:
            raise ValueError("stream timings must be positive")


def decimal_or_none(value: Any) -> Decimal | None:
    try:
        parsed = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return parsed if parsed.is_finite() else None


def positive_or_none(value: Any) -> Decimal | None:
    parsed = decimal_or_none(value)
    return parsed if parsed is not None and parsed > 0 else None


def seconds_from_ms(ms: Any, default: float) -> float:
    try:
        return int(ms) / 1000
    except (TypeError, ValueError):
        return default


class Stalled(Exception):
    pass


class Reconnect(Exception):
    """Leave this connection and make a new one (a reason the venue gave, or ours)."""


class StreamRefused(Exception):
    """The venue refused the stream for a reason no retry mends (a wrong API key): stop, say why."""


async def _ping_frame(ws: aiohttp.ClientWebSocketResponse) -> None:
    await ws.ping()


class ReconnectingSocket:
    """One reconnecting websocket: backoff with jitter, stall detection, counters for `StreamState`."""

    def __init__(
        self,
        venue: str,
        name: str,
        settings: StreamSettings,
        session: Callable[[], aiohttp.ClientSession],
        *,
        ping: Callable[[aiohttp.ClientWebSocketResponse], Awaitable[None]] = _ping_frame,
    ) -> None:
        self.venue = venue
        self.name = name
        self._settings = settings
        self._session = session
        self._ping = ping
        self.connected = False
        self.last_message_at: float | None = None  # monotonic
        self.reconnects = 0
        self.attempts = 0  # connection attempts made (for tests of storms)
        self.detail = "not started"
        self.refused: str | None = None  # why the venue refused the stream for good (then it stops)
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._failures = 0
        self._drop_reason = ""
        self.lost_at: float | None = None  # wall clock: when the last connection ended
        self.last_reason = ""  # why the last connection ended (kept while the next one lives)

    async def run(
        self,
        url: Callable[[], Awaitable[str]],
        on_open: Callable[[aiohttp.ClientWebSocketResponse], Awaitable[None]],
        on_message: Callable[[Any], Awaitable[None]],
    ) -> None:
        """Connect, and again after every end, until cancelled or refused for good (`StreamRefused`)."""
        while True:
            opened_at: float | None = None
            try:
                target = await url()
                self.attempts += 1
                ws = await self._session().ws_connect(
                    target,
                    autoping=False,
                    heartbeat=None,
                    max_msg_size=_MAX_MESSAGE_BYTES,
                    timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
                )
                self._ws = ws
                opened_at = time.monotonic()
                self.connected = True
                self.last_message_at = opened_at
                self.detail = ""
                await on_open(ws)
                await self._receive(ws, on_message)
                reason = self._drop_reason or "closed by the venue"
            except asyncio.CancelledError:
                raise
            except StreamRefused as why:
                reason = str(why)
                self.refused = reason
            except Stalled:
                reason = f"silent for {self._settings.stall_seconds:g}s"
            except Reconnect as why:
                reason = str(why)
            except ExchangeError as error:
                reason = f"REST {type(error).__name__}"
            except (aiohttp.ClientError, OSError, TimeoutError) as error:
                # Never str(error): a handshake error's text carries the URL, and an account's URL may
                # carry a credential (Binance's listen key).
                reason = f"connection failed ({type(error).__name__})"
            except Exception as error:  # a defect of ours: logged with its traceback, then the same backoff
                logger.exception("%s %s stream: unexpected failure", self.venue, self.name)
                reason = f"unexpected failure ({type(error).__name__})"
            finally:
                ws, self._ws = self._ws, None
                if ws is not None:
                    with contextlib.suppress(Exception):
                        await ws.close()
            if self.connected:
                self.connected = False
                self.lost_at = time.time()
                self.reconnects += 1
            self.detail = self.last_reason = reason
            self._drop_reason = ""
            if self.refused is not None:
                logger.error("%s %s stream: %s; not reconnecting", self.venue, self.name, reason)
                return
            lived = time.monotonic() - opened_at if opened_at is not None else 0.0
            if lived >= self._settings.stable_seconds:
                self._failures = 0
            delay = min(
                self._settings.backoff_max_seconds,
                self._settings.backoff_initial_seconds * (2**self._failures),
            ) * random.uniform(0.5, 1.0)
            self._failures = min(self._failures + 1, 30)
            logger.warning("%s %s stream: %s; reconnecting in %.1fs", self.venue, self.name, reason, delay)
            await asyncio.sleep(delay)

    async def _receive(
        self, ws: aiohttp.ClientWebSocketResponse, on_message: Callable[[Any], Awaitable[None]]
    ) -> None:
        stall = self._settings.stall_seconds
        pinged = False
        while True:
            assert self.last_message_at is not None
            idle = time.monotonic() - self.last_message_at
            if idle >= stall:
                raise Stalled()
            wait = (stall / 2 - idle) if not pinged and idle < stall / 2 else (stall - idle)
            try:
                message = await ws.receive(timeout=max(wait, 0.01))
            except TimeoutError:
                if not pinged and time.monotonic() - self.last_message_at >= stall / 2:
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await self._ping(ws)
                    pinged = True
                continue
            if message.type in WS_CLOSED_TYPES:
                return
            self.last_message_at = time.monotonic()
            pinged = False
            if message.type is aiohttp.WSMsgType.PING:
                await ws.pong(message.data)
            elif message.type is aiohttp.WSMsgType.TEXT:
                try:
                    payload = json.loads(message.data)
                except ValueError:
                    logger.warning("%s %s stream: unreadable message skipped", self.venue, self.name)
                    continue
                await on_message(payload)

    async def send(self, payload: Mapping[str, Any]) -> bool:
        ws = self._ws
        if ws is None or not self.connected:
            return False
        try:
            await ws.send_str(json.dumps(payload))
        except (ConnectionError, RuntimeError):
            return False
        return True

    async def drop(self, reason: str) -> None:
        """End the current connection (the loop makes a new one); `reason` is what it reports."""
        self._drop_reason = reason
        ws = self._ws
        if ws is not None:
            await ws.close()


class MarkWatcher:
    """One reader of mark prices: the latest per symbol (coalesced), and an event when there is news."""

    def __init__(self, symbols: frozenset[str] | None) -> None:
        self.symbols = symbols
        self.pending: dict[str, MarkPrice] = {}
        self.ready = asyncio.Event()

    def offer(self, mark: MarkPrice) -> None:
        if self.symbols is None or mark.symbol in self.symbols:
            self.pending[mark.symbol] = mark  # coalesced: the latest per symbol
            self.ready.set()


class Supervisor:
    """The streams' named background tasks: each restarted a second after an unexpected failure."""

    def __init__(self, venue: str) -> None:
        self._venue = venue
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.closed = False

    def start(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        task = self.tasks.get(name)
        if task is None or task.done():
            self.tasks[name] = asyncio.create_task(
                self._supervised(name, factory), name=f"{self._venue}-{name}-stream"
            )

    async def _supervised(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        while not self.closed:
            try:
                await factory()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("%s %s stream: unexpected failure; restarting in 1s", self._venue, name)
                await asyncio.sleep(1.0)
            else:
                return  # the stream ended for good (refused): not restarted

    async def close(self) -> None:
        self.closed = True
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class StatusLedger:
    """How far each order was told: events may arrive out of order, and a status never goes back."""

    def __init__(self, size: int = 10_000) -> None:
        self._last: OrderedDict[str, tuple[int, float]] = OrderedDict()  # key -> (rank, event time)
        self._size = size

    def newer(self, key: str, status: OrderStatus, event_time: float) -> bool:
        """Whether this update moves the order on (else: told already, or a late echo of an earlier state)."""
        rank = 2 if status.is_final else (1 if status is OrderStatus.TRIGGERED else 0)
        before = self._last.get(key)
        if before is not None and before[0] >= rank:
            return False
        self._last[key] = (rank, event_time)
        self._last.move_to_end(key)
        while len(self._last) > self._size:
            self._last.popitem(last=False)
        return True


async def fresh_marks(
    watcher: MarkWatcher,
    *,
    closed: Callable[[], bool],
    stale: Callable[[], list[str]],
    fallback: Callable[[list[str]], Awaitable[None]],
    poll_seconds: float,
) -> AsyncIterator[MarkPrice]:
    """A mark reader's loop: what the stream offers, coalesced, and only marks newer than the last one
    yielded per symbol; while some of its streams are stale (`stale()` names them), `fallback` (REST, and
    asking the venue for them again) runs at the poll rate."""
    last_yielded: dict[str, float] = {}
    last_rest = 0.0
    while not closed():
        silent = stale()
        if silent and time.monotonic() - last_rest >= poll_seconds:
            last_rest = time.monotonic()
            await fallback(silent)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watcher.ready.wait(), poll_seconds)
        watcher.ready.clear()
        marks, watcher.pending = watcher.pending, {}
        for mark in marks.values():
            if mark.timestamp > last_yielded.get(mark.symbol, -1.0):
                last_yielded[mark.symbol] = mark.timestamp
                yield mark

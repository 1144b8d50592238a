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
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

import aiohttp

from engine.exchange.errors import Banned, ExchangeError, RateLimited
from engine.exchange.port import AccountEvent, MarkPrice, OrderStatus, StreamState
from engine.words import SaidEvery, counted

logger = logging.getLogger(__name__)
FALLBACK_FAILURE_SAID_EVERY_SECONDS = 60.0

# The detail of a stream not tried yet: not down, not measured (every start's first health check said
# "Account stream down (not started)", a WARNING a millisecond before the stream came up).
NOT_STARTED = "not started"

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
    listen_key_valid_seconds: float = 3600.0  # Binance: a key lives 60 min from its last POST or PUT
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


class VenueStreams(Protocol):
    """What a venue's push-stream client offers the venue module (Binance's, Bybit's)."""

    def watch_mark_prices(self, symbols: Collection[str] | None) -> AsyncIterator[MarkPrice]: ...

    def watch_account(self) -> AsyncIterator[AccountEvent]: ...

    def states(self) -> tuple[StreamState, ...]: ...

    async def close(self) -> None: ...


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
        # When the venue last sent a frame (monotonic; None: never). Not moved by a connection's opening: a
        # venue closing each connection at its handshake sent nothing for a minute while the age said 0.7 s.
        self.last_message_at: float | None = None
        self._idle_since = 0.0  # the silence the stall check measures: from the last frame or the opening
        self.reconnects = 0
        self.attempts = 0  # connection attempts made (for tests of storms)
        self.detail = NOT_STARTED
        self.refused: str | None = None  # why the venue refused the stream for good (then it stops)
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._failures = 0
        self._drop_reason = ""
        self.lost_at: float | None = None  # wall clock: when the last connection ended
        self.last_reason = ""  # why the last connection ended (kept while the next one lives)
        # The last attempt: how long its connection lived (0: it never opened) and whether it went silent.
        self.last_lived = 0.0
        self.last_stalled = False

    async def run(
        self,
        url: Callable[[], Awaitable[str]],
        on_open: Callable[[aiohttp.ClientWebSocketResponse], Awaitable[None]],
        on_message: Callable[[Any], Awaitable[None]],
    ) -> None:
        """Connect, and again after every end, until cancelled or refused for good (`StreamRefused`)."""
        while True:
            opened_at: float | None = None
            stalled = False
            told_wait: float | None = None  # the venue said when it takes requests again
            try:
                target = await url()
                self.attempts += 1
                # A handshake that never answers is a failed attempt (the session's own limit is minutes).
                async with asyncio.timeout(self._settings.connect_timeout_seconds):
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
                self._idle_since = opened_at
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
                stalled = True
                reason = f"silent for {self._settings.stall_seconds:g}s"
            except Reconnect as why:
                reason = str(why)
            except ExchangeError as error:
                # (the venue's REST call the stream needs, e.g. its listen key, failed: said by its class,
                # "REST Retryable" was no sentence)
                reason = f"its REST call failed ({_failure_words(error)})"
                told_wait = _venue_wait(error)
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
            self.last_lived, self.last_stalled = lived, stalled
            if lived >= self._settings.stable_seconds:
                self._failures = 0
            delay = min(
                self._settings.backoff_max_seconds,
                self._settings.backoff_initial_seconds * (2**self._failures),
            ) * random.uniform(0.5, 1.0)
            self._failures = min(self._failures + 1, 30)
            if told_wait is not None and told_wait > delay:
                # A ban's end (or a 429's Retry-After) past the backoff's next step: asked again right then.
                # The backoff's steps came 17 s after a ban had ended (up to 30 s), the account's news polled
                # meanwhile (r82). Never sooner than the backoff: an end already past by our clock, the venue
                # still refusing, or a Retry-After of 0, tried again seven times a second (r83).
                delay = told_wait + random.uniform(0.05, 0.25)
            logger.warning("%s %s stream: %s; reconnecting in %.1fs", self.venue, self.name, reason, delay)
            await asyncio.sleep(delay)

    async def _receive(
        self, ws: aiohttp.ClientWebSocketResponse, on_message: Callable[[Any], Awaitable[None]]
    ) -> None:
        stall = self._settings.stall_seconds
        pinged = False
        while True:
            idle = time.monotonic() - self._idle_since
            if idle >= stall:
                raise Stalled()
            wait = (stall / 2 - idle) if not pinged and idle < stall / 2 else (stall - idle)
            try:
                message = await ws.receive(timeout=max(wait, 0.01))
            except TimeoutError:
                if not pinged and time.monotonic() - self._idle_since >= stall / 2:
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await self._ping(ws)
                    pinged = True
                continue
            if message.type in WS_CLOSED_TYPES:
                return
            self.last_message_at = self._idle_since = time.monotonic()
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
            # Not `asyncio.wait_for`: on Python 3.11 it drops a cancellation that lands once the event
            # fired but before this task resumed, and the reader polled on for ever.
            async with asyncio.timeout(poll_seconds):
                await watcher.ready.wait()
        watcher.ready.clear()
        marks, watcher.pending = watcher.pending, {}
        for mark in marks.values():
            if mark.timestamp > last_yielded.get(mark.symbol, -1.0):
                last_yielded[mark.symbol] = mark.timestamp
                yield mark


class MarkTopics:
    """The mark streams (Binance stream names, Bybit topics) the readers want, over one socket: how many
    readers want each, when each last spoke, when we last asked the venue for it, and the symbols read by
    REST while their stream is silent. The venue says how to ask (`subscribe` / `unsubscribe` send on the
    socket) and which symbols a set of silent streams stands for (`symbols_of`; None: every symbol)."""

    ALL = "*"  # in `fallback_symbols`: every symbol is read by REST

    def __init__(
        self,
        venue: str,
        socket: ReconnectingSocket,
        settings: StreamSettings,
        *,
        subscribe: Callable[[list[str]], Awaitable[None]],
        unsubscribe: Callable[[list[str]], Awaitable[None]],
        symbols_of: Callable[[list[str], frozenset[str] | None], list[str] | None],
        rest_marks: Callable[[Collection[str] | None], Awaitable[dict[str, MarkPrice]]],
        poll_seconds: float,
        on_rest_mark: Callable[[MarkPrice], None] | None = None,
    ) -> None:
        self._venue = venue
        self._socket = socket
        self._on_rest_mark = on_rest_mark
        self._settings = settings
        self._send_subscribe = subscribe
        self._send_unsubscribe = unsubscribe
        self._symbols_of = symbols_of
        self._rest_marks = rest_marks
        self._poll_seconds = poll_seconds
        self.wanted: dict[str, int] = {}  # name -> readers wanting it
        self.seen: dict[str, float] = {}  # name -> monotonic of its last data
        self.data_at: float | None = None  # monotonic of the last data on the socket (not a pong or an ack)
        self._asked: dict[str, float] = {}  # name -> monotonic of our last subscribe for it
        self._fallback_failure = SaidEvery(FALLBACK_FAILURE_SAID_EVERY_SECONDS)
        self.watchers: list[MarkWatcher] = []
        self.fallback_symbols: set[str] = set()

    async def watch(
        self,
        names: list[str],
        symbols: frozenset[str] | None,
        closed: Callable[[], bool],
        start: Callable[[], None],
    ) -> AsyncIterator[MarkPrice]:
        """One reader of `names` (filtered to `symbols`), from subscribing to releasing what it alone held."""
        watcher = MarkWatcher(symbols)
        self.watchers.append(watcher)
        added = [n for n in names if self.wanted.get(n, 0) == 0]
        for name in names:
            self.wanted[name] = self.wanted.get(name, 0) + 1
            self.seen.setdefault(name, time.monotonic())
        start()
        if added:
            await self.subscribe(added)

        def stale() -> list[str]:
            silent = self._stale(names)
            if not silent:
                self.fallback_symbols.difference_update(symbols or {self.ALL})
            return silent

        async def fallback(silent: list[str]) -> None:
            await self._fallback(silent, symbols, watcher)

        try:
            async for mark in fresh_marks(
                watcher, closed=closed, stale=stale, fallback=fallback, poll_seconds=self._poll_seconds
            ):
                yield mark
        finally:
            self.watchers.remove(watcher)
            released = []
            for name in names:
                self.wanted[name] -= 1
                if self.wanted[name] == 0:
                    del self.wanted[name]
                    released.append(name)
            if released and not closed():
                await self._send_unsubscribe(released)

    def _stale(self, names: list[str]) -> list[str]:
        now = time.monotonic()
        limit = self._settings.stale_mark_seconds
        return [n for n in names if not self._socket.connected or now - self.seen.get(n, 0.0) >= limit]

    async def _fallback(self, stale: list[str], symbols: frozenset[str] | None, watcher: MarkWatcher) -> None:
        """Marks by REST while their stream is silent; ask the venue for the stream again."""
        if self._socket.connected:
            now = time.monotonic()
            again = [n for n in stale if now - self._asked.get(n, 0.0) >= self._settings.stale_mark_seconds]
            if again:
                logger.warning(
                    "%s marks stream: %d stream(s) silent; subscribing again", self._venue, len(again)
                )
                await self.subscribe(again)
        wanted = self._symbols_of(stale, symbols)
        self.fallback_symbols.update(wanted if wanted is not None else {self.ALL})
        try:
            marks = await self._rest_marks(wanted)
        except ExchangeError as error:
            # Said once a minute while it lasts: a ban refused it every second, 116 times in a row.
            logger.log(
                self._fallback_failure.level(time.monotonic()),
                "%s marks: REST fallback failed (%s); marks go stale",
                self._venue,
                type(error).__name__,
            )
            return
        self._fallback_failure.ended()
        for mark in marks.values():
            if self._on_rest_mark is not None:
                self._on_rest_mark(mark)
            watcher.offer(mark)

    async def subscribe(self, names: list[str]) -> None:
        now = time.monotonic()
        for name in names:
            self._asked[name] = now
        await self._send_subscribe(names)

    def reopened(self) -> list[str]:
        """A new connection: what to ask for (all that is wanted, including what was asked for while
        disconnected), each given half the staleness limit to speak before it counts as silent."""
        names = sorted(self.wanted)
        now = time.monotonic()
        for name in names:
            self.seen[name] = max(self.seen.get(name, 0.0), now - self._settings.stale_mark_seconds / 2)
        return names

    def heard(self, name: str, now: float) -> None:
        """Data of stream `name` came now (monotonic)."""
        self.seen[name] = now
        self.data_at = now

    def offer(self, mark: MarkPrice) -> None:
        for watcher in self.watchers:
            watcher.offer(mark)

    def close(self) -> None:
        for watcher in self.watchers:
            watcher.ready.set()  # the readers see the venue closed at once

    def state(self, engine_clock: Callable[[float | None], float | None]) -> StreamState:
        detail = self._socket.detail
        if self.fallback_symbols:
            # (the all-market stream's silence: every symbol is read by REST, not "1 symbol(s)")
            polled = (
                "every symbol"
                if self.ALL in self.fallback_symbols
                else counted(len(self.fallback_symbols), "symbol")
            )
            detail = f"REST polling for {polled}" + (f"; {detail}" if detail else "")
        return StreamState(
            name="marks",
            connected=self._socket.connected,
            # Its last data, not the socket's last frame: pongs and acks kept "marks up 0.5s ago" and the
            # metric young through 26 s of a subscription dropped again and again while the newest mark
            # aged (a reviewer; the prices component said that age, the stream's words did not).
            last_event_at=engine_clock(self.data_at),
            reconnects=self._socket.reconnects,
            subscriptions=len(self.wanted),
            detail=detail,
        )


def _venue_wait(error: ExchangeError) -> float | None:
    """Seconds until the venue takes requests again, as its refusal said (None: it did not say)."""
    if isinstance(error, Banned):
        return max(0.0, error.until - time.time())
    if isinstance(error, RateLimited):
        return max(0.0, error.retry_after)
    return None


def _failure_words(error: Exception) -> str:
    """An exchange error's class in words: `RateLimited` → "rate limited"."""
    name = type(error).__name__
    return "".join(f" {c.lower()}" if c.isupper() else c for c in name).strip()

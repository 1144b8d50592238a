"""Signals in, waves out.

Every signal, whichever its origin, goes through `monitoring.signals`: the sim generator inserts rows like
any outside process would, and one consumer claims them. So every signal ends with a status and a reason in
the same place, and `tsbot signals add` drives a running engine exactly as the generator does.

The consumer wakes on `NOTIFY tsbot_signals` (a dedicated connection) and also polls, so a lost notification
or a dropped listener connection delays a signal by at most the poll interval, never loses it. Signals
arriving within `wave_window_ms` of the first one form one wave.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import asyncpg

from engine.clock import Clock, wait_event, with_timeout
from engine.words import counted
from storage.database import DatabaseDown, close_within, listening_connection
from storage.repositories import SignalRecord, Store

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "tsbot_signals"
MAX_WAVE_SIGNALS = 500
# Connect and LISTEN, as a whole: a server that stopped answering must not hold the consumer.
LISTEN_SETUP_TIMEOUT_SECONDS = 10.0
LISTEN_CLOSE_TIMEOUT_SECONDS = 2.0
PUT_BACK_SECONDS = 2.0  # how long a stop waits for the signals of an unrun wave to be put back


@dataclass(frozen=True, slots=True)
class SignalWave:
    signals: tuple[SignalRecord, ...]


class SignalConsumer:
    """Claims new rows of `monitoring.signals` and yields them grouped into waves."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        listen_dsn: str | None,
        listen_password: str | None = None,
        wave_window_seconds: float = 0.5,
        poll_interval_seconds: float = 0.5,
        claimed_by: str | None = None,
        on_listen_attempted: Callable[[], None] = lambda: None,
    ):
        self._claimed_by = claimed_by
        self._store = store
        self._clock = clock
        self._listen_dsn = listen_dsn
        self._listen_password = listen_password
        self._window = wave_window_seconds
        self._poll = poll_interval_seconds
        self._wake = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        self.listening = False
        self.listener_connections = 0  # how many times LISTEN was (re)established
        self.listen_attempted = False  # health must not call LISTEN "down" before it was ever tried
        # Told once the first attempt has an outcome: the health check measures the signals then (it said
        # "not measured yet", and `tsbot status` UNKNOWN, for the 5 s after every start).
        self._on_listen_attempted = on_listen_attempted
        self._listen_failure_said = False  # one warning per time LISTEN is unavailable, not one per poll
        self._other_channels: dict[str, Callable[..., None]] = {}
        # A claim, or the wave after it, failed (the database away): signals may be taken and in nobody's
        # hands. The next pass takes them again before anything new.
        self._unsettled = False
        self._claiming = True  # False once the engine stops: nothing more is claimed

    def stop_claiming(self) -> None:
        """The engine is stopping: no signal is claimed from now on, and those the wave window holds go
        back untouched, for the next engine (a stop claims no new signal)."""
        self._claiming = False
        self._wake.set()

    def wave_failed(self) -> None:
        """The wave last yielded was not handled to its end: its signals not handled yet are taken again."""
        self._unsettled = True

    async def waves(self) -> AsyncIterator[SignalWave]:
        try:
            while True:
                await self._ensure_listener()
                # Cleared before claiming: a NOTIFY arriving while the claim runs must wake the next wait.
                self._wake.clear()
                try:
                    signals = await self._claim()
                except Exception:
                    self._unsettled = True
                    raise
                if signals:
                    yield SignalWave(signals=tuple(signals))
                else:
                    await self._wait_for_signals()
        finally:
            await self._close_listener()

    async def _claim(self) -> list[SignalRecord]:
        """The next wave's signals: first those a failed claim or wave left taken, else the new ones that
        arrive within the wave window of the first."""
        if not self._claiming:  # (stopping: not even a failed wave's signals, which the stop would refuse)
            return []
        if self._unsettled and self._claimed_by is not None:
            left = await self._store.reclaim_signals(self._claimed_by)
            self._unsettled = False
            if left:
                log.warning(
                    "signals: %d claimed when the database stopped answering were handled by no wave; "
                    "taken again now",
                    len(left),
                )
                return left
        first = await self._claim_new(MAX_WAVE_SIGNALS)
        if not first:
            return []
        try:
            if self._window > 0:
                await self._clock.sleep(self._window)
            if not self._claiming:
                await self._put_back(first)
                return []
        except asyncio.CancelledError:  # stopped inside the window (the engine's stop cancels this loop)
            await self._put_back(first)
            raise
        try:
            rest = await self._claim_new(MAX_WAVE_SIGNALS - len(first))
        except asyncio.CancelledError:
            await self._put_back(first)
            raise
        return first + rest

    async def _claim_new(self, most: int) -> list[SignalRecord]:
        """Claim up to `most` new signals. Stopped while the claim runs (its transaction may have committed
        with the answer still on its way), what it took goes back: a stop at that instant left them
        `taken` with no wave (seen in full test runs)."""
        claiming = asyncio.ensure_future(self._store.claim_new_signals(most, self._claimed_by))
        try:
            return await asyncio.shield(claiming)
        except asyncio.CancelledError:
            try:
                taken = await with_timeout(self._clock, PUT_BACK_SECONDS, asyncio.shield(claiming))
            except Exception:  # (no answer in time, or the claim failed: nothing to put back that we know of)
                claiming.cancel()
                taken = []
            if taken:
                await self._put_back(taken)
            raise

    async def _put_back(self, signals: list[SignalRecord]) -> None:
        """Signals claimed for a wave that will not run: back to `new` (bounded: a stop does not wait on a
        database that does not answer; then the next start settles them as claimed by a stopped engine)."""
        try:
            put_back = await with_timeout(
                self._clock,
                PUT_BACK_SECONDS,
                self._store.release_signals([s.id for s in signals], self._claimed_by),
            )
        except (TimeoutError, OSError, asyncpg.PostgresError, DatabaseDown) as exc:
            log.warning(
                "signals: %d claimed signals not put back (%s); the next start settles them",
                len(signals),
                exc,
            )
            return
        if put_back:
            log.info(
                "signals: %d claimed in the wave window put back for the next engine (stopping)", put_back
            )

    async def _wait_for_signals(self) -> None:
        await wait_event(self._clock, self._wake, self._poll)

    async def _ensure_listener(self) -> None:
        if self._listen_dsn is None or (self._listener is not None and not self._listener.is_closed()):
            return
        self.listening = False
        try:
            self._listener = await listening_connection(
                self._listen_dsn,
                self._listen_password,
                {NOTIFY_CHANNEL: self._on_notify, **self._other_channels},
                within=LISTEN_SETUP_TIMEOUT_SECONDS,
            )
            self._listener.add_termination_listener(self._on_listener_lost)
            self.listening = True
            self.listener_connections += 1
            if self._listen_failure_said:
                self._listen_failure_said = False
                log.info("signals: LISTEN %s is back", NOTIFY_CHANNEL)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            # Polling carries on; the next pass retries the listener.
            log.log(
                logging.DEBUG if self._listen_failure_said else logging.WARNING,
                "signals: LISTEN %s unavailable, polling every %.1fs: %s",
                NOTIFY_CHANNEL,
                self._poll,
                exc,
            )
            self._listen_failure_said = True
            self._listener = None
        finally:
            # Only once the first attempt has an outcome: while it is in flight LISTEN is not "down".
            if not self.listen_attempted:
                self.listen_attempted = True
                self._on_listen_attempted()

    def also_listen(self, channel: str, callback: Callable[..., None]) -> None:
        """Another channel on the same dedicated LISTEN connection (one per engine); call it before `waves()`
        runs (the channels are added when the connection is made). Whoever listens also polls: the
        connection may be down."""
        self._other_channels[channel] = callback

    def _on_notify(self, *_args: object) -> None:
        self._wake.set()

    def _on_listener_lost(self, *_args: object) -> None:
        self.listening = False
        log.warning("signals: LISTEN connection lost; polling until it is back")
        self._wake.set()

    async def _close_listener(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            self._listener.remove_termination_listener(self._on_listener_lost)  # our own close is no loss
            await close_within(self._listener, within=LISTEN_CLOSE_TIMEOUT_SECONDS)
        self._listener = None


class SimSignalGenerator:
    """A seeded stand-in for the operator's signal provider: `wave_size` signals on random symbols every
    `wave_interval` seconds (the first wave at once), inserted into `monitoring.signals`."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        symbols: Sequence[str],
        *,
        wave_size: int,
        wave_interval_seconds: float,
        seed: int,
    ):
        if not symbols:
            raise ValueError("the sim signal generator needs at least one symbol")
        self._store = store
        self._clock = clock
        self._symbols = sorted(symbols)
        self._wave_size = min(wave_size, len(self._symbols))
        self._interval = wave_interval_seconds
        self._random = random.Random(seed)
        self.waves_generated = 0

    def next_wave(self) -> list[tuple[str, str]]:
        symbols = self._random.sample(self._symbols, self._wave_size)
        return [(symbol, self._random.choice(("long", "short"))) for symbol in symbols]

    async def run(self) -> None:
        while True:
            wave = self.next_wave()
            await self._store.insert_signals(
                [(symbol, side, None, None) for symbol, side in wave], for_account=True
            )
            self.waves_generated += 1
            log.info("sim signals: wave %d of %s", self.waves_generated, counted(len(wave), "signal"))
            await self._clock.sleep(self._interval)

"""The engine's reader of the venue's account stream: one named, supervised loop.

Reads `venue.watch_account()` and hands every event to the protection manager of the moment
(`protection.stream_events.route_account_event`; a `restart_protection` swaps the manager, the reader
stays, and holds the events that arrive meanwhile until the new manager has restored its guards). A venue without account stream ends the iteration at once: the engine then learns of fills and
cancels by polling only (the reconciler every `reconcile_seconds`), said once in the log. A stream that
ends after it had delivered is read again after a pause, with a reconcile pass in between (what it missed
is not replayed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from engine.clock import Clock
from engine.exchange.port import AccountEvent, ExchangePort, StreamGap
from protection.manager import ProtectionManager
from protection.stream_events import route_account_event

log = logging.getLogger(__name__)

RESUBSCRIBE_SECONDS = 1.0


class AccountStreamReader:
    def __init__(
        self,
        venue: ExchangePort,
        manager: Callable[[], ProtectionManager | None],
        clock: Clock,
        *,
        reconcile_seconds: float,
        protection_ready: asyncio.Event | None = None,
        unrouted: Callable[[AccountEvent], None] | None = None,
    ) -> None:
        self._venue = venue
        # Told of every event no guard took: an entry's own fill, which settles an entry of unknown outcome.
        self._unrouted = unrouted
        self._manager = manager
        # Cleared while the protection manager restarts: an event then waits until the new manager guards
        # its positions (routed before, it found "no position we guard" and was lost).
        self._protection_ready = protection_ready
        self._clock = clock
        self._reconcile_seconds = reconcile_seconds
        self.events_read = 0
        self.gaps_read = 0  # the stream's own word that it may have lost events (held or routed)
        self.events_routed = 0
        self.streaming = False  # the venue's account stream is being read
        self.polling_only = False  # the venue has no account stream

    async def run(self) -> None:
        while True:
            received = 0
            self.streaming = True
            try:
                async for event in self._venue.watch_account():
                    received += 1
                    self.events_read += 1
                    if isinstance(event, StreamGap):
                        self.gaps_read += 1
                    ready = self._protection_ready
                    if ready is not None and not ready.is_set():
                        await ready.wait()
                    manager = self._manager()
                    if manager is not None and route_account_event(manager, event):
                        self.events_routed += 1
                    elif self._unrouted is not None:
                        self._unrouted(event)
            finally:
                self.streaming = False
            if received == 0:
                self.polling_only = True
                log.info(
                    "%s has no account stream: fills, fired and cancelled stops are learned by polling only "
                    "(the reconciler every %gs)",
                    self._venue.name,
                    self._reconcile_seconds,
                )
                return
            log.warning(
                "account stream of %s ended; reading the venue now and subscribing again in %gs",
                self._venue.name,
                RESUBSCRIBE_SECONDS,
            )
            manager = self._manager()
            if manager is not None:
                manager.request_reconcile()
            await self._clock.sleep(RESUBSCRIBE_SECONDS)

"""The venue's account events, turned into facts for the guards that own them.

The account stream is the primary path (a fired stop is known in milliseconds, not at the next reconcile
pass); the reconciler stays the safety net. This module decides only *whose* fact an event is and hands it
over (`guard.submit(...)`): each guard's own task applies it, in order, between its protection passes, so
nothing here writes a guard's state (a checker reports facts, the owner applies them).

* `OrderUpdate` of an order carrying our token → the guard of the position its id names (a close's end
  straight to the close in flight, which waits for it in the guard's own task). Ids of other
  installations are never touched; a stop of ours that no guard holds (left from an ended position) and
  that filled asks for a reconcile pass (its orphan logic cancels what is left). A stop's NEW is kept as
  the venue's word that it is live (`ProtectionManager.streamed_live`), and wakes its guard when that stop
  is not confirmed yet (its answer late or lost, a move left in flight by a restart): before, such a stop
  waited out the venue's read lag (5 s on Binance) to be found, its position uncovered meanwhile.
* `PositionUpdate` → the guard holding that symbol, for its side; a row of the other side (hedge mode's
  idle side, or a one-way flip) only asks for a reconcile pass.
* `StreamGap` → a reconcile pass at once: what the stream missed is read from the venue; unread within the
  grace period, the stops confirmed before the gap are in doubt (`ProtectionManager.stream_gap`).
"""

from __future__ import annotations

import logging
from decimal import Decimal

from engine.clock import monotonic_of
from engine.exchange.port import (
    AccountEvent,
    LeverageChanged,
    OrderStatus,
    OrderUpdate,
    PositionUpdate,
    StreamGap,
)
from protection.manager import ProtectionManager, StreamOrderUpdate, StreamPositionUpdate
from protection.order_ids import parse_client_order_id
from storage.repositories import OrderPurpose

log = logging.getLogger(__name__)

_ZERO = Decimal(0)
_STOPS = (OrderPurpose.STOP_LOSS, OrderPurpose.TRAILING_STOP)


def route_account_event(manager: ProtectionManager, event: AccountEvent) -> bool:
    """Hand `event` to the guard it concerns (or ask for a reconcile pass); True when someone took it."""
    if manager.stopped:
        return False  # a manager being replaced: the new one reconciles when it starts
    if isinstance(event, LeverageChanged):
        manager.leverage_changed(event.symbol, event.leverage)
        return True
    if isinstance(event, StreamGap):
        log.info("account stream: %s (events since then may be lost); reading the venue now", event.reason)
        clock = manager.clock
        manager.stream_gap(monotonic_of(clock, event.since))
        return True
    if isinstance(event, OrderUpdate):
        order = event.order
        key = parse_client_order_id(order.client_order_id, manager.token)
        if key is None:
            if manager.other_installation_sent(order.client_order_id):
                # Another installation's order (its entry, say): its position on the symbol is its own, never
                # adopted here, even when the venue tells of it before its stops are placed.
                manager.other_installation_symbols.add(order.symbol)
            return False  # not ours: never touched
        kept = key.purpose in _STOPS and manager.note_streamed(order)
        guard = manager.guards.get(key.position_id)
        if order.status is OrderStatus.NEW:
            return kept and guard is not None and guard.hear_live(order.client_order_id)
        if guard is None or guard.closed:
            if order.status is OrderStatus.FILLED and key.purpose in _STOPS:
                # A stop of ours that no guard holds (left from an ended position) filled: it acted on
                # whatever the symbol holds now. The reconciler reads the venue and cancels what is left.
                log.warning(
                    "account stream: our %s %s on %s, of no position we guard, filled; reading the venue now",
                    key.purpose.value,
                    order.client_order_id,
                    order.symbol,
                )
                manager.request_reconcile()
                # Its position's record, closed for want of evidence (the stop unreadable then), takes it.
                manager.settle_exit_soon(key.position_id, key.purpose, order)
                return True
            return False
        if key.purpose is OrderPurpose.CLOSE:  # its own call waits for it, in the guard's task
            return guard.hear_close(order)
        guard.submit(StreamOrderUpdate(order=order, event_time=event.event_time))
        return True
    if isinstance(event, PositionUpdate):
        guard = manager.by_symbol.get(event.symbol)
        if not event.quantity:
            manager.streamed_liquidation.pop(event.symbol, None)
            manager.sized_unguarded.pop(event.symbol, None)
        elif guard is None or guard.closed:
            manager.sized_unguarded[event.symbol] = (event.side, event.quantity)
        if event.quantity and event.liquidation_price is not None and (guard is None or guard.closed):
            # The fill's size, pushed before its entry's answer made a guard: its liquidation price is
            # kept for the guard to come (`ProtectionManager.protect`).
            manager.streamed_liquidation[event.symbol] = (
                event.side,
                event.liquidation_price,
                event.event_time,
            )
        if guard is None or guard.closed:
            if guard is not None and event.quantity:  # (adopted at its end: `ProtectionManager.forget`)
                guard.adopt_after_end = True
            return False  # (the engine asks for a pass: a position nobody guards, `Engine._entry_streamed`)
        if event.side is not guard.side:
            # The other side's row: in hedge mode it says nothing about ours (a zero-size short row next to
            # our long was taken for "flat" and let one glitchy read close a live position); in one-way
            # mode a size there means ours flipped. Either way the venue's own read settles it.
            manager.request_reconcile()
            return True
        guard.submit(
            StreamPositionUpdate(
                quantity=event.quantity,
                event_time=event.event_time,
                liquidation_price=event.liquidation_price,
            )
        )
        return True
    return False

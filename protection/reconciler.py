"""The reconciler: the venue is the truth; the database and the guards are brought in line with it.

Every `protection.reconcile_seconds` (and whenever a guard asks):

* a confirmed stop of ours that is no longer open on the venue is un-confirmed and the guard re-protects
  (the DB must never keep claiming a stop the exchange does not have, F4);
* a position we track that the venue no longer has is closed in the database, with the reason taken from
  our filled stop (`stop_loss` / `trailing_stop`) and its realized PnL; without such evidence it must be
  missing twice in a row before we believe it;
* a position the venue has and we do not is adopted (recorded and protected);
* an open order carrying our client-id token that belongs to no live position, or is not the current
  order of its position, is cancelled (an orphan or a duplicate, F6). Orders without our token are never
  touched.

An empty position list in the first seconds after connecting is "unknown", not "no positions" (F3): the
venue has been seen to answer `[]` at start-up, and believing it would close every position we hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from engine.clock import Clock, monotonic_of
from engine.exchange.errors import ExchangeError, NotFound
from engine.exchange.port import ExchangePort, Order, OrderStatus, VenuePosition
from engine.pacing import Lane
from engine.words import counted
from protection.manager import (
    LiquidationStated,
    OrderMissing,
    PositionGone,
    PositionGuard,
    PositionHeld,
    ProtectionManager,
    QuantityChanged,
    record_status_of,
    stop_words,
)
from protection.order_ids import parse_client_order_id
from storage.repositories import LIVE_ORDER_STATUSES, OrderPurpose, OrderRecordStatus, Severity, Store

log = logging.getLogger(__name__)

MISSING_CHECKS_PER_PASS = 20  # positions missing from the venue's list that one pass looks into
ACCOUNTS_READ_SECONDS = 2.0  # the read of whose orders of ours without a guard are, at most
ENDED_BEFORE_MARGIN_SECONDS = (
    0.01  # an order answered ended this much before our cancel was asked ended before it
)


# The exit reason of a position found closed by a close order of ours whose guard never heard its answer
# (what it was closing for — the operator, a stuck stop — went with the guard).
CLOSED_AT_MARKET = "closed_at_market"
# Why a position left the venue, by the purpose of the order of ours that filled (a stop-loss otherwise).
_EXIT_REASONS = {OrderPurpose.TRAILING_STOP: "trailing_stop", OrderPurpose.CLOSE: CLOSED_AT_MARKET}
# Our orders that may have closed a position: those that may be live, and those recorded filled.
_EXIT_CANDIDATE_STATUSES = LIVE_ORDER_STATUSES | {OrderRecordStatus.FILLED}


@dataclass(frozen=True, slots=True)
class _ExitEvidence:
    """What the venue tells of why a position left it (`reason`, `price`: one of our current orders
    filled: the position is gone), or, without that, the reason and price the latest fill of ours recorded
    earlier gives (`recorded`, `recorded_price`): they say why once the venue says the position is flat,
    which such a fill does not prove."""

    reason: str | None = None
    price: Decimal | None = None
    recorded: str | None = None
    recorded_price: Decimal | None = None
    # Orders of ours the venue said it does not know while its read lag after their send still runs: one of
    # them may be the fill that ended the position.
    unreadable: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class VenueSnapshot:
    """What the venue holds, read once: its positions and our open protective orders, asked for together
    at `taken_at` (monotonic)."""

    positions: list[VenuePosition]
    open_orders: list[Order]
    taken_at: float
    # Why this read's listing stood on part of the venue's reads ("" when it read them all): the venue's
    # `listing_unchecked` as the listing ended (Bybit's positions' fields without the stop orders' list).
    unchecked: str = ""

    def open_orders_by_id(self) -> dict[str, Order]:
        return {o.client_order_id: o for o in self.open_orders}


@dataclass(slots=True)
class ReconcileReport:
    skipped: str | None = None
    closed: list[str] = field(default_factory=list)
    reprotected: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    orphans_cancelled: list[str] = field(default_factory=list)
    # Left out of the venue's list but held when asked alone (a list that lost them): kept, said once.
    kept: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.closed or self.reprotected or self.adopted or self.orphans_cancelled)


class Reconciler:
    def __init__(
        self,
        *,
        manager: ProtectionManager,
        venue: ExchangePort,
        store: Store,
        clock: Clock,
        connected_at: float,
        startup_unknown_seconds: float,
        # Adopt a position the venue holds that no record of ours tracks; with it, every position the venue
        # holds on its symbol, as read for the symbol alone.
        adopt: Callable[[VenuePosition, Sequence[VenuePosition]], Awaitable[None]],
        entries_in_flight: Callable[[], set[str]],
    ):
        self._manager = manager
        self._venue = venue
        self._store = store
        self._clock = clock
        self._connected_at = connected_at
        self._startup_unknown = startup_unknown_seconds
        # The last pass's listing's `VenueSnapshot.unchecked`: whether that pass checked every stop.
        self.last_unchecked = ""
        self._adopt = adopt
        self._entries_in_flight = entries_in_flight
        self._absent_once: set[int] = set()
        # This pass's orders of ours without a guard whose positions' accounts could not be read (the
        # database down): whose they are is unknown, so none of them is cancelled as an orphan.
        self._unattributed: set[str] = set()
        self.runs = 0

    async def take_snapshot(self, lane: Lane = Lane.READ) -> VenueSnapshot:
        """The venue's positions and open protective orders, both asked for at once (two requests in
        flight together, one round trip)."""
        manager = self._manager
        taken_at = self._clock.monotonic()
        unchecked = ""

        async def listing() -> list[Order]:
            nonlocal unchecked
            orders = await manager.read(self._venue.fetch_open_protective_orders, "fetch_open_orders", lane)
            unchecked = getattr(self._venue, "listing_unchecked", "")  # as this listing left it
            return orders

        positions, open_orders = await asyncio.gather(
            manager.read(self._venue.fetch_positions, "fetch_positions", lane), listing()
        )
        return VenueSnapshot(list(positions), list(open_orders), taken_at, unchecked)

    async def reconcile_once(self, snapshot: VenueSnapshot | None = None) -> ReconcileReport:
        manager = self._manager
        report = ReconcileReport()
        if snapshot is None:
            snapshot = await self.take_snapshot()
        self.last_unchecked = snapshot.unchecked
        snapshot_at = snapshot.taken_at
        positions, open_orders = snapshot.positions, snapshot.open_orders
        self.runs += 1
        # Stops on the account that are not ours (the operator's, another client's) fill the venue's cap on
        # open conditional orders too: counted where new positions are admitted (`Engine._no_room_for_stops`).
        manager.foreign_stops_seen = sum(
            1 for o in open_orders if parse_client_order_id(o.client_order_id, manager.token) is None
        )
        manager.saw_other_installations(open_orders)
        young = self._clock.monotonic() - self._connected_at < self._startup_unknown
        if not positions and manager.guards and young:
            # Right after connecting an empty answer may be a venue glitch (F3): only a position whose own
            # stop filled (conclusive evidence) is closed; the rest are left alone.
            report.skipped = "the venue reported no positions right after connecting; treated as unknown"
            log.warning(
                "reconcile: %s (%s tracked)", report.skipped, counted(len(manager.guards), "position")
            )
            said_gone: list[PositionGuard] = []
            for guard in list(manager.guards.values()):
                if not guard.closed and guard.exit_evidence is not None:
                    guard.submit(
                        PositionGone(
                            exit_reason=guard.exit_evidence.exit_reason,
                            exit_price=guard.exit_evidence.exit_price,
                        )
                    )
                    report.closed.append(guard.symbol)
                elif not guard.closed and guard.said_gone_at is not None:
                    said_gone.append(guard)
            # The venue's own word on a position (a stop refused for reducing nothing, its stops deactivated
            # after the stream said flat): its symbol is asked alone (the list's emptiness closes nothing).
            if not manager.stopped:
                await asyncio.gather(*(self._position_missing(g, report) for g in said_gone))
            return report

        on_venue = {p.symbol: p for p in positions}
        manager.leverage_seen.update((p.symbol, p.leverage) for p in positions)
        open_by_id = {o.client_order_id: o for o in open_orders}
        missing: list[PositionGuard] = []
        checked: set[str] = set()  # our stops this listing was checked against (found, or told missing)
        for guard in list(manager.guards.values()):
            if guard.closed or guard.filled_at >= snapshot_at:
                continue  # (filled after the venue was asked: the list could not show it)
            venue_position = on_venue.get(guard.symbol)
            if venue_position is None or venue_position.side.value != guard.side.value:
                missing.append(guard)
            else:
                self._absent_once.discard(guard.position_id)
                if guard.exit_evidence is not None or guard.said_gone_at is not None:
                    guard.submit(PositionHeld(seen_at=snapshot_at))
                if venue_position.quantity != guard.quantity:
                    guard.submit(QuantityChanged(quantity=venue_position.quantity, seen_at=snapshot_at))
                liquidation = venue_position.liquidation_price
                if liquidation is not None:
                    guard.liquidation_price = liquidation
                    if guard.stop_limit_for_liquidation(liquidation) is not None:
                        guard.submit(LiquidationStated(price=liquidation))
                checked |= self._check_orders(guard, open_by_id, report, snapshot_at)
        manager.venue_listed(snapshot_at, checked)
        # Each missing position costs look-ups (its stops, its symbol alone): a list that lost everything
        # at once must not turn into a storm of reads. Those already seen missing once go first.
        # They are independent: looked into together (one after another took three reads per position).
        missing.sort(key=lambda g: (g.position_id not in self._absent_once, g.position_id))
        if not manager.stopped:
            await asyncio.gather(
                *(self._position_missing(g, report) for g in missing[:MISSING_CHECKS_PER_PASS])
            )
        if report.kept:  # one line a pass, not one per position (a list answering [] left out 20 at once)
            log.warning(
                "reconcile: the venue's list left out %s it still holds when asked alone (%s); kept",
                counted(len(report.kept), "position"),
                ", ".join(sorted(report.kept)),
            )

        await self._note_other_identities(open_orders)
        tracked = {g.symbol for g in manager.guards.values()} | self._entries_in_flight()
        # A position another installation of this program protects (its stops live on the symbol) is that
        # engine's: adopted, it got a second pair of stops from here (two databases, one account).
        manager.other_installation_symbols &= set(on_venue)  # (its position there ended: forgotten)
        tracked |= manager.other_installation_symbols
        # Positions to adopt and stale orders to cancel are each independent: together, not one round
        # trip after another (15 orphans took 0.8 s one by one in the chaos soak).
        # Each runs to its end whatever the others do (an exception of one, a database error say, must not
        # leave the others running on with nobody waiting for them); the first exception is raised after.
        outcomes = await asyncio.gather(
            *(
                self._adopt_if_held(venue_position, report)
                for symbol, venue_position in on_venue.items()
                if symbol not in tracked and symbol in manager.markets
            ),
            return_exceptions=True,
        )
        outcomes += await asyncio.gather(
            *(self._cancel_if_stale(order, report) for order in open_orders), return_exceptions=True
        )
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        for extra in failures[1:]:
            log.warning("reconcile: another step of this pass failed too: %r", extra)
        if failures:
            raise failures[0]
        if report.changed:
            log.info(
                "reconcile: closed %s, re-protected %s, adopted %s, orphans cancelled %s",
                report.closed or "-",
                report.reprotected or "-",
                report.adopted or "-",
                report.orphans_cancelled or "-",
            )
        return report

    async def _still_held(self, seen: VenuePosition) -> list[VenuePosition] | None:
        """The symbol's positions as the venue, asked about it alone now, holds them, if it still holds the
        one a list showed; else None."""
        try:
            alone = await self._manager.read(
                lambda: self._venue.fetch_positions(seen.symbol), "fetch_positions", Lane.READ
            )
        except (ExchangeError, TimeoutError) as exc:
            log.warning("reconcile: %s not adopted this pass, its own read failed (%s)", seen.symbol, exc)
            return None
        held = [p for p in alone if p.symbol == seen.symbol and p.quantity > 0]
        if not any(p.side is seen.side for p in held):
            log.info(
                "reconcile: %s was in the list but is flat when asked alone: nothing to adopt", seen.symbol
            )
            return None
        return held

    def _check_orders(
        self, guard: PositionGuard, open_by_id: dict[str, Order], report: ReconcileReport, snapshot_at: float
    ) -> set[str]:
        """Check the guard's confirmed stops against the listing; the ids it checked."""
        checked: set[str] = set()
        if guard.close_sent:
            # Our own close at market has gone: its stops going is the close's doing (Bybit clears a
            # closing position's stops; the sibling is cancelled), not protection lost. It was said as an
            # ERROR, "re-protecting", during an operator's flatten; a close that fails re-checks its stops.
            # (Not while the close still waits for its turn, a 429's hold say: its stops are still its cover.)
            return checked
        lag = self._manager.read_after_write_seconds
        for order in guard.watched_stops:
            cid = order.client_order_id
            if order.unverified and cid in open_by_id and snapshot_at - lag >= order.doubted_at:
                # In doubt and listed live by a listing that saw the venue as of after the doubt came: the
                # venue's word, taken by its guard's next look (not only its look-up by id).
                self._manager.note_listed(open_by_id[cid], snapshot_at)
                guard.wake.set()
                continue
            if not order.confirmed or order.client_order_id is None:
                continue
            checked.add(order.client_order_id)
            if order.confirmed_at >= snapshot_at - self._manager.read_after_write_seconds:
                # Confirmed after the venue was asked, or so shortly before that the venue's lagging
                # reads may not list it yet: its absence from the answer proves nothing. Its confirmation
                # is as fresh as the listing (counted checked: doubted, every stop a restart had just
                # placed on a venue with a read lag was uncovered again, a false span each).
                continue
            if order.client_order_id in open_by_id:
                self._manager.note_placed(open_by_id[order.client_order_id])
                continue
            # Confirmed by us, absent from the venue's list: it triggered, was cancelled by hand or expired
            # (or the list left it out: a glitch, a read lagging past the one we count on). Uncovered from
            # now: the guard looks it up by id (unverified meanwhile), and says protection lost once the
            # venue says it ended, or it lets it go unsettled (`PositionGuard._missed_gone`). Said lost here,
            # a live stop a listing left out was an ERROR, an event and an alert for a stop that never left.
            log.warning(
                "reconcile: %s of %s (%s) is not in the venue's list of open orders; uncovered until its "
                "look-up by id says whether it is live",
                stop_words(order.purpose),
                guard.symbol,
                order.client_order_id,
            )
            guard.submit(OrderMissing(client_order_id=order.client_order_id, seen_at=snapshot_at))
            report.reprotected.append(guard.symbol)
        return checked

    async def _position_missing(self, guard: PositionGuard, report: ReconcileReport) -> None:
        """A position we guard is not in the venue's list. Flat only on evidence: one of our stops filled,
        or — asked for its own symbol, twice in a row (or once after its account stream said flat) — the
        venue says it holds nothing there. A list that
        lost every position at once (a venue glitch) therefore closes nothing, and no stop is cancelled
        before its position is confirmed flat."""
        # Its stops and its symbol alone are asked about together; the symbol's answer counts only
        # without exit evidence.
        asked_at = self._clock.monotonic()
        evidence, alone = await asyncio.gather(
            self._exit_evidence(guard),
            self._manager.read(
                lambda: self._venue.fetch_positions(guard.symbol), "fetch_positions", Lane.READ
            ),
            return_exceptions=True,
        )
        if isinstance(evidence, BaseException):
            raise evidence
        exit_reason, exit_price = evidence.reason, evidence.price
        if exit_reason is None:
            if isinstance(alone, ExchangeError | TimeoutError):
                log.warning(
                    "reconcile: %s missing from the list, its own read failed (%s)", guard.symbol, alone
                )
                return
            if isinstance(alone, BaseException):
                raise alone
            if any(p.side.value == guard.side.value for p in alone):
                report.kept.append(guard.symbol)
                self._absent_once.discard(guard.position_id)
                if guard.said_gone_at is not None:
                    guard.submit(PositionHeld(seen_at=asked_at))
                return
            # The venue, asked for this symbol alone, holds it the other way: no glitch's empty answer (what
            # the second look guards against) but its word that this position is over, and that another one
            # is there to protect: it ends now, and that one is adopted once it has (r77: turned by hand
            # while no engine ran, the short sat 10 s without a stop, counted nowhere).
            turned = any(p.quantity > 0 and p.side.value != guard.side.value for p in alone)
            # Twice in a row — or once, when the venue's account stream already said this position went
            # flat, or the venue said it was gone (`said_gone_at`): two answers of the venue, independent of
            # each other.
            if (
                not turned
                and guard.position_id not in self._absent_once
                and guard.venue_flat_at is None
                and guard.said_gone_at is None
            ):
                self._absent_once.add(guard.position_id)
                return
            exit_reason, exit_price = evidence.recorded or "closed_on_exchange", evidence.recorded_price
            if evidence.recorded is None and evidence.unreadable:
                # A stop of ours sent moments ago may be the fill that ended it, and the venue does not show
                # it yet (its read lag): the position is over now (its stops cancelled at once), and its
                # record is settled once the venue can show that stop. Recorded `closed_on_exchange` for
                # good, a trailing stop's profit after a kill mid-move read as a close nobody explains (r72).
                self._manager.settle_exit_later(guard, evidence.unreadable)
        self._absent_once.discard(guard.position_id)
        # A position the venue holds on the symbol once this one has ended (turned the other way, or opened
        # by hand after our stop filled: r77, r78) is adopted by a pass asked for at this guard's end.
        guard.adopt_after_end = isinstance(alone, list) and any(p.quantity > 0 for p in alone)
        guard.submit(PositionGone(exit_reason=exit_reason, exit_price=exit_price))
        report.closed.append(guard.symbol)

    async def _exit_evidence(self, guard: PositionGuard) -> _ExitEvidence:
        """Why the position left the venue: one of our stops (of any generation: an earlier stop may have
        filled after it was replaced) or close orders filled, as the venue tells now."""
        if guard.exit_evidence is not None:
            return _ExitEvidence(guard.exit_evidence.exit_reason, guard.exit_evidence.exit_price)
        candidates = {
            o.client_order_id: o.purpose for o in (guard.stop_loss, guard.trailing_stop) if o.client_order_id
        }
        # Recorded filled (not the guard's current orders): the venue said so to a guard that did not live
        # to close the position (a protection restart between the look-up and the close); its successor's
        # guard starts on the next id, and the Bybit soak recorded such a position `closed_on_exchange`
        # without its PnL. Such a fill says why and at what price, never that the position is gone: a stop
        # can fill while part of the position stays (a partial fill, a flip), protected again since.
        filled_before: dict[str, OrderPurpose] = {}
        recorded_at: dict[str, float] = {}  # (monotonic) when each was written, before its send
        for record in await self._store.orders_for_position(guard.position_id, _EXIT_CANDIDATE_STATUSES):
            recorded_at[record.client_order_id] = monotonic_of(self._clock, record.created_at.timestamp())
            # Close orders too: a close at market whose answer never reached its guard (a protection
            # restart cancelled it mid-call) left the position `closing` for two passes and more.
            if record.purpose not in (OrderPurpose.STOP_LOSS, OrderPurpose.TRAILING_STOP, OrderPurpose.CLOSE):
                continue
            if record.status is OrderRecordStatus.FILLED and record.client_order_id not in candidates:
                filled_before[record.client_order_id] = record.purpose
            else:
                candidates.setdefault(record.client_order_id, record.purpose)
        newest_first = dict(reversed(filled_before.items()))
        asked = {**candidates, **newest_first}
        asked_at = self._clock.monotonic()
        looked_up = await asyncio.gather(
            *(
                self._manager.read(
                    lambda cid=client_order_id: self._venue.fetch_order(guard.symbol, cid),
                    "fetch_order",
                    Lane.READ,
                )
                for client_order_id in asked
            ),
            return_exceptions=True,
        )
        recorded: _ExitEvidence | None = None
        unreadable: list[str] = []
        for (cid, purpose), found in zip(asked.items(), looked_up, strict=True):
            if isinstance(found, NotFound) and guard.absent_unproven(cid, asked_at, recorded_at.get(cid)):
                unreadable.append(cid)
            if isinstance(found, NotFound | ExchangeError | TimeoutError):
                found = None
            elif isinstance(found, BaseException):
                raise found
            reason = _EXIT_REASONS.get(purpose, "stop_loss")
            if cid in newest_first:
                # The venue no longer telling of it (a new process on Bybit, whose position stops carry no
                # id), the record still says why; its price only the venue's answer gives.
                if recorded is None:
                    price = found.average_price if found is not None else None
                    recorded = _ExitEvidence(recorded=reason, recorded_price=price)
                continue
            if found is not None and found.status is OrderStatus.FILLED:
                await self._store.set_order_status(
                    found.client_order_id, OrderRecordStatus.FILLED, exchange_order_id=found.venue_order_id
                )
                return _ExitEvidence(reason, found.average_price)
        if recorded is not None:
            return dataclasses.replace(recorded, unreadable=tuple(unreadable))
        return _ExitEvidence(unreadable=tuple(unreadable))

    async def _adopt_if_held(self, venue_position: VenuePosition, report: ReconcileReport) -> None:
        """The list may be older than what the engine knows since (a stop filled and its guard closed
        after the read): only a fresh read of the symbol makes it a position to adopt."""
        if self._manager.stopped:
            return  # an emptied manager would "adopt" every position it no longer tracks
        alone = await self._still_held(venue_position)
        if alone is None or self._manager.stopped:
            return
        log.warning(
            "reconcile: %s %s %s on the venue is not ours in the database: adopting and protecting it",
            venue_position.symbol,
            venue_position.side.value,
            venue_position.quantity,
        )
        await self._adopt(venue_position, alone)
        report.adopted.append(venue_position.symbol)

    async def _note_other_identities(self, open_orders: Sequence[Order]) -> None:
        """Orders this database sent for positions it records under another account identity of the same
        venue account (another API key of it, the testnet setting flipped): that identity's engine trades
        here. Taken for orphans, each engine cancelled the other's stops at every pass, and adopted the
        other's positions (r80, r81). Told to the manager, which leaves them alone."""
        manager = self._manager
        unguarded: dict[int, list[Order]] = {}
        for order in open_orders:
            key = parse_client_order_id(order.client_order_id, manager.token)
            if key is not None and key.position_id not in manager.guards:
                unguarded.setdefault(key.position_id, []).append(order)
        theirs: dict[str, list[Order]] = {}
        self._unattributed = set()
        if not unguarded:
            manager.saw_other_identities(theirs)
            return
        try:
            if getattr(self._store, "down", False):
                raise ConnectionError("the database is down")
            # Briefly: a restart of protection waits for this pass (a read held by a dead server held it).
            async with asyncio.timeout(ACCOUNTS_READ_SECONDS):
                accounts = await self._store.accounts_of_positions(unguarded)
        except Exception as exc:
            self._unattributed = {o.client_order_id for orders in unguarded.values() for o in orders}
            log.info(
                "reconcile: whose %s of ours without a guard are not read (%s): none is cancelled this pass",
                counted(len(self._unattributed), "order"),
                type(exc).__name__,
            )
            return
        for position_id, account in accounts.items():
            if account != self._store.account:
                theirs.setdefault(account, []).extend(unguarded[position_id])
        manager.saw_other_identities(theirs)

    async def _cancel_if_stale(self, order: Order, report: ReconcileReport) -> None:
        manager = self._manager
        if manager.stopped:
            return  # this pass outlived its manager: every order would look like an orphan
        key = parse_client_order_id(order.client_order_id, manager.token)
        if key is None:
            return  # not ours: never touched
        if (
            order.client_order_id in manager.other_identity_orders
            or order.client_order_id in self._unattributed
        ):
            return  # another identity's of this database, or not known whose (`_note_other_identities`)
        guard = manager.guards.get(key.position_id)
        if guard is not None and order.client_order_id in guard.order_ids():
            return
        if guard is None and order.symbol in self._entries_in_flight():
            # The stop an entry on its way carried (Bybit): its position's guard is about to exist. Taken
            # for an orphan, its cancel cleared the position's stopLoss on the venue.
            return
        why = (
            "orphan (its position is closed or unknown)"
            if guard is None
            else "duplicate (not the current order)"
        )
        cid = order.client_order_id
        asked = self._clock.now()
        # Where stops are fields of the position (Bybit), the adapter stamps their ends with our own clock;
        # a venue's stamp is on its clock, behind ours by tens of milliseconds at times, and every orphan
        # cancelled would read "ended before" (r91).
        stamped_here = not self._venue.capabilities().stops_are_orders
        try:
            final: Order | None = await manager.call(
                self._venue.cancel_order(order.symbol, cid), "cancel_order", Lane.READ
            )
        except NotFound:  # listed by this pass's read, gone now: it ended meanwhile, how is asked below
            final = None
        except (ExchangeError, TimeoutError) as exc:
            level = logging.DEBUG if manager.cancel_failure_said_lately(cid) else logging.WARNING
            log.log(level, "reconcile: cancelling %s %s failed: %s", why, cid, exc)
            if guard is None:  # an orphan left live: cancelled again, and its symbol takes no new position
                manager.sweep_leftovers(order.symbol, {cid: None})
            return
        if (
            final is None
            or final.status is not OrderStatus.CANCELED
            or (stamped_here and 0 < final.updated_at < asked - ENDED_BEFORE_MARGIN_SECONDS)
        ):
            # It ended before the cancel (this pass's read is older than the stop's fill), or it fired and
            # may still fill: the venue's word is recorded, and nothing is said cancelled that was not. So
            # too one answered cancelled as of before this cancel was asked: on Bybit, where a stop is a
            # field of the position, one our guard replaced after this pass's listing was read (passes
            # "cancelled our duplicate …-sl0" 8 times in a 10-minute soak: nothing cancelled, a WARNING and
            # an event each). (A venue's stamp of our own cancel, in whole milliseconds, is not "before".)
            await self._ended_before_cancel(order, final, guard is None)
            return
        # Ours by token, but possibly not in this database's orders (e.g. of a position id we never saw).
        with contextlib.suppress(LookupError):
            await self._store.set_order_status(cid, OrderRecordStatus.CANCELED)
        await self._store.record_event(
            Severity.WARNING,
            "orphan_cancelled",
            f"cancelled our {why} {order.client_order_id} on {order.symbol}",
            symbol=order.symbol,
            position_id=key.position_id,
        )
        log.warning("reconcile: cancelled our %s %s on %s", why, cid, order.symbol)
        report.orphans_cancelled.append(cid)

    async def _ended_before_cancel(self, order: Order, final: Order | None, orphan: bool) -> None:
        """A stale stop of ours the pass meant to cancel had ended already, or fired. Its end is recorded as
        the venue tells it (looked up when the cancel found it gone); one fired and not finished can still
        fill, reduce-only: an orphan's symbol takes no new position until it has ended (the sweep)."""
        manager, cid = self._manager, order.client_order_id
        if final is None:
            try:
                final = await manager.read(lambda: self._venue.fetch_order(order.symbol, cid), "fetch_order")
            except (ExchangeError, TimeoutError) as exc:  # the record keeps what it said; nothing is live
                log.info(
                    "reconcile: %s on %s ended before its cancel; looking it up failed: %s",
                    cid,
                    order.symbol,
                    exc,
                )
                return
        with contextlib.suppress(LookupError):
            await self._store.set_order_status(cid, record_status_of(final.status))
        if not final.status.is_final and orphan:
            manager.sweep_leftovers(order.symbol, {cid: None})
        log.info(
            "reconcile: %s on %s was %s before the pass could cancel it",
            cid,
            order.symbol,
            final.status.value,
        )

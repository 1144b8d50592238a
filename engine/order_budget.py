"""The venue's order budget, kept on our side so protection always gets there first.

Each of the venue's budgets (Binance: 300 orders / 10 s and 1 200 / min) is mirrored as a sliding window of
send times: never more than `limit` sends within any `window` seconds, which also keeps every fixed window
of the venue within its limit. Protective orders take a slot as soon as one is free and never wait behind
an entry. An entry is admitted only when the budget can also hold the protective orders it will need
(its own two plus every protective order already promised), so a big wave cannot eat the budget its
positions need for their stops. If the venue answers RateLimited/Banned anyway, `hold_until()` stops all
sends until then.

Our windows hold only our own orders (and, where the venue sends its counts, what it counted when it last
answered); another client on the account can fill the venue's window at any moment. Once the account is
seen shared (a 429, or the venue counting more orders than ours, within `CONTESTED_SECONDS`), orders
probe: into a window no order answer has shown room in lately, one order goes alone and
the others wait for its answer (`order_answered`, `entry_answered`). Room: they go together. HTTP 429: its
hold keeps them back until the window ends, at the cost of one refusal. Orders sent blind into a full
window meet one refusal each, and refusals in a row are what a venue bans for (Binance: repeated 429s,
then 418 for 2 minutes and up); a ban refuses every order, protective ones included, for far longer than
a round trip. So protective orders probe too, but take an answer up to `PROBE_FRESH_SECONDS` old for
room, wait for a probe's answer only as long as an answer normally takes (`protective_probe_patience`),
and go together once a 429's hold is over (the venue said its window has room again then). Entries can
wait: they take an answer for room only if it is about as fresh as a probe's would be (one order round
trip; a wave sent whole on a close's answer 0.8 s old met a window another client had filled since, and
a ban), and wait for protective orders as always. No engine can tell at its start that it is alone on its
account (a first wave sent whole into a window another client had filled met five refusals at once, and
a ban): its entries probe from its start until `CONTESTED_SECONDS` pass with no sign of another client
(its protective orders trust the probes' fresh answers). Past that, an engine alone on its account never
probes, and its orders pay nothing.

The venue bans for refusals that pile up, not for one: Binance does not say how many, our sim venue bans
at the third within a minute. Every request the venue refuses for its rate (`rate_refused`, told by the
venue adapter once per refused call) is remembered for `RATE_REFUSAL_MEMORY_SECONDS`. Once
`ENTRY_PAUSE_REFUSALS` are remembered, entries are not sent (`acquire_entry` raises `RateLimited` until
the older is a minute old): in a soak, four bans of five began with an entry that was the third refusal in
a minute, and a ban holds every stop and close back with it. Protective orders and closes still go, but
probe (one alone, the others behind its answer) even once a 429's hold is over: orders sent together
then, into a window refilled meanwhile, would be refusals enough for a ban by themselves.

Where the venue counts protective orders apart from entries (`Capabilities.protective_rate_budgets`: Bybit
counts order/create and position/trading-stop each in its own rolling second), entries and protective
orders live in their own windows: an entry takes one slot of the entry budget, and books its stops in the
protective windows at the time they are expected (one round trip on); it is admitted while they fit
there beside the stops already sent and those booked by earlier entries. A stop sent takes the place of
the earliest booking. Counting every promised stop in one window instead (right when the entry's own send
fills the same window) would hold entries to a few per round trip. Binance counts both in the same order
budget and gives none: one set of windows, as before.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from engine.clock import Clock, wait_event
from engine.exchange.errors import Banned, RateLimited, Rejected
from engine.exchange.port import RateBudget
from engine.pacing import BudgetWaits, Lane
from engine.words import counted

T = TypeVar("T")

PROTECTIVE_ORDERS_PER_POSITION = 2  # hard stop + trailing stop
DEFERRAL_LIMIT_SECONDS = 10.0  # the longest a deferrable protective send yields to the others
PROBE_FRESH_SECONDS = 1.0  # an order answer this recent shows a protective order the windows had room
# An entry trusts an answer only about as fresh as a probe's would be: one order round trip (this at least).
ENTRY_FRESH_MIN_SECONDS = 0.05
CONTESTED_SECONDS = 600.0  # orders probe for this long after the account was last seen shared
RATE_REFUSAL_MEMORY_SECONDS = 60.0  # a venue counts its refusals toward a ban within about this (sim: 60 s)
ENTRY_PAUSE_REFUSALS = 2  # refusals remembered that hold entries back: the next one could be a ban's
PROTECTIVE_PROBE_PATIENCE_SECONDS = 0.5  # at least; else 4 order round trips (a late answer)


@dataclass(slots=True)
class _Window:
    limit: int
    seconds: float
    sends: deque[float]

    def prune(self, now: float) -> None:
        while self.sends and self.sends[0] <= now - self.seconds:
            self.sends.popleft()

    def free(self) -> int:
        return self.limit - len(self.sends)

    def wait_for(self, slots: int, at: float) -> float:
        """Seconds to wait until `slots` more sends fit in this window as it stands at time `at`."""
        cutoff = at - self.seconds
        expired = 0
        for sent in self.sends:  # ascending: stop at the first send still inside the window at `at`
            if sent > cutoff:
                break
            expired += 1
        inside = len(self.sends) - expired
        if inside + slots <= self.limit:
            return 0.0
        blocking = self.sends[expired + inside + slots - self.limit - 1]
        return max(0.0, blocking + self.seconds - at)


@dataclass(frozen=True, slots=True)
class EntryPromise:
    """What admitting an entry promised: `count` protective orders, booked for `booked_at` (monotonic;
    None where protective orders share the entry windows and are not booked apart)."""

    count: int
    booked_at: float | None = None
    probe_at: float | None = None  # sent alone into a window nobody had seen lately (monotonic)


class OrderBudget:
    def __init__(
        self,
        budgets: Sequence[RateBudget],
        clock: Clock,
        round_trip: Callable[[], float] = lambda: 0.0,
        *,
        headroom: float = 0.0,
        waits: BudgetWaits | None = None,
        protective_budgets: Sequence[RateBudget] = (),
        probe_patience_seconds: float = 10.0,
        known_alone: bool = False,
        requests_held: Callable[[], float | None] = lambda: None,
    ):
        if not 0.0 <= headroom < 1.0:
            raise ValueError(f"headroom must be within [0, 1), got {headroom}")
        self._clock = clock
        # Seconds left of the venue's hold on every request (a 429 on the request weight: the request pacer's),
        # which every order waits for too, or None.
        self.requests_held_for = requests_held
        # How long entries wait for a probe's answer (the engine gives the call budget: an entry's answer,
        # or its look-up by id, comes within it); past that, the next entry probes as well.
        self._probe_patience = probe_patience_seconds
        self._round_trip = round_trip  # current estimate of one order round trip, seconds
        self.venue_budgets = tuple(budgets)
        self._windows = [
            _Window(max(1, math.floor(b.limit * (1.0 - headroom))), b.window_seconds, deque())
            for b in budgets
        ]
        # The windows protective orders are counted in: their own where the venue counts them apart.
        self.protective_venue_budgets = tuple(protective_budgets)
        self._separate = bool(protective_budgets)
        self._protective_windows = (
            [
                _Window(max(1, math.floor(b.limit * (1.0 - headroom))), b.window_seconds, deque())
                for b in protective_budgets
            ]
            if self._separate
            else self._windows
        )
        self.waits = waits if waits is not None else BudgetWaits()
        self._banned_until_epoch = 0.0
        self._promised = 0  # protective orders entries were admitted for and that are not sent yet
        self._booked: list[float] = []  # apart: when the promised stops are expected to go (sorted)
        self._protective_waiting = 0
        self._hold_until = 0.0
        self._banned_until = 0.0
        self._room_seen_at = -math.inf  # the last order answer that showed the windows had room
        self._shared_seen_at = -math.inf  # the last sign of another client's orders (a 429, the counts)
        # For entries, the start counts as one: no engine knows it is alone on its account (`known_alone`
        # is for tests of the windows by themselves).
        self._started_at = -math.inf if known_alone else clock.monotonic()
        self._refusals: deque[float] = deque()  # when the venue refused a request for its rate (monotonic)
        self._probe_at: float | None = None  # the entry probing the windows, until its answer
        self._probe_answered = asyncio.Event()  # set by the probe's answer: the entries behind it go
        self._room_told = asyncio.Event()  # set (and replaced) by each order answer that showed room
        self._room_taken_at = -math.inf  # the answer the last held order went on (`take_discretionary_turn`)
        self.entries_admitted = 0
        self.probes = 0
        self.protective_sent = 0

    @property
    def promised(self) -> int:
        return self._promised

    @property
    def limits(self) -> tuple[RateBudget, ...]:
        """The budgets we allow ourselves (the venue's less the headroom)."""
        return tuple(RateBudget(w.limit, w.seconds) for w in self._windows)

    def used_fraction(self) -> float:
        """The fullest window's share of the venue's limit used right now (0..1), for health."""
        now = self._clock.monotonic()
        fractions = []
        pairs = list(zip(self._windows, self.venue_budgets, strict=True))
        if self._separate:
            pairs += zip(self._protective_windows, self.protective_venue_budgets, strict=True)
        for window, venue in pairs:
            window.prune(now)
            fractions.append(len(window.sends) / venue.limit)
        return max(fractions, default=0.0)

    def observe(self, window_seconds: float, used: int) -> None:
        """The venue's own count of orders in its current `window_seconds` window. Our sliding window holds
        every order of ours the venue counted there, so a higher count is someone else's: book it now."""
        now = self._clock.monotonic()
        for window in self._windows:
            if window.seconds == window_seconds:
                window.prune(now)
                if used > len(window.sends):
                    self._shared_seen_at = now
                window.sends.extend([now] * max(0, used - len(window.sends)))

    def hold_until(self, monotonic_deadline: float, *, banned: bool = False) -> None:
        """The venue refused an order for its rate (429) or banned us (418): nothing is sent until then.
        We keep below its limits, so a refusal is also the sign of another client on the account."""
        self._shared_seen_at = self._clock.monotonic()
        self._hold_until = max(self._hold_until, monotonic_deadline)
        if banned:
            self._banned_until = max(self._banned_until, monotonic_deadline)
            self._banned_until_epoch = max(
                self._banned_until_epoch, self._clock.now() + monotonic_deadline - self._clock.monotonic()
            )

    def rate_refused(self) -> None:
        """The venue refused a request for its rate (HTTP 429; once per refused call, from the venue adapter):
        remembered toward the entries' pause (`refusal_pause_for`). A sign of another client, too."""
        now = self._clock.monotonic()
        self._shared_seen_at = now
        self._refusals.append(now)

    def _recent_refusals(self, now: float) -> int:
        while self._refusals and self._refusals[0] <= now - RATE_REFUSAL_MEMORY_SECONDS:
            self._refusals.popleft()
        return len(self._refusals)

    def refusal_pause_for(self) -> float | None:
        """Seconds left before entries go again after rate refusals piled up (see the module's note), or None."""
        now = self._clock.monotonic()
        count = self._recent_refusals(now)
        if count < ENTRY_PAUSE_REFUSALS:
            return None
        return self._refusals[count - ENTRY_PAUSE_REFUSALS] + RATE_REFUSAL_MEMORY_SECONDS - now

    def entries_held(self) -> tuple[float, str] | None:
        """While the venue's word holds entries back (a ban, or rate refusals piled up): seconds left and
        why; else None. Said where entries are (the dashboard's header, the signals' health): an operator
        resumed entries, read "entries on", and every signal of the next minute was refused."""
        banned = self.banned_for()
        if banned is not None:
            return banned, "the venue bans our requests (every call refused until the ban ends)"
        pause = self.refusal_pause_for()
        if pause is not None:
            return pause, (
                f"the venue refused {counted(len(self._refusals), 'request')} for its rate within "
                f"{RATE_REFUSAL_MEMORY_SECONDS:.0f}s, and it bans for refusals that pile up"
            )
        return None

    def entry_refusal(self) -> RateLimited | None:
        """What an entry is answered while `entries_held` (None: it may go), at its admission or, admitted
        before, when its request would leave."""
        held = self.entries_held()
        return None if held is None else RateLimited(held[0], f"entries held back: {held[1]}")

    def held_for(self) -> float | None:
        """Seconds left before the venue takes orders again (a 429's hold or a ban), or None."""
        left = self._hold_until - self._clock.monotonic()
        return left if left > 0 else None

    def banned_for(self) -> float | None:
        """Seconds left of a venue ban (not of an ordinary rate-limit pause), or None."""
        left = self._banned_until - self._clock.monotonic()
        return left if left > 0 else None

    def entry_answered(self, promise: EntryPromise, *, room: bool) -> None:
        """The venue answered an entry (see `order_answered`)."""
        self.order_answered(promise.probe_at, room=room)

    def order_answered(self, probe_at: float | None, *, room: bool) -> None:
        """An order's call ended: `room` when the venue answered it other than with a rate refusal (it took
        the order, or refused it for itself: either way its windows had room; a 429's hold comes through
        `hold_until`). `probe_at`: what the order's acquire returned; ends the probe it was, if it was one
        (with or without an answer: the next order to look probes then)."""
        if room:
            self._room_seen_at = max(self._room_seen_at, self._clock.monotonic())
            self._room_told.set()
            self._room_told = asyncio.Event()
        if probe_at is not None and self._probe_at == probe_at:
            self._probe_at = None
            self._probe_answered.set()

    async def sent(self, probe_at: float | None, call: Awaitable[T]) -> T:
        """Await an order's call and tell the budget what its end showed (`order_answered`)."""
        room = False
        try:
            result = await call
            room = True
            return result
        except Rejected:  # refused for itself: the venue's windows had room for it
            room = True
            raise
        finally:
            self.order_answered(probe_at, room=room)

    def protective_probe_patience(self) -> float:
        """How long a protective order waits for a probe's answer before it probes as well: as long as an
        answer normally takes, never the entries' patience (a lost answer must not hold a stop back)."""
        late = max(PROTECTIVE_PROBE_PATIENCE_SECONDS, 4.0 * self._round_trip())
        return min(self._probe_patience, late)

    def _probing(
        self, now: float, patience: float, *, fresh: float, hold_is_room: bool = False, entry: bool = False
    ) -> tuple[bool, float]:
        """(this order would probe, seconds it waits for the answer of the probe out, 0 if none). `fresh`:
        how old an answer that showed room may be and still spare the probe. `hold_is_room`: the end of a
        429's hold counts as such an answer (the venue said its window has room again then). `entry`: for
        an entry, the engine's start counts as a sign of another client."""
        room_seen = self._room_seen_at
        if hold_is_room and self._hold_until <= now:
            room_seen = max(room_seen, self._hold_until)
        shared_seen = max(self._shared_seen_at, self._started_at) if entry else self._shared_seen_at
        if now - shared_seen > CONTESTED_SECONDS or now - room_seen <= fresh:
            return False, 0.0
        if self._probe_at is None:
            return True, 0.0
        return True, max(0.0, self._probe_at + patience - now)

    def _protective_probing(self, now: float) -> tuple[bool, float]:
        """`_probing` for a protective order or a close (`_take_ahead_of_entries`)."""
        return self._probing(
            now,
            self.protective_probe_patience(),
            fresh=PROBE_FRESH_SECONDS,
            hold_is_room=self._recent_refusals(now) < ENTRY_PAUSE_REFUSALS,
        )

    def _send_probe(self, now: float) -> float:
        self._probe_at = now
        self._probe_answered = asyncio.Event()
        self.probes += 1
        return now

    async def _entry_turn(self) -> bool:
        """What every entry send waits for before its windows are looked at: no ban (raises `Banned`: an
        entry never waits one out), no pause for refusals piled up (raises `RateLimited` with the pause's
        end), and no probe out within its patience (a late one's answer: the first entry to look again
        probes as well). Returns whether this entry would probe. It returns without suspending once
        nothing holds it, so the caller's admission is in the same step as its check."""
        while True:
            if self.banned_for() is not None:
                raise Banned(self._banned_until_epoch, "entries wait for no ban")
            if (refusal := self.entry_refusal()) is not None:
                raise refusal
            fresh = max(ENTRY_FRESH_MIN_SECONDS, self._round_trip())
            probe, probe_wait = self._probing(
                self._clock.monotonic(), self._probe_patience, fresh=fresh, entry=True
            )
            if probe_wait == 0.0:
                return probe
            await wait_event(self._clock, self._probe_answered, probe_wait)

    def release_promise(self, promise: EntryPromise) -> None:
        """An admitted entry did not open a position: its protective orders will not be sent. Its own
        bookings go; before, the newest did, so an entry in doubt for a while, released late, took the
        bookings of entries admitted after it, and its stale one stayed. A booking of its already taken
        by a protective send (which takes the earliest) is made up by the earliest left."""
        self._promised = max(0, self._promised - promise.count)
        booked = self._booked
        for _ in range(promise.count):
            index = bisect.bisect_left(booked, promise.booked_at) if promise.booked_at is not None else 0
            if index < len(booked) and booked[index] == promise.booked_at:
                del booked[index]
            elif booked:
                del booked[0]

    async def acquire_protective(self, *, deferrable: bool = False) -> float | None:
        """Take a slot for a protective order. `deferrable`: it replaces a stop that protects the position
        meanwhile (Bybit: the hard stop that rode on the entry, corrected from the fill). Where protective
        orders have budgets of their own, such a send yields, for up to `DEFERRAL_LIMIT_SECONDS`, to every
        other protective order and to the stops entries booked (it was never promised): a wave's positions
        get covered first. Elsewhere it is an ordinary protective send. Returns the probe it is (see the
        module's note), or None: hand it to `sent` (or `order_answered`) with the order's call."""
        if deferrable and self._separate:
            await self._acquire_deferred()
            return None
        probe_at = await self._take_ahead_of_entries(self._protective_windows)
        self._promised = max(0, self._promised - 1)
        if self._booked:
            self._booked.pop(0)  # this send takes the place of the earliest booking
        self.protective_sent += 1
        return probe_at

    async def acquire_close(self) -> float | None:
        """Take a slot for a reduce-only market close (a stuck stop's position, an operator's close): an
        order where the venue counts orders (the entries' windows), ahead of any entry, and in no promised
        stop's place. It waits out a 429's hold and a ban like every order, and probes like a protective
        order (returned as by `acquire_protective`). A close the position does not need (an operator's, of a
        position its confirmed stops protect) first waits for `discretionary_held_for` to clear. A hold on
        every request (a 429 on the request weight) is waited out here first, where the wait is said
        (`close_waits`), not in the request pacer, where it was not: 28 s of a stuck stop's close unsaid (r92)."""
        while (left := self.requests_held_for()) is not None:
            await self._clock.sleep(left)
        return await self._take_ahead_of_entries(self._windows)

    def close_waits(self) -> tuple[float, str] | None:
        """How long at most a close asking now (`acquire_close`) waits for its place, and why (the longest of
        what holds it); None if it would go at once."""
        now = self._clock.monotonic()
        wait = self._wait_for(1, windows=self._windows)
        waits: list[tuple[float, str]] = []
        banned = self.banned_for()
        held = self.held_for()
        if banned is not None:
            waits.append((max(banned, wait), "the venue bans our requests until then"))
        elif held is not None:
            why = "the venue refused an order for its rate (429) and said when it takes orders again"
            waits.append((max(held, wait), why))
        requests = self.requests_held_for()
        if requests is not None and banned is None:  # (a ban holds both alike, said as a ban)
            # (A 429 on a read's request weight holds every request, the close too: 28 s unsaid, r92.)
            why = "the venue refused a request for its weight (429) and said when it takes requests again"
            waits.append((max(requests, wait), why))
        if banned is None and held is None and wait > 0.0:
            fullest = max(self._windows, key=lambda w: w.wait_for(1, now))
            waits.append(
                (
                    wait,
                    f"the venue's order window is full ({fullest.limit} orders in {fullest.seconds:g}s, ours "
                    "and those the venue counted for the account); sent into it, it would be refused, a step "
                    "toward a ban that holds every stop",
                )
            )
        # Behind an order sent alone to learn whether the windows have room (another client was seen on the
        # account, and no answer has shown room lately): up to an answer's usual time, 8 s on a 2 s venue,
        # which went unsaid (r88); checked before the window, so a longer wait than its (r90). (As
        # `_take_ahead_of_entries` decides it.)
        _, probe_wait = self._protective_probing(now)
        if probe_wait > 0.0:
            waits.append(
                (
                    probe_wait,
                    "an order sent alone waits for its answer, to learn whether the venue's order window has "
                    "room (another client uses the account); sent beside it into a full window, it would be "
                    "refused",
                )
            )
        return max(waits, key=lambda w: w[0], default=None)

    def discretionary_held_for(self) -> float | None:
        """Seconds at most that an order the positions do not need (an operator's close of a position its
        confirmed stops protect) should wait before it is sent, or None: it may go. With refusals piled up
        its refusal would be a ban's, and a ban holds every stop back with it (all of a sim soak's bans began
        with an operator's close sent into a window another client had just filled): it goes, as an entry
        does, on an order answer about as fresh as a probe's that showed room, or at the end of the pause
        (`refusal_pause_for`)."""
        pause = self.refusal_pause_for()
        if pause is None:
            return None
        fresh = max(ENTRY_FRESH_MIN_SECONDS, self._round_trip())
        seen = self._room_seen_at
        return None if self._clock.monotonic() - seen <= fresh and seen > self._room_taken_at else pause

    def take_discretionary_turn(self) -> None:
        """A held order goes on the answer last seen: the next one waits for a newer answer (this one's)."""
        self._room_taken_at = self._room_seen_at

    async def room_shown(self, seconds: float) -> bool:
        """Wait up to `seconds` for an order answer that shows the windows have room; whether one came."""
        return await wait_event(self._clock, self._room_told, seconds)

    async def _take_ahead_of_entries(self, windows: Sequence[_Window]) -> float | None:
        self._protective_waiting += 1  # entries wait while this does
        started = self._clock.monotonic()
        try:
            while True:
                now = self._clock.monotonic()
                # A protective order takes the end of a 429's hold for room, as the venue said: the
                # stops it held go together then (each one round trip behind the other was 2 s a stop
                # on a slow venue); entries probe again, they can wait.
                # Not with refusals piled up: the orders a hold kept back, sent together into a window
                # refilled meanwhile, would be refusals enough for a ban.
                probe, probe_wait = self._protective_probing(now)
                if probe_wait > 0.0:
                    await wait_event(self._clock, self._probe_answered, probe_wait)
                    continue
                wait = self._wait_for(1, windows=windows)
                if wait == 0.0:
                    break
                await self._clock.sleep(wait)
            self._consume(windows)
            return self._send_probe(now) if probe else None
        finally:
            self._protective_waiting -= 1
            now = self._clock.monotonic()
            self.waits.record(now, now - started, Lane.PROTECTIVE)

    async def _acquire_deferred(self) -> None:
        started = self._clock.monotonic()
        while True:
            now = self._clock.monotonic()
            if now - started >= DEFERRAL_LIMIT_SECONDS:
                wait = self._wait_for(1, windows=self._protective_windows)
            elif self._protective_waiting:
                wait = 0.01  # the others first
            else:
                wait = self._wait_for(1, windows=self._protective_view(now))
            if wait == 0.0:
                break
            await self._clock.sleep(min(max(wait, 0.01), 0.25))  # re-read soon: bookings come and go
        self._consume(self._protective_windows)
        now = self._clock.monotonic()
        self.waits.record(now, now - started, Lane.PROTECTIVE)
        self.protective_sent += 1

    async def acquire_entry(self, protective_orders: int = PROTECTIVE_ORDERS_PER_POSITION) -> EntryPromise:
        """Admit one entry that will need `protective_orders` protective orders once it fills; what was
        promised is handed back with `release_promise` should the entry open no position.

        Those orders are sent one entry round trip later (the `round_trip` estimate, re-read at every
        check), when the windows will have let older sends go: they are checked against the windows as
        they will be then. An estimate that turns out too long only makes a stop wait briefly for its
        slot; 0 (nothing measured yet) is the conservative choice. Raises `Banned` while the venue bans us:
        an entry never waits out a ban (its stops could not be placed meanwhile). On an account seen
        shared, into windows no answer showed room in lately, the entry is a probe (see the module's
        note) or waits for one's answer."""
        started = self._clock.monotonic()
        while True:
            probe = await self._entry_turn()
            if self._protective_waiting == 0:
                lead = max(0.0, self._round_trip())
                # Its stops, and every stop promised before, in the protective windows one round trip on
                # (with the entry itself where entries and stops share the windows).
                if self._separate:
                    stops = self._protective_view(self._clock.monotonic())
                    wait = max(self._wait_for(1), self._wait_for(protective_orders, lead, windows=stops))
                else:
                    promised = 1 + self._promised + protective_orders
                    wait = max(self._wait_for(1), self._wait_for(promised, lead))
                if wait == 0.0:
                    at = None
                    if self._separate:
                        at = self._clock.monotonic() + lead
                        for _ in range(protective_orders):
                            bisect.insort(self._booked, at)
                    self._consume(self._windows)
                    self._promised += protective_orders
                    self.entries_admitted += 1
                    now = self._clock.monotonic()
                    self.waits.record(now, now - started, Lane.ENTRY)
                    return EntryPromise(protective_orders, at, self._send_probe(now) if probe else None)
            else:
                wait = 0.0
            # Protective sends go first, a probe's answer comes first; recheck once either moved.
            await self._clock.sleep(max(wait, 0.01))

    async def acquire_resend(self, promise: EntryPromise) -> EntryPromise:
        """Take a slot to send again an entry the venue refused for its rate (429): after the hold, as a
        probe or behind one like any entry, its stops still promised. Raises `Banned` as `acquire_entry`."""
        while True:
            probe = await self._entry_turn()
            wait = 0.0 if self._protective_waiting else self._wait_for(1)
            if wait == 0.0 and not self._protective_waiting:
                self._consume(self._windows)
                now = self._clock.monotonic()
                return dataclasses.replace(promise, probe_at=self._send_probe(now) if probe else None)
            await self._clock.sleep(max(wait, 0.01))

    def _protective_view(self, now: float) -> list[_Window]:
        """The protective windows with the promised stops booked at their expected times."""
        views = []
        for window in self._protective_windows:
            window.prune(now)
            booked = [t for t in self._booked if t > now - window.seconds]
            views.append(_Window(window.limit, window.seconds, deque(sorted([*window.sends, *booked]))))
        return views

    def _wait_for(
        self, slots: int, lead_seconds: float = 0.0, *, windows: Sequence[_Window] | None = None
    ) -> float:
        """Seconds until `slots` sends fit in `windows` (the entry windows unless given); with a lead, fit
        in the windows as they will be that much later."""
        now = self._clock.monotonic()
        wait = max(0.0, self._hold_until - now)
        for window in self._windows if windows is None else windows:
            window.prune(now)
            slots = min(slots, window.limit)  # an over-large promise must not deadlock admission
            wait = max(wait, window.wait_for(slots, now + lead_seconds))
        return wait

    def _consume(self, windows: Sequence[_Window]) -> None:
        now = self._clock.monotonic()
        for window in windows:
            window.sends.append(now)

"""The order budget: never more sends than a window allows, protective orders first, entries admitted only
while their stops will fit."""

from __future__ import annotations

import asyncio

import pytest

from engine.clock import ManualClock
from engine.exchange.errors import RateLimited, Rejected
from engine.exchange.port import RateBudget
from engine.order_budget import (
    CONTESTED_SECONDS,
    PROBE_FRESH_SECONDS,
    RATE_REFUSAL_MEMORY_SECONDS,
    EntryPromise,
    OrderBudget,
)


async def _enter(budget: OrderBudget, protective_orders: int = 2) -> EntryPromise:
    """Admit an entry, and answer it as the venue does when it takes the order (the engine tells the budget
    every entry's answer: the windows had room, entries behind a probe may go)."""
    promise = await budget.acquire_entry(protective_orders)
    budget.entry_answered(promise, room=True)
    return promise


def _budget(clock: ManualClock, limit: int = 10, window: float = 10.0) -> OrderBudget:
    return OrderBudget([RateBudget(limit=limit, window_seconds=window)], clock, known_alone=True)


def _max_in_any_window(times: list[float], window: float) -> int:
    return max((sum(1 for t in times if start <= t < start + window) for start in times), default=0)


async def test_protective_sends_never_exceed_a_sliding_window() -> None:
    clock = ManualClock()
    budget = _budget(clock, limit=10, window=10.0)
    sent: list[float] = []

    async def send() -> None:
        await budget.acquire_protective()
        sent.append(clock.monotonic())

    tasks = [asyncio.create_task(send()) for _ in range(35)]
    await clock.settle()
    while not all(t.done() for t in tasks):
        await clock.advance(0.5)
    assert len(sent) == 35
    assert _max_in_any_window(sent, 10.0) == 10
    assert max(sent) == 30.0  # 10 at t=0, 10 at t=10, 10 at t=20, 5 at t=30: no later than needed


async def test_an_entry_is_admitted_only_with_room_for_its_stops() -> None:
    clock = ManualClock()
    budget = _budget(clock, limit=9, window=10.0)
    admitted = 0

    async def enter() -> None:
        nonlocal admitted
        await _enter(budget, 2)
        admitted += 1

    tasks = [asyncio.create_task(enter()) for _ in range(5)]
    await clock.settle()
    # 3 entries (3 sends) + 6 promised stops fill the window of 9: a 4th entry would starve a stop.
    assert admitted == 3
    assert budget.promised == 6
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_protective_orders_go_before_waiting_entries() -> None:
    clock = ManualClock()
    budget = _budget(clock, limit=3, window=10.0)
    order: list[str] = []
    await _enter(budget, 2)  # 1 sent, 2 promised: the window is spoken for
    entry = asyncio.create_task(budget.acquire_entry(2))
    entry.add_done_callback(lambda _: order.append("entry"))
    stops = [asyncio.create_task(budget.acquire_protective()) for _ in range(2)]
    for stop in stops:
        stop.add_done_callback(lambda _: order.append("stop"))
    await clock.settle()
    while not entry.done():
        await clock.advance(1.0)
    assert order == ["stop", "stop", "entry"]


async def test_admission_looks_ahead_one_round_trip() -> None:
    """With 3N orders against a 300/10 s budget, entries admitted at t=10 have their stops sent at t=12,
    after the stops of t=2 have left the window: looking ahead admits a full window of entries at t=10
    (without the lead only a third fit), and no window is ever exceeded."""
    round_trip = 2.0

    async def run(lead: float) -> float:
        clock = ManualClock()
        budget = OrderBudget(
            [RateBudget(limit=300, window_seconds=10.0)], clock, round_trip=lambda: lead, known_alone=True
        )
        sends: list[float] = []

        async def position() -> None:
            await _enter(budget, 2)
            sends.append(clock.monotonic())
            await clock.sleep(round_trip)
            for _ in range(2):
                await budget.acquire_protective()
                sends.append(clock.monotonic())

        tasks = [asyncio.create_task(position()) for _ in range(300)]
        await clock.settle()
        while not all(t.done() for t in tasks):
            await clock.advance(0.25)
        assert len(sends) == 900
        assert _max_in_any_window(sends, 10.0) <= 300
        return max(sends) - min(sends)

    without_lead = await run(0.0)
    with_lead = await run(round_trip)
    assert with_lead < without_lead
    assert with_lead <= 22.0 + 0.25  # the rate bound: the 900th send no earlier than t=20, its stops at +2


async def test_a_venue_hold_stops_every_send_until_it_ends() -> None:
    clock = ManualClock()
    budget = _budget(clock, limit=100, window=10.0)
    budget.hold_until(clock.monotonic() + 5.0, banned=True)
    assert budget.banned_for() == 5.0
    sent = asyncio.create_task(budget.acquire_protective())
    await clock.advance(4.9)
    assert not sent.done()
    await clock.advance(0.2)
    assert sent.done()
    assert budget.banned_for() is None
    budget.hold_until(clock.monotonic() + 3.0)  # a rate-limit pause is not a ban
    assert budget.banned_for() is None


async def test_where_the_venue_counts_stops_apart_entries_wait_only_for_their_own_window() -> None:
    """Bybit counts order/create and position/trading-stop each in its own rolling second. Booked in one
    window as on Binance, an entry held room for itself and both its stops in order/create's 9/s: 3 entries
    a second. Apart: a full window of entries, while the stop budget holds every stop they promise."""
    clock = ManualClock()
    budget = OrderBudget(
        [RateBudget(limit=9, window_seconds=1.0)],
        clock,
        protective_budgets=[RateBudget(limit=20, window_seconds=1.0)],
    )
    admitted = 0

    async def enter() -> None:
        nonlocal admitted
        await _enter(budget, 2)
        admitted += 1

    tasks = [asyncio.create_task(enter()) for _ in range(12)]
    await clock.settle()
    assert admitted == 9  # the entry window's 9, each with its 2 stops in the 20 of the stop window
    assert budget.promised == 18
    # The stops go out in their own window: the entry window does not hold them back.
    stops = [asyncio.create_task(budget.acquire_protective()) for _ in range(18)]
    await clock.settle()
    assert all(stop.done() for stop in stops)
    assert budget.promised == 0
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_apart_an_entry_still_waits_while_the_stop_window_cannot_hold_its_stops() -> None:
    clock = ManualClock()
    budget = OrderBudget(
        [RateBudget(limit=100, window_seconds=1.0)],
        clock,
        protective_budgets=[RateBudget(limit=4, window_seconds=1.0)],
    )
    admitted = 0

    async def enter() -> None:
        nonlocal admitted
        await _enter(budget, 2)
        admitted += 1

    tasks = [asyncio.create_task(enter()) for _ in range(5)]
    await clock.settle()
    assert admitted == 2  # 4 stops promised fill the stop window, however empty the entry window is
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_deferrable_replacement_yields_to_stops_entries_booked_and_to_other_stops() -> None:
    """Bybit: the hard stop that rode on the entry, corrected from the fill, protects the position while its
    replacement waits. The replacement went first-come like any stop and took the slots the wave's trailing
    stops were booked in (a correction for every other position: the wave's stops lagged past grace and
    the breaker paused entries). It yields now: to the booked stops, then goes."""
    clock = ManualClock()
    budget = OrderBudget(
        [RateBudget(limit=10, window_seconds=1.0)],
        clock,
        protective_budgets=[RateBudget(limit=2, window_seconds=1.0)],
    )
    await _enter(budget, 1)
    await _enter(budget, 1)  # two trailing stops booked: the stop window is spoken for
    correction = asyncio.create_task(budget.acquire_protective(deferrable=True))
    await clock.settle()
    assert not correction.done()
    stops = [asyncio.create_task(budget.acquire_protective()) for _ in range(2)]
    await clock.settle()
    assert all(stop.done() for stop in stops)  # the booked stops were not held back by it
    assert not correction.done()
    while not correction.done():
        await clock.advance(0.25)
    assert clock.monotonic() >= 1.0  # once the booked stops' second has passed
    assert budget.promised == 0


async def test_a_deferrable_send_waits_no_longer_than_its_limit() -> None:
    clock = ManualClock()
    budget = OrderBudget(
        [RateBudget(limit=10, window_seconds=1.0)],
        clock,
        protective_budgets=[RateBudget(limit=2, window_seconds=1.0)],
    )
    await _enter(budget, 1)
    await _enter(budget, 1)  # booked stops that never come (their entries are stuck)
    correction = asyncio.create_task(budget.acquire_protective(deferrable=True))
    while not correction.done():
        await clock.advance(0.5)
    assert clock.monotonic() <= 10.5


async def test_an_entry_released_late_gives_back_its_own_booking_not_a_newer_entry_s() -> None:
    """An entry in doubt for a while, then found never executed, hands back its promise late. That took
    the newest booking, a later entry's, and left the stale one: the next entry was admitted into the
    window the later entry's stop was booked in, and the two stops met in one second the venue allows one."""
    clock = ManualClock()
    budget = OrderBudget(
        [RateBudget(limit=10, window_seconds=1.0)],
        clock,
        round_trip=lambda: 1.0,
        protective_budgets=[RateBudget(limit=1, window_seconds=1.0)],
    )
    in_doubt = await _enter(budget, 1)  # its stop booked for t = 1
    await clock.advance(5.0)
    await _enter(budget, 1)  # a later entry: its stop booked for t = 6
    budget.release_promise(in_doubt)  # the first never executed, known only now
    await clock.advance(0.5)
    admitted = asyncio.create_task(budget.acquire_entry(1))  # would book t = 6.5, within a second of 6
    while not admitted.done():
        await clock.advance(0.05)
    assert clock.monotonic() >= 6.0 - 1e-9
    assert budget.promised == 2


def _shared(clock: ManualClock, limit: int = 100, **kwargs: float) -> OrderBudget:
    """A budget on an account another client uses: the venue refused one of our orders for its rate
    (a 429 whose hold is over)."""
    budget = OrderBudget([RateBudget(limit=limit, window_seconds=10.0)], clock, **kwargs)
    budget.hold_until(clock.monotonic())
    return budget


async def _cancel(tasks: list[asyncio.Task[EntryPromise]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_into_windows_no_answer_showed_room_in_one_entry_probes_and_the_rest_wait_for_its_answer() -> (
    None
):
    """Another client can fill the venue's window between our orders. Sent together, a wave's entries
    met one 429 each, and refusals in a row earn a ban that refuses protective orders too."""
    clock = ManualClock()
    budget = _shared(clock)
    tasks = [asyncio.create_task(budget.acquire_entry(2)) for _ in range(5)]
    await clock.settle()
    done = [t for t in tasks if t.done()]
    assert len(done) == 1
    assert budget.probes == 1
    probe = done[0].result()
    assert probe.probe_at is not None
    budget.entry_answered(probe, room=True)
    await clock.settle()
    assert all(t.done() for t in tasks)  # together, at once: no time passed
    assert clock.monotonic() == 0.0
    assert budget.probes == 1
    assert all(t.result().probe_at is None for t in tasks if t is not done[0])


async def test_a_probe_refused_for_the_rate_holds_the_rest_until_the_window_ends_then_one_probes_again() -> (
    None
):
    clock = ManualClock()
    budget = _shared(clock)
    tasks = [asyncio.create_task(budget.acquire_entry(2)) for _ in range(5)]
    await clock.settle()
    (probe,) = [t.result() for t in tasks if t.done()]
    budget.hold_until(clock.monotonic() + 5.0)  # the venue's 429: Retry-After 5 s
    budget.entry_answered(probe, room=False)
    await clock.advance(4.9)
    assert sum(t.done() for t in tasks) == 1  # nothing more sent into the full window
    await clock.advance(0.2)
    assert sum(t.done() for t in tasks) == 2
    assert budget.probes == 2
    (second,) = [t.result() for t in tasks if t.done() and t.result() is not probe]
    budget.entry_answered(second, room=True)
    await clock.settle()
    assert all(t.done() for t in tasks)


async def test_a_probe_whose_answer_is_late_lets_one_more_entry_probe_after_its_patience() -> None:
    clock = ManualClock()
    budget = _shared(clock, probe_patience_seconds=3.0)
    tasks = [asyncio.create_task(budget.acquire_entry(2)) for _ in range(3)]
    await clock.settle()
    assert sum(t.done() for t in tasks) == 1
    await clock.advance(2.9)
    assert sum(t.done() for t in tasks) == 1
    await clock.advance(0.2)
    assert sum(t.done() for t in tasks) == 2
    assert budget.probes == 2
    await _cancel(tasks)


async def test_entries_within_a_round_trip_of_an_answer_that_showed_room_do_not_probe() -> None:
    """An answer as fresh as a probe's would be spares the probe. One 0.8 s old did too, and a wave sent
    whole on it met a window another client had filled since: 429s and a ban. A protective order still
    takes an answer up to a second old (a probe costs it exposure)."""
    clock = ManualClock()
    round_trip = 0.2
    budget = OrderBudget([RateBudget(limit=100, window_seconds=10.0)], clock, lambda: round_trip)
    budget.hold_until(clock.monotonic())  # shared: a 429 whose hold is over
    await clock.advance(PROBE_FRESH_SECONDS + 0.1)
    await _enter(budget)
    assert budget.probes == 1
    await clock.advance(round_trip - 0.05)
    tasks = [asyncio.create_task(budget.acquire_entry(2)) for _ in range(4)]
    await clock.settle()
    assert all(t.done() for t in tasks)
    assert budget.probes == 1
    await clock.advance(0.1)  # a round trip since the windows were seen: the answer is stale for entries
    later = [asyncio.create_task(budget.acquire_entry(2)) for _ in range(3)]
    await clock.settle()
    assert sum(t.done() for t in later) == 1
    assert budget.probes == 2
    await _cancel(later)
    await clock.advance(0.5)  # 0.75 s since the answer: a protective order still goes without a probe
    assert await budget.acquire_protective() is None
    assert budget.probes == 2


async def test_an_engine_probes_its_entries_from_its_start_and_stops_after_a_quiet_while() -> None:
    """Probing costs a wave's other entries a round trip, paid only on an account that may be shared. No
    engine knows at its start that it is alone: its first wave sent whole into a window another client
    had filled met five refusals at once, and a ban. Ten quiet minutes show it alone."""
    clock = ManualClock()
    budget = OrderBudget([RateBudget(limit=100, window_seconds=10.0)], clock)
    first = [asyncio.create_task(budget.acquire_entry(2)) for _ in range(5)]
    await clock.settle()
    assert sum(t.done() for t in first) == 1
    assert budget.probes == 1
    budget.entry_answered(next(t.result() for t in first if t.done()), room=True)
    await clock.settle()
    assert all(t.done() for t in first)  # room: the others go together on the probe's answer
    assert budget.probes == 1
    await clock.advance(CONTESTED_SECONDS + 0.1)  # ten quiet minutes: alone
    quiet = [asyncio.create_task(budget.acquire_entry(2)) for _ in range(3)]
    await clock.settle()
    assert all(t.done() for t in quiet)
    assert budget.probes == 1
    budget.observe(10.0, 8 + 60)  # the venue counts 60 orders in the window that are not ours
    await clock.advance(PROBE_FRESH_SECONDS + 0.1)
    shared = [asyncio.create_task(budget.acquire_entry(2)) for _ in range(3)]
    await clock.settle()
    assert sum(t.done() for t in shared) == 1
    assert budget.probes == 2
    await _cancel(shared)


async def test_protective_orders_do_not_probe_at_the_engines_start() -> None:
    """Only entries count the start as a sign of another client: a naked position's stops go at once
    (they trust the probing entry's fresh answer, or go alone on an account never seen shared)."""
    clock = ManualClock()
    budget = OrderBudget([RateBudget(limit=100, window_seconds=10.0)], clock)
    sends = [asyncio.create_task(budget.acquire_protective()) for _ in range(4)]
    sends += [asyncio.create_task(budget.acquire_close()) for _ in range(2)]
    await clock.settle()
    assert all(t.done() for t in sends)
    assert budget.probes == 0


async def test_protective_orders_into_windows_no_answer_showed_room_in_probe_as_entries_do() -> None:
    """Two stuck stops' closes sent together into a window another client had filled met two 429s: with
    one refusal earlier in the minute, the third that gets an account banned, and a ban holds every
    protective order for far longer than a probe's round trip."""
    clock = ManualClock()
    budget = _shared(clock)
    await clock.advance(PROBE_FRESH_SECONDS + 0.1)  # that 429's hold ended a while ago
    closes = [asyncio.create_task(budget.acquire_close()) for _ in range(2)]
    stops = [asyncio.create_task(budget.acquire_protective()) for _ in range(2)]
    await clock.settle()
    sends = [*closes, *stops]
    (probe,) = [t.result() for t in sends if t.done()]
    assert probe is not None
    assert budget.probes == 1
    budget.hold_until(clock.monotonic() + 5.0)  # its answer: 429, Retry-After 5 s
    budget.order_answered(probe, room=False)
    await clock.advance(4.9)
    assert sum(t.done() for t in sends) == 1  # nothing more into the full window
    await clock.advance(0.2)
    # The window is over, as the venue said: the stops it held go together (an entry would probe again).
    assert all(t.done() for t in sends)
    assert budget.probes == 1


async def test_a_protective_order_waits_for_a_probe_only_as_long_as_an_answer_takes() -> None:
    """An entry probing holds the wave's other entries for up to the call budget; a stop behind a probe
    whose answer is late probes itself after 4 round trips (0.5 s at least)."""
    clock = ManualClock()
    round_trip = 0.05  # the engine's estimate of an order round trip
    budget = OrderBudget(
        [RateBudget(limit=100, window_seconds=10.0)], clock, lambda: round_trip, probe_patience_seconds=10.0
    )
    budget.hold_until(clock.monotonic())  # shared: a 429 whose hold is over
    await clock.advance(PROBE_FRESH_SECONDS + 0.1)
    assert budget.protective_probe_patience() == 0.5
    entry = await budget.acquire_entry(2)
    assert entry.probe_at is not None
    stop = asyncio.create_task(budget.acquire_protective())
    await clock.advance(0.45)
    assert not stop.done()
    await clock.advance(0.1)
    assert stop.done()
    assert stop.result() is not None  # it probes in its turn
    assert budget.probes == 2
    round_trip = 0.3
    assert budget.protective_probe_patience() == 4 * 0.3


async def test_a_close_behind_a_probe_says_how_long_it_may_wait_and_why() -> None:
    """A stuck stop's close behind an entry's probe waits up to the probe patience (8 s at a 2 s round trip)
    for its answer; `close_waits` said nothing of it (None: "a probe's answer, a fraction of a second"), so
    that wait went unsaid while the position had no working stop (r88)."""
    clock = ManualClock()
    budget = OrderBudget(
        [RateBudget(limit=100, window_seconds=10.0)], clock, lambda: 2.0, probe_patience_seconds=10.0
    )
    budget.hold_until(clock.monotonic())  # shared: a 429 whose hold is over
    await clock.advance(PROBE_FRESH_SECONDS + 0.1)
    assert budget.close_waits() is None  # nothing out: the close would probe itself at once
    entry = await budget.acquire_entry(2)
    assert entry.probe_at is not None
    await clock.advance(1.0)
    waits = budget.close_waits()
    assert waits is not None
    assert waits[0] == pytest.approx(8.0 - 1.0)
    assert "order sent alone waits for its answer" in waits[1]
    close = asyncio.create_task(budget.acquire_close())
    await clock.advance(6.9)
    assert not close.done()  # as said: it waits that long, no longer
    await clock.advance(0.2)
    assert close.done()
    budget.entry_answered(entry, room=True)
    assert budget.close_waits() is None


async def test_a_close_behind_a_probe_and_a_full_window_is_told_the_longer_wait() -> None:
    """r90: a probe out (7 s of its patience left) and the order window full for 2 s: `close_waits` said "up to
    2.0s: the window is full", and the close waited 7 s for the probe, checked first."""
    clock = ManualClock()
    budget = OrderBudget(
        [RateBudget(limit=100, window_seconds=2.0)], clock, lambda: 2.0, probe_patience_seconds=10.0
    )
    budget.hold_until(clock.monotonic())  # another client seen (a 429 whose hold is over)
    await clock.advance(PROBE_FRESH_SECONDS + 0.1)
    entry = await budget.acquire_entry(0)
    assert entry.probe_at is not None
    await clock.advance(1.0)
    budget.observe(2.0, 1000)  # the venue counts the window full (others' orders)
    said = budget.close_waits()
    assert said is not None
    assert "order sent alone" in said[1]
    started = clock.monotonic()
    close = asyncio.create_task(budget.acquire_close())
    while not close.done():
        await clock.advance(0.1)
    assert clock.monotonic() - started <= said[0] + 0.2


async def test_orders_alone_on_their_account_or_after_a_fresh_answer_never_wait_for_a_probe() -> None:
    clock = ManualClock()
    alone = _budget(clock, limit=100)
    sends = [asyncio.create_task(alone.acquire_protective()) for _ in range(4)]
    sends += [asyncio.create_task(alone.acquire_close()) for _ in range(4)]
    await clock.settle()
    assert all(t.done() and t.result() is None for t in sends)
    assert alone.probes == 0

    shared = _shared(clock)
    await clock.advance(PROBE_FRESH_SECONDS + 0.1)
    probe = await shared.acquire_protective()
    assert probe is not None

    async def refused_for_itself() -> None:
        raise Rejected(-2022, "ReduceOnly Order is rejected.")

    with pytest.raises(Rejected):  # an answer: the venue's windows had room for it
        await shared.sent(probe, refused_for_itself())
    sends = [asyncio.create_task(shared.acquire_close()) for _ in range(4)]
    await clock.settle()
    assert all(t.done() and t.result() is None for t in sends)
    assert shared.probes == 1

    await clock.advance(PROBE_FRESH_SECONDS + 0.1)
    probe = await shared.acquire_close()

    async def rate_refused() -> None:
        shared.hold_until(clock.monotonic() + 2.0)  # as the venue adapter reports a 429
        raise RateLimited(2.0)

    with pytest.raises(RateLimited):  # no room: the next orders wait for the window the venue named
        await shared.sent(probe, rate_refused())
    after = [asyncio.create_task(shared.acquire_close()) for _ in range(3)]
    await clock.advance(1.9)
    assert not any(t.done() for t in after)
    await clock.advance(0.2)
    assert all(t.done() and t.result() is None for t in after)
    assert shared.probes == 2


async def test_entries_are_held_back_once_two_refusals_are_remembered_and_protective_orders_still_go() -> (
    None
):
    """A venue bans for refusals that pile up (the sim at the third within a minute): a soak's bans began
    with an entry that was that third. Two refusals remembered hold entries back (`RateLimited`, until
    the older is a minute old); protective orders and closes still go once the hold is over."""
    clock = ManualClock()
    budget = _budget(clock, limit=100)
    budget.rate_refused()
    budget.hold_until(clock.monotonic() + 1.0)
    assert budget.refusal_pause_for() is None
    await clock.advance(20.0)
    assert isinstance(await _enter(budget), EntryPromise)  # one refusal remembered: entries go
    budget.rate_refused()
    budget.hold_until(clock.monotonic() + 1.0)
    with pytest.raises(RateLimited, match="entries held back") as refused:
        await budget.acquire_entry(2)
    assert refused.value.retry_after == pytest.approx(RATE_REFUSAL_MEMORY_SECONDS - 20.0)
    await clock.advance(1.1)  # the hold is over
    budget.order_answered(await budget.acquire_protective(), room=True)
    budget.order_answered(await budget.acquire_close(), room=True)
    with pytest.raises(RateLimited, match="entries held back"):
        await budget.acquire_entry(2)
    await clock.advance(RATE_REFUSAL_MEMORY_SECONDS - 20.0 - 1.1)  # the first refusal is a minute old
    assert budget.refusal_pause_for() is None
    assert isinstance(await _enter(budget), EntryPromise)


async def test_with_two_refusals_remembered_the_orders_a_hold_kept_back_probe_at_its_end() -> None:
    """Orders kept back by a 429's hold go together at its end (the venue said its window has room then),
    but not with two refusals remembered: a window refilled meanwhile would refuse them all, refusals
    enough for a ban by themselves. One goes first; the others follow its answer."""
    clock = ManualClock()
    budget = _budget(clock, limit=100)
    budget.rate_refused()
    budget.hold_until(clock.monotonic() + 1.0)
    await clock.advance(1.1)
    together = [asyncio.create_task(budget.acquire_protective()) for _ in range(3)]
    await clock.settle()
    assert all(t.done() for t in together)  # one refusal remembered: the hold's end is room
    budget.rate_refused()
    budget.hold_until(clock.monotonic() + 1.0)
    await clock.advance(1.1)  # the hold ended 0.1 s ago
    sends = [asyncio.create_task(budget.acquire_protective()) for _ in range(2)]
    sends += [asyncio.create_task(budget.acquire_close()) for _ in range(2)]
    await clock.settle()
    [probe] = [t.result() for t in sends if t.done()]
    assert probe is not None
    budget.order_answered(probe, room=True)
    await clock.settle()
    assert all(t.done() for t in sends)


async def test_with_two_refusals_remembered_a_discretionary_close_waits_for_an_answer_that_shows_room() -> (
    None
):
    """An order no position needs (an operator's close of a position its confirmed stops protect) is held
    while its refusal would be a third within a minute: it may go on an order answer about as fresh as a
    probe's that showed room, or once the older refusal is a minute old."""
    clock = ManualClock()
    budget = _budget(clock, limit=100)
    assert budget.discretionary_held_for() is None
    budget.rate_refused()
    assert budget.discretionary_held_for() is None  # one refusal: another would not be a ban's
    await clock.advance(20.0)
    budget.rate_refused()
    assert budget.discretionary_held_for() == pytest.approx(RATE_REFUSAL_MEMORY_SECONDS - 20.0)
    waiting = asyncio.create_task(budget.room_shown(5.0))
    await clock.settle()
    assert not waiting.done()
    budget.order_answered(await budget.acquire_protective(), room=True)  # a stop's answer: room
    await clock.settle()
    assert waiting.done()
    assert waiting.result() is True
    assert budget.discretionary_held_for() is None  # that answer is fresh
    await clock.advance(1.0)
    assert budget.discretionary_held_for() == pytest.approx(RATE_REFUSAL_MEMORY_SECONDS - 21.0)
    quiet = asyncio.create_task(budget.room_shown(2.0))
    await clock.advance(2.0)
    assert quiet.done()
    assert quiet.result() is False  # no answer within 2 s
    await clock.advance(RATE_REFUSAL_MEMORY_SECONDS - 23.0)
    assert budget.discretionary_held_for() is None  # the older refusal is a minute old


async def test_held_discretionary_orders_go_one_per_answer_that_shows_room() -> None:
    """A flatten's closes, all held, are woken together by one answer: they went as a burst into a window
    that answer no longer vouched for. Each answer lets one go; the next waits for a newer answer."""
    clock = ManualClock()
    budget = _budget(clock, limit=100)
    budget.rate_refused()
    budget.rate_refused()
    budget.order_answered(None, room=True)
    assert budget.discretionary_held_for() is None
    budget.take_discretionary_turn()
    assert budget.discretionary_held_for() is not None  # the same answer does not let a second one go
    await clock.advance(0.01)
    budget.order_answered(None, room=True)  # the first one's answer
    assert budget.discretionary_held_for() is None

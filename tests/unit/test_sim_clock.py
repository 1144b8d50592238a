"""ManualClock: sleeps complete only when the test moves time, in deadline order."""

from __future__ import annotations

import asyncio

import pytest

from engine.clock import Clock, ManualClock, SystemClock


def test_both_clocks_satisfy_the_protocol() -> None:
    assert isinstance(SystemClock(), Clock)
    assert isinstance(ManualClock(), Clock)


async def test_sleep_completes_only_when_time_reaches_its_deadline() -> None:
    clock = ManualClock(start=1000.0)
    sleeper = asyncio.create_task(clock.sleep(5.0))
    await clock.settle()

    await clock.advance(4.9)
    assert not sleeper.done()
    await clock.advance(0.1)
    assert sleeper.done()
    assert clock.now() == pytest.approx(1005.0)
    assert clock.monotonic() == pytest.approx(5.0)


async def test_sleepers_wake_in_deadline_order_and_see_their_own_deadline() -> None:
    clock = ManualClock(start=0.0)
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.monotonic()))

    tasks = [asyncio.create_task(sleeper(n, s)) for n, s in (("late", 3.0), ("early", 1.0), ("mid", 2.0))]
    await clock.settle()
    await clock.advance(10.0)

    assert woke == [("early", 1.0), ("mid", 2.0), ("late", 3.0)]
    assert all(task.done() for task in tasks)


async def test_a_periodic_loop_runs_once_per_period_inside_one_advance() -> None:
    clock = ManualClock()
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            await clock.sleep(1.0)
            ticks.append(clock.monotonic())

    task = asyncio.create_task(ticker())
    await clock.settle()
    await clock.advance(5.0)
    task.cancel()

    assert ticks == [1.0, 2.0, 3.0, 4.0, 5.0]


async def test_zero_sleep_does_not_wait_for_time() -> None:
    clock = ManualClock()
    await asyncio.wait_for(clock.sleep(0), timeout=1.0)
    assert clock.sleepers == 0


async def test_cancelled_sleeper_is_dropped_and_time_cannot_go_back() -> None:
    clock = ManualClock()
    sleeper = asyncio.create_task(clock.sleep(2.0))
    await clock.settle()
    assert clock.sleepers == 1
    sleeper.cancel()
    await clock.settle()

    assert clock.sleepers == 0
    await clock.advance(3.0)  # waking a cancelled sleeper must not fail
    with pytest.raises(ValueError, match="forward"):
        await clock.advance(-1.0)

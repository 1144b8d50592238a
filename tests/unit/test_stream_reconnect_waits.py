"""How long a stream waits before it connects again when the REST call it needs is refused. The venue's own
word sets a later attempt (a ban's end: right after it, not a backoff step later, r82), never an earlier one
than the backoff: a ban's end already past by our clock while the venue still refuses, or a Retry-After of 0,
made the account stream try again seven times a second (r83). Counted over real time: a slow machine only
makes fewer attempts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from engine.exchange.errors import Banned, ExchangeError, RateLimited
from engine.venues.stream_client import ReconnectingSocket, StreamSettings

SETTINGS = StreamSettings(backoff_initial_seconds=0.5, backoff_max_seconds=30.0)


async def _attempts(refusal: Callable[[], ExchangeError], seconds: float) -> list[float]:
    socket = ReconnectingSocket("binance", "account", SETTINGS, session=lambda: None)  # type: ignore[arg-type,return-value]
    started = time.monotonic()
    attempts: list[float] = []

    async def url() -> str:
        attempts.append(time.monotonic() - started)
        raise refusal()

    async def nothing(*_: object) -> None:
        return None

    task = asyncio.create_task(socket.run(url, nothing, nothing))
    await asyncio.sleep(seconds)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return attempts


@pytest.mark.parametrize(
    "refusal",
    [
        lambda: Banned(time.time() - 0.5, "banned (HTTP 418)"),  # its end past by our clock
        lambda: RateLimited(0.0, "HTTP 429, Retry-After 0"),
    ],
    ids=["ban-end-already-past", "retry-after-0"],
)
async def test_a_refusal_saying_now_is_no_tighter_than_the_backoff(
    refusal: Callable[[], ExchangeError],
) -> None:
    # The backoff: 0.25–0.5 s, then 0.5–1, 1–2 s: at most four attempts in 3 s.
    assert len(await _attempts(refusal, 3.0)) <= 4


async def test_a_ban_ending_later_than_the_backoff_is_tried_again_at_its_end_not_before() -> None:
    ends = time.time() + 2.0
    attempts = await _attempts(lambda: Banned(ends, "banned (HTTP 418)"), 4.0)
    # Nothing sent into the ban after the first refusal (the backoff's step was 0.25–0.5 s), and the next
    # attempt right after its end, not a backoff step later (generous: a loaded machine).
    assert len(attempts) >= 2, attempts
    assert 2.0 <= attempts[1] < 3.5, attempts

"""A venue call is cancelled (the engine stops, a guard ends) at the moment its request fails. The call's
wrappers awaited the request only when it was still running, so a request that had already failed was
left with its exception never retrieved: asyncio logged "Task exception was never retrieved" with a
traceback whenever the garbage collector found it, at a time nobody chose (after an engine's stop, in the
operator's log). On CPython 3.11 a traceback formatted by the collector in the middle of another
`ast.parse` corrupts the parser's recursion count: it ended a CI run with "SystemError: AST constructor
recursion depth mismatch" although every test passed."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable

import pytest

from engine.clock import ManualClock, with_timeout
from engine.pacing import Lane, call_with_send_timeout


class RequestFailed(Exception):
    pass


CALLS: dict[str, Callable[[ManualClock, Awaitable[object]], Awaitable[object]]] = {
    "with_timeout": lambda clock, work: with_timeout(clock, 10.0, work),
    "call_with_send_timeout": lambda clock, work: call_with_send_timeout(clock, 10.0, work, Lane.PROTECTIVE),
}


async def _cancelled_as_its_request_fails(call: str, told: list[str]) -> None:
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: told.append(context["message"]))
    clock = ManualClock()
    request: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    caller = asyncio.ensure_future(CALLS[call](clock, request))
    await asyncio.sleep(0)  # the call waits for its request
    assert not caller.done()
    request.set_exception(RequestFailed("no order 'x' on BTCUSDT"))
    caller.cancel()  # the same moment: the caller resumes with the cancellation, the request has failed
    (outcome,) = await asyncio.gather(caller, return_exceptions=True)
    assert isinstance(outcome, asyncio.CancelledError)


@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_call_cancelled_as_its_request_fails_leaves_no_unretrieved_failure(call: str) -> None:
    told: list[str] = []
    asyncio.run(_cancelled_as_its_request_fails(call, told))  # (its own loop: nothing else holds the call)
    gc.collect()
    assert told == []

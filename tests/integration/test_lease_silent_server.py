"""The account lease on a server that accepts its connection and then answers nothing (frozen, or cut off
from this host alone): taking the lease fails within its bound, so the engine's lease loop tries again
instead of waiting on it for good (entries stayed paused while it waited)."""

from __future__ import annotations

import asyncio

import pytest

from storage.database import Database
from storage.lease import LEASE_TIMEOUT_SECONDS, EngineLease
from tests.support.pg_proxy import SilentFromProxy


async def test_taking_the_lease_from_a_server_gone_silent_fails_within_its_bound(
    db: Database, pg_server
) -> None:
    # Its transaction's BEGIN (a simple query) is the first thing it sends: it goes unanswered.
    proxy = await SilentFromProxy.in_front_of(pg_server.socket_dir, db.target.dsn, silent_from=b"Q")
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout(LEASE_TIMEOUT_SECONDS * 3):
            with pytest.raises(TimeoutError):
                await EngineLease.acquire(proxy.dsn, "sim", "sim:default", "test")
    except TimeoutError:
        pytest.fail(f"taking the lease still waited after {LEASE_TIMEOUT_SECONDS * 3:g}s")
    finally:
        await proxy.close()
    took = loop.time() - started
    assert proxy.held == 1
    assert took < LEASE_TIMEOUT_SECONDS * 2 + 2, took  # its BEGIN's bound, and its goodbye's
    # Nothing was taken: an engine on the server itself takes the lease at once.
    lease = await EngineLease.acquire(db.target.dsn, "sim", "sim:default", "test")
    await lease.release()

"""Running the emulator: bind it to the loopback interface, report where, serve until told to stop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from engine.venues.bybit_emulator.app import LOOPBACK_HOST, BybitEmulator

logger = logging.getLogger(__name__)

_SHUTDOWN_TIMEOUT_SECONDS = 2.0


@asynccontextmanager
async def running(emulator: BybitEmulator, port: int = 0) -> AsyncIterator[str]:
    """Serve `emulator` on 127.0.0.1:`port` (0: a free port) and yield its base URL; stop on exit."""
    runner = web.AppRunner(emulator.build_app(), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_SECONDS)
    await runner.setup()
    try:
        site = web.TCPSite(runner, LOOPBACK_HOST, port)
        await site.start()
        bound_port = next(address[1] for address in runner.addresses if isinstance(address, tuple))
        url = f"http://{LOOPBACK_HOST}:{bound_port}"
        logger.info("emulator: serving Bybit v5 (linear) on %s", url)
        yield url
    finally:
        await runner.cleanup()


async def serve_until(emulator: BybitEmulator, port: int, stop: asyncio.Event, on_ready) -> None:  # type: ignore[no-untyped-def]
    """Serve until `stop` is set; `on_ready(url)` is called once the socket listens."""
    async with running(emulator, port) as url:
        on_ready(url)
        await stop.wait()

"""The protection manager's hedged reads (`ProtectionManager.read`, `let_finish`) on the sim venue: a read
whose answer is late is sent once more, the first answer wins, and no copy's failure is left unlooked-at."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from engine.clock import ManualClock
from engine.exchange.errors import NotFound
from storage.database import Database
from tests.integration.engine_support import make_engine
from tests.integration.test_failure_modes_f1_f5 import SYMBOLS, settings_for
from tests.support.driving import drive


async def test_a_copy_no_longer_needed_leaves_no_failure_unretrieved(db: Database) -> None:
    """The Binance-wire emulator soak logged an ERROR with a traceback, "Task exception was never retrieved":
    a copy of an entry's look-up that had answered "no order" once another answer had settled the read.
    A finished copy handed to `let_finish` (an answer no longer needed) has its failure looked at."""
    clock = ManualClock()
    engine = make_engine(settings_for(db), clock)
    await drive(clock, engine.start())
    reported: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        manager = engine.manager
        assert manager is not None
        copy = asyncio.ensure_future(engine.venue.fetch_order(SYMBOLS[40], "tsbnone0000-9-en0"))
        await drive(clock, asyncio.wait({copy}))
        assert isinstance(copy.exception(), NotFound)  # (what the soak's copy answered; read here first)
        # A second one, its failure looked at by nobody but `let_finish`.
        second = asyncio.ensure_future(engine.venue.fetch_order(SYMBOLS[40], "tsbnone0000-9-en1"))
        await drive(clock, asyncio.wait({second}))
        manager.let_finish(second)
        del copy, second
        gc.collect()  # an unlooked-at failure is reported when its task is collected
        await asyncio.sleep(0)
        assert not [c for c in reported if "never retrieved" in str(c.get("message", ""))], reported
    finally:
        loop.set_exception_handler(None)
        await drive(clock, engine.stop())

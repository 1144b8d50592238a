"""Building engines for integration tests: real PostgreSQL (a fresh database per test), the sim venue on a
ManualClock, configuration through the same loader operators use."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Mapping
from decimal import Decimal
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from engine.clock import ManualClock, SystemClock
from engine.config import Settings, load_config
from engine.engine import Engine, build_venue
from engine.events import SignalRejected
from engine.exchange.errors import Banned, ExchangeError
from engine.exchange.port import OrderSide
from engine.venues.sim import SimVenue
from engine.venues.sim.core import SimCore
from engine.venues.sim.settings import CallKind, FaultKind
from storage.database import Database
from tests.support.driving import drive_until


def engine_settings(dsn: str, overrides: Mapping[str, str] | None = None) -> Settings:
    """Settings for a test engine: `overrides` are `SECTION__KEY` → value, as in TSBOT_ variables."""
    environ = {
        "TSBOT_DATABASE__DSN": dsn,
        "TSBOT_SIGNALS__SOURCE": "postgres",
        "TSBOT_VENUE__SIM__VOLATILITY": "0",
        "TSBOT_VENUE__SIM__LATENCY__SECONDS": "0.05",
        "TSBOT_LOGGING__FILE": str(logs_of(dsn) / "trading_bot.log"),
    }
    environ.update({f"TSBOT_{key}": value for key, value in (overrides or {}).items()})
    return load_config(None, environ=environ, cwd=Path("/nonexistent-config-dir")).settings


def logs_of(dsn: str) -> Path:
    """The log directory of the engines on the test database `dsn`: the files an engine writes beside its log
    (the last stop's record, the outage journal) are one test's own. At the default `logs/` every test shared
    one last-stop record per venue and account: a test read another's, written meanwhile on another
    worker (a CI run's "open_positions 0" where this test's engine had written 2)."""
    parts = urlsplit(dsn)
    database = parts.path.lstrip("/") or "postgres"
    hosts = parse_qs(parts.query).get("host")
    if not hosts:  # (a server of its own, not the embedded one)
        return Path(tempfile.gettempdir()) / "tsbot-test-engine-logs" / database
    return Path(hosts[0]).parent / "engine-logs" / database


def make_engine(
    settings: Settings, clock: ManualClock, venue: SimVenue | None = None, *, read_lag: float | None = None
) -> Engine:
    """`read_lag`: the sim venue built here reads conditional orders back as unknown for that long after
    their placement (the venue's read-after-write lag)."""
    if venue is None:
        venue = SimVenue(settings.venue.sim, clock=clock)
        if read_lag is not None:
            venue.set_read_lag(read_lag)
    return Engine(settings, venue=venue, clock=clock, version="test")


def binance_wire_engine(
    dsn: str, base_url: str, key: str, secret: str, overrides: Mapping[str, str] | None = None
) -> Engine:
    """An engine on the Binance-wire emulator at `base_url` (real ccxt, real time), with `overrides`."""
    return wire_engine("binanceusdm", dsn, base_url, key, secret, overrides)


def wire_engine(
    kind: str, dsn: str, base_url: str, key: str, secret: str, overrides: Mapping[str, str] | None = None
) -> Engine:
    """An engine on the `kind` venue's wire emulator at `base_url` (real ccxt, real time): configured as
    for the real venue, only the URL differs."""
    settings = engine_settings(
        dsn,
        {
            "VENUE__KIND": kind,
            "VENUE__BASE_URL": base_url,
            "VENUE__API_KEY": key,
            "VENUE__API_SECRET": secret,
            **(overrides or {}),
        },
    )
    clock = SystemClock()
    return Engine(settings, venue=build_venue(settings, clock), clock=clock, version="test")


@contextlib.asynccontextmanager
async def rejections(engine: Engine) -> AsyncIterator[list[SignalRejected]]:
    """The signals `engine` rejects while the block runs, as its events say them, in order."""
    rejected: list[SignalRejected] = []

    async def follow() -> None:
        async for event in engine.events():
            if isinstance(event, SignalRejected):
                rejected.append(event)

    follower = asyncio.create_task(follow(), name="test-rejections")
    await asyncio.sleep(0)  # subscribed before the block sends anything
    try:
        yield rejected
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)


async def until_closed_in_db(
    db: Database,
    clock: ManualClock,
    position_id: int,
    *,
    what: str = "the position closed in the database",
    step: float = 0.05,
    limit: float = 30.0,
) -> None:
    """Advance `clock` until the operators' SQL shows the position closed (at most `limit` virtual s)."""
    await drive_until(
        clock,
        lambda: db.pool.fetchval(
            "SELECT status = 'closed' FROM monitoring.positions WHERE id = $1", position_id
        ),
        what=what,
        step=step,
        limit=limit,
    )


VENUE_READS = (CallKind.FETCH_OPEN_ORDERS, CallKind.FETCH_ORDER, CallKind.FETCH_POSITIONS)


def reads_fail(venue: SimVenue, *kinds: CallKind) -> None:
    """Every read of those kinds (by default all the venue's reads of orders and positions) answers HTTP 500
    until `venue.clear_injected_faults()`."""
    for kind in kinds or VENUE_READS:
        venue.inject_fault(kind, FaultKind.SERVER_ERROR, count=100_000)


def banned_by_another_client(core: SimCore, clock: ManualClock, symbol: str) -> float:
    """Another client on the account fills the order window (reduce-only sells of `symbol`, refused or not)
    until the venue bans the account; when the ban ends (epoch seconds)."""
    for i in range(100):
        try:
            core.place_market_order(
                symbol, OrderSide.SELL, Decimal(1), f"other-{i}", clock.now(), reduce_only=True
            )
        except Banned as ban:
            return ban.until
        except ExchangeError:
            pass
    raise AssertionError("the venue never banned the account")

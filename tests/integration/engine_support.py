"""Building engines for integration tests: real PostgreSQL (a fresh database per test), the sim venue on a
ManualClock, configuration through the same loader operators use."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from engine.clock import ManualClock
from engine.config import Settings, load_config
from engine.engine import Engine
from engine.venues.sim import SimVenue


def engine_settings(dsn: str, overrides: Mapping[str, str] | None = None) -> Settings:
    """Settings for a test engine: `overrides` are `SECTION__KEY` → value, as in TSBOT_ variables."""
    environ = {
        "TSBOT_DATABASE__DSN": dsn,
        "TSBOT_SIGNALS__SOURCE": "postgres",
        "TSBOT_VENUE__SIM__VOLATILITY": "0",
        "TSBOT_VENUE__SIM__LATENCY__SECONDS": "0.05",
    }
    environ.update({f"TSBOT_{key}": value for key, value in (overrides or {}).items()})
    return load_config(None, environ=environ, cwd=Path("/nonexistent-config-dir")).settings


def make_engine(settings: Settings, clock: ManualClock, venue: SimVenue | None = None) -> Engine:
    venue = venue or SimVenue(settings.venue.sim, clock=clock)
    return Engine(settings, venue=venue, clock=clock, version="test")

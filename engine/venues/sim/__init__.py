"""The offline sim venue: a seeded, deterministic stand-in for Binance USDⓈ-M perpetuals.

`SimVenue` implements the exchange port; `SimCore` is the synchronous matching core behind it.
"""

from engine.venues.sim.book import SimBookError, SimBookFile, sim_book_path
from engine.venues.sim.core import SimCore
from engine.venues.sim.settings import CallKind, FaultKind, SimVenueSettings
from engine.venues.sim.venue import SimVenue

__all__ = [
    "CallKind",
    "FaultKind",
    "SimBookError",
    "SimBookFile",
    "SimCore",
    "SimVenue",
    "SimVenueSettings",
    "sim_book_path",
]

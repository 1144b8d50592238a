"""A local Binance USDⓈ-M REST emulator backed by the sim venue's core: `tsbot sim-exchange`.

It lets the real ccxt adapter trade over real HTTP with real signing on loopback, for tests and for
rehearsing live operation offline.
"""

from engine.venues.binance_emulator.app import LOOPBACK_HOST, BinanceEmulator
from engine.venues.binance_emulator.faults import (
    TARGETS_BY_CALL,
    FaultPlan,
    FaultSpecError,
    parse_fault_spec,
)
from engine.venues.binance_emulator.server import running, serve_until

__all__ = [
    "LOOPBACK_HOST",
    "TARGETS_BY_CALL",
    "BinanceEmulator",
    "FaultPlan",
    "FaultSpecError",
    "parse_fault_spec",
    "running",
    "serve_until",
]

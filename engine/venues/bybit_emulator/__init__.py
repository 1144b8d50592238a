"""A local Bybit v5 (linear, unified account) REST emulator backed by the sim venue's core:
`tsbot sim-exchange --venue bybit`. The real ccxt adapter trades against it over real HTTP with real
signing on loopback, for tests and for rehearsing live operation offline."""

from engine.venues.bybit_emulator.app import LOOPBACK_HOST, BybitEmulator
from engine.venues.bybit_emulator.faults import TARGETS_BY_CALL, FaultPlan, FaultSpecError, parse_fault_spec
from engine.venues.bybit_emulator.limits import BybitLimiter
from engine.venues.bybit_emulator.server import running, serve_until

__all__ = [
    "LOOPBACK_HOST",
    "TARGETS_BY_CALL",
    "BybitEmulator",
    "BybitLimiter",
    "FaultPlan",
    "FaultSpecError",
    "parse_fault_spec",
    "running",
    "serve_until",
]

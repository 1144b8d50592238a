"""Faults of the Bybit-wire emulator: the `--faults SPEC` grammar of the Binance emulator
(`TARGET=FAULT[@PROBABILITY]`, seeded draws, forced faults from the control API), with Bybit's endpoints.

TARGET: an endpoint below, optionally with a method (`POST:order/create`), or `*`. FAULT and what the
client sees, on Bybit's wire:

* `latency:MS`: answered MS ms late, executed normally;
* `timeout`: executed, the answer held back until the client has given up (an ambiguous outcome);
* `unknown`: executed, then HTTP 502 (a gateway error: the outcome is unknown to the client);
* `busy`: not executed, HTTP 200 `retCode` 10016 "Internal server error" (Bybit's server error: the client
  cannot tell whether it was executed);
* `error`: not executed, HTTP 500;
* `ratelimit`: not executed, HTTP 200 `retCode` 10006 "Too many visits!" (an answer only);
* `ban`: not executed, HTTP 403 "access too frequent" (an answer only: no ban is in force afterwards).

The Binance emulator's order traits (`lag`, `triggering`, `stuck`) belong to Binance's algo service and
are refused here: Bybit's position stops are read back from the position itself.
"""

from __future__ import annotations

from engine.venues.binance_emulator.faults import (
    EmulatorFaultKind,
    Fault,
    FaultPlan,
    FaultRule,
    FaultSpecError,
    Target,
    parse_fault,
)

ENDPOINTS: frozenset[str] = frozenset(
    {
        "market/time",
        "market/instruments-info",
        "market/tickers",
        "account/wallet-balance",
        "position/list",
        "position/set-leverage",
        "position/trading-stop",
        "order/create",
        "order/realtime",
        "order/history",
        "execution/list",
    }
)
METHODS: frozenset[str] = frozenset({"GET", "POST"})

# The emulator endpoints behind each kind of port call (the sim venue's `CallKind` values).
TARGETS_BY_CALL: dict[str, tuple[str, ...]] = {
    "load_markets": ("GET:market/instruments-info",),
    "fetch_mark_prices": ("GET:market/tickers",),
    "fetch_balance": ("GET:account/wallet-balance",),
    "fetch_positions": ("GET:position/list",),
    "fetch_open_orders": ("GET:order/realtime",),
    "fetch_order": ("GET:order/realtime", "GET:order/history"),
    "set_leverage": ("POST:position/set-leverage",),
    "create_order": ("POST:order/create", "POST:position/trading-stop"),
    "cancel_order": ("POST:position/trading-stop",),
}


def parse_target(text: str) -> Target:
    text = text.strip()
    method: str | None = None
    if ":" in text:
        method_text, text = text.split(":", 1)
        method = method_text.strip().upper()
        if method not in METHODS:
            raise FaultSpecError(f"unknown method {method_text!r}: expected GET or POST")
    endpoint = text.strip()
    if endpoint != "*" and endpoint not in ENDPOINTS:
        raise FaultSpecError(
            f"unknown endpoint {endpoint!r}: expected * or one of {', '.join(sorted(ENDPOINTS))}"
        )
    return Target(method, endpoint)


def parse_bybit_fault(text: str, hold_seconds: float = 30.0) -> Fault:
    fault = parse_fault(text, hold_seconds=hold_seconds)
    if fault.kind.is_order_trait:
        raise FaultSpecError(f"{fault.kind.value} is a Binance algo-order trait; Bybit has no such orders")
    return fault


def parse_fault_spec(spec: str) -> tuple[FaultRule, ...]:
    """Parse `--faults` for the Bybit emulator; an empty spec means no faults."""
    rules: list[FaultRule] = []
    for part in (p for p in spec.split(",") if p.strip()):
        target_text, sep, rest = part.partition("=")
        if not sep:
            raise FaultSpecError(f"rule {part.strip()!r} is not TARGET=FAULT[@PROBABILITY]")
        fault_text, _, probability_text = rest.partition("@")
        try:
            probability = float(probability_text) if probability_text.strip() else 1.0
        except ValueError:
            raise FaultSpecError(f"probability {probability_text!r} is not a number") from None
        if not 0.0 <= probability <= 1.0:
            raise FaultSpecError(f"probability must be within 0..1, got {probability_text.strip()}")
        rules.append(FaultRule(parse_target(target_text), parse_bybit_fault(fault_text), probability))
    return tuple(rules)


__all__ = [
    "ENDPOINTS",
    "TARGETS_BY_CALL",
    "EmulatorFaultKind",
    "Fault",
    "FaultPlan",
    "FaultSpecError",
    "parse_bybit_fault",
    "parse_fault_spec",
    "parse_target",
]

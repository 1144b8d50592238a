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
* `ratelimit`: not executed, HTTP 200 `retCode` 10006 "Too many visits!" (an answer only), on a limited
  endpoint with its `X-Bapi-Limit` headers: none left, the reset a second on;
* `ban`: not executed, HTTP 403 "access too frequent", and the IP banned as Bybit bans it (the limiter's
  `ban_seconds`, 10 minutes by default): every request until then gets the same 403;
* `async:SECONDS` (`POST:order/create` only): executed as Bybit documents order creation, asynchronously:
  answered at once with the order's ids, the market order `New` (in `order/realtime`, on the `order`
  topic) and no position for SECONDS, then filled (its execution, the position, a `stopLoss` sent with
  it). Reduce-only orders execute at once;
* `cursor` (paged GET endpoints only): executed, the answer's `nextPageCursor` addressing the page just
  served instead of the next one (or none), so asking for it serves the same page and cursor again, as
  Bybit has done (nautilus_trader #5019): a walk that waits for an empty cursor never ends.

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
CREATE_ORDER = ("POST", "order/create")
# The GET endpoints whose lists are paged by cursor.
PAGED: tuple[str, ...] = (
    "market/instruments-info",
    "position/list",
    "order/realtime",
    "order/history",
    "execution/list",
)

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
    if fault.kind is EmulatorFaultKind.BAN and fault.seconds:
        raise FaultSpecError("Bybit's 403 ban lasts its 10 minutes (`ban` takes no seconds here)")
    return fault


def require_order_create_target(targets: tuple[Target, ...], fault: Fault) -> None:
    """`async` is about the order `POST order/create` places, `cursor` about a paged list: their targets
    must be able to match such a request."""
    if fault.kind is EmulatorFaultKind.ASYNC and not any(t.matches(*CREATE_ORDER) for t in targets):
        raise FaultSpecError(
            "async is drawn when a market order is placed: target POST:order/create (or order/create, *), "
            f"got {', '.join(repr(str(t)) for t in targets)}"
        )
    if fault.kind is EmulatorFaultKind.CURSOR and not any(
        t.matches("GET", endpoint) for t in targets for endpoint in PAGED
    ):
        raise FaultSpecError(
            f"cursor is about a paged list: target one of {', '.join(PAGED)} (or *), "
            f"got {', '.join(repr(str(t)) for t in targets)}"
        )


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
        target, fault = parse_target(target_text), parse_bybit_fault(fault_text)
        require_order_create_target((target,), fault)
        rules.append(FaultRule(target, fault, probability))
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
    "require_order_create_target",
]

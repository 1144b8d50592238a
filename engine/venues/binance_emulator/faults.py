"""Faults of the Binance-wire emulator, per endpoint: the `--faults SPEC` grammar and the seeded draws.

SPEC is a comma-separated list of rules `TARGET=FAULT[@PROBABILITY]`:

* TARGET: an endpoint name (`order`, `algoOrder`, `openAlgoOrders`, `positionRisk`, `balance`, `leverage`,
  `premiumIndex`, `exchangeInfo`, `time`), optionally with a method (`POST:algoOrder`), or `*` for all;
* FAULT: `latency:MS` (answer MS milliseconds late, executed normally), `timeout` (executed, the answer is
  held back until the client has given up: an ambiguous outcome), `unknown` (executed, then HTTP 503
  -1007 "execution status unknown"), `busy` (not executed: HTTP 503 -1008, server overloaded), `error`
  (not executed: HTTP 500), `ratelimit` (not executed: HTTP 429 with Retry-After), `ban` (not executed:
  HTTP 418 with the ban's end);
* PROBABILITY: 0..1, default 1 (every matching request).

Example: `POST:algoOrder=timeout@0.1,positionRisk=latency:800,*=busy@0.01`.

Tests (through the control API) can also force the next N requests of a set of targets to suffer a fault;
forced faults are used before any random draw.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from enum import StrEnum

ENDPOINTS: frozenset[str] = frozenset(
    {
        "ping",
        "time",
        "exchangeInfo",
        "premiumIndex",
        "balance",
        "positionRisk",
        "leverage",
        "order",
        "algoOrder",
        "openAlgoOrders",
    }
)
METHODS: frozenset[str] = frozenset({"GET", "POST", "DELETE"})

# The emulator endpoints behind each kind of port call (the sim venue's `CallKind` values), so a test can
# say "fail the next create_order" without knowing which endpoint the adapter picks.
TARGETS_BY_CALL: dict[str, tuple[str, ...]] = {
    "load_markets": ("GET:exchangeInfo",),
    "fetch_mark_prices": ("GET:premiumIndex",),
    "fetch_balance": ("GET:balance",),
    "fetch_positions": ("GET:positionRisk",),
    "fetch_open_orders": ("GET:openAlgoOrders",),
    "fetch_order": ("GET:order", "GET:algoOrder"),
    "set_leverage": ("POST:leverage",),
    "create_order": ("POST:order", "POST:algoOrder"),
    "cancel_order": ("DELETE:order", "DELETE:algoOrder"),
}


class FaultSpecError(ValueError):
    """A `--faults` specification that cannot be parsed; the message names the bad part."""


class EmulatorFaultKind(StrEnum):
    LATENCY = "latency"
    TIMEOUT = "timeout"
    UNKNOWN = "unknown"
    BUSY = "busy"
    ERROR = "error"
    RATELIMIT = "ratelimit"
    BAN = "ban"

    @property
    def executes(self) -> bool:
        """Whether the request is executed before the fault shows (ambiguous outcomes and latency)."""
        return self in (EmulatorFaultKind.LATENCY, EmulatorFaultKind.TIMEOUT, EmulatorFaultKind.UNKNOWN)


@dataclass(frozen=True, slots=True)
class Fault:
    kind: EmulatorFaultKind
    latency_ms: int = 0  # LATENCY only
    hold_seconds: float = 30.0  # TIMEOUT: how long the answer is held back


@dataclass(frozen=True, slots=True)
class Target:
    method: str | None  # None: any method
    endpoint: str  # "*" for every endpoint

    def matches(self, method: str, endpoint: str) -> bool:
        return (self.method is None or self.method == method) and self.endpoint in ("*", endpoint)

    @classmethod
    def parse(cls, text: str) -> Target:
        text = text.strip()
        method: str | None = None
        if ":" in text:
            method_text, text = text.split(":", 1)
            method = method_text.strip().upper()
            if method not in METHODS:
                raise FaultSpecError(f"unknown method {method_text!r}: expected one of GET, POST, DELETE")
        endpoint = text.strip()
        if endpoint != "*" and endpoint not in ENDPOINTS:
            raise FaultSpecError(
                f"unknown endpoint {endpoint!r}: expected * or one of {', '.join(sorted(ENDPOINTS))}"
            )
        return cls(method, endpoint)


@dataclass(frozen=True, slots=True)
class FaultRule:
    target: Target
    fault: Fault
    probability: float


def parse_fault(text: str, hold_seconds: float = 30.0) -> Fault:
    name, _, argument = text.strip().partition(":")
    try:
        kind = EmulatorFaultKind(name.strip().lower())
    except ValueError:
        expected = ", ".join(k.value for k in EmulatorFaultKind)
        raise FaultSpecError(f"unknown fault {name!r}: expected one of {expected}") from None
    if kind is EmulatorFaultKind.LATENCY:
        try:
            latency_ms = int(argument)
        except ValueError:
            raise FaultSpecError(f"latency needs milliseconds, e.g. latency:250, got {text!r}") from None
        if not 0 <= latency_ms <= 600_000:
            raise FaultSpecError(f"latency must be within 0..600000 ms, got {latency_ms}")
        return Fault(kind, latency_ms=latency_ms)
    if argument:
        raise FaultSpecError(f"fault {kind.value!r} takes no argument, got {text!r}")
    return Fault(kind, hold_seconds=hold_seconds)


def parse_fault_spec(spec: str) -> tuple[FaultRule, ...]:
    """Parse `--faults`; an empty spec means no faults."""
    rules: list[FaultRule] = []
    for part in (p for p in spec.split(",") if p.strip()):
        target_text, sep, rest = part.partition("=")
        if not sep:
            raise FaultSpecError(f"rule {part.strip()!r} is not TARGET=FAULT[@PROBABILITY]")
        fault_text, _, probability_text = rest.partition("@")
        probability = 1.0
        if probability_text:
            try:
                probability = float(probability_text)
            except ValueError:
                raise FaultSpecError(f"probability {probability_text!r} is not a number") from None
            if not 0.0 <= probability <= 1.0:
                raise FaultSpecError(f"probability must be within 0..1, got {probability_text}")
        rules.append(FaultRule(Target.parse(target_text), parse_fault(fault_text), probability))
    return tuple(rules)


@dataclass(slots=True)
class _Forced:
    targets: tuple[Target, ...]
    fault: Fault
    remaining: int


class FaultPlan:
    """Which fault (if any) hits a request: forced faults first, then one seeded draw per matching rule."""

    def __init__(self, rules: tuple[FaultRule, ...] = (), seed: int = 0, latency_ms: int = 0) -> None:
        self._rules = rules
        self._rng = random.Random(f"emulator-faults:{seed}")
        self._forced: deque[_Forced] = deque()
        self.base_latency_ms = latency_ms

    def force(self, targets: tuple[Target, ...], fault: Fault, count: int = 1) -> None:
        if count < 1:
            raise ValueError("count must be >= 1")
        self._forced.append(_Forced(targets, fault, count))

    def clear_forced(self) -> None:
        self._forced.clear()

    def draw(self, method: str, endpoint: str) -> Fault | None:
        for forced in self._forced:
            if any(t.matches(method, endpoint) for t in forced.targets):
                forced.remaining -= 1
                if forced.remaining <= 0:
                    self._forced.remove(forced)
                return forced.fault
        for rule in self._rules:
            if rule.target.matches(method, endpoint) and self._rng.random() < rule.probability:
                return rule.fault
        return None

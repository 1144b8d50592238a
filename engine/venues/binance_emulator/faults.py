"""Faults of the Binance-wire emulator, per endpoint: the `--faults SPEC` grammar and the seeded draws.

SPEC is a comma-separated list of rules `TARGET=FAULT[@PROBABILITY]`:

* TARGET: an endpoint name (`order`, `algoOrder`, `openAlgoOrders`, `positionRisk`, `balance`, `leverage`,
  `premiumIndex`, `exchangeInfo`, `time`, `listenKey`), optionally with a method (`POST:algoOrder`,
  `PUT:listenKey`), or `*` for all;
* FAULT, one of the request faults: `latency:MS` (answer MS milliseconds late, executed normally),
  `timeout` (executed, the answer is held back until the client has given up: an ambiguous outcome),
  `unknown` (executed, then HTTP 503 -1007 "execution status unknown"), `busy` (not executed: HTTP 503
  -1008, server overloaded), `error` (not executed: HTTP 500), `ratelimit` (not executed: HTTP 429 with
  Retry-After), `ban` or `ban:SECONDS` (not executed: HTTP 418, and the IP banned for 2 s, or SECONDS:
  every request refused until then; the websockets go on, as Binance's 418 tells a client to use them);
  or one of the order traits, drawn when an algo order is placed (POST algoOrder; the target must be able
  to match it: `POST:algoOrder`, `algoOrder` or `*`) and carried by that order for its life: `lag:SECONDS`
  (for SECONDS after placement the order answers GET/DELETE algoOrder with -2013 / -2011 and is missing
  from openAlgoOrders, yet it exists, triggers and holds its clientAlgoId), `triggering:SECONDS` (once it
  fires it sits SECONDS in TRIGGERING before the matching engine fills it), `stuck` (it never leaves
  TRIGGERING). A placement can carry several traits; a request fault on the same request still applies;
* PROBABILITY: 0..1, default 1 (every matching request).

Example: `POST:algoOrder=timeout@0.1,positionRisk=latency:800,*=busy@0.01,POST:algoOrder=lag:3@0.5`.

Tests (through the control API) can also force the next N requests of a set of targets to suffer a fault;
forced faults are used before any random draw. A forced order trait is used up only by an algo order the
venue accepted (a refused placement leaves it for the next one), and regular orders never touch it.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

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
        "listenKey",
    }
)
METHODS: frozenset[str] = frozenset({"GET", "POST", "PUT", "DELETE"})

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


def control_target_texts(
    body: Mapping[str, Any], targets_by_call: Mapping[str, Sequence[str]] | None = None
) -> list[str]:
    """The control API's fault targets: those of its `call` (a name of `targets_by_call`), else its
    `targets`, a list of "METHOD:path" or one such string alone. A string used to be read one character at
    a time ("unknown endpoint 'P'"); anything else is refused, naming the field, and an unknown call names
    the known ones (an operator met "unknown call 'POST:order'" and had to read the source)."""
    if targets_by_call is not None and "call" in body:
        call = str(body["call"])
        if call not in targets_by_call:
            raise FaultSpecError(
                f"unknown call {call!r}: expected one of {', '.join(sorted(targets_by_call))}, or "
                '"targets": a list of "METHOD:path"'
            )
        return list(targets_by_call[call])
    targets = body.get("targets", [])
    if isinstance(targets, str):
        return [targets]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise FaultSpecError('targets must be a list of "METHOD:path" strings (or one such string)')
    return list(targets)


class EmulatorFaultKind(StrEnum):
    LATENCY = "latency"
    TIMEOUT = "timeout"
    UNKNOWN = "unknown"
    BUSY = "busy"
    ERROR = "error"
    RATELIMIT = "ratelimit"
    BAN = "ban"
    # Order traits: not about the request, about the algo order it places.
    LAG = "lag"
    TRIGGERING = "triggering"
    STUCK = "stuck"
    # Bybit's asynchronous order creation: the market order is answered with its ids at once and executes
    # SECONDS later (New meanwhile). A request fault of Bybit's `POST order/create`; Binance refuses it.
    ASYNC = "async"
    # Bybit's cursor-paged lists: the answer's nextPageCursor addresses the page just served, so asking for
    # it serves that page again (Bybit has done so: nautilus_trader #5019). A request fault of Bybit's
    # paged GET endpoints; Binance refuses it.
    CURSOR = "cursor"

    @property
    def executes(self) -> bool:
        """Whether the request is executed before the fault shows (ambiguous outcomes and latency)."""
        return self in (EmulatorFaultKind.LATENCY, EmulatorFaultKind.TIMEOUT, EmulatorFaultKind.UNKNOWN)

    @property
    def is_order_trait(self) -> bool:
        return self in _ORDER_TRAITS


_ORDER_TRAITS = frozenset({EmulatorFaultKind.LAG, EmulatorFaultKind.TRIGGERING, EmulatorFaultKind.STUCK})
# The request that places an algo order: the only one order traits are drawn for.
PLACE_ALGO_ORDER = ("POST", "algoOrder")
MAX_BAN_FAULT_SECONDS = 259_200.0  # `ban:SECONDS`: Binance's bans scale "from 2 minutes to 3 days"
# Longest accepted argument of each trait with seconds.
_MAX_SECONDS = {
    EmulatorFaultKind.LAG: 3600.0,
    EmulatorFaultKind.TRIGGERING: 86_400.0,
    EmulatorFaultKind.ASYNC: 60.0,
}
_EXAMPLE_SECONDS = {
    EmulatorFaultKind.LAG: "lag:3",
    EmulatorFaultKind.TRIGGERING: "triggering:5",
    EmulatorFaultKind.ASYNC: "async:0.5",
}


@dataclass(frozen=True, slots=True)
class Fault:
    kind: EmulatorFaultKind
    latency_ms: int = 0  # LATENCY only
    hold_seconds: float = 30.0  # TIMEOUT: how long the answer is held back
    seconds: float = 0.0  # LAG, TRIGGERING, ASYNC; BAN: its length (0: the default)


@dataclass(frozen=True, slots=True)
class OrderTraits:
    """What an algo order carries from its placement: seconds it reads as unknown, and seconds it sits
    TRIGGERING once fired (None: at once; math.inf: stuck)."""

    read_lag: float = 0.0
    trigger_delay: float | None = None


@dataclass(frozen=True, slots=True)
class Target:
    method: str | None  # None: any method
    endpoint: str  # "*" for every endpoint

    def matches(self, method: str, endpoint: str) -> bool:
        return (self.method is None or self.method == method) and self.endpoint in ("*", endpoint)

    def __str__(self) -> str:
        return self.endpoint if self.method is None else f"{self.method}:{self.endpoint}"

    @classmethod
    def parse(cls, text: str) -> Target:
        text = text.strip()
        method: str | None = None
        if ":" in text:
            method_text, text = text.split(":", 1)
            method = method_text.strip().upper()
            if method not in METHODS:
                raise FaultSpecError(
                    f"unknown method {method_text!r}: expected one of GET, POST, PUT, DELETE"
                )
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
    if kind in _MAX_SECONDS:
        try:
            seconds = float(argument)  # "" (no argument) too
        except ValueError:
            raise FaultSpecError(
                f"{kind.value} needs seconds, e.g. {_EXAMPLE_SECONDS[kind]}, got {text.strip()!r}"
            ) from None
        if not 0.0 <= seconds <= _MAX_SECONDS[kind]:  # also refuses nan
            raise FaultSpecError(
                f"{kind.value} must be within 0..{_MAX_SECONDS[kind]:g} seconds, got {argument.strip()}"
            )
        return Fault(kind, seconds=seconds)
    if kind is EmulatorFaultKind.BAN and argument:
        try:
            seconds = float(argument)
        except ValueError:
            raise FaultSpecError(f"ban takes seconds, e.g. ban:120, got {text.strip()!r}") from None
        if not 0.0 < seconds <= MAX_BAN_FAULT_SECONDS:  # also refuses nan
            raise FaultSpecError(
                f"ban must be within 0..{MAX_BAN_FAULT_SECONDS:g} seconds (Binance's longest, 3 days), "
                f"got {argument.strip()}"
            )
        return Fault(kind, seconds=seconds)
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


def require_placement_target(targets: tuple[Target, ...], fault: Fault) -> None:
    """A fault Binance's wire can show: an order trait needs a target that can match the placement of an
    algo order, and `async` (Bybit's) is refused."""
    if fault.kind is EmulatorFaultKind.ASYNC:
        raise FaultSpecError(
            "async is Bybit's asynchronous order creation; Binance answers a market order with its fill"
        )
    if fault.kind is EmulatorFaultKind.CURSOR:
        raise FaultSpecError("cursor is about Bybit's cursor-paged lists; Binance's lists are not paged")
    if fault.kind.is_order_trait and not any(t.matches(*PLACE_ALGO_ORDER) for t in targets):
        raise FaultSpecError(
            f"{fault.kind.value} is drawn when an algo order is placed: target POST:algoOrder (or "
            f"algoOrder, *), got {', '.join(repr(str(t)) for t in targets)}"
        )


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
        target, fault = Target.parse(target_text), parse_fault(fault_text)
        require_placement_target((target,), fault)
        rules.append(FaultRule(target, fault, probability))
    return tuple(rules)


@dataclass(slots=True, eq=False)
class _Forced:
    targets: tuple[Target, ...]
    fault: Fault
    remaining: int


@dataclass(frozen=True, slots=True)
class TraitDraw:
    """The traits drawn for one algo placement; `FaultPlan.commit` it once the venue accepted the order."""

    traits: OrderTraits = OrderTraits()
    forced: tuple[_Forced, ...] = field(default=())


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
        """The request fault for this request, if any (order traits are drawn by `draw_traits`)."""
        for forced in self._forced:
            if forced.fault.kind.is_order_trait:
                continue
            if any(t.matches(method, endpoint) for t in forced.targets):
                self._use(forced)
                return forced.fault
        for rule in self._rules:
            if rule.fault.kind.is_order_trait:
                continue
            if rule.target.matches(method, endpoint) and self._rng.random() < rule.probability:
                return rule.fault
        return None

    def draw_traits(self, method: str, endpoint: str) -> TraitDraw:
        """The order traits for a request that places an algo order (none for any other request): every
        matching forced trait (not used up until `commit`) and every matching rule that draws true."""
        if (method, endpoint) != PLACE_ALGO_ORDER:
            return TraitDraw()
        faults: list[Fault] = []
        forced_used: list[_Forced] = []
        for forced in self._forced:
            if forced.fault.kind.is_order_trait and any(t.matches(method, endpoint) for t in forced.targets):
                faults.append(forced.fault)
                forced_used.append(forced)
        for rule in self._rules:
            matches = rule.fault.kind.is_order_trait and rule.target.matches(method, endpoint)
            if matches and self._rng.random() < rule.probability:
                faults.append(rule.fault)
        read_lag = max((f.seconds for f in faults if f.kind is EmulatorFaultKind.LAG), default=0.0)
        delays = [
            math.inf if f.kind is EmulatorFaultKind.STUCK else f.seconds
            for f in faults
            if f.kind in (EmulatorFaultKind.TRIGGERING, EmulatorFaultKind.STUCK)
        ]
        return TraitDraw(OrderTraits(read_lag, max(delays) if delays else None), tuple(forced_used))

    def commit(self, drawn: TraitDraw) -> None:
        """The algo order the traits were drawn for was accepted: use up the forced ones it carries."""
        for forced in drawn.forced:
            if forced in self._forced:
                self._use(forced)

    def _use(self, forced: _Forced) -> None:
        forced.remaining -= 1
        if forced.remaining <= 0:
            self._forced.remove(forced)

"""The managed trailing stop, as a pure state machine: (state, mark) → (state, decision).

When the venue cannot trail natively (or `protection.trailing.mode = "managed"`), the engine trails in
software: it keeps one reduce-only stop-market order per position (purpose "trailing_stop", separate from
the hard stop-loss, which never moves) and moves it behind the best price. This module decides *when*
and *where* to place and move that order; the protection shell does the I/O and reports the outcome back.

Phases (persisted as lowercase strings in `monitoring.trailing_stop_state.state`) and their transitions::

    armed   ── mark reaches activation: PlaceStop ─────────────────▶ moving
    moving  ── on_stop_confirmed ──────────────────────────────────▶ active
    moving  ── on_stop_failed ─────▶ active (the old stop is still live) or armed (no stop yet)
    active  ── trail improved and interval passed, or emergency: MoveStop ──▶ moving
    any live phase ── on_stop_triggered ──▶ triggered;   ── on_trailing_stopped ──▶ stopped

* `armed`: the mark has not reached the activation price (entry ± activation %); no trailing order
  exists, the hard stop-loss protects. When the mark reaches activation the peak starts and the first
  stop is decided (`PlaceStop`).
* `moving`: a place or move is in flight. The peak is still tracked, but nothing new is decided until
  the shell reports `on_stop_confirmed` or `on_stop_failed`: one order in flight per position, never two.
* `active`: a trailing stop is confirmed live at `stop_price`. The peak (best mark since activation) is
  tracked and the trail, peak × (1 ∓ callback %), is compared with the confirmed stop; a `MoveStop` is decided
  when the trail improves on it by `min_improvement_percent` and `min_move_interval_seconds` have passed
  since the last confirmed move, or at once when the stop lags the trail by more than
  `emergency_move_percent`.
* `triggered` / `stopped`: terminal; the stop fired, or the trail ended for another reason (the position
  closed by the hard stop-loss, by hand, ...). Marks are ignored.

Invariants, each a property test:

* no decision before the mark has reached the activation price;
* a decided stop is strictly on the protective side of the mark it was decided on (a stop at or through
  the mark would be rejected as "would trigger immediately", F8) — otherwise the core holds;
* the stop only moves in the position's favour (long: up, short: down), so protection never decreases;
* `stop_price` is only ever a price the exchange confirmed (F4): a decision changes nothing until the
  shell confirms it, and the shell places the new stop before cancelling the old one (make-before-break,
  F5), which `MoveStop` carries both prices for.

Why pure: no clock, no I/O, no asyncio, no shared state. Time enters only as data (the mark's venue
timestamp, epoch seconds), so every rule is a function of its arguments, replayable from a log and
property-tested over arbitrary price paths; the shell stays thin. Even the decimal context is private
(`_DECIMAL`), so a caller changing the thread's precision or rounding cannot change a stop.

Prices and percents are `Decimal` and everything derives from the position's fill price (F7). The
common tick — no new peak, or not yet activated — returns the *same* state object and the shared `HOLD`:
no allocation, because this runs on every mark tick of every position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import (
    ROUND_CEILING,
    ROUND_FLOOR,
    ROUND_HALF_EVEN,
    Context,
    Decimal,
    DivisionByZero,
    InvalidOperation,
    Overflow,
)
from enum import StrEnum

from engine.exchange.port import PositionSide

__all__ = [
    "CALLBACK_PERCENT_MAX",
    "CALLBACK_PERCENT_MIN",
    "HOLD",
    "Hold",
    "InvalidTrailingParams",
    "InvalidTrailingState",
    "MoveReason",
    "MoveStop",
    "PlaceStop",
    "TrailingDecision",
    "TrailingParams",
    "TrailingPhase",
    "TrailingState",
    "UnexpectedTrailingEvent",
    "on_mark",
    "on_stop_confirmed",
    "on_stop_failed",
    "on_stop_triggered",
    "on_trailing_stopped",
]

# The venue's accepted callback range (Binance callbackRate); the same bounds keep managed trailing honest.
CALLBACK_PERCENT_MIN = Decimal("0.1")
CALLBACK_PERCENT_MAX = Decimal("10")

_HUNDRED = Decimal(100)
_ONE = Decimal(1)

# Private so that the thread's decimal context (which any caller may change) cannot change a stop price.
_DECIMAL = Context(prec=28, rounding=ROUND_HALF_EVEN, traps=[InvalidOperation, DivisionByZero, Overflow])


class TrailingPhase(StrEnum):
    """Where a position's managed trail is. The values are persisted; never rename one."""

    ARMED = "armed"
    ACTIVE = "active"
    MOVING = "moving"
    TRIGGERED = "triggered"
    STOPPED = "stopped"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL_PHASES


_TERMINAL_PHASES = frozenset({TrailingPhase.TRIGGERED, TrailingPhase.STOPPED})

# Module-level aliases: on_mark compares phases by identity on every tick, and a global lookup is
# cheaper than an attribute lookup on the Enum class.
_ARMED = TrailingPhase.ARMED
_ACTIVE = TrailingPhase.ACTIVE
_MOVING = TrailingPhase.MOVING


class MoveReason(StrEnum):
    TRAIL = "trail"  # the trail improved enough and the move interval has passed
    EMERGENCY = "emergency"  # the stop lags the trail so far that the interval is ignored


class InvalidTrailingParams(ValueError):
    """Trailing parameters that would produce a wrong or meaningless stop (callback 0, a float price …)."""


class InvalidTrailingState(ValueError):
    """A restored or confirmed state that breaks an invariant (unknown phase, a stop on the wrong side …).
    Refusing it loudly is the point: a silently "repaired" state once trailed a long with a short's stop."""


class UnexpectedTrailingEvent(RuntimeError):
    """The shell reported an event the current phase cannot have (a confirmation with nothing in flight)."""


# ---------------------------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class Hold:
    """Nothing to do on the exchange. Use the shared `HOLD`; compare with `is`."""


HOLD = Hold()


@dataclass(frozen=True, slots=True)
class PlaceStop:
    """Place the first trailing stop at `stop_price`, then report `on_stop_confirmed` or `on_stop_failed`."""

    stop_price: Decimal


@dataclass(frozen=True, slots=True)
class MoveStop:
    """Move the trailing stop from `old_stop_price` to `new_stop_price`: place the new stop, and only once
    the exchange confirms it cancel the old one (make-before-break, F5). Then report the outcome."""

    new_stop_price: Decimal
    old_stop_price: Decimal
    reason: MoveReason


TrailingDecision = Hold | PlaceStop | MoveStop


# --------------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True, slots=True, kw_only=True)
class TrailingParams:
    """Everything a position's trail depends on besides the marks. Built once per position from its FILL
    price (never the signal price, F7) and the market's tick size. Percents are percent (1.5 = 1.5 %).

    `min_improvement_percent` and `emergency_move_percent` are measured from the confirmed stop price.
    An `emergency_move_percent` of 0 makes every improvement urgent (the interval never applies)."""

    side: PositionSide
    entry_price: Decimal
    activation_percent: Decimal = Decimal("1.5")
    callback_percent: Decimal
    tick_size: Decimal
    min_move_interval_seconds: Decimal
    min_improvement_percent: Decimal
    emergency_move_percent: Decimal

    # Derived once here so that the per-tick path does comparisons, not arithmetic.
    is_long: bool = field(init=False, repr=False, compare=False)
    activation_price: Decimal = field(init=False, compare=False)
    min_move_interval: float = field(init=False, repr=False, compare=False)
    _trail_factor: Decimal = field(init=False, repr=False, compare=False)
    _trail_rounding: str = field(init=False, repr=False, compare=False)
    _improvement_factor: Decimal = field(init=False, repr=False, compare=False)
    _emergency_factor: Decimal = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.side, PositionSide):
            raise InvalidTrailingParams(f"side must be a PositionSide, got {self.side!r}")
        for name in (
            "entry_price",
            "activation_percent",
            "callback_percent",
            "tick_size",
            "min_move_interval_seconds",
            "min_improvement_percent",
            "emergency_move_percent",
        ):
            value = getattr(self, name)
            # A float here is how LONG stops once came out with float rounding noise or a TypeError (F7).
            if not isinstance(value, Decimal):
                raise InvalidTrailingParams(f"{name} must be a Decimal, got {type(value).__name__} {value!r}")
            if not value.is_finite():
                raise InvalidTrailingParams(f"{name} must be finite, got {value}")
        if self.entry_price <= 0:
            raise InvalidTrailingParams(f"entry_price must be > 0, got {self.entry_price}")
        if self.tick_size <= 0:
            raise InvalidTrailingParams(f"tick_size must be > 0, got {self.tick_size}")
        if not CALLBACK_PERCENT_MIN <= self.callback_percent <= CALLBACK_PERCENT_MAX:
            raise InvalidTrailingParams(
                f"callback_percent must be within {CALLBACK_PERCENT_MIN}–{CALLBACK_PERCENT_MAX} %, "
                f"got {self.callback_percent} (a restored callback of 0 would trail on the peak itself)"
            )
        if self.activation_percent < 0:  # a short's upper bound comes from its activation price being > 0
            raise InvalidTrailingParams(f"activation_percent must be >= 0, got {self.activation_percent}")
        for name in ("min_move_interval_seconds", "min_improvement_percent", "emergency_move_percent"):
            if getattr(self, name) < 0:
                raise InvalidTrailingParams(f"{name} must be >= 0, got {getattr(self, name)}")

        is_long = self.side is PositionSide.LONG
        activation_offset = _DECIMAL.divide(self.activation_percent, _HUNDRED)
        callback = _DECIMAL.divide(self.callback_percent, _HUNDRED)
        improvement = _DECIMAL.divide(self.min_improvement_percent, _HUNDRED)
        emergency = _DECIMAL.divide(self.emergency_move_percent, _HUNDRED)
        if is_long:
            # Rounded further into profit, so the trail never arms before the full activation percent.
            activation = _round_to_tick(
                _DECIMAL.multiply(self.entry_price, _DECIMAL.add(_ONE, activation_offset)),
                self.tick_size,
                ROUND_CEILING,
            )
            trail_factor, trail_rounding = _DECIMAL.subtract(_ONE, callback), ROUND_FLOOR
            improvement_factor, emergency_factor = (
                _DECIMAL.add(_ONE, improvement),
                _DECIMAL.add(_ONE, emergency),
            )
        else:
            activation = _round_to_tick(
                _DECIMAL.multiply(self.entry_price, _DECIMAL.subtract(_ONE, activation_offset)),
                self.tick_size,
                ROUND_FLOOR,
            )
            trail_factor, trail_rounding = _DECIMAL.add(_ONE, callback), ROUND_CEILING
            improvement_factor, emergency_factor = (
                _DECIMAL.subtract(_ONE, improvement),
                _DECIMAL.subtract(_ONE, emergency),
            )
        if activation <= 0:
            raise InvalidTrailingParams(
                f"activation price {activation} is not a price (entry {self.entry_price}, tick {self.tick_size})"
            )
        object.__setattr__(self, "is_long", is_long)
        object.__setattr__(self, "activation_price", activation)
        object.__setattr__(self, "min_move_interval", float(self.min_move_interval_seconds))
        object.__setattr__(self, "_trail_factor", trail_factor)
        object.__setattr__(self, "_trail_rounding", trail_rounding)
        object.__setattr__(self, "_improvement_factor", improvement_factor)
        object.__setattr__(self, "_emergency_factor", emergency_factor)

    def trail_price(self, peak_price: Decimal) -> Decimal:
        """The stop the trail wants behind `peak_price`: peak × (1 ∓ callback %), rounded to the tick away
        from the mark (long: down, short: up) so the callback is never tighter than configured."""
        return _round_to_tick(
            _DECIMAL.multiply(peak_price, self._trail_factor), self.tick_size, self._trail_rounding
        )

    def wanted_move(self, trail_price: Decimal | None, stop_price: Decimal | None) -> MoveReason | None:
        """Why the confirmed `stop_price` should move to `trail_price`, ignoring time and the mark; None
        when it should not (no stop yet, or the trail does not improve on it enough)."""
        if stop_price is None or trail_price is None:
            return None
        if self.is_long:
            if trail_price > _DECIMAL.multiply(stop_price, self._emergency_factor):
                return MoveReason.EMERGENCY
            if trail_price > stop_price and trail_price >= _DECIMAL.multiply(
                stop_price, self._improvement_factor
            ):
                return MoveReason.TRAIL
        else:
            if trail_price < _DECIMAL.multiply(stop_price, self._emergency_factor):
                return MoveReason.EMERGENCY
            if trail_price < stop_price and trail_price <= _DECIMAL.multiply(
                stop_price, self._improvement_factor
            ):
                return MoveReason.TRAIL
        return None

    def is_better(self, price: Decimal, than: Decimal) -> bool:
        """Is `price` further in the position's favour than `than` (long: higher, short: lower)?"""
        return price > than if self.is_long else price < than


def _round_to_tick(price: Decimal, tick_size: Decimal, rounding: str) -> Decimal:
    # Same grid as Market.round_price, on the private context.
    steps = _DECIMAL.divide(price, tick_size).to_integral_value(rounding=rounding, context=_DECIMAL)
    return _DECIMAL.multiply(steps, tick_size)


# ------------------------------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class TrailingState:
    """One position's managed trail. Build it with `TrailingState.start(params)` for a new position or
    `TrailingState.restore(...)` from persisted fields; after that only the `on_*` functions make new ones.

    Persisted fields: `phase` (its `.value`), `activation_price`, `peak_price`, `stop_price`,
    `last_move_at`, `update_count`. `trail_price` and `wanted_move` are derived from them and cached
    because on_mark would otherwise redo the same Decimal arithmetic on every tick."""

    params: TrailingParams
    phase: TrailingPhase
    peak_price: Decimal | None  # best mark since activation; None until the mark first reaches activation
    trail_price: Decimal | None  # params.trail_price(peak_price): where the stop would go now
    stop_price: Decimal | None  # the trailing stop the exchange confirmed; None until the first is confirmed
    last_move_at: float | None  # venue time of the last confirmed place/move (epoch seconds)
    update_count: int  # confirmed places + moves
    wanted_move: MoveReason | None  # params.wanted_move(trail_price, stop_price)

    @property
    def activation_price(self) -> Decimal:
        return self.params.activation_price

    @classmethod
    def start(cls, params: TrailingParams) -> TrailingState:
        """The trail of a freshly filled position: armed, nothing on the exchange yet."""
        return cls(params, _ARMED, None, None, None, None, 0, None)

    @classmethod
    def restore(
        cls,
        *,
        phase: str,
        activation_price: Decimal,
        peak_price: Decimal | None,
        stop_price: Decimal | None,
        last_move_at: float | None,
        update_count: int,
        params: TrailingParams,
    ) -> TrailingState:
        """Rebuild a trail from its persisted fields (keyword-only: a swapped peak and stop must not pass),
        refusing anything the state machine could not have produced (F3). `params` must come from the
        same position's persisted fill price, side, callback and activation percent, so a restore can
        never yield callback 0 (params refuse it) or another side's stop (the stop bounds below)."""
        restored_phase = _parse_phase(phase)
        if not isinstance(activation_price, Decimal) or activation_price != params.activation_price:
            raise InvalidTrailingState(
                f"activation_price {activation_price!r} does not match the parameters' {params.activation_price} "
                f"({params.side} entry {params.entry_price} + {params.activation_percent} %): the row belongs to "
                f"another position or its parameters changed"
            )
        if not isinstance(update_count, int) or isinstance(update_count, bool) or update_count < 0:
            raise InvalidTrailingState(f"update_count must be an int >= 0, got {update_count!r}")
        if last_move_at is not None and (
            not isinstance(last_move_at, int | float)
            or isinstance(last_move_at, bool)
            or not math.isfinite(last_move_at)
        ):
            raise InvalidTrailingState(f"last_move_at must be epoch seconds or None, got {last_move_at!r}")

        if peak_price is not None:
            _check_price("peak_price", peak_price)
            if params.is_better(activation_price, peak_price):
                raise InvalidTrailingState(
                    f"peak_price {peak_price} has not reached the {params.side} activation price {activation_price}"
                )
        if stop_price is not None:
            if peak_price is None:
                raise InvalidTrailingState(
                    f"stop_price {stop_price} without a peak_price: a stop needs a peak"
                )
            _check_stop_bounds(params, stop_price, peak_price)

        if restored_phase is _ARMED and stop_price is not None:
            raise InvalidTrailingState(
                f"phase 'armed' with stop_price {stop_price}: armed means no trailing stop"
            )
        if restored_phase is _ACTIVE and stop_price is None:
            raise InvalidTrailingState("phase 'active' without a stop_price: active means a confirmed stop")
        if restored_phase is _MOVING and peak_price is None:
            raise InvalidTrailingState("phase 'moving' without a peak_price: a stop in flight needs a peak")
        if stop_price is not None and update_count == 0:
            raise InvalidTrailingState(
                f"stop_price {stop_price} with update_count 0: a stop counts as an update"
            )

        trail = None if peak_price is None else params.trail_price(peak_price)
        return cls(
            params,
            restored_phase,
            peak_price,
            trail,
            stop_price,
            None if last_move_at is None else float(last_move_at),
            update_count,
            params.wanted_move(trail, stop_price),
        )


def _parse_phase(phase: str) -> TrailingPhase:
    try:
        return TrailingPhase(phase)
    except ValueError:
        pass
    known = ", ".join(repr(member.value) for member in TrailingPhase)
    if isinstance(phase, str) and phase.lower() in {member.value for member in TrailingPhase}:
        raise InvalidTrailingState(
            f"legacy phase {phase!r}: phases are lowercase ({known}); migrate the row, it is not guessed here"
        ) from None
    raise InvalidTrailingState(f"unknown phase {phase!r}; expected one of {known}") from None


def _check_price(name: str, price: object) -> None:
    if not isinstance(price, Decimal) or not price.is_finite() or price <= 0:
        raise InvalidTrailingState(f"{name} must be a positive finite Decimal, got {price!r}")


def _check_stop_bounds(params: TrailingParams, stop_price: Decimal, peak_price: Decimal) -> None:
    """A stop this trail could have produced: on the tick grid, between the trail behind the activation
    price (the loosest first stop) and the trail behind the peak (the tightest). For a long that is below
    the peak, for a short above it — another side's stop falls outside."""
    _check_price("stop_price", stop_price)
    if _DECIMAL.remainder(stop_price, params.tick_size) != 0:
        raise InvalidTrailingState(f"stop_price {stop_price} is not on the tick grid {params.tick_size}")
    loosest = params.trail_price(params.activation_price)
    tightest = params.trail_price(peak_price)
    if params.is_better(loosest, stop_price) or params.is_better(stop_price, tightest):
        side_rule = "below the peak" if params.is_long else "above the peak"
        raise InvalidTrailingState(
            f"stop_price {stop_price} cannot be a {params.side} trailing stop for entry {params.entry_price}, "
            f"peak {peak_price}, callback {params.callback_percent} %: it must be {side_rule}, between "
            f"{min(loosest, tightest)} and {max(loosest, tightest)}"
        )


# ---------------------------------------------------------------------------------------------- the core


def on_mark(state: TrailingState, mark: Decimal, at: float) -> tuple[TrailingState, TrailingDecision]:
    """Feed one mark price (a Decimal) with its venue timestamp `at` (epoch seconds).

    Returns the next state and what to do on the exchange. When nothing changes the very same `state` and
    the shared `HOLD` come back, so a caller can skip its bookkeeping with `new_state is state`."""
    params = state.params
    phase = state.phase
    if phase is _ACTIVE:
        peak = state.peak_price
        if (mark > peak) if params.is_long else (mark < peak):
            state = _with_peak(state, mark)
        if state.wanted_move is None:
            return state, HOLD
        return _decide_move(state, mark, at)
    if phase is _ARMED:
        activation = params.activation_price
        if (mark < activation) if params.is_long else (mark > activation):
            return state, HOLD
        return _decide_first_stop(state, mark)
    if phase is _MOVING:
        peak = state.peak_price
        if (mark > peak) if params.is_long else (mark < peak):
            return _with_peak(state, mark), HOLD
        return state, HOLD
    return state, HOLD  # triggered / stopped: the trail is over


def _with_peak(state: TrailingState, peak: Decimal) -> TrailingState:
    params = state.params
    trail = params.trail_price(peak)
    return TrailingState(
        params,
        state.phase,
        peak,
        trail,
        state.stop_price,
        state.last_move_at,
        state.update_count,
        params.wanted_move(trail, state.stop_price),
    )


def _with_phase(state: TrailingState, phase: TrailingPhase) -> TrailingState:
    return TrailingState(
        state.params,
        phase,
        state.peak_price,
        state.trail_price,
        state.stop_price,
        state.last_move_at,
        state.update_count,
        state.wanted_move,
    )


def _is_through(params: TrailingParams, stop: Decimal, mark: Decimal) -> bool:
    """Would a stop at `stop` trigger at once at `mark`? The venue rejects those (F8)."""
    return stop >= mark if params.is_long else stop <= mark


def _decide_first_stop(state: TrailingState, mark: Decimal) -> tuple[TrailingState, TrailingDecision]:
    params = state.params
    # The peak survives a failed first placement (back to armed), so a retry trails the best mark seen.
    if state.peak_price is None or params.is_better(mark, state.peak_price):
        state = _with_peak(state, mark)
    if _is_through(params, state.trail_price, mark):
        return state, HOLD  # the mark fell back through the trail; the hard stop-loss protects meanwhile
    return _with_phase(state, _MOVING), PlaceStop(state.trail_price)


def _decide_move(state: TrailingState, mark: Decimal, at: float) -> tuple[TrailingState, TrailingDecision]:
    params = state.params
    trail = state.trail_price
    if _is_through(params, trail, mark):
        return state, HOLD
    reason = state.wanted_move
    if (
        reason is MoveReason.TRAIL
        and state.last_move_at is not None
        and at - state.last_move_at < params.min_move_interval
    ):
        return state, HOLD
    return _with_phase(state, _MOVING), MoveStop(trail, state.stop_price, reason)


def on_stop_confirmed(state: TrailingState, stop_price: Decimal, at: float) -> TrailingState:
    """The exchange confirmed the stop decided by the last PlaceStop/MoveStop at `stop_price` (venue time
    `at`). Only now does the state say the stop is there (F4)."""
    if state.phase is not _MOVING:
        raise UnexpectedTrailingEvent(
            f"stop {stop_price} confirmed in phase {state.phase.value!r}: nothing was in flight"
        )
    params = state.params
    _check_stop_bounds(params, stop_price, state.peak_price)
    if state.stop_price is not None and not params.is_better(stop_price, state.stop_price):
        raise InvalidTrailingState(
            f"confirmed stop {stop_price} does not improve on {state.stop_price} for a {params.side}: "
            f"the trailing stop only moves in the position's favour"
        )
    return TrailingState(
        params,
        _ACTIVE,
        state.peak_price,
        state.trail_price,
        stop_price,
        at,
        state.update_count + 1,
        params.wanted_move(state.trail_price, stop_price),
    )


def on_stop_failed(state: TrailingState) -> TrailingState:
    """The place/move in flight failed; the old stop (if any) is still the one on the exchange. Back to
    active with it, or armed without one, so the next mark decides again. A shell that wants a backoff
    reports the failure once the backoff has passed; until then the state stays moving and holds."""
    if state.phase is not _MOVING:
        raise UnexpectedTrailingEvent(
            f"stop failure reported in phase {state.phase.value!r}: nothing was in flight"
        )
    return _with_phase(state, _ARMED if state.stop_price is None else _ACTIVE)


def on_stop_triggered(state: TrailingState) -> TrailingState:
    """The trailing stop fired on the exchange: the trail is over."""
    return _finish(state, TrailingPhase.TRIGGERED)


def on_trailing_stopped(state: TrailingState) -> TrailingState:
    """The trail ended otherwise (position closed by the hard stop-loss, by hand, or trailing switched
    off): the trail is over."""
    return _finish(state, TrailingPhase.STOPPED)


def _finish(state: TrailingState, terminal: TrailingPhase) -> TrailingState:
    if state.phase is terminal:
        return state
    if state.phase.is_terminal:
        raise UnexpectedTrailingEvent(
            f"trail already ended as {state.phase.value!r}, cannot end as {terminal.value!r}"
        )
    return _with_phase(state, terminal)

"""Settings of the sim venue, mounted at `[venue.sim]` in config.toml.

Every field has a default, so an empty `[venue.sim]` table gives a calm, fast venue: no faults, 50 ms per
call, no slippage surprises. Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

from decimal import Decimal
from enum import StrEnum
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.venues.binance_limits import (
    ORDERS_PER_10_SECONDS,
    ORDERS_PER_MINUTE,
    REQUEST_WEIGHT_PER_MINUTE,
)
from engine.venues.sim.universe import UNIVERSE


class CallKind(StrEnum):
    """The kinds of venue calls that latency and faults can be configured for."""

    LOAD_MARKETS = "load_markets"
    FETCH_MARK_PRICES = "fetch_mark_prices"
    FETCH_BALANCE = "fetch_balance"
    FETCH_POSITIONS = "fetch_positions"
    FETCH_OPEN_ORDERS = "fetch_open_orders"
    FETCH_ORDER = "fetch_order"
    SET_LEVERAGE = "set_leverage"
    CREATE_ORDER = "create_order"
    CANCEL_ORDER = "cancel_order"

    @property
    def mutates(self) -> bool:
        return self in (CallKind.SET_LEVERAGE, CallKind.CREATE_ORDER, CallKind.CANCEL_ORDER)


class FaultKind(StrEnum):
    NETWORK_ERROR_BEFORE_SEND = "network_error_before_send"  # not executed -> Retryable
    SERVER_ERROR = "server_error"  # HTTP 5xx before execution -> Retryable
    TIMEOUT_AFTER_ACCEPT = "timeout_after_accept"  # executed, answer lost -> OutcomeUnknown
    RATE_LIMITED = "rate_limited"  # HTTP 429 with Retry-After 1 s, not executed (forced only) -> RateLimited
    # The request is lost on its way and the client times out: the same answer as TIMEOUT_AFTER_ACCEPT (Binance
    # -1007 "execution status unknown" covers both), but nothing was executed (forced only) -> OutcomeUnknown
    TIMEOUT_NOT_EXECUTED = "timeout_not_executed"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LatencyDistribution(_Strict):
    """Round-trip time of one call. `fixed`: exactly `seconds`; `uniform`: `seconds` ± `jitter_seconds`;
    `lognormal`: median `seconds`, shape `sigma`. Always capped at `cap_seconds`."""

    distribution: Literal["fixed", "uniform", "lognormal"] = "fixed"
    seconds: float = Field(default=0.05, ge=0.0, le=120.0)
    jitter_seconds: float = Field(default=0.0, ge=0.0, le=120.0)
    sigma: float = Field(default=0.0, ge=0.0, le=3.0)
    cap_seconds: float = Field(default=60.0, gt=0.0, le=600.0)

    @model_validator(mode="after")
    def _jitter_within_base(self) -> Self:
        if self.distribution == "uniform" and self.jitter_seconds > self.seconds:
            raise ValueError("uniform latency needs jitter_seconds <= seconds (latency cannot be negative)")
        return self


class LatencySettings(LatencyDistribution):
    by_call: dict[CallKind, LatencyDistribution] = Field(default_factory=dict)

    def for_call(self, kind: CallKind) -> LatencyDistribution:
        return self.by_call.get(kind, self)


class FaultProbabilities(_Strict):
    """Per-call probabilities; drawn once per call from the seeded fault generator."""

    network_error_before_send: float = Field(default=0.0, ge=0.0, le=1.0)
    server_error: float = Field(default=0.0, ge=0.0, le=1.0)
    timeout_after_accept: float = Field(default=0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _total_at_most_one(self) -> Self:
        if self.network_error_before_send + self.server_error + self.timeout_after_accept > 1.0:
            raise ValueError("fault probabilities must add up to at most 1")
        return self


class FaultSettings(FaultProbabilities):
    empty_positions_for_seconds: float = Field(default=0.0, ge=0.0, le=3600.0)
    by_call: dict[CallKind, FaultProbabilities] = Field(default_factory=dict)

    def for_call(self, kind: CallKind) -> FaultProbabilities:
        return self.by_call.get(kind, self)


class RateLimitSettings(_Strict):
    """Binance's defaults (see `engine.venues.binance_limits`). The order budgets apply to every sim venue;
    the request weight only to the Binance-wire emulator, which weighs each HTTP request by endpoint."""

    orders_per_10s: int = Field(default=ORDERS_PER_10_SECONDS, ge=1, le=100_000)
    orders_per_minute: int = Field(default=ORDERS_PER_MINUTE, ge=1, le=1_000_000)
    request_weight_per_minute: int = Field(default=REQUEST_WEIGHT_PER_MINUTE, ge=1, le=1_000_000)
    ban_after_violations: int = Field(default=3, ge=1, le=1000)
    violation_window_seconds: float = Field(default=60.0, gt=0.0, le=86_400.0)
    ban_seconds: float = Field(default=120.0, gt=0.0, le=259_200.0)
    max_ban_seconds: float = Field(default=259_200.0, gt=0.0, le=2_592_000.0)

    @model_validator(mode="after")
    def _ban_ordering(self) -> Self:
        if self.max_ban_seconds < self.ban_seconds:
            raise ValueError("max_ban_seconds must be >= ban_seconds")
        return self


class AccountStreamSettings(_Strict):
    """The sim venue's account stream (what Binance's user-data stream is): order and position events
    pushed as they happen. `enabled = false` models a venue with no account stream (fills and cancels are
    learned by polling only). The faults rehearse what real streams do: every event arrives
    `event_delay_seconds` late; with probability `drop_probability` per event the connection drops at
    that event (it and everything until `down_seconds` later are lost; the reader then gets a `StreamGap`)."""

    enabled: bool = True
    event_delay_seconds: float = Field(default=0.0, ge=0.0, le=60.0)
    drop_probability: float = Field(default=0.0, ge=0.0, le=1.0)
    down_seconds: float = Field(default=1.0, ge=0.0, le=600.0)


class SimVenueSettings(_Strict):
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    symbols: list[str] = Field(default_factory=list)
    synthetic_listings: int = Field(default=0, ge=0, le=5000)
    volatility: float = Field(default=1.0, ge=0.0, le=50.0)
    volatility_by_symbol: dict[str, float] = Field(default_factory=dict)
    mark_tick_seconds: float = Field(default=1.0, gt=0.0, le=60.0)
    starting_balance: Decimal = Field(default=Decimal("10000"), gt=0, le=Decimal("1e12"))
    taker_fee_rate: Decimal = Field(default=Decimal("0.0005"), ge=0, le=Decimal("0.01"))
    slippage_bps: Decimal = Field(default=Decimal("2"), ge=0, le=Decimal("500"))
    default_leverage: int = Field(default=10, ge=1, le=125)
    max_conditional_orders: int = Field(default=200, ge=1, le=10_000)
    request_timeout_seconds: float = Field(default=10.0, gt=0.0, le=300.0)
    keep_book: bool = True
    latency: LatencySettings = Field(default_factory=LatencySettings)
    faults: FaultSettings = Field(default_factory=FaultSettings)
    rate_limits: RateLimitSettings = Field(default_factory=RateLimitSettings)
    account_stream: AccountStreamSettings = Field(default_factory=AccountStreamSettings)

    @field_validator("symbols")
    @classmethod
    def _symbols_known(cls, symbols: list[str]) -> list[str]:
        unknown = sorted(set(symbols) - UNIVERSE.keys())
        if unknown:
            raise ValueError(f"not in the sim universe: {', '.join(unknown)}")
        if len(set(symbols)) != len(symbols):
            raise ValueError("symbols listed twice")
        return symbols

    @field_validator("volatility_by_symbol")
    @classmethod
    def _volatility_overrides_valid(cls, overrides: dict[str, float]) -> dict[str, float]:
        unknown = sorted(overrides.keys() - UNIVERSE.keys())
        if unknown:
            raise ValueError(f"not in the sim universe: {', '.join(unknown)}")
        if any(not 0.0 <= value <= 50.0 for value in overrides.values()):
            raise ValueError("volatility must be within 0..50 (annualised)")
        return overrides

    def volatility_for(self, symbol: str) -> float:
        return self.volatility_by_symbol.get(symbol, self.volatility)

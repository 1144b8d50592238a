"""Typed exchange errors, named by what the caller should do next.

Every venue implementation translates its own failures into exactly these types, once, at its edge
(`raise … from e`). Callers never inspect HTTP codes or ccxt exception classes.

* `Retryable` — the request was not executed (network error before send, 5xx before execution).
  Retry with backoff, with the same client order id.
* `RateLimited(retry_after)` — the order budget is spent (Binance HTTP 429). Wait `retry_after` seconds.
* `Banned(until)` — repeated rate-limit violations (Binance HTTP 418). Send nothing until `until` (epoch s).
* `OutcomeUnknown` — the request may have been executed (timeout after send, "execution status unknown").
  Resolve with `fetch_order(symbol, client_order_id)`; never resend blindly.
* `Rejected(code, reason)` — the venue refused the request and it had no effect. Do not retry unchanged.
* `WouldTriggerImmediately` — a stop's trigger, or a trailing stop's activation, is already crossed (-2021).
  The protection goal is already breached: close reduce-only at market.
* `InsufficientMargin` — not enough available margin (-2019). Reduce the size or skip the entry.
* `DuplicateClientOrderId` — the client order id was used before (-4116). That earlier order exists: fetch it.
* `NotFound` — no order with that client order id on that symbol: it was never created.

`WouldTriggerImmediately`, `InsufficientMargin` and `DuplicateClientOrderId` subclass `Rejected`: each is
a refusal with a Binance code, but each has a distinct next step, so callers can catch them by name.
Messages carry symbols, ids and venue codes only; never credentials or signed request parameters.

The type says what to do next; `failure_class(error)` says what *happened*, for people (log lines, event
kinds, the dashboard): an HTTP 500 answered at once and a call that got no answer within its budget both
leave the outcome to be resolved by id (`OutcomeUnknown` on Binance), yet only the second is a timeout.
Each error carries what the venue answered when it answered (`http_status`, `venue_code`); the venue's edge
names the class where the type alone cannot (`failure=`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Self


class RejectCode(IntEnum):
    """Binance USDⓈ-M error codes the venues use (the sim raises them; adapters translate to them)."""

    INVALID_PARAMETER = -1130
    BAD_PRECISION = -1111
    BAD_SYMBOL = -1121
    NO_SUCH_ORDER = -2013
    MARGIN_INSUFFICIENT = -2019
    WOULD_IMMEDIATELY_TRIGGER = -2021
    REDUCE_ONLY_REJECTED = -2022
    QUANTITY_TOO_SMALL = -4003
    INVALID_CLIENT_ORDER_ID = -4015
    INVALID_LEVERAGE = -4028
    MAX_CONDITIONAL_ORDERS = -4045
    DUPLICATE_CLIENT_ORDER_ID = -4116
    MIN_NOTIONAL = -4164


class FailureClass(StrEnum):
    """What happened to a venue call that failed (not what to do next: that is the error's type)."""

    TIMEOUT = "timeout"  # no answer within the call's time budget
    UNKNOWN_OUTCOME = (
        "unknown_outcome"  # sent, the answer lost (connection dropped, unreadable, "status unknown")
    )
    REJECTED = "rejected"  # the venue answered no, with its code
    SERVER_ERROR = "server_error"  # the venue answered HTTP 5xx or a server-error code
    RATE_LIMITED = "rate_limited"  # HTTP 429/418 or a rate-limit code: not now
    NOT_SENT = "not_sent"  # the venue could not be reached: nothing was sent


class ExchangeError(Exception):
    """Base of every error a venue raises through the port."""

    http_status: int | None = None  # the venue's HTTP status, when it answered
    venue_code: int | None = None  # the venue's own error code, when it gave one
    failure: FailureClass | None = None  # what happened, when the type alone does not say

    def answered(
        self,
        *,
        http_status: int | None = None,
        venue_code: int | None = None,
        failure: FailureClass | None = None,
    ) -> Self:
        """Record what the venue answered (the edge that translated the error calls this); returns self."""
        if http_status is not None:
            self.http_status = http_status
        if venue_code is not None:
            self.venue_code = venue_code
        if failure is not None:
            self.failure = failure
        return self


class Retryable(ExchangeError):
    """The request was not executed; retrying it (same client order id) is safe."""


class ClockRefused(Retryable):
    """The venue refused the request's timestamp (Binance -1021, Bybit 10002): never run, our clock being
    off from the venue's. The venue adapter reads the venue's time again at once; the same request, signed
    again a moment later, goes through."""


class RateLimited(ExchangeError):
    def __init__(self, retry_after: float, detail: str = "order rate limit exceeded") -> None:
        super().__init__(f"{detail}; retry after {retry_after:.3f}s")
        self.retry_after = retry_after
        self.detail = detail


class Banned(ExchangeError):
    def __init__(self, until: float, detail: str = "banned for repeated rate-limit violations") -> None:
        # When, as an operator reads it (the venue's epoch seconds were printed raw: "until epoch 1796488345.969").
        ends = datetime.fromtimestamp(until, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        super().__init__(f"{detail}; until {ends}")
        self.until = until


class Withheld(ExchangeError):
    """The engine withheld the request while it waited for rate budget: it was never sent (an entry, once
    the engine began stopping or entries were paused)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.failure = FailureClass.NOT_SENT


class OutcomeUnknown(ExchangeError):
    """The request may or may not have been executed. Resolve by client order id before doing anything."""

    def __init__(self, client_order_id: str | None, detail: str = "no answer before timeout") -> None:
        super().__init__(f"{detail} (client order id {client_order_id!r})")
        self.client_order_id = client_order_id


class Rejected(ExchangeError):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"rejected {code}: {reason}")
        self.code = code
        self.reason = reason
        self.venue_code = int(code)


class WouldTriggerImmediately(Rejected):
    def __init__(self, reason: str = "Order would immediately trigger.") -> None:
        super().__init__(RejectCode.WOULD_IMMEDIATELY_TRIGGER, reason)


class InsufficientMargin(Rejected):
    def __init__(self, reason: str = "Margin is insufficient.") -> None:
        super().__init__(RejectCode.MARGIN_INSUFFICIENT, reason)


class DuplicateClientOrderId(Rejected):
    def __init__(self, client_order_id: str) -> None:
        super().__init__(
            RejectCode.DUPLICATE_CLIENT_ORDER_ID, f"client order id {client_order_id!r} is duplicated"
        )
        self.client_order_id = client_order_id


def failure_class(error: BaseException) -> FailureClass:
    """What happened to a failed call: our own time budget running out is a timeout; otherwise the class
    the venue's edge named, or the one the error's type and the venue's answer imply."""
    if isinstance(error, TimeoutError):
        return FailureClass.TIMEOUT
    if not isinstance(error, ExchangeError):
        return FailureClass.UNKNOWN_OUTCOME
    if error.failure is not None:
        return error.failure
    if isinstance(error, RateLimited | Banned) or error.http_status in (418, 429):
        return FailureClass.RATE_LIMITED
    if isinstance(error, Rejected | NotFound):
        return FailureClass.REJECTED
    status = error.http_status
    if status is not None and status >= 500:
        return FailureClass.SERVER_ERROR
    if status is not None and 400 <= status < 500:
        return FailureClass.REJECTED
    if isinstance(error, OutcomeUnknown):
        return FailureClass.UNKNOWN_OUTCOME
    return FailureClass.NOT_SENT  # Retryable with no answer: it never reached the venue


class NotFound(ExchangeError):
    def __init__(self, symbol: str, client_order_id: str) -> None:
        super().__init__(f"no order {client_order_id!r} on {symbol}")
        self.symbol = symbol
        self.client_order_id = client_order_id


__all__ = [
    "Banned",
    "DuplicateClientOrderId",
    "ExchangeError",
    "FailureClass",
    "InsufficientMargin",
    "NotFound",
    "OutcomeUnknown",
    "RateLimited",
    "RejectCode",
    "Rejected",
    "Retryable",
    "WouldTriggerImmediately",
    "failure_class",
]

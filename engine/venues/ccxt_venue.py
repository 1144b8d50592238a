"""The exchange port over ccxt: Binance USDⓈ-M (`binanceusdm`) and Bybit linear perpetuals (`bybit`).

This is the only module that imports ccxt. Everything ccxt-shaped stops here:

* symbols: the port speaks exchange-native ids (`SFPUSDT`); ccxt speaks unified symbols
  (`SFP/USDT:USDT`). `SymbolMap`, built from the loaded markets, is the one mapping;
* numbers: prices and sizes are sent as exact decimal strings and read back from the venue's own strings
  (`info`), never from ccxt's floats. Off-grid prices and sizes are refused here (`BAD_PRECISION`) rather
  than silently rounded by ccxt's `*_to_precision`;
* errors: every ccxt exception is translated once, by `translate_error`, into the port's typed errors
  (`raise … from`), using the HTTP status, `Retry-After` and the venue's error code of the failed response.
  Messages carry codes, symbols and client ids only: never URLs, signed parameters or keys.

Binance specifics (since 2025-12 conditional orders live in the Algo Order API): STOP_MARKET and
TRAILING_STOP_MARKET are sent through ccxt's `create_order`, which routes them to `POST /fapi/v1/algoOrder`
with our client id as `clientAlgoId`; fetch and cancel pass `params={'trigger': True}`. Trailing stops
carry quantity + reduceOnly (Binance refuses closePosition for them), every trigger uses
`workingType=MARK_PRICE`, callbackRate is checked against 0.1–10 before sending, and the order budget is
read from `exchangeInfo.rateLimits` (ORDERS) when the venue publishes it.

Bybit specifics (v5, category linear): the hard stop and the trailing stop are position-level
(`POST /v5/position/trading-stop`: `stopLoss` with `slTriggerBy=MarkPrice`, `trailingStop` as a price
distance with `activePrice`, `positionIdx` for one-way or hedge mode). They carry no client order id on
Bybit's side; the adapter keeps the caller's id and answers `fetch_order` from the position's current
stop fields. Setting a position stop again replaces it, so a retried call can never leave two stops.

Pacing (the same on every venue and every URL: the emulator and the real venue differ only in the URL):
ccxt's own throttle is off (`enableRateLimit=False`); every HTTP request, ccxt's internal ones included,
first waits in the engine's `RequestPacer` (`engine.pacing`) for its cost under the venue's request
budgets (Binance: IP weight per endpoint, `binance_limits`; Bybit: per-IP and per-endpoint limits,
`bybit_limits`), in the lane of whoever started the call, and is signed only once it may go (so a wait
can never push its timestamp out of `recvWindow`). Every answer's limit headers are handed back to the
pacer and the order budget, and a 429 / 418 / Bybit 403 holds them. The HTTP session is our own, with a
connection pool sized by the engine for its largest burst (ccxt's default caps it at 100), keep-alive on.

Mark prices: on Bybit REST polling every `mark_poll_seconds`; while it fails nothing is yielded and the
engine's price-feed health sees the marks age. On Binance the mark price stream and the user-data stream
(`engine.venues.binance_streams`), REST polling only while a stream is stale.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import ccxt.async_support as ccxt_async
import certifi
from ccxt.base import errors as ccxt_errors

from engine.clock import Clock, SystemClock
from engine.exchange.errors import (
    Banned,
    ClockRefused,
    DuplicateClientOrderId,
    ExchangeError,
    FailureClass,
    InsufficientMargin,
    NotFound,
    OutcomeUnknown,
    RateLimited,
    RejectCode,
    Rejected,
    Retryable,
    WouldTriggerImmediately,
)
from engine.exchange.port import (
    CLIENT_ORDER_ID_PATTERN,
    AccountEvent,
    Capabilities,
    Market,
    MarkPrice,
    Order,
    RateBudget,
    StreamState,
)
from engine.pacing import VenuePacing
from engine.venues import bybit_limits
from engine.venues.binance_streams import StreamSettings
from engine.venues.ip_bans import IpBanLedger
from engine.venues.read_hedge import ReadHedger, mark_sent
from engine.venues.stream_client import VenueStreams
from engine.words import SaidEvery

logger = logging.getLogger(__name__)

T = TypeVar("T")

BINANCEUSDM = "binanceusdm"
BYBIT = "bybit"
KINDS = (BINANCEUSDM, BYBIT)

CALLBACK_RATE_MIN = Decimal("0.1")
CALLBACK_RATE_MAX = Decimal("10")
DEFAULT_MAX_CONNECTIONS = 256
_ZERO = Decimal(0)
_BAN_UNTIL = re.compile(r"banned until (\d{10,16})")
_CODE_IN_TEXT = re.compile(r'"(?:code|retCode|ret_code)"\s*:\s*"?(-?\d+)')
_LISTEN_KEY_TEXT = re.compile(r"(['\"]?listenKey['\"]?\s*[:=]\s*['\"]?)[A-Za-z0-9]+")


class _ListenKeyRedaction(logging.Filter):
    """ccxt narrates every request and answer at DEBUG, the listen key's too: a listen key reads the
    account's stream, so it is masked before any handler sees the line (the configured API key and secret
    are masked by the log handler itself, `engine.logs`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "listenKey" in message:
            record.msg, record.args = _LISTEN_KEY_TEXT.sub(r"\1***", message), None
        return True


_CCXT_LOGGER = logging.getLogger("ccxt.base.exchange")
if not any(isinstance(f, _ListenKeyRedaction) for f in _CCXT_LOGGER.filters):
    _CCXT_LOGGER.addFilter(_ListenKeyRedaction())


# ---- configuration --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CcxtVenueConfig:
    kind: str  # "binanceusdm" | "bybit"
    api_key: str = field(repr=False)
    api_secret: str = field(repr=False)
    testnet: bool = True
    base_url: str = ""  # overrides every REST host (the local emulator); nothing else changes with it
    # A safety net behind the engine's own send-relative call budget, which fires first; like it, it
    # starts when the request is sent (after any wait for budget).
    request_timeout_seconds: float = 11.0
    mark_poll_seconds: float = 1.0
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # the HTTP pool: sized for the largest burst
    # Push streams (Binance): stall, staleness, backoff timings; the same whatever the URL.
    streams: StreamSettings = field(default_factory=StreamSettings)
    # Where the first refusal of an IP ban the venue does not date (Bybit's 403) is kept for the other
    # processes of this installation (`engine.venues.ip_bans`); None: this process only.
    ip_ban_record: Path | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unsupported ccxt venue {self.kind!r}: expected one of {', '.join(KINDS)}")
        if not self.api_key or not self.api_secret:
            raise ValueError(f"{self.kind}: an API key and secret are required")
        if self.max_connections < 1:
            raise ValueError(f"{self.kind}: max_connections must be at least 1")


# ---- error translation ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpContext:
    """What the failed HTTP exchange looked like (captured per request, so concurrent calls cannot mix)."""

    status: int | None
    headers: Mapping[str, str]
    body: str

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return value
        return None


def _venue_code_and_message(error: Exception, context: HttpContext | None) -> tuple[int | None, str]:
    """The venue's own error code and message, from the response body (or, failing that, the text)."""
    text = context.body if context is not None and context.body else str(error)
    start = text.find("{")
    if start >= 0:
        try:
            payload = json.loads(text[start:])
        except ValueError:
            payload = None
        if isinstance(payload, dict):
            code = payload.get("code", payload.get("retCode", payload.get("ret_code")))
            message = payload.get("msg", payload.get("retMsg", payload.get("ret_msg", "")))
            try:
                return (int(code) if code is not None else None), str(message)[:200]
            except (TypeError, ValueError):
                return None, str(message)[:200]
    match = _CODE_IN_TEXT.search(text)
    return (int(match.group(1)) if match else None), ""


_ORDER_WINDOW_WORDS = {"TEN_SECONDS": 10.0, "SECOND": 1.0, "MINUTE": 60.0}


def _rate_limit_wait(venue: str, code: int | None, message: str, context: HttpContext | None) -> float:
    """How long a 429 says to wait. Binance sends `Retry-After` for its IP limits but not for the order
    count (-1015: "… orders per TEN_SECONDS"), whose windows are fixed: without the header, wait out the
    window the message names (a new window is certain after that long), never a guess shorter than it."""
    if venue == BINANCEUSDM and code == _BINANCE_ORDER_RATE:
        words = [w for w in _ORDER_WINDOW_WORDS if message.rstrip(".").upper().endswith(w)]
        return _retry_after(context, _ORDER_WINDOW_WORDS[words[0]] if words else 10.0)
    if venue == BYBIT and code in _BYBIT_RATE:
        reset = _bybit_reset_wait(context)
        if reset is not None:
            return reset
    return _retry_after(context, 1.0)


def _bybit_reset_wait(context: HttpContext | None) -> float | None:
    """Bybit's 10006 says when the endpoint's rolling second frees a request: X-Bapi-Limit-Reset-Timestamp,
    read against the answer's own `time` (the venue's clock, so our clock's drift does not matter); at
    most one window (1 s), as a per-second limit cannot hold a request longer."""
    if context is None:
        return None
    reset = context.header(bybit_limits.LIMIT_RESET_HEADER)
    if not reset:
        return None
    try:
        answered = json.loads(context.body).get("time") if context.body else None
        now_ms = float(answered) if answered is not None else time.time() * 1000
        return min(1.0, max(0.0, (float(reset) - now_ms) / 1000))
    except (TypeError, ValueError, AttributeError):
        return None


def headers_have(headers: Mapping[str, str], *names: str) -> bool:
    lowered = {key.lower() for key in headers}
    return all(name.lower() in lowered for name in names)


def _retry_after(context: HttpContext | None, default: float) -> float:
    if context is not None:
        value = context.header("Retry-After")
        if value:
            try:
                return max(0.0, float(value))
            except ValueError:
                pass
    return default


# Binance USDⓈ-M codes and what they mean for the caller.
_BINANCE_UNKNOWN_OUTCOME = {-1006, -1007}  # "execution status unknown"
# A request's timestamp refused, never run: the venue's time is read again at once (`_resync_clock`).
_CLOCK_REFUSALS: dict[str, frozenset[int]] = {BINANCEUSDM: frozenset({-1021}), BYBIT: frozenset({10002})}
CLOCK_RESYNC_MIN_SECONDS = 5.0
CLOCK_BURST_SECONDS = 1.0  # refusals this soon after a read answered were signed before it
CLOCK_FAILURE_SAID_EVERY_SECONDS = 60.0
_BINANCE_NOT_EXECUTED = {-1008, -1021, -1001}  # server busy, timestamp outside recvWindow, disconnected
_BINANCE_NOT_FOUND = {-2013, -2011, -20124}
_BINANCE_DUPLICATE = {-4116, -20132}
_BINANCE_RATE = {-1003, -1015}
_BINANCE_ORDER_RATE = -1015  # "Too many new orders": the account's order budget, not the IP's weight
_BINANCE_WOULD_TRIGGER = {
    int(RejectCode.WOULD_IMMEDIATELY_TRIGGER),
    -4142,
}  # -4142: "will be triggered immediately"

# Bybit v5 retCodes.
_BYBIT_RATE = {10006, 10018}
_BYBIT_SERVER_ERROR = 10016  # "Internal server error": nothing says whether it was executed
_BYBIT_NOT_EXECUTED = {10002}  # timestamp outside recv_window: refused before anything happened
_BYBIT_WOULD_TRIGGER = {110092, 110093}  # order/create: trigger price already crossed (rising/falling)
# trading-stop answers a stop already crossed with 10001 (a parameter error) naming the price it compared
# with: "StopLoss:… set for Buy position should lower than base_price:…??MarkPrice".
_BYBIT_PARAMS_ERROR = 10001
_BYBIT_CROSSED = re.compile(r"base_price", re.IGNORECASE)
_BYBIT_NOT_FOUND = {110001, 170213}
_BYBIT_DUPLICATE = {110072, 10014}
_BYBIT_MARGIN = {110007, 110004, 110012, 110044, 110045}
_BYBIT_REDUCE_ONLY = {110017}


def translate_error(
    error: Exception,
    *,
    venue: str,
    mutating: bool,
    symbol: str | None = None,
    client_order_id: str | None = None,
    now: float | None = None,
    ip_ban_until: Callable[[float], float] | None = None,
) -> ExchangeError:
    """One ccxt (or transport) failure → the port's error named by what to do next, carrying what the venue
    answered (HTTP status, venue code) and, where the type does not say it, what happened (`FailureClass`).
    `ip_ban_until`: when a ban the venue does not date, met at a time, ends (default: its documented length
    from then)."""
    context: HttpContext | None = getattr(error, "http_context", None)
    status = context.status if context is not None else None
    code, _ = _venue_code_and_message(error, context)
    translated = _translate(
        error,
        venue=venue,
        mutating=mutating,
        symbol=symbol,
        client_order_id=client_order_id,
        now=time.time() if now is None else now,
        ip_ban_until=ip_ban_until or (lambda at: at + bybit_limits.IP_BAN_SECONDS),
    )
    return translated.answered(http_status=status, venue_code=code)


def _translate(
    error: Exception,
    *,
    venue: str,
    mutating: bool,
    symbol: str | None,
    client_order_id: str | None,
    now: float,
    ip_ban_until: Callable[[float], float],
) -> ExchangeError:
    context: HttpContext | None = getattr(error, "http_context", None)
    status = context.status if context is not None else None
    code, message = _venue_code_and_message(error, context)
    label = f"{venue}{' ' + symbol if symbol else ''}"

    def unknown(detail: str, failure: FailureClass) -> ExchangeError:
        if mutating:
            return OutcomeUnknown(client_order_id, f"{label}: {detail}").answered(failure=failure)
        return Retryable(f"{label}: {detail}").answered(failure=failure)

    # Rate limits and bans first: they are answers about the account, whatever the endpoint.
    ban_match = _BAN_UNTIL.search(message)
    if status == 418 or ban_match is not None:
        until = int(ban_match.group(1)) / 1000 if ban_match else now + _retry_after(context, 120.0)
        return Banned(until, f"{label}: banned for repeated rate-limit violations (HTTP 418)")
    if venue == BYBIT and status == 403:
        # "403, access too frequent": the IP is banned for at least 10 minutes from its first refusal, which
        # another process of this installation may have met (`engine.venues.ip_bans`).
        return Banned(ip_ban_until(now), f"{label}: IP banned for requesting too often (HTTP 403)")
    if (
        status == 429
        or (venue == BINANCEUSDM and code in _BINANCE_RATE)
        or (venue == BYBIT and code in _BYBIT_RATE)
    ):
        return RateLimited(
            _rate_limit_wait(venue, code, message, context), f"{label}: rate limit exceeded (code {code})"
        )
    if isinstance(error, ccxt_errors.DDoSProtection | ccxt_errors.RateLimitExceeded) and status is None:
        # Siblings in ccxt's tree (neither catches the other): both mean "slow down" here.
        return RateLimited(1.0, f"{label}: rate limit exceeded")

    if venue == BINANCEUSDM and code is not None:
        if code in _BINANCE_UNKNOWN_OUTCOME:
            return unknown(f"execution status unknown (code {code})", FailureClass.UNKNOWN_OUTCOME)
        if code in _BINANCE_NOT_EXECUTED:
            # -1021 (timestamp outside recvWindow) is a refusal; -1001 and -1008 are the venue's own trouble.
            failure = FailureClass.REJECTED if code == -1021 else FailureClass.SERVER_ERROR
            kind = ClockRefused if code == -1021 else Retryable
            return kind(f"{label}: not executed (code {code}: {message})").answered(failure=failure)
        if code in _BINANCE_WOULD_TRIGGER:
            return WouldTriggerImmediately(f"{label}: order would immediately trigger (code {code})")
        if code == RejectCode.MAX_CONDITIONAL_ORDERS:
            return Rejected(
                RejectCode.MAX_CONDITIONAL_ORDERS, f"{label}: conditional order cap reached ({message})"
            )
        if code in _BINANCE_DUPLICATE:
            return DuplicateClientOrderId(client_order_id or "?")
        if code == RejectCode.MARGIN_INSUFFICIENT:
            return InsufficientMargin(f"{label}: margin is insufficient")
        if code in _BINANCE_NOT_FOUND:
            return NotFound(symbol or "?", client_order_id or "?")
        if code < 0 and (status is None or 400 <= status < 500):
            return Rejected(_reject_code(code), f"{label}: {message or 'refused'}")
    if venue == BYBIT and code is not None and code != 0:
        if code == _BYBIT_SERVER_ERROR:
            return unknown(f"server error (retCode {code}: {message})", FailureClass.SERVER_ERROR)
        if code in _BYBIT_NOT_EXECUTED:
            return ClockRefused(f"{label}: not executed (retCode {code}: {message})").answered(
                failure=FailureClass.REJECTED
            )
        if code in _BYBIT_WOULD_TRIGGER or (code == _BYBIT_PARAMS_ERROR and _BYBIT_CROSSED.search(message)):
            return WouldTriggerImmediately(f"{label}: stop would trigger immediately ({message})")
        if code in _BYBIT_DUPLICATE:
            return DuplicateClientOrderId(client_order_id or "?")
        if code in _BYBIT_MARGIN:
            return InsufficientMargin(f"{label}: {message or 'insufficient balance'}")
        if code in _BYBIT_NOT_FOUND:
            return NotFound(symbol or "?", client_order_id or "?")
        if code in _BYBIT_REDUCE_ONLY:
            return Rejected(RejectCode.REDUCE_ONLY_REJECTED, f"{label}: {message or 'reduce-only rejected'}")
        if status is None or status < 500:
            return Rejected(code, f"{label}: {message or 'refused'}")

    if status is not None and status >= 500:
        # Binance: a 5xx means the execution status is unknown; only -1008 (busy) is known not executed.
        return unknown(f"HTTP {status}", FailureClass.SERVER_ERROR)
    if isinstance(error, ccxt_errors.RequestTimeout):
        return unknown("no answer before the timeout", FailureClass.TIMEOUT)
    if isinstance(error, ccxt_errors.NetworkError):
        cause = error.__cause__
        if isinstance(cause, aiohttp.ClientConnectorError | OSError) and not isinstance(
            cause, aiohttp.ServerDisconnectedError
        ):
            # Where to: an unreachable venue was not named (a base_url mistyped reads the same as a venue
            # down; an operator).
            where = (
                f" to {cause.host}:{cause.port}" if isinstance(cause, aiohttp.ClientConnectorError) else ""
            )
            return Retryable(f"{label}: could not connect{where} (nothing was sent)").answered(
                failure=FailureClass.NOT_SENT
            )
        return unknown("connection lost before the answer", FailureClass.UNKNOWN_OUTCOME)
    if isinstance(error, ccxt_errors.AuthenticationError):
        return Rejected(code or status or -2015, f"{label}: the venue refused the API key or signature")
    if isinstance(error, ccxt_errors.BadResponse | ccxt_errors.NullResponse):
        return unknown("unreadable answer", FailureClass.UNKNOWN_OUTCOME)
    if isinstance(error, ccxt_errors.InvalidOrder | ccxt_errors.BadRequest | ccxt_errors.ExchangeError):
        return Rejected(code or status or 0, f"{label}: {message or type(error).__name__}")
    if isinstance(error, asyncio.TimeoutError):
        return unknown(type(error).__name__, FailureClass.TIMEOUT)
    return unknown(type(error).__name__, FailureClass.UNKNOWN_OUTCOME)


def _reject_code(code: int) -> int:
    try:
        return RejectCode(code)
    except ValueError:
        return code


class RequestHooks:
    """What the venue does around every HTTP request ccxt makes (set on the ccxt instance)."""

    async def before_request(self, method: str, path: str, params: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def after_response(
        self, method: str, path: str, status: int | None, headers: Mapping[str, str], body: str
    ) -> None:
        raise NotImplementedError


def _request_path(exchange: Any, api: Any, path: str) -> str:
    """The URL path ccxt will request for an implicit endpoint (what the venue's limits are keyed by)."""
    key = api[0] if isinstance(api, list | tuple) and api else api
    base = exchange.urls.get("api", {}).get(key, "") if isinstance(key, str) else ""
    if not isinstance(base, str):
        return "/" + path
    base = base.replace("{hostname}", "host")
    return urlsplit(f"{base.rstrip('/')}/{path}").path


def _capturing(base: type) -> type:
    """`base` (a ccxt exchange class) whose requests go through the venue's hooks (pacing before, limit
    headers after) and whose errors carry the failed response's status, headers and body."""

    class Capturing(base):  # type: ignore[misc, valid-type]
        tsbot_hooks: RequestHooks | None = None

        async def fetch2(self, path, api="public", method="GET", params=None, config=None):  # type: ignore[no-untyped-def]
            params = {} if params is None else params
            hooks = self.tsbot_hooks
            if hooks is not None:
                await hooks.before_request(method, _request_path(self, api, path), params)
            return await super().fetch2(path, api, method, params, {} if config is None else config)

        def handle_errors(
            self, code, reason, url, method, headers, body, response, request_headers, request_body
        ):  # type: ignore[no-untyped-def]
            hooks = self.tsbot_hooks
            if hooks is not None:
                hooks.after_response(method, urlsplit(url).path, code, dict(headers or {}), body or "")
            try:
                result = super().handle_errors(
                    code, reason, url, method, headers, body, response, request_headers, request_body
                )
                if code is not None and code >= 400:
                    self.handle_http_status_code(code, reason, url, method, body or "")
            except ccxt_errors.BaseError as error:
                error.http_context = HttpContext(code, dict(headers or {}), body or "")  # type: ignore[attr-defined]
                raise
            return result

    Capturing.__name__ = f"Capturing{base.__name__}"
    return Capturing


# ---- symbols and numbers --------------------------------------------------------------------------------


class SymbolMap:
    """Exchange-native id ↔ ccxt unified symbol (`SFPUSDT` ↔ `SFP/USDT:USDT`), from the loaded markets."""

    def __init__(self, pairs: Mapping[str, str]) -> None:
        self._to_unified = dict(pairs)
        self._to_native = {unified: native for native, unified in pairs.items()}

    def unified(self, native: str) -> str:
        try:
            return self._to_unified[native]
        except KeyError:
            raise Rejected(RejectCode.BAD_SYMBOL, f"invalid symbol {native!r}") from None

    def native(self, unified: str) -> str | None:
        return self._to_native.get(unified)

    def __contains__(self, native: object) -> bool:
        return native in self._to_unified

    def __len__(self) -> int:
        return len(self._to_unified)


def _decimal(value: Any, default: Decimal | None = None) -> Decimal | None:
    """A venue number (string preferred) as Decimal; None/empty → default."""
    if value is None or value == "":
        return default
    try:
        return Decimal(value if isinstance(value, str) else str(value))
    except InvalidOperation:
        return default


def _positive(value: Any) -> Decimal | None:
    number = _decimal(value)
    return number if number is not None and number > 0 else None


def _wire(value: Decimal) -> str:
    return format(value, "f")


def _seconds(ms: Any, default: float) -> float:
    try:
        return int(ms) / 1000 if ms not in (None, "", 0, "0") else default
    except (TypeError, ValueError):
        return default


# ---- the venue ------------------------------------------------------------------------------------------


class CcxtVenue(RequestHooks):
    """Shared shell: ccxt instance, HTTP session, pacing, markets, error translation, mark-price polling."""

    kind: str = ""
    _ccxt_id: str = ""

    def __init__(self, config: CcxtVenueConfig, *, clock: Clock | None = None) -> None:
        self._config = config
        self._clock: Clock = clock if clock is not None else SystemClock()
        exchange_class = _capturing(getattr(ccxt_async, self._ccxt_id))
        self._exchange: Any = exchange_class(self._exchange_options())
        self._exchange.tsbot_hooks = self
        # load_markets would also fetch currencies: a private wallet endpoint we have no use for.
        self._exchange.has = {**self._exchange.has, "fetchCurrencies": False}
        self._configure_urls()
        self._markets: dict[str, Market] = {}
        self._symbols = SymbolMap({})
        self._budgets: tuple[RateBudget, ...] = ()
        self._pacing: VenuePacing | None = None
        self._session: aiohttp.ClientSession | None = None
        self._streams: VenueStreams | None = None  # set by a venue with push streams
        self.refusals: dict[int, int] = {}  # HTTP status (429, 418, 403) -> how often the venue refused
        self.hedges = ReadHedger(self._clock)  # a late read is asked again (`engine.venues.read_hedge`)
        self._closed = False
        self._connected = False
        self._clock_resync: asyncio.Task[None] | None = None  # the venue's time being read again
        self._clock_resynced_at = -math.inf  # (monotonic) when it was last read again for a refusal
        self._clock_read_at = -math.inf  # (monotonic) when the venue's time was last read successfully
        self._clock_failure = SaidEvery(CLOCK_FAILURE_SAID_EVERY_SECONDS)  # a failed read of it, said
        self._ip_bans = IpBanLedger(config.ip_ban_record, bybit_limits.IP_BAN_SECONDS)
        self._ban_host = (
            urlsplit(config.base_url).netloc or f"{self.kind}{'-testnet' if config.testnet else ''}"
        )

    # ---- setup ------------------------------------------------------------------------------------------

    def _exchange_options(self) -> dict[str, Any]:
        return {
            "apiKey": self._config.api_key,
            "secret": self._config.api_secret,
            "timeout": int(self._config.request_timeout_seconds * 1000),
            # The engine paces every request itself (`engine.pacing`), on every venue and every URL; ccxt's
            # throttle would queue requests behind each other inside our call budgets (the incident's queue).
            "enableRateLimit": False,
            # Our own session is closed by `close()`; ccxt's extra wait on exit is for its own.
            "timeout_on_exit": 0,
        }

    def _configure_urls(self) -> None:
        if self._config.base_url:
            self._exchange.urls["api"] = _rehost(
                self._exchange.urls["api"], self._config.base_url.rstrip("/")
            )

    def _ensure_session(self) -> None:
        """Our HTTP session: a pool as large as the engine asked for (ccxt's own stops at 100), keep-alive."""
        if self._session is not None or self._closed:
            return
        connector = aiohttp.TCPConnector(
            limit=self._config.max_connections,
            limit_per_host=self._config.max_connections,
            ssl=ssl.create_default_context(cafile=certifi.where()),
            keepalive_timeout=30.0,
            enable_cleanup_closed=True,
        )
        self._session = aiohttp.ClientSession(connector=connector)
        self._exchange.session = self._session
        self._exchange.own_session = False

    def _stream_session(self) -> aiohttp.ClientSession:
        """The HTTP session the push streams' websockets ride on (the REST pool's)."""
        self._ensure_session()
        if self._session is None:
            raise RuntimeError(f"{self.kind} venue is closed")
        return self._session

    @property
    def name(self) -> str:
        return self.kind

    def capabilities(self) -> Capabilities:
        raise NotImplementedError

    def attach_pacing(self, pacing: VenuePacing) -> None:
        self._pacing = pacing

    async def connect(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.kind} venue is closed")
        self._ensure_session()
        self._connected = True

    async def close(self) -> None:
        if self._closed:
            return
        resync, self._clock_resync = self._clock_resync, None
        if resync is not None and not resync.done():
            resync.cancel()
            await asyncio.gather(resync, return_exceptions=True)
        if self._streams is not None:
            await self._streams.close()  # (before the session: its sockets use it)
        self._closed = True
        try:
            await self._exchange.close()
        except Exception:
            logger.exception("%s: closing the ccxt session failed", self.kind)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> CcxtVenue:
        await self.connect()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    # ---- pacing (RequestHooks) --------------------------------------------------------------------------

    def _request_costs(self, method: str, path: str, params: Mapping[str, Any]) -> dict[str, int]:
        """What one request spends of each request budget (by budget key)."""
        raise NotImplementedError

    def _observe_limits(self, method: str, path: str, headers: Mapping[str, str]) -> None:
        """Hand the venue's own counts from an answer's headers to the pacer and the order budget."""
        raise NotImplementedError

    async def before_request(self, method: str, path: str, params: Mapping[str, Any]) -> None:
        self._ensure_session()
        if self._pacing is not None:
            await self._pacing.requests.acquire(
                self._request_costs(method.upper(), path, params), mutating=method.upper() != "GET"
            )
        mark_sent()  # a read's lateness counts from here, not from its wait for budget

    def after_response(
        self, method: str, path: str, status: int | None, headers: Mapping[str, str], body: str
    ) -> None:
        if status in (403, 418, 429):
            self.refusals[status] = self.refusals.get(status, 0) + 1
        pacing = self._pacing
        if pacing is None:
            return
        try:
            self._observe_limits(method.upper(), path, headers)
        except (TypeError, ValueError):
            logger.warning("%s: unreadable rate-limit headers on %s %s", self.kind, method, path)
        context = HttpContext(status, headers, body)
        code, message = _venue_code_and_message(Exception(body), context)
        ban = _BAN_UNTIL.search(message)
        if status == 418 or ban is not None:
            until = int(ban.group(1)) / 1000 if ban else time.time() + _retry_after(context, 120.0)
            pacing.banned(until)
        elif status == 403 and self.kind == BYBIT:
            pacing.banned(self.ip_ban_until(time.time()))
        elif (
            self.kind == BYBIT
            and code in _BYBIT_RATE
            and headers_have(headers, bybit_limits.LIMIT_STATUS_HEADER, bybit_limits.LIMIT_HEADER)
        ):
            # Bybit counts per endpoint: the answer's limit headers booked that endpoint's window full
            # (`_observe_limits`); the other endpoints (a guard's trading-stop) are not held back.
            return
        elif status == 429 or (self.kind == BYBIT and code in _BYBIT_RATE):
            orders_only = self.kind == BINANCEUSDM and code == _BINANCE_ORDER_RATE
            pacing.rate_limited(_rate_limit_wait(self.kind, code, message, context), orders_only=orders_only)

    # ---- shared helpers ---------------------------------------------------------------------------------

    async def _call(
        self,
        awaitable: Any,
        *,
        mutating: bool,
        symbol: str | None = None,
        client_order_id: str | None = None,
    ) -> Any:
        try:
            return await awaitable
        except ExchangeError:
            raise
        except (TimeoutError, ccxt_errors.BaseError, aiohttp.ClientError) as error:
            translated = translate_error(
                error,
                venue=self.kind,
                mutating=mutating,
                symbol=symbol,
                client_order_id=client_order_id,
                now=time.time(),
                ip_ban_until=self.ip_ban_until,
            )
            # DEBUG only: the caller reports the failure once, in its own words (what it was doing, for
            # which position, the class and the venue's code). A WARN here as well doubled every line.
            logger.debug("%s", translated)
            if translated.venue_code in _CLOCK_REFUSALS.get(self.kind, ()):
                self._resync_clock(translated)
            raise translated from error

    def ip_ban_runs_until(self, now: float) -> float | None:
        """The end of an IP ban a process of this installation met and that still runs at `now` (epoch
        seconds), None if none does: a request sent into it is refused all the same."""
        return self._ip_bans.running_until(self._ban_host, now)

    def ip_ban_until(self, now: float) -> float:
        """An IP ban the venue does not date (Bybit's 403), met at `now`: its end, from its first refusal,
        which another process of this installation may have met (`engine.venues.ip_bans`)."""
        return self._ip_bans.ban_until(self._ban_host, now)

    def _resync_clock(self, refusal: ExchangeError) -> None:
        """The venue refused a request's timestamp (Bybit 10002, Binance -1021: never run): our clock is off
        from the venue's. Its time is read again at once (once for a burst of refusals, at most every
        CLOCK_RESYNC_MIN_SECONDS), so the caller's retry is signed right: every signed call was refused for
        up to 5 minutes, until the markets' reload re-read it (an operator: a hand-removed trailing stop
        left unreplaced 3 min 13 s). The refusal is raised at once, not held for the read (its caller's
        budget ran on meanwhile), and the read is no caller's: it runs outside their pacing lane."""
        running = self._clock_resync
        if self._closed or (running is not None and not running.done()):
            return
        now = self._clock.monotonic()
        # A burst of refusals signed before the last read answered reads nothing more; one signed after it
        # proves that read stale: read again (the clock moved back 1.5 s after a read, and refusals went on
        # until 5 s after it: 42 hard stops off up to 9.4 s and the breaker tripped; a reviewer).
        if now - self._clock_resynced_at < CLOCK_RESYNC_MIN_SECONDS and now - self._clock_read_at < (
            CLOCK_BURST_SECONDS
        ):
            return
        self._clock_resynced_at = now
        self._clock_resync = asyncio.get_running_loop().create_task(
            self._read_venue_time(refusal), name=f"{self.kind}-clock-resync", context=contextvars.Context()
        )

    async def venue_time_read(self, limit: float, since: float = -math.inf) -> bool:
        running = self._clock_resync
        if running is not None and not running.done():
            await asyncio.wait({running}, timeout=limit)  # (not cancelled at the limit: it runs on)
        return self._clock_read_at >= since

    async def _read_venue_time(self, refusal: ExchangeError) -> None:
        before = self._exchange.options.get("timeDifference", 0)
        try:
            await self._exchange.load_time_difference()
        except Exception as exc:  # said; the next refusal tries again, at once
            self._clock_resynced_at = -math.inf
            # Said once a minute while it lasts: each refused resend of each naked position tried again (r70:
            # six WARNING lines a second while the venue's time endpoint failed).
            logger.log(
                self._clock_failure.level(self._clock.monotonic()),
                "%s: the venue refused our clock (%s); reading its time failed: %s",
                self.kind,
                refusal,
                exc,
            )
            return
        self._clock_read_at = self._clock.monotonic()
        self._clock_failure.ended()
        after = self._exchange.options.get("timeDifference", 0)
        logger.warning(
            "%s: the venue refused a request's timestamp (%s): our clock was off from the venue's; its time "
            "read again (offset %s ms, was %s ms)",
            self.kind,
            refusal,
            after,
            before,
        )

    async def _read(
        self,
        make: Callable[[], Awaitable[Any]],
        what: str,
        *,
        symbol: str | None = None,
        client_order_id: str | None = None,
    ) -> Any:
        """An idempotent read (`make()` builds its request), asked again once its answer is late."""
        return await self.hedges.read(
            lambda: self._call(make(), mutating=False, symbol=symbol, client_order_id=client_order_id),
            f"{self.kind} {what}" + (f" {symbol}" if symbol else ""),
        )

    async def _read_back(self, symbol: str, client_order_id: str, read: Awaitable[Order]) -> Order:
        """An order the venue has just accepted, read back for its fill. The read failing says nothing about
        the order: it was accepted, and its outcome stays unknown until it is read by its id. Raised as it
        came (a 429, a 5xx, "not found" within the read lag) it was taken for the order's refusal: an entry
        rejected with its signal while its position opened, or an entry "refused for the rate" sent again
        with an id the venue no longer holds open, a second entry where the first had filled."""
        try:
            return await read
        except ExchangeError as exc:
            raise OutcomeUnknown(
                client_order_id, f"{self.kind} {symbol}: accepted, then reading it back failed ({exc})"
            ).answered(failure=FailureClass.UNKNOWN_OUTCOME) from exc

    async def _ensure_markets(self) -> None:
        if not self._markets:
            await self.load_markets()

    def _market(self, symbol: str) -> Market:
        market = self._markets.get(symbol)
        if market is None:
            raise Rejected(RejectCode.BAD_SYMBOL, f"invalid symbol {symbol!r}")
        return market

    async def _check_order(
        self, symbol: str, quantity: Decimal, client_order_id: str, *prices: tuple[str, Decimal | None]
    ) -> None:
        """What every order passes before it is sent: a known market, values on its grid, a valid id."""
        await self._ensure_markets()
        self._require_grid(self._market(symbol), quantity, *prices)
        self._require_client_order_id(client_order_id)

    @staticmethod
    def _require_client_order_id(client_order_id: str) -> None:
        if not CLIENT_ORDER_ID_PATTERN.fullmatch(client_order_id):
            raise Rejected(
                RejectCode.INVALID_CLIENT_ORDER_ID, "client order id is not valid (1-36 of [.A-Za-z0-9:/_-])"
            )

    @staticmethod
    def _require_grid(market: Market, quantity: Decimal, *prices: tuple[str, Decimal | None]) -> None:
        """Refuse what ccxt would silently round: sizes off the step, prices off the tick."""
        if quantity <= 0:
            raise Rejected(RejectCode.QUANTITY_TOO_SMALL, "quantity must be greater than zero")
        if not market.is_on_step(quantity):
            raise Rejected(
                RejectCode.BAD_PRECISION, f"quantity {quantity} is not a multiple of {market.step_size}"
            )
        for what, price in prices:
            if price is not None and (price <= 0 or not market.is_on_tick(price)):
                raise Rejected(
                    RejectCode.BAD_PRECISION,
                    f"{what} {price} is not a positive multiple of {market.tick_size}",
                )

    @staticmethod
    def _require_callback(callback_rate: Decimal) -> None:
        if not CALLBACK_RATE_MIN <= callback_rate <= CALLBACK_RATE_MAX:
            raise Rejected(
                RejectCode.INVALID_PARAMETER,
                f"callback rate {callback_rate} outside {CALLBACK_RATE_MIN}..{CALLBACK_RATE_MAX}",
            )

    # ---- mark prices ------------------------------------------------------------------------------------

    async def fetch_mark_prices(self, symbols: Collection[str] | None = None) -> dict[str, MarkPrice]:
        raise NotImplementedError

    async def watch_mark_prices(self, symbols: Collection[str] | None = None) -> AsyncIterator[MarkPrice]:
        """The venue's mark stream (REST for what is stale), or without one REST polling every
        `mark_poll_seconds` (a read: it yields to protective requests)."""
        await self._ensure_markets()
        if self._streams is not None:
            for symbol in symbols or ():
                self._market(symbol)
            async for mark in self._streams.watch_mark_prices(self._stream_symbols(symbols)):
                if mark.symbol in self._markets:
                    yield mark
            return
        wanted = None if symbols is None else list(symbols)
        last_seen: dict[str, float] = {}
        failing_since: float | None = None
        while not self._closed:
            try:
                marks = await self.fetch_mark_prices(wanted)
            except ExchangeError as error:
                if failing_since is None:
                    failing_since = self._clock.monotonic()
                    logger.warning(
                        "%s: mark prices unavailable (%s); the price feed goes stale", self.kind, error
                    )
            else:
                if failing_since is not None:
                    logger.info(
                        "%s: mark prices back after %.1fs", self.kind, self._clock.monotonic() - failing_since
                    )
                    failing_since = None
                for mark in marks.values():
                    if mark.timestamp > last_seen.get(mark.symbol, -1.0):  # only fresh marks count as fresh
                        last_seen[mark.symbol] = mark.timestamp
                        yield mark
            await self._clock.sleep(self._config.mark_poll_seconds)

    # ---- push streams -----------------------------------------------------------------------------------

    def _stream_symbols(self, symbols: Collection[str] | None) -> Collection[str] | None:
        """What to ask the mark stream for (None: every symbol, where the venue has such a stream)."""
        return symbols

    async def watch_account(self) -> AsyncIterator[AccountEvent]:
        """The venue's account stream (a `StreamGap` after every interruption); without one it ends at
        once: the reconciler's polling is then the only source."""
        if self._streams is None:
            return
        async for event in self._streams.watch_account():
            yield event

    def stream_states(self) -> tuple[StreamState, ...]:
        return () if self._streams is None else self._streams.states()


def _rehost(urls: Any, base_url: str) -> Any:
    """Point every URL of ccxt's `urls['api']` at `base_url`, keeping the path (nothing leaves loopback)."""
    if isinstance(urls, dict):
        return {key: _rehost(value, base_url) for key, value in urls.items()}
    if isinstance(urls, str) and "://" in urls:
        scheme, rest = urls.split("://", 1)
        path = rest.split("/", 1)[1] if "/" in rest else ""
        target = base_url
        if scheme in ("ws", "wss"):
            target = base_url.replace("http://", "ws://").replace("https://", "wss://")
        return f"{target}/{path}" if path else target
    return urls


# ---- construction ---------------------------------------------------------------------------------------


def build_ccxt_venue(config: CcxtVenueConfig, *, clock: Clock | None = None) -> CcxtVenue:
    # One module per venue, over this plumbing.
    from engine.venues.binance_venue import BinanceUsdmVenue
    from engine.venues.bybit_venue import BybitLinearVenue

    factories: dict[str, Callable[..., CcxtVenue]] = {BINANCEUSDM: BinanceUsdmVenue, BYBIT: BybitLinearVenue}
    return factories[config.kind](config, clock=clock)


__all__ = [
    "BINANCEUSDM",
    "BYBIT",
    "CcxtVenue",
    "CcxtVenueConfig",
    "HttpContext",
    "SymbolMap",
    "build_ccxt_venue",
    "translate_error",
]

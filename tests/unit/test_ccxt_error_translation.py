"""Error translation of the ccxt adapter, code by code, from real HTTP answers.

Most answers come from the Binance-wire emulator (its core's refusals and its injected faults); the few
it cannot produce (a dropped connection, a refused connection, an odd status) come from a tiny loopback
stub. Every case goes through real ccxt: its request signing, its own error mapping, then ours.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal

import aiohttp
import pytest
from aiohttp import web
from ccxt.base import errors as ccxt_errors

from engine.exchange import (
    Banned,
    ClockRefused,
    DuplicateClientOrderId,
    InsufficientMargin,
    NotFound,
    OrderSide,
    OrderStatus,
    OutcomeUnknown,
    RateLimited,
    RejectCode,
    Rejected,
    Retryable,
    WouldTriggerImmediately,
)
from engine.exchange.errors import ExchangeError, FailureClass, failure_class
from engine.venues.binance_emulator import BinanceEmulator, running
from engine.venues.binance_venue import BinanceUsdmVenue
from engine.venues.ccxt_venue import CcxtVenueConfig, HttpContext, translate_error
from engine.venues.sim.settings import RateLimitSettings, SimVenueSettings

KEY = "translation-key"
SECRET = "translation-secret-do-not-leak"
SYMBOL = "SFPUSDT"
QTY = Decimal("100")


@dataclass
class Rig:
    venue: BinanceUsdmVenue
    emulator: BinanceEmulator
    control: aiohttp.ClientSession
    base_url: str

    async def fault(self, call: str, fault: str, count: int = 1) -> None:
        body = {"call": call, "fault": fault, "count": count, "hold_seconds": 3}
        async with self.control.post(f"{self.base_url}/_sim/fault", json=body) as response:
            assert response.status == 200, await response.text()

    async def long(self) -> None:
        await self.venue.create_market_order(SYMBOL, OrderSide.BUY, QTY, client_order_id="entry-1")


def _venue(base_url: str, *, key: str = KEY, secret: str = SECRET, timeout: float = 1.0) -> BinanceUsdmVenue:
    return BinanceUsdmVenue(
        CcxtVenueConfig(
            kind="binanceusdm",
            api_key=key,
            api_secret=secret,
            base_url=base_url,
            request_timeout_seconds=timeout,
        )
    )


@asynccontextmanager
async def rig(**settings: object) -> AsyncIterator[Rig]:
    sim = SimVenueSettings(seed=3, volatility=0.0, symbols=[SYMBOL, "BTCUSDT"], **settings)  # type: ignore[arg-type]
    emulator = BinanceEmulator(sim, api_key=KEY, api_secret=SECRET, control=True)
    async with running(emulator) as base_url, aiohttp.ClientSession() as control:
        venue = _venue(base_url)
        try:
            await venue.load_markets()
            yield Rig(venue, emulator, control, base_url)
        finally:
            await venue.close()


def assert_clean(error: BaseException) -> None:
    """Translated messages carry codes, symbols and ids: never credentials or signed parameters."""
    text = str(error)
    assert SECRET not in text
    assert KEY not in text
    assert "signature" not in text
    assert "timestamp=" not in text


async def raises(kind: type[ExchangeError], call: Awaitable[object]) -> ExchangeError:
    with pytest.raises(kind) as raised:
        await call
    assert_clean(raised.value)
    assert raised.value.__cause__ is not None  # translated once, `raise … from` the ccxt error
    return raised.value


# ---- the venue's refusals (HTTP 400 + Binance code) ----------------------------------------------------


async def test_2021_would_trigger_immediately() -> None:
    async with rig() as r:
        await r.long()
        error = await raises(
            WouldTriggerImmediately,
            r.venue.create_stop_market_order(
                SYMBOL, OrderSide.SELL, QTY, Decimal("0.5000"), client_order_id="sl"
            ),
        )
        assert error.code == RejectCode.WOULD_IMMEDIATELY_TRIGGER == -2021


async def test_4045_conditional_order_cap_is_rejected_with_the_reason() -> None:
    async with rig(max_conditional_orders=1) as r:
        await r.long()
        await r.venue.create_stop_market_order(
            SYMBOL, OrderSide.SELL, QTY, Decimal("0.4"), client_order_id="sl-1"
        )
        error = await raises(
            Rejected,
            r.venue.create_stop_market_order(
                SYMBOL, OrderSide.SELL, QTY, Decimal("0.4"), client_order_id="sl-2"
            ),
        )
        assert error.code == RejectCode.MAX_CONDITIONAL_ORDERS == -4045
        assert "conditional order cap" in str(error)
        assert (failure_class(error), error.venue_code, error.http_status) == (
            FailureClass.REJECTED,
            -4045,
            400,
        )


async def test_20132_duplicate_algo_id_is_duplicate_client_order_id() -> None:
    # -4116 (a regular order's id) needs an open regular order, which a market-only venue never has: the
    # stub below stages it.
    async with rig() as r:
        await r.long()
        await r.venue.create_stop_market_order(
            SYMBOL, OrderSide.SELL, QTY, Decimal("0.4"), client_order_id="sl"
        )
        algo = await raises(
            DuplicateClientOrderId,
            r.venue.create_stop_market_order(
                SYMBOL, OrderSide.SELL, QTY, Decimal("0.4"), client_order_id="sl"
            ),
        )
        assert algo.client_order_id == "sl"  # type: ignore[attr-defined]


async def test_2019_margin_is_insufficient_margin() -> None:
    async with rig() as r:
        await raises(
            InsufficientMargin,
            r.venue.create_market_order(SYMBOL, OrderSide.BUY, Decimal("10000000"), client_order_id="huge"),
        )


async def test_2022_reduce_only_is_rejected_with_its_code_and_unknown_symbols_never_leave() -> None:
    async with rig() as r:
        reduce_only = await raises(
            Rejected,
            r.venue.create_market_order(SYMBOL, OrderSide.SELL, QTY, client_order_id="ro", reduce_only=True),
        )
        assert reduce_only.code == RejectCode.REDUCE_ONLY_REJECTED
        with pytest.raises(Rejected) as bad_symbol:  # refused at the edge: the symbol map has no such market
            await r.venue.fetch_mark_prices(["NOPEUSDT"])
        assert bad_symbol.value.code == RejectCode.BAD_SYMBOL


async def test_2013_and_20124_unknown_orders_are_not_found() -> None:
    async with rig() as r:
        await raises(NotFound, r.venue.fetch_order(SYMBOL, "never"))
        await raises(NotFound, r.venue.cancel_order(SYMBOL, "never"))


# ---- rate limits and bans ------------------------------------------------------------------------------


async def _early_in_an_order_window(needed: float = 3.0) -> None:
    """The emulator counts new orders in fixed 10 s windows of its clock, as Binance does: orders meant to
    fill one window must not straddle its end (this test's third order then went into a fresh window, and
    was not refused, in one CI run)."""
    left = 10.0 - time.time() % 10.0
    if left < needed:
        await asyncio.sleep(left + 0.05)


async def test_429_from_the_order_budget_honours_retry_after() -> None:
    async with rig(rate_limits=RateLimitSettings(orders_per_10s=2, ban_after_violations=5)) as r:
        await _early_in_an_order_window()
        await r.long()
        await r.venue.create_market_order(SYMBOL, OrderSide.SELL, QTY, client_order_id="exit-1")
        error = await raises(
            RateLimited, r.venue.create_market_order(SYMBOL, OrderSide.BUY, QTY, client_order_id="x")
        )
        assert isinstance(error, RateLimited)
        assert 1 <= error.retry_after <= 10  # the Retry-After header, in whole seconds
        assert r.venue.capabilities().order_rate_budgets[0].limit == 2  # read from exchangeInfo.rateLimits


async def test_429_injected_on_a_read_is_rate_limited() -> None:
    async with rig() as r:
        await r.fault("fetch_positions", "ratelimit")
        error = await raises(RateLimited, r.venue.fetch_positions())
        assert error.retry_after == 1.0  # type: ignore[attr-defined]


async def test_418_is_banned_until_the_time_binance_names() -> None:
    async with rig() as r:
        await r.fault("fetch_balance", "ban")
        before = time.time()
        error = await raises(Banned, r.venue.fetch_balance())
        assert before < error.until <= before + 5  # type: ignore[attr-defined]


async def test_ignoring_429_turns_into_a_ban_that_refuses_reads_too() -> None:
    limits = RateLimitSettings(orders_per_10s=1, ban_after_violations=2, ban_seconds=60)
    async with rig(rate_limits=limits) as r:
        await _early_in_an_order_window()
        await r.long()
        await raises(
            RateLimited, r.venue.create_market_order(SYMBOL, OrderSide.BUY, QTY, client_order_id="a")
        )
        banned = await raises(
            Banned, r.venue.create_market_order(SYMBOL, OrderSide.BUY, QTY, client_order_id="b")
        )
        assert banned.until > time.time() + 30  # type: ignore[attr-defined]
        await raises(Banned, r.venue.fetch_positions())


# ---- outcomes: executed or not, known or not -----------------------------------------------------------


async def test_503_1007_execution_status_unknown_on_a_write_is_outcome_unknown_and_the_order_exists() -> None:
    async with rig() as r:
        await r.fault("create_order", "unknown")
        error = await raises(
            OutcomeUnknown, r.venue.create_market_order(SYMBOL, OrderSide.BUY, QTY, client_order_id="amb")
        )
        assert error.client_order_id == "amb"  # type: ignore[attr-defined]
        # The venue answered (503) that it does not know: an unknown outcome, neither a timeout nor a 500.
        assert (failure_class(error), error.venue_code) == (FailureClass.UNKNOWN_OUTCOME, -1007)
        assert (await r.venue.fetch_order(SYMBOL, "amb")).status is OrderStatus.FILLED


async def test_503_1007_on_a_read_is_retryable() -> None:
    async with rig() as r:
        await r.fault("fetch_balance", "unknown")
        await raises(Retryable, r.venue.fetch_balance())


async def test_503_1008_server_busy_is_retryable_and_nothing_was_executed() -> None:
    async with rig() as r:
        await r.fault("create_order", "busy")
        busy = await raises(
            Retryable, r.venue.create_market_order(SYMBOL, OrderSide.BUY, QTY, client_order_id="busy")
        )
        assert (failure_class(busy), busy.http_status, busy.venue_code) == (
            FailureClass.SERVER_ERROR,
            503,
            -1008,
        )
        await raises(NotFound, r.venue.fetch_order(SYMBOL, "busy"))


async def test_http_500_on_a_write_is_outcome_unknown_and_on_a_read_retryable() -> None:
    async with rig() as r:
        await r.fault("create_order", "error")
        error = await raises(
            OutcomeUnknown, r.venue.create_market_order(SYMBOL, OrderSide.BUY, QTY, client_order_id="e")
        )
        # Resolved by id like a timeout (a 5xx may have executed), but it is a server error, not a timeout.
        assert (failure_class(error), error.http_status, error.venue_code) == (
            FailureClass.SERVER_ERROR,
            500,
            -1000,
        )
        await r.fault("fetch_positions", "error")
        read = await raises(Retryable, r.venue.fetch_positions())
        assert failure_class(read) is FailureClass.SERVER_ERROR


async def test_request_timeout_on_a_write_is_outcome_unknown() -> None:
    async with rig() as r:
        await r.long()
        await r.fault("create_order", "timeout")
        error = await raises(
            OutcomeUnknown,
            r.venue.create_trailing_stop_order(
                SYMBOL, OrderSide.SELL, QTY, Decimal("1"), client_order_id="ts"
            ),
        )
        assert error.client_order_id == "ts"  # type: ignore[attr-defined]
        assert (failure_class(error), error.http_status) == (FailureClass.TIMEOUT, None)
        assert (await r.venue.fetch_order(SYMBOL, "ts")).is_open


# ---- credentials ---------------------------------------------------------------------------------------


async def test_1022_bad_signature_and_2015_unknown_key_are_rejected_without_leaking_them() -> None:
    async with rig() as r:
        wrong_secret = _venue(r.base_url, secret="not-the-secret")
        wrong_key = _venue(r.base_url, key="not-the-key")
        try:
            bad_signature = await raises(Rejected, wrong_secret.fetch_balance())
            unknown_key = await raises(Rejected, wrong_key.fetch_balance())
        finally:
            await wrong_secret.close()
            await wrong_key.close()
        assert bad_signature.code == -1022
        assert unknown_key.code == -2015
        assert "not-the-secret" not in str(bad_signature)


# ---- what only a stub can stage ------------------------------------------------------------------------


@asynccontextmanager
async def stub(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(address[1] for address in runner.addresses if isinstance(address, tuple))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_a_dropped_connection_is_outcome_unknown_for_writes_and_retryable_for_reads() -> None:
    async def drop(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    async with stub(drop) as base_url:
        venue = _venue(base_url)
        try:
            await raises(Retryable, venue.fetch_balance())
            dropped = await raises(
                OutcomeUnknown,
                venue._call(
                    venue._exchange.fapiPrivatePostLeverage({"symbol": SYMBOL, "leverage": 5}), mutating=True
                ),
            )
            assert failure_class(dropped) is FailureClass.UNKNOWN_OUTCOME
        finally:
            await venue.close()


async def test_a_refused_connection_is_retryable_even_for_writes() -> None:
    async def never(_request: web.Request) -> web.StreamResponse:
        raise AssertionError("nothing should reach this port")

    async with stub(never) as base_url:
        pass  # the port is closed again: nothing listens there now
    venue = _venue(base_url)
    try:
        await raises(Retryable, venue.fetch_balance())
        refused = await raises(
            Retryable,
            venue._call(
                venue._exchange.fapiPrivatePostLeverage({"symbol": SYMBOL, "leverage": 5}), mutating=True
            ),
        )
        assert failure_class(refused) is FailureClass.NOT_SENT
    finally:
        await venue.close()


@pytest.mark.parametrize(
    ("status", "body", "mutating", "expected"),
    [
        pytest.param(
            400,
            '{"code":-1021,"msg":"Timestamp for this request is outside of the recvWindow."}',
            True,
            ClockRefused,  # never run, our clock off: an entry goes again once the venue's time is read
            id="1021",
        ),
        pytest.param(
            408,
            '{"code":-1007,"msg":"Timeout waiting for response from backend server."}',
            True,
            OutcomeUnknown,
            id="1007-408",
        ),
        pytest.param(502, "<html>Bad Gateway</html>", True, OutcomeUnknown, id="502-write"),
        pytest.param(502, "<html>Bad Gateway</html>", False, Retryable, id="502-read"),
        pytest.param(
            503, '{"code":-1008,"msg":"Server is currently overloaded"}', True, Retryable, id="1008"
        ),
        pytest.param(
            400,
            '{"code":-4116,"msg":"ClientOrderId is duplicated."}',
            True,
            DuplicateClientOrderId,
            id="4116",
        ),
    ],
)
async def test_odd_statuses(status: int, body: str, mutating: bool, expected: type[ExchangeError]) -> None:
    async def answer(_request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text=body, content_type="application/json")

    async with stub(answer) as base_url:
        venue = _venue(base_url)
        try:
            call = venue._exchange.fapiPrivatePostLeverage({"symbol": SYMBOL, "leverage": 5})
            error = await raises(expected, venue._call(call, mutating=mutating))
            # Only a refused timestamp is the clock's: a busy server's refusal is no reason to resend an entry.
            assert isinstance(error, ClockRefused) == (expected is ClockRefused)
        finally:
            await venue.close()


# ---- ccxt's own classes --------------------------------------------------------------------------------


def test_rate_limit_exceeded_and_ddos_protection_are_siblings_and_both_mean_rate_limited() -> None:
    assert not issubclass(ccxt_errors.DDoSProtection, ccxt_errors.RateLimitExceeded)
    assert not issubclass(ccxt_errors.RateLimitExceeded, ccxt_errors.DDoSProtection)
    for error in (ccxt_errors.DDoSProtection("binanceusdm"), ccxt_errors.RateLimitExceeded("binanceusdm")):
        assert isinstance(translate_error(error, venue="binanceusdm", mutating=True), RateLimited)


def test_a_418_body_names_the_ban_end_even_without_a_status() -> None:
    error = ccxt_errors.DDoSProtection(
        'binanceusdm {"code":-1003,"msg":"Way too many requests; IP banned until 1900000000000."}'
    )
    translated = translate_error(error, venue="binanceusdm", mutating=False)
    assert isinstance(translated, Banned)
    assert translated.until == 1_900_000_000


def test_retry_after_header_wins_over_the_default() -> None:
    error = ccxt_errors.DDoSProtection("binanceusdm 429")
    error.http_context = HttpContext(429, {"retry-after": "7"}, '{"code":-1003,"msg":"Too many requests"}')  # type: ignore[attr-defined]
    translated = translate_error(error, venue="binanceusdm", mutating=True)
    assert isinstance(translated, RateLimited)
    assert translated.retry_after == 7.0


def test_an_unreadable_answer_to_a_write_is_outcome_unknown() -> None:
    translated = translate_error(
        ccxt_errors.BadResponse("binanceusdm"), venue="binanceusdm", mutating=True, client_order_id="x"
    )
    assert isinstance(translated, OutcomeUnknown)
    assert translated.client_order_id == "x"


def test_4142_will_be_triggered_immediately_is_would_trigger_like_2021() -> None:
    """Binance answers -4142 ("will be triggered immediately") for some conditional orders whose trigger is
    already crossed: the protection goal is breached exactly as with -2021, so the close-at-market path
    must run, not an endless retry of a refused order."""
    error = ccxt_errors.InvalidOrder("binanceusdm")
    error.http_context = HttpContext(  # type: ignore[attr-defined]
        400, {}, '{"code":-4142,"msg":"Order would be triggered immediately."}'
    )
    translated = translate_error(error, venue="binanceusdm", mutating=True, symbol=SYMBOL)
    assert isinstance(translated, WouldTriggerImmediately)


def test_a_bybit_403_is_a_ten_minute_ban_not_a_retry() -> None:
    """Bybit: "403, access too frequent" bans the IP for at least 10 minutes; retrying only extends it."""
    error = ccxt_errors.DDoSProtection("bybit 403")
    error.http_context = HttpContext(403, {}, "access too frequent")  # type: ignore[attr-defined]
    translated = translate_error(error, venue="bybit", mutating=True, now=1_000.0)
    assert isinstance(translated, Banned)
    assert translated.until == 1_600.0

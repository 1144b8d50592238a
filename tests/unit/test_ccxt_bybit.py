"""The Bybit (v5, linear) path of the ccxt adapter, against a loopback stub that checks ccxt's signature,
records each request and answers canned v5 responses: these tests pin exactly what we send
(`/v5/position/trading-stop` for the hard and the trailing stop, `positionIdx`, `/v5/order/create`) and how
we read and translate the answers. The venue's behaviour is tested against the Bybit emulator
(tests/unit/test_bybit_venue.py, the contract suite's `[ccxt-bybit]`)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web

from engine.clock import SystemClock
from engine.exchange import (
    DuplicateClientOrderId,
    OrderSide,
    OrderStatus,
    OrderType,
    OutcomeUnknown,
    RateLimited,
    Rejected,
    WouldTriggerImmediately,
)
from engine.exchange.errors import Banned
from engine.exchange.port import ChecksRecordedStops, Order, RequestBudget
from engine.pacing import RequestPacer, VenuePacing
from engine.venues.bybit_venue import BybitLinearVenue
from engine.venues.ccxt_venue import CcxtVenueConfig

KEY = "bybit-test-key"
SECRET = "bybit-test-secret"

INSTRUMENT = {
    "symbol": "SFPUSDT",
    "contractType": "LinearPerpetual",
    "status": "Trading",
    "baseCoin": "SFP",
    "quoteCoin": "USDT",
    "settleCoin": "USDT",
    "launchTime": "1585526400000",
    "deliveryTime": "0",
    "deliveryFeeRate": "",
    "priceScale": "4",
    "leverageFilter": {"minLeverage": "1", "maxLeverage": "50.00", "leverageStep": "0.01"},
    "priceFilter": {"minPrice": "0.0001", "maxPrice": "1999.9998", "tickSize": "0.0001"},
    "lotSizeFilter": {
        "maxOrderQty": "1000000",
        "maxMktOrderQty": "200000",
        "minOrderQty": "1",
        "qtyStep": "1",
        "postOnlyMaxOrderQty": "1000000",
        "minNotionalValue": "5",
    },
    "unifiedMarginTrade": True,
    "fundingInterval": 480,
    "copyTrading": "both",
    "upperFundingRate": "0.005",
    "lowerFundingRate": "-0.005",
}


def _ok(result: Any) -> web.Response:
    return web.json_response(
        {"retCode": 0, "retMsg": "OK", "result": result, "retExtInfo": {}, "time": int(time.time() * 1000)}
    )


@dataclass
class BybitStub:
    position: dict[str, Any] | None = None
    other_side: dict[str, Any] | None = None  # hedge mode: the symbol's other position row
    errors: dict[str, tuple[int, str]] = field(default_factory=dict)  # path -> (retCode, retMsg)
    requests: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    limits: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (X-Bapi-Limit, -Status)
    status: dict[str, int] = field(default_factory=dict)  # path -> an HTTP status to answer with
    executions: list[dict[str, Any]] = field(default_factory=list)  # execution/list rows, newest first
    stop_rows: list[dict[str, Any]] = field(default_factory=list)  # order/realtime's StopOrder rows

    async def handle(self, request: web.Request) -> web.Response:
        response = await self._answer(request)
        if request.path in self.limits:
            limit, left = self.limits[request.path]
            response.headers["X-Bapi-Limit"] = str(limit)
            response.headers["X-Bapi-Limit-Status"] = str(left)
            response.headers["X-Bapi-Limit-Reset-Timestamp"] = str(int(time.time() * 1000))
        return response

    def sent(self, path: str) -> list[dict[str, Any]]:
        return [body for method, p, body in self.requests if p == path]

    async def _answer(self, request: web.Request) -> web.Response:
        path = request.path
        if path in self.status:
            return web.Response(status=self.status[path], text="access too frequent")
        body_text = await request.text()
        if path.startswith("/v5/market/"):
            return self._public(path, request)
        # private: verify ccxt's v5 signature like Bybit does
        payload = body_text if request.method == "POST" else request.rel_url.raw_query_string
        expected = hmac.new(
            SECRET.encode(),
            (
                request.headers["X-BAPI-TIMESTAMP"] + KEY + request.headers["X-BAPI-RECV-WINDOW"] + payload
            ).encode(),
            hashlib.sha256,
        ).hexdigest()
        if request.headers.get("X-BAPI-API-KEY") != KEY or request.headers.get("X-BAPI-SIGN") != expected:
            return web.json_response({"retCode": 10004, "retMsg": "error sign!", "result": {}})
        body = json.loads(body_text) if body_text else dict(request.query)
        self.requests.append((request.method, path, body))
        if path in self.errors:
            code, message = self.errors[path]
            return web.json_response({"retCode": code, "retMsg": message, "result": {}, "time": 0})
        if path == "/v5/position/list":
            rows = [row for row in (self.position, self.other_side) if row]
            return _ok({"category": "linear", "list": rows})
        if path == "/v5/position/trading-stop":
            return _ok({})
        if path == "/v5/order/create":
            return _ok({"orderId": "b-1", "orderLinkId": body["orderLinkId"]})
        if path == "/v5/execution/list":
            return _ok({"category": "linear", "list": self.executions, "nextPageCursor": ""})
        if path == "/v5/order/realtime" and body.get("orderFilter") == "StopOrder":
            return _ok({"category": "linear", "list": self.stop_rows, "nextPageCursor": ""})
        if path == "/v5/order/realtime":
            return _ok(
                {
                    "category": "linear",
                    "list": [
                        {
                            "orderId": "b-1",
                            "orderLinkId": body["orderLinkId"],
                            "symbol": "SFPUSDT",
                            "side": "Buy",
                            "orderType": "Market",
                            "orderStatus": "Filled",
                            "qty": "100",
                            "cumExecQty": "100",
                            "avgPrice": "0.5001",
                            "reduceOnly": False,
                            "createdTime": "1700000000000",
                            "updatedTime": "1700000000100",
                        }
                    ],
                }
            )
        return web.json_response({"retCode": 10001, "retMsg": f"unexpected {path}", "result": {}})

    def _public(self, path: str, request: web.Request) -> web.Response:
        if path == "/v5/market/instruments-info":
            listed = [] if request.query.get("status") == "PreLaunch" else [INSTRUMENT]
            return _ok({"category": "linear", "list": listed})
        if path == "/v5/market/tickers":
            return _ok(
                {
                    "category": "linear",
                    "list": [{"symbol": "SFPUSDT", "markPrice": "0.5000", "lastPrice": "0.5"}],
                }
            )
        if path == "/v5/market/time":
            now = int(time.time() * 1000)
            return _ok({"timeSecond": str(now // 1000), "timeNano": str(now * 1_000_000)})
        return web.json_response({"retCode": 10001, "retMsg": f"unexpected {path}", "result": {}})


def _position(idx: int = 0, side: str = "Buy", **fields: str) -> dict[str, Any]:
    row = {
        "symbol": "SFPUSDT",
        "side": side,
        "size": "100",
        "avgPrice": "0.5001",
        "markPrice": "0.5000",
        "unrealisedPnl": "-0.01",
        "leverage": "10",
        "positionIdx": idx,
        "stopLoss": "",
        "trailingStop": "0",
        "updatedTime": "1700000000000",
    }
    row.update(fields)
    return row


@asynccontextmanager
async def bybit(stub: BybitStub) -> AsyncIterator[BybitLinearVenue]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stub.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(address[1] for address in runner.addresses if isinstance(address, tuple))
    venue = BybitLinearVenue(
        CcxtVenueConfig(kind="bybit", api_key=KEY, api_secret=SECRET, base_url=f"http://127.0.0.1:{port}")
    )
    try:
        await venue.load_markets()
        yield venue
    finally:
        await venue.close()
        await runner.cleanup()


async def test_markets_come_from_instruments_info_filters_keyed_by_native_symbol() -> None:
    async with bybit(BybitStub()) as venue:
        market = (await venue.load_markets())["SFPUSDT"]
        marks = await venue.fetch_mark_prices()

    assert (market.tick_size, market.step_size, market.min_notional, market.max_leverage) == (
        Decimal("0.0001"),
        Decimal("1"),
        Decimal("5"),
        50,
    )
    assert marks["SFPUSDT"].price == Decimal("0.5000")


async def test_hard_stop_is_a_position_stop_loss_on_the_mark_price() -> None:
    stub = BybitStub(position=_position())
    async with bybit(stub) as venue:
        await venue.fetch_positions()
        placed = await venue.create_stop_market_order(
            "SFPUSDT", OrderSide.SELL, Decimal("100"), Decimal("0.4850"), client_order_id="tsbabc123-1-sl0"
        )
        stub.position = _position(stopLoss="0.4850")
        working = await venue.fetch_order("SFPUSDT", "tsbabc123-1-sl0")
        listed = await venue.fetch_open_protective_orders()
        stub.position = None  # the stop fired: the position is gone, the execution list has its fill
        stub.executions = [
            {
                "symbol": "SFPUSDT",
                "orderId": "sl-order-1",
                "orderLinkId": "",
                "stopOrderType": "StopLoss",
                "execType": "Trade",
                "execPrice": "0.4849",
                "execQty": "100",
                "execTime": str(int(time.time() * 1000)),
            }
        ]
        fired = await venue.fetch_order("SFPUSDT", "tsbabc123-1-sl0")

    assert stub.sent("/v5/position/trading-stop") == [
        {
            "category": "linear",
            "symbol": "SFPUSDT",
            "tpslMode": "Full",
            "stopLoss": "0.4850",
            "slTriggerBy": "MarkPrice",
            "positionIdx": 0,
        }
    ]
    assert (placed.type, placed.status, placed.stop_price) == (
        OrderType.STOP_MARKET,
        OrderStatus.NEW,
        Decimal("0.4850"),
    )
    assert working.status is OrderStatus.NEW
    assert [o.client_order_id for o in listed] == ["tsbabc123-1-sl0"]
    assert (fired.status, fired.filled_quantity, fired.average_price) == (
        OrderStatus.FILLED,
        Decimal("100"),
        Decimal("0.4849"),
    )


async def test_a_first_entry_learns_hedge_mode_from_the_symbols_empty_rows() -> None:
    """In hedge mode Bybit lists a flat symbol as two empty rows (positionIdx 1 and 2); one-way would be
    refused ("position idx not match position mode")."""
    stub = BybitStub(position=_position(idx=1, size="0", side=""))
    async with bybit(stub) as venue:
        await venue.create_market_order(
            "SFPUSDT", OrderSide.BUY, Decimal("100"), client_order_id="tsbabc123-9-en0"
        )

    [sent] = stub.sent("/v5/order/create")
    assert sent["positionIdx"] == 1  # hedge mode, the long side


async def test_trailing_stop_is_a_price_distance_with_active_price_and_hedge_mode_position_idx() -> None:
    stub = BybitStub(position=_position(idx=1))
    async with bybit(stub) as venue:
        await venue.fetch_positions()  # learns hedge mode from positionIdx
        placed = await venue.create_trailing_stop_order(
            "SFPUSDT",
            OrderSide.SELL,
            Decimal("100"),
            Decimal("2"),
            client_order_id="tsbabc123-1-ts0",
            activation_price=Decimal("0.5500"),
        )
        with pytest.raises(DuplicateClientOrderId):
            await venue.create_trailing_stop_order(
                "SFPUSDT", OrderSide.SELL, Decimal("100"), Decimal("2"), client_order_id="tsbabc123-1-ts0"
            )

    [sent] = stub.sent("/v5/position/trading-stop")
    assert sent == {
        "category": "linear",
        "symbol": "SFPUSDT",
        "tpslMode": "Full",
        "trailingStop": "0.0110",  # 2 % of the activation price, on the tick grid
        "activePrice": "0.5500",
        "positionIdx": 1,  # hedge mode, the long side
    }
    assert (placed.type, placed.callback_rate, placed.activation_price) == (
        OrderType.TRAILING_STOP_MARKET,
        Decimal("2"),
        Decimal("0.5500"),
    )


async def test_cancelling_a_position_stop_clears_it_with_zero() -> None:
    stub = BybitStub(position=_position())
    async with bybit(stub) as venue:
        await venue.create_stop_market_order(
            "SFPUSDT", OrderSide.SELL, Decimal("100"), Decimal("0.4850"), client_order_id="sl-x"
        )
        stub.position = _position(stopLoss="0.4850")
        cancelled = await venue.cancel_order("SFPUSDT", "sl-x")

    assert stub.sent("/v5/position/trading-stop")[-1]["stopLoss"] == "0"
    assert cancelled.status is OrderStatus.CANCELED


async def test_market_order_carries_the_client_id_and_is_read_back_filled() -> None:
    stub = BybitStub()
    async with bybit(stub) as venue:
        order = await venue.create_market_order(
            "SFPUSDT", OrderSide.BUY, Decimal("100"), client_order_id="entry-1"
        )

    [sent] = stub.sent("/v5/order/create")
    assert sent == {
        "category": "linear",
        "symbol": "SFPUSDT",
        "side": "Buy",
        "orderType": "Market",
        "qty": "100",
        "orderLinkId": "entry-1",
        "positionIdx": 0,
    }
    assert (order.status, order.filled_quantity, order.average_price) == (
        OrderStatus.FILLED,
        Decimal("100"),
        Decimal("0.5001"),
    )


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        # trading-stop answers a stop already crossed with 10001 naming the base price (110092/110093 are
        # order/create's codes for conditional orders)
        pytest.param(
            10001,
            "StopLoss:0.4850 set for Buy position should lower than base_price:0.4800??MarkPrice",
            WouldTriggerImmediately,
            id="10001-base-price-would-trigger",
        ),
        pytest.param(10001, "params error: symbol invalid", Rejected, id="10001-other-parameter-error"),
        pytest.param(10006, "Too many visits!", RateLimited, id="10006-rate-limit"),
        # 10016 is Bybit's server error: nothing says whether the stop was set
        pytest.param(10016, "Internal server error.", OutcomeUnknown, id="10016-server-error"),
    ],
)
async def test_bybit_ret_codes_are_translated(code: int, message: str, expected: type[Exception]) -> None:
    stub = BybitStub(position=_position(), errors={"/v5/position/trading-stop": (code, message)})
    async with bybit(stub) as venue:
        with pytest.raises(expected) as raised:
            await venue.create_stop_market_order(
                "SFPUSDT", OrderSide.SELL, Decimal("100"), Decimal("0.4850"), client_order_id="sl-e"
            )
    assert SECRET not in str(raised.value)
    assert raised.value.__cause__ is not None


async def test_the_venues_own_per_endpoint_counts_reach_the_pacer() -> None:
    """Bybit counts each endpoint per UID and says so in `X-Bapi-Limit` / `X-Bapi-Limit-Status`: the pacer
    adopts the account's real limit and books what the venue says is used."""
    stub = BybitStub(position=_position(), limits={"/v5/position/trading-stop": (10, 3)})
    async with bybit(stub) as venue:
        clock = SystemClock()
        pacer = RequestPacer(venue.capabilities().request_budgets, clock)
        venue.attach_pacing(VenuePacing(pacer, None, clock))
        await venue.create_stop_market_order(
            "SFPUSDT", OrderSide.SELL, Decimal(100), Decimal("0.4500"), client_order_id="sl-1"
        )
        # 7 of the endpoint's 10 per second are used (by us and anyone else on this account).
        assert pacer.used_fraction() == pytest.approx(0.7)
        assert RequestBudget("/v5/position/trading-stop", 10, 1.0, spread=True) in pacer.budgets()


async def test_a_403_bans_every_request_but_protective_ones_which_wait_for_its_end() -> None:
    stub = BybitStub(position=_position(), status={"/v5/position/list": 403})
    async with bybit(stub) as venue:
        clock = SystemClock()
        pacer = RequestPacer(venue.capabilities().request_budgets, clock)
        venue.attach_pacing(VenuePacing(pacer, None, clock))
        with pytest.raises(Banned):
            await venue.fetch_positions()
        banned_for = pacer.banned_for()
        assert banned_for is not None
        assert banned_for > 590.0
        with pytest.raises(Banned):  # a read is refused at once, without reaching the venue
            await venue.fetch_balance()
        assert not any(path == "/v5/account/wallet-balance" for _, path, _ in stub.requests)


async def _restored_trailing_stop(stub: BybitStub, *, activation: Decimal | None) -> Order:
    """A new process's look-up of our trailing stop `tsbabc123-1-ts0` (a long's: SELL closes it), recorded
    by the last one at a 2 % callback and `activation` (None: armed at the mark)."""
    async with bybit(stub) as venue:
        venue.expect_recorded(
            "tsbabc123-1-ts0", side=OrderSide.SELL, callback_rate=Decimal("2"), activation_price=activation
        )
        return await venue.fetch_order("SFPUSDT", "tsbabc123-1-ts0")


async def test_in_hedge_mode_a_restart_never_takes_the_other_sides_stop_for_ours() -> None:
    """Hedge mode, after a restart: our long's trailing stop is gone, the short beside it holds one. The
    look-up of our recorded stop took the one row holding the field, whichever side it closed: the
    short's trailing stop stood for our long's. Told which side the recorded stop closes, the adapter
    looks at that position only: nothing there, so no position stop is named (the look-up goes on to the
    venue's order lists, which this stub answers with a filled market order for any id)."""
    stub = BybitStub(
        position=_position(idx=1, side="Buy", trailingStop="0"),
        other_side=_position(idx=2, side="Sell", trailingStop="0.0100"),
    )
    async with bybit(stub) as venue:
        assert isinstance(venue, ChecksRecordedStops)
        venue.expect_recorded(
            "tsbabc123-1-ts0",
            side=OrderSide.SELL,
            callback_rate=Decimal("2"),
            activation_price=Decimal("0.5500"),
        )
        found = await venue.fetch_order("SFPUSDT", "tsbabc123-1-ts0")
    assert found.type is not OrderType.TRAILING_STOP_MARKET, found
    assert not stub.sent("/v5/position/trading-stop")


async def test_a_trailing_stop_set_under_another_tick_size_is_still_ours_after_a_restart() -> None:
    """Bybit changes a symbol's tick size (the stops it holds keep their values). Our trailing stop was set
    when the tick was 0.001: 2 % of the activation 0.5623 went out as 0.011. After the change to 0.0001,
    the next process worked the distance out again on today's grid, 0.0112, and took its own stop for one
    someone else had moved: a false alarm, and the trail set again (its high-water mark lost)."""
    stub = BybitStub(position=_position(side="Buy", trailingStop="0.011"))
    found = await _restored_trailing_stop(stub, activation=Decimal("0.5623"))
    assert (found.type, found.status) == (OrderType.TRAILING_STOP_MARKET, OrderStatus.NEW)
    assert not stub.sent("/v5/position/trading-stop")


async def test_a_hard_stop_shown_on_a_coarser_grid_is_still_ours_after_a_restart() -> None:
    """The tick became coarser: Bybit shows the price of a stop set before on the new grid. Ours at 0.45675
    reads 0.4567; within one tick of what we set, it is ours (it was taken for moved when it differed by
    half a tick)."""
    stub = BybitStub(position=_position(side="Buy", stopLoss="0.4567"))
    async with bybit(stub) as venue:
        venue.expect_recorded("tsbabc123-1-sl0", side=OrderSide.SELL, stop_price=Decimal("0.45675"))
        found = await venue.fetch_order("SFPUSDT", "tsbabc123-1-sl0")
    assert (found.type, found.status, found.stop_price) == (
        OrderType.STOP_MARKET,
        OrderStatus.NEW,
        Decimal("0.4567"),
    )


@pytest.mark.parametrize(
    ("distance", "mark", "ours"),
    [
        ("0.0102", "0.5000", True),
        ("0.1000", "0.5000", False),
        ("0.0130", "0.6500", True),  # armed on a re-send long after the fill, the price 30 % up
        ("0.1300", "0.6500", False),
    ],
)
async def test_a_trailing_stop_armed_at_the_mark_is_restored_only_near_our_distance(
    distance: str, mark: str, ours: bool
) -> None:
    """Our trailing stop armed at the mark (its activation had passed): recorded with no activation, its
    distance the callback of the mark then, which nobody recorded. It was restored at any distance: one
    someone widened tenfold while no engine ran was taken for ours. That mark lies between the entry
    (0.5001) and where today's mark says the best price since can be (the trail has not fired): 2 % of a
    price in there is ours, wherever the trail armed; ten times that is someone else's."""
    stub = BybitStub(position=_position(side="Buy", trailingStop=distance, markPrice=mark))
    found = await _restored_trailing_stop(stub, activation=None)
    assert found.type is OrderType.TRAILING_STOP_MARKET
    assert found.status is (OrderStatus.NEW if ours else OrderStatus.CANCELED)


async def test_in_hedge_mode_the_other_sides_stop_fill_is_not_taken_for_ours() -> None:
    """Hedge mode: our long's hard stop is set, then gone from its field (the long still open), while the
    short beside it was closed by its own hard stop. The execution list's stop fill was matched by kind
    only, so the short's stop fill (a Buy) was booked as our long's stop filled: the position recorded
    closed by its stop at the short's price while it was open. Only a fill on our stop's side is ours."""
    stub = BybitStub(
        position=_position(idx=1, side="Buy"),
        other_side=_position(idx=2, side="Sell"),
    )
    async with bybit(stub) as venue:
        await venue.fetch_positions()
        await venue.create_stop_market_order(
            "SFPUSDT", OrderSide.SELL, Decimal("100"), Decimal("0.4850"), client_order_id="tsbabc123-1-sl0"
        )
        stub.position = _position(idx=1, side="Buy", stopLoss="0.4850")
        working = await venue.fetch_order("SFPUSDT", "tsbabc123-1-sl0")
        stub.position = _position(idx=1, side="Buy", stopLoss="")
        stub.other_side = None
        stub.executions = [
            {
                "symbol": "SFPUSDT",
                "side": "Buy",
                "orderId": "short-sl-1",
                "orderLinkId": "",
                "stopOrderType": "StopLoss",
                "execType": "Trade",
                "execPrice": "0.5150",
                "execQty": "100",
                "execTime": str(int(time.time() * 1000)),
            }
        ]
        ended = await venue.fetch_order("SFPUSDT", "tsbabc123-1-sl0")
    assert working.status is OrderStatus.NEW
    assert (ended.status, ended.average_price) == (OrderStatus.CANCELED, None)


@pytest.mark.parametrize(
    ("trigger", "mark", "ours"),
    [
        ("0.5500", "0.5600", True),  # the activation we set
        ("0.5490", "0.5600", True),  # behind the mark: armed (a level, were the venue to show one there)
        ("0.9000", "0.5600", False),  # ahead of the mark, not ours: moved out of reach
        ("0.9000", "", False),  # no mark shown: nothing says it armed, so another activation is not ours
    ],
)
async def test_a_recorded_trailing_stops_activation_is_checked_on_its_order_row(
    trigger: str, mark: str, ours: bool
) -> None:
    """The position's row has the trailing distance only. Our trailing stop's order row shows its
    activation (`triggerPrice`, Bybit's docs): one someone moved out of reach while no engine ran is not
    ours. A price the mark has passed is a trail that has armed, not an alarm."""
    stub = BybitStub(position=_position(side="Buy", trailingStop="0.0110", markPrice=mark))
    stub.stop_rows = [
        {
            "orderId": "ts-order-1",
            "orderLinkId": "",
            "symbol": "SFPUSDT",
            "side": "Sell",
            "orderType": "Market",
            "orderStatus": "Untriggered",
            "stopOrderType": "TrailingStop",
            "triggerPrice": trigger,
            "qty": "100",
            "createdTime": "1700000000000",
            "updatedTime": "1700000000000",
        }
    ]
    found = await _restored_trailing_stop(stub, activation=Decimal("0.5500"))
    assert found.type is OrderType.TRAILING_STOP_MARKET
    assert found.status is (OrderStatus.NEW if ours else OrderStatus.CANCELED)

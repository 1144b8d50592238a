"""The Bybit v5 wire emulator on its own: signed requests over loopback, Bybit's envelope and retCodes, the
position stops (trading-stop) and what the venue does with them, the limits. Requests are signed here as
Bybit documents (HMAC-SHA256 over timestamp + key + recvWindow + query string or JSON body)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import ROUND_UP, Decimal
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest

from engine.exchange.port import OrderSide
from engine.venues.bybit_emulator import BybitEmulator, BybitLimiter, running
from engine.venues.sim import SimVenueSettings

KEY, SECRET = "bybit-emulator-key", "bybit-emulator-secret"
SYMBOL = "SFPUSDT"  # starts at 0.4500, tick 0.0001


@dataclass
class Client:
    session: aiohttp.ClientSession
    url: str
    emulator: BybitEmulator
    recv_window: str = "5000"
    secret: str = SECRET
    clock_offset_ms: int = 0

    def _headers(self, payload: str) -> dict[str, str]:
        stamp = str(int(time.time() * 1000) + self.clock_offset_ms)
        sign = hmac.new(
            self.secret.encode(), (stamp + KEY + self.recv_window + payload).encode(), hashlib.sha256
        ).hexdigest()
        return {
            "X-BAPI-API-KEY": KEY,
            "X-BAPI-TIMESTAMP": stamp,
            "X-BAPI-RECV-WINDOW": self.recv_window,
            "X-BAPI-SIGN": sign,
            "Content-Type": "application/json",
        }

    async def get(self, path: str, **params: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
        query = urlencode(params)
        async with self.session.get(f"{self.url}{path}?{query}", headers=self._headers(query)) as response:
            return response.status, await _body(response), dict(response.headers)

    async def post(self, path: str, **params: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
        body = json.dumps(params)
        async with self.session.post(f"{self.url}{path}", data=body, headers=self._headers(body)) as response:
            return response.status, await _body(response), dict(response.headers)

    async def control(self, path: str, **body: Any) -> dict[str, Any]:
        async with self.session.post(f"{self.url}/_sim/{path}", json=body) as response:
            assert response.status == 200, await response.text()
            return await response.json()

    async def state(self) -> dict[str, Any]:
        async with self.session.get(f"{self.url}/_sim/state") as response:
            return await response.json()


async def _body(response: aiohttp.ClientResponse) -> dict[str, Any]:
    text = await response.text()
    try:
        return json.loads(text)
    except ValueError:
        return {"text": text}


@asynccontextmanager
async def emulator(limiter: BybitLimiter | None = None) -> AsyncIterator[Client]:
    settings = SimVenueSettings(seed=7, volatility=0.0, symbols=[SYMBOL, "BTCUSDT", "ETHUSDT"])
    built = BybitEmulator(settings, api_key=KEY, api_secret=SECRET, control=True, limiter=limiter)
    async with running(built) as url, aiohttp.ClientSession() as session:
        yield Client(session, url, built)


async def market_order(
    client: Client, side: str, qty: str, symbol: str = SYMBOL, **extra: Any
) -> dict[str, Any]:
    """`order/create` of a Market order; its answer's body."""
    _, body, _ = await client.post(
        "/v5/order/create", category="linear", symbol=symbol, side=side, orderType="Market", qty=qty, **extra
    )
    return body


async def open_long(client: Client, qty: str = "100") -> None:
    status, body, _ = await client.post(
        "/v5/order/create", category="linear", symbol=SYMBOL, side="Buy", orderType="Market", qty=qty
    )
    assert (status, body["retCode"]) == (200, 0), body


async def trading_stop(client: Client, **fields: Any) -> dict[str, Any]:
    status, body, _ = await client.post(
        "/v5/position/trading-stop",
        category="linear",
        symbol=SYMBOL,
        tpslMode="Full",
        positionIdx=0,
        **fields,
    )
    assert status == 200
    return body


async def stop_orders(client: Client) -> list[dict[str, Any]]:
    _, body, _ = await client.get(
        "/v5/order/realtime", category="linear", symbol=SYMBOL, orderFilter="StopOrder"
    )
    return body["result"]["list"]


async def test_signing_errors_are_bybit_codes() -> None:
    async with emulator() as client:
        _, good, _ = await client.get("/v5/account/wallet-balance", accountType="UNIFIED")
        client.secret = "wrong"
        _, bad_sign, _ = await client.get("/v5/account/wallet-balance", accountType="UNIFIED")
        client.secret = SECRET
        await client.control("skew", seconds=30)  # the server's clock runs 30 s ahead of ours
        _, stale, _ = await client.get("/v5/account/wallet-balance", accountType="UNIFIED")

    assert good["retCode"] == 0
    assert good["result"]["list"][0]["coin"][0]["walletBalance"] == "10000"
    assert bad_sign["retCode"] == 10004
    assert stale["retCode"] == 10002
    assert "recv_window" in stale["retMsg"]


async def test_business_errors_are_http_200_with_a_ret_code() -> None:
    async with emulator() as client:
        status, no_position, _ = await client.post(
            "/v5/order/create",
            category="linear",
            symbol=SYMBOL,
            side="Sell",
            orderType="Market",
            qty="10",
            reduceOnly=True,
        )
        await open_long(client)
        _, duplicate_first, _ = await client.post(
            "/v5/order/create",
            category="linear",
            symbol=SYMBOL,
            side="Buy",
            orderType="Market",
            qty="20",
            orderLinkId="same",
        )
        _, duplicate, _ = await client.post(
            "/v5/order/create",
            category="linear",
            symbol=SYMBOL,
            side="Buy",
            orderType="Market",
            qty="20",
            orderLinkId="same",
        )
        _, lev_first, _ = await client.post(
            "/v5/position/set-leverage", category="linear", symbol=SYMBOL, buyLeverage="5", sellLeverage="5"
        )
        _, lev_again, _ = await client.post(
            "/v5/position/set-leverage", category="linear", symbol=SYMBOL, buyLeverage="5", sellLeverage="5"
        )

    assert (status, no_position["retCode"]) == (200, 110017)
    assert duplicate_first["retCode"] == 0
    assert duplicate["retCode"] == 110072
    assert (lev_first["retCode"], lev_again["retCode"]) == (0, 110043)


async def test_position_stops_are_validated_against_mark_and_last_naming_the_base_price() -> None:
    async with emulator() as client:
        no_position = await trading_stop(client, stopLoss="0.4000", slTriggerBy="MarkPrice")
        await open_long(client)
        above_mark = await trading_stop(client, stopLoss="0.4600", slTriggerBy="MarkPrice")
        await client.control("last", symbol=SYMBOL, price="0.4300")  # a wick on the last price only
        above_last = await trading_stop(client, stopLoss="0.4400", slTriggerBy="MarkPrice")
        placed = await trading_stop(client, stopLoss="0.4000", slTriggerBy="MarkPrice")
        again = await trading_stop(client, stopLoss="0.4000", slTriggerBy="MarkPrice")

    assert no_position["retCode"] == 10001
    assert "zero position" in no_position["retMsg"]
    assert above_mark["retCode"] == 10001
    assert "base_price:0.4500??MarkPrice" in above_mark["retMsg"]
    assert above_last["retCode"] == 10001
    assert "base_price:0.4300??LastPrice" in above_last["retMsg"]
    assert placed["retCode"] == 0
    assert again["retCode"] == 34040


async def test_system_created_stop_orders_are_listed_and_zero_cancels() -> None:
    async with emulator() as client:
        await open_long(client)
        await trading_stop(client, stopLoss="0.4000", slTriggerBy="MarkPrice")
        await trading_stop(client, trailingStop="0.0100")
        listed = await stop_orders(client)
        _, regular, _ = await client.get("/v5/order/realtime", category="linear", symbol=SYMBOL)
        _, position, _ = await client.get("/v5/position/list", category="linear", symbol=SYMBOL)
        cancelled = await trading_stop(client, stopLoss="0")
        after = await stop_orders(client)
        _, history, _ = await client.get(
            "/v5/order/history", category="linear", symbol=SYMBOL, orderFilter="StopOrder"
        )

    kinds = {row["stopOrderType"]: row for row in listed}
    assert set(kinds) == {"StopLoss", "TrailingStop"}
    assert kinds["StopLoss"]["triggerPrice"] == "0.4000"
    assert kinds["StopLoss"]["triggerBy"] == "MarkPrice"
    assert kinds["TrailingStop"]["triggerPrice"] == "0.4400"
    assert kinds["TrailingStop"]["triggerBy"] == "LastPrice"
    assert all(row["orderStatus"] == "Untriggered" and row["orderLinkId"] == "" for row in listed)
    assert regular["result"]["list"] == []  # the default filter (Order) leaves them out
    row = position["result"]["list"][0]
    assert (row["stopLoss"], row["trailingStop"], row["size"]) == ("0.4000", "0.0100", "100")
    assert "activePrice" not in row
    assert cancelled["retCode"] == 0
    assert [r["stopOrderType"] for r in after] == ["TrailingStop"]
    assert [(r["stopOrderType"], r["orderStatus"]) for r in history["result"]["list"]] == [
        ("StopLoss", "Deactivated")
    ]


async def test_trailing_stop_follows_the_last_price_at_a_fixed_distance_and_fills_with_a_price() -> None:
    async with emulator() as client:
        await open_long(client)
        await trading_stop(client, stopLoss="0.4000", slTriggerBy="MarkPrice", trailingStop="0.0100")
        await client.control("last", symbol=SYMBOL, price="0.4800")  # last rises, mark stays
        risen = await stop_orders(client)
        await client.control("mark", symbol=SYMBOL, price="0.4710", last="0.4750")  # 0.0050 off the high
        still = await stop_orders(client)
        fired = await client.control("last", symbol=SYMBOL, price="0.4700")  # 0.0100 below the high: fires
        state = await client.state()
        _, executions, _ = await client.get("/v5/execution/list", category="linear", symbol=SYMBOL)
        _, history, _ = await client.get(
            "/v5/order/history", category="linear", symbol=SYMBOL, orderFilter="StopOrder"
        )
        after = await stop_orders(client)

    trailing = next(r for r in risen if r["stopOrderType"] == "TrailingStop")
    assert trailing["triggerPrice"] == "0.4700"  # 0.4800 - 0.0100, the mark never moved
    assert len(still) == 2
    assert fired["triggered"] == [trailing["orderId"]]
    assert state["positions"] == []
    assert state["position_stops"] == []
    stop_fill = executions["result"]["list"][0]
    assert (stop_fill["orderId"], stop_fill["stopOrderType"], stop_fill["execQty"]) == (
        trailing["orderId"],
        "TrailingStop",
        "100",
    )
    assert Decimal(stop_fill["execPrice"]) > 0
    statuses = {r["stopOrderType"]: r["orderStatus"] for r in history["result"]["list"]}
    assert statuses == {"TrailingStop": "Filled", "StopLoss": "Deactivated"}  # the venue cancels the rest
    assert after == []


async def test_closing_the_position_by_hand_deactivates_its_stops() -> None:
    async with emulator() as client:
        await open_long(client)
        await trading_stop(client, stopLoss="0.4000", slTriggerBy="MarkPrice")
        await market_order(client, "Sell", "100", reduceOnly=True)
        after = await stop_orders(client)
        _, position, _ = await client.get("/v5/position/list", category="linear", symbol=SYMBOL)

    assert after == []
    assert (position["result"]["list"][0]["size"], position["result"]["list"][0]["stopLoss"]) == ("0", "0")


async def test_a_position_flipped_through_zero_loses_the_closed_sides_stops() -> None:
    """Bybit cancels a position's stops when the position closes; an order that closes a long and opens a
    short (a flip, in one-way mode) closes it too. The emulator kept the long's stopLoss on the short,
    where it fired at the next tick: the engine's handling of a hand-flipped position was never met."""
    async with emulator() as client:
        await open_long(client)
        await trading_stop(client, stopLoss="0.4000", slTriggerBy="MarkPrice")
        await market_order(client, "Sell", "200")
        after = await stop_orders(client)
        _, position, _ = await client.get("/v5/position/list", category="linear", symbol=SYMBOL)

    row = position["result"]["list"][0]
    assert (row["side"], row["size"], row["stopLoss"]) == ("Sell", "100", "0")
    assert after == []


async def test_active_price_must_lie_beyond_the_last_price() -> None:
    async with emulator() as client:
        await open_long(client)
        reached = await trading_stop(client, trailingStop="0.0100", activePrice="0.4400")
        ahead = await trading_stop(client, trailingStop="0.0100", activePrice="0.4600")
        await client.control("last", symbol=SYMBOL, price="0.4550")
        waiting = (await client.state())["position_stops"][0]
        await client.control("last", symbol=SYMBOL, price="0.4600")
        armed = (await client.state())["position_stops"][0]
        [row] = [r for r in await stop_orders(client) if r["stopOrderType"] == "TrailingStop"]

    assert reached["retCode"] == 10001
    assert "base_price:0.4500??LastPrice" in reached["retMsg"]
    assert ahead["retCode"] == 0
    assert waiting["armed"] is False
    assert (armed["armed"], armed["extreme"], armed["trailingTrigger"]) == (True, "0.4600", "0.4500")
    # The order row's triggerPrice is a trailing stop's activation (Bybit's docs: "If
    # stopOrderType=TrailingStop, it is activate price"), armed or not; the position's row has none.
    assert row["triggerPrice"] == "0.4600"


@asynccontextmanager
async def longs_on_every_listing(listings: int) -> AsyncIterator[tuple[BybitEmulator, Client]]:
    """An emulator of `listings` synthetic symbols with a long held on each (no endpoint limits)."""
    settings = SimVenueSettings(seed=7, volatility=0.0, synthetic_listings=listings)
    built = BybitEmulator(
        settings, api_key=KEY, api_secret=SECRET, control=True, limiter=BybitLimiter(endpoint_limits={})
    )
    async with running(built) as url, aiohttp.ClientSession() as session:
        client = Client(session, url, built)
        for symbol, market in sorted(built.core.markets.items()):
            qty = max(
                market.min_quantity,
                market.round_quantity(market.min_notional * 2 / built.core.mark(symbol), ROUND_UP),
            )
            _, body, _ = await client.post(
                "/v5/order/create",
                category="linear",
                symbol=symbol,
                side="Buy",
                orderType="Market",
                qty=str(qty),
            )
            assert body["retCode"] == 0, body
        yield built, client


async def test_position_list_pages_with_limit_and_cursor() -> None:
    async with longs_on_every_listing(25) as (built, client):
        symbols = sorted(built.core.markets)
        _, first, _ = await client.get("/v5/position/list", category="linear", settleCoin="USDT")
        seen, cursor = [], ""
        while True:
            params: dict[str, Any] = {"category": "linear", "settleCoin": "USDT", "limit": 10}
            if cursor:
                params["cursor"] = cursor
            _, page, _ = await client.get("/v5/position/list", **params)
            seen += [row["symbol"] for row in page["result"]["list"]]
            cursor = page["result"]["nextPageCursor"]
            if not cursor:
                break

    assert len(symbols) > 20
    assert len(first["result"]["list"]) == 20
    assert first["result"]["nextPageCursor"]
    assert seen == symbols


async def test_a_position_closed_between_two_pages_shifts_no_other_off_the_walk() -> None:
    """The emulator's cursor was an offset into the list: a position that ended between two page reads
    moved the next one onto the page already read, and the walk ended without it, read as complete (a
    reviewer). Bybit's cursors say where the last page ended, not how many rows came before."""
    async with longs_on_every_listing(12) as (built, client):
        symbols = sorted(built.core.markets)
        params: dict[str, Any] = {"category": "linear", "settleCoin": "USDT", "limit": 5}
        _, page, _ = await client.get("/v5/position/list", **params)
        seen = [row["symbol"] for row in page["result"]["list"]]
        gone = seen[0]  # closed on the venue before the next page is read
        built.core.place_market_order(
            gone,
            OrderSide.SELL,
            Decimal(page["result"]["list"][0]["size"]),
            "close-it",
            0.0,
            reduce_only=True,
        )
        cursor = page["result"]["nextPageCursor"]
        while cursor:
            _, page, _ = await client.get("/v5/position/list", **params, cursor=cursor)
            seen += [row["symbol"] for row in page["result"]["list"]]
            cursor = page["result"]["nextPageCursor"]

    assert seen == symbols  # every position read once: the closed one on the page read before it closed


async def test_an_instrument_not_trading_is_listed_only_by_its_status_and_opens_nothing() -> None:
    async with emulator() as client:
        await open_long(client)
        await client.control("symbol-status", symbol=SYMBOL, status="Delivering")

        _, default, _ = await client.get("/v5/market/instruments-info", category="linear")
        _, delivering, _ = await client.get(
            "/v5/market/instruments-info", category="linear", status="Delivering"
        )
        _, bad, _ = await client.get("/v5/market/instruments-info", category="linear", status="Open")
        opening = await market_order(client, "Buy", "10")
        _, stop, _ = await client.post(
            "/v5/position/trading-stop", category="linear", symbol=SYMBOL, positionIdx=0, stopLoss="0.4000"
        )
        closing = await market_order(client, "Sell", "100", reduceOnly=True)
        await client.control("symbol-status", symbol="BTCUSDT", status="Settling")
        settling = await market_order(client, "Buy", "0.01", symbol="BTCUSDT")

    # Bybit's default list holds Trading instruments only; a status filter lists the others.
    assert SYMBOL not in [row["symbol"] for row in default["result"]["list"]]
    assert [(row["symbol"], row["status"]) for row in delivering["result"]["list"]] == [
        (SYMBOL, "Delivering")
    ]
    assert bad["retCode"] == 10001
    # Nothing opens there; stops and reduce-only orders go on.
    assert (opening["retCode"], opening["retMsg"]) == (110066, "No trading is allowed at the current time")
    assert stop["retCode"] == 0, stop
    assert closing["retCode"] == 0, closing
    assert settling["retCode"] == 110063
    assert "BTCUSDT not available for trades" in settling["retMsg"]


async def test_endpoint_limit_answers_10006_with_the_limit_headers() -> None:
    async with emulator(BybitLimiter(endpoint_limits={"/v5/position/list": 2})) as client:
        answers = [
            await client.get("/v5/position/list", category="linear", settleCoin="USDT") for _ in range(3)
        ]

    assert [body["retCode"] for _, body, _ in answers] == [0, 0, 10006]
    assert all(status == 200 for status, _, _ in answers)
    assert [headers["X-Bapi-Limit-Status"] for _, _, headers in answers] == ["1", "0", "0"]
    assert all(
        headers["X-Bapi-Limit"] == "2" and "X-Bapi-Limit-Reset-Timestamp" in headers
        for *_, headers in answers
    )


async def test_the_reset_timestamp_is_the_answers_own_time_until_the_limit_is_exceeded() -> None:
    # Bybit: "the timestamp indicating when your request limit resets if you have exceeded your rate_limit.
    # Otherwise, this is just the current timestamp". The emulator gave the window's end on every answer,
    # so a client reading it as "wait until" waited for nothing.
    async with emulator(BybitLimiter(endpoint_limits={"/v5/position/list": 2})) as client:
        answers = []
        for _ in range(3):
            before = int(client.emulator.now() * 1000)
            _, body, headers = await client.get("/v5/position/list", category="linear", settleCoin="USDT")
            answers.append((before, int(client.emulator.now() * 1000), body["retCode"], headers))

    for before, after, code, headers in answers[:2]:
        assert code == 0
        assert before <= int(headers["X-Bapi-Limit-Reset-Timestamp"]) <= after
    first_sent = answers[0][0]
    before, after, code, headers = answers[2]
    assert code == 10006
    reset = int(headers["X-Bapi-Limit-Reset-Timestamp"])
    assert reset > after  # in the future: when the first of the two leaves the rolling second
    assert reset <= answers[0][1] + 1000 + 1  # (rounded up to the millisecond: never before the window's end)
    assert reset >= first_sent + 1000


async def test_too_many_requests_from_an_ip_is_a_403_ban_for_everything() -> None:
    async with emulator(BybitLimiter(ip_requests_per_5_seconds=3, ban_seconds=600.0)) as client:
        answers = [await client.get("/v5/market/time") for _ in range(5)]
        state = await client.state()

    assert [status for status, _, _ in answers] == [200, 200, 200, 403, 403]
    assert "access too frequent" in answers[3][1]["text"]
    assert state["rate"]["banned_until_ms"] is not None


@pytest.mark.parametrize(("fault", "code"), [("busy", 10016), ("ratelimit", 10006)])
async def test_forced_faults_answer_in_bybit_words(fault: str, code: int) -> None:
    async with emulator() as client:
        await client.control("fault", call="fetch_positions", fault=fault)
        answered = await client.get("/v5/position/list", category="linear", settleCoin="USDT")
        after = await client.get("/v5/position/list", category="linear", settleCoin="USDT")

    assert (answered[0], answered[1]["retCode"]) == (200, code)
    assert after[1]["retCode"] == 0


async def test_a_ratelimit_fault_answers_with_the_endpoints_limit_headers() -> None:
    # Bybit's 10006 carries the endpoint's X-Bapi-Limit headers, which say when the endpoint may be asked
    # again. The fault answered without them, so a client could not tell which endpoint was full, nor when.
    async with emulator() as client:
        await client.control("fault", call="fetch_positions", fault="ratelimit")
        before = int(client.emulator.now() * 1000)
        status, body, headers = await client.get("/v5/position/list", category="linear", settleCoin="USDT")
        after = int(client.emulator.now() * 1000)

    assert (status, body["retCode"]) == (200, 10006)
    assert headers["X-Bapi-Limit"] == "50"
    assert headers["X-Bapi-Limit-Status"] == "0"
    assert before < int(headers["X-Bapi-Limit-Reset-Timestamp"]) <= after + 1000


async def test_a_ban_fault_puts_bybits_ip_ban_in_force() -> None:
    # Bybit's 403 "access too frequent" is the start of a ban of the IP (10 minutes): the fault answered
    # it and served the next request, so a client that ignored the 403 lost nothing on the emulator.
    async with emulator(BybitLimiter(ban_seconds=600.0)) as client:
        await client.control("fault", call="fetch_positions", fault="ban")
        before = client.emulator.now()
        answered = await client.get("/v5/position/list", category="linear", settleCoin="USDT")
        after = [await client.get(path) for path in ("/v5/position/list", "/v5/market/time")]
        state = await client.state()

    assert answered[0] == 403
    assert [status for status, _, _ in after] == [403, 403]
    assert all("access too frequent" in body["text"] for _, body, _ in after)
    assert state["rate"]["banned_until_ms"] >= int((before + 600.0) * 1000)


async def test_an_emulator_started_again_never_gives_an_order_id_twice() -> None:
    """Bybit's orderIds are UUIDs, never reused. An emulator stopped and started again (its book lost)
    numbered its orders again from the seed's first id: the next entry took an earlier order's id, and a
    reader that remembered that id's fills told the new one at the old one's price (a reviewer). Ids of a
    later start also rank after an earlier start's (the pages list newer ids first)."""
    ids = []
    for _ in range(2):
        async with emulator() as client:
            body = await market_order(client, "Buy", "100")
            assert body["retCode"] == 0, body
            ids.append(body["result"]["orderId"])
        await asyncio.sleep(0.002)  # (a later start, by the millisecond)
    first, second = ids
    assert first != second
    assert uuid.UUID(second).int > uuid.UUID(first).int

"""The Binance-wire emulator's websocket streams seen on the wire (no client of ours): Binance's paths,
payload fields, method messages with ids, listen key endpoints, expiry and the connection lifetime.

Venue time is frozen (the emulator's wall clock is injected) and moves only through `POST /_sim/advance`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from engine.venues.binance_emulator import BinanceEmulator, running
from engine.venues.binance_limits import USED_WEIGHT_HEADER
from engine.venues.sim.settings import SimVenueSettings
from tests.support.binance_client import BinanceClient

KEY, SECRET = "streams-key", "streams-secret"
T0 = 1_750_000_020.0


@asynccontextmanager
async def emulator() -> AsyncIterator[tuple[str, aiohttp.ClientSession, BinanceClient]]:
    settings = SimVenueSettings(seed=3, volatility=0.0, symbols=["SFPUSDT", "BTCUSDT"])
    venue = BinanceEmulator(settings, api_key=KEY, api_secret=SECRET, control=True, wall_clock=lambda: T0)
    async with running(venue) as base_url, aiohttp.ClientSession() as session:
        yield base_url, session, BinanceClient(session, base_url, KEY, SECRET)


def ws_url(base_url: str, path: str) -> str:
    return base_url.replace("http://", "ws://") + path


async def next_json(ws: aiohttp.ClientWebSocketResponse) -> Any:
    while True:
        message = await ws.receive(timeout=10)
        if message.type is aiohttp.WSMsgType.TEXT:
            return json.loads(message.data)
        assert message.type is not aiohttp.WSMsgType.CLOSED, "closed"


async def answer_to(ws: aiohttp.ClientWebSocketResponse, request_id: int) -> Any:
    while True:
        payload = await next_json(ws)
        if isinstance(payload, dict) and payload.get("id") == request_id:
            return payload


async def buy_at_market(api: BinanceClient, client_order_id: str) -> None:
    """A long of 100 SFPUSDT at market (its events follow on the user stream)."""
    placed = await api.signed(
        "POST",
        "/fapi/v1/order",
        symbol="SFPUSDT",
        side="BUY",
        type="MARKET",
        quantity="100",
        newClientOrderId=client_order_id,
    )
    assert placed.status == 200, placed.body


async def test_raw_and_combined_mark_price_streams_carry_binance_fields() -> None:
    async with emulator() as (base_url, session, _api):
        async with session.ws_connect(ws_url(base_url, "/market/ws/sfpusdt@markPrice@1s")) as raw:
            payload = await next_json(raw)
            assert payload["e"] == "markPriceUpdate"
            assert payload["s"] == "SFPUSDT"
            assert set(payload) >= {"E", "p", "i", "P", "r", "T"}
            assert payload["E"] == int(T0 * 1000)
        async with session.ws_connect(
            ws_url(base_url, "/market/stream?streams=!markPrice@arr@1s")
        ) as combined:
            payload = await next_json(combined)
            assert payload["stream"] == "!markPrice@arr@1s"
            assert {row["s"] for row in payload["data"]} == {"SFPUSDT", "BTCUSDT"}


async def test_subscribe_unsubscribe_and_list_with_ids() -> None:
    async with (
        emulator() as (base_url, session, _api),
        session.ws_connect(ws_url(base_url, "/market/stream")) as ws,
    ):
        await ws.send_json({"method": "SUBSCRIBE", "params": ["btcusdt@markPrice@1s"], "id": 1})
        assert await answer_to(ws, 1) == {"result": None, "id": 1}
        await ws.send_json({"method": "LIST_SUBSCRIPTIONS", "id": 2})
        assert (await answer_to(ws, 2))["result"] == ["btcusdt@markPrice@1s"]
        payload = await next_json(ws)
        assert payload["stream"] == "btcusdt@markPrice@1s"
        await ws.send_json({"method": "UNSUBSCRIBE", "params": ["btcusdt@markPrice@1s"], "id": 3})
        assert await answer_to(ws, 3) == {"result": None, "id": 3}
        await ws.send_json({"method": "LIST_SUBSCRIPTIONS", "id": 4})
        assert (await answer_to(ws, 4))["result"] == []
        await ws.send_json({"method": "SUBSCRIBE", "params": ["nosuch@trade"], "id": 5})
        assert (await answer_to(ws, 5))["error"]["code"] == 2


async def test_listen_key_endpoints_need_the_api_key_and_are_weighed() -> None:
    async with emulator() as (base_url, session, api):
        async with session.post(f"{base_url}/fapi/v1/listenKey") as refused:
            assert refused.status == 400
            assert (await refused.json())["code"] == -2014
        headers = {"X-MBX-APIKEY": KEY}
        async with session.put(f"{base_url}/fapi/v1/listenKey", headers=headers) as none_yet:
            assert none_yet.status == 400
            assert (await none_yet.json())["code"] == -1125
        async with session.post(f"{base_url}/fapi/v1/listenKey", headers=headers) as created:
            assert created.status == 200
            key = (await created.json())["listenKey"]
            used = int(created.headers[USED_WEIGHT_HEADER])
        async with session.post(f"{base_url}/fapi/v1/listenKey", headers=headers) as again:
            assert (await again.json())["listenKey"] == key  # the account's active key, extended
            assert int(again.headers[USED_WEIGHT_HEADER]) == used + 1
        answer = await api.control("GET", "/_sim/state")
        assert key not in json.dumps(answer.body)  # a credential: never in the state


async def test_a_fill_is_pushed_on_the_user_stream_and_an_unkept_key_expires() -> None:
    async with emulator() as (base_url, session, api):
        headers = {"X-MBX-APIKEY": KEY}
        async with session.post(f"{base_url}/fapi/v1/listenKey", headers=headers) as created:
            key = (await created.json())["listenKey"]
        async with session.ws_connect(ws_url(base_url, f"/private/ws/{key}")) as ws:
            await buy_at_market(api, "entry")
            events = [await next_json(ws) for _ in range(3)]
            assert [e["e"] for e in events] == ["ORDER_TRADE_UPDATE", "ORDER_TRADE_UPDATE", "ACCOUNT_UPDATE"]
            assert [e["o"]["X"] for e in events[:2]] == ["NEW", "FILLED"]
            assert events[1]["o"]["c"] == "entry"
            assert events[2]["a"]["P"][0]["pa"] == "100"
            stop = await api.signed(
                "POST",
                "/fapi/v1/algoOrder",
                algoType="CONDITIONAL",
                symbol="SFPUSDT",
                side="SELL",
                type="STOP_MARKET",
                quantity="100",
                triggerPrice="0.4000",
                reduceOnly="true",
                workingType="MARK_PRICE",
                clientAlgoId="sl",
            )
            assert stop.status == 200, stop.body
            placed_event = await next_json(ws)
            assert (placed_event["e"], placed_event["o"]["caid"], placed_event["o"]["X"]) == (
                "ALGO_UPDATE",
                "sl",
                "NEW",
            )
            await api.control("POST", "/_sim/mark", {"symbol": "SFPUSDT", "price": "0.3990"})
            fired = [await next_json(ws) for _ in range(6)]
            assert [(e["e"], e["o"]["X"]) for e in fired[:5]] == [
                ("ALGO_UPDATE", "TRIGGERING"),
                ("ALGO_UPDATE", "TRIGGERED"),
                ("ORDER_TRADE_UPDATE", "NEW"),
                ("ORDER_TRADE_UPDATE", "FILLED"),
                ("ALGO_UPDATE", "FINISHED"),
            ]
            finished = fired[4]["o"]
            assert finished["caid"] == "sl"
            assert finished["aq"] == "100"
            assert finished["ai"] == str(fired[3]["o"]["i"])
            assert finished["ap"] == fired[3]["o"]["ap"]
            assert fired[5]["e"] == "ACCOUNT_UPDATE"
            assert fired[5]["a"]["P"][0]["pa"] == "0"
            # 60 minutes without a keep-alive: listenKeyExpired, then the key is unknown.
            await api.control("POST", "/_sim/advance", {"seconds": 3601})
            expired = await next_json(ws)
            assert expired["e"] == "listenKeyExpired"
        async with session.put(f"{base_url}/fapi/v1/listenKey", headers=headers) as kept:
            assert (await kept.json())["code"] == -1125


async def test_a_connection_is_closed_after_24_hours_and_the_state_lists_it() -> None:
    async with (
        emulator() as (base_url, session, api),
        session.ws_connect(ws_url(base_url, "/market/ws/sfpusdt@markPrice@1s")) as ws,
    ):
        await next_json(ws)
        state = (await api.control("GET", "/_sim/state")).body["streams"]
        assert [(c["kind"], c["subscriptions"]) for c in state["connections"]] == [
            ("market", ["sfpusdt@markPrice@1s"])
        ]
        await api.control("POST", "/_sim/advance", {"seconds": 86_400})
        while True:
            message = await ws.receive(timeout=10)
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                break


async def test_legacy_unrouted_urls_are_retired_and_market_streams_are_not_private() -> None:
    """Binance retired the unrouted USDⓈ-M websocket URLs on 2026-04-23: a client still using them must
    fail here as it would there, not pass a rehearsal."""
    async with emulator() as (base_url, session, _api):
        for path in ("/ws/sfpusdt@markPrice@1s", "/stream?streams=sfpusdt@markPrice@1s"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(ws_url(base_url, path))
            assert refused.value.status == 404
        async with session.ws_connect(ws_url(base_url, "/private/ws/not-a-key")) as ws:
            message = await ws.receive(timeout=10)
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


async def test_more_than_ten_messages_a_second_closes_the_connection() -> None:
    async with (
        emulator() as (base_url, session, _api),
        session.ws_connect(ws_url(base_url, "/market/ws")) as ws,
    ):
        for request_id in range(1, 13):
            await ws.send_json({"method": "LIST_SUBSCRIPTIONS", "id": request_id})
        while True:
            message = await ws.receive(timeout=10)
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                break
            assert json.loads(message.data)["id"] <= 10


async def test_a_delayed_user_stream_tells_each_event_late_not_each_after_the_one_before() -> None:
    # Under a `delay` fault each user-stream event waited the delay after the previous one left: an
    # order's three events arrived 1, 2 and 3 s late. A slow stream is late; it does not slow down.
    async with emulator() as (base_url, session, api):
        async with session.post(f"{base_url}/fapi/v1/listenKey", headers={"X-MBX-APIKEY": KEY}) as created:
            key = (await created.json())["listenKey"]
        async with session.ws_connect(ws_url(base_url, f"/private/ws/{key}")) as ws:
            async with session.post(
                f"{base_url}/_sim/stream-fault", json={"fault": "delay", "ms": 1000}
            ) as r:
                assert r.status == 200, await r.text()
            sent = time.monotonic()
            await buy_at_market(api, "e1")
            arrived = []
            for _ in range(3):
                await next_json(ws)
                arrived.append(time.monotonic() - sent)

    assert arrived[0] >= 0.9, arrived  # late, as staged
    assert arrived[-1] - arrived[0] < 0.5, arrived  # each by the delay, not summed

"""The Bybit emulator's websocket streams seen on the wire (no client of ours): v5's paths, `op` messages
with `req_id`, auth by HMAC of `GET/realtime` + expires, the tickers topic's snapshot then deltas that
omit what did not change, the private topics' rows, and the heartbeat answers."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import aiohttp

from engine.venues.bybit_emulator import BybitEmulator, running
from engine.venues.sim.settings import SimVenueSettings
from tests.unit.test_bybit_emulator import KEY, SECRET, Client


@asynccontextmanager
async def emulator() -> AsyncIterator[tuple[str, aiohttp.ClientSession, BybitEmulator]]:
    settings = SimVenueSettings(seed=3, volatility=0.0, symbols=["SFPUSDT", "BTCUSDT"])
    venue = BybitEmulator(settings, api_key=KEY, api_secret=SECRET, control=True)
    async with running(venue) as base_url, aiohttp.ClientSession() as session:
        yield base_url, session, venue


def ws_url(base_url: str, path: str) -> str:
    return base_url.replace("http://", "ws://") + path


async def next_matching(ws: aiohttp.ClientWebSocketResponse, match: Callable[[Any], bool]) -> Any:
    while True:
        message = await ws.receive(timeout=10)
        assert message.type is aiohttp.WSMsgType.TEXT, message.type
        payload = json.loads(message.data)
        if match(payload):
            return payload


@asynccontextmanager
async def private_stream() -> AsyncIterator[tuple[aiohttp.ClientWebSocketResponse, Client]]:
    """An authed private connection subscribed to order, execution and position, and the REST client."""
    async with (
        emulator() as (base_url, session, venue),
        session.ws_connect(ws_url(base_url, "/v5/private")) as ws,
    ):
        await ws.send_json(auth())
        await next_matching(ws, lambda p: p.get("op") == "auth")
        await ws.send_json({"op": "subscribe", "args": ["order", "execution", "position"], "req_id": "s"})
        await next_matching(ws, lambda p: p.get("req_id") == "s")
        yield ws, Client(session, base_url, venue)


def auth(key: str = KEY, secret: str = SECRET, ahead: float = 10.0) -> dict[str, Any]:
    expires = int((time.time() + ahead) * 1000)
    signature = hmac.new(secret.encode(), f"GET/realtime{expires}".encode(), hashlib.sha256).hexdigest()
    return {"op": "auth", "args": [key, expires, signature], "req_id": "a1"}


async def test_tickers_snapshot_then_deltas_with_only_what_changed() -> None:
    async with (
        emulator() as (base_url, session, _venue),
        session.ws_connect(ws_url(base_url, "/v5/public/linear")) as ws,
    ):
        await ws.send_json({"op": "subscribe", "args": ["tickers.SFPUSDT"], "req_id": "s1"})
        answer = await next_matching(ws, lambda p: p.get("op") == "subscribe")
        assert answer["success"] is True
        assert answer["req_id"] == "s1"
        assert answer["conn_id"]
        snapshot = await next_matching(ws, lambda p: p.get("topic") == "tickers.SFPUSDT")
        assert snapshot["type"] == "snapshot"
        assert {"markPrice", "lastPrice", "indexPrice", "fundingRate"} <= set(snapshot["data"])
        assert {"cs", "ts"} <= set(snapshot)
        async with session.post(f"{base_url}/_sim/last", json={"symbol": "SFPUSDT", "price": "0.52"}) as r:
            assert r.status == 200
        delta = await next_matching(ws, lambda p: p.get("type") == "delta" and "lastPrice" in p["data"])
        assert Decimal(delta["data"]["lastPrice"]) == Decimal("0.52")
        assert "markPrice" not in delta["data"]  # the mark did not move: the delta leaves it out
        # Asking again for a topic held: Bybit refuses it as already subscribed.
        await ws.send_json({"op": "subscribe", "args": ["tickers.SFPUSDT"], "req_id": "s2"})
        again = await next_matching(ws, lambda p: p.get("req_id") == "s2")
        assert again["success"] is False
        assert "already subscribed" in again["ret_msg"]
        await ws.send_json({"op": "ping", "req_id": "p1"})
        pong = await next_matching(ws, lambda p: p.get("req_id") == "p1")
        assert (pong["op"], pong["ret_msg"], pong["success"]) == ("ping", "pong", True)
        await ws.send_json({"op": "subscribe", "args": ["tickers.NOPEUSDT"], "req_id": "s3"})
        unknown = await next_matching(ws, lambda p: p.get("req_id") == "s3")
        assert unknown["success"] is False


async def test_private_topics_need_auth_and_a_wrong_key_or_sign_is_refused() -> None:
    async with (
        emulator() as (base_url, session, _venue),
        session.ws_connect(ws_url(base_url, "/v5/private")) as ws,
    ):
        await ws.send_json({"op": "subscribe", "args": ["order"], "req_id": "s0"})
        early = await next_matching(ws, lambda p: p.get("req_id") == "s0")
        assert early["success"] is False
        for wrong, reason in (
            (auth(key="other"), "Invalid apikey"),
            (auth(secret="other"), "Invalid sign"),
            (auth(ahead=-5), "Params Error"),  # what Bybit answers an expired auth
        ):
            await ws.send_json(wrong)
            refused = await next_matching(ws, lambda p: p.get("op") == "auth")
            assert refused["success"] is False
            assert reason in refused["ret_msg"]
        await ws.send_json(auth())
        accepted = await next_matching(ws, lambda p: p.get("op") == "auth")
        assert accepted["success"] is True
        await ws.send_json({"op": "subscribe", "args": ["order", "execution", "position"], "req_id": "s1"})
        assert (await next_matching(ws, lambda p: p.get("req_id") == "s1"))["success"] is True
        await ws.send_json({"op": "ping", "req_id": "p1"})
        pong = await next_matching(ws, lambda p: p.get("req_id") == "p1")
        assert pong["op"] == "pong"
        assert pong["args"][0].isdigit()


async def test_a_position_stop_that_fires_is_told_triggered_then_filled_with_its_execution() -> None:
    async with private_stream() as (ws, api):
        await api.control("mark", symbol="SFPUSDT", price="0.45")
        status, body, _ = await api.post(
            "/v5/order/create",
            category="linear",
            symbol="SFPUSDT",
            side="Buy",
            orderType="Market",
            qty="100",
            orderLinkId="e1",
        )
        assert (status, body["retCode"]) == (200, 0)
        await api.control("position-stops", symbol="SFPUSDT", stopLoss="0.4", slTriggerBy="MarkPrice")
        await api.control("mark", symbol="SFPUSDT", price="0.39")
        seen: dict[str, list[dict[str, Any]]] = {"order": [], "execution": [], "position": []}

        def fired(payload: Any) -> bool:
            if payload.get("topic") in seen:
                seen[payload["topic"]].extend(payload["data"])
            return (
                any(
                    row.get("orderStatus") == "Filled" and row.get("stopOrderType") == "StopLoss"
                    for row in seen["order"]
                )
                and any(row.get("size") == "0" for row in seen["position"])
                and any(row.get("stopOrderType") == "StopLoss" for row in seen["execution"])
            )

        await next_matching(ws, fired)
        stop_rows = [row for row in seen["order"] if row.get("stopOrderType") == "StopLoss"]
        assert [row["orderStatus"] for row in stop_rows][-2:] == ["Triggered", "Filled"]
        assert stop_rows[-1]["orderLinkId"] == ""
        execution = next(row for row in seen["execution"] if row.get("stopOrderType") == "StopLoss")
        assert execution["orderId"] == stop_rows[-1]["orderId"]
        assert execution["execPrice"] == stop_rows[-1]["avgPrice"]
        assert seen["position"][-1]["size"] == "0"
        assert seen["position"][-1]["side"] == ""


async def test_a_delayed_stream_tells_each_event_late_not_each_after_the_one_before() -> None:
    # A `delay` fault made each account message wait the delay after the previous one left: an order's
    # three messages (order, execution, position) arrived 1, 2 and 3 s late, so a position's "flat" came
    # seconds after its stops' "deactivated" and a reader held those waiting for it in vain. A slow stream
    # is late; it does not slow down.
    async with private_stream() as (ws, api):
        await api.control("stream-fault", fault="delay", ms=1000)
        sent = time.monotonic()
        status, body, _ = await api.post(
            "/v5/order/create", category="linear", symbol="SFPUSDT", side="Buy", orderType="Market", qty="100"
        )
        assert (status, body["retCode"]) == (200, 0)
        arrived: dict[str, float] = {}
        while len(arrived) < 3:
            payload = await next_matching(ws, lambda p: p.get("topic") in ("order", "execution", "position"))
            arrived.setdefault(payload["topic"], time.monotonic() - sent)

    assert min(arrived.values()) >= 0.9, arrived  # late, as staged
    assert max(arrived.values()) - min(arrived.values()) < 0.5, arrived  # each by the delay, not summed

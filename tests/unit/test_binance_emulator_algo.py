"""The Binance-wire emulator's algo order lifecycle over real loopback HTTP: TRIGGERING before FINISHED
(or stuck there), algo orders that answer "does not exist" for seconds after placement, and client ids
that may be used again once their order ended.

Venue time is frozen (the emulator's wall clock is injected) and moves only through `POST /_sim/advance`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aiohttp

from engine.venues.binance_emulator import BinanceEmulator, FaultPlan, parse_fault_spec, running
from engine.venues.sim.settings import SimVenueSettings
from tests.support.binance_client import Answer, BinanceClient

KEY, SECRET = "algo-key", "algo-secret"
SFP = "SFPUSDT"
T0 = 1_750_000_020.0
T0_MS = int(T0 * 1000)


@dataclass
class Rig:
    api: BinanceClient

    async def control(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        answer = await self.api.control(method, path, body)
        assert answer.status == 200, answer.body
        return answer.body

    async def advance(self, seconds: float) -> None:
        await self.control("POST", "/_sim/advance", {"seconds": seconds})

    async def mark(self, price: str) -> list[str]:
        return (await self.control("POST", "/_sim/mark", {"symbol": SFP, "price": price}))["triggered"]  # type: ignore[no-any-return]

    async def long(self, cid: str = "in") -> None:
        answer = await self.api.signed(
            "POST",
            "/fapi/v1/order",
            symbol=SFP,
            side="BUY",
            type="MARKET",
            quantity="100",
            newClientOrderId=cid,
        )
        assert answer.status == 200, answer.body

    async def stop(self, cid: str = "sl", trigger: str = "0.4000") -> Answer:
        return await self.api.signed(
            "POST",
            "/fapi/v1/algoOrder",
            algoType="CONDITIONAL",
            symbol=SFP,
            side="SELL",
            type="STOP_MARKET",
            quantity="100",
            triggerPrice=trigger,
            workingType="MARK_PRICE",
            reduceOnly="true",
            clientAlgoId=cid,
        )

    async def query(self, **by: object) -> Answer:
        return await self.api.signed("GET", "/fapi/v1/algoOrder", symbol=SFP, **by)

    async def cancel(self, **by: object) -> Answer:
        return await self.api.signed("DELETE", "/fapi/v1/algoOrder", symbol=SFP, **by)

    async def open_ids(self) -> list[str]:
        answer = await self.api.signed("GET", "/fapi/v1/openAlgoOrders")
        assert answer.status == 200, answer.body
        return [row["clientAlgoId"] for row in answer.body]

    async def position(self) -> str:
        answer = await self.api.signed("GET", "/fapi/v2/positionRisk", symbol=SFP)
        # (V2 answers a flat symbol's row too, "0.000")
        amount = next((Decimal(row["positionAmt"]) for row in answer.body), Decimal(0))
        return "0" if amount == 0 else str(amount)


@asynccontextmanager
async def rig(faults: str = "") -> AsyncIterator[Rig]:
    settings = SimVenueSettings(seed=3, volatility=0.0, symbols=[SFP, "BTCUSDT"])
    emulator = BinanceEmulator(
        settings,
        api_key=KEY,
        api_secret=SECRET,
        control=True,
        faults=FaultPlan(parse_fault_spec(faults), seed=3),
        wall_clock=lambda: T0,
    )
    async with running(emulator) as base_url, aiohttp.ClientSession() as session:
        r = Rig(BinanceClient(session, base_url, KEY, SECRET))
        await r.mark("0.4500")
        yield r


# ---- TRIGGERING → FINISHED -----------------------------------------------------------------------------


async def test_a_fired_algo_order_answers_triggering_then_finished_with_its_child_order() -> None:
    async with rig() as r:
        forced = {"call": "create_order", "fault": "triggering:5"}
        await r.control("POST", "/_sim/fault", forced)
        await r.long()  # a regular order: the trait waits for the next algo placement
        placed = await r.stop()
        assert placed.body["algoStatus"] == "NEW"

        assert await r.mark("0.3990") == ["sl"]

        triggering = (await r.query(clientAlgoId="sl")).body
        assert (triggering["algoStatus"], triggering["actualOrderId"]) == ("TRIGGERING", "")
        assert triggering["triggerTime"] == T0_MS
        assert await r.open_ids() == []  # fired: no longer an open algo order
        assert await r.position() == "100"  # the position stays until the matching engine fills
        state = await r.control("GET", "/_sim/state")
        assert state["triggering_algo_orders"] == [{"clientAlgoId": "sl", "symbol": SFP, "since": T0_MS}]
        assert (await r.cancel(clientAlgoId="sl")).code == -20124  # too late to cancel

        await r.advance(5.0)

        finished = (await r.query(clientAlgoId="sl")).body
        assert finished["algoStatus"] == "FINISHED"
        child = await r.api.signed("GET", "/fapi/v1/order", symbol=SFP, orderId=finished["actualOrderId"])
        assert (child.body["status"], child.body["executedQty"]) == ("FILLED", "100")
        assert await r.position() == "0"
        assert (await r.control("GET", "/_sim/state"))["triggering_algo_orders"] == []


async def test_without_the_fault_a_fired_order_is_finished_at_once() -> None:
    async with rig() as r:
        await r.long()
        await r.stop()
        await r.mark("0.3990")

        assert (await r.query(clientAlgoId="sl")).body["algoStatus"] == "FINISHED"
        assert await r.position() == "0"


async def test_a_stuck_algo_order_stays_triggering() -> None:
    async with rig("POST:algoOrder=stuck") as r:
        await r.long()
        await r.stop()
        await r.mark("0.3990")

        await r.advance(86_400.0)

        assert (await r.query(clientAlgoId="sl")).body["algoStatus"] == "TRIGGERING"
        assert await r.position() == "100"


# ---- read-after-write lag ------------------------------------------------------------------------------


async def test_a_lagged_algo_order_does_not_exist_for_its_seconds_then_does() -> None:
    async with rig("POST:algoOrder=lag:3") as r:
        await r.long()
        placed = await r.stop()
        assert placed.status == 200
        algo_id = placed.body["algoId"]

        for answer in (await r.query(clientAlgoId="sl"), await r.query(algoId=algo_id)):
            assert (answer.status, answer.code, answer.msg) == (400, -2013, "Order does not exist.")
        unknown = await r.cancel(clientAlgoId="sl")
        assert (unknown.status, unknown.code, unknown.msg) == (400, -2011, "Unknown order sent.")
        assert await r.open_ids() == []
        again = await r.stop()
        assert (again.status, again.code) == (400, -20132)  # it exists: the id is taken
        state = await r.control("GET", "/_sim/state")
        assert [o["clientAlgoId"] for o in state["open_algo_orders"]] == ["sl"]  # the oracle sees it

        await r.advance(3.0)

        assert (await r.query(clientAlgoId="sl")).body["algoStatus"] == "NEW"
        assert await r.open_ids() == ["sl"]
        assert (await r.cancel(algoId=algo_id)).status == 200


async def test_a_lagged_algo_order_triggers_while_it_reads_as_unknown() -> None:
    async with rig("algoOrder=lag:3") as r:
        await r.long()
        await r.stop()

        assert await r.mark("0.3990") == ["sl"]

        assert await r.position() == "0"
        assert (await r.query(clientAlgoId="sl")).code == -2013
        await r.advance(3.0)
        assert (await r.query(clientAlgoId="sl")).body["algoStatus"] == "FINISHED"


async def test_lag_drawn_with_a_probability_hits_some_placements_only() -> None:
    async with rig("POST:algoOrder=lag:3@0.5") as r:
        await r.long()
        lagged = []
        for index in range(40):
            await r.stop(f"sl-{index}", trigger="0.4000")
            lagged.append((await r.query(clientAlgoId=f"sl-{index}")).status == 400)
        assert 5 <= sum(lagged) <= 35
        await r.advance(3.0)
        assert len(await r.open_ids()) == 40


# ---- client ids: unique among open orders only ---------------------------------------------------------


async def test_a_client_algo_id_may_be_used_again_after_its_order_was_cancelled() -> None:
    async with rig() as r:
        await r.long()
        first = (await r.stop("sl", "0.4000")).body
        assert (await r.cancel(clientAlgoId="sl")).status == 200

        second = await r.stop("sl", "0.4100")

        assert second.status == 200
        assert second.body["algoId"] != first["algoId"]
        latest = (await r.query(clientAlgoId="sl")).body
        assert (latest["algoId"], latest["algoStatus"], latest["triggerPrice"]) == (
            second.body["algoId"],
            "NEW",
            "0.4100",
        )
        old = (await r.query(algoId=first["algoId"])).body
        assert (old["clientAlgoId"], old["algoStatus"]) == ("sl", "CANCELED")


async def test_a_new_client_order_id_may_be_used_again_after_its_order_filled() -> None:
    async with rig() as r:
        await r.long("in")
        await r.long("in")

        assert await r.position() == "200"
        answer = await r.api.signed("GET", "/fapi/v1/order", symbol=SFP, origClientOrderId="in")
        assert answer.body["status"] == "FILLED"

"""The Binance-wire emulator's limits over real loopback HTTP: IP request weight per fixed minute with
`X-MBX-USED-WEIGHT-1M`, 429 -1003 with Retry-After, 418 bans that escalate and refuse everything, and the
account's order counts in `X-MBX-ORDER-COUNT-*` with 429 -1015 (no Retry-After promised).

Venue time is frozen at a minute boundary (the emulator's wall clock is injected) and moves only through
`POST /_sim/advance`, so window edges are exact; request signatures are still checked on the real clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

from engine.venues.binance_emulator import BinanceEmulator, running
from engine.venues.sim.settings import SimVenueSettings
from tests.support.binance_client import Answer, BinanceClient

KEY, SECRET = "limits-key", "limits-secret"
SFP = "SFPUSDT"
T0 = 1_750_000_020.0  # a minute boundary (and a 10-second one)
T0_MS = int(T0 * 1000)
WEIGHT = "X-MBX-USED-WEIGHT-1M"
COUNT_10S, COUNT_1M = "X-MBX-ORDER-COUNT-10S", "X-MBX-ORDER-COUNT-1M"
TOO_MANY = (
    "Too many requests; current limit of IP(127.0.0.1) is {limit} requests per minute. Please use the "
    "websocket for live updates to avoid polling the API."
)


@dataclass
class Rig:
    api: BinanceClient
    emulator: BinanceEmulator

    async def advance(self, seconds: float) -> None:
        answer = await self.api.control("POST", "/_sim/advance", {"seconds": seconds})
        assert answer.status == 200, answer.body

    async def state(self) -> dict[str, Any]:
        answer = await self.api.control("GET", "/_sim/state")
        assert answer.status == 200, answer.body
        return answer.body  # type: ignore[no-any-return]

    async def ping(self) -> Answer:
        return await self.api.public("GET", "/fapi/v1/ping")

    async def buy(self, cid: str, quantity: str = "100") -> Answer:
        return await self.api.signed(
            "POST",
            "/fapi/v1/order",
            symbol=SFP,
            side="BUY",
            type="MARKET",
            quantity=quantity,
            newClientOrderId=cid,
        )


@asynccontextmanager
async def rig(**rate_limits: object) -> AsyncIterator[Rig]:
    settings = SimVenueSettings.model_validate(
        {"seed": 3, "volatility": 0.0, "symbols": [SFP, "BTCUSDT"], "rate_limits": rate_limits}
    )
    emulator = BinanceEmulator(settings, api_key=KEY, api_secret=SECRET, control=True, wall_clock=lambda: T0)
    async with running(emulator) as base_url, aiohttp.ClientSession() as session:
        yield Rig(BinanceClient(session, base_url, KEY, SECRET), emulator)


def weight(answer: Answer) -> int:
    return int(answer.headers[WEIGHT])


# ---- request weight ------------------------------------------------------------------------------------


async def test_every_answer_carries_the_weight_used_in_the_current_minute() -> None:
    async with rig() as r:
        assert weight(await r.ping()) == 1
        assert weight(await r.api.public("GET", "/fapi/v1/exchangeInfo")) == 2
        assert weight(await r.api.signed("GET", "/fapi/v2/positionRisk")) == 7  # 5
        assert weight(await r.api.signed("GET", "/fapi/v1/openAlgoOrders")) == 47  # 40 without a symbol
        assert weight(await r.api.signed("GET", "/fapi/v1/openAlgoOrders", symbol=SFP)) == 48  # 1 with one
        assert weight(await r.buy("in")) == 48  # a new order weighs 0 on the IP limit
        refused = await r.api.public("GET", "/fapi/v1/premiumIndex", symbol="NOPEUSDT")
        assert (refused.status, refused.code, weight(refused)) == (400, -1121, 49)
        unsigned = await r.api.public("GET", "/fapi/v2/balance")  # no signature: still weighed
        assert (unsigned.status, weight(unsigned)) == (400, 54)
        force = {"call": "fetch_balance", "fault": "busy"}
        assert (await r.api.control("POST", "/_sim/fault", force)).status == 200
        busy = await r.api.signed("GET", "/fapi/v2/balance")
        assert (busy.status, busy.code, weight(busy)) == (503, -1008, 59)
        assert (await r.state())["rate"]["used_weight_1m"] == 59  # the control API itself weighs nothing
        # Mark prices: "1 with symbol, 10 without" (the table said 1 either way: rehearsal spent a tenth).
        assert weight(await r.api.public("GET", "/fapi/v1/premiumIndex", symbol=SFP)) == 60
        assert weight(await r.api.public("GET", "/fapi/v1/premiumIndex")) == 70


async def test_the_weight_starts_again_in_each_fixed_minute() -> None:
    async with rig() as r:
        await r.ping()
        await r.advance(59.5)
        assert weight(await r.ping()) == 2
        await r.advance(0.5)
        assert weight(await r.ping()) == 1


async def test_over_the_limit_is_429_1003_with_retry_after_until_the_minute_ends() -> None:
    async with rig(request_weight_per_minute=10) as r:
        await r.advance(15.0)
        for _ in range(10):
            assert (await r.ping()).status == 200

        refused = await r.ping()

        assert (refused.status, refused.code, refused.msg) == (429, -1003, TOO_MANY.format(limit=10))
        assert refused.headers["Retry-After"] == "45"
        assert weight(refused) == 10  # a refused request adds nothing
        heavy_first = await r.api.signed("GET", "/fapi/v1/openAlgoOrders")
        assert heavy_first.status == 429


async def test_a_request_heavier_than_what_is_left_is_refused_whole() -> None:
    async with rig(request_weight_per_minute=45) as r:
        await r.api.signed("GET", "/fapi/v2/positionRisk")  # 5 used, 40 left
        await r.ping()  # 6 used

        refused = await r.api.signed("GET", "/fapi/v1/openAlgoOrders")  # 40 > 39

        assert (refused.status, refused.code, weight(refused)) == (429, -1003, 6)
        assert refused.headers["Retry-After"] == "60"


async def test_a_request_that_would_fit_is_still_a_violation_while_retry_after_runs() -> None:
    async with rig(request_weight_per_minute=45, ban_after_violations=2) as r:
        await r.ping()
        served = await r.api.signed("GET", "/fapi/v1/openAlgoOrders")  # 1 + 40 fits, ...
        assert served.status == 200
        refused = await r.api.signed("GET", "/fapi/v1/openAlgoOrders")  # ... 41 + 40 does not
        assert refused.status == 429

        light = await r.ping()  # 42 would fit, but the client was told to wait

        assert (light.status, light.code, weight(light)) == (418, -1003, 41)


async def test_waiting_out_retry_after_is_not_punished() -> None:
    async with rig(request_weight_per_minute=2, ban_after_violations=2) as r:
        for _ in range(3):  # three minutes of: use it all, get one 429, wait as told
            await r.ping()
            await r.ping()
            refused = await r.ping()
            assert refused.status == 429
            await r.advance(float(refused.headers["Retry-After"]))
        assert (await r.ping()).status == 200


async def test_sending_on_during_retry_after_gets_the_ip_banned_and_a_ban_refuses_everything() -> None:
    async with rig(request_weight_per_minute=2) as r:  # the default: banned at the third violation
        await r.ping()
        await r.ping()
        first, second = await r.ping(), await r.ping()
        assert (first.status, second.status) == (429, 429)

        banned = await r.ping()

        until_ms = T0_MS + 120_000
        assert (banned.status, banned.code) == (418, -1003)
        assert banned.msg == (
            f"Way too many requests; IP(127.0.0.1) banned until {until_ms}. Please use the websocket for "
            "live updates to avoid bans."
        )
        assert banned.headers["Retry-After"] == "120"
        assert WEIGHT in banned.headers
        for answer in (
            await r.api.public("GET", "/fapi/v1/time"),
            await r.api.signed("GET", "/fapi/v2/balance"),
            await r.buy("during-ban"),
        ):
            assert (answer.status, answer.code) == (418, -1003)
        await r.advance(90.0)  # a new minute, but the ban outlives it
        late = await r.ping()
        assert (late.status, late.headers["Retry-After"]) == (418, "30")
        await r.advance(30.0)
        assert (await r.ping()).status == 200


async def test_bans_escalate_from_the_first_length_doubling_up_to_the_longest() -> None:
    async with rig(
        request_weight_per_minute=1, ban_after_violations=1, ban_seconds=120, max_ban_seconds=300
    ) as r:
        lengths = []
        for _ in range(4):
            await r.ping()
            banned = await r.ping()
            assert banned.status == 418
            lengths.append(int(banned.headers["Retry-After"]))
            await r.advance(float(lengths[-1]))
            await r.advance(60.0 - (r.emulator.now() % 60.0))  # the start of a fresh minute
        assert lengths == [120, 240, 300, 300]


async def test_the_state_stays_readable_during_a_ban_and_reports_the_rate() -> None:
    async with rig(request_weight_per_minute=10, ban_after_violations=1) as r:
        assert (await r.buy("in")).status == 200
        for _ in range(10):
            await r.ping()
        assert (await r.ping()).status == 418

        state = await r.state()

        assert state["rate"] == {
            "used_weight_1m": 10,
            "order_count_10s": 1,
            "order_count_1m": 1,
            "banned_until_ms": T0_MS + 120_000,
        }
        assert [p["symbol"] for p in state["positions"]] == [SFP]
        await r.advance(120.0)
        assert (await r.state())["rate"]["banned_until_ms"] is None


# ---- order counts --------------------------------------------------------------------------------------


async def test_successful_new_orders_carry_the_order_counts_of_the_current_windows() -> None:
    async with rig() as r:
        first = await r.buy("a")
        assert (first.status, first.headers[COUNT_10S], first.headers[COUNT_1M]) == (200, "1", "1")
        stop = await r.api.signed(
            "POST",
            "/fapi/v1/algoOrder",
            algoType="CONDITIONAL",
            symbol=SFP,
            side="SELL",
            type="STOP_MARKET",
            quantity="100",
            triggerPrice="0.4000",
            workingType="MARK_PRICE",
            reduceOnly="true",
            clientAlgoId="sl",
        )
        assert (stop.status, stop.headers[COUNT_10S], stop.headers[COUNT_1M]) == (200, "2", "2")
        await r.advance(10.0)
        later = await r.buy("b")
        assert (later.headers[COUNT_10S], later.headers[COUNT_1M]) == ("1", "3")
        read = await r.api.signed("GET", "/fapi/v2/balance")
        assert COUNT_10S not in read.headers


async def test_over_the_ten_second_order_limit_is_429_1015_without_retry_after() -> None:
    async with rig(orders_per_10s=2, ban_after_violations=5) as r:
        await r.buy("a")
        await r.buy("b")

        refused = await r.buy("c")

        assert (refused.status, refused.code) == (429, -1015)
        assert refused.msg == "Too many new orders; current limit is 2 orders per TEN_SECONDS."
        assert "Retry-After" not in refused.headers  # Binance does not promise one for order counts
        assert COUNT_10S not in refused.headers
        assert WEIGHT in refused.headers


async def test_over_the_minute_order_limit_names_the_minute() -> None:
    async with rig(orders_per_10s=2, orders_per_minute=3, ban_after_violations=5) as r:
        await r.buy("a")
        await r.buy("b")
        await r.advance(10.0)
        await r.buy("c")

        refused = await r.buy("d")

        assert (refused.status, refused.code) == (429, -1015)
        assert refused.msg == "Too many new orders; current limit is 3 orders per MINUTE."


async def test_an_account_ban_for_order_violations_refuses_public_requests_too() -> None:
    async with rig(orders_per_10s=1, ban_after_violations=2, ban_seconds=60) as r:
        await r.buy("a")
        assert (await r.buy("b")).status == 429

        banned = await r.buy("c")

        assert (banned.status, banned.code, banned.headers["Retry-After"]) == (418, -1003, "60")
        assert f"banned until {T0_MS + 60_000}" in (banned.msg or "")
        assert (await r.ping()).status == 418
        assert (await r.state())["rate"]["banned_until_ms"] == T0_MS + 60_000


async def test_a_ban_fault_puts_the_ban_it_answers_in_force() -> None:
    """A 418 says "banned until T", and Binance refuses every request of the IP until then. The `ban`
    fault answered so and then served the next request as if nothing had happened: a client that ignored
    the 418 lost nothing here, and would be refused on the venue."""
    async with rig() as r:
        forced = await r.api.control(
            "POST", "/_sim/fault", {"targets": ["GET:balance"], "fault": "ban", "count": 1}
        )
        assert forced.status == 200, forced.body

        banned = await r.api.signed("GET", "/fapi/v2/balance")

        assert (banned.status, banned.code, banned.headers["Retry-After"]) == (418, -1003, "2")
        assert f"banned until {T0_MS + 2_000}" in (banned.msg or "")
        for answer in (await r.ping(), await r.buy("during-ban")):  # other endpoints, public ones too
            assert (answer.status, answer.code) == (418, -1003)
        assert (await r.state())["rate"]["banned_until_ms"] == T0_MS + 2_000
        await r.advance(2.0)
        assert (await r.ping()).status == 200
        assert (await r.buy("after-ban")).status == 200

"""Binance USDⓈ-M REST limits, as Binance documents them: what each request costs and how the venue
reports what has been used.

Two kinds of limit apply at once (developers.binance.com, USDⓈ-M Futures, "General Info" / "LIMITS"):

* **request weight per IP**: 2 400 per minute by default. Every endpoint has a weight (heavier for
  endpoints that answer for every symbol: `openAlgoOrders` without `symbol` weighs 40). Each answer carries
  `X-MBX-USED-WEIGHT-1M`, the weight used in the current minute. Over the limit: HTTP 429 with
  `Retry-After`; a client that keeps going gets HTTP 418, an IP ban that grows from 2 minutes to 3 days.
* **order count per account**: 300 per 10 seconds and 1 200 per minute by default, counted on new orders
  (regular and algo). Successful order answers carry `X-MBX-ORDER-COUNT-10S` and `X-MBX-ORDER-COUNT-1M`.
  Over the limit: HTTP 429 with code -1015.

The defaults are what `exchangeInfo.rateLimits` announces for an ordinary account; higher tiers announce
more, and the answers' headers are the venue's own count. The adapter paces its requests with this table
and the emulator charges with it, so both read the same facts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

REQUEST_WEIGHT_PER_MINUTE = 2400
ORDERS_PER_10_SECONDS = 300
ORDERS_PER_MINUTE = 1200

USED_WEIGHT_HEADER = "X-MBX-USED-WEIGHT-1M"
# Header → the length of the window it counts, in seconds.
ORDER_COUNT_HEADERS: Mapping[str, float] = {"X-MBX-ORDER-COUNT-10S": 10.0, "X-MBX-ORDER-COUNT-1M": 60.0}


@dataclass(frozen=True, slots=True)
class EndpointCost:
    weight: int  # IP request weight
    weight_without_symbol: int | None = None  # when the endpoint answers for every symbol
    new_order: bool = False  # counts against the account's order budgets

    def weight_for(self, params: Mapping[str, object]) -> int:
        if self.weight_without_symbol is not None and not params.get("symbol"):
            return self.weight_without_symbol
        return self.weight


# (method, path) → cost. Paths are the USDⓈ-M REST paths the adapter uses (and the emulator serves).
ENDPOINT_COSTS: Mapping[tuple[str, str], EndpointCost] = {
    ("GET", "/fapi/v1/ping"): EndpointCost(1),
    ("GET", "/fapi/v1/time"): EndpointCost(1),
    ("GET", "/fapi/v1/exchangeInfo"): EndpointCost(1),
    ("GET", "/fapi/v1/premiumIndex"): EndpointCost(
        1, weight_without_symbol=10
    ),  # "1 with symbol, 10 without"
    ("GET", "/fapi/v2/balance"): EndpointCost(5),
    ("GET", "/fapi/v3/balance"): EndpointCost(5),
    ("GET", "/fapi/v2/positionRisk"): EndpointCost(5),
    ("GET", "/fapi/v3/positionRisk"): EndpointCost(5),
    ("POST", "/fapi/v1/leverage"): EndpointCost(1),
    ("POST", "/fapi/v1/order"): EndpointCost(0, new_order=True),  # "0 on IP rate limit"
    ("GET", "/fapi/v1/order"): EndpointCost(1),
    ("DELETE", "/fapi/v1/order"): EndpointCost(1),
    ("POST", "/fapi/v1/algoOrder"): EndpointCost(1, new_order=True),
    ("GET", "/fapi/v1/algoOrder"): EndpointCost(1),
    ("DELETE", "/fapi/v1/algoOrder"): EndpointCost(1),
    ("GET", "/fapi/v1/openAlgoOrders"): EndpointCost(1, weight_without_symbol=40),
    ("GET", "/fapi/v1/allAlgoOrders"): EndpointCost(5),
    ("GET", "/fapi/v1/openOrders"): EndpointCost(1, weight_without_symbol=40),
    ("POST", "/fapi/v1/listenKey"): EndpointCost(1),
    ("PUT", "/fapi/v1/listenKey"): EndpointCost(1),
    ("DELETE", "/fapi/v1/listenKey"): EndpointCost(1),
}
UNKNOWN_ENDPOINT_COST = EndpointCost(1)


def endpoint_cost(method: str, path: str) -> EndpointCost:
    return ENDPOINT_COSTS.get((method.upper(), path), UNKNOWN_ENDPOINT_COST)


__all__ = [
    "ENDPOINT_COSTS",
    "ORDERS_PER_10_SECONDS",
    "ORDERS_PER_MINUTE",
    "ORDER_COUNT_HEADERS",
    "REQUEST_WEIGHT_PER_MINUTE",
    "USED_WEIGHT_HEADER",
    "EndpointCost",
    "endpoint_cost",
]

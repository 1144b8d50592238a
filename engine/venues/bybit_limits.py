"""Bybit v5 REST limits, as Bybit documents them (bybit-exchange.github.io, v5 "Rate Limit").

* **per IP**: at most 600 requests in any 5-second window, all endpoints together. Exceeding it answers
  HTTP 403 "access too frequent" and the IP is banned for at least 10 minutes.
* **per UID and endpoint**: "based on the rolling time window per second and UID", each endpoint counted
  apart (order/create 10/s for linear and inverse, 20/s for spot; the default futures tier of the VIP table
  is 10/s too; trading-stop 10/s). Over it the answer is HTTP 200 with `retCode` 10006 "Too many visits!".
  Every answer carries `X-Bapi-Limit` (the endpoint's current limit for this account),
  `X-Bapi-Limit-Status` (requests left in the window) and `X-Bapi-Limit-Reset-Timestamp` ("when your
  request limit resets if you have exceeded your rate_limit. Otherwise, this is just the current
  timestamp"): on a 10006 it says when the endpoint may be asked again.

The table holds the endpoints the adapter calls; an account with raised limits reports them in
`X-Bapi-Limit`, which the pacer adopts.
"""

from __future__ import annotations

from collections.abc import Mapping

IP_BUDGET_KEY = "ip"
IP_REQUESTS_PER_5_SECONDS = 600
IP_BAN_SECONDS = 600.0  # "wait for at least 10 minutes"

LIMIT_HEADER = "X-Bapi-Limit"
LIMIT_STATUS_HEADER = "X-Bapi-Limit-Status"
LIMIT_RESET_HEADER = "X-Bapi-Limit-Reset-Timestamp"

# Path → requests per second per UID (unified account, linear).
ENDPOINT_LIMITS_PER_SECOND: Mapping[str, int] = {
    "/v5/order/create": 10,  # linear; spot's 20/s does not apply to perpetuals
    "/v5/order/cancel": 10,
    "/v5/order/realtime": 50,
    "/v5/order/history": 50,
    "/v5/execution/list": 50,
    "/v5/position/list": 50,
    "/v5/position/trading-stop": 10,
    "/v5/position/set-leverage": 10,
    "/v5/account/wallet-balance": 50,
}


__all__ = [
    "ENDPOINT_LIMITS_PER_SECOND",
    "IP_BAN_SECONDS",
    "IP_BUDGET_KEY",
    "IP_REQUESTS_PER_5_SECONDS",
    "LIMIT_HEADER",
    "LIMIT_RESET_HEADER",
    "LIMIT_STATUS_HEADER",
]

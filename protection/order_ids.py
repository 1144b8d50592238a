"""Deterministic client order ids: the idempotency key of every order we send.

`tsb<token>-<position id>-<purpose><generation>`, e.g. `tsb4f2a9c-17-sl0` (≤ 36 characters). The same
(position, purpose, generation) always gives the same id, so a retry after a timeout can never create a
second order: the venue refuses a known id, and `fetch_order` finds the first. A new generation is used
only when the previous order is proven gone (cancelled, expired, filled) or being replaced (a trailing move).
The token (per database) lets the reconciler recognise our orders and leave everything else alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.exchange.port import MAX_CLIENT_ORDER_ID_LENGTH
from storage.repositories import OrderPurpose

PURPOSE_CODES: dict[OrderPurpose, str] = {
    OrderPurpose.ENTRY: "en",
    OrderPurpose.STOP_LOSS: "sl",
    OrderPurpose.TRAILING_STOP: "ts",
    OrderPurpose.CLOSE: "cl",
}
_PURPOSES = {code: purpose for purpose, code in PURPOSE_CODES.items()}
_PATTERN = re.compile(r"^tsb([a-z0-9]{6})-(\d{1,18})-(en|sl|ts|cl)(\d{1,6})$")


@dataclass(frozen=True, slots=True)
class OrderKey:
    position_id: int
    purpose: OrderPurpose
    generation: int


def client_order_id(token: str, position_id: int, purpose: OrderPurpose, generation: int) -> str:
    cid = f"tsb{token}-{position_id}-{PURPOSE_CODES[purpose]}{generation}"
    if len(cid) > MAX_CLIENT_ORDER_ID_LENGTH or not _PATTERN.fullmatch(cid):
        raise ValueError(
            f"cannot build a client order id from {token!r}, {position_id}, {purpose}, {generation}"
        )
    return cid


def installation_of(cid: str) -> str | None:
    """The token of the installation (database) that sent an order of this program, else None (not one of
    this program's ids: the operator's, another client's)."""
    match = _PATTERN.fullmatch(cid)
    return match.group(1) if match is not None else None


def parse_client_order_id(cid: str, token: str) -> OrderKey | None:
    """The key of one of *our* orders (this database's token), else None: not ours, never touched."""
    match = _PATTERN.fullmatch(cid)
    if match is None or match.group(1) != token:
        return None
    return OrderKey(int(match.group(2)), _PURPOSES[match.group(3)], int(match.group(4)))

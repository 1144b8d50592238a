"""A plain aiohttp client for the Binance-wire emulator that signs requests the way Binance asks.

Binance USDⓈ-M ("General Info" / "SIGNED Endpoint Security"): a SIGNED request carries `timestamp` (ms)
and `signature`, the hex HMAC-SHA256 of the total parameters (query string followed by the request body)
keyed with the API secret, and the API key in the `X-MBX-APIKEY` header. No ccxt here: tests that check
the wire itself (statuses, codes, headers) need to see every answer as it arrives.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: Any  # the decoded JSON, or the text when it is not JSON
    headers: Mapping[str, str]  # case-insensitive (aiohttp's CIMultiDictProxy)

    @property
    def code(self) -> int | None:
        return self.body.get("code") if isinstance(self.body, dict) else None

    @property
    def msg(self) -> str | None:
        return self.body.get("msg") if isinstance(self.body, dict) else None


class BinanceClient:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, api_key: str, api_secret: str) -> None:
        self._session = session
        self._base_url = base_url
        self._api_key = api_key
        self._secret = api_secret.encode()

    async def public(self, method: str, path: str, **params: object) -> Answer:
        query = urlencode({k: str(v) for k, v in params.items()})
        return await self._send(method, f"{path}?{query}" if query else path, data=None, headers={})

    async def signed(self, method: str, path: str, **params: object) -> Answer:
        total = {k: str(v) for k, v in params.items()}
        total["timestamp"] = str(int(time.time() * 1000))
        payload = urlencode(total)
        signature = hmac.new(self._secret, payload.encode(), hashlib.sha256).hexdigest()
        signed = f"{payload}&signature={signature}"
        headers = {"X-MBX-APIKEY": self._api_key}
        if method == "POST":  # parameters in the body, as Binance's own connectors send them
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            return await self._send(method, path, data=signed, headers=headers)
        return await self._send(method, f"{path}?{signed}", data=None, headers=headers)

    async def control(self, method: str, path: str, body: Mapping[str, object] | None = None) -> Answer:
        async with self._session.request(method, f"{self._base_url}{path}", json=body) as response:
            return await self._answer(response)

    async def _send(self, method: str, target: str, *, data: str | None, headers: dict[str, str]) -> Answer:
        async with self._session.request(
            method, f"{self._base_url}{target}", data=data, headers=headers
        ) as response:
            return await self._answer(response)

    @staticmethod
    async def _answer(response: aiohttp.ClientResponse) -> Answer:
        text = await response.text()
        try:
            body: Any = json.loads(text)
        except json.JSONDecodeError:
            body = text
        return Answer(response.status, body, response.headers)

"""The emulator's request limits, as Bybit documents them for v5 ("Rate Limit"; the table is
`engine.venues.bybit_limits`):

* **per IP**: at most `ip_requests_per_5_seconds` requests (600) in any 5-second window, every endpoint
  together. The request over it is answered HTTP 403 "access too frequent" and the IP is banned for
  `ban_seconds` (10 minutes): every request until then gets the same 403, and each one counts.
* **per account and endpoint**: "based on the rolling time window per second and UID", each endpoint its
  own (order/create 10/s for linear by default, trading-stop 10/s, ...). The request over it is answered
  HTTP 200 with `retCode` 10006 "Too many visits!" and is not executed (nor counted). Every answer of a
  limited endpoint carries `X-Bapi-Limit` (the limit), `X-Bapi-Limit-Status` (requests left in the
  window) and `X-Bapi-Limit-Reset-Timestamp`, which Bybit defines as "the timestamp indicating when your
  request limit resets if you have exceeded your rate_limit. Otherwise, this is just the current
  timestamp": the moment the window frees its oldest request on a 10006, the answer's own time else.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from engine.venues import bybit_limits

IP_WINDOW_SECONDS = 5.0
ENDPOINT_WINDOW_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class EndpointCount:
    limit: int
    left: int
    reset_ms: int
    refused: bool


@dataclass(slots=True)
class _IpState:
    seen: deque[float] = field(default_factory=deque)
    banned_until: float = 0.0


class BybitLimiter:
    def __init__(
        self,
        *,
        ip_requests_per_5_seconds: int = bybit_limits.IP_REQUESTS_PER_5_SECONDS,
        ban_seconds: float = bybit_limits.IP_BAN_SECONDS,
        endpoint_limits: Mapping[str, int] = bybit_limits.ENDPOINT_LIMITS_PER_SECOND,
    ) -> None:
        self.ip_limit = ip_requests_per_5_seconds
        self.ban_seconds = ban_seconds
        self._endpoint_limits = dict(endpoint_limits)
        self._ips: dict[str, _IpState] = {}
        self._endpoints: dict[str, deque[float]] = {}

    def admit_ip(self, ip: str, now: float) -> float | None:
        """Count one request from `ip`; the ban's end when it is refused (banned now or by this one)."""
        state = self._ips.setdefault(ip, _IpState())
        if now < state.banned_until:
            return state.banned_until
        while state.seen and state.seen[0] <= now - IP_WINDOW_SECONDS:
            state.seen.popleft()
        if len(state.seen) >= self.ip_limit:
            return self.ban(ip, now)
        state.seen.append(now)
        return None

    def ban(self, ip: str, now: float) -> float:
        """Ban `ip` from `now` for `ban_seconds` (what a 403 means, however it came about); its end."""
        state = self._ips.setdefault(ip, _IpState())
        state.banned_until = max(state.banned_until, now + self.ban_seconds)
        state.seen.clear()
        return state.banned_until

    def banned_until(self, ip: str, now: float) -> float | None:
        state = self._ips.get(ip)
        return state.banned_until if state is not None and now < state.banned_until else None

    def ip_used(self, ip: str, now: float) -> int:
        state = self._ips.get(ip)
        if state is None:
            return 0
        return sum(1 for seen in state.seen if seen > now - IP_WINDOW_SECONDS)

    def admit_endpoint(self, path: str, now: float) -> EndpointCount | None:
        """Count one request of a limited endpoint (None: the endpoint has no per-account limit)."""
        limit = self._endpoint_limits.get(path)
        if limit is None:
            return None
        window = self._endpoints.setdefault(path, deque())
        while window and window[0] <= now - ENDPOINT_WINDOW_SECONDS:
            window.popleft()
        refused = len(window) >= limit
        if not refused:
            window.append(now)
        # A refusal's reset is rounded up: truncated, one within a millisecond of the window's end named a
        # reset at or before its own `time`, and a client that took it at its word was refused again at once.
        # Otherwise it is the current time, as the answer's own `time` is written.
        reset_ms = math.ceil((window[0] + ENDPOINT_WINDOW_SECONDS) * 1000) if refused else int(now * 1000)
        return EndpointCount(limit, max(0, limit - len(window)), reset_ms, refused)

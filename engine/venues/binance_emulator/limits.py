"""The emulator's IP request-weight limit, as Binance USDⓈ-M documents it.

developers.binance.com, USDⓈ-M Futures, "General Info" → "LIMITS" / "IP Limits":

* every request costs its endpoint's weight (`engine.venues.binance_limits`), counted per IP in fixed
  one-minute windows; each answer reports the weight used in the current minute in `X-MBX-USED-WEIGHT-1M`;
* a request over the limit is refused with HTTP 429 and a `Retry-After` header, the seconds to wait;
* "Repeatedly violating rate limits and/or failing to back off after receiving 429s will result in an
  automated IP ban (HTTP status 418)"; a 418 carries `Retry-After` too, and bans "scale in duration for
  repeat offenders, from 2 minutes to 3 days".

How the emulator reads that: a refused request adds no weight and counts as a violation; so does any
request sent while an earlier 429's Retry-After is still running (the client did not back off), even one
light enough to fit. `ban_after_violations` violations within `violation_window_seconds` ban the IP for
`ban_seconds`, doubling with each ban up to `max_ban_seconds`. While banned every request is refused with
418, public ones too, and nothing else counts. The account's order-count limit lives in the sim core; a ban
the core gives for order-count violations is imposed here too, so it refuses every request as well.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from engine.venues.sim.settings import RateLimitSettings

WINDOW_SECONDS = 60.0


class Verdict(Enum):
    SERVED = "served"
    TOO_MANY = "too_many"  # HTTP 429 -1003
    BANNED = "banned"  # HTTP 418 -1003


@dataclass(frozen=True, slots=True)
class Admission:
    verdict: Verdict
    used: int  # weight used in the current minute, after this request
    retry_after: int = 0  # whole seconds, >= 1 when refused
    banned_until: float | None = None  # BANNED only


@dataclass(slots=True)
class _IpState:
    window: int = 0  # index of the current one-minute window
    used: int = 0
    backoff_until: float = 0.0  # the Retry-After of the last 429 runs until then
    violations: deque[float] = field(default_factory=deque)
    banned_until: float = 0.0
    bans: int = 0


class RequestWeightLimiter:
    def __init__(self, limits: RateLimitSettings) -> None:
        self._limits = limits
        self._ips: dict[str, _IpState] = {}

    @property
    def limit(self) -> int:
        return self._limits.request_weight_per_minute

    def admit(self, ip: str, weight: int, now: float) -> Admission:
        """Charge one request of `weight` at `now`, or say why it is refused."""
        state = self._current(ip, now)
        if now < state.banned_until:
            return self._banned(state, now)
        if now < state.backoff_until or state.used + weight > self.limit:
            if self._violation(state, now):
                return self._banned(state, now)
            window_end = (state.window + 1) * WINDOW_SECONDS
            state.backoff_until = window_end
            return Admission(Verdict.TOO_MANY, state.used, retry_after=_whole_seconds(window_end - now))
        state.used += weight
        return Admission(Verdict.SERVED, state.used)

    def used(self, ip: str, now: float) -> int:
        return self._current(ip, now).used

    def banned_until(self, ip: str, now: float) -> float | None:
        until = self._current(ip, now).banned_until
        return until if now < until else None

    def impose_ban(self, ip: str, until: float, now: float) -> None:
        """A ban decided elsewhere (the core's, for order-count violations) refuses this IP as well."""
        state = self._current(ip, now)
        state.banned_until = max(state.banned_until, until)

    def _current(self, ip: str, now: float) -> _IpState:
        state = self._ips.setdefault(ip, _IpState())
        window = math.floor(now / WINDOW_SECONDS)
        if window != state.window:
            state.window, state.used = window, 0
        return state

    def _violation(self, state: _IpState, now: float) -> bool:
        """Record a violation; True when it earns a ban (then in force)."""
        limits = self._limits
        state.violations.append(now)
        while state.violations and state.violations[0] <= now - limits.violation_window_seconds:
            state.violations.popleft()
        if len(state.violations) < limits.ban_after_violations:
            return False
        state.banned_until = now + min(limits.ban_seconds * 2**state.bans, limits.max_ban_seconds)
        state.bans += 1
        state.violations.clear()
        return True

    @staticmethod
    def _banned(state: _IpState, now: float) -> Admission:
        return Admission(
            Verdict.BANNED,
            state.used,
            retry_after=_whole_seconds(state.banned_until - now),
            banned_until=state.banned_until,
        )


def _whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))

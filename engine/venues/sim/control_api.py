"""What the emulators' control APIs (`tsbot sim-exchange --control`) share: loopback callers only, a JSON
object for a body, and the venue clock moved forward. Each emulator keeps its own endpoints."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from aiohttp import web

MAX_ADVANCE_SECONDS = 30 * 86_400
MAX_SKEW_SECONDS = 86_400


def require_loopback(request: web.Request) -> None:
    try:
        loopback = ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise web.HTTPForbidden(text="control API: loopback callers only")


async def control_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, from a loopback caller."""
    require_loopback(request)
    try:
        body = await request.json()
    except (json.JSONDecodeError, ValueError):
        raise web.HTTPBadRequest(text="control API: body must be a JSON object") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="control API: body must be a JSON object")
    return body


def advance_seconds(body: dict[str, Any]) -> float:
    """`seconds` of a `POST /_sim/advance`: how far the venue clock moves forward."""
    try:
        seconds = float(body.get("seconds", 0))
    except (TypeError, ValueError):
        raise web.HTTPBadRequest(text="control API: seconds must be a number") from None
    if not 0 <= seconds <= MAX_ADVANCE_SECONDS:
        raise web.HTTPBadRequest(text=f"control API: seconds must be within 0..{MAX_ADVANCE_SECONDS}")
    return seconds


def skew_seconds(body: dict[str, Any]) -> float:
    """`seconds` of a `POST /_sim/skew`: the server clock's error against the real one (either way)."""
    try:
        seconds = float(body.get("seconds", 0))
    except (TypeError, ValueError):
        raise web.HTTPBadRequest(text="control API: seconds must be a number") from None
    if not -MAX_SKEW_SECONDS <= seconds <= MAX_SKEW_SECONDS:
        raise web.HTTPBadRequest(text=f"control API: skew must be within ±{MAX_SKEW_SECONDS} s")
    return seconds

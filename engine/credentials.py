"""The start-up credentials check: one signed read, so that a wrong API key or secret stops the engine with
one line instead of an engine that runs and finds every protective order refused (-1022 on each).

Only the venue's own refusal of the key counts; a venue that cannot be reached is a different failure and
passes through unchanged. Messages name the venue and quote what it said: never a key or a secret.
"""

from __future__ import annotations

from engine.exchange.errors import Rejected
from engine.exchange.port import ExchangePort

# Answers that mean "these credentials are not accepted", as the adapters translate them into `Rejected`:
# Binance -1002 unauthorized, -1022 bad signature, -2008 bad key id, -2014 key format, -2015 key/IP/
# permissions; Bybit 10003 bad key, 10004 bad signature, 10005 permission denied, 10010 IP not allowed,
# 33004 key expired; HTTP 401/403 where the venue gave no code of its own.
AUTHENTICATION_REFUSALS = frozenset(
    {-1002, -1022, -2008, -2014, -2015, 10003, 10004, 10005, 10010, 33004, 401, 403}
)


class CredentialsRefused(Exception):
    """The venue refused the configured API key or secret at start (a configuration error: exit 2)."""


async def check_credentials(
    venue: ExchangePort, *, when: str = " at start", outcome: str = "nothing was traded"
) -> None:
    """A signed read (the balance). Raises `CredentialsRefused` when the venue refuses the key; its words
    say `when` it was refused and the `outcome`."""
    try:
        await venue.fetch_balance()
    except Rejected as exc:
        if exc.code not in AUTHENTICATION_REFUSALS:
            raise
        said = exc.reason.removeprefix(f"{venue.name}: ")
        raise CredentialsRefused(
            f"venue {venue.name} refused the API key{when} (code {exc.code}: {said}): check "
            "TSBOT_VENUE__API_KEY and TSBOT_VENUE__API_SECRET (or venue.api_key_file / venue.api_secret_file); "
            f"{outcome}"
        ) from None

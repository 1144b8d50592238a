"""Whose account is this (F16): the identity every query, the reconciler, restore and the lease are scoped to.

It comes from the venue, not from the free-text `venue.account` label: two labels on one API key are one
account (the second engine is refused by the lease instead of cancelling the first one's stops), and one
database can hold several accounts without any of them restoring, closing or counting another's positions.

* ccxt venues (Binance USDⓈ-M, Bybit): the venue kind, its environment and a digest of the API key —
  `binanceusdm:3f9c…` (the key itself never leaves the process; the digest names it without revealing it).
  A venue's account is what its key trades: the same key is the same account whatever the label says.
* the sim venue lives inside the engine's process, one exchange per engine: the label is all that tells
  two of them apart, so there the identity is `sim:<label>`.

The label stays what the operator reads (`sim/default` in the header); this key is what the database uses.
"""

from __future__ import annotations

import hashlib

from engine.config import ConfigError, VenueKind, VenueSettings

KEY_DIGEST_CHARS = 16


def account_key(venue: VenueSettings) -> str:
    """The account's identity. Raises `ConfigError` (one line) for a ccxt venue without its API key: the
    digest of nothing named an account no engine trades, and `tsbot status` said none ran while one did."""
    if venue.kind is VenueKind.SIM:
        return f"sim:{venue.account}"
    api_key = venue.api_key.get_secret_value() if venue.api_key is not None else ""
    if not api_key:
        where = "testnet" if venue.testnet else "mainnet"
        raise ConfigError(
            [
                f"venue.kind {venue.kind.value!r} ({where}) needs TSBOT_VENUE__API_KEY (or venue.api_key_file) "
                "to name the account: an account is its API key's, and without it no engine, position or "
                "pause of that account can be found"
            ]
        )
    digest = hashlib.sha256(api_key.encode()).hexdigest()[:KEY_DIGEST_CHARS]
    environment = "-testnet" if venue.testnet else ""  # a testnet key and a mainnet key never share funds
    return f"{venue.kind.value}{environment}:{digest}"


__all__ = ["account_key"]


class AccountShared(Exception):
    """The venue account already holds orders of another installation of this program (another database):
    one engine per account, so the start is refused (a configuration error: exit 2)."""

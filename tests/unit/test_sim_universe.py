"""The sim universe: enough realistic perpetuals, including every symbol of the incident."""

from __future__ import annotations

import pytest

from engine.venues.sim.universe import INCIDENT_SYMBOLS, MAJOR_SYMBOLS, UNIVERSE, select_listings


def test_universe_has_at_least_40_usdt_perpetuals_with_the_incident_and_majors() -> None:
    assert len(UNIVERSE) >= 40
    assert set(INCIDENT_SYMBOLS) <= UNIVERSE.keys()
    assert set(MAJOR_SYMBOLS) <= UNIVERSE.keys()
    assert all(symbol.endswith("USDT") for symbol in UNIVERSE)


@pytest.mark.parametrize("symbol", sorted(UNIVERSE))
def test_every_listing_is_tradeable_at_its_minimum_size(symbol: str) -> None:
    listing = UNIVERSE[symbol]
    market = listing.market

    assert market.symbol == symbol
    assert market.base_asset + market.quote_asset == symbol
    assert market.is_on_tick(listing.initial_price)
    assert listing.initial_price / market.tick_size >= 100  # a tick is at most 1 % of the price
    assert 1 <= market.max_leverage <= 125
    # the minimum notional is reachable with a sane number of steps
    assert market.min_notional / (market.step_size * listing.initial_price) < 1_000_000


def test_select_listings_keeps_order_and_refuses_unknown_symbols() -> None:
    assert list(select_listings(["SUIUSDT", "BTCUSDT"])) == ["SUIUSDT", "BTCUSDT"]
    assert select_listings() == UNIVERSE
    with pytest.raises(ValueError, match="NOPEUSDT"):
        select_listings(["NOPEUSDT"])

"""What fills Binance's cap on open conditional orders, read through the real adapter, ccxt and HTTP against
the emulator: an operator's take-profit is an open algo order like our stops, so the engine must see it
where it counts the account's conditional orders before admitting a position."""

from __future__ import annotations

from decimal import Decimal

from engine.exchange.port import OrderSide, OrderType
from engine.venues.binance_emulator import BinanceEmulator, running
from engine.venues.binance_venue import BinanceUsdmVenue
from engine.venues.ccxt_venue import CcxtVenueConfig
from engine.venues.sim.settings import SimVenueSettings

KEY, SECRET = "cap-key", "cap-secret"
SYMBOL = "SFPUSDT"


async def test_an_operators_take_profit_is_listed_with_the_stops_that_share_the_cap() -> None:
    """The adapter listed STOP_MARKET and TRAILING_STOP_MARKET only: an operator's 15 take-profits left
    the engine counting 190 of 200 while the venue held 205, and the stops it then sent were refused."""
    settings = SimVenueSettings(seed=3, volatility=0.0, symbols=[SYMBOL])
    emulator = BinanceEmulator(settings, api_key=KEY, api_secret=SECRET, control=True)
    async with running(emulator) as base_url:
        config = CcxtVenueConfig(kind="binanceusdm", api_key=KEY, api_secret=SECRET, base_url=base_url)
        async with BinanceUsdmVenue(config) as venue:
            await venue.load_markets()
            mark = (await venue.fetch_mark_prices([SYMBOL]))[SYMBOL].price
            await venue.create_market_order(
                SYMBOL, OrderSide.BUY, Decimal(100), client_order_id="tsbcap-1-en0"
            )
            stop = (mark * Decimal("0.9")).quantize(Decimal("0.0001"))
            await venue.create_stop_market_order(
                SYMBOL, OrderSide.SELL, Decimal(100), stop, client_order_id="tsbcap-1-sl0"
            )
            # The operator's take-profit, placed by another client on the same account.
            target = (mark * Decimal("1.2")).quantize(Decimal("0.0001"))
            emulator.core.place_take_profit_market_order(
                SYMBOL, OrderSide.SELL, Decimal(100), target, "operator-tp-1", emulator.now()
            )

            listed = await venue.fetch_open_protective_orders()

    assert sorted((o.client_order_id, o.type, o.stop_price) for o in listed) == [
        ("operator-tp-1", OrderType.TAKE_PROFIT_MARKET, target),
        ("tsbcap-1-sl0", OrderType.STOP_MARKET, stop),
    ]

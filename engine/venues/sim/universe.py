"""The sim venue's built-in universe: USDT-margined perpetuals with realistic prices and filters.

Prices are plausible late-2025 levels; tick size, step size, minimum notional and maximum leverage follow
Binance USDⓈ-M's shape (coarse ticks on cheap coins, a 100 USDT minimum on BTC, 5 USDT on most alts),
not its exact current values. It includes every symbol of the incident wave and the majors.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from engine.exchange.port import Market

INCIDENT_SYMBOLS: tuple[str, ...] = (
    "SFPUSDT",
    "ALLUSDT",
    "DEXEUSDT",
    "TRUMPUSDT",
    "IPUSDT",
    "FLUIDUSDT",
    "BARDUSDT",
    "SXPUSDT",
    "PIPPINUSDT",
    "ZORAUSDT",
    "SUIUSDT",
    "1000RATSUSDT",
    "NMRUSDT",
    "XCNUSDT",
    "HYPERUSDT",
    "SXTUSDT",
)

MAJOR_SYMBOLS: tuple[str, ...] = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT", "DOGEUSDT")


@dataclass(frozen=True, slots=True)
class Listing:
    """A market plus the price the sim starts it at."""

    market: Market
    initial_price: Decimal


# symbol, initial price, tick size, step size, min notional, max leverage
_TABLE: tuple[tuple[str, str, str, str, str, int], ...] = (
    ("BTCUSDT", "95000.00", "0.10", "0.001", "100", 125),
    ("ETHUSDT", "3300.00", "0.01", "0.001", "20", 125),
    ("SOLUSDT", "180.00", "0.01", "0.01", "5", 100),
    ("BNBUSDT", "900.00", "0.01", "0.01", "5", 75),
    ("XRPUSDT", "2.2000", "0.0001", "0.1", "5", 75),
    ("DOGEUSDT", "0.18000", "0.00001", "1", "5", 75),
    ("ADAUSDT", "0.7000", "0.0001", "1", "5", 75),
    ("AVAXUSDT", "25.000", "0.001", "1", "5", 75),
    ("LINKUSDT", "18.000", "0.001", "0.01", "5", 75),
    ("DOTUSDT", "4.000", "0.001", "0.1", "5", 75),
    ("LTCUSDT", "100.00", "0.01", "0.001", "5", 75),
    ("TRXUSDT", "0.30000", "0.00001", "1", "5", 75),
    ("BCHUSDT", "500.00", "0.01", "0.001", "5", 75),
    ("NEARUSDT", "3.000", "0.001", "1", "5", 75),
    ("APTUSDT", "6.0000", "0.0001", "0.1", "5", 75),
    ("ARBUSDT", "0.4000", "0.0001", "0.1", "5", 75),
    ("OPUSDT", "0.7000", "0.0001", "0.1", "5", 75),
    ("TONUSDT", "3.0000", "0.0001", "0.1", "5", 50),
    ("1000PEPEUSDT", "0.0120000", "0.0000001", "1", "5", 50),
    ("WIFUSDT", "0.8000", "0.0001", "0.1", "5", 50),
    ("ENAUSDT", "0.6000", "0.0001", "1", "5", 50),
    ("INJUSDT", "14.000", "0.001", "0.1", "5", 50),
    ("FILUSDT", "2.000", "0.001", "0.1", "5", 50),
    ("ATOMUSDT", "3.500", "0.001", "0.01", "5", 50),
    ("UNIUSDT", "7.000", "0.001", "1", "5", 50),
    ("AAVEUSDT", "250.00", "0.01", "0.1", "5", 50),
    ("SEIUSDT", "0.20000", "0.00001", "1", "5", 50),
    ("TIAUSDT", "1.5000", "0.0001", "1", "5", 50),
    ("ETCUSDT", "16.000", "0.001", "0.01", "5", 75),
    ("XLMUSDT", "0.30000", "0.00001", "1", "5", 75),
    ("HBARUSDT", "0.180000", "0.000001", "1", "5", 75),
    ("ICPUSDT", "5.000", "0.001", "1", "5", 50),
    ("VETUSDT", "0.025000", "0.000001", "1", "5", 50),
    ("ALGOUSDT", "0.2000", "0.0001", "0.1", "5", 50),
    ("SANDUSDT", "0.2500", "0.0001", "1", "5", 50),
    ("MANAUSDT", "0.2800", "0.0001", "1", "5", 50),
    ("AXSUSDT", "2.500", "0.001", "1", "5", 50),
    ("GALAUSDT", "0.015000", "0.000001", "1", "5", 50),
    ("CRVUSDT", "0.600", "0.001", "0.1", "5", 50),
    ("LDOUSDT", "1.000", "0.001", "1", "5", 50),
    ("MKRUSDT", "1600.0", "0.1", "0.001", "5", 50),
    ("SNXUSDT", "0.800", "0.001", "0.1", "5", 50),
    ("RUNEUSDT", "1.200", "0.001", "1", "5", 50),
    ("STXUSDT", "0.6000", "0.0001", "1", "5", 50),
    ("IMXUSDT", "0.5000", "0.0001", "1", "5", 50),
    ("GRTUSDT", "0.07000", "0.00001", "1", "5", 50),
    ("JUPUSDT", "0.4500", "0.0001", "1", "5", 50),
    ("PYTHUSDT", "0.1200", "0.0001", "1", "5", 50),
    ("WLDUSDT", "0.9000", "0.0001", "1", "5", 50),
    ("STRKUSDT", "0.1300", "0.0001", "0.1", "5", 50),
    ("ORDIUSDT", "6.000", "0.001", "0.1", "5", 50),
    ("1000BONKUSDT", "0.0150000", "0.0000001", "1", "5", 50),
    ("FETUSDT", "0.5000", "0.0001", "1", "5", 50),
    ("RENDERUSDT", "2.500", "0.001", "0.1", "5", 50),
    ("KASUSDT", "0.060000", "0.000001", "1", "5", 50),
    ("ONDOUSDT", "0.7000", "0.0001", "0.1", "5", 50),
    ("PENDLEUSDT", "3.0000", "0.0001", "1", "5", 50),
    ("JTOUSDT", "1.2000", "0.0001", "1", "5", 50),
    ("EIGENUSDT", "1.100", "0.001", "0.1", "5", 50),
    ("ZROUSDT", "1.800", "0.001", "0.1", "5", 50),
    ("NOTUSDT", "0.0020000", "0.0000001", "1", "5", 20),
    ("DYDXUSDT", "0.5500", "0.0001", "0.1", "5", 50),
    ("GMXUSDT", "12.000", "0.001", "0.01", "5", 20),
    ("COMPUSDT", "40.00", "0.01", "0.001", "5", 50),
    ("KAVAUSDT", "0.3500", "0.0001", "0.1", "5", 25),
    ("CHZUSDT", "0.04000", "0.00001", "1", "5", 50),
    ("EGLDUSDT", "12.000", "0.001", "0.1", "5", 50),
    ("THETAUSDT", "0.6000", "0.0001", "0.1", "5", 50),
    # the incident wave
    ("SFPUSDT", "0.4500", "0.0001", "1", "5", 50),
    ("ALLUSDT", "0.4000", "0.0001", "1", "5", 25),
    ("DEXEUSDT", "10.000", "0.001", "0.01", "5", 20),
    ("TRUMPUSDT", "8.000", "0.001", "0.1", "5", 50),
    ("IPUSDT", "5.0000", "0.0001", "0.1", "5", 50),
    ("FLUIDUSDT", "6.000", "0.001", "0.01", "5", 25),
    ("BARDUSDT", "1.0000", "0.0001", "0.1", "5", 25),
    ("SXPUSDT", "0.1500", "0.0001", "0.1", "5", 50),
    ("PIPPINUSDT", "0.03000", "0.00001", "1", "5", 20),
    ("ZORAUSDT", "0.08000", "0.00001", "1", "5", 25),
    ("SUIUSDT", "2.5000", "0.0001", "0.1", "5", 75),
    ("1000RATSUSDT", "0.03000", "0.00001", "1", "5", 25),
    ("NMRUSDT", "15.000", "0.001", "0.01", "5", 25),
    ("XCNUSDT", "0.010000", "0.000001", "1", "5", 20),
    ("HYPERUSDT", "0.2000", "0.0001", "1", "5", 25),
    ("SXTUSDT", "0.06000", "0.00001", "1", "5", 25),
)


def _listing(row: tuple[str, str, str, str, str, int]) -> Listing:
    symbol, price, tick, step, min_notional, max_leverage = row
    market = Market(
        symbol=symbol,
        base_asset=symbol.removesuffix("USDT"),
        quote_asset="USDT",
        tick_size=Decimal(tick),
        step_size=Decimal(step),
        min_quantity=Decimal(step),
        min_notional=Decimal(min_notional),
        max_leverage=max_leverage,
    )
    return Listing(market=market, initial_price=Decimal(price))


UNIVERSE: dict[str, Listing] = {row[0]: _listing(row) for row in _TABLE}


def synthetic_listings(count: int) -> dict[str, Listing]:
    """`count` made-up perpetuals `SYN001USDT`, `SYN002USDT` …, each a copy of a real listing's price,
    tick, step, minimum notional and leverage (cycling through the table): for benches and drills that need
    more symbols than the real universe has (the engine holds one position per symbol)."""
    real = list(UNIVERSE.values())
    listings = {}
    for i in range(count):
        shape = real[i % len(real)]
        symbol = f"SYN{i + 1:03d}USDT"
        market = Market(
            symbol=symbol,
            base_asset=symbol.removesuffix("USDT"),
            quote_asset="USDT",
            tick_size=shape.market.tick_size,
            step_size=shape.market.step_size,
            min_quantity=shape.market.min_quantity,
            min_notional=shape.market.min_notional,
            max_leverage=shape.market.max_leverage,
        )
        listings[symbol] = Listing(market=market, initial_price=shape.initial_price)
    return listings


def select_listings(symbols: list[str] | tuple[str, ...] = (), synthetic: int = 0) -> dict[str, Listing]:
    """The listings for `symbols`, in the given order (the whole universe when empty), plus `synthetic`
    made-up ones (`synthetic_listings`)."""
    if not symbols:
        return {**UNIVERSE, **synthetic_listings(synthetic)}
    unknown = [symbol for symbol in symbols if symbol not in UNIVERSE]
    if unknown:
        raise ValueError(f"symbols not in the sim universe: {', '.join(unknown)}")
    return {**{symbol: UNIVERSE[symbol] for symbol in symbols}, **synthetic_listings(synthetic)}

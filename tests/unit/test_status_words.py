"""What `tsbot status` says an entry of unknown outcome lacks, venue by venue."""

from __future__ import annotations

from pathlib import Path

from engine.cli import _missing_of_unknown_entry
from engine.config import load_config


def test_an_unknown_entry_on_bybit_lacks_its_trailing_stop_not_its_hard_stop(tmp_path: Path) -> None:
    """After a kill -9 on the Bybit emulator, status listed every entry of unknown outcome as "missing both"
    while the venue held each position's hard stop: on Bybit the entry carries it (an operator's find)."""
    keys = {"TSBOT_VENUE__API_KEY": "k", "TSBOT_VENUE__API_SECRET": "s"}
    bybit = load_config(None, environ={**keys, "TSBOT_VENUE__KIND": "bybit"}, cwd=tmp_path)
    binance = load_config(None, environ={**keys, "TSBOT_VENUE__KIND": "binanceusdm"}, cwd=tmp_path)
    assert _missing_of_unknown_entry(bybit) == (
        "trailing stop (the entry's outcome is unknown: it may have filled, with the hard stop it carried)"
    )
    assert _missing_of_unknown_entry(binance) == "both (the entry's outcome is unknown: it may have filled)"


def test_the_exit_line_counts_one_position_in_the_singular() -> None:
    """An operator's exit line read "stopped: 1 open positions keep their stops on the exchange"."""
    from engine.engine import StopReport

    one = StopReport(open_positions=1, uncovered=0)
    assert one.describe() == "1 open position keeps its stops on the exchange; uncovered 0"
    two = StopReport(open_positions=2, uncovered=1, uncovered_symbols=("SFPUSDT",), unresolved_entries=1)
    assert two.describe() == (
        "2 open positions: 1 keeps its stops on the exchange; UNCOVERED 2 (SFPUSDT), "
        "1 entry of unknown outcome"
    )

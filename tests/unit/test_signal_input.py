"""Signal validation shared by the CLI and the engine."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from engine.signal_input import BadSignal, read_jsonl, signal_from_fields


def test_fields_are_normalised() -> None:
    signal = signal_from_fields(" sfpusdt ", "Short", "0.5", 17)
    assert (signal.symbol, signal.side, signal.score, signal.external_id) == (
        "SFPUSDT",
        "short",
        Decimal("0.5"),
        "17",
    )


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        (("", "long"), "symbol must be a non-empty string"),
        ((None, "long"), "symbol must be a non-empty string"),
        (("SFP-USDT", "long"), "symbol must be exchange-native"),
        (("SFPUSDT", "buy"), "side must be long or short, got 'buy'"),
        (("SFPUSDT", 1), "side must be long or short, got 1"),
        (("SFPUSDT", "long", "NaN"), "score must be a finite number"),
        (("SFPUSDT", "long", "Infinity"), "score must be a finite number"),
        (("SFPUSDT", "long", True), "score must be a finite number"),
        (("SFPUSDT", "long", None, ""), "id must be a non-empty string"),
        (("SFPUSDT", "long", None, "x" * 129), "id must be at most 128 characters"),
    ],
)
def test_bad_fields_give_a_reason(fields: tuple, reason: str) -> None:
    with pytest.raises(BadSignal) as caught:
        signal_from_fields(*fields)
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("not json\n", ":1: not JSON"),
        ("[1, 2]\n", ":1: expected an object"),
        ('{"symbol": "A", "side": "long", "size": 3}\n', ":1: unknown key 'size'"),
        (
            '{"symbol": "A", "side": "long", "id": "x"}\n{"symbol": "B", "side": "long", "id": "x"}\n',
            ":2: id 'x' already used on line 1",
        ),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text(content)
    with pytest.raises(BadSignal) as caught:
        read_jsonl(path)
    assert str(caught.value).startswith(str(path))
    assert reason in str(caught.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(BadSignal, match="cannot read"):
        read_jsonl(tmp_path / "absent.jsonl")

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
        ('{"symbol": "SFPUSDT", "side": "long", "symbol": "BTCUSDT"}\n', ":1: key 'symbol' given twice"),
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


# --- hostile input (issue 14): refused with a short reason, never passed on to the database -------------


@pytest.mark.parametrize(
    "score",
    [
        "1e1000000",
        "1e-16384",
        "1e13",
        "-1e13",
        "0.0000000000000000000000000000001",
        pytest.param(10**5000, id="5000-digits"),
    ],
)
def test_scores_outside_what_numeric_holds_sanely_are_refused(score: object) -> None:
    with pytest.raises(BadSignal) as caught:
        signal_from_fields("SFPUSDT", "long", score)
    assert str(caught.value).startswith(
        "score must be a finite number between -1e12 and 1e12 with at most 30 digits after the point, got "
    )
    assert len(str(caught.value)) < 200


@pytest.mark.parametrize(
    ("score", "stored"),
    [
        ("1." + "0" * 20_000, Decimal(1)),  # the same number, without a scale numeric would refuse
        ("0E-100000", Decimal(0)),
        ("0.7234567891234567", Decimal("0.7234567891234567")),
        ("-1e12", Decimal("-1e12")),
    ],
)
def test_scores_keep_their_value_and_lose_only_trailing_zeros(score: str, stored: Decimal) -> None:
    value = signal_from_fields("SFPUSDT", "long", score).score
    assert value == stored
    assert value.as_tuple().exponent >= -30  # type: ignore[union-attr, operator]


@pytest.mark.parametrize(
    ("external_id", "reason"),
    [
        ("\udcff", "id must be valid UTF-8 text, got '\\udcff'"),
        ("a\x00b", "id must be printable text (no NUL, line breaks or control characters), got 'a\\x00b'"),
        ("line\nbreak", "id must be printable text"),
        pytest.param(10**5000, "id must be at most 128 characters", id="5000-digits"),
    ],
)
def test_ids_postgresql_cannot_store_are_refused(external_id: object, reason: str) -> None:
    with pytest.raises(BadSignal) as caught:
        signal_from_fields("SFPUSDT", "long", None, external_id)
    assert str(caught.value).startswith(reason)


def test_a_huge_symbol_is_refused_and_quoted_short() -> None:
    with pytest.raises(BadSignal) as caught:
        signal_from_fields("Z" * 1_000_000, "long")
    assert str(caught.value).startswith("symbol must be exchange-native letters and digits")
    assert str(caught.value).endswith("(1,000,000 characters)")
    assert len(str(caught.value)) < 200


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"symbol": "SFPUSDT", "side": "long", "id": "a\\u0000b"}\n', ":1: id must be printable text"),
        (b'{"symbol": "SFPUSDT", "side": "long", "id": "\\ud800"}\n', ":1: id must be valid UTF-8 text"),
        (
            b'{"symbol": "SFPUSDT", "side": "long", "score": ' + b"9" * 4301 + b"}\n",
            ":1: not JSON this program reads: a number of more than 4 300 digits",
        ),
        (b"[" * 100_000 + b"]" * 100_000 + b"\n", ":1: not JSON this program reads: nested too deeply"),
        (
            '{"symbol": "SFPUSDT", "side": "long"}\n'.encode("utf-16"),
            ":1: not UTF-8 text (byte 0xff at offset 0): save it as UTF-8",
        ),
        (
            b'{"symbol": "SFPUSDT", "side": "long"}\n{"symbol": "ALLUSDT", "side": "long", "id": "caf\xe9"}\n',
            ":2: not UTF-8 text (byte 0xe9 at offset ",
        ),
    ],
)
def test_hostile_import_files_name_file_and_line(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(content)
    with pytest.raises(BadSignal) as caught:
        read_jsonl(path)
    assert str(caught.value).startswith(f"{path}{reason}")
    assert "\n" not in str(caught.value)
    assert len(str(caught.value)) < 300


def test_line_separators_inside_json_strings_do_not_split_a_line(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('\ufeff{"symbol": "SFPUSDT", "side": "long", "id": "a\u2028b"}\n', encoding="utf-8")
    with pytest.raises(BadSignal, match=r":1: id must be printable text"):
        read_jsonl(path)
    path.write_text('\ufeff{"symbol": "SFPUSDT", "side": "long", "id": "a\u00e9b"}\r\n', encoding="utf-8")
    [signal] = read_jsonl(path)
    assert signal.external_id == "a\u00e9b"


def test_every_bad_line_of_a_file_is_named_and_numbers_are_shown_as_written(tmp_path: Path) -> None:
    """An operator's file with three bad lines was refused naming one of them, and a score read back as
    Python's repr (`got Decimal('1E+400')`): each bad line is named, in one line, and a number is quoted as
    written."""
    path = tmp_path / "sig.jsonl"
    path.write_text(
        '{"symbol": "SFPUSDT", "side": "long"}\n'
        '{"symbol": "BTCUSDT", "side": "sideways"}\n'
        "not json\n"
        '{"symbol": "ETHUSDT", "side": "long", "score": 1e400}\n'
    )
    with pytest.raises(BadSignal) as refused:
        read_jsonl(path)
    said = str(refused.value)
    assert "\n" not in said
    assert said.startswith(f"{path}:2: side must be long or short, got 'sideways'; {path}:3: not JSON: ")
    assert said.endswith(
        f"; {path}:4: score must be a finite number between -1e12 and 1e12 with at most 30 digits after the point, got 1E+400"
    )

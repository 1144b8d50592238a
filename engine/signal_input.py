"""Signals as operators and other programs hand them in: validation shared by `tsbot signals` and the
engine (which re-checks rows that any process may have inserted into `monitoring.signals`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

SIDES = ("long", "short")
MAX_EXTERNAL_ID_LENGTH = 128
MAX_SYMBOL_LENGTH = 32
# A score is a ranking figure, not an amount: bounded so that every accepted value fits `numeric` (asyncpg
# refuses exponents beyond ±16 383, PostgreSQL digits beyond 131 072) and reads back exactly.
MAX_SCORE = Decimal(10) ** 12
MAX_SCORE_PLACES = 30
MAX_IMPORT_BYTES = 64 * 1024 * 1024
SHOWN_CHARS = 60


class BadSignal(ValueError):
    """A signal that cannot be taken; the message is the reason recorded or shown."""


@dataclass(frozen=True, slots=True)
class SignalInput:
    symbol: str
    side: str
    score: Decimal | None = None
    external_id: str | None = None


def shown(value: Any) -> str:
    """`value` as a message quotes it: its repr (escaped, one line), cut to a few dozen characters."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"a number of {len(str(abs(value))) if value.bit_length() < 14_000 else 'over 4 300'} digits"
    # A number as written (Decimal('1E+400') leaked Python's repr into an operator's message).
    text = str(value) if isinstance(value, Decimal) else repr(value)
    if len(text) <= SHOWN_CHARS:
        return text
    size = f"{len(value):,} characters" if isinstance(value, str) else f"{len(text):,} characters"
    return f"{text[:SHOWN_CHARS]}… ({size})"


def normalise_symbol(symbol: Any) -> str:
    if not isinstance(symbol, str) or not symbol.strip():
        raise BadSignal(f"symbol must be a non-empty string, got {shown(symbol)}")
    cleaned = symbol.strip().upper()
    if not cleaned.isalnum() or len(cleaned) > MAX_SYMBOL_LENGTH:
        raise BadSignal(
            f"symbol must be exchange-native letters and digits (e.g. SFPUSDT, at most {MAX_SYMBOL_LENGTH}), "
            f"got {shown(symbol)}"
        )
    return cleaned


def parse_side(side: Any) -> str:
    if not isinstance(side, str) or side.strip().lower() not in SIDES:
        raise BadSignal(f"side must be long or short, got {shown(side)}")
    return side.strip().lower()


def parse_score(score: Any) -> Decimal | None:
    if score is None:
        return None
    expected = (
        f"score must be a finite number between -{MAX_SCORE:.0e} and {MAX_SCORE:.0e} "
        f"with at most {MAX_SCORE_PLACES} digits after the point"
    ).replace("e+", "e")
    if isinstance(score, bool) or not isinstance(score, str | int | float | Decimal):
        raise BadSignal(f"{expected}, got {shown(score)}")
    try:
        value = score if isinstance(score, Decimal) else Decimal(str(score).strip())
    except (InvalidOperation, ValueError):
        raise BadSignal(f"{expected}, got {shown(score)}") from None
    if not value.is_finite() or value.copy_abs() > MAX_SCORE:
        raise BadSignal(f"{expected}, got {shown(score)}")
    value = _without_trailing_zeros(value)
    if value.as_tuple().exponent < -MAX_SCORE_PLACES:  # type: ignore[operator]  # finite: an int
        raise BadSignal(f"{expected}, got {shown(score)}")
    return value


def _without_trailing_zeros(value: Decimal) -> Decimal:
    """1.5000 → 1.5 and 0E-100000 → 0, without rounding (what is left is exactly the same number): a
    value written with 20 000 zeros after the point must not reach `numeric` with that scale."""
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite
    if not any(digits):
        return Decimal(0)
    if exponent >= 0 or digits[-1] != 0:
        return value
    significant = "".join(map(str, digits)).rstrip("0")
    trailing = min(len(digits) - len(significant), -exponent)
    return Decimal((sign, digits[: len(digits) - trailing], exponent + trailing))


def parse_external_id(external_id: Any) -> str | None:
    if external_id is None:
        return None
    if not isinstance(external_id, str | int) or isinstance(external_id, bool) or external_id == "":
        raise BadSignal(f"id must be a non-empty string, got {shown(external_id)}")
    if isinstance(external_id, int) and external_id.bit_length() > 4 * MAX_EXTERNAL_ID_LENGTH:
        raise BadSignal(f"id must be at most {MAX_EXTERNAL_ID_LENGTH} characters, got {shown(external_id)}")
    text = str(external_id)
    if len(text) > MAX_EXTERNAL_ID_LENGTH:
        raise BadSignal(f"id must be at most {MAX_EXTERNAL_ID_LENGTH} characters, got {len(text)}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadSignal(f"id must be valid UTF-8 text, got {shown(text)}") from None
    if not text.isprintable():
        raise BadSignal(
            f"id must be printable text (no NUL, line breaks or control characters), got {shown(text)}"
        )
    return text


def signal_from_fields(symbol: Any, side: Any, score: Any = None, external_id: Any = None) -> SignalInput:
    return SignalInput(
        symbol=normalise_symbol(symbol),
        side=parse_side(side),
        score=parse_score(score),
        external_id=parse_external_id(external_id),
    )


_JSONL_KEYS = {"symbol", "side", "score", "id"}


class _KeyTwice(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: `{"symbol": "A", "symbol": "B"}` is nonsense, refused,
    not read as its last value."""
    item: dict[str, Any] = {}
    for key, value in pairs:
        if key in item:
            raise _KeyTwice(key)
        item[key] = value
    return item


def read_jsonl(path: Path) -> list[SignalInput]:
    """Parse a JSON-lines file of {"symbol", "side", "score"?, "id"?}; any bad line fails the whole file
    (`BadSignal` naming file and line), so an import is all or nothing."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_IMPORT_BYTES + 1)
    except OSError as exc:
        raise BadSignal(f"{path}: cannot read: {exc.strerror}") from None
    if len(data) > MAX_IMPORT_BYTES:
        raise BadSignal(
            f"{path}: more than {MAX_IMPORT_BYTES // (1024 * 1024)} MiB: split it into several files"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise BadSignal(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): save it as UTF-8"
        ) from None
    signals = []
    bad: list[str] = []  # every bad line is said (up to BAD_LINES_SAID), not only the first
    seen_ids: dict[str, int] = {}
    # Lines end at "\n" only: JSON strings may hold U+2028 and friends, which splitlines() would break at.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            signal = _signal_of_line(line, f"{path}:{number}", seen_ids, number)
        except BadSignal as exc:
            bad.append(str(exc))
            continue
        signals.append(signal)
    if bad:
        more = f"; and {len(bad) - BAD_LINES_SAID} more bad lines" if len(bad) > BAD_LINES_SAID else ""
        raise BadSignal("; ".join(bad[:BAD_LINES_SAID]) + more)
    return signals


BAD_LINES_SAID = 10


def _signal_of_line(line: str, where: str, seen_ids: dict[str, int], number: int) -> SignalInput:
    """One line of a JSON-lines file as a signal, or `BadSignal` naming it (`where`)."""
    try:
        item = json.loads(line, parse_float=Decimal, object_pairs_hook=_once_each)
    except _KeyTwice as twice:
        raise BadSignal(f"{where}: key {twice.key!r} given twice") from None
    except json.JSONDecodeError as exc:
        raise BadSignal(f"{where}: not JSON: {exc.msg}") from None
    except RecursionError:
        raise BadSignal(f"{where}: not JSON this program reads: nested too deeply") from None
    except ValueError:  # an integer of more than 4 300 digits
        raise BadSignal(f"{where}: not JSON this program reads: a number of more than 4 300 digits") from None
    if not isinstance(item, dict):
        raise BadSignal(f'{where}: expected an object like {{"symbol": "SFPUSDT", "side": "long"}}')
    unknown = sorted(set(item) - _JSONL_KEYS)
    if unknown:
        raise BadSignal(f"{where}: unknown key {unknown[0]!r}: expected symbol, side, score, id")
    try:
        signal = signal_from_fields(item.get("symbol"), item.get("side"), item.get("score"), item.get("id"))
    except BadSignal as exc:
        raise BadSignal(f"{where}: {exc}") from None
    if signal.external_id is not None:
        if signal.external_id in seen_ids:
            raise BadSignal(
                f"{where}: id {signal.external_id!r} already used on line {seen_ids[signal.external_id]}"
            )
        seen_ids[signal.external_id] = number
    return signal

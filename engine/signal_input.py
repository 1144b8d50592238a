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


class BadSignal(ValueError):
    """A signal that cannot be taken; the message is the reason recorded or shown."""


@dataclass(frozen=True, slots=True)
class SignalInput:
    symbol: str
    side: str
    score: Decimal | None = None
    external_id: str | None = None


def normalise_symbol(symbol: Any) -> str:
    if not isinstance(symbol, str) or not symbol.strip():
        raise BadSignal(f"symbol must be a non-empty string, got {symbol!r}")
    cleaned = symbol.strip().upper()
    if not cleaned.isalnum():
        raise BadSignal(f"symbol must be exchange-native letters and digits (e.g. SFPUSDT), got {symbol!r}")
    return cleaned


def parse_side(side: Any) -> str:
    if not isinstance(side, str) or side.strip().lower() not in SIDES:
        raise BadSignal(f"side must be long or short, got {side!r}")
    return side.strip().lower()


def parse_score(score: Any) -> Decimal | None:
    if score is None:
        return None
    if isinstance(score, bool):
        raise BadSignal(f"score must be a finite number, got {score!r}")
    try:
        value = Decimal(str(score))
    except InvalidOperation:
        raise BadSignal(f"score must be a finite number, got {score!r}") from None
    if not value.is_finite():
        raise BadSignal(f"score must be a finite number, got {score!r}")
    return value


def parse_external_id(external_id: Any) -> str | None:
    if external_id is None:
        return None
    if not isinstance(external_id, str | int) or isinstance(external_id, bool) or str(external_id) == "":
        raise BadSignal(f"id must be a non-empty string, got {external_id!r}")
    text = str(external_id)
    if len(text) > MAX_EXTERNAL_ID_LENGTH:
        raise BadSignal(f"id must be at most {MAX_EXTERNAL_ID_LENGTH} characters, got {len(text)}")
    return text


def signal_from_fields(symbol: Any, side: Any, score: Any = None, external_id: Any = None) -> SignalInput:
    return SignalInput(
        symbol=normalise_symbol(symbol),
        side=parse_side(side),
        score=parse_score(score),
        external_id=parse_external_id(external_id),
    )


_JSONL_KEYS = {"symbol", "side", "score", "id"}


def read_jsonl(path: Path) -> list[SignalInput]:
    """Parse a JSON-lines file of {"symbol", "side", "score"?, "id"?}; any bad line fails the whole file
    (`BadSignal` naming file and line), so an import is all or nothing."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BadSignal(f"{path}: cannot read: {exc.strerror}") from None
    signals = []
    seen_ids: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line, parse_float=Decimal)
        except json.JSONDecodeError as exc:
            raise BadSignal(f"{where}: not JSON: {exc.msg}") from None
        if not isinstance(item, dict):
            raise BadSignal(f'{where}: expected an object like {{"symbol": "SFPUSDT", "side": "long"}}')
        unknown = sorted(set(item) - _JSONL_KEYS)
        if unknown:
            raise BadSignal(f"{where}: unknown key {unknown[0]!r}: expected symbol, side, score, id")
        try:
            signal = signal_from_fields(
                item.get("symbol"), item.get("side"), item.get("score"), item.get("id")
            )
        except BadSignal as exc:
            raise BadSignal(f"{where}: {exc}") from None
        if signal.external_id is not None:
            if signal.external_id in seen_ids:
                raise BadSignal(
                    f"{where}: id {signal.external_id!r} already used on line {seen_ids[signal.external_id]}"
                )
            seen_ids[signal.external_id] = number
        signals.append(signal)
    return signals

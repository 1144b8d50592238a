"""Coverage from confirmed facts: a pure function of per-position facts and the time.

A position is *covered* when the exchange confirmed its hard stop and its trailing stop is confirmed
(a native order live, or a managed trail persisted and armed). A position younger than the grace period
and not yet covered is *protecting*, not uncovered. The TS/SL percentages use the same population and
rounding as the operators' SQL (active positions, ROUND(…, 1)), so the gauge and the SQL agree.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal


@dataclass(frozen=True, slots=True)
class PositionCoverage:
    position_id: int
    symbol: str
    has_stop_loss: bool
    has_trailing_stop: bool
    filled_at: float  # monotonic seconds when the entry filled (or the position was adopted/restored)
    unprotected_since: float | None  # monotonic seconds since when it lacks a confirmed stop; None: covered

    @property
    def covered(self) -> bool:
        return self.has_stop_loss and self.has_trailing_stop


@dataclass(frozen=True, slots=True)
class CoverageFigures:
    active: int
    protected: int
    protecting: int  # uncovered but within grace
    uncovered: int  # uncovered past grace
    with_stop_loss: int
    with_trailing_stop: int
    oldest_unprotected_seconds: float | None  # among uncovered past grace
    lasting: int  # of the uncovered, those without their stops for a grace period or more
    ts_coverage_pct: Decimal | None
    sl_coverage_pct: Decimal | None
    uncovered_ids: tuple[int, ...]
    # Of those within grace (`protecting`), how many have that stop confirmed already: the health rule
    # judges coverage over the positions past grace only (a wave being protected is no alarm).
    protecting_with_stop_loss: int = 0
    protecting_with_trailing_stop: int = 0
    oldest_unprotected_symbol: str = ""  # the symbol of the oldest uncovered past grace
    # Of the uncovered past grace, those without their stops for less than a grace period (`uncovered` less
    # `lasting`: a stop-out settling, a stop being put back), with that stop confirmed: shown uncovered at
    # once, judged by the health rule once that lasts a grace period, as the breaker and the alerts judge.
    brief_with_stop_loss: int = 0
    brief_with_trailing_stop: int = 0


def percent(part: int, whole: int) -> Decimal | None:
    if whole == 0:
        return None
    return (Decimal(100) * part / whole).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)


def coverage_figures(
    positions: Iterable[PositionCoverage], now: float, grace_seconds: float
) -> CoverageFigures:
    active = protected = protecting = with_sl = with_ts = lasting = protecting_sl = protecting_ts = 0
    brief_sl = brief_ts = 0
    uncovered_ids: list[int] = []
    oldest: float | None = None
    oldest_symbol = ""
    for position in positions:
        active += 1
        with_sl += position.has_stop_loss
        with_ts += position.has_trailing_stop
        if position.covered:
            protected += 1
            continue
        since = position.unprotected_since if position.unprotected_since is not None else position.filled_at
        # A loss first seen after `now` was taken (the facts are read after it) is 0 s old, not negative.
        age = max(0.0, now - since)
        if now - position.filled_at < grace_seconds:
            protecting += 1
            protecting_sl += position.has_stop_loss
            protecting_ts += position.has_trailing_stop
            continue
        uncovered_ids.append(position.position_id)
        if oldest is None or age > oldest:
            oldest, oldest_symbol = age, position.symbol
        if age >= grace_seconds:
            lasting += 1
        else:
            brief_sl += position.has_stop_loss
            brief_ts += position.has_trailing_stop
    return CoverageFigures(
        active=active,
        protected=protected,
        protecting=protecting,
        uncovered=len(uncovered_ids),
        with_stop_loss=with_sl,
        with_trailing_stop=with_ts,
        oldest_unprotected_seconds=oldest,
        lasting=lasting,
        ts_coverage_pct=percent(with_ts, active),
        sl_coverage_pct=percent(with_sl, active),
        uncovered_ids=tuple(sorted(uncovered_ids)),
        protecting_with_stop_loss=protecting_sl,
        protecting_with_trailing_stop=protecting_ts,
        oldest_unprotected_symbol=oldest_symbol,
        brief_with_stop_loss=brief_sl,
        brief_with_trailing_stop=brief_ts,
    )


def kept_fact(
    previous: PositionCoverage | None,
    position_id: int,
    symbol: str,
    has_stop_loss: bool,
    has_trailing_stop: bool,
    filled_at: float,
    unprotected_since: float | None,
) -> PositionCoverage:
    """A position's coverage fact: `previous` itself while every field is the same, else a new one. Every
    dashboard frame asks every position for its fact, and making 1 000 anew was most of the snapshot's cost
    (bench/tui_render.py); the same objects also let `rows_by_position` keep the rows as they were."""
    if (
        previous is not None
        and previous.position_id == position_id
        and previous.has_stop_loss == has_stop_loss
        and previous.has_trailing_stop == has_trailing_stop
        and previous.filled_at == filled_at
        and previous.unprotected_since == unprotected_since
        and previous.symbol == symbol
    ):
        return previous
    return PositionCoverage(
        position_id, symbol, has_stop_loss, has_trailing_stop, filled_at, unprotected_since
    )


def rows_by_position(
    facts: Iterable[PositionCoverage], previous: tuple[PositionCoverage, ...]
) -> tuple[PositionCoverage, ...]:
    """The facts in position-id order; `previous` itself when it holds the very same fact objects (a
    guard gives its fact again while nothing changed), so what a reader derived from the last rows (the
    dashboard's order of 1 000 rows) can be kept by identity rather than computed again."""
    rows: Sequence[PositionCoverage] = sorted(facts, key=_position_id)
    if len(rows) == len(previous) and all(map(operator.is_, rows, previous)):
        return previous
    return tuple(rows)


def _position_id(fact: PositionCoverage) -> int:
    return fact.position_id

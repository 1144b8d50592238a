"""The invariant auditor judged on hand-built timelines: each rule fires on its violation and stays quiet
on the legal sequence next to it (a checker that cannot fail is a defect), and the figures add up."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal

import pytest

from storage.repositories import OrderPurpose
from tests.support.auditor import (
    AuditLimits,
    DbPosition,
    DbView,
    InvariantAuditor,
    Rule,
    SeenPosition,
    SeenStop,
    VenueView,
)

TOKEN = "abc123"
LIMITS = AuditLimits(grace_seconds=5.0, reconcile_seconds=10.0, reconcile_slack_seconds=2.0)
QTY = Decimal("12")


def cid(position_id: int, purpose: str, generation: int = 0, token: str = TOKEN) -> str:
    return f"tsb{token}-{position_id}-{purpose}{generation}"


def long(symbol: str = "SFPUSDT", quantity: Decimal = QTY) -> SeenPosition:
    return SeenPosition(symbol, "long", quantity)


def stop(
    position_id: int = 1,
    purpose: str = "sl",
    symbol: str = "SFPUSDT",
    *,
    side: str = "sell",
    quantity: Decimal = QTY,
    generation: int = 0,
    token: str = TOKEN,
) -> SeenStop:
    kind = "stop_market" if purpose == "sl" else "trailing_stop_market"
    return SeenStop(symbol, cid(position_id, purpose, generation, token), side, quantity, kind)


def view(positions: Iterable[SeenPosition] = (), stops: Iterable[SeenStop] = (), triggering=()) -> VenueView:
    return VenueView(tuple(positions), tuple(stops), tuple(triggering))


def covered(position_id: int = 1, symbol: str = "SFPUSDT") -> VenueView:
    return view([long(symbol)], [stop(position_id, "sl", symbol), stop(position_id, "ts", symbol)])


def row(
    position_id: int = 1,
    symbol: str = "SFPUSDT",
    *,
    status: str = "active",
    has_sl: bool = True,
    has_ts: bool = True,
    side: str = "long",
) -> DbPosition:
    return DbPosition(
        position_id,
        symbol,
        side,
        QTY,
        status,
        has_sl,
        has_ts,
        frozenset({cid(position_id, "sl")}),
        frozenset({cid(position_id, "ts")}),
    )


def db(*rows: DbPosition) -> DbView:
    return DbView(tuple(rows))


def auditor(*, up: bool = True, limits: AuditLimits = LIMITS) -> InvariantAuditor:
    return InvariantAuditor(None, None, limits, token=TOKEN, engine_up=up)


def play(audit: InvariantAuditor, timeline: Iterable[tuple[float, VenueView, DbView | None]]) -> None:
    for at, venue, database in timeline:
        audit.observe(at, venue, database)


def every(start: float, stop_at: float, step: float = 0.5) -> list[float]:
    out, t = [], start
    while t <= stop_at + 1e-9:
        out.append(round(t, 6))
        t += step
    return out


def rules(audit: InvariantAuditor) -> list[Rule]:
    return [v.rule for v in audit.violations]


# ------------------------------------------------------------------------------------------- uncovered


def test_a_position_protected_within_grace_is_clean_and_its_figures_add_up() -> None:
    audit = auditor()
    bare = view([long()])
    play(audit, [(t, bare if t < 1.0 else covered(), db(row())) for t in every(0, 10)])
    audit.assert_clean()
    figures = audit.figures()
    assert figures.positions == 1
    assert figures.open_seconds == pytest.approx(10.0)
    assert figures.protected_seconds == pytest.approx(9.0)
    assert figures.time_weighted_coverage_pct == pytest.approx(90.0)
    assert figures.worst_unprotected_s == pytest.approx(1.0)
    assert figures.worst_unprotected_symbol == "SFPUSDT"


def test_a_position_without_its_trailing_stop_past_grace_is_uncovered() -> None:
    audit = auditor()
    half = view([long()], [stop(1, "sl")])
    play(audit, [(t, half, None) for t in every(0, 5)])
    assert audit.violations == []  # exactly grace: not yet
    play(audit, [(5.5, half, None), (6.0, covered(), None)])
    [violation] = audit.violations
    assert (violation.rule, violation.symbol, violation.started_at, violation.detected_at) == (
        Rule.UNCOVERED,
        "SFPUSDT",
        0.0,
        5.5,
    )
    assert "trailing stop" in violation.detail
    assert "hard stop" not in violation.detail
    assert violation.ended_at == 6.0
    assert violation.duration(6.0) == pytest.approx(6.0)
    with pytest.raises(AssertionError, match=r"\[uncovered\] SFPUSDT from t=0.00s for 6.00s"):
        audit.assert_clean()


def test_unprotected_seconds_are_split_by_why() -> None:
    """Opening (first stops on their way, within grace), fired (the venue filling a TRIGGERING stop) and
    other (a stop gone and not replaced): only the last is the engine's to answer for."""
    audit = auditor()
    bare = view([long()])
    fired = view([long()], [stop(1, "ts")], triggering=[stop(1, "sl")])
    lost = view([long()], [stop(1, "ts")])

    def at(t: float) -> VenueView:
        if t < 1.0:
            return bare  # opening: 1 s
        if t < 4.0:
            return covered()  # 3 s protected
        if t < 6.0:
            return fired  # 2 s fired
        if t < 7.5:
            return covered()  # 1.5 s protected
        return lost  # 2.5 s other (t 7.5 .. 10)

    play(audit, [(t, at(t), None) for t in every(0, 10)])
    figures = audit.figures()
    assert figures.unprotected_seconds_by_cause == pytest.approx({"opening": 1.0, "fired": 2.0, "other": 2.5})
    assert figures.open_seconds - figures.protected_seconds == pytest.approx(5.5)
    assert figures.as_dict()["unprotected_seconds_by_cause"] == {"fired": 2.0, "opening": 1.0, "other": 2.5}


def test_a_new_positions_wait_for_its_stops_during_a_ban_is_counted_apart() -> None:
    """A position filled just before a ban: its first stops cannot be placed before the ban ends. Still
    uncovered time, told apart from the opening the engine's own pace decides; and each position's share
    of it is kept, one long wait told apart from a little on many positions."""
    audit = auditor()
    bare = view([long()])
    banned = VenueView(bare.positions, bare.open_stops, bare.triggering, banned=True)

    def at(t: float) -> VenueView:
        if t < 0.5:
            return bare  # 0.5 s opening
        return banned if t < 2.5 else covered()  # 2 s opening during the ban, then protected

    play(audit, [(t, at(t), None) for t in every(0, 5)])
    figures = audit.figures()
    assert figures.unprotected_seconds_by_cause == pytest.approx({"opening": 0.5, "opening_banned": 2.0})
    assert figures.protected_seconds == pytest.approx(2.5)
    assert audit.unprotected_per_position("opening_banned") == pytest.approx([2.0])
    assert audit.unprotected_per_position("fired") == [0.0]


def test_a_fired_stop_during_a_ban_is_counted_apart() -> None:
    """A stop stuck TRIGGERING while the venue bans the engine: its close at market waits for the ban's
    end. Still uncovered time, told apart from the fired time the engine could have shortened."""
    audit = auditor()
    fired = view([long()], [stop(1, "ts")], triggering=[stop(1, "sl")])
    banned = VenueView(fired.positions, fired.open_stops, fired.triggering, banned=True)

    def at(t: float) -> VenueView:
        if t < 1.0:
            return covered()
        return fired if t < 2.0 else banned  # 1 s fired, then 3 s while banned

    play(audit, [(t, at(t), None) for t in every(0, 5)])
    figures = audit.figures()
    assert figures.unprotected_seconds_by_cause == pytest.approx({"fired": 1.0, "fired_banned": 3.0})
    assert figures.protected_seconds == pytest.approx(1.0)


def test_a_fired_stop_is_not_a_live_stop() -> None:
    audit = auditor()
    fired = view([long()], [stop(1, "ts")], triggering=[stop(1, "sl")])
    play(audit, [(t, fired, None) for t in every(0, 6)])
    [violation] = audit.violations
    assert violation.rule is Rule.UNCOVERED
    assert "hard stop" in violation.detail
    assert cid(1, "sl") in violation.detail


def test_stops_that_do_not_close_the_position_do_not_protect_it() -> None:
    audit = auditor()
    wrong = view([long()], [stop(1, "sl", quantity=Decimal(5)), stop(1, "ts", side="buy")])
    play(audit, [(t, wrong, None) for t in every(0, 6)])
    assert Rule.UNCOVERED in rules(audit)
    assert audit.figures().protected_seconds == 0


def test_nobody_is_blamed_for_an_uncovered_position_while_the_engine_is_down() -> None:
    audit = auditor(up=False)
    bare = view([long()])
    play(audit, [(t, bare, None) for t in every(0, 20)])
    assert audit.violations == []
    # The engine comes up at t=20: it gets its grace from then on, not from when the position appeared.
    audit.engine_up(True, now=20.0)
    play(audit, [(t, bare, None) for t in every(20.5, 25.5)])
    assert audit.violations == []
    play(audit, [(26.0, bare, None)])
    assert rules(audit) == [Rule.UNCOVERED]
    assert audit.violations[0].started_at == 20.5
    # Coverage counts the engine's absence too: the exchange is what protects a position.
    assert audit.figures().worst_unprotected_s == pytest.approx(26.0)


def test_managed_mode_requires_only_the_hard_stop_before_the_trail_places_its_stop() -> None:
    managed = AuditLimits(5.0, 10.0, 2.0, trailing_order_required=False)
    audit = auditor(limits=managed)
    play(audit, [(t, view([long()], [stop(1, "sl")]), None) for t in every(0, 10)])
    audit.assert_clean()
    strict = auditor()
    play(strict, [(t, view([long()], [stop(1, "sl")]), None) for t in every(0, 10)])
    assert rules(strict) == [Rule.UNCOVERED]


# ------------------------------------------------------------------------------------------- duplicates


def test_two_live_stops_of_a_kind_on_one_symbol_are_a_duplicate_at_once_even_with_the_engine_down() -> None:
    audit = auditor(up=False)
    doubled = view([long()], [stop(1, "sl"), stop(1, "sl", generation=1), stop(1, "ts")])
    audit.observe(0.0, doubled, None)
    [violation] = audit.violations
    assert violation.rule is Rule.DUPLICATE
    assert cid(1, "sl") in violation.detail
    assert cid(1, "sl", 1) in violation.detail
    audit.observe(0.5, covered(), None)
    assert violation.ended_at == 0.5
    assert audit.figures().duplicates == 1


def test_an_old_positions_stop_next_to_the_new_positions_stop_is_a_duplicate() -> None:
    audit = auditor()
    audit.observe(0.0, view([long()], [stop(1, "ts"), stop(7, "ts"), stop(7, "sl")]), None)
    assert rules(audit) == [Rule.DUPLICATE]


def test_a_stop_of_each_kind_and_stops_that_are_not_ours_are_no_duplicates() -> None:
    audit = auditor()
    foreign = [stop(1, "sl", token="zzz999"), SeenStop("SFPUSDT", "web_manual_1", "sell", QTY, "stop_market")]
    play(audit, [(t, view([long()], [stop(1, "sl"), stop(1, "ts"), *foreign]), None) for t in every(0, 10)])
    audit.assert_clean()


def test_a_make_before_break_overlap_is_tolerated_only_when_allowed() -> None:
    overlap = AuditLimits(5.0, 10.0, 2.0, duplicate_overlap_seconds=1.0)
    moving = view([long()], [stop(1, "sl"), stop(1, "ts", generation=3), stop(1, "ts", generation=4)])
    audit = auditor(limits=overlap)
    play(audit, [(0.0, moving, None), (0.5, moving, None), (1.0, moving, None), (1.5, covered(), None)])
    audit.assert_clean()
    play(audit, [(2.0, moving, None), (2.5, moving, None), (3.0, moving, None), (3.5, moving, None)])
    assert rules(audit) == [Rule.DUPLICATE]


# ------------------------------------------------------------------------------------------- quantity


def test_a_stop_for_another_quantity_than_the_positions_is_flagged_past_grace() -> None:
    audit = auditor()
    small = view([long(quantity=Decimal(20))], [stop(1, "sl"), stop(1, "ts", quantity=Decimal(20))])
    play(audit, [(t, small, None) for t in every(0, 4)])
    assert Rule.QUANTITY not in rules(audit)
    play(audit, [(t, small, None) for t in every(4.5, 6)])
    assert Rule.QUANTITY in rules(audit)
    quantity = next(v for v in audit.violations if v.rule is Rule.QUANTITY)
    assert cid(1, "sl") in quantity.detail
    assert "position 20" in quantity.detail


# ------------------------------------------------------------------------------------------- orphans


def test_a_stop_left_behind_by_a_closed_position_is_fine_within_grace_only() -> None:
    audit = auditor()
    left = view([], [stop(1, "sl")])
    play(audit, [(0.0, covered(), None), *((t, left, None) for t in every(0.5, 5.5))])
    assert audit.violations == []
    play(audit, [(6.0, left, None)])
    [violation] = audit.violations
    assert (violation.rule, violation.started_at) == (Rule.ORPHAN, 0.5)
    assert "no position" in violation.detail
    assert [(rule, symbol) for rule, symbol, _ in audit.open_conditions()] == [(Rule.ORPHAN, "SFPUSDT")]
    play(audit, [(6.5, view(), None)])
    assert audit.open_conditions() == []


def test_a_stop_cleaned_up_within_grace_is_clean() -> None:
    audit = auditor()
    play(audit, [(0.0, covered(), None), (0.5, view([], [stop(1, "sl")]), None), (3.0, view(), None)])
    audit.assert_clean()


def test_a_stop_on_the_wrong_side_of_the_position_is_an_orphan() -> None:
    audit = auditor()
    short = SeenPosition("SFPUSDT", "short", QTY)
    old = view([short], [stop(1, "sl"), stop(2, "sl", side="buy"), stop(2, "ts", side="buy")])
    play(audit, [(t, old, None) for t in every(0, 6)])
    # (two hard stops of ours on one symbol are a duplicate at once, whichever position each belongs to)
    assert rules(audit) == [Rule.DUPLICATE, Rule.ORPHAN]
    assert "short position it would not reduce" in audit.violations[1].detail


def test_orphans_are_not_judged_while_the_engine_is_down() -> None:
    audit = auditor(up=False)
    play(audit, [(t, view([], [stop(1, "sl")]), None) for t in every(0, 30)])
    audit.assert_clean()


def test_stops_that_are_not_ours_are_never_orphans() -> None:
    audit = auditor()
    play(audit, [(t, view([], [stop(1, "sl", token="zzz999")]), None) for t in every(0, 30)])
    audit.assert_clean()


# ------------------------------------------------------------------------------------------- database


def test_a_database_claiming_a_stop_the_venue_no_longer_has_is_flagged_past_one_reconcile_interval() -> None:
    audit = auditor()
    gone = view([long()], [stop(1, "ts")])  # the hard stop vanished from the venue
    claims = db(row(has_sl=True))
    honest = db(row(has_sl=False))
    play(audit, [(t, gone, claims) for t in every(0, 12)])
    assert Rule.FLAG_WITHOUT_ORDER not in rules(audit)  # 12 s = reconcile 10 + slack 2: still allowed
    play(audit, [(12.5, gone, claims), (13.0, gone, honest)])
    flag = next(v for v in audit.violations if v.rule is Rule.FLAG_WITHOUT_ORDER)
    assert "has_stop_loss" in flag.detail
    assert flag.ended_at == 13.0


def field_stop(purpose: str, symbol: str = "SFPUSDT", *, quantity: Decimal = QTY) -> SeenStop:
    """A Bybit position stop: a field of the position (no client id), named by its purpose."""
    if purpose == "sl":
        return SeenStop(symbol, "stopLoss", "sell", quantity, "stop_market", OrderPurpose.STOP_LOSS)
    return SeenStop(
        symbol, "trailingStop", "sell", quantity, "trailing_stop_market", OrderPurpose.TRAILING_STOP
    )


def test_position_level_stops_are_judged_by_the_field_they_are() -> None:
    # Bybit's stops carry no id: a position holding both fields is covered, and the database's flags are
    # true while the field of their purpose is set, whatever the order id they were recorded under.
    audit = auditor()
    both = view([long()], [field_stop("sl"), field_stop("ts")])
    play(audit, [(t, both, db(row())) for t in every(0, 20)])
    audit.assert_clean()
    assert audit.figures().time_weighted_coverage_pct == pytest.approx(100.0)

    hard_only = view([long()], [field_stop("sl")])  # the trailing stop's field cleared on the venue
    play(audit, [(t, hard_only, db(row())) for t in every(20.5, 40)])
    assert sorted(rules(audit)) == [Rule.FLAG_WITHOUT_ORDER, Rule.UNCOVERED]
    flag = next(v for v in audit.violations if v.rule is Rule.FLAG_WITHOUT_ORDER)
    assert "has_trailing_stop" in flag.detail


def test_a_position_field_left_on_a_symbol_the_account_no_longer_holds_is_an_orphan() -> None:
    audit = auditor()
    left = SeenStop("SFPUSDT", "stopLoss", "", Decimal(0), "stop_market", OrderPurpose.STOP_LOSS)
    play(audit, [(t, view([], [left]), None) for t in every(0, 6)])
    assert rules(audit) == [Rule.ORPHAN]


def test_the_database_following_the_venue_within_one_reconcile_interval_is_clean() -> None:
    audit = auditor()
    timeline = [(0.0, covered(), db(row()))]
    timeline += [(t, view(), db(row())) for t in every(0.5, 9.5)]  # the stops filled: flat on the venue
    timeline += [(10.0, view(), db())]  # the reconciler closed it
    play(audit, timeline)
    audit.assert_clean()


def test_a_position_the_database_holds_and_the_venue_does_not_is_lost() -> None:
    audit = auditor()
    play(audit, [(t, view(), db(row(has_sl=False, has_ts=False))) for t in every(0, 12.5)])
    assert rules(audit) == [Rule.DB_NOT_ON_VENUE]
    assert audit.figures().lost_positions == 1


def test_a_position_the_venue_holds_and_the_database_never_knew_is_lost() -> None:
    audit = auditor()
    play(audit, [(t, covered(), db()) for t in every(0, 12.5)])
    assert rules(audit) == [Rule.VENUE_NOT_IN_DB]
    assert "knows no such position" in audit.violations[0].detail
    # a row on the other side is not the same position
    other = auditor()
    play(other, [(t, covered(), db(row(side="short"))) for t in every(0, 12.5)])
    assert sorted(rules(other)) == sorted([Rule.VENUE_NOT_IN_DB, Rule.DB_NOT_ON_VENUE])


def test_an_entry_in_flight_is_known_to_the_database() -> None:
    audit = auditor()
    pending = db(row(status="entry_placed", has_sl=False, has_ts=False))
    play(audit, [(0.0, view([long()]), pending), (0.5, covered(), pending), (1.0, covered(), db(row()))])
    audit.assert_clean()


def test_an_unreadable_database_keeps_its_conditions_and_judges_them_at_the_next_read() -> None:
    audit = auditor()
    play(audit, [(0.0, view(), db(row(has_sl=False, has_ts=False)))])
    play(audit, [(t, view(), None) for t in every(0.5, 20)])  # the database went away
    assert audit.violations == []
    play(audit, [(20.5, view(), db(row(has_sl=False, has_ts=False)))])
    [violation] = audit.violations
    assert (violation.rule, violation.started_at, violation.detected_at) == (Rule.DB_NOT_ON_VENUE, 0.0, 20.5)


def test_database_rules_are_not_judged_while_the_engine_is_down() -> None:
    audit = auditor(up=False)
    play(audit, [(t, covered(), db()) for t in every(0, 30)])
    audit.assert_clean()


# ------------------------------------------------------------------------------------------- figures


def test_coverage_is_time_weighted_over_every_position_and_reopened_symbols_are_new_positions() -> None:
    audit = auditor()
    two = view(
        [long("AAAUSDT"), long("BBBUSDT")],
        [stop(1, "sl", "AAAUSDT"), stop(1, "ts", "AAAUSDT"), stop(2, "sl", "BBBUSDT")],
    )
    play(audit, [(0.0, two, None), (4.0, two, None)])  # A protected 4 s; B missing its trailing stop 4 s
    play(audit, [(4.0 + 1e-9, view(), None)])  # both closed
    reopened = view([SeenPosition("AAAUSDT", "short", QTY)])
    play(audit, [(5.0, reopened, None), (6.0, reopened, None)])  # A again, short, bare for 1 s
    figures = audit.figures()
    assert figures.positions == 3
    assert figures.open_seconds == pytest.approx(9.0)
    assert figures.protected_seconds == pytest.approx(4.0)
    assert figures.time_weighted_coverage_pct == pytest.approx(100 * 4 / 9)
    assert figures.worst_unprotected_s == pytest.approx(4.0)
    assert figures.worst_unprotected_symbol == "BBBUSDT"


def test_no_samples_prove_nothing() -> None:
    audit = auditor()
    with pytest.raises(AssertionError, match="never sampled"):
        audit.assert_clean()
    assert audit.figures().time_weighted_coverage_pct is None


def test_the_auditor_refuses_to_judge_without_the_token() -> None:
    audit = InvariantAuditor(None, None, LIMITS)
    with pytest.raises(RuntimeError, match="token"):
        audit.observe(0.0, covered(), None)


def test_a_schedule_may_name_a_longer_allowance_for_uncovered_positions_and_orphans() -> None:
    tolerant = AuditLimits(5.0, 10.0, 2.0, uncovered_seconds=8.0, orphan_seconds=12.0)
    audit = auditor(limits=tolerant)
    half = view([long()], [stop(1, "sl")])
    play(audit, [(t, half, None) for t in every(0, 8)])
    play(audit, [(t, view([], [stop(1, "sl")]), None) for t in every(8.5, 20.5)])
    audit.assert_clean()
    play(audit, [(21.0, view([], [stop(1, "sl")]), None)])
    assert rules(audit) == [Rule.ORPHAN]
    assert tolerant.allowance(Rule.UNCOVERED) == 8.0
    assert tolerant.allowance(Rule.QUANTITY) == 5.0

"""The sim core's Binance order lifecycle: fired conditional orders that sit TRIGGERING before their fill,
algo orders that read back as unknown for a while after placement, client ids unique among open orders
only, and what the core counts for the order-count headers."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest

from engine.exchange import (
    Banned,
    DuplicateClientOrderId,
    NotFound,
    OrderSide,
    OrderStatus,
    RateLimited,
)
from engine.venues.sim.core import SimCore
from engine.venues.sim.settings import SimVenueSettings
from engine.venues.sim.universe import select_listings

T0 = 6000.0  # aligned to both the 10 s and the 60 s windows
SFP, BTC = "SFPUSDT", "BTCUSDT"
BUY, SELL = OrderSide.BUY, OrderSide.SELL
QTY = Decimal("100")


def D(value: str) -> Decimal:
    return Decimal(value)


def make_core(**overrides: object) -> SimCore:
    settings = SimVenueSettings.model_validate({"slippage_bps": 0, **overrides})
    core = SimCore(select_listings([SFP, BTC, "SUIUSDT"]), settings, now=T0)
    core.set_mark(SFP, D("0.4500"), T0)
    return core


def long_with_stop(core: SimCore, cid: str = "sl", **placement: object) -> str:
    core.place_market_order(SFP, BUY, QTY, f"entry-{cid}", T0)
    core.place_stop_market_order(SFP, SELL, QTY, D("0.4000"), cid, T0, **placement)  # type: ignore[arg-type]
    return cid


def position(core: SimCore, now: float) -> Decimal:
    return sum((p.quantity for p in core.inspect(now).positions if p.symbol == SFP), D("0"))


# ---- TRIGGERING: fired, not yet filled -----------------------------------------------------------------


def test_without_a_delay_a_fired_stop_fills_at_once() -> None:
    core = make_core()
    long_with_stop(core)

    [changed] = core.set_mark(SFP, D("0.3990"), T0 + 1)

    assert changed.status is OrderStatus.FILLED
    assert position(core, T0 + 1) == 0


def test_a_delayed_stop_sits_triggered_with_the_position_open_until_its_deadline() -> None:
    core = make_core()
    core.set_trigger_delay(5.0)
    long_with_stop(core)

    [changed] = core.set_mark(SFP, D("0.3990"), T0 + 1)

    assert changed.status is OrderStatus.TRIGGERED
    assert not changed.is_open
    assert not changed.status.is_final
    assert core.get_order(SFP, "sl", T0 + 5.9).status is OrderStatus.TRIGGERED
    assert core.open_protective_orders(T0 + 5.9) == []  # a fired stop protects nothing
    assert position(core, T0 + 5.9) == QTY
    filled = core.get_order(SFP, "sl", T0 + 6)  # any call at or past the deadline executes it first
    assert filled.status is OrderStatus.FILLED
    assert filled.filled_quantity == QTY
    assert position(core, T0 + 6) == 0


def test_deferred_fills_come_due_in_set_mark_of_any_symbol_and_are_reported() -> None:
    core = make_core()
    core.set_trigger_delay(5.0)
    long_with_stop(core)
    core.set_mark(SFP, D("0.3990"), T0 + 1)

    changed = core.set_mark(BTC, core.mark(BTC), T0 + 6)

    assert [(o.client_order_id, o.status) for o in changed] == [("sl", OrderStatus.FILLED)]


def test_a_deferred_fill_executes_at_the_mark_of_its_deadline_not_a_later_one() -> None:
    core = make_core()
    core.set_trigger_delay(5.0)
    long_with_stop(core)
    core.set_mark(SFP, D("0.3990"), T0 + 1)
    core.set_mark(SFP, D("0.3900"), T0 + 3)

    core.set_mark(SFP, D("0.3000"), T0 + 7)  # the due fill runs before this mark is published

    assert core.get_order(SFP, "sl", T0 + 7).average_price == D("0.3900")


def test_a_fired_stop_in_a_thin_book_executes_its_share_and_expires_the_rest() -> None:
    core = make_core()
    core.set_stop_fill(D("0.3"))
    long_with_stop(core)

    [changed] = core.set_mark(SFP, D("0.3990"), T0 + 1)

    # Binance's MARKET order that partially fills ends EXPIRED with its executed quantity.
    assert changed.status is OrderStatus.EXPIRED
    assert changed.filled_quantity == D("30")
    assert position(core, T0 + 1) == D("70")
    # Its id is free again (it ended): a new stop for what is left may carry it, or any other.
    core.place_stop_market_order(SFP, SELL, D("70"), D("0.3900"), "sl", T0 + 2)
    assert core.get_order(SFP, "sl", T0 + 2).status is OrderStatus.NEW


def test_a_stuck_trigger_never_fills() -> None:
    core = make_core()
    core.set_trigger_delay(math.inf)
    long_with_stop(core)
    core.set_mark(SFP, D("0.3990"), T0 + 1)

    later = T0 + 3 * 86_400
    core.set_mark(SFP, D("0.3980"), later)

    assert core.get_order(SFP, "sl", later).status is OrderStatus.TRIGGERED
    assert position(core, later) == QTY
    assert [o.client_order_id for o in core.inspect(later).triggering] == ["sl"]


def test_a_delay_for_one_symbol_leaves_the_others_instant() -> None:
    core = make_core()
    core.set_trigger_delay(30.0, symbol=SFP)
    core.set_mark(BTC, D("60000.0"), T0)
    long_with_stop(core)
    core.place_market_order(BTC, BUY, D("0.010"), "btc-in", T0)
    core.place_stop_market_order(BTC, SELL, D("0.010"), D("59000.0"), "btc-sl", T0)

    core.set_mark(SFP, D("0.3990"), T0 + 1)
    core.set_mark(BTC, D("58900.0"), T0 + 1)

    assert core.get_order(SFP, "sl", T0 + 1).status is OrderStatus.TRIGGERED
    assert core.get_order(BTC, "btc-sl", T0 + 1).status is OrderStatus.FILLED


def test_a_delay_attached_at_placement_wins_over_the_venue_setting() -> None:
    core = make_core()
    core.set_trigger_delay(60.0)
    long_with_stop(core, trigger_delay=0.0)

    [changed] = core.set_mark(SFP, D("0.3990"), T0 + 1)

    assert changed.status is OrderStatus.FILLED


def test_a_triggered_stop_whose_position_closed_meanwhile_expires_without_a_fill() -> None:
    core = make_core()
    core.set_trigger_delay(5.0)
    long_with_stop(core)
    core.set_mark(SFP, D("0.3990"), T0 + 1)
    core.place_market_order(SFP, SELL, QTY, "manual-close", T0 + 2, reduce_only=True)

    expired = core.get_order(SFP, "sl", T0 + 6)

    assert expired.status is OrderStatus.EXPIRED
    assert expired.filled_quantity == 0
    assert position(core, T0 + 6) == 0


def test_cancelling_a_triggered_stop_changes_nothing_and_it_still_fills() -> None:
    core = make_core()
    core.set_trigger_delay(5.0)
    long_with_stop(core)
    core.set_mark(SFP, D("0.3990"), T0 + 1)

    assert core.cancel_order(SFP, "sl", T0 + 2).status is OrderStatus.TRIGGERED
    assert core.get_order(SFP, "sl", T0 + 6).status is OrderStatus.FILLED


def test_trigger_delays_must_not_be_negative() -> None:
    core = make_core()
    with pytest.raises(ValueError, match="trigger delay"):
        core.set_trigger_delay(-1.0)
    with pytest.raises(ValueError, match="read lag"):
        core.set_read_lag(-0.5)


# ---- client ids: unique among open orders only ---------------------------------------------------------


def test_a_client_id_is_refused_while_its_order_is_open_and_accepted_once_it_ended() -> None:
    core = make_core()
    long_with_stop(core, "sl")
    first = core.get_order(SFP, "sl", T0)
    with pytest.raises(DuplicateClientOrderId):
        core.place_stop_market_order(SFP, SELL, QTY, D("0.4100"), "sl", T0)

    core.cancel_order(SFP, "sl", T0 + 1)
    again = core.place_stop_market_order(SFP, SELL, QTY, D("0.4100"), "sl", T0 + 2)

    assert again.venue_order_id != first.venue_order_id
    latest = core.get_order(SFP, "sl", T0 + 2)
    assert (latest.venue_order_id, latest.status, latest.stop_price) == (
        again.venue_order_id,
        OrderStatus.NEW,
        D("0.4100"),
    )
    old = core.get_order_by_venue_id(SFP, first.venue_order_id, T0 + 2)
    assert (old.client_order_id, old.status) == ("sl", OrderStatus.CANCELED)


def test_a_triggered_order_still_holds_its_client_id() -> None:
    core = make_core()
    core.set_trigger_delay(5.0)
    long_with_stop(core, "sl")
    core.set_mark(SFP, D("0.3990"), T0 + 1)

    with pytest.raises(DuplicateClientOrderId):
        core.place_stop_market_order(SFP, SELL, QTY, D("0.3000"), "sl", T0 + 2)


def test_ids_of_filled_and_expired_orders_may_be_used_again() -> None:
    core = make_core()
    core.place_market_order(SFP, BUY, QTY, "in", T0)
    core.place_stop_market_order(SFP, SELL, QTY, D("0.4000"), "sl", T0)
    core.place_stop_market_order(SFP, SELL, QTY, D("0.3900"), "sl-2", T0)
    core.set_mark(SFP, D("0.3800"), T0 + 1)  # sl fills, sl-2 has nothing left and expires
    assert core.get_order(SFP, "sl-2", T0 + 1).status is OrderStatus.EXPIRED

    reopened = core.place_market_order(SFP, BUY, QTY, "in", T0 + 2)  # the filled entry's id
    core.place_stop_market_order(SFP, SELL, QTY, D("0.3000"), "sl", T0 + 2)
    core.place_stop_market_order(SFP, SELL, QTY, D("0.2900"), "sl-2", T0 + 2)

    assert core.get_order(SFP, "in", T0 + 2).venue_order_id == reopened.venue_order_id
    assert [o.client_order_id for o in core.open_protective_orders(T0 + 2)] == ["sl", "sl-2"]


def test_a_query_may_ask_for_the_regular_or_the_conditional_order_of_a_reused_id() -> None:
    core = make_core()
    entry = core.place_market_order(SFP, BUY, QTY, "x", T0)
    stop = core.place_stop_market_order(SFP, SELL, QTY, D("0.4000"), "x", T0 + 1)

    assert core.get_order(SFP, "x", T0 + 1).venue_order_id == stop.venue_order_id  # the most recent
    assert core.get_order(SFP, "x", T0 + 1, conditional=True).venue_order_id == stop.venue_order_id
    assert core.get_order(SFP, "x", T0 + 1, conditional=False).venue_order_id == entry.venue_order_id
    with pytest.raises(NotFound):
        core.get_order(BTC, "x", T0 + 1)
    with pytest.raises(NotFound):
        core.get_order_by_venue_id(BTC, stop.venue_order_id, T0 + 1)


# ---- read-after-write lag ------------------------------------------------------------------------------


def test_a_lagged_order_reads_as_unknown_but_exists_and_holds_its_id() -> None:
    core = make_core()
    core.set_read_lag(3.0)
    long_with_stop(core, "sl")
    placed_id = core.inspect(T0).open_conditional[0].venue_order_id

    with pytest.raises(NotFound):
        core.get_order(SFP, "sl", T0 + 1)
    with pytest.raises(NotFound):
        core.get_order_by_venue_id(SFP, placed_id, T0 + 1)
    with pytest.raises(NotFound):
        core.cancel_order(SFP, "sl", T0 + 1)
    assert core.open_protective_orders(T0 + 1) == []
    with pytest.raises(DuplicateClientOrderId):
        core.place_stop_market_order(SFP, SELL, QTY, D("0.4000"), "sl", T0 + 1)

    assert core.get_order(SFP, "sl", T0 + 3).status is OrderStatus.NEW
    assert [o.client_order_id for o in core.open_protective_orders(T0 + 3)] == ["sl"]


def test_a_lagged_order_still_triggers_and_is_seen_once_the_lag_is_over() -> None:
    core = make_core()
    long_with_stop(core, "sl", read_lag=3.0)

    core.set_mark(SFP, D("0.3990"), T0 + 1)

    assert position(core, T0 + 1) == 0
    with pytest.raises(NotFound):
        core.get_order(SFP, "sl", T0 + 2)
    assert core.get_order(SFP, "sl", T0 + 3).status is OrderStatus.FILLED


def test_read_lag_is_for_conditional_orders_and_the_capabilities_announce_it() -> None:
    core = make_core()
    assert core.capabilities().read_after_write_seconds == 0.0
    core.set_read_lag(2.0)

    core.place_market_order(SFP, BUY, QTY, "in", T0)

    assert core.get_order(SFP, "in", T0).status is OrderStatus.FILLED
    assert core.capabilities().read_after_write_seconds == 2.0


# ---- what the core counts, and the oracle's view -------------------------------------------------------


def test_order_counts_follow_the_fixed_windows() -> None:
    core = make_core()
    assert core.order_counts(T0) == {10.0: 0, 60.0: 0}
    core.place_market_order(SFP, BUY, QTY, "a", T0)
    core.place_stop_market_order(SFP, SELL, QTY, D("0.4000"), "b", T0 + 1)

    assert core.order_counts(T0 + 9.9) == {10.0: 2, 60.0: 2}
    core.place_market_order(SFP, BUY, QTY, "c", T0 + 10)
    assert core.order_counts(T0 + 10) == {10.0: 1, 60.0: 3}
    assert core.order_counts(T0 + 60) == {10.0: 0, 60.0: 0}


def test_inspect_sees_through_a_ban_and_reports_it() -> None:
    core = make_core(rate_limits={"orders_per_10s": 1, "ban_after_violations": 2, "ban_seconds": 120})
    core.place_market_order(SFP, BUY, QTY, "in", T0)
    with pytest.raises(RateLimited):
        core.place_market_order(SFP, BUY, QTY, "more-1", T0)
    with pytest.raises(Banned):
        core.place_market_order(SFP, BUY, QTY, "more-2", T0)
    with pytest.raises(Banned):
        core.positions(T0 + 1)

    seen = core.inspect(T0 + 1)

    assert [p.quantity for p in seen.positions] == [QTY]
    assert seen.banned_until == T0 + 120
    assert core.inspect(T0 + 120).banned_until is None


# ---- market orders that work before they fill (`set_market_fill`) ---------------------------------------


def _events(core: SimCore) -> list[tuple[str, OrderStatus, Decimal]]:
    seen: list[tuple[str, OrderStatus, Decimal]] = []

    def listener(_account: str, event: object) -> None:
        order = getattr(event, "order", None)
        if order is not None:
            seen.append((order.client_order_id, order.status, order.filled_quantity))

    core.add_account_listener(listener)
    return seen


def test_a_working_market_order_answers_new_and_fills_when_due_at_the_mark_of_then() -> None:
    core = make_core()
    events = _events(core)
    core.set_market_fill(3.0)

    answer = core.place_market_order(SFP, BUY, QTY, "entry", T0)

    assert (answer.status, answer.filled_quantity, answer.average_price) == (OrderStatus.NEW, D("0"), None)
    assert position(core, T0 + 1) == 0
    assert core.get_order(SFP, "entry", T0 + 2).status is OrderStatus.NEW
    core.set_mark(SFP, D("0.4600"), T0 + 2.5)
    core.set_mark(BTC, core.mark(BTC), T0 + 3)  # any call at or past the deadline runs the fill
    filled = core.get_order(SFP, "entry", T0 + 3)
    assert (filled.status, filled.filled_quantity, filled.average_price) == (
        OrderStatus.FILLED,
        QTY,
        D("0.4600"),
    )
    assert position(core, T0 + 3) == QTY
    assert events == [("entry", OrderStatus.NEW, D("0")), ("entry", OrderStatus.FILLED, QTY)]


def test_a_market_order_may_end_part_filled_the_rest_cancelled() -> None:
    core = make_core()
    core.set_market_fill(share=D("0.37"))

    answer = core.place_market_order(SFP, BUY, QTY, "entry", T0)

    assert (answer.status, answer.filled_quantity) == (OrderStatus.EXPIRED, D("37"))
    assert answer.status.is_final
    assert position(core, T0) == D("37")


def test_closing_orders_execute_at_once_in_full_whatever_the_setting() -> None:
    core = make_core()
    core.place_market_order(SFP, BUY, QTY, "entry", T0)
    core.set_market_fill(5.0, share=D("0.5"))

    close = core.place_market_order(SFP, SELL, QTY, "close", T0 + 1, reduce_only=True)

    assert (close.status, close.filled_quantity) == (OrderStatus.FILLED, QTY)
    assert position(core, T0 + 1) == 0


def test_a_working_market_order_is_kept_in_the_book_and_fills_after_a_restore() -> None:
    core = make_core()
    core.set_market_fill(4.0, share=D("0.5"))
    core.place_market_order(SFP, BUY, QTY, "entry", T0)

    again = make_core()
    again.restore_book(core.export_book(T0 + 1))
    again.set_mark(BTC, again.mark(BTC), T0 + 4)

    filled = again.get_order(SFP, "entry", T0 + 4)
    assert (filled.status, filled.filled_quantity) == (OrderStatus.EXPIRED, D("50"))
    assert position(again, T0 + 4) == D("50")


def test_a_market_fill_setting_is_checked() -> None:
    core = make_core()
    for seconds, share in ((-1.0, D("1")), (math.inf, D("1")), (0.0, D("0")), (0.0, D("1.5"))):
        with pytest.raises(ValueError, match="market fill"):
            core.set_market_fill(seconds, share=share)

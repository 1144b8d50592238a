"""The synchronous sim core: accounting, rate limits and bans, order rules beyond the contract suite."""

from __future__ import annotations

from decimal import Decimal

import pytest

from engine.exchange import (
    Banned,
    InsufficientMargin,
    OrderSide,
    OrderStatus,
    PositionSide,
    RateLimited,
    RejectCode,
    Rejected,
    WouldTriggerImmediately,
)
from engine.venues.sim.core import SimCore
from engine.venues.sim.settings import SimVenueSettings
from engine.venues.sim.universe import select_listings

T0 = 6000.0  # aligned to both the 10 s and the 60 s windows
SFP = "SFPUSDT"
BUY, SELL = OrderSide.BUY, OrderSide.SELL


def D(value: str) -> Decimal:
    return Decimal(value)


def make_core(**overrides: object) -> SimCore:
    settings = SimVenueSettings.model_validate({"slippage_bps": 0, **overrides})
    core = SimCore(select_listings(["SFPUSDT", "BTCUSDT", "SUIUSDT"]), settings, now=T0)
    core.set_mark(SFP, D("0.4500"), T0)
    return core


def signed_position(core: SimCore, symbol: str = SFP) -> Decimal:
    for p in core.positions(T0):
        if p.symbol == symbol:
            return p.quantity if p.side is PositionSide.LONG else -p.quantity
    return D("0")


# ---- accounting ----------------------------------------------------------------------------------------


def test_round_trip_books_realized_pnl_and_taker_fees_exactly() -> None:
    core = make_core(taker_fee_rate="0.0005", starting_balance="10000")
    core.place_market_order(SFP, BUY, D("1000"), "in", T0)
    core.set_mark(SFP, D("0.5000"), T0)
    assert core.balance(T0).unrealized_pnl == D("50")

    core.place_market_order(SFP, SELL, D("1000"), "out", T0, reduce_only=True)

    balance = core.balance(T0)
    assert balance.wallet_balance == D("10000") - D("0.225") + D("50") - D("0.25")
    assert balance.unrealized_pnl == 0
    assert balance.available_balance == balance.wallet_balance


def test_slippage_is_adverse_and_on_the_tick() -> None:
    core = make_core(slippage_bps="10")  # 0.1 %
    bought = core.place_market_order(SFP, BUY, D("100"), "b", T0)
    sold = core.place_market_order(SFP, SELL, D("100"), "s", T0)

    assert bought.average_price == D("0.4505")  # 0.45045 rounded up
    assert sold.average_price == D("0.4495")  # 0.44955 rounded down


def test_adding_averages_the_entry_and_a_partial_close_keeps_it() -> None:
    core = make_core()
    core.place_market_order(SFP, BUY, D("100"), "a", T0)
    core.set_mark(SFP, D("0.5500"), T0)
    core.place_market_order(SFP, BUY, D("100"), "b", T0)
    core.place_market_order(SFP, SELL, D("50"), "c", T0, reduce_only=True)

    [position] = core.positions(T0)
    assert position.quantity == D("150")
    assert position.entry_price == D("0.5")


def test_a_plain_market_order_can_flip_the_position() -> None:
    core = make_core()
    core.place_market_order(SFP, BUY, D("100"), "a", T0)
    core.place_market_order(SFP, SELL, D("300"), "b", T0)

    [position] = core.positions(T0)
    assert (position.side, position.quantity, position.entry_price) == (
        PositionSide.SHORT,
        D("200"),
        D("0.4500"),
    )


def test_margin_is_checked_against_leverage() -> None:
    core = make_core(starting_balance="1000", default_leverage=2)
    with pytest.raises(InsufficientMargin):
        core.place_market_order(SFP, BUY, D("5000"), "big", T0)  # 2 250 notional needs 1 125 at 2x
    core.set_leverage(SFP, 5, T0)
    core.place_market_order(SFP, BUY, D("5000"), "big-2", T0)  # 450 at 5x
    assert signed_position(core) == D("5000")


def test_leverage_must_be_within_the_market_maximum() -> None:
    core = make_core()
    for bad in (0, 51):
        with pytest.raises(Rejected) as raised:
            core.set_leverage(SFP, bad, T0)
        assert raised.value.code == RejectCode.INVALID_LEVERAGE
    assert core.set_leverage(SFP, 50, T0) == 50


def test_min_notional_applies_to_entries_but_not_to_reduce_only() -> None:
    core = make_core()
    with pytest.raises(Rejected) as raised:
        core.place_market_order(SFP, BUY, D("11"), "tiny", T0)  # 4.95 USDT
    assert raised.value.code == RejectCode.MIN_NOTIONAL
    core.place_market_order(SFP, BUY, D("100"), "in", T0)
    core.place_market_order(SFP, SELL, D("1"), "trim", T0, reduce_only=True)
    assert signed_position(core) == D("99")


def test_unknown_symbol_and_bad_quantities_are_rejected_with_their_codes() -> None:
    core = make_core()
    cases = [("NOPEUSDT", D("1"), RejectCode.BAD_SYMBOL), (SFP, D("0"), RejectCode.QUANTITY_TOO_SMALL)]
    for symbol, quantity, code in cases:
        with pytest.raises(Rejected) as raised:
            core.place_market_order(symbol, BUY, quantity, f"x-{code}", T0)
        assert raised.value.code == code


def test_marks_must_be_on_the_tick() -> None:
    core = make_core()
    with pytest.raises(ValueError, match="multiple"):
        core.set_mark(SFP, D("0.45001"), T0)


def test_accounts_are_isolated() -> None:
    core = make_core()
    core.place_market_order(SFP, BUY, D("100"), "same-id", T0, account_id="alice")
    core.place_market_order(SFP, SELL, D("100"), "same-id", T0, account_id="bob")

    assert [p.side for p in core.positions(T0, "alice")] == [PositionSide.LONG]
    assert [p.side for p in core.positions(T0, "bob")] == [PositionSide.SHORT]
    assert core.positions(T0) == []


# ---- protective orders ---------------------------------------------------------------------------------


def test_a_stop_larger_than_the_position_fills_only_the_position() -> None:
    core = make_core()
    core.place_market_order(SFP, BUY, D("100"), "in", T0)
    core.place_stop_market_order(SFP, SELL, D("150"), D("0.4000"), "sl", T0)

    [changed] = core.set_mark(SFP, D("0.3900"), T0 + 1)

    assert (changed.status, changed.filled_quantity) == (OrderStatus.FILLED, D("100"))
    assert changed.updated_at == T0 + 1
    assert core.positions(T0) == []


def test_two_stops_on_one_position_fill_once_and_the_second_expires() -> None:
    core = make_core()
    core.place_market_order(SFP, BUY, D("100"), "in", T0)
    core.place_stop_market_order(SFP, SELL, D("100"), D("0.4000"), "sl-1", T0)
    core.place_trailing_stop_order(SFP, SELL, D("100"), D("5"), "ts-1", T0)

    changed = core.set_mark(SFP, D("0.3900"), T0)

    assert [(o.client_order_id, o.status) for o in changed] == [
        ("sl-1", OrderStatus.FILLED),
        ("ts-1", OrderStatus.EXPIRED),
    ]
    assert signed_position(core) == 0


def test_conditional_reduce_only_without_a_position_is_rejected() -> None:
    core = make_core()
    with pytest.raises(Rejected) as raised:
        core.place_stop_market_order(SFP, SELL, D("100"), D("0.4000"), "sl", T0)
    assert raised.value.code == RejectCode.REDUCE_ONLY_REJECTED


def test_a_rejected_order_does_not_use_up_its_client_order_id() -> None:
    core = make_core()
    core.place_market_order(SFP, BUY, D("100"), "in", T0)
    with pytest.raises(WouldTriggerImmediately):
        core.place_stop_market_order(SFP, SELL, D("100"), D("0.4600"), "sl", T0)

    core.set_mark(SFP, D("0.4700"), T0)
    placed = core.place_stop_market_order(SFP, SELL, D("100"), D("0.4600"), "sl", T0)
    assert placed.status is OrderStatus.NEW


def test_the_conditional_cap_is_configurable() -> None:
    core = make_core(max_conditional_orders=2)
    core.place_market_order(SFP, BUY, D("100"), "in", T0)
    core.place_stop_market_order(SFP, SELL, D("100"), D("0.4000"), "a", T0)
    core.place_trailing_stop_order(SFP, SELL, D("100"), D("1"), "b", T0)
    with pytest.raises(Rejected) as raised:
        core.place_stop_market_order(SFP, SELL, D("100"), D("0.4000"), "c", T0)
    assert raised.value.code == RejectCode.MAX_CONDITIONAL_ORDERS


# ---- rate limits and bans ------------------------------------------------------------------------------


def spend(core: SimCore, count: int, now: float, prefix: str) -> None:
    for index in range(count):
        side = BUY if index % 2 == 0 else SELL
        core.place_market_order(SFP, side, D("20"), f"{prefix}-{index}", now)


def test_ten_second_budget_is_exact_and_resets_at_the_window_boundary() -> None:
    core = make_core()
    spend(core, 300, T0 + 1.5, "w1")

    with pytest.raises(RateLimited) as raised:
        core.place_market_order(SFP, BUY, D("20"), "over", T0 + 1.5)
    assert raised.value.retry_after == pytest.approx(8.5)

    core.place_market_order(SFP, BUY, D("20"), "next-window", T0 + 10.0)


def test_minute_budget_binds_after_four_full_ten_second_windows() -> None:
    core = make_core()
    for window in range(4):
        spend(core, 300, T0 + 10.0 * window, f"w{window}")

    with pytest.raises(RateLimited) as raised:
        core.place_market_order(SFP, BUY, D("20"), "over", T0 + 40.0)
    assert raised.value.retry_after == pytest.approx(20.0)


def test_budgets_are_configurable() -> None:
    core = make_core(rate_limits={"orders_per_10s": 3})
    spend(core, 3, T0, "w")
    with pytest.raises(RateLimited):
        core.place_market_order(SFP, BUY, D("20"), "over", T0)


def test_repeated_violations_ban_every_call_and_bans_escalate() -> None:
    core = make_core(rate_limits={"orders_per_10s": 2, "ban_after_violations": 3, "ban_seconds": 120})
    spend(core, 2, T0, "a")
    for attempt in range(2):
        with pytest.raises(RateLimited):
            core.place_market_order(SFP, BUY, D("20"), f"a-over-{attempt}", T0)
    with pytest.raises(Banned) as first:
        core.place_market_order(SFP, BUY, D("20"), "a-over-2", T0)
    assert first.value.until == T0 + 120

    with pytest.raises(Banned):
        core.positions(T0 + 119.9)
    with pytest.raises(Banned):
        core.get_order(SFP, "a-0", T0 + 119.9)
    assert core.get_order(SFP, "a-0", T0 + 120).status is OrderStatus.FILLED

    later = T0 + 200.0
    spend(core, 2, later, "b")
    for attempt in range(2):
        with pytest.raises(RateLimited):
            core.place_market_order(SFP, BUY, D("20"), f"b-over-{attempt}", later)
    with pytest.raises(Banned) as second:
        core.place_market_order(SFP, BUY, D("20"), "b-over-2", later)
    assert second.value.until == later + 240


def test_violations_older_than_the_window_are_forgotten() -> None:
    core = make_core(
        rate_limits={"orders_per_10s": 1, "ban_after_violations": 2, "violation_window_seconds": 30}
    )
    spend(core, 1, T0, "a")
    with pytest.raises(RateLimited):
        core.place_market_order(SFP, BUY, D("20"), "a-over", T0)
    spend(core, 1, T0 + 40, "b")
    with pytest.raises(RateLimited):  # the first violation is 40 s old: no ban
        core.place_market_order(SFP, BUY, D("20"), "b-over", T0 + 40)


# ---- determinism ---------------------------------------------------------------------------------------


def script(core: SimCore) -> tuple[object, ...]:
    core.place_market_order(SFP, BUY, D("300"), "in", T0)
    core.place_trailing_stop_order(SFP, SELL, D("300"), D("2"), "ts", T0, activation_price=D("0.4600"))
    changes = [core.set_mark(SFP, D(p), T0 + i) for i, p in enumerate(["0.4600", "0.4800", "0.4700"])]
    return (changes, core.positions(T0), core.balance(T0), core.get_order(SFP, "ts", T0))


def test_same_calls_give_the_same_state() -> None:
    assert script(make_core()) == script(make_core())
    changes = script(make_core())[0]
    assert changes[-1][0].status is OrderStatus.FILLED  # 0.47 <= 0.48 * 0.98

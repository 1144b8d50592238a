"""What every exchange implementation must do, checked through the port and the harness only."""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal

import pytest

from engine.exchange import (
    Banned,
    DuplicateClientOrderId,
    InsufficientMargin,
    NotFound,
    OrderSide,
    OrderStatus,
    OrderType,
    OutcomeUnknown,
    PositionSide,
    RateLimited,
    RejectCode,
    Rejected,
    Retryable,
    WouldTriggerImmediately,
)
from engine.exchange.port import ExchangePort, Order
from engine.venues.sim import CallKind, FaultKind

from .harness import ContractSubject

SYMBOL = "SFPUSDT"  # tick 0.0001, step 1 on Binance and in the sim
START = Decimal("0.5000")
QTY = Decimal("100")

LONG = PositionSide.LONG
SHORT = PositionSide.SHORT


def D(value: str) -> Decimal:
    return Decimal(value)


async def start_at(subject: ContractSubject, price: Decimal = START) -> None:
    await subject.harness.set_mark_price(SYMBOL, price)


async def open_position(
    port: ExchangePort, side: PositionSide, qty: Decimal = QTY, cid: str = "entry-1"
) -> Order:
    entry_side = OrderSide.BUY if side is LONG else OrderSide.SELL
    return await port.create_market_order(SYMBOL, entry_side, qty, client_order_id=cid)


async def position_quantity(port: ExchangePort, symbol: str = SYMBOL) -> Decimal:
    """Signed: > 0 long, < 0 short, 0 flat."""
    for position in await port.fetch_positions():
        if position.symbol == symbol:
            return position.quantity if position.side is LONG else -position.quantity
    return Decimal(0)


async def open_ids(port: ExchangePort) -> list[str]:
    return [order.client_order_id for order in await port.fetch_open_protective_orders(SYMBOL)]


# ---- markets, capabilities, prices ---------------------------------------------------------------------


async def test_markets_carry_filters_keyed_by_native_symbol(subject: ContractSubject) -> None:
    markets = await subject.port.load_markets()

    assert SYMBOL in markets
    for symbol, market in markets.items():
        assert market.symbol == symbol
        assert "/" not in symbol
        assert market.tick_size > 0
        assert market.step_size > 0
        assert market.min_quantity >= market.step_size
        assert market.min_notional >= 0
        assert market.max_leverage >= 1


async def test_capabilities_are_consistent(subject: ContractSubject) -> None:
    caps = subject.port.capabilities()

    assert 0 < caps.callback_rate_min < caps.callback_rate_max
    assert caps.max_conditional_orders >= 1
    assert caps.order_rate_budgets
    assert all(budget.limit >= 1 and budget.window_seconds > 0 for budget in caps.order_rate_budgets)


async def test_mark_price_snapshot_and_stream_follow_the_venue(subject: ContractSubject) -> None:
    await start_at(subject, D("0.4321"))

    snapshot = await subject.port.fetch_mark_prices([SYMBOL])
    assert snapshot[SYMBOL].price == D("0.4321")

    stream = subject.port.watch_mark_prices([SYMBOL])
    first = await anext(stream)
    assert (first.symbol, first.price) == (SYMBOL, D("0.4321"))
    await subject.harness.set_mark_price(SYMBOL, D("0.4400"))
    second = await anext(stream)
    assert (second.symbol, second.price) == (SYMBOL, D("0.4400"))
    await stream.aclose()


# ---- market orders, positions, balance -----------------------------------------------------------------


@pytest.mark.parametrize("side", [LONG, SHORT])
async def test_market_order_fills_near_mark_and_opens_a_position(
    subject: ContractSubject, side: PositionSide
) -> None:
    await start_at(subject)

    order = await open_position(subject.port, side)

    assert order.status is OrderStatus.FILLED
    assert order.type is OrderType.MARKET
    assert order.filled_quantity == QTY
    assert order.average_price is not None
    assert abs(order.average_price - START) / START < D("0.01")
    assert await position_quantity(subject.port) == (QTY if side is LONG else -QTY)
    [position] = await subject.port.fetch_positions()
    assert position.side is side
    assert position.entry_price == order.average_price


async def test_filled_market_order_is_found_by_client_order_id(subject: ContractSubject) -> None:
    await start_at(subject)
    placed = await open_position(subject.port, LONG, cid="entry-fetch")

    fetched = await subject.port.fetch_order(SYMBOL, "entry-fetch")

    assert fetched.status is OrderStatus.FILLED
    assert fetched.venue_order_id == placed.venue_order_id
    assert fetched.filled_quantity == QTY


async def test_reduce_only_market_order_closes_the_position_and_never_flips_it(
    subject: ContractSubject,
) -> None:
    await start_at(subject)
    await open_position(subject.port, LONG)

    close = await subject.port.create_market_order(
        SYMBOL, OrderSide.SELL, QTY * 2, client_order_id="close-1", reduce_only=True
    )

    assert close.status is OrderStatus.FILLED
    assert close.filled_quantity == QTY
    assert await position_quantity(subject.port) == 0


async def test_reduce_only_market_order_without_a_position_is_rejected(subject: ContractSubject) -> None:
    await start_at(subject)

    with pytest.raises(Rejected) as raised:
        await subject.port.create_market_order(
            SYMBOL, OrderSide.SELL, QTY, client_order_id="ro-1", reduce_only=True
        )

    assert raised.value.code == RejectCode.REDUCE_ONLY_REJECTED
    assert await position_quantity(subject.port) == 0
    with pytest.raises(NotFound):
        await subject.port.fetch_order(SYMBOL, "ro-1")


async def test_a_profitable_round_trip_grows_the_wallet(subject: ContractSubject) -> None:
    await start_at(subject)
    before = (await subject.port.fetch_balance()).wallet_balance
    await open_position(subject.port, LONG)
    await subject.harness.set_mark_price(SYMBOL, D("0.6000"))

    during = await subject.port.fetch_balance()
    await subject.port.create_market_order(
        SYMBOL, OrderSide.SELL, QTY, client_order_id="tp-1", reduce_only=True
    )
    after = await subject.port.fetch_balance()

    assert during.unrealized_pnl > 0
    gross = QTY * (D("0.6000") - START)
    assert before < after.wallet_balance < before + gross  # profit, less fees and slippage
    assert after.unrealized_pnl == 0


async def test_order_beyond_available_margin_is_insufficient_margin(subject: ContractSubject) -> None:
    await start_at(subject)
    markets = await subject.port.load_markets()
    await subject.port.set_leverage(SYMBOL, 1)
    available = (await subject.port.fetch_balance()).available_balance
    too_much = markets[SYMBOL].round_quantity(available * 2 / START)

    with pytest.raises(InsufficientMargin):
        await subject.port.create_market_order(SYMBOL, OrderSide.BUY, too_much, client_order_id="huge-1")

    assert await position_quantity(subject.port) == 0


async def test_quantities_and_prices_off_the_grid_are_rejected_not_rounded(subject: ContractSubject) -> None:
    await start_at(subject)
    await open_position(subject.port, LONG)

    with pytest.raises(Rejected) as off_step:
        await subject.port.create_market_order(SYMBOL, OrderSide.BUY, D("10.5"), client_order_id="grid-1")
    with pytest.raises(Rejected) as off_tick:
        await subject.port.create_stop_market_order(
            SYMBOL, OrderSide.SELL, QTY, D("0.45005"), client_order_id="grid-2"
        )

    assert off_step.value.code == RejectCode.BAD_PRECISION
    assert off_tick.value.code == RejectCode.BAD_PRECISION
    assert await position_quantity(subject.port) == QTY


# ---- stop-market ---------------------------------------------------------------------------------------

STOP_CASES = [
    # position, stop side, stop price, a mark that does not cross it, a mark that does
    pytest.param(LONG, OrderSide.SELL, D("0.4500"), D("0.4501"), D("0.4500"), id="long"),
    pytest.param(SHORT, OrderSide.BUY, D("0.5500"), D("0.5499"), D("0.5500"), id="short"),
]


@pytest.mark.parametrize(("side", "stop_side", "stop", "near", "through"), STOP_CASES)
async def test_stop_market_triggers_when_the_mark_crosses_and_closes_the_position(
    subject: ContractSubject,
    side: PositionSide,
    stop_side: OrderSide,
    stop: Decimal,
    near: Decimal,
    through: Decimal,
) -> None:
    await start_at(subject)
    await open_position(subject.port, side)
    placed = await subject.port.create_stop_market_order(SYMBOL, stop_side, QTY, stop, client_order_id="sl-1")
    assert placed.status is OrderStatus.NEW
    assert placed.reduce_only
    assert placed.stop_price == stop

    await subject.harness.set_mark_price(SYMBOL, near)
    assert (await subject.port.fetch_order(SYMBOL, "sl-1")).status is OrderStatus.NEW

    await subject.harness.set_mark_price(SYMBOL, through)
    fired = await subject.port.fetch_order(SYMBOL, "sl-1")
    assert fired.status is OrderStatus.FILLED
    assert fired.filled_quantity == QTY
    assert await position_quantity(subject.port) == 0
    assert await open_ids(subject.port) == []


@pytest.mark.parametrize(
    ("side", "stop_side", "stop"),
    [
        pytest.param(LONG, OrderSide.SELL, START, id="sell-at-mark"),
        pytest.param(LONG, OrderSide.SELL, D("0.5100"), id="sell-above-mark"),
        pytest.param(SHORT, OrderSide.BUY, START, id="buy-at-mark"),
        pytest.param(SHORT, OrderSide.BUY, D("0.4900"), id="buy-below-mark"),
    ],
)
async def test_stop_whose_trigger_is_already_crossed_would_trigger_immediately(
    subject: ContractSubject, side: PositionSide, stop_side: OrderSide, stop: Decimal
) -> None:
    await start_at(subject)
    await open_position(subject.port, side)

    with pytest.raises(WouldTriggerImmediately) as raised:
        await subject.port.create_stop_market_order(SYMBOL, stop_side, QTY, stop, client_order_id="sl-x")

    assert raised.value.code == RejectCode.WOULD_IMMEDIATELY_TRIGGER
    assert await open_ids(subject.port) == []
    with pytest.raises(NotFound):
        await subject.port.fetch_order(SYMBOL, "sl-x")


@pytest.mark.parametrize(
    ("side", "wrong_side", "stop"),
    [
        pytest.param(LONG, OrderSide.BUY, D("0.5500"), id="buy-stop-on-long"),
        pytest.param(SHORT, OrderSide.SELL, D("0.4500"), id="sell-stop-on-short"),
    ],
)
async def test_protective_order_that_would_increase_the_position_is_rejected(
    subject: ContractSubject, side: PositionSide, wrong_side: OrderSide, stop: Decimal
) -> None:
    await start_at(subject)
    await open_position(subject.port, side)

    with pytest.raises(Rejected) as stop_raised:
        await subject.port.create_stop_market_order(SYMBOL, wrong_side, QTY, stop, client_order_id="wrong-1")
    with pytest.raises(Rejected) as trailing_raised:
        await subject.port.create_trailing_stop_order(
            SYMBOL, wrong_side, QTY, D("1"), client_order_id="wrong-2"
        )

    assert stop_raised.value.code == RejectCode.REDUCE_ONLY_REJECTED
    assert trailing_raised.value.code == RejectCode.REDUCE_ONLY_REJECTED
    assert await open_ids(subject.port) == []


async def test_stops_outlive_their_position_and_expire_without_a_fill(subject: ContractSubject) -> None:
    await start_at(subject)
    await open_position(subject.port, LONG)
    await subject.port.create_stop_market_order(
        SYMBOL, OrderSide.SELL, QTY, D("0.4500"), client_order_id="sl-orphan"
    )
    await subject.port.create_market_order(
        SYMBOL, OrderSide.SELL, QTY, client_order_id="close-1", reduce_only=True
    )

    assert await open_ids(subject.port) == ["sl-orphan"]  # not auto-cancelled: the reconciler's job

    await subject.harness.set_mark_price(SYMBOL, D("0.4400"))
    expired = await subject.port.fetch_order(SYMBOL, "sl-orphan")
    assert expired.status is OrderStatus.EXPIRED
    assert expired.filled_quantity == 0
    assert await position_quantity(subject.port) == 0
    assert await open_ids(subject.port) == []


# ---- trailing stop -------------------------------------------------------------------------------------

TRAILING_CASES = [
    # position, stop side, activation, path: (mark, expected status after it)
    pytest.param(
        LONG,
        OrderSide.SELL,
        D("0.5500"),
        [
            ("0.4000", OrderStatus.NEW),  # far below entry, but not armed: nothing happens
            ("0.5499", OrderStatus.NEW),
            ("0.5500", OrderStatus.NEW),  # armed, highest 0.55
            ("0.6000", OrderStatus.NEW),  # highest 0.60 -> trigger level 0.588
            ("0.5900", OrderStatus.NEW),
            ("0.5881", OrderStatus.NEW),
            ("0.5880", OrderStatus.FILLED),
        ],
        id="long",
    ),
    pytest.param(
        SHORT,
        OrderSide.BUY,
        D("0.4500"),
        [
            ("0.6000", OrderStatus.NEW),
            ("0.4501", OrderStatus.NEW),
            ("0.4500", OrderStatus.NEW),  # armed, lowest 0.45
            ("0.4000", OrderStatus.NEW),  # lowest 0.40 -> trigger level 0.408
            ("0.4050", OrderStatus.NEW),
            ("0.4079", OrderStatus.NEW),
            ("0.4080", OrderStatus.FILLED),
        ],
        id="short",
    ),
]


@pytest.mark.parametrize(("side", "stop_side", "activation", "path"), TRAILING_CASES)
async def test_trailing_stop_arms_at_activation_then_triggers_on_the_callback(
    subject: ContractSubject,
    side: PositionSide,
    stop_side: OrderSide,
    activation: Decimal,
    path: list[tuple[str, OrderStatus]],
) -> None:
    await start_at(subject)
    await open_position(subject.port, side)
    placed = await subject.port.create_trailing_stop_order(
        SYMBOL, stop_side, QTY, D("2"), client_order_id="ts-1", activation_price=activation
    )
    assert placed.type is OrderType.TRAILING_STOP_MARKET
    assert (placed.activation_price, placed.callback_rate, placed.reduce_only) == (activation, D("2"), True)

    for mark, expected in path:
        await subject.harness.set_mark_price(SYMBOL, D(mark))
        assert (await subject.port.fetch_order(SYMBOL, "ts-1")).status is expected, f"after mark {mark}"

    assert await position_quantity(subject.port) == 0


@pytest.mark.parametrize(
    ("side", "stop_side", "activation", "holds", "fires"),
    [
        pytest.param(LONG, OrderSide.SELL, D("0.5500"), D("0.5391"), D("0.5390"), id="long"),
        pytest.param(SHORT, OrderSide.BUY, D("0.4500"), D("0.4589"), D("0.4590"), id="short"),
    ],
)
async def test_trailing_stop_arms_when_the_mark_touches_the_activation_price_exactly(
    subject: ContractSubject,
    side: PositionSide,
    stop_side: OrderSide,
    activation: Decimal,
    holds: Decimal,
    fires: Decimal,
) -> None:
    await start_at(subject)
    await open_position(subject.port, side)
    await subject.port.create_trailing_stop_order(
        SYMBOL, stop_side, QTY, D("2"), client_order_id="ts-touch", activation_price=activation
    )

    for mark in (activation, holds):
        await subject.harness.set_mark_price(SYMBOL, mark)
        assert (await subject.port.fetch_order(SYMBOL, "ts-touch")).status is OrderStatus.NEW
    await subject.harness.set_mark_price(SYMBOL, fires)
    assert (await subject.port.fetch_order(SYMBOL, "ts-touch")).status is OrderStatus.FILLED


@pytest.mark.parametrize(
    ("side", "stop_side", "activation"),
    [
        pytest.param(LONG, OrderSide.SELL, START, id="sell-activation-at-mark"),
        pytest.param(LONG, OrderSide.SELL, D("0.4900"), id="sell-activation-below-mark"),
        pytest.param(SHORT, OrderSide.BUY, START, id="buy-activation-at-mark"),
        pytest.param(SHORT, OrderSide.BUY, D("0.5100"), id="buy-activation-above-mark"),
    ],
)
async def test_trailing_stop_whose_activation_is_already_reached_would_trigger_immediately(
    subject: ContractSubject, side: PositionSide, stop_side: OrderSide, activation: Decimal
) -> None:
    await start_at(subject)
    await open_position(subject.port, side)

    with pytest.raises(WouldTriggerImmediately):
        await subject.port.create_trailing_stop_order(
            SYMBOL, stop_side, QTY, D("1"), client_order_id="ts-x", activation_price=activation
        )

    assert await open_ids(subject.port) == []


@pytest.mark.parametrize(
    ("side", "stop_side", "holds", "fires"),
    [
        pytest.param(LONG, OrderSide.SELL, D("0.4951"), D("0.4950"), id="long"),
        pytest.param(SHORT, OrderSide.BUY, D("0.5049"), D("0.5050"), id="short"),
    ],
)
async def test_trailing_stop_without_activation_arms_at_the_current_mark(
    subject: ContractSubject, side: PositionSide, stop_side: OrderSide, holds: Decimal, fires: Decimal
) -> None:
    await start_at(subject)
    await open_position(subject.port, side)
    await subject.port.create_trailing_stop_order(SYMBOL, stop_side, QTY, D("1"), client_order_id="ts-now")

    await subject.harness.set_mark_price(SYMBOL, holds)
    assert (await subject.port.fetch_order(SYMBOL, "ts-now")).status is OrderStatus.NEW
    await subject.harness.set_mark_price(SYMBOL, fires)
    assert (await subject.port.fetch_order(SYMBOL, "ts-now")).status is OrderStatus.FILLED


@pytest.mark.parametrize("callback", [D("0.05"), D("10.5"), D("0")])
async def test_trailing_callback_outside_the_venue_range_is_rejected(
    subject: ContractSubject, callback: Decimal
) -> None:
    await start_at(subject)
    await open_position(subject.port, LONG)

    with pytest.raises(Rejected) as raised:
        await subject.port.create_trailing_stop_order(
            SYMBOL, OrderSide.SELL, QTY, callback, client_order_id="ts-cb"
        )

    assert not isinstance(raised.value, WouldTriggerImmediately)
    assert await open_ids(subject.port) == []


# ---- client order ids, cancel, fetch -------------------------------------------------------------------


async def test_same_client_order_id_twice_never_gives_two_live_orders(subject: ContractSubject) -> None:
    await start_at(subject)
    await open_position(subject.port, LONG)
    await subject.port.create_stop_market_order(
        SYMBOL, OrderSide.SELL, QTY, D("0.4500"), client_order_id="sl-dup"
    )

    with pytest.raises(DuplicateClientOrderId):
        await subject.port.create_stop_market_order(
            SYMBOL, OrderSide.SELL, QTY, D("0.4600"), client_order_id="sl-dup"
        )
    with pytest.raises(DuplicateClientOrderId):
        await subject.port.create_trailing_stop_order(
            SYMBOL, OrderSide.SELL, QTY, D("1"), client_order_id="sl-dup"
        )

    assert await open_ids(subject.port) == ["sl-dup"]
    assert (await subject.port.fetch_order(SYMBOL, "sl-dup")).stop_price == D("0.4500")


async def test_a_client_order_id_is_refused_while_open_and_free_again_once_its_order_ended(
    subject: ContractSubject,
) -> None:
    """Binance: `newClientOrderId` / `clientAlgoId` are unique among *open* orders only."""
    await start_at(subject)
    await open_position(subject.port, LONG, cid="entry-reuse")
    first = await subject.port.create_stop_market_order(
        SYMBOL, OrderSide.SELL, QTY, D("0.4500"), client_order_id="sl-reuse"
    )
    with pytest.raises(DuplicateClientOrderId):
        await subject.port.create_stop_market_order(
            SYMBOL, OrderSide.SELL, QTY, D("0.4400"), client_order_id="sl-reuse"
        )
    await subject.port.cancel_order(SYMBOL, "sl-reuse")

    again = await subject.port.create_stop_market_order(
        SYMBOL, OrderSide.SELL, QTY, D("0.4400"), client_order_id="sl-reuse"
    )
    reentered = await subject.port.create_market_order(
        SYMBOL, OrderSide.BUY, QTY, client_order_id="entry-reuse"
    )

    assert again.status is OrderStatus.NEW
    assert again.venue_order_id != first.venue_order_id
    found = await subject.port.fetch_order(SYMBOL, "sl-reuse")
    assert (found.venue_order_id, found.status, found.stop_price) == (
        again.venue_order_id,
        OrderStatus.NEW,
        D("0.4400"),
    )
    assert await open_ids(subject.port) == ["sl-reuse"]
    assert reentered.status is OrderStatus.FILLED
    assert await position_quantity(subject.port) == 2 * QTY


async def test_client_order_ids_follow_the_venue_pattern(subject: ContractSubject) -> None:
    await start_at(subject)
    await open_position(subject.port, LONG)
    longest = "a" * 36

    await subject.port.create_stop_market_order(
        SYMBOL, OrderSide.SELL, QTY, D("0.4500"), client_order_id=longest
    )
    with pytest.raises(Rejected) as too_long:
        await subject.port.create_stop_market_order(
            SYMBOL, OrderSide.SELL, QTY, D("0.4500"), client_order_id="b" * 37
        )
    with pytest.raises(Rejected) as bad_chars:
        await subject.port.create_stop_market_order(
            SYMBOL, OrderSide.SELL, QTY, D("0.4500"), client_order_id="a b"
        )

    assert too_long.value.code == bad_chars.value.code == RejectCode.INVALID_CLIENT_ORDER_ID
    assert await open_ids(subject.port) == [longest]


async def test_cancel_by_client_order_id_is_final_and_idempotent(subject: ContractSubject) -> None:
    await start_at(subject)
    await open_position(subject.port, LONG)
    await subject.port.create_stop_market_order(
        SYMBOL, OrderSide.SELL, QTY, D("0.4500"), client_order_id="sl-c"
    )

    cancelled = await subject.port.cancel_order(SYMBOL, "sl-c")
    again = await subject.port.cancel_order(SYMBOL, "sl-c")
    await subject.harness.set_mark_price(SYMBOL, D("0.4000"))

    assert cancelled.status is OrderStatus.CANCELED
    assert again.status is OrderStatus.CANCELED
    assert (await subject.port.fetch_order(SYMBOL, "sl-c")).status is OrderStatus.CANCELED
    assert await open_ids(subject.port) == []
    assert await position_quantity(subject.port) == QTY  # the cancelled stop did not fire


async def test_cancelling_a_filled_stop_reports_the_fill(subject: ContractSubject) -> None:
    await start_at(subject)
    await open_position(subject.port, LONG)
    await subject.port.create_stop_market_order(
        SYMBOL, OrderSide.SELL, QTY, D("0.4500"), client_order_id="sl-f"
    )
    await subject.harness.set_mark_price(SYMBOL, D("0.4400"))

    late = await subject.port.cancel_order(SYMBOL, "sl-f")

    assert late.status is OrderStatus.FILLED


async def test_unknown_client_order_id_or_wrong_symbol_is_not_found(subject: ContractSubject) -> None:
    await start_at(subject)
    await open_position(subject.port, LONG)
    await subject.port.create_stop_market_order(
        SYMBOL, OrderSide.SELL, QTY, D("0.4500"), client_order_id="sl-nf"
    )

    with pytest.raises(NotFound):
        await subject.port.fetch_order(SYMBOL, "never-placed")
    with pytest.raises(NotFound):
        await subject.port.cancel_order(SYMBOL, "never-placed")
    with pytest.raises(NotFound):
        await subject.port.fetch_order("BTCUSDT", "sl-nf")


async def test_open_protective_orders_filter_by_symbol(subject: ContractSubject) -> None:
    await start_at(subject)
    await open_position(subject.port, LONG)
    await subject.port.create_stop_market_order(
        SYMBOL, OrderSide.SELL, QTY, D("0.4500"), client_order_id="sl-a"
    )
    await subject.port.create_trailing_stop_order(SYMBOL, OrderSide.SELL, QTY, D("3"), client_order_id="ts-a")

    ours = await subject.port.fetch_open_protective_orders(SYMBOL)
    everywhere = await subject.port.fetch_open_protective_orders()
    elsewhere = await subject.port.fetch_open_protective_orders("BTCUSDT")

    assert sorted(order.client_order_id for order in ours) == ["sl-a", "ts-a"]
    assert sorted(order.client_order_id for order in everywhere) == ["sl-a", "ts-a"]
    assert elsewhere == []


async def test_conditional_orders_are_capped_per_account(subject: ContractSubject) -> None:
    await start_at(subject)
    cap = subject.port.capabilities().max_conditional_orders
    await open_position(subject.port, LONG)
    for index in range(cap):
        await subject.port.create_stop_market_order(
            SYMBOL, OrderSide.SELL, QTY, D("0.4000"), client_order_id=f"cap-{index}"
        )

    with pytest.raises(Rejected) as raised:
        await subject.port.create_stop_market_order(
            SYMBOL, OrderSide.SELL, QTY, D("0.4000"), client_order_id="cap-over"
        )
    assert raised.value.code == RejectCode.MAX_CONDITIONAL_ORDERS

    await subject.port.cancel_order(SYMBOL, "cap-0")
    await subject.port.create_stop_market_order(
        SYMBOL, OrderSide.SELL, QTY, D("0.4000"), client_order_id="cap-again"
    )
    assert len(await open_ids(subject.port)) == cap


# ---- Binance's algo order lifecycle: TRIGGERING, read-after-write lag ----------------------------------


async def test_a_fired_stop_sitting_in_triggering_is_triggered_protects_nothing_and_fills_later(
    subject: ContractSubject,
) -> None:
    await start_at(subject)
    await open_position(subject.port, LONG)
    await subject.harness.delay_triggers(5.0)
    await subject.port.create_stop_market_order(
        SYMBOL, OrderSide.SELL, QTY, D("0.4500"), client_order_id="sl-trg"
    )

    await subject.harness.set_mark_price(SYMBOL, D("0.4400"))

    fired = await subject.port.fetch_order(SYMBOL, "sl-trg")
    assert fired.status is OrderStatus.TRIGGERED
    assert not fired.is_open
    assert await open_ids(subject.port) == []
    assert await position_quantity(subject.port) == QTY  # nothing filled yet
    with pytest.raises(DuplicateClientOrderId):  # not final: its id is still taken
        await subject.port.create_stop_market_order(
            SYMBOL, OrderSide.SELL, QTY, D("0.4300"), client_order_id="sl-trg"
        )

    await subject.harness.advance(5.0)

    filled = await subject.port.fetch_order(SYMBOL, "sl-trg")
    assert filled.status is OrderStatus.FILLED
    assert await position_quantity(subject.port) == 0


async def test_a_just_placed_stop_may_read_as_not_found_yet_it_exists(subject: ContractSubject) -> None:
    await start_at(subject)
    await open_position(subject.port, LONG)
    await subject.harness.lag_reads(3.0)

    placed = await subject.port.create_stop_market_order(
        SYMBOL, OrderSide.SELL, QTY, D("0.4500"), client_order_id="sl-lag"
    )

    assert placed.status is OrderStatus.NEW
    with pytest.raises(NotFound):
        await subject.port.fetch_order(SYMBOL, "sl-lag")
    assert await open_ids(subject.port) == []
    with pytest.raises(DuplicateClientOrderId):  # it exists: a resend cannot make a second one
        await subject.port.create_stop_market_order(
            SYMBOL, OrderSide.SELL, QTY, D("0.4500"), client_order_id="sl-lag"
        )
    await subject.harness.advance(3.0)
    assert (await subject.port.fetch_order(SYMBOL, "sl-lag")).status is OrderStatus.NEW
    assert await open_ids(subject.port) == ["sl-lag"]


# ---- rate limits ---------------------------------------------------------------------------------------


async def _small_order_quantity(port: ExchangePort) -> Decimal:
    market = (await port.load_markets())[SYMBOL]
    wanted = market.min_notional * D("1.2") / START
    return max(market.round_quantity(wanted, ROUND_CEILING), market.min_quantity)


async def _spend_budget(
    port: ExchangePort, qty: Decimal, attempts: int, prefix: str
) -> tuple[int, RateLimited]:
    """Alternate small buys and sells until the venue says RateLimited; returns (accepted, the answer)."""
    for index in range(attempts):
        side = OrderSide.BUY if index % 2 == 0 else OrderSide.SELL
        try:
            await port.create_market_order(SYMBOL, side, qty, client_order_id=f"{prefix}-{index}")
        except RateLimited as limited:
            return index, limited
    raise AssertionError(f"no RateLimited after {attempts} orders")


async def test_order_budget_answers_rate_limited_with_a_wait_then_recovers(subject: ContractSubject) -> None:
    await start_at(subject)
    budget = min(subject.port.capabilities().order_rate_budgets, key=lambda b: b.limit)
    qty = await _small_order_quantity(subject.port)

    accepted, limited = await _spend_budget(subject.port, qty, 2 * budget.limit + 1, "rl")

    assert 1 <= accepted <= 2 * budget.limit
    assert 0 < limited.retry_after <= budget.window_seconds
    await subject.harness.advance(limited.retry_after)
    # Binance answers an order-count 429 (-1015) without a Retry-After header (it promises one only for its
    # IP limits): the wait the port names must still be long enough for a new window.
    recovered = await subject.port.create_market_order(SYMBOL, OrderSide.BUY, qty, client_order_id="rl-after")
    assert recovered.status is OrderStatus.FILLED


async def test_ignoring_rate_limited_gets_the_account_banned(subject: ContractSubject) -> None:
    await start_at(subject)
    budget = min(subject.port.capabilities().order_rate_budgets, key=lambda b: b.limit)
    qty = await _small_order_quantity(subject.port)
    await _spend_budget(subject.port, qty, 2 * budget.limit + 1, "ban")

    banned: Banned | None = None
    for index in range(20):
        try:
            await subject.port.create_market_order(
                SYMBOL, OrderSide.BUY, qty, client_order_id=f"ban-more-{index}"
            )
        except RateLimited:
            continue
        except Banned as error:
            banned = error
            break
    assert banned is not None

    with pytest.raises(Banned):
        await subject.port.fetch_positions()  # a ban refuses reads too


# ---- faults and ambiguous outcomes ---------------------------------------------------------------------


async def test_timeout_after_accept_is_outcome_unknown_and_fetch_by_client_id_finds_the_order(
    subject: ContractSubject,
) -> None:
    await start_at(subject)
    await open_position(subject.port, LONG)
    await subject.harness.fail_next(CallKind.CREATE_ORDER, FaultKind.TIMEOUT_AFTER_ACCEPT)

    with pytest.raises(OutcomeUnknown) as raised:
        await subject.harness.drive(
            subject.port.create_stop_market_order(
                SYMBOL, OrderSide.SELL, QTY, D("0.4500"), client_order_id="sl-amb"
            )
        )

    assert raised.value.client_order_id == "sl-amb"
    resolved = await subject.port.fetch_order(SYMBOL, "sl-amb")
    assert resolved.status is OrderStatus.NEW
    assert resolved.stop_price == D("0.4500")
    with pytest.raises(DuplicateClientOrderId):  # a blind resend cannot create a second stop
        await subject.port.create_stop_market_order(
            SYMBOL, OrderSide.SELL, QTY, D("0.4500"), client_order_id="sl-amb"
        )
    assert await open_ids(subject.port) == ["sl-amb"]


async def test_timed_out_market_order_is_resolved_by_client_id_not_resent(subject: ContractSubject) -> None:
    await start_at(subject)
    await subject.harness.fail_next(CallKind.CREATE_ORDER, FaultKind.TIMEOUT_AFTER_ACCEPT)

    with pytest.raises(OutcomeUnknown):
        await subject.harness.drive(
            subject.port.create_market_order(SYMBOL, OrderSide.BUY, QTY, client_order_id="entry-amb")
        )

    assert (await subject.port.fetch_order(SYMBOL, "entry-amb")).status is OrderStatus.FILLED
    assert await position_quantity(subject.port) == QTY


@pytest.mark.parametrize("fault", [FaultKind.NETWORK_ERROR_BEFORE_SEND, FaultKind.SERVER_ERROR])
async def test_failure_before_execution_is_retryable_with_the_same_client_id(
    subject: ContractSubject, fault: FaultKind
) -> None:
    await start_at(subject)
    await open_position(subject.port, LONG)
    await subject.harness.fail_next(CallKind.CREATE_ORDER, fault)

    with pytest.raises(Retryable):
        await subject.harness.drive(
            subject.port.create_stop_market_order(
                SYMBOL, OrderSide.SELL, QTY, D("0.4500"), client_order_id="sl-r"
            )
        )
    with pytest.raises(NotFound):
        await subject.port.fetch_order(SYMBOL, "sl-r")

    retried = await subject.port.create_stop_market_order(
        SYMBOL, OrderSide.SELL, QTY, D("0.4500"), client_order_id="sl-r"
    )
    assert retried.status is OrderStatus.NEW
    assert await open_ids(subject.port) == ["sl-r"]


async def test_timed_out_cancel_is_outcome_unknown_and_fetch_shows_the_cancel(
    subject: ContractSubject,
) -> None:
    await start_at(subject)
    await open_position(subject.port, LONG)
    await subject.port.create_stop_market_order(
        SYMBOL, OrderSide.SELL, QTY, D("0.4500"), client_order_id="sl-cx"
    )
    await subject.harness.fail_next(CallKind.CANCEL_ORDER, FaultKind.TIMEOUT_AFTER_ACCEPT)

    with pytest.raises(OutcomeUnknown):
        await subject.harness.drive(subject.port.cancel_order(SYMBOL, "sl-cx"))

    assert (await subject.port.fetch_order(SYMBOL, "sl-cx")).status is OrderStatus.CANCELED


async def test_failed_reads_are_retryable_and_change_nothing(subject: ContractSubject) -> None:
    await start_at(subject)
    await open_position(subject.port, LONG)
    # Lost however often it is asked: a port may send a late read once more (the ccxt venues do,
    # `engine.venues.read_hedge`), so the second request's answer is lost too; what is left unmet is dropped.
    await subject.harness.fail_next(CallKind.FETCH_POSITIONS, FaultKind.TIMEOUT_AFTER_ACCEPT, count=2)
    with pytest.raises(Retryable):
        await subject.harness.drive(subject.port.fetch_positions())
    await subject.harness.clear_faults()

    await subject.harness.fail_next(CallKind.FETCH_BALANCE, FaultKind.SERVER_ERROR)
    with pytest.raises(Retryable):
        await subject.harness.drive(subject.port.fetch_balance())

    assert await position_quantity(subject.port) == QTY

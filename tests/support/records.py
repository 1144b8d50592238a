"""Records written the way the engine writes them, for tests that stage what a dead engine left behind."""

from __future__ import annotations

from decimal import Decimal

from storage.repositories import OrderPurpose, OrderRecordStatus, PositionStatus, Store


async def entry_recorded(
    store: Store,
    symbol: str,
    *,
    quantity: Decimal = Decimal("1"),
    sent: bool = True,
    answered: OrderRecordStatus | None = None,
) -> int:
    """An entry recorded as `Engine._open_position` records it: its order `pending`, then its position
    `entry_placed` just before the send (`sent`); `answered`: what the engine recorded after. Returns the
    position's id."""
    position = await store.create_position(symbol=symbol, exchange="sim", side="long", quantity=quantity)
    cid = f"x-{position.id}-en0"
    await store.record_order(
        client_order_id=cid,
        position_id=position.id,
        purpose=OrderPurpose.ENTRY,
        side="buy",
        type="market",
        quantity=quantity,
    )
    if sent:
        await store.set_position_status(position.id, PositionStatus.ENTRY_PLACED)
    if answered is not None:
        await store.set_order_status(cid, answered)
    return position.id

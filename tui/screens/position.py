"""One position, every field: what `Enter` on a positions row opens.

The table abbreviates to fit the terminal; this screen does not: symbol, side, quantity, entry, mark, PnL,
both stops (price, whether the venue confirmed them, the orders behind them with their client and venue ids
and state as recorded), how long the position has been without both stops, and the last error. It re-reads
the engine's snapshot every second and the position's orders every two, so it is never a stale picture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from engine.engine import PositionView
from storage.repositories import OrderPurpose, OrderRecord
from tui import formatting

ORDERS_EVERY_SECONDS = 2.0
# A stop whose confirmation is in doubt (a gap in the account stream, a mark through it): not known gone.
UNVERIFIED = "UNVERIFIED: in doubt, asked for by its id (not sent again until the venue says it is gone)"


class PositionDetailScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,enter,q", "close", "Close", show=False)]

    def __init__(self, view: PositionView, *, uncovered: bool):
        super().__init__(classes="dialog-screen")
        self.view = view
        self.uncovered = uncovered  # past its grace period (the gauge counts it)
        self.orders: Sequence[OrderRecord] | None = None
        self.orders_error = ""

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide-dialog", id="position-dialog") as dialog:
            dialog.border_title = f"Position {self.view.position_id}: {self.view.symbol}"
            with VerticalScroll(id="position-scroll"):
                yield Static(self.describe(), id="position-detail", markup=False)
            yield Static("esc / enter: close", classes="dialog-keys", markup=False)

    def on_mount(self) -> None:
        # The dashboard's frames build full views of the rows on screen only: this one's too while open.
        detailed = getattr(self.app, "detailed_positions", None)
        if detailed is not None:
            detailed.add(self.view.position_id)
        self.set_interval(1.0, self.refresh_view, name="position detail")
        self.load_orders()
        self.set_interval(ORDERS_EVERY_SECONDS, self.load_orders, name="position orders")

    def on_unmount(self) -> None:
        detailed = getattr(self.app, "detailed_positions", None)
        if detailed is not None:
            detailed.discard(self.view.position_id)

    def refresh_view(self) -> None:
        snapshot = getattr(self.app, "last_snapshot", None)
        if snapshot is None:
            return
        view = next((p for p in snapshot.positions if p.position_id == self.view.position_id), None)
        if view is not None:
            self.view = view
            self.uncovered = view.position_id in snapshot.coverage.uncovered_ids
        self.query_one("#position-detail", Static).update(self.describe(closed=view is None))

    @work(
        exclusive=True, group="position-orders", exit_on_error=False, description="read a position's orders"
    )
    async def load_orders(self) -> None:
        try:
            self.orders = await self.app.feed.position_orders(self.view.position_id)  # type: ignore[attr-defined]
            self.orders_error = ""
        except Exception as exc:  # the database may be away: say so, keep the rest
            self.orders_error = f"could not read the orders: {type(exc).__name__}: {exc}"
        self.query_one("#position-detail", Static).update(self.describe())

    def action_close(self) -> None:
        self.dismiss(None)

    def describe(self, *, closed: bool = False) -> Text:
        v = self.view
        price = formatting.price
        text = Text(no_wrap=False)

        def line(label: str, value: str, style: str = "") -> None:
            text.append(f"{label:<18}", style="bold")
            text.append(value + "\n", style=style)

        if closed:
            line("state", "no longer open (closed or no longer tracked)", "bold")
        if v.covered:
            coverage = "covered: both stops confirmed by the venue"
        elif self.uncovered:
            coverage = "UNCOVERED"
        else:
            coverage = "UNCOVERED (inside its grace period: being protected)"
        line("symbol", v.symbol)
        line("side", v.side.upper())
        line("quantity", price(v.quantity))
        line("entry", price(v.entry_price))
        line("mark", price(v.mark_price))
        line("PnL", formatting.signed_percent(v.pnl_percent))
        line("coverage", coverage, "" if v.covered else "bold")
        line("time unprotected", "—" if v.covered else formatting.duration(v.unprotected_seconds))
        line(
            "stop-loss",
            f"{price(v.stop_loss_price)}, "
            + (
                "confirmed on the venue"
                if v.has_stop_loss
                else UNVERIFIED
                if v.stop_loss_unverified
                else "MISSING: not confirmed on the venue"
            ),
        )
        # A native trail's phase is the venue's own ("native" once it is confirmed): its kind said once.
        same = v.trailing_phase == v.trailing_kind
        trailing = v.trailing_kind if same else f"{v.trailing_kind}, {v.trailing_phase}"
        if v.activation_price is not None:
            trailing += f", activation {price(v.activation_price)}"
        if v.distance_to_activation_percent is not None:
            trailing += f" ({v.distance_to_activation_percent:+.2f}% away)"
        if v.trailing_stop_price is not None:
            trailing += f", stop {price(v.trailing_stop_price)}"
        if v.trailing_kind == "native":
            trailing += (
                ", follows the last traded price at a fixed distance (Bybit)"
                if v.trailing_follows == "last"
                else ", follows the mark price"
            )
        trailing += (
            ", confirmed"
            if v.has_trailing_stop
            else f", {UNVERIFIED}"
            if v.trailing_stop_unverified
            else ", MISSING: not confirmed"
        )
        line("trailing stop", trailing)
        line(
            "liquidation",
            "not stated by the venue yet"
            if v.liquidation_price is None
            else f"{price(v.liquidation_price)} as the venue states it; a hard stop beyond it is moved inside it",
        )
        line("last error", v.last_error or "—")
        text.append("\nOrders that may be live on the venue (as recorded)\n", style="bold")
        if self.orders_error:
            text.append(self.orders_error + "\n")
        elif self.orders is None:
            text.append("reading…\n")
        elif not self.orders:
            text.append("none\n")
        for order in self.orders or ():
            what = {OrderPurpose.STOP_LOSS: "stop-loss", OrderPurpose.TRAILING_STOP: "trailing stop"}.get(
                order.purpose, order.purpose.value
            )
            trigger = order.trigger_price if order.trigger_price is not None else order.activation_price
            text.append(f"{what:<14}", style="bold")
            text.append(
                f"{order.type} {price(order.quantity)} @ {price(trigger)}"
                + (f", callback {order.callback_percent}%" if order.callback_percent is not None else "")
                + f"\n{'':<14}{order.status.value}; venue id {order.exchange_order_id or '—'}; "
                f"client id {order.client_order_id}"
                + (f"; error: {order.error}" if order.error else "")
                + "\n"
            )
        return text

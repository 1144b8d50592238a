"""`p`: the re-protect plan (which positions get which orders), run on confirmation, result per position."""

from __future__ import annotations

import logging
from typing import ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from engine.engine import PlannedProtection, ProtectionResult
from tui import formatting
from tui.feed import DashboardFeed
from tui.screens.fit import rest_width, table_rows_that_fit

log = logging.getLogger(__name__)


class ReprotectScreen(ModalScreen[list[ProtectionResult] | None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "run_plan", "Protect now", show=False),
        Binding("escape,n,enter", "close", "Close", show=False),
    ]

    class Finished(Message):
        def __init__(self, results: list[ProtectionResult] | None, error: str | None):
            super().__init__()
            self.results = results
            self.error = error

    def __init__(self, feed: DashboardFeed, plan: list[PlannedProtection]):
        super().__init__(classes="dialog-screen")
        self._feed = feed
        self._plan = plan
        self.state = "planned"  # planned | running | done
        self.results: list[ProtectionResult] | None = None

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide-dialog") as dialog:
            dialog.border_title = "Protect uncovered positions now"
            yield Static(self._intro(), id="reprotect-status", classes="dialog-body", markup=False)
            yield DataTable(id="reprotect-plan", cursor_type="none", show_cursor=False)
            yield Static(
                "[y] protect now    [n / esc] cancel",
                id="reprotect-keys",
                classes="dialog-keys",
                markup=False,
            )

    def on_mount(self) -> None:
        table = self.query_one("#reprotect-plan", DataTable)
        # Screen margin, border, padding, the intro (up to 4 lines wrapped) and its margin, the table's
        # margin and the key line: 15 lines.
        table.styles.max_height = table_rows_that_fit(self.app.size.height, 15)
        # Orders and Result share what the terminal leaves and wrap (one order per line): at 80 columns the
        # Result column was cut off entirely.
        fixed = (8, 12, 5)
        flexible = rest_width(self.app.size.width, (*fixed, 0), minimum=30)
        orders_width = min(44, max(20, flexible * 2 // 5))
        table.add_column("Position", key="position", width=fixed[0])
        table.add_column("Symbol", key="symbol", width=fixed[1])
        table.add_column("Side", key="side", width=fixed[2])
        table.add_column("Orders to place", key="orders", width=orders_width)
        table.add_column("Result", key="result", width=flexible - orders_width)
        self._fill({})
        # The venue's hold is said as it stands (its end drew near, or it ended), not as when the plan opened.
        self.set_interval(1.0, self._show_status)

    def _fill(self, results: dict[int, ProtectionResult]) -> None:
        """The plan's rows, with each position's result once known. Rows are added again rather than updated
        in place: a row's height is measured when it is added, and a longer result must wrap, not be cut."""
        table = self.query_one("#reprotect-plan", DataTable)
        table.clear()
        for item in self._plan:
            orders = "\n".join(
                f"{order.kind}" + (f" @ {formatting.price(order.price)}" if order.price is not None else "")
                for order in item.orders
            )
            result = results.get(item.position_id)
            if result is None:
                detail = Text("planned" + (f" (last error: {item.last_error})" if item.last_error else ""))
            elif result.covered:
                detail = Text("covered")
            else:
                detail = Text(f"NOT covered: {result.detail}", style="bold")
            table.add_row(
                str(item.position_id),
                item.symbol,
                item.side.upper(),
                Text(orders or "verify only"),
                detail,
                key=str(item.position_id),
                height=None,
            )

    def _intro(self) -> str:
        count = len(self._plan)
        return (
            f"{count} uncovered position{'s' if count != 1 else ''}. Each gets the orders below now, "
            "skipping its retry backoff; an order whose earlier outcome is unknown is looked up by its client "
            "order id first, never sent twice." + self._held()
        )

    def _held(self) -> str:
        """What every order waits for now, said (a ban, a 429's hold): `p` during a ban spun for 30 s with
        nothing said, then read "rate limited" (opme49)."""
        held = self._feed.snapshot().orders_held
        if held is None:
            return ""
        seconds, why = held
        return f" No order can go before then: {why} ({formatting.duration(seconds)} from now)."

    def action_run_plan(self) -> None:
        if self.state != "planned":
            return
        self.state = "running"
        self._show_status()
        self.query_one("#reprotect-keys", Static).update("running…")
        self.run_plan()

    def _show_status(self) -> None:
        if self.state == "planned":
            self.query_one("#reprotect-status", Static).update(self._intro())
        elif self.state == "running":
            self.query_one("#reprotect-status", Static).update(
                "Protecting… (the engine keeps running)" + self._held()
            )

    @work(exclusive=True, group="command", exit_on_error=False, description="re-protect uncovered positions")
    async def run_plan(self) -> None:
        try:
            results = await self._feed.reprotect_uncovered(self._plan)
        except Exception as exc:  # shown on this screen and logged; the engine keeps running
            log.exception("operator command failed")
            self.post_message(self.Finished(None, f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(self.Finished(results, None))

    def on_reprotect_screen_finished(self, message: Finished) -> None:
        self.state = "done"
        self.results = message.results
        status = self.query_one("#reprotect-status", Static)
        if message.results is None:
            status.update(f"Re-protect failed: {message.error}")
        else:
            covered = sum(r.covered for r in message.results)
            status.update(f"Done: {covered}/{len(message.results)} covered.")
            self._fill({result.position_id: result for result in message.results})
        self.query_one("#reprotect-keys", Static).update("[esc / enter] close")

    def action_close(self) -> None:
        if self.state == "running":
            self.app.notify("Re-protect is still running; the result appears here when it finishes.")
            return
        self.dismiss(self.results)

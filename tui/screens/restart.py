"""`r` (after its confirmation): restart the trailing-stop manager in-process and show its report."""

from __future__ import annotations

import logging
from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Static

from engine.commands import ProtectionRestartRefused
from engine.engine import StartupReport
from tui.feed import DashboardFeed

log = logging.getLogger(__name__)


class RestartReportScreen(ModalScreen[StartupReport | None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,enter,q", "close", "Close", show=False)]

    class Finished(Message):
        def __init__(self, report: StartupReport | None, error: str | None):
            super().__init__()
            self.report = report
            self.error = error

    def __init__(self, feed: DashboardFeed):
        super().__init__(classes="dialog-screen")
        self._feed = feed
        self.report: StartupReport | None = None
        self.running = True

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog") as dialog:
            dialog.border_title = "Restart of the trailing-stop manager"
            yield Static(
                "Restarting: stopping the guards, reloading every position from the database, verifying "
                "against the exchange, re-arming…",
                id="restart-report",
                classes="dialog-body",
                markup=False,
            )
            yield Static("running…", id="restart-keys", classes="dialog-keys", markup=False)

    def on_mount(self) -> None:
        self.restart()

    @work(exclusive=True, group="command", exit_on_error=False, description="restart the TS manager")
    async def restart(self) -> None:
        try:
            report = await self._feed.restart_protection()
        except ProtectionRestartRefused as exc:  # said by the engine's log already; no traceback
            self.post_message(self.Finished(None, str(exc)))
            return
        except Exception as exc:  # shown on this screen and logged; the engine keeps running
            log.exception("operator command failed")
            self.post_message(self.Finished(None, f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(self.Finished(report, None))

    def on_restart_report_screen_finished(self, message: Finished) -> None:
        self.running = False
        self.report = message.report
        body = self.query_one("#restart-report", Static)
        if message.report is None:
            body.update(f"Restart FAILED: {message.error}\nPositions keep the stops already on the exchange.")
        else:
            r = message.report
            lines = [
                "Protection restarted.",
                "",
                f"  restored       {r.restored:>4}   protection found live on the exchange",
                f"  re-protected   {r.reprotected:>4}   needed new protective orders",
                f"  adopted        {r.adopted:>4}   on the exchange but not in the database",
                f"  failed         {r.failed:>4}   still uncovered (retried with backoff)",
            ]
            if r.failed_symbols:
                lines.append(f"  failed: {', '.join(r.failed_symbols)}")
            # And what else the report says (closed, gone, in doubt, kept unread…), as the log says it: a
            # restart in a ban read "restored 0 … failed 0" here, the positions it kept on the running
            # manager's word unsaid.
            lines.extend(f"  {part}" for part in r.describe().split("; ")[1:])
            body.update("\n".join(lines))
        self.query_one("#restart-keys", Static).update("[esc / enter / q] close")
        # The result also goes to the log panel (as a toast too): it outlives this dialog.
        if message.report is None:
            self.app.notify(f"Protection restart FAILED: {message.error}", severity="error", timeout=8)
        else:
            self.app.notify(
                f"Protection restarted: {message.report.describe()}",
                severity="warning" if message.report.failed else "information",
                timeout=8,
            )

    def action_close(self) -> None:
        if self.running:
            self.app.notify("The restart is still running; its report appears here when it finishes.")
            return
        self.dismiss(self.report)

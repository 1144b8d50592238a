"""`h`: every health line in full, wrapped to the terminal — the panel abbreviates to fit (80×24 cuts it
to a few words), this screen never does. Re-read from the painted snapshot every second."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from protection.health import ComponentHealth, stream_words, worst_state
from tui.widgets.health import STATE_WORDS, full_name


class HealthDetailScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,enter,h,q", "close", "Close", show=False)]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide-dialog", id="health-dialog") as dialog:
            dialog.border_title = "Health"
            with VerticalScroll(id="health-scroll"):
                yield Static(self.describe(), id="health-detail", markup=False)
            yield Static("esc / enter: close", classes="dialog-keys", markup=False)

    def on_mount(self) -> None:
        self.set_interval(1.0, self.refresh_detail, name="health detail")

    def refresh_detail(self) -> None:
        self.query_one("#health-detail", Static).update(self.describe())

    def components(self) -> Sequence[ComponentHealth]:
        snapshot = getattr(self.app, "last_snapshot", None)
        return snapshot.health if snapshot is not None else ()

    def describe(self) -> Text:
        components = self.components()
        text = Text()
        if not components:
            text.append("not measured yet")
            return text
        if self.is_mounted:
            overall = STATE_WORDS[worst_state(c.state for c in components)]
            self.query_one("#health-dialog").border_title = f"Health: {overall}"
        for index, component in enumerate(components):
            if index:
                text.append("\n")
            text.append(f"{full_name(component)}: {STATE_WORDS[component.state]}", style="bold")
            if component.reason:
                text.append(f"\n  cause: {component.reason}\n  measured: {component.summary}")
            else:
                text.append(f" · {component.summary}")
        # The panel's last line, here too: the view left it out, the two naming different sets (opme50).
        if streams := stream_words(c.measurements for c in components):
            text.append("\nstreams: ", style="bold")
            text.append(" · ".join(words for _, _, words in streams))
        return text

    def action_close(self) -> None:
        self.dismiss(None)

"""A yes/no question for anything that changes what the engine does on the exchange or stops it. A question
whose facts change while it is asked (what quitting leaves behind, the position to close) reads them again
while it is open: `y` answers what the dialog says now."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes", show=False),
        Binding("n,escape", "answer(False)", "No", show=False),
    ]

    def __init__(
        self,
        title: str,
        body: str,
        *,
        confirm_label: str,
        danger: bool = True,
        live_body: Callable[[], str] | None = None,
        every: float = 1.0,
    ):
        """`live_body`: the body as it is now, read every `every` seconds while the dialog is open."""
        super().__init__(classes="dialog-screen")
        self._title = title
        self._body = body
        self._confirm_label = confirm_label
        self._danger = danger
        self._live_body = live_body
        self._every = every

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog") as dialog:
            dialog.border_title = self._title
            yield Static(self._body, id="confirm-body", classes="dialog-body", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button(
                    Text(f"{self._confirm_label} [y]"),
                    id="confirm-yes",
                    variant="error" if self._danger else "primary",
                )
                yield Button(Text("Cancel [n / esc]"), id="confirm-no")

    def on_mount(self) -> None:
        # The safe answer has the focus: Enter on a dialog that popped up unexpectedly does nothing harmful.
        self.query_one("#confirm-no", Button).focus()
        if self._live_body is not None:
            self.set_interval(self._every, self._read_body_again, name="confirm-body")

    def _read_body_again(self) -> None:
        assert self._live_body is not None
        body = self._live_body()
        if body != self._body:
            self._body = body
            self.query_one("#confirm-body", Static).update(body)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "confirm-yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)

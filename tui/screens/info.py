"""Screens that inform: the key help, the lease refusal (offer read-only), a start-up failure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Static

from storage.lease import LeaseHolder
from tui import keys
from tui.screens.fit import rest_width, table_rows_that_fit

OTHER_KEYS = (
    ("ctrl+p", "Command palette: every command above, the theme, screenshots"),
    ("tab / shift+tab", "Move between the positions table, the log and the waves"),
    ("↑ ↓ pgup pgdn", "Move in the focused table (the selected position is the one `x` closes)"),
    ("home / end", "The first / last row of the focused table"),
    ("enter", "The selected position's detail: every field, both stops with their order ids, last error"),
    ("s (log focused)", "Cycle the log's severity filter: all, warnings, errors"),
    ("esc", "Close a dialog; leave the filter; back from the log"),
    ("ctrl+q", "Quit, as the quit key does (ctrl+c does not quit: it says which keys do)"),
)


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,enter,question_mark,q", "close", "Close", show=False)
    ]

    def __init__(self, active_keymap: Mapping[str, str], *, read_only: bool):
        super().__init__(classes="dialog-screen")
        self._active_keymap = active_keymap
        self._read_only = read_only

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide-dialog") as dialog:
            dialog.border_title = "Keys"
            yield DataTable(id="help-keys", cursor_type="none", show_cursor=False)
            note = (
                "Read-only: commands are sent to the engine that holds the lease, which executes them."
                if self._read_only
                else "Keys are remappable in [tui.keys] of config.toml. Quitting leaves exchange stops in place."
            )
            yield Static(note, classes="dialog-keys", markup=False)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        # Screen margin, border, padding, the table's margin and the note below it: 11 lines.
        table.styles.max_height = table_rows_that_fit(self.app.size.height, 11)
        table.add_column("Key", key="key", width=16)
        table.add_column("Command", key="command", width=11)
        # The description takes what the terminal leaves and wraps: never cut at 80 or 120 columns.
        table.add_column("What it does", key="what", width=rest_width(self.app.size.width, (16, 11)))
        for command in keys.COMMANDS:
            table.add_row(
                keys.key_for(command, self._active_keymap, self.app),
                command.label,
                Text(command.description + (" (asks first)" if command.confirm else "")),
                key=command.id,
                height=None,
            )
        for key, what in OTHER_KEYS:
            table.add_row(key, "", Text(what), height=None)

    def action_close(self) -> None:
        self.dismiss(None)


class LeaseHeldScreen(ModalScreen[bool]):
    """Another engine trades this account: say who, and offer to watch instead (F9)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("o", "answer(True)", "Read-only", show=False),
        Binding("q,escape", "answer(False)", "Quit", show=False),
    ]

    def __init__(self, message: str, holder: LeaseHolder | None):
        super().__init__(classes="dialog-screen")
        self._message = message
        self._holder = holder

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog") as dialog:
            dialog.border_title = "This account is already traded"
            # (The message names the holder already: "already traded by pid …"; said once.)
            yield Static(
                f"{self._message}.\n\nThis dashboard will not trade. It can open read-only: "
                "it then watches the database that engine writes (positions, coverage, health, waves, "
                "errors) and hands your commands (re-protect, restart, entries, close) to that engine, "
                "which executes them and answers in the log panel.",
                id="lease-body",
                classes="dialog-body",
                markup=False,
            )
            with Horizontal(classes="dialog-buttons"):
                yield Button(Text("Open read-only [o]"), id="lease-read-only", variant="primary")
                yield Button(Text("Quit [q]"), id="lease-quit")

    def on_mount(self) -> None:
        self.query_one("#lease-read-only", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "lease-read-only")

    def action_answer(self, read_only: bool) -> None:
        self.dismiss(read_only)


class StartFailedScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("q,escape,enter", "close", "Quit", show=False)]

    def __init__(self, message: str, log_file: str):
        super().__init__(classes="dialog-screen")
        self._message = message
        self._log_file = log_file

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog") as dialog:
            dialog.border_title = "The engine did not start"
            yield Static(
                f"{self._message}\n\nOrders already on the exchange stay in place. Details: {self._log_file}",
                id="start-failed-body",
                classes="dialog-body",
                markup=False,
            )
            yield Static("[q / esc / enter] quit", classes="dialog-keys", markup=False)

    def action_close(self) -> None:
        self.dismiss(None)

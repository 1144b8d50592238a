"""The dashboard's commands, in one registry.

Each entry is one operator command: its binding id (the key name in `[tui.keys]`), the action it runs, its
default key, a short label for the footer and a sentence for the help screen and the command palette. The
footer, the `?` help screen, the command palette and the keymap from config.toml are all derived from this
tuple, so a command cannot appear in one place and be missing (or named differently) in another.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from textual.app import App
from textual.binding import Binding

from engine.config import KeySettings


@dataclass(frozen=True, slots=True)
class DashboardCommand:
    id: str  # binding id == the key's name in [tui.keys]
    action: str  # Textual action on the app
    default_key: str
    label: str  # footer
    title: str  # command palette
    description: str  # help screen and command palette
    trading: bool = False  # changes what the engine does: refused when read-only
    confirm: bool = False  # goes through a confirmation screen
    footer: bool = True  # in the footer (80 columns hold the first nine; the rest are named where they act)


COMMANDS: tuple[DashboardCommand, ...] = (
    DashboardCommand(
        "protect_uncovered",
        "protect_uncovered",
        "p",
        "Protect",
        "Protect uncovered positions now",
        "Protect uncovered positions now: shows which positions get which orders, runs on confirmation, "
        "reports the result per position",
        trading=True,
        confirm=True,
    ),
    DashboardCommand(
        "restart_protection",
        "restart_protection",
        "r",
        "Restart TS",
        "Restart the trailing-stop manager",
        "Restart the trailing-stop manager in-process and show its report "
        "(restored / re-protected / adopted / failed)",
        trading=True,
        confirm=True,
    ),
    DashboardCommand(
        "toggle_entries",
        "toggle_entries",
        "e",
        "Entries",
        "Pause / resume new entries",
        "Pause or resume new entries (open positions stay protected either way)",
        trading=True,
    ),
    DashboardCommand(
        "close_position",
        "close_position",
        "x",
        "Close",
        "Close the selected position",
        "Close the selected position at market, reduce-only",
        trading=True,
        confirm=True,
    ),
    DashboardCommand(
        "only_uncovered",
        "only_uncovered",
        "u",
        "Uncov",
        "Show only uncovered positions",
        "Show only uncovered positions (toggle)",
    ),
    DashboardCommand(
        "filter", "filter", "slash", "Filter", "Filter by symbol", "Filter positions and the log by symbol"
    ),
    DashboardCommand(
        "focus_log", "focus_log", "l", "Log", "Focus the error log", "Focus the timeout and error log"
    ),
    DashboardCommand(
        "health_detail",
        "health_detail",
        "h",
        "Health",
        "Health: every line in full",
        "Show every health line in full: state, cause and the measurement behind it",
        footer=False,  # the health panel's border names the key
    ),
    DashboardCommand(
        "history",
        "history",
        "y",
        "History",
        "History: coverage over time",
        "Coverage history from the database: per hour (24 h) and per day (7 days), uncovered spans, "
        "the worst time unprotected, this shift's summary",
        footer=False,  # 80 columns hold nine in the footer: the help screen and the palette name it
    ),
    DashboardCommand(
        "help", "help", "question_mark", "Help", "Help: every key", "Show every key and what it does"
    ),
    DashboardCommand(
        "quit",
        "quit",
        "q",
        "Quit",
        "Quit (exchange stops stay in place)",
        "Quit the dashboard: stops taking signals; exchange stops stay in place",
        confirm=True,
    ),
)

BY_ID: Mapping[str, DashboardCommand] = {command.id: command for command in COMMANDS}
TRADING_ACTIONS = frozenset(command.action for command in COMMANDS if command.trading)

# Palette-only entries (no key of their own): the action and its description.
PALETTE_ONLY: tuple[tuple[str, str, str], ...] = (
    ("Switch theme (dark / light)", "toggle_dark_light", "Switch between the dark and the light theme"),
    ("Severity filter of the log", "cycle_log_severity", "Cycle the log between all, warnings and errors"),
)


def bindings() -> list[Binding]:
    """The app's BINDINGS: one per command, with its id so that `set_keymap` can remap it."""
    return [
        Binding(
            command.default_key,
            command.action,
            command.label,
            show=command.footer,
            id=command.id,
            tooltip=command.description,
        )
        for command in COMMANDS
    ]


def keymap(keys: KeySettings) -> dict[str, str]:
    """Binding id -> key from `[tui.keys]`, for `App.set_keymap` (only keys that differ from the default)."""
    configured = keys.model_dump()
    return {
        command.id: configured[command.id]
        for command in COMMANDS
        if configured.get(command.id, command.default_key) != command.default_key
    }


def key_for(command: DashboardCommand, active_keymap: Mapping[str, str], app: App[object]) -> str:
    """The key that runs `command` now, shown the way the footer shows it ("?", "^x")."""
    keys = active_keymap.get(command.id, command.default_key)
    return ", ".join(
        app.get_key_display(Binding(key.strip(), command.action)) for key in keys.split(",") if key.strip()
    )

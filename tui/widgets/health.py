"""Health: one line per component, its state, and the measurement behind it (F11: no state without the
number that produced it; no alarm without its cause)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.style import Style
from rich.text import Text
from textual.widgets import Static

from protection.health import (
    DISPLAY_NAMES,
    Component,
    ComponentHealth,
    HealthState,
    format_duration,
    worst_state,
)
from tui.widgets.styling import component_style

SHORT_NAMES = {
    Component.EXCHANGE: "exchange",
    Component.PRICE_FEED: "prices",
    Component.DATABASE: "database",
    Component.PROTECTION: "protection",
    Component.SIGNALS: "signals",
}
STATE_WORDS = {
    HealthState.HEALTHY: "ok",
    HealthState.DEGRADED: "DEGRADED",
    HealthState.CRITICAL: "CRITICAL",
    HealthState.UNKNOWN: "unknown",
}


class HealthPanel(Static):
    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "health--healthy",
        "health--degraded",
        "health--critical",
        "health--unknown",
    }

    def __init__(self, *, id: str | None = None):
        super().__init__("health: not measured yet", id=id)
        self._shown: tuple[ComponentHealth, ...] | None = None
        self._restyle_pending = False

    def on_mount(self) -> None:
        self.border_title = "Health"
        self.border_subtitle = "h: in full"
        self.app.theme_changed_signal.subscribe(self, lambda _theme: self._redraw())

    def show(self, components: Sequence[ComponentHealth]) -> None:
        components = tuple(components)
        if components == self._shown:
            return
        self._shown = components
        self._redraw()

    def _state_style(self, state: HealthState) -> Style | str:
        """The state's colour; plain while the stylesheet is not applied yet, and redrawn after the refresh."""
        style = component_style(self, f"health--{state.value}")
        if style is not None:
            return style
        if not self._restyle_pending:
            self._restyle_pending = True
            self.call_after_refresh(self._restyled)
        return ""

    def _restyled(self) -> None:
        self._restyle_pending = False
        self._redraw()

    def _redraw(self) -> None:
        components = self._shown or ()
        overall = worst_state(c.state for c in components)
        self.border_title = f"Health: {STATE_WORDS[overall]}"
        for state in HealthState:
            self.set_class(overall is state, f"-{state.value}")
        if not components:
            self.update("not measured yet")
            return
        lines = Text(no_wrap=True, overflow="ellipsis")
        for index, component in enumerate(components):
            if index:
                lines.append("\n")
            style = self._state_style(component.state)
            name = SHORT_NAMES.get(component.component, DISPLAY_NAMES.get(component.component, "?"))
            lines.append(f"{name:<10} ", style="bold")
            lines.append(f"{STATE_WORDS[component.state]:<8} ", style=style)
            # The cause first when there is one, then the measurement it came from.
            lines.append(
                f"{component.reason} · {component.summary}" if component.reason else component.summary
            )
        streams = stream_words(components)
        if streams:  # the venue's push streams, most telling first (a narrow panel cuts the rest)
            lines.append("\n")
            lines.append(f"{'streams':<10} ", style="bold")
            for index, (_name, connected, text) in enumerate(streams):
                if index:
                    lines.append(" · ")
                state = HealthState.HEALTHY if connected else HealthState.DEGRADED
                lines.append(text, style="" if connected else self._state_style(state))
        self.update(lines)


def stream_words(components: Sequence[ComponentHealth]) -> list[tuple[str, bool, str]]:
    """Each push stream the measurements name (`<name>_stream_connected` …), as (name, connected, words),
    e.g. `account up 2.0s ago, 1 reconnect`, those down first. Empty when the venue runs none (polled)."""
    found: list[tuple[str, bool, str]] = []
    suffix = "_stream_connected"
    for component in components:
        values = component.measurements
        for key, connected in values.items():
            if not key.endswith(suffix):
                continue
            name = key[: -len(suffix)]
            age = values.get(f"{name}_stream_last_event_age_seconds")
            reconnects = values.get(f"{name}_stream_reconnects") or 0
            words = f"{name} {'up' if connected else 'DOWN'}"
            words += " (no event yet)" if not isinstance(age, int | float) else f" {format_duration(age)} ago"
            if reconnects:
                words += f", {reconnects} reconnect{'s' if reconnects != 1 else ''}"
            found.append((name, bool(connected), words))
    found.sort(key=lambda item: item[1])  # a stream that is down first
    return found

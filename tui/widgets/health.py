"""Health: one line per component, its state, and the measurement behind it (F11: no state without the
number that produced it; no alarm without its cause)."""

from __future__ import annotations

import textwrap
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
    stream_words,
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

    def on_resize(self) -> None:
        self._redraw()

    def _causes_whole(
        self, lines: Text, components: Sequence[ComponentHealth], width: int, room: int
    ) -> None:
        """A panel too small for every line with the causes wrapped (80 columns: about 12 characters of each)
        cut every cause to a word or two. Each component not healthy gets its cause whole, after its name
        and state and wrapped over the panel's full width, the worst first; the healthy ones are named on
        the last line (their measurements in `h`). What `room` (lines) cannot hold is said to be cut: in
        the components' order, two degraded ones' causes pushed a CRITICAL protection off the panel, its
        title saying CRITICAL over nothing that did (a reviewer)."""
        rows: list[Text] = []
        alarms = [c for c in components if c.state is not HealthState.HEALTHY]
        # The worst first, protection first among equals: the panel is there for it (a database critical
        # beside it took the rows, an operator).
        for component in sorted(
            alarms, key=lambda c: (-c.state.severity, c.component is not Component.PROTECTION)
        ):
            name, state = _name(component), STATE_WORDS[component.state]
            wrapped = textwrap.wrap(
                f"{name} {state} {component.reason or component.summary}",
                max(8, width),
                subsequent_indent="  ",
            )
            # (the name and the state are whole words on the first line: styled as in the full layout)
            rows.append(
                Text.assemble(
                    (f"{name} ", "bold"),
                    (state, self._state_style(component.state)),
                    wrapped[0][len(name) + 1 + len(state) :],
                )
            )
            rows.extend(Text(part) for part in wrapped[1:])
        healthy = [_name(c) for c in components if c.state is HealthState.HEALTHY]
        if healthy:
            rows.append(Text.assemble(("ok ", self._state_style(HealthState.HEALTHY)), " ".join(healthy)))
        if len(rows) > room >= 1:
            cut = len(rows) - (room - 1)
            rows = [*rows[: room - 1], Text(f"… {cut} more line{'s' if cut != 1 else ''}: h shows all")]
        lines.append_text(Text("\n").join(rows))

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
        width, height = self.size
        streams = stream_words(c.measurements for c in components)
        room = height - bool(streams)
        wrapped = [_wrapped(c, width, measured=True) for c in components]
        if width and sum(len(parts) for parts in wrapped) > room:
            wrapped = [_wrapped(c, width, measured=False) for c in components]  # causes alone (the rest: `h`)
        if width and sum(len(parts) for parts in wrapped) > room:
            self._causes_whole(lines, components, width, room)
        else:
            for index, (component, parts) in enumerate(zip(components, wrapped, strict=True)):
                if index:
                    lines.append("\n")
                lines.append(f"{_name(component):<10} ", style="bold")
                lines.append(f"{STATE_WORDS[component.state]:<8} ", style=self._state_style(component.state))
                lines.append(f"\n{'':<{_TEXT_AT}}".join(parts))
        if streams:  # the venue's push streams, most telling first (a narrow panel cuts the rest)
            lines.append("\n")
            lines.append(f"{'streams':<10} ", style="bold")
            for index, (_stream, connected, text) in enumerate(streams):
                if index:
                    lines.append(" · ")
                state = HealthState.HEALTHY if connected else HealthState.DEGRADED
                lines.append(text, style="" if connected else self._state_style(state))
        self.update(lines)


def _name(component: ComponentHealth) -> str:
    return SHORT_NAMES.get(component.component, DISPLAY_NAMES.get(component.component, "?"))


def full_name(component: ComponentHealth) -> str:
    """The panel's name, and the log's where that is another ("prices", logged as "Price Feed"): the health
    view named them as the log does and the panel otherwise, three names for one thing (an operator)."""
    name = _name(component)
    logged = DISPLAY_NAMES.get(component.component, name)
    return name if logged.lower() == name.lower() else f"{name} (logged as “{logged}”)"


def _words(component: ComponentHealth) -> str:
    """The cause first when there is one, then the measurement it came from."""
    return f"{component.reason} · {component.summary}" if component.reason else component.summary


_TEXT_AT = 10 + 1 + 8 + 1  # the column a component's words start at, after its name and state


def _wrapped(component: ComponentHealth, width: int, *, measured: bool) -> list[str]:
    """A component's words as the panel's lines: a healthy one's on one line (cut at the edge: it hides no
    alarm, and `h` shows it whole), one not healthy wrapped so its cause is whole (`measured`: with the
    measurement after it)."""
    words = _words(component) if measured or not component.reason else component.reason
    if not width or component.state is HealthState.HEALTHY or _TEXT_AT + len(words) <= width:
        return [words]
    return textwrap.wrap(words, max(8, width - _TEXT_AT)) or [""]

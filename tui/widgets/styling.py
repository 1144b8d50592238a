"""Component styles (`COMPONENT_CLASSES`) read at paint time.

Textual computes a widget's component styles when the stylesheet is applied to it. A paint can come in
between — the first frames, a screen dismissed, a theme switched — and `get_component_rich_style` then
raises `KeyError`, which ended the dashboard. Painting plain for that frame is the right answer; the
caller decides whether to paint again."""

from __future__ import annotations

from rich.style import Style
from textual.widget import Widget


def component_style(widget: Widget, name: str, *, partial: bool = False) -> Style | None:
    """The named component style of `widget`, or None while its stylesheet is not applied yet."""
    try:
        return widget.get_component_rich_style(name, partial=partial)
    except KeyError:
        return None

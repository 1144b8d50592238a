"""The recent waves: time, signals, opened, protected, failed, slowest protection."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import tzinfo
from typing import ClassVar

from rich.text import Text
from textual.widgets import DataTable

from engine.engine import WaveView
from tui import formatting
from tui.widgets.styling import component_style

COLUMNS = (
    ("time", "Time", 8),
    ("signals", "Sig", 3),
    ("opened", "Opn", 3),
    ("protected", "Prt", 3),
    ("failed", "Fail", 4),
    ("slowest", "Slowest", 8),
)


class WavesTable(DataTable[str | Text]):
    COMPONENT_CLASSES: ClassVar[set[str]] = DataTable.COMPONENT_CLASSES | {"waves--failed"}

    def __init__(self, *, tz: tzinfo | None, id: str | None = None):
        super().__init__(id=id, cursor_type="row", zebra_stripes=False, show_cursor=False)
        self._tz = tz
        self._shown: tuple[WaveView, ...] = ()

    def on_mount(self) -> None:
        self.border_title = "Waves"
        for key, label, width in COLUMNS:
            self.add_column(label, key=key, width=width)

    def show(self, waves: Sequence[WaveView]) -> None:
        """Waves change every few seconds at most, and there are at most 50: rebuilt when they change."""
        waves = tuple(waves)
        if waves == self._shown:
            return
        self._shown = waves
        self.clear()
        failed_style = component_style(self, "waves--failed")
        if failed_style is None:  # styles not applied yet: plain now, rebuilt at the next show
            self._shown = None
            failed_style = ""
        for wave in waves:  # newest first, as the engine keeps them
            failed = Text(str(wave.failed), style=failed_style if wave.failed else "")
            self.add_row(
                formatting.clock_time(wave.started_at, self._tz),
                str(wave.signals),
                str(wave.opened),
                str(wave.protected),
                failed,
                formatting.short_milliseconds(wave.slowest_protection_ms),
                key=str(wave.wave_id),
            )
        self.border_subtitle = f"{len(waves)} recent" if waves else "none yet"

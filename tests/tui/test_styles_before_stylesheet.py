"""A paint can reach a widget before the stylesheet has been applied to it (the first frames, a dismissed
screen, a theme switch): its component styles are not there yet and Textual raises KeyError, which ended
the dashboard in loaded test runs (the health panel after a restart report, the waves table after `r`).
A widget the stylesheet has not reached stands for that moment here: it paints plain, without raising."""

from __future__ import annotations

from datetime import UTC

from textual.app import App

from engine.engine import WaveView
from protection.health import Component, ComponentHealth, HealthState
from tui.widgets.health import HealthPanel
from tui.widgets.waves import WavesTable

CRITICAL = ComponentHealth(Component.PROTECTION, HealthState.CRITICAL, "3 uncovered", "Low TS coverage", {})


async def test_panels_paint_plain_before_their_stylesheet_applies() -> None:
    app: App[None] = App()
    async with app.run_test():
        health = HealthPanel()  # not mounted: the stylesheet has not reached it
        health.show((CRITICAL,))
        assert "CRITICAL" in str(health.content)
        waves = WavesTable(tz=UTC)
        waves.on_mount()  # its columns, as mounting adds them; the stylesheet still has not reached it
        wave = WaveView(
            wave_id=1,
            started_at=1_764_576_000.0,
            signals=5,
            opened=5,
            protected=3,
            failed=2,
            slowest_protection_ms=120,
        )
        waves.show([wave])
        assert waves.row_count == 1
        waves.show([wave])  # plain the first time: rebuilt at the next show, not left plain
        assert waves.row_count == 1

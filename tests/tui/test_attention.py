"""CRITICAL rings the terminal bell once per episode and puts CRITICAL in the window title; recovery puts
the title back."""

from __future__ import annotations

import dataclasses
from datetime import UTC

from engine.engine import EngineSnapshot, ViewSelector
from protection.health import Component, ComponentHealth, HealthState
from tests.tui.scenario import ScenarioFeed, all_protected, scenario_settings
from tui.app import DashboardApp
from tui.attention import BELL, RESTORE_TITLE, SAVE_TITLE, CriticalAttention

CRITICAL = ComponentHealth(
    Component.PROTECTION, HealthState.CRITICAL, "3 uncovered", "Low TS coverage: 62.5% (5/8)", {}
)
DEGRADED = ComponentHealth(Component.EXCHANGE, HealthState.DEGRADED, "p99 3s", "slow", {})
HEALTHY = ComponentHealth(Component.PROTECTION, HealthState.HEALTHY, "8/8 protected", "", {})


def test_the_bell_rings_once_per_critical_episode_and_the_title_comes_back() -> None:
    attention = CriticalAttention()
    assert attention.update((HEALTHY, DEGRADED), "sim:default") == ""
    first = attention.update((CRITICAL, DEGRADED), "sim:default")
    assert first.startswith(BELL + SAVE_TITLE)
    assert "\x1b]2;CRITICAL tsbot sim:default: Low TS coverage: 62.5% (5/8)\x1b\\" in first
    assert attention.update((CRITICAL,), "sim:default") == ""  # still critical: no second bell
    back = attention.update((HEALTHY,), "sim:default")
    assert back == "\x1b]2;tsbot\x1b\\" + RESTORE_TITLE
    assert BELL not in back
    assert attention.update((CRITICAL,), "sim:default").startswith(BELL)
    assert attention.episodes == 2


def test_inside_tmux_the_window_name_says_it_too() -> None:
    attention = CriticalAttention(in_tmux=True)
    assert "\x1bkCRITICAL tsbot x:y: Low TS coverage: 62.5% (5/8)\x1b\\" in attention.update(
        (CRITICAL,), "x:y"
    )
    assert attention.restore().startswith("\x1b]2;tsbot\x1b\\\x1bktsbot\x1b\\")


def test_no_reading_is_not_critical() -> None:
    assert CriticalAttention().update((), "x") == ""


class SwitchingFeed(ScenarioFeed):
    """The scenario's instant (CRITICAL: positions uncovered), switchable by the test to the same book with
    every position protected — health and coverage together, as the dashboard reads its protection line
    from the snapshot's own coverage figures."""

    healthy = False

    def snapshot(self, views_of: ViewSelector | None = None) -> EngineSnapshot:
        snapshot = super().snapshot(views_of)
        if not self.healthy:
            return snapshot
        return dataclasses.replace(snapshot, health=(HEALTHY,), coverage=all_protected(snapshot.coverage))


async def test_the_dashboard_asks_for_attention_once_per_episode() -> None:
    settings = scenario_settings()
    feed = SwitchingFeed(settings)
    app = DashboardApp(settings, feed=feed, tz=UTC, code_roots=[])
    async with app.run_test(size=(120, 40)) as pilot:
        for _ in range(3):  # several frames of the same CRITICAL state
            app.paint()
            await pilot.pause()
        assert (app.attention.critical, app.attention.episodes) == (True, 1)
        feed.healthy = True
        app.paint()
        assert (app.attention.critical, app.attention.episodes) == (False, 1)
        feed.healthy = False
        app.paint()
        app.paint()
        assert (app.attention.critical, app.attention.episodes) == (True, 2)

"""F10, "fix on disk, old code running": the dashboard says when the installed code is not the running code."""

from __future__ import annotations

import os
from datetime import UTC
from pathlib import Path

from engine.code_watch import SourceWatcher
from tests.support.waiting import wait_until
from tests.tui.scenario import ScenarioFeed, scenario_settings
from tui.app import DashboardApp
from tui.widgets.status import CodeBanner


def make_package(root: Path) -> Path:
    package = root / "engine"
    (package / "venues").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "engine.py").write_text("TIMEOUT = 10\n")
    (package / "venues" / "sim.py").write_text("LATENCY = 2.0\n")
    (root / "migrations").mkdir()
    return package


def test_unchanged_and_touched_files_are_not_a_difference(tmp_path: Path) -> None:
    package = make_package(tmp_path)
    watcher = SourceWatcher([package])
    assert watcher.files == 3
    assert watcher.check() is None
    target = package / "engine.py"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 5_000_000_000))
    assert watcher.check() is None  # touched, same content


def test_edited_added_and_removed_files_are_named_and_editing_back_clears_it(tmp_path: Path) -> None:
    package = make_package(tmp_path)
    watcher = SourceWatcher([package])
    (package / "engine.py").write_text("TIMEOUT = 30\n")
    difference = watcher.check()
    assert difference is not None
    assert difference.changed == ("engine/engine.py",)
    assert difference.newest_change > 0

    (package / "venues" / "sim.py").unlink()
    (package / "fix.py").write_text("FIXED = True\n")
    (package / "notes.txt").write_text("not code")  # ignored
    difference = watcher.check()
    assert difference is not None
    assert difference.changed == ("engine/engine.py", "engine/fix.py", "engine/venues/sim.py")
    assert difference.describe(limit=2) == "engine/engine.py, engine/fix.py and 1 more"

    (package / "engine.py").write_text("TIMEOUT = 10\n")
    (package / "venues" / "sim.py").write_text("LATENCY = 2.0\n")
    (package / "fix.py").unlink()
    assert watcher.check() is None


async def test_the_banner_appears_when_the_code_on_disk_changes_and_goes_when_it_is_back(
    tmp_path: Path,
) -> None:
    package = make_package(tmp_path)
    settings = scenario_settings()
    app = DashboardApp(
        settings, feed=ScenarioFeed(settings), tz=UTC, code_roots=[package], code_check_seconds=0.02
    )
    async with app.run_test(size=(120, 40)) as pilot:
        banner = app.query_one(CodeBanner)
        await pilot.pause(0.1)
        assert not banner.has_class("-visible")
        assert banner.region.height == 0

        (package / "engine.py").write_text("TIMEOUT = 30  # the fix\n")
        await wait_until(lambda: banner.has_class("-visible"), what="banner shown")
        await pilot.pause()
        text = str(banner.content)
        assert text.startswith("code on disk changed since start — restart needed")
        assert "engine/engine.py" in text
        assert banner.region.height == 1  # on screen, not just in the DOM
        assert any("restart needed" in e.detail for e in app.query_one("#log").shown_entries())  # type: ignore[attr-defined]

        (package / "engine.py").write_text("TIMEOUT = 10\n")
        await wait_until(lambda: not banner.has_class("-visible"), what="banner hidden")

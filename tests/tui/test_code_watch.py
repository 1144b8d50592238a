"""F10, "fix on disk, old code running": the dashboard says when the installed code is not the running code."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import uuid
from datetime import UTC
from pathlib import Path

import pytest

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


def test_only_the_files_a_process_runs_count_when_it_says_so(tmp_path: Path) -> None:
    """r76: a headless engine imports no dashboard module, yet a comment added to the dashboard's stylesheet
    (or to a dashboard widget) made it warn, and `tsbot status` say DEGRADED, "restart it". Only the
    modules it has imported count, with the migrations; the stylesheets once the dashboard runs."""
    name = f"r76pkg_{uuid.uuid4().hex[:8]}"
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "used.py").write_text("USED = 1\n")
    (package / "unused.py").write_text("UNUSED = 1\n")
    (package / "look.tcss").write_text("Screen { }\n")
    (package / "0001_schema.sql").write_text("SELECT 1;\n")
    sys.path.insert(0, str(tmp_path))
    try:
        importlib.import_module(f"{name}.used")
        watcher = SourceWatcher([package], only_loaded=True)
        # (This test's process runs the dashboard: its stylesheets count; `tsbot run` loads no dashboard.)
        runs = ["__init__.py", "used.py", "0001_schema.sql"] + (
            ["look.tcss"] if "tui.app" in sys.modules else []
        )
        assert sorted(watcher.running) == sorted(f"{name}/{f}" for f in runs)
        (package / "unused.py").write_text("UNUSED = 2\n")
        (package / "new.py").write_text("NEW = 1\n")
        assert watcher.check() is None  # nothing it runs changed
        (package / "0001_schema.sql").write_text("SELECT 2;\n")
        (package / "used.py").write_text("USED = 2\n")
        difference = watcher.check()
        assert difference is not None
        assert difference.changed == (f"{name}/0001_schema.sql", f"{name}/used.py")
    finally:
        sys.path.remove(str(tmp_path))
        for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
            del sys.modules[module]


def test_a_recorded_fingerprint_is_compared_file_by_file_and_new_files_do_not_count(tmp_path: Path) -> None:
    """`tsbot status` compares another process's recorded digests with the disk: the files it recorded,
    changed or removed; a file added since runs nowhere until something changed imports it."""
    package = make_package(tmp_path)
    recorded = SourceWatcher([package]).running
    (package / "fix.py").write_text("FIXED = True\n")
    assert SourceWatcher([package], running=recorded).check() is None
    (package / "venues" / "sim.py").unlink()
    difference = SourceWatcher([package], running=recorded).check()
    assert difference is not None
    assert difference.changed == ("engine/venues/sim.py",)
    assert difference.newest_change == 0  # (removed: no time to say)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs to become another user")
def test_a_file_the_reader_cannot_read_is_no_difference() -> None:
    """r76: a source file owner-only to the engine's user, read by `tsbot status` as another user, counted as
    changed: DEGRADED, "restart it", for a file nobody changed. It cannot be told: not a difference (the
    files it can read still are)."""
    with tempfile.TemporaryDirectory(dir="/tmp") as shared:  # (traversable by another user)
        _cannot_read_is_no_difference(Path(shared))


def _cannot_read_is_no_difference(tmp_path: Path) -> None:
    package = make_package(tmp_path)
    for path in (tmp_path, package, package / "venues"):
        path.chmod(0o755)
    for path in package.rglob("*.py"):
        path.chmod(0o644)
    (package / "engine.py").chmod(0o600)
    recorded = SourceWatcher([package]).running
    script = (
        "import json, os, sys\n"
        "from pathlib import Path\n"
        "from engine.code_watch import SourceWatcher\n"
        "os.setgid(65534); os.setuid(65534)  # (once imported: the interpreter's own files may be root's)\n"
        "watcher = SourceWatcher([Path(sys.argv[1])], running=json.loads(sys.argv[2]))\n"
        "difference = watcher.check()\n"
        "print(json.dumps(None if difference is None else list(difference.changed)))\n"
    )

    def seen_by_nobody() -> object:
        done = subprocess.run(
            [sys.executable, "-c", script, str(package), json.dumps(recorded)],
            capture_output=True,
            text=True,
            check=True,
            cwd=str(Path(__file__).resolve().parents[2]),
        )
        return json.loads(done.stdout)

    assert seen_by_nobody() is None
    (package / "venues" / "sim.py").write_text("LATENCY = 9.0\n")
    assert seen_by_nobody() == ["engine/venues/sim.py"]


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

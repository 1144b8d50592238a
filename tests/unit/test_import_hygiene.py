"""The core never imports the UI: importing every module of engine/, protection/, storage/ loads no
textual, rich or tui (checked in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import importlib, pkgutil, sys
package = importlib.import_module({package!r})
for info in pkgutil.walk_packages(package.__path__, prefix={package!r} + "."):
    importlib.import_module(info.name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in {{"textual", "rich", "tui"}})
print(",".join(leaked))
"""


@pytest.mark.parametrize("package", ["engine", "protection", "storage"])
def test_core_package_does_not_import_the_ui(package: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(package=package)], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "", f"{package} imported {result.stdout.strip()}"

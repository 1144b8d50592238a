"""Screen snapshots compared against files in tests/tui/snapshots/.

Each snapshot is two files: the SVG from `App.export_screenshot()` (every cell with its colour and style) and
a plain-text rendering of the same cells, which is what a reviewer reads in a diff. Both must match.
Regenerate after an intended change with `TSBOT_UPDATE_SNAPSHOTS=1 pytest tests/tui`, then review the diff.

(pytest-textual-snapshot pins syrupy 4.8, which requires pytest < 9; this project runs pytest 9.)
"""

from __future__ import annotations

import html
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from textual.app import App

SNAPSHOT_DIR = Path(__file__).parent / "snapshots"
UPDATE = os.environ.get("TSBOT_UPDATE_SNAPSHOTS") == "1"
_CELL_WIDTH = 12.2  # Rich's SVG export: 0.61 × 20 px per terminal cell
_TEXT = re.compile(r'<text [^>]*?x="([\d.]+)"[^>]*?clip-path="url\(#[\w-]+-line-(\d+)\)">(.*?)</text>')


def svg_to_text(svg: str, width: int, height: int) -> str:
    """The characters of an exported screen, one line per terminal row, trailing spaces trimmed."""
    rows = [[" "] * width for _ in range(height)]
    for x, line, content in _TEXT.findall(svg):
        row = int(line)
        column = round(float(x) / _CELL_WIDTH)
        for offset, char in enumerate(html.unescape(content).replace("\xa0", " ")):
            if row < height and column + offset < width:
                rows[row][column + offset] = char
    return "\n".join("".join(r).rstrip() for r in rows) + "\n"


def assert_matches_snapshot(app: App[object], name: str) -> None:
    svg = app.export_screenshot(title=name)
    width, height = app.size
    text = svg_to_text(svg, width, height)
    svg_path, text_path = SNAPSHOT_DIR / f"{name}.svg", SNAPSHOT_DIR / f"{name}.txt"
    if UPDATE or not svg_path.exists():
        SNAPSHOT_DIR.mkdir(parents=True, exist_ok=True)
        svg_path.write_text(svg, encoding="utf-8")
        text_path.write_text(text, encoding="utf-8")
        if not UPDATE:
            raise AssertionError(f"snapshot {name} was missing and has been written: review and commit it")
        return
    expected_text = text_path.read_text(encoding="utf-8")
    assert text == expected_text, f"screen text differs from {text_path}:\n{text}"
    assert svg == svg_path.read_text(encoding="utf-8"), (
        f"screen styles differ from {svg_path} (the text is the same); "
        "run with TSBOT_UPDATE_SNAPSHOTS=1 if the change is intended"
    )


def screen_text(app: App[object]) -> str:
    """The app's screen as text, one line per row."""
    width, height = app.size
    return svg_to_text(app.export_screenshot(), width, height)


async def wait_for(pilot, condition: Callable[[], bool], what: str, within: float = 30.0) -> None:
    """Until `condition` holds, for `within` seconds of the wall clock (not a count of pauses: on a loaded
    machine each pause let the app do less, and 500 of them ran out before a redraw a run took 5 s for)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            await pilot.pause()
            return
        await pilot.pause(0.01)
    raise AssertionError(f"{what}: not reached")

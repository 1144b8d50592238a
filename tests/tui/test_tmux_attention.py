"""The real `tsbot-tui` in tmux: on CRITICAL the pane title (OSC 2) says so; on exit it is put back.

CRITICAL is made the honest way: the sim venue's marks arrive once a minute while the health rule calls a
mark older than 3 × 1 s critical with positions open (nobody would be watching prices).
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.embedded import EmbeddedPostgres
from tests.tui.test_tmux_smoke import TSBOT_TUI, Tmux, pytestmark  # noqa: F401  (skipped without tmux)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    import uuid

    server = Tmux(f"tsbot-test-{uuid.uuid4().hex[:8]}")
    yield server
    server.run("kill-server")  # our own private server (-L socket), nothing else


def pane_title(tmux: Tmux, session: str) -> str:
    return tmux.run("display-message", "-p", "-t", session, "#{pane_title}").strip()


def wait_title(tmux: Tmux, session: str, predicate, within: float = 60.0) -> str:
    deadline = time.monotonic() + within
    title = ""
    while time.monotonic() < deadline:
        title = pane_title(tmux, session)
        if predicate(title):
            return title
        time.sleep(0.2)
    raise AssertionError(f"pane title not as expected after {within}s: {title!r}\n{tmux.screen(session)}")


def test_critical_sets_the_pane_title_and_quitting_puts_it_back(
    tmux: Tmux, tmp_path: Path, pg_server: EmbeddedPostgres, migrated_database: str
) -> None:
    (tmp_path / "config.toml").write_text(
        "[signals]\nwave_size = 3\nwave_interval_seconds = 2\n"
        "[venue.sim]\nvolatility = 0.5\nmark_tick_seconds = 60\n"
        "[health]\nmark_price_stale_seconds = 1\n"
        "[tui]\nrefresh_per_second = 4\n"
    )
    env = {
        "TSBOT_DATABASE__DSN": pg_server.dsn(migrated_database),
        "TSBOT_LOGGING__FILE": str(tmp_path / "logs" / "trading_bot.log"),
        "TERM": "xterm-256color",
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
    }
    exported = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    command = (
        f"cd {shlex.quote(str(tmp_path))} && env {exported} {shlex.quote(str(TSBOT_TUI))}; "
        f"echo $? > {shlex.quote(str(tmp_path / 'exit_code'))}; sleep 30"
    )
    tmux.run("new-session", "-d", "-s", "tsbt", "-x", "120", "-y", "40", command)
    tmux.wait_for("tsbt", r"Health: CRITICAL")
    title = wait_title(tmux, "tsbt", lambda t: t.startswith("CRITICAL tsbot sim:default"))
    assert "mark" in title.lower(), title  # the reason rides along

    tmux.run("send-keys", "-t", "tsbt", "q")
    tmux.wait_for("tsbt", "Exchange stops stay in place")
    tmux.run("send-keys", "-t", "tsbt", "y")
    deadline = time.monotonic() + 30
    while not (tmp_path / "exit_code").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (tmp_path / "exit_code").exists()
    assert not pane_title(tmux, "tsbt").startswith("CRITICAL")

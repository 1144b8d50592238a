"""`tsbot run` headless with alerts configured, as operators run it: the engine's stop reaches the webhook
receiver with its exit line, and the URL's token is in no log line and nothing the command prints."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from storage.embedded import EmbeddedPostgres
from tests.support.webhook import WebhookReceiver

TSBOT = str(Path(sys.executable).with_name("tsbot"))
TOKEN = "hdl-7c6b5a4d3e2f-token"


@pytest.fixture
def workdir(tmp_path: Path, pg_server: EmbeddedPostgres, project_root: Path) -> Path:
    text = (project_root / "config.toml").read_text()
    text = text.replace('data_dir = ""', f'data_dir = "{pg_server.data_dir}"', 1)
    text = text.replace('name = "tsbot"', f'name = "alerts_{uuid.uuid4().hex[:12]}"', 1)
    text = text.replace("wave_interval_seconds = 20", "wave_interval_seconds = 2", 1)
    (tmp_path / "config.toml").write_text(text)
    return tmp_path


async def test_a_headless_engine_sends_its_stop_and_never_shows_the_token(workdir: Path) -> None:
    receiver = await WebhookReceiver().start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TSBOT_")}
    env["TSBOT_ALERTS__URLS"] = receiver.url(f"/ops/{TOKEN}")
    env["TSBOT_LOGGING__LEVEL"] = "DEBUG"  # the level at which urllib3 names the path it posts to
    try:
        result = await asyncio.to_thread(
            subprocess.run,
            [TSBOT, "run", "--duration", "6"],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        await receiver.close()
    assert result.returncode == 0, result.stderr
    (stopped,) = receiver.matching("engine stopped")
    assert stopped.path == f"/ops/{TOKEN}"
    assert re.search(r"(keeps its|keep their) stops on the exchange; uncovered 0", stopped.payload["message"])
    assert stopped.payload["type"] == "warning"
    log = (workdir / "logs" / "trading_bot.log").read_text()
    assert "alert: WARNING: engine stopped" in log
    assert "POST /ops/*** HTTP/1.1" in log  # masked at the handler
    assert TOKEN not in log
    assert TOKEN not in result.stdout + result.stderr

"""`tsbot sim-exchange --venue bybit`: the Bybit v5 emulator as a process on loopback, the way an operator
starts it to rehearse against Bybit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

TSBOT = str(Path(sys.executable).with_name("tsbot"))


def test_sim_exchange_speaks_bybit_v5_on_loopback(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TSBOT_")}
    process = subprocess.Popen(
        [TSBOT, "sim-exchange", "--venue", "bybit", "--port", "0"],
        cwd=tmp_path,
        env={**base, "TSBOT_VENUE__API_KEY": "key", "TSBOT_VENUE__API_SECRET": "secret"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        hint = process.stdout.readline()
        url = banner.split(" on ", 1)[1].split(" ", 1)[0]
        with urllib.request.urlopen(f"{url}/v5/market/time", timeout=10) as answer:
            body = json.loads(answer.read())
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)

    assert banner.startswith("sim-exchange: Bybit v5 (linear) emulator on http://127.0.0.1:")
    assert 'kind = "bybit"' in hint
    assert body["retCode"] == 0
    assert int(body["result"]["timeSecond"]) > 0

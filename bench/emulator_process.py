"""Bench-only: `tsbot sim-exchange` as a separate process, the way an operator rehearses against it.

The benches that run `--venue emulator` start the real command (`tsbot sim-exchange --port 0 --control`)
with its settings in `TSBOT_*` variables, read the URL it prints, and stop it with SIGTERM. The engine then
talks to it through real ccxt, real HTTP and real signing, with exactly the settings a real Binance account
gets: only `venue.base_url` differs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

API_KEY = "bench-key"
API_SECRET = "bench-secret"
_URL = re.compile(r"emulator on (http://127\.0\.0\.1:\d+)")
_TSBOT = str(Path(sys.executable).with_name("tsbot"))


@dataclass(frozen=True, slots=True)
class EmulatorProcess:
    url: str
    process: subprocess.Popen[str]
    kind: str = "binanceusdm"  # the engine's venue kind for this emulator ("bybit" for --venue bybit)

    def engine_environ(self) -> dict[str, str]:
        """What the engine needs to trade this emulator as it would trade the real venue (only the URL
        differs)."""
        return {
            "TSBOT_VENUE__KIND": self.kind,
            "TSBOT_VENUE__BASE_URL": self.url,
            "TSBOT_VENUE__API_KEY": API_KEY,
            "TSBOT_VENUE__API_SECRET": API_SECRET,
        }

    async def state(self) -> dict[str, object]:
        async with aiohttp.ClientSession() as session, session.get(f"{self.url}/_sim/state") as response:
            return await response.json()


@contextmanager
def emulator_process(
    workdir: Path,
    *,
    latency_ms: int,
    seed: int,
    settings: Mapping[str, str] = {},
    faults: str = "",
    venue: str = "binance",
) -> Iterator[EmulatorProcess]:
    """Start `tsbot sim-exchange` on a free loopback port; `settings` are extra `TSBOT_VENUE__SIM__*`,
    `faults` its `--faults` SPEC (none by default), `venue` the wire it speaks (binance, bybit)."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "TSBOT_VENUE__API_KEY": API_KEY,
        "TSBOT_VENUE__API_SECRET": API_SECRET,
        "TSBOT_LOGGING__FILE": str(workdir / "logs" / "trading_bot.log"),
        "TSBOT_LOGGING__LEVEL": "WARNING",
        **settings,
    }
    process = subprocess.Popen(
        [
            _TSBOT,
            "sim-exchange",
            "--venue",
            venue,
            "--port",
            "0",
            "--control",
            "--seed",
            str(seed),
            "--latency-ms",
            str(latency_ms),
            *(["--faults", faults] if faults else []),
        ],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = None
        assert process.stdout is not None
        for line in process.stdout:
            match = _URL.search(line)
            if match:
                url = match.group(1)
                break
        if url is None:
            raise RuntimeError(f"tsbot sim-exchange did not start (exit {process.wait(timeout=10)})")
        yield EmulatorProcess(url, process, "bybit" if venue == "bybit" else "binanceusdm")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()

"""Real processes for the emulator chaos suite: `tsbot sim-exchange --control` and `tsbot run` (configured
for `binanceusdm` at the emulator's URL: the production path, real ccxt, real HTTP, real signing), with the
invariant auditor reading the emulator's `/_sim/state` and the engine's database every 200 ms of real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg

from engine.config import load_config
from engine.venues.sim.universe import UNIVERSE
from storage.embedded import EmbeddedPostgres
from tests.support.auditor import AuditLimits, EmulatorTruth, InvariantAuditor, PostgresTruth
from tests.support.waiting import wait_until

TSBOT = str(Path(sys.executable).with_name("tsbot"))
API_KEY = "chaos-emulator-key"
API_SECRET = "chaos-emulator-secret"


def environ() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TSBOT_")}
    env.update(
        {"TSBOT_VENUE__API_KEY": API_KEY, "TSBOT_VENUE__API_SECRET": API_SECRET, "PYTHONUNBUFFERED": "1"}
    )
    return env


def write_config(
    workdir: Path, project_root: Path, pg: EmbeddedPostgres, *, call_timeout_seconds: int = 10
) -> str:
    """The shipped config.toml, on the test session's embedded PostgreSQL (a database of its own), signals
    from `monitoring.signals` (the test inserts its waves, as any provider would), venue `binanceusdm`
    (its URL is added once the emulator runs), the given protection call budget. Returns the database's
    DSN."""
    name = f"chaos_{uuid.uuid4().hex[:12]}"
    text = (project_root / "config.toml").read_text()
    text = text.replace('data_dir = ""', f'data_dir = "{pg.data_dir}"', 1)
    text = text.replace('name = "tsbot"', f'name = "{name}"', 1)
    text = text.replace('source = "sim"', 'source = "postgres"', 1)
    text = text.replace('kind = "sim"', 'kind = "binanceusdm"', 1)
    text = text.replace("call_timeout_seconds = 10", f"call_timeout_seconds = {call_timeout_seconds}", 1)
    (workdir / "config.toml").write_text(text)
    return pg.dsn(name)


def audit_limits(workdir: Path) -> AuditLimits:
    """The auditor's allowances from the very configuration the engine runs on."""
    loaded = load_config(workdir / "config.toml", environ=environ(), cwd=workdir)
    return AuditLimits.from_settings(loaded.settings)


class Process:
    """A `tsbot` subprocess whose output lines are collected as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._seen = asyncio.Event()
        self._reader = asyncio.create_task(self._read(), name=f"tsbot-{process.pid}-stdout")

    @classmethod
    async def start(cls, *args: str, cwd: Path) -> Process:
        process = await asyncio.create_subprocess_exec(
            TSBOT,
            *args,
            cwd=cwd,
            env=environ(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip())
            self._seen.set()

    async def line(self, prefix: str, *, within: float = 60.0) -> str:
        """The first output line containing `prefix`, waiting for it (bounded)."""
        async with asyncio.timeout(within):
            while True:
                found = next((line for line in self.lines if prefix in line), None)
                if found is not None:
                    return found
                if self.process.returncode is not None and self._reader.done():
                    raise AssertionError(f"exited {self.process.returncode} without {prefix!r}: {self.lines}")
                self._seen.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._seen.wait(), 0.5)

    def signal(self, signum: int) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signum)

    async def wait(self, within: float = 30.0) -> int:
        try:
            async with asyncio.timeout(within):
                code = await self.process.wait()
        except TimeoutError:
            self.process.kill()
            code = await self.process.wait()
        await asyncio.gather(self._reader, return_exceptions=True)
        return code

    async def stop(self) -> int:
        self.signal(signal.SIGTERM)
        return await self.wait()


@contextlib.asynccontextmanager
async def emulator(workdir: Path, faults: str = "") -> AsyncIterator[str]:
    """`tsbot sim-exchange --control` on a free loopback port; the engine's config points at it."""
    args = ["sim-exchange", "--port", "0", "--control"] + (["--faults", faults] if faults else [])
    process = await Process.start(*args, cwd=workdir)
    try:
        first = await process.line("emulator on http://127.0.0.1:", within=30)
        base_url = first.split(" on ", 1)[1].split(" ", 1)[0]
        config = workdir / "config.toml"
        config.write_text(config.read_text().replace('base_url = ""', f'base_url = "{base_url}"', 1))
        yield base_url
    finally:
        assert await process.stop() == 0, process.lines


async def control(base_url: str, path: str, body: dict[str, Any]) -> Any:
    def post() -> Any:
        request = urllib.request.Request(
            f"{base_url}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5) as response:  # loopback only
            return json.load(response)

    return await asyncio.to_thread(post)


async def fetch(dsn: str, query: str, *args: object) -> list[asyncpg.Record]:
    try:
        conn = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError):
        return []
    try:
        return await conn.fetch(query, *args)
    except asyncpg.PostgresError:
        return []
    finally:
        await conn.close()


_UNPROTECTED = (
    "(status IN ('pending_entry', 'entry_placed', 'pending_protection') "
    "OR (status = 'active' AND NOT (has_stop_loss AND has_trailing_stop)))"
)
IN_FLIGHT = f"SELECT count(*) AS n FROM monitoring.positions WHERE {_UNPROTECTED}"
IN_FLIGHT_OF = (
    f"SELECT count(*) AS n FROM monitoring.positions WHERE symbol = ANY($1::text[]) AND {_UNPROTECTED}"
)
ACTIVE = "SELECT count(*) AS n FROM monitoring.positions WHERE status = 'active' AND has_stop_loss AND has_trailing_stop"


async def protected_positions(dsn: str) -> int:
    rows = await fetch(dsn, ACTIVE)
    return rows[0]["n"] if rows else 0


async def in_flight(dsn: str, symbols: list[str] | None = None) -> int:
    """Positions between signal and protection (of `symbols`, or any)."""
    rows = await fetch(dsn, IN_FLIGHT) if symbols is None else await fetch(dsn, IN_FLIGHT_OF, symbols)
    return rows[0]["n"] if rows else 0


async def signals_settled(dsn: str, *, within: float = 30.0) -> None:
    """Bounded wait until every signal inserted so far is `opened` or `rejected`."""

    async def settled() -> bool:
        rows = await fetch(
            dsn, "SELECT count(*) AS n FROM monitoring.signals WHERE status IN ('new', 'taken')"
        )
        return bool(rows) and rows[0]["n"] == 0

    await wait_until(settled, within=within, what="every signal opened or rejected")


def auditor_for(base_url: str, dsn: str, limits: AuditLimits) -> InvariantAuditor:
    return InvariantAuditor(EmulatorTruth(base_url), PostgresTruth(dsn), limits)


async def engine_up(auditor: InvariantAuditor, engine: Process) -> str:
    """Wait for the engine's start-up report (its restore and first protection pass are done), then tell
    the auditor the engine is up; returns the report line."""
    line = await engine.line("start-up:", within=60)
    auditor.engine_up(True)
    return line


async def quiet(auditor: InvariantAuditor, dsn: str, *, within: float = 60.0) -> None:
    """Bounded wait until nothing is in flight and the auditor has no condition open: the venue and the
    database agree, every position fully protected."""

    async def agreed() -> bool:
        return await in_flight(dsn) == 0 and not auditor.open_conditions()

    await wait_until(agreed, within=within, what="the venue and the database to agree, all protected")


class Waves:
    """Signals inserted into `monitoring.signals` (the engine hears of them by NOTIFY): distinct symbols
    round robin, alternately long and short."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._symbols = itertools.cycle(sorted(UNIVERSE))
        self.inserted = 0

    async def send(self, n: int) -> list[str]:
        symbols = [next(self._symbols) for _ in range(n)]
        conn = await asyncpg.connect(self._dsn)
        try:
            await conn.executemany(
                "INSERT INTO monitoring.signals (symbol, side) VALUES ($1, $2)",
                [(s, "long" if (self.inserted + i) % 2 == 0 else "short") for i, s in enumerate(symbols)],
            )
        finally:
            await conn.close()
        self.inserted += n
        return symbols

"""The real-process chaos suite: `tsbot run` trading `tsbot sim-exchange` over loopback HTTP (the
production path: real ccxt, real signing, Binance's wire format and limits), waves of signals inserted
into `monitoring.signals`, the invariant auditor reading the emulator's `/_sim/state` and the engine's
database every 200 ms of real time.

* SIGTERM mid-wave, restart, SIGKILL mid-wave, restart: the exchange keeps what was placed; each new engine
  restores and protects; the auditor judges an engine only while it runs.
* `--faults 'POST:algoOrder=timeout@0.1'`: a tenth of the stop placements are executed but answered only
  after the engine has given up (ambiguous), then a forced burst of 429s and a 418 on stop placement
  through the control API, mid-wave.

Each ends when the venue and the database agree and every position is fully protected, with a clean
verdict. Bounded: every wait has a deadline."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
from pathlib import Path

import pytest

from storage.embedded import EmbeddedPostgres
from tests.chaos.processes import (
    TSBOT,
    Process,
    Waves,
    audit_limits,
    auditor_for,
    control,
    emulator,
    engine_up,
    environ,
    fetch,
    in_flight,
    protected_positions,
    quiet,
    signals_settled,
    write_config,
)
from tests.chaos.support import NAKED_BACKOFF, tolerating
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

WAVE = 7


async def _protected(dsn: str, n: int) -> None:
    async def enough() -> bool:
        return await protected_positions(dsn) >= n

    await wait_until(enough, within=45, what=f"{n} positions protected")


async def _mid_wave(dsn: str, symbols: list[str]) -> None:
    async def unprotected() -> bool:
        return await in_flight(dsn, symbols) > 0

    await wait_until(unprotected, within=30, what="the wave between fill and protection")


async def test_sigterm_then_sigkill_mid_wave_and_restarts(
    tmp_path: Path, pg_server: EmbeddedPostgres, project_root: Path
) -> None:
    dsn = write_config(tmp_path, project_root, pg_server)
    # Stop placements answer 300 ms late: each wave spends a visible moment filled but not yet protected.
    async with emulator(tmp_path, "POST:algoOrder=latency:300") as url:
        auditor = auditor_for(url, dsn, audit_limits(tmp_path))
        waves = Waves(dsn)
        async with auditor.sampling(0.2):
            for how in (signal.SIGTERM, signal.SIGKILL, None):
                engine = await Process.start("run", cwd=tmp_path)
                try:
                    report = await engine_up(auditor, engine)
                    assert report.split(";")[0].endswith("failed 0"), (
                        report
                    )  # (then any entries still in doubt, named)
                    if how is None:
                        break
                    before = await protected_positions(dsn)
                    await waves.send(WAVE)
                    await _protected(dsn, before + 3)
                    await _mid_wave(dsn, await waves.send(WAVE))
                    auditor.engine_up(False)
                    engine.signal(how)
                    code = await engine.wait()
                    assert code == (0 if how is signal.SIGTERM else -signal.SIGKILL), engine.lines
                except BaseException:  # the last engine too: a failed check must not leave it running
                    if engine.process.returncode is None:
                        engine.process.kill()
                        await engine.wait()
                    raise
                finally:
                    if how is not None and engine.process.returncode is None:
                        engine.process.kill()
                        await engine.wait()
            try:
                await quiet(auditor, dsn)
            finally:
                auditor.engine_up(False)
                assert await engine.stop() == 0, engine.lines
        await auditor.close()
    auditor.assert_clean()
    figures = auditor.figures()
    print(f"\nchaos emulator restarts: {figures.as_dict()}")
    assert figures.positions >= 2 * WAVE


async def test_ambiguous_stop_placements_and_a_429_418_burst(
    tmp_path: Path, pg_server: EmbeddedPostgres, project_root: Path
) -> None:
    # A 3 s call budget (shipped: 10 s): an ambiguous placement is resolved by id 3 s after it was sent.
    dsn = write_config(tmp_path, project_root, pg_server, call_timeout_seconds=3)
    async with emulator(tmp_path, "POST:algoOrder=timeout@0.1") as url:
        auditor = auditor_for(url, dsn, tolerating(audit_limits(tmp_path), NAKED_BACKOFF))
        waves = Waves(dsn)
        async with auditor.sampling(0.2):
            engine = await Process.start("run", cwd=tmp_path)
            try:
                await engine_up(auditor, engine)
                await waves.send(WAVE)
                await _protected(dsn, WAVE - 2)
                await _mid_wave(dsn, await waves.send(WAVE))
                # The next six stop placements are answered 429 (Retry-After 1 s), the one after 418.
                burst = {"targets": ["POST:algoOrder"], "count": 6, "fault": "ratelimit"}
                await control(url, "/_sim/fault", burst)
                await control(url, "/_sim/fault", {**burst, "count": 1, "fault": "ban"})
                await signals_settled(dsn)
                await quiet(auditor, dsn, within=60)
            finally:
                auditor.engine_up(False)
                assert await engine.stop() == 0, engine.lines
        await auditor.close()
    auditor.assert_clean()
    figures = auditor.figures()
    print(f"\nchaos emulator faults: {figures.as_dict()}")
    # The first wave, and at least the second's position seen in flight when the burst was set: the 418
    # that follows refuses whatever entries of it were not sent yet (a loaded clean-clone CI saw 9 of 14).
    assert figures.positions >= WAVE + 1
    assert figures.time_weighted_coverage_pct is not None
    # Real time on a shared machine: the guarantee is `assert_clean` above (no position naked past the
    # tolerated backoff, no duplicate, none lost, judged on the venue). This floor only catches stops never
    # placed; a 7-second audit under three test workers once measured 67.6 %.
    assert figures.time_weighted_coverage_pct >= 50.0


async def test_entries_that_fill_while_no_engine_runs_are_uncovered_on_the_record_from_their_fill(
    tmp_path: Path, pg_server: EmbeddedPostgres, project_root: Path
) -> None:
    """Killed between sending an entry and hearing back, an engine leaves it filled on the venue and sent
    in its database. Until the next engine protects it the position holds no stop: the operators' history
    (`monitoring.uncovered_spans`, `tsbot report`) must show that time, from before the kill to after the
    restart, not nothing because the next engine protected it within a round trip of starting."""
    dsn = write_config(tmp_path, project_root, pg_server)
    # Entries are executed, their answers held until the engine gives up: the kill falls in between
    async with emulator(tmp_path, "POST:order=timeout") as url:
        auditor = auditor_for(url, dsn, audit_limits(tmp_path))
        engine = await Process.start("run", cwd=tmp_path)
        try:
            await engine_up(auditor, engine)
            # (and the account stream tells their fills 20 s late: neither way is the engine told in time)
            await control(url, "/_sim/stream-fault", {"fault": "delay", "ms": 20_000})
            symbols = await Waves(dsn).send(3)

            async def unanswered() -> list[int]:
                held = {p.symbol for p in (await auditor.venue.read()).positions}
                rows = await fetch(dsn, _SENT, symbols)
                return [r["id"] for r in rows if r["symbol"] in held]

            await wait_until(unanswered, within=20, what="an entry filled on the venue, unanswered")
        finally:
            engine.process.kill()
            assert await engine.wait() == -signal.SIGKILL, engine.lines
        killed = (await fetch(dsn, "SELECT now() AS t"))[0]["t"]
        naked = await unanswered()
        await control(url, "/_sim/clear-faults", {})
        await asyncio.sleep(2)  # no engine runs: the positions are naked on the venue
        engine = await Process.start("run", cwd=tmp_path)
        try:
            restarted = (await fetch(dsn, "SELECT now() AS t"))[0]["t"]
            await engine_up(auditor, engine)
            await quiet(auditor, dsn)
        finally:
            assert await engine.stop() == 0, engine.lines
            await auditor.close()
    assert naked
    positions = await fetch(
        dsn, "SELECT id, opened_at, protected_at FROM monitoring.positions WHERE id = ANY($1)", naked
    )
    spans = await fetch(
        dsn,
        "SELECT position_id, started_at, ended_at FROM monitoring.uncovered_spans WHERE position_id = ANY($1)",
        naked,
    )
    assert len(positions) == len(naked)
    for position in positions:
        assert position["opened_at"] <= killed < restarted < position["protected_at"], position
        (span,) = [s for s in spans if s["position_id"] == position["id"]]
        assert span["started_at"] <= killed, (span, killed)
        assert span["ended_at"] >= restarted, (span, restarted)
        assert abs((span["started_at"] - position["opened_at"]).total_seconds()) < 0.5, span


_SENT = (
    "SELECT id, symbol FROM monitoring.positions "
    "WHERE symbol = ANY($1) AND status IN ('pending_entry', 'entry_placed')"
)


async def test_status_says_critical_after_a_stop_that_left_positions_uncovered_and_its_database_gone(
    tmp_path: Path, pg_server: EmbeddedPostgres, project_root: Path
) -> None:
    """An operator's drill: stop placements refused, SIGTERM. The exit line said "UNCOVERED 2 (…) … see
    tsbot status", and the engine stopped the embedded PostgreSQL it had started; `tsbot status` then said
    "UNKNOWN: no embedded PostgreSQL is running", exit 3, while nothing protected those positions. The
    stop's report is recorded beside the log, and status reads it when the database cannot be read: CRITICAL
    (exit 2), naming them, until an engine starts on the account again."""
    dsn = write_config(tmp_path, project_root, pg_server)
    # The status's view once the engine's database is gone: the same account, no server in its data_dir.
    without = tmp_path / "without-database"
    without.mkdir()
    config = (tmp_path / "config.toml").read_text()
    async with emulator(tmp_path) as url:
        await control(url, "/_sim/fault", {"targets": ["POST:algoOrder"], "fault": "busy", "count": 10_000})
        config = (tmp_path / "config.toml").read_text()  # (with the emulator's URL)
        (without / "config.toml").write_text(
            config.replace(
                f'data_dir = "{pg_server.data_dir}"', f'data_dir = "{without / "pgdata"}"', 1
            ).replace('file = "logs/', f'file = "{tmp_path}/logs/', 1)
        )
        engine = await Process.start("run", cwd=tmp_path)
        try:
            await engine.line("start-up:")
            symbols = await Waves(dsn).send(2)

            async def opened() -> bool:
                rows = await fetch(
                    dsn, "SELECT count(*) AS n FROM monitoring.positions WHERE opened_at IS NOT NULL"
                )
                return bool(rows) and rows[0]["n"] == len(symbols)

            await wait_until(opened, within=30, what="the wave's positions open, without stops")
        finally:
            engine.signal(signal.SIGTERM)
            code = await engine.wait(60)
        assert code == 1, engine.lines
        said = next(line for line in engine.lines if line.startswith("stopped: "))
        assert f"UNCOVERED {len(symbols)}" in said

        status = await _tsbot(without, "status")
        assert status.returncode == 2, status.stdout + status.stderr
        first = status.stdout.splitlines()[0]
        assert first.startswith("CRITICAL: the last engine on this account stopped at "), first
        assert f"leaving {len(symbols)} positions uncovered ({', '.join(sorted(symbols))})" in first
        assert "no engine has started here since: nothing here protects them; database: no embedded " in first

        # A start that fails (a wrong secret: refused at its credentials' check) protects nothing: the
        # record stays the last word.
        refused = await _tsbot(tmp_path, "run", TSBOT_VENUE__API_SECRET="not-the-secret")
        assert refused.returncode == 2, refused.stdout + refused.stderr
        status = await _tsbot(without, "status")
        assert status.returncode == 2, status.stdout + status.stderr

        # An engine starts on the account: the record is not the last word any more.
        await control(url, "/_sim/clear-faults", {})
        engine = await Process.start("run", cwd=tmp_path)
        try:
            await engine.line("start-up:")
            await asyncio.sleep(1.5)  # (the start's first health check: at once)
            assert not list((tmp_path / "logs").glob("tsbot-last-stop-*"))
        finally:
            assert await engine.stop() == 0, engine.lines
        # A stream not tried yet is not "down": every start's first health check said so, a WARNING a
        # moment before the stream came up (an operator's find).
        assert not [line for line in engine.lines if "(not started)" in line], engine.lines
    status = await _tsbot(without, "status")
    assert status.returncode == 3, status.stdout + status.stderr
    assert re.search(r"(keeps its|keep their) stops on the exchange; uncovered 0", status.stdout), (
        status.stdout
    )


async def _tsbot(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A `tsbot` command run to its end (bounded), with the chaos environment and `env` over it."""
    return await asyncio.to_thread(
        subprocess.run,
        [TSBOT, *args],
        cwd=cwd,
        env={**environ(), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )

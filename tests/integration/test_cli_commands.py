"""Steering a headless engine: `tsbot entries|protect|close|flatten|restart-protection` against a real
`tsbot run` (venue `binanceusdm` at the Binance-wire emulator over loopback: real ccxt, real HTTP), each
command checked against the venue's truth (`/_sim/state`), the database and `tsbot status`."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from storage.embedded import EmbeddedPostgres
from storage.lease import EngineLease, LeasePhase
from tests.chaos.processes import TSBOT, Process, Waves, emulator, environ, fetch, write_config
from tests.support.auditor import EmulatorTruth, VenueView
from tests.support.waiting import wait_until


def tsbot(
    *args: str, cwd: Path, timeout: float = 90, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """A `tsbot` command as an operator types it in a script: no terminal on stdin."""
    return subprocess.run(
        [TSBOT, *args],
        cwd=cwd,
        env=env or environ(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def run_tsbot(*args: str, cwd: Path, limit: float = 90) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(tsbot, *args, cwd=cwd, timeout=limit)


@pytest.fixture
def workdir(tmp_path: Path, pg_server: EmbeddedPostgres, project_root: Path) -> tuple[Path, str]:
    dsn = write_config(tmp_path, project_root, pg_server)
    config = tmp_path / "config.toml"
    # Marks stand still: no stop fires by itself while the test steers.
    config.write_text(config.read_text().replace("volatility = 1.0", "volatility = 0", 1))
    return tmp_path, dsn


def symbols_held(view: VenueView) -> set[str]:
    return {p.symbol for p in view.positions if p.quantity != 0}


def stops_of(view: VenueView, symbol: str) -> list[Any]:
    return [s for s in view.open_stops if s.symbol == symbol]


async def protected_on_venue(truth: EmulatorTruth, symbols: list[str]) -> bool:
    view = await truth.read()
    return all(symbol in symbols_held(view) and len(stops_of(view, symbol)) == 2 for symbol in symbols)


async def account_of(dsn: str) -> str:
    rows = await fetch(dsn, "SELECT account FROM monitoring.engine_leases")
    return rows[0]["account"]


async def test_every_command_steers_a_headless_engine(workdir: tuple[Path, str]) -> None:
    cwd, dsn = workdir
    async with emulator(cwd) as base_url:
        engine = await Process.start("run", cwd=cwd)
        truth = EmulatorTruth(base_url)
        try:
            await engine.line("start-up:", within=60)
            waves = Waves(dsn)
            held = await waves.send(4)
            await wait_until(lambda: protected_on_venue(truth, held), within=60, what="4 positions protected")

            # close: the position is gone on the venue, and both of its stops with it.
            result = await run_tsbot("close", held[0].lower(), "--reason", "test close", cwd=cwd)
            assert result.returncode == 0, result.stderr
            lines = result.stdout.splitlines()
            assert lines[0].startswith(f"{held[0]} (position ")
            assert ": ok: closed at market" in lines[0]
            view = await truth.read()
            assert held[0] not in symbols_held(view)
            assert stops_of(view, held[0]) == []
            assert symbols_held(view) >= set(held[1:])

            # a second close of the same symbol: nothing to close, the operator's mistake: exit 2, one line,
            # nothing sent (it exited 1, as a failure of the engine's would; an operator).
            again = await run_tsbot("close", held[0], cwd=cwd)
            assert again.returncode == 2
            assert again.stderr.strip() == (
                f"tsbot: close: no open position on {held[0]}; nothing was sent to the engine"
            )

            # entries pause: status says paused, by whom and why; a new signal is rejected.
            paused = await run_tsbot("entries", "pause", "--reason", "venue maintenance", cwd=cwd)
            assert paused.returncode == 0, paused.stderr
            assert "entries paused" in paused.stdout
            status = json.loads((await run_tsbot("status", "--json", cwd=cwd)).stdout)
            assert status["entries"] == "paused"
            assert status["entries_paused"]["by"] == "operator"
            assert status["entries_paused"]["reason"] == "venue maintenance"
            who = status["entries_paused"]["who"]
            assert "@" in who, who
            assert who.rsplit("/", 1)[1].isdigit(), who
            [rejected_symbol] = await waves.send(1)
            await wait_until(
                lambda: _signal_status(dsn, rejected_symbol, "rejected"), within=30, what="signal rejected"
            )
            rows = await fetch(
                dsn, "SELECT reason FROM monitoring.signals WHERE symbol = $1", rejected_symbol
            )
            assert rows[0]["reason"] == "entries paused"
            assert rejected_symbol not in symbols_held(await truth.read())

            # entries resume: a new signal opens again.
            resumed = await run_tsbot("entries", "resume", cwd=cwd)
            assert resumed.returncode == 0, resumed.stderr
            status = json.loads((await run_tsbot("status", "--json", cwd=cwd)).stdout)
            assert status["entries"] == "on"
            assert status["entries_paused"] is None
            [opened] = await waves.send(1)
            await wait_until(lambda: protected_on_venue(truth, [opened]), within=60, what="entries on again")

            # protect: every position is covered, nothing to do; a symbol without a position fails.
            protect = await run_tsbot("protect", cwd=cwd)
            assert protect.returncode == 0, protect.stderr
            assert "nothing to protect" in protect.stdout
            one = await run_tsbot("protect", "--symbol", held[1], cwd=cwd)
            assert one.returncode == 0, one.stderr
            assert f"{held[1]} (position " in one.stdout
            assert "ok: covered" in one.stdout
            missing = await run_tsbot("protect", "--symbol", held[0], cwd=cwd)
            assert missing.returncode == 2
            assert f"no open position on {held[0]}; nothing was sent" in missing.stderr

            # restart-protection: the manager restarts; every stop is still on the venue.
            restart = await run_tsbot("restart-protection", cwd=cwd)
            assert restart.returncode == 0, restart.stderr
            assert restart.stdout.startswith("restart protection: restored ")
            assert "failed 0" in restart.stdout
            assert await protected_on_venue(truth, [*held[1:], opened])

            # A command for another account is never executed by this engine.
            account = await account_of(dsn)
            conn = await asyncpg.connect(dsn)
            try:
                foreign = await conn.fetchval(
                    "INSERT INTO monitoring.commands (account, kind, args, requested_by, expires_at) "
                    "VALUES ($1, 'close', $2::jsonb, 'someone@elsewhere/1', now() + interval '5 minutes') "
                    "RETURNING id",
                    account + "-other",
                    json.dumps({"symbol": held[1]}),
                )
            finally:
                await conn.close()
            after = await run_tsbot("protect", cwd=cwd)  # a later command of its own account is answered
            assert after.returncode == 0, after.stderr
            rows = await fetch(dsn, "SELECT state FROM monitoring.commands WHERE id = $1", foreign)
            assert rows[0]["state"] == "pending"
            assert held[1] in symbols_held(await truth.read())

            # flatten without a terminal and without --yes: refused, nothing sent.
            refused = await run_tsbot("flatten", "--all", cwd=cwd)
            assert refused.returncode == 2
            assert refused.stderr.count("\n") == 1
            assert "pass --yes" in refused.stderr
            rows = await fetch(dsn, "SELECT count(*) AS n FROM monitoring.commands WHERE kind = 'flatten'")
            assert rows[0]["n"] == 0

            # flatten on a terminal asks first; anything but yes sends nothing.
            declined = await asyncio.to_thread(_flatten_on_a_terminal, cwd, "n\n")
            assert declined.returncode == 1, declined.stderr
            assert "Pause entries and close all 4 open positions of account" in declined.stdout
            assert declined.stderr == "tsbot: flatten: not confirmed; nothing was sent\n"
            rows = await fetch(dsn, "SELECT count(*) AS n FROM monitoring.commands WHERE kind = 'flatten'")
            assert rows[0]["n"] == 0
            assert len(symbols_held(await truth.read())) == 4

            # flatten --all --yes: the venue is flat, with no stop of ours left; entries stay paused.
            flat = await run_tsbot("flatten", "--all", "--yes", "--reason", "end of test", cwd=cwd)
            assert flat.returncode == 0, flat.stderr
            closed_lines = [line for line in flat.stdout.splitlines() if ": ok: closed at market" in line]
            assert len(closed_lines) == 4, flat.stdout
            view = await truth.read()
            assert symbols_held(view) == set()
            assert view.open_stops == ()
            status = json.loads((await run_tsbot("status", "--json", cwd=cwd)).stdout)
            assert status["entries"] == "paused"
            assert status["active"] == 0

            # Every command is in monitoring.events with who asked and why.
            events = await fetch(
                dsn,
                "SELECT type, severity, data FROM monitoring.events WHERE type LIKE 'command_%' ORDER BY id",
            )
            types = [e["type"] for e in events]
            # (The second close, of a symbol with no position, was refused before anything was sent.)
            assert types[:2] == ["command_close", "command_entries_pause"]
            # An operator's command done is no warning: routine commands filled the log panel's counters.
            assert [e["severity"] for e in events[:2]] == ["info", "info"]
            assert {e["severity"] for e in events} <= {"info", "warning"}
            assert {"command_entries_resume", "command_protect", "command_restart_protection"} <= set(types)
            assert types[-1] == "command_flatten"
            close_event = (
                json.loads(events[0]["data"]) if isinstance(events[0]["data"], str) else events[0]["data"]
            )
            assert close_event["reason"] == "test close"
            assert "@" in close_event["requested_by"]
        finally:
            await truth.close()
            code = await engine.stop()
        assert code == 0, engine.lines


def _flatten_on_a_terminal(cwd: Path, answer: str) -> subprocess.CompletedProcess[str]:
    """`tsbot flatten --all` with a terminal on stdin (a pty), answering the question with `answer`."""
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen(
            [TSBOT, "flatten", "--all"],
            cwd=cwd,
            env=environ(),
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(slave)
        slave = -1
        os.write(master, answer.encode())
        out, err = process.communicate(timeout=90)
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


async def _at_the_flatten_prompt(
    workdir: tuple[Path, str], act: Callable[[asyncio.subprocess.Process, int], None], env: dict[str, str]
) -> tuple[int, str]:
    """`tsbot flatten --all` on a terminal (a pty) with an engine's lease held, so that it asks; once the
    question shows, `act(process, terminal)`; its exit code (within 10 s) and what the terminal showed."""
    cwd, dsn = workdir
    first = await run_tsbot("entries", "resume", cwd=cwd)
    account = first.stderr.split("no engine is running for account ", 1)[1].split(";", 1)[0]
    lease = await EngineLease.acquire(dsn, "binanceusdm", account, "test")  # an engine runs: it asks
    master, slave = pty.openpty()
    shown = b""

    def read_terminal() -> bytes:
        nonlocal shown
        while select.select([master], [], [], 0)[0]:
            try:
                shown += os.read(master, 4096)
            except OSError:  # (the process has gone: nothing more to read)
                break
        return shown

    try:
        process = await asyncio.create_subprocess_exec(
            TSBOT, "flatten", "--all", cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave
        )
        await wait_until(lambda: b"[y/N]" in read_terminal(), within=60, what="the question on the terminal")
        act(process, master)
        try:
            code = await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            pytest.fail("still running 10 s later")
        said = read_terminal().decode(errors="replace")
    finally:
        os.close(master)
        os.close(slave)
        await lease.release()
    rows = await fetch(dsn, "SELECT count(*) AS n FROM monitoring.commands")
    assert rows[0]["n"] == 0  # nothing sent
    return code, said


async def test_ctrl_c_at_the_flatten_prompt_ends_it_at_once_and_sends_nothing(
    workdir: tuple[Path, str],
) -> None:
    """`tsbot flatten --all` asks on the terminal; the operator thinks better of it and presses Ctrl-C. The
    process stayed until Enter was pressed: its exit waited for the thread blocked reading the answer."""
    code, said = await _at_the_flatten_prompt(
        workdir, lambda process, _terminal: process.send_signal(signal.SIGINT), environ()
    )
    assert code == 130, said
    assert "Traceback" not in said, said


async def test_an_answer_that_cannot_be_read_is_not_a_yes_and_ends_the_command(
    workdir: tuple[Path, str],
) -> None:
    """A byte the terminal's encoding cannot decode, typed at the question (strict UTF-8 input): the thread
    reading the answer died with a traceback and the command waited at the prompt for good (a reviewer)."""
    code, said = await _at_the_flatten_prompt(
        workdir,
        lambda _process, terminal: os.write(terminal, b"\xe9\n"),
        {**environ(), "PYTHONIOENCODING": "utf-8:strict"},
    )
    assert code == 1, said
    assert "flatten: not confirmed; nothing was sent" in said, said
    assert "Traceback" not in said, said


async def _signal_status(dsn: str, symbol: str, status: str) -> bool:
    rows = await fetch(dsn, "SELECT status FROM monitoring.signals WHERE symbol = $1", symbol)
    return bool(rows) and rows[0]["status"] == status


async def test_without_an_engine_every_command_exits_3_at_once(workdir: tuple[Path, str]) -> None:
    cwd, dsn = workdir
    for args in (
        ("close", "SFPUSDT"),
        ("entries", "pause", "--reason", "x"),
        ("entries", "resume"),
        ("protect",),
        ("flatten", "--all", "--yes"),
        ("restart-protection",),
    ):
        started = time.monotonic()
        result = await run_tsbot(*args, cwd=cwd)
        assert result.returncode == 3, (args, result.stderr)
        assert result.stderr.count("\n") == 1, result.stderr
        assert "no engine is running for account binanceusdm" in result.stderr
        assert "nothing was sent" in result.stderr
        assert time.monotonic() - started < 25  # not the 30 s answer timeout: refused before sending
    rows = await fetch(dsn, "SELECT count(*) AS n FROM monitoring.commands")
    assert rows[0]["n"] == 0


async def test_an_engine_holding_the_account_but_not_heard_is_sent_nothing(workdir: tuple[Path, str]) -> None:
    """The engine holding the account has not heartbeated for 31 s (hung, frozen, its host gone), or is
    stopping: it would not take a command. Before: the command was queued and the operator, flattening, waited out the 30 s
    answer timeout. Now it is refused at once, naming the engine."""
    cwd, dsn = workdir
    first = await run_tsbot("entries", "resume", cwd=cwd)
    account = first.stderr.split("no engine is running for account ", 1)[1].split(";", 1)[0]
    lease = await EngineLease.acquire(dsn, "binanceusdm", account, "test")
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("UPDATE monitoring.engine_leases SET heartbeat_at = now() - interval '31 s'")
        finally:
            await conn.close()
        for args in (
            ("close", "SFPUSDT"),
            ("entries", "pause", "--reason", "x"),
            ("flatten", "--all", "--yes"),
        ):
            started = time.monotonic()
            result = await run_tsbot(*args, cwd=cwd)
            assert result.returncode == 3, (args, result.stderr)
            assert result.stderr.count("\n") == 1, result.stderr
            assert f"the engine holding account {account} is silent: pid {os.getpid()} on " in result.stderr
            assert "(hung, or its host is gone); nothing was sent" in result.stderr
            assert time.monotonic() - started < 25  # not the 30 s answer timeout
        # Heard again, but stopping (its loops are gone): it would not take one either.
        await lease.heartbeat(LeasePhase.STOPPING)
        stopping = await run_tsbot("close", "SFPUSDT", cwd=cwd)
        assert stopping.returncode == 3, stopping.stderr
        assert f"the engine holding account {account} is stopping: pid {os.getpid()} on " in stopping.stderr
        assert stopping.stderr.rstrip().endswith("; nothing was sent"), stopping.stderr
    finally:
        await lease.release()
    rows = await fetch(dsn, "SELECT count(*) AS n FROM monitoring.commands")
    assert rows[0]["n"] == 0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("close", "SFP/USDT"), "tsbot: SYMBOL: symbol must be exchange-native letters and digits"),
        (("protect", "--symbol", ""), "tsbot: --symbol: symbol must be a non-empty string"),
        (("flatten",), "tsbot: flatten closes every position of the account: say so with --all"),
        (
            ("close", "SFPUSDT", "--wait-seconds", "0"),
            "tsbot: --wait-seconds must be more than 0 and at most 3600, got 0",
        ),
        (("entries", "pause", "--reason", "a\nb"), "tsbot: --reason must be one line"),
        (("entries", "stop"), "tsbot entries: argument ACTION: invalid choice: 'stop'"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    workdir: tuple[Path, str], args: tuple[str, ...], expected: str
) -> None:
    cwd, _dsn = workdir
    result = tsbot(*args, cwd=cwd)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(expected), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr

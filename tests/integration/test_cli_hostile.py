"""Hostile input at the command line (issue 14): every bad input is one line on stderr naming the thing at
fault and an exit code (2 the operator's input, 1 couldn't reach), never a traceback.

Most cases run `engine.cli.main` in-process (tests/support/cli_runner.py); the ones where the process
boundary matters (a venue over real HTTP, file modes, the dashboard's entry point) run the console
scripts as operators do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from engine import cli
from engine.venues.binance_emulator import BinanceEmulator, running
from engine.venues.bybit_emulator import BybitEmulator
from engine.venues.bybit_emulator import running as running_bybit
from engine.venues.sim import SimVenueSettings
from storage.embedded import EmbeddedPostgres
from tests.support.cli_runner import CliResult, run_in_process

TSBOT = str(Path(sys.executable).with_name("tsbot"))
TSBOT_TUI = str(Path(sys.executable).with_name("tsbot-tui"))
API_KEY = "hostile-test-key-0123456789"
API_SECRET = "hostile-test-secret-0123456789"


@pytest.fixture
def workdir(tmp_path: Path, pg_server: EmbeddedPostgres) -> Path:
    """A config.toml on the session's embedded server with a database of its own."""
    name = f"hostile_{uuid.uuid4().hex[:12]}"
    (tmp_path / "config.toml").write_text(f'[database]\ndata_dir = "{pg_server.data_dir}"\nname = "{name}"\n')
    return tmp_path


def tsbot(*argv: str, cwd: Path, **env: str) -> CliResult:
    return run_in_process(cli.main, argv, env=env, cwd=cwd)


def _one_line(result: CliResult, code: int, starts: str) -> None:
    assert result.problems() == [], result
    assert result.code == code, result
    assert result.stderr_lines[0].startswith(starts), result.stderr
    assert result.stdout == ""


def _subprocess(*argv: str, cwd: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TSBOT_")}
    return subprocess.run(
        list(argv), cwd=cwd, env={**base, **env}, capture_output=True, text=True, timeout=timeout
    )


def _on_binance(
    url: str, *argv: str, cwd: Path, key: str = API_KEY, secret: str = API_SECRET, **env: str
) -> subprocess.CompletedProcess[str]:
    """`tsbot *argv` in its own process, configured for Binance at `url` with a key and secret."""
    return _on_venue("binanceusdm", url, *argv, cwd=cwd, key=key, secret=secret, **env)


def _on_venue(
    kind: str, url: str, *argv: str, cwd: Path, key: str = API_KEY, secret: str = API_SECRET, **env: str
) -> subprocess.CompletedProcess[str]:
    """`tsbot *argv` in its own process, configured for the venue `kind` at `url` with a key and secret."""
    return _subprocess(
        TSBOT,
        *argv,
        cwd=cwd,
        TSBOT_VENUE__KIND=kind,
        TSBOT_VENUE__BASE_URL=url,
        TSBOT_VENUE__API_KEY=key,
        TSBOT_VENUE__API_SECRET=secret,
        **env,
    )


def _assert_one_line(result: subprocess.CompletedProcess[str], code: int, starts: str) -> None:
    assert result.returncode == code, result
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(starts), result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# --- signals ------------------------------------------------------------------------------------------------

SCORE_EXPECTED = "tsbot: signal: score must be a finite number between -1e12 and 1e12 with at most 30 digits"


@pytest.mark.parametrize(
    ("argv", "starts"),
    [
        (("--score", "1e1000000"), SCORE_EXPECTED),
        (("--score", "1e-16384"), SCORE_EXPECTED),
        (("--id", "\udcff"), "tsbot: signal: id must be valid UTF-8 text, got '\\udcff'"),
        (("--score", "9" * 5000), SCORE_EXPECTED),
    ],
)
def test_signals_add_refuses_values_the_database_cannot_hold(
    workdir: Path, argv: tuple[str, ...], starts: str
) -> None:
    _one_line(tsbot("signals", "add", "ZZZUSDT", "long", *argv, cwd=workdir), 2, starts)


def test_a_signal_for_a_symbol_the_venue_does_not_list_is_refused_and_nothing_inserted(workdir: Path) -> None:
    """`tsbot signals add FOOBARUSDT long` said "signal 33 added" and exit 0; only the engine's log said
    later that it was rejected (an operator). The venue's markets say it now: one line, exit 2, and an
    import with one such line inserts none of them."""
    _one_line(
        tsbot("signals", "add", "FOOBARUSDT", "long", cwd=workdir),
        2,
        "tsbot: signal: FOOBARUSDT is not listed as trading on sim; nothing was inserted",
    )
    lines = workdir / "wave.jsonl"
    lines.write_text('{"symbol": "SFPUSDT", "side": "long"}\n{"symbol": "NOPEUSDT", "side": "short"}\n')
    _one_line(
        tsbot("signals", "import", str(lines), cwd=workdir),
        2,
        "tsbot: signal: NOPEUSDT is not listed as trading on sim; nothing was inserted",
    )
    added = tsbot("signals", "add", "SFPUSDT", "long", cwd=workdir)
    assert added.code == 0, added.stderr
    assert added.stdout.startswith("signal 1 added: SFPUSDT long"), added.stdout  # (none before it)


async def test_a_signal_is_checked_against_the_wire_venues_markets(workdir: Path) -> None:
    """On Binance (its emulator over loopback, read as the engine reads it): a symbol it lists is added,
    one it does not is refused."""
    emulator = BinanceEmulator(
        SimVenueSettings(seed=7, symbols=["SFPUSDT", "BTCUSDT"]), api_key=API_KEY, api_secret=API_SECRET
    )
    async with running(emulator) as url:
        said = [
            await asyncio.to_thread(_on_binance, url, "signals", "add", symbol, "long", cwd=workdir)
            for symbol in ("BTCUSDT", "ETHUSDT")
        ]
    listed, unlisted = said
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("signal 1 added: BTCUSDT long"), listed.stdout
    _assert_one_line(
        unlisted, 2, "tsbot: signal: ETHUSDT is not listed as trading on binanceusdm; nothing was inserted"
    )


async def test_a_signal_for_a_symbol_the_venue_lists_as_settling_is_refused(workdir: Path) -> None:
    """Bybit lists a symbol it is settling, but takes no order on it (110063): `signals add` said it was
    added, and the engine's log said later it was refused (a reviewer)."""
    emulator = BybitEmulator(
        SimVenueSettings(seed=7, symbols=["SOLUSDT", "BTCUSDT"]),
        api_key=API_KEY,
        api_secret=API_SECRET,
        control=True,
    )
    async with running_bybit(emulator) as url, aiohttp.ClientSession() as control:
        body = {"symbol": "SOLUSDT", "status": "Settling"}
        async with control.post(f"{url}/_sim/symbol-status", json=body) as answer:
            assert answer.status == 200, await answer.text()
        result = await asyncio.to_thread(
            _on_venue, "bybit", url, "signals", "add", "SOLUSDT", "long", cwd=workdir
        )
    _assert_one_line(
        result, 2, "tsbot: signal: SOLUSDT is not listed as trading on bybit; nothing was inserted"
    )


def test_a_signal_whose_venue_cannot_be_read_is_added_and_said_unchecked(workdir: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    result = _on_binance(url, "signals", "add", "BTCUSDT", "long", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("signal 1 added: BTCUSDT long"), result.stdout
    assert result.stderr.startswith("tsbot: signal symbols not checked against the venue's markets ("), result
    assert result.stderr.count("\n") == 1, result.stderr
    assert API_SECRET not in result.stderr


def test_a_signal_added_inside_a_kept_ip_ban_sends_nothing_to_the_venue(workdir: Path) -> None:
    """Bybit's IP ban (HTTP 403, at least 10 minutes) is kept beside the log by the process that met it.
    `signals add` read the venue's markets all the same, a request into the ban (r71); it now says the
    symbols are not checked, and why, and sends nothing."""
    connections: list[object] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.2)
        host = f"127.0.0.1:{listener.getsockname()[1]}"
        (workdir / "logs").mkdir(exist_ok=True)
        (workdir / "logs" / "tsbot-ip-bans.json").write_text(json.dumps({host: time.time() - 60}))
        done = threading.Event()

        def accept() -> None:
            while not done.is_set():
                with contextlib.suppress(TimeoutError):
                    conn, _ = listener.accept()
                    connections.append(conn)
                    conn.close()

        acceptor = threading.Thread(target=accept)
        acceptor.start()
        try:
            result = _on_venue("bybit", f"http://{host}", "signals", "add", "SOLUSDT", "long", cwd=workdir)
        finally:
            done.set()
            acceptor.join()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("signal 1 added: SOLUSDT long"), result.stdout
    assert re.match(
        r"tsbot: signal symbols not checked against the venue's markets, nor the API key \(its IP ban, met by "
        r"this installation, "
        r"ends in [89]m \d\ds, at \d\d:\d\d:\d\d UTC\); ",
        result.stderr,
    ), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert connections == []


async def test_a_kept_bybit_ban_of_the_same_host_skips_nothing_on_binance(workdir: Path) -> None:
    """The IP-ban record is Bybit's (its 403 carries no end); keyed by host, an entry for a host Binance is
    then configured on skipped Binance's markets read and key check, and a refused key's signal went in
    (r73). Binance's own bans are dated by the venue and never recorded."""
    emulator = BinanceEmulator(
        SimVenueSettings(seed=7, symbols=["SFPUSDT", "BTCUSDT"]), api_key=API_KEY, api_secret=API_SECRET
    )
    async with running(emulator) as url:
        (workdir / "logs").mkdir(exist_ok=True)
        host = url.removeprefix("http://").rstrip("/")
        (workdir / "logs" / "tsbot-ip-bans.json").write_text(json.dumps({host: time.time() - 60}))
        result = await asyncio.to_thread(
            _on_binance, url, "signals", "add", "BTCUSDT", "long", cwd=workdir, key="a-wrong-key-0123456789"
        )
    _assert_one_line(result, 2, "tsbot: venue binanceusdm refused the API key (code -2015")


def test_signals_add_with_a_huge_score_in_a_real_process(workdir: Path) -> None:
    result = _subprocess(TSBOT, "signals", "add", "ZZZUSDT", "long", "--score", "1e1000000", cwd=workdir)
    _assert_one_line(result, 2, SCORE_EXPECTED)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"symbol": "SFPUSDT", "side": "long", "id": "x\\u0000"}\n', ":1: id must be printable text"),
        (
            b'{"symbol": "SFPUSDT", "side": "long", "score": 1' + b"0" * 4400 + b"}\n",
            ":1: not JSON this program reads: a number of more than 4 300 digits",
        ),
        (b"[" * 200_000 + b"]" * 200_000 + b"\n", ":1: not JSON this program reads: nested too deeply"),
        ('{"symbol": "SFPUSDT", "side": "long"}\n'.encode("utf-16"), ":1: not UTF-8 text (byte 0xff"),
        ('{"symbol": "SFPUSDT", "side": "long", "id": "é"}\n'.encode("latin-1"), ":1: not UTF-8 text"),
    ],
)
def test_signals_import_refuses_hostile_files_naming_file_and_line(
    workdir: Path, content: bytes, reason: str
) -> None:
    path = workdir / "signals.jsonl"
    path.write_bytes(content)
    _one_line(tsbot("signals", "import", str(path), cwd=workdir), 2, f"tsbot: {path}{reason}")


async def test_an_import_file_with_an_undecodable_name_is_imported_and_named(
    workdir: Path, pg_server: EmbeddedPostgres
) -> None:
    name = os.fsdecode(b"sig\xffnals.jsonl")
    (workdir / name).write_text('{"symbol": "SFPUSDT", "side": "long"}\n')
    result = await asyncio.to_thread(tsbot, "signals", "import", name, cwd=workdir)
    assert result.problems() == [], result
    assert result.code == 0, result
    assert result.stdout == "1 signal imported from sig\\xffnals.jsonl\n"


# --- configuration ------------------------------------------------------------------------------------------


def test_config_problems_from_the_environment_are_one_line_in_a_real_process(tmp_path: Path) -> None:
    listed = _subprocess(TSBOT, "config", "show", cwd=tmp_path, TSBOT_VENUE__SIM__SYMBOLS="SFPUSDT,BTCUSDT")
    _assert_one_line(listed, 2, "TSBOT_VENUE__SIM__SYMBOLS: venue.sim.symbols: must be a JSON list like")
    whole = _subprocess(TSBOT, "config", "show", cwd=tmp_path, TSBOT_VENUE="x")
    _assert_one_line(whole, 2, "TSBOT_VENUE: a whole section cannot be set at once: use TSBOT_VENUE__<KEY>")
    table = _subprocess(TSBOT, "config", "show", cwd=tmp_path, TSBOT_VENUE__SIM='{"seed": 5}')
    _assert_one_line(table, 2, "TSBOT_VENUE__SIM: venue.sim: a whole table cannot be set at once")
    capital = _subprocess(TSBOT, "config", "show", cwd=tmp_path, TSBOT_VENUE__TESTNET="False")
    _assert_one_line(capital, 2, 'TSBOT_VENUE__TESTNET: venue.testnet: must be true or false, got "False"')


def _password_file_not_utf8(d: Path) -> None:
    (d / "pw").write_bytes(b"\xff\xfe")
    (d / "pw").chmod(0o600)
    (d / "c.toml").write_text(f'[database]\npassword_file = "{d}/pw"\n')


@pytest.mark.parametrize(
    ("make", "starts"),
    [
        (lambda d: (d / "c.toml").write_bytes("[venue]\n".encode("utf-16")), "{d}/c.toml: not UTF-8 text"),
        (
            lambda d: (d / "c.toml").write_bytes('[venue]\naccount = "café"\n'.encode("latin-1")),
            "{d}/c.toml: not UTF-8 text",
        ),
        (
            lambda d: (
                (d / "keys").mkdir() or (d / "c.toml").write_text(f'[venue]\napi_key_file = "{d}/keys"\n')
            ),
            "{d}/c.toml: venue.api_key_file: secrets file {d}/keys must be a regular file, got a directory",
        ),
        (
            _password_file_not_utf8,
            "{d}/c.toml: database.password_file: secrets file {d}/pw must be UTF-8 text",
        ),
        (
            lambda d: (d / "c.toml").mkdir(),
            "{d}/c.toml: is a directory: expected a TOML file like config.toml",
        ),
        (
            lambda d: (d / "c.toml").write_text('[database]\ndsn = "abc"\n'),
            "{d}/c.toml: database.dsn: must be",
        ),
        (
            lambda d: (d / "c.toml").write_text('[database]\ndsn = "mysql://bot@localhost/tsbot"\n'),
            "{d}/c.toml: database.dsn: must be a URL starting with postgresql:// or postgres://",
        ),
        (lambda d: (d / "c.toml").write_text("[venue]\ntestnet = 0\n"), "{d}/c.toml: venue.testnet: must be"),
        (
            lambda d: (d / "c.toml").write_text('[database]\ndsn = "postgresql://u:hunter2@localhost/db"\n'),
            "{d}/c.toml: database.dsn: must not hold the database password: set TSBOT_DATABASE__PASSWORD",
        ),
    ],
)
def test_bad_configuration_files_are_one_line_for_every_command(tmp_path: Path, make, starts: str) -> None:  # type: ignore[no-untyped-def]
    make(tmp_path)
    expected = starts.format(d=tmp_path)
    for argv in (("config", "show"), ("status",), ("run", "--duration", "1")):
        _one_line(tsbot(*argv, "--config", str(tmp_path / "c.toml"), cwd=tmp_path), 2, expected)


@pytest.fixture
def unwritable(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        return Path("/sys")  # root writes anywhere a mode allows, but not into sysfs
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return locked


@pytest.mark.parametrize(
    ("log_file", "reason"),
    [
        ("", "logging.file: must have at least 1 character"),
        ("{tmp}", "tsbot: logging.file: cannot write the log file {tmp}: Is a directory"),
        ("{tmp}/a-file/trading_bot.log", "tsbot: logging.file: cannot write the log file {tmp}/a-file/"),
        (
            "{locked}/trading_bot.log",
            "tsbot: logging.file: cannot write the log file {locked}/trading_bot.log",
        ),
    ],
)
def test_a_log_file_that_cannot_be_written_is_one_line(
    workdir: Path, unwritable: Path, log_file: str, reason: str
) -> None:
    (workdir / "a-file").write_text("")
    fill = {"tmp": workdir, "locked": unwritable}
    env = {"TSBOT_LOGGING__FILE": log_file.format(**fill)}
    expected = reason.format(**fill) if reason.startswith("tsbot:") else f"TSBOT_LOGGING__FILE: {reason}"
    for argv in (("db", "migrate"), ("status",), ("signals", "add", "SFPUSDT", "long")):
        _one_line(tsbot(*argv, cwd=workdir, **env), 2, expected)


def test_a_real_bug_is_one_line_and_its_traceback_goes_to_the_log(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_args: object, _loaded: object) -> int:
        raise KeyError("a bug")

    monkeypatch.setitem(cli._HANDLERS, "status", broken)
    result = tsbot("status", cwd=workdir)
    assert result.code == 1
    assert result.stderr_lines == [
        "tsbot: internal error (a bug, not your input): KeyError: 'a bug'; the traceback is in "
        f"{workdir / 'logs' / 'trading_bot.log'}"  # (where it is, whatever directory the command ran from)
    ]
    assert "Traceback (most recent call last)" in (workdir / "logs" / "trading_bot.log").read_text()


# --- arguments ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "starts"),
    [
        (("run", "--duration", "inf"), "tsbot: --duration must be a positive number of seconds"),
        (("run", "--duration", "nan"), "tsbot: --duration must be a positive number of seconds"),
        (("run", "--duration", "1e400"), "tsbot: --duration must be a positive number of seconds"),
        (("run", "--duration", "x"), "tsbot run: argument --duration: invalid float value: 'x'"),
        (("signals", "add"), "tsbot signals add: the following arguments are required: symbol, side"),
        (("nope",), "tsbot: argument COMMAND: invalid choice: 'nope'"),
        (
            ("report", "--since", "-5h"),  # (it said only "expected one argument")
            "tsbot report: argument --since: expected one argument (a value that begins with '-' is read as "
            "an option: give it as OPTION=VALUE)",
        ),
        (("report", "--since=-5h"), "tsbot: --since '-5h': expected 8h, 90m"),
        (("sim-exchange", "--seed", "99999999999"), "tsbot: --seed must be within 0..4294967295"),
        (("sim-exchange", "--port", "9" * 5000), "tsbot sim-exchange: argument --port: invalid int value"),
        (
            ("--config", "a.toml", "config", "show", "--config", "b.toml"),
            "tsbot config show: --config given twice (a.toml, b.toml): give it once",
        ),
        # Left over after a subcommand: that subcommand's help, not the top level's (an operator).
        (
            ("db", "migrate", "--bogus"),
            "tsbot: unrecognized arguments: --bogus (see tsbot db migrate --help)",
        ),
        (("status", "extra"), "tsbot: unrecognized arguments: extra (see tsbot status --help)"),
        (
            ("close", "BTCUSDT", "--wait-seconds", "0"),
            "tsbot: --wait-seconds must be more than 0 and at most",
        ),
    ],
)
def test_bad_arguments_are_one_line(workdir: Path, argv: tuple[str, ...], starts: str) -> None:
    result = tsbot(*argv, cwd=workdir)
    _one_line(result, 2, starts)
    assert len(result.stderr) < 600


@pytest.mark.parametrize(
    "argv",
    [("status",), ("flatten", "--all", "--yes"), ("entries", "pause"), ("report",)],
)
def test_an_account_command_without_the_api_key_says_so_not_that_no_engine_runs(
    workdir: Path, argv: tuple[str, ...]
) -> None:
    """A Bybit or Binance account is named by its API key (a digest of it). Run from a shell without the
    key, `tsbot status` took the digest of nothing for the account and said "no engine is measuring …
    engine: not running … active positions: 0" while an engine traded 14 positions, and an emergency
    `flatten --all` said "no engine is running …; nothing was sent" (an operator in tmux). It says the key
    is missing, in one line, exit 2."""
    env = {"TSBOT_VENUE__KIND": "bybit", "TSBOT_VENUE__API_SECRET": API_SECRET}
    result = tsbot(*argv, cwd=workdir, **env)
    _one_line(result, 2, "tsbot: venue.kind 'bybit' (testnet) needs TSBOT_VENUE__API_KEY")
    assert "account" in result.stderr_lines[0]


def test_a_reader_that_stops_reading_is_no_error_and_the_verdict_stands(workdir: Path) -> None:
    """`tsbot status | head -1` (a monitoring wrapper reads the verdict line and goes): when the reader had
    gone before the rest was written, `tsbot` said "internal error (a bug, not your input): BrokenPipeError"
    and exited 1, not the verdict's 3 (an operator in tmux, 1 run in 5). The rest of the output is dropped;
    the exit code is the verdict's."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TSBOT_")}
    process = subprocess.Popen(
        [TSBOT, "status"], cwd=workdir, env=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    process.stdout.close()  # the reader is gone before anything is written
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 3, stderr
    assert "internal error" not in stderr
    assert "Traceback" not in stderr
    assert "BrokenPipe" not in stderr


def test_help_still_prints_and_exits_0(tmp_path: Path) -> None:
    result = tsbot("signals", "add", "--help", cwd=tmp_path)
    assert result.code == 0
    assert "usage: tsbot signals add" in result.stdout


# --- the venue at start: unreachable (1) or refusing the key (2) -------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_venue_on_a_closed_port_is_one_line_couldnt_reach(workdir: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    result = _on_binance(
        url,
        "run",
        "--duration",
        "60",
        cwd=workdir,
        # The start tries its reads six times (31 s of backoff at the defaults): the same tries, shorter.
        TSBOT_PROTECTION__RETRY_INITIAL_SECONDS="0.1",
        TSBOT_PROTECTION__RETRY_MAX_SECONDS="1",
    )
    _assert_one_line(result, 1, f"tsbot: venue binanceusdm at {url}: couldn't reach it: ")
    assert API_SECRET not in result.stderr


def test_the_duration_counts_from_the_start_and_ends_a_start_that_keeps_trying(workdir: Path) -> None:
    """`tsbot run --duration 5` on an unreachable venue ran 33 s, the start's six tries, before it said it
    could not reach it (an operator): the duration now ends the start too, as SIGTERM does, and says so
    with what the start waited for."""
    url = f"http://127.0.0.1:{_closed_port()}"
    began = time.monotonic()
    result = _on_binance(url, "run", "--duration", "2", cwd=workdir)
    took = time.monotonic() - began
    # What ended it, and what the start waited for (a reviewer: "stopped" hid both).
    _assert_one_line(
        result,
        1,
        "tsbot: --duration 2 ended during the start-up, while it waited for the venue (load_markets failed: "
        f"binanceusdm: could not connect to {url.removeprefix('http://')} (nothing was sent)",
    )  # (where to: a mistyped base_url read the same as a venue down, an operator)
    assert took < 25, took  # (the six tries take 31 s at the defaults; a loaded machine's start is slower)


WRONG_KEYS = [
    (API_KEY, "a-wrong-secret-0123456789", "code -1022: Signature for this request is not valid."),
    ("a-wrong-key-0123456789", API_SECRET, "code -2015: Invalid API-key, IP, or permissions for action."),
]


@pytest.mark.parametrize(("key", "secret", "said"), WRONG_KEYS)
async def test_a_signal_added_with_a_key_the_venue_refuses_is_one_line_and_not_inserted(
    workdir: Path, pg_server: EmbeddedPostgres, key: str, secret: str, said: str
) -> None:
    """A signal is filed under the account of the API key that adds it. One added with a key the venue
    refuses (a typo in the environment) was filed under an account no engine runs, exit 0 (r71)."""
    migrated = await asyncio.to_thread(tsbot, "db", "migrate", cwd=workdir)
    assert migrated.code == 0, migrated
    emulator = BinanceEmulator(
        SimVenueSettings(seed=7, symbols=["SFPUSDT", "BTCUSDT"]), api_key=API_KEY, api_secret=API_SECRET
    )
    async with running(emulator) as url:
        result = await asyncio.to_thread(
            _on_binance, url, "signals", "add", "BTCUSDT", "long", cwd=workdir, key=key, secret=secret
        )
    _assert_one_line(result, 2, f"tsbot: venue binanceusdm refused the API key ({said}): check ")
    assert result.stderr.endswith("; nothing was inserted (a signal goes to the account of the key)\n")
    assert key not in result.stderr
    assert secret not in result.stderr
    name = (workdir / "config.toml").read_text().split('name = "')[1].split('"')[0]
    conn = await asyncpg.connect(pg_server.dsn(name))
    try:
        assert await conn.fetchval("SELECT count(*) FROM monitoring.signals") == 0
    finally:
        await conn.close()


@pytest.mark.parametrize(("key", "secret", "said"), WRONG_KEYS)
async def test_a_key_the_venue_refuses_stops_the_start_with_one_line(
    workdir: Path, pg_server: EmbeddedPostgres, key: str, secret: str, said: str
) -> None:
    emulator = BinanceEmulator(
        SimVenueSettings(seed=7, symbols=["SFPUSDT", "BTCUSDT"]), api_key=API_KEY, api_secret=API_SECRET
    )
    async with running(emulator) as url:
        result = await asyncio.to_thread(
            _on_binance, url, "run", "--duration", "30", cwd=workdir, key=key, secret=secret
        )
    _assert_one_line(result, 2, f"tsbot: venue binanceusdm refused the API key at start ({said})")
    assert key not in result.stderr
    assert secret not in result.stderr
    assert result.stdout == ""
    name = (workdir / "config.toml").read_text().split('name = "')[1].split('"')[0]
    conn = await asyncpg.connect(pg_server.dsn(name))
    try:  # nothing was traded
        assert await conn.fetchval("SELECT count(*) FROM monitoring.positions") == 0
    finally:
        await conn.close()


# --- files that reveal trading activity are private -----------------------------------------------------


def test_trading_bot_log_is_created_0600_in_a_0700_directory(workdir: Path) -> None:
    result = _subprocess(TSBOT, "db", "migrate", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE((workdir / "logs" / "trading_bot.log").stat().st_mode) == 0o600
    assert stat.S_IMODE((workdir / "logs").stat().st_mode) == 0o700


def test_sim_exchange_log_is_created_0600(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TSBOT_")}
    process = subprocess.Popen(
        [TSBOT, "sim-exchange", "--port", "0"],
        cwd=tmp_path,
        env={**base, "TSBOT_VENUE__API_KEY": API_KEY, "TSBOT_VENUE__API_SECRET": API_SECRET},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:  # the emulator says where it logs once it listens
            if line.startswith("logging to "):
                break
        assert stat.S_IMODE((tmp_path / "logs" / "sim_exchange.log").stat().st_mode) == 0o600
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)


# --- the dashboard's entry point --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "env", "starts"),
    [
        (("--nope",), {}, "tsbot-tui: unrecognized arguments: --nope"),
        ((), {"TSBOT_VENUE__TESTNET": "0"}, "TSBOT_VENUE__TESTNET: venue.testnet: must be true or false"),
        ((), {"TSBOT_LOGGING__FILE": "/"}, "tsbot-tui: logging.file: cannot write the log file /: "),
        ((), {"TSBOT_VENUE__KIND": "bybit"}, "tsbot-tui: venue.kind 'bybit' (testnet) needs API keys"),
    ],
)
def test_tsbot_tui_refuses_bad_input_before_the_screen_in_one_line(
    tmp_path: Path, argv: tuple[str, ...], env: dict[str, str], starts: str
) -> None:
    result = _subprocess(TSBOT_TUI, *argv, cwd=tmp_path, **env)
    _assert_one_line(result, 2, starts)


@pytest.mark.parametrize(
    ("stdin", "not_a_tty"),
    [("/dev/null", "stdin and stderr are"), ("a tty", "stderr is")],
)
def test_tsbot_tui_without_a_terminal_refuses_before_starting_anything(
    workdir: Path, stdin: str, not_a_tty: str
) -> None:
    """`tsbot-tui </dev/null 2>file` (cron, a service, a pipe) started the engine and traded, with nobody to
    see the screen or press a key, and wrote the screen's escape codes into the file. It now refuses in one
    line naming what is not a terminal (stdin, its keys; stderr, where Textual draws), before the engine
    starts: `tsbot run` is the headless way. (stdout, its exit line, may be a file.)"""
    controller, terminal = pty.openpty()
    try:
        with open(os.devnull, "rb") as devnull:
            result = subprocess.run(
                [TSBOT_TUI],
                cwd=workdir,
                env={k: v for k, v in os.environ.items() if not k.startswith("TSBOT_")},
                stdin=devnull if stdin == "/dev/null" else terminal,
                capture_output=True,
                text=True,
                timeout=30,
            )
    finally:
        os.close(controller)
        os.close(terminal)
    _assert_one_line(
        result,
        2,
        f"tsbot-tui: needs a terminal: {not_a_tty} not a tty; run the engine headless with `tsbot run`",
    )
    assert result.stdout == ""
    assert not (workdir / "logs").exists()  # nothing written, not even an empty log: it never ran


def test_config_show_of_a_file_with_an_undecodable_name(tmp_path: Path) -> None:
    name = os.fsdecode(b"conf\xff.toml")
    (tmp_path / name).write_text("[signals]\nwave_size = 9\n")
    result = tsbot("config", "show", "--config", name, cwd=tmp_path)  # stdout here is strict UTF-8
    assert result.problems() == []
    assert result.code == 0
    assert "# from: conf\\xff.toml\n" in result.stdout


def test_config_show_stays_toml(tmp_path: Path) -> None:
    result = tsbot("config", "show", cwd=tmp_path, TSBOT_TUI__KEYS__QUIT="ctrl+q")
    assert result.code == 0
    assert json.dumps("ctrl+q") in result.stdout


@pytest.mark.parametrize("kind", ["a file", "a directory of other things"])
def test_a_data_dir_that_is_not_one_is_one_line_and_left_untouched(tmp_path: Path, kind: str) -> None:
    """`database.data_dir` pointing at a file was reported as a bug of ours (NotADirectoryError); at a
    directory holding other things, the embedded server's set-up took it over (its owner changed when run as
    root) and failed with initdb's command line. Both are the operator's setting: one line naming it, and
    nothing in the place touched."""
    place = tmp_path / "place"
    if kind == "a file":
        place.write_text("mine\n")
        expected = f"tsbot: database.data_dir: {place} is not a directory"
    else:
        place.mkdir()
        (place / "important.txt").write_text("mine\n")
        expected = (
            f"tsbot: database.data_dir: {place} is neither empty nor a PostgreSQL data directory "
            "(no PG_VERSION in it); nothing in it was touched"
        )
    before = {p: (p.stat().st_uid, p.stat().st_mode) for p in [place, *place.rglob("*")]}
    _one_line(tsbot("db", "migrate", cwd=tmp_path, TSBOT_DATABASE__DATA_DIR=str(place)), 1, expected)
    # A look starts nothing: no server runs there, which it says.
    status = tsbot("status", cwd=tmp_path, TSBOT_DATABASE__DATA_DIR=str(place))
    assert status.problems() == [], status
    assert status.code == 3, status
    assert "no embedded PostgreSQL is running in" in status.stdout + status.stderr
    assert {p: (p.stat().st_uid, p.stat().st_mode) for p in [place, *place.rglob("*")]} == before

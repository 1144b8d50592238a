"""Fuzzing the engine's inputs as an SRE would (issue 14): configuration files and values, environment
overrides, command-line arguments, signal import files, and signal rows written behind the engine's back.

The contract, for every input: the exit code is 0, 1 or 2; a failure is exactly one line on stderr; no
traceback (nor the one line that stands for a bug); `config show` output is TOML; every signal row ends
`opened`, or `rejected` with a bounded reason, within 4 s of engine time. Each example carries one hostile
input, so "one line" is exact.

Bounded for `make test` (about 30 s on 2 cores, derandomized so CI is reproducible). For the full run:
`python bench/fuzz_hostile_input.py` (HOSTILE_FUZZ_SCALE multiplies every example count,
HOSTILE_FUZZ_REPORT names a JSON file that collects inputs tried / rejected / accepted / tracebacks, and
HOSTILE_FUZZ_RANDOM=1 draws new inputs instead of the fixed ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tomllib
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from engine import cli
from engine.clock import ManualClock
from engine.config import ConfigError, Settings, load_config
from engine.engine import Engine
from engine.venues.sim.universe import UNIVERSE
from storage.database import Database, DatabaseTarget, create_pool
from storage.embedded import EmbeddedPostgres
from storage.repositories import MAX_REASON_CHARS
from tests.conftest import TEMPLATE_DB
from tests.integration.engine_support import engine_settings, make_engine
from tests.support.cli_runner import CliResult, run_in_process
from tests.support.driving import drive, drive_until

SCALE = float(os.environ.get("HOSTILE_FUZZ_SCALE", "1"))
REPORT = os.environ.get("HOSTILE_FUZZ_REPORT")
RANDOM = os.environ.get("HOSTILE_FUZZ_RANDOM") == "1"  # new inputs each run (exploring); CI stays fixed


def examples(count: int) -> int:
    return max(1, int(count * SCALE))


def fuzz_settings(count: int) -> settings:
    return settings(
        max_examples=examples(count),
        deadline=None,
        derandomize=not RANDOM,
        database=None,
        print_blob=False,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


# --- tallies: what the report says per area ---------------------------------------------------------------


class Tally:
    """Inputs tried, rejected with a message, accepted, and contract breaks (tracebacks among them)."""

    def __init__(self, area: str):
        self.area = area
        self.counts: Counter[str] = Counter()
        self.broken: list[str] = []

    def record(self, accepted: bool, problems: list[str], what: str) -> None:
        self.counts["tried"] += 1
        if problems:
            self.counts["broken"] += 1
            self.counts["tracebacks"] += "traceback" in problems
            self.broken.append(f"{what}: {', '.join(problems)}")
        elif accepted:
            self.counts["accepted"] += 1
        else:
            self.counts["rejected"] += 1
        if problems and not REPORT:
            raise AssertionError(f"{self.area}: {what}: {', '.join(problems)}")

    def save(self) -> None:
        if not REPORT:
            return
        path = Path(REPORT)
        report = json.loads(path.read_text()) if path.exists() else {}
        entry = report.setdefault(self.area, {"counts": {}, "broken": []})
        for key, value in self.counts.items():
            entry["counts"][key] = entry["counts"].get(key, 0) + value
        entry["broken"] += self.broken[:20]
        path.write_text(json.dumps(report, indent=2))
        assert not self.broken, (
            f"{self.area}: {len(self.broken)} inputs broke the contract: {self.broken[:3]}"
        )


def _cli_problems(result: CliResult) -> list[str]:
    problems = result.problems()
    if result.code == 2 and not result.stderr_lines:
        problems.append("exit 2 without a line")
    return problems


# --- hostile values ---------------------------------------------------------------------------------------

# Text as it arrives from files and terminals: anything but NUL (which no environment, argument or
# PostgreSQL text can hold), lone surrogates included (undecodable bytes in argv and the environment).
any_text = st.text(st.characters(blacklist_characters="\x00"), max_size=40)
wild_numbers = st.sampled_from(
    [
        "0",
        "-0",
        "1e-7",
        "1e1000000",
        "1e-16384",
        "-1e400",
        "inf",
        "-inf",
        "nan",
        "NaN",
        "Infinity",
        "1_000",
        "0x10",
        "9" * 5000,
        "1." + "0" * 5000,
        "4294967296",
        "-1",
        "1e12",
        "0.1",
        " 5 ",
        "",
    ]
)
hostile_text = st.one_of(
    any_text,
    wild_numbers,
    st.sampled_from(
        ["true", "false", "TRUE", "0", "1", "yes", "[]", "{}", "[[[[", '{"a": 1}', "\udcff", "é"]
    ),
    st.builds(lambda n: "x" * n, st.sampled_from([65, 4097, 100_000])),
)


def _toml(value: Any) -> str:
    """`value` as TOML (strings JSON-escaped, which TOML accepts for basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


toml_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, -1, 10**30, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=8,
)
# Raw right-hand sides: not necessarily TOML at all.
raw_values = st.one_of(
    st.sampled_from(["1e-7", "inf", "nan", "0", "[", "[[1]", "1979-05-27T07:32:00Z", "'x'", '"""x"""']),
    st.builds(lambda n: "[" * n + "]" * n, st.sampled_from([10, 2000, 100_000])),
    st.builds(lambda n: "9" * n, st.sampled_from([19, 4301, 10_000])),
    st.text(st.characters(blacklist_characters="\n\r\x00"), max_size=30),
)


def _leaf_keys(model: type, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield (*prefix, name)  # the table itself is a key too
            yield from _leaf_keys(annotation, (*prefix, name))
        else:
            yield (*prefix, name)


KEYS = sorted(_leaf_keys(Settings))
SECRET_KEYS = {("venue", "api_key"), ("venue", "api_secret"), ("database", "password")}
key_paths = st.one_of(
    st.sampled_from(KEYS),
    st.builds(
        lambda path, extra: (*path, extra),
        st.sampled_from([k for k in KEYS if len(k) == 1]),
        st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=8),
    ),
)


# --- configuration files ----------------------------------------------------------------------------------

# File names as a shell passes them: any bytes but "/" and NUL, so undecodable ones arrive as surrogates.
file_names = st.one_of(
    st.just("fuzz.toml"),
    st.builds(
        lambda raw: os.fsdecode(raw) or "x",
        st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\x00" not in b),
    ).filter(lambda name: name not in (".", "..")),
)


@pytest.fixture(scope="module")
def config_tally() -> Iterator[Tally]:
    tally = Tally("config file")
    yield tally
    tally.save()


@fuzz_settings(300)
@given(
    path=key_paths,
    value=st.one_of(toml_values.map(_toml), raw_values),
    raw_file=st.one_of(st.none(), st.binary(max_size=200), st.sampled_from(["\ufeff[venue]\n", "[venue"])),
    file_name=file_names,
)
def test_fuzz_config_file(
    tmp_path: Path,
    config_tally: Tally,
    path: tuple[str, ...],
    value: str,
    raw_file: bytes | str | None,
    file_name: str,
) -> None:
    config = tmp_path / "configs" / file_name
    config.parent.mkdir(exist_ok=True)
    if config.is_dir():
        config = tmp_path / "fuzz.toml"
    if raw_file is None:
        *table, key = path
        header = f"[{'.'.join(table)}]\n" if table else ""
        config.write_text(f"{header}{json.dumps(key)} = {value}\n", encoding="utf-8", errors="surrogatepass")
    else:
        config.write_bytes(raw_file.encode("utf-8") if isinstance(raw_file, str) else raw_file)
    result = run_in_process(cli.main, ["config", "show", "--config", str(config)], cwd=tmp_path)
    problems = _cli_problems(result)
    if result.code == 0 and not problems:
        problems += _config_show_problems(result.stdout, tmp_path)
    what = f"{path} = {value[:80]!r}" if raw_file is None else f"file {raw_file[:80]!r}"
    config_tally.record(result.code == 0, problems, what)


def _config_show_problems(shown: str, tmp_path: Path) -> list[str]:
    """`config show` is TOML, and the engine can be built from what loaded (or says why not, in one line)."""
    try:
        tomllib.loads(shown)
    except tomllib.TOMLDecodeError as exc:
        return [f"config show is not TOML: {exc}"]
    again = tmp_path / "shown.toml"
    again.write_text(shown)
    try:
        loaded = load_config(again, environ={})
        Engine(loaded.settings)
    except ConfigError as exc:
        if len(exc.lines) != 1:
            return [f"{len(exc.lines)} lines for one value"]
    except Exception as exc:  # the contract is broken: report it as the traceback it would be
        return [f"traceback: {type(exc).__name__}: {exc}"[:200], "traceback"]
    return []


# --- environment overrides --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env_tally() -> Iterator[Tally]:
    tally = Tally("config env")
    yield tally
    tally.save()


def _in_an_environment(text: str) -> bool:
    """What a real environment can hold: bytes, so only the surrogates that stand for undecodable bytes."""
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


env_names = st.one_of(
    st.builds(lambda path: "TSBOT_" + "__".join(path).upper(), key_paths),
    st.builds(lambda path: "tsbot_" + "__".join(path), st.sampled_from(KEYS)),
    st.builds(
        lambda prefix, junk: prefix + junk,
        st.sampled_from(["TSBOT_", "TSBOT_VENUE__", "TSBOT_VENUE__SIM__", "TSBOT__", "TSBOT_VENUE____"]),
        st.text(st.characters(blacklist_characters="=\x00"), max_size=12),
    ),
).filter(_in_an_environment)
env_values = st.one_of(
    hostile_text,
    toml_values.map(lambda v: json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v),
).filter(_in_an_environment)


@fuzz_settings(300)
@given(name=env_names, value=env_values)
def test_fuzz_environment_override(tmp_path: Path, env_tally: Tally, name: str, value: str) -> None:
    result = run_in_process(cli.main, ["config", "show"], env={name: value}, cwd=tmp_path)
    problems = _cli_problems(result)
    if result.code == 0 and not problems:
        problems += _config_show_problems(result.stdout, tmp_path)
    env_tally.record(result.code == 0, problems, f"{name}={value[:80]!r}")


# --- command-line arguments -------------------------------------------------------------------------------


@pytest.fixture
def cli_workdir(tmp_path: Path, pg_server: EmbeddedPostgres) -> Path:
    name = f"fuzz_{uuid.uuid4().hex[:12]}"
    (tmp_path / "config.toml").write_text(f'[database]\ndata_dir = "{pg_server.data_dir}"\nname = "{name}"\n')
    (tmp_path / "good.jsonl").write_text('{"symbol": "SFPUSDT", "side": "long"}\n')
    return tmp_path


@pytest.fixture(scope="module")
def argv_tally() -> Iterator[Tally]:
    tally = Tally("cli arguments")
    yield tally
    tally.save()


COMMANDS = [
    ["config", "show"],
    ["db", "migrate"],
    ["status"],
    ["status", "--json"],
    ["signals", "add"],
    ["signals", "add", "SFPUSDT", "long"],
    ["signals", "import"],
    ["signals", "import", "good.jsonl"],
    ["run"],
    ["sim-exchange"],
    ["config"],
    ["signals"],
    [],
]
OPTIONS = [
    "--score",
    "--id",
    "--duration",
    "--port",
    "--seed",
    "--latency-ms",
    "--faults",
    "--json",
    "--config",
    "--control",
    "--version",
    "-h",
    "--",
    "-",
]
argument_tokens = st.one_of(st.sampled_from(OPTIONS), hostile_text, st.sampled_from(sorted(UNIVERSE)[:5]))
# `run` gets a database that is not there, so a valid `run` ends at once (exit 1) instead of trading.
UNREACHABLE_DATABASE = {"TSBOT_DATABASE__DSN": "postgresql://nobody@/nowhere?host=/nonexistent-socket-dir"}


@fuzz_settings(250)
@given(command=st.sampled_from(COMMANDS), tokens=st.lists(argument_tokens, max_size=5))
def test_fuzz_command_line(
    cli_workdir: Path, argv_tally: Tally, command: list[str], tokens: list[str]
) -> None:
    argv = [*command, *tokens]
    env = UNREACHABLE_DATABASE if "run" in argv else {}
    result = run_in_process(cli.main, argv, env=env, cwd=cli_workdir)
    argv_tally.record(result.code == 0, _cli_problems(result), f"tsbot {argv!r}"[:200])


# --- signal import files ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def import_tally() -> Iterator[Tally]:
    tally = Tally("signals import")
    yield tally
    tally.save()


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.builds(pow, st.just(10), st.sampled_from([200, 5000])),  # past 4 300 digits JSON cannot print
        st.floats(allow_nan=True, allow_infinity=True),
        any_text,
        st.sampled_from([*sorted(UNIVERSE)[:5], "long", "short", "Long ", "sfpusdt"]),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(any_text, inner, max_size=3)),
    max_leaves=6,
)
signal_objects = st.dictionaries(
    st.sampled_from(["symbol", "side", "score", "id", "size"]), json_values, min_size=1, max_size=4
)


def _json_line(item: Any, ascii_only: bool) -> str:
    try:
        return json.dumps(item, ensure_ascii=ascii_only)
    except ValueError:  # an int too long to print: write its digits
        return '{"symbol": "SFPUSDT", "side": "long", "score": ' + "9" * 5000 + "}"


@fuzz_settings(60)
@given(
    lines=st.lists(st.tuples(signal_objects, st.booleans()), min_size=1, max_size=4),
    encoding=st.sampled_from(["utf-8", "utf-8", "utf-16", "latin-1"]),
    raw=st.one_of(st.none(), st.binary(max_size=120), st.sampled_from([b"[" * 100_000, b"{}\n" * 3])),
    newline=st.sampled_from(["\n", "\r\n", "\u2028\n"]),
    file_name=file_names,
)
def test_fuzz_signals_import(
    cli_workdir: Path,
    import_tally: Tally,
    lines: list[tuple[dict[str, Any], bool]],
    encoding: str,
    raw: bytes | None,
    newline: str,
    file_name: str,
) -> None:
    path = cli_workdir / "imports" / file_name
    path.parent.mkdir(exist_ok=True)
    if raw is not None:
        path.write_bytes(raw)
    else:
        text = newline.join(_json_line(item, ascii_only) for item, ascii_only in lines) + "\n"
        path.write_bytes(text.encode(encoding, errors="surrogatepass" if encoding == "utf-8" else "replace"))
    result = run_in_process(cli.main, ["signals", "import", str(path)], cwd=cli_workdir)
    import_tally.record(result.code == 0, _cli_problems(result), f"{path.read_bytes()[:120]!r}")


# --- signal rows behind the engine's back -----------------------------------------------------------------


@pytest.fixture(scope="module")
def rows_tally() -> Iterator[Tally]:
    tally = Tally("signal rows")
    yield tally
    tally.save()


db_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)
row_symbols = st.one_of(
    st.sampled_from(sorted(UNIVERSE)),
    st.sampled_from(["sfpusdt", " SFPUSDT", "SFP/USDT", "", "BTCUSDT" * 5, "ＢＴＣＵＳＤＴ"]),
    db_text,
    st.builds(lambda n: "Z" * n, st.sampled_from([33, 100_000])),
)
row_sides = st.one_of(st.sampled_from(["long", "short", "LONG", " short ", "buy", ""]), db_text)
row_scores = st.one_of(
    st.none(),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e100", "1e-100", "0.5", "-3", "1e12", "1e-30"]),
    st.decimals(allow_nan=False, allow_infinity=False, places=None).map(str),
)
signal_rows = st.tuples(row_symbols, row_sides, row_scores, st.one_of(st.none(), db_text))


@fuzz_settings(3)
@given(rows=st.lists(signal_rows, min_size=20, max_size=40))
def test_fuzz_signal_rows_end_opened_or_rejected_with_a_reason(
    pg_server: EmbeddedPostgres, rows_tally: Tally, rows: list[tuple[str, str, str | None, str | None]]
) -> None:
    outcomes = asyncio.run(_run_rows(pg_server, rows))
    for (symbol, side, score, _), outcome in zip(rows, outcomes, strict=True):
        if outcome is None:  # PostgreSQL itself refused the row (bad numeric text, a duplicate id)
            continue
        status, reason = outcome
        problems = []
        if status not in ("opened", "rejected"):
            problems.append(f"stuck as {status!r}")
        elif status == "rejected" and not reason:
            problems.append("rejected without a reason")
        elif reason is not None and len(reason) > MAX_REASON_CHARS + 40:
            problems.append(f"a reason of {len(reason)} characters")
        rows_tally.record(status == "opened", problems, f"{symbol[:40]!r} {side[:20]!r} {score!r}")


async def _run_rows(
    pg_server: EmbeddedPostgres, rows: list[tuple[str, str, str | None, str | None]]
) -> list[tuple[str, str | None] | None]:
    """A fresh database and engine; the rows inserted as any process would; the engine given 4 s of its
    time to finish them. Returns (status, reason) per row, None where PostgreSQL refused the row itself (so
    it never existed)."""
    name = f"fuzz_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_server.dsn("postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"')
    finally:
        await admin.close()
    target = DatabaseTarget(dsn=pg_server.dsn(name), embedded=pg_server)
    pool = await create_pool(target, min_size=1, max_size=3)
    db = Database(pool=pool, target=target, migrations_applied=[])
    try:
        clock = ManualClock()
        engine = make_engine(engine_settings(target.dsn), clock)
        await drive(clock, engine.start())
        try:
            ids: list[int | None] = []
            for symbol, side, score, external_id in rows:
                try:
                    ids.append(
                        await pool.fetchval(
                            "INSERT INTO monitoring.signals (symbol, side, score, external_id) "
                            "VALUES ($1, $2, $3::text::numeric, $4) RETURNING id",
                            symbol,
                            side,
                            score,
                            external_id,
                        )
                    )
                except (asyncpg.DataError, asyncpg.UniqueViolationError):
                    ids.append(None)
            inserted = [i for i in ids if i is not None]

            async def finished() -> bool:
                return not await pool.fetchval(
                    "SELECT count(*) FROM monitoring.signals WHERE id = ANY($1::bigint[]) "
                    "AND status IN ('new', 'taken')",
                    inserted,
                )

            with contextlib.suppress(AssertionError):  # rows still pending are reported as stuck below
                await drive_until(clock, finished, limit=30.0, what="every row finished")  # (database writes)
            found = {
                r["id"]: (r["status"], r["reason"])
                for r in await pool.fetch(
                    "SELECT id, status, reason FROM monitoring.signals WHERE id = ANY($1::bigint[])", inserted
                )
            }
        finally:
            await drive(clock, engine.stop())
        return [found.get(i, ("missing", None)) if i is not None else None for i in ids]
    finally:
        await db.close()
        admin = await asyncpg.connect(pg_server.dsn("postgres"))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

"""Hostile configuration (issue 14): every bad file, value or variable is one line naming where it came
from, the key, what was expected and what was found; nonsense that used to load silently is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.config import ConfigError, load_config
from engine.config_show import render_config


def _write(path: Path, data: str | bytes, mode: int = 0o644) -> Path:
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _problems(tmp_path: Path, toml: str | bytes | None = None, **environ: str) -> list[str]:
    if toml is not None:
        _write(tmp_path / "config.toml", toml)
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ=environ, cwd=tmp_path)
    return caught.value.lines


# --- environment overrides --------------------------------------------------------------------------------


def test_a_list_key_from_the_environment_must_be_json(tmp_path: Path) -> None:
    assert _problems(tmp_path, TSBOT_VENUE__SIM__SYMBOLS="SFPUSDT,BTCUSDT") == [
        'TSBOT_VENUE__SIM__SYMBOLS: venue.sim.symbols: must be a JSON list like ["SFPUSDT", "BTCUSDT"], '
        'got "SFPUSDT,BTCUSDT"'
    ]
    loaded = load_config(None, environ={"TSBOT_VENUE__SIM__SYMBOLS": '["SFPUSDT", "BTCUSDT"]'}, cwd=tmp_path)
    assert loaded.settings.venue.sim.symbols == ["SFPUSDT", "BTCUSDT"]


def test_a_table_key_from_the_environment_must_be_json(tmp_path: Path) -> None:
    assert _problems(tmp_path, TSBOT_VENUE__SIM__VOLATILITY_BY_SYMBOL="SFPUSDT=2") == [
        "TSBOT_VENUE__SIM__VOLATILITY_BY_SYMBOL: venue.sim.volatility_by_symbol: must be a JSON object like "
        '{"SFPUSDT": 2.0}, got "SFPUSDT=2"'
    ]
    deep = "[" * 100_000 + "]" * 100_000
    [line] = _problems(tmp_path, TSBOT_VENUE__SIM__SYMBOLS=deep)
    assert line.startswith("TSBOT_VENUE__SIM__SYMBOLS: venue.sim.symbols: must be a JSON list")
    assert len(line) < 300


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "TSBOT_VENUE",
            "TSBOT_VENUE: a whole section cannot be set at once: use TSBOT_VENUE__<KEY>",
        ),
        (
            "TSBOT_VENUE__SIM",
            "TSBOT_VENUE__SIM: venue.sim: a whole table cannot be set at once: use TSBOT_VENUE__SIM__<KEY>",
        ),
    ],
)
def test_a_whole_section_or_table_cannot_be_set_from_the_environment(
    tmp_path: Path, name: str, message: str
) -> None:
    assert _problems(tmp_path, **{name: "x"}) == [message]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TSBOT_VENUE__SIM", '{"seed": 5}'),
        ("TSBOT_VENUE__SIM", "{}"),
        ("TSBOT_VENUE__SIM__LATENCY", '{"seconds": 3}'),
        ("TSBOT_PROTECTION__TRAILING", '{"mode": "managed"}'),
        ("TSBOT_TUI__KEYS", '{"quit": "ctrl+q"}'),
        ("TSBOT_VENUE__SIM__LATENCY__BY_CALL__CREATE_ORDER", '{"seconds": 3}'),  # an entry of a dict: a table
    ],
)
def test_a_table_cannot_be_set_from_one_variable_even_as_valid_json(
    tmp_path: Path, name: str, value: str
) -> None:
    """`TSBOT_VENUE__SIM='{"seed": 5}'` loaded, `TSBOT_VENUE='{...}'` did not: README says neither a section
    nor a table is set from one variable. JSON that parses is no exception."""
    key = ".".join(name.removeprefix("TSBOT_").lower().split("__"))
    assert _problems(tmp_path, **{name: value}) == [
        f"{name}: {key}: a whole table cannot be set at once: use {name}__<KEY>"
    ]


def test_dict_and_list_settings_still_take_json(tmp_path: Path) -> None:
    environ = {
        "TSBOT_VENUE__SIM__SYMBOLS": '["SFPUSDT", "BTCUSDT"]',
        "TSBOT_VENUE__SIM__VOLATILITY_BY_SYMBOL": '{"BTCUSDT": 2.5}',
        "TSBOT_VENUE__SIM__LATENCY__BY_CALL": '{"create_order": {"seconds": 3}}',
        "TSBOT_VENUE__SIM__FAULTS__BY_CALL__FETCH_ORDER__SERVER_ERROR": "0.1",
    }
    sim = load_config(None, environ=environ, cwd=tmp_path).settings.venue.sim
    assert sim.symbols == ["SFPUSDT", "BTCUSDT"]
    assert sim.volatility_by_symbol == {"BTCUSDT": 2.5}
    assert sim.latency.by_call["create_order"].seconds == 3
    assert sim.faults.by_call["fetch_order"].server_error == 0.1


# --- files that are not what they should be ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoded", "byte"),
    [
        ('[venue]\naccount = "main"\n'.encode("utf-16"), "0xff"),
        ('[venue]\n# café\naccount = "main"\n'.encode("latin-1"), "0xe9"),
    ],
)
def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path: Path, encoded: bytes, byte: str) -> None:
    [line] = _problems(tmp_path, encoded)
    assert line.startswith(f"config.toml: not UTF-8 text (byte {byte} at offset ")
    assert line.endswith("save it as UTF-8")


def test_a_config_file_nested_too_deeply_is_one_line(tmp_path: Path) -> None:
    assert _problems(tmp_path, "x = " + "[" * 50_000 + "]" * 50_000 + "\n") == [
        "config.toml: invalid TOML: arrays or tables nested too deeply"
    ]


def test_a_directory_given_as_config_is_named_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path, environ={})
    assert caught.value.lines == [f"{tmp_path}: is a directory: expected a TOML file like config.toml"]


def test_a_secrets_file_that_is_a_directory_is_one_line(tmp_path: Path) -> None:
    secrets = tmp_path / "keys"
    secrets.mkdir(mode=0o700)
    assert _problems(tmp_path, f'[venue]\napi_key_file = "{secrets}"\n') == [
        f"config.toml: venue.api_key_file: secrets file {secrets} must be a regular file, got a directory"
    ]


def test_a_secrets_file_that_is_not_utf8_is_one_line_and_not_echoed(tmp_path: Path) -> None:
    secret = _write(tmp_path / "db.pass", "pässwörd-SECRET".encode("latin-1"), mode=0o600)
    lines = _problems(tmp_path, f'[database]\npassword_file = "{secret}"\n')
    assert lines == [
        f"config.toml: database.password_file: secrets file {secret} must be UTF-8 text, got other bytes"
    ]


def test_a_secret_with_a_line_break_inside_is_refused_without_echoing_it(tmp_path: Path) -> None:
    secret = _write(tmp_path / "api.secret", "first-SECRET\nsecond-line\n", mode=0o600)
    [line] = _problems(tmp_path, f'[venue]\napi_secret_file = "{secret}"\n')
    assert "must not contain control characters" in line
    assert "SECRET" not in line
    [env_line] = _problems(tmp_path, "", TSBOT_VENUE__API_KEY="key-SECRET\r\nX-Injected: 1")
    assert env_line.startswith("TSBOT_VENUE__API_KEY: venue.api_key: must not contain control characters")
    assert "SECRET" not in env_line


# --- values that are nonsense -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[venue]\ntestnet = 0\n", "config.toml: venue.testnet: must be true or false, got 0"),
        ('[venue]\ntestnet = "false"\n', 'config.toml: venue.testnet: must be true or false, got "false"'),
        (
            "[protection]\ncall_timeout_seconds = 1e-7\n",
            "config.toml: protection.call_timeout_seconds: must be between 1 and 120, got 1E-7",
        ),
        (
            "[protection]\nretry_initial_seconds = 50\nretry_max_seconds = 10\n",
            "config.toml: protection.retry_initial_seconds: must not exceed protection.retry_max_seconds (10), "
            "got 50",
        ),
        (
            '[tui.keys]\nquit = "p"\n',
            "config.toml: tui.keys.quit: must differ from tui.keys.protect_uncovered (both press 'p'), "
            'got "p"',
        ),
        (
            "[health]\ncoverage_critical_percent = 0\n",
            "config.toml: health.coverage_critical_percent: must be between 50 and 100, got 0",
        ),
        ('[logging]\nfile = ""\n', "config.toml: logging.file: must have at least 1 character"),
        (
            '[database]\ndsn = "abc"\n',
            "config.toml: database.dsn: must be a URL starting with postgresql:// or postgres://, like "
            'postgresql://bot@db.internal/tsbot, got "abc"',
        ),
        (
            '[database]\ndsn = "mysql://bot@db/tsbot"\n',
            "config.toml: database.dsn: must be a URL starting with postgresql:// or postgres://",
        ),
        (
            '[database]\ndsn = "postgresql://bot@db:99999/tsbot"\n',
            "config.toml: database.dsn: must be a URL starting with postgresql:// or postgres://",
        ),
        (
            '[logging]\nfile = "logs/\\u0000.log"\n',
            "config.toml: logging.file: must not contain control characters",
        ),
        (
            "[database]\npool_min_size = 11\n",
            "config.toml: database.pool_min_size: must not exceed database.pool_max_size (10), got 11",
        ),
        (
            "[protection.trailing]\nmin_improvement_percent = 5\n",
            "config.toml: protection.trailing.min_improvement_percent: must not exceed "
            "protection.trailing.emergency_move_percent (1), got 5",
        ),
    ],
)
def test_nonsense_values_are_refused_with_one_line(tmp_path: Path, toml: str, message: str) -> None:
    lines = _problems(tmp_path, toml)
    assert len(lines) == 1
    assert lines[0].startswith(message)


def test_two_names_of_one_key_are_one_key(tmp_path: Path) -> None:
    assert _problems(tmp_path, '[tui.keys]\nonly_uncovered = "z,/"\n') == [
        "config.toml: tui.keys.only_uncovered: must differ from tui.keys.filter (both press 'slash'), "
        'got "z,/"'
    ]
    (tmp_path / "config.toml").unlink()
    loaded = load_config(None, environ={"TSBOT_TUI__KEYS__FILTER": "/"}, cwd=tmp_path)  # its own key
    assert loaded.settings.tui.keys.filter == "/"
    again = load_config(None, environ={"TSBOT_TUI__KEYS__QUIT": "q,ctrl+q,q"}, cwd=tmp_path)  # one action
    assert again.settings.tui.keys.quit == "q,ctrl+q,q"


KEY_EXPECTED = 'must be a key name like "q", "ctrl+q", "escape" or "f5"'


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("escpae", f'{KEY_EXPECTED}, got "escpae"'),
        ("ctrl+alt+shift+nonsense", f'{KEY_EXPECTED}, got "ctrl+alt+shift+nonsense"'),
        ("Escape", f'{KEY_EXPECTED}, got "Escape"'),
        ("control+q", f'{KEY_EXPECTED}, got "control+q"'),
        ("ctrl+ctrl+q", f'{KEY_EXPECTED}, got "ctrl+ctrl+q"'),
        ("ctrl+", f'{KEY_EXPECTED}, got "ctrl+"'),
        ("f99", f'{KEY_EXPECTED}, got "f99"'),
        (
            "q,escpae",
            'must be key names like "q", "ctrl+q", "escape" or "f5", separated by commas: "escpae" is not one, '
            'got "q,escpae"',
        ),
        (
            "q, ctrl+q",
            'must be key names like "q", "ctrl+q", "escape" or "f5", separated by commas: " ctrl+q" is not '
            'one, got "q, ctrl+q"',
        ),
    ],
)
def test_a_key_name_textual_does_not_know_is_refused(tmp_path: Path, value: str, message: str) -> None:
    """`quit = "escpae"` loaded (`tsbot config show` exit 0) and the dashboard started with `q` no longer
    quitting and no key that does: a name Textual never reports binds a key nobody can press. A key is
    modifiers joined by "+" to a character or a name Textual gives a key."""
    assert _problems(tmp_path, f'[tui.keys]\nquit = "{value}"\n') == [
        f"config.toml: tui.keys.quit: {message}"
    ]
    (tmp_path / "config.toml").unlink()
    assert _problems(tmp_path, TSBOT_TUI__KEYS__QUIT=value) == [
        f"TSBOT_TUI__KEYS__QUIT: tui.keys.quit: {message}"
    ]


@pytest.mark.parametrize(
    "value",
    [
        "ctrl+q",
        "escape",
        "f5",
        "shift+f24",
        "ctrl+alt+delete",
        "super+pageup",
        "Q",
        "!",
        "+",
        "exclamation_mark",
        "ctrl+right_square_bracket",
        "q,ctrl+q,escape",
    ],
)
def test_key_names_textual_knows_are_accepted(tmp_path: Path, value: str) -> None:
    loaded = load_config(None, environ={"TSBOT_TUI__KEYS__QUIT": value}, cwd=tmp_path)
    assert loaded.settings.tui.keys.quit == value


def test_a_character_and_its_name_are_one_key(tmp_path: Path) -> None:
    assert _problems(tmp_path, '[tui.keys]\nquit = "!"\nhelp = "exclamation_mark"\n') == [
        "config.toml: tui.keys.quit: must differ from tui.keys.help (both press 'exclamation_mark'), "
        'got "!"'
    ]


def test_an_unknown_theme_is_refused_at_load(tmp_path: Path) -> None:
    """`theme = "nrod"` loaded, and the dashboard came up in the default theme with a notice on the screen:
    the theme names are Textual's built-in ones, known without starting the dashboard."""
    [line] = _problems(tmp_path, '[tui]\ntheme = "nrod"\n')
    assert line.startswith("config.toml: tui.theme: must be one of ansi-dark, ansi-light, "), line
    assert line.endswith(', textual-dark, textual-light, tokyo-night, got "nrod"'), line
    (tmp_path / "config.toml").unlink()
    loaded = load_config(None, environ={"TSBOT_TUI__THEME": "nord"}, cwd=tmp_path)
    assert loaded.settings.tui.theme == "nord"


@pytest.mark.parametrize("value", ["0", "1", "no", "off", "False ", "yes", "False", "FALSE", "True", "TRUE"])
def test_testnet_from_the_environment_is_true_or_false_only(tmp_path: Path, value: str) -> None:
    """README: from the environment exactly `true`/`false`; `False` and `FALSE` were read as false."""
    [line] = _problems(tmp_path, TSBOT_VENUE__TESTNET=value)
    assert line == f"TSBOT_VENUE__TESTNET: venue.testnet: must be true or false, got {json.dumps(value)}"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TSBOT_VENUE__SIM__KEEP_BOOK", "False"),
        ("TSBOT_VENUE__SIM__KEEP_BOOK", "0"),
        ("TSBOT_VENUE__SIM__ACCOUNT_STREAM__ENABLED", "no"),
        ("TSBOT_METRICS__ENABLED", "TRUE"),
    ],
)
def test_every_boolean_from_the_environment_is_true_or_false_only(
    tmp_path: Path, name: str, value: str
) -> None:
    """The sim venue's booleans were pydantic's lax ones: `0`, `no`, `False` all meant false."""
    key = ".".join(name.removeprefix("TSBOT_").lower().split("__"))
    assert _problems(tmp_path, **{name: value}) == [
        f"{name}: {key}: must be true or false, got {json.dumps(value)}"
    ]


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[venue.sim]\nkeep_book = 0\n", "config.toml: venue.sim.keep_book: must be true or false, got 0"),
        (
            '[venue.sim.account_stream]\nenabled = "no"\n',
            'config.toml: venue.sim.account_stream.enabled: must be true or false, got "no"',
        ),
    ],
)
def test_every_boolean_in_the_file_is_true_or_false_only(tmp_path: Path, toml: str, message: str) -> None:
    assert _problems(tmp_path, toml) == [message]


@pytest.mark.parametrize(
    "toml",
    [
        '[Protection]\ngrace_seconds = " 3e0 "\n',
        '[Signals]\nmax_positions = "3"\n',
        "[Venue.sim]\nkeep_book = 0\n",
        '[VENUE.sim.account_stream]\nenabled = "no"\n',
    ],
)
def test_a_section_written_in_another_case_is_held_to_the_same_rules(tmp_path: Path, toml: str) -> None:
    """The loader reads `[Protection]` as `protection`; the checks for quoted numbers and loose booleans
    looked its fields up as written, found none, and pydantic's lax parsing took `" 3e0 "` and `0` (a
    reviewer)."""
    [problem] = _problems(tmp_path, toml)
    assert problem.startswith("config.toml: "), problem
    assert "must be a number" in problem or "must be true or false" in problem, problem


def test_a_bad_value_in_a_dict_names_its_key_as_written(tmp_path: Path) -> None:
    """`volatility_by_symbol = {BTCUSDT = "x"}` was reported as `volatility_by_symbol.btcusdt`: a key the
    file does not hold (symbols are upper case)."""
    assert _problems(tmp_path, '[venue.sim.volatility_by_symbol]\nBTCUSDT = "x"\n') == [
        'config.toml: venue.sim.volatility_by_symbol.BTCUSDT: must be a number, got "x" (a string: write the '
        "number without quotes)"
    ]
    assert _problems(tmp_path, '[venue.sim.latency.by_call.Create_Order]\nseconds = "1"\n') == [
        'config.toml: venue.sim.latency.by_call.Create_Order.seconds: must be a number, got "1" (a string: '
        "write the number without quotes)"
    ]


@pytest.mark.parametrize(("value", "expected"), [("false", False), ("true", True)])
def test_testnet_from_the_environment_accepts_the_words(tmp_path: Path, value: str, expected: bool) -> None:
    loaded = load_config(None, environ={"TSBOT_VENUE__TESTNET": value}, cwd=tmp_path)
    assert loaded.settings.venue.testnet is expected


def test_a_huge_value_is_quoted_short(tmp_path: Path) -> None:
    [line] = _problems(tmp_path, '[venue]\naccount = "' + "x" * 1_000_000 + '"\n')
    assert line.startswith('config.toml: venue.account: must have at most 64 characters, got "xxx')
    assert line.endswith("(1,000,000 characters)")
    assert len(line) < 200
    [number] = _problems(tmp_path, "[signals]\nseed = " + "9" * 4000 + "\n")
    assert number.startswith("config.toml: ")
    assert len(number) < 300


def test_several_errors_inside_one_value_share_its_line(tmp_path: Path) -> None:
    lines = _problems(
        tmp_path,
        "",
        TSBOT_VENUE__SIM__LATENCY__BY_CALL='{"create_order": {"seconds": 500}, "nope": {}}',
    )
    assert len(lines) == 1
    assert lines[0].startswith("TSBOT_VENUE__SIM__LATENCY__BY_CALL: venue.sim.latency.by_call")
    assert lines[0].endswith("(and 1 more in this value)")


def test_config_show_writes_characters_beyond_the_bmp_as_toml_escapes(tmp_path: Path) -> None:
    # json.dumps wrote "\ud83d\ude00", which TOML refuses (found by the fuzz).
    loaded = load_config(
        None,
        environ={"TSBOT_DATABASE__DATA_DIR": "/data/😀é", "TSBOT_LOGGING__FILE": 'a"b\\c.log'},
        cwd=tmp_path,
    )
    shown = render_config(loaded)
    assert '"/data/\\U0001f600\\u00e9"' in shown
    again = _write(tmp_path / "shown.toml", shown)
    assert load_config(again, environ={}).settings == loaded.settings


def test_an_activation_of_zero_is_refused() -> None:
    """At 0 the venue's trail arms at once from the mark while a managed trail starts from the fill: the
    two modes would exit on different ticks. An activation above the entry means one thing for both."""
    with pytest.raises(ConfigError) as refused:
        load_config(None, environ={"TSBOT_PROTECTION__ACTIVATION_PERCENT": "0"}, cwd=Path("/nonexistent"))
    [line] = refused.value.lines
    assert line.startswith("TSBOT_PROTECTION__ACTIVATION_PERCENT: protection.activation_percent:")

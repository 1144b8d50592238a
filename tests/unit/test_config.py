"""Configuration: defaults, file, environment, validation messages, secrets."""

from __future__ import annotations

import os
import re
import tomllib
from decimal import Decimal
from pathlib import Path

import pytest

from engine.config import (
    SECRETS,
    ConfigError,
    Settings,
    Source,
    default_settings,
    load_config,
)
from engine.config_show import render_config
from engine.logs import RedactingFormatter
from storage.database import redact_dsn


def _write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def _leaf_keys(model: type, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    keys: set[tuple[str, ...]] = set()
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            keys |= _leaf_keys(annotation, (*prefix, name))
        else:
            keys.add((*prefix, name))
    return keys


def test_shipped_config_toml_is_the_built_in_defaults(project_root: Path) -> None:
    loaded = load_config(project_root / "config.toml", environ={})
    defaults = default_settings()
    # (Its relative log path is read from the file's directory: the defaults', from the working one.)
    logging_there = defaults.logging.model_copy(update={"file": str(project_root / defaults.logging.file)})
    assert loaded.settings == defaults.model_copy(update={"logging": logging_there})


def test_relative_paths_in_a_config_file_are_read_from_its_directory(tmp_path: Path) -> None:
    """`tsbot run --config ../config.toml` from another directory wrote its log, and the protection journal
    beside it, under the working directory: the next start from the config's directory found no journal and
    cancelled a live stop the journal named, and a later one replayed a stale journal over newer records
    (r80). Paths set in a file are the file's; those from the environment, the working directory's."""
    config_dir, elsewhere = tmp_path / "conf", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (config_dir / "keys").mkdir(parents=True)
    secret = _write(config_dir / "keys" / "secret.txt", "s3cret", mode=0o600)
    config = _write(
        config_dir / "config.toml",
        '[logging]\nfile = "logs/bot.log"\n[database]\ndata_dir = "pg/data"\n'
        '[venue]\nkind = "binanceusdm"\napi_key_file = "keys/secret.txt"\napi_secret_file = "keys/secret.txt"\n',
    )
    loaded = load_config(config, environ={}, cwd=elsewhere)
    assert loaded.settings.logging.file == str(config_dir / "logs" / "bot.log")
    assert loaded.settings.database.data_dir == str(config_dir / "pg" / "data")
    assert loaded.settings.venue.api_key.get_secret_value() == "s3cret"  # (read from the file's keys/)
    assert secret.exists()
    from_env = load_config(
        config,
        environ={
            "TSBOT_LOGGING__FILE": "here.log",
            "TSBOT_VENUE__API_KEY_FILE": str(secret),
            "TSBOT_VENUE__API_SECRET_FILE": str(secret),
        },
        cwd=elsewhere,
    )
    assert from_env.settings.logging.file == str(elsewhere / "here.log")  # the working directory's
    home = load_config(config, environ={"TSBOT_DATABASE__DATA_DIR": "~/x"}, cwd=elsewhere)
    assert home.settings.database.data_dir == "~/x"


def test_shipped_config_toml_has_every_key_and_a_comment_above_each(project_root: Path) -> None:
    text = (project_root / "config.toml").read_text()
    expected = _leaf_keys(Settings) - set(SECRETS)  # secrets never live in the file
    found: set[tuple[str, ...]] = set()
    table: tuple[str, ...] = ()
    previous = ""
    for line in text.splitlines():
        stripped = line.strip()
        if header := re.fullmatch(r"\[([a-z_.]+)\]", stripped):
            table = tuple(header.group(1).split("."))
        elif key := re.match(r"^([a-z0-9_]+)\s*=", stripped):
            found.add((*table, key.group(1)))
            assert previous.startswith("#"), f"{'.'.join((*table, key.group(1)))} has no comment above it"
        if stripped:
            previous = stripped
    assert found == expected


def test_without_a_file_the_built_in_defaults_apply(tmp_path: Path) -> None:
    loaded = load_config(None, environ={}, cwd=tmp_path)
    assert loaded.path is None
    assert loaded.settings.protection.callback_percent == Decimal("0.5")
    assert loaded.source_of(("protection", "callback_percent")) is Source.DEFAULT


def test_dot_config_toml_in_the_working_directory_is_found(tmp_path: Path) -> None:
    _write(tmp_path / "config.toml", "[protection]\ncallback_percent = 0.7\n")
    loaded = load_config(None, environ={}, cwd=tmp_path)
    assert loaded.path == tmp_path / "config.toml"
    assert loaded.settings.protection.callback_percent == Decimal("0.7")


def test_bad_value_names_file_key_expectation_and_value(tmp_path: Path) -> None:
    _write(tmp_path / "config.toml", "[protection]\ncallback_percent = 0\n")
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ={}, cwd=tmp_path)
    assert caught.value.lines == [
        "config.toml: protection.callback_percent: must be between 0.1 and 10, got 0"
    ]


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[protection]\ncalback_percent = 0.5\n", "protection.calback_percent: unknown key (a typo?)"),
        ("[protections]\nx = 1\n", "protections: unknown key (a typo?): expected one of venue, database"),
        (
            '[venue]\nkind = "binance"\n',
            'venue.kind: must be one of "sim", "binanceusdm" or "bybit", got "binance"',
        ),
        (
            '[signals]\nposition_size_usd = "lots"\n',
            'signals.position_size_usd: must be a number, got "lots"',
        ),
        ("[signals]\nmax_positions = 2.5\n", "signals.max_positions: must be a whole number, got 2.5"),
        (
            '[database]\ndsn = "postgresql://bot@127.0.0.1:99999/db"\n',
            "like postgresql://bot@db.internal/tsbot; its port must be a number up to 65535",
        ),
        (
            '[database]\ndsn = "postgresql://bot@[::1/db"\n',
            "like postgresql://bot@db.internal/tsbot; its host is not one (an IPv6 address goes in [brackets])",
        ),
        (
            "[signals]\nposition_size_usd = 0\n",
            "signals.position_size_usd: must be > 0 and <= 1000000, got 0",
        ),
        ('[protection.trailing]\nmode = "smart"\n', "protection.trailing.mode: must be one of"),
        (
            '[venue]\nkind = "bybit"\n[protection.trailing]\nmode = "managed"\n',
            'protection.trailing.mode: must be "native" or "auto" with venue.kind "bybit" (a Bybit position has '
            'one stop-loss, which the hard stop holds; its trailing stop is native), got "managed"',
        ),
        (
            "[health]\nuncovered_critical_seconds = 1\n",
            "health.uncovered_critical_seconds: must be more than protection.grace_seconds (5): a position is "
            "uncovered for up to that long after its fill by design, got 1",
        ),
        (
            '[protection]\nstop_loss_percent = "３"\n',
            'protection.stop_loss_percent: must be a number, got "\\uff13" (a string: write the number without '
            "quotes)",
        ),
        ('[signals]\nwave_size = "7"\n', 'signals.wave_size: must be a number, got "7" (a string'),
        (
            '[venue.sim]\nvolatility_by_symbol = {SFPUSDT = "1e0"}\n',
            'venue.sim.volatility_by_symbol.SFPUSDT: must be a number, got "1e0" (a string',
        ),
        (
            '[venue.sim.latency.by_call.create_order]\nseconds = "0.5"\n',
            'venue.sim.latency.by_call.create_order.seconds: must be a number, got "0.5" (a string',
        ),
        (
            '[protection]\nstop_loss_percent = "3e0"\n',
            'protection.stop_loss_percent: must be a number, got "3e0"',
        ),
        (
            '[logging]\nlevel = "verbose"\n',
            'logging.level: must be one of "DEBUG", "INFO", "WARNING" or "ERROR"',
        ),
        (
            "[protection]\nclose_on_would_trigger = 3\n",
            "protection.close_on_would_trigger: must be true or false",
        ),
    ],
)
def test_every_invalid_value_gives_one_precise_line(tmp_path: Path, toml: str, message: str) -> None:
    path = _write(tmp_path / "custom.toml", toml)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert len(caught.value.lines) == 1
    assert caught.value.lines[0].startswith(f"{path}: ")
    assert message in caught.value.lines[0]


def test_invalid_toml_is_one_line(tmp_path: Path) -> None:
    _write(tmp_path / "config.toml", "[protection\ncallback_percent = 0.5\n")
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ={}, cwd=tmp_path)
    assert len(caught.value.lines) == 1
    assert caught.value.lines[0].startswith("config.toml: invalid TOML:")


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nowhere\.toml: config file not found"):
        load_config(tmp_path / "nowhere.toml", environ={})


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_an_explicit_config_that_is_not_a_regular_file_is_said_so(tmp_path: Path, kind: str) -> None:
    """`--config /dev/null` and `--config <fifo>` said "config file not found" of files that exist (an
    operator)."""
    if kind == "device":
        path = Path("/dev/null")
    else:
        path = tmp_path / "pipe.toml"
        os.mkfifo(path)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.lines == [f"{path}: not a regular file: expected a TOML file like config.toml"]


def test_environment_overrides_file_and_sources_are_tracked(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.toml", "[protection]\ncallback_percent = 0.7\nstop_loss_percent = 2\n")
    loaded = load_config(
        path,
        environ={"TSBOT_PROTECTION__CALLBACK_PERCENT": "0.9", "TSBOT_PROTECTION__TRAILING__MODE": "managed"},
    )
    assert loaded.settings.protection.callback_percent == Decimal("0.9")
    assert loaded.settings.protection.stop_loss_percent == Decimal("2")
    assert loaded.settings.protection.trailing.mode == "managed"
    assert loaded.source_of(("protection", "callback_percent")) is Source.ENV
    assert loaded.source_of(("protection", "trailing", "mode")) is Source.ENV
    assert loaded.source_of(("protection", "stop_loss_percent")) is Source.FILE
    assert loaded.source_of(("protection", "grace_seconds")) is Source.DEFAULT


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ={"TSBOT_PROTECTION__CALLBACK_PERCENT": "20"}, cwd=tmp_path)
    assert caught.value.lines == [
        'TSBOT_PROTECTION__CALLBACK_PERCENT: protection.callback_percent: must be between 0.1 and 10, got "20"'
    ]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("TSBOT_PROTECTOIN__CALLBACK_PERCENT", "unknown configuration section 'protectoin'"),
        ("TSBOT_PROTECTION__CALBACK_PERCENT", "protection.calback_percent: unknown key"),
        ("TSBOT_PROTECTION", "a whole section cannot be set at once"),
    ],
)
def test_typos_in_environment_names_are_errors(tmp_path: Path, name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, environ={name: "1"}, cwd=tmp_path)


def test_secrets_in_the_config_file_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.toml", '[venue]\napi_key = "AKIA-very-secret"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    line = caught.value.lines[0]
    assert "venue.api_key: secrets are not read from the config file" in line
    assert "TSBOT_VENUE__API_KEY" in line
    assert "AKIA-very-secret" not in str(caught.value)


def test_bad_secret_from_environment_is_not_echoed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(
            None, environ={"TSBOT_DATABASE__PASSWORD": "hunter2", "TSBOT_DATABASE__POOL_MIN_SIZE": "0"}
        )
    assert "hunter2" not in str(caught.value)


def test_secret_from_environment_is_redacted_in_config_show(tmp_path: Path) -> None:
    loaded = load_config(
        None,
        environ={"TSBOT_VENUE__API_KEY": "key-123456", "TSBOT_VENUE__API_SECRET": "sec-abcdef"},
        cwd=tmp_path,
    )
    assert loaded.settings.venue.api_key.get_secret_value() == "key-123456"
    shown = render_config(loaded)
    assert "key-123456" not in shown
    assert "sec-abcdef" not in shown
    assert re.search(r'^api_key = "<redacted>"\s+# env TSBOT_VENUE__API_KEY$', shown, re.M)
    assert re.search(r"^# password = \(not set\)\s+# default$", shown, re.M)
    assert sorted(loaded.secret_values()) == ["key-123456", "sec-abcdef"]


def test_secret_file_must_be_readable_by_its_owner_only(tmp_path: Path) -> None:
    secret = _write(tmp_path / "db.pass", "s3cr3t-pw\n", mode=0o644)
    config = _write(tmp_path / "c.toml", f'[database]\npassword_file = "{secret}"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ={})
    assert caught.value.lines == [
        f"{config}: database.password_file: secrets file {secret} must be readable by its owner only "
        "(chmod 600), got mode 0644"
    ]

    secret.chmod(0o600)
    loaded = load_config(config, environ={})
    assert loaded.settings.database.password.get_secret_value() == "s3cr3t-pw"
    assert loaded.source_of(("database", "password")) is Source.SECRET_FILE
    assert "s3cr3t-pw" not in render_config(loaded)


@pytest.mark.parametrize("problem", ["readable by others", "missing", "owned by someone else"])
@pytest.mark.parametrize("file_key", sorted(SECRETS.values()), ids=".".join)
@pytest.mark.parametrize("with_config_file", [True, False])
def test_a_secrets_file_named_in_the_environment_is_blamed_on_its_variable(
    tmp_path: Path, file_key: tuple[str, ...], problem: str, with_config_file: bool
) -> None:
    """`TSBOT_VENUE__API_KEY_FILE=key644 tsbot config show` said `config.toml: venue.api_key_file: secrets
    file key644 …` (`defaults: …` without a config file): the operator looked in a file that does not name
    it. Like every other value from the environment, the line names the variable that set it."""
    if with_config_file:
        _write(tmp_path / "config.toml", "[signals]\nwave_size = 9\n")
    secret = _write(tmp_path / "secret.txt", "s3cr3t-value\n", mode=0o644)
    if problem == "readable by others":
        said = "must be readable by its owner only (chmod 600), got mode 0644"
    elif problem == "missing":
        secret.unlink()
        said = "cannot read secrets file"
    else:
        if os.getuid() != 0:
            pytest.skip("only root can give a file to another user")
        secret.chmod(0o600)
        os.chown(secret, 65534, -1)
        said = "must be owned by uid 0, got uid 65534"
    variable = "TSBOT_" + "__".join(file_key).upper()
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ={variable: str(secret)}, cwd=tmp_path)
    [line] = caught.value.lines
    assert line.startswith(f"{variable}: {'.'.join(file_key)}: "), line
    assert said in line
    assert str(secret) in line
    assert "s3cr3t-value" not in line


DSN_PASSWORD_REFUSED = (
    "database.dsn: must not hold the database password: set TSBOT_DATABASE__PASSWORD in the environment or "
    "database.password_file to a file only you can read, got a DSN with a password in it"
)


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u:hunter2@localhost/db",
        "postgresql://:hunter2@localhost/db",
        "postgres://u:hunter2@localhost:5432/db?sslmode=require",
        "postgresql://u@localhost/db?sslmode=require&password=hunter2",
        "postgresql://u:hun/ter2@localhost/db",  # a `/` in it: urllib finds no password, the file holds one
    ],
)
def test_a_password_in_the_dsn_is_refused_naming_where_it_goes(tmp_path: Path, dsn: str) -> None:
    """`dsn = "postgresql://u:hunter2@…"` in config.toml was accepted and used (masked in `config show`),
    TSBOT_DATABASE__PASSWORD beside it too: a secret in the config file, and two passwords for one
    connection. The password comes from TSBOT_DATABASE__PASSWORD or database.password_file only; a DSN
    from TSBOT_DATABASE__DSN is held to the same rule. The DSN is never quoted back."""
    config = _write(tmp_path / "dsn.toml", f'[database]\ndsn = "{dsn}"\n')
    for environ in ({}, {"TSBOT_DATABASE__PASSWORD": "other-pw"}):
        with pytest.raises(ConfigError) as caught:
            load_config(config, environ=environ)
        assert caught.value.lines == [f"{config}: {DSN_PASSWORD_REFUSED}"]
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ={"TSBOT_DATABASE__DSN": dsn}, cwd=tmp_path)
    assert caught.value.lines == [f"TSBOT_DATABASE__DSN: {DSN_PASSWORD_REFUSED}"]
    assert "ter2" not in str(caught.value)


def test_a_dsn_without_a_password_loads_with_the_password_from_the_environment(tmp_path: Path) -> None:
    config = _write(
        tmp_path / "dsn.toml", '[database]\ndsn = "postgresql://bot@db.internal/tsbot?sslmode=require"\n'
    )
    loaded = load_config(config, environ={"TSBOT_DATABASE__PASSWORD": "pa55word"})
    assert loaded.settings.database.dsn == "postgresql://bot@db.internal/tsbot?sslmode=require"
    assert loaded.settings.database.password.get_secret_value() == "pa55word"
    assert "pa55word" not in render_config(loaded)


def test_a_client_keys_passphrase_comes_in_a_dsn_from_the_environment_not_from_the_file(
    tmp_path: Path,
) -> None:
    """`sslpassword` (the passphrase of the client's TLS key) has no setting of its own: refused everywhere
    as "the database password", an mTLS setup had no way to give it (a reviewer). From the environment it is
    taken, and masked; the file may not hold it, a secret."""
    dsn = "postgresql://bot@db.internal/tsbot?sslmode=verify-full&sslkey=/k/client.key&sslpassword=keyphrase"
    loaded = load_config(
        None, environ={"TSBOT_DATABASE__DSN": dsn, "TSBOT_DATABASE__PASSWORD": "pw"}, cwd=tmp_path
    )
    assert loaded.settings.database.dsn == dsn
    assert "keyphrase" not in render_config(loaded)
    config = _write(tmp_path / "dsn.toml", f'[database]\ndsn = "{dsn}"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ={})
    assert caught.value.lines == [
        f"{config}: database.dsn: must not hold sslpassword (a secret) in the file: set the DSN in "
        "TSBOT_DATABASE__DSN in the environment instead"
    ]
    assert "keyphrase" not in str(caught.value)
    # Its name escaped (`ssl%70assword`, which the driver reads as `sslpassword`) it was shown whole.
    escaped = "postgresql://bot@db.internal/tsbot?ssl%70assword=keyphrase2"
    loaded = load_config(
        None, environ={"TSBOT_DATABASE__DSN": escaped, "TSBOT_DATABASE__PASSWORD": "pw"}, cwd=tmp_path
    )
    assert "keyphrase2" not in render_config(loaded)


def test_config_show_is_toml_that_loads_back_to_the_same_settings(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.toml", '[protection]\ncallback_percent = 0.75\n[tui.keys]\nquit = "ctrl+q"\n')
    loaded = load_config(path, environ={"TSBOT_SIGNALS__WAVE_SIZE": "9"})
    shown = render_config(loaded)
    assert tomllib.loads(shown)  # parses
    again = load_config(_write(tmp_path / "shown.toml", shown), environ={})
    assert again.settings == loaded.settings


def test_process_environment_is_used_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSBOT_HEALTH__INTERVAL_SECONDS", "7")
    monkeypatch.chdir(tmp_path)
    assert load_config().settings.health.interval_seconds == Decimal("7")
    assert "TSBOT_HEALTH__INTERVAL_SECONDS" in os.environ


def test_sim_venue_settings_are_nested_under_venue_and_overridable(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "c.toml",
        '[venue.sim.latency]\ndistribution = "uniform"\nseconds = 2.0\njitter_seconds = 0.4\n'
        "by_call = { fetch_order = { seconds = 0.1 } }\n",
    )
    loaded = load_config(path, environ={"TSBOT_VENUE__SIM__FAULTS__TIMEOUT_AFTER_ACCEPT": "0.25"})
    sim = loaded.settings.venue.sim
    assert (sim.latency.distribution, sim.latency.seconds, sim.latency.jitter_seconds) == (
        "uniform",
        2.0,
        0.4,
    )
    assert sim.latency.by_call["fetch_order"].seconds == 0.1
    assert sim.faults.timeout_after_accept == 0.25
    assert loaded.source_of(("venue", "sim", "faults", "timeout_after_accept")) is Source.ENV
    again = load_config(_write(tmp_path / "shown.toml", render_config(loaded)), environ={})
    assert again.settings == loaded.settings

    bad = _write(tmp_path / "bad.toml", '[venue.sim]\nsymbols = ["NOPEUSDT"]\n')
    with pytest.raises(ConfigError) as caught:
        load_config(bad, environ={})
    assert caught.value.lines == [f"{bad}: venue.sim.symbols: not in the sim universe: NOPEUSDT, got a list"]


@pytest.mark.parametrize(
    ("environ", "toml"),
    [
        ({"TSBOT_VENUE__API_SECRETS": "SECRETXYZ123"}, ""),
        ({"TSBOT_DATABASE__PASSWROD": "SECRETXYZ123"}, ""),
        ({"TSBOT_ALERTS__URL": "tgram://SECRETXYZ123/-100"}, ""),
        ({}, '[venue]\napi_secrets = "SECRETXYZ123"\n'),
    ],
)
def test_an_unknown_key_is_named_without_its_value(
    tmp_path: Path, environ: dict[str, str], toml: str
) -> None:
    """A misspelt secret's name is an unknown key: its value, the secret, was shown back in full
    ("got "SECRETXYZ123"") on the terminal. The key is named, its value never shown."""
    config = _write(tmp_path / "c.toml", toml)
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ=environ)
    assert len(caught.value.lines) == 1
    assert "unknown key (a typo?)" in caught.value.lines[0]
    assert "SECRETXYZ123" not in str(caught.value)


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://:SECRETXYZ123@127.0.0.1:1/db", "postgresql://:***@127.0.0.1:1/db"),
        ("postgresql://u:SEC@RETXYZ123@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:Zm9v+SECRETXYZ123/Ly8=@h/db", "postgresql://u:***@h/db"),
        ("postgresql://bot:SECRETXYZ123@db.internal/tsbot", "postgresql://bot:***@db.internal/tsbot"),
        (
            "postgresql://bot@db.internal/tsbot?password=SECRETXYZ123",
            "postgresql://bot@db.internal/tsbot?password=***",
        ),
    ],
)
def test_a_dsn_password_is_masked_whatever_the_user_part(tmp_path: Path, dsn: str, shown: str) -> None:
    """`postgresql://:secret@host/db` (no user name) showed its password in `config show`, `tsbot status`
    and every error naming the database; an unescaped `@` inside the password showed the rest of it."""
    assert redact_dsn(dsn) == shown
    assert "SECRETXYZ123" not in RedactingFormatter([]).redact(f"cannot connect to {dsn}: refused")
    # A password in a DSN is refused at load (it goes in TSBOT_DATABASE__PASSWORD): unquoted there too.
    with pytest.raises(ConfigError) as refused:
        load_config(None, environ={"TSBOT_DATABASE__DSN": dsn}, cwd=tmp_path)
    assert refused.value.lines == [f"TSBOT_DATABASE__DSN: {DSN_PASSWORD_REFUSED}"]


@pytest.mark.parametrize("file_named_in", ["file", "env"])
def test_a_secret_set_by_its_variable_and_by_a_file_is_refused(tmp_path: Path, file_named_in: str) -> None:
    """`TSBOT_VENUE__API_KEY` and `venue.api_key_file` both set: the variable won without a word, so which
    key a run traded with was a guess. One line names both; an empty file variable clears the file's."""
    secret = _write(tmp_path / "key.txt", "from-the-file\n", mode=0o600)
    toml = f'[venue]\napi_key_file = "{secret}"\n' if file_named_in == "file" else ""
    config = _write(tmp_path / "c.toml", toml)
    environ = {"TSBOT_VENUE__API_KEY": "from-the-variable"}
    if file_named_in == "env":
        environ["TSBOT_VENUE__API_KEY_FILE"] = str(secret)
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ=environ)
    named_by = str(config) if file_named_in == "file" else "TSBOT_VENUE__API_KEY_FILE"
    assert caught.value.lines == [
        f"{named_by}: venue.api_key_file: TSBOT_VENUE__API_KEY sets the same secret; set one of them "
        "(`TSBOT_VENUE__API_KEY_FILE=` clears the file)"
    ]
    assert "from-the" not in str(caught.value)
    cleared = load_config(config, environ={**environ, "TSBOT_VENUE__API_KEY_FILE": ""})
    assert cleared.settings.venue.api_key.get_secret_value() == "from-the-variable"


def test_a_config_file_saved_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    """Windows editors save UTF-8 with a byte-order mark; tomllib took it for a statement ("invalid TOML:
    Invalid statement (at line 1, column 1)"), which named nothing the operator could see."""
    path = tmp_path / "c.toml"
    path.write_bytes(b"\xef\xbb\xbf[signals]\nwave_size = 9\n")
    assert load_config(path, environ={}).settings.signals.wave_size == 9

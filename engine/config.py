"""Configuration: `config.toml` + `TSBOT_<SECTION>__<KEY>` environment overrides, validated at load.

Where the file comes from: `--config PATH`, else `./config.toml`, else the built-in defaults (the model
defaults below are the packaged default; a test keeps them equal to the shipped `config.toml`).

Every invalid value ends the program with one line per problem naming where the value came from, the key
path, what was expected and what was found (`ConfigError`, exit code 2 in the CLI). Unknown keys are errors.

Secrets (exchange API key/secret, database password) are never read from the config file: only from the
environment or from a file named by a `*_file` key that only its owner can read.
"""

from __future__ import annotations

import json
import os
import stat
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from engine.venues.sim.settings import SimVenueSettings

ENV_PREFIX = "TSBOT_"
ENV_NESTED_DELIMITER = "__"
DEFAULT_CONFIG_NAME = "config.toml"

Percent = Annotated[Decimal, Field(allow_inf_nan=False)]


class ConfigError(Exception):
    """A configuration problem the operator caused; `str()` is one line per problem."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# --- [venue] ---------------------------------------------------------------------------------------------


class VenueKind(StrEnum):
    SIM = "sim"
    BINANCEUSDM = "binanceusdm"
    BYBIT = "bybit"


class VenueSettings(Section):
    kind: VenueKind = VenueKind.SIM
    account: str = Field(default="default", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    testnet: bool = True
    base_url: str = ""
    api_key_file: str = ""
    api_secret_file: str = ""
    api_key: SecretStr | None = None
    api_secret: SecretStr | None = None
    sim: SimVenueSettings = Field(default_factory=SimVenueSettings)


def real_venue_problems(venue: VenueSettings) -> list[str]:
    """Why a real (ccxt) venue must not start with these settings: one line per problem, [] when fine.

    Keys come from the environment (or owner-only files) only. Mainnet needs `testnet = false` *and* keys;
    without a `base_url` override, `testnet = true` trades the venue's testnet / demo environment.
    """
    if venue.kind is VenueKind.SIM:
        return []
    problems = []
    missing = [
        name
        for name, secret in (
            ("TSBOT_VENUE__API_KEY", venue.api_key),
            ("TSBOT_VENUE__API_SECRET", venue.api_secret),
        )
        if secret is None or not secret.get_secret_value()
    ]
    if missing:
        where = "mainnet" if not venue.testnet else "testnet"
        problems.append(
            f"venue.kind {venue.kind.value!r} ({where}) needs API keys: set {' and '.join(missing)} "
            "(or venue.api_key_file / venue.api_secret_file)"
        )
    if venue.base_url and not venue.base_url.startswith(("http://", "https://")):
        problems.append(
            f"venue.base_url: must start with http:// or https://, got {json.dumps(venue.base_url)}"
        )
    return problems


# --- [database] ------------------------------------------------------------------------------------------


class DatabaseSettings(Section):
    dsn: str = ""
    data_dir: str = ""
    name: str = Field(default="tsbot", min_length=1, max_length=63, pattern=r"^[a-z_][a-z0-9_]*$")
    pool_min_size: int = Field(default=1, ge=1, le=100)
    pool_max_size: int = Field(default=10, ge=1, le=100)
    command_timeout_seconds: Decimal = Field(default=Decimal(10), ge=1, le=300)
    probe_timeout_seconds: Decimal = Field(default=Decimal(3), ge=Decimal("0.2"), le=60)
    password_file: str = ""
    password: SecretStr | None = None


# --- [signals] -------------------------------------------------------------------------------------------


class SignalSource(StrEnum):
    SIM = "sim"
    POSTGRES = "postgres"


class SignalsSettings(Section):
    source: SignalSource = SignalSource.SIM
    wave_size: int = Field(default=7, ge=1, le=500)
    wave_interval_seconds: Decimal = Field(default=Decimal(20), ge=1, le=86400)
    seed: int = Field(default=7, ge=0)
    wave_window_ms: int = Field(default=500, ge=0, le=60000)
    position_size_usd: Decimal = Field(default=Decimal(200), gt=0, le=1_000_000)
    max_positions: int = Field(default=100, ge=1, le=5000)
    max_concurrent_entries: int = Field(default=50, ge=1, le=500)


# --- [protection] ----------------------------------------------------------------------------------------


class TrailingMode(StrEnum):
    AUTO = "auto"
    NATIVE = "native"
    MANAGED = "managed"


class TrailingSettings(Section):
    mode: TrailingMode = TrailingMode.AUTO
    min_move_interval_seconds: Decimal = Field(default=Decimal(1), ge=0, le=3600)
    min_improvement_percent: Percent = Field(default=Decimal("0.1"), ge=0, le=10)
    emergency_move_percent: Percent = Field(default=Decimal(1), gt=0, le=50)


class BreakerSettings(Section):
    uncovered_factor: Decimal = Field(default=Decimal(3), ge=1, le=1000)
    error_rate: Decimal = Field(default=Decimal("0.5"), gt=0, le=1)
    error_window_seconds: Decimal = Field(default=Decimal(60), ge=5, le=3600)
    min_attempts: int = Field(default=6, ge=1, le=100_000)
    auto_resume_seconds: Decimal = Field(default=Decimal(0), ge=0, le=86400)


class ProtectionSettings(Section):
    stop_loss_percent: Percent = Field(default=Decimal(3), ge=Decimal("0.1"), le=50)
    activation_percent: Percent = Field(default=Decimal("1.5"), ge=0, le=100)
    callback_percent: Percent = Field(default=Decimal("0.5"), ge=Decimal("0.1"), le=10)
    call_timeout_seconds: Decimal = Field(default=Decimal(10), gt=0, le=120)
    grace_seconds: Decimal = Field(default=Decimal(5), ge=0, le=600)
    reconcile_seconds: Decimal = Field(default=Decimal(10), ge=1, le=3600)
    retry_initial_seconds: Decimal = Field(default=Decimal(1), gt=0, le=60)
    retry_max_seconds: Decimal = Field(default=Decimal(30), gt=0, le=600)
    close_on_would_trigger: bool = True
    trailing: TrailingSettings = Field(default_factory=TrailingSettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)


# --- [health] --------------------------------------------------------------------------------------------


class HealthSettings(Section):
    interval_seconds: Decimal = Field(default=Decimal(5), ge=1, le=600)
    coverage_critical_percent: Percent = Field(default=Decimal(95), ge=0, le=100)
    uncovered_critical_seconds: Decimal = Field(default=Decimal(60), ge=1, le=3600)
    mark_price_stale_seconds: Decimal = Field(default=Decimal(5), ge=1, le=600)
    exchange_latency_degraded_ms: int = Field(default=2500, ge=1, le=60000)
    database_latency_degraded_ms: int = Field(default=200, ge=1, le=60000)


# --- [tui] -----------------------------------------------------------------------------------------------

KeyName = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_+/?.,;:-]+$")]


class KeySettings(Section):
    protect_uncovered: KeyName = "p"
    restart_protection: KeyName = "r"
    toggle_entries: KeyName = "e"
    close_position: KeyName = "x"
    only_uncovered: KeyName = "u"
    filter: KeyName = "slash"
    focus_log: KeyName = "l"
    help: KeyName = "question_mark"
    quit: KeyName = "q"


class TuiSettings(Section):
    theme: str = Field(default="textual-dark", min_length=1)
    refresh_per_second: int = Field(default=4, ge=1, le=30)
    keys: KeySettings = Field(default_factory=KeySettings)


# --- [logging] -------------------------------------------------------------------------------------------


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    file: str = "logs/trading_bot.log"
    max_bytes: int = Field(default=10_000_000, ge=10_000)
    backup_count: int = Field(default=5, ge=0, le=100)


# --- root ------------------------------------------------------------------------------------------------


class Settings(BaseSettings):
    """The whole configuration. Values passed to the constructor are the file's; the environment wins."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        case_sensitive=False,
        extra="forbid",
        frozen=True,
    )

    venue: VenueSettings = Field(default_factory=VenueSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    signals: SignalsSettings = Field(default_factory=SignalsSettings)
    protection: ProtectionSettings = Field(default_factory=ProtectionSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    tui: TuiSettings = Field(default_factory=TuiSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)


SECTIONS: tuple[str, ...] = tuple(Settings.model_fields)

# Secret key path -> the key naming the owner-only file it may come from instead of the environment.
SECRETS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("venue", "api_key"): ("venue", "api_key_file"),
    ("venue", "api_secret"): ("venue", "api_secret_file"),
    ("database", "password"): ("database", "password_file"),
}


class Source(StrEnum):
    DEFAULT = "default"
    FILE = "file"
    ENV = "env"
    SECRET_FILE = "secret-file"


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """The validated settings plus where each value came from."""

    settings: Settings
    path: Path | None
    sources: dict[tuple[str, ...], Source] = field(default_factory=dict)

    @property
    def origin(self) -> str:
        return str(self.path) if self.path else "built-in defaults"

    def source_of(self, key_path: tuple[str, ...]) -> Source:
        return self.sources.get(key_path, Source.DEFAULT)

    def secret_values(self) -> list[str]:
        """The configured secret strings, for redaction at the log handler."""
        values = []
        for key_path in SECRETS:
            secret = _get_path(self.settings, key_path)
            if secret is not None and secret.get_secret_value():
                values.append(secret.get_secret_value())
        return values


def resolve_config_path(explicit: str | os.PathLike[str] | None, cwd: Path | None = None) -> Path | None:
    """`--config PATH` (must exist), else `./config.toml` if present, else None (built-in defaults)."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError([f"{path}: config file not found"])
        return path
    candidate = (cwd or Path.cwd()) / DEFAULT_CONFIG_NAME
    return candidate if candidate.is_file() else None


def load_config(
    explicit: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> LoadedConfig:
    """Load, merge and validate the configuration, or raise `ConfigError`."""
    environ = dict(os.environ if environ is None else environ)
    path = resolve_config_path(explicit, cwd)
    label = path.name if path is not None and explicit is None else (str(path) if path else "defaults")
    file_values = _read_toml(path, label) if path else {}

    problems = [f"{label}: {'.'.join(kp)}: {msg}" for kp, msg in _secrets_in_file(file_values)]
    problems += _unknown_env_sections(environ)
    env_values = _env_values(environ)
    if problems:
        raise ConfigError(problems)

    env_flat = dict(_flatten(env_values))
    file_flat = dict(_flatten(file_values))
    try:
        settings = _validate(file_values, environ)
    except ValidationError as exc:
        raise ConfigError(
            [_describe_error(err, label, env_flat) for err in exc.errors(include_url=False)]
        ) from None

    sources: dict[tuple[str, ...], Source] = {}
    for key_path, _ in _flatten(settings.model_dump()):
        if key_path in env_flat:
            sources[key_path] = Source.ENV
        elif key_path in file_flat:
            sources[key_path] = Source.FILE

    settings, secret_sources = _read_secret_files(settings, label, sources)
    sources.update(secret_sources)
    if settings.database.pool_min_size > settings.database.pool_max_size:
        raise ConfigError(
            [
                f"{label}: database.pool_min_size: must not exceed database.pool_max_size "
                f"({settings.database.pool_max_size}), got {settings.database.pool_min_size}"
            ]
        )
    return LoadedConfig(settings=settings, path=path, sources=sources)


def default_settings() -> Settings:
    """The built-in defaults, ignoring file and environment."""
    return _validate({}, {})


# --- internals -------------------------------------------------------------------------------------------


def _validate(file_values: dict[str, Any], environ: Mapping[str, str]) -> Settings:
    # pydantic-settings reads os.environ; give it exactly the mapping we were handed.
    class _Scoped(Settings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, **_unused):
            return (_MappingEnvSource(settings_cls, environ), init_settings)

    scoped = _Scoped(**file_values)
    return Settings.model_construct(**{name: getattr(scoped, name) for name in SECTIONS})


class _MappingEnvSource(EnvSettingsSource):
    """The stock environment source, reading a given mapping instead of the process environment."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]):
        self._environ = {k.lower(): v for k, v in environ.items()}
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return self._environ


def _env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    return _MappingEnvSource(Settings, environ)()


def _read_toml(path: Path, label: str) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{label}: invalid TOML: {exc}"]) from None
    except OSError as exc:
        raise ConfigError([f"{label}: cannot read: {exc.strerror}"]) from None


def _secrets_in_file(file_values: dict[str, Any]) -> Iterator[tuple[tuple[str, ...], str]]:
    for key_path, file_key in SECRETS.items():
        section = file_values.get(key_path[0])
        if isinstance(section, dict) and key_path[1] in section:
            env_name = ENV_PREFIX + ENV_NESTED_DELIMITER.join(key_path).upper()
            yield (
                key_path,
                f"secrets are not read from the config file: set {env_name} in the environment "
                f"or {'.'.join(file_key)} to a file only you can read, got a value here",
            )


def _unknown_env_sections(environ: Mapping[str, str]) -> list[str]:
    problems = []
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        section = name[len(ENV_PREFIX) :].split(ENV_NESTED_DELIMITER, 1)[0].lower()
        if section not in SECTIONS:
            problems.append(
                f"{name}: unknown configuration section {section!r}: expected one of {', '.join(SECTIONS)}"
            )
        elif ENV_NESTED_DELIMITER not in name[len(ENV_PREFIX) :]:
            problems.append(
                f"{name}: a whole section cannot be set at once: use {ENV_PREFIX}{section.upper()}__<KEY>"
            )
    return problems


def _read_secret_files(
    settings: Settings, label: str, sources: dict[tuple[str, ...], Source]
) -> tuple[Settings, dict[tuple[str, ...], Source]]:
    found: dict[tuple[str, ...], Source] = {}
    updates: dict[str, dict[str, Any]] = {}
    for key_path, file_key in SECRETS.items():
        file_name = _get_path(settings, file_key)
        if not file_name or sources.get(key_path) == Source.ENV:
            continue
        secret = _read_owner_only_file(Path(file_name).expanduser(), label, ".".join(file_key))
        updates.setdefault(key_path[0], {})[key_path[1]] = SecretStr(secret)
        found[key_path] = Source.SECRET_FILE
    if not updates:
        return settings, found
    sections = {
        name: getattr(settings, name).model_copy(update=updates[name]) if name in updates else None
        for name in SECTIONS
    }
    return settings.model_copy(update={k: v for k, v in sections.items() if v is not None}), found


def _read_owner_only_file(path: Path, label: str, key: str) -> str:
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError([f"{label}: {key}: cannot read secrets file {path}: {exc.strerror}"]) from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            [
                f"{label}: {key}: secrets file {path} must be readable by its owner only "
                f"(chmod 600), got mode {stat.S_IMODE(info.st_mode):04o}"
            ]
        )
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise ConfigError(
            [f"{label}: {key}: secrets file {path} must be owned by uid {os.getuid()}, got uid {info.st_uid}"]
        )
    value = path.read_text(encoding="utf-8").strip()
    if not value:
        raise ConfigError([f"{label}: {key}: secrets file {path} is empty"])
    return value


def _flatten(value: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _flatten(item, (*prefix, str(key).lower()))
    else:
        yield prefix, value


def _get_path(obj: Any, key_path: tuple[str, ...]) -> Any:
    for key in key_path:
        obj = getattr(obj, key)
    return obj


def _field_at(key_path: tuple[str, ...]) -> FieldInfo | None:
    model: Any = Settings
    info: FieldInfo | None = None
    for key in key_path:
        fields = getattr(model, "model_fields", None)
        if not fields or key not in fields:
            return None
        info = fields[key]
        model = info.annotation
    return info


def _bounds(info: FieldInfo | None) -> tuple[Any, Any, bool, bool]:
    """(low, high, low_inclusive, high_inclusive) from a field's constraints."""
    low = high = None
    low_inc = high_inc = True
    for meta in info.metadata if info else ():
        if isinstance(meta, annotated_types.Ge):
            low = meta.ge
        elif isinstance(meta, annotated_types.Gt):
            low, low_inc = meta.gt, False
        elif isinstance(meta, annotated_types.Le):
            high = meta.le
        elif isinstance(meta, annotated_types.Lt):
            high, high_inc = meta.lt, False
    return low, high, low_inc, high_inc


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | Decimal | float):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _expected(err: Mapping[str, Any], info: FieldInfo | None) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        low, high, low_inc, high_inc = _bounds(info)
        if low is not None and high is not None and low_inc and high_inc:
            return f"must be between {low} and {high}"
        if low is not None and high is not None:
            return f"must be {'>=' if low_inc else '>'} {low} and {'<=' if high_inc else '<'} {high}"
        symbol = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
        return f"must be {symbol[kind]} {next(iter(ctx.values()))}"
    if kind in {"enum", "literal_error"}:
        return f"must be one of {ctx.get('expected', '')}".replace("'", '"')
    if kind == "extra_forbidden":
        parent = _field_at(tuple(str(p) for p in err["loc"][:-1])) if len(err["loc"]) > 1 else None
        known = (
            list(parent.annotation.model_fields)
            if parent and hasattr(parent.annotation, "model_fields")
            else list(SECTIONS)
        )
        return f"unknown key (a typo?): expected one of {', '.join(known)}"
    if kind in {"decimal_parsing", "decimal_type", "float_parsing", "float_type", "finite_number"}:
        return "must be a number"
    if kind in {"int_parsing", "int_type", "int_from_float"}:
        return "must be a whole number"
    if kind in {"bool_parsing", "bool_type"}:
        return "must be true or false"
    if kind in {"string_type"}:
        return "must be a string"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')}"
    if kind in {"string_too_short", "string_too_long"}:
        return err["msg"].replace("String should", "must").lower()
    if kind in {"model_type", "model_attributes_type", "dict_type"}:
        return "must be a table"
    return err["msg"][0].lower() + err["msg"][1:]


def _describe_error(err: Mapping[str, Any], label: str, env_flat: Mapping[tuple[str, ...], Any]) -> str:
    key_path = tuple(str(p) for p in err["loc"])
    info = _field_at(key_path)
    from_env = any(k[: len(key_path)] == key_path for k in env_flat)
    origin = ENV_PREFIX + ENV_NESTED_DELIMITER.join(key_path).upper() if from_env else label
    shown = "a secret value" if key_path in SECRETS else _show(err.get("input"))
    return f"{origin}: {'.'.join(key_path)}: {_expected(err, info)}, got {shown}"

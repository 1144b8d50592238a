"""Configuration: `config.toml` + `TSBOT_<SECTION>__<KEY>` environment overrides, validated at load.

Where the file comes from: `--config PATH`, else `./config.toml`, else the built-in defaults (the model
defaults below are the packaged default; a test keeps them equal to the shipped `config.toml`).

Every invalid value ends the program with one line per problem naming where the value came from, the key
path, what was expected and what was found (`ConfigError`, exit code 2 in the CLI). Unknown keys are errors.

Secrets (exchange API key/secret, database password) are never read from the config file: only from the
environment or from a file named by a `*_file` key that only its owner can read.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from engine.venues.sim.settings import SimVenueSettings

ENV_PREFIX = "TSBOT_"
ENV_NESTED_DELIMITER = "__"
DEFAULT_CONFIG_NAME = "config.toml"

Percent = Annotated[Decimal, Field(allow_inf_nan=False)]
# Longest value quoted back in a message: a 1 MB value must not become a 1 MB error line.
SHOWN_VALUE_CHARS = 60
MAX_TEXT_CHARS = 4096
MAX_SECRET_FILE_BYTES = 64 * 1024
MAX_SEED = 2**32 - 1


class ConfigError(Exception):
    """A configuration problem the operator caused; `str()` is one line per problem."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


class FieldProblem(ValueError):
    """A rule across fields is broken: raised by a model validator, reported against `key` of that model
    (`<where>: <section>.<key>: <expected>, got <found>`)."""

    def __init__(self, key: str, expected: str, found: Any):
        super().__init__(f"{key}: {expected}")
        self.key = key
        self.expected = expected
        self.found = found


def shown(value: Any, limit: int = SHOWN_VALUE_CHARS) -> str:
    """`value` quoted for a one-line message (JSON-escaped: no control characters), cut to `limit`."""
    text = json.dumps(value, ensure_ascii=True) if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return text
    length = f"{len(value):,} characters" if isinstance(value, str) else f"{len(text):,} characters"
    return f"{text[:limit]}… ({length})"


def _plain_text(value: str) -> str:
    """Paths, URLs and names: printable, encodable text (a NUL or a lone surrogate breaks every use)."""
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError("must not contain control characters (newlines, tabs, NUL …)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid UTF-8 text") from None
    return value


Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS), AfterValidator(_plain_text)]


def _check_url(value: str, *, schemes: tuple[str, ...], example: str) -> None:
    expected = f"must be a URL starting with {' or '.join(s + '://' for s in schemes)}, like {example}"
    try:
        parts = urllib.parse.urlsplit(value)
    except ValueError:  # e.g. an unclosed "[" of an IPv6 host
        raise ValueError(f"{expected}; its host is not one (an IPv6 address goes in [brackets])") from None
    try:
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number in 0-65535)
    except ValueError:
        raise ValueError(f"{expected}; its port must be a number up to 65535") from None
    if parts.scheme.lower() not in schemes:
        raise ValueError(expected)
    if parts.scheme.lower().startswith("http") and not parts.hostname:
        raise ValueError(expected)


def _check_secret(value: SecretStr | None) -> SecretStr | None:
    """A key, secret or password is one line of text: a newline would end up inside an HTTP header."""
    if value is None:
        return None
    text = value.get_secret_value()
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"must be at most {MAX_TEXT_CHARS} characters")
    _plain_text(text)
    return value


# A boolean is `true` or `false`: never 0, 1, "no" or "false" in quotes (that once meant mainnet). The
# environment can only hold strings, so `_MappingEnvSource` turns exactly "true" / "false" into booleans.
Flag = Annotated[bool, Strict()]


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
    testnet: Flag = True
    base_url: Text = ""
    api_key_file: Text = ""
    api_secret_file: Text = ""
    api_key: SecretStr | None = None
    api_secret: SecretStr | None = None
    sim: SimVenueSettings = Field(default_factory=SimVenueSettings)

    @field_validator("base_url")
    @classmethod
    def _base_url_is_a_url(cls, value: str) -> str:
        if value:
            _check_url(value, schemes=("http", "https"), example="http://127.0.0.1:8900")
        return value

    @field_validator("api_key", "api_secret")
    @classmethod
    def _secret_is_one_token(cls, value: SecretStr | None) -> SecretStr | None:
        return _check_secret(value)


def is_loopback_host(host: str) -> bool:
    """`host` (a name or an address, no port) is this machine: localhost or a loopback address (an IPv4
    one written as IPv6 too). Not 0.0.0.0: listened on, it is every interface."""
    name = host.lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 (Python 3.11 does not call it loopback)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def venue_mode(venue: VenueSettings) -> str:
    """What the engine trades, as the header and the metrics name it: SIM (the sim venue); LIVE whenever
    `testnet = false`, wherever the `base_url` points (a local forwarder to the venue's mainnet is real
    money, r93); LOCAL for a real venue's wire at a `base_url` on this machine (the emulators); else TESTNET.

    `testnet` only picks the venue's own hosts; a `base_url` replaces them all, so on the local emulator
    "TESTNET" named a place no order went (an operator)."""
    if venue.kind is VenueKind.SIM:
        return "SIM"
    if not venue.testnet:
        return "LIVE"
    if venue.base_url and is_loopback_host(urllib.parse.urlsplit(venue.base_url).hostname or ""):
        return "LOCAL"
    return "TESTNET"


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
    dsn: Text = ""
    data_dir: Text = ""
    name: str = Field(default="tsbot", min_length=1, max_length=63, pattern=r"^[a-z_][a-z0-9_]*$")
    pool_min_size: int = Field(default=1, ge=1, le=100)
    pool_max_size: int = Field(default=10, ge=1, le=100)
    command_timeout_seconds: Decimal = Field(default=Decimal(10), ge=1, le=300)
    probe_timeout_seconds: Decimal = Field(default=Decimal(3), ge=Decimal("0.2"), le=60)
    password_file: Text = ""
    password: SecretStr | None = None

    @field_validator("dsn")
    @classmethod
    def _dsn_is_postgresql(cls, value: str) -> str:
        if value:
            _check_url(
                value, schemes=("postgresql", "postgres"), example="postgresql://bot@db.internal/tsbot"
            )
        return value

    @field_validator("password")
    @classmethod
    def _password_is_one_line(cls, value: SecretStr | None) -> SecretStr | None:
        return _check_secret(value)

    @model_validator(mode="after")
    def _pool_sizes_in_order(self) -> DatabaseSettings:
        if self.pool_min_size > self.pool_max_size:
            raise FieldProblem(
                "pool_min_size",
                f"must not exceed database.pool_max_size ({self.pool_max_size})",
                self.pool_min_size,
            )
        return self


# --- [signals] -------------------------------------------------------------------------------------------


class SignalSource(StrEnum):
    SIM = "sim"
    POSTGRES = "postgres"


class SignalsSettings(Section):
    source: SignalSource = SignalSource.SIM
    wave_size: int = Field(default=7, ge=1, le=500)
    wave_interval_seconds: Decimal = Field(default=Decimal(20), ge=1, le=86400)
    seed: int = Field(default=7, ge=0, le=MAX_SEED)
    wave_window_ms: int = Field(default=500, ge=0, le=60000)
    position_size_usd: Decimal = Field(default=Decimal(200), gt=0, le=1_000_000)
    max_positions: int = Field(default=95, ge=1, le=5000)
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

    @model_validator(mode="after")
    def _emergency_beyond_improvement(self) -> TrailingSettings:
        # "move at once past this lag" below "move only past this improvement" would make every move urgent.
        if self.min_improvement_percent > self.emergency_move_percent:
            raise FieldProblem(
                "min_improvement_percent",
                f"must not exceed protection.trailing.emergency_move_percent ({self.emergency_move_percent})",
                self.min_improvement_percent,
            )
        return self


class BreakerSettings(Section):
    uncovered_factor: Decimal = Field(default=Decimal(3), ge=1, le=1000)
    error_rate: Decimal = Field(default=Decimal("0.5"), gt=0, le=1)
    error_window_seconds: Decimal = Field(default=Decimal(60), ge=5, le=3600)
    min_attempts: int = Field(default=6, ge=1, le=100_000)
    auto_resume_seconds: Decimal = Field(default=Decimal(0), ge=0, le=86400)


class ProtectionSettings(Section):
    stop_loss_percent: Percent = Field(default=Decimal(3), ge=Decimal("0.1"), le=50)
    # > 0: at 0 the venue's trail (armed at once, from the mark) and the managed trail (from the fill)
    # would exit on different ticks; an activation above the entry means the same thing for both.
    activation_percent: Percent = Field(default=Decimal("1.5"), gt=0, le=100)
    callback_percent: Percent = Field(default=Decimal("0.5"), ge=Decimal("0.1"), le=10)
    # A protective call cannot answer in less than a second over the internet; a smaller budget turns every
    # call into an ambiguous outcome.
    call_timeout_seconds: Decimal = Field(default=Decimal(10), ge=1, le=120)
    grace_seconds: Decimal = Field(default=Decimal(5), ge=0, le=600)
    reconcile_seconds: Decimal = Field(default=Decimal(10), ge=1, le=3600)
    retry_initial_seconds: Decimal = Field(default=Decimal(1), ge=Decimal("0.1"), le=60)
    retry_max_seconds: Decimal = Field(default=Decimal(30), ge=1, le=600)
    close_on_would_trigger: Flag = True
    trailing: TrailingSettings = Field(default_factory=TrailingSettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)

    @model_validator(mode="after")
    def _retry_delays_in_order(self) -> ProtectionSettings:
        if self.retry_initial_seconds > self.retry_max_seconds:
            raise FieldProblem(
                "retry_initial_seconds",
                f"must not exceed protection.retry_max_seconds ({self.retry_max_seconds})",
                self.retry_initial_seconds,
            )
        return self


# --- [health] --------------------------------------------------------------------------------------------


class HealthSettings(Section):
    interval_seconds: Decimal = Field(default=Decimal(5), ge=1, le=600)
    # An alarm that stays quiet until half the positions are unprotected is no alarm (the incident: 36.5 %).
    coverage_critical_percent: Percent = Field(default=Decimal(95), ge=50, le=100)
    uncovered_critical_seconds: Decimal = Field(default=Decimal(60), ge=1, le=3600)
    mark_price_stale_seconds: Decimal = Field(default=Decimal(5), ge=1, le=600)
    # Per position: its own symbol's mark older than this is flagged on its row and counted by health.
    stale_mark_seconds: Decimal = Field(default=Decimal(10), ge=Decimal("0.5"), le=3600)
    exchange_latency_degraded_ms: int = Field(default=2500, ge=1, le=60000)
    database_latency_degraded_ms: int = Field(default=200, ge=1, le=60000)


# --- [tui] -----------------------------------------------------------------------------------------------

# The names Textual gives the keys it reports, after any modifiers: those of `textual.keys.Keys` and its
# `KEY_ALIASES`, of the kitty keyboard protocol's keys (`textual._keyboard_protocol.FUNCTIONAL_KEYS`, less
# the modifier keys pressed alone) and of the punctuation characters (`_KEY_ALIASES` below). Copied, not
# imported: the engine never imports the UI; tests/tui/test_config_names.py keeps the copy equal to the
# installed Textual's.
KEY_MODIFIERS = ("ctrl", "alt", "shift", "meta", "super", "hyper")
KEY_NAMES = frozenset(
    {
        *("escape", "enter", "return", "newline", "tab", "space", "backspace", "insert", "delete"),
        *("up", "down", "left", "right", "home", "end", "pageup", "pagedown", "kp_begin"),
        *(f"f{number}" for number in range(1, 36)),
        *("caps_lock", "scroll_lock", "num_lock", "print_screen", "pause", "menu"),
        *("add", "subtract", "multiply", "divide", "decimal", "equal", "separator"),  # the keypad's
        *("media_play", "media_pause", "media_play_pause", "media_reverse", "media_stop"),
        *("media_fast_forward", "media_rewind", "media_track_next", "media_track_previous", "media_record"),
        *("lower_volume", "raise_volume", "mute_volume"),
        *("left_square_brace",),  # ctrl+left_square_brace, Textual's other name of escape
    }
)
# The punctuation characters and the names Textual gives them: "/" and "slash" are one key.
_KEY_ALIASES = {
    "!": "exclamation_mark",
    '"': "quotation_mark",
    "#": "number_sign",
    "$": "dollar_sign",
    "%": "percent_sign",
    "&": "ampersand",
    "'": "apostrophe",
    "(": "left_parenthesis",
    ")": "right_parenthesis",
    "*": "asterisk",
    "+": "plus",
    ",": "comma",
    "-": "minus",
    ".": "full_stop",
    "/": "slash",
    ":": "colon",
    ";": "semicolon",
    "<": "less_than_sign",
    "=": "equals_sign",
    ">": "greater_than_sign",
    "?": "question_mark",
    "@": "at",
    "[": "left_square_bracket",
    "\\": "backslash",
    "]": "right_square_bracket",
    "^": "circumflex_accent",
    "_": "underscore",
    "`": "grave_accent",
    "{": "left_curly_bracket",
    "|": "vertical_line",
    "}": "right_curly_bracket",
    "~": "tilde",
}
_KNOWN_KEY_NAMES = KEY_NAMES | set(_KEY_ALIASES.values())
_KEY_EXAMPLES = 'like "q", "ctrl+q", "escape" or "f5"'


def _is_key(key: str) -> bool:
    """One key as Textual names it: modifiers joined by "+" to a single character or a key's name."""
    if len(key) == 1:  # "+" too: a key of its own
        return key.isprintable() and not key.isspace()
    *modifiers, name = key.split("+")
    if len(set(modifiers)) != len(modifiers) or not set(modifiers) <= set(KEY_MODIFIERS):
        return False
    return (len(name) == 1 and name.isprintable() and not name.isspace()) or name in _KNOWN_KEY_NAMES


def _key_names(value: str) -> str:
    """A key in `[tui.keys]`, or several separated by commas. A name Textual never reports ("escpae",
    "ctrl+alt+shift+nonsense") binds the command to a key nobody can press: its own key is gone with it."""
    keys = value.split(",")
    bad = next((key for key in keys if not _is_key(key)), None)
    if bad is None:
        return value
    if len(keys) == 1:
        raise ValueError(f"must be a key name {_KEY_EXAMPLES}")
    raise ValueError(f"must be key names {_KEY_EXAMPLES}, separated by commas: {shown(bad)} is not one")


KeyName = Annotated[str, Field(min_length=1, max_length=32), AfterValidator(_key_names)]


class KeySettings(Section):
    protect_uncovered: KeyName = "p"
    restart_protection: KeyName = "r"
    toggle_entries: KeyName = "e"
    close_position: KeyName = "x"
    only_uncovered: KeyName = "u"
    filter: KeyName = "slash"
    focus_log: KeyName = "l"
    health_detail: KeyName = "h"
    history: KeyName = "y"
    help: KeyName = "question_mark"
    quit: KeyName = "q"

    @model_validator(mode="after")
    def _one_action_per_key(self) -> KeySettings:
        bound: dict[str, str] = {}
        fields = type(self).model_fields
        for action in fields:
            for key in getattr(self, action).split(","):
                name = _KEY_ALIASES.get(key, key)
                if name in bound and bound[name] != action:
                    # Name the binding the operator changed, not the default it collides with.
                    first, second = bound[name], action
                    if getattr(self, second) == fields[second].default:
                        first, second = second, first
                    raise FieldProblem(
                        second,
                        f"must differ from tui.keys.{first} (both press {name!r})",
                        getattr(self, second),
                    )
                bound[name] = action
        return self


# Textual's built-in themes (`textual.theme.BUILTIN_THEMES`; the dashboard registers none of its own), copied
# for the same reason and kept equal by the same test. A name not among them was found only once the
# dashboard was up: the default theme stayed on, with a notice on the screen.
THEMES = (
    "ansi-dark",
    "ansi-light",
    "atom-one-dark",
    "atom-one-light",
    "catppuccin-frappe",
    "catppuccin-latte",
    "catppuccin-macchiato",
    "catppuccin-mocha",
    "dracula",
    "flexoki",
    "gruvbox",
    "monokai",
    "nord",
    "rose-pine",
    "rose-pine-dawn",
    "rose-pine-moon",
    "solarized-dark",
    "solarized-light",
    "textual-dark",
    "textual-light",
    "tokyo-night",
)


def _theme_name(value: str) -> str:
    if value not in THEMES:
        raise ValueError(f"must be one of {', '.join(THEMES)}")
    return value


class TuiSettings(Section):
    theme: Annotated[str, Field(max_length=64), AfterValidator(_theme_name)] = "textual-dark"
    refresh_per_second: int = Field(default=4, ge=1, le=30)
    keys: KeySettings = Field(default_factory=KeySettings)


# --- [logging] -------------------------------------------------------------------------------------------


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    file: Text = Field(default="logs/trading_bot.log", min_length=1)
    max_bytes: int = Field(default=10_000_000, ge=10_000, le=10_000_000_000)
    backup_count: int = Field(default=5, ge=0, le=100)


# --- [alerts] ------------------------------------------------------------------------------------------

# A notification URL as apprise spells them (tgram://, slack://, discord://, ntfy://, mailto://, json://,
# form:// …). Only the shape is checked here; the alerter asks apprise whether it knows the scheme.
_ALERT_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]{0,31}://[^\s\x00-\x1f\x7f]+$")
_HOST_NAME = re.compile(r"^(localhost|[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+|\[[0-9A-Fa-f:.]+\])(:\d{1,5})?$")
# Pieces of a URL shorter than this are not masked in logs: "hook" or "443" would mangle every line.
MIN_MASKED_CHARS = 6


def alert_urls(value: SecretStr | None) -> list[str]:
    """The notification URLs in `alerts.urls`: separated by spaces, commas or newlines."""
    if value is None:
        return []
    return [url for url in re.split(r"[\s,]+", value.get_secret_value()) if url]


def alert_url_scheme(url: str) -> str:
    """What may be said about a URL: its scheme (the rest may hold a token)."""
    return url.split("://", 1)[0].lower() if "://" in url else "?"


def alert_url_secrets(url: str) -> list[str]:
    """The pieces of a notification URL that may be a token, for masking at the log handler: the URL,
    everything after its scheme, the password; and, where they look like a token (a digit in them, or 12
    characters or more), the user, a host that is not a host name (tgram://BOT_TOKEN), each path segment
    and query value. Plain words ("hooks", "operator") stay readable: masking them would mangle every
    line that uses the word."""
    rest = url.split("://", 1)[1] if "://" in url else url
    always = [url, rest]
    address, _, query = rest.partition("?")
    netloc, _, path = address.partition("/")
    userinfo, _, host = netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    always.append(password)
    maybe = [user, *path.split("/")]
    if not _HOST_NAME.match(host):
        maybe += [host, *host.split(":")]
    for pair in query.split("&"):
        value = pair.partition("=")[2]
        maybe += [value, urllib.parse.unquote(value)]
    pieces = always + [p for p in maybe if len(p) >= 12 or any(ch.isdigit() for ch in p)]
    return [piece for piece in dict.fromkeys(pieces) if len(piece) >= MIN_MASKED_CHARS]


_NOT_A_URL = "entry {number} is not a notification URL like json://host/path or tgram://TOKEN/CHAT"


def alert_url_problem(number: int, url: str) -> str | None:
    """Why `url` (entry `number` of `alerts.urls`) cannot be sent to, or None: its shape, then whether
    apprise knows its scheme and can parse its parts. Names the entry and its scheme, never its text."""
    if not _ALERT_URL.match(url):
        return _NOT_A_URL.format(number=number)
    import logging

    import apprise

    # apprise says why it refuses a URL at ERROR, quoting the URL (the token in it).
    quiet = logging.getLogger("apprise")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL + 1)
    try:
        known = apprise.Apprise().add(url)
    finally:
        quiet.setLevel(level)
    if not known:
        return (
            f"entry {number} ({alert_url_scheme(url)}://…) is not a notification URL apprise can send to: "
            "check its scheme and parts"
        )
    return None


class AlertsSettings(Section):
    urls_file: Text = ""
    urls: SecretStr | None = None
    check_seconds: Decimal = Field(default=Decimal(1), ge=Decimal("0.2"), le=60)
    coverage_below_percent: Percent = Field(default=Decimal(95), ge=0, le=100)
    coverage_critical_percent: Percent = Field(default=Decimal(80), ge=0, le=100)
    uncovered_seconds: Decimal = Field(default=Decimal(30), ge=0, le=86400)
    escalate_after_seconds: Decimal = Field(default=Decimal(300), ge=0, le=86400)
    repeat_minutes: Decimal = Field(default=Decimal(30), ge=1, le=10080)
    send_timeout_seconds: Decimal = Field(default=Decimal(10), ge=1, le=120)

    @field_validator("urls")
    @classmethod
    def _urls_are_notification_urls(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        if len(value.get_secret_value()) > MAX_SECRET_FILE_BYTES:
            raise ValueError(f"must be at most {MAX_SECRET_FILE_BYTES} characters")
        for number, url in enumerate(alert_urls(value), start=1):
            if not _ALERT_URL.match(url):  # the message names the entry, never its text
                raise ValueError(_NOT_A_URL.format(number=number))
        return value

    @model_validator(mode="after")
    def _critical_below_warning(self) -> AlertsSettings:
        if self.coverage_critical_percent > self.coverage_below_percent:
            raise FieldProblem(
                "coverage_critical_percent",
                f"must not exceed alerts.coverage_below_percent ({self.coverage_below_percent})",
                self.coverage_critical_percent,
            )
        return self


# --- [metrics] -----------------------------------------------------------------------------------------


def _listen_host(value: str) -> str:
    """An address to listen on: an IP address literal (`127.0.0.1`, `::1`, `0.0.0.0`) or `localhost`. A
    name that resolves to several addresses would make "which interface is this on" a guess."""
    if value == "localhost":
        return value
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError("must be an IP address like 127.0.0.1 or ::1, or localhost") from None
    return value


class MetricsSettings(Section):
    """The Prometheus endpoint (`/metrics`) and `/healthz`, served by the engine. Off unless enabled; on
    the loopback interface unless another address is configured here."""

    enabled: Flag = False
    host: Annotated[str, Field(max_length=64), AfterValidator(_listen_host)] = "127.0.0.1"
    port: int = Field(default=9464, ge=0, le=65535)  # 0: any free port (tests; the log says which)


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
    alerts: AlertsSettings = Field(default_factory=AlertsSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)

    @model_validator(mode="after")
    def _uncovered_alarm_after_the_grace_period(self) -> Settings:
        # A position is uncovered from its fill until its stops are confirmed, normally well inside the grace
        # period: an alarm set inside it cried CRITICAL at every slow wave (operators stop reading those).
        if self.health.uncovered_critical_seconds <= self.protection.grace_seconds:
            raise FieldProblem(
                "health.uncovered_critical_seconds",
                f"must be more than protection.grace_seconds ({self.protection.grace_seconds}): a position is "
                "uncovered for up to that long after its fill by design",
                self.health.uncovered_critical_seconds,
            )
        return self

    @model_validator(mode="after")
    def _trailing_mode_fits_the_venue(self) -> Settings:
        # A Bybit position holds one stop-loss (position/trading-stop's `stopLoss`), and the hard stop holds
        # it: a managed trail's stop would replace it there, then be replaced by it at the next check, for as
        # long as the position is open, while each counted itself live. Bybit trails natively instead.
        if self.venue.kind is VenueKind.BYBIT and self.protection.trailing.mode is TrailingMode.MANAGED:
            raise FieldProblem(
                "protection.trailing.mode",
                'must be "native" or "auto" with venue.kind "bybit" (a Bybit position has one stop-loss, '
                "which the hard stop holds; its trailing stop is native)",
                self.protection.trailing.mode.value,
            )
        return self

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
    ("alerts", "urls"): ("alerts", "urls_file"),
}
# Secrets whose file may hold one value per line (folded into one line, separated by spaces).
MULTI_LINE_SECRETS = frozenset({("alerts", "urls")})


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
    # Key path (lower case) -> the TSBOT_ variable that set it, or a table or dict around it.
    env_names: dict[tuple[str, ...], str] = field(default_factory=dict)

    @property
    def origin(self) -> str:
        return str(self.path) if self.path else "built-in defaults"

    def source_of(self, key_path: tuple[str, ...]) -> Source:
        """Where the value at `key_path` came from; a key inside a dict setting (`venue.sim.latency.by_call.
        create_order.seconds`) has its own source, as does the dict itself."""
        return self.sources.get(_lower(key_path), Source.DEFAULT)

    def env_name_of(self, key_path: tuple[str, ...]) -> str | None:
        """The variable that set the value at `key_path` (itself, or the JSON table or dict holding it)."""
        key_path = _lower(key_path)
        for end in range(len(key_path), 0, -1):
            if key_path[:end] in self.env_names:
                return self.env_names[key_path[:end]]
        return None

    def source_label(self, key_path: tuple[str, ...]) -> str:
        """What `config show` writes after a value: `default`, `file`, `env TSBOT_…` or `secret-file`."""
        source = self.source_of(key_path)
        if source is Source.ENV:
            name = self.env_name_of(key_path)
            return f"env {name}" if name else source.value
        return source.value

    def secret_values(self) -> list[str]:
        """The configured secret strings, for redaction at the log handler."""
        values = []
        for key_path in SECRETS:
            secret = _get_path(self.settings, key_path)
            if secret is not None and secret.get_secret_value():
                values.append(secret.get_secret_value())
        for url in alert_urls(self.settings.alerts.urls):  # a log line may quote one URL, or a piece
            values += alert_url_secrets(url)
        return values


def resolve_config_path(explicit: str | os.PathLike[str] | None, cwd: Path | None = None) -> Path | None:
    """`--config PATH` (must exist), else `./config.toml` if present, else None (built-in defaults)."""
    if explicit is not None:
        path = Path(explicit)
        try:
            is_dir, is_file, exists = path.is_dir(), path.is_file(), path.exists()
        except (OSError, ValueError):  # a NUL in the name, a name too long for the file system
            raise ConfigError([f"{shown(str(explicit))}: not a usable file name"]) from None
        if is_dir:
            raise ConfigError([f"{path}: is a directory: expected a TOML file like config.toml"])
        if exists and not is_file:  # (/dev/null, a FIFO: "not found" was said of them; an operator)
            raise ConfigError([f"{path}: not a regular file: expected a TOML file like config.toml"])
        if not is_file:
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
    problems += [f"{label}: {'.'.join(kp)}: {msg}" for kp, msg in _quoted_numbers(file_values)]
    problems += _unknown_env_sections(environ)
    if problems:
        raise ConfigError(problems)
    env_values = _env_values(environ)
    problems = [f"{label}: {'.'.join(kp)}: {msg}" for kp, msg in _not_booleans(file_values)]
    problems += [
        f"{_origin(kp, label, _env_names(environ))}: {'.'.join(kp)}: {msg}"
        for kp, msg in _not_booleans(env_values)
    ]
    problems += _passwords_in_dsn(file_values, env_values, label, _env_names(environ))
    if problems:
        raise ConfigError(problems)

    env_flat = dict(_flatten(env_values))
    file_flat = dict(_flatten(file_values))
    try:
        settings = _validate(file_values, environ)
    except ValidationError as exc:
        raise ConfigError(_describe_errors(exc, label, _env_names(environ))) from None

    # Every value's source, dict settings included: the dict itself (even when set to {}) and each value in
    # it (a dict's entries may come from the file and the environment both: they are merged).
    env_paths = _with_prefixes(env_flat)
    file_paths = _with_prefixes(file_flat)
    sources: dict[tuple[str, ...], Source] = {}
    for key_path in _with_prefixes(dict(_flatten(settings.model_dump()))):
        if key_path in env_paths:
            sources[key_path] = Source.ENV
        elif key_path in file_paths:
            sources[key_path] = Source.FILE

    settings = _paths_from(path.parent if path is not None else None, cwd or Path.cwd(), settings, sources)
    settings, secret_sources = _read_secret_files(settings, label, sources, _env_names(environ))
    sources.update(secret_sources)
    problems = _alert_url_problems(settings, label, sources, _env_names(environ))
    if problems:
        raise ConfigError(problems)
    env_names = {_lower(key_path): name for key_path, name in _env_names(environ).items()}
    return LoadedConfig(settings=settings, path=path, sources=sources, env_names=env_names)


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

    def __call__(self) -> dict[str, Any]:
        return _flags_from_env(super().__call__(), Settings)


def _flags_from_env(values: dict[str, Any], model: Any) -> dict[str, Any]:
    """Exactly "true" / "false" become booleans for boolean keys; anything else ("0", "False", "FALSE")
    stays a string and is refused (`_not_booleans`): nonsense is refused, not guessed at."""
    fields = getattr(model, "model_fields", {})
    for key, value in values.items():
        info = fields.get(key)
        if info is None:
            continue
        if isinstance(value, dict):
            _flags_from_env(value, info.annotation)
        elif info.annotation is bool and isinstance(value, str) and value in ("true", "false"):
            values[key] = value == "true"
    return values


def _env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    try:
        return _MappingEnvSource(Settings, environ)()
    except Exception as exc:  # pydantic-settings' SettingsError names the section only: find the variable
        failure = exc
    problems = []
    for name, value in sorted(environ.items()):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        try:
            _MappingEnvSource(Settings, {name: value})()
        except Exception:
            problems.append(_describe_env_value(name, value))
    raise ConfigError(
        problems or [f"environment: the TSBOT_ variables cannot be read together: {type(failure).__name__}"]
    )


def _describe_env_value(name: str, value: str) -> str:
    """The one line for a variable whose value must be JSON (a list, a table) and is not."""
    key_path = tuple(name[len(ENV_PREFIX) :].lower().split(ENV_NESTED_DELIMITER))
    info = _field_at(key_path)
    annotation = info.annotation if info is not None else None
    origin = typing.get_origin(annotation)
    where = f"{name}: {'.'.join(key_path)}"
    if annotation is list or origin is list:
        expected = 'must be a JSON list like ["SFPUSDT", "BTCUSDT"]'
    elif annotation is dict or origin is dict:
        expected = 'must be a JSON object like {"SFPUSDT": 2.0}'
    else:
        expected = "must be JSON"
    return f"{where}: {expected}, got {shown(value)}"


def _read_toml(path: Path, label: str) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = fh.read()
        # A byte-order mark (Windows editors write one) is not TOML: it read "Invalid statement at line 1".
        return tomllib.loads(data.removeprefix(b"\xef\xbb\xbf").decode("utf-8"), parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{label}: invalid TOML: {' '.join(str(exc).split())}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [
                f"{label}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}): save it as UTF-8"
            ]
        ) from None
    except RecursionError:
        raise ConfigError([f"{label}: invalid TOML: arrays or tables nested too deeply"]) from None
    except ValueError as exc:  # e.g. an integer of more than 4 300 digits
        raise ConfigError([f"{label}: invalid TOML: {shown(str(exc), 120)}"]) from None
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


def _dsn_holds_a_password(dsn: str) -> bool:
    """A password in the user part (`postgresql://bot:pw@host/db`, an empty one too) or a `password=`
    parameter, where the driver reads one; or what the masking of DSNs takes for one (`bot:a/b@host`: a
    `/` in the password hides it from `urllib`, not from the file)."""
    from storage.database import redact_dsn

    if redact_dsn(dsn) != dsn:
        return True
    try:
        parts = urllib.parse.urlsplit(dsn)
    except ValueError:  # not a URL: its own check refuses it
        return False
    if parts.password is not None:
        return True
    return any(key.strip().lower() == "password" for key, _ in urllib.parse.parse_qsl(parts.query, True))


def _passwords_in_dsn(
    file_values: Mapping[str, Any],
    env_values: Mapping[str, Any],
    label: str,
    env_names: Mapping[tuple[str, ...], str],
) -> list[str]:
    """The database password is a secret: from `TSBOT_DATABASE__PASSWORD` or `database.password_file`, never
    inside `database.dsn` (in the file, nor in `TSBOT_DATABASE__DSN`: one place for it, masked everywhere,
    and no guessing which of two passwords a connection used). The DSN is never quoted: the regex that masks
    DSNs in messages does not see every password `urllib` finds."""
    problems = []
    for values, origin in ((file_values, label), (env_values, None)):
        section = values.get("database")
        dsn = section.get("dsn") if isinstance(section, Mapping) else None
        if not isinstance(dsn, str):
            continue
        where = origin or _origin(("database", "dsn"), label, env_names)
        if _dsn_holds_a_password(_without_ssl_password(dsn)):
            problems.append(
                f"{where}: database.dsn: must not hold the database password: set TSBOT_DATABASE__PASSWORD in "
                "the environment or database.password_file to a file only you can read, got a DSN with a "
                "password in it"
            )
        elif origin is not None and _without_ssl_password(dsn) != dsn:
            # The client key's passphrase has no setting of its own: a DSN from the environment may carry
            # it (masked everywhere), the file may not (a reviewer: refused everywhere, an mTLS setup had
            # no way to give it).
            problems.append(
                f"{where}: database.dsn: must not hold sslpassword (a secret) in the file: set the DSN in "
                "TSBOT_DATABASE__DSN in the environment instead"
            )
    return problems


def _without_ssl_password(dsn: str) -> str:
    """The DSN without its `sslpassword` parameters (the passphrase of the client's key, not the database
    password)."""
    try:
        parts = urllib.parse.urlsplit(dsn)
        query = urllib.parse.parse_qsl(parts.query, True)
    except ValueError:
        return dsn
    kept = [(k, v) for k, v in query if k.strip().lower() != "sslpassword"]
    if len(kept) == len(query):
        return dsn
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(kept)))


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
        elif _model_at(key_path := tuple(name[len(ENV_PREFIX) :].lower().split(ENV_NESTED_DELIMITER))):
            # A table (`venue.sim`, `venue.sim.latency`, an entry of `by_call`) from one JSON variable: its
            # keys were set, or left at their defaults, with no variable naming them. Dict and list
            # settings (`by_call`, `volatility_by_symbol`, `symbols`) are values and take JSON.
            problems.append(
                f"{name}: {'.'.join(key_path)}: a whole table cannot be set at once: use "
                f"{name.upper()}{ENV_NESTED_DELIMITER}<KEY>"
            )
    return problems


# Keys naming a file or a directory: set relative in a config file, they are read from that file's directory.
PATH_KEYS: tuple[tuple[str, str], ...] = (
    ("logging", "file"),
    ("database", "data_dir"),
    ("database", "password_file"),
    ("venue", "api_key_file"),
    ("venue", "api_secret_file"),
    ("alerts", "urls_file"),
)


def _paths_from(
    file_directory: Path | None, cwd: Path, settings: Settings, sources: Mapping[tuple[str, ...], Source]
) -> Settings:
    """Every relative path made absolute once, at load: those the config file set from the file's directory
    (`tsbot run --config ../config.toml` from another directory wrote its log, and the protection journal
    beside it, under the working one; the next start from the config's own directory found no journal:
    r80), the environment's and the defaults' from the working directory (as the process would read them;
    `config show` then shows where they are). `~` paths are left as written."""
    updates: dict[str, dict[str, Any]] = {}
    for section, key in PATH_KEYS:
        value = getattr(getattr(settings, section), key)
        if not value or value.startswith("~") or Path(value).is_absolute():
            continue
        from_file = sources.get((section, key)) == Source.FILE and file_directory is not None
        base = file_directory if from_file and file_directory is not None else cwd
        updates.setdefault(section, {})[key] = str(base.absolute() / value)
    if not updates:
        return settings
    return settings.model_copy(
        update={name: getattr(settings, name).model_copy(update=changes) for name, changes in updates.items()}
    )


def _read_secret_files(
    settings: Settings,
    label: str,
    sources: dict[tuple[str, ...], Source],
    env_names: Mapping[tuple[str, ...], str],
) -> tuple[Settings, dict[tuple[str, ...], Source]]:
    found: dict[tuple[str, ...], Source] = {}
    updates: dict[str, dict[str, Any]] = {}
    for key_path, file_key in SECRETS.items():
        file_name = _get_path(settings, file_key)
        if not file_name:
            continue
        if sources.get(key_path) == Source.ENV:
            # Two sources of one secret: the variable won without a word, and which key a run used was a
            # guess. Refused; an empty variable clears the file's setting.
            named_by = _origin(file_key, label, env_names)
            variable = env_names.get(key_path) or f"{ENV_PREFIX}{'__'.join(key_path).upper()}"
            clear = f"{ENV_PREFIX}{'__'.join(file_key).upper()}="
            raise ConfigError(
                [
                    f"{named_by}: {'.'.join(file_key)}: {variable} sets the same secret; set one of them "
                    f"(`{clear}` clears the file)"
                ]
            )
        # A problem with the file is blamed on what named it: `TSBOT_VENUE__API_KEY_FILE`, or the config file.
        secret = _read_owner_only_file(
            Path(file_name).expanduser(),
            _origin(file_key, label, env_names),
            ".".join(file_key),
            lines=key_path in MULTI_LINE_SECRETS,
        )
        updates.setdefault(key_path[0], {})[key_path[1]] = SecretStr(secret)
        found[key_path] = Source.SECRET_FILE
    if not updates:
        return settings, found
    sections = {
        name: getattr(settings, name).model_copy(update=updates[name]) if name in updates else None
        for name in SECTIONS
    }
    return settings.model_copy(update={k: v for k, v in sections.items() if v is not None}), found


def _alert_url_problems(
    settings: Settings,
    label: str,
    sources: Mapping[tuple[str, ...], Source],
    env_names: Mapping[tuple[str, ...], str],
) -> list[str]:
    """Every alert URL is one apprise can send to, at load: `config show` and `status` accepted a URL that
    `tsbot run` then refused. The line names what set the URLs (the variable, or the file's key and the
    file), the entry's number and its scheme: never the URL."""
    urls = alert_urls(settings.alerts.urls)
    if not urls:
        return []
    if sources.get(("alerts", "urls")) is Source.SECRET_FILE:
        path = Path(settings.alerts.urls_file).expanduser()
        where = f"{_origin(('alerts', 'urls_file'), label, env_names)}: alerts.urls_file: secrets file {path}"
    else:
        where = f"{_origin(('alerts', 'urls'), label, env_names)}: alerts.urls"
    for number, url in enumerate(urls, start=1):
        problem = alert_url_problem(number, url)
        if problem is not None:
            return [f"{where}: {problem}"]
    return []


def _read_owner_only_file(path: Path, label: str, key: str, *, lines: bool = False) -> str:
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError([f"{label}: {key}: cannot read secrets file {path}: {exc.strerror}"]) from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise ConfigError([f"{label}: {key}: secrets file {path} must be a regular file, got {kind}"])
    if info.st_size > MAX_SECRET_FILE_BYTES:
        raise ConfigError(
            [
                f"{label}: {key}: secrets file {path} must be at most {MAX_SECRET_FILE_BYTES} bytes, got {info.st_size}"
            ]
        )
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
    try:
        value = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(
            [f"{label}: {key}: secrets file {path} must be UTF-8 text, got other bytes"]
        ) from None
    except OSError as exc:
        raise ConfigError([f"{label}: {key}: cannot read secrets file {path}: {exc.strerror}"]) from None
    if lines:  # one value per line; blank lines and "#" comments skipped
        value = " ".join(
            line.strip() for line in value.splitlines() if line.strip() and not line.strip().startswith("#")
        )
    if not value:
        raise ConfigError([f"{label}: {key}: secrets file {path} is empty"])
    try:
        _check_secret(SecretStr(value))
    except ValueError as exc:  # the message never quotes the secret
        raise ConfigError([f"{label}: {key}: secrets file {path}: the secret {exc}"]) from None
    return value


def _flatten(
    value: Any, prefix: tuple[str, ...] = (), *, lower: bool = True
) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(key path, value) of every leaf, lower case unless `lower` is false (a message names a key as it was
    written: `BTCUSDT`, not `btcusdt`); an empty table is a leaf (`by_call = {}` is a value)."""
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            text = _key_text(key)
            yield from _flatten(item, (*prefix, text.lower() if lower else text), lower=lower)
    else:
        yield prefix, value


def _key_text(key: Any) -> str:
    return key.value if isinstance(key, Enum) else str(key)


def _lower(key_path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(_key_text(key).lower() for key in key_path)


def _with_prefixes(flat: Mapping[tuple[str, ...], Any]) -> set[tuple[str, ...]]:
    """Every leaf path and every path above it: a table's or a dict's own source is its keys' sources."""
    return {key_path[:end] for key_path in flat for end in range(1, len(key_path) + 1)}


def _get_path(obj: Any, key_path: tuple[str, ...]) -> Any:
    for key in key_path:
        obj = getattr(obj, key)
    return obj


def _model_at(key_path: tuple[str, ...]) -> Any:
    """The model (table) at `key_path`, through dict settings too: `venue.sim.latency.by_call.create_order`
    is a `LatencyDistribution`. None when the path names no table."""
    model: Any = Settings
    keys = iter(key_path)
    for key in keys:
        fields = getattr(model, "model_fields", None)
        if not fields or key not in fields:
            return None
        model = fields[key].annotation
        if typing.get_origin(model) is dict:
            if next(keys, None) is None:
                return None  # the dict itself, not a table
            model = typing.get_args(model)[1]
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _dict_keys_at(key_path: tuple[str, ...]) -> list[str] | None:
    """The keys a dict setting at `key_path` accepts, when they are a fixed set (an enum), else None."""
    info = _field_at(key_path)
    if info is None or typing.get_origin(info.annotation) is not dict:
        return None
    key_type = typing.get_args(info.annotation)[0]
    if isinstance(key_type, type) and issubclass(key_type, Enum):
        return [member.value for member in key_type]
    return None


_NUMBER_TYPES = (int, float, Decimal)


def _quoted_numbers(file_values: Mapping[str, Any]) -> Iterator[tuple[tuple[str, ...], str]]:
    """Numbers written as strings in the file: refused, not guessed at. A TOML file has numbers; a quoted
    one was read as whatever Python's parsers make of it (`"３"`, full-width, `" 3 "` and `"3e0"` were all
    3). The environment's values are text by nature and are read as numbers there."""
    for key_path, value in _flatten(file_values, lower=False):
        if not isinstance(value, str):
            continue
        # Looked up in lower case, as the loader reads `[Protection]` (named as written in the message).
        lookup = _lower(key_path)
        info = _field_at(lookup) or _field_in_table_at(lookup)
        annotation = None if info is None else info.annotation
        if info is None:  # a value in a table of numbers (`volatility_by_symbol = {SFPUSDT = 1.5}`)?
            table = _field_at(lookup[:-1])
            if table is None or typing.get_origin(table.annotation) is not dict:
                continue
            annotation = typing.get_args(table.annotation)[1]
        kinds = (
            typing.get_args(annotation)
            if typing.get_origin(annotation) in (typing.Union, types.UnionType)
            else (annotation,)
        )
        if any(kind in _NUMBER_TYPES for kind in kinds) and not any(kind is str for kind in kinds):
            yield (
                key_path,
                f"must be a number, got {shown(value)} (a string: write the number without quotes)",
            )


def _not_booleans(values: Mapping[str, Any]) -> Iterator[tuple[tuple[str, ...], str]]:
    """Anything but a boolean at a boolean key: `true` or `false` only, in every table. The sections' flags
    are strict already; the sim venue's (`keep_book`, `account_stream.enabled`) took `0`, `"no"` and, from
    the environment, `False` or `0`, as pydantic's lax booleans do."""
    for key_path, value in _flatten(values, lower=False):
        lookup = _lower(key_path)  # (`[Venue.sim]` is read as `venue.sim`)
        info = _field_at(lookup) or _field_in_table_at(lookup)
        if info is not None and info.annotation is bool and not isinstance(value, bool):
            yield key_path, f"must be true or false, got {_show(value)}"


def _field_in_table_at(key_path: tuple[str, ...]) -> FieldInfo | None:
    """The field at `key_path` inside a table a dict setting holds (`venue.sim.latency.by_call.
    create_order.seconds`), which `_field_at` does not reach."""
    model = _model_at(key_path[:-1]) if key_path else None
    return None if model is None else model.model_fields.get(key_path[-1])


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
    if isinstance(value, int):
        return shown(value) if value.bit_length() < 4000 else "a number of more than 1 000 digits"
    if isinstance(value, Decimal | float | str):
        return shown(value)
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
        # The keys of the table the unknown key is in (a table inside a dict setting too), not the sections.
        parent = _model_at(tuple(str(p) for p in err["loc"][:-1]))
        known = list(parent.model_fields) if parent is not None else list(SECTIONS)
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
    if kind in {"list_type"}:
        return "must be a list"
    if kind == "value_error":
        return str(ctx.get("error") or err["msg"])
    return err["msg"][0].lower() + err["msg"][1:]


def _env_names(environ: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """Key path → the TSBOT_ variable that sets it."""
    return {
        tuple(name[len(ENV_PREFIX) :].lower().split(ENV_NESTED_DELIMITER)): name
        for name in sorted(environ)
        if name.upper().startswith(ENV_PREFIX)
    }


def _describe_errors(exc: ValidationError, label: str, env_names: Mapping[tuple[str, ...], str]) -> list[str]:
    """One line per value at fault: several errors inside one value (a table, a list) share its line."""
    lines: dict[tuple[str, ...], list[str]] = {}
    for err in exc.errors(include_url=False):
        key_path = tuple(str(p) for p in err["loc"])
        problem = (err.get("ctx") or {}).get("error")
        if isinstance(problem, FieldProblem):
            key = tuple(problem.key.split("."))  # a rule across sections names a nested key
            err = {**err, "loc": (*err["loc"], *key), "input": problem.found, "msg": problem.expected}
            key_path = (*key_path, *key)
        lines.setdefault(_value_at_fault(key_path), []).append(_describe_error(err, label, env_names))
    return [
        found[0] + (f" (and {len(found) - 1} more in this value)" if len(found) > 1 else "")
        for found in lines.values()
    ]


def _value_at_fault(key_path: tuple[str, ...]) -> tuple[str, ...]:
    """The deepest prefix of `key_path` that is a key of the schema (errors inside a table's entries or a
    list's items belong to that key)."""
    for end in range(len(key_path), 0, -1):
        if _field_at(key_path[:end]) is not None:
            return key_path[:end]
    return key_path[:1]


def _describe_error(err: Mapping[str, Any], label: str, env_names: Mapping[tuple[str, ...], str]) -> str:
    # pydantic marks an error in a dict's key (not its value) with a "[key]" step: the key is the bad one.
    bad_dict_key = bool(err["loc"]) and err["loc"][-1] == "[key]"
    key_path = tuple(str(p) for p in err["loc"] if p != "[key]")
    info = _field_at(key_path)
    origin = _origin(key_path, label, env_names)
    problem = (err.get("ctx") or {}).get("error")
    allowed = _dict_keys_at(key_path[:-1]) if bad_dict_key else None
    if allowed is not None:
        return f"{origin}: {'.'.join(key_path)}: unknown key (a typo?): expected one of {', '.join(allowed)}"
    expected = problem.expected if isinstance(problem, FieldProblem) else _expected(err, info)
    if err["type"] == "extra_forbidden":
        # Named, its value never shown: an unknown key may be a misspelt secret (`api_secrets`).
        return f"{origin}: {'.'.join(key_path)}: {expected}"
    value = "a secret value" if key_path in SECRETS else _show(err.get("input"))
    if key_path == ("database", "dsn"):  # its password, masked (even in a DSN this refuses)
        from storage.database import redact_dsn

        value = redact_dsn(value)
    return f"{origin}: {'.'.join(key_path)}: {expected}, got {value}"


def _origin(key_path: tuple[str, ...], label: str, env_names: Mapping[tuple[str, ...], str]) -> str:
    """The variable that set the value at fault: the one that set it or the JSON table around it (the
    nearest), else one that set a key inside it; the file (or "defaults") when no variable did. Paths are
    compared without case: the environment's are lower case, a JSON key keeps its own."""
    wanted = _lower(key_path)
    around = [(len(path), name) for path, name in env_names.items() if wanted[: len(path)] == _lower(path)]
    if around:
        return max(around)[1]
    inside = [name for path, name in env_names.items() if _lower(path)[: len(wanted)] == wanted]
    return inside[0] if inside else label

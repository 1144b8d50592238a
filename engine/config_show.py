"""`tsbot config show`: the effective configuration as TOML, each value annotated with its source."""

from __future__ import annotations

import json
import os
from decimal import Decimal
from enum import Enum
from typing import Any

from pydantic import BaseModel, SecretStr

from engine.config import SECRETS, LoadedConfig
from storage.database import redact_dsn

REDACTED = "<redacted>"


def render_config(loaded: LoadedConfig) -> str:
    lines = [
        "# tsbot effective configuration",
        f"# from: {_printable(loaded.origin)}",
        "# each value is followed by its source: default, file, env TSBOT_<SECTION>__<KEY> (the variable that "
        "set it) or secret-file",
    ]
    for name in type(loaded.settings).model_fields:
        lines += _render_table(loaded, (name,), getattr(loaded.settings, name))
    return "\n".join(lines) + "\n"


def _printable(path: str) -> str:
    """A file name as given, for a TOML comment on a possibly strict UTF-8 stdout: undecodable bytes and
    control characters escaped (a comment cannot hold a control character)."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _render_table(loaded: LoadedConfig, path: tuple[str, ...], model: BaseModel) -> list[str]:
    lines = ["", f"[{_toml_path(path)}]"]
    tables: list[tuple[tuple[str, ...], Any]] = []
    rows: list[tuple[str, str]] = []
    for key in type(model).model_fields:
        value = getattr(model, key)
        key_path = (*path, key)
        if isinstance(value, BaseModel) or (isinstance(value, dict) and value):
            # A dict setting is a table of its own, so that each of its values carries its own source.
            tables.append((key_path, value))
            continue
        if key_path in SECRETS:
            text = f"{key} = {json.dumps(REDACTED)}" if value is not None else f"# {key} = (not set)"
        elif key_path == ("database", "dsn"):
            text = f"{key} = {_toml_string(redact_dsn(value))}"
        else:
            text = f"{key} = {_toml_value(value)}"
        rows.append((text, loaded.source_label(key_path)))
    lines += _aligned(rows)
    for key_path, value in tables:
        lines += (
            _render_table(loaded, key_path, value)
            if isinstance(value, BaseModel)
            else _render_dict(loaded, key_path, value)
        )
    return lines


def _render_dict(loaded: LoadedConfig, path: tuple[str, ...], entries: dict[Any, Any]) -> list[str]:
    """A dict setting (`volatility_by_symbol`, `by_call`): its plain values as one table, each labelled;
    values that are tables themselves (a `by_call` entry) as a table each."""
    rows = []
    tables = []
    for key, value in entries.items():
        key_path = (*path, _key_text(key))
        if isinstance(value, BaseModel):
            tables.append((key_path, value))
        else:
            rows.append((f"{_toml_key(key)} = {_toml_value(value)}", loaded.source_label(key_path)))
    lines = ["", f"[{_toml_path(path)}]", *_aligned(rows)] if rows else []
    for key_path, value in tables:
        lines += _render_table(loaded, key_path, value)
    return lines


def _aligned(rows: list[tuple[str, str]]) -> list[str]:
    width = max((len(text) for text, _ in rows), default=0)
    return [f"{text.ljust(width)}  # {source}" for text, source in rows]


def _key_text(key: Any) -> str:
    return key.value if isinstance(key, Enum) else str(key)


def _toml_path(path: tuple[str, ...]) -> str:
    return ".".join(_toml_key(part) for part in path)


def _toml_key(key: Any) -> str:
    text = key.value if isinstance(key, Enum) else str(key)
    return text if text.replace("_", "").replace("-", "").isalnum() and text.isascii() else _toml_string(text)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return json.dumps(value.value)
    if isinstance(value, int | Decimal):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, SecretStr):
        return json.dumps(REDACTED)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, BaseModel):
        return _toml_value({name: getattr(value, name) for name in type(value).model_fields})
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return _toml_string(str(value))


def _toml_string(text: str) -> str:
    """A TOML basic string in ASCII. Not json.dumps: JSON writes a character beyond U+FFFF as a surrogate
    pair (\\ud83d\\ude00), which TOML refuses; TOML wants \\U0001f600."""
    out = []
    for char in text:
        code = ord(char)
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif 0x20 <= code < 0x7F:
            out.append(char)
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return '"' + "".join(out) + '"'

"""The key and theme names config.toml accepts are the installed Textual's. engine/config.py keeps a copy
of them (the engine never imports the UI): were Textual to rename a key or drop a theme, config.toml would
accept a name the dashboard cannot use, and this test says which."""

from __future__ import annotations

import string

from textual._keyboard_protocol import FUNCTIONAL_KEYS, MODIFIER_FUNCTIONAL_KEYS
from textual.keys import KEY_ALIASES, Keys, _character_to_key
from textual.theme import BUILTIN_THEMES

from engine.config import _KEY_ALIASES, KEY_NAMES, THEMES


def test_the_key_names_are_textuals() -> None:
    named = [key.value for key in Keys] + [
        name for key, aliases in KEY_ALIASES.items() for name in (key, *aliases)
    ]
    textuals = {
        name.rpartition("+")[2]
        for name in named
        # "<any>", "<ignore>" and the like are no keys; "ctrl-at" is a stale spelling nothing reports.
        if not name.startswith("<") and name != "ctrl-at"
    }
    textuals |= set(FUNCTIONAL_KEYS.values()) - MODIFIER_FUNCTIONAL_KEYS
    textuals = {name for name in textuals if len(name) > 1} - set(_KEY_ALIASES.values())  # those are below
    assert textuals == KEY_NAMES, (sorted(textuals - KEY_NAMES), sorted(KEY_NAMES - textuals))


def test_the_names_of_the_punctuation_characters_are_textuals() -> None:
    punctuation = [ch for ch in string.printable if not ch.isalnum() and not ch.isspace()]
    named = {ch: _character_to_key(ch) for ch in punctuation}
    assert named == _KEY_ALIASES


def test_the_themes_are_textuals_built_in_ones() -> None:
    assert set(BUILTIN_THEMES) == set(THEMES)

"""`tsbot config show` says where every value comes from — the values inside dict settings too — and a typo
inside a dict set from the environment is named by its variable, with the keys that dict accepts.

Before: a dict from the file or the environment (`volatility_by_symbol`, `by_call`) was labelled `# default`;
an unknown key inside a `by_call` entry listed the top-level sections; a bad `by_call` key set through a
nested variable was blamed on "defaults" (or the config file) instead of the variable."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from engine.config import ConfigError, Source, load_config
from engine.config_show import render_config


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _labels(shown: str) -> dict[str, str]:
    """`[table] key` -> the source label after it, for every value line of `config show`."""
    labels: dict[str, str] = {}
    table = ""
    for line in shown.splitlines():
        if line.startswith("["):
            table = line.strip("[]")
        elif line and not line.startswith("#"):
            text, label = line.rsplit("  # ", 1)
            labels[f"{table} {text.split(' = ', 1)[0]}"] = label
    return labels


def test_values_inside_dict_settings_are_labelled_by_their_real_source(tmp_path: Path) -> None:
    config = _write(
        tmp_path / "c.toml",
        "[venue.sim]\nvolatility_by_symbol = { BTCUSDT = 2.0 }\n"
        "[venue.sim.latency.by_call.create_order]\nseconds = 0.3\n",
    )
    loaded = load_config(
        config,
        environ={
            "TSBOT_VENUE__SIM__FAULTS__BY_CALL": '{"fetch_order": {"server_error": 0.1}}',
            "TSBOT_VENUE__SIM__LATENCY__BY_CALL__FETCH_ORDER__SECONDS": "0.2",
            "TSBOT_PROTECTION__GRACE_SECONDS": "7",
        },
    )
    labels = _labels(render_config(loaded))
    assert labels["venue.sim.volatility_by_symbol BTCUSDT"] == "file"
    assert labels["venue.sim.latency.by_call.create_order seconds"] == "file"
    assert labels["venue.sim.latency.by_call.create_order jitter_seconds"] == "default"
    assert (
        labels["venue.sim.latency.by_call.fetch_order seconds"]
        == "env TSBOT_VENUE__SIM__LATENCY__BY_CALL__FETCH_ORDER__SECONDS"
    )
    assert (
        labels["venue.sim.faults.by_call.fetch_order server_error"] == "env TSBOT_VENUE__SIM__FAULTS__BY_CALL"
    )
    assert labels["venue.sim.faults.by_call.fetch_order timeout_after_accept"] == "default"
    assert labels["protection grace_seconds"] == "env TSBOT_PROTECTION__GRACE_SECONDS"
    assert labels["protection callback_percent"] == "default"
    assert "default" not in {labels[k] for k in labels if "volatility_by_symbol" in k}
    assert loaded.source_of(("venue", "sim", "volatility_by_symbol")) is Source.FILE
    assert loaded.source_of(("venue", "sim", "faults", "by_call")) is Source.ENV


def test_a_dict_set_empty_is_labelled_by_who_set_it(tmp_path: Path) -> None:
    loaded = load_config(None, environ={"TSBOT_VENUE__SIM__LATENCY__BY_CALL": "{}"}, cwd=tmp_path)
    shown = render_config(loaded)
    assert re.search(r"^by_call = \{\}\s+# env TSBOT_VENUE__SIM__LATENCY__BY_CALL$", shown, re.M)
    assert re.search(r"^by_call = \{\}\s+# default$", shown, re.M)  # the faults' one, untouched


def test_config_show_with_dicts_is_toml_that_loads_back_to_the_same_settings(tmp_path: Path) -> None:
    config = _write(
        tmp_path / "c.toml",
        '[venue.sim]\nsymbols = ["BTCUSDT", "ETHUSDT"]\nvolatility_by_symbol = { BTCUSDT = 2.0 }\n'
        "[venue.sim.latency.by_call.create_order]\nseconds = 0.3\n",
    )
    loaded = load_config(
        config,
        environ={
            "TSBOT_VENUE__SIM__FAULTS__BY_CALL": '{"fetch_order": {"server_error": 0.1}}',
            "TSBOT_VENUE__SIM__VOLATILITY_BY_SYMBOL": '{"ETHUSDT": 3.5}',
        },
    )
    shown = render_config(loaded)
    assert tomllib.loads(shown)
    again = load_config(_write(tmp_path / "shown.toml", shown), environ={})
    assert again.settings == loaded.settings
    # The file's dict and the environment's are merged: each value says where it came from.
    assert dict(loaded.settings.venue.sim.volatility_by_symbol) == {"BTCUSDT": 2.0, "ETHUSDT": 3.5}
    labels = _labels(shown)
    assert labels["venue.sim.volatility_by_symbol BTCUSDT"] == "file"
    assert labels["venue.sim.volatility_by_symbol ETHUSDT"] == "env TSBOT_VENUE__SIM__VOLATILITY_BY_SYMBOL"


def test_a_typo_inside_a_json_dict_names_the_variable_the_key_and_the_valid_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(
            None,
            environ={"TSBOT_VENUE__SIM__LATENCY__BY_CALL": '{"create_order": {"typo_key": 1}}'},
            cwd=tmp_path,
        )
    assert caught.value.lines == [
        "TSBOT_VENUE__SIM__LATENCY__BY_CALL: venue.sim.latency.by_call.create_order.typo_key: unknown key "
        "(a typo?): expected one of distribution, seconds, jitter_seconds, sigma, cap_seconds"
    ]


CALL_KINDS = (
    "load_markets, fetch_mark_prices, fetch_balance, fetch_positions, fetch_open_orders, fetch_order, "
    "set_leverage, create_order, cancel_order"
)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TSBOT_VENUE__SIM__FAULTS__BY_CALL", '{"typo_key": {"server_error": 0.1}}'),
        ("TSBOT_VENUE__SIM__FAULTS__BY_CALL__TYPO_KEY__SERVER_ERROR", "0.1"),
    ],
)
def test_a_bad_key_of_a_dict_names_the_variable_that_set_it_and_the_valid_keys(
    tmp_path: Path, name: str, value: str
) -> None:
    config = _write(tmp_path / "c.toml", "[signals]\nwave_size = 9\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ={name: value})
    assert caught.value.lines == [
        f"{name}: venue.sim.faults.by_call.typo_key: unknown key (a typo?): expected one of {CALL_KINDS}"
    ]


def test_a_typo_inside_a_dict_in_the_file_names_the_file_not_a_variable_beside_it(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.toml", "[venue.sim.latency.by_call.create_order]\ntypo_key = 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ={"TSBOT_VENUE__SIM__LATENCY__BY_CALL__FETCH_ORDER__SECONDS": "0.2"})
    assert caught.value.lines == [
        f"{config}: venue.sim.latency.by_call.create_order.typo_key: unknown key (a typo?): expected one of "
        "distribution, seconds, jitter_seconds, sigma, cap_seconds"
    ]

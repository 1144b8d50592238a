"""`[alerts]`: the notification URLs hold tokens, so they follow the secret rules: environment or an
owner-only file, never the config file; masked in `config show`, in logs and in every error line."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from engine.alerts import Alerter
from engine.clock import ManualClock
from engine.config import AlertsSettings, ConfigError, Source, alert_url_secrets, load_config
from engine.config_show import render_config
from engine.logs import RedactingFormatter

TOKEN = "xoxb-1234567890-SECRETPART"
BOT = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"
URLS = f"json://127.0.0.1:8099/hooks/{TOKEN}, tgram://{BOT}/4242"


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_urls_from_the_environment_are_redacted_in_config_show(tmp_path: Path) -> None:
    loaded = load_config(None, environ={"TSBOT_ALERTS__URLS": URLS}, cwd=tmp_path)
    shown = render_config(loaded)
    assert TOKEN not in shown
    assert BOT.split(":")[1] not in shown
    assert re.search(r'^urls = "<redacted>"\s+# env TSBOT_ALERTS__URLS$', shown, re.M)
    assert loaded.source_of(("alerts", "urls")) is Source.ENV


def _config_show(cwd: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    """`tsbot config show` in `cwd` with these TSBOT_ variables only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TSBOT_")} | variables
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "config", "show"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_tsbot_config_show_prints_no_token(tmp_path: Path) -> None:
    result = _config_show(tmp_path, TSBOT_ALERTS__URLS=URLS)
    assert result.returncode == 0, result.stderr
    assert "[alerts]" in result.stdout
    assert 'urls = "<redacted>"' in result.stdout
    assert TOKEN not in result.stdout + result.stderr
    assert BOT not in result.stdout + result.stderr


def test_urls_are_never_read_from_the_config_file(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.toml", f'[alerts]\nurls = "{URLS}"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ={})
    assert caught.value.lines == [
        f"{config}: alerts.urls: secrets are not read from the config file: set TSBOT_ALERTS__URLS in the "
        "environment or alerts.urls_file to a file only you can read, got a value here"
    ]
    assert TOKEN not in str(caught.value)


def test_urls_file_holds_one_url_per_line_and_must_be_owner_only(tmp_path: Path) -> None:
    urls = _write(
        tmp_path / "alerts.urls",
        f"# the operators' channels\njson://127.0.0.1:8099/hooks/{TOKEN}\n\ntgram://{BOT}/4242\n",
        mode=0o644,
    )
    config = _write(tmp_path / "c.toml", f'[alerts]\nurls_file = "{urls}"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ={})
    assert caught.value.lines == [
        f"{config}: alerts.urls_file: secrets file {urls} must be readable by its owner only "
        "(chmod 600), got mode 0644"
    ]
    urls.chmod(0o600)
    loaded = load_config(config, environ={})
    assert loaded.settings.alerts.urls is not None
    assert loaded.settings.alerts.urls.get_secret_value() == (
        f"json://127.0.0.1:8099/hooks/{TOKEN} tgram://{BOT}/4242"
    )
    assert loaded.source_of(("alerts", "urls")) is Source.SECRET_FILE
    assert TOKEN not in render_config(loaded)


def test_a_malformed_url_is_named_by_its_number_never_quoted(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ={"TSBOT_ALERTS__URLS": f"json://h/{TOKEN} not-a-url-{TOKEN}"}, cwd=tmp_path)
    assert caught.value.lines == [
        "TSBOT_ALERTS__URLS: alerts.urls: entry 2 is not a notification URL like json://host/path or "
        "tgram://TOKEN/CHAT, got a secret value"
    ]


def test_a_scheme_apprise_does_not_know_is_refused_at_load_without_the_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(
            None,
            environ={"TSBOT_ALERTS__URLS": f"json://h/x nosuchscheme://{TOKEN}@example.org/x"},
            cwd=tmp_path,
        )
    assert caught.value.lines == [
        "TSBOT_ALERTS__URLS: alerts.urls: entry 2 (nosuchscheme://…) is not a notification URL apprise can "
        "send to: check its scheme and parts"
    ]
    # The alerter refuses it too, should settings reach it another way.
    settings = AlertsSettings(urls=SecretStr(f"json://h/x nosuchscheme://{TOKEN}@example.org/x"))
    with pytest.raises(ConfigError) as caught:
        Alerter.from_settings(settings, ManualClock(), source="sim:default")
    assert caught.value.lines == [
        "alerts.urls: entry 2 (nosuchscheme://…) is not a notification URL apprise can send to: "
        "check its scheme and parts"
    ]


@pytest.mark.parametrize(
    ("second_line", "problem"),
    [
        ("bogus://SECRETTOKEN123", "entry 2 (bogus://…) is not a notification URL apprise can send to"),
        ("tgram://SECRETTOKEN123", "entry 2 (tgram://…) is not a notification URL apprise can send to"),
        ("not-a-url-SECRETTOKEN123", "entry 2 is not a notification URL like json://host/path"),
    ],
)
def test_a_urls_file_is_checked_at_load_as_run_checks_it(
    tmp_path: Path, second_line: str, problem: str
) -> None:
    """A 0600 URLs file whose second line apprise cannot send to: `config show` said nothing (exit 0),
    `tsbot run` refused it (exit 2). README: validated at load, for every command."""
    urls = _write(tmp_path / "alerts.urls", f"json://127.0.0.1:8099/hooks/{TOKEN}\n{second_line}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ={"TSBOT_ALERTS__URLS_FILE": str(urls)}, cwd=tmp_path)
    [line] = caught.value.lines
    assert line.startswith(f"TSBOT_ALERTS__URLS_FILE: alerts.urls_file: secrets file {urls}: {problem}"), line
    assert "SECRETTOKEN123" not in line
    assert TOKEN not in line
    config = _write(tmp_path / "c.toml", f'[alerts]\nurls_file = "{urls}"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ={})
    assert caught.value.lines[0].startswith(f"{config}: alerts.urls_file: secrets file {urls}: {problem}")


def test_tsbot_config_show_refuses_a_url_run_would_refuse(tmp_path: Path) -> None:
    urls = _write(tmp_path / "alerts.urls", f"json://127.0.0.1:8099/hooks/{TOKEN}\nbogus://SECRETTOKEN123\n")
    result = _config_show(tmp_path, TSBOT_ALERTS__URLS_FILE=str(urls))
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert result.stderr == (
        f"TSBOT_ALERTS__URLS_FILE: alerts.urls_file: secrets file {urls}: entry 2 (bogus://…) is not a "
        "notification URL apprise can send to: check its scheme and parts\n"
    )


def test_without_urls_there_is_no_alerter(tmp_path: Path) -> None:
    loaded = load_config(None, environ={}, cwd=tmp_path)
    assert Alerter.from_settings(loaded.settings.alerts, ManualClock(), source="sim:default") is None


def test_a_log_line_quoting_a_url_or_a_piece_of_it_is_masked(tmp_path: Path) -> None:
    loaded = load_config(None, environ={"TSBOT_ALERTS__URLS": URLS}, cwd=tmp_path)
    redactor = RedactingFormatter(loaded.secret_values())

    def written(message: str) -> str:
        return redactor.format(logging.LogRecord("x", logging.WARNING, "f", 1, message, None, None))

    for message in (
        f"POST /hooks/{TOKEN} HTTP/1.1",
        f"sending to json://127.0.0.1:8099/hooks/{TOKEN}",
        f"https://api.telegram.org/bot{BOT}/sendMessage failed",
    ):
        line = written(message)
        assert TOKEN not in line
        assert BOT not in line
        assert "AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw" not in line
    # Host names and short path words stay readable: masking them would mangle every other line.
    # (The whole message as written: two lines formatted a millisecond apart differ by their timestamps.)
    assert written("connected to 127.0.0.1:8099 /hooks").endswith(" - connected to 127.0.0.1:8099 /hooks")


def test_url_secret_pieces() -> None:
    pieces = alert_url_secrets("mailto://operator:pa55word-x@gmail.com?to=ops-team-7@example.org")
    assert "pa55word-x" in pieces
    assert "ops-team-7@example.org" in pieces
    assert "gmail.com" not in pieces  # a host name
    assert "operator" not in pieces  # a plain word: masking it would mangle "paused by the operator"
    assert "ntfy-topic-7781" in alert_url_secrets("ntfy://ntfy-topic-7781")
    assert "secrettopicname" in alert_url_secrets("ntfy://ntfy.sh/secrettopicname")
    slack = alert_url_secrets("slack://T1234ABCD/B5678EFGH/abcdefghijklmnopqrstuvwx/#alerts")
    assert {"T1234ABCD", "B5678EFGH", "abcdefghijklmnopqrstuvwx"} <= set(pieces + slack)
    assert "hooks" not in alert_url_secrets("json://127.0.0.1:8080/hooks/ab12cd34ef56")

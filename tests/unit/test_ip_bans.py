"""The first refusal of an IP ban the venue does not date (Bybit's 403), kept beside the log for the other
processes of the installation (`engine.venues.ip_bans`); real files in a temporary directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from engine.venues.ip_bans import IpBanLedger, ip_ban_record_path

BAN = 600.0


def test_a_ban_is_dated_from_its_first_refusal_across_processes_and_a_new_one_after_it_ends(
    tmp_path: Path,
) -> None:
    path = ip_ban_record_path(str(tmp_path / "logs" / "trading_bot.log"))
    assert path == tmp_path / "logs" / "tsbot-ip-bans.json"
    first = IpBanLedger(path, BAN)
    assert first.ban_until("api.bybit.com", 1_000.0) == 1_600.0
    assert first.ban_until("api.bybit.com", 1_010.0) == 1_600.0  # the same ban's later refusals
    assert path.stat().st_mode & 0o777 == 0o600

    restarted = IpBanLedger(path, BAN)  # another process, 200 s into the ban
    assert restarted.ban_until("api.bybit.com", 1_200.0) == 1_600.0
    assert restarted.ban_until("api-testnet.bybit.com", 1_200.0) == 1_800.0  # another host, its own ban
    # Refused again once the ban should have ended: banned again (or longer than said), dated from now.
    assert restarted.ban_until("api.bybit.com", 1_650.0) == 2_250.0
    assert json.loads(path.read_text()) == {"api.bybit.com": 1_650.0, "api-testnet.bybit.com": 1_200.0}
    assert IpBanLedger(path, BAN).ban_until("api.bybit.com", 1_700.0) == 2_250.0


def test_a_kept_start_in_the_future_or_an_unreadable_record_starts_a_ban_from_now(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tsbot-ip-bans.json"
    path.write_text(json.dumps({"api.bybit.com": 5_000.0}))  # a clock set back since: not believed
    assert IpBanLedger(path, BAN).ban_until("api.bybit.com", 1_000.0) == 1_600.0
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert IpBanLedger(path, BAN).ban_until("api.bybit.com", 2_000.0) == 2_600.0
    assert "cannot be read" in caplog.text
    assert json.loads(path.read_text()) == {"api.bybit.com": 2_000.0}  # written anew


def test_without_a_record_the_ban_is_this_process_s_alone() -> None:
    alone = IpBanLedger(None, BAN)
    assert alone.ban_until("api.bybit.com", 1_000.0) == 1_600.0
    assert alone.ban_until("api.bybit.com", 1_100.0) == 1_600.0
    assert IpBanLedger(None, BAN).ban_until("api.bybit.com", 1_200.0) == 1_800.0

"""The history screen's periods (storage/history.py): local clock hours and local days, by the zone's rules
for each date. A day across a daylight-saving change is 23 or 25 hours; in a zone half an hour off UTC an
hour begins at a UTC :30."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from storage.history import day_periods, hour_periods

BERLIN = ZoneInfo("Europe/Berlin")
KOLKATA = ZoneInfo("Asia/Kolkata")
SANTIAGO = ZoneInfo("America/Santiago")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_days_begin_at_each_dates_own_local_midnight_across_a_change_back() -> None:
    """Berlin leaves summer time on Sun 25 Oct 2026 (03:00 CEST → 02:00 CET): the days before it begin at
    22:00 UTC, the ones after at 23:00 UTC, and the Sunday lasts 25 hours."""
    until = utc(2026, 10, 27, 12)
    periods = day_periods(until, BERLIN)
    assert [since for since, _ in periods] == [
        utc(2026, 10, 20, 22),  # Wed 21 Oct 00:00 CEST
        utc(2026, 10, 21, 22),
        utc(2026, 10, 22, 22),
        utc(2026, 10, 23, 22),
        utc(2026, 10, 24, 22),  # Sun 25 Oct 00:00 CEST
        utc(2026, 10, 25, 23),  # Mon 26 Oct 00:00 CET
        utc(2026, 10, 26, 23),
    ]
    assert f"{periods[0][0].astimezone(BERLIN):%a %d %b %H:%M}" == "Wed 21 Oct 00:00"
    lengths = [end - since for since, end in periods]
    assert lengths == [timedelta(hours=24)] * 4 + [
        timedelta(hours=25),
        timedelta(hours=24),
        until - periods[-1][0],
    ]
    assert all(end == periods[i + 1][0] for i, (_, end) in enumerate(periods[:-1]))  # no gap, no overlap


def test_a_day_across_a_change_forward_is_23_hours() -> None:
    """Berlin: Sun 29 Mar 2026, 02:00 CET → 03:00 CEST."""
    periods = day_periods(utc(2026, 3, 30, 12), BERLIN, days=2)
    assert periods[0] == (utc(2026, 3, 28, 23), utc(2026, 3, 29, 22))
    assert periods[0][1] - periods[0][0] == timedelta(hours=23)


def test_a_midnight_the_clock_skips_begins_the_day_at_the_change() -> None:
    """Santiago moves forward at 00:00 on Sun 6 Sep 2026 (00:00 -04 → 01:00 -03): that day begins at 01:00
    local, 04:00 UTC, and lasts 23 hours."""
    (since, end), _ = day_periods(utc(2026, 9, 7, 12), SANTIAGO, days=2)
    assert since == utc(2026, 9, 6, 4)
    assert end - since == timedelta(hours=23)


def test_hours_are_local_clock_hours_in_a_zone_half_an_hour_off_utc() -> None:
    """Kolkata is UTC+05:30: the hour the chart labels 17h is 17:00–18:00 IST, 11:30–12:30 UTC."""
    until = utc(2026, 12, 6, 12, 10)  # 17:40 IST
    periods = hour_periods(until, KOLKATA)
    assert len(periods) == 24
    assert periods[-1] == (utc(2026, 12, 6, 11, 30), until)
    assert periods[0][0] == utc(2026, 12, 5, 12, 30)  # 18:00 IST the day before
    assert all(f"{since.astimezone(KOLKATA):%M}" == "00" for since, _ in periods)
    assert all(end - since == timedelta(hours=1) for since, end in periods[:-1])
    assert [f"{since.astimezone(KOLKATA):%H}h" for since, _ in periods][-1] == "17h"


def test_an_hour_the_clock_goes_through_twice_is_two_hours() -> None:
    """Berlin on Sun 25 Oct 2026: 02:00–03:00 CEST, then 02:00–03:00 CET; each its own period of an hour."""
    periods = hour_periods(utc(2026, 10, 25, 2, 30), BERLIN, hours=4)  # 03:30 CET
    local = [f"{since.astimezone(BERLIN):%H:%M %Z}" for since, _ in periods]
    assert local == ["01:00 CEST", "02:00 CEST", "02:00 CET", "03:00 CET"]
    assert all(end - since == timedelta(hours=1) for since, end in periods[:-1])


def test_in_utc_the_hours_are_utc_hours_as_before() -> None:
    until = utc(2026, 12, 6, 12, 10)
    periods = hour_periods(until, UTC)
    assert periods[-1] == (utc(2026, 12, 6, 12), until)
    assert periods[0] == (utc(2026, 12, 5, 13), utc(2026, 12, 5, 14))

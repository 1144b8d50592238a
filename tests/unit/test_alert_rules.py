"""The alert rules as pure functions: an observation and explicit times in, alerts out (dedup, escalation,
recovery)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.alerts import (
    AlertKind,
    AlertRules,
    Episode,
    Level,
    NotifyKind,
    Observation,
    Status,
    UncoveredPosition,
    compose,
    conditions,
    step,
    stopped_alert,
)

RULES = AlertRules(
    coverage_below_percent=Decimal(95),
    coverage_critical_percent=Decimal(80),
    uncovered_seconds=30.0,
    escalate_after_seconds=300.0,
    repeat_seconds=1800.0,
)
CALM = Observation(active=20, protected=20)


def uncovered(*positions: tuple[int, str, float], active: int = 20) -> Observation:
    return Observation(
        active=active,
        protected=active - len(positions),
        uncovered=tuple(UncoveredPosition(pid, symbol, age) for pid, symbol, age in positions),
    )


def run(observations: list[tuple[float, Observation]]) -> list[list[tuple[str, Status, Level | None]]]:
    """Each check's alerts as (key, status, level)."""
    episodes: dict[str, Episode] = {}
    out = []
    for now, observed in observations:
        episodes, alerts = step(episodes, conditions(observed, RULES), now, RULES)
        out.append([(a.key, a.status, a.level) for a in alerts])
    return out


def test_a_calm_engine_says_nothing() -> None:
    assert conditions(CALM, RULES) == ()
    assert conditions(Observation(active=0, protected=0), RULES) == ()


def test_a_position_uncovered_past_the_line_is_named_with_its_age() -> None:
    # 29 s: not yet (and one of 20 uncovered is 95.0 %: not below 95).
    assert conditions(uncovered((7, "BTCUSDT", 29.9)), RULES) == ()
    (found,) = conditions(uncovered((7, "BTCUSDT", 31.0)), RULES)
    assert found.kind is AlertKind.POSITION_UNCOVERED
    assert found.key == "position_uncovered:7"
    assert found.level is Level.WARNING
    assert "BTCUSDT uncovered for 31s" in found.text


def test_coverage_below_the_line_is_a_warning_and_below_the_critical_line_critical() -> None:
    two = uncovered((1, "A", 5.0), (2, "B", 5.0))  # 18/20 = 90 %
    (found,) = conditions(two, RULES)
    assert (found.kind, found.level) == (AlertKind.COVERAGE_LOW, Level.WARNING)
    assert "coverage 90.0% (18/20 protected past grace)" in found.text
    five = uncovered(*((i, f"S{i}", 5.0) for i in range(5)))  # 75 %
    (found,) = conditions(five, RULES)
    assert found.level is Level.CRITICAL
    # A wave being protected (nothing past grace) is no alarm, whatever the percentage …
    assert conditions(Observation(active=20, protected=10, protecting=10), RULES) == ()
    # … nor does it count while one old position is uncovered: 50 protected of 51 past grace is 98 %.
    wave = Observation(active=101, protected=50, protecting=50, uncovered=(UncoveredPosition(1, "A", 12.0),))
    assert conditions(wave, RULES) == ()


def test_stop_outs_settling_are_no_coverage_alarm_until_they_last() -> None:
    """Two positions of 36 stopped out in the same second (opme51): without their stops for a moment, while
    their closes settle. Counted against coverage they read 94.4 %, an alert and its recovery seconds later;
    the breaker and the health check judge positions without their stops for a grace period, and so do the
    alerts. Once that lasts, they count."""
    settling = (UncoveredPosition(3, "ATOMUSDT", 0.2), UncoveredPosition(9, "PENDLEUSDT", 0.2))
    assert conditions(Observation(active=36, protected=34, uncovered=settling, brief=2), RULES) == ()
    lasting = (UncoveredPosition(3, "ATOMUSDT", 6.0), UncoveredPosition(9, "PENDLEUSDT", 6.0))
    (found,) = conditions(Observation(active=36, protected=34, uncovered=lasting), RULES)
    assert found.kind is AlertKind.COVERAGE_LOW
    assert "coverage 94.4% (34/36 protected past grace)" in found.text
    assert "2 uncovered past grace" in found.text
    mixed = (UncoveredPosition(3, "ATOMUSDT", 6.0), UncoveredPosition(9, "PENDLEUSDT", 0.2))
    (found,) = conditions(Observation(active=20, protected=18, uncovered=mixed, brief=1), RULES)
    assert "coverage 94.7% (18/19 protected past grace)" in found.text
    assert "1 uncovered past grace" in found.text


def test_a_condition_is_sent_once_while_it_lasts_then_a_reminder_then_recovery() -> None:
    observations = [(t, uncovered((7, "BTCUSDT", 30.0 + t))) for t in (0.0, 1.0, 60.0, 299.0)]
    observations += [(1799.0, uncovered((7, "BTCUSDT", 1829.0)))]
    observations += [(1800.5, uncovered((7, "BTCUSDT", 1830.5)))]
    observations += [(1801.0, CALM), (1802.0, CALM)]
    key = "position_uncovered:7"
    episodes: dict[str, Episode] = {}
    sent = []
    no_escalation = AlertRules(
        RULES.coverage_below_percent, RULES.coverage_critical_percent, 30.0, 10_000.0, 1800.0
    )
    for now, observed in observations:
        episodes, alerts = step(episodes, conditions(observed, no_escalation), now, no_escalation)
        sent.append([(a.key, a.status, a.level) for a in alerts])
    assert sent == [
        [(key, Status.NEW, Level.WARNING)],
        [],
        [],
        [],
        [],
        [(key, Status.REMINDER, Level.WARNING)],
        [(key, Status.RECOVERED, None)],
        [],
    ]


def test_a_warning_that_lasts_escalates_once_and_reminders_keep_the_critical_level() -> None:
    key = "position_uncovered:7"
    sent = run(
        [
            (0.0, uncovered((7, "BTCUSDT", 30.0))),
            (299.0, uncovered((7, "BTCUSDT", 329.0))),
            (300.0, uncovered((7, "BTCUSDT", 330.0))),
            (301.0, uncovered((7, "BTCUSDT", 331.0))),
            (2099.0, uncovered((7, "BTCUSDT", 2129.0))),
            (2101.0, uncovered((7, "BTCUSDT", 2131.0))),
        ]
    )
    assert sent == [
        [(key, Status.NEW, Level.WARNING)],
        [],
        [(key, Status.ESCALATED, Level.CRITICAL)],
        [],
        [],
        [(key, Status.REMINDER, Level.CRITICAL)],
    ]


def test_a_condition_that_worsens_escalates_at_once() -> None:
    sent = run(
        [
            (0.0, uncovered((1, "A", 5.0), (2, "B", 5.0))),  # 90 %
            (1.0, uncovered((1, "A", 6.0), (2, "B", 6.0))),
            (2.0, uncovered(*((i, f"S{i}", 5.0) for i in range(5)))),  # 75 %
            (3.0, uncovered(*((i, f"S{i}", 6.0) for i in range(5)))),
        ]
    )
    assert sent == [
        [("coverage_low", Status.NEW, Level.WARNING)],
        [],
        [("coverage_low", Status.ESCALATED, Level.CRITICAL)],
        [],
    ]


def test_each_position_has_its_own_episode_and_recovery() -> None:
    sent = run(
        [
            (0.0, uncovered((1, "A", 31.0), active=100)),
            (1.0, uncovered((1, "A", 32.0), (2, "B", 31.0), active=100)),
            (2.0, uncovered((2, "B", 32.0), active=100)),
            (3.0, CALM),
        ]
    )
    assert sent == [
        [("position_uncovered:1", Status.NEW, Level.WARNING)],
        [("position_uncovered:2", Status.NEW, Level.WARNING)],
        [("position_uncovered:1", Status.RECOVERED, None)],
        [("position_uncovered:2", Status.RECOVERED, None)],
    ]


def test_a_condition_that_comes_back_after_clearing_is_a_new_episode() -> None:
    sent = run(
        [
            (0.0, Observation(active=3, protected=3, breaker_reason="2 uncovered")),
            (1.0, CALM),
            (2.0, Observation(active=3, protected=3, breaker_reason="2 uncovered")),
        ]
    )
    assert [s[0][1] for s in sent] == [Status.NEW, Status.RECOVERED, Status.NEW]


def test_breaker_lease_database_and_stream_conditions() -> None:
    observed = Observation(
        active=0,
        protected=0,
        breaker_reason="3 of 6 protective order sends failed",
        lease_lost_seconds=12.0,
        database_down_seconds=45.0,
        database_problem="connection refused",
        stale_streams=(("user-data", 75.0),),
    )
    found = {c.kind: c for c in conditions(observed, RULES)}
    assert set(found) == {
        AlertKind.BREAKER_TRIPPED,
        AlertKind.LEASE_LOST,
        AlertKind.DATABASE_DOWN,
        AlertKind.STREAM_STALE,
    }
    assert "3 of 6 protective order sends failed" in found[AlertKind.BREAKER_TRIPPED].text
    assert "45s (connection refused)" in found[AlertKind.DATABASE_DOWN].text
    assert "user-data" in found[AlertKind.STREAM_STALE].text


def test_recovery_says_how_long_it_lasted() -> None:
    episodes, _ = step({}, conditions(uncovered((7, "BTCUSDT", 30.0)), RULES), 100.0, RULES)
    episodes, (recovered,) = step(episodes, (), 195.0, RULES)
    assert recovered.status is Status.RECOVERED
    assert recovered.text.startswith("BTCUSDT is protected again (or closed) after 1m35s")
    assert recovered.lasted_seconds == pytest.approx(95.0)
    assert episodes == {}


def test_engine_stopped_is_critical_with_anything_uncovered() -> None:
    clean = stopped_alert("3 open positions keep their stops on the exchange; uncovered 0", True, None)
    assert clean.level is Level.WARNING
    dirty = stopped_alert("3 open positions …; UNCOVERED 1 (BTCUSDT)", False, None)
    assert dirty.level is Level.CRITICAL
    assert "UNCOVERED 1 (BTCUSDT)" in dirty.text
    forced = stopped_alert("…; uncovered 0", True, "another engine took the account")
    assert forced.level is Level.CRITICAL


def test_one_notification_per_check_with_the_worst_level_in_the_title() -> None:
    _, alerts = step(
        {}, conditions(uncovered(*((i, f"S{i}", 40.0) for i in range(30)), active=40), RULES), 0.0, RULES
    )
    note = compose(alerts, "sim:default")
    assert note.kind is NotifyKind.FAILURE  # coverage 25 %: CRITICAL
    assert note.title.startswith("CRITICAL tsbot sim:default: CRITICAL: coverage 25.0%")
    assert "(+30 more)" in note.title
    assert note.body.count("\n") == 25  # 25 lines and the count of the rest
    assert note.body.endswith("… and 6 more")
    episodes, _ = step({}, conditions(uncovered((1, "A", 40.0)), RULES), 0.0, RULES)
    _, recovered = step(episodes, (), 5.0, RULES)
    assert compose(recovered, "x").kind is NotifyKind.SUCCESS


def test_a_notification_says_when_its_check_was() -> None:
    """Alerts carried no time: a backlog delivered minutes later, once the receiver was back, read as
    current (a reviewer). The check's time is the last line."""
    _, alerts = step({}, conditions(uncovered((7, "BTCUSDT", 45.0)), RULES), 0.0, RULES)
    note = compose(alerts, "sim:default", 1_796_535_364.0)
    assert note.body.endswith("(as of 2026-12-06 05:36:04 UTC)")


@pytest.mark.parametrize(
    ("stop_loss", "trailing", "said"),
    [
        (False, False, "(no confirmed stop on the exchange)"),
        (False, True, "(hard stop not confirmed on the exchange; its trailing stop is)"),
        (True, False, "(trailing stop not confirmed on the exchange; its hard stop is)"),
    ],
)
def test_an_uncovered_position_is_said_to_lack_the_stop_it_lacks(
    stop_loss: bool, trailing: bool, said: str
) -> None:
    """ "No confirmed stop on the exchange" was said of a position whose trailing stop the venue held and the
    engine had confirmed: an operator might place a second one by hand (an operator)."""
    observed = Observation(
        active=20,
        protected=19,
        uncovered=(
            UncoveredPosition(7, "SOLUSDT", 31.0, has_stop_loss=stop_loss, has_trailing_stop=trailing),
        ),
    )
    (found,) = conditions(observed, RULES)
    assert found.text == f"SOLUSDT uncovered for 31s {said}"


# --- properties ------------------------------------------------------------------------------------------

checks = st.lists(
    st.tuples(
        st.floats(min_value=0.1, max_value=900.0),  # seconds since the previous check
        st.sampled_from(["clear", "warning", "critical"]),  # the breaker / coverage state observed
    ),
    min_size=1,
    max_size=60,
)


def _observed(state: str) -> Observation:
    if state == "clear":
        return CALM
    if state == "warning":
        return uncovered((1, "A", 5.0), (2, "B", 5.0))  # 90 %
    return uncovered(*((i, f"S{i}", 5.0) for i in range(6)))  # 70 %


@given(checks)
def test_properties_of_dedup_escalation_and_recovery(sequence: list[tuple[float, str]]) -> None:
    episodes: dict[str, Episode] = {}
    now = 0.0
    open_since: float | None = None
    last_sent = 0.0
    levels: list[Level] = []
    for gap, state in sequence:
        now += gap
        episodes, alerts = step(episodes, conditions(_observed(state), RULES), now, RULES)
        assert len(alerts) <= 1  # one condition: at most one alert per check
        if state == "clear":
            if open_since is None:
                assert alerts == []  # nothing to recover from: no recovery ever comes out of the blue
            else:
                (recovered,) = alerts  # every episode ends with exactly one recovery
                assert recovered.status is Status.RECOVERED
                assert recovered.lasted_seconds == pytest.approx(now - open_since)
            open_since = None
            levels = []
            continue
        if open_since is None:
            (new,) = alerts  # every episode starts with exactly one alert, at its observed level
            assert new.status is Status.NEW
            assert new.level is (Level.CRITICAL if state == "critical" else Level.WARNING)
            open_since, last_sent, levels = now, now, [new.level]
            continue
        expected_critical = state == "critical" or now - open_since >= RULES.escalate_after_seconds
        if alerts:
            (alert,) = alerts
            # Sent again only to escalate, or as a reminder after the repeat interval.
            assert alert.status is Status.ESCALATED or now - last_sent >= RULES.repeat_seconds
            assert alert.level is not None
            assert alert.level.rank >= levels[-1].rank  # never back down within an episode
            last_sent = now
            levels.append(alert.level)
        else:
            assert now - last_sent < RULES.repeat_seconds
        if expected_critical:  # a critical episode is never left said only as a WARNING
            assert levels[-1] is Level.CRITICAL

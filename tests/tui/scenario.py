"""A fixed dashboard scenario for the snapshot tests: a `DashboardFeed` that always shows the same instant.

Snapshots of a live engine are not byte-stable (the database health probe times real I/O, and protection
latencies depend on how fast PostgreSQL answered while virtual time moved), so the screen-shape tests read a
frozen instant instead. It is built with the engine's own pure cores: coverage from
`protection.coverage.coverage_figures`, health from `protection.health.evaluate_health`, the log rows from
real domain events through the same `entry_for_event` the app uses. The key tests run the real engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal
from pathlib import Path

from textual.app import App
from textual.command import CommandList
from textual.pilot import Pilot

from engine.config import Settings, load_config, venue_mode
from engine.engine import (
    EngineSnapshot,
    EngineState,
    PlannedProtection,
    PositionView,
    ProtectionResult,
    StartupReport,
    ViewSelector,
    WaveView,
    coverage_sample,
)
from engine.events import EngineEvent, HealthChanged, PositionClosed, ProtectionFailed, ProtectionTimedOut
from engine.metrics import CallSummary
from protection import health
from protection.coverage import CoverageFigures, PositionCoverage, coverage_figures
from storage.history import (
    DashboardHistory,
    PeriodCoverage,
    ShiftReport,
    WorstSpan,
    day_periods,
    hour_periods,
)
from tui.feed import LogEntry

T0 = 1_700_000_000.0  # the frozen wall clock (2023-11-14 22:13:20 UTC)
MONO = 4_000.0  # the frozen monotonic clock: 4000 s after start
D = Decimal

# symbol, side, qty, entry, mark, stop-loss, has SL, has TS, kind, phase, activation, trail stop, unprotected
ROWS = (
    (
        "SFPUSDT",
        "long",
        "250",
        "0.7842",
        "0.7901",
        "0.7607",
        True,
        True,
        "managed",
        "waiting",
        "0.7960",
        None,
        None,
    ),
    (
        "PIPPINUSDT",
        "short",
        "1200",
        "0.1652",
        "0.1610",
        "0.1702",
        True,
        True,
        "managed",
        "active",
        "0.1627",
        "0.1618",
        None,
    ),
    (
        "1000PEPEUSDT",
        "long",
        "9000",
        "0.010210",
        "0.010105",
        "0.009904",
        True,
        False,
        "managed",
        "pending",
        "0.010363",
        None,
        212.0,
    ),
    (
        "ARBUSDT",
        "long",
        "180",
        "1.1010",
        "1.1245",
        "1.0680",
        True,
        True,
        "native",
        "native",
        "1.1175",
        None,
        None,
    ),
    (
        "SOLUSDT",
        "short",
        "1.4",
        "142.35",
        "141.02",
        "146.62",
        False,
        False,
        "native",
        "pending",
        "140.21",
        None,
        3.0,
    ),
    (
        "DOGEUSDT",
        "long",
        "1300",
        "0.15320",
        "0.15511",
        "0.14860",
        True,
        True,
        "managed",
        "moving",
        "0.15550",
        "0.15470",
        None,
    ),
    (
        "XRPUSDT",
        "short",
        "90",
        "2.2150",
        "2.2301",
        "2.2815",
        True,
        True,
        "native",
        "native",
        "2.1818",
        None,
        None,
    ),
    (
        "OPUSDT",
        "long",
        "110",
        "1.8120",
        "1.7990",
        "1.7576",
        True,
        True,
        "managed",
        "waiting",
        "1.8392",
        None,
        None,
    ),
)


def scenario_settings() -> Settings:
    """Built-in defaults, 30 frames/s so tests wait less, no config file or TSBOT_ variables of the host."""
    return load_config(
        None,
        environ={"TSBOT_TUI__REFRESH_PER_SECOND": "30", "TSBOT_LOGGING__FILE": "/tmp/tsbot-tui-tests/log"},
        cwd=Path("/nonexistent-config-dir"),
    ).settings


def scenario_positions() -> tuple[PositionView, ...]:
    views = []
    for index, row in enumerate(ROWS, start=101):
        symbol, side, qty, entry, mark, stop, has_sl, has_ts, kind, phase, activation, trail, unprotected = (
            row
        )
        direction = 1 if side == "long" else -1
        pnl = ((D(mark) - D(entry)) / D(entry) * 100 * direction).quantize(D("0.01"))
        distance = ((D(activation) - D(mark)) / D(mark) * 100 * direction).quantize(D("0.01"))
        views.append(
            PositionView(
                position_id=index,
                symbol=symbol,
                side=side,
                quantity=D(qty),
                entry_price=D(entry),
                mark_price=D(mark),
                pnl_percent=pnl,
                stop_loss_price=D(stop),
                has_stop_loss=has_sl,
                has_trailing_stop=has_ts,
                trailing_kind=kind,
                trailing_phase=phase,
                activation_price=D(activation),
                distance_to_activation_percent=distance,
                trailing_stop_price=None if trail is None else D(trail),
                covered=has_sl and has_ts,
                unprotected_seconds=unprotected,
                last_error=None if has_ts else "create trailing stop: network error before send",
            )
        )
    return tuple(views)


def figures_of(positions: Iterable[PositionView], grace_seconds: float) -> CoverageFigures:
    """The coverage figures the engine would count for these rows, at the scenario's instant."""
    return coverage_figures(
        (
            PositionCoverage(
                p.position_id,
                p.symbol,
                p.has_stop_loss,
                p.has_trailing_stop,
                filled_at=MONO - (p.unprotected_seconds or 600.0),
                unprotected_since=None if p.covered else MONO - (p.unprotected_seconds or 0.0),
            )
            for p in positions
        ),
        MONO,
        grace_seconds,
    )


def all_protected(figures: CoverageFigures) -> CoverageFigures:
    """The same book's figures with every position's both stops confirmed."""
    active = figures.active
    return dataclasses.replace(
        figures,
        protected=active,
        protecting=0,
        uncovered=0,
        with_stop_loss=active,
        with_trailing_stop=active,
        oldest_unprotected_seconds=None,
        lasting=0,
        ts_coverage_pct=Decimal(100),
        sl_coverage_pct=Decimal(100),
        uncovered_ids=(),
        protecting_with_stop_loss=0,
        protecting_with_trailing_stop=0,
        oldest_unprotected_symbol="",
    )


def scenario_snapshot(settings: Settings) -> EngineSnapshot:
    positions = scenario_positions()
    figures = figures_of(positions, float(settings.protection.grace_seconds))
    measured = health.HealthMeasurements(
        exchange=health.ExchangeMeasurement(
            calls=CallSummary(calls=412, p50_ms=51.0, p99_ms=2210.0, error_rate=0.012, timeouts=2),
            budget_used_percent=4.0,
            banned_for_seconds=0.0,
        ),
        price_feed=health.PriceFeedMeasurement(newest_mark_age_seconds=0.4, open_positions=figures.active),
        database=health.DatabaseMeasurement(round_trip_ms=1.0),
        protection=health.ProtectionMeasurement(
            active_positions=figures.active,
            protected_positions=figures.protected,
            ts_covered=figures.with_trailing_stop,
            sl_covered=figures.with_stop_loss,
            uncovered_past_grace=figures.uncovered,
            oldest_uncovered_seconds=figures.oldest_unprotected_seconds,
            timeouts_last_hour=2,
        ),
        signals=health.SignalsMeasurement(last_wave_age_seconds=12.0, listen_connected=True),
    )
    report = health.evaluate_health(measured, health.HealthThresholds.from_settings(settings.health))
    waves = (
        WaveView(7, T0 - 12, 7, 6, 5, 1, 2210),
        WaveView(6, T0 - 32, 7, 2, 2, 0, 140),
        WaveView(5, T0 - 52, 7, 0, 0, 0, None),
    )
    return EngineSnapshot(
        state=EngineState.RUNNING,
        version="test",
        started_at=T0 - MONO,
        venue=settings.venue.kind.value,
        account=settings.venue.account,
        mode=venue_mode(settings.venue),
        entries_paused=False,
        positions=positions,
        coverage=figures,
        health=tuple(report.components),
        waves=waves,
        taken_at=T0,
        coverage_sample=coverage_sample(figures, datetime.fromtimestamp(T0, UTC)),
    )


def scenario_events() -> list[EngineEvent]:
    return [
        ProtectionTimedOut(
            at=T0 - 230,
            position_id=103,
            symbol="1000PEPEUSDT",
            operation="create trailing stop",
            latency_seconds=10.0,
            outcome="retrying",
        ),
        ProtectionFailed(
            at=T0 - 200,
            position_id=103,
            symbol="1000PEPEUSDT",
            operation="create trailing stop",
            error="network error before send",
            retry_in_seconds=8.0,
        ),
        ProtectionTimedOut(
            at=T0 - 60,
            position_id=104,
            symbol="ARBUSDT",
            operation="create stop-loss",
            latency_seconds=2.2,
            outcome="resolved",
        ),
        PositionClosed(
            at=T0 - 40, position_id=99, symbol="WIFUSDT", exit_reason="stop_loss", realized_pnl=D("-6.12")
        ),
        HealthChanged(
            at=T0 - 20,
            component="protection",
            state="critical",
            summary="7/8 positions protected",
            reason="Position uncovered for 3m32s",
        ),
    ]


def scenario_history(tz: tzinfo) -> DashboardHistory:
    """A fixed history at T0: two dips (one of them an uncovered 3m32s span), an hour and a day nobody
    measured, an hour and a day with nothing open."""
    until = datetime.fromtimestamp(T0, UTC)
    hours = []
    for index, (since, end) in enumerate(hour_periods(until, tz)):
        dip = {20: (D("87.5"), 2, D("212"), D("180")), 22: (D("96.2"), 1, D("45.5"), D("45.5"))}.get(index)
        pct, spans, uncovered, worst = dip or (D("100.0"), 0, D(0), None)
        if index in (3, 4):  # nobody measured; measured with nothing open
            measured = D(0) if index == 3 else D(3600)
            hours.append(PeriodCoverage(since, end, None, None, measured, 0, D(0), None))
            continue
        hours.append(
            PeriodCoverage(since, end, pct, D("75") if dip else pct, D(3600), spans, uncovered, worst)
        )
    days = []
    for index, (since, end) in enumerate(day_periods(until, tz)):
        if index == 1:  # nobody measured
            days.append(PeriodCoverage(since, end, None, None, D(0), 0, D(0), None))
        elif index == 2:  # measured, nothing open
            days.append(PeriodCoverage(since, end, None, None, D(86400), 0, D(0), None))
        else:
            days.append(PeriodCoverage(since, end, D("99.4"), D("75"), D(86400), 3, D("257.5"), D("180")))
    shift = ShiftReport(
        account="sim:default",
        since=until - timedelta(seconds=MONO),
        until=until,
        waves=7,
        opened=21,
        protected=20,
        failures={},
        uncovered_spans=3,
        still_uncovered=1,
        uncovered_seconds=D("257.5"),
        worst=WorstSpan(
            103, "1000PEPEUSDT", until - timedelta(seconds=212), None, D(212), "trailing_stop_missing", None
        ),
        coverage_pct=D("98.9"),
        lowest_coverage_pct=D("75"),
        measured_seconds=D(MONO),
        closes={},
        realized_pnl=D(0),
        closed_without_pnl=0,
    )
    return DashboardHistory(until=until, hours=tuple(hours), days=tuple(days), shift=shift)


class ScenarioFeed:
    """Always the same instant; commands are not part of a screen-shape test."""

    read_only = False
    stop_report = None

    def __init__(self, settings: Settings):
        self.settings = settings
        self._snapshot = scenario_snapshot(settings)
        self.started = False

    async def start(self) -> StartupReport:
        self.started = True
        return StartupReport(restored=7, reprotected=0, adopted=0, failed=1, failed_symbols=("1000PEPEUSDT",))

    async def stop(self) -> None:
        self.started = False

    def snapshot(self, views_of: ViewSelector | None = None) -> EngineSnapshot:
        return self._snapshot

    async def follow(self) -> AsyncIterator[EngineEvent | LogEntry]:
        for event in scenario_events():
            yield event

    def plan_reprotect(self) -> list[PlannedProtection]:
        return []

    async def reprotect_uncovered(self, plan: list[PlannedProtection]) -> list[ProtectionResult]:
        return []

    async def restart_protection(self) -> StartupReport:
        return await self.start()

    def set_entries_paused(self, paused: bool) -> tuple[bool, str]:
        return True, "entries paused" if paused else "entries on"

    async def close_position(self, position_id: int) -> bool:
        return False

    def close_held_for(self, position_id: int) -> float | None:
        return None

    async def position_orders(self, position_id: int) -> list:
        return []

    async def history(self, tz: tzinfo) -> DashboardHistory:
        return scenario_history(tz)

    async def recent_coverage(self, seconds: float) -> list[tuple[float, Decimal | None, bool]]:
        return []  # (the scenario's trend is its snapshot's samples)


async def palette_prompts(app: App[object], pilot: Pilot[object], typed: str) -> list[str]:
    """The command palette opened and `typed` into it: the first line of each prompt offered, once every
    provider has answered."""
    await pilot.press("ctrl+p")
    await pilot.press(*typed)
    palette = app.screen.query_one(CommandList)
    for _ in range(200):
        if palette.option_count:
            break
        await pilot.pause(0.01)
    await pilot.pause(0.2)  # every provider has answered
    return [str(palette.get_option_at_index(i).prompt).splitlines()[0] for i in range(palette.option_count)]

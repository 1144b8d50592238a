"""What a shift looked like, for one account: the figures operators used to assemble by hand from the
monitoring tables (`tsbot report`). Read-only queries over a window [since, until).

Uncovered time comes from `monitoring.uncovered_spans` (each span clipped to the window; one still open counts
up to `until`), the time-weighted coverage from `monitoring.coverage_samples` (each sample stands until the
next one, or for at most `sample_stands_seconds` when none follows: a gap where no engine measured is not
counted as covered or as uncovered, it is left out and `measured_seconds` says how much was measured).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import asyncpg

# The classes of a failed protective order, as `monitoring.events` types `protection_<class>` (the engine's
# `FailureClass` values; a unit test keeps the two lists equal).
PROTECTION_FAILURE_CLASSES = (
    "timeout",
    "unknown_outcome",
    "rejected",
    "server_error",
    "rate_limited",
    "not_sent",
)


@dataclass(frozen=True, slots=True)
class WorstSpan:
    """The longest stretch one position went without its stops, among those overlapping the window."""

    position_id: int
    symbol: str
    started_at: datetime
    ended_at: datetime | None  # None: still without its stops at the end of the window
    seconds: Decimal  # whole span, up to the window's end if it lasts
    reason: str
    ended_by: str | None


@dataclass(frozen=True, slots=True)
class ShiftReport:
    account: str
    since: datetime
    until: datetime
    waves: int  # started in the window that opened a position on this account, or none at all
    opened: int  # this account's positions filled in the window
    protected: int  # of those, how many had both stops confirmed
    failures: dict[str, int]  # failed protective orders by class (every class, 0 included)
    uncovered_spans: int  # spans overlapping the window
    still_uncovered: int  # of them, still open at the window's end
    uncovered_seconds: Decimal  # their time inside the window, summed
    worst: WorstSpan | None
    coverage_pct: Decimal | None  # time-weighted over the measured time with active positions
    lowest_coverage_pct: Decimal | None
    measured_seconds: Decimal  # how much of the window the samples cover
    closes: dict[str, int]  # positions closed in the window, by exit reason
    realized_pnl: Decimal  # of those with a known PnL, before fees (the venue's fees are not recorded)
    closed_without_pnl: int
    # Of the positions opened in the window: how many had a hard stop measured, how many of them were
    # without one for a while after the fill (the stop not on the entry), and the longest such time.
    hard_stop_measured: int = 0
    without_hard_stop: int = 0
    hard_stop_gap_max_seconds: Decimal | None = None
    # Entries ended in the window that opened nothing (refused, not placed, expired), by the reason's head:
    # no position, so no close.
    entries_not_opened: dict[str, int] = field(default_factory=dict)


_SECONDS = Decimal("0.001")
_PCT = Decimal("0.1")


def _seconds(value: Any) -> Decimal:
    return Decimal(value or 0).quantize(_SECONDS, rounding=ROUND_HALF_UP)


async def now(conn: asyncpg.Connection | asyncpg.Pool) -> datetime:
    """The database's time: the window ends there, whatever the reader's clock says."""
    return await conn.fetchval("SELECT now()")


# The coverage series as stretches [from_at, to_at): each sample stands until the next one, the engine's stop
# (its `engine_stopped` event, one that ends the samples: not an engine whose account another took, which
# measures on; nobody measured after it), or `stands` seconds, whichever comes first, and
# never past `until`. A CTE list for `WITH`, over $1 (the account) and the placeholders named.
_STRETCHES = """
        marks AS (
            SELECT at, coverage_pct, false AS stop
            FROM monitoring.coverage_samples
            WHERE account = $1 AND at < {until}::timestamptz
              AND at >= {since}::timestamptz - make_interval(secs => {stands})
            UNION ALL
            SELECT created_at, NULL, true
            FROM monitoring.events
            WHERE account = $1 AND type = 'engine_stopped' AND data ? 'ends_coverage_samples'
              AND created_at < {until}::timestamptz
              AND created_at >= {since}::timestamptz - make_interval(secs => {stands})
        ), samples AS (
            SELECT at, coverage_pct, stop, lead(at) OVER (ORDER BY at, stop) AS next_at FROM marks
        ), stretches AS (
            SELECT coverage_pct, at AS from_at,
                   LEAST(COALESCE(next_at, {until}::timestamptz), at + make_interval(secs => {stands}),
                         {until}::timestamptz) AS to_at
            FROM samples WHERE NOT stop
        )"""


async def shift_report(
    conn: asyncpg.Connection | asyncpg.Pool,
    account: str,
    since: datetime,
    until: datetime,
    *,
    sample_stands_seconds: float,
) -> ShiftReport:
    waves = await conn.fetchval(
        """
        SELECT count(*) FROM monitoring.waves AS w
        WHERE w.started_at >= $2 AND w.started_at < $3
          AND (EXISTS (SELECT 1 FROM monitoring.positions p WHERE p.wave_id = w.id AND p.account = $1)
               OR NOT EXISTS (SELECT 1 FROM monitoring.positions p WHERE p.wave_id = w.id))
        """,
        account,
        since,
        until,
    )
    opened = await conn.fetchrow(
        """
        SELECT count(*) AS opened, count(*) FILTER (WHERE protected_at IS NOT NULL) AS protected,
               count(hard_stop_gap_seconds) AS gap_measured,
               count(*) FILTER (WHERE hard_stop_gap_seconds > 0) AS without_hard_stop,
               max(hard_stop_gap_seconds) AS gap_max
        FROM monitoring.positions
        WHERE account = $1 AND opened_at >= $2 AND opened_at < $3
        """,
        account,
        since,
        until,
    )
    failures = dict.fromkeys(PROTECTION_FAILURE_CLASSES, 0)
    for row in await conn.fetch(
        """
        SELECT substr(type, length('protection_') + 1) AS class, count(*) AS n
        FROM monitoring.events
        WHERE account = $1 AND type = ANY($4::text[]) AND created_at >= $2 AND created_at < $3
        GROUP BY type
        """,
        account,
        since,
        until,
        [f"protection_{c}" for c in PROTECTION_FAILURE_CLASSES],
    ):
        failures[row["class"]] = row["n"]
    spans = await conn.fetchrow(
        """
        SELECT count(*) AS spans,
               count(*) FILTER (WHERE ended_at IS NULL OR ended_at > $3) AS open,
               sum(EXTRACT(EPOCH FROM LEAST(COALESCE(ended_at, $3), $3) - GREATEST(started_at, $2))) AS seconds
        FROM monitoring.uncovered_spans
        WHERE account = $1 AND started_at < $3 AND (ended_at IS NULL OR ended_at > $2)
        """,
        account,
        since,
        until,
    )
    worst_row = await conn.fetchrow(
        """
        SELECT position_id, symbol, started_at, CASE WHEN ended_at <= $3 THEN ended_at END AS ended_at,
               EXTRACT(EPOCH FROM LEAST(COALESCE(ended_at, $3), $3) - started_at) AS seconds, reason,
               CASE WHEN ended_at <= $3 THEN ended_by END AS ended_by
        FROM monitoring.uncovered_spans
        WHERE account = $1 AND started_at < $3 AND (ended_at IS NULL OR ended_at > $2)
        ORDER BY seconds DESC, started_at, id
        LIMIT 1
        """,
        account,
        since,
        until,
    )
    coverage = await conn.fetchrow(
        """
        WITH """
        + _STRETCHES.format(since="$2", until="$3", stands="$4")
        + """, measured AS (
            SELECT coverage_pct, EXTRACT(EPOCH FROM to_at - GREATEST(from_at, $2::timestamptz)) AS seconds
            FROM stretches WHERE to_at > GREATEST(from_at, $2::timestamptz)
        )
        SELECT sum(seconds) AS measured,
               sum(seconds) FILTER (WHERE coverage_pct IS NOT NULL) AS with_positions,
               sum(coverage_pct * seconds) FILTER (WHERE coverage_pct IS NOT NULL) AS weighted,
               min(coverage_pct) AS lowest
        FROM measured
        """,
        account,
        since,
        until,
        float(sample_stands_seconds),
    )
    closes: dict[str, int] = {}
    not_opened: dict[str, int] = {}
    pnl = Decimal(0)
    without_pnl = 0
    for row in await conn.fetch(
        """
        SELECT status,
               CASE WHEN status = 'failed' THEN split_part(COALESCE(exit_reason, 'entry failed'), ':', 1)
                    ELSE COALESCE(exit_reason, status) END AS reason,
               count(*) AS n,
               sum(realized_pnl) AS pnl, count(*) FILTER (WHERE realized_pnl IS NULL) AS without_pnl
        FROM monitoring.positions
        WHERE account = $1 AND status IN ('closed', 'failed') AND closed_at >= $2 AND closed_at < $3
        GROUP BY 1, 2 ORDER BY 3 DESC, 2
        """,
        account,
        since,
        until,
    ):
        if row["status"] == "failed":  # an entry that opened nothing: no position was closed
            not_opened[row["reason"]] = row["n"]
            continue
        closes[row["reason"]] = row["n"]
        pnl += row["pnl"] or 0
        without_pnl += row["without_pnl"]
    with_positions = coverage["with_positions"]
    return ShiftReport(
        account=account,
        since=since,
        until=until,
        waves=waves,
        opened=opened["opened"],
        protected=opened["protected"],
        failures=failures,
        uncovered_spans=spans["spans"],
        still_uncovered=spans["open"],
        uncovered_seconds=_seconds(spans["seconds"]),
        worst=None
        if worst_row is None
        else WorstSpan(
            position_id=worst_row["position_id"],
            symbol=worst_row["symbol"],
            started_at=worst_row["started_at"],
            ended_at=worst_row["ended_at"],
            seconds=_seconds(worst_row["seconds"]),
            reason=worst_row["reason"],
            ended_by=worst_row["ended_by"],
        ),
        coverage_pct=(Decimal(coverage["weighted"]) / Decimal(with_positions)).quantize(
            _PCT, rounding=ROUND_HALF_UP
        )
        if with_positions
        else None,
        lowest_coverage_pct=coverage["lowest"],
        measured_seconds=_seconds(coverage["measured"]),
        closes=closes,
        realized_pnl=pnl,
        closed_without_pnl=without_pnl,
        entries_not_opened=not_opened,
        hard_stop_measured=opened["gap_measured"],
        without_hard_stop=opened["without_hard_stop"],
        hard_stop_gap_max_seconds=None if opened["gap_max"] is None else _seconds(opened["gap_max"]),
    )


@dataclass(frozen=True, slots=True)
class PeriodCoverage:
    """One period (an hour, a day) of an account's history: the same measures as the shift report's, clipped
    to [since, until)."""

    since: datetime
    until: datetime
    coverage_pct: Decimal | None  # time-weighted over the measured time with active positions
    lowest_coverage_pct: Decimal | None
    measured_seconds: Decimal  # 0: no engine measured in this period
    uncovered_spans: int  # spans overlapping the period
    uncovered_seconds: Decimal  # their time inside the period, summed
    worst_seconds: Decimal | None  # the longest one's time inside the period; None without spans


@dataclass(frozen=True, slots=True)
class DashboardHistory:
    """What the dashboard's history screen shows, read at the database's `until`."""

    until: datetime
    hours: tuple[PeriodCoverage, ...]  # the last 24 hours, oldest first; the last one ends at `until`
    days: tuple[PeriodCoverage, ...]  # the last 7 days (from local midnight), oldest first
    shift: ShiftReport | None  # since the running engine started; None when no engine runs

    @property
    def empty(self) -> bool:
        return not any(p.measured_seconds or p.uncovered_spans for p in self.days + self.hours)


async def coverage_by_period(
    conn: asyncpg.Connection | asyncpg.Pool,
    account: str,
    periods: list[tuple[datetime, datetime]],
    *,
    sample_stands_seconds: float,
) -> list[PeriodCoverage]:
    """The coverage and the uncovered spans of each period [since, until), in one query. Samples stand as in
    `shift_report` (until the next one, at most `sample_stands_seconds`); spans are clipped to each period,
    one still open counting up to the period's end."""
    if not periods:
        return []
    rows = await conn.fetch(
        """
        WITH periods AS (
            SELECT * FROM unnest($2::timestamptz[], $3::timestamptz[]) WITH ORDINALITY AS p(from_at, to_at, n)
        ), """
        + _STRETCHES.format(since="$4", until="$5", stands="$6")
        + """, measured AS (
            SELECT p.n, s.coverage_pct,
                   EXTRACT(EPOCH FROM LEAST(s.to_at, p.to_at) - GREATEST(s.from_at, p.from_at)) AS seconds
            FROM periods AS p JOIN stretches AS s ON s.from_at < p.to_at AND s.to_at > p.from_at
        ), coverage AS (
            SELECT n, sum(seconds) AS measured,
                   sum(seconds) FILTER (WHERE coverage_pct IS NOT NULL) AS with_positions,
                   sum(coverage_pct * seconds) FILTER (WHERE coverage_pct IS NOT NULL) AS weighted,
                   min(coverage_pct) AS lowest
            FROM measured GROUP BY n
        ), spans AS (
            SELECT p.n, count(*) AS spans, sum(u.seconds) AS seconds, max(u.seconds) AS worst
            FROM periods AS p
            JOIN LATERAL (
                SELECT EXTRACT(EPOCH FROM LEAST(COALESCE(s.ended_at, p.to_at), p.to_at)
                                          - GREATEST(s.started_at, p.from_at)) AS seconds
                FROM monitoring.uncovered_spans AS s
                WHERE s.account = $1 AND s.started_at < p.to_at AND (s.ended_at IS NULL OR s.ended_at > p.from_at)
            ) AS u ON true
            GROUP BY p.n
        )
        SELECT p.from_at, p.to_at, c.measured, c.with_positions, c.weighted, c.lowest,
               COALESCE(s.spans, 0) AS spans, s.seconds AS uncovered, s.worst
        FROM periods AS p LEFT JOIN coverage AS c USING (n) LEFT JOIN spans AS s USING (n)
        ORDER BY p.n
        """,
        account,
        [since for since, _ in periods],
        [until for _, until in periods],
        min(since for since, _ in periods),
        max(until for _, until in periods),
        float(sample_stands_seconds),
    )
    return [
        PeriodCoverage(
            since=row["from_at"],
            until=row["to_at"],
            coverage_pct=(Decimal(row["weighted"]) / Decimal(row["with_positions"])).quantize(
                _PCT, rounding=ROUND_HALF_UP
            )
            if row["with_positions"]
            else None,
            lowest_coverage_pct=row["lowest"],
            measured_seconds=_seconds(row["measured"]),
            uncovered_spans=row["spans"],
            uncovered_seconds=_seconds(row["uncovered"]),
            worst_seconds=None if row["worst"] is None else _seconds(row["worst"]),
        )
        for row in rows
    ]


def hour_periods(until: datetime, tz: tzinfo, hours: int = 24) -> list[tuple[datetime, datetime]]:
    """The last `hours` clock hours in `tz`, oldest first, in UTC: the last one is the current hour, up to
    `until`. Each begins at a local :00 (in a zone half an hour off UTC, such as Asia/Kolkata, that is a UTC
    :30: the hours an operator reads on the clock, which the chart labels `09h`) and ends where the next
    begins; an hour the clock goes through twice (a daylight-saving change back) is two periods."""
    starts = [_hour_start(until, tz)]
    while len(starts) < hours:
        starts.append(_hour_start(starts[-1] - timedelta(microseconds=1), tz))
    starts.reverse()
    return list(zip(starts, [*starts[1:], until], strict=True))


def _hour_start(moment: datetime, tz: tzinfo) -> datetime:
    """The start of the local clock hour `moment` is in, in UTC (`astimezone` sets the fold of a repeated
    hour, `replace` keeps it)."""
    return moment.astimezone(tz).replace(minute=0, second=0, microsecond=0).astimezone(UTC)


def day_periods(until: datetime, tz: tzinfo, days: int = 7) -> list[tuple[datetime, datetime]]:
    """The last `days` calendar days in `tz`, oldest first, in UTC: the last one is today, up to `until`.
    Each runs from its local midnight to the next one, each found by the zone's rules for its own date (a
    `ZoneInfo`: a day across a daylight-saving change is 23 or 25 hours; a fixed offset would put every
    day before or after the change an hour off)."""
    today = until.astimezone(tz).date()
    periods = []
    for back in range(days - 1, -1, -1):
        day = today - timedelta(days=back)
        periods.append((_midnight(day, tz), min(_midnight(day + timedelta(days=1), tz), until)))
    return periods


def _midnight(day: date, tz: tzinfo) -> datetime:
    """Where `day` begins in `tz`, in UTC. A midnight the clock skips (a change forward at 00:00) is read
    with the offset before the change: the moment of the change, when the day really began."""
    return datetime.combine(day, time(), tzinfo=tz).astimezone(UTC)


async def dashboard_history(
    conn: asyncpg.Connection | asyncpg.Pool,
    account: str,
    *,
    shift_since: datetime | None,
    tz: tzinfo,
    sample_stands_seconds: float,
) -> DashboardHistory:
    """The history screen's figures: per hour (24 h) and per day (7 days), both local to `tz`, and the
    current shift, at the database's now."""
    until = await now(conn)
    hours = await coverage_by_period(
        conn, account, hour_periods(until, tz), sample_stands_seconds=sample_stands_seconds
    )
    days = await coverage_by_period(
        conn, account, day_periods(until, tz), sample_stands_seconds=sample_stands_seconds
    )
    shift = None
    if shift_since is not None and shift_since < until:
        shift = await shift_report(
            conn, account, shift_since, until, sample_stands_seconds=sample_stands_seconds
        )
    return DashboardHistory(until=until, hours=tuple(hours), days=tuple(days), shift=shift)

"""`y`: how well the account was covered over time, read from the database (`monitoring.coverage_samples`,
`monitoring.uncovered_spans`) through the feed, so it works read-only too.

The current shift's summary, a bar chart of coverage per hour over the last 24 hours (textual-plotext: the
eye finds a dip faster than in a column of numbers), then the figures per hour and per day: time-weighted coverage, the lowest
sample, how many uncovered spans touched the period, their time inside it, and the longest one's.
Re-read every 10 seconds (the engine samples every 10 s). Plain text that wraps: never cut at 80 columns.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import UTC, datetime, tzinfo
from decimal import Decimal
from typing import ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static
from textual_plotext import PlotextPlot
from textual_plotext.plot import Plot

from storage.history import DashboardHistory, PeriodCoverage, ShiftReport
from tui import formatting

REFRESH_SECONDS = 10.0
DIALOG_SHARE = 0.92  # .dialog's max-height in app.tcss
DIALOG_CHROME_LINES = 2 + 2 + 1  # border, padding, the key line
NOT_MEASURED = "·"  # no engine measured in that hour
NO_POSITIONS = "-"  # measured, nothing to cover

REASONS = {
    "not_yet_protected": "not yet protected",
    "stop_loss_missing": "stop-loss missing",
    "trailing_stop_missing": "trailing stop missing",
    "both_missing": "both stops missing",
    "unverified": "stops unverified (in doubt)",
}

EMPTY = (
    "No history yet: no engine measured coverage and no position went without its stops in the last 7 days. "
    "A running engine samples coverage every 10 seconds."
)


def local_zone() -> tzinfo:
    """The operator's time zone with its rules, as the C library reads it: `TZ` when it names a zone
    (`Europe/Berlin`, `:Europe/Berlin`, or a zone file's path), else `/etc/localtime` when `TZ` is unset.
    Only when neither gives a zone (a POSIX rule string in `TZ`, no tz database) the offset of this instant,
    which is right for today only: a day before a daylight-saving change would be cut an hour off."""
    name = os.environ.get("TZ")
    path = "/etc/localtime" if name is None else name.removeprefix(":")
    try:
        if path.startswith("/"):
            with open(path, "rb") as file:
                return ZoneInfo.from_file(file, key=None if name is None else path)
        if path:
            return ZoneInfo(path)
    except (OSError, ValueError, ZoneInfoNotFoundError):
        pass
    return datetime.now().astimezone().tzinfo or UTC


def _pct(value: Decimal | None) -> str:
    return "—" if value is None else f"{value:.1f}%"


def _coverage(period: PeriodCoverage) -> str:
    if period.coverage_pct is not None:
        return _pct(period.coverage_pct)
    return "no pos" if period.measured_seconds else "—"


def _time_without_stops(seconds: Decimal, spans: int) -> str:
    """Time without stops, in whole seconds as every duration here; a span under a second is not "0s"
    beside "1 uncovered span" (the window clips a span to what lies inside it)."""
    return "<1s" if spans and seconds < 1 else formatting.duration(float(seconds))


def shift_lines(shift: ShiftReport | None, tz: tzinfo) -> list[str]:
    if shift is None:
        return ["This shift: no engine is running."]
    seconds = (shift.until - shift.since).total_seconds()
    start = shift.since.astimezone(tz)
    lines = [
        f"This shift: since {start:%Y-%m-%d %H:%M} ({formatting.duration(seconds)})",
        # Said with the figure, as `tsbot report` says it: a position inside its grace period is no
        # uncovered span, yet counts as not covered (an operator read "lowest 0.0%" beside "uncovered
        # spans 0" as an alarm without a cause).
        f"  coverage {_pct(shift.coverage_pct)} time-weighted, lowest {_pct(shift.lowest_coverage_pct)} "
        f"(inside grace counted as not covered), measured {formatting.duration(float(shift.measured_seconds))}",
        f"  uncovered spans {shift.uncovered_spans}"
        + (f" ({shift.still_uncovered} still open)" if shift.still_uncovered else "")
        + f", {_time_without_stops(shift.uncovered_seconds, shift.uncovered_spans)} without stops",
    ]
    worst = shift.worst
    if worst is not None:
        how = "still uncovered" if worst.ended_at is None else f"ended: {worst.ended_by}"
        lines.append(
            f"  worst: {worst.symbol} {_time_without_stops(worst.seconds, 1)}, "
            f"{REASONS.get(worst.reason, worst.reason)}, {how}"
        )
    return lines


def draw_chart(plt: Plot, hours: Sequence[PeriodCoverage], tz: tzinfo) -> None:
    """Coverage per hour as bars on an absolute 0–100 % scale, oldest left. An hour nobody measured is marked
    `·` on the axis, an hour without open positions `-`: a gap says why it is a gap, never a 0 % or a 100 %."""
    plt.clear_figure()
    xs = [i for i, p in enumerate(hours) if p.coverage_pct is not None]
    plt.bar(xs, [float(hours[i].coverage_pct or 0) for i in xs], width=0.5)
    for index, period in enumerate(hours):
        if period.coverage_pct is None:
            plt.text(NO_POSITIONS if period.measured_seconds else NOT_MEASURED, index, 3)
    plt.xlim(-0.5, len(hours) - 0.5)
    plt.ylim(0, 100)
    plt.yticks([0, 50, 100], ["0%", "50%", "100%"])
    ticks = [i for i in range(len(hours)) if i % 6 == 0 or i == len(hours) - 1]
    plt.xticks(ticks, [f"{hours[i].since.astimezone(tz):%H}h" for i in ticks])
    plt.title("coverage per hour, last 24 hours")


LEGEND = f"bars: coverage of the hour;  {NOT_MEASURED} not measured;  {NO_POSITIONS} no open positions"


HEADER = f"{'':<11}{'coverage':>9}{'lowest':>8}{'spans':>7}{'uncovered':>11}{'worst':>8}"


def period_line(label: str, period: PeriodCoverage) -> str:
    uncovered = (
        _time_without_stops(period.uncovered_seconds, period.uncovered_spans)
        if period.uncovered_spans
        else "—"
    )
    worst = _time_without_stops(period.worst_seconds, 1) if period.worst_seconds is not None else "—"
    return (
        f"{label:<11}{_coverage(period):>9}{_pct(period.lowest_coverage_pct):>8}"
        f"{period.uncovered_spans:>7}{uncovered:>11}{worst:>8}"
    )


def hour_label(period: PeriodCoverage, tz: tzinfo) -> str:
    return f"{period.since.astimezone(tz):%H:%M}"


def day_label(period: PeriodCoverage, tz: tzinfo) -> str:
    return f"{period.since.astimezone(tz):%a %d %b}"


def summary(history: DashboardHistory, tz: tzinfo) -> Text:
    """The text above the chart: the shift, or that there is no history at all."""
    lines = shift_lines(history.shift, tz)
    if history.empty:
        lines += ["", EMPTY]
    return Text("\n".join(lines))


def tables(history: DashboardHistory, tz: tzinfo) -> Text:
    """The figures below the chart: per day, then per hour, newest first."""
    lines = [LEGEND, "", "Per day, last 7 days (newest first)"]
    lines.append(HEADER.replace(" " * 11, f"{'day':<11}", 1))
    lines.extend(period_line(day_label(p, tz), p) for p in reversed(history.days))
    lines += ["", "Per hour, last 24 hours (newest first)"]
    lines.append(HEADER.replace(" " * 11, f"{'hour':<11}", 1))
    lines.extend(period_line(hour_label(p, tz), p) for p in reversed(history.hours))
    lines.append("")
    lines.append(
        "coverage: time-weighted over the measured time with open positions (a position inside its grace "
        "period counts as not covered); lowest: the lowest sample; "
        "spans: uncovered spans touching the period; uncovered: their time inside it; worst: the longest's."
    )
    return Text("\n".join(lines))


class HistoryScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,enter,q", "close", "Close", show=False)]

    def __init__(self, tz: tzinfo | None) -> None:
        super().__init__(classes="dialog-screen")
        self.tz: tzinfo = tz or local_zone()
        self.history: DashboardHistory | None = None
        self.error: str | None = None

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide-dialog", id="history-dialog") as dialog:
            dialog.border_title = "Coverage history"
            with VerticalScroll(id="history-scroll"):
                yield Static("reading the history from the database…", id="history-summary", markup=False)
                yield PlotextPlot(id="history-chart")
                yield Static("", id="history-tables", markup=False)
            yield Static("esc / enter: close · ↑ ↓ pgup pgdn: scroll", classes="dialog-keys", markup=False)

    def fit(self) -> None:
        """The scroll area takes what the dialog leaves on this terminal (92 % of its lines, less the border,
        the padding and the key line): at 24 lines a fixed height pushed the key line off the screen."""
        lines = int(self.app.size.height * DIALOG_SHARE) - DIALOG_CHROME_LINES
        self.query_one("#history-scroll").styles.max_height = max(4, lines)

    def on_resize(self) -> None:
        self.fit()

    def on_mount(self) -> None:
        self.fit()
        self.query_one("#history-chart").display = False
        self.query_one("#history-tables").display = False
        self.query_one("#history-scroll").focus()
        self.reload()
        self.set_interval(REFRESH_SECONDS, self.reload, name="history refresh")

    def reload(self) -> None:
        self.run_worker(self._read(), exclusive=True, group="history")

    async def _read(self) -> None:
        feed = getattr(self.app, "feed", None)
        try:
            if feed is None:
                raise RuntimeError("the dashboard has no feed yet")
            self.history = await feed.history(self.tz)
            self.error = None
        except Exception as exc:  # the database may be away: say so, keep what was shown
            self.error = " ".join(str(exc).split())[:200] or type(exc).__name__
        self.paint()

    def paint(self) -> None:
        text = Text()
        if self.error is not None:
            text.append(f"Could not read the history: {self.error}\n", style="bold red")
            if self.history is not None:
                text.append("Shown below: the last history read.\n\n")
        history = self.history
        if history is not None:
            text.append_text(summary(history, self.tz))
        self.query_one("#history-summary", Static).update(text)
        shown = history is not None and not history.empty
        chart = self.query_one("#history-chart", PlotextPlot)
        chart.display = shown
        self.query_one("#history-tables").display = shown
        if history is not None and shown:
            draw_chart(chart.plt, history.hours, self.tz)
            chart.refresh()
            self.query_one("#history-tables", Static).update(tables(history, self.tz))

    def action_close(self) -> None:
        self.dismiss(None)

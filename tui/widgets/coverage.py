"""The coverage gauge: TS and SL coverage as big figures, a one-hour trend, the uncovered count.

Figures are coloured by the same pure rule the health check uses (`protection.health.evaluate_protection`)
so the gauge and the health panel can never disagree about whether coverage is an alarm (F11).
"""

from __future__ import annotations

from collections import deque
from decimal import Decimal
from typing import ClassVar

from rich.cells import cell_len
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widget import Widget
from textual.widgets import Digits, Label

from engine.engine import EngineSnapshot
from protection import health
from protection.coverage import CoverageFigures
from tui import formatting
from tui.widgets.styling import component_style

TREND_WINDOW_SECONDS = 3600.0
BARS = "▁▂▃▄▅▆▇█"
STATE_CLASSES = ("-healthy", "-protecting", "-degraded", "-critical", "-unknown")


class CoverageTrend(Widget):
    """Coverage over the last hour on an absolute 0–100 % scale, one column per time slice, each column
    the worst sample in its slice. (Textual's Sparkline scales to the data's own min–max, which would draw
    a steady 100 % as a row of floor bars: the wrong message for this figure.)"""

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "trend--full",
        "trend--protecting",
        "trend--short",
        "trend--critical",
        "trend--empty",
    }

    def __init__(self, *, critical_percent: Decimal, id: str | None = None):
        super().__init__(id=id)
        self._critical = float(critical_percent)
        # (when, coverage %, whether a position was uncovered past its grace period then)
        self._samples: deque[tuple[float, float | None, bool]] = deque()
        self._now = 0.0

    def add_sample(self, at: float, value: Decimal | None, *, uncovered: bool = False) -> bool:
        """Record one sample (the engine's history sample: a new one every 10 s); True when
        it was kept, False for one already drawn. `uncovered`: some position was uncovered past its grace
        period (else a shortfall is positions still protecting, no alarm: the health rule's and the
        digits' reading)."""
        if self._samples and at <= self._samples[-1][0]:
            return False
        self._samples.append((at, None if value is None else float(value), uncovered))
        while self._samples and at - self._samples[0][0] > TREND_WINDOW_SECONDS:
            self._samples.popleft()
        self._now = at
        self.refresh()
        return True

    def seed(self, samples: list[tuple[float, Decimal | None, bool]]) -> None:
        """Samples recorded before this dashboard started (the last hour from the database), merged under
        those drawn since: the "low" of the last hour started over at each start and read 100 % minutes
        after a dip to 70 % (an operator)."""
        merged = {at: (at, None if v is None else float(v), uncovered) for at, v, uncovered in samples}
        merged.update({sample[0]: sample for sample in self._samples})
        latest = max(merged, default=self._now)
        self._samples = deque(
            sample for at, sample in sorted(merged.items()) if latest - at <= TREND_WINDOW_SECONDS
        )
        self._now = max(self._now, latest)
        self.refresh()

    def lowest(self) -> tuple[float, bool] | None:
        """The lowest coverage of the window, and whether a position was uncovered past grace then."""
        values = [(v, uncovered) for _, v, uncovered in self._samples if v is not None]
        return min(values, key=lambda sample: (sample[0], not sample[1])) if values else None

    def slices(self) -> list[tuple[float, str] | None]:
        """One per column, oldest first: its lowest sample and how it is drawn (`full`, `protecting`,
        `short`, `critical`), or None for a column without a sample."""
        width = max(1, self.size.width)
        columns: list[list[float]] = [[] for _ in range(width)]
        alarms = [False] * width
        slice_seconds = TREND_WINDOW_SECONDS / width
        for at, value, uncovered in self._samples:
            if value is None:
                continue
            age = self._now - at
            index = width - 1 - int(age // slice_seconds)
            if 0 <= index < width:
                columns[index].append(value)
                alarms[index] = alarms[index] or uncovered
        drawn: list[tuple[float, str] | None] = []
        for values, alarm in zip(columns, alarms, strict=True):
            if not values:
                drawn.append(None)
                continue
            low = min(values)
            if low >= 100:
                kind = "full"
            elif not alarm:  # short only by positions inside their grace period: the wave's own stops
                kind = "protecting"
            else:
                kind = "critical" if low < self._critical else "short"
            drawn.append((low, kind))
        return drawn

    def render(self) -> Text:
        text = Text()
        empty = component_style(self, "trend--empty") or ""  # plain for a frame before styles apply
        for drawn in self.slices():
            if drawn is None:
                text.append("·", empty)
                continue
            low, kind = drawn
            bar = BARS[min(len(BARS) - 1, int(low / 100 * (len(BARS) - 1) + 0.5))]
            text.append(bar, component_style(self, f"trend--{kind}") or "")
        return text


class CoverageGauge(Vertical):
    def __init__(self, *, thresholds: health.HealthThresholds, id: str | None = None):
        super().__init__(id=id)
        self._thresholds = thresholds
        self._last: tuple[CoverageFigures, bool] | None = None
        self._figures = {name: Vertical(classes="figure", id=f"{name}-figure") for name in ("ts", "sl")}
        self._labels = {
            name: Label(f"{name.upper()} coverage %", id=f"{name}-label", classes="figure-label")
            for name in ("ts", "sl")
        }
        self._digits = {name: Digits("--", id=f"{name}-digits") for name in ("ts", "sl")}
        self._trend = CoverageTrend(critical_percent=thresholds.coverage_critical_percent, id="trend")
        self._uncovered = Label("", id="uncovered")
        self._texts: dict[str | None, str] = {}

    def compose(self) -> ComposeResult:
        with Horizontal(id="figures"):
            for name in ("ts", "sl"):
                with self._figures[name]:
                    yield self._labels[name]
                    yield self._digits[name]
        yield self._trend
        yield self._uncovered

    def on_mount(self) -> None:
        self.border_title = "Coverage"

    def seed_trend(self, samples: list[tuple[float, Decimal | None, bool]]) -> None:
        """The last hour's samples recorded before this dashboard started (`CoverageTrend.seed`)."""
        if samples:
            self._trend.seed(samples)
            self._say_low()

    def _say_low(self) -> None:
        low = self._trend.lowest()
        self.border_subtitle = "last hour" + (
            ""
            if low is None
            else f", low {low[0]:.1f}%" + ("" if low[1] or low[0] >= 100 else " (protecting)")
        )

    def show(self, snapshot: EngineSnapshot) -> None:
        figures = snapshot.coverage
        trend = self._trend
        # The engine's own samples, those the history screen reads: one "low" for the hour, not two taken
        # at different instants of a wave (a dip of a second is in one set of samples and not the other).
        sample = snapshot.coverage_sample
        if sample is not None and trend.add_sample(
            sample.at.timestamp(), sample.coverage_pct, uncovered=sample.uncovered > 0
        ):
            self._say_low()
        # The venue's stops not checked for a while (reconcile passes failing): a full count is not green.
        unchecked = any(
            c.component is health.Component.PROTECTION and c.measurements.get("unchecked_seconds") is not None
            for c in snapshot.health
        )
        if (figures, unchecked) == self._last:
            return
        self._last = (figures, unchecked)
        verdict = self.verdict(figures)
        for name, pct, count in (
            ("ts", figures.ts_coverage_pct, figures.with_trailing_stop),
            ("sl", figures.sl_coverage_pct, figures.with_stop_loss),
        ):
            self._figure(name, pct, count, figures, verdict, unchecked=unchecked)
        label = self._uncovered
        if figures.uncovered:
            self._set(
                label,
                f"UNCOVERED {figures.uncovered}, oldest "
                f"{formatting.duration(figures.oldest_unprotected_seconds)}"
                + (f" (+{figures.protecting} protecting)" if figures.protecting else ""),
            )
        else:
            self._set(
                label, "uncovered 0" + (f" ({figures.protecting} protecting)" if figures.protecting else "")
            )
        label.set_class(figures.uncovered > 0, "-alarm")
        self.set_class(verdict is health.HealthState.CRITICAL, "-critical")

    def verdict(self, figures: CoverageFigures) -> health.HealthState:
        """The protection rule on these figures: the same verdict the health panel will show."""
        measured = health.ProtectionMeasurement.of(figures, 0)
        return health.evaluate_protection(measured, self._thresholds).state

    def _figure(
        self,
        name: str,
        pct: Decimal | None,
        count: int,
        figures: CoverageFigures,
        verdict: health.HealthState,
        *,
        unchecked: bool = False,
    ) -> None:
        self._set(self._digits[name], "--" if pct is None else f"{pct:.1f}")
        self._set(self._labels[name], f"{name.upper()} coverage % {count}/{figures.active}")
        if pct is None:
            state = "-unknown"
        elif count == figures.active:
            state = "-degraded" if unchecked else "-healthy"
        elif figures.uncovered == 0:
            state = "-protecting"  # short only by positions still inside their grace period
        else:
            state = f"-{verdict.value}" if verdict is not health.HealthState.HEALTHY else "-degraded"
        figure = self._figures[name]
        for cls in STATE_CLASSES:
            figure.set_class(cls == state, cls)

    def _set(self, label: Label | Digits, text: str) -> None:
        """Only a changed text costs a repaint, and only a changed width a layout pass: the uncovered line's
        oldest age changes every second, and a layout pass of the whole screen blocked the event loop (the
        engine's ticks) for ~30 ms at 1 000 positions (bench/tui_render.py)."""
        before = self._texts.get(label.id)
        if before != text:
            self._texts[label.id] = text
            if isinstance(label, Label):
                label.update(text, layout=before is None or cell_len(before) != cell_len(text))
            else:
                label.update(text)

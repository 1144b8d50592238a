"""Rolling measurements of venue calls, for the health rules: latency percentiles, error rate, timeouts.

The shell times each exchange call and records its outcome here; the health check asks for a summary
every few seconds. Time enters only as arguments (`at`, `now`: seconds on one clock, normally the
engine's monotonic clock), so nothing here reads a clock, sleeps or does I/O, and tests replay any
timeline without waiting.

Memory is bounded two ways: samples older than the window are dropped as new ones arrive (and on every
summary), and at most `max_samples` are kept. Under a flood beyond the cap the summary describes the most
recent `max_samples` calls of the window; `CallStats.dropped` counts what the cap pushed out early, so
the truncation is visible rather than silent (F12).
"""

from __future__ import annotations

import bisect
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "EMPTY_SUMMARY",
    "LATENCY_BUCKETS",
    "CallStats",
    "CallSummary",
    "CumulativeHistogram",
    "EventCounter",
    "HistogramCounts",
    "nearest_rank",
]

# Upper bounds (seconds) of the cumulative latency buckets exported to Prometheus: from a loopback answer to
# the longest call budget (`protection.call_timeout_seconds` is at most 120 s).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)


def nearest_rank(sorted_values: list[float], percent: int) -> float:
    """The `percent`-th percentile of ascending `sorted_values` by the nearest-rank method: the smallest
    value with at least `percent` % of the values at or below it. Always an observed value (no
    interpolation), so "p99 2104 ms" means a call really took 2104 ms."""
    if not sorted_values:
        raise ValueError("no values")
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    rank = -(-percent * len(sorted_values) // 100)  # ceil without floats
    return sorted_values[rank - 1]


@dataclass(frozen=True, slots=True)
class CallSummary:
    """Venue calls completed in the window. With no calls, the percentiles and the error rate are None:
    there is nothing to measure, which the health rules report as UNKNOWN, never as healthy."""

    calls: int
    p50_ms: float | None
    p99_ms: float | None
    error_rate: float | None  # a fraction of `calls`: 0.25 means 25 % of the calls failed
    timeouts: int
    # Calls answered as expected since the newest failed one (all of them when none failed): a venue that
    # recovered says so at once, while its old errors stay in the window's rate for minutes.
    ok_since_last_error: int = 0
    # The kinds of call that failed, most failures first (at most three): which calls the rate is of.
    failed_kinds: tuple[tuple[str, int], ...] = ()

    @property
    def failed_words(self) -> str:
        """ "fetch_open_orders 5, create_order 1": what failed, for a line that gives the error rate, with
        "and 2 more" for the failures of kinds not named (a list cut short silently reads as complete)."""
        named = ", ".join(f"{kind} {count}" for kind, count in self.failed_kinds)
        more = self.errors - sum(count for _, count in self.failed_kinds)
        return f"{named} and {more} more" if self.failed_kinds and more > 0 else named

    @property
    def errors(self) -> int:
        return 0 if self.error_rate is None else round(self.error_rate * self.calls)


EMPTY_SUMMARY = CallSummary(calls=0, p50_ms=None, p99_ms=None, error_rate=None, timeouts=0)


@dataclass(frozen=True, slots=True)
class HistogramCounts:
    """One label's cumulative figures since the process started: `buckets[i]` calls took at most
    `bounds[i]` seconds (cumulative, as Prometheus wants them; `count` is the +Inf bucket)."""

    bounds: tuple[float, ...]
    buckets: tuple[int, ...]
    count: int
    total_seconds: float
    errors: int
    timeouts: int


class CumulativeHistogram:
    """Counts that only grow, per label (a call kind, a lane): how many observations fell at or below each
    bound, their sum, and how many were errors or timeouts. Unlike the rolling window above nothing expires,
    so a scraper's `rate()` sees every call; memory is one small list per label. O(log buckets) per record."""

    __slots__ = ("_counts", "bounds")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError("bounds must be ascending and distinct")
        self.bounds = tuple(float(b) for b in bounds)
        # label -> [per-bucket (not cumulative) counts..., overflow, count, errors, timeouts], sum
        self._counts: dict[str, tuple[list[int], list[float]]] = {}

    def record(self, label: str, seconds: float, *, ok: bool = True, timed_out: bool = False) -> None:
        entry = self._counts.get(label)
        if entry is None:
            entry = self._counts[label] = ([0] * (len(self.bounds) + 4), [0.0])
        counts, total = entry
        counts[bisect.bisect_left(self.bounds, seconds)] += 1  # bucket i holds bounds[i-1] < s <= bounds[i]
        n = len(self.bounds)  # counts[n] is the overflow bucket
        counts[n + 1] += 1
        counts[n + 2] += not ok
        counts[n + 3] += timed_out
        total[0] += seconds

    def labels(self) -> list[str]:
        return sorted(self._counts)

    def counts(self, label: str) -> HistogramCounts:
        entry = self._counts.get(label)
        n = len(self.bounds)
        if entry is None:
            return HistogramCounts(self.bounds, (0,) * n, 0, 0.0, 0, 0)
        counts, total = entry
        cumulative, running = [], 0
        for value in counts[:n]:
            running += value
            cumulative.append(running)
        return HistogramCounts(
            self.bounds, tuple(cumulative), counts[n + 1], total[0], counts[n + 2], counts[n + 3]
        )


class CallStats:
    """Outcomes of venue calls over the last `window_s` seconds.

    `record(at, latency_s, ok, kind, timed_out=False)` is called when a call completes: `at` is the
    completion time, `latency_s` how long it took, `ok` whether the venue answered as expected, `kind`
    which call it was (`"create_order"`, `"fetch_positions"` …), `timed_out` whether we gave up waiting
    (such a call is also not ok). Record in completion order; amortised O(1).

    `histogram` keeps every call's latency since start in cumulative buckets per kind (nothing expires
    there): what `/metrics` exports.

    `summary(now)` covers every call, `summary(now, kind="create_order")` one kind; it sorts the
    window's latencies (O(n log n) over a few thousand samples at most, every few seconds)."""

    __slots__ = ("_samples", "dropped", "histogram", "max_samples", "window_s")

    def __init__(self, window_s: float = 300.0, max_samples: int = 10_000) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        if max_samples < 1:
            raise ValueError(f"max_samples must be at least 1, got {max_samples}")
        self.window_s = float(window_s)
        self.max_samples = max_samples
        self.dropped = 0  # samples the cap evicted while still inside the window
        # (at, latency_s, ok, kind, timed_out): a tuple per call, the cheapest record in CPython
        self._samples: deque[tuple[float, float, bool, str, bool]] = deque()
        self.histogram = CumulativeHistogram()  # every call since start, per kind: the metrics endpoint

    def __len__(self) -> int:
        """Samples currently held (expired ones go on the next `record` or `summary`)."""
        return len(self._samples)

    def record(self, at: float, latency_s: float, ok: bool, kind: str, *, timed_out: bool = False) -> None:
        if not latency_s >= 0:  # also refuses NaN
            raise ValueError(f"latency_s must be a non-negative number, got {latency_s}")
        samples = self._samples
        self._expire(at)
        if len(samples) >= self.max_samples:
            samples.popleft()
            self.dropped += 1
        samples.append((at, latency_s, ok, kind, timed_out))
        self.histogram.record(kind, latency_s, ok=ok, timed_out=timed_out)

    def summary(self, now: float, kind: str | None = None, *, last_s: float | None = None) -> CallSummary:
        """The calls (of `kind`, or all) completed in the window ending at `now`, or in its last `last_s`
        seconds; expires older samples."""
        self._expire(now)
        samples: Sequence[tuple[float, float, bool, str, bool]] = self._samples
        if last_s is not None:
            samples = [s for s in samples if s[0] > now - last_s]
        if kind is not None:
            samples = [s for s in samples if s[3] == kind]
        if not samples:
            return EMPTY_SUMMARY
        latencies = sorted(sample[1] for sample in samples)
        errors = sum(1 for sample in samples if not sample[2])
        timeouts = sum(1 for sample in samples if sample[4])
        calls = len(samples)
        ok_since = 0
        for sample in reversed(samples):
            if not sample[2]:
                break
            ok_since += 1
        failed = Counter(sample[3] for sample in samples if not sample[2]) if errors else Counter()
        return CallSummary(
            calls=calls,
            p50_ms=nearest_rank(latencies, 50) * 1000.0,
            p99_ms=nearest_rank(latencies, 99) * 1000.0,
            error_rate=errors / calls,
            timeouts=timeouts,
            ok_since_last_error=ok_since,
            failed_kinds=tuple(sorted(failed.items(), key=lambda item: (-item[1], item[0]))[:3]),
        )

    def _expire(self, now: float) -> None:
        # A sample at exactly `now - window_s` is out: the window is the half-open (now - window, now].
        horizon = now - self.window_s
        samples = self._samples
        while samples and samples[0][0] <= horizon:
            samples.popleft()


class EventCounter:
    """Counts events (timeouts, rejections …) in a trailing window: `add(at)`, `count(now, window_s)`.

    Keeps the events of the last `horizon_s` seconds (so any `window_s` up to that can be asked for) and
    at most `max_events` of them; asking for a window longer than the horizon raises rather than
    undercounting. Events may arrive slightly out of order; they are kept sorted."""

    __slots__ = ("_start", "_times", "dropped", "horizon_s", "max_events")

    def __init__(self, horizon_s: float = 3600.0, max_events: int = 100_000) -> None:
        if not horizon_s > 0:
            raise ValueError(f"horizon_s must be positive, got {horizon_s}")
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, got {max_events}")
        self.horizon_s = float(horizon_s)
        self.max_events = max_events
        self.dropped = 0  # events the cap evicted while still inside the horizon
        # A sorted list whose live part starts at `_start`: dropping the oldest is an index bump, and the
        # dead prefix is cut off once it is half the list, so each event is moved O(1) times on average.
        self._times: list[float] = []
        self._start = 0

    def __len__(self) -> int:
        return len(self._times) - self._start

    def add(self, at: float) -> None:
        times = self._times
        if not times or at >= times[-1]:
            times.append(at)
        else:
            bisect.insort(times, at, lo=self._start)
        self._expire(times[-1])
        if len(self) > self.max_events:
            self._start += 1
            self.dropped += 1
        self._compact()

    def count(self, now: float, window_s: float) -> int:
        """Events with `now - window_s < at <= now`."""
        if not 0 < window_s <= self.horizon_s:
            raise ValueError(f"window_s must be in (0, {self.horizon_s}], got {window_s}")
        self._expire(now)
        self._compact()
        times, start = self._times, self._start
        return bisect.bisect_right(times, now, lo=start) - bisect.bisect_right(
            times, now - window_s, lo=start
        )

    def _expire(self, now: float) -> None:
        self._start = bisect.bisect_right(self._times, now - self.horizon_s, lo=self._start)

    def _compact(self) -> None:
        if self._start > 64 and self._start * 2 > len(self._times):
            del self._times[: self._start]
            self._start = 0

"""The engine's Prometheus endpoint (`/metrics`) and health check (`/healthz`), opt-in (`[metrics]`).

Served on the engine's own asyncio loop by a small HTTP/1.1 server (`asyncio.start_server`, one request per
connection), bound when the engine starts (a port in use stops the start with one line naming host:port)
and closed when it stops. The accept loop and the failure counter are supervised like the engine's other
loops.

Reading metrics never waits on the protection path: a scrape reads in-memory figures the engine keeps anyway
(its guards' coverage facts, the call and budget-wait histograms, the budgets' windows, the last health
measurement, the database watch's state) and asks the database nothing. The text is produced by
`prometheus_client` from a collector of this engine's own, in a registry of its own (never the global one:
two engines in one process do not collide).

`/healthz` answers 200 with a small JSON when the engine's last health measurement is fresh and its worst
component is healthy (`"status": "ok"`) or degraded (`"degraded"`); 503 when a component is critical
(`"critical"`), or when nothing is measuring (`"unknown"`): the engine is not running (starting, stopping),
it has measured nothing yet, its last measurement is older than three health intervals, or a component
could not be measured. The states are `tsbot status`'s (0 ok, 1 degraded, 2 critical, 3 unknown).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from engine.config import is_loopback_host
from engine.events import EventsDropped, ProtectionFailed, ProtectionTimedOut
from engine.exchange.errors import FailureClass
from engine.metrics import CumulativeHistogram
from engine.words import format_duration
from protection.coverage import CoverageFigures, percent
from protection.health import ComponentHealth, HealthState, worst_state

if TYPE_CHECKING:
    from engine.config import MetricsSettings
    from engine.engine import Engine

log = logging.getLogger(__name__)

STALE_HEALTH_INTERVALS = 3  # a health measurement older than this many intervals means nobody is measuring
REQUEST_TIMEOUT_SECONDS = 5.0  # a client that has not sent its request by then is dropped
WRITE_TIMEOUT_SECONDS = 5.0
MAX_REQUEST_LINE_BYTES = 8192
MAX_HEADER_LINES = 100
MAX_CONNECTIONS = 16  # beyond this many at once a connection is closed unanswered: scrapes are rare
OTHER_FAILURE = "other"  # a protection step that failed without a venue call (no FailureClass)

# healthy 0 < unknown 1 < degraded 2 < critical 3, as in `protection.health` and `tsbot status`.
_VERDICT = {
    HealthState.HEALTHY: "ok",
    HealthState.DEGRADED: "degraded",
    HealthState.CRITICAL: "critical",
    HealthState.UNKNOWN: "unknown",
}
_SEVERITY = {HealthState.HEALTHY: 0, HealthState.UNKNOWN: 1, HealthState.DEGRADED: 2, HealthState.CRITICAL: 3}
_SERVING = {"ok", "degraded"}


class MetricsUnavailable(Exception):
    """The endpoint cannot listen where it is configured to: one line naming host:port and why."""


@dataclass(frozen=True, slots=True)
class HealthVerdict:
    status: str  # ok | degraded | critical | unknown
    reason: str

    @property
    def http_status(self) -> int:
        return 200 if self.status in _SERVING else 503


def health_verdict(
    *,
    engine_state: str,
    components: tuple[ComponentHealth, ...],
    measured_age_seconds: float | None,
    stale_after_seconds: float,
) -> HealthVerdict:
    """What `/healthz` says: a pure function of the engine's state and its last health measurement."""
    if engine_state != "running":
        return HealthVerdict("unknown", f"no engine is measuring: the engine is {engine_state}")
    if not components or measured_age_seconds is None:
        return HealthVerdict("unknown", "no engine is measuring: no health measured yet")
    if measured_age_seconds > stale_after_seconds:
        return HealthVerdict(
            "unknown",
            f"no engine is measuring: the last health measurement is {format_duration(measured_age_seconds)} old "
            f"(stale after {stale_after_seconds:g}s)",
        )
    worst = worst_state(c.state for c in components)
    if worst is HealthState.HEALTHY:
        return HealthVerdict("ok", f"all {len(components)} components healthy")
    named = [f"{c.component}: {c.reason or c.summary}" for c in components if c.state is worst]
    return HealthVerdict(_VERDICT[worst], "; ".join(named))


class FailureCounts:
    """Protective calls that failed, by `FailureClass` (and `other` for failures without a venue call),
    counted from the engine's events since the endpoint started."""

    def __init__(self) -> None:
        self.by_class: dict[str, int] = {c.value: 0 for c in FailureClass} | {OTHER_FAILURE: 0}
        self.events_dropped = 0

    def count(self, event: object) -> None:
        if isinstance(event, ProtectionTimedOut):
            self.by_class[FailureClass.TIMEOUT.value] += 1
        elif isinstance(event, ProtectionFailed):
            label = event.failure_class or OTHER_FAILURE
            self.by_class[label] = self.by_class.get(label, 0) + 1
        elif isinstance(event, EventsDropped):
            self.events_dropped += event.count


class EngineCollector(Collector):
    """Reads the engine's in-memory figures at each scrape (no I/O, nothing awaited)."""

    def __init__(self, engine: Engine, failures: FailureCounts):
        self._engine = engine
        self._failures = failures

    def collect(self) -> Iterator[Metric]:
        engine = self._engine
        now = engine.clock.monotonic()
        state = engine.state.value

        info = GaugeMetricFamily(
            "tsbot_engine_info",
            "The engine: version, venue, account (its identity, as tsbot status and /healthz name it), its "
            "label and mode (value 1).",
            labels=["version", "venue", "account", "account_label", "mode"],
        )
        info.add_metric(
            [
                engine.version,
                engine.exchange_name,
                engine.account_key,
                engine.settings.venue.account,
                engine.mode,
            ],
            1,
        )
        yield info
        states = GaugeMetricFamily(
            "tsbot_engine_state", "1 for the engine's lifecycle state, 0 for the others.", labels=["state"]
        )
        for name in ("starting", "running", "stopping", "stopped"):
            states.add_metric([name], 1 if name == state else 0)
        yield states
        yield GaugeMetricFamily(
            "tsbot_code_changed_on_disk",
            "Source files of the engine changed on disk since it started (F10: it runs the code of its start; "
            "restart it to run them). Checked every minute by a headless engine.",
            value=0 if engine.code_difference is None else len(engine.code_difference.changed),
        )

        figures = engine.coverage()  # counted once: the coverage gauges and the protection health read them
        yield from self._coverage(figures)
        yield from self._venue_calls()
        yield from self._budgets(now)
        yield from self._entries_and_breaker()
        yield from self._database()
        yield from self._health(now, figures)
        yield from self._streams(now)

        failures = CounterMetricFamily(
            "tsbot_protection_failures",
            "Protective calls that failed, by what happened (timeout, unknown_outcome, rejected, "
            "server_error, rate_limited, not_sent; other: a protection step without a venue call).",
            labels=["class"],
        )
        for label, count in sorted(self._failures.by_class.items()):
            failures.add_metric([label], count)
        yield failures
        yield CounterMetricFamily(
            "tsbot_metrics_events_dropped",
            "Engine events this endpoint fell behind on (its failure counts miss them).",
            value=self._failures.events_dropped,
        )

    def _coverage(self, figures: CoverageFigures) -> Iterator[Metric]:
        gauges = (
            ("tsbot_open_positions", "Open positions.", figures.active),
            (
                "tsbot_positions_protected",
                "Open positions with both stops confirmed on the exchange.",
                figures.protected,
            ),
            (
                "tsbot_positions_protecting",
                "Open positions without both stops but still within their grace period (being protected).",
                figures.protecting,
            ),
            (
                "tsbot_positions_uncovered",
                "Open positions past their grace period without both stops confirmed on the exchange.",
                figures.uncovered,
            ),
            (
                "tsbot_positions_uncovered_lasting",
                "Of the uncovered, those without their stops for a grace period or more.",
                figures.lasting,
            ),
            (
                "tsbot_oldest_unprotected_seconds",
                "How long the longest-uncovered position (past grace) has been without both stops; 0 if none.",
                figures.oldest_unprotected_seconds if figures.uncovered else 0.0,
            ),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        coverage = GaugeMetricFamily(
            "tsbot_coverage_percent",
            "Open positions with the stop confirmed, in percent (hard_stop, trailing_stop, both); "
            "no sample while no position is open.",
            labels=["stop"],
        )
        if figures.active:
            coverage.add_metric(["hard_stop"], 100.0 * figures.with_stop_loss / figures.active)
            coverage.add_metric(["trailing_stop"], 100.0 * figures.with_trailing_stop / figures.active)
            coverage.add_metric(["both"], 100.0 * figures.protected / figures.active)
        yield coverage

    def _venue_calls(self) -> Iterator[Metric]:
        histogram = self._engine.call_stats.histogram
        yield _histogram(
            "tsbot_venue_call_seconds",
            "Venue calls' latency (time sending, not waiting for budget), by call kind.",
            "kind",
            histogram,
        )
        errors = CounterMetricFamily(
            "tsbot_venue_call_errors",
            "Venue calls that failed (no answer or an error), by call kind.",
            labels=["kind"],
        )
        timeouts = CounterMetricFamily(
            "tsbot_venue_call_timeouts",
            "Venue calls that got no answer within the call budget, by kind.",
            labels=["kind"],
        )
        for kind in histogram.labels():
            counts = histogram.counts(kind)
            errors.add_metric([kind], counts.errors)
            timeouts.add_metric([kind], counts.timeouts)
        yield errors
        yield timeouts

    def _budgets(self, now: float) -> Iterator[Metric]:
        engine = self._engine
        used = GaugeMetricFamily(
            "tsbot_rate_budget_used_ratio",
            "The fullest window's share of the venue's limit used now (orders: order count budget; "
            "requests: request weight budget), 0..1.",
            labels=["budget"],
        )
        if engine.order_budget is not None:
            used.add_metric(["orders"], engine.order_budget.used_fraction())
        if engine.request_pacer is not None:
            used.add_metric(["requests"], engine.request_pacer.used_fraction())
        yield used
        banned = [b.banned_for() for b in (engine.order_budget, engine.request_pacer) if b is not None]
        yield GaugeMetricFamily(
            "tsbot_venue_banned_seconds",
            "Seconds left of a venue ban (HTTP 418); 0 when not banned.",
            value=max((b for b in banned if b is not None), default=0.0),
        )
        yield _histogram(
            "tsbot_budget_wait_seconds",
            "How long calls waited for rate budget before being sent, by lane (protective, entry, read).",
            "lane",
            engine.budget_waits.histogram,
        )
        if engine.order_budget is not None:
            yield CounterMetricFamily(
                "tsbot_protective_orders_sent",
                "Protective orders sent.",
                value=engine.order_budget.protective_sent,
            )
            yield CounterMetricFamily(
                "tsbot_entries_admitted",
                "Entries admitted by the order budget.",
                value=engine.order_budget.entries_admitted,
            )
        if engine.request_pacer is not None:
            yield CounterMetricFamily(
                "tsbot_requests_sent", "Venue requests sent.", value=engine.request_pacer.requests_sent
            )
            yield CounterMetricFamily(
                "tsbot_requests_waited",
                "Venue requests that waited for budget.",
                value=engine.request_pacer.requests_waited,
            )

    def _entries_and_breaker(self) -> Iterator[Metric]:
        engine = self._engine
        yield GaugeMetricFamily(
            "tsbot_entries_paused",
            "1 while new entries are paused (by the operator, the breaker, the "
            "lease or the database); open positions stay protected.",
            value=1 if engine.entries_paused else 0,
        )
        yield GaugeMetricFamily(
            "tsbot_circuit_breaker_tripped",
            "1 while entries are paused by the circuit breaker.",
            value=1 if engine.entries_paused and engine.entries_paused_by == "breaker" else 0,
        )

    def _database(self) -> Iterator[Metric]:
        engine = self._engine
        watch, store = engine.db_watch, engine.store
        if watch is not None:
            yield GaugeMetricFamily(
                "tsbot_database_up",
                "1 while the database answers the engine's probes, 0 in an outage.",
                value=0 if watch.down else 1,
            )
        if store is not None:
            yield GaugeMetricFamily(
                "tsbot_database_journal_depth",
                "Protective writes journaled locally, waiting for the database.",
                value=store.journal_depth,
            )

    def _streams(self, now: float) -> Iterator[Metric]:
        engine = self._engine
        connected = GaugeMetricFamily(
            "tsbot_stream_connected", "1 while the venue's push stream is connected.", labels=["stream"]
        )
        age = GaugeMetricFamily(
            "tsbot_stream_last_event_age_seconds",
            "Seconds since the venue's push stream last sent anything.",
            labels=["stream"],
        )
        reconnects = CounterMetricFamily(
            "tsbot_stream_reconnects", "Reconnects of the venue's push stream.", labels=["stream"]
        )
        for stream in engine.venue.stream_states():
            connected.add_metric([stream.name], 1 if stream.connected else 0)
            if stream.last_event_at is not None:
                age.add_metric([stream.name], max(0.0, now - stream.last_event_at))
            reconnects.add_metric([stream.name], stream.reconnects)
        yield connected
        yield age
        yield reconnects
        yield GaugeMetricFamily(
            "tsbot_stale_mark_positions",
            "Open positions whose own mark is older than health.stale_mark_seconds.",
            value=len(engine.stale_mark_symbols(now)),
        )

    def _health(self, now: float, figures: CoverageFigures) -> Iterator[Metric]:
        engine = self._engine
        severity = GaugeMetricFamily(
            "tsbot_health_severity",
            "Each component's last health (protection judged at the scrape): 0 healthy, 1 unknown, 2 degraded, "
            "3 critical.",
            labels=["component"],
        )
        components = engine.current_health(figures)
        for component in components:
            severity.add_metric([str(component.component)], _SEVERITY[component.state])
        yield severity
        if engine.health_measured_at is not None:
            yield GaugeMetricFamily(
                "tsbot_health_age_seconds",
                "Seconds since the engine last measured its health.",
                value=max(0.0, now - engine.health_measured_at),
            )
        verdict = self._verdict(now, components)
        yield GaugeMetricFamily(
            "tsbot_healthz_ok",
            "1 when /healthz answers 200 (ok or degraded), 0 when 503.",
            value=1 if verdict.http_status == 200 else 0,
        )

    def _verdict(self, now: float, components: tuple[ComponentHealth, ...]) -> HealthVerdict:
        engine = self._engine
        measured = engine.health_measured_at
        return health_verdict(
            engine_state=engine.state.value,
            components=components,
            measured_age_seconds=None if measured is None else now - measured,
            stale_after_seconds=STALE_HEALTH_INTERVALS * float(engine.settings.health.interval_seconds),
        )

    def healthz(self) -> tuple[int, dict[str, Any]]:
        engine = self._engine
        now = engine.clock.monotonic()
        figures = engine.coverage()  # the verdict judges protection from these same figures
        components = engine.current_health(figures)
        verdict = self._verdict(now, components)
        both = percent(figures.protected, figures.active)
        measured = engine.health_measured_at
        body: dict[str, Any] = {
            "status": verdict.status,
            "reason": verdict.reason,
            "engine": engine.state.value,
            # The account as `tsbot status` names it (its identity), and the operator's label beside it:
            # "default" here beside "sim:default" there read as two accounts (an operator).
            "account": engine.account_key,
            "account_label": engine.settings.venue.account,
            "health_age_seconds": None if measured is None else round(now - measured, 3),
            "components": {str(c.component): c.state.value for c in components},
            "open_positions": figures.active,
            "uncovered": figures.uncovered,
            "coverage_percent": None if both is None else float(both),  # rounded as the gauge and the SQL
            "entries_paused": engine.entries_paused,
        }
        return verdict.http_status, body


def _histogram(name: str, doc: str, label: str, histogram: CumulativeHistogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=[label])
    for value in histogram.labels():
        counts = histogram.counts(value)
        buckets = [(_le(bound), count) for bound, count in zip(counts.bounds, counts.buckets, strict=True)]
        buckets.append(("+Inf", counts.count))
        family.add_metric([value], buckets, counts.total_seconds)
    return family


def _le(bound: float) -> str:
    return repr(float(bound))


class MetricsServer:
    """`/metrics` and `/healthz` for one engine. `bind()` at start (raises `MetricsUnavailable`), `serve()`
    and `count_failures()` as supervised loops, `close()` at stop."""

    def __init__(self, engine: Engine, settings: MetricsSettings):
        self._engine = engine
        self.host = settings.host
        self.configured_port = settings.port
        self.port: int | None = None  # the bound port (the configured one, or the one port 0 got)
        self.failures = FailureCounts()
        self.collector = EngineCollector(engine, self.failures)
        self.registry = CollectorRegistry(auto_describe=False)  # this engine's own
        self.registry.register(self.collector)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()  # connections being answered: cancelled at close
        self.scrapes = 0

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port if self.port is not None else self.configured_port}"

    async def bind(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._handle,
                self.host,
                self.configured_port,
                limit=MAX_REQUEST_LINE_BYTES,
                start_serving=False,
                reuse_address=True,
            )
        except OSError as exc:
            # The setting to change is the one at fault: the host for an address no interface has (it
            # pointed at the port; an operator).
            setting = (
                "host / TSBOT_METRICS__HOST"
                if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror)
                else "port / TSBOT_METRICS__PORT"
            )
            raise MetricsUnavailable(
                f"metrics: cannot listen on {self.address}: {_why(exc)} "
                f"(set [metrics] {setting}, or enabled = false)"
            ) from None
        sockets = self._server.sockets
        self.port = sockets[0].getsockname()[1] if sockets else self.configured_port
        if not is_loopback_host(self.host):
            log.warning(
                "metrics: %s is not a loopback address: whoever can reach this machine can read the "
                "engine's figures (there is no authentication)",
                self.host,
            )

    async def serve(self) -> None:
        server = self._server
        if server is None:
            return
        if not server.is_serving() and not server.sockets:  # closed under us: listen again
            await self.bind()
            server = self._server
            assert server is not None
        # Said once it listens (binding alone refuses connections): a scraper reading the log may go at once.
        await server.start_serving()
        log.info("metrics: serving /metrics and /healthz on http://%s", self.address)
        await server.serve_forever()

    async def count_failures(self) -> None:
        async for event in self._engine.events():
            self.failures.count(event)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        handlers = list(self._handlers)
        for task in handlers:  # a client holding a connection open does not outlive the engine
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(WRITE_TIMEOUT_SECONDS):
                    await server.wait_closed()

    # --- HTTP ----------------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            if len(self._handlers) > MAX_CONNECTIONS:
                return
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):
                    method, path = await _read_request(reader)
            except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError):
                return
            status, content_type, body = self._answer(method, path)
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\n"
                "Connection: close\r\n\r\n"
            ).encode("ascii")
            writer.write(head if method == "HEAD" else head + body)
            async with asyncio.timeout(WRITE_TIMEOUT_SECONDS):
                await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        except Exception:
            log.exception("metrics: answering a request failed")
        finally:
            if task is not None:
                self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(WRITE_TIMEOUT_SECONDS):
                    await writer.wait_closed()

    def _answer(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"only GET and HEAD\n"
        route = path.split("?", 1)[0]
        if route == "/metrics":
            self.scrapes += 1
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if route == "/healthz":
            status, body = self.collector.healthz()
            return status, "application/json", (json.dumps(body) + "\n").encode()
        if route == "/":
            return 200, "text/plain; charset=utf-8", b"tsbot: /metrics (Prometheus), /healthz\n"
        return 404, "text/plain; charset=utf-8", b"not found: try /metrics or /healthz\n"


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    """The request line's method and path; the headers are read and ignored (no body is expected)."""
    line = await reader.readline()
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError("not an HTTP request")
    for _ in range(MAX_HEADER_LINES):
        header = await reader.readline()
        if header in (b"\r\n", b"\n", b""):
            return parts[0].upper(), parts[1]
    raise ValueError("too many header lines")


def _why(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "the address is already in use (another process listens there)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "no interface of this machine has that address"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    if isinstance(exc, socket.gaierror):
        return "the host name does not resolve"
    return exc.strerror or type(exc).__name__


__all__ = [
    "STALE_HEALTH_INTERVALS",
    "EngineCollector",
    "FailureCounts",
    "HealthVerdict",
    "MetricsServer",
    "MetricsUnavailable",
    "health_verdict",
]

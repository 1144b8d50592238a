"""Watching the running engine's database: noticing it is gone, bringing back the embedded server we own,
and replaying the journal once it answers — saying so once per interval, never once per retry.

Every `PROBE_SECONDS` on the engine's clock the watch runs `SELECT 1` within
`database.probe_timeout_seconds`: on a pooled connection, and on a new one every `FRESH_EVERY` probes, at once
when a write found the database unreachable, and all the time while it is down. A new connection because a
postmaster that stopped answering (SIGSTOP, a hang) still serves the connections it already has: only a new
one finds out.

* Probe fails: the database is down. The store journals the protection path's writes at once and refuses
  everything else at once (`DatabaseDown`; loops wait for it to return); entries pause (the engine asks
  `down`). One ERROR line now, one per minute while it lasts (for how long, how many writes journaled).
* The embedded server is ours (no `database.dsn`): a dead postmaster (SIGKILL, crash) is started again at
  once; one that is alive but answered no probe `STALLED_PROBES` times in a row is killed and started
  again. A failed restart is retried with backoff (said once per minute). A server at a DSN is not ours to
  restart: we wait for it, and say so.
* Probe answers: the pool's old connections are dropped, the journal is replayed in order (`ResilientStore`),
  one WARNING says the database is back, after how long, and how many journaled writes were replayed. The
  account lease is taken again by the engine's lease watcher.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import asyncpg

from engine.clock import Clock, wait_event
from engine.words import counted
from storage.database import Database, DatabaseDown
from storage.embedded import EmbeddedPostgresError, PostmasterState, postmaster_state, restart_embedded
from storage.resilient import ResilientStore

log = logging.getLogger(__name__)

T = TypeVar("T")

PROBE_SECONDS = 2.0  # between two probes, on the engine's clock
FRESH_EVERY = 5  # every this many probes (and whenever in doubt) on a new connection rather than a pooled one
STALLED_PROBES = 2  # an embedded server alive but silent for this many probes in a row is restarted
SAY_EVERY_SECONDS = 60.0  # an outage is said once when it starts, then once per this interval
# A failed restart (a data directory made unreadable, a full disk) is tried again after 1, 2, 4, then every 5 s:
# at 30 s the server stayed down 23 s after its cause was gone, entries paused and writes journaled (an
# operator). A failed start costs a few milliseconds.
MAX_RESTART_BACKOFF_SECONDS = 5.0


async def _within(
    seconds: float, work: Awaitable[T], *, late: Callable[[T], object] = lambda _result: None
) -> T:
    """`work`'s result if it comes within `seconds` (real time), else `TimeoutError` at once: its task is
    cancelled and left to end on its own (`late` gets a result that still comes). Cancelling a statement asks
    the server to cancel it, and a frozen server never answers: awaited, that held a probe, and the health
    check with it, 11 s past its 1 s."""
    task = asyncio.ensure_future(work)

    def given_up(ended: asyncio.Future[T]) -> None:
        if not ended.cancelled() and ended.exception() is None:  # (a failure is the timeout already said)
            late(ended.result())

    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(given_up)
        raise
    if task in done:
        return task.result()
    task.cancel()
    task.add_done_callback(given_up)
    raise TimeoutError


def journal_path(log_file: str, token: str, venue: str, account: str) -> Path:
    """Where an engine's journal lives: next to its log file, one per (database, venue, account), e.g.
    `logs/tsbot-journal-4f2a9c-sim-default.jsonl`."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{token}-{venue}-{account}")
    return Path(log_file).expanduser().parent / f"tsbot-journal-{safe}.jsonl"


@dataclass(frozen=True, slots=True)
class DatabaseReading:
    """What the health check shows for the database (the fields of `protection.health.DatabaseMeasurement`)."""

    round_trip_ms: float | None = None
    error: str | None = None
    down_for_seconds: float | None = None
    journal_depth: int = 0


class DatabaseWatch:
    def __init__(
        self,
        database: Database,
        store: ResilientStore,
        clock: Clock,
        *,
        probe_timeout_seconds: float,
        on_change: Callable[[], None] = lambda: None,
    ):
        self._database = database
        self._store = store
        self._clock = clock
        self._probe_timeout = probe_timeout_seconds
        self._on_change = on_change
        # Engine-clock monotonic time of the first request of the outage it did not answer (the probe that
        # found it was asked then: timed from its failure, a freeze read 4 s short of its length).
        self.down_since: float | None = None
        self.problem: str | None = None  # why the last probe failed
        self.restarts = 0  # embedded server restarts by this watch
        self._said_at = -math.inf
        self._unanswered = 0  # probes in a row without an answer from a live postmaster
        self._restart_failures = 0
        self._next_restart_at = -math.inf
        self._restart_said_at = -math.inf
        self._restarted_in_outage = False
        self._restarted_just_now = False
        self._dead_pid: int | None = None  # the postmaster this outage began with
        self._killed_it = False  # this outage's server was killed by us (a start may have failed since)
        self._probes = 0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def down_for(self) -> float | None:
        return None if self.down_since is None else self._clock.monotonic() - self.down_since

    async def run(self) -> None:
        # The pool's own reconnect attempts log a traceback each; while this watch runs, it says the outage.
        pool_log = logging.getLogger("asyncpg.pool")
        pool_log.addFilter(_pool_reconnect_noise)
        try:
            while True:
                await self.check()
                await self._pause()
        finally:
            pool_log.removeFilter(_pool_reconnect_noise)

    async def check(self) -> None:
        """One probe, and what follows from it."""
        suspected = self._store.suspected.is_set()
        self._store.suspected.clear()
        self._probes += 1
        fresh = self.down or suspected or self._probes % FRESH_EVERY == 0
        asked_at = self._clock.monotonic()
        problem, silent = await self._probe(fresh)
        if problem is None:
            self._unanswered = 0
            if self.down or self._store.down or self._store.journal_depth or self._store.has_journal:
                await self._recover()
            return
        await self._unreachable(problem, silent, asked_at)

    async def measure(self) -> DatabaseReading:
        """For the health check: the outage while there is one, else a pooled round trip (bounded)."""
        depth = self._store.journal_depth
        if self.down:
            return DatabaseReading(
                error=self.problem or "unreachable", down_for_seconds=self.down_for(), journal_depth=depth
            )
        started = time.perf_counter()
        try:
            await _within(self._probe_timeout, self._database.pool.fetchval("SELECT 1"))
        except Exception as exc:
            self._store.suspected.set()  # the watch looks into it now, not at its next probe
            # (a timeout has no text: "Database query failed: TimeoutError:" said nothing of what happened)
            why = (
                f"no answer within {self._probe_timeout:g}s"
                if isinstance(exc, TimeoutError)
                else f"{type(exc).__name__}: {exc}".rstrip(": ")
            )
            return DatabaseReading(error=why[:200], journal_depth=depth)
        return DatabaseReading(round_trip_ms=(time.perf_counter() - started) * 1000, journal_depth=depth)

    # --- probing -------------------------------------------------------------------------------------

    async def _probe(self, fresh: bool) -> tuple[str | None, bool]:
        """(None, False) when the database answered; else (why, whether it was silent: no answer in time,
        or the socket refused while a postmaster may still be alive)."""
        target = self._database.target
        connection: asyncpg.Connection | None = None
        try:
            deadline = time.monotonic() + self._probe_timeout
            if fresh:
                connection = await _within(
                    self._probe_timeout,
                    asyncpg.connect(target.dsn, password=target.password, timeout=self._probe_timeout),
                    late=lambda connected: connected.terminate(),
                )
                await _within(max(0.0, deadline - time.monotonic()), connection.fetchval("SELECT 1"))
            else:
                await _within(self._probe_timeout, self._database.pool.fetchval("SELECT 1"))
        except TimeoutError:
            return f"no answer within {self._probe_timeout:g}s", True
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"[:200], True
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"[:200], False
        finally:
            if connection is not None:
                connection.terminate()  # a probe's connection is dropped, not closed politely
        return None, False

    async def _pause(self) -> None:
        """Until the next probe: `PROBE_SECONDS`, or less when a write found the database unreachable (not
        while it is known to be down: then every journaled write says so, and the cadence holds)."""
        if self._restarted_just_now:  # see at once whether the server it started answers
            self._restarted_just_now = False
            return
        if self.down:
            await self._clock.sleep(PROBE_SECONDS)
            return
        await wait_event(self._clock, self._store.suspected, PROBE_SECONDS)

    # --- going down ----------------------------------------------------------------------------------

    async def _unreachable(self, problem: str, silent: bool, asked_at: float | None = None) -> None:
        now = self._clock.monotonic()
        self.problem = problem
        self._store.mark_down(problem)
        embedded = self._database.target.embedded
        if self.down_since is None:
            self.down_since = now if asked_at is None else asked_at
            self._said_at = now
            self._restarted_in_outage = False
            log.error(
                "database unreachable (%s): protection goes on and its writes are journaled in %s until it is "
                "back; entries paused%s",
                problem,
                self._store.journal_path,
                "; restarting the embedded server if it died or stops answering"
                if embedded is not None
                else f"; waiting for {self._database.target.display} (not ours to restart)",
            )
            self._on_change()
        elif now - self._said_at >= SAY_EVERY_SECONDS:
            self._said_at = now
            log.error(
                "database still unreachable after %.0fs (%s): %d protective writes journaled; entries paused",
                now - self.down_since,
                problem,
                self._store.journal_depth,
            )
        if embedded is not None:
            self._unanswered = self._unanswered + 1 if silent else 0
            await self._restart_if_needed(embedded.data_dir)

    async def _restart_if_needed(self, data_dir: Path) -> None:
        state, pid = await asyncio.to_thread(postmaster_state, data_dir)
        if pid is not None and self._dead_pid is None:
            self._dead_pid = pid
        kill = state is PostmasterState.RUNNING
        if kill and self._unanswered < STALLED_PROBES:
            return  # alive: starting up, recovering, or not yet silent long enough to be called stuck
        now = self._clock.monotonic()
        if now < self._next_restart_at:
            return
        # A start under way finishes before the watch ends (it cannot be cancelled half-way anyway): nothing
        # of this engine's keeps starting servers after it stopped.
        self._killed_it = self._killed_it or kill
        restarting = asyncio.ensure_future(asyncio.to_thread(restart_embedded, data_dir, kill=kill))
        try:
            server = await asyncio.shield(restarting)
        except asyncio.CancelledError:
            await asyncio.gather(restarting, return_exceptions=True)
            raise
        except EmbeddedPostgresError as exc:
            self._restart_failures += 1
            delay = min(MAX_RESTART_BACKOFF_SECONDS, 2.0 ** (self._restart_failures - 1))
            self._next_restart_at = now + delay
            if now - self._restart_said_at >= SAY_EVERY_SECONDS:
                self._restart_said_at = now
                log.error("could not restart the embedded PostgreSQL: %s; trying again", exc)
            return
        self.restarts += 1
        self._unanswered = 0
        self._restart_failures = 0
        self._next_restart_at = -math.inf
        self._restarted_in_outage = True
        self._restarted_just_now = True
        log.warning(
            "embedded PostgreSQL restarted (pid %d; the previous one, pid %s, %s)",
            server.pid,
            self._dead_pid,
            # (killed by an earlier attempt whose start failed: it did not die by itself; an operator read
            # "had died")
            "stopped answering and was killed" if self._killed_it else "had died",
        )
        self._dead_pid = None
        self._killed_it = False
        if server.socket_dir != self._database.target.embedded.socket_dir:  # type: ignore[union-attr]
            log.error(
                "the restarted embedded PostgreSQL listens in %s, not %s: restart the engine to reconnect",
                server.socket_dir,
                self._database.target.embedded.socket_dir,  # type: ignore[union-attr]
            )

    # --- coming back ---------------------------------------------------------------------------------

    async def _recover(self) -> None:
        outage_started = self.down_since
        if outage_started is not None:
            # Connections from before the outage point at a dead or killed server: new ones for everyone.
            await self._database.pool.expire_connections()
        refused_before = self._store.rejected_writes
        try:
            replayed = await self._store.replay_journal()
        except DatabaseDown as exc:
            await self._unreachable(str(exc), False)
            return
        self.down_since = None
        self.problem = None
        self._unanswered = 0
        self._dead_pid = None
        self._killed_it = False
        refused = self._store.rejected_writes - refused_before
        refused_words = f" ({refused} refused by the database: kept aside, see above)" if refused else ""
        if outage_started is not None:
            log.warning(
                "database back after %.0fs%s: %d journaled writes replayed into PostgreSQL%s; entries resume "
                "once the account lease is held",
                self._clock.monotonic() - outage_started,
                " (embedded server restarted)" if self._restarted_in_outage else "",
                replayed,
                refused_words,
            )
            self._on_change()
        elif replayed or refused:
            log.warning(
                "database: %s journaled while it did not answer replayed%s",
                counted(replayed, "write"),
                refused_words,
            )


def _pool_reconnect_noise(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to restore the pool connection floor")


__all__ = ["DatabaseReading", "DatabaseWatch", "journal_path"]

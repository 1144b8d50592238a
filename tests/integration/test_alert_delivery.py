"""Delivery on its own: the alerter with real apprise posting to real HTTP receivers on 127.0.0.1.

A receiver that fails is retried with backoff and said once in the log (never with the URL's token); one
that hangs holds up only its own queue.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from engine.alerts import (
    QUEUE_LIMIT,
    Alerter,
    AppriseNotifier,
    Notification,
    NotifyKind,
    Observation,
    UncoveredPosition,
    _Channel,
)
from engine.clock import ManualClock
from engine.config import LoadedConfig, load_config
from engine.logs import RedactingFormatter
from tests.support.webhook import WebhookReceiver

TOKEN = "tok-5f4e3d2c1b0a-secret"
UNCOVERED = Observation(active=50, protected=49, uncovered=(UncoveredPosition(7, "BTCUSDT", 42.0),))


async def until(condition, what: str, limit: float = 60.0) -> None:
    """Wait (real time: delivery is real I/O) until `condition` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {limit:g}s")
        await asyncio.sleep(0.01)


def loaded_with(urls: str, tmp_path: Path) -> LoadedConfig:
    return load_config(
        None,
        environ={"TSBOT_ALERTS__URLS": urls, "TSBOT_ALERTS__SEND_TIMEOUT_SECONDS": "1"},
        cwd=tmp_path,
    )


def alerter_for(loaded: LoadedConfig, urls: list[str]) -> Alerter:
    return Alerter(
        loaded.settings.alerts,
        ManualClock(),
        source="sim:default",
        notifiers=[AppriseNotifier(url, n) for n, url in enumerate(urls, start=1)],
        retry_initial_seconds=0.05,
    )


async def test_a_failing_receiver_is_retried_and_said_once_without_its_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver = await WebhookReceiver(fail_first=3).start()
    url = receiver.url(f"/hooks/{TOKEN}")
    loaded = loaded_with(url, tmp_path)
    alerter = alerter_for(loaded, [url])
    alerter.start()
    try:
        (alert,) = alerter.check(UNCOVERED)
        assert "BTCUSDT uncovered for 42s" in alert.text
        await until(lambda: receiver.deliveries, "delivered after the receiver's failures")
        assert receiver.requests == 4  # three refused, the fourth delivered: retried, not dropped
        (delivered,) = receiver.deliveries
        assert "BTCUSDT uncovered for 42s" in delivered.payload["message"]
        # The receiver has it; the alerter counts it delivered once the answer reached it (closing before
        # that said "1 notifications not delivered at stop" in a loaded CI run).
        await until(
            lambda: any("delivered again" in r.getMessage() for r in caplog.records),
            "the alerter saw the delivery answered",
        )
    finally:
        await alerter.close()
        await receiver.close()
    ours = [r for r in caplog.records if r.name == "engine.alerts" and r.levelno >= logging.WARNING]
    said = [r.getMessage() for r in ours if "not delivered" in r.getMessage()]
    assert said == [
        "alerts via json:// #1 not delivered (DeliveryRefused: the receiver did not accept it); "
        "retrying with backoff, said again when delivered"
    ]
    assert any("delivered again after 3 failed attempts" in r.getMessage() for r in ours)
    assert all(TOKEN not in r.getMessage() for r in ours)  # our own lines never hold it, even unmasked
    redactor = RedactingFormatter(loaded.secret_values())
    assert all(TOKEN not in redactor.format(r) for r in caplog.records)


async def test_a_hanging_receiver_holds_up_only_its_own_queue(tmp_path: Path) -> None:
    dead = await WebhookReceiver(hang=True).start()
    alive = await WebhookReceiver().start()
    urls = [dead.url(f"/dead/{TOKEN}"), alive.url("/alive")]
    alerter = alerter_for(loaded_with(" ".join(urls), tmp_path), urls)
    alerter.start()
    try:
        alerter.check(UNCOVERED)
        alerter.check(Observation(active=50, protected=50))  # the recovery
        await until(lambda: len(alive.deliveries) == 2, "both alerts at the live receiver")
        assert "RECOVERED" in alive.deliveries[1].payload["title"]
        # The hanging receiver's own queue is sending to it meanwhile (on a busy machine it may connect
        # after the live one answered both: waited for, not assumed).
        await until(lambda: dead.connections >= 1, "the hanging receiver connected to")
        assert dead.deliveries == []
    finally:
        await alerter.close()
        await dead.close()
        await alive.close()


async def test_a_trickling_receiver_holds_up_only_its_own_queue(tmp_path: Path) -> None:
    """A receiver that answers a byte at a time is never given up on by a socket's read timeout: each send
    abandoned to it kept one of apprise's shared worker threads (six on a 2-core machine), and once they were
    all taken every other URL's alerts waited behind it for good (a reviewer)."""
    slow = await WebhookReceiver(trickle=0.3).start()
    alive = await WebhookReceiver().start()
    urls = [slow.url(f"/slow/{TOKEN}"), alive.url("/alive")]
    loaded = load_config(
        None,
        environ={"TSBOT_ALERTS__URLS": " ".join(urls), "TSBOT_ALERTS__SEND_TIMEOUT_SECONDS": "1"},
        cwd=tmp_path,
    )
    alerter = alerter_for(loaded, urls)
    alerter.start()
    try:
        for round_ in range(12):  # the slow URL's sends time out one after another, each retried
            alerter.check(UNCOVERED if round_ % 2 == 0 else Observation(active=50, protected=50))
            await until(
                lambda n=round_: len(alive.deliveries) == n + 1, f"alert {round_ + 1} at the live one"
            )
            await asyncio.sleep(1.0)
        assert slow.connections >= 1  # its send went, and was given up on
        assert slow.deliveries == []
    finally:
        await alerter.close()
        await slow.close()
        await alive.close()


async def test_a_send_abandoned_to_a_trickling_receiver_does_not_keep_the_process_alive(
    tmp_path: Path,
) -> None:
    """The send timeout stopped the wait, not the send: apprise's worker thread went on reading a receiver
    that answers a byte at a time, and Python waits for such threads at exit: `tsbot run` printed its exit
    line and never exited, its exit code (1 for UNCOVERED) never came, a supervisor never restarted it."""
    slow = await WebhookReceiver(trickle=0.5).start()
    script = textwrap.dedent(
        f"""
        import asyncio
        from pathlib import Path
        from engine.alerts import Alerter, AppriseNotifier, Observation, UncoveredPosition
        from engine.clock import ManualClock
        from engine.config import load_config

        async def main() -> None:
            url = {slow.url("/slow")!r}
            loaded = load_config(None, environ={{"TSBOT_ALERTS__URLS": url}}, cwd=Path({str(tmp_path)!r}))
            alerter = Alerter(
                loaded.settings.alerts, ManualClock(), source="sim:default",
                notifiers=[AppriseNotifier(url, 1, 1.0)],
            )
            alerter.start()
            alerter.check(Observation(active=1, protected=0, uncovered=(UncoveredPosition(7, "BTCUSDT", 42.0),)))
            await asyncio.sleep(1.5)
            await alerter.close()
            print("closed", flush=True)

        asyncio.run(main())
        """
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        try:
            out, err = await asyncio.wait_for(process.communicate(), 30.0)
        except TimeoutError:
            raise AssertionError("the process did not exit within 30s of its last alert's send") from None
        assert process.returncode == 0, err.decode()
        assert out.decode().strip() == "closed"
        assert slow.connections >= 1  # the send did go to the receiver
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await slow.close()


@asynccontextmanager
async def refused_once_then_backing_off(
    tmp_path: Path, *, backlog: int = 0
) -> AsyncIterator[WebhookReceiver]:
    """An alerter whose first send (an uncovered position) the receiver refused, now in a minute's backoff
    with `backlog` notifications queued behind it; the stop's alert is handed over and the alerter closed on
    leaving. Yields the receiver (closed after)."""
    receiver = await WebhookReceiver(fail_first=1).start()
    url = receiver.url("/hook")
    alerter = Alerter(
        loaded_with(url, tmp_path).settings.alerts,
        ManualClock(),
        source="sim:default",
        notifiers=[AppriseNotifier(url, 1)],
        retry_initial_seconds=60.0,
    )
    alerter.start()
    try:
        alerter.check(UNCOVERED)
        await until(lambda: receiver.requests == 1, "the first send refused")
        await asyncio.sleep(0.2)  # in its backoff now: a minute
        for n in range(backlog):  # each check's news queued behind it
            stale = ((f"marks S{n}", 40.0),)
            alerter.check(
                Observation(active=50, protected=49, uncovered=UNCOVERED.uncovered, stale_streams=stale)
            )
        alerter.engine_stopped("1 open position; UNCOVERED 1 (BTCUSDT)", False, None)
    finally:
        await alerter.close()
    try:
        yield receiver
    finally:
        await receiver.close()


async def test_a_stops_last_alert_is_tried_once_more_at_a_receiver_in_its_backoff(tmp_path: Path) -> None:
    """After any failed send in the streak, the stop gave its last alert ("engine stopped, UNCOVERED") up at
    once, the receiver back or not: it sat in a backoff of up to a minute (a reviewer)."""
    async with refused_once_then_backing_off(tmp_path) as receiver:
        assert receiver.matching("engine stopped", "UNCOVERED 1 (BTCUSDT)")
        assert receiver.matching("BTCUSDT uncovered for 42s")


async def test_a_full_queue_drops_the_oldest_warning_not_a_critical(tmp_path: Path) -> None:
    """At the queue's limit the oldest notification was dropped whatever it was: a one-off CRITICAL went
    while the repeats behind it were kept (a reviewer). The oldest that is not CRITICAL goes."""
    dead = await WebhookReceiver(hang=True).start()
    url = dead.url("/dead")
    channel = _Channel(AppriseNotifier(url, 1), timeout_seconds=1.0, retry_initial_seconds=0.05)
    critical = Notification("CRITICAL tsbot", "BTCUSDT uncovered", NotifyKind.FAILURE)
    try:
        channel.offer(critical)
        for n in range(QUEUE_LIMIT + 5):
            channel.offer(Notification("WARNING tsbot", f"stream marks X stale ({n})", NotifyKind.WARNING))
        assert critical in channel.queue
        assert len(channel.queue) == QUEUE_LIMIT
        assert channel.dropped == 6
        assert channel.queue[1].body == "stream marks X stale (6)"  # the oldest warnings went
        # In order still, the newest last: the limit's drop made every later offer go first (a reviewer).
        assert channel.queue[-1].body == f"stream marks X stale ({QUEUE_LIMIT + 4})"
        channel.sending = True  # (as during a send, or its backoff: the one retried is kept, at its place)
        head = channel.queue[0]
        channel.offer(Notification("WARNING tsbot", "one more", NotifyKind.WARNING))
        assert (channel.queue[0], channel.queue[-1].body) == (head, "one more")
    finally:
        await dead.close()


async def test_a_stops_last_alert_goes_ahead_of_a_backlog(tmp_path: Path) -> None:
    """Queued last, the stop's alert waited behind every alert a failing receiver had left queued, and the
    stop waits seconds only (a reviewer): it goes next."""
    async with refused_once_then_backing_off(tmp_path, backlog=5) as receiver:
        assert "engine stopped" in receiver.deliveries[0].text  # the first delivered, the backlog after it

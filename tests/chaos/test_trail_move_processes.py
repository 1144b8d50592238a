"""A real engine process killed (SIGKILL) in the middle of a managed trailing stop's move, on the Binance-wire
emulator over loopback (real ccxt, real HTTP): the move's new stop is executed by the venue, its answer held
back (the emulator's `timeout` fault), and the engine killed before it arrives. The restarted engine must
adopt the live new stop and cancel the old one — not cancel the new one as a duplicate and fall back to the
older, looser stop.

The venue's truth is the emulator's control API (`GET /_sim/state`: which of our stops are live), the price of
each live stop is the one its client id was recorded with (written ahead of every send); the invariant
auditor samples both every 200 ms."""

from __future__ import annotations

import dataclasses
import signal
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest

from protection.order_ids import parse_client_order_id
from storage.embedded import EmbeddedPostgres
from storage.repositories import OrderPurpose
from tests.chaos.processes import (
    Process,
    Waves,
    audit_limits,
    auditor_for,
    control,
    emulator,
    engine_up,
    fetch,
    quiet,
    write_config,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow


async def live_trailing_stops(base_url: str, symbol: str, token: str) -> list[str]:
    """Client ids of our live trailing stops on `symbol`, as the emulator holds them now."""
    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/_sim/state") as response:
        state = await response.json()
    return [
        o["clientAlgoId"]
        for o in state["open_algo_orders"]
        if o["symbol"] == symbol
        and (key := parse_client_order_id(o["clientAlgoId"], token)) is not None
        and key.purpose is OrderPurpose.TRAILING_STOP
    ]


async def recorded_price(dsn: str, client_order_id: str) -> Decimal:
    rows = await fetch(
        dsn, "SELECT trigger_price FROM monitoring.orders WHERE client_order_id = $1", client_order_id
    )
    assert rows, f"{client_order_id} was sent without being recorded first"
    return rows[0]["trigger_price"]


async def test_an_engine_killed_mid_move_adopts_the_live_new_stop_on_restart(
    tmp_path: Path, pg_server: EmbeddedPostgres, project_root: Path
) -> None:
    dsn = write_config(tmp_path, project_root, pg_server)
    config = tmp_path / "config.toml"
    text = config.read_text()
    assert 'mode = "auto"' in text
    assert "volatility = 1.0" in text
    # Managed trailing; marks stand still unless the test moves them (no new peak by chance).
    config.write_text(
        text.replace('mode = "auto"', 'mode = "managed"', 1).replace("volatility = 1.0", "volatility = 0", 1)
    )
    async with emulator(tmp_path, "POST:algoOrder=latency:300") as url:
        limits = dataclasses.replace(
            audit_limits(tmp_path),
            # Before activation a managed trail has no order (the hard stop protects); once placed, the
            # trailing stop is checked below at every sample.
            trailing_order_required=False,
            # A killed engine leaves its make-before-break overlap behind until the next one resolves it.
            duplicate_overlap_seconds=30.0,
        )
        auditor = auditor_for(url, dsn, limits)
        async with auditor.sampling(0.2):
            engine = await Process.start("run", cwd=tmp_path)
            try:
                await engine_up(auditor, engine)
                (symbol,) = await Waves(dsn).send(1)

                async def protected() -> bool:  # managed: no trailing order before activation
                    rows = await fetch(
                        dsn,
                        "SELECT count(*) AS n FROM monitoring.positions WHERE status = 'active' AND has_stop_loss",
                    )
                    return bool(rows) and rows[0]["n"] == 1

                await wait_until(protected, within=45, what="the position protected")
                (position,) = await fetch(
                    dsn, "SELECT id, side, entry_price FROM monitoring.positions WHERE symbol = $1", symbol
                )
                assert position["side"] == "long"
                entry = position["entry_price"]
                (installation,) = await fetch(dsn, "SELECT token FROM monitoring.installation")
                token = installation["token"]
                await control(url, "/_sim/mark", {"symbol": symbol, "price": str(entry * Decimal("1.02"))})

                async def first_stop_recorded() -> bool:
                    rows = await fetch(
                        dsn,
                        "SELECT stop_order_client_id FROM monitoring.trailing_stop_state "
                        "WHERE position_id = $1 AND state = 'active'",
                        position["id"],
                    )
                    return bool(rows) and rows[0]["stop_order_client_id"] is not None

                await wait_until(first_stop_recorded, within=30, what="the trail's first stop recorded")
                (old,) = await live_trailing_stops(url, symbol, token)

                # The next stop placement is executed and its answer held back, and the account stream is late
                # (its NEW would settle the move at once); a new peak moves the trail.
                await control(url, "/_sim/stream-fault", {"fault": "delay", "ms": 20000, "seconds": 15})
                await control(
                    url,
                    "/_sim/fault",
                    {"targets": ["POST:algoOrder"], "count": 1, "fault": "timeout", "hold_seconds": 60},
                )
                await control(url, "/_sim/mark", {"symbol": symbol, "price": str(entry * Decimal("1.04"))})

                async def both_live() -> bool:
                    return len(await live_trailing_stops(url, symbol, token)) == 2

                await wait_until(both_live, within=30, what="the move's new stop live on the venue")
                (new,) = [cid for cid in await live_trailing_stops(url, symbol, token) if cid != old]
                new_price = await recorded_price(dsn, new)
                assert new_price > await recorded_price(dsn, old)
                auditor.engine_up(False)
                engine.signal(signal.SIGKILL)
                assert await engine.wait() == -signal.SIGKILL
            finally:
                if engine.process.returncode is None:
                    engine.process.kill()
                    await engine.wait()

            # While no engine runs the mark eases off the peak (still above the new stop).
            await control(url, "/_sim/mark", {"symbol": symbol, "price": str(entry * Decimal("1.038"))})
            engine = await Process.start("run", cwd=tmp_path)
            try:
                report = await engine_up(auditor, engine)
                assert report.split(";")[0].endswith("failed 0"), (
                    report
                )  # (then any entries still in doubt, named)
                never_looser: list[tuple[list[str], Decimal]] = []

                async def adopted() -> bool:
                    live = await live_trailing_stops(url, symbol, token)
                    assert live, "no trailing stop of ours on the venue"
                    best = max([await recorded_price(dsn, cid) for cid in live])
                    never_looser.append((live, best))
                    assert best >= new_price, f"the venue's trailing stop fell back to {best} ({live})"
                    rows = await fetch(
                        dsn,
                        "SELECT state, stop_order_client_id FROM monitoring.trailing_stop_state "
                        "WHERE position_id = $1",
                        position["id"],
                    )
                    return live == [new] and bool(rows) and tuple(rows[0]) == ("active", new)

                await wait_until(adopted, within=float(limits.grace_seconds) + 5, what="the new stop adopted")
                await quiet(auditor, dsn)
                assert await live_trailing_stops(url, symbol, token) == [new]
            finally:
                auditor.engine_up(False)
                assert await engine.stop() == 0, engine.lines
        await auditor.close()
    auditor.assert_clean()

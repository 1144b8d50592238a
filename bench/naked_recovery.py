"""How long naked positions stay naked once the venue takes stops again, after it refused them for a while.

    python bench/naked_recovery.py [--positions 30] [--fault error] [--fault-seconds 150] [--json]

Set-up (not timed): `tsbot sim-exchange` (the Binance wire) in its own process with its control API, marks
still; `tsbot run` against it in its own process on an embedded PostgreSQL in a temporary directory,
configured as for a real Binance account (only `venue.base_url` differs); `--positions` signals imported
with `tsbot signals import`, and the bench waits until the venue holds both stops of every position.

Then, judged by the venue's own state (`GET /_sim/state`, sampled every 0.2-0.5 s): every stop send is
refused (`POST:algoOrder` faulted with `--fault`: `error` is HTTP 500, an unknown outcome on Binance;
`busy` 503 -1008, not executed), and another client on the same key removes every stop of ours by hand.
After `--fault-seconds` the fault is cleared. Measured:

* `naked_after_recovery_s`: per position, from the clear until the venue holds both its stops again
  (median, p90, max; `never` lists positions still naked 90 s on).
* `requests_during_fault`: what the engine sent per endpoint while the venue refused (the look-ups of
  stops of unknown outcome, `GET algoOrder`, spent the IP's weight before 2276475).
* `max_weight_1m`, `bans`: the venue's weight count at its highest, and any ban met.
* `engine_error_lines`: ERROR lines in the engine's log (a refusal said in full once a minute).

Target: every position covered within `grace_seconds` (5 s) of the venue taking stops again; no ban.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from emulator_process import API_KEY, API_SECRET, emulator_process

from tests.support.binance_client import BinanceClient

TSBOT = str(Path(sys.executable).with_name("tsbot"))
KINDS = ("STOP_MARKET", "TRAILING_STOP_MARKET")


def _coverage(state: dict[str, Any]) -> dict[str, bool]:
    """Each open position's symbol: whether the venue holds both its stops."""
    held = {p["symbol"]: set() for p in state["positions"] if float(p["quantity"]) != 0}
    for order in state["open_algo_orders"]:
        if order["symbol"] in held:
            held[order["symbol"]].add(order["orderType"])
    return {symbol: set(KINDS) <= kinds for symbol, kinds in held.items()}


def _start_engine(env: dict[str, str], workdir: Path) -> subprocess.Popen[str]:
    """`tsbot run` in its own process, as an operator starts it."""
    return subprocess.Popen(
        [TSBOT, "run"], env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )


def _tsbot(env: dict[str, str], workdir: Path, *args: str) -> None:
    subprocess.run([TSBOT, *args], env=env, cwd=workdir, check=True, capture_output=True)


def _spread(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    if not ordered:
        return {"median": None, "p90": None, "max": None}
    return {
        "median": round(statistics.median(ordered), 2),
        "p90": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))], 2),
        "max": round(ordered[-1], 2),
    }


async def run(positions: int, fault: str, fault_seconds: float, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"positions": positions, "fault": fault, "fault_seconds": fault_seconds}
    with emulator_process(
        workdir / "emulator", latency_ms=0, seed=5, settings={"TSBOT_VENUE__SIM__VOLATILITY": "0"}
    ) as venue:
        env = {
            **os.environ,
            **venue.engine_environ(),
            "HOME": str(workdir / "home"),
            "TSBOT_DATABASE__DATA_DIR": str(workdir / "pg"),
            "TSBOT_SIGNALS__SOURCE": "postgres",
            "TSBOT_LOGGING__FILE": str(workdir / "logs" / "trading_bot.log"),
        }
        (workdir / "home").mkdir(parents=True, exist_ok=True)
        engine = await asyncio.to_thread(_start_engine, env, workdir)
        try:
            async with aiohttp.ClientSession() as session:
                other = BinanceClient(session, venue.url, API_KEY, API_SECRET)
                info = await other.public("GET", "/fapi/v1/exchangeInfo")
                symbols = [s["symbol"] for s in info.body["symbols"] if s.get("status") == "TRADING"][
                    :positions
                ]
                signals = workdir / "signals.jsonl"
                signals.write_text(
                    "".join(
                        json.dumps({"symbol": s, "side": "long" if i % 2 else "short", "id": f"naked-{i}"})
                        + "\n"
                        for i, s in enumerate(symbols)
                    )
                )
                await asyncio.to_thread(_tsbot, env, workdir, "signals", "import", str(signals))
                started = time.monotonic()
                while True:
                    covered = _coverage(await venue.state())
                    if len(covered) >= positions and all(covered.values()):
                        break
                    if time.monotonic() - started > 120:
                        raise SystemExit(
                            f"naked_recovery: only {sum(covered.values())} of {positions} covered in 120 s"
                        )
                    await asyncio.sleep(0.5)
                await asyncio.sleep(3.0)
                state = await venue.state()
                before = dict(state["requests_by_endpoint"])
                answer = await other.control(
                    "POST", "/_sim/fault", {"targets": "POST:algoOrder", "fault": fault, "count": 1_000_000}
                )
                assert answer.status == 200, answer.body
                removed = await asyncio.gather(
                    *(
                        other.signed(
                            "DELETE", "/fapi/v1/algoOrder", symbol=o["symbol"], clientAlgoId=o["clientAlgoId"]
                        )
                        for o in state["open_algo_orders"]
                        if o["orderType"] in KINDS
                    )
                )
                out["stops_removed_by_hand"] = sum(a.status == 200 for a in removed)
                refused_from = time.monotonic()
                max_weight, bans = 0, set()
                while time.monotonic() - refused_from < fault_seconds:
                    rate = (await venue.state())["rate"]
                    max_weight = max(max_weight, rate["used_weight_1m"])
                    if rate["banned_until_ms"]:
                        bans.add(rate["banned_until_ms"])
                    await asyncio.sleep(0.5)
                state = await venue.state()
                during = state["requests_by_endpoint"]
                out["requests_during_fault"] = {
                    k: v - before.get(k, 0) for k, v in during.items() if v != before.get(k, 0)
                }
                await other.control("POST", "/_sim/clear-faults", {})
                cleared = time.monotonic()
                naked_for: dict[str, float] = {}
                while time.monotonic() - cleared < 90:
                    state = await venue.state()
                    covered = _coverage(state)
                    for symbol, both in covered.items():
                        if both:
                            naked_for.setdefault(symbol, time.monotonic() - cleared)
                    if state["rate"]["banned_until_ms"]:
                        bans.add(state["rate"]["banned_until_ms"])
                    if len(naked_for) >= len(covered):
                        break
                    await asyncio.sleep(0.2)
                out["naked_after_recovery_s"] = {
                    **_spread(list(naked_for.values())),
                    "never": sorted(set(covered) - set(naked_for)),
                }
                out["max_weight_1m"] = max_weight
                out["bans"] = len(bans)
        finally:
            engine.send_signal(signal.SIGTERM)
            try:
                rest, _ = engine.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                engine.kill()
                rest, _ = engine.communicate()
            out["engine_exit"] = {"code": engine.returncode, "line": (rest or "").strip().splitlines()[-1:]}
    log = (workdir / "logs" / "trading_bot.log").read_text(errors="replace").splitlines()
    out["engine_error_lines"] = sum(" ERROR " in line for line in log)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=30)
    parser.add_argument(
        "--fault", default="error", help="the emulator's fault on POST:algoOrder (error, busy)"
    )
    parser.add_argument("--fault-seconds", type=float, default=150.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="naked-recovery-") as scratch:
        out = asyncio.run(run(args.positions, args.fault, args.fault_seconds, Path(scratch)))
    if args.json:
        print(json.dumps(out, indent=1))
        return
    naked = out["naked_after_recovery_s"]
    print(
        f"{out['positions']} positions, stops refused ({out['fault']}) for {out['fault_seconds']:g} s: naked after "
        f"recovery median {naked['median']} s, p90 {naked['p90']} s, max {naked['max']} s, never {naked['never']}; "
        f"sent while refused {out['requests_during_fault']}; max weight {out['max_weight_1m']}; bans {out['bans']}; "
        f"ERROR lines {out['engine_error_lines']}"
    )


if __name__ == "__main__":
    main()

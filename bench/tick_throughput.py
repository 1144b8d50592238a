"""How many mark ticks per second the managed trailing core handles, and how long one tick takes.

    python bench/tick_throughput.py --positions 1000 [--ticks-per-position N] [--seed S] [--json]

Set-up (not timed): `--positions` positions, mixed long and short, on markets with realistic prices and
tick sizes (BTC at ~65 000 with tick 0.1 down to PEPE at ~0.00001 with tick 0.0000001), each entered at
a price near its market's level and given its own seeded random walk of marks (log-normal steps,
`--volatility-percent` per tick, one mark per position every `--mark-interval` seconds of venue time,
interleaved across positions as a mark stream delivers them). Every mark is a `Decimal` on the market's
tick, built before the clock starts: the benchmark measures the core, not price parsing.

Measured: the shell's per-tick work — look the position's state up by id in a dict, `on_mark`, and for a
decision confirm it at once with `on_stop_confirmed` (so moves really happen and later ticks see active
trails), then store the new state only if it changed. Parameters are the config.toml defaults
(activation 1.5 %, interval 1 s, min improvement 0.1 %, emergency 1 %) with callbacks 0.3–2 %. A mark
through a confirmed stop does not close the position here (the core just holds), so every position keeps
ticking to the end of the stream.

Method, in two passes over the same marks from the same starting states:

1. Throughput: the whole stream in one loop, timed as a batch with `time.perf_counter_ns` around it;
   ticks per second = ticks / elapsed. Nothing else runs inside the loop.
2. Latency: the same stream again, every tick timed on its own with a `perf_counter_ns` pair. The timer's
   own cost (median of back-to-back pairs) is subtracted, and p50 / p99 / p99.9 / max are taken over all
   ticks (a full sample, so rare slow ticks — new peaks, moves, allocation — are all in it). The timing
   calls slow this pass down, which is why throughput comes from pass 1.

The garbage collector stays on, as it is in the engine.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from decimal import Decimal

from engine.exchange.port import PositionSide
from protection.trailing import (
    HOLD,
    MoveStop,
    PlaceStop,
    TrailingParams,
    TrailingPhase,
    TrailingState,
    on_mark,
    on_stop_confirmed,
)


@dataclass(frozen=True, slots=True)
class BenchMarket:
    symbol: str
    typical_price: float
    tick_size: Decimal


MARKETS = (
    BenchMarket("BTCUSDT", 65_000.0, Decimal("0.1")),
    BenchMarket("ETHUSDT", 3_200.0, Decimal("0.01")),
    BenchMarket("SOLUSDT", 150.0, Decimal("0.01")),
    BenchMarket("BNBUSDT", 580.0, Decimal("0.01")),
    BenchMarket("LINKUSDT", 14.0, Decimal("0.001")),
    BenchMarket("XRPUSDT", 0.6, Decimal("0.0001")),
    BenchMarket("DOGEUSDT", 0.16, Decimal("0.00001")),
    BenchMarket("SFPUSDT", 0.7, Decimal("0.0001")),
    BenchMarket("1000PEPEUSDT", 0.01, Decimal("0.0000001")),
    BenchMarket("HNTUSDT", 4.5, Decimal("0.001")),
)
CALLBACK_PERCENTS = (Decimal("0.3"), Decimal("0.5"), Decimal("1"), Decimal("2"))
START_AT = 1_700_000_000.0

Mark = tuple[int, Decimal, float]  # position id, mark price, venue time


@dataclass(frozen=True, slots=True)
class BenchPosition:
    position_id: int
    market: BenchMarket
    state: TrailingState


def to_tick(price: float, tick_size: Decimal) -> Decimal:
    return tick_size * max(1, round(price / float(tick_size)))


def build_positions(count: int, rng: random.Random) -> list[BenchPosition]:
    positions = []
    for position_id in range(1, count + 1):
        market = rng.choice(MARKETS)
        entry = to_tick(market.typical_price * rng.uniform(0.8, 1.2), market.tick_size)
        params = TrailingParams(
            side=rng.choice((PositionSide.LONG, PositionSide.SHORT)),
            entry_price=entry,
            activation_percent=Decimal("1.5"),
            callback_percent=rng.choice(CALLBACK_PERCENTS),
            tick_size=market.tick_size,
            min_move_interval_seconds=Decimal("1"),
            min_improvement_percent=Decimal("0.1"),
            emergency_move_percent=Decimal("1"),
        )
        positions.append(BenchPosition(position_id, market, TrailingState.start(params)))
    return positions


def generate_marks(
    positions: list[BenchPosition],
    ticks_per_position: int,
    volatility_percent: float,
    mark_interval: float,
    rng: random.Random,
) -> list[Mark]:
    sigma = volatility_percent / 100
    levels = [float(position.state.params.entry_price) for position in positions]
    marks: list[Mark] = []
    for round_index in range(1, ticks_per_position + 1):
        at = START_AT + round_index * mark_interval
        for index, position in enumerate(positions):
            levels[index] *= math.exp(rng.gauss(0.0, sigma))
            marks.append((position.position_id, to_tick(levels[index], position.market.tick_size), at))
    return marks


def decided_stop_price(decision: PlaceStop | MoveStop) -> Decimal:
    return decision.stop_price if type(decision) is PlaceStop else decision.new_stop_price


def feed_marks(states: dict[int, TrailingState], marks: list[Mark]) -> tuple[int, int]:
    """The measured loop: what the protection shell does per tick, minus the I/O. Returns (places, moves)."""
    places = moves = 0
    for position_id, mark, at in marks:
        state = states[position_id]
        new_state, decision = on_mark(state, mark, at)
        if decision is not HOLD:
            new_state = on_stop_confirmed(new_state, decided_stop_price(decision), at)
            if type(decision) is PlaceStop:
                places += 1
            else:
                moves += 1
        if new_state is not state:
            states[position_id] = new_state
    return places, moves


def timer_overhead_ns(samples: int = 20_000) -> int:
    clock = time.perf_counter_ns
    costs = []
    for _ in range(samples):
        started = clock()
        costs.append(clock() - started)
    return int(statistics.median(costs))


def feed_marks_timing_each(states: dict[int, TrailingState], marks: list[Mark]) -> list[int]:
    """The same work as feed_marks, with every tick timed on its own (nanoseconds, timer cost included)."""
    clock = time.perf_counter_ns
    latencies = [0] * len(marks)
    for index, (position_id, mark, at) in enumerate(marks):
        started = clock()
        state = states[position_id]
        new_state, decision = on_mark(state, mark, at)
        if decision is not HOLD:
            new_state = on_stop_confirmed(new_state, decided_stop_price(decision), at)
        if new_state is not state:
            states[position_id] = new_state
        latencies[index] = clock() - started
    return latencies


def percentile(sorted_values: list[int], fraction: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, math.ceil(fraction * len(sorted_values)) - 1)]


def run_benchmark(
    positions_count: int, ticks_per_position: int, seed: int, volatility_percent: float, mark_interval: float
) -> dict[str, object]:
    rng = random.Random(seed)
    positions = build_positions(positions_count, rng)
    marks = generate_marks(positions, ticks_per_position, volatility_percent, mark_interval, rng)
    initial_states = {position.position_id: position.state for position in positions}

    states = dict(initial_states)
    started = time.perf_counter_ns()
    places, moves = feed_marks(states, marks)
    elapsed_ns = time.perf_counter_ns() - started

    overhead_ns = timer_overhead_ns()
    latencies = sorted(
        max(0, latency - overhead_ns) for latency in feed_marks_timing_each(dict(initial_states), marks)
    )
    phases = {phase.value: 0 for phase in TrailingPhase}
    for state in states.values():
        phases[state.phase.value] += 1

    return {
        "positions": positions_count,
        "ticks": len(marks),
        "ticks_per_position": ticks_per_position,
        "seed": seed,
        "ticks_per_second": round(len(marks) / (elapsed_ns / 1e9)),
        "elapsed_seconds": round(elapsed_ns / 1e9, 3),
        "mean_us": round(elapsed_ns / len(marks) / 1000, 3),
        "p50_us": round(percentile(latencies, 0.50) / 1000, 3),
        "p99_us": round(percentile(latencies, 0.99) / 1000, 3),
        "p999_us": round(percentile(latencies, 0.999) / 1000, 3),
        "max_us": round(latencies[-1] / 1000, 3),
        "timer_overhead_ns": overhead_ns,
        "places": places,
        "moves": moves,
        "final_phases": phases,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--positions", type=int, default=1000, help="open positions (default 1000)")
    parser.add_argument(
        "--ticks-per-position", type=int, default=1000, help="marks per position (default 1000)"
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed for positions and marks (default 1)")
    parser.add_argument(
        "--volatility-percent",
        type=float,
        default=0.1,
        help="std-dev of one mark step, percent (default 0.1)",
    )
    parser.add_argument(
        "--mark-interval",
        type=float,
        default=0.25,
        help="venue seconds between a position's marks (default 0.25)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    if args.positions < 1 or args.ticks_per_position < 1:
        parser.error("--positions and --ticks-per-position must be at least 1")

    result = run_benchmark(
        args.positions, args.ticks_per_position, args.seed, args.volatility_percent, args.mark_interval
    )
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{result['ticks']:,} ticks through {result['positions']:,} positions "
        f"(seed {result['seed']}, Python {result['python']})\n"
        f"  throughput  {result['ticks_per_second']:,} ticks/s  ({result['mean_us']} µs/tick mean, "
        f"{result['elapsed_seconds']} s)\n"
        f"  latency     p50 {result['p50_us']} µs  p99 {result['p99_us']} µs  p99.9 {result['p999_us']} µs  "
        f"max {result['max_us']} µs  (timer cost {result['timer_overhead_ns']} ns subtracted)\n"
        f"  decisions   {result['places']:,} first stops placed, {result['moves']:,} moves\n"
        f"  at the end  {result['final_phases']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The hostile-input fuzz of issue 14 at full size (≈ 10 000 inputs), with the figures per area.

    python bench/fuzz_hostile_input.py [--scale 10] [--random] [--json]

Runs tests/integration/test_fuzz_hostile_input.py (the same strategies and contract as `make test`, where
it runs at scale 1, about 1 000 inputs) with every example count multiplied by `--scale`, on the test
session's embedded PostgreSQL. Contract breaks are counted rather than stopping the run.

Per area (configuration files, environment overrides, command-line arguments, `signals import` files,
signal rows written behind the engine's back): inputs tried, rejected with a message (exit 1/2 with one
line on stderr; a row `rejected` with its reason), accepted (exit 0; a row `opened`), broken (anything
else), of which tracebacks. Exit code 0 when nothing broke.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FUZZ = "tests/integration/test_fuzz_hostile_input.py"
AREAS = ("config file", "config env", "cli arguments", "signals import", "signal rows")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--scale", type=float, default=10.0, help="multiplies every example count (1: make test)"
    )
    parser.add_argument(
        "--random",
        action="store_true",
        help="new inputs on every run (default: the fixed ones make test uses)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        report_path = Path(scratch) / "report.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TSBOT_")}
        env.update(
            HOSTILE_FUZZ_SCALE=str(args.scale),
            HOSTILE_FUZZ_REPORT=str(report_path),
            HOSTILE_FUZZ_RANDOM="1" if args.random else "0",
        )
        started = time.monotonic()
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "7200", FUZZ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        elapsed = time.monotonic() - started
        report = json.loads(report_path.read_text()) if report_path.exists() else {}

    rows = {area: report.get(area, {}).get("counts", {}) for area in AREAS}
    totals = {
        key: sum(row.get(key, 0) for row in rows.values())
        for key in ("tried", "rejected", "accepted", "broken", "tracebacks")
    }
    result = {
        "scale": args.scale,
        "random": args.random,
        "seconds": round(elapsed, 1),
        "areas": {area: {key: row.get(key, 0) for key in totals} for area, row in rows.items()},
        "total": totals,
        "broken_examples": {area: report.get(area, {}).get("broken", [])[:5] for area in AREAS},
        "pytest_exit_code": run.returncode,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"hostile-input fuzz, scale {args.scale:g}: {totals['tried']} inputs in {elapsed:.0f} s")
        print(f"{'area':<16}{'tried':>8}{'rejected':>10}{'accepted':>10}{'broken':>8}{'tracebacks':>12}")
        for area, row in result["areas"].items():
            print(
                f"{area:<16}{row['tried']:>8}{row['rejected']:>10}{row['accepted']:>10}"
                f"{row['broken']:>8}{row['tracebacks']:>12}"
            )
        print(
            f"{'total':<16}{totals['tried']:>8}{totals['rejected']:>10}{totals['accepted']:>10}"
            f"{totals['broken']:>8}{totals['tracebacks']:>12}"
        )
        for area, examples in result["broken_examples"].items():
            for example in examples:
                print(f"broken ({area}): {example}")
    if run.returncode != 0 and not totals["broken"]:
        print(run.stdout[-3000:], file=sys.stderr)
    return 0 if run.returncode == 0 and not totals["broken"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

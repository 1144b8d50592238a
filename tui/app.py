"""`tsbot-tui`: the dashboard.

The dashboard is built in the "Dashboard" issue, on top of the engine. Until then this entry point says so
and exits non-zero instead of showing an empty screen.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    print(
        "tsbot-tui: the dashboard is not built yet; `tsbot status` shows coverage from the database",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    raise SystemExit(main())

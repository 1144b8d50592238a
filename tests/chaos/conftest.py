"""The chaos suite: fault schedules judged by the invariant auditor on the venue's truth. Every test here
carries the `chaos` marker (`pytest -m chaos` runs only them); `make test` runs them with everything else."""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: a fault schedule judged by the invariant auditor")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.chaos)

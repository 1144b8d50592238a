"""The contract suite runs once per exchange implementation listed here (test ids: `[sim]`, …)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import pytest

from .harness import ContractSubject, sim_subject

IMPLEMENTATIONS: dict[str, Callable[[], AbstractAsyncContextManager[ContractSubject]]] = {
    "sim": sim_subject,
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[ContractSubject]:
    async with IMPLEMENTATIONS[request.param]() as built:
        yield built

"""The contract suite runs once per exchange implementation listed here (test ids: `[sim]`, `[ccxt-binance]`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import pytest

from .harness import ContractSubject, ccxt_binance_subject, sim_subject

IMPLEMENTATIONS: dict[str, Callable[[], AbstractAsyncContextManager[ContractSubject]]] = {
    "sim": sim_subject,
    "ccxt-binance": ccxt_binance_subject,
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[ContractSubject]:
    async with IMPLEMENTATIONS[request.param]() as built:
        yield built

"""The history survives a database outage: a span that opens and ends while the server is SIGKILLed, and the
coverage samples taken meanwhile, go to the journal with the protection facts and land in PostgreSQL when it
is back — at the moments they happened, once each, however often the journal is replayed."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg

from storage.journal import WriteJournal
from storage.repositories import CoverageSample
from storage.resilient import ResilientStore
from tests.integration.test_history import facts_row
from tests.integration.test_resilient_store import (  # noqa: F401 (fixtures)
    Owned,
    _bring_back,
    _open_position,
    _store,
    owned,
    owned_server,
)
from tests.support.owned_postgres import kill_postmaster

STOP = Decimal("0.4850")  # the hard stop of _open_position's SFPUSDT long at 0.5


async def _history(dsn: str) -> tuple[list[tuple], list[tuple]]:
    conn = await asyncpg.connect(dsn)
    try:
        spans = [
            (r["position_id"], r["started_at"], r["ended_at"], r["reason"], r["ended_by"])
            for r in await conn.fetch("SELECT * FROM monitoring.uncovered_spans ORDER BY id")
        ]
        samples = [
            (r["at"], r["active"], r["protected"], r["uncovered"], r["coverage_pct"])
            for r in await conn.fetch("SELECT * FROM monitoring.coverage_samples ORDER BY at")
        ]
        return spans, samples
    finally:
        await conn.close()


async def test_a_span_and_samples_written_during_an_outage_are_replayed_once_at_their_moments(
    owned: Owned,  # noqa: F811
) -> None:
    store, token = await _store(owned)
    position_id = await _open_position(store)
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    await store.set_protection_facts_many(
        [facts_row(position_id, covered=True, since=None, observed=t0, stop_price=STOP)]
    )
    kill_postmaster(owned.server.data_dir)

    lost, back = t0 + timedelta(seconds=60), t0 + timedelta(seconds=97)
    await store.set_protection_facts_many([facts_row(position_id, covered=False, since=lost, observed=lost)])
    await store.record_coverage_sample(
        CoverageSample(lost + timedelta(seconds=3), 1, 0, 1, 0, Decimal("0.0"))
    )
    await store.set_protection_facts_many(
        [facts_row(position_id, covered=True, since=None, observed=back, stop_price=STOP)]
    )
    await store.record_coverage_sample(
        CoverageSample(back + timedelta(seconds=3), 1, 1, 0, 0, Decimal("100.0"))
    )
    assert store.journal_depth == 4
    assert store.journaled["record_coverage_sample"] == 2
    copy = owned.journal.with_name("copy.jsonl")
    shutil.copy(owned.journal, copy)

    await _bring_back(owned)
    assert await store.replay_journal() == 4
    once = await _history(owned.dsn)
    spans, samples = once
    assert spans == [(position_id, lost, back, "stop_loss_missing", "protected")]
    assert samples == [
        (lost + timedelta(seconds=3), 1, 0, 1, Decimal("0.0")),
        (back + timedelta(seconds=3), 1, 1, 0, Decimal("100.0")),
    ]

    # A crash after the replay and before the journal was removed: the next start replays it again.
    shutil.copy(copy, owned.journal)
    again = ResilientStore(owned.pool)
    again.attach_journal(WriteJournal(owned.journal), token)
    assert await again.replay_journal() == 4
    assert await _history(owned.dsn) == once

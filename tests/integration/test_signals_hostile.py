"""Signal rows written behind the engine's back (issue 14): whatever a row holds, it ends `opened` or
`rejected` with a reason, and what the engine stores about it is bounded."""

from __future__ import annotations

from engine.clock import ManualClock
from storage.database import Database
from storage.repositories import MAX_REASON_CHARS
from tests.integration.engine_support import engine_settings, make_engine
from tests.support.driving import drive, drive_until


async def _finished(db: Database, ids: list[int]) -> bool:
    pending = await db.pool.fetchval(
        "SELECT count(*) FROM monitoring.signals WHERE id = ANY($1::bigint[]) AND status IN ('new', 'taken')",
        ids,
    )
    return pending == 0


async def test_a_megabyte_symbol_is_rejected_with_a_bounded_reason(db: Database) -> None:
    clock = ManualClock()
    engine = make_engine(engine_settings(db.target.dsn), clock)
    await drive(clock, engine.start())
    try:
        ids = [
            await db.pool.fetchval(
                "INSERT INTO monitoring.signals (symbol, side, score) VALUES ($1, $2, $3::text::numeric) "
                "RETURNING id",
                symbol,
                side,
                score,
            )
            for symbol, side, score in [
                ("Z" * 1_000_000, "long", None),
                ("SFPUSDT", "long", "1e100"),
                ("ALLUSDT", "sideways" * 100_000, None),
                ("SUIUSDT", "short", "NaN"),
                ("NMRUSDT", "long", "0.5"),
            ]
        ]
        await drive_until(clock, lambda: _finished(db, ids), what="every row finished", limit=30)
        rows = await db.pool.fetch(
            "SELECT id, status, reason FROM monitoring.signals WHERE id = ANY($1::bigint[]) ORDER BY id", ids
        )
    finally:
        await drive(clock, engine.stop())
    assert [r["status"] for r in rows] == ["rejected", "rejected", "rejected", "rejected", "opened"]
    for row in rows[:4]:
        assert row["reason"]
        assert len(row["reason"]) <= MAX_REASON_CHARS + 40
    assert rows[0]["reason"].startswith("unknown symbol ZZZZ")
    assert rows[0]["reason"].endswith("[1,000,022 characters, cut]")
    assert rows[1]["reason"].startswith("score must be a finite number between -1e12 and 1e12")
    assert rows[2]["reason"].startswith("side must be long or short, got 'sidewayssideways")
    assert rows[3]["reason"].startswith("score must be a finite number")

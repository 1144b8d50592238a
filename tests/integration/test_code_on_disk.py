"""F10, "fix on disk, old code running", for an engine without a dashboard (`tsbot run`): it records the
code it runs with its lease, and says when the code on disk is no longer that code."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from engine.clock import ManualClock
from engine.code_watch import SourceWatcher
from engine.engine import CODE_CHECK_SECONDS
from storage.database import Database
from tests.integration.engine_support import make_engine
from tests.integration.test_failure_modes_f1_f5 import settings_for
from tests.integration.test_metrics_endpoint import METRICS_ON, scrape, value
from tests.support.driving import drive, drive_until


async def test_a_headless_engine_says_when_the_code_on_disk_changes_and_records_its_own(
    db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reviewer (r75): `tsbot run` started at 06:49, a fix written to disk at 06:53, and nothing said so:
    status "OK", /healthz "ok", the log silent; only a dashboard compares its code with the disk. The
    engine now checks every minute and says it at WARNING (once per change), and records the code it runs
    with its lease, for `tsbot status` and read-only dashboards to compare."""
    package = tmp_path / "protection"
    package.mkdir()
    (package / "health.py").write_text("HEALTHY = True\n")
    clock = ManualClock()
    engine = make_engine(settings_for(db, METRICS_ON), clock)
    engine.code = SourceWatcher([package])
    await drive(clock, engine.start())
    try:
        row = await db.pool.fetchrow("SELECT code_roots, code_digests FROM monitoring.engine_leases")
        assert row["code_roots"] == [str(package)]
        assert list(row["code_digests"]) == ["protection/health.py"]

        caplog.set_level(logging.INFO, logger="engine.engine")
        await drive(clock, clock.sleep(CODE_CHECK_SECONDS + 1), step=0.5)
        assert engine.code_difference is None  # the same code: nothing said
        assert not [r for r in caplog.records if "code on disk" in r.getMessage()]

        (package / "health.py").write_text("HEALTHY = True  # the fix\n")
        await drive_until(
            clock, lambda: engine.code_difference is not None, limit=2 * CODE_CHECK_SECONDS, step=0.5
        )
        [said] = [r for r in caplog.records if "code on disk changed" in r.getMessage()]
        assert value(await scrape(engine), "tsbot_code_changed_on_disk") == 1  # one file
        assert said.levelno == logging.WARNING
        assert "protection/health.py" in said.getMessage()
        await drive(clock, clock.sleep(3 * CODE_CHECK_SECONDS), step=0.5)  # said once, not every minute
        assert len([r for r in caplog.records if "code on disk changed" in r.getMessage()]) == 1

        (package / "health.py").write_text("HEALTHY = True\n")  # back to the code it runs
        await drive_until(
            clock, lambda: engine.code_difference is None, limit=2 * CODE_CHECK_SECONDS, step=0.5
        )
        assert value(await scrape(engine), "tsbot_code_changed_on_disk") == 0

        (package / "health.py").unlink()  # removed: no change time to say (r76: "newest change 00:00:00")
        await drive_until(
            clock, lambda: engine.code_difference is not None, limit=2 * CODE_CHECK_SECONDS, step=0.5
        )
        said = [r.getMessage() for r in caplog.records if "code on disk changed" in r.getMessage()][-1]
        assert "(protection/health.py; removed)" in said, said
    finally:
        await drive(clock, engine.stop())

"""The write-ahead journal on its own: appended lines on disk in order, owner-only, a crash's torn last line
ignored (and cut off before the next append), unreadable lines kept aside, cleared after a replay."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from storage.journal import JournalError, WriteJournal, read_journal

AT = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_appends_are_on_disk_in_order_owner_only_and_read_back_exactly(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "journal.jsonl"
    journal = WriteJournal(path)
    assert not path.exists()  # nothing until the first write needs it
    await journal.append(
        "record_order", {"client_order_id": "tsbabc123-1-sl0", "quantity": "0.001"}, database="abc123", at=AT
    )
    # Appends made together share an fsync and keep the order of the calls.
    await asyncio.gather(
        *(journal.append("record_event", {"n": n, "text": "é"}, database="abc123", at=AT) for n in range(20))
    )
    assert _mode(path) == 0o600
    # The directory it made too: the file names say the account and venue (it was 0755, a reviewer's find).
    assert _mode(path.parent) == 0o700
    contents = read_journal(path)
    assert not contents.torn_tail
    assert contents.unreadable_lines == []
    assert [e.seq for e in contents.entries] == list(range(1, 22))
    assert contents.entries[0].args == {"client_order_id": "tsbabc123-1-sl0", "quantity": "0.001"}
    assert contents.entries[0].at == AT
    assert [e.args["n"] for e in contents.entries[1:]] == list(range(20))
    assert journal.entries() == contents.entries
    await journal.close()


async def test_a_torn_last_line_is_ignored_and_cut_off_before_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    first = WriteJournal(path)
    for n in range(3):
        await first.append("set_order_status", {"n": n}, database="abc123", at=AT)
    await first.close()
    whole = path.read_bytes()
    # The process died in the middle of writing a fourth line.
    path.write_bytes(whole + b'{"seq":4,"at":"2025-01-02T03:04:05+00:00","db":"abc12')

    assert read_journal(path).torn_tail
    second = WriteJournal(path)
    contents = second.load()
    assert contents.torn_tail
    assert [e.args["n"] for e in contents.entries] == [0, 1, 2]
    assert path.read_bytes() == whole  # cut off: the next line must not be glued to it
    await second.append("set_order_status", {"n": 3}, database="abc123", at=AT)
    again = read_journal(path)
    assert not again.torn_tail
    assert [(e.seq, e.args["n"]) for e in again.entries] == [(1, 0), (2, 1), (3, 2), (4, 3)]
    await second.close()


async def test_a_last_line_that_is_not_json_counts_as_torn(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = WriteJournal(path)
    await journal.append("record_event", {"n": 1}, database="abc123", at=AT)
    await journal.close()
    with path.open("ab") as f:
        f.write(b"\x00\x00garbage\n")
    contents = WriteJournal(path).load()
    assert contents.torn_tail
    assert [e.args for e in contents.entries] == [{"n": 1}]


async def test_an_unreadable_line_in_the_middle_is_reported_and_the_file_kept_aside(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = WriteJournal(path)
    await journal.append("record_event", {"n": 1}, database="abc123", at=AT)
    await journal.close()
    with path.open("ab") as f:
        f.write(b"not json at all\n")
    journal = WriteJournal(path)
    await journal.append("record_event", {"n": 3}, database="abc123", at=AT)  # (a fresh writer: seq 1)
    await journal.close()

    reader = WriteJournal(path)
    contents = reader.load()
    assert contents.unreadable_lines == [2]
    assert [e.args["n"] for e in contents.entries] == [1, 3]
    [aside] = [p for p in os.listdir(tmp_path) if p.startswith("journal.jsonl.unreadable-")]
    aside = tmp_path / aside
    assert aside.read_bytes() == path.read_bytes()
    assert _mode(aside) == 0o600


async def test_clear_removes_the_file_and_the_next_append_starts_a_new_one(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = WriteJournal(path)
    await journal.append("record_event", {"n": 1}, database="abc123", at=AT)
    assert len(journal) == 1
    await journal.wait_durable()
    journal.clear()
    assert not path.exists()
    assert len(journal) == 0
    await journal.append("record_event", {"n": 2}, database="abc123", at=AT)
    assert [e.args["n"] for e in read_journal(path).entries] == [2]
    assert _mode(path) == 0o600
    await journal.close()


async def test_a_journal_made_readable_by_others_is_owner_only_again_on_the_next_append(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b"")
    os.chmod(path, 0o644)
    journal = WriteJournal(path)
    journal.load()
    await journal.append("record_event", {"n": 1}, database="abc123", at=AT)
    assert _mode(path) == 0o600
    await journal.close()


async def test_a_journal_that_cannot_be_written_says_so(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    journal = WriteJournal(blocker / "journal.jsonl")
    with pytest.raises(JournalError, match="cannot append"):
        await journal.append("record_event", {"n": 1}, database="abc123", at=AT)
    assert len(journal) == 0


def test_every_field_of_a_guards_facts_survives_the_journal() -> None:
    """The journal's encoding of protection facts names each field by hand: one left out (as a new one can
    be) is lost in every outage, silently. Each field set to a value of its own comes back as written."""
    from decimal import Decimal

    from storage.repositories import PositionStatus, ProtectionFactsRow
    from storage.resilient import _decode_facts, _encode_facts

    at = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
    facts = ProtectionFactsRow(
        position_id=7,
        has_stop_loss=True,
        has_trailing_stop=False,
        stop_loss_price=Decimal("0.4850"),
        trailing_activated=True,
        status=PositionStatus.ACTIVE,
        trail_armed=True,
        unprotected_since=at.replace(second=1),
        observed_at=at.replace(second=2),
        uncovered_from=at.replace(second=3),
        stop_loss_unverified=True,
        trailing_stop_unverified=True,
        protected_from=at.replace(second=4),
        hard_stop_from=at.replace(second=5),
    )
    assert all(getattr(facts, f) is not None for f in ProtectionFactsRow.__dataclass_fields__)
    assert _decode_facts(json.loads(json.dumps(_encode_facts(facts)))) == facts

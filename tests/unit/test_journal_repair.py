"""A Raft journal torn by a power loss (pysyncobj never fsyncs it) is cut back to its last whole record, so the
node starts and catches up instead of failing to start for ever (seen in the VM failover test)."""

from __future__ import annotations

import struct
from pathlib import Path

from pysyncobj.journal import FileJournal

from cortex.raft.journal import repair_journal


def journal_with(path: Path, entries: int) -> None:
    journal = FileJournal(str(path))
    for i in range(1, entries + 1):
        journal.add(b"command-%d" % i, i, 1)
    journal.flush()
    del journal


def loaded(path: Path) -> list[int]:
    journal = FileJournal(str(path))
    return [journal[i][1] for i in range(len(journal))]


def test_an_intact_journal_is_left_alone(tmp_path: Path):
    path = tmp_path / "raft.journal"
    journal_with(path, 5)
    before = path.read_bytes()
    assert repair_journal(path) == "" and path.read_bytes() == before
    assert repair_journal(tmp_path / "missing.journal") == ""


def test_a_torn_tail_is_cut_back_to_the_last_whole_record(tmp_path: Path):
    path = tmp_path / "raft.journal"
    journal_with(path, 5)
    data = bytearray(path.read_bytes())
    (last,) = struct.unpack_from("<I", data, 36)
    # the header says a sixth record exists, but its bytes never reached the disk (zeros)
    struct.pack_into("<I", data, 36, last + 40)
    data[last:last + 40] = b"\0" * 40
    path.write_bytes(bytes(data))
    what = repair_journal(path)
    assert "torn tail" in what and f"to {last}" in what
    assert loaded(path) == [1, 2, 3, 4, 5]


def test_a_record_cut_in_half_is_dropped(tmp_path: Path):
    path = tmp_path / "raft.journal"
    journal_with(path, 3)
    data = path.read_bytes()
    (last,) = struct.unpack_from("<I", data, 36)
    path.write_bytes(data[: last - 5])  # the file ends inside the third record
    assert repair_journal(path)
    assert loaded(path) == [1, 2]


def test_an_unreadable_header_starts_a_new_journal(tmp_path: Path):
    path = tmp_path / "raft.journal"
    path.write_bytes(b"\0" * 20)
    assert "new journal" in repair_journal(path)
    assert not path.exists() and loaded(path) == []

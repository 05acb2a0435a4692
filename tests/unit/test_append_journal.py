"""The Raft journal written without mmap (raft/journal.py AppendJournal): pysyncobj's own file format both
ways (an existing data directory starts as it is), conflict deletes and compaction that survive a reopen, and
a write the disk refuses that leaves the log as it was and says where."""

from __future__ import annotations

import resource
import signal
import struct
import time
from pathlib import Path

import pytest
from pysyncobj.journal import FileJournal

from cortex.raft.journal import AppendJournal, JournalWriteError, repair_journal


def entries(journal) -> list[tuple[bytes, int, int]]:
    return [(bytes(journal[i][0]), journal[i][1], journal[i][2]) for i in range(len(journal))]


def records_end(path: Path) -> int:
    return struct.unpack_from("<I", path.read_bytes(), 36)[0]


def test_reads_pysyncobj_journals_and_pysyncobj_reads_its_own(tmp_path: Path):
    path = tmp_path / "raft.journal"
    old = FileJournal(str(path))
    for i in range(1, 6):
        old.add(b"old-%d" % i, i, 1)
    old.setCurrentTerm(3, "n2:1")
    old._destroy()
    assert path.stat().st_size > records_end(path)  # pysyncobj grows its file ahead of the records

    journal = AppendJournal(str(path))
    assert entries(journal) == [(b"old-%d" % i, i, 1) for i in range(1, 6)]
    assert (journal.getCurrentTerm(), journal.getVotedForNodeId()) == (3, "n2:1")
    assert path.stat().st_size == records_end(path)  # the zeros after the records are given back
    journal.add(b"new-6", 6, 3)
    journal._destroy()

    back = FileJournal(str(path))  # and pysyncobj itself still reads the file
    assert [(bytes(c), i, t) for c, i, t in (back[n] for n in range(len(back)))][-2:] == [
        (b"old-5", 5, 1), (b"new-6", 6, 3)]
    back._destroy()


def test_conflict_deletes_and_compaction_survive_a_reopen(tmp_path: Path):
    path = tmp_path / "raft.journal"
    journal = AppendJournal(str(path))
    for i in range(1, 11):
        journal.add(b"e%d" % i, i, 1)
    journal.deleteEntriesFrom(7)  # entries 8.. conflicted with a new leader's
    journal.add(b"e8-term2", 8, 2)
    journal.sync()
    assert path.stat().st_size == records_end(path)
    journal.deleteEntriesTo(3)  # compaction: entries 1-3 are in a snapshot now
    journal.add(b"e9", 9, 2)
    journal._destroy()
    expected = [(b"e%d" % i, i, 1) for i in range(4, 8)] + [(b"e8-term2", 8, 2), (b"e9", 9, 2)]
    reopened = AppendJournal(str(path))
    assert entries(reopened) == expected
    assert repair_journal(path) == ""  # whole records only
    reopened.clear()
    reopened._destroy()
    assert entries(AppendJournal(str(path))) == []


def test_a_refused_write_leaves_the_log_as_it_was_and_names_the_directory(tmp_path: Path):
    path = tmp_path / "raft.journal"
    journal = AppendJournal(str(path))
    journal.add(b"kept", 1, 1)
    journal.sync()
    size = path.stat().st_size
    # A file size limit makes the kernel refuse the write (EFBIG), as a full disk refuses it (ENOSPC).
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))
    try:
        with pytest.raises(JournalWriteError) as refused:
            journal.add(b"x" * 4096, 2, 1)
        with pytest.raises(JournalWriteError):  # between retries: refused at once, same message
            journal.add(b"y", 2, 1)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert str(tmp_path) in str(refused.value) and "file too large" in str(refused.value)
    assert "resumes by itself" in str(refused.value)
    assert journal.failure and entries(journal) == [(b"kept", 1, 1)]
    assert path.stat().st_size == size  # a partial record was given back
    deadline = time.monotonic() + 10
    while not journal.probe():  # the retry backoff (0.5 s first) finds the room again
        assert time.monotonic() < deadline, journal.failure
        time.sleep(0.05)
    journal.add(b"after", 2, 1)
    journal._destroy()
    assert entries(AppendJournal(str(path))) == [(b"kept", 1, 1), (b"after", 2, 1)]

"""pysyncobj's on-disk log made safe for Raft: a torn journal cut back to its last whole record at start
(`repair_journal`), and the journal and term/vote metadata on the disk before pysyncobj acknowledges or
votes (`DurableJournal`). Importing this module installs both into pysyncobj; consensus imports it before
it builds a node."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pysyncobj.journal as syncobj_journal
import pysyncobj.pickle as syncobj_pickle
import pysyncobj.syncobj as syncobj_module

from cortex.core import durable

# pysyncobj's journal layout (pysyncobj/journal.py): a 40-byte header whose last 4 bytes say where the records
# end, then records of size(4) | index(8) term(8) command | size(4).
_JOURNAL_MAGIC = b"PYSYNCOBJ"
_JOURNAL_LAST_OFFSET_AT = 36
_JOURNAL_FIRST_RECORD = 40


def repair_journal(path: Path) -> str:
    """Cut a torn journal back to its last whole record; return what was done ('' when it was intact).

    pysyncobj writes its journal through mmap and never fsyncs it, so after a power loss the header can point
    past records that never reached the disk (zeros, or a short file) and pysyncobj then fails to start, for
    ever. The lost tail was at most this node's copy of recent entries: the leader sends them again.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ""
    if len(data) < _JOURNAL_FIRST_RECORD or not data.startswith(_JOURNAL_MAGIC):
        path.unlink()
        return f"{path.name}: unreadable header ({len(data)} bytes); started a new journal"
    (last,) = struct.unpack_from("<I", data, _JOURNAL_LAST_OFFSET_AT)
    offset = _JOURNAL_FIRST_RECORD
    while offset < last:
        if offset + 4 > len(data):
            break
        (size,) = struct.unpack_from("<I", data, offset)
        end = offset + 4 + size + 4
        if size < 16 or end > len(data) or end > last or struct.unpack_from("<I", data, end - 4)[0] != size:
            break
        offset = end
    if offset == last:
        return ""
    with open(path, "r+b") as f:
        f.seek(_JOURNAL_LAST_OFFSET_AT)
        f.write(struct.pack("<I", offset))
        f.flush()
        os.fsync(f.fileno())
    return f"{path.name}: torn tail after an unclean stop; cut back from offset {last} to {offset}"


# --- durability --------------------------------------------------------------------------------------
# pysyncobj writes its log through mmap and its term/vote/commit index with a plain rename, and fsyncs neither:
# after a power loss a server could have acknowledged entries it no longer has, or voted twice in one term.
# Raft's safety argument needs both on the disk first. An fdatasync per appended entry costs 0.1-6 ms here
# (depending on what else uses the disk), amortised by group commit (many commands per entry).

class DurableJournal(syncobj_journal.FileJournal):
    """pysyncobj's file journal, on the disk after every change (before pysyncobj acknowledges or votes).

    fdatasync on the file rather than mmap.flush(): on Linux it writes back the mapping's dirty pages all the
    same, and it lets go of the GIL while the disk works (msync from Python holds it, stalling every thread).
    """

    def _sync(self) -> None:
        os.fdatasync(self._FileJournal__journalFile._ResizableFile__f.fileno())

    def add(self, command, idx, term):
        super().add(command, idx, term)
        self._sync()

    def clear(self):
        super().clear()
        self._sync()

    def deleteEntriesFrom(self, entryFrom):
        super().deleteEntriesFrom(entryFrom)
        self._sync()


def _create_journal(journal_file=None):
    if journal_file is None:
        return syncobj_journal.MemoryJournal()
    return DurableJournal(journal_file)


def _store_meta_durably(self, meta) -> None:
    durable.write_atomic(Path(self.getPath()), syncobj_pickle.dumps(meta))


syncobj_module.createJournal = _create_journal
syncobj_journal.MetaStorer.storeMeta = _store_meta_durably

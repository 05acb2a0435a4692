"""pysyncobj's on-disk log, written without mmap: `AppendJournal`, installed into pysyncobj by importing this
module (consensus imports it before it builds a node), and `repair_journal`, which cuts a torn journal back
to its last whole record at start.

pysyncobj's own FileJournal maps the file and grows it sparsely; on a full disk the first store into a page
the filesystem cannot back kills the process with SIGBUS, in the middle of a Raft append. Here every record
goes through pwrite, so a full disk (ENOSPC) or a failing one (EIO) is an exception the node survives: the
append fails with an error naming the directory (`JournalWriteError`), the failure is logged once and shown
in `cortex status`, and writes are retried on a backoff until the disk takes them again. The file format is
pysyncobj's own, so an existing data directory starts as it is (and pysyncobj could read ours).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import time
from pathlib import Path

import pysyncobj.journal as syncobj_journal
import pysyncobj.pickle as syncobj_pickle
import pysyncobj.syncobj as syncobj_module

from cortex.core import durable

log = logging.getLogger("cortex.consensus")

# pysyncobj's journal layout (pysyncobj/journal.py): a 40-byte header whose last 4 bytes say where the records
# end, then records of size(4) | index(8) term(8) command | size(4).
_JOURNAL_MAGIC = b"PYSYNCOBJ"
_JOURNAL_LAST_OFFSET_AT = 36
_JOURNAL_FIRST_RECORD = 40
_RETRY_FIRST, _RETRY_MAX = 0.5, 5.0  # seconds between attempts while the disk refuses writes
_PROBE_BYTES = 64 << 10  # room an idle node wants before it calls its disk writable again


def repair_journal(path: Path) -> str:
    """Cut a torn journal back to its last whole record; return what was done ('' when it was intact).

    After a power loss the header can point past records that never reached the disk (zeros, or a short
    file) and pysyncobj then fails to start, for ever. The lost tail was at most this node's copy of entries
    it had not acknowledged (appends are on the disk before the acknowledgement): the leader sends them again.
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


def _header() -> bytes:
    name = syncobj_journal.APP_NAME.ljust(syncobj_journal.NAME_SIZE, b"\0")
    version = syncobj_journal.APP_VERSION.ljust(syncobj_journal.VERSION_SIZE, b"\0")
    return name + version + struct.pack("<II", syncobj_journal.JOURNAL_FORMAT_VERSION, _JOURNAL_FIRST_RECORD)


def _record(command, idx: int, term: int) -> bytes:
    body = struct.pack("<QQ", idx, term) + syncobj_pickle.to_bytes(command)
    size = struct.pack("<I", len(body))
    return size + body + size


class JournalWriteError(OSError):
    """The disk refused a journal write (full, read-only or failing); nothing of it counts as appended."""


class AppendJournal(syncobj_journal.Journal):
    """pysyncobj's journal as an append-only file: pwrite, one fdatasync per group, ftruncate on conflicts.

    Group commit: an append only writes; `sync` makes everything appended since the last call durable with
    one fdatasync. The node calls it before a follower acknowledges (raft/consensus.py), before this node's
    commit index moves (`setRaftCommitIndex`, so nothing is applied or answered on entries only in the page
    cache) and once at the end of every tick, which is where a leader's appends of that tick reach the disk,
    while its followers work on the same entries.
    """

    def __init__(self, journal_file: str):
        self.path = journal_file
        self.owner = ""  # the node, for messages; set by the node once pysyncobj has built this journal
        self._fd = os.open(journal_file, os.O_RDWR | os.O_CREAT, 0o600)
        self._entries: list[tuple] = []
        self._starts: list[int] = []  # file offset of each entry's record
        self._offset = _JOURNAL_FIRST_RECORD
        self._dirty = False
        self.appends = 0  # successful appends since start: the node tells which entries one message added
        self._synced = (0, _JOURNAL_FIRST_RECORD)  # entries and file offset an fdatasync last vouched for
        self.failure = ""  # why the disk refuses writes now, "" while it takes them
        self._failed_since = 0.0
        self._retry_at = 0.0
        self._retry_delay = _RETRY_FIRST
        self._relapse_until = 0.0
        self._load()
        self._meta_path = journal_file + ".meta"
        self._meta = syncobj_journal.MetaStorer(self._meta_path).getMeta()
        self._meta_saved = True

    def _load(self) -> None:
        with os.fdopen(os.dup(self._fd), "rb") as f:
            data = f.read()
        if len(data) < _JOURNAL_FIRST_RECORD:
            os.ftruncate(self._fd, 0)
            self._write_all(_header(), 0)
            os.fdatasync(self._fd)
            return
        (last,) = struct.unpack_from("<I", data, _JOURNAL_LAST_OFFSET_AT)
        offset = _JOURNAL_FIRST_RECORD
        while offset < last:
            (size,) = struct.unpack_from("<I", data, offset)
            idx, term = struct.unpack_from("<QQ", data, offset + 4)
            self._entries.append((data[offset + 20:offset + 4 + size], idx, term))
            self._starts.append(offset)
            offset += size + 8
        self._offset = offset
        self._synced = (len(self._entries), offset)
        if len(data) > offset:  # pysyncobj grew its file ahead of the records; the zeros are of no use
            os.ftruncate(self._fd, offset)

    def _write_all(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written

    # --- failure and recovery -------------------------------------------------------------------------
    def _where(self) -> str:
        who = f"node {self.owner}: " if self.owner else ""
        return f"{who}raft journal on {os.path.dirname(self.path) or '.'}"

    def _refuse_while_failed(self) -> None:
        """Between retries a failed journal refuses at once, without touching the disk."""
        if self.failure and time.monotonic() < self._retry_at:
            raise JournalWriteError(errno.EAGAIN, self.failure)

    def _failed(self, exc: OSError, what: str) -> JournalWriteError:
        reason = (exc.strerror or str(exc)).lower()
        hint = "free space there" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "check the disk"
        message = f"{self._where()}: {reason} ({what}); {hint}: the node resumes by itself once it can write"
        now = time.monotonic()
        # Refused again right after a probe found room (the probe only proves the journal can grow, not that
        # the state store beside it can): the same failure going on, on the same growing backoff.
        if not self.failure and now < self._relapse_until:
            self._retry_delay = min(self._retry_delay * 2, _RETRY_MAX)
        elif not self.failure:
            self._failed_since, self._retry_delay = now, _RETRY_FIRST
            log.error("raft journal write failed; this node cannot take part in Raft until it can write",
                      extra={"fields": {"error": message}})
        else:
            self._retry_delay = min(self._retry_delay * 2, _RETRY_MAX)
        self.failure, self._retry_at = message, now + self._retry_delay
        return JournalWriteError(exc.errno or errno.EIO, message)

    def refuse_store(self, exc: Exception, index: int) -> JournalWriteError:
        """The state store beside the journal could not apply entry `index` (SQLite: the disk is full or
        failing; it needs room for its WAL, so it can be the first to meet a full disk). The node is then as
        after a refused append: it steps down, says why, and retries on the same backoff."""
        code = errno.ENOSPC if "full" in str(exc) else errno.EIO
        return self._failed(OSError(code, os.strerror(code)), f"applying entry {index} to the state store: {exc}")

    def _recovered(self) -> None:
        if self.failure:
            log.warning("raft journal writable again", extra={"fields": {
                "journal": self.path, "failed_for_s": round(time.monotonic() - self._failed_since, 1)}})
            self.failure = ""
            self._relapse_until = time.monotonic() + 2 * self._retry_delay

    def probe(self) -> bool:
        """On the retry backoff, check whether the disk has room again (an idle node appends nothing to learn
        it); True when the journal is writable."""
        if not self.failure:
            return True
        if time.monotonic() < self._retry_at:
            return False
        try:
            os.posix_fallocate(self._fd, self._offset, _PROBE_BYTES)
            os.ftruncate(self._fd, self._offset)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                self._failed(exc, "probing for room")
                return False
        self._recovered()
        return True

    # --- pysyncobj's Journal ----------------------------------------------------------------------------
    def add(self, command, idx, term):
        self._refuse_while_failed()
        record = _record(command, idx, term)
        end = self._offset + len(record)
        try:
            self._write_all(record, self._offset)
            self._write_all(struct.pack("<I", end), _JOURNAL_LAST_OFFSET_AT)
        except OSError as exc:
            try:  # give back what a partial write took; the header still ends at the old record
                os.ftruncate(self._fd, self._offset)
            except OSError:
                pass
            raise self._failed(exc, f"appending entry {idx}") from None
        self._entries.append((command, idx, term))
        self._starts.append(self._offset)
        self._offset, self._dirty = end, True
        self.appends += 1
        self._recovered()

    def sync(self) -> None:
        """One fdatasync for everything appended or truncated since the last one.

        When it fails, what reached the disk is unknown, and a later fdatasync may succeed without writing the
        pages again (Linux marks them clean): the entries since the last good one are dropped, as a crash
        would drop them. None was acknowledged (answers wait for this), and the leader sends them again.
        """
        if self._dirty:
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                count, offset = self._synced
                del self._entries[count:], self._starts[count:]
                self._offset = offset
                try:
                    self._write_all(struct.pack("<I", offset), _JOURNAL_LAST_OFFSET_AT)
                    os.ftruncate(self._fd, offset)
                except OSError:
                    pass  # repair_journal cuts a torn tail at the next start
                raise self._failed(exc, "syncing") from None
            self._dirty = False
            self._synced = (len(self._entries), self._offset)

    def _cut(self, offset: int) -> None:
        try:
            self._write_all(struct.pack("<I", offset), _JOURNAL_LAST_OFFSET_AT)
            os.ftruncate(self._fd, offset)
        except OSError as exc:
            raise self._failed(exc, "truncating") from None
        self._offset, self._dirty = offset, True

    def _forget_after(self, count: int) -> None:
        del self._entries[count:], self._starts[count:]
        self._synced = min(self._synced, (count, self._offset))

    def clear(self):
        self._cut(_JOURNAL_FIRST_RECORD)
        self._forget_after(0)
        self.sync()

    def deleteEntriesFrom(self, entryFrom):
        if entryFrom >= len(self._entries):
            return
        self._cut(self._starts[entryFrom])
        self._forget_after(entryFrom)

    def deleteEntriesTo(self, entryTo):
        """Log compaction: the kept entries go to a new file that replaces the old one whole (pysyncobj
        rewrote its file in place, so a crash in the middle lost the entries after the snapshot)."""
        kept = self._entries[entryTo:]
        parts, starts, offset = [_header()], [], _JOURNAL_FIRST_RECORD
        for entry in kept:
            record = _record(*entry)
            parts.append(record)
            starts.append(offset)
            offset += len(record)
        image = bytearray(b"".join(parts))
        struct.pack_into("<I", image, _JOURNAL_LAST_OFFSET_AT, offset)
        try:
            self.sync()
            durable.write_atomic(Path(self.path), bytes(image))
            fd = os.open(self.path, os.O_RDWR)
        except OSError as exc:
            Path(self.path + ".tmp").unlink(missing_ok=True)  # a partial copy must not keep the space it took
            raise self._failed(exc, "compacting") from None
        os.close(self._fd)
        self._fd, self._entries, self._starts, self._offset = fd, kept, starts, offset
        self._synced, self._dirty = (len(kept), offset), False

    def __getitem__(self, item):
        return self._entries[item]

    def __len__(self):
        return len(self._entries)

    def _destroy(self):
        try:
            self.sync()
        except JournalWriteError:
            pass  # logged when it failed; what it could not sync was never acknowledged
        finally:
            os.close(self._fd)

    def flush(self):
        self.sync()

    def setRaftCommitIndex(self, raftCommitIndex):
        self.sync()  # nothing is applied or acknowledged on an entry that is only in the page cache
        self._meta["raftCommitIndex"] = raftCommitIndex
        self._meta_saved = False

    def getRaftCommitIndex(self):
        return self._meta.get("raftCommitIndex", 1)

    def _store_meta(self) -> None:
        durable.write_atomic(Path(self._meta_path), syncobj_pickle.dumps(self._meta))
        self._meta_saved = True

    def setCurrentTerm(self, term, votedForNodeId):
        # Raft needs term and vote on the disk before any message that shows them (a vote) is sent.
        self._meta["currentTerm"] = term
        self._meta["votedForNodeId"] = votedForNodeId
        try:
            self._store_meta()
        except OSError as exc:
            raise self._failed(exc, "storing term and vote") from None

    def getCurrentTerm(self):
        return self._meta.get("currentTerm", 0)

    def getVotedForNodeId(self):
        return self._meta.get("votedForNodeId", None)

    def onOneSecondTimer(self):
        if not self._meta_saved:
            try:
                self._store_meta()
            except OSError:
                pass  # the commit index is a hint (pysyncobj recomputes it); retried next second


def _create_journal(journal_file=None):
    if journal_file is None:
        return syncobj_journal.MemoryJournal()
    return AppendJournal(journal_file)


def _store_meta_durably(self, meta) -> None:
    durable.write_atomic(Path(self.getPath()), syncobj_pickle.dumps(meta))


syncobj_module.createJournal = _create_journal
syncobj_journal.MetaStorer.storeMeta = _store_meta_durably

"""A Raft journal torn by a power loss (pysyncobj never fsyncs it) is cut back to its last whole record, so the
node starts and catches up instead of failing to start for ever (seen in the VM failover test)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from pysyncobj.journal import FileJournal

from cortex.client import CortexError
from cortex.raft.consensus import repair_journal
from tests.support.wait import wait_until


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


def put_retrying(client, key: str, value: str, timeout: float = 20.0) -> None:
    """A write through a survivor while the cluster elects a new leader: retried under one idempotency key."""
    wait_until(lambda: client.write("kv.put", {"key": key, "value": value}, idempotency_key=key) or True, timeout,
               f"a write of {key} through a survivor", interval=0.1, ignore=(CortexError,))


def test_a_server_that_lost_its_unsynced_state_rejoins_instead_of_leading_alone(make_cluster):
    """The VM failover test's power loss, on loopback: the first server comes back with its state store
    rolled back to before the others joined and its Raft log gone. It must follow the existing leader and
    catch up, never elect itself in a cluster of its own (it did: its peers came from the store)."""
    cluster = make_cluster(servers=3)
    first = cluster.dc.servers[0]  # ran `cortex init`: its join-time peer list holds only itself
    data = Path(first.dir) / "data"
    for node in cluster.dc.servers:  # every server keeps the Raft configuration on the disk
        members = json.loads((Path(node.dir) / "data" / "raft-members.json").read_text())["members"]
        assert sorted(members) == sorted(n.raft_address for n in cluster.dc.servers)
    with cluster.client(cluster.leader()) as c:
        for i in range(50):
            c.put(f"before-{i}", str(i))
    cluster.kill(first.id)
    # a power loss that took everything written without fsync (the worst case before the fix)
    for name in ("state.db", "state.db-wal", "state.db-shm", "raft.journal", "raft.journal.meta", "raft.snapshot"):
        (data / name).unlink(missing_ok=True)
    survivor = next(n.id for n in cluster.dc.servers if n.id != first.id)
    with cluster.client(survivor) as c:
        for i in range(50):
            put_retrying(c, f"after-{i}", str(i))
    cluster.start(first.id)
    def caught_up() -> bool:
        with cluster.client(first.id, timeout=2) as c:
            status = c.status()
            assert not (status.state == "leader" and len(status.nodes) < 3), \
                f"{first.id} leads a cluster of its own: {status}"
            return c.get("before-49", level="stale") == "49" and c.get("after-49", level="stale") == "49"

    wait_until(caught_up, 30, f"{first.id} to catch up; logs in {cluster.dc.dir}", interval=0.2, ignore=(CortexError,))
    digests = cluster.wait_converged()
    assert len(set(digests.values())) == 1, digests

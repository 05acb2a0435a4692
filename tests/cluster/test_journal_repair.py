"""A server that lost what it never synced (the Raft journal, the state store's last writes) in a power loss
rejoins and catches up instead of leading a cluster of its own (seen in the VM failover test). The journal
repair itself: tests/unit/test_journal_repair.py."""

from __future__ import annotations

import json
from pathlib import Path

from cortex.client import CortexError
from tests.support.wait import wait_until


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

"""The new commit index reaches the followers on the next AppendEntries, not on one of its own per write.

pysyncobj (batching off) followed every applied write with an AppendEntries to each follower that carried
nothing but the commit index, and each follower answered it: on the leader's one tick thread, twice the
messages per write. Two RaftNodes in this process on loopback (real journals, stores and transport), with a
heartbeat slow enough that heartbeats cannot be mistaken for those notices (one every 0.5 s); the follower must still apply
every write.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cortex.config import RaftConfig
from cortex.core.state import StateStore
from cortex.raft.consensus import RaftNode
from tests.support.cluster import free_base_port
from tests.support.envelopes import env
from tests.support.wait import wait_until

WRITES = 40
# heartbeats every 0.5 s: 40 writes take a fraction of that, so a notice per write would outnumber them
RAFT = RaftConfig(heartbeat_interval=0.5, election_timeout_min=1.6, election_timeout_max=2.2,
                  leader_fallback_timeout=1.2, connection_timeout=4.0)


@pytest.fixture
def pair(tmp_path: Path):
    base = free_base_port(width=2)
    addresses = [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
    nodes = []
    for i, address in enumerate(addresses):
        (tmp_path / f"s{i}").mkdir()
        store = StateStore(tmp_path / f"s{i}" / "state.db")
        nodes.append(RaftNode(store, address, addresses, RAFT, "secret", tmp_path / f"s{i}"))
    yield nodes
    for node in nodes:
        node.destroy()
        node.store.close()


def test_writes_carry_the_commit_index_on_the_next_append_and_the_follower_applies_them_all(pair):
    leader = wait_until(lambda: next((n for n in pair if n.is_leader()), None), 60, "a leader", interval=0.05)
    follower = next(n for n in pair if n is not leader)
    wait_until(lambda: follower.raftLastApplied == leader.raftLastApplied, 30, "the follower level at start")
    transport = leader._SyncObj__transport
    sent: list[dict] = []
    real_send = transport.send

    def noting_send(node, message):
        if isinstance(message, dict) and message.get("type") == "append_entries":
            sent.append(message)
        return real_send(node, message)

    transport.send = noting_send
    for i in range(WRITES):
        leader.propose(env("kv.put", {"key": f"n/{i}", "value": "v"}, term=leader.term()), timeout=30)
    carrying = [m for m in sent if m.get("entries")]
    bare = [m for m in sent if not m.get("entries")]
    assert len(carrying) >= WRITES
    # heartbeats (one a second) and the one notice after the last write; never one per write
    assert len(bare) < WRITES // 2, f"{len(bare)} AppendEntries without entries for {WRITES} writes"
    wait_until(lambda: follower.raftLastApplied == leader.raftLastApplied, 30,
               "the follower applies every write (the last one on the notice after it)", interval=0.02)
    assert follower.store.query("kv.get", {"key": f"n/{WRITES - 1}"})["value"] == "v"

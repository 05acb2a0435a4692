"""A follower acknowledges an AppendEntries only once the entries it vouches for are on the disk.

Raft counts an acknowledged entry as held by that server for good: a leader commits (and answers the client)
once a majority acknowledged. A follower that answers first and syncs later can lose, in a power loss, an entry
the leader already counted, and with the leader lost too the write is gone although it was acknowledged.
One real RaftNode (journal, state store, transport on loopback) receives an AppendEntries as from its leader;
every message it sends is noted with how many journal entries an fdatasync had vouched for at that moment.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cortex.config import RaftConfig
from cortex.core.state import StateStore
from cortex.raft.consensus import RaftNode
from tests.support.cluster import free_base_port
from tests.support.envelopes import env


@pytest.fixture
def follower(tmp_path: Path):
    base = free_base_port(width=2)
    me, leader = f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"  # nobody listens as the leader: this node follows
    store = StateStore(tmp_path / "state.db")
    node = RaftNode(store, me, [me, leader], RaftConfig(), "secret", tmp_path)
    yield node, next(n for n in node.otherNodes if n.id == leader)
    node.destroy()
    store.close()


def test_a_follower_syncs_its_journal_before_it_acknowledges(follower):
    node, leader = follower
    transport = node._SyncObj__transport
    sent: list[tuple[dict, int]] = []
    real_send = transport.send

    def noting_send(to, message):
        if to == leader and isinstance(message, dict):
            sent.append((message, node.journal._synced[0]))  # entries the last fdatasync covered
        return real_send(to, message)

    transport.send = noting_send
    last = node.journal[-1]
    term = node.term() + 1
    entries = [(env("kv.put", {"key": f"k{i}", "value": "v"}, term=term), last[1] + 1 + i, term) for i in range(3)]
    node._SyncObj__onMessageReceived(leader, {
        "type": "append_entries", "term": term, "commit_index": 0,
        "prevLogIdx": last[1], "prevLogTerm": last[2], "entries": entries})

    acks = [(m, synced) for m, synced in sent if m.get("type") == "next_node_idx" and m.get("success")]
    assert acks, f"no acknowledgement sent: {sent}"
    message, synced = acks[0]
    assert message["next_node_idx"] == entries[-1][1] + 1
    # the acknowledged entries are the journal's first `synced` entries (its list starts at index 1)
    assert synced >= len(node.journal) and node.journal[synced - 1][1] == entries[-1][1], \
        f"acknowledged up to entry {entries[-1][1]} while the disk held {synced} entries"

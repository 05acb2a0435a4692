"""The members of the cluster as this server's replica records them, indexed in memory.

Every worker heartbeat asks the leader "is this node a member?" and "which servers are there?", and a follower
that forwards it asks "which server is the leader at this Raft address?". Reading the whole nodes table for
that made the work per heartbeat grow with the cluster. The roster answers
both from an index that is rebuilt only when a command that can write the nodes table (the `node` and
`member` families) has been applied, or a snapshot restored, since the last build. A liveness transition
(`node.liveness`) is no such command: it changes no membership, and a fleet changing state together (a leader
that stalled past suspect_after, then heard everyone again) rebuilt the index once per transition, for as
many transitions as nodes. So the roster leaves liveness out; read it from the `nodes` query.
"""

from __future__ import annotations

from typing import NamedTuple

from cortex.core.state import StateStore

# the command families whose handlers write the nodes table (nodes.py, domain.py), and the one command of
# them that changes only liveness columns
FAMILIES = ("node", "member")
LIVENESS_ONLY = "node.liveness"
LIVENESS_COLUMNS = ("liveness", "liveness_since")


class _View(NamedTuple):
    generation: tuple[int, ...]
    by_id: dict[str, dict]
    servers: tuple[str, ...]
    by_raft: dict[str, dict]


class Roster:
    def __init__(self, store: StateStore):
        self._store = store
        self._view = _View((), {}, (), {})

    def _current(self) -> _View:
        view, (nodes, members, liveness, restored) = self._view, self._store.generation(*FAMILIES, LIVENESS_ONLY)
        generation = (nodes - liveness, members, restored)
        if view.generation != generation:
            # The count is read before the table: rows newer than the count only cause one more rebuild.
            rows = [{k: v for k, v in n.items() if k not in LIVENESS_COLUMNS} for n in self._store.query("nodes", {})]
            view = _View(generation, {n["id"]: n for n in rows},
                         tuple(n["grpc_address"] for n in rows if n["role"] == "server"),
                         {n["raft_address"]: n for n in reversed(rows) if n["raft_address"]})  # first wins
            self._view = view  # replaced whole: readers on other threads see the old view or the new one
        return view

    def node(self, node_id: str) -> dict | None:
        """The member's row (as the `nodes` query gives it, without liveness), or None when it is not a
        member."""
        row = self._current().by_id.get(node_id)
        return dict(row) if row is not None else None

    def servers(self) -> list[dict]:
        """The member servers' rows (the `nodes` query leaves out nodes that left; a member.* command brings a
        node into that state or out of it, and rebuilds the view)."""
        return [dict(n) for n in self._current().by_id.values() if n["role"] == "server"]

    def node_by_raft(self, raft_address: str) -> dict | None:
        """The member whose Raft address this is (a server), or None: the leader's, on every forwarded request."""
        row = self._current().by_raft.get(raft_address)
        return dict(row) if row is not None else None

    def server_grpc_addresses(self) -> list[str]:
        return list(self._current().servers)

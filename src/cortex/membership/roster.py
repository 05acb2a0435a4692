"""The members of the cluster as this server's replica records them, indexed in memory.

Every worker heartbeat asks the leader "is this node a member?" and "which servers are there?". Reading the
whole nodes table for that made the leader's work per heartbeat grow with the cluster. The roster answers
both from an index that is rebuilt only when a command that can write the nodes table (the `node` and
`member` families) has been applied, or a snapshot restored, since the last build.
"""

from __future__ import annotations

from typing import NamedTuple

from cortex.core.state import StateStore

# the command families whose handlers write the nodes table (nodes.py, domain.py)
FAMILIES = ("node", "member")


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
        view, generation = self._view, self._store.generation(*FAMILIES)
        if view.generation != generation:
            # The count is read before the table: rows newer than the count only cause one more rebuild.
            rows = self._store.query("nodes", {})
            by_raft: dict[str, dict] = {}
            for n in rows:  # the first row naming an address, as a scan of the table finds it
                if n["raft_address"]:
                    by_raft.setdefault(n["raft_address"], n)
            view = _View(generation, {n["id"]: n for n in rows},
                         tuple(n["grpc_address"] for n in rows if n["role"] == "server"), by_raft)
            self._view = view  # replaced whole: readers on other threads see the old view or the new one
        return view

    def node(self, node_id: str) -> dict | None:
        """The member's row (as the `nodes` query gives it), or None when it is not a member."""
        row = self._current().by_id.get(node_id)
        return dict(row) if row is not None else None

    def servers(self) -> list[dict]:
        """The servers' rows, those that left included (their liveness says so)."""
        return [dict(n) for n in self._current().by_id.values() if n["role"] == "server"]

    def node_by_raft(self, raft_address: str) -> dict | None:
        """The member whose Raft port is `raft_address` (None: none): the leader's, on every forwarded write."""
        row = self._current().by_raft.get(raft_address)
        return dict(row) if row is not None else None

    def server_grpc_addresses(self) -> list[str]:
        return list(self._current().servers)

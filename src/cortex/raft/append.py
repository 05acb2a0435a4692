"""The follower's side of AppendEntries: keep the entries this log already holds (`reconcile_append`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# --- a follower appends only what it lacks ------------------------------------------------------------
# Raft (Figure 2, AppendEntries step 3) deletes a follower's entries only where one conflicts with the
# leader's (same index, other term). pysyncobj deletes everything after prevLogIdx whenever it has more, so an
# AppendEntries that arrives late (the leader rewound on an old rejection, or resent after a reconnect) makes
# a follower drop entries it already applied ("truncating already-applied log entries"), write them again,
# and answer with a shorter log, which rewinds the leader again. Under a write load that loop kept a follower's
# log far behind what it had applied, so its replica stopped moving for tens of seconds (a revoked
# certificate still accepted there, CI). `reconcile_append` trims such a message before pysyncobj sees it.

@dataclass(frozen=True)
class AppendPlan:
    """What to do with one AppendEntries: hand `message` to pysyncobj as it is or trimmed (ack None), or, when
    every entry is already here, let pysyncobj see only its term and commit index and acknowledge
    `ack_next_index` (the index after the message's last entry, never after entries it did not vouch for)."""

    message: dict
    ack_next_index: int | None = None


def reconcile_append(message: dict, term_at: Callable[[int], int | None], last_index: int) -> AppendPlan:
    """Drop the leading entries of an AppendEntries that this log already holds with the same term.

    `term_at(i)` is the term of this log's entry i (None: not in this log, past its end or compacted away).
    Messages this cannot judge (chunked transmissions, snapshots, a prevLogIdx this log lacks or holds with
    another term) pass unchanged: pysyncobj answers those with a reset, as before.
    """
    if message.get("type") != "append_entries" or "prevLogIdx" not in message or "transmission" in message:
        return AppendPlan(message)
    prev_idx, prev_term = message["prevLogIdx"], message["prevLogTerm"]
    if prev_idx >= last_index or term_at(prev_idx) != prev_term:
        return AppendPlan(message)  # appends at the end, or pysyncobj must refuse it
    entries = list(message.get("entries") or [])
    held = 0
    for entry in entries:
        index, term = entry[1], entry[2]
        if index > last_index or term_at(index) != term:
            break  # missing here, or a real conflict: pysyncobj deletes from this entry on, as Raft does
        held += 1
    if held < len(entries):
        if held:
            message = {**message, "prevLogIdx": entries[held - 1][1], "prevLogTerm": entries[held - 1][2],
                       "entries": entries[held:]}
        return AppendPlan(message)
    # Every entry is here already (or a heartbeat behind this log's end): nothing to write. Commit no further
    # than the message vouches for: entries after it may be a deposed leader's.
    end = entries[-1][1] if entries else prev_idx
    bare = {k: v for k, v in message.items() if k not in ("prevLogIdx", "prevLogTerm", "entries")}
    bare["commit_index"] = min(message["commit_index"], end)
    return AppendPlan(bare, ack_next_index=end + 1)


# --- a follower's rejection points the leader at its commit index ---------------------------------------
# pysyncobj's follower rejects an AppendEntries whose prevLogIdx it lacks with "next index = my last index + 1"
# and one whose prevLogIdx holds another term with "next index = prevLogIdx", and the leader sets its next
# index to whatever a rejection says. The leader pipelines: after rewinding it sends several batches in one
# round. When the follower's tail holds entries of an older term (a deposed leader's, never committed), the
# first batch is rejected with "prevLogIdx" and every later batch with "last index + 1", so the leader ends
# each round where it began, streaming the same batches for ever while the follower never truncates its tail
# (seen after partition heals; tests/cluster/test_heal.py). pysyncobj 0.3.17 (its syncobj.py, read as installed
# here: __onMessageReceived, 'append_entries' and 'next_node_idx') has no guard against this, and we know of
# no upstream release that has one, so the rule lives here. The follower's
# commit index is the fix: committed entries are in every later leader's log, so "next index = commit + 1"
# is always accepted on the next round, and every rejection from one follower then names the same index or a
# later one, so no late answer can undo an earlier one. It is correct whatever the leader runs.

def rejection_next_index(proposed: int, commit_index: int, first_index: int) -> int:
    """The next index a follower names when it rejects an AppendEntries: pysyncobj's `proposed`, but never
    past the entry after its commit index (or after the first entry it still holds, when compaction has
    taken the log beyond its commit index: that entry is in its snapshot, so committed too)."""
    return min(proposed, max(commit_index, first_index) + 1)


# --- a snapshot chunk commits nothing -------------------------------------------------------------------
# pysyncobj's follower takes every AppendEntries' commit index as "committed up to min(that, my last index)",
# snapshot chunks included, which vouch for none of its entries. A server holding a deposed leader's entries of
# its old term (never committed) that is brought level by a snapshot thus marked them committed on the first
# chunk and applied them (a write nobody acknowledged, visible there until the snapshot replaced its state;
# tests/cluster/test_heal.py). pysyncobj 0.3.17 as installed here does so; we know of no upstream release
# that does not. The snapshot, once loaded,
# commits what it holds (RaftNode raises the commit index to it).

def snapshot_chunk(message: dict, commit_index: int) -> dict:
    """A snapshot chunk (an AppendEntries with 'serialized', no prevLogIdx) with its commit index held to this
    server's own, so the chunk commits none of this log's entries; other messages unchanged."""
    if message.get("type") != "append_entries" or "serialized" not in message or "prevLogIdx" in message:
        return message
    return {**message, "commit_index": min(message["commit_index"], commit_index)}

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

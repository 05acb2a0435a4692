"""ReadIndex (Raft thesis 6.4): a linearizable read that appends nothing to the log.

A read used to commit a no-op barrier entry before it was answered: a disk write on a majority and a log entry
per read. Instead the leader, for the reads that have arrived,
1. waits until an entry of its own term is committed (pysyncobj appends a no-op when elected, `__noopIDx`;
   before it commits, the commit index may lag behind what an earlier leader committed);
2. notes its commit index;
3. confirms that it is still the leader: it sends every peer a numbered ping ("cx_read_index") and waits for a
   majority, itself included, to answer with an acknowledgement of the same number in its term. A server that
   acknowledges is in this term, so it had voted in no later one, and no later leader (which needs a majority,
   hence one of them) can have committed anything before the read arrived. The numbers matter: an answer to
   pysyncobj's earlier heartbeats may have been written before the read arrived (a paused leader finds them
   queued on its sockets when it resumes), so those answers (`__lastResponseTime`) do not count;
4. hands back the noted index; the caller waits until its replica has applied it and reads from the replica.
A follower asks the leader for that index (node/router.py) and waits for its own replica to apply it.

Reads that arrive while a round is out wait for the next one, so concurrent reads share one round. A round
starts at once (the tick thread is woken), not at the next heartbeat; for a follower's read the leader also
sends AppendEntries at once when its last one carried an earlier commit index, so the follower learns the
commit index without waiting for a heartbeat.

Rolling updates: a server with this module says so in pre-vote's hello ("read_index": 1). When the servers
known to answer pings are no majority (older servers drop the unknown message), or a round is not confirmed
within ROUND_TIMEOUT, the read is not confirmed (`ReadUnconfirmed`) and the router falls back to a barrier
entry, as before: slower, never less safe.

pysyncobj keeps the commit index, the election no-op and the AppendEntries send private; they are listed in
PRIVATE_NAMES, used only here, and tests/unit/test_readindex.py fails if an upgrade renames one.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from pysyncobj import SyncObj

from cortex.raft.errors import NotLeader, ProposalError

PING = "cx_read_index"
ACK = "cx_read_index_ack"
ROUND_TIMEOUT = 1.0  # seconds a round may wait for a majority before its reads fall back to a barrier entry
LEADER = 2  # pysyncobj's _RAFT_STATE.LEADER (checked with prevote's copy in the tests)

# pysyncobj 0.3.17's private names this module relies on: methods of SyncObj, or attributes its __init__ sets.
PRIVATE_METHODS = ("_SyncObj__sendAppendEntries",)
PRIVATE_ATTRIBUTES = ("_SyncObj__raftCommitIndex", "_SyncObj__noopIDx", "_SyncObj__raftState",
                      "_SyncObj__transport", "_SyncObj__pipeNotifier")
PRIVATE_NAMES = PRIVATE_METHODS + PRIVATE_ATTRIBUTES


class ReadUnconfirmed(ProposalError):
    """This leader could not confirm its leadership for a read in time: read through a barrier entry instead."""


def majority(acknowledged: int, others: int) -> bool:
    """Whether `acknowledged` peers and the leader itself are a majority of `others` + 1 servers (pysyncobj's
    own quorum rule)."""
    return acknowledged + 1 > (others + 1) / 2


@dataclass(eq=False)  # a ticket is itself: removed from the queue by identity
class _Ticket:
    propagate: bool  # a follower's read: send the commit index to the followers at once
    done: threading.Event = field(default_factory=threading.Event)
    index: int = 0
    error: Exception | None = None


@dataclass
class _Round:
    seq: int
    term: int
    index: int  # the commit index when the round started
    started: float
    tickets: list[_Ticket]


class ReadIndex(SyncObj):
    """Mixed into RaftNode before PreVote and SyncObj; `_readindex_setup` runs before SyncObj.__init__ and
    `_readindex_start` after it."""

    def _readindex_setup(self) -> None:
        self._ri_lock = threading.Lock()  # guards _ri_pending (gRPC threads add, the tick thread takes)
        self._ri_pending: list[_Ticket] = []
        self._ri_round: _Round | None = None  # tick thread only, as everything below
        self._ri_seq = 0
        self._ri_acked: dict[str, tuple[int, int]] = {}  # peer id -> (term, highest ping number) it acknowledged
        self._ri_capable: dict[str, bool] = {}  # peer id -> its last hello said it answers pings
        self._ri_applied = threading.Condition()
        self._ri_applied_seen = -1
        self._ri_commit_sent = -1  # the commit index the last AppendEntries carried
        self.read_index_counts = {"rounds": 0, "confirmed": 0, "unconfirmed": 0}  # for status and tests

    def _readindex_start(self) -> None:
        self.addOnTickCallback(self._readindex_tick)

    def _hello_fields(self) -> dict:
        return {"read_index": 1}

    # --- the caller's side (any thread) -------------------------------------------------------------------
    def read_index(self, timeout: float = ROUND_TIMEOUT * 2, propagate: bool = False) -> int:
        """Leader only: a log index that every write acknowledged before this call is at or below. Raises
        NotLeader, or ReadUnconfirmed when leadership could not be confirmed in time."""
        if self._SyncObj__raftState != LEADER:
            raise NotLeader("not the leader", maybe_applied=False)
        ticket = _Ticket(propagate)
        with self._ri_lock:
            self._ri_pending.append(ticket)
        notifier = getattr(self, "_SyncObj__pipeNotifier", None)
        if notifier is not None:
            notifier.notify()  # wake the tick thread from its poll: the round starts now
        if not ticket.done.wait(timeout):
            with self._ri_lock:
                if ticket in self._ri_pending:
                    self._ri_pending.remove(ticket)
            if not ticket.done.is_set():
                raise ReadUnconfirmed(f"leadership not confirmed within {timeout:.1f}s", maybe_applied=False)
        if ticket.error is not None:
            raise ticket.error
        return ticket.index

    def wait_applied(self, index: int, timeout: float) -> bool:
        """Wait until this replica has applied `index` (False when it has not within `timeout`)."""
        deadline = time.monotonic() + timeout
        with self._ri_applied:
            while self.raftLastApplied < index:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._ri_applied.wait(min(left, 0.1))  # the tick notifies; the bound covers a notify missed
        return True

    # --- the tick thread ----------------------------------------------------------------------------------
    def _readindex_tick(self) -> None:
        applied = self.raftLastApplied
        if applied != self._ri_applied_seen:
            self._ri_applied_seen = applied
            with self._ri_applied:
                self._ri_applied.notify_all()
        self._readindex_step(time.monotonic())

    def _readindex_step(self, now: float) -> None:
        r = self._ri_round
        if self._SyncObj__raftState != LEADER or (r is not None and r.term != self.raftCurrentTerm):
            self._ri_round = None
            with self._ri_lock:
                tickets, self._ri_pending = self._ri_pending, []
            self._ri_finish((r.tickets if r else []) + tickets, error=NotLeader("leadership changed",
                                                                                 maybe_applied=False))
            return
        if r is not None:
            if self._ri_confirmed(r):
                self._ri_end(r)
            elif now - r.started > ROUND_TIMEOUT:
                self._ri_end(r, ReadUnconfirmed(f"no majority confirmed this leader within {ROUND_TIMEOUT:.1f}s",
                                                maybe_applied=False))
        if self._ri_round is not None or not self._ri_pending:
            return
        commit, noop = self._SyncObj__raftCommitIndex, self._SyncObj__noopIDx
        if noop is None or commit < noop:
            return  # no entry of this term committed yet: wait for the election's no-op
        with self._ri_lock:
            tickets, self._ri_pending = self._ri_pending, []
        others = list(self.otherNodes)
        if not majority(sum(1 for n in others if self._ri_capable.get(n.id)), len(others)):
            self._ri_finish(tickets, error=ReadUnconfirmed("a majority of the servers run a version without "
                                                           "read rounds", maybe_applied=False))
            return
        self._ri_seq += 1
        r = self._ri_round = _Round(self._ri_seq, self.raftCurrentTerm, commit, now, tickets)
        self.read_index_counts["rounds"] += 1
        if commit > self._ri_commit_sent and any(t.propagate for t in tickets):
            self._SyncObj__sendAppendEntries()  # the followers learn this commit index now, not at a heartbeat
        ping = {"type": PING, "term": r.term, "seq": r.seq}
        for node in others:
            self._SyncObj__transport.send(node, ping)
        if self._ri_confirmed(r):  # a single server
            self._ri_end(r)

    def _SyncObj__sendAppendEntries(self):
        # Every AppendEntries send (heartbeats, new entries) carries the commit index: noted, so that a round
        # sends one only when the followers have not been told this commit index yet.
        self._ri_commit_sent = self._SyncObj__raftCommitIndex
        SyncObj._SyncObj__sendAppendEntries(self)

    def _ri_confirmed(self, r: _Round) -> bool:
        others = self.otherNodes
        acked = sum(1 for n in others if self._ri_acked.get(n.id, (-1, -1)) >= (r.term, r.seq)
                    and self._ri_acked[n.id][0] == r.term)
        return majority(acked, len(others))

    def _ri_end(self, r: _Round, error: Exception | None = None) -> None:
        self._ri_round = None
        for t in r.tickets:
            t.index = r.index
        self._ri_finish(r.tickets, error)

    def _ri_finish(self, tickets: list[_Ticket], error: Exception | None) -> None:
        self.read_index_counts["unconfirmed" if error else "confirmed"] += len(tickets)
        for t in tickets:
            t.error = error
            t.done.set()

    def _SyncObj__onMessageReceived(self, node, message):
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == PING:
            self._ri_answer(node, message)
            return
        if kind == ACK:
            self._ri_tally(node, message)
            return
        if kind == "cx_hello":  # pre-vote's hello, which says whether the peer answers pings
            self._ri_capable[node.id] = bool(message.get("read_index"))
        super()._SyncObj__onMessageReceived(node, message)

    def _ri_answer(self, node, message: dict) -> None:
        # Acknowledge only a leader of this server's own term: a server in a later term may have voted there.
        term = message.get("term")
        self._SyncObj__transport.send(node, {"type": ACK, "term": term, "seq": message.get("seq"),
                                             "ok": term == self.raftCurrentTerm,
                                             "current_term": self.raftCurrentTerm})

    def _ri_tally(self, node, message: dict) -> None:
        term, seq = message.get("term"), message.get("seq")
        if not isinstance(term, int) or not isinstance(seq, int):
            return
        r = self._ri_round
        if message.get("ok") and term == self.raftCurrentTerm:
            self._ri_acked[node.id] = max(self._ri_acked.get(node.id, (-1, -1)), (term, seq))
            if r is not None and self._ri_confirmed(r):
                self._ri_end(r)
                self._readindex_step(time.monotonic())  # the reads that arrived meanwhile: their round now
        elif r is not None and isinstance(message.get("current_term"), int) \
                and message["current_term"] > r.term:
            # A server is in a later term: this leader is deposed (pysyncobj steps down on its next answer).
            self._ri_end(r, NotLeader("a later term exists; leadership changed", maybe_applied=False))

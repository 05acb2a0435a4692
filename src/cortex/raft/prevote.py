"""Pre-vote (Raft thesis 9.6) for pysyncobj, which has none.

Without it a server that hears no leader (cut off by a partition, stalled on a full disk, paused) starts an
election every timeout, each one a term higher; when it is back its RequestVote carries that term, every
server adopts it and a healthy leader is deposed (seen: term 3 -> 66 after one leader's disk filled). With
pre-vote a server whose election timeout expires first asks the others whether they would vote for it in the
next term: yes when its log is at least as up to date as theirs and they have not heard from a leader within
the minimum election timeout. Only with a majority of yes does pysyncobj's own election (term + 1,
RequestVote) go ahead, so a server that cannot reach a majority never raises its term. Asking changes nothing
on either side: no term, no vote, no election deadline.

Check-quorum is pysyncobj's leaderFallbackTimeout (raft.leader_fallback_timeout, below the minimum election
timeout): a leader that has not heard from a majority that long steps down. Pre-vote keeps that former leader
from raising its term afterwards, so its return disturbs no one.

Rolling updates: the messages are new types ("cx_pre_vote", "cx_pre_vote_response", "cx_hello"); an older
pysyncobj-based server drops a message type it does not know. Every server with this module says hello on each
new connection and about once a second after; a peer that kept sending Raft messages over a connection for
LEGACY_AFTER seconds without one hello is an older server and counts as a yes (its only behaviour), so a mixed
cluster still elects. A silent peer is never taken for an older one: silence is what a cut-off peer looks like
too, and counting it would let a cut-off server raise its term (seen: a peer cut off before its first hello).

pysyncobj keeps the election start inline in `_onTick` and the message dispatch private, so this hooks both
through its private (name-mangled) attributes. They are all listed in PRIVATE_NAMES, used only here (and by
consensus.py's own overrides), and tests/unit/test_prevote.py fails if an upgrade renames one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from pysyncobj import SyncObj

log = logging.getLogger("cortex.consensus")

PRE_VOTE = "cx_pre_vote"
PRE_VOTE_RESPONSE = "cx_pre_vote_response"
HELLO = "cx_hello"
HELLO_EVERY = 1.0  # seconds between hellos to each connected peer
LEGACY_AFTER = 5.0  # a peer connected this long, talking Raft but never saying hello, is an older server
HELLO_GRACE = 2.0  # Raft messages in a connection's first seconds may overtake its first hello: not evidence
WARN_AFTER, WARN_EVERY = 5.0, 60.0  # a server refused this long says so in its log, at most once a minute

# pysyncobj's private names this module (and consensus.py) relies on: methods of SyncObj, or attributes its
# __init__ sets. pysyncobj 0.3.17.
PRIVATE_METHODS = ("_onTick", "_SyncObj__onMessageReceived", "_SyncObj__generateRaftTimeout",
                   "_SyncObj__getCurrentLogIndex", "_SyncObj__getCurrentLogTerm", "_SyncObj__setCurrentTerm",
                   "_SyncObj__setState", "_SyncObj__connectedToAnyone", "_SyncObj__getEntries",
                   "_SyncObj__sendNextNodeIdx", "_SyncObj__doChangeCluster",
                   "_SyncObj__updateClusterConfiguration", "_SyncObj__applyLogEntries")
PRIVATE_ATTRIBUTES = ("_SyncObj__raftState", "_SyncObj__raftElectionDeadline", "_SyncObj__transport",
                      "_SyncObj__transferInProgress", "_SyncObj__connectedNodes", "_SyncObj__raftLeader",
                      "_SyncObj__mainThread", "_SyncObj__newAppendEntriesTime")
PRIVATE_NAMES = PRIVATE_METHODS + PRIVATE_ATTRIBUTES
FOLLOWER, CANDIDATE, LEADER = 0, 1, 2  # pysyncobj's _RAFT_STATE


def would_grant(*, proposed_term: int, last_log_index: int, last_log_term: int, current_term: int,
                own_last_index: int, own_last_term: int, heard_from_leader: bool) -> bool:
    """The pre-vote rule: the asker would win this server's vote in `proposed_term` (its term + 1)."""
    if proposed_term <= current_term or heard_from_leader:
        return False
    return last_log_term > own_last_term or (last_log_term == own_last_term and last_log_index >= own_last_index)


@dataclass
class _Round:
    term: int  # the term the election would be in
    granted: set[str] = field(default_factory=set)


class PreVote(SyncObj):
    """Mixed into RaftNode before SyncObj; `_prevote_setup` runs before SyncObj.__init__ starts ticking."""

    def _prevote_setup(self, min_election_timeout: float) -> None:
        self._pv_min_timeout = min_election_timeout
        self._pv_round: _Round | None = None
        self._pv_passed_for: int | None = None  # the term a pre-vote majority approved, until used
        self._pv_leader_heard = float("-inf")  # monotonic time of the last AppendEntries from a current leader
        self._pv_hello_at: dict[str, float] = {}  # peer id -> its last hello
        self._pv_connected_since: dict[str, float] = {}  # peer id -> since when it is connected
        self._pv_talked_at: dict[str, float] = {}  # peer id -> its last Raft message (not ours)
        self._pv_hello_sent = float("-inf")
        self._pv_refused_since: float | None = None  # first round of the current run without a majority
        self._pv_warned = float("-inf")
        self.pre_votes = {"rounds": 0, "won": 0, "granted": 0, "refused": 0}  # counters for status and tests

    def _hello_fields(self) -> dict:
        """What a hello says besides itself (other mixins add what they support; older servers ignore it)."""
        return {}

    # --- the election start ------------------------------------------------------------------------
    def _onTick(self, timeToWait=0.0):
        if self._SyncObj__transport.ready:
            self._prevote_tick(time.monotonic())
        super()._onTick(timeToWait)

    def _prevote_tick(self, now: float) -> None:
        others = self.otherNodes
        connected = self._SyncObj__connectedNodes
        for node in others:
            if node not in connected:
                self._pv_connected_since.pop(node.id, None)
            elif node.id not in self._pv_connected_since:
                self._pv_connected_since[node.id] = now
                self._SyncObj__transport.send(node, {"type": HELLO, **self._hello_fields()})  # first on a new connection
        if now - self._pv_hello_sent >= HELLO_EVERY:
            self._pv_hello_sent = now
            for node in others:
                if node in connected:
                    self._SyncObj__transport.send(node, {"type": HELLO, **self._hello_fields()})

        if self._SyncObj__raftState == LEADER or self.selfNode is None or not others:
            self._pv_round = None
            return
        if self._SyncObj__raftElectionDeadline >= now or self._SyncObj__transferInProgress \
                or not self._SyncObj__connectedToAnyone():
            return  # no election due; a leader's TimeoutNow skips pre-vote, as the thesis allows
        if self._pv_passed_for == self.raftCurrentTerm + 1:
            self._pv_passed_for = None
            return  # a majority said yes: pysyncobj starts the real election in this tick
        # Hold pysyncobj's election back one timeout and ask first.
        self._SyncObj__raftElectionDeadline = now + self._SyncObj__generateRaftTimeout()
        self._SyncObj__raftLeader = None  # no word from it for an election timeout, as pysyncobj's election
        self._prevote_warn(now)
        self._pv_round = _Round(term=self.raftCurrentTerm + 1, granted={self.selfNode.id})
        self.pre_votes["rounds"] += 1
        message = {"type": PRE_VOTE, "term": self._pv_round.term,
                   "last_log_index": self._SyncObj__getCurrentLogIndex(),
                   "last_log_term": self._SyncObj__getCurrentLogTerm()}
        for node in others:
            self._SyncObj__transport.send(node, message)
        self._prevote_count(now)

    def _prevote_warn(self, now: float) -> None:
        """Rounds that keep failing mean this server is cut off from the majority: say so, with what to check."""
        if self._pv_refused_since is None:
            self._pv_refused_since = now
        elif now - self._pv_refused_since >= WARN_AFTER and now - self._pv_warned >= WARN_EVERY:
            self._pv_warned = now
            log.warning("no leader heard and no majority for an election; keeping the term and asking again "
                        "(check this server's network and the other servers' Raft port)",
                        extra={"fields": {"for_s": round(now - self._pv_refused_since, 1),
                                          "term": self.raftCurrentTerm}})

    def _prevote_legacy(self, peer: str, now: float) -> bool:
        since = self._pv_connected_since.get(peer)
        return since is not None and now - since >= LEGACY_AFTER and self._pv_hello_at.get(peer, -1.0) < since \
            and self._pv_talked_at.get(peer, -1.0) - since >= HELLO_GRACE

    def _prevote_count(self, now: float) -> None:
        r = self._pv_round
        if r is None or r.term != self.raftCurrentTerm + 1:
            self._pv_round = None
            return
        yes = len(r.granted) + sum(1 for n in self.otherNodes
                                   if n.id not in r.granted and self._prevote_legacy(n.id, now))
        if yes > (len(self.otherNodes) + 1) / 2:
            self._pv_round, self._pv_refused_since = None, None
            self._pv_passed_for = r.term
            self._SyncObj__raftElectionDeadline = 0  # due now: the next tick lets pysyncobj elect
            self.pre_votes["won"] += 1

    # --- the messages --------------------------------------------------------------------------------
    def _SyncObj__onMessageReceived(self, node, message):
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == HELLO:
            self._pv_hello_at[node.id] = time.monotonic()
            return
        if kind == PRE_VOTE:
            self._prevote_answer(node, message)
            return
        if kind == PRE_VOTE_RESPONSE:
            self._pv_hello_at[node.id] = time.monotonic()
            self._prevote_tally(node, message)
            return
        self._pv_talked_at[node.id] = time.monotonic()
        if kind == "append_entries" and message.get("term", -1) >= self.raftCurrentTerm:
            self._pv_leader_heard = time.monotonic()
            self._pv_round, self._pv_passed_for, self._pv_refused_since = None, None, None
        super()._SyncObj__onMessageReceived(node, message)

    def _prevote_answer(self, node, message: dict) -> None:
        now = time.monotonic()
        self._pv_hello_at[node.id] = now
        try:
            granted = self.selfNode is not None and would_grant(
                proposed_term=int(message["term"]), last_log_index=int(message["last_log_index"]),
                last_log_term=int(message["last_log_term"]), current_term=self.raftCurrentTerm,
                own_last_index=self._SyncObj__getCurrentLogIndex(), own_last_term=self._SyncObj__getCurrentLogTerm(),
                heard_from_leader=self._SyncObj__raftState == LEADER
                or now - self._pv_leader_heard < self._pv_min_timeout)
        except (KeyError, TypeError, ValueError):
            log.warning("malformed pre-vote request ignored", extra={"fields": {"peer": node.id}})
            return
        self.pre_votes["granted" if granted else "refused"] += 1
        self._SyncObj__transport.send(node, {"type": PRE_VOTE_RESPONSE, "term": message["term"],
                                             "granted": granted, "current_term": self.raftCurrentTerm})

    def _prevote_tally(self, node, message: dict) -> None:
        their_term = message.get("current_term", -1)
        if not message.get("granted") and isinstance(their_term, int) and their_term > self.raftCurrentTerm:
            # Refused by a server in a later term: take that term (as any Raft message with a higher term
            # makes a server do). The term exists already, so this raises no one else's; without it a server
            # whose log is ahead but whose term is behind could never be voted for nor vote (no progress).
            self._SyncObj__setCurrentTerm(their_term, None)
            self._SyncObj__setState(FOLLOWER)
            self._SyncObj__raftLeader = None
            self._pv_round = None
            return
        r = self._pv_round
        if r is not None and message.get("granted") and message.get("term") == r.term:
            r.granted.add(node.id)
            self._prevote_count(time.monotonic())

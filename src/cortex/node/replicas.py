"""The leader's watch over its followers' logs: every upkeep round it feeds raft/convergence.py with Raft's
match indexes, so `cortex status` and the alerts can tell a replica that is alive but never converges from one
that is keeping up. Followers and workers hold no such view: the leader is the one that knows the indexes."""

from __future__ import annotations

import logging
import threading
import time

from cortex.node.logs import fields
from cortex.node.member import Member
from cortex.raft.convergence import STUCK, ConvergenceTracker

log = logging.getLogger("cortex.agent")


class ReplicaWatch:
    def __init__(self, member: Member):
        self.member = member
        self.tracker = ConvergenceTracker(member.config.raft.replica_stuck_after)
        self._lock = threading.Lock()
        self._term = -1  # the term in which this node, as leader, started watching

    def step(self) -> None:
        """Leader only: one observation of every server's match index (the upkeep loop calls it each round)."""
        replica = self.member.replica
        with self._lock:
            raft = replica.raft.status() if replica is not None else None
            if raft is None or raft.state != "leader":
                if self._term != -1:  # a follower's copy of the indexes is meaningless: judge afresh next term
                    self.tracker.reset()
                    self._term = -1
                return
            if raft.term != self._term:  # pysyncobj starts every match index over on winning an election
                self.tracker.reset()
                self._term = raft.term
            now = time.monotonic()
            self.tracker.retain(set(raft.match_index))
            for address, match in sorted(raft.match_index.items()):
                change = self.tracker.observe(address, now, raft.commit_index, match)
                if change is None:
                    continue
                if change.new == STUCK:
                    log.warning("replica stuck: its log is not catching up with the leader's",
                                extra=fields(raft=address, lag=change.lag, commit=raft.commit_index,
                                             match=match, window=self.tracker.window))
                else:
                    log.info("replica converging again", extra=fields(raft=address, lag=change.lag))

    def state(self, raft_address: str) -> str:
        """progressing | stuck, or "" when this node (not the leader, or just elected) has no view yet."""
        return self.tracker.state(raft_address) or ""

    def stuck_for(self, raft_address: str, now: float) -> float:
        return self.tracker.stuck_for(raft_address, now)

"""Leadership hand-over without a write gap: TimeoutNow as the Raft thesis (3.10) describes it.

pysyncobj's `transferLeadership` sends TimeoutNow only if the target's match index equals the leader's last
index at that instant, and keeps appending new proposals afterwards. Under a steady write load the first rule
refuses almost every request (an entry is nearly always in flight), and the second lets the old leader's log
run ahead of the target's while the target starts its election: the old leader (and a follower that received
those entries) refuse it their vote, nobody leads until an election timeout passes (seen: 0.70 s write gap on
a busy machine, as long as after a kill -9), and the entries appended meanwhile are discarded.

Here the leader, on a hand-over request:
1. appends no new proposals: they stay in pysyncobj's queue (held, not failed);
2. waits until the target's match index equals its last index (replication goes on as usual);
3. sends the target TimeoutNow (pysyncobj's message: the target starts an election at once, and
   raft/prevote.py lets it skip pre-vote). Its log is now at least as up to date as every other server's,
   so it wins in one round;
4. once another server leads, fails the held proposals with NOT_LEADER. They were never appended, so the
   write path (node/router.py) sends them on to the new leader with their idempotency keys.
A target that is not connected fails at once; one that does not catch up, or is not leading, within the bound
(`hold_for`) makes the leader take proposals again and keep leading.

Everything runs on pysyncobj's tick thread (`_checkCommandsToApply` is called once per tick, right after
replies are processed); the caller's thread only files the request and waits for its outcome. The pysyncobj
internals used are listed in PRIVATE_NAMES (tests/unit/test_handover.py fails if an upgrade renames one).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from pysyncobj import FAIL_REASON, SyncObj

from cortex.raft.errors import ProposalError

LEADER = 2  # pysyncobj's _RAFT_STATE.LEADER

PRIVATE_METHODS = ("_checkCommandsToApply", "_SyncObj__getCurrentLogIndex", "_SyncObj__callErrCallback")
PRIVATE_ATTRIBUTES = ("_SyncObj__raftState", "_SyncObj__raftLeader", "_SyncObj__raftMatchIndex",
                      "_SyncObj__connectedNodes", "_SyncObj__commandsQueue", "_SyncObj__transport",
                      "_SyncObj__lastResponseTime")
PRIVATE_NAMES = PRIVATE_METHODS + PRIVATE_ATTRIBUTES


class HandOverError(ProposalError):
    """The hand-over did not happen; this server still leads (or never did). The message says what to do."""


@dataclass
class _Request:
    target: str | None  # raft address, None: the most up-to-date follower
    hold_for: float
    started: float = field(default_factory=time.monotonic)
    chosen: str = ""  # the follower asked to take over
    sent: bool = False  # TimeoutNow sent
    error: str = ""  # set when it failed
    leader: str = ""  # the new leader's raft address, when it moved
    done: threading.Event = field(default_factory=threading.Event)


def pick_target(candidates: dict[str, tuple[int, float]]) -> str:
    """The most up-to-date follower: highest match index, then the most recent reply. `candidates`: raft
    address -> (match index, last reply time), connected followers only. '' when there is none."""
    if not candidates:
        return ""
    return max(candidates, key=lambda a: (candidates[a][0], candidates[a][1], a))


def decide(*, leading: bool, leader: str, me: str, target: str, connected: bool, match: int, last: int,
           sent: bool, expired: bool) -> str:
    """One tick of a hand-over: 'moved' (another server leads), 'send' (TimeoutNow now), 'hold' (keep holding
    proposals), or why it failed ('down', 'behind', 'lost': TimeoutNow sent but no one took over in time)."""
    if not leading:
        if leader and leader != me:
            return "moved"
        return "lost" if expired else "hold"  # stepped down, the election is on: hold a little longer
    if not connected:
        return "down"
    if expired:
        return "lost" if sent else "behind"
    if match >= last and not sent:
        return "send"
    return "hold"


class HandOver(SyncObj):
    """Mixed into RaftNode before SyncObj; `_handover_setup` runs before SyncObj.__init__ starts ticking."""

    def _handover_setup(self) -> None:
        self._ho_lock = threading.Lock()
        self._ho: _Request | None = None
        self.hand_overs = {"moved": 0, "failed": 0}  # counters for status and tests

    def hand_over(self, target: str | None, hold_for: float) -> str:
        """Make `target` (a raft address; None: the most up-to-date follower) the leader. Returns the new
        leader's raft address; raises HandOverError when it did not happen (this server then still leads,
        or the election that followed is still open). Proposals wait at most `hold_for` seconds meanwhile."""
        if self._SyncObj__raftState != LEADER:
            raise HandOverError("this server is not the leader; ask the leader (`cortex status` names it)")
        me = self.selfNode.id
        if target == me:
            return me  # leads already
        if target is not None and target not in {n.id for n in self.otherNodes}:
            raise HandOverError(f"{target} is not a voting server of this cluster; see `cortex nodes`")
        request = _Request(target=target, hold_for=hold_for)
        with self._ho_lock:
            if self._ho is not None:
                raise HandOverError("a leadership hand-over is already under way; retry in a second")
            self._ho = request
        # the tick thread takes it from here; wait a little past its own bound for its word
        if not request.done.wait(hold_for + 5.0):
            with self._ho_lock:
                if self._ho is request:
                    self._ho = None
            raise HandOverError(f"the hand-over got no answer within {hold_for + 5.0:.1f}s (the Raft thread "
                                "is stalled?); check `cortex status`")
        if request.error:
            raise HandOverError(request.error)
        return request.leader

    # --- on the tick thread --------------------------------------------------------------------------
    def _checkCommandsToApply(self):
        request = self._ho
        if request is not None and self._handover_tick(request):
            return  # holding: new proposals stay queued
        super()._checkCommandsToApply()

    def _handover_tick(self, request: _Request) -> bool:
        """Advance `request`; True while proposals are to be held."""
        me = self.selfNode.id if self.selfNode is not None else ""
        leading = self._SyncObj__raftState == LEADER
        if leading and not request.chosen:
            request.chosen = request.target or pick_target({
                n.id: (self._SyncObj__raftMatchIndex.get(n, 0), self._SyncObj__lastResponseTime.get(n, 0.0))
                for n in self.otherNodes if n in self._SyncObj__connectedNodes})
        node = next((n for n in self.otherNodes if n.id == request.chosen), None)
        leader = self._SyncObj__raftLeader
        last = self._SyncObj__getCurrentLogIndex()
        match = self._SyncObj__raftMatchIndex.get(node, 0) if node is not None else 0
        step = decide(leading=leading, leader=leader.id if leader is not None else "", me=me,
                      target=request.chosen, connected=node is not None and node in self._SyncObj__connectedNodes,
                      match=match, last=last, sent=request.sent,
                      expired=time.monotonic() - request.started >= request.hold_for)
        if step == "hold":
            return True
        if step == "send":
            self._SyncObj__transport.send(node, {"type": "timeout_now", "term": self.raftCurrentTerm})
            request.sent = True
            return True
        if step == "moved":
            request.leader = leader.id
            self._handover_fail_held()
            self.hand_overs["moved"] += 1
        else:
            who = request.chosen or "no follower"
            request.error = {
                "down": f"{who} is not connected to the leader (down, or cut off), so it cannot take over; "
                        "check it with `cortex status`, or name another server",
                "behind": f"{who} did not catch up with the leader within {request.hold_for:.1f}s "
                          f"({last - match} entries behind); this server keeps leading. Retry, or leave the "
                          "target out to pick the most up-to-date server",
                "lost": f"{who} did not take over within {request.hold_for:.1f}s; "
                        + ("this server keeps leading. Retry" if leading else
                           "an election decides the leader now. Check `cortex status`"),
            }[step]
            if not request.chosen:
                request.error = "no follower is connected to the leader, so none can take over; check " \
                                "`cortex status`"
            self.hand_overs["failed"] += 1
            if not leading:
                self._handover_fail_held()
        with self._ho_lock:
            self._ho = None
        request.done.set()
        return False

    def _handover_fail_held(self) -> None:
        """Fail the proposals held while this server led: never appended, so they are safe to send on to the
        new leader (pysyncobj would forward them itself, but with the old term stamped in, they would be
        applied as refusals)."""
        commands = self._SyncObj__commandsQueue
        while True:
            try:
                _command, callback = commands.get_nowait()
            except queue.Empty:
                return
            self._SyncObj__callErrCallback(FAIL_REASON.NOT_LEADER, callback)

"""A leader handing over while writes keep coming: Raft's TimeoutNow only works if the leader's log stops
growing first. Before it held proposals back, entries it appended between the TimeoutNow and the target's
vote request made its log longer than the target's, it refused the target its vote and was elected again
(`cortex leader transfer` answered with the old leader; a joining server in the agent tests never took over).
Three Raft servers in this process on loopback (tests/support/raftlab.py), real SQLite stores."""

from __future__ import annotations

import threading

import pytest

from cortex.raft.consensus import NotLeader, ProposalError
from tests.support import raftlab
from tests.support.cluster import free_base_port
from tests.support.envelopes import env
from tests.support.wait import wait_until

HAND_OVERS = 5


@pytest.fixture
def lab(tmp_path):
    lab = raftlab.Lab(tmp_path / "lab", free_base_port())
    try:
        yield lab
    finally:
        lab.close()


def test_hand_over_succeeds_while_writes_keep_coming(lab):
    stop = threading.Event()
    acked: list[str] = []

    def writer() -> None:
        n = 0
        while not stop.is_set():
            leader = next((node for node in lab.nodes if node.is_leader()), None)
            if leader is None:
                stop.wait(0.01)
                continue
            key = f"w{n}"
            n += 1
            try:
                result, _ = leader.propose(env("kv.put", {"key": key, "value": "x"}, term=leader.term()), timeout=5)
                if "error" not in result:  # a deposed leader's stamp is refused by every replica: not acked
                    acked.append(key)
            except (NotLeader, ProposalError):
                pass  # refused while handing over, or lost with a leadership change: not acknowledged

    threads = [threading.Thread(target=writer, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for round_ in range(HAND_OVERS):
            old = lab.leader()
            wanted = 20 * (round_ + 1)
            wait_until(lambda wanted=wanted: len(acked) > wanted, 30, "writes flowing")
            old.transfer_leadership_to(None, timeout=10)
            # another server leads, and the old leader follows it: never the old one elected again
            new = lab.leader(timeout=15, exclude=(old,))
            wait_until(lambda old=old: not old.is_leader(), 10, f"hand-over {round_}: {old.selfNode.id} to follow")
            # the new leader takes writes at once, even one that handed over a moment ago itself: a hold
            # ends with the term it was taken in
            lab.put(new, f"after-hand-over-{round_}", "x", timeout=5)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    # nothing acknowledged was lost across the hand-overs (read from the stores: a server brought level by a
    # snapshot never applied the entries before it one by one)
    wait_until(lab.converged, 20, "every replica equal")
    for node in lab.nodes:
        missing = [k for k in acked if node.store.query("kv.get", {"key": k}) is None]
        assert not missing, (node.selfNode.id, missing[:5])

"""The hand-over's rule (raft/handover.py), and the pysyncobj internals it hooks (an upgrade that renames one
fails here instead of silently turning the held proposals back into refused ones)."""

import inspect
import threading
import time

import pytest
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.syncobj import _RAFT_STATE

from cortex.raft import handover, prevote
from cortex.raft.consensus import RaftNode
from tests.support.cluster import free_base_port
from tests.support.wait import wait_until


def test_pysyncobj_still_has_every_private_name_used():
    assigned = set(SyncObj.__init__.__code__.co_names)
    missing = [n for n in handover.PRIVATE_METHODS if not callable(getattr(SyncObj, n, None))]
    missing += [n for n in handover.PRIVATE_ATTRIBUTES if n not in assigned]
    assert not missing, f"pysyncobj renamed {missing}: update raft/handover.py"
    assert handover.LEADER == _RAFT_STATE.LEADER


def test_held_proposals_are_the_ones_pysyncobj_has_not_appended_yet():
    # Holding works by not draining the queue that _checkCommandsToApply appends from, once per tick; the
    # target's election is started by pysyncobj's own TimeoutNow handling.
    check = inspect.getsource(SyncObj._checkCommandsToApply)
    assert "self.__commandsQueue.get_nowait()" in check and "self.__raftLog.add(command, idx, term)" in check
    assert "self._checkCommandsToApply()" in inspect.getsource(SyncObj._onTick)
    received = inspect.getsource(SyncObj._SyncObj__onMessageReceived)
    assert "message['type'] == 'timeout_now'" in received and "self.__raftElectionDeadline = 0" in received
    mro = RaftNode.__mro__
    assert mro.index(handover.HandOver) < mro.index(SyncObj)


def test_the_most_up_to_date_follower_is_picked():
    assert handover.pick_target({}) == ""
    assert handover.pick_target({"a:1": (10, 5.0), "b:1": (12, 1.0), "c:1": (11, 9.0)}) == "b:1"
    assert handover.pick_target({"a:1": (12, 5.0), "b:1": (12, 6.0)}) == "b:1"  # then the latest reply


BASE = dict(leading=True, leader="me:1", me="me:1", target="t:1", connected=True, match=10, last=10, sent=False,
            expired=False)


@pytest.mark.parametrize("change, step", [
    ({}, "send"),  # caught up: TimeoutNow
    ({"match": 9}, "hold"),  # an entry still on its way: wait for its acknowledgement
    ({"sent": True}, "hold"),  # asked; the target's election is running
    ({"connected": False}, "down"),  # fails at once, proposals flow again
    ({"match": 9, "expired": True}, "behind"),
    ({"sent": True, "expired": True}, "lost"),
    ({"leading": False, "leader": "t:1", "sent": True}, "moved"),
    ({"leading": False, "leader": "o:1", "sent": True}, "moved"),  # another server won: moved all the same
    ({"leading": False, "leader": "", "sent": True}, "hold"),  # stepped down, no leader heard yet
    ({"leading": False, "leader": "", "sent": True, "expired": True}, "lost"),
])
def test_each_tick_decides(change, step):
    assert handover.decide(**{**BASE, **change}) == step


# --- in one process: real pysyncobj servers on loopback ------------------------------------------------------

class _Server(handover.HandOver, prevote.PreVote):
    """A pysyncobj server with pre-vote and the hand-over, as RaftNode mixes them in (a list as its state)."""

    def __init__(self, address: str, peers: list[str]):
        conf = SyncObjConf(appendEntriesUseBatch=False, raftMinTimeout=0.5, raftMaxTimeout=1.0,
                           appendEntriesPeriod=0.05, leaderFallbackTimeout=0.4, autoTickPeriod=0.05,
                           connectionRetryTime=0.2, connectionTimeout=30.0)
        self._prevote_setup(conf.raftMinTimeout)
        self._handover_setup()
        self.values: list[str] = []
        super().__init__(address, peers, conf)

    @replicated
    def add(self, value: str) -> str:
        self.values.append(value)
        return value


@pytest.fixture
def trio():
    base = free_base_port(width=3)
    addresses = [f"127.0.0.1:{base + i}" for i in range(3)]
    servers = [_Server(a, [p for p in addresses if p != a]) for a in addresses]
    yield servers
    for s in servers:
        s.destroy()


def _leader(servers: list[_Server]) -> _Server:
    return wait_until(lambda: next((s for s in servers if s._isLeader()), None), 30, "a leader", interval=0.05)


def test_a_hand_over_under_writes_discards_nothing_and_loses_nothing(trio):
    old = _leader(trio)
    acked, failures, stop = [], [], threading.Event()

    def writer(n: int) -> None:
        i = 0
        while not stop.is_set():
            done, box = threading.Event(), {}
            target = next((s for s in trio if s._isLeader()), None)
            if target is None:
                time.sleep(0.005)
                continue
            value = f"{n}-{i}"
            i += 1
            target.add(value, callback=lambda result, error, box=box, done=done: (box.update(error=error), done.set()))
            if not done.wait(10):
                failures.append((value, "no answer"))
            elif box["error"] == FAIL_REASON.SUCCESS:
                acked.append(value)
            elif box["error"] != FAIL_REASON.NOT_LEADER:  # held, never appended: the writer asks the new leader
                failures.append((value, box["error"]))

    threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(acked) >= 50, 30, "writes before the hand-over")
        new = old.hand_over(None, hold_for=2.0)  # an entry is nearly always in flight here
        assert new != old.selfNode.id and old.hand_overs == {"moved": 1, "failed": 0}
        wait_until(lambda: {s._getLeader().id if s._getLeader() else "" for s in trio} == {new}, 30,
                   "every server following the new leader")
        count = len(acked)
        wait_until(lambda: len(acked) >= count + 50, 30, "writes after the hand-over")
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert not failures, f"writes discarded or refused during the hand-over: {failures[:5]}"
    for s in trio:
        wait_until(lambda s=s: set(acked) <= set(s.values), 30, f"every acknowledged write on {s.selfNode.id}")
        assert len(s.values) == len(set(s.values))


def test_a_hand_over_to_a_server_that_is_down_fails_at_once_and_the_leader_stays(trio):
    leader = _leader(trio)
    down = next(s for s in trio if s is not leader)
    address = down.selfNode.id
    down.destroy()
    wait_until(lambda: not leader.isNodeConnected(next(n for n in leader.otherNodes if n.id == address)), 30,
               "the leader seeing the server gone")
    started = time.monotonic()
    with pytest.raises(handover.HandOverError, match="not connected to the leader"):
        leader.hand_over(address, hold_for=2.0)
    assert time.monotonic() - started < 1.0 and leader._isLeader()
    with pytest.raises(handover.HandOverError, match="not a voting server"):
        leader.hand_over("127.0.0.1:1", hold_for=2.0)
    done = threading.Event()
    leader.add("after", callback=lambda result, error: done.set())
    assert done.wait(10) and "after" in leader.values

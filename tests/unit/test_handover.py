"""The hand-over's rule (raft/handover.py), and the pysyncobj internals it hooks (an upgrade that renames one
fails here instead of silently turning the held proposals back into refused ones)."""

import inspect

import pytest
from pysyncobj import SyncObj
from pysyncobj.syncobj import _RAFT_STATE

from cortex.raft import handover
from cortex.raft.consensus import RaftNode


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

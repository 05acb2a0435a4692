"""Pre-vote's rule, and the pysyncobj internals raft/prevote.py hooks (an upgrade that renames one fails here
instead of silently turning pre-vote, or the election itself, off)."""

import inspect

import pytest
from pysyncobj import SyncObj, SyncObjConf
from pysyncobj.syncobj import _RAFT_STATE

from cortex.raft import prevote
from cortex.raft.consensus import RaftNode
from tests.support.cluster import free_base_port
from tests.support.wait import wait_until


def test_pysyncobj_still_has_every_private_name_hooked():
    assigned = set(SyncObj.__init__.__code__.co_names)
    missing = [n for n in prevote.PRIVATE_METHODS if not callable(getattr(SyncObj, n, None))]
    missing += [n for n in prevote.PRIVATE_ATTRIBUTES if n not in assigned]
    assert not missing, f"pysyncobj renamed {missing}: update raft/prevote.py and raft/consensus.py"
    assert (_RAFT_STATE.FOLLOWER, _RAFT_STATE.CANDIDATE, _RAFT_STATE.LEADER) == \
        (prevote.FOLLOWER, prevote.CANDIDATE, prevote.LEADER)


def test_the_election_start_pre_vote_holds_back_is_where_it_looks():
    # The hook works by moving the election deadline that _onTick tests before it raises the term.
    tick = inspect.getsource(SyncObj._onTick)
    assert "self.__raftElectionDeadline < monotonicTime() and self.__connectedToAnyone()" in tick
    assert tick.index("__raftElectionDeadline < monotonicTime()") < tick.index("self.__raftCurrentTerm + 1")
    assert "self.__transferInProgress = True" in inspect.getsource(SyncObj._SyncObj__onMessageReceived)
    assert "self._onTick(" in inspect.getsource(SyncObj._autoTickThread)  # overridable, not mangled


def test_the_raft_node_runs_pre_vote_before_pysyncobj():
    mro = RaftNode.__mro__
    assert mro.index(prevote.PreVote) < mro.index(SyncObj)
    assert "super()._SyncObj__onMessageReceived" in inspect.getsource(RaftNode._SyncObj__onMessageReceived)


BASE = dict(proposed_term=6, last_log_index=10, last_log_term=5, current_term=5, own_last_index=10,
            own_last_term=5, heard_from_leader=False)


@pytest.mark.parametrize("change, granted", [
    ({}, True),  # as up to date, no leader heard: yes
    ({"heard_from_leader": True}, False),  # a live leader: the asker is the one cut off
    ({"last_log_index": 9}, False),  # shorter log, same last term
    ({"last_log_index": 3, "last_log_term": 6, "proposed_term": 7}, True),  # later last term wins over length
    ({"last_log_term": 4, "last_log_index": 20}, False),  # earlier last term loses whatever the length
    ({"proposed_term": 5}, False),  # not beyond this server's term: it must learn the term first
    ({"last_log_index": 11}, True),
])
def test_pre_vote_rule(change, granted):
    assert prevote.would_grant(**{**BASE, **change}) is granted


# --- in one process: real pysyncobj servers on loopback ------------------------------------------------------

class _Updated(prevote.PreVote):
    """A pysyncobj server with pre-vote, as RaftNode mixes it in (without the state machine)."""

    def __init__(self, address: str, peers: list[str], conf: SyncObjConf):
        self._prevote_setup(conf.raftMinTimeout)
        super().__init__(address, peers, conf)


def _conf(stands: bool) -> SyncObjConf:
    # A server that never stands times out only after ten minutes: the other one must be elected.
    low = 0.3 if stands else 600.0
    return SyncObjConf(raftMinTimeout=low, raftMaxTimeout=low * 2, appendEntriesPeriod=0.05,
                       leaderFallbackTimeout=0.25, autoTickPeriod=0.05, connectionRetryTime=0.2,
                       connectionTimeout=max(30.0, low * 2))


@pytest.fixture
def pair():
    base = free_base_port(width=2)
    a, b = f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"
    made = []

    def make(peer_updated: bool):
        standing = _Updated(a, [b], _conf(stands=True))
        made.append(standing)
        peer = (_Updated if peer_updated else SyncObj)(b, [a], _conf(stands=False))
        made.append(peer)
        return standing, peer

    yield make
    for node in made:
        node.destroy()


def test_an_updated_server_is_elected_with_an_older_servers_vote(pair):
    # The older server drops the pre-vote messages unanswered; after LEGACY_AFTER without its hello it
    # counts as a yes, so the updated one stands and wins its real vote (a rolling update keeps electing).
    standing, older = pair(peer_updated=False)
    wait_until(standing._isLeader, 60, "the updated server elected with the older server's vote", interval=0.1)
    assert standing.pre_votes["won"] >= 1
    assert older._getLeader() == standing.selfNode and older.raftCurrentTerm == standing.raftCurrentTerm


def test_an_updated_server_is_elected_with_an_updated_servers_pre_vote(pair):
    standing, peer = pair(peer_updated=True)
    wait_until(standing._isLeader, 60, "the updated server elected after its peer's pre-vote", interval=0.1)
    assert standing.pre_votes["won"] >= 1 and peer.pre_votes["granted"] >= 1
    assert peer._getLeader() == standing.selfNode and peer.raftCurrentTerm == standing.raftCurrentTerm

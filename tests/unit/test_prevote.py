"""Pre-vote's rule, and the pysyncobj internals raft/prevote.py hooks (an upgrade that renames one fails here
instead of silently turning pre-vote, or the election itself, off)."""

import inspect
import time
from types import SimpleNamespace

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
    source = inspect.getsource(RaftNode)  # every message reaches pre-vote's dispatch, none goes around it
    assert "super()._SyncObj__onMessageReceived" in source and "SyncObj._SyncObj__onMessageReceived(" not in \
        source.replace("super()._SyncObj__onMessageReceived(", "")


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
    # The peer stands only after a few seconds: the updated server's own pre-vote comes first.
    low = 0.3 if stands else 2.0
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


def test_an_older_server_is_recognised_once_it_talks_and_a_mixed_pair_elects(pair):
    # The older server drops the pre-vote messages unanswered and stands by itself (a few seconds here); the
    # updated one votes for it as before, then counts it as a yes from its Raft traffic without a hello.
    standing, older = pair(peer_updated=False)
    leader = wait_until(lambda: standing._getLeader(), 60, "a leader in the mixed pair", interval=0.1)
    assert older._getLeader() == leader and older.raftCurrentTerm == standing.raftCurrentTerm
    wait_until(lambda: standing._prevote_legacy(older.selfNode.id, time.monotonic()), 60,
               "the older server recognised by its Raft traffic without a hello", interval=0.1)


def test_an_updated_server_is_elected_with_an_updated_servers_pre_vote(pair):
    standing, peer = pair(peer_updated=True)
    wait_until(standing._isLeader, 60, "the updated server elected after its peer's pre-vote", interval=0.1)
    assert standing.pre_votes["won"] >= 1 and peer.pre_votes["granted"] >= 1
    assert peer._getLeader() == standing.selfNode and peer.raftCurrentTerm == standing.raftCurrentTerm


@pytest.mark.parametrize("hello, talked, counted", [
    (None, None, False),  # silent since it connected: cut off or older, so not a yes (a cut-off peer's term)
    (None, 3.0, True),  # talks Raft over the connection, never says hello: an older server
    (1.0, 3.0, False),  # said hello: updated, its pre-vote answer counts
    (None, 1.0, False),  # its only Raft message came before its first hello could: not evidence
    (-1.0, 3.0, True),  # a hello from before this connection (it restarted older): an older server
])
def test_which_peer_counts_as_an_older_server(hello, talked, counted):
    since, now = 100.0, 100.0 + prevote.LEGACY_AFTER
    node = SimpleNamespace(_pv_connected_since={"p": since}, _pv_hello_at={} if hello is None else {"p": since + hello},
                           _pv_talked_at={} if talked is None else {"p": since + talked})
    assert prevote.PreVote._prevote_legacy(node, "p", now) is counted
    assert not prevote.PreVote._prevote_legacy(node, "p", since + prevote.LEGACY_AFTER - 0.1)

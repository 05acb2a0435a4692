"""ReadIndex (raft/readindex.py): the pysyncobj internals it reads, its quorum rule, and real pysyncobj servers
on loopback in one process confirming reads without appending to the log."""

import inspect
from types import SimpleNamespace

import pytest
from pysyncobj import SyncObj, SyncObjConf
from pysyncobj.syncobj import _RAFT_STATE

from cortex.raft import prevote, readindex
from cortex.raft.consensus import RaftNode
from cortex.raft.errors import NotLeader, ProposalError
from tests.support.cluster import free_base_port
from tests.support.wait import wait_until


def test_pysyncobj_still_has_every_private_name_read():
    assigned = set(SyncObj.__init__.__code__.co_names)
    missing = [n for n in readindex.PRIVATE_METHODS if not callable(getattr(SyncObj, n, None))]
    missing += [n for n in readindex.PRIVATE_ATTRIBUTES if n not in assigned]
    assert not missing, f"pysyncobj renamed {missing}: update raft/readindex.py"
    assert readindex.LEADER == _RAFT_STATE.LEADER == prevote.LEADER


def test_pysyncobj_still_appends_a_no_op_when_elected():
    # Rule 1 of a read round (an entry of the leader's own term committed) waits for this no-op's index.
    elected = inspect.getsource(SyncObj._SyncObj__onBecomeLeader)
    assert "_COMMAND_TYPE.NO_OP" in elected and "self.__noopIDx = idx" in elected
    # ... and commits only entries of its own term by counting replicas, so a commit index at or beyond the
    # no-op covers every entry an earlier leader committed.
    assert "if commitTerm != self.__raftCurrentTerm:" in inspect.getsource(SyncObj._onTick)


def test_the_raft_node_runs_read_rounds_before_pre_vote():
    mro = RaftNode.__mro__
    assert mro.index(readindex.ReadIndex) < mro.index(prevote.PreVote) < mro.index(SyncObj)


@pytest.mark.parametrize("acknowledged, others, confirmed", [
    (0, 0, True),  # a single server
    (1, 2, True), (0, 2, False),  # three servers: the leader and one more
    (1, 3, False), (2, 3, True),  # four: three of them
    (2, 4, True), (1, 4, False),
])
def test_majority(acknowledged, others, confirmed):
    assert readindex.majority(acknowledged, others) is confirmed


def test_only_an_acknowledgement_of_this_round_or_a_later_one_in_its_term_counts():
    # An answer to an earlier ping may have been written before the read arrived (a paused leader finds it
    # queued when it resumes): it must not confirm a round started after it.
    peers = [SimpleNamespace(id="b"), SimpleNamespace(id="c")]
    r = readindex._Round(seq=5, term=3, index=10, started=0.0, tickets=[])

    def confirmed(acked: dict) -> bool:
        return readindex.ReadIndex._ri_confirmed(SimpleNamespace(otherNodes=peers, _ri_acked=acked), r)

    assert not confirmed({"b": (3, 4), "c": (3, 4)})  # earlier pings
    assert not confirmed({"b": (2, 9), "c": (2, 7)})  # an earlier term
    assert not confirmed({"b": (4, 1)})  # a later term: not this leader's
    assert confirmed({"b": (3, 5)}) and confirmed({"c": (3, 6), "b": (3, 1)})


# --- in one process: real pysyncobj servers on loopback ------------------------------------------------------

class _Server(readindex.ReadIndex, prevote.PreVote):
    """A pysyncobj server with read rounds and pre-vote, mixed in as RaftNode does (no state machine)."""

    def __init__(self, address: str, peers: list[str], conf: SyncObjConf):
        self._prevote_setup(conf.raftMinTimeout)
        self._readindex_setup()
        super().__init__(address, peers, conf)
        self._readindex_start()


class _Older(prevote.PreVote):
    """A server of the version before read rounds: pre-vote only."""

    def __init__(self, address: str, peers: list[str], conf: SyncObjConf):
        self._prevote_setup(conf.raftMinTimeout)
        super().__init__(address, peers, conf)


def _conf(stands: bool) -> SyncObjConf:
    low = 0.3 if stands else 2.0  # the others stand only after a few seconds: the first server leads
    return SyncObjConf(raftMinTimeout=low, raftMaxTimeout=low * 2, appendEntriesPeriod=0.05,
                       leaderFallbackTimeout=0.25, autoTickPeriod=0.05, connectionRetryTime=0.2,
                       connectionTimeout=max(30.0, low * 2))


@pytest.fixture
def servers():
    made = []

    def make(*kinds):
        base = free_base_port(width=len(kinds))
        addresses = [f"127.0.0.1:{base + i}" for i in range(len(kinds))]
        for i, kind in enumerate(kinds):
            made.append(kind(addresses[i], [a for a in addresses if a != addresses[i]], _conf(stands=i == 0)))
        return made

    yield make
    for node in made:
        node.destroy()


def test_reads_are_confirmed_by_a_majority_and_append_nothing(servers):
    leader, *followers = servers(_Server, _Server, _Server)
    wait_until(leader._isLeader, 60, "the first server elected", interval=0.05)
    wait_until(lambda: all(leader._ri_capable.get(f.selfNode.id) for f in followers), 60,
               "both followers' hellos saying they answer read rounds", interval=0.05)
    wait_until(lambda: leader.raftCommitIndex >= leader._SyncObj__noopIDx, 60, "the election's no-op committed")
    commit, size = leader.raftCommitIndex, leader._getRaftLogSize()
    indexes = [leader.read_index(timeout=30) for _ in range(20)]
    assert indexes == [commit] * 20
    assert (leader.raftCommitIndex, leader._getRaftLogSize()) == (commit, size), "a read appended to the log"
    assert leader.read_index_counts["rounds"] >= 1 and leader.read_index_counts["confirmed"] >= 20
    assert leader.read_index_counts["unconfirmed"] == 0
    assert all(f.wait_applied(commit, timeout=30) for f in followers)
    with pytest.raises(NotLeader):
        followers[0].read_index(timeout=5)


def test_a_leader_beside_a_majority_of_older_servers_does_not_confirm(servers):
    # The older servers drop the unknown ping; the router then commits a barrier entry, as before.
    leader, *_older = servers(_Server, _Older, _Older)
    wait_until(leader._isLeader, 60, "the first server elected", interval=0.05)
    wait_until(lambda: leader.raftCommitIndex >= leader._SyncObj__noopIDx, 60, "the election's no-op committed")
    with pytest.raises(readindex.ReadUnconfirmed, match="version without read rounds"):
        leader.read_index(timeout=30)


def test_a_leader_confirms_with_one_follower_gone_and_not_with_both(servers):
    leader, *followers = servers(_Server, _Server, _Server)
    wait_until(leader._isLeader, 60, "the first server elected", interval=0.05)
    wait_until(lambda: all(leader._ri_capable.get(f.selfNode.id) for f in followers), 60,
               "both followers' hellos saying they answer read rounds", interval=0.05)
    wait_until(lambda: leader.raftCommitIndex >= leader._SyncObj__noopIDx, 60, "the election's no-op committed")
    followers[0].destroy()
    assert leader.read_index(timeout=30) == leader.raftCommitIndex  # the leader and one follower: a majority
    followers[1].destroy()
    with pytest.raises(ProposalError):  # unconfirmed, or not the leader any more (check-quorum)
        leader.read_index(timeout=30)

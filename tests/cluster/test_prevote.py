"""A server cut off from the others must not raise the cluster's term, and a leader cut off steps down.

Without pre-vote a server that hears no leader keeps starting elections, each one a term higher; when it comes
back its RequestVote carries that term and the whole cluster jumps to it, deposing a healthy leader. With
pre-vote (raft/prevote.py) it only asks whether it would win, and never raises its term without a majority.

One server's Raft port is cut with an nftables table of the test's own (root only, loopback only), as
test_replica_stuck.py does: its Raft connections look open for a while (what a partition, a full disk or a
paused process look like from outside) while its gRPC still answers, so the test can watch its term. The
table is deleted in a `finally`. pysyncobj connects from the server with the larger address to the smaller
one, so dropping the lowest Raft port in both directions cuts all of that server's Raft traffic.
"""

from __future__ import annotations

import time

import pytest

from cortex.client import Client, CortexError
from cortex.dev import portcut
from cortex.dev.portcut import PortCut
from tests.support.cluster import Cluster, module_cluster
from tests.support.wait import wait_until

pytestmark = pytest.mark.skipif(bool(portcut.available()), reason=portcut.available() or "runs")

CUT_FOR = 8.0  # 8 to 16 election timeouts (raft.election_timeout 0.5..1.0 s): 8 or more terms without pre-vote


def raft_view(c: Cluster, node_id: str) -> tuple[str, int, str]:
    """(state, term, leader id) as the server itself reports them over gRPC."""
    with Client(c.node(node_id).grpc_address, timeout=5) as client:
        s = client.status()
    return s.state, s.term, s.leader_id


def agreed_view(c: Cluster) -> tuple[int, str] | None:
    """(term, leader) when every server reports the same term and the same leader, else None."""
    views = {raft_view(c, n.id)[1:] for n in c.dc.servers}
    if len(views) != 1:
        return None
    term, leader = views.pop()
    return (term, leader) if leader else None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from module_cluster(tmp_path_factory.mktemp("prevote"), servers=3, workers=0)


def lowest(c: Cluster):
    return min(c.dc.servers, key=lambda n: n.raft_address)


def port_of(node) -> int:
    return int(node.raft_address.rsplit(":", 1)[1])


def test_a_follower_cut_off_does_not_raise_the_term(cluster):
    c = cluster
    target = lowest(c)
    if c.leader(timeout=60) == target.id:
        other = next(n.id for n in c.dc.servers if n.id != target.id)
        with c.client(target.id) as client:
            client.transfer_leadership(other)
    term, leader = wait_until(lambda: agreed_view(c), 60, "all servers on one term and one leader")
    assert leader != target.id

    terms = []
    with PortCut(port_of(target), name="prevote"):
        end = time.monotonic() + CUT_FOR
        while time.monotonic() < end:
            terms.append(raft_view(c, target.id)[1])
            time.sleep(0.5)
        with c.client(leader) as client:  # the majority keeps committing meanwhile
            client.put("prevote/follower-cut", "x")
    print(f"cut follower's term while cut: {sorted(set(terms))}; cluster term {term}")
    assert max(terms) == term, f"{target.id} raised its term while cut off: {terms} (cluster at {term})"
    assert "no majority for an election" in target.log_path.read_text(), "the cut server did not say why"

    healed = wait_until(lambda: agreed_view(c), 60, "the cut server back on the cluster's term and leader")
    assert healed == (term, leader), f"healing a follower changed (term, leader) from {(term, leader)} to {healed}"
    assert len(set(c.wait_converged(timeout=60).values())) == 1


def test_a_leader_cut_off_steps_down_and_does_not_disturb_on_return(cluster):
    c = cluster
    target = lowest(c)
    if c.leader(timeout=60) != target.id:
        with c.client(c.leader()) as client:
            client.transfer_leadership(target.id)
    term, leader = wait_until(lambda: agreed_view(c), 60, "all servers on one term and one leader")
    assert leader == target.id, f"leadership not moved to {target.id}"

    with PortCut(port_of(target), name="prevote"):
        cut = time.monotonic()
        wait_until(lambda: raft_view(c, target.id)[0] != "leader", 30, f"{target.id} to step down when cut off",
                   interval=0.05)
        stepped = time.monotonic() - cut
        others = tuple(n.id for n in c.dc.servers if n.id != target.id)
        new_leader = wait_until(lambda: next((o for o in others if raft_view(c, o)[0] == "leader"), None), 60,
                                "the majority to elect a leader")
        new_term = raft_view(c, new_leader)[1]
        with c.client(new_leader) as client:
            client.put("prevote/leader-cut", "x")
        # The former leader refuses writes (it knows no leader), with the error that says what to do.
        with pytest.raises(CortexError, match="no leader.*retry"), Client(target.grpc_address, timeout=10) as cut:
            cut.put("prevote/refused", "x")
        time.sleep(CUT_FOR / 2)  # several election timeouts with the old leader cut off
        cut_term = raft_view(c, target.id)[1]
    print(f"cut leader stepped down {stepped:.2f}s after the cut; its term {term} -> {cut_term}; "
          f"new leader {new_leader} at term {new_term}")
    assert cut_term == term, f"the cut-off leader raised its term {term} -> {cut_term}"

    healed = wait_until(lambda: agreed_view(c), 60, "the old leader back on the cluster's term and leader")
    assert healed == (new_term, new_leader), \
        f"the old leader's return changed (term, leader) from {(new_term, new_leader)} to {healed}"
    with c.client(new_leader) as client:
        assert client.get("prevote/leader-cut") == "x" and client.get("prevote/refused") is None
    assert len(set(c.wait_converged(timeout=60).values())) == 1

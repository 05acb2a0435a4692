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

import threading
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


def test_a_deposed_leader_cut_off_serves_no_stale_linearizable_read(cluster):
    # Linearizable reads keep arriving at a leader whose Raft port is cut; the majority elects another leader,
    # which commits a write. A read at the old leader that starts after that write is acknowledged must fail
    # (or, never here, see the write): a read round (raft/readindex.py) needs a majority's answer to a ping
    # sent after the read arrived, which a cut-off leader cannot get, and check-quorum makes it step down.
    c = cluster
    target = lowest(c)
    if c.leader(timeout=60) != target.id:
        with c.client(c.leader()) as client:
            client.transfer_leadership(target.id)
    wait_until(lambda: (agreed_view(c) or (0, ""))[1] == target.id, 60, f"{target.id} leading, all agreeing")
    with c.client(target.id) as client:
        client.put("readindex/deposed", "old")
        assert client.get("readindex/deposed") == "old"
    outcomes: list[tuple[float, object]] = []  # (when the read started, its value or error)
    done = threading.Event()

    def read_at_the_old_leader():
        with Client(target.grpc_address, timeout=1) as client:  # a read there fails; 1 s bounds the wait
            while not done.is_set():
                started = time.monotonic()
                try:
                    outcomes.append((started, client.get("readindex/deposed")))
                except CortexError as exc:
                    outcomes.append((started, exc))
                time.sleep(0.05)

    reader = threading.Thread(target=read_at_the_old_leader)
    with PortCut(port_of(target), name="readindex"):
        reader.start()
        try:
            others = tuple(n.id for n in c.dc.servers if n.id != target.id)
            new_leader = wait_until(lambda: next((o for o in others if raft_view(c, o)[0] == "leader"), None), 60,
                                    "the majority to elect a leader")
            with c.client(new_leader) as client:
                client.put("readindex/deposed", "new")
            written = time.monotonic()
            wait_until(lambda: sum(t > written for t, _ in outcomes) >= 3, 60,
                       "reads at the old leader started after the write")
        finally:
            done.set()
            reader.join(30)
    after = [r for t, r in outcomes if t > written]
    print(f"reads at the cut-off former leader after the new leader's write: "
          f"{[r if isinstance(r, str) else r.code.name for r in after]}")
    assert "old" not in after, f"a deposed leader served a stale linearizable read: {after}"
    assert all(isinstance(r, CortexError) or r == "new" for r in after), after
    wait_until(lambda: agreed_view(c), 60, "the old leader back on the cluster's term and leader",
               ignore=(CortexError,))
    with c.client(target.id) as client:  # healed: it reads the new value
        wait_until(lambda: client.get("readindex/deposed") == "new", 30, "the new value at the old leader",
                   ignore=(CortexError,))

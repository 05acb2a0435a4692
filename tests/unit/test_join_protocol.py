"""The join protocol in one process, without gRPC servers: a real leader (SQLite state, single-node Raft)
and joiners whose one network call, the join over the enrollment port, is handed to the leader directly."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import grpc
import pytest

from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex.config import Config, RaftConfig
from cortex.core.events import EventBus
from cortex.membership import identity
from cortex.membership.admission import Admission
from cortex.membership.join import JOIN_REQUEST_FILE, Joiner
from cortex.membership.liveness import Transition
from cortex.node.member import NOT_IN_A_CLUSTER, AgentError, Member
from cortex.node.router import Router
from cortex.node.serving import Health
from cortex.security import tls
from tests.support.cluster import free_base_port
from tests.support.wait import wait_until

FAST_RAFT = RaftConfig(election_timeout_min=0.4, election_timeout_max=0.8, heartbeat_interval=0.05,
                       leader_fallback_timeout=0.3)


class LocalNode:
    """The agent's membership parts for one node, wired as the agent wires them, with no listeners:
    `restart_network` records the calls (there is no port to serve), and calls that would go to another node
    over gRPC go to the node at that address in `nodes` instead."""

    def __init__(self, tmp_path: Path, node_id: str, role: str, nodes: dict[str, LocalNode]):
        base = free_base_port(4)
        self.config = Config(node_id=node_id, role=role, data_dir=tmp_path / node_id / "data",
                             grpc_address=f"127.0.0.1:{base}", raft_address=f"127.0.0.1:{base + 1}", raft=FAST_RAFT)
        self.nodes = nodes
        nodes[self.config.grpc_address] = self
        self.restarts = 0
        self.member = Member(self.config, EventBus())
        self.router = Router(self.member, stub_for=self.stub_for)
        self.admission = Admission(self.member, self.router, restart_network=self.restart_network,
                                   stub_for=self.stub_for)
        self.health = Health(self.member)
        self.joiner = Joiner(self.member, self.router, self.admission, restart_network=self.restart_network,
                             on_changed=self.health.update, enroll_call=self.enroll_call)

    def restart_network(self) -> None:
        self.restarts += 1

    def stub_for(self, address: str):
        return LocalStub(self.nodes[address])

    def enroll_call(self, address: str, request: pb.JoinRequest, pin: str, options: list, timeout: float):
        """What enroll.call_join does on the wire: the server is checked against the pinned CA, and only the
        secret part of the token travels."""
        server = self.nodes[address]
        server_pin = tls.ca_pin(server.member.certs.ca()[0])
        if pin and pin != server_pin:
            raise AgentError(grpc.StatusCode.UNAVAILABLE, "the server's CA is not the pinned one")
        outgoing = pb.JoinRequest()
        outgoing.CopyFrom(request)
        outgoing.token = identity.split_token(request.token)[0] if request.token else ""
        return server.admission.handle_join(outgoing), server_pin

    def close(self) -> None:
        self.member.stopping.set()
        self.member.stop_replica()


class LocalStub:
    """A Cluster stub whose calls run on another in-process node, errors arriving as gRPC errors do."""

    def __init__(self, node: LocalNode):
        self._node = node

    def __getattr__(self, method: str):
        def call(request, timeout: float | None = None):
            try:
                return self._node.router.dispatch(method, request)
            except AgentError as exc:
                raise LocalRpcError(exc.code, str(exc)) from None
        return call


class LocalRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.fixture
def nodes():
    made: dict[str, LocalNode] = {}
    yield made
    for node in list(made.values()):
        node.close()


@pytest.fixture
def leader(tmp_path: Path, nodes) -> tuple[LocalNode, str]:
    """A one-server cluster and a worker join token for it."""
    n1 = LocalNode(tmp_path, "n1", "server", nodes)
    n1.joiner.init_cluster()
    token = n1.admission.handle_create_token(pb.CreateTokenRequest(role="worker", ttl_seconds=600, uses=5)).token
    return n1, token


def wait_for(predicate, timeout: float = 15.0):
    wait_until(predicate, timeout, "the join protocol's next step")


def test_init_makes_this_node_the_first_server_and_leader(leader):
    n1, _ = leader
    assert n1.member.identity.role == "server" and n1.member.is_leader()
    assert n1.member.waiting_for == ""
    assert [(n["id"], n["role"]) for n in n1.member.nodes()] == [("n1", "server")]
    assert n1.restarts == 1  # served again with the cluster's certificate
    with pytest.raises(AgentError) as info:
        n1.joiner.init_cluster()
    assert info.value.code == grpc.StatusCode.ALREADY_EXISTS


def test_a_worker_joins_with_a_token_and_gets_a_certificate(tmp_path: Path, nodes, leader):
    n1, token = leader
    w1 = LocalNode(tmp_path, "w1", "worker", nodes)
    cluster_id = w1.joiner.join_cluster(n1.config.grpc_address, token)
    assert cluster_id == n1.member.identity.cluster_id
    assert w1.member.identity.role == "worker" and w1.member.replica is None
    assert w1.member.certs.ready() and w1.member.enroll_pin == tls.ca_pin(n1.member.certs.ca()[0])
    assert w1.member.server_addresses == [n1.config.grpc_address]
    assert identity.load(w1.member.data_dir).cluster_id == cluster_id  # survives a restart
    assert {n["id"]: n["role"] for n in n1.member.nodes()} == {"n1": "server", "w1": "worker"}
    # a join is not repeated: the registered node gets no second certificate
    with pytest.raises(AgentError) as info:
        LocalNode(tmp_path / "again", "w1", "worker", nodes).joiner.join_cluster(n1.config.grpc_address, token)
    assert info.value.code == grpc.StatusCode.ALREADY_EXISTS


def test_a_bad_token_is_refused_and_the_node_stays_out(tmp_path: Path, nodes, leader):
    n1, token = leader
    w1 = LocalNode(tmp_path, "w1", "worker", nodes)
    secret, pin = identity.split_token(token)
    forged = token.replace(secret, identity.split_token(identity.new_join_token(pin))[0])
    with pytest.raises(AgentError) as info:
        w1.joiner.join_cluster(n1.config.grpc_address, forged)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert w1.member.identity is None and not w1.member.certs.ready()
    assert "w1" not in {n["id"] for n in n1.member.nodes()}


def test_a_join_without_a_token_waits_for_approval_then_finishes(tmp_path: Path, nodes, leader):
    n1, _ = leader
    w2 = LocalNode(tmp_path, "w2", "worker", nodes)
    assert w2.joiner.join_cluster(n1.config.grpc_address, "") == ""  # pending
    assert w2.member.identity is None
    assert "cortex nodes approve w2" in w2.member.waiting_for
    assert tls.ca_pin(n1.member.certs.ca()[0]) in w2.member.waiting_for  # for the operator to compare
    assert (w2.member.data_dir / JOIN_REQUEST_FILE).exists()  # a restart keeps its place in the queue
    assert [r["state"] for r in n1.member.store.query("join_requests", {"node_id": "w2"})] == ["pending"]
    n1.router.propose("node.approve", {"node_id": "w2"})
    wait_for(lambda: w2.member.identity is not None)  # the approval poller asks again and is let in
    assert w2.member.waiting_for == ""
    assert not (w2.member.data_dir / JOIN_REQUEST_FILE).exists()
    assert "w2" in {n["id"] for n in n1.member.nodes()}


def test_a_rejected_request_keeps_the_node_out(tmp_path: Path, nodes, leader):
    n1, _ = leader
    w3 = LocalNode(tmp_path, "w3", "worker", nodes)
    w3.member.stopping.set()  # no poller: this test asks again itself
    assert w3.joiner.join_cluster(n1.config.grpc_address, "") == ""
    n1.router.propose("node.reject", {"node_id": "w3"})
    with pytest.raises(AgentError) as info:
        w3.joiner.join_cluster(n1.config.grpc_address, "")
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert w3.member.identity is None and "rejected" in w3.member.waiting_for
    assert not (w3.member.data_dir / JOIN_REQUEST_FILE).exists()


def test_a_second_server_joins_in_two_steps(tmp_path: Path, nodes, leader):
    n1, _ = leader
    token = n1.admission.handle_create_token(pb.CreateTokenRequest(role="server", ttl_seconds=600, uses=1)).token
    s2 = LocalNode(tmp_path, "s2", "server", nodes)
    assert s2.joiner.join_cluster(n1.config.grpc_address, token) == n1.member.identity.cluster_id
    assert not s2.joiner.joining()  # the second step was answered: registered
    assert s2.member.raft is not None
    assert sorted(n1.member.raft.members()) == sorted([n1.config.raft_address, s2.config.raft_address])
    wait_for(lambda: any(n["id"] == "s2" for n in s2.member.nodes()))  # its replica caught up
    assert identity.load(s2.member.data_dir).pending_token == ""


def test_a_worker_leaves_and_is_kept_on_record_as_left(tmp_path: Path, nodes, leader):
    n1, token = leader
    w1 = LocalNode(tmp_path, "w1", "worker", nodes)
    w1.joiner.join_cluster(n1.config.grpc_address, token)
    w1.joiner.leave_cluster()  # forwarded to a server: the worker keeps no state
    assert w1.member.standing.identity is None and w1.member.waiting_for == NOT_IN_A_CLUSTER
    assert identity.load(w1.member.data_dir) is None and not w1.member.certs.ready()
    left = n1.member.store.query("member.list", {"left_only": True})
    assert [(n["id"], n["liveness"]) for n in left] == [("w1", "left")]
    with pytest.raises(AgentError) as info:
        w1.joiner.leave_cluster()
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_heartbeats_from_a_removed_worker_are_refused(tmp_path: Path, nodes, leader):
    n1, token = leader
    w1 = LocalNode(tmp_path, "w1", "worker", nodes)
    w1.joiner.join_cluster(n1.config.grpc_address, token)
    beat = pb.HeartbeatRequest(node_id="w1")
    assert list(w1.router.to_servers(lambda stub: stub.Heartbeat(beat)).server_grpc_addresses) == [
        n1.config.grpc_address]
    assert n1.admission.handle_leave(pb.LeaveRequest(node_id="w1", reason="removed by test")).removed
    with pytest.raises(AgentError) as info:
        w1.router.to_servers(lambda stub: stub.Heartbeat(beat))
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_the_leader_answers_heartbeats_from_its_roster_without_reading_the_nodes_table(tmp_path: Path, nodes,
                                                                                        leader, monkeypatch):
    n1, token = leader
    w1 = LocalNode(tmp_path, "w1", "worker", nodes)
    w1.joiner.join_cluster(n1.config.grpc_address, token)
    for i in range(100):  # a cluster of a hundred more workers
        n1.router.propose("node.register", {"node_id": f"x{i:03}", "role": "worker", "raft_address": "",
                                            "grpc_address": f"127.0.0.1:{20000 + i}", "token_hash": ""},
                          internal=True)
    beat = pb.HeartbeatRequest(node_id="w1")
    store = n1.member.store
    servers = [n["grpc_address"] for n in store.query("nodes", {}) if n["role"] == "server"]
    assert list(n1.admission.handle_heartbeat(beat).server_grpc_addresses) == servers == [n1.config.grpc_address]

    # every read of the state this thread makes, by query name (the real store answers each one)
    me, reads, real_query = threading.get_ident(), [], store.query

    def observed(name, args):
        if threading.get_ident() == me:
            reads.append(name)
        return real_query(name, args)

    monkeypatch.setattr(store, "query", observed)
    for _ in range(50):
        assert list(n1.admission.handle_heartbeat(beat).server_grpc_addresses) == servers
    assert reads == []  # O(1): nothing changed, nothing read
    n1.router.propose("node.remove", {"node_id": "x007"}, internal=True)
    with pytest.raises(AgentError) as info:  # the roster follows the applied command
        n1.admission.handle_heartbeat(pb.HeartbeatRequest(node_id="x007"))
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert reads == ["nodes"]  # rebuilt once
    for _ in range(50):
        n1.admission.handle_heartbeat(pb.HeartbeatRequest(node_id="x008"))
    assert reads == ["nodes"]


def _observe_reads(store, monkeypatch) -> list[str]:
    """Every read of the state the calling thread makes from now on, by query name (the real store answers)."""
    me, reads, real_query = threading.get_ident(), [], store.query

    def observed(name, args):
        if threading.get_ident() == me:
            reads.append(name)
        return real_query(name, args)

    monkeypatch.setattr(store, "query", observed)
    return reads


def _register_workers(n1: LocalNode, count: int) -> None:
    # together, in a few log entries (one commit each took most of these tests' time)
    outcomes = n1.router.propose_all("node.register", [
        {"node_id": f"x{i:03}", "role": "worker", "raft_address": "", "grpc_address": f"127.0.0.1:{20000 + i}",
         "token_hash": ""} for i in range(count)])
    assert all(isinstance(o, dict) and "error" not in o for o in outcomes), outcomes


def test_a_worker_back_from_suspect_is_revived_without_a_round_over_every_node(tmp_path: Path, nodes, leader,
                                                                                 monkeypatch):
    """The heartbeat of a suspect worker replicates its return at once. It used to run the leader's whole
    liveness round (every node's record read, every node evaluated): a fleet coming back together, after the
    leader stalled past suspect_after, cost the leader the square of its size."""
    n1, _ = leader
    _register_workers(n1, 100)
    admission, store = n1.admission, n1.member.store
    admission.liveness_step()  # the leader tracks liveness in its term
    n1.router.propose("node.liveness", {"node_id": "x008", "state": "suspect"}, internal=True)
    admission.liveness.apply(Transition("x008", "alive", "suspect"))
    admission.handle_heartbeat(pb.HeartbeatRequest(node_id="x001"))  # the roster is built once
    reads = _observe_reads(store, monkeypatch)
    admission.handle_heartbeat(pb.HeartbeatRequest(node_id="x008"))
    assert reads == []  # O(1): that node's transition replicated, no record read, the roster kept
    monkeypatch.undo()
    assert admission.liveness.state("x008") == "alive"
    assert {n["id"]: n["liveness"] for n in store.query("nodes", {})}["x008"] == "alive"  # replicated
    admission.handle_heartbeat(pb.HeartbeatRequest(node_id="x008"))  # alive already: nothing proposed again
    assert store.query("nodes", {})[-1]["liveness"] == "alive"


def test_a_heartbeat_never_waits_behind_a_liveness_round(tmp_path: Path, nodes, leader):
    """A round replicates its transitions one after another, holding the liveness lock; a returning node's
    heartbeat that waited for it held a gRPC thread, and with a fleet returning, all of them. It answers at
    once, and the round (this one or the next) replicates the return."""
    n1, _ = leader
    _register_workers(n1, 3)
    admission = n1.admission
    admission.liveness_step()
    n1.router.propose("node.liveness", {"node_id": "x001", "state": "suspect"}, internal=True)
    admission.liveness.apply(Transition("x001", "alive", "suspect"))
    answered = threading.Event()
    with admission._liveness_lock:  # a round under way
        threading.Thread(target=lambda: (admission.handle_heartbeat(pb.HeartbeatRequest(node_id="x001")),
                                         answered.set()), daemon=True).start()
        assert answered.wait(20), "the heartbeat waited for the liveness round"
    admission.liveness_step()  # the next round
    assert {n["id"]: n["liveness"] for n in n1.member.store.query("nodes", {})}["x001"] == "alive"


def test_a_round_replicates_its_transitions_together(tmp_path: Path, nodes, leader):
    """A hundred nodes silent past suspect_after (a rack without power): the round replicates their
    transitions in a few log entries; one after another, each took a commit of its own."""
    n1, _ = leader
    _register_workers(n1, 100)
    admission, store = n1.admission, n1.member.store
    admission.liveness_step()
    states = {n["id"]: n["liveness"] for n in store.query("nodes", {}) if n["id"] != "n1"}
    admission.liveness.start(states, time.monotonic() - n1.config.liveness.suspect_after - 1)  # all silent since
    before = store.last_applied
    admission.liveness_step()
    assert {n["id"]: n["liveness"] for n in store.query("nodes", {}) if n["id"] != "n1"} == dict.fromkeys(states,
                                                                                                       "suspect")
    assert all(admission.liveness.state(node) == "suspect" for node in states)
    assert store.last_applied - before < 10, f"{store.last_applied - before} log entries for one round"


def test_a_follower_forwards_heartbeats_without_reading_the_nodes_table(tmp_path: Path, nodes, leader, monkeypatch):
    """A worker's first server may be a follower (after a leader change, say): it forwards every heartbeat to
    the leader, and finding the leader's address read the whole nodes table each time."""
    n1, token = leader
    s2_token = n1.admission.handle_create_token(pb.CreateTokenRequest(role="server", ttl_seconds=600, uses=1)).token
    s2 = LocalNode(tmp_path, "s2", "server", nodes)
    s2.joiner.join_cluster(n1.config.grpc_address, s2_token)
    w1 = LocalNode(tmp_path, "w1", "worker", nodes)
    w1.joiner.join_cluster(n1.config.grpc_address, token)
    _register_workers(n1, 100)
    wait_for(lambda: len(s2.member.store.query("nodes", {})) == 103)
    assert not s2.member.is_leader()
    s2.admission.handle_heartbeat(pb.HeartbeatRequest(node_id="w1"))  # the roster is built once
    reads = _observe_reads(s2.member.store, monkeypatch)
    for _ in range(20):  # a request each time: forwarding counts its hops in it
        beat = pb.HeartbeatRequest(node_id="w1")
        assert list(s2.admission.handle_heartbeat(beat).server_grpc_addresses) == [n1.config.grpc_address,
                                                                                  s2.config.grpc_address]
    assert reads == []


def test_status_pairs_the_state_with_the_reason_it_waits(tmp_path: Path, nodes):
    from cortex.config import BootstrapConfig
    from cortex.node.status import node_status

    node = LocalNode(tmp_path, "a1", "server", nodes)
    reason = "credentials: cortex.join_token: missing"
    node.member.config = dataclasses.replace(node.config, bootstrap=BootstrapConfig(wait_reason=reason))
    node.joiner.announce_wait()  # what the agent does before its ports answer
    status = node_status(node.member, node.router, node.admission.liveness)
    assert (status.state, status.waiting_for) == ("uninitialized", reason)
    with pytest.raises(AgentError) as info:
        node.router.write(pb.Command(type="kv.put", args_json=b'{"key": "k", "value": "v"}'))
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and reason in str(info.value)

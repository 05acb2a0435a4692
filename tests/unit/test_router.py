"""The write/read path without gRPC servers: a real leader (SQLite state, single-node Raft) for what the
leader decides, and a worker whose calls to servers go to in-process nodes or to servers that are down."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex.node.member import AgentError
from cortex.node.router import MAX_HOPS, write_refusal
from cortex.security import tls
from tests.unit.test_join_protocol import LocalNode, LocalRpcError, LocalStub, leader, nodes  # noqa: F401


def put(key: str, value: str, idem: str = "") -> pb.Command:
    return pb.Command(type="kv.put", args_json=json.dumps({"key": key, "value": value}).encode(),
                      idempotency_key=idem)


def read(router, query: str, args: dict, level=pb.LEADER):
    return json.loads(router.read(pb.ReadRequest(query=query, args_json=json.dumps(args).encode(),
                                                 level=level)).result_json)


@pytest.fixture
def worker(tmp_path: Path, nodes, leader) -> LocalNode:  # noqa: F811
    n1, token = leader
    w1 = LocalNode(tmp_path, "w1", "worker", nodes)
    w1.joiner.join_cluster(n1.config.grpc_address, token)
    return w1


def test_the_leader_stamps_and_applies_a_write(leader):  # noqa: F811
    n1, _ = leader
    response = n1.router.write(put("greeting", "hello", idem="put-1"))
    assert response.index > 0 and response.term == n1.member.raft.term() and not response.duplicate
    assert read(n1.router, "kv.get", {"key": "greeting"}, pb.LINEARIZABLE)["value"] == "hello"
    again = n1.router.write(put("greeting", "hello", idem="put-1"))  # a retry with the same key
    assert again.duplicate


def test_a_write_is_refused_before_it_reaches_the_log(leader):  # noqa: F811
    n1, _ = leader
    applied = n1.member.store.last_applied
    for command, code in (
        (pb.Command(type="node.register", args_json=json.dumps({"node_id": "x", "role": "worker",
                                                                "grpc_address": "h:1", "raft_address": ""}).encode()),
         grpc.StatusCode.PERMISSION_DENIED),  # decided by the cluster itself
        (pb.Command(type="kv.put", args_json=b"{not json"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.Command(type="no.such.command", args_json=b"{}"), grpc.StatusCode.INVALID_ARGUMENT),
        (put("k", "v", idem="x" * 129), grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(AgentError) as info:
            n1.router.write(command)
        assert info.value.code == code, command
    assert n1.member.store.last_applied == applied


def test_write_refusal_names_the_reason():
    assert write_refusal("kv.put", {"key": "k", "value": "v"}, None) == ""
    assert "decided by the cluster itself" in write_refusal("token.add", {}, None)
    worker = tls.Peer(name="w1", role="worker", cluster_id="c")
    assert write_refusal("kv.put", {"key": "k", "value": "v"}, worker) == ""


def test_a_batch_reports_each_command_on_its_own(leader):  # noqa: F811
    n1, _ = leader
    batch = pb.WriteBatchRequest(commands=[put("a", "1"), pb.Command(type="token.revoke", args_json=b'{"token_id": "0123456789ab"}'),
                                           put("b", "2")])
    response = n1.router.write_batch(batch)
    assert [bool(e) for e in response.errors] == [False, True, False]
    assert "decided by the cluster itself" in response.errors[1]  # the same rule as a single write
    assert read(n1.router, "kv.get", {"key": "b"})["value"] == "2"
    with pytest.raises(AgentError) as info:
        n1.router.write_batch(pb.WriteBatchRequest(commands=[put("k", "v")] * 10_001))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_reads_refuse_the_secrets_queries_and_bad_arguments(leader):  # noqa: F811
    n1, _ = leader
    for query in ("token.check", "join_request.secret"):
        with pytest.raises(AgentError) as info:
            read(n1.router, query, {})
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(AgentError) as info:
        n1.router.read(pb.ReadRequest(query="kv.get", args_json=b"[1]"))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_worker_forwards_writes_and_reads_to_a_server(leader, worker):  # noqa: F811
    n1, _ = leader
    response = worker.router.write(put("from-worker", "yes"))
    assert response.index > 0
    answer = worker.router.read(pb.ReadRequest(query="kv.get", args_json=json.dumps({"key": "from-worker"}).encode(),
                                               level=pb.STALE))
    assert json.loads(answer.result_json)["value"] == "yes" and answer.served_by == "n1"
    assert worker.router.read_query("kv.get", {"key": "from-worker"})["value"] == "yes"


def test_a_worker_tries_the_next_server_and_remembers_the_one_that_answered(leader, worker):  # noqa: F811
    n1, _ = leader
    worker.member.server_addresses = ["127.0.0.1:1", n1.config.grpc_address]
    down = DownStub()
    worker.router._stub_for = lambda address: down if address == "127.0.0.1:1" else LocalStub(n1)
    worker.router.write(put("k", "v"))
    assert down.calls == 1
    assert worker.member.server_addresses == [n1.config.grpc_address, "127.0.0.1:1"]
    worker.router.write(put("k", "v2"))
    assert down.calls == 1  # the server that answered is asked first from now on


def test_no_server_reachable_is_unavailable_naming_each(worker):
    worker.member.server_addresses = ["127.0.0.1:1", "127.0.0.1:2"]
    worker.router._stub_for = lambda address: DownStub()
    with pytest.raises(AgentError) as info:
        worker.router.write(put("k", "v"))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "127.0.0.1:1: down" in str(info.value) and "127.0.0.1:2: down" in str(info.value)


def test_a_refusal_from_the_server_comes_back_with_its_code(worker):
    with pytest.raises(AgentError) as info:
        worker.router.write(pb.Command(type="kv.put", args_json=b"{}"))  # refused where it is checked: here
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(AgentError) as info:
        worker.router.dispatch("RevokeToken", pb.RevokeTokenRequest(token_id="0123abcd"))  # refused by the leader
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_a_request_that_bounced_too_often_is_not_forwarded_again(worker):
    request = pb.WriteRequest(command=put("k", "v"), hops=MAX_HOPS)
    with pytest.raises(AgentError) as info:
        worker.router.forward("Write", request)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and "bounced" in str(info.value)
    request.hops = MAX_HOPS - 1
    assert worker.router.forward("Write", request).index > 0
    assert request.hops == MAX_HOPS


class DownStub:
    def __init__(self):
        self.calls = 0

    def __getattr__(self, method: str):
        def call(request, timeout: float | None = None):
            self.calls += 1
            raise LocalRpcError(grpc.StatusCode.UNAVAILABLE, "down")
        return call


def test_a_linearizable_read_appends_nothing_to_the_log(leader):  # noqa: F811
    # ReadIndex: the leader confirms its leadership by a round of pings (none to send on a single server) and
    # reads at its commit index; no barrier entry per read, as before.
    n1, _ = leader
    n1.router.write(put("readindex", "v1"))
    raft = n1.member.raft
    before = (raft.status().commit_index, n1.member.store.last_applied)
    for _ in range(5):
        assert read(n1.router, "kv.get", {"key": "readindex"}, pb.LINEARIZABLE)["value"] == "v1"
    assert (raft.status().commit_index, n1.member.store.last_applied) == before, "a read appended a log entry"
    n1.router.write(put("readindex", "v2"))
    assert read(n1.router, "kv.get", {"key": "readindex"}, pb.LINEARIZABLE)["value"] == "v2"
    answer = n1.router.read(pb.ReadRequest(query="kv.get", args_json=b'{"key": "readindex"}', level=pb.LINEARIZABLE,
                                           index_only=True))  # what a follower asks the leader
    assert answer.read_index == raft.status().commit_index and not answer.result_json

"""Admission under pressure, on real clusters over the real enrollment port: join requests without a token
are limited per source and in total and expire, while a legitimate request still waits, is approved and
joins; the token `cortex init` makes expires like every other token."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest

from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex.client import channel_options
from cortex.config import MembershipConfig
from cortex.core.state import StateStore
from cortex.membership import enroll, identity
from cortex.membership.gate import SourceLimit, source_host
from cortex.security import tls
from tests.support.agent import cortex
from tests.support.envelopes import env
from tests.support.wait import wait_until


@pytest.fixture(scope="module")
def cluster(shared_cluster):
    return shared_cluster


def request(node_id: str, secret: str, csr: bytes = b"") -> pb.JoinRequest:
    return pb.JoinRequest(node_id=node_id, role="worker", grpc_address="127.0.0.1:9", request_secret=secret,
                          csr_pem=csr)


def ask(address: str, join: pb.JoinRequest, token: str = "") -> tuple[pb.JoinResponse | None, enroll.EnrollError | None]:
    """One join as `cortex join` sends it: over `address`'s enrollment port, pinned when a token is given."""
    if token:
        join.token = token
    try:
        pin = enroll.pin_for(token)
        return enroll.call_join(address, join, pin, channel_options(), 30.0)[0], None
    except enroll.EnrollError as exc:
        return None, exc


def pending(cl, prefix: str) -> list[dict]:
    with cl.client(cl.leader()) as c:
        return [r for r in c.read("join_requests", {}) if r["node_id"].startswith(prefix) and r["state"] == "pending"]


def test_a_flood_from_one_source_stays_bounded_and_a_real_request_still_joins(cluster):
    receiver = cluster.node("n2")  # the limit is kept by the node that receives the request
    secrets = {f"flood-{i:03d}": identity.new_secret() for i in range(200)}
    started = time.monotonic()
    refused = []
    for node_id, secret in secrets.items():
        response, error = ask(receiver.grpc_address, request(node_id, secret))
        if error is not None:
            refused.append(error)
        else:
            assert response.admission == "pending"
    elapsed = time.monotonic() - started
    limits = MembershipConfig()
    bound = limits.request_burst + int(elapsed * limits.requests_per_minute / 60) + 1
    filed = pending(cluster, "flood-")
    assert 1 <= len(filed) <= bound, (len(filed), bound, elapsed)
    assert len(refused) >= 200 - bound
    for error in refused:
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert "retry in" in str(error) and "token" in str(error), error

    # the joiner asking again (same node id and secret) is not a new request: it is answered while the
    # source has no allowance left, and an operator's approval still lets it in
    first = filed[0]["node_id"]
    for _ in range(3):
        response, error = ask(receiver.grpc_address, request(first, secrets[first]))
        assert error is None and response.admission == "pending", error
    leader = cluster.leader()
    with cluster.client(leader) as c:
        assert c.write("node.approve", {"node_id": first})["state"] == "approved"
    key = tls.new_key_pem()
    response, error = ask(receiver.grpc_address, request(first, secrets[first], csr=tls.new_csr(key, first)))
    assert error is None, error
    assert response.admitted and response.cert_pem
    with cluster.client(leader) as c:
        assert first in {n["id"] for n in c.read("nodes", {})}
    cortex("--addr", cluster.node(leader).grpc_address, "nodes", "remove", first, "--force")  # it never sends heartbeats


def test_the_init_token_is_listed_with_an_expiry(cluster):
    addr = cluster.node(cluster.leader()).grpc_address
    rows = json.loads(cortex("--addr", addr, "token", "list", "--json").stdout)
    init = rows[0]  # the first token: made with the cluster
    assert init["role"] == "server"
    assert init["expires_at"] is not None
    assert 0 < init["expires_at"] - init["created_at"] <= MembershipConfig().init_token_ttl + 1


def test_requests_from_many_node_ids_stay_under_the_cap(make_cluster):
    cl = make_cluster(servers=1, extra_config="membership:\n  max_pending_requests: 5\n  request_burst: 1000\n")
    address = cl.node("n1").grpc_address
    outcomes = [ask(address, request(f"many-{i:02d}", identity.new_secret())) for i in range(30)]
    assert len(pending(cl, "many-")) == 5
    refused = [error for _, error in outcomes if error is not None]
    assert len(refused) == 25
    for error in refused:
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert "cortex nodes pending" in str(error) and "token" in str(error), error
    with cl.client("n1") as c:  # a decision frees a place
        c.write("node.reject", {"node_id": "many-00"})
    response, error = ask(address, request("many-99", identity.new_secret()))
    assert error is None and response.admission == "pending", error


def test_an_expired_request_leaves_the_approval_list(make_cluster):
    cl = make_cluster(servers=1, extra_config="membership:\n  pending_request_ttl: 2\n")
    address = cl.node("n1").grpc_address
    secret = identity.new_secret()
    response, error = ask(address, request("stale-1", secret))
    assert error is None and response.admission == "pending", error
    assert [r["node_id"] for r in pending(cl, "stale-")] == ["stale-1"]
    wait_until(lambda: not pending(cl, "stale-"), 60, "the expired request to leave the list")
    with cl.client("n1") as c:
        assert not [r for r in c.read("join_requests", {}) if r["node_id"] == "stale-1"]


def test_the_init_token_is_refused_once_expired(make_cluster):
    cl = make_cluster(servers=1, extra_config="membership:\n  init_token_ttl: 3\n")
    token = (Path(cl.node("n1").dir) / "data" / "join-token").read_text().strip()  # bootstrap.init wrote it
    with cl.client("n1") as c:
        expires_at = c.read("tokens", {})[0]["expires_at"]
    assert expires_at is not None
    wait_until(lambda: time.time() > expires_at + 0.5, 60, "the init token to expire")
    response, error = ask(cl.node("n1").grpc_address, request("late-1", ""), token=token)
    assert response is None and error is not None
    assert error.code == grpc.StatusCode.PERMISSION_DENIED, error
    assert "expired" in str(error) and "cortex token create" in str(error), error


def test_expiry_is_decided_by_the_command_time_on_every_replica(tmp_path: Path):
    """Two replicas applying the same entries drop the same requests, whatever their own clocks say."""
    replicas = [StateStore(tmp_path / "a.db"), StateStore(tmp_path / "b.db")]
    entries = [env("node.request", {"node_id": f"r{i}", "role": "worker", "grpc_address": "127.0.0.1:9",
                                     "secret_hash": identity.token_hash(f"secret-{i}")}, ts=1000.0 + i * 100)
               for i in range(3)]
    entries.append(env("node.approve", {"node_id": "r0"}, ts=1250.0))
    entries.append(env("node.expire_requests", {"older_than": 100.0}, ts=1250.0))  # cutoff 1150: r1 only
    for store in replicas:
        results = [store.apply(index, entry) for index, entry in enumerate(entries, start=2)]
        assert results[-1] == {"expired": ["r1"]}
        assert {r["node_id"]: r["state"] for r in store.query("join_requests", {})} == {"r0": "approved",
                                                                                          "r2": "pending"}
    assert replicas[0].digest() == replicas[1].digest()


def test_a_source_allowance_refills_at_its_rate():
    now = [0.0]
    limit = SourceLimit(burst=3, per_minute=6.0, clock=lambda: now[0])
    assert [limit.take("10.0.0.5") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limit.take("10.0.0.5") == pytest.approx(10.0)  # one every 10 s
    assert limit.take("10.0.0.6") == 0.0  # another source has its own
    now[0] = 10.0
    assert limit.take("10.0.0.5") == 0.0
    assert limit.take("10.0.0.5") > 0
    now[0] = 1000.0  # never more than the burst
    assert [limit.take("10.0.0.5") == 0.0 for _ in range(4)] == [True, True, True, False]


def test_a_source_is_the_callers_host_without_its_port():
    assert source_host("ipv4:10.0.0.5:53124") == "10.0.0.5"
    assert source_host("ipv6:[::1]:53124") == "::1"
    assert source_host("ipv6:[fd7a:115c::5]:1") == "fd7a:115c::5"
    assert source_host("unix:/run/x.sock") == "unix:/run/x.sock"

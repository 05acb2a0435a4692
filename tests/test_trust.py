"""Trust: token-pinned enrollment (no trust on first use), certificate revocation, CA rotation.

Against real agent processes over loopback with real TLS handshakes; the man in the middle is a real gRPC
server on the enrollment port with a certificate of another CA (or a copy of the real CA certificate).
"""

from __future__ import annotations

import json
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from cortex import authz, devcluster, identity, tls
from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex._proto.cortex.v1 import cortex_pb2_grpc as pb_grpc

from .conftest import Cluster, free_base_port
from .test_agent import cortex, start_agent, wait_status, write_config


def _tls_dir(cluster, node_id: str) -> Path:
    return Path(cluster.node(node_id).dir) / "data" / tls.TLS_DIR


# --- pure parts ---------------------------------------------------------------------------------------------

def test_tokens_carry_the_ca_pin_and_only_the_secret_is_hashed():
    ca, _ = tls.new_ca("c-1")
    pin = tls.ca_pin(ca)
    assert len(pin) == 64 and pin == tls.ca_pin(ca + tls.new_ca("c-1")[0])  # a bundle: its first (signing) CA
    token = identity.new_join_token(pin)
    secret, got = identity.split_token(token)
    assert got == pin and token == f"{secret}.{pin}" and secret.startswith("cx1.") and secret.count(".") == 1
    assert identity.token_hash(token) == identity.token_hash(secret)  # either form matches the stored hash
    old = identity.new_join_token()
    assert identity.split_token(old) == (old, "")
    assert identity.split_token("cx1." + "a" * 64) == ("cx1." + "a" * 64, "")  # a secret is never a pin


def test_choose_ca_accepts_only_the_pinned_ca_that_signed_the_server():
    ca, ca_key = tls.new_ca("c-1")
    other, other_key = tls.new_ca("c-1")
    leaf = tls.issue_enrollment(ca, ca_key)[0]
    assert tls.peer_of(leaf) is None  # the enrollment certificate is no member identity
    assert authz.choose_ca([leaf, ca], tls.ca_pin(ca), "x") == ca
    with pytest.raises(authz.PinMismatch, match="pins CA") as info:
        authz.choose_ca([tls.issue_enrollment(other, other_key)[0], other], tls.ca_pin(ca), "x")
    assert "NOT sent" in str(info.value) and "cortex token create" in str(info.value)
    # a MITM copying the real (public) CA certificate into its chain, with its own leaf
    with pytest.raises(authz.PinMismatch, match="not signed by the pinned CA"):
        authz.choose_ca([tls.issue_enrollment(other, other_key)[0], ca], tls.ca_pin(ca), "x")
    assert authz.choose_ca([leaf, ca], "", "x") == ca  # no pin: trust on first use (approval joins)


# --- against running agents --------------------------------------------------------------------------------

class FakeEnrollment(pb_grpc.ClusterServicer):
    """A man in the middle on an enrollment port: TLS with a certificate chain it chooses; records every
    Join it receives (what it would steal)."""

    def __init__(self, port: int, chain_ca: bytes, signer: tuple[bytes, bytes]):
        self.received: list[pb.JoinRequest] = []
        cert, key = tls.issue_enrollment(*signer)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_ClusterServicer_to_server(self, self.server)
        creds = grpc.ssl_server_credentials([(key, cert + chain_ca)])
        assert self.server.add_secure_port(f"127.0.0.1:{port + authz.ENROLL_PORT_OFFSET}", creds)
        self.server.start()

    def Join(self, request, context):
        self.received.append(request)
        return pb.JoinResponse(cluster_id="c-evil", admitted=True)


@pytest.fixture(scope="module")
def trust_cluster(tmp_path_factory):
    """3 servers and a worker of this module's own: its tests remove and rotate things."""
    directory = tmp_path_factory.mktemp("trust")
    try:
        dc = devcluster.up(directory, 3, 1, free_base_port(), timeout=90)
        cluster = Cluster(dc)
        cluster.settle()
    except BaseException:
        devcluster.down(directory)
        raise
    yield cluster
    devcluster.down(directory)


@pytest.fixture
def procs():
    started = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def _uses_left(cluster, token_id: str) -> int:
    with cluster.client("n1") as c:
        return next(t for t in c.read("tokens", {}, level="linearizable") if t["id"] == token_id)["uses_left"]


def test_a_joiner_checks_the_pinned_ca_before_it_sends_its_token(trust_cluster, tmp_path, procs):
    cluster = trust_cluster
    addr = cluster.node("n2").grpc_address
    ca = (_tls_dir(cluster, "n1") / "ca.crt").read_bytes()
    made = json.loads(cortex("--addr", addr, "--json", "token", "create", "--uses", "1").stdout)
    assert made["ca_pin"] == tls.ca_pin(ca) and made["token"].endswith("." + tls.ca_pin(ca))
    shown = json.loads(cortex("--addr", addr, "--json", "secrets", "ca").stdout)
    assert shown["pin"] == tls.ca_pin(ca)
    # The nodes of the cluster joined with the token `cortex init` wrote: pinned too.
    init_token = (Path(cluster.node("n1").dir) / "data" / "join-token").read_text().strip()
    assert identity.split_token(init_token)[1] == tls.ca_pin(ca)

    port = free_base_port()
    config = write_config(tmp_path / "wj", "wj", port, role="worker")
    procs.append(start_agent(config))
    wait_status(f"127.0.0.1:{port}", lambda s: s.state == "uninitialized")
    sock = str(config.parent / "data" / "admin.sock")
    other, other_key = tls.new_ca("c-evil")
    mitm_port = free_base_port()
    for label, chain_ca in (("another CA", other), ("a copy of the real CA certificate", ca)):
        fake = FakeEnrollment(mitm_port, chain_ca, (other, other_key))
        try:
            out = cortex("join", f"127.0.0.1:{mitm_port}", "--token", made["token"], "--socket", sock, check=False)
        finally:
            fake.server.stop(0).wait()
        assert out.returncode != 0, label
        assert "NOT sent" in out.stderr or "not signed by the pinned CA" in out.stderr, (label, out.stderr)
        print(f"MITM with {label}: {len(fake.received)} join requests received")
        assert fake.received == [], label  # the token secret never reached it
    # A MITM whose certificate the real CA signed cannot exist without the CA key; one that presents the
    # real CA but a leaf of its own is refused by the pin check (above) and would fail the TLS handshake.

    secret = identity.split_token(made["token"])[0]
    wrong = cortex("join", addr, "--token", f"{secret}.{tls.ca_pin(other)}", "--socket", sock, check=False)
    assert wrong.returncode != 0 and "pins CA" in wrong.stderr and "the token was NOT sent" in wrong.stderr
    unpinned = cortex("join", addr, "--token", secret, "--socket", sock, check=False)
    assert unpinned.returncode != 0 and "--insecure-skip-ca-pin" in unpinned.stderr
    assert _uses_left(cluster, made["id"]) == 1  # no attempt so far spent the token: none reached a server
    assert wait_status(f"127.0.0.1:{port}", lambda s: True).state == "uninitialized"

    joined = json.loads(cortex("join", addr, "--token", made["token"], "--socket", sock, "--json").stdout)
    with cluster.client("n1") as c:
        assert joined["cluster_id"] == c.status().cluster_id
    assert _uses_left(cluster, made["id"]) == 0
    assert (config.parent / "data" / "tls" / "ca.crt").read_bytes() == ca
    left = cortex("leave", "--socket", sock)
    assert "left the cluster" in left.stdout


def test_an_unpinned_token_joins_only_with_insecure_skip_ca_pin(trust_cluster, tmp_path, procs):
    cluster = trust_cluster
    addr = cluster.node("n1").grpc_address
    made = json.loads(cortex("--addr", addr, "--json", "token", "create", "--uses", "1").stdout)
    unpinned = identity.split_token(made["token"])[0]  # as a token of before pins looks
    port = free_base_port()
    config = write_config(tmp_path / "wi", "wi", port, role="worker")
    procs.append(start_agent(config))
    wait_status(f"127.0.0.1:{port}", lambda s: s.state == "uninitialized")
    sock = str(config.parent / "data" / "admin.sock")
    refused = cortex("join", addr, "--token", unpinned, "--socket", sock, check=False)
    assert refused.returncode != 0 and "carries no CA pin" in refused.stderr
    cortex("join", addr, "--token", unpinned, "--socket", sock, "--insecure-skip-ca-pin")
    log = (config.parent / "agent.log").read_text()
    assert "WITHOUT checking the cluster CA" in log
    assert _uses_left(cluster, made["id"]) == 0
    cortex("leave", "--socket", sock)

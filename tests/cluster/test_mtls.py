"""Mutual TLS and per-RPC roles, against real agent processes over loopback with real TLS handshakes."""

from __future__ import annotations

import datetime
import os
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest

from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex._proto.cortex.v1 import cortex_pb2_grpc as pb_grpc
from cortex.client import Client, CortexError, channel_options, secure_channel
from cortex.dev import cluster as devcluster
from cortex.security import authz, tls
from tests.support.cluster import free_base_port
from tests.support.procs import python_without_home
from tests.support.wait import wait_until


def _files(cluster, node_id: str, stem: str) -> tls.ClientFiles:
    directory = Path(cluster.node(node_id).dir) / "data" / tls.TLS_DIR
    files = tls.client_files(directory, (stem,))
    assert files is not None, f"no {stem} certificate in {directory}"
    return files


def _cluster_id(cluster) -> str:
    with cluster.client("n1") as c:
        return c.status().cluster_id


def _digest(cluster) -> str:
    with cluster.client("n1") as c:
        return c.read("digest", {}, level="linearizable")["digest"]


# --- pure parts ---------------------------------------------------------------------------------------------

def test_certificate_names_node_role_and_cluster():
    ca, ca_key = tls.new_ca("c-1")
    key = tls.new_key_pem()
    cert = tls.sign(ca, ca_key, tls.new_csr(key, "attacker-chosen"), "w1", "worker", "c-1")
    assert tls.peer_of(cert) == tls.Peer(name="w1", role="worker", cluster_id="c-1")  # the signer names it
    assert tls.key_matches(cert, key) and not tls.key_matches(cert, tls.new_key_pem())
    with pytest.raises(tls.TLSError):
        tls.sign(ca, ca_key, b"-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n", "w1", "worker", "c-1")
    with pytest.raises(tls.TLSError):
        tls.sign(ca, ca_key, tls.new_csr(key, "x"), "w1", "superuser", "c-1")
    assert not tls.needs_renewal(cert)
    old = tls.sign(ca, ca_key, tls.new_csr(key, "w1"), "w1", "worker", "c-1", days=3,
                   now=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2.5))
    assert tls.needs_renewal(old)


def test_role_table_refuses_workers_server_only_rpcs():
    worker = tls.Peer("w1", "worker", "c-1")
    for method in ("RevokeToken", "Join"):
        code, message = authz.refusal(f"/cortex.v1.Cluster/{method}", worker, "c-1")
        assert code == grpc.StatusCode.PERMISSION_DENIED and "call it from" in message
    # allowed for itself only (its own leave and heartbeat, worker tokens): ClusterService checks the rest
    for method in ("Write", "Read", "Status", "Heartbeat", "RenewCertificate", "Leave", "CreateToken"):
        assert authz.refusal(f"/cortex.v1.Cluster/{method}", worker, "c-1") is None
    reader = tls.Peer("r", "reader", "c-1")
    assert authz.refusal("/cortex.v1.Cluster/Write", reader, "c-1")[0] == grpc.StatusCode.PERMISSION_DENIED
    assert authz.refusal("/cortex.v1.Cluster/Read", reader, "c-1") is None
    assert authz.refusal("/cortex.v1.Cluster/Status", tls.Peer("a", "admin", "c-2"), "c-1")[1].startswith(
        "certificate of cluster c-2")
    assert authz.refusal("/cortex.v1.Cluster/NoSuchRpc", tls.Peer("n1", "server", "c-1"), "c-1") is not None
    assert set(authz.CLUSTER_RPC_ROLES) == set(pb.DESCRIPTOR.services_by_name["Cluster"].methods_by_name)


def test_raft_keys_rotate_with_overlap():
    from cryptography.fernet import InvalidToken

    from cortex.raft.keys import RotatingEncryptor

    ca_key = tls.new_ca("c-1")[1]
    a, b = RotatingEncryptor("s3cret", ca_key, 0), RotatingEncryptor("s3cret", ca_key, 0)
    frame = a.encrypt_at_time(b"x", 100)
    assert b.decrypt(frame) == b"x" and b.extract_timestamp(frame) == 100
    a.set_generation(1)  # a switches first: b (still at 0) reads it, and a still reads b
    assert b.decrypt(a.encrypt_at_time(b"y", 101)) == b"y" and a.decrypt(b.encrypt_at_time(b"z", 102)) == b"z"
    stranger = RotatingEncryptor("s3cret", tls.new_ca("c-1")[1], 0)  # same secret, another CA: gen 1 differs
    with pytest.raises(InvalidToken):
        stranger.decrypt(a.encrypt_at_time(b"y", 103))
    a.set_generation(3)
    with pytest.raises(InvalidToken):  # generation 0 is retired once two rotations have passed
        a.decrypt(RotatingEncryptor("s3cret", ca_key, 0).encrypt_at_time(b"old", 104))


# --- against a running cluster -----------------------------------------------------------------------------

def _status_with(address: str, files: tls.ClientFiles | None):
    options = channel_options()
    channel = grpc.insecure_channel(address, options=options) if files is None else secure_channel(
        address, files, options)
    try:
        return pb_grpc.ClusterStub(channel).Status(pb.StatusRequest(), timeout=3)
    finally:
        channel.close()


def test_clients_without_a_valid_certificate_are_refused_at_tls(shared_cluster):
    address = shared_cluster.node("n1").grpc_address
    before = _digest(shared_cluster)
    real = _files(shared_cluster, "n1", "admin")
    assert _status_with(address, real).state in ("leader", "follower")
    cluster_id = _cluster_id(shared_cluster)
    other_ca, other_key = tls.new_ca(cluster_id)  # same cluster id, another CA: a forgery
    forged_cert, forged_key = tls.issue(other_ca, other_key, "admin@n1", "admin", cluster_id)
    ca_key = (Path(shared_cluster.node("n1").dir) / "data" / "tls" / "ca.key").read_bytes()
    expired_cert, expired_key = tls.issue(real.ca, ca_key, "admin@n1", "admin", cluster_id, days=1,
                                          now=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2))
    cases = {
        "no certificate (plaintext)": None,
        "no client certificate": "no-client-cert",
        "certificate of another CA": tls.ClientFiles(ca=real.ca, cert=forged_cert, key=forged_key),
        "expired certificate": tls.ClientFiles(ca=real.ca, cert=expired_cert, key=expired_key),
    }
    for what, files in cases.items():
        if files == "no-client-cert":
            channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=real.ca),
                                          options=[("grpc.ssl_target_name_override", tls.SERVER_NAME)])
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.ClusterStub(channel).Status(pb.StatusRequest(), timeout=3)
            channel.close()
        else:
            with pytest.raises(grpc.RpcError) as info:
                _status_with(address, files)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, what  # the handshake failed: no RPC ran
    # the same CA but a certificate naming another cluster: through TLS, refused by the role check
    alien_cert, alien_key = tls.issue(real.ca, ca_key, "admin@x", "admin", "c-other")
    with pytest.raises(grpc.RpcError) as info:
        _status_with(address, tls.ClientFiles(ca=real.ca, cert=alien_cert, key=alien_key))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "another" not in info.value.details()
    assert "c-other" in info.value.details()
    assert _digest(shared_cluster) == before


def test_a_worker_certificate_cannot_call_server_only_rpcs(shared_cluster):
    address = shared_cluster.node("n1").grpc_address
    worker = _files(shared_cluster, "w1", "node")
    assert tls.peer_of(worker.cert).role == "worker"
    before = _digest(shared_cluster)
    with Client(address, tls_files=worker) as c:
        assert c.status().cluster_id  # allowed
        c.put("mtls/worker-write", "ok")  # workers write (their tasks, their capacity)
        with pytest.raises(CortexError) as info:
            c.create_token("server")  # a server token would make a worker's holder a server (CA key)
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "worker join tokens only" in info.value.details and "on a server" in info.value.details
        with pytest.raises(CortexError) as info:
            c.revoke_token("0123456789ab")
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "RevokeToken may be called by admin, server" in info.value.details
        assert "call it from" in info.value.details  # what to do instead
        with pytest.raises(CortexError) as info:
            c.remove_node("n2")
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED and "itself only" in info.value.details
        with pytest.raises(CortexError) as info:  # the worker speaks only for itself
            c._call(c.stub.Heartbeat, pb.HeartbeatRequest(node_id="w2"))
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED and "itself" in info.value.details
        with pytest.raises(CortexError) as info:  # the rotation generations are the admins' to change
            c.put("_cortex/raft/rotation", "999")
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED and "secrets rotate" in info.value.details
    # a batch is judged by the same rules, on the node the worker reached (leader or follower alike): a
    # forwarding server's own certificate does not lend the worker its role
    for node_id in ("n1", "n2", "n3"):
        with Client(shared_cluster.node(node_id).grpc_address, tls_files=worker) as c:
            reply = c.write_batch([("kv.put", {"key": "_cortex/raft/rotation", "value": "998"}),
                                   ("kv.put", {"key": f"mtls/worker-batch-{node_id}", "value": "ok"}),
                                   ("token.revoke", {"token_id": "0123456789ab"})])
        assert "secrets rotate" in reply.errors[0], (node_id, list(reply.errors))
        assert reply.errors[1] == "" and reply.results[1].index > 0, (node_id, list(reply.errors))
        assert "decided by the cluster itself" in reply.errors[2], (node_id, list(reply.errors))
    with Client(address) as admin:
        assert admin.get("mtls/worker-write") == "ok"
        assert all(admin.get(f"mtls/worker-batch-{n}") == "ok" for n in ("n1", "n2", "n3"))
        assert {n.id for n in admin.status().nodes} >= {"n2", "w2"}
    assert before != _digest(shared_cluster)  # the allowed writes happened
    # a reader certificate reads and does not write
    cluster_id = _cluster_id(shared_cluster)
    ca_key = (Path(shared_cluster.node("n1").dir) / "data" / "tls" / "ca.key").read_bytes()
    cert, key = tls.issue(worker.ca, ca_key, "auditor", "reader", cluster_id)
    with Client(address, tls_files=tls.ClientFiles(ca=worker.ca, cert=cert, key=key)) as reader:
        assert reader.get("mtls/worker-write") == "ok"
        with pytest.raises(CortexError) as info:
            reader.put("mtls/reader", "no")
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    with Client(address) as admin:
        assert admin.get("_cortex/raft/rotation") != "999"


def test_enrollment_port_serves_join_only_and_refuses_bad_joins(shared_cluster):
    address = shared_cluster.node("n2").grpc_address
    before = _digest(shared_cluster)
    channel = authz.enroll_channel(address, channel_options())
    stub = pb_grpc.ClusterStub(channel)
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.Write(pb.WriteRequest(command=pb.Command(type="kv.put", args_json=b'{"key":"a","value":"b"}')),
                       timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Join only" in info.value.details()
        key = tls.new_key_pem()
        join = pb.JoinRequest(node_id="intruder", role="worker", grpc_address="127.0.0.1:1",
                              token="cx1.not-a-real-token-of-this-cluster", csr_pem=tls.new_csr(key, "intruder"))
        with pytest.raises(grpc.RpcError) as info:
            stub.Join(join, timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # a replayed join of a member (its id and addresses, any token) gets no certificate
        w1 = shared_cluster.node("w1")
        replay = pb.JoinRequest(node_id="w1", role="worker", grpc_address=w1.grpc_address, token="cx1.whatever",
                                csr_pem=tls.new_csr(key, "w1"))
        with pytest.raises(grpc.RpcError) as info:
            stub.Join(replay, timeout=10)
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    finally:
        channel.close()
    # garbage on every port: the gRPC, enrollment and Raft ports answer bytes with nothing and stay up
    host, port = address.rsplit(":", 1)
    for p in (int(port), int(port) + 1, int(port) + 2):
        with socket.create_connection((host, p), timeout=3) as s:
            s.sendall(b"\x16\x03\x01\x00\x05garbage" + bytes(range(256)) * 8)
            s.settimeout(3)
            try:
                s.recv(1024)
            except (TimeoutError, ConnectionResetError):
                pass
    assert _digest(shared_cluster) == before
    with shared_cluster.client("n2") as c:
        assert c.status().has_quorum


def test_certificates_renew_without_restart(tmp_path):
    """30-second certificates: every node renews (a third of the lifetime before expiry), and the cluster
    keeps working past the first certificates' expiry with the same processes."""
    directory = tmp_path / "renew"
    try:
        dc = devcluster.up(directory, 1, 1, free_base_port(), timeout=60, env={"CORTEX_CERT_DAYS": str(30 / 86400)})
        n1, w1 = dc.node("n1"), dc.node("w1")
        pids = (n1.pid, w1.pid)
        paths = {n.id: Path(n.dir) / "data" / "tls" / "node.crt" for n in (n1, w1)}
        first = {k: p.read_bytes() for k, p in paths.items()}
        expiry = max(tls.not_after(c) for c in first.values())
        wait_until(lambda: all(paths[k].read_bytes() != first[k] for k in paths), 60, "renewed certificates",
                   interval=0.5)
        for k in paths:
            new = paths[k].read_bytes()
            assert tls.peer_of(new) == tls.peer_of(first[k]) and tls.not_after(new) > tls.not_after(first[k])
        wait = (expiry - datetime.datetime.now(datetime.UTC)).total_seconds() + 2
        time.sleep(max(wait, 0))  # the first certificates have now expired
        files = devcluster.trust(dc)  # the admin certificate was renewed on disk too
        assert files is not None and tls.not_after(files.cert) > expiry
        with Client(w1.grpc_address, timeout=10) as c:  # worker -> server with the renewed certificates
            c.put("renewed", "yes", retry_for=10)
            assert c.get("renewed") == "yes"
        with Client(n1.grpc_address) as c:
            assert {n.id: n.liveness for n in c.status().nodes} == {"n1": "alive", "w1": "alive"}
        assert (n1.pid, w1.pid) == pids and all(devcluster.alive(p) for p in pids)
    finally:
        devcluster.down(directory)


def test_secrets_rotate_replaces_every_certificate_under_write_load_losing_nothing(shared_cluster):
    import json
    import os
    import subprocess
    import sys
    import threading

    nodes = shared_cluster.nodes
    paths = {n.id: Path(n.dir) / "data" / "tls" / "node.crt" for n in nodes}
    before = {k: tls.fingerprint(p.read_bytes()) for k, p in paths.items()}
    pids = {n.id: n.pid for n in nodes}
    acked: dict[str, str] = {}
    acked_at: list[float] = []
    failures: list[str] = []
    stop = threading.Event()

    def writer(node_id: str) -> None:
        with shared_cluster.client(node_id, timeout=5) as c:
            i = 0
            while not stop.is_set():
                key, value = f"rotate/{node_id}/{i}", str(i)
                try:
                    c.put(key, value, idempotency_key=f"rot-{node_id}-{i}", retry_for=5)
                    acked[key] = value  # acknowledged: must survive
                    acked_at.append(time.monotonic())
                except CortexError as exc:
                    failures.append(f"{key}: {exc}")
                i += 1

    with shared_cluster.client("n1") as c:
        term_before = c.status().term
    threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in ("n2", "w1")]
    for t in threads:
        t.start()
    time.sleep(1.0)
    out = subprocess.run([sys.executable, "-m", "cortex", "--addr", shared_cluster.node("n1").grpc_address,
                          "--json", "secrets", "rotate"], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    generation = json.loads(out.stdout)["generation"]
    raft_generation = json.loads(out.stdout)["raft_generation"]
    wait_until(lambda: all(tls.fingerprint(paths[k].read_bytes()) != before[k] for k in paths), 40,
               "replaced certificates", interval=0.3,
               detail=lambda: f"unchanged: {[k for k, p in paths.items() if tls.fingerprint(p.read_bytes()) == before[k]]}")
    time.sleep(1.5)  # keep writing on the new certificates
    stop.set()
    for t in threads:
        t.join(30)
    assert all(int((Path(n.dir) / "data" / "tls" / "rotation").read_text()) >= generation for n in nodes)
    for n in shared_cluster.dc.servers:  # every server encrypts Raft with the new key
        assert int((Path(n.dir) / "data" / "tls" / "raft-generation").read_text()) == raft_generation
    with shared_cluster.client("n1") as c:
        term_after = c.status().term
    stamps = sorted(acked_at)
    longest_pause = max((b - a for a, b in zip(stamps, stamps[1:])), default=0.0)
    print(f"rotation under load: {len(acked)} writes acknowledged, {len(failures)} failed unacknowledged, "
          f"longest pause between acknowledged writes {longest_pause:.2f} s, term {term_before} -> {term_after}")
    # Downtime as clients see it, at most about one election. (The term alone overstates it: on a loaded
    # 2-core machine a lagging follower sometimes calls elections the leader wins again at once.)
    assert longest_pause < 8.0, f"writes stalled for {longest_pause:.1f} s"
    assert {n.id: n.pid for n in nodes} == pids and all(devcluster.alive(p) for p in pids.values())
    assert len(acked) > 20, (len(acked), failures[:5])
    files = devcluster.trust(shared_cluster.dc)  # the admin certificate was rotated too
    with Client(shared_cluster.node("n3").grpc_address, tls_files=files) as c:
        for key, value in acked.items():
            assert c.get(key, level="linearizable") == value, key


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a process as a user with no passwd entry: needs root")
def test_a_client_in_a_process_without_a_home_finds_no_dev_trust_note_and_no_error(tmp_path: Path):
    # The appliance's agent is a DynamicUser without $HOME (Path.home() raises there): a client it opens to a
    # network address before it has credentials of its own must not raise looking for `cortex dev up` notes.
    code = ("from cortex.client import dev_trust_dir, find_credentials; "
            "print(dev_trust_dir(), find_credentials('127.0.0.1:1'))")
    done = python_without_home(code, unset=("XDG_CACHE_HOME", "CORTEX_DEV_TRUST_DIR", "CORTEX_TLS_DIR"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None None"


# --- a slow peer ---------------------------------------------------------------------------------------------

class SlowLink:
    """A TCP relay that holds every chunk the server sends for `delay` seconds: a peer as slow as a loaded
    small board or an emulated VM, where a mutual-TLS handshake takes several hundred milliseconds."""

    def __init__(self, upstream: tuple[str, int], delay: float):
        self.upstream, self.delay, self.delayed_chunks, self.accepted = upstream, delay, 0, 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, 0.0), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, self.delay), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, delay: float) -> None:
        try:
            while chunk := source.recv(65536):
                if delay:
                    time.sleep(delay)
                    self.delayed_chunks += 1
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                s.close()

    def close(self) -> None:
        self._listener.close()


def test_a_slow_peer_gets_time_to_finish_the_tls_handshake():
    """gRPC takes grpc.min_reconnect_backoff_ms as the time a connection attempt may take; at 100 ms a
    handshake with a slow peer never finished on the first attempts (VM tests: the first heartbeats after a
    wake, and joins, failed with 'connection attempt timed out' / 'Handshake read failed')."""
    from concurrent.futures import ThreadPoolExecutor

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    ca, ca_key = tls.new_ca("c-1")
    server_cert, server_key = tls.issue(ca, ca_key, "n1", "server", "c-1")
    client_cert, client_key = tls.issue(ca, ca_key, "w1", "worker", "c-1")
    server = grpc.server(ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(server_key, server_cert)], root_certificates=ca, require_client_auth=True))
    server.start()
    link = SlowLink(("127.0.0.1", port), delay=0.2)
    channel = secure_channel(f"127.0.0.1:{link.port}", tls.ClientFiles(ca, client_cert, client_key),
                             channel_options())
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert link.delayed_chunks >= 2, "the handshake did not cross the slow link"
    finally:
        channel.close()
        link.close()
        server.stop(0)


def test_a_client_waits_out_a_handshake_slower_than_the_agents_own_connect_limit(shared_cluster):
    """The agent's channels give a connection attempt CONNECT_TIMEOUT_MS, and gRPC's backoff never lengthens
    an attempt past max_reconnect_backoff_ms: a handshake slower than that never completes. A client talking
    to one node (the CLI, cortex-ready) gives it as long as its call may take."""
    host, port = shared_cluster.node("n1").grpc_address.rsplit(":", 1)
    link = SlowLink((host, int(port)), delay=0.6)  # each server flight 0.6 s: the handshake takes over 1 s
    try:
        with Client(f"127.0.0.1:{link.port}", timeout=15, tls_files=devcluster.trust(shared_cluster.dc)) as c:
            assert c.status().node_id == "n1"
        assert link.delayed_chunks >= 2, "the handshake did not cross the slow link"
    finally:
        link.close()


def test_fresh_channels_after_a_wake_open_fresh_connections():
    """Peers.reset() (after a wake) really opens new connections: gRPC shares one connection between channels
    whose arguments match, and a connection from before the sleep may be dead without knowing it yet. (Each
    secure channel's credentials object differs, so they do not match; this keeps it that way.)"""
    from concurrent.futures import ThreadPoolExecutor

    from cortex.node.peers import Peers

    ca, ca_key = tls.new_ca("c-1")
    server_cert, server_key = tls.issue(ca, ca_key, "n1", "server", "c-1")
    client_cert, client_key = tls.issue(ca, ca_key, "w1", "worker", "c-1")
    server = grpc.server(ThreadPoolExecutor(2))  # serves no Cluster methods: each call ends UNIMPLEMENTED
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(server_key, server_cert)], root_certificates=ca, require_client_auth=True))
    server.start()
    link = SlowLink(("127.0.0.1", port), delay=0.0)
    peers = Peers(4 * 1024 * 1024, credentials=lambda: tls.ClientFiles(ca, client_cert, client_key))
    address = f"127.0.0.1:{link.port}"

    def call() -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as info:
            peers.stub(address).Status(pb.StatusRequest(), timeout=10)
        return info.value.code()

    try:
        assert call() == grpc.StatusCode.UNIMPLEMENTED and link.accepted == 1
        assert call() == grpc.StatusCode.UNIMPLEMENTED and link.accepted == 1  # reused while nothing happened
        peers.reset()
        assert call() == grpc.StatusCode.UNIMPLEMENTED and link.accepted == 2, "reset() reused the old connection"
    finally:
        peers.close()
        link.close()
        server.stop(0)

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

from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex._proto.cortex.v1 import cortex_pb2_grpc as pb_grpc
from cortex.client import Client, CortexError, secure_channel
from cortex.core.commands import CommandError, Envelope, validate
from cortex.core.state import StateStore
from cortex.dev import cluster as devcluster
from cortex.membership import identity
from cortex.security import authz, revocation, tls
from tests.support.agent import cortex, start_agent, wait_status, write_config
from tests.support.cluster import free_base_port, module_cluster
from tests.support.wait import wait_until


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
    yield from module_cluster(tmp_path_factory.mktemp("trust"), 3, 1)


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


# --- revocation --------------------------------------------------------------------------------------------

def _apply(store: StateStore, index: int, args: dict, ts: float) -> dict:
    env = Envelope(type="cert.revoke", args=validate("cert.revoke", args), id=f"{index:032x}", ts=ts, term=1,
                   idem=f"k{index}")
    return store.apply(index, env.encode())


def test_revocation_watermarks_are_replicated_state(tmp_path):
    store = StateStore(tmp_path / "s.db")
    ca, ca_key = tls.new_ca("c-1")
    old = tls.issue(ca, ca_key, "w1", "worker", "c-1")[0]
    # a renewal at ts 1000 revokes certificates issued before the new one, after a grace of 15 s
    new_at = tls.issued_at(old) + 5
    assert _apply(store, 1, {"name": "w1", "before": new_at, "until": 5e9, "grace": 15, "reason": "renewed"},
                  ts=1000.0)["changed"]
    rl = revocation.RevocationList()
    rl.update(store.query("cert.revocations", {}))
    assert rl.refusal("w1", old, now=1010.0) is None  # in its grace: calls begun with it finish
    assert "a newer certificate replaced it" in rl.refusal("w1", old, now=1015.0)
    assert rl.refusal("w2", old, now=1015.0) is None  # another name
    # a lower watermark never lowers it (a retried or reordered revocation)
    assert not _apply(store, 2, {"name": "w1", "before": new_at - 100, "until": 5e9, "reason": "renewed"},
                      ts=1001.0)["changed"]
    # a second renewal within the first one's grace keeps the first range pending, then in force
    _apply(store, 3, {"name": "w1", "before": new_at + 50, "until": 5e9, "grace": 15, "reason": "renewed"},
           ts=1005.0)
    rl.update(store.query("cert.revocations", {}))
    assert rl.refusal("w1", old, now=1016.0) is None and rl.refusal("w1", old, now=1020.0)
    _apply(store, 4, {"name": "w1", "before": new_at + 60, "until": 5e9, "grace": 15, "reason": "renewed"},
           ts=1030.0)
    rl.update(store.query("cert.revocations", {}))
    assert rl.refusal("w1", old, now=1031.0)  # the earlier range stays revoked through the new grace
    # removal: before = the command's time, at once; pruned once everything it revokes has expired
    _apply(store, 5, {"name": "n3", "before": None, "until": 2000.0, "reason": "removed"}, ts=1040.0)
    assert {r["name"]: r["before"] for r in store.query("cert.revocations", {})}["n3"] == 1040.0
    _apply(store, 6, {"name": "x", "before": None, "until": 9e9, "reason": "operator"}, ts=2001.0)
    assert "n3" not in {r["name"] for r in store.query("cert.revocations", {})}
    for bad in ({"name": "", "until": 1}, {"name": "w1", "until": 1, "reason": "bored"},
                {"name": "w1", "until": 1, "grace": 10_000}, {"name": "w1"}, {"name": "w1", "until": 1, "x": 1}):
        with pytest.raises(CommandError):
            validate("cert.revoke", bad)
    # who may write it: admins and servers any name, a node only its own
    assert revocation.write_refusal("cert.revoke", {"name": "n1"}, tls.Peer("w1", "worker", "c")) is not None
    assert revocation.write_refusal("cert.revoke", {"name": "w1"}, tls.Peer("w1", "worker", "c")) is None
    assert revocation.write_refusal("cert.revoke", {"name": "n1"}, tls.Peer("admin@n2", "admin", "c")) is None


def test_raft_keys_move_to_the_new_ca_key_without_refusing_a_frame():
    from cryptography.fernet import InvalidToken

    from cortex.raft.keys import RotatingEncryptor

    old_key, new_key = tls.new_ca("c-1")[1], tls.new_ca("c-1")[1]
    a, b = RotatingEncryptor("s", old_key, 1), RotatingEncryptor("s", old_key, 1)
    a.add_ca_key(2, new_key)  # trust phase: a accepts generation 2 of the new key, still sends 1
    b.add_ca_key(2, new_key)
    assert b.decrypt(a.encrypt_at_time(b"x", 1)) == b"x"
    a.set_generation(2)  # a switches first: b reads it, and a still reads b's generation 1 (old key)
    assert b.decrypt(a.encrypt_at_time(b"y", 2)) == b"y" and a.decrypt(b.encrypt_at_time(b"z", 3)) == b"z"
    stale = RotatingEncryptor("s", old_key, 1)  # a server that never got the new key cannot read generation 2
    with pytest.raises(InvalidToken):
        stale.decrypt(a.encrypt_at_time(b"w", 4))


def test_a_server_restarted_mid_rotation_derives_each_raft_generation_from_the_right_ca_key(tmp_path):
    from cortex.raft.keys import RotatingEncryptor
    from cortex.security import rotation_driver
    from cortex.security.certs import NodeCerts

    old_key, new_key = tls.new_ca("c-1")[1], tls.new_ca("c-1")[1]
    peer = RotatingEncryptor("s", old_key, 1)
    peer.add_ca_key(2, new_key)
    certs = NodeCerts(tmp_path, "n2")
    for name, data in (("ca.key", new_key), ("ca-prev.key", old_key), (rotation_driver.RAFT_FILE, b"2")):
        tls.write_file(certs.dir / name, data)  # reissued, then restarted before the Raft key moved
    restarted = RotatingEncryptor("s", certs.ca()[1], 1)
    rotation_driver.restore_raft_keys(certs, restarted)
    assert restarted.decrypt(peer.encrypt_at_time(b"g1", 1)) == b"g1"  # generation 1: the old key
    assert peer.decrypt(restarted.encrypt_at_time(b"back", 2)) == b"back"
    peer.set_generation(2)
    assert restarted.decrypt(peer.encrypt_at_time(b"g2", 3)) == b"g2"  # generation 2: the new key


def test_ca_rotation_phases_advance_only_when_every_member_acknowledged(tmp_path):
    from cortex.security import ca_rotation, rotation_driver

    store = StateStore(tmp_path / "s.db")
    index = iter(range(1, 100))

    def apply(kind: str, args: dict) -> dict:
        i = next(index)
        env = Envelope(type=kind, args=validate(kind, args), id=f"{i:032x}", ts=1000.0 + i, term=1, idem=f"k{i}")
        return store.apply(i, env.encode())

    ca, ca_key = tls.new_ca("c-1")
    assert apply("ca.request", {"rot_id": "r1"})["started"]
    assert not apply("ca.request", {"rot_id": "r2"})["started"]  # one at a time: re-running resumes r1
    members = ["n1", "w1"]
    action = rotation_driver.leader_action(store.query("ca.rotation", {}), members, ca, ca_key, "c-1", 4)
    assert action["phase"] == "trust" and action["raft_generation"] == 5 and action["old_pin"] == tls.ca_pin(ca)
    new_key = rotation_driver.unwrap_key(ca_key, "r1", action["key_enc"])
    assert tls.key_matches(action["new_ca"].encode(), new_key)  # only a holder of the old CA key unwraps it
    assert rotation_driver.unwrap_key(tls.new_ca("c-1")[1], "r1", action["key_enc"]) is None
    assert apply("ca.advance", action)["advanced"]
    assert not apply("ca.advance", {"rot_id": "r1", "phase": "drop"})["advanced"]  # no skipping a phase
    doc = store.query("ca.rotation", {})
    assert ca_rotation.pending(doc, members) == ["n1", "w1"]
    assert rotation_driver.leader_action(doc, members, ca, ca_key, "c-1", 4) is None
    apply("ca.ack", {"node": "n1", "rot_id": "r1", "phase": "trust"})
    apply("ca.ack", {"node": "w1", "rot_id": "r0", "phase": "trust"})  # an ack of another rotation counts not
    assert ca_rotation.pending(store.query("ca.rotation", {}), members) == ["w1"]
    apply("ca.ack", {"node": "w1", "rot_id": "r1", "phase": "trust"})
    nxt = rotation_driver.leader_action(store.query("ca.rotation", {}), members, ca, ca_key, "c-1", 4)
    assert nxt == {"rot_id": "r1", "phase": "reissue"}
    # who may write: an admin starts it, a node acknowledges for itself only, nobody but the leader advances
    assert ca_rotation.write_refusal("ca.request", {}, tls.Peer("w1", "worker", "c")) is not None
    assert ca_rotation.write_refusal("ca.ack", {"node": "n1"}, tls.Peer("w1", "worker", "c")) is not None
    assert ca_rotation.write_refusal("ca.ack", {"node": "w1"}, tls.Peer("w1", "worker", "c")) is None
    from cortex.core.commands import is_internal

    assert is_internal("ca.advance") and not is_internal("ca.ack")


def _status(address: str, files: tls.ClientFiles) -> None:
    with Client(address, tls_files=files, timeout=5) as c:
        c.status()


def _refused_everywhere(cluster, files: tls.ClientFiles, timeout: float = 30.0) -> dict[str, str]:
    """Until every server refuses `files` (its revocation list refreshes each second); their answers."""
    def answers() -> dict[str, str]:
        seen = {}
        for node in cluster.dc.servers:
            try:
                _status(node.grpc_address, files)
                seen[node.id] = "accepted"
            except CortexError as exc:
                seen[node.id] = f"{exc.code.name}: {exc.details}"
        return seen

    def refused_by_all() -> dict[str, str] | None:
        seen = answers()
        return seen if all(v != "accepted" for v in seen.values()) else None

    try:
        return wait_until(refused_by_all, timeout, "every server to refuse the credentials", interval=0.5)
    except AssertionError:
        return answers()  # as they stand: the caller asserts on them


def _copy_files(cluster, node_id: str, stem: str) -> tls.ClientFiles:
    files = tls.client_files(_tls_dir(cluster, node_id), (stem,))
    assert files is not None
    return files


def test_a_replaced_certificate_is_refused_on_every_server_and_nothing_else_breaks(trust_cluster):
    import time

    cluster = trust_cluster
    old_worker = _copy_files(cluster, "w1", "node")
    old_admin = _copy_files(cluster, "n1", "admin")
    old_server = _copy_files(cluster, "n2", "node")
    for files in (old_worker, old_admin, old_server):
        _status(cluster.node("n3").grpc_address, files)  # valid before
    out = cortex("--addr", cluster.node("n1").grpc_address, "--json", "secrets", "rotate")
    generation = json.loads(out.stdout)["generation"]
    wait_until(lambda: all((_tls_dir(cluster, n) / "node.crt").read_bytes() != f.cert
                           for n, f in (("w1", old_worker), ("n2", old_server))), 40, "replaced certificates",
               interval=0.3)
    started = time.monotonic()
    for what, files in (("worker", old_worker), ("admin", old_admin), ("server", old_server)):
        answers = _refused_everywhere(cluster, files, timeout=60)
        print(f"old {what} certificate after rotation {generation}: {answers}")
        assert all(a.startswith("UNAUTHENTICATED") and "was revoked" in a for a in answers.values()), answers
    print(f"replaced certificates refused everywhere {time.monotonic() - started:.1f} s after the switch "
          f"(grace {revocation_grace()} s)")
    with cluster.client("n1") as c:
        rows = {r["name"]: r for r in c.read("cert.revocations", {}, level="linearizable")}
    assert {"n1", "n2", "n3", "w1", "admin@n1", "admin@n2", "admin@n3"} <= set(rows)
    assert {rows[n]["reason"] for n in ("w1", "n2", "admin@n1")} == {"rotated"}
    # the current certificates work: writes through a worker and a server, the worker is alive
    for node_id in ("w1", "n2"):
        with cluster.client(node_id) as c:
            c.put(f"after-rotation/{node_id}", "ok", retry_for=10)
    new_worker = _copy_files(cluster, "w1", "node")
    _status(cluster.node("n1").grpc_address, new_worker)
    with cluster.client("n1") as c:
        assert {n.id: n.liveness for n in c.status().nodes}["w1"] == "alive"
        assert c.get("after-rotation/w1", level="linearizable") == "ok"


def revocation_grace() -> float:
    from cortex.security.certs import RENEW_GRACE

    return RENEW_GRACE


def test_ca_rotation_under_write_load_loses_nothing_and_is_resumable(trust_cluster):
    import subprocess
    import sys
    import threading
    import time

    cluster = trust_cluster
    nodes = cluster.nodes
    old_ca = (_tls_dir(cluster, "n1") / "ca.crt").read_bytes()
    old_admin = _copy_files(cluster, "n1", "admin")
    pids = {n.id: n.pid for n in nodes}
    acked: dict[str, str] = {}
    acked_at: list[float] = []
    failures: list[str] = []
    stop = threading.Event()

    def writer(node_id: str) -> None:
        with cluster.client(node_id, timeout=5) as c:
            i = 0
            while not stop.is_set():
                key, value = f"ca-rotate/{node_id}/{i}", str(i)
                try:
                    c.put(key, value, idempotency_key=f"ca-rot-{node_id}-{i}", retry_for=10)
                    acked[key] = value  # acknowledged: must survive
                    acked_at.append(time.monotonic())
                except CortexError as exc:
                    failures.append(f"{key}: {exc}")
                i += 1

    with cluster.client("n1") as c:
        term_before = c.status().term
    threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in ("n2", "w1")]
    for t in threads:
        t.start()
    time.sleep(1.0)
    cli = [sys.executable, "-m", "cortex", "--addr", cluster.node("n1").grpc_address, "--json", "secrets",
           "rotate", "--ca"]
    # interrupted: the CLI gives up after a second, the rotation goes on in the cluster
    first = subprocess.run(cli + ["--wait", "1"], capture_output=True, text=True, timeout=60)
    assert first.returncode == 1, first.stderr
    interrupted = json.loads(first.stdout)
    assert interrupted["timed_out"] and not interrupted["resumed"]
    # run again: it resumes the same rotation and follows it to the end
    second = subprocess.run(cli + ["--wait", "300"], capture_output=True, text=True, timeout=360)
    assert second.returncode == 0, second.stderr + second.stdout
    result = json.loads(second.stdout)
    assert result["rot_id"] == interrupted["rot_id"] and result["resumed"] and result["phase"] == "done"
    shown = second.stderr
    assert all(f"  {phase}" in shown for phase in ("reissue", "drop", "done")), shown  # progress, per phase
    time.sleep(1.5)  # keep writing on the new CA
    stop.set()
    for t in threads:
        t.join(30)
    new_ca = (_tls_dir(cluster, "n1") / "ca.crt").read_bytes()
    assert tls.ca_pin(new_ca) == result["new_pin"] != tls.ca_pin(old_ca) == result["old_pin"]
    for n in nodes:  # every node trusts the new CA only and holds a certificate of it
        directory = _tls_dir(cluster, n.id)
        assert (directory / "ca.crt").read_bytes() == new_ca, n.id
        assert tls.issued_by((directory / "node.crt").read_bytes(), new_ca), n.id
        if n.role == "server":
            assert tls.key_matches(new_ca, (directory / "ca.key").read_bytes())
            assert int((directory / "raft-generation").read_text()) >= result["raft_generation"]
    with cluster.client("n1") as c:
        term_after = c.status().term
    stamps = sorted(acked_at)
    longest_pause = max((b - a for a, b in zip(stamps, stamps[1:])), default=0.0)
    print(f"CA rotation under load: {len(acked)} writes acknowledged, {len(failures)} failed unacknowledged, "
          f"longest pause between acknowledged writes {longest_pause:.2f} s, term {term_before} -> {term_after}; "
          f"progress:\n{second.stderr}")
    # Downtime, measured where clients see it: no pause longer than one election (plus the retry that
    # follows it). The term alone overstates it: on this shared 2-core machine a follower that falls behind
    # under the write load sometimes calls elections the old leader wins again at once.
    assert longest_pause < 8.0, f"writes stalled for {longest_pause:.1f} s"
    assert {n.id: n.pid for n in nodes} == pids and all(devcluster.alive(p) for p in pids.values())
    assert len(acked) > 20, (len(acked), failures[:5])
    # Followers kept up by appending what they lacked, never deleting what they had applied (under this load
    # pysyncobj alone did so ~400 times per run and left a follower's replica tens of seconds behind).
    assert cluster.applied_entries_truncated() == {}
    with cluster.client("n3") as c:  # every acknowledged write is there (one linearizable read of them all)
        stored = {r["key"]: r["value"] for r in c.read("kv.list", {"prefix": "ca-rotate/", "limit": 10_000},
                                                        level="linearizable")}
    missing = [k for k, v in acked.items() if stored.get(k) != v]
    assert not missing, (len(missing), missing[:5])
    # the old CA is gone: its certificates fail the handshake
    channel = secure_channel(cluster.node("n2").grpc_address, old_admin, [])
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.ClusterStub(channel).Status(pb.StatusRequest(), timeout=5)
    channel.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # no RPC ran
    # new tokens pin the new CA and a pinned join still works (the enrollment port presents the new CA)
    made = json.loads(cortex("--addr", cluster.node("n1").grpc_address, "--json", "token", "create").stdout)
    assert made["ca_pin"] == result["new_pin"]
    with authz.enroll_channel(cluster.node("n3").grpc_address, [], pin=made["ca_pin"]) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)


def test_a_removed_node_is_refused_on_every_server(trust_cluster):
    cluster = trust_cluster
    worker = _copy_files(cluster, "w1", "node")
    _status(cluster.node("n1").grpc_address, worker)
    removed = cortex("--addr", cluster.node("n2").grpc_address, "nodes", "remove", "w1", "--force")
    assert removed.returncode == 0, removed.stderr
    answers = _refused_everywhere(cluster, worker)
    print(f"removed worker's certificate: {answers}")
    assert all(a.startswith("UNAUTHENTICATED") and "node was removed" in a for a in answers.values()), answers
    with cluster.client("n1") as c:  # everyone else works
        c.put("after-removal", "ok", retry_for=10)
        assert {n.id for n in c.status().nodes} == {"n1", "n2", "n3"}
    for node_id in ("n2", "n3"):
        with cluster.client(node_id) as c:
            assert c.get("after-removal", level="linearizable") == "ok"

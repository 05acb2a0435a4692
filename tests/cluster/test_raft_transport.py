"""The Raft port on real agents: mutual TLS with the cluster's node certificates, frames bounded before they
are buffered, and a listener that comes back after a file-descriptor shortage."""

from __future__ import annotations

import os
import pickle
import resource
import signal
import socket
import ssl
import struct
import time
from pathlib import Path

import pytest

from cortex.security import tls
from tests.support.cluster import module_cluster
from tests.support.wait import wait_until


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from module_cluster(tmp_path_factory.mktemp("raftport"), servers=3, workers=0)


def _tls_dir(node) -> Path:
    return Path(node.dir) / "data" / "tls"


def _context(tmp: Path, cert: bytes, key: bytes, ca: bytes) -> ssl.SSLContext:
    (tmp / "c.crt").write_bytes(cert)
    (tmp / "c.key").write_bytes(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(tmp / "c.crt", tmp / "c.key")
    ctx.load_verify_locations(cadata=ca.decode())
    ctx.check_hostname = False  # the test trusts the cluster CA; which server answers does not matter here
    return ctx


def _member_context(cluster, tmp: Path, node_id: str = "n2") -> ssl.SSLContext:
    d = _tls_dir(cluster.node(node_id))
    return _context(tmp, (d / "node.crt").read_bytes(), (d / "node.key").read_bytes(), (d / "ca.crt").read_bytes())


def _connect(address: str, ctx: ssl.SSLContext | None = None):
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    if ctx is None:
        return sock
    return ctx.wrap_socket(sock, server_hostname=tls.SERVER_NAME)


def _closed_by_server(sock, within: float) -> bool:
    """Whether the server ends the connection within `within` seconds (EOF, reset or a TLS alert)."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except (ssl.SSLError, ConnectionError):
        return True
    except TimeoutError:
        return False


def _raft_state(cluster) -> tuple[str, int]:
    leader = cluster.leader()
    with cluster.client(leader) as c:
        return leader, c.status().term


def test_oversize_length_header_and_trickle_are_cut_off_and_writes_go_on(cluster, tmp_path):
    leader, term = _raft_state(cluster)
    address = cluster.node(leader).raft_address
    # A stranger: the largest length header, then a trickle. The server must not buffer towards 2 GiB.
    stranger = _connect(address)
    closed = False
    sent = 0
    try:
        stranger.sendall(b"\xff\xff\xff\x7f")
        for _ in range(256):  # up to 4 MiB in 16 KiB pieces, with writes in between
            stranger.sendall(b"A" * 16384)
            sent += 16384
            if sent % (256 * 1024) == 0:
                with cluster.client(leader) as c:
                    c.put("during-trickle", str(sent))
    except (BrokenPipeError, ConnectionResetError):
        closed = True
    closed = closed or _closed_by_server(stranger, 15)
    stranger.close()
    assert closed, f"the Raft port kept buffering a 2 GiB frame ({sent} bytes sent)"
    # A member past the handshake is held to raft.max_frame_bytes as well.
    member = _connect(address, _member_context(cluster, tmp_path))
    try:
        member.sendall(struct.pack(">I", 0x7FFFFFFF) + b"B" * 4096)
        assert _closed_by_server(member, 15), "a member's oversize frame was not refused"
    finally:
        member.close()
    assert _raft_state(cluster) == (leader, term)  # no election was forced
    log = Path(cluster.node(leader).log_path).read_text()
    assert "raft.max_frame_bytes" in log
    with cluster.client(leader) as c:
        c.put("after-trickle", "fine")


def test_garbage_and_a_hostile_pickle_on_the_raft_port_change_nothing(cluster, tmp_path):
    marker = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    hostile = pickle.dumps(Hostile())
    leader, term = _raft_state(cluster)
    with cluster.client(leader) as c:
        before = c.read("digest", {}, level="linearizable")["digest"]
    member = _member_context(cluster, tmp_path)
    for node in cluster.dc.servers:
        for payload, ctx in ((struct.pack("<i", len(hostile)) + hostile, None),  # today's framing, in clear
                             (struct.pack(">I", len(hostile)) + hostile, member),  # inside TLS, as a member
                             (struct.pack(">I", 5) + b"\xee" * 5, member),  # an unknown value tag
                             (os.urandom(4096), None)):
            sock = _connect(node.raft_address, ctx)
            try:
                sock.sendall(payload)
                assert _closed_by_server(sock, 15), f"{node.id} kept a connection that sent {payload[:12]!r}"
            finally:
                sock.close()
    assert not marker.exists()
    # More idle connections than raft.max_inbound_connections (64): the surplus is closed at accept.
    crowd = [_connect(cluster.node(leader).raft_address) for _ in range(72)]
    try:
        wait_until(lambda: "raft.max_inbound_connections reached" in Path(cluster.node(leader).log_path).read_text(),
                   20, "the connection cap to be logged")
    finally:
        for sock in crowd:
            sock.close()
    cluster.wait_healthy(timeout=20)
    assert _raft_state(cluster) == (leader, term)
    with cluster.client(leader) as c:
        assert c.read("digest", {}, level="linearizable")["digest"] == before


def test_only_current_server_certificates_of_this_cluster_may_speak_raft(cluster, tmp_path):
    leader = cluster.leader()
    address = cluster.node(leader).raft_address
    d = _tls_dir(cluster.node(leader))
    ca_cert, ca_key = (d / "ca.crt").read_bytes(), (d / "ca.key").read_bytes()
    cluster_id = tls.peer_of((d / "node.crt").read_bytes()).cluster_id

    member = _connect(address, _member_context(cluster, tmp_path))
    assert not _closed_by_server(member, 1.0), "a member's certificate was refused"
    member.close()

    other_ca, other_key = tls.new_ca(cluster_id)  # the same cluster id does not help: another CA
    cert, key = tls.issue(other_ca, other_key, "n9", "server", cluster_id)
    try:
        sock = _connect(address, _context(tmp_path, cert, key, ca_cert))
    except (ssl.SSLError, ConnectionError):
        pass  # refused within the handshake
    else:
        assert _closed_by_server(sock, 15), "a certificate of another CA was let onto the Raft port"
        sock.close()

    cert, key = tls.issue(ca_cert, ca_key, "w9", "worker", cluster_id)  # a worker does not vote
    sock = _connect(address, _context(tmp_path, cert, key, ca_cert))
    assert _closed_by_server(sock, 15), "a worker certificate was let onto the Raft port"
    sock.close()

    cert, key = tls.issue(ca_cert, ca_key, "ghost", "server", cluster_id)
    ghost = _context(tmp_path, cert, key, ca_cert)
    sock = _connect(address, ghost)
    assert not _closed_by_server(sock, 1.0)  # valid until revoked
    with cluster.client(leader) as c:
        c.write("cert.revoke", {"name": "ghost", "until": time.time() + 3600, "reason": "removed"})
    assert _closed_by_server(sock, 15), "a connection with a revoked certificate stayed open"
    sock.close()

    def refused() -> bool:
        s = _connect(address, ghost)
        try:
            return _closed_by_server(s, 5)
        finally:
            s.close()

    wait_until(refused, 20, "a revoked certificate to be refused", ignore=(ssl.SSLError, ConnectionError))
    log = Path(cluster.node(leader).log_path).read_text()
    assert "revoked" in log
    with cluster.client(leader) as c:
        c.put("after-strangers", "fine")


def test_the_listener_comes_back_after_a_descriptor_shortage(cluster, tmp_path):
    leader = cluster.leader()
    node = cluster.node(next(n for n in ("n1", "n2", "n3") if n != leader))
    soft, hard = resource.prlimit(node.pid, resource.RLIMIT_NOFILE)
    held = []
    try:
        in_use = len(os.listdir(f"/proc/{node.pid}/fd"))
        resource.prlimit(node.pid, resource.RLIMIT_NOFILE, (in_use, hard))
        for _ in range(4):  # each waits in the backlog; accepting it fails with EMFILE
            try:
                held.append(_connect(node.raft_address))
            except ConnectionRefusedError:  # pysyncobj's listener closed at the first failed accept
                break

        def shortage_hit() -> bool:  # logged by the agent, or (pysyncobj's listener) the port closed for good
            if "accept failed" in Path(node.log_path).read_text():
                return True
            try:
                _connect(node.raft_address).close()
            except (ConnectionRefusedError, ConnectionResetError):
                return True
            return False

        wait_until(shortage_hit, 20, "the descriptor shortage to reach the Raft listener")
    finally:
        resource.prlimit(node.pid, resource.RLIMIT_NOFILE, (soft, hard))
        for s in held:
            s.close()
    ctx = _member_context(cluster, tmp_path, "n1" if node.id != "n1" else "n2")

    def answers() -> bool:
        s = _connect(node.raft_address, ctx)
        try:
            return not _closed_by_server(s, 1.0)
        finally:
            s.close()

    wait_until(answers, 30, "the Raft listener to accept members again", ignore=(OSError,))
    cluster.wait_healthy(timeout=30)
    with cluster.client(leader) as c:
        c.put("after-shortage", "fine")


def test_a_password_cluster_is_bounded_too_and_moves_to_mtls_one_server_at_a_time(make_cluster):
    """The upgrade path (docs/operations/raft-transport.md): servers whose Raft state predates mutual TLS
    keep the password transport (here chosen explicitly), then switch one at a time; a majority keeps
    committing throughout and the odd server out is told why."""
    cluster = make_cluster(3, raft={"transport": "password"})
    leader = cluster.leader()
    stranger = _connect(cluster.node(leader).raft_address)
    try:  # the password transport bounds frames as well: refused at the header, nothing buffered
        stranger.sendall(b"\xff\xff\xff\x7f" + b"A" * 65536)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert _closed_by_server(stranger, 15)
    stranger.close()
    for step, node_id in enumerate(("n1", "n2", "n3"), start=1):
        node = cluster.node(node_id)
        cluster.kill(node_id, signal.SIGTERM)
        path = Path(node.config_path)
        path.write_text(path.read_text().replace("transport: password", "transport: mtls"))
        cluster.start(node_id)
        writer = ("n2", "n1", "n3")[step - 1]  # a server on the side that holds the majority
        with cluster.client(writer) as c:
            wait_until(lambda c=c, step=step: c.put("switch", str(step)), 30, "a write during the switch",
                       ignore=(Exception,))
    cluster.wait_healthy(timeout=30)
    digests = cluster.wait_converged(timeout=30)
    assert len(set(digests.values())) == 1
    refusals = "".join(Path(cluster.node(n).log_path).read_text() for n in ("n1", "n2", "n3"))
    assert "does not speak TLS: this server has raft.transport=mtls" in refusals
    for n in ("n1", "n2", "n3"):
        assert (Path(cluster.node(n).dir) / "data" / "raft-transport").read_text().strip() == "mtls"

"""The provisioning service over HTTP on loopback, against a real cluster (shared_cluster: agent processes):
per-boot single-use tokens minted through the cluster, enrollments in replicated state, refusals, the
leader's reconciler (joined / left / garbage-collected) and the ephemeral node runner on a real worker."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from cortex import cli
from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex._proto.cortex.v1 import cortex_pb2_grpc as pb_grpc
from cortex.client import Client, register_credentials
from cortex.dev import cluster as devcluster
from cortex.membership import identity
from cortex.netboot import ephemeral, profiles
from cortex.netboot.artifacts import fetch_all
from cortex.netboot.cli import ClientPort
from cortex.netboot.service import HttpService, Provisioner, ServiceConfig
from cortex.security import authz
from tests.support import procs
from tests.support.cluster import free_base_port
from tests.support.wait import wait_until

PROFILES = """
profiles:
  worker: {token_ttl: 120, gc_offline_after: 2, idle_poweroff_after: 1}
  short: {token_ttl: 1}
groups:
  - {name: short-lived, profile: short, selector: {mac: "52:54:00:00:00:0e"}, node_name: "expiring-{mac}"}
  - {name: by-hostname, profile: worker, selector: {mac: "52:54:00:00:00:0f"}, node_name: "h-{hostname}"}
  - {name: everyone, profile: worker}
"""
NO_DEFAULT = """
profiles: {worker: {}}
groups:
  - {name: known, profile: worker, selector: {mac: "52:54:00:00:00:01"}, node_name: known-1}
"""


def unpack_token(archive: bytes) -> str:
    """The join token out of a credentials cpio, read by the real cpio tool when it is there."""
    if shutil.which("cpio"):
        with tempfile.TemporaryDirectory() as out:
            subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=archive, cwd=out,
                           check=True, capture_output=True, timeout=30)
            token_file = Path(out, "etc/credstore/cortex.join_token")
            assert token_file.stat().st_mode & 0o777 == 0o600
            return token_file.read_text()
    pos = 0  # newc by hand: 110-byte header of hex fields, name, data, each padded to 4 bytes
    while True:
        fields = [int(archive[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        name = archive[pos + 110:pos + 110 + fields[11] - 1].decode()
        pos += -(-(110 + fields[11]) // 4) * 4
        data = archive[pos:pos + fields[6]]
        pos += -(-fields[6] // 4) * 4
        if name == "etc/credstore/cortex.join_token":
            assert fields[1] & 0o777 == 0o600
            return data.decode()
        assert name != "TRAILER!!!", "no token in the archive"


class Service:
    def __init__(self, url: str, cluster, http: HttpService, artifacts: Path):
        self.url, self.cluster, self.http, self.artifacts = url, cluster, http, artifacts

    def get(self, path: str) -> tuple[int, dict, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=15) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def boot(self, mac: str, hostname: str = "") -> tuple[str, str, str]:
        """GET the per-machine script like iPXE would; returns (script, node id, token)."""
        status, _, body = self.get(f"/ipxe?mac={mac.replace(':', '-')}&uuid=&serial=&hostname={hostname}")
        assert status == 200, body
        script = body.decode()
        creds = dict(re.findall(r"systemd\.set_credential=([a-z_.]+):(\S+)", script))
        assert "cortex.join_token" not in creds, "the token stays off the kernel command line"
        return script, creds["cortex.node_name"], self.token_from(script)

    def token_from(self, script: str) -> str:
        """Fetch the script's one-time credentials initrd as iPXE would and read the token out of it."""
        url, = re.findall(r"^initrd (\S+/credentials/\S+) \|\| goto failed$", script, re.M)
        status, _, archive = self.get(url[len(self.url):])
        assert status == 200, archive
        return unpack_token(archive)

    def leader(self) -> Client:
        return self.cluster.client(self.cluster.leader())


def start_service(cluster, tmp: Path, profiles_text: str, via: str) -> Service:
    artifacts = tmp / "artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "cortex-netboot.vmlinuz").write_bytes(os.urandom(300_000))
    (artifacts / "cortex-netboot.cpio.zst").write_bytes(os.urandom(2_000_000))
    port = free_base_port(1)
    url = f"http://127.0.0.1:{port}"
    config = ServiceConfig(url, cluster.node("n1").grpc_address, artifacts, profiles.loads(profiles_text))
    http = HttpService(Provisioner(config, ClientPort(cluster.node(via).grpc_address, 10)), "127.0.0.1", port)
    http.start()
    return Service(url, cluster, http, artifacts)


@pytest.fixture(scope="module")
def service(shared_cluster, tmp_path_factory):
    # Through a worker: token creation and enrollment writes are forwarded to the leader.
    svc = start_service(shared_cluster, tmp_path_factory.mktemp("netboot"), PROFILES, via="w1")
    yield svc
    svc.http.stop()


def join(cluster, node_id: str, token: str, role: str = "worker") -> pb.JoinResponse:
    """A bare Join call, as a booting node's agent makes it (no heartbeats follow: it will go offline)."""
    pin = identity.split_token(token)[1]  # a boot's token carries the CA pin: the channel trusts that CA only
    assert pin, "netboot tokens are pinned"
    with authz.enroll_channel(cluster.node("n2").grpc_address, [], pin=pin) as channel:  # the enrollment port
        return pb_grpc.ClusterStub(channel).Join(pb.JoinRequest(
            node_id=node_id, role=role, grpc_address="127.0.0.1:9", token=token,
            raft_address="127.0.0.1:10" if role == "server" else ""), timeout=15)


def enrollments(svc: Service, node_id: str) -> list[dict]:
    with svc.leader() as c:
        return c.read("netboot.enrollments", {"node_id": node_id}, level="leader")


def member(svc: Service, node_id: str) -> dict | None:
    with svc.leader() as c:
        return next((n for n in c.read("nodes", {}) if n["id"] == node_id), None)


def tokens(svc: Service) -> list[dict]:
    with svc.leader() as c:
        return c.read("tokens", {})


# --- tests --------------------------------------------------------------------------------------------------

def test_scripts_artifacts_checksums_and_health(service, tmp_path):
    for path, marker in (("/boot.ipxe", "chain http://127.0.0.1:"), ("/menu.ipxe", "choose --default cortex"),
                         ("/custom.ipxe", "Cortex ephemeral node")):
        status, headers, body = service.get(path)
        assert status == 200 and body.startswith(b"#!ipxe\n") and marker.encode() in body
        assert headers["Content-Type"].startswith("text/plain")
    status, _, body = service.get("/healthz")
    assert status == 200 and json.loads(body)["ok"] is True
    status, headers, body = service.get("/artifacts/cortex-netboot.cpio.zst")
    expected = hashlib.sha256((service.artifacts / "cortex-netboot.cpio.zst").read_bytes()).hexdigest()
    assert status == 200 and headers["X-Checksum-SHA256"] == expected == hashlib.sha256(body).hexdigest()
    assert int(headers["Content-Length"]) == len(body) and headers["ETag"] == f'"{expected}"'
    assert service.get("/artifacts/../../etc/passwd")[0] == 404
    mirrored = fetch_all(service.url, tmp_path / "mirror")
    assert sorted(p.name for p in mirrored) == ["cortex-netboot.cpio.zst", "cortex-netboot.vmlinuz"]
    assert (tmp_path / "mirror" / "cortex-netboot.cpio.zst").read_bytes() == body


def test_each_boot_gets_a_single_use_worker_token_and_is_enrolled(service):
    before = {t["id"] for t in tokens(service)}
    script, node_id, token = service.boot("52:54:00:00:00:21")
    assert node_id == "pxe-525400000021"
    new = [t for t in tokens(service) if t["id"] not in before]
    assert len(new) == 1 and new[0]["role"] == "worker" and new[0]["uses_left"] == 1
    assert 100 < new[0]["expires_at"] - time.time() <= 120
    (enrolled,) = enrollments(service, node_id)
    assert (enrolled["state"], enrolled["token_id"], enrolled["group"], enrolled["served_by"]) == \
        ("issued", new[0]["id"], "everyone", "w1")

    assert join(service.cluster, node_id, token).admitted
    wait_until(lambda: enrollments(service, node_id)[0]["state"] == "joined", 15, "the leader to mark it joined")
    # The same token again (a replayed script, a copied command line): refused, nothing enrolled.
    with pytest.raises(grpc.RpcError) as info:
        join(service.cluster, "pxe-replayed", token)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "used up" in info.value.details()
    assert member(service, "pxe-replayed") is None and enrollments(service, "pxe-replayed") == []
    # Scoped: a boot's token never admits a server.
    _, other_id, other_token = service.boot("52:54:00:00:00:22")
    with pytest.raises(grpc.RpcError) as info:
        join(service.cluster, other_id, other_token, role="server")
    assert "workers only" in info.value.details()
    # A second boot of the same machine supersedes the unused first script.
    _, again_id, _ = service.boot("52:54:00:00:00:22")
    assert [e["state"] for e in enrollments(service, again_id)] == ["issued", "superseded"]


def test_expired_token_is_refused_and_nothing_is_enrolled(service, capsys):
    _, node_id, token = service.boot("52:54:00:00:00:0e")
    assert node_id == "expiring-52540000000e"
    time.sleep(1.5)
    with pytest.raises(grpc.RpcError) as info:
        join(service.cluster, node_id, token)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "expired" in info.value.details()
    assert member(service, node_id) is None
    assert [e["state"] for e in enrollments(service, node_id)] == ["issued"]
    # `cortex netboot machines` shows it as expired (it never joined, its token can no longer be used).
    assert cli.main(["--addr", service.cluster.node("n1").grpc_address, "netboot", "machines", "--json"]) == 0
    rows = {r["machine"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["52:54:00:00:00:0e"]["display_state"] == "expired"
    assert cli.main(["--addr", service.cluster.node("n1").grpc_address, "netboot", "machines"]) == 0
    assert re.search(r"52:54:00:00:00:0e\s+expiring-52540000000e\s+short-lived\s+short\s+expired",
                     capsys.readouterr().out)


def test_unknown_machine_and_hostile_hostname_are_refused(service, shared_cluster, tmp_path):
    strict = start_service(shared_cluster, tmp_path, NO_DEFAULT, via="n3")
    try:
        before = len(tokens(service))
        status, _, body = strict.get("/ipxe?mac=52-54-00-00-00-99&uuid=&serial=&hostname=")
        assert status == 404 and b"no default group" in body
        # a hostile DHCP host name for a group that names nodes after it
        status, _, body = service.get("/ipxe?mac=52-54-00-00-00-0f&uuid=&serial=&hostname=x%3B%20reboot%20%24%7Bip%7D")
        assert status == 403 and b"needs hostname" in body
        status, _, body = service.get("/ipxe?mac=52-54-00-00-00-0f&uuid=&serial=&hostname=" + "a" * 63)
        assert status == 403 and b"not a valid node id" in body
        status, _, _ = service.get("/ipxe?uuid=&serial=")
        assert status == 400
        assert len(tokens(service)) == before  # no token minted for any refusal
        with service.leader() as c:
            machines = {m["machine"] for m in c.read("netboot.machines", {})}
        assert "52:54:00:00:00:99" not in machines and "52:54:00:00:00:0f" not in machines
        # an odd but valid host name is fine
        _, node_id, _ = service.boot("52:54:00:00:00:0f", hostname="Lab-Box-7")
        assert node_id == "h-lab-box-7"
    finally:
        strict.http.stop()


def test_offline_ephemeral_node_is_garbage_collected(service):
    _, node_id, token = service.boot("52:54:00:00:00:31")
    assert join(service.cluster, node_id, token).admitted  # then silent: no heartbeats, like a lost machine
    wait_until(lambda: enrollments(service, node_id)[0]["state"] == "joined", 15, "joined")
    # offline after liveness.offline_after (10 s), then removed gc_offline_after (2 s) later
    wait_until(lambda: member(service, node_id) is None, 40, "the leader to remove the offline node")
    assert enrollments(service, node_id)[0]["state"] == "collected"


def test_ephemeral_worker_reports_powers_off_when_idle_and_leaves(service, tmp_path):
    _, node_id, token = service.boot("52:54:00:00:00:41")
    (tmp_path / "token").write_text(token + "\n")
    port = free_base_port(1)
    node = devcluster.DevNode(node_id, "worker", f"127.0.0.1:{port}", "", str(tmp_path / node_id))
    Path(node.dir).mkdir()
    node.config_path.write_text(devcluster.node_config(node, service.cluster.node("n1").grpc_address,
                                                       str(tmp_path / "token")))
    register_credentials([node.grpc_address], None, Path(node.dir) / "data" / "tls")  # its certificate, once joined
    devcluster.start_node(node)
    try:
        powered_off = threading.Event()
        stop = threading.Event()
        result: list[int] = []
        runner = threading.Thread(target=lambda: result.append(ephemeral.run(
            node.grpc_address, poll=0.2, stop=stop.is_set, power_off=powered_off.set)), daemon=True)
        runner.start()
        assert powered_off.wait(40), f"no idle power-off; agent log: {devcluster.tail(node.log_path)}"
        runner.join(5)
        assert result == [0]
        (row,) = enrollments(service, node_id)
        assert row["state"] == "reported" and len(row["boot_id"]) == 32
        # what cortex-ephemeral.service's ExecStop does at shutdown
        assert ephemeral.leave(str(node.admin_socket)) == 0
        assert member(service, node_id) is None
        wait_until(lambda: enrollments(service, node_id)[0]["state"] == "left", 15, "the leader to mark it left")
    finally:
        stop.set()
        devcluster.stop_node(node)


def test_dnsmasq_command_writes_config_and_tftp_dir(tmp_path, capsys):
    if not Path("/usr/lib/ipxe/undionly.kpxe").exists():
        pytest.skip("Debian's ipxe package is not installed (./bootstrap.sh installs it)")
    conf, tftp = tmp_path / "dnsmasq.conf", tmp_path / "tftp"
    assert cli.main(["netboot", "dnsmasq", "--lab", "--network", "10.77.0.0/24", "--interface", "br0",
                     "--base-url", "http://10.77.0.1:8080", "--tftp-root", str(tftp), "--host",
                     "52:54:00:00:00:01,10.77.0.11,pxe1", "--write", str(conf)]) == 0
    assert "dhcp-host=52:54:00:00:00:01,10.77.0.11,pxe1" in conf.read_text()
    assert sorted(p.name for p in tftp.iterdir()) == ["ipxe.efi", "undionly.kpxe"]
    assert (tftp / "undionly.kpxe").resolve() == Path("/usr/lib/ipxe/undionly.kpxe")
    capsys.readouterr()
    assert cli.main(["netboot", "dnsmasq", "--proxy", "--network", "192.168.1.0/24",
                     "--base-url", "http://192.168.1.5:8080"]) == 0
    assert "dhcp-range=192.168.1.0,proxy,255.255.255.0" in capsys.readouterr().out
    assert cli.main(["netboot", "dnsmasq", "--proxy", "--network", "192.168.1.0/24", "--interface", "eth0;x",
                     "--base-url", "http://192.168.1.5:8080"]) == 2


def test_cortex_netboot_serve_command(service, shared_cluster, tmp_path):
    """The standalone service as a process: `cortex netboot serve` next to a node, SIGTERM stops it."""
    import signal
    import subprocess
    import sys

    port = free_base_port(1)
    (tmp_path / "p.yaml").write_text(PROFILES)
    proc = procs.popen([sys.executable, "-m", "cortex", "--addr", shared_cluster.node("w2").grpc_address,
                        "netboot", "serve", "--listen", f"127.0.0.1:{port}", "--join-address",
                        shared_cluster.node("n1").grpc_address, "--artifacts", str(service.artifacts),
                        "--profiles", str(tmp_path / "p.yaml")],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        standalone = Service(url, shared_cluster, None, service.artifacts)
        try:
            wait_until(lambda: _listening(port) and standalone.get("/healthz")[0] == 200, 30, "cortex netboot serve")
        except AssertionError:
            proc.kill()
            raise AssertionError(f"cortex netboot serve did not come up: {proc.communicate(timeout=5)[0]}") from None
        script, node_id, _ = standalone.boot("52:54:00:00:00:51")
        assert node_id == "pxe-525400000051" and f"kernel {url}/artifacts/cortex-netboot.vmlinuz" in script
        assert enrollments(service, node_id)[0]["served_by"] == "w2"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    assert f"serving on 127.0.0.1:{port}" in out
    # loopback join addresses are refused: machines could never reach them
    bad = subprocess.run([sys.executable, "-m", "cortex", "--addr", "127.0.0.1:1", "netboot", "serve"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--join-address" in bad.stderr


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_credentials_archive_is_served_once(service):
    script, node_id, token = service.boot("52:54:00:00:00:21")
    assert token.startswith("cx") and token not in script
    url, = re.findall(r"^initrd (\S+/credentials/\S+) \|\| goto failed$", script, re.M)
    status, _, body = service.get(url[len(service.url):])
    assert status == 404 and b"served once" in body  # token_from took it already: a copy is worth nothing
    status, _, _ = service.get("/credentials/" + "0" * 32 + "/credentials.cpio")
    assert status == 404

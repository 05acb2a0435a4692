"""The agent as a process: config errors, explicit cluster formation, readiness, signals, join and leave."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex._proto.cortex.v1 import cortex_pb2_grpc as pb_grpc
from cortex.client import AdminClient, Client, CortexError, channel_options
from cortex.core import domain
from cortex.dev import cluster as devcluster
from cortex.membership import enroll, identity
from cortex.security import authz, tls
from tests.support import procs as test_procs
from tests.support.agent import cortex, start_agent, wait_status, write_config
from tests.support.cluster import free_base_port
from tests.support.wait import wait_until

ROOT = Path(__file__).resolve().parents[2]


def test_malformed_config_exits_nonzero_naming_file_line_and_key(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("node:\n  id: n1\nraft:\n  heartbeat_interval: soon\n")
    proc = cortex("agent", "--config", str(bad), check=False)
    assert proc.returncode == 2
    assert f"{bad}:4: raft.heartbeat_interval: must be a float" in proc.stderr
    check = cortex("config", "check", str(bad), check=False)
    assert check.returncode == 2 and "raft.heartbeat_interval" in check.stderr


def test_agent_without_bootstrap_waits_and_never_elects_itself(tmp_path: Path, procs):
    port = free_base_port()
    config = write_config(tmp_path / "a", "solo", port)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = tmp_path / "notify.sock"
    notify.bind(str(notify_path))
    notify.settimeout(20)
    procs.append(start_agent(config, env={"NOTIFY_SOCKET": str(notify_path)}))
    message = notify.recv(4096).decode()
    assert "READY=1" in message and "waiting for init or join" in message
    address = f"127.0.0.1:{port}"
    time.sleep(2.0)  # longer than an election timeout: a member would have elected itself by now
    status = wait_status(address, lambda s: True)
    assert status.state == "uninitialized" and "cortex init" in status.waiting_for
    assert devcluster.port_free(port + 1), "no Raft port may be open before init/join"
    with Client(address) as c, pytest.raises(CortexError) as info:
        c.put("k", "v")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "not in a cluster" in info.value.details

    # the appliance's boot check waits through "not in a cluster" and the switch to mutual TLS on one channel
    data_dir = config.parent / "data"
    ready = test_procs.popen([sys.executable, "-m", "cortex.appliance.ready", "--addr", address, "--interval", "0.2",
                              "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "CORTEX_TLS_DIR": str(data_dir / tls.TLS_DIR)})
    procs.append(ready)

    socket_path = config.parent / "data" / "admin.sock"
    assert "positive duration" in cortex("init", "--socket", str(socket_path), "--token-ttl", "0", check=False).stderr
    before = time.time()
    out = cortex("init", "--socket", str(socket_path), "--token-ttl", "2m", "--json")
    created = json.loads(out.stdout)
    assert created["cluster_id"].startswith("c-") and created["join_token"].startswith("cx1.")
    assert before + 120 <= created["expires_at"] <= time.time() + 120  # the init token expires, as `--token-ttl` says
    status = wait_status(address, lambda s: s.state == "leader", data_dir=data_dir)
    assert status.cluster_id == created["cluster_id"]
    said, _ = ready.communicate(timeout=60)
    assert ready.returncode == 0, said
    assert "cortex-ready: waiting: state uninitialized: cortex init (new cluster) or cortex join" in said
    assert "cortex-ready: CORTEX-READY state leader, leader solo, quorum" in said
    again = cortex("init", "--socket", str(socket_path), check=False)
    assert again.returncode == 1 and "already belongs to cluster" in again.stderr
    on_node = {"CORTEX_TLS_DIR": str(data_dir / tls.TLS_DIR)}  # what the CLI on that node finds by itself
    cortex("--addr", address, "kv", "put", "k", "v", env=on_node)
    assert cortex("--addr", address, "kv", "get", "k", env=on_node).stdout.strip() == "v"
    listed = json.loads(cortex("--addr", address, "token", "list", "--json", env=on_node).stdout)
    assert [t["expires_at"] for t in listed] == [created["expires_at"]]  # listed with its expiry, never its secret
    assert created["join_token"] not in json.dumps(listed)
    refused = cortex("--addr", address, "kv", "get", "k", check=False, env={"CORTEX_TLS_DIR": str(tmp_path)})
    assert refused.returncode != 0 and "no client certificate found" in refused.stderr

    # SIGTERM is a clean shutdown
    procs[0].terminate()
    assert procs[0].wait(20) == 0
    assert "STOPPING=1" in notify.recv(4096).decode()

    # the data directory belongs to node "solo": the same data under another node.id refuses to start
    write_config(tmp_path / "a", "renamed", port)
    proc = cortex("agent", "--config", str(config), check=False)
    assert proc.returncode == 2
    assert "joined as 'solo'" in proc.stderr and "cortex leave" in proc.stderr


def test_join_with_bad_token_is_refused_and_changes_nothing(make_cluster, tmp_path: Path, procs):
    cluster = make_cluster(1)
    port = free_base_port()
    config = write_config(tmp_path / "newcomer", "w9", port, role="worker")
    procs.append(start_agent(config))
    address = f"127.0.0.1:{port}"
    wait_status(address, lambda s: s.state == "uninitialized")
    membership = {"tables": ["nodes", "join_tokens", "join_requests", "kv"]}  # plugins write their own tables
    with cluster.client("n1") as c:
        before = c.read("digest", membership, level="linearizable")["digest"]
    admin = AdminClient(str(config.parent / "data" / "admin.sock"))
    pin = tls.ca_pin((Path(cluster.node("n1").dir) / "data" / "tls" / "ca.crt").read_bytes())
    for token in (f"cx1.not-a-real-token.{pin}", f"cx1.{'x' * 5000}.{pin}"):  # (no token: approval, see below)
        with pytest.raises(CortexError) as info:
            admin.join(cluster.node("n1").grpc_address, token)
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "not recognised" in info.value.details
    assert wait_status(address, lambda s: True).state == "uninitialized"
    with cluster.client("n1") as c:
        assert c.read("digest", membership, level="linearizable")["digest"] == before

    # a server of an older Cortex (no state-machine level in its request) could not apply this cluster's log
    token = (Path(cluster.node("n1").dir) / "data" / "join-token").read_text().strip()
    with cluster.client("n1") as c:
        assert c.status().state_machine_level == domain.level() >= 1
    old = pb.JoinRequest(node_id="s9", role="server", grpc_address="127.0.0.1:9", raft_address="127.0.0.1:10",
                         token=token)
    with pytest.raises(enroll.EnrollError) as refused:
        enroll.call_join(cluster.node("n1").grpc_address, old, pin, channel_options(), timeout=20)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "s9 runs state-machine level 0" in str(refused.value) and "Install the cluster's" in str(refused.value)
    with cluster.client("n1") as c:
        assert c.read("digest", membership, level="linearizable")["digest"] == before

    joined = cortex("join", cluster.node("n1").grpc_address, "--token", token,
                    "--socket", str(config.parent / "data" / "admin.sock"), "--json")
    assert json.loads(joined.stdout)["cluster_id"]
    wait_status(cluster.node("n1").grpc_address,
                lambda s: any(n.id == "w9" and n.liveness == "alive" for n in s.nodes))

    left = cortex("leave", "--socket", str(config.parent / "data" / "admin.sock"))
    assert "left the cluster" in left.stdout
    status = wait_status(cluster.node("n1").grpc_address, lambda s: all(n.id != "w9" for n in s.nodes))
    assert [n.id for n in status.nodes] == ["n1"]
    assert wait_status(address, lambda s: True).state == "uninitialized"


def test_a_server_that_left_stops_cleanly(make_cluster, tmp_path: Path, procs):
    """Leaving destroys the node's Raft; the background thread (woken every 10 ms by a short systemd watchdog
    here) must not take the ended tick thread for a crash: a server that left and was then stopped exited 3,
    and its systemd unit stayed loaded as failed after an uninstall."""
    cluster = make_cluster(1)
    port = free_base_port()
    config = write_config(tmp_path / "s9", "s9", port, role="server")
    agent = start_agent(config, env={"WATCHDOG_USEC": "20000"})
    procs.append(agent)
    wait_status(f"127.0.0.1:{port}", lambda s: s.state == "uninitialized")
    addr = cluster.node("n1").grpc_address
    token = json.loads(cortex("--addr", addr, "--json", "token", "create", "--role", "server").stdout)["token"]
    sock = str(config.parent / "data" / "admin.sock")
    cortex("join", addr, "--token", token, "--socket", sock)
    wait_status(addr, lambda s: any(n.id == "s9" and n.liveness == "alive" for n in s.nodes))
    assert "left the cluster" in cortex("leave", "--socket", sock).stdout
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(30) == 0, (config.parent / "agent.log").read_text()[-3000:]
    assert "tick thread died" not in (config.parent / "agent.log").read_text()


def test_cli_status_tables_and_json(shared_cluster):
    address = shared_cluster.node("n2").grpc_address
    human = cortex("--addr", address, "status").stdout
    assert "LIVENESS" in human and "n1" in human and "w2" in human
    doc = json.loads(cortex("status", "--addr", address, "--json").stdout)
    assert doc["cluster_id"] and {n["id"] for n in doc["nodes"]} == {"n1", "n2", "n3", "w1", "w2"}
    nodes = json.loads(cortex("nodes", "--addr", address, "--json").stdout)
    assert len(nodes) == 5
    down = cortex("--addr", "127.0.0.1:1", "status", check=False)
    assert down.returncode == 1 and "hint:" in down.stderr


def test_grpc_stubs_are_fresh():
    from cortex.dev import protogen

    assert protogen.check(ROOT / "proto", ROOT / "src" / "cortex" / "_proto") == []


def test_dev_cluster_resumes_after_down_and_purge_removes_it(tmp_path: Path):
    directory = tmp_path / "dev"
    base = free_base_port()
    devcluster.up(directory, 1, 1, base, timeout=60)
    try:
        with Client(f"127.0.0.1:{base}") as c:
            c.put("survives", "restart")
        assert sorted(devcluster.down(directory)) == ["n1", "w1"]
        cluster = devcluster.up(directory, 1, 1, base, timeout=60)  # same data, same cluster
        with Client(cluster.nodes[0].grpc_address) as c:
            assert c.get("survives") == "restart"
        with pytest.raises(RuntimeError, match="another shape"):
            devcluster.down(directory)
            devcluster.up(directory, 3, 0, base, timeout=60)
    finally:
        devcluster.down(directory, purge=True)
    assert not directory.exists()


def _join_worker(tmp_path: Path, node_id: str, cluster, token: str) -> subprocess.CompletedProcess:
    """Start an agent for `node_id` that is in no cluster, then ask it to join with `token`."""
    port = free_base_port()
    config = write_config(tmp_path / node_id, node_id, port, role="worker")
    proc = start_agent(config)
    _join_worker.procs.append(proc)
    wait_status(f"127.0.0.1:{port}", lambda s: s.state == "uninitialized")
    return cortex("join", cluster.node("n1").grpc_address, "--token", token,
                  "--socket", str(config.parent / "data" / "admin.sock"), check=False)


_join_worker.procs = []


def test_join_tokens_are_scoped_expiring_single_use_and_revocable(make_cluster, tmp_path: Path):
    cluster = make_cluster(1)
    addr = cluster.node("n1").grpc_address
    try:
        once = json.loads(cortex("--addr", addr, "token", "create", "--role", "worker", "--ttl", "1h",
                                 "--uses", "1", "--json").stdout)
        assert once["token"].startswith("cx1.") and len(once["id"]) == 12
        assert _join_worker(tmp_path, "w1", cluster, once["token"]).returncode == 0
        reused = _join_worker(tmp_path, "w2", cluster, once["token"])
        assert reused.returncode != 0 and "used up" in reused.stderr

        short = json.loads(cortex("--addr", addr, "token", "create", "--ttl", "1s", "--json").stdout)
        time.sleep(1.5)
        expired = _join_worker(tmp_path, "w3", cluster, short["token"])
        assert expired.returncode != 0 and "expired" in expired.stderr

        revoked = json.loads(cortex("--addr", addr, "token", "create", "--json").stdout)
        assert "revoked token" in cortex("--addr", addr, "token", "revoke", revoked["id"]).stdout
        refused = _join_worker(tmp_path, "w4", cluster, revoked["token"])
        assert refused.returncode != 0 and "revoked" in refused.stderr

        listing = json.loads(cortex("--addr", addr, "token", "list", "--json").stdout)
        by_id = {t["id"]: t for t in listing}
        assert by_id[once["id"]]["uses_left"] == 0 and by_id[revoked["id"]]["revoked"] is True
        assert all("token" not in t for t in listing)  # secrets never come back
        unknown = cortex("--addr", addr, "token", "revoke", "0123456789ab", check=False)
        assert unknown.returncode == 1 and "no active token" in unknown.stderr
        nodes = {n.id for n in Client(addr).status().nodes}
        assert nodes == {"n1", "w1"}
    finally:
        for p in _join_worker.procs:
            p.kill()
            p.wait(10)


def test_wait_reason_from_the_config_shows_in_status(tmp_path: Path, procs):
    port = free_base_port()
    config = write_config(tmp_path / "a", "appliance", port,
                          extra="bootstrap:\n  wait_reason: 'credentials: cortex.join_token: missing'\n")
    procs.append(start_agent(config))
    status = wait_status(f"127.0.0.1:{port}", lambda s: s.state == "uninitialized")
    assert status.waiting_for == "credentials: cortex.join_token: missing"
    human = cortex("--addr", f"127.0.0.1:{port}", "status").stdout
    assert "credentials: cortex.join_token: missing" in human


def test_join_without_token_waits_for_approval_and_reject_keeps_a_node_out(make_cluster, tmp_path: Path, procs):
    cluster = make_cluster(3)
    addr = cluster.node(cluster.followers()[0]).grpc_address  # any member: the request is forwarded

    def agent_for(node_id: str, role: str = "worker") -> tuple[str, Path]:
        port = free_base_port()
        config = write_config(tmp_path / node_id, node_id, port, role=role)
        procs.append(start_agent(config))
        wait_status(f"127.0.0.1:{port}", lambda s: s.state == "uninitialized")
        return f"127.0.0.1:{port}", config.parent / "data" / "admin.sock"

    w1, w1_socket = agent_for("w1")
    asked = json.loads(cortex("join", addr, "--socket", str(w1_socket), "--json").stdout)
    ca_pin = tls.ca_pin((Path(cluster.node("n1").dir) / "data" / "tls" / "ca.crt").read_bytes())
    assert asked == {"cluster_id": "", "admission": "pending", "ca_pin": ca_pin}  # for the operator to compare
    status = wait_status(w1, lambda s: "cortex nodes approve w1" in s.waiting_for)
    assert status.state == "uninitialized"  # pending: not a member, no cluster of its own
    with Client(w1) as c, pytest.raises(CortexError) as info:
        c.put("k", "v")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    pending = json.loads(cortex("--addr", addr, "nodes", "pending", "--json").stdout)
    assert [(r["node_id"], r["role"], r["state"]) for r in pending] == [("w1", "worker", "pending")]
    assert all("secret" not in key for r in pending for key in r)

    # someone replaying w1's request without its secret gets nothing
    forged = pb.JoinRequest(node_id="w1", role="worker", grpc_address="127.0.0.1:1", request_secret="x" * 32)
    with authz.enroll_channel(addr, []) as channel, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.ClusterStub(channel).Join(forged, timeout=10)
    assert "another join request for node 'w1' is pending" in refused.value.details()

    assert "approved w1" in cortex("--addr", addr, "nodes", "approve", "w1").stdout
    cluster_id = Client(addr).status().cluster_id
    wait_status(w1, lambda s: s.state == "worker" and s.cluster_id == cluster_id, data_dir=w1_socket.parent)
    members = wait_status(addr, lambda s: any(n.id == "w1" and n.liveness == "alive" for n in s.nodes))
    assert {n.id for n in members.nodes} == {"n1", "n2", "n3", "w1"}
    assert json.loads(cortex("--addr", addr, "nodes", "pending", "--json").stdout) == []
    again = json.loads(cortex("--addr", addr, "nodes", "approve", "w1", "--json").stdout)
    assert again["state"] == "member"  # approving twice is harmless

    w2, w2_socket = agent_for("w2")
    cortex("join", addr, "--socket", str(w2_socket))
    wait_status(w2, lambda s: "cortex nodes approve w2" in s.waiting_for)
    assert "rejected w2" in cortex("--addr", addr, "nodes", "reject", "w2").stdout
    status = wait_status(w2, lambda s: "rejected" in s.waiting_for)
    assert status.state == "uninitialized"
    assert "w2" not in {n.id for n in Client(addr).status().nodes}
    late = cortex("--addr", addr, "nodes", "approve", "w2", check=False)
    assert late.returncode != 0 and "already rejected" in late.stderr
    unknown = cortex("--addr", addr, "nodes", "approve", "nobody", check=False)
    assert unknown.returncode != 0 and "no join request from node 'nobody'" in unknown.stderr


def _join_in_background(cluster, config: Path, via: str = "n1") -> subprocess.Popen:
    """`cortex join` of the agent at `config` to `via` with a server token; the command returns once registered."""
    token = json.loads(cortex("--addr", cluster.node("n1").grpc_address, "--json", "token", "create", "--role",
                              "server").stdout)["token"]
    return test_procs.popen([sys.executable, "-m", "cortex", "join", cluster.node(via).grpc_address, "--token", token,
                        "--socket", str(config.parent / "data" / "admin.sock")],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _freeze_between_join_steps(cluster, data_dir: Path, node: str = "n1") -> None:
    """SIGSTOP `node` once the joiner holds its certificate (step one) but the cluster has not registered it (step
    two: the joiner's Raft must run and the configuration change commit, which takes longer than this poll)."""
    wait_until(lambda: (joined := identity.load(data_dir)) is not None and joined.pending_token, 30,
               "the joiner to finish step one of its join", interval=0.005)
    os.kill(cluster.node(node).pid, signal.SIGSTOP)
    assert identity.load(data_dir).pending_token, f"the join finished before {node} was frozen: nothing to test"


def test_a_server_whose_join_stalls_keeps_feeding_the_systemd_watchdog(make_cluster, tmp_path: Path, procs):
    """CI: an appliance node's join waited on a slow cluster longer than WatchdogSec=30 and systemd aborted the
    agent, because the watchdog was fed by the background loop and that loop waited for the joining thread.
    Here the leader freezes between the two steps of a join for 3x the watchdog's deadline."""
    cluster = make_cluster(1)
    port = free_base_port()
    config = write_config(tmp_path / "s9", "s9", port, role="server")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(0.2)
    deadline_s = 3.0
    procs.append(start_agent(config, env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                                          "WATCHDOG_USEC": str(int(deadline_s * 1e6))}))
    wait_status(f"127.0.0.1:{port}", lambda s: s.state == "uninitialized")
    join = _join_in_background(cluster, config)
    _freeze_between_join_steps(cluster, config.parent / "data")
    frozen_at, fed = time.monotonic(), []
    try:
        while time.monotonic() - frozen_at < 3 * deadline_s:
            try:
                if "WATCHDOG=1" in notify.recv(4096).decode():
                    fed.append(time.monotonic())
            except TimeoutError:
                pass
    finally:
        os.kill(cluster.node("n1").pid, signal.SIGCONT)
    thawed_at = time.monotonic()
    gaps = [b - a for a, b in zip([frozen_at, *fed], [*fed, thawed_at])]
    assert max(gaps) < deadline_s, f"watchdog fed at {[round(t - frozen_at, 1) for t in fed]} s: systemd " \
                                   f"would have aborted the agent"
    assert join.wait(60) == 0, join.stderr.read()
    assert procs[0].poll() is None
    wait_status(cluster.node("n1").grpc_address,
                lambda s: any(n.id == "s9" and n.liveness == "alive" for n in s.nodes))


def test_a_server_killed_between_the_steps_of_its_join_finishes_it_after_a_restart(make_cluster, tmp_path: Path,
                                                                                      procs):
    """Power lost after step one of a join (certificate and Raft secret on disk, not yet registered): the
    restarted agent asks again until the cluster registers it, then follows the leader with its data."""
    cluster = make_cluster(1)
    with cluster.client("n1") as c:
        c.put("before-join", "1")
    port = free_base_port()
    config = write_config(tmp_path / "s9", "s9", port, role="server")
    procs.append(start_agent(config))
    address = f"127.0.0.1:{port}"
    wait_status(address, lambda s: s.state == "uninitialized")
    join = _join_in_background(cluster, config)
    try:
        _freeze_between_join_steps(cluster, config.parent / "data")
        procs[0].kill()
        procs[0].wait(10)
    finally:
        os.kill(cluster.node("n1").pid, signal.SIGCONT)
    join.wait(60)  # the agent it asked died under it: an error, whatever it says
    procs.append(start_agent(config))
    data_dir = config.parent / "data"
    status = wait_status(address, lambda s: s.state == "follower" and s.leader_id == "n1", timeout=30,
                         data_dir=data_dir)
    assert status.has_quorum
    wait_status(cluster.node("n1").grpc_address,
                lambda s: any(n.id == "s9" and n.liveness == "alive" for n in s.nodes))
    # the cluster answers the second step before the joiner writes its record down: wait for the write
    wait_until(lambda: not identity.load(data_dir).pending_token, 15, "s9 records that its join finished")
    files = tls.client_files(data_dir / tls.TLS_DIR)
    with Client(address, tls_files=files) as c:
        assert c.get("before-join", level="stale") == "1"


def test_a_server_elected_leader_before_it_was_registered_registers_itself(make_cluster, tmp_path: Path, procs):
    """A joining server votes and can be elected from step one on. Elected before the cluster registered it,
    no one could register it: joins are forwarded to the leader, and no node record names the leader (VM
    cluster, CI: every join refused with "no leader" for minutes). Here s9 joins through the follower, the
    follower s8 freezes before step two, and n1 hands over to s9 (the only follower keeping up)."""
    cluster = make_cluster(1)
    s8_port = free_base_port()
    s8_config = write_config(tmp_path / "s8", "s8", s8_port, role="server")
    procs.append(start_agent(s8_config))
    wait_status(f"127.0.0.1:{s8_port}", lambda s: s.state == "uninitialized")
    assert _join_in_background(cluster, s8_config).wait(60) == 0
    cluster.dc.nodes.append(devcluster.DevNode(id="s8", role="server", dir=str(tmp_path / "s8"),
                                               grpc_address=f"127.0.0.1:{s8_port}",
                                               raft_address=f"127.0.0.1:{s8_port + 1}", pid=procs[-1].pid))
    leader, follower = "n1", "s8"
    port = free_base_port()
    config = write_config(tmp_path / "s9", "s9", port, role="server")
    procs.append(start_agent(config))
    address, data_dir = f"127.0.0.1:{port}", config.parent / "data"
    wait_status(address, lambda s: s.state == "uninitialized")
    join = _join_in_background(cluster, config, via=follower)
    _freeze_between_join_steps(cluster, data_dir, node=follower)
    try:
        wait_status(address, lambda s: s.commit_index > 0, data_dir=data_dir)  # s9's Raft runs, in the config
        with cluster.client(leader) as c:
            c.put("after-freeze", "1")  # s9 is now further along than the frozen follower
            c.transfer_leadership()
        wait_status(address, lambda s: s.state == "leader", timeout=30, data_dir=data_dir)
        status = wait_status(address, lambda s: s.leader_id == "s9", timeout=40, data_dir=data_dir)
        assert "s9" in {n.id for n in status.nodes}
        assert not identity.load(data_dir).pending_token
    finally:
        os.kill(cluster.node(follower).pid, signal.SIGCONT)
    assert join.wait(60) == 0, join.stderr.read()
    with cluster.client("n1") as c:
        c.put("after-thaw", "1")  # forwarded to s9, found by its record
    wait_status(cluster.node("n1").grpc_address,
                lambda s: s.leader_id == "s9" and any(n.id == "s9" and n.liveness == "alive" for n in s.nodes))


def test_background_rounds_run_fast_only_while_a_wake_is_unanswered():
    from cortex.node import wake

    assert wake.round_wait(1.0, None, 100.0) == 1.0  # no wake pending: one round a heartbeat
    assert wake.round_wait(1.0, 99.5, 100.0) == wake.RESUME_RETRY  # woke, no server answered yet
    assert wake.round_wait(1.0, 100.0 - wake.RESUME_RETRY_FOR - 1, 100.0) == 1.0  # gave up fast retries
    assert wake.round_wait(0.01, 99.5, 100.0) == 0.01  # a shorter regular interval stays shorter


def test_the_agent_keeps_systemds_notify_socket_from_its_children(tmp_path: Path):
    """notify.claim(): the agent still notifies and reads its watchdog interval, the processes it starts
    (podman, task shells) no longer inherit NOTIFY_SOCKET or the watchdog variables."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    listener.bind(str(path))
    listener.settimeout(20)
    script = (
        "import subprocess, sys\n"
        "from cortex.appliance import notify\n"
        "notify.claim()\n"
        "child = subprocess.run(['env'], capture_output=True, text=True, check=True).stdout\n"
        "assert 'NOTIFY_SOCKET' not in child and 'WATCHDOG_USEC' not in child, child\n"
        "assert notify.watchdog_interval() == 10.0\n"
        "assert notify.sd_notify('READY=1', 'STATUS=claimed')\n")
    env = {**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "20000000"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)
    assert listener.recv(4096).decode() == "READY=1\nSTATUS=claimed"


def test_the_clock_watch_reports_each_jump_between_the_clocks_once():
    """watch_clock with a scripted suspended-time clock: a jump over the threshold is one wake, drift is none."""
    import threading

    from cortex.appliance import sleepwatch

    readings = iter([5.0, 5.0, 5.3, 17.3, 17.3, 17.4, 40.0] + [40.0] * 1000)  # small drift, a sleep, another
    stop, wakes = threading.Event(), []

    def clock() -> float:
        value = next(readings)
        if value == 40.0 and len(wakes) == 2:
            stop.set()
        return value

    sleepwatch.watch_clock(wakes.append, stop, interval=0.001, clock=clock)
    assert wakes == pytest.approx([12.0, 22.6])  # each wake reports how long it slept
    assert 0.0 <= sleepwatch.suspended_seconds() < 1e9  # the real clocks read without error

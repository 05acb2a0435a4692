"""Membership over time: `left` records, rejoin under the same id, forgetting, promotion of a worker to a
voting server, and the events they publish. State-machine tests drive StateStore directly; the cluster
tests run real agent processes (tests/conftest.py)."""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path

import pytest

from cortex.core import cluster
from cortex.core.state import StateStore
from tests.support.agent import cortex
from tests.support.cluster import current_leader
from tests.support.envelopes import env
from tests.support.wait import wait_until

SERVER = {"node_id": "n1", "role": "server", "grpc_address": "127.0.0.1:1", "raft_address": "127.0.0.1:2"}
WORKER = {"node_id": "w1", "role": "worker", "grpc_address": "127.0.0.1:3", "raft_address": ""}


def _store(tmp_path: Path, events: list | None = None) -> StateStore:
    store = StateStore(tmp_path / "s.db", listener=(lambda t, d, i: events.append((t, d))) if events is not None
                       else None)
    store.apply(1, env("node.register", SERVER))
    store.apply(2, env("node.register", WORKER))
    return store


def test_a_node_that_leaves_is_kept_as_left_and_counts_for_nothing(tmp_path: Path):
    events: list = []
    store = _store(tmp_path, events)
    result = store.apply(3, env("member.leave", {"node_id": "w1", "reason": "left (cortex leave)"}, ts=2000.0))
    assert result == {"node_id": "w1", "left": True, "role": "worker", "previous": "alive"}
    assert events[-1] == ("node.left", {"node_id": "w1", "role": "worker", "reason": "left (cortex leave)"})
    # members only for every consumer of the core query, the scheduler's view and the cluster summary
    assert [n["id"] for n in store.query("nodes", {})] == ["n1"]
    assert [n["id"] for n in store.query("task.nodes", {})] == ["n1"]
    assert store.query("cluster", {})["nodes"] == 1
    record = store.query("member.list", {"left_only": True})
    assert [(n["id"], n["liveness"], n["left_at"], n["left_reason"]) for n in record] == [
        ("w1", "left", 2000.0, "left (cortex leave)")]
    # a liveness transition decided before it left changes nothing; a retried removal is no error
    assert store.apply(4, env("node.liveness", {"node_id": "w1", "state": "offline"}))["changed"] is False
    assert store.apply(5, env("member.leave", {"node_id": "w1", "reason": "again"}))["left"] is False
    assert store.query("member.list", {"left_only": True})[0]["left_reason"] == "left (cortex leave)"
    # approving a join of a node that left says there is no request, not "already a member"
    assert "no join request" in store.apply(6, env("node.approve", {"node_id": "w1"}))["error"]
    # a task may not be placed on it
    spec = {"kind": "noop", "placement": {"nodes": ["w1"]}}
    assert "unknown node(s) w1" in store.apply(7, env("task.submit", {"tasks": [spec]}))["error"]


def test_a_node_that_left_rejoins_under_the_same_id_and_is_alive_again(tmp_path: Path):
    events: list = []
    store = _store(tmp_path, events)
    store.apply(3, env("node.liveness", {"node_id": "w1", "state": "offline"}))
    store.apply(4, env("member.leave", {"node_id": "w1", "reason": "removed by admin@n1"}, ts=2000.0))
    again = store.apply(5, env("node.register", WORKER, ts=3000.0))  # same addresses: not "unchanged"
    assert again == {"node_id": "w1", "registered": True, "rejoined": True}
    assert events[-1] == ("node.joined", {"node_id": "w1", "role": "worker", "rejoined": True})
    w1 = next(n for n in store.query("member.list", {}) if n["id"] == "w1")
    assert (w1["liveness"], w1["joined_at"], w1["liveness_since"]) == ("alive", 3000.0, 3000.0)
    assert (w1["left_at"], w1["left_reason"]) == (2000.0, "removed by admin@n1")  # the last departure
    assert "w1" in [n["id"] for n in store.query("nodes", {})]
    # an ordinary re-register of a member keeps its liveness and join time
    store.apply(6, env("node.liveness", {"node_id": "w1", "state": "suspect"}))
    store.apply(7, env("node.register", {**WORKER, "grpc_address": "127.0.0.1:9"}, ts=4000.0))
    w1 = next(n for n in store.query("member.list", {}) if n["id"] == "w1")
    assert (w1["liveness"], w1["joined_at"], w1["grpc_address"]) == ("suspect", 3000.0, "127.0.0.1:9")


def test_forget_drops_only_records_of_nodes_that_left(tmp_path: Path):
    events: list = []
    store = _store(tmp_path, events)
    refused = store.apply(3, env("member.forget", {"node_id": "w1"}))
    assert "is a member" in refused["error"] and "cortex nodes remove w1" in refused["error"]
    store.apply(4, env("member.leave", {"node_id": "w1", "reason": "left"}))
    assert store.apply(5, env("member.forget", {"node_id": "w1"})) == {"node_id": "w1", "forgotten": True}
    assert events[-1] == ("node.forgotten", {"node_id": "w1"})
    assert [n["id"] for n in store.query("member.list", {})] == ["n1"]
    assert store.apply(6, env("member.forget", {"node_id": "w1"}))["forgotten"] is False


def test_set_role_records_a_promotion_once(tmp_path: Path):
    events: list = []
    store = _store(tmp_path, events)
    promote = {"node_id": "w1", "role": "server", "raft_address": "127.0.0.1:4"}
    assert store.apply(3, env("member.set_role", promote))["changed"] is True
    assert events[-1] == ("node.promoted", {"node_id": "w1", "role": "server", "previous": "worker"})
    assert store.apply(4, env("member.set_role", promote))["changed"] is False
    w1 = next(n for n in store.query("nodes", {}) if n["id"] == "w1")
    assert (w1["role"], w1["raft_address"]) == ("server", "127.0.0.1:4")
    store.apply(5, env("member.leave", {"node_id": "w1", "reason": "left"}))
    assert "not a member" in store.apply(6, env("member.set_role", promote))["error"]


def test_bad_membership_commands_are_refused_clearly():
    from cortex.core.commands import CommandError, is_internal, validate

    for command_type, args, message in (
        ("member.leave", {"node_id": "w1", "reason": "x" * 500}, "at most 200"),
        ("member.set_role", {"node_id": "w1", "role": "server"}, "needs its raft_address"),
        ("member.set_role", {"node_id": "w1", "role": "boss", "raft_address": "a:1"}, "server or worker"),
        ("member.forget", {"node_id": "w1", "extra": 1}, "unknown argument"),
    ):
        with pytest.raises(CommandError, match=message):
            validate(command_type, args)
    # removal and role changes are the leader's decisions (Raft membership goes with them)
    assert is_internal("member.leave") and is_internal("member.set_role") and not is_internal("member.forget")


def test_an_existing_store_gets_the_new_columns_by_migration(tmp_path: Path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    for number, script in enumerate(cluster.MIGRATIONS, start=1):  # a store from before the membership domain
        db.executescript(script)
        db.execute(f"PRAGMA user_version={number}")
    db.execute("INSERT INTO nodes (id, role, grpc_address, raft_address, joined_at, updated_at) "
               "VALUES ('w1', 'worker', '127.0.0.1:3', '', 1, 1)")
    db.close()
    store = StateStore(path)
    (w1,) = store.query("member.list", {})
    assert (w1["liveness"], w1["left_at"], w1["left_reason"]) == ("alive", None, "")
    versions = dict(store.reader().execute("SELECT domain, version FROM schema_versions").fetchall())
    assert versions["member"] == 1
    store.apply(1, env("member.leave", {"node_id": "w1", "reason": "left"}))
    assert store.query("nodes", {}) == []


# --- real processes ----------------------------------------------------------------------------------------

def _nodes_json(addr: str, *extra: str) -> dict[str, dict]:
    return {n["id"]: n for n in json.loads(cortex("--addr", addr, "nodes", "--json", *extra).stdout)}


def _events(addr: str, pattern: str) -> list[dict]:
    out = cortex("--addr", addr, "tools", "call", "recent_events", "--args",
                 json.dumps({"pattern": pattern}), "--json").stdout
    doc = json.loads(out)
    return doc["result"] if isinstance(doc, dict) and "result" in doc else doc


def test_leave_keeps_a_left_record_rejoin_revives_it_and_forget_drops_it(make_cluster):
    cluster = make_cluster(1, 1)
    addr = cluster.node("n1").grpc_address
    w1_socket = str(Path(cluster.node("w1").dir) / "data" / "admin.sock")
    assert "left the cluster" in cortex("leave", "--socket", w1_socket).stdout

    nodes = _nodes_json(addr)
    assert nodes["w1"]["liveness"] == "left" and nodes["w1"]["left_reason"] == "left (cortex leave)"
    assert "w1" not in _nodes_json(addr, "--members")
    with cluster.client("n1") as c:
        assert [n.id for n in c.status().nodes] == ["n1"]  # status, alerts, the updater: members only
    table = cortex("--addr", addr, "nodes").stdout
    assert "left (kept until forgotten" in table and "left (cortex leave)" in table
    assert any(e["type"] == "node.left" and e["data"]["node_id"] == "w1" for e in _events(addr, "node.*"))

    token = (Path(cluster.node("n1").dir) / "data" / "join-token").read_text().strip()
    cortex("join", addr, "--token", token, "--socket", w1_socket)
    wait_until(lambda: _nodes_json(addr).get("w1", {}).get("liveness") == "alive", 20, "w1 alive again")
    assert any(e["type"] == "node.joined" and e["data"].get("rejoined") for e in _events(addr, "node.joined"))

    removed = cortex("--addr", addr, "nodes", "remove", "w1", "--force").stdout
    assert "removed w1" in removed
    nodes = _nodes_json(addr)
    assert nodes["w1"]["liveness"] == "left" and nodes["w1"]["left_reason"].startswith("removed by admin@")
    refused = cortex("--addr", addr, "nodes", "forget", "n1", check=False)
    assert refused.returncode != 0 and "is a member" in refused.stderr
    assert "forgot w1" in cortex("--addr", addr, "nodes", "forget", "w1").stdout
    assert "w1" not in _nodes_json(addr)
    assert "already forgotten" in cortex("--addr", addr, "nodes", "forget", "w1").stdout


def test_a_promoted_worker_replaces_a_dead_server_and_keeps_quorum(make_cluster):
    from cortex.client import Client, CortexError
    from cortex.security import tls

    cluster = make_cluster(3, 2)
    cluster.kill("w2")  # goes offline meanwhile: a node that is down cannot be promoted
    leader = cluster.leader()
    addr = cluster.node(leader).grpc_address
    acknowledged = {}
    with cluster.client(leader) as c:
        for i in range(30):
            c.put(f"before-{i}", str(i))
            acknowledged[f"before-{i}"] = str(i)

    # refusals, each saying why: unknown node, not an admin, a port the node cannot listen on, node down
    unknown = cortex("--addr", addr, "nodes", "promote", "ghost", check=False)
    assert unknown.returncode != 0 and "no member named 'ghost'" in unknown.stderr
    w1_tls = tls.client_files(Path(cluster.node("w1").dir) / "data" / tls.TLS_DIR)
    with Client(addr, tls_files=w1_tls) as as_worker, pytest.raises(CortexError) as denied:
        as_worker.promote_node("w1")
    assert denied.value.code.name == "PERMISSION_DENIED" and "PromoteNode may be called by admin, server" in \
        denied.value.details
    taken = cortex("--addr", addr, "nodes", "promote", "w1", "--raft", cluster.node(leader).raft_address,
                   check=False)
    assert taken.returncode != 0 and "cannot listen on" in taken.stderr
    wait_until(lambda: _nodes_json(addr)["w2"]["liveness"] == "offline", 30, "w2 offline")
    down = cortex("--addr", addr, "nodes", "promote", "w2", check=False)
    assert down.returncode != 0 and "w2 is offline" in down.stderr

    # a server dies and is removed; a worker takes its place as a voter
    dead = cluster.followers()[0]
    cluster.kill(dead)
    wait_until(lambda: _nodes_json(addr)[dead]["liveness"] != "alive", 30, f"{dead} suspected")
    cortex("--addr", addr, "nodes", "remove", dead)
    raft = f"127.0.0.1:{int(cluster.node('w1').grpc_address.rsplit(':', 1)[1]) + 5}"
    promoted = json.loads(cortex("--addr", addr, "nodes", "promote", "w1", "--raft", raft, "--json").stdout)
    assert promoted == {"node_id": "w1", "role": "server", "raft_address": raft}
    again = cortex("--addr", addr, "nodes", "promote", "w1", check=False)  # repeated: no second change
    assert again.returncode != 0 and "w1 is already a server" in again.stderr
    nodes = _nodes_json(addr)
    assert (nodes["w1"]["role"], nodes["w1"]["raft_address"]) == ("server", raft)
    w1 = cluster.node("w1").grpc_address
    with Client(w1) as c:
        status = c.status()
        assert status.role == "server" and status.state in ("follower", "leader")
    promoted_events = [e for e in _events(addr, "node.promoted") if e["data"]["node_id"] == "w1"]
    assert len(promoted_events) == 1 and promoted_events[0]["data"]["previous"] == "worker"

    # the old leader dies too: the two voters left (one former server, the promoted worker) keep quorum
    cluster.kill(leader)
    survivor = next(n for n in ("n1", "n2", "n3") if n not in (dead, leader))
    new_leader = wait_until(lambda: current_leader(map(cluster.node, (survivor, "w1"))), 30, "a new leader")
    new_raft = raft if new_leader == "w1" else cluster.node(new_leader).raft_address
    wait_until(lambda: any(e["data"].get("leader") == new_raft for e in _events(w1, "leader.changed")), 15,
             "leader.changed on w1's event bus")
    with Client(cluster.node(new_leader).grpc_address if new_leader != "w1" else w1) as c:
        c.put("after", "ok")
        acknowledged["after"] = "ok"
        for key, value in acknowledged.items():
            assert c.get(key) == value, key
    with Client(w1) as c:  # the promoted node's own replica holds every acknowledged write
        wait_until(lambda: all(c.get(k, level="stale") == v for k, v in acknowledged.items()), 20, "w1 replica")

    # restarted, it is still a server (its membership record wins over its config file, which says worker)
    cluster.kill("w1", signal.SIGTERM)
    cluster.start("w1")
    wait_until(lambda: _role_of(w1) == "server", 30, "w1 back as a server")
    wait_until(lambda: current_leader(map(cluster.node, (survivor, "w1"))), 30, "a leader after w1's restart")
    with Client(w1) as c:
        assert c.get("after") == "ok"


def _role_of(address: str) -> str:
    from cortex.client import Client, CortexError

    try:
        with Client(address, timeout=1) as c:
            return c.status().role
    except CortexError:
        return ""


def test_the_leader_forgets_left_nodes_after_forget_left_after(tmp_path: Path):
    from cortex.dev import cluster as devcluster
    from tests.support.cluster import free_base_port

    directory = tmp_path / "prune"
    extra = lambda node: "liveness:\n  forget_left_after: 1\n" if node.role == "server" else ""  # noqa: E731
    try:
        dc = devcluster.up(directory, 1, 1, free_base_port(), timeout=60, extra_config=extra)
        addr = dc.node("n1").grpc_address
        cortex("leave", "--socket", str(Path(dc.node("w1").dir) / "data" / "admin.sock"))
        wait_until(lambda: "w1" not in _nodes_json(addr), 20, "w1's record forgotten")
        events = _events(addr, "node.*")
        kinds = [e["type"] for e in events if e["data"].get("node_id") == "w1"]
        assert kinds[-2:] == ["node.left", "node.forgotten"]
    finally:
        devcluster.down(directory)

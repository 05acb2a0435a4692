"""The updater plugin executing rolling updates on a real cluster of agent processes.

Nodes use `os: simulated` (node_os.SimulatedOS): the A/B slots and boot counting live in a file, and a
"reboot" ends the agent process; a supervisor thread here starts it again, as systemd would. Everything else
is real: releases published and Ed25519-signed by `updates.publish`, served over HTTP by a
`cortex update serve` process, fetched and verified by each node, rollout state replicated through Raft,
drain through the task engine, leadership transfer, the CLI over the admin socket.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from cortex.client import Client, CortexError
from cortex.dev import cluster as devcluster
from cortex.update import releases as updates
from cortex.update.node_os import BROKEN_MARK, SimulatedOS
from cortex.update.plugin import preflight_problems
from cortex.update.rollout import Slots
from tests.support import procs
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(600)


def payload(directory: Path, version: str, broken: bool = False) -> Path:
    """A build's update directory with the three payload files (tiny stand-ins for the real partitions)."""
    directory.mkdir(parents=True)
    part = uuid.UUID(int=int(version.replace(".", "")) + 1).hex  # as mkosi names split partitions
    (directory / f"cortex_{version}.usr-x86-64.{part}.raw.xz").write_bytes(b"usr " + version.encode() * 100)
    (directory / f"cortex_{version}.usr-x86-64-verity.{part}.raw.xz").write_bytes(b"verity " + version.encode())
    (directory / f"cortex_{version}.efi").write_bytes(b"UKI " + version.encode() + (BROKEN_MARK if broken else b""))
    return directory


class Supervisor:
    """Starts an agent process again when it exits (what systemd's Restart= and a reboot do on a machine)."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.restarts: list[tuple[float, str]] = []
        self.paused: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for node in self.cluster.nodes:
                if node.id not in self.paused and node.pid and not devcluster.alive(node.pid):
                    self.restarts.append((time.monotonic(), node.id))
                    self.cluster.start(node.id)  # saves the new pid, so devcluster.down stops this process

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    base = tmp_path_factory.mktemp("releases")
    key_path = base / "publisher.pem"
    public = updates.generate_key(key_path)
    key = updates.load_private_key(key_path)
    root = base / "root"
    for version, broken in (("2.0.0", False), ("3.0.0", True), ("0.5.0", False), ("4.0.0", False)):
        updates.publish(payload(base / f"build-{version}", version, broken), root, "stable", key)
    # 4.0.0 tampered after signing: one payload byte changed
    uki = root / "stable" / "4.0.0" / "cortex_4.0.0.efi"
    uki.write_bytes(uki.read_bytes() + b"!")
    # 5.0.0 unsigned: published, then its signature removed
    updates.publish(payload(base / "build-5.0.0", "5.0.0"), root, "stable", key)
    (root / "stable" / "5.0.0" / "SHA256SUMS.sig").unlink()
    port = devcluster_free_port()
    server = procs.popen([sys.executable, "-m", "cortex", "update", "serve", "--root", str(root),
                          "--listen", f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True)
    try:
        assert "serving" in server.stdout.readline()
        yield {"url": f"http://127.0.0.1:{port}/stable", "public": public, "root": root}
    finally:
        server.terminate()
        server.wait(10)


def devcluster_free_port() -> int:
    from tests.support.cluster import free_base_port

    return free_base_port(1)


@pytest.fixture(scope="module")
def cluster(releases, tmp_path_factory):
    from tests.support.cluster import Cluster, free_base_port

    directory = tmp_path_factory.mktemp("upd")
    plugins = {"updater": {"os": "simulated", "simulate_version": "1.0.0", "source": releases["url"],
                           "trusted_keys": [releases["public"]], "interval": 0.2, "not_ready_reboot_after": 0.5,
                           "drain_timeout": 5}}
    try:
        dc = devcluster.up(directory, 3, 2, free_base_port(), timeout=60, plugins=plugins)
    except BaseException:
        devcluster.down(directory)
        raise
    c = Cluster(dc)
    # w2 is installed by pip (not an appliance): the rollout must skip it and say why
    w2 = c.node("w2")
    w2.config_path.write_text(w2.config_path.read_text().replace("os: simulated", "os: package"))
    c.kill("w2", 15)
    c.start("w2")
    supervisor = Supervisor(c)
    try:
        wait_reports(c, lambda r: len(r) == 5 and {x["node_id"]: x["kind"] for x in r}["w2"] == "package")
        c.wait_healthy()  # w2's restart: alive again in the leader's view before any pre-flight
        yield c, supervisor
    finally:
        supervisor.stop()
        devcluster.down(directory)
        for node in c.nodes:  # a restart the saved file missed must not outlive the tests
            if devcluster.alive(node.pid):
                devcluster.stop_node(node)


def cli(c, node_id: str, *argv: str) -> tuple[int, dict | str]:
    node = c.node(node_id)
    out = subprocess.run([sys.executable, "-m", "cortex", "--socket", str(node.admin_socket), "--addr",
                          node.grpc_address, "--json", "update", *argv], capture_output=True, text=True, timeout=180)
    try:
        return out.returncode, json.loads(out.stdout)
    except ValueError:
        return out.returncode, out.stdout + out.stderr


def read(c, query: str):
    for _ in range(100):
        for node in c.dc.servers:
            try:
                with Client(node.grpc_address, timeout=2) as client:
                    return client.read(query, {}, level="leader")
            except CortexError:
                continue
        time.sleep(0.2)
    raise AssertionError(f"no server answers {query}")


def wait_reports(c, check, timeout: float = 60):
    def matching() -> tuple[list] | None:
        reports = read(c, "update.nodes")
        return (reports,) if check(reports) else None

    (reports,) = wait_until(matching, timeout, "matching update reports", interval=0.3,
                            detail=lambda: f"reports never matched: {read(c, 'update.nodes')}")
    return {r["node_id"]: r for r in reports}


def wait_rollout(c, until=("done", "halted", "rolled_back"), timeout: float = 300, on_step=None) -> dict:
    seen = {}

    def ended() -> dict | None:
        doc = read(c, "update.current")
        for s in doc["steps"]:
            if seen.get(s["node_id"]) != s["state"]:
                seen[s["node_id"]] = s["state"]
                if on_step:
                    on_step(s)
        return doc if doc["state"] in until else None

    return wait_until(ended, timeout, f"the rollout to reach {until}", interval=0.2,
                      detail=lambda: f"rollout still {read(c, 'update.current')}")


class Writer:
    """A client that keeps writing and remembers which writes were acknowledged."""

    def __init__(self, c):
        self.c, self.acked, self.failed, self.times = c, [], 0, []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            for node in self.c.dc.servers:
                try:
                    with Client(node.grpc_address, timeout=3) as client:
                        client.put(f"upd/{i}", str(i), idempotency_key=f"upd-{i}", retry_for=2)
                    self.acked.append(i)
                    self.times.append(time.monotonic())
                    break
                except CortexError:
                    continue
            else:
                self.failed += 1
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)


def test_dry_run_plan_and_bad_releases_are_refused_before_any_node_is_touched(cluster, releases):
    c, _ = cluster
    leader = c.leader()
    code, plan = cli(c, "n1", "rollout", "2.0.0", "--dry-run")
    assert code == 0, plan["preflight"] if isinstance(plan, dict) else plan
    order = [s["node_id"] for s in plan["steps"]]
    assert order[:2] == ["w1", "w2"] and order[-1] == leader  # workers, followers, the leader last
    assert next(s for s in plan["steps"] if s["node_id"] == "w2")["reason"].startswith("not an appliance")
    assert plan["started"] is False and plan["preflight"] == []
    for version, why in (("4.0.0", "does not match its checksum"), ("5.0.0", "unsigned"),
                         ("0.5.0", "--allow-downgrade"), ("9.0.0", "cannot fetch")):
        code, out = cli(c, "n2", "rollout", version)
        assert code != 0 and why in str(out), (version, out)
    assert read(c, "update.current") is None  # nothing started, no node touched
    assert {r["version"] for r in read(c, "update.nodes") if r["kind"] == "simulated"} == {"1.0.0"}
    # a reader-role connection (plain gRPC) may not start a rollout
    node = c.node("n1")
    out = subprocess.run([sys.executable, "-m", "cortex", "--socket", "/nonexistent", "--addr", node.grpc_address,
                          "update", "rollout", "2.0.0"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "admin" in out.stderr
    # a start written straight to the log (no tool, no pre-flight of its own) waits for the leader's own
    # pre-flight, which refuses the unsigned release: halted, no node drained or touched
    with Client(c.node(leader).grpc_address) as client:
        raw = client.write("update.start", {"version": "5.0.0", "source": releases["url"], "steps": plan["steps"],
                                            "by": "raw write"})
    assert raw["state"] == "checking"
    doc = wait_rollout(c, timeout=60)
    assert doc["state"] == "halted" and "no node was touched" in doc["reason"] and "unsigned" in doc["reason"], doc
    assert [s["state"] for s in doc["steps"]] == [s["state"] for s in plan["steps"]]
    assert {r["version"] for r in read(c, "update.nodes") if r["kind"] == "simulated"} == {"1.0.0"}


def test_no_space_is_refused_before_any_node_is_touched():
    status = {"has_quorum": True, "leader_id": "n1",
              "nodes": [{"id": n, "role": "server", "liveness": "alive"} for n in ("n1", "n2", "n3")]}
    reports = [{"node_id": n, "version": "1.0.0", "kind": "appliance", "fell_back": False, "previous": "",
                "free_bytes": 10 * 2**20 if n == "n2" else 10**12} for n in ("n1", "n2", "n3")]
    _, problems = preflight_problems(status, reports, "2.0.0", False, 50 * 2**20, None)
    assert problems == ["n2 has 10 MiB free, needs 100 MiB; free space first"]


def test_rolling_update_under_writes_survives_a_leader_kill(cluster, releases, capsys):
    c, supervisor = cluster
    first_leader = c.leader()
    writer = Writer(c)
    killed = []

    def on_step(step):
        # a leader change mid-rollout: kill the leader while the first worker is rebooting
        if step["node_id"] == "w1" and step["state"] == "rebooting" and not killed:
            victim = c.leader()
            killed.append(victim)
            c.kill(victim)

    try:
        started = time.monotonic()
        code, out = cli(c, "n1", "rollout", "2.0.0")
        assert code == 0 and out["started"], out
        doc = wait_rollout(c, on_step=on_step)
        took = time.monotonic() - started
    finally:
        writer.stop()
    assert doc["state"] == "done", doc
    assert [s["state"] for s in doc["steps"]] == ["done", "skipped", "done", "done", "done"]
    reports = wait_reports(c, lambda r: all(x["blessed"] for x in r))
    assert {n: r["version"] for n, r in reports.items() if r["kind"] == "simulated"} == \
        {"w1": "2.0.0", "n1": "2.0.0", "n2": "2.0.0", "n3": "2.0.0"}
    assert c.leader() != first_leader or killed[0] == first_leader  # the old leader handed over before its turn
    # no acknowledged write lost
    with Client(c.node(c.leader()).grpc_address) as client:
        missing = [i for i in writer.acked if client.get(f"upd/{i}") != str(i)]
    assert writer.acked and not missing
    per_node = _apply_times(doc)
    longest = max(b - a for a, b in zip(writer.times, writer.times[1:]))
    with capsys.disabled():
        print(f"\nsimulated rollout 1.0.0 -> 2.0.0, 4 nodes (+1 skipped), leader {killed[0]} killed mid-rollout: "
              f"{took:.1f} s; {len(writer.acked)} writes acknowledged, {writer.failed} not acknowledged, 0 lost; "
              f"longest gap between acknowledged writes {longest:.1f} s")
        for node, seconds in per_node.items():
            print(f"  update-apply {node}: {seconds:.1f} s")
    code, status = cli(c, "n3", "status")
    assert code == 0 and status["rollout"]["state"] == "done"


def _apply_times(doc: dict) -> dict[str, float]:
    """From the replicated step timestamps: drain start (the previous step's end) to done, per node."""
    start, out = doc["since"]["_rollout"], {}
    for s in doc["steps"]:
        if s["state"] == "done":
            out[s["node_id"]] = doc["since"][s["node_id"]] - start
            start = doc["since"][s["node_id"]]
    return out


def test_rollback_returns_updated_nodes_to_the_previous_slot(cluster, releases, capsys):
    c, supervisor = cluster
    before = read(c, "update.current")
    assert before["state"] == "done" and before["version"] == "2.0.0"
    started = time.monotonic()
    code, out = cli(c, "n1", "rollback", "--wait")  # follows progress until the rollback ends
    took = time.monotonic() - started
    assert code == 0 and out["state"] == "rolled_back" and out["id"] == before["id"], out
    doc = read(c, "update.current")
    assert [s["state"] for s in doc["steps"]] == ["rolled_back", "skipped", "rolled_back", "rolled_back",
                                                  "rolled_back"]
    reports = wait_reports(c, lambda r: all(x["blessed"] for x in r))
    assert {n: r["version"] for n, r in reports.items() if r["kind"] == "simulated"} == \
        {"w1": "1.0.0", "n1": "1.0.0", "n2": "1.0.0", "n3": "1.0.0"}
    assert not any(r["fell_back"] for r in reports.values())
    with capsys.disabled():
        print(f"\nsimulated rollback 2.0.0 -> 1.0.0 of 4 nodes: {took:.1f} s")
    code, out = cli(c, "n1", "rollback")
    assert code != 0 and "rolled_back" in str(out)  # nothing left to roll back


def test_broken_version_falls_back_by_itself_and_halts_the_rollout(cluster, releases, capsys):
    c, supervisor = cluster
    started = time.monotonic()
    code, out = cli(c, "n2", "rollout", "3.0.0")
    assert code == 0 and out["started"], out
    doc = wait_rollout(c)
    took = time.monotonic() - started
    assert doc["state"] == "halted"
    assert doc["reason"].startswith("w1: came back on 1.0.0") and "fell back" in doc["reason"]
    assert [s["state"] for s in doc["steps"]] == ["failed", "skipped", "pending", "pending", "pending"]
    reports = wait_reports(c, lambda r: True)
    assert reports["w1"]["version"] == "1.0.0" and reports["w1"]["fell_back"] and \
        reports["w1"]["previous"] == "3.0.0"
    assert all(reports[n]["version"] == "1.0.0" for n in ("n1", "n2", "n3"))
    boots = [t for t, n in supervisor.restarts if n == "w1" and t >= started]
    assert len(boots) >= 4  # the install reboot and three tries of 3.0.0 that never got ready, then 1.0.0
    with capsys.disabled():
        print(f"\nsimulated broken 3.0.0 on w1: halted after {took:.1f} s ({len(boots)} boots of w1, "
              f"automatic fallback to 1.0.0)")
    # the same broken version is refused up front now; the halted rollout rolls back at once (nobody updated)
    code, out = cli(c, "n2", "rollout", "3.0.0")
    assert code != 0 and "already fell back from 3.0.0" in str(out)
    code, out = cli(c, "n1", "rollback")
    assert code == 0 and out["state"] == "rolled_back", out
    history = read(c, "update.history")
    code, out = cli(c, "n1", "rollback", "--id", history[-1]["id"])
    assert code != 0 and "latest" in str(out)


def test_simulated_slots_interrupted_install_and_repeated_updates_from_the_fallback(tmp_path: Path):
    sim = SimulatedOS(tmp_path, "1.0.0")
    rel = {}
    for v, broken in (("2.0.0", False), ("3.0.0", True), ("4.0.0", False)):
        rel[v] = payload(tmp_path / f"r{v}", v, broken)
    sim.install(rel["2.0.0"], "2.0.0")
    # interrupted: the process dies before rebooting; the next boot still runs 1.0.0, nothing lost
    sim = SimulatedOS(tmp_path, "1.0.0")
    assert sim.facts().version == "2.0.0" and not sim.facts().blessed  # the new entry is tried first
    sim.bless()
    assert sim.slots == Slots(("1.0.0", "2.0.0"), 1, 1, {})
    sim.install(rel["3.0.0"], "3.0.0")
    versions = [SimulatedOS(tmp_path, "1.0.0").facts() for _ in range(4)]
    assert [f.version for f in versions] == ["3.0.0", "3.0.0", "3.0.0", "2.0.0"]
    assert not any(f.ready for f in versions[:3]) and versions[3].blessed
    # from the fallback slot, the next update overwrites the failed slot, never the good one
    sim = SimulatedOS(tmp_path, "1.0.0")
    sim.install(rel["4.0.0"], "4.0.0")
    sim = SimulatedOS(tmp_path, "1.0.0")
    assert sim.facts().version == "4.0.0"
    sim.bless()
    assert set(sim.slots.versions) == {"2.0.0", "4.0.0"}
    sim.revert("2.0.0")
    assert SimulatedOS(tmp_path, "1.0.0").facts().version == "2.0.0"

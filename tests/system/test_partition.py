"""Network partitions between real agents, each in its own network namespace (root only, as CI runs).

Topology: a bridge namespace and one namespace per server, joined by veth pairs on 10.231.<k>.0/24. Every
packet of the test stays inside namespaces this test creates: clients run in a node's
namespace (nsenter), never from the root namespace (where 10.x would be routed off the machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import procs
from tests.support.cluster import first_leader
from tests.support.linearizability import HistoryRecorder, check
from tests.support.netlab import NetLab, in_netns
from tests.support.wait import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


class Lab(NetLab):
    def __init__(self, tag: str, subnet: int, count: int):
        super().__init__()
        self.tag, self.subnet, self.count = tag, subnet, count
        self.bridge_ns = f"{tag}-br"
        self.names = [f"{tag}-n{i}" for i in range(1, count + 1)]
        self.data_root = Path(".")  # where the fixture keeps n<i>/data (set by the fixture)

    def address(self, i: int) -> str:
        return f"10.231.{self.subnet}.{i}"

    def up(self) -> None:
        self.namespace(self.bridge_ns)
        self.bridge(self.bridge_ns)
        for i, ns in enumerate(self.names, start=1):
            self.namespace(ns)
            self.plug(ns, self.bridge_ns, f"{self.tag}p{i}", address=f"{self.address(i)}/24")

    def isolate(self, i: int) -> None:
        self.set_link(self.bridge_ns, f"{self.tag}p{i}", up=False)

    def heal(self, i: int) -> None:
        self.set_link(self.bridge_ns, f"{self.tag}p{i}", up=True)

    def cortex(self, i: int, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run the CLI inside node i's namespace against node i's own agent."""
        # with the node's own credentials, as the CLI on that node finds them (mTLS)
        env = {**os.environ, "CORTEX_TLS_DIR": str(self.data_root / f"n{i}" / "data" / "tls")}
        return procs.run(in_netns(self.names[i - 1], [sys.executable, "-m", "cortex", "--addr",
                                                      f"{self.address(i)}:7400", "--timeout", "3", *args]),
                         capture_output=True, text=True, timeout=timeout, env=env)

    def status(self, i: int) -> dict | None:
        proc = self.cortex(i, "status", "--json")
        return json.loads(proc.stdout) if proc.returncode == 0 else None


@pytest.fixture
def lab(tmp_path: Path):
    lab = Lab(f"cx{os.getpid() % 10000}", subnet=os.getpid() % 250, count=3)
    lab.data_root = tmp_path
    agents = []
    try:
        lab.up()
        for i, ns in enumerate(lab.names, start=1):
            node_dir = tmp_path / f"n{i}"
            node_dir.mkdir()
            boot = ("bootstrap:\n  init: true\n" if i == 1 else
                    f"bootstrap:\n  join:\n    address: {lab.address(1)}:7400\n"
                    f"    token_file: {tmp_path / 'n1' / 'data' / 'join-token'}\n")
            (node_dir / "config.yaml").write_text(
                f"node:\n  id: n{i}\n  role: server\ndata_dir: data\n"
                f"listen:\n  grpc: {lab.address(i)}:7400\n  raft: {lab.address(i)}:7401\n{boot}")
            with open(node_dir / "agent.log", "ab") as log:
                agents.append(procs.popen(in_netns(ns, [sys.executable, "-m", "cortex", "agent", "--config",
                                                        str(node_dir / "config.yaml")]),
                                          stdout=log, stderr=subprocess.STDOUT, cwd=node_dir))
            if i == 1:
                def initialised() -> bool:
                    assert agents[0].poll() is None, "n1 did not init"
                    return (tmp_path / "n1" / "data" / "join-token").exists()

                wait_until(initialised, 30, "n1 to init", interval=0.1)

        def formed() -> bool:
            s = lab.status(1)
            return bool(s and len(s["nodes"]) == 3 and all(n["liveness"] == "alive" for n in s["nodes"]))

        wait_until(formed, 60, "the cluster to form", interval=0.3)
        yield lab
    finally:
        for p in agents:
            p.kill()
            p.wait(10)
        lab.destroy()


def leader_of(lab: Lab, among: list[int]) -> int | None:
    return first_leader(among, lambda i: (lab.status(i) or {}).get("state", ""))


def test_partitioned_leader_cannot_write_majority_elects_and_heals_without_split_brain(lab: Lab):
    old = leader_of(lab, [1, 2, 3])
    assert old is not None
    majority = [i for i in (1, 2, 3) if i != old]
    assert lab.cortex(old, "kv", "put", "before", "1").returncode == 0

    lab.isolate(old)
    isolated_at = time.monotonic()
    new = wait_until(lambda: leader_of(lab, majority), 20, "the majority to elect a leader", interval=0)
    elected = time.monotonic() - isolated_at
    assert lab.cortex(new, "kv", "put", "during", "majority").returncode == 0

    minority = lab.cortex(old, "kv", "put", "during", "minority", "--retry", "2")
    assert minority.returncode != 0, "a partitioned minority must not accept writes"
    s = lab.status(old)
    assert s is not None and s["state"] != "leader", "the isolated leader must step down"

    lab.heal(old)
    def converged() -> bool:
        digests = {i: json.loads(lab.cortex(i, "state", "--json").stdout or "{}").get("digest") for i in (1, 2, 3)}
        return len(set(digests.values())) == 1 and None not in digests.values()

    wait_until(converged, 30, "the replicas to converge", interval=0.3)
    for i in (1, 2, 3):
        assert lab.cortex(i, "kv", "get", "during").stdout.strip() == "majority"
        assert lab.cortex(i, "kv", "get", "before").stdout.strip() == "1"
    print(f"isolated leader n{old}: majority elected n{new} after {elected:.2f}s")


def test_checker_catches_a_real_stale_read_from_an_isolated_follower(lab: Lab):
    """A follower cut off from Raft still answers `--level stale` from its own copy: the recorded
    history is not linearizable and the checker must say so, naming the key. The same read at level
    linearizable refuses while isolated and returns the new value once healed."""
    leader = leader_of(lab, [1, 2, 3])
    assert leader is not None
    follower = next(i for i in (1, 2, 3) if i != leader)
    history = HistoryRecorder()

    h = history.invoke("writer", "write", "k", value="old")
    assert lab.cortex(leader, "kv", "put", "k", "old").returncode == 0
    history.ok(h)
    wait_until(lambda: lab.cortex(follower, "kv", "get", "k", "--level", "stale").stdout.strip() == "old", 10,
               "the follower to receive the first write", interval=0.1)

    lab.isolate(follower)
    try:
        h = history.invoke("writer", "write", "k", value="new")
        majority = next(i for i in (1, 2, 3) if i != follower)
        assert lab.cortex(majority, "kv", "put", "k", "new", "--retry", "20").returncode == 0
        history.ok(h)
        h = history.invoke("reader", "read", "k")
        seen = lab.cortex(follower, "kv", "get", "k", "--level", "stale").stdout.strip()
        history.ok(h, seen)
        assert seen == "old"
        result = check(history.operations())
        assert not result.ok and result.key == "k", result
        assert lab.cortex(follower, "kv", "get", "k", "--level", "linearizable").returncode != 0
    finally:
        lab.heal(follower)
    wait_until(lambda: lab.cortex(follower, "kv", "get", "k", "--level", "linearizable").stdout.strip() == "new",
               30, "the healed follower to catch up", interval=0.3)

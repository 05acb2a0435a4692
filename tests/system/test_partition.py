"""Network partitions between real agents, each in its own network namespace (root only, as CI runs).

Topology: a bridge namespace and one namespace per server, joined by veth pairs on 10.231.<k>.0/24. Every
packet of the test stays inside namespaces this test creates: clients run with `ip netns exec` in a node's
namespace, never from the root namespace (where 10.x would be routed off the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.linearizability import HistoryRecorder, check

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 for network namespaces"
)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=60)


class Lab:
    def __init__(self, tag: str, subnet: int, count: int):
        self.tag, self.subnet, self.count = tag, subnet, count
        self.bridge_ns = f"{tag}-br"
        self.names = [f"{tag}-n{i}" for i in range(1, count + 1)]
        self.data_root = Path(".")  # where the fixture keeps n<i>/data (set by the fixture)

    def address(self, i: int) -> str:
        return f"10.231.{self.subnet}.{i}"

    def up(self) -> None:
        sh("ip", "netns", "add", self.bridge_ns)
        sh("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
        for i, ns in enumerate(self.names, start=1):
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", f"{self.tag}v{i}", "type", "veth", "peer", "name", f"{self.tag}p{i}")
            sh("ip", "link", "set", f"{self.tag}v{i}", "netns", ns)
            sh("ip", "link", "set", f"{self.tag}p{i}", "netns", self.bridge_ns)
            sh("ip", "-n", ns, "link", "set", f"{self.tag}v{i}", "name", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", self.bridge_ns, "link", "set", f"{self.tag}p{i}", "master", "br0")
            sh("ip", "-n", self.bridge_ns, "link", "set", f"{self.tag}p{i}", "up")

    def down(self) -> None:
        for ns in [*self.names, self.bridge_ns]:
            sh("ip", "netns", "pids", ns, check=False)
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
            sh("ip", "netns", "del", ns, check=False)

    def isolate(self, i: int) -> None:
        sh("ip", "-n", self.bridge_ns, "link", "set", f"{self.tag}p{i}", "down")

    def heal(self, i: int) -> None:
        sh("ip", "-n", self.bridge_ns, "link", "set", f"{self.tag}p{i}", "up")

    def cortex(self, i: int, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run the CLI inside node i's namespace against node i's own agent."""
        # with the node's own credentials, as the CLI on that node finds them (mTLS)
        env = {**os.environ, "CORTEX_TLS_DIR": str(self.data_root / f"n{i}" / "data" / "tls")}
        return subprocess.run(["ip", "netns", "exec", self.names[i - 1], sys.executable, "-m", "cortex",
                               "--addr", f"{self.address(i)}:7400", "--timeout", "3", *args],
                              capture_output=True, text=True, timeout=timeout, env=env)

    def status(self, i: int) -> dict | None:
        proc = self.cortex(i, "status", "--json")
        return json.loads(proc.stdout) if proc.returncode == 0 else None


@pytest.fixture
def lab(tmp_path: Path):
    lab = Lab(f"cx{os.getpid() % 10000}", subnet=os.getpid() % 250, count=3)
    lab.down()
    lab.up()
    lab.data_root = tmp_path
    procs = []
    try:
        for i, ns in enumerate(lab.names, start=1):
            node_dir = tmp_path / f"n{i}"
            node_dir.mkdir()
            boot = ("bootstrap:\n  init: true\n" if i == 1 else
                    f"bootstrap:\n  join:\n    address: {lab.address(1)}:7400\n"
                    f"    token_file: {tmp_path / 'n1' / 'data' / 'join-token'}\n")
            (node_dir / "config.yaml").write_text(
                f"node:\n  id: n{i}\n  role: server\ndata_dir: data\n"
                f"listen:\n  grpc: {lab.address(i)}:7400\n  raft: {lab.address(i)}:7401\n{boot}")
            log = open(node_dir / "agent.log", "ab")
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "cortex", "agent",
                                           "--config", str(node_dir / "config.yaml")],
                                          stdout=log, stderr=subprocess.STDOUT, cwd=node_dir))
            if i == 1:
                deadline = time.monotonic() + 30
                while not (tmp_path / "n1" / "data" / "join-token").exists():
                    assert time.monotonic() < deadline and procs[0].poll() is None, "n1 did not init"
                    time.sleep(0.1)
        deadline = time.monotonic() + 60
        while True:
            s = lab.status(1)
            if s and len(s["nodes"]) == 3 and all(n["liveness"] == "alive" for n in s["nodes"]):
                break
            assert time.monotonic() < deadline, f"cluster did not form: {s}"
            time.sleep(0.3)
        yield lab
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
        lab.down()


def leader_of(lab: Lab, among: list[int]) -> int | None:
    for i in among:
        s = lab.status(i)
        if s and s["state"] == "leader":
            return i
    return None


def test_partitioned_leader_cannot_write_majority_elects_and_heals_without_split_brain(lab: Lab):
    old = leader_of(lab, [1, 2, 3])
    assert old is not None
    majority = [i for i in (1, 2, 3) if i != old]
    assert lab.cortex(old, "kv", "put", "before", "1").returncode == 0

    lab.isolate(old)
    isolated_at = time.monotonic()
    new = None
    while new is None:
        assert time.monotonic() - isolated_at < 20, "the majority did not elect a leader"
        new = leader_of(lab, majority)
    elected = time.monotonic() - isolated_at
    assert lab.cortex(new, "kv", "put", "during", "majority").returncode == 0

    minority = lab.cortex(old, "kv", "put", "during", "minority", "--retry", "2")
    assert minority.returncode != 0, "a partitioned minority must not accept writes"
    s = lab.status(old)
    assert s is not None and s["state"] != "leader", "the isolated leader must step down"

    lab.heal(old)
    deadline = time.monotonic() + 30
    while True:
        digests = {i: json.loads(lab.cortex(i, "state", "--json").stdout or "{}").get("digest") for i in (1, 2, 3)}
        if len(set(digests.values())) == 1 and None not in digests.values():
            break
        assert time.monotonic() < deadline, f"replicas did not converge: {digests}"
        time.sleep(0.3)
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
    deadline = time.monotonic() + 10
    while lab.cortex(follower, "kv", "get", "k", "--level", "stale").stdout.strip() != "old":
        assert time.monotonic() < deadline, "the follower never received the first write"
        time.sleep(0.1)

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
    deadline = time.monotonic() + 30
    while lab.cortex(follower, "kv", "get", "k", "--level", "linearizable").stdout.strip() != "new":
        assert time.monotonic() < deadline, "the healed follower never caught up"
        time.sleep(0.3)

"""Shared fixtures: real agent processes on loopback, started through cortex.dev.cluster."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cortex.client import Client, CortexError
from cortex.dev import cluster as devcluster

_port_counter = itertools.count()


def python_without_home(code: str, unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run `code` in this interpreter as a uid with no passwd entry and no $HOME (what the appliance's
    DynamicUser agent is: Path.home() raises there), with `unset` also dropped from the environment.
    Needs root; callers skip otherwise."""
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", *unset)}
    return subprocess.run(["setpriv", "--reuid=64999", "--regid=64999", "--clear-groups", sys.executable, "-c", code],
                          capture_output=True, text=True, env=env, cwd="/", timeout=60)


def free_base_port(width: int = 20) -> int:
    """A base port with `width` free ports above it, distinct per call and per pytest worker."""
    start = 21000 + (os.getpid() % 200) * 100
    for _ in range(200):
        base = start + next(_port_counter) * width
        if all(devcluster.port_free(p) for p in range(base, base + width)):
            return base
    raise RuntimeError("no free port range on loopback")


class Cluster:
    """A running dev cluster plus the verbs the tests need."""

    def __init__(self, dc: devcluster.DevCluster):
        self.dc = dc

    @property
    def nodes(self):
        return self.dc.nodes

    def node(self, node_id: str) -> devcluster.DevNode:
        return self.dc.node(node_id)

    def client(self, node_id: str, timeout: float = 10.0) -> Client:
        return Client(self.node(node_id).grpc_address, timeout=timeout)

    def leader(self, timeout: float = 15.0, exclude: tuple[str, ...] = ()) -> str:
        """Id of the server that reports itself leader (waiting for an election if needed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.dc.servers:
                if node.id in exclude or not devcluster.alive(node.pid):
                    continue
                try:
                    with Client(node.grpc_address, timeout=1) as c:
                        if c.status().state == "leader":
                            return node.id
                except CortexError:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"no leader within {timeout}s; logs: {self.dc.dir}")

    def followers(self) -> list[str]:
        leader = self.leader()
        return [n.id for n in self.dc.servers if n.id != leader]

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        devcluster.stop_node(self.node(node_id), sig)

    def start(self, node_id: str) -> None:
        devcluster.start_node(self.node(node_id))
        self.dc.save()

    def wait_healthy(self, timeout: float = 30.0) -> None:
        devcluster.wait_healthy(self.dc, time.monotonic() + timeout)

    def digests(self) -> dict[str, str]:
        out = {}
        for node in self.dc.servers:
            with Client(node.grpc_address) as c:
                out[node.id] = c.read("digest", {}, level="stale")["digest"]
        return out

    def applied_entries_truncated(self) -> dict[str, int]:
        """Per node, how often pysyncobj deleted log entries it had already applied. Raft never does (applied
        means committed); pysyncobj did on every late AppendEntries until append.reconcile_append."""
        counts = {n.id: n.log_path.read_text(errors="replace").count("truncating already-applied log entries")
                  for n in self.nodes if n.log_path.exists()}
        return {k: v for k, v in counts.items() if v}

    def settle(self, quiet: float = 1.0, timeout: float = 15.0) -> None:
        """Until the log stops growing for `quiet` seconds: plugins write their first records (capacity,
        whereami) just after the nodes join, and tests that compare digests must not race them."""
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            with Client(self.node(self.leader()).grpc_address, timeout=2) as c:
                index = c.status().commit_index
            if index != last:
                last, since = index, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            time.sleep(0.1)

    def wait_converged(self, timeout: float = 20.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            digests = self.digests()
            if len(set(digests.values())) == 1 or time.monotonic() > deadline:
                return digests
            time.sleep(0.1)


@pytest.fixture(scope="session", autouse=True)
def _own_dev_trust(tmp_path_factory):
    """Which credentials open which test cluster is noted in a directory of this session's own (CLI
    subprocesses inherit it), never mixed with a developer's `just up` or an earlier crashed run."""
    previous = os.environ.get("CORTEX_DEV_TRUST_DIR")
    os.environ["CORTEX_DEV_TRUST_DIR"] = str(tmp_path_factory.mktemp("dev-trust"))
    yield
    if previous is None:
        os.environ.pop("CORTEX_DEV_TRUST_DIR", None)
    else:
        os.environ["CORTEX_DEV_TRUST_DIR"] = previous


@pytest.fixture
def make_cluster(tmp_path: Path):
    started: list[devcluster.DevCluster] = []

    def make(servers: int = 3, workers: int = 0, raft: dict | None = None, name: str = "cluster",
             plugins: dict | None = None, extra_config: str = "") -> Cluster:
        """`extra_config` is YAML appended to every node's config (a `membership:` section, say)."""
        try:
            dc = devcluster.up(tmp_path / name, servers, workers, free_base_port(), timeout=60, raft=raft,
                               plugins=plugins, extra_config=(lambda node: extra_config) if extra_config else None)
        except BaseException:
            devcluster.down(tmp_path / name)  # never leave half a cluster running after a failed start
            raise
        started.append(dc)
        return Cluster(dc)

    yield make
    for dc in started:
        devcluster.down(Path(dc.dir))


def module_cluster(directory: Path, servers: int = 3, workers: int = 2):
    """A settled cluster for a module-scoped fixture to yield from; stopped afterwards, even on failure."""
    try:
        dc = devcluster.up(directory, servers, workers, free_base_port(), timeout=60)
        cluster = Cluster(dc)
        cluster.settle()
    except BaseException:
        devcluster.down(directory)
        raise
    try:
        yield cluster
    finally:
        devcluster.down(directory)


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    """One 3-server, 2-worker cluster for the tests that do not break anything."""
    yield from module_cluster(tmp_path_factory.mktemp("shared"))

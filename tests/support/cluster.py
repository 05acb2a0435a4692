"""Real agent processes on loopback, started through cortex.dev.cluster (what `cortex dev up` runs), and the
fixtures that hand them to tests. The agents die with the test process: see procs.py."""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import pytest

from cortex.client import Client, CortexError
from cortex.dev import cluster as devcluster
from tests.support.wait import wait_until

_port_counter = itertools.count()
T = TypeVar("T")


def free_base_port(width: int = 20) -> int:
    """A base port with `width` free ports above it, distinct per call and per pytest worker
    (from CORTEX_TEST_PORT_BASE when set: a port range of one's own on a shared machine)."""
    start = int(os.environ.get("CORTEX_TEST_PORT_BASE") or 0) or 21000 + (os.getpid() % 200) * 100
    for _ in range(200):
        base = start + next(_port_counter) * width
        if all(devcluster.port_free(p) for p in range(base, base + width)):
            return base
    raise RuntimeError("no free port range on loopback")


def first_leader(candidates: Iterable[T], state: Callable[[T], str]) -> T | None:
    """The first candidate whose Raft state (as `state` asks it) is "leader"; None while there is none, an
    election under way, say. The one leader lookup, whatever the candidates are and however they are asked."""
    return next((c for c in candidates if state(c) == "leader"), None)


def grpc_state(node: devcluster.DevNode) -> str:
    """A node's Raft state over gRPC; "" when it does not answer (stopped, restarting)."""
    if not devcluster.alive(node.pid):
        return ""
    try:
        with Client(node.grpc_address, timeout=1) as c:
            return c.status().state
    except CortexError:
        return ""


def current_leader(nodes: Iterable[devcluster.DevNode], exclude: Iterable[str] = ()) -> str:
    """Id of the running node among `nodes` that reports itself leader right now, "" when none does."""
    leader = first_leader((n for n in nodes if n.id not in exclude), grpc_state)
    return leader.id if leader else ""


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
        return wait_until(lambda: current_leader(self.dc.servers, exclude), timeout,
                          f"a leader; logs: {self.dc.dir}")

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
        whereami) just after the nodes join, and tests that compare digests must not race them. A log still
        growing after `timeout` is left to the test's own assertions."""
        seen = {"index": -1, "since": time.monotonic()}

        def quiet_for_long_enough() -> bool:
            with Client(self.node(self.leader()).grpc_address, timeout=2) as c:
                index = c.status().commit_index
            if index != seen["index"]:
                seen.update(index=index, since=time.monotonic())
                return False
            return time.monotonic() - seen["since"] >= quiet

        try:
            wait_until(quiet_for_long_enough, timeout, "the log to stop growing", interval=0.1)
        except AssertionError:
            pass

    def wait_converged(self, timeout: float = 20.0) -> dict[str, str]:
        """The servers' digests once they agree, or as they stand after `timeout` (the caller asserts)."""
        def agreed() -> dict[str, str] | None:
            digests = self.digests()
            return digests if len(set(digests.values())) == 1 else None

        try:
            return wait_until(agreed, timeout, "equal digests", interval=0.1)
        except AssertionError:
            return self.digests()


@pytest.fixture(scope="session", autouse=True)
def _own_dev_trust(tmp_path_factory):
    """Which credentials open which test cluster is noted in a directory of this run's own (CLI subprocesses
    inherit it), never mixed with a developer's `just up` or an earlier crashed run."""
    previous = os.environ.get("CORTEX_DEV_TRUST_DIR")
    os.environ["CORTEX_DEV_TRUST_DIR"] = str(tmp_path_factory.mktemp("dev-trust"))
    yield
    if previous is None:
        os.environ.pop("CORTEX_DEV_TRUST_DIR", None)
    else:
        os.environ["CORTEX_DEV_TRUST_DIR"] = previous


@pytest.fixture(scope="session", autouse=True)
def _agents_die_with_the_tests():
    """Agents started by cortex.dev.cluster in this process, and in the programs it runs (bench, the CLI),
    are SIGKILLed by the kernel when their starter dies, even when pytest itself is SIGKILLed."""
    previous = os.environ.get(devcluster.DIE_WITH_PARENT_ENV)
    os.environ[devcluster.DIE_WITH_PARENT_ENV] = "1"
    yield
    if previous is None:
        os.environ.pop(devcluster.DIE_WITH_PARENT_ENV, None)
    else:
        os.environ[devcluster.DIE_WITH_PARENT_ENV] = previous


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

"""Leadership hand-over under a steady write load (raft/handover.py): `cortex leader transfer` and a leader's
SIGTERM move leadership without refusing writes or losing one, and a target that cannot win is refused
cleanly while the old leader goes on leading.

Writers use a short per-call deadline and retry a failed call with the same idempotency key, as a client
should; the longest gap between two acknowledged writes is printed (bench/membership.py measures it on its
own: the 0.2 s target is a benchmark figure, the bound here is generous for a loaded 2-core machine).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import grpc
import pytest

from cortex.client import Client, CortexError
from tests.support.cluster import Cluster, module_cluster
from tests.support.wait import wait_until

GAP_BOUND = 2.0  # seconds; an election after a missed leader takes 0.5-1 s, the hand-over far less


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from module_cluster(tmp_path_factory.mktemp("handover"), servers=3, workers=0)


class Writers:
    """`count` threads writing keys of their own one after another through `address`."""

    def __init__(self, address: str, prefix: str, count: int = 3, deadline: float = 1.0):
        self.address, self.prefix, self.deadline = address, prefix, deadline
        self.acks: list[tuple[float, str, str]] = []  # (monotonic time, key, value)
        self.errors: list[str] = []
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(count)]

    def __enter__(self) -> Writers:
        for t in self._threads:
            t.start()
        wait_until(lambda: len(self.acks) >= 10, 30, "the writers' first writes")
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        for t in self._threads:
            t.join(30)

    def _run(self, n: int) -> None:
        with Client(self.address, timeout=self.deadline) as c:
            i = 0
            while not self._done.is_set():
                key, value, idem = f"{self.prefix}/{n}/{i:06d}", uuid.uuid4().hex[:8], uuid.uuid4().hex
                while not self._done.is_set():
                    try:
                        c.put(key, value, idempotency_key=idem)
                    except CortexError as exc:
                        self.errors.append(f"{key}: {exc}")
                        time.sleep(0.005)
                        continue
                    self.acks.append((time.monotonic(), key, value))
                    break
                i += 1

    def gap(self) -> float:
        times = sorted(t for t, _, _ in self.acks)
        return max(b - a for a, b in zip(times, times[1:]))

    def assert_all_present(self, c: Cluster, via: str) -> None:
        with c.client(via, timeout=20) as client:
            rows = client.read("kv.list", {"prefix": self.prefix + "/", "limit": 10_000}, level="linearizable")
        stored = {r["key"]: r["value"] for r in rows}
        missing = [(k, v) for _, k, v in self.acks if stored.get(k) != v]
        assert not missing, f"{len(missing)} acknowledged writes missing or changed, e.g. {missing[:5]}"


def _report(what: str, writers: Writers) -> None:
    print(f"{what}: {len(writers.acks)} writes acknowledged, longest gap {writers.gap():.3f}s, "
          f"{len(writers.errors)} failed calls retried")


def test_leader_transfer_under_writes_refuses_none_and_loses_none(cluster):
    via = cluster.followers()[0]
    with Writers(cluster.node(via).grpc_address, "transfer") as writers:
        for _ in range(3):  # an entry is nearly always in flight: each request meets a follower behind
            old = cluster.leader()
            with cluster.client(via) as c:
                response = c.transfer_leadership()
            new = response.new_leader_id
            assert new and new != old
            wait_until(lambda new=new: cluster.leader() == new, 15, "the others following the new leader")
            time.sleep(0.3)
    _report("leader transfer x3", writers)
    writers.assert_all_present(cluster, via)
    assert writers.gap() < GAP_BOUND


def test_transfer_to_a_server_that_cannot_catch_up_fails_and_the_leader_stays(cluster):
    leader = cluster.leader()
    paused = cluster.followers()[0]
    os.kill(cluster.node(paused).pid, signal.SIGSTOP)  # connected still, but it acknowledges nothing
    try:
        with cluster.client(leader) as c:
            c.put("handover/while-paused", "1")  # the paused server is behind now
            started = time.monotonic()
            with pytest.raises(CortexError) as refused:
                c.transfer_leadership(paused)
            took = time.monotonic() - started
            assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION, refused.value
            assert f"{paused} did not catch up" in refused.value.details and "Retry" in refused.value.details
            assert took < 10, f"refused only after {took:.1f}s"
            assert c.status().leader_id == leader
            c.put("handover/after-refusal", "1")  # the held writes flow again
    finally:
        os.kill(cluster.node(paused).pid, signal.SIGCONT)
    cluster.wait_healthy()


def test_leader_sigterm_under_writes_hands_over_and_loses_none(cluster):
    leader = cluster.leader()
    via = cluster.followers()[0]
    with Writers(cluster.node(via).grpc_address, "sigterm") as writers:
        time.sleep(0.5)
        cluster.kill(leader, signal.SIGTERM)
        new = cluster.leader(exclude=(leader,))
        time.sleep(0.5)
    _report("leader SIGTERM", writers)
    assert "leadership handed over" in cluster.node(leader).log_path.read_text(errors="replace")
    # while it is down: a transfer to it fails at once, and names what to do
    with cluster.client(new) as c:
        with pytest.raises(CortexError) as refused:
            c.transfer_leadership(leader)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "not connected to the leader" in refused.value.details
    writers.assert_all_present(cluster, via)
    assert writers.gap() < GAP_BOUND
    cluster.start(leader)
    cluster.wait_healthy()

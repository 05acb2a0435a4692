"""Client threads writing under a leadership change, each write retried with its idempotency key as a client
should; what they saw, for tests/cluster/test_cluster.py's hand-over tests."""

from __future__ import annotations

import threading
import time
import uuid

from cortex.client import Client, CortexError
from tests.support.cluster import Cluster
from tests.support.wait import wait_until

REFUSALS = ("leadership changed", "being handed over")  # a hand-over's refusal, which the caller never sees


class Writers:
    """One thread per address, each writing keys of its own one after another through that node."""

    def __init__(self, addresses: list[str], prefix: str, deadline: float = 5.0):
        self.addresses, self.prefix, self.deadline = addresses, prefix, deadline
        self.acks: list[tuple[float, str, str]] = []  # (monotonic time, key, value)
        self.errors: list[str] = []
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(len(addresses))]

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
        with Client(self.addresses[n], timeout=self.deadline) as c:
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

    def refusals(self) -> list[str]:
        return [e for e in self.errors if any(r in e for r in REFUSALS)]

    def assert_all_present(self, c: Cluster, via: str) -> None:
        with c.client(via, timeout=20) as client:
            rows = client.read("kv.list", {"prefix": self.prefix + "/", "limit": 10_000}, level="linearizable")
        stored = {r["key"]: r["value"] for r in rows}
        missing = [(k, v) for _, k, v in self.acks if stored.get(k) != v]
        assert not missing, f"{len(missing)} acknowledged writes missing or changed, e.g. {missing[:5]}"


def report(what: str, writers: Writers) -> None:
    print(f"{what}: {len(writers.acks)} writes acknowledged, longest gap {writers.gap():.3f}s, "
          f"{len(writers.errors)} failed calls retried")

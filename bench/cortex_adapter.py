"""Cortex side of the benchmark: a client with the same small interface as
``bench.etcd.EtcdClient`` and a wrapper around a local dev cluster.

Client interface (what ``bench/measure.py`` drives, identical for etcd)::

    client.put(key: str, value: bytes) -> None       # returns once committed and applied
    client.get(key: str, linearizable=True) -> bytes | None
    client.put_many_pipelined(items, concurrency) -> int

Cortex's ``kv.put`` stores text, so values travel hex-encoded (``value.hex()``;
cheap, and a 100-byte value becomes 200 characters of JSON).

Two pipelining styles are offered, so the benchmark can report both:

* ``CortexClient.put_many_pipelined`` -- one unary ``Write`` RPC per put, at most
  ``concurrency`` in flight as gRPC futures over one HTTP/2 channel: exactly the
  pattern ``EtcdClient.put_many_pipelined`` uses.
* ``CortexClient.batched(batch_size, in_flight).put_many_pipelined`` -- the puts
  grouped into ``WriteBatch`` RPCs of ``batch_size`` commands (each command is
  still replicated as its own Raft entry, pipelined inside the leader), at most
  ``in_flight`` batches outstanding.

``CortexBench`` wraps a ``cortex.dev.cluster.DevCluster`` with what
``measure.failover_time`` and the idle measurement need: ``follower_endpoint()``,
``leader_endpoint()``, ``kill_leader()``, ``pids()``, plus ``restart_killed()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import uuid

from bench import measure
from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex.client import Client, CortexError
from cortex.dev import cluster as devcluster

DEFAULT_TIMEOUT = 10.0  # seconds, per RPC (the leader's own proposal timeout is 8 s)


def _put_command(key: str, value: bytes) -> pb.Command:
    return pb.Command(
        type="kv.put",
        args_json=json.dumps({"key": key, "value": bytes(value).hex()}).encode(),
        idempotency_key=uuid.uuid4().hex,  # as cortex.client.Client does for every write
    )


class CortexClient:
    """Bench client bound to one Cortex node (a follower forwards writes to the leader)."""

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT):
        self.address = address
        self.timeout = float(timeout)
        self._client = Client(address, timeout=self.timeout)
        self._stub = self._client.stub

    # -- basic ops -------------------------------------------------------- #
    def put(self, key: str, value: bytes) -> None:
        self._client.put(key, bytes(value).hex())

    def get(self, key: str, linearizable: bool = True) -> bytes | None:
        got = self._client.get(key, level="linearizable" if linearizable else "stale")
        return None if got is None else bytes.fromhex(got)

    def status(self) -> pb.StatusResponse:
        return self._client.status()

    # -- pipelining: unary puts, bounded window (same pattern as etcd's) --- #
    def put_many_pipelined(self, items, concurrency: int = 64, timeout: float | None = None) -> int:
        """One unary Write per (key, value), at most `concurrency` in flight (gRPC futures over one
        channel), exactly etcd's pattern. Returns the number acknowledged; raises the first error."""
        per_call = self.timeout if timeout is None else timeout
        return measure.windowed(
            items, lambda kv: self._stub.Write.future(pb.WriteRequest(command=_put_command(*kv)), timeout=per_call),
            concurrency, slot_wait=per_call + 5.0)

    # -- pipelining: WriteBatch RPCs ---------------------------------------- #
    def put_many_batched(self, items, batch_size: int = 200, in_flight: int = 4,
                         timeout: float | None = None) -> int:
        """(key, value) pairs sent as WriteBatch RPCs of `batch_size` commands, at most `in_flight`
        batches outstanding. Returns the number acknowledged; raises on a failed RPC or command."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        per_call = self.timeout if timeout is None else timeout
        items = list(items)
        chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]

        def count(resp) -> int:
            failed = [e for e in resp.errors if e]
            if failed:
                raise RuntimeError(f"{len(failed)}/{len(resp.errors)} batched puts failed: {failed[0]}")
            return len(resp.errors)

        return measure.windowed(
            chunks, lambda chunk: self._stub.WriteBatch.future(
                pb.WriteBatchRequest(commands=[_put_command(k, v) for k, v in chunk]), timeout=per_call),
            in_flight, slot_wait=per_call + 5.0, count=count)

    def batched(self, batch_size: int = 200, in_flight: int = 4) -> _Batched:
        """A view of this client whose put_many_pipelined uses WriteBatch RPCs
        (so measure.pipelined_throughput can drive it unchanged)."""
        return _Batched(self, batch_size, in_flight)

    # -- lifecycle -------------------------------------------------------- #
    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"CortexClient({self.address!r})"


class _Batched:
    def __init__(self, client: CortexClient, batch_size: int, in_flight: int):
        self.client, self.batch_size, self.in_flight = client, batch_size, in_flight

    def put(self, key, value):
        return self.client.put(key, value)

    def get(self, key, linearizable=True):
        return self.client.get(key, linearizable)

    def put_many_pipelined(self, items, concurrency: int = 0) -> int:
        # `concurrency` (individual puts in flight) is what the unary path uses; here the window is
        # in_flight batches of batch_size puts each.
        return self.client.put_many_batched(items, self.batch_size, self.in_flight)


class CortexBench:
    """A running Cortex dev cluster, seen the way the benchmark needs it."""

    def __init__(self, cluster: devcluster.DevCluster, status_timeout: float = 1.0):
        self.dc = cluster
        self.status_timeout = status_timeout
        self._status_clients: dict[str, Client] = {}
        self._leader_hint: str | None = None
        self.killed: list[devcluster.DevNode] = []

    # -- lookup ----------------------------------------------------------- #
    def _status_client(self, node: devcluster.DevNode) -> Client:
        c = self._status_clients.get(node.id)
        if c is None:
            c = self._status_clients[node.id] = Client(node.grpc_address, timeout=self.status_timeout)
        return c

    def alive_servers(self) -> list[devcluster.DevNode]:
        return [n for n in self.dc.servers if devcluster.alive(n.pid)]

    def _is_leader(self, node: devcluster.DevNode) -> bool:
        try:
            return self._status_client(node).status().state == "leader"
        except CortexError:
            return False

    def leader(self, timeout: float = 15.0) -> devcluster.DevNode:
        """The live server whose status says state == "leader" (bounded poll)."""
        deadline = time.monotonic() + timeout
        while True:
            servers = self.alive_servers()
            # Ask the last known leader first: one status RPC in the common case.
            servers.sort(key=lambda n: n.id != self._leader_hint)
            for node in servers:
                if self._is_leader(node):
                    self._leader_hint = node.id
                    return node
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no Cortex leader within {timeout:.1f}s; logs under {self.dc.dir}")
            time.sleep(0.05)

    def follower(self) -> devcluster.DevNode:
        leader = self.leader()
        for node in self.alive_servers():
            if node.id != leader.id:
                return node
        raise RuntimeError("no live Cortex follower")

    def leader_endpoint(self) -> str:
        return self.leader().grpc_address

    def follower_endpoint(self) -> str:
        return self.follower().grpc_address

    def pids(self) -> list[int]:
        return [n.pid for n in self.alive_servers()]

    # -- faults ----------------------------------------------------------- #
    def kill_leader(self) -> str:
        """SIGKILL the current leader (its whole process group) and reap it; returns its node id."""
        node = self.leader()
        # Not devcluster.stop_node: its 50 ms reap poll would land inside the failover clock.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while devcluster.alive(node.pid) and time.monotonic() < deadline:
            time.sleep(0.002)
        if devcluster.alive(node.pid):
            raise RuntimeError(f"{node.id} (pid {node.pid}) survived SIGKILL for 5 s")
        c = self._status_clients.pop(node.id, None)
        if c is not None:
            c.close()
        self._leader_hint = None
        self.killed.append(node)
        return node.id

    def restart_killed(self, timeout: float = 60.0, progress=lambda s: None) -> None:
        """Start the killed nodes again and wait (bounded) until the cluster is healthy."""
        while self.killed:
            node = self.killed.pop()
            devcluster.start_node(node)
            self.dc.save()  # so devcluster.down() finds the new pid
        devcluster.wait_healthy(self.dc, time.monotonic() + timeout, progress)

    def close(self) -> None:
        for c in self._status_clients.values():
            with contextlib.suppress(Exception):
                c.close()
        self._status_clients.clear()

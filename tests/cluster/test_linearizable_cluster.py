"""Recorded histories from a real cluster, checked for linearizability (Wing–Gong–Lowe checker).

This records a concurrent history under kill -9 / restart of servers and requires it to be linearizable.
The converse, the checker catching a real stale read, needs a follower cut off from Raft while its clients
still reach it: that is a network partition, so it lives in test_partition.py.
"""

from __future__ import annotations

import random
import threading
import time

import grpc

from cortex.client import Client, CortexError
from tests.support.linearizability import HistoryRecorder, check

MAYBE_APPLIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL)


def test_history_under_leader_kills_is_linearizable(make_cluster):
    cluster = make_cluster(3, workers=1)
    history = HistoryRecorder()
    keys = [f"lin-{i}" for i in range(4)]
    stop = threading.Event()
    counter = iter(range(10**9))
    lock = threading.Lock()

    def client_loop(client_id: int, node_ids: list[str]):
        rng = random.Random(client_id)
        clients = {n: Client(cluster.node(n).grpc_address, timeout=2) for n in node_ids}
        try:
            while not stop.is_set():
                c = clients[rng.choice(node_ids)]
                key = rng.choice(keys)
                op = rng.random()
                if op < 0.45:
                    with lock:
                        value = f"v{next(counter)}"
                    h = history.invoke(client_id, "write", key, value=value)
                    try:
                        c.put(key, value, idempotency_key=f"w-{value}", retry_for=2)
                        history.ok(h)
                    except CortexError as exc:
                        (history.info if exc.code in MAYBE_APPLIED else history.fail)(h)
                elif op < 0.6:
                    with lock:
                        value = f"v{next(counter)}"
                    expected = rng.choice([None, f"v{rng.randrange(int(value[1:]) + 1)}"])
                    h = history.invoke(client_id, "cas", key, expected=expected, new=value)
                    try:
                        result = c.write("kv.cas", {"key": key, "expected": expected, "value": value},
                                         idempotency_key=f"c-{value}", retry_for=2)
                        history.ok(h, result["succeeded"])
                    except CortexError as exc:
                        (history.info if exc.code in MAYBE_APPLIED else history.fail)(h)
                else:
                    h = history.invoke(client_id, "read", key)
                    try:
                        history.ok(h, c.get(key, level="linearizable"))
                    except CortexError:
                        history.fail(h)  # a read that failed changed nothing
        finally:
            for c in clients.values():
                c.close()

    def nemesis():
        rng = random.Random(99)
        while not stop.is_set():
            time.sleep(1.5)
            victim = cluster.leader(timeout=10) if rng.random() < 0.7 else rng.choice(["n1", "n2", "n3"])
            cluster.kill(victim)
            time.sleep(1.0)
            cluster.start(victim)

    targets = [["n1", "n2"], ["n2", "n3"], ["n3", "w1"], ["w1", "n1"]]
    threads = [threading.Thread(target=client_loop, args=(i, t)) for i, t in enumerate(targets)]
    chaos = threading.Thread(target=nemesis)
    for t in threads:
        t.start()
    chaos.start()
    time.sleep(10)
    stop.set()
    chaos.join(30)
    for t in threads:
        t.join(30)
    ops = history.operations()
    ok_ops = [o for o in ops if o.status == "ok"]
    print(f"history: {len(ops)} operations, {len(ok_ops)} ok, "
          f"{sum(o.status == 'info' for o in ops)} unknown outcome")
    assert len(ok_ops) > 50
    result = check(ops, max_steps=20_000_000)  # a budget: a pathological history fails loudly, never hangs
    assert result.ok, result
    cluster.wait_healthy(timeout=30)
    assert len(set(cluster.wait_converged(timeout=30).values())) == 1

"""Recorded histories from a real cluster, checked for linearizability (Wing–Gong–Lowe checker).

This records a concurrent history under kill -9 / restart of servers, SIGSTOP / SIGCONT of a server (a paused
leader resumes with its followers' answers to its old heartbeats queued on its sockets) and, as root, a server
cut off by nftables, and requires it to be linearizable. The reads are linearizable reads sent to every server
and a worker: a leader's are confirmed by a read round (raft/readindex.py), a follower's are served by its own
replica at the read index it asked the leader for.
The converse, the checker catching a real stale read, needs a follower cut off from Raft while its clients
still reach it: that is a network partition, so it lives in test_partition.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time

import grpc

from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex.client import Client, CortexError
from cortex.dev import portcut
from cortex.dev.portcut import PortCut
from tests.support.linearizability import HistoryRecorder, check

MAYBE_APPLIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL)


def test_history_under_leader_kills_is_linearizable(make_cluster):
    cluster = make_cluster(3, workers=1)
    history = HistoryRecorder()
    keys = [f"lin-{i}" for i in range(4)]
    stop = threading.Event()
    counter = iter(range(10**9))
    lock = threading.Lock()
    served_by: list[tuple[str, str]] = []  # (node asked, node that served the read)
    faults: list[str] = []

    def client_loop(client_id: int, node_ids: list[str]):
        rng = random.Random(client_id)
        clients = {n: Client(cluster.node(n).grpc_address, timeout=2) for n in node_ids}
        try:
            while not stop.is_set():
                asked = rng.choice(node_ids)
                c = clients[asked]
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
                        answer = c._call(c.stub.Read, pb.ReadRequest(
                            query="kv.get", args_json=json.dumps({"key": key}).encode(), level=pb.LINEARIZABLE))
                        row = json.loads(answer.result_json)
                        history.ok(h, row["value"] if row else None)
                        with lock:
                            served_by.append((asked, answer.served_by))
                    except CortexError:
                        history.fail(h)  # a read that failed changed nothing
        finally:
            for c in clients.values():
                c.close()

    def nemesis():
        rng = random.Random(99)
        faults_here = ["kill", "pause"] + ([] if portcut.available() else ["cut"])
        while not stop.is_set():
            time.sleep(1.5)
            victim = cluster.leader(timeout=10) if rng.random() < 0.7 else rng.choice(["n1", "n2", "n3"])
            fault = faults_here[len(faults) % len(faults_here)]  # each kind in turn
            faults.append(f"{fault} {victim}")
            if fault == "kill":
                cluster.kill(victim)
                time.sleep(1.0)
                cluster.start(victim)
            elif fault == "pause":  # past the election timeout: the others elect while it sleeps
                os.killpg(cluster.node(victim).pid, signal.SIGSTOP)
                try:
                    time.sleep(1.5)
                finally:
                    os.killpg(cluster.node(victim).pid, signal.SIGCONT)
            else:
                with PortCut(int(cluster.node(victim).raft_address.rsplit(":", 1)[1]), name="lin"):
                    time.sleep(1.5)

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
    at_servers = [(a, s) for a, s in served_by if not a.startswith("w")]
    ok_ops = [o for o in ops if o.status == "ok"]
    print(f"history: {len(ops)} operations, {len(ok_ops)} ok, "
          f"{sum(o.status == 'info' for o in ops)} unknown outcome; faults: {', '.join(faults)}; "
          f"reads at a server served by it: {sum(a == s for a, s in at_servers)} of {len(at_servers)}")
    assert len(ok_ops) > 50
    # A server asked for a linearizable read serves it from its own replica (the leader's read index), where
    # a barrier read was always served by the leader: two in three of the servers asked were followers.
    assert sum(a == s for a, s in at_servers) > 0.8 * len(at_servers), f"reads (asked, served by): {at_servers}"
    result = check(ops, max_steps=20_000_000)  # a budget: a pathological history fails loudly, never hangs
    assert result.ok, result
    cluster.wait_healthy(timeout=30)
    assert len(set(cluster.wait_converged(timeout=30).values())) == 1

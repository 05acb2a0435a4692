"""The task engine under failures, on a real 3-server + 2-worker cluster: leader kills mid-workflow and during a
1,000-task run, kill -9 of the worker running a task. Every task must be recorded exactly once.

The tests share one cluster and run in file order; each restarts what it killed.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import Counter

import pytest

from cortex.client import CortexError
from cortex.dev import cluster as devcluster
from tests.support.cluster import Cluster, free_base_port
from tests.support.wait import wait_for_value, wait_until


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chaos")
    try:
        dc = devcluster.up(directory, 3, 2, free_base_port(), timeout=60)
    except BaseException:
        devcluster.down(directory)
        raise
    cl = Cluster(dc)
    with cl.client("w1") as c, contextlib.suppress(AssertionError):  # the tests see any node still silent
        wait_until(lambda: all(n["reported_at"] for n in c.read("task.nodes", {})), 30, "every node's report",
                   interval=0.2)
    yield cl
    devcluster.down(directory)


def read(cl: Cluster, query: str, args: dict, via: str = "w1"):
    """A read that rides out an election."""
    def answer():
        with cl.client(via, timeout=5) as c:
            return c.read(query, args, level="leader")

    return wait_for_value(answer, lambda _: True, 30, f"{query} through {via}", interval=0.2, ignore=(CortexError,))


def kill_leader(cl: Cluster) -> str:
    leader = cl.leader()
    cl.kill(leader)
    cl.leader(exclude=(leader,))
    return leader


def exactly_once(attempts: list[dict], task_ids: list[str]) -> None:
    succeeded = Counter(a["task_id"] for a in attempts if a["outcome"] == "succeeded")
    assert set(succeeded) == set(task_ids), f"missing: {sorted(set(task_ids) - set(succeeded))[:5]}"
    assert max(succeeded.values()) == 1, [t for t, n in succeeded.items() if n > 1][:5]
    # an attempt number is never used twice for one task
    pairs = Counter((a["task_id"], a["attempt"]) for a in attempts)
    assert max(pairs.values()) == 1


def test_leader_failover_mid_workflow_finishes_with_every_task_recorded_once(cluster):
    spec = {"name": "failover", "steps": [
        {"name": "first", "task": {"kind": "noop"}},
        {"name": "fan", "depends_on": ["first"], "for_each": [1, 2, 3, 4],
         "task": {"kind": "shell", "spec": {"command": "sleep 1.5; echo '{\"n\": {{item}}}' > $CORTEX_RESULT"}}},
        {"name": "last", "depends_on": ["fan"], "when": "size(steps.fan.results) == 4",
         "task": {"kind": "noop", "spec": {"sleep": 0.5}}},
    ]}
    with cluster.client("w2") as c:
        wf_id = c.write("workflow.submit", {"workflow": spec}, retry_for=20)["workflow_id"]
    wait_until(lambda: any(s["name"] == "fan" and s["state"] == "running"
                           for s in read(cluster, "workflow.get", {"id": wf_id})["steps"]), 30,
               "the fan-out to start", interval=0.1)
    killed = kill_leader(cluster)
    cluster.start(killed)
    wf = wait_for_value(lambda: read(cluster, "workflow.get", {"id": wf_id}), lambda w: w["state"] != "running", 90,
                        "the workflow to end", interval=0.3)
    assert wf["state"] == "succeeded", wf
    steps = {s["name"]: s for s in wf["steps"]}
    assert [len(steps[n]["tasks"]) for n in ("first", "fan", "last")] == [1, 4, 1]
    assert sorted(r["n"] for r in steps["fan"]["results"]) == [1, 2, 3, 4]
    task_ids = [t["id"] for s in wf["steps"] for t in s["tasks"]]
    attempts = [a for a in read(cluster, "task.attempts", {}) if a["task_id"] in task_ids]
    exactly_once(attempts, task_ids)
    cluster.wait_healthy()
    assert len(set(cluster.wait_converged().values())) == 1


def test_a_thousand_tasks_under_leader_kills_lose_and_duplicate_nothing(cluster):
    group = "chaos" + uuid.uuid4().hex[:8]
    total, batch = 1000, 50
    stop = threading.Event()
    kills: list[str] = []

    def killer():
        for _ in range(2):
            if stop.wait(2.0):
                return
            killed = kill_leader(cluster)
            kills.append(killed)
            cluster.start(killed)

    thread = threading.Thread(target=killer)
    thread.start()
    started = time.monotonic()
    try:
        with cluster.client("w1", timeout=5) as c:
            for i in range(0, total, batch):
                tasks = [{"kind": "noop", "name": f"{group}-{j}"} for j in range(i, i + batch)]
                # the same key on every retry: a submit that was applied before its answer was lost counts once
                c.write("task.submit", {"tasks": tasks, "group": group}, idempotency_key=f"{group}-{i}",
                        retry_for=60)
                time.sleep(0.05)
    finally:
        thread.join()
        stop.set()
    rows = wait_for_value(lambda: read(cluster, "task.list", {"group": group, "limit": 5000}),
                          lambda rs: len(rs) == total and all(r["state"] == "succeeded" for r in rs), 120,
                          f"all {total} tasks succeeded", interval=0.5)
    took = time.monotonic() - started
    assert len(kills) == 2
    assert sorted(r["name"] for r in rows) == sorted(f"{group}-{j}" for j in range(total))  # none lost, none twice
    exactly_once(read(cluster, "task.attempts", {"group": group}), [r["id"] for r in rows])
    print(f"1000 tasks with 2 leader kills in {took:.1f}s")
    cluster.wait_healthy()


def test_kill_9_of_the_worker_running_a_task_requeues_it_elsewhere_recorded_once(cluster):
    with cluster.client("n1") as c:
        (task_id,) = c.write("task.submit", {"tasks": [{
            "kind": "shell", "spec": {"command": "sleep 3; echo finished on $CORTEX_NODE"},
            "placement": {"nodes": ["w1", "w2"]}}]}, retry_for=20)["task_ids"]
    task = wait_for_value(lambda: read(cluster, "task.get", {"id": task_id}, via="n1"),
                          lambda t: t["state"] == "running", 30, "the task to run")
    victim = task["node"]
    survivor = "w2" if victim == "w1" else "w1"
    cluster.kill(victim)
    # offline after 10 s of silence, then 3 s of work elsewhere
    task = wait_for_value(lambda: read(cluster, "task.get", {"id": task_id}, via="n1"),
                          lambda t: t["state"] == "succeeded", 60, "the task to succeed elsewhere", interval=0.2)
    assert task["node"] == survivor
    assert [(a["node"], a["outcome"]) for a in task["attempts"]] == [(victim, "lost"), (survivor, "succeeded")]
    with cluster.client("n1") as c:
        page = c.read("task.output", {"id": task_id})
    assert [ch["data"].strip() for ch in page["chunks"]] == [f"finished on {survivor}"]
    cluster.start(victim)
    cluster.wait_healthy()
    # the restarted worker has nothing to say about the old attempt: the record stays as it was
    time.sleep(1.0)
    again = read(cluster, "task.get", {"id": task_id}, via="n1")
    assert [(a["node"], a["outcome"]) for a in again["attempts"]] == [(victim, "lost"), (survivor, "succeeded")]


def test_a_worker_stopping_cleanly_hands_its_running_task_back_at_once(cluster):
    import signal

    with cluster.client("n1") as c:
        (task_id,) = c.write("task.submit", {"tasks": [{
            "kind": "shell", "spec": {"command": "sleep 2; echo done"},
            "placement": {"nodes": ["w1", "w2"]}}]}, retry_for=20)["task_ids"]
    task = wait_for_value(lambda: read(cluster, "task.get", {"id": task_id}, via="n1"),
                          lambda t: t["state"] == "running", 30, "the task to run")
    victim = task["node"]
    stopped_at = time.monotonic()
    cluster.kill(victim, signal.SIGTERM)
    task = wait_for_value(lambda: read(cluster, "task.get", {"id": task_id}, via="n1"),
                          lambda t: t["state"] == "succeeded", 30 - (time.monotonic() - stopped_at),
                          "the handed-back task to succeed", interval=0.1)
    # re-queued by the stopping node's own report, well before it could have been declared offline (10 s)
    assert time.monotonic() - stopped_at < 9
    assert [a["outcome"] for a in task["attempts"]] == ["lost", "succeeded"]
    assert "shut down during the attempt" in task["attempts"][0]["error"]
    cluster.start(victim)
    cluster.wait_healthy()

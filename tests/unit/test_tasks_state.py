"""The task and workflow state domains applied directly to a StateStore: the deterministic core."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from cortex.core.commands import CommandError, Envelope, validate
from cortex.core.state import StateStore
from cortex.kube.records import encode
from cortex.plugins.host import installed_placements
from cortex.tasks import celeval, scheduler, workflow
from cortex.tasks.lifecycle import OUTPUT_CAP
from cortex.tasks.spec import RetryPolicy

_ids = itertools.count(1)


class Store:
    """A StateStore plus a little log: apply(type, args, term=, ts=) stamps and applies like the leader."""

    def __init__(self, path: Path):
        self.store = StateStore(path)
        self.index = 0
        self.term = 1  # the current leader's term: commands are stamped with it

    def apply(self, command_type: str, args: dict, term: int | None = None, ts: float = 1000.0,
              idem: str = "") -> dict:
        self.index += 1
        self.term = max(self.term, term or 0)
        term = self.term
        n = next(_ids)
        env = Envelope(type=command_type, args=validate(command_type, args), id=f"{n:032x}"[::-1], ts=ts, term=term,
                       idem=idem or f"k{n}")
        return self.store.apply(self.index, env.encode())

    def q(self, name: str, args: dict | None = None):
        return self.store.query(name, args or {})


@pytest.fixture
def s(tmp_path: Path) -> Store:
    st = Store(tmp_path / "state.db")
    for node, role in (("n1", "server"), ("w1", "worker"), ("w2", "worker")):
        st.apply("node.register", {"node_id": node, "role": role, "grpc_address": f"{node}:1"})
        st.apply("task.node_report", {"node_id": node, "capacity": {"cpus": 4, "memory_mb": 8000, "slots": 8},
                                      "kinds": ["shell", "noop"]})
    return st


def submit(s: Store, **task) -> str:
    doc = {"kind": "shell", "spec": {"command": "true"}, **task}
    return s.apply("task.submit", {"tasks": [doc]})["task_ids"][0]


def assign(s: Store, task_id: str, node: str = "w1", term: int = 1, ts: float = 1000.0) -> int:
    attempt = s.q("task.get", {"id": task_id})["attempt"] + 1
    s.apply("task.assign", {"assignments": [{"task_id": task_id, "node_id": node, "attempt": attempt}]}, term=term,
            ts=ts)
    return attempt


def report(s: Store, task_id: str, attempt: int, term: int = 1, node: str = "w1", ts: float = 1001.0, **kw) -> dict:
    r = {"task_id": task_id, "attempt": attempt, "term": term, "exit_code": 0, "error": "", "failure": "",
         "result": {}, **kw}
    return s.apply("task.report", {"node_id": node, "reports": [r]}, ts=ts)


def test_a_task_runs_through_its_states_and_the_result_is_recorded_once(s):
    tid = submit(s)
    assert s.q("task.get", {"id": tid})["state"] == "queued"
    attempt = assign(s, tid)
    assert s.apply("task.start", {"node_id": "w1", "starts": [{"task_id": tid, "attempt": 1, "term": 1}]})[
        "started"] == [tid]
    assert report(s, tid, attempt, result={"value": 42})["recorded"] == [{"task_id": tid, "state": "succeeded"}]
    again = report(s, tid, attempt, exit_code=1, error="late duplicate")
    assert again["recorded"] == [] and again["rejected"][0]["state"] == "succeeded"
    task = s.q("task.get", {"id": tid})
    assert (task["state"], task["exit_code"], task["result"]) == ("succeeded", 0, {"value": 42})
    assert [a["outcome"] for a in task["attempts"]] == ["succeeded"]


def test_stale_attempts_terms_and_nodes_are_rejected(s):
    tid = submit(s, retry={"max_attempts": 5, "backoff": 0})
    first = assign(s, tid, "w1", term=1)
    s.apply("task.requeue", {"requeues": [{"task_id": tid, "attempt": first, "reason": "w1 lost"}]}, term=2)
    second = assign(s, tid, "w2", term=2)
    # the presumed-lost node comes back and reports its old attempt: rejected
    assert report(s, tid, first, term=1, node="w1")["rejected"][0]["task_id"] == tid
    # the right attempt with the wrong term, or from the wrong node: rejected
    assert report(s, tid, second, term=1, node="w2")["recorded"] == []
    assert report(s, tid, second, term=2, node="w1")["recorded"] == []
    assert report(s, tid, second, term=2, node="w2")["recorded"][0]["state"] == "succeeded"
    outcomes = [(a["attempt"], a["node"], a["outcome"]) for a in s.q("task.get", {"id": tid})["attempts"]]
    assert outcomes == [(1, "w1", "lost"), (2, "w2", "succeeded")]


def test_a_second_assignment_of_the_same_attempt_changes_nothing(s):
    tid = submit(s)
    s.apply("task.assign", {"assignments": [{"task_id": tid, "node_id": "w1", "attempt": 1}]}, term=1)
    dup = s.apply("task.assign", {"assignments": [{"task_id": tid, "node_id": "w2", "attempt": 1}]}, term=2)
    assert dup["skipped"] == [tid]
    assert s.q("task.get", {"id": tid})["node"] == "w1"


def test_retries_back_off_exponentially_then_the_task_is_dead_lettered_and_replayable(s):
    tid = submit(s, retry={"max_attempts": 3, "backoff": 2, "jitter": 0})
    ts = 1000.0
    for expected_delay in (2, 4):
        attempt = assign(s, tid, ts=ts)
        report(s, tid, attempt, exit_code=1, error="exited with code 1", failure="exit", ts=ts)
        task = s.q("task.get", {"id": tid})
        assert task["state"] == "queued" and task["not_before"] == ts + expected_delay
        ts += expected_delay
    attempt = assign(s, tid, ts=ts)
    report(s, tid, attempt, exit_code=1, error="exited with code 1", failure="exit", ts=ts)
    task = s.q("task.get", {"id": tid})
    assert (task["state"], task["dlq"], task["failures"]) == ("failed", True, 3)
    assert [t["id"] for t in s.q("task.list", {"dlq": True})] == [tid]
    assert s.apply("task.retry", {"task_ids": [tid]})["requeued"] == [tid]
    task = s.q("task.get", {"id": tid})
    assert (task["state"], task["dlq"], task["failures"]) == ("queued", False, 0)


def test_failures_outside_the_retry_policy_go_straight_to_the_dlq(s):
    tid = submit(s, retry={"max_attempts": 5, "on": ["timeout"]})
    report(s, tid, assign(s, tid), exit_code=2, error="exited with code 2", failure="exit")
    assert s.q("task.get", {"id": tid})["state"] == "failed"
    tid2 = submit(s, retry={"max_attempts": 5})
    report(s, tid2, assign(s, tid2), exit_code=None, error="permission denied", failure="error", retryable=False)
    assert s.q("task.get", {"id": tid2})["dlq"] is True


def test_backoff_jitter_is_deterministic_and_bounded():
    policy = RetryPolicy(max_attempts=10, backoff=1, backoff_max=30, jitter=0.5)
    delays = [policy.delay("t1", n) for n in range(1, 8)]
    assert delays == [policy.delay("t1", n) for n in range(1, 8)]
    for n, d in enumerate(delays, start=1):
        base = min(30, 2 ** (n - 1))
        assert base * 0.5 <= d <= base
    assert policy.delay("t1", 3) != policy.delay("t2", 3)


def test_cancel_queued_and_running_tasks(s):
    queued = submit(s)
    assert s.apply("task.cancel", {"task_ids": [queued]})["states"] == {queued: "cancelled"}
    running = submit(s)
    attempt = assign(s, running)
    s.apply("task.start", {"node_id": "w1", "starts": [{"task_id": running, "attempt": attempt, "term": 1}]})
    assert s.apply("task.cancel", {"task_ids": [running]})["states"] == {running: "cancelling"}
    assert s.q("task.assigned", {"node_id": "w1"})[0]["state"] == "cancelling"
    report(s, running, attempt, exit_code=None, error="cancelled", failure="cancelled")
    assert s.q("task.get", {"id": running})["state"] == "cancelled"
    assert "error" in s.apply("task.cancel", {"task_ids": ["nope"]})


def test_output_is_capped_per_attempt_with_one_marker(s):
    tid = submit(s)
    attempt = assign(s, tid)
    chunk = "x" * 60_000
    for _ in range(6):  # 360 kB offered, OUTPUT_CAP kept
        s.apply("task.output", {"node_id": "w1", "chunks": [
            {"task_id": tid, "attempt": attempt, "term": 1, "stream": "stdout", "data": chunk}]})
    out = s.q("task.output", {"id": tid})["chunks"]
    kept = sum(len(c["data"]) for c in out if c["stream"] == "stdout")
    markers = [c for c in out if c["stream"] == "marker"]
    assert kept == OUTPUT_CAP and len(markers) == 1 and "truncated" in markers[0]["data"]
    assert s.q("task.get", {"id": tid})["output_dropped"] == 6 * 60_000 - OUTPUT_CAP
    # output of a stale attempt is dropped
    s.apply("task.output", {"node_id": "w1", "chunks": [
        {"task_id": tid, "attempt": attempt + 1, "term": 1, "stream": "stdout", "data": "stale"}]})
    assert len(s.q("task.output", {"id": tid})["chunks"]) == len(out)


def test_drain_blocks_assignment_and_marks_tasks_lost_after_the_deadline(s):
    tid = submit(s)
    attempt = assign(s, tid, "w1")
    assert "error" in s.apply("task.drain", {"node_id": "ghost", "deadline": 60})
    s.apply("task.drain", {"node_id": "w1", "deadline": 60}, ts=1000.0)
    other = submit(s)
    assert s.apply("task.assign", {"assignments": [{"task_id": other, "node_id": "w1", "attempt": 1}]})[
        "skipped"] == [other]
    assert s.q("task.sched", {"now": 1059.0})["lost"] == []
    lost = s.q("task.sched", {"now": 1061.0})["lost"]
    assert lost == [{"task_id": tid, "attempt": attempt, "node": "w1", "state": "assigned"}]
    s.apply("task.undrain", {"node_id": "w1"})
    assert s.q("task.sched", {"now": 1061.0})["lost"] == []


def test_bad_task_specs_are_refused_with_what_to_fix():
    cases = [
        ({"kind": "nope"}, "unknown task kind 'nope'"),
        ({"kind": "shell", "spec": {}}, "command must be a shell string"),
        ({"kind": "shell", "spec": {"command": "x", "sudo": True}}, "unknown field"),
        ({"kind": "shell", "spec": {"command": "x"}, "retry": {"max_attempts": 0}}, "between 1 and 100"),
        ({"kind": "shell", "spec": {"command": "x"}, "placement": {"nodes": ["Bad Node"]}}, "list of node ids"),
        ({"kind": "shell", "spec": {"command": "x"}, "timeout": -1}, "task.timeout"),
        ({"kind": "shell", "spec": {"command": "x"}, "colour": "red"}, "unknown field"),
    ]
    for doc, message in cases:
        with pytest.raises(CommandError, match=message):
            validate("task.submit", {"tasks": [doc]})
    with pytest.raises(CommandError, match="non-empty list"):
        validate("task.submit", {"tasks": []})


def test_scheduler_filters_ranks_and_respects_priority():
    nodes = [
        {"id": "a", "role": "worker", "liveness": "alive", "reported_at": 1, "kinds": ["shell"], "labels": {},
         "capacity": {"cpus": 4, "memory_mb": 4000, "slots": 2}, "running": {"tasks": 0}},
        {"id": "b", "role": "worker", "liveness": "alive", "reported_at": 1, "kinds": ["shell"], "labels": {"gpu": "y"},
         "capacity": {"cpus": 8, "memory_mb": 16000, "slots": 4, "gpus": 1}, "running": {"tasks": 0},
         "benchmark": {"flops_multi": 1e10}},
        {"id": "c", "role": "worker", "liveness": "offline", "reported_at": 1, "kinds": ["shell"], "labels": {},
         "capacity": {"cpus": 64, "slots": 64}, "running": {}},
        {"id": "d", "role": "worker", "liveness": "alive", "reported_at": 1, "kinds": ["shell"], "labels": {},
         "busy": True, "capacity": {"cpus": 64, "slots": 64}, "running": {}},
    ]

    def task(tid, prio=0, **placement):
        return {"id": tid, "kind": "shell", "priority": prio, "attempt": 0,
                "placement": {"avoid_busy": True, "strategy": "spread", **placement}}

    out = scheduler.schedule([task("gpu", gpus=1), task("big", memory_mb=10000), task("x"), task("y")], nodes)
    placed = {a.task_id: a.node_id for a in out}
    assert placed["gpu"] == "b" and placed["big"] == "b"
    assert "c" not in placed.values() and "d" not in placed.values()  # offline, busy
    assert scheduler.explain(task("z", labels={"gpu": "n"}), nodes)["b"] == "label gpu!=n"
    # slots run out: 6 slots in total on a and b, the highest-priority tasks get them
    queue = [task(f"t{i}") for i in range(10)]
    assert len(scheduler.schedule(queue, nodes)) == 6
    assert scheduler.schedule([task("pinned", nodes=["d"], avoid_busy=False)], nodes)[0].node_id == "d"


def test_workflow_spec_checks_cycles_dependencies_and_cel():
    task = {"kind": "noop"}
    with pytest.raises(CommandError, match="cycle: a -> b -> a"):
        workflow.validate_workflow({"name": "w", "steps": [{"name": "a", "task": task, "depends_on": ["b"]},
                                                           {"name": "b", "task": task, "depends_on": ["a"]}]})
    with pytest.raises(CommandError, match="unknown step"):
        workflow.validate_workflow({"name": "w", "steps": [{"name": "a", "task": task, "depends_on": ["zz"]}]})
    with pytest.raises(CommandError, match="CEL does not compile"):
        workflow.validate_workflow({"name": "w", "steps": [{"name": "a", "task": task, "when": "1 +"}]})
    with pytest.raises(CommandError, match="used twice"):
        workflow.validate_workflow({"name": "w", "steps": [{"name": "a", "task": task}, {"name": "a", "task": task}]})


def test_workflow_runs_fans_out_and_in_and_versions_its_definition(s):
    spec = {"name": "fan", "steps": [
        {"name": "list", "task": {"kind": "noop"}},
        {"name": "work", "depends_on": ["list"], "for_each": "steps.list.result.items",
         "task": {"kind": "shell", "spec": {"command": "echo {{item}}"}}},
        {"name": "sum", "depends_on": ["work"], "trigger": "all_done", "when": "steps.work.succeeded >= 1",
         "task": {"kind": "shell", "spec": {"command": "cat $CORTEX_INPUTS"}}},
        {"name": "on_fail", "depends_on": ["work"], "trigger": "one_failed", "task": {"kind": "noop"}},
    ]}
    first = s.apply("workflow.submit", {"workflow": spec})
    assert first["version"] == 1
    assert s.apply("workflow.submit", {"workflow": spec})["version"] == 1  # same definition, same version
    spec2 = {**spec, "params": {"changed": True}}
    assert s.apply("workflow.submit", {"workflow": spec2})["version"] == 2
    wf_id = first["workflow_id"]

    def advance():
        for wf in s.q("workflow.pending"):
            if wf["id"] == wf_id:
                s.apply("workflow.advance", {"workflow_id": wf_id,
                                             "decisions": workflow.decide(wf, celeval.evaluate_here)})

    def finish_all(step, results):
        for t, value in zip(s.q("task.list", {"workflow": wf_id, "order": "asc"}), results):
            if t["step"] == step:
                report(s, t["id"], assign(s, t["id"]), result={"value": value})

    advance()
    finish_all("list", [{"items": ["a", "b", "c"]}])
    advance()
    work = [t for t in s.q("task.list", {"workflow": wf_id, "order": "asc"}) if t["step"] == "work"]
    assert sorted(t["spec"]["command"] for t in work) == ["echo a", "echo b", "echo c"]
    for t, code in zip(work, (0, 0, 1)):
        report(s, t["id"], assign(s, t["id"]), exit_code=code, failure="" if code == 0 else "exit",
               error="" if code == 0 else "exited with code 1")
    advance()
    got = s.q("workflow.get", {"id": wf_id})
    steps = {st["name"]: st for st in got["steps"]}
    assert steps["work"]["state"] == "failed" and steps["work"]["succeeded"] == 2
    assert steps["sum"]["state"] == "running" and steps["on_fail"]["state"] == "running"
    fan_in = [t for t in s.q("task.list", {"workflow": wf_id}) if t["step"] == "sum"][0]
    assert '"exit_codes": [0, 0, 1]' in fan_in["spec"]["env"]["CORTEX_INPUTS"]
    for t in s.q("task.list", {"workflow": wf_id}):
        if t["state"] == "queued":
            report(s, t["id"], assign(s, t["id"]))
    assert s.q("workflow.get", {"id": wf_id})["state"] == "failed"  # a step failed, even if handled


def test_cel_that_loops_or_explodes_is_stopped_by_the_evaluator():
    ev = celeval.Evaluator(timeout=3.0)  # generous for a loaded machine; the expression below needs far more
    try:
        assert ev.evaluate("params.x + 1", {"params": {"x": 1}}) == 2
        ones = ",".join(["1"] * 100)
        huge = f"[{ones}].map(a, [{ones}].map(b, [{ones}].map(c, a + b + c)))"  # a million evaluations
        with pytest.raises(workflow.CelError, match="did not finish within"):
            ev.evaluate(huge, {})
        assert ev.evaluate("1 + 1", {}) == 2  # a fresh child after the kill
        with pytest.raises(workflow.CelError, match="divide by zero"):
            ev.evaluate("1 / 0", {})
    finally:
        ev.close()


def test_a_k8s_job_is_placed_by_kubernetes_capacity_not_the_nodes_own():
    def node(node_id, kinds, cpus=1):
        return {"id": node_id, "role": "worker", "liveness": "alive", "reported_at": 1, "kinds": kinds,
                "labels": {}, "capacity": {"cpus": cpus, "memory_mb": 512, "slots": 4}, "running": {"tasks": 0}}

    nodes = [node("laptop", ["shell", "k8s_job"], cpus=1), node("nas", ["shell", "k8s_job"], cpus=16),
             node("pi", ["shell"], cpus=4)]
    gib = 2**30
    records = [  # what the kubernetes plugin publishes: the laptop reaches a roomy cluster, the NAS a full one
        {"node_id": "laptop", "current": "lab", "contexts": [{"name": "lab"}],
         "capacity": [{"context": "lab", "node_free": [[8000, 32 * gib]], "cpu_free_m": 8000,
                       "memory_free": 32 * gib}]},
        {"node_id": "nas", "current": "k3s", "contexts": [{"name": "k3s"}],
         "capacity": [{"context": "k3s", "node_free": [[500, gib]], "cpu_free_m": 500, "memory_free": gib}]},
    ]

    def job(tid, cpu, memory, context=""):
        return {"id": tid, "kind": "k8s_job", "priority": 0, "attempt": 0,
                "placement": {"avoid_busy": True, "strategy": "spread", "cpus": 64},  # not the node's CPUs
                "spec": {"image": "busybox", "context": context,
                         "resources": {"cpu": cpu, "memory": memory}}}

    def rules(published):  # as the leader gets them: from the installed plugins, over the kv rows published
        return scheduler.round_rules(installed_placements(), {"k8s_job"},
                                     lambda query, args: [{"value": encode(r)} for r in published])

    kube = rules(records)
    placed = scheduler.schedule([job("train", "4", "16Gi")], nodes, rules=kube)
    assert [(a.task_id, a.node_id) for a in placed] == [("train", "laptop")]  # 1 CPU laptop, big cluster
    small = scheduler.schedule([job("tiny", "250m", "128Mi", context="k3s")], nodes, rules=kube)
    assert [a.node_id for a in small] == ["nas"]
    assert scheduler.schedule([job("huge", "64", "1Ti")], nodes, rules=kube) == []
    why = scheduler.explain(job("huge", "64", "1Ti"), nodes, kube)
    assert "has no Kubernetes node with 64000m CPU" in why["laptop"] and "does not run k8s_job" in why["pi"]
    assert scheduler.explain(job("x", "1", "1Gi", context="gke"), nodes, kube)["nas"] == \
        "has no Kubernetes context 'gke'"
    assert scheduler.schedule([job("none", "1", "1Gi")], nodes, rules=rules([])) == []  # no records yet: nowhere


def test_a_retry_prefers_another_node_than_the_failed_attempts_when_one_fits(s):
    # w1 and w2 report the same capacity: without the rule a spread tie goes to the lower id, w1, every time
    tid = submit(s, retry={"max_attempts": 3, "backoff": 0, "jitter": 0})
    report(s, tid, assign(s, tid, node="w1"), exit_code=1, error="exited with code 1", failure="exit")
    snap = s.q("task.sched", {"now": 2000.0, "limit": "auto"})
    (queued,) = snap["queued"]
    assert (queued["id"], queued["attempt"], queued["last_node"]) == (tid, 1, "w1")
    nodes = [n for n in snap["nodes"] if n["id"] in ("w1", "w2")]
    (decision,) = scheduler.schedule(snap["queued"], nodes)
    assert (decision.node_id, decision.attempt) == ("w2", 2)
    # when only the failed node can take it, the retry still runs there rather than waiting
    (only,) = scheduler.schedule(snap["queued"], [n for n in nodes if n["id"] == "w1"])
    assert only.node_id == "w1"
    # a first attempt has no previous node: the usual ranking (lowest id on a tie)
    fresh = submit(s)
    first = [t for t in s.q("task.sched", {"now": 2000.0})["queued"] if t["id"] == fresh]
    assert first[0]["last_node"] is None and scheduler.schedule(first, nodes)[0].node_id == "w1"


def test_the_scheduler_page_grows_when_the_head_of_the_queue_cannot_run(s):
    # 200 GPU tasks nobody can take ahead of one that fits: "auto" reads a page and says there is more
    s.apply("task.submit", {"tasks": [{"kind": "noop", "placement": {"gpus": 1}, "priority": 5}] * 200})
    tail = submit(s, kind="noop", spec={})
    snap = s.q("task.sched", {"now": 2000.0, "limit": "auto"})
    assert snap["more"] and len(snap["queued"]) < 201 and snap["free_slots"] == 24
    assert scheduler.schedule(snap["queued"], snap["nodes"]) == []
    deeper = s.q("task.sched", {"now": 2000.0, "limit": 5000})
    assert [d.task_id for d in scheduler.schedule(deeper["queued"], deeper["nodes"])] == [tail]


def test_fast_and_general_paths_record_the_same_thing(s):
    """A plain success takes the one-statement path; inside a retried attempt it takes the general one."""
    fast = submit(s, kind="noop", spec={})
    a = assign(s, fast)
    s.apply("task.start", {"node_id": "w1", "starts": [{"task_id": fast, "attempt": a, "term": 1}]})
    # the retried start (its first answer lost) is still accepted; a start for another node is not
    again = s.apply("task.start", {"node_id": "w1", "starts": [{"task_id": fast, "attempt": a, "term": 1}]})
    assert again["started"] == [fast]
    other = s.apply("task.start", {"node_id": "w2", "starts": [{"task_id": fast, "attempt": a, "term": 1}]})
    assert other["rejected"] == [{"task_id": fast, "attempt": a, "state": "stale"}]
    assert report(s, fast, a, result={"n": 1})["recorded"] == [{"task_id": fast, "state": "succeeded"}]
    assert report(s, fast, a)["rejected"][0]["state"] == "succeeded"  # a duplicate changes nothing
    task = s.q("task.get", {"id": fast})
    assert (task["state"], task["exit_code"], task["result"], task["dlq"], task["error"]) == \
        ("succeeded", 0, {"n": 1}, False, "")
    assert [(x["outcome"], x["exit_code"], x["finished_at"]) for x in task["attempts"]] == [("succeeded", 0, 1001.0)]


def test_normalized_docs_name_every_field_of_their_dataclass():
    from dataclasses import fields

    from cortex.tasks.spec import Placement, placement_doc, retry_doc

    assert set(placement_doc(Placement())) == {f.name for f in fields(Placement)}
    assert set(retry_doc(RetryPolicy())) == {f.name for f in fields(RetryPolicy)}


def test_one_report_command_starts_new_attempts_and_ends_others(s):
    done, new = submit(s, kind="noop", spec={}), submit(s, kind="noop", spec={})
    a = assign(s, done)
    s.apply("task.start", {"node_id": "w1", "starts": [{"task_id": done, "attempt": a, "term": 1}]})
    b = assign(s, new)
    both = s.apply("task.report", {"node_id": "w1", "starts": [{"task_id": new, "attempt": b, "term": 1}],
                                   "reports": [{"task_id": done, "attempt": a, "term": 1, "exit_code": 0}]})
    assert both["started"] == [new] and both["start_rejected"] == []
    assert both["recorded"] == [{"task_id": done, "state": "succeeded"}]
    assert s.q("task.get", {"id": new})["state"] == "running"
    # starts alone; a stale one is rejected with the reason, like task.start
    other = submit(s, kind="noop", spec={})
    c = assign(s, other, node="w2")
    only = s.apply("task.report", {"node_id": "w1", "starts": [{"task_id": other, "attempt": c, "term": 1}]})
    assert only["started"] == [] and only["start_rejected"] == [{"task_id": other, "attempt": c, "state": "stale"}]
    assert only["recorded"] == [] and s.q("task.get", {"id": other})["state"] == "assigned"
    with pytest.raises(CommandError, match="reports must be a non-empty list"):
        validate("task.report", {"node_id": "w1"})

"""The task engine on a real 3-server + 2-worker cluster (agent processes on loopback): sandbox, cancel and
timeouts, retries and the DLQ, output floods, bad input, distributed runs, workflows, draining."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from cortex import cli
from cortex.client import CortexError
from cortex.tasks import api
from cortex.tasks.lifecycle import OUTPUT_CAP
from tests.support.wait import wait_for_value, wait_until


@pytest.fixture(scope="module")
def c(shared_cluster):
    client = shared_cluster.client("n1", timeout=15)
    with contextlib.suppress(AssertionError):  # every node reports its resources shortly after start
        wait_until(lambda: all(n["reported_at"] and "shell" in n["kinds"] for n in client.read("task.nodes", {})),
                   30, "every node's resources", interval=0.2)
    yield client
    client.close()


# The system's Python, not the test's: the sandbox has a private /tmp, and a checkout (with its .venv) may live
# under /tmp, where a task cannot see it.
SANDBOX_PYTHON = "/usr/bin/python3"


def run(c, task: dict, timeout: float = 60) -> dict:
    (task_id,) = api.submit(c, [task])
    return api.wait(c, [task_id], timeout)[0]


def wait_state(c, task_id: str, states: tuple[str, ...], timeout: float = 30) -> dict:
    return wait_for_value(lambda: c.read("task.get", {"id": task_id}), lambda t: t["state"] in states, timeout,
                          f"task {task_id} to reach {states}")


def processes_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline:
            found.append(int(pid))
    return found


def test_shell_sandbox_denies_writes_outside_the_workdir_and_the_network(c, shared_cluster, tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    outside = tmp_path / "escaped"
    data_dir = Path(shared_cluster.node("w1").dir) / "data"
    script = (f"echo inside > ok.txt && cat ok.txt; "
              f"touch {outside} 2>/dev/null && echo WROTE-OUTSIDE; touch /etc/cortex-escape 2>/dev/null && echo WROTE-ETC; "
              f"{SANDBOX_PYTHON} -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)\" "
              f"2>/dev/null && echo CONNECTED || echo NET-DENIED; "
              f"echo data-dir=$(ls -A {data_dir}); cat {data_dir}/cluster.json 2>/dev/null && echo SECRET-READ; true")
    task = run(c, {"kind": "shell", "spec": {"command": script}, "placement": {"nodes": ["w1"]}})
    out = api.output_text(c, task["id"])["stdout"]
    assert task["state"] == "succeeded", task
    # the node's data directory (Raft secret, state) is an empty tmpfs but for the path to the workdir
    assert "inside" in out and "NET-DENIED" in out and "data-dir=plugins\n" in out
    assert "WROTE-OUTSIDE" not in out and "WROTE-ETC" not in out and "CONNECTED" not in out
    assert "SECRET-READ" not in out
    assert not outside.exists() and not Path("/etc/cortex-escape").exists()
    with pytest.raises(socket.timeout):
        listener.accept()  # nothing reached the listener
    listener.close()
    # asking for the network gives it
    allowed = run(c, {"kind": "shell", "spec": {"network": True, "command": f"{SANDBOX_PYTHON} -c \"import socket; "
                                                f"socket.create_connection(('127.0.0.1', {c.address.split(':')[1]}))\""},
                      "placement": {"nodes": ["w1"]}})
    assert allowed["state"] == "succeeded", allowed


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_cancel_and_timeout_kill_the_whole_process_tree(c, how):
    marker = f"{300 + time.time_ns() % 1000}.{os.getpid() % 97}"
    command = f"sleep {marker} & setsid sleep {marker} & (sleep {marker}; echo never) & echo started; wait"
    task = {"kind": "shell", "spec": {"command": command}}
    if how == "timeout":
        task["timeout"] = 2.0
    (task_id,) = api.submit(c, [task])
    wait_state(c, task_id, ("running",))
    wait_until(lambda: len(processes_with(f"sleep {marker}")) >= 3, 10, "the task's processes")
    if how == "cancel":
        assert c.write("task.cancel", {"task_ids": [task_id]})["states"][task_id] == "cancelling"
    final = wait_state(c, task_id, ("cancelled", "failed"))
    assert final["state"] == ("cancelled" if how == "cancel" else "failed")
    if how == "timeout":
        assert "timed out after 2 s" in final["error"]
    wait_until(lambda: not processes_with(f"sleep {marker}"), 5, "the task's processes to be gone", interval=0.1,
               detail=lambda: f"left behind: {processes_with(f'sleep {marker}')}")


def test_retries_back_off_then_dead_letter_then_replay_succeeds(c):
    # fails on attempts 1 and 2 (then the DLQ); the replay is attempt 3, which succeeds
    task = {"kind": "shell", "spec": {"command": 'echo "attempt $CORTEX_ATTEMPT"; [ "$CORTEX_ATTEMPT" -ge 3 ]'},
            "retry": {"max_attempts": 2, "backoff": 1.5, "jitter": 0}}
    done = run(c, task)
    assert done["state"] == "failed" and done["dlq"] and done["failures"] == 2
    first, second = done["attempts"]
    gap = second["assigned_at"] - first["finished_at"]
    assert 1.5 <= gap < 3.5, f"backoff {gap:.2f}s, expected 1.5 s"
    assert done["id"] in [t["id"] for t in c.read("task.list", {"dlq": True, "limit": 1000})]
    assert cli.main(["--addr", c.address, "dlq", "replay", done["id"]]) == 0
    replayed = wait_state(c, done["id"], ("succeeded", "failed"))
    assert replayed["state"] == "succeeded" and not replayed["dlq"]
    assert [a["outcome"] for a in replayed["attempts"]] == ["failed", "failed", "succeeded"]
    assert "attempt 3" in api.output_text(c, done["id"])["stdout"]


def test_an_output_flood_is_capped_with_a_marker_and_the_agent_stays_up(c, capsys):
    done = run(c, {"kind": "shell", "spec": {"command": "head -c 20000000 /dev/zero | tr '\\0' x; echo tail"}})
    assert done["state"] == "succeeded"
    page = c.read("task.output", {"id": done["id"], "limit": 5000})
    kept = sum(len(ch["data"]) for ch in page["chunks"] if ch["stream"] == "stdout")
    assert kept == OUTPUT_CAP
    assert [ch["stream"] for ch in page["chunks"]].count("marker") == 1
    assert done["output_dropped"] == 20_000_005 - OUTPUT_CAP
    assert cli.main(["--addr", c.address, "tasks", "logs", done["id"]]) == 0
    captured = capsys.readouterr()
    assert "output truncated" in captured.err and len(captured.out) == OUTPUT_CAP
    assert c.status().leader_id  # still serving


def test_bad_input_is_refused_with_what_to_do(c, tmp_path, capsys):
    cases = [
        ({"tasks": [{"kind": "shell", "spec": {"command": ""}}]}, "command is empty"),
        ({"tasks": [{"kind": "warp"}]}, "unknown task kind 'warp'"),
        ({"tasks": [{"kind": "shell", "spec": {"command": "x"}, "placement": {"nodes": ["ghost"]}}]},
         "unknown node(s) ghost"),
    ]
    for args, message in cases:
        with pytest.raises(CortexError) as err:
            c.write("task.submit", args)
        assert message in err.value.details
    with pytest.raises(CortexError, match="no node 'ghost'"):
        c.write("task.drain", {"node_id": "ghost", "deadline": 60})
    with pytest.raises(CortexError, match="is decided by the cluster itself"):
        c.write("task.assign", {"assignments": [{"task_id": "x", "node_id": "w1", "attempt": 1}]})
    cyclic = tmp_path / "cyclic.yaml"
    cyclic.write_text("name: loop\nsteps:\n  - {name: a, depends_on: [b], task: {kind: noop}}\n"
                      "  - {name: b, depends_on: [a], task: {kind: noop}}\n")
    assert cli.main(["--addr", c.address, "workflows", "submit", str(cyclic)]) == 1
    assert "workflow has a cycle: a -> b -> a" in capsys.readouterr().err
    bad_cel = {"name": "c", "steps": [{"name": "a", "when": "steps.x.state ==", "task": {"kind": "noop"}}]}
    with pytest.raises(CortexError, match="CEL does not compile"):
        c.write("workflow.submit", {"workflow": bad_cel})
    assert c.read("task.list", {"state": "queued", "kind": "warp"}) == []


def test_run_distributed_returns_one_aggregated_result(c, capsys):
    assert cli.main(["--addr", c.address, "--json", "tasks", "run", "--all", "--", "echo from $CORTEX_NODE"]) == 0
    agg = json.loads(capsys.readouterr().out)
    assert agg["summary"] == {"nodes": 5, "succeeded": 5, "failed": 0, "states": {"succeeded": 5},
                              "all_succeeded": True}
    assert {r["node"]: r["stdout"].strip() for r in agg["results"]} == {
        n: f"from {n}" for n in ("n1", "n2", "n3", "w1", "w2")}
    partial = api.run_distributed(c, "test $CORTEX_NODE != w2", nodes=["w1", "w2"], timeout=30)
    assert partial["summary"]["succeeded"] == 1 and partial["summary"]["failed"] == 1
    assert {r["node"]: r["exit_code"] for r in partial["results"]} == {"w1": 0, "w2": 1}


def test_workflow_fans_out_and_in_with_cel_conditions(c, tmp_path, capsys):
    spec = tmp_path / "wf.yaml"
    spec.write_text("""
name: fan
params: {threshold: 2}
steps:
  - name: list
    task: {kind: shell, spec: {command: 'echo ''{"items": ["a", "b", "c"]}'' > $CORTEX_RESULT'}}
  - name: work
    depends_on: [list]
    for_each: steps.list.result.items
    task: {kind: shell, spec: {command: 'echo "{\\"item\\": \\"{{item}}\\"}" > $CORTEX_RESULT'}}
  - name: summary
    depends_on: [work]
    when: steps.work.succeeded > params.threshold
    task: {kind: shell, spec: {command: 'printf %s "$CORTEX_INPUTS"'}}
  - name: cleanup_on_failure
    depends_on: [work]
    trigger: one_failed
    task: {kind: noop}
""")
    assert cli.main(["--addr", c.address, "--json", "workflows", "submit", str(spec), "--wait"]) == 0
    wf = json.loads(capsys.readouterr().out)
    steps = {s["name"]: s for s in wf["steps"]}
    assert wf["state"] == "succeeded" and wf["version"] >= 1
    assert steps["work"]["results"] == [{"item": "a"}, {"item": "b"}, {"item": "c"}]
    assert steps["cleanup_on_failure"]["state"] == "skipped"
    summary_task = steps["summary"]["tasks"][0]["id"]
    inputs = json.loads(api.output_text(c, summary_task)["stdout"])
    assert inputs["work"]["exit_codes"] == [0, 0, 0] and len(inputs["work"]["results"]) == 3


def test_workflow_cancel_stops_running_and_pending_steps(c):
    wf = c.write("workflow.submit", {"workflow": {"name": "slow", "steps": [
        {"name": "a", "task": {"kind": "shell", "spec": {"command": "sleep 60"}}},
        {"name": "b", "depends_on": ["a"], "task": {"kind": "noop"}}]}})
    task_id = f"{wf['workflow_id']}.a"
    wait_for_value(lambda: c.read("task.get", {"id": task_id}), lambda t: t is not None and t["state"] == "running",
                   20, "the workflow's first task to run", interval=0.1)
    assert c.write("workflow.cancel", {"workflow_id": wf["workflow_id"]})["state"] == "cancelled"
    assert wait_state(c, task_id, ("cancelled",))["state"] == "cancelled"
    got = c.read("workflow.get", {"id": wf["workflow_id"]})
    assert got["state"] == "cancelled" and [s["state"] for s in got["steps"]] == ["cancelled", "cancelled"]


def test_drain_lets_running_tasks_finish_until_the_deadline_then_requeues_elsewhere(c):
    key = uuid.uuid4().hex[:6]
    (long_id,) = api.submit(c, [{"kind": "shell", "name": f"long-{key}", "spec": {"command": "sleep 6; echo done"},
                                 "placement": {"nodes": ["w1", "w2"]}}])
    node = wait_state(c, long_id, ("running",))["node"]
    other = "w2" if node == "w1" else "w1"
    (short_id,) = api.submit(c, [{"kind": "shell", "spec": {"command": "sleep 2"}, "placement": {"nodes": [node]}}])
    wait_state(c, short_id, ("running",))
    try:
        assert cli.main(["--addr", c.address, "nodes", "drain", node, "--deadline", "4s"]) == 0
        (new_id,) = api.submit(c, [{"kind": "noop", "placement": {"nodes": ["w1", "w2"]}}])
        assert wait_state(c, new_id, ("succeeded",))["node"] == other  # no new work on the draining node
        short = wait_state(c, short_id, ("succeeded", "failed"))
        assert short["state"] == "succeeded" and short["node"] == node and short["attempt"] == 1
        final = wait_state(c, long_id, ("succeeded", "failed"), timeout=40)
        assert final["state"] == "succeeded" and final["node"] == other
        assert [(a["node"], a["outcome"]) for a in final["attempts"]] == [(node, "lost"), (other, "succeeded")]
        assert node in [n["id"] for n in c.read("nodes", {})]  # draining never removes the node
    finally:
        assert cli.main(["--addr", c.address, "nodes", "undrain", node]) == 0
    assert not [n for n in c.read("task.nodes", {}) if n["id"] == node][0]["drained"]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A container image built here from a root filesystem tarball (host binaries + their libraries)."""
    import shutil
    import subprocess
    import tarfile

    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (bootstrap.sh installs it as root)")
    root = tmp_path_factory.mktemp("rootfs")
    for binary in ("/bin/sh", "/bin/echo", "/bin/sleep", "/bin/cat"):
        real = Path(binary).resolve()
        files = [real] + [Path(p) for p in subprocess.run(["ldd", str(real)], capture_output=True, text=True)
                          .stdout.split() if p.startswith("/")]
        for f in files:
            target = root / (binary if f == real else str(f)).lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f.resolve(), target)
    tarball = root.parent / "rootfs.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(root, arcname=".")
    name = f"localhost/cortex-tasks-test:{os.getpid()}"
    podman = ["podman", "--runtime=runc", "--cgroup-manager=cgroupfs", "--events-backend=file"]
    subprocess.run([*podman, "import", str(tarball), name], check=True, capture_output=True)
    probe = subprocess.run([*podman, "run", "--rm", "--pull=never", "--network=none", "--ulimit",
                            "nofile=4096:4096", "--ulimit", "nproc=4096:4096", name, "/bin/sh", "-c", "echo ok"],
                           capture_output=True, text=True)
    if probe.stdout.strip() != "ok":
        subprocess.run([*podman, "rmi", "-f", name], capture_output=True)
        pytest.skip(f"podman cannot run containers here: {probe.stderr.strip()[-300:]}")
    yield name
    subprocess.run([*podman, "rmi", "-f", name], capture_output=True)


def test_a_podman_container_task_runs_and_streams(c, image):
    command = "for i in 1 2 3; do echo line $i; sleep 0.7; done; echo '{\"ok\": true}' > $CORTEX_RESULT"
    (task_id,) = api.submit(c, [{"kind": "container", "timeout": 60,
                                 "spec": {"image": image, "command": command, "memory_mb": 64, "cpus": 0.5}}])
    # output arrives while the container still runs
    page = wait_for_value(lambda: c.read("task.output", {"id": task_id}),
                          lambda p: any("line 1" in ch["data"] for ch in p["chunks"]), 30, "the first line",
                          interval=0.1)
    assert page["state"] == "running"
    done = wait_state(c, task_id, ("succeeded", "failed"))
    assert done["state"] == "succeeded", done
    assert done["result"]["value"] == {"ok": True}
    assert api.output_text(c, task_id)["stdout"] == "line 1\nline 2\nline 3\n"


def test_container_cancel_removes_it_and_a_missing_image_is_a_clear_error(c, image):
    import subprocess

    (task_id,) = api.submit(c, [{"kind": "container", "spec": {"image": image, "command": "echo up; sleep 120"}}])
    wait_until(lambda: any("up" in ch["data"] for ch in c.read("task.output", {"id": task_id})["chunks"]), 30,
               "the container's first output", interval=0.1)
    c.write("task.cancel", {"task_ids": [task_id]})
    assert wait_state(c, task_id, ("cancelled",))["state"] == "cancelled"
    ps = subprocess.run(["podman", "--runtime=runc", "--cgroup-manager=cgroupfs", "--events-backend=file", "ps",
                         "-a", "--format", "{{.Names}}"], capture_output=True, text=True).stdout
    assert f"cortex-{task_id}" not in ps
    missing = run(c, {"kind": "container", "spec": {"image": "localhost/not-here:0"}, "retry": {"max_attempts": 3}})
    assert missing["state"] == "failed" and "could not run image" in missing["error"]
    assert len(missing["attempts"]) == 1  # not retryable: another attempt cannot find it either


def test_plugin_tools_have_valid_schemas_and_work_against_the_cluster(c, tmp_path):
    import logging

    import jsonschema

    from cortex.core.events import EventBus
    from cortex.plugins import Caller, PluginContext
    from cortex.tasks.engine import TaskEngine
    from cortex.tasks.tools import engine_tools

    # the tools through a real client instead of the in-agent bridge: the same write/read surface
    engine = TaskEngine(PluginContext(name="tasks", options={}, cluster=c, events=EventBus(), data_dir=tmp_path,
                                      log=logging.getLogger("test")))
    tools = {t.name: t for t in engine_tools(engine)}
    assert {"tasks_submit", "tasks_get", "tasks_list", "tasks_cancel", "dlq_list", "dlq_replay", "run_distributed",
            "workflows_submit", "workflows_get", "workflows_list", "workflows_cancel", "nodes_drain",
            "nodes_undrain", "agent_task"} <= set(tools)
    caller = Caller(role="operator")

    def call(name: str, args: dict):
        jsonschema.Draft202012Validator.check_schema(tools[name].input_schema)
        jsonschema.validate(args, tools[name].input_schema)
        return tools[name].handler(args, caller)

    agg = call("tasks_submit", {"tasks": [{"kind": "shell", "spec": {"command": "echo tool"}}], "wait": True,
                                "idempotency_key": "tool-submit-1"})
    assert agg["summary"]["all_succeeded"] and agg["results"][0]["stdout"] == "tool\n"
    again = call("tasks_submit", {"tasks": [{"kind": "shell", "spec": {"command": "echo tool"}}],
                                  "idempotency_key": "tool-submit-1"})
    assert again["task_ids"] == [agg["results"][0]["task_id"]]  # a retried call does not submit twice
    got = call("tasks_get", {"task_id": agg["results"][0]["task_id"]})
    assert got["output"]["stdout"] == "tool\n" and got["attempts"][0]["outcome"] == "succeeded"
    dist = call("run_distributed", {"command": "echo hi", "count": 2, "timeout": 30})
    assert dist["summary"]["succeeded"] == 2
    assert isinstance(call("dlq_list", {}), list) and isinstance(call("workflows_list", {}), list)
    assert len(call("nodes_resources", {})) == 5
    with pytest.raises(CortexError, match="no node 'ghost'"):
        call("nodes_drain", {"node_id": "ghost", "deadline": 10})
    with pytest.raises(jsonschema.ValidationError):
        call("tasks_submit", {"tasks": [{"kind": "teleport"}]})


def test_submit_count_puts_many_tasks_in_few_commands_each_recorded_once(c, capsys):
    group = "many" + uuid.uuid4().hex[:6]
    key = uuid.uuid4().hex
    argv = ["--addr", c.address, "--json", "tasks", "submit", "--kind", "noop", "--count", "2500", "--group", group,
            "--idempotency-key", key]
    assert cli.main(argv) == 0
    ids = json.loads(capsys.readouterr().out)["task_ids"]
    assert len(ids) == len(set(ids)) == 2500
    # the same command again (a retry after a lost answer) submits nothing more and answers the same ids
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["task_ids"] == ids
    stats = wait_for_value(lambda: c.read("task.stats", {"group": group}), lambda s: s.get("succeeded", 0) >= 2500,
                           120, "2500 tasks succeeded", interval=0.5)
    assert stats["succeeded"] == 2500 and sum(v for k, v in stats.items() if k in ("queued", "assigned", "running",
                                                                                  "failed", "cancelled")) == 0
    attempts = c.read("task.attempts", {"group": group})
    assert len(attempts) == 2500 and {a["outcome"] for a in attempts} == {"succeeded"}

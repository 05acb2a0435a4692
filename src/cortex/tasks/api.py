"""Client-side task operations shared by the CLI (over gRPC) and the plugin tools (over the agent bridge).

A backend is anything with `write(command_type, args, idempotency_key=...)` and `read(query, args, level=...)`:
`cortex.client.Client` and the agent's `PluginBridge` both are.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Protocol

from cortex.tasks.lifecycle import TERMINAL
from cortex.tasks.spec import MAX_TASKS_PER_SUBMIT

AGGREGATE_OUTPUT_CAP = 64 * 1024  # per node in an aggregated result


class Backend(Protocol):
    def write(self, command_type: str, args: dict, idempotency_key: str = ...) -> dict: ...

    def read(self, query: str, args: dict | None = None, level: str = ...) -> Any: ...


class TaskError(RuntimeError):
    """An operation could not be done; the message says what to do next."""


def submit(backend: Backend, tasks: list[dict], group: str | None = None, key: str | None = None) -> list[str]:
    args: dict = {"tasks": tasks}
    if group:
        args["group"] = group
    result = backend.write("task.submit", args, idempotency_key=key or uuid.uuid4().hex)
    return result["task_ids"]


def submit_many(backend: Backend, tasks: list[dict], group: str | None = None, key: str | None = None,
                chunk: int = MAX_TASKS_PER_SUBMIT) -> list[str]:
    """Many tasks in few commands (one per `chunk`), ids in order. Each command has its own idempotency key
    derived from `key`, so calling again with the same key after a failure part-way submits only the chunks
    that did not go in, and every task is recorded once."""
    key = key or uuid.uuid4().hex
    ids: list[str] = []
    for i in range(0, len(tasks), chunk):
        ids += submit(backend, tasks[i:i + chunk], group=group, key=f"{key}:{i // chunk}")
    return ids


def wait(backend: Backend, task_ids: list[str], timeout: float | None, poll: float = 0.2) -> list[dict]:
    """Until every task is terminal (or the timeout passes); returns the tasks as last seen."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = list(task_ids)
    done: dict[str, dict] = {}
    while True:
        for task_id in list(pending):
            task = backend.read("task.get", {"id": task_id}, level="leader")
            if task is None:
                raise TaskError(f"task {task_id} vanished")
            if task["state"] in TERMINAL:
                done[task_id] = task
                pending.remove(task_id)
            else:
                done[task_id] = task
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            return [done[i] for i in task_ids]
        time.sleep(poll)


def output_text(backend: Backend, task_id: str, attempt: int | None = None,
                cap: int = AGGREGATE_OUTPUT_CAP) -> dict[str, str]:
    """stdout and stderr of one attempt (the last one by default), each capped."""
    out = {"stdout": "", "stderr": ""}
    after = 0
    while True:
        page = backend.read("task.output", {"id": task_id, "after": after, "limit": 1000}, level="leader")
        for chunk in page["chunks"]:
            after = chunk["seq"]
            if attempt is not None and chunk["attempt"] != attempt:
                continue
            stream = "stderr" if chunk["stream"] == "marker" else chunk["stream"]
            if len(out[stream]) < cap:
                out[stream] += chunk["data"][: cap - len(out[stream])]
        if len(page["chunks"]) < 1000:
            return out


def aggregate(backend: Backend, tasks: list[dict]) -> dict:
    """One result for a group of tasks: per-node output, exit codes and a summary."""
    per_node, states = [], {}
    for task in tasks:
        text = output_text(backend, task["id"], attempt=task["attempt"] or None)
        node = task["node"] or (task["placement"].get("nodes") or ["?"])[0]
        per_node.append({"node": node, "task_id": task["id"], "state": task["state"],
                         "exit_code": task["exit_code"], "error": task["error"], "stdout": text["stdout"],
                         "stderr": text["stderr"], "result": (task.get("result") or {}).get("value")})
        states[task["state"]] = states.get(task["state"], 0) + 1
    ok = sum(1 for t in tasks if t["state"] == "succeeded")
    return {"summary": {"nodes": len(tasks), "succeeded": ok, "failed": len(tasks) - ok, "states": states,
                        "all_succeeded": ok == len(tasks)},
            "results": sorted(per_node, key=lambda r: r["node"])}


def target_nodes(backend: Backend, nodes: list[str] | None, count: int | None, kind: str = "shell") -> list[str]:
    """The nodes a distributed run goes to: the ones named, or `count` (or all) nodes able to run `kind`."""
    views = backend.read("task.nodes", {}, level="leader")
    known = {n["id"]: n for n in views}
    if nodes:
        unknown = [n for n in nodes if n not in known]
        if unknown:
            raise TaskError(f"unknown node(s) {', '.join(unknown)}; see `cortex nodes`")
        return sorted(set(nodes))
    able = [n["id"] for n in views if n["liveness"] == "alive" and not n["drained"] and kind in n["kinds"]]
    if not able:
        raise TaskError(f"no alive node can run {kind} tasks right now; see `cortex tasks nodes`")
    return able[:count] if count else able


def run_distributed(backend: Backend, command: str | list[str], nodes: list[str] | None = None,
                    count: int | None = None, timeout: float = 300.0, kind: str = "shell",
                    spec_extra: dict | None = None, key: str | None = None) -> dict:
    """Run one command on N (or all, or the named) nodes; wait; return one aggregated result."""
    targets = target_nodes(backend, nodes, count, kind)
    spec = {"command": command, **(spec_extra or {})} if kind == "shell" else dict(spec_extra or {})
    group = "g" + (key or uuid.uuid4().hex)[:16]
    tasks = [{"kind": kind, "name": f"{group}.{node}", "spec": spec, "timeout": timeout,
              "placement": {"nodes": [node], "avoid_busy": False}} for node in targets]
    ids = submit(backend, tasks, group=group, key=key)
    finished = wait(backend, ids, timeout + 30)
    out = aggregate(backend, finished)
    out["group"] = group
    unfinished = [t["id"] for t in finished if t["state"] not in TERMINAL]
    if unfinished:
        out["summary"]["unfinished"] = unfinished
    return out

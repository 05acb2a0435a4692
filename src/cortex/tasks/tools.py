"""The task engine's operations as plugin tools (served over MCP by the MCP server, callable by models).

Every mutating tool takes an optional `idempotency_key`: a model that retries a call after a timeout does not
submit twice.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from cortex.plugins import Caller, Tool, ToolError, returns, returns_list
from cortex.tasks import api
from cortex.tasks.lifecycle import STATES

if TYPE_CHECKING:
    from cortex.tasks.engine import TaskEngine

_KEY = {"type": "string", "maxLength": 128,
        "description": "optional; a retry with the same key returns the first result instead of acting twice"}
_TASK = {
    "type": "object", "required": ["kind"],
    "properties": {
        "kind": {"type": "string", "enum": ["shell", "container", "agent", "k8s_job", "noop"],
                 "description": "shell: a command in a bubblewrap sandbox; container: a Podman image; "
                                "agent: an LLM agent loop; k8s_job: a Kubernetes Job; noop: does nothing"},
        "name": {"type": "string", "maxLength": 128},
        "spec": {"type": "object", "description": "kind-specific. shell: {command, env, network, cpu_seconds, "
                 "memory_mb}; container: {image, command, env, network, memory_mb, cpus}; agent: {prompt, "
                 "model, system, tools, max_turns, max_tokens}"},
        "priority": {"type": "integer", "minimum": -1000, "maximum": 1000, "description": "higher runs first"},
        "timeout": {"type": "number", "exclusiveMinimum": 0, "description": "seconds; the attempt is killed after"},
        "placement": {"type": "object", "description": "{role, labels, nodes, avoid_busy, cpus, memory_mb, gpus, "
                      "strategy: spread|pack}"},
        "retry": {"type": "object", "description": "{max_attempts, backoff, backoff_max, jitter, on: [exit, "
                  "timeout, error]}; after the last attempt the task goes to the dead-letter queue"},
    },
}
_ID = {"type": "object", "required": ["task_id"], "additionalProperties": False,
       "properties": {"task_id": {"type": "string", "maxLength": 200}, "idempotency_key": _KEY}}


_ROW = {"id": "string", "name": ["string", "null"], "kind": "string", "state": "string", "node": ["string", "null"],
        "attempt": ["integer", "null"], "exit_code": ["integer", "null"], "error": ["string", "null"], "dlq": "boolean"}
_AGGREGATE = returns({"summary": returns({"nodes": "integer", "succeeded": "integer", "failed": "integer",
                                          "states": "object", "all_succeeded": "boolean"}),
                      "results": {"type": "array", "items": returns({"node": "string", "task_id": "string",
                                                                      "state": "string", "stdout": "string",
                                                                      "stderr": "string"})},
                      "group": "string"}, "group")
_ERROR = {"error": "string"}  # a command the state machine refused says why instead


def _key(args: dict) -> str:
    return args.get("idempotency_key") or uuid.uuid4().hex


# What each tool answers: its MCP output schema (structuredContent).
_OUT_TASKS_SUBMIT = {
    "anyOf": [returns({"task_ids": {"type": "array", "items": {"type": "string"}}}), _AGGREGATE],
    "type": "object",
}
_OUT_TASKS_GET = returns(
    {
        **_ROW,
        "attempts": {
            "type": "array",
            "items": returns({"attempt": "integer", "node": "string", "outcome": ["string", "null"]}),
        },
        "output": returns({"stdout": "string", "stderr": "string"}),
    },
    required=("id", "kind", "state", "attempts", "output"),
)
_OUT_TASKS_LIST = returns_list(_ROW)
_OUT_TASKS_CANCEL = returns({"states": "object", "missing": "array", **_ERROR}, required=())
_OUT_TASKS_RETRY = returns({"requeued": "array", **_ERROR}, required=())
_OUT_DLQ_LIST = returns_list(
    {
        "id": "string",
        "name": ["string", "null"],
        "kind": "string",
        "attempt": ["integer", "null"],
        "failures": ["integer", "null"],
        "error": ["string", "null"],
        "dlq_at": ["number", "null"],
    }
)
_OUT_DLQ_REPLAY = returns({"requeued": "array", "problems": "array", **_ERROR}, required=())
_OUT_WORKFLOWS_SUBMIT = returns(
    {"workflow_id": "string", "name": "string", "version": "integer", **_ERROR}, required=()
)
_OUT_WORKFLOWS_GET = returns(
    {
        "id": "string",
        "name": "string",
        "version": "integer",
        "state": "string",
        "params": "object",
        "created_at": "number",
        "finished_at": ["number", "null"],
        "steps": {
            "type": "array",
            "items": returns({"name": "string", "state": "string", "tasks_total": ["integer", "null"]}),
        },
    }
)
_OUT_WORKFLOWS_LIST = returns_list(
    {
        "id": "string",
        "name": "string",
        "version": "integer",
        "state": "string",
        "created_at": "number",
        "finished_at": ["number", "null"],
    }
)
_OUT_WORKFLOWS_CANCEL = returns(
    {"workflow_id": "string", "state": "string", "tasks_cancelled": ["integer", "array"], **_ERROR},
    required=(),
)
_OUT_NODES_DRAIN = returns(
    {"node_id": "string", "drain_deadline": ["number", "null"], "running": ["integer", "array"], **_ERROR},
    required=(),
)
_OUT_NODES_UNDRAIN = returns({"node_id": "string", "drained": "boolean", **_ERROR}, required=())
_OUT_NODES_RESOURCES = returns_list(
    {
        "id": "string",
        "role": "string",
        "liveness": "string",
        "capacity": "object",
        "usage": "object",
        "labels": "object",
        "kinds": "array",
        "busy": "boolean",
        "benchmark": "object",
        "reported_at": ["number", "null"],
        "drained": "boolean",
        "drain_deadline": ["number", "null"],
    }
)
_OUT_AGENT_TASK = returns(
    {"task_id": "string", "state": "string", "error": ["string", "null"], "result": "object"},
    ("state", "error", "result"),
)


def engine_tools(engine: TaskEngine) -> list[Tool]:
    cluster = engine.ctx.cluster

    def need(value, what: str):
        if value is None:
            raise ToolError(f"no {what}; list them first")
        return value

    def submit(args: dict, caller: Caller):
        ids = api.submit(cluster, args["tasks"], key=_key(args))
        if not args.get("wait"):
            return {"task_ids": ids}
        done = api.wait(cluster, ids, args.get("wait_seconds", 300))
        return api.aggregate(cluster, done)

    def get(args: dict, caller: Caller):
        task = need(cluster.read("task.get", {"id": args["task_id"]}), f"task {args['task_id']!r}")
        task["output"] = api.output_text(cluster, task["id"], attempt=task["attempt"] or None, cap=16 * 1024)
        return task

    def list_(args: dict, caller: Caller):
        rows = cluster.read("task.list", {k: v for k, v in args.items() if v not in (None, "")})
        return [{k: r[k] for k in ("id", "name", "kind", "state", "node", "attempt", "exit_code", "error", "dlq")}
                for r in rows]

    def cancel(args: dict, caller: Caller):
        return cluster.write("task.cancel", {"task_ids": [args["task_id"]]}, idempotency_key=_key(args))

    def cancel_plan(args: dict, caller: Caller) -> str:
        task = cluster.read("task.get", {"id": args["task_id"]})
        if task is None:
            return f"cancel task {args['task_id']} (no such task now: nothing changes)"
        where = f" on {task['node']}, its process tree killed" if task["state"] == "running" else ""
        return f"cancel {task['kind']} task {task['id']} ({task['state']}{where}); it will not run again unless retried"

    def wf_cancel_plan(args: dict, caller: Caller) -> str:
        run = cluster.read("workflow.get", {"id": args["workflow_id"]})
        if run is None:
            return f"cancel workflow {args['workflow_id']} (no such workflow now: nothing changes)"
        open_steps = [s["name"] for s in run["steps"] if s["state"] in ("pending", "running")]
        return (f"cancel workflow {run['name']} ({run['id']}, {run['state']}): steps {', '.join(open_steps) or 'none'} "
                "stop or never start, their running tasks are cancelled")

    def retry(args: dict, caller: Caller):
        return cluster.write("task.retry", {"task_ids": [args["task_id"]]}, idempotency_key=_key(args))

    def dlq_list(args: dict, caller: Caller):
        rows = cluster.read("task.list", {"dlq": True, "limit": args.get("limit", 100)})
        return [{k: r[k] for k in ("id", "name", "kind", "attempt", "failures", "error", "dlq_at")} for r in rows]

    def dlq_replay(args: dict, caller: Caller):
        ids = args.get("task_ids") or [r["id"] for r in cluster.read("task.list", {"dlq": True, "limit": 1000})]
        if not ids:
            return {"requeued": []}
        return cluster.write("task.retry", {"task_ids": ids}, idempotency_key=_key(args))

    def run_distributed(args: dict, caller: Caller):
        return engine.call(api.run_distributed, cluster, args["command"], nodes=args.get("nodes"),
                           count=args.get("count"), timeout=args.get("timeout", 300),
                           spec_extra={"network": args.get("network", False)}, key=args.get("idempotency_key"))

    def wf_submit(args: dict, caller: Caller):
        return cluster.write("workflow.submit", {"workflow": args["workflow"]}, idempotency_key=_key(args))

    def wf_get(args: dict, caller: Caller):
        return need(cluster.read("workflow.get", {"id": args["workflow_id"]}), f"workflow {args['workflow_id']!r}")

    def wf_list(args: dict, caller: Caller):
        return cluster.read("workflow.list", {k: v for k, v in args.items() if v})

    def wf_cancel(args: dict, caller: Caller):
        return cluster.write("workflow.cancel", {"workflow_id": args["workflow_id"]}, idempotency_key=_key(args))

    def drain(args: dict, caller: Caller):
        return cluster.write("task.drain", {"node_id": args["node_id"], "deadline": args.get("deadline", 300)},
                             idempotency_key=_key(args))

    def undrain(args: dict, caller: Caller):
        return cluster.write("task.undrain", {"node_id": args["node_id"]}, idempotency_key=_key(args))

    def nodes(args: dict, caller: Caller):
        return cluster.read("task.nodes", {})

    def agent_task(args: dict, caller: Caller):
        spec = {k: args[k] for k in ("prompt", "model", "system", "tools", "max_turns", "max_tokens") if k in args}
        task = {"kind": "agent", "spec": spec, "timeout": args.get("timeout", 600)}
        if args.get("node"):
            task["placement"] = {"nodes": [args["node"]]}
        ids = api.submit(cluster, [task], key=_key(args))
        if not args.get("wait", True):
            return {"task_id": ids[0]}
        done = api.wait(cluster, ids, args.get("timeout", 600) + 30)[0]
        return {"task_id": done["id"], "state": done["state"], "error": done["error"],
                "result": (done.get("result") or {})}

    obj = {"type": "object", "additionalProperties": False}
    return [
        Tool("tasks_submit", "Submit one or more persistent tasks to the cluster scheduler. Returns task ids; with "
             "wait=true, waits and returns one aggregated result (per-task output, exit codes, summary).", submit,
             {**obj, "required": ["tasks"], "properties": {
                 "tasks": {"type": "array", "minItems": 1, "maxItems": 1000, "items": _TASK},
                 "wait": {"type": "boolean"}, "wait_seconds": {"type": "number", "minimum": 1, "maximum": 3600},
                 "idempotency_key": _KEY}},
             role="operator", read_only=False, idempotent=False, output_schema=_OUT_TASKS_SUBMIT),
        Tool("tasks_get", "One task: state, attempts (node, term, outcome), result, error and the last 16 KiB of "
             "its output.", get, {**obj, "required": ["task_id"], "properties": {"task_id": _ID["properties"]["task_id"]}},
             output_schema=_OUT_TASKS_GET),
        Tool("tasks_list", "List tasks, newest first, filtered by state, node, kind, group or workflow.", list_,
             {**obj, "properties": {"state": {"type": "string", "enum": list(STATES)}, "node": {"type": "string"},
                                    "kind": {"type": "string"}, "group": {"type": "string"},
                                    "workflow": {"type": "string"},
                                    "limit": {"type": "integer", "minimum": 1, "maximum": 1000}}},
             output_schema=_OUT_TASKS_LIST),
        Tool("tasks_cancel", "Cancel a task: queued ones never run, running ones have their process tree killed.",
             # not destructive: the task's record, output and result stay, and tasks_retry runs it again, so an
             # operator session may cancel what it submitted (no admin profile, no allow_destructive)
             cancel, _ID, role="operator", read_only=False,
             output_schema=_OUT_TASKS_CANCEL, plan=cancel_plan),
        Tool("tasks_retry", "Run a failed or cancelled task again with a fresh retry budget.", retry, _ID,
             role="operator", read_only=False, idempotent=False, output_schema=_OUT_TASKS_RETRY),
        Tool("dlq_list", "The dead-letter queue: tasks that failed their last attempt, with the last error.",
             dlq_list, {**obj, "properties": {"limit": {"type": "integer", "minimum": 1, "maximum": 1000}}},
             output_schema=_OUT_DLQ_LIST),
        Tool("dlq_replay", "Replay dead-lettered tasks (the given ids, or all of them) with a fresh retry budget.",
             dlq_replay, {**obj, "properties": {"task_ids": {"type": "array", "items": {"type": "string"},
                                                             "maxItems": 1000}, "idempotency_key": _KEY}},
             role="operator", read_only=False, idempotent=False, output_schema=_OUT_DLQ_REPLAY),
        Tool("run_distributed", "Run one shell command on N nodes, all nodes, or the named nodes (sandboxed), wait "
             "for all of them and return ONE aggregated result: per-node stdout/stderr, exit codes and a summary.",
             run_distributed, {**obj, "required": ["command"], "properties": {
                 "command": {"type": "string", "minLength": 1, "maxLength": 65536},
                 "nodes": {"type": "array", "items": {"type": "string"}, "maxItems": 1000},
                 "count": {"type": "integer", "minimum": 1, "maximum": 1000},
                 "timeout": {"type": "number", "minimum": 1, "maximum": 86400},
                 "network": {"type": "boolean"}, "idempotency_key": _KEY}},
             role="operator", read_only=False, idempotent=False, output_schema=_AGGREGATE),
        Tool("workflows_submit", "Start a DAG workflow: steps with a task each, depends_on, trigger rules "
             "(all_success, all_done, one_failed, one_success), CEL conditions (`when`) over upstream results, "
             "fan-out (`for_each`) and fan-in ($CORTEX_INPUTS). Cycles and bad CEL are refused.", wf_submit,
             {**obj, "required": ["workflow"], "properties": {
                 "workflow": {"type": "object", "required": ["name", "steps"]}, "idempotency_key": _KEY}},
             role="operator", read_only=False, idempotent=False, output_schema=_OUT_WORKFLOWS_SUBMIT),
        Tool("workflows_get", "A workflow run: state, version and each step's state, tasks and results.", wf_get,
             {**obj, "required": ["workflow_id"], "properties": {"workflow_id": {"type": "string"}}},
             output_schema=_OUT_WORKFLOWS_GET),
        Tool("workflows_list", "Workflow runs, newest first.", wf_list,
             {**obj, "properties": {"state": {"type": "string"}, "limit": {"type": "integer", "minimum": 1}}},
             output_schema=_OUT_WORKFLOWS_LIST),
        Tool("workflows_cancel", "Cancel a workflow run: pending steps never start, running tasks are cancelled.",
             wf_cancel, {**obj, "required": ["workflow_id"], "properties": {
                 "workflow_id": {"type": "string"}, "idempotency_key": _KEY}},
             role="operator", read_only=False,
             output_schema=_OUT_WORKFLOWS_CANCEL, plan=wf_cancel_plan),
        Tool("nodes_drain", "Stop assigning tasks to a node; running tasks may finish until the deadline "
             "(seconds), then are re-queued elsewhere. The node stays in the cluster.", drain,
             {**obj, "required": ["node_id"], "properties": {
                 "node_id": {"type": "string"}, "deadline": {"type": "number", "minimum": 0, "maximum": 2592000},
                 "idempotency_key": _KEY}},
             role="operator", read_only=False, output_schema=_OUT_NODES_DRAIN),
        Tool("nodes_undrain", "Let a drained node take tasks again.", undrain,
             {**obj, "required": ["node_id"], "properties": {"node_id": {"type": "string"}, "idempotency_key": _KEY}},
             role="operator", read_only=False, output_schema=_OUT_NODES_UNDRAIN),
        Tool("nodes_resources", "Every node's task capacity, usage, busy flag, measured FLOPS, running tasks and "
             "drain state.", nodes, obj, output_schema=_OUT_NODES_RESOURCES),
        Tool("agent_task", "Dispatch an LLM agent task (Anthropic Messages API) to a node: prompt, model, tools "
             "(sandboxed shell, workdir files), max_turns. Waits by default and returns the final answer.",
             agent_task, {**obj, "required": ["prompt"], "properties": {
                 "prompt": {"type": "string", "minLength": 1, "maxLength": 100000},
                 "model": {"type": "string"}, "system": {"type": "string"},
                 "tools": {"type": "array", "items": {"type": "string", "enum": ["shell", "read_file", "write_file"]}},
                 "max_turns": {"type": "integer", "minimum": 1, "maximum": 100},
                 "max_tokens": {"type": "integer", "minimum": 1, "maximum": 64000},
                 "node": {"type": "string"}, "timeout": {"type": "number", "minimum": 1, "maximum": 86400},
                 "wait": {"type": "boolean"}, "idempotency_key": _KEY}},
             role="operator", read_only=False, idempotent=False, output_schema=_OUT_AGENT_TASK),
    ]

"""`cortex tasks|dlq|workflows` and `cortex nodes drain|undrain`: registered by cli.py through `register`."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

from cortex.tasks import api
from cortex.tasks.state import STATES, TERMINAL


def _cli():
    from cortex import cli

    return cli


def _client(args):
    return _cli()._client(args)


def _when(ts) -> str:
    return "" if not ts else time.strftime("%H:%M:%S", time.localtime(ts))


def _kv(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _cli().UsageError(f"{what} must look like KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _load_doc(path: str) -> dict:
    import yaml

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise _cli().UsageError(f"cannot read {path}: {exc}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _cli().UsageError(f"{path} is not valid YAML/JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _cli().UsageError(f"{path} must hold an object")
    return doc


def build_task(args) -> dict:
    if args.file:
        return _load_doc(args.file)
    command = list(args.command or [])
    if command and command[0] == "--":
        command = command[1:]
    kind = args.kind
    if kind == "shell":
        if not command:
            raise _cli().UsageError("give the command after --, e.g. cortex tasks submit -- echo hi")
        spec: dict = {"command": command[0] if len(command) == 1 else command, "env": _kv(args.env, "--env"),
                      "network": args.network}
        if args.cpu_seconds:
            spec["cpu_seconds"] = args.cpu_seconds
        if args.memory_limit:
            spec["memory_mb"] = args.memory_limit
    elif kind == "container":
        if not args.image:
            raise _cli().UsageError("a container task needs --image")
        spec = {"image": args.image, "env": _kv(args.env, "--env"), "network": args.network}
        if command:
            spec["command"] = command
        if args.memory_limit:
            spec["memory_mb"] = args.memory_limit
    elif kind == "agent":
        if not args.prompt:
            raise _cli().UsageError("an agent task needs --prompt")
        spec = {"prompt": args.prompt}
        if args.model:
            spec["model"] = args.model
    else:
        spec = json.loads(args.spec) if args.spec else {}
    task: dict = {"kind": kind, "spec": spec, "priority": args.priority}
    if args.name:
        task["name"] = args.name
    if args.timeout_s:
        task["timeout"] = _cli().parse_duration(args.timeout_s)
    if args.retries:
        task["retry"] = {"max_attempts": args.retries + 1, "backoff": args.backoff}
    placement: dict = {}
    if args.node:
        placement["nodes"] = args.node
    if args.role:
        placement["role"] = args.role
    if args.label:
        placement["labels"] = _kv(args.label, "--label")
    for key in ("cpus", "memory_mb", "gpus"):
        if getattr(args, key):
            placement[key] = getattr(args, key)
    if args.allow_busy:
        placement["avoid_busy"] = False
    if args.pack:
        placement["strategy"] = "pack"
    if placement:
        task["placement"] = placement
    return task


def cmd_submit(args) -> int:
    task = build_task(args)
    if not 1 <= args.count <= 1_000_000:
        raise _cli().UsageError("--count must be between 1 and 1000000")
    with _client(args) as c:
        if args.count == 1:
            submit_args = {"tasks": [task], **({"group": args.group} if args.group else {})}
            result = c.write("task.submit", submit_args, idempotency_key=args.idempotency_key or uuid.uuid4().hex,
                             retry_for=10.0)
            ids = result["task_ids"]
        else:  # one command per 1,000 tasks; rerun with the same --idempotency-key to finish a partial submit
            ids = api.submit_many(_Retrying(c), [task] * args.count, group=args.group or None,
                                  key=args.idempotency_key)
        if not args.wait:
            _cli().emit(args, {"task_ids": ids}, "\n".join(ids))
            return 0
        done = api.wait(c, ids, None)
        agg = api.aggregate(c, done)
    _cli().emit(args, agg, _aggregate_text(agg))
    return 0 if agg["summary"]["all_succeeded"] else 1


class _Retrying:
    """A client whose writes retry through elections (the same idempotency key each time)."""

    def __init__(self, client):
        self._client = client

    def write(self, command_type: str, args: dict, idempotency_key: str = "") -> dict:
        return self._client.write(command_type, args, idempotency_key=idempotency_key, retry_for=10.0)

    def read(self, query: str, args: dict | None = None, level: str = "leader"):
        return self._client.read(query, args, level=level)


def _aggregate_text(agg: dict) -> str:
    lines = []
    for r in agg["results"]:
        lines.append(f"== {r['node']} ({r['task_id']}): {r['state']}, exit {r['exit_code']}"
                     + (f", {r['error']}" if r["error"] else ""))
        if r["stdout"]:
            lines.append(r["stdout"].rstrip("\n"))
        if r["stderr"]:
            lines.append(r["stderr"].rstrip("\n"))
    s = agg["summary"]
    lines.append(f"{s['succeeded']}/{s['nodes']} succeeded")
    return "\n".join(lines)


def _task_rows(rows: list[dict]) -> list[dict]:
    return [{**r, "name": r["name"] or "", "submitted": _when(r["submitted_at"]), "node": r["node"] or "",
             "exit": "" if r["exit_code"] is None else r["exit_code"], "error": (r["error"] or "")[:60]}
            for r in rows]


def cmd_list(args) -> int:
    query = {"limit": args.limit}
    for key in ("state", "node", "kind", "group", "workflow"):
        if getattr(args, key, None):
            query[key] = getattr(args, key)
    with _client(args) as c:
        rows = c.read("task.list", query, level="leader")
    _cli().emit(args, rows, _cli().table(_task_rows(rows), ["id", "name", "kind", "state", "node", "attempt",
                                                             "exit", "submitted", "error"]))
    return 0


def cmd_show(args) -> int:
    from cortex.plugins.host import installed_placements
    from cortex.tasks.scheduler import explain, round_rules

    with _client(args) as c:
        task = c.read("task.get", {"id": args.id}, level="leader")
        if task is None:
            raise _cli().UsageError(f"no task {args.id!r}; see `cortex tasks list`")
        if task["state"] == "queued":
            rules = round_rules(installed_placements(), {task["kind"]}, lambda query, a: c.read(query, a, level="leader"))
            task["placement_now"] = explain(task, c.read("task.nodes", {}, level="leader"), rules)
    lines = [f"{k:13} {task[k]}" for k in ("id", "name", "kind", "state", "priority", "attempt", "failures", "node",
                                          "exit_code", "error", "dlq", "workflow", "step", "grp") if task.get(k)
             not in (None, "", False)]
    lines.append(f"{'spec':13} {json.dumps(task['spec'])}")
    if task.get("result"):
        lines.append(f"{'result':13} {json.dumps(task['result'])[:2000]}")
    if task.get("output_dropped"):
        lines.append(f"{'output':13} {task['output_dropped']} bytes dropped (cap reached)")
    if task["attempts"]:
        lines += ["", _cli().table([{**a, "assigned": _when(a["assigned_at"]), "finished": _when(a["finished_at"])}
                                    for a in task["attempts"]],
                                   ["attempt", "node", "term", "outcome", "exit_code", "assigned", "finished", "error"])]
    if task.get("placement_now"):
        lines += ["", "why not placed yet:"] + [f"  {n}: {why}" for n, why in sorted(task["placement_now"].items())]
    _cli().emit(args, task, "\n".join(lines))
    return 0


def cmd_logs(args) -> int:
    after = 0
    with _client(args) as c:
        while True:
            page = c.read("task.output", {"id": args.id, "after": after, "limit": 1000}, level="leader")
            if page["state"] is None:
                raise _cli().UsageError(f"no task {args.id!r}; see `cortex tasks list`")
            for chunk in page["chunks"]:
                after = chunk["seq"]
                if args.json:
                    print(json.dumps(chunk), flush=True)
                else:
                    stream = sys.stderr if chunk["stream"] != "stdout" else sys.stdout
                    stream.write(chunk["data"])
                    stream.flush()
            if len(page["chunks"]) == 1000:
                continue
            if not args.follow or page["state"] in TERMINAL:
                return 0
            time.sleep(0.3)


def cmd_cancel(args) -> int:
    with _client(args) as c:
        result = c.write("task.cancel", {"task_ids": args.ids}, retry_for=10.0)
    _cli().emit(args, result, "\n".join(f"{k}: {v}" for k, v in result["states"].items())
                + "".join(f"\n{m}: no such task" for m in result["missing"]))
    return 0


def cmd_retry(args) -> int:
    with _client(args) as c:
        result = c.write("task.retry", {"task_ids": args.ids}, retry_for=10.0)
    _cli().emit(args, result, "\n".join(f"{i}: queued again" for i in result["requeued"])
                + "".join(f"\n{p}" for p in result["problems"]))
    return 0


def cmd_run(args) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise _cli().UsageError("give the command after --, e.g. cortex tasks run --all -- uptime")
    if not (args.all or args.node or args.count):
        raise _cli().UsageError("say where: --all, --count N or --node ID (repeatable)")
    with _client(args) as c:
        try:
            agg = api.run_distributed(c, command[0] if len(command) == 1 else command, nodes=args.node,
                                      count=args.count, timeout=_cli().parse_duration(args.timeout_s),
                                      spec_extra={"network": args.network})
        except api.TaskError as exc:
            raise _cli().UsageError(str(exc)) from None
    _cli().emit(args, agg, _aggregate_text(agg))
    return 0 if agg["summary"]["all_succeeded"] else 1


def cmd_task_nodes(args) -> int:
    with _client(args) as c:
        rows = c.read("task.nodes", {}, level="leader")
    human = _cli().table([{
        "id": n["id"], "role": n["role"], "liveness": n["liveness"],
        "state": "draining" if n["drained"] else "ready" if n["reported_at"] else "no report",
        "busy": "yes" if n["busy"] else "", "cpus": n["capacity"].get("cpus", ""),
        "mem_mb": n["capacity"].get("memory_mb", ""), "gpus": n["capacity"].get("gpus", ""),
        "running": f"{n['running']['tasks']}/{n['capacity'].get('slots', '')}",
        "gflops": round(n["benchmark"].get("flops_multi", 0) / 1e9, 2) if n["benchmark"] else "",
        "kinds": ",".join(n["kinds"])} for n in rows],
        ["id", "role", "liveness", "state", "busy", "cpus", "mem_mb", "gpus", "running", "gflops", "kinds"])
    _cli().emit(args, rows, human)
    return 0


def cmd_dlq_list(args) -> int:
    with _client(args) as c:
        rows = c.read("task.list", {"dlq": True, "limit": args.limit}, level="leader")
    _cli().emit(args, rows, _cli().table([{**r, "failed": _when(r["dlq_at"]), "error": (r["error"] or "")[:70]}
                                          for r in _task_rows(rows)],
                                         ["id", "name", "kind", "failures", "failed", "error"]))
    return 0


def cmd_dlq_replay(args) -> int:
    with _client(args) as c:
        ids = args.ids
        if args.all:
            ids = [r["id"] for r in c.read("task.list", {"dlq": True, "limit": 5000}, level="leader")]
        if not ids:
            raise _cli().UsageError("nothing to replay: give task ids or --all (the DLQ may be empty)")
        result = c.write("task.retry", {"task_ids": ids}, retry_for=10.0)
    _cli().emit(args, result, f"replayed {len(result['requeued'])} task(s)" + "".join(f"\n{p}" for p in
                                                                                   result["problems"]))
    return 0


def cmd_wf_submit(args) -> int:
    doc = _load_doc(args.file)
    with _client(args) as c:
        result = c.write("workflow.submit", {"workflow": doc}, idempotency_key=args.idempotency_key or
                         uuid.uuid4().hex, retry_for=10.0)
        if args.wait:
            while True:
                wf = c.read("workflow.get", {"id": result["workflow_id"]}, level="leader")
                if wf["state"] != "running":
                    return _print_workflow(args, wf)
                time.sleep(0.5)
    _cli().emit(args, result, f"{result['workflow_id']} ({result['name']} v{result['version']})")
    return 0


def _print_workflow(args, wf: dict) -> int:
    head = f"{wf['id']}  {wf['name']} v{wf['version']}  {wf['state']}"
    rows = [{"step": s["name"], "state": s["state"], "tasks": f"{s['succeeded']}/{s['tasks_total']}",
             "reason": s["reason"][:70]} for s in wf["steps"]]
    _cli().emit(args, wf, head + "\n\n" + _cli().table(rows, ["step", "state", "tasks", "reason"]))
    return 0 if wf["state"] in ("running", "succeeded") else 1


def cmd_wf_show(args) -> int:
    with _client(args) as c:
        wf = c.read("workflow.get", {"id": args.id}, level="leader")
    if wf is None:
        raise _cli().UsageError(f"no workflow {args.id!r}; see `cortex workflows list`")
    _print_workflow(args, wf)
    return 0


def cmd_wf_list(args) -> int:
    with _client(args) as c:
        rows = c.read("workflow.list", {"limit": args.limit}, level="leader")
    _cli().emit(args, rows, _cli().table([{**r, "created": _when(r["created_at"])} for r in rows],
                                         ["id", "name", "version", "state", "created"]))
    return 0


def cmd_wf_cancel(args) -> int:
    with _client(args) as c:
        result = c.write("workflow.cancel", {"workflow_id": args.id}, retry_for=10.0)
    _cli().emit(args, result, f"{args.id}: {result['state']}")
    return 0


def cmd_drain(args) -> int:
    deadline = _cli().parse_duration(args.deadline)
    with _client(args) as c:
        result = c.write("task.drain", {"node_id": args.id, "deadline": deadline}, retry_for=10.0)
    _cli().emit(args, result, f"{args.id}: draining; {result['running']} running task(s) may finish until "
                              f"{time.strftime('%H:%M:%S', time.localtime(result['drain_deadline']))}, "
                              "then they are re-queued elsewhere (`cortex nodes undrain` reverts)")
    return 0


def cmd_undrain(args) -> int:
    with _client(args) as c:
        result = c.write("task.undrain", {"node_id": args.id}, retry_for=10.0)
    _cli().emit(args, result, f"{args.id}: takes tasks again")
    return 0


def register(sub, add, common) -> None:
    """Add the task engine's commands to the `cortex` parser (cli.build_parser calls this)."""
    tasks = sub.add_parser("tasks", help="persistent tasks").add_subparsers(dest="sub", required=True)
    sp = add("submit", cmd_submit, "submit a task (the command goes after --)", tasks)
    sp.add_argument("--kind", default="shell", choices=["shell", "container", "agent", "k8s_job", "noop"])
    sp.add_argument("-f", "--file", help="a whole task document (YAML/JSON, '-' for stdin) instead of options")
    sp.add_argument("--name", default="")
    sp.add_argument("--priority", type=int, default=0)
    sp.add_argument("--time-limit", dest="timeout_s", default="", help="attempt time limit: 30s, 5m, 1h")
    sp.add_argument("--retries", type=int, default=0, help="retries after a failure (then the DLQ)")
    sp.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry; doubles")
    sp.add_argument("--node", action="append", help="only on this node (repeatable)")
    sp.add_argument("--role", choices=["server", "worker"])
    sp.add_argument("--label", action="append", help="node label KEY=VALUE (repeatable)")
    sp.add_argument("--cpus", type=float, default=0)
    sp.add_argument("--memory-mb", type=int, default=0, help="memory reserved on the node")
    sp.add_argument("--gpus", type=int, default=0)
    sp.add_argument("--allow-busy", action="store_true", help="may run on a node its owner is using")
    sp.add_argument("--pack", action="store_true", help="fill busy nodes first instead of spreading")
    sp.add_argument("--env", action="append", help="KEY=VALUE in the task's environment (repeatable)")
    sp.add_argument("--network", action="store_true", help="allow network access (denied by default)")
    sp.add_argument("--cpu-seconds", type=int, default=0, help="CPU time limit")
    sp.add_argument("--memory-limit", type=int, default=0, help="memory limit in MB")
    sp.add_argument("--image", help="container image (--kind container)")
    sp.add_argument("--prompt", help="agent prompt (--kind agent)")
    sp.add_argument("--model", help="agent model (--kind agent)")
    sp.add_argument("--spec", help="kind-specific spec as JSON (other kinds)")
    sp.add_argument("--wait", action="store_true", help="wait and print the result")
    sp.add_argument("--count", type=int, default=1,
                    help="submit this many copies (one command per 1000; `tasks list --group` finds them)")
    sp.add_argument("--group", default="", help="a group name for the tasks (`tasks list --group NAME` lists them)")
    sp.add_argument("--idempotency-key", default=None)
    sp.add_argument("command", nargs="*")
    sp = add("list", cmd_list, "list tasks, newest first", tasks)
    sp.add_argument("--state", choices=STATES)
    sp.add_argument("--node")
    sp.add_argument("--kind")
    sp.add_argument("--group")
    sp.add_argument("--workflow")
    sp.add_argument("--limit", type=int, default=50)
    sp = add("show", cmd_show, "a task's state, attempts and result", tasks)
    sp.add_argument("id")
    sp = add("logs", cmd_logs, "a task's output (-f follows until it ends)", tasks)
    sp.add_argument("id")
    sp.add_argument("-f", "--follow", action="store_true")
    sp = add("cancel", cmd_cancel, "cancel tasks (running ones are killed)", tasks)
    sp.add_argument("ids", nargs="+")
    sp = add("retry", cmd_retry, "run failed or cancelled tasks again", tasks)
    sp.add_argument("ids", nargs="+")
    sp = add("run", cmd_run, "run a command on several nodes and print one aggregated result", tasks)
    sp.add_argument("--all", action="store_true", help="every node that can run shell tasks")
    sp.add_argument("--count", type=int, help="this many nodes")
    sp.add_argument("--node", action="append", help="this node (repeatable)")
    sp.add_argument("--time-limit", dest="timeout_s", default="5m")
    sp.add_argument("--network", action="store_true")
    sp.add_argument("command", nargs="+")
    add("nodes", cmd_task_nodes, "nodes as the scheduler sees them: capacity, busy, FLOPS, running", tasks)

    dlq = sub.add_parser("dlq", help="dead-letter queue: tasks that failed their last attempt", parents=[common])
    dlq.set_defaults(fn=cmd_dlq_list, limit=100)
    dlq_sub = dlq.add_subparsers(dest="sub")
    sp = add("list", cmd_dlq_list, "list dead-lettered tasks", dlq_sub)
    sp.add_argument("--limit", type=int, default=100)
    sp = add("show", cmd_show, "one dead-lettered task in full", dlq_sub)
    sp.add_argument("id")
    sp = add("replay", cmd_dlq_replay, "queue dead-lettered tasks again with a fresh retry budget", dlq_sub)
    sp.add_argument("ids", nargs="*")
    sp.add_argument("--all", action="store_true")

    wf = sub.add_parser("workflows", help="DAG workflows").add_subparsers(dest="sub", required=True)
    sp = add("submit", cmd_wf_submit, "start a workflow from a YAML/JSON file ('-' for stdin)", wf)
    sp.add_argument("file")
    sp.add_argument("--wait", action="store_true")
    sp.add_argument("--idempotency-key", default=None)
    sp = add("show", cmd_wf_show, "a workflow run and its steps", wf)
    sp.add_argument("id")
    sp = add("list", cmd_wf_list, "workflow runs", wf)
    sp.add_argument("--limit", type=int, default=50)
    sp = add("cancel", cmd_wf_cancel, "cancel a workflow run", wf)
    sp.add_argument("id")

    nodes = sub.choices["nodes"]
    # `cortex nodes` may already have sub-commands (pending, approve, ...): add ours to the same group
    existing = [a for a in nodes._actions if isinstance(a, argparse._SubParsersAction)]
    nodes_sub = existing[0] if existing else nodes.add_subparsers(dest="nodes_sub")
    sp = add("drain", cmd_drain, "stop new tasks on a node; re-queue the rest after the deadline", nodes_sub)
    sp.add_argument("id")
    sp.add_argument("--deadline", default="5m", help="how long running tasks may finish: 90s, 5m, 1h")
    sp = add("undrain", cmd_undrain, "let a drained node take tasks again", nodes_sub)
    sp.add_argument("id")

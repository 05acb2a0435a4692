"""DAG workflows as data, and the `workflow` state domain.

A workflow (YAML or JSON):

    name: nightly
    params: {region: eu}                  # visible to conditions as `params`
    steps:
      - name: list
        task: {kind: shell, spec: {command: "echo '{\\"files\\": [1,2,3]}' > $CORTEX_RESULT"}}
      - name: work                        # fan-out: one task per item, "{{item}}" substituted
        depends_on: [list]
        for_each: "steps.list.result.files"          # CEL, or a literal list
        task: {kind: shell, spec: {command: "echo {{item}}"}}
      - name: summary                     # fan-in: $CORTEX_INPUTS holds the upstream results (JSON)
        depends_on: [work]
        trigger: all_done                 # all_success (default) | all_done | one_failed | one_success
        when: "steps.work.succeeded > 0"  # CEL over upstream states and results
        task: {kind: shell, spec: {command: "printf %s \"$CORTEX_INPUTS\""}}

Checked at submit: unique step names, known dependencies, no cycle (the error names it), every task spec,
every CEL expression compiles. The definition is versioned by name (a changed spec under the same name is the
next version). The leader advances a run (`workflow.advance`, internal): a step whose upstream steps have all
finished is run, skipped (trigger rule or condition false) or failed (its condition could not be evaluated);
conditions run in the CEL child process with a time limit (celeval.py). Step and workflow states then follow
deterministically from task states, in the same transaction as the task's report.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re

from cortex.core import domain
from cortex.core.commands import CommandError, Envelope
from cortex.tasks.celeval import CelError, Evaluator, compile_check
from cortex.tasks.lifecycle import (
    STEP_TERMINAL,
    cancel_task,
    get_task,
    insert_task,
    settle_workflow,
)
from cortex.tasks.spec import validate_task

TRIGGERS = ("all_success", "all_done", "one_failed", "one_success")
MAX_STEPS = 200
MAX_FAN_OUT = 1000
INPUTS_CAP = 32 * 1024
_STEP_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_ENV_KINDS = ("shell", "container")  # kinds whose spec takes an `env` map (fan-in inputs go there)

MIGRATIONS = (
    """
    CREATE TABLE workflow_defs (
        name TEXT NOT NULL, version INTEGER NOT NULL, spec_hash TEXT NOT NULL, spec TEXT NOT NULL,
        created_at REAL NOT NULL, PRIMARY KEY (name, version)
    );
    CREATE TABLE workflows (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, version INTEGER NOT NULL, state TEXT NOT NULL,
        params TEXT NOT NULL, created_at REAL NOT NULL, finished_at REAL, updated_at REAL NOT NULL
    );
    CREATE INDEX workflows_by_state ON workflows (state);
    CREATE TABLE workflow_steps (
        workflow_id TEXT NOT NULL, name TEXT NOT NULL, position INTEGER NOT NULL, state TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '', tasks_total INTEGER NOT NULL DEFAULT 0,
        started_at REAL, finished_at REAL, PRIMARY KEY (workflow_id, name)
    );
    """,
)
TABLES = ("workflow_defs", "workflows", "workflow_steps")


# --- validation (pure) ---------------------------------------------------------------------------------------

def find_cycle(deps: dict[str, list[str]]) -> list[str] | None:
    """A dependency cycle as a path (a -> b -> a), or None."""
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = 1
        stack.append(node)
        for nxt in deps.get(node, []):
            if color.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if color.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        color[node] = 2
        return None

    for node in sorted(deps):
        if color.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


def validate_workflow(doc) -> dict:
    if not isinstance(doc, dict):
        raise CommandError("a workflow must be an object with name and steps")
    extra = set(doc) - {"name", "params", "steps"}
    if extra:
        raise CommandError(f"workflow: unknown field(s) {', '.join(sorted(extra))}; allowed: name, params, steps")
    name = doc.get("name")
    if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", name):
        raise CommandError("workflow.name must be 1-128 letters, digits and ._-")
    params = doc.get("params", {})
    if not isinstance(params, dict) or len(json.dumps(params)) > 64 * 1024:
        raise CommandError("workflow.params must be an object of at most 64 KiB")
    steps = doc.get("steps")
    if not isinstance(steps, list) or not steps:
        raise CommandError("workflow.steps must be a non-empty list")
    if len(steps) > MAX_STEPS:
        raise CommandError(f"at most {MAX_STEPS} steps per workflow")
    out, names = [], set()
    for i, step in enumerate(steps):
        where = f"step {i + 1}"
        if not isinstance(step, dict):
            raise CommandError(f"{where} must be an object")
        bad = set(step) - {"name", "task", "depends_on", "trigger", "when", "for_each"}
        if bad:
            raise CommandError(f"{where}: unknown field(s) {', '.join(sorted(bad))}")
        sname = step.get("name")
        if not isinstance(sname, str) or not _STEP_RE.match(sname):
            raise CommandError(f"{where}: name must match [a-z][a-z0-9_]* (it is a CEL identifier)")
        if sname in names:
            raise CommandError(f"step name {sname!r} is used twice")
        names.add(sname)
        where = f"step {sname}"
        deps = step.get("depends_on", [])
        if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
            raise CommandError(f"{where}: depends_on must be a list of step names")
        trigger = step.get("trigger", "all_success")
        if trigger not in TRIGGERS:
            raise CommandError(f"{where}: trigger must be one of {', '.join(TRIGGERS)}")
        when = step.get("when")
        if when is not None:
            try:
                compile_check(when)
            except CelError as exc:
                raise CommandError(f"{where}: when: {exc}") from None
        for_each = step.get("for_each")
        if isinstance(for_each, str):
            try:
                compile_check(for_each)
            except CelError as exc:
                raise CommandError(f"{where}: for_each: {exc}") from None
        elif for_each is not None and not (isinstance(for_each, list) and len(for_each) <= MAX_FAN_OUT):
            raise CommandError(f"{where}: for_each must be a CEL expression or a list of at most {MAX_FAN_OUT}")
        try:
            task = validate_task(step.get("task"))
        except CommandError as exc:
            raise CommandError(f"{where}: {exc}") from None
        out.append({"name": sname, "task": task, "depends_on": sorted(set(deps)), "trigger": trigger,
                    "when": when, "for_each": for_each})
    for step in out:
        unknown = [d for d in step["depends_on"] if d not in names]
        if unknown:
            raise CommandError(f"step {step['name']}: depends on unknown step(s) {', '.join(unknown)}")
    cycle = find_cycle({s["name"]: s["depends_on"] for s in out})
    if cycle:
        raise CommandError(f"workflow has a cycle: {' -> '.join(cycle)}; a workflow must be a DAG")
    return {"name": name, "params": params, "steps": out}


def _v_submit(args: dict) -> dict:
    if set(args) - {"workflow"}:
        raise CommandError("workflow.submit takes {workflow: {...}}")
    return {"workflow": validate_workflow(args.get("workflow"))}


def _v_advance(args: dict) -> dict:
    if not isinstance(args.get("workflow_id"), str) or not isinstance(args.get("decisions"), list):
        raise CommandError("workflow.advance takes workflow_id and decisions")
    decisions = []
    for d in args["decisions"]:
        if not isinstance(d, dict) or d.get("action") not in ("run", "skip", "fail") or \
                not isinstance(d.get("step"), str):
            raise CommandError("each decision needs a step and an action (run, skip, fail)")
        tasks = [validate_task(t) for t in d.get("tasks", [])]
        decisions.append({"step": d["step"], "action": d["action"], "reason": str(d.get("reason", ""))[:2000],
                          "tasks": tasks})
    return {"workflow_id": args["workflow_id"], "decisions": decisions}


def _v_cancel(args: dict) -> dict:
    if set(args) != {"workflow_id"} or not isinstance(args["workflow_id"], str):
        raise CommandError("workflow.cancel takes {workflow_id}")
    return {"workflow_id": args["workflow_id"]}


# --- apply (deterministic) -----------------------------------------------------------------------------------

def _j(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _h_submit(db, index, env) -> dict:
    spec = env.args["workflow"]
    text = _j(spec)
    digest = hashlib.sha256(text.encode()).hexdigest()
    latest = db.execute("SELECT version, spec_hash FROM workflow_defs WHERE name=? ORDER BY version DESC LIMIT 1",
                        (spec["name"],)).fetchone()
    if latest and latest[1] == digest:
        version = latest[0]
    else:
        version = (latest[0] if latest else 0) + 1
        db.execute("INSERT INTO workflow_defs VALUES (?, ?, ?, ?, ?)", (spec["name"], version, digest, text, env.ts))
    wf_id = "w" + env.id[:12]
    db.execute("INSERT INTO workflows VALUES (?, ?, ?, 'running', ?, ?, NULL, ?)",
               (wf_id, spec["name"], version, _j(spec["params"]), env.ts, env.ts))
    for position, step in enumerate(spec["steps"]):
        db.execute("INSERT INTO workflow_steps (workflow_id, name, position, state) VALUES (?, ?, ?, 'pending')",
                   (wf_id, step["name"], position))
    return {"workflow_id": wf_id, "name": spec["name"], "version": version}


def _spec_of(db, wf_id: str) -> tuple[dict, str] | None:
    row = db.execute("SELECT d.spec, w.state FROM workflows w JOIN workflow_defs d ON d.name = w.name "
                     "AND d.version = w.version WHERE w.id=?", (wf_id,)).fetchone()
    return (json.loads(row[0]), row[1]) if row else None


def _h_advance(db, index, env) -> dict:
    wf_id = env.args["workflow_id"]
    found = _spec_of(db, wf_id)
    if found is None or found[1] != "running":
        return {"workflow_id": wf_id, "applied": 0}
    applied = 0
    for d in env.args["decisions"]:
        row = db.execute("SELECT state FROM workflow_steps WHERE workflow_id=? AND name=?",
                         (wf_id, d["step"])).fetchone()
        if row is None or row[0] != "pending":
            continue  # decided already (a repeated or a deposed leader's decision)
        applied += 1
        if d["action"] == "run" and d["tasks"]:
            for i, doc in enumerate(d["tasks"]):
                task_id = f"{wf_id}.{d['step']}" + (f".{i}" if len(d["tasks"]) > 1 else "")
                insert_task(db, env, task_id, index * 10000 + i, doc, workflow=wf_id, step=d["step"], item=i)
            db.execute("UPDATE workflow_steps SET state='running', tasks_total=?, started_at=?, reason=? "
                       "WHERE workflow_id=? AND name=?", (len(d["tasks"]), env.ts, d["reason"], wf_id, d["step"]))
        else:
            state = {"run": "succeeded", "skip": "skipped", "fail": "failed"}[d["action"]]
            db.execute("UPDATE workflow_steps SET state=?, reason=?, started_at=?, finished_at=? "
                       "WHERE workflow_id=? AND name=?", (state, d["reason"], env.ts, env.ts, wf_id, d["step"]))
    settle_workflow(db, env, wf_id)
    return {"workflow_id": wf_id, "applied": applied}


def _h_cancel(db, index, env) -> dict:
    wf_id = env.args["workflow_id"]
    row = db.execute("SELECT state FROM workflows WHERE id=?", (wf_id,)).fetchone()
    if row is None:
        return {"error": f"no workflow {wf_id!r}; see `cortex workflows list`"}
    if row[0] != "running":
        return {"workflow_id": wf_id, "state": row[0]}
    db.execute("UPDATE workflows SET state='cancelled', finished_at=?, updated_at=? WHERE id=?", (env.ts, env.ts, wf_id))
    db.execute("UPDATE workflow_steps SET state='cancelled', finished_at=? WHERE workflow_id=? AND state='pending'",
               (env.ts, wf_id))
    cancelled = 0
    for (task_id,) in db.execute("SELECT id FROM tasks WHERE workflow=? AND state NOT IN "
                                 "('succeeded','failed','cancelled')", (wf_id,)).fetchall():
        cancel_task(db, env, get_task(db, task_id))
        cancelled += 1
    db.execute("UPDATE workflow_steps SET state='cancelled', finished_at=? WHERE workflow_id=? AND state='running'",
               (env.ts, wf_id))
    return {"workflow_id": wf_id, "state": "cancelled", "tasks_cancelled": cancelled}


# --- queries -------------------------------------------------------------------------------------------------

def _step_results(db, wf_id: str, step: str) -> dict:
    rows = db.execute("SELECT id, state, exit_code, result, node FROM tasks WHERE workflow=? AND step=? ORDER BY item",
                      (wf_id, step)).fetchall()
    results = [(json.loads(r) if r else {}).get("value") for _, _, _, r, _ in rows]
    return {"tasks": [{"id": i, "state": s, "exit_code": e, "node": n} for i, s, e, _, n in rows],
            "results": results, "result": results[0] if len(results) == 1 else (results or None),
            "exit_codes": [e for _, _, e, _, _ in rows],
            "succeeded": sum(1 for _, s, _, _, _ in rows if s == "succeeded"),
            "failed": sum(1 for _, s, _, _, _ in rows if s in ("failed", "cancelled"))}


def _q_get(db, args) -> dict | None:
    wf_id = str(args.get("id", ""))
    row = db.execute("SELECT id, name, version, state, params, created_at, finished_at FROM workflows WHERE id=?",
                     (wf_id,)).fetchone()
    if row is None:
        return None
    out = dict(zip(("id", "name", "version", "state", "params", "created_at", "finished_at"), row))
    out["params"] = json.loads(out["params"])
    out["steps"] = []
    # each step's dependencies, from the definition this run uses: what a drawn DAG needs (the web console)
    spec = db.execute("SELECT spec FROM workflow_defs WHERE name=? AND version=?", (out["name"], out["version"])).fetchone()
    deps = {s["name"]: s.get("depends_on", []) for s in (json.loads(spec[0]).get("steps", []) if spec else [])}
    for name, state, reason, total in db.execute(
            "SELECT name, state, reason, tasks_total FROM workflow_steps WHERE workflow_id=? ORDER BY position",
            (wf_id,)):
        out["steps"].append({"name": name, "state": state, "reason": reason, "tasks_total": total,
                             **_step_results(db, wf_id, name), "depends_on": deps.get(name, [])})
    return out


def _q_list(db, args) -> list[dict]:
    limit = max(1, min(int(args.get("limit", 100)), 1000))
    where, params = "", ()
    if args.get("state"):
        where, params = " WHERE state=?", (str(args["state"]),)
    cols = ("id", "name", "version", "state", "created_at", "finished_at")
    return [dict(zip(cols, r)) for r in db.execute(
        f"SELECT {', '.join(cols)} FROM workflows{where} ORDER BY created_at DESC LIMIT ?", (*params, limit))]


def _q_pending(db, args) -> list[dict]:
    """Running workflows with a pending step whose upstream steps have all finished (the leader's work)."""
    out = []
    for wf_id, params in db.execute("SELECT id, params FROM workflows WHERE state='running' ORDER BY created_at"):
        spec, _ = _spec_of(db, wf_id)
        states = dict(db.execute("SELECT name, state FROM workflow_steps WHERE workflow_id=?", (wf_id,)).fetchall())
        ready = [s for s in spec["steps"] if states[s["name"]] == "pending"
                 and all(states[d] in STEP_TERMINAL for d in s["depends_on"])]
        if not ready:
            continue
        needed = {d for s in ready for d in s["depends_on"]}
        out.append({"id": wf_id, "params": json.loads(params), "ready": ready,
                    "steps": {name: {"state": states[name], **_step_results(db, wf_id, name)} for name in needed}})
    return out


def _q_defs(db, args) -> list[dict]:
    return [dict(zip(("name", "version", "spec_hash", "created_at"), r)) for r in db.execute(
        "SELECT name, version, spec_hash, created_at FROM workflow_defs ORDER BY name, version")]


def _events(env: Envelope, result: dict) -> list[tuple[str, dict]]:
    if env.type == "workflow.submit":
        return [("workflow.submitted", {"workflow_id": result["workflow_id"]})]
    if env.type == "workflow.advance" and result.get("applied"):
        return [("workflow.advanced", {"workflow_id": result["workflow_id"]})]
    if env.type == "workflow.cancel" and result.get("state") == "cancelled":
        return [("workflow.cancelled", {"workflow_id": result["workflow_id"]})]
    return []


DOMAIN = domain.Domain(
    name="workflow",
    migrations=MIGRATIONS,
    tables=TABLES,
    commands={
        "workflow.submit": domain.Command(_v_submit, _h_submit),
        "workflow.advance": domain.Command(_v_advance, _h_advance, internal=True),
        "workflow.cancel": domain.Command(_v_cancel, _h_cancel),
    },
    queries={"workflow.get": _q_get, "workflow.list": _q_list, "workflow.pending": _q_pending,
             "workflow.defs": _q_defs},
    events=_events,
)


# --- the leader's decisions ------------------------------------------------------------------------------------

_evaluator = Evaluator()


def _template(value, item):
    """Replace {{item}} in every string of a task document (JSON text for non-string items)."""
    if isinstance(value, str):
        text = item if isinstance(item, str) else json.dumps(item)
        return value.replace("{{item}}", text)
    if isinstance(value, list):
        return [_template(v, item) for v in value]
    if isinstance(value, dict):
        return {k: _template(v, item) for k, v in value.items()}
    return value


def _trigger_ok(rule: str, dep_states: list[str]) -> bool:
    if rule == "all_success":
        return all(s == "succeeded" for s in dep_states)
    if rule == "one_failed":
        return any(s in ("failed", "cancelled") for s in dep_states)
    if rule == "one_success":
        return any(s == "succeeded" for s in dep_states)
    return True  # all_done


def decide(wf: dict, evaluate=None) -> list[dict]:
    """The leader's decisions for one workflow's ready steps (CEL through `evaluate(expr, context)`)."""
    evaluate = evaluate or _evaluator.evaluate
    context = {"steps": wf["steps"], "params": wf["params"]}
    decisions = []
    for step in wf["ready"]:
        dep_states = [wf["steps"][d]["state"] for d in step["depends_on"]]
        if not _trigger_ok(step["trigger"], dep_states):
            decisions.append({"step": step["name"], "action": "skip",
                              "reason": f"trigger {step['trigger']} not met (upstream: {', '.join(dep_states)})"})
            continue
        try:
            if step["when"] is not None:
                verdict = evaluate(step["when"], context)
                if not isinstance(verdict, bool):
                    raise CelError(f"condition must be true or false, got {verdict!r}")
                if not verdict:
                    decisions.append({"step": step["name"], "action": "skip", "reason": f"when: {step['when']}"})
                    continue
            items = [None]
            if step["for_each"] is not None:
                items = step["for_each"] if isinstance(step["for_each"], list) else evaluate(step["for_each"], context)
                if not isinstance(items, list) or len(items) > MAX_FAN_OUT:
                    raise CelError(f"for_each must give a list of at most {MAX_FAN_OUT} items, got {str(items)[:100]}")
            tasks = [_task_for(step, item, wf, fan_out=step["for_each"] is not None) for item in items]
            decisions.append({"step": step["name"], "action": "run", "tasks": tasks,
                              "reason": f"{len(tasks)} task(s)"})
        except (CelError, CommandError) as exc:
            decisions.append({"step": step["name"], "action": "fail", "reason": str(exc)})
    return decisions


def _task_for(step: dict, item, wf: dict, fan_out: bool) -> dict:
    task = copy.deepcopy(step["task"])
    if fan_out:
        task = _template(task, item)
    if task["kind"] in _ENV_KINDS and step["depends_on"]:
        inputs = {d: {k: wf["steps"][d][k] for k in ("state", "results", "exit_codes")} for d in step["depends_on"]}
        text = json.dumps(inputs)
        if len(text) > INPUTS_CAP:
            text = json.dumps({"truncated": True, "bytes": len(text)})
        task["spec"].setdefault("env", {})["CORTEX_INPUTS"] = text
    if fan_out:
        task["spec"].setdefault("env", {}) if task["kind"] in _ENV_KINDS else None
        if task["kind"] in _ENV_KINDS:
            task["spec"]["env"]["CORTEX_ITEM"] = item if isinstance(item, str) else json.dumps(item)
    return validate_task(task)


def leader_advance(cluster, log) -> bool:
    """Propose decisions for every workflow with ready steps; True when anything was decided."""
    decided = False
    for wf in cluster.read("workflow.pending", {}, level="leader"):
        decisions = decide(wf)
        if decisions:
            cluster.propose("workflow.advance", {"workflow_id": wf["id"], "decisions": decisions})
            decided = True
    return decided

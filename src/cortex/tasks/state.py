r"""The `task` state domain: persistent tasks, attempts, capped output, node resources, draining, the DLQ.

Every state change is a typed command applied deterministically (env.ts is "now", env.id makes ids):

    queued --task.assign--> assigned --task.start--> running --task.report--> succeeded
       ^                       |                        |                 \-> failed (dead-letter queue)
       |                       +-----task.requeue-------+ (node lost / drain deadline)
       +---- retry after backoff (task.report of a retryable failure) / task.retry (DLQ replay)

At-least-once execution, exactly-once recording: an assignment creates attempt N (N only grows) stamped with
the assigning leader's term. `task.start`, `task.report` and `task.output` name (attempt, term); anything that
does not match the task's current attempt and term, or comes after the attempt ended, is rejected, so a
report from a node that was presumed lost, a duplicate report, or one replayed after a failover changes
nothing. The result of a task is therefore recorded once, by the first valid report of its current attempt.

Output is stored here in chunks, capped per attempt (OUTPUT_CAP) with a truncation marker: logs survive the
loss of the node that produced them and `cortex tasks logs -f` works from any node; the cap bounds what a
flooding task can put into the Raft log.

This module holds the tables and the handlers that change them; the checks a command passes before it
enters the log are in validators.py, the read-only queries in queries.py, and the task rows and transitions
the workflow domain shares in lifecycle.py.
"""

from __future__ import annotations

import json

from cortex.core import domain
from cortex.core.commands import Envelope
from cortex.tasks import queries, validators
from cortex.tasks import spec as specs
from cortex.tasks.lifecycle import (
    ACTIVE,
    INSERT_TASK,
    OUTPUT_CAP,
    STATES,
    TERMINAL,
    TRUNCATION_MARKER,
    cancel_task,
    end_attempt,
    finish,
    get_task,
    task_row,
    to_json,
)

__all__ = ["DOMAIN", "STATES", "TERMINAL"]  # the state names the CLI imports from here


MIGRATIONS = (
    """
    CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,                 -- submission order (log index * 10000 + position)
        kind TEXT NOT NULL,
        name TEXT NOT NULL DEFAULT '',
        spec TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        placement TEXT NOT NULL,
        retry TEXT NOT NULL,
        timeout REAL,
        state TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 0,   -- the current (or last) attempt; only grows
        failures INTEGER NOT NULL DEFAULT 0,  -- failed attempts counted against retry.max_attempts
        node TEXT,
        term INTEGER,                         -- term of the leader that made the current assignment
        not_before REAL NOT NULL DEFAULT 0,   -- retry backoff: not assigned before this time
        submitted_at REAL NOT NULL,
        assigned_at REAL, started_at REAL, finished_at REAL,
        updated_at REAL NOT NULL,
        exit_code INTEGER,
        error TEXT NOT NULL DEFAULT '',
        result TEXT,
        dlq INTEGER NOT NULL DEFAULT 0,
        dlq_at REAL,
        grp TEXT,                             -- run_distributed group
        workflow TEXT, step TEXT, item INTEGER,
        output_bytes INTEGER NOT NULL DEFAULT 0,
        output_dropped INTEGER NOT NULL DEFAULT 0,
        output_seq INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX tasks_by_state ON tasks (state, priority, seq);
    CREATE INDEX tasks_by_node ON tasks (node, state);
    CREATE INDEX tasks_by_group ON tasks (grp);
    CREATE INDEX tasks_by_workflow ON tasks (workflow, step);
    CREATE INDEX tasks_dlq ON tasks (dlq, dlq_at);
    CREATE TABLE task_attempts (
        task_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        node TEXT NOT NULL,
        term INTEGER NOT NULL,
        assigned_at REAL NOT NULL,
        started_at REAL, finished_at REAL,
        outcome TEXT NOT NULL,                -- assigned, running, succeeded, failed, lost, cancelled
        exit_code INTEGER,
        error TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (task_id, attempt)
    );
    CREATE TABLE task_output (
        task_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        stream TEXT NOT NULL,                 -- stdout, stderr, marker
        data TEXT NOT NULL,
        ts REAL NOT NULL,
        PRIMARY KEY (task_id, seq)
    );
    CREATE TABLE task_nodes (
        node_id TEXT PRIMARY KEY,
        capacity TEXT NOT NULL DEFAULT '{}',  -- cpus, memory_mb, gpus, slots
        usage TEXT NOT NULL DEFAULT '{}',     -- cpu_percent, load, memory_available_mb, ... (coarse)
        labels TEXT NOT NULL DEFAULT '{}',
        kinds TEXT NOT NULL DEFAULT '[]',     -- task kinds this node can run now
        busy INTEGER NOT NULL DEFAULT 0,
        benchmark TEXT NOT NULL DEFAULT '{}',
        reported_at REAL,
        drained INTEGER NOT NULL DEFAULT 0,
        drain_deadline REAL,
        drained_at REAL
    );
    """,
    # 2: the scheduler's read in its own order (priority DESC, seq ASC cannot be read off an ascending index:
    # SQLite sorted the whole queue every round), and the earliest retry time without scanning the queue
    """
    DROP INDEX tasks_by_state;
    CREATE INDEX tasks_ready ON tasks (state, priority DESC, seq);
    CREATE INDEX tasks_backoff ON tasks (state, not_before);
    """,
)
TABLES = ("tasks", "task_attempts", "task_output", "task_nodes")


# --- handlers ----------------------------------------------------------------------------------------------

def _h_submit(db, index, env) -> dict:
    tasks = env.args["tasks"]
    named = sorted({n for doc in tasks for n in doc["placement"]["nodes"]})
    unknown = [n for n in named if not _node_known(db, n)]
    if unknown:
        return {"error": f"unknown node(s) {', '.join(unknown)} in placement.nodes; see `cortex nodes`"}
    base = "t" + env.id[:12]
    if db.execute("SELECT 1 FROM tasks WHERE id=? OR id=?", (base, base + "-0")).fetchone():
        base = "t" + env.id  # a 48-bit prefix collided: the full id is unique
    ids = [base] if len(tasks) == 1 else [f"{base}-{i}" for i in range(len(tasks))]
    group = env.args.get("group")
    db.executemany(INSERT_TASK, [task_row(env, task_id, index * 10000 + i, doc, group, None, None, None)
                                  for i, (task_id, doc) in enumerate(zip(ids, tasks))])
    return {"task_ids": ids}


def _node_known(db, node_id: str) -> bool:
    return db.execute("SELECT 1 FROM nodes WHERE id=? AND liveness!='left'", (node_id,)).fetchone() is not None


def _h_assign(db, index, env) -> dict:
    assigned, skipped, nodes = [], [], set()
    usable: dict[str, bool] = {}  # node -> known and not draining (one lookup per node, not per task)
    for a in env.args["assignments"]:
        node_id = a["node_id"]
        if node_id not in usable:
            drained = db.execute("SELECT drained FROM task_nodes WHERE node_id=?", (node_id,)).fetchone()
            usable[node_id] = _node_known(db, node_id) and not (drained and drained[0])
        # Only a queued task, and only as the next attempt: a second leader's (or a repeated) decision for the
        # same task finds it assigned already and changes nothing (the guarded UPDATE matches no row).
        if not usable[node_id] or db.execute(
                """UPDATE tasks SET state='assigned', attempt=?, node=?, term=?, assigned_at=?, started_at=NULL,
                   updated_at=?, output_bytes=0, output_dropped=0 WHERE id=? AND state='queued' AND attempt=?""",
                (a["attempt"], node_id, env.term, env.ts, env.ts, a["task_id"], a["attempt"] - 1)).rowcount != 1:
            skipped.append(a["task_id"])
            continue
        db.execute("INSERT INTO task_attempts (task_id, attempt, node, term, assigned_at, outcome) "
                   "VALUES (?, ?, ?, ?, ?, 'assigned')", (a["task_id"], a["attempt"], node_id, env.term, env.ts))
        assigned.append(a["task_id"])
        nodes.add(node_id)
    return {"assigned": assigned, "skipped": skipped, "nodes": sorted(nodes)}


# What start/report/output need of a task: no JSON decoded (retry is parsed only when an attempt failed).
_CURRENT_COLUMNS = ("id", "state", "attempt", "term", "node", "failures", "retry", "workflow", "step",
                    "output_bytes", "output_seq", "output_dropped")
_CURRENT_SQL = ", ".join(_CURRENT_COLUMNS)


def _current(db, ref: dict, node_id: str | None) -> dict | None:
    """The task if (attempt, term[, node]) name its current attempt, else None (stale)."""
    row = db.execute(f"SELECT {_CURRENT_SQL} FROM tasks WHERE id=?", (ref["task_id"],)).fetchone()
    task = dict(zip(_CURRENT_COLUMNS, row)) if row else None
    if task is None or task["attempt"] != ref["attempt"] or task["term"] != ref["term"]:
        return None
    if node_id is not None and task["node"] != node_id:
        return None
    return task


def _h_start(db, index, env) -> dict:
    started, rejected = _apply_starts(db, env, env.args["node_id"], env.args["starts"])
    return {"started": started, "rejected": rejected}


def _apply_starts(db, env, node_id: str, starts: list[dict]) -> tuple[list, list]:
    started, rejected = [], []
    for ref in starts:
        # the common case in one statement: the named attempt is current, here, and assigned
        if db.execute("UPDATE tasks SET state='running', started_at=?, updated_at=? WHERE id=? AND attempt=? "
                      "AND term=? AND node=? AND state='assigned'",
                      (env.ts, env.ts, ref["task_id"], ref["attempt"], ref["term"], node_id)).rowcount != 1:
            task = _current(db, ref, node_id)
            if task is not None and task["state"] == "running":
                started.append(ref["task_id"])  # a retried start whose first answer was lost: still this node's
            else:
                rejected.append({"task_id": ref["task_id"], "attempt": ref["attempt"],
                                 "state": task["state"] if task else "stale"})
            continue
        db.execute("UPDATE task_attempts SET outcome='running', started_at=? WHERE task_id=? AND attempt=?",
                   (env.ts, ref["task_id"], ref["attempt"]))
        started.append(ref["task_id"])
    return started, rejected


def apply_outcome(db, env, task: dict, r: dict) -> str:
    """Record the end of the task's current attempt; returns the task's new state."""
    ok = r["exit_code"] == 0 and not r["error"] and not r["failure"]
    result = to_json(r["result"]) if r["result"] else None
    if ok:
        state, outcome = "succeeded", "succeeded"
    elif task["state"] == "cancelling" or r["failure"] == "cancelled":
        state, outcome = "cancelled", "cancelled"
    elif r["failure"] == "lost":
        state, outcome = "queued", "lost"
    else:
        failures = task["failures"] + 1
        retry_doc = task["retry"]
        policy = specs.retry_from_doc(json.loads(retry_doc) if isinstance(retry_doc, str) else retry_doc)
        category = r["failure"] or ("exit" if r["exit_code"] is not None else "error")
        retry = r["retryable"] and category in policy.on and failures < policy.max_attempts
        state, outcome = ("queued" if retry else "failed"), "failed"
        db.execute("UPDATE tasks SET failures=? WHERE id=?", (failures, task["id"]))
        if retry:
            db.execute("UPDATE tasks SET not_before=? WHERE id=?",
                       (env.ts + policy.delay(task["id"], failures), task["id"]))
    end_attempt(db, env, task["id"], task["attempt"], outcome, r["exit_code"], r["error"])
    if state == "queued":
        db.execute("UPDATE tasks SET state='queued', node=NULL, updated_at=?, error=?, exit_code=? WHERE id=?",
                   (env.ts, r["error"], r["exit_code"], task["id"]))
        return state
    db.execute("""UPDATE tasks SET state=?, finished_at=?, updated_at=?, exit_code=?, error=?, result=?,
                  dlq=?, dlq_at=? WHERE id=?""",
               (state, env.ts, env.ts, r["exit_code"], r["error"], result, int(state == "failed"),
                env.ts if state == "failed" else None, task["id"]))
    finish(db, env, task, state)
    return state


def _succeeded_fast(db, env, node_id: str, r: dict) -> bool:
    """A success of the current attempt of a task outside workflows, recorded in two statements (the common
    case); False when the general path must decide (stale, failed, in a workflow)."""
    if r["exit_code"] != 0 or r["error"] or r["failure"]:
        return False
    if db.execute("""UPDATE tasks SET state='succeeded', finished_at=?, updated_at=?, exit_code=0, error='',
                     result=?, dlq=0, dlq_at=NULL
                     WHERE id=? AND attempt=? AND term=? AND node=? AND state IN ('assigned','running','cancelling')
                       AND workflow IS NULL""",
                  (env.ts, env.ts, to_json(r["result"]) if r["result"] else None, r["task_id"], r["attempt"], r["term"],
                   node_id)).rowcount != 1:
        return False
    end_attempt(db, env, r["task_id"], r["attempt"], "succeeded", 0, "")
    return True


def _h_report(db, index, env) -> dict:
    out = {}
    if "starts" in env.args:
        out["started"], out["start_rejected"] = _apply_starts(db, env, env.args["node_id"], env.args["starts"])
    recorded, rejected = [], []
    for r in env.args["reports"]:
        if _succeeded_fast(db, env, env.args["node_id"], r):
            recorded.append({"task_id": r["task_id"], "state": "succeeded"})
            continue
        task = _current(db, r, env.args["node_id"])
        if task is None or task["state"] not in ACTIVE:
            rejected.append({"task_id": r["task_id"], "attempt": r["attempt"],
                             "state": task["state"] if task else "stale"})
            continue
        recorded.append({"task_id": r["task_id"], "state": apply_outcome(db, env, task, r)})
    return {"recorded": recorded, "rejected": rejected, **out}


def _h_output(db, index, env) -> dict:
    stored = dropped = 0
    for c in env.args["chunks"]:
        task = _current(db, c, env.args["node_id"])
        if task is None or task["state"] not in ACTIVE:
            continue
        used, seq, data = task["output_bytes"], task["output_seq"], c["data"]
        room = OUTPUT_CAP - used
        extra_dropped = c["dropped"]
        if room <= 0:
            extra_dropped += len(data.encode())
            data = ""
        elif len(data.encode()) > room:
            raw = data.encode()
            extra_dropped += len(raw) - room
            data = raw[:room].decode("utf-8", "ignore")
        if data:
            seq += 1
            db.execute("INSERT INTO task_output VALUES (?, ?, ?, ?, ?, ?)",
                       (task["id"], seq, task["attempt"], c["stream"], data, env.ts))
            used += len(data.encode())
            stored += 1
        if extra_dropped and task["output_dropped"] == 0:
            seq += 1  # the marker, once per attempt, where the output stops
            db.execute("INSERT INTO task_output VALUES (?, ?, ?, 'marker', ?, ?)",
                       (task["id"], seq, task["attempt"], TRUNCATION_MARKER.format(cap=OUTPUT_CAP), env.ts))
        db.execute("UPDATE tasks SET output_bytes=?, output_seq=?, output_dropped=output_dropped+? WHERE id=?",
                   (used if not extra_dropped else max(used, OUTPUT_CAP), seq, extra_dropped, task["id"]))
        dropped += extra_dropped
    return {"stored": stored, "dropped": dropped}


def _h_cancel(db, index, env) -> dict:
    out, missing = {}, []
    for task_id in env.args["task_ids"]:
        task = get_task(db, task_id)
        if task is None:
            missing.append(task_id)
            continue
        out[task_id] = cancel_task(db, env, task)
    if missing and not out:
        return {"error": f"no such task: {', '.join(missing)}; see `cortex tasks list`"}
    return {"states": out, "missing": missing}


def _h_requeue(db, index, env) -> dict:
    requeued = []
    for r in env.args["requeues"]:
        task = get_task(db, r["task_id"])
        if task is None or task["attempt"] != r["attempt"] or task["state"] not in ACTIVE:
            continue
        state = apply_outcome(db, env, task, {"exit_code": None, "error": r["reason"], "failure": "lost",
                                              "retryable": True, "result": {}})
        requeued.append({"task_id": task["id"], "state": state})
    return {"requeued": requeued}


def _h_retry(db, index, env) -> dict:
    """Replay from the dead-letter queue, or run a failed/cancelled task again: a fresh retry budget."""
    out, problems = [], []
    for task_id in env.args["task_ids"]:
        task = get_task(db, task_id)
        if task is None:
            problems.append(f"{task_id}: no such task")
        elif task["state"] not in ("failed", "cancelled"):
            problems.append(f"{task_id}: is {task['state']}; only failed or cancelled tasks can be retried")
        else:
            db.execute("""UPDATE tasks SET state='queued', failures=0, not_before=0, dlq=0, dlq_at=NULL, node=NULL,
                          finished_at=NULL, error='', exit_code=NULL, result=NULL, updated_at=? WHERE id=?""",
                       (env.ts, task_id))
            out.append(task_id)
    if problems and not out:
        return {"error": "; ".join(problems)}
    return {"requeued": out, "problems": problems}


def _h_node_report(db, index, env) -> dict:
    a = env.args
    db.execute("""INSERT INTO task_nodes (node_id, capacity, usage, labels, kinds, busy, benchmark, reported_at)
                  VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                  ON CONFLICT(node_id) DO UPDATE SET capacity=excluded.capacity, usage=excluded.usage,
                    labels=excluded.labels, kinds=excluded.kinds, busy=excluded.busy,
                    benchmark=CASE WHEN excluded.benchmark = '{}' THEN task_nodes.benchmark
                                   ELSE excluded.benchmark END,
                    reported_at=excluded.reported_at""",
               (a["node_id"], to_json(a["capacity"]), to_json(a["usage"]), to_json(a["labels"]), to_json(a["kinds"]), int(a["busy"]),
                to_json(a["benchmark"]), env.ts))
    return {"node_id": a["node_id"]}


def _h_drain(db, index, env) -> dict:
    node_id = env.args["node_id"]
    if not _node_known(db, node_id):
        return {"error": f"no node {node_id!r} in this cluster; see `cortex nodes`"}
    deadline = env.ts + env.args["deadline"]
    db.execute("""INSERT INTO task_nodes (node_id, drained, drain_deadline, drained_at) VALUES (?, 1, ?, ?)
                  ON CONFLICT(node_id) DO UPDATE SET drained=1, drain_deadline=excluded.drain_deadline,
                    drained_at=excluded.drained_at""", (node_id, deadline, env.ts))
    running = db.execute("SELECT count(*) FROM tasks WHERE node=? AND state IN ('assigned','running','cancelling')",
                         (node_id,)).fetchone()[0]
    return {"node_id": node_id, "drain_deadline": deadline, "running": running}


def _h_undrain(db, index, env) -> dict:
    node_id = env.args["node_id"]
    if not _node_known(db, node_id):
        return {"error": f"no node {node_id!r} in this cluster; see `cortex nodes`"}
    db.execute("UPDATE task_nodes SET drained=0, drain_deadline=NULL, drained_at=NULL WHERE node_id=?", (node_id,))
    return {"node_id": node_id, "drained": False}


def _events(env: Envelope, result: dict) -> list[tuple[str, dict]]:
    t = env.type
    if t == "task.submit":
        return [("task.submitted", {"count": len(result["task_ids"])})]
    if t == "task.assign" and result["assigned"]:
        return [("task.assigned", {"nodes": result["nodes"], "count": len(result["assigned"])})]
    if t in ("task.report", "task.requeue"):
        items = result.get("recorded") or result.get("requeued") or []
        if items:
            return [("task.finished" if t == "task.report" else "task.requeued",
                     {"count": len(items), "states": sorted({i["state"] for i in items})})]
    if t in ("task.cancel", "task.retry") and (result.get("states") or result.get("requeued")):
        return [("task.changed", {"command": t})]
    if t in ("task.drain", "task.undrain"):
        return [(t.replace("task.", "node."), {"node_id": env.args["node_id"]})]
    return []


DOMAIN = domain.Domain(
    name="task",
    migrations=MIGRATIONS,
    tables=TABLES,
    commands={
        "task.submit": domain.Command(validators.submit, _h_submit),
        "task.assign": domain.Command(validators.assign, _h_assign, internal=True),
        "task.start": domain.Command(validators.start, _h_start),
        "task.report": domain.Command(validators.report, _h_report),
        "task.output": domain.Command(validators.output, _h_output),
        "task.cancel": domain.Command(lambda a: validators.ids(a, "task.cancel"), _h_cancel),
        "task.retry": domain.Command(lambda a: validators.ids(a, "task.retry"), _h_retry),
        "task.requeue": domain.Command(validators.requeue, _h_requeue, internal=True),
        "task.node_report": domain.Command(validators.node_report, _h_node_report),
        "task.drain": domain.Command(validators.drain, _h_drain),
        "task.undrain": domain.Command(validators.undrain, _h_undrain),
    },
    queries={
        "task.get": queries.task_get,
        "task.list": queries.task_list,
        "task.output": queries.task_output,
        "task.assigned": queries.task_assigned,
        "task.sched": queries.task_sched,
        "task.nodes": queries.task_nodes,
        "task.stats": queries.task_stats,
        "task.attempts": queries.task_attempts,
    },
    events=_events,
)

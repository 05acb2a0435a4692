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
"""

from __future__ import annotations

import json
import sqlite3

from cortex.core import domain
from cortex.core.commands import CommandError, Envelope
from cortex.tasks import spec as specs

OUTPUT_CAP = 256 * 1024  # bytes of output kept per attempt
MAX_CHUNK = 64 * 1024
TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("assigned", "running", "cancelling")
STATES = ("queued", *ACTIVE, *TERMINAL)
TRUNCATION_MARKER = "\n[cortex: output truncated at {cap} bytes per attempt; the rest was dropped]\n"

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


# --- helpers -----------------------------------------------------------------------------------------------

_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))  # built once: json.dumps builds one per call


def _j(value) -> str:
    return _ENCODER.encode(value)


def _require_list(args: dict, name: str, limit: int) -> list:
    value = args.get(name)
    if not isinstance(value, list) or not value:
        raise CommandError(f"{name} must be a non-empty list")
    if len(value) > limit:
        raise CommandError(f"at most {limit} {name} per command")
    return value


def _str(doc: dict, name: str, limit: int = 200, optional: bool = False) -> str:
    value = doc.get(name)
    if value is None and optional:
        return ""
    if not isinstance(value, str) or (not value and not optional) or len(value) > limit:
        raise CommandError(f"{name} must be a string of 1..{limit} characters")
    return value


def _int(doc: dict, name: str, lo: int = 0) -> int:
    value = doc.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise CommandError(f"{name} must be an integer >= {lo}")
    return value


def _node(doc: dict) -> str:
    value = _str(doc, "node_id", 63)
    if not specs.NODE_ID_RE.match(value):
        raise CommandError(f"node_id {value!r} is not a valid node id")
    return value


_no_extra = specs.only_fields


COLUMNS = ("id", "seq", "kind", "name", "spec", "priority", "placement", "retry", "timeout", "state", "attempt",
           "failures", "node", "term", "not_before", "submitted_at", "assigned_at", "started_at", "finished_at",
           "updated_at", "exit_code", "error", "result", "dlq", "dlq_at", "grp", "workflow", "step", "item",
           "output_bytes", "output_dropped", "output_seq")
_JSON_COLUMNS = ("spec", "placement", "retry", "result")


def row_dict(row) -> dict:
    d = dict(zip(COLUMNS, row))
    for c in _JSON_COLUMNS:
        if d[c] is not None:
            d[c] = json.loads(d[c])
    d["dlq"] = bool(d["dlq"])
    return d


def get_task(db: sqlite3.Connection, task_id: str) -> dict | None:
    row = db.execute(f"SELECT {', '.join(COLUMNS)} FROM tasks WHERE id=?", (task_id,)).fetchone()
    return row_dict(row) if row else None


_INSERT_TASK = """INSERT INTO tasks (id, seq, kind, name, spec, priority, placement, retry, timeout, state,
                                     submitted_at, updated_at, grp, workflow, step, item)
                  VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?)"""


def _task_row(env: Envelope, task_id: str, seq: int, doc: dict, grp, workflow, step, item) -> tuple:
    return (task_id, seq, doc["kind"], doc["name"], _j(doc["spec"]), doc["priority"], _j(doc["placement"]),
            _j(doc["retry"]), doc["timeout"], env.ts, env.ts, grp, workflow, step, item)


def insert_task(db: sqlite3.Connection, env: Envelope, task_id: str, seq: int, doc: dict, *, grp: str | None = None,
                workflow: str | None = None, step: str | None = None, item: int | None = None) -> None:
    db.execute(_INSERT_TASK, _task_row(env, task_id, seq, doc, grp, workflow, step, item))


def _finish(db: sqlite3.Connection, env: Envelope, task: dict, state: str) -> None:
    """A task reached a terminal state: tell its workflow (same transaction, deterministic)."""
    if task.get("workflow"):
        from cortex.tasks import workflow

        workflow.task_terminal(db, env, task["workflow"], task["step"])


# --- validators --------------------------------------------------------------------------------------------

def _v_submit(args: dict) -> dict:
    _no_extra(args, {"tasks", "group"}, "task.submit")
    tasks = _require_list(args, "tasks", specs.MAX_TASKS_PER_SUBMIT)
    out = {"tasks": [specs.validate_task(t) for t in tasks]}
    group = args.get("group")
    if group is not None:
        out["group"] = _str(args, "group", 64)
    return out


def _v_assign(args: dict) -> dict:
    items = _require_list(args, "assignments", 5000)
    return {"assignments": [{"task_id": _str(a, "task_id"), "node_id": _node(a), "attempt": _int(a, "attempt", 1)}
                            for a in items if isinstance(a, dict)]}


def _attempt_ref(doc: dict) -> dict:
    if not isinstance(doc, dict):
        raise CommandError("each item must be an object")
    return {"task_id": _str(doc, "task_id"), "attempt": _int(doc, "attempt", 1), "term": _int(doc, "term", 0)}


def _v_start(args: dict) -> dict:
    _no_extra(args, {"node_id", "starts"}, "task.start")
    return {"node_id": _node(args), "starts": [_attempt_ref(s) for s in _require_list(args, "starts", 5000)]}


def _v_report(args: dict) -> dict:
    """Reports of ended attempts, and optionally starts of new ones (applied first): a node sends both in one
    command per round, so a busy node costs the log one entry per round, not two."""
    _no_extra(args, {"node_id", "reports", "starts"}, "task.report")
    if "starts" in args and args.get("reports") in (None, []):
        items = []  # starts only
    else:
        items = _require_list(args, "reports", 5000)
    reports = []
    for r in items:
        ref = _attempt_ref(r)
        exit_code = r.get("exit_code")
        if exit_code is not None and (isinstance(exit_code, bool) or not isinstance(exit_code, int)):
            raise CommandError("exit_code must be an integer or null")
        result = r.get("result", {})
        if not isinstance(result, dict) or len(_j(result)) > 128 * 1024:
            raise CommandError("result must be an object of at most 128 KiB")
        failure = r.get("failure", "")
        if failure not in ("", "exit", "timeout", "error", "cancelled", "lost"):
            raise CommandError("failure must be one of exit, timeout, error, cancelled, lost")
        reports.append({**ref, "exit_code": exit_code, "error": _str(r, "error", 4000, optional=True),
                        "retryable": bool(r.get("retryable", True)), "failure": failure, "result": result,
                        })
    out = {"node_id": _node(args), "reports": reports}
    if "starts" in args:
        out["starts"] = [_attempt_ref(s) for s in _require_list(args, "starts", 5000)]
    return out


def _v_output(args: dict) -> dict:
    _no_extra(args, {"node_id", "chunks"}, "task.output")
    chunks = []
    for c in _require_list(args, "chunks", 1000):
        ref = _attempt_ref(c)
        if c.get("stream") not in ("stdout", "stderr"):
            raise CommandError("stream must be stdout or stderr")
        data = c.get("data")
        if not isinstance(data, str) or len(data) > MAX_CHUNK:
            raise CommandError(f"data must be a string of at most {MAX_CHUNK} characters")
        chunks.append({**ref, "stream": c["stream"], "data": data, "dropped": _int(c, "dropped") if "dropped" in c else 0})
    return {"node_id": _node(args), "chunks": chunks}


def _v_ids(args: dict, where: str) -> dict:
    _no_extra(args, {"task_ids"}, where)
    ids = _require_list(args, "task_ids", 5000)
    if not all(isinstance(i, str) and 0 < len(i) <= 200 for i in ids):
        raise CommandError("task_ids must be task id strings")
    return {"task_ids": ids}


def _v_requeue(args: dict) -> dict:
    items = _require_list(args, "requeues", 5000)
    return {"requeues": [{**_attempt_ref({**r, "term": r.get("term", 0)}), "reason": _str(r, "reason", 500)}
                         for r in items if isinstance(r, dict)]}


def _v_node_report(args: dict) -> dict:
    _no_extra(args, {"node_id", "capacity", "usage", "labels", "kinds", "busy", "benchmark"}, "task.node_report")
    out = {"node_id": _node(args)}
    for name in ("capacity", "usage", "labels", "benchmark"):
        value = args.get(name, {})
        if not isinstance(value, dict) or len(_j(value)) > 16 * 1024:
            raise CommandError(f"{name} must be an object of at most 16 KiB")
        out[name] = value
    kinds = args.get("kinds", [])
    if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
        raise CommandError("kinds must be a list of task kinds")
    out["kinds"] = sorted(set(kinds))
    out["busy"] = bool(args.get("busy", False))
    return out


def _v_drain(args: dict) -> dict:
    _no_extra(args, {"node_id", "deadline"}, "task.drain")
    deadline = args.get("deadline", 300)
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not 0 <= deadline <= 30 * 86400:
        raise CommandError("deadline must be seconds between 0 and 30 days (e.g. 300 for 5m)")
    return {"node_id": _node(args), "deadline": float(deadline)}


def _v_undrain(args: dict) -> dict:
    _no_extra(args, {"node_id"}, "task.undrain")
    return {"node_id": _node(args)}


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
    db.executemany(_INSERT_TASK, [_task_row(env, task_id, index * 10000 + i, doc, group, None, None, None)
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


def _end_attempt(db, env, task_id: str, attempt: int, outcome: str, exit_code, error: str) -> None:
    db.execute("UPDATE task_attempts SET outcome=?, finished_at=?, exit_code=?, error=? WHERE task_id=? AND attempt=?",
               (outcome, env.ts, exit_code, error, task_id, attempt))


def apply_outcome(db, env, task: dict, r: dict) -> str:
    """Record the end of the task's current attempt; returns the task's new state."""
    ok = r["exit_code"] == 0 and not r["error"] and not r["failure"]
    result = _j(r["result"]) if r["result"] else None
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
    _end_attempt(db, env, task["id"], task["attempt"], outcome, r["exit_code"], r["error"])
    if state == "queued":
        db.execute("UPDATE tasks SET state='queued', node=NULL, updated_at=?, error=?, exit_code=? WHERE id=?",
                   (env.ts, r["error"], r["exit_code"], task["id"]))
        return state
    db.execute("""UPDATE tasks SET state=?, finished_at=?, updated_at=?, exit_code=?, error=?, result=?,
                  dlq=?, dlq_at=? WHERE id=?""",
               (state, env.ts, env.ts, r["exit_code"], r["error"], result, int(state == "failed"),
                env.ts if state == "failed" else None, task["id"]))
    _finish(db, env, task, state)
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
                  (env.ts, env.ts, _j(r["result"]) if r["result"] else None, r["task_id"], r["attempt"], r["term"],
                   node_id)).rowcount != 1:
        return False
    _end_attempt(db, env, r["task_id"], r["attempt"], "succeeded", 0, "")
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


def cancel_task(db, env, task: dict) -> str:
    if task["state"] in TERMINAL or task["state"] == "cancelling":
        return task["state"]
    if task["state"] == "running":
        db.execute("UPDATE tasks SET state='cancelling', updated_at=? WHERE id=?", (env.ts, task["id"]))
        return "cancelling"
    if task["state"] == "assigned":
        _end_attempt(db, env, task["id"], task["attempt"], "cancelled", None, "cancelled before it started")
    db.execute("UPDATE tasks SET state='cancelled', finished_at=?, updated_at=?, error='cancelled' WHERE id=?",
               (env.ts, env.ts, task["id"]))
    _finish(db, env, task, "cancelled")
    return "cancelled"


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
               (a["node_id"], _j(a["capacity"]), _j(a["usage"]), _j(a["labels"]), _j(a["kinds"]), int(a["busy"]),
                _j(a["benchmark"]), env.ts))
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


# --- queries -----------------------------------------------------------------------------------------------

def _q_get(db, args) -> dict | None:
    task = get_task(db, str(args.get("id", "")))
    if task is None:
        return None
    cols = ("attempt", "node", "term", "assigned_at", "started_at", "finished_at", "outcome", "exit_code", "error")
    task["attempts"] = [dict(zip(cols, r)) for r in db.execute(
        f"SELECT {', '.join(cols)} FROM task_attempts WHERE task_id=? ORDER BY attempt", (task["id"],))]
    return task


def _q_list(db, args) -> list[dict]:
    where, params = [], []
    for key, column in (("state", "state"), ("node", "node"), ("group", "grp"), ("workflow", "workflow"),
                        ("kind", "kind")):
        if args.get(key):
            where.append(f"{column}=?")
            params.append(str(args[key]))
    if args.get("dlq"):
        where.append("dlq=1")
    limit = max(1, min(int(args.get("limit", 100)), 10000))
    after = int(args.get("after_seq", -1))
    if after >= 0:
        where.append("seq>?")
        params.append(after)
    sql = f"SELECT {', '.join(COLUMNS)} FROM tasks" + (f" WHERE {' AND '.join(where)}" if where else "")
    order = "seq" if after >= 0 or args.get("order") == "asc" else "seq DESC"
    return [row_dict(r) for r in db.execute(f"{sql} ORDER BY {order} LIMIT ?", (*params, limit))]


def _q_output(db, args) -> dict:
    task_id = str(args.get("id", ""))
    after = int(args.get("after", 0))
    limit = max(1, min(int(args.get("limit", 1000)), 5000))
    rows = db.execute("SELECT seq, attempt, stream, data FROM task_output WHERE task_id=? AND seq>? ORDER BY seq "
                      "LIMIT ?", (task_id, after, limit)).fetchall()
    state = db.execute("SELECT state FROM tasks WHERE id=?", (task_id,)).fetchone()
    return {"chunks": [{"seq": s, "attempt": a, "stream": st, "data": d} for s, a, st, d in rows],
            "state": state[0] if state else None}


def _q_assigned(db, args) -> list[dict]:
    """What one node should be running: its current attempts (the runner's pull)."""
    rows = db.execute("SELECT id, kind, spec, timeout, state, attempt, term FROM tasks WHERE node=? "
                      "AND state IN ('assigned','running','cancelling') ORDER BY seq", (str(args.get("node_id")),))
    return [{"id": i, "kind": k, "spec": json.loads(s), "timeout": t, "state": st, "attempt": a, "term": term}
            for i, k, s, t, st, a, term in rows]


def node_views(db) -> list[dict]:
    rows = db.execute("""SELECT n.id, n.role, n.liveness, t.capacity, t.usage, t.labels, t.kinds, t.busy,
                                t.benchmark, t.reported_at, t.drained, t.drain_deadline
                         FROM nodes n LEFT JOIN task_nodes t ON t.node_id = n.id WHERE n.liveness!='left'
                         ORDER BY n.id""").fetchall()
    out = []
    for (node_id, role, liveness, capacity, usage, labels, kinds, busy, bench, reported, drained,
         deadline) in rows:
        out.append({"id": node_id, "role": role, "liveness": liveness,
                    "capacity": json.loads(capacity or "{}"), "usage": json.loads(usage or "{}"),
                    "labels": json.loads(labels or "{}"), "kinds": json.loads(kinds or "[]"), "busy": bool(busy),
                    "benchmark": json.loads(bench or "{}"), "reported_at": reported, "drained": bool(drained),
                    "drain_deadline": deadline})
    running = {}
    # grouped by placement text: a node's running tasks mostly share a few placements, each decoded once
    for node, placement, count in db.execute(
            "SELECT node, placement, count(*) FROM tasks WHERE state IN ('assigned','running','cancelling') "
            "GROUP BY node, placement ORDER BY node, placement"):
        p = json.loads(placement)
        r = running.setdefault(node, {"tasks": 0, "cpus": 0.0, "memory_mb": 0, "gpus": 0})
        r["tasks"] += count
        r["cpus"] += p.get("cpus", 0) * count
        r["memory_mb"] += p.get("memory_mb", 0) * count
        r["gpus"] += p.get("gpus", 0) * count
    for n in out:
        n["running"] = running.get(n["id"], {"tasks": 0, "cpus": 0.0, "memory_mb": 0, "gpus": 0})
    return out


SCHED_PAGE_MIN = 64  # queued tasks read per scheduling round at least ("limit": "auto")


def free_slots(nodes: list[dict]) -> int:
    """Task slots free on the nodes that can take work now (what one scheduling round can fill at most)."""
    from cortex.tasks.scheduler import DEFAULT_SLOTS

    return sum(max(0, int(n["capacity"].get("slots", DEFAULT_SLOTS)) - n["running"]["tasks"]) for n in nodes
               if n["liveness"] == "alive" and not n["drained"] and n["reported_at"])


def _q_sched(db, args) -> dict:
    """The scheduler's input: ready queued tasks in priority order, and every node's view.

    `limit` caps the queued tasks read; "auto" reads twice what the free slots can take (a round places
    at most that many, and decoding a deep queue every round would cost more than the scheduling), and says
    `more` when the queue goes on, so a round that could not fill the free slots from this page reads all.
    Each task carries `last_node`, where its previous attempt ran (a retry prefers another node)."""
    now = float(args.get("now", 0))
    nodes = node_views(db)
    free = free_slots(nodes)
    if args.get("limit") == "auto":
        limit = min(20000, max(SCHED_PAGE_MIN, 2 * free))
    else:
        limit = max(1, min(int(args.get("limit", 5000)), 20000))
    rows = db.execute(
        "SELECT t.id, t.kind, t.priority, t.placement, t.attempt, t.seq, t.spec, a.node FROM tasks t "
        "LEFT JOIN task_attempts a ON a.task_id = t.id AND a.attempt = t.attempt "
        # `+not_before`: keeps the planner on tasks_ready (read in order, stop at LIMIT) instead of tasks_backoff
        "WHERE t.state='queued' AND +t.not_before<=? ORDER BY t.priority DESC, t.seq LIMIT ?",
        (now, limit + 1)).fetchall()
    more = len(rows) > limit
    placements: dict[str, dict] = {}  # a queue of similar tasks shares a few placements: decode each once
    # a k8s_job's spec says what its Kubernetes cluster must have free (the scheduler checks that instead)
    queued = [{"id": i, "kind": k, "priority": p,
               "placement": placements[pl] if pl in placements else placements.setdefault(pl, json.loads(pl)),
               "attempt": a, "seq": s, "last_node": last,
               **({"spec": json.loads(sp)} if k == "k8s_job" else {})}
              for i, k, p, pl, a, s, sp, last in rows[:limit]]
    waiting = db.execute("SELECT min(not_before) FROM tasks WHERE state='queued' AND not_before>?",
                         (now,)).fetchone()[0]
    lost = [{"task_id": i, "attempt": a, "node": n, "state": st} for i, a, n, st in db.execute(
        """SELECT t.id, t.attempt, t.node, t.state FROM tasks t LEFT JOIN nodes n ON n.id = t.node
           LEFT JOIN task_nodes d ON d.node_id = t.node
           WHERE t.state IN ('assigned','running','cancelling')
             AND (n.id IS NULL OR n.liveness IN ('offline','left') OR (d.drained=1 AND d.drain_deadline<=?))""", (now,))]
    return {"queued": queued, "nodes": nodes, "lost": lost, "next_retry_at": waiting, "more": more,
            "free_slots": free}


def _q_nodes(db, args) -> list[dict]:
    return node_views(db)


def _q_stats(db, args) -> dict:
    """Task counts by state (of one run_distributed/submit group when `group` is given), the DLQ size and the
    latest finish time."""
    where, params = ("WHERE grp=?", (str(args["group"]),)) if args.get("group") else ("", ())
    counts = dict(db.execute(f"SELECT state, count(*) FROM tasks {where} GROUP BY state", params).fetchall())
    counts["dlq"] = db.execute(f"SELECT count(*) FROM tasks {where} {'AND' if where else 'WHERE'} dlq=1",
                               params).fetchone()[0]
    counts["last_finished_at"] = db.execute(f"SELECT max(finished_at) FROM tasks {where}", params).fetchone()[0]
    return counts


def _q_attempts(db, args) -> list[dict]:
    """Every attempt of every task (the tests' exactly-once check reads this)."""
    cols = ("task_id", "attempt", "node", "term", "outcome", "exit_code")
    where, params = "", ()
    if args.get("group"):
        where, params = " WHERE task_id IN (SELECT id FROM tasks WHERE grp=?)", (str(args["group"]),)
    return [dict(zip(cols, r)) for r in db.execute(
        f"SELECT {', '.join(cols)} FROM task_attempts{where} ORDER BY task_id, attempt", params)]


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
        "task.submit": domain.Command(_v_submit, _h_submit),
        "task.assign": domain.Command(_v_assign, _h_assign, internal=True),
        "task.start": domain.Command(_v_start, _h_start),
        "task.report": domain.Command(_v_report, _h_report),
        "task.output": domain.Command(_v_output, _h_output),
        "task.cancel": domain.Command(lambda a: _v_ids(a, "task.cancel"), _h_cancel),
        "task.retry": domain.Command(lambda a: _v_ids(a, "task.retry"), _h_retry),
        "task.requeue": domain.Command(_v_requeue, _h_requeue, internal=True),
        "task.node_report": domain.Command(_v_node_report, _h_node_report),
        "task.drain": domain.Command(_v_drain, _h_drain),
        "task.undrain": domain.Command(_v_undrain, _h_undrain),
    },
    queries={
        "task.get": _q_get,
        "task.list": _q_list,
        "task.output": _q_output,
        "task.assigned": _q_assigned,
        "task.sched": _q_sched,
        "task.nodes": _q_nodes,
        "task.stats": _q_stats,
        "task.attempts": _q_attempts,
    },
    events=_events,
)

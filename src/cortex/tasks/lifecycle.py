"""The rows of tasks and the transitions both replicated domains make on them, in one transaction.

The task domain (state.py) and the workflow domain (workflow.py) change the same rows: a workflow inserts
its steps' tasks and cancels them; a task that ends settles its workflow step. What both need lives here,
below both, so neither domain imports the other.
"""

from __future__ import annotations

import json
import sqlite3

from cortex.core.commands import Envelope

OUTPUT_CAP = 256 * 1024  # bytes of output kept per attempt
MAX_CHUNK = 64 * 1024
TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("assigned", "running", "cancelling")
STATES = ("queued", *ACTIVE, *TERMINAL)
TRUNCATION_MARKER = "\n[cortex: output truncated at {cap} bytes per attempt; the rest was dropped]\n"
STEP_TERMINAL = ("succeeded", "failed", "skipped", "cancelled")

_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))  # built once: json.dumps builds one per call


def to_json(value) -> str:
    return _ENCODER.encode(value)


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


INSERT_TASK = """INSERT INTO tasks (id, seq, kind, name, spec, priority, placement, retry, timeout, state,
                                     submitted_at, updated_at, grp, workflow, step, item)
                  VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?)"""


def task_row(env: Envelope, task_id: str, seq: int, doc: dict, grp, workflow, step, item) -> tuple:
    return (task_id, seq, doc["kind"], doc["name"], to_json(doc["spec"]), doc["priority"], to_json(doc["placement"]),
            to_json(doc["retry"]), doc["timeout"], env.ts, env.ts, grp, workflow, step, item)


def insert_task(db: sqlite3.Connection, env: Envelope, task_id: str, seq: int, doc: dict, *, grp: str | None = None,
                workflow: str | None = None, step: str | None = None, item: int | None = None) -> None:
    db.execute(INSERT_TASK, task_row(env, task_id, seq, doc, grp, workflow, step, item))


def end_attempt(db, env, task_id: str, attempt: int, outcome: str, exit_code, error: str) -> None:
    db.execute("UPDATE task_attempts SET outcome=?, finished_at=?, exit_code=?, error=? WHERE task_id=? AND attempt=?",
               (outcome, env.ts, exit_code, error, task_id, attempt))


def finish(db: sqlite3.Connection, env: Envelope, task: dict, state: str) -> None:
    """A task reached a terminal state: tell its workflow (same transaction, deterministic)."""
    if task.get("workflow"):
        task_terminal(db, env, task["workflow"], task["step"])


def cancel_task(db, env, task: dict) -> str:
    if task["state"] in TERMINAL or task["state"] == "cancelling":
        return task["state"]
    if task["state"] == "running":
        db.execute("UPDATE tasks SET state='cancelling', updated_at=? WHERE id=?", (env.ts, task["id"]))
        return "cancelling"
    if task["state"] == "assigned":
        end_attempt(db, env, task["id"], task["attempt"], "cancelled", None, "cancelled before it started")
    db.execute("UPDATE tasks SET state='cancelled', finished_at=?, updated_at=?, error='cancelled' WHERE id=?",
               (env.ts, env.ts, task["id"]))
    finish(db, env, task, "cancelled")
    return "cancelled"


def task_terminal(db: sqlite3.Connection, env: Envelope, wf_id: str, step: str) -> None:
    """A workflow task finished: settle its step, then the workflow."""
    row = db.execute("SELECT state FROM workflow_steps WHERE workflow_id=? AND name=?", (wf_id, step)).fetchone()
    if row is None or row[0] != "running":
        return
    counts = dict(db.execute("SELECT state, count(*) FROM tasks WHERE workflow=? AND step=? GROUP BY state",
                             (wf_id, step)).fetchall())
    total = sum(counts.values())
    if sum(counts.get(s, 0) for s in TERMINAL) < total:
        return
    state = "succeeded" if counts.get("succeeded", 0) == total else \
        "cancelled" if counts.get("cancelled", 0) == total else "failed"
    db.execute("UPDATE workflow_steps SET state=?, finished_at=? WHERE workflow_id=? AND name=?",
               (state, env.ts, wf_id, step))
    settle_workflow(db, env, wf_id)


def settle_workflow(db, env, wf_id: str) -> None:
    """End the workflow once every step has ended: failed if one failed, else cancelled if one was, else succeeded."""
    states = [r[0] for r in db.execute("SELECT state FROM workflow_steps WHERE workflow_id=?", (wf_id,))]
    current = db.execute("SELECT state FROM workflows WHERE id=?", (wf_id,)).fetchone()[0]
    if current != "running" or not all(s in STEP_TERMINAL for s in states):
        return
    final = "failed" if "failed" in states else "cancelled" if "cancelled" in states else "succeeded"
    db.execute("UPDATE workflows SET state=?, finished_at=?, updated_at=? WHERE id=?", (final, env.ts, env.ts, wf_id))

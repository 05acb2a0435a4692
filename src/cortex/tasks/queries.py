"""The task domain's queries: read-only views of the task tables, run on a replica (state.DOMAIN names them)."""

from __future__ import annotations

import json

from cortex.tasks.lifecycle import COLUMNS, get_task, row_dict


def task_get(db, args) -> dict | None:
    task = get_task(db, str(args.get("id", "")))
    if task is None:
        return None
    cols = ("attempt", "node", "term", "assigned_at", "started_at", "finished_at", "outcome", "exit_code", "error")
    task["attempts"] = [dict(zip(cols, r)) for r in db.execute(
        f"SELECT {', '.join(cols)} FROM task_attempts WHERE task_id=? ORDER BY attempt", (task["id"],))]
    return task


def task_list(db, args) -> list[dict]:
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


def task_output(db, args) -> dict:
    task_id = str(args.get("id", ""))
    after = int(args.get("after", 0))
    limit = max(1, min(int(args.get("limit", 1000)), 5000))
    rows = db.execute("SELECT seq, attempt, stream, data FROM task_output WHERE task_id=? AND seq>? ORDER BY seq "
                      "LIMIT ?", (task_id, after, limit)).fetchall()
    state = db.execute("SELECT state FROM tasks WHERE id=?", (task_id,)).fetchone()
    return {"chunks": [{"seq": s, "attempt": a, "stream": st, "data": d} for s, a, st, d in rows],
            "state": state[0] if state else None}


def task_assigned(db, args) -> list[dict]:
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


def task_sched(db, args) -> dict:
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


def task_nodes(db, args) -> list[dict]:
    return node_views(db)


def task_stats(db, args) -> dict:
    """Task counts by state (of one run_distributed/submit group when `group` is given), the DLQ size and the
    latest finish time."""
    where, params = ("WHERE grp=?", (str(args["group"]),)) if args.get("group") else ("", ())
    counts = dict(db.execute(f"SELECT state, count(*) FROM tasks {where} GROUP BY state", params).fetchall())
    counts["dlq"] = db.execute(f"SELECT count(*) FROM tasks {where} {'AND' if where else 'WHERE'} dlq=1",
                               params).fetchone()[0]
    counts["last_finished_at"] = db.execute(f"SELECT max(finished_at) FROM tasks {where}", params).fetchone()[0]
    return counts


def task_attempts(db, args) -> list[dict]:
    """Every attempt of every task (the tests' exactly-once check reads this)."""
    cols = ("task_id", "attempt", "node", "term", "outcome", "exit_code")
    where, params = "", ()
    if args.get("group"):
        where, params = " WHERE task_id IN (SELECT id FROM tasks WHERE grp=?)", (str(args["group"]),)
    return [dict(zip(cols, r)) for r in db.execute(
        f"SELECT {', '.join(cols)} FROM task_attempts{where} ORDER BY task_id, attempt", params)]

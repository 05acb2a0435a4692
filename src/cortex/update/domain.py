"""The `update` state domain: rolling updates and what each node says it runs, replicated.

A rollout is the pure state machine of rollout.py stored as one row; every transition is a command
(`update.advance`) checked by `rollout.advance` inside apply, so a stale or out-of-order report (a node
retrying, an old leader) is refused by the log itself and a new leader continues exactly where the old one
stopped. A rollout starts `checking` and only the leader's own pre-flight (`update.checked`, internal: no
client may write it) lets it run, so a start written by any path touches no node before the checks pass.
Nodes report their running version, whether the boot was blessed and whether they fell back to the
previous slot (`update.report`); the leader's driver reads those reports to decide the next transition.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import asdict

from cortex.core import domain
from cortex.core.commands import CommandError, Envelope
from cortex.update import rollout
from cortex.update.releases import UpdateError, parse_version

NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
KINDS = ("appliance", "simulated", "package")
STEP_STATES = (*rollout.STEP_FLOW, "skipped", "failed", "reverting", "rolled_back")


def _extra(args: dict, allowed: set[str], name: str) -> None:
    extra = set(args) - allowed
    if extra:
        raise CommandError(f"{name}: unknown argument(s) {', '.join(sorted(extra))}")


def _str(args: dict, key: str, limit: int = 500, required: bool = True) -> str:
    value = args.get(key, "")
    if not isinstance(value, str) or len(value) > limit or (required and not value):
        raise CommandError(f"{key} must be a {'non-empty ' if required else ''}string of at most {limit} characters")
    return value


def _version(args: dict, key: str = "version") -> str:
    value = _str(args, key, 64)
    try:
        parse_version(value)
    except UpdateError as exc:
        raise CommandError(str(exc)) from None
    return value


def _v_start(args: dict) -> dict:
    _extra(args, {"version", "source", "steps", "by", "allow_downgrade"}, "update.start")
    if not isinstance(args.get("allow_downgrade", False), bool):
        raise CommandError("allow_downgrade must be true or false")
    steps = args.get("steps")
    if not isinstance(steps, list) or not 1 <= len(steps) <= 1000:
        raise CommandError("steps must be a list of 1-1000 planned steps (see `cortex update rollout --dry-run`)")
    out = []
    for s in steps:
        if not isinstance(s, dict) or set(s) - {"node_id", "role", "from_version", "state", "reason"}:
            raise CommandError("each step is {node_id, role, from_version, state, reason}")
        if not NODE_RE.match(str(s.get("node_id", ""))) or s.get("role") not in ("server", "worker"):
            raise CommandError(f"step {s.get('node_id')!r}: bad node id or role")
        if s.get("state", "pending") not in ("pending", "skipped"):
            raise CommandError("a new rollout's steps are pending or skipped")
        out.append({"node_id": s["node_id"], "role": s["role"], "from_version": _str(s, "from_version", 64, False),
                    "state": s.get("state", "pending"), "reason": _str(s, "reason", 500, False)})
    if len({s["node_id"] for s in out}) != len(out):
        raise CommandError("a node appears twice in the plan")
    return {"version": _version(args), "source": _str(args, "source", 1000), "steps": out,
            "by": _str(args, "by", 200, False), "allow_downgrade": args.get("allow_downgrade", False)}


def _v_checked(args: dict) -> dict:
    _extra(args, {"rollout_id", "problems"}, "update.checked")
    problems = args.get("problems")
    if not isinstance(problems, list) or len(problems) > 200 \
            or not all(isinstance(p, str) and len(p) <= 1000 for p in problems):
        raise CommandError("problems must be a list of at most 200 strings (empty: the pre-flight passed)")
    return {"rollout_id": _str(args, "rollout_id", 64), "problems": problems}


def _v_advance(args: dict) -> dict:
    _extra(args, {"rollout_id", "node_id", "state", "reason", "boot_id"}, "update.advance")
    state = args.get("state")
    if state not in STEP_STATES:
        raise CommandError(f"state must be one of {', '.join(STEP_STATES)}")
    return {"rollout_id": _str(args, "rollout_id", 64), "node_id": _str(args, "node_id", 63), "state": state,
            "reason": _str(args, "reason", 1000, False), "boot_id": _str(args, "boot_id", 64, False)}


def _v_rollback(args: dict) -> dict:
    _extra(args, {"rollout_id", "by"}, "update.rollback")
    return {"rollout_id": _str(args, "rollout_id", 64, False), "by": _str(args, "by", 200, False)}


def _v_report(args: dict) -> dict:
    _extra(args, {"node_id", "version", "kind", "blessed", "fell_back", "boot_id", "booted_at", "free_bytes",
                  "previous", "detail"}, "update.report")
    if args.get("kind") not in KINDS:
        raise CommandError(f"kind must be one of {', '.join(KINDS)}")
    free, booted = args.get("free_bytes", -1), args.get("booted_at", 0)
    if isinstance(free, bool) or not isinstance(free, int) or isinstance(booted, bool) \
            or not isinstance(booted, int | float):
        raise CommandError("free_bytes must be an integer (-1: unknown), booted_at a unix time")
    return {"node_id": _str(args, "node_id", 63), "version": _str(args, "version", 64, False), "kind": args["kind"],
            "blessed": bool(args.get("blessed", False)), "fell_back": bool(args.get("fell_back", False)),
            "boot_id": _str(args, "boot_id", 64), "booted_at": float(booted), "free_bytes": free,
            "previous": _str(args, "previous", 64, False), "detail": _str(args, "detail", 1000, False)}


# --- rows <-> rollout.Rollout -----------------------------------------------------------------------------

def _load(db: sqlite3.Connection, rollout_id: str) -> tuple[rollout.Rollout, dict] | None:
    row = db.execute("SELECT id, version, state, reason, steps, since FROM update_rollouts WHERE id=?",
                     (rollout_id,)).fetchone()
    if row is None:
        return None
    rid, version, state, reason, steps, since = row
    return (rollout.Rollout(rid, version, tuple(rollout.Step(**s) for s in json.loads(steps)), state, reason),
            json.loads(since))


def _save(db: sqlite3.Connection, r: rollout.Rollout, since: dict, ts: float) -> None:
    db.execute("UPDATE update_rollouts SET state=?, reason=?, steps=?, since=?, updated_at=? WHERE id=?",
               (r.state, r.reason, json.dumps([asdict(s) for s in r.steps]), json.dumps(since), ts, r.id))


def _current_id(db: sqlite3.Connection) -> str | None:
    row = db.execute("SELECT id FROM update_rollouts ORDER BY seq DESC LIMIT 1").fetchone()
    return row[0] if row else None


# --- handlers ---------------------------------------------------------------------------------------------

def _h_start(db: sqlite3.Connection, index: int, env: Envelope) -> dict:
    busy = db.execute(f"SELECT id, version FROM update_rollouts WHERE state IN ({','.join('?' * len(rollout.IN_PROGRESS))})",
                      rollout.IN_PROGRESS).fetchone()
    if busy:
        return {"error": f"rollout {busy[0]} to {busy[1]} is still in progress; wait for it, or roll it back "
                         "(`cortex update rollback`)"}
    a = env.args
    plan = rollout.Rollout(env.id[:12], a["version"], tuple(rollout.Step(**s) for s in a["steps"]))
    state = "checking" if any(s.state == "pending" for s in plan.steps) else "done"
    seq = db.execute("SELECT coalesce(max(seq), 0) + 1 FROM update_rollouts").fetchone()[0]
    db.execute("INSERT INTO update_rollouts (id, seq, version, source, state, reason, steps, since, created_by, "
               "created_at, updated_at, allow_downgrade) VALUES (?, ?, ?, ?, ?, '', ?, ?, ?, ?, ?, ?)",
               (plan.id, seq, a["version"], a["source"], state, json.dumps([asdict(s) for s in plan.steps]),
                json.dumps({"_rollout": env.ts}), a["by"], env.ts, env.ts, int(a["allow_downgrade"])))
    return {"id": plan.id, "state": state, "version": a["version"]}


def _h_advance(db: sqlite3.Connection, index: int, env: Envelope) -> dict:
    a = env.args
    loaded = _load(db, a["rollout_id"])
    if loaded is None:
        return {"error": f"no rollout {a['rollout_id']!r}; see `cortex update status`"}
    current, since = loaded
    try:
        moved = rollout.advance(current, a["node_id"], a["state"], a["reason"])
    except (UpdateError, StopIteration) as exc:
        return {"error": f"refused: {exc or 'no such node in the rollout'}"}
    since[a["node_id"]] = env.ts  # when the step entered its state: the driver's timeouts count from here
    if a["boot_id"]:
        since[a["node_id"] + "@boot"] = a["boot_id"]  # the boot a reboot must leave behind
    _save(db, moved, since, env.ts)
    return {"id": moved.id, "node_id": a["node_id"], "step": a["state"], "state": moved.state,
            "reason": moved.reason}


def _h_checked(db: sqlite3.Connection, index: int, env: Envelope) -> dict:
    loaded = _load(db, env.args["rollout_id"])
    if loaded is None:
        return {"error": f"no rollout {env.args['rollout_id']!r}"}
    current, since = loaded
    try:
        moved = rollout.checked(current, env.args["problems"])
    except UpdateError as exc:
        return {"error": str(exc)}
    since["_rollout"] = env.ts  # the first node's timeouts count from the end of the check
    _save(db, moved, since, env.ts)
    return {"id": moved.id, "state": moved.state, "reason": moved.reason}


def _h_rollback(db: sqlite3.Connection, index: int, env: Envelope) -> dict:
    latest = _current_id(db)
    rollout_id = env.args["rollout_id"] or latest
    if rollout_id != latest:
        return {"error": f"only the latest rollout ({latest}) rolls back: the nodes act on that one"}
    loaded = _load(db, rollout_id) if rollout_id else None
    if loaded is None:
        return {"error": "no rollout to roll back; see `cortex update status`"}
    current, since = loaded
    try:
        moved = rollout.start_rollback(current)
    except UpdateError as exc:
        return {"error": str(exc)}
    since["_rollback"] = env.ts
    _save(db, moved, since, env.ts)
    return {"id": moved.id, "state": moved.state}


def _h_report(db: sqlite3.Connection, index: int, env: Envelope) -> dict:
    a = env.args
    db.execute("""INSERT INTO update_nodes (node_id, version, kind, blessed, fell_back, boot_id, booted_at,
                    free_bytes, previous, detail, reported_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)
                  ON CONFLICT(node_id) DO UPDATE SET version=excluded.version, kind=excluded.kind,
                    blessed=excluded.blessed, fell_back=excluded.fell_back, boot_id=excluded.boot_id,
                    booted_at=excluded.booted_at, free_bytes=excluded.free_bytes, previous=excluded.previous,
                    detail=excluded.detail, reported_at=excluded.reported_at""",
               (a["node_id"], a["version"], a["kind"], int(a["blessed"]), int(a["fell_back"]), a["boot_id"],
                a["booted_at"], a["free_bytes"], a["previous"], a["detail"], env.ts))
    return {"node_id": a["node_id"], "version": a["version"]}


# --- queries ----------------------------------------------------------------------------------------------

def _rollout_doc(db: sqlite3.Connection, rollout_id: str) -> dict | None:
    row = db.execute("SELECT id, version, source, state, reason, steps, since, created_by, created_at, updated_at, "
                     "allow_downgrade FROM update_rollouts WHERE id=?", (rollout_id,)).fetchone()
    if row is None:
        return None
    keys = ("id", "version", "source", "state", "reason", "steps", "since", "by", "created_at", "updated_at",
            "allow_downgrade")
    doc = dict(zip(keys, row))
    doc["steps"], doc["since"] = json.loads(doc["steps"]), json.loads(doc["since"])
    doc["allow_downgrade"] = bool(doc["allow_downgrade"])
    return doc


def _q_current(db: sqlite3.Connection, args: dict) -> dict | None:
    """The latest rollout (or the one named by `id`)."""
    rollout_id = args.get("id") or _current_id(db)
    return _rollout_doc(db, str(rollout_id)) if rollout_id else None


def _q_history(db: sqlite3.Connection, args: dict) -> list[dict]:
    rows = db.execute("SELECT id FROM update_rollouts ORDER BY seq DESC LIMIT 50").fetchall()
    return [_rollout_doc(db, r[0]) for r in rows]


def _q_nodes(db: sqlite3.Connection, args: dict) -> list[dict]:
    keys = ("node_id", "version", "kind", "blessed", "fell_back", "boot_id", "booted_at", "free_bytes", "previous",
            "detail", "reported_at")
    rows = db.execute(f"SELECT {', '.join(keys)} FROM update_nodes ORDER BY node_id").fetchall()
    return [{**dict(zip(keys, r)), "blessed": bool(r[3]), "fell_back": bool(r[4])} for r in rows]


def _events(env: Envelope, result: dict) -> list[tuple[str, dict]]:
    if env.type == "update.advance":
        return [("update.step", {k: result.get(k) for k in ("id", "node_id", "step", "state", "reason")})]
    if env.type == "update.checked":
        return [("update.rollout_checked", {k: result.get(k) for k in ("id", "state", "reason")})]
    if env.type in ("update.start", "update.rollback"):
        return [(env.type.replace(".", ".rollout_"), {"id": result.get("id"), "state": result.get("state")})]
    return []


DOMAIN = domain.Domain(
    name="update",
    migrations=("""CREATE TABLE update_rollouts (
        id TEXT PRIMARY KEY, seq INTEGER NOT NULL, version TEXT NOT NULL, source TEXT NOT NULL, state TEXT NOT NULL,
        reason TEXT NOT NULL, steps TEXT NOT NULL, since TEXT NOT NULL, created_by TEXT NOT NULL,
        created_at REAL NOT NULL, updated_at REAL NOT NULL);
      CREATE TABLE update_nodes (
        node_id TEXT PRIMARY KEY, version TEXT NOT NULL, kind TEXT NOT NULL, blessed INTEGER NOT NULL,
        fell_back INTEGER NOT NULL, boot_id TEXT NOT NULL, booted_at REAL NOT NULL, free_bytes INTEGER NOT NULL,
        previous TEXT NOT NULL, detail TEXT NOT NULL, reported_at REAL NOT NULL);""",
                "ALTER TABLE update_rollouts ADD COLUMN allow_downgrade INTEGER NOT NULL DEFAULT 0;"),
    tables=("update_rollouts", "update_nodes"),
    commands={"update.start": domain.Command(_v_start, _h_start),
              "update.checked": domain.Command(_v_checked, _h_checked, internal=True),
              "update.advance": domain.Command(_v_advance, _h_advance),
              "update.rollback": domain.Command(_v_rollback, _h_rollback),
              "update.report": domain.Command(_v_report, _h_report)},
    queries={"update.current": _q_current, "update.history": _q_history, "update.nodes": _q_nodes},
    events=_events,
)

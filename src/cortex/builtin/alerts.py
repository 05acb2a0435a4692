"""Alerts: conditions worth a person's attention, derived from the cluster's state, and their squelches.

An alert is computed, not stored: a node that is suspect or offline, a cluster without quorum, a lagging
server or one whose log does not converge (stuck), a plugin that failed. Each has a key (`node.offline:w1`,
`plugin.failed:skills@n2`) that a squelch matches with a glob for a while (`node.offline:*` for an hour
during maintenance). Squelches are replicated state (this domain), so every node hides the same alerts and a
squelch outlives a leader change. A computed alert clears by itself once its condition is gone.
"""

from __future__ import annotations

import fnmatch
import re
import sqlite3

from cortex.core import domain
from cortex.core.commands import CommandError, Envelope

MAX_SQUELCH_SECONDS = 30 * 86400
_PATTERN_RE = re.compile(r"^[A-Za-z0-9_.:@*?\[\]!-]{1,200}$")


def _v_squelch(args: dict) -> dict:
    extra = set(args) - {"pattern", "seconds", "reason", "by"}
    if extra:
        raise CommandError(f"unknown argument(s) {', '.join(sorted(extra))}")
    pattern, seconds = args.get("pattern"), args.get("seconds")
    if not isinstance(pattern, str) or not _PATTERN_RE.match(pattern):
        raise CommandError("pattern must be 1-200 characters of letters, digits and . : @ * ? [ ] ! - _ "
                           "(a glob over alert keys such as node.offline:w1)")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds <= MAX_SQUELCH_SECONDS:
        raise CommandError(f"seconds must be a number in (0, {MAX_SQUELCH_SECONDS}]")
    reason, by = args.get("reason", ""), args.get("by", "")
    if not isinstance(reason, str) or len(reason) > 500 or not isinstance(by, str) or len(by) > 200:
        raise CommandError("reason must be a string of at most 500 characters, by at most 200")
    return {"pattern": pattern, "seconds": float(seconds), "reason": reason, "by": by}


def _v_unsquelch(args: dict) -> dict:
    if set(args) != {"id"} or not isinstance(args["id"], str) or not 1 <= len(args["id"]) <= 64:
        raise CommandError("alert.unsquelch takes exactly a string 'id' (see list_alerts)")
    return {"id": args["id"]}


def _h_squelch(db: sqlite3.Connection, index: int, env: Envelope) -> dict:
    a = env.args
    squelch_id = env.id  # unique: chosen by the leader
    until = env.ts + a["seconds"]
    db.execute("INSERT INTO alert_squelches (id, pattern, reason, created_by, created_at, until) "
               "VALUES (?, ?, ?, ?, ?, ?)", (squelch_id, a["pattern"], a["reason"], a["by"], env.ts, until))
    return {"id": squelch_id, "pattern": a["pattern"], "until": until}


def _h_unsquelch(db: sqlite3.Connection, index: int, env: Envelope) -> dict:
    removed = db.execute("DELETE FROM alert_squelches WHERE id=?", (env.args["id"],)).rowcount
    return {"id": env.args["id"], "removed": bool(removed)}


def _q_squelches(db: sqlite3.Connection, args: dict) -> list[dict]:
    now = args.get("now", 0)
    if isinstance(now, bool) or not isinstance(now, int | float):
        raise ValueError("alert.squelches takes a numeric 'now' (unix seconds; 0: all)")
    rows = db.execute("SELECT id, pattern, reason, created_by, created_at, until FROM alert_squelches "
                      "WHERE until > ? ORDER BY created_at", (now,)).fetchall()
    return [dict(zip(("id", "pattern", "reason", "by", "created_at", "until"), r)) for r in rows]


DOMAIN = domain.Domain(
    name="alert",
    migrations=("""CREATE TABLE alert_squelches (
        id TEXT PRIMARY KEY, pattern TEXT NOT NULL, reason TEXT NOT NULL, created_by TEXT NOT NULL,
        created_at REAL NOT NULL, until REAL NOT NULL);""",),
    tables=("alert_squelches",),
    commands={"alert.squelch": domain.Command(_v_squelch, _h_squelch),
              "alert.unsquelch": domain.Command(_v_unsquelch, _h_unsquelch)},
    queries={"alert.squelches": _q_squelches},
    events=lambda env, result: [("alert.squelched", {"id": result["id"], "pattern": env.args["pattern"]})]
    if env.type == "alert.squelch" else [],
)


def active_alerts(status: dict, local_plugins: list[dict], node_id: str) -> list[dict]:
    """The alerts a status document (the leader's view, as a dict) and this node's plugins show (pure)."""
    alerts = []
    if status.get("state") != "worker" and not status.get("has_quorum", False):
        alerts.append({"key": "cluster.no_quorum", "severity": "critical",
                       "message": "the servers have no quorum: writes fail until a majority is back"})
    if not status.get("leader_id"):
        alerts.append({"key": "cluster.no_leader", "severity": "critical",
                       "message": "no leader is known; check that a majority of servers runs"})
    for n in status.get("nodes", []):
        liveness = n.get("liveness", "alive")
        if liveness in ("suspect", "offline"):
            alerts.append({"key": f"node.{liveness}:{n['id']}", "severity": "warning" if liveness == "suspect"
                           else "critical" if n.get("role") == "server" else "warning",
                           "message": f"{n.get('role', 'node')} {n['id']} is {liveness}"})
        lag = int(n.get("replication_lag", -1))
        if n.get("replication") == "stuck":
            alerts.append({"key": f"node.stuck:{n['id']}", "severity": "critical",
                           "message": f"server {n['id']} is {lag} entries behind the leader and has not caught "
                                      f"up for {float(n.get('stuck_for', 0)):.0f}s although it answers: the "
                                      "cluster runs on one replica fewer; see its log and `cortex status`"})
            continue
        if n.get("role") == "server" and lag > 1000:
            alerts.append({"key": f"node.lagging:{n['id']}", "severity": "warning",
                           "message": f"server {n['id']} is {lag} entries behind the leader"})
    for p in local_plugins:
        if p.get("state") == "failed":
            alerts.append({"key": f"plugin.failed:{p['name']}@{node_id}", "severity": "warning",
                           "message": f"plugin {p['name']} failed on {node_id}: {p.get('error', '')}"})
    return alerts


def split_squelched(alerts: list[dict], squelches: list[dict]) -> tuple[list[dict], list[dict]]:
    shown, hidden = [], []
    for alert in alerts:
        match = next((s for s in squelches if fnmatch.fnmatchcase(alert["key"], s["pattern"])), None)
        if match is None:
            shown.append(alert)
        else:
            hidden.append({**alert, "squelch_id": match["id"], "squelched_until": match["until"]})
    return shown, hidden

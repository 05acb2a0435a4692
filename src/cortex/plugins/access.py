"""The `access` domain: who may use each plugin's tools, cluster-wide, and the audit log of what they did.

A *policy* names, per plugin, which caller roles and which named callers (a certificate's identity such as
`grpc:admin:n1`, the admin socket's `admin-socket`, the HTTP token's `mcp-http-token`) may *read* through
its read-only tools and which may *change* through the others. A plugin without a policy keeps the roles its
tools declare; a policy only narrows that, never widens it (a tool needing `admin` still needs it), so a
wrong policy can lock callers out but never let a reader change anything. Policies are replicated, so every
node enforces the same ones (plugins/audit.py, within a couple of seconds of a change).

The *audit log* is a replicated table: every policy change and every call of a tool that is not read-only
(caller, role, tool, plugin, a digest of the arguments, outcome), written by the node that ran the call. It
keeps the newest AUDIT_KEPT rows. Pure: no sockets, no clocks beyond what a command carries.
"""

from __future__ import annotations

import json
import re
import sqlite3

from cortex.core import domain
from cortex.core.commands import CommandError, Envelope

CALLER_ROLES = ("reader", "operator", "admin")  # as cortex.plugins.api (the state machine imports no plugins)
PLUGIN_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
AUDIT_KEPT = 20_000
MAX_RECORDS = 256  # per access.record command (one batch of a node's audit sender)
MAX_CALLERS = 64
OUTCOMES = ("ok", "error", "refused")
LEVEL = 2  # the state-machine level that introduced these commands (core/domain.py, levels)

MIGRATIONS = ("""
CREATE TABLE access_policies (plugin TEXT PRIMARY KEY, read_rule TEXT, change_rule TEXT,
    updated_at REAL NOT NULL, updated_by TEXT NOT NULL, log_index INTEGER NOT NULL);
CREATE TABLE access_audit (seq INTEGER PRIMARY KEY, log_index INTEGER NOT NULL, ts REAL NOT NULL,
    kind TEXT NOT NULL, node TEXT NOT NULL, caller TEXT NOT NULL, role TEXT NOT NULL, tool TEXT NOT NULL,
    plugin TEXT NOT NULL, digest TEXT NOT NULL, outcome TEXT NOT NULL, detail TEXT NOT NULL);
CREATE INDEX access_audit_by_tool ON access_audit (tool, seq);
""",)


def _text(args: dict, key: str, limit: int, default: str | None = None) -> str:
    value = args.get(key, default)
    if not isinstance(value, str) or len(value) > limit:
        raise CommandError(f"{key} must be a string of at most {limit} characters")
    return value


def _plugin(args: dict) -> str:
    plugin = args.get("plugin")
    if not isinstance(plugin, str) or not PLUGIN_RE.match(plugin):
        raise CommandError("plugin must be a plugin's name (lowercase letters, digits, - _ .), as `cortex plugins` "
                           "lists them")
    return plugin


def check_rule(rule, what: str) -> dict | None:
    """A rule is None (the tools' own roles) or {"roles": [...], "callers": [...]}: who, besides the tools'
    own role requirement, may pass."""
    if rule is None:
        return None
    if not isinstance(rule, dict) or set(rule) - {"roles", "callers"}:
        raise CommandError(f"{what} must be null or an object with 'roles' and 'callers' lists")
    roles, callers = rule.get("roles", []), rule.get("callers", [])
    if not isinstance(roles, list) or any(r not in CALLER_ROLES for r in roles):
        raise CommandError(f"{what}.roles must list caller roles ({', '.join(CALLER_ROLES)})")
    if (not isinstance(callers, list) or len(callers) > MAX_CALLERS
            or any(not isinstance(c, str) or not 1 <= len(c) <= 200 for c in callers)):
        raise CommandError(f"{what}.callers must list at most {MAX_CALLERS} caller identities (1..200 characters)")
    return {"roles": sorted(set(roles), key=CALLER_ROLES.index), "callers": sorted(set(callers))}


def _v_policy_set(args: dict) -> dict:
    if set(args) - {"plugin", "read", "change", "by"}:
        raise CommandError("access.policy_set takes plugin, read, change and by")
    out = {"plugin": _plugin(args), "read": check_rule(args.get("read"), "read"),
           "change": check_rule(args.get("change"), "change"), "by": _text(args, "by", 200, "")}
    if out["read"] is None and out["change"] is None:
        raise CommandError("give a read or a change rule (or use access.policy_clear to go back to the defaults)")
    return out


def _v_policy_clear(args: dict) -> dict:
    if set(args) - {"plugin", "by"}:
        raise CommandError("access.policy_clear takes plugin and by")
    return {"plugin": _plugin(args), "by": _text(args, "by", 200, "")}


def _v_record(args: dict) -> dict:
    records = args.get("records")
    if set(args) != {"records"} or not isinstance(records, list) or not 1 <= len(records) <= MAX_RECORDS:
        raise CommandError(f"access.record takes 'records': a list of 1..{MAX_RECORDS} tool calls")
    out = []
    for r in records:
        if not isinstance(r, dict):
            raise CommandError("each record is an object")
        ts = r.get("ts")
        if isinstance(ts, bool) or not isinstance(ts, int | float):
            raise CommandError("record.ts must be a number (unix seconds)")
        outcome = r.get("outcome")
        if outcome not in OUTCOMES:
            raise CommandError(f"record.outcome must be one of {', '.join(OUTCOMES)}")
        out.append({"ts": float(ts), "outcome": outcome, "node": _text(r, "node", 64), "caller": _text(r, "caller", 200),
                    "role": _text(r, "role", 16), "tool": _text(r, "tool", 128), "plugin": _text(r, "plugin", 64),
                    "digest": _text(r, "digest", 64), "detail": _text(r, "detail", 500, "")})
    return {"records": out}


def _audit(db: sqlite3.Connection, index: int, row: dict) -> None:
    db.execute("INSERT INTO access_audit (log_index, ts, kind, node, caller, role, tool, plugin, digest, outcome, "
               "detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (index, row["ts"], row["kind"], row.get("node", ""), row["caller"], row.get("role", ""),
                row.get("tool", ""), row["plugin"], row.get("digest", ""), row["outcome"], row.get("detail", "")))


def _trim(db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM access_audit WHERE seq <= (SELECT max(seq) FROM access_audit) - ?", (AUDIT_KEPT,))


def _h_policy_set(db: sqlite3.Connection, index: int, env: Envelope) -> dict:
    a = env.args
    read, change = (json.dumps(a[k]) if a[k] is not None else None for k in ("read", "change"))
    before = db.execute("SELECT read_rule, change_rule FROM access_policies WHERE plugin=?", (a["plugin"],)).fetchone()
    db.execute("INSERT INTO access_policies VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(plugin) DO UPDATE SET "
               "read_rule=excluded.read_rule, change_rule=excluded.change_rule, updated_at=excluded.updated_at, "
               "updated_by=excluded.updated_by, log_index=excluded.log_index",
               (a["plugin"], read, change, env.ts, a["by"], index))
    _audit(db, index, {"ts": env.ts, "kind": "policy", "caller": a["by"], "plugin": a["plugin"], "outcome": "ok",
                       "tool": "access.policy_set", "detail": json.dumps({"read": a["read"], "change": a["change"]})})
    _trim(db)
    return {"plugin": a["plugin"], "read": a["read"], "change": a["change"], "changed": before != (read, change)}


def _h_policy_clear(db: sqlite3.Connection, index: int, env: Envelope) -> dict:
    a = env.args
    cleared = db.execute("DELETE FROM access_policies WHERE plugin=?", (a["plugin"],)).rowcount
    _audit(db, index, {"ts": env.ts, "kind": "policy", "caller": a["by"], "plugin": a["plugin"], "outcome": "ok",
                       "tool": "access.policy_clear", "detail": "" if cleared else "there was no policy"})
    _trim(db)
    return {"plugin": a["plugin"], "cleared": bool(cleared)}


def _h_record(db: sqlite3.Connection, index: int, env: Envelope) -> dict:
    for record in env.args["records"]:
        _audit(db, index, {**record, "kind": "tool"})
    _trim(db)
    return {"recorded": len(env.args["records"])}


def _policy_row(plugin, read, change, updated_at, updated_by) -> dict:
    return {"plugin": plugin, "read": json.loads(read) if read else None,
            "change": json.loads(change) if change else None, "updated_at": updated_at, "updated_by": updated_by}


def _q_policies(db: sqlite3.Connection, args: dict) -> list[dict]:
    return [_policy_row(*r) for r in db.execute(
        "SELECT plugin, read_rule, change_rule, updated_at, updated_by FROM access_policies ORDER BY plugin")]


AUDIT_COLUMNS = ("seq", "log_index", "ts", "kind", "node", "caller", "role", "tool", "plugin", "digest", "outcome",
                 "detail")


def _q_log(db: sqlite3.Connection, args: dict) -> list[dict]:
    where, params = [], []
    for key in ("tool", "caller", "plugin", "kind", "outcome"):
        if args.get(key):
            where.append(f"{key} = ?")
            params.append(str(args[key]))
    limit = args.get("limit", 100)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
        raise ValueError("access.log takes a 'limit' of 1..10000")
    sql = (f"SELECT {', '.join(AUDIT_COLUMNS)} FROM access_audit" + (" WHERE " + " AND ".join(where) if where else "")
           + " ORDER BY seq DESC LIMIT ?")
    return [dict(zip(AUDIT_COLUMNS, r)) for r in db.execute(sql, (*params, limit))]


def write_refusal(command_type: str, args: dict, peer) -> str | None:
    """Policies change through an admin's certificate or a node (which checked its caller's role in process);
    audit records come from nodes only."""
    if peer is None or peer.role in ("server", "worker"):
        return None
    if command_type in ("access.policy_set", "access.policy_clear") and peer.role == "admin":
        return None
    if command_type == "access.record":
        return "audit records are written by the nodes that ran the calls"
    return "plugin policies are changed by admins: `cortex audit set` with an admin certificate, or set_plugin_policy"


def _events(env: Envelope, result: dict) -> list[tuple[str, dict]]:
    if env.type in ("access.policy_set", "access.policy_clear") and "plugin" in result:
        return [("access.policy_changed", {"plugin": result["plugin"]})]
    return []


DOMAIN = domain.Domain(
    name="access",
    migrations=MIGRATIONS,
    tables=("access_policies", "access_audit"),
    commands={"access.policy_set": domain.Command(_v_policy_set, _h_policy_set, level=LEVEL),
              "access.policy_clear": domain.Command(_v_policy_clear, _h_policy_clear, level=LEVEL),
              "access.record": domain.Command(_v_record, _h_record, level=LEVEL)},
    queries={"access.policies": _q_policies, "access.log": _q_log},
    events=_events,
    refuse=write_refusal,
)

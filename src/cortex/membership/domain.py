"""Membership over time: nodes that left stay on record, and members change role (worker <-> server).

The core schema (core/cluster.py) owns the `nodes` table; node registration is nodes.py. This domain adds what happens after admission:
- `member.leave` (leader only): a node that left (`cortex leave`) or was removed (`cortex nodes remove`) keeps
  its row with liveness `left`, when and why. The core's `nodes` query, the task scheduler, the updater's
  pre-flight, alerts and liveness tracking see members only, so a left node never counts toward quorum,
  scheduling or health. It may join again (token or approval) under the same id and is `alive` again.
- `member.forget`: drop the record of a node that left (`cortex nodes forget ID`; the leader also forgets
  records older than `liveness.forget_left_after`, 72 h by default, as Consul reaps left members).
- `member.set_role` (leader only): the last step of a promotion (or demotion), once Raft has the node.

Events: node.left, node.forgotten, node.promoted, node.demoted.
"""

from __future__ import annotations

from cortex.core import args as rules
from cortex.core import domain
from cortex.core.args import CommandError
from cortex.core.envelope import Envelope

LEFT = "left"
MAX_REASON = 200

MIGRATIONS = (
    # 1: when and why a node left (kept after a rejoin: the last departure)
    """
    ALTER TABLE nodes ADD COLUMN left_at REAL;
    ALTER TABLE nodes ADD COLUMN left_reason TEXT NOT NULL DEFAULT '';
    """,
)

COLUMNS = ("id", "role", "grpc_address", "raft_address", "joined_at", "updated_at", "liveness", "liveness_since",
           "left_at", "left_reason")


def _v_leave(args: dict) -> dict:
    rules.no_extra(args, {"node_id", "reason"})
    reason = args.get("reason", "")
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise CommandError(f"reason must be a string of at most {MAX_REASON} characters")
    return {"node_id": rules.node_id(args), "reason": reason}


def _v_forget(args: dict) -> dict:
    rules.no_extra(args, {"node_id"})
    return {"node_id": rules.node_id(args)}


def _v_set_role(args: dict) -> dict:
    rules.no_extra(args, {"node_id", "role", "raft_address"})
    role, raft = args.get("role"), args.get("raft_address", "")
    if role not in ("server", "worker"):
        raise CommandError("role must be server or worker")
    if not isinstance(raft, str) or (role == "server" and not raft):
        raise CommandError("a server needs its raft_address")
    return {"node_id": rules.node_id(args), "role": role, "raft_address": raft if role == "server" else ""}


def _h_leave(db, index, env: Envelope) -> dict:
    node_id = env.args["node_id"]
    row = db.execute("SELECT role, liveness FROM nodes WHERE id=?", (node_id,)).fetchone()
    if row is None or row[1] == LEFT:
        return {"node_id": node_id, "left": False}  # a retried removal is not an error
    db.execute("UPDATE nodes SET liveness=?, liveness_since=?, left_at=?, left_reason=?, updated_at=? WHERE id=?",
               (LEFT, env.ts, env.ts, env.args["reason"], env.ts, node_id))
    return {"node_id": node_id, "left": True, "role": row[0], "previous": row[1]}


def _h_forget(db, index, env: Envelope) -> dict:
    node_id = env.args["node_id"]
    row = db.execute("SELECT liveness FROM nodes WHERE id=?", (node_id,)).fetchone()
    if row is None:
        return {"node_id": node_id, "forgotten": False}
    if row[0] != LEFT:
        return {"error": f"node {node_id!r} is a member ({row[0]}); only a node that left can be forgotten "
                         f"(`cortex nodes remove {node_id}` first)"}
    db.execute("DELETE FROM nodes WHERE id=?", (node_id,))
    return {"node_id": node_id, "forgotten": True}


def _h_set_role(db, index, env: Envelope) -> dict:
    a = env.args
    row = db.execute("SELECT role, raft_address, liveness FROM nodes WHERE id=?", (a["node_id"],)).fetchone()
    if row is None or row[2] == LEFT:
        return {"error": f"node {a['node_id']!r} is not a member; see `cortex nodes`"}
    if (row[0], row[1]) == (a["role"], a["raft_address"]):
        return {"node_id": a["node_id"], "role": a["role"], "changed": False}
    db.execute("UPDATE nodes SET role=?, raft_address=?, updated_at=? WHERE id=?",
               (a["role"], a["raft_address"], env.ts, a["node_id"]))
    return {"node_id": a["node_id"], "role": a["role"], "previous": row[0], "changed": True}


def _q_list(db, args: dict) -> list[dict]:
    """Every node on record, members and those that left (args {"left_only": true}: only those)."""
    where = " WHERE liveness='left'" if args.get("left_only") else ""
    rows = db.execute(f"SELECT {', '.join(COLUMNS)} FROM nodes{where} ORDER BY id").fetchall()
    return [dict(zip(COLUMNS, row)) for row in rows]


def _events(env: Envelope, result: dict) -> list[tuple[str, dict]]:
    if env.type == "member.leave" and result.get("left"):
        return [("node.left", {"node_id": env.args["node_id"], "role": result["role"],
                               "reason": env.args["reason"]})]
    if env.type == "member.forget" and result.get("forgotten"):
        return [("node.forgotten", {"node_id": env.args["node_id"]})]
    if env.type == "member.set_role" and result.get("changed"):
        kind = "node.promoted" if env.args["role"] == "server" else "node.demoted"
        return [(kind, {"node_id": env.args["node_id"], "role": env.args["role"], "previous": result["previous"]})]
    return []


DOMAIN = domain.Domain(
    name="member",
    migrations=MIGRATIONS,
    tables=(),  # the core's `nodes` table, which the digest and snapshots already cover
    commands={
        "member.leave": domain.Command(_v_leave, _h_leave, internal=True),
        "member.forget": domain.Command(_v_forget, _h_forget),
        "member.set_role": domain.Command(_v_set_role, _h_set_role, internal=True),
    },
    queries={"member.list": _q_list},
    events=_events,
)

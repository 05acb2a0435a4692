"""The nodes table as a domain: nodes register (with a join token, or approved by an operator), change liveness and leave.

The `nodes` and `join_requests` tables belong to the core schema (core/cluster.py); membership over time
(leaving, forgetting, role changes) is the `member` domain (domain.py). Every command here is decided by
the agent itself (the join protocol, the leader's liveness tracking): no client may propose one.
"""

from __future__ import annotations

from cortex.core import args as rules
from cortex.core import domain
from cortex.core.args import CommandError
from cortex.membership.tokens import HASH_RE, ROLES, token_problem


def _v_register(args: dict) -> dict:
    rules.no_extra(args, {"node_id", "role", "grpc_address", "raft_address", "token_hash"})
    role = rules.require(args, "role", str)
    token_hash = rules.require(args, "token_hash", str, optional=True) or ""
    if token_hash and not HASH_RE.match(token_hash):
        raise CommandError("token_hash must be a hex SHA-256 digest")
    if role not in ROLES:
        raise CommandError(f"role must be one of {', '.join(ROLES)}")
    return {
        "node_id": rules.node_id(args),
        "role": role,
        "grpc_address": rules.require(args, "grpc_address", str),
        "raft_address": rules.require(args, "raft_address", str, optional=True) or "",
        "token_hash": token_hash,
    }


def _v_liveness(args: dict) -> dict:
    rules.no_extra(args, {"node_id", "state"})
    state = rules.require(args, "state", str)
    if state not in ("alive", "suspect", "offline"):
        raise CommandError("state must be alive, suspect or offline")
    return {"node_id": rules.node_id(args), "state": state}


def _v_request(args: dict) -> dict:
    rules.no_extra(args, {"node_id", "role", "grpc_address", "raft_address", "secret_hash"})
    normalized = _v_register({k: v for k, v in args.items() if k != "secret_hash"})
    secret_hash = rules.require(args, "secret_hash", str)
    if not HASH_RE.match(secret_hash):
        raise CommandError("secret_hash must be a hex SHA-256 digest")
    del normalized["token_hash"]
    return {**normalized, "secret_hash": secret_hash}


def _v_expire(args: dict) -> dict:
    rules.no_extra(args, {"older_than"})
    older_than = rules.require(args, "older_than", (int, float))
    if older_than <= 0:
        raise CommandError("older_than must be > 0 seconds")
    return {"older_than": float(older_than)}


def _v_node(args: dict) -> dict:
    rules.no_extra(args, {"node_id"})
    return {"node_id": rules.node_id(args)}


def _h_register(db, index, env) -> dict:
    a = env.args
    existing = db.execute("SELECT role, grpc_address, raft_address, liveness FROM nodes WHERE id=?",
                          (a["node_id"],)).fetchone()
    rejoined = existing is not None and existing[3] == "left"  # kept on record after leaving (domain.py)
    if existing is not None and not rejoined and existing[:3] == (a["role"], a["grpc_address"], a["raft_address"]):
        return {"node_id": a["node_id"], "registered": True, "unchanged": True}
    if a["token_hash"]:
        problem = token_problem(db, a["token_hash"], a["role"], env.ts)
        if problem:
            return {"error": problem}
        db.execute(
            "UPDATE join_tokens SET uses_left = uses_left - 1 WHERE token_hash=? AND uses_left IS NOT NULL",
            (a["token_hash"],),
        )
    db.execute(
        """INSERT INTO nodes (id, role, grpc_address, raft_address, joined_at, updated_at, liveness, liveness_since)
           VALUES (?, ?, ?, ?, ?, ?, 'alive', ?)
           ON CONFLICT(id) DO UPDATE SET role=excluded.role, grpc_address=excluded.grpc_address,
             raft_address=excluded.raft_address, updated_at=excluded.updated_at,
             joined_at=CASE WHEN nodes.liveness='left' THEN excluded.joined_at ELSE nodes.joined_at END,
             liveness_since=CASE WHEN nodes.liveness='left' THEN excluded.liveness_since ELSE nodes.liveness_since END,
             liveness=CASE WHEN nodes.liveness='left' THEN 'alive' ELSE nodes.liveness END""",
        (a["node_id"], a["role"], a["grpc_address"], a["raft_address"], env.ts, env.ts, env.ts),
    )
    db.execute("DELETE FROM join_requests WHERE node_id=? AND state='approved'", (a["node_id"],))
    return {"node_id": a["node_id"], "registered": True, **({"rejoined": True} if rejoined else {})}


def _h_request(db, index, env) -> dict:
    """Record a join request without a token (pending), or refresh the requester's own pending one."""
    a = env.args
    row = db.execute("SELECT secret_hash, state FROM join_requests WHERE node_id=?", (a["node_id"],)).fetchone()
    if row is not None and row[0] == a["secret_hash"]:
        return {"node_id": a["node_id"], "state": row[1], "unchanged": True}
    if row is not None and row[1] != "rejected":
        return {"error": f"another join request for node {a['node_id']!r} is {row[1]}; "
                         "if that was not you, reject it (`cortex nodes reject ID`)"}
    db.execute("INSERT OR REPLACE INTO join_requests VALUES (?, ?, ?, ?, ?, 'pending', ?, NULL)",
               (a["node_id"], a["role"], a["grpc_address"], a["raft_address"], a["secret_hash"], env.ts))
    return {"node_id": a["node_id"], "state": "pending"}


def _h_expire(db, index, env) -> dict:
    """Drop the requests still pending `older_than` seconds before this command was proposed: the cutoff
    comes from the envelope's time, so every replica drops the same rows."""
    cutoff = env.ts - env.args["older_than"]
    expired = [row[0] for row in db.execute(
        "SELECT node_id FROM join_requests WHERE state='pending' AND requested_at <= ? ORDER BY node_id", (cutoff,))]
    db.execute("DELETE FROM join_requests WHERE state='pending' AND requested_at <= ?", (cutoff,))
    return {"expired": expired}


def _decide(db, env, new_state: str) -> dict:
    node_id = env.args["node_id"]
    row = db.execute("SELECT state FROM join_requests WHERE node_id=?", (node_id,)).fetchone()
    if row is None:
        member = db.execute("SELECT 1 FROM nodes WHERE id=? AND liveness!='left'", (node_id,)).fetchone()
        if member:
            return {"node_id": node_id, "state": "member", "changed": False}
        return {"error": f"no join request from node {node_id!r}; see `cortex nodes pending`"}
    if row[0] == new_state:
        return {"node_id": node_id, "state": new_state, "changed": False}
    if row[0] != "pending":
        return {"error": f"the join request of {node_id!r} was already {row[0]}"}
    db.execute("UPDATE join_requests SET state=?, decided_at=? WHERE node_id=?", (new_state, env.ts, node_id))
    return {"node_id": node_id, "state": new_state, "changed": True}


def _h_approve(db, index, env) -> dict:
    return _decide(db, env, "approved")


def _h_reject(db, index, env) -> dict:
    return _decide(db, env, "rejected")


def _h_liveness(db, index, env) -> dict:
    row = db.execute("SELECT liveness FROM nodes WHERE id=?", (env.args["node_id"],)).fetchone()
    if row is None or row[0] == "left":  # a transition decided before the node left changes nothing
        return {"node_id": env.args["node_id"], "changed": False}
    if row[0] == env.args["state"]:
        return {"node_id": env.args["node_id"], "changed": False}
    db.execute("UPDATE nodes SET liveness=?, liveness_since=? WHERE id=?",
               (env.args["state"], env.ts, env.args["node_id"]))
    return {"node_id": env.args["node_id"], "changed": True, "previous": row[0]}


def _h_remove(db, index, env) -> dict:
    removed = db.execute("DELETE FROM nodes WHERE id=?", (env.args["node_id"],)).rowcount
    return {"node_id": env.args["node_id"], "removed": bool(removed)}


def _q_nodes(db, args) -> list[dict]:
    cols = ("id", "role", "grpc_address", "raft_address", "joined_at", "updated_at", "liveness", "liveness_since")
    # members only: nodes that left stay on record (domain.py, query member.list) but count for nothing
    return [dict(zip(cols, row)) for row in db.execute(f"SELECT {', '.join(cols)} FROM nodes "
                                                       "WHERE liveness!='left' ORDER BY id")]


def _q_join_requests(db, args) -> list[dict]:
    """Join requests (secret hashes withheld), optionally one node's: args {"node_id": ...}."""
    cols = ("node_id", "role", "grpc_address", "raft_address", "state", "requested_at", "decided_at")
    sql, params = f"SELECT {', '.join(cols)} FROM join_requests", ()
    if args.get("node_id"):
        sql, params = sql + " WHERE node_id=?", (str(args["node_id"]),)
    return [dict(zip(cols, row)) for row in db.execute(sql + " ORDER BY requested_at", params)]


def _q_join_request_secret(db, args) -> str | None:
    row = db.execute("SELECT secret_hash FROM join_requests WHERE node_id=?", (str(args.get("node_id")),)).fetchone()
    return row[0] if row else None


def _events(env, result: dict) -> list[tuple[str, dict]]:
    if env.type == "node.register" and not result.get("unchanged"):
        return [("node.joined", {"node_id": env.args["node_id"], "role": env.args["role"],
                                 **({"rejoined": True} if result.get("rejoined") else {})})]
    if env.type == "node.request" and result.get("state") == "pending" and not result.get("unchanged"):
        return [("node.pending", {"node_id": env.args["node_id"], "role": env.args["role"]})]
    if env.type in ("node.approve", "node.reject") and result.get("changed"):
        return [(f"node.{result['state']}", {"node_id": env.args["node_id"]})]
    if env.type == "node.expire_requests":
        return [("node.request_expired", {"node_id": node_id}) for node_id in result.get("expired", ())]
    if env.type == "node.remove" and result.get("removed"):
        return [("node.left", {"node_id": env.args["node_id"]})]
    if env.type == "node.liveness" and result.get("changed"):
        return [(f"node.{env.args['state']}", {"node_id": env.args["node_id"], "previous": result["previous"]})]
    return []


DOMAIN = domain.Domain(
    name="node",
    commands={
        "node.register": domain.Command(_v_register, _h_register, internal=True),
        "node.remove": domain.Command(_v_node, _h_remove, internal=True),
        "node.liveness": domain.Command(_v_liveness, _h_liveness, internal=True),
        "node.request": domain.Command(_v_request, _h_request, internal=True),
        "node.expire_requests": domain.Command(_v_expire, _h_expire, internal=True, level=1),
        "node.approve": domain.Command(_v_node, _h_approve),
        "node.reject": domain.Command(_v_node, _h_reject),
    },
    queries={"nodes": _q_nodes, "join_requests": _q_join_requests, "join_request.secret": _q_join_request_secret},
    events=_events,
    unprefixed=frozenset({"nodes", "join_requests", "join_request.secret"}),
)

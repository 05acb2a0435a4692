"""Join tokens: an operator's permission for nodes to join (`cortex token create`), kept as hashes only.

The table belongs to the core schema (core/cluster.py). Tokens are added and revoked by the agent on an
operator's request (internal commands: the token RPCs check the caller's role), and spent by admission
(nodes.py) when a node registers with one.
"""

from __future__ import annotations

import re
import sqlite3
import time

from cortex.core import args as rules
from cortex.core import domain
from cortex.core.args import CommandError

ROLES = ("server", "worker")
HASH_RE = re.compile(r"^[0-9a-f]{64}$")
_ID_RE = re.compile(r"^[0-9a-f]{8,64}$")


def role(args: dict) -> str:
    value = rules.require(args, "role", str)
    if value not in ROLES:
        raise CommandError(f"role must be one of {', '.join(ROLES)}")
    return value


def _v_add(args: dict) -> dict:
    rules.no_extra(args, {"token_hash", "role", "expires_at", "uses"})
    token_hash = rules.require(args, "token_hash", str)
    if not HASH_RE.match(token_hash):
        raise CommandError("token_hash must be a hex SHA-256 digest")
    token_role = role(args)
    expires_at = rules.require(args, "expires_at", (int, float), optional=True)
    uses = rules.require(args, "uses", int, optional=True)
    if uses is not None and uses < 1:
        raise CommandError("uses must be at least 1")
    return {"token_hash": token_hash, "role": token_role, "expires_at": expires_at, "uses": uses}


def _v_revoke(args: dict) -> dict:
    rules.no_extra(args, {"token_id"})
    token_id = rules.require(args, "token_id", str)
    if not _ID_RE.match(token_id):
        raise CommandError("token_id must be 8-64 hex digits (see `cortex token list`)")
    return {"token_id": token_id}


def token_problem(db: sqlite3.Connection, token_hash: str, role: str, now: float) -> str:
    """Why this token cannot admit a node of `role` at time `now` ('' when it can)."""
    row = db.execute(
        "SELECT role, expires_at, uses_left, revoked_at FROM join_tokens WHERE token_hash=?", (token_hash,)
    ).fetchone()
    if row is None:
        return "join token not recognised by this cluster; ask an operator for one (`cortex token create`)"
    token_role, expires_at, uses_left, revoked_at = row
    if revoked_at is not None:
        return "join token was revoked; ask an operator for a new one"
    if token_role == "worker" and role == "server":
        return "this join token admits workers only"
    if expires_at is not None and now >= expires_at:
        expired = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires_at))
        return (f"join token expired at {expired}; ask an operator for a new one "
                "(`cortex token create --role server|worker` on a member)")
    if uses_left is not None and uses_left <= 0:
        return "join token already used up; create a new one"
    return ""


def _h_add(db, index, env) -> dict:
    a = env.args
    db.execute(
        "INSERT OR IGNORE INTO join_tokens (token_hash, role, created_at, expires_at, uses_left) VALUES (?, ?, ?, ?, ?)",
        (a["token_hash"], a["role"], env.ts, a["expires_at"], a["uses"]),
    )
    return {"token_hash": a["token_hash"], "added": True}


def _h_revoke(db, index, env) -> dict:
    rows = db.execute("SELECT token_hash FROM join_tokens WHERE token_hash LIKE ? AND revoked_at IS NULL",
                      (env.args["token_id"] + "%",)).fetchall()
    if len(rows) > 1:
        return {"error": f"token id {env.args['token_id']} is ambiguous; give more digits"}
    if rows:
        db.execute("UPDATE join_tokens SET revoked_at=? WHERE token_hash=?", (env.ts, rows[0][0]))
    return {"token_id": env.args["token_id"], "revoked": bool(rows)}


def _q_check(db, args) -> dict:
    return {"problem": token_problem(db, str(args.get("token_hash", "")), str(args.get("role", "")),
                                     float(args.get("now", 0)))}


def _q_tokens(db, args) -> list[dict]:
    """Tokens without their secrets: the id is a prefix of the hash."""
    rows = db.execute("SELECT token_hash, role, created_at, expires_at, uses_left, revoked_at FROM join_tokens "
                      "ORDER BY created_at").fetchall()
    return [{"id": h[:12], "role": role, "created_at": created, "expires_at": expires, "uses_left": uses,
             "revoked": revoked is not None} for h, role, created, expires, uses, revoked in rows]


DOMAIN = domain.Domain(
    name="token",
    commands={
        "token.add": domain.Command(_v_add, _h_add, internal=True),
        "token.revoke": domain.Command(_v_revoke, _h_revoke, internal=True),
    },
    queries={"token.check": _q_check, "tokens": _q_tokens},
    unprefixed=frozenset({"tokens"}),
)

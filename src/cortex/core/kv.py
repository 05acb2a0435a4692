"""The key-value store: versioned keys with compare-and-set, the state every plugin may keep.

Its table belongs to the core schema (cluster.py): it predates domains with their own migrations, and a
data directory records its version there. Keys under RESERVED_PREFIX are the cluster's own (the rotation
generations of `cortex secrets rotate`): a write there rotates every certificate and the Raft key, so only
admins and servers may make one.
"""

from __future__ import annotations

import sqlite3

from cortex.core import args as rules
from cortex.core import domain
from cortex.core.args import CommandError

RESERVED_PREFIX = "_cortex/"
WRITES = ("kv.put", "kv.delete", "kv.cas")


def _v_put(args: dict) -> dict:
    rules.no_extra(args, {"key", "value"})
    return {"key": rules.key(args), "value": rules.value(args)}


def _v_delete(args: dict) -> dict:
    rules.no_extra(args, {"key"})
    return {"key": rules.key(args)}


def _v_cas(args: dict) -> dict:
    rules.no_extra(args, {"key", "expected", "value"})
    expected = rules.require(args, "expected", (str, type(None)), optional=True)
    if expected is not None and len(expected.encode()) > rules.MAX_VALUE_BYTES:
        raise CommandError("argument 'expected' is too large")
    return {"key": rules.key(args), "expected": expected, "value": rules.value(args)}


def row(db: sqlite3.Connection, key: str) -> dict | None:
    found = db.execute("SELECT value, version, create_index, mod_index FROM kv WHERE key=?", (key,)).fetchone()
    if found is None:
        return None
    return {"key": key, "value": found[0], "version": found[1], "create_index": found[2], "mod_index": found[3]}


def _h_put(db, index, env) -> dict:
    key, value = env.args["key"], env.args["value"]
    db.execute(
        """INSERT INTO kv VALUES (?, ?, 1, ?, ?, ?)
           ON CONFLICT(key) DO UPDATE SET value=excluded.value, version=version+1,
             mod_index=excluded.mod_index, updated_at=excluded.updated_at""",
        (key, value, index, index, env.ts),
    )
    return {"key": key, "version": row(db, key)["version"], "index": index}


def _h_delete(db, index, env) -> dict:
    deleted = db.execute("DELETE FROM kv WHERE key=?", (env.args["key"],)).rowcount
    return {"key": env.args["key"], "deleted": bool(deleted)}


def _h_cas(db, index, env) -> dict:
    key, expected = env.args["key"], env.args["expected"]
    current = row(db, key)
    current_value = current["value"] if current else None
    if current_value != expected:
        return {"key": key, "succeeded": False, "current": current_value}
    _h_put(db, index, env)
    return {"key": key, "succeeded": True}


def _q_get(db, args) -> dict | None:
    key = args.get("key")
    if not isinstance(key, str):
        raise ValueError("kv.get needs a string 'key'")
    return row(db, key)


def _q_list(db, args) -> list[dict]:
    prefix = args.get("prefix", "")
    limit = int(args.get("limit", 1000))
    if not isinstance(prefix, str) or not 1 <= limit <= 10_000:
        raise ValueError("kv.list takes a string 'prefix' and a 'limit' of 1..10000")
    rows = db.execute(
        "SELECT key FROM kv WHERE key >= ? AND substr(key, 1, ?) = ? ORDER BY key LIMIT ?",
        (prefix, len(prefix), prefix, limit),
    ).fetchall()
    return [row(db, found[0]) for found in rows]


def refuse(command_type: str, args: dict, peer) -> str:
    """A write under RESERVED_PREFIX by anyone but an admin or a server (in-process callers: peer None)."""
    if command_type not in WRITES or peer is None or peer.role in ("server", "admin"):
        return ""
    key = str(args.get("key", ""))
    if not key.startswith(RESERVED_PREFIX):
        return ""
    return (f"{key!r} is one of the cluster's own keys ({RESERVED_PREFIX}*: credential rotation), changed by "
            f"admins and servers only, not a {peer.role} ({peer.name}); use `cortex secrets rotate` on a server")


DOMAIN = domain.Domain(
    name="kv",
    tables=(),  # `kv` is in the core schema's tables (cluster.py), where the digest has always had it
    commands={
        "kv.put": domain.Command(_v_put, _h_put),
        "kv.delete": domain.Command(_v_delete, _h_delete),
        "kv.cas": domain.Command(_v_cas, _h_cas),
    },
    queries={"kv.get": _q_get, "kv.list": _q_list},
    refuse=refuse,
)

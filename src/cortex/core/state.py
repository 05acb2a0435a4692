"""The replicated state machine: a SQLite database changed only by applying stamped commands.

This module is the deterministic core. It knows nothing of sockets, Raft or clocks: `apply(index, data)`
takes a log index and an encoded envelope and changes the database in one transaction that also records
the index, so a replay after a restart never applies an entry twice. Reads open their own connections and
never block apply (WAL mode).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cortex.core import domain
from cortex.core.commands import Envelope, decode_entry

log = logging.getLogger("cortex.state")

# Versioned migrations: append only. PRAGMA user_version records how many have run.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE nodes (
        id TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('server', 'worker')),
        grpc_address TEXT NOT NULL,
        raft_address TEXT NOT NULL DEFAULT '',
        joined_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE kv (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        version INTEGER NOT NULL,
        create_index INTEGER NOT NULL,
        mod_index INTEGER NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE join_tokens (
        token_hash TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL,
        uses_left INTEGER
    );
    -- Results of applied commands by idempotency key: a retried write returns the first result.
    CREATE TABLE requests (
        idem TEXT PRIMARY KEY,
        log_index INTEGER NOT NULL,
        result TEXT NOT NULL
    );
    CREATE INDEX requests_by_index ON requests (log_index);
    """,
    # 2: revocation keeps the row (who was admitted with what stays auditable)
    """
    ALTER TABLE join_tokens ADD COLUMN revoked_at REAL;
    """,
    # 3: liveness is replicated state, decided by the leader (see liveness.py)
    """
    ALTER TABLE nodes ADD COLUMN liveness TEXT NOT NULL DEFAULT 'alive';
    ALTER TABLE nodes ADD COLUMN liveness_since REAL;
    """,
    # 4: each state domain (domain.py) records how many of its own migrations have run
    """
    CREATE TABLE schema_versions (domain TEXT PRIMARY KEY, version INTEGER NOT NULL);
    """,
    # 5: join requests without a token wait here for an operator's approve/reject
    """
    CREATE TABLE join_requests (
        node_id TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        grpc_address TEXT NOT NULL,
        raft_address TEXT NOT NULL DEFAULT '',
        secret_hash TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'approved', 'rejected')),
        requested_at REAL NOT NULL,
        decided_at REAL
    );
    """,
]

REQUEST_RETENTION = 100_000  # idempotency keys are remembered for this many log entries
# Tables that make up the replicated state (the digest covers exactly these, plus each domain's).
STATE_TABLES = ("meta", "nodes", "kv", "join_tokens", "requests", "schema_versions", "join_requests")


def state_tables() -> tuple[str, ...]:
    return STATE_TABLES + tuple(t for d in domain.domains() for t in d.tables)


def events_for(env: Envelope, result: dict) -> list[tuple[str, dict]]:
    """The events an applied command means (pure: the same on every replica)."""
    if "error" in result or result.get("duplicate"):
        return []
    if env.type == "node.register" and not result.get("unchanged"):
        return [("node.joined", {"node_id": env.args["node_id"], "role": env.args["role"],
                                 **({"rejoined": True} if result.get("rejoined") else {})})]
    if env.type == "node.request" and result.get("state") == "pending" and not result.get("unchanged"):
        return [("node.pending", {"node_id": env.args["node_id"], "role": env.args["role"]})]
    if env.type in ("node.approve", "node.reject") and result.get("changed"):
        return [(f"node.{result['state']}", {"node_id": env.args["node_id"]})]
    if env.type == "node.remove" and result.get("removed"):
        return [("node.left", {"node_id": env.args["node_id"]})]
    if env.type == "node.liveness" and result.get("changed"):
        return [(f"node.{env.args['state']}", {"node_id": env.args["node_id"], "previous": result["previous"]})]
    for d in domain.domains():
        if d.events is not None and env.type.startswith(d.name + "."):
            return d.events(env, result)
    return []


class StateStore:
    def __init__(self, path: Path, listener: Callable[[str, dict, int], None] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._listener = listener  # told (event type, data, index) after each commit
        self._db = self._connect()
        self._migrate()
        self.last_applied = int(self._meta("last_applied_index", "0"))
        self.fence_term = int(self._meta("fence_term", "0"))

    # --- connections -----------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: durable against process crashes; a power loss may drop the newest transactions, which
        # Raft replays from the log of the surviving majority.
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        return db

    def reader(self) -> sqlite3.Connection:
        """A read-only connection for the calling thread."""
        return thread_reader(self._local, self.path)

    def close(self) -> None:
        with self._write_lock:
            self._db.close()

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            self._run_migration(script, f"PRAGMA user_version={number}")
        for d in domain.domains():
            row = self._db.execute("SELECT version FROM schema_versions WHERE domain=?", (d.name,)).fetchone()
            done = row[0] if row else 0
            if done > len(d.migrations):
                raise RuntimeError(f"{self.path}: the {d.name} schema is at version {done}, newer than this "
                                   f"Cortex knows ({len(d.migrations)}); run the newer version")
            for number, script in enumerate(d.migrations[done:], start=done + 1):
                self._run_migration(script, ("INSERT OR REPLACE INTO schema_versions VALUES (?, ?)", (d.name, number)))

    def _run_migration(self, script: str, record: str | tuple[str, tuple]) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _split_sql(script):
                self._db.execute(statement)
            if isinstance(record, str):
                self._db.execute(record)
            else:
                self._db.execute(*record)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _meta(self, key: str, default: str) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    # --- apply ---------------------------------------------------------------------------------------
    def apply(self, index: int, data: bytes, entry_term: int | None = None) -> dict | list[dict]:
        """Apply the log entry at `index`. Deterministic: same (index, data) → same database change.

        An entry is one envelope (result: a dict) or a group-committed batch (result: a list of dicts, one
        per envelope, in order). An entry that cannot be decoded changes nothing but its index, so one bad
        entry can never wedge the log.
        """
        with self._write_lock:
            if index <= self.last_applied:
                return {"skipped": True, "reason": f"index {index} already applied"}
            try:
                entry = decode_entry(data)
            except (ValueError, KeyError, TypeError) as exc:
                entry, undecodable = None, {"error": f"undecodable log entry: {exc}"}
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                envs = [] if entry is None else entry if isinstance(entry, list) else [entry]
                results = [self._apply_envelope(db, index, env, entry_term) for env in envs]
                result = undecodable if entry is None else results if isinstance(entry, list) else results[0]
                db.execute("INSERT OR REPLACE INTO meta VALUES ('last_applied_index', ?)", (str(index),))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                self.fence_term = int(self._meta("fence_term", "0"))
                raise
            self.last_applied = index
        if self._listener is not None:
            for env, item in zip(envs, results):
                try:
                    for event_type, data in events_for(env, item):
                        self._listener(event_type, data, index)
                except Exception:
                    # the entry is applied and committed; a failing listener must not look like a failed apply
                    log.exception("event listener failed", extra={"fields": {"index": index, "type": env.type}})
        return result

    def _apply_envelope(self, db: sqlite3.Connection, index: int, env: Envelope, entry_term: int | None) -> dict:
        if entry_term is not None and env.term != entry_term:
            # Stamped by a leader of another term than the one that appended it (it lost leadership and
            # pysyncobj forwarded the entry to the new leader): a deposed leader's decision never counts.
            return {"error": f"stale term {env.term} != log term {entry_term}: proposed by a deposed leader; retry"}
        if env.term < self.fence_term:
            # Proposed by a leader that has since been replaced: its decision must not take effect. Not
            # recorded under the idempotency key, so a retry through the current leader goes through.
            return {"error": f"stale term {env.term} < {self.fence_term}: proposed by a deposed leader; retry"}
        if env.term > self.fence_term:
            self.fence_term = env.term
            db.execute("INSERT OR REPLACE INTO meta VALUES ('fence_term', ?)", (str(env.term),))
        row = db.execute("SELECT result FROM requests WHERE idem=?", (env.idem,)).fetchone()
        if row is not None:
            return {**json.loads(row[0]), "duplicate": True}
        handler = _HANDLERS.get(env.type)
        if handler is None:
            command = domain.commands().get(env.type)
            handler = command.apply if command is not None else None
        if handler is None:
            result = {"error": f"unknown command type {env.type!r}"}
        else:
            result = handler(db, index, env)
        if env.type != "noop":
            db.execute("INSERT INTO requests VALUES (?, ?, ?)", (env.idem, index, json.dumps(result)))
            if index % 1000 == 0:
                db.execute("DELETE FROM requests WHERE log_index < ?", (index - REQUEST_RETENTION,))
        return result

    # --- reads ---------------------------------------------------------------------------------------
    def query(self, name: str, args: dict) -> Any:
        handler = _QUERIES.get(name) or domain.queries().get(name)
        if handler is None:
            known = sorted([*_QUERIES, *domain.queries()])
            raise KeyError(f"unknown query {name!r}; known: {', '.join(known)}")
        db = self.reader()
        db.execute("BEGIN")
        try:
            return handler(db, args)
        finally:
            db.execute("COMMIT")

    def applied_index(self) -> int:
        return self.last_applied

    def digest(self) -> str:
        """SHA-256 over the replicated tables in key order: equal on replicas that applied the same log."""
        return _digest(self.reader())

    # --- snapshots -------------------------------------------------------------------------------------
    def backup_to(self, path: Path) -> int:
        """Write a consistent copy of the database to `path`; return the applied index it holds."""
        with self._write_lock:
            target = sqlite3.connect(path)
            try:
                self._db.backup(target)
            finally:
                target.close()
            return self.last_applied

    def restore_from(self, path: Path) -> bool:
        """Replace the state with the snapshot at `path` unless ours is at least as new. True if restored."""
        source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = source.execute("SELECT value FROM meta WHERE key='last_applied_index'").fetchone()
            snapshot_index = int(row[0]) if row else 0
            with self._write_lock:
                if snapshot_index <= self.last_applied:
                    return False
                source.backup(self._db)
                self.last_applied = int(self._meta("last_applied_index", "0"))
                self.fence_term = int(self._meta("fence_term", "0"))
                return True
        finally:
            source.close()


def _digest(db: sqlite3.Connection, tables: list[str] | None = None) -> str:
    h = hashlib.sha256()
    for table in tables or state_tables():
        h.update(table.encode())
        for row in db.execute(f"SELECT * FROM {table} ORDER BY 1"):
            if table == "meta" and row[0] == "last_applied_index":
                continue  # equal states may sit at different indexes (no-op barriers)
            h.update(json.dumps(row, separators=(",", ":")).encode())
    return h.hexdigest()


# --- command handlers: (db, index, envelope) -> result; pure functions of their inputs and the db -------

def _kv_row(db: sqlite3.Connection, key: str) -> dict | None:
    row = db.execute("SELECT value, version, create_index, mod_index FROM kv WHERE key=?", (key,)).fetchone()
    if row is None:
        return None
    return {"key": key, "value": row[0], "version": row[1], "create_index": row[2], "mod_index": row[3]}


def _h_noop(db, index, env) -> dict:
    return {}


def _h_kv_put(db, index, env) -> dict:
    key, value = env.args["key"], env.args["value"]
    db.execute(
        """INSERT INTO kv VALUES (?, ?, 1, ?, ?, ?)
           ON CONFLICT(key) DO UPDATE SET value=excluded.value, version=version+1,
             mod_index=excluded.mod_index, updated_at=excluded.updated_at""",
        (key, value, index, index, env.ts),
    )
    return {"key": key, "version": _kv_row(db, key)["version"], "index": index}


def _h_kv_delete(db, index, env) -> dict:
    deleted = db.execute("DELETE FROM kv WHERE key=?", (env.args["key"],)).rowcount
    return {"key": env.args["key"], "deleted": bool(deleted)}


def _h_kv_cas(db, index, env) -> dict:
    key, expected = env.args["key"], env.args["expected"]
    current = _kv_row(db, key)
    current_value = current["value"] if current else None
    if current_value != expected:
        return {"key": key, "succeeded": False, "current": current_value}
    _h_kv_put(db, index, env)
    return {"key": key, "succeeded": True}


def _h_node_register(db, index, env) -> dict:
    a = env.args
    existing = db.execute("SELECT role, grpc_address, raft_address, liveness FROM nodes WHERE id=?",
                          (a["node_id"],)).fetchone()
    rejoined = existing is not None and existing[3] == "left"  # kept on record after leaving (membership.py)
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


def _h_node_request(db, index, env) -> dict:
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


def _h_node_approve(db, index, env) -> dict:
    return _decide(db, env, "approved")


def _h_node_reject(db, index, env) -> dict:
    return _decide(db, env, "rejected")


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
        return "join token expired; create a new one"
    if uses_left is not None and uses_left <= 0:
        return "join token already used up; create a new one"
    return ""


def _h_node_liveness(db, index, env) -> dict:
    row = db.execute("SELECT liveness FROM nodes WHERE id=?", (env.args["node_id"],)).fetchone()
    if row is None or row[0] == "left":  # a transition decided before the node left changes nothing
        return {"node_id": env.args["node_id"], "changed": False}
    if row[0] == env.args["state"]:
        return {"node_id": env.args["node_id"], "changed": False}
    db.execute("UPDATE nodes SET liveness=?, liveness_since=? WHERE id=?",
               (env.args["state"], env.ts, env.args["node_id"]))
    return {"node_id": env.args["node_id"], "changed": True, "previous": row[0]}


def _h_node_remove(db, index, env) -> dict:
    removed = db.execute("DELETE FROM nodes WHERE id=?", (env.args["node_id"],)).rowcount
    return {"node_id": env.args["node_id"], "removed": bool(removed)}


def _h_token_add(db, index, env) -> dict:
    a = env.args
    db.execute(
        "INSERT OR IGNORE INTO join_tokens (token_hash, role, created_at, expires_at, uses_left) VALUES (?, ?, ?, ?, ?)",
        (a["token_hash"], a["role"], env.ts, a["expires_at"], a["uses"]),
    )
    return {"token_hash": a["token_hash"], "added": True}


def _h_token_revoke(db, index, env) -> dict:
    rows = db.execute("SELECT token_hash FROM join_tokens WHERE token_hash LIKE ? AND revoked_at IS NULL",
                      (env.args["token_id"] + "%",)).fetchall()
    if len(rows) > 1:
        return {"error": f"token id {env.args['token_id']} is ambiguous; give more digits"}
    if rows:
        db.execute("UPDATE join_tokens SET revoked_at=? WHERE token_hash=?", (env.ts, rows[0][0]))
    return {"token_id": env.args["token_id"], "revoked": bool(rows)}


def _h_cluster_init(db, index, env) -> dict:
    existing = db.execute("SELECT value FROM meta WHERE key='cluster_id'").fetchone()
    if existing and existing[0] != env.args["cluster_id"]:
        return {"error": f"state already belongs to cluster {existing[0]}"}
    db.execute("INSERT OR REPLACE INTO meta VALUES ('cluster_id', ?)", (env.args["cluster_id"],))
    db.execute("INSERT OR REPLACE INTO meta VALUES ('created_at', ?)", (repr(env.ts),))
    return {"cluster_id": env.args["cluster_id"]}


_HANDLERS = {
    "noop": _h_noop,
    "kv.put": _h_kv_put,
    "kv.delete": _h_kv_delete,
    "kv.cas": _h_kv_cas,
    "node.register": _h_node_register,
    "node.remove": _h_node_remove,
    "node.liveness": _h_node_liveness,
    "node.request": _h_node_request,
    "node.approve": _h_node_approve,
    "node.reject": _h_node_reject,
    "token.add": _h_token_add,
    "token.revoke": _h_token_revoke,
    "cluster.init": _h_cluster_init,
}


# --- queries: (read connection, args) -> JSON-able ------------------------------------------------------

def _q_kv_get(db, args) -> dict | None:
    key = args.get("key")
    if not isinstance(key, str):
        raise ValueError("kv.get needs a string 'key'")
    return _kv_row(db, key)


def _q_kv_list(db, args) -> list[dict]:
    prefix = args.get("prefix", "")
    limit = int(args.get("limit", 1000))
    if not isinstance(prefix, str) or not 1 <= limit <= 10_000:
        raise ValueError("kv.list takes a string 'prefix' and a 'limit' of 1..10000")
    rows = db.execute(
        "SELECT key FROM kv WHERE key >= ? AND substr(key, 1, ?) = ? ORDER BY key LIMIT ?",
        (prefix, len(prefix), prefix, limit),
    ).fetchall()
    return [_kv_row(db, row[0]) for row in rows]


def _q_nodes(db, args) -> list[dict]:
    cols = ("id", "role", "grpc_address", "raft_address", "joined_at", "updated_at", "liveness", "liveness_since")
    # members only: nodes that left stay on record (membership.py, query member.list) but count for nothing
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


def _q_token_check(db, args) -> dict:
    return {"problem": token_problem(db, str(args.get("token_hash", "")), str(args.get("role", "")),
                                     float(args.get("now", 0)))}


def _q_tokens(db, args) -> list[dict]:
    """Tokens without their secrets: the id is a prefix of the hash."""
    rows = db.execute("SELECT token_hash, role, created_at, expires_at, uses_left, revoked_at FROM join_tokens "
                      "ORDER BY created_at").fetchall()
    return [{"id": h[:12], "role": role, "created_at": created, "expires_at": expires, "uses_left": uses,
             "revoked": revoked is not None} for h, role, created, expires, uses, revoked in rows]


def _q_cluster(db, args) -> dict:
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    return {
        "cluster_id": meta.get("cluster_id", ""),
        "last_applied_index": int(meta.get("last_applied_index", "0")),
        "fence_term": int(meta.get("fence_term", "0")),
        "kv_keys": db.execute("SELECT count(*) FROM kv").fetchone()[0],
        "nodes": db.execute("SELECT count(*) FROM nodes WHERE liveness!='left'").fetchone()[0],
    }


def _q_digest(db, args) -> dict:
    """The state's digest; `tables` narrows it (a test of one subsystem, beside others' background writes)."""
    tables = args.get("tables")
    if tables is not None:
        known = state_tables()
        if not isinstance(tables, list) or not all(t in known for t in tables):
            raise ValueError(f"digest: tables must be a list of state tables ({', '.join(known)})")
    return {"digest": _digest(db, tables)}


_QUERIES = {
    "kv.get": _q_kv_get,
    "kv.list": _q_kv_list,
    "nodes": _q_nodes,
    "token.check": _q_token_check,
    "join_requests": _q_join_requests,
    "join_request.secret": _q_join_request_secret,
    "tokens": _q_tokens,
    "cluster": _q_cluster,
    "digest": _q_digest,
}


def thread_reader(local: threading.local, path: Path) -> sqlite3.Connection:
    """The calling thread's read-only connection to `path`, opened on first use and kept in `local`."""
    db = getattr(local, "db", None)
    if db is None:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False,
                             timeout=30)
        db.execute("PRAGMA query_only=ON")
        local.db = db
    return db


def _split_sql(script: str) -> list[str]:
    """Statements of a migration script; sqlite3.complete_statement keeps triggers (BEGIN ... END;) whole."""
    statements, current = [], ""
    for piece in script.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if current.strip(" \n\t;"):
                statements.append(current.strip())
            current = ""
    if current.strip(" \n\t;"):
        statements.append(current.strip())
    return statements


def remove_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(f"{path}{suffix}")
        except FileNotFoundError:
            pass

"""The core schema and the cluster's own record: which cluster this state belongs to, and its digest.

Its migrations create the tables the first Cortex had (meta, nodes, kv, join tokens, the idempotency record)
and schema_versions, where every later domain counts its own migrations; this domain counts its own in
PRAGMA user_version, as data directories have since the start. The tables list is the head of the digest
in this exact order: replicas of every version hash the same bytes. The key-value store (kv.py), admission
(membership/nodes.py) and join tokens (membership/tokens.py) work on tables created here.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3

from cortex.core import args as rules
from cortex.core import domain

# Versioned migrations: append only. PRAGMA user_version records how many have run.
MIGRATIONS: tuple[str, ...] = (
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
)

# The core's replicated tables, in the digest's order (the head of domain.tables()).
TABLES = ("meta", "nodes", "kv", "join_tokens", "requests", "schema_versions", "join_requests")


def digest(db: sqlite3.Connection, tables: list[str] | tuple[str, ...] | None = None) -> str:
    """SHA-256 over the replicated tables in key order: equal on replicas that applied the same log."""
    h = hashlib.sha256()
    for table in tables or domain.tables():
        h.update(table.encode())
        for row in db.execute(f"SELECT * FROM {table} ORDER BY 1"):
            if table == "meta" and row[0] == "last_applied_index":
                continue  # equal states may sit at different indexes (no-op barriers)
            h.update(json.dumps(row, separators=(",", ":")).encode())
    return h.hexdigest()


def _v_noop(args: dict) -> dict:
    rules.no_extra(args, set())
    return {}


def _v_init(args: dict) -> dict:
    rules.no_extra(args, {"cluster_id"})
    return {"cluster_id": rules.require(args, "cluster_id", str)}


def _h_noop(db, index, env) -> dict:
    return {}


def _h_init(db, index, env) -> dict:
    existing = db.execute("SELECT value FROM meta WHERE key='cluster_id'").fetchone()
    if existing and existing[0] != env.args["cluster_id"]:
        return {"error": f"state already belongs to cluster {existing[0]}"}
    db.execute("INSERT OR REPLACE INTO meta VALUES ('cluster_id', ?)", (env.args["cluster_id"],))
    db.execute("INSERT OR REPLACE INTO meta VALUES ('created_at', ?)", (repr(env.ts),))
    return {"cluster_id": env.args["cluster_id"]}


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
        known = domain.tables()
        if not isinstance(tables, list) or not all(t in known for t in tables):
            raise ValueError(f"digest: tables must be a list of state tables ({', '.join(known)})")
    return {"digest": digest(db, tables)}


DOMAIN = domain.Domain(
    name="cluster",
    migrations=MIGRATIONS,
    tables=TABLES,
    commands={
        "noop": domain.Command(_v_noop, _h_noop, keep_result=False),  # a barrier (reads, leadership checks)
        "cluster.init": domain.Command(_v_init, _h_init, internal=True),
    },
    queries={"cluster": _q_cluster, "digest": _q_digest},
    unprefixed=frozenset({"noop", "digest"}),
    version_in_user_version=True,
)

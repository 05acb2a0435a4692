"""Command handlers of the memory domain: pure functions of (database, log index, envelope). Ids derive
from the envelope id and times from its timestamp, so every replica writes the same rows; `atomic` runs each
in a savepoint so a refused command changes nothing and its error is the result everywhere."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable

from cortex.core.commands import Envelope
from cortex.memory import sqlguard
from cortex.memory.content import content_digest, parse_chunk
from cortex.memory.schema import CONTENT_TABLES


class Refused(ValueError):
    """A command that validated but cannot apply to the current state (unknown thread, ...)."""


def _short_id(db: sqlite3.Connection, prefix: str, table: str, env: Envelope) -> str:
    """A short id from the envelope id (the same on every replica); the full id if the short one is taken."""
    short = f"{prefix}-{env.id[:10]}"
    taken = db.execute(f"SELECT 1 FROM {table} WHERE id=?", (short,)).fetchone()
    return f"{prefix}-{env.id}" if taken else short


def _thread(db: sqlite3.Connection, thread_id: str) -> tuple:
    row = db.execute("SELECT id, tier, status, thoughts FROM memory_threads WHERE id=?", (thread_id,)).fetchone()
    if row is None:
        raise Refused(f"no thread {thread_id!r}; list threads with memory_list_threads, or start one")
    return row


def _add_thought(db, index, env, thread_id: str, kind: str, content: str, metadata: str, source: str) -> dict:
    _, tier, _, count = _thread(db, thread_id)
    parent = db.execute("SELECT id FROM memory_thoughts WHERE thread_id=? ORDER BY seq DESC LIMIT 1",
                        (thread_id,)).fetchone()
    thought_id = _short_id(db, "tt", "memory_thoughts", env)
    db.execute("INSERT INTO memory_thoughts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (thought_id, thread_id, count + 1, parent[0] if parent else None, kind, content, metadata, tier,
                source, env.ts))
    db.execute("UPDATE memory_threads SET thoughts=thoughts+1, updated_at=? WHERE id=?", (env.ts, thread_id))
    return {"thought_id": thought_id, "thread_id": thread_id, "seq": count + 1,
            "parent_id": parent[0] if parent else None}


def h_thread_start(db, index, env) -> dict:
    a = env.args
    thread_id = _short_id(db, "th", "memory_threads", env)
    db.execute("INSERT INTO memory_threads VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)",
               (thread_id, a["title"], a["status"], a["project"], a["tier"], a["source"], env.ts, env.ts))
    return {"thread_id": thread_id, "status": a["status"]}


def h_thread_update(db, index, env) -> dict:
    a = env.args
    _thread(db, a["thread_id"])
    sets = {k: a[k] for k in ("title", "project", "status") if k in a}
    db.execute(f"UPDATE memory_threads SET {', '.join(f'{k}=?' for k in sets)}, updated_at=? WHERE id=?",
               (*sets.values(), env.ts, a["thread_id"]))
    return {"thread_id": a["thread_id"], **sets}


def h_thought(db, index, env) -> dict:
    a = env.args
    return _add_thought(db, index, env, a["thread_id"], a["type"], a["content"], a["metadata"], a["source"])


def h_handoff(db, index, env) -> dict:
    a = env.args
    metadata = json.dumps({"next_steps": a["next_steps"], "to": a["to"], "status": a["status"]}, sort_keys=True)
    result = _add_thought(db, index, env, a["thread_id"], "handoff", a["summary"], metadata, a["source"])
    db.execute("UPDATE memory_threads SET status=?, updated_at=? WHERE id=?", (a["status"], env.ts, a["thread_id"]))
    return {**result, "status": a["status"]}


def h_context_set(db, index, env) -> dict:
    a = env.args
    db.execute(
        """INSERT INTO memory_context VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?, ?)
           ON CONFLICT(key) DO UPDATE SET category=excluded.category, label=excluded.label,
             pinned=excluded.pinned, source=excluded.source, value=excluded.value, tier=excluded.tier,
             version=version+1, updated_at=excluded.updated_at""",
        (a["key"], a["category"], a["label"], int(a["pinned"]), a["source"], a["value"], a["tier"], env.ts, env.ts))
    version = db.execute("SELECT version FROM memory_context WHERE key=?", (a["key"],)).fetchone()[0]
    return {"key": a["key"], "version": version}


def h_context_delete(db, index, env) -> dict:
    deleted = db.execute("DELETE FROM memory_context WHERE key=?", (env.args["key"],)).rowcount
    if not deleted:
        raise Refused(f"no context entry {env.args['key']!r}; see memory_get_context")
    return {"key": env.args["key"], "deleted": True}


def h_project_set(db, index, env) -> dict:
    a = env.args
    db.execute(
        """INSERT INTO memory_projects VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT(name) DO UPDATE SET description=excluded.description, status=excluded.status,
             repo=excluded.repo, metadata=excluded.metadata, tier=excluded.tier, source=excluded.source,
             updated_at=excluded.updated_at""",
        (a["name"], a["description"], a["status"], a["repo"], a["metadata"], a["tier"], a["source"], env.ts, env.ts))
    return {"name": a["name"]}


def h_network_set(db, index, env) -> dict:
    a = env.args
    db.execute(
        """INSERT INTO memory_network VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT(name) DO UPDATE SET ip=excluded.ip, mac=excluded.mac, kind=excluded.kind,
             owner=excluded.owner, notes=excluded.notes, metadata=excluded.metadata, tier=excluded.tier,
             source=excluded.source, updated_at=excluded.updated_at""",
        (a["name"], a["ip"], a["mac"], a["kind"], a["owner"], a["notes"], a["metadata"], a["tier"], a["source"],
         env.ts, env.ts))
    return {"name": a["name"]}


def h_sql(db, index, env) -> dict:
    return {"changed": sqlguard.run_write(db, env.args["sql"], env.args["params"], env.ts)}


def h_restore_chunk(db, index, env) -> dict:
    a = env.args
    db.execute("INSERT OR REPLACE INTO memory_restore_chunks VALUES (?, ?, ?)", (a["restore_id"], a["seq"], a["rows"]))
    return {"restore_id": a["restore_id"], "seq": a["seq"]}


def h_restore_abort(db, index, env) -> dict:
    dropped = db.execute("DELETE FROM memory_restore_chunks WHERE restore_id=?", (env.args["restore_id"],)).rowcount
    return {"restore_id": env.args["restore_id"], "dropped_chunks": dropped}


def h_restore_commit(db, index, env) -> dict:
    """Replace all replicated memory content by the staged chunks, atomically, if they add up to `digest`."""
    a = env.args
    seqs = [r[0] for r in db.execute("SELECT seq FROM memory_restore_chunks WHERE restore_id=? ORDER BY seq",
                                     (a["restore_id"],))]
    missing = sorted(set(range(a["chunks"])) - set(seqs))
    if missing or len(seqs) != a["chunks"]:
        raise Refused(f"restore {a['restore_id']}: {len(seqs)} of {a['chunks']} chunks staged "
                      f"(missing {missing[:10]}); send them again, then commit")
    for table in reversed(CONTENT_TABLES):
        db.execute(f"DELETE FROM {table}")
    counts = dict.fromkeys(CONTENT_TABLES, 0)
    for (text,) in db.execute("SELECT rows FROM memory_restore_chunks WHERE restore_id=? ORDER BY seq",
                              (a["restore_id"],)).fetchall():
        chunk = parse_chunk(text)
        table, columns = chunk["table"], chunk["columns"]
        marks = ", ".join("?" for _ in columns)
        db.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", chunk["rows"])
        counts[table] += len(chunk["rows"])
    digest = content_digest(db)
    if digest != a["digest"]:
        raise Refused(f"restore {a['restore_id']}: restored content digest {digest[:12]} != backup's "
                      f"{a['digest'][:12]}; the backup is damaged or incomplete, nothing was changed")
    db.execute("DELETE FROM memory_restore_chunks WHERE restore_id=?", (a["restore_id"],))
    return {"restore_id": a["restore_id"], "rows": counts, "digest": digest}


def atomic(kind: str, handler: Callable) -> Callable:
    """Run a handler in a savepoint; a refusal or SQLite error undoes its changes and becomes the result."""

    def run(db: sqlite3.Connection, index: int, env: Envelope) -> dict:
        db.execute("SAVEPOINT memory_command")
        try:
            result = handler(db, index, env)
            db.execute("INSERT INTO memory_state VALUES (1, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                       "change_index=excluded.change_index, changed_at=excluded.changed_at", (index, env.ts))
        except (Refused, sqlguard.SQLRefused, sqlite3.Error, ValueError, KeyError) as exc:
            db.execute("ROLLBACK TO memory_command")
            db.execute("RELEASE memory_command")
            message = str(exc) if isinstance(exc, Refused | sqlguard.SQLRefused) else f"{type(exc).__name__}: {exc}"
            return {"error": f"{env.type}: {message}"}
        db.execute("RELEASE memory_command")
        return {**result, "kind": kind, "index": index}
    return run

"""The memory state domain: commands every replica applies the same way, and the queries the tools use.

Handlers are pure functions of (database, log index, envelope): ids derive from the envelope id, times from
the envelope timestamp. Each handler runs in a savepoint: a refused command (unknown thread, a constraint,
refused SQL) changes nothing and its error is the command's result, the same on every replica. The node-local
store (localstore.py) applies these same handlers to `local`-tier rows.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable

from cortex.core.args import no_extra
from cortex.core.commands import CommandError, Envelope
from cortex.core.domain import Command, Domain
from cortex.memory import sqlguard
from cortex.memory.schema import (
    CONTENT_TABLES,
    CONTEXT_CATEGORIES,
    FTS_TABLE,
    LOCAL_TIER,
    MAX_METADATA_BYTES,
    MAX_NAME_BYTES,
    MAX_TEXT_BYTES,
    SHARED_MIGRATIONS,
    SHARED_TIERS,
    STATE_TABLES,
    THOUGHT_TYPES,
    THREAD_STATUSES,
)

MAX_CHUNK_BYTES = 768 * 1024  # one restore chunk: well inside a command's size limit
PRIMARY_KEYS = {"memory_projects": "name", "memory_threads": "id", "memory_thoughts": "id",
                "memory_context": "key", "memory_network": "name"}


class Refused(ValueError):
    """A command that validated but cannot apply to the current state (unknown thread, ...)."""


# --- validation helpers -------------------------------------------------------------------------------------

def _text(args: dict, name: str, *, required: bool = False, limit: int = MAX_NAME_BYTES, default: str = "") -> str:
    value = args.get(name)
    if value is None:
        if required:
            raise CommandError(f"missing argument {name!r}")
        return default
    if not isinstance(value, str):
        raise CommandError(f"argument {name!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise CommandError(f"argument {name!r} must not be empty")
    size = len(value.encode())
    if size > limit:
        raise CommandError(f"argument {name!r} is {size} bytes; the limit is {limit} (store less, or link to it)")
    return value


def _choice(args: dict, name: str, choices: tuple[str, ...], default: str | None = None) -> str | None:
    value = args.get(name, default)
    if value is None:
        return None
    if value not in choices:
        raise CommandError(f"argument {name!r} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _tier(args: dict, local: bool) -> str:
    tier = args.get("tier", LOCAL_TIER if local else "internal")
    allowed = (LOCAL_TIER,) if local else SHARED_TIERS
    if tier not in allowed:
        if tier == LOCAL_TIER:
            raise CommandError("tier 'local' rows never leave their node: write them through that node's memory "
                               "tools, which keep them in the node-local store")
        raise CommandError(f"tier must be one of {', '.join(allowed)}; got {tier!r}")
    return tier


def json_text(value, name: str, limit: int, *, object_only: bool = False) -> str:
    """Canonical JSON text of a value given either as JSON text or as a decoded value."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise CommandError(f"argument {name!r} is not valid JSON ({exc}); send a JSON value, e.g. "
                               f"\"\\\"text\\\"\" for a string") from None
    if object_only and not isinstance(value, dict):
        raise CommandError(f"argument {name!r} must be a JSON object")
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode()) > limit:
        raise CommandError(f"argument {name!r} is {len(text.encode())} bytes as JSON; the limit is {limit}")
    return text


def _metadata(args: dict) -> str:
    return json_text(args.get("metadata") or {}, "metadata", MAX_METADATA_BYTES, object_only=True)


def _source(args: dict) -> str:
    return _text(args, "source")


# --- validators (args -> normalized args); `local` selects the node-local store's tier -------------------

def v_thread_start(args: dict, local: bool = False) -> dict:
    no_extra(args, {"title", "project", "status", "tier", "source"})
    return {"title": _text(args, "title", required=True), "project": _text(args, "project"),
            "status": _choice(args, "status", THREAD_STATUSES, "active"), "tier": _tier(args, local),
            "source": _source(args)}


def v_thread_update(args: dict, local: bool = False) -> dict:
    no_extra(args, {"thread_id", "title", "project", "status", "source"})
    out = {"thread_id": _text(args, "thread_id", required=True), "source": _source(args)}
    for name in ("title", "project"):
        if args.get(name) is not None:
            out[name] = _text(args, name, required=name == "title")
    if args.get("status") is not None:
        out["status"] = _choice(args, "status", THREAD_STATUSES)
    if len(out) == 2:
        raise CommandError("nothing to update: give title, project or status")
    return out


def v_thought(args: dict, local: bool = False) -> dict:
    no_extra(args, {"thread_id", "type", "content", "metadata", "source"})
    return {"thread_id": _text(args, "thread_id", required=True),
            "type": _choice(args, "type", THOUGHT_TYPES, "progress"),
            "content": _text(args, "content", required=True, limit=MAX_TEXT_BYTES),
            "metadata": _metadata(args), "source": _source(args)}


def v_handoff(args: dict, local: bool = False) -> dict:
    no_extra(args, {"thread_id", "summary", "next_steps", "to", "status", "source"})
    steps = args.get("next_steps") or []
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise CommandError("argument 'next_steps' must be a list of strings")
    return {"thread_id": _text(args, "thread_id", required=True),
            "summary": _text(args, "summary", required=True, limit=MAX_TEXT_BYTES),
            "next_steps": json.loads(json_text(steps, "next_steps", MAX_METADATA_BYTES)),
            "to": _text(args, "to"), "status": _choice(args, "status", ("paused", "completed", "active"), "paused"),
            "source": _source(args)}


def v_context_set(args: dict, local: bool = False) -> dict:
    no_extra(args, {"key", "value", "category", "label", "pinned", "source", "tier"})
    if "value" not in args:
        raise CommandError("missing argument 'value' (JSON text)")
    if not isinstance(args["value"], str):
        raise CommandError("argument 'value' must be JSON text (a string); the tools encode values for you")
    pinned = args.get("pinned", False)
    if not isinstance(pinned, bool):
        raise CommandError("argument 'pinned' must be true or false")
    return {"key": _text(args, "key", required=True),
            "value": json_text(args["value"], "value", MAX_TEXT_BYTES),
            "category": _choice(args, "category", CONTEXT_CATEGORIES, "fact"), "label": _text(args, "label"),
            "pinned": pinned, "source": _source(args), "tier": _tier(args, local)}


def v_context_delete(args: dict, local: bool = False) -> dict:
    no_extra(args, {"key", "source"})
    return {"key": _text(args, "key", required=True), "source": _source(args)}


def v_project_set(args: dict, local: bool = False) -> dict:
    no_extra(args, {"name", "description", "status", "repo", "metadata", "tier", "source"})
    return {"name": _text(args, "name", required=True),
            "description": _text(args, "description", limit=MAX_TEXT_BYTES), "status": _text(args, "status",
                                                                                            default="active"),
            "repo": _text(args, "repo"), "metadata": _metadata(args), "tier": _tier(args, local),
            "source": _source(args)}


def v_network_set(args: dict, local: bool = False) -> dict:
    no_extra(args, {"name", "ip", "mac", "kind", "owner", "notes", "metadata", "tier", "source"})
    out = {"name": _text(args, "name", required=True), "metadata": _metadata(args), "tier": _tier(args, local),
           "source": _source(args)}
    for name in ("ip", "mac", "kind", "owner"):
        out[name] = _text(args, name)
    out["notes"] = _text(args, "notes", limit=MAX_TEXT_BYTES)
    out["mac"] = out["mac"].lower()
    return out


def v_sql(args: dict, local: bool = False) -> dict:
    no_extra(args, {"sql", "params", "source"})
    sql, params = args.get("sql"), args.get("params")
    try:
        sqlguard.check_write(sql, params, SHARED_MIGRATIONS)
    except sqlguard.SQLRefused as exc:
        raise CommandError(str(exc)) from None
    return {"sql": sql, "params": params if params is not None else [], "source": _source(args)}


def v_restore_chunk(args: dict, local: bool = False) -> dict:
    no_extra(args, {"restore_id", "seq", "rows"})
    restore_id = _text(args, "restore_id", required=True, limit=64)
    seq = args.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise CommandError("argument 'seq' must be an integer >= 0")
    rows = _text(args, "rows", required=True, limit=MAX_CHUNK_BYTES)
    try:
        parse_chunk(rows)
    except ValueError as exc:
        raise CommandError(f"bad restore chunk: {exc}") from None
    return {"restore_id": restore_id, "seq": seq, "rows": rows}


def v_restore_commit(args: dict, local: bool = False) -> dict:
    no_extra(args, {"restore_id", "chunks", "digest"})
    chunks = args.get("chunks")
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 0:
        raise CommandError("argument 'chunks' must be an integer >= 0")
    return {"restore_id": _text(args, "restore_id", required=True, limit=64), "chunks": chunks,
            "digest": _text(args, "digest", required=True, limit=64)}


def v_restore_abort(args: dict, local: bool = False) -> dict:
    no_extra(args, {"restore_id"})
    return {"restore_id": _text(args, "restore_id", required=True, limit=64)}


# --- restore chunks: {"table": ..., "columns": [...], "rows": [[...], ...]} ---------------------------------

def table_columns(table: str) -> tuple[str, ...]:
    return _COLUMNS[table]


def _schema_columns() -> dict[str, tuple[str, ...]]:
    db = sqlite3.connect(":memory:")
    try:
        for script in SHARED_MIGRATIONS:
            db.executescript(script)
        return {t: tuple(r[1] for r in db.execute(f"PRAGMA table_info({t})")) for t in CONTENT_TABLES}
    finally:
        db.close()


_COLUMNS = _schema_columns()


def parse_chunk(text: str) -> dict:
    doc = json.loads(text)
    if not isinstance(doc, dict) or doc.get("table") not in CONTENT_TABLES:
        raise ValueError(f"table must be one of {', '.join(CONTENT_TABLES)}")
    columns = doc.get("columns")
    if not isinstance(columns, list) or set(columns) != set(_COLUMNS[doc["table"]]):
        raise ValueError(f"columns of {doc['table']} must be {', '.join(_COLUMNS[doc['table']])}")
    rows = doc.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == len(columns) for r in rows):
        raise ValueError("rows must be lists as long as columns")
    return doc


# --- handlers ---------------------------------------------------------------------------------------------

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


# --- queries ------------------------------------------------------------------------------------------------

def _rows(cursor: sqlite3.Cursor) -> list[dict]:
    columns = [d[0] for d in cursor.description]
    out = []
    for row in cursor:
        item = dict(zip(columns, row))
        for name in ("metadata", "value"):
            if isinstance(item.get(name), str):
                item[name] = json.loads(item[name])
        if "pinned" in item:
            item["pinned"] = bool(item["pinned"])
        out.append(item)
    return out


def _limit(args: dict, default: int = 50, cap: int = 1000) -> int:
    limit = args.get("limit", default)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= cap:
        raise ValueError(f"limit must be an integer between 1 and {cap}")
    return limit


def q_threads(db, args) -> list[dict]:
    where, params = [], []
    if args.get("status"):
        where.append("status = ?")
        params.append(args["status"])
    if args.get("project"):
        where.append("project = ?")
        params.append(args["project"])
    sql = "SELECT * FROM memory_threads" + (" WHERE " + " AND ".join(where) if where else "")
    threads = _rows(db.execute(sql + " ORDER BY updated_at DESC, id LIMIT ?", (*params, _limit(args))))
    for thread in threads:
        last = db.execute("SELECT id, type, content, created_at FROM memory_thoughts WHERE thread_id=? "
                          "ORDER BY seq DESC LIMIT 1", (thread["id"],)).fetchone()
        thread["last_thought"] = dict(zip(("id", "type", "content", "created_at"), last)) if last else None
    return threads


def q_thread(db, args) -> dict | None:
    thread = _rows(db.execute("SELECT * FROM memory_threads WHERE id=?", (str(args.get("thread_id", "")),)))
    if not thread:
        return None
    thoughts = _rows(db.execute("SELECT * FROM (SELECT * FROM memory_thoughts WHERE thread_id=? ORDER BY seq DESC "
                                "LIMIT ?) ORDER BY seq", (thread[0]["id"], _limit(args, 100))))
    return {**thread[0], "thought_list": thoughts}


def q_context(db, args) -> list[dict]:
    where, params = [], []
    if args.get("key"):
        where.append("key = ?")
        params.append(args["key"])
    if args.get("prefix"):
        where.append("substr(key, 1, ?) = ?")
        params += [len(args["prefix"]), args["prefix"]]
    if args.get("category"):
        where.append("category = ?")
        params.append(args["category"])
    if args.get("pinned"):
        where.append("pinned = 1")
    sql = "SELECT * FROM memory_context" + (" WHERE " + " AND ".join(where) if where else "")
    return _rows(db.execute(sql + " ORDER BY pinned DESC, updated_at DESC, key LIMIT ?", (*params, _limit(args))))


def _fts_phrase(query: str) -> str:
    """Every word as a quoted FTS5 string, all required: what a person means by a plain search."""
    return " ".join('"' + word.replace('"', '""') + '"' for word in query.split())


def q_search(db, args) -> list[dict]:
    query = str(args.get("query", "")).strip()
    if not query:
        raise ValueError("query must not be empty")
    kinds = args.get("kinds") or ["thread", "thought", "context", "project", "network"]
    marks = ", ".join("?" for _ in kinds)
    sql = (f"SELECT kind, ref, title, snippet({FTS_TABLE}, 3, '[', ']', '…', 12) AS snippet, "
           f"bm25({FTS_TABLE}, 0, 0, 2.0, 1.0) AS score FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH ? "
           f"AND kind IN ({marks}) ORDER BY score, ref LIMIT ?")
    limit = _limit(args, 20, 200)
    try:
        hits = _rows(db.execute(sql, (query, *kinds, limit)))
    except sqlite3.OperationalError:
        hits = _rows(db.execute(sql, (_fts_phrase(query), *kinds, limit)))  # not FTS syntax: plain words
    for hit in hits:
        hit["score"] = -hit["score"]  # bm25 is lower-is-better; report higher-is-better
        if hit["kind"] == "thought":
            row = db.execute("SELECT t.thread_id, h.title, t.tier FROM memory_thoughts t JOIN memory_threads h "
                             "ON h.id = t.thread_id WHERE t.id=?", (hit["ref"],)).fetchone()
            if row:
                hit["thread_id"], hit["thread_title"], hit["tier"] = row
    return hits


def q_network(db, args) -> list[dict]:
    query = str(args.get("query", "")).strip().lower()
    if not query:
        return _rows(db.execute("SELECT * FROM memory_network ORDER BY name LIMIT ?", (_limit(args),)))
    like = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return _rows(db.execute(
        """SELECT * FROM memory_network WHERE lower(name) = ?1 OR ip = ?1 OR mac = ?1
             OR lower(name) LIKE ?2 ESCAPE '\\' OR ip LIKE ?2 ESCAPE '\\' OR mac LIKE ?2 ESCAPE '\\'
             OR lower(notes) LIKE ?2 ESCAPE '\\'
           ORDER BY (lower(name) = ?1 OR ip = ?1 OR mac = ?1) DESC, name LIMIT ?3""", (query, like, _limit(args))))


def q_schema(db, args) -> list[dict]:
    out = []
    for table in CONTENT_TABLES:
        columns = [{"name": r[1], "type": r[2], "not_null": bool(r[3]), "primary_key": bool(r[5])}
                   for r in db.execute(f"PRAGMA table_info({table})")]
        out.append({"table": table, "columns": columns})
    out.append({"table": FTS_TABLE, "columns": [{"name": c, "type": "TEXT", "not_null": False, "primary_key": False}
                                                for c in ("kind", "ref", "title", "body")],
                "note": "FTS5 full-text index: WHERE memory_fts MATCH 'words' ORDER BY rank"})
    return out


def q_stats(db, args) -> dict:
    tables = {}
    for table in CONTENT_TABLES:
        by_tier = dict(db.execute(f"SELECT tier, count(*) FROM {table} GROUP BY tier ORDER BY tier").fetchall())
        tables[table] = {"rows": sum(by_tier.values()), "by_tier": by_tier}
    state = db.execute("SELECT change_index, changed_at FROM memory_state WHERE id=1").fetchone()
    threads = dict(db.execute("SELECT status, count(*) FROM memory_threads GROUP BY status").fetchall())
    return {"tables": tables, "threads_by_status": threads,
            "search_index_rows": db.execute(f"SELECT count(*) FROM {FTS_TABLE}").fetchone()[0],
            "change_index": state[0] if state else 0, "changed_at": state[1] if state else None}


def q_sql(db, args) -> dict:
    result = sqlguard.run_query(db, args.get("sql"), args.get("params"), limit=_limit(args, 200, 5000))
    return {"columns": result.columns, "rows": result.rows, "truncated": result.truncated,
            "row_count": len(result.rows)}


def q_whereami(db, args) -> dict:
    active = q_threads(db, {"status": "active", "limit": _limit(args, 20)})
    for thread in active:
        thread["recent"] = q_thread(db, {"thread_id": thread["id"], "limit": 3})["thought_list"]
    paused = q_threads(db, {"status": "paused", "limit": 10})
    for thread in paused:
        handoff = db.execute("SELECT content, metadata, created_at FROM memory_thoughts WHERE thread_id=? AND "
                             "type='handoff' ORDER BY seq DESC LIMIT 1", (thread["id"],)).fetchone()
        thread["handoff"] = ({"summary": handoff[0], **json.loads(handoff[1]), "created_at": handoff[2]}
                             if handoff else None)
    pinned = q_context(db, {"pinned": True, "limit": 50})
    recent = _rows(db.execute("SELECT * FROM memory_context WHERE pinned=0 ORDER BY updated_at DESC, key LIMIT ?",
                              (_limit(args, 15),)))
    state = db.execute("SELECT change_index FROM memory_state WHERE id=1").fetchone()
    return {"active": active, "paused": paused, "pinned": pinned, "recent_context": recent,
            "change_index": state[0] if state else 0}


def q_version(db, args) -> dict:
    state = db.execute("SELECT change_index FROM memory_state WHERE id=1").fetchone()
    return {"change_index": state[0] if state else 0}


def content_digest(db: sqlite3.Connection, tiers: tuple[str, ...] | None = None) -> str:
    """SHA-256 over the memory content tables in key order (optionally only some tiers)."""
    h = hashlib.sha256()
    for table in CONTENT_TABLES:
        columns = _COLUMNS[table]
        h.update(table.encode())
        where = f" WHERE tier IN ({', '.join('?' for _ in tiers)})" if tiers else ""
        for row in db.execute(f"SELECT {', '.join(columns)} FROM {table}{where} ORDER BY {PRIMARY_KEYS[table]}",
                              tiers or ()):
            h.update(json.dumps(row, separators=(",", ":")).encode())
    return h.hexdigest()


def q_digest(db, args) -> dict:
    tiers = tuple(args["tiers"]) if args.get("tiers") else None
    return {"digest": content_digest(db, tiers)}


# --- events: every applied memory change is one event; whereami.md and other watchers debounce them -------

def events(env: Envelope, result: dict) -> list[tuple[str, dict]]:
    if "error" in result or result.get("duplicate"):
        return []
    # (the log index travels as Event.index; a data key named "index" would clash with it in the agent's log)
    data = {"kind": result.get("kind", env.type.removeprefix("memory."))}
    for name in ("thread_id", "thought_id", "key", "name", "status"):
        if name in result:
            data[name] = result[name]
    return [("memory.changed", data)]


# command type -> (validator, handler)
COMMANDS = {
    "memory.thread_start": (v_thread_start, h_thread_start),
    "memory.thread_update": (v_thread_update, h_thread_update),
    "memory.thought": (v_thought, h_thought),
    "memory.handoff": (v_handoff, h_handoff),
    "memory.context_set": (v_context_set, h_context_set),
    "memory.context_delete": (v_context_delete, h_context_delete),
    "memory.project_set": (v_project_set, h_project_set),
    "memory.network_set": (v_network_set, h_network_set),
    "memory.sql": (v_sql, h_sql),
    "memory.restore_chunk": (v_restore_chunk, h_restore_chunk),
    "memory.restore_commit": (v_restore_commit, h_restore_commit),
    "memory.restore_abort": (v_restore_abort, h_restore_abort),
}
VALIDATORS = {name: validator for name, (validator, _) in COMMANDS.items()}
QUERIES = {
    "memory.threads": q_threads, "memory.thread": q_thread, "memory.context": q_context, "memory.search": q_search,
    "memory.network": q_network, "memory.schema": q_schema, "memory.stats": q_stats, "memory.sql": q_sql,
    "memory.whereami": q_whereami, "memory.version": q_version, "memory.digest": q_digest,
}

DOMAIN = Domain(
    name="memory",
    migrations=SHARED_MIGRATIONS,
    tables=(*CONTENT_TABLES, *STATE_TABLES),
    commands={name: Command(validator, atomic(name.removeprefix("memory."), handler))
              for name, (validator, handler) in COMMANDS.items()},
    queries=QUERIES,
    events=events,
)

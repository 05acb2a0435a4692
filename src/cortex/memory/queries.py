"""Read-only queries of the memory domain, the ones the memory tools and `cortex` commands use."""

from __future__ import annotations

import json
import sqlite3

from cortex.memory import sqlguard
from cortex.memory.content import content_digest
from cortex.memory.schema import CONTENT_TABLES, FTS_TABLE


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


def q_digest(db, args) -> dict:
    tiers = tuple(args["tiers"]) if args.get("tiers") else None
    return {"digest": content_digest(db, tiers)}

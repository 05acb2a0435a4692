"""The memory content tables as data: their columns and keys, the restore chunk format
({"table": ..., "columns": [...], "rows": [[...], ...]}) and the content digest that backups and restores
compare. Shared by the validators, the handlers, the queries and backup.py."""

from __future__ import annotations

import hashlib
import json
import sqlite3

from cortex.memory.schema import CONTENT_TABLES, SHARED_MIGRATIONS

MAX_CHUNK_BYTES = 768 * 1024  # one restore chunk: well inside a command's size limit
PRIMARY_KEYS = {"memory_projects": "name", "memory_threads": "id", "memory_thoughts": "id",
                "memory_context": "key", "memory_network": "name"}


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

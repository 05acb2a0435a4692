"""The memory data model: one schema for the replicated store and the node-local store.

Both stores hold the same tables so the same command handlers and queries serve both; they differ only in
which data tiers a row may carry: the replicated store takes `public` and `internal` rows, the node-local
store only `local` ones (a local row never leaves its node, so it is never in the Raft log or a backup).
Full-text search is an FTS5 table kept in step by triggers; it is derived data, so the content digest and
backups' checksums cover the base tables only.
"""

from __future__ import annotations

THREAD_STATUSES = ("active", "paused", "completed", "abandoned")
THOUGHT_TYPES = ("idea", "decision", "discovery", "blocker", "progress", "tangent_start", "handoff")
CONTEXT_CATEGORIES = ("project", "pr", "machine", "waiting", "fact", "reminder")
SHARED_TIERS = ("public", "internal")
LOCAL_TIER = "local"
TIERS = (*SHARED_TIERS, LOCAL_TIER)

# Caps: memory is notes, not a blob store; a larger value is refused before anything is replicated.
MAX_TEXT_BYTES = 64 * 1024  # a thought's content, a context value
MAX_METADATA_BYTES = 16 * 1024
MAX_NAME_BYTES = 256  # keys, titles, labels, project and client names
MAX_SQL_BYTES = 16 * 1024

# Content tables, in dependency order (threads before the thoughts that reference them).
CONTENT_TABLES = ("memory_projects", "memory_threads", "memory_thoughts", "memory_context", "memory_network")
# Replicated bookkeeping: the change counter and restores in progress.
STATE_TABLES = ("memory_state", "memory_restore_chunks")
FTS_TABLE = "memory_fts"

_TIER_CHECK = "@TIERS@"

_V1 = f"""
CREATE TABLE memory_projects (
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT 'active',
    repo TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '{{}}' CHECK (json_valid(metadata)),
    tier TEXT NOT NULL CHECK (tier IN ({_TIER_CHECK})),
    source TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE memory_threads (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'paused', 'completed', 'abandoned')),
    project TEXT NOT NULL DEFAULT '',
    tier TEXT NOT NULL CHECK (tier IN ({_TIER_CHECK})),
    source TEXT NOT NULL DEFAULT '',
    thoughts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX memory_threads_by_status ON memory_threads (status, updated_at);
CREATE TABLE memory_thoughts (
    id TEXT PRIMARY KEY,
    thread_id TEXT NOT NULL REFERENCES memory_threads (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    parent_id TEXT,
    type TEXT NOT NULL CHECK (type IN ('idea', 'decision', 'discovery', 'blocker', 'progress', 'tangent_start',
                                       'handoff')),
    content TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{{}}' CHECK (json_valid(metadata)),
    tier TEXT NOT NULL CHECK (tier IN ({_TIER_CHECK})),
    source TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    UNIQUE (thread_id, seq)
);
CREATE TABLE memory_context (
    key TEXT PRIMARY KEY,
    category TEXT NOT NULL CHECK (category IN ('project', 'pr', 'machine', 'waiting', 'fact', 'reminder')),
    label TEXT NOT NULL DEFAULT '',
    pinned INTEGER NOT NULL DEFAULT 0 CHECK (pinned IN (0, 1)),
    source TEXT NOT NULL DEFAULT '',
    value TEXT NOT NULL CHECK (json_valid(value)),
    tier TEXT NOT NULL CHECK (tier IN ({_TIER_CHECK})),
    version INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX memory_context_by_category ON memory_context (category, updated_at);
CREATE TABLE memory_network (
    name TEXT PRIMARY KEY,
    ip TEXT NOT NULL DEFAULT '',
    mac TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL DEFAULT '',
    owner TEXT NOT NULL DEFAULT '',
    notes TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '{{}}' CHECK (json_valid(metadata)),
    tier TEXT NOT NULL CHECK (tier IN ({_TIER_CHECK})),
    source TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE memory_state (id INTEGER PRIMARY KEY CHECK (id = 1), change_index INTEGER NOT NULL,
                           changed_at REAL NOT NULL);
CREATE TABLE memory_restore_chunks (
    restore_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    rows TEXT NOT NULL,
    PRIMARY KEY (restore_id, seq)
);
CREATE VIRTUAL TABLE memory_fts USING fts5(kind UNINDEXED, ref UNINDEXED, title, body, tokenize = 'porter unicode61');
CREATE TRIGGER memory_threads_fts_insert AFTER INSERT ON memory_threads BEGIN
    INSERT INTO memory_fts (kind, ref, title, body) VALUES ('thread', new.id, new.title, new.project);
END;
CREATE TRIGGER memory_threads_fts_update AFTER UPDATE OF title, project ON memory_threads BEGIN
    DELETE FROM memory_fts WHERE kind = 'thread' AND ref = old.id;
    INSERT INTO memory_fts (kind, ref, title, body) VALUES ('thread', new.id, new.title, new.project);
END;
CREATE TRIGGER memory_threads_fts_delete AFTER DELETE ON memory_threads BEGIN
    DELETE FROM memory_fts WHERE kind = 'thread' AND ref = old.id;
END;
CREATE TRIGGER memory_thoughts_fts_insert AFTER INSERT ON memory_thoughts BEGIN
    INSERT INTO memory_fts (kind, ref, title, body) VALUES ('thought', new.id, new.type, new.content);
END;
CREATE TRIGGER memory_thoughts_fts_update AFTER UPDATE OF type, content ON memory_thoughts BEGIN
    DELETE FROM memory_fts WHERE kind = 'thought' AND ref = old.id;
    INSERT INTO memory_fts (kind, ref, title, body) VALUES ('thought', new.id, new.type, new.content);
END;
CREATE TRIGGER memory_thoughts_fts_delete AFTER DELETE ON memory_thoughts BEGIN
    DELETE FROM memory_fts WHERE kind = 'thought' AND ref = old.id;
END;
CREATE TRIGGER memory_context_fts_insert AFTER INSERT ON memory_context BEGIN
    INSERT INTO memory_fts (kind, ref, title, body) VALUES ('context', new.key, new.key || ' ' || new.label, new.value);
END;
CREATE TRIGGER memory_context_fts_update AFTER UPDATE OF label, value ON memory_context BEGIN
    DELETE FROM memory_fts WHERE kind = 'context' AND ref = old.key;
    INSERT INTO memory_fts (kind, ref, title, body) VALUES ('context', new.key, new.key || ' ' || new.label, new.value);
END;
CREATE TRIGGER memory_context_fts_delete AFTER DELETE ON memory_context BEGIN
    DELETE FROM memory_fts WHERE kind = 'context' AND ref = old.key;
END;
CREATE TRIGGER memory_projects_fts_insert AFTER INSERT ON memory_projects BEGIN
    INSERT INTO memory_fts (kind, ref, title, body) VALUES ('project', new.name, new.name, new.description);
END;
CREATE TRIGGER memory_projects_fts_update AFTER UPDATE OF description ON memory_projects BEGIN
    DELETE FROM memory_fts WHERE kind = 'project' AND ref = old.name;
    INSERT INTO memory_fts (kind, ref, title, body) VALUES ('project', new.name, new.name, new.description);
END;
CREATE TRIGGER memory_projects_fts_delete AFTER DELETE ON memory_projects BEGIN
    DELETE FROM memory_fts WHERE kind = 'project' AND ref = old.name;
END;
CREATE TRIGGER memory_network_fts_insert AFTER INSERT ON memory_network BEGIN
    INSERT INTO memory_fts (kind, ref, title, body)
    VALUES ('network', new.name, new.name, new.ip || ' ' || new.mac || ' ' || new.kind || ' ' || new.notes);
END;
CREATE TRIGGER memory_network_fts_update AFTER UPDATE OF ip, mac, kind, notes ON memory_network BEGIN
    DELETE FROM memory_fts WHERE kind = 'network' AND ref = old.name;
    INSERT INTO memory_fts (kind, ref, title, body)
    VALUES ('network', new.name, new.name, new.ip || ' ' || new.mac || ' ' || new.kind || ' ' || new.notes);
END;
CREATE TRIGGER memory_network_fts_delete AFTER DELETE ON memory_network BEGIN
    DELETE FROM memory_fts WHERE kind = 'network' AND ref = old.name;
END;
"""

# Append-only; the templates are fixed strings, so the rendered scripts never change for a version.
_MIGRATIONS = (_V1,)


def migrations(tiers: tuple[str, ...]) -> tuple[str, ...]:
    allowed = ", ".join(f"'{t}'" for t in tiers)
    return tuple(script.replace(_TIER_CHECK, allowed) for script in _MIGRATIONS)


SHARED_MIGRATIONS = migrations(SHARED_TIERS)
LOCAL_MIGRATIONS = migrations((LOCAL_TIER,))

"""The memory state domain: commands every replica applies the same way, and the queries the tools use.

Each command is a validator (validators.py: arguments checked before the command is proposed) and a handler
(handlers.py: a pure function of database, log index and envelope, run in a savepoint so that a refused
command changes nothing and its error is the command's result, the same on every replica). Queries are in
queries.py, the content tables' columns, the restore chunk format and the content digest in content.py. The
node-local store (localstore.py) applies these same validators, handlers and queries to `local`-tier rows.
"""

from __future__ import annotations

from cortex.core.commands import Envelope
from cortex.core.domain import Command, Domain
from cortex.memory import handlers, queries, validators
from cortex.memory.schema import CONTENT_TABLES, SHARED_MIGRATIONS, STATE_TABLES

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
    "memory.thread_start": (validators.v_thread_start, handlers.h_thread_start),
    "memory.thread_update": (validators.v_thread_update, handlers.h_thread_update),
    "memory.thought": (validators.v_thought, handlers.h_thought),
    "memory.handoff": (validators.v_handoff, handlers.h_handoff),
    "memory.context_set": (validators.v_context_set, handlers.h_context_set),
    "memory.context_delete": (validators.v_context_delete, handlers.h_context_delete),
    "memory.project_set": (validators.v_project_set, handlers.h_project_set),
    "memory.network_set": (validators.v_network_set, handlers.h_network_set),
    "memory.sql": (validators.v_sql, handlers.h_sql),
    "memory.restore_chunk": (validators.v_restore_chunk, handlers.h_restore_chunk),
    "memory.restore_commit": (validators.v_restore_commit, handlers.h_restore_commit),
    "memory.restore_abort": (validators.v_restore_abort, handlers.h_restore_abort),
}
VALIDATORS = {name: validator for name, (validator, _) in COMMANDS.items()}
QUERIES = {
    "memory.threads": queries.q_threads, "memory.thread": queries.q_thread, "memory.context": queries.q_context,
    "memory.search": queries.q_search, "memory.network": queries.q_network, "memory.schema": queries.q_schema,
    "memory.stats": queries.q_stats, "memory.sql": queries.q_sql, "memory.whereami": queries.q_whereami,
    "memory.version": queries.q_version, "memory.digest": queries.q_digest,
}

DOMAIN = Domain(
    name="memory",
    migrations=SHARED_MIGRATIONS,
    tables=(*CONTENT_TABLES, *STATE_TABLES),
    commands={name: Command(validator, handlers.atomic(name.removeprefix("memory."), handler))
              for name, (validator, handler) in COMMANDS.items()},
    queries=QUERIES,
    events=events,
)

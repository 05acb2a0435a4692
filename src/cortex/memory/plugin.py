"""The `memory` plugin: the 12 memory tools, whereami.md and the leader's backup schedule.

Writes go through the cluster (`ctx.cluster.write`, forwarded to the leader) except `local`-tier rows, which
stay in this node's LocalStore. Every write's result carries its log index; reads then ask for a state at
least that new (`min_index`), so a tool sees its own node's writes at once even when it reads a follower's
local replica (read-your-writes), while still reading locally (no leader round trip) in the common case.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

from cortex.core.args import READ_LEVELS
from cortex.core.commands import CommandError
from cortex.memory import sqlguard, whereami
from cortex.memory.localstore import LocalStore
from cortex.memory.schema import CONTEXT_CATEGORIES, LOCAL_TIER, THOUGHT_TYPES, THREAD_STATUSES, TIERS
from cortex.plugins import Caller, Plugin, Tool, ToolError, returns, returns_list

# Values that look like secrets: memory is shared across machines (and maybe backed up), credentials are not.
_CREDENTIAL_PATTERNS = [
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"), "a GitHub token"),
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"), "a Slack token"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{20,}\b"), "an API secret key"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\b"), "a JSON web token"),
    (re.compile(r"(?i)\b(password|passwd|secret|api[_-]?key|token|private[_-]?key)\b\s*[:=]\s*\S{6,}"),
     "a password or secret assignment"),
]
_SECRET_KEY_NAME = re.compile(r"(?i)(password|passwd|secret|api[_-]?key|token|credential)")


def credential_warnings(key: str, value: Any) -> list[str]:
    text = value if isinstance(value, str) else json.dumps(value)
    found = [what for pattern, what in _CREDENTIAL_PATTERNS if pattern.search(text)]
    if isinstance(value, dict):
        found += [f"a field named {k!r}" for k in value if _SECRET_KEY_NAME.search(str(k))
                  and isinstance(value[k], str) and len(value[k]) >= 6]
    if _SECRET_KEY_NAME.search(key) and isinstance(value, str) and len(value) >= 12 and " " not in value.strip():
        found.append(f"a secret-looking value under the key {key!r}")
    return [f"the value looks like it contains {what}: memory is shared across nodes (and backups); keep "
            f"credentials in a secret store, or at least use tier 'local'" for what in dict.fromkeys(found)]


def _schema(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_TIER = {"type": "string", "enum": list(TIERS), "description": "public: may leave the cluster (backups); "
         "internal (default): replicated in the cluster only; local: never leaves this node"}
_IDEM = {"type": "string", "maxLength": 128, "description": "retries with the same key apply once"}
_LIMIT = {"type": "integer", "minimum": 1, "maximum": 1000}

DEFAULT_BACKUP = {"enabled": True, "interval": 3600.0, "dir": "", "s3": None, "public_only": False, "keep": 48}


# What each tool answers: its MCP output schema (structuredContent).
_OUT_MEMORY_QUERY = returns(
    {"columns": "array", "rows": "array", "truncated": "boolean", "row_count": "integer"}
)
_OUT_MEMORY_WRITE = returns(
    {"tier": "string"}, required=(), description="what the write command answered (ids, tier)"
)
_OUT_MEMORY_SCHEMA = returns_list({"table": "string", "columns": "array"})
_OUT_MEMORY_STATS = returns(
    {
        "cluster": returns({"tables": "object", "change_index": "integer"}),
        "local": returns({"tables": "object"}),
    }
)
_OUT_MEMORY_LOG_THOUGHT = returns({"thread_id": "string", "started_thread": "boolean"}, "thread_id")
_OUT_MEMORY_WHEREAMI = returns({"markdown": "string", "path": "string", "change_index": "integer"})
_OUT_MEMORY_HANDOFF = returns({"whereami": "string"})
_OUT_MEMORY_SET_CONTEXT = returns({"warnings": "array"})
_OUT_MEMORY_GET_CONTEXT = returns_list({"key": "string", "pinned": "boolean", "updated_at": "number"})
_OUT_MEMORY_SEARCH = returns_list({"kind": "string", "ref": "string", "score": "number"})
_OUT_MEMORY_NETWORK_LOOKUP = returns_list()
_OUT_MEMORY_LIST_THREADS = returns_list(
    {"id": "string", "title": "string", "status": "string", "updated_at": "number"}
)


class MemoryPlugin(Plugin):
    name = "memory"
    description = "Shared memory for an assistant: threads of thoughts, context, search, whereami.md, backups."
    options_schema = {
        "type": "object", "additionalProperties": False,
        "properties": {
            "whereami_path": {"type": "string", "default": "",
                              "description": "where whereami.md is written (default: the plugin's data dir)"},
            "whereami_debounce": {"type": "number", "minimum": 0, "default": 1.0},
            "whereami_poll": {"type": "number", "minimum": 0.2, "default": 15.0,
                              "description": "seconds between checks for changes made elsewhere (workers)"},
            "read_level": {"type": "string", "enum": list(READ_LEVELS), "default": "stale"},
            "backup": {
                "type": "object", "additionalProperties": False,
                "properties": {
                    "enabled": {"type": "boolean"},
                    "interval": {"type": "number", "minimum": 0.5},
                    "dir": {"type": "string"},
                    "public_only": {"type": "boolean"},
                    "keep": {"type": "integer", "minimum": 1},
                    "s3": {"type": "object", "additionalProperties": False, "required": ["bucket"],
                           "properties": {"bucket": {"type": "string", "minLength": 3},
                                          "prefix": {"type": "string"},
                                          "endpoint_url": {"type": "string"},
                                          "region": {"type": "string"}}},
                },
                "default": {},
            },
        },
    }

    # --- lifecycle ---------------------------------------------------------------------------------------
    def init(self) -> None:
        opts = self.ctx.options
        self.local = LocalStore(self.ctx.data_dir / "local.db")
        self.whereami_path = Path(opts["whereami_path"]) if opts["whereami_path"] else self.ctx.data_dir / "whereami.md"
        self.backup_options = {**DEFAULT_BACKUP, **opts.get("backup", {})}
        self._seen_index = 0  # the newest log index this node wrote or was told about
        self._index_lock = threading.Lock()
        self._stop = threading.Event()
        self._debouncer: whereami.Debouncer | None = None
        self._threads: list[threading.Thread] = []
        self._last_version = -1

    def start(self) -> None:
        self._debouncer = whereami.Debouncer(self.ctx.options["whereami_debounce"], self.regenerate_whereami,
                                             lambda exc: self.ctx.log.warning("whereami.md not updated: %s", exc))
        self._debouncer.poke()
        for target, name in ((self._poll_loop, "memory-poll"), (self._backup_loop, "memory-backup")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        if getattr(self, "_debouncer", None) is not None:
            self._debouncer.stop()
        for thread in getattr(self, "_threads", []):
            thread.join(10)
        if getattr(self, "local", None) is not None:
            self.local.close()

    def subscriptions(self) -> dict:
        return {"memory.*": self._on_change}

    def _on_change(self, event) -> None:
        self._saw(event.index)
        if self._debouncer is not None:
            self._debouncer.poke()

    # --- cluster access with read-your-writes -------------------------------------------------------------
    def _saw(self, index: int) -> None:
        with self._index_lock:
            self._seen_index = max(self._seen_index, int(index or 0))

    def _write(self, command_type: str, args: dict, idem: str = "") -> dict:
        try:
            result = self.ctx.cluster.write(command_type, args, idem)
        except CommandError as exc:
            raise ToolError(str(exc)) from None
        except Exception as exc:  # the agent's errors carry the reason (validation, unknown thread, no quorum)
            raise ToolError(str(exc)) from None
        if "error" in result:
            raise ToolError(result["error"])
        self._saw(result.get("index", 0))
        if self._debouncer is not None:
            self._debouncer.poke()
        return result

    def _read(self, query: str, args: dict | None = None) -> Any:
        try:
            return self.ctx.cluster.read(query, args or {}, level=self.ctx.options["read_level"],
                                         min_index=self._seen_index)
        except Exception as exc:
            raise ToolError(str(exc)) from None

    def _local_write(self, command_type: str, args: dict) -> dict:
        try:
            result = self.local.apply(command_type, args)
        except CommandError as exc:
            raise ToolError(str(exc)) from None
        if self._debouncer is not None:
            self._debouncer.poke()
        return result

    def _source(self, caller: Caller) -> str:
        return f"{self.ctx.cluster.node_id}/{caller.identity}"

    def _thread_store(self, thread_id: str) -> str:
        """'local' if the thread lives in this node's local store, 'cluster' if replicated; else a ToolError."""
        if self.local.query("memory.thread", {"thread_id": thread_id, "limit": 1}) is not None:
            return "local"
        if self._read("memory.thread", {"thread_id": thread_id, "limit": 1}) is not None:
            return "cluster"
        raise ToolError(f"no thread {thread_id!r}; list threads with memory_list_threads, or start one with "
                        f"memory_log_thought(new_thread=...)")

    def _apply(self, command_type: str, args: dict, tier: str | None, idem: str = "") -> dict:
        if tier == LOCAL_TIER:
            return {**self._local_write(command_type, args), "tier": LOCAL_TIER}
        if tier is not None:
            args = {**args, "tier": tier}
        return self._write(command_type, args, idem)

    # --- tools -------------------------------------------------------------------------------------------
    def tools(self) -> list[Tool]:
        return [
            Tool("memory_query", "Run one read-only SQL statement (SQLite) over the memory tables (memory_threads, "
                 "memory_thoughts, memory_context, memory_projects, memory_network, memory_fts). Writes, PRAGMA, "
                 "ATTACH and the like are refused by SQLite's authorizer. See memory_schema for columns.",
                 self.t_query, _schema({"sql": {"type": "string"}, "params": {"type": ["array", "object"]},
                                        "limit": {"type": "integer", "minimum": 1, "maximum": 5000},
                                        "store": {"type": "string", "enum": ["cluster", "local"]}}, ("sql",)),
                 output_schema=_OUT_MEMORY_QUERY),
            Tool("memory_write", "Typed writes: kind thread|thread_update|thought|handoff|context|context_delete|"
                 "project|network with their fields in `data`, or kind sql with one deterministic INSERT/UPDATE/"
                 "DELETE on the memory tables (random(), changes() etc. are refused; 'now' means the write's time).",
                 self.t_write, _schema({"kind": {"type": "string", "enum": list(_WRITE_KINDS) + ["sql"]},
                                        "data": {"type": "object"}, "sql": {"type": "string"},
                                        "params": {"type": ["array", "object"]},
                                        "store": {"type": "string", "enum": ["cluster", "local"]},
                                        "idempotency_key": _IDEM}, ("kind",)),
                 role="operator", read_only=False, destructive=True, idempotent=False,
                 output_schema=_OUT_MEMORY_WRITE, plan=self.plan_write),
            Tool("memory_schema", "Tables and columns of the memory store, for memory_query and memory_write.",
                 self.t_schema, output_schema=_OUT_MEMORY_SCHEMA),
            Tool("memory_stats", "Row counts per table and tier (cluster and this node's local store).",
                 self.t_stats, output_schema=_OUT_MEMORY_STATS),
            Tool("memory_log_thought", "Append a thought (idea, decision, discovery, blocker, progress, "
                 "tangent_start, handoff) to a thread; give thread_id, or new_thread to start one.",
                 self.t_log_thought,
                 _schema({"thread_id": {"type": "string"}, "new_thread": {"type": "string", "minLength": 1},
                          "project": {"type": "string"}, "type": {"type": "string", "enum": list(THOUGHT_TYPES)},
                          "content": {"type": "string", "minLength": 1}, "metadata": {"type": "object"},
                          "tier": _TIER, "idempotency_key": _IDEM}, ("content",)),
                 role="operator", read_only=False, idempotent=False, output_schema=_OUT_MEMORY_LOG_THOUGHT),
            Tool("memory_whereami", "Where things stand: active threads with their latest thoughts, handed-off "
                 "threads, pinned and recent context (the same text as whereami.md).", self.t_whereami,
                 output_schema=_OUT_MEMORY_WHEREAMI),
            Tool("memory_handoff", "Hand a thread off: record a summary and next steps and pause (or complete) it, "
                 "so the next session or machine can pick it up.", self.t_handoff,
                 _schema({"thread_id": {"type": "string"}, "summary": {"type": "string", "minLength": 1},
                          "next_steps": {"type": "array", "items": {"type": "string"}}, "to": {"type": "string"},
                          "status": {"type": "string", "enum": ["paused", "completed", "active"]},
                          "idempotency_key": _IDEM}, ("thread_id", "summary")),
                 role="operator", read_only=False, idempotent=False, output_schema=_OUT_MEMORY_HANDOFF),
            Tool("memory_set_context", "Set a context entry (a JSON value under a key): project, pr, machine, "
                 "waiting, fact or reminder; pinned entries head whereami. Warns when a value looks like a "
                 "credential.", self.t_set_context,
                 _schema({"key": {"type": "string", "minLength": 1}, "value": {}, "value_json": {"type": "string"},
                          "category": {"type": "string", "enum": list(CONTEXT_CATEGORIES)},
                          "label": {"type": "string"}, "pinned": {"type": "boolean"}, "tier": _TIER,
                          "idempotency_key": _IDEM}, ("key",)),
                 role="operator", read_only=False, output_schema=_OUT_MEMORY_SET_CONTEXT),
            Tool("memory_get_context", "Read context entries by key, key prefix, category or pinned.",
                 self.t_get_context,
                 _schema({"key": {"type": "string"}, "prefix": {"type": "string"},
                          "category": {"type": "string", "enum": list(CONTEXT_CATEGORIES)},
                          "pinned": {"type": "boolean"}, "limit": _LIMIT}),
                 output_schema=_OUT_MEMORY_GET_CONTEXT),
            Tool("memory_search", "Full-text search (SQLite FTS5, ranked by BM25) over threads, thoughts, context, "
                 "projects and network clients.", self.t_search,
                 _schema({"query": {"type": "string", "minLength": 1}, "limit": {"type": "integer", "minimum": 1,
                                                                                "maximum": 200},
                          "kinds": {"type": "array", "items": {"type": "string", "enum": [
                              "thread", "thought", "context", "project", "network"]}}}, ("query",)),
                 output_schema=_OUT_MEMORY_SEARCH),
            Tool("memory_network_lookup", "Find a network client (machine, device) by name, IP or MAC, or list them.",
                 self.t_network_lookup, _schema({"query": {"type": "string"}, "limit": _LIMIT}),
                 output_schema=_OUT_MEMORY_NETWORK_LOOKUP),
            Tool("memory_list_threads", "List threads, newest first, optionally by status and project.",
                 self.t_list_threads,
                 _schema({"status": {"type": "string", "enum": list(THREAD_STATUSES)}, "project": {"type": "string"},
                          "limit": _LIMIT}), output_schema=_OUT_MEMORY_LIST_THREADS),
        ]

    def t_query(self, args: dict, caller: Caller) -> dict:
        query = {"sql": args["sql"], "params": args.get("params"), "limit": args.get("limit", 200)}
        if args.get("store") == "local":
            try:
                return self.local.query("memory.sql", query)
            except (sqlguard.SQLRefused, ValueError) as exc:
                raise ToolError(str(exc)) from None
        return self._read("memory.sql", query)

    def t_write(self, args: dict, caller: Caller) -> dict:
        kind, idem = args["kind"], args.get("idempotency_key", "")
        if kind == "sql":
            if "sql" not in args:
                raise ToolError("kind sql needs `sql` (one INSERT, UPDATE or DELETE) and optionally `params`")
            sql_args = {"sql": args["sql"], "params": args.get("params"), "source": self._source(caller)}
            if args.get("store") == "local":
                return self._local_write("memory.sql", sql_args)
            return self._write("memory.sql", sql_args, idem)
        data = dict(args.get("data") or {})
        command_type = _WRITE_KINDS[kind]
        data["source"] = self._source(caller)
        if kind == "context" and "value" in data and not isinstance(data["value"], str):
            data["value"] = json.dumps(data["value"])
        if kind in ("thought", "handoff", "thread_update"):
            where = self._thread_store(str(data.get("thread_id", "")))
            if where == "local":
                return self._local_write(command_type, data)
            return self._write(command_type, data, idem)
        if kind == "context_delete":
            if self.local.query("memory.context", {"key": data.get("key") or "-"}):
                return self._local_write(command_type, data)
            return self._write(command_type, data, idem)
        tier = data.pop("tier", None)
        return self._apply(command_type, data, tier, idem)

    def plan_write(self, args: dict, caller: Caller) -> str:
        where = "this node's local store" if args.get("store") == "local" else "the cluster's memory store"
        if args["kind"] == "sql":
            return f"run this statement on {where}: {str(args.get('sql', ''))[:300]}"
        fields = ", ".join(sorted(args.get("data") or {}))
        return f"write a {args['kind']} record ({fields or 'no fields'}) to {where}"

    def t_schema(self, args: dict, caller: Caller) -> list[dict]:
        return self._read("memory.schema")

    def t_stats(self, args: dict, caller: Caller) -> dict:
        return {"cluster": self._read("memory.stats"), "local": self.local.query("memory.stats")}

    def t_log_thought(self, args: dict, caller: Caller) -> dict:
        source, idem = self._source(caller), args.get("idempotency_key", "")
        thread_id, started = args.get("thread_id"), None
        if thread_id and args.get("new_thread"):
            raise ToolError("give either thread_id (an existing thread) or new_thread (a title), not both")
        if not thread_id:
            if not args.get("new_thread"):
                raise ToolError("give thread_id, or new_thread with a title to start a thread")
            started = self._apply("memory.thread_start", {"title": args["new_thread"],
                                                          "project": args.get("project", ""), "source": source},
                                  args.get("tier"), idem + ":thread" if idem else "")
            thread_id = started["thread_id"]
        thought = {"thread_id": thread_id, "type": args.get("type", "progress"), "content": args["content"],
                   "metadata": args.get("metadata") or {}, "source": source}
        if self._thread_store(thread_id) == "local":
            result = self._local_write("memory.thought", thought)
        else:
            result = self._write("memory.thought", thought, idem)
        return {**result, "started_thread": bool(started)}

    def t_whereami(self, args: dict, caller: Caller) -> dict:
        text, shared = self._render()
        return {"markdown": text, "path": str(self.whereami_path), "change_index": shared["change_index"]}

    def t_handoff(self, args: dict, caller: Caller) -> dict:
        data = {"thread_id": args["thread_id"], "summary": args["summary"],
                "next_steps": args.get("next_steps", []), "to": args.get("to", ""),
                "status": args.get("status", "paused"), "source": self._source(caller)}
        if self._thread_store(args["thread_id"]) == "local":
            result = self._local_write("memory.handoff", data)
        else:
            result = self._write("memory.handoff", data, args.get("idempotency_key", ""))
        self.regenerate_whereami()  # the next session reads the file: do not leave it to the debounce
        return {**result, "whereami": str(self.whereami_path)}

    def t_set_context(self, args: dict, caller: Caller) -> dict:
        if ("value" in args) == ("value_json" in args):
            raise ToolError("give exactly one of value (any JSON value) or value_json (JSON text)")
        if "value_json" in args:
            try:
                value = json.loads(args["value_json"])
            except ValueError as exc:
                raise ToolError(f"value_json is not valid JSON ({exc}); nothing was stored") from None
        else:
            value = args["value"]
        data = {"key": args["key"], "value": json.dumps(value), "category": args.get("category", "fact"),
                "label": args.get("label", ""), "pinned": args.get("pinned", False), "source": self._source(caller)}
        result = self._apply("memory.context_set", data, args.get("tier"), args.get("idempotency_key", ""))
        return {**result, "warnings": credential_warnings(args["key"], value)}

    def t_get_context(self, args: dict, caller: Caller) -> list[dict]:
        query = {k: args[k] for k in ("key", "prefix", "category", "pinned", "limit") if k in args}
        local = self.local.query("memory.context", query)
        shadowed = {e["key"] for e in local}
        shared = [e for e in self._read("memory.context", query) if e["key"] not in shadowed]
        return sorted(local + shared, key=lambda e: (not e["pinned"], -e["updated_at"], e["key"]))

    def t_search(self, args: dict, caller: Caller) -> list[dict]:
        query = {"query": args["query"], "limit": args.get("limit", 20), "kinds": args.get("kinds")}
        try:
            hits = self._read("memory.search", query) + self.local.query("memory.search", query)
        except ValueError as exc:
            raise ToolError(str(exc)) from None
        return sorted(hits, key=lambda h: (-h["score"], h["ref"]))[: query["limit"]]

    def t_network_lookup(self, args: dict, caller: Caller) -> list[dict]:
        query = {"query": args.get("query", ""), "limit": args.get("limit", 50)}
        return self.local.query("memory.network", query) + self._read("memory.network", query)

    def t_list_threads(self, args: dict, caller: Caller) -> list[dict]:
        query = {k: args[k] for k in ("status", "project", "limit") if k in args}
        threads = self.local.query("memory.threads", query) + self._read("memory.threads", query)
        return sorted(threads, key=lambda t: (-t["updated_at"], t["id"]))[: query.get("limit", 50)]

    # --- whereami.md ---------------------------------------------------------------------------------------
    def _render(self) -> tuple[str, dict]:
        shared = self._read("memory.whereami")
        local = self.local.query("memory.whereami")
        return whereami.render(shared, local, self.ctx.cluster.node_id), shared

    def regenerate_whereami(self) -> bool:
        text, shared = self._render()
        self._last_version = max(self._last_version, shared["change_index"])
        return whereami.write_if_changed(self.whereami_path, text)

    def _poll_loop(self) -> None:
        """Notice changes made elsewhere where no replicated events arrive (workers), and after restarts."""
        while not self._stop.wait(self.ctx.options["whereami_poll"]):
            try:
                version = self.ctx.cluster.read("memory.version", {}, level="stale")["change_index"]
            except Exception:
                continue  # no quorum or no server reachable right now: try at the next tick
            if version != self._last_version and self._debouncer is not None:
                self._debouncer.poke()

    # --- backups -------------------------------------------------------------------------------------------
    def _backup_loop(self) -> None:
        from cortex.memory import backup

        options = self.backup_options
        if not options["enabled"]:
            return
        while not self._stop.wait(options["interval"]):
            if not self.ctx.cluster.is_leader():
                continue
            try:
                target = backup.target_from_options(options, self.ctx.data_dir)
                made = backup.make_backup(self.ctx.cluster, target, public_only=options["public_only"],
                                          keep=options["keep"])
                if made is not None:
                    self.ctx.log.info("memory backup written: %s", made["name"])
            except Exception as exc:  # a full disk or an unreachable bucket must not stop the next attempt
                self.ctx.log.warning("memory backup failed: %s", exc)


_WRITE_KINDS = {
    "thread": "memory.thread_start", "thread_update": "memory.thread_update", "thought": "memory.thought",
    "handoff": "memory.handoff", "context": "memory.context_set", "context_delete": "memory.context_delete",
    "project": "memory.project_set", "network": "memory.network_set",
}

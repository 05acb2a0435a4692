"""Command validators of the memory domain (args -> normalized args). They run before a command is
proposed, so every replica applies only arguments that passed here; `local` selects the node-local store's
tier."""

from __future__ import annotations

import json

from cortex.core.args import no_extra
from cortex.core.commands import CommandError
from cortex.memory import sqlguard
from cortex.memory.content import MAX_CHUNK_BYTES, parse_chunk
from cortex.memory.schema import (
    CONTEXT_CATEGORIES,
    LOCAL_TIER,
    MAX_METADATA_BYTES,
    MAX_NAME_BYTES,
    MAX_TEXT_BYTES,
    SHARED_MIGRATIONS,
    SHARED_TIERS,
    THOUGHT_TYPES,
    THREAD_STATUSES,
)

# --- argument checks the validators share -------------------------------------------------------------------

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

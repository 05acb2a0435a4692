"""Checks of the task domain's command arguments: pure functions from what a client sent to what is applied.

Each returns the arguments in canonical form or raises CommandError with what to fix; they run before a
command enters the Raft log, so every replica applies only well-formed commands.
"""

from __future__ import annotations

from cortex.core.commands import CommandError
from cortex.tasks import spec as specs
from cortex.tasks.lifecycle import MAX_CHUNK, to_json


def _require_list(args: dict, name: str, limit: int) -> list:
    value = args.get(name)
    if not isinstance(value, list) or not value:
        raise CommandError(f"{name} must be a non-empty list")
    if len(value) > limit:
        raise CommandError(f"at most {limit} {name} per command")
    return value


def _str(doc: dict, name: str, limit: int = 200, optional: bool = False) -> str:
    value = doc.get(name)
    if value is None and optional:
        return ""
    if not isinstance(value, str) or (not value and not optional) or len(value) > limit:
        raise CommandError(f"{name} must be a string of 1..{limit} characters")
    return value


def _int(doc: dict, name: str, lo: int = 0) -> int:
    value = doc.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise CommandError(f"{name} must be an integer >= {lo}")
    return value


def _node(doc: dict) -> str:
    value = _str(doc, "node_id", 63)
    if not specs.NODE_ID_RE.match(value):
        raise CommandError(f"node_id {value!r} is not a valid node id")
    return value


_no_extra = specs.only_fields


def submit(args: dict) -> dict:
    _no_extra(args, {"tasks", "group"}, "task.submit")
    tasks = _require_list(args, "tasks", specs.MAX_TASKS_PER_SUBMIT)
    out = {"tasks": [specs.validate_task(t) for t in tasks]}
    group = args.get("group")
    if group is not None:
        out["group"] = _str(args, "group", 64)
    return out


def assign(args: dict) -> dict:
    items = _require_list(args, "assignments", 5000)
    return {"assignments": [{"task_id": _str(a, "task_id"), "node_id": _node(a), "attempt": _int(a, "attempt", 1)}
                            for a in items if isinstance(a, dict)]}


def _attempt_ref(doc: dict) -> dict:
    if not isinstance(doc, dict):
        raise CommandError("each item must be an object")
    return {"task_id": _str(doc, "task_id"), "attempt": _int(doc, "attempt", 1), "term": _int(doc, "term", 0)}


def start(args: dict) -> dict:
    _no_extra(args, {"node_id", "starts"}, "task.start")
    return {"node_id": _node(args), "starts": [_attempt_ref(s) for s in _require_list(args, "starts", 5000)]}


def report(args: dict) -> dict:
    """Reports of ended attempts, and optionally starts of new ones (applied first): a node sends both in one
    command per round, so a busy node costs the log one entry per round, not two."""
    _no_extra(args, {"node_id", "reports", "starts"}, "task.report")
    if "starts" in args and args.get("reports") in (None, []):
        items = []  # starts only
    else:
        items = _require_list(args, "reports", 5000)
    reports = []
    for r in items:
        ref = _attempt_ref(r)
        exit_code = r.get("exit_code")
        if exit_code is not None and (isinstance(exit_code, bool) or not isinstance(exit_code, int)):
            raise CommandError("exit_code must be an integer or null")
        result = r.get("result", {})
        if not isinstance(result, dict) or len(to_json(result)) > 128 * 1024:
            raise CommandError("result must be an object of at most 128 KiB")
        failure = r.get("failure", "")
        if failure not in ("", "exit", "timeout", "error", "cancelled", "lost"):
            raise CommandError("failure must be one of exit, timeout, error, cancelled, lost")
        reports.append({**ref, "exit_code": exit_code, "error": _str(r, "error", 4000, optional=True),
                        "retryable": bool(r.get("retryable", True)), "failure": failure, "result": result,
                        })
    out = {"node_id": _node(args), "reports": reports}
    if "starts" in args:
        out["starts"] = [_attempt_ref(s) for s in _require_list(args, "starts", 5000)]
    return out


def output(args: dict) -> dict:
    _no_extra(args, {"node_id", "chunks"}, "task.output")
    chunks = []
    for c in _require_list(args, "chunks", 1000):
        ref = _attempt_ref(c)
        if c.get("stream") not in ("stdout", "stderr"):
            raise CommandError("stream must be stdout or stderr")
        data = c.get("data")
        if not isinstance(data, str) or len(data) > MAX_CHUNK:
            raise CommandError(f"data must be a string of at most {MAX_CHUNK} characters")
        chunks.append({**ref, "stream": c["stream"], "data": data, "dropped": _int(c, "dropped") if "dropped" in c else 0})
    return {"node_id": _node(args), "chunks": chunks}


def ids(args: dict, where: str) -> dict:
    _no_extra(args, {"task_ids"}, where)
    ids = _require_list(args, "task_ids", 5000)
    if not all(isinstance(i, str) and 0 < len(i) <= 200 for i in ids):
        raise CommandError("task_ids must be task id strings")
    return {"task_ids": ids}


def requeue(args: dict) -> dict:
    items = _require_list(args, "requeues", 5000)
    return {"requeues": [{**_attempt_ref({**r, "term": r.get("term", 0)}), "reason": _str(r, "reason", 500)}
                         for r in items if isinstance(r, dict)]}


def node_report(args: dict) -> dict:
    _no_extra(args, {"node_id", "capacity", "usage", "labels", "kinds", "busy", "benchmark"}, "task.node_report")
    out = {"node_id": _node(args)}
    for name in ("capacity", "usage", "labels", "benchmark"):
        value = args.get(name, {})
        if not isinstance(value, dict) or len(to_json(value)) > 16 * 1024:
            raise CommandError(f"{name} must be an object of at most 16 KiB")
        out[name] = value
    kinds = args.get("kinds", [])
    if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
        raise CommandError("kinds must be a list of task kinds")
    out["kinds"] = sorted(set(kinds))
    out["busy"] = bool(args.get("busy", False))
    return out


def drain(args: dict) -> dict:
    _no_extra(args, {"node_id", "deadline"}, "task.drain")
    deadline = args.get("deadline", 300)
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not 0 <= deadline <= 30 * 86400:
        raise CommandError("deadline must be seconds between 0 and 30 days (e.g. 300 for 5m)")
    return {"node_id": _node(args), "deadline": float(deadline)}


def undrain(args: dict) -> dict:
    _no_extra(args, {"node_id"}, "task.undrain")
    return {"node_id": _node(args)}

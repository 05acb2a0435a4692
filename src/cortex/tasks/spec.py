"""What a task submission may say: checked before anything is proposed, normalized so replicas store the same.

A submission is `{kind, spec, name?, priority?, placement?, retry?, timeout?}`. `spec` belongs to the executor
of `kind` (its `validate` normalizes it); the rest belongs to the engine and is checked here. Everything is
pure: no clocks, no I/O, so the leader and the node that received the write reach the same verdict.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from cortex.core.args import NODE_ID_RE, CommandError
from cortex.tasks.executor import TaskSpecError

MAX_TASKS_PER_SUBMIT = 1000
MAX_PRIORITY = 1000
MAX_TIMEOUT = 7 * 86400.0
RETRY_ON = ("exit", "timeout", "error")  # nonzero exit code, time limit hit, executor error
STRATEGIES = ("spread", "pack")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 1  # failed attempts before the task goes to the dead-letter queue
    backoff: float = 1.0  # seconds before the 2nd attempt; doubles each time
    backoff_max: float = 300.0
    jitter: float = 0.2  # up to this fraction is taken off each delay (spreads a thundering herd)
    on: tuple[str, ...] = RETRY_ON  # which failures are retried at all

    def delay(self, task_id: str, failures: int) -> float:
        """Seconds to wait after the `failures`-th failure. Deterministic: the jitter comes from a hash of
        the task and attempt, so every replica computes the same `not_before`."""
        base = min(self.backoff_max, self.backoff * (2 ** max(0, failures - 1)))
        digest = hashlib.sha256(f"{task_id}:{failures}".encode()).digest()
        unit = int.from_bytes(digest[:4], "big") / 2**32
        return round(base * (1.0 - self.jitter * unit), 6)


@dataclass(frozen=True)
class Placement:
    role: str = ""  # "server" | "worker" | "" (any)
    labels: dict = field(default_factory=dict)  # every label must match the node's
    nodes: tuple[str, ...] = ()  # only these nodes (empty: any)
    avoid_busy: bool = True  # skip nodes whose owner is using them (gaming, high GPU load)
    cpus: float = 0.0  # reserved on the node while the task runs
    memory_mb: int = 0
    gpus: int = 0
    strategy: str = "spread"  # spread: least loaded node first; pack: fill busy nodes first


def _err(message: str) -> CommandError:
    return CommandError(message)


def _number(value, name: str, lo: float, hi: float, integer: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise _err(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not lo <= value <= hi:
        raise _err(f"{name} must be between {lo:g} and {hi:g}, got {value!r}")
    return value


def only_fields(doc: dict, allowed: set[str], where: str) -> None:
    extra = set(doc) - allowed
    if extra:
        raise _err(f"{where}: unknown field(s) {', '.join(sorted(extra))}; allowed: {', '.join(sorted(allowed))}")


def parse_retry(doc) -> RetryPolicy:
    if doc is None:
        return RetryPolicy()
    if not isinstance(doc, dict):
        raise _err("retry must be an object like {\"max_attempts\": 3, \"backoff\": 2}")
    only_fields(doc, {"max_attempts", "backoff", "backoff_max", "jitter", "on"}, "retry")
    on = doc.get("on", list(RETRY_ON))
    if not isinstance(on, list) or any(x not in RETRY_ON for x in on):
        raise _err(f"retry.on must be a list of {', '.join(RETRY_ON)}")
    return RetryPolicy(
        max_attempts=int(_number(doc.get("max_attempts", 1), "retry.max_attempts", 1, 100, integer=True)),
        backoff=float(_number(doc.get("backoff", 1.0), "retry.backoff", 0, 86400)),
        backoff_max=float(_number(doc.get("backoff_max", 300.0), "retry.backoff_max", 0, 86400)),
        jitter=float(_number(doc.get("jitter", 0.2), "retry.jitter", 0, 1)),
        on=tuple(sorted(set(on), key=RETRY_ON.index)),
    )


def parse_placement(doc) -> Placement:
    if doc is None:
        return Placement()
    if not isinstance(doc, dict):
        raise _err("placement must be an object")
    only_fields(doc, {"role", "labels", "nodes", "avoid_busy", "cpus", "memory_mb", "gpus", "strategy"}, "placement")
    role = doc.get("role", "")
    if role not in ("", "server", "worker"):
        raise _err("placement.role must be server, worker or empty (any)")
    labels = doc.get("labels", {})
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and _LABEL_RE.match(k) and isinstance(v, str) and len(v) <= 128
            for k, v in labels.items()):
        raise _err("placement.labels must map label names to strings, e.g. {\"gpu\": \"rtx4090\"}")
    nodes = doc.get("nodes", [])
    if not isinstance(nodes, list) or not all(isinstance(n, str) and NODE_ID_RE.match(n) for n in nodes):
        raise _err("placement.nodes must be a list of node ids")
    if not isinstance(doc.get("avoid_busy", True), bool):
        raise _err("placement.avoid_busy must be true or false")
    strategy = doc.get("strategy", "spread")
    if strategy not in STRATEGIES:
        raise _err(f"placement.strategy must be one of {', '.join(STRATEGIES)}")
    return Placement(
        role=role, labels=dict(sorted(labels.items())), nodes=tuple(sorted(set(nodes))),
        avoid_busy=doc.get("avoid_busy", True),
        cpus=float(_number(doc.get("cpus", 0), "placement.cpus", 0, 1024)),
        memory_mb=int(_number(doc.get("memory_mb", 0), "placement.memory_mb", 0, 16 * 1024 * 1024, integer=True)),
        gpus=int(_number(doc.get("gpus", 0), "placement.gpus", 0, 64, integer=True)),
        strategy=strategy,
    )


def validate_task(doc) -> dict:
    """One submission, normalized: {kind, name, spec, priority, placement, retry, timeout}."""
    from cortex.tasks.executors import validator_for

    if not isinstance(doc, dict):
        raise _err("a task must be a JSON object like {\"kind\": \"shell\", \"spec\": {\"command\": \"echo hi\"}}")
    only_fields(doc, {"kind", "name", "spec", "priority", "placement", "retry", "timeout"}, "task")
    kind = doc.get("kind")
    if not isinstance(kind, str):
        raise _err("task.kind is required (shell, container, agent, k8s_job, noop)")
    validate_spec = validator_for(kind)
    name = doc.get("name", "")
    if not isinstance(name, str) or (name and not _NAME_RE.match(name)):
        raise _err("task.name must be 1-128 characters of letters, digits and ._:/-")
    spec = doc.get("spec", {})
    if not isinstance(spec, dict):
        raise _err("task.spec must be an object")
    try:
        spec = validate_spec(spec)
    except TaskSpecError as exc:
        raise _err(f"{kind} spec: {exc}") from None
    timeout = doc.get("timeout")
    if timeout is not None:
        timeout = float(_number(timeout, "task.timeout", 0.01, MAX_TIMEOUT))
    return {
        "kind": kind, "name": name, "spec": spec,
        "priority": int(_number(doc.get("priority", 0), "task.priority", -MAX_PRIORITY, MAX_PRIORITY, integer=True)),
        # most tasks say neither: the defaults' documents are built once (copied, never shared)
        "placement": placement_doc(parse_placement(doc["placement"])) if doc.get("placement") is not None
        else {**_DEFAULT_PLACEMENT, "labels": {}, "nodes": []},
        "retry": retry_doc(parse_retry(doc["retry"])) if doc.get("retry") is not None
        else {**_DEFAULT_RETRY, "on": list(RETRY_ON)},
        "timeout": timeout,
    }


def placement_doc(p: Placement) -> dict:
    # spelled out rather than dataclasses.asdict (a deep copy per field): this runs for every submitted task
    return {"role": p.role, "labels": dict(p.labels), "nodes": list(p.nodes), "avoid_busy": p.avoid_busy,
            "cpus": p.cpus, "memory_mb": p.memory_mb, "gpus": p.gpus, "strategy": p.strategy}


def retry_doc(r: RetryPolicy) -> dict:
    return {"max_attempts": r.max_attempts, "backoff": r.backoff, "backoff_max": r.backoff_max,
            "jitter": r.jitter, "on": list(r.on)}


def retry_from_doc(d: dict) -> RetryPolicy:
    return RetryPolicy(**{**d, "on": tuple(d.get("on", RETRY_ON))})


def placement_from_doc(d: dict) -> Placement:
    return Placement(**{**d, "nodes": tuple(d.get("nodes", ()))})


_DEFAULT_PLACEMENT = placement_doc(Placement())
_DEFAULT_RETRY = retry_doc(RetryPolicy())

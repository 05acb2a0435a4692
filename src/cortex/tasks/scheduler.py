"""The scheduler: a pure function from (queued tasks, node views, now) to assignments.

Filter, then rank, one task at a time in priority order (higher first, then submission order):

- filter: the node is alive, not draining, offers the task's kind, has the role, every label, is among the
  task's target nodes (when given), is not busy (when the task avoids busy nodes), and has the free CPUs,
  memory, GPUs and task slots the task asks for — free meaning capacity minus what tasks already assigned
  there reserve (replicated state, so the leader never needs a fresh resource report to decide);
- rank: "spread" prefers the node with the most free share of its resources and the fewest running tasks,
  "pack" the opposite (fill a node before waking another); measured FLOPS break ties towards faster nodes;
- a retry (attempt > 0) avoids `last_node`, the node its previous attempt ran on (a broken disk, a missing
  tool, a flaky GPU there would fail it again), unless no other node can take it now.

Each placement reserves resources in the working copy, so one pass never overcommits a node. Tasks nobody can
take stay queued, with the reason (`explain`) for `cortex tasks show`.

Plugins may decide where tasks of some kinds fit (cortex.plugins.api.Placement): for such a kind the rule's
refusal is checked after the slot, and a kind whose work runs elsewhere (a `k8s_job`'s pod runs in a
Kubernetes cluster) is placed without checking or reserving the node's CPUs, memory and GPUs: only a task
slot. `round_rules` asks the plugins once per round; everything else here is pure.

A placement for every kind (`kinds = {"*"}`, the sentinel's node health) adds to the kind's own rule: a node
it refuses is taken only when no other node fits (a last resort, like a retry's previous node), and its
optional `rank` lowers a node's score (a degraded node ranks below every healthy one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cortex.plugins.api import Placement, StateRead

DEFAULT_SLOTS = 32  # concurrent tasks per node when its report does not say


@dataclass(frozen=True)
class Assignment:
    task_id: str
    node_id: str
    attempt: int


@dataclass(frozen=True)
class KindRule:
    """A plugin's placement for one task kind, ready for one round."""

    refusal: Callable[[dict, str], str]  # (task, node id) -> '' when that node may take the task now, else why not
    uses_node_resources: bool = True
    rank: Callable[[str], float] | None = None  # node id -> a penalty subtracted from its score ("*" rules)


ANY_KIND = "*"


def round_rules(placements: Iterable[Placement], kinds: Iterable[str], read: StateRead) -> dict[str, KindRule]:
    """The rules for the task kinds waiting this round: each placement prepares (reads its records) only when
    one of its kinds waits; the first placement to claim a kind decides it."""
    wanted, rules = set(kinds), {}
    for placement in placements:
        if ANY_KIND in placement.kinds:
            if wanted and ANY_KIND not in rules:
                rank = getattr(placement, "rank", None)
                rules[ANY_KIND] = KindRule(placement.prepare(read), True, rank(read) if rank else None)
            continue
        claimed = (placement.kinds & wanted) - rules.keys()
        if claimed:
            rule = KindRule(placement.prepare(read), placement.uses_node_resources)
            rules.update(dict.fromkeys(claimed, rule))
    return rules


@dataclass
class _Node:
    id: str
    role: str
    kinds: frozenset
    labels: dict
    busy: bool
    cpus: float
    memory_mb: int
    gpus: int
    slots: int
    flops: float
    free_cpus: float
    free_mem: int
    free_gpus: int
    free_slots: int


def _prepare(nodes: list[dict]) -> tuple[list[_Node], float]:
    out = []
    for n in nodes:
        if n.get("liveness") != "alive" or n.get("drained") or not n.get("reported_at"):
            continue
        cap, run = n.get("capacity", {}), n.get("running", {})
        cpus, mem, gpus = float(cap.get("cpus", 1)), int(cap.get("memory_mb", 0)), int(cap.get("gpus", 0))
        slots = int(cap.get("slots", DEFAULT_SLOTS))
        out.append(_Node(
            id=n["id"], role=n.get("role", ""), kinds=frozenset(n.get("kinds", ())), labels=n.get("labels", {}),
            busy=bool(n.get("busy")), cpus=cpus, memory_mb=mem, gpus=gpus, slots=slots,
            flops=float(n.get("benchmark", {}).get("flops_multi", 0.0)),
            free_cpus=cpus - float(run.get("cpus", 0)), free_mem=mem - int(run.get("memory_mb", 0)),
            free_gpus=gpus - int(run.get("gpus", 0)), free_slots=slots - int(run.get("tasks", 0))))
    top = max((n.flops for n in out), default=0.0) or 1.0
    return out, top


def _static_ok(task: dict, n: _Node) -> bool:
    """The checks that do not change while a pass places tasks."""
    reason = _fits(task, n, static_only=True)
    return not reason or reason.startswith(("no free task slot", "needs "))


def _fits(task: dict, n: _Node, rules: Mapping[str, KindRule] = {}, static_only: bool = False) -> str:
    """'' when the node can take the task now, else why not (static_only: skip what a pass's placements change
    and the kind's plugin rule, which `schedule` checks per task)."""
    p = task["placement"]
    if task["kind"] not in n.kinds:
        return f"does not run {task['kind']} tasks"
    if p.get("nodes") and n.id not in p["nodes"]:
        return "not a target node"
    if p.get("role") and n.role != p["role"]:
        return f"not a {p['role']}"
    for key, value in p.get("labels", {}).items():
        if n.labels.get(key) != value:
            return f"label {key}!={value}"
    if p.get("avoid_busy", True) and n.busy:
        return "busy (its owner is using it)"
    if n.free_slots < 1:
        return "no free task slot"
    every = rules.get(ANY_KIND)
    if every is not None and not static_only:
        refusal = every.refusal(task, n.id)
        if refusal:
            return refusal
    rule = rules.get(task["kind"])
    if rule is not None:
        if static_only:
            return ""
        refusal = rule.refusal(task, n.id)
        if refusal or not rule.uses_node_resources:
            return refusal
    if p.get("cpus", 0) > n.free_cpus + 1e-9:
        return f"needs {p['cpus']:g} CPUs, {max(n.free_cpus, 0):g} free"
    if p.get("memory_mb", 0) > n.free_mem:
        return f"needs {p['memory_mb']} MB, {max(n.free_mem, 0)} free"
    if p.get("gpus", 0) > n.free_gpus:
        return f"needs {p['gpus']} GPUs, {max(n.free_gpus, 0)} free"
    return ""


def _score(n: _Node, top_flops: float, strategy: str) -> float:
    shares = [n.free_slots / max(n.slots, 1), n.free_cpus / max(n.cpus, 1e-9)]
    if n.memory_mb:
        shares.append(n.free_mem / n.memory_mb)
    if n.gpus:
        shares.append(n.free_gpus / n.gpus)
    free = sum(shares) / len(shares)
    speed = n.flops / top_flops
    return (free if strategy == "spread" else 1.0 - free) + 0.1 * speed


def schedule(queued: list[dict], nodes: list[dict], limit: int = 5000,
             rules: Mapping[str, KindRule] = {}) -> list[Assignment]:
    """Assignments for as many ready tasks as fit. `queued` is in priority order already (state query);
    `rules` are the plugins' placements for the kinds queued this round (round_rules)."""
    views, top = _prepare(nodes)
    out: list[Assignment] = []
    if not views:
        return out
    # A node's score changes only when it takes a task: keep both strategies' scores and refresh that node's.
    scores = {n.id: (_score(n, top, "spread"), _score(n, top, "pack")) for n in views}
    capacity_left = sum(max(n.free_slots, 0) for n in views)
    # The static part of the filter (kind, targets, role, labels, busy) depends only on the placement: computed
    # once per distinct placement, so a queue of similar tasks costs one pass over the nodes, not one per task.
    static: dict[tuple, list[_Node]] = {}
    for task in queued:
        if len(out) >= limit or capacity_left <= 0:
            break
        p = task["placement"]
        which = 0 if p.get("strategy", "spread") == "spread" else 1
        key = (task["kind"], tuple(p.get("nodes") or ()), p.get("role", ""),
               tuple(sorted(p.get("labels", {}).items())), p.get("avoid_busy", True))
        candidates = static.get(key)
        if candidates is None:
            candidates = static[key] = [n for n in views if _static_ok(task, n)]
        rule = rules.get(task["kind"])
        every = rules.get(ANY_KIND)
        elsewhere = rule is not None and not rule.uses_node_resources
        cpus, mem, gpus = (0, 0, 0) if elsewhere else (p.get("cpus", 0), p.get("memory_mb", 0), p.get("gpus", 0))
        best, best_score = None, 0.0
        avoid = task.get("last_node") if task["attempt"] > 0 else None
        fallback = None  # the node the previous attempt ran on: taken only when no other node fits
        last_resort = None  # a node the "*" rule refuses (critical health): taken only when nothing else fits
        for n in candidates:
            if n.free_slots < 1 or cpus > n.free_cpus + 1e-9 or mem > n.free_mem or gpus > n.free_gpus:
                continue
            if rule is not None and rule.refusal(task, n.id):
                continue
            if n.id == avoid:
                fallback = n
                continue
            if every is not None and every.refusal(task, n.id):
                last_resort = last_resort or n
                continue
            score = scores[n.id][which] - (every.rank(n.id) if every is not None and every.rank else 0.0)
            if best is None or score > best_score or (score == best_score and n.id < best.id):
                best, best_score = n, score
        best = best or fallback or last_resort
        if best is None:
            continue
        best.free_slots -= 1
        best.free_cpus -= cpus
        best.free_mem -= mem
        best.free_gpus -= gpus
        scores[best.id] = (_score(best, top, "spread"), _score(best, top, "pack"))
        capacity_left -= 1
        out.append(Assignment(task["id"], best.id, task["attempt"] + 1))
    return out


def explain(task: dict, nodes: list[dict], rules: Mapping[str, KindRule] = {}) -> dict[str, str]:
    """Why each node cannot take this task right now (for `cortex tasks show` of a queued task)."""
    views, _ = _prepare(nodes)
    ready = {n.id for n in views}
    reasons = {}
    for n in nodes:
        if n["id"] not in ready:
            reasons[n["id"]] = ("draining" if n.get("drained") else
                                "no resource report yet" if not n.get("reported_at") else n.get("liveness", "?"))
    for n in views:
        reasons[n.id] = _fits(task, n, rules) or "fits"
    return reasons

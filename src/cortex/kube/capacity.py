"""Capacity of a Kubernetes context and where a task fits: pure functions of nodes, pods and records.

`summarize` turns the API's node and pod lists (plain JSON dicts) into allocatable vs requested per
context, the way `kubectl describe node` adds up requests: pods that finished (Succeeded/Failed) hold
nothing, every other scheduled pod holds the sum of its containers' requests (or its largest init
container's, whichever is more). `placements` is what a scheduler asks: which (node, context) pairs have
room for a task's CPU and memory, most free first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction

_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?)$")
_SUFFIX = {"": Fraction(1), "n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000),
           "k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9), "T": Fraction(10**12),
           "P": Fraction(10**15), "E": Fraction(10**18), "Ki": Fraction(2**10), "Mi": Fraction(2**20),
           "Gi": Fraction(2**30), "Ti": Fraction(2**40), "Pi": Fraction(2**50), "Ei": Fraction(2**60)}


def parse_quantity(value: str | int | float) -> Fraction:
    """A Kubernetes resource quantity ("500m", "1.5Gi", "2", "1e3") as an exact number; ValueError if bad."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a quantity")
    if isinstance(value, int | float):
        return Fraction(str(value))
    match = _QUANTITY.match(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (examples: 500m, 2, 512Mi, 1Gi)")
    number, exponent, suffix = match.groups()
    scale = Fraction(10) ** int(exponent[1:]) if exponent else _SUFFIX[suffix or ""]
    return Fraction(number) * scale


def millicores(value: str | int | float) -> int:
    return int(parse_quantity(value) * 1000)


def bytes_of(value: str | int | float) -> int:
    return int(parse_quantity(value))


@dataclass(frozen=True)
class NodeCapacity:
    name: str
    ready: bool
    schedulable: bool
    cpu_allocatable_m: int
    memory_allocatable: int
    pods_allocatable: int
    cpu_requested_m: int = 0
    memory_requested: int = 0
    pods: int = 0

    @property
    def usable(self) -> bool:
        return self.ready and self.schedulable


@dataclass(frozen=True)
class ContextCapacity:
    context: str
    nodes: tuple[NodeCapacity, ...] = ()
    pods_per_namespace: dict[str, int] = field(default_factory=dict)
    error: str = ""  # why it could not be measured ("cannot reach ..."); counts are then empty

    @property
    def cpu_free_m(self) -> int:
        return sum(max(0, n.cpu_allocatable_m - n.cpu_requested_m) for n in self.nodes if n.usable)

    @property
    def memory_free(self) -> int:
        return sum(max(0, n.memory_allocatable - n.memory_requested) for n in self.nodes if n.usable)

    def node_free(self, limit: int = 32) -> list[list[int]]:
        """[[cpu m, memory]] free per usable node, roomiest first: one pod never spans nodes."""
        free = [[max(0, n.cpu_allocatable_m - n.cpu_requested_m), max(0, n.memory_allocatable - n.memory_requested)]
                for n in self.nodes if n.usable]
        return sorted(free, reverse=True)[:limit]

    def summary(self) -> dict:
        """The small, secret-free form that is published and scheduled on."""
        return {"context": self.context, "error": self.error,
                "nodes": len(self.nodes), "ready_nodes": sum(1 for n in self.nodes if n.usable),
                "cpu_allocatable_m": sum(n.cpu_allocatable_m for n in self.nodes if n.usable),
                "cpu_requested_m": sum(n.cpu_requested_m for n in self.nodes if n.usable),
                "memory_allocatable": sum(n.memory_allocatable for n in self.nodes if n.usable),
                "memory_requested": sum(n.memory_requested for n in self.nodes if n.usable),
                "cpu_free_m": self.cpu_free_m, "memory_free": self.memory_free,
                "node_free": self.node_free(),
                "pods": sum(self.pods_per_namespace.values())}

    def detail(self) -> dict:
        return {**self.summary(), "node_list": [asdict(n) for n in self.nodes],
                "pods_per_namespace": dict(sorted(self.pods_per_namespace.items()))}


def pod_requests(pod: dict) -> tuple[int, int]:
    """(cpu m, memory bytes) a pod holds on its node: max(sum of containers, largest init container)."""
    spec = pod.get("spec") or {}

    def req(container: dict) -> tuple[int, int]:
        requests = ((container.get("resources") or {}).get("requests")) or {}
        return millicores(requests.get("cpu", 0)), bytes_of(requests.get("memory", 0))

    main = [req(c) for c in spec.get("containers") or []]
    init = [req(c) for c in spec.get("initContainers") or []]
    cpu = max(sum(c for c, _ in main), max((c for c, _ in init), default=0))
    mem = max(sum(m for _, m in main), max((m for _, m in init), default=0))
    return cpu, mem


def summarize(context: str, nodes: Iterable[dict], pods: Iterable[dict]) -> ContextCapacity:
    """Allocatable vs requested per node, and pods per namespace, from the API's node and pod lists."""
    held: dict[str, list[int]] = {}
    per_ns: dict[str, int] = {}
    for pod in pods:
        phase = (pod.get("status") or {}).get("phase", "")
        if phase in ("Succeeded", "Failed"):
            continue
        ns = (pod.get("metadata") or {}).get("namespace", "")
        per_ns[ns] = per_ns.get(ns, 0) + 1
        node = (pod.get("spec") or {}).get("nodeName")
        if node:
            cpu, mem = pod_requests(pod)
            slot = held.setdefault(node, [0, 0, 0])
            slot[0] += cpu
            slot[1] += mem
            slot[2] += 1
    out = []
    for node in nodes:
        name = node["metadata"]["name"]
        status = node.get("status") or {}
        alloc = status.get("allocatable") or status.get("capacity") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        cpu, mem, count = held.get(name, [0, 0, 0])
        out.append(NodeCapacity(name=name, ready=ready, schedulable=not (node.get("spec") or {}).get("unschedulable"),
                                cpu_allocatable_m=millicores(alloc.get("cpu", 0)),
                                memory_allocatable=bytes_of(alloc.get("memory", 0)),
                                pods_allocatable=int(parse_quantity(alloc.get("pods", 0))),
                                cpu_requested_m=cpu, memory_requested=mem, pods=count))
    return ContextCapacity(context=context, nodes=tuple(out), pods_per_namespace=per_ns)


@dataclass(frozen=True)
class Placement:
    node_id: str  # the Cortex node that holds the context's credentials and runs the executor
    context: str
    cpu_free_m: int
    memory_free: int


def placements(records: Sequence[dict], cpu_m: int = 0, memory: int = 0, context: str = "",
               live_nodes: Iterable[str] | None = None) -> list[Placement]:
    """Where a k8s_job fits: (node, context) pairs with a k8s node that has `cpu_m` and `memory` free.

    `records` are the per-node records the plugin publishes (`{"node_id", "contexts": [...], "capacity":
    [summary...]}`, read from the key-value store under RECORD_PREFIX). `context` restricts to one context
    name; `live_nodes`, when given, drops records of Cortex nodes that are not alive. Most free CPU first,
    then memory, then node id for determinism.
    """
    live = set(live_nodes) if live_nodes is not None else None
    out = []
    for record in records:
        node_id = record.get("node_id", "")
        if live is not None and node_id not in live:
            continue
        for cap in record.get("capacity") or []:
            if cap.get("error") or (context and cap.get("context") != context):
                continue
            if any(c >= cpu_m and m >= memory for c, m in cap.get("node_free") or []):
                out.append(Placement(node_id, cap["context"], cap.get("cpu_free_m", 0), cap.get("memory_free", 0)))
    return sorted(out, key=lambda p: (-p.cpu_free_m, -p.memory_free, p.node_id, p.context))


def demand(spec: dict) -> tuple[str, int, int]:
    """(context, cpu m, memory bytes) a validated k8s_job spec asks of its Kubernetes cluster."""
    resources = spec.get("resources") or {}
    return (spec.get("context", ""), millicores(resources.get("cpu", 0)), bytes_of(resources.get("memory", 0)))


def fit_reason(records: Sequence[dict], node_id: str, spec: dict) -> str:
    """'' when Cortex node `node_id` can run this k8s_job spec now, else why not: the check a scheduler's
    filter makes for a k8s_job task in place of the node's own CPU/memory (the pod does not run there).

    A spec without a context runs on the node's current-context, as the executor does.
    """
    context, cpu_m, memory = demand(spec)
    record = next((r for r in records if r.get("node_id") == node_id), None)
    if record is None or not record.get("contexts"):
        return "has no Kubernetes context"
    name = context or record.get("current", "")
    if not any(c.get("name") == name for c in record["contexts"]):
        return f"has no Kubernetes context {name!r}" if name else "has no current Kubernetes context"
    cap = next((c for c in record.get("capacity") or [] if c.get("context") == name), None)
    if cap is None:
        return f"context {name!r} not measured yet"
    if cap.get("error"):
        return f"context {name!r}: {cap['error']}"
    if not any(c >= cpu_m and m >= memory for c, m in cap.get("node_free") or []):
        return (f"context {name!r} has no Kubernetes node with {cpu_m}m CPU and {memory // 2**20} MiB free "
                f"({cap.get('cpu_free_m', 0)}m, {cap.get('memory_free', 0) // 2**20} MiB free in total)")
    return ""

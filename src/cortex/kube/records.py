"""The per-node Kubernetes record: what each node tells the cluster about its contexts, without secrets.

Each node running the plugin keeps one key in the replicated key-value store,
`plugins/kubernetes/nodes/<node id>`, whose value is JSON:

    {"node_id": "n2", "current": "prod", "problems": [],
     "contexts": [KubeContext.public(), ...],         # names, server URLs, namespaces, auth kinds
     "capacity": [ContextCapacity.summary(), ...]}    # free CPU/memory per context, per k8s node

It is rewritten only when it changes. This is how the leader's scheduler (and any node's tools) learn which
node can run a task on which context: the credentials stay on the node that has them, the record says
where they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from cortex.kube.capacity import ContextCapacity
from cortex.kube.kubeconfig import Discovery
from cortex.plugins.records import encode, parse_records, read_prefix  # noqa: F401  (re-exported)

RECORD_PREFIX = "plugins/kubernetes/nodes/"


def record_key(node_id: str) -> str:
    return RECORD_PREFIX + node_id


def build_record(node_id: str, discovery: Discovery, capacities: Iterable[ContextCapacity]) -> dict:
    return {"node_id": node_id, "current": discovery.current, "problems": list(discovery.problems),
            "contexts": [c.public() for c in discovery.contexts],
            "capacity": [c.summary() for c in capacities]}



def read_records(read: Callable[[str, dict], Any]) -> list[dict]:
    """All published records through a state query function (see cortex.plugins.records)."""
    return read_prefix(read, RECORD_PREFIX)

def k8s_capacity(records: Iterable[dict]) -> list[dict]:
    """Per (node, context): free CPU (millicores) and memory (bytes), for a scheduler or a person.

    Every entry: {"node_id", "context", "server", "cpu_free_m", "memory_free", "node_free", "ready_nodes",
    "error"}. A context whose capacity could not be measured is listed with its error and zero free.
    """
    out = []
    for record in records:
        servers = {c["name"]: c.get("server", "") for c in record.get("contexts") or []}
        for cap in record.get("capacity") or []:
            out.append({"node_id": record["node_id"], "context": cap.get("context", ""),
                        "server": servers.get(cap.get("context", ""), ""),
                        "cpu_free_m": cap.get("cpu_free_m", 0), "memory_free": cap.get("memory_free", 0),
                        "node_free": cap.get("node_free", []), "ready_nodes": cap.get("ready_nodes", 0),
                        "error": cap.get("error", "")})
    return out


def where_is(records: Iterable[dict], context: str) -> list[str]:
    """The nodes whose kubeconfig has `context`."""
    return [r["node_id"] for r in records if any(c.get("name") == context for c in r.get("contexts") or [])]

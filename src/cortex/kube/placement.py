"""Where a `k8s_job` task may run: the kubernetes plugin's placement (cortex.plugins.api.Placement).

A k8s_job's pod runs in a Kubernetes cluster, not on the Cortex node, so the node's own CPUs, memory and
GPUs do not matter: a node can take the task when one of its kubeconfig contexts has a Kubernetes node with
the pod's requests free, as the node last published it (records.py). The scheduler then reserves only a
task slot there.
"""

from __future__ import annotations

from collections.abc import Sequence

from cortex.kube.capacity import fit_reason
from cortex.kube.executor import KIND
from cortex.kube.records import read_records
from cortex.plugins.api import Refusal, StateRead


def refusal_from(records: Sequence[dict]) -> Refusal:
    """Why a node cannot run a k8s_job task now ('' when it can), judged on these published records."""
    return lambda task, node_id: fit_reason(records, node_id, task.get("spec") or {})


class KubernetesPlacement:
    kinds = frozenset({KIND})
    uses_node_resources = False

    def prepare(self, read: StateRead) -> Refusal:
        return refusal_from(read_records(read))

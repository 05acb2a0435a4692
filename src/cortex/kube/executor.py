"""The `k8s_job` executor as the task engine sees it (cortex.tasks.executor.Executor).

Light on purpose: validating a spec and checking availability need no Kubernetes client, so a node that
has no kubeconfig never imports the `kubernetes` library; `run` loads it (jobs.py) on first use.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from cortex.kube import spec as specs
from cortex.kube.kubeconfig import Discovery, discover, kubeconfig_paths
from cortex.tasks.executor import Outcome, TaskRun, TaskSpecError
from cortex.userdirs import user_home

KIND = "k8s_job"


def default_discovery(extra_paths: tuple[str, ...] = ()) -> Callable[[], Discovery]:
    """Discovery from KUBECONFIG / ~/.kube/config (+ extra files), re-read on every call (files change)."""
    return lambda: discover(kubeconfig_paths(os.environ, user_home(), extra_paths))


class K8sJobExecutor:
    """Executor for kind "k8s_job", using the kubeconfig contexts `discover()` finds on this node.

    Built with no arguments (or the task engine's `settings=`, whose `extra["kubernetes_extra_paths"]` may
    name more kubeconfig files) it reads the node's default kubeconfig files; the plugin passes its own.
    """

    kind = KIND

    def __init__(self, discover: Callable[[], Discovery] | None = None, poll_interval: float = 1.0,
                 api_grace: float = 30.0, settings: Any = None):
        extra = tuple((getattr(settings, "extra", None) or {}).get("kubernetes_extra_paths", ()))
        self._discover = discover or default_discovery(extra)
        self.poll_interval = poll_interval
        self.api_grace = api_grace  # seconds of API failures tolerated while a Job runs

    def validate(self, spec: dict) -> dict:
        return specs.validate(spec)

    def available(self) -> str:
        discovery = self._discover()
        if not discovery.contexts:
            problems = f"; problems: {'; '.join(discovery.problems)}" if discovery.problems else ""
            return f"no kubeconfig context on this node (set KUBECONFIG or write ~/.kube/config{problems})"
        return ""

    def run(self, run: TaskRun) -> Outcome:
        try:
            spec = specs.validate(run.spec)
        except TaskSpecError as exc:
            return Outcome(None, f"bad k8s_job spec: {exc}", retryable=False)
        from cortex.kube.jobs import run_attempt  # the kubernetes client, loaded when a Job really runs

        return run_attempt(self._discover(), spec, run, self.poll_interval, self.api_grace)

"""The `k8s_job` task spec and the batch/v1 Job it becomes: pure functions, checked at submit time.

A spec (JSON):

    {"image": "python:3.12-slim",                 # required
     "command": ["python", "-c", "print(1)"],      # optional, a list of strings (the entrypoint)
     "args": ["--fast"],                           # optional, a list of strings
     "context": "prod",                            # kubeconfig context; "" = the node's current-context
     "namespace": "batch",                         # DNS-1123 label; "" = the context's namespace
     "resources": {"cpu": "500m", "memory": "256Mi", "gpu": 1},   # requests; memory and gpu also limits
     "env": {"MODE": "fast"},
     "backoff_limit": 0,                           # Kubernetes-side retries of the pod (default 0: the
                                                   # task engine's retry policy owns retries)
     "ttl_seconds_after_finished": 3600,           # the cluster removes the finished Job after this
     "service_account": "",
     "image_pull_timeout": 300}                    # give up on a pod stuck pulling its image after this
"""

from __future__ import annotations

import hashlib
import math
import re

from cortex.kube.capacity import bytes_of, millicores
from cortex.tasks.executor import TaskSpecError

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
MANAGED_BY = "cortex"
TASK_LABEL = "cortex.dev/task-id"
ATTEMPT_LABEL = "cortex.dev/attempt"
CONTAINER = "task"
FIELDS = {"image", "command", "args", "context", "namespace", "resources", "env", "backoff_limit",
          "ttl_seconds_after_finished", "service_account", "image_pull_timeout"}


def check_namespace(value: object, what: str = "namespace") -> str:
    if not isinstance(value, str) or len(value) > 63 or not DNS1123_LABEL.match(value):
        raise TaskSpecError(f"{what} {value!r} is not a valid Kubernetes namespace: use at most 63 lowercase "
                            f"letters, digits and '-', starting and ending with a letter or digit (e.g. 'batch-jobs')")
    return value


def check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) > 253 or not DNS1123_SUBDOMAIN.match(value):
        raise TaskSpecError(f"{what} {value!r} is not a valid Kubernetes name: lowercase letters, digits, '-' "
                            f"and '.', starting and ending with a letter or digit")
    return value


def _strings(spec: dict, key: str) -> list[str]:
    value = spec.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TaskSpecError(f"{key} must be a list of strings, e.g. [\"sh\", \"-c\", \"echo hi\"]; "
                            f"got {type(value).__name__}")
    return list(value)


def _int(spec: dict, key: str, default: int, low: int, high: int) -> int:
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise TaskSpecError(f"{key} must be an integer from {low} to {high}; got {value!r}")
    return value


def validate(spec: object) -> dict:
    """The normalized spec, or TaskSpecError saying what to fix. No I/O: contexts are checked when run."""
    if not isinstance(spec, dict):
        raise TaskSpecError("a k8s_job spec is a JSON object with at least an 'image'")
    unknown = set(spec) - FIELDS
    if unknown:
        raise TaskSpecError(f"unknown k8s_job field(s) {', '.join(sorted(unknown))}; "
                            f"allowed: {', '.join(sorted(FIELDS))}")
    image = spec.get("image")
    if not isinstance(image, str) or not image or len(image) > 512 or any(c.isspace() or ord(c) < 32 for c in image):
        raise TaskSpecError(f"image must be a non-empty image reference without spaces "
                            f"(e.g. 'docker.io/library/busybox:1.36'); got {image!r}")
    context = spec.get("context", "")
    if not isinstance(context, str) or len(context) > 253:
        raise TaskSpecError(f"context must be the name of a kubeconfig context (a string); got {context!r}")
    namespace = spec.get("namespace", "")
    if namespace != "":
        check_namespace(namespace)
    resources = spec.get("resources", {})
    if not isinstance(resources, dict) or set(resources) - {"cpu", "memory", "gpu"}:
        raise TaskSpecError("resources takes 'cpu' (e.g. '500m'), 'memory' (e.g. '256Mi') and 'gpu' (a count)")
    norm_resources: dict = {}
    for key, parse in (("cpu", millicores), ("memory", bytes_of)):
        if key in resources:
            try:
                amount = parse(resources[key])
            except (ValueError, TypeError) as exc:
                raise TaskSpecError(f"resources.{key}: {exc}") from None
            if amount <= 0:
                raise TaskSpecError(f"resources.{key} must be more than zero; got {resources[key]!r}")
            norm_resources[key] = str(resources[key])
    if "gpu" in resources:
        norm_resources["gpu"] = _int(resources, "gpu", 0, 1, 64)
    env = spec.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and ENV_NAME.match(k) and isinstance(v, str)
                                            for k, v in env.items()):
        raise TaskSpecError("env must map variable names (letters, digits, '_', '-', '.') to strings")
    service_account = spec.get("service_account", "")
    if service_account:
        check_name(service_account, "service_account")
    return {"image": image, "command": _strings(spec, "command"), "args": _strings(spec, "args"),
            "context": context, "namespace": namespace, "resources": norm_resources, "env": dict(env),
            "backoff_limit": _int(spec, "backoff_limit", 0, 0, 100),
            "ttl_seconds_after_finished": _int(spec, "ttl_seconds_after_finished", 3600, 0, 30 * 86400),
            "service_account": service_account,
            "image_pull_timeout": _int(spec, "image_pull_timeout", 300, 1, 86400)}


def label_value(value: str) -> str:
    """A string made safe as a label value (63 chars of [A-Za-z0-9_.-], alphanumeric at both ends)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", value)[:63].strip("-_.")
    return cleaned if LABEL_VALUE.match(cleaned) else ""


def job_name(task_id: str, attempt: int) -> str:
    """A stable DNS-1123 label per (task, attempt): re-running an attempt finds its Job instead of doubling it.

    Jobs label their pods with `job-name=<name>`, so the name must also be a valid label value: 63 chars.
    """
    slug = re.sub(r"[^a-z0-9-]+", "-", task_id.lower()).strip("-") or "task"
    suffix = f"-{attempt}"
    if len("cortex-" + slug + suffix) > 63:
        digest = hashlib.sha256(task_id.encode()).hexdigest()[:8]
        slug = slug[: 63 - len("cortex-") - len(suffix) - 9].rstrip("-") + "-" + digest
    return f"cortex-{slug}{suffix}"


def job_manifest(spec: dict, name: str, namespace: str, task_id: str, attempt: int,
                 timeout: float | None = None) -> dict:
    """The batch/v1 Job for one attempt of a validated spec (API JSON field names)."""
    labels = {"app.kubernetes.io/managed-by": MANAGED_BY, ATTEMPT_LABEL: str(attempt)}
    if label_value(task_id):
        labels[TASK_LABEL] = label_value(task_id)
    resources = spec["resources"]
    requests = {k: resources[k] for k in ("cpu", "memory") if k in resources}
    limits = {"memory": resources["memory"]} if "memory" in resources else {}
    if "gpu" in resources:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(resources["gpu"])
    container: dict = {"name": CONTAINER, "image": spec["image"]}
    if spec["command"]:
        container["command"] = spec["command"]
    if spec["args"]:
        container["args"] = spec["args"]
    if spec["env"]:
        container["env"] = [{"name": k, "value": v} for k, v in sorted(spec["env"].items())]
    if requests or limits:
        container["resources"] = {k: v for k, v in (("requests", requests), ("limits", limits)) if v}
    pod_spec: dict = {"restartPolicy": "Never", "containers": [container]}
    if spec["service_account"]:
        pod_spec["serviceAccountName"] = spec["service_account"]
    job_spec: dict = {"backoffLimit": spec["backoff_limit"],
                      "ttlSecondsAfterFinished": spec["ttl_seconds_after_finished"],
                      "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec}}
    if timeout:
        # The node enforces the timeout and deletes the Job; the deadline (a little later) stops it anyway
        # if this node dies first.
        job_spec["activeDeadlineSeconds"] = math.ceil(timeout) + 30
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": namespace, "labels": labels}, "spec": job_spec}

"""The `kubernetes` plugin: kubeconfig contexts per node, capacity, where `k8s_job` tasks fit, tools.

On every node it runs on, the plugin re-reads the kubeconfig files each `poll_interval`, measures each
context's capacity (nodes, allocatable vs requested, pods per namespace) and, when anything changed, writes
the node's secret-free record (records.py) to the replicated key-value store. Tools and the `cluster://k8s`
resource answer from live calls for this node's contexts and from the records for the other nodes'.

A context's credentials are only ever used on the node that has them: a tool asked about a context that
lives on another node says which node to ask. The `kubernetes` client library is imported only once a
context exists (client.py, jobs.py), so nodes without kubeconfig pay nothing for the plugin.
"""

from __future__ import annotations

import os
import threading
import uuid
from typing import Any

from cortex.kube import spec as specs
from cortex.kube.capacity import ContextCapacity
from cortex.kube.kubeconfig import Discovery, discover, kubeconfig_paths
from cortex.kube.placement import KubernetesPlacement
from cortex.kube.records import build_record, encode, k8s_capacity, read_records, record_key, where_is
from cortex.plugins import Caller, Plugin, Resource, Tool, ToolError, returns
from cortex.tasks.executor import TaskSpecError
from cortex.userdirs import user_home


def _schema(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_CONTEXT = {"type": "string", "description": "kubeconfig context; empty = this node's current-context"}
_NAMESPACE = {"type": "string", "description": "namespace; empty = the context's namespace"}
_JOB = {"type": "string", "description": "the Job's name, as returned by k8s_submit_job"}


# What each tool answers: its MCP output schema (structuredContent).
_OUT_K8S_LIST_CLUSTERS = returns({"contexts": "array", "problems": "object"})
_OUT_K8S_GET_RESOURCES = returns({"contexts": "array"})
_OUT_K8S_SUBMIT_JOB = returns(
    {"context": "string", "namespace": "string", "job": "string", "created": "boolean"}
)
_OUT_K8S_JOB_STATUS = returns(
    {
        "context": "string",
        "namespace": "string",
        "job": "string",
        "state": "string",
        "error": "string",
        "active": "integer",
        "succeeded": "integer",
        "failed": "integer",
        "pods": "array",
    }
)
_OUT_K8S_JOB_LOGS = returns(
    {"context": "string", "namespace": "string", "job": "string", "logs": ["object", "array"]}
)
_OUT_K8S_DELETE_JOB = returns(
    {"context": "string", "namespace": "string", "job": "string", "deleted": "boolean"}
)
_OUT_K8S_SCALE_DEPLOYMENT = returns(
    {
        "context": "string",
        "namespace": "string",
        "deployment": "string",
        "previous": ["integer", "null"],
        "replicas": ["integer", "null"],
    }
)


class KubernetesPlugin(Plugin):
    name = "kubernetes"
    description = "Kubernetes contexts of each node, Jobs as k8s_job tasks, cluster capacity"
    placement = KubernetesPlacement()
    options_schema = {
        "type": "object", "additionalProperties": False,
        "properties": {
            "extra_paths": {"type": "array", "items": {"type": "string"}, "default": [],
                            "description": "kubeconfig files read after KUBECONFIG/~/.kube/config, "
                                           "e.g. /etc/rancher/k3s/k3s.yaml"},
            "poll_interval": {"type": "number", "minimum": 1, "default": 30,
                              "description": "seconds between capacity measurements"},
            "job_poll_interval": {"type": "number", "exclusiveMinimum": 0, "default": 1.0,
                                  "description": "accepted so existing configurations still load; the k8s_job "
                                                 "executor (entry point cortex.executors) polls every second"},
            "publish": {"type": "boolean", "default": True,
                        "description": "write this node's context record to the replicated store"},
        },
    }

    def init(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._capacity: dict[str, ContextCapacity] = {}
        self._published = ""
        self._nonce = uuid.uuid4().hex[:8]  # idempotency keys: one writer incarnation, a counter per change
        self._seq = 0
        self._pending: tuple[str, int] | None = None

    # --- discovery and monitoring ---------------------------------------------------------------------
    def discovery(self) -> Discovery:
        return discover(kubeconfig_paths(os.environ, user_home(), self.ctx.options["extra_paths"]))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kubernetes-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as exc:  # a bad round must not end monitoring
                self.ctx.log.warning("kubernetes monitoring round failed: %s", exc)
            # an unpublished change (no leader yet at startup, a partition) is retried soon, not next round
            self._stop.wait(min(2.0, self.ctx.options["poll_interval"]) if self._pending else
                            self.ctx.options["poll_interval"])

    def refresh(self) -> dict:
        """Measure every local context and publish the record if it changed; returns the record."""
        discovery = self.discovery()
        capacities = []
        if discovery.contexts:
            from cortex.kube.client import measure

            capacities = [measure(discovery, c.name) for c in discovery.contexts]
        with self._lock:
            self._capacity = {c.context: c for c in capacities}
        record = build_record(self.ctx.cluster.node_id if self.ctx.cluster else "", discovery, capacities)
        if self.ctx.options["publish"] and self.ctx.cluster is not None:
            self._publish(record)
        return record

    def _publish(self, record: dict) -> None:
        value = encode(record)
        if value == self._published or (not self._published and not record["contexts"]):
            return  # unchanged, or nothing to say yet: nodes without kubeconfig write nothing
        if self._pending is None or self._pending[0] != value:
            self._seq += 1  # a new value gets a new key; a retried write of the same value reuses its key
            self._pending = (value, self._seq)
        try:
            self.ctx.cluster.write("kv.put", {"key": record_key(record["node_id"]), "value": value},
                                   idempotency_key=f"k8s:{record['node_id']}:{self._nonce}:{self._pending[1]}")
        except Exception as exc:  # no leader yet, a partition: the next round tries again
            self.ctx.log.info("cannot publish kubernetes record yet: %s", exc)
            return
        self._published, self._pending = value, None

    def records(self) -> list[dict]:
        """Every node's published record, this node's replaced by a live one."""
        others = []
        if self.ctx.cluster is not None:
            try:
                others = read_records(lambda q, a: self.ctx.cluster.read(q, a, level="stale"))
            except Exception as exc:
                self.ctx.log.info("cannot read kubernetes records: %s", exc)
        node_id = self.ctx.cluster.node_id if self.ctx.cluster else ""
        local = build_record(node_id, self.discovery(), self.capacities())
        return [local] + [r for r in others if r["node_id"] != node_id]

    def capacities(self) -> list[ContextCapacity]:
        with self._lock:
            return list(self._capacity.values())

    # --- resources ------------------------------------------------------------------------------------
    def resources(self) -> list[Resource]:
        return [Resource("cluster://k8s", "Kubernetes",
                         "Kubernetes contexts per Cortex node (no credentials) and their free CPU/memory",
                         lambda: {"records": self.records(), "capacity": k8s_capacity(self.records())})]

    # --- tools ----------------------------------------------------------------------------------------
    def _local(self, context: str) -> tuple[Discovery, str]:
        """This node's discovery and the context name to use; ToolError naming the right node otherwise."""
        discovery = self.discovery()
        name = context or discovery.current
        if name and discovery.get(name):
            return discovery, name
        if context:
            holders = where_is(self.records()[1:], context)
            if holders:
                raise ToolError(f"context {context!r} lives on node(s) {', '.join(holders)}, whose credentials "
                                f"stay there; call this tool on {holders[0]}")
        have = ", ".join(c.name for c in discovery.contexts) or "none"
        raise ToolError(f"no kubeconfig context {name or '(current)'!r} on this node (contexts here: {have}); "
                        f"k8s_list_clusters shows every node's contexts")

    def _kube(self, context: str):
        from cortex.kube.client import KubeError, connect

        discovery, name = self._local(context)
        try:
            return connect(discovery, name)
        except KubeError as exc:
            raise ToolError(str(exc)) from None

    def _call(self, kube, doing: str, fn, *args, **kwargs) -> Any:
        from cortex.kube.client import CONNECT_TIMEOUT, READ_TIMEOUT, explain

        try:
            return fn(*args, _request_timeout=(CONNECT_TIMEOUT, READ_TIMEOUT), **kwargs)
        except Exception as exc:
            raise ToolError(str(explain(exc, kube.context, doing))) from None

    def tools(self) -> list[Tool]:
        return [
            Tool("k8s_list_clusters", "List the Kubernetes contexts every Cortex node can reach (name, server "
                 "URL, namespace, auth kind, flavor such as k3s or gke) and which node has them. Credentials "
                 "never leave their node.", self._t_list, _schema({}), output_schema=_OUT_K8S_LIST_CLUSTERS),
            Tool("k8s_get_resources", "Capacity of Kubernetes contexts: nodes, allocatable vs requested CPU and "
                 "memory, pods per namespace. Live for this node's contexts, as last published for others.",
                 self._t_resources, _schema({"context": {"type": "string", "description": "one context; "
                                             "empty = all"}}), output_schema=_OUT_K8S_GET_RESOURCES),
            Tool("k8s_submit_job", "Create a Kubernetes Job on a context of this node and return its name; "
                 "watch it with k8s_job_status and k8s_job_logs. Pass the same `id` again to get the same Job "
                 "instead of a second one.", self._t_submit,
                 _schema({"context": _CONTEXT, "namespace": _NAMESPACE,
                          "image": {"type": "string"},
                          "command": {"type": "array", "items": {"type": "string"}},
                          "args": {"type": "array", "items": {"type": "string"}},
                          "env": {"type": "object", "additionalProperties": {"type": "string"}},
                          "resources": {"type": "object", "description": "cpu ('500m'), memory ('256Mi'), gpu"},
                          "backoff_limit": {"type": "integer", "minimum": 0, "maximum": 100},
                          "ttl_seconds_after_finished": {"type": "integer", "minimum": 0},
                          "id": {"type": "string", "maxLength": 200,
                                 "description": "idempotency id; the Job's name derives from it"}}, ("image",)),
                 role="operator", read_only=False, idempotent=True, output_schema=_OUT_K8S_SUBMIT_JOB),
            Tool("k8s_job_status", "State of a Job: running, succeeded or failed, with its pods and exit codes.",
                 self._t_status, _schema({"context": _CONTEXT, "namespace": _NAMESPACE, "job": _JOB}, ("job",)),
                 output_schema=_OUT_K8S_JOB_STATUS),
            Tool("k8s_job_logs", "The logs of a Job's pods (the last `tail_lines` lines of each).", self._t_logs,
                 _schema({"context": _CONTEXT, "namespace": _NAMESPACE, "job": _JOB,
                          "tail_lines": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 200}},
                         ("job",)), output_schema=_OUT_K8S_JOB_LOGS),
            Tool("k8s_delete_job", "Delete a Job and its pods (propagation Background).", self._t_delete,
                 _schema({"context": _CONTEXT, "namespace": _NAMESPACE, "job": _JOB}, ("job",)),
                 role="operator", read_only=False, destructive=True, idempotent=True,
                 output_schema=_OUT_K8S_DELETE_JOB, plan=self._plan_delete),
            Tool("k8s_scale_deployment", "Set a Deployment's replica count; returns the previous and new count.",
                 self._t_scale, _schema({"context": _CONTEXT, "namespace": _NAMESPACE,
                                         "name": {"type": "string"},
                                         "replicas": {"type": "integer", "minimum": 0, "maximum": 1000}},
                                        ("name", "replicas")),
                 role="operator", read_only=False, idempotent=True, output_schema=_OUT_K8S_SCALE_DEPLOYMENT),
        ]

    def _namespace(self, kube, args: dict) -> str:
        namespace = args.get("namespace") or kube.context.namespace
        try:
            return specs.check_namespace(namespace)
        except TaskSpecError as exc:
            raise ToolError(str(exc)) from None

    def _t_list(self, args: dict, caller: Caller) -> dict:
        records = self.records()
        rows = [{"node_id": r["node_id"], "current": c["name"] == r.get("current"), **c}
                for r in records for c in r.get("contexts") or []]
        return {"contexts": rows, "problems": {r["node_id"]: r["problems"] for r in records if r.get("problems")}}

    def _t_resources(self, args: dict, caller: Caller) -> dict:
        context = args.get("context", "")
        discovery = self.discovery()
        local = [c.name for c in discovery.contexts if not context or c.name == context]
        if local:
            from cortex.kube.client import measure
        live = [measure(discovery, name) for name in local]
        with self._lock:
            self._capacity.update({c.context: c for c in live})
        node_id = self.ctx.cluster.node_id if self.ctx.cluster else ""
        out = [{"node_id": node_id, **c.detail()} for c in live]
        for row in k8s_capacity(self.records()[1:]):
            if not context or row["context"] == context:
                out.append({**row, "published": True})
        if context and not out:
            self._local(context)  # raises the "no such context" error
        return {"contexts": out}

    def _t_submit(self, args: dict, caller: Caller) -> dict:
        from kubernetes import client as k8s

        from cortex.kube.client import CONNECT_TIMEOUT, READ_TIMEOUT, explain

        fields = {k: v for k, v in args.items() if k in specs.FIELDS}
        try:
            spec = specs.validate(fields)
        except TaskSpecError as exc:
            raise ToolError(f"k8s_submit_job: {exc}") from None
        job_id = args.get("id") or uuid.uuid4().hex[:12]
        with self._kube(spec["context"]) as kube:
            namespace = spec["namespace"] or kube.context.namespace
            name = specs.job_name(job_id, 1)
            manifest = specs.job_manifest(spec, name, namespace, job_id, 1)
            try:
                kube.batch.create_namespaced_job(namespace, k8s.V1Job.from_dict(manifest),
                                                 _request_timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
                created = True
            except k8s.ApiException as exc:
                if exc.status != 409:
                    raise ToolError(str(explain(exc, kube.context, f"creating Job {namespace}/{name}"))) from None
                created = False  # the same id again: the Job it made the first time
            except Exception as exc:
                raise ToolError(str(explain(exc, kube.context, f"creating Job {namespace}/{name}"))) from None
            return {"context": kube.context.name, "namespace": namespace, "job": name, "created": created}

    def _t_status(self, args: dict, caller: Caller) -> dict:
        with self._kube(args.get("context", "")) as kube:
            namespace = self._namespace(kube, args)
            job = self._call(kube, f"reading Job {namespace}/{args['job']}", kube.batch.read_namespaced_job_status,
                             args["job"], namespace)
            pods = self._call(kube, "listing the Job's pods", kube.core.list_namespaced_pod, namespace,
                              label_selector=f"job-name={args['job']}").items
            from cortex.kube.jobs import job_outcome

            outcome = job_outcome(job, pods, namespace, args["job"])
            state = "running" if outcome is None else ("succeeded" if outcome.ok else "failed")
            return {"context": kube.context.name, "namespace": namespace, "job": args["job"], "state": state,
                    "error": outcome.error if outcome else "", "active": job.status.active or 0,
                    "succeeded": job.status.succeeded or 0, "failed": job.status.failed or 0,
                    "pods": [_pod_row(p) for p in pods]}

    def _t_logs(self, args: dict, caller: Caller) -> dict:
        from kubernetes import client as k8s

        from cortex.kube.client import CONNECT_TIMEOUT, READ_TIMEOUT

        with self._kube(args.get("context", "")) as kube:
            namespace = self._namespace(kube, args)
            pods = self._call(kube, "listing the Job's pods", kube.core.list_namespaced_pod, namespace,
                              label_selector=f"job-name={args['job']}").items
            if not pods:
                raise ToolError(f"Job {namespace}/{args['job']} has no pods on context {kube.context.name!r} "
                                f"(wrong name or namespace, or already cleaned up)")
            logs = {}
            for pod in pods:
                try:
                    logs[pod.metadata.name] = kube.core.read_namespaced_pod_log(
                        pod.metadata.name, namespace, container=specs.CONTAINER,
                        tail_lines=args.get("tail_lines", 200), _request_timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
                except k8s.ApiException as exc:
                    logs[pod.metadata.name] = f"(no log: {exc.status} {exc.reason})"
            return {"context": kube.context.name, "namespace": namespace, "job": args["job"], "logs": logs}

    def _t_delete(self, args: dict, caller: Caller) -> dict:
        from cortex.kube.client import KubeError
        from cortex.kube.jobs import delete_job

        with self._kube(args.get("context", "")) as kube:
            namespace = self._namespace(kube, args)
            try:
                deleted = delete_job(kube, namespace, args["job"])
            except KubeError as exc:
                raise ToolError(str(exc)) from None
            return {"context": kube.context.name, "namespace": namespace, "job": args["job"], "deleted": deleted}

    def _plan_delete(self, args: dict, caller: Caller) -> str:
        status = self._t_status(args, caller)
        return (f"delete Job {status['namespace']}/{status['job']} ({status['state']}, {len(status['pods'])} pod(s)) "
                f"on context {status['context']}, with its pods")

    def _t_scale(self, args: dict, caller: Caller) -> dict:
        with self._kube(args.get("context", "")) as kube:
            namespace = self._namespace(kube, args)
            name = args["name"]
            try:
                specs.check_name(name, "deployment name")
            except TaskSpecError as exc:
                raise ToolError(str(exc)) from None
            doing = f"scaling deployment {namespace}/{name}"
            before = self._call(kube, doing, kube.apps.read_namespaced_deployment_scale, name, namespace)
            after = self._call(kube, doing, kube.apps.patch_namespaced_deployment_scale, name, namespace,
                               {"spec": {"replicas": args["replicas"]}})
            return {"context": kube.context.name, "namespace": namespace, "deployment": name,
                    "previous": before.spec.replicas, "replicas": after.spec.replicas}


def _pod_row(pod) -> dict:
    row = {"name": pod.metadata.name, "phase": pod.status.phase if pod.status else ""}
    for status in (pod.status.container_statuses or []) if pod.status else []:
        if status.state and status.state.terminated:
            row["exit_code"] = status.state.terminated.exit_code
        if status.state and status.state.waiting:
            row["waiting"] = status.state.waiting.reason
    return row

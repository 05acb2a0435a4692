"""A fake Kubernetes API server for tests: a real HTTP server on 127.0.0.1 speaking the API's paths and JSON.

No Kubernetes API server can run in the test environment, so the `kubernetes` client library talks to this
instead, over real HTTP with bearer-token auth. It serves the objects Cortex uses, with the API's shapes,
status codes and Status error bodies:

  GET    /version
  GET    /api/v1/nodes                                    NodeList
  GET    /api/v1/pods                                     PodList, all namespaces
  GET    /api/v1/namespaces/{ns}/pods?labelSelector=a=b   PodList
  GET    /api/v1/namespaces/{ns}/pods/{name}
  GET    /api/v1/namespaces/{ns}/pods/{name}/log          text; follow=true streams chunked until the
                                                          container ends; 400 while it waits to start
  POST   /apis/batch/v1/namespaces/{ns}/jobs              201 Job; 409 AlreadyExists; 404 unknown namespace
  GET    /apis/batch/v1/namespaces/{ns}/jobs[/{name}[/status]]
  DELETE /apis/batch/v1/namespaces/{ns}/jobs/{name}       propagationPolicy Background/Foreground removes
                                                          the pods, Orphan keeps them
  GET    /apis/apps/v1/namespaces/{ns}/deployments
  GET    /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale  autoscaling/v1 Scale
  PATCH  /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale  merge/strategic-merge patch of spec.replicas

A Job runs like the real controller with parallelism 1: one pod at a time, Pending -> Running ->
Succeeded/Failed, a new pod after each failure until `backoffLimit` failures, then condition Failed
(BackoffLimitExceeded); success sets condition Complete. What a pod does comes from its container's command,
`sh -c "<script>"`, a tiny script language of `;`-separated steps:

  echo TEXT            append a log line
  sleep SECONDS
  exit CODE            end the container with CODE
  gate NAME            wait until the test calls `release(NAME)` (or the pod is deleted)
  fail-attempts N CODE exit CODE if fewer than N pods of this Job failed before

An image starting with `missing/` is never pulled: the pod waits in ErrImagePull, then ImagePullBackOff.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import yaml

DEFAULT_NODES = (("fake-node-1", "4", "8Gi"), ("fake-node-2", "2", "4Gi"))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def _conditions(types: tuple[str, ...], reason: str, message: str) -> list[dict]:
    """Job conditions as the controller sets them at the end (1.31+: the *Target/*Met one first)."""
    return [{"type": t, "status": "True", "reason": reason, "message": message, "lastTransitionTime": _now()}
            for t in types]


@dataclass
class FakePod:
    obj: dict
    job_key: tuple[str, str]
    log: bytearray = field(default_factory=bytearray)
    started: bool = False  # the container started: logs can be read
    finished: bool = False
    deleted: threading.Event = field(default_factory=threading.Event)


class FakeKube:
    """The fake API server. Use as a context manager; `url` is where it listens."""

    def __init__(self, token: str = "fake-token", namespaces: tuple[str, ...] = ("default", "batch"),
                 nodes: tuple[tuple[str, str, str], ...] = DEFAULT_NODES, name: str = "fake"):
        self.token = token
        self.name = name
        self.namespaces = set(namespaces)
        self.lock = threading.Condition()
        self.jobs: dict[tuple[str, str], dict] = {}
        self.pods: dict[tuple[str, str], FakePod] = {}
        self.nodes = [self._node(*n) for n in nodes]
        self.deployments: dict[tuple[str, str], int] = {("default", "web"): 2}
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self.deletions: list[tuple[str, str, str]] = []  # (namespace, job name, propagationPolicy)
        self.gates: dict[str, threading.Event] = {}
        self.closing = False
        self.connections: set = set()  # open client sockets: closing the server drops them like a dead host
        # a system pod holding requests on the first node, as every real cluster has
        self._add_static_pod("kube-system", "coredns-abc12", self.nodes[0]["metadata"]["name"], "100m", "70Mi")
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="fake-kube")

    # --- lifecycle and test controls ------------------------------------------------------------------
    def __enter__(self) -> FakeKube:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self.lock:
            self.closing = True
            for pod in self.pods.values():
                pod.deleted.set()
            for gate in self.gates.values():
                gate.set()
            self.lock.notify_all()
        self.server.shutdown()
        self.server.server_close()
        for sock in list(self.connections):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def release(self, gate: str) -> None:
        with self.lock:
            self.gates.setdefault(gate, threading.Event()).set()

    def job_pods(self, namespace: str, job: str) -> list[dict]:
        with self.lock:
            return [p.obj for p in self.pods.values() if p.job_key == (namespace, job)]

    def kubeconfig(self, path: Path, context: str, namespace: str = "default", cluster: str = "",
                   user: str = "", current: bool = True, token: str | None = None) -> Path:
        """Write a kubeconfig file for this server (bearer-token auth)."""
        cluster, user = cluster or f"{context}-cluster", user or f"{context}-user"
        doc = {"apiVersion": "v1", "kind": "Config",
               "clusters": [{"name": cluster, "cluster": {"server": self.url}}],
               "users": [{"name": user, "user": {"token": token or self.token}}],
               "contexts": [{"name": context, "context": {"cluster": cluster, "user": user, "namespace": namespace}}]}
        if current:
            doc["current-context"] = context
        path.write_text(yaml.safe_dump(doc))
        return path

    # --- objects --------------------------------------------------------------------------------------
    @staticmethod
    def _node(name: str, cpu: str, memory: str) -> dict:
        resources = {"cpu": cpu, "memory": memory, "pods": "110", "ephemeral-storage": "50Gi"}
        return {"kind": "Node", "apiVersion": "v1",
                "metadata": {"name": name, "uid": str(uuid.uuid4()), "creationTimestamp": _now(),
                             "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
                "spec": {},
                "status": {"capacity": resources, "allocatable": dict(resources),
                           "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                           "message": "kubelet is posting ready status"}],
                           "nodeInfo": {"kubeletVersion": "v1.30.0-fake", "machineID": "", "systemUUID": "",
                                        "bootID": "", "kernelVersion": "", "osImage": "", "containerRuntimeVersion": "",
                                        "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"}}}

    def _add_static_pod(self, ns: str, name: str, node: str, cpu: str, memory: str) -> None:
        obj = {"kind": "Pod", "apiVersion": "v1",
               "metadata": {"name": name, "namespace": ns, "uid": str(uuid.uuid4()), "creationTimestamp": _now()},
               "spec": {"nodeName": node, "containers": [
                   {"name": "main", "image": "registry.k8s.io/coredns:1.11",
                    "resources": {"requests": {"cpu": cpu, "memory": memory}}}]},
               "status": {"phase": "Running"}}
        self.pods[(ns, name)] = FakePod(obj, ("", ""), started=True)

    def _container_status(self, pod: FakePod, state: dict, ready: bool = False) -> None:
        container = pod.obj["spec"]["containers"][0]
        pod.obj["status"]["containerStatuses"] = [
            {"name": container["name"], "image": container.get("image", ""), "imageID": "", "ready": ready,
             "restartCount": 0, "started": ready, "state": state}]

    def _create_job(self, ns: str, job: dict) -> tuple[int, dict]:
        meta = job.get("metadata") or {}
        name = meta.get("name", "")
        if not re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", name) or len(name) > 63:
            return 422, _status(422, "Invalid", f'Job.batch "{name}" is invalid: metadata.name: Invalid value')
        containers = (((job.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers")
        if not containers:
            return 422, _status(422, "Invalid", f'Job.batch "{name}" is invalid: spec.template.spec.containers: '
                                                f'Required value')
        with self.lock:
            if ns not in self.namespaces:
                return 404, _status(404, "NotFound", f'namespaces "{ns}" not found')
            if (ns, name) in self.jobs:
                return 409, _status(409, "AlreadyExists", f'jobs.batch "{name}" already exists')
            uid = str(uuid.uuid4())
            meta.update({"namespace": ns, "uid": uid, "creationTimestamp": _now(), "resourceVersion": "1",
                         "generation": 1})
            selector = {"batch.kubernetes.io/controller-uid": uid}
            template = job["spec"]["template"]
            template.setdefault("metadata", {}).setdefault("labels", {}).update(
                {**selector, "controller-uid": uid, "job-name": name, "batch.kubernetes.io/job-name": name})
            job["spec"].setdefault("backoffLimit", 6)
            job["spec"].setdefault("completions", 1)
            job["spec"].setdefault("parallelism", 1)
            job["spec"]["selector"] = {"matchLabels": selector}
            job["status"] = {"active": 0, "startTime": _now()}
            self.jobs[(ns, name)] = job
            self._start_pod(ns, name)
            return 201, job

    def _start_pod(self, ns: str, job_name: str) -> None:
        """Create the Job's next pod and run its script (lock held)."""
        job = self.jobs[(ns, job_name)]
        template = job["spec"]["template"]
        name = f"{job_name}-{uuid.uuid4().hex[:5]}"
        obj = {"kind": "Pod", "apiVersion": "v1",
               "metadata": {"name": name, "namespace": ns, "uid": str(uuid.uuid4()), "creationTimestamp": _now(),
                            "labels": dict(template["metadata"]["labels"]),
                            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name,
                                                 "uid": job["metadata"]["uid"], "controller": True,
                                                 "blockOwnerDeletion": True}]},
               "spec": {**json.loads(json.dumps(template["spec"])), "nodeName": self.nodes[0]["metadata"]["name"]},
               "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]}}
        pod = FakePod(obj, (ns, job_name))
        self._container_status(pod, {"waiting": {"reason": "ContainerCreating"}})
        self.pods[(ns, name)] = pod
        job["status"]["active"] = 1
        previous_failures = job["status"].get("failed", 0)
        threading.Thread(target=self._run_pod, args=(pod, previous_failures), daemon=True).start()

    def _run_pod(self, pod: FakePod, previous_failures: int) -> None:
        container = pod.obj["spec"]["containers"][0]
        time.sleep(0.05)  # scheduling and container creation take a moment
        if container.get("image", "").startswith("missing/"):
            with self.lock:
                self._container_status(pod, {"waiting": {"reason": "ErrImagePull", "message":
                                                         f'pull access denied for {container["image"]}'}})
            if pod.deleted.wait(0.2):
                return
            with self.lock:
                self._container_status(pod, {"waiting": {"reason": "ImagePullBackOff", "message":
                                                         f'Back-off pulling image "{container["image"]}"'}})
            pod.deleted.wait()
            return
        with self.lock:
            if pod.deleted.is_set():
                return
            pod.started = True
            pod.obj["status"].update({"phase": "Running", "startTime": _now()})
            self._container_status(pod, {"running": {"startedAt": _now()}}, ready=True)
        code = self._script(pod, container, previous_failures)
        if code is None:
            return  # deleted while running
        with self.lock:
            if pod.deleted.is_set():
                return
            pod.finished = True
            pod.obj["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
            self._container_status(pod, {"terminated": {"exitCode": code, "reason": "Completed" if code == 0
                                                        else "Error", "startedAt": _now(), "finishedAt": _now()}})
            self.lock.notify_all()
            self._job_pod_finished(pod.job_key, code)

    def _script(self, pod: FakePod, container: dict, previous_failures: int) -> int | None:
        command = list(container.get("command") or []) + list(container.get("args") or [])
        script = command[2] if command[:2] == ["sh", "-c"] and len(command) > 2 else " ".join(command)
        for step in [s.strip() for s in re.split(r"[;\n]", script) if s.strip()]:
            if pod.deleted.is_set():
                return None
            word, _, rest = step.partition(" ")
            if word == "echo":
                self._log(pod, " ".join(shlex.split(rest)) + "\n")
            elif word == "sleep":
                if pod.deleted.wait(float(rest)):
                    return None
            elif word == "exit":
                return int(rest)
            elif word == "gate":
                with self.lock:
                    gate = self.gates.setdefault(rest, threading.Event())
                while not gate.wait(0.05):
                    if pod.deleted.is_set():
                        return None
            elif word == "fail-attempts":
                count, code = (int(x) for x in rest.split())
                if previous_failures < count:
                    self._log(pod, f"failing on purpose (pod {previous_failures + 1})\n")
                    return code
            else:
                self._log(pod, f"sh: {word}: not found\n")
                return 127
        return None if pod.deleted.is_set() else 0

    def _log(self, pod: FakePod, text: str) -> None:
        with self.lock:
            pod.log += text.encode()
            self.lock.notify_all()

    def _job_pod_finished(self, key: tuple[str, str], code: int) -> None:
        """The Job controller's reaction to a finished pod (lock held)."""
        job = self.jobs.get(key)
        if job is None:
            return
        status = job["status"]
        status["active"] = 0
        if code == 0:
            status["succeeded"] = status.get("succeeded", 0) + 1
            status["completionTime"] = _now()
            status["conditions"] = _conditions(("SuccessCriteriaMet", "Complete"), "CompletionsReached",
                                               "Reached expected number of succeeded pods")
            return
        status["failed"] = status.get("failed", 0) + 1
        if status["failed"] > job["spec"]["backoffLimit"]:
            status["conditions"] = _conditions(("FailureTarget", "Failed"), "BackoffLimitExceeded",
                                               "Job has reached the specified backoff limit")
            return
        self._start_pod(*key)

    def _delete_job(self, ns: str, name: str, policy: str) -> tuple[int, dict]:
        with self.lock:
            job = self.jobs.pop((ns, name), None)
            if job is None:
                return 404, _status(404, "NotFound", f'jobs.batch "{name}" not found')
            self.deletions.append((ns, name, policy))
            if policy in ("Background", "Foreground"):
                for key, pod in list(self.pods.items()):
                    if pod.job_key == (ns, name):
                        pod.deleted.set()
                        del self.pods[key]
            self.lock.notify_all()
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                         "details": {"name": name, "group": "batch", "kind": "jobs", "uid": job["metadata"]["uid"]}}

    def _list(self, kind: str, api_version: str, items: list[dict]) -> dict:
        return {"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": "1"},
                "items": json.loads(json.dumps(items))}

    def _pods_matching(self, ns: str | None, selector: str) -> list[dict]:
        wanted = dict(part.split("=", 1) for part in selector.split(",") if "=" in part) if selector else {}
        with self.lock:
            return [p.obj for (pns, _), p in self.pods.items() if (ns is None or pns == ns)
                    and all((p.obj["metadata"].get("labels") or {}).get(k) == v for k, v in wanted.items())]

    def _scale(self, ns: str, name: str) -> dict:
        replicas = self.deployments[(ns, name)]
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {"name": name, "namespace": ns, "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
                             "creationTimestamp": "2024-01-01T00:00:00Z", "resourceVersion": str(replicas + 1)},
                "spec": {"replicas": replicas}, "status": {"replicas": replicas, "selector": f"app={name}"}}

    # --- HTTP -----------------------------------------------------------------------------------------
    def _handler_class(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are separate writes: no delayed-ACK stalls

            def log_message(self, *args) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                fake.connections.add(self.connection)

            def finish(self) -> None:
                fake.connections.discard(self.connection)
                super().finish()

            def _send(self, code: int, body: dict | str, content_type: str = "application/json") -> None:
                data = (json.dumps(body) if isinstance(body, dict) else body).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"{}") if length else {}

            def _route(self, method: str) -> None:
                url = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                path = url.path.rstrip("/")
                fake.requests.append((method, path))
                if self.headers.get("Authorization") != f"Bearer {fake.token}":
                    self._body()
                    return self._send(401, _status(401, "Unauthorized", "Unauthorized"))
                try:
                    self._dispatch(method, path, query)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _dispatch(self, method: str, path: str, query: dict) -> None:
                m = re.fullmatch
                if method == "GET" and path == "/version":
                    return self._send(200, {"major": "1", "minor": "30", "gitVersion": "v1.30.0-fake",
                                            "gitCommit": "0" * 40, "gitTreeState": "clean",
                                            "buildDate": "2024-04-17T17:27:03Z", "goVersion": "go1.22.2",
                                            "compiler": "gc", "platform": "linux/amd64"})
                if method == "GET" and path == "/api/v1/nodes":
                    return self._send(200, fake._list("NodeList", "v1", fake.nodes))
                if method == "GET" and path == "/api/v1/pods":
                    pods = fake._pods_matching(None, query.get("labelSelector", ""))
                    # the one field selector Cortex sends: status.phase!=A,status.phase!=B
                    excluded = re.findall(r"status\.phase!=(\w+)", query.get("fieldSelector", ""))
                    pods = [p for p in pods if p["status"].get("phase") not in excluded]
                    return self._send(200, fake._list("PodList", "v1", pods))
                if r := m(r"/api/v1/namespaces/([^/]+)/pods", path):
                    if method == "GET":
                        return self._send(200, fake._list("PodList", "v1", fake._pods_matching(
                            r[1], query.get("labelSelector", ""))))
                if r := m(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)(/log)?", path):
                    pod = fake.pods.get((r[1], r[2]))
                    if pod is None:
                        return self._send(404, _status(404, "NotFound", f'pods "{r[2]}" not found'))
                    if not r[3]:
                        return self._send(200, pod.obj)
                    return self._log(pod, query.get("follow") == "true")
                if r := m(r"/apis/batch/v1/namespaces/([^/]+)/jobs", path):
                    if method == "POST":
                        return self._send(*fake._create_job(r[1], self._body()))
                    if method == "GET":
                        with fake.lock:
                            items = [j for (ns, _), j in fake.jobs.items() if ns == r[1]]
                            return self._send(200, fake._list("JobList", "batch/v1", items))
                if r := m(r"/apis/batch/v1/namespaces/([^/]+)/jobs/([^/]+)(/status)?", path):
                    if method == "GET":
                        with fake.lock:
                            job = fake.jobs.get((r[1], r[2]))
                            if job is None:
                                return self._send(404, _status(404, "NotFound", f'jobs.batch "{r[2]}" not found'))
                            return self._send(200, json.loads(json.dumps(job)))
                    if method == "DELETE":
                        body = self._body()
                        policy = query.get("propagationPolicy") or body.get("propagationPolicy") or "Orphan"
                        return self._send(*fake._delete_job(r[1], r[2], policy))
                if r := m(r"/apis/apps/v1/namespaces/([^/]+)/deployments", path):
                    with fake.lock:
                        items = [{"kind": "Deployment", "apiVersion": "apps/v1",
                                  "metadata": {"name": name, "namespace": ns},
                                  "spec": {"replicas": n, "selector": {"matchLabels": {"app": name}},
                                           "template": {"metadata": {"labels": {"app": name}},
                                                        "spec": {"containers": [{"name": "web", "image": "nginx"}]}}},
                                  "status": {"replicas": n, "readyReplicas": n}}
                                 for (ns, name), n in fake.deployments.items() if ns == r[1]]
                    return self._send(200, fake._list("DeploymentList", "apps/v1", items))
                if r := m(r"/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)/scale", path):
                    with fake.lock:
                        if (r[1], r[2]) not in fake.deployments:
                            self._body()
                            return self._send(404, _status(404, "NotFound",
                                                           f'deployments.apps "{r[2]}" not found'))
                        if method == "PATCH":
                            if "merge-patch" not in (self.headers.get("Content-Type") or ""):
                                return self._send(415, _status(415, "UnsupportedMediaType",
                                                               "the body of the request was in an unknown format"))
                            replicas = (self._body().get("spec") or {}).get("replicas")
                            if not isinstance(replicas, int) or replicas < 0:
                                return self._send(422, _status(422, "Invalid", "spec.replicas: must be >= 0"))
                            fake.deployments[(r[1], r[2])] = replicas
                        return self._send(200, fake._scale(r[1], r[2]))
                self._body()
                self._send(404, _status(404, "NotFound", "the server could not find the requested resource"))

            def _log(self, pod: FakePod, follow: bool) -> None:
                if not pod.started:
                    return self._send(400, _status(400, "BadRequest",
                                                   f'container "task" in pod "{pod.obj["metadata"]["name"]}" is '
                                                   f'waiting to start: ContainerCreating'))
                if not follow:
                    return self._send(200, bytes(pod.log).decode(), "text/plain")
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                sent = 0
                while True:
                    with fake.lock:
                        while (len(pod.log) == sent and not pod.finished and not pod.deleted.is_set()
                               and not fake.closing):
                            fake.lock.wait(1.0)
                        chunk, sent = bytes(pod.log[sent:]), len(pod.log)
                        ended = pod.finished or pod.deleted.is_set() or fake.closing
                    if chunk:
                        self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                        self.wfile.flush()
                    if ended:
                        break
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

            def do_DELETE(self) -> None:
                self._route("DELETE")

            def do_PATCH(self) -> None:
                self._route("PATCH")

        return Handler

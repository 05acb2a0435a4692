"""Kubernetes: kubeconfig discovery, the k8s_job executor, capacity, the plugin's tools and published record.

No Kubernetes API server can run here, so these tests drive the official `kubernetes` client library
against tests/fake_kube.py: a real HTTP server on 127.0.0.1 speaking the API's paths and JSON (bearer-token
auth, chunked log streaming, the Job controller's pod lifecycle and backoff). Kubeconfig files are written
per test and read through the same code paths a node uses.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml

from cortex.kube import spec as specs
from cortex.kube.capacity import fit_reason, parse_quantity, placements
from cortex.kube.executor import K8sJobExecutor
from cortex.kube.kubeconfig import discover, kubeconfig_paths
from cortex.kube.records import k8s_capacity, parse_records
from cortex.tasks.executor import Outcome, TaskRun, TaskSpecError
from tests.support.fake_kube import FakeKube
from tests.support.procs import python_without_home
from tests.support.wait import wait_until


@pytest.fixture
def fake():
    with FakeKube() as server:
        yield server


class Output:
    """TaskRun.emit that records what arrived, and when, and lets a test wait for a piece of text."""

    def __init__(self):
        self.chunks: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()

    def __call__(self, stream: str, data: bytes) -> None:
        with self._cond:
            self.chunks.append((stream, data))
            self._cond.notify_all()

    def text(self, stream: str = "stdout") -> str:
        with self._cond:
            return b"".join(d for s, d in self.chunks if s == stream).decode()

    def wait_for(self, needle: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while needle not in b"".join(d for s, d in self.chunks if s == "stdout").decode():
                left = deadline - time.monotonic()
                assert left > 0, f"{needle!r} never arrived; output so far: {self.chunks}"
                self._cond.wait(left)


class Attempt:
    """One executor run on a thread, as the task engine would run it."""

    def __init__(self, executor: K8sJobExecutor, spec: dict, tmp_path: Path, task_id: str = "t-1",
                 attempt: int = 1, timeout: float | None = None):
        self.output = Output()
        self.cancelled = threading.Event()
        self.run = TaskRun(task_id, attempt, executor.validate(spec), tmp_path, self.output, self.cancelled,
                           timeout=timeout)
        self.outcome: Outcome | None = None
        self._thread = threading.Thread(target=self._go, args=(executor,), daemon=True)
        self._thread.start()

    def _go(self, executor: K8sJobExecutor) -> None:
        self.outcome = executor.run(self.run)

    def running(self) -> bool:
        return self._thread.is_alive()

    def result(self, timeout: float = 60.0) -> Outcome:
        self._thread.join(timeout)
        assert self.outcome is not None, f"the attempt did not end within {timeout}s"
        return self.outcome


def executor_for(*paths: Path, api_grace: float = 30.0) -> K8sJobExecutor:
    return K8sJobExecutor(lambda: discover(list(paths)), poll_interval=0.05, api_grace=api_grace)


def script(text: str, **extra) -> dict:
    return {"image": "busybox:1.36", "command": ["sh", "-c", text], **extra}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- discovery -----------------------------------------------------------------------------------------

def _kubeconfig(path: Path, current: str | None, clusters: dict, users: dict, contexts: dict) -> Path:
    doc: dict = {"apiVersion": "v1", "kind": "Config",
                 "clusters": [{"name": n, "cluster": c} for n, c in clusters.items()],
                 "users": [{"name": n, "user": u} for n, u in users.items()],
                 "contexts": [{"name": n, "context": c} for n, c in contexts.items()]}
    if current is not None:
        doc["current-context"] = current
    path.write_text(yaml.safe_dump(doc))
    return path


def test_contexts_from_several_kubeconfig_files_merge_like_kubectl_without_running_plugins(tmp_path: Path):
    marker = tmp_path / "plugin-ran"
    plugin = tmp_path / "gke-gcloud-auth-plugin"
    plugin.write_text(f"#!/bin/sh\ntouch {marker}\n")
    plugin.chmod(0o755)
    a = _kubeconfig(tmp_path / "a.yaml", "alpha",
                    {"a": {"server": "https://a.example:6443"}, "shared": {"server": "https://first.example"}},
                    {"a-admin": {"token": "SECRET-A"}},
                    {"alpha": {"cluster": "a", "user": "a-admin"},
                     "shared": {"cluster": "shared", "user": "a-admin", "namespace": "team-a"}})
    b = _kubeconfig(tmp_path / "b.yaml", "beta",
                    {"b": {"server": "https://ops:PASSWORD@b.example:443/?x=1"},
                     "shared": {"server": "https://second.example"},
                     "gke_proj_europe-west1_main": {"server": "https://34.1.2.3"},
                     "default": {"server": "https://127.0.0.1:6443", "certificate-authority-data": "Q0E="}},
                    {"b-user": {"username": "ops", "password": "PASSWORD"},
                     "gke": {"exec": {"command": str(plugin), "args": ["--token-secret", "SECRET-ARG"],
                                      "apiVersion": "client.authentication.k8s.io/v1beta1",
                                      "env": [{"name": "CLOUDSDK_TOKEN", "value": "SECRET-ENV"}]}},
                     "legacy-gcp": {"auth-provider": {"name": "gcp", "config": {"access-token": "SECRET-OLD"}}},
                     "default": {"client-certificate-data": "Q0VSVA==", "client-key-data": "S0VZ"}},
                    {"beta": {"cluster": "b", "user": "b-user"},
                     "shared": {"cluster": "shared", "user": "b-user"},
                     "gke": {"cluster": "gke_proj_europe-west1_main", "user": "gke"},
                     "gke-legacy": {"cluster": "gke_proj_europe-west1_main", "user": "legacy-gcp"},
                     "default": {"cluster": "default", "user": "default"},
                     "broken": {"cluster": "nowhere", "user": "b-user"}})
    junk = tmp_path / "junk.yaml"
    junk.write_text("clusters: [unclosed\n")
    environ = {"KUBECONFIG": os.pathsep.join([str(a), "", str(b), str(junk), str(tmp_path / "absent"), str(a)])}
    paths = kubeconfig_paths(environ, tmp_path / "home")
    assert paths == [a, b, junk, tmp_path / "absent"]  # empty entries skipped, duplicates read once
    found = discover(paths)

    assert found.current == "alpha"  # from the first file that sets it
    assert [c.name for c in found.contexts] == ["alpha", "shared", "beta", "gke", "gke-legacy", "default"]
    shared = found.get("shared")
    assert (shared.server, shared.namespace, shared.source) == ("https://first.example", "team-a", str(a))
    assert found.get("beta").server == "https://b.example:443/"  # userinfo and query never published
    gke = found.get("gke")
    assert (gke.auth, gke.auth_plugin, gke.flavor) == ("exec", "gke-gcloud-auth-plugin", "gke")
    assert (found.get("gke-legacy").auth, found.get("gke-legacy").auth_plugin) == ("auth-provider", "gcp")
    k3s = found.get("default")
    assert (k3s.flavor, k3s.auth, k3s.namespace) == ("k3s", "client-cert", "default")
    assert found.get("alpha").auth == "token" and found.get("beta").auth == "basic"
    assert any("junk.yaml: cannot read" in p for p in found.problems)
    assert any("'broken' refers to cluster 'nowhere'" in p for p in found.problems)
    public = json.dumps(found.public())
    assert "SECRET" not in public and "PASSWORD" not in public and "Q0VSVA" not in public
    assert not marker.exists()  # discovery named the exec plugin, never ran it

    # without KUBECONFIG, ~/.kube/config; extra paths (k3s) come after
    home = tmp_path / "home"
    (home / ".kube").mkdir(parents=True)
    _kubeconfig(home / ".kube" / "config", "alpha", {"a": {"server": "https://a"}}, {}, {"alpha": {"cluster": "a"}})
    defaults = kubeconfig_paths({}, home, extra=[str(b)])
    assert defaults == [home / ".kube" / "config", b]
    assert [c.name for c in discover(defaults).contexts][:2] == ["alpha", "beta"]
    assert discover(kubeconfig_paths({}, tmp_path / "nobody")).contexts == ()


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a process as a user with no passwd entry: needs root")
def test_a_process_without_a_home_finds_no_default_kubeconfig_and_no_error(tmp_path: Path):
    # The appliance's agent is a DynamicUser without $HOME: Path.home() raises there, and every kubernetes
    # monitoring round failed with "Could not determine home directory" (seen in a VM's journal).
    code = ("from cortex.kube.kubeconfig import discover, kubeconfig_paths; from cortex.userdirs import user_home; "
            "home = user_home(); paths = kubeconfig_paths({}, home, ['/nonexistent/k3s.yaml']); "
            "print(home, [str(p) for p in paths], discover(paths).contexts)")
    done = python_without_home(code, unset=("KUBECONFIG",))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None ['/nonexistent/k3s.yaml'] ()"


def test_the_client_library_picks_the_same_definition_as_discovery(tmp_path: Path):
    from kubernetes import client as k8s

    from cortex.kube.client import connect

    with FakeKube(token="token-a", name="a") as first, FakeKube(token="token-b", name="b") as second:
        a = first.kubeconfig(tmp_path / "a.yaml", "shared", cluster="shared", user="u")
        b_doc = yaml.safe_load(second.kubeconfig(tmp_path / "b.yaml", "shared", cluster="shared", user="u").read_text())
        b_doc["contexts"].append({"name": "only-b", "context": {"cluster": "b-only", "user": "b-user"}})
        b_doc["clusters"].append({"name": "b-only", "cluster": {"server": second.url}})
        b_doc["users"].append({"name": "b-user", "user": {"token": "token-b"}})
        (tmp_path / "b.yaml").write_text(yaml.safe_dump(b_doc))
        found = discover([a, tmp_path / "b.yaml"])
        assert found.get("shared").server == first.url
        with connect(found, "shared") as kube:
            assert k8s.VersionApi(kube.api).get_code().git_version == "v1.30.0-fake"
        with connect(found, "only-b") as kube:
            k8s.VersionApi(kube.api).get_code()
        assert first.requests == [("GET", "/version")] and second.requests == [("GET", "/version")]


# --- the k8s_job executor --------------------------------------------------------------------------------

def test_a_job_succeeds_and_its_logs_arrive_while_it_runs(fake: FakeKube, tmp_path: Path):
    executor = executor_for(fake.kubeconfig(tmp_path / "config", "dev"))
    assert executor.available() == ""
    run = Attempt(executor, script("echo first line; gate go; echo second line", namespace="batch",
                                   resources={"cpu": "250m", "memory": "64Mi"}, env={"MODE": "fast"},
                                   ttl_seconds_after_finished=600), tmp_path, task_id="Task_42")
    run.output.wait_for("first line")
    name = specs.job_name("Task_42", 1)
    assert run.running() and "second line" not in run.output.text()  # streamed before the Job ended
    assert "conditions" not in fake.jobs[("batch", name)]["status"]
    fake.release("go")
    outcome = run.result()
    assert outcome.ok and outcome.exit_code == 0, outcome
    assert run.output.text() == "first line\nsecond line\n"
    assert outcome.result == {"job": name, "namespace": "batch", "succeeded": 1, "failed": 0, "pods": 1}
    job = fake.jobs[("batch", name)]
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["ttlSecondsAfterFinished"] == 600
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {"requests": {"cpu": "250m", "memory": "64Mi"}, "limits": {"memory": "64Mi"}}
    assert container["env"] == [{"name": "MODE", "value": "fast"}]
    assert job["metadata"]["labels"][specs.TASK_LABEL] == "Task_42"
    assert "created Job batch/cortex-task-42-1" in run.output.text("stderr")


def test_a_failing_job_is_retried_per_backoff_limit_then_fails_with_the_exit_code(fake: FakeKube, tmp_path: Path):
    executor = executor_for(fake.kubeconfig(tmp_path / "config", "dev"))
    failing = Attempt(executor, script("echo trying; exit 3", backoff_limit=2), tmp_path, task_id="fails")
    outcome = failing.result()
    assert not outcome.ok and outcome.exit_code == 3 and outcome.retryable
    assert "BackoffLimitExceeded" in outcome.error and "after 3 failed pod(s)" in outcome.error
    assert len(fake.job_pods("default", specs.job_name("fails", 1))) == 3
    assert failing.output.text() == "trying\n" * 3  # every pod's log, in order

    flaky = Attempt(executor, script("fail-attempts 2 4; echo done", backoff_limit=2), tmp_path, task_id="flaky")
    outcome = flaky.result()
    assert outcome.ok and outcome.result["failed"] == 2 and outcome.result["succeeded"] == 1
    assert flaky.output.text().endswith("done\n") and "pod attempt 3" in flaky.output.text("stderr")


def test_cancel_and_timeout_delete_the_job_in_the_background(fake: FakeKube, tmp_path: Path):
    executor = executor_for(fake.kubeconfig(tmp_path / "config", "dev"))
    run = Attempt(executor, script("echo started; gate never"), tmp_path, task_id="cancel-me")
    run.output.wait_for("started")
    run.cancelled.set()
    outcome = run.result()
    name = specs.job_name("cancel-me", 1)
    assert outcome.exit_code is None and outcome.error == f"cancelled; Job default/{name} deleted"
    assert fake.deletions == [("default", name, "Background")]
    assert fake.job_pods("default", name) == [] and ("default", name) not in fake.jobs

    slow = Attempt(executor, script("echo slow; gate never"), tmp_path, task_id="slow", timeout=1.0)
    outcome = slow.result()
    name = specs.job_name("slow", 1)
    assert outcome.error.startswith("timed out after 1 s") and outcome.retryable
    assert fake.deletions[-1] == ("default", name, "Background")
    assert slow.output.text() == "slow\n"


def test_an_unreachable_cluster_is_a_clear_retryable_error(tmp_path: Path):
    port = closed_port()
    config = _kubeconfig(tmp_path / "config", "gone", {"gone": {"server": f"http://127.0.0.1:{port}"}},
                         {"u": {"token": "x"}}, {"gone": {"cluster": "gone", "user": "u"}})
    executor = executor_for(config)
    outcome = Attempt(executor, script("echo hi"), tmp_path).result()
    assert outcome.exit_code is None and outcome.retryable
    assert f"cannot reach context 'gone' (http://127.0.0.1:{port})" in outcome.error
    assert "connection refused" in outcome.error and "retried per its policy" in outcome.error

    from cortex.kube.client import measure

    capacity = measure(discover([config]), "gone")
    assert capacity.nodes == () and "cannot reach" in capacity.error


def test_a_cluster_lost_while_its_job_runs_ends_the_attempt_retryable(tmp_path: Path):
    fake = FakeKube()
    with fake:
        executor = executor_for(fake.kubeconfig(tmp_path / "config", "dev"), api_grace=0.5)
        run = Attempt(executor, script("echo working; gate never"), tmp_path, task_id="lost")
        run.output.wait_for("working")
    # the API server is gone mid-job: the attempt gives up after the grace period, retryable
    outcome = run.result()
    assert outcome.retryable and outcome.exit_code is None
    assert "cannot reach context 'dev'" in outcome.error and "(for 0.5 s while the Job ran)" in outcome.error
    assert "the Job could not be deleted" in outcome.error and "wait for its deadline" in outcome.error


def test_bad_specs_unknown_contexts_and_refused_credentials(fake: FakeKube, tmp_path: Path):
    executor = executor_for(fake.kubeconfig(tmp_path / "config", "dev"))
    bad = [({"image": 7}, "image must be a non-empty image reference"),
           ({"image": "busy box"}, "without spaces"),
           ({"image": "busybox", "command": "echo hi"}, "command must be a list of strings"),
           ({"image": "busybox", "args": [1]}, "args must be a list of strings"),
           ({"image": "busybox", "namespace": "Batch_Jobs"}, "not a valid Kubernetes namespace"),
           ({"image": "busybox", "namespace": "x" * 64}, "not a valid Kubernetes namespace"),
           ({"image": "busybox", "resources": {"cpu": "lots"}}, "resources.cpu: 'lots' is not a Kubernetes quantity"),
           ({"image": "busybox", "resources": {"disk": "1Gi"}}, "resources takes 'cpu'"),
           ({"image": "busybox", "backoff_limit": -1}, "backoff_limit must be an integer from 0 to 100"),
           ({"image": "busybox", "env": {"1 bad": "x"}}, "env must map variable names"),
           ({"image": "busybox", "imag": "typo"}, "unknown k8s_job field(s) imag"),
           ("busybox", "a k8s_job spec is a JSON object")]
    for spec, message in bad:
        with pytest.raises(TaskSpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
            executor.validate(spec)

    outcome = Attempt(executor, script("echo hi", context="prod"), tmp_path).result()
    assert "this node has no kubeconfig context 'prod'; contexts here: dev" in outcome.error
    assert fake.requests == []  # nothing was sent anywhere

    missing_ns = Attempt(executor, script("echo hi", namespace="nope"), tmp_path).result()
    assert 'namespaces "nope" not found (HTTP 404)' in missing_ns.error and not missing_ns.retryable

    refused = executor_for(fake.kubeconfig(tmp_path / "stale", "dev", token="expired"))
    outcome = Attempt(refused, script("echo hi"), tmp_path).result()
    assert "HTTP 401 Unauthorized; the credentials were refused" in outcome.error and not outcome.retryable

    pull = Attempt(executor, script("echo hi", image="missing/app:1", image_pull_timeout=1), tmp_path,
                   task_id="pull").result()
    assert "image 'missing/app:1' cannot be pulled (ImagePullBackOff" in pull.error and not pull.retryable
    assert fake.deletions[-1] == ("default", specs.job_name("pull", 1), "Background")


def test_running_an_attempt_again_adopts_its_job_instead_of_creating_another(fake: FakeKube, tmp_path: Path):
    executor = executor_for(fake.kubeconfig(tmp_path / "config", "dev"))
    assert Attempt(executor, script("echo once"), tmp_path, task_id="again").result().ok
    again = Attempt(executor, script("echo once"), tmp_path, task_id="again").result()
    assert again.ok and len(fake.job_pods("default", specs.job_name("again", 1))) == 1
    assert [r for r in fake.requests if r[0] == "POST"] == [("POST", "/apis/batch/v1/namespaces/default/jobs")] * 2

    # a Job of that name that some other task made is left alone
    job = fake.jobs[("default", specs.job_name("again", 1))]
    job["metadata"]["labels"][specs.TASK_LABEL] = "someone-else"
    clash = Attempt(executor, script("echo once"), tmp_path, task_id="again").result()
    assert "already exists and was not created for task again attempt 1" in clash.error and not clash.retryable


def test_job_names_are_stable_valid_labels():
    assert specs.job_name("Task_42", 3) == "cortex-task-42-3"
    long = specs.job_name("x" * 300, 12)
    assert len(long) <= 63 and specs.DNS1123_LABEL.match(long) and long.endswith("-12")
    assert long != specs.job_name("x" * 299 + "y", 12)


# --- capacity and placement ------------------------------------------------------------------------------

def test_capacity_counts_allocatable_against_requests_and_placement_uses_it(fake: FakeKube, tmp_path: Path):
    from cortex.kube.client import measure

    assert parse_quantity("1.5Gi") == 1536 * 2**20 and parse_quantity("250m") * 1000 == 250
    assert parse_quantity("1e3") == 1000 and parse_quantity("2k") == 2000
    config = fake.kubeconfig(tmp_path / "config", "dev")
    executor = executor_for(config)
    run = Attempt(executor, script("echo up; gate hold", resources={"cpu": "1500m", "memory": "1Gi"}), tmp_path)
    run.output.wait_for("up")
    capacity = measure(discover([config]), "dev")
    fake.release("hold")
    assert run.result().ok
    summary = capacity.summary()
    assert summary["nodes"] == 2 and summary["ready_nodes"] == 2
    assert summary["cpu_allocatable_m"] == 6000 and summary["cpu_requested_m"] == 1600  # coredns + the job
    assert summary["memory_requested"] == 70 * 2**20 + 2**30
    assert summary["cpu_free_m"] == 4400 and summary["node_free"][0] == [2400, 8 * 2**30 - 70 * 2**20 - 2**30]
    assert capacity.detail()["pods_per_namespace"] == {"default": 1, "kube-system": 1}
    after = measure(discover([config]), "dev")  # the finished job's pod holds nothing any more
    assert after.summary()["cpu_requested_m"] == 100

    records = parse_records([
        {"value": json.dumps({"node_id": "n1", "contexts": [{"name": "dev", "server": fake.url}],
                              "capacity": [after.summary()]})},
        {"value": json.dumps({"node_id": "n2", "contexts": [{"name": "edge"}],
                              "capacity": [{"context": "edge", "cpu_free_m": 500, "memory_free": 2**30,
                                            "node_free": [[500, 2**30]]}]})},
        {"value": "not json"}])
    fits = placements(records, cpu_m=400, memory=512 * 2**20)
    assert [(p.node_id, p.context) for p in fits] == [("n1", "dev"), ("n2", "edge")]  # most free first
    assert [(p.node_id, p.context) for p in placements(records, cpu_m=3000)] == [("n1", "dev")]
    assert placements(records, cpu_m=5000) == []  # 5 cores free in total, but no k8s node has them
    assert [p.context for p in placements(records, context="edge")] == ["edge"]
    assert placements(records, live_nodes=["n3"]) == []
    assert {(r["node_id"], r["context"], r["cpu_free_m"]) for r in k8s_capacity(records)} == \
        {("n1", "dev", 5900), ("n2", "edge", 500)}

    # the scheduler's filter for one k8s_job task on one Cortex node
    job = specs.validate({"image": "busybox", "context": "dev", "resources": {"cpu": "2", "memory": "1Gi"}})
    assert fit_reason(records, "n1", job) == ""
    assert fit_reason(records, "n2", job) == "has no Kubernetes context 'dev'"
    assert fit_reason(records, "n3", job) == "has no Kubernetes context"
    big = {**job, "resources": {"cpu": "5"}}
    assert fit_reason(records, "n1", big) == ("context 'dev' has no Kubernetes node with 5000m CPU and 0 MiB "
                                              "free (5900m, 12218 MiB free in total)")
    unmeasured = [{"node_id": "n1", "contexts": [{"name": "dev"}], "capacity": [{"context": "dev",
                                                                                 "error": "cannot reach"}]}]
    assert fit_reason(unmeasured, "n1", job) == "context 'dev': cannot reach"


# --- the plugin: tools, resource, the record it publishes ------------------------------------------------

@pytest.fixture
def plugin_host(fake: FakeKube, tmp_path: Path, monkeypatch):
    from cortex import config
    from cortex.core.events import EventBus
    from cortex.plugins import PluginHost

    monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig(tmp_path / "config", "dev")))
    cfg = config.parse("node:\n  id: n1\nplugins:\n  kubernetes:\n    poll_interval: 3600\n", source="node.yaml")
    host = PluginHost(cfg.plugins, cluster=None, events=EventBus(), data_dir=tmp_path, source=cfg.source)
    host.load()
    host.start()
    yield host
    host.stop()


def test_plugin_tools_submit_watch_log_delete_and_scale(plugin_host, fake: FakeKube):
    from cortex.plugins import Caller, ToolError

    assert {p["name"]: p["state"] for p in plugin_host.status()}["kubernetes"] == "running"
    operator, reader = Caller(role="operator"), Caller(role="reader")
    call = plugin_host.call_tool
    listed = call("k8s_list_clusters", {}, reader)["contexts"]
    assert [(c["name"], c["server"], c["namespace"], c["current"]) for c in listed] == \
        [("dev", fake.url, "default", True)]

    submitted = call("k8s_submit_job", {"image": "busybox", "command": ["sh", "-c", "echo via tool; gate t"],
                                        "id": "report-1"}, operator)
    assert submitted == {"context": "dev", "namespace": "default", "job": "cortex-report-1-1", "created": True}
    again = call("k8s_submit_job", {"image": "busybox", "command": ["sh", "-c", "echo via tool; gate t"],
                                    "id": "report-1"}, operator)
    assert again["created"] is False and len(fake.jobs) == 1  # the same id is the same Job
    with pytest.raises(ToolError, match="needs the 'operator' role"):
        call("k8s_submit_job", {"image": "busybox"}, reader)
    with pytest.raises(ToolError, match="invalid arguments at command: \"echo\" is not of type 'array'"):
        call("k8s_submit_job", {"image": "busybox", "command": "echo"}, operator)
    with pytest.raises(ToolError, match="k8s_submit_job: namespace 'Batch' is not a valid Kubernetes namespace"):
        call("k8s_submit_job", {"image": "busybox", "namespace": "Batch"}, operator)
    with pytest.raises(ToolError, match="no kubeconfig context 'prod' on this node"):
        call("k8s_submit_job", {"image": "busybox", "context": "prod"}, operator)

    budget_from = time.monotonic()  # 30 s for the log and the finish together
    wait_until(lambda: "via tool" in json.dumps(call("k8s_job_logs", {"job": "cortex-report-1-1"}, reader)), 30,
               "the pod to log")
    status = call("k8s_job_status", {"job": "cortex-report-1-1"}, reader)
    assert status["state"] == "running" and status["pods"][0]["phase"] == "Running"
    fake.release("t")
    wait_until(lambda: call("k8s_job_status", {"job": "cortex-report-1-1"}, reader)["state"] != "running",
               30 - (time.monotonic() - budget_from), "the released job to finish")
    status = call("k8s_job_status", {"job": "cortex-report-1-1"}, reader)
    assert status["state"] == "succeeded" and status["pods"][0]["exit_code"] == 0
    assert call("k8s_delete_job", {"job": "cortex-report-1-1"}, operator)["deleted"] is True
    assert call("k8s_delete_job", {"job": "cortex-report-1-1"}, operator)["deleted"] is False  # idempotent
    assert fake.deletions == [("default", "cortex-report-1-1", "Background")]
    with pytest.raises(ToolError, match="not a valid Kubernetes namespace"):
        call("k8s_job_status", {"job": "x", "namespace": "Not_Valid"}, reader)
    with pytest.raises(ToolError, match='jobs.batch "x" not found'):
        call("k8s_job_status", {"job": "x"}, reader)

    scaled = call("k8s_scale_deployment", {"name": "web", "replicas": 5}, operator)
    assert (scaled["previous"], scaled["replicas"]) == (2, 5) and fake.deployments[("default", "web")] == 5
    with pytest.raises(ToolError, match='deployments.apps "api" not found'):
        call("k8s_scale_deployment", {"name": "api", "replicas": 1}, operator)
    with pytest.raises(ToolError, match="invalid arguments at replicas"):
        call("k8s_scale_deployment", {"name": "web", "replicas": -1}, operator)

    resources = call("k8s_get_resources", {}, reader)["contexts"]
    assert resources[0]["context"] == "dev" and resources[0]["cpu_allocatable_m"] == 6000
    assert resources[0]["pods_per_namespace"] == {"kube-system": 1}
    document = plugin_host.resources()["cluster://k8s"].read()
    assert document["capacity"][0]["context"] == "dev" and document["capacity"][0]["cpu_free_m"] == 5900
    assert "fake-token" not in json.dumps(document)  # no credential in what the cluster can see
    # the task engine on the same node offers k8s_job through the cortex.executors entry point
    executors = plugin_host.plugins["tasks"].plugin.executors
    assert executors["k8s_job"].kind == "k8s_job" and executors["k8s_job"].available() == ""


def test_each_node_publishes_its_contexts_and_capacity_to_the_replicated_store(make_cluster, fake: FakeKube,
                                                                                tmp_path: Path, monkeypatch,
                                                                                capsys):
    """Real agent processes: the plugin on the node finds the kubeconfig in its environment and writes a
    secret-free record the leader's scheduler can place k8s_job tasks with."""
    from cortex.kube.records import RECORD_PREFIX, read_records

    monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig(tmp_path / "kubeconfig", "lab")))
    cluster = make_cluster(servers=1)
    node = cluster.nodes[0].id
    with cluster.client(node) as c:
        records = wait_until(lambda: read_records(lambda q, a: c.read(q, a, level="leader")), 60,
                             f"a record under {RECORD_PREFIX}; logs: {cluster.dc.dir}", interval=0.2)
        raw = c.read("kv.list", {"prefix": RECORD_PREFIX}, level="leader")
    assert [r["node_id"] for r in records] == [node]
    assert [(x["name"], x["server"]) for x in records[0]["contexts"]] == [("lab", fake.url)]
    assert "fake-token" not in json.dumps(raw)
    fits = placements(records, cpu_m=1000, memory=2**30)
    assert [(p.node_id, p.context) for p in fits] == [(node, "lab")]

    from cortex import cli

    addr = ["--addr", cluster.node(node).grpc_address]
    assert cli.main(["k8s", "contexts", *addr]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["NODE", "CURRENT", "NAME", "SERVER", "NAMESPACE", "AUTH", "FLAVOR"]
    assert out.splitlines()[1].split() == [node, "*", "lab", fake.url, "default", "token", "kubernetes"]
    assert cli.main(["k8s", "capacity", "--cpu", "3", "--memory", "1Gi", "--json", *addr]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["capacity"][0]["cpu_free_m"] == 5900 and shown["fits"] == [[node, "lab"]]
    assert cli.main(["k8s", "capacity", "--cpu", "5", *addr]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:6] == [node, "lab", "2", "5900m", "11.9Gi", "no"]

    # the task engine places a k8s_job by the context's capacity (the node's own CPUs do not matter) and runs it
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"kind": "k8s_job", "spec": {
        "image": "busybox", "command": ["sh", "-c", "echo hello from the lab cluster"],
        "resources": {"cpu": "1", "memory": "256Mi"}}}))
    assert cli.main(["tasks", "submit", "-f", str(job), "--wait", "--json", *addr]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["summary"]["all_succeeded"] and done["results"][0]["node"] == node
    assert "hello from the lab cluster" in done["results"][0]["stdout"]
    job.write_text(json.dumps({"kind": "k8s_job", "spec": {"image": "busybox", "command": ["sh", "-c", "echo"],
                                                            "resources": {"cpu": "64", "memory": "1Gi"}}}))
    assert cli.main(["tasks", "submit", "-f", str(job), "--json", *addr]) == 0
    (big,) = json.loads(capsys.readouterr().out)["task_ids"]
    time.sleep(2)  # a few scheduler passes
    assert cli.main(["tasks", "show", big, "--json", *addr]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == "queued"
    assert "has no Kubernetes node with 64000m CPU" in shown["placement_now"][node]


# --- exec credentials (gke-gcloud-auth-plugin, aws eks get-token) ------------------------------------------------
# A stand-in plugin (tests/cluster/fixtures/kube_exec/cortex-test-auth) prints a real ExecCredential; the fake API
# server accepts only the token it hands out.

AUTH_PLUGIN = Path(__file__).parent / "fixtures" / "kube_exec" / "cortex-test-auth"


def exec_kubeconfig(path: Path, server: str, context: str, args: list[str], log: Path, command: str = "",
                    api_version: str = "client.authentication.k8s.io/v1", **extra) -> Path:
    user = {"exec": {"apiVersion": api_version, "command": command or str(AUTH_PLUGIN), "args": args,
                     "env": [{"name": "STANDIN_LOG", "value": str(log)}, {"name": "STANDIN_REGION", "value": "eu"}],
                     "interactiveMode": "Never", "provideClusterInfo": True, **extra}}
    return _kubeconfig(path, context, {f"{context}-cluster": {"server": server}}, {f"{context}-user": user},
                       {context: {"cluster": f"{context}-cluster", "user": f"{context}-user"}})


def runs(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_exec_credentials_run_at_job_time_and_are_cached_until_they_expire(tmp_path: Path):
    from kubernetes import client as k8s

    from cortex.kube.client import connect

    log = tmp_path / "plugin.log"
    with FakeKube(token="exec-token-1") as fake:
        config = exec_kubeconfig(tmp_path / "config", fake.url, "gke", ["--token", "exec-token-1", "--expires-in",
                                                                         "3600"], log)
        found = discover([config])
        assert (found.get("gke").auth, found.get("gke").auth_plugin) == ("exec", "cortex-test-auth")
        assert runs(log) == []  # discovery names the plugin and never runs it
        executor = executor_for(config)
        for task in ("t-exec-1", "t-exec-2"):
            outcome = Attempt(executor, script("echo authenticated"), tmp_path, task_id=task).result()
            assert outcome.ok, outcome
        [ran] = runs(log)  # two jobs, one plugin run: the credential is good for an hour
        assert ran["argv"] == ["--token", "exec-token-1", "--expires-in", "3600"]
        assert ran["env"]["STANDIN_REGION"] == "eu"
        assert ran["info"]["apiVersion"] == "client.authentication.k8s.io/v1"
        assert ran["info"]["spec"]["cluster"]["server"] == fake.url  # provideClusterInfo

        # a credential about to expire is fetched anew for the next connection
        soon = exec_kubeconfig(tmp_path / "soon", fake.url, "eks", ["--token", "exec-token-1", "--expires-in", "5"],
                               tmp_path / "soon.log", api_version="client.authentication.k8s.io/v1beta1")
        for _ in range(2):
            with connect(discover([soon]), "eks") as kube:
                assert k8s.VersionApi(kube.api).get_code().git_version == "v1.30.0-fake"
        assert len(runs(tmp_path / "soon.log")) == 2

        # a token the API server refuses is dropped: the attempt after the 401 asks the plugin again
        wrong = exec_kubeconfig(tmp_path / "wrong", fake.url, "old", ["--token", "stale"], tmp_path / "wrong.log")
        for _ in range(2):
            outcome = Attempt(executor_for(wrong), script("true"), tmp_path, task_id="t-stale").result()
            assert not outcome.ok and "HTTP 401" in outcome.error and "cortex-test-auth" in outcome.error, outcome
        assert len(runs(tmp_path / "wrong.log")) == 2


def test_exec_credential_failures_say_what_to_do(tmp_path: Path):
    from cortex.kube.client import KubeError, connect

    log = tmp_path / "plugin.log"
    missing = exec_kubeconfig(tmp_path / "missing", "http://127.0.0.1:9", "gke", [], log,
                              command="gke-gcloud-auth-plugin-not-here",
                              installHint="Install gke-gcloud-auth-plugin for use with kubectl by following "
                                          "https://cloud.google.com/kubernetes-engine/docs/how-to/cluster-access")
    with pytest.raises(KubeError, match="'gke-gcloud-auth-plugin-not-here' is not installed on this node .*: Install "
                                        "gke-gcloud-auth-plugin for use with kubectl") as refused:
        connect(discover([missing]), "gke")
    assert refused.value.retryable is False and "context 'gke'" in str(refused.value)
    failing = exec_kubeconfig(tmp_path / "failing", "http://127.0.0.1:9", "eks", ["--fail", "ExpiredToken: log in"],
                              log)
    with pytest.raises(KubeError, match="cortex-test-auth exited with 1: ExpiredToken: log in"):
        connect(discover([failing]), "eks")
    old = exec_kubeconfig(tmp_path / "old", "http://127.0.0.1:9", "old", ["--token", "x"], log,
                          api_version="client.authentication.k8s.io/v1alpha1")
    with pytest.raises(KubeError, match="v1alpha1' is not supported"):
        connect(discover([old]), "old")
    assert len(runs(log)) == 1  # only the failing plugin ran; nothing was run for the missing or unsupported ones


def test_an_exec_client_certificate_reaches_the_client_library(tmp_path: Path):
    from cortex.kube.client import connect

    cert = "-----BEGIN CERTIFICATE-----\nMIIBstand-in\n-----END CERTIFICATE-----\n"
    key = "-----BEGIN EC PRIVATE KEY-----\nMHcstand-in\n-----END EC PRIVATE KEY-----\n"
    (tmp_path / "c.pem").write_text(cert)
    (tmp_path / "k.pem").write_text(key)
    config = exec_kubeconfig(tmp_path / "config", "https://127.0.0.1:9", "aks", ["--cert", str(tmp_path / "c.pem"),
                                                                                   "--key", str(tmp_path / "k.pem")],
                             tmp_path / "plugin.log")
    with connect(discover([config]), "aks") as kube:
        configuration = kube.api.configuration
        assert Path(configuration.cert_file).read_text() == cert and Path(configuration.key_file).read_text() == key
        assert not configuration.api_key  # no token: the certificate is the credential

"""The `k8s_job` executor: one task attempt as one batch/v1 Job on a kubeconfig context of this node.

An attempt creates the Job (its name is derived from task id and attempt, so a re-run of the same attempt
adopts the Job it already created instead of starting a second one), follows the logs of each of its pods
into the task output as they are written, and polls the Job until it completes or fails. Cancel and timeout
delete the Job with propagation Background, so the cluster removes its pods too. A pod that cannot pull its
image never fails by itself (Kubernetes keeps backing off), so the executor gives up on it after the spec's
`image_pull_timeout` and says so, without retry.

How an attempt ends (Outcome):
  Job condition Complete                  -> exit 0
  Job condition Failed (BackoffLimitExceeded, DeadlineExceeded, ...) -> last pod's exit code, retryable
  image cannot be pulled / invalid         -> not retryable (retrying cannot fix the image name)
  cancelled / timed out                    -> Job deleted, retryable (the engine knows when it cancelled)
  API server unreachable or 5xx            -> retryable; the Job is deleted when it can still be reached
  401/403/404/422 from the API             -> not retryable, with the server's message
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from kubernetes import client as k8s

from cortex.kube import spec as specs
from cortex.kube.client import CONNECT_TIMEOUT, READ_TIMEOUT, Kube, KubeError, connect, explain, resolve
from cortex.kube.kubeconfig import Discovery
from cortex.tasks.executor import Outcome, TaskRun

IMAGE_PULL_WAITING = ("ErrImagePull", "ImagePullBackOff")
PERMANENT_WAITING = ("InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError")
API_GRACE = 30.0  # seconds of consecutive API failures tolerated while a Job runs before giving up
LOG_DRAIN = 10.0  # seconds to wait for the last log bytes after the Job finished


@dataclass
class _Pod:
    name: str
    follower: threading.Thread | None = None
    response: object = None  # the open urllib3 response while following
    done: bool = False  # the log stream ended after the container finished
    pull_since: float | None = None  # monotonic time the pod was first seen stuck pulling its image


@dataclass
class JobAttempt:
    """One attempt in flight: the API client, the Job's name, and the pods whose logs are followed."""

    kube: Kube
    run: TaskRun
    spec: dict
    namespace: str
    name: str
    poll_interval: float
    api_grace: float = API_GRACE
    pods: dict[str, _Pod] = field(default_factory=dict)
    created_pods: int = 0

    def note(self, text: str) -> None:
        self.run.emit("stderr", f"k8s: {text}\n".encode())

    # --- the attempt ----------------------------------------------------------------------------------
    def execute(self) -> Outcome:
        started = time.monotonic()
        try:
            self._create()
        except KubeError as exc:
            return Outcome(None, str(exc), retryable=exc.retryable)
        failing_since: float | None = None
        while True:
            if self.run.cancelled.is_set():
                return self._stop("cancelled")
            if self.run.timeout is not None and time.monotonic() - started > self.run.timeout:
                return self._stop(f"timed out after {self.run.timeout:g} s")
            try:
                outcome = self._poll()
                failing_since = None
            except KubeError as exc:
                if not exc.retryable:
                    return self._stop(str(exc), retryable=False)
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > self.api_grace:
                    return self._stop(f"{exc} (for {self.api_grace:g} s while the Job ran)")
                outcome = None
            if outcome is not None:
                self._drain_logs()
                return outcome
            self.run.cancelled.wait(self.poll_interval)

    def _create(self) -> None:
        manifest = specs.job_manifest(self.spec, self.name, self.namespace, self.run.task_id, self.run.attempt,
                                      self.run.timeout)
        try:
            self.kube.batch.create_namespaced_job(self.namespace, k8s.V1Job.from_dict(manifest),
                                                  _request_timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
            self.note(f"created Job {self.namespace}/{self.name} on context {self.kube.context.name}")
        except k8s.ApiException as exc:
            if exc.status != 409:
                raise explain(exc, self.kube.context, f"creating Job {self.namespace}/{self.name}") from None
            self._adopt()
        except Exception as exc:
            raise explain(exc, self.kube.context, f"creating Job {self.namespace}/{self.name}") from None

    def _adopt(self) -> None:
        """The Job exists: ours from an earlier run of this same attempt, or a stranger's name clash."""
        try:
            job = self.kube.batch.read_namespaced_job(self.name, self.namespace,
                                                      _request_timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
        except Exception as exc:
            raise explain(exc, self.kube.context, f"reading Job {self.namespace}/{self.name}") from None
        labels = (job.metadata.labels or {}) if job.metadata else {}
        if labels.get(specs.TASK_LABEL) != specs.label_value(self.run.task_id) or \
                labels.get(specs.ATTEMPT_LABEL) != str(self.run.attempt):
            raise KubeError(f"a Job {self.namespace}/{self.name} already exists and was not created for task "
                            f"{self.run.task_id} attempt {self.run.attempt}; delete it or use another namespace",
                            retryable=False, status=409, reason="AlreadyExists")
        self.note(f"Job {self.namespace}/{self.name} already exists for this attempt; following it")

    def _poll(self) -> Outcome | None:
        ctx = self.kube.context
        try:
            # The Job first, then its pods: once the Job is finished no pod is added, so the list read after
            # it holds every pod whose log and exit code belong to this attempt.
            job = self.kube.batch.read_namespaced_job_status(self.name, self.namespace,
                                                             _request_timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
            pods = self.kube.core.list_namespaced_pod(self.namespace, label_selector=f"job-name={self.name}",
                                                      _request_timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)).items
        except k8s.ApiException as exc:
            if exc.status == 404:
                raise KubeError(f"Job {self.namespace}/{self.name} disappeared from context {ctx.name!r} while "
                                f"running (deleted by someone else?)", retryable=True, status=404) from None
            raise explain(exc, ctx, f"watching Job {self.namespace}/{self.name}") from None
        except Exception as exc:
            raise explain(exc, ctx, f"watching Job {self.namespace}/{self.name}") from None
        for pod in sorted(pods, key=lambda p: (p.metadata.creation_timestamp or 0, p.metadata.name)):
            stuck = self._watch_pod(pod)
            if stuck is not None:
                return stuck
        return job_outcome(job, pods, self.namespace, self.name)

    def _watch_pod(self, pod: k8s.V1Pod) -> Outcome | None:
        name = pod.metadata.name
        state = self.pods.get(name)
        if state is None:
            state = self.pods[name] = _Pod(name)
            self.created_pods += 1
            if self.created_pods > 1:
                self.note(f"pod {name} started (pod attempt {self.created_pods})")
        waiting = _waiting(pod)
        if waiting is not None:
            reason, message = waiting
            if reason in PERMANENT_WAITING:
                return self._stop(f"pod {name} cannot start: {reason}: {message}", retryable=False)
            if reason in IMAGE_PULL_WAITING:
                state.pull_since = state.pull_since or time.monotonic()
                if time.monotonic() - state.pull_since > self.spec["image_pull_timeout"]:
                    return self._stop(f"image {self.spec['image']!r} cannot be pulled ({reason}: {message}); "
                                      f"check the name and the registry's credentials", retryable=False)
            return None
        phase = pod.status.phase if pod.status else ""
        if phase in ("Running", "Succeeded", "Failed") and state.follower is None and not state.done:
            state.follower = threading.Thread(target=self._follow, args=(state,), daemon=True,
                                              name=f"k8s-log-{name}")
            state.follower.start()
        return None

    def _follow(self, state: _Pod) -> None:
        """Copy a pod's log into the task output as it is written, until the container ends."""
        try:
            response = self.kube.core.read_namespaced_pod_log(
                state.name, self.namespace, container=specs.CONTAINER, follow=True, _preload_content=False,
                _request_timeout=(CONNECT_TIMEOUT, 24 * 3600.0))
        except Exception:
            state.follower = None  # not ready to stream yet (or a blip): the next poll tries again
            return
        state.response = response
        try:
            for chunk in response.stream(64 * 1024, decode_content=True):
                if chunk:
                    self.run.emit("stdout", chunk)
            state.done = True
        except Exception:
            state.done = True  # cut off (cancel, deletion): what arrived was emitted
        finally:
            response.release_conn()

    def _drain_logs(self) -> None:
        deadline = time.monotonic() + LOG_DRAIN
        for state in list(self.pods.values()):
            if state.follower is None and not state.done:
                self._follow(state)  # finished before a follower started: its log is complete, read it
            elif state.follower is not None:
                state.follower.join(max(0.0, deadline - time.monotonic()))
        self._close_streams()

    def _close_streams(self) -> None:
        for state in self.pods.values():
            if state.response is not None and not state.done:
                try:
                    state.response.shutdown()  # unblocks the follower's read from this thread
                except Exception:
                    pass

    def _stop(self, why: str, retryable: bool = True) -> Outcome:
        """Delete the Job (and, in the background, its pods) and end the attempt with `why`."""
        try:
            delete_job(self.kube, self.namespace, self.name)
            self.note(f"deleted Job {self.namespace}/{self.name}: {why}")
            why = f"{why}; Job {self.namespace}/{self.name} deleted"
        except KubeError as exc:
            why = f"{why}; the Job could not be deleted ({exc}): delete it by hand or wait for its deadline"
        for state in self.pods.values():
            if state.follower is not None:
                state.follower.join(1.0)
        self._close_streams()
        return Outcome(None, why, retryable=retryable,
                       result={"job": self.name, "namespace": self.namespace, "context": self.kube.context.name})


def delete_job(kube: Kube, namespace: str, name: str) -> bool:
    """Delete a Job and let the garbage collector remove its pods; False if it was already gone."""
    try:
        kube.batch.delete_namespaced_job(name, namespace, propagation_policy="Background",
                                         _request_timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
        return True
    except k8s.ApiException as exc:
        if exc.status == 404:
            return False
        raise explain(exc, kube.context, f"deleting Job {namespace}/{name}") from None
    except Exception as exc:
        raise explain(exc, kube.context, f"deleting Job {namespace}/{name}") from None


def _waiting(pod: k8s.V1Pod) -> tuple[str, str] | None:
    for status in (pod.status.container_statuses or []) if pod.status else []:
        waiting = status.state.waiting if status.state else None
        if waiting is not None and waiting.reason not in (None, "ContainerCreating", "PodInitializing"):
            return waiting.reason, waiting.message or ""
    return None


def _last_exit_code(pods: list[k8s.V1Pod]) -> int | None:
    """The exit code of the pod that finished last (the Job's final verdict came from it)."""
    ended = [(s.state.terminated.finished_at or pod.metadata.creation_timestamp, s.state.terminated.exit_code)
             for pod in pods for s in ((pod.status.container_statuses or []) if pod.status else [])
             if s.state and s.state.terminated is not None]
    return max(ended, key=lambda e: e[0].timestamp() if e[0] else 0.0)[1] if ended else None


def job_outcome(job: k8s.V1Job, pods: list[k8s.V1Pod], namespace: str, name: str) -> Outcome | None:
    """The attempt's Outcome from the Job's conditions, or None while it still runs."""
    status = job.status or k8s.V1JobStatus()
    conditions = {c.type: c for c in status.conditions or [] if c.status == "True"}
    result = {"job": name, "namespace": namespace, "succeeded": status.succeeded or 0,
              "failed": status.failed or 0, "pods": len(pods)}
    if "Complete" in conditions:
        return Outcome(0, result=result)
    failed = conditions.get("Failed")
    if failed is not None:
        code = _last_exit_code(pods)
        why = (failed.reason or "Failed") + (f": {failed.message}" if failed.message else "")
        tail = f"; last exit code {code}" if code is not None else ""
        return Outcome(code, f"Job {namespace}/{name} failed ({why}) after {status.failed or 0} failed pod(s){tail}",
                       retryable=True, result=result)
    return None


def run_attempt(discovery: Discovery, spec: dict, run: TaskRun, poll_interval: float,
                api_grace: float = API_GRACE) -> Outcome:
    """One attempt of a validated spec on the context it names (or the current one)."""
    try:
        ctx = resolve(discovery, spec["context"])
        kube = connect(discovery, ctx.name)
    except KubeError as exc:
        # A context unknown here may be known on another node: the engine's placement decides.
        return Outcome(None, str(exc), retryable=exc.retryable or exc.reason == "NoContext")
    with kube:
        attempt = JobAttempt(kube, run, spec, spec["namespace"] or ctx.namespace,
                             specs.job_name(run.task_id, run.attempt), poll_interval, api_grace)
        return attempt.execute()

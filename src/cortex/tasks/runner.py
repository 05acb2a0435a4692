"""The node side of the task engine: pull this node's assignments, run them, stream output, report.

Pull, not push: the runner reads "what should this node be running" (`task.assigned`, a stale read from the
nearest server: cheap, and staleness is harmless because every start and report names its attempt and term
and the state machine rejects stale ones). A worker polls quickly while busy and slowly while idle; a server
reads its own replica, woken by the engine on its local `task.assigned`/`task.changed` events, so it picks
work up as soon as it applies it and polls only slowly, as a safety net.

Reconciliation, each poll:
- an assigned attempt not running here: start it (`task.start`, batched), then run it on its own thread;
- a running attempt here whose task shows `cancelling`, another attempt, or is gone: cancel it locally (the
  executor kills the process tree; its report will be rejected if the attempt is no longer current);
- an attempt the state says runs here but this process does not know (the agent restarted mid-task): report
  it lost, so it is re-queued at once instead of waiting for the node to be declared offline.

Output and reports go out through one sender thread, in order (a task's output is stored before its report
makes it terminal), batched into one command per kind per round, each batch retried under one idempotency
key until the cluster answers.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from cortex.tasks.executor import Executor, Outcome, TaskRun
from cortex.tasks.lifecycle import MAX_CHUNK, OUTPUT_CAP

PERMANENT_CODES = {"INVALID_ARGUMENT", "PERMISSION_DENIED", "FAILED_PRECONDITION", "NOT_FOUND"}
FINISHED_MEMORY = 30.0  # seconds a finished attempt is remembered (stale reads may still list it)


@dataclass
class LocalRun:
    task_id: str
    attempt: int
    term: int
    kind: str
    cancelled: threading.Event = field(default_factory=threading.Event)
    sent_bytes: int = 0
    dropped: int = 0
    pending: list = field(default_factory=list)  # [(stream, text)] not yet sent
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: bool = False


def _code_name(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    code = code() if callable(code) else code
    return getattr(code, "name", "") or ""


class Runner:
    def __init__(self, cluster, node_id: str, executors: dict[str, Executor], workdir_root: Path,
                 log: logging.Logger, idle_poll: float = 0.5, busy_poll: float = 0.02, server: bool = False):
        self.cluster = cluster
        # A server applies every assignment itself and the engine wakes this runner on its own apply (and on
        # cancels), so it reads its own replica in process and needs no fast polling; a worker polls a server.
        self.server = server
        if server:
            busy_poll = idle_poll
        self.node_id = node_id
        self.executors = executors
        self.workdir_root = Path(workdir_root)
        self.log = log
        self.idle_poll, self.busy_poll = idle_poll, busy_poll
        self.runs: dict[str, LocalRun] = {}
        self.finished: dict[tuple[str, int], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._send_wake = threading.Event()
        self._reports: deque = deque()
        self._starts: deque = deque()  # assigned attempts to start: go out with the next round's reports
        self._pending: set[tuple[str, int]] = set()  # (task, attempt) queued to start or being started
        self._last_activity = 0.0
        self._threads: list[threading.Thread] = []
        self._shutting_down = False

    # --- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        self.workdir_root.mkdir(parents=True, exist_ok=True)
        for name, target in (("task-runner", self._poll_loop), ("task-sender", self._send_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, grace: float = 8.0) -> None:
        """Node shutdown: kill the running attempts and report them lost (re-queued elsewhere, not cancelled),
        giving the sender a few seconds to get those reports out before it stops."""
        self._shutting_down = True
        with self._lock:
            for run in self.runs.values():
                run.cancelled.set()
        deadline = time.monotonic() + grace
        while (self.runs or self._reports) and time.monotonic() < deadline:
            self._send_wake.set()
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        self._send_wake.set()
        for t in self._threads:
            t.join(timeout=5)

    def wake(self) -> None:
        self._wake.set()

    def running(self) -> int:
        with self._lock:
            return sum(1 for r in self.runs.values() if not r.done)

    # --- polling -------------------------------------------------------------------------------------------
    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            busy = time.monotonic() - self._last_activity < 2.0
            self._wake.wait(self.busy_poll if busy else self.idle_poll)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.reconcile(self._read_assigned())
            except Exception as exc:  # the cluster may be electing; try again next round
                self.log.debug("task poll failed: %s", exc)

    def _read_assigned(self) -> list[dict]:
        args = {"node_id": self.node_id}
        if self.server:
            try:
                return self.cluster.read_local("task.assigned", args)
            except Exception:  # not a member yet (no replica): ask a server like a worker does
                pass
        return self.cluster.read("task.assigned", args, level="stale")

    def reconcile(self, view: list[dict]) -> None:
        now = time.monotonic()
        seen: dict[str, dict] = {t["id"]: t for t in view}
        to_start, orphans = [], []
        with self._lock:  # the sender records finished attempts too
            self.finished = {k: t for k, t in self.finished.items() if now - t < FINISHED_MEMORY}
            for t in view:
                key = (t["id"], t["attempt"])
                run = self.runs.get(t["id"])
                if key in self._pending:
                    continue  # its start is on its way (the view may already say running)
                if key in self.finished or (run is not None and run.attempt == t["attempt"]):
                    if run is not None and t["state"] == "cancelling":
                        run.cancelled.set()
                    continue
                if run is not None:  # another attempt of a task still running here: that one is stale
                    run.cancelled.set()
                    continue
                if t["state"] == "assigned":
                    to_start.append(t)
                else:
                    orphans.append(t)
            missing = [r for tid, r in self.runs.items() if tid not in seen and not r.done]
        if view:
            self._last_activity = now
        if orphans:
            self._report_orphans(orphans)
        if missing:
            self._check_missing(missing)
        if to_start:
            self._start(to_start)

    def _report_orphans(self, orphans: list[dict]) -> None:
        for t in orphans:
            failure = "cancelled" if t["state"] == "cancelling" else "lost"
            self.log.warning("task attempt not running here (agent restarted?); reporting it %s", failure,
                             extra={"fields": {"task": t["id"], "attempt": t["attempt"]}})
            self.finished[(t["id"], t["attempt"])] = time.monotonic()
            self._queue_report({"task_id": t["id"], "attempt": t["attempt"], "term": t["term"], "exit_code": None,
                                "error": f"node {self.node_id} restarted while the attempt ran", "retryable": True,
                                "failure": failure, "result": {}})

    def _check_missing(self, missing: list[LocalRun]) -> None:
        """A local run the (stale) view no longer lists: confirm with the leader before cancelling it."""
        for run in missing:
            try:
                task = self.cluster.read("task.get", {"id": run.task_id}, level="leader")
            except Exception:
                continue
            if task is None or task["attempt"] != run.attempt or task["node"] != self.node_id \
                    or task["state"] not in ("assigned", "running", "cancelling"):
                self.log.info("attempt no longer current here; cancelling it",
                              extra={"fields": {"task": run.task_id, "attempt": run.attempt}})
                run.cancelled.set()

    def _start(self, tasks: list[dict]) -> None:
        """Queue the starts for the sender: it sends them with this round's reports in one command and runs
        the attempts the cluster accepted (an attempt never runs before its start is committed)."""
        if self._shutting_down:
            return
        with self._lock:
            for t in tasks:
                self._pending.add((t["id"], t["attempt"]))
                self._starts.append(t)
        self._send_wake.set()

    def _launch(self, tasks: list[dict], result: dict | None, key: str = "started") -> None:
        accepted = set(result.get(key, [])) if result is not None else set()
        now = time.monotonic()
        for t in tasks:
            if result is not None and t["id"] not in accepted:
                with self._lock:  # stale or cancelled meanwhile: not ours to run
                    self.finished[(t["id"], t["attempt"])] = now
            elif t["id"] in accepted and not self._shutting_down:
                run = LocalRun(t["id"], t["attempt"], t["term"], t["kind"])
                with self._lock:
                    self.runs[t["id"]] = run
                threading.Thread(target=self._execute, args=(run, t), name=f"task-{t['id']}", daemon=True).start()
            with self._lock:  # not sent (stopping) or answered: a later poll decides afresh
                self._pending.discard((t["id"], t["attempt"]))

    # --- running -------------------------------------------------------------------------------------------
    def _execute(self, run: LocalRun, task: dict) -> None:
        workdir = self.workdir_root / f"{run.task_id}.{run.attempt}"
        executor = self.executors.get(run.kind)
        # an executor that never touches its workdir (noop) is spared two directory syscall rounds per task
        needs_workdir = getattr(executor, "needs_workdir", True)
        try:
            if executor is None:
                outcome = Outcome(None, f"node {self.node_id} has no {run.kind} executor", True, {"failure": "error"})
            else:
                if needs_workdir:
                    shutil.rmtree(workdir, ignore_errors=True)
                    workdir.mkdir(parents=True)
                    workdir.chmod(0o700)
                outcome = executor.run(TaskRun(
                    task_id=run.task_id, attempt=run.attempt, spec=task["spec"], workdir=workdir,
                    emit=lambda stream, data: self._emit(run, stream, data), cancelled=run.cancelled,
                    timeout=task.get("timeout"), env={"CORTEX_NODE": self.node_id}))
        except Exception as exc:  # an executor bug must not take the runner down
            self.log.exception("executor failed")
            outcome = Outcome(None, f"executor error: {type(exc).__name__}: {exc}", True, {"failure": "error"})
        finally:
            if needs_workdir:
                shutil.rmtree(workdir, ignore_errors=True)
        result = dict(outcome.result)
        failure = result.pop("failure", "") if not outcome.ok else ""
        if not outcome.ok and not failure:
            failure = "exit" if outcome.exit_code not in (None, 0) else "error"
        error = outcome.error
        if self._shutting_down and failure == "cancelled":
            failure, error = "lost", f"node {self.node_id} shut down during the attempt; re-queued"
        self._queue_report({"task_id": run.task_id, "attempt": run.attempt, "term": run.term,
                            "exit_code": outcome.exit_code, "error": error[:4000],
                            "retryable": outcome.retryable, "failure": failure, "result": result}, run)

    def _emit(self, run: LocalRun, stream: str, data: bytes) -> None:
        with run.lock:
            room = OUTPUT_CAP - run.sent_bytes
            if room <= 0:
                run.dropped += len(data)
                return
            if len(data) > room:
                run.dropped += len(data) - room
                data = data[:room]
            run.sent_bytes += len(data)
            text = data.decode("utf-8", "replace")
            if run.pending and run.pending[-1][0] == stream and len(run.pending[-1][1]) + len(text) <= MAX_CHUNK:
                run.pending[-1] = (stream, run.pending[-1][1] + text)
            else:
                for i in range(0, len(text), MAX_CHUNK):
                    run.pending.append((stream, text[i:i + MAX_CHUNK]))
        self._send_wake.set()

    def _queue_report(self, report: dict, run: LocalRun | None = None) -> None:
        self._reports.append((report, run))
        self._send_wake.set()

    # --- sending -------------------------------------------------------------------------------------------
    def _write(self, command: str, args: dict, key: str) -> dict:
        return self.cluster.write(command, args, idempotency_key=key)

    def _send_with_retry(self, command: str, args: dict) -> dict | None:
        """Send one batch until the cluster answers; the same key makes a retry after a lost answer harmless."""
        key = f"{command}:{self.node_id}:{uuid.uuid4().hex}"
        delay = 0.05
        while not self._stop.is_set():
            try:
                return self._write(command, args, key)
            except Exception as exc:
                if _code_name(exc) in PERMANENT_CODES:
                    self.log.error("%s rejected: %s", command, exc)
                    return None
                self._stop.wait(delay)
                delay = min(delay * 2, 1.0)
        return None

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            self._send_wake.wait(0.2)
            self._send_wake.clear()
            if not self._starts:  # a start waits for nothing (submit->running latency); while the previous
                time.sleep(0.005)  # send was in flight, reports gathered anyway; else let a burst gather
            try:
                self._flush_output()
                self._flush_reports()
            except Exception:
                self.log.exception("task sender failed")

    def _flush_output(self) -> None:
        chunks = []
        with self._lock:
            runs = list(self.runs.values())
        for run in runs:
            with run.lock:
                pending, run.pending = run.pending, []
                dropped, run.dropped = run.dropped, 0
            for stream, text in pending:
                chunks.append({"task_id": run.task_id, "attempt": run.attempt, "term": run.term, "stream": stream,
                               "data": text})
            if dropped:
                chunks.append({"task_id": run.task_id, "attempt": run.attempt, "term": run.term,
                               "stream": "stderr", "data": "", "dropped": dropped})
        for i in range(0, len(chunks), 16):  # 16 x 64 KiB stays under the 1 MiB command limit
            self._send_with_retry("task.output", {"node_id": self.node_id, "chunks": chunks[i:i + 16]})

    def _flush_reports(self) -> None:
        batch, starts = [], []
        while self._reports and len(batch) < 1000:
            batch.append(self._reports.popleft())
        with self._lock:
            while self._starts and len(starts) < 1000:
                starts.append(self._starts.popleft())
        if self._shutting_down and starts:  # a node going down starts nothing new
            self._launch(starts, None)
            starts = []
        if not batch and not starts:
            return
        try:
            self._send_round(batch, starts)
        except BaseException:
            with self._lock:  # never leave a start pending for ever: the next poll decides afresh
                self._pending.difference_update((t["id"], t["attempt"]) for t in starts)
            raise

    def _send_round(self, batch: list, starts: list[dict]) -> None:
        self._flush_output()  # output of these runs goes in before they become terminal
        args = {"node_id": self.node_id, "reports": [r for r, _ in batch]}
        if starts:
            args["starts"] = [{"task_id": t["id"], "attempt": t["attempt"], "term": t["term"]} for t in starts]
        result = self._send_with_retry("task.report", args)
        if result is None and starts and not self._stop.is_set():
            # refused: a leader from before combined reports (a rolling update) knows only the separate commands
            result = self._send_with_retry("task.start", {"node_id": self.node_id, "starts": args["starts"]}) \
                or {}
            result = {"started": result.get("started", [])}
            if batch:
                self._send_with_retry("task.report", {"node_id": self.node_id, "reports": args["reports"]})
        if starts:
            self._launch(starts, result)
        if not batch:
            return
        now = time.monotonic()
        with self._lock:
            for report, run in batch:
                self.finished[(report["task_id"], report["attempt"])] = now
                if run is not None and self.runs.get(run.task_id) is run:
                    run.done = True
                    del self.runs[run.task_id]
        self._wake.set()

"""The TaskEngine plugin: the leader's scheduling loop, this node's runner and resource reports, and tools.

Leader loop (only while this node leads): read the scheduler's input from the local replica, re-queue the
attempts of lost nodes (offline, removed, or drained past their deadline), run the pure scheduler and
propose its decisions as one `task.assign` command per round, then advance workflows (workflow.py). It wakes
on every task/workflow/node event and at the earliest retry time, so a decision follows a submission or a
finish at once; decisions are internal commands fenced by the leader's term.

Every node: a Runner (runner.py) for its assignments, and a resource report (`task.node_report`) when its
capacity, kinds or busy flag change, or every REPORT_PERIOD seconds.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any, ClassVar

from cortex.plugins.api import Caller, Plugin, Resource, Tool, ToolError, holds_no_replica
from cortex.plugins.host import installed_placements
from cortex.tasks import api, executors, resources
from cortex.tasks.executors import ExecutorSettings
from cortex.tasks.runner import Runner
from cortex.tasks.scheduler import round_rules, schedule

ASSIGN_BATCH = 1000


class TaskEngine(Plugin):
    name: ClassVar[str] = "tasks"
    description: ClassVar[str] = "Persistent tasks, scheduler, sandboxed executors, retries/DLQ, workflows, draining"
    options_schema: ClassVar[dict] = {
        "type": "object", "additionalProperties": False,
        "properties": {
            "run_tasks": {"type": "boolean", "default": True, "description": "run tasks on this node"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}, "default": {}},
            "slots": {"type": "integer", "minimum": 0, "maximum": 10000,
                      "description": "concurrent tasks on this node (default 32)"},
            "kinds": {"type": "array", "items": {"type": "string"},
                      "description": "only these task kinds (default: every kind available here)"},
            "busy_processes": {"type": "array", "items": {"type": "string"}, "default": [],
                               "description": "process names meaning the owner uses the machine (games)"},
            "benchmark_on_start": {"type": "boolean", "default": True},
            "benchmark_seconds": {"type": "number", "minimum": 0.01, "maximum": 10, "default": 0.2},
            "benchmark_delay": {"type": "number", "minimum": 0, "maximum": 3600, "default": 15.0,
                                "description": "seconds after start before the compute benchmark runs"},
            "agent_base_url": {"type": "string", "default": "",
                               "description": "Anthropic Messages API base URL for agent tasks"},
            "report_period": {"type": "number", "minimum": 10, "maximum": 3600, "default": resources.REPORT_PERIOD},
        },
    }

    _stop: threading.Event | None = None

    # --- lifecycle -------------------------------------------------------------------------------------------
    def init(self) -> None:
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self.runner: Runner | None = None
        self._benchmark: dict = {}
        self._last_report: tuple | None = None
        self._last_report_at = 0.0
        self.last_decision_seconds = 0.0
        node_data = self.ctx.data_dir.parent.parent  # <data_dir>/plugins/tasks -> <data_dir>
        self.settings = ExecutorSettings(hide_paths=(str(node_data.resolve()),),
                                         agent_base_url=self.ctx.options.get("agent_base_url", ""))
        self.executors = self._build_executors()
        self.placements = installed_placements()

    def _build_executors(self) -> dict:
        wanted = self.ctx.options.get("kinds")
        out = {}
        for kind in executors.kinds():
            if wanted is not None and kind not in wanted:
                continue
            try:
                ex = executors.create(kind, self.settings)
                problem = ex.available()
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if problem:
                self.ctx.log.info("task kind unavailable here", extra={"fields": {"kind": kind, "why": problem}})
                continue
            out[kind] = ex
        return out

    def start(self) -> None:
        cluster = self.ctx.cluster
        if cluster is None:  # a host without a cluster (tools listing, tests): nothing to schedule or run
            return
        if self.ctx.options.get("run_tasks", True):
            self.runner = Runner(cluster, cluster.node_id, self.executors, (self.ctx.data_dir / "work").resolve(),
                                 self.ctx.log, server=cluster.role == "server")
            self.runner.start()
        for name, target in (("task-leader", self._leader_loop), ("task-resources", self._resource_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        if self._stop is None:  # never initialised: nothing to stop
            return
        self._stop.set()
        self._wake.set()
        if self.runner is not None:
            try:  # withdraw this node's capacity first, so the attempts it hands back go to other nodes
                self.ctx.cluster.write("task.node_report", {"node_id": self.ctx.cluster.node_id,
                                                            "capacity": {"slots": 0}, "kinds": []})
            except Exception as exc:
                self.ctx.log.info("could not withdraw capacity before stopping: %s", exc)
            self.runner.stop()
        for t in self._threads:
            t.join(timeout=5)

    def subscriptions(self) -> dict:
        def leader(event) -> None:
            self._wake.set()

        def assigned(event) -> None:
            self._wake.set()
            if self.runner is not None and self.ctx.cluster.node_id in event.data.get("nodes", ()):
                self.runner.wake()

        def changed(event) -> None:
            # a cancel, a re-queue, a drain, a workflow cancel may stop an attempt running here: a server's
            # runner notices at once instead of at its next (slow) poll
            self._wake.set()
            if self.runner is not None:
                self.runner.wake()

        return {"task.submitted": leader, "task.finished": leader, "task.requeued": changed,
                "task.changed": changed, "task.assigned": assigned, "node.*": changed, "workflow.*": changed,
                "leader.changed": leader}

    # --- resources -------------------------------------------------------------------------------------------
    def _resource_loop(self) -> None:
        try:
            self._report()  # capacity first: the node can take tasks before its benchmark is in
        except Exception as exc:  # not in a cluster yet, or no leader: the loop below retries
            self.ctx.log.debug("resource report failed: %s", exc)
        # the benchmark waits until the agent's own start-up is over: it would measure (and slow) that instead
        if self.ctx.options.get("benchmark_on_start", True) and not self._stop.wait(
                self.ctx.options.get("benchmark_delay", 15.0)):
            try:
                self._benchmark = resources.benchmark(self.ctx.options.get("benchmark_seconds", 0.2))
            except Exception as exc:
                self.ctx.log.warning("compute benchmark failed", extra={"fields": {"error": str(exc)}})
        pending_benchmark = bool(self._benchmark)
        while not self._stop.is_set():
            try:
                if self._report(force_benchmark=pending_benchmark):
                    pending_benchmark = False
            except Exception as exc:
                self.ctx.log.debug("resource report failed: %s", exc)
            self._stop.wait(2.0)

    def _report(self, force_benchmark: bool = False) -> bool:
        snap = resources.snapshot(str(self.ctx.data_dir), self.ctx.options.get("busy_processes", []))
        capacity = dict(snap["capacity"])
        capacity["slots"] = self.ctx.options.get("slots", 32) if self.ctx.options.get("run_tasks", True) else 0
        kinds = sorted(self.executors) if self.ctx.options.get("run_tasks", True) else []
        labels = dict(self.ctx.options.get("labels", {}))
        key = (tuple(sorted(capacity.items())), tuple(kinds), tuple(sorted(labels.items())), snap["busy"])
        period = self.ctx.options.get("report_period", resources.REPORT_PERIOD)
        if key == self._last_report and not force_benchmark and time.monotonic() - self._last_report_at < period:
            return False
        self.ctx.cluster.write("task.node_report", {
            "node_id": self.ctx.cluster.node_id, "capacity": capacity,
            "usage": {**snap["usage"], "busy_reasons": snap["busy_reasons"]}, "labels": labels, "kinds": kinds,
            "busy": snap["busy"], "benchmark": self._benchmark if force_benchmark else {}})
        self._last_report, self._last_report_at = key, time.monotonic()
        return True

    def run_benchmark(self) -> dict:
        self._benchmark = resources.benchmark(self.ctx.options.get("benchmark_seconds", 0.2))
        self._report(force_benchmark=True)
        return self._benchmark

    # --- leader ----------------------------------------------------------------------------------------------
    def _leader_loop(self) -> None:
        while not self._stop.is_set():
            timeout = 1.0
            try:
                if self.ctx.cluster.is_leader():
                    timeout = self.leader_step()
            except Exception as exc:
                self.ctx.log.debug("task leader step failed: %s", exc)
                timeout = 0.2
            self._wake.wait(timeout)
            self._wake.clear()

    def leader_step(self) -> float:
        """One round of decisions; returns how long to sleep unless woken."""
        cluster = self.ctx.cluster
        now = time.time()
        snap = self._read_sched(now, "auto")
        if snap["lost"]:
            requeues = [{"task_id": t["task_id"], "attempt": t["attempt"],
                         "reason": f"node {t['node']} was lost or drained past its deadline; re-queued"}
                        for t in snap["lost"]]
            for i in range(0, len(requeues), ASSIGN_BATCH):
                cluster.propose("task.requeue", {"requeues": requeues[i:i + ASSIGN_BATCH]})
        started = time.perf_counter()
        decisions = self._decide(snap)
        if snap["more"] and len(decisions) < snap["free_slots"]:
            # the page's tasks could not fill the free slots (they wait for GPUs, labels...): look deeper
            snap = self._read_sched(now, ASSIGN_BATCH * 5)
            decisions = self._decide(snap)
        self.last_decision_seconds = time.perf_counter() - started
        for i in range(0, len(decisions), ASSIGN_BATCH):
            cluster.propose("task.assign", {"assignments": [
                {"task_id": d.task_id, "node_id": d.node_id, "attempt": d.attempt}
                for d in decisions[i:i + ASSIGN_BATCH]]})
        from cortex.tasks import workflow

        advanced = workflow.leader_advance(cluster, self.ctx.log)
        if decisions or snap["lost"] or advanced:
            return 0.0  # more may be ready at once
        timeout = 1.0
        if snap["next_retry_at"]:
            timeout = min(timeout, max(0.01, snap["next_retry_at"] - time.time()))
        return timeout

    def _decide(self, snap: dict) -> list:
        rules = round_rules(self.placements, {t["kind"] for t in snap["queued"]},
                            lambda query, args: self.ctx.cluster.read(query, args, level="leader"))
        return schedule(snap["queued"], snap["nodes"], rules=rules)

    def _read_sched(self, now: float, limit) -> dict:
        args = {"now": now, "limit": limit}
        try:  # the leader's own replica, without a JSON round trip
            return self.ctx.cluster.read_local("task.sched", args)
        except Exception as exc:
            if not holds_no_replica(exc):
                raise
        return self.ctx.cluster.read("task.sched", args, level="leader")

    # --- MCP resource -------------------------------------------------------------------------------------
    def resources(self) -> list[Resource]:
        return [Resource("cluster://tasks", "tasks", "Tasks and workflows of the cluster: counts by state, the "
                         "newest tasks and workflows, the kinds this node runs", self.overview)]

    def overview(self) -> dict:
        """What `cluster://tasks` shows: the running engine's view of the queue (the leader's replica)."""
        cluster = self.ctx.cluster
        if cluster is None:
            return {"enabled": True, "items": [], "message": "this plugin host is not in a cluster"}
        keep = ("id", "name", "kind", "state", "node", "attempt", "exit_code", "error", "dlq")
        items = [{k: r.get(k) for k in keep} for r in cluster.read("task.list", {"limit": 50})]
        return {"enabled": True, "node_id": cluster.node_id, "kinds_here": sorted(self.executors),
                "counts": cluster.read("task.stats", {}), "items": items,
                "workflows": cluster.read("workflow.list", {"limit": 20}),
                "message": "the newest 50 tasks; tasks_get or cluster://tasks/{task_id} for one task"}

    # --- tools -----------------------------------------------------------------------------------------------
    def tools(self) -> list[Tool]:
        from cortex.tasks.tools import engine_tools

        return engine_tools(self)

    def call(self, fn, *args, **kwargs) -> Any:
        try:
            return fn(*args, **kwargs)
        except api.TaskError as exc:
            raise ToolError(str(exc)) from None


def new_key() -> str:
    return uuid.uuid4().hex


__all__ = ["TaskEngine", "Caller"]

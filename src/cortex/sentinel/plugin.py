"""The sentinel plugin (on by default, every node): collect, record, assess, alert, act.

Every `interval` seconds it reads the machine (collect.py, smart.py at its own slower pace) into the
node's history; every `evaluate_every` seconds it assesses the node (predict.py), feeds the predictions to
the alerter (notify.py: hysteresis), delivers the transitions (event bus, inbox, webhooks), acts on a
critical one (`auto_drain`; the `sentinel.predicted_failure` event for whoever takes over the node's
services) and publishes the node's summary to the replicated state (records.py) when it changed.

It never stops over bad input: each step's failure is logged once with its source and the loop goes on.
"""

from __future__ import annotations

import fnmatch
import os
import threading
import time
from pathlib import Path
from typing import ClassVar

from cortex.core.events import Event
from cortex.plugins.api import Plugin
from cortex.sentinel import records
from cortex.sentinel.collect import Collector, Roots
from cortex.sentinel.history import History
from cortex.sentinel.notify import Alerter, WebhookSender, webhook_document
from cortex.sentinel.predict import assess
from cortex.sentinel.smart import SmartReader

SPARK_SIGNALS = ("score", "cpu.busy_pct", "mem.avail_pct")
SPARK_POINTS = 24
EVENT_ALERT = "sentinel.alert"
EVENT_PREDICTED_FAILURE = "sentinel.predicted_failure"
MAX_PENDING = 100


class SentinelPlugin(Plugin):
    name: ClassVar[str] = "sentinel"
    description: ClassVar[str] = "Predictive node health: history, score, predictions, proactive alerts, /metrics"
    placement = records.SentinelPlacement()
    options_schema: ClassVar[dict] = {
        "type": "object", "additionalProperties": False,
        "properties": {
            "interval": {"type": "number", "minimum": 0.2, "maximum": 600, "default": 10.0,
                         "description": "seconds between two readings of the machine"},
            "evaluate_every": {"type": "number", "minimum": 0.2, "maximum": 3600, "default": 30.0,
                               "description": "seconds between two assessments (score, predictions, alerts)"},
            "watch_paths": {"type": "array", "items": {"type": "string"}, "default": [],
                            "description": "file systems to watch for space ({node_id} is replaced); "
                                           "default: every disk file system mounted"},
            "proc_root": {"type": "string", "default": "/proc"},
            "sys_root": {"type": "string", "default": "/sys"},
            "smartctl": {"type": "string", "default": "smartctl", "description": "the smartctl command; '' disables SMART"},
            "smart_interval": {"type": "number", "minimum": 10, "maximum": 86400, "default": 300.0},
            "smart_timeout": {"type": "number", "minimum": 1, "maximum": 600, "default": 20.0},
            "history_max_mb": {"type": "number", "minimum": 1, "maximum": 10000, "default": 50.0},
            "raise_after": {"type": "number", "minimum": 0, "maximum": 86400, "default": 30.0,
                            "description": "seconds a condition must hold before its alert is raised"},
            "clear_after": {"type": "number", "minimum": 0, "maximum": 86400, "default": 120.0},
            "min_hold": {"type": "number", "minimum": 0, "maximum": 86400, "default": 600.0,
                         "description": "seconds a raised alert stays raised at least"},
            "inbox": {"type": "string", "default": "ops",
                      "description": "inbox address alerts are sent to ('' sends none)"},
            "webhooks": {"type": "array", "items": {"type": "string", "pattern": "^https?://"}, "default": [],
                         "description": "URLs a JSON document is POSTed to on each alert (ntfy, Slack-style)"},
            "webhook_topic": {"type": "string", "default": "", "description": "ntfy topic added to the document"},
            "webhook_timeout": {"type": "number", "minimum": 0.1, "maximum": 120, "default": 5.0},
            "auto_drain": {"type": "boolean", "default": False,
                           "description": "drain this node of tasks when a critical prediction is raised"},
            "drain_deadline": {"type": "number", "minimum": 0, "maximum": 86400, "default": 600.0,
                               "description": "seconds running tasks get before an automatic drain re-queues them"},
            "metrics_port": {"type": "integer", "minimum": 0, "maximum": 65535, "default": 9410,
                             "description": "Prometheus /metrics port (0: any free port; taken: falls back to any)"},
            "metrics_address": {"type": "string", "default": "",
                                "description": "address /metrics listens on (default: the gRPC address's host)"},
        },
    }

    _stop: threading.Event | None = None

    def init(self) -> None:
        o = self.ctx.options
        node_id = self.ctx.cluster.node_id if self.ctx.cluster else "local"
        self.node_id = node_id
        paths = [p.replace("{node_id}", node_id) for p in o.get("watch_paths", [])]
        self.collector = Collector(Roots(Path(o.get("proc_root", "/proc")), Path(o.get("sys_root", "/sys"))), paths)
        self.smart = SmartReader(o["smartctl"], o.get("smart_interval", 300.0), o.get("smart_timeout", 20.0)) \
            if o.get("smartctl", "smartctl") else None
        self.ctx.data_dir.mkdir(parents=True, exist_ok=True)
        self.history = History(self.ctx.data_dir / "history.db", o.get("history_max_mb", 50.0))
        starts = int(self.history.meta_get("starts", "0") or 0) + 1
        self.history.meta_set("starts", str(starts))
        self.starts = starts
        self.alerter = Alerter(o.get("raise_after", 30.0), o.get("clear_after", 120.0), o.get("min_hold", 600.0))
        self.webhooks = WebhookSender(o.get("webhooks", []), o.get("webhook_timeout", 5.0), o.get("webhook_topic", ""))
        self.assessment: dict = {"score": 100.0, "level": "healthy", "factors": [], "predictions": [], "anomalies": []}
        self.latest: dict[str, float | None] = {}
        self._cluster_latest: dict[str, float | None] = {}
        self.metrics_address = ""
        self.collect_cpu_s = 0.0
        self.collect_wall_s = 0.0
        self.drained_for: set[str] = set()
        self._pending: list[tuple[str, dict, str, str]] = []
        self._published: tuple | None = None
        self._published_at = 0.0
        self._logged: set[str] = set()
        self._seen_remote: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._smart_thread: threading.Thread | None = None
        self._metrics = None
        self._born = time.monotonic()

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._stop.is_set():
            # started again after stop() (`cortex plugins start sentinel`): stop() closed the history file and
            # ended the threads for good, so reopen the one and give the others a fresh signal
            o = self.ctx.options
            self._stop = threading.Event()
            self.history = History(self.ctx.data_dir / "history.db", o.get("history_max_mb", 50.0))
            self.webhooks = WebhookSender(o.get("webhooks", []), o.get("webhook_timeout", 5.0), o.get("webhook_topic", ""))
        self.webhooks.start()
        self._start_metrics()
        self._thread = threading.Thread(target=self._loop, name="sentinel", daemon=True)
        self._thread.start()
        if self.smart is not None:  # smartctl may take seconds per drive: never in the 10 s loop's way
            self._smart_thread = threading.Thread(target=self._smart_loop, name="sentinel-smart", daemon=True)
            self._smart_thread.start()

    def stop(self) -> None:
        if self._stop is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._smart_thread is not None:
            self._smart_thread.join(timeout=1)  # a smartctl call still running ends by its own timeout
        self.webhooks.stop()
        if self._metrics is not None:
            self._metrics.close()
        self.history.close()

    def _start_metrics(self) -> None:
        o = self.ctx.options
        host = o.get("metrics_address") or (self.ctx.cluster.grpc_address.rsplit(":", 1)[0].strip("[]")
                                            if self.ctx.cluster else "127.0.0.1")
        try:
            from cortex.sentinel.metrics import MetricsServer

            self._metrics = MetricsServer(self, host, int(o.get("metrics_port", 9410)))
            self.metrics_address = self._metrics.address
        except Exception as exc:
            self._once("metrics", f"/metrics not served: {type(exc).__name__}: {exc}")

    def _once(self, source: str, error: str) -> None:
        if source not in self._logged:
            self._logged.add(source)
            self.ctx.log.warning("sentinel: %s", error, extra={"fields": {"source": source}})

    def _ok(self, source: str) -> None:
        self._logged.discard(source)

    # --- the loop ----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        o = self.ctx.options
        interval, evaluate_every = float(o.get("interval", 10.0)), float(o.get("evaluate_every", 30.0))
        next_eval = next_compact = next_cluster = 0.0
        while not self._stop.is_set():
            started = time.monotonic()
            now = time.time()
            cpu0 = time.thread_time()
            try:
                self.collect_once(now, cluster_signals=started >= next_cluster)
                if started >= next_cluster:
                    next_cluster = started + max(interval, 30.0)
                if started >= next_compact:
                    self.history.compact(now)
                    next_compact = started + 60.0
                if started >= next_eval:
                    self.evaluate(now)
                    next_eval = started + evaluate_every
                self._ok("loop")
            except Exception as exc:  # never let one bad round end the collection
                self._once("loop", f"{type(exc).__name__}: {exc}")
            self.collect_cpu_s += time.thread_time() - cpu0
            self.collect_wall_s += time.monotonic() - started
            self._stop.wait(max(0.05, interval - (time.monotonic() - started)))

    def _smart_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.smart.read()
            except Exception as exc:
                self._once("smart", f"{type(exc).__name__}: {exc}")
            self._stop.wait(self.smart.interval)

    def collect_once(self, now: float, cluster_signals: bool = True) -> dict:
        sample = self.collector.sample()
        if self.smart is not None:
            sample.update(self.smart.last)  # the latest drive readings (read on their own thread)
        sample["agent.restarts"] = float(self.starts)
        if cluster_signals and self.ctx.cluster is not None:
            self._cluster_latest = self._cluster_signals()
            sample.update(self._cluster_latest)  # recorded when read (every 30 s), shown until read again
        self.history.add(now, sample)
        self.latest = {**sample, **self._cluster_latest}
        return sample

    def _cluster_signals(self) -> dict:
        """The node's task failure rate; on the leader, how late each node's heartbeat is and each server's lag."""
        out: dict[str, float | None] = {}
        cluster = self.ctx.cluster
        try:
            tasks = cluster.read("task.list", {"node": cluster.node_id, "limit": 50}, level="stale")
            done = [t for t in tasks if t.get("state") in ("succeeded", "failed")]
            out["tasks.failure_pct"] = 100.0 * sum(t["state"] == "failed" for t in done) / len(done) if done else None
            if cluster.is_leader():
                for n in cluster.status().get("nodes", []):
                    if n.get("id") != cluster.node_id and n.get("last_seen_age", -1) >= 0:
                        out[f"cluster.heartbeat_age:{n['id']}"] = float(n["last_seen_age"])
                    if n.get("role") == "server" and n.get("replication_lag", -1) >= 0:
                        out[f"raft.lag:{n['id']}"] = float(n["replication_lag"])
            self._ok("cluster")
        except Exception as exc:
            self._once("cluster", f"cluster signals unavailable: {exc}")
        return out

    def evaluate(self, now: float) -> dict:
        result = assess(self.history, now, self.alerter.raised().keys())
        self.history.add(now, {"score": result.score})
        transitions = self.alerter.update(now, result.predictions)
        doc = result.doc()
        doc["raised"] = sorted(self.alerter.raised())
        self.assessment = doc
        for t in transitions:
            self._deliver({**t, "ts": now})
        if self._pending and self.ctx.cluster is not None:
            self._flush_writes()
        self._publish(now)
        if self.ctx.cluster is not None and self.ctx.cluster.role == "server":
            self._relay_remote_failures(now)
        return doc

    # --- delivering --------------------------------------------------------------------------------------------
    def _squelched(self, alert_key: str) -> bool:
        try:
            squelches = self.ctx.cluster.read("alert.squelches", {"now": time.time()}, level="stale")
        except Exception:
            return False
        return any(fnmatch.fnmatchcase(alert_key, s["pattern"]) for s in squelches)

    def _deliver(self, t: dict) -> None:
        node, cluster = self.node_id, self.ctx.cluster
        data = {"node_id": node, **{k: t.get(k) for k in ("key", "kind", "target", "severity", "state", "eta_s",
                                                           "confidence", "message")}}
        self.ctx.events.publish(Event(EVENT_ALERT, data))
        critical = t["state"] == "raised" and t.get("severity") == "critical"
        if t["state"] == "cleared":
            self.drained_for.discard(t["key"])  # should it come back after an undrain, it drains again
        if critical:
            self.ctx.events.publish(Event(EVENT_PREDICTED_FAILURE, dict(data, origin="node")))
        if cluster is None:  # a host without a cluster: no inbox, no drain, nothing squelched
            self.webhooks.send(webhook_document(node, t))
            return
        if critical and self.ctx.options.get("auto_drain", False) and t["key"] not in self.drained_for:
            self.drained_for.add(t["key"])
            deadline = float(self.ctx.options.get("drain_deadline", 600.0))
            self._queue_write("task.drain", {"node_id": node, "deadline": deadline},
                              f"sentinel-drain:{node}:{t['key']}:{int(t['ts'])}", "drain")
        if self._squelched(f"sentinel.{t['key']}@{node}"):
            return
        self.webhooks.send(webhook_document(node, t))
        inbox = self.ctx.options.get("inbox", "ops")
        if inbox:
            verb = "cleared" if t["state"] == "cleared" else t.get("severity", "")
            body = (f"{t.get('message', t['key'])}\n\nnode {node}, {t.get('kind', '')} {t.get('target', '')}, "
                    f"ETA {t.get('eta_s')}s, confidence {t.get('confidence')}. `cortex health {node}` shows the "
                    f"factors; the MCP tool squelch_alerts with pattern 'sentinel.*@{node}' mutes them during "
                    "maintenance.")
            self._queue_write("message.send", {
                "sender": f"sentinel@{node}", "recipient": inbox,
                "subject": f"[{verb}] {node}: {t.get('kind', '')} {t.get('target', '')}"[:200], "body": body[:60000]},
                f"sentinel:{node}:{t['key']}:{t['state']}:{t.get('severity', '')}:{int(t['ts'])}", "inbox")
        self._flush_writes()

    def _queue_write(self, command: str, args: dict, key: str, source: str) -> None:
        """Inbox messages and drains are retried on every assessment until the cluster takes them, under one
        idempotency key each, so a retry never sends or drains twice; at most MAX_PENDING wait."""
        if len(self._pending) >= MAX_PENDING:
            self._pending.pop(0)
        self._pending.append((command, args, key, source))

    def _flush_writes(self) -> None:
        while self._pending:
            command, args, key, source = self._pending[0]
            try:
                self.ctx.cluster.write(command, args, key)
            except Exception as exc:
                self._once(source, f"{command} not accepted yet (retried with the next assessment): {exc}")
                return
            self._pending.pop(0)
            self._ok(source)
            if command == "task.drain":
                self.ctx.log.warning("sentinel drained this node", extra={"fields": {"deadline": args["deadline"]}})

    def _publish(self, now: float) -> None:
        if self.ctx.cluster is None:
            return
        a = self.assessment
        late = tuple(sorted(n for n, v in self._peers().items()
                            if v.get("heartbeat_age", 0) > records.HEARTBEAT_LATE
                            or v.get("raft_lag", 0) > records.RAFT_BEHIND))
        fingerprint = (a["level"], round(a["score"]), tuple((p["key"], p["severity"]) for p in a["predictions"]),
                       tuple(a["raised"]), self.metrics_address, late)
        if fingerprint == self._published and now - self._published_at < records.REFRESH:
            return
        record = {"node_id": self.node_id, "ts": now, **{k: a[k] for k in ("score", "level", "predictions",
                                                                            "anomalies", "raised")},
                  "factors": a["factors"][:12], "metrics": self.metrics_address,
                  "signals": {k: v for k, v in self.latest.items()
                              if v is not None and not k.startswith(("cluster.", "raft."))},
                  "spark": {name: self._spark(name, now) for name in SPARK_SIGNALS}}
        peers = self._peers()
        if peers:
            record["peers"] = peers
        if len(record["signals"]) > 80:
            record["signals"] = dict(sorted(record["signals"].items())[:80])
        try:
            self.ctx.cluster.write("kv.put", {"key": records.key(self.node_id), "value": records.encode(record)},
                                   f"sentinel-record:{self.node_id}:{now:.3f}")
            self._published, self._published_at = fingerprint, now
            self._ok("publish")
        except Exception as exc:
            if time.monotonic() - self._born < 120:  # a node still joining or electing: not worth a warning yet
                self.ctx.log.debug("sentinel: health summary not published yet: %s", exc)
                return
            self._once("publish", f"health summary not published (retried): {exc}")

    def _peers(self) -> dict[str, dict]:
        """On the leader: how late each node's heartbeat is and how far each server lags (records.py merges
        them into those nodes' health)."""
        peers: dict[str, dict] = {}
        for name, value in self.latest.items():
            if value is None or ":" not in name:
                continue
            kind, _, node = name.partition(":")
            if kind == "cluster.heartbeat_age":
                peers.setdefault(node, {})["heartbeat_age"] = round(value, 1)
            elif kind == "raft.lag":
                peers.setdefault(node, {})["raft_lag"] = value
        return peers

    def _spark(self, name: str, now: float) -> list[float]:
        points = self.history.series(name, now - 2 * 3600)
        if not points:
            return []
        step = max(1, len(points) // SPARK_POINTS)
        return [round(v, 1) for _, v in points[::step][-SPARK_POINTS:]]

    def _relay_remote_failures(self, now: float) -> None:
        """The leader publishes `sentinel.predicted_failure` for other nodes' critical alerts too, so a plugin that
        acts cluster-wide (taking over a node's services) hears of them on the one node that decides."""
        if not self.ctx.cluster.is_leader():
            return
        try:
            found = records.read_all(lambda q, a: self.ctx.cluster.read(q, a, level="stale"))
        except Exception:
            return
        for r in found:
            if r["node_id"] == self.node_id or not records.fresh(r, now):
                continue
            for p in r.get("predictions") or []:
                tag = f"{r['node_id']}|{p['key']}"
                if p.get("severity") == "critical" and p["key"] in (r.get("raised") or []) and tag not in self._seen_remote:
                    self._seen_remote.add(tag)
                    self.ctx.events.publish(Event(EVENT_PREDICTED_FAILURE, {"node_id": r["node_id"], **p,
                                                                            "origin": "leader"}))

    # --- what tools and metrics read ---------------------------------------------------------------------------
    def collect_cpu_pct(self) -> float:
        """The share of one core the collection thread used since start (the benchmark's target: <= 0.5 %)."""
        return 100.0 * self.collect_cpu_s / max(1e-6, time.monotonic() - self._born)

    def tools(self):
        from cortex.sentinel.tools import sentinel_tools

        return sentinel_tools(self)

    def resources(self):
        from cortex.sentinel.tools import sentinel_resources

        return sentinel_resources(self)


def history_size_mb(path: str) -> float:
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += os.path.getsize(path + suffix)
        except OSError:
            pass
    return total / 1e6

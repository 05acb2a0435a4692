"""Prometheus /metrics for the sentinel: every raw signal, the score, the predictions (prometheus_client).

Imported only when the plugin starts serving, so loading the agent does not load prometheus_client. Values
are read at scrape time from what the plugin last collected and assessed; nothing is kept twice. A signal
`group.metric:target` becomes `cortex_sentinel_group_metric{target="..."}`; absent signals are not exported.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, GaugeMetricFamily

if TYPE_CHECKING:
    from cortex.sentinel.plugin import SentinelPlugin

LEVELS = {"healthy": 0, "degraded": 1, "critical": 2}


def metric_name(signal: str) -> str:
    return "cortex_sentinel_" + re.sub(r"[^a-zA-Z0-9_]", "_", signal)


class _Collector:
    def __init__(self, plugin: SentinelPlugin):
        self.plugin = plugin

    def collect(self):
        p = self.plugin
        families: dict[str, GaugeMetricFamily] = {}
        for signal, value in sorted(p.latest.items()):
            if value is None:
                continue
            base, _, target = signal.partition(":")
            name = metric_name(base)
            family = families.get(name)
            if family is None:
                family = families[name] = GaugeMetricFamily(name, f"sentinel signal {base}", labels=["node", "target"])
            family.add_metric([p.node_id, target], float(value))
        yield from families.values()
        a = p.assessment
        score = GaugeMetricFamily("cortex_sentinel_score", "node health score, 0-100 (100: nothing lowers it)",
                                  labels=["node"])
        score.add_metric([p.node_id], float(a["score"]))
        yield score
        level = GaugeMetricFamily("cortex_sentinel_level", "0 healthy, 1 degraded, 2 critical", labels=["node"])
        level.add_metric([p.node_id], LEVELS.get(a["level"], 0))
        yield level
        labels = ["node", "key", "kind", "target", "severity"]
        eta = GaugeMetricFamily("cortex_sentinel_prediction_eta_seconds", "seconds until the predicted failure",
                                labels=labels)
        conf = GaugeMetricFamily("cortex_sentinel_prediction_confidence", "confidence of a prediction, 0-1",
                                 labels=labels)
        for pred in a["predictions"]:
            values = [p.node_id, pred["key"], pred["kind"], pred["target"], pred["severity"]]
            if pred.get("eta_s") is not None:
                eta.add_metric(values, float(pred["eta_s"]))
            conf.add_metric(values, float(pred["confidence"]))
        yield eta
        yield conf
        own = GaugeMetricFamily("cortex_sentinel_collect_cpu_percent", "share of one core the collection used",
                                labels=["node"])
        own.add_metric([p.node_id], p.collect_cpu_pct())
        yield own
        hooks = GaugeMetricFamily("cortex_sentinel_webhook_failures", "webhook deliveries that failed",
                                  labels=["node"])
        hooks.add_metric([p.node_id], float(p.webhooks.failures))
        yield hooks


class MetricsServer:
    """/metrics on host:port; a port already taken falls back to any free one (the record says which)."""

    def __init__(self, plugin: SentinelPlugin, host: str, port: int):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(plugin))
        try:
            self.server, self.thread = start_http_server(port, host, registry)
        except OSError:
            if port == 0:
                raise
            self.server, self.thread = start_http_server(0, host, registry)
        bound = self.server.server_address
        self.address = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

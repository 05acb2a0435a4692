"""The sentinel's MCP tools and resource: health of every node, one node, predictions, this node's history."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from cortex.plugins.api import Caller, Resource, Tool, ToolError, returns
from cortex.sentinel import records

if TYPE_CHECKING:
    from cortex.sentinel.plugin import SentinelPlugin

MAX_POINTS = 2000


def _records(plugin: SentinelPlugin) -> list[dict]:
    try:
        return records.read_all(lambda q, a: plugin.ctx.cluster.read(q, a, level="stale"))
    except Exception as exc:
        raise ToolError(f"reading the nodes' health summaries failed: {exc}; retry, or check cluster_health") from exc


def summary(record: dict, now: float) -> dict:
    age = now - float(record.get("ts", 0))
    return {"node": record["node_id"], "score": record.get("score"), "level": record.get("level"),
            "stale": not records.fresh(record, now), "age_s": round(age, 1),
            "predictions": len(record.get("predictions") or []), "raised": record.get("raised") or [],
            "top_factors": [f["detail"] for f in (record.get("factors") or [])[:3]],
            "metrics": record.get("metrics", "")}


def health(plugin: SentinelPlugin, args: dict, caller: Caller) -> dict:
    now = time.time()
    nodes = [summary(r, now) for r in _records(plugin)]
    worst = ("critical" if any(n["level"] == "critical" and not n["stale"] for n in nodes) else
             "degraded" if any(n["level"] == "degraded" and not n["stale"] for n in nodes) else "healthy")
    return {"status": worst, "nodes": nodes,
            "hint": "sentinel_node shows one node's factors and predictions" if nodes else
            "no node has published a health summary yet (the sentinel plugin publishes one within a minute)"}


def node(plugin: SentinelPlugin, args: dict, caller: Caller) -> dict:
    node_id = args.get("node") or plugin.node_id
    if node_id == plugin.node_id:  # this node: its latest assessment, fresher than the published one
        doc = {"node": node_id, **plugin.assessment, "signals": plugin.latest, "metrics": plugin.metrics_address,
               "source": "local"}
        try:  # what only the leader sees of this node (missed heartbeats, Raft lag)
            mine = next((r for r in _records(plugin) if r["node_id"] == node_id), {})
        except ToolError:
            mine = {}
        seen = [f for f in mine.get("factors") or [] if f.get("source") == "leader"]
        if seen:
            doc["factors"] = [*doc["factors"], *seen]
            doc["score"] = max(0.0, doc["score"] - sum(f["penalty"] for f in seen))
        return doc
    found = next((r for r in _records(plugin) if r["node_id"] == node_id), None)
    if found is None:
        raise ToolError(f"no health summary for node {node_id!r}; sentinel_health lists the nodes that have one")
    return {"node": node_id, **{k: found.get(k) for k in ("score", "level", "factors", "predictions", "anomalies",
                                                         "raised", "signals", "spark", "metrics", "ts")},
            "stale": not records.fresh(found, time.time()), "source": "published"}


def predictions(plugin: SentinelPlugin, args: dict, caller: Caller) -> dict:
    out = []
    for r in _records(plugin):
        for p in r.get("predictions") or []:
            if args.get("severity") and p.get("severity") != args["severity"]:
                continue
            out.append({"node": r["node_id"], **p, "raised": p["key"] in (r.get("raised") or [])})
    out.sort(key=lambda p: (p["severity"] != "critical", p["eta_s"] if p["eta_s"] is not None else float("inf")))
    return {"predictions": out}


def history(plugin: SentinelPlugin, args: dict, caller: Caller) -> dict:
    if args.get("node") and args["node"] != plugin.node_id:
        raise ToolError(f"history is kept on each node and this is {plugin.node_id}: connect to {args['node']}'s "
                        "MCP endpoint, or use sentinel_node for the sparkline it publishes")
    names = plugin.history.names()
    signal = args.get("signal")
    if not signal:
        return {"node": plugin.node_id, "signals": names}
    if signal not in names:
        raise ToolError(f"no series {signal!r} on {plugin.node_id}; call sentinel_history without a signal to list them")
    hours = float(args.get("hours", 6))
    points = plugin.history.series(signal, time.time() - hours * 3600)
    step = max(1, len(points) // int(args.get("max_points", 500)))
    return {"node": plugin.node_id, "signal": signal, "points": [[round(t), v] for t, v in points[::step]]}

_OUT_HEALTH = returns({"status": "string", "nodes": "array", "hint": "string"})
_OUT_NODE = returns({"node": "string", "score": ["number", "null"], "level": ["string", "null"], "factors": ["array", "null"],
                     "predictions": ["array", "null"], "anomalies": ["array", "null"], "signals": ["object", "null"],
                     "metrics": ["string", "null"], "source": "string"}, optional=("factors", "predictions", "anomalies",
                                                                                   "signals", "metrics"))
_OUT_PREDICTIONS = returns({"predictions": "array"})
_OUT_HISTORY = returns({"node": "string", "signals": "array", "signal": "string", "points": "array"},
                       required=("node",))


def sentinel_tools(plugin: SentinelPlugin) -> list[Tool]:
    obj = {"type": "object", "additionalProperties": False}
    node_arg = {"type": "string", "maxLength": 128, "description": "node id (default: the node you are connected to)"}
    return [
        Tool("sentinel_health", "Predictive health of every node: score 0-100, level (healthy, degraded, critical), "
             "raised alerts and the top factors lowering each score.", lambda a, c: health(plugin, a, c), obj,
             toolset="sentinel", output_schema=_OUT_HEALTH),
        Tool("sentinel_node", "One node's health in full: score, every factor, predictions with ETA and confidence, "
             "anomalies and its latest signals.", lambda a, c: node(plugin, a, c),
             {**obj, "properties": {"node": node_arg}}, toolset="sentinel", output_schema=_OUT_NODE),
        Tool("sentinel_predictions", "Every predicted failure across the cluster (disk full, memory exhaustion, drive "
             "failure, memory errors, battery wear), critical and soonest first.", lambda a, c: predictions(plugin, a, c),
             {**obj, "properties": {"severity": {"type": "string", "enum": ["warning", "critical"]}}},
             toolset="sentinel", output_schema=_OUT_PREDICTIONS),
        Tool("sentinel_history", "This node's recorded series of one signal (10 s readings, then 1 min and 1 h means, "
             "30 days); without `signal`, the list of signals.", lambda a, c: history(plugin, a, c),
             {**obj, "properties": {"node": node_arg, "signal": {"type": "string", "maxLength": 300},
                                    "hours": {"type": "number", "minimum": 0.01, "maximum": 720},
                                    "max_points": {"type": "integer", "minimum": 10, "maximum": MAX_POINTS}}},
             toolset="sentinel", output_schema=_OUT_HISTORY),
    ]


def sentinel_resources(plugin: SentinelPlugin) -> list[Resource]:
    return [Resource("cluster://sentinel", "sentinel", "Health score, level and alerts of every node",
                     lambda: health(plugin, {}, Caller()))]

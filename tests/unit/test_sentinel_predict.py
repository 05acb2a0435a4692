"""Sentinel's history, predictions, hysteresis, placement and webhooks, with simulated clocks where time matters."""

from __future__ import annotations

import http.server
import json
import logging
import threading
from pathlib import Path

import pytest

from cortex.sentinel import backtest, records
from cortex.sentinel.history import History
from cortex.sentinel.notify import Alerter, WebhookSender, webhook_document
from cortex.sentinel.predict import HOUR, MemoryView, assess, fit_line, robust_z
from cortex.tasks.scheduler import round_rules, schedule

T0 = 472_222 * 3600.0  # on an hour boundary, as the store's minutes and hours are


def test_history_downsamples_and_keeps_the_finest_resolution(tmp_path):
    h = History(tmp_path / "h.db")
    for i in range(0, 4 * 3600, 10):  # four hours of readings every 10 s
        h.add(T0 + i, {"x": float(i), "gone": None})
        if i % 60 == 0:
            h.compact(T0 + i)
    h.compact(T0 + 4 * 3600)
    assert "gone" not in h.names()  # absent is a gap, never a zero
    points = h.series("x", T0)
    raw = [p for p in points if p[0] >= T0 + 4 * 3600 - 7200]
    assert raw and all((t - T0) % 10 == 0 for t, _ in raw)  # the last two hours at 10 s
    older = [p for p in points if p[0] < T0 + 4 * 3600 - 7200]
    assert older and all((t - T0 - 30) % 60 == 0 for t, _ in older)  # before that, minute means
    assert older[0][1] == pytest.approx(25.0)  # the mean of 0, 10, ..., 50
    assert [t for t, _ in points] == sorted(t for t, _ in points)
    assert h.db.execute("SELECT count(*) FROM hour").fetchone()[0] >= 3


def test_an_unreadable_history_is_moved_aside_and_started_anew(tmp_path, caplog):
    (tmp_path / "h.db").write_bytes(b"this is not a SQLite database" * 200)
    with caplog.at_level(logging.WARNING, logger="cortex.sentinel"):
        h = History(tmp_path / "h.db")
    h.add(T0, {"x": 1.0})
    assert h.series("x", T0) == [(T0, 1.0)]
    moved = [r.fields["moved_to"] for r in caplog.records if hasattr(r, "fields") and "moved_to" in r.fields]
    assert len(moved) == 1 and Path(moved[0]).read_bytes().startswith(b"this is not")


def test_a_failed_write_leaves_the_history_usable(tmp_path):
    h = History(tmp_path / "h.db")
    h.add(T0, {"x": 1.0})
    with pytest.raises(ValueError):
        h.add(T0 + 10, {"y": 2.0, "x": "not a number"})  # fails half way, as a full disk would
    h.add(T0 + 20, {"x": 3.0, "y": 4.0})
    assert h.series("x", T0) == [(T0, 1.0), (T0 + 20, 3.0)] and h.series("y", T0) == [(T0 + 20, 4.0)]


def test_history_is_bounded_in_series_and_size(tmp_path):
    h = History(tmp_path / "h.db")
    h.add(T0, {f"s{i}": 1.0 for i in range(500)})
    assert len(h.names()) == 400
    small = History(tmp_path / "small.db", max_mb=0.5)
    now = T0 + 20 * 86400
    small.db.executemany("INSERT INTO hour VALUES (?, ?, 1.0, 1.0, 1.0, 360)",
                         ((s, T0 + k * 3600, ) for s in range(60) for k in range(480)))
    assert small.size_bytes() > 0.5 * 1024 * 1024
    small.compact(now)
    assert small.size_bytes() <= 0.5 * 1024 * 1024
    newest = small.db.execute("SELECT max(ts) FROM hour").fetchone()[0]
    assert newest == T0 + 479 * 3600  # the oldest days went first


def test_line_fit_and_robust_z():
    fit = fit_line([(T0 + i, 100.0 - 2 * i) for i in range(10)])
    assert fit.slope == pytest.approx(-2.0) and fit.intercept == pytest.approx(82.0) and fit.r2 == pytest.approx(1.0)
    assert fit_line([(T0, 1.0)]) is None
    assert robust_z([10.0] * 30 + [60.0]) == pytest.approx(10.0)  # MAD 0: the floor (5) is the unit
    assert abs(robust_z([10.0, 11.0, 9.0] * 10 + [10.5])) < 1


def _series(data: dict[str, list[tuple[float, float]]]):
    return MemoryView(data)


def test_disk_filling_warns_then_turns_critical_and_clears_with_hysteresis():
    size = 100e9
    data = {"disk.size_bytes:/d": [(T0 + i * 600, size) for i in range(37)]}
    # 20 GB free falling 1 GB per hour: 14 % free with 14 h left -> warning (< 24 h, < 15 %)
    data["disk.avail_bytes:/d"] = [(T0 + i * 600, 20e9 - i * 600 * 1e9 / 3600) for i in range(37)]
    a = assess(_series(data), T0 + 36 * 600)
    (p,) = a.predictions
    assert p["kind"] == "disk_full" and p["severity"] == "warning" and p["eta_s"] == pytest.approx(14 * HOUR, rel=0.01)
    assert p["confidence"] > 0.9 and a.level == "degraded" and a.score == 75.0
    assert a.factors[0]["name"] == "disk_full:/d"
    # 9 % free, 3 h left: critical
    data["disk.avail_bytes:/d"] = [(T0 + i * 600, 20e9 - i * 600 * 4e9 / 3600) for i in range(37)]
    b = assess(_series(data), T0 + 36 * 600)
    assert b.predictions[0]["severity"] == "critical" and b.level == "critical" and b.score == 50.0
    # 16 % free and still falling slowly (ETA 20 h): raised keeps it, a fresh look does not raise it
    data["disk.avail_bytes:/d"] = [(T0 + i * 600, 22e9 - i * 600 * 0.8e9 / 3600) for i in range(37)]
    assert assess(_series(data), T0 + 36 * 600).predictions == []
    assert assess(_series(data), T0 + 36 * 600, raised={"disk_full:/d"}).predictions[0]["severity"] == "warning"


def test_the_leaders_view_of_heartbeats_and_lag_lowers_the_late_nodes_health():
    now = T0
    found = [{"node_id": "n1", "ts": now, "score": 100.0, "level": "healthy", "factors": [],
              "peers": {"w1": {"heartbeat_age": 40.0}, "n2": {"raft_lag": 5000}, "w2": {"heartbeat_age": 1.0}}},
             {"node_id": "n2", "ts": now, "score": 85.0, "level": "healthy", "factors": []},
             {"node_id": "w1", "ts": now - 60, "score": 100.0, "level": "healthy", "factors": []},
             {"node_id": "w2", "ts": now, "score": 100.0, "level": "healthy", "factors": []}]
    view = {r["node_id"]: r for r in records.with_leader_view(found, now)}
    assert view["n1"]["score"] == 100.0 and view["w2"] is found[3]  # the leader's own health is not lowered
    assert view["w1"]["score"] == 90.0 and "last heard from it 40s ago" in view["w1"]["factors"][0]["detail"]
    assert (view["n2"]["score"], view["n2"]["level"]) == (75.0, "degraded")
    assert view["n2"]["factors"][0]["source"] == "leader"


def test_cortex_health_renders_a_table_and_one_node():
    from cortex.sentinel.cli import render, sparkline

    assert sparkline([0, 50, 100], 0, 100) == "▁▄█"
    now = T0 + 60
    rec = {"node_id": "w1", "ts": T0, "score": 50.0, "level": "critical", "raised": ["disk_full:/d"],
           "predictions": [{"key": "disk_full:/d", "kind": "disk_full", "target": "/d", "severity": "critical",
                            "eta_s": 600.0, "confidence": 0.9, "message": "file system /d full in 10 min"}],
           "factors": [{"name": "disk_full:/d", "penalty": 50.0, "detail": "file system /d full in 10 min"}],
           "spark": {"score": [100, 100, 50]}, "metrics": "127.0.0.1:9410"}
    _, table = render([rec], "", now)
    assert "w1" in table and "disk_full /d in 10 min" in table and "██▄" in table
    _, one = render([rec], "w1", now)
    assert "score     50.0 (critical)" in one and "yes" in one and "127.0.0.1:9410" in one
    from cortex.cli.output import UsageError

    with pytest.raises(UsageError, match="nodes with one: w1"):
        render([rec], "w9", now)


def test_absent_signals_make_no_prediction_and_a_full_score():
    assert assess(_series({}), T0).doc() == {"score": 100.0, "level": "healthy", "factors": [],
                                                  "predictions": [], "anomalies": []}


def test_smart_and_ecc_rules_combine_signals():
    flat = [(T0 + i * 60, 0.0) for i in range(10)]
    data = {"smart.ata5:sda": flat, "smart.failed:sda": flat, "disk.io_errors:sda": flat, "edac.ce": flat,
            "edac.ue": flat}
    now = T0 + 600
    assert assess(_series(data), now).predictions == []
    data["smart.ata197:sda"] = [(now, 8.0)]  # a pending sector: Backblaze's flag
    (p,) = assess(_series(data), now).predictions
    assert (p["kind"], p["severity"]) == ("drive_failure", "warning")
    data["disk.io_errors:sda"] = flat + [(now + 1, 3.0)]  # and the kernel counts I/O errors: critical
    (p,) = assess(_series(data), now + 1).predictions
    assert p["severity"] == "critical" and "I/O error" in p["message"]
    data["edac.ce"] = flat + [(now + 1, 2.0)]
    kinds = {p["kind"]: p["severity"] for p in assess(_series(data), now + 1).predictions}
    assert kinds["memory_errors"] == "warning"
    data["edac.ue"] = flat + [(now + 1, 1.0)]
    kinds = {p["kind"]: p["severity"] for p in assess(_series(data), now + 1).predictions}
    assert kinds["memory_errors"] == "critical"


def test_alerter_needs_a_condition_to_hold_and_keeps_it_for_the_minimum_hold():
    a = Alerter(raise_after=30, clear_after=60, min_hold=600)
    p = {"key": "k", "kind": "disk_full", "severity": "warning", "message": "m"}
    assert a.update(T0, [p]) == []
    assert a.update(T0 + 10, []) == []  # one odd reading: forgotten, nothing raised
    assert a.update(T0 + 20, [p]) == [] and a.update(T0 + 40, [p]) == []
    assert [t["state"] for t in a.update(T0 + 50, [p])] == ["raised"]
    assert a.update(T0 + 60, [p]) == []  # raised once, not on every assessment
    assert [t["severity"] for t in a.update(T0 + 70, [{**p, "severity": "critical"}])] == ["critical"]
    assert a.update(T0 + 100, []) == [] and a.update(T0 + 300, []) == []  # gone, but within the minimum hold
    assert a.update(T0 + 640, [p]) == []  # back again: still the same alert
    assert a.update(T0 + 700, []) == []
    assert [t["state"] for t in a.update(T0 + 760, [])] == ["cleared"]


@pytest.mark.parametrize("scenario", backtest.scenarios(quick=True), ids=lambda s: s.name)
def test_backtest_detects_each_fault_with_its_lead_time_and_idles_quietly(scenario, tmp_path):
    out = backtest.run(scenario, tmp_path)
    if not scenario.kind:
        assert out.alerts == []  # 24 simulated idle hours: not one alert
        return
    assert out.detected, f"{scenario.name}: no {scenario.kind} alert"
    assert out.lead_s >= scenario.horizon, f"{scenario.name}: lead {out.lead_s / HOUR:.1f} h"
    assert {a["kind"] for a in out.alerts} == {scenario.kind}  # and nothing else was raised


def test_placement_refuses_critical_nodes_and_ranks_degraded_last():
    now = __import__("time").time()
    recs = [{"node_id": "a", "ts": now, "level": "critical", "score": 20,
             "predictions": [{"severity": "critical", "message": "disk full in 5 min", "key": "disk_full:/"}]},
            {"node_id": "b", "ts": now, "level": "degraded", "score": 70, "predictions": []},
            {"node_id": "c", "ts": now, "level": "healthy", "score": 100, "predictions": []}]
    rows = [{"key": records.key(r["node_id"]), "value": records.encode(r)} for r in recs]
    rules = round_rules([records.SentinelPlacement()], {"noop"}, lambda q, a: rows)
    nodes = [{"id": n, "liveness": "alive", "reported_at": 1, "kinds": ["noop"], "capacity": {"cpus": 4, "slots": 2}}
             for n in ("a", "b", "c")]
    task = {"kind": "noop", "placement": {}, "attempt": 0}
    tasks = [{**task, "id": f"t{i}"} for i in range(5)]
    placed = [a.node_id for a in schedule(tasks, nodes, rules=rules)]
    assert placed == ["c", "c", "b", "b", "a"]  # healthy first, degraded next, critical only as a last resort
    assert "critical" in rules["*"].refusal(task, "a") and rules["*"].refusal(task, "b") == ""


class _Receiver(http.server.BaseHTTPRequestHandler):
    bodies: list = []
    fail_first = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            self.send_response(500)
            self.end_headers()
            return
        type(self).bodies.append(body)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhook_retries_a_failing_receiver_and_logs_it_once(caplog):
    _Receiver.bodies, _Receiver.fail_first = [], 2
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    sender = WebhookSender([url], timeout=10, first_backoff=0.2)
    sender.start()
    doc = webhook_document("w1", {"key": "disk_full:/d", "kind": "disk_full", "target": "/d", "severity": "critical",
                                  "state": "raised", "message": "file system /d full in 5 min", "eta_s": 300.0,
                                  "confidence": 0.9})
    try:
        with caplog.at_level(logging.WARNING, logger="cortex.sentinel"):
            sender.send(doc)
            cleared = {**doc, "state": "cleared"}
            sender.send(cleared)
            from tests.support.wait import wait_until

            wait_until(lambda: len(_Receiver.bodies) == 2, 30, "the webhooks delivered after their receiver recovered")
    finally:
        sender.stop()
        server.shutdown()
    assert _Receiver.bodies == [doc, cleared]  # in order, although the first one failed twice
    assert doc["text"].startswith("[CRITICAL] w1: file system /d")
    assert doc["eta_s"] == 300.0 and doc["message"] == doc["text"]  # ntfy and Slack-style receivers both read it
    named = [r for r in caplog.records if getattr(r, "fields", {}).get("receiver") == url]
    assert len(named) == 1 and sender.failures >= 2  # the 500s (a slow answer on a loaded machine adds one)


def test_the_plugin_alerts_on_the_bus_and_survives_a_dead_webhook(tmp_path, caplog):
    """The plugin's own rounds, driven with a simulated clock: a file system that fills (its statvfs answers
    stand in for a disk; the cluster test fills a real tmpfs) raises a warning, then a critical alert, and the
    event that a takeover acts on, once; the webhook's receiver is down, which is logged once, naming it."""
    import os
    import socket

    from cortex.core.events import EventBus
    from cortex.plugins.api import PluginContext
    from cortex.sentinel.plugin import EVENT_ALERT, EVENT_PREDICTED_FAILURE, SentinelPlugin

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/hook"
    bus = EventBus()
    seen = []
    bus.subscribe("sentinel.*", seen.append)
    options = {"interval": 10.0, "evaluate_every": 30.0, "watch_paths": ["/data"], "proc_root": str(tmp_path / "p"),
               "sys_root": str(tmp_path / "s"), "smartctl": "", "raise_after": 30.0, "clear_after": 120.0,
               "min_hold": 600.0, "webhooks": [dead], "webhook_timeout": 1.0, "metrics_port": 0}
    plugin = SentinelPlugin(PluginContext("sentinel", options, None, bus, tmp_path / "data", logging.getLogger("t")))
    plugin.init()
    free = [50_000.0]
    plugin.collector.statvfs = lambda path: os.statvfs_result((4096, 4096, 100_000, free[0], free[0], 0, 0, 0, 0, 255))
    plugin.webhooks.start()
    try:
        with caplog.at_level(logging.WARNING, logger="cortex.sentinel"):
            for i in range(0, 3 * 3600, 10):  # 3 hours, 40 blocks of 100 000 taken every 10 s: full at about 3.5 h
                free[0] = max(0.0, 50_000 - 4 * i)
                plugin.collect_once(T0 + i, cluster_signals=False)
                if i % 30 == 0:
                    plugin.evaluate(T0 + i)
                if i % 60 == 0:
                    plugin.history.compact(T0 + i)
            from tests.support.wait import wait_until

            wait_until(lambda: plugin.webhooks.failures >= 2, 30, "the webhook tried (and failed) twice")
    finally:
        plugin.stop()
    alerts = [(e.data["severity"], e.data["state"]) for e in seen if e.type == EVENT_ALERT]
    assert alerts[:2] == [("warning", "raised"), ("critical", "raised")]
    failures = [e for e in seen if e.type == EVENT_PREDICTED_FAILURE]
    assert len(failures) == 1 and failures[0].data["kind"] == "disk_full" and failures[0].data["node_id"] == "local"
    named = [r for r in caplog.records if getattr(r, "fields", {}).get("receiver") == dead]
    assert len(named) == 1
    assert plugin.assessment["level"] == "critical"


def test_the_plugin_started_again_after_a_stop_collects_and_answers_history(tmp_path):
    """`cortex plugins stop|start sentinel` calls stop() then start() on the same object: the history file stop()
    closed is reopened and the collection thread runs again (the console's health charts read it)."""
    from cortex.core.events import EventBus
    from cortex.plugins.api import Caller, PluginContext, ToolError
    from cortex.sentinel.plugin import SentinelPlugin
    from cortex.sentinel.tools import history
    from tests.support.wait import wait_until

    options = {"interval": 0.2, "evaluate_every": 0.2, "proc_root": str(tmp_path / "p"), "sys_root": str(tmp_path / "s"),
               "smartctl": "", "metrics_port": 0}
    plugin = SentinelPlugin(PluginContext("sentinel", options, None, EventBus(), tmp_path / "data", logging.getLogger("t")))
    plugin.init()

    def points() -> int:
        return len(history(plugin, {"signal": "agent.restarts", "hours": 1}, Caller())["points"])
    try:
        plugin.start()
        wait_until(lambda: points() >= 1, 30, "a first reading", interval=0.05, ignore=(ToolError,))
        plugin.stop()
        plugin.start()
        first = points()
        wait_until(lambda: points() >= first + 2, 30, "readings after the start again", interval=0.05)
    finally:
        plugin.stop()


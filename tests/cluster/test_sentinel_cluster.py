"""The sentinel end to end on a real cluster: a worker's disk fills, the sentinel predicts it, raises an alert
(the cluster's alerts, the inbox, a local webhook receiver), drains the worker, and the next tasks land elsewhere;
a second worker, squelched for maintenance, fills too: it drains, its alert is listed as squelched, and it
notifies nobody; a service at home on the first worker moves to its partner before the predicted failure
(`services.takeover_on_prediction`).

Every node watches its own size-capped tmpfs (root only, as CI runs), so nothing else on the machine moves
the numbers; one cluster (a server and two workers) serves every check here.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import threading
import time
import urllib.request

import pytest

from cortex.cli.main import main as cortex_cli
from cortex.dev import cluster as devcluster
from cortex.sentinel import records
from cortex.tasks import api
from tests.support.cluster import Cluster, free_base_port
from tests.support.wait import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting small tmpfs file systems needs root")
NODES = ("n1", "w1", "w2")


class _Receiver(http.server.BaseHTTPRequestHandler):
    bodies: list = []

    def do_POST(self):
        type(self).bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def sentinel_cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("sentinel")
    disks = base / "disks"
    mounted = []
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    options = {"interval": 0.5, "evaluate_every": 1.0, "raise_after": 1.0, "clear_after": 5.0, "min_hold": 5.0,
               "watch_paths": [str(disks / "{node_id}")], "smartctl": "", "metrics_port": 0,
               "webhooks": [f"http://127.0.0.1:{receiver.server_address[1]}/hook"], "auto_drain": True,
               "drain_deadline": 0}
    try:
        for node in NODES:
            (disks / node).mkdir(parents=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", f"cortex-sentinel-{node}", str(disks / node)],
                           check=True)
            mounted.append(disks / node)
        dc = devcluster.up(base / "cluster", 1, 2, free_base_port(), timeout=90,
                           plugins={"sentinel": options, "services": {"takeover_on_prediction": True}})
        try:
            yield Cluster(dc), disks, _Receiver.bodies
        finally:
            devcluster.down(base / "cluster")
    finally:
        receiver.shutdown()
        for path in mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def _records(c) -> dict[str, dict]:
    return {r["node_id"]: r for r in records.read_all(lambda q, a: c.read(q, a, level="leader"))}


def test_a_filling_disk_is_predicted_alerted_and_drained(sentinel_cluster, capsys):
    cluster, disks, hooks = sentinel_cluster
    c = cluster.client("n1")

    def tool(name: str, args: dict, node: str = "n1"):
        assert cortex_cli(["--addr", cluster.node(node).grpc_address, "--json", "tools", "call", name,
                           "--args", json.dumps(args)]) == 0
        return json.loads(capsys.readouterr().out)

    healthy = wait_until(lambda: (lambda r: r if set(NODES) <= set(r) and all(
        x["level"] == "healthy" for x in r.values()) else None)(_records(c)), 60,
        "every node publishing a healthy summary", ignore=(Exception,))
    metrics = healthy["w1"]["metrics"]
    text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10).read().decode()
    assert 'cortex_sentinel_score{node="w1"} 100.0' in text and "cortex_sentinel_disk_avail_bytes" in text

    # a service at home on w1, with n1 (whose disk never moves) as its HA partner
    tool("services_deploy", {"spec": {"name": "keeper", "kind": "shell", "command": "exec sleep 3600",
                                      "placement": {"home": "w1", "partner": "n1"}, "auto_giveback": False}})
    wait_until(lambda: (lambda s: s if s and s["holder"] == "w1" and s["ready_at"] is not None else None)(
        c.read("service.get", {"name": "keeper"})), 60, "keeper running at home on w1")

    # w2 is under maintenance: its alerts are squelched (they still show, and it still drains)
    tool("squelch_alerts", {"pattern": "sentinel.*@w2", "minutes": 30})
    # fill w1's and w2's disks steadily (the trend needs a few readings), stopping short of full
    fillers = [os.open(disks / n / "filler", os.O_WRONLY | os.O_CREAT, 0o600) for n in ("w1", "w2")]
    try:
        for _ in range(58):
            for fd in fillers:
                os.write(fd, b"\0" * (256 * 1024))
            time.sleep(0.1)
    finally:
        for fd in fillers:
            os.close(fd)

    hook = wait_until(lambda: next((h for h in list(hooks) if h["node"] == "w1" and h["kind"] == "disk_full"
                                    and h["severity"] == "critical" and h["state"] == "raised"), None), 60,
                      "a critical disk_full webhook for w1")
    assert hook["text"].startswith("[CRITICAL] w1: file system") and hook["target"] == str(disks / "w1")

    r = wait_until(lambda: (lambda x: x if x.get("raised") else None)(_records(c).get("w1", {})), 30,
                   "w1's summary naming its raised alert")
    assert r["level"] == "critical" and r["predictions"][0]["kind"] == "disk_full"
    inbox = wait_until(lambda: [m for m in c.read("message.list", {"recipient": "ops"})
                                if m["sender"] == "sentinel@w1"], 30, "the sentinel's message in the ops inbox")
    assert "disk_full" in inbox[-1]["subject"] or "disk_full" in inbox[0]["subject"]
    alert_key = f"sentinel.disk_full:{disks / 'w1'}@w1"
    listed = wait_until(lambda: (lambda x: x if any(a["key"].endswith("@w2") for a in x["squelched"]) else None)(
        tool("list_alerts", {})), 30, "w2's alert listed as squelched")
    assert alert_key in [a["key"] for a in listed["alerts"]]

    # auto_drain: w1 is drained, so new tasks land elsewhere
    wait_until(lambda: {n["id"] for n in c.read("task.nodes", {}) if n["drained"]} == {"w1", "w2"}, 30,
               "w1 and w2 drained by their sentinels")
    # services.takeover_on_prediction: w1's service moved to its partner before the predicted failure
    moved = wait_until(lambda: (lambda s: s if s["holder"] == "n1" and s["ready_at"] is not None else None)(
        c.read("service.get", {"name": "keeper"})), 60, "keeper taken over by n1 after w1's critical prediction")
    assert moved["home"] == "w1"
    ids = api.submit(c, [{"kind": "noop", "name": f"after-{i}"} for i in range(4)])
    done = wait_until(lambda: (lambda ts: ts if all(t["state"] == "succeeded" for t in ts) else None)(
        [c.read("task.get", {"id": i}) for i in ids]), 60, "the tasks submitted after the drain")
    assert {t["node"] for t in done} == {"n1"}  # both workers drained themselves

    assert cortex_cli(["--addr", cluster.node("w2").grpc_address, "--json", "health", "w1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["level"] == "critical" and shown["metrics"] == metrics
    assert cortex_cli(["--addr", cluster.node("w2").grpc_address, "--json", "status"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["w1"] == metrics

    # the MCP tools, called through a server that is not the node concerned
    assert tool("sentinel_health", {})["status"] == "critical"
    found = tool("sentinel_predictions", {"severity": "critical"})["predictions"]
    assert {(p["node"], p["kind"], p["raised"]) for p in found} == {("w1", "disk_full", True), ("w2", "disk_full", True)}
    assert tool("sentinel_node", {"node": "w1"})["level"] == "critical"
    local = tool("sentinel_node", {}, node="w1")  # asked on w1 itself: its live assessment
    assert (local["source"], local["level"]) == ("local", "critical") and local["signals"]["agent.restarts"] == 1
    own = tool("sentinel_history", {}, node="w1")
    assert f"disk.avail_bytes:{disks / 'w1'}" in own["signals"]
    series = tool("sentinel_history", {"signal": f"disk.avail_pct:{disks / 'w1'}", "hours": 1}, node="w1")["points"]
    assert series[0][1] > 90 > series[-1][1]  # the fill, as w1 recorded it

    # the squelch muted w2's notifications, only those; n1's disk never moved
    assert {h["node"] for h in hooks} == {"w1"}
    assert [m for m in c.read("message.list", {"recipient": "ops"}) if m["sender"] == "sentinel@w2"] == []

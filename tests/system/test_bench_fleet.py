"""Smoke test of `python -m bench.fleet` at a tiny N: it starts 3 servers, enrolls simulated workers with
certificates of their own, drives their heartbeats and assignment pulls, and prints and writes the curve.
Not a timed test: the bar (heartbeat p99, leader CPU) is a result, not an assertion."""

import json
import os
import sys
from pathlib import Path

import pytest

from cortex.dev import cluster as devcluster
from tests.support import procs
from tests.support.cluster import free_base_port

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.bench, pytest.mark.timeout(240)]


def test_bench_fleet_tiny_curve(tmp_path):
    out = tmp_path / "fleet.json"
    env = {**os.environ, devcluster.DIE_WITH_PARENT_ENV: "1"}  # its agents die with it, however it ends
    # --quick: a step that misses the bar is not measured again (a loaded machine ends the curve, allowed below)
    proc = procs.run([sys.executable, "-m", "bench.fleet", "--quick", "--sizes", "3,6", "--window", "2",
                      "--json", str(out),
                      "--base-port", str(free_base_port(10))],
                     cwd=ROOT, capture_output=True, text=True, timeout=200, env=env)
    report = f"stdout:\n{proc.stdout}\nstderr (tail):\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, report
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert rows and [r["n"] for r in rows] == [3, 6][:len(rows)], report
    assert len(rows) == 2 or not rows[0]["pass"], report  # the curve ends early only at a failed bar
    for r in rows:
        assert r["heartbeats"] > 0 and r["pulls"] > 0, report
        assert r["heartbeat_p99_ms"] >= r["heartbeat_p50_ms"] > 0, report
        assert r["alive"] == r["n"], report  # the leader sees every simulated worker
        assert r["leader_cpu"] >= 0 and r["leader_rss_mb"] > 0, report
        assert r["pass"] == (r["heartbeat_p99_ms"] < 200 and r["leader_cpu"] < 50 and r["flapped"] == 0
                             and not r["leader_changed"]), report
    assert doc["largest_passing"] in (0, 3, 6) and len(doc["load_average"]) == 3
    assert "hb p99 ms" in proc.stdout and "largest N with heartbeat p99" in proc.stdout, report
    assert "N=6: measuring" in proc.stderr or not rows[0]["pass"], report  # progress lines


def test_bench_fleet_refuses_a_bad_curve():
    proc = procs.run([sys.executable, "-m", "bench.fleet", "--sizes", "100,50"], cwd=ROOT, capture_output=True,
                     text=True, timeout=60)
    assert proc.returncode == 2 and "--sizes must be increasing positive numbers" in proc.stderr

"""The GPU path: nvidia-smi read through a faithful stand-in (tests/fixtures/nvidia_smi/nvidia-smi prints the real
`--query-gpu ... --format=csv,noheader,nounits` format), and GPU tasks placed only where a GPU is."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cortex.dev import cluster as devcluster
from cortex.tasks import resources
from tests.support.wait import wait_for_value

FAKE_DIR = Path(__file__).parent / "fixtures" / "nvidia_smi"


def test_gpus_and_their_load_are_read_from_nvidia_smi(monkeypatch):
    monkeypatch.setenv("PATH", f"{FAKE_DIR}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CORTEX_FAKE_GPUS", json.dumps([
        {"name": "NVIDIA GeForce RTX 4090", "memory_mb": 24564, "util": 85},
        {"name": "NVIDIA A100-SXM4-80GB", "memory_mb": 81920, "util": None}]))  # utilization "[N/A]"
    assert resources.gpus() == [resources.Gpu(0, "NVIDIA GeForce RTX 4090", 24564, 85),
                                resources.Gpu(1, "NVIDIA A100-SXM4-80GB", 81920, 0)]
    snap = resources.snapshot("/", busy_names=[])
    assert snap["capacity"]["gpus"] == 2
    assert [g["memory_mb"] for g in snap["usage"]["gpus"]] == [24564, 81920]
    assert snap["busy"] is True and snap["busy_reasons"] == ["GPU 0 at 85%"]  # someone is gaming on GPU 0


def test_no_nvidia_smi_or_a_failing_one_means_no_gpus(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert resources.gpus() == []
    broken = tmp_path / "nvidia-smi"  # what a driver/library version mismatch looks like: an error, exit 9
    broken.write_text("#!/bin/sh\necho 'Failed to initialize NVML: Driver/library version mismatch'\nexit 9\n")
    broken.chmod(0o755)
    assert resources.gpus() == []


def test_a_gpu_task_runs_only_on_the_node_with_a_gpu(make_cluster):
    cluster = make_cluster(servers=1, workers=2)
    w2 = cluster.node("w2")
    devcluster.stop_node(w2)
    devcluster.start_node(w2, env={"PATH": f"{FAKE_DIR}{os.pathsep}{os.environ['PATH']}",
                                   "CORTEX_FAKE_GPUS": json.dumps([{"name": "NVIDIA GeForce RTX 4090",
                                                                    "memory_mb": 24564, "util": 0}])})
    cluster.dc.save()
    with cluster.client("n1", timeout=15) as c:
        nodes = wait_for_value(lambda: {n["id"]: n for n in c.read("task.nodes", {})},
                               lambda ns: all(ns.get(i, {}).get("reported_at") for i in ("n1", "w1", "w2"))
                               and ns["w2"]["capacity"].get("gpus") == 1, 60, "w2 to report its GPU", interval=0.2)
        assert nodes["n1"]["capacity"]["gpus"] == 0 and nodes["w1"]["capacity"]["gpus"] == 0
        gpu_ids = c.write("task.submit", {"tasks": [{"kind": "noop", "spec": {"sleep": 0.3},
                                                     "placement": {"gpus": 1}}] * 3})["task_ids"]
        cpu_ids = c.write("task.submit", {"tasks": [{"kind": "noop"}] * 6})["task_ids"]
        tasks = wait_for_value(lambda: {i: c.read("task.get", {"id": i}) for i in gpu_ids + cpu_ids},
                               lambda ts: all(t["state"] == "succeeded" for t in ts.values()), 60,
                               "every task succeeded", interval=0.2)
    assert {tasks[i]["node"] for i in gpu_ids} == {"w2"}
    # one GPU: the GPU tasks ran one after another, never two at once
    spans = sorted((tasks[i]["started_at"], tasks[i]["finished_at"]) for i in gpu_ids)
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), spans
    assert {tasks[i]["node"] for i in cpu_ids} <= {"n1", "w1", "w2"}

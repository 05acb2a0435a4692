"""The resource monitor and the compute benchmark measure this machine (no GPU here: none reported)."""

from __future__ import annotations

import os

import psutil

from cortex.tasks import resources


def test_snapshot_reports_capacity_usage_and_the_busy_signal():
    snap = resources.snapshot("/", busy_names=[])
    assert snap["capacity"]["cpus"] == os.cpu_count()
    assert snap["capacity"]["memory_mb"] > 0 and snap["usage"]["memory_available_mb"] > 0
    assert snap["busy"] is False and snap["busy_reasons"] == []
    # a configured "game" that is running (this very interpreter) makes the node busy
    me = psutil.Process().name()
    busy = resources.snapshot("/", busy_names=[me])
    assert busy["busy"] is True and busy["busy_reasons"] == [f"process {me} running"]


def test_benchmark_measures_flops_and_memory_bandwidth():
    result = resources.benchmark(seconds=0.05)  # in a child process, as the agent runs it
    assert result["flops_single"] > 1e6 and result["flops_multi"] > 1e6
    assert result["memory_bandwidth"] > 1e7 and result["cores"] == os.cpu_count()

"""What a node has and how busy it is (psutil, nvidia-smi when present), and a measured compute benchmark.

`snapshot()` is cheap and taken often; the engine replicates a report only when the *capacity* or the busy
flag changes, or every REPORT_PERIOD seconds, so resource monitoring costs the Raft log a few entries per
node per minute, never one per second per node.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import psutil

REPORT_PERIOD = 30.0
GPU_BUSY_PERCENT = 60  # a GPU this loaded means someone (a game, a training run) is using the machine


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_mb: int
    utilization: int  # percent


def gpus() -> list[Gpu]:
    """GPUs through nvidia-smi (NVML's command-line face); none when it is absent or fails."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index,name,memory.total,utilization.gpu",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    found = []
    for line in out.stdout.splitlines():
        # "0, NVIDIA GeForce RTX 4090, 24564, 3"; a name may itself hold a comma, so count from both ends
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4 or not parts[0].isdigit():
            continue
        name, memory, util = ", ".join(parts[1:-2]), _smi_number(parts[-2]), _smi_number(parts[-1])
        # a GPU whose utilization the driver does not report ("[N/A]", "[Not Supported]") is still a GPU
        found.append(Gpu(int(parts[0]), name, int(memory or 0), int(util or 0)))
    return found


def _smi_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def busy_processes(names: list[str]) -> list[str]:
    """Which of the configured process names (games, a video editor...) are running now."""
    if not names:
        return []
    wanted = {n.lower() for n in names}
    running = set()
    for proc in psutil.process_iter(["name"]):
        name = (proc.info.get("name") or "").lower()
        if name in wanted:
            running.add(name)
    return sorted(running)


def snapshot(data_dir: str = "/", busy_names: list[str] | None = None) -> dict:
    """{capacity, usage, busy, busy_reasons}: capacity changes rarely, usage always."""
    vm = psutil.virtual_memory()
    disk = psutil.disk_usage(data_dir if os.path.exists(data_dir) else "/")
    net = psutil.net_io_counters()
    load1, load5, _ = os.getloadavg()
    gpu_list = gpus()
    reasons = [f"process {p} running" for p in busy_processes(busy_names or [])]
    reasons += [f"GPU {g.index} at {g.utilization}%" for g in gpu_list if g.utilization >= GPU_BUSY_PERCENT]
    return {
        "capacity": {"cpus": psutil.cpu_count() or 1, "memory_mb": vm.total // (1024 * 1024),
                     "gpus": len(gpu_list), "disk_gb": round(disk.total / 1e9, 1)},
        "usage": {"cpu_percent": psutil.cpu_percent(interval=None), "load1": round(load1, 2),
                  "load5": round(load5, 2), "memory_available_mb": vm.available // (1024 * 1024),
                  "disk_free_gb": round(disk.free / 1e9, 1), "net_sent_mb": net.bytes_sent // 10**6,
                  "net_recv_mb": net.bytes_recv // 10**6,
                  "gpus": [{"index": g.index, "name": g.name, "memory_mb": g.memory_mb, "util": g.utilization}
                           for g in gpu_list]},
        "busy": bool(reasons),
        "busy_reasons": reasons,
    }


# --- compute benchmark ---------------------------------------------------------------------------------------

def _flops_one(seconds: float, size: int = 1 << 14) -> float:
    """Floating-point operations per second of one thread: a*b+c on arrays that stay in cache."""
    import numpy as np

    a, b, c = np.random.rand(size), np.random.rand(size), np.random.rand(size)
    out = np.empty(size)
    ops = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            np.multiply(a, b, out=out)
            np.add(out, c, out=out)
        ops += 50 * 2 * size
    return ops / (time.perf_counter() - start)


def _bandwidth(seconds: float, mb: int = 64) -> float:
    """Memory bandwidth in bytes/s: copying a buffer far larger than the caches (read + write counted)."""
    import numpy as np

    src = np.ones(mb * 1024 * 1024 // 8)
    dst = np.empty_like(src)
    moved = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        np.copyto(dst, src)
        moved += 2 * src.nbytes
    return moved / (time.perf_counter() - start)


def benchmark(seconds: float = 0.25) -> dict:
    """The benchmark in a child process: the agent itself never loads numpy (its memory stays small)."""
    out = subprocess.run([sys.executable, "-m", "cortex.tasks.resources", str(seconds)], capture_output=True,
                         text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout)


def benchmark_here(seconds: float = 0.25) -> dict:
    """Single- and multi-core FLOPS and memory bandwidth, measured here and now (numpy releases the GIL in
    its loops, so one thread per core measures the cores together)."""
    single = _flops_one(seconds)
    cores = psutil.cpu_count() or 1
    results: list[float] = []
    threads = [threading.Thread(target=lambda: results.append(_flops_one(seconds))) for _ in range(cores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"flops_single": round(single), "flops_multi": round(sum(results)),
            "memory_bandwidth": round(_bandwidth(seconds)), "cores": cores, "measured_at": time.time(),
            "seconds": seconds}


if __name__ == "__main__":
    print(json.dumps(benchmark_here(float(sys.argv[1]) if len(sys.argv) > 1 else 0.25)))

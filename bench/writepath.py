"""Write-path benchmark: latency and CPU per write, split by process.

    python -m bench.writepath [--seq 300] [--pipe 3000] [--concurrency 64] [--base-port 30600] [--json PATH]

Starts a 3-server dev cluster on 127.0.0.1 and measures sequential puts via the leader and via a follower
(p50 / p99) and unary puts with `--concurrency` in flight via the leader (/s). For each it reports the CPU
time (user + system, from /proc) that the leader, the follower and this client process spent per write.
On a shared machine the rates and latencies move with the load; the CPU per write moves much less, so it
is the figure to compare runs by (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path

from cortex.dev import cluster as devcluster

from . import measure
from .cortex_adapter import CortexBench, CortexClient


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _per_write(pids: dict[str, int], run, count: int) -> tuple[object, dict[str, float]]:
    before = {k: _cpu_seconds(p) for k, p in pids.items()}
    result = run()
    return result, {k: (_cpu_seconds(p) - before[k]) / count * 1e6 for k, p in pids.items()}


def run(seq: int, pipe: int, concurrency: int, base_port: int) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="cortex-writepath-"))
    dc = devcluster.up(work / "cortex", servers=3, workers=0, base_port=base_port, timeout=60.0,
                       progress=lambda s: print(f"[writepath] {s}", file=sys.stderr, flush=True))
    cb = CortexBench(dc)
    rows = []
    try:
        leader, follower = cb.leader(), cb.follower()
        pids = {"leader": leader.pid, "follower": follower.pid, "client": os.getpid()}
        with CortexClient(leader.grpc_address) as lc, CortexClient(follower.grpc_address) as fc:
            for c in (lc, fc):  # connections up and code paths warm before any clock runs
                for i in range(20):
                    c.put(f"bench/warmup/{i}", b"w")
            for label, client in (("seq put via leader", lc), ("seq put via follower", fc)):
                samples, cpu = _per_write(pids, lambda c=client: measure.sequential_put_latency(c, seq), seq)
                q = statistics.quantiles(samples, n=100)
                rows.append({"metric": label, "p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3, "rate": None,
                             **{f"cpu_us_{k}": v for k, v in cpu.items()}})
            rate, cpu = _per_write(pids, lambda: measure.pipelined_throughput(lc, pipe, concurrency), pipe)
            rows.append({"metric": f"unary puts via leader, {concurrency} in flight", "p50_ms": None,
                         "p99_ms": None, "rate": rate, **{f"cpu_us_{k}": v for k, v in cpu.items()}})
    finally:
        cb.close()
        with contextlib.suppress(Exception):
            devcluster.down(work / "cortex", purge=True)
        for node in dc.nodes:
            with contextlib.suppress(Exception):
                devcluster.stop_node(node, signal.SIGKILL, wait=5.0)
        shutil.rmtree(work, ignore_errors=True)
    return rows


def table(rows: list[dict]) -> str:
    def cell(v, fmt):
        return "" if v is None else format(v, fmt)

    head = ["metric", "p50 ms", "p99 ms", "/s", "cpu us/write leader", "follower", "client"]
    body = [[r["metric"], cell(r["p50_ms"], ".2f"), cell(r["p99_ms"], ".2f"), cell(r["rate"], ",.0f"),
             cell(r["cpu_us_leader"], ",.0f"), cell(r["cpu_us_follower"], ",.0f"), cell(r["cpu_us_client"], ",.0f")]
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  ".join(v.ljust(widths[i]) if i == 0 else v.rjust(widths[i]) for i, v in enumerate(row))
             for row in [head, ["-" * w for w in widths], *body]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.writepath", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=300, help="sequential puts per endpoint")
    ap.add_argument("--pipe", type=int, default=3000, help="pipelined unary puts")
    ap.add_argument("--concurrency", type=int, default=64, help="unary puts in flight")
    ap.add_argument("--base-port", type=int, default=30600, help="first port of the dev cluster")
    ap.add_argument("--json", metavar="PATH", help="also write the rows (and the load average) as JSON")
    args = ap.parse_args(argv)
    if args.seq < 2 or args.pipe < 1 or args.concurrency < 1:
        ap.error("--seq needs at least 2 puts, --pipe and --concurrency at least 1")
    rows = run(args.seq, args.pipe, args.concurrency, args.base_port)
    load = os.getloadavg()
    print(f"write path, 3 servers on 127.0.0.1, {os.cpu_count()} CPUs, load average "
          + " / ".join(f"{x:.1f}" for x in load))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "load_average": list(load)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

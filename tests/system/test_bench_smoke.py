"""Smoke test of the benchmark program: `python -m bench --quick` runs end to end.

Not a timed test -- it only checks that the program starts both clusters,
measures every row, prints the table and cleans up.  `--quick` takes about
20-30 s (two 3-node clusters, small sample sizes), so it runs with the suite.
Without /usr/bin/etcd the benchmark runs Cortex only and the etcd cells read n/a.
"""

import json
import os
import re
import sys
from pathlib import Path

import pytest

from tests.support import procs

ROOT = Path(__file__).resolve().parents[2]
ETCD_BIN = "/usr/bin/etcd"

pytestmark = [pytest.mark.bench, pytest.mark.timeout(450)]

ROWS = [
    "seq put via leader p50 (ms)",
    "seq put via leader p99 (ms)",
    "seq put via follower p50 (ms)",
    "seq put via follower p99 (ms)",
    "pipelined puts, unary x64 in flight (/s)",
    "pipelined puts, WriteBatch",
    "linearizable get via leader p50 (ms)",
    "linearizable get via follower p50 (ms)",
    "stale/serializable get via follower p50 (ms)",
    "idle RSS per server, max (MB)",
    "idle CPU per server, max (%)",
    "failover kill -9 leader -> write acked, median (s)",
    "failover kill -9 leader -> write acked, max (s)",
]


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_bench_quick(tmp_path):
    if importlib_missing("grpc_tools") and os.path.exists(ETCD_BIN):
        pytest.skip("grpcio-tools is needed to compile bench/etcd_kv.proto")
    out_json = tmp_path / "bench.json"
    proc = procs.run(
        # --no-tasks: the task-engine part would add a cluster and a minute; this smoke test covers the core
        [sys.executable, "-m", "bench", "--quick", "--no-tasks", "--json", str(out_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
    )
    report = f"stdout:\n{proc.stdout}\nstderr (tail):\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, report

    lines = proc.stdout.splitlines()
    header = next((i for i, line in enumerate(lines) if line.startswith("metric ")), None)
    assert header is not None, report
    table = {}
    for line in lines[header + 2:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        table[cells[0]] = cells
    have_etcd = os.path.exists(ETCD_BIN)
    for row in ROWS:
        match = [cells for label, cells in table.items() if label.startswith(row)]
        assert len(match) == 1, f"row {row!r} missing or ambiguous\n{report}"
        cells = match[0]
        cortex, etcd = cells[1], cells[2]
        if row.startswith("idle CPU"):  # an idle process may honestly read 0.0 %
            assert _number(cortex) >= 0, report
        else:
            assert _number(cortex) > 0, f"{row}: cortex {cortex!r}\n{report}"
        if have_etcd:
            assert _number(etcd) >= 0 if row.startswith("idle CPU") else _number(etcd) > 0, \
                f"{row}: etcd {etcd!r}\n{report}"
            assert _number(cells[3]) > 0, f"{row}: ratio {cells[3]!r}\n{report}"
        else:
            assert etcd == "n/a", report

    doc = json.loads(out_json.read_text())
    assert doc["quick"] is True
    assert not doc["cortex"]["errors"], doc["cortex"]["errors"]
    assert len(doc["cortex"]["details"]["idle_rss_mb"]) == 3
    membership = {row[0]: row for row in doc["membership"]}
    for metric in ("cortex join -> alive (worker)", "resume -> alive (SIGCONT+SIGUSR1)", "dead worker -> suspect",
                   "dead worker -> offline"):
        assert membership[metric][1] > 0, f"{metric}: {membership.get(metric)}\n{report}"
    assert "Membership, 3 servers + workers" in proc.stdout, report
    assert doc["tasks"] is None  # skipped, and said so in the one document


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None

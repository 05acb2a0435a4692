"""Smoke test of the MCP benchmark: `python -m bench.mcp --quick` runs end to end (not a timed test)."""

import json
import sys
from pathlib import Path

import pytest

from tests.support import procs
from tests.support.cluster import free_base_port

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.bench, pytest.mark.timeout(300)]


def test_bench_mcp_quick(tmp_path):
    out = tmp_path / "mcp.json"
    proc = procs.run([sys.executable, "-m", "bench.mcp", "--quick", "--json", str(out),
                      "--base-port", str(free_base_port())], cwd=ROOT, capture_output=True, text=True,
                     timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["metric"]: r for r in json.loads(out.read_text())["rows"]}
    assert any(m.startswith("stdio read kv_get") for m in rows)
    assert "stdio write kv_put via follower (forwarded)" in rows
    assert all(r["n"] == 30 and r["p50_ms"] > 0 for r in rows.values())
    assert "stdio write kv_put via follower (forwarded)" in proc.stdout  # the printed table

"""Smoke test of `python -m bench.journal`: it runs, prints one row per journal and writes the same figures
as JSON (not a timed test: the figures depend on the disk)."""

import json
import sys
from pathlib import Path

import pytest

from tests.support import procs

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.bench, pytest.mark.timeout(120)]


def test_bench_journal_runs(tmp_path):
    out = tmp_path / "journal.json"
    proc = procs.run([sys.executable, "-m", "bench.journal", "--entries", "64", "--dir", str(tmp_path),
                      "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())["results"]
    assert [r["journal"] for r in results][0] == "pysyncobj mmap, fdatasync per entry"
    assert len(results) == 4 and all(r["entries_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] for r in results)
    for r in results:
        assert r["journal"] in proc.stdout
    refused = procs.run([sys.executable, "-m", "bench.journal", "--entries", "0"], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--entries and --size must be at least 1" in refused.stderr

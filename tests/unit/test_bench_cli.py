"""`just bench` runs one program that gives each benchmark the options it understands and writes one JSON
document: the core table keeps its keys (`rows[].key`, `membership`) and the task-engine rows join it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import __main__ as core
from bench import tasks

ROOT = Path(__file__).resolve().parents[2]


def _recipe(name: str) -> list[str]:
    lines = (ROOT / "Justfile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"{name}( |:)", line))
    body = []
    for line in lines[start + 1:]:
        if not line.startswith("    "):
            break
        body.append(line.strip())
    return body


def test_just_bench_runs_one_program_with_the_given_options():
    runs = [line for line in _recipe("bench") if "python -m bench" in line]
    assert runs == ["{{bin}}/python -m bench {{args}}"]


def test_every_option_of_the_core_benchmark_is_understood():
    out = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    for option in ("--quick", "--json", "--base-port", "--keep", "--no-membership", "--no-tasks"):
        assert option in out


def test_the_task_benchmark_alone_refuses_options_it_does_not_have():
    with pytest.raises(SystemExit) as exc:
        tasks.main(["--no-membership"])
    assert exc.value.code == 2


def test_one_json_document_holds_every_table():
    cortex_res, etcd_res = core.Results("cortex"), core.Results("etcd")
    cortex_res.values.update(idle_rss_max=60.0, put_leader_p50=2.0)
    etcd_res.values.update(idle_rss_max=30.0, put_leader_p50=1.0)
    rows = core.build_rows(cortex_res, etcd_res)
    task_rows = [{"metric": "submit->running p50 (ms)", "value": 5.0, "target": "<= 10", "met": True}]
    doc = core.document(True, core.QUICK, 1.0, True, rows, cortex_res, etcd_res, [{"key": "join"}], task_rows)
    doc = json.loads(json.dumps(doc, default=str))
    assert [r["key"] for r in doc["rows"]] == [m[0] for m in core.METRICS]
    rss = next(r for r in doc["rows"] if r["key"] == "idle_rss_max")
    assert (rss["cortex"], rss["etcd"], rss["ratio"]) == (60.0, 30.0, 2.0)
    assert doc["membership"] == [{"key": "join"}]
    assert doc["tasks"] == task_rows
    assert len(doc["load_average"]) == 3


def test_the_write_path_benchmark_refuses_sizes_it_cannot_measure_and_prints_one_row_per_pattern(capsys):
    from bench import writepath

    with pytest.raises(SystemExit) as exc:
        writepath.main(["--seq", "1"])
    assert exc.value.code == 2 and "--seq needs at least 2" in capsys.readouterr().err
    rows = [{"metric": "seq put via leader", "p50_ms": 2.5, "p99_ms": 9.0, "rate": None,
             "cpu_us_leader": 1500.0, "cpu_us_follower": 600.0, "cpu_us_client": 400.0},
            {"metric": "unary puts via leader, 64 in flight", "p50_ms": None, "p99_ms": None, "rate": 1234.5,
             "cpu_us_leader": 550.0, "cpu_us_follower": 90.0, "cpu_us_client": 150.0}]
    lines = writepath.table(rows).splitlines()
    assert len(lines) == 4 and "2.50" in lines[2] and "1,500" in lines[2] and "1,234" in lines[3]

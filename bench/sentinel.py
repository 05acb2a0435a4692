"""The sentinel's benchmark: fault detection in a simulated-clock backtest, collection cost, history size.

    python -m bench.sentinel [--quick] [--json FILE]

- detection: every fault class of `cortex.sentinel.backtest` (disk filling, memory leak, SMART on ATA and
  NVMe, kernel I/O errors without SMART, ECC, battery wear) injected into a noisy idle baseline and run
  through the real History, `assess` and Alerter with a simulated clock; each must be raised at least its
  horizon before the failure; a 24 h idle timeline must raise nothing (false_alarms_idle_24h);
- collect_cpu_pct: the CPU time of one real collection round on this machine (procfs, sysfs, statvfs, the
  history insert; an assessment every third round, as at the default 10 s / 30 s) over the 10 s interval,
  as a share of one core;
- history_mb_30d: the store's file at steady state for a node with --series signals: 2 h of 10 s readings,
  48 h of minute means and 30 days of hourly ones, written as the store keeps them.

Targets: every fault detected, 0 false alarms, collection <= 0.5 % of one core, history <= 50 MB per node.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import measure
from cortex.sentinel import backtest
from cortex.sentinel.collect import Collector
from cortex.sentinel.history import History
from cortex.sentinel.plugin import history_size_mb
from cortex.sentinel.predict import assess

INTERVAL = 10.0


def detection(quick: bool) -> list[dict]:
    out = []
    for scenario in backtest.scenarios(quick):
        started = time.perf_counter()
        r = backtest.run(scenario)
        out.append({"scenario": r.scenario, "kind": r.kind or "(idle)", "detected": r.detected,
                    "lead_s": r.lead_s, "horizon_s": r.horizon_s, "alerts": len(r.alerts),
                    "ok": (not r.alerts) if not r.kind else bool(r.detected and r.lead_s >= r.horizon_s),
                    "seconds": round(time.perf_counter() - started, 2)})
    return out


def collect_cpu(rounds: int, directory: Path) -> float:
    """CPU seconds of one round over the interval, in % of one core."""
    history = History(directory / "cpu.db")
    collector = Collector()
    collector.sample()
    spent = 0.0
    now = time.time()
    for i in range(rounds):
        cpu0 = time.process_time()
        history.add(now + i * INTERVAL, collector.sample())
        if i % 3 == 0:
            assess(history, now + i * INTERVAL)
        if i % 6 == 0:
            history.compact(now + i * INTERVAL)
        spent += time.process_time() - cpu0
    history.close()
    return 100.0 * spent / rounds / INTERVAL


def history_size(series: int, directory: Path) -> float:
    path = directory / "size.db"
    h = History(path)
    names = [f"signal.{i}:target{i % 7}" for i in range(series)]
    for n in names:
        h._series(n)
    ids = [h._ids[n] for n in names]
    now = int(time.time()) // 3600 * 3600
    db = h.db
    db.execute("BEGIN")
    db.executemany("INSERT INTO raw VALUES (?, ?, ?)",
                   ((s, now - k * 10, 1234.5678 + k) for s in ids for k in range(720)))
    db.executemany("INSERT INTO minute VALUES (?, ?, ?, ?, ?, 6)",
                   ((s, now - k * 60, 1.5 + k, 1.0 + k, 2.0 + k) for s in ids for k in range(2880)))
    db.executemany("INSERT INTO hour VALUES (?, ?, ?, ?, ?, 360)",
                   ((s, now - k * 3600, 1.5 + k, 1.0 + k, 2.0 + k) for s in ids for k in range(720)))
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    h.close()
    return history_size_mb(str(path))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sentinel", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a coarser simulated step and fewer rounds")
    ap.add_argument("--series", type=int, default=120, help="signals of the node sized for history_mb_30d")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cortex-bench-sentinel-") as tmp:
        found = detection(args.quick)
        cpu = collect_cpu(30 if args.quick else 200, Path(tmp))
        size = history_size(args.series, Path(tmp))
    faults = [r for r in found if r["kind"] != "(idle)"]
    leads = [r["lead_s"] for r in faults if r["lead_s"] is not None]
    result = {"detected": sum(r["ok"] for r in faults), "injected": len(faults),
              "median_lead_time_s": statistics.median(leads) if leads else None,
              "false_alarms_idle_24h": sum(r["alerts"] for r in found if r["kind"] == "(idle)"),
              "collect_cpu_pct": round(cpu, 4), "history_mb_30d": round(size, 2), "series": args.series,
              "quick": args.quick, "scenarios": found}
    print("Sentinel: simulated-clock backtest, one collection round's CPU, history at 30 days")
    measure.table([[r["scenario"], r["kind"], "yes" if r["ok"] else "NO",
                    "-" if r["lead_s"] is None else round(r["lead_s"] / 3600, 1), round(r["horizon_s"] / 3600, 1),
                    r["alerts"], r["seconds"]] for r in found],
                  ["scenario", "kind", "ok", "lead_h", "horizon_h", "alerts", "sim_s"], file=sys.stdout)
    measure.table([[k, result[k]] for k in ("detected", "injected", "median_lead_time_s", "false_alarms_idle_24h",
                                            "collect_cpu_pct", "history_mb_30d")], ["metric", "value"],
                  file=sys.stdout)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0  # a missed target is a result (the table shows it), not a failure


if __name__ == "__main__":
    sys.exit(main())

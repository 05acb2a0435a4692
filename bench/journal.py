"""Raft journal append cost: pysyncobj's mmap journal with an fdatasync per entry (the journal before
AppendJournal) beside AppendJournal with one fdatasync per group of entries (a tick's appends).

    python -m bench.journal [--entries N] [--size BYTES] [--dir DIR] [--json PATH]

No cluster: one process appends N entries of SIZE bytes to a journal in DIR (default: a temporary
directory under /var/tmp, a real disk rather than tmpfs, where fdatasync costs what it costs) and reports
entries per second and the p50/p99 of one append (group: the append that syncs included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pysyncobj.journal import FileJournal

from bench import measure
from cortex.raft.journal import AppendJournal


def _pysyncobj_per_entry(path: Path, entries: int, payload: bytes) -> list[float]:
    journal = FileJournal(str(path))
    fd = journal._FileJournal__journalFile._ResizableFile__f.fileno()
    took = []
    for i in range(1, entries + 1):
        start = time.perf_counter()
        journal.add(payload, i, 1)
        os.fdatasync(fd)
        took.append(time.perf_counter() - start)
    journal._destroy()
    return took


def _append_journal(path: Path, entries: int, payload: bytes, group: int) -> list[float]:
    journal = AppendJournal(str(path))
    took = []
    for i in range(1, entries + 1):
        start = time.perf_counter()
        journal.add(payload, i, 1)
        if i % group == 0:
            journal.sync()
        took.append(time.perf_counter() - start)
    journal._destroy()
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.journal", description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=2000)
    parser.add_argument("--size", type=int, default=200, help="bytes per entry (default 200)")
    parser.add_argument("--dir", default="", help="where the journals go (default: a temp dir in /var/tmp)")
    parser.add_argument("--json", default="", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.entries < 1 or args.size < 1:
        parser.error("--entries and --size must be at least 1")
    payload = b"x" * args.size
    with tempfile.TemporaryDirectory(dir=args.dir or "/var/tmp", prefix="cortex-journal-bench-") as work:
        runs = [("pysyncobj mmap, fdatasync per entry", lambda p: _pysyncobj_per_entry(p, args.entries, payload))]
        runs += [(f"AppendJournal, fdatasync per {g} entr{'y' if g == 1 else 'ies'}",
                  lambda p, g=g: _append_journal(p, args.entries, payload, g)) for g in (1, 8, 64)]
        rows, results = [], []
        for n, (name, run) in enumerate(runs):
            took = run(Path(work) / f"journal-{n}")
            per_s = len(took) / sum(took)
            p50 = statistics.median(took) * 1000
            p99 = sorted(took)[min(len(took) - 1, int(len(took) * 0.99))] * 1000
            rows.append([name, per_s, p50, p99])
            results.append({"journal": name, "entries_per_s": per_s, "p50_ms": p50, "p99_ms": p99})
    print(f"Raft journal appends: {args.entries} entries of {args.size} B in {args.dir or '/var/tmp'}")
    measure.table(rows, ["journal", "entries/s", "p50 (ms)", "p99 (ms)"], file=sys.stdout)
    if args.json:
        Path(args.json).write_text(json.dumps({"entries": args.entries, "size": args.size, "results": results},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

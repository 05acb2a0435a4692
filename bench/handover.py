"""Leadership hand-over benchmark: the longest write gap when the leader hands over (`cortex leader transfer`,
SIGTERM) beside the one an election after kill -9 costs.

    python -m bench.handover [--reps N] [--base-port N] [--json PATH] [--keep] [--no-kill]

A 3-server dev cluster on 127.0.0.1; one client writes one key after another through a follower (per-call
deadline 1 s, a failed call asked again at once). Per repetition the leader is made to go, and the longest
time between two acknowledged writes is the row's sample. The hand-over (transfer_leadership_to) should cost about
one round of Raft messages, also on a busy machine; the election costs an election timeout (0.5-1 s).
`python -m bench` measures the same rows inside its membership benchmark; tests/cluster/test_cluster.py (its hand-over tests) is
the short version in the suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from cortex.dev import cluster as devcluster

from . import measure, membership


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.handover", description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="repetitions per way of losing the leader (default 5)")
    ap.add_argument("--base-port", type=int, default=27700, help="first port tried for the dev cluster")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs) after the run")
    ap.add_argument("--no-kill", action="store_true", help="leave out the kill -9 row (the election)")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    exits = [s for s in membership.LEADER_EXITS if not (args.no_kill and s[1] == signal.SIGKILL)]
    workdir = Path(tempfile.mkdtemp(prefix="cortex-bench-handover-"))

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    load = os.getloadavg()[0]
    dc = devcluster.up(workdir / "cluster", servers=3, workers=0, base_port=args.base_port, timeout=60.0,
                       progress=progress)
    try:
        rows = membership.hand_over_rows(dc, args.reps, progress, exits)
    finally:
        devcluster.down(workdir / "cluster")
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"Leader hand-over, 3 servers on 127.0.0.1 (seconds; load average {load:.1f} at the start)")
    measure.table([[r[0], f"{r[1]:.3f}", f"{r[2]:.3f}", r[3], r[4], r[5]] for r in rows],
                  ["metric", "median", "max", "n", "target", "met?"], file=sys.stdout)
    if args.json:
        Path(args.json).write_text(json.dumps({"load_average": load, "rows": [
            dict(zip(("metric", "median", "max", "n", "target", "met"), r)) for r in rows]}, indent=2))
    return 0 if all(r[5] != "NO" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

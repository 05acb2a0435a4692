"""Heal trials: does every replica converge after a partitioned leader comes back?

    python -m bench.heal [--trials N] [--json PATH] [--base-port N] [--within S]

Each trial (tests/support/raftlab.py): three Raft servers in this process on loopback; the lowest-port one
leads, has its Raft port dropped by nftables (both directions, packets to it only, or packets from it only,
in turn, and both directions with the new leader's log compacted past the cut-off server's end, so a
snapshot brings it level), takes writes it cannot commit, the other two elect a leader and commit more than
one AppendEntries batch, the cut outlasts the Raft connection timeout, then heals. A trial converged when
every server holds the same last log entry, commit index, applied index and state digest; it was unsafe
when the cut-off server's tail conflicted with the leader's (diverged) and a server applied one of its
unacknowledged writes. Prints one row per trial and a summary (per kind: trials, diverged, converged within
the limit, unsafe, median and slowest time); --json writes the same as a document. Needs root and nft. Exit status 1 when a trial could not be run (the error is printed)
or did not converge within the limit, or was unsafe.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

from cortex.dev import cluster as devcluster
from cortex.dev import portcut
from tests.support import raftlab


def free_base_port(start: int, width: int = 10) -> int:
    for base in range(start, start + 1000, width):
        if all(devcluster.port_free(p) for p in range(base, base + width)):
            return base
    raise SystemExit(f"no {width} free ports on loopback from {start}; pass --base-port")


KINDS = (*portcut.DIRECTIONS, "both+snapshot")


def summarise(trials: list[dict], within: float) -> list[dict]:
    rows = []
    for kind in (*KINDS, "all"):
        mine = [t for t in trials if kind in ("all", t["kind"])]
        if not mine:
            continue
        times = [t["converged_s"] for t in mine if t["converged_s"] is not None]
        rows.append({"kind": kind, "trials": len(mine),
                     "diverged": sum(1 for t in mine if t.get("diverged")),
                     "converged": sum(1 for s in times if s <= within),
                     "unsafe": sum(1 for t in mine if t.get("diverged") and t.get("applied_lost")),
                     "median_s": round(statistics.median(times), 3) if times else None,
                     "max_s": round(max(times), 3) if times else None})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.heal", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=50, help="how many trials (default 50)")
    parser.add_argument("--within", type=float, default=5.0, help="convergence limit in seconds (default 5)")
    parser.add_argument("--base-port", type=int, default=27000, help="first of the ports to try (default 27000)")
    parser.add_argument("--json", type=Path, help="also write the trials and summary here")
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error("--trials must be at least 1")
    why_not = raftlab.available()
    if why_not:
        print(f"heal trials cannot run here: {why_not}", file=sys.stderr)
        return 1

    trials: list[dict] = []
    failed = False
    lab = None
    with tempfile.TemporaryDirectory(prefix="cortex-heal-") as tmp:
        try:
            print(f"{'#':>3}  {'kind':<13} {'diverged':<8} {'unsafe':<6} {'converged_s':>11}", flush=True)
            for n in range(args.trials):
                if lab is None:
                    lab = raftlab.Lab(Path(tmp) / f"lab{n}", free_base_port(args.base_port))
                    lab.leader(timeout=60)
                kind = KINDS[n % len(KINDS)]
                direction, compact = kind.split("+")[0], kind.endswith("+snapshot")
                started = time.monotonic()
                try:
                    trial = raftlab.heal_trial(lab, direction, converge_within=args.within, compact=compact)
                except Exception as exc:  # noqa: BLE001 - a trial that cannot run is reported, not fatal
                    traceback.print_exc()
                    trial = {"direction": direction, "converged_s": None, "error": str(exc)}
                trial["kind"] = kind
                trial["trial_s"] = round(time.monotonic() - started, 3)
                trials.append(trial)
                took = trial["converged_s"]
                unsafe = bool(trial.get("diverged") and trial.get("applied_lost"))
                failed = failed or unsafe
                print(f"{n + 1:>3}  {kind:<13} {str(trial.get('diverged', '?')):<8} {str(unsafe):<6} "
                      f"{'NO' if took is None else f'{took:.3f}':>11}", flush=True)
                if took is None:  # a server left behind: the next trial starts from a fresh lab
                    failed = True
                    lab.close()
                    lab = None
        finally:
            if lab is not None:
                lab.close()
    summary = summarise(trials, args.within)
    print(f"\n{'kind':<13} {'trials':>6} {'diverged':>8} {f'<= {args.within:g}s':>8} {'unsafe':>6} "
          f"{'median_s':>9} {'max_s':>7}")
    for row in summary:
        print(f"{row['kind']:<13} {row['trials']:>6} {row['diverged']:>8} {row['converged']:>8} {row['unsafe']:>6} "
              f"{row['median_s'] if row['median_s'] is not None else '-':>9} "
              f"{row['max_s'] if row['max_s'] is not None else '-':>7}")
    if args.json:
        args.json.write_text(json.dumps({"within_s": args.within, "trials": trials, "summary": summary}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

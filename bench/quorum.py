"""Pre-vote and check-quorum benchmark: what one server cut off from the others does to the cluster's term.

    python -m bench.quorum [--trials N] [--cut SECONDS] [--base-port N] [--json PATH]

A 3-server dev cluster on 127.0.0.1. A server is cut off by dropping its Raft port in an nftables table of
this run's own (root only, loopback only; deleted on the way out), so its connections look open and its gRPC
still answers (a partition, a full disk, a paused process look the same from outside). Per trial:
- a follower cut for --cut seconds: how far its own term rises meanwhile, how far the cluster's term moves and
  whether the leader changes when it is back (pre-vote: 0, 0, no);
- the leader cut: seconds until it steps down (check-quorum), how far its term rises while it is cut, and
  whether its return moves the cluster's term;
- the leader killed (kill -9) under sequential writes through a follower: the longest gap between two
  acknowledged writes (pre-vote must not slow failover).
tests/cluster/test_prevote.py is the short version in the suite.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cortex.client import Client, CortexError
from cortex.dev import cluster as devcluster
from cortex.dev import portcut
from cortex.dev.portcut import PortCut

from . import measure
from .membership import _write_gap

POLL = 0.05
# A cut longer than raft.connection_timeout (30 s) closes the Raft connections, and TCP's reconnect back-off
# can then take tens of seconds after the heal: the wait for the cut server to rejoin allows for that.
HEAL_WAIT = 240.0


def progress(msg: str) -> None:
    print(f"[quorum] {msg}", file=sys.stderr, flush=True)


def view(node: devcluster.DevNode) -> tuple[str, int, str]:
    """(state, term, leader id) as the server reports them; ("", -1, "") when it does not answer."""
    try:
        with Client(node.grpc_address, timeout=2) as c:
            s = c.status()
        return s.state, s.term, s.leader_id
    except CortexError:
        return "", -1, ""


def wait_for(predicate, timeout: float, what: str, detail=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(POLL)
    raise TimeoutError(f"no {what} within {timeout:.0f}s{detail()}")


def views(dc: devcluster.DevCluster) -> str:
    """Every server's (state, term, leader), for an error message."""
    return "; servers (state, term, leader): " + ", ".join(f"{n.id} {view(n)}" for n in dc.servers)


def agreed(dc: devcluster.DevCluster) -> tuple[int, str] | None:
    views = {view(n)[1:] for n in dc.servers}
    if len(views) != 1:
        return None
    term, leader = views.pop()
    return (term, leader) if leader else None


def lead_with(dc: devcluster.DevCluster, node: devcluster.DevNode | None, avoid: devcluster.DevNode | None):
    """Move leadership to `node`, or away from `avoid`; return the settled (term, leader)."""
    term, leader = wait_for(lambda: agreed(dc), 60, "settled leader")
    target = node.id if node else (next(n.id for n in dc.servers if n.id != avoid.id) if leader == avoid.id else "")
    if target and target != leader:
        def moved():
            # refused while the target still catches up after a heal: ask again
            current = agreed(dc)
            if current and current[1] == target:
                return current
            if current:
                try:
                    with Client(dc.node(current[1]).grpc_address, timeout=10) as c:
                        c.transfer_leadership(target)
                except CortexError:
                    time.sleep(0.5)
            return None

        term, leader = wait_for(moved, HEAL_WAIT, f"{target} leading")
    return term, leader


def follower_trial(dc: devcluster.DevCluster, target: devcluster.DevNode, cut: float) -> dict:
    term, leader = lead_with(dc, None, avoid=target)
    highest = term
    with PortCut(target.raft_address.rsplit(":", 1)[1], name="bench_quorum"):
        end = time.monotonic() + cut
        while time.monotonic() < end:
            highest = max(highest, view(target)[1])
            time.sleep(0.2)
        healing = time.monotonic()
    healed = wait_for(lambda: agreed(dc), HEAL_WAIT, "agreement after the heal", lambda: views(dc))
    return {"own_term_rise": highest - term, "cluster_term_moved": healed[0] - term,
            "leader_changed": healed[1] != leader, "rejoined_s": time.monotonic() - healing}


def leader_trial(dc: devcluster.DevCluster, target: devcluster.DevNode, cut: float) -> dict:
    term, _ = lead_with(dc, target, avoid=None)
    others = [n for n in dc.servers if n.id != target.id]
    with PortCut(target.raft_address.rsplit(":", 1)[1], name="bench_quorum"):
        start = time.monotonic()
        wait_for(lambda: view(target)[0] not in ("leader", ""), 60, "step-down")
        stepped = time.monotonic() - start
        new_leader = wait_for(lambda: next((n.id for n in others if view(n)[0] == "leader"), None), 60, "new leader")
        new_term = view(dc.node(new_leader))[1]
        time.sleep(max(0.0, cut - (time.monotonic() - start)))
        own = view(target)[1]
        healing = time.monotonic()
    healed = wait_for(lambda: agreed(dc), HEAL_WAIT, "agreement after the heal", lambda: views(dc))
    return {"step_down_s": stepped, "own_term_rise": own - term, "cluster_term_moved_on_heal": healed[0] - new_term,
            "leader_changed_on_heal": healed[1] != new_leader, "rejoined_s": time.monotonic() - healing}


def run(workdir: Path, base_port: int, trials: int, cut: float) -> dict:
    dc = devcluster.up(workdir / "cluster", servers=3, workers=0, base_port=base_port, timeout=60.0,
                       progress=lambda s: progress(s))
    samples: dict[str, list] = {"follower": [], "leader": [], "failover_gap_s": []}
    try:
        # pysyncobj connects from the larger address to the smaller one: the lowest Raft port only accepts,
        # so dropping it cuts all of that server's Raft traffic.
        target = min(dc.servers, key=lambda n: n.raft_address)
        for i in range(trials):
            progress(f"trial {i + 1}/{trials}: follower cut {cut:.0f}s")
            samples["follower"].append(follower_trial(dc, target, cut))
            progress(f"trial {i + 1}/{trials}: leader cut {cut:.0f}s")
            samples["leader"].append(leader_trial(dc, target, cut))
            progress(f"trial {i + 1}/{trials}: leader kill -9 under writes")
            samples["failover_gap_s"].append(_write_gap(dc, signal.SIGKILL))
    finally:
        devcluster.down(workdir / "cluster")
    return samples


def rows(samples: dict) -> list[list]:
    def stat(values: list) -> list:
        values = [float(v) for v in values]
        return [statistics.median(values), max(values), len(values)]

    f, ld = samples["follower"], samples["leader"]
    return [
        ["follower cut: its own term rise", *stat([s["own_term_rise"] for s in f])],
        ["follower cut: cluster term moved on heal", *stat([s["cluster_term_moved"] for s in f])],
        ["follower cut: leader changed on heal (0/1)", *stat([s["leader_changed"] for s in f])],
        ["follower cut: heal -> rejoined (s)", *stat([s["rejoined_s"] for s in f])],
        ["leader cut: step-down (s)", *stat([s["step_down_s"] for s in ld])],
        ["leader cut: its own term rise", *stat([s["own_term_rise"] for s in ld])],
        ["leader cut: cluster term moved on heal", *stat([s["cluster_term_moved_on_heal"] for s in ld])],
        ["leader cut: leader changed on heal (0/1)", *stat([s["leader_changed_on_heal"] for s in ld])],
        ["leader cut: heal -> rejoined (s)", *stat([s["rejoined_s"] for s in ld])],
        ["leader kill -9: longest write gap (s)", *stat(samples["failover_gap_s"])],
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quorum", description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=5, help="repetitions of each scenario (default 5)")
    ap.add_argument("--cut", type=float, default=30.0, help="seconds a server stays cut off (default 30)")
    ap.add_argument("--base-port", type=int, default=28600, help="first of 20 loopback ports (default 28600)")
    ap.add_argument("--json", type=Path, help="also write the samples and the table here")
    args = ap.parse_args(argv)
    if portcut.available():
        print(f"bench.quorum cuts a Raft port on loopback: {portcut.available()}; run it as root",
              file=sys.stderr)
        return 2
    if args.trials < 1 or args.cut <= 0:
        print("--trials must be at least 1 and --cut above 0", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="cortex-bench-quorum-"))
    samples = run(workdir, args.base_port, args.trials, args.cut)
    table = rows(samples)
    print(f"Pre-vote and check-quorum, 3 servers on 127.0.0.1, one server cut {args.cut:.0f}s per trial")
    measure.table([[r[0], round(r[1], 3), round(r[2], 3), r[3]] for r in table], ["metric", "median", "max", "n"],
                  file=sys.stdout)
    if args.json:
        args.json.write_text(json.dumps({"cut_s": args.cut, "samples": samples,
                                         "table": [dict(zip(("metric", "median", "max", "n"), r)) for r in table]},
                                        indent=2))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cluster-core benchmark: Cortex beside etcd, same client patterns, same run.

    python -m bench [--quick] [--json PATH] [--base-port N] [--keep]

Starts a 3-server Cortex dev cluster (real agent processes on 127.0.0.1, in a
temp dir) and a 3-member etcd cluster (/usr/bin/etcd; skipped with a notice
when it is not installed), measures both with the patterns in bench/measure.py
and prints one table: metric | cortex | etcd | ratio (cortex/etcd) | better |
target | met?.  Progress goes to stderr, the table to stdout.

Order: idle usage (before any load), sequential puts via leader and follower,
pipelined puts, reads, and failover last (it kills members).  Every wait is
bounded and every process is stopped on the way out (also on SIGTERM/SIGINT).
Exit status 1 when a measurement failed (the cell says ERROR and the error is
printed), 0 otherwise -- a missed target is a result, not a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

from cortex.config import RaftConfig
from cortex.dev import cluster as devcluster

from . import measure
from .cortex_adapter import CortexBench, CortexClient

ETCD_BIN = "/usr/bin/etcd"
_RAFT = RaftConfig()  # the defaults the dev cluster runs with
FAILOVER_DEADLINE = 0.25  # s, per-call deadline of the failover client, identical for both systems
BATCH_SIZE, BATCH_IN_FLIGHT = 200, 4
RESTART_SETTLE = 3.0  # s between a restarted Cortex server being healthy and the next kill

FULL = dict(seq=500, pipe=10_000, concurrency=64, reads=1000, idle=5.0, settle=2.0, failovers=3)
QUICK = dict(seq=50, pipe=1000, concurrency=64, reads=100, idle=2.0, settle=0.5, failovers=1)

_T0 = time.monotonic()


def progress(msg: str) -> None:
    print(f"[bench {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- #
# Metrics: key, label, unit scale, better, target
# --------------------------------------------------------------------------- #
# target: None, ("rel", factor) = cortex <= factor x etcd, (">=", x) or ("<=", x) on the cortex value.
METRICS = [
    ("put_leader_p50", "seq put via leader p50 (ms)", "lower", None),
    ("put_leader_p99", "seq put via leader p99 (ms)", "lower", None),
    ("put_follower_p50", "seq put via follower p50 (ms)", "lower", ("rel", 1.0)),
    ("put_follower_p99", "seq put via follower p99 (ms)", "lower", None),
    ("pipe_unary", "pipelined puts, unary x64 in flight (/s)", "higher", (">=", 5000.0)),
    ("pipe_batch", f"pipelined puts, WriteBatch {BATCH_SIZE}x{BATCH_IN_FLIGHT} (/s) [etcd: unary]",
     "higher", (">=", 5000.0)),
    ("read_lin_leader_p50", "linearizable get via leader p50 (ms)", "lower", None),
    ("read_lin_leader_p99", "linearizable get via leader p99 (ms)", "lower", None),
    ("read_lin_follower_p50", "linearizable get via follower p50 (ms)", "lower", None),
    ("read_lin_follower_p99", "linearizable get via follower p99 (ms)", "lower", None),
    ("read_stale_follower_p50", "stale/serializable get via follower p50 (ms)", "lower", None),
    ("read_stale_follower_p99", "stale/serializable get via follower p99 (ms)", "lower", None),
    ("idle_rss_max", "idle RSS per server, max (MB)", "lower", ("<=", 80.0)),
    ("idle_cpu_max", "idle CPU per server, max (%)", "lower", ("<=", 1.0)),
    ("failover_median", "failover kill -9 leader -> write acked, median (s)", "lower", ("<=", 1.0)),
    ("failover_max", "failover kill -9 leader -> write acked, max (s)", "lower", None),
]


class Results:
    def __init__(self, system: str):
        self.system = system
        self.values: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self.extra: dict[str, object] = {}

    def run(self, keys: list[str], what: str, fn):
        """Run one measurement; on failure record the error against `keys` and carry on."""
        progress(f"{self.system}: {what}")
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 -- reported in the table and on stderr
            msg = f"{type(exc).__name__}: {exc}"
            progress(f"{self.system}: {what} FAILED: {msg}")
            traceback.print_exc(file=sys.stderr)
            for k in keys:
                self.errors[k] = msg

    def latency(self, prefix: str, samples: list[float]) -> None:
        p = measure.percentiles(samples)
        self.values[f"{prefix}_p50"] = p["p50"] * 1000
        self.values[f"{prefix}_p99"] = p["p99"] * 1000
        self.extra[prefix] = {k: (v * 1000 if k != "n" else v) for k, v in p.items()}


# --------------------------------------------------------------------------- #
# The measurements, identical for both systems
# --------------------------------------------------------------------------- #
def measure_load(res: Results, cluster, make_client, sizes: dict, batched=None) -> None:
    """Sequential puts, pipelined puts and reads.  `cluster` has leader_endpoint()
    and follower_endpoint(); `make_client(endpoint)` returns a bench client."""
    leader_ep, follower_ep = cluster.leader_endpoint(), cluster.follower_endpoint()
    progress(f"{res.system}: leader {leader_ep}, follower {follower_ep}")
    with contextlib.ExitStack() as stack:
        lc = stack.enter_context(make_client(leader_ep))
        fc = stack.enter_context(make_client(follower_ep))
        for c in (lc, fc):  # connections up and code paths warm before any clock runs
            for i in range(20):
                c.put(f"bench/warmup/{i}", b"w")
                c.get(f"bench/warmup/{i}")

        n = sizes["seq"]
        res.run(["put_leader_p50", "put_leader_p99"], f"{n} sequential puts via leader",
                lambda: res.latency("put_leader", measure.sequential_put_latency(lc, n)))
        res.run(["put_follower_p50", "put_follower_p99"], f"{n} sequential puts via follower",
                lambda: res.latency("put_follower", measure.sequential_put_latency(fc, n)))

        n, conc = sizes["pipe"], sizes["concurrency"]

        def unary():
            res.values["pipe_unary"] = measure.pipelined_throughput(lc, n, conc)

        res.run(["pipe_unary"], f"{n} pipelined puts via leader, {conc} in flight", unary)
        if batched is not None:
            def batch():
                res.values["pipe_batch"] = measure.pipelined_throughput(batched(lc), n, conc)

            res.run(["pipe_batch"], f"{n} pipelined puts via leader, WriteBatch of {BATCH_SIZE}, "
                                    f"{BATCH_IN_FLIGHT} in flight", batch)

        n = sizes["reads"]
        res.run(["read_lin_leader_p50", "read_lin_leader_p99"], f"{n} linearizable gets via leader",
                lambda: res.latency("read_lin_leader", measure.read_latency(lc, n, linearizable=True)))
        res.run(["read_lin_follower_p50", "read_lin_follower_p99"], f"{n} linearizable gets via follower",
                lambda: res.latency("read_lin_follower", measure.read_latency(fc, n, linearizable=True)))
        res.run(["read_stale_follower_p50", "read_stale_follower_p99"], f"{n} stale gets via follower",
                lambda: res.latency("read_stale_follower", measure.read_latency(fc, n, linearizable=False)))


def record_idle(res: Results, rss: list[int], cpu: list[float]) -> None:
    res.values["idle_rss_max"] = max(rss) / 1e6
    res.values["idle_cpu_max"] = max(cpu)
    res.extra["idle_rss_mb"] = [r / 1e6 for r in rss]
    res.extra["idle_cpu_pct"] = cpu


def record_failovers(res: Results, times: list[float]) -> None:
    res.extra["failover_s"] = times
    if times:
        res.values["failover_median"] = statistics.median(times)
        res.values["failover_max"] = max(times)


def cortex_failovers(res: Results, cb: CortexBench, reps: int) -> None:
    times: list[float] = []

    def one(rep: int):
        t = measure.failover_time(cb, lambda ep: CortexClient(ep, timeout=FAILOVER_DEADLINE))
        times.append(t)
        progress(f"cortex: failover {rep + 1}/{reps}: {t:.3f}s (killed {cb.killed[-1].id})")
        if rep + 1 < reps:
            t0 = time.monotonic()
            cb.restart_killed(timeout=60.0, progress=lambda s: progress(f"cortex: restart: {s}"))
            progress(f"cortex: restarted, healthy again after {time.monotonic() - t0:.1f}s")
            # Back to steady state before the next kill: the rejoined node caught up and every Raft
            # peer connection idle for longer than pysyncobj's connection timeout (2 s), as in the
            # first repetition -- that idleness changes Cortex's failover time (see the notes).
            time.sleep(RESTART_SETTLE)

    for rep in range(reps):
        before = len(times)
        res.run(["failover_median", "failover_max"], f"failover {rep + 1}/{reps}", lambda r=rep: one(r))
        if len(times) == before:
            break
    if len(times) == reps:  # a failed repetition already left its error in the cells
        record_failovers(res, times)


def etcd_failovers(res: Results, first_cluster, workdir: Path, reps: int) -> None:
    """Repetition 1 kills the leader of the benchmarked cluster; later ones start a
    fresh 3-member cluster each (bench.etcd has no single-member restart)."""
    from .etcd import EtcdClient, EtcdCluster

    times: list[float] = []

    def one(rep: int):
        if rep == 0:
            cluster = first_cluster
            t = measure.failover_time(cluster, lambda ep: EtcdClient(ep, timeout=FAILOVER_DEADLINE))
        else:
            with EtcdCluster(workdir / f"failover{rep}", members=3) as cluster:
                t = measure.failover_time(cluster, lambda ep: EtcdClient(ep, timeout=FAILOVER_DEADLINE))
        times.append(t)
        progress(f"etcd: failover {rep + 1}/{reps}: {t:.3f}s")

    for rep in range(reps):
        before = len(times)
        res.run(["failover_median", "failover_max"], f"failover {rep + 1}/{reps}", lambda r=rep: one(r))
        if len(times) == before:
            break
    if len(times) == reps:
        record_failovers(res, times)


# --------------------------------------------------------------------------- #
# Table
# --------------------------------------------------------------------------- #
def _cell(res: Results | None, key: str):
    if res is None:
        return "n/a"
    if key in res.errors:
        return "ERROR"
    v = res.values.get(key)
    return "n/a" if v is None else float(v)


def _target_text(target) -> str:
    if target is None:
        return ""
    kind, x = target
    if kind == "rel":
        return f"<= {x:g}x etcd"
    return f"{kind} {x:,g}"


def build_rows(cortex: Results, etcd: Results | None) -> list[dict]:
    rows = []
    for key, label, better, target in METRICS:
        c = _cell(cortex, key)
        etcd_key = "pipe_unary" if key == "pipe_batch" else key
        e = _cell(etcd, etcd_key)
        ratio = c / e if isinstance(c, float) and isinstance(e, float) and e > 0 else "n/a"
        met = ""
        if target is not None:
            kind, x = target
            if not isinstance(c, float):
                met = "no" if c == "ERROR" else "?"
            elif kind == "rel":
                met = "?" if not isinstance(ratio, float) else ("yes" if ratio <= x else "no")
            elif kind == ">=":
                met = "yes" if c >= x else "no"
            else:
                met = "yes" if c <= x else "no"
        rows.append(dict(key=key, metric=label, cortex=c, etcd=e, ratio=ratio, better=better,
                         target=_target_text(target), met=met))
    return rows


def print_table(rows: list[dict]) -> str:
    def fmt(v):
        if isinstance(v, float):
            if math.isnan(v) or math.isinf(v):
                return str(v)
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3f}"
        return v

    headers = ["metric", "cortex", "etcd", "ratio c/e", "better", "target (cortex)", "met?"]
    body = [[r["metric"], fmt(r["cortex"]), fmt(r["etcd"]), fmt(r["ratio"]), r["better"], r["target"], r["met"]]
            for r in rows]
    # Right-align the three number columns by hand (some cells may be "n/a"/"ERROR").
    widths = [max(len(h), *(len(str(b[i])) for b in body)) for i, h in enumerate(headers)]
    right = {1, 2, 3}

    def line(vals):
        return "  ".join(str(v).rjust(widths[i]) if i in right else str(v).ljust(widths[i])
                         for i, v in enumerate(vals)).rstrip()

    text = "\n".join([line(headers), "  ".join("-" * w for w in widths)] + [line(b) for b in body])
    print(text, flush=True)
    return text


# --------------------------------------------------------------------------- #
# Orchestration
# --------------------------------------------------------------------------- #
def find_base_port(start: int, width: int = 6, tries: int = 100) -> int:
    for k in range(tries):
        base = start + 10 * k
        if all(devcluster.port_free(p) for p in range(base, base + width)):
            return base
    raise RuntimeError(f"no {width} free ports on 127.0.0.1 from {start} to {start + 10 * tries}")


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sample sizes (smoke test, well under a minute)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    ap.add_argument("--base-port", type=int, default=27400, help="first port tried for the Cortex cluster")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs) after the run")
    ap.add_argument("--no-membership", action="store_true",
                    help="skip the membership benchmark (join/resume -> alive, dead-worker detection; ~40 s)")
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    signal.signal(signal.SIGTERM, _terminate)
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGHUP, _terminate)

    have_etcd = os.path.exists(ETCD_BIN)
    workdir = Path(tempfile.mkdtemp(prefix="cortex-bench-"))
    cortex_dir = workdir / "cortex"
    progress(f"work dir {workdir}; sizes {sizes}")
    if not have_etcd:
        progress(f"{ETCD_BIN} not found: running Cortex only "
                 "(install with: apt-get install -y etcd-server, or WITH_ETCD=1 ./bootstrap.sh)")

    cortex_res, etcd_res = Results("cortex"), (Results("etcd") if have_etcd else None)
    cb: CortexBench | None = None
    etcd_cluster = None
    failed_setup = False
    t_start = time.monotonic()
    try:
        base = find_base_port(args.base_port)
        progress(f"cortex: starting 3 servers on 127.0.0.1:{base}-{base + 5}")
        dc = devcluster.up(cortex_dir, servers=3, workers=0, base_port=base, timeout=60.0,
                           progress=lambda s: progress(f"cortex: {s}"))
        cb = CortexBench(dc)
        if have_etcd:
            from .etcd import EtcdCluster

            progress("etcd: starting 3 members")
            etcd_cluster = EtcdCluster(workdir / "etcd", members=3).start()

        # Idle usage first, before any load; both clusters sampled over the same window.
        time.sleep(sizes["settle"])
        c_pids = cb.pids()
        e_pids = etcd_cluster.pids() if etcd_cluster else []
        progress(f"idle usage over {sizes['idle']:.0f}s: cortex pids {c_pids}, etcd pids {e_pids}")
        rss, cpu = measure.idle_usage(c_pids + e_pids, sizes["idle"])
        record_idle(cortex_res, rss[:len(c_pids)], cpu[:len(c_pids)])
        if etcd_cluster:
            record_idle(etcd_res, rss[len(c_pids):], cpu[len(c_pids):])

        measure_load(cortex_res, cb, CortexClient, sizes,
                     batched=lambda c: c.batched(BATCH_SIZE, BATCH_IN_FLIGHT))
        if etcd_cluster:
            from .etcd import EtcdClient

            measure_load(etcd_res, etcd_cluster, EtcdClient, sizes)

        # Failover last: it kills members.
        cortex_failovers(cortex_res, cb, sizes["failovers"])
        if etcd_cluster:
            etcd_failovers(etcd_res, etcd_cluster, workdir / "etcd", sizes["failovers"])
    except BaseException as exc:
        failed_setup = True
        progress(f"aborted: {type(exc).__name__}: {exc}")
        if not isinstance(exc, SystemExit | KeyboardInterrupt):
            traceback.print_exc(file=sys.stderr)
        else:
            raise
    finally:
        progress("stopping clusters")
        if cb is not None:
            cb.close()
        with contextlib.suppress(Exception):
            devcluster.down(cortex_dir)
        if cb is not None:  # belt and braces: whatever the state file may have missed
            for node in cb.dc.nodes:
                with contextlib.suppress(Exception):
                    devcluster.stop_node(node, signal.SIGKILL, wait=5.0)
        if etcd_cluster is not None:
            with contextlib.suppress(Exception):
                etcd_cluster.stop()
        keep = args.keep or failed_setup or bool(cortex_res.errors) or bool(etcd_res and etcd_res.errors)
        if keep:
            progress(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    wall = time.monotonic() - t_start

    rows = build_rows(cortex_res, etcd_res)
    print()
    print(f"Cortex vs etcd, 3 servers each on 127.0.0.1, {os.cpu_count()} CPUs, "
          f"{'quick' if args.quick else 'full'} run ({wall:.0f}s)" + ("" if have_etcd else " -- etcd NOT INSTALLED, Cortex only"),
          flush=True)
    print_table(rows)
    print()
    notes = [
        f"sizes: {sizes['seq']} sequential puts per endpoint, {sizes['pipe']} pipelined puts "
        f"(value 100 B), {sizes['reads']} gets per row; idle window {sizes['idle']:.0f}s before any load; "
        f"{sizes['failovers']} failover(s) per system with a {FAILOVER_DEADLINE}s per-call deadline",
        "ratio = cortex/etcd; 'better' says which direction of the metric is better",
        "pipelined WriteBatch row: Cortex WriteBatch RPCs; etcd column repeats etcd's unary pipelined number",
        "etcd: --heartbeat-interval 100ms --election-timeout 1000ms, fsync on; Cortex: heartbeat "
        f"{_RAFT.heartbeat_interval}s, election {_RAFT.election_timeout_min}-{_RAFT.election_timeout_max}s, "
        "group commit, raft journal pwrite + one fdatasync per tick (journal.AppendJournal), SQLite WAL synchronous=NORMAL",
        "cortex failover repeats restart the killed server; etcd repeats after the first start a fresh cluster",
    ]
    for n in notes:
        print(f"  - {n}", flush=True)
    errors = {**{f"cortex.{k}": v for k, v in cortex_res.errors.items()},
              **({f"etcd.{k}": v for k, v in etcd_res.errors.items()} if etcd_res else {})}
    if errors:
        print("\nerrors:", flush=True)
        for k, v in errors.items():
            print(f"  {k}: {v}", flush=True)

    membership_rows: list = []
    if not args.no_membership:
        from . import membership

        member_dir = Path(tempfile.mkdtemp(prefix="cortex-bench-membership-"))
        try:
            membership_rows = membership.run(member_dir, find_base_port(args.base_port + 100, width=30),
                                             args.quick, progress)
            print()
            membership.print_table(membership_rows)
        except Exception as exc:
            errors["membership"] = f"{type(exc).__name__}: {exc}"
            print(f"\nmembership benchmark failed: {errors['membership']} (logs in {member_dir})", flush=True)
        else:
            shutil.rmtree(member_dir, ignore_errors=True)

    if args.json:
        doc = {
            "membership": membership_rows,
            "quick": args.quick, "sizes": sizes, "wall_s": wall, "cpus": os.cpu_count(), "etcd": have_etcd,
            "rows": rows,
            "cortex": {"values": cortex_res.values, "errors": cortex_res.errors, "details": cortex_res.extra},
            "etcd_results": (None if etcd_res is None else
                             {"values": etcd_res.values, "errors": etcd_res.errors, "details": etcd_res.extra}),
        }
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str))
        progress(f"wrote {args.json}")
    return 1 if (errors or failed_setup) else 0


if __name__ == "__main__":
    sys.exit(main())

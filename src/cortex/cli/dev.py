"""`cortex dev up|down`: a local multi-node cluster of real agent processes on loopback."""

from __future__ import annotations

import time
from pathlib import Path

from cortex.cli.output import emit, table
from cortex.cli.registry import CommandRegistry

DEV_DIR = ".cortex-dev"


def cmd_dev_up(args) -> int:
    from cortex.dev import cluster as devcluster

    start = time.monotonic()
    say = (lambda s: None) if args.json else (lambda s: print(f"  … {s}", flush=True))
    if not args.json:
        print(f"starting a local cluster: {args.servers} servers, {args.workers} workers in {args.dir}")
    cluster = devcluster.up(Path(args.dir), args.servers, args.workers, args.base_port, progress=say)
    took = time.monotonic() - start
    first = cluster.nodes[0]
    doc = {"dir": cluster.dir, "seconds": round(took, 2),
           "nodes": [{"id": n.id, "role": n.role, "grpc": n.grpc_address, "raft": n.raft_address, "pid": n.pid}
                     for n in cluster.nodes]}
    human = (f"cluster healthy in {took:.1f}s\n\n"
             + table(doc["nodes"], ["id", "role", "grpc", "raft", "pid"])
             + f"\n\ntry:\n  cortex --addr {first.grpc_address} status\n"
               f"  cortex --addr {cluster.nodes[-1].grpc_address} kv put hello world   # any node, forwarded\n"
               f"  cortex kv get hello --level linearizable\n"
               f"logs: {cluster.dir}/<node>/agent.log   stop: just down  (cortex dev down)")
    emit(args, doc, human)
    return 0


def cmd_dev_down(args) -> int:
    from cortex.dev import cluster as devcluster

    stopped = devcluster.down(Path(args.dir), purge=args.purge)
    human = f"stopped {', '.join(stopped)}" if stopped else "no dev cluster running"
    if args.purge:
        human += f"; removed {args.dir}"
    emit(args, {"stopped": stopped, "purged": args.purge}, human)
    return 0


def register(commands: CommandRegistry) -> None:
    dev = commands.group("dev", "local multi-node cluster on loopback")
    sp = commands.add("up", cmd_dev_up, "start a local cluster of real agent processes", dev)
    sp.add_argument("--servers", type=int, default=3, choices=[1, 3, 5])
    sp.add_argument("--workers", type=int, default=2)
    sp.add_argument("--base-port", type=int, default=7400)
    sp.add_argument("--dir", default=DEV_DIR)
    sp = commands.add("down", cmd_dev_down, "stop the local cluster (its data stays for the next `up`)", dev)
    sp.add_argument("--dir", default=DEV_DIR)
    sp.add_argument("--purge", action="store_true", help="also delete the cluster's data")

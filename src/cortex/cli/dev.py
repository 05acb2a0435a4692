"""`cortex dev up|down`: a local multi-node cluster of real agent processes on loopback."""

from __future__ import annotations

import json
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
    doc = {"dir": cluster.dir, "seconds": round(took, 2),
           "nodes": [{"id": n.id, "role": n.role, "grpc": n.grpc_address, "raft": n.raft_address, "pid": n.pid}
                     for n in cluster.nodes],
           **connect_info(cluster)}
    emit(args, doc, f"cluster healthy in {took:.1f}s\n\n" + table(doc["nodes"], ["id", "role", "grpc", "raft", "pid"])
         + "\n\n" + next_steps(cluster, doc, args.dir))
    return 0


def connect_info(cluster) -> dict:
    """How a client reaches this cluster: the client certificate's directory, and MCP over stdio and HTTP."""
    first = cluster.nodes[0]
    data = Path(first.dir).resolve() / "data"
    info = {"tls_dir": str(data / "tls"), "admin_socket": str(data / "admin.sock")}
    try:
        mcp = json.loads((data / "plugins" / "mcp" / "mcp.json").read_text())
        info["mcp_url"], info["mcp_token_file"] = mcp["url"], mcp["token_file"]
    except (OSError, ValueError, KeyError):  # the plugin writes it once it serves; it may be a moment late
        host, _, port = first.grpc_address.rpartition(":")
        info["mcp_url"] = f"http://{host}:{int(port) + 80}/mcp"
        info["mcp_token_file"] = str(data / "plugins" / "mcp" / "token")
    info["mcp_stdio"] = f"cortex --socket {info['admin_socket']} mcp --profile operator"
    return info


def next_steps(cluster, info: dict, directory: str) -> str:
    first, last = cluster.nodes[0], cluster.nodes[-1]
    where = "" if directory == DEV_DIR else f" --dir {directory}"
    return (f"client certificate (the CLI finds it by itself for these addresses; other tools need it):\n"
            f"  export CORTEX_TLS_DIR={info['tls_dir']}\n\n"
            f"try:\n  cortex --addr {first.grpc_address} status\n"
            f"  cortex --addr {last.grpc_address} kv put hello world   # any node, forwarded\n"
            f"  cortex --addr {first.grpc_address} kv get hello --level linearizable\n\n"
            f"give an assistant the cluster's tools (MCP):\n"
            f"  claude mcp add cortex -- {info['mcp_stdio']}\n"
            f"  claude mcp add --transport http cortex-http '{info['mcp_url']}?profile=operator' "
            f"--header \"Authorization: Bearer $(cat {info['mcp_token_file']})\"\n\n"
            f"logs: {cluster.dir}/<node>/agent.log   stop: cortex dev down{where}")


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

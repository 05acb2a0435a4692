"""`cortex nodes forget ID` and `cortex nodes promote ID`: a member's record and its role."""

from __future__ import annotations

from cortex.cli.output import UsageError, cluster_client, emit, leader_view
from cortex.cli.registry import CommandRegistry


def cmd_nodes_forget(args) -> int:
    with cluster_client(args) as c:
        result = c.write("member.forget", {"node_id": args.node_id}, retry_for=args.retry)
    emit(args, result, f"forgot {args.node_id}" if result.get("forgotten")
         else f"{args.node_id} is not on record (already forgotten)")
    return 0


def cmd_nodes_promote(args) -> int:
    with cluster_client(args) as c:
        if args.node_id not in {n.id for n in leader_view(args, c.status()).nodes}:
            raise UsageError(f"no member named {args.node_id!r}; see `cortex nodes`")
        response = c.promote_node(args.node_id, args.raft or "")
    emit(args, {"node_id": response.node_id, "role": "server", "raft_address": response.raft_address},
         f"promoted {response.node_id}: a voting server now, Raft at {response.raft_address}")
    return 0


def register(commands: CommandRegistry) -> None:
    sp = commands.add("forget", cmd_nodes_forget, "drop the record of a node that left", "nodes")
    sp.add_argument("node_id")
    sp.add_argument("--retry", type=float, default=10.0, help="seconds to retry transient failures")
    sp = commands.add("promote", cmd_nodes_promote, "make a worker a voting server (admin; safe to repeat)", "nodes")
    sp.add_argument("node_id")
    sp.add_argument("--raft", default="", help="its Raft address HOST:PORT (default: its gRPC host, port + 1)")

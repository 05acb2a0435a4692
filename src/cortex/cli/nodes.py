"""`cortex nodes` (members and the nodes that left), `nodes pending|approve|reject|remove`. Other packages add
their own subcommands under "nodes" through the registry (forget, promote, drain, undrain)."""

from __future__ import annotations

import time

from cortex.cli.output import UsageError, cluster_client, emit, leader_view, nodes_table, status_dict, table
from cortex.cli.registry import CommandRegistry


def _left_nodes(client) -> list[dict]:
    from cortex.client import CortexError

    try:
        return client.read("member.list", {"left_only": True}, level="leader")
    except CortexError as exc:
        if exc.code.name == "INVALID_ARGUMENT":  # a cluster from before `left` records
            return []
        raise


def _ago(ts: float | None) -> str:
    if ts is None:
        return ""
    seconds = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def cmd_nodes(args) -> int:
    with cluster_client(args) as c:
        status = c.status()
        view = leader_view(args, status)
        left = [] if args.members else _left_nodes(c)
    rows = status_dict(view)["nodes"] if view.nodes else []
    human = nodes_table(view, status.leader_id)
    if left:
        human += "\n\nleft (kept until forgotten: `cortex nodes forget ID`, or after liveness.forget_left_after)\n"
        human += table([{"id": n["id"], "role": n["role"], "left": _ago(n["left_at"]), "reason": n["left_reason"],
                         "grpc": n["grpc_address"]} for n in left], ["id", "role", "left", "reason", "grpc"])
    emit(args, rows + left, human)
    return 0


def cmd_nodes_pending(args) -> int:
    with cluster_client(args) as c:
        rows = c.read("join_requests", {}, level="leader")
    for row in rows:
        row["requested"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["requested_at"]))
    emit(args, rows, table(rows, ["node_id", "role", "grpc_address", "state", "requested"]) if rows
         else "no join requests (nodes joining with a token do not need approval)")
    return 0


def _decide(args, command_type: str, verb: str) -> int:
    with cluster_client(args) as c:
        result = c.write(command_type, {"node_id": args.node_id}, retry_for=args.retry)
    emit(args, result, f"{verb} {args.node_id}" + ("" if result.get("changed", True) else " (already)"))
    return 0


def cmd_nodes_approve(args) -> int:
    return _decide(args, "node.approve", "approved")


def cmd_nodes_reject(args) -> int:
    return _decide(args, "node.reject", "rejected")


def cmd_nodes_remove(args) -> int:
    with cluster_client(args) as c:
        node = next((n for n in c.status().nodes if n.id == args.node_id), None)
        if node is None:
            raise UsageError(f"no member named {args.node_id!r}; see `cortex nodes`")
        if node.liveness == "alive" and not args.force:
            raise UsageError(f"{args.node_id} is alive: run `cortex leave` on it, or pass --force to remove it anyway")
        removed = c.remove_node(args.node_id)
    emit(args, {"node_id": args.node_id, "removed": removed}, f"removed {args.node_id}" if removed
         else f"{args.node_id} was not a member (already removed)")
    return 0


def register(commands: CommandRegistry) -> None:
    nodes = commands.group("nodes", "list nodes with role, liveness and replication lag", fn=cmd_nodes)
    members_only = "current members only (hide nodes that left)"
    commands.parser(nodes).add_argument("--members", action="store_true", help=members_only)
    sp = commands.add("list", cmd_nodes, "list nodes (the default)", nodes)
    sp.add_argument("--members", action="store_true", help=members_only)
    commands.add("pending", cmd_nodes_pending, "join requests awaiting approval", nodes)
    for name, fn, verb in (("approve", cmd_nodes_approve, "admit"), ("reject", cmd_nodes_reject, "refuse")):
        sp = commands.add(name, fn, f"{verb} a node whose join request is pending", nodes)
        sp.add_argument("node_id")
        sp.add_argument("--retry", type=float, default=10.0, help="seconds to retry transient failures")
    sp = commands.add("remove", cmd_nodes_remove, "remove a member (a dead server leaves the Raft configuration)",
                      nodes)
    sp.add_argument("node_id")
    sp.add_argument("--force", action="store_true", help="remove even a node that is alive")

"""`cortex nodes` (members and the nodes that left), `cortex nodes forget ID`, `cortex nodes promote ID`."""

from __future__ import annotations

import argparse
import time

from cortex.cli import UsageError, _client, _leader_view, _nodes_table, _status_dict, emit, table


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
    with _client(args) as c:
        status = c.status()
        view = _leader_view(args, status)
        left = [] if args.members else _left_nodes(c)
    rows = _status_dict(view)["nodes"] if view.nodes else []
    human = _nodes_table(view, status.leader_id)
    if left:
        human += "\n\nleft (kept until forgotten: `cortex nodes forget ID`, or after liveness.forget_left_after)\n"
        human += table([{"id": n["id"], "role": n["role"], "left": _ago(n["left_at"]), "reason": n["left_reason"],
                         "grpc": n["grpc_address"]} for n in left], ["id", "role", "left", "reason", "grpc"])
    emit(args, rows + left, human)
    return 0


def cmd_nodes_forget(args) -> int:
    with _client(args) as c:
        result = c.write("member.forget", {"node_id": args.node_id}, retry_for=args.retry)
    emit(args, result, f"forgot {args.node_id}" if result.get("forgotten")
         else f"{args.node_id} is not on record (already forgotten)")
    return 0


def cmd_nodes_promote(args) -> int:
    with _client(args) as c:
        if args.node_id not in {n.id for n in _leader_view(args, c.status()).nodes}:
            raise UsageError(f"no member named {args.node_id!r}; see `cortex nodes`")
        response = c.promote_node(args.node_id, args.raft or "")
    emit(args, {"node_id": response.node_id, "role": "server", "raft_address": response.raft_address},
         f"promoted {response.node_id}: a voting server now, Raft at {response.raft_address}")
    return 0


def register(sub, add) -> None:
    nodes = sub.choices["nodes"]
    nodes.set_defaults(fn=cmd_nodes)
    nodes.add_argument("--members", action="store_true", help="current members only (hide nodes that left)")
    group = next(a for a in nodes._actions if isinstance(a, argparse._SubParsersAction))
    listing = group.choices["list"]
    listing.set_defaults(fn=cmd_nodes)
    listing.add_argument("--members", action="store_true", help="current members only (hide nodes that left)")
    sp = add("forget", cmd_nodes_forget, "drop the record of a node that left", group)
    sp.add_argument("node_id")
    sp.add_argument("--retry", type=float, default=10.0, help="seconds to retry transient failures")
    sp = add("promote", cmd_nodes_promote, "make a worker a voting server (admin; safe to repeat)", group)
    sp.add_argument("node_id")
    sp.add_argument("--raft", default="", help="its Raft address HOST:PORT (default: its gRPC host, port + 1)")

"""`cortex status`, `cortex state` and `cortex leader transfer`: the cluster as a whole."""

from __future__ import annotations

from cortex.cli.output import LEVELS, cluster_client, emit, leader_view, nodes_table, status_dict
from cortex.cli.registry import CommandRegistry


def cmd_status(args) -> int:
    with cluster_client(args, socket_ok=True) as c:  # one connection for every read below
        status = c.status()
        view = leader_view(args, status)
        doc = status_dict(status)
        doc["nodes"] = status_dict(view)["nodes"] if view.nodes else doc.get("nodes", [])
        if status.state == "uninitialized":
            emit(args, doc, f"node {status.node_id} is not in a cluster: waiting for {status.waiting_for}")
            return 0
        if args.json:
            doc["metrics"] = _metrics_addresses(c)
        taken = _taken_over(c)
    head = (f"cluster   {status.cluster_id}\nnode      {status.node_id} ({status.role}, {status.state})\n"
            f"leader    {status.leader_id or '(none)'} {status.leader_grpc_address}\n"
            f"term      {status.term}\ncommit    {status.commit_index}\napplied   {status.applied_index}\n"
            f"quorum    {'yes' if status.has_quorum else 'NO'}")
    if status.waiting_for:
        head += f"\nwaiting   {status.waiting_for}"
    if taken:
        doc["services_taken_over"] = taken
        head += "\ntaken over " + ", ".join(f"{t['name']} (on {t['holder']}, home {t['home']}, {t['state']})"
                                          for t in taken)
    emit(args, doc, head + "\n\n" + nodes_table(view, status.leader_id))
    return 0


def _metrics_addresses(c) -> dict[str, str]:
    """Each node's Prometheus /metrics address, as its sentinel published it ({} when none did)."""
    from cortex.sentinel import records

    try:
        return {r["node_id"]: r["metrics"] for r in records.read_all(lambda q, a: c.read(q, a, level="stale"))
                if r.get("metrics")}
    except Exception:
        return {}


def _taken_over(c) -> list[dict]:
    """Services away from their home node (best effort: an older cluster has no services domain)."""
    try:
        rows = c.read("service.list", {}, level="leader")
    except Exception:
        return []
    return [{"name": r["name"], "holder": r["holder"], "home": r["home"], "state": r["state"]}
            for r in rows if r["holder"] != r["home"] or r["state"] != "running"]


def cmd_state(args) -> int:
    with cluster_client(args) as c:
        info = c.read("cluster", {}, level=args.level)
        info.update(c.read("digest", {}, level=args.level))
    emit(args, info, "\n".join(f"{k:20} {v}" for k, v in info.items()))
    return 0


def cmd_leader_transfer(args) -> int:
    with cluster_client(args) as c:
        response = c.transfer_leadership(args.node or "")
    emit(args, {"leader": response.new_leader_id, "term": response.term},
         f"leader is now {response.new_leader_id} (term {response.term})")
    return 0


def register(commands: CommandRegistry) -> None:
    commands.add("status", cmd_status, "cluster status: leader, term, indexes, nodes")
    leader = commands.group("leader", "leadership")
    sp = commands.add("transfer", cmd_leader_transfer, "hand leadership to another server", leader)
    sp.add_argument("node", nargs="?", help="target server id (default: any up-to-date server)")
    sp = commands.add("state", cmd_state, "replicated state summary and digest")
    sp.add_argument("--level", choices=LEVELS, default="stale")

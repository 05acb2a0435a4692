"""`cortex`: the command line for humans. Tables by default, `--json` everywhere, errors say what to do next."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict

DEFAULT_ADDR = "127.0.0.1:7400"
DEFAULT_SOCKET = "/var/lib/cortex/admin.sock"
DEV_DIR = ".cortex-dev"


class UsageError(Exception):
    pass


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    out = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip()]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(out)


def emit(args, data: Any, human: str) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else human)


def _client(args):
    from cortex.client import Client

    return Client(args.addr, timeout=args.timeout)


def _admin(args):
    from cortex.client import AdminClient

    if not Path(args.socket).exists():
        raise UsageError(f"no agent admin socket at {args.socket}: is `cortex agent` running here? "
                         "(pass --socket PATH or set CORTEX_SOCKET)")
    return AdminClient(args.socket)


# --- commands --------------------------------------------------------------------------------------------

def cmd_agent(args) -> int:
    from cortex import config, plugins
    from cortex.node import agent, logs

    try:
        cfg = config.load(args.config)
        plugins.check_config(cfg.plugins, cfg.source)
    except (config.ConfigError, plugins.PluginConfigError) as exc:
        print(f"cortex agent: {exc}", file=sys.stderr)
        return 2
    logs.setup(cfg.node_id, cfg.log.level, cfg.log.format)
    return agent.run(cfg)


def cmd_config_check(args) -> int:
    from cortex import config, plugins

    try:
        cfg = config.load(args.file)
        plugins.check_config(cfg.plugins, cfg.source)
    except (config.ConfigError, plugins.PluginConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    emit(args, {"ok": True, "node_id": cfg.node_id, "role": cfg.role}, f"{args.file}: ok ({cfg.node_id}, {cfg.role})")
    return 0


def cmd_init(args) -> int:
    response = _admin(args).init()
    emit(args, {"cluster_id": response.cluster_id, "join_token": response.join_token},
         f"created cluster {response.cluster_id}\n"
         f"join token (servers and workers; keep it secret): {response.join_token}\n"
         f"on another node: cortex join THIS_NODE_GRPC_ADDRESS --token {response.join_token}")
    return 0


def cmd_join(args) -> int:
    token = args.token or (Path(args.token_file).read_text().strip() if args.token_file else "")
    response = _admin(args).join(args.address, token, args.insecure_skip_ca_pin)
    if response.admission == "pending":
        emit(args, {"cluster_id": "", "admission": "pending", "ca_pin": response.ca_pin},
             "join requested without a token: waiting for an operator's approval\n"
             f"this node trusts the cluster CA it was shown, pin {response.ca_pin}: the operator checks it\n"
             "against `cortex secrets ca` on a member before approving\n"
             "on a member: cortex nodes pending   then: cortex nodes approve NODE_ID  (or reject)\n"
             "this node keeps asking and joins by itself once approved; `cortex status` shows progress")
        return 0
    emit(args, {"cluster_id": response.cluster_id, "admission": "admitted"}, f"joined cluster {response.cluster_id}")
    return 0


def cmd_leave(args) -> int:
    _admin(args).leave()
    emit(args, {"left": True}, "left the cluster; this node's replicated state was removed")
    return 0


def _status_dict(status) -> dict:
    return MessageToDict(status, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _leader_view(args, status):
    """Per-node lag and liveness are the leader's knowledge: ask it when we are not it."""
    from cortex.client import Client, CortexError

    if status.state in ("leader", "worker") or not status.leader_grpc_address:
        return status
    try:
        with Client(status.leader_grpc_address, timeout=args.timeout) as leader:
            return leader.status()
    except CortexError:
        return status


def cmd_status(args) -> int:
    with _client(args) as c:
        status = c.status()
        view = _leader_view(args, status)
    doc = _status_dict(status)
    doc["nodes"] = _status_dict(view)["nodes"] if view.nodes else doc.get("nodes", [])
    if status.state == "uninitialized":
        emit(args, doc, f"node {status.node_id} is not in a cluster: waiting for {status.waiting_for}")
        return 0
    head = (f"cluster   {status.cluster_id}\nnode      {status.node_id} ({status.role}, {status.state})\n"
            f"leader    {status.leader_id or '(none)'} {status.leader_grpc_address}\n"
            f"term      {status.term}\ncommit    {status.commit_index}\napplied   {status.applied_index}\n"
            f"quorum    {'yes' if status.has_quorum else 'NO'}")
    if status.waiting_for:
        head += f"\nwaiting   {status.waiting_for}"
    emit(args, doc, head + "\n\n" + _nodes_table(view, status.leader_id))
    return 0


def _nodes_table(status, leader_id: str) -> str:
    rows = []
    for n in status.nodes:
        rows.append({
            "id": n.id + (" *" if n.id == leader_id else ""), "role": n.role, "liveness": n.liveness,
            "lag": "" if n.replication_lag < 0 else n.replication_lag,
            "seen": "" if n.last_seen_age < 0 else f"{n.last_seen_age:.1f}s ago",
            "grpc": n.grpc_address, "raft": n.raft_address,
        })
    return table(rows, ["id", "role", "liveness", "lag", "seen", "grpc", "raft"])


def cmd_nodes(args) -> int:
    with _client(args) as c:
        status = c.status()
        view = _leader_view(args, status)
    emit(args, _status_dict(view)["nodes"] if view.nodes else [], _nodes_table(view, status.leader_id))
    return 0


def cmd_nodes_pending(args) -> int:
    with _client(args) as c:
        rows = c.read("join_requests", {}, level="leader")
    for row in rows:
        row["requested"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["requested_at"]))
    emit(args, rows, table(rows, ["node_id", "role", "grpc_address", "state", "requested"]) if rows
         else "no join requests (nodes joining with a token do not need approval)")
    return 0


def _decide(args, command_type: str, verb: str) -> int:
    with _client(args) as c:
        result = c.write(command_type, {"node_id": args.node_id}, retry_for=args.retry)
    emit(args, result, f"{verb} {args.node_id}" + ("" if result.get("changed", True) else " (already)"))
    return 0


def cmd_nodes_approve(args) -> int:
    return _decide(args, "node.approve", "approved")


def cmd_nodes_reject(args) -> int:
    return _decide(args, "node.reject", "rejected")


def cmd_nodes_remove(args) -> int:
    with _client(args) as c:
        node = next((n for n in c.status().nodes if n.id == args.node_id), None)
        if node is None:
            raise UsageError(f"no member named {args.node_id!r}; see `cortex nodes`")
        if node.liveness == "alive" and not args.force:
            raise UsageError(f"{args.node_id} is alive: run `cortex leave` on it, or pass --force to remove it anyway")
        removed = c.remove_node(args.node_id)
    emit(args, {"node_id": args.node_id, "removed": removed}, f"removed {args.node_id}" if removed
         else f"{args.node_id} was not a member (already removed)")
    return 0


def cmd_leader_transfer(args) -> int:
    with _client(args) as c:
        response = c.transfer_leadership(args.node or "")
    emit(args, {"leader": response.new_leader_id, "term": response.term},
         f"leader is now {response.new_leader_id} (term {response.term})")
    return 0


def cmd_kv_put(args) -> int:
    with _client(args) as c:
        result = c.put(args.key, args.value, idempotency_key=args.idempotency_key, retry_for=args.retry)
    emit(args, result, f"{args.key} = {args.value!r} (version {result['version']}, index {result['_index']})")
    return 0


def cmd_kv_get(args) -> int:
    with _client(args) as c:
        row = c.read("kv.get", {"key": args.key}, level=args.level)
    if row is None:
        emit(args, None, f"{args.key}: not set")
        return 1
    emit(args, row, row["value"])
    return 0


def cmd_kv_delete(args) -> int:
    with _client(args) as c:
        result = c.write("kv.delete", {"key": args.key})
    emit(args, result, f"{args.key}: {'deleted' if result['deleted'] else 'was not set'}")
    return 0


def cmd_kv_list(args) -> int:
    with _client(args) as c:
        rows = c.read("kv.list", {"prefix": args.prefix, "limit": args.limit}, level=args.level)
    emit(args, rows, table(rows, ["key", "value", "version", "mod_index"]))
    return 0


def cmd_state(args) -> int:
    with _client(args) as c:
        info = c.read("cluster", {}, level=args.level)
        info.update(c.read("digest", {}, level=args.level))
    emit(args, info, "\n".join(f"{k:20} {v}" for k, v in info.items()))
    return 0


def parse_duration(text: str) -> float:
    """'90s', '30m', '1h', '2d' or plain seconds; '0' means no expiry."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1:] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise UsageError(f"bad duration {text!r}: use e.g. 90s, 30m, 1h, 2d") from None


def _when(ts: float | None) -> str:
    return "never" if not ts else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def cmd_token_create(args) -> int:
    ttl = parse_duration(args.ttl)
    if ttl < 0 or args.uses < 0:
        raise UsageError("--ttl and --uses must not be negative")
    with _client(args) as c:
        response = c.create_token(args.role, ttl, args.uses)
    from cortex.membership.identity import split_token

    doc = {"token": response.token, "id": response.token_id, "role": args.role,
           "expires_at": response.expires_at or None, "uses": args.uses or None,
           "ca_pin": split_token(response.token)[1]}
    emit(args, doc, f"{response.token}\n  id {response.token_id}, joins as {args.role} or less, "
                    f"expires {_when(response.expires_at)}, uses {args.uses or 'unlimited'}\n"
                    "  shown once: the cluster stores only its hash; it ends in the cluster CA's pin, which the "
                    "joining node checks before sending it")
    return 0


def cmd_token_list(args) -> int:
    with _client(args) as c:
        rows = c.read("tokens", {}, level="leader")
    human = table([{**r, "created": _when(r["created_at"]), "expires": _when(r["expires_at"]),
                    "uses_left": "unlimited" if r["uses_left"] is None else r["uses_left"],
                    "state": "revoked" if r["revoked"] else "active"} for r in rows],
                  ["id", "role", "state", "created", "expires", "uses_left"])
    emit(args, rows, human)
    return 0


def cmd_token_revoke(args) -> int:
    with _client(args) as c:
        c.revoke_token(args.id)
    emit(args, {"revoked": args.id}, f"revoked token {args.id}")
    return 0


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


# --- parser ------------------------------------------------------------------------------------------------

def _common(defaults: bool) -> argparse.ArgumentParser:
    """Global options, accepted before or after the subcommand (sub-parsers must not reset them)."""
    d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=d(False), help="print JSON instead of tables")
    common.add_argument("--addr", default=d(os.environ.get("CORTEX_ADDR", DEFAULT_ADDR)),
                        help=f"gRPC address of any node (env CORTEX_ADDR, default {DEFAULT_ADDR})")
    common.add_argument("--socket", default=d(os.environ.get("CORTEX_SOCKET", DEFAULT_SOCKET)),
                        help="the local agent's admin socket (env CORTEX_SOCKET)")
    common.add_argument("--timeout", type=float, default=d(10.0), help="seconds per call")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common(defaults=False)
    p = argparse.ArgumentParser(prog="cortex", description=__doc__, parents=[_common(defaults=True)])
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help, parent=sub):
        sp = parent.add_parser(name, help=help, parents=[common])
        sp.set_defaults(fn=fn)
        return sp

    sp = add("agent", cmd_agent, "run the node agent (the daemon)")
    sp.add_argument("--config", required=True, help="YAML config file")
    cfg = sub.add_parser("config", help="config tools").add_subparsers(dest="sub", required=True)
    sp = add("check", cmd_config_check, "validate a config file", cfg)
    sp.add_argument("file")

    add("init", cmd_init, "create a new cluster with the local agent as first server")
    sp = add("join", cmd_join, "join the local agent to a cluster")
    sp.add_argument("address", help="gRPC address of any member")
    sp.add_argument("--token", default="", help="a join token (without one, an operator must approve the node)")
    sp.add_argument("--token-file", default="")
    sp.add_argument("--insecure-skip-ca-pin", action="store_true",
                    help="accept a token without a CA pin (the server is then not checked before the token is sent)")
    add("leave", cmd_leave, "remove the local agent from its cluster")
    add("status", cmd_status, "cluster status: leader, term, indexes, nodes")
    nodes_parser = add("nodes", cmd_nodes, "list nodes with role, liveness and replication lag")
    nodes = nodes_parser.add_subparsers(dest="sub")
    add("list", cmd_nodes, "list nodes (the default)", nodes)
    add("pending", cmd_nodes_pending, "join requests awaiting approval", nodes)
    for name, fn, verb in (("approve", cmd_nodes_approve, "admit"), ("reject", cmd_nodes_reject, "refuse")):
        sp = add(name, fn, f"{verb} a node whose join request is pending", nodes)
        sp.add_argument("node_id")
        sp.add_argument("--retry", type=float, default=10.0, help="seconds to retry transient failures")
    sp = add("remove", cmd_nodes_remove, "remove a member (a dead server leaves the Raft configuration)", nodes)
    sp.add_argument("node_id")
    sp.add_argument("--force", action="store_true", help="remove even a node that is alive")
    leader = sub.add_parser("leader", help="leadership").add_subparsers(dest="sub", required=True)
    sp = add("transfer", cmd_leader_transfer, "hand leadership to another server", leader)
    sp.add_argument("node", nargs="?", help="target server id (default: any up-to-date server)")
    from cortex.membership import (
        cli as members_cli,  # here, not at the top: it imports this module's helpers
    )

    members_cli.register(sub, add)  # cortex nodes (with nodes that left), nodes forget|promote

    from cortex.update import cli as update_cli

    update_cli.register(sub, add, emit, table, _client)
    from cortex.security import cli as secrets_cli

    secrets_cli.register(sub, add, emit, _client)  # cortex secrets rotate

    kv = sub.add_parser("kv", help="debug key/value store (replicated)").add_subparsers(dest="sub", required=True)
    sp = add("put", cmd_kv_put, "set a key", kv)
    sp.add_argument("key")
    sp.add_argument("value")
    sp.add_argument("--idempotency-key", default=None, help="retries with the same key apply once")
    sp.add_argument("--retry", type=float, default=10.0, help="seconds to retry transient failures")
    levels = ["stale", "leader", "linearizable"]
    sp = add("get", cmd_kv_get, "read a key", kv)
    sp.add_argument("key")
    sp.add_argument("--level", choices=levels, default="linearizable")
    sp = add("delete", cmd_kv_delete, "delete a key", kv)
    sp.add_argument("key")
    sp = add("list", cmd_kv_list, "list keys by prefix", kv)
    sp.add_argument("prefix", nargs="?", default="")
    sp.add_argument("--limit", type=int, default=100)
    sp.add_argument("--level", choices=levels, default="leader")
    sp = add("state", cmd_state, "replicated state summary and digest")
    sp.add_argument("--level", choices=levels, default="stale")

    tokens = sub.add_parser("token", help="join tokens").add_subparsers(dest="sub", required=True)
    sp = add("create", cmd_token_create, "create a join token (printed once)", tokens)
    sp.add_argument("--role", choices=["worker", "server"], default="worker")
    sp.add_argument("--ttl", default="1h", help="lifetime: 90s, 30m, 1h, 2d; 0 for none (default 1h)")
    sp.add_argument("--uses", type=int, default=0, help="how many joins it admits (default unlimited)")
    add("list", cmd_token_list, "list join tokens (ids, never secrets)", tokens)
    sp = add("revoke", cmd_token_revoke, "revoke a join token", tokens)
    sp.add_argument("id", help="token id from `cortex token list`")

    from cortex.netboot import cli as netboot_cli
    netboot_cli.register(sub, common)

    dev = sub.add_parser("dev", help="local multi-node cluster on loopback").add_subparsers(dest="sub", required=True)
    sp = add("up", cmd_dev_up, "start a local cluster of real agent processes", dev)
    sp.add_argument("--servers", type=int, default=3, choices=[1, 3, 5])
    sp.add_argument("--workers", type=int, default=2)
    sp.add_argument("--base-port", type=int, default=7400)
    sp.add_argument("--dir", default=DEV_DIR)
    sp = add("down", cmd_dev_down, "stop the local cluster (its data stays for the next `up`)", dev)
    sp.add_argument("--dir", default=DEV_DIR)
    sp.add_argument("--purge", action="store_true", help="also delete the cluster's data")
    from cortex.memory.cli import register as register_backup
    register_backup(sub, common)

    from cortex.kube import cli as kube_cli

    kube_cli.register(sub, common)

    from cortex.plugins import cli as cli_plugins  # here, not at the top: it imports this module's helpers

    cli_plugins.register(sub, common)  # plugins, tools, mcp

    from cortex.tasks import cli as tasks_cli  # cortex tasks|dlq|workflows, cortex nodes drain|undrain

    tasks_cli.register(sub, add, common)
    return p


def main(argv: list[str] | None = None) -> int:
    from cortex.client import CortexError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except UsageError as exc:
        print(f"cortex: {exc}", file=sys.stderr)
        return 2
    except CortexError as exc:
        hint = {
            "UNAVAILABLE": f"is a node listening at {args.addr}? start one with `just up`, or pass --addr",
            "FAILED_PRECONDITION": "see `cortex status` for what the node is waiting for",
            "DEADLINE_EXCEEDED": "the cluster may have lost quorum; check `cortex status` and retry",
        }.get(exc.code.name, "")
        print(f"cortex: {exc.details or exc.code.name}" + (f"\n  hint: {hint}" if hint else ""), file=sys.stderr)
        return 1
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"cortex: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""`cortex init|join|leave`: the local agent enters or leaves a cluster, asked over its admin socket."""

from __future__ import annotations

from pathlib import Path

from cortex.cli.output import UsageError, admin_client, emit, parse_duration, when
from cortex.cli.registry import CommandRegistry


def cmd_init(args) -> int:
    ttl = parse_duration(args.token_ttl) if args.token_ttl else 0.0
    if ttl < 0 or (args.token_ttl and ttl == 0):
        raise UsageError("--token-ttl must be a positive duration (90s, 30m, 1h, 2d): the init token always expires")
    response = admin_client(args).init(ttl)
    emit(args, {"cluster_id": response.cluster_id, "join_token": response.join_token,
                "expires_at": response.token_expires_at or None},
         f"created cluster {response.cluster_id}\n"
         f"join token (servers and workers; keep it secret): {response.join_token}\n"
         f"  shown once, expires {when(response.token_expires_at)}; later: `cortex token create`\n"
         f"on another node: cortex join THIS_NODE_GRPC_ADDRESS --token {response.join_token}")
    return 0


def cmd_join(args) -> int:
    token = args.token or (Path(args.token_file).read_text().strip() if args.token_file else "")
    response = admin_client(args).join(args.address, token, args.insecure_skip_ca_pin)
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
    admin_client(args).leave()
    emit(args, {"left": True}, "left the cluster; this node's replicated state was removed")
    return 0


def register(commands: CommandRegistry) -> None:
    sp = commands.add("init", cmd_init, "create a new cluster with the local agent as first server")
    sp.add_argument("--token-ttl", default="", help="lifetime of the join token it prints: 90s, 30m, 1h, 2d "
                    "(default: the agent's membership.init_token_ttl, 1h)")
    sp = commands.add("join", cmd_join, "join the local agent to a cluster")
    sp.add_argument("address", help="gRPC address of any member")
    sp.add_argument("--token", default="", help="a join token (without one, an operator must approve the node)")
    sp.add_argument("--token-file", default="")
    sp.add_argument("--insecure-skip-ca-pin", action="store_true",
                    help="accept a token without a CA pin (the server is then not checked before the token is sent)")
    commands.add("leave", cmd_leave, "remove the local agent from its cluster")

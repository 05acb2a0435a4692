"""`cortex init|join|leave`: the local agent enters or leaves a cluster, asked over its admin socket."""

from __future__ import annotations

from pathlib import Path

from cortex.cli.output import admin_client, emit
from cortex.cli.registry import CommandRegistry


def cmd_init(args) -> int:
    response = admin_client(args).init()
    emit(args, {"cluster_id": response.cluster_id, "join_token": response.join_token},
         f"created cluster {response.cluster_id}\n"
         f"join token (servers and workers; keep it secret): {response.join_token}\n"
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
    commands.add("init", cmd_init, "create a new cluster with the local agent as first server")
    sp = commands.add("join", cmd_join, "join the local agent to a cluster")
    sp.add_argument("address", help="gRPC address of any member")
    sp.add_argument("--token", default="", help="a join token (without one, an operator must approve the node)")
    sp.add_argument("--token-file", default="")
    sp.add_argument("--insecure-skip-ca-pin", action="store_true",
                    help="accept a token without a CA pin (the server is then not checked before the token is sent)")
    commands.add("leave", cmd_leave, "remove the local agent from its cluster")

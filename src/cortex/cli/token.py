"""`cortex token create|list|revoke`: join tokens."""

from __future__ import annotations

from cortex.cli.output import UsageError, cluster_client, emit, parse_duration, table, when
from cortex.cli.registry import CommandRegistry


def cmd_token_create(args) -> int:
    ttl = parse_duration(args.ttl)
    if ttl < 0 or args.uses < 0:
        raise UsageError("--ttl and --uses must not be negative")
    with cluster_client(args) as c:
        response = c.create_token(args.role, ttl, args.uses)
    from cortex.membership.identity import split_token

    doc = {"token": response.token, "id": response.token_id, "role": args.role,
           "expires_at": response.expires_at or None, "uses": args.uses or None,
           "ca_pin": split_token(response.token)[1]}
    emit(args, doc, f"{response.token}\n  id {response.token_id}, joins as {args.role} or less, "
                    f"expires {when(response.expires_at)}, uses {args.uses or 'unlimited'}\n"
                    "  shown once: the cluster stores only its hash; it ends in the cluster CA's pin, which the "
                    "joining node checks before sending it")
    return 0


def cmd_token_list(args) -> int:
    with cluster_client(args) as c:
        rows = c.read("tokens", {}, level="leader")
    human = table([{**r, "created": when(r["created_at"]), "expires": when(r["expires_at"]),
                    "uses_left": "unlimited" if r["uses_left"] is None else r["uses_left"],
                    "state": "revoked" if r["revoked"] else "active"} for r in rows],
                  ["id", "role", "state", "created", "expires", "uses_left"])
    emit(args, rows, human)
    return 0


def cmd_token_revoke(args) -> int:
    with cluster_client(args) as c:
        c.revoke_token(args.id)
    emit(args, {"revoked": args.id}, f"revoked token {args.id}")
    return 0


def register(commands: CommandRegistry) -> None:
    tokens = commands.group("token", "join tokens")
    sp = commands.add("create", cmd_token_create, "create a join token (printed once)", tokens)
    sp.add_argument("--role", choices=["worker", "server"], default="worker")
    sp.add_argument("--ttl", default="1h", help="lifetime: 90s, 30m, 1h, 2d; 0 for none (default 1h)")
    sp.add_argument("--uses", type=int, default=0, help="how many joins it admits (default unlimited)")
    commands.add("list", cmd_token_list, "list join tokens (ids, never secrets)", tokens)
    sp = commands.add("revoke", cmd_token_revoke, "revoke a join token", tokens)
    sp.add_argument("id", help="token id from `cortex token list`")

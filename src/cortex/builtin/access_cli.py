"""`cortex audit log|policies|set|clear`: the cluster's audit log of tool calls that change state, and the
plugin policies saying who may read or change through each plugin's tools (plugins/access.py)."""

from __future__ import annotations

import getpass

from cortex.cli.output import UsageError, cluster_client, emit, table, when
from cortex.cli.registry import CommandRegistry

ROLES = ("reader", "operator", "admin")


def _names(text: str | None, what: str, allowed: tuple[str, ...] = ()) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if allowed and n not in allowed]
    if bad:
        raise UsageError(f"{what}: unknown role(s) {', '.join(bad)}; use {', '.join(allowed)}")
    return names


def _rule(roles: str | None, callers: str | None, what: str) -> dict | None:
    if roles is None and callers is None:
        return None
    return {"roles": _names(roles, f"--{what}-roles", ROLES) or [],
            "callers": _names(callers, f"--{what}-callers") or []}


def _show(rule: dict | None) -> str:
    if rule is None:
        return "(tools' roles)"
    return ", ".join([*rule["roles"], *rule["callers"]]) or "no one"


def cmd_log(args) -> int:
    query = {k: getattr(args, k) for k in ("tool", "caller", "plugin", "kind", "outcome") if getattr(args, k)}
    with cluster_client(args) as c:
        rows = c.read("access.log", {**query, "limit": args.limit})
    shown = [{**r, "time": when(r["ts"]), "detail": r["detail"][:60]} for r in rows]
    emit(args, rows, table(shown, ["seq", "time", "node", "caller", "role", "tool", "plugin", "digest", "outcome",
                                   "detail"]) if rows else "no audit records yet")
    return 0


def cmd_policies(args) -> int:
    with cluster_client(args) as c:
        rows = c.read("access.policies", {})
    shown = [{"plugin": r["plugin"], "read": _show(r["read"]), "change": _show(r["change"]),
              "updated": when(r["updated_at"]), "by": r["updated_by"]} for r in rows]
    emit(args, rows, table(shown, ["plugin", "read", "change", "updated", "by"]) if rows else
         "no plugin policies: every plugin's tools keep their own roles")
    return 0


def cmd_set(args) -> int:
    read = _rule(args.read_roles, args.read_callers, "read")
    change = _rule(args.change_roles, args.change_callers, "change")
    if read is None and change is None:
        raise UsageError("give --read-roles/--read-callers and/or --change-roles/--change-callers "
                         "(cortex audit clear PLUGIN goes back to the tools' roles)")
    command = {"plugin": args.plugin, "read": read, "change": change, "by": f"cli:{getpass.getuser()}"}
    with cluster_client(args) as c:
        result = c.write("access.policy_set", command, idempotency_key=args.idempotency_key, retry_for=10.0)
    emit(args, result, f"{args.plugin}: read {_show(result['read'])}; change {_show(result['change'])}"
         + ("" if result["changed"] else " (unchanged)"))
    return 0


def cmd_clear(args) -> int:
    with cluster_client(args) as c:
        result = c.write("access.policy_clear", {"plugin": args.plugin, "by": f"cli:{getpass.getuser()}"},
                         idempotency_key=args.idempotency_key, retry_for=10.0)
    emit(args, result, f"{args.plugin}: " + ("policy removed; its tools' own roles apply" if result["cleared"]
                                             else "had no policy"))
    return 0


def register(commands: CommandRegistry) -> None:
    audit = commands.group("audit", "the audit log of tool calls that change state, and plugin policies")
    sp = commands.add("log", cmd_log, "audit records, newest first", audit)
    for name in ("tool", "caller", "plugin"):
        sp.add_argument(f"--{name}", default="")
    sp.add_argument("--kind", choices=["tool", "policy"], default="")
    sp.add_argument("--outcome", choices=["ok", "error", "refused"], default="")
    sp.add_argument("--limit", type=int, default=50)
    commands.add("policies", cmd_policies, "who may read and change through each plugin's tools", audit)
    sp = commands.add("set", cmd_set, "set a plugin's policy (a policy narrows its tools' roles, never widens)",
                      audit)
    sp.add_argument("plugin")
    for what in ("read", "change"):
        sp.add_argument(f"--{what}-roles", default=None, help=f"comma-separated roles that may {what}: "
                        + ", ".join(ROLES))
        sp.add_argument(f"--{what}-callers", default=None, help=f"comma-separated caller identities that may {what} "
                        "(grpc:admin:n1, admin-socket, mcp-http-token)")
    sp.add_argument("--idempotency-key", default=None, help="retries with the same key apply once")
    sp = commands.add("clear", cmd_clear, "remove a plugin's policy", audit)
    sp.add_argument("plugin")
    sp.add_argument("--idempotency-key", default=None, help="retries with the same key apply once")



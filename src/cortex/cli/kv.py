"""`cortex kv put|get|delete|list`: the replicated debug key/value store."""

from __future__ import annotations

from cortex.cli.output import LEVELS, cluster_client, emit, table
from cortex.cli.registry import CommandRegistry


def cmd_kv_put(args) -> int:
    with cluster_client(args) as c:
        result = c.put(args.key, args.value, idempotency_key=args.idempotency_key, retry_for=args.retry)
    emit(args, result, f"{args.key} = {args.value!r} (version {result['version']}, index {result['_index']})")
    return 0


def cmd_kv_get(args) -> int:
    with cluster_client(args) as c:
        row = c.read("kv.get", {"key": args.key}, level=args.level)
    if row is None:
        emit(args, None, f"{args.key}: not set")
        return 1
    emit(args, row, row["value"])
    return 0


def cmd_kv_delete(args) -> int:
    with cluster_client(args) as c:
        result = c.write("kv.delete", {"key": args.key})
    emit(args, result, f"{args.key}: {'deleted' if result['deleted'] else 'was not set'}")
    return 0


def cmd_kv_list(args) -> int:
    with cluster_client(args) as c:
        rows = c.read("kv.list", {"prefix": args.prefix, "limit": args.limit}, level=args.level)
    emit(args, rows, table(rows, ["key", "value", "version", "mod_index"]))
    return 0


def register(commands: CommandRegistry) -> None:
    kv = commands.group("kv", "debug key/value store (replicated)")
    sp = commands.add("put", cmd_kv_put, "set a key", kv)
    sp.add_argument("key")
    sp.add_argument("value")
    sp.add_argument("--idempotency-key", default=None, help="retries with the same key apply once")
    sp.add_argument("--retry", type=float, default=10.0, help="seconds to retry transient failures")
    sp = commands.add("get", cmd_kv_get, "read a key", kv)
    sp.add_argument("key")
    sp.add_argument("--level", choices=LEVELS, default="linearizable")
    sp = commands.add("delete", cmd_kv_delete, "delete a key", kv)
    sp.add_argument("key")
    sp = commands.add("list", cmd_kv_list, "list keys by prefix", kv)
    sp.add_argument("prefix", nargs="?", default="")
    sp.add_argument("--limit", type=int, default=100)
    sp.add_argument("--level", choices=LEVELS, default="leader")

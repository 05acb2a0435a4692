"""What every command shares: global options, how to reach a node, and how to print (tables by default,
`--json` everywhere). A leaf module, so CLI extensions import it without importing the whole CLI."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from cortex.core.args import READ_LEVELS

DEFAULT_ADDR = "127.0.0.1:7400"
DEFAULT_SOCKET = "/var/lib/cortex/admin.sock"
LEVELS = list(READ_LEVELS)
SOCKET_HINT = "(pass --socket PATH or set CORTEX_SOCKET)"


class UsageError(Exception):
    """The operator asked for something that cannot be done as asked; printed as `cortex: ...`, exit 2."""


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    out = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip()]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(out)


def emit(args, data: Any, human: str) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else human)


def parse_duration(text: str) -> float:
    """'90s', '30m', '1h', '2d' or plain seconds; '0' means no expiry."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1:] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise UsageError(f"bad duration {text!r}: use e.g. 90s, 30m, 1h, 2d") from None


def when(ts: float | None) -> str:
    return "never" if not ts else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


class _Given(argparse.Action):
    """Stores the value and remembers that it was given on the command line (a default socket path that
    happens to exist must not outrank --addr; a --socket the operator typed must)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def socket_chosen(args) -> bool:
    """The operator chose the local agent's socket (--socket or CORTEX_SOCKET) and no node address (--addr or
    CORTEX_ADDR): a command that can use either then takes the socket. Both named: the address, as before."""
    socket = getattr(args, "socket_given", False) or bool(os.environ.get("CORTEX_SOCKET"))
    addr = getattr(args, "addr_given", False) or bool(os.environ.get("CORTEX_ADDR"))
    return bool(socket and not addr)


def common_options(defaults: bool) -> argparse.ArgumentParser:
    """Global options, accepted before or after the subcommand (sub-parsers must not reset them, hence the
    variant without defaults that every subcommand inherits)."""
    d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=d(False), help="print JSON instead of tables")
    common.add_argument("--addr", default=d(os.environ.get("CORTEX_ADDR", DEFAULT_ADDR)), action=_Given,
                        help=f"gRPC address of any node (env CORTEX_ADDR, default {DEFAULT_ADDR})")
    common.add_argument("--socket", default=d(os.environ.get("CORTEX_SOCKET", DEFAULT_SOCKET)), action=_Given,
                        help="the local agent's admin socket (env CORTEX_SOCKET); named without --addr, "
                             "status, tools and plugins ask the local agent there")
    common.add_argument("--timeout", type=float, default=d(10.0), help="seconds per call")
    return common


# --- reaching a node: every command builds its connection here, from --addr, --socket and --timeout ---------

def cluster_client(args, socket_ok: bool = False):
    """The Cluster API of the node at --addr (it forwards to the leader when needed); with `socket_ok`, of the
    local agent on its admin socket when the operator named one (it answers Status and Read there)."""
    from cortex.client import Client

    if socket_ok and socket_chosen(args):
        return Client(f"unix:{require_socket(args)}", timeout=args.timeout)
    return Client(args.addr, timeout=args.timeout)


def require_socket(args, why: str = "is `cortex agent` running here?") -> str:
    if not Path(args.socket).exists():
        raise UsageError(f"no agent admin socket at {args.socket}: {why} {SOCKET_HINT}")
    return args.socket


def admin_client(args):
    """The local agent's Admin API (init, join, leave) on its unix socket."""
    from cortex.client import AdminClient

    return AdminClient(require_socket(args))


def node_target(args, via: str = "auto") -> str:
    """Where the Plugins API is called: the admin socket (admin role) or --addr (network role); `auto`
    takes the socket when it exists; `given` takes it when the operator named one (--socket, CORTEX_SOCKET),
    else --addr. A socket the operator named must exist."""
    if via == "given":
        via = "socket" if socket_chosen(args) else "addr"
    if via == "auto":
        via = "socket" if socket_chosen(args) or Path(args.socket).exists() else "addr"
    if via == "socket" and socket_chosen(args):
        require_socket(args)
    return f"unix:{args.socket}" if via == "socket" else args.addr


def plugins_stub(target: str):
    from cortex._proto.cortex.v1 import plugins_pb2_grpc as ppb_grpc
    from cortex.client import open_channel

    return ppb_grpc.PluginsStub(open_channel(target))


# --- the cluster's view of its nodes, shared by `status` and `nodes` ------------------------------------------

def status_dict(status) -> dict:
    from google.protobuf.json_format import MessageToDict  # on a call: the agent loads this module idle

    return MessageToDict(status, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def leader_view(args, status):
    """Per-node lag and liveness are the leader's knowledge: ask it when we are not it."""
    from cortex.client import Client, CortexError

    if status.state in ("leader", "worker") or not status.leader_grpc_address:
        return status
    try:
        with Client(status.leader_grpc_address, timeout=args.timeout) as leader:
            return leader.status()
    except CortexError:
        return status


def nodes_table(status, leader_id: str) -> str:
    rows = []
    for n in status.nodes:
        rows.append({
            "id": n.id + (" *" if n.id == leader_id else ""), "role": n.role,
            # answering but not converging: not plain "alive" (the leader's view, raft/convergence.py)
            "liveness": f"{n.liveness}, stuck {n.stuck_for:.0f}s" if n.replication == "stuck" else n.liveness,
            "lag": "" if n.replication_lag < 0 else n.replication_lag,
            "seen": "" if n.last_seen_age < 0 else f"{n.last_seen_age:.1f}s ago",
            "grpc": n.grpc_address, "raft": n.raft_address,
        })
    return table(rows, ["id", "role", "liveness", "lag", "seen", "grpc", "raft"])

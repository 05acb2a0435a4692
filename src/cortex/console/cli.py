"""CLI: `cortex console url` (a one-time sign-in link, as Jupyter prints) and `cortex console status`.

Both ask the node's own `console` plugin through the Plugins gRPC service: over the admin socket when it is
there (a local user who can reach it is the node's admin), else over --addr with a client certificate.
"""

from __future__ import annotations

import json
import sys
import time

import grpc

from cortex.cli.output import emit, node_target, plugins_stub, table
from cortex.cli.registry import CommandRegistry


class _ToolFailed(Exception):
    pass


def _rpc(args, method: str, request):
    from cortex.client import CortexError

    stub = plugins_stub(node_target(args, args.via))
    try:
        return getattr(stub, method)(request, timeout=args.timeout)
    except grpc.RpcError as exc:
        raise CortexError(exc.code(), exc.details() or "") from None


def _tool(args, name: str, arguments: dict):
    from cortex._proto.cortex.v1 import plugins_pb2 as ppb

    response = _rpc(args, "CallTool", ppb.CallToolRequest(name=name, arguments_json=json.dumps(arguments).encode()))
    if response.error:
        raise _ToolFailed(response.error)
    return json.loads(response.result_json) if response.result_json else None


def cmd_url(args) -> int:
    try:
        link = _tool(args, "console_login", {"role": args.role})
    except _ToolFailed as exc:
        message = str(exc)
        if "unknown tool" in message:
            message = ("this node runs no console plugin (plugins.console.enabled: false?); enable it and "
                       "restart the agent")
        print(f"cortex: {message}", file=sys.stderr)
        return 1
    emit(args, link, f"{link['url']}\n\nopen it within {link['expires_in']} s; it works once and signs this browser "
                     f"in as {link['role']} on {link['node_id']}")
    return 0


def cmd_status(args) -> int:
    from cortex._proto.cortex.v1 import plugins_pb2 as ppb

    response = _rpc(args, "ListPlugins", ppb.ListPluginsRequest())
    plugin = next((p for p in response.plugins if p.name == "console"), None)
    row = {"node_id": response.node_id, "state": plugin.state if plugin else "not installed",
           "error": plugin.error if plugin else "", "url": "", "checked": time.time()}
    if plugin and plugin.state == "running":
        try:
            link = _tool(args, "console_login", {"link": False})
            row["url"], row["sessions"] = link["console"], link["sessions"]
        except _ToolFailed as exc:
            row["error"] = str(exc)
    emit(args, row, table([row], ["node_id", "state", "url", "error"]))
    return 0 if row["state"] == "running" and not row["error"] else 1


def register(commands: CommandRegistry) -> None:
    group = commands.group("console", "the web console: a sign-in link, where it listens")
    for name, fn, text in (("url", cmd_url, "print a one-time link that signs a browser into this node's console"),
                           ("status", cmd_status, "whether this node serves the console, and where")):
        sp = commands.add(name, fn, text, parent=group)
        sp.add_argument("--via", choices=["auto", "socket", "addr"], default="auto",
                        help="reach the node over its admin socket or --addr (default: the socket when present)")
        if name == "url":
            sp.add_argument("--role", choices=["reader", "operator"], default="reader",
                            help="reader looks; operator may also drain, cancel, retry, take over (needs an "
                                 "operator or admin connection)")

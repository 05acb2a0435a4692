"""CLI: `cortex plugins`, `cortex tools list|call`, `cortex mcp` (stdio MCP server for a local assistant)."""

from __future__ import annotations

import json
import logging
import sys

import grpc

from cortex.cli.output import UsageError, emit, node_target, plugins_stub, require_socket, table
from cortex.cli.registry import CommandRegistry


def _stub(args):
    """The Plugins API of the node at --addr, or of the local agent when --socket names its admin socket."""
    target = node_target(args, "given")
    stub = plugins_stub(target)
    stub.cortex_target = target
    return stub


def _call(method, request, args, target: str = ""):
    from cortex.client import CortexError, find_credentials

    try:
        return method(request, timeout=args.timeout)
    except grpc.RpcError as exc:
        plaintext = bool(target) and not target.startswith("unix:") and find_credentials(target) is None
        raise CortexError(exc.code(), exc.details() or "", target, plaintext) from None


def cmd_plugins(args) -> int:
    from cortex._proto.cortex.v1 import plugins_pb2 as ppb

    stub = _stub(args)
    response = _call(stub.ListPlugins, ppb.ListPluginsRequest(), args, stub.cortex_target)
    rows = [{"name": p.name, "state": p.state, "tools": p.tools, "error": p.error, "origin": p.origin}
            for p in response.plugins]
    emit(args, {"node_id": response.node_id, "plugins": rows},
         f"plugins on {response.node_id}\n\n" + table(rows, ["name", "state", "tools", "error"]))
    return 0


def _set_state(args, running: bool) -> int:
    from cortex._proto.cortex.v1 import plugins_pb2 as ppb

    require_socket(args, "starting and stopping plugins is done on the node itself")
    target = node_target(args, "socket")
    stub = plugins_stub(target)
    response = _call(stub.SetPluginState, ppb.SetPluginStateRequest(name=args.name, running=running), args, target)
    p = response.plugin
    emit(args, {"name": p.name, "state": p.state, "error": p.error, "tools": p.tools},
         f"{p.name}: {p.state}" + (f" ({p.error})" if p.error else ""))
    return 0


def cmd_plugins_start(args) -> int:
    return _set_state(args, True)


def cmd_plugins_stop(args) -> int:
    return _set_state(args, False)


def cmd_tools_list(args) -> int:
    from cortex._proto.cortex.v1 import plugins_pb2 as ppb

    stub = _stub(args)
    response = _call(stub.ListTools, ppb.ListToolsRequest(), args, stub.cortex_target)
    rows = [{"name": t.name, "toolset": t.toolset, "plugin": t.plugin, "role": t.role,
             "kind": "destructive" if t.destructive else "read-only" if t.read_only else "write",
             "idempotent": t.idempotent, "description": t.description,
             "input_schema": json.loads(t.input_schema_json or b"{}")} for t in response.tools]
    human = table([{**r, "description": r["description"][:70]} for r in rows],
                  ["name", "toolset", "role", "kind", "description"])
    emit(args, {"node_id": response.node_id, "caller_role": response.caller_role, "tools": rows},
         f"{len(rows)} tools on {response.node_id} (this connection's role: {response.caller_role})\n\n{human}")
    return 0


def cmd_tools_call(args) -> int:
    from cortex._proto.cortex.v1 import plugins_pb2 as ppb

    try:
        arguments = json.loads(args.args)
    except ValueError as exc:
        raise UsageError(f"--args is not valid JSON: {exc}; e.g. --args '{{\"key\": \"a\"}}'") from None
    if not isinstance(arguments, dict):
        raise UsageError("--args must be a JSON object, e.g. '{\"key\": \"a\"}'")
    stub = _stub(args)
    response = _call(stub.CallTool, ppb.CallToolRequest(name=args.name, arguments_json=json.dumps(arguments).encode()),
                     args, stub.cortex_target)
    if response.error:
        print(f"cortex: {response.error}", file=sys.stderr)
        return 1
    result = json.loads(response.result_json) if response.result_json else None
    print(json.dumps(result, indent=2))
    return 0


def preflight(backend, view) -> None:
    """Say on stderr (the assistant's log; stdout is the MCP wire) what would otherwise only show up as tool
    errors later: an agent that cannot be called, or a profile the connection's credential does not reach."""
    from cortex.mcp.server import ToolError
    from cortex.mcp.toolsets import View, select

    try:  # briefly: an assistant waits for the server to start, and the first tools/list asks again anyway
        catalog = backend.catalog(None, timeout=5.0)
    except ToolError as exc:
        print(f"cortex mcp: {exc}", file=sys.stderr, flush=True)
        return
    try:
        selection = select(catalog.tools, View(catalog.caller_role, view.profile, view.toolsets), catalog.policy)
    except ValueError as exc:
        print(f"cortex mcp: {exc}", file=sys.stderr, flush=True)
        return
    if selection.notice:
        print(f"cortex mcp: {selection.notice}", file=sys.stderr, flush=True)


def cmd_mcp(args) -> int:
    import anyio

    from cortex.mcp.server import Frontend, GrpcBackend, parse_view, serve_stdio

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)  # stdout is the MCP wire
    target = node_target(args, args.via)
    try:
        view = parse_view(args.profile, args.toolsets)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    backend = GrpcBackend(target, timeout=max(args.timeout, 30.0))
    preflight(backend, view)
    try:
        anyio.run(serve_stdio, Frontend(backend, view, read_only=args.read_only))
    except KeyboardInterrupt:
        pass
    finally:
        backend.close()
    return 0


def register(commands: CommandRegistry) -> None:
    add = commands.add
    plugins = commands.group("plugins", "plugins on a node: state, error, tools", fn=cmd_plugins)
    add("list", cmd_plugins, "plugins on a node (the default)", plugins)
    for name, fn in (("start", cmd_plugins_start), ("stop", cmd_plugins_stop)):
        sp = add(name, fn, f"{name} a plugin on the local node (admin socket)", plugins)
        sp.add_argument("name")
    tools = commands.group("tools", "plugin tools (what MCP clients call)")
    add("list", cmd_tools_list, "every tool the node offers, with role and kind", tools)
    sp = add("call", cmd_tools_call, "call a tool on the node (--args JSON)", tools)
    sp.add_argument("name")
    sp.add_argument("--args", default="{}", help="the arguments as a JSON object")
    sp = add("mcp", cmd_mcp, "serve MCP on stdio for a local assistant (claude mcp add cortex -- cortex mcp)")
    sp.add_argument("--via", choices=["auto", "socket", "addr"], default="auto",
                    help="reach the local agent by its admin socket (admin role) or --addr (network role); "
                         "auto: the socket when it exists")
    sp.add_argument("--profile", default="", help="read-only | operator | admin (default: the node's policy)")
    sp.add_argument("--toolsets", default="", help="comma-separated toolsets to load, or 'all' "
                                                   "(default: the node's, up to its tool limit)")
    sp.add_argument("--read-only", action="store_true",
                    help="serve read-only tools only: every other tool is hidden and refused, whatever the profile")

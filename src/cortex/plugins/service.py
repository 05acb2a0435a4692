"""The `cortex.v1.Plugins` gRPC service: this node's plugin host for the MCP front end and the CLI.

Served on the node's gRPC address and on its admin unix socket. Who the caller is decides the role its tool
calls run with: the admin socket (file permissions are its authentication) is `admin`; on the network port
the client certificate's role decides, capped by `plugins.mcp.grpc_role` (default `operator`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import grpc

from cortex._proto.cortex.v1 import plugins_pb2 as ppb
from cortex._proto.cortex.v1 import plugins_pb2_grpc as ppb_grpc
from cortex.mcp.toolsets import Policy
from cortex.plugins.api import CALLER_ROLES, MAX_TOOL_ARGUMENT_BYTES, Caller, ToolError
from cortex.plugins.host import PluginHost
from cortex.security import authz

log = logging.getLogger("cortex.plugins.service")

MCP_PLUGIN = "mcp"
WATCH_POLL = 1.0  # how often a watcher re-checks that its caller is still there


def policy_of(host: PluginHost, node_id: str) -> Policy:
    return Policy.from_options(host.options_of(MCP_PLUGIN), node_id)


def network_caller(host: PluginHost) -> Callable[[grpc.ServicerContext], Caller]:
    def caller(context: grpc.ServicerContext) -> Caller:
        ceiling = (host.options_of(MCP_PLUGIN) or {}).get("grpc_role", "operator")
        peer = authz.peer_from_context(context)
        if peer is not None:  # mTLS: the certificate says who calls, the mcp plugin's grpc_role caps it
            role = min(authz.CALLER_ROLE_OF.get(peer.role, "reader"), ceiling, key=CALLER_ROLES.index)
            return Caller(role=role, identity=f"grpc:{peer.role}:{peer.name}")  # transport first, as before
        return Caller(role=ceiling, identity=f"grpc:{context.peer()}")
    return caller


def socket_caller(context: grpc.ServicerContext) -> Caller:
    return Caller(role="admin", identity="admin-socket")


def to_json(value: Any) -> bytes:
    return json.dumps(value, default=str).encode()


def tool_infos(host: PluginHost) -> list[ppb.ToolInfo]:
    owners = host.tool_owners()
    return [ppb.ToolInfo(name=t.name, description=t.description, input_schema_json=to_json(t.input_schema),
                         role=t.role, read_only=t.read_only, destructive=t.destructive, idempotent=t.idempotent,
                         toolset=t.toolset, plugin=owners.get(t.name, ""),
                         output_schema_json=to_json(t.output_schema) if t.output_schema else b"",
                         has_plan=t.plan is not None)
            for t in sorted(host.tools().values(), key=lambda t: t.name)]


def run_tool(host: PluginHost, name: str, arguments_json: bytes, caller: Caller,
             plan_only: bool = False) -> ppb.CallToolResponse:
    """Every failure, bad input included, is an answer with an error message, never a crashed call."""
    if len(arguments_json) > MAX_TOOL_ARGUMENT_BYTES:
        return ppb.CallToolResponse(error=f"{name}: arguments are {len(arguments_json)} bytes; the limit is "
                                          f"{MAX_TOOL_ARGUMENT_BYTES}: send less per call")
    try:
        arguments = json.loads(arguments_json) if arguments_json else {}
    except (ValueError, UnicodeDecodeError) as exc:
        return ppb.CallToolResponse(error=f"{name}: arguments are not valid JSON: {exc}")
    try:
        if plan_only:
            return ppb.CallToolResponse(plan=host.plan_tool(name, arguments, caller))
        result = host.call_tool(name, arguments, caller)
    except ToolError as exc:
        return ppb.CallToolResponse(error=str(exc))
    return ppb.CallToolResponse(result_json=to_json(result))


class PluginsService(ppb_grpc.PluginsServicer):
    def __init__(self, host: PluginHost, node_id: str, caller: Callable[[grpc.ServicerContext], Caller],
                 stopping: Callable[[], bool] = lambda: False):
        self.host = host
        self.node_id = node_id
        self.caller = caller
        self.stopping = stopping

    def ListPlugins(self, request, context):
        return ppb.ListPluginsResponse(plugins=[ppb.PluginInfo(**p) for p in self.host.status()], node_id=self.node_id)

    def ListTools(self, request, context):
        policy = policy_of(self.host, self.node_id)
        return ppb.ListToolsResponse(
            tools=tool_infos(self.host), node_id=self.node_id, caller_role=self.caller(context).role,
            generation=self.host.generation,
            policy=ppb.ToolPolicy(default_profile=policy.default_profile, allow_destructive=policy.allow_destructive,
                                  default_toolsets=list(policy.default_toolsets), max_tools=policy.max_tools,
                                  read_only=policy.read_only, confirm_destructive=policy.confirm_destructive))

    def CallTool(self, request, context):
        return run_tool(self.host, request.name, request.arguments_json, self.caller(context), request.plan_only)

    def ListResources(self, request, context):
        return ppb.ListResourcesResponse(resources=[
            ppb.ResourceInfo(uri=r.uri, name=r.name, description=r.description, mime_type=r.mime_type)
            for r in sorted(self.host.resources().values(), key=lambda r: r.uri)])

    def ReadResource(self, request, context):
        resource = self.host.resources().get(request.uri)
        if resource is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no resource {request.uri!r} on node {self.node_id}; "
                                                     "list the resources to see what it offers")
        try:
            content = resource.read()
        except Exception as exc:  # a plugin's bug is the caller's error message, not a dead server thread
            log.error("resource read failed", extra={"fields": {"uri": request.uri, "error": str(exc)}})
            context.abort(grpc.StatusCode.INTERNAL, f"reading {request.uri} failed: {exc}")
        return ppb.ReadResourceResponse(content_json=to_json(content), mime_type=resource.mime_type)

    def SetPluginState(self, request, context):
        caller = self.caller(context)
        if caller.role != "admin":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "starting and stopping plugins needs the admin role: "
                                                             "run it on the node, over its admin socket")
        entry = self.host.plugins.get(request.name)
        if entry is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no plugin {request.name!r} on node {self.node_id}; "
                                                     f"installed: {', '.join(sorted(self.host.plugins))}")
        if entry.plugin is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"plugin {request.name} is {entry.state}{': ' + entry.error if entry.error else ''}; "
                          "enable or fix it in the node's config and restart the agent")
        if request.running:
            if entry.state != "running":
                self.host.start_plugin(request.name)
        else:
            self.host.stop_plugin(request.name)
        log.info("plugin state set", extra={"fields": {"plugin": request.name, "running": request.running,
                                                       "by": caller.identity}})
        info = next(p for p in self.host.status() if p["name"] == request.name)
        return ppb.SetPluginStateResponse(plugin=ppb.PluginInfo(**info))

    def WatchTools(self, request, context):
        known = request.known_generation
        if known != self.host.generation:
            known = self.host.generation
            yield ppb.ToolsChanged(generation=known)
        while context.is_active() and not self.stopping():
            current = self.host.wait_changed(known, WATCH_POLL)
            if current != known:
                known = current
                yield ppb.ToolsChanged(generation=current)

"""The MCP front end: the node's plugin tools and resources served with the `mcp` SDK (lowlevel Server).

Two ways in, one front end:

- `cortex mcp` serves stdio for a local client (`claude mcp add cortex -- cortex mcp`) and reaches the local
  agent over gRPC (`GrpcBackend`: the Plugins service); it is a client of the agent, not a cluster member;
- every agent serves streamable HTTP itself (mcp_http.py), calling its plugin host in-process (`LocalBackend`).

The front end decides what a session sees (toolsets.py: profile, toolsets, the node's policy), turns every
failure into an MCP tool error (`isError`) whose text says what to do next, and tells clients when the tool
list changes (plugins starting or stopping): `notifications/tools/list_changed` on handshake-era sessions and
on `subscriptions/listen` streams for 2026-era clients.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Protocol

import anyio
import anyio.to_thread
import grpc
import mcp.types as types
from mcp.server.lowlevel import NotificationOptions, Server
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import ResourcesListChanged, ToolsListChanged
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from cortex import __version__
from cortex.mcp import templates
from cortex.mcp.toolsets import PROFILES, Policy, Selection, ToolSpec, View, select
from cortex.plugins import MAX_TOOL_ARGUMENT_BYTES, Caller, PluginHost, ToolError, structured
from cortex.plugins.api import ANY_OBJECT

log = logging.getLogger("cortex.mcp")

RESOURCE_NOT_FOUND = -32002  # the MCP spec's code for an unknown resource URI
INVALID_PARAMS = -32602
# What a destructive call asks the user (MCP elicitation, form mode): one yes/no.
CONFIRM_SCHEMA = {"type": "object", "required": ["confirm"], "properties": {
    "confirm": {"type": "boolean", "title": "Go ahead", "description": "true runs it; false changes nothing",
                "default": False}}}
# Resources every client may rely on; while the subsystem behind one is not running, it says so.
PLACEHOLDER_RESOURCES = {
    "cluster://tasks": ("tasks", "Tasks and workflows of the cluster", "the task engine is not enabled on this "
                        "cluster (no plugin serves cluster://tasks); task tools appear once it runs"),
    "cluster://k8s": ("kubernetes", "The Kubernetes cluster Cortex manages", "the kubernetes plugin is not "
                      "enabled on this node; k8s tools appear once it runs"),
}


# What this front end sends: list-changed notifications for tools and resources (Frontend.watch). Every
# transport's `initialize` advertises exactly this; the streamable HTTP manager builds its initialization
# options itself, hence the subclass below instead of an argument to each `run`.
NOTIFICATIONS = NotificationOptions(tools_changed=True, resources_changed=True)


class _Server(Server):
    def create_initialization_options(self, notification_options=None, *args, **kwargs):
        return super().create_initialization_options(notification_options or NOTIFICATIONS, *args, **kwargs)


@dataclass(frozen=True)
class ResourceSpec:
    uri: str
    name: str
    description: str
    mime_type: str = "application/json"


@dataclass(frozen=True)
class Catalog:
    tools: list[ToolSpec]
    policy: Policy
    caller_role: str
    generation: int


class Backend(Protocol):
    node_id: str

    def catalog(self, caller: Caller | None) -> Catalog: ...

    def call(self, name: str, arguments: dict, caller: Caller | None) -> Any:
        """The tool's JSON-able result; raises ToolError with an actionable message."""

    def resources(self) -> list[ResourceSpec]: ...

    def read(self, uri: str) -> tuple[str, str]:
        """(text, mime type); raises KeyError for an unknown URI, ToolError when reading fails."""

    def wait_changed(self, known: int, timeout: float) -> int: ...

    def plan(self, name: str, arguments: dict, caller: Caller | None) -> str:
        """What the call would do (changes nothing); raises ToolError when the call would be refused."""


class LocalBackend:
    """The agent's own plugin host (the HTTP front end runs inside the agent)."""

    def __init__(self, host: PluginHost, node_id: str, policy: Callable[[], Policy]):
        self.host = host
        self.node_id = node_id
        self._policy = policy

    def catalog(self, caller: Caller | None) -> Catalog:
        owners = self.host.tool_owners()
        tools = [ToolSpec(t.name, t.description, t.input_schema, t.role, t.read_only, t.destructive, t.idempotent,
                          t.toolset, owners.get(t.name, ""), t.output_schema) for t in self.host.tools().values()]
        return Catalog(sorted(tools, key=lambda t: t.name), self._policy(), (caller or Caller()).role,
                       self.host.generation)

    def call(self, name: str, arguments: dict, caller: Caller | None) -> Any:
        return self.host.call_tool(name, arguments, caller or Caller())

    def plan(self, name: str, arguments: dict, caller: Caller | None) -> str:
        return self.host.plan_tool(name, arguments, caller or Caller())

    def resources(self) -> list[ResourceSpec]:
        return [ResourceSpec(r.uri, r.name, r.description, r.mime_type) for r in self.host.resources().values()]

    def read(self, uri: str) -> tuple[str, str]:
        resource = self.host.resources()[uri]
        try:
            return json.dumps(resource.read(), default=str, indent=1), resource.mime_type
        except Exception as exc:
            raise ToolError(f"reading {uri} failed: {exc}") from exc

    def wait_changed(self, known: int, timeout: float) -> int:
        return self.host.wait_changed(known, timeout)


class GrpcBackend:
    """The local agent over gRPC: its admin socket (`unix:PATH`, admin role) or its address (network role)."""

    def __init__(self, target: str, timeout: float = 30.0):
        from cortex._proto.cortex.v1 import plugins_pb2 as ppb
        from cortex._proto.cortex.v1 import plugins_pb2_grpc as ppb_grpc
        from cortex.client import open_channel

        self._pb = ppb
        self.target = target
        self.timeout = timeout
        self._channel = open_channel(target)
        self._stub = ppb_grpc.PluginsStub(self._channel)
        self.node_id = ""
        self._plans_supported = False  # known with the first catalog (ListTools)
        self._generation = 0
        self._changed = threading.Condition()
        self._closed = threading.Event()
        threading.Thread(target=self._watch, name="mcp-watch", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self._channel.close()

    def _unreachable(self, exc: grpc.RpcError) -> ToolError:
        """The failure in words of its cause: nothing listening, no client certificate, a web port, no quorum."""
        from cortex.client import find_credentials, unreachable_hint

        details = exc.details() or exc.code().name
        plaintext = not self.target.startswith("unix:") and find_credentials(self.target) is None
        hint = unreachable_hint(self.target, exc.code().name, details, plaintext)
        if plaintext and not hint:  # the details already name the missing certificate
            hint = "set CORTEX_TLS_DIR to a server's <data_dir>/tls, or use the node's admin socket (--via socket)"
        if not hint:
            hint = "is `cortex agent` running there? (cortex mcp --socket PATH or --addr HOST:PORT)"
        if plaintext:
            return ToolError(f"cannot call the Cortex agent at {self.target}: {details}; {hint}")
        return ToolError(f"cannot reach the Cortex agent at {self.target}: {details}; {hint}")

    def catalog(self, caller: Caller | None, timeout: float | None = None) -> Catalog:
        try:
            r = self._stub.ListTools(self._pb.ListToolsRequest(), timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise self._unreachable(exc) from None
        self.node_id = r.node_id
        tools = [ToolSpec(t.name, t.description, json.loads(t.input_schema_json or b"{}"), t.role, t.read_only,
                          t.destructive, t.idempotent, t.toolset, t.plugin,
                          json.loads(t.output_schema_json) if t.output_schema_json else None) for t in r.tools]
        p = r.policy
        # An agent older than plan_only would run the call when asked for its plan: such an agent leaves
        # confirm_destructive empty, and its plans are then made here from the arguments alone.
        self._plans_supported = bool(p.confirm_destructive)
        policy = Policy(p.default_profile or "read-only", p.allow_destructive, tuple(p.default_toolsets),
                        p.max_tools or 40, r.node_id, p.read_only, p.confirm_destructive or "elicit")
        return Catalog(tools, policy, r.caller_role or "reader", r.generation)

    def call(self, name: str, arguments: dict, caller: Caller | None) -> Any:
        request = self._pb.CallToolRequest(name=name, arguments_json=json.dumps(arguments).encode())
        try:
            r = self._stub.CallTool(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self._unreachable(exc) from None
        if r.error:
            raise ToolError(r.error)
        return json.loads(r.result_json) if r.result_json else None

    def plan(self, name: str, arguments: dict, caller: Caller | None) -> str:
        if not self._plans_supported:
            shown = ", ".join(f"{k}={v!r}" for k, v in sorted(arguments.items()) if k != "idempotency_key")
            return f"run {name}({shown}) on the node (its agent is too old to say more)"
        request = self._pb.CallToolRequest(name=name, arguments_json=json.dumps(arguments).encode(), plan_only=True)
        try:
            r = self._stub.CallTool(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self._unreachable(exc) from None
        if r.error:
            raise ToolError(r.error)
        return r.plan

    def resources(self) -> list[ResourceSpec]:
        try:
            r = self._stub.ListResources(self._pb.ListResourcesRequest(), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self._unreachable(exc) from None
        return [ResourceSpec(x.uri, x.name, x.description, x.mime_type) for x in r.resources]

    def read(self, uri: str) -> tuple[str, str]:
        try:
            r = self._stub.ReadResource(self._pb.ReadResourceRequest(uri=uri), timeout=self.timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise KeyError(uri) from None
            raise ToolError(exc.details() or exc.code().name) from None
        return json.dumps(json.loads(r.content_json), indent=1), r.mime_type or "application/json"

    def _watch(self) -> None:
        """Follow WatchTools for as long as we run, reconnecting after the agent restarts."""
        while not self._closed.is_set():
            try:
                for change in self._stub.WatchTools(self._pb.WatchToolsRequest(known_generation=self._generation)):
                    with self._changed:
                        self._generation = change.generation
                        self._changed.notify_all()
            except grpc.RpcError:
                if self._closed.wait(1.0):
                    return

    def wait_changed(self, known: int, timeout: float) -> int:
        with self._changed:
            self._changed.wait_for(lambda: self._generation != known, timeout)
            return self._generation


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str, indent=1)


def tool_error(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)], is_error=True)


class Frontend:
    """One MCP server over a backend. `view_of(request)` says what an HTTP request asked for (None: stdio)."""

    def __init__(self, backend: Backend, default_view: View, view_of: Callable[[Any], View] | None = None,
                 read_only: bool = False):
        self.backend = backend
        self.read_only = read_only  # `cortex mcp --read-only`: on top of whatever the node allows
        self.default_view = default_view
        self.view_of = view_of
        self.bus = InMemorySubscriptionBus()
        self._connections: weakref.WeakSet = weakref.WeakSet()
        self._catalog: Catalog | None = None
        self._catalog_lock = threading.Lock()
        self.server = _Server(
            "cortex", version=__version__, title="Cortex cluster",
            instructions=("Tools of a Cortex cluster (nodes, leadership, key-value store, alerts, messages, skills, "
                          "and whatever plugins the node runs). Calls run on the node you are connected to; "
                          "changes are forwarded to the cluster's leader. A tool you do not see may be outside "
                          "this session's profile or toolsets: a failed call says how to enable it."),
            on_list_tools=self._list_tools, on_call_tool=self._call_tool, on_list_resources=self._list_resources,
            on_read_resource=self._read_resource, on_list_resource_templates=self._list_templates,
            on_subscriptions_listen=ListenHandler(self.bus))
        self.server.middleware.append(self._remember_connection)
        # The streamable HTTP transport asks for the initialize answer without arguments, which would
        # advertise listChanged: false although we send list-changed notifications on HTTP too.
        default_options = self.server.create_initialization_options
        self.server.create_initialization_options = (
            lambda notification_options=None, *args, **kwargs: default_options(
                notification_options or NotificationOptions(tools_changed=True, resources_changed=True),
                *args, **kwargs))

    def initialization_options(self):
        return self.server.create_initialization_options(NOTIFICATIONS)

    # --- what a session sees ---------------------------------------------------------------------------
    def _view(self, ctx) -> View:
        if self.view_of is not None and ctx.request is not None:
            return self.view_of(ctx.request)
        return self.default_view

    def _caller(self, view: View) -> Caller:
        return Caller(role=view.caller_role, identity=view.caller_identity)

    async def _catalog_for(self, view: View) -> Catalog:
        if isinstance(self.backend, LocalBackend):  # cheap in-process, and the caller shapes it
            return await anyio.to_thread.run_sync(self.backend.catalog, self._caller(view))
        with self._catalog_lock:
            cached = self._catalog
        if cached is None:
            cached = await anyio.to_thread.run_sync(self.backend.catalog, None)
            with self._catalog_lock:
                self._catalog = cached
        return cached

    async def _selection(self, view: View) -> tuple[Catalog, Selection]:
        catalog = await self._catalog_for(view)
        if not isinstance(self.backend, LocalBackend):
            view = View(caller_role=catalog.caller_role, profile=view.profile, toolsets=view.toolsets)
        policy = replace(catalog.policy, read_only=True) if self.read_only else catalog.policy
        return catalog, select(catalog.tools, view, policy)

    async def _remember_connection(self, ctx, call_next):
        # ctx.session is a per-request proxy; the connection behind it lives as long as the client's session
        # and carries notifications outside any request. The SDK (2.3) exposes it only as `_connection`.
        connection = getattr(ctx.session, "_connection", None)
        if connection is not None:
            self._connections.add(connection)
        return await call_next(ctx)

    # --- handlers --------------------------------------------------------------------------------------
    async def _list_tools(self, ctx, params) -> types.ListToolsResult:
        try:
            _, selection = await self._selection(self._view(ctx))
        except (ToolError, ValueError) as exc:
            raise MCPError(INVALID_PARAMS, str(exc)) from None
        return types.ListToolsResult(meta={"cortex/notice": selection.notice} if selection.notice else None, tools=[
            types.Tool(name=t.name, description=t.description, input_schema=t.input_schema,
                       output_schema=t.output_schema or ANY_OBJECT,
                       annotations=types.ToolAnnotations(title=t.name.replace("_", " "), read_only_hint=t.read_only,
                                                         destructive_hint=t.destructive,
                                                         idempotent_hint=t.idempotent, open_world_hint=False),
                       meta={"cortex/toolset": t.toolset, "cortex/plugin": t.plugin, "cortex/role": t.role})
            for t in selection.visible])

    async def _call_tool(self, ctx, params: types.CallToolRequestParams) -> types.CallToolResult:
        name, arguments = params.name, params.arguments or {}
        try:
            size = len(json.dumps(arguments))
        except (TypeError, ValueError):
            return tool_error(f"{name}: arguments must be a JSON object")
        if size > MAX_TOOL_ARGUMENT_BYTES:
            return tool_error(f"{name}: arguments are {size} bytes; the limit is {MAX_TOOL_ARGUMENT_BYTES}: "
                              "send less per call")
        view = self._view(ctx)
        try:
            catalog, selection = await self._selection(view)
        except (ToolError, ValueError) as exc:
            return tool_error(str(exc))
        if name not in {t.name for t in selection.visible}:
            if name in selection.hidden:
                return tool_error(f"{name} is not available in this session: {selection.hidden[name]}")
            return tool_error(f"unknown tool {name!r}: list the tools to see what node "
                              f"{catalog.policy.node_id or self.backend.node_id} offers")
        tool = next(t for t in selection.visible if t.name == name)
        if tool.destructive:
            refused = await self._confirm(ctx, tool, arguments, view, catalog.policy)
            if refused:
                return tool_error(refused)
        started = time.monotonic()
        try:
            # A client that disconnects mid-call cancels this wait; the call itself finishes in its thread
            # and its result is dropped: nothing is left half-done on our side.
            result = await anyio.to_thread.run_sync(partial(self.backend.call, name, arguments, self._caller(view)),
                                                    abandon_on_cancel=True)
        except ToolError as exc:
            return tool_error(str(exc))
        except Exception as exc:  # a bug of ours must not end the session either
            log.exception("tool call failed", extra={"fields": {"tool": name}})
            return tool_error(f"{name} failed unexpectedly: {type(exc).__name__}: {exc}")
        log.debug("tool call", extra={"fields": {"tool": name, "seconds": round(time.monotonic() - started, 4)}})
        return types.CallToolResult(content=[types.TextContent(type="text", text=_text(result))],
                                    structured_content=structured(result))

    async def _confirm(self, ctx, tool: ToolSpec, arguments: dict, view: View, policy: Policy) -> str:
        """Plan, then confirm: a destructive call runs only once the user saw what it will do and said yes.
        '' lets the call go ahead; otherwise the refusal, which says that nothing was changed."""
        session = getattr(ctx, "session", None)
        capabilities = getattr(session, "client_capabilities", None)
        elicitation = getattr(capabilities, "elicitation", None)
        can_ask = (elicitation is not None and (elicitation.form is not None or elicitation.url is None)
                   and getattr(session, "can_send_request", False))
        if not can_ask:
            if policy.confirm_destructive == "require":
                return (f"{tool.name} is destructive and {policy.node_id or 'this node'} confirms destructive calls "
                        "with the user (plugins.mcp.confirm_destructive: require), which this client cannot do "
                        "(no elicitation support): nothing was changed; run it from a client that supports "
                        "elicitation, or with `cortex tools call`")
            return ""  # the node's allow_destructive and the admin profile already let this session see it
        try:
            plan = await anyio.to_thread.run_sync(partial(self.backend.plan, tool.name, arguments, self._caller(view)))
        except ToolError as exc:
            return str(exc)
        try:
            answer = await session.elicit_form(
                message=f"Confirm {tool.name}: this will {plan}", requested_schema=CONFIRM_SCHEMA,
                related_request_id=getattr(ctx, "request_id", None))
        except Exception as exc:  # the client went away or answered nonsense: do nothing rather than guess
            log.info("confirmation not obtained", extra={"fields": {"tool": tool.name, "error": str(exc)}})
            return f"{tool.name} was not confirmed ({type(exc).__name__}: {exc}): nothing was changed"
        if answer.action == "accept" and (answer.content or {}).get("confirm") is True:
            return ""
        how = {"decline": "declined", "cancel": "cancelled"}.get(answer.action, "not confirmed")
        return f"{tool.name} was {how} by the user: nothing was changed (it would {plan})"

    async def _all_resources(self) -> list[ResourceSpec]:
        try:
            found = await anyio.to_thread.run_sync(self.backend.resources)
        except ToolError as exc:
            raise MCPError(INVALID_PARAMS, str(exc)) from None
        uris = {r.uri for r in found}
        found += [ResourceSpec(uri, name, description) for uri, (name, description, _) in PLACEHOLDER_RESOURCES.items()
                  if uri not in uris]
        return sorted(found, key=lambda r: r.uri)

    async def _list_resources(self, ctx, params) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=[
            types.Resource(uri=r.uri, name=r.name, description=r.description, mime_type=r.mime_type)
            for r in await self._all_resources()])

    async def _read_resource(self, ctx, params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        uri = str(params.uri)
        try:
            text, mime = await anyio.to_thread.run_sync(self.backend.read, uri)
        except KeyError:
            found = templates.match(uri)
            if found is not None:
                text, mime = await self._read_templated(ctx, uri, *found), "application/json"
            elif uri in PLACEHOLDER_RESOURCES:
                text, mime = json.dumps({"enabled": False, "items": [],
                                         "message": PLACEHOLDER_RESOURCES[uri][2]}, indent=1), "application/json"
            else:
                known = ", ".join(r.uri for r in await self._all_resources())
                shapes = ", ".join(t.uri_template for t in templates.TEMPLATES)
                raise MCPError(RESOURCE_NOT_FOUND, f"no resource {uri!r}; known: {known}; "
                                                   f"templates: {shapes}") from None
        except ToolError as exc:
            raise MCPError(INVALID_PARAMS, str(exc)) from None
        return types.ReadResourceResult(contents=[types.TextResourceContents(uri=uri, mime_type=mime, text=text)])

    async def _read_templated(self, ctx, uri: str, template: templates.Template, arguments: dict) -> str:
        """A templated resource is its tool's answer; a tool this node does not serve is an unknown resource."""
        catalog = await self._catalog_for(self._view(ctx))
        if template.tool not in {t.name for t in catalog.tools}:
            raise MCPError(RESOURCE_NOT_FOUND, f"no resource {uri!r}: {template.tool} is not served on node "
                                               f"{catalog.policy.node_id or self.backend.node_id}")
        caller = self._caller(self._view(ctx))  # over gRPC the agent decides who calls; in process, the token
        try:
            result = await anyio.to_thread.run_sync(partial(self.backend.call, template.tool, arguments, caller),
                                                    abandon_on_cancel=True)
        except ToolError as exc:
            code = RESOURCE_NOT_FOUND if str(exc).startswith("no ") else INVALID_PARAMS
            raise MCPError(code, f"{uri}: {exc}") from None
        return json.dumps(result, default=str, indent=1)

    async def _list_templates(self, ctx, params) -> types.ListResourceTemplatesResult:
        try:
            catalog = await self._catalog_for(self._view(ctx))
        except ToolError as exc:
            raise MCPError(INVALID_PARAMS, str(exc)) from None
        return types.ListResourceTemplatesResult(resource_templates=[
            types.ResourceTemplate(uri_template=t.uri_template, name=t.name, description=t.description,
                                   mime_type="application/json")
            for t in templates.offered({x.name for x in catalog.tools})])

    # --- list-changed ------------------------------------------------------------------------------------
    async def watch(self) -> None:
        """Tell clients when the tool list changes; runs for the server's lifetime."""
        # abandoned on cancel like the waits below: a client that closes stdin at once must not wait for it
        known = await anyio.to_thread.run_sync(partial(self.backend.wait_changed, 0, 2.0), abandon_on_cancel=True)
        while True:
            current = await anyio.to_thread.run_sync(partial(self.backend.wait_changed, known, 5.0),
                                                     abandon_on_cancel=True)
            if current == known:
                continue
            known = current
            with self._catalog_lock:
                self._catalog = None
            await self.bus.publish(ToolsListChanged())
            await self.bus.publish(ResourcesListChanged())
            for connection in list(self._connections):
                if connection.protocol_version in MODERN_PROTOCOL_VERSIONS:
                    continue  # 2026-era clients hear it on their subscriptions/listen stream (the bus above)
                try:
                    await connection.send_tool_list_changed()
                    await connection.send_resource_list_changed()
                except Exception as exc:  # a client that went away; the others still hear about it
                    log.debug("list-changed not delivered", extra={"fields": {"error": str(exc)}})
                    self._connections.discard(connection)


async def serve_stdio(frontend: Frontend) -> None:
    from mcp.server.stdio import stdio_server

    async with stdio_server() as (read_stream, write_stream), anyio.create_task_group() as tasks:
        tasks.start_soon(frontend.watch)
        await frontend.server.run(read_stream, write_stream, frontend.initialization_options())
        tasks.cancel_scope.cancel()


def parse_view(profile: str, toolsets: str, caller_role: str = "operator") -> View:
    if profile and profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; use one of {', '.join(PROFILES)}")
    names = tuple(t.strip() for t in toolsets.split(",") if t.strip()) if toolsets else ()
    return View(caller_role=caller_role, profile=profile, toolsets=names)

"""MCP over streamable HTTP, served by every agent: the built-in `mcp` plugin.

Its options (`plugins: {mcp: {...}}` in the node's YAML) are also the node's MCP policy: the default profile,
whether destructive tools are offered at all, the default toolsets and the tool limit (toolsets.py), and the
role of callers of the Plugins gRPC service on the network port.

Authentication is pluggable (`Authenticator`): today a bearer token, generated into the plugin's data
directory (`<data_dir>/plugins/mcp/token`, mode 0600) unless `token_file` names one; a certificate
authenticator can stand beside it. A session picks its profile and toolsets with
query parameters: `http://HOST:PORT/mcp?profile=operator&toolsets=cluster,kv`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import secrets
import select
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cortex.mcp.toolsets import PROFILES, Policy, View
from cortex.plugins import CALLER_ROLES, Caller, Plugin

if TYPE_CHECKING:
    from cortex.mcp.server import Frontend

# The MCP SDK, uvicorn and starlette are imported when the first HTTP client connects, not when the plugin is
# discovered or started: a node nobody talks to over MCP does not pay their memory (about 30 MB).

DEFAULT_PORT_OFFSET = 80  # "auto": the gRPC port + 80 on the gRPC host (7400 -> 7480)
MAX_BODY_BYTES = 2 * 1024 * 1024  # a little above the tool-argument limit, so that limit answers first
# A larger body is still read to its end (a client mid-upload that sees its connection close reports a
# transport failure, not the answer) up to this much; beyond it the connection gets HTTP 413.
MAX_DRAIN_BYTES = 64 * 1024 * 1024
# Longer than any client's idle keep-alive (undici 4 s, httpx 5 s): the client, not the server, retires an idle
# connection, so a request sent on it just as the server would close it (an agent paused or busy for a few
# seconds) is never lost as "fetch failed".
KEEP_ALIVE_SECONDS = 120
_ID_FIRST = re.compile(rb'^\s*\{\s*"jsonrpc"\s*:\s*"2\.0"\s*,\s*"id"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)')
_ID_LAST = re.compile(rb'"id"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)\s*\}\s*$')
_METHOD = re.compile(rb'"method"\s*:\s*"([^"\\]{1,100})"')
_NAME = re.compile(rb'"name"\s*:\s*"([^"\\]{1,200})"')


class Authenticator(Protocol):
    def authenticate(self, headers: dict[str, str]) -> Caller | None:
        """The caller these request headers prove, or None."""


class BearerTokens:
    """Static bearer tokens, each with the caller it stands for; compared in constant time."""

    def __init__(self, tokens: dict[str, Caller]):
        self._tokens = list(tokens.items())

    def authenticate(self, headers: dict[str, str]) -> Caller | None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        found = None
        for known, caller in self._tokens:
            if hmac.compare_digest(known.encode(), token.strip().encode()):
                found = caller
        return found


METADATA_PATH = "/.well-known/oauth-protected-resource"  # RFC 9728, section 3


def _origin(scope, headers: dict[str, str], fallback: str) -> str:
    """The scheme and authority the client used (its Host header), so the URLs we hand out work for it."""
    host = headers.get("host", "")
    if not host or any(c in host for c in " /\\\"<>"):
        return fallback
    return f"{scope.get('scheme', 'http')}://{host}"


def resource_metadata(origin: str, node_id: str, authorization_servers: list[str]) -> dict:
    """OAuth 2.0 Protected Resource Metadata (RFC 9728) of the node's MCP endpoint. Tokens are sent in the
    Authorization header only; the static bearer token needs no authorization server."""
    doc = {"resource": f"{origin}/mcp", "bearer_methods_supported": ["header"],
           "resource_name": f"Cortex MCP on node {node_id}" if node_id else "Cortex MCP",
           "resource_documentation": "https://cortex.invalid/docs/operations/mcp.md"}
    if authorization_servers:
        doc["authorization_servers"] = list(authorization_servers)
    return doc


class RequireCaller:
    """ASGI middleware: refuse HTTP requests no authenticator accepts; hand the caller to the MCP handlers.

    It also answers the RFC 9728 metadata document, unauthenticated (a client reads it to learn how to get a
    token), and every 401 points at it in `WWW-Authenticate: Bearer resource_metadata="..."`."""

    def __init__(self, app, authenticators: list[Authenticator], node_id: str = "",
                 authorization_servers: list[str] | None = None, fallback_origin: str = "http://127.0.0.1"):
        self.app = app
        self.authenticators = authenticators
        self.node_id = node_id
        self.authorization_servers = authorization_servers or []
        self.fallback_origin = fallback_origin

    async def _json(self, send, status: int, doc: dict, extra: list | None = None) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), *(extra or [])]})
        await send({"type": "http.response.body", "body": json.dumps(doc).encode()})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = _origin(scope, headers, self.fallback_origin)
        if scope.get("path", "") in (METADATA_PATH, METADATA_PATH + "/mcp"):
            if scope.get("method") not in ("GET", "HEAD"):
                return await self._json(send, 405, {"error": "GET only"}, [(b"allow", b"GET")])
            return await self._json(send, 200, resource_metadata(origin, self.node_id, self.authorization_servers),
                                    [(b"cache-control", b"max-age=300")])
        caller = next((c for a in self.authenticators if (c := a.authenticate(headers)) is not None), None)
        if caller is None:
            given = bool(headers.get("authorization"))
            challenge = f'Bearer realm="cortex", resource_metadata="{origin}{METADATA_PATH}/mcp"'
            if given:
                challenge += ', error="invalid_token"'
            doc = {"error": ("unauthorized: that bearer token is not valid here" if given else "unauthorized") +
                   "; send Authorization: Bearer TOKEN; the token is in the node's <data_dir>/plugins/mcp/token "
                   "(or plugins.mcp.token_file)"}
            return await self._json(send, 401, doc, [(b"www-authenticate", challenge.encode("latin-1"))])
        scope["cortex.caller"] = caller
        return await self.app(scope, receive, send)


class OversizeAsError:
    """ASGI middleware: a request body over the limit is answered in JSON-RPC, as stdio answers it.

    The SDK answers such a body with a bare HTTP 413, which a client reports as a transport failure (its
    session looks dead). Here the body is read to its end, keeping only its first and last 4 KiB, where the
    request's id, method and tool name are (Python clients put the id first, TypeScript ones last); a
    `tools/call` then gets a tool error (`isError`) and any other method a JSON-RPC error, both with HTTP 200.
    """

    def __init__(self, app, limit: int = MAX_BODY_BYTES, drain: int = MAX_DRAIN_BYTES):
        self.app = app
        self.limit = limit
        self.drain = drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.drain:
            return await _respond(send, 413, {"error": f"request body over {self.drain} bytes"})
        kept: list[bytes] = []
        size, head, tail = 0, b"", b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body = message.get("body", b"")
            size += len(body)
            if size <= self.limit:
                kept.append(body)
            else:
                if not head:
                    head = (b"".join(kept) + body)[:4096]
                    kept = []
                tail = (tail + body)[-4096:]
                if size > self.drain:
                    return await _respond(send, 413, {"error": f"request body over {self.drain} bytes"})
            if not message.get("more_body", False):
                break
        if size > self.limit:
            return await _respond(send, 200, oversize_answer(head, tail, size, self.limit))
        whole, replayed = b"".join(kept), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": whole, "more_body": False}

        return await self.app(scope, replay, send)


def oversize_answer(head: bytes, tail: bytes, size: int, limit: int) -> dict:
    """The JSON-RPC answer to a request of `size` bytes, from the first and last bytes of its body."""
    from cortex.plugins import MAX_TOOL_ARGUMENT_BYTES

    found = _ID_FIRST.search(head) or _ID_LAST.search(tail)
    request_id = json.loads(found.group(1)) if found else None
    method = _METHOD.search(head)
    if method is not None and method.group(1) == b"tools/call":
        name = _NAME.search(head)
        tool = name.group(1).decode("utf-8", "replace") if name else "the tool"
        text = (f"{tool}: the request is {size} bytes; tool arguments may be at most {MAX_TOOL_ARGUMENT_BYTES} "
                "bytes: send less per call")
        return {"jsonrpc": "2.0", "id": request_id,
                "result": {"content": [{"type": "text", "text": text}], "isError": True}}
    return {"jsonrpc": "2.0", "id": request_id,
            "error": {"code": -32600, "message": f"the request is {size} bytes; the limit is {limit}"}}


async def _respond(send, status: int, document: dict) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(document).encode()})


def view_of(request) -> View:
    caller: Caller = request.scope.get("cortex.caller") or Caller(role="reader")
    toolsets = tuple(t.strip() for t in request.query_params.get("toolsets", "").split(",") if t.strip())
    return View(caller_role=caller.role, profile=request.query_params.get("profile", ""), toolsets=toolsets,
                caller_identity=caller.identity)


class HttpServer:
    """MCP over HTTP on a port bound at start, served by uvicorn in a thread of its own.

    The port is bound at once (a port in use fails the plugin's start), but the SDK, starlette and uvicorn
    are loaded only when the first client connects: they cost an agent about 30 MB, which a node nobody
    talks to over MCP should not pay. The front end's list-changed watcher runs on the same event loop.
    """

    def __init__(self, make_frontend: Callable[[], Frontend], authenticators: list[Authenticator], host: str,
                 port: int, node_id: str = "", authorization_servers: list[str] | None = None):
        self.node_id = node_id
        self.authorization_servers = authorization_servers or []
        self.make_frontend = make_frontend
        self.authenticators = authenticators
        self.host = host
        self.port = port
        self.server = None  # uvicorn.Server, once a client came
        self.error: BaseException | None = None
        self._socket: socket.socket | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mcp-http", daemon=True)

    def start(self) -> str:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            self._socket = socket.create_server((self.host, self.port), family=family, backlog=128)
        except OSError as exc:
            raise RuntimeError(f"cannot serve MCP over HTTP on {self.host}:{self.port}: {exc}; set "
                               "plugins.mcp.listen to a free HOST:PORT (or off)") from None
        self.port = self._socket.getsockname()[1]
        self._thread.start()
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/mcp"

    def _build(self):
        import uvicorn
        from mcp.server.transport_security import TransportSecuritySettings

        frontend = self.make_frontend()
        loopback = self.host in ("127.0.0.1", "localhost", "::1")
        security = TransportSecuritySettings(
            enable_dns_rebinding_protection=loopback,
            allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*"],
            allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"])
        app = frontend.server.streamable_http_app(streamable_http_path="/mcp", host=self.host,
                                                  transport_security=security, max_request_body_size=MAX_BODY_BYTES)
        bound = f"[{self.host}]" if ":" in self.host else self.host
        guarded = RequireCaller(OversizeAsError(app), self.authenticators, self.node_id, self.authorization_servers,
                                f"http://{bound}:{self.port}")
        config = uvicorn.Config(guarded, log_level="warning", lifespan="on", access_log=False,
                                timeout_keep_alive=KEEP_ALIVE_SECONDS)
        return frontend, uvicorn.Server(config)

    def _run(self) -> None:
        # Wait for the first connection (or stop) before loading anything.
        while not self._stop.is_set():
            if select.select([self._socket], [], [], 0.5)[0]:
                break
        if self._stop.is_set():
            return
        try:
            frontend, self.server = self._build()
            asyncio.run(self._main(frontend))
        except BaseException as exc:  # logged by the plugin; the agent carries on without HTTP MCP
            self.error = exc

    async def _main(self, frontend) -> None:
        import anyio

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(frontend.watch)
            await self.server.serve(sockets=[self._socket])
            tasks.cancel_scope.cancel()

    def stop(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._socket is not None:
            self._socket.close()


def _auto_listen(grpc_address: str) -> tuple[str, int]:
    host, _, port = grpc_address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    return ("127.0.0.1" if host in ("0.0.0.0", "") else host), int(port) + DEFAULT_PORT_OFFSET


def _split_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def read_or_create_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


class McpPlugin(Plugin):
    """Serves MCP over HTTP on this node and holds the node's MCP policy."""

    name = "mcp"
    options_schema: dict[str, Any] = {
        "type": "object", "additionalProperties": False,
        "properties": {
            "listen": {"type": "string", "default": "auto",
                       "description": "HOST:PORT for MCP over HTTP; auto: the gRPC host, its port + 80; off: none",
                       "pattern": r"^(auto|off|.+:[0-9]{1,5})$"},
            "token_file": {"type": "string", "default": "",
                           "description": "bearer token file; empty: generated in the plugin's data dir"},
            "http_role": {"enum": list(CALLER_ROLES), "default": "operator",
                          "description": "role of callers holding the bearer token"},
            "grpc_role": {"enum": list(CALLER_ROLES), "default": "operator",
                          "description": "role of Plugins gRPC callers on the network port (admin socket: admin)"},
            "default_profile": {"enum": list(PROFILES), "default": "read-only"},
            "allow_destructive": {"type": "boolean", "default": False,
                                  "description": "offer destructive tools (remove_node, kv_delete, ...) at all"},
            "toolsets": {"type": "array", "items": {"type": "string"}, "default": [],
                         "description": "toolsets a session loads by default; empty: as many as fit max_tools"},
            "max_tools": {"type": "integer", "minimum": 1, "maximum": 500, "default": 40},
            "read_only": {"type": "boolean", "default": False,
                          "description": "serve read-only tools only: every other tool is hidden and refused"},
            "confirm_destructive": {"enum": ["elicit", "require"], "default": "elicit",
                                    "description": "elicit: destructive calls ask the user to confirm where the "
                                                   "client can (MCP elicitation); require: refuse them elsewhere"},
            "authorization_servers": {"type": "array", "items": {"type": "string", "pattern": "^https?://"},
                                      "default": [], "description": "OAuth authorization servers named in the "
                                      "RFC 9728 metadata (/.well-known/oauth-protected-resource)"},
        },
    }

    def init(self) -> None:
        self.http: HttpServer | None = None
        self.url = ""

    def start(self) -> None:
        options = self.ctx.options
        if options["listen"] == "off" or self.ctx.host is None:
            return
        grpc_address = getattr(self.ctx.cluster, "grpc_address", "127.0.0.1:0")
        host, port = (_auto_listen(grpc_address) if options["listen"] == "auto" else _split_listen(options["listen"]))
        if options["listen"] == "auto" and grpc_address.endswith(":0"):
            port = 0
        token_path = Path(options["token_file"]) if options["token_file"] else self.ctx.data_dir / "token"
        token = read_or_create_token(token_path)
        node_id = getattr(self.ctx.cluster, "node_id", "")
        host_plugins = self.ctx.host

        def make_frontend():
            from cortex.mcp.server import Frontend, LocalBackend

            backend = LocalBackend(host_plugins, node_id,
                                   lambda: Policy.from_options(host_plugins.options_of(self.name), node_id))
            return Frontend(backend, View(caller_role=options["http_role"]), view_of=view_of)

        auth = BearerTokens({token: Caller(role=options["http_role"], identity="mcp-http-token")})
        self.http = HttpServer(make_frontend, [auth], host, port, node_id, options["authorization_servers"])
        self.url = self.http.start()
        info = {"url": self.url, "token_file": str(token_path), "node_id": node_id}
        (self.ctx.data_dir / "mcp.json").write_text(json.dumps(info, indent=2) + "\n")
        self.ctx.log.info("MCP over HTTP", extra={"fields": info})

    def stop(self) -> None:
        if getattr(self, "http", None) is not None:
            self.http.stop()
            self.http = None

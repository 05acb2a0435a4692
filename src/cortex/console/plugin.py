"""The `console` plugin: the web console on every agent, and the tool that opens it (`console_login`).

Options (`plugins: {console: {...}}` in the node's YAML): where it listens (default: loopback, the gRPC port
+ 100), the role of the node's MCP bearer token when it is pasted into the login form, how long login links
and sessions last, and how often open pages refresh. The bearer token is the MCP plugin's own (same file,
same comparison: cortex.mcp.http), so a node has one secret for both front ends.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cortex.console.auth import SESSION_ROLES, Logins, cap_role
from cortex.mcp.http import BearerTokens, read_or_create_token
from cortex.plugins import Caller, Plugin, Tool, ToolError
from cortex.plugins.api import returns

DEFAULT_PORT_OFFSET = 100  # "auto": 127.0.0.1, the gRPC port + 100 (7400 -> 7500); MCP is at + 80
STATIC_DIR = Path(__file__).parent / "static"


def listen_address(listen: str, grpc_address: str) -> tuple[str, int]:
    """HOST, PORT for the `listen` option; auto is loopback only, whatever address gRPC is bound to."""
    if listen == "auto":
        port = int(grpc_address.rpartition(":")[2] or 0)
        return "127.0.0.1", (port + DEFAULT_PORT_OFFSET if port else 0)
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class ConsolePlugin(Plugin):
    """Serves the web console on this node."""

    name = "console"
    description = "the web console: the cluster at a glance in a browser"
    options_schema: dict[str, Any] = {
        "type": "object", "additionalProperties": False,
        "properties": {
            "listen": {"type": "string", "default": "auto", "pattern": r"^(auto|off|.+:[0-9]{1,5})$",
                       "description": "HOST:PORT of the web console; auto: 127.0.0.1, the gRPC port + 100; off: none"},
            "token_role": {"enum": list(SESSION_ROLES), "default": "reader",
                           "description": "role of a console session opened with the node's MCP bearer token"},
            "login_ttl_seconds": {"type": "number", "minimum": 10, "maximum": 3600, "default": 120,
                                  "description": "how long a `cortex console url` link can be used (once)"},
            "session_ttl_seconds": {"type": "number", "minimum": 60, "maximum": 30 * 86400, "default": 12 * 3600,
                                    "description": "how long a browser stays signed in"},
            "refresh_seconds": {"type": "number", "minimum": 0.5, "maximum": 60, "default": 2,
                                "description": "open pages redraw at least this often (and on cluster events)"},
            "public_url": {"type": "string", "default": "",
                           "description": "the URL browsers use when it is not the listen address (a proxy)"},
        },
    }

    def init(self) -> None:
        options = self.ctx.options
        self.logins = Logins(options["login_ttl_seconds"], options["session_ttl_seconds"])
        self.url = ""
        self.server = None  # server.Server once a browser came
        self.error = ""
        self._socket: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsubscribe: list = []

    def start(self) -> None:
        options = self.ctx.options
        # `cortex plugins stop|start console` starts this same instance again: begin from a clean slate
        self.url, self.error, self.server, self._unsubscribe = "", "", None, []
        self._stop = threading.Event()
        if options["listen"] == "off" or self.ctx.host is None:
            return
        grpc_address = getattr(self.ctx.cluster, "grpc_address", "127.0.0.1:0")
        host, port = listen_address(options["listen"], grpc_address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._socket = socket.create_server((host, port), family=family, backlog=128)
        except OSError as exc:
            if options["listen"] != "auto":
                raise RuntimeError(f"cannot serve the console on {host}:{port}: {exc}; set plugins.console.listen "
                                   "to a free HOST:PORT (or off)") from None
            # auto promised no particular port: take a free one (`cortex console url` prints where)
            self.ctx.log.warning("console port in use; serving on another", extra={"fields": {
                "port": port, "error": str(exc)}})
            self._socket = socket.create_server((host, 0), family=family, backlog=128)
        port = self._socket.getsockname()[1]
        shown = f"[{host}]" if ":" in host else ("127.0.0.1" if host in ("0.0.0.0", "") else host)
        self.url = (options["public_url"] or f"http://{shown}:{port}").rstrip("/") + "/"
        self._thread = threading.Thread(target=self._serve, name="console-wait", daemon=True)
        self._thread.start()
        info = {"url": self.url, "node_id": getattr(self.ctx.cluster, "node_id", "")}
        (self.ctx.data_dir / "console.json").write_text(json.dumps(info, indent=2) + "\n")
        self.ctx.log.info("web console", extra={"fields": info})

    def _token_path(self) -> Path:
        mcp = self.ctx.host.options_of("mcp") if self.ctx.host is not None else None
        if mcp and mcp.get("token_file"):
            return Path(mcp["token_file"])
        return self.ctx.data_dir.parent / "mcp" / "token"

    def _serve(self) -> None:
        # The HTTP server and its handlers are loaded when the first browser connects, not at the agent's start.
        sock, stop = self._socket, self._stop
        while not stop.is_set():
            if select.select([sock], [], [], 0.5)[0]:
                break
        if stop.is_set():
            return
        try:
            from cortex.console.server import WATCHED, Console, Server

            token = read_or_create_token(self._token_path())
            auth = BearerTokens({token: Caller(role=self.ctx.options["token_role"], identity="console-token")})
            console = Console(self.ctx.host, getattr(self.ctx.cluster, "node_id", ""), self.logins, [auth],
                              STATIC_DIR, self.ctx.options["refresh_seconds"],
                              loopback=sock.getsockname()[0] in ("127.0.0.1", "::1"),
                              secure_cookie=self.ctx.options["public_url"].startswith("https:"),
                              public_host=urlsplit(self.ctx.options["public_url"]).hostname or "")
            if stop.is_set():
                return
            self._unsubscribe = [self.ctx.events.subscribe(p, console.changed) for p in WATCHED]
            self.server = Server(console, sock)
            self.server.start()
        except Exception as exc:  # the agent carries on without a console; `cortex console status` shows why
            self.error = f"{type(exc).__name__}: {exc}"
            self.ctx.log.error("web console failed", extra={"fields": {"error": self.error}})

    def stop(self) -> None:
        self._stop.set()
        for unsubscribe in getattr(self, "_unsubscribe", []):
            unsubscribe()
        self._unsubscribe = []
        if getattr(self, "_thread", None) is not None and self._thread.is_alive():
            self._thread.join(timeout=5)  # it sees the stop within half a second, before the socket closes
        if getattr(self, "server", None) is not None:
            self.server.stop()  # closes the socket too
            self.server = None
        elif getattr(self, "_socket", None) is not None:
            self._socket.close()
        self._socket = None
        self.url = ""

    # --- the tool ---------------------------------------------------------------------------------------------
    def console_login(self, args: dict, caller: Caller) -> dict:
        if not self.url:
            raise ToolError("the web console is off on this node (plugins.console.listen: off); turn it on and "
                            "restart the agent, or open another node's console")
        if self.error:
            raise ToolError(f"the web console failed on this node: {self.error}")
        node_id = getattr(self.ctx.cluster, "node_id", "")
        if not args.get("link", True):  # where the console is, no link (`cortex console status`)
            return {"console": self.url, "node_id": node_id, "sessions": self.logins.count()}
        try:
            role = cap_role(args.get("role", "reader"), caller.role)
        except ValueError as exc:
            raise ToolError(str(exc)) from None
        token, expires = self.logins.grant(role, f"{caller.identity} via console_login")
        return {"url": f"{self.url}login?token={token}", "console": self.url, "role": role,
                "expires": expires, "expires_in": round(expires - time.time()),
                "node_id": node_id, "sessions": self.logins.count()}

    def tools(self) -> list[Tool]:
        schema = {"type": "object", "additionalProperties": False,
                  "properties": {"role": {"enum": list(SESSION_ROLES), "default": "reader",
                                          "description": "what the browser may do: reader looks, operator also "
                                                         "drains, cancels, retries, takes over"},
                                 "link": {"type": "boolean", "default": True,
                                           "description": "false: only say where the console is, make no link"}}}
        return [Tool("console_login", "A one-time link (valid for minutes) that signs a browser into this node's "
                     "web console; give it to the person who asked, never to a page.", self.console_login,
                     schema, role="operator", read_only=False, toolset="console", idempotent=False,
                     output_schema=returns({"console": "string", "node_id": "string", "sessions": "integer",
                                            "url": "string", "role": "string", "expires": "number",
                                            "expires_in": "integer"}, required=("console", "node_id")))]

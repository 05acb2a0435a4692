"""The console's HTTP server: the bundled page, a JSON API over the plugin host's tools, server-sent events.

It runs on Python's http.server in threads (one per connection, so a slow tool or a long-lived event stream
blocks nobody else). The port is bound when the plugin starts, so a port in use fails the start with a clear
error, but the module is imported only when the first browser connects: a node nobody opens the console on
pays nothing for it.

API (JSON; every /api route but login needs a session cookie or the node's MCP bearer token):
  GET  /login?token=T          trade a login token for a session cookie, then move on to the page
  POST /api/login {"token"}    the same from the login form (a login token or the MCP bearer token)
  POST /api/logout
  GET  /api/whoami             node, role, the tools this node offers (the page shows what is there)
  POST /api/tool/NAME {args}   call a tool as the session's role; a tool that changes anything needs the
                               header X-Cortex-Confirm: yes; Idempotency-Key makes a retried call run once
  GET  /api/events             server-sent events: `refresh` on a timer and when the cluster changes
"""

from __future__ import annotations

import gzip
import json
import mimetypes
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from cortex.console.auth import Logins, Refused, Session, clear_cookie, cookie_name, cookie_value, set_cookie
from cortex.plugins import CALLER_ROLES, Caller, ToolError

MAX_BODY = 256 * 1024
MAX_STREAMS = 64  # open pages per node: each holds a thread for its event stream
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
# Cluster events worth redrawing a page for; the timer covers everything else (liveness is computed, not an event).
WATCHED = ("node.*", "leader.*", "task.*", "workflow.*", "service.*", "ha.*", "update.*", "alert.*",
           "sentinel.*", "plugin.*")
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


SIGNED_IN = (b'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="0;url=/">'
             b'<link rel="icon" href="/favicon.svg" type="image/svg+xml">'
             b'<title>Signed in</title></head><body><p>Signed in. <a href="/">Open the Cortex console</a></p>'
             b'</body></html>')


class Console:
    """What the handlers share: the plugin host, the logins, the static files and the change signal."""

    def __init__(self, host, node_id: str, logins: Logins, authenticators: list, static_dir: Path,
                 refresh_seconds: float, loopback: bool, secure_cookie: bool = False, public_host: str = ""):
        self.host = host
        self.node_id = node_id
        self.logins = logins
        self.authenticators = authenticators
        self.static_dir = static_dir
        self.refresh_seconds = refresh_seconds
        self.loopback = loopback
        self.secure_cookie = secure_cookie
        self.public_host = public_host  # the host name of plugins.console.public_url (a proxy in front)
        self.streams = 0
        self._streams_lock = threading.Lock()
        self.cookie = cookie_name(0)  # named after the port once the server has its socket
        self.stopping = threading.Event()
        self._changed = threading.Condition()
        self._generation = 0
        self._files: dict[str, tuple[bytes, bytes, str]] = {}  # path -> (raw, gzipped, content type)
        self._done: OrderedDict[tuple[str, str], tuple[int, dict]] = OrderedDict()  # idempotency cache
        self._done_lock = threading.Lock()
        self._running: dict[tuple[str, str], threading.Event] = {}  # idempotency keys whose call runs now

    # --- change signal (event bus -> event streams) ----------------------------------------------------------
    def changed(self, _event=None) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def wait_change(self, known: int, timeout: float) -> int:
        with self._changed:
            if self._generation == known and not self.stopping.is_set():
                self._changed.wait(timeout)
            return self._generation

    # --- static files -----------------------------------------------------------------------------------------
    def file(self, name: str) -> tuple[bytes, bytes, str] | None:
        if name not in self._files:
            path = (self.static_dir / name).resolve()
            if self.static_dir.resolve() not in path.parents or not path.is_file():
                return None
            raw = path.read_bytes()
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if kind.startswith("text/") or kind.endswith(("javascript", "json", "svg+xml")):
                kind += "; charset=utf-8"
            self._files[name] = (raw, gzip.compress(raw, 9, mtime=0), kind)
        return self._files[name]

    # --- tools ------------------------------------------------------------------------------------------------
    def tool_list(self, role: str) -> list[dict]:
        return [{"name": t.name, "role": t.role, "read_only": t.read_only, "destructive": t.destructive,
                 "allowed": CALLER_ROLES.index(role) >= CALLER_ROLES.index(t.role),
                 "params": sorted(t.input_schema.get("properties", {}))}
                for t in sorted(self.host.tools().values(), key=lambda t: t.name)]

    def call(self, session: Session, name: str, args: Any, confirmed: bool, key: str) -> tuple[int, dict]:
        tool = self.host.tools().get(name)
        if tool is None:
            return 404, {"error": f"{name} is not available on this cluster (no plugin here offers it)",
                         "absent": True}
        if CALLER_ROLES.index(session.role) < CALLER_ROLES.index(tool.role):
            return 403, {"error": f"{name} needs the {tool.role} role; this console session is {session.role}: "
                                  f"run `cortex console url --role {tool.role}` for an {tool.role} link",
                         "needs_role": tool.role}
        if not tool.read_only and not confirmed:
            return 428, {"error": f"{name} changes the cluster: confirm it (header X-Cortex-Confirm: yes)"}
        once = (session.identity + session.sid, key) if not tool.read_only and key else None
        if once is not None:
            # a retry gets the first call's answer; one sent while the first still runs waits for it
            with self._done_lock:
                if once in self._done:
                    return self._done[once]
                running = self._running.get(once)
                if running is None:
                    self._running[once] = threading.Event()
            if running is not None:
                running.wait(120)
                with self._done_lock:
                    return self._done.get(once, (409, {"error": f"{name} with this key is still running; look "
                                                                "again in a moment"}))
            if isinstance(args, dict) and "idempotency_key" in tool.input_schema.get("properties", {}):
                args = {**args, "idempotency_key": args.get("idempotency_key") or key[:128]}
        answer: tuple[int, dict] | None = None
        try:
            answer = 200, {"result": self.host.call_tool(name, args, session.caller())}
        except ToolError as exc:
            answer = 400, {"error": str(exc)}
        finally:
            if once is not None:
                with self._done_lock:
                    if answer is not None:
                        self._done[once] = answer
                        while len(self._done) > 1024:
                            self._done.popitem(last=False)
                    self._running.pop(once).set()
        if not tool.read_only:
            self.changed()
        return answer

    def session_of(self, headers) -> Session:
        """The caller of a request: its session cookie, else the node's bearer token (scripts, the benchmark)."""
        if headers.get("Authorization"):
            lowered = {k.lower(): v for k, v in headers.items()}
            caller = next((c for a in self.authenticators if (c := a.authenticate(lowered)) is not None), None)
            if caller is None:
                raise Refused("the bearer token is not this node's console token")
            return Session("bearer", caller.role, caller.identity, time.time() + 60)
        return self.logins.session(cookie_value(headers.get("Cookie", ""), self.cookie))


class Handler(BaseHTTPRequestHandler):
    server_version = "cortex-console"
    protocol_version = "HTTP/1.1"
    console: Console  # set on the subclass made per server

    def log_message(self, format, *args) -> None:  # the agent's log carries what matters, not access lines
        pass

    # --- plumbing ---------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, kind: str, headers: dict | None = None, gz: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        if gz:
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Vary", "Accept-Encoding")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: dict, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data, default=str).encode(), "application/json",
                   {"Cache-Control": "no-store", **(headers or {})})

    def _redirect(self, where: str, headers: dict | None = None) -> None:
        self._send(303, b"", "text/plain", {"Location": where, "Cache-Control": "no-store", **(headers or {})})

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError(f"the request body is over {MAX_BODY} bytes")
        raw = self.rfile.read(length) if length else b"{}"
        try:
            return json.loads(raw or b"{}")
        except ValueError as exc:
            raise ValueError(f"the request body is not JSON: {exc}") from None

    def _host_allowed(self) -> bool:
        """On loopback only loopback names: a page on some other site cannot rebind its name to this port."""
        if not self.console.loopback:
            return True
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0] if "]" not in (self.headers.get("Host") or "") \
            else (self.headers.get("Host") or "").rsplit("]", 1)[0] + "]"
        return host in LOOPBACK_HOSTS or (bool(self.console.public_host) and host == self.console.public_host)

    def _session(self) -> Session | None:
        try:
            return self.console.session_of(self.headers)
        except Refused as exc:
            self._json(401, {"error": str(exc), "login": True})
            return None

    # --- routes -----------------------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        if urlsplit(self.path).path.startswith("/api/"):
            return self._json(405, {"error": "HEAD is for the page's files; the API answers GET and POST"})
        self.do_GET()

    def do_GET(self) -> None:
        if not self._host_allowed():
            return self._json(421, {"error": "this console answers to loopback names only (127.0.0.1, localhost)"})
        url = urlsplit(self.path)
        path = url.path
        if path == "/login":
            return self._login_link(parse_qs(url.query).get("token", [""])[0])
        if path == "/api/whoami":
            if (session := self._session()) is None:
                return
            return self._json(200, {"node_id": self.console.node_id, "role": session.role,
                                    "identity": session.identity, "expires": session.expires,
                                    "refresh_seconds": self.console.refresh_seconds,
                                    "tools": self.console.tool_list(session.role)})
        if path == "/api/events":
            return self._events()
        if path.startswith("/api/"):
            return self._json(404, {"error": f"no API route {path}"})
        name = path.lstrip("/") or "index.html"
        if name == "favicon.ico":  # asked for by browsers whatever the page says
            name = "favicon.svg"
        if name.startswith(("static/",)):
            name = name[len("static/"):]
        found = self.console.file(name) or (self.console.file("index.html") if "." not in name else None)
        if found is None and self.console.file("index.html") is None:
            return self._send(503, b"The console's front end is not built on this node: run ./bootstrap.sh, or "
                                   b"(cd console && npm ci && npm run build), then reload.\n", "text/plain; charset=utf-8")
        if found is None:
            return self._json(404, {"error": f"no such file {path}; the console is at /"})
        raw, packed, kind = found
        gz = "gzip" in (self.headers.get("Accept-Encoding") or "")
        cache = "no-cache" if name == "index.html" or "." not in name else "public, max-age=3600"
        self._send(200, packed if gz else raw, kind, {"Cache-Control": cache}, gz=gz)

    def do_POST(self) -> None:
        if not self._host_allowed():
            return self._json(421, {"error": "this console answers to loopback names only (127.0.0.1, localhost)"})
        path = urlsplit(self.path).path
        origin = self.headers.get("Origin")
        if origin and urlsplit(origin).netloc != (self.headers.get("Host") or ""):
            return self._json(403, {"error": f"a page from {origin} may not act on this console"})
        try:
            body = self._body()
        except ValueError as exc:
            return self._json(400, {"error": str(exc)})
        if path == "/api/login":
            return self._login_form(body)
        if path == "/api/logout":
            self.console.logins.close(cookie_value(self.headers.get("Cookie", ""), self.console.cookie))
            return self._json(200, {"signed_out": True}, {"Set-Cookie": clear_cookie(self.console.cookie)})
        if path.startswith("/api/tool/"):
            if (session := self._session()) is None:
                return
            name = path[len("/api/tool/"):]
            confirmed = (self.headers.get("X-Cortex-Confirm") or "").lower() == "yes"
            status, answer = self.console.call(session, name, body, confirmed,
                                               (self.headers.get("Idempotency-Key") or "")[:200])
            return self._json(status, answer)
        self._json(404, {"error": f"no API route {path}"})

    def _login_link(self, token: str) -> None:
        try:
            session = self.console.logins.redeem(token)
        except Refused as exc:
            return self._redirect("/?login_error=" + quote(str(exc)))
        # A page that moves on by itself rather than a redirect: a link followed from another site is a
        # cross-site navigation, and a SameSite=Strict cookie is not sent along its redirects; the refresh is
        # this page's own navigation, so the cookie goes with it.
        self._send(200, SIGNED_IN, "text/html; charset=utf-8",
                   {"Set-Cookie": set_cookie(session, self.console.secure_cookie, self.console.cookie),
                    "Cache-Control": "no-store"})

    def _login_form(self, body: Any) -> None:
        token = str(body.get("token", "")).strip() if isinstance(body, dict) else ""
        if not token:
            return self._json(400, {"error": "paste a login token or the node's console token"})
        bearer = {"authorization": f"Bearer {token}"}
        caller: Caller | None = next((c for a in self.console.authenticators
                                      if (c := a.authenticate(bearer)) is not None), None)
        try:
            session = self.console.logins.open_with(caller) if caller else self.console.logins.redeem(token)
        except Refused as exc:
            return self._json(401, {"error": str(exc), "login": True})
        self._json(200, {"role": session.role}, {"Set-Cookie": set_cookie(session, self.console.secure_cookie, self.console.cookie)})

    def _events(self) -> None:
        if (session := self._session()) is None:
            return
        with self.console._streams_lock:
            if self.console.streams >= MAX_STREAMS:
                return self._json(503, {"error": f"{MAX_STREAMS} console pages are open on this node; close some "
                                                 "or open another node's console"})
            self.console.streams += 1
        try:
            self._stream(session)
        finally:
            with self.console._streams_lock:
                self.console.streams -= 1

    def _stream(self, session: Session) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        console, known = self.console, -1
        last = 0.0
        try:
            self.wfile.write(b"retry: 2000\n\n")
            while not console.stopping.is_set():
                if session.sid != "bearer":
                    console.logins.session(session.sid)  # an expired session ends its stream
                generation = console.wait_change(known, console.refresh_seconds)
                now = time.time()
                if generation == known and now - last < console.refresh_seconds * 0.9:
                    continue
                reason = "change" if generation != known else "timer"
                known, last = generation, now
                data = json.dumps({"reason": reason, "at": now, "node_id": console.node_id})
                self.wfile.write(f"event: refresh\ndata: {data}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.25 if reason == "change" else 0)  # a burst of changes is one redraw
        except (Refused, OSError):
            pass
        self.close_connection = True


class Server:
    """Serves the console on a socket bound by the plugin; the thread waits for the first connection."""

    def __init__(self, console: Console, sock):
        self.console = console
        self.socket = sock
        console.cookie = cookie_name(sock.getsockname()[1])
        handler = type("BoundHandler", (Handler,), {"console": console})
        self.httpd = ThreadingHTTPServer(sock.getsockname()[:2], handler, bind_and_activate=False)
        self.httpd.socket = sock
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                       name="console-http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.console.stopping.set()
        self.console.changed()
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.thread.is_alive():
            self.thread.join(timeout=5)


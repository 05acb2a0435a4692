"""The provisioning service: an HTTP server that iPXE talks to.

    GET /boot.ipxe                 entry script (DHCP hands it to iPXE): chains to /ipxe with the machine's facts
    GET /menu.ipxe                 boot menu for people at the console
    GET /custom.ipxe               netboot.xyz custom menu entry ("Cortex ephemeral node")
    GET /ipxe?mac=&uuid=&serial=&hostname=
                                   the machine's own script: matched to a group/profile, a fresh single-use
                                   worker token minted through the cluster, the boot recorded (netboot.enroll)
    GET /artifacts/SHA256SUMS      checksums of the served artifacts
    GET /artifacts/NAME            kernel / initrd, with X-Checksum-SHA256, Digest and ETag headers
    GET /credentials/TICKET/credentials.cpio
                                   the boot's secret credentials (the join token) as a second initrd: served
                                   once, then gone (netboot/credstore.py); the ticket is only in that script
    GET /healthz                   JSON: profiles, artifacts present, cluster reachable

It runs inside a cluster node's agent (plugin `netboot`, option `listen`) or as `cortex netboot serve`
next to one; either way tokens and records go through the cluster (`ClusterPort`), never around it.
Refusals (unknown machine without a default group, a name that is not a valid node id, missing
artifacts) answer 4xx/5xx with one line saying why, are logged, and enroll nothing.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from cortex.netboot import render
from cortex.netboot.artifacts import CHUNK, SUMS_NAME, ArtifactError, ArtifactStore
from cortex.netboot.credstore import NAME as CREDENTIALS_NAME
from cortex.netboot.credstore import Tickets
from cortex.netboot.profiles import SELECTOR_VALUE_RE, Machine, NoMatch, Profiles, normalize_mac
from cortex.node.logs import fields

log = logging.getLogger("cortex.netboot")

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")
MAX_QUERY = 2048


class ClusterPort(Protocol):
    """What the service needs from the cluster (plugin.BridgePort in an agent, cli.ClientPort outside)."""

    node_id: str

    def create_token(self, role: str, ttl_seconds: float, uses: int) -> tuple[str, str, float]:
        """Mint a join token through the leader: (token, token id, expires_at)."""

    def revoke_token(self, token_id: str) -> None: ...

    def write(self, command_type: str, args: dict, idempotency_key: str = "") -> dict: ...

    def read(self, query: str, args: dict | None = None, level: str = "leader") -> Any: ...


class Refused(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ServiceConfig:
    base_url: str  # how machines reach this service: http://HOST:PORT
    join_address: str  # HOST:PORT of a cluster member, as the machines reach it
    artifacts: Path
    profiles: Profiles


def machine_from_query(query: str) -> Machine:
    """The booting machine's facts from iPXE's query string; every value is untrusted."""
    if len(query) > MAX_QUERY:
        raise Refused(HTTPStatus.REQUEST_URI_TOO_LONG, "query string too long")
    params = urllib.parse.parse_qs(query, keep_blank_values=True, max_num_fields=16)
    get = {k: v[0].strip() for k, v in params.items() if v}
    mac = normalize_mac(get.get("mac", ""))
    if get.get("mac") and not mac:
        raise Refused(HTTPStatus.BAD_REQUEST, "mac is not a MAC address")
    uuid_value = get.get("uuid", "")
    uuid_value = uuid_value.lower() if UUID_RE.match(uuid_value) else ""
    serial = get.get("serial", "")
    hostname = get.get("hostname", "")
    machine = Machine(mac=mac, uuid=uuid_value,
                      # Kept only when it could equal a (validated) selector; a hostile value matches nothing.
                      serial=serial if SELECTOR_VALUE_RE.match(serial) else "",
                      hostname=hostname if HOSTNAME_RE.match(hostname) else "")
    if not (machine.mac or machine.uuid or machine.serial):
        raise Refused(HTTPStatus.BAD_REQUEST, "the machine sent no mac, uuid or serial: chain /boot.ipxe, "
                                              "which adds them")
    return machine


class Provisioner:
    """The service's logic, independent of HTTP (tests call it directly too)."""

    def __init__(self, config: ServiceConfig, cluster: ClusterPort, resolve_join: Callable[[], str] | None = None):
        problem = render.base_url_problem(config.base_url)
        if problem:
            raise ValueError(f"base URL {problem}")
        if config.join_address:
            render.word(config.join_address)
        elif resolve_join is None:
            raise ValueError("a join address is needed (HOST:PORT of a member, as the machines reach it)")
        self.config = config
        self.cluster = cluster
        self._resolve_join = resolve_join
        names = {n for p in config.profiles.profiles.values() for n in (p.kernel, p.initrd)}
        self.artifacts = ArtifactStore(config.artifacts, names)
        self.tickets = Tickets()

    def boot_script(self) -> str:
        return render.boot_script(self.config.base_url)

    def menu_script(self) -> str:
        return render.menu_script(self.config.base_url)

    def custom_menu(self) -> str:
        return render.custom_menu(self.config.base_url)

    def machine_script(self, query: str, client: str = "") -> str:
        machine = machine_from_query(query)
        try:
            match = self.config.profiles.match(machine)
        except NoMatch as exc:
            raise Refused(HTTPStatus.NOT_FOUND, str(exc)) from None
        except ValueError as exc:
            raise Refused(HTTPStatus.FORBIDDEN, str(exc)) from None
        profile = match.profile
        for name in (profile.kernel, profile.initrd):
            try:
                self.artifacts.get(name)
            except ArtifactError as exc:
                raise Refused(HTTPStatus.SERVICE_UNAVAILABLE, str(exc)) from None
        join_address = self.config.join_address or self._resolve_join()
        token, token_id, expires_at = self.cluster.create_token("worker", profile.token_ttl, 1)
        args = {
            "machine": machine.key, "mac": machine.mac, "uuid": machine.uuid, "serial": machine.serial,
            "group": match.group.name, "profile": profile.name, "node_id": match.node_id, "token_id": token_id,
            "token_expires_at": expires_at or None, "ephemeral": profile.ephemeral,
            "gc_offline_after": profile.gc_offline_after, "idle_poweroff_after": profile.idle_poweroff_after,
            "served_by": self.cluster.node_id,
        }
        try:
            result = self.cluster.write("netboot.enroll", args, idempotency_key=f"netboot-{uuid.uuid4().hex}")
        except Exception:
            self._revoke_quietly(token_id)
            raise
        ticket = self.tickets.mint({"cortex.join_token": token}, expires_at)
        script = render.machine_script(render.MachineScript(
            machine=machine.key, group=match.group.name, profile=profile.name, node_id=match.node_id,
            base_url=self.config.base_url, kernel=profile.kernel, initrd=profile.initrd, args=profile.args,
            join_address=join_address, token=token, log_level=profile.log_level,
            credentials_url=f"{self.config.base_url.rstrip('/')}/credentials/{ticket}/{CREDENTIALS_NAME}",
            expires=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires_at)) if expires_at else "never"))
        log.info("netboot: machine enrolled", extra=fields(machine=machine.key, group=match.group.name,
                                                            profile=profile.name, node_id=match.node_id,
                                                            token_id=token_id, enrollment=result.get("enrollment"),
                                                            client=client))
        return script

    def credentials(self, path: str) -> bytes:
        """GET /credentials/TICKET/credentials.cpio: once per boot."""
        ticket, _, name = path.partition("/")
        data = self.tickets.take(ticket) if name == CREDENTIALS_NAME and re.fullmatch(r"[0-9a-f]{32}", ticket) else None
        if data is None:
            raise Refused(HTTPStatus.NOT_FOUND, "no such credentials: each boot's archive is served once and "
                                                "expires with its token; boot again for a new one")
        return data

    def _revoke_quietly(self, token_id: str) -> None:
        try:
            self.cluster.revoke_token(token_id)
        except Exception as exc:  # it expires anyway; say so
            log.warning("netboot: could not revoke an unused token", extra=fields(token_id=token_id, error=str(exc)))

    def health(self) -> dict:
        doc: dict = {"base_url": self.config.base_url, "join_address": self.config.join_address,
                     "profiles": sorted(self.config.profiles.profiles),
                     "groups": [g.name for g in self.config.profiles.groups],
                     "artifacts_dir": str(self.config.artifacts), "missing_artifacts": self.artifacts.missing()}
        try:
            self.cluster.read("netboot.machines", {}, level="stale")
            doc["cluster"] = "ok"
        except Exception as exc:
            doc["cluster"] = f"unreachable: {exc}"
        doc["ok"] = doc["cluster"] == "ok" and not doc["missing_artifacts"]
        return doc


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's name
        log.debug("netboot http: " + format % args)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def _dispatch(self, head: bool) -> None:
        url = urllib.parse.urlsplit(self.path)
        p = self.server.provisioner
        try:
            if url.path in ("/boot.ipxe", "/"):
                self._text(p.boot_script(), head)
            elif url.path == "/menu.ipxe":
                self._text(p.menu_script(), head)
            elif url.path == "/custom.ipxe":
                self._text(p.custom_menu(), head)
            elif url.path == "/ipxe":
                if head:
                    raise Refused(HTTPStatus.METHOD_NOT_ALLOWED, "GET only: each GET mints a join token")
                self._text(p.machine_script(url.query, client=self.client_address[0]), head)
            elif url.path.startswith("/credentials/"):
                if head:
                    raise Refused(HTTPStatus.METHOD_NOT_ALLOWED, "GET only: the archive is served once")
                self._send(HTTPStatus.OK, p.credentials(url.path[len("/credentials/"):]), "application/octet-stream",
                           head)
            elif url.path == f"/artifacts/{SUMS_NAME}":
                self._text(p.artifacts.sums(), head)
            elif url.path.startswith("/artifacts/"):
                self._artifact(url.path[len("/artifacts/"):], head)
            elif url.path == "/healthz":
                doc = p.health()
                self._send(HTTPStatus.OK if doc["ok"] else HTTPStatus.SERVICE_UNAVAILABLE,
                           json.dumps(doc).encode(), "application/json", head)
            else:
                raise Refused(HTTPStatus.NOT_FOUND, f"no such path {url.path[:100]!r}")
        except Refused as exc:
            log.warning("netboot: refused", extra=fields(path=url.path, status=int(exc.status), reason=str(exc),
                                                         client=self.client_address[0]))
            self._send(exc.status, f"cortex netboot: {exc}\n".encode(), "text/plain; charset=utf-8", head)
        except ArtifactError as exc:
            self._send(HTTPStatus.NOT_FOUND, f"cortex netboot: {exc}\n".encode(), "text/plain; charset=utf-8", head)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:
            log.error("netboot: request failed", extra=fields(path=url.path, error=f"{type(exc).__name__}: {exc}"))
            self._send(HTTPStatus.SERVICE_UNAVAILABLE,
                       f"cortex netboot: cannot serve this now ({type(exc).__name__}: {exc}); retry\n".encode(),
                       "text/plain; charset=utf-8", head)

    def _text(self, body: str, head: bool) -> None:
        self._send(HTTPStatus.OK, body.encode(), "text/plain; charset=utf-8", head)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, head: bool,
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _artifact(self, name: str, head: bool) -> None:
        artifact = self.server.provisioner.artifacts.get(name)
        with open(artifact.path, "rb") as f:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(artifact.size))
            self.send_header("X-Checksum-SHA256", artifact.sha256)
            self.send_header("Digest", "sha-256=" + base64.b64encode(bytes.fromhex(artifact.sha256)).decode())
            self.send_header("ETag", f'"{artifact.sha256}"')
            self.end_headers()
            if head:
                return
            while chunk := f.read(CHUNK):
                self.wfile.write(chunk)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], provisioner: Provisioner):
        self.provisioner = provisioner
        super().__init__(address, _Handler)


class HttpService:
    """The HTTP server in a background thread."""

    def __init__(self, provisioner: Provisioner, host: str, port: int):
        self.provisioner = provisioner
        self._server = _Server((host, port), provisioner)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self._server.server_address[:2]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, name="netboot-http", daemon=True)
        self._thread.start()
        log.info("netboot: serving", extra=fields(address=f"{self.address[0]}:{self.address[1]}",
                                                  base_url=self.provisioner.config.base_url))

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"listen address {listen!r} must be HOST:PORT")
    return host.strip("[]"), int(port)

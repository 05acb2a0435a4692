"""Tailscale discovery: find peers tagged for Cortex and let a peer's Tailscale identity approve its join.

Two sources, the same answer (`Peer`): the local daemon (`tailscale status --json`, no credentials needed)
and the Tailscale API (the `tailscale` package; a tailnet name and an API key or OAuth client). Parsing is
pure (`peers_from_status`, `peers_from_devices`); the subprocess and HTTP calls are wrapped once each.

The plugin (`TailscalePlugin`, off by default) runs on every node but acts on the leader: every `interval`
seconds it records the tagged peers that are not members yet (offered for approval: `tailscale_peers`
tool, `cortex nodes pending` once they ask), and when a join request arrives from an address that belongs
to a peer matching the approval rule (tags and/or owners), it approves it — a node's Tailscale identity,
vouched for by the tailnet's control plane, stands in for a join token.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import subprocess
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from cortex.core.events import Event
from cortex.plugins import Caller, Plugin, Tool, ToolError, returns

DEFAULT_TAG = "tag:cortex"


class TailscaleUnavailable(RuntimeError):
    """Tailscale could not be asked; the message says what to check."""


@dataclass(frozen=True)
class Peer:
    name: str  # the machine's host name
    dns_name: str  # MagicDNS name, without the trailing dot
    addresses: tuple[str, ...]  # Tailscale IPs (IPv4 first)
    tags: tuple[str, ...]
    user: str  # owner's login name; "" for tagged devices (tags replace the owner)
    online: bool | None  # None: the source does not say
    os: str
    device_id: str
    source: str  # "local" (tailscaled) or "api"

    def address(self, port: int) -> str:
        """HOST:PORT of the agent on this peer, through the tailnet (IPv4 preferred)."""
        ipv4 = [a for a in self.addresses if ipaddress.ip_address(a).version == 4]
        host = (ipv4 or list(self.addresses) or [self.dns_name])[0]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _sorted_ips(ips: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(ips, key=lambda a: (ipaddress.ip_address(a.split("/")[0]).version, a)))


def peers_from_status(doc: dict, tag: str = DEFAULT_TAG) -> list[Peer]:
    """Peers carrying `tag` in a `tailscale status --json` document (Self included when tagged)."""
    if not isinstance(doc, dict) or "Peer" not in doc and "Self" not in doc:
        raise TailscaleUnavailable("not a `tailscale status --json` document (no Self/Peer)")
    if doc.get("BackendState") not in (None, "Running"):
        raise TailscaleUnavailable(f"tailscale is not connected (state {doc['BackendState']}); run `tailscale up`"
                                   + (f" and log in at {doc['AuthURL']}" if doc.get("AuthURL") else ""))
    users = {str(uid): u.get("LoginName", "") for uid, u in (doc.get("User") or {}).items()}
    entries = list((doc.get("Peer") or {}).values())
    if doc.get("Self"):
        entries.append(doc["Self"])
    out = []
    for p in entries:
        tags = tuple(p.get("Tags") or ())
        if tag not in tags:
            continue
        out.append(Peer(
            name=p.get("HostName", ""), dns_name=(p.get("DNSName") or "").rstrip("."),
            addresses=_sorted_ips(p.get("TailscaleIPs") or ()), tags=tags,
            user="" if tags else users.get(str(p.get("UserID")), ""),
            online=p.get("Online"), os=p.get("OS", ""), device_id=str(p.get("ID", "")), source="local"))
    return sorted(out, key=lambda p: p.name)


def peers_from_devices(devices: dict[str, Any], tag: str = DEFAULT_TAG) -> list[Peer]:
    """Peers carrying `tag` among the API's devices (`tailscale.models.Device` objects)."""
    out = []
    for d in devices.values():
        tags = tuple(d.tags or ())
        if tag not in tags:
            continue
        out.append(Peer(
            name=d.hostname, dns_name=(d.name or "").rstrip("."), addresses=_sorted_ips(d.addresses or ()),
            tags=tags, user="" if tags else (d.user or ""), online=d.connected_to_control, os=d.os or "",
            device_id=d.device_id, source="api"))
    return sorted(out, key=lambda p: p.name)


def local_status(binary: str = "tailscale", timeout: float = 10.0) -> dict:
    """`tailscale status --json` from the local daemon."""
    try:
        proc = subprocess.run([binary, "status", "--json"], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise TailscaleUnavailable(f"{binary} is not installed; install Tailscale or use source: api") from None
    except subprocess.TimeoutExpired:
        raise TailscaleUnavailable(f"`{binary} status --json` did not answer in {timeout:.0f}s; is tailscaled up?") \
            from None
    if proc.returncode != 0:
        raise TailscaleUnavailable(f"`{binary} status --json` failed: {proc.stderr.strip() or proc.returncode}; "
                                   "is tailscaled running and logged in?")
    try:
        return json.loads(proc.stdout)
    except ValueError as exc:
        raise TailscaleUnavailable(f"`{binary} status --json` printed something that is not JSON: {exc}") from None


def api_devices(tailnet: str, api_key: str, session_factory=None, timeout: float = 10.0) -> dict[str, Any]:
    """The tailnet's devices from the Tailscale API. `session_factory` makes the aiohttp session (tests
    point it at a local server that speaks the API's paths and JSON)."""
    from tailscale import Tailscale, TailscaleError

    async def fetch() -> dict[str, Any]:
        session = session_factory() if session_factory else None
        try:
            async with Tailscale(tailnet=tailnet, api_key=api_key, session=session,
                                 request_timeout=int(timeout)) as client:
                return await client.devices()
        finally:
            if session is not None:
                await session.close()

    try:
        return asyncio.run(fetch())
    except TailscaleError as exc:
        raise TailscaleUnavailable(f"Tailscale API: {exc}; check the tailnet name and the API key") from None


# --- approval rules ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ApprovalRule:
    """Join requests from peers matching this rule are approved without an operator."""

    tags: tuple[str, ...] = ()  # any of these tags
    users: tuple[str, ...] = ()  # or owned by any of these login names
    role: str = "worker"  # the most a rule may admit: "worker" (default) or "server"

    def admits(self, peer: Peer, role: str) -> bool:
        if role == "server" and self.role != "server":
            return False
        return bool(set(peer.tags) & set(self.tags)) or bool(peer.user and peer.user in self.users)


def peer_at(peers: Iterable[Peer], grpc_address: str) -> Peer | None:
    """The peer whose Tailscale IP is the host of `grpc_address`."""
    host = grpc_address.rpartition(":")[0].strip("[]")
    return next((p for p in peers if host in p.addresses), None)


# --- the plugin --------------------------------------------------------------------------------------------

# What each tool answers: its MCP output schema (structuredContent).
_OUT_TAILSCALE_PEERS = returns(
    {
        "tag": "string",
        "error": "string",
        "peers": {
            "type": "array",
            "items": returns(
                {
                    "name": "string",
                    "dns_name": "string",
                    "addresses": "array",
                    "tags": "array",
                    "user": "string",
                    "online": ["boolean", "null"],
                    "os": "string",
                    "device_id": "string",
                    "source": "string",
                    "agent_address": "string",
                    "member": "boolean",
                    "auto_approved": "boolean",
                }
            ),
        },
    }
)


class TailscalePlugin(Plugin):
    name = "tailscale"
    description = "Discover Cortex peers on the tailnet; approve joins by Tailscale identity."
    enabled_by_default = False
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "tag": {"type": "string", "pattern": "^tag:[a-z0-9-]+$", "default": DEFAULT_TAG},
            "source": {"enum": ["local", "api"], "default": "local"},
            "binary": {"type": "string", "default": "tailscale"},
            "tailnet": {"type": "string", "default": "-"},
            "api_key_file": {"type": "string"},
            "interval": {"type": "number", "minimum": 5, "default": 60},
            "agent_port": {"type": "integer", "minimum": 1, "maximum": 65535, "default": 7400},
            "auto_approve": {
                "type": "object", "additionalProperties": False,
                "properties": {"tags": {"type": "array", "items": {"type": "string"}},
                               "users": {"type": "array", "items": {"type": "string"}},
                               "role": {"enum": ["worker", "server"]}},
            },
        },
    }

    def init(self) -> None:
        o = self.ctx.options
        if o["source"] == "api" and not o.get("api_key_file"):
            raise ValueError("source: api needs api_key_file (a file holding a Tailscale API key)")
        rule = o.get("auto_approve") or {}
        self.rule = ApprovalRule(tuple(rule.get("tags", ())), tuple(rule.get("users", ())), rule.get("role", "worker"))
        self.session_factory = None  # tests: an aiohttp session pointed at a local API server
        self._peers: list[Peer] = []
        self._error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def discover(self) -> list[Peer]:
        o = self.ctx.options
        if o["source"] == "local":
            peers = peers_from_status(local_status(o["binary"]), o["tag"])
        else:
            with open(o["api_key_file"]) as f:
                key = f.read().strip()
            peers = peers_from_devices(api_devices(o["tailnet"], key, self.session_factory), o["tag"])
        self._peers, self._error = peers, ""
        return peers

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tailscale-discovery", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.discover()
            except (TailscaleUnavailable, OSError) as exc:
                self._error = str(exc)
                self.ctx.log.warning("tailscale discovery failed", extra={"fields": {"error": str(exc)}})
            self._stop.wait(self.ctx.options["interval"])

    def subscriptions(self):
        return {"node.pending": self._on_pending}

    def _on_pending(self, event: Event) -> None:
        if not self.ctx.cluster.is_leader():
            return
        node_id = event.data["node_id"]
        requests = self.ctx.cluster.read("join_requests", {"node_id": node_id}, level="stale")
        if not requests:
            return
        try:
            peers = self.discover()  # fresh: the newcomer may have appeared since the last round
        except (TailscaleUnavailable, OSError) as exc:
            self.ctx.log.warning("cannot check a join against Tailscale", extra={"fields": {"error": str(exc)}})
            return
        peer = peer_at(peers, requests[0]["grpc_address"])
        if peer is not None and self.rule.admits(peer, requests[0]["role"]):
            self.ctx.cluster.propose("node.approve", {"node_id": node_id}, idempotency_key=f"ts-approve-{node_id}")
            self.ctx.log.info("join approved by Tailscale identity",
                              extra={"fields": {"node": node_id, "peer": peer.name, "tags": list(peer.tags),
                                                "user": peer.user}})

    def offered(self) -> list[dict]:
        """Tagged peers that are not members yet: candidates to join (or to approve once they ask)."""
        members = self.ctx.cluster.read("nodes", {}, level="stale") if self.ctx.cluster.is_leader() else \
            self.ctx.cluster.read("nodes", {})
        member_hosts = {n["grpc_address"].rpartition(":")[0].strip("[]") for n in members}
        port = self.ctx.options["agent_port"]
        return [{**asdict(p), "agent_address": p.address(port), "member": bool(set(p.addresses) & member_hosts),
                 "auto_approved": self.rule.admits(p, "worker")} for p in self._peers]

    def tools(self) -> list[Tool]:
        def peers(args: dict, caller: Caller) -> dict:
            if args.get("refresh"):
                try:
                    self.discover()
                except (TailscaleUnavailable, OSError) as exc:
                    raise ToolError(str(exc)) from None
            return {"tag": self.ctx.options["tag"], "error": self._error, "peers": self.offered()}

        return [Tool("tailscale_peers", "Tailnet peers tagged for Cortex, whether each is a member already and "
                     "whether the auto-approve rule admits it. refresh=true asks Tailscale now.", peers,
                     input_schema={"type": "object", "additionalProperties": False,
                                   "properties": {"refresh": {"type": "boolean"}}},
                     output_schema=_OUT_TAILSCALE_PEERS)]

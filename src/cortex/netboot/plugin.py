"""The `netboot` plugin: the provisioning service inside an agent, and the leader's enrollment reconciler.

Every node with the plugin enabled (the default) runs the reconciler, but it acts only while its node
is the Raft leader. Each round (every `reconcile_interval` seconds, and at once after a membership
event) it compares enrollments with membership and proposes what changed:

- an `issued` enrollment whose node has joined -> `netboot.joined` (the handler checks that the node
  spent the enrollment's single-use token);
- a `joined`/`reported` node that is no longer a member -> `netboot.left` (it left cleanly);
- an ephemeral node `offline` for longer than its profile's `gc_offline_after` -> `netboot.left` with
  reason `collected`, then removal from membership through the agent's leave path.

Level-triggered on purpose: a new leader (or a restarted one) converges from the replicated state alone,
and event callbacks (which run on the apply thread) never propose themselves.

Option `listen: HOST:PORT` also serves the provisioning HTTP service from this agent.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cortex.netboot import profiles as profiles_mod
from cortex.node.logs import fields
from cortex.plugins import Plugin, Tool, ToolError, returns_list

if TYPE_CHECKING:
    from cortex.netboot.service import HttpService

DEFAULT_ARTIFACTS = "/usr/share/cortex/netboot"


class BridgePort:
    """service.ClusterPort over the agent's PluginBridge."""

    def __init__(self, bridge):
        self._bridge = bridge
        self.node_id = bridge.node_id

    def create_token(self, role: str, ttl_seconds: float, uses: int) -> tuple[str, str, float]:
        doc = self._bridge.create_token(role, ttl_seconds, uses)
        return doc["token"], doc["token_id"], doc["expires_at"]

    def revoke_token(self, token_id: str) -> None:
        self._bridge.revoke_token(token_id)

    def write(self, command_type: str, args: dict, idempotency_key: str = "") -> dict:
        return self._bridge.write(command_type, args, idempotency_key)

    def read(self, query: str, args: dict | None = None, level: str = "leader") -> Any:
        return self._bridge.read(query, args, level)


def reconcile_actions(enrollments: list[dict], nodes: list[dict], now: float,
                      attempted_joins: set[str]) -> list[tuple[str, dict]]:
    """Pure: what the leader should do for these enrollments given membership at time `now`.

    Returns ("joined", {node_id}), ("left", {node_id, reason}) and ("remove", {node_id}) actions."""
    members = {n["id"]: n for n in nodes}
    actions: list[tuple[str, dict]] = []
    for e in enrollments:
        node = members.get(e["node_id"])
        if e["state"] == "issued":
            if node is not None and node["joined_at"] >= e["created_at"] and e["id"] not in attempted_joins:
                actions.append(("joined", {"node_id": e["node_id"], "enrollment": e["id"]}))
        elif e["state"] in ("joined", "reported"):
            if node is None:
                actions.append(("left", {"node_id": e["node_id"], "reason": "left"}))
            elif (e["ephemeral"] and e["gc_offline_after"] is not None and node["liveness"] == "offline"
                  and node["liveness_since"] is not None and now - node["liveness_since"] >= e["gc_offline_after"]):
                actions.append(("left", {"node_id": e["node_id"], "reason": "collected"}))
                actions.append(("remove", {"node_id": e["node_id"]}))
        elif e["state"] == "collected" and node is not None and node["liveness"] == "offline":
            actions.append(("remove", {"node_id": e["node_id"]}))
    return actions


# What each tool answers: its MCP output schema (structuredContent).
_OUT_NETBOOT_MACHINES = returns_list(
    {
        "id": "string",
        "machine": "string",
        "profile": "string",
        "node_id": ["string", "null"],
        "state": "string",
        "created_at": "number",
        "boots": "integer",
    },
    required=("id", "machine", "state", "boots"),
)


class NetbootPlugin(Plugin):
    name = "netboot"
    description = "Netboot provisioning: iPXE scripts, per-boot join tokens, enrollments, ephemeral node GC"
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "listen": {"type": "string", "default": "", "description": "HOST:PORT to serve iPXE/artifacts on"},
            "base_url": {"type": "string", "default": "", "description": "how machines reach it (http://HOST:PORT)"},
            "join_address": {"type": "string", "default": "", "description": "cluster address machines join"},
            "artifacts": {"type": "string", "default": DEFAULT_ARTIFACTS},
            "profiles": {"type": "string", "default": "", "description": "profiles YAML; empty: one default"},
            "reconcile_interval": {"type": "number", "minimum": 0.2, "maximum": 300, "default": 2.0},
        },
    }

    def init(self) -> None:
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._attempted: set[str] = set()
        self._http: HttpService | None = None
        self._thread: threading.Thread | None = None
        opts = self.ctx.options
        self._profiles = (profiles_mod.load(opts["profiles"]) if opts["profiles"]
                          else profiles_mod.default_profiles())
        if opts["listen"]:
            # The HTTP service (http.server, Jinja) is loaded only on the nodes that serve netboot.
            from cortex.netboot.service import split_listen

            split_listen(opts["listen"])

    def start(self) -> None:
        opts = self.ctx.options
        if opts["listen"]:
            from cortex.netboot.service import HttpService, Provisioner, ServiceConfig, split_listen

            host, port = split_listen(opts["listen"])
            config = ServiceConfig(base_url=opts["base_url"] or f"http://{opts['listen']}",
                                   join_address=opts["join_address"], artifacts=Path(opts["artifacts"]),
                                   profiles=self._profiles)
            # Without join_address: this node's own address, looked up per boot (it may still be joining).
            provisioner = Provisioner(config, BridgePort(self.ctx.cluster), resolve_join=self._own_grpc_address)
            self._http = HttpService(provisioner, host, port)
            self._http.start()
        self._thread = threading.Thread(target=self._loop, name="netboot-reconcile", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._http is not None:
            self._http.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _own_grpc_address(self) -> str:
        status = self.ctx.cluster.status()
        mine = next((n for n in status.get("nodes", []) if n.get("id") == self.ctx.cluster.node_id), None)
        if mine is None:
            raise RuntimeError("this node is not a cluster member yet (or set plugins.netboot.join_address)")
        return mine["grpc_address"]

    def subscriptions(self):
        return {"node.*": lambda event: self._wake.set()}

    def tools(self) -> list[Tool]:
        return [Tool("netboot_machines", "List netbooted machines: the latest boot of each machine, its profile, "
                                         "node id and enrollment state (issued, joined, reported, left, collected).",
                     self._tool_machines, output_schema=_OUT_NETBOOT_MACHINES)]

    def _tool_machines(self, args: dict, caller) -> Any:
        try:
            return self.ctx.cluster.read("netboot.machines", {}, level="leader")
        except Exception as exc:
            raise ToolError(f"cannot read netboot enrollments: {exc}; check `cortex status`") from exc

    # --- the reconciler ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        interval = float(self.ctx.options["reconcile_interval"])
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if self.ctx.cluster.is_leader():
                    self.reconcile()
                else:
                    self._attempted.clear()
            except Exception as exc:
                self.ctx.log.warning("netboot reconcile failed", extra=fields(error=str(exc)))

    def reconcile(self) -> None:
        cluster = self.ctx.cluster
        now = time.time()
        enrollments = cluster.read("netboot.active", {"now": now}, level="leader")
        nodes = cluster.read("nodes", {}, level="leader")
        for action, args in reconcile_actions(enrollments, nodes, now, self._attempted):
            if action == "joined":
                self._attempted.add(args.pop("enrollment"))
                cluster.propose("netboot.joined", args)
            elif action == "left":
                cluster.propose("netboot.left", args)
                self.ctx.log.info("netboot node gone", extra=fields(node_id=args["node_id"], reason=args["reason"]))
            elif action == "remove":
                removed = cluster.remove_node(args["node_id"])
                self.ctx.log.info("netboot: ephemeral node garbage-collected from membership",
                                  extra=fields(node_id=args["node_id"], removed=removed))

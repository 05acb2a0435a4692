"""The cluster-tools plugin: the cluster itself as tools and resources (status, nodes, membership, leadership,
the key-value store, alerts), for an assistant over MCP and for `cortex tools call`.

Every tool runs on the node that receives the call. Reads that need the leader's knowledge (liveness, lag)
ask the leader; every change goes through `ClusterAPI.write` or a Cluster RPC run as if this node had received
it, so it is forwarded to the leader from any node, followers and workers alike, and retried with one
idempotency key across elections.
"""

from __future__ import annotations

import fnmatch
import threading
import time
import uuid
from typing import Any

from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex.builtin import alerts
from cortex.core import domain
from cortex.core.args import NODE_ID_PATTERN, READ_LEVELS
from cortex.plugins import Caller, Plugin, Resource, Tool, ToolError, returns, returns_list, write_with_retry

NODE_ID = {"type": "string", "pattern": NODE_ID_PATTERN, "description": "a node id, as list_nodes shows"}
LEVEL = {"enum": list(READ_LEVELS), "default": "leader",
         "description": "stale: this node's replica; leader: the leader's; linearizable: once the leader confirms it leads"}
KEY = {"idempotency_key": {"type": "string", "maxLength": 128,
                           "description": "retrying with the same key applies the change once"}}
OBJ = {"type": "object", "additionalProperties": False}
# What the tools answer (their MCP output schemas): the top-level shape a client may rely on.
NODE_ROW = returns({"id": "string", "role": "string", "liveness": "string", "leader": "boolean",
                    "grpc_address": "string", "raft_address": "string", "replication_lag": "integer",
                    "last_seen_age": "number", "replication": "string", "stuck_for": "number",
                    "joined_at": ["number", "null"], "liveness_since": ["number", "null"]})
ALERT = returns({"key": "string", "severity": "string"})
ALERTS = {"type": "array", "items": ALERT}
OUT_STATUS = returns({"cluster_id": "string", "connected_node": "string", "connected_node_state": "string",
                      "leader": "string", "leader_grpc_address": "string", "term": "integer",
                      "commit_index": "integer", "has_quorum": "boolean", "version": "string",
                      "nodes": {"type": "array", "items": NODE_ROW}})
OUT_HEALTH = returns({"status": {"enum": ["healthy", "degraded", "critical", "unavailable"]}, "leader": "string",
                      "has_quorum": "boolean", "nodes": "integer", "alive": "integer", "alerts": ALERTS,
                      "squelched": ALERTS, "checked_by": "string", "problem": "string"},
                     required=("status", "alerts", "squelched"))
OUT_NODE = returns({**NODE_ROW["properties"], "member": "boolean", "join_request": "object"},
                   required=("id", "member"))
OUT_DECISION = returns({"node_id": "string", "state": "string", "changed": "boolean", "error": "string"},
                       required=())
OUT_DRAIN = returns({"node_id": "string", "drain_deadline": ["number", "null"], "running": ["integer", "array"],
                     "drained": "boolean", "error": "string"}, required=())
OUT_KV_ROW = {"key": "string", "value": "string", "version": "integer", "create_index": "integer",
              "mod_index": "integer"}
# Draining belongs to the task engine (it stops assignments and moves work away); these are its commands.
DRAIN_COMMAND, UNDRAIN_COMMAND = "task.drain", "task.undrain"


def _schema(properties: dict | None = None, required: tuple[str, ...] = ()) -> dict:
    return {**OBJ, "properties": properties or {}, **({"required": list(required)} if required else {})}


def _proto_dict(message) -> dict:
    from google.protobuf.json_format import MessageToDict  # on a call: the agent loads this module idle

    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


# What each tool answers: its MCP output schema (structuredContent).
_OUT_LIST_NODES = returns_list(NODE_ROW["properties"])
_OUT_TRANSFER_LEADERSHIP = returns({"leader": "string", "term": "integer"})
_OUT_LIST_PLUGINS = returns(
    {
        "node_id": "string",
        "plugins": {
            "type": "array",
            "items": returns(
                {
                    "name": "string",
                    "state": "string",
                    "error": "string",
                    "origin": "string",
                    "tools": "integer",
                }
            ),
        },
    }
)
_OUT_RECENT_EVENTS = returns_list(
    {"type": "string", "data": "object", "ts": "number", "index": ["integer", "null"]}
)
_OUT_LIST_JOIN_REQUESTS = returns_list(
    {
        "node_id": "string",
        "role": "string",
        "grpc_address": "string",
        "raft_address": "string",
        "state": "string",
        "requested_at": "number",
        "decided_at": ["number", "null"],
    }
)
_OUT_REMOVE_NODE = returns({"node_id": "string", "removed": "boolean"})
_OUT_CREATE_JOIN_TOKEN = returns(
    {
        "token": "string",
        "token_id": "string",
        "expires_at": ["number", "null"],
        "role": "string",
        "uses": ["integer", "null"],
        "use": "string",
    }
)
_OUT_LIST_JOIN_TOKENS = returns_list(
    {
        "id": "string",
        "role": "string",
        "created_at": "number",
        "expires_at": ["number", "null"],
        "uses_left": ["integer", "null"],
        "revoked": "boolean",
    }
)
_OUT_REVOKE_JOIN_TOKEN = returns({"token_id": "string", "revoked": "boolean"})
_OUT_KV_GET = returns({**OUT_KV_ROW, "found": "boolean"}, required=("key", "found"))
_OUT_KV_PUT = returns({"key": "string", "version": "integer", "index": "integer"})
_OUT_KV_LIST = returns_list(OUT_KV_ROW)
_OUT_KV_DELETE = returns({"key": "string", "deleted": "boolean"})
_OUT_LIST_ALERTS = returns(
    {
        "alerts": ALERTS,
        "squelched": ALERTS,
        "squelches": {
            "type": "array",
            "items": returns(
                {
                    "id": "string",
                    "pattern": "string",
                    "reason": "string",
                    "by": "string",
                    "created_at": "number",
                    "until": "number",
                }
            ),
        },
    }
)
_OUT_SQUELCH_ALERTS = returns(
    {
        "id": "string",
        "pattern": "string",
        "until": "number",
        "now_squelched": {"type": "array", "items": {"type": "string"}},
    }
)
_OUT_UNSQUELCH_ALERTS = returns({"id": "string", "removed": "boolean"})


class ClusterToolsPlugin(Plugin):
    name = "cluster-tools"
    options_schema = {**OBJ, "properties": {
        "events_kept": {"type": "integer", "minimum": 10, "maximum": 10000, "default": 500}}}

    def init(self) -> None:
        self._clients: dict[str, Any] = {}
        self._clients_lock = threading.Lock()

    def stop(self) -> None:
        with self._clients_lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

    # --- helpers ---------------------------------------------------------------------------------------
    @property
    def cluster(self):
        return self.ctx.cluster

    def _guard(self, what: str, fn):
        try:
            return fn()
        except ToolError:
            raise
        except Exception as exc:
            code = getattr(getattr(exc, "code", None), "name", "")
            hint = {"UNAVAILABLE": "; the cluster may have no leader right now: check cluster_health and retry",
                    "FAILED_PRECONDITION": "; check cluster_status"}.get(code, "")
            raise ToolError(f"{what} failed: {exc}{hint}") from exc

    def _write(self, command_type: str, args: dict, call_args: dict) -> dict:
        return write_with_retry(self.cluster, command_type, args, call_args.get("idempotency_key") or uuid.uuid4().hex)

    def _read(self, query: str, args: dict | None = None, level: str = "leader") -> Any:
        return self._guard(f"reading {query}", lambda: self.cluster.read(query, args or {}, level))

    def _client(self, address: str):
        from cortex.client import Client

        with self._clients_lock:
            if address not in self._clients:
                self._clients[address] = Client(address, timeout=5)
            return self._clients[address]

    def leader_view(self) -> dict:
        """The cluster's status as the leader sees it (liveness and lag are the leader's knowledge)."""
        local = self._guard("cluster status", self.cluster.status)
        if local.get("state") == "leader" or not local.get("leader_grpc_address"):
            return local
        try:
            view = _proto_dict(self._client(local["leader_grpc_address"]).status())
        except Exception:
            return local  # the leader is unreachable from here: say what this node knows
        view["answered_by"] = view.get("node_id")
        return view

    def _nodes(self) -> list[dict]:
        view = self.leader_view()
        rows = {n["id"]: n for n in self._read("nodes")}
        out = []
        for n in view.get("nodes", []):
            row = rows.get(n["id"], {})
            out.append({"id": n["id"], "role": n.get("role", ""), "liveness": n.get("liveness", ""),
                        "leader": n["id"] == view.get("leader_id"), "grpc_address": n.get("grpc_address", ""),
                        "raft_address": n.get("raft_address", ""),
                        # int64 fields arrive as strings from protobuf's JSON mapping: numbers, as declared
                        "replication_lag": int(n.get("replication_lag", -1)),
                        "last_seen_age": float(n.get("last_seen_age", -1)), "replication": n.get("replication", ""),
                        "stuck_for": float(n.get("stuck_for", 0)), "joined_at": row.get("joined_at"),
                        "liveness_since": row.get("liveness_since")})
        return out

    # --- cluster ---------------------------------------------------------------------------------------
    def cluster_status(self, args: dict, caller: Caller) -> dict:
        local = self._guard("cluster status", self.cluster.status)
        view = self.leader_view()
        return {"cluster_id": local.get("cluster_id", ""), "connected_node": self.cluster.node_id,
                "connected_node_state": local.get("state", ""), "leader": view.get("leader_id", ""),
                "leader_grpc_address": view.get("leader_grpc_address", ""), "term": int(view.get("term", 0)),
                "commit_index": int(view.get("commit_index", 0)), "has_quorum": bool(view.get("has_quorum")),
                "version": local.get("version", ""), "nodes": self._nodes()}

    def _alerts(self) -> tuple[list[dict], list[dict], dict]:
        view = self.leader_view()
        found = alerts.active_alerts(view, self.ctx.host.status() if self.ctx.host else [], self.cluster.node_id)
        found += self._sentinel_alerts()
        squelches = self._read("alert.squelches", {"now": time.time()})
        shown, hidden = alerts.split_squelched(found, squelches)
        return shown, hidden, {"view": view, "squelches": squelches}

    def _sentinel_alerts(self) -> list[dict]:
        """The alerts the sentinel raised on each node (its published summaries), squelched like the rest."""
        from cortex.sentinel import records

        try:
            return records.alerts(records.read_all(lambda q, a: self.cluster.read(q, a, level="stale")), time.time())
        except Exception:
            return []  # no summaries readable: the cluster's own alerts still show

    def cluster_health(self, args: dict, caller: Caller) -> dict:
        try:
            shown, hidden, extra = self._alerts()
        except ToolError as exc:
            return {"status": "unavailable", "problem": str(exc), "alerts": [], "squelched": []}
        view = extra["view"]
        status = ("critical" if any(a["severity"] == "critical" for a in shown)
                  else "degraded" if shown else "healthy")
        nodes = view.get("nodes", [])
        return {"status": status, "leader": view.get("leader_id", ""), "has_quorum": bool(view.get("has_quorum")),
                "nodes": len(nodes), "alive": sum(1 for n in nodes if n.get("liveness") == "alive"),
                "alerts": shown, "squelched": hidden, "checked_by": self.cluster.node_id}

    def list_nodes(self, args: dict, caller: Caller) -> list[dict]:
        rows = self._nodes()
        return [n for n in rows if all(not args.get(k) or n[k] == args[k] for k in ("role", "liveness"))]

    def get_node(self, args: dict, caller: Caller) -> dict:
        node = next((n for n in self._nodes() if n["id"] == args["node_id"]), None)
        if node is None:
            pending = self._read("join_requests", {"node_id": args["node_id"]})
            if pending:
                return {"id": args["node_id"], "member": False, "join_request": pending[0]}
            raise ToolError(f"no node {args['node_id']!r} in the cluster; list_nodes shows the members")
        return {**node, "member": True}

    def transfer_leadership(self, args: dict, caller: Caller) -> dict:
        request = pb.TransferLeadershipRequest(target_node_id=args.get("node_id", ""))
        response = self._guard("transfer_leadership", lambda: self.cluster.rpc("TransferLeadership", request))
        return {"leader": response.new_leader_id, "term": response.term}

    def list_plugins(self, args: dict, caller: Caller) -> dict:
        return {"node_id": self.cluster.node_id, "plugins": self.ctx.host.status() if self.ctx.host else []}

    def recent_events(self, args: dict, caller: Caller) -> list[dict]:
        events = self.ctx.events.recent(args.get("pattern", "*"))[-args.get("limit", 50):]
        return [{"type": e.type, "data": e.data, "ts": e.ts, "index": e.index} for e in events]

    # --- membership ------------------------------------------------------------------------------------
    def list_join_requests(self, args: dict, caller: Caller) -> list[dict]:
        rows = self._read("join_requests", {})
        return [r for r in rows if not args.get("state") or r["state"] == args["state"]]

    def approve_node(self, args: dict, caller: Caller) -> dict:
        return self._write("node.approve", {"node_id": args["node_id"]}, args)

    def reject_node(self, args: dict, caller: Caller) -> dict:
        return self._write("node.reject", {"node_id": args["node_id"]}, args)

    def remove_node(self, args: dict, caller: Caller) -> dict:
        node_id = args["node_id"]
        if node_id == self.cluster.node_id:
            raise ToolError(f"{node_id} is the node this session is connected to; to take it out, run "
                            "`cortex leave` on it, or connect to another node and remove it from there")
        if not any(n["id"] == node_id for n in self._read("nodes")):
            raise ToolError(f"no node {node_id!r} in the cluster; list_nodes shows the members")
        response = self._guard("remove_node", lambda: self.cluster.rpc("Leave", pb.LeaveRequest(node_id=node_id)))
        return {"node_id": node_id, "removed": response.removed}

    def plan_remove_node(self, args: dict, caller: Caller) -> str:
        node = next((n for n in self._nodes() if n["id"] == args["node_id"]), None)
        if node is None:
            return f"remove node {args['node_id']} (not a member now: the call will say so and change nothing)"
        quorum = (" It is a server: the Raft configuration shrinks by one voter." if node["role"] == "server" else "")
        return (f"remove {node['role']} {node['id']} ({node['liveness']}, {node['grpc_address']}) from the cluster "
                f"for good; it must join again with a token to come back.{quorum}")

    def plan_kv_delete(self, args: dict, caller: Caller) -> str:
        row = self._read("kv.get", {"key": args["key"]})
        if row is None:
            return f"delete key {args['key']!r} (it does not exist now: nothing changes)"
        return f"delete key {args['key']!r} (version {row['version']}, {len(row['value'])} characters of value)"

    def _drain(self, command_type: str, args: dict) -> dict:
        if command_type not in domain.commands():
            raise ToolError(f"draining belongs to the task engine ({command_type} is not part of this cluster's "
                            "software); remove_node takes a node out for good")
        command = {"node_id": args["node_id"]}
        if command_type == DRAIN_COMMAND and "deadline_seconds" in args:
            command["deadline"] = args["deadline_seconds"]
        return self._write(command_type, command, args)

    def drain_node(self, args: dict, caller: Caller) -> dict:
        return self._drain(DRAIN_COMMAND, args)

    def undrain_node(self, args: dict, caller: Caller) -> dict:
        return self._drain(UNDRAIN_COMMAND, args)

    def create_join_token(self, args: dict, caller: Caller) -> dict:
        request = pb.CreateTokenRequest(role=args.get("role", "worker"), ttl_seconds=args.get("ttl_seconds", 3600),
                                        uses=args.get("uses", 1))
        response = self._guard("create_join_token", lambda: self.cluster.rpc("CreateToken", request))
        return {"token": response.token, "token_id": response.token_id, "expires_at": response.expires_at or None,
                "role": request.role, "uses": request.uses or None,
                "use": f"cortex join {self.cluster.grpc_address} --token {response.token}"}

    def list_join_tokens(self, args: dict, caller: Caller) -> list[dict]:
        rows = self._read("tokens", {})
        return [r for r in rows if args.get("include_revoked") or not r["revoked"]]

    def revoke_join_token(self, args: dict, caller: Caller) -> dict:
        request = pb.RevokeTokenRequest(token_id=args["token_id"])
        self._guard("revoke_join_token", lambda: self.cluster.rpc("RevokeToken", request))
        return {"token_id": args["token_id"], "revoked": True}

    # --- key-value store ---------------------------------------------------------------------------------
    def kv_get(self, args: dict, caller: Caller) -> dict:
        row = self._read("kv.get", {"key": args["key"]}, args.get("level", "leader"))
        return {"key": args["key"], "found": row is not None, **(row or {})}

    def kv_put(self, args: dict, caller: Caller) -> dict:
        return self._write("kv.put", {"key": args["key"], "value": args["value"]}, args)

    def kv_list(self, args: dict, caller: Caller) -> list[dict]:
        return self._read("kv.list", {"prefix": args.get("prefix", ""), "limit": args.get("limit", 100)},
                          args.get("level", "leader"))

    def kv_delete(self, args: dict, caller: Caller) -> dict:
        return self._write("kv.delete", {"key": args["key"]}, args)

    # --- alerts -------------------------------------------------------------------------------------------
    def list_alerts(self, args: dict, caller: Caller) -> dict:
        shown, hidden, extra = self._alerts()
        return {"alerts": shown, "squelched": hidden, "squelches": extra["squelches"]}

    def squelch_alerts(self, args: dict, caller: Caller) -> dict:
        seconds = args.get("minutes", 60) * 60
        result = self._write("alert.squelch", {"pattern": args["pattern"], "seconds": seconds,
                                               "reason": args.get("reason", ""), "by": caller.identity[:200]}, args)
        current = [a["key"] for a in self._alerts()[1] if fnmatch.fnmatchcase(a["key"], args["pattern"])]
        return {**result, "now_squelched": current}

    def unsquelch_alerts(self, args: dict, caller: Caller) -> dict:
        result = self._write("alert.unsquelch", {"id": args["squelch_id"]}, args)
        if not result.get("removed"):
            raise ToolError(f"no squelch {args['squelch_id']!r}; list_alerts shows the squelches and their ids")
        return result

    # --- registration ----------------------------------------------------------------------------------
    def tools(self) -> list[Tool]:
        node = {"node_id": NODE_ID}
        write = {"role": "operator", "read_only": False}
        admin = {"role": "admin", "read_only": False}
        return [
            Tool("cluster_status", "Cluster overview: leader, term, commit index, quorum, and every node with role, "
                 "liveness and replication lag (as the leader sees them).", self.cluster_status, _schema(),
                 toolset="cluster", output_schema=OUT_STATUS),
            Tool("cluster_health", "One-word health (healthy, degraded, critical, unavailable) with the alerts that "
                 "explain it: no quorum, suspect or offline nodes, lagging servers, failed plugins.",
                 self.cluster_health, _schema(), toolset="cluster", output_schema=OUT_HEALTH),
            Tool("list_nodes", "Members of the cluster with role, liveness, lag and addresses; filter by role or "
                 "liveness.", self.list_nodes,
                 _schema({"role": {"enum": ["server", "worker"]},
                          "liveness": {"enum": ["alive", "suspect", "offline"]}}), toolset="cluster",
                 output_schema=_OUT_LIST_NODES),
            Tool("get_node", "One node's details (or its pending join request).", self.get_node,
                 _schema(node, ("node_id",)), toolset="cluster", output_schema=OUT_NODE),
            Tool("transfer_leadership", "Hand Raft leadership to another server (node_id), or to any up-to-date "
                 "server when omitted; writes pause for well under a second.", self.transfer_leadership,
                 _schema(node), toolset="cluster", idempotent=False, **write,
                 output_schema=_OUT_TRANSFER_LEADERSHIP),
            Tool("list_plugins", "Plugins on the node this session is connected to: state, error, tool count.",
                 self.list_plugins, _schema(), toolset="cluster", output_schema=_OUT_LIST_PLUGINS),
            Tool("recent_events", "Recent events seen by this node (node.*, leader.changed, plugin.failed, "
                 "message.received, ...), oldest first.", self.recent_events,
                 _schema({"pattern": {"type": "string", "maxLength": 100, "default": "*",
                                      "description": "glob over event types, e.g. node.*"},
                          "limit": {"type": "integer", "minimum": 1, "maximum": 256}}), toolset="cluster",
                 output_schema=_OUT_RECENT_EVENTS),
            Tool("list_join_requests", "Join requests from nodes that asked without a token (pending, approved, "
                 "rejected).", self.list_join_requests,
                 _schema({"state": {"enum": ["pending", "approved", "rejected"]}}), toolset="membership",
                 output_schema=_OUT_LIST_JOIN_REQUESTS),
            Tool("approve_node", "Admit a node whose join request is pending; it joins by itself within seconds.",
                 self.approve_node, _schema({**node, **KEY}, ("node_id",)), toolset="membership", **admin,
                 output_schema=OUT_DECISION),
            Tool("reject_node", "Refuse a pending join request.", self.reject_node,
                 _schema({**node, **KEY}, ("node_id",)), toolset="membership", **admin,
                 output_schema=OUT_DECISION),
            Tool("remove_node", "Remove a node from the cluster for good (a server also leaves the Raft "
                 "configuration); it must join again to come back.", self.remove_node,
                 _schema(node, ("node_id",)), toolset="membership", destructive=True, **admin,
                 output_schema=_OUT_REMOVE_NODE, plan=self.plan_remove_node),
            Tool("drain_node", "Stop new work landing on a node and move its tasks elsewhere (optionally after a "
                 "deadline); the node stays a member.", self.drain_node,
                 _schema({**node, "deadline_seconds": {"type": "number", "minimum": 0, "maximum": 86400}, **KEY},
                         ("node_id",)), toolset="membership", **write, output_schema=OUT_DRAIN),
            Tool("undrain_node", "Let a drained node take work again.", self.undrain_node,
                 _schema({**node, **KEY}, ("node_id",)), toolset="membership", **write,
                 output_schema=OUT_DRAIN),
            Tool("create_join_token", "Create a join token (shown once) admitting nodes up to a role, expiring "
                 "after ttl_seconds, for a number of uses.", self.create_join_token,
                 _schema({"role": {"enum": ["worker", "server"], "default": "worker"},
                          "ttl_seconds": {"type": "number", "minimum": 60, "maximum": 30 * 86400, "default": 3600},
                          "uses": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 1,
                                   "description": "0: unlimited"}}),
                 toolset="membership", idempotent=False, **admin, output_schema=_OUT_CREATE_JOIN_TOKEN),
            Tool("list_join_tokens", "Join tokens by id (never the secrets): role, expiry, uses left.",
                 self.list_join_tokens, _schema({"include_revoked": {"type": "boolean"}}), toolset="membership",
                 output_schema=_OUT_LIST_JOIN_TOKENS),
            Tool("revoke_join_token", "Revoke a join token by id (list_join_tokens shows them).",
                 self.revoke_join_token,
                 _schema({"token_id": {"type": "string", "pattern": "^[0-9a-f]{8,64}$"}}, ("token_id",)),
                 toolset="membership", **admin, output_schema=_OUT_REVOKE_JOIN_TOKEN),
            Tool("kv_get", "Read a key of the cluster's replicated key-value store.", self.kv_get,
                 _schema({"key": {"type": "string", "minLength": 1, "maxLength": 512}, "level": LEVEL}, ("key",)),
                 toolset="kv", output_schema=_OUT_KV_GET),
            Tool("kv_put", "Set a key in the replicated key-value store (forwarded to the leader).", self.kv_put,
                 _schema({"key": {"type": "string", "minLength": 1, "maxLength": 512},
                          "value": {"type": "string", "maxLength": 1024 * 1024}, **KEY}, ("key", "value")),
                 toolset="kv", **write, output_schema=_OUT_KV_PUT),
            Tool("kv_list", "List keys (with values) by prefix, in key order.", self.kv_list,
                 _schema({"prefix": {"type": "string", "maxLength": 512},
                          "limit": {"type": "integer", "minimum": 1, "maximum": 10000}, "level": LEVEL}),
                 toolset="kv", output_schema=_OUT_KV_LIST),
            Tool("kv_delete", "Delete a key from the replicated key-value store.", self.kv_delete,
                 _schema({"key": {"type": "string", "minLength": 1, "maxLength": 512}, **KEY}, ("key",)),
                 toolset="kv", destructive=True, **write,
                 output_schema=_OUT_KV_DELETE, plan=self.plan_kv_delete),
            Tool("list_alerts", "Current alerts (computed from the cluster's state) and the squelches hiding some.",
                 self.list_alerts, _schema(), toolset="alerts", output_schema=_OUT_LIST_ALERTS),
            Tool("squelch_alerts", "Silence alerts whose key matches a glob (node.offline:w1, node.*) for some "
                 "minutes, cluster-wide, e.g. during maintenance.", self.squelch_alerts,
                 _schema({"pattern": {"type": "string", "minLength": 1, "maxLength": 200},
                          "minutes": {"type": "number", "exclusiveMinimum": 0, "maximum": 43200, "default": 60},
                          "reason": {"type": "string", "maxLength": 500}, **KEY}, ("pattern",)),
                 toolset="alerts", idempotent=False, **write, output_schema=_OUT_SQUELCH_ALERTS),
            Tool("unsquelch_alerts", "End a squelch early by its id (list_alerts shows them).",
                 self.unsquelch_alerts, _schema({"squelch_id": {"type": "string", "minLength": 1, "maxLength": 64},
                                                 **KEY}, ("squelch_id",)), toolset="alerts", **write,
                 output_schema=_OUT_UNSQUELCH_ALERTS),
        ]

    def resources(self) -> list[Resource]:
        return [
            Resource("cluster://state", "state", "Cluster status, health and replicated-state summary",
                     lambda: {**self.cluster_status({}, Caller()), "health": self.cluster_health({}, Caller()),
                              "replicated": self._read("cluster", {})}),
            Resource("cluster://nodes", "nodes", "Every node with role, liveness and lag",
                     lambda: self.list_nodes({}, Caller())),
        ]

"""The access plugin: the cluster's plugin policies and its audit log as tools (the `access` domain,
plugins/access.py; enforcement in plugins/audit.py)."""

from __future__ import annotations

import uuid

from cortex.plugins import Caller, Plugin, Tool, ToolError, returns, returns_list, write_with_retry
from cortex.plugins.access import AUDIT_COLUMNS, CALLER_ROLES, MAX_CALLERS, PLUGIN_RE

RULE = {"type": ["object", "null"], "additionalProperties": False,
        "description": "who may pass: caller roles and/or named callers (a certificate's identity such as "
                       "grpc:admin:n1, admin-socket, mcp-http-token); null: the tools' own roles",
        "properties": {"roles": {"type": "array", "items": {"enum": list(CALLER_ROLES)}, "maxItems": 3},
                       "callers": {"type": "array", "maxItems": MAX_CALLERS,
                                   "items": {"type": "string", "minLength": 1, "maxLength": 200}}}}
RULE_OUT = {"type": ["object", "null"]}
KEY = {"type": "string", "maxLength": 128, "description": "retrying with the same key applies the change once"}
PLUGIN = {"type": "string", "pattern": PLUGIN_RE.pattern, "description": "a plugin's name (list_plugins)"}
POLICY = {"plugin": "string", "read": RULE_OUT, "change": RULE_OUT, "updated_at": "number", "updated_by": "string"}
AUDIT_ROW = {"seq": "integer", "log_index": "integer", "ts": "number", "kind": {"enum": ["tool", "policy"]},
             "node": "string", "caller": "string", "role": "string", "tool": "string", "plugin": "string",
             "digest": "string", "outcome": "string", "detail": "string"}
assert set(AUDIT_ROW) == set(AUDIT_COLUMNS)


class AccessPlugin(Plugin):
    name = "access"
    description = "plugin policies and the audit log of tool calls that change state"

    def _read(self, query: str, args: dict):
        try:
            return self.ctx.cluster.read(query, args, level="leader")
        except Exception as exc:
            raise ToolError(f"reading {query} failed: {exc}; check cluster_health and retry") from exc

    def audit_log(self, args: dict, caller: Caller) -> list[dict]:
        return self._read("access.log", {k: v for k, v in args.items() if v not in (None, "")})

    def policies(self, args: dict, caller: Caller) -> dict:
        installed = sorted(self.ctx.host.plugins) if self.ctx.host else []
        return {"policies": self._read("access.policies", {}), "plugins": installed,
                "default": "a plugin without a policy keeps the roles its tools declare"}

    def set_policy(self, args: dict, caller: Caller) -> dict:
        if "read" not in args and "change" not in args:
            raise ToolError("give a read or a change rule; clear_plugin_policy goes back to the defaults")
        command = {"plugin": args["plugin"], "read": args.get("read"), "change": args.get("change"),
                   "by": caller.identity[:200]}
        return write_with_retry(self.ctx.cluster, "access.policy_set", command,
                                args.get("idempotency_key") or uuid.uuid4().hex)

    def clear_policy(self, args: dict, caller: Caller) -> dict:
        return write_with_retry(self.ctx.cluster, "access.policy_clear",
                                {"plugin": args["plugin"], "by": caller.identity[:200]},
                                args.get("idempotency_key") or uuid.uuid4().hex)

    def tools(self) -> list[Tool]:
        obj = {"type": "object", "additionalProperties": False}
        return [
            Tool("audit_log", "The cluster's audit log, newest first: every call of a tool that changes state "
                 "(caller, role, tool, plugin, argument digest, outcome) and every policy change.", self.audit_log,
                 {**obj, "properties": {"tool": {"type": "string", "maxLength": 128},
                                        "caller": {"type": "string", "maxLength": 200}, "plugin": PLUGIN,
                                        "kind": {"enum": ["tool", "policy"]},
                                        "outcome": {"enum": ["ok", "error", "refused"]},
                                        "limit": {"type": "integer", "minimum": 1, "maximum": 10000}}},
                 role="operator", output_schema=returns_list(AUDIT_ROW)),
            Tool("plugin_policies", "Who may read and change through each plugin's tools (cluster-wide); plugins "
                 "without a policy keep their tools' own roles.", self.policies, obj,
                 output_schema=returns({"policies": {"type": "array", "items": returns(POLICY)},
                                        "plugins": "array", "default": "string"})),
            Tool("set_plugin_policy", "Set which roles and named callers may read (read-only tools) and change "
                 "(the others) through one plugin's tools, cluster-wide. A policy narrows the tools' own roles, "
                 "never widens them.", self.set_policy,
                 {**obj, "required": ["plugin"], "properties": {"plugin": PLUGIN, "read": RULE, "change": RULE,
                                                                "idempotency_key": KEY}},
                 role="admin", read_only=False,
                 output_schema=returns({"plugin": "string", "read": RULE_OUT, "change": RULE_OUT,
                                        "changed": "boolean"})),
            Tool("clear_plugin_policy", "Remove a plugin's policy: its tools' own roles apply again.",
                 self.clear_policy, {**obj, "required": ["plugin"], "properties": {"plugin": PLUGIN,
                                                                                   "idempotency_key": KEY}},
                 role="admin", read_only=False,
                 output_schema=returns({"plugin": "string", "cleared": "boolean"})),
        ]

"""The services plugin's operations as tools (MCP). Mutating tools take an optional `idempotency_key`, so a
model that retries after a timeout does not deploy, move or remove twice."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cortex.core.args import CommandError
from cortex.plugins import Caller, Tool, ToolError, returns, returns_list
from cortex.services import api

if TYPE_CHECKING:
    from cortex.services.plugin import ServicesPlugin

_KEY = {"type": "string", "maxLength": 128,
        "description": "optional; a retry with the same key returns the first result instead of acting twice"}
_NAME = {"type": "object", "required": ["name"], "additionalProperties": False,
         "properties": {"name": {"type": "string", "maxLength": 63}, "idempotency_key": _KEY}}
_NODE = {"type": "object", "required": ["node"], "additionalProperties": False,
         "properties": {"node": {"type": "string", "maxLength": 128},
                        "wait": {"type": "number", "minimum": 0, "maximum": 600,
                                 "description": "seconds to wait until the moved services are healthy (0: do not)"},
                        "idempotency_key": _KEY}}
_NONE = {"type": "object", "properties": {}, "additionalProperties": False}

# What each tool answers (MCP outputSchema); a refused write answers {"error": ...} instead, so beyond a
# listing's fields nothing is required.
_ERROR = {"error": "string"}
_OUT_DEPLOY = returns({"name": "string", "created": "boolean", "updated": "boolean", "unchanged": "boolean",
                       "holder": "string", "epoch": "integer", **_ERROR}, required=())
_OUT_LIST = returns_list({"name": "string", "kind": "string", "home": "string", "holder": "string",
                          "epoch": "integer", "ha": "string", "run": "string", "healthy": "boolean",
                          "restarts": "integer", "ports": "string", "detail": "string",
                          "lag_s": ["number", "null"], "lag_node": "string", "sync": "string"},
                         required=("name", "holder"))
_OUT_SHOW = returns({"name": "string", "spec": "object", "home": "string", "holder": "string", "epoch": "integer",
                     "state": "string", "reports": "array"}, required=("name", "spec", "holder", "epoch"))
_OUT_LOGS = returns({"chunks": "array", "next_after": "integer"})
_OUT_RESTART = returns({"name": "string", "restarted": "boolean", **_ERROR}, required=())
_OUT_REMOVE = returns({"name": "string", "removed": "boolean", **_ERROR}, required=())
_OUT_HA_STATUS = returns({"services": "array", "nodes": ["array", "object"]})
_OUT_MOVE = returns({"node": "string", "moved": "array", "refused": "array", **_ERROR}, required=())


def service_tools(plugin: ServicesPlugin) -> list[Tool]:
    cluster = plugin.ctx.cluster

    def call(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (CommandError, api.ServiceError) as exc:
            raise ToolError(str(exc)) from None
        except ToolError:
            raise
        except Exception as exc:  # a refused write (unknown node, port clash) says what to fix
            details = getattr(exc, "details", None)
            raise ToolError(str(details() if callable(details) else details or exc)) from None

    def deploy(args: dict, caller: Caller) -> dict:
        return call(api.deploy, cluster, args["spec"], key=args.get("idempotency_key"))

    def listing(args: dict, caller: Caller) -> list[dict]:
        return [api.summary(r) for r in call(api.listing, cluster)]

    def show(args: dict, caller: Caller) -> dict:
        row = call(api.get, cluster, args["name"])
        return {**row, **api.lag(row)}

    def logs(args: dict, caller: Caller) -> dict:
        chunks = call(api.logs, cluster, args["name"], after=args.get("after", 0))
        return {"chunks": chunks, "next_after": chunks[-1]["seq"] if chunks else args.get("after", 0)}

    def restart(args: dict, caller: Caller) -> dict:
        return call(api.restart, cluster, args["name"], key=args.get("idempotency_key"))

    def remove(args: dict, caller: Caller) -> dict:
        return call(api.remove, cluster, args["name"], key=args.get("idempotency_key"))

    def ha_status(args: dict, caller: Caller) -> dict:
        return call(api.ha_status, cluster)

    def takeover(args: dict, caller: Caller) -> dict:
        return call(api.takeover, cluster, args["node"], wait=args.get("wait", 30), key=args.get("idempotency_key"))

    def giveback(args: dict, caller: Caller) -> dict:
        return call(api.giveback, cluster, args["node"], wait=args.get("wait", 30), key=args.get("idempotency_key"))

    def remove_plan(args: dict, caller: Caller) -> str:
        row = cluster.read("service.get", {"name": args["name"]}, level="leader")
        if row is None:
            return f"remove service {args['name']} (no such service now: nothing changes)"
        return (f"stop service {row['name']} on {row['holder']} (epoch {row['epoch']}) and forget it everywhere; "
                f"its volume stays on disk")

    def _moves(node: str, giving_back: bool) -> list[str]:
        rows = cluster.read("service.list", {}, level="leader")
        if giving_back:
            return [f"{r['name']} ({r['holder']} -> {r['home']})" for r in rows if r["home"] == node
                    and r["holder"] != node]
        return [f"{r['name']} ({node} -> {', '.join(r['candidates']) or 'no partner'})" for r in rows
                if r["holder"] == node]

    def takeover_plan(args: dict, caller: Caller) -> str:
        moves = _moves(args["node"], giving_back=False)
        return (f"planned takeover of {args['node']}: stop and move " + ", ".join(moves) + " (a short outage each)"
                if moves else f"{args['node']} holds no service: nothing moves")

    def giveback_plan(args: dict, caller: Caller) -> str:
        moves = _moves(args["node"], giving_back=True)
        return (f"give back to {args['node']}: sync back, stop on the partner, start at home: " + ", ".join(moves)
                if moves else f"no service of {args['node']} runs elsewhere: nothing moves")

    logs_schema = {"type": "object", "required": ["name"], "additionalProperties": False,
                   "properties": {"name": {"type": "string", "maxLength": 63},
                                  "after": {"type": "integer", "minimum": 0, "description": "chunks after this seq"}}}
    return [
        Tool("services_deploy", "Deploy or update a long-running service from a spec: {name, kind: shell|container, "
             "command|image, ports, env, resources, health: {http|tcp|exec, interval, threshold}, restart, volume, "
             "vip, placement: {home, partner|partners}, auto_giveback, giveback_after, replicate_interval}. A bad spec deploys nothing "
             "and the error says what to fix.", deploy,
             {"type": "object", "required": ["spec"], "additionalProperties": False,
              "properties": {"spec": {"type": "object"}, "idempotency_key": _KEY}},
             role="operator", read_only=False, idempotent=True, toolset="services", output_schema=_OUT_DEPLOY),
        Tool("services_list", "Services: where each runs (holder, epoch), its HA state, health, restarts and volume lag "
             "(lag_s: the age of the freshest copy on another node, what an unplanned takeover would lose).", listing,
             _NONE, toolset="services", output_schema=_OUT_LIST),
        Tool("services_show", "One service in full: spec, holder, epoch, HA state, every node's report (with the age of "
             "its volume copy), the volume lag.", show,
             {"type": "object", "required": ["name"], "additionalProperties": False,
              "properties": {"name": {"type": "string", "maxLength": 63}}}, toolset="services",
             output_schema=_OUT_SHOW),
        Tool("services_logs", "A service's output (the newest 256 KiB), page by page with `after`.", logs,
             logs_schema, toolset="services", output_schema=_OUT_LOGS),
        Tool("services_restart", "Restart a service where it runs.", restart, _NAME, role="operator",
             read_only=False, idempotent=False, toolset="services", output_schema=_OUT_RESTART),
        Tool("services_remove", "Stop a service everywhere and forget it (its volume stays on disk).", remove, _NAME,
             role="operator", read_only=False, destructive=True, toolset="services",
             output_schema=_OUT_REMOVE, plan=remove_plan),
        Tool("ha_status", "HA pairs: which node holds each service, takeovers, givebacks, the last move's downtime, "
             "the volume lag and why a service is where it is.", ha_status, _NONE, toolset="services",
             output_schema=_OUT_HA_STATUS),
        Tool("ha_takeover", "Planned takeover: move every service a node holds to its first ready partner (final "
             "volume sync, stop there, start on the partner); says which could not move and why.", takeover, _NODE,
             role="operator", read_only=False, destructive=True, idempotent=True, toolset="services",
             output_schema=_OUT_MOVE, plan=takeover_plan),
        Tool("ha_giveback", "Give a node's own services back to it from their partners (sync back first); refusals "
             "say why and leave the service running on the partner.", giveback, _NODE, role="operator",
             read_only=False, destructive=True, idempotent=True, toolset="services",
             output_schema=_OUT_MOVE, plan=giveback_plan),
    ]

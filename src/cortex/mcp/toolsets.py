"""Which tools an MCP client sees: profiles, toolsets and the node's policy (pure functions, no I/O).

A model works best with a short tool list, and a node's owner decides what an assistant may do there:

- a *profile* says how far a session may go: `read-only` (the default: only tools that change nothing),
  `operator` (also tools that change state but destroy nothing), `admin` (also destructive tools);
- destructive tools are offered only where the node's config says so (`plugins.mcp.allow_destructive`),
  whatever profile a client asks for;
- tools come in *toolsets* (a plugin's name unless the tool names one); a session loads the toolsets it asks
  for, or by default as many as fit in `max_tools` (40), in priority order, so a client never starts with
  more tools than it can use well;
- a node (or a `cortex mcp --read-only` server) may serve read-only tools only: every other tool is hidden
  and refused, whatever the profile;
- destructive tools are confirmed by the user through MCP elicitation where the client can ask
  (`confirm_destructive: elicit`); `require` refuses them to clients that cannot;
- the caller's role (reader < operator < admin) still bounds every call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cortex.plugins import CALLER_ROLES

PROFILES = ("read-only", "operator", "admin")
DEFAULT_MAX_TOOLS = 40
# Default loading order: what an assistant needs first. Unknown toolsets follow, alphabetically. The key-value
# store comes right after the cluster's own tools: it is small, and the first thing the README has a session do.
PRIORITY = ("cluster", "kv", "tasks", "workflows", "messaging", "skills", "memory", "kubernetes", "alerts",
            "membership", "updater")


@dataclass(frozen=True)
class ToolSpec:
    """A tool as the MCP front end knows it (from the local plugin host or over gRPC)."""

    name: str
    description: str
    input_schema: dict
    role: str = "reader"
    read_only: bool = True
    destructive: bool = False
    idempotent: bool = True
    toolset: str = ""
    plugin: str = ""
    output_schema: dict | None = None  # None: any object


@dataclass(frozen=True)
class Policy:
    """The node's say (the `mcp` plugin's options)."""

    default_profile: str = "read-only"
    allow_destructive: bool = False
    default_toolsets: tuple[str, ...] = ()
    max_tools: int = DEFAULT_MAX_TOOLS
    node_id: str = ""
    read_only: bool = False
    confirm_destructive: str = "elicit"  # elicit: ask clients that can; require: refuse those that cannot

    @staticmethod
    def from_options(options: dict | None, node_id: str = "") -> Policy:
        options = options or {}
        return Policy(default_profile=options.get("default_profile", "read-only"),
                      allow_destructive=bool(options.get("allow_destructive", False)),
                      default_toolsets=tuple(options.get("toolsets") or ()),
                      max_tools=int(options.get("max_tools", DEFAULT_MAX_TOOLS)), node_id=node_id,
                      read_only=bool(options.get("read_only", False)),
                      confirm_destructive=options.get("confirm_destructive", "elicit"))


@dataclass(frozen=True)
class View:
    """What one MCP session asked for."""

    caller_role: str = "operator"
    profile: str = ""  # "" = the node's default profile
    toolsets: tuple[str, ...] = ()  # () = the node's default toolsets; ("all",) = every toolset
    caller_identity: str = "local"  # who (the HTTP token's name); stdio callers are named by the agent


@dataclass
class Selection:
    visible: list[ToolSpec] = field(default_factory=list)
    hidden: dict[str, str] = field(default_factory=dict)  # tool name -> why the session does not see it
    loaded_toolsets: list[str] = field(default_factory=list)
    skipped_toolsets: list[str] = field(default_factory=list)  # left out to stay within max_tools
    profile: str = "read-only"
    notice: str = ""  # the session asked for more than its credential allows: said once, at the start


def capped_notice(profile: str, caller_role: str) -> str:
    """'' unless the profile asks for more than the caller's role grants (admin tools stay hidden then)."""
    if profile != "admin" or caller_role == "admin":
        return ""
    return (f"the 'admin' profile was asked for, but this connection's credential has the {caller_role!r} role, "
            "so tools that need 'admin' stay hidden; for them connect through the node's admin socket "
            "(cortex mcp --via socket, on the node) or give the credential the admin role "
            "(plugins.mcp.grpc_role for --addr, plugins.mcp.http_role for the HTTP token)")


def toolset_order(names: set[str]) -> list[str]:
    known = [n for n in PRIORITY if n in names]
    return known + sorted(names - set(known))


def _why_not(tool: ToolSpec, profile: str, policy: Policy, caller_role: str) -> str:
    """'' when the session may use the tool, else an instruction saying how it could."""
    where = f"node {policy.node_id}" if policy.node_id else "this node"
    if policy.read_only and not tool.read_only:
        return (f"{tool.name} changes state and {where} serves read-only tools only (plugins.mcp.read_only, or "
                "`cortex mcp --read-only`)")
    if CALLER_ROLES.index(caller_role) < CALLER_ROLES.index(tool.role):
        return f"{tool.name} needs the {tool.role!r} role and this connection has {caller_role!r}"
    if tool.destructive and not policy.allow_destructive:
        return (f"{tool.name} is destructive and {where} does not offer destructive tools; its owner can set "
                "plugins.mcp.allow_destructive: true in its config")
    if tool.destructive and profile != "admin":
        return f"{tool.name} is destructive: connect with the 'admin' profile (this session is {profile!r})"
    if not tool.read_only and profile == "read-only":
        return (f"{tool.name} changes state and this session is read-only: connect with the 'operator' profile "
                "(cortex mcp --profile operator, or ?profile=operator on the HTTP URL)")
    return ""


def select(tools: list[ToolSpec], view: View, policy: Policy) -> Selection:
    profile = view.profile or policy.default_profile
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; use one of {', '.join(PROFILES)}")
    out = Selection(profile=profile, notice=capped_notice(profile, view.caller_role))
    allowed = []
    for tool in tools:
        reason = _why_not(tool, profile, policy, view.caller_role)
        if reason:
            out.hidden[tool.name] = reason
        else:
            allowed.append(tool)
    by_set: dict[str, list[ToolSpec]] = {}
    for tool in allowed:
        by_set.setdefault(tool.toolset or tool.plugin, []).append(tool)
    requested = view.toolsets or policy.default_toolsets
    if requested and requested != ("all",):
        unknown = [t for t in requested if t not in {x.toolset or x.plugin for x in tools}]
        if unknown:
            raise ValueError(f"unknown toolset(s) {', '.join(unknown)}; available: "
                             f"{', '.join(toolset_order({x.toolset or x.plugin for x in tools}))}")
        chosen, cap = [t for t in requested if t in by_set], None
    else:
        chosen, cap = toolset_order(set(by_set)), None if requested == ("all",) else policy.max_tools
    for name in chosen:
        batch = by_set[name]
        if cap is not None and len(out.visible) + len(batch) > cap:
            out.skipped_toolsets.append(name)
            continue
        out.visible.extend(batch)
        out.loaded_toolsets.append(name)
    for name, batch in by_set.items():
        if name not in out.loaded_toolsets:
            why = (f"toolset {name!r} is not loaded in this session (tool limit {cap})" if name in out.skipped_toolsets
                   else f"toolset {name!r} is not loaded in this session")
            for tool in batch:
                out.hidden[tool.name] = why + f"; ask for it with --toolsets {name} or ?toolsets={name}"
    return out


def annotations(tool: ToolSpec) -> dict:
    """MCP tool annotations (hints a client shows or acts on)."""
    return {"readOnlyHint": tool.read_only, "destructiveHint": tool.destructive,
            "idempotentHint": tool.idempotent, "openWorldHint": False}

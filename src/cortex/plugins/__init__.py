"""Plugins: everything a node runs beyond the core, discovered through the entry-point group `cortex.plugins`.

Two files, by who reads them:

- api.py is the whole surface a plugin author needs, hooks in one place (in the manner of Datasette's and
  pluggy's hook specifications): the cluster API a plugin calls (`ClusterAPI`), what it is given
  (`PluginContext`), what it returns (`Tool`, `Resource`, `Placement`) and the `Plugin` base class listing
  every hook it may define. A capability a node may lack is part of that contract (`read_local` fails with
  a declared status on a node without a replica), so plugins never probe the bridge with hasattr.
- host.py is the node's side: discovery, option validation, lifecycle, event delivery, tool calls.

Replicated state is not a plugin's business: built-in subsystems add tables through state domains
(core/domain.py), which every replica has regardless of which plugins a node enables.

The names below are what the rest of Cortex and third-party plugins import from `cortex.plugins`.
"""

from cortex.plugins.api import (
    CALLER_ROLES,
    MAX_TOOL_ARGUMENT_BYTES,
    Caller,
    ClusterAPI,
    Placement,
    Plugin,
    PluginConfigError,
    PluginContext,
    Resource,
    Tool,
    ToolError,
    returns,
    returns_list,
    structured,
    write_with_retry,
)

# The host is the node's side and brings jsonschema with it: loaded when first named, so a plugin's CLI
# module (imported by every `cortex` command) does not pay for it.
_FROM_HOST = ("PluginHost", "check_config", "discover")


def __getattr__(name: str):
    if name in _FROM_HOST:
        from cortex.plugins import host

        return getattr(host, name)
    raise AttributeError(f"module 'cortex.plugins' has no attribute {name!r}")

__all__ = ["CALLER_ROLES", "MAX_TOOL_ARGUMENT_BYTES", "Caller", "ClusterAPI", "Placement", "Plugin",
           "PluginConfigError", "PluginContext", "PluginHost", "Resource", "Tool", "ToolError", "check_config",
           "discover", "returns", "returns_list", "structured", "write_with_retry"]

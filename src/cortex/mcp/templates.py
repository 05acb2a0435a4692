"""MCP resource templates: one node, task, workflow, key, skill or message as a resource (pure, no I/O).

Each template reads through the read-only tool that already answers the same question (`get_node`,
`tasks_get`, `kv_get`, ...), so a templated read sees exactly what the tool shows, with the same role checks
and error messages, on stdio and HTTP alike, and needs no RPC of its own. A template is offered only while
its tool is served (the task engine's templates vanish with the engine).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote


@dataclass(frozen=True)
class Template:
    prefix: str  # "cluster://tasks/"; what follows it is the one variable
    variable: str
    tool: str
    name: str
    description: str

    @property
    def uri_template(self) -> str:
        return f"{self.prefix}{{{self.variable}}}"


TEMPLATES = (
    Template("cluster://nodes/", "node_id", "get_node", "node",
             "One node: role, liveness, addresses, lag (or its pending join request)"),
    Template("cluster://tasks/", "task_id", "tasks_get", "task",
             "One task: state, attempts, result, error and the last 16 KiB of its output"),
    Template("cluster://workflows/", "workflow_id", "workflows_get", "workflow",
             "One workflow run: state and each step's state, tasks and results"),
    Template("cluster://kv/", "key", "kv_get", "kv key",
             "One key of the replicated key-value store (a key with '/' may be written as is or as %2F)"),
    Template("cluster://skills/", "name", "get_skill", "skill",
             "One skill of this node: instructions, metadata and its files"),
    Template("cluster://messages/", "id", "get_message", "message",
             "One message, body in full (reading it does not mark it read)"),
)


def offered(tool_names: set[str]) -> list[Template]:
    """The templates whose tool this node serves."""
    return [t for t in TEMPLATES if t.tool in tool_names]


def match(uri: str) -> tuple[Template, dict] | None:
    """(template, tool arguments) for a URI some template produces, or None."""
    for template in TEMPLATES:
        if uri.startswith(template.prefix):
            value = unquote(uri[len(template.prefix):])
            if value:
                return template, {template.variable: value}
    return None

"""What a plugin sees and may define, in one file: the cluster it talks to, what it is given, every hook.

Hooks a plugin may define (all optional; `Plugin` below has the defaults):

- `options_schema` (class attribute): the JSON schema of its section in the node's YAML;
- `init()`, `start()`, `stop()`: lifecycle;
- `tools()`: operations with a JSON schema, annotations and the caller role they need;
- `resources()`: read-only documents (`cluster://nodes`, ...);
- `subscriptions()`: event-type globs it wants from the event bus, with their handlers;
- `placement` (class attribute): a say in where tasks of some kinds run (`Placement`), for task kinds whose
  work does not happen on the Cortex node itself (a Kubernetes Job runs on a Kubernetes node).

Task executors are not a plugin hook: they register under the entry-point group `cortex.executors`
(cortex.tasks.executors), so every node knows every kind whether or not a plugin is enabled there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from cortex.core.events import Event, EventBus

if TYPE_CHECKING:
    from cortex.plugins.host import PluginHost

# Caller roles, weakest first: a tool needing "operator" can be called by "operator" and "admin".
CALLER_ROLES = ("reader", "operator", "admin")
MAX_TOOL_ARGUMENT_BYTES = 1024 * 1024
RETRYABLE_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED")
# The gRPC status a node answers `read_local` and `snapshot` with when it holds no replica of the state.
NO_REPLICA_CODE = "FAILED_PRECONDITION"


class ToolError(Exception):
    """A tool call failed in a way the caller (a person or a model) can act on; the message says how."""


class PluginConfigError(ValueError):
    """A plugin's options do not match its schema; the message names file, line and key."""


def status_code_name(exc: BaseException) -> str:
    """The gRPC status name a cluster call failed with ("" for other failures)."""
    code = getattr(exc, "code", None)
    code = code() if callable(code) else code
    return getattr(code, "name", "") or ""


def holds_no_replica(exc: BaseException) -> bool:
    """Whether a `read_local`/`snapshot` failure means this node keeps no copy of the state (a worker, or a
    server that has not joined yet): the caller then asks a server instead."""
    return status_code_name(exc) == NO_REPLICA_CODE


class ClusterAPI(Protocol):
    """What the agent offers plugins (the node's PluginBridge implements it, member for member).

    Failures raise an exception carrying the gRPC status as `code` (status_code_name reads it)."""

    LEVELS: ClassVar[dict[str, int]]  # read level name -> the wire's ReadLevel
    node_id: str
    role: str  # "server" or "worker"
    grpc_address: str
    config: Any  # the node's config (cortex.config.Config)
    node_credentials: Callable[[], Any]  # this node's own certificate files (None before it has one)

    def rpc(self, method: str, request: Any) -> Any:
        """Run a Cluster RPC (TransferLeadership, Leave, CreateToken, ...) as if this node had received it:
        forwarded to the leader where the RPC needs one."""

    def write(self, command_type: str, args: dict, idempotency_key: str = "") -> dict:
        """Replicate a command from any node (forwarded to the leader); raises on failure."""

    def propose(self, command_type: str, args: dict, idempotency_key: str = "") -> dict:
        """Leader only: replicate a command, internal ones included (scheduler decisions and the like)."""

    def read(self, query: str, args: dict | None = None, level: str = "leader", min_index: int = 0) -> Any:
        """Run a state query at a read level: stale, leader or linearizable; the answer includes at least the
        state at log index `min_index` (pass a write's index to read your own writes)."""

    def read_local(self, query: str, args: dict | None = None) -> Any:
        """A query on this node's own replica, in process; on the leader that is a leader read. A node without
        a replica raises with status NO_REPLICA_CODE (holds_no_replica). Do not mutate the answer."""

    def is_leader(self) -> bool: ...

    def snapshot(self, path: Path) -> int:
        """Servers: write a consistent copy of the state database to `path`; return its applied index. A node
        without a replica raises with status NO_REPLICA_CODE."""

    def create_token(self, role: str, ttl_seconds: float, uses: int) -> dict:
        """A join token minted by the leader: {"token", "token_id", "expires_at"}; the secret is shown only here."""

    def revoke_token(self, token_id: str) -> None: ...

    def remove_node(self, node_id: str, reason: str = "") -> bool:
        """Remove a node from membership (the `cortex leave` path); True when it was a member."""

    def status(self) -> dict: ...


def write_with_retry(cluster: ClusterAPI, command_type: str, args: dict, idempotency_key: str,
                     retry_for: float = 10.0) -> dict:
    """A replicated write from a tool: transient failures (an election, a lost leader) are retried with the
    same idempotency key, so the command applies at most once; other failures become a ToolError."""
    deadline = time.monotonic() + retry_for
    while True:
        try:
            return cluster.write(command_type, args, idempotency_key)
        except Exception as exc:
            code = status_code_name(exc)
            if code in RETRYABLE_CODES and time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            hint = " (the cluster may have no leader: check cluster_health, then retry)" if code in RETRYABLE_CODES else ""
            raise ToolError(f"{command_type} failed: {exc}{hint}") from exc


@dataclass(frozen=True)
class Caller:
    role: str = "operator"  # one of CALLER_ROLES
    identity: str = "local"  # who: a node id, a certificate subject, "local" for the node's own socket


@dataclass(frozen=True)
class Tool:
    name: str  # unique across plugins, snake_case: "cluster_status"
    description: str  # what it does and when to use it; models read this
    handler: Callable[[dict, Caller], Any]  # (validated arguments, caller) -> JSON-able result
    input_schema: dict = field(default_factory=lambda: {"type": "object", "properties": {},
                                                        "additionalProperties": False})
    role: str = "reader"  # the weakest caller role allowed
    read_only: bool = True
    destructive: bool = False
    idempotent: bool = True
    toolset: str = ""  # group shown/hidden together; defaults to the plugin's name
    # JSON schema of the result as MCP clients get it in `structuredContent`: always an object, so a result
    # that is not one (a list) is wrapped as {"result": ...} (see `structured`). None: any object.
    output_schema: dict | None = None
    # Destructive tools: (arguments, caller) -> one sentence saying what the call will do, read from the
    # current state ("delete key a/b (version 4, 12 bytes)"); a client that can ask its user shows it before
    # the call runs. None: the description and the arguments say it.
    plan: Callable[[dict, Caller], str] | None = None


ANY_OBJECT: dict = {"type": "object"}
_TYPE_NAMES = ("string", "integer", "number", "boolean", "object", "array", "null")


def _prop(spec: Any) -> dict:
    if isinstance(spec, dict):
        return spec
    if isinstance(spec, str):
        return {"type": spec}
    if isinstance(spec, (list, tuple)) and all(t in _TYPE_NAMES for t in spec):
        return {"type": list(spec)}
    raise TypeError(f"output schema property {spec!r}: use a type name, a list of them or a schema")


def returns(properties: dict[str, Any], optional: tuple[str, ...] | str = (), *, required: tuple[str, ...] | None = None,
            description: str = "") -> dict:
    """An output schema: an object with these top-level properties, each a type name ("string"), a list of
    them (["integer", "null"]) or a full schema. Every property is required unless named in `optional` (or
    `required` lists the required ones); further properties are allowed, so a tool may grow its answer."""
    optional = (optional,) if isinstance(optional, str) else optional
    names = [k for k in properties if k not in optional] if required is None else list(required)
    schema: dict = {"type": "object", "properties": {k: _prop(v) for k, v in properties.items()}}
    if names:
        schema["required"] = names
    if description:
        schema["description"] = description
    return schema


def returns_list(items: dict[str, Any] | None = None, optional: tuple[str, ...] | str = (), *,
                 required: tuple[str, ...] | None = None, description: str = "") -> dict:
    """The output schema of a tool whose result is a list (of objects with these properties, when given):
    clients receive it as {"result": [...]}."""
    item = returns(items, optional, required=required) if items is not None else {}
    return {"type": "object", "properties": {"result": {"type": "array", "items": item,
                                                        **({"description": description} if description else {})}},
            "required": ["result"]}


def structured(result: Any) -> dict:
    """A tool's result as MCP `structuredContent`, which must be an object."""
    return result if isinstance(result, dict) else {"result": result}


@dataclass(frozen=True)
class Resource:
    uri: str  # "cluster://nodes"
    name: str
    description: str
    read: Callable[[], Any]  # -> JSON-able document
    mime_type: str = "application/json"


# (query, args) -> the answer of a leader read; how a placement reads the replicated state.
StateRead = Callable[[str, dict], Any]
# (queued task, node id) -> '' when that node may take the task now, else why not ("has no Kubernetes context").
Refusal = Callable[[dict, str], str]


class Placement(Protocol):
    """Where tasks of `kinds` may run, decided with what the plugin publishes to the replicated state.

    It is a class attribute, not an instance's: the leader places tasks for every node, so its decisions
    must not depend on which plugins the leader itself runs, and `cortex tasks show` explains them with
    the same code on a machine that runs no agent at all."""

    kinds: frozenset[str]
    # False: the task's work runs elsewhere (a Kubernetes pod), so the node's CPUs, memory and GPUs are
    # neither checked nor reserved; only a task slot is.
    uses_node_resources: bool

    def prepare(self, read: StateRead) -> Refusal:
        """Called once per scheduling round in which tasks of `kinds` wait: read what the decisions need."""

    # `kinds = {"*"}`: a say over every task, added to the kind's own placement (node health, the sentinel): a
    # node it refuses is only a last resort, and an optional `rank(read) -> Callable[[node id], float]` gives
    # a penalty subtracted from a node's score (tasks/scheduler.py).


@dataclass
class PluginContext:
    name: str
    options: dict  # validated against the plugin's options_schema, defaults filled in
    cluster: ClusterAPI | None  # None in a host without a cluster (listing tools, tests)
    events: EventBus
    data_dir: Path  # the plugin's own directory under the node's data dir
    log: logging.Logger
    host: PluginHost | None = None  # the node's plugin host (the MCP front end serves its tools)


class Plugin:
    """Base class of plugins. Subclasses set `name` and override what they need (the hooks listed above)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    enabled_by_default: ClassVar[bool] = True
    options_schema: ClassVar[dict] = {"type": "object", "properties": {}, "additionalProperties": False}
    placement: ClassVar[Placement | None] = None

    def __init__(self, ctx: PluginContext):
        self.ctx = ctx

    def init(self) -> None:
        """Prepare (open files, check options); no threads yet."""

    def start(self) -> None:
        """Start background work; return promptly."""

    def stop(self) -> None:
        """Stop background work; must not raise for a plugin that never started."""

    def tools(self) -> list[Tool]:
        return []

    def resources(self) -> list[Resource]:
        return []

    def subscriptions(self) -> dict[str, Callable[[Event], None]]:
        return {}

"""Node configuration: typed dataclasses, parsed and validated in this one place.

A config file is YAML. Every error names the file, the line and the dotted key, so a typo in a fleet's
config is found from the message alone:  `node.yaml:7: raft.election_timeout_min: must be > 0`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cortex.core.args import NODE_ID_RE

ROLES = ("server", "worker")
ADDRESS_RE = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


class ConfigError(ValueError):
    """A config problem, already phrased for the operator (file:line: key: problem)."""


@dataclass(frozen=True)
class RaftConfig:
    """Consensus timings (seconds). Defaults keep failover near 1 s on a LAN or tailnet."""

    election_timeout_min: float = 0.5
    election_timeout_max: float = 1.0
    heartbeat_interval: float = 0.1
    # The leader steps down when it has not heard from a majority for this long; it must stay below the
    # election timeout so a partitioned leader is gone before the majority can elect a new one.
    leader_fallback_timeout: float = 0.4
    connection_timeout: float = 30.0
    log_compaction_entries: int = 5000
    log_compaction_seconds: float = 300.0
    # The leader reports a server stuck when its replication lag has not shrunk for this long while the
    # leader kept committing (raft/convergence.py).
    replica_stuck_after: float = 10.0
    # The Raft port: mutual TLS with typed frames, or pysyncobj's password transport (upgrades only).
    transport: str = "auto"
    max_frame_bytes: int = 8 * 1024 * 1024  # one command is at most ~1 MiB (core/args.py), so room to spare
    max_inbound_connections: int = 64


@dataclass(frozen=True)
class LivenessConfig:
    """Seconds without a heartbeat before the leader marks a node suspect, then offline."""

    suspect_after: float = 3.0
    offline_after: float = 10.0
    forget_left_after: float = 72 * 3600.0  # the record of a node that left is dropped after this (membership.py)


@dataclass(frozen=True)
class MembershipConfig:
    """Bounds on joins without a token (anyone who reaches the enrollment port can ask), and the lifetime of
    the token `cortex init` makes. Counts and seconds, all > 0."""

    max_pending_requests: int = 100  # cluster-wide: the leader's value counts
    request_burst: int = 10  # new requests one source address may send at once, on the node it reaches
    requests_per_minute: float = 6.0  # and how fast that allowance refills
    pending_request_ttl: float = 24 * 3600.0  # an undecided request leaves the approval list after this
    init_token_ttl: float = 3600.0  # the join token made with a new cluster (`cortex init --token-ttl`)


@dataclass(frozen=True)
class JoinConfig:
    address: str
    token: str = ""
    token_file: str = ""
    insecure_skip_ca_pin: bool = False  # accept a token without a CA pin (logged; see enroll.py)


@dataclass(frozen=True)
class BootstrapConfig:
    """What an agent that is not yet in a cluster does at start. Nothing by default: it waits."""

    init: bool = False
    join: JoinConfig | None = None
    # Why neither init nor join is set, when a generator (e.g. the appliance's credential renderer) knows:
    # shown as the node's `waiting_for` in `cortex status` instead of the generic hint.
    wait_reason: str = ""


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "json"


@dataclass(frozen=True)
class PluginSettings:
    """One plugin's section (`plugins: {NAME: {...}}`); options are checked against the plugin's own schema
    when plugins load (plugins.py), so values keep the line they came from for the error message."""

    enabled: bool | None = None  # None: the plugin's default
    options: dict = field(default_factory=dict)
    lines: dict = field(default_factory=dict)  # option name -> line in the config file
    line: int = 0  # the section's own line


@dataclass(frozen=True)
class FenceTarget:
    """How to power one node off and on from outside it (its BMC), used by the node that takes its services
    over (cortex.ha.fence). A section `fence: {NODE: {...}}` on every node that may fence NODE."""

    agent: str = "redfish"  # a name in the entry-point group cortex.fence_agents
    address: str = ""  # the BMC's base URL: https://bmc-n3.lab
    system_id: str = ""  # the ComputerSystem's Id; empty: the BMC's only system
    credentials_file: str = ""  # YAML/JSON {username, password}, readable by the agent only
    auth: str = "basic"  # basic, or session (a Redfish session per operation, deleted afterwards)
    ca_file: str = ""  # the BMC certificate's CA (pinned); empty: the system's trust store
    verify_tls: bool = True  # false: accept any certificate (logged with every operation)
    timeout: float = 10.0  # seconds per HTTP request
    power_timeout: float = 120.0  # seconds until the BMC reports the power state asked for


FENCE_AUTH = ("basic", "session")


@dataclass(frozen=True)
class Config:
    node_id: str
    role: str = "server"
    data_dir: Path = Path("/var/lib/cortex")
    grpc_address: str = "127.0.0.1:7400"
    raft_address: str = "127.0.0.1:7401"
    admin_socket: Path | None = None
    raft: RaftConfig = field(default_factory=RaftConfig)
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    log: LogConfig = field(default_factory=LogConfig)
    max_message_bytes: int = 4 * 1024 * 1024
    plugins: dict[str, PluginSettings] = field(default_factory=dict)
    source: str = "<defaults>"
    fence: dict[str, FenceTarget] = field(default_factory=dict)  # node id -> how to power it off and on

    @property
    def admin_socket_path(self) -> Path:
        return self.admin_socket or self.data_dir / "admin.sock"

    @property
    def loopback_grpc_address(self) -> str | None:
        """Where the local CLI and MCP front end reach the agent when `listen.grpc` is a LAN address: the
        same port on 127.0.0.1, so `cortex status` works on the node without knowing its address."""
        host, _, port = self.grpc_address.rpartition(":")
        if host.strip("[]") in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::", ""):
            return None  # already loopback, or a wildcard that includes it
        return f"127.0.0.1:{port}"


# --- every key, in one table: parse() takes each section's allowed keys from it and `python -m
# cortex.dev.reference` writes docs/reference/config.md from it. Defaults are the dataclasses' own. ----------

REQUIRED = "(required)"


@dataclass(frozen=True)
class Key:
    path: str  # dotted, as written in the file: "raft.heartbeat_interval"
    kind: str  # what the YAML value is: str, int, float, bool, or a section (mapping)
    default: Any
    meaning: str


KEYS: tuple[Key, ...] = (
    Key("node", "mapping", REQUIRED, "who this node is"),
    Key("node.id", "str", REQUIRED, "the node's name in the cluster: 1-63 lowercase letters, digits and '-', "
        "starting alphanumeric"),
    Key("node.role", "str", Config.role, "server (votes in Raft, holds the replicated state) or worker (runs "
        "tasks and plugins, holds no vote)"),
    Key("data_dir", "str", Config.data_dir, "where the node keeps its state, certificates and plugin data "
        "(relative paths are relative to the config file)"),
    Key("listen", "mapping", "", "the addresses the node serves"),
    Key("listen.grpc", "str", Config.grpc_address, "HOST:PORT of the gRPC API (CLI, other nodes); the "
        "enrollment port is this port + 2"),
    Key("listen.raft", "str", Config.raft_address, "HOST:PORT of the Raft transport (servers)"),
    Key("admin_socket", "str", "<data_dir>/admin.sock", "the local admin API's unix socket (init, join, leave, "
        "plugins start/stop; the admin role for tools)"),
    Key("raft", "mapping", "", "consensus timings in seconds and the Raft port; the timing defaults keep failover near 1 s on a "
        "LAN or tailnet; every number must be > 0"),
    Key("raft.election_timeout_min", "float", RaftConfig.election_timeout_min, "shortest wait for a leader's "
        "heartbeat before a server starts an election"),
    Key("raft.election_timeout_max", "float", RaftConfig.election_timeout_max, "longest such wait (each server "
        "picks at random in between); above election_timeout_min"),
    Key("raft.heartbeat_interval", "float", RaftConfig.heartbeat_interval, "how often the leader sends "
        "heartbeats; at most a third of election_timeout_min"),
    Key("raft.leader_fallback_timeout", "float", RaftConfig.leader_fallback_timeout, "the leader steps down "
        "after not hearing from a majority this long; below election_timeout_min, so a partitioned leader is "
        "gone before the majority elects a new one"),
    Key("raft.connection_timeout", "float", RaftConfig.connection_timeout, "how long a Raft connection may stay "
        "silent before it is dropped; at least election_timeout_max"),
    Key("raft.log_compaction_entries", "int", RaftConfig.log_compaction_entries, "compact the Raft log into a "
        "snapshot after this many entries"),
    Key("raft.log_compaction_seconds", "float", RaftConfig.log_compaction_seconds, "or after this many seconds"),
    Key("raft.replica_stuck_after", "float", RaftConfig.replica_stuck_after, "the leader reports a server "
        "stuck (`cortex status`, alert node.stuck) when its replication lag has not shrunk for this long "
        "while the leader kept committing"),
    Key("raft.transport", "str", RaftConfig.transport, "mtls (mutual TLS with the node certificates, typed "
        "frames), password (pysyncobj's own format, spoken by versions before mtls) or auto (mtls for Raft "
        "state begun on this version, password for older state); every server must use the same "
        "(docs/operations/raft-transport.md)"),
    Key("raft.max_frame_bytes", "int", RaftConfig.max_frame_bytes, "a Raft frame announcing more than this "
        "closes its connection before anything is buffered; 65536 to 268435456"),
    Key("raft.max_inbound_connections", "int", RaftConfig.max_inbound_connections, "Raft connections this "
        "server accepts at once; more are closed at accept"),
    Key("liveness", "mapping", "", "how the leader judges nodes by their heartbeats (seconds, > 0)"),
    Key("liveness.suspect_after", "float", LivenessConfig.suspect_after, "a node without a heartbeat this long "
        "is suspect; below offline_after"),
    Key("liveness.offline_after", "float", LivenessConfig.offline_after, "and offline after this long"),
    Key("liveness.forget_left_after", "float", LivenessConfig.forget_left_after, "the record of a node that left "
        "is dropped after this long (`cortex nodes forget` drops it sooner)"),
    Key("membership", "mapping", "", "bounds on join requests without a token and the init token's lifetime "
        "(> 0)"),
    Key("membership.max_pending_requests", "int", MembershipConfig.max_pending_requests, "join requests "
        "awaiting approval the cluster holds at most (the leader's value); more are refused until an operator "
        "decides"),
    Key("membership.request_burst", "int", MembershipConfig.request_burst, "new join requests without a token "
        "one source address may send at once (counted by the node that receives them)"),
    Key("membership.requests_per_minute", "float", MembershipConfig.requests_per_minute, "how fast a source's "
        "allowance refills; a joiner asking again about its own request is not counted"),
    Key("membership.pending_request_ttl", "float", MembershipConfig.pending_request_ttl, "seconds after which an "
        "undecided join request leaves the approval list"),
    Key("membership.init_token_ttl", "float", MembershipConfig.init_token_ttl, "seconds the join token made "
        "with a new cluster (`cortex init`, bootstrap.init) is valid; `cortex init --token-ttl` chooses too"),
    Key("bootstrap", "mapping", "", "what an agent that is not in a cluster yet does at start; nothing by "
        "default: it waits for `cortex init` or `cortex join`"),
    Key("bootstrap.init", "bool", BootstrapConfig.init, "create a new cluster with this node as its first "
        "server (servers only; excludes join)"),
    Key("bootstrap.join", "mapping", "", "join an existing cluster (excludes init)"),
    Key("bootstrap.join.address", "str", REQUIRED, "HOST:PORT of any member's gRPC API"),
    Key("bootstrap.join.token", "str", JoinConfig.token, "a join token; with neither token nor token_file the "
        "join is a request an operator approves (`cortex nodes approve`)"),
    Key("bootstrap.join.token_file", "str", JoinConfig.token_file, "a file holding the join token (relative to "
        "the config file)"),
    Key("bootstrap.join.insecure_skip_ca_pin", "bool", JoinConfig.insecure_skip_ca_pin, "accept a token without "
        "a CA pin: the server is then not checked before the token is sent (logged)"),
    Key("bootstrap.wait_reason", "str", BootstrapConfig.wait_reason, "why neither init nor join is set, shown as "
        "the node's `waiting_for` in `cortex status` (written by generators such as the appliance's)"),
    Key("log", "mapping", "", "the agent's log"),
    Key("log.level", "str", LogConfig.level, "debug, info, warning or error"),
    Key("log.format", "str", LogConfig.format, "json (one object per line) or text"),
    Key("max_message_bytes", "int", Config.max_message_bytes, "the largest gRPC message the node sends or "
        "accepts, 65536 to 67108864"),
    Key("plugins", "mapping", "", "one section per plugin by name: `enabled: true|false` (default: the "
        "plugin's own) and its options, checked against the plugin's schema when plugins load"),
    Key("fence", "mapping", "", "one section per node id this node may power off and on when it takes that "
        "node's services over (docs/operations/ha.md)"),
    Key("fence.NODE.agent", "str", FenceTarget.agent, "the fence agent, by name in the entry-point group "
        "cortex.fence_agents (redfish built in)"),
    Key("fence.NODE.address", "str", REQUIRED, "the BMC's base URL, https://HOST[:PORT]"),
    Key("fence.NODE.system_id", "str", FenceTarget.system_id, "the Redfish ComputerSystem Id; empty: the BMC's "
        "only system"),
    Key("fence.NODE.credentials_file", "str", REQUIRED, "a YAML or JSON file {username, password} (relative to the "
        "config file), readable by the agent alone"),
    Key("fence.NODE.auth", "str", FenceTarget.auth, "basic (HTTP basic auth on every request) or session (a "
        "Redfish session per operation, deleted afterwards)"),
    Key("fence.NODE.ca_file", "str", FenceTarget.ca_file, "the CA of the BMC's certificate, pinned (relative to the "
        "config file); empty: the system's trust store"),
    Key("fence.NODE.verify_tls", "bool", FenceTarget.verify_tls, "false accepts any BMC certificate (for BMCs with "
        "self-signed certificates; logged at every operation)"),
    Key("fence.NODE.timeout", "float", FenceTarget.timeout, "seconds each HTTP request to the BMC may take"),
    Key("fence.NODE.power_timeout", "float", FenceTarget.power_timeout, "seconds until the BMC must report the "
        "power state asked for"),
)


def section_keys(section: str) -> dict[str, str]:
    """The keys allowed directly under `section` ("" for the top level), as _Reader.mapping takes them."""
    prefix = f"{section}." if section else ""
    return {k.path[len(prefix):]: k.kind for k in KEYS
            if k.path.startswith(prefix) and "." not in k.path[len(prefix):]}


# --- parsing -----------------------------------------------------------------------------------------------

_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("json", "text")


class _Reader:
    """Walks a composed YAML tree, so every value keeps the line it came from."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, node: yaml.Node | None, key: str, problem: str) -> ConfigError:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        return ConfigError(f"{self.source}{line}: {key}: {problem}")

    def mapping(self, node: yaml.Node, key: str, allowed: dict[str, str]) -> dict[str, yaml.Node]:
        """Return {name: value node}; unknown keys are an error listing the allowed ones."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, key or "<top>", "must be a mapping")
        out: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            dotted = f"{key}.{name}" if key else str(name)
            if name not in allowed:
                raise self.fail(key_node, dotted, f"unknown key (allowed: {', '.join(sorted(allowed))})")
            if name in out:
                raise self.fail(key_node, dotted, "given twice")
            out[name] = value_node
        return out

    def scalar(self, node: yaml.Node, key: str, kind: type) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, key, f"must be a {kind.__name__}")
        value = yaml.safe_load(yaml.serialize(node))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is str and value is None:
            raise self.fail(node, key, "must not be empty")
        if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise self.fail(node, key, f"must be a {kind.__name__}, got {value!r}")
        return value


def _dataclass_from(reader: _Reader, node: yaml.Node, key: str, cls: type, custom: dict | None = None):
    """Fill a flat dataclass of scalars from a mapping node (custom: field -> parser for nested ones)."""
    custom = custom or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kinds = {name: f.type for name, f in fields.items()}
    allowed = section_keys(key)  # the table's keys; tests/unit/test_reference.py checks they match the dataclass
    values = {}
    for name, value_node in reader.mapping(node, key, allowed).items():
        dotted = f"{key}.{name}" if key else name
        if name in custom:
            values[name] = custom[name](value_node, dotted)
            continue
        kind = {"float": float, "int": int, "str": str, "bool": bool}[str(kinds[name]).split(" ")[0]]
        values[name] = (reader.scalar(value_node, dotted, kind), value_node)
    return values


def _positive_section(reader: _Reader, node: yaml.Node, key: str, cls: type):
    """A section of numbers that must all be > 0 (timeouts, counts), as its dataclass."""
    values = _dataclass_from(reader, node, key, cls)
    for name, (value, value_node) in values.items():
        if not isinstance(value, str) and value <= 0:
            raise reader.fail(value_node, f"{key}.{name}", f"must be > 0, got {value!r}")
    return cls(**{name: value for name, (value, _) in values.items()})


def _check_address(reader: _Reader, node: yaml.Node, key: str, value: str) -> str:
    match = ADDRESS_RE.match(value)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise reader.fail(node, key, f"must be HOST:PORT with a port 1-65535, got {value!r}")
    return value


def _fence_sections(reader: _Reader, node: yaml.Node, base_dir: Path) -> dict[str, FenceTarget]:
    if not isinstance(node, yaml.MappingNode):
        raise reader.fail(node, "fence", "must be a mapping of node id to its fence settings")
    targets: dict[str, FenceTarget] = {}
    for key_node, value_node in node.value:
        name = str(key_node.value)
        if not NODE_ID_RE.match(name) or name in targets:
            raise reader.fail(key_node, f"fence.{name}", "given twice" if name in targets else "not a node id")
        kinds = {"float": float, "str": str, "bool": bool}
        values = {k: reader.scalar(v, f"fence.{name}.{k}", kinds[section_keys("fence.NODE")[k]])
                  for k, v in reader.mapping(value_node, f"fence.{name}", section_keys("fence.NODE")).items()}
        for must in ("address", "credentials_file"):
            if not values.get(must):
                raise reader.fail(value_node, f"fence.{name}.{must}", "required")
        if not re.match(r"^https?://[^/\s]+/?$", values["address"]):
            raise reader.fail(value_node, f"fence.{name}.address",
                              f"must be the BMC's base URL, https://HOST[:PORT], got {values['address']!r}")
        if values.get("auth", "basic") not in FENCE_AUTH:
            raise reader.fail(value_node, f"fence.{name}.auth", f"must be one of {', '.join(FENCE_AUTH)}")
        for number in ("timeout", "power_timeout"):
            if number in values and values[number] <= 0:
                raise reader.fail(value_node, f"fence.{name}.{number}", "must be > 0")
        for path in ("credentials_file", "ca_file"):
            if values.get(path):
                values[path] = str(base_dir / values[path])
        targets[name] = FenceTarget(**values)
    return targets


def _plugin_sections(reader: _Reader, node: yaml.Node) -> dict[str, PluginSettings]:
    if not isinstance(node, yaml.MappingNode):
        raise reader.fail(node, "plugins", "must be a mapping of plugin name to its settings")
    sections: dict[str, PluginSettings] = {}
    for key_node, value_node in node.value:
        name = str(key_node.value)
        if name in sections:
            raise reader.fail(key_node, f"plugins.{name}", "given twice")
        if isinstance(value_node, yaml.ScalarNode) and value_node.value in ("", "~", "null"):
            sections[name] = PluginSettings(line=key_node.start_mark.line + 1)
            continue
        if not isinstance(value_node, yaml.MappingNode):
            raise reader.fail(value_node, f"plugins.{name}", "must be a mapping (enabled: true|false, options)")
        enabled, options, lines = None, {}, {}
        for opt_key, opt_value in value_node.value:
            opt = str(opt_key.value)
            if opt == "enabled":
                enabled = reader.scalar(opt_value, f"plugins.{name}.enabled", bool)
                continue
            if opt in options:
                raise reader.fail(opt_key, f"plugins.{name}.{opt}", "given twice")
            options[opt] = yaml.safe_load(yaml.serialize(opt_value))
            lines[opt] = opt_key.start_mark.line + 1
        sections[name] = PluginSettings(enabled=enabled, options=options, lines=lines,
                                        line=key_node.start_mark.line + 1)
    return sections


def parse(text: str, source: str = "<string>", base_dir: Path | None = None) -> Config:
    """Parse and validate a config document; raise ConfigError naming file, line and key."""
    reader = _Reader(source)
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if root is None:
        raise ConfigError(f"{source}: empty config: at least node.id is required")
    top = reader.mapping(root, "", section_keys(""))
    base_dir = base_dir or Path.cwd()
    kwargs: dict[str, Any] = {"source": source}

    if "node" not in top:
        raise reader.fail(root, "node", "required (node.id and node.role)")
    node = reader.mapping(top["node"], "node", section_keys("node"))
    if "id" not in node:
        raise reader.fail(top["node"], "node.id", "required")
    node_id = reader.scalar(node["id"], "node.id", str)
    if not NODE_ID_RE.match(node_id):
        raise reader.fail(node["id"], "node.id", "use 1-63 lowercase letters, digits and '-', starting alphanumeric")
    kwargs["node_id"] = node_id
    if "role" in node:
        role = reader.scalar(node["role"], "node.role", str)
        if role not in ROLES:
            raise reader.fail(node["role"], "node.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        kwargs["role"] = role

    if "data_dir" in top:
        kwargs["data_dir"] = (base_dir / reader.scalar(top["data_dir"], "data_dir", str)).resolve()
    if "admin_socket" in top:
        kwargs["admin_socket"] = (base_dir / reader.scalar(top["admin_socket"], "admin_socket", str)).resolve()
    if "max_message_bytes" in top:
        size = reader.scalar(top["max_message_bytes"], "max_message_bytes", int)
        if not 64 * 1024 <= size <= 64 * 1024 * 1024:
            raise reader.fail(top["max_message_bytes"], "max_message_bytes", "must be between 65536 and 67108864")
        kwargs["max_message_bytes"] = size

    if "listen" in top:
        listen = reader.mapping(top["listen"], "listen", section_keys("listen"))
        for name, attr in (("grpc", "grpc_address"), ("raft", "raft_address")):
            if name in listen:
                value = reader.scalar(listen[name], f"listen.{name}", str)
                kwargs[attr] = _check_address(reader, listen[name], f"listen.{name}", value)

    if "raft" in top:
        raft = _positive_section(reader, top["raft"], "raft", RaftConfig)
        if raft.election_timeout_min >= raft.election_timeout_max:
            raise reader.fail(top["raft"], "raft.election_timeout_min", "must be below raft.election_timeout_max")
        if raft.leader_fallback_timeout >= raft.election_timeout_min:
            raise reader.fail(
                top["raft"], "raft.leader_fallback_timeout", "must be below raft.election_timeout_min"
            )
        if raft.connection_timeout < raft.election_timeout_max:
            raise reader.fail(top["raft"], "raft.connection_timeout", "must be at least raft.election_timeout_max")
        if raft.heartbeat_interval * 3 >= raft.election_timeout_min:
            raise reader.fail(top["raft"], "raft.heartbeat_interval", "must be at most a third of election_timeout_min")
        if raft.transport not in ("auto", "mtls", "password"):
            raise reader.fail(top["raft"], "raft.transport",
                              f"must be auto, mtls or password, got {raft.transport!r}")
        if not 64 * 1024 <= raft.max_frame_bytes <= 256 * 1024 * 1024:
            raise reader.fail(top["raft"], "raft.max_frame_bytes", "must be between 65536 and 268435456")
        kwargs["raft"] = raft

    if "liveness" in top:
        liveness = _positive_section(reader, top["liveness"], "liveness", LivenessConfig)
        if liveness.suspect_after >= liveness.offline_after:
            raise reader.fail(top["liveness"], "liveness.suspect_after", "must be below liveness.offline_after")
        kwargs["liveness"] = liveness

    if "membership" in top:
        kwargs["membership"] = _positive_section(reader, top["membership"], "membership", MembershipConfig)

    if "log" in top:
        values = _dataclass_from(reader, top["log"], "log", LogConfig)
        level, level_node = values.get("level", ("info", None))
        fmt, fmt_node = values.get("format", ("json", None))
        if level not in _LOG_LEVELS:
            raise reader.fail(level_node, "log.level", f"must be one of {', '.join(_LOG_LEVELS)}")
        if fmt not in _LOG_FORMATS:
            raise reader.fail(fmt_node, "log.format", f"must be one of {', '.join(_LOG_FORMATS)}")
        kwargs["log"] = LogConfig(level=level, format=fmt)

    if "bootstrap" in top:
        boot = reader.mapping(top["bootstrap"], "bootstrap", section_keys("bootstrap"))
        wait_reason = reader.scalar(boot["wait_reason"], "bootstrap.wait_reason", str) if "wait_reason" in boot else ""
        init = reader.scalar(boot["init"], "bootstrap.init", bool) if "init" in boot else False
        join = None
        if "join" in boot:
            fields = reader.mapping(boot["join"], "bootstrap.join", section_keys("bootstrap.join"))
            if "address" not in fields:
                raise reader.fail(boot["join"], "bootstrap.join.address", "required")
            address = _check_address(
                reader, fields["address"], "bootstrap.join.address",
                reader.scalar(fields["address"], "bootstrap.join.address", str),
            )
            token = reader.scalar(fields["token"], "bootstrap.join.token", str) if "token" in fields else ""
            token_file = ""
            if "token_file" in fields:
                token_file = str(base_dir / reader.scalar(fields["token_file"], "bootstrap.join.token_file", str))
            # neither token nor token_file: the join is a request that an operator approves
            skip_pin = reader.scalar(fields["insecure_skip_ca_pin"], "bootstrap.join.insecure_skip_ca_pin", bool) \
                if "insecure_skip_ca_pin" in fields else False
            join = JoinConfig(address=address, token=token, token_file=token_file, insecure_skip_ca_pin=skip_pin)
        if init and join:
            raise reader.fail(top["bootstrap"], "bootstrap", "init and join exclude each other")
        if wait_reason and (init or join):
            raise reader.fail(boot["wait_reason"], "bootstrap.wait_reason", "only for a node that neither inits nor joins")
        kwargs["bootstrap"] = BootstrapConfig(init=init, join=join, wait_reason=wait_reason)

    if "plugins" in top:
        kwargs["plugins"] = _plugin_sections(reader, top["plugins"])
    if "fence" in top:
        kwargs["fence"] = _fence_sections(reader, top["fence"], base_dir)

    config = Config(**kwargs)
    if config.role == "worker" and config.bootstrap.init:
        raise ConfigError(f"{source}: bootstrap.init: a worker cannot create a cluster; only a server can")
    return config


def load(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    return parse(text, source=str(path), base_dir=path.parent)

"""State domains: the one way anything adds to the replicated state.

Every subsystem, the core's key-value store and membership included, brings a `Domain`: its own tables with
their own append-only migrations, the command types it handles (validator + pure handler), the queries it
answers, the events its commands mean and who may propose its commands. The store routes by command type
and never learns what a domain does.

Domains are part of the state machine, so every replica must have the same ones: they are built in and
always registered (`CORE`, then `BUILTIN`), independent of which plugins a node enables. A third-party
plugin keeps its state in the key-value store under its own prefix instead of adding tables.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cortex.core.envelope import Envelope
    from cortex.security.tls import Peer

Validator = Callable[[dict], dict]  # client args -> normalized args, or raise args.CommandError
Handler = Callable[[sqlite3.Connection, int, "Envelope"], dict]  # (db, log index, envelope) -> result
Query = Callable[[sqlite3.Connection, dict], Any]  # (read-only db, args) -> JSON-able
EventMapper = Callable[["Envelope", dict], list[tuple[str, dict]]]  # (envelope, result) -> events
# (command type, validated args, the caller's certificate or None in-process) -> why it may not, or ''
Refusal = Callable[[str, dict, "Peer | None"], str | None]


@dataclass(frozen=True)
class Command:
    validate: Validator
    apply: Handler
    internal: bool = False  # decided by the leader itself; clients may not propose it
    keep_result: bool = True  # remembered under its idempotency key (a barrier like noop is not)
    # The state-machine level that introduced this command type (see `level()`); 0: it predates levels.
    level: int = 0


@dataclass(frozen=True)
class Domain:
    name: str  # also the prefix of its command types and queries: "task.submit", "task.list"
    migrations: tuple[str, ...] = ()  # append-only SQL scripts; their count is the domain's schema version
    tables: tuple[str, ...] = ()  # replicated tables: covered by digests and snapshots, in this order
    commands: Mapping[str, Command] = field(default_factory=dict)
    queries: Mapping[str, Query] = field(default_factory=dict)
    events: EventMapper | None = None
    refuse: Refusal | None = None  # asked for every client write of its commands, before it is proposed
    # Names clients have called since before names carried their domain ("nodes", "noop"): kept as they are.
    unprefixed: frozenset[str] = frozenset()
    # The core schema counts its migrations in PRAGMA user_version (it creates schema_versions, where every
    # other domain's count lives); only the first domain registered may.
    version_in_user_version: bool = False

    def __post_init__(self) -> None:
        for name in [*self.commands, *self.queries]:
            if name not in self.unprefixed and name != self.name and not name.startswith(self.name + "."):
                raise ValueError(f"domain {self.name}: {name!r} must start with {self.name + '.'!r}")


# Modules exposing DOMAIN, in registration order: the order of migrations and of the digest's tables.
# The core comes first and never changes; add one line to BUILTIN per subsystem.
CORE: tuple[str, ...] = (
    "cortex.core.cluster",
    "cortex.core.kv",
    "cortex.membership.nodes",
    "cortex.membership.tokens",
)
BUILTIN: tuple[str, ...] = (
    "cortex.tasks.state",
    "cortex.tasks.workflow",
    "cortex.memory.domain",
    "cortex.builtin.alerts",
    "cortex.builtin.messaging",
    "cortex.netboot.domain",
    "cortex.update.domain",
    "cortex.membership.domain",
    "cortex.security.revocation",
    "cortex.security.ca_rotation",
    "cortex.services.state",
    "cortex.plugins.access",
)


@cache
def domains() -> tuple[Domain, ...]:
    found = tuple(import_module(path).DOMAIN for path in (*CORE, *BUILTIN))
    if any(d.version_in_user_version for d in found[1:]):
        raise ValueError("only the first domain (the core schema) counts its migrations in PRAGMA user_version")
    return found


@cache
def commands() -> dict[str, Command]:
    out: dict[str, Command] = {}
    for d in domains():
        out.update(d.commands)
    return out


@cache
def queries() -> dict[str, Query]:
    out: dict[str, Query] = {}
    for d in domains():
        out.update(d.queries)
    return out


# --- levels: replicas of different versions during a rolling update --------------------------------------
# A replica that meets a command type it does not know records an error where newer replicas apply the
# command, and from then on their states differ for good (an update later does not replay the log). So every
# command type added after the first release carries the next level; a node tells its level in Status, and the
# leader proposes a command only once every server runs at least its level (node/levels.py). Adding a command
# type: give it `level=level() + 1` of the release that adds it, never reuse or lower a level.


@cache
def level() -> int:
    """This build's state-machine level: the highest level among its command types."""
    return max((c.level for c in commands().values()), default=0)


def level_of(command_type: str) -> int:
    command = commands().get(command_type)
    return command.level if command is not None else 0


def tables() -> tuple[str, ...]:
    """The replicated tables, in digest order."""
    return tuple(t for d in domains() for t in d.tables)


def refusal(command_type: str, args: dict, peer: Peer | None, internal: bool) -> str:
    """Why `peer` may not propose this command ('' when it may). `internal`: the cluster itself proposes it
    (the leader's own decisions); anyone else is refused the commands their domain marks internal."""
    for d in domains():
        if d.refuse is not None and command_type in d.commands:
            reason = d.refuse(command_type, args, peer)
            if reason:
                return reason
    command = commands().get(command_type)
    if not internal and command is not None and command.internal:
        return f"{command_type} is decided by the cluster itself; use the cortex CLI"
    return ""

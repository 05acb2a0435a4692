"""State domains: how a subsystem (tasks, memory, netboot, updates, ...) adds to the replicated state.

The core state machine (state.py, commands.py) owns membership, tokens and the key-value store. Every other
subsystem brings a `Domain`: its own tables with their own append-only migrations, the command types it
handles (validator + pure handler), the queries it answers and the events its commands mean. The core
routes by command type and never learns what a domain does.

Domains are part of the state machine, so every replica must have the same ones: they are built in and
always registered (`BUILTIN`), independent of which plugins a node enables. A third-party plugin keeps its
state in the key-value store under its own prefix instead of adding tables.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cortex.core.commands import Envelope

Validator = Callable[[dict], dict]  # client args -> normalized args, or raise commands.CommandError
Handler = Callable[[sqlite3.Connection, int, "Envelope"], dict]  # (db, log index, envelope) -> result
Query = Callable[[sqlite3.Connection, dict], Any]  # (read-only db, args) -> JSON-able
EventMapper = Callable[["Envelope", dict], list[tuple[str, dict]]]  # (envelope, result) -> events


@dataclass(frozen=True)
class Command:
    validate: Validator
    apply: Handler
    internal: bool = False  # decided by the leader itself; clients may not propose it


@dataclass(frozen=True)
class Domain:
    name: str  # also the prefix of its command types and queries: "task.submit", "task.list"
    migrations: tuple[str, ...] = ()  # append-only SQL scripts; their count is the domain's schema version
    tables: tuple[str, ...] = ()  # replicated tables: covered by digests and snapshots
    commands: Mapping[str, Command] = field(default_factory=dict)
    queries: Mapping[str, Query] = field(default_factory=dict)
    events: EventMapper | None = None

    def __post_init__(self) -> None:
        for name in [*self.commands, *self.queries]:
            if not name.startswith(self.name + "."):
                raise ValueError(f"domain {self.name}: {name!r} must start with {self.name + '.'!r}")


# Modules exposing DOMAIN, in registration order. Add one line per subsystem.
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
)


@cache
def domains() -> tuple[Domain, ...]:
    return tuple(import_module(path).DOMAIN for path in BUILTIN)


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

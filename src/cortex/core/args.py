"""Argument rules shared by every command validator, config check and tool schema.

A node id, a read level or a key means the same wherever it is accepted; defining each once keeps the
config file, the replicated commands and the MCP tools from drifting apart, and keeps their refusals
worded alike (clients and tests match on them).
"""

from __future__ import annotations

import re
from typing import Any

NODE_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"  # also a DNS label: node ids name hosts and certificates
NODE_ID_RE = re.compile(NODE_ID_PATTERN)
READ_LEVELS = ("stale", "leader", "linearizable")  # weakest first; proto ReadLevel in the same order
MAX_KEY_BYTES = 512
MAX_VALUE_BYTES = 1024 * 1024  # one command's payload; larger values belong in a blob store, not in Raft


class CommandError(ValueError):
    """The command is malformed; nothing was proposed. The message says what to fix."""


def require(args: dict, name: str, kind: type | tuple, *, optional: bool = False) -> Any:
    """args[name] of type `kind` (a bool is no number); None when optional and absent or null."""
    if name not in args:
        if optional:
            return None
        raise CommandError(f"missing argument {name!r}")
    value = args[name]
    if value is None and optional:
        return None
    if isinstance(value, bool) and kind in (int, float):
        raise CommandError(f"argument {name!r} must be {kind.__name__}, got bool")
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise CommandError(f"argument {name!r} must be {expected}, got {type(value).__name__}")
    return value


def no_extra(args: dict, allowed: set[str]) -> None:
    """Refuse unknown arguments, so a typo fails loudly instead of being ignored."""
    extra = set(args) - allowed
    if extra:
        raise CommandError(f"unknown argument(s) {', '.join(sorted(extra))}; allowed: {', '.join(sorted(allowed))}")


def key(args: dict, name: str = "key") -> str:
    value = require(args, name, str)
    if not value or len(value.encode()) > MAX_KEY_BYTES:
        raise CommandError(f"argument {name!r} must be 1..{MAX_KEY_BYTES} bytes")
    return value


def value(args: dict, name: str = "value") -> str:
    text = require(args, name, str)
    if len(text.encode()) > MAX_VALUE_BYTES:
        raise CommandError(f"argument {name!r} is {len(text.encode())} bytes; the limit is {MAX_VALUE_BYTES}")
    return text


def node_id(args: dict, name: str = "node_id") -> str:
    text = require(args, name, str)
    if not NODE_ID_RE.match(text):
        raise CommandError(f"{name} {text!r} is not a valid node id")
    return text


def is_node_id(text: str) -> bool:
    return bool(NODE_ID_RE.match(text))

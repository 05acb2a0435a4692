"""Typed commands: the only way replicated state changes.

A client names a command type and its arguments; `validate` checks them with the validator of the domain
that owns the type (domain.py) before anything is proposed. The leader then stamps the command into an
`Envelope` (envelope.py) and replicates it. The envelope, its error and the argument bounds are importable
from here too, as every subsystem has always imported them.
"""

from __future__ import annotations

from typing import Any

from cortex.core import domain
from cortex.core.args import MAX_KEY_BYTES, MAX_VALUE_BYTES, CommandError
from cortex.core.envelope import (
    MAX_ENVELOPE_BYTES,
    SCHEMA_VERSION,
    Envelope,
    decode_entry,
    encode_batch,
    parse_args_json,
)

__all__ = ["MAX_ENVELOPE_BYTES", "MAX_KEY_BYTES", "MAX_VALUE_BYTES", "SCHEMA_VERSION", "CommandError", "Envelope",
           "decode_entry", "encode_batch", "is_internal", "parse_args_json", "validate"]


def is_internal(command_type: str) -> bool:
    """Decided by the cluster itself (membership, leader actions): no client may propose it."""
    command = domain.commands().get(command_type)
    return command is not None and command.internal


def validate(command_type: str, args: Any) -> dict:
    """Check a client's command; return normalized args or raise CommandError."""
    command = domain.commands().get(command_type)
    if command is None:
        raise CommandError(f"unknown command type {command_type!r}; known: {', '.join(sorted(domain.commands()))}")
    if not isinstance(args, dict):
        raise CommandError("command arguments must be a JSON object")
    return command.validate(args)

"""Stamped commands for driving a StateStore directly, as the Raft log would hand them to it."""

from __future__ import annotations

import random

from cortex.core.commands import Envelope, validate


def env(command_type: str, args: dict, term: int = 1, idem: str | None = None, ts: float = 1000.0) -> bytes:
    command_id = f"id-{random.random()}"
    return Envelope(type=command_type, args=validate(command_type, args), id=command_id, ts=ts, term=term,
                    idem=idem or command_id).encode()

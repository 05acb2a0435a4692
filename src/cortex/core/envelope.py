"""The replicated form of a command: a stamped envelope, and log entries of one or several of them.

The leader stamps a validated command (a unique id, a wall-clock timestamp and its Raft term) and
replicates the encoded envelope. Every replica applies the same bytes, so nothing non-deterministic
(clocks, random ids) is ever decided during apply. The envelope carries a schema version so old logs stay
readable; its encoding (sorted keys, no spaces) is part of the log format and never changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cortex.core.args import MAX_VALUE_BYTES, CommandError

SCHEMA_VERSION = 1
MAX_ENVELOPE_BYTES = MAX_VALUE_BYTES + 64 * 1024


@dataclass(frozen=True)
class Envelope:
    """A stamped command, exactly as replicated."""

    type: str
    args: dict
    id: str  # unique, chosen by the leader; also the idempotency key when the client gave none
    ts: float  # leader wall clock at proposal: the only "now" apply may use
    term: int  # the proposing leader's term: fences commands from a deposed leader
    idem: str  # idempotency key: a retried command with the same key applies once
    v: int = SCHEMA_VERSION

    def encode(self) -> bytes:
        return json.dumps(
            {"v": self.v, "type": self.type, "args": self.args, "id": self.id, "ts": self.ts,
             "term": self.term, "idem": self.idem},
            separators=(",", ":"), sort_keys=True,
        ).encode()

    @staticmethod
    def decode(data: bytes) -> Envelope:
        return Envelope.from_doc(json.loads(data))

    @staticmethod
    def from_doc(doc: dict) -> Envelope:
        if doc.get("v") != SCHEMA_VERSION:
            raise CommandError(f"unsupported command schema version {doc.get('v')!r}")
        return Envelope(type=doc["type"], args=doc["args"], id=doc["id"], ts=doc["ts"], term=doc["term"],
                        idem=doc["idem"], v=doc["v"])


def encode_batch(encoded_envelopes: list[bytes]) -> bytes:
    """Several stamped envelopes as one log entry (group commit): applied in one transaction, in order."""
    return b'{"items":[' + b",".join(encoded_envelopes) + b'],"type":"batch","v":%d}' % SCHEMA_VERSION


def decode_entry(data: bytes) -> list[Envelope] | Envelope:
    """A log entry is one envelope, or a batch of them (a list)."""
    doc = json.loads(data)
    if doc.get("type") == "batch":
        if doc.get("v") != SCHEMA_VERSION:
            raise CommandError(f"unsupported batch schema version {doc.get('v')!r}")
        return [Envelope.from_doc(item) for item in doc["items"]]
    return Envelope.from_doc(doc)


def parse_args_json(data: bytes) -> Any:
    if not data:
        return {}
    if len(data) > MAX_ENVELOPE_BYTES:
        raise CommandError(f"arguments are {len(data)} bytes; the limit is {MAX_ENVELOPE_BYTES}")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CommandError(f"arguments are not valid JSON: {exc}") from None

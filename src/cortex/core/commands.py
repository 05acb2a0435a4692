"""Typed commands: the only way replicated state changes.

A client names a command type and its arguments; `validate` checks them before anything is proposed. The
leader then *stamps* the command (a unique id, a wall-clock timestamp and its Raft term) and replicates the
encoded envelope. Every replica applies the same bytes, so nothing non-deterministic (clocks, random ids)
is ever decided during apply. The envelope carries a schema version so old logs stay readable.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from cortex.core import domain

SCHEMA_VERSION = 1
MAX_KEY_BYTES = 512
MAX_VALUE_BYTES = 1024 * 1024  # one command's payload; larger values belong in a blob store, not in Raft
MAX_ENVELOPE_BYTES = MAX_VALUE_BYTES + 64 * 1024
ROLES = ("server", "worker")
_NODE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_TOKEN_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


class CommandError(ValueError):
    """The command is malformed; nothing was proposed. The message says what to fix."""


def _require(args: dict, name: str, kind: type | tuple, *, optional: bool = False) -> Any:
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


def _key(args: dict, name: str = "key") -> str:
    key = _require(args, name, str)
    if not key or len(key.encode()) > MAX_KEY_BYTES:
        raise CommandError(f"argument {name!r} must be 1..{MAX_KEY_BYTES} bytes")
    return key


def _value(args: dict, name: str = "value") -> str:
    value = _require(args, name, str)
    if len(value.encode()) > MAX_VALUE_BYTES:
        raise CommandError(f"argument {name!r} is {len(value.encode())} bytes; the limit is {MAX_VALUE_BYTES}")
    return value


def _node_id(args: dict) -> str:
    node_id = _require(args, "node_id", str)
    if not _NODE_ID_RE.match(node_id):
        raise CommandError(f"node_id {node_id!r} is not a valid node id")
    return node_id


def _no_extra(args: dict, allowed: set[str]) -> None:
    extra = set(args) - allowed
    if extra:
        raise CommandError(f"unknown argument(s) {', '.join(sorted(extra))}; allowed: {', '.join(sorted(allowed))}")


# Each validator returns the normalized argument dict; unknown arguments are refused so typos fail loudly.
def _v_noop(args: dict) -> dict:
    _no_extra(args, set())
    return {}


def _v_kv_put(args: dict) -> dict:
    _no_extra(args, {"key", "value"})
    return {"key": _key(args), "value": _value(args)}


def _v_kv_delete(args: dict) -> dict:
    _no_extra(args, {"key"})
    return {"key": _key(args)}


def _v_kv_cas(args: dict) -> dict:
    _no_extra(args, {"key", "expected", "value"})
    expected = _require(args, "expected", (str, type(None)), optional=True)
    if expected is not None and len(expected.encode()) > MAX_VALUE_BYTES:
        raise CommandError("argument 'expected' is too large")
    return {"key": _key(args), "expected": expected, "value": _value(args)}


def _v_node_register(args: dict) -> dict:
    _no_extra(args, {"node_id", "role", "grpc_address", "raft_address", "token_hash"})
    role = _require(args, "role", str)
    token_hash = _require(args, "token_hash", str, optional=True) or ""
    if token_hash and not _TOKEN_HASH_RE.match(token_hash):
        raise CommandError("token_hash must be a hex SHA-256 digest")
    if role not in ROLES:
        raise CommandError(f"role must be one of {', '.join(ROLES)}")
    return {
        "node_id": _node_id(args),
        "role": role,
        "grpc_address": _require(args, "grpc_address", str),
        "raft_address": _require(args, "raft_address", str, optional=True) or "",
        "token_hash": token_hash,
    }


def _v_node_liveness(args: dict) -> dict:
    _no_extra(args, {"node_id", "state"})
    state = _require(args, "state", str)
    if state not in ("alive", "suspect", "offline"):
        raise CommandError("state must be alive, suspect or offline")
    return {"node_id": _node_id(args), "state": state}


def _v_node_request(args: dict) -> dict:
    _no_extra(args, {"node_id", "role", "grpc_address", "raft_address", "secret_hash"})
    normalized = _v_node_register({k: v for k, v in args.items() if k != "secret_hash"})
    secret_hash = _require(args, "secret_hash", str)
    if not _TOKEN_HASH_RE.match(secret_hash):
        raise CommandError("secret_hash must be a hex SHA-256 digest")
    del normalized["token_hash"]
    return {**normalized, "secret_hash": secret_hash}


def _v_node_remove(args: dict) -> dict:
    _no_extra(args, {"node_id"})
    return {"node_id": _node_id(args)}


def _v_token_add(args: dict) -> dict:
    _no_extra(args, {"token_hash", "role", "expires_at", "uses"})
    token_hash = _require(args, "token_hash", str)
    if not _TOKEN_HASH_RE.match(token_hash):
        raise CommandError("token_hash must be a hex SHA-256 digest")
    role = _require(args, "role", str)
    if role not in ROLES:
        raise CommandError(f"role must be one of {', '.join(ROLES)}")
    expires_at = _require(args, "expires_at", (int, float), optional=True)
    uses = _require(args, "uses", int, optional=True)
    if uses is not None and uses < 1:
        raise CommandError("uses must be at least 1")
    return {"token_hash": token_hash, "role": role, "expires_at": expires_at, "uses": uses}


def _v_token_revoke(args: dict) -> dict:
    _no_extra(args, {"token_id"})
    token_id = _require(args, "token_id", str)
    if not re.match(r"^[0-9a-f]{8,64}$", token_id):
        raise CommandError("token_id must be 8-64 hex digits (see `cortex token list`)")
    return {"token_id": token_id}


def _v_cluster_init(args: dict) -> dict:
    _no_extra(args, {"cluster_id"})
    return {"cluster_id": _require(args, "cluster_id", str)}


VALIDATORS = {
    "noop": _v_noop,
    "kv.put": _v_kv_put,
    "kv.delete": _v_kv_delete,
    "kv.cas": _v_kv_cas,
    "node.register": _v_node_register,
    "node.remove": _v_node_remove,
    "node.liveness": _v_node_liveness,
    "node.request": _v_node_request,
    "node.approve": _v_node_remove,  # same shape: {"node_id"}
    "node.reject": _v_node_remove,
    "token.add": _v_token_add,
    "token.revoke": _v_token_revoke,
    "cluster.init": _v_cluster_init,
}

# Commands only the agent itself may propose (membership is decided by the join protocol, not by clients).
INTERNAL = frozenset({"node.register", "node.remove", "node.liveness", "node.request", "token.add",
                      "token.revoke", "cluster.init"})


def is_internal(command_type: str) -> bool:
    if command_type in INTERNAL:
        return True
    command = domain.commands().get(command_type)
    return command is not None and command.internal


def validate(command_type: str, args: Any) -> dict:
    """Check a client's command; return normalized args or raise CommandError."""
    validator = VALIDATORS.get(command_type)
    if validator is None and command_type in domain.commands():
        validator = domain.commands()[command_type].validate
    if validator is None:
        known = sorted([*VALIDATORS, *domain.commands()])
        raise CommandError(f"unknown command type {command_type!r}; known: {', '.join(known)}")
    if not isinstance(args, dict):
        raise CommandError("command arguments must be a JSON object")
    return validator(args)


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

"""A node's membership record on disk: which cluster it belongs to and how to reach it.

Its presence is what makes an agent a member. Without it the agent serves only status and the admin API
and waits for `cortex init` or `cortex join`: it never elects itself into a cluster of its own.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cortex.core.durable import write_atomic

FILE_NAME = "cluster.json"
TOKEN_PREFIX = "cx1"
PIN_RE = re.compile(r"[0-9a-f]{64}")  # SHA-256 hex of the cluster CA's public key (tls.ca_pin)


@dataclass(frozen=True)
class Identity:
    cluster_id: str
    node_id: str
    role: str
    raft_secret: str = ""  # servers only
    raft_peers: list[str] = field(default_factory=list)  # at join time; the log/snapshot keeps it current
    server_grpc_addresses: list[str] = field(default_factory=list)
    # Kept until the cluster has registered this node, so a restart mid-join can finish it.
    pending_token: str = ""
    pending_request_secret: str = ""  # the same, for a join approved by an operator instead of a token
    join_address: str = ""
    # Set when a worker was promoted to server: the Raft address and the role recorded here win over the
    # node's config file (which still says worker).
    raft_address: str = ""


def load(data_dir: Path) -> Identity | None:
    path = data_dir / FILE_NAME
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{path}: unreadable membership record ({exc}); move it away to rejoin") from None
    return Identity(**doc)


def save(data_dir: Path, identity: Identity) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(data_dir / FILE_NAME, json.dumps(asdict(identity), indent=2).encode())


def remove(data_dir: Path) -> None:
    (data_dir / FILE_NAME).unlink(missing_ok=True)


def new_cluster_id() -> str:
    return "c-" + secrets.token_hex(8)


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def new_join_token(ca_pin: str = "") -> str:
    """`cx1.<secret>.<ca pin>`: the pin (tls.ca_pin) lets the joiner check the server before it sends the
    secret. The pin is no secret; only `cx1.<secret>` is sent, and only its hash is stored."""
    secret = f"{TOKEN_PREFIX}.{secrets.token_urlsafe(24)}"
    return f"{secret}.{ca_pin}" if ca_pin else secret


def split_token(token: str) -> tuple[str, str]:
    """(the secret part `cx1.<secret>`, the CA pin or "") of a token as `cortex token create` prints it.
    A token of before pins (`cx1.<secret>`) has no pin: joining with it needs --insecure-skip-ca-pin."""
    token = token.strip()
    head, dot, tail = token.rpartition(".")
    if dot and head.count(".") >= 1 and PIN_RE.fullmatch(tail):
        return head, tail
    return token, ""


def token_hash(token: str) -> str:
    """Tokens are stored only as hashes (of the secret part: the pin is public and not part of it)."""
    return hashlib.sha256(split_token(token)[0].encode()).hexdigest()

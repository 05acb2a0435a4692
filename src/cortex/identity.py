"""A node's membership record on disk: which cluster it belongs to and how to reach it.

Its presence is what makes an agent a member. Without it the agent serves only status and the admin API
and waits for `cortex init` or `cortex join`: it never elects itself into a cluster of its own.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cortex.durable import write_atomic

FILE_NAME = "cluster.json"
TOKEN_PREFIX = "cx1"


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


def new_join_token() -> str:
    return f"{TOKEN_PREFIX}.{secrets.token_urlsafe(24)}"


def token_hash(token: str) -> str:
    """Tokens are stored only as hashes."""
    return hashlib.sha256(token.strip().encode()).hexdigest()

"""Certificate revocation: a removed node's certificate, or one replaced by renewal or rotation, stops
working at once instead of at its expiry (30 days by default).

What is replicated is a watermark per certificate holder name (a node id, or a client name such as
"admin@n1"): every certificate of that name issued before `before` is revoked. That covers both cases
without tracking serial numbers: removing a node revokes everything it holds (before = the removal), and a
renewal revokes every certificate of that name older than the new one (before = the new one's issue time).
A node that joins again later gets a certificate issued after the watermark, so it works.

A renewal takes effect after a grace (`effective_at`), so calls the node started with its old certificate
(channels are replaced, not cut) finish; a removal takes effect at once. Rows are pruned once every
certificate they revoke has expired anyway (`until`). Every server refuses revoked certificates in the gRPC
interceptor (authz.RoleCheck) from its own replica; workers refresh the list from the servers.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from cortex.core import domain
from cortex.core.commands import CommandError
from cortex.security import tls

log = logging.getLogger("cortex.revocation")

REASONS = ("removed", "renewed", "rotated", "operator")
MAX_GRACE = 600.0
REFRESH_SECONDS = {"server": 1.0, "worker": 5.0}

MIGRATIONS = (
    """
    CREATE TABLE cert_revocations (
        name TEXT PRIMARY KEY,
        prev_before REAL NOT NULL,   -- certificates issued before this are revoked (in effect)
        before REAL NOT NULL,        -- ... and before this, from effective_at on
        effective_at REAL NOT NULL,
        until REAL NOT NULL,         -- every certificate revoked here has expired by then: prune after
        reason TEXT NOT NULL,
        revoked_at REAL NOT NULL
    );
    """,
)


def _number(args: dict, key: str, low: float, high: float) -> float:
    value = args.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise CommandError(f"{key} must be a number between {low} and {high}")
    return float(value)


def validate_revoke(args: dict) -> dict:
    unknown = set(args) - {"name", "before", "until", "grace", "reason"}
    if unknown:
        raise CommandError(f"unknown arguments: {', '.join(sorted(unknown))}")
    name = args.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= 200:
        raise CommandError("name must be a certificate holder name (a node id or a client name such as admin@n1)")
    reason = args.get("reason", "operator")
    if reason not in REASONS:
        raise CommandError(f"reason must be one of {', '.join(REASONS)}")
    out = {"name": name, "reason": reason, "grace": _number({"grace": args.get("grace", 0.0)}, "grace", 0, MAX_GRACE),
           "until": _number(args, "until", 0, 1e11)}
    out["before"] = None if args.get("before") is None else _number(args, "before", 0, 1e11)
    return out


def apply_revoke(db, index: int, env) -> dict:
    """Raise the watermark of `name` (never lower it); `before` None means the command's own time."""
    a, now = env.args, env.ts
    before = now if a["before"] is None else a["before"]
    db.execute("DELETE FROM cert_revocations WHERE until < ?", (now,))  # nothing they revoke is valid any more
    row = db.execute("SELECT prev_before, before, effective_at, until FROM cert_revocations WHERE name=?",
                     (a["name"],)).fetchone()
    if row is not None and before <= row[1]:
        return {"name": a["name"], "changed": False, "before": row[1]}
    prev_before = 0.0
    if row is not None:  # the previous watermark stays in force (at once if its grace is over)
        prev_before = row[1] if now >= row[2] else row[0]
    until = max(a["until"], row[3] if row is not None else 0.0)
    db.execute("INSERT OR REPLACE INTO cert_revocations VALUES (?, ?, ?, ?, ?, ?, ?)",
               (a["name"], prev_before, before, now + a["grace"], until, a["reason"], now))
    return {"name": a["name"], "changed": True, "before": before, "effective_at": now + a["grace"]}


def query_revocations(db, args: dict) -> list[dict]:
    cols = ("name", "prev_before", "before", "effective_at", "until", "reason", "revoked_at")
    return [dict(zip(cols, r)) for r in db.execute(f"SELECT {', '.join(cols)} FROM cert_revocations ORDER BY name")]


def _events(env, result: dict) -> list[tuple[str, dict]]:
    if env.type == "cert.revoke" and result.get("changed"):
        return [("cert.revoked", {"name": result["name"], "reason": env.args["reason"]})]
    return []


def write_refusal(command_type: str, args: dict, peer: tls.Peer | None) -> str | None:
    """Who may revoke: servers and admins any name; anyone else only its own (a node that renewed revokes
    its older certificates). None (allowed) for every other command and in-process callers (peer None)."""
    if command_type != "cert.revoke" or peer is None or peer.role in ("server", "admin"):
        return None
    if args.get("name") != peer.name:
        return (f"{peer.name} ({peer.role}) may revoke only its own certificates, not {args.get('name')!r}; "
                "ask an admin (on a server: cortex nodes remove)")
    return None


DOMAIN = domain.Domain(
    name="cert",
    migrations=MIGRATIONS,
    tables=("cert_revocations",),
    commands={"cert.revoke": domain.Command(validate=validate_revoke, apply=apply_revoke)},
    queries={"cert.revocations": query_revocations},
    events=_events,
    refuse=write_refusal,
)


@dataclass(frozen=True)
class Entry:
    prev_before: float
    before: float
    effective_at: float
    reason: str


class RevocationList:
    """This node's copy of the watermarks, consulted on every RPC (authz.RoleCheck)."""

    def __init__(self):
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._next_refresh = 0.0

    def due(self) -> bool:
        return time.monotonic() >= self._next_refresh

    def update(self, rows: list[dict], role: str = "server") -> None:
        entries = {r["name"]: Entry(r["prev_before"], r["before"], r["effective_at"], r["reason"]) for r in rows}
        with self._lock:
            self._entries = entries
            self._next_refresh = time.monotonic() + REFRESH_SECONDS.get(role, 5.0)

    def refusal(self, name: str, cert_pem: bytes, now: float | None = None) -> str | None:
        """Why the certificate `cert_pem` of `name` is revoked (None: it is not)."""
        entry = self._entries.get(name)
        if entry is None:
            return None
        issued = tls.issued_at(cert_pem)
        now = time.time() if now is None else now
        if issued < entry.prev_before or (issued < entry.before and now >= entry.effective_at):
            what = {"removed": "the node was removed from the cluster",
                    "renewed": "a newer certificate replaced it",
                    "rotated": "the credentials were rotated",
                    "operator": "an operator revoked it"}[entry.reason]
            return (f"the certificate of {name} was revoked: {what}. Use its current certificate (on a node: "
                    "<data_dir>/tls), or join again if the node was removed")
        return None

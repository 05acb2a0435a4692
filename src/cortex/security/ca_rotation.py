"""CA rotation (`cortex secrets rotate --ca`): a new cluster CA, without downtime and without a lost write.

Phases, replicated in the `ca` domain (only the leader moves them: internal commands, so no client can
forge one); each node acknowledges a phase once its own part is done, and the leader moves on when every
member has:

    requested  an admin asked; the leader makes the new CA and hands its key to the servers encrypted with
               a key derived from the current CA key (which only servers hold): `key_enc`
    trust      every node trusts old + new CA (ca.crt is a bundle); servers keep the new key aside
               (ca-next.key) and accept Raft frames of generation G derived from it
    reissue    servers sign with the new CA; every node gets a certificate of the new CA (servers also a
               new admin certificate); the leader raises the Raft key generation to G, so the Raft
               transport moves to a key derived from the new CA key (accepted everywhere since `trust`)
    drop       every node trusts the new CA only
    done

A node that is down blocks the next phase (the CLI says which); nothing is lost by waiting. Re-running the
command resumes the rotation in progress instead of starting another. Tokens made before pin the old CA.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import sys
import time
import uuid

from cryptography.fernet import Fernet, InvalidToken

from cortex.core import domain
from cortex.core.commands import CommandError
from cortex.security import tls

log = logging.getLogger("cortex.ca_rotation")

PHASES = ("requested", "trust", "reissue", "drop", "done")
RAFT_FILE = "ca-rotation-raft-generation"  # servers, during a rotation: G, the first generation of the new key
NEXT = dict(zip(PHASES, PHASES[1:]))

MIGRATIONS = (
    """
    CREATE TABLE ca_rotation (
        slot INTEGER PRIMARY KEY CHECK (slot = 1),
        rot_id TEXT NOT NULL,
        phase TEXT NOT NULL,
        new_ca TEXT NOT NULL DEFAULT '',
        key_enc TEXT NOT NULL DEFAULT '',
        old_pin TEXT NOT NULL DEFAULT '',
        new_pin TEXT NOT NULL DEFAULT '',
        raft_generation INTEGER NOT NULL DEFAULT 0,
        started_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE ca_acks (
        node TEXT PRIMARY KEY,
        rot_id TEXT NOT NULL,
        phase TEXT NOT NULL,
        at REAL NOT NULL
    );
    """,
)


def _text(args: dict, key: str, limit: int = 8192, required: bool = True) -> str:
    value = args.get(key, "" if not required else None)
    if not isinstance(value, str) or (required and not value) or len(value) > limit:
        raise CommandError(f"{key} must be a string of at most {limit} characters")
    return value


def _v_request(args: dict) -> dict:
    if set(args) - {"rot_id"}:
        raise CommandError("ca.request takes rot_id only")
    return {"rot_id": _text(args, "rot_id", 64)}


def _v_advance(args: dict) -> dict:
    if set(args) - {"rot_id", "phase", "new_ca", "key_enc", "old_pin", "new_pin", "raft_generation"}:
        raise CommandError("unknown arguments to ca.advance")
    phase = args.get("phase")
    if phase not in PHASES[1:]:
        raise CommandError(f"phase must be one of {', '.join(PHASES[1:])}")
    generation = args.get("raft_generation", 0)
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
        raise CommandError("raft_generation must be a non-negative integer")
    out = {"rot_id": _text(args, "rot_id", 64), "phase": phase, "raft_generation": generation}
    for key in ("new_ca", "key_enc", "old_pin", "new_pin"):
        out[key] = _text(args, key, required=False)
    return out


def _v_ack(args: dict) -> dict:
    if set(args) - {"node", "rot_id", "phase"}:
        raise CommandError("ca.ack takes node, rot_id and phase")
    if args.get("phase") not in PHASES[1:4]:
        raise CommandError("phase must be trust, reissue or drop")
    return {"node": _text(args, "node", 200), "rot_id": _text(args, "rot_id", 64), "phase": args["phase"]}


def _row(db) -> dict | None:
    cur = db.execute("SELECT * FROM ca_rotation WHERE slot=1")
    row = cur.fetchone()
    return None if row is None else dict(zip([c[0] for c in cur.description], row))


def _a_request(db, index: int, env) -> dict:
    row = _row(db)
    if row is not None and row["phase"] != "done":  # one at a time: re-running resumes it
        return {"rot_id": row["rot_id"], "phase": row["phase"], "started": False}
    db.execute("DELETE FROM ca_acks")
    db.execute("INSERT OR REPLACE INTO ca_rotation (slot, rot_id, phase, started_at, updated_at) "
               "VALUES (1, ?, 'requested', ?, ?)", (env.args["rot_id"], env.ts, env.ts))
    return {"rot_id": env.args["rot_id"], "phase": "requested", "started": True}


def _a_advance(db, index: int, env) -> dict:
    a, row = env.args, _row(db)
    if row is None or row["rot_id"] != a["rot_id"] or NEXT.get(row["phase"]) != a["phase"]:
        return {"advanced": False, "phase": row["phase"] if row else ""}
    if a["phase"] == "trust":
        if not (a["new_ca"] and a["key_enc"] and a["new_pin"] and a["raft_generation"]):
            return {"advanced": False, "phase": row["phase"], "error": "trust needs the new CA"}
        db.execute("UPDATE ca_rotation SET new_ca=?, key_enc=?, old_pin=?, new_pin=?, raft_generation=? "
                   "WHERE slot=1", (a["new_ca"], a["key_enc"], a["old_pin"], a["new_pin"], a["raft_generation"]))
    db.execute("UPDATE ca_rotation SET phase=?, updated_at=? WHERE slot=1", (a["phase"], env.ts))
    return {"advanced": True, "phase": a["phase"]}


def _a_ack(db, index: int, env) -> dict:
    a = env.args
    db.execute("INSERT OR REPLACE INTO ca_acks VALUES (?, ?, ?, ?)", (a["node"], a["rot_id"], a["phase"], env.ts))
    return {"node": a["node"], "phase": a["phase"]}


def _q_rotation(db, args: dict) -> dict:
    row = _row(db)
    acks = {r[0]: {"rot_id": r[1], "phase": r[2]} for r in db.execute("SELECT node, rot_id, phase FROM ca_acks")}
    return {"rotation": row, "acks": acks}


def _events(env, result: dict) -> list[tuple[str, dict]]:
    if env.type == "ca.advance" and result.get("advanced"):
        return [("ca.rotation", {"rot_id": env.args["rot_id"], "phase": env.args["phase"]})]
    return []


DOMAIN = domain.Domain(
    name="ca",
    migrations=MIGRATIONS,
    tables=("ca_rotation", "ca_acks"),
    commands={
        "ca.request": domain.Command(validate=_v_request, apply=_a_request),
        "ca.advance": domain.Command(validate=_v_advance, apply=_a_advance, internal=True),
        "ca.ack": domain.Command(validate=_v_ack, apply=_a_ack),
    },
    queries={"ca.rotation": _q_rotation},
    events=_events,
)


def write_refusal(command_type: str, args: dict, peer: tls.Peer | None) -> str | None:
    """Only admins (and servers) start a rotation; a node acknowledges for itself only."""
    if peer is None or peer.role in ("server", "admin"):
        return None
    if command_type == "ca.request":
        return "only an admin starts a CA rotation: run it on a server (its admin certificate)"
    if command_type == "ca.ack" and args.get("node") != peer.name:
        return f"{peer.name} may acknowledge for itself only"
    return None


# --- the new CA's key, for servers only ---------------------------------------------------------------------

def _wrapping_key(ca_key_pem: bytes, rot_id: str) -> Fernet:
    digest = hmac.new(ca_key_pem, f"cortex ca rotation {rot_id}".encode(), hashlib.sha256).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def wrap_key(old_ca_key: bytes, rot_id: str, new_key: bytes) -> str:
    return _wrapping_key(old_ca_key, rot_id).encrypt(new_key).decode()


def unwrap_key(ca_key: bytes, rot_id: str, key_enc: str) -> bytes | None:
    try:
        return _wrapping_key(ca_key, rot_id).decrypt(key_enc.encode())
    except InvalidToken:
        return None


# --- the leader's part ------------------------------------------------------------------------------------

def leader_action(doc: dict, members: list[str], ca_cert: bytes, ca_key: bytes, cluster_id: str,
                  raft_generation: int) -> dict | None:
    """The ca.advance to propose now (None: nothing to do). Pure but for making the new CA."""
    row = doc.get("rotation")
    if row is None or row["phase"] == "done":
        return None
    if row["phase"] == "requested":
        new_ca, new_key = tls.new_ca(cluster_id)
        return {"rot_id": row["rot_id"], "phase": "trust", "new_ca": new_ca.decode(),
                "key_enc": wrap_key(ca_key, row["rot_id"], new_key), "old_pin": tls.ca_pin(ca_cert),
                "new_pin": tls.ca_pin(new_ca), "raft_generation": raft_generation + 1}
    if pending(doc, members):
        return None
    return {"rot_id": row["rot_id"], "phase": NEXT[row["phase"]]}


def active_members(nodes: list[dict]) -> list[str]:
    """The nodes a phase waits for: members of the `nodes` query, not those that have left."""
    return sorted(n["id"] for n in nodes if n.get("state", "member") not in ("left", "removed"))


def pending(doc: dict, members: list[str]) -> list[str]:
    """Members that have not acknowledged the current phase."""
    row = doc.get("rotation")
    if row is None or row["phase"] in ("requested", "done"):
        return []
    acks = doc.get("acks", {})
    return sorted(m for m in members if acks.get(m) != {"rot_id": row["rot_id"], "phase": row["phase"]})


# --- each node's part -------------------------------------------------------------------------------------

def bundle(*pems: bytes) -> bytes:
    """CA certificates in this order, each once."""
    out: list[bytes] = []
    for pem in pems:
        for cert in tls.split_pems(pem):
            if cert not in out:
                out.append(cert)
    return b"".join(out)


def node_step(row: dict, certs, raft_keys=None) -> bool:
    """Do this node's part of `row`'s phase (idempotent); True once it is done (acknowledge it).
    `certs` is the node's certs.NodeCerts; `raft_keys` its RotatingEncryptor (servers)."""
    directory, phase = certs.dir, row["phase"]
    new_ca = row["new_ca"].encode()
    current = tls.read(directory, "ca.crt") or b""
    server = certs.can_sign()
    key = b""
    if server and phase in ("trust", "reissue"):
        key = _new_key(certs, row)
        if key is None:
            return False
        if raft_keys is not None:  # accept the Raft generation derived from the new key from now on
            raft_keys.add_ca_key(row["raft_generation"], key)
        tls.write_file(directory / RAFT_FILE, str(row["raft_generation"]).encode())
    if phase == "trust":
        _write_ca(certs, bundle(current, new_ca))
        return True
    if phase == "reissue":
        if server:
            old_key = tls.read(directory, "ca.key")
            if old_key != key:
                tls.write_file(directory / "ca-prev.key", old_key or b"")  # lower Raft generations, after a restart
                tls.write_file(directory / "ca.key", key)  # sign with the new CA from now on
        _write_ca(certs, bundle(new_ca, current))
        node_ok = tls.issued_by(tls.read(directory, "node.crt") or b"", new_ca)
        admin = tls.read(directory, "admin.crt")
        admin_ok = not server or (admin is not None and tls.issued_by(admin, new_ca))
        raft_ok = raft_keys is None or raft_keys.generation >= row["raft_generation"]
        return node_ok and admin_ok and raft_ok
    if phase == "drop":
        _write_ca(certs, new_ca)
        for name in ("ca-next.key", "ca-prev.key", RAFT_FILE):
            (directory / name).unlink(missing_ok=True)
        return True
    return False


def restore_raft_keys(certs, raft_keys) -> None:
    """After a restart in the middle of a rotation: which CA key each Raft generation derives from."""
    try:
        generation = int((certs.dir / RAFT_FILE).read_text())
    except (OSError, ValueError):
        return
    prev, current, nxt = (tls.read(certs.dir, n) for n in ("ca-prev.key", "ca.key", "ca-next.key"))
    if prev:  # reissued: ca.key is already the new key
        raft_keys.add_ca_key(0, prev)
        raft_keys.add_ca_key(generation, current)
    elif nxt:
        raft_keys.add_ca_key(generation, nxt)


def _new_key(certs, row: dict) -> bytes | None:
    directory = certs.dir
    new_ca = row["new_ca"].encode()
    for candidate in (tls.read(directory, "ca-next.key"), tls.read(directory, "ca.key")):
        if candidate and tls.key_matches(new_ca, candidate):
            return candidate  # kept from an earlier step, or a server that joined after the switch
    key = unwrap_key(tls.read(directory, "ca.key") or b"", row["rot_id"], row["key_enc"])
    if key is None or not tls.key_matches(new_ca, key):
        log.error("cannot unwrap the new CA key (this server's CA key is not the one it was wrapped with)")
        return None
    tls.write_file(directory / "ca-next.key", key)
    return key


def _write_ca(certs, pem: bytes) -> None:
    if tls.read(certs.dir, "ca.crt") != pem:
        tls.write_file(certs.dir / "ca.crt", pem, 0o644)
        log.info("trusted CAs changed", extra={"cas": [tls.ca_pin(c)[:16] for c in tls.split_pems(pem)]})


def needs_reissue(row: dict | None, certs) -> bool:
    """In the reissue phase, once this node signs with (or trusts first) the new CA: renew now."""
    if row is None or row["phase"] != "reissue":
        return False
    new_ca = row["new_ca"].encode()
    ca_first = tls.split_pems(tls.read(certs.dir, "ca.crt") or b"")[:1]
    if ca_first != [tls.split_pems(new_ca)[0]]:
        return False
    admin = tls.read(certs.dir, "admin.crt")
    return not tls.issued_by(tls.read(certs.dir, "node.crt") or b"", new_ca) or (
        certs.can_sign() and admin is not None and not tls.issued_by(admin, new_ca))


# --- the CLI ----------------------------------------------------------------------------------------------

def run(client, timeout: float, emit_progress, rot_id: str = "") -> dict:
    """Start (or resume) a rotation and follow it until done or `timeout`."""
    started = client.write("ca.request", {"rot_id": rot_id or uuid.uuid4().hex[:16]},
                           idempotency_key=f"ca-request-{rot_id}" if rot_id else None, retry_for=15)
    deadline = time.monotonic() + timeout
    last = None
    while True:
        doc = client.read("ca.rotation", {}, level="leader")
        members = active_members(client.read("nodes", {}, level="leader"))
        row = doc["rotation"] or {}
        waiting = pending(doc, members)
        state = (row.get("phase"), tuple(waiting))
        if state != last:
            emit_progress(row.get("phase", ""), len(members) - len(waiting), len(members), waiting)
            last = state
        if row.get("phase") == "done" and row.get("rot_id") == started["rot_id"]:
            return {"rot_id": row["rot_id"], "phase": "done", "resumed": not started["started"],
                    "old_pin": row["old_pin"], "new_pin": row["new_pin"], "raft_generation": row["raft_generation"]}
        if time.monotonic() > deadline:
            return {"rot_id": row.get("rot_id"), "phase": row.get("phase"), "waiting_for": waiting,
                    "resumed": not started["started"], "timed_out": True}
        time.sleep(0.5)


def progress_printer(as_json: bool):
    """Progress lines on stderr in both modes (with --json, stdout holds only the result)."""
    def show(phase: str, done: int, total: int, waiting: list[str]) -> None:
        tail = f" (waiting for {', '.join(waiting)})" if waiting else ""
        print(f"  {phase:9} {done}/{total} nodes{tail}", file=sys.stderr, flush=True)
    return show


def dumps(doc: dict) -> str:
    return json.dumps(doc, indent=2)

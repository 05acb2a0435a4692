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

This module is the replicated part (pure: the same on every replica); rotation_driver.py is what the leader
and each node do about it, and cli.py follows it for `cortex secrets rotate --ca`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cortex.core import domain
from cortex.core.args import CommandError

if TYPE_CHECKING:
    from cortex.security.tls import Peer

PHASES = ("requested", "trust", "reissue", "drop", "done")
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


def write_refusal(command_type: str, args: dict, peer: Peer | None) -> str | None:
    """Only admins (and servers) start a rotation; a node acknowledges for itself only."""
    if peer is None or peer.role in ("server", "admin"):
        return None
    if command_type == "ca.request":
        return "only an admin starts a CA rotation: run it on a server (its admin certificate)"
    if command_type == "ca.ack" and args.get("node") != peer.name:
        return f"{peer.name} may acknowledge for itself only"
    return None


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
    refuse=write_refusal,
)


# --- reading the rotation (the leader, the CLI) -----------------------------------------------------------

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

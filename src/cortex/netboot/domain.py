"""Replicated netboot state: one row per boot that the provisioning service answered (an *enrollment*).

Lifecycle of an enrollment (the `state` column):

    issued     the service rendered a boot script for a machine and minted a single-use worker token
    joined     the node named in the script joined the cluster *with that token* (leader-decided)
    reported   the node itself reported in (`cortex netboot ephemeral run`): it runs from RAM
    left       it left the cluster cleanly (shutdown)
    collected  the leader removed it from membership after it stayed offline too long
    superseded a newer boot of the same node id was issued before this one was used

Everything here is deterministic: handlers use only their arguments, the database and `env.ts`/`env.id`.
"""

from __future__ import annotations

import re

from cortex.core.args import NODE_ID_RE, CommandError, no_extra
from cortex.core.domain import Command, Domain

MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
TOKEN_ID_RE = re.compile(r"^[0-9a-f]{12}$")
_SAFE_RE = re.compile(r"^[A-Za-z0-9._:-]{0,128}$")
ACTIVE = ("joined", "reported")
STATES = ("issued", "joined", "reported", "left", "collected", "superseded")

MIGRATIONS = (
    """
    CREATE TABLE netboot_enrollments (
        id TEXT PRIMARY KEY,
        machine TEXT NOT NULL,
        mac TEXT NOT NULL,
        uuid TEXT NOT NULL,
        serial TEXT NOT NULL,
        grp TEXT NOT NULL,
        profile TEXT NOT NULL,
        node_id TEXT NOT NULL,
        token_id TEXT NOT NULL,
        token_expires_at REAL,
        ephemeral INTEGER NOT NULL,
        gc_offline_after REAL,
        idle_poweroff_after REAL,
        served_by TEXT NOT NULL,
        state TEXT NOT NULL,
        boot_id TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX netboot_enrollments_by_node ON netboot_enrollments (node_id, created_at);
    CREATE INDEX netboot_enrollments_by_machine ON netboot_enrollments (machine, created_at);
    """,
)

_COLUMNS = ("id", "machine", "mac", "uuid", "serial", "grp", "profile", "node_id", "token_id", "token_expires_at",
            "ephemeral", "gc_offline_after", "idle_poweroff_after", "served_by", "state", "boot_id", "created_at",
            "updated_at")


# --- validators ---------------------------------------------------------------------------------------------

def _text(args: dict, name: str, pattern: re.Pattern = _SAFE_RE, optional: bool = False) -> str:
    value = args.get(name, "" if optional else None)
    if not isinstance(value, str) or not pattern.match(value):
        raise CommandError(f"argument {name!r} is missing or malformed")
    return value


def _seconds(args: dict, name: str) -> float | None:
    value = args.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise CommandError(f"argument {name!r} must be a non-negative number of seconds or null")
    return float(value)


def _v_enroll(args: dict) -> dict:
    allowed = {"machine", "mac", "uuid", "serial", "group", "profile", "node_id", "token_id", "token_expires_at",
               "ephemeral", "gc_offline_after", "idle_poweroff_after", "served_by"}
    no_extra(args, allowed)
    mac = _text(args, "mac", optional=True)
    if mac and not MAC_RE.match(mac):
        raise CommandError("argument 'mac' must be aa:bb:cc:dd:ee:ff (lower case)")
    if not isinstance(args.get("ephemeral"), bool):
        raise CommandError("argument 'ephemeral' must be true or false")
    return {
        "machine": _text(args, "machine"),
        "mac": mac,
        "uuid": _text(args, "uuid", optional=True),
        "serial": _text(args, "serial", optional=True),
        "group": _text(args, "group"),
        "profile": _text(args, "profile"),
        "node_id": _text(args, "node_id", NODE_ID_RE),
        "token_id": _text(args, "token_id", TOKEN_ID_RE),
        "token_expires_at": _seconds(args, "token_expires_at"),
        "ephemeral": args["ephemeral"],
        "gc_offline_after": _seconds(args, "gc_offline_after"),
        "idle_poweroff_after": _seconds(args, "idle_poweroff_after"),
        "served_by": _text(args, "served_by"),
    }


def _v_node(args: dict) -> dict:
    no_extra(args, {"node_id"})
    return {"node_id": _text(args, "node_id", NODE_ID_RE)}


def _v_report(args: dict) -> dict:
    no_extra(args, {"node_id", "boot_id", "ephemeral"})
    if args.get("ephemeral") is not True:
        raise CommandError("argument 'ephemeral' must be true (only ephemeral nodes report here)")
    return {"node_id": _text(args, "node_id", NODE_ID_RE), "boot_id": _text(args, "boot_id"), "ephemeral": True}


def _v_left(args: dict) -> dict:
    no_extra(args, {"node_id", "reason"})
    reason = args.get("reason")
    if reason not in ("left", "collected"):
        raise CommandError("argument 'reason' must be left or collected")
    return {"node_id": _text(args, "node_id", NODE_ID_RE), "reason": reason}


# --- handlers (pure: db, index, envelope) ------------------------------------------------------------------

def _latest(db, node_id: str, states: tuple[str, ...]) -> tuple | None:
    marks = ",".join("?" * len(states))
    return db.execute(f"SELECT id, state FROM netboot_enrollments WHERE node_id=? AND state IN ({marks}) "
                      "ORDER BY created_at DESC, id DESC LIMIT 1", (node_id, *states)).fetchone()


def _h_enroll(db, index, env) -> dict:
    a = env.args
    superseded = db.execute("UPDATE netboot_enrollments SET state='superseded', updated_at=? "
                            "WHERE node_id=? AND state='issued'", (env.ts, a["node_id"])).rowcount
    db.execute(
        f"INSERT INTO netboot_enrollments ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
        (env.id, a["machine"], a["mac"], a["uuid"], a["serial"], a["group"], a["profile"], a["node_id"],
         a["token_id"], a["token_expires_at"], int(a["ephemeral"]), a["gc_offline_after"],
         a["idle_poweroff_after"], a["served_by"], "issued", "", env.ts, env.ts),
    )
    return {"enrollment": env.id, "node_id": a["node_id"], "superseded": superseded}


def _h_joined(db, index, env) -> dict:
    """The node joined: mark its issued enrollment joined, but only if the enrollment's token was spent.

    A node that joined under the same name with some other token (an operator's) is not this boot."""
    node_id = env.args["node_id"]
    row = _latest(db, node_id, ("issued",))
    if row is None:
        return {"node_id": node_id, "changed": False}
    token_id = db.execute("SELECT token_id FROM netboot_enrollments WHERE id=?", (row[0],)).fetchone()[0]
    spent = db.execute("SELECT 1 FROM join_tokens WHERE token_hash LIKE ? AND uses_left=0",
                       (token_id + "%",)).fetchone()
    if spent is None:
        return {"node_id": node_id, "changed": False, "reason": "the enrollment's token was not used"}
    db.execute("UPDATE netboot_enrollments SET state='joined', updated_at=? WHERE id=?", (env.ts, row[0]))
    return {"node_id": node_id, "changed": True, "enrollment": row[0]}


def _h_report(db, index, env) -> dict:
    node_id = env.args["node_id"]
    row = _latest(db, node_id, ("joined", "reported"))
    if row is None:
        return {"error": f"no joined netboot enrollment for node {node_id}; was it booted by `cortex netboot serve`?"}
    db.execute("UPDATE netboot_enrollments SET state='reported', boot_id=?, updated_at=? WHERE id=?",
               (env.args["boot_id"], env.ts, row[0]))
    policy = db.execute("SELECT idle_poweroff_after, gc_offline_after FROM netboot_enrollments WHERE id=?",
                        (row[0],)).fetchone()
    return {"node_id": node_id, "enrollment": row[0], "idle_poweroff_after": policy[0],
            "gc_offline_after": policy[1]}


def _h_left(db, index, env) -> dict:
    node_id, reason = env.args["node_id"], env.args["reason"]
    row = _latest(db, node_id, ACTIVE)
    if row is None:
        return {"node_id": node_id, "changed": False}
    db.execute("UPDATE netboot_enrollments SET state=?, updated_at=? WHERE id=?", (reason, env.ts, row[0]))
    return {"node_id": node_id, "changed": True, "enrollment": row[0], "state": reason}


# --- queries ------------------------------------------------------------------------------------------------

def _rows(db, sql: str, params: tuple = ()) -> list[dict]:
    out = []
    for row in db.execute(sql, params):
        doc = dict(zip(_COLUMNS, row))
        doc["ephemeral"] = bool(doc["ephemeral"])
        doc["group"] = doc.pop("grp")
        out.append(doc)
    return out


def _q_machines(db, args) -> list[dict]:
    """The latest enrollment of each machine, with how many boots it had."""
    rows = _rows(db, f"SELECT {', '.join(_COLUMNS)} FROM netboot_enrollments e WHERE id = ("
                     "SELECT id FROM netboot_enrollments WHERE machine=e.machine "
                     "ORDER BY created_at DESC, id DESC LIMIT 1) ORDER BY machine")
    counts = dict(db.execute("SELECT machine, count(*) FROM netboot_enrollments GROUP BY machine").fetchall())
    for row in rows:
        row["boots"] = counts.get(row["machine"], 0)
    return rows


def _q_enrollments(db, args) -> list[dict]:
    node_id = args.get("node_id", "")
    limit = args.get("limit", 100)
    if not isinstance(node_id, str) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
        raise ValueError("netboot.enrollments takes a string 'node_id' and a 'limit' of 1..10000")
    where, params = ("WHERE node_id=?", (node_id,)) if node_id else ("", ())
    return _rows(db, f"SELECT {', '.join(_COLUMNS)} FROM netboot_enrollments {where} "
                     "ORDER BY created_at DESC, id DESC LIMIT ?", (*params, limit))


def _q_active(db, args) -> list[dict]:
    """What the leader's reconciler looks at: enrollments that may still join (token not yet expired at
    `now`), or whose node is (or should no longer be) a member."""
    now = args.get("now", 0)
    if isinstance(now, bool) or not isinstance(now, (int, float)):
        raise ValueError("netboot.active takes a number 'now'")
    return _rows(db, f"SELECT {', '.join(_COLUMNS)} FROM netboot_enrollments "
                     "WHERE state IN ('joined', 'reported') "
                     "OR (state='issued' AND (token_expires_at IS NULL OR token_expires_at >= ?)) "
                     "OR (state='collected' AND updated_at >= ?) "  # removal retried for an hour
                     "ORDER BY created_at", (now, now - 3600))


def _events(env, result: dict) -> list[tuple[str, dict]]:
    if "error" in result or result.get("duplicate"):
        return []
    if env.type == "netboot.enroll":
        return [("netboot.enrolled", {"node_id": env.args["node_id"], "machine": env.args["machine"],
                                      "profile": env.args["profile"]})]
    if env.type == "netboot.joined" and result.get("changed"):
        return [("netboot.joined", {"node_id": env.args["node_id"]})]
    if env.type == "netboot.report":
        return [("netboot.reported", {"node_id": env.args["node_id"]})]
    if env.type == "netboot.left" and result.get("changed"):
        return [(f"netboot.{env.args['reason']}", {"node_id": env.args["node_id"]})]
    return []


DOMAIN = Domain(
    name="netboot",
    migrations=MIGRATIONS,
    tables=("netboot_enrollments",),
    commands={
        # Written by the provisioning service, which may run on any node (forwarded to the leader).
        "netboot.enroll": Command(_v_enroll, _h_enroll),
        # Written by the netbooted node itself.
        "netboot.report": Command(_v_report, _h_report),
        # Decided by the leader's netboot plugin from membership events and liveness.
        "netboot.joined": Command(_v_node, _h_joined, internal=True),
        "netboot.left": Command(_v_left, _h_left, internal=True),
    },
    queries={"netboot.machines": _q_machines, "netboot.enrollments": _q_enrollments, "netboot.active": _q_active},
    events=_events,
)

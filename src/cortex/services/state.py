r"""The `service` state domain: desired services, who holds each one under which epoch, and what nodes report.

A service is held by exactly one node at a time, named in `holder` together with an `epoch` (the fencing
token). Every change of holder bumps the epoch, so a node that acts on an older view can be told apart:

    running (home holds it) --takeover/drain/lease lost--> taken_over (a partner holds it)
    taken_over --giveback (planned, or automatic after giveback_after)--> giving_back --healthy report--> running
    giving_back --the home could not run it--> taken_over (reason says why)

A new holder may start the service only once the previous one has let go: it reported, having seen the new
epoch, that it runs nothing (`released`), or it lost its lease and the leader moved the service only after
that lease had certainly expired (`prev_fenced`). Node reports (`service.report`) are also the lease
renewals (services/lease.py); their output chunks are capped per service like task output.
"""

from __future__ import annotations

import json
import re

from cortex.core import domain
from cortex.core.args import NODE_ID_RE
from cortex.core.commands import CommandError, Envelope
from cortex.services import spec as specs

LEVEL = 2  # the state-machine level that introduced these commands (core/domain.py, levels)
OUTPUT_CAP = 256 * 1024  # bytes of output kept per service (the newest)
MAX_CHUNK = 16 * 1024
HA_STATES = ("running", "taken_over", "giving_back", "failed")
RUN_STATES = ("starting", "running", "backoff", "stopped", "failed", "fenced", "syncing", "waiting", "stopping")
ACTIVE_RUN_STATES = ("starting", "running", "backoff", "syncing", "stopping")
_TEXT_RE = re.compile(r"^[\s\S]{0,2000}$")

MIGRATIONS = ("""
    CREATE TABLE services (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        home TEXT NOT NULL,
        holder TEXT NOT NULL,
        epoch INTEGER NOT NULL,             -- the fencing token: bumped by every change of holder
        state TEXT NOT NULL,                -- running | taken_over | giving_back | failed
        reason TEXT NOT NULL DEFAULT '',
        prev_holder TEXT NOT NULL DEFAULT '',
        prev_fenced INTEGER NOT NULL DEFAULT 0,  -- the previous holder's lease had expired when it moved
        released INTEGER NOT NULL DEFAULT 0,     -- the previous holder reported it runs nothing at this epoch
        planned INTEGER NOT NULL DEFAULT 0,
        moved_at REAL,
        ready_at REAL,
        last_downtime REAL,
        restart_gen INTEGER NOT NULL DEFAULT 0,
        takeovers INTEGER NOT NULL DEFAULT 0,
        givebacks INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE service_reports (
        node_id TEXT NOT NULL,
        name TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        state TEXT NOT NULL,
        healthy INTEGER NOT NULL DEFAULT 0,
        pid INTEGER,
        restarts INTEGER NOT NULL DEFAULT 0,
        detail TEXT NOT NULL DEFAULT '',
        at REAL NOT NULL,
        PRIMARY KEY (node_id, name)
    );
    CREATE TABLE service_nodes (
        node_id TEXT PRIMARY KEY,
        networks TEXT NOT NULL DEFAULT '[]',
        caps TEXT NOT NULL DEFAULT '{}',     -- kinds, volume_sync, floating
        reported_at REAL NOT NULL
    );
    CREATE TABLE service_output (
        name TEXT NOT NULL,
        seq INTEGER NOT NULL,
        node_id TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        stream TEXT NOT NULL,
        data TEXT NOT NULL,
        ts REAL NOT NULL,
        PRIMARY KEY (name, seq)
    );
""", """
    -- the age of a node's copy of a service's volume when it reported (replicate.py): the lag a takeover loses
    ALTER TABLE service_reports ADD COLUMN sync_age REAL;
    ALTER TABLE service_reports ADD COLUMN synced_from TEXT NOT NULL DEFAULT '';
    ALTER TABLE service_reports ADD COLUMN sync_error TEXT NOT NULL DEFAULT '';
""")
TABLES = ("services", "service_reports", "service_nodes", "service_output")
COLUMNS = ("name", "spec", "home", "holder", "epoch", "state", "reason", "prev_holder", "prev_fenced", "released",
           "planned", "moved_at", "ready_at", "last_downtime", "restart_gen", "takeovers", "givebacks", "created_at",
           "updated_at")
REPORT_COLUMNS = ("node_id", "name", "epoch", "state", "healthy", "pid", "restarts", "detail", "at", "sync_age",
                  "synced_from", "sync_error")


# --- validators ----------------------------------------------------------------------------------------------

def _node(args: dict, key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not NODE_ID_RE.match(value):
        raise CommandError(f"{key} must be a node id (see `cortex nodes`)")
    return value


def _name(args: dict) -> str:
    value = args.get("name")
    if not isinstance(value, str) or not specs.NAME_RE.match(value):
        raise CommandError("name must be a service name (see `cortex services list`)")
    return value


def _only(args: dict, allowed: set[str], command: str) -> None:
    extra = set(args) - allowed
    if extra:
        raise CommandError(f"{command}: unknown argument(s) {', '.join(sorted(extra))}")


def _v_deploy(args: dict) -> dict:
    _only(args, {"spec"}, "service.deploy")
    return {"spec": specs.validate(args.get("spec"))}


def _v_name(command: str):
    def check(args: dict) -> dict:
        _only(args, {"name"}, command)
        return {"name": _name(args)}
    return check


def _v_node(command: str):
    def check(args: dict) -> dict:
        _only(args, {"node", "reason"}, command)
        reason = args.get("reason", "")
        if not isinstance(reason, str) or len(reason) > 500:
            raise CommandError("reason must be a string of at most 500 characters")
        return {"node": _node(args, "node"), "reason": reason}
    return check


def _v_move(args: dict) -> dict:
    _only(args, {"name", "epoch", "holder", "state", "reason", "planned", "fenced"}, "service.move")
    epoch = args.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise CommandError("epoch must be the service's current epoch")
    if args.get("state") not in HA_STATES:
        raise CommandError(f"state must be one of {', '.join(HA_STATES)}")
    reason = args.get("reason", "")
    if not isinstance(reason, str) or len(reason) > 2000:
        raise CommandError("reason must be a string of at most 2000 characters")
    return {"name": _name(args), "epoch": epoch, "holder": _node(args, "holder"), "state": args["state"],
            "reason": reason, "planned": bool(args.get("planned", False)), "fenced": bool(args.get("fenced", False))}


def _v_report(args: dict) -> dict:
    _only(args, {"node_id", "networks", "caps", "services"}, "service.report")
    networks, caps, items = args.get("networks", []), args.get("caps", {}), args.get("services", [])
    partial = {k for k in ("networks", "caps") if k not in args}  # not told: what was reported before stays
    if not isinstance(networks, list) or len(networks) > 256 or not all(isinstance(n, str) and len(n) < 64 for n in networks):
        raise CommandError(f"networks must be a list of at most 256 CIDRs, not {str(networks)[:200]}")
    if not isinstance(caps, dict) or len(json.dumps(caps)) > 4096:
        raise CommandError("caps must be a small mapping")
    if not isinstance(items, list) or len(items) > 1000:
        raise CommandError("services must be a list of at most 1000 reports")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise CommandError("each service report is a mapping")
        _only(item, {"name", "epoch", "state", "healthy", "pid", "restarts", "detail", "output", "sync_age",
                     "synced_from", "sync_error"}, "service report")
        if item.get("state") not in RUN_STATES:
            raise CommandError(f"a report's state must be one of {', '.join(RUN_STATES)}")
        epoch, restarts, pid = item.get("epoch", 0), item.get("restarts", 0), item.get("pid")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in (epoch, restarts)) or \
                (pid is not None and (isinstance(pid, bool) or not isinstance(pid, int))):
            raise CommandError("epoch, restarts and pid must be integers")
        detail = item.get("detail", "")
        if not isinstance(detail, str) or not _TEXT_RE.match(detail):
            raise CommandError("detail must be a string of at most 2000 characters")
        output = item.get("output", [])
        if not isinstance(output, list) or not all(
                isinstance(o, list) and len(o) == 2 and o[0] in ("stdout", "stderr") and isinstance(o[1], str)
                and len(o[1]) <= MAX_CHUNK for o in output) or len(output) > 64:
            raise CommandError(f"output must be a list of [stream, text] chunks of at most {MAX_CHUNK} characters")
        sync_age, synced_from, sync_error = item.get("sync_age"), item.get("synced_from", ""), item.get("sync_error", "")
        if sync_age is not None and (isinstance(sync_age, bool) or not isinstance(sync_age, (int, float))
                                     or not 0 <= sync_age < 1e10):
            raise CommandError("sync_age must be the seconds since the volume copy was synced")
        if synced_from and (not isinstance(synced_from, str) or not NODE_ID_RE.match(synced_from)):
            raise CommandError("synced_from must be a node id")
        if not isinstance(sync_error, str) or not _TEXT_RE.match(sync_error):
            raise CommandError("sync_error must be a string of at most 2000 characters")
        out.append({"name": _name(item), "epoch": epoch, "state": item["state"], "healthy": bool(item.get("healthy")),
                    "pid": pid, "restarts": restarts, "detail": detail, "output": output,
                    "sync_age": None if sync_age is None else float(sync_age), "synced_from": synced_from or "",
                    "sync_error": sync_error})
    doc = {"node_id": _node(args, "node_id"), "networks": sorted(set(networks)), "caps": caps, "services": out}
    return {k: v for k, v in doc.items() if k not in partial}


# --- handlers ------------------------------------------------------------------------------------------------

def get_row(db, name: str) -> dict | None:
    r = db.execute(f"SELECT {', '.join(COLUMNS)} FROM services WHERE name=?", (name,)).fetchone()
    if r is None:
        return None
    row = dict(zip(COLUMNS, r))
    row["spec"] = json.loads(row["spec"])
    return row


def _known_nodes(db) -> dict[str, str]:
    return {r[0]: r[1] for r in db.execute("SELECT id, liveness FROM nodes")}


def _h_deploy(db, index, env: Envelope) -> dict:
    spec = env.args["spec"]
    known = _known_nodes(db)
    for node in specs.nodes_of(spec):
        if known.get(node) in (None, "left"):
            return {"error": f"placement names node {node!r}, which is not a member of this cluster; "
                             "see `cortex nodes` for the node ids"}
    if spec["vip"]:
        networks = [json.loads(r[0]) for r in db.execute("SELECT networks FROM service_nodes")]
        if not any(specs.vip_fits(spec["vip"], n) for n in networks):
            return {"error": f"vip {spec['vip']} lies outside every network the nodes report "
                             "(`cortex ha status --json` lists them); pick an address in the nodes' LAN"}
    others = [json.loads(r[0]) for r in db.execute("SELECT spec FROM services WHERE name != ?", (spec["name"],))]
    clash = specs.port_clash(spec, others)
    if clash:
        return {"error": clash}
    row = get_row(db, spec["name"])
    text = json.dumps(spec, sort_keys=True)
    if row is None:
        db.execute(f"INSERT INTO services ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                   (spec["name"], text, spec["placement"]["home"], spec["placement"]["home"], 1, "running", "", "",
                    0, 1, 0, env.ts, None, None, 0, 0, 0, env.ts, env.ts))
        return {"name": spec["name"], "created": True, "holder": spec["placement"]["home"], "epoch": 1}
    if json.dumps(row["spec"], sort_keys=True) == text:
        return {"name": spec["name"], "created": False, "unchanged": True, "holder": row["holder"], "epoch": row["epoch"]}
    # A changed spec restarts the instance (restart_gen); where it runs changes only through takeover/giveback,
    # unless the holder is no longer among the placement's nodes.
    holder = row["holder"] if row["holder"] in specs.nodes_of(spec) else spec["placement"]["home"]
    moved = holder != row["holder"]
    db.execute("UPDATE services SET spec=?, home=?, restart_gen=restart_gen+1, updated_at=?, holder=?, epoch=epoch+?, "
               "prev_holder=CASE WHEN ? THEN holder ELSE prev_holder END, released=CASE WHEN ? THEN 0 ELSE released END, "
               "state=CASE WHEN ? THEN 'running' ELSE state END WHERE name=?",
               (text, spec["placement"]["home"], env.ts, holder, int(moved), int(moved), int(moved),
                int(holder == spec["placement"]["home"]), spec["name"]))
    return {"name": spec["name"], "created": False, "updated": True, "holder": holder,
            "epoch": row["epoch"] + int(moved)}


def _h_remove(db, index, env: Envelope) -> dict:
    name = env.args["name"]
    removed = db.execute("DELETE FROM services WHERE name=?", (name,)).rowcount
    db.execute("DELETE FROM service_output WHERE name=?", (name,))
    return {"name": name, "removed": bool(removed)}


def _h_restart(db, index, env: Envelope) -> dict:
    name = env.args["name"]
    if not db.execute("UPDATE services SET restart_gen=restart_gen+1, updated_at=? WHERE name=?",
                      (env.ts, name)).rowcount:
        return {"error": f"no service {name!r}; see `cortex services list`"}
    return {"name": name, "restarted": True}


def move(db, env: Envelope, row: dict, holder: str, state: str, reason: str, planned: bool, fenced: bool) -> dict:
    """Give `row`'s service to `holder` under the next epoch (or only restate it when the holder stays)."""
    if holder == row["holder"]:
        db.execute("UPDATE services SET state=?, reason=?, updated_at=? WHERE name=?", (state, reason, env.ts, row["name"]))
        return {"name": row["name"], "holder": holder, "epoch": row["epoch"], "moved": False, "state": state}
    takeover = int(holder != row["home"])
    db.execute("UPDATE services SET holder=?, epoch=epoch+1, state=?, reason=?, prev_holder=?, prev_fenced=?, released=0, "
               "planned=?, moved_at=?, ready_at=NULL, updated_at=?, takeovers=takeovers+?, givebacks=givebacks+? "
               "WHERE name=?", (holder, state, reason, row["holder"], int(fenced), int(planned), env.ts, env.ts,
                                takeover, 1 - takeover, row["name"]))
    return {"name": row["name"], "holder": holder, "from": row["holder"], "epoch": row["epoch"] + 1, "moved": True,
            "state": state, "planned": planned, "fenced": fenced}


def _h_move(db, index, env: Envelope) -> dict:
    a = env.args
    row = get_row(db, a["name"])
    if row is None:
        return {"error": f"no service {a['name']!r}"}
    if row["epoch"] != a["epoch"]:
        return {"error": f"service {a['name']} is at epoch {row['epoch']}, not {a['epoch']}: decided on an old view"}
    return move(db, env, row, a["holder"], a["state"], a["reason"], a["planned"], a["fenced"])


def candidates(db, row: dict) -> list[str]:
    """Where `row`'s service may go, in order: the named partners, then nodes with the partner labels."""
    spec = row["spec"]
    out = list(spec["placement"]["partners"])
    labels = spec["placement"].get("partner_labels") or {}
    if labels:
        for node_id, text in db.execute("SELECT node_id, labels FROM task_nodes ORDER BY node_id"):
            have = json.loads(text or "{}")
            if node_id != spec["placement"]["home"] and node_id not in out and all(have.get(k) == v for k, v in labels.items()):
                out.append(node_id)
    return out


def ready_nodes(db) -> dict[str, dict]:
    """Nodes able to take a service now by the replicated view: alive, not drained, running this plugin."""
    drained = {r[0] for r in db.execute("SELECT node_id FROM task_nodes WHERE drained=1")}
    out = {}
    for node_id, liveness, caps in db.execute(
            "SELECT n.id, n.liveness, s.caps FROM nodes n JOIN service_nodes s ON s.node_id = n.id"):
        if liveness == "alive" and node_id not in drained:
            out[node_id] = json.loads(caps)
    return out


def refusal(row: dict, target: str, ready: dict[str, dict], planned: bool = True) -> str:
    """Why `target` cannot take `row`'s service ('' when it can). An unplanned takeover goes ahead without
    volume sync (the service is back, on the partner's own copy, and its report says so); a planned move
    does not leave the data behind."""
    spec = row["spec"]
    if target not in ready:
        return f"{target} is not ready (offline, drained, or not running the services plugin)"
    caps = ready[target]
    if spec["kind"] not in caps.get("kinds", []):
        return f"{target} cannot run {spec['kind']} services ({caps.get('why', {}).get(spec['kind'], 'not available')})"
    if planned and spec["volume"] and row["holder"] != target and not caps.get("volume_sync"):
        return (f"the volume is not replicated: {target} has no volume sync, so moving would leave the data behind; "
                f"it stays on {row['holder']}")
    return ""


def _h_takeover(db, index, env: Envelope) -> dict:
    node = env.args["node"]
    if node not in _known_nodes(db):
        return {"error": f"no node {node!r} in this cluster; see `cortex nodes`"}
    ready = ready_nodes(db)
    moved, refused = [], []
    for (name,) in db.execute("SELECT name FROM services WHERE holder=? ORDER BY name", (node,)).fetchall():
        row = get_row(db, name)
        why = []
        for target in [t for t in [row["home"], *candidates(db, row)] if t != node]:
            problem = refusal(row, target, ready)
            if not problem:
                moved.append(move(db, env, row, target, "running" if target == row["home"] else "taken_over",
                                  env.args["reason"] or f"planned takeover of {node}", True, False))
                break
            why.append(problem)
        else:
            refused.append({"name": name, "why": "; ".join(why) or "the service has no partner"})
    return {"node": node, "moved": moved, "refused": refused}


def _h_giveback(db, index, env: Envelope) -> dict:
    node = env.args["node"]
    if node not in _known_nodes(db):
        return {"error": f"no node {node!r} in this cluster; see `cortex nodes`"}
    ready = ready_nodes(db)
    moved, refused = [], []
    for (name,) in db.execute("SELECT name FROM services WHERE home=? AND holder != ? ORDER BY name",
                              (node, node)).fetchall():
        row = get_row(db, name)
        problem = refusal(row, node, ready)
        if problem:
            refused.append({"name": name, "why": problem})
            db.execute("UPDATE services SET reason=? WHERE name=?", (f"giveback refused: {problem}", name))
            continue
        moved.append(move(db, env, row, node, "giving_back", env.args["reason"] or "giveback", True, False))
    return {"node": node, "moved": moved, "refused": refused}


def _h_report(db, index, env: Envelope) -> dict:
    a = env.args
    node = a["node_id"]
    db.execute("INSERT INTO service_nodes (node_id, networks, caps, reported_at) VALUES (?, ?, ?, ?) "
               "ON CONFLICT(node_id) DO UPDATE SET networks=COALESCE(?, networks), caps=COALESCE(?, caps), "
               "reported_at=excluded.reported_at",
               (node, json.dumps(a.get("networks", [])), json.dumps(a.get("caps", {})), env.ts,
                json.dumps(a["networks"]) if "networks" in a else None, json.dumps(a["caps"]) if "caps" in a else None))
    reported, done = {}, []
    for item in a["services"]:
        row = get_row(db, item["name"])
        if row is None:
            continue
        reported[item["name"]] = item
        db.execute(f"INSERT OR REPLACE INTO service_reports ({', '.join(REPORT_COLUMNS)}) "
                   f"VALUES ({', '.join('?' * len(REPORT_COLUMNS))})",
                   (node, item["name"], item["epoch"], item["state"], int(item["healthy"]), item["pid"],
                    item["restarts"], item["detail"], env.ts, item.get("sync_age"), item.get("synced_from", ""),
                    item.get("sync_error", "")))
        if item["output"]:
            _append_output(db, item["name"], node, item["epoch"], item["output"], env.ts)
        if node == row["holder"] and item["epoch"] == row["epoch"] and item["state"] == "running" \
                and item["healthy"] and row["ready_at"] is None:
            downtime = env.ts - row["moved_at"] if row["moved_at"] is not None else None
            db.execute("UPDATE services SET ready_at=?, last_downtime=?, state=CASE WHEN state='giving_back' "
                       "THEN 'running' ELSE state END, reason=CASE WHEN state='giving_back' THEN '' ELSE reason END "
                       "WHERE name=?", (env.ts, downtime, row["name"]))
            if row["state"] == "giving_back":
                done.append({"name": row["name"], "node": node, "downtime": downtime})
    # The previous holder lets go: a report, made after seeing the current epoch, that it runs nothing.
    for name, epoch in db.execute("SELECT name, epoch FROM services WHERE prev_holder=? AND released=0",
                                  (node,)).fetchall():
        item = reported.get(name)
        if item is not None and item["epoch"] >= epoch and item["state"] not in ACTIVE_RUN_STATES:
            db.execute("UPDATE services SET released=1 WHERE name=?", (name,))
    return {"node_id": node, "recorded": len(reported), "givebacks_done": done}


def _append_output(db, name: str, node: str, epoch: int, chunks: list, ts: float) -> None:
    last = db.execute("SELECT COALESCE(MAX(seq), 0) FROM service_output WHERE name=?", (name,)).fetchone()[0]
    for offset, (stream, text) in enumerate(chunks, 1):
        db.execute("INSERT INTO service_output (name, seq, node_id, epoch, stream, data, ts) VALUES (?,?,?,?,?,?,?)",
                   (name, last + offset, node, epoch, stream, text, ts))
    total = db.execute("SELECT COALESCE(SUM(length(data)), 0) FROM service_output WHERE name=?", (name,)).fetchone()[0]
    while total > OUTPUT_CAP:  # the newest output is kept: the oldest chunks go first
        seq, size = db.execute("SELECT seq, length(data) FROM service_output WHERE name=? ORDER BY seq LIMIT 1",
                               (name,)).fetchone()
        db.execute("DELETE FROM service_output WHERE name=? AND seq=?", (name, seq))
        total -= size


# --- queries -------------------------------------------------------------------------------------------------

def _reports(db, name: str | None = None) -> dict[str, list[dict]]:
    sql = f"SELECT {', '.join(REPORT_COLUMNS)} FROM service_reports"
    rows = db.execute(sql + (" WHERE name=?" if name else "") + " ORDER BY node_id", (name,) if name else ())
    out: dict[str, list[dict]] = {}
    for r in rows:
        doc = dict(zip(REPORT_COLUMNS, r))
        doc["healthy"] = bool(doc["healthy"])
        out.setdefault(doc["name"], []).append(doc)
    return out


def _q_list(db, args: dict) -> list[dict]:
    reports = _reports(db)
    out = []
    for (name,) in db.execute("SELECT name FROM services ORDER BY name").fetchall():
        row = get_row(db, name)
        row["candidates"] = candidates(db, row)
        row["reports"] = reports.get(name, [])
        out.append(row)
    return out


def _q_get(db, args: dict) -> dict | None:
    row = get_row(db, str(args.get("name", "")))
    if row is not None:
        row["candidates"] = candidates(db, row)
        row["reports"] = _reports(db, row["name"]).get(row["name"], [])
    return row


def _q_output(db, args: dict) -> list[dict]:
    after, limit = int(args.get("after", 0)), min(int(args.get("limit", 1000)), 5000)
    rows = db.execute("SELECT seq, node_id, epoch, stream, data, ts FROM service_output WHERE name=? AND seq>? "
                      "ORDER BY seq LIMIT ?", (str(args.get("name", "")), after, limit))
    return [dict(zip(("seq", "node_id", "epoch", "stream", "data", "ts"), r)) for r in rows]


def _q_nodes(db, args: dict) -> list[dict]:
    rows = db.execute("SELECT node_id, networks, caps, reported_at FROM service_nodes ORDER BY node_id")
    return [{"node_id": n, "networks": json.loads(nets), "caps": json.loads(caps), "reported_at": at}
            for n, nets, caps, at in rows]


def _q_leader(db, args: dict) -> dict:
    """What the leader's decisions read: every service, the nodes ready to take one, drained nodes."""
    services = _q_list(db, {})
    drained = sorted(r[0] for r in db.execute("SELECT node_id FROM task_nodes WHERE drained=1"))
    return {"services": services, "ready": ready_nodes(db), "drained": drained,
            "liveness": _known_nodes(db)}


def _events(env: Envelope, result: dict) -> list[tuple[str, dict]]:
    t = env.type
    if t == "service.report":
        out = [("service.renewed", {"node_id": result["node_id"]})]
        for done in result.get("givebacks_done", []):
            out += [("ha.giveback.done", done), ("service.changed", {"name": done["name"]})]
        return out
    if t in ("service.deploy", "service.remove", "service.restart"):
        return [("service.changed", {"name": result["name"], "command": t})]
    moved = result.get("moved")
    items = moved if isinstance(moved, list) else [result] if moved else []
    out = []
    for m in items:
        kind = "ha.takeover.planned" if m["state"] == "taken_over" and m.get("planned") else \
            "ha.takeover.unplanned" if m["state"] == "taken_over" else \
            "ha.giveback.started" if m["state"] == "giving_back" else "ha.moved"
        out += [(kind, m), ("service.changed", {"name": m["name"], "command": t})]
    if t == "service.move" and not moved and result.get("state") == "taken_over" and env.args["reason"].startswith("giveback failed"):
        out.append(("ha.giveback.failed", {"name": result["name"], "reason": env.args["reason"]}))
    for r in result.get("refused", []) if isinstance(result.get("refused"), list) else []:
        out.append(("ha.giveback.refused" if t == "service.giveback" else "ha.takeover.refused", r))
    return out


def _cmd(validate, apply, internal: bool = False) -> domain.Command:
    return domain.Command(validate, apply, internal=internal, level=LEVEL)


DOMAIN = domain.Domain(
    name="service",
    migrations=MIGRATIONS,
    tables=TABLES,
    commands={
        "service.deploy": _cmd(_v_deploy, _h_deploy),
        "service.remove": _cmd(_v_name("service.remove"), _h_remove),
        "service.restart": _cmd(_v_name("service.restart"), _h_restart),
        "service.report": _cmd(_v_report, _h_report),
        "service.takeover": _cmd(_v_node("service.takeover"), _h_takeover),
        "service.giveback": _cmd(_v_node("service.giveback"), _h_giveback),
        "service.move": _cmd(_v_move, _h_move, internal=True),
    },
    queries={"service.list": _q_list, "service.get": _q_get, "service.output": _q_output,
             "service.nodes": _q_nodes, "service.leader": _q_leader},
    events=_events,
)

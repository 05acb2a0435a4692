"""`cortex services deploy|list|show|logs|restart|remove` and `cortex ha status|takeover|giveback`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from cortex.services import api


def _out():
    from cortex.cli import output

    return output


def cmd_deploy(args) -> int:
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    except OSError as exc:
        raise _out().UsageError(f"cannot read {args.file}: {exc}") from None
    doc = api.load_spec(text)
    with _out().cluster_client(args) as c:
        result = api.deploy(c, doc, key=args.idempotency_key)
    what = "deployed" if result.get("created") else "unchanged" if result.get("unchanged") else "updated (restarts)"
    _out().emit(args, result, f"service {result['name']}: {what}, held by {result['holder']} (epoch {result['epoch']})")
    return 0


def cmd_list(args) -> int:
    with _out().cluster_client(args) as c:
        rows = api.listing(c)
    data = [{**api.summary(r), "lag": api.lag_text(api.lag(r))} for r in rows]
    human = _out().table(data, ["name", "kind", "holder", "home", "ha", "run", "healthy", "restarts", "ports",
                                "lag", "detail"]) if data else "no services; deploy one with `cortex services deploy FILE`"
    _out().emit(args, [{**r, **api.lag(r)} for r in rows] if args.json else data, human)
    return 0


def cmd_show(args) -> int:
    with _out().cluster_client(args) as c:
        row = api.get(c, args.name)
    s = api.summary(row)
    lines = [f"service {row['name']} ({row['spec']['kind']})",
             f"  held by {row['holder']} (epoch {row['epoch']}), HA state {row['state']}, home {row['home']}, "
             f"partners {', '.join(row['candidates']) or '-'}",
             f"  run: {s['run']}, healthy {s['healthy']}, restarts {s['restarts']}",
             f"  volume lag: {api.lag_text(s)}" + ("" if s["sync"] in ("ok", "no volume") else f" - {s['sync']}"),
             f"  takeovers {row['takeovers']}, givebacks {row['givebacks']}, last move's downtime "
             f"{'-' if row['last_downtime'] is None else format(row['last_downtime'], '.2f') + 's'}"]
    if row["reason"]:
        lines.append(f"  reason: {row['reason']}")
    if row["reports"]:
        lines.append(_out().table([{**{k: r[k] for k in ("node_id", "epoch", "state", "healthy", "restarts", "detail")},
                                    "copy_age": "-" if r.get("sync_age") is None else f"{r['sync_age']:.0f}s"}
                                   for r in row["reports"]], ["node_id", "epoch", "state", "healthy", "restarts",
                                                              "copy_age", "detail"]))
    _out().emit(args, {**row, **api.lag(row)}, "\n".join(lines))
    return 0


def cmd_logs(args) -> int:
    after = 0
    with _out().cluster_client(args) as c:
        while True:
            chunks = api.logs(c, args.name, after=after)
            for chunk in chunks:
                after = chunk["seq"]
                if args.json:
                    print(api.dumps(chunk))
                else:
                    (sys.stdout if chunk["stream"] == "stdout" else sys.stderr).write(chunk["data"])
            if not args.follow:
                return 0
            sys.stdout.flush()
            time.sleep(1.0)


def cmd_restart(args) -> int:
    with _out().cluster_client(args) as c:
        result = api.restart(c, args.name, key=args.idempotency_key)
    _out().emit(args, result, f"service {args.name}: restarting")
    return 0


def cmd_remove(args) -> int:
    with _out().cluster_client(args) as c:
        result = api.remove(c, args.name, key=args.idempotency_key)
    _out().emit(args, result, f"service {args.name}: " + ("removed (stopped where it ran)" if result["removed"]
                                                          else "was not deployed"))
    return 0


def cmd_ha_status(args) -> int:
    with _out().cluster_client(args) as c:
        doc = api.ha_status(c)
    rows = [{**s, "partners": ",".join(s["partners"]) or "-",
             "downtime": "-" if s["last_downtime_s"] is None else f"{s['last_downtime_s']:.2f}s",
             "lag": api.lag_text(s)} for s in doc["services"]]
    human = _out().table(rows, ["name", "home", "partners", "holder", "state", "epoch", "takeovers", "givebacks",
                                "downtime", "lag", "reason"]) if rows else "no services"
    _out().emit(args, doc, human)
    return 0


def _moves(args, result: dict, verb: str) -> int:
    lines = []
    for m in result["moved"]:
        downtime = m.get("downtime_s")
        lines.append(f"{m['name']}: {m['from']} -> {m['holder']} (epoch {m['epoch']})"
                     + (f", {m['result']}" if "result" in m else "")
                     + (f", downtime {downtime:.2f}s" if downtime is not None else ""))
    for r in result["refused"]:
        lines.append(f"{r['name']}: not moved: {r['why']}")
    if not lines:
        lines.append(f"{result['node']}: nothing to {verb}")
    _out().emit(args, result, "\n".join(lines))
    return 1 if result["refused"] or any(m.get("result") not in (None, "running") for m in result["moved"]) else 0


def cmd_takeover(args) -> int:
    with _out().cluster_client(args) as c:
        result = api.takeover(c, args.node, wait=0 if args.no_wait else args.wait, key=args.idempotency_key)
    return _moves(args, result, "take over")


def cmd_giveback(args) -> int:
    with _out().cluster_client(args) as c:
        result = api.giveback(c, args.node, wait=0 if args.no_wait else args.wait, key=args.idempotency_key)
    return _moves(args, result, "give back")


def register(commands) -> None:
    """`cortex services ...` and `cortex ha ...` (the `cortex.cli` entry point)."""
    add = commands.add
    svc = commands.group("services", "long-running services with HA partners")
    sp = add("deploy", cmd_deploy, "deploy or update a service from a YAML/JSON spec ('-' for stdin)", svc)
    sp.add_argument("file")
    sp.add_argument("--idempotency-key", default=None)
    add("list", cmd_list, "services, where they run and how they are", svc)
    sp = add("show", cmd_show, "one service: holder, epoch, HA state, node reports", svc)
    sp.add_argument("name")
    sp = add("logs", cmd_logs, "a service's output (the newest 256 KiB; -f follows)", svc)
    sp.add_argument("name")
    sp.add_argument("-f", "--follow", action="store_true")
    for name, fn, help in (("restart", cmd_restart, "restart a service where it runs"),
                           ("remove", cmd_remove, "stop a service and forget it (its volume stays on disk)")):
        sp = add(name, fn, help, svc)
        sp.add_argument("name")
        sp.add_argument("--idempotency-key", default=None)
    ha = commands.group("ha", "takeover and giveback between HA partners", fn=cmd_ha_status)
    add("status", cmd_ha_status, "who holds which service, takeovers, givebacks, downtime", ha)
    for name, fn, help in (("takeover", cmd_takeover, "planned takeover: move NODE's services to their partners"),
                           ("giveback", cmd_giveback, "give NODE's own services back to it (sync back first)")):
        sp = add(name, fn, help, ha)
        sp.add_argument("node")
        sp.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the services to be healthy")
        sp.add_argument("--no-wait", action="store_true", help="return once the move is decided")
        sp.add_argument("--idempotency-key", default=None)

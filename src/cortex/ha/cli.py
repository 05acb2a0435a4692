"""`cortex fence status|off|on`: try a node's fence settings before an outage needs them. Reads the `fence`
sections of a node's config file (the node that would fence) and talks to the BMCs from where it runs, as
the agent on that node would."""

from __future__ import annotations

import sys


def _fencing(path: str):
    from cortex import config
    from cortex.cli.output import UsageError
    from cortex.ha.fence import Fencing

    try:
        cfg = config.load(path)
    except config.ConfigError as exc:
        raise UsageError(str(exc)) from None
    if not cfg.fence:
        raise UsageError(f"{path} has no `fence` section; add one per node this node may power off "
                         "(docs/operations/ha.md)")
    return Fencing.from_config(cfg)


def cmd_status(args) -> int:
    from cortex.cli.output import emit, table
    from cortex.ha.fence import FenceError

    fencing = _fencing(args.config)
    nodes = args.nodes or sorted(fencing.targets)
    rows, failed = [], False
    for node in nodes:
        target = fencing.targets.get(node)
        row = {"node": node, "agent": target.agent if target else "", "address": target.address if target else "",
               "power": "", "error": ""}
        try:
            row["power"] = fencing.power_state(node)
        except FenceError as exc:
            row["error"], failed = str(exc), True
        rows.append(row)
    human = table(rows, ["node", "agent", "address", "power"])
    errors = [f"{r['node']}: {r['error']}" for r in rows if r["error"]]
    emit(args, rows, human + ("\n" + "\n".join(errors) if errors else ""))
    return 1 if failed else 0


def _switch(args, on: bool) -> int:
    from cortex.cli.output import UsageError, emit
    from cortex.ha.fence import FenceError

    if not on and not args.yes:
        raise UsageError(f"powering {args.node} off cuts it off hard, without shutting down: add --yes to do it")
    fencing = _fencing(args.config)
    try:
        (fencing.power_on if on else fencing.power_off)(args.node)
    except FenceError as exc:
        print(f"cortex: {exc}", file=sys.stderr)
        return 1
    state = "On" if on else "Off"
    emit(args, {"node": args.node, "power": state}, f"{args.node}: {state}")
    return 0


def register(commands) -> None:
    group = commands.group("fence", "power nodes off and on through their BMCs (the config's fence sections)")
    sp = commands.add("status", cmd_status, "each configured node's power state, as its BMC reports it", group)
    sp.add_argument("--config", required=True, help="the config file of the node that would fence")
    sp.add_argument("nodes", nargs="*", help="nodes to ask about (default: every one configured)")
    sp = commands.add("off", lambda args: _switch(args, False), "power a node off now (hard) and wait until it is",
                      group)
    sp.add_argument("--config", required=True, help="the config file of the node that would fence")
    sp.add_argument("--yes", action="store_true", help="confirm: the node stops at once, without shutting down")
    sp.add_argument("node")
    sp = commands.add("on", lambda args: _switch(args, True), "power a node on and wait until it is", group)
    sp.add_argument("--config", required=True, help="the config file of the node that would fence")
    sp.add_argument("node")

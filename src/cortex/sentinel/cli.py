"""`cortex health [NODE] [--watch]`: every node's health score, factors, predictions and sparklines.

It reads the summaries the nodes publish (records.py) from any node, so it works from a laptop with --addr.
"""

from __future__ import annotations

import time

SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], lo: float | None = None, hi: float | None = None) -> str:
    if not values:
        return ""
    lo = min(values) if lo is None else lo
    hi = max(values) if hi is None else hi
    span = (hi - lo) or 1.0
    return "".join(SPARKS[max(0, min(7, int((v - lo) / span * 7.999)))] for v in values)


def _eta(seconds) -> str:
    if seconds is None:
        return "-"
    from cortex.sentinel.predict import _human

    return _human(float(seconds))


def _fetch(args) -> list[dict]:
    from cortex.cli.output import cluster_client
    from cortex.sentinel import records

    with cluster_client(args) as c:
        return records.read_all(lambda q, a: c.read(q, a, level="stale"))


def render(found: list[dict], node: str, now: float) -> tuple[object, str]:
    """(the JSON document, the table) for all nodes, or one node in full."""
    from cortex.cli.output import UsageError, table
    from cortex.sentinel import records

    if node:
        r = next((r for r in found if r["node_id"] == node), None)
        if r is None:
            known = ", ".join(x["node_id"] for x in found) or "none yet"
            raise UsageError(f"no health summary for node {node!r} (nodes with one: {known}); the sentinel plugin "
                             "publishes one within a minute of starting")
        stale = "" if records.fresh(r, now) else f"  (STALE: last published {now - r['ts']:.0f}s ago)"
        lines = [f"node      {node}{stale}", f"score     {r.get('score')} ({r.get('level')})",
                 f"metrics   {r.get('metrics') or '-'}"]
        for name, values in (r.get("spark") or {}).items():
            if values:
                lo, hi = (0, 100) if name in ("score",) or name.endswith("_pct") else (None, None)
                lines.append(f"{name:10}{sparkline(values, lo, hi)}  {values[-1]:g}")
        preds = [{"severity": p["severity"], "kind": p["kind"], "target": p["target"], "eta": _eta(p.get("eta_s")),
                  "confidence": p.get("confidence"), "raised": "yes" if p["key"] in (r.get("raised") or []) else "",
                  "message": p.get("message", "")} for p in r.get("predictions") or []]
        factors = [{"penalty": f["penalty"], "factor": f["name"], "detail": f["detail"]} for f in r.get("factors") or []]
        human = "\n".join(lines)
        human += "\n\n" + (table(preds, ["severity", "kind", "target", "eta", "confidence", "raised", "message"])
                           if preds else "no predictions")
        human += "\n\n" + (table(factors, ["penalty", "factor", "detail"]) if factors else "nothing lowers the score")
        return r, human
    rows = []
    for r in found:
        worst = (r.get("predictions") or [{}])[0]
        rows.append({"node": r["node_id"], "score": r.get("score"),
                     "level": r.get("level") + ("" if records.fresh(r, now) else " (stale)"),
                     "trend": sparkline((r.get("spark") or {}).get("score") or [], 0, 100),
                     "predictions": len(r.get("predictions") or []),
                     "next": f"{worst.get('kind', '')} {worst.get('target', '')} in {_eta(worst.get('eta_s'))}"
                     if worst else "-",
                     "factors": "; ".join(f["detail"] for f in (r.get("factors") or [])[:2]) or "-"})
    human = table(rows, ["node", "score", "level", "trend", "predictions", "next", "factors"]) if rows else \
        "no node has published a health summary yet (the sentinel plugin publishes one within a minute of starting)"
    return found, human


def cmd_health(args) -> int:
    from cortex.cli.output import emit

    while True:
        doc, human = render(_fetch(args), args.node or "", time.time())
        if not args.watch:
            emit(args, doc, human)
            return 0
        if not args.json:
            print("\033[2J\033[H", end="")
        emit(args, doc, human)
        time.sleep(args.every)


def register(commands) -> None:
    """`cortex health` (the `cortex.cli` entry point)."""
    sp = commands.add("health", cmd_health, "predictive node health: score, factors, predictions, sparklines")
    sp.add_argument("node", nargs="?", help="one node in full (default: a table of every node)")
    sp.add_argument("--watch", action="store_true", help="redraw until interrupted")
    sp.add_argument("--every", type=float, default=5.0, help="seconds between redraws with --watch")

"""`cortex k8s ...`: the Kubernetes contexts and capacity the nodes publish, and where a job would fit."""

from __future__ import annotations

import os

from cortex.core.args import READ_LEVELS


def _records(args) -> list[dict]:
    from cortex.cli import _client
    from cortex.kube.records import read_records

    with _client(args) as c:
        return read_records(lambda q, a: c.read(q, a, level=args.level))


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}Gi"


def cmd_contexts(args) -> int:
    from cortex.cli import emit, table

    if args.local:
        from cortex.kube.kubeconfig import discover, kubeconfig_paths
        from cortex.userdirs import user_home

        found = discover(kubeconfig_paths(os.environ, user_home()))
        records = [{"node_id": "(this machine)", "current": found.current, "problems": list(found.problems),
                    "contexts": [c.public() for c in found.contexts]}]
    else:
        records = _records(args)
    rows = [{**c, "node": r["node_id"], "current": "*" if c["name"] == r.get("current") else ""}
            for r in records for c in r.get("contexts") or []]
    none = ("no kubeconfig context here (set KUBECONFIG or write ~/.kube/config)" if args.local else
            "no Kubernetes contexts published (is the kubernetes plugin running where a kubeconfig exists?)")
    human = table(rows, ["node", "current", "name", "server", "namespace", "auth", "flavor"]) if rows else none
    problems = [f"{r['node_id']}: {p}" for r in records for p in r.get("problems") or []]
    emit(args, records, human + "".join(f"\nproblem: {p}" for p in problems))
    return 0


def cmd_capacity(args) -> int:
    from cortex.cli import UsageError, emit, table
    from cortex.kube.capacity import bytes_of, millicores, placements
    from cortex.kube.records import k8s_capacity

    records = _records(args)
    try:
        cpu = millicores(args.cpu) if args.cpu else 0
        memory = bytes_of(args.memory) if args.memory else 0
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    rows = k8s_capacity(records)
    fits = {(p.node_id, p.context) for p in placements(records, cpu, memory, args.context)}
    if args.context:
        rows = [r for r in rows if r["context"] == args.context]
    human_rows = [{"node": r["node_id"], "context": r["context"], "k8s_nodes": r["ready_nodes"],
                   "cpu_free": f"{r['cpu_free_m']}m", "memory_free": _gib(r["memory_free"]),
                   "fits": "yes" if (r["node_id"], r["context"]) in fits else "no", "error": r["error"]}
                  for r in rows]
    columns = ["node", "context", "k8s_nodes", "cpu_free", "memory_free"] + (
        ["fits"] if cpu or memory else []) + ["error"]
    emit(args, {"capacity": rows, "fits": sorted(fits)},
         table(human_rows, columns) if rows else "no Kubernetes capacity published")
    return 0


def register(sub, common) -> None:
    """Add `cortex k8s contexts|capacity` to the CLI's subparsers (`common` holds the global options)."""
    k8s = sub.add_parser("k8s", help="Kubernetes contexts and capacity, per node").add_subparsers(
        dest="sub", required=True)
    levels = list(READ_LEVELS)
    sp = k8s.add_parser("contexts", help="kubeconfig contexts each node has (no credentials)", parents=[common])
    sp.add_argument("--local", action="store_true", help="read this machine's kubeconfig instead of the cluster")
    sp.add_argument("--level", choices=levels, default="stale")
    sp.set_defaults(fn=cmd_contexts)
    sp = k8s.add_parser("capacity", help="free CPU/memory per context; --cpu/--memory show where a job fits",
                        parents=[common])
    sp.add_argument("--cpu", default="", help="CPU a pod needs, e.g. 500m or 2")
    sp.add_argument("--memory", default="", help="memory a pod needs, e.g. 512Mi")
    sp.add_argument("--context", default="", help="only this context")
    sp.add_argument("--level", choices=levels, default="stale")
    sp.set_defaults(fn=cmd_capacity)

"""`cortex update ...`: publisher keys, publishing a build, listing releases, verifying one, serving them, the
rollout plan (`plan VERSION`), and the rolling update the cluster executes (`rollout`, `status`, `rollback`:
the updater plugin's tools, called on the local agent's admin socket because they need the admin role)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cortex.update import rollout

# releases and rollout (cryptography, the plan) are imported by the commands that use them: every `cortex`
# command loads this module to register `cortex update`.

DEFAULT_ROOT = "/var/lib/cortex/updates"


def cmd_keygen(args, emit) -> int:
    from cortex.update import releases as updates

    public = updates.generate_key(Path(args.key))
    emit(args, {"key": args.key, "public": public},
         f"signing key written to {args.key} (keep it offline)\ntrust it on the nodes (config update.trusted_keys):"
         f"\n  {public}")
    return 0


def cmd_publish(args, emit) -> int:
    from cortex.update import releases as updates

    key = updates.load_private_key(Path(args.key))
    release = updates.publish(Path(args.source), Path(args.root), args.channel, key)
    manifest = updates.verify(release, [updates.public_key_text(key.public_key())])
    emit(args, {"path": str(release), **manifest},
         f"published {manifest['channel']}/{manifest['version']} at {release} "
         f"({sum(manifest['files'].values()) / 2**20:.1f} MiB, signed)\nserve {args.root} over HTTP, or from a node")
    return 0


def cmd_list(args, emit, table) -> int:
    from cortex.update import releases as updates

    rows = [{"channel": r.channel, "version": r.version, "size_mib": f"{r.size / 2**20:.1f}",
             "published": time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.published_at)), "path": str(r.path)}
            for r in updates.list_releases(Path(args.root), args.channel)]
    emit(args, rows, table(rows, ["channel", "version", "size_mib", "published"]) if rows
         else f"no releases under {args.root}; publish one with `cortex update publish`")
    return 0


def cmd_verify(args, emit) -> int:
    from cortex.update import releases as updates

    manifest = updates.verify(Path(args.release), args.trust)
    emit(args, manifest, f"{args.release}: signature and checksums good ({manifest['channel']}/{manifest['version']})")
    return 0


def targets_from_cluster(client_factory, status) -> list[rollout.Target]:
    """Every member, with the version it runs now (asked directly) and whether it is healthy."""
    from cortex.update import rollout

    out = []
    for n in status.nodes:
        try:
            with client_factory(n.grpc_address) as c:
                s = c.status()
            version, appliance, reachable = s.image_version or s.version, bool(s.image_version), True
        except Exception:
            version, appliance, reachable = "0", True, False
        out.append(rollout.Target(n.id, n.role, version, appliance=appliance, leader=n.id == status.leader_id,
                                  healthy=reachable and n.liveness == "alive"))
    return out


def cmd_plan(args, emit, table, client) -> int:
    from cortex.client import Client
    from cortex.update import releases as updates
    from cortex.update import rollout

    updates.parse_version(args.version)
    with client(args) as c:
        status = c.status()
    targets = targets_from_cluster(lambda address: Client(address, timeout=3), status)
    problems = rollout.preflight(targets, args.version, args.allow_downgrade)
    plan = rollout.plan("dry-run", targets, args.version)
    rows = [{"order": i + 1, "node": s.node_id, "role": s.role, "from": s.from_version, "to": args.version,
             "action": "update" if s.state == "pending" else "skip", "why": s.reason}
            for i, s in enumerate(plan.steps)]
    human = table(rows, ["order", "node", "role", "from", "to", "action", "why"])
    human += "\n\n" + ("pre-flight: ok" if not problems else "pre-flight refuses:\n  " + "\n  ".join(problems))
    emit(args, {"version": args.version, "steps": rows, "preflight": problems}, human)
    return 0 if not problems else 1


def _tool(args, name: str, arguments: dict) -> dict:
    """Call an updater tool: on the admin socket when there is one (admin role), else on --addr."""
    import grpc

    from cortex._proto.cortex.v1 import plugins_pb2 as ppb
    from cortex.cli.output import UsageError, node_target, plugins_stub
    from cortex.client import CortexError

    stub = plugins_stub(node_target(args, "auto"))
    try:
        response = stub.CallTool(ppb.CallToolRequest(name=name, arguments_json=json.dumps(arguments).encode()),
                                 timeout=max(args.timeout, 600.0))
    except grpc.RpcError as exc:
        raise CortexError(exc.code(), exc.details() or "") from None
    if response.error:
        hint = (" (run it on a node: the admin socket gives the admin role)" if "role" in response.error else "")
        raise UsageError(response.error + hint)
    return json.loads(response.result_json)


def _steps_table(table, steps: list[dict], version: str, since: dict | None = None) -> str:
    rows = [{"order": i + 1, "node": s["node_id"], "role": s["role"], "from": s["from_version"], "to": version,
             "state": s["state"], "why": s["reason"]} for i, s in enumerate(steps)]
    return table(rows, ["order", "node", "role", "from", "to", "state", "why"])


def cmd_rollout(args, emit, table) -> int:
    result = _tool(args, "update_rollout", {"version": args.version, "source": args.source,
                                            "allow_downgrade": args.allow_downgrade, "dry_run": args.dry_run})
    human = _steps_table(table, result["steps"], args.version)
    if result["preflight"]:
        human += "\n\npre-flight refuses (no node was touched):\n  " + "\n  ".join(result["preflight"])
    elif not result["started"]:
        human += "\n\npre-flight: ok (dry run: nothing started)"
    else:
        human += f"\n\nrollout {result['id']} started; follow it with `cortex update status`"
    if not args.wait or not result.get("started"):
        emit(args, result, human)
        return 1 if result["preflight"] else 0
    print(human, file=sys.stderr if args.json else sys.stdout, flush=True)
    return _follow(args, emit, result["id"])


def _follow(args, emit, rollout_id: str) -> int:
    from cortex.cli.output import UsageError
    from cortex.client import CortexError
    from cortex.update import rollout

    seen: dict[str, str] = {}
    unreachable_since = 0.0
    while True:
        try:
            doc = _tool(args, "update_status", {})["rollout"]
            unreachable_since = 0.0
        except (CortexError, UsageError) as exc:
            # the node we talk to may be the one rebooting right now: wait for it (a boot takes minutes); just
            # after its start its plugins are not registered yet ("unknown tool"): wait for that too
            if isinstance(exc, UsageError) and "unknown tool" not in str(exc):
                raise
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > 900:
                raise
            if not args.json:
                why = exc.code.name if isinstance(exc, CortexError) else "plugins starting"
                print(f"{time.strftime('%H:%M:%S')} (agent not answering: {why}; waiting)", flush=True)
            time.sleep(2)
            continue
        for s in doc["steps"]:
            if seen.get(s["node_id"]) != s["state"]:
                seen[s["node_id"]] = s["state"]
                if not args.json:
                    print(f"{time.strftime('%H:%M:%S')} {s['node_id']}: {s['state']}"
                          + (f" ({s['reason']})" if s["reason"] else ""), flush=True)
        if doc["state"] not in rollout.IN_PROGRESS:
            emit(args, doc, f"rollout {doc['id']}: {doc['state']}" + (f": {doc['reason']}" if doc["reason"] else ""))
            return 0 if doc["state"] in ("done", "rolled_back") else 1
        time.sleep(1)


def cmd_status(args, emit, table) -> int:
    doc = _tool(args, "update_status", {})
    r = doc["rollout"]
    nodes = [{"node": n["node_id"], "kind": n["kind"], "version": n["version"],
              "boot": "blessed" if n["blessed"] else "on probation",
              "fell_back": f"from {n['previous']}" if n["fell_back"] else "",
              "free_mib": n["free_bytes"] // 2**20 if n["free_bytes"] >= 0 else "?"} for n in doc["nodes"]]
    human = table(nodes, ["node", "kind", "version", "boot", "fell_back", "free_mib"]) if nodes else \
        "no node has reported a version (is the updater plugin enabled?)"
    if r:
        human = (f"rollout {r['id']} to {r['version']}: {r['state']}" + (f" — {r['reason']}" if r["reason"] else "")
                 + "\n\n" + _steps_table(table, r["steps"], r["version"]) + "\n\n" + human)
    else:
        human = "no rollout yet\n\n" + human
    emit(args, doc, human)
    return 0


def cmd_rollback(args, emit) -> int:
    result = _tool(args, "update_rollback", {"rollout_id": args.id} if args.id else {})
    human = (f"rollout {result['id']}: {result['state']} (updated nodes go back to their previous slot, newest "
             "first; follow with `cortex update status`)")
    if args.wait and result["state"] == "rolling_back":
        print(human, file=sys.stderr if args.json else sys.stdout, flush=True)
        return _follow(args, emit, result["id"])
    emit(args, result, human)
    return 0


def cmd_serve(args) -> int:
    from cortex.update.serve import serve

    return serve(Path(args.root), args.listen)


def cmd_apply_local(args) -> int:
    from cortex.update.apply import main

    return main(Path(args.state_dir), Path(args.config))


def register(commands) -> None:
    from cortex.cli.output import cluster_client as client
    from cortex.cli.output import emit, table

    add = commands.add
    up = commands.group("update", "signed update releases and the rolling-update plan")
    sp = add("keygen", lambda a: cmd_keygen(a, emit), "create a publisher signing key (Ed25519)", up)
    sp.add_argument("--key", required=True, help="where to write the private key (PEM, mode 0600)")
    sp = add("publish", lambda a: cmd_publish(a, emit), "publish an image build's update payload, signed", up)
    sp.add_argument("source", nargs="?", default="image/.build/out/update", help="the build's update directory")
    sp.add_argument("--root", default=DEFAULT_ROOT, help="the update directory to serve")
    sp.add_argument("--channel", default="stable")
    sp.add_argument("--key", required=True, help="the publisher's private key (cortex update keygen)")
    sp = add("list", lambda a: cmd_list(a, emit, table), "releases and channels in an update directory", up)
    sp.add_argument("--root", default=DEFAULT_ROOT)
    sp.add_argument("--channel")
    sp = add("verify", lambda a: cmd_verify(a, emit), "check a release's signature and checksums", up)
    sp.add_argument("release", help="a release directory (<root>/<channel>/<version>)")
    sp.add_argument("--trust", action="append", default=[], required=True, help="a trusted key, ed25519:...")
    sp = add("plan", lambda a: cmd_plan(a, emit, table, client),
             "dry run of a rolling update: pre-flight checks and the order of the nodes", up)
    sp.add_argument("version")
    sp.add_argument("--allow-downgrade", action="store_true")
    sp = add("rollout", lambda a: cmd_rollout(a, emit, table),
             "rolling update of the cluster to VERSION (pre-flight, then one node at a time)", up)
    sp.add_argument("version")
    sp.add_argument("--source", default="", help="channel URL (default: plugins.updater.source)")
    sp.add_argument("--dry-run", action="store_true", help="print the plan and the pre-flight verdict only")
    sp.add_argument("--allow-downgrade", action="store_true")
    sp.add_argument("--wait", action="store_true", help="show progress until the rollout ends")
    add("status", lambda a: cmd_status(a, emit, table), "the current rollout and every node's version", up)
    sp = add("rollback", lambda a: cmd_rollback(a, emit), "return updated nodes to their previous slot", up)
    sp.add_argument("--id", default="", help="the rollout (default: the latest)")
    sp.add_argument("--wait", action="store_true")
    sp = add("serve", cmd_serve, "serve an update directory over HTTP (read-only) for the nodes", up)
    sp.add_argument("--root", default=DEFAULT_ROOT)
    sp.add_argument("--listen", default="0.0.0.0:8470", help="HOST:PORT")
    sp = add("apply-local", cmd_apply_local,
             "root helper on the appliance (cortex-update.service): carry out the agent's install request", up)
    sp.add_argument("--state-dir", default="/var/lib/cortex/plugins/updater")
    sp.add_argument("--config", default="/run/cortex/config.yaml")

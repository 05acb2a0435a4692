"""`cortex update ...`: publisher keys, publishing a build, listing releases, verifying one, and the rollout
plan (`plan VERSION` is the dry run of a rollout: pre-flight checks and the order nodes would go in)."""

from __future__ import annotations

import time
from pathlib import Path

from cortex import rollout, updates

DEFAULT_ROOT = "/var/lib/cortex/updates"


def cmd_keygen(args, emit) -> int:
    public = updates.generate_key(Path(args.key))
    emit(args, {"key": args.key, "public": public},
         f"signing key written to {args.key} (keep it offline)\ntrust it on the nodes (config update.trusted_keys):"
         f"\n  {public}")
    return 0


def cmd_publish(args, emit) -> int:
    key = updates.load_private_key(Path(args.key))
    release = updates.publish(Path(args.source), Path(args.root), args.channel, key)
    manifest = updates.verify(release, [updates.public_key_text(key.public_key())])
    emit(args, {"path": str(release), **manifest},
         f"published {manifest['channel']}/{manifest['version']} at {release} "
         f"({sum(manifest['files'].values()) / 2**20:.1f} MiB, signed)\nserve {args.root} over HTTP, or from a node")
    return 0


def cmd_list(args, emit, table) -> int:
    rows = [{"channel": r.channel, "version": r.version, "size_mib": f"{r.size / 2**20:.1f}",
             "published": time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.published_at)), "path": str(r.path)}
            for r in updates.list_releases(Path(args.root), args.channel)]
    emit(args, rows, table(rows, ["channel", "version", "size_mib", "published"]) if rows
         else f"no releases under {args.root}; publish one with `cortex update publish`")
    return 0


def cmd_verify(args, emit) -> int:
    manifest = updates.verify(Path(args.release), args.trust)
    emit(args, manifest, f"{args.release}: signature and checksums good ({manifest['channel']}/{manifest['version']})")
    return 0


def targets_from_cluster(client_factory, status) -> list[rollout.Target]:
    """Every member, with the version it runs now (asked directly) and whether it is healthy."""
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


def register(sub, add, emit, table, client) -> None:
    up = sub.add_parser("update", help="signed update releases and the rolling-update plan").add_subparsers(
        dest="sub", required=True)
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

"""`cortex backup list|restore`: the shared memory's backups, in a directory or an S3-compatible bucket.

The target comes from flags, or from a node's config file (`--config`, its `plugins.memory.backup`
section), so an operator restores from exactly where the leader writes.
"""

from __future__ import annotations

import argparse
import tempfile
from datetime import UTC, datetime
from pathlib import Path


def _target(args):
    from cortex.memory import backup

    if args.s3_bucket:
        return backup.S3Target(args.s3_bucket, args.s3_prefix, args.s3_endpoint, args.s3_region)
    if args.dir:
        return backup.DirTarget(Path(args.dir))
    if args.config:
        from cortex import config

        cfg = config.load(args.config)
        settings = cfg.plugins.get("memory")
        options = dict(settings.options.get("backup", {})) if settings else {}
        return backup.target_from_options(options, cfg.data_dir / "plugins" / "memory")
    raise SystemExit("cortex backup: say where the backups are: --dir DIR, --s3-bucket BUCKET "
                     "[--s3-endpoint URL], or --config NODE.yaml (its plugins.memory.backup section)")


def cmd_list(args) -> int:
    from cortex.cli.output import emit, table
    from cortex.memory import backup

    target = _target(args)
    found = backup.manifests(target)
    rows = [{"name": m["name"], "created": datetime.fromtimestamp(m["created_at"], UTC).strftime("%Y-%m-%d %H:%M:%S"),
             "index": m["log_index"], "tiers": ",".join(m["tiers"]), "rows": sum(m["rows"].values()),
             "size": m["compressed_size"], "digest": m["content_digest"][:12]} for m in found]
    human = (table(rows, ["name", "created", "index", "tiers", "rows", "size", "digest"]) if rows
             else f"no backups in {target.description}")
    emit(args, found, human)
    return 0


def cmd_restore(args) -> int:
    from cortex.cli.output import UsageError, cluster_client, emit
    from cortex.memory import backup

    if not args.yes:
        raise UsageError("restoring replaces all shared memory (public and internal tiers) on the whole cluster; "
                         "add --yes to go ahead (node-local memory is kept)")
    target = _target(args)
    say = (lambda s: None) if args.json else (lambda s: print(f"  … {s}", flush=True))
    with tempfile.TemporaryDirectory(prefix="cortex-restore-") as tmp, cluster_client(args) as c:
        path, manifest = backup.fetch(target, args.name, Path(tmp))
        say(f"{manifest['name']}: checksum and content digest verified")
        result = backup.restore(lambda t, a, k: c.write(t, a, idempotency_key=k, retry_for=args.retry),
                                path, manifest, say)
        digest = c.read("memory.digest", {}, level="linearizable")["digest"]
    doc = {"name": manifest["name"], "rows": result["rows"], "digest": digest,
           "matches": digest == manifest["content_digest"]}
    human = (f"restored {manifest['name']}: " + ", ".join(f"{n} {t.removeprefix('memory_')}" for t, n in
                                                          result["rows"].items()) + f"; content digest {digest[:12]}")
    emit(args, doc, human)
    return 0 if doc["matches"] else 1


def register(commands) -> None:
    group = commands.group("backup", "shared memory backups (list, restore)")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--dir", default="", help="a directory of backups")
    where.add_argument("--s3-bucket", default="", help="an S3-compatible bucket")
    where.add_argument("--s3-prefix", default="")
    where.add_argument("--s3-endpoint", default="", help="e.g. http://127.0.0.1:9000 for MinIO")
    where.add_argument("--s3-region", default="")
    where.add_argument("--config", default="", help="take the target from this node config's plugins.memory.backup")
    commands.add("list", cmd_list, "backups, oldest first", group, parents=[where])
    sp = commands.add("restore", cmd_restore, "replace the cluster's shared memory with a backup", group,
                      parents=[where])
    sp.add_argument("name", help="a backup name from `cortex backup list`, or `latest`")
    sp.add_argument("--yes", action="store_true", help="confirm: all shared memory is replaced")
    sp.add_argument("--retry", type=float, default=10.0, help="seconds to retry transient failures")

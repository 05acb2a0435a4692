"""Backups of the shared memory: taken by the leader, kept in a directory or an S3-compatible bucket.

A backup is the memory tables cut from an SQLite online backup of the state store (so it is a consistent
point-in-time copy taken without stopping writes), gzip-compressed, with a JSON manifest beside it that
holds the SHA-256 of the compressed file and the content digest of the rows. A backup whose content digest
equals the newest one's is skipped. With `public_only`, rows of the `internal` tier are left out; `local`
rows are never in the replicated store, so never in a backup.

Restore (`cortex backup restore`) works on a running cluster: the rows travel as replicated
`memory.restore_chunk` commands (staged, invisible to readers) and one `memory.restore_commit` swaps them in
atomically on every replica after checking they add up to the backup's content digest. Cluster membership,
tokens and other subsystems' state are not part of a memory backup; a new cluster is formed as usual
(`cortex init`/`join`) and the memory restored into it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from cortex.memory.content import MAX_CHUNK_BYTES, content_digest
from cortex.memory.schema import CONTENT_TABLES

FORMAT = 1
SUFFIX = ".db.gz"


class BackupError(RuntimeError):
    """The backup cannot be made, found or trusted; the message says what to check."""


class Target(Protocol):
    description: str

    def put(self, name: str, data: bytes) -> None: ...

    def get(self, name: str) -> bytes: ...

    def names(self) -> list[str]: ...

    def delete(self, name: str) -> None: ...


@dataclass
class DirTarget:
    path: Path

    @property
    def description(self) -> str:
        return str(self.path)

    def put(self, name: str, data: bytes) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(self.path / name)

    def get(self, name: str) -> bytes:
        try:
            return (self.path / name).read_bytes()
        except FileNotFoundError:
            raise BackupError(f"no {name} in {self.path}; see `cortex backup list`") from None

    def names(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if not p.name.startswith(".")) if self.path.is_dir() else []

    def delete(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)


class S3Target:
    """An S3-compatible bucket through boto3; credentials come from boto3's usual chain (env, files, role)."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str = "", region: str = ""):
        import boto3

        self.bucket, self.prefix = bucket, prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._s3 = boto3.client("s3", endpoint_url=endpoint_url or None, region_name=region or None)
        self.description = f"s3://{bucket}/{self.prefix}" + (f" at {endpoint_url}" if endpoint_url else "")

    def put(self, name: str, data: bytes) -> None:
        self._s3.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)

    def get(self, name: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self._s3.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"].read()
        except ClientError as exc:
            raise BackupError(f"cannot read {self.description}{name}: {exc}") from None

    def names(self) -> list[str]:
        out = []
        for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            out += [item["Key"][len(self.prefix):] for item in page.get("Contents", [])]
        return sorted(out)

    def delete(self, name: str) -> None:
        self._s3.delete_object(Bucket=self.bucket, Key=self.prefix + name)


def target_from_options(options: dict, data_dir: Path) -> Target:
    if options.get("s3"):
        s3 = options["s3"]
        return S3Target(s3["bucket"], s3.get("prefix", ""), s3.get("endpoint_url", ""), s3.get("region", ""))
    return DirTarget(Path(options["dir"]) if options.get("dir") else Path(data_dir) / "backups")


# --- making backups --------------------------------------------------------------------------------------------

def extract_memory(snapshot: Path, public_only: bool) -> tuple[str, dict]:
    """Reduce a copy of the state database to the memory tables in place; return (content digest, counts)."""
    db = sqlite3.connect(snapshot, isolation_level=None)
    try:
        db.execute("PRAGMA foreign_keys=ON")
        keep = {*CONTENT_TABLES, "memory_fts"}
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' "
                                           "AND name NOT LIKE 'sqlite_%'")]
        db.execute("BEGIN")
        for table in tables:
            if table not in keep and not table.startswith("memory_fts_"):
                db.execute(f'DROP TABLE IF EXISTS "{table}"')
        if public_only:
            for table in reversed(CONTENT_TABLES):
                db.execute(f"DELETE FROM {table} WHERE tier != 'public'")
        db.execute("COMMIT")
        db.execute("VACUUM")
        counts = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in CONTENT_TABLES}
        return content_digest(db), counts
    finally:
        db.close()


def manifests(target: Target) -> list[dict]:
    """Complete backups (those with a manifest), oldest first."""
    out = []
    for name in target.names():
        if name.endswith(SUFFIX + ".json"):
            try:
                out.append(json.loads(target.get(name)))
            except (ValueError, BackupError):
                continue  # a damaged manifest is not a backup
    return sorted(out, key=lambda m: (m["created_at"], m["name"]))


def make_backup(cluster, target: Target, public_only: bool = False, keep: int = 48,
                now: Callable[[], float] = time.time) -> dict | None:
    """Back up the memory tables of this server's replica; None when the content has not changed."""
    with tempfile.TemporaryDirectory(prefix="cortex-memory-backup-") as tmp:
        snapshot = Path(tmp) / "state.db"
        index = cluster.snapshot(snapshot)
        digest, counts = extract_memory(snapshot, public_only)
        tiers = ["public"] if public_only else ["public", "internal"]
        previous = [m for m in manifests(target) if m["tiers"] == tiers]
        if previous and previous[-1]["content_digest"] == digest:
            return None
        raw = snapshot.read_bytes()
    data = gzip.compress(raw, compresslevel=6, mtime=0)
    created = now()
    stamp = datetime.fromtimestamp(created, UTC).strftime("%Y%m%dT%H%M%S%fZ")
    name = f"memory-{stamp}-{index}{SUFFIX}"
    manifest = {"format": FORMAT, "name": name, "created_at": created, "log_index": index,
                "cluster_id": _cluster_id(cluster), "content_digest": digest, "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(raw), "compressed_size": len(data), "tiers": tiers, "rows": counts}
    target.put(name, data)
    target.put(name + ".json", json.dumps(manifest, indent=2).encode())  # last: a manifest means complete
    for old in manifests(target)[:-keep]:
        target.delete(old["name"])
        target.delete(old["name"] + ".json")
    return manifest


def _cluster_id(cluster) -> str:
    try:
        return cluster.status().get("cluster_id", "")
    except Exception:
        return ""


# --- restoring -----------------------------------------------------------------------------------------------

def fetch(target: Target, name: str, directory: Path) -> tuple[Path, dict]:
    """Download a backup, check its checksum, decompress it into `directory`; return (database, manifest)."""
    if name == "latest":
        found = manifests(target)
        if not found:
            raise BackupError(f"no backups in {target.description}")
        name = found[-1]["name"]
    manifest = json.loads(target.get(name + ".json"))
    data = target.get(name)
    checksum = hashlib.sha256(data).hexdigest()
    if checksum != manifest["sha256"]:
        raise BackupError(f"{name}: checksum {checksum[:12]} != manifest's {manifest['sha256'][:12]}; the file is "
                          f"damaged, restore another backup (`cortex backup list`)")
    path = Path(directory) / "memory.db"
    try:
        path.write_bytes(gzip.decompress(data))
    except (OSError, EOFError) as exc:
        raise BackupError(f"{name}: cannot decompress: {exc}") from None
    db = sqlite3.connect(path)
    try:
        if content_digest(db) != manifest["content_digest"]:
            raise BackupError(f"{name}: its rows do not match the manifest's content digest; the backup is damaged")
    finally:
        db.close()
    return path, manifest


def chunks(db_path: Path, limit: int = MAX_CHUNK_BYTES // 2) -> Iterator[str]:
    """The backup's rows as restore chunks of at most about `limit` bytes each."""
    db = sqlite3.connect(db_path)
    try:
        for table in CONTENT_TABLES:
            columns = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
            batch, size = [], 0
            for row in db.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY rowid"):
                encoded = len(json.dumps(row))
                if batch and size + encoded > limit:
                    yield json.dumps({"table": table, "columns": columns, "rows": batch})
                    batch, size = [], 0
                batch.append(list(row))
                size += encoded
            if batch:
                yield json.dumps({"table": table, "columns": columns, "rows": batch})
    finally:
        db.close()


def restore(write: Callable[[str, dict, str], dict], db_path: Path, manifest: dict,
            progress: Callable[[str], None] = lambda s: None) -> dict:
    """Replace the cluster's shared memory with the backup's rows; `write(type, args, idempotency_key)`."""
    restore_id = uuid.uuid4().hex[:16]
    count = 0
    try:
        for seq, chunk in enumerate(chunks(db_path)):
            write("memory.restore_chunk", {"restore_id": restore_id, "seq": seq, "rows": chunk},
                  f"restore-{restore_id}-{seq}")
            count = seq + 1
            progress(f"staged chunk {count}")
        return write("memory.restore_commit", {"restore_id": restore_id, "chunks": count,
                                               "digest": manifest["content_digest"]}, f"restore-{restore_id}-commit")
    except BaseException:
        try:
            write("memory.restore_abort", {"restore_id": restore_id}, f"restore-{restore_id}-abort")
        except Exception:
            pass  # the staged chunks stay until a later abort; they are invisible to readers
        raise

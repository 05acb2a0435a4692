"""The replicated state machine: a SQLite database changed only by applying stamped commands.

This module is the deterministic core. It knows nothing of sockets, Raft or clocks: `apply(index, data)`
takes a log index and an encoded envelope and changes the database in one transaction that also records
the index, so a replay after a restart never applies an entry twice. Reads open their own connections and
never block apply (WAL mode).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cortex.core import cluster, domain
from cortex.core.envelope import Envelope, decode_entry

log = logging.getLogger("cortex.state")

REQUEST_RETENTION = 100_000  # idempotency keys are remembered for this many log entries
MAX_IDLE_READERS = 8  # read connections kept open between reads (more may be open while reads run)
# Beyond the first KEEP_READERS, a connection unused for READER_IDLE_SECONDS is closed when a read ends: after
# a burst (joins, a load test) the pool shrinks back, where each extra connection held ~0.4 MB of schema and
# page cache for as long as the server idled. Opening one again costs well under a millisecond.
KEEP_READERS = 2
READER_IDLE_SECONDS = 5.0


def state_tables() -> tuple[str, ...]:
    """The replicated tables (the digest covers exactly these, in this order)."""
    return domain.tables()


def events_for(env: Envelope, result: dict) -> list[tuple[str, dict]]:
    """The events an applied command means (pure: the same on every replica)."""
    if "error" in result or result.get("duplicate"):
        return []
    for d in domain.domains():
        if d.events is not None and env.type.startswith(d.name + "."):
            return d.events(env, result)
    return []


class StateStore:
    def __init__(self, path: Path, listener: Callable[[str, dict, int], None] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._local = threading.local()
        # Read connections are shared, not one per thread: each holds its own copy of the schema (~0.5 MB with
        # every domain's tables) and up to 2 MB of page cache, and a server runs dozens of threads that read now
        # and then. Idle connections wait here with when each was last put back, most recently used last; a
        # query takes the last one (so the first ones age) or opens one.
        self._readers: list[tuple[sqlite3.Connection, float]] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._listener = listener  # told (event type, data, index) after each commit
        # Applied commands per family ("node", "member", ...), counted after each commit, and restores under
        # "*": a cache of some tables is current while the counts of the families that write them are unchanged.
        self._applied: dict[str, int] = {}
        self._db = self._connect()
        self._migrate()
        self.last_applied = int(self._meta("last_applied_index", "0"))
        self.fence_term = int(self._meta("fence_term", "0"))

    # --- connections -----------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: durable against process crashes; a power loss may drop the newest transactions, which
        # Raft replays from the log of the surviving majority.
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        return db

    def reader(self) -> sqlite3.Connection:
        """A read-only connection for the calling thread (tools and tests; queries use `reading`)."""
        return thread_reader(self._local, self.path)

    @contextlib.contextmanager
    def reading(self):
        """A read-only connection for one read; at most MAX_IDLE_READERS stay open between reads."""
        with self._readers_lock:
            db = self._readers.pop()[0] if self._readers else None
        if db is None:
            db = open_reader(self.path)
        try:
            yield db
        finally:
            now = time.monotonic()
            stale = []
            with self._readers_lock:
                if not self._closed and len(self._readers) < MAX_IDLE_READERS:
                    self._readers.append((db, now))
                    db = None
                while len(self._readers) > KEEP_READERS and self._readers[0][1] < now - READER_IDLE_SECONDS:
                    stale.append(self._readers.pop(0)[0])
            for old in stale + ([db] if db is not None else []):
                old.close()

    def close(self) -> None:
        with self._readers_lock:
            self._closed = True
            readers, self._readers = self._readers, []
        for db, _ in readers:
            db.close()
        with self._write_lock:
            self._db.close()

    def _migrate(self) -> None:
        for d in domain.domains():
            if d.version_in_user_version:
                done = self._db.execute("PRAGMA user_version").fetchone()[0]
            else:
                row = self._db.execute("SELECT version FROM schema_versions WHERE domain=?", (d.name,)).fetchone()
                done = row[0] if row else 0
            if done > len(d.migrations):
                raise RuntimeError(f"{self.path}: the {d.name} schema is at version {done}, newer than this "
                                   f"Cortex knows ({len(d.migrations)}); run the newer version")
            for number, script in enumerate(d.migrations[done:], start=done + 1):
                if d.version_in_user_version:
                    self._run_migration(script, f"PRAGMA user_version={number}")
                else:
                    self._run_migration(script, ("INSERT OR REPLACE INTO schema_versions VALUES (?, ?)",
                                                 (d.name, number)))

    def _run_migration(self, script: str, record: str | tuple[str, tuple]) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _split_sql(script):
                self._db.execute(statement)
            if isinstance(record, str):
                self._db.execute(record)
            else:
                self._db.execute(*record)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _meta(self, key: str, default: str) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    # --- apply ---------------------------------------------------------------------------------------
    def apply(self, index: int, data: bytes, entry_term: int | None = None) -> dict | list[dict]:
        """Apply the log entry at `index`. Deterministic: same (index, data) → same database change.

        An entry is one envelope (result: a dict) or a group-committed batch (result: a list of dicts, one
        per envelope, in order). An entry that cannot be decoded changes nothing but its index, so one bad
        entry can never wedge the log.
        """
        with self._write_lock:
            if index <= self.last_applied:
                return {"skipped": True, "reason": f"index {index} already applied"}
            try:
                entry = decode_entry(data)
            except (ValueError, KeyError, TypeError) as exc:
                entry, undecodable = None, {"error": f"undecodable log entry: {exc}"}
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                envs = [] if entry is None else entry if isinstance(entry, list) else [entry]
                results = [self._apply_envelope(db, index, env, entry_term) for env in envs]
                result = undecodable if entry is None else results if isinstance(entry, list) else results[0]
                db.execute("INSERT OR REPLACE INTO meta VALUES ('last_applied_index', ?)", (str(index),))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite already rolled back after SQLITE_FULL / SQLITE_IOERR
                    db.execute("ROLLBACK")
                self.fence_term = int(self._meta("fence_term", "0"))
                raise
            self.last_applied = index
            # after COMMIT: a reader that saw the old count may have read the new rows (harmless, it reads
            # again), never the other way round
            for env in envs:
                family = env.type.partition(".")[0]
                self._applied[family] = self._applied.get(family, 0) + 1
                self._applied[env.type] = self._applied.get(env.type, 0) + 1
        if self._listener is not None:
            for env, item in zip(envs, results):
                try:
                    for event_type, data in events_for(env, item):
                        self._listener(event_type, data, index)
                except Exception:
                    # the entry is applied and committed; a failing listener must not look like a failed apply
                    log.exception("event listener failed", extra={"fields": {"index": index, "type": env.type}})
        return result

    def _apply_envelope(self, db: sqlite3.Connection, index: int, env: Envelope, entry_term: int | None) -> dict:
        if entry_term is not None and env.term != entry_term:
            # Stamped by a leader of another term than the one that appended it (it lost leadership and
            # pysyncobj forwarded the entry to the new leader): a deposed leader's decision never counts.
            return {"error": f"stale term {env.term} != log term {entry_term}: proposed by a deposed leader; retry"}
        if env.term < self.fence_term:
            # Proposed by a leader that has since been replaced: its decision must not take effect. Not
            # recorded under the idempotency key, so a retry through the current leader goes through.
            return {"error": f"stale term {env.term} < {self.fence_term}: proposed by a deposed leader; retry"}
        if env.term > self.fence_term:
            self.fence_term = env.term
            db.execute("INSERT OR REPLACE INTO meta VALUES ('fence_term', ?)", (str(env.term),))
        row = db.execute("SELECT result FROM requests WHERE idem=?", (env.idem,)).fetchone()
        if row is not None:
            return {**json.loads(row[0]), "duplicate": True}
        command = domain.commands().get(env.type)
        if command is None:
            result = {"error": f"unknown command type {env.type!r}"}
        else:
            result = command.apply(db, index, env)
        if command is None or command.keep_result:
            db.execute("INSERT INTO requests VALUES (?, ?, ?)", (env.idem, index, json.dumps(result)))
            if index % 1000 == 0:
                db.execute("DELETE FROM requests WHERE log_index < ?", (index - REQUEST_RETENTION,))
        return result

    # --- reads ---------------------------------------------------------------------------------------
    def query(self, name: str, args: dict) -> Any:
        handler = domain.queries().get(name)
        if handler is None:
            known = sorted(domain.queries())
            raise KeyError(f"unknown query {name!r}; known: {', '.join(known)}")
        with self.reading() as db:
            db.execute("BEGIN")
            try:
                return handler(db, args)
            finally:
                db.execute("COMMIT")

    def applied_index(self) -> int:
        return self.last_applied

    def generation(self, *families: str) -> tuple[int, ...]:
        """How many commands of these families (`node`) or types (`node.liveness`) were applied, and how many
        snapshots restored, since the store was opened: unchanged means the tables they write are unchanged."""
        return (*(self._applied.get(f, 0) for f in families), self._applied.get("*", 0))

    def digest(self) -> str:
        """SHA-256 over the replicated tables in key order: equal on replicas that applied the same log."""
        with self.reading() as db:
            return cluster.digest(db)

    # --- snapshots -------------------------------------------------------------------------------------
    def backup_to(self, path: Path) -> int:
        """Write a consistent copy of the database to `path`; return the applied index it holds."""
        with self._write_lock:
            target = sqlite3.connect(path)
            try:
                self._db.backup(target)
            finally:
                target.close()
            return self.last_applied

    def restore_from(self, path: Path) -> bool:
        """Replace the state with the snapshot at `path` unless ours is at least as new. True if restored."""
        source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = source.execute("SELECT value FROM meta WHERE key='last_applied_index'").fetchone()
            snapshot_index = int(row[0]) if row else 0
            with self._write_lock:
                if snapshot_index <= self.last_applied:
                    return False
                source.backup(self._db)
                self._applied["*"] = self._applied.get("*", 0) + 1
                self.last_applied = int(self._meta("last_applied_index", "0"))
                self.fence_term = int(self._meta("fence_term", "0"))
                return True
        finally:
            source.close()


def open_reader(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False, timeout=30)
    db.execute("PRAGMA query_only=ON")
    return db


def thread_reader(local: threading.local, path: Path) -> sqlite3.Connection:
    """The calling thread's read-only connection to `path`, opened on first use and kept in `local`."""
    db = getattr(local, "db", None)
    if db is None:
        db = local.db = open_reader(path)
    return db


def _split_sql(script: str) -> list[str]:
    """Statements of a migration script; sqlite3.complete_statement keeps triggers (BEGIN ... END;) whole."""
    statements, current = [], ""
    for piece in script.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if current.strip(" \n\t;"):
                statements.append(current.strip())
            current = ""
    if current.strip(" \n\t;"):
        statements.append(current.strip())
    return statements


def remove_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(f"{path}{suffix}")
        except FileNotFoundError:
            pass

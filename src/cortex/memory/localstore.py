"""The node-local store: `local`-tier memory that never leaves this node.

Same schema and the same handlers and queries as the replicated domain, applied here directly: there is no
log, so the envelope is stamped locally (this node's clock and a fresh id). Nothing here is replicated,
backed up or visible from other nodes.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from cortex.core.commands import CommandError, Envelope
from cortex.core.state import thread_reader
from cortex.memory import domain
from cortex.memory.schema import LOCAL_MIGRATIONS


class LocalStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        done = self._db.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(LOCAL_MIGRATIONS[done:], start=done + 1):
            self._db.executescript(f"BEGIN; {script}; PRAGMA user_version={number}; COMMIT;")
        self.index = self._db.execute("SELECT coalesce(max(change_index), 0) FROM memory_state").fetchone()[0]

    def apply(self, command_type: str, args: dict) -> dict:
        """Validate and apply one command; raise CommandError with the reason if refused."""
        validator = domain.VALIDATORS.get(command_type)
        if validator is None or command_type.startswith("memory.restore"):
            raise CommandError(f"{command_type} does not apply to the node-local store")
        normalized = validator(args, local=True)
        command_id = uuid.uuid4().hex
        env = Envelope(type=command_type, args=normalized, id=command_id, ts=time.time(), term=0, idem=command_id)
        handler = domain.DOMAIN.commands[command_type].apply
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = handler(self._db, self.index + 1, env)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            if "error" not in result:
                self.index += 1
        if "error" in result:
            raise CommandError(result["error"])
        return result

    def reader(self) -> sqlite3.Connection:
        return thread_reader(self._local, self.path)

    def query(self, name: str, args: dict | None = None) -> Any:
        db = self.reader()
        db.execute("BEGIN")
        try:
            return domain.QUERIES[name](db, args or {})
        finally:
            db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

"""The node-local time-series store: SQLite in its own file, downsampled 10 s -> 1 min -> 1 h, bounded.

Raw readings are kept for RAW_KEEP, one-minute summaries (mean, min, max) for MINUTE_KEEP, hourly ones for
30 days. Compaction runs with the clock it is given, so a simulated clock drives it in backtests. The file is
bounded twice: a cap on the number of series (a machine that grows mounts or drives without end cannot add
more) and a cap in megabytes, past which the oldest hourly rows go first. This store is never replicated;
only the summaries computed from it are.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

log = logging.getLogger("cortex.sentinel")

RAW_KEEP = 2 * 3600.0
MINUTE_KEEP = 2 * 86400.0
HOUR_KEEP = 30 * 86400.0
MAX_SERIES = 400

SCHEMA = """
CREATE TABLE IF NOT EXISTS series (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS raw (series INTEGER NOT NULL, ts INTEGER NOT NULL, value REAL NOT NULL,
    PRIMARY KEY (series, ts)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS minute (series INTEGER NOT NULL, ts INTEGER NOT NULL, mean REAL NOT NULL,
    lo REAL NOT NULL, hi REAL NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (series, ts)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hour (series INTEGER NOT NULL, ts INTEGER NOT NULL, mean REAL NOT NULL,
    lo REAL NOT NULL, hi REAL NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (series, ts)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class History:
    def __init__(self, path: Path | str, max_mb: float = 50.0):
        self.path = str(path)
        self.max_bytes = int(max_mb * 1024 * 1024)
        self._lock = threading.Lock()
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            # only this node's own readings are lost: keep the file for a look, start a new one
            aside = f"{self.path}.broken-{int(time.time())}"
            log.warning("sentinel history unreadable; moved aside, starting a new one",
                        extra={"fields": {"path": self.path, "moved_to": aside, "error": str(exc)}})
            self.db.close()
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.replace(self.path + suffix, aside + suffix)
            self._open()
        self._full_logged = False
        self._compacted_minute = self._compacted_hour = 0

    def _open(self) -> None:
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # only takes effect on a new file: before any table
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._ids = dict((name, i) for i, name in self.db.execute("SELECT id, name FROM series"))

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # --- writing -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self):
        """One transaction, rolled back when anything in it fails (a full disk): the next one starts clean, and
        series ids handed out inside it are forgotten with it."""
        known = dict(self._ids)
        self.db.execute("BEGIN")
        try:
            yield
        except BaseException:
            if self.db.in_transaction:  # SQLite rolls some failures (a full disk) back by itself
                self.db.execute("ROLLBACK")
            self._ids = known
            raise
        self.db.execute("COMMIT")

    def _series(self, name: str) -> int | None:
        sid = self._ids.get(name)
        if sid is None:
            if len(self._ids) >= MAX_SERIES:
                if not self._full_logged:
                    self._full_logged = True
                    log.warning("sentinel history holds the most series it keeps; new signals are not recorded",
                                extra={"fields": {"series": MAX_SERIES, "first_left_out": name}})
                return None
            sid = self.db.execute("INSERT INTO series (name) VALUES (?)", (name,)).lastrowid
            self._ids[name] = sid
        return sid

    def add(self, ts: float, values: dict[str, float | None]) -> None:
        """One reading; absent signals (None) are not stored (a gap, not a zero)."""
        rows = []
        with self._lock, self._transaction():
            for name, value in values.items():
                if value is None:
                    continue
                sid = self._series(name)
                if sid is not None:
                    rows.append((sid, int(ts), float(value)))
            self.db.executemany("INSERT OR REPLACE INTO raw (series, ts, value) VALUES (?, ?, ?)", rows)

    def compact(self, now: float) -> None:
        """Fold finished minutes into `minute` and finished hours into `hour`; drop what retention ends."""
        minute_end, hour_end = int(now) // 60 * 60, int(now) // 3600 * 3600
        with self._lock, self._transaction():
            if minute_end > self._compacted_minute:
                self.db.execute(
                    "INSERT OR REPLACE INTO minute SELECT series, ts / 60 * 60 AS m, avg(value), min(value), max(value), "
                    "count(*) FROM raw WHERE ts >= ? AND ts < ? GROUP BY series, m",
                    (self._compacted_minute or minute_end - 3600, minute_end))
                self._compacted_minute = minute_end
            if hour_end > self._compacted_hour:
                self.db.execute(
                    "INSERT OR REPLACE INTO hour SELECT series, ts / 3600 * 3600 AS h, sum(mean * n) / sum(n), "
                    "min(lo), max(hi), sum(n) FROM minute WHERE ts >= ? AND ts < ? GROUP BY series, h",
                    (self._compacted_hour or hour_end - 2 * 86400, hour_end))
                self._compacted_hour = hour_end
                # the long tiers' retention moves by the hour: scanning them every minute would cost more
                self.db.execute("DELETE FROM minute WHERE ts < ?", (now - MINUTE_KEEP,))
                self.db.execute("DELETE FROM hour WHERE ts < ?", (now - HOUR_KEEP,))
            self.db.execute("DELETE FROM raw WHERE ts < ?", (now - RAW_KEEP,))
        with self._lock:
            self._bound()

    def _bound(self) -> None:
        """Past the size cap, drop the oldest hourly rows in one cut sized to get 10 % under it."""
        size = self.size_bytes()
        if size <= self.max_bytes:
            return
        for _ in range(8):  # a delete frees whole pages only: cut again until it is under
            lo, hi = self.db.execute("SELECT min(ts), max(ts) FROM hour").fetchone()
            if lo is None or hi <= lo:
                break
            self.db.execute("DELETE FROM hour WHERE ts < ?", (hi - (hi - lo) * 0.9 * self.max_bytes / size,))
            self.db.execute("PRAGMA incremental_vacuum")
            size = self.size_bytes()
            if size <= self.max_bytes:
                break
        if self.size_bytes() > self.max_bytes and not self._full_logged:
            self._full_logged = True
            log.warning("sentinel history is over its size cap with the hourly tier trimmed; raise history_max_mb",
                        extra={"fields": {"path": self.path, "bytes": self.size_bytes(), "cap": self.max_bytes}})

    def size_bytes(self) -> int:
        pages = self.db.execute("PRAGMA page_count").fetchone()[0] - self.db.execute("PRAGMA freelist_count").fetchone()[0]
        return pages * self.db.execute("PRAGMA page_size").fetchone()[0]

    # --- reading -----------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._ids)

    def series(self, name: str, since: float, until: float | None = None) -> list[tuple[float, float]]:
        """(ts, value) from `since`, each stretch at the finest resolution still kept (hourly and minute means
        where the raw readings are gone)."""
        sid = self._ids.get(name)
        if sid is None:
            return []
        until = float("inf") if until is None else until
        with self._lock:
            raw = self.db.execute("SELECT ts, value FROM raw WHERE series=? AND ts>=? ORDER BY ts",
                                  (sid, since)).fetchall()
            raw_start = raw[0][0] if raw else float("inf")
            minute = self.db.execute("SELECT ts + 30, mean FROM minute WHERE series=? AND ts>=? AND ts + 60 <= ? "
                                     "ORDER BY ts", (sid, since, raw_start)).fetchall()
            minute_start = minute[0][0] - 30 if minute else raw_start
            hour = self.db.execute("SELECT ts + 1800, mean FROM hour WHERE series=? AND ts>=? AND ts + 3600 <= ? "
                                   "ORDER BY ts", (sid, since, minute_start)).fetchall()
        return [(float(t), float(v)) for t, v in (*hour, *minute, *raw) if t <= until]

    def last(self, name: str, since: float) -> float | None:
        """The newest value since `since` (a raw reading, else the newest minute or hour mean)."""
        sid = self._ids.get(name)
        if sid is None:
            return None
        with self._lock:
            for sql in ("SELECT value FROM raw WHERE series=? AND ts>=? ORDER BY ts DESC LIMIT 1",
                        "SELECT mean FROM minute WHERE series=? AND ts>=? ORDER BY ts DESC LIMIT 1",
                        "SELECT mean FROM hour WHERE series=? AND ts>=? ORDER BY ts DESC LIMIT 1"):
                row = self.db.execute(sql, (sid, since)).fetchone()
                if row:
                    return row[0]
        return None

    def low(self, name: str, since: float) -> float | None:
        """The smallest value since `since`, over every resolution (a counter's value at the window's start)."""
        sid = self._ids.get(name)
        if sid is None:
            return None
        with self._lock:
            row = self.db.execute(
                "SELECT min(v) FROM (SELECT min(value) AS v FROM raw WHERE series=?1 AND ts>=?2 UNION ALL "
                "SELECT min(lo) FROM minute WHERE series=?1 AND ts>=?2 UNION ALL "
                "SELECT min(lo) FROM hour WHERE series=?1 AND ts>=?2)", (sid, since)).fetchone()
        return row[0] if row else None

    def meta_get(self, key: str, default: str = "") -> str:
        with self._lock:
            row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def meta_set(self, key: str, value: str) -> None:
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

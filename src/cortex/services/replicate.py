"""Continuous volume replication: while another node runs a service with a volume, this node (its home or one
of its partners) pulls the volume every `replicate_interval` seconds into its own
<data_dir>/services/<name>/volume, the copy a takeover starts from.

The age of that copy (the time since the pull that made it began: the data a takeover would lose) is the
*lag* each node reports per service (`sync_age`, seconds at the time of the report; the state adds the time
since the report, so no two nodes' clocks are compared). A pull runs in its own thread, one per service at a
time; a node that starts the service itself first waits for its pull to end (`settle`), so the copy it runs
is never written under it.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from cortex.services import spec as specs
from cortex.services.ports import Ports

RETRY_MAX = 300.0  # seconds: a failing pull is retried sooner than this, doubling from the interval


def holder_running(row: dict) -> bool:
    """Whether the holder reported the service running at its current epoch (there is data worth pulling)."""
    return any(r["node_id"] == row["holder"] and r["epoch"] >= row["epoch"] and r["state"] == "running"
               for r in row.get("reports", []))


class _Copy:
    """What this node knows of its copy of one service's volume."""

    def __init__(self) -> None:
        self.synced_at: float | None = None  # when the pull that made the copy began (this node's clock)
        self.source = ""
        self.error = ""
        self.failures = 0
        self.due = 0.0
        self.thread: threading.Thread | None = None
        self.caught_up = 0  # the epoch of the giveback whose catch-up pull succeeded
        self.catching = 0  # the epoch of the giveback being caught up


class Replicator:
    def __init__(self, node_id: str, data_dir: Path, ports: Ports, log):
        self.node_id, self.data_dir, self.ports, self.log = node_id, data_dir, ports, log
        self.copies: dict[str, _Copy] = {}
        self._lock = threading.Lock()

    def volume(self, name: str) -> Path:
        return self.data_dir / "services" / name / "volume"

    def reconcile(self, rows: list[dict], running_here: set[str]) -> None:
        """Start the pulls that are due. `running_here`: the services this node runs (never pulled into)."""
        if self.ports.volume_sync is None:
            return
        now = time.monotonic()
        for row in rows:
            name, spec = row["name"], row["spec"]
            if self._catching_up(row, running_here):
                self._start(name, row["prev_holder"], spec, row["epoch"], now)
                continue
            if not spec["volume"] or row["holder"] == self.node_id or name in running_here:
                continue
            if self.node_id not in (row["home"], *row.get("candidates", [])) or not holder_running(row):
                continue
            self._start(name, row["holder"], spec, 0, now)
        with self._lock:
            for name in [n for n in self.copies if n not in {r["name"] for r in rows}]:
                del self.copies[name]

    def _catching_up(self, row: dict, running_here: set[str]) -> bool:
        """A giveback to this node: the partner serves until this node has pulled its volume once since the
        move (lease.catch_up), so its final pull after the partner stopped is short."""
        prev = row.get("prev_holder") or ""
        return bool(row["spec"]["volume"] and row["holder"] == self.node_id and row["state"] == "giving_back"
                    and prev and prev != self.node_id and not row.get("released") and row["name"] not in running_here
                    and any(r["node_id"] == prev and r["state"] == "running" for r in row.get("reports", [])))

    def _start(self, name: str, source: str, spec: dict, epoch: int, now: float) -> None:
        """A pull in its own thread when none runs and one is due (`epoch`: a catch-up, once per epoch)."""
        copy = self._copy(name)
        with self._lock:
            if copy.thread is not None and copy.thread.is_alive():
                return
            if epoch and copy.caught_up == epoch:
                return
            if epoch and copy.catching != epoch:  # a new giveback: an older pull's error is not its failure
                copy.catching, copy.error, copy.due = epoch, "", 0.0
            if now < copy.due and not (epoch and copy.caught_up != epoch and not copy.error):
                return
            copy.thread = threading.Thread(target=self._pull, args=(name, source, spec, copy, epoch),
                                           name=f"replicate-{name}", daemon=True)
            copy.thread.start()

    def _copy(self, name: str) -> _Copy:
        with self._lock:
            copy = self.copies.get(name)
            if copy is None:
                copy = self.copies[name] = self._load(name)
            return copy

    def _marker(self, name: str) -> Path:
        return self.data_dir / "services" / name / "replica.json"

    def _load(self, name: str) -> _Copy:
        """A copy synced by an earlier run of this agent keeps its age (the volume on disk is what it says)."""
        copy = _Copy()
        try:
            doc = json.loads(self._marker(name).read_text())
            copy.synced_at, copy.source = float(doc["synced_at"]), str(doc["source"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return copy

    def _save(self, name: str, copy: _Copy) -> None:
        marker = self._marker(name)
        try:
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps({"synced_at": copy.synced_at, "source": copy.source}))
            tmp.replace(marker)
        except OSError as exc:
            self.log.info("services: %s: could not note the copy's age: %s", name, exc)

    def _pull(self, name: str, source: str, spec: dict, copy: _Copy, epoch: int = 0) -> None:
        began, began_mono = time.time(), time.monotonic()
        interval = specs.replicate_interval(spec)
        try:
            report = self.ports.volume_sync.pull(name, source, self.volume(name))
        except Exception as exc:
            copy.error, copy.failures = f"pull from {source} failed: {exc}", copy.failures + 1
            copy.due = time.monotonic() + min(RETRY_MAX, interval * 2 ** min(copy.failures - 1, 8)) \
                if copy.failures > 1 else time.monotonic() + min(interval, 5.0)
            self.log.info("services: %s: %s", name, copy.error)
            return
        copy.synced_at, copy.source, copy.error, copy.failures = began, source, "", 0
        copy.caught_up = epoch or copy.caught_up
        copy.due = began_mono + interval
        self._save(name, copy)
        if report.files_changed:
            self.log.debug("services: %s: pulled %d files (%d bytes) from %s", name, report.files_changed,
                           report.bytes_copied, source)

    def settle(self, name: str, timeout: float = 600.0) -> None:
        """Wait for a pull of `name` in flight to end (a start here must not race it)."""
        with self._lock:
            copy = self.copies.get(name)
            thread = copy.thread if copy else None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def abandon(self, name: str, source: str) -> None:
        """An unplanned takeover from `source`, fenced: a pull of `name` from it still in flight is cancelled,
        not waited for (`settle`): a frozen source accepts the connection and answers nothing until the
        call's deadline, minutes away. Whole files it already wrote stay; the copy's age stays that of the
        last complete pull."""
        with self._lock:
            copy = self.copies.get(name)
            busy = copy is not None and copy.thread is not None and copy.thread.is_alive()
        abandon = getattr(self.ports.volume_sync, "abandon", None)
        if busy and abandon is not None:
            abandon(source)

    def age(self, name: str) -> tuple[float | None, str]:
        """(seconds since the copy's pull began, the node it came from); None: no copy synced by this agent."""
        copy = self._copy(name)
        if copy.synced_at is None:
            return None, ""
        return max(0.0, time.time() - copy.synced_at), copy.source

    def forget(self, name: str) -> None:
        """This node runs the service now: its copy becomes the live volume, no longer a replica."""
        with self._lock:
            self.copies.pop(name, None)
        self._marker(name).unlink(missing_ok=True)

    def report(self, name: str) -> dict:
        """The fields a node's report carries for its copy (none when it has not synced)."""
        copy = self._copy(name)
        out = {}
        if copy.synced_at is not None:
            out["sync_age"] = round(max(0.0, time.time() - copy.synced_at), 3)
            out["synced_from"] = copy.source
        if copy.error:
            out["sync_error"] = copy.error[:500]
        return out


__all__ = ["Replicator", "holder_running"]

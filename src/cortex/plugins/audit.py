"""The node's side of the `access` domain (access.py): enforcing plugin policies on tool calls, and writing
the audit log of calls that change something.

Policies are read from the replicated state at most every POLICY_TTL seconds (this node's replica on a
server, a stale read elsewhere) and at once after a change applied here, so a tool call costs no cluster
round trip. A node that cannot read the policies (no server reachable yet) keeps the last ones it read, or the
tools' own roles until it has read any.

Audit records are written in the background, in batches, each retried under one idempotency key until the
cluster takes it: a mutating tool call does not wait for its audit record, and a retried batch is recorded
once. A batch goes out AUDIT_DELAY seconds after its first record (or once it is full), so a busy node adds
about one replicated write per second for its audit, not one per call. If the cluster stays away long enough for AUDIT_QUEUE records to wait, the oldest are dropped and the
drop is logged (and counted in `pending()`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections import deque
from typing import Any

from cortex.plugins.access import CALLER_ROLES, MAX_RECORDS
from cortex.plugins.api import RETRYABLE_CODES, Caller, ClusterAPI, holds_no_replica, status_code_name

log = logging.getLogger("cortex.plugins.audit")

POLICY_TTL = 2.0
AUDIT_QUEUE = 10_000
RETRY_EVERY = 1.0
AUDIT_DELAY = 1.0


def digest(arguments: Any) -> str:
    """A short fingerprint of a call's arguments (the idempotency key left out): equal calls, equal digests,
    without writing values (tokens, messages) into the log."""
    if isinstance(arguments, dict):
        arguments = {k: v for k, v in arguments.items() if k != "idempotency_key"}
    text = json.dumps(arguments, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rule_refusal(rule: dict | None, caller: Caller, what: str, plugin: str) -> str:
    """'' when the rule lets the caller through (None: no rule), else why not and what to do."""
    if rule is None or caller.role in rule["roles"] or caller.identity in rule["callers"]:
        return ""
    allowed = [f"role {r}" for r in rule["roles"]] + list(rule["callers"])
    return (f"the cluster's policy for plugin {plugin!r} lets only {', '.join(allowed) or 'no one'} {what} "
            f"through its tools; this caller is {caller.identity} ({caller.role}); an admin can change it with "
            f"`cortex audit set {plugin}` (cortex audit policies shows them)")


class Access:
    """Policy checks and audit records for one node's plugin host."""

    def __init__(self, cluster: ClusterAPI, node_id: str = ""):
        self.cluster = cluster
        self.node_id = node_id or getattr(cluster, "node_id", "")
        self._lock = threading.Lock()
        self._policies: dict[str, dict] = {}
        self._read_at = float("-inf")
        self._queue: deque[dict] = deque()
        self._dropped = 0
        self._wake = threading.Condition(self._lock)
        self._sender: threading.Thread | None = None
        self._stopping = False
        self._hurry = False  # flush(): send what is queued without waiting for AUDIT_DELAY

    # --- policies ---------------------------------------------------------------------------------------
    def _read_policies(self) -> list[dict]:
        try:
            return self.cluster.read_local("access.policies", {})
        except Exception as exc:
            if not holds_no_replica(exc):
                raise
        return self.cluster.read("access.policies", {}, level="stale")

    def policies(self) -> dict[str, dict]:
        now = time.monotonic()
        with self._lock:
            if now - self._read_at < POLICY_TTL:
                return self._policies
        try:
            rows = self._read_policies()
        except Exception as exc:  # keep what we knew; the next call tries again
            log.debug("plugin policies not readable", extra={"fields": {"error": str(exc)}})
            with self._lock:
                return self._policies
        with self._lock:
            self._policies, self._read_at = {r["plugin"]: r for r in rows}, now
            return self._policies

    def invalidate(self) -> None:
        with self._lock:
            self._read_at = float("-inf")

    def refusal(self, plugin: str, read_only: bool, caller: Caller) -> str:
        policy = self.policies().get(plugin)
        if policy is None or caller.identity == "local":  # the node's own plugins calling tools in process
            return ""
        if read_only:
            return rule_refusal(policy["read"], caller, "read", plugin)
        return rule_refusal(policy["change"], caller, "change anything", plugin)

    # --- audit records -----------------------------------------------------------------------------------
    def record(self, tool: str, plugin: str, arguments: Any, caller: Caller, outcome: str, detail: str = "") -> None:
        entry = {"ts": time.time(), "node": self.node_id[:64], "caller": caller.identity[:200],
                 "role": caller.role if caller.role in CALLER_ROLES else "", "tool": tool[:128],
                 "plugin": plugin[:64], "digest": digest(arguments), "outcome": outcome, "detail": detail[:500]}
        with self._wake:
            if len(self._queue) >= AUDIT_QUEUE:
                self._queue.popleft()
                self._dropped += 1
                if self._dropped in (1, 10, 100) or self._dropped % 1000 == 0:
                    log.error("audit records dropped: the cluster has not taken them for a while",
                              extra={"fields": {"dropped": self._dropped}})
            self._queue.append(entry)
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_loop, name="audit-sender", daemon=True)
                self._sender.start()
            self._wake.notify()

    def pending(self) -> dict:
        with self._lock:
            return {"queued": len(self._queue), "dropped": self._dropped}

    def _send_loop(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._queue or self._stopping)
                if not self._queue:
                    return
                # Gather what else comes within AUDIT_DELAY into the same write.
                self._wake.wait_for(lambda: len(self._queue) >= MAX_RECORDS or self._stopping or self._hurry,
                                    AUDIT_DELAY)
                batch = list(self._queue)[:MAX_RECORDS]
            key = f"audit:{self.node_id}:{uuid.uuid4().hex}"
            while True:  # the same batch under the same key until the cluster takes it
                try:
                    self.cluster.write("access.record", {"records": batch}, key)
                    break
                except Exception as exc:
                    if status_code_name(exc) not in RETRYABLE_CODES and "level" not in str(exc):
                        log.error("audit records refused", extra={"fields": {"error": str(exc), "n": len(batch)}})
                        break
                    with self._wake:
                        if self._stopping:
                            return
                        self._wake.wait(RETRY_EVERY)
            with self._wake:
                for _ in range(min(len(batch), len(self._queue))):
                    self._queue.popleft()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every record so far was written (tests, shutdown); False after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._wake:
            self._hurry = True
            self._wake.notify_all()
        try:
            while time.monotonic() < deadline:
                with self._lock:
                    if not self._queue:
                        return True
                time.sleep(0.02)
            return False
        finally:
            with self._wake:
                self._hurry = False

    def stop(self) -> None:
        self.flush(2.0)
        with self._wake:
            self._stopping = True
            self._wake.notify_all()

"""The summary each node publishes to the replicated state, and what others derive from it.

One key per node in the replicated key-value store, `plugins/sentinel/nodes/<node id>`, JSON:

    {"node_id", "ts", "score", "level", "factors": [...], "predictions": [...], "anomalies": [...],
     "raised": [alert keys], "metrics": "host:port", "signals": {name: latest}, "spark": {name: [values]}}

Only this summary is replicated, never the raw series (they stay in the node's history file). It is rewritten
when the assessment changes, and at least every REFRESH seconds so a reader can tell a silent node (the
record's age) from a healthy one. The scheduler's placement, the alerts list, `cortex health` and the MCP
tools all read these records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from cortex.plugins.records import encode, read_prefix  # noqa: F401  (encode: re-exported)

PREFIX = "plugins/sentinel/nodes/"
REFRESH = 300.0
STALE = 3 * REFRESH  # older than this, a record says nothing about the node's present
DEGRADED_PENALTY = 10.0  # subtracted from a degraded node's scheduling score: below every healthy node


def key(node_id: str) -> str:
    return PREFIX + node_id



def read_all(read: Callable[[str, dict], Any]) -> list[dict]:
    """Every node's record, with what the leader sees of each node merged in (with_leader_view)."""
    return with_leader_view(read_prefix(read, PREFIX))


HEARTBEAT_LATE = 15.0  # seconds since the leader last heard from a node
RAFT_BEHIND = 1000  # entries a server's log is behind the leader's


def with_leader_view(found: list[dict], now: float | None = None) -> list[dict]:
    """A node cannot see its own missed heartbeats or its Raft lag; the leader can, and publishes them under
    `peers` in its record. They become factors of the node concerned (lowering its score, and its level
    below 80 / 40), marked `"source": "leader"`."""
    import time

    now = time.time() if now is None else now
    leaders = [r for r in found if isinstance(r.get("peers"), dict) and fresh(r, now)]
    if not leaders:
        return found
    leader = max(leaders, key=lambda r: r.get("ts", 0))
    out = []
    for r in found:
        seen = leader["peers"].get(r["node_id"]) or {}
        extra = []
        age, lag = seen.get("heartbeat_age"), seen.get("raft_lag")
        if isinstance(age, int | float) and age > HEARTBEAT_LATE:
            extra.append({"name": "heartbeat", "penalty": 10.0, "source": "leader",
                          "detail": f"the leader ({leader['node_id']}) last heard from it {age:.0f}s ago"})
        if isinstance(lag, int | float) and lag > RAFT_BEHIND:
            extra.append({"name": "raft_lag", "penalty": 10.0, "source": "leader",
                          "detail": f"its Raft log is {lag:.0f} entries behind the leader's"})
        if not extra:
            out.append(r)
            continue
        score = max(0.0, float(r.get("score", 100)) - sum(f["penalty"] for f in extra))
        level = r.get("level", "healthy")
        if score < 40:
            level = "critical"
        elif score < 80 and level == "healthy":
            level = "degraded"
        out.append({**r, "score": score, "level": level, "factors": [*(r.get("factors") or []), *extra]})
    return out


def fresh(record: dict, now: float) -> bool:
    return now - float(record.get("ts", 0)) <= STALE


def alerts(records: Iterable[dict], now: float) -> list[dict]:
    """The raised sentinel alerts of every node, in the shape of builtin/alerts.py's (key, severity, message):
    squelched like the others (`sentinel.disk_full:/data@w1` matches `sentinel.*@w1`), one per key."""
    out = []
    for r in records:
        if not fresh(r, now):
            continue
        raised = set(r.get("raised") or [])
        for p in r.get("predictions") or []:
            if p.get("key") in raised:
                out.append({"key": f"sentinel.{p['key']}@{r['node_id']}", "severity": p.get("severity", "warning"),
                            "message": f"{r['node_id']}: {p.get('message', p['key'])}"})
    return out


class SentinelPlacement:
    """The scheduler's view of node health, for every task kind ("*"): a critical node is refused while
    another node can take the task (a last resort otherwise); a degraded one ranks below every healthy one."""

    kinds = frozenset({"*"})
    uses_node_resources = True
    CACHE_SECONDS = 2.0  # summaries change at most every assessment (30 s): a busy scheduler reads them less

    def __init__(self):
        self._cache: tuple[float, dict[str, dict]] = (float("-inf"), {})

    def _levels(self, read) -> dict[str, dict]:
        import time

        at, levels = self._cache
        if time.monotonic() - at < self.CACHE_SECONDS:
            return levels
        now = time.time()
        try:
            levels = {r["node_id"]: r for r in read_all(read) if fresh(r, now)}
        except Exception:
            levels = {}  # no records readable: schedule as if every node were healthy
        self._cache = (time.monotonic(), levels)
        return levels

    def prepare(self, read):
        levels = self._levels(read)

        def refusal(task: dict, node_id: str) -> str:
            r = levels.get(node_id)
            if r is None or r.get("level") != "critical":
                return ""
            worst = next((p for p in r.get("predictions") or [] if p.get("severity") == "critical"), None)
            return (f"sentinel: critical ({worst['message'] if worst else 'score ' + str(r.get('score'))}); taken "
                    "only when no other node fits")
        return refusal

    def rank(self, read):
        levels = self._levels(read)
        return lambda node_id: DEGRADED_PENALTY if (levels.get(node_id) or {}).get("level") == "degraded" else 0.0

"""Per-node records a plugin publishes in the replicated key-value store: one JSON value per node under the
plugin's prefix (`plugins/<name>/nodes/<node id>`). That is how a node tells the leader and the other nodes
what only it knows (its Kubernetes contexts, its health summary) without a state domain of its own."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any


def encode(record: dict) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def parse_records(rows: Iterable[dict | None]) -> list[dict]:
    """Records from `kv.list` rows, by node id; a row that is not a valid record is skipped (someone else's key)."""
    out = []
    for row in rows:
        try:
            record = json.loads((row or {}).get("value") or "")
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("node_id"), str):
            out.append(record)
    return sorted(out, key=lambda r: r["node_id"])


def read_prefix(read: Callable[[str, dict], Any], prefix: str) -> list[dict]:
    """Every record under `prefix` through a state query function: `StateStore.query` on the leader, or
    `lambda q, a: bridge.read(q, a, level="stale")` from a plugin."""
    return parse_records(read("kv.list", {"prefix": prefix, "limit": 10_000}))

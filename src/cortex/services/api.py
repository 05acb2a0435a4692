"""Client-side service operations shared by the CLI (over gRPC) and the plugin's tools (over the agent bridge).

A backend is anything with `write(command_type, args, idempotency_key=...)` and `read(query, args, level=...)`
(cortex.client.Client and the agent's PluginBridge). Every write carries an idempotency key, so a retried
deploy, takeover or giveback applies once.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from cortex.services import spec as specs


class ServiceError(RuntimeError):
    """An operation could not be done; the message says what to do next."""


def load_spec(text: str) -> dict:
    """A spec from YAML or JSON text (JSON is YAML), checked; SpecError says what to fix."""
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise specs.SpecError(f"the spec is not valid YAML/JSON: {exc}") from None
    specs.validate(doc)
    return doc


def _key(key: str | None) -> str:
    return key or uuid.uuid4().hex


def deploy(backend, doc: dict, key: str | None = None) -> dict:
    specs.validate(doc)  # the same check the cluster runs: a bad spec fails here, before any write
    return backend.write("service.deploy", {"spec": doc}, idempotency_key=_key(key))


def remove(backend, name: str, key: str | None = None) -> dict:
    return backend.write("service.remove", {"name": name}, idempotency_key=_key(key))


def restart(backend, name: str, key: str | None = None) -> dict:
    return backend.write("service.restart", {"name": name}, idempotency_key=_key(key))


def get(backend, name: str) -> dict:
    row = backend.read("service.get", {"name": name}, level="leader")
    if row is None:
        raise ServiceError(f"no service {name!r}; see `cortex services list`")
    return row


def listing(backend) -> list[dict]:
    return backend.read("service.list", {}, level="leader")


def lag(row: dict, now: float | None = None) -> dict:
    """How old the freshest copy of the service's volume on another node is: the data an unplanned takeover
    would lose now. Each node reports its copy's age when it reports; the time since that report is added
    (the cluster's clock, as every report's `at`), so no two nodes' clocks are compared. `lag_s` is None when
    the service has no volume or no other node has synced it yet (`sync` then says which)."""
    if not row["spec"]["volume"]:
        return {"lag_s": None, "lag_node": "", "sync": "no volume"}
    now = time.time() if now is None else now
    copies = [(r["sync_age"] + max(0.0, now - r["at"]), r["node_id"]) for r in row["reports"]
              if r["node_id"] != row["holder"] and r.get("sync_age") is not None]
    errors = [f"{r['node_id']}: {r['sync_error']}" for r in row["reports"]
              if r["node_id"] != row["holder"] and r.get("sync_error")]
    if not copies:
        return {"lag_s": None, "lag_node": "", "sync": "; ".join(errors) or "not synced to another node yet"}
    age, node = min(copies)
    return {"lag_s": round(age, 1), "lag_node": node, "sync": "; ".join(errors) or "ok"}


def lag_text(doc: dict) -> str:
    return "-" if doc["lag_s"] is None else f"{doc['lag_s']:.0f}s ({doc['lag_node']})"


def summary(row: dict) -> dict:
    """One table row: the HA state and what the holder reports."""
    report = next((r for r in row["reports"] if r["node_id"] == row["holder"]), None) or {}
    return {**lag(row), "name": row["name"], "kind": row["spec"]["kind"], "home": row["home"], "holder": row["holder"],
            "epoch": row["epoch"], "ha": row["state"], "run": report.get("state", "-") if report.get(
                "epoch") == row["epoch"] else "pending", "healthy": bool(report.get("healthy")),
            "restarts": report.get("restarts", 0), "ports": ",".join(map(str, row["spec"]["ports"])),
            "detail": row["reason"] or report.get("detail", "")}


def logs(backend, name: str, after: int = 0, limit: int = 1000) -> list[dict]:
    get(backend, name)
    return backend.read("service.output", {"name": name, "after": after, "limit": limit}, level="leader")


def ha_status(backend) -> dict:
    rows = listing(backend)
    nodes = backend.read("service.nodes", {}, level="leader")
    pairs = [{"name": r["name"], "home": r["home"], "partners": r["candidates"], "holder": r["holder"],
              "state": r["state"], "epoch": r["epoch"], "takeovers": r["takeovers"], "givebacks": r["givebacks"],
              "last_downtime_s": r["last_downtime"], "auto_giveback": r["spec"]["auto_giveback"],
              "giveback_after": r["spec"]["giveback_after"], "reason": r["reason"], **lag(r)} for r in rows]
    return {"services": pairs, "nodes": nodes}


def wait_moved(backend, moved: list[dict], timeout: float) -> list[dict]:
    """Until each moved service reports healthy on its new holder (or the timeout); adds the downtime."""
    deadline = time.monotonic() + timeout
    pending = {m["name"]: m for m in moved}
    out = []
    while pending and time.monotonic() < deadline:
        for name, m in list(pending.items()):
            row = backend.read("service.get", {"name": name}, level="leader")
            if row is None or row["epoch"] != m["epoch"]:
                out.append({**m, "result": "superseded" if row else "removed",
                            "reason": row["reason"] if row else ""})
                pending.pop(name)
            elif row["ready_at"] is not None:
                out.append({**m, "result": "running", "downtime_s": row["last_downtime"]})
                pending.pop(name)
        if pending:
            time.sleep(0.2)
    out += [{**m, "result": "not healthy yet", "downtime_s": None} for m in pending.values()]
    return out


def takeover(backend, node: str, wait: float = 0.0, key: str | None = None) -> dict:
    """Planned takeover: every service `node` holds moves to its first ready partner (final sync, stop at
    home, start on the partner)."""
    result = backend.write("service.takeover", {"node": node}, idempotency_key=_key(key))
    if wait and result["moved"]:
        result["moved"] = wait_moved(backend, result["moved"], wait)
    return result


def giveback(backend, node: str, wait: float = 0.0, key: str | None = None) -> dict:
    """Give every service whose home is `node` back to it (sync back first); refusals say why."""
    result = backend.write("service.giveback", {"node": node}, idempotency_key=_key(key))
    if wait and result["moved"]:
        result["moved"] = wait_moved(backend, result["moved"], wait)
    return result


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True)

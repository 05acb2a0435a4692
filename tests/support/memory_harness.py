"""A one-server cluster in the test process: a real StateStore behind the ClusterAPI the plugins use.

The store applies stamped envelopes exactly as a Raft replica does (only the log is missing), so the memory
domain, its authorizers and the plugin's tools run for real; the multi-process tests cover replication.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

from cortex.config import PluginSettings
from cortex.core.commands import Envelope, validate
from cortex.core.events import Event, EventBus
from cortex.core.state import StateStore
from cortex.plugins import Caller, PluginHost, discover

OPERATOR = Caller(role="operator", identity="test")
READER = Caller(role="reader", identity="test")


class ApplyError(Exception):
    pass


class StoreCluster:
    """plugins.ClusterAPI over one StateStore: writes are validated, stamped and applied like the leader's."""

    node_id = "n1"
    role = "server"

    def __init__(self, store: StateStore):
        self.store = store
        self.writes = 0  # the plugins' writes; the host's audit records (access.record) are not counted
        self._lock = threading.Lock()  # one log: writes from several threads are applied one after another

    def write(self, command_type: str, args: dict, idempotency_key: str = "") -> dict:
        args = validate(command_type, json.loads(json.dumps(args)))
        command_id = uuid.uuid4().hex
        env = Envelope(type=command_type, args=args, id=command_id, ts=time.time(), term=1,
                       idem=idempotency_key or command_id)
        with self._lock:
            result = self.store.apply(self.store.last_applied + 1, env.encode())
        self.writes += command_type != "access.record"
        if "error" in result:
            raise ApplyError(result["error"])
        return {k: v for k, v in result.items() if k != "duplicate"}

    propose = write

    def read(self, query: str, args: dict | None = None, level: str = "leader", min_index: int = 0):
        assert self.store.last_applied >= min_index
        return json.loads(json.dumps(self.store.query(query, args or {})))

    def is_leader(self) -> bool:
        return True

    def snapshot(self, path: Path) -> int:
        return self.store.backup_to(path)

    def status(self) -> dict:
        return {"cluster_id": "c-test", "node_id": self.node_id}


def start_host(tmp_path: Path, options: dict | None = None, name: str = "node") -> tuple[PluginHost, StoreCluster]:
    bus = EventBus()
    store = StateStore(tmp_path / name / "state.db",
                       listener=lambda kind, data, index: bus.publish(Event(kind, data, index=index)))
    cluster = StoreCluster(store)
    # only the memory plugin: the other built-ins would share this cluster and its write counter
    settings = {name: PluginSettings(enabled=False) for name in discover() if name != "memory"}
    settings["memory"] = PluginSettings(options={"whereami_debounce": 0.05, **(options or {})})
    host = PluginHost(settings, cluster, bus, tmp_path / name, source="test")
    host.load()
    host.start()
    assert host.plugins["memory"].state == "running", host.status()
    return host, cluster

"""Which nodes run a service's processes, read from /proc: an observer for tests and benchmarks of fencing.

Every service process carries CORTEX_SERVICE and CORTEX_NODE in its environment (services/supervisor.py);
sampling them every 50 ms shows whether two nodes ever ran the same service at once.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path


class Observer:
    """Which nodes run a service's processes, sampled from /proc every 50 ms."""

    def __init__(self, name: str, root: Path | None = None):
        """`root`: only processes of agents whose data is under it (CORTEX_VOLUME), so that another cluster
        on the same machine running a service of the same name is not counted."""
        self.marker = f"CORTEX_SERVICE={name}".encode()
        self.volume_prefix = b"CORTEX_VOLUME=" + str(Path(root).resolve()).encode() + b"/" if root else b""
        self.samples: list[tuple[float, frozenset[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def nodes_now(self) -> frozenset[str]:
        found = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if self.marker in env and (not self.volume_prefix or
                                       any(e.startswith(self.volume_prefix) for e in env)):
                found.update(e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"CORTEX_NODE="))
        return frozenset(found)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append((time.monotonic(), self.nodes_now()))

    def __enter__(self) -> Observer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def double_runs(self) -> list:
        return [(t, nodes) for t, nodes in self.samples if len(nodes) > 1]

"""The agent's internal event bus: typed events, local publish/subscribe.

Events that come from replicated state (node.joined, node.left, node.suspect, node.offline, node.alive)
are published on every node as it applies the log, so each node sees them in the same order; the
plugin layer will expose subscriptions to plugins. Subscribers must be quick: they run on the publisher's
thread; a failing subscriber is logged and does not stop the others.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("cortex.events")


@dataclass(frozen=True)
class Event:
    type: str  # e.g. "node.offline", "leader.changed"
    data: dict = field(default_factory=dict)
    ts: float = field(default_factory=time.time)
    index: int = 0  # log index for events from replicated state, 0 for local ones


class EventBus:
    def __init__(self, history: int = 256):
        self._subscribers: list[tuple[str, Callable[[Event], None]]] = []
        self._lock = threading.Lock()
        self._recent: list[Event] = []
        self._history = history

    def subscribe(self, pattern: str, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call `callback` for events whose type matches the glob `pattern` ("node.*"); returns unsubscribe."""
        entry = (pattern, callback)
        with self._lock:
            self._subscribers.append(entry)
        return lambda: self._remove(entry)

    def _remove(self, entry) -> None:
        with self._lock:
            if entry in self._subscribers:
                self._subscribers.remove(entry)

    def publish(self, event: Event) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
            self._recent.append(event)
            del self._recent[: -self._history]
        for pattern, callback in subscribers:
            if fnmatch.fnmatchcase(event.type, pattern):
                try:
                    callback(event)
                except Exception:
                    log.exception("event subscriber failed", extra={"fields": {"event": event.type}})

    def recent(self, pattern: str = "*") -> list[Event]:
        with self._lock:
            return [e for e in self._recent if fnmatch.fnmatchcase(e.type, pattern)]

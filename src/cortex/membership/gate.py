"""How many new join requests without a token one source may send: a token bucket per caller address.

Anyone who reaches a server's enrollment port may ask to join without a token, and each new request costs
a replicated write and a line in the operator's approval list. The node that receives a request counts it
here, before anything is forwarded or written, so a flood is refused where it arrives and costs nothing
else. The buckets live in memory only: a restart refills them, which a flood gains little from.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

MAX_SOURCES = 4096  # buckets kept; the least recently used full ones go first


def source_host(peer: str) -> str:
    """The caller's address without its port, from gRPC's peer string ("ipv4:10.0.0.5:53124",
    "ipv6:[::1]:53124", "unix:..."): one host is one source, however many connections it opens."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rpartition(":")[0].strip("[]") or rest
    return peer


class SourceLimit:
    """`take(source)` spends one request of `source`'s allowance: 0.0 when there was one, else the seconds
    until there is. The allowance is `burst` at most and refills by `per_minute`."""

    def __init__(self, burst: int, per_minute: float, clock: Callable[[], float] = time.monotonic):
        self.burst = float(burst)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # source -> (tokens, at)

    def take(self, source: str) -> float:
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.pop(source, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[source] = (tokens, now)
            while len(self._buckets) > MAX_SOURCES:
                self._buckets.popitem(last=False)
            return wait

"""The leader's knowledge of the state-machine level every server runs, and the gate it puts on proposals.

During a rolling update servers of two versions replicate one log. A command type the older one does not know
would be applied by some replicas and recorded as an error by others (core/domain.py, levels), so the leader
proposes a command only when every server in the nodes table is known to run at least the command's level.
Servers say their level in Status; the leader asks each one it has not heard from lately (upkeep calls `step`
every round). A server the leader cannot ask counts as not there yet: its level is unknown, and gated commands
wait. Commands of level 0 (everything from before levels) are never gated.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex.core import domain
from cortex.node.logs import fields

log = logging.getLogger("cortex.agent")

RECHECK_EVERY = 30.0  # seconds before a server whose level is known is asked again (it may have been updated)
RETRY_EVERY = 2.0  # seconds between asks of a server whose level is not known yet


class LevelBook:
    """Pure bookkeeping, fed by `observe`: which server was last seen at which level, and when."""

    def __init__(self, own_id: str, own_level: int):
        self.own_id, self.own_level = own_id, own_level
        self._seen: dict[str, tuple[int, float]] = {}  # node id -> (level, when seen)
        self._asked: dict[str, float] = {}  # node id -> when last asked (answered or not)

    def observe(self, node_id: str, level: int, now: float) -> None:
        self._seen[node_id] = (level, now)

    def asked(self, node_id: str, now: float) -> None:
        self._asked[node_id] = now

    def due(self, node_id: str, now: float) -> bool:
        """Whether `node_id` should be asked for its level now."""
        seen = self._seen.get(node_id)
        wait = RECHECK_EVERY if seen is not None else RETRY_EVERY
        return now - self._asked.get(node_id, -wait) >= wait

    def level(self, node_id: str) -> int | None:
        if node_id == self.own_id:
            return self.own_level
        seen = self._seen.get(node_id)
        return seen[0] if seen is not None else None

    def retain(self, node_ids: Iterable[str]) -> None:
        keep = set(node_ids)
        for book in (self._seen, self._asked):
            for gone in set(book) - keep:
                del book[gone]

    def behind(self, servers: Iterable[str], needed: int) -> list[tuple[str, int | None]]:
        """The servers not known to run at least level `needed`, with the level each was seen at (None: not
        heard from)."""
        out = []
        for node_id in sorted(servers):
            level = self.level(node_id)
            if level is None or level < needed:
                out.append((node_id, level))
        return out

    def cluster_level(self, servers: Iterable[str]) -> int:
        """The level every server is known to run (what a joining server must at least run)."""
        levels = [self.level(s) for s in servers]
        return min((lv if lv is not None else 0 for lv in levels), default=self.own_level)


def refusal(command_type: str, behind: list[tuple[str, int | None]], needed: int) -> str:
    """The error a proposal of `command_type` gets while `behind` is not empty."""
    who = ", ".join(f"{n} (level {lv})" if lv is not None else f"{n} (level not known yet)" for n, lv in behind)
    return (f"{command_type} needs every server at state-machine level {needed}, and not all are: {who}. "
            "Servers of different Cortex versions are replicating (a rolling update under way?): finish it "
            "(`cortex update status`), or bring the servers not heard from back, then retry")


class ServerLevels:
    """`ask(grpc_address)` is the network edge: the Status of another server."""

    def __init__(self, own_id: str, servers: Callable[[], list[dict]], ask: Callable[[str], pb.StatusResponse],
                 is_leader: Callable[[], bool], clock: Callable[[], float] = time.monotonic):
        self.book = LevelBook(own_id, domain.level())
        self._servers = servers  # the nodes table's servers: [{"id", "grpc_address", ...}]
        self._ask = ask
        self._is_leader = is_leader
        self._clock = clock
        self._lock = threading.Lock()

    def step(self) -> None:
        """Leader only: ask the servers that are due for their level (the upkeep loop calls it each round)."""
        if not self._is_leader():
            return
        servers = [s for s in self._servers() if s["id"] != self.book.own_id]
        with self._lock:
            self.book.retain(s["id"] for s in servers)
            due = [s for s in servers if self.book.due(s["id"], self._clock())]
        for server in due:
            with self._lock:
                self.book.asked(server["id"], self._clock())
            try:
                level = int(self._ask(server["grpc_address"]).state_machine_level)
            except Exception:  # noqa: BLE001 - down or busy: asked again after RETRY_EVERY
                continue
            with self._lock:
                before = self.book.level(server["id"])
                self.book.observe(server["id"], level, self._clock())
            if before != level:
                log.info("server state-machine level", extra=fields(server=server["id"], level=level,
                                                                     own_level=self.book.own_level))

    def gate(self, command_type: str) -> str:
        """Why the leader may not propose `command_type` now ('' when it may)."""
        needed = domain.level_of(command_type)
        if needed == 0:
            return ""
        if needed > self.book.own_level:  # cannot happen for a command of this build; guards a bad table
            return f"{command_type} needs state-machine level {needed}; this node runs {self.book.own_level}"
        with self._lock:
            behind = self.book.behind((s["id"] for s in self._servers()), needed)
        return refusal(command_type, behind, needed) if behind else ""

    def cluster_level(self) -> int:
        with self._lock:
            return self.book.cluster_level(s["id"] for s in self._servers())

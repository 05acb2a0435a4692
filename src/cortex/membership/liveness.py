"""Node liveness: one state per node, decided by the leader from heartbeats, replicated as transitions.

Pure and clock-free: the caller feeds it "heard from X at t" and asks for transitions at a time `now`.
The leader replicates each transition as a `node.liveness` command, so every node reports the same state
and a new leader starts from the replicated view instead of from nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

ALIVE, SUSPECT, OFFLINE = "alive", "suspect", "offline"


@dataclass(frozen=True)
class Transition:
    node_id: str
    old: str
    new: str


class LivenessTracker:
    def __init__(self, suspect_after: float, offline_after: float):
        if not 0 < suspect_after < offline_after:
            raise ValueError("need 0 < suspect_after < offline_after")
        self.suspect_after = suspect_after
        self.offline_after = offline_after
        self._last_heard: dict[str, float] = {}
        self._state: dict[str, str] = {}

    def start(self, states: dict[str, str], now: float) -> None:
        """Begin (e.g. on winning an election) from the replicated states, giving every node a full grace
        period: a new leader has not heard anyone yet, which is no evidence that they are gone."""
        self._state = dict(states)
        self._last_heard = {node: now for node in states}

    def heard(self, node_id: str, now: float) -> None:
        if node_id in self._state:
            self._last_heard[node_id] = max(now, self._last_heard.get(node_id, now))

    def forget(self, node_id: str) -> None:
        self._state.pop(node_id, None)
        self._last_heard.pop(node_id, None)

    def state(self, node_id: str) -> str | None:
        return self._state.get(node_id)

    def last_heard(self, node_id: str) -> float | None:
        return self._last_heard.get(node_id)

    def evaluate(self, now: float) -> list[Transition]:
        """The state changes due at `now` (the caller replicates them, then calls `apply`)."""
        out = []
        for node, old in sorted(self._state.items()):
            silent = now - self._last_heard.get(node, now)
            new = OFFLINE if silent >= self.offline_after else SUSPECT if silent >= self.suspect_after else ALIVE
            if new != old:
                out.append(Transition(node, old, new))
        return out

    def apply(self, transition: Transition) -> None:
        if transition.node_id in self._state:
            self._state[transition.node_id] = transition.new

    def track(self, node_id: str, state: str, now: float) -> None:
        """A node that joined while we lead."""
        self._state.setdefault(node_id, state)
        self._last_heard.setdefault(node_id, now)

"""Replica convergence: whether each server's log is catching up with the leader's, decided by the leader.

A replica whose log stays behind while the leader keeps committing still answers gRPC and keeps its Raft
connection, so liveness calls it alive; the cluster then runs on one replica fewer than `cortex status`
suggests. This tracker notices it from the one number the leader has for every server, its match index.

Pure and clock-free, like membership/liveness.py: the caller feeds it "at time t, server S matched M while the
commit index was C" and asks which servers are stuck. A server is stuck when its lag (C - M) has not shrunk
below its lowest value for `window` seconds while the commit index moved on. A server that reaches the commit
index the leader had when its lag last shrank has covered that gap and counts as progressing too, so a busy
but healthy follower whose lag hovers at a few entries never becomes stuck; once stuck, only a shrinking lag
clears it. The state is the leader's own view,
held in memory and never replicated: a new leader starts from nothing and judges afresh.
"""

from __future__ import annotations

from dataclasses import dataclass

PROGRESSING, STUCK = "progressing", "stuck"


@dataclass(frozen=True)
class _Track:
    since: float  # when the lag last shrank (or the server was first seen or caught up)
    lag: int  # the lag at `since`: the lowest it has been since then
    commit: int  # the leader's commit index at `since`


@dataclass(frozen=True)
class Transition:
    server: str
    old: str
    new: str
    lag: int


class ConvergenceTracker:
    def __init__(self, window: float):
        if not window > 0:
            raise ValueError("the convergence window must be > 0 seconds")
        self.window = window
        self._tracks: dict[str, _Track] = {}
        self._state: dict[str, str] = {}

    def reset(self) -> None:
        """Forget everything (leadership lost or a new term: match indexes start over then)."""
        self._tracks, self._state = {}, {}

    def observe(self, server: str, now: float, commit: int, match: int) -> Transition | None:
        """Record that `server` had matched `match` when the commit index was `commit`; the change of state
        this causes, if any."""
        lag = max(0, commit - match)
        track = self._tracks.get(server)
        old = self._state.get(server, PROGRESSING)
        # Covering the gap only keeps a server from becoming stuck; one already stuck must shrink its lag, or
        # a follower a constant minute behind would flip between the two states every minute.
        if track is None or lag == 0 or lag < track.lag or (old != STUCK and match >= track.commit):
            track = _Track(since=now, lag=lag, commit=commit)
            self._tracks[server] = track
        stuck = lag > 0 and commit > track.commit and now - track.since >= self.window
        new = STUCK if stuck else PROGRESSING
        self._state[server] = new
        return Transition(server, old, new, lag) if new != old else None

    def retain(self, servers: set[str]) -> None:
        """Drop the servers no longer in the configuration."""
        for server in set(self._tracks) - servers:
            self._tracks.pop(server, None)
            self._state.pop(server, None)

    def state(self, server: str) -> str | None:
        """PROGRESSING, STUCK, or None for a server never observed."""
        return self._state.get(server)

    def stuck_for(self, server: str, now: float) -> float:
        """Seconds since a stuck server last made progress; 0 when it is not stuck."""
        track = self._tracks.get(server)
        if track is None or self._state.get(server) != STUCK:
            return 0.0
        return max(0.0, now - track.since)

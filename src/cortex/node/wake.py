"""Waking from sleep: a laptop's connections may point at sockets that died while it slept, and the first
heartbeats after a wake often find the network not back yet (the NIC is re-initialised, the link
renegotiated). A wake is reported by the clock watch (the clocks jumped apart), the image's sleep hook
(SIGUSR1) or logind (PrepareForSleep(false)); the background loop handles it on its next round.
"""

from __future__ import annotations

import logging
import threading
import time

from cortex.appliance import sleepwatch
from cortex.node.logs import fields
from cortex.node.member import Member

log = logging.getLogger("cortex.agent")

# After a wake, retry the heartbeat this often, instead of once a round, until a server answers or
# RESUME_RETRY_FOR has passed. A wake noticed twice (the clock jump, then the sleep hook or logind) within
# RESUME_SAME_WAKE is one wake: its fresh connections are not thrown away again.
RESUME_RETRY = 0.1
RESUME_RETRY_FOR = 30.0
RESUME_SAME_WAKE = 10.0


def round_wait(interval: float, resumed_at: float | None, now: float) -> float:
    """How long the background loop waits for its next round: RESUME_RETRY while a wake's first heartbeat
    is unanswered (for at most RESUME_RETRY_FOR), else the regular interval."""
    if resumed_at is not None and now - resumed_at <= RESUME_RETRY_FOR:
        return min(interval, RESUME_RETRY)
    return interval


class Wake:
    def __init__(self, member: Member):
        self.member = member
        self.now = threading.Event()  # run a background round now
        self._lock = threading.Lock()
        # who reported the wake the background loop has yet to handle, and how long it slept where known
        # (the clock watch measures it); one pair, so that a report is never half taken
        self._reported: tuple[str, float] | None = None
        self.resumed_at: float | None = None  # a wake whose first heartbeat has not been answered yet
        self._last_wake = -RESUME_SAME_WAKE  # when the last wake was handled (monotonic)

    def resume(self, trigger: str = "SIGUSR1", slept: float = 0.0) -> None:
        """The machine woke up: rejoin at once."""
        with self._lock:
            before = self._reported[1] if self._reported else 0.0
            self._reported = (trigger, max(before, slept))
        self.now.set()

    def on_sleep_change(self, going_to_sleep: bool) -> None:
        if going_to_sleep:
            log.info("logind: suspending")
        else:
            self.resume("logind")

    def next_round_in(self, interval: float) -> float:
        return round_wait(interval, self.resumed_at, time.monotonic())

    def handle(self) -> None:
        """A reported wake (if any): fresh connections, and quick heartbeats until a server answers."""
        with self._lock:
            reported, self._reported = self._reported, None
        if reported is None:
            return
        trigger, slept = reported
        now = time.monotonic()
        if slept <= sleepwatch.SLEPT_THRESHOLD and now - self._last_wake < RESUME_SAME_WAKE:
            # the second notice of a wake already handled (the clock jump came first): keep its connections
            log.info("resumed: already rejoining", extra=fields(trigger=trigger))
            return
        log.info("resumed: rejoining", extra=fields(slept_seconds=round(slept, 1), trigger=trigger))
        self._last_wake = now
        if self.member.sends_heartbeats():  # servers are heard through Raft instead
            self.resumed_at = now
        self.member.peers.reset()  # fresh connections: the old ones may point at sockets that died while asleep

    def servers_answered(self) -> None:
        if self.resumed_at is not None:
            log.info("resumed: the servers answered", extra=fields(
                after_ms=round((time.monotonic() - self.resumed_at) * 1000), server=self.member.server_addresses[0]))
            self.resumed_at = None

    def servers_unreachable(self) -> None:
        if self.resumed_at is not None and time.monotonic() - self.resumed_at > RESUME_RETRY_FOR:
            self.resumed_at = None  # the servers stay out of reach: back to one heartbeat a round

"""Group commit: concurrent proposals joined into one Raft log entry."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Protocol

from cortex.core.commands import encode_batch
from cortex.raft.errors import ProposalError


class Proposer(Protocol):
    """What group commit needs of Raft (RaftNode): one replicated entry, its result and log index."""

    def propose(self, data: bytes, timeout: float) -> tuple[dict, int]: ...


log = logging.getLogger("cortex.consensus")

FORWARD_TIMEOUT = 8.0


class GroupCommitter:
    """Coalesces concurrent proposals into one log entry: group commit.

    pysyncobj sends an AppendEntries round per log entry once batching is off, and the leader's CPU is the
    limit (GIL, pickling, encryption per message). Proposals that arrive while earlier ones are in flight
    are therefore joined into one batch entry, applied in one SQLite transaction. A lone proposal goes out
    as it is, so sequential latency is unchanged; under concurrency throughput grows with the batch size.

    The calling threads propose themselves: at most `in_flight` of them at a time, each taking what is
    queued. A dedicated committer thread cost two thread wake-ups per write (there and back), each a wait
    for the GIL on a busy server. A caller whose own proposals are answered hands the role to the caller
    of the oldest queued proposal, so no caller answers for others' proposals beyond its own round.
    """

    def __init__(self, raft: Proposer, max_batch: int = 256, in_flight: int = 2):
        self.raft = raft
        self.max_batch = max_batch
        self.in_flight = in_flight
        self._lock = threading.Lock()
        self._pending: deque[_Slot] = deque()
        self._leading = 0  # callers proposing now (or handed the role and about to)
        self._closed = False
        self.rounds = 0  # entries proposed: fewer than proposals when they were joined

    def submit(self, envelopes: list[bytes], timeout: float) -> list[dict | ProposalError]:
        """Replicate each envelope (possibly batched with others); one outcome per envelope, in order."""
        caller = _Caller(len(envelopes))
        slots = [_Slot(data, caller) for data in envelopes]
        with self._lock:
            if self._closed:
                return [ProposalError("this node is shutting down; retry on another server", maybe_applied=False)
                        for _ in slots]
            self._pending.extend(slots)
            if self._leading < self.in_flight:
                self._leading += 1
                caller.lead = True
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                lead, caller.lead = caller.lead, False
                if not lead and caller.left == 0:
                    break
                caller.wake.clear()
            if lead:
                self._lead(caller, deadline)
                continue
            if not caller.wake.wait(max(0.0, deadline - time.monotonic())):
                self._give_up(caller, timeout)
                break
        return [slot.outcome for slot in slots]

    def propose(self, envelope: bytes, timeout: float) -> tuple[dict, int]:
        outcome = self.submit([envelope], timeout)[0]
        if isinstance(outcome, ProposalError):
            raise outcome
        return outcome

    def close(self) -> None:
        """Queued proposals fail (never proposed, so safe to retry); those in flight finish."""
        with self._lock:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
            for slot in pending:
                self._finish(slot, ProposalError("this node is shutting down; retry on another server",
                                                 maybe_applied=False))

    def _lead(self, caller: _Caller, deadline: float) -> None:
        """Propose rounds of queued envelopes until the caller's own are answered (or its time is up), then
        pass the role on."""
        while True:
            with self._lock:
                if caller.left == 0 or not self._pending or time.monotonic() >= deadline:
                    self._pass_on()
                    return
                batch = [self._pending.popleft() for _ in range(min(len(self._pending), self.max_batch))]
            self._commit(batch)

    def _give_up(self, caller: _Caller, timeout: float) -> None:
        """The caller's time is up: what is still queued is withdrawn (never proposed); what is in flight may
        still be applied. A role handed over meanwhile goes on to the next caller."""
        with self._lock:
            mine = [s for s in self._pending if s.caller is caller]
            if mine:
                self._pending = deque(s for s in self._pending if s.caller is not caller)
            for slot in mine:
                self._finish(slot, ProposalError(f"not proposed within {timeout:.1f}s (the leader is overloaded); "
                                                 "retry", maybe_applied=False))
            for slot in caller.slots_in_flight():
                slot.outcome = ProposalError(f"not committed within {timeout:.1f}s (no quorum?)",
                                             maybe_applied=True)
            if caller.lead:
                caller.lead = False
                self._pass_on()

    def _pass_on(self) -> None:
        """Under the lock: a caller gives up its role, to the oldest queued caller not already handed one.
        (None left: the role ends; the callers already handed one propose what is queued.)"""
        for slot in self._pending:
            if not slot.caller.lead:
                slot.caller.lead = True
                slot.caller.wake.set()
                return
        self._leading -= 1

    def _commit(self, batch: list[_Slot]) -> None:
        data = batch[0].data if len(batch) == 1 else encode_batch([s.data for s in batch])
        outcomes: list = []
        try:
            result, index = self.raft.propose(data, timeout=FORWARD_TIMEOUT)
            results = result if isinstance(result, list) else [result]
            if len(results) != len(batch):
                raise ProposalError(f"entry {index} was already applied before this proposal; retry",
                                    maybe_applied=True)
            outcomes = [(item, index) for item in results]
        except ProposalError as exc:
            outcomes = [exc] * len(batch)
        except Exception as exc:  # never leave a caller hanging
            log.exception("group commit failed")
            outcomes = [ProposalError(f"internal error: {exc}", maybe_applied=True)] * len(batch)
        with self._lock:
            self.rounds += 1
            for slot, outcome in zip(batch, outcomes):
                self._finish(slot, outcome)

    @staticmethod
    def _finish(slot: _Slot, outcome) -> None:
        """Under the lock: the slot's outcome; its caller wakes once all of its slots have one."""
        if slot.answered:
            return
        slot.outcome, slot.answered = outcome, True
        caller = slot.caller
        caller.left -= 1
        if caller.left == 0:
            caller.wake.set()


class _Caller:
    """One submit: how many of its envelopes wait for an outcome, and whether it is to propose next."""

    __slots__ = ("left", "lead", "wake", "slots")

    def __init__(self, count: int):
        self.left = count
        self.lead = False
        self.wake = threading.Event()
        self.slots: list[_Slot] = []

    def slots_in_flight(self) -> list[_Slot]:
        return [s for s in self.slots if not s.answered]


class _Slot:
    __slots__ = ("data", "caller", "outcome", "answered")

    def __init__(self, data: bytes, caller: _Caller):
        self.data = data
        self.caller = caller
        self.outcome = None
        self.answered = False
        caller.slots.append(self)

"""Group commit: concurrent proposals joined into one Raft log entry."""

from __future__ import annotations

import logging
import queue
import threading
import time
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
    """

    def __init__(self, raft: Proposer, max_batch: int = 256, in_flight: int = 2):
        self.raft = raft
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"group-commit-{i}", daemon=True)
                         for i in range(in_flight)]
        self._closed = False
        for t in self._threads:
            t.start()

    def submit(self, envelopes: list[bytes], timeout: float) -> list[dict | ProposalError]:
        """Replicate each envelope (possibly batched with others); one outcome per envelope, in order."""
        slots = [_Slot(data) for data in envelopes]
        for slot in slots:
            self._queue.put(slot)
        deadline = time.monotonic() + timeout
        out = []
        for slot in slots:
            if not slot.done.wait(max(0.0, deadline - time.monotonic())):
                slot.outcome = ProposalError(f"not committed within {timeout:.1f}s (no quorum?)",
                                             maybe_applied=True)
            out.append(slot.outcome)
        return out

    def propose(self, envelope: bytes, timeout: float) -> tuple[dict, int]:
        outcome = self.submit([envelope], timeout)[0]
        if isinstance(outcome, ProposalError):
            raise outcome
        return outcome

    def close(self) -> None:
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None or self._closed:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    slot = self._queue.get_nowait()
                except queue.Empty:
                    break
                if slot is None:
                    self._queue.put(None)  # leave the stop marker for this thread's next turn
                    break
                batch.append(slot)
            self._commit(batch)

    def _commit(self, batch: list[_Slot]) -> None:
        data = batch[0].data if len(batch) == 1 else encode_batch([s.data for s in batch])
        try:
            result, index = self.raft.propose(data, timeout=FORWARD_TIMEOUT)
            results = result if isinstance(result, list) else [result]
            if len(results) != len(batch):
                raise ProposalError(f"entry {index} was already applied before this proposal; retry",
                                    maybe_applied=True)
            for slot, item in zip(batch, results):
                slot.outcome = (item, index)
        except ProposalError as exc:
            for slot in batch:
                slot.outcome = exc
        except Exception as exc:  # never leave a caller hanging
            log.exception("group commit failed")
            for slot in batch:
                slot.outcome = ProposalError(f"internal error: {exc}", maybe_applied=True)
        for slot in batch:
            slot.done.set()


class _Slot:
    __slots__ = ("data", "done", "outcome")

    def __init__(self, data: bytes):
        self.data = data
        self.done = threading.Event()
        self.outcome = None

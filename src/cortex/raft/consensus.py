"""Raft, via pysyncobj, kept behind one small class so the rest of Cortex never touches pysyncobj directly.

What this layer adds to pysyncobj (see shared/research/anchors-cluster-core.md §4a):
- one replicated method, `_apply(bytes)`, so the command schema is versioned by Cortex and not by Python
  method names;
- the log index handed to the state machine, which stores it in the same transaction as the change;
- snapshots that are SQLite backups (no fork, no pickled object state);
- batching off, so a confirmed write does not wait for a 100 ms tick;
- its own transport (raft/transport.py): mutual TLS with the node certificates and typed, bounded frames,
  or pysyncobj's password transport (bounded too) for a rolling update from earlier versions;
- a restricted unpickler for what pysyncobj still unpickles (log entries at apply, the password transport);
- group commit (`GroupCommitter`, raft/commit.py), since pysyncobj with batching off sends one round per
  entry;
- the entry's Raft term handed to apply, so a command stamped in another term is fenced off;
- durability Raft assumes and pysyncobj leaves out: log entries and term/vote on the disk before they are
  acknowledged (`AppendJournal`, raft/journal.py: pwrite and group-committed fdatasync, no mmap), and the
  cluster configuration kept in its own file
  (`raft-members.json`), so a power loss can neither tear the log nor leave a server believing it is alone
  (split brain: found by the VM failover test).
- a node whose disk refuses journal writes (full, failing) stays up: a leader steps down, the node does not
  stand for election, writes through it fail with the journal's error, and it rejoins by itself once the
  disk takes writes again (`_journal_refused`);
- a follower that keeps the entries it already has (`reconcile_append`, raft/append.py): pysyncobj truncates
  everything after a message's prevLogIdx, so a late or repeated AppendEntries made it delete (and write
  again) entries it had applied, and under load such rewinds fed each other until a follower's log was
  minutes behind its state.
- a follower that rejects an AppendEntries names the entry after its commit index (`rejection_next_index`,
  raft/append.py): pysyncobj's answers, read by a pipelining leader, could leave a deposed leader's tail of
  its old term in place for ever (the leader streaming the same batches, the replica never converging);
- a snapshot chunk that commits none of the follower's own entries (`snapshot_chunk`, raft/append.py), so
  a deposed leader's entries are never applied while a snapshot replaces them.
- linearizable reads without a log entry (`ReadIndex`, raft/readindex.py): the leader confirms it still leads
  with one numbered round of pings acknowledged by a majority, and answers its commit index;
- pre-vote (`PreVote`, raft/prevote.py): a server that cannot reach a majority never raises its term, so its
  return deposes no leader; with leaderFallbackTimeout below the election timeout, a leader cut off from the
  majority steps down before the others elect (check-quorum).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import pickle
import queue
import sqlite3
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pysyncobj.pickle as syncobj_pickle
import pysyncobj.syncobj as syncobj_module
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.node import TCPNode

from cortex.config import RaftConfig
from cortex.core import durable
from cortex.core.state import StateStore
from cortex.raft.append import reconcile_append, rejection_next_index, snapshot_chunk
from cortex.raft.commit import GroupCommitter
from cortex.raft.errors import NotLeader, ProposalError, fail_name
from cortex.raft.journal import AppendJournal, JournalWriteError, repair_journal
from cortex.raft.prevote import PreVote
from cortex.raft.readindex import ReadIndex, ReadUnconfirmed
from cortex.raft.transport import CortexTransport, Settings

# The agent imports these from here, the adapter's one public face.
__all__ = ["GroupCommitter", "NotLeader", "ProposalError", "RaftNode", "ReadUnconfirmed", "RaftStatus", "load_members", "wait_until"]

log = logging.getLogger("cortex.consensus")

_SNAPSHOT_MAGIC = b"CXSNAP1\n"
COMMIT_NOTICE_DELAY = 0.02  # s: at most this (plus a tick) before followers learn a commit no entry carried


# --- a restricted unpickler for the Raft port -----------------------------------------------------------
# pysyncobj's log entries are pickles (unpickled when applied, and when a large entry arrives in pieces), as
# are the password transport's frames. Only plain data and pysyncobj's node classes may be built, never
# arbitrary callables: defence in depth behind mutual TLS (or the Fernet password).
_ALLOWED_GLOBALS = {
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray"), ("builtins", "complex"),
    ("builtins", "bytes"), ("builtins", "str"), ("builtins", "int"), ("builtins", "float"),
    ("builtins", "tuple"), ("builtins", "list"), ("builtins", "dict"), ("builtins", "bool"),
    ("collections", "OrderedDict"), ("collections", "deque"),
    ("pysyncobj.node", "TCPNode"), ("pysyncobj.node", "Node"),
    ("_codecs", "encode"),  # protocol 2 pickles of bytes use it
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        # Protocol-2 pickles name Python 2 modules; the base class maps them, so check the mapped name.
        if (module, name) in _ALLOWED_GLOBALS or (
                module in ("__builtin__", "copy_reg", "_codecs") and ("builtins", name) in _ALLOWED_GLOBALS):
            return super().find_class(module, name)
        log.warning("refused a Raft frame", extra={"fields": {"global": f"{module}.{name}"}})
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a Raft peer")


def _safe_loads(data):
    return _SafeUnpickler(io.BytesIO(syncobj_pickle.to_bytes(data))).load()


syncobj_pickle.loads = _safe_loads


@dataclass(frozen=True)
class RaftStatus:
    state: str  # leader | follower | candidate
    term: int
    leader: str  # raft address of the leader, "" when unknown
    commit_index: int
    applied_index: int
    has_quorum: bool
    match_index: dict[str, int]  # leader only: raft address -> match index
    connected: dict[str, bool]  # raft address -> connected


_STATES = {0: "follower", 1: "candidate", 2: "leader"}


_fernet_from_password = syncobj_module.getEncryptor


def _encryptor(password):
    """The agent passes a ready encryptor (raft_keys.RotatingEncryptor) whose key rotates in place."""
    return password if hasattr(password, "encrypt_at_time") else _fernet_from_password(password)


syncobj_module.getEncryptor = _encryptor


MEMBERS_FILE = "raft-members.json"


def load_members(data_dir: Path) -> list[str] | None:
    """The Raft configuration this server last knew (None: never recorded)."""
    try:
        return list(json.loads((data_dir / MEMBERS_FILE).read_text())["members"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("unreadable raft membership file; using the state store's", extra={"fields": {"error": str(exc)}})
        return None


class RaftNode(ReadIndex, PreVote):
    """A voting member. The state machine is a StateStore; every entry is an encoded command envelope."""

    def __init__(self, store: StateStore, self_address: str, peers: list[str], raft: RaftConfig, secret: str,
                 data_dir: Path, on_state_change: Callable[[], None] | None = None, name: str = "",
                 transport: Settings | None = None):
        self.store = store
        self._snapshot_tmp = data_dir / "snapshot.tmp.db"
        self._on_state_change = on_state_change
        self._data_dir = data_dir
        self._members_saved: list[str] | None = None
        self._change_in_hand: tuple | None = None  # see _checkCommandsToApply
        # While leadership is handed over, this leader takes no proposals (monotonic time until which it
        # holds them back): its log must not grow past the target's, or the target loses the election.
        self._handing_over_until = 0.0
        self._handing_over_term = -1  # the hold ends with the term it was taken in (someone was elected)
        self._handover_hold = 2 * raft.election_timeout_max
        self._tick_calls: queue.SimpleQueue = queue.SimpleQueue()  # run on the tick thread (_run_tick_calls)
        repaired = repair_journal(data_dir / "raft.journal")
        if repaired:
            log.warning("raft journal repaired", extra={"fields": {"what": repaired}})
        # The configuration recorded by Raft itself wins over the caller's guess (the state store, which a
        # power loss may have rolled back to before the other servers joined).
        recorded = load_members(data_dir)
        if recorded:
            peers = recorded
        transport = transport or Settings("password", raft.max_frame_bytes, raft.max_inbound_connections)
        conf = SyncObjConf(
            # On mutual TLS the channel is authenticated and encrypted already: no Fernet layer on top.
            password=secret if transport.mode == "password" else None,
            appendEntriesUseBatch=False,
            dynamicMembershipChange=True,
            raftMinTimeout=raft.election_timeout_min,
            raftMaxTimeout=raft.election_timeout_max,
            appendEntriesPeriod=raft.heartbeat_interval,
            leaderFallbackTimeout=raft.leader_fallback_timeout,
            # Followers do not talk to each other between elections: a short timeout makes pysyncobj drop
            # those idle connections, and the first RequestVote after a leader dies is lost on a dead socket
            # (a split vote, a second election round). Dead peers are noticed by TCP and election timeouts.
            connectionTimeout=max(raft.connection_timeout, raft.election_timeout_max),
            connectionRetryTime=0.2,
            journalFile=str(data_dir / "raft.journal"),
            fullDumpFile=str(data_dir / "raft.snapshot"),
            serializer=self._write_snapshot,
            deserializer=self._read_snapshot,
            useFork=False,
            logCompactionMinEntries=raft.log_compaction_entries,
            logCompactionMinTime=raft.log_compaction_seconds,
            onStateChanged=lambda old, new: self._state_changed(old, new),
            # The tick thread sleeps in poll(); new proposals (pipe notifier) and peer messages wake it,
            # so the period only bounds timer resolution. 50 ms keeps an idle node near 0 % CPU.
            autoTickPeriod=0.05,
            bindAddress=self_address,  # pysyncobj binds every interface unless told
        )
        self._prevote_setup(raft.election_timeout_min)  # before SyncObj.__init__ starts the tick thread
        self._readindex_setup()
        super().__init__(self_address, [p for p in peers if p != self_address], conf,
                         transportClass=functools.partial(CortexTransport, settings=transport))
        # pysyncobj stops ticking when the thread that built it exits; Raft may be started from a join
        # request's thread, so tie the tick thread to the process's main thread instead.
        self._SyncObj__mainThread = threading.main_thread()
        if isinstance(self.journal, AppendJournal):
            self.journal.owner = name or self_address  # named in its errors
            self.addOnTickCallback(self.journal.sync)  # group commit: the tick's appends, one fdatasync
        self.addOnTickCallback(self._run_tick_calls)
        self._readindex_start()  # read rounds are started, timed out and answered on the tick thread
        self._save_members()

    # --- the configuration, kept on the disk whenever pysyncobj changes it --------------------------------
    # Raft applies a configuration change when it is appended (not committed), on the tick thread; these
    # two private hooks are every place pysyncobj changes it (an entry appended or rolled back, a snapshot).
    def _SyncObj__doChangeCluster(self, request, reverse=False):
        changed = SyncObj._SyncObj__doChangeCluster(self, request, reverse)
        self._save_members()
        return changed

    def _SyncObj__updateClusterConfiguration(self, new_nodes):
        SyncObj._SyncObj__updateClusterConfiguration(self, new_nodes)
        self._save_members()

    def _SyncObj__onMessageReceived(self, node, message):
        # Every Raft message from a peer passes here first (pysyncobj's transport callback, on the tick thread).
        try:
            self._on_message(node, message)
        except JournalWriteError:
            self._journal_refused()  # not acknowledged; the leader sends it again

    def _on_message(self, node, message) -> None:
        if isinstance(message, dict) and message.get("type") == "append_entries" \
                and message.get("term", -1) >= self.raftCurrentTerm and "serialized" in message:
            super()._SyncObj__onMessageReceived(node, snapshot_chunk(message, self._SyncObj__raftCommitIndex))
            if self._SyncObj__raftCommitIndex < self.raftLastApplied:  # a snapshot loaded: all of it committed
                self._SyncObj__raftCommitIndex = self.raftLastApplied
                self._SyncObj__raftLog.setRaftCommitIndex(self.raftLastApplied)
            return
        if isinstance(message, dict) and message.get("type") == "append_entries" \
                and message.get("term", -1) >= self.raftCurrentTerm:
            def term_at(index: int) -> int | None:  # pysyncobj's own lookup, as _apply uses it
                entries = self._SyncObj__getEntries(index, 1)
                return entries[0][2] if entries else None

            plan = reconcile_append(message, term_at, self._SyncObj__getCurrentLogIndex())
            self._hand_over(node, plan.message)
            if plan.ack_next_index is not None:
                self._SyncObj__sendNextNodeIdx(node, nextNodeIdx=plan.ack_next_index, success=True)
            return
        self._hand_over(node, message)

    def _hand_over(self, node, message) -> None:
        appends = getattr(self.journal, "appends", 0)
        try:
            super()._SyncObj__onMessageReceived(node, message)  # pre-vote's dispatch, then pysyncobj's
        except JournalWriteError:
            # pysyncobj applies an AppendEntries' membership changes after appending all its entries: an append
            # the disk refused part-way leaves entries whose changes were never applied, and the resend would
            # skip them (reconcile_append keeps what the log holds). Drop them (never acknowledged); the
            # resend brings them again. Entries are appended at the end, after any conflict deletes.
            added = self.journal.appends - appends
            if added:
                self.journal.deleteEntriesFrom(len(self.journal) - added)
            raise

    def _SyncObj__changeCluster(self, request):
        # The leader applies a membership change before it appends its entry (pysyncobj
        # _checkCommandsToApply); remembered so that an append the disk refuses can undo it.
        changed = SyncObj._SyncObj__changeCluster(self, request)
        self._change_in_hand = (request, getattr(self.journal, "appends", 0)) if changed else None
        return changed

    def _checkCommandsToApply(self):
        self._change_in_hand = None
        try:
            super()._checkCommandsToApply()
        except JournalWriteError:
            change, self._change_in_hand = self._change_in_hand, None
            if change is not None and change[1] == self.journal.appends:  # its entry is not in the log
                try:
                    self._SyncObj__doChangeCluster(change[0], reverse=True)
                except OSError:
                    pass  # raft-members.json on the same full disk: written again at the next change
            raise

    # --- a journal the disk refuses -------------------------------------------------------------------
    # An append that fails (AppendJournal raises JournalWriteError, logged once) leaves the log as it was.
    # A node that cannot persist must not lead nor stand for election (it would win on its up-to-date log and
    # fail again); it keeps answering (and voting, while its small term/vote file can still be written), and
    # rejoins once a retry on the journal's backoff succeeds.
    @property
    def journal(self):
        return self._SyncObj__raftLog

    def journal_failure(self) -> str:
        return getattr(self.journal, "failure", "")

    def _journal_refused(self) -> None:
        # pysyncobj moves its commit index before the journal syncs it (setRaftCommitIndex): after a failed
        # sync, back to the last one the journal vouched for, so nothing unsynced is applied or answered.
        durable_commit = max(self.journal.getRaftCommitIndex(), self.raftLastApplied)
        if self._SyncObj__raftCommitIndex > durable_commit:
            self._SyncObj__raftCommitIndex = durable_commit
        if self._SyncObj__raftState != 0:
            was = _STATES.get(self._SyncObj__raftState)
            log.warning("raft: stepping down, this node cannot persist its log",
                        extra={"fields": {"error": self.journal_failure(), "was": was}})
            self._SyncObj__setState(0)
            self._SyncObj__raftLeader = None
        self._SyncObj__raftElectionDeadline = time.monotonic() + self._SyncObj__generateRaftTimeout()

    def _onTick(self, timeToWait=0.0):
        journal = self.journal
        if getattr(journal, "failure", "") and not journal.probe():
            self._journal_refused()
        try:
            super()._onTick(timeToWait)
        except JournalWriteError:
            self._journal_refused()
            time.sleep(timeToWait)  # the tick ended before its poll: do not spin

    # --- the commit index rides on the next AppendEntries ----------------------------------------------
    def _SyncObj__applyLogEntries(self):
        # pysyncobj (batching off) answers "applied something" with an AppendEntries to every follower carrying
        # only the new commit index, and each follower answers it: two more messages each way per write on the
        # leader's one tick thread. The next entry's AppendEntries carries the index anyway; with none coming,
        # the next heartbeat, brought forward to COMMIT_NOTICE_DELAY. Only a follower's linearizable read waits
        # on it, and its read round (raft/readindex.py) sends the AppendEntries at once when it must.
        if self.journal_failure():  # a disk that refuses (journal or store): apply again once it takes writes
            return False
        try:
            applied = SyncObj._SyncObj__applyLogEntries(self)
        except JournalWriteError:  # the store refused: the rest of the tick still hears the leader
            self._journal_refused()
            return False
        if applied and self._SyncObj__raftState == 2:  # leader
            self._SyncObj__newAppendEntriesTime = min(self._SyncObj__newAppendEntriesTime,
                                                      time.monotonic() + COMMIT_NOTICE_DELAY)
        return False

    def _SyncObj__sendNextNodeIdx(self, node, reset=False, nextNodeIdx=None, success=False):
        # A follower's answer to AppendEntries. The entries it vouches for are on the disk first: pysyncobj
        # sends the answer before it moves the commit index (the other place the journal syncs), and the
        # transport writes it to the socket at once. (One override only: a second definition of this method
        # once replaced the syncing one, and followers acknowledged entries still in the page cache.)
        sync = getattr(self.journal, "sync", None)
        if sync is not None:
            sync()
        # A rejection (reset, not success) names at most the entry after this server's commit index; the
        # other answers (acknowledgements, a chunked transmission's progress) pass as pysyncobj sends them.
        if reset and not success:
            log_entries = self._SyncObj__raftLog
            proposed = nextNodeIdx if nextNodeIdx is not None else log_entries[-1][1] + 1
            nextNodeIdx = rejection_next_index(proposed, self._SyncObj__raftCommitIndex, log_entries[0][1])
        SyncObj._SyncObj__sendNextNodeIdx(self, node, reset=reset, nextNodeIdx=nextNodeIdx, success=success)

    def _save_members(self) -> None:
        members = self.members()
        if members != self._members_saved:
            durable.write_atomic(self._data_dir / MEMBERS_FILE, json.dumps({"members": members}).encode())
            self._members_saved = members

    # --- the single replicated method ----------------------------------------------------------------
    @replicated
    def _apply(self, data: bytes) -> dict:
        # Runs on pysyncobj's tick thread, in log order. The entry being applied is the one after the last
        # applied index (no-ops and membership entries also advance it, so the numbering is Raft's own).
        # Its term comes from the log itself (pysyncobj keeps the lookup private), so every replica sees it.
        index = self.raftLastApplied + 1
        entries = self._SyncObj__getEntries(index, 1)
        term = entries[0][2] if entries and entries[0][1] == index else None
        try:
            return self.store.apply(index, data, entry_term=term)
        except sqlite3.OperationalError as exc:  # a full or failing disk under the store: as a refused append
            if ("full" not in str(exc) and "disk I/O" not in str(exc)) or not isinstance(self.journal, AppendJournal):
                raise
            raise self.journal.refuse_store(exc, index) from None

    def propose(self, data: bytes, timeout: float) -> tuple[dict, int]:
        """Replicate `data` and wait until it is applied here. Returns (result, log index)."""
        done = threading.Event()
        box: dict = {}

        def callback(result, error):
            box["result"], box["error"] = result, error
            box["index"] = self.raftLastApplied + 1
            done.set()

        refused = self.journal_failure()
        if refused:  # this node could not append the entry, so it could never apply it
            raise ProposalError(refused, maybe_applied=False)
        if self.handing_over():
            raise NotLeader("leadership is being handed over", maybe_applied=False)
        if not self._isLeader():
            # pysyncobj would pass it to the leader stamped with this node's term, where it applies as a
            # refusal; not appended anywhere, the write path (node/router.py) sends it to the leader itself
            raise NotLeader("not the leader", maybe_applied=False)
        self._apply(data, callback=callback)
        deadline = time.monotonic() + timeout
        while not done.wait(min(0.25, max(0.0, deadline - time.monotonic()))):
            refused = self.journal_failure()
            if refused:
                raise ProposalError(refused, maybe_applied=True)
            if time.monotonic() >= deadline:
                raise ProposalError(f"not committed within {timeout:.1f}s (no quorum?)", maybe_applied=True)
        error = box["error"]
        if error == FAIL_REASON.SUCCESS:
            return box["result"], box["index"]
        if error == FAIL_REASON.NOT_LEADER or error == FAIL_REASON.MISSING_LEADER:
            raise NotLeader("not the leader", maybe_applied=False)
        maybe = error in (FAIL_REASON.DISCARDED, FAIL_REASON.LEADER_CHANGED, FAIL_REASON.REQUEST_DENIED) \
            or error == getattr(FAIL_REASON, "UNKNOWN_OUTCOME", -1)
        raise ProposalError(f"proposal failed: {fail_name(error)}", maybe_applied=maybe)

    # --- status --------------------------------------------------------------------------------------
    def status(self) -> RaftStatus:
        raw = self.getStatus()
        leader = raw.get("leader")
        match = {k[len("match_idx_server_"):]: v for k, v in raw.items() if k.startswith("match_idx_server_")}
        connected = {k[len("partner_node_status_server_"):]: v == 2
                     for k, v in raw.items() if k.startswith("partner_node_status_server_")}
        return RaftStatus(
            state=_STATES.get(raw["state"], str(raw["state"])),
            term=raw["raft_term"],
            leader=leader.id if leader is not None else "",
            commit_index=raw["commit_idx"],
            applied_index=raw["last_applied"],
            has_quorum=bool(raw["has_quorum"]),
            match_index=match,
            connected=connected,
        )

    def leader_address(self) -> str:
        leader = self._getLeader()
        return leader.id if leader is not None else ""

    def is_leader(self) -> bool:
        return self._isLeader()

    def term(self) -> int:
        return self.raftCurrentTerm

    def members(self) -> list[str]:
        return sorted([self.selfNode.id, *(n.id for n in self.otherNodes)])

    # --- membership ----------------------------------------------------------------------------------
    def _wait(self, start: Callable[[Callable], None], what: str, timeout: float) -> None:
        done = threading.Event()
        box = {}

        def callback(result, error):
            box["error"] = error
            done.set()

        start(callback)
        if not done.wait(timeout):
            raise ProposalError(f"{what}: no answer within {timeout:.1f}s", maybe_applied=True)
        if box["error"] != FAIL_REASON.SUCCESS:
            raise ProposalError(f"{what} failed: {fail_name(box['error'])}", maybe_applied=True)

    def add_member(self, address: str, timeout: float = 10.0) -> None:
        if address in self.members():
            return
        self._wait(lambda cb: self.addNodeToCluster(address, callback=cb), f"adding {address}", timeout)

    def start_add_member(self, address: str, wait: float = 0.5) -> None:
        """Append an 'add server' change without waiting for its commit; fail fast if it is refused."""
        if address in self.members():
            return
        done, box = threading.Event(), {}

        def callback(result, error):
            box["error"] = error
            done.set()

        self.addNodeToCluster(address, callback=callback)
        if done.wait(wait) and box["error"] != FAIL_REASON.SUCCESS:
            raise ProposalError(f"adding {address} refused: {fail_name(box['error'])} "
                                "(another membership change in progress?); retry", maybe_applied=False)

    def remove_member(self, address: str, timeout: float = 10.0) -> None:
        if address not in self.members():
            return
        self._wait(lambda cb: self.removeNodeFromCluster(address, callback=cb), f"removing {address}", timeout)

    def handing_over(self) -> bool:
        """Whether this leader holds proposals back for a hand-over (they are refused as NotLeader meanwhile,
        and the write path sends them on to the leader that follows)."""
        return time.monotonic() < self._handing_over_until and self.raftCurrentTerm == self._handing_over_term

    def transfer_leadership_to(self, address: str | None, timeout: float = 10.0) -> None:
        """Raft's hand-over: stop taking proposals, let the target catch up with the whole log (pysyncobj
        refuses a target that has not), tell it to stand for election at once (TimeoutNow) and give it an
        election's time to win, telling it again if it did not. Without the hold, entries this leader
        appended after the TimeoutNow (a liveness update, a client's write) made its log longer than the
        target's, it refused the target its vote and was elected again. Returns when another server won or
        `timeout` passed (the caller checks who leads). A target that is not connected fails at once, one
        that does not catch up within the hold (two election timeouts) fails then: proposals flow again."""
        if address == self.selfNode.id:
            return  # leads already
        connected = self.status().connected
        if address and not connected.get(address):
            raise ProposalError(f"{address} is not connected to the leader (down, or cut off), so it cannot take "
                                "over; check it with `cortex status`, or name another server", maybe_applied=False)
        if not address and not any(connected.values()):
            raise ProposalError("no follower is connected to the leader, so none can take over; check "
                                "`cortex status`", maybe_applied=False)
        node = TCPNode(address) if address else None
        deadline = time.monotonic() + timeout
        while True:
            # the hold is this term's: elected again (the target lost), this server takes writes at once
            self._handing_over_until = time.monotonic() + self._handover_hold
            self._handing_over_term = term = self.raftCurrentTerm
            catch_up_by = min(deadline, self._handing_over_until)
            while True:
                try:
                    # on the tick thread: pysyncobj's transport is not safe to write from another one
                    self._wait(lambda cb: self._tick_calls.put(lambda: self.transferLeadership(node, callback=cb)),
                               "leadership transfer", max(0.1, deadline - time.monotonic()))
                    break
                except ProposalError as exc:
                    if not self._isLeader():
                        return  # stepped down meanwhile: the target (or another server) is taking over
                    if "REQUEST_DENIED" not in str(exc):
                        self._handing_over_until = 0.0
                        raise
                    if time.monotonic() >= catch_up_by:  # the target is still behind: give up, writes flow
                        self._handing_over_until = 0.0
                        raise ProposalError(
                            f"{address or 'the most up-to-date follower'} did not catch up with the leader within "
                            f"{self._handover_hold:.1f}s; this server keeps leading. Retry, or leave the target "
                            "out to pick the most up-to-date server", maybe_applied=False) from None
                    time.sleep(0.02)  # still catching up: the log no longer grows, so it will
            moved = wait_until(lambda term=term: self.raftCurrentTerm != term or not self._isLeader(),
                               min(self._handover_hold, max(0.1, deadline - time.monotonic())))
            if (moved and not self._isLeader()) or time.monotonic() >= deadline:
                return
            # still leading (the target did not stand, or lost and this server was elected again): ask again

    def _run_tick_calls(self) -> None:
        while True:
            try:
                call = self._tick_calls.get_nowait()
            except queue.Empty:
                return
            call()

    # --- snapshots: SQLite backups framed with pysyncobj's log metadata --------------------------------
    def _write_snapshot(self, path: str, raft_meta) -> None:
        # raft_meta is (last applied entry, the entry before it, cluster members): pysyncobj's own data,
        # pickled with its own format; the database follows as a SQLite file image.
        self.store.backup_to(self._snapshot_tmp)
        try:
            meta = syncobj_pickle.dumps(raft_meta)
            with open(path, "wb") as out, open(self._snapshot_tmp, "rb") as db:
                out.write(_SNAPSHOT_MAGIC + struct.pack(">Q", len(meta)) + meta)
                while chunk := db.read(1 << 20):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        finally:
            self._snapshot_tmp.unlink(missing_ok=True)

    def _read_snapshot(self, path: str):
        with open(path, "rb") as f:
            if f.read(len(_SNAPSHOT_MAGIC)) != _SNAPSHOT_MAGIC:
                raise ValueError(f"{path} is not a Cortex snapshot")
            (size,) = struct.unpack(">Q", f.read(8))
            raft_meta = _safe_loads(f.read(size))
            with open(self._snapshot_tmp, "wb") as db:
                while chunk := f.read(1 << 20):
                    db.write(chunk)
        try:
            restored = self.store.restore_from(self._snapshot_tmp)
            log.info("snapshot loaded", extra={"fields": {"restored": restored,
                                                         "index": self.store.last_applied}})
        finally:
            self._snapshot_tmp.unlink(missing_ok=True)
        return tuple(raft_meta)

    def _state_changed(self, old, new) -> None:
        if self._on_state_change is not None:
            self._on_state_change()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()

"""Raft servers (RaftNode over real StateStores and journals) in one process on loopback, and an nftables cut
of one server's Raft port: the bench for "a leader partitioned while it holds entries nobody else has, then
healed" (tests/cluster/test_heal.py, bench/heal.py).

pysyncobj connects from the server with the larger address to the smaller one, so the server with the lowest
port only accepts: dropping that port cuts every Raft connection it has. The lab makes that server the leader
before it cuts it. The nftables table is the lab's own (named after the process and port) and is deleted
when the cut ends and on close. Needs root and `nft`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cortex.config import RaftConfig
from cortex.core.commands import decode_entry
from cortex.core.state import StateStore
from cortex.dev import portcut
from cortex.dev.portcut import PortCut
from cortex.raft.consensus import RaftNode
from tests.support.envelopes import env

SECRET = "raftlab-secret"


def available() -> str:
    """'' when the lab can run here, else why not."""
    return portcut.available()


class RecordingStore(StateStore):
    """A state store that also notes the key of every write it applied (without error), in order."""

    def __init__(self, path: Path, keys: list[str]):
        super().__init__(path)
        self.keys = keys

    def apply(self, index: int, data: bytes, entry_term: int | None = None):
        result = super().apply(index, data, entry_term)
        try:
            entry = decode_entry(data)
        except (ValueError, KeyError, TypeError):
            return result
        envs, results = (entry, result) if isinstance(entry, list) else ([entry], [result])
        for env_, outcome in zip(envs, results):
            if isinstance(outcome, dict) and "error" not in outcome and "skipped" not in outcome:
                self.keys.append(str(env_.args.get("key", "")))
        return result


@dataclass(frozen=True)
class Replica:
    """What one server holds: equal on every server once they have converged."""

    last: tuple[int, int]  # (index, term) of the last log entry
    commit: int
    applied: int
    digest: str


class Lab:
    def __init__(self, root: Path, base_port: int, servers: int = 3, raft: RaftConfig | None = None):
        self.root = root
        self.addresses = [f"127.0.0.1:{base_port + i}" for i in range(servers)]
        self.nodes: list[RaftNode] = []
        self._cuts: list[PortCut] = []
        self.trials = 0
        self.applied_keys: dict[str, list[str]] = {}  # server -> keys of the writes it applied, in order
        # A short connection timeout: a cut outlasts it, as a real partition outlasts TCP, so the healed
        # server is reached over a new connection and not by TCP replaying what the cut held back.
        # Elections slower than the default, so a cut-off leader surely appends the writes handed to it before
        # it steps down (leader_fallback_timeout), even on a loaded machine.
        raft = raft or RaftConfig(connection_timeout=2.0, election_timeout_min=1.0, election_timeout_max=2.0,
                                  leader_fallback_timeout=0.8)
        for i, address in enumerate(self.addresses):
            data_dir = root / f"s{i}"
            data_dir.mkdir(parents=True, exist_ok=True)
            store = RecordingStore(data_dir / "state.db", self.applied_keys.setdefault(address, []))
            self.nodes.append(RaftNode(store, address, self.addresses, raft, SECRET, data_dir))

    def close(self) -> None:
        for cut in list(self._cuts):
            cut.__exit__()
        for node in self.nodes:
            node.destroy()
        for node in self.nodes:
            node.store.close()

    # --- leadership and writes -----------------------------------------------------------------------
    def leader(self, timeout: float = 30.0, exclude: tuple[RaftNode, ...] = ()) -> RaftNode:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leaders = [n for n in self.nodes if n not in exclude and n.is_leader() and n.status().has_quorum]
            if len(leaders) == 1:
                return leaders[0]
            time.sleep(0.05)
        raise AssertionError(f"no single leader within {timeout:.0f}s: "
                             f"{[(n.selfNode.id, n.status().state, n.term()) for n in self.nodes]}")

    def lead_with(self, node: RaftNode, timeout: float = 30.0) -> None:
        """Make `node` the leader (a graceful transfer), waiting for the others to follow it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            current = self.leader(timeout=max(1.0, deadline - time.monotonic()))
            if current is node:
                return
            try:
                current.transfer_leadership_to(node.selfNode.id)
            except Exception:  # noqa: BLE001 - a transfer may race an election; ask again
                time.sleep(0.2)
        raise AssertionError(f"{node.selfNode.id} did not become the leader within {timeout:.0f}s")

    def put(self, node: RaftNode, key: str, value: str, timeout: float = 20.0) -> int:
        """A committed write through `node` (the leader); returns its log index."""
        _, index = node.propose(env("kv.put", {"key": key, "value": value}, term=node.term()), timeout)
        return index

    def append_unacknowledged(self, node: RaftNode, keys: list[str], size: int = 64) -> None:
        """Hand writes of `keys` to `node` without waiting: a cut-off leader appends them to its log, and they
        reach another server only if the cut lets its outgoing traffic through."""
        term = node.term()
        for key in keys:
            node._apply(env("kv.put", {"key": key, "value": "x" * size}, term=term),
                        callback=lambda result, error: None)

    # --- the cut --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def cut(self, node: RaftNode, direction: str = "both") -> Iterator[None]:
        """Drop `node`'s Raft traffic: 'in' (packets to its port), 'out' (packets from it) or 'both'."""
        cut = PortCut(node.selfNode.id.rsplit(":", 1)[1], direction, name="raftlab")
        self._cuts.append(cut)
        try:
            with cut:  # the cut starts at once, while the leader still leads
                yield
        finally:
            self._cuts.remove(cut)

    # --- convergence ----------------------------------------------------------------------------------
    def replicas(self) -> dict[str, Replica]:
        out = {}
        for node in self.nodes:
            last = log_edge(node, -1)
            status = node.status()
            out[node.selfNode.id] = Replica((last[1], last[2]), status.commit_index, status.applied_index,
                                            node.store.digest())
        return out

    def converged(self) -> bool:
        replicas = list(self.replicas().values())
        first = replicas[0]
        return first.applied == first.commit == first.last[0] and all(r == first for r in replicas)

    def wait_converged(self, timeout: float) -> float | None:
        """Seconds until every server holds the same log, commit and applied index and digest; None if not
        within `timeout`."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.converged():
                return time.monotonic() - start
            time.sleep(0.02)
        return None


def log_edge(node: RaftNode, at: int) -> tuple:
    """The first (at=0) or last (at=-1) entry of `node`'s log as (command, index, term). Read from outside the
    tick thread, which may be between clearing the journal and refilling it (a snapshot loading): retried."""
    for _ in range(200):
        try:
            return node._SyncObj__raftLog[at]
        except IndexError:
            time.sleep(0.005)
    return node._SyncObj__raftLog[at]


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def heal_trial(lab: Lab, direction: str, lost: int = 3, writes: int = 40, value_size: int = 8192,
               converge_within: float = 5.0, compact: bool = False) -> dict:
    """One trial: the lowest-port server leads, is cut off in `direction`, takes `lost` writes it cannot
    commit, the others elect a leader and commit `writes` (enough bytes for several AppendEntries batches),
    then the cut heals. Returns the trial's figures: 'converged_s' (None: not within `converge_within`),
    'diverged' (the cut-off server's log ended with entries of its old term where the leader's holds others:
    the case that has to be repaired, certain when the cut drops both directions), 'applied_lost' (servers
    that applied one of the cut-off leader's unacknowledged writes, even for a moment). With `compact` the
    new leader compacts its log past the cut-off server's end, so the heal goes through a snapshot."""
    lab.trials += 1
    target = min(lab.nodes, key=lambda n: int(n.selfNode.id.rsplit(":", 1)[1]))
    lab.lead_with(target)
    lab.put(target, "heal/before", "1")
    before_term = target.term()
    with lab.cut(target, direction):
        lab.append_unacknowledged(target, [f"lost/{lab.trials}/{i}" for i in range(lost)])
        appended = wait_for(lambda: log_edge(target, -1)[2] == before_term and
                            log_edge(target, -1)[1] >= target.status().commit_index + lost, 5)
        others = tuple(n for n in lab.nodes if n is not target)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # a new leader among the others, in a later term
            leaders = [n for n in others if n.is_leader() and n.term() > before_term and n.status().has_quorum]
            if leaders:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the servers left with a majority elected no leader within 30s")
        new_leader = leaders[0]
        for i in range(writes):
            lab.put(new_leader, f"heal/{i}", str(i % 10) * value_size)
        if not wait_for(lambda: not new_leader.status().connected.get(target.selfNode.id, False), 30):
            raise AssertionError("the leader kept its connection to the cut-off server for 30s")
        cut_tail = lab.replicas()[target.selfNode.id].last
        leader_entry = new_leader._SyncObj__getEntries(cut_tail[0], 1)
        diverged = not leader_entry or leader_entry[0][2] != cut_tail[1]
        if compact:
            new_leader.forceLogCompaction()
            if not wait_for(lambda: log_edge(new_leader, 0)[1] > cut_tail[0], 30):
                raise AssertionError("the leader did not compact its log within 30s")
    healed = time.monotonic()
    took = lab.wait_converged(converge_within)
    prefix = f"lost/{lab.trials}/"
    figures = {"direction": direction, "compact": compact, "cut_tail": list(cut_tail), "appended": appended,
               "diverged": diverged,
               "converged_s": took,
               "applied_lost": sorted(a for a, keys in lab.applied_keys.items() if any(k.startswith(prefix)
                                                                                        for k in keys))}
    if took is None:
        figures["replicas"] = {k: [*v.last, v.commit, v.applied] for k, v in lab.replicas().items()}
        figures["converged_s_late"] = lab.wait_converged(0.0)
    figures["heal_s"] = round(time.monotonic() - healed, 3)
    return figures

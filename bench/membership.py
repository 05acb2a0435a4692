"""Membership benchmark: leader stop (graceful vs kill -9) under writes, join → alive, resume → alive,
detection of a dead worker.

A 3-server dev cluster plus worker agents on 127.0.0.1. Suspend is stood in for by SIGSTOP (the machine keeps
running, the worker does not) and the wake by SIGCONT + SIGUSR1, which is what the image's sleep hook sends
on resume; the QEMU tests measure a real S3 suspend. Times are taken as the leader's `cortex status` reports
them, polled every 20 ms, so each includes up to 20 ms of polling.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from cortex.client import Client, CortexError
from cortex.config import LivenessConfig
from cortex.dev import cluster as devcluster

from . import measure

POLL = 0.02
_LIVENESS = LivenessConfig()


def _liveness(leader_address: str, node_id: str) -> str | None:
    try:
        with Client(leader_address, timeout=2) as c:
            return next((n.liveness for n in c.status().nodes if n.id == node_id), None)
    except CortexError:
        return None


def _wait_for(leader_address: str, node_id: str, states: tuple, timeout: float) -> float:
    start = time.monotonic()
    while _liveness(leader_address, node_id) not in states:
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{node_id} did not become {'/'.join(states)} within {timeout}s")
        time.sleep(POLL)
    return time.monotonic() - start


def _leader_address(dc: devcluster.DevCluster) -> str:
    for node in dc.servers:
        try:
            with Client(node.grpc_address, timeout=1) as c:
                if c.status().state == "leader":
                    return node.grpc_address
        except CortexError:
            continue
    raise RuntimeError("no leader")


def _join_times(dc: devcluster.DevCluster, workdir: Path, base_port: int, reps: int) -> list[float]:
    """Start an unjoined worker agent, then time `cortex join` → alive on the leader."""
    token = (Path(dc.servers[0].dir) / "data" / "join-token").read_text().strip()
    leader = _leader_address(dc)
    times = []
    for i in range(reps):
        node = devcluster.DevNode(f"j{i}", "worker", f"127.0.0.1:{base_port + i}", "", str(workdir / f"j{i}"))
        Path(node.dir).mkdir(parents=True)
        text = devcluster.node_config(node, join_address="x:1", token_file="x")
        Path(node.config_path).write_text(text.split("bootstrap:")[0])  # no bootstrap: waits to be joined
        devcluster.start_node(node)
        dc.nodes.append(node)
        dc.save()  # so devcluster.down stops it too
        deadline = time.monotonic() + 30
        while not (Path(node.dir) / "data" / "admin.sock").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node.id} did not start")
            time.sleep(POLL)
        start = time.monotonic()
        subprocess.run([sys.executable, "-m", "cortex", "join", dc.servers[0].grpc_address, "--token", token,
                        "--socket", str(Path(node.dir) / "data" / "admin.sock")], check=True, capture_output=True,
                       timeout=60)
        _wait_for(leader, node.id, ("alive",), 30)
        times.append(time.monotonic() - start)
    return times


def _resume_times(dc: devcluster.DevCluster, worker: devcluster.DevNode, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        leader = _leader_address(dc)
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            _wait_for(leader, worker.id, ("offline",), _LIVENESS.offline_after + 15)  # asleep past the timeout
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        woke = time.monotonic()
        os.kill(worker.pid, signal.SIGUSR1)
        _wait_for(leader, worker.id, ("alive",), 30)
        times.append(time.monotonic() - woke)
    return times


def _detection_times(dc: devcluster.DevCluster, worker: devcluster.DevNode) -> tuple[float, float]:
    leader = _leader_address(dc)
    killed = time.monotonic()
    devcluster.stop_node(worker, signal.SIGKILL)
    suspect = _wait_for(leader, worker.id, ("suspect", "offline"), 30)
    _wait_for(leader, worker.id, ("offline",), 60)
    return suspect, time.monotonic() - killed


def _write_gap(dc: devcluster.DevCluster, sig: int | None, before: float = 1.0, after: float = 4.0) -> float:
    """Stop the leader with `sig` (None: `cortex leader transfer` instead) while a client writes one key after
    another through a follower; return the longest time between two acknowledged writes (the unavailability
    the stop caused)."""
    leader = _leader_address(dc)
    node = next(n for n in dc.servers if n.grpc_address == leader)
    via = next(n for n in dc.servers if n is not node).grpc_address
    acks: list[float] = []
    done = threading.Event()

    def writer() -> None:
        with Client(via, timeout=1.0) as c:
            i = 0
            while not done.is_set():
                try:
                    c.put(f"gap/{i}", "x")
                    acks.append(time.monotonic())
                    i += 1
                except CortexError:
                    time.sleep(0.005)  # no leader yet: ask again at once (the gap is what we measure)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    time.sleep(before)
    if sig is None:
        with Client(via, timeout=15) as c:
            c.transfer_leadership()
    else:
        devcluster.stop_node(node, sig)
    time.sleep(after)
    done.set()
    thread.join(10)
    if sig is not None:
        devcluster.start_node(node)
        dc.save()
    devcluster.wait_healthy(dc, time.monotonic() + 60)
    if len(acks) < 2:
        raise RuntimeError("the writer got fewer than two writes acknowledged")
    return max(b - a for a, b in zip(acks, acks[1:]))


HAND_OVER_TARGET = 0.2  # seconds: a hand-over should cost about one round of Raft messages, also under load
LEADER_EXITS = (("transfer (hand-over)", None), ("SIGTERM (hand-over)", signal.SIGTERM),
         ("kill -9 (election)", signal.SIGKILL))


def hand_over_rows(dc: devcluster.DevCluster, reps: int, progress, exits=LEADER_EXITS) -> list[list]:
    """The longest write gap per way of losing the leader: metric, median, max, samples, target, met?"""
    rows = []
    for label, sig in exits:
        progress(f"membership: leader {label} under sequential writes x{reps}")
        gaps = [_write_gap(dc, sig) for _ in range(reps)]
        graceful = sig != signal.SIGKILL
        target = f"<= {HAND_OVER_TARGET:.1f} s" if graceful else ""
        met = ("yes" if max(gaps) <= HAND_OVER_TARGET else "NO") if graceful else ""
        rows.append([f"leader {label} -> longest write gap", statistics.median(gaps), max(gaps), len(gaps),
                     target, met])
    return rows


def run(workdir: Path, base_port: int, quick: bool, progress) -> list[list]:
    """Measure; return table rows: metric, p50/value, max, samples, target, met?"""
    reps = 1 if quick else 3
    dc = devcluster.up(workdir / "cluster", servers=3, workers=2, base_port=base_port, timeout=60.0,
                       progress=lambda s: progress(f"membership: {s}"))
    try:
        rows = hand_over_rows(dc, reps, progress)
        progress(f"membership: join -> alive x{reps}")
        joins = _join_times(dc, workdir, base_port + 20, reps)
        rows.append(["cortex join -> alive (worker)", statistics.median(joins), max(joins), len(joins), "", ""])
        progress(f"membership: suspend past offline ({_LIVENESS.offline_after:.0f}s) -> resume -> alive x{reps}")
        resumes = _resume_times(dc, dc.node("w1"), reps)
        rows.append(["resume -> alive (SIGCONT+SIGUSR1)", statistics.median(resumes), max(resumes), len(resumes),
                     "<= 3 s", "yes" if max(resumes) <= 3.0 else "NO"])
        progress("membership: kill -9 a worker -> suspect -> offline")
        suspect, offline = _detection_times(dc, dc.node("w2"))
        rows.append(["dead worker -> suspect", suspect, suspect, 1, f"~{_LIVENESS.suspect_after:.0f} s (config)",
                     "yes" if suspect <= _LIVENESS.suspect_after + 1.5 else "NO"])
        rows.append(["dead worker -> offline", offline, offline, 1, f"~{_LIVENESS.offline_after:.0f} s (config)",
                     "yes" if offline <= _LIVENESS.offline_after + 1.5 else "NO"])
    finally:
        devcluster.down(workdir / "cluster")
    return rows


def print_table(rows: list[list]) -> None:
    print("Membership, 3 servers + workers on 127.0.0.1 (seconds)")
    measure.table([[r[0], f"{r[1]:.3f}", f"{r[2]:.3f}", r[3], r[4], r[5]] for r in rows],
                  ["metric", "median", "max", "n", "target", "met?"], file=sys.stdout)

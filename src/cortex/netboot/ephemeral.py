"""The netbooted node's side of the ephemeral lifecycle (`cortex netboot ephemeral run|leave`).

The netboot image runs `cortex-ephemeral.service` (image/netboot-tree): after the agent has joined with
the per-boot token, `run` reports this node as ephemeral (`netboot.report`: it runs from RAM, this
boot's id), learns its profile's idle power-off time from the answer, and powers the machine off once it
has been idle that long. On shutdown the unit's ExecStop runs `leave`: the node leaves the cluster
cleanly, so it does not linger as an offline member (the leader's garbage collection covers the
machines that lose power instead).

"Idle" is: no task of the task engine running on this node. The task engine is a separate subsystem;
until its query exists (`TASK_QUERY`), a node counts as idle from the moment it reported.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cortex.client import AdminClient, Client, CortexError

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
TASK_QUERY = "task.assigned"  # {node_id} -> the attempts assigned to or running on that node (task engine)


def say(message: str) -> None:
    print(f"cortex-ephemeral: {message}", flush=True)


def boot_id(path: str = BOOT_ID_PATH) -> str:
    try:
        return Path(path).read_text().strip().replace("-", "")[:32] or "unknown"
    except OSError:
        return "unknown"


def wait_joined(client: Client, stop: Callable[[], bool], poll: float = 2.0) -> str:
    """Block until the local agent is a member with a leader; returns its node id ('' if stopped)."""
    last = ""
    while not stop():
        try:
            status = client.status()
            if status.state in ("worker", "leader", "follower") and status.leader_id:
                return status.node_id
            reason = status.waiting_for or status.state
        except CortexError as exc:
            reason = f"agent not answering ({exc.code.name})"
        if reason != last:
            say(f"waiting for the agent to join: {reason}")
            last = reason
        time.sleep(poll)
    return ""


def report(client: Client, node_id: str, this_boot: str, retry_for: float = 60.0) -> dict:
    """netboot.report, retried with one idempotency key per boot (a retry applies once)."""
    return client.write("netboot.report", {"node_id": node_id, "boot_id": this_boot, "ephemeral": True},
                        idempotency_key=f"netboot-report-{node_id}-{this_boot}", retry_for=retry_for)


def running_tasks(client: Client, node_id: str) -> int | None:
    """How many tasks run here; None when the cluster has no task engine (unknown query)."""
    try:
        return len(client.read(TASK_QUERY, {"node_id": node_id}, level="stale"))
    except CortexError as exc:
        if exc.code.name == "INVALID_ARGUMENT" and "unknown query" in exc.details:
            return None
        raise


@dataclass
class IdleClock:
    """Pure idle bookkeeping: busy resets the clock; due() once idle for `limit` seconds (0: never)."""

    limit: float
    since: float

    def observe(self, busy: bool, now: float) -> None:
        if busy:
            self.since = now

    def due(self, now: float) -> bool:
        return self.limit > 0 and now - self.since >= self.limit


def poweroff() -> None:
    subprocess.run(["systemctl", "poweroff"], check=False, timeout=30)


def run(addr: str, poll: float = 2.0, stop: Callable[[], bool] = lambda: False,
        power_off: Callable[[], None] = poweroff) -> int:
    with Client(addr, timeout=10) as client:
        node_id = wait_joined(client, stop, poll)
        if not node_id:
            return 0
        this_boot = boot_id()
        try:
            result = report(client, node_id, this_boot)
        except CortexError as exc:
            say(f"PROBLEM: could not report as ephemeral: {exc.details or exc.code.name}")
            return 1
        limit = float(result.get("idle_poweroff_after") or 0)
        gc = result.get("gc_offline_after")
        idle_text = f"after {limit:.0f}s" if limit else "never"
        gc_text = f"{gc:.0f}s" if gc is not None else "never"
        say(f"CORTEX-EPHEMERAL node {node_id} reported (boot {this_boot[:8]}, enrollment {result.get('enrollment')}, "
            f"idle power-off {idle_text}, removed after {gc_text} offline)")
        clock = IdleClock(limit, time.monotonic())
        engine = True
        while not stop():
            time.sleep(poll)
            if engine:
                try:
                    count = running_tasks(client, node_id)
                except CortexError:
                    count = 1  # cannot tell: do not power off on a guess
                if count is None:
                    engine = False
                    say("no task engine in this cluster: idle counts from the report")
                else:
                    clock.observe(count > 0, time.monotonic())
            if clock.due(time.monotonic()):
                say(f"idle for {int(limit)} s: powering off (the shutdown leaves the cluster)")
                power_off()
                return 0
    return 0


def leave(socket_path: str) -> int:
    """ExecStop: leave the cluster cleanly; nothing to do when the node never joined or already left."""
    if not Path(socket_path).exists():
        say(f"no agent admin socket at {socket_path}: nothing to leave")
        return 0
    try:
        AdminClient(socket_path, timeout=20).leave()
        say("left the cluster")
    except CortexError as exc:
        if exc.code.name == "FAILED_PRECONDITION":
            say("not in a cluster: nothing to leave")
            return 0
        print(f"cortex-ephemeral: could not leave: {exc.details or exc.code.name} (the leader garbage-collects "
              "this node once it has been offline long enough)", file=sys.stderr, flush=True)
        return 1
    return 0

"""The fence that does not depend on the agent running: a small process beside it that kills the services
when the agent stops renewing its lease (the idea of Proxmox VE's watchdog-mux, without the hardware).

Self-fencing in the agent (`_fence_loop`) needs a thread of the agent to run. A frozen agent (SIGSTOP, a hung
interpreter, a swap storm of its own) fences nothing, while the leader, after lease + margin by its clock,
starts the services on a partner: they would run twice. So the agent starts this process at start and *pets*
it with its local lease deadline, `renewed_at + lease - fence_early` on CLOCK_MONOTONIC (one clock for every
process of the machine), after every committed renewal. When that deadline passes unpetted, the watchdog
does what self-fencing does: SIGKILL to every process of this node's services (found in /proc by the
environment each carries, as `Supervisor.sweep` finds them), `podman kill` of their containers, and release of
the floating addresses they may hold. Its deadline is the agent's own self-fence time, so the leader's
`lease + margin` covers it exactly as it covers self-fencing.

The channel is a pipe, the watchdog's stdin, one JSON document per line, each the *whole* state (deadline,
containers, addresses), so a message lost or repeated changes nothing. A pipe, not a file or shared memory,
because its end says that the agent is gone: end of file without a goodbye (the agent was SIGKILLed, or
crashed) fences at once and exits, so the watchdog never outlives its agent; a goodbye (a normal stop, after
the agent stopped its services itself) exits without fencing. The watchdog is in a session of its own, so a
signal to the agent's process group (a terminal's ^Z, `kill -STOP -PID`) does not freeze it too.

The agent tells it of a service instance, a container and a floating address *before* starting or claiming
it, so a freeze between the two leaves nothing unknown to it; a node that runs nothing (most nodes, petted
only every `idle_report_period`) is not scanned for at all once its deadline has passed. Only the standard library is imported here (pyroute2 only when
an address has to be released): the process starts in a fraction of a second and stays small.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REFENCE_EVERY = 1.0  # while the deadline is past and the agent still names something, look again this often
CLOSE_WAIT = 5.0  # seconds the agent waits for the watchdog to exit after its goodbye


def service_processes(services_dir: Path, skip: int = 0) -> list[int]:
    """Pids of the processes of this node's services: every service process carries CORTEX_SERVICE and a
    CORTEX_VOLUME under `<data_dir>/services/` in its environment (a container's too: podman passes them)."""
    mine = str(services_dir.resolve()).encode() + b"/"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in (skip, os.getpid()):
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(e.startswith(b"CORTEX_SERVICE=") for e in env) and \
                any(e.startswith(b"CORTEX_VOLUME=" + mine) for e in env):
            found.append(int(entry.name))
    return found


def kill_all(pids: list[int]) -> list[int]:
    killed = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except OSError:  # ended meanwhile
            pass
    return killed


class Watch:
    """The agent's side: starts the watchdog process, pets it, says goodbye. Thread-safe; every failure to
    reach the watchdog is logged once and the watchdog started again at the next message."""

    def __init__(self, services_dir: Path, podman: list[str], log):
        self.services_dir, self.podman, self.log = services_dir, podman, log
        self.deadline: float | None = None
        self.services: set[str] = set()
        self.containers: set[str] = set()
        self.vips: set[str] = set()
        self.proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._broken = False

    def start(self) -> None:
        with self._lock:
            self._spawn()

    def _spawn(self) -> None:
        self.proc = None
        # its own session: a signal to the agent's process group does not reach it; no PR_SET_PDEATHSIG: it
        # must outlive an agent killed with SIGKILL long enough to fence (end of file on the pipe tells it)
        self.proc = subprocess.Popen([sys.executable, "-m", "cortex.services.watchdog"], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, start_new_session=True)
        self.proc.stdin.write(json.dumps({"services_dir": str(self.services_dir), "podman": self.podman}).encode()
                              + b"\n")
        self.proc.stdin.flush()

    def _send(self, doc: dict) -> None:
        """Never raises: a watchdog that cannot be reached is said in the log and started again; the agent's own
        self-fencing goes on meanwhile."""
        if self.proc is None:
            return
        line = json.dumps(doc).encode() + b"\n"
        try:
            self.proc.stdin.write(line)
            self.proc.stdin.flush()
            self._broken = False
            return
        except OSError as exc:  # it died (killed by hand, OOM): say so once, start another
            if not self._broken:
                self.log.warning("services watchdog gone (%s); starting it again", exc)
            self._broken = True
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
            self._spawn()
            if "deadline" in doc:  # _spawn sent the set-up; the state follows
                self.proc.stdin.write(line)
                self.proc.stdin.flush()
        except (OSError, subprocess.SubprocessError) as exc:
            self.log.warning("services watchdog could not be started again: %s", exc)

    def _state(self) -> None:
        self._send({"deadline": self.deadline, "services": sorted(self.services), "containers": sorted(self.containers),
                    "vips": sorted(self.vips)})

    def pet(self, deadline: float) -> None:
        """The lease now lasts until `deadline` (time.monotonic()); only a later deadline is kept."""
        with self._lock:
            self.deadline = deadline if self.deadline is None else max(self.deadline, deadline)
            self._state()

    def add(self, kind: str, item: str) -> None:
        """Before an instance or a container starts, or an address is claimed ('services', 'containers',
        'vips')."""
        with self._lock:
            getattr(self, kind).add(item)
            self._state()

    def discard(self, kind: str, item: str) -> None:
        with self._lock:
            getattr(self, kind).discard(item)
            self._state()

    def close(self) -> None:
        """A normal stop, the services already stopped by the agent: goodbye, and the watchdog exits."""
        with self._lock:
            proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.stdin.write(b'{"bye": true}\n')
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=CLOSE_WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class NoWatch:
    """Where no watchdog runs (a supervisor in a unit test)."""

    def add(self, kind: str, item: str) -> None:
        pass

    def discard(self, kind: str, item: str) -> None:
        pass


# --- the watchdog process -------------------------------------------------------------------------------------

def say(text: str) -> None:
    print(f"services watchdog: {text}", file=sys.stderr, flush=True)


class Fence:
    """What the watchdog knows and does: the state the agent last sent, and the fence."""

    def __init__(self):
        self.services_dir: Path | None = None
        self.podman: list[str] = []
        self.deadline: float | None = None
        self.services: list[str] = []
        self.containers: list[str] = []
        self.vips: list[str] = []
        self.bye = False

    def take(self, line: bytes) -> None:
        try:
            doc = json.loads(line)
        except ValueError:
            say(f"ignored a line that is not JSON: {line[:80]!r}")
            return
        if "services_dir" in doc:
            self.services_dir, self.podman = Path(doc["services_dir"]), list(doc.get("podman") or [])
        if "deadline" in doc:
            self.deadline = doc["deadline"]
            self.services = list(doc.get("services") or [])
            self.containers, self.vips = list(doc.get("containers") or []), list(doc.get("vips") or [])
        self.bye = self.bye or bool(doc.get("bye"))

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def armed(self) -> bool:
        """Whether the agent named anything that may run here (else a passed deadline needs no scan)."""
        return bool(self.services or self.containers or self.vips)

    def fence(self, why: str, recheck=lambda: True) -> None:
        """Kill every service process (`recheck()` is asked between finding and killing them: a renewal that
        came meanwhile may have let the agent start one legitimately), then the containers and addresses."""
        if self.services_dir is None:
            return
        pids = service_processes(self.services_dir, skip=os.getppid())
        if not recheck():
            return
        killed = kill_all(pids)
        done = []
        for vip in self.vips:
            try:
                from cortex.ha.vip import LinuxFloatingAddress

                LinuxFloatingAddress().release(vip)
                done.append(f"released {vip}")
            except Exception as exc:  # no pyroute2 or no CAP_NET_ADMIN: the agent could not have claimed it either
                done.append(f"could not release {vip}: {exc}")
        for name in self.containers:
            if not self.podman:
                break
            try:
                subprocess.run([*self.podman, "kill", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=30, check=False)
                done.append(f"killed container {name}")
            except (OSError, subprocess.TimeoutExpired) as exc:
                done.append(f"could not kill container {name}: {exc}")
        if killed or done:
            say(f"{why}: killed {len(killed)} service processes" + "".join(f"; {d}" for d in done))
        # done until the agent names something again (it re-sends its whole state with every message)
        self.services, self.containers, self.vips = [], [], []


def run(stdin_fd: int = 0) -> int:
    fence = Fence()
    buffer = b""
    last_fence = 0.0

    def read_available(timeout: float) -> bool:
        """Reads what the agent sent within `timeout`; False at end of file."""
        nonlocal buffer
        ready, _, _ = select.select([stdin_fd], [], [], max(0.0, timeout))
        if not ready:
            return True
        data = os.read(stdin_fd, 65536)
        if not data:
            return False
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                fence.take(line)
        return True

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only the agent's goodbye or its end stops the watchdog
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        now = time.monotonic()
        if fence.deadline is not None and now < fence.deadline:
            wait = fence.deadline - now
        elif fence.expired(now) and fence.armed():
            wait = max(0.0, last_fence + REFENCE_EVERY - now)
        else:  # no lease yet, or nothing named: only a message of the agent's changes anything
            wait = 3600.0
        if not read_available(wait):
            if not fence.bye:
                fence.fence("the agent ended without stopping its services")
            return 0
        if fence.bye:
            return 0
        now = time.monotonic()
        if fence.expired(now) and fence.armed() and now - last_fence >= REFENCE_EVERY - 0.01:
            last_fence = now
            late = now - fence.deadline

            def still_expired() -> bool:  # a pet that came while /proc was read wins
                return read_available(0) and not fence.bye and fence.expired(time.monotonic())

            fence.fence(f"the agent's lease ran out {late:.1f}s ago unrenewed (the agent frozen or cut off)",
                        still_expired)


if __name__ == "__main__":
    sys.exit(run())

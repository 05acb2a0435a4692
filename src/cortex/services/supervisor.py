"""The node side: run the services this node holds, check their health, restart them with backoff, stop them.

Each instance is one thread that runs the service's process tree through the task executors (the shell
kind's bubblewrap sandbox, the container kind's Podman), so a service gets the same isolation as a task and
dies with the agent (bwrap --die-with-parent, podman rm). A crash or a failed health check ends the process;
the next start waits an exponential backoff, which the instance reports (`backoff`, restarts, next start).
Output is kept in a bounded buffer until the next report carries it to the replicated state (capped there).
A run is started (or restarted) only while the node holds its lease, and the watchdog process (watchdog.py) is
told of a container or a floating address before it exists.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

from cortex.services.container import container_name, dies_with_agent, run_container
from cortex.services.lease import backoff, catch_up
from cortex.services.ports import Ports
from cortex.services.replicate import Replicator
from cortex.services.watchdog import NoWatch, kill_all, service_processes
from cortex.tasks.executor import TaskRun
from cortex.tasks.executors import DEFAULT_PATH, ExecutorSettings, ProcessWatch, ShellExecutor

PENDING_CAP = 64 * 1024  # output bytes held between reports; beyond it a marker says what was dropped
HEALTHY_RESET = 30.0  # a run this long (healthy) forgets earlier failures
CATCH_UP_WAIT = 60.0  # seconds a partner giving a volume service back serves on while the home catches up


def check_health(health: dict, workdir: Path, shell: ShellExecutor) -> tuple[bool, str]:
    """One health check: (passed, why not)."""
    timeout = health["timeout"]
    try:
        if health["type"] == "tcp":
            with socket.create_connection(("127.0.0.1", health["port"]), timeout=timeout):
                return True, ""
        if health["type"] == "http":
            with socket.create_connection(("127.0.0.1", health["port"]), timeout=timeout) as sock:
                sock.settimeout(timeout)
                sock.sendall(f"GET {health['path']} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
                head = sock.recv(64).decode("latin-1")
            parts = head.split()
            if len(parts) >= 2 and parts[0].startswith("HTTP/") and parts[1][:1] in "23":
                return True, ""
            return False, f"http check answered {head.splitlines()[0] if head else 'nothing'!r}"
        run = TaskRun("health", 0, {"command": health["command"], "env": {}, "network": True}, workdir,
                      lambda stream, data: None, threading.Event())
        done = subprocess.run(shell.argv(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=timeout, env={"PATH": DEFAULT_PATH}, check=False)
        return done.returncode == 0, "" if done.returncode == 0 else f"exec check exited {done.returncode}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{health['type']} check failed: {exc}"


class Instance:
    """One service at one epoch on this node."""

    def __init__(self, row: dict, node_id: str, data_dir: Path, ports: Ports, settings: ExecutorSettings, log,
                 replica: Replicator | None = None, watch=None, lease_ok=lambda: True):
        self.replica = replica
        self.watch = watch or NoWatch()  # told of a container or an address before it exists (watchdog.py)
        self.lease_ok = lease_ok
        self.name, self.epoch, self.spec = row["name"], row["epoch"], row["spec"]
        self.restart_gen = row["restart_gen"]
        self.node_id, self.ports, self.log = node_id, ports, log
        self.prev_holder = row["prev_holder"] if row["prev_holder"] != node_id else ""
        self.prev_fenced, self.planned = bool(row["prev_fenced"]), bool(row["planned"])
        self.base = data_dir / "services" / self.name
        self.workdir = self.base / ("volume" if self.spec["volume"] else "work")
        self.shell = ShellExecutor(settings)
        self.settings = settings
        self.state, self.detail, self.healthy = "starting", "", False
        self.restarts, self.failures, self.next_start = 0, 0, 0.0
        self.notes: list[str] = []
        self.vip_claimed = False
        self.cancel = threading.Event()  # ends the current process (a new one per run)
        self.done = threading.Event()  # ends the instance
        self._run_lock = threading.Lock()  # stop() and the start of a run never interleave
        self._pending: list[list] = []
        self._pending_bytes = self._dropped = 0
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._main, name=f"service-{self.name}", daemon=True)

    # --- output --------------------------------------------------------------------------------------------
    def emit(self, stream: str, data: bytes) -> None:
        with self._lock:
            if self._pending_bytes + len(data) > PENDING_CAP:
                self._dropped += len(data)
                return
            self._pending.append([stream, data.decode("utf-8", "replace")])
            self._pending_bytes += len(data)

    def take_output(self) -> list[list]:
        with self._lock:
            out, self._pending, self._pending_bytes = self._pending, [], 0
            if self._dropped:
                out.append(["stderr", f"[cortex: {self._dropped} bytes of output dropped: produced faster than "
                                      "reports carry it]\n"])
                self._dropped = 0
        chunks = []
        for stream, text in out:  # the state domain takes chunks of at most 16 KiB
            chunks += [[stream, text[i:i + 16000]] for i in range(0, len(text), 16000)]
        return chunks[:64]

    def report(self) -> dict:
        return {"name": self.name, "epoch": self.epoch, "state": self.state, "healthy": self.healthy,
                "restarts": self.restarts, "detail": "; ".join([*self.notes, self.detail] if self.detail else self.notes),
                "output": self.take_output()}

    # --- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self, why: str = "stopped", state: str = "stopped") -> None:
        with self._run_lock:
            self.done.set()
            self.cancel.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        if self.thread.is_alive():  # not dead yet: say so, so nobody else starts it (the next round retries)
            self.state, self.healthy, self.detail = "stopping", False, f"{why}; its processes have not ended yet"
            return
        self._release_vip()
        self.state, self.healthy, self.detail = state, False, why

    def _main(self) -> None:
        try:
            self._prepare()
        except Exception as exc:
            self.state, self.detail = "failed", str(exc)
            self.log.warning("service %s could not be prepared: %s", self.name, exc)
            return
        while not self.done.is_set():
            wait = self.next_start - time.monotonic()
            if wait > 0:
                self.state = "backoff"
                self.detail = f"crashed {self.failures}x in a row; next start in {wait:.0f}s"
                if self.done.wait(wait):
                    break
            if not self.lease_ok():
                # no restart without a lease: a run the watchdog killed (the agent was frozen) is not started
                # again by this thread once the agent runs again, before self-fencing stops the instance
                self.state, self.healthy, self.detail = "waiting", False, "no lease: not restarted"
                if self.done.wait(0.2):
                    break
                continue
            with self._run_lock:  # a stop() that came during the backoff must not be cleared away
                if self.done.is_set():
                    break
                self.cancel = threading.Event()
            started = time.monotonic()
            self.state, self.healthy, self.detail = "starting", False, ""
            code, why = self._run_once(self.cancel)
            if self.done.is_set():
                break
            ran = time.monotonic() - started
            self.failures = 1 if ran >= HEALTHY_RESET else self.failures + 1
            policy = self.spec["restart"]
            if policy["policy"] == "never" or (policy["policy"] == "on-failure" and code == 0 and not why):
                self.state, self.healthy = ("stopped" if code == 0 and not why else "failed"), False
                self.detail = why or f"exited with code {code}; restart policy {policy['policy']}"
                return
            self.restarts += 1
            self.next_start = time.monotonic() + backoff(self.failures, policy["backoff"], policy["backoff_max"])
            self.detail = why or f"exited with code {code}"
            self.emit("stderr", f"[cortex: {self.name} {self.detail}; restart {self.restarts}]\n".encode())

    def _prepare(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        if not self.spec["volume"] and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)  # a stateless service starts from nothing
        self.workdir.mkdir(parents=True, exist_ok=True)
        age, source = (None, "")
        if self.replica is not None:
            if self.spec["volume"] and self.prev_holder and self.prev_fenced:
                self.replica.abandon(self.name, self.prev_holder)
            self.replica.settle(self.name)  # a periodic pull in flight ends before this copy goes live
            age, source = self.replica.age(self.name)
            self.replica.forget(self.name)
        if self.spec["volume"] and self.prev_holder and self.prev_fenced:
            # the previous holder is gone (its lease ran out): no pull from it, which could hang on a dead
            # machine; the last periodic copy is what there is, and the report says how old it is
            self.notes.append(f"took over from {self.prev_holder} with the volume copy synced from {source} "
                              f"{age:.0f}s ago (writes after that are not here)" if age is not None else
                              f"took over from {self.prev_holder} with no synced copy of the volume: started with "
                              "this node's own (possibly empty) volume")
        elif self.spec["volume"] and self.prev_holder:
            self.state = "syncing"
            if self.ports.volume_sync is None:
                self.notes.append(f"volume not replicated: no volume sync on {self.node_id}, so it started with "
                                  "this node's own copy")
            else:
                try:
                    sync = self.ports.volume_sync.pull(self.name, self.prev_holder, self.workdir)
                    self.notes.append(f"volume synced from {self.prev_holder}: {sync.files_changed} files, "
                                      f"{sync.bytes_copied} bytes in {sync.seconds:.1f}s")
                except Exception as exc:  # a planned move must not lose data: fail, the leader moves it back
                    raise RuntimeError(f"volume sync from {self.prev_holder} failed: {exc}; the service stays "
                                       f"with {self.prev_holder}'s copy") from exc
        if self.spec["vip"] and self.ports.floating is None:
            self.notes.append(f"floating address {self.spec['vip']} not claimed: no floating address support here")

    def _claim_vip(self) -> None:
        """Claimed once the service runs (healthy), not before: clients sent to the address then find it
        answering. Retried at the next healthy run when it fails; the report says why."""
        vip = self.spec["vip"]
        if not vip or self.ports.floating is None or self.vip_claimed or self.done.is_set():
            return
        self.watch.add("vips", vip)
        # After an unplanned takeover the previous holder's lease ran out, so its service has stopped; but an
        # agent killed with -9 could not remove the address, and that machine still answers ARP for it: a
        # probe would find it and the takeover would never claim. The announcement moves the neighbours
        # here, and that agent removes its leftover when it starts again (Supervisor._release_leftover).
        taking_over = bool(self.prev_holder and self.prev_fenced)
        try:
            iface = self.ports.floating.claim(vip, probe=not taking_over)
        except Exception as exc:
            note = f"floating address {vip} not claimed: {exc}"
            if note not in self.notes:  # retried at every healthy check: said once per kind of failure
                self.notes.append(note)
                self.log.warning("service %s: %s", self.name, note)
            return
        self.notes = [n for n in self.notes if not n.startswith(f"floating address {vip} not claimed")]
        self.notes.append(f"claimed {vip} on {iface}")
        self.vip_claimed = True

    def _release_vip(self) -> None:
        """Every stop releases the address, a fenced one too (release is idempotent, so a node that never
        claimed it loses nothing): a node that must not run the service must not answer for it either."""
        self.vip_claimed = False
        if self.spec["vip"] and self.ports.floating is not None:
            try:
                self.ports.floating.release(self.spec["vip"])
                self.watch.discard("vips", self.spec["vip"])
            except Exception as exc:
                self.log.warning("could not release %s: %s", self.spec["vip"], exc)

    def _run_once(self, cancel: threading.Event) -> tuple[int | None, str]:
        env = {"CORTEX_SERVICE": self.name, "CORTEX_EPOCH": str(self.epoch), "CORTEX_NODE": self.node_id,
               "CORTEX_VOLUME": str(self.workdir.resolve())}
        run = TaskRun(self.name, self.epoch, self.spec["run"], self.workdir.resolve(), self.emit, cancel, env=env)
        checker = threading.Thread(target=self._health_loop, args=(cancel,), daemon=True)
        checker.start()
        try:
            if self.spec["kind"] == "container":
                self.watch.add("containers", container_name(run))
                try:
                    code, failure = run_container(run, self.spec, self.settings)
                finally:
                    self.watch.discard("containers", container_name(run))
            else:
                code, failure = ProcessWatch(dies_with_agent(self.shell.argv(run)), run,
                                             env={"PATH": DEFAULT_PATH}).execute()
        except RuntimeError as exc:
            code, failure = None, str(exc)
        cancel.set()
        checker.join(timeout=10)
        why = getattr(self, "_unhealthy", "") or ("" if failure in ("", "cancelled") else failure)
        self._unhealthy = ""
        return code, why

    def _health_loop(self, cancel: threading.Event) -> None:
        health = self.spec["health"]
        if health is None:  # no check: running for a second counts as healthy
            if not cancel.wait(1.0):
                self.state, self.healthy = "running", True
                self._claim_vip()
            return
        started = time.monotonic()
        misses, seen_healthy = 0, False
        while not cancel.is_set():
            ok, why = check_health(health, self.workdir.resolve(), self.shell)
            if ok:
                misses, seen_healthy = 0, True
                self.state, self.healthy = "running", True
                self._claim_vip()
            elif seen_healthy or time.monotonic() - started >= health["grace"]:
                misses += 1
                self.healthy = False if seen_healthy or misses >= health["threshold"] else self.healthy
                if misses >= health["threshold"]:
                    self._unhealthy = f"unhealthy: {why} ({misses} checks in a row)"
                    cancel.set()  # ends the process tree; the main loop restarts it with backoff
                    return
            if cancel.wait(health["interval"]):
                return


class Supervisor:
    """The instances this node runs, reconciled against the replicated view."""

    def __init__(self, node_id: str, data_dir: Path, ports: Ports, settings: ExecutorSettings, log, watch=None,
                 lease_ok=lambda: True):
        self.node_id, self.data_dir, self.ports, self.settings, self.log = node_id, data_dir, ports, settings, log
        self.watch, self.lease_ok = watch, lease_ok
        self._watch = watch or NoWatch()
        self.instances: dict[str, Instance] = {}
        self.seen: dict[str, int] = {}  # the highest epoch seen per service: an older view is ignored
        self.waiting: dict[str, str] = {}
        self.stopped: dict[str, str] = {}
        self.stopping: dict[str, Instance] = {}  # stopped but their processes have not ended yet
        self._lock = threading.Lock()
        self.replica = Replicator(node_id, data_dir, ports, log)
        self._catch_up_since: dict[str, tuple[int, float]] = {}  # name -> (giveback epoch, when first seen)
        self._leftovers_checked: set[tuple[str, str]] = set()  # (service, vip) released once this agent's life

    def reconcile(self, rows: list[dict], gate) -> None:
        """`gate(row) -> ''` or why this node may not start the row's service now."""
        with self._lock:
            for name, inst in list(self.stopping.items()):
                inst.stop(inst.detail, "stopped")
                if inst.state != "stopping":
                    del self.stopping[name]
                    self._watch.discard("services", name)
            names = set()
            for row in rows:
                name = row["name"]
                names.add(name)
                if row["epoch"] < self.seen.get(name, 0):
                    continue  # a stale view (a lagging replica): never act on it
                self.seen[name] = row["epoch"]
                current = self.instances.get(name)
                if row["holder"] != self.node_id:
                    if current is not None and self._serves_until_caught_up(row):
                        current.epoch = row["epoch"]
                        continue
                    if current is not None:
                        self._stop(name, f"{row['holder']} holds it now (epoch {row['epoch']})")
                    elif name not in self.stopping:
                        self._release_leftover(row)
                    self.waiting.pop(name, None)
                    continue
                if current is not None and (current.restart_gen != row["restart_gen"] or current.spec != row["spec"]):
                    self._stop(name, "restarted")
                    current = None
                if current is not None:
                    current.epoch = row["epoch"]
                    continue
                why = gate(row) or ("its previous processes here have not ended yet" if name in self.stopping else "")
                if why:
                    self.waiting[name] = why
                    continue
                self.waiting.pop(name, None)
                self.stopped.pop(name, None)
                inst = Instance(row, self.node_id, self.data_dir, self.ports, self.settings, self.log, self.replica,
                                self.watch, self.lease_ok)
                self.instances[name] = inst
                self._watch.add("services", name)  # before its first process: a freeze now is covered too
                inst.start()
            for name in [n for n in self.instances if n not in names]:
                self._stop(name, "removed")
            here = set(self.instances) | set(self.stopping)
        self.replica.reconcile(rows, here)

    def _release_leftover(self, row: dict) -> None:
        """A floating address of a service this node does not run, left on it by an earlier life of this agent
        (killed with -9, it could not release it): removed once per agent life and address, so the holder is
        the only machine answering for it. Release is idempotent: where there is none, nothing changes."""
        vip = row["spec"].get("vip")
        if not vip or self.ports.floating is None or (row["name"], vip) in self._leftovers_checked:
            return
        if self.node_id not in (row["prev_holder"], row["home"], *row.get("candidates", [])):
            return  # never claimed here: nothing to look for
        try:
            self.ports.floating.release(vip)
        except Exception as exc:  # retried at the next reconcile
            self.log.warning("could not release %s left by an earlier run of this agent: %s", vip, exc)
            return
        self._leftovers_checked.add((row["name"], vip))

    def _serves_until_caught_up(self, row: dict) -> bool:
        """A giveback of a volume service from this node: keep serving until the home has pulled the volume
        once since the move (or its pull failed: the leader then leaves the service here), at most
        CATCH_UP_WAIT; the final pull after this node stops then copies only the last seconds."""
        if row["state"] != "giving_back" or not row["spec"]["volume"] or row["prev_holder"] != self.node_id:
            self._catch_up_since.pop(row["name"], None)
            return False
        epoch, since = self._catch_up_since.get(row["name"], (0, 0.0))
        if epoch != row["epoch"]:
            since = time.monotonic()
            self._catch_up_since[row["name"]] = (row["epoch"], since)
        caught, error = catch_up(row)
        return not caught and time.monotonic() - since < CATCH_UP_WAIT

    def _stop(self, name: str, why: str, state: str = "stopped") -> None:
        inst = self.instances.pop(name)
        inst.stop(why, state)
        if inst.state == "stopping":
            self.stopping[name] = inst
        else:
            self._watch.discard("services", name)
        self.stopped[name] = why

    def fence(self, why: str) -> bool:
        """Self-fencing: stop everything now. True when something was running."""
        with self._lock:
            names = list(self.instances)
            for name in names:
                self._stop(name, why, "fenced")
        return bool(names)

    def report(self, rows: list[dict]) -> list[dict]:
        """One entry per service this node is involved in, with the epoch it has seen (the release signal)."""
        with self._lock:
            out = []
            for row in rows:
                name = row["name"]
                inst = self.instances.get(name) or self.stopping.get(name)
                if inst is not None:
                    out.append(replace_epoch(inst.report(), self.seen.get(name, inst.epoch)))
                elif self.node_id in (row["holder"], row["prev_holder"], row["home"], *row.get("candidates", [])):
                    state = "waiting" if name in self.waiting else "stopped"
                    out.append({"name": name, "epoch": self.seen.get(name, row["epoch"]), "state": state,
                                "healthy": False, "restarts": 0,
                                "detail": self.waiting.get(name) or self.stopped.get(name, ""), "output": [],
                                **(self.replica.report(name) if row["spec"]["volume"] else {})})
            return out

    def sweep(self) -> list[int]:
        """Kill service processes a previous life of this agent left behind (found by the environment every
        service process carries): a new agent must not find its old services still running."""
        return kill_all(service_processes(self.data_dir / "services"))

    def stop_all(self) -> None:
        with self._lock:
            for name in list(self.instances):
                self._stop(name, "agent stopping")


def replace_epoch(doc: dict, epoch: int) -> dict:
    return {**doc, "epoch": max(doc["epoch"], epoch)}


__all__ = ["Supervisor", "Instance", "check_health"]

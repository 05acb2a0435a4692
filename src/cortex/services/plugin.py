"""The services plugin: every node runs what it holds; the leader moves services between HA partners.

Node loop (every `renew_interval`): read the services (leader read), reconcile the supervisor against them
through the start gate (lease.py), then write `service.report`, which is both the status and the lease
renewal. Nodes named in no service report only every `idle_report_period` (networks and capabilities).
Fence loop: once the lease runs out (no committed renewal: no quorum reachable), stop everything. The same
deadline is handed to the watchdog process (watchdog.py), which fences when the agent itself cannot run.
Stop: services with a ready partner are handed over first (a planned takeover, bounded by HANDOVER_BUDGET).
Leader loop: feed renewals applied here into the LeaseBook, decide moves (lease.decide) and propose them as
internal `service.move` commands, compare-and-set on the epoch; an unplanned takeover also posts a message.

The optional parts from cortex.ha (volume sync, floating address, fence agent) are built in `build_ports`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import threading
import time
from pathlib import Path
from typing import ClassVar

from cortex.plugins.api import Plugin, Tool, holds_no_replica, write_with_retry
from cortex.services import lease as leases
from cortex.services.ports import Ports
from cortex.services.supervisor import Supervisor
from cortex.services.watchdog import Watch
from cortex.tasks.executors import ExecutorSettings

HANDOVER_BUDGET = 15.0  # seconds a stopping agent spends handing its services over before it stops them anyway


def build_ports(node_data: Path, cluster, log) -> Ports:
    """The one place the cortex.ha implementations plug in. Volumes are pulled over the `cortex.v1.Volumes`
    service with this node's own certificate (only node certificates may read volumes), addressed through
    the `nodes` table; a floating address needs pyroute2 (imported at the first claim, not here); fencing
    exists only where the node's config has a `fence` section, since without one there is nothing to call."""
    if cluster is None:
        return Ports()
    from cortex.ha.volumes import RemoteVolumeSync, nodes_addresses

    credentials = getattr(cluster, "node_credentials", None) or (lambda: None)
    volume_sync = RemoteVolumeSync(nodes_addresses(cluster.read), credentials)
    floating = None
    if importlib.util.find_spec("pyroute2") is not None:
        from cortex.ha.vip import LinuxFloatingAddress

        floating = LinuxFloatingAddress()
    else:
        log.info("services: pyroute2 is not installed, so floating addresses (vip) are not claimed here")
    fence = None
    config = getattr(cluster, "config", None)
    if config is not None and getattr(config, "fence", None):
        from cortex.ha.fence import Fencing

        fence = Fencing.from_config(config)
    return Ports(volume_sync=volume_sync, floating=floating, fence=fence)


def fence_target(move: leases.Move, view: dict, ports: Ports) -> str:
    """The node to power off before `move` is proposed: the holder an unplanned takeover replaces, when a
    fence agent is configured for it on this node ('' otherwise)."""
    if not move.fenced or ports.fence is None:
        return ""
    holder = next((r["holder"] for r in view["services"] if r["name"] == move.name), "")
    if not holder or holder == move.holder:
        return ""
    targets = getattr(ports.fence, "targets", None)
    return holder if targets is None or holder in targets else ""


def local_networks() -> list[str]:
    """This machine's networks as CIDRs, loopback and link-local left out (a VIP must lie in one of some
    node's). psutil, which the tasks plugin already loads, answers from the kernel without a subprocess."""
    import ipaddress
    import socket

    import psutil

    out = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family not in (socket.AF_INET, socket.AF_INET6) or not a.netmask:
                continue
            try:
                iface = ipaddress.ip_interface(f"{a.address.split('%')[0]}/{a.netmask}")
            except ValueError:
                continue
            if not (iface.ip.is_loopback or iface.ip.is_link_local):
                out.add(str(iface))
    return sorted(out)


def capabilities(settings: ExecutorSettings, ports: Ports) -> dict:
    from cortex.tasks.container import ContainerExecutor
    from cortex.tasks.executors import ShellExecutor

    kinds, why = [], {}
    for kind, executor in (("shell", ShellExecutor(settings)), ("container", ContainerExecutor(settings))):
        problem = executor.available()
        if problem:
            why[kind] = problem
        else:
            kinds.append(kind)
    return {"kinds": kinds, "why": why, "volume_sync": ports.volume_sync is not None,
            "floating": ports.floating is not None}


class ServicesPlugin(Plugin):
    name: ClassVar[str] = "services"
    description: ClassVar[str] = "Long-running services with leases, fencing, takeover and giveback between HA partners"
    options_schema: ClassVar[dict] = {
        "type": "object", "additionalProperties": False,
        "properties": {
            "run_services": {"type": "boolean", "default": True, "description": "run services held by this node"},
            "lease": {"type": "number", "minimum": 4, "maximum": 600, "default": leases.DEFAULT_LEASE,
                      "description": "seconds a committed renewal keeps this node's services running"},
            "lease_margin": {"type": "number", "minimum": 0.5, "maximum": 600, "default": leases.DEFAULT_MARGIN,
                             "description": "the leader's wait beyond a lease before it moves a service"},
            "renew_interval": {"type": "number", "minimum": 0.2, "maximum": 60, "default": 1.0},
            "idle_report_period": {"type": "number", "minimum": 1, "maximum": 86400, "default": 300.0,
                                   "description": "how often a node named in no service reports (and at once "
                                                  "when its networks change)"},
            "giveback_timeout": {"type": "number", "minimum": 5, "maximum": 3600,
                                 "default": leases.GIVEBACK_TIMEOUT},
            "notify": {"type": "string", "default": "ops", "description": "inbox address told of takeovers"},
            "takeover_on_prediction": {"type": "boolean", "default": False,
                                       "description": "move a node's services to their partners (a planned "
                                                      "takeover) when Sentinel predicts that node's failure"},
        },
    }

    _stop: threading.Event | None = None

    def init(self) -> None:
        o = self.ctx.options
        self._stop, self._wake = threading.Event(), threading.Event()
        self._threads: list[threading.Thread] = []
        self.node_data = self.ctx.data_dir.parent.parent  # <data_dir>/plugins/services -> <data_dir>
        self.settings = ExecutorSettings(hide_paths=(str(self.node_data.resolve()),))
        self.lease = leases.NodeLease(o.get("lease", leases.DEFAULT_LEASE), min(leases.FENCE_EARLY, o.get("lease", 8) / 2))
        self.book = leases.LeaseBook(o.get("lease", leases.DEFAULT_LEASE), o.get("lease_margin", leases.DEFAULT_MARGIN))
        self._book_fresh = False
        self._first_seen: dict = {}
        self.ports = build_ports(self.node_data, self.ctx.cluster, self.ctx.log)
        self.supervisor: Supervisor | None = None
        self._last_report = 0.0
        self._last_networks: list[str] | None = None
        self.fenced_at: float | None = None
        self.stopping = False  # set by hand_over: this node's reports say it takes no service any more
        self._step_lock = threading.Lock()  # hand_over's own step and the node loop's never interleave

    def start(self) -> None:
        cluster = self.ctx.cluster
        if cluster is None:
            return
        from cortex.tasks.container import BASE_FLAGS

        self.watch = Watch(self.node_data / "services", [self.settings.podman, *BASE_FLAGS], self.ctx.log)
        self.stopping = False
        if self.ctx.options.get("run_services", True):  # a node that runs no service has nothing to fence
            try:
                self.watch.start()
            except OSError as exc:  # self-fencing in this process still works; only a frozen agent is uncovered
                self.ctx.log.warning("services: the watchdog could not start (%s): a frozen agent would not be "
                                     "fenced", exc)
        self.supervisor = Supervisor(cluster.node_id, self.node_data, self.ports, self.settings, self.ctx.log,
                                     self.watch, lambda: self.lease.valid(time.monotonic()))
        leftovers = self.supervisor.sweep()
        if leftovers:
            self.ctx.log.warning("killed %d service processes a previous run of this agent left", len(leftovers))
        self.caps = capabilities(self.settings, self.ports)
        if not self.ctx.options.get("run_services", True):
            self.caps["kinds"] = []
        for name, target in (("services-node", self._node_loop), ("services-fence", self._fence_loop),
                             ("services-leader", self._leader_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        if self._stop is None:
            return
        if self.supervisor is not None and self._threads:
            try:
                self.hand_over(HANDOVER_BUDGET)
            except Exception as exc:  # never keeps the agent from stopping
                self.ctx.log.warning("services: handing over before stopping failed: %s; stopping them here", exc)
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=10)
        if self.supervisor is not None:
            self.supervisor.stop_all()
        watch = getattr(self, "watch", None)
        if watch is not None:  # after stop_all: nothing of the services runs, the watchdog may go
            watch.close()
        close = getattr(self.ports.volume_sync, "close", None)
        if close is not None:  # the channels to other nodes' Volumes service
            close()

    def hand_over(self, budget: float) -> list[dict]:
        """A graceful stop (SIGTERM, systemctl stop, a reboot): the services this node holds move to a ready
        partner as a planned takeover (`cortex ha takeover` of this node) while the node loop and the Volumes
        service still run here, so this node stops them, reports them released and serves the partner's final
        volume pull. Waits until each answers on its partner, at most `budget` seconds; the rest stop with the
        agent. Services without a ready partner are refused by the takeover and simply stop. A node without a
        valid lease (no quorum) skips it: no write could commit."""
        from cortex.services import api

        me, sup = self.ctx.cluster.node_id, self.supervisor
        if not sup.instances or not self.lease.valid(time.monotonic()):
            return []
        started = time.monotonic()
        self.stopping = True
        key = f"stop-handover:{me}:{self.lease.renewed_at}"  # one takeover per stop, whatever the retries
        while True:
            try:
                with self._step_lock:  # the report saying so is committed before the takeover: the leader's
                    self.node_step(me)  # next round must not give a service back to this node while it stops
                result = self.ctx.cluster.write("service.takeover",
                                                {"node": me, "reason": f"{me} is stopping: planned takeover"}, key)
                break
            except Exception:
                # a server that stops has just handed its leadership over (node/agent.py), and the new leader
                # refuses writes until it has heard every server's state-machine level: retried briefly, with
                # the same key, so the takeover applies once
                if time.monotonic() - started >= min(8.0, budget / 2):
                    raise
                time.sleep(0.3)
        for refused in result.get("refused") or []:
            self.ctx.log.warning("services: %s stops with this agent: %s", refused["name"], refused["why"])
        moved = result.get("moved") or []
        if not moved:
            return []
        self._wake.set()  # the node loop stops them here and reports them released now, not a period later
        left = budget - (time.monotonic() - started)
        done = api.wait_moved(self.ctx.cluster, moved, max(0.0, left))
        for m in done:
            if m["result"] == "running":
                self.ctx.log.info("services: %s handed over to %s before stopping (downtime %ss)", m["name"],
                                  m["holder"], m.get("downtime_s"))
            else:
                self.ctx.log.warning("services: %s not yet running on %s after %.0fs (%s); stopping anyway",
                                     m["name"], m["holder"], budget, m["result"])
        return done

    def subscriptions(self) -> dict:
        def renewed(event) -> None:
            self.book.heard(event.data["node_id"], time.monotonic())

        def changed(event) -> None:
            self._wake.set()

        def leader(event) -> None:
            self._book_fresh = False
            self._wake.set()

        def predicted_failure(event) -> None:
            # The leader hears of every node's critical prediction (Sentinel relays them); a planned takeover
            # before the failure is two short outages instead of one long one. Off by default, as auto_drain.
            if not self.ctx.options.get("takeover_on_prediction", False) or not self.ctx.cluster.is_leader():
                return
            node = event.data.get("node_id")
            if node:
                threading.Thread(target=self._take_over_predicted, args=(node, event.data), daemon=True,
                                 name="services-predicted").start()

        return {"service.renewed": renewed, "service.changed": changed, "ha.*": changed, "leader.changed": leader,
                "node.*": changed, "sentinel.predicted_failure": predicted_failure}

    def _take_over_predicted(self, node: str, prediction: dict) -> None:
        """A planned takeover of what `node` holds, once per prediction (the key makes a relayed repeat and a
        retry the same write)."""
        key = f"sentinel-takeover:{node}:{prediction.get('key', '')}"
        try:
            result = write_with_retry(self.ctx.cluster, "service.takeover", {"node": node}, key, retry_for=30.0)
        except Exception as exc:
            self.ctx.log.warning("services: the takeover of %s after a predicted failure failed: %s", node, exc)
            return
        moved = [m["name"] for m in result.get("moved") or []]
        if moved:
            self.ctx.log.warning("services: %s moved off %s before its predicted failure (%s)", ", ".join(moved),
                                 node, prediction.get("message") or prediction.get("kind", ""))

    # --- node ----------------------------------------------------------------------------------------------
    def _node_loop(self) -> None:
        me = self.ctx.cluster.node_id
        period = self.ctx.options.get("renew_interval", 1.0)
        last_error = ""
        while not self._stop.is_set():
            again = False
            try:
                with self._step_lock:
                    again = self.node_step(me)
                last_error = ""
            except Exception as exc:
                if str(exc) != last_error:  # once per kind of failure, not every second
                    self.ctx.log.warning("services: node step failed: %s", exc, exc_info=not last_error)
                last_error = str(exc)
            if not again:
                self._wake.wait(period)
            self._wake.clear()

    def node_step(self, me: str) -> bool:
        cluster, sup = self.ctx.cluster, self.supervisor
        sent = time.monotonic()
        rows = cluster.read("service.list", {}, level="leader")
        involved = [r for r in rows if me in (r["holder"], r["prev_holder"], r["home"], *r["candidates"])]

        def gate(row: dict) -> str:
            if not self.ctx.options.get("run_services", True):
                return "this node does not run services (plugins.services.run_services is false)"
            return leases.start_gate(row, me, self.lease.valid(time.monotonic()))

        sup.reconcile(rows, gate)
        networks = local_networks()
        if involved or networks != self._last_networks or \
                sent - self._last_report >= self.ctx.options.get("idle_report_period", 300.0):
            caps = self.caps
            if self.stopping:  # no kind runs here any more: no giveback, no move to this node while it stops
                caps = {**caps, "kinds": [], "why": {k: f"{me} is stopping" for k in ("shell", "container")}}
            cluster.write("service.report", {"node_id": me, "networks": networks, "caps": caps,
                                             "services": sup.report(involved)})
            self.lease.renewed(sent)
            # the watchdog fences at the same deadline as _fence_loop, and does so even if this process stops
            self.watch.pet(self.lease.renewed_at + self.lease.lease - self.lease.fence_early)
            self._last_report, self._last_networks = sent, networks
            if self.fenced_at is not None:
                self.ctx.log.warning("services lease renewed again after self-fencing")
                self.fenced_at = None
            # a start that waited only for this renewal goes ahead at once, not a period later
            return any(r["holder"] == me and sup.waiting.get(r["name"], "").startswith("no lease") for r in involved) \
                and self.lease.valid(time.monotonic()) and not self._stop.wait(0.05)
        return False

    def _fence_loop(self) -> None:
        while not self._stop.wait(0.2):
            sup = self.supervisor
            now = time.monotonic()
            if sup is None or not sup.instances or self.lease.valid(now):
                continue
            silent = self.lease.silent_for(now)
            why = (f"self-fenced: no committed lease renewal for {silent:.1f}s (no quorum reachable)"
                   if silent is not None else "self-fenced: no lease yet")
            if sup.fence(why):
                self.fenced_at = now
                self.ctx.log.warning("services stopped: %s", why)

    # --- leader --------------------------------------------------------------------------------------------
    def _leader_loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.ctx.cluster.is_leader():
                    self.leader_step()
                else:
                    self._book_fresh = False
            except Exception as exc:
                self.ctx.log.warning("services: leader step failed: %s", exc, exc_info=True)
            self._stop.wait(0.25)

    def _read_leader_view(self) -> dict:
        try:
            return self.ctx.cluster.read_local("service.leader", {})
        except Exception as exc:
            if not holds_no_replica(exc):
                raise
        return self.ctx.cluster.read("service.leader", {}, level="leader")

    def leader_step(self) -> list:
        view = self._read_leader_view()
        now = time.monotonic()
        if not self._book_fresh:
            self.book.start(view["liveness"], now)
            self._first_seen.clear()
            self._book_fresh = True
        moves = leases.decide(view, self.book, now, self._first_seen, self.ctx.options.get("giveback_timeout", 120.0))
        done = []
        for move in moves:
            note = self._power_off_first(move, view)
            if note:
                move = dataclasses.replace(move, reason=f"{move.reason}; {note}"[:2000])
            try:
                result = self.ctx.cluster.propose("service.move", move.args())
            except Exception as exc:
                self.ctx.log.info("service move not applied: %s", exc)
                continue
            done.append(result)
            if result.get("moved") and (move.fenced or move.reason.startswith("giveback failed")):
                self._notify(move, result)
        return done

    def _power_off_first(self, move: leases.Move, view: dict) -> str:
        """An unplanned takeover powers the silent holder off before its successor may start, where this node
        has a fence section for it: a node that only looked dead (a cut cable) cannot keep writing. The lease
        has already fenced it in software, so a fence agent that fails does not hold the takeover up; the
        move's reason says which of the two happened."""
        target = fence_target(move, view, self.ports)
        if not target:
            return ""
        try:
            self.ports.fence.power_off(target)
        except Exception as exc:
            self.ctx.log.warning("fence agent could not power off %s: %s", target, exc)
            return f"powering {target} off failed ({exc}); its lease alone fenced it"
        return f"{target} powered off by its fence agent"

    def _notify(self, move: leases.Move, result: dict) -> None:
        subject = (f"service {move.name} taken over by {move.holder}" if move.fenced
                   else f"service {move.name}: giveback failed")
        try:
            self.ctx.cluster.write("message.send", {
                "sender": self.ctx.cluster.node_id, "recipient": self.ctx.options.get("notify", "ops"),
                "subject": subject, "body": f"{move.reason} (epoch {result['epoch']}). See `cortex ha status`."},
                f"ha-{move.name}-{result['epoch']}")
        except Exception as exc:
            self.ctx.log.info("could not post the takeover message: %s", exc)

    # --- tools ---------------------------------------------------------------------------------------------
    def tools(self) -> list[Tool]:
        from cortex.services.tools import service_tools

        return service_tools(self)

"""The node agent: owns the data directory, the state store, Raft (on servers) and the join protocol.

Roles: a *server* votes in Raft and keeps a replica of the state; a *worker* never votes (a sleeping laptop
must not threaten quorum) and reaches the state through the servers over gRPC. Every write from any node
goes to the leader over gRPC, where it is stamped (id, time, term) and replicated (router.py).

`Agent` builds the parts and runs them: the shared facts of this node (member.py), the write/read path
(router.py), membership as the cluster decides it (membership/admission.py) and as this node asks for it
(membership/join.py), the listeners (serving.py, services.py), the background upkeep (upkeep.py), waking
from sleep (wake.py), status (status.py) and the plugins' view of it all (bridge.py).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex.appliance import capabilities, notify, sleepwatch
from cortex.client import set_process_credentials
from cortex.config import Config
from cortex.core.events import EventBus
from cortex.core.state import StateStore
from cortex.membership.admission import Admission
from cortex.membership.join import Joiner
from cortex.node.bridge import PluginBridge
from cortex.node.logs import fields
from cortex.node.member import AgentError, Member
from cortex.node.peers import Peers
from cortex.node.replicas import ReplicaWatch
from cortex.node.router import Router
from cortex.node.services import AdminService, ClusterService
from cortex.node.serving import Health, Servers
from cortex.node.status import IMAGE_VERSION, node_status
from cortex.node.upkeep import Upkeep
from cortex.node.wake import Wake
from cortex.plugins import PluginHost
from cortex.raft.consensus import RaftNode

__all__ = ["IMAGE_VERSION", "Agent", "AgentError", "Peers", "PluginBridge", "run"]

log = logging.getLogger("cortex.agent")


class Agent:
    def __init__(self, config: Config):
        self.events = EventBus()
        self.member = member = Member(config, self.events)
        set_process_credentials(member.certs.node_files)  # plugins calling other nodes present this node's cert
        self.router = Router(member)
        self.admission = Admission(member, self.router, restart_network=lambda: self.servers.restart_network())
        self.health = Health(member)
        member.on_raft_state_change = self.health.update
        self.joiner = Joiner(member, self.router, self.admission,
                             restart_network=lambda: self.servers.restart_network(), on_changed=self.health.update)
        self.bridge = PluginBridge(member, self.router, self.admission, self.status)
        self.plugins = PluginHost(config.plugins, self.bridge, self.events, member.data_dir, config.source)
        self.servers = Servers(member, self.plugins, self.health,
                               cluster_service=lambda: ClusterService(self.router, self.admission, self.status),
                               admin_service=lambda: AdminService(self.joiner))
        self.wake = Wake(member)
        self.replicas = ReplicaWatch(member)
        self.upkeep = Upkeep(member, self.router, self.admission, self.joiner, self.health, self.wake,
                             self.replicas)

    # --- what callers of the agent read ----------------------------------------------------------------------
    @property
    def config(self) -> Config:
        return self.member.config

    @property
    def store(self) -> StateStore | None:
        return self.member.store

    @property
    def raft(self) -> RaftNode | None:
        return self.member.raft

    @property
    def failed(self) -> threading.Event:
        """Set when the agent can no longer serve and must be restarted."""
        return self.upkeep.failed

    def status(self) -> pb.StatusResponse:
        return node_status(self.member, self.router, self.admission.liveness, self.replicas)

    def resume(self, trigger: str = "SIGUSR1", slept: float = 0.0) -> None:
        """The machine woke up (the clocks jumped apart; the image's sleep hook sends SIGUSR1; logind says
        PrepareForSleep(false)): rejoin at once."""
        self.wake.resume(trigger, slept)

    # --- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        member = self.member
        ident = member.identity
        if ident is not None:
            member.start_replica(ident)
        else:
            self.joiner.announce_wait()  # before the ports answer `cortex status`
        self.servers.serve()
        if ident is None:
            self.joiner.bootstrap_from_config()
        self.health.update()
        self.plugins.load()
        self.plugins.start()
        watchdog = notify.watchdog_interval()
        threading.Thread(target=self.upkeep.run, args=(watchdog,), name="agent-background", daemon=True).start()
        if watchdog is not None:
            threading.Thread(target=self.upkeep.feed_watchdog, args=(watchdog,), name="watchdog",
                             daemon=True).start()
        threading.Thread(target=sleepwatch.watch_clock,
                         args=(lambda slept: self.resume("clock jump", slept), member.stopping),
                         name="clock-watch", daemon=True).start()
        if sleepwatch.system_bus_present():
            threading.Thread(target=sleepwatch.watch, args=(self.wake.on_sleep_change, member.stopping),
                             name="logind-watch", daemon=True).start()
        ident = member.identity
        state = "member of " + ident.cluster_id if ident else "waiting for init or join"
        notify.sd_notify("READY=1", f"STATUS={state}")
        log.info("agent ready", extra=fields(grpc=self.config.grpc_address, role=self.config.role, state=state))

    def stop(self) -> None:
        member = self.member
        if member.stopping.is_set():
            return
        member.stopping.set()
        self.wake.now.set()
        notify.sd_notify("STOPPING=1")
        log.info("agent stopping")
        # A leader that stops (SIGTERM, systemd, a reboot) hands leadership to the most caught-up follower
        # first: the cluster goes on writing instead of waiting an election timeout for it to be missed.
        member.hand_over_leadership(timeout=3.0)
        self.plugins.stop()
        self.servers.stop()
        member.stop_replica()
        member.peers.close()
        # last (plugins may still call other nodes while stopping, e.g. an ephemeral node leaving): this node's
        # certificate must not outlive the agent as its process's default (an agent run inside a test process
        # would make every later client there present it)
        set_process_credentials(None)

    def wait(self) -> None:
        self.member.stopping.wait()


def run(config: Config) -> int:
    """Run the agent until SIGTERM/SIGINT."""
    notify.claim()
    capabilities.keep_to_self()  # before any thread starts: threads and children inherit the cleared set
    try:
        agent = Agent(config)
    except AgentError as exc:
        # A setup mistake a restart cannot fix: exit 2 like a config error (the unit does not restart on it).
        log.error("agent cannot start", extra=fields(error=str(exc)))
        print(f"cortex agent: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGUSR1, lambda signum, frame: agent.resume())
    try:
        agent.start()
    except Exception as exc:
        log.error("agent failed to start", extra=fields(error=str(exc)))
        agent.stop()
        return 1
    while not stop.wait(0.5) and not agent.failed.is_set():
        pass
    agent.stop()
    return 3 if agent.failed.is_set() else 0

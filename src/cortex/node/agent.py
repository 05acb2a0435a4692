"""The node agent: owns the data directory, the state store, Raft (on servers) and the join protocol.

Roles: a *server* votes in Raft and keeps a replica of the state; a *worker* never votes (a sleeping laptop
must not threaten quorum) and reaches the state through the servers over gRPC. Every write from any node
goes to the leader over gRPC, where it is stamped (id, time, term) and replicated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cortex import __version__
from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex._proto.cortex.v1 import cortex_pb2_grpc as pb_grpc
from cortex._proto.cortex.v1 import plugins_pb2_grpc as ppb_grpc
from cortex.appliance import notify, sleepwatch
from cortex.client import channel_options, secure_channel, set_process_credentials
from cortex.config import Config
from cortex.core import domain, durable
from cortex.core.commands import CommandError, Envelope, is_internal, parse_args_json, validate
from cortex.core.events import Event, EventBus
from cortex.core.state import StateStore
from cortex.membership import enroll, identity
from cortex.membership.identity import Identity
from cortex.membership.liveness import LivenessTracker
from cortex.node.logs import fields
from cortex.plugins import PluginHost
from cortex.plugins.service import PluginsService, network_caller, socket_caller
from cortex.raft.consensus import GroupCommitter, NotLeader, ProposalError, RaftNode, wait_until
from cortex.raft.keys import RotatingEncryptor
from cortex.security import authz, ca_rotation, revocation, rotation_driver, tls
from cortex.security.certs import NodeCerts

log = logging.getLogger("cortex.agent")

MAX_HOPS = 3
FORWARD_TIMEOUT = 8.0
WORKER_HEARTBEAT = 1.0
# After a wake the first heartbeat often finds the network not back yet (the NIC is re-initialised, the
# link renegotiated): retry this often, instead of once a round, until a server answers or RESUME_RETRY_FOR
# has passed. A wake noticed twice (the clock jump, then the sleep hook or logind) within RESUME_SAME_WAKE
# is one wake: its fresh connections are not thrown away again.
RESUME_RETRY = 0.1
RESUME_RETRY_FOR = 30.0
RESUME_SAME_WAKE = 10.0
# A background round is bounded by its calls' timeouts (seconds each); one that has not ended in this long is
# stuck, and the agent stops feeding systemd's watchdog so that it gets restarted.
BACKGROUND_STALL_LIMIT = 120.0
def _image_version(paths=("/usr/lib/os-release", "/etc/os-release")) -> str:
    """The appliance image's version when this agent runs from the Cortex image, else ""."""
    for path in paths:
        try:
            fields_ = dict(line.split("=", 1) for line in Path(path).read_text().splitlines() if "=" in line)
        except OSError:
            continue
        if fields_.get("IMAGE_ID", "").strip('"') == "cortex":
            return fields_.get("IMAGE_VERSION", "").strip('"')
        return ""
    return ""


IMAGE_VERSION = _image_version()
APPROVAL_POLL = 1.0  # how often a node whose join awaits an operator asks again
JOIN_REQUEST_FILE = "join-request.json"  # the pending request's address and secret (mode 0600)


class AgentError(Exception):
    """An error for the caller, carrying the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class Peers:
    """One gRPC channel per peer address, reused; channels reconnect by themselves after restarts."""

    def __init__(self, max_message_bytes: int, credentials=lambda: None):
        self._channels: dict[str, tuple[grpc.Channel, pb_grpc.ClusterStub]] = {}
        self._lock = threading.Lock()
        self._max = max_message_bytes
        self._credentials = credentials  # () -> tls.ClientFiles | None: this node's certificate

    def stub(self, address: str) -> pb_grpc.ClusterStub:
        with self._lock:
            entry = self._channels.get(address)
            if entry is None:
                files = self._credentials()
                if files is None:  # a member of a cluster created before mTLS
                    channel = grpc.insecure_channel(address, options=channel_options(self._max))
                else:
                    channel = secure_channel(address, files, channel_options(self._max))
                entry = (channel, pb_grpc.ClusterStub(channel))
                self._channels[address] = entry
            return entry[1]

    def close(self) -> None:
        with self._lock:
            for channel, _ in self._channels.values():
                channel.close()
            self._channels.clear()

    def reset(self) -> None:
        """Fresh channels from now on; the old ones close once calls still using them are done."""
        with self._lock:
            old, self._channels = self._channels, {}
        timer = threading.Timer(FORWARD_TIMEOUT * 3, lambda: [c.close() for c, _ in old.values()])
        timer.daemon = True
        timer.start()


class PluginBridge:
    """The agent as plugins see it (plugins.ClusterAPI): writes from any node, reads at a level."""

    LEVELS = {"stale": pb.STALE, "leader": pb.LEADER, "linearizable": pb.LINEARIZABLE}

    def __init__(self, agent: Agent):
        self._agent = agent
        self.node_id = agent.config.node_id
        self.role = agent.config.role
        self.grpc_address = agent.config.grpc_address

    def rpc(self, method: str, request):
        """Run a Cluster RPC (TransferLeadership, Leave, CreateToken, ...) as if this node had received it:
        forwarded to the leader where the RPC needs one."""
        return self._agent._dispatch_local(method, request)

    def write(self, command_type: str, args: dict, idempotency_key: str = "") -> dict:
        command = pb.Command(type=command_type, args_json=json.dumps(args).encode(), idempotency_key=idempotency_key)
        return json.loads(self._agent.write(command).result_json)

    def propose(self, command_type: str, args: dict, idempotency_key: str = "") -> dict:
        if not self.is_leader():
            raise AgentError(grpc.StatusCode.UNAVAILABLE, f"{command_type} is proposed by the leader only")
        return self._agent.propose(command_type, args, internal=True, idem=idempotency_key)

    def read(self, query: str, args: dict | None = None, level: str = "leader", min_index: int = 0) -> Any:
        """`min_index`: the answer must include the state at that log index (read-your-writes: pass the
        index a write returned). A stale read waits briefly for this replica to apply it, else asks the leader."""
        if level not in self.LEVELS:
            raise ValueError(f"read level must be one of {', '.join(self.LEVELS)}")
        if min_index and level == "stale":
            store = self._agent.store
            if store is None or not wait_until(lambda: store.last_applied >= min_index, 1.0, 0.005):
                level = "leader"  # a worker (its stale read may hit any server) or a lagging replica
        request = pb.ReadRequest(query=query, args_json=json.dumps(args or {}).encode(), level=self.LEVELS[level])
        return json.loads(self._agent.read(request).result_json)

    def read_local(self, query: str, args: dict | None = None) -> Any:
        """Servers: a query on this node's own replica, in process (no gRPC, no JSON round trip); what the
        leader reads this way is a leader read. For hot loops (the task scheduler); do not mutate the answer."""
        if self._agent.store is None:
            raise AgentError(grpc.StatusCode.FAILED_PRECONDITION, "only servers hold a copy of the state")
        return self._agent.store.query(query, args or {})

    def is_leader(self) -> bool:
        return self._agent.raft is not None and self._agent._is_leader()

    def snapshot(self, path: Path) -> int:
        """Servers: a consistent copy of the state database (SQLite online backup); returns its applied index."""
        if self._agent.store is None:
            raise AgentError(grpc.StatusCode.FAILED_PRECONDITION, "only servers hold a copy of the state")
        return self._agent.store.backup_to(path)

    def create_token(self, role: str, ttl_seconds: float, uses: int) -> dict:
        """A join token minted by the leader (forwarded from any node); the secret is returned only here."""
        r = self._agent.handle_create_token(pb.CreateTokenRequest(role=role, ttl_seconds=ttl_seconds, uses=uses))
        return {"token": r.token, "token_id": r.token_id, "expires_at": r.expires_at}

    def revoke_token(self, token_id: str) -> None:
        self._agent.handle_revoke_token(pb.RevokeTokenRequest(token_id=token_id))

    def remove_node(self, node_id: str, reason: str = "") -> bool:
        """Remove a node from membership: the `cortex leave` path (Raft config for servers; the node stays on
        record as `left` with `reason`, see membership.py)."""
        return self._agent.handle_leave(pb.LeaveRequest(node_id=node_id, reason=reason)).removed

    def status(self) -> dict:
        from google.protobuf.json_format import MessageToDict

        return MessageToDict(self._agent.status(), preserving_proto_field_name=True)


class Agent:
    def __init__(self, config: Config):
        self.config = config
        self.data_dir = config.data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.identity: Identity | None = identity.load(self.data_dir)
        if self.identity is not None and self.identity.node_id != config.node_id:
            # The cluster knows this data directory under another name: running on would register a second
            # node with the same Raft address. Renaming is leave + join, never a config edit.
            raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"node.id is {config.node_id!r} but {self.data_dir / identity.FILE_NAME} says this node "
                             f"joined as {self.identity.node_id!r}; restore node.id, or `cortex leave` first "
                             f"and join again under the new name")
        self._file_config = config
        if self.identity is not None and self.identity.raft_address:
            # promoted from worker: the cluster's record of this node's role and Raft address wins over the file
            self.config = config = dataclasses.replace(config, role=self.identity.role,
                                                       raft_address=self.identity.raft_address)
        self.store: StateStore | None = None
        self.raft: RaftNode | None = None
        self.committer: GroupCommitter | None = None
        self.certs = NodeCerts(self.data_dir, config.node_id)
        self.peers = Peers(config.max_message_bytes, self.certs.node_files)
        self.revoked = revocation.RevocationList()
        self._ca_next_check = 0.0
        set_process_credentials(self.certs.node_files)  # plugins calling other nodes present this node's cert
        self._lock = threading.RLock()  # guards membership transitions (init/join/leave)
        self._stop = threading.Event()
        self.failed = threading.Event()  # set when the agent can no longer serve and must be restarted
        self._wake = threading.Event()  # run a background step now (resume)
        self._background_round = time.monotonic()  # when the background loop last started a round
        self._approval_poller: threading.Thread | None = None
        self._resume_trigger = ""  # who reported the wake the background loop has yet to handle
        self._resume_slept = 0.0  # how long it slept, where known (the clock watch measures it)
        self._resumed_at: float | None = None  # a wake whose first heartbeat has not been answered yet
        self._last_wake = -RESUME_SAME_WAKE  # when the last wake was handled (monotonic)
        self.events = EventBus()
        self.plugins = PluginHost(config.plugins, PluginBridge(self), self.events, self.data_dir, config.source)
        self.liveness = LivenessTracker(config.liveness.suspect_after, config.liveness.offline_after)
        self._liveness_term = -1  # the term in which this node, as leader, started tracking liveness
        self._next_forget = 0.0  # when the leader next looks for records of nodes that left long ago
        self._promote_lock = threading.Lock()  # one promotion (Raft membership change) at a time
        self._liveness_lock = threading.Lock()
        self._last_leader = ""
        self._server_addresses: list[str] = list(self.identity.server_grpc_addresses) if self.identity else []
        self.waiting_for = ""
        self.enroll_pin = ""  # the CA pin of the last enrollment port this node talked to (shown to operators)
        self._grpc: grpc.Server | None = None
        self._enroll: grpc.Server | None = None
        self._admin: grpc.Server | None = None
        self._health = health.HealthServicer()

    # --- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.identity is not None:
            self._start_member()
        self._serve()
        if self.identity is None:
            self._bootstrap_from_config()
        self._update_health()
        self.plugins.load()
        self.plugins.start()
        watchdog = notify.watchdog_interval()
        threading.Thread(target=self._background, args=(watchdog,), name="agent-background", daemon=True).start()
        if watchdog is not None:
            threading.Thread(target=self._feed_watchdog, args=(watchdog,), name="watchdog", daemon=True).start()
        threading.Thread(target=sleepwatch.watch_clock,
                         args=(lambda slept: self.resume("clock jump", slept), self._stop),
                         name="clock-watch", daemon=True).start()
        if sleepwatch.system_bus_present():
            threading.Thread(target=sleepwatch.watch, args=(self._on_sleep_change, self._stop),
                             name="logind-watch", daemon=True).start()
        state = "member of " + self.identity.cluster_id if self.identity else "waiting for init or join"
        notify.sd_notify("READY=1", f"STATUS={state}")
        log.info("agent ready", extra=fields(grpc=self.config.grpc_address, role=self.config.role, state=state))

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        notify.sd_notify("STOPPING=1")
        log.info("agent stopping")
        # A leader that stops (SIGTERM, systemd, a reboot) hands leadership to the most caught-up follower
        # first: the cluster goes on writing instead of waiting an election timeout for it to be missed.
        self._hand_over_leadership(timeout=3.0)
        self.plugins.stop()
        if self._grpc:
            self._grpc.stop(grace=2).wait()
        if self._enroll:
            self._enroll.stop(grace=1).wait()
        if self._admin:
            self._admin.stop(grace=1).wait()
        self._stop_member()
        self.peers.close()
        # last (plugins may still call other nodes while stopping, e.g. an ephemeral node leaving): this node's
        # certificate must not outlive the agent as its process's default (an agent run inside a test process
        # would make every later client there present it)
        set_process_credentials(None)

    def wait(self) -> None:
        self._stop.wait()

    def _serve(self) -> None:
        self._serve_network()
        self._serve_admin()

    def _restart_network(self) -> None:
        """Membership changed (init, join, leave): serve the ports with the credentials that now apply."""
        old, old_enroll = self._grpc, self._enroll
        if old is not None:
            old.stop(grace=0.5).wait()
        if old_enroll is not None:
            old_enroll.stop(grace=0.5).wait()
        self._grpc = self._enroll = None
        deadline = time.monotonic() + 5
        while True:  # the port may take a moment to be free again
            try:
                self._serve_network()
                return
            except RuntimeError:
                for server in (self._grpc, self._enroll):  # release what this attempt bound
                    if server is not None:
                        server.stop(0)
                self._grpc = self._enroll = None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _serve_network(self) -> None:
        """Members: mutual TLS on the gRPC port (a client certificate of the cluster CA, role checked per
        RPC), and on servers the enrollment port for nodes that join. Not a member: plaintext, since there is
        nothing to protect yet and every RPC but Status answers "not in a cluster"."""
        secure = self.identity is not None and self.certs.ready()
        if self.identity is not None and not secure:
            log.warning("this member has no certificate (cluster created before mTLS): serving plaintext; "
                        "create the cluster again to get mTLS")
        opts = [("grpc.max_send_message_length", self.config.max_message_bytes),
                ("grpc.max_receive_message_length", self.config.max_message_bytes),
                ("grpc.so_reuseport", 0), *ALLOW_CLIENT_PINGS]
        interceptors = [authz.RoleCheck(lambda: self.identity.cluster_id if self.identity else "",
                                        self.revoked.refusal)] if secure else []
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="grpc"),
                                 options=opts, maximum_concurrent_rpcs=1024, interceptors=interceptors)
        pb_grpc.add_ClusterServicer_to_server(ClusterService(self), self._grpc)
        ppb_grpc.add_PluginsServicer_to_server(PluginsService(self.plugins, self.config.node_id,
                                                              network_caller(self.plugins), self._stop.is_set),
                                               self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        reflection.enable_server_reflection(
            (pb.DESCRIPTOR.services_by_name["Cluster"].full_name, "cortex.v1.Plugins", health.SERVICE_NAME,
             reflection.SERVICE_NAME),
            self._grpc,
        )
        if secure:
            def add_port(address: str) -> int:
                # one credentials object per port: each listener's fetcher must hand out its own first config
                return self._grpc.add_secure_port(address, authz.ServerCredentials(self.certs.dir).credentials())
        else:
            add_port = self._grpc.add_insecure_port
        if add_port(self.config.grpc_address) == 0:
            raise RuntimeError(f"cannot listen on {self.config.grpc_address} (in use?)")
        local = self.config.loopback_grpc_address
        if local and add_port(local) == 0:
            log.warning("cannot also listen on loopback", extra=fields(address=local))
        if secure and self.identity.role == "server":
            self._serve_enrollment(opts)
        self._grpc.start()

    def _serve_enrollment(self, opts) -> None:
        self._enroll = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="enroll"),
                                   options=opts, maximum_concurrent_rpcs=64, interceptors=[authz.OnlyJoin()])
        pb_grpc.add_ClusterServicer_to_server(ClusterService(self), self._enroll)
        address = authz.enroll_address(self.config.grpc_address)
        if self._enroll.add_secure_port(address, authz.enroll_server_credentials(self.certs.dir)) == 0:
            raise RuntimeError(f"cannot listen on {address} (the enrollment port, gRPC port + 2; in use?)")
        self._enroll.start()

    def _serve_admin(self) -> None:
        sock = self.config.admin_socket_path
        sock.parent.mkdir(parents=True, exist_ok=True)
        sock.unlink(missing_ok=True)
        # a long call on the socket (a rollout's pre-flight downloads a release) must survive the CLI's pings
        self._admin = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="admin"),
                                  options=ALLOW_CLIENT_PINGS)
        pb_grpc.add_AdminServicer_to_server(AdminService(self), self._admin)
        ppb_grpc.add_PluginsServicer_to_server(PluginsService(self.plugins, self.config.node_id, socket_caller,
                                                              self._stop.is_set), self._admin)
        self._admin.add_insecure_port(f"unix:{sock}")
        self._admin.start()
        sock.chmod(0o600)

    def _bootstrap_from_config(self) -> None:
        boot = self.config.bootstrap
        pending = self._pending_request()
        if pending is not None:  # restarted while an operator had not yet decided: keep asking
            self._start_approval_poller(pending["address"])
            return
        if boot.init:
            token = self.init_cluster()[1]
            (self.data_dir / "join-token").write_text(token + "\n")
            (self.data_dir / "join-token").chmod(0o600)
        elif boot.join is not None:
            threading.Thread(target=self._join_from_config, name="bootstrap-join", daemon=True).start()
        else:
            self.waiting_for = boot.wait_reason or "cortex init (new cluster) or cortex join ADDRESS --token TOKEN"
            if boot.wait_reason:
                log.warning("waiting", extra=fields(reason=boot.wait_reason))

    def _join_from_config(self) -> None:
        join = self.config.bootstrap.join
        deadline = time.monotonic() + 300
        while not self._stop.is_set() and self.identity is None and time.monotonic() < deadline:
            token = join.token
            if not token and join.token_file:
                try:
                    token = Path(join.token_file).read_text().strip()
                except OSError:
                    self.waiting_for = f"join token file {join.token_file}"
                    time.sleep(0.2)
                    continue
            try:
                self.join_cluster(join.address, token, insecure_skip_ca_pin=join.insecure_skip_ca_pin)
                return
            except AgentError as exc:
                self.waiting_for = f"joining {join.address}: {exc}"
                log.warning("join attempt failed", extra=fields(address=join.address, error=str(exc)))
                if exc.code == grpc.StatusCode.PERMISSION_DENIED:
                    return  # a refused token does not get better by retrying
                time.sleep(0.5)

    def _start_member(self) -> None:
        ident = self.identity
        if ident.role == "server":
            self.store = StateStore(self.data_dir / "state.db", listener=self._on_replicated_event)
            known = [n["raft_address"] for n in self.store.query("nodes", {})
                     if n["role"] == "server" and n["raft_address"]]
            peers = sorted(set(known or ident.raft_peers) - {self.config.raft_address})
            self.raft_keys = RotatingEncryptor(ident.raft_secret, self.certs.ca()[1], self._raft_generation())
            rotation_driver.restore_raft_keys(self.certs, self.raft_keys)
            self.raft = RaftNode(self.store, self.config.raft_address, peers, self.config.raft, self.raft_keys,
                                 self.data_dir, on_state_change=self._update_health)
            self.committer = GroupCommitter(self.raft)
        self.waiting_for = ""

    def _stop_member(self) -> None:
        if self.committer is not None:
            self.committer.close()
            self.committer = None
        if self.raft is not None:
            # Let go of it before destroying it: the background thread takes a tick thread that has ended
            # under a live self.raft for a crash and exits the agent (a server that left then stopped with
            # an error, and its unit stayed loaded as failed).
            raft, self.raft = self.raft, None
            raft.destroy()
            wait_until(lambda: not raft.tick_thread_alive(), 5)
        if self.store is not None:
            self.store.close()
            self.store = None

    def _on_replicated_event(self, event_type: str, data: dict, index: int) -> None:
        # event/index win over same-named keys in the payload (a keyword clash here would break apply)
        log.info("event", extra=fields(**{**data, "event": event_type, "index": index}))
        self.events.publish(Event(event_type, data, index=index))

    def _update_health(self) -> None:
        if self.raft is not None:
            leader = self.raft.leader_address()
            if leader != self._last_leader:
                self._last_leader = leader
                if leader:
                    log.info("event", extra=fields(event="leader.changed", leader=leader, term=self.raft.term()))
                    self.events.publish(Event("leader.changed", {"leader": leader, "term": self.raft.term()}))
        serving = self.identity is not None and (self.raft is None or bool(self.raft.leader_address()))
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self._health.set("", status)
        self._health.set("cortex.v1.Cluster", status)

    def _feed_watchdog(self, interval: float) -> None:
        """Feed systemd's watchdog from a thread of its own. One slow background round must not get a healthy
        agent killed: a call to a frozen leader waits out its timeout, and a server's join waits for the cluster
        to commit it (an agent aborted by WatchdogSec=30 in the middle of a slow join, CI). A background loop
        that has not started a round for BACKGROUND_STALL_LIMIT is stuck: feeding stops and systemd restarts
        the agent, as it does within WatchdogSec for a process that is frozen whole."""
        said = False
        while not self._stop.wait(interval):
            stalled = time.monotonic() - self._background_round
            if stalled <= BACKGROUND_STALL_LIMIT:
                notify.sd_notify("WATCHDOG=1")
                said = False
            elif not said:
                log.critical("background loop stuck; no longer feeding the systemd watchdog",
                             extra=fields(stuck_seconds=round(stalled)))
                said = True

    def _background(self, watchdog: float | None) -> None:
        """Worker heartbeats, health refresh, resume detection, certificate and key upkeep."""
        # A watchdog shorter than the heartbeat shortens the rounds too (a test's 10 ms watchdog runs them often)
        interval = WORKER_HEARTBEAT if watchdog is None else min(WORKER_HEARTBEAT, watchdog)
        heartbeat_failing = False
        while not self._stop.is_set():
            self._background_round = time.monotonic()
            woken = self._wake.wait(_round_wait(interval, self._resumed_at, time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                return
            raft = self.raft
            if raft is not None and not raft.tick_thread_alive():
                # Raft stopped ticking (it should never): exit so the supervisor restarts a clean process
                # instead of leaving a node that answers gRPC but no longer takes part in consensus.
                log.critical("raft tick thread died; exiting for a restart")
                self.failed.set()
                return
            if woken and self._resume_trigger:  # the clock watch, the sleep hook or logind said it woke
                self._after_resume()
            try:
                self._update_health()
                if self.identity is not None and (self.identity.pending_token or self.identity.pending_request_secret) \
                        and self._lock.acquire(blocking=False):  # held: the joining thread is finishing it itself
                    try:
                        self._finish_join(timeout=5)
                    finally:
                        self._lock.release()
                if self.identity is not None and self._sends_heartbeats():
                    self._worker_heartbeat()
                self._raft_key_step()
                self._renew_step()
                self._revocation_step()
                self._ca_rotation_step()
                self._liveness_step()
                if heartbeat_failing:
                    log.info("servers reachable again")
                heartbeat_failing = False
            except AgentError as exc:
                if not heartbeat_failing:  # say it once, not every second
                    log.warning("cannot reach the servers", extra=fields(error=str(exc)))
                heartbeat_failing = True
            except Exception:
                log.exception("background step failed")

    def resume(self, trigger: str = "SIGUSR1", slept: float = 0.0) -> None:
        """The machine woke up (the clocks jumped apart; the image's sleep hook sends SIGUSR1; logind says
        PrepareForSleep(false)): rejoin at once."""
        self._resume_slept = max(self._resume_slept, slept)
        self._resume_trigger = trigger
        self._wake.set()

    def _on_sleep_change(self, going_to_sleep: bool) -> None:
        if going_to_sleep:
            log.info("logind: suspending")
        else:
            self.resume("logind")

    def _after_resume(self) -> None:
        trigger, slept = self._resume_trigger, self._resume_slept
        self._resume_trigger, self._resume_slept = "", 0.0
        now = time.monotonic()
        if slept <= sleepwatch.SLEPT_THRESHOLD and now - self._last_wake < RESUME_SAME_WAKE:
            # the second notice of a wake already handled (the clock jump came first): keep its connections
            log.info("resumed: already rejoining", extra=fields(trigger=trigger))
            return
        log.info("resumed: rejoining", extra=fields(slept_seconds=round(slept, 1), trigger=trigger))
        self._last_wake = now
        if self.identity is not None and self._sends_heartbeats():  # servers are heard through Raft instead
            self._resumed_at = now
        self.peers.reset()  # fresh connections: the old ones may point at sockets that died while asleep

    def _liveness_step(self) -> None:
        """Leader only: decide suspect/offline/alive from heartbeats and replicate the transitions."""
        with self._liveness_lock:
            self._liveness_step_locked()

    def _liveness_step_locked(self) -> None:
        if not self._is_leader():
            self._liveness_term = -1
            return
        now, term = time.monotonic(), self.raft.term()
        nodes = [n for n in self.store.query("nodes", {}) if n["id"] != self.config.node_id]
        if self._liveness_term != term:
            self.liveness.start({n["id"]: n["liveness"] for n in nodes}, now)
            self._liveness_term = term
        raft = self.raft.status()
        for n in nodes:
            self.liveness.track(n["id"], n["liveness"], now)
            if n["role"] == "server" and raft.connected.get(n["raft_address"]):
                self.liveness.heard(n["id"], now)
        for transition in self.liveness.evaluate(now):
            self.propose("node.liveness", {"node_id": transition.node_id, "state": transition.new}, internal=True)
            self.liveness.apply(transition)
        self._forget_step()

    def _forget_step(self) -> None:
        """Leader: drop the records of nodes that left more than liveness.forget_left_after ago."""
        now, keep = time.time(), self.config.liveness.forget_left_after
        if now < self._next_forget:
            return
        self._next_forget = now + min(60.0, max(0.5, keep / 4))
        for node in self.store.query("member.list", {"left_only": True}):
            if node["left_at"] is not None and node["left_at"] < now - keep:
                self.propose("member.forget", {"node_id": node["id"]}, internal=True)
                log.info("forgot a node that left", extra=fields(node=node["id"], left_at=node["left_at"]))

    def _sends_heartbeats(self) -> bool:
        """Workers do; so does a promoted node until the cluster records it as a server (the leader then
        hears it through its Raft connection)."""
        if self.identity.role == "worker":
            return True
        if self.store is None or not self.identity.raft_address:
            return False
        me = next((n for n in self.store.query("nodes", {}) if n["id"] == self.config.node_id), None)
        return me is not None and me["role"] == "worker"

    def _worker_heartbeat(self) -> None:
        request = pb.HeartbeatRequest(node_id=self.config.node_id)
        try:
            response = self._to_servers(lambda stub: stub.Heartbeat(request, timeout=2))
        except AgentError:
            if self._resumed_at is not None and time.monotonic() - self._resumed_at > RESUME_RETRY_FOR:
                self._resumed_at = None  # the servers stay out of reach: back to one heartbeat a round
            raise
        if self._resumed_at is not None:
            log.info("resumed: the servers answered", extra=fields(
                after_ms=round((time.monotonic() - self._resumed_at) * 1000), server=self._server_addresses[0]))
            self._resumed_at = None
        if response.server_grpc_addresses:
            self._server_addresses = list(response.server_grpc_addresses)

    # --- membership ----------------------------------------------------------------------------------
    def init_cluster(self) -> tuple[str, str]:
        """Create a new cluster with this node as its first server. Returns (cluster id, join token)."""
        with self._lock:
            if self.identity is not None:
                raise AgentError(grpc.StatusCode.ALREADY_EXISTS,
                                 f"this node already belongs to cluster {self.identity.cluster_id}; "
                                 "run `cortex leave` first to start another")
            if self.config.role != "server":
                raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                                 "only a server can create a cluster; set node.role: server")
            cluster_id = identity.new_cluster_id()
            ident = Identity(cluster_id=cluster_id, node_id=self.config.node_id, role="server",
                             raft_secret=identity.new_secret(), raft_peers=[self.config.raft_address],
                             server_grpc_addresses=[self.config.grpc_address])
            self._wipe_state()
            self.certs.create_cluster(cluster_id)
            identity.save(self.data_dir, ident)
            self.identity = ident
            self._start_member()
            self._restart_network()
            if not wait_until(self.raft.is_leader, 15):
                raise AgentError(grpc.StatusCode.UNAVAILABLE, "the new cluster did not elect this node in 15 s")
            token = identity.new_join_token(tls.ca_pin(self.certs.ca()[0]))
            for command_type, args in (
                ("cluster.init", {"cluster_id": cluster_id}),
                ("node.register", {"node_id": self.config.node_id, "role": "server",
                                   "grpc_address": self.config.grpc_address,
                                   "raft_address": self.config.raft_address}),
                ("token.add", {"token_hash": identity.token_hash(token), "role": "server"}),
            ):
                self.propose(command_type, args, internal=True)
            log.info("cluster created", extra=fields(cluster_id=cluster_id))
            self._update_health()
            return cluster_id, token

    def join_cluster(self, address: str, token: str, timeout: float = 60.0, insecure_skip_ca_pin: bool = False) -> str:
        """Join the cluster that the member at `address` belongs to; returns once this node is registered.

        Without a token the join is a request an operator approves: this returns "" at once while it is
        pending, and a poller keeps asking until the request is approved or rejected.
        """
        cluster_id = self._join_once(address, token, timeout, insecure_skip_ca_pin)
        if not cluster_id:
            self._start_approval_poller(address)
        return cluster_id

    def _join_once(self, address: str, token: str, timeout: float, insecure_skip_ca_pin: bool = False) -> str:
        with self._lock:
            if self.identity is not None:
                raise AgentError(grpc.StatusCode.ALREADY_EXISTS,
                                 f"this node already belongs to cluster {self.identity.cluster_id}")
            secret = "" if token else self._request_secret(address)
            key = tls.new_key_pem()
            response = self._call_join(address, token, secret, csr=tls.new_csr(key, self.config.node_id),
                                       insecure_skip_ca_pin=insecure_skip_ca_pin)
            if response.admission == "pending":
                self.waiting_for = (f"approval of this node's join request to {address}: on a member run "
                                    f"`cortex nodes approve {self.config.node_id}` once `cortex secrets ca` there "
                                    f"shows the CA pin this node saw: {self.enroll_pin}")
                return ""
            if response.admission == "rejected":
                (self.data_dir / JOIN_REQUEST_FILE).unlink(missing_ok=True)
                self.waiting_for = "an operator rejected this node's join request; ask them, then join again"
                raise AgentError(grpc.StatusCode.PERMISSION_DENIED, "the join request was rejected by an operator")
            ident = Identity(cluster_id=response.cluster_id, node_id=self.config.node_id, role=self.config.role,
                             raft_secret=response.raft_secret, raft_peers=list(response.raft_peers),
                             server_grpc_addresses=list(response.server_grpc_addresses),
                             pending_token="" if response.admitted else token,
                             pending_request_secret="" if response.admitted else secret,
                             join_address="" if response.admitted else address)
            if not response.cert_pem:
                raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"{address} admitted this node but returned no certificate (a cluster older than "
                                 "mTLS?); upgrade its servers first")
            self._wipe_state()
            try:
                self.certs.install(key, response.cert_pem, response.ca_cert_pem, response.ca_key_pem,
                                   response.cluster_id)
            except tls.TLSError as exc:
                raise AgentError(grpc.StatusCode.FAILED_PRECONDITION, f"join: {exc}") from None
            identity.save(self.data_dir, ident)
            (self.data_dir / JOIN_REQUEST_FILE).unlink(missing_ok=True)
            self.identity = ident
            self._server_addresses = list(ident.server_grpc_addresses)
            self._start_member()
            self._restart_network()
            if not response.admitted:
                self._finish_join(timeout)
            log.info("joined cluster", extra=fields(cluster_id=ident.cluster_id, via=address, role=ident.role))
            self._update_health()
            return ident.cluster_id

    def _pending_request(self) -> dict | None:
        try:
            return json.loads((self.data_dir / JOIN_REQUEST_FILE).read_text())
        except (OSError, ValueError):
            return None

    def _record_request_pin(self, pin: str) -> None:
        pending = self._pending_request() or {}
        path = self.data_dir / JOIN_REQUEST_FILE
        durable.write_atomic(path, json.dumps({**pending, "ca_pin": pin}).encode(), 0o600)

    def _request_secret(self, address: str) -> str:
        """This node's join-request secret, kept on disk so a restart keeps its place in the queue."""
        pending = self._pending_request()
        if pending is not None and pending.get("address") == address:
            return pending["secret"]
        secret = identity.new_secret()
        path = self.data_dir / JOIN_REQUEST_FILE
        fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"address": address, "secret": secret}, f)
        os.replace(path.with_suffix(".tmp"), path)
        return secret

    def _start_approval_poller(self, address: str) -> None:
        with self._lock:
            if self._approval_poller is not None and self._approval_poller.is_alive():
                return
            self._approval_poller = threading.Thread(target=self._await_approval, args=(address,),
                                                     name="join-approval", daemon=True)
            self._approval_poller.start()

    def _await_approval(self, address: str) -> None:
        while not self._stop.wait(APPROVAL_POLL) and self.identity is None:
            try:
                if self._join_once(address, "", timeout=60):
                    return
            except AgentError as exc:
                if exc.code == grpc.StatusCode.PERMISSION_DENIED:
                    log.warning("join request rejected", extra=fields(address=address))
                    return
                log.info("join request not answered yet", extra=fields(address=address, error=str(exc)))

    def _join_request(self, token: str, secret: str = "", csr: bytes = b"") -> pb.JoinRequest:
        return pb.JoinRequest(node_id=self.config.node_id, role=self.config.role,
                              grpc_address=self.config.grpc_address,
                              raft_address=self.config.raft_address if self.config.role == "server" else "",
                              token=token, request_secret=secret, csr_pem=csr)

    def _call_join(self, address: str, token: str, secret: str = "", csr: bytes = b"",
                   insecure_skip_ca_pin: bool = False) -> pb.JoinResponse:
        """Join goes to the server's enrollment port (TLS; this node has no certificate yet), verified against
        the CA its token pins (enroll.py) before the token is sent."""
        request = self._join_request(token, secret, csr)
        # After the first step of a join the node has the CA; an approval join pins what it saw first.
        known = tls.ca_pin(self.certs.ca()[0]) if self.identity is not None and self.certs.ready() else \
            (self._pending_request() or {}).get("ca_pin", "") if secret else ""
        try:
            pin = enroll.pin_for(token, known, insecure_skip_ca_pin)
            response, self.enroll_pin = enroll.call_join(address, request, pin,
                                                         channel_options(self.config.max_message_bytes),
                                                         FORWARD_TIMEOUT * 2)
        except enroll.EnrollError as exc:
            raise AgentError(exc.code, str(exc)) from None
        if secret and not known and self._pending_request() is not None:
            self._record_request_pin(self.enroll_pin)
        return response

    def _finish_join(self, timeout: float) -> None:
        """Second step of a server's join: ask again (Raft now running) until the cluster registers us."""
        ident = self.identity
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.raft is not None and self.raft.is_leader():
                    # A joiner votes, and can be elected, from its first step on (a new server that timed out
                    # before the leader reached it, or a leadership transfer). Then no one else can register it:
                    # they forward joins to the leader and find no record of it (VM cluster, CI). So do it here.
                    response = self.handle_join(self._join_request(ident.pending_token, ident.pending_request_secret))
                else:
                    response = self._call_join(ident.join_address, ident.pending_token, ident.pending_request_secret)
                if response.admitted:
                    break
            except AgentError as exc:
                if exc.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                        or time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise AgentError(grpc.StatusCode.DEADLINE_EXCEEDED, "the cluster did not register this node in time")
            time.sleep(0.1)
        self.identity = Identity(**{**ident.__dict__, "pending_token": "", "pending_request_secret": "", "join_address": "",
                                    "raft_peers": list(response.raft_peers)})
        identity.save(self.data_dir, self.identity)

    def leave_cluster(self) -> None:
        with self._lock:
            if self.identity is None:
                raise AgentError(grpc.StatusCode.FAILED_PRECONDITION, "this node is not in a cluster")
            self._hand_over_leadership(timeout=10.0)
            request = pb.LeaveRequest(node_id=self.config.node_id, reason="left (cortex leave)")
            if self.raft is not None and len(self.raft.members()) == 1:
                pass  # the last server: the cluster ends with it
            else:
                self._retry_forwarding(lambda: self.handle_leave(request))
            self._stop_member()
            identity.remove(self.data_dir)
            self._wipe_state()
            self.certs.remove()
            self.identity = None
            self.config = self._file_config  # a promoted node joins again as its config file says
            self.peers.reset()
            self._restart_network()
            self.waiting_for = "cortex init (new cluster) or cortex join ADDRESS --token TOKEN"
            self._update_health()
            log.info("left the cluster")

    def _hand_over_leadership(self, timeout: float) -> bool:
        """Leader: make the most caught-up follower leader (Raft TimeoutNow) and wait until another server is
        known as leader. A follower still catching up is refused by Raft, and a target that does not win its
        election leaves this node to win the next one: ask again until `timeout` passes."""
        raft = self.raft
        if raft is None or not raft.is_leader() or not any(raft.status().connected.values()):
            return False  # not the leader, or no follower to hand over to (alone, or the others are down)
        me = self.config.raft_address
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = raft.leader_address()
            if leader and leader != me:
                break
            if raft.is_leader():
                try:
                    raft.transfer_leadership_to(None, timeout=max(0.1, deadline - time.monotonic()))
                except ProposalError:
                    pass  # no follower in sync yet, or a transfer already under way
            time.sleep(0.01)
        leader = raft.leader_address()
        moved = bool(leader) and leader != me
        log.info("leadership handed over" if moved else "leadership hand-over did not complete",
                 extra=fields(new_leader=leader, term=raft.term()))
        return moved

    def _wipe_state(self) -> None:
        for name in ("state.db", "state.db-wal", "state.db-shm", "raft.journal", "raft.journal.meta",
                     "raft.snapshot", "raft-members.json", "join-token"):
            path = self.data_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def _retry_forwarding(self, fn, timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                return fn()
            except AgentError as exc:
                if exc.code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    # --- the leader's side of join/leave ------------------------------------------------------------------
    def handle_join(self, request: pb.JoinRequest) -> pb.JoinResponse:
        self._require_member()
        if not self._is_leader():
            return self._forward("Join", request)
        try:
            validate("node.register", {"node_id": request.node_id, "role": request.role,
                                       "grpc_address": request.grpc_address, "raft_address": request.raft_address})
        except CommandError as exc:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, f"bad join request: {exc}") from None
        if request.role == "server" and not request.raft_address:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, "a server must give its raft address")
        nodes = {n["id"]: n for n in self.store.query("nodes", {})}
        existing = nodes.get(request.node_id)
        same = existing is not None and (existing["role"], existing["grpc_address"], existing["raft_address"]) == (
            request.role, request.grpc_address, request.raft_address)
        token_hash = identity.token_hash(request.token) if request.token else ""
        if not same:
            if existing is not None:
                raise AgentError(grpc.StatusCode.ALREADY_EXISTS,
                                 f"node id {request.node_id!r} is taken by a member at {existing['grpc_address']}; "
                                 "choose another node.id or remove the old node first")
            if not request.token:
                admission = self._approval_state(request)
                if admission != "approved":
                    return pb.JoinResponse(admission=admission)
            else:
                problem = self.store.query("token.check", {"token_hash": token_hash, "role": request.role,
                                                           "now": time.time()})["problem"]
                if problem:
                    log.warning("join refused", extra=fields(node=request.node_id, reason=problem))
                    raise AgentError(grpc.StatusCode.PERMISSION_DENIED, problem)
        if same and request.csr_pem:
            # A replayed (or re-sent) join of a registered node gets nothing: no certificate, no secret.
            log.warning("join refused", extra=fields(node=request.node_id, reason="already a member"))
            raise AgentError(grpc.StatusCode.ALREADY_EXISTS,
                             f"node {request.node_id!r} is already a member; a join is not repeated. If that node "
                             "lost its data: `cortex nodes remove` it, then join again")
        response = pb.JoinResponse(
            cluster_id=self.identity.cluster_id,
            raft_secret=self.identity.raft_secret if request.role == "server" and not same else "",
            server_grpc_addresses=self._server_grpc_addresses(),
        )
        if request.csr_pem:
            try:
                cert, ca = self.certs.sign(request.csr_pem, request.node_id, request.role, self.identity.cluster_id)
            except tls.TLSError as exc:
                raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, f"bad join request: {exc}") from None
            response.cert_pem, response.ca_cert_pem = cert, ca
            if request.role == "server":
                response.ca_key_pem = self.certs.ca()[1]
        if request.role == "server" and request.raft_address not in self.raft.members():
            servers = [n for n in nodes.values() if n["role"] == "server"]
            if len(servers) >= 5:
                raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                                 "the cluster already has 5 voting servers; join as a worker")
            # Step one: append the configuration change. Growing from one server it can only commit once
            # the newcomer runs, so do not wait for the commit; the newcomer comes back for step two.
            self._raft_call(lambda: self.raft.start_add_member(request.raft_address))
            response.raft_peers.extend(self.raft.members())
            return response
        args = {"node_id": request.node_id, "role": request.role, "grpc_address": request.grpc_address,
                "raft_address": request.raft_address, "token_hash": "" if same else token_hash}
        self.propose("node.register", args, internal=True)
        log.info("node admitted", extra=fields(joiner=request.node_id, role=request.role))
        response.raft_peers.extend(self.raft.members())
        response.admitted = True
        return response

    def _approval_state(self, request: pb.JoinRequest) -> str:
        """pending / approved / rejected for a join without a token; records a new request as pending."""
        if len(request.request_secret) < 16:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT,
                             "a join without a token needs a request_secret of at least 16 characters "
                             "(cortex join sends one), or give a join token")
        secret_hash = identity.token_hash(request.request_secret)
        rows = self.store.query("join_requests", {"node_id": request.node_id})
        if rows and self.store.query("join_request.secret", {"node_id": request.node_id}) == secret_hash:
            row = rows[0]
            if row["state"] == "approved" and (row["role"], row["grpc_address"], row["raft_address"]) != (
                    request.role, request.grpc_address, request.raft_address):
                raise AgentError(grpc.StatusCode.PERMISSION_DENIED,
                                 f"approved as a {row['role']} at {row['grpc_address']}; join with those settings")
            return row["state"]
        result = self.propose("node.request", {"node_id": request.node_id, "role": request.role,
                                               "grpc_address": request.grpc_address,
                                               "raft_address": request.raft_address, "secret_hash": secret_hash},
                              internal=True)
        log.info("join request pending approval", extra=fields(joiner=request.node_id, role=request.role))
        return result["state"]

    def handle_leave(self, request: pb.LeaveRequest) -> pb.LeaveResponse:
        self._require_member()
        if not self._is_leader():
            return self._forward("Leave", request)
        node = next((n for n in self.store.query("nodes", {}) if n["id"] == request.node_id), None)
        if node is None:
            return pb.LeaveResponse(removed=False)  # already gone (or left): a retried removal is not an error
        # Revoke first: a removal interrupted after this leaves a member without credentials (fail closed)
        # instead of a removed node with working ones. Its certificates were issued at most a lifetime ago.
        for name in (request.node_id, f"admin@{request.node_id}"):  # a server's local CLI certificate too
            self.propose("cert.revoke", {"name": name, "before": None, "reason": "removed",
                                         "until": time.time() + tls.cert_lifetime_days() * 86400 + 3600})
        if node["role"] == "server" and node["raft_address"]:
            if node["raft_address"] == self.config.raft_address:
                raise AgentError(grpc.StatusCode.UNAVAILABLE, "the leader cannot remove itself; transfer first")
            self._raft_call(lambda: self.raft.remove_member(node["raft_address"]))
        # kept on record as `left` (membership.py): shown by `cortex nodes`, counted by nothing, may rejoin
        self.propose("member.leave", {"node_id": request.node_id, "reason": (request.reason or "removed")[:200]},
                     internal=True)
        self.liveness.forget(request.node_id)
        return pb.LeaveResponse(removed=True)

    # --- promotion: a worker becomes a voting server --------------------------------------------------------
    def handle_promote(self, request: pb.PromoteNodeRequest) -> pb.PromoteNodeResponse:
        """Leader: issue the node its server material, add it to Raft (one change at a time), wait until it
        has caught up, then record its new role. Every step is a no-op when already done, so a repeated or
        interrupted promotion (a new leader, a timeout) is finished by running it again."""
        self._require_member()
        if not self._is_leader():
            return self._forward("PromoteNode", request, timeout=90)
        on_record = {n["id"]: n for n in self.store.query("member.list", {})}
        node = on_record.get(request.node_id)
        if node is None:
            raise AgentError(grpc.StatusCode.NOT_FOUND, f"no member named {request.node_id!r}; see `cortex nodes`")
        if node["liveness"] == "left":
            raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"{request.node_id} left the cluster; it must join again before it can be promoted")
        if node["role"] == "server":
            raise AgentError(grpc.StatusCode.ALREADY_EXISTS, f"{request.node_id} is already a server")
        if node["liveness"] != "alive":
            raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"{request.node_id} is {node['liveness']}: a promoted node starts Raft and catches up, "
                             "so it must be up; bring it back (or promote another worker)")
        if sum(1 for n in on_record.values() if n["role"] == "server" and n["liveness"] != "left") >= 5:
            raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                             "the cluster already has 5 voting servers; remove one first")
        if not self._promote_lock.acquire(timeout=30):
            raise AgentError(grpc.StatusCode.UNAVAILABLE, "another promotion is in progress; retry")
        try:
            return self._promote_locked(node, request.raft_address)
        finally:
            self._promote_lock.release()

    def _promote_locked(self, node: dict, raft_address: str) -> pb.PromoteNodeResponse:
        stub = self.peers.stub(node["grpc_address"])

        def call(req: pb.BecomeServerRequest) -> pb.BecomeServerResponse:
            try:
                return stub.BecomeServer(req, timeout=30)
            except grpc.RpcError as exc:
                raise AgentError(exc.code(), f"{node['id']}: {exc.details()}") from None

        checked = call(pb.BecomeServerRequest(raft_address=raft_address, check_only=True))
        address = checked.raft_address
        taken = next((n["id"] for n in self.store.query("member.list", {})
                      if n["raft_address"] == address and n["id"] != node["id"]), None)
        if taken:
            raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"raft address {address} is {taken}'s; pass another (`--raft HOST:PORT`)")
        log.info("promoting", extra=fields(node=node["id"], raft=address))
        self._raft_call(lambda: self.raft.start_add_member(address))  # no-op when already a member
        call(pb.BecomeServerRequest(raft_address=address, raft_secret=self.identity.raft_secret,
                                    raft_peers=sorted(set(self.raft.members()) | {address}),
                                    ca_key_pem=self.certs.ca()[1],
                                    server_grpc_addresses=self._server_grpc_addresses() + [node["grpc_address"]]))

        def caught_up() -> bool:
            raft = self.raft.status()
            return (address in self.raft.members() and raft.connected.get(address, False)
                    and raft.match_index.get(address, 0) >= raft.commit_index)

        if not wait_until(caught_up, 60, 0.05):
            raise AgentError(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"{node['id']} runs Raft at {address} but has not caught up within 60 s; run the "
                             "same promotion again to finish it (it changes nothing twice)")
        self.propose("member.set_role", {"node_id": node["id"], "role": "server", "raft_address": address},
                     internal=True)
        log.info("promoted", extra=fields(node=node["id"], raft=address))
        return pb.PromoteNodeResponse(node_id=node["id"], raft_address=address, changed=True)

    def handle_become_server(self, request: pb.BecomeServerRequest) -> pb.BecomeServerResponse:
        """The node being promoted: take the server material, start Raft, open the enrollment port."""
        self._require_member()
        with self._lock:
            address = request.raft_address or _default_raft_address(self.config.grpc_address)
            if self.identity.role == "server":
                if self.raft is not None and self.config.raft_address == address:
                    return pb.BecomeServerResponse(raft_address=address, already=True)
                raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"{self.config.node_id} is already a server with Raft at {self.config.raft_address}")
            problem = _unbindable(address) or _unbindable(authz.enroll_address(self.config.grpc_address))
            if problem:
                raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"cannot serve as a server: {problem}; pass another --raft address or free the port")
            if request.check_only:
                return pb.BecomeServerResponse(raft_address=address)
            if not request.raft_secret or not request.ca_key_pem:
                raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, "a promotion needs the raft secret and CA key")
            try:
                self.certs.become_server(request.ca_key_pem, self.identity.cluster_id)
            except (tls.TLSError, ValueError) as exc:
                raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, f"promotion: {exc}") from None
            self.identity = dataclasses.replace(
                self.identity, role="server", raft_secret=request.raft_secret, raft_peers=list(request.raft_peers),
                server_grpc_addresses=list(request.server_grpc_addresses), raft_address=address)
            identity.save(self.data_dir, self.identity)
            self.config = dataclasses.replace(self.config, role="server", raft_address=address)
            self._start_member()
            self.peers.reset()  # outgoing calls present the server certificate from now on
            # After this answer is on its way: serve the enrollment port too (restarting the listener now
            # would cut this very call)
            threading.Timer(0.3, self._restart_network).start()
            log.info("became a server", extra=fields(raft=address, peers=list(request.raft_peers)))
            return pb.BecomeServerResponse(raft_address=address)

    def handle_heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        self._require_member()
        if not self._is_leader():
            return self._forward("Heartbeat", request)
        if not any(n["id"] == request.node_id for n in self.store.query("nodes", {})):
            # removed by an operator (or never admitted): tell it, instead of tracking a ghost
            raise AgentError(grpc.StatusCode.NOT_FOUND, f"node {request.node_id!r} is not a member of this cluster "
                             "(removed?); on that node: cortex leave, then join again")
        self.liveness.heard(request.node_id, time.monotonic())
        if self.liveness.state(request.node_id) not in (None, "alive"):
            self._liveness_step()  # back from suspect/offline: say so now, not at the next tick
        return pb.HeartbeatResponse(server_grpc_addresses=self._server_grpc_addresses())

    def handle_transfer(self, request: pb.TransferLeadershipRequest) -> pb.TransferLeadershipResponse:
        self._require_member()
        if not self._is_leader():
            return self._forward("TransferLeadership", request, timeout=20)
        target = None
        if request.target_node_id:
            node = next((n for n in self.store.query("nodes", {}) if n["id"] == request.target_node_id), None)
            if node is None or node["role"] != "server":
                raise AgentError(grpc.StatusCode.NOT_FOUND,
                                 f"no server named {request.target_node_id!r}; see `cortex nodes`")
            target = node["raft_address"]
        self._raft_call(lambda: self.raft.transfer_leadership_to(target))
        wait_until(lambda: bool(self.raft.leader_address()) and not self.raft.is_leader(), 10)
        leader = self._node_by_raft(self.raft.leader_address())
        return pb.TransferLeadershipResponse(new_leader_id=leader["id"] if leader else "", term=self.raft.term())

    def handle_create_token(self, request: pb.CreateTokenRequest) -> pb.CreateTokenResponse:
        self._require_member()
        if request.role not in ("worker", "server"):
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, "role must be worker or server")
        if request.ttl_seconds < 0 or request.uses < 0:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, "ttl and uses must not be negative")
        if not self._is_leader():
            return self._forward("CreateToken", request)
        token = identity.new_join_token(tls.ca_pin(self.certs.ca()[0]))
        expires_at = time.time() + request.ttl_seconds if request.ttl_seconds else None
        token_hash = identity.token_hash(token)
        self.propose("token.add", {"token_hash": token_hash, "role": request.role, "expires_at": expires_at,
                                   "uses": request.uses or None}, internal=True)
        log.info("join token created", extra=fields(token_id=token_hash[:12], role=request.role,
                                                     ttl=request.ttl_seconds, uses=request.uses))
        return pb.CreateTokenResponse(token=token, token_id=token_hash[:12], expires_at=expires_at or 0)

    def handle_revoke_token(self, request: pb.RevokeTokenRequest) -> pb.RevokeTokenResponse:
        self._require_member()
        if not self._is_leader():
            return self._forward("RevokeToken", request)
        result = self.propose("token.revoke", {"token_id": request.token_id}, internal=True)
        if not result["revoked"]:
            raise AgentError(grpc.StatusCode.NOT_FOUND,
                             f"no active token with id {request.token_id}; see `cortex token list`")
        return pb.RevokeTokenResponse(revoked=True)

    def handle_renew(self, request: pb.RenewCertificateRequest, peer: tls.Peer | None) -> pb.RenewCertificateResponse:
        """Sign a new certificate for the caller: same name, role and cluster as the one it presented."""
        self._require_member()
        if peer is None:
            raise AgentError(grpc.StatusCode.UNAUTHENTICATED, "renewal needs the current certificate (mTLS)")
        if not self.certs.can_sign():
            raise AgentError(grpc.StatusCode.FAILED_PRECONDITION, "only servers sign certificates; ask a server")
        if peer.role in authz.NODES and not any(n["id"] == peer.name for n in self.store.query("nodes", {})):
            raise AgentError(grpc.StatusCode.PERMISSION_DENIED,
                             f"node {peer.name!r} is not a member any more; it gets no new certificate")
        try:
            cert, ca = self.certs.sign(request.csr_pem, peer.name, peer.role, self.identity.cluster_id)
        except tls.TLSError as exc:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        log.info("certificate renewed for", extra=fields(name=peer.name, role=peer.role))
        return pb.RenewCertificateResponse(cert_pem=cert, ca_cert_pem=ca)

    def _raft_generation(self) -> int:
        try:
            return int((self.certs.dir / "raft-generation").read_text())
        except (OSError, ValueError):
            return 0

    def _raft_key_step(self) -> None:
        """Servers: switch the Raft transport key once this replica has applied a `cortex secrets rotate`."""
        from cortex.security.cli import RAFT_ROTATION_KEY

        if self.store is None or self.raft is None:
            return
        row = self.store.query("kv.get", {"key": RAFT_ROTATION_KEY})
        generation = int(row["value"]) if row and str(row["value"]).isdigit() else 0
        if generation > self.raft_keys.generation and self.raft_keys.set_generation(generation):
            tls.write_file(self.certs.dir / "raft-generation", str(generation).encode(), 0o644)
            log.info("raft transport key rotated", extra=fields(generation=generation))

    def _renew_step(self, force: bool = False) -> None:
        """Renew this node's certificate before it expires; new connections use it at once, no restart."""
        if self.identity is None or not self.certs.ready():
            return

        def remote(csr: bytes) -> tuple[bytes, bytes]:
            r = self._to_servers(lambda stub: stub.RenewCertificate(pb.RenewCertificateRequest(csr_pem=csr),
                                                                    timeout=5))
            return r.cert_pem, r.ca_cert_pem

        def rotation() -> int:  # `cortex secrets rotate` bumps it
            from cortex.security.cli import ROTATION_KEY

            request = pb.ReadRequest(query="kv.get", args_json=json.dumps({"key": ROTATION_KEY}).encode(),
                                     level=pb.STALE)
            row = json.loads(self.read(request).result_json)
            return int(row["value"]) if row and str(row["value"]).isdigit() else 0

        if self.certs.renew_if_due(self.identity.cluster_id, remote, rotation, force=force):
            self.peers.reset()  # outgoing calls present the new certificate from now on
        while self.certs.superseded:  # revoke what was replaced (after a grace), with the new certificate
            args = self.certs.superseded[0]
            self.write(pb.Command(type="cert.revoke", args_json=json.dumps(args).encode(),
                                  idempotency_key=f"revoke-{args['name']}-{args['before']}"))
            self.certs.superseded.pop(0)

    def _ca_rotation_step(self) -> None:
        """`cortex secrets rotate --ca` (ca_rotation.py): the leader moves the phases, every node does its part
        and acknowledges it."""
        if self.identity is None or not self.certs.ready() or time.monotonic() < self._ca_next_check:
            return
        doc = self._replica_query("ca.rotation")
        row = doc["rotation"]
        if row is None or row["phase"] == "done":
            self._ca_next_check = time.monotonic() + 5.0
            return
        if self._is_leader():
            members = ca_rotation.active_members(self.store.query("nodes", {}))
            action = rotation_driver.leader_action(doc, members, *self.certs.ca(), self.identity.cluster_id,
                                               self.raft_keys.generation)
            if action is not None:
                self.propose("ca.advance", action, internal=True)
            if row["phase"] == "reissue":  # move the Raft transport to the key of the new CA
                from cortex.security.cli import RAFT_ROTATION_KEY

                current = (self.store.query("kv.get", {"key": RAFT_ROTATION_KEY}) or {}).get("value", "0")
                if int(current or 0) < row["raft_generation"]:
                    self.propose("kv.put", {"key": RAFT_ROTATION_KEY, "value": str(row["raft_generation"])})
        if row["phase"] not in ("trust", "reissue", "drop"):
            return
        if rotation_driver.needs_reissue(row, self.certs):
            self._renew_step(force=True)
        before = self.certs.ca()[0]
        done = rotation_driver.node_step(row, self.certs, self.raft_keys if self.store is not None else None)
        if self.certs.ca()[0] != before:
            self.peers.reset()  # connect with the new trusted CAs
        ack = {"rot_id": row["rot_id"], "phase": row["phase"]}
        if done and doc["acks"].get(self.config.node_id) != ack:
            self.write(pb.Command(type="ca.ack", args_json=json.dumps({"node": self.config.node_id, **ack}).encode(),
                                  idempotency_key=f"ca-ack-{self.config.node_id}-{row['rot_id']}-{row['phase']}"))

    def _revocation_step(self) -> None:
        """Refresh this node's copy of the revoked certificates (servers: their replica; workers: a server)."""
        if self.identity is None or not self.revoked.due():
            return
        self.revoked.update(self._replica_query("cert.revocations"), self.identity.role)

    def _replica_query(self, name: str):
        """A query without arguments from this server's replica, or (workers) a server's."""
        if self.store is not None:
            return self.store.query(name, {})
        request = pb.ReadRequest(query=name, args_json=b"{}", level=pb.STALE)
        return json.loads(self.read(request).result_json)

    def _raft_call(self, fn):
        try:
            return fn()
        except ProposalError as exc:
            raise AgentError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None

    # --- writes --------------------------------------------------------------------------------------
    def write(self, command: pb.Command, hops: int = 0) -> pb.WriteResponse:
        self._require_member()
        try:
            args = validate(command.type, parse_args_json(command.args_json))
        except CommandError as exc:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        refused = domain.refusal(command.type, args, authz.current_peer.get(), internal=False)
        if refused:
            raise AgentError(grpc.StatusCode.PERMISSION_DENIED, refused)
        if len(command.idempotency_key) > 128:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, "idempotency_key is longer than 128 characters")
        if not self._is_leader():
            return self._forward("Write", pb.WriteRequest(command=command, hops=hops))
        result, index, term = self._propose_checked(command.type, args, command.idempotency_key)
        return pb.WriteResponse(result_json=json.dumps(result).encode(), index=index, term=term,
                                duplicate=bool(result.pop("duplicate", False)))

    def propose(self, command_type: str, args: dict, internal: bool = False, idem: str = "") -> dict:
        """Leader-side: stamp and replicate a command; raise AgentError on failure."""
        try:
            args = validate(command_type, args)
        except CommandError as exc:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        return self._propose_checked(command_type, args, idem)[0]

    def _propose_checked(self, command_type: str, args: dict, idem: str) -> tuple[dict, int, int]:
        term = self.raft.term()
        command_id = uuid.uuid4().hex
        env = Envelope(type=command_type, args=args, id=command_id, ts=time.time(), term=term,
                       idem=idem or command_id)
        try:
            result, index = self.committer.propose(env.encode(), timeout=FORWARD_TIMEOUT)
        except NotLeader:
            raise AgentError(grpc.StatusCode.UNAVAILABLE, "leadership changed; retry") from None
        except ProposalError as exc:
            code = grpc.StatusCode.UNAVAILABLE if not exc.maybe_applied else grpc.StatusCode.DEADLINE_EXCEEDED
            raise AgentError(code, f"{exc}; retry with the same idempotency key") from None
        if "error" in result:
            stale = result["error"].startswith("stale term")
            code = grpc.StatusCode.UNAVAILABLE if stale else grpc.StatusCode.FAILED_PRECONDITION
            raise AgentError(code, result["error"])
        return result, index, term

    def write_batch(self, request: pb.WriteBatchRequest) -> pb.WriteBatchResponse:
        """Pipelined writes: each command is replicated on its own, all in flight at once."""
        self._require_member()
        if len(request.commands) > 10_000:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, "at most 10000 commands per batch")
        if not self._is_leader():
            return self._forward("WriteBatch", request)
        prepared: list[tuple[int, bytes] | str] = []
        term = self.raft.term()
        for command in request.commands:
            try:
                if is_internal(command.type):
                    raise CommandError(f"{command.type} is internal")
                args = validate(command.type, parse_args_json(command.args_json))
            except CommandError as exc:
                prepared.append(str(exc))
                continue
            command_id = uuid.uuid4().hex
            env = Envelope(type=command.type, args=args, id=command_id, ts=time.time(), term=term,
                           idem=command.idempotency_key or command_id)
            prepared.append(env.encode())
        outcomes = self.committer.submit([p for p in prepared if isinstance(p, bytes)], timeout=FORWARD_TIMEOUT)
        results, errors = [], []
        it = iter(outcomes)
        for item in prepared:
            if isinstance(item, str):
                results.append(pb.WriteResponse())
                errors.append(item)
                continue
            outcome = next(it)
            if isinstance(outcome, Exception):
                results.append(pb.WriteResponse())
                errors.append(str(outcome))
                continue
            result, index = outcome
            errors.append(result.get("error", ""))
            results.append(pb.WriteResponse(result_json=json.dumps(result).encode(), index=index, term=term,
                                            duplicate=bool(result.get("duplicate"))))
        return pb.WriteBatchResponse(results=results, errors=errors)

    # --- reads ---------------------------------------------------------------------------------------
    def read(self, request: pb.ReadRequest) -> pb.ReadResponse:
        self._require_member()
        level = request.level or pb.LEADER
        try:
            args = parse_args_json(request.args_json)
        except CommandError as exc:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if not isinstance(args, dict):
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, "query arguments must be a JSON object")
        if request.query in ("token.check", "join_request.secret"):
            raise AgentError(grpc.StatusCode.PERMISSION_DENIED, f"{request.query} is internal")
        if self.raft is None or (level != pb.STALE and not self._is_leader()):
            return self._forward("Read", pb.ReadRequest(query=request.query, args_json=request.args_json,
                                                        level=level, hops=request.hops))
        if level == pb.LINEARIZABLE:
            noop = Envelope(type="noop", args={}, id=uuid.uuid4().hex, ts=time.time(), term=self.raft.term(),
                            idem="")
            try:
                self.committer.propose(noop.encode(), timeout=FORWARD_TIMEOUT)
            except ProposalError as exc:
                raise AgentError(grpc.StatusCode.UNAVAILABLE, f"read barrier failed: {exc}; retry") from None
        try:
            result = self.store.query(request.query, args)
        except (KeyError, ValueError, TypeError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, str(message)) from None
        return pb.ReadResponse(result_json=json.dumps(result).encode(), applied_index=self.store.last_applied,
                               served_by=self.config.node_id)

    # --- status --------------------------------------------------------------------------------------
    def status(self) -> pb.StatusResponse:
        if self.identity is None:
            return pb.StatusResponse(node_id=self.config.node_id, role=self.config.role, state="uninitialized",
                                     version=__version__, waiting_for=self.waiting_for,
                                     image_version=IMAGE_VERSION)
        response = pb.StatusResponse(cluster_id=self.identity.cluster_id, node_id=self.config.node_id,
                                     role=self.identity.role, version=__version__, image_version=IMAGE_VERSION)
        if self.raft is None:
            response.state = "worker"
            response.has_quorum = True
            try:
                leader = self._to_servers(lambda stub: stub.Status(pb.StatusRequest(), timeout=2))
                response.leader_id, response.leader_grpc_address = leader.leader_id, leader.leader_grpc_address
                response.term, response.commit_index = leader.term, leader.commit_index
                response.nodes.extend(leader.nodes)
            except AgentError as exc:
                response.waiting_for = f"servers unreachable: {exc}"
            return response
        raft = self.raft.status()
        response.state = raft.state
        response.term, response.commit_index = raft.term, raft.commit_index
        response.applied_index, response.has_quorum = self.store.last_applied, raft.has_quorum
        leader = self._node_by_raft(raft.leader) if raft.leader else None
        if leader:
            response.leader_id, response.leader_grpc_address = leader["id"], leader["grpc_address"]
        now = time.monotonic()
        for node in self.store.query("nodes", {}):
            entry = pb.NodeStatus(id=node["id"], role=node["role"], grpc_address=node["grpc_address"],
                                  raft_address=node["raft_address"], liveness=node["liveness"],
                                  replication_lag=-1, last_seen_age=-1)
            if node["id"] == self.config.node_id:
                entry.liveness, entry.last_seen_age = "alive", 0
                if raft.state == "leader":
                    entry.replication_lag = 0
            elif raft.state == "leader":
                if node["role"] == "server" and node["raft_address"] in raft.match_index:
                    entry.replication_lag = max(0, raft.commit_index - raft.match_index[node["raft_address"]])
                heard = self.liveness.last_heard(node["id"])
                if heard is not None:
                    entry.last_seen_age = now - heard
            response.nodes.append(entry)
        return response

    # --- helpers -------------------------------------------------------------------------------------
    def _require_member(self) -> None:
        if self.identity is None:
            raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"node {self.config.node_id} is not in a cluster yet: {self.waiting_for}")

    def _is_leader(self) -> bool:
        return self.raft is not None and self.raft.is_leader()

    def _node_by_raft(self, raft_address: str) -> dict | None:
        return next((n for n in self.store.query("nodes", {}) if n["raft_address"] == raft_address), None)

    def _server_grpc_addresses(self) -> list[str]:
        return [n["grpc_address"] for n in self.store.query("nodes", {}) if n["role"] == "server"]

    def _leader_grpc(self, wait: float) -> str:
        """The leader's gRPC address, waiting up to `wait` seconds for an election to settle."""
        deadline = time.monotonic() + wait
        while True:
            raft_leader = self.raft.leader_address()
            if raft_leader and raft_leader != self.config.raft_address:
                node = self._node_by_raft(raft_leader)
                if node:
                    return node["grpc_address"]
            if raft_leader == self.config.raft_address and self.raft.is_leader():
                return ""
            if time.monotonic() >= deadline:
                raise AgentError(grpc.StatusCode.UNAVAILABLE,
                                 "no leader: the servers have no quorum right now; retry, or check `cortex status`")
            time.sleep(0.02)

    def _forward(self, method: str, request, timeout: float = FORWARD_TIMEOUT):
        """Send a request on to the leader (servers) or to a server (workers). Bounded by a hop count."""
        if hasattr(request, "hops"):
            if request.hops >= MAX_HOPS:
                raise AgentError(grpc.StatusCode.UNAVAILABLE,
                                 "request bounced between nodes during an election; retry")
            request.hops += 1
        if self.raft is None:
            return self._to_servers(lambda stub: getattr(stub, method)(request, timeout=timeout))
        address = self._leader_grpc(wait=self.config.raft.election_timeout_max * 2)
        if not address:  # we became leader while waiting
            return self._dispatch_local(method, request)
        try:
            return getattr(self.peers.stub(address), method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise AgentError(exc.code(), exc.details() or "") from None

    def _dispatch_local(self, method: str, request):
        return {
            "Write": lambda r: self.write(r.command, r.hops),
            "WriteBatch": self.write_batch,
            "Read": self.read,
            "Join": self.handle_join,
            "Leave": self.handle_leave,
            "Heartbeat": self.handle_heartbeat,
            "TransferLeadership": self.handle_transfer,
            "PromoteNode": self.handle_promote,
            "CreateToken": self.handle_create_token,
            "RevokeToken": self.handle_revoke_token,
        }[method](request)

    def _to_servers(self, call) -> Any:
        """Workers: try the known servers in turn (the last one that answered first)."""
        errors = []
        for address in list(self._server_addresses):
            try:
                result = call(self.peers.stub(address))
                if self._server_addresses[0] != address:
                    self._server_addresses.remove(address)
                    self._server_addresses.insert(0, address)
                return result
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise AgentError(exc.code(), exc.details() or "") from None
                errors.append(f"{address}: {exc.details()}")
        raise AgentError(grpc.StatusCode.UNAVAILABLE, "no server reachable (" + "; ".join(errors) + ")")


def _round_wait(interval: float, resumed_at: float | None, now: float) -> float:
    """How long the background loop waits for its next round: RESUME_RETRY while a wake's first heartbeat
    is unanswered (for at most RESUME_RETRY_FOR), else the regular interval."""
    if resumed_at is not None and now - resumed_at <= RESUME_RETRY_FOR:
        return min(interval, RESUME_RETRY)
    return interval


def _default_raft_address(grpc_address: str) -> str:
    """A promoted worker's Raft address unless given: its gRPC host, port + 1 (as servers are laid out)."""
    host, _, port = grpc_address.rpartition(":")
    return f"{host}:{int(port) + 1}"


def _unbindable(address: str) -> str:
    """Why `address` cannot be listened on here ('' when it can)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host.strip("[]"), int(port)))
    except (OSError, ValueError) as exc:
        return f"cannot listen on {address} ({exc})"
    return ""


# Clients (client.py) ping idle channels and long calls every 10 s; allow that instead of GOAWAY
# "too_many_pings", which ends the call in flight with UNAVAILABLE.
ALLOW_CLIENT_PINGS = [("grpc.http2.min_ping_interval_without_data_ms", 5000),
                      ("grpc.keepalive_permit_without_calls", 1)]


def _servicer(fn):
    """Turn AgentError into a gRPC status; never let an unexpected error kill the server thread."""

    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except AgentError as exc:
            context.abort(exc.code, str(exc))
        except grpc.RpcError:
            raise
        except Exception as exc:  # the agent stays up; the caller learns what happened
            log.exception("request failed", extra=fields(method=fn.__name__))
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    wrapper.__name__ = fn.__name__
    return wrapper


def _only_itself(node_id: str, verb: str) -> None:
    """A worker's certificate speaks for that worker alone."""
    peer = authz.current_peer.get()
    if peer is not None and peer.role == "worker" and node_id != peer.name:
        raise AgentError(grpc.StatusCode.PERMISSION_DENIED,
                         f"worker {peer.name} may {verb} itself only, not {node_id!r}; run it on a server")


class ClusterService(pb_grpc.ClusterServicer):
    def __init__(self, agent: Agent):
        self.agent = agent

    @_servicer
    def Write(self, request, context):
        return self.agent.write(request.command, request.hops)

    @_servicer
    def WriteBatch(self, request, context):
        return self.agent.write_batch(request)

    @_servicer
    def Read(self, request, context):
        return self.agent.read(request)

    @_servicer
    def Status(self, request, context):
        return self.agent.status()

    @_servicer
    def Join(self, request, context):
        return self.agent.handle_join(request)

    @_servicer
    def Leave(self, request, context):
        _only_itself(request.node_id, "remove")
        peer = authz.current_peer.get()
        if not request.reason and peer is not None:  # the first hop says who asked (kept with the record)
            request.reason = "left" if peer.name == request.node_id else f"removed by {peer.name}"
        return self.agent.handle_leave(request)

    @_servicer
    def PromoteNode(self, request, context):
        return self.agent.handle_promote(request)

    @_servicer
    def BecomeServer(self, request, context):
        return self.agent.handle_become_server(request)

    @_servicer
    def Heartbeat(self, request, context):
        _only_itself(request.node_id, "send heartbeats for")
        return self.agent.handle_heartbeat(request)

    @_servicer
    def RenewCertificate(self, request, context):
        return self.agent.handle_renew(request, authz.current_peer.get())

    @_servicer
    def TransferLeadership(self, request, context):
        return self.agent.handle_transfer(request)

    @_servicer
    def CreateToken(self, request, context):
        peer = authz.current_peer.get()
        if peer is not None and peer.role == "worker" and request.role != "worker":
            raise AgentError(grpc.StatusCode.PERMISSION_DENIED,
                             f"worker {peer.name} may create worker join tokens only; a {request.role} token "
                             "needs an admin: run `cortex token create` on a server")
        return self.agent.handle_create_token(request)

    @_servicer
    def RevokeToken(self, request, context):
        return self.agent.handle_revoke_token(request)


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, agent: Agent):
        self.agent = agent

    @_servicer
    def Init(self, request, context):
        cluster_id, token = self.agent.init_cluster()
        return pb.InitResponse(cluster_id=cluster_id, join_token=token)

    @_servicer
    def JoinCluster(self, request, context):
        cluster_id = self.agent.join_cluster(request.address, request.token,
                                             insecure_skip_ca_pin=request.insecure_skip_ca_pin)
        return pb.JoinClusterResponse(cluster_id=cluster_id, admission="" if cluster_id else "pending",
                                      ca_pin=self.agent.enroll_pin)

    @_servicer
    def LeaveCluster(self, request, context):
        self.agent.leave_cluster()
        return pb.LeaveClusterResponse()


def run(config: Config) -> int:
    """Run the agent until SIGTERM/SIGINT."""
    notify.claim()
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

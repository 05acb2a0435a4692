"""The agent's listeners: the gRPC port (mutual TLS for members), the enrollment port (servers; joiners
have no certificate yet), the local admin socket, and the health the gRPC port reports."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex._proto.cortex.v1 import cortex_pb2_grpc as pb_grpc
from cortex._proto.cortex.v1 import plugins_pb2_grpc as ppb_grpc
from cortex.core.events import Event
from cortex.ha import volume_service
from cortex.node.logs import fields
from cortex.node.member import Member
from cortex.plugins import PluginHost
from cortex.plugins.service import PluginsService, network_caller, socket_caller
from cortex.security import authz

log = logging.getLogger("cortex.agent")

# Clients (client.py) ping idle channels and long calls every 10 s; allow that instead of GOAWAY
# "too_many_pings", which ends the call in flight with UNAVAILABLE.
ALLOW_CLIENT_PINGS = [("grpc.http2.min_ping_interval_without_data_ms", 5000),
                      ("grpc.keepalive_permit_without_calls", 1)]
PORT_FREE_WITHIN = 5.0  # a restarted listener waits this long for its port to be released


class Health:
    """SERVING once this node is a member that knows a leader; announces leader changes as events."""

    def __init__(self, member: Member):
        self.member = member
        self.servicer = health.HealthServicer()
        self._last_leader = ""

    def update(self) -> None:
        member = self.member
        raft = member.raft
        if raft is not None:
            leader = raft.leader_address()
            if leader != self._last_leader:
                self._last_leader = leader
                if leader:
                    log.info("event", extra=fields(event="leader.changed", leader=leader, term=raft.term()))
                    member.events.publish(Event("leader.changed", {"leader": leader, "term": raft.term()}))
        serving = member.identity is not None and (raft is None or bool(raft.leader_address()))
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.servicer.set("", status)
        self.servicer.set("cortex.v1.Cluster", status)


class Servers:
    """`cluster_service()` and `admin_service()` build the servicers each new listener serves."""

    def __init__(self, member: Member, plugins: PluginHost, health_: Health,
                 cluster_service: Callable[[], pb_grpc.ClusterServicer],
                 admin_service: Callable[[], pb_grpc.AdminServicer]):
        self.member = member
        self.plugins = plugins
        self.health = health_
        self._cluster_service = cluster_service
        self._admin_service = admin_service
        self._grpc: grpc.Server | None = None
        self._enroll: grpc.Server | None = None
        self._admin: grpc.Server | None = None

    def serve(self) -> None:
        self._serve_network()
        self._serve_admin()

    def stop(self) -> None:
        if self._grpc:
            self._grpc.stop(grace=2).wait()
        if self._enroll:
            self._enroll.stop(grace=1).wait()
        if self._admin:
            self._admin.stop(grace=1).wait()

    def restart_network(self) -> None:
        """Membership changed (init, join, leave, promotion): serve the ports with the credentials that now
        apply."""
        old, old_enroll = self._grpc, self._enroll
        if old is not None:
            old.stop(grace=0.5).wait()
        if old_enroll is not None:
            old_enroll.stop(grace=0.5).wait()
        self._grpc = self._enroll = None
        deadline = time.monotonic() + PORT_FREE_WITHIN
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
        member, config = self.member, self.member.config
        ident = member.identity
        secure = ident is not None and member.certs.ready()
        if ident is not None and not secure:
            log.warning("this member has no certificate (cluster created before mTLS): serving plaintext; "
                        "create the cluster again to get mTLS")
        opts = [("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0), *ALLOW_CLIENT_PINGS]
        interceptors = [authz.RoleCheck(lambda: member.identity.cluster_id if member.identity else "",
                                        member.revoked.refusal)] if secure else []
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="grpc"),
                             options=opts, maximum_concurrent_rpcs=1024, interceptors=interceptors)
        self._grpc = server
        pb_grpc.add_ClusterServicer_to_server(self._cluster_service(), server)
        ppb_grpc.add_PluginsServicer_to_server(PluginsService(self.plugins, config.node_id,
                                                              network_caller(self.plugins), member.stopping.is_set),
                                               server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        volume_service.add_to_server(server, config.data_dir)
        reflection.enable_server_reflection(
            (pb.DESCRIPTOR.services_by_name["Cluster"].full_name, "cortex.v1.Plugins", health.SERVICE_NAME,
             reflection.SERVICE_NAME),
            server,
        )
        if secure:
            def add_port(address: str) -> int:
                # one credentials object per port: each listener's fetcher must hand out its own first config
                return server.add_secure_port(address, authz.ServerCredentials(member.certs.dir).credentials())
        else:
            add_port = server.add_insecure_port
        if add_port(config.grpc_address) == 0:
            raise RuntimeError(f"cannot listen on {config.grpc_address} (in use?)")
        local = config.loopback_grpc_address
        if local and add_port(local) == 0:
            log.warning("cannot also listen on loopback", extra=fields(address=local))
        if secure and ident.role == "server":
            self._serve_enrollment(opts)
        server.start()

    def _serve_enrollment(self, opts) -> None:
        self._enroll = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="enroll"),
                                   options=opts, maximum_concurrent_rpcs=64, interceptors=[authz.OnlyJoin()])
        pb_grpc.add_ClusterServicer_to_server(self._cluster_service(), self._enroll)
        address = authz.enroll_address(self.member.config.grpc_address)
        if self._enroll.add_secure_port(address, authz.enroll_server_credentials(self.member.certs.dir)) == 0:
            raise RuntimeError(f"cannot listen on {address} (the enrollment port, gRPC port + 2; in use?)")
        self._enroll.start()

    def _serve_admin(self) -> None:
        config = self.member.config
        sock = config.admin_socket_path
        sock.parent.mkdir(parents=True, exist_ok=True)
        sock.unlink(missing_ok=True)
        # a long call on the socket (a rollout's pre-flight downloads a release) must survive the CLI's pings
        self._admin = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="admin"),
                                  options=ALLOW_CLIENT_PINGS, interceptors=[authz.SocketReadsOnly()])
        pb_grpc.add_AdminServicer_to_server(self._admin_service(), self._admin)
        pb_grpc.add_ClusterServicer_to_server(self._cluster_service(), self._admin)  # Status, Read (see authz)
        ppb_grpc.add_PluginsServicer_to_server(PluginsService(self.plugins, config.node_id, socket_caller,
                                                              self.member.stopping.is_set), self._admin)
        self._admin.add_insecure_port(f"unix:{sock}")
        self._admin.start()
        sock.chmod(0o600)

"""The gRPC services the agent answers: Cluster (other nodes, clients with a certificate) and Admin (the local
socket). They check who asks where the request alone cannot say it, and hand the work to the parts."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex._proto.cortex.v1 import cortex_pb2_grpc as pb_grpc
from cortex.membership.admission import Admission
from cortex.membership.gate import source_host
from cortex.membership.join import Joiner
from cortex.node.logs import fields
from cortex.node.member import AgentError
from cortex.node.router import Router
from cortex.security import authz

log = logging.getLogger("cortex.agent")


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
    def __init__(self, router: Router, admission: Admission, status: Callable[[], pb.StatusResponse]):
        self.router = router
        self.admission = admission
        self.status = status

    @_servicer
    def Write(self, request, context):
        return self.router.write(request.command, request.hops)

    @_servicer
    def WriteBatch(self, request, context):
        return self.router.write_batch(request)

    @_servicer
    def Read(self, request, context):
        return self.router.read(request)

    @_servicer
    def Status(self, request, context):
        return self.status()

    @_servicer
    def Join(self, request, context):
        # A caller without a certificate reached this node first (the enrollment port): it is counted by
        # its address. A server forwarding a join presents its certificate and was counted where it arrived.
        source = "" if authz.current_peer.get() is not None else source_host(context.peer())
        return self.admission.handle_join(request, source)

    @_servicer
    def Leave(self, request, context):
        _only_itself(request.node_id, "remove")
        peer = authz.current_peer.get()
        if not request.reason and peer is not None:  # the first hop says who asked (kept with the record)
            request.reason = "left" if peer.name == request.node_id else f"removed by {peer.name}"
        return self.admission.handle_leave(request)

    @_servicer
    def PromoteNode(self, request, context):
        return self.admission.handle_promote(request)

    @_servicer
    def BecomeServer(self, request, context):
        return self.admission.handle_become_server(request)

    @_servicer
    def Heartbeat(self, request, context):
        _only_itself(request.node_id, "send heartbeats for")
        return self.admission.handle_heartbeat(request)

    @_servicer
    def RenewCertificate(self, request, context):
        return self.admission.handle_renew(request, authz.current_peer.get())

    @_servicer
    def TransferLeadership(self, request, context):
        return self.admission.handle_transfer(request)

    @_servicer
    def CreateToken(self, request, context):
        peer = authz.current_peer.get()
        if peer is not None and peer.role == "worker" and request.role != "worker":
            raise AgentError(grpc.StatusCode.PERMISSION_DENIED,
                             f"worker {peer.name} may create worker join tokens only; a {request.role} token "
                             "needs an admin: run `cortex token create` on a server")
        return self.admission.handle_create_token(request)

    @_servicer
    def RevokeToken(self, request, context):
        return self.admission.handle_revoke_token(request)


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, joiner: Joiner):
        self.joiner = joiner

    @_servicer
    def Init(self, request, context):
        cluster_id, token, expires_at = self.joiner.init_cluster(request.token_ttl_seconds)
        return pb.InitResponse(cluster_id=cluster_id, join_token=token, token_expires_at=expires_at)

    @_servicer
    def JoinCluster(self, request, context):
        cluster_id = self.joiner.join_cluster(request.address, request.token,
                                              insecure_skip_ca_pin=request.insecure_skip_ca_pin)
        return pb.JoinClusterResponse(cluster_id=cluster_id, admission="" if cluster_id else "pending",
                                      ca_pin=self.joiner.member.enroll_pin)

    @_servicer
    def LeaveCluster(self, request, context):
        self.joiner.leave_cluster()
        return pb.LeaveClusterResponse()

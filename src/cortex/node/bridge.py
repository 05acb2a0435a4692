"""The agent as plugins see it (plugins.ClusterAPI): writes from any node, reads at a level."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex.membership.admission import Admission
from cortex.node.member import AgentError, Member
from cortex.node.router import Router
from cortex.raft.consensus import wait_until


class PluginBridge:
    LEVELS = {"stale": pb.STALE, "leader": pb.LEADER, "linearizable": pb.LINEARIZABLE}

    def __init__(self, member: Member, router: Router, admission: Admission,
                 status: Callable[[], pb.StatusResponse]):
        self._member = member
        self._router = router
        self._admission = admission
        self._status = status
        self.node_id = member.config.node_id
        self.role = member.config.role
        self.grpc_address = member.config.grpc_address
        self.config = member.config  # the node's config (the services plugin reads its `fence` sections)
        self.node_credentials = member.certs.node_files  # this node's own certificate, for node-to-node calls

    def rpc(self, method: str, request):
        """Run a Cluster RPC (TransferLeadership, Leave, CreateToken, ...) as if this node had received it:
        forwarded to the leader where the RPC needs one."""
        return self._router.dispatch(method, request)

    def write(self, command_type: str, args: dict, idempotency_key: str = "") -> dict:
        command = pb.Command(type=command_type, args_json=json.dumps(args).encode(), idempotency_key=idempotency_key)
        return json.loads(self._router.write(command).result_json)

    def propose(self, command_type: str, args: dict, idempotency_key: str = "") -> dict:
        if not self.is_leader():
            raise AgentError(grpc.StatusCode.UNAVAILABLE, f"{command_type} is proposed by the leader only")
        return self._router.propose(command_type, args, internal=True, idem=idempotency_key)

    def read(self, query: str, args: dict | None = None, level: str = "leader", min_index: int = 0) -> Any:
        """`min_index`: the answer must include the state at that log index (read-your-writes: pass the
        index a write returned). A stale read waits briefly for this replica to apply it, else asks the leader."""
        if level not in self.LEVELS:
            raise ValueError(f"read level must be one of {', '.join(self.LEVELS)}")
        if min_index and level == "stale":
            store = self._member.store
            if store is None or not wait_until(lambda: store.last_applied >= min_index, 1.0, 0.005):
                level = "leader"  # a worker (its stale read may hit any server) or a lagging replica
        return self._router.read_query(query, args, self.LEVELS[level])

    def read_local(self, query: str, args: dict | None = None) -> Any:
        """Servers: a query on this node's own replica, in process (no gRPC, no JSON round trip); what the
        leader reads this way is a leader read. For hot loops (the task scheduler); do not mutate the answer."""
        store = self._member.store
        if store is None:
            raise AgentError(grpc.StatusCode.FAILED_PRECONDITION, "only servers hold a copy of the state")
        return store.query(query, args or {})

    def is_leader(self) -> bool:
        return self._member.is_leader()

    def snapshot(self, path: Path) -> int:
        """Servers: a consistent copy of the state database (SQLite online backup); returns its applied index."""
        store = self._member.store
        if store is None:
            raise AgentError(grpc.StatusCode.FAILED_PRECONDITION, "only servers hold a copy of the state")
        return store.backup_to(path)

    def create_token(self, role: str, ttl_seconds: float, uses: int) -> dict:
        """A join token minted by the leader (forwarded from any node); the secret is returned only here."""
        r = self._admission.handle_create_token(pb.CreateTokenRequest(role=role, ttl_seconds=ttl_seconds, uses=uses))
        return {"token": r.token, "token_id": r.token_id, "expires_at": r.expires_at}

    def revoke_token(self, token_id: str) -> None:
        self._admission.handle_revoke_token(pb.RevokeTokenRequest(token_id=token_id))

    def remove_node(self, node_id: str, reason: str = "") -> bool:
        """Remove a node from membership: the `cortex leave` path (Raft config for servers; the node stays on
        record as `left` with `reason`, see membership/domain.py)."""
        return self._admission.handle_leave(pb.LeaveRequest(node_id=node_id, reason=reason)).removed

    def status(self) -> dict:
        from google.protobuf.json_format import MessageToDict

        return MessageToDict(self._status(), preserving_proto_field_name=True)

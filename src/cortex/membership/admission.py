"""The cluster's side of membership, decided by the leader (other nodes forward): who joins (with a token, or
once an operator approves the request), who leaves, which worker becomes a voting server, join tokens,
certificate renewal, and the liveness of the members (heartbeats in, suspect/offline out).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex.core.commands import CommandError, validate
from cortex.membership import identity
from cortex.membership.gate import SourceLimit
from cortex.membership.liveness import LivenessTracker, Transition
from cortex.node.logs import fields
from cortex.node.member import AgentError, Member
from cortex.node.router import Router, raft_call
from cortex.raft.consensus import ProposalError, wait_until
from cortex.security import authz, tls

log = logging.getLogger("cortex.agent")

MAX_SERVERS = 5  # voting servers: more slow every commit down and add nothing to availability
PROMOTION_CATCH_UP = 60.0


class Admission:
    """`stub_for(address)` is the network edge: the Cluster stub of the node being promoted.
    `restart_network()` serves the ports again with the credentials that apply after a promotion."""

    def __init__(self, member: Member, router: Router, restart_network: Callable[[], None],
                 stub_for: Callable[[str], Any] | None = None):
        self.member = member
        self.router = router
        self._restart_network = restart_network
        self._stub_for = stub_for or member.peers.stub
        config = member.config
        self.liveness = LivenessTracker(config.liveness.suspect_after, config.liveness.offline_after)
        self._liveness_lock = threading.Lock()
        self._liveness_term = -1  # the term in which this node, as leader, started tracking liveness
        self._next_forget = 0.0  # when the leader next looks for records of nodes that left long ago
        self._promote_lock = threading.Lock()  # one promotion (Raft membership change) at a time
        bounds = config.membership
        self._sources = SourceLimit(bounds.request_burst, bounds.requests_per_minute)
        self._request_lock = threading.Lock()  # the leader counts pending requests and files one at a time
        self._next_expiry = 0.0  # when the leader next looks for requests nobody decided on
        router.handlers.update({
            "Join": self.handle_join,
            "Leave": self.handle_leave,
            "Heartbeat": self.handle_heartbeat,
            "TransferLeadership": self.handle_transfer,
            "PromoteNode": self.handle_promote,
            "CreateToken": self.handle_create_token,
            "RevokeToken": self.handle_revoke_token,
        })

    @property
    def _raft(self):
        return self.member.raft

    def _store(self):
        return self.member.store

    # --- join ------------------------------------------------------------------------------------------------
    def handle_join(self, request: pb.JoinRequest, source: str = "") -> pb.JoinResponse:
        """`source` is the caller's address when this node is the first to receive the request (the
        enrollment port); forwarded requests and this node's own join carry none."""
        ident = self.member.require_member()
        if source and not request.token:
            self._admit_source(request, source)
        if not self.member.is_leader():
            return self.router.forward("Join", request)
        try:
            validate("node.register", {"node_id": request.node_id, "role": request.role,
                                       "grpc_address": request.grpc_address, "raft_address": request.raft_address})
        except CommandError as exc:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, f"bad join request: {exc}") from None
        if request.role == "server" and not request.raft_address:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, "a server must give its raft address")
        nodes = {n["id"]: n for n in self.member.nodes()}
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
                admission = self.approval_state(request)
                if admission != "approved":
                    return pb.JoinResponse(admission=admission)
            else:
                problem = self._store().query("token.check", {"token_hash": token_hash, "role": request.role,
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
        if request.role == "server":  # checked once the joiner is known to be allowed in at all
            self._require_level(request.node_id, request.state_machine_level)
        response = pb.JoinResponse(
            cluster_id=ident.cluster_id,
            raft_secret=ident.raft_secret if request.role == "server" and not same else "",
            server_grpc_addresses=self.member.server_grpc_addresses(),
        )
        certs = self.member.certs
        if request.csr_pem:
            try:
                cert, ca = certs.sign(request.csr_pem, request.node_id, request.role, ident.cluster_id)
            except tls.TLSError as exc:
                raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, f"bad join request: {exc}") from None
            response.cert_pem, response.ca_cert_pem = cert, ca
            if request.role == "server":
                response.ca_key_pem = certs.ca()[1]
        raft = self._raft
        if request.role == "server" and request.raft_address not in raft.members():
            servers = [n for n in nodes.values() if n["role"] == "server"]
            if len(servers) >= MAX_SERVERS:
                raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"the cluster already has {MAX_SERVERS} voting servers; join as a worker")
            # Step one: append the configuration change. Growing from one server it can only commit once
            # the newcomer runs, so do not wait for the commit; the newcomer comes back for step two.
            raft_call(lambda: raft.start_add_member(request.raft_address))
            response.raft_peers.extend(raft.members())
            return response
        args = {"node_id": request.node_id, "role": request.role, "grpc_address": request.grpc_address,
                "raft_address": request.raft_address, "token_hash": "" if same else token_hash}
        self.router.propose("node.register", args, internal=True)
        log.info("node admitted", extra=fields(joiner=request.node_id, role=request.role))
        response.raft_peers.extend(raft.members())
        response.admitted = True
        return response

    def approval_state(self, request: pb.JoinRequest) -> str:
        """pending / approved / rejected for a join without a token; records a new request as pending."""
        if len(request.request_secret) < 16:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT,
                             "a join without a token needs a request_secret of at least 16 characters "
                             "(cortex join sends one), or give a join token")
        secret_hash = identity.token_hash(request.request_secret)
        store = self._store()
        rows = store.query("join_requests", {"node_id": request.node_id})
        if rows and store.query("join_request.secret", {"node_id": request.node_id}) == secret_hash:
            row = rows[0]
            if row["state"] == "approved" and (row["role"], row["grpc_address"], row["raft_address"]) != (
                    request.role, request.grpc_address, request.raft_address):
                raise AgentError(grpc.StatusCode.PERMISSION_DENIED,
                                 f"approved as a {row['role']} at {row['grpc_address']}; join with those settings")
            return row["state"]
        with self._request_lock:  # counted and filed together: concurrent requests cannot pass the cap
            self._check_room(store)
            result = self.router.propose("node.request", {"node_id": request.node_id, "role": request.role,
                                                          "grpc_address": request.grpc_address,
                                                          "raft_address": request.raft_address,
                                                          "secret_hash": secret_hash}, internal=True)
        log.info("join request pending approval", extra=fields(joiner=request.node_id, role=request.role))
        return result["state"]

    def _known_request(self, request: pb.JoinRequest) -> bool:
        """The joiner asking again about its own request (same node id and secret): not a new one."""
        store = self.member.store
        if store is None or len(request.request_secret) < 16:
            return False
        return store.query("join_request.secret", {"node_id": request.node_id}) == identity.token_hash(
            request.request_secret)

    def _admit_source(self, request: pb.JoinRequest, source: str) -> None:
        """On the node the request reached, before anything is forwarded or written: a new request without a
        token spends its source's allowance, and none is taken while the cluster is full."""
        if self._known_request(request):
            return
        store = self.member.store
        if store is not None:
            self._check_room(store)
        wait = self._sources.take(source)
        if wait:
            log.warning("join request refused", extra=fields(node=request.node_id, source=source,
                                                              reason="source over its allowance"))
            raise AgentError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"too many join requests without a token from {source}; retry in {wait:.0f} s, or "
                             "join with a token (an operator makes one with `cortex token create`)")

    def _check_room(self, store) -> None:
        cap = self.member.config.membership.max_pending_requests
        waiting = sum(1 for row in store.query("join_requests", {}) if row["state"] == "pending")
        if waiting >= cap:
            raise AgentError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"the cluster already holds {waiting} join requests awaiting approval "
                             f"(membership.max_pending_requests: {cap}); retry once an operator has decided "
                             "on some (`cortex nodes pending`, then approve or reject), or join with a token "
                             "(`cortex token create` on a member)")

    def _expire_step(self) -> None:
        """Leader: drop join requests nobody decided on within membership.pending_request_ttl, so they leave
        the approval list and free their place under the cap."""
        now, ttl = time.time(), self.member.config.membership.pending_request_ttl
        if now < self._next_expiry:
            return
        self._next_expiry = now + min(60.0, max(0.5, ttl / 4))
        rows = self._store().query("join_requests", {})
        if self.router.levels.gate("node.expire_requests"):
            return  # a server still runs a version without it: the requests wait (the cap still holds)
        if any(row["state"] == "pending" and row["requested_at"] <= now - ttl for row in rows):
            result = self.router.propose("node.expire_requests", {"older_than": ttl}, internal=True)
            for node_id in result.get("expired", ()):
                log.info("join request expired", extra=fields(joiner=node_id))

    def _require_level(self, node_id: str, level: int) -> None:
        """A new replica must apply every command the servers may already have replicated."""
        needed = self.router.levels.cluster_level()
        if level < needed:
            raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"{node_id} runs state-machine level {level}, and the cluster's servers run {needed}: "
                             "it could not apply their log. Install the cluster's Cortex version (or newer) on "
                             "it, then join or promote again")

    # --- leave -----------------------------------------------------------------------------------------------
    def handle_leave(self, request: pb.LeaveRequest) -> pb.LeaveResponse:
        self.member.require_member()
        if not self.member.is_leader():
            return self.router.forward("Leave", request)
        node = next((n for n in self.member.nodes() if n["id"] == request.node_id), None)
        if node is None:
            return pb.LeaveResponse(removed=False)  # already gone (or left): a retried removal is not an error
        # Revoke first: a removal interrupted after this leaves a member without credentials (fail closed)
        # instead of a removed node with working ones. Its certificates were issued at most a lifetime ago.
        for name in (request.node_id, f"admin@{request.node_id}"):  # a server's local CLI certificate too
            self.router.propose("cert.revoke", {"name": name, "before": None, "reason": "removed",
                                                "until": time.time() + tls.cert_lifetime_days() * 86400 + 3600})
        if node["role"] == "server" and node["raft_address"]:
            if node["raft_address"] == self.member.config.raft_address:
                raise AgentError(grpc.StatusCode.UNAVAILABLE, "the leader cannot remove itself; transfer first")
            raft = self._raft
            raft_call(lambda: raft.remove_member(node["raft_address"]))
        # kept on record as `left` (membership/domain.py): shown by `cortex nodes`, counted by nothing, may rejoin
        self.router.propose("member.leave", {"node_id": request.node_id,
                                             "reason": (request.reason or "removed")[:200]}, internal=True)
        self.liveness.forget(request.node_id)
        return pb.LeaveResponse(removed=True)

    # --- promotion: a worker becomes a voting server ---------------------------------------------------------
    def handle_promote(self, request: pb.PromoteNodeRequest) -> pb.PromoteNodeResponse:
        """Leader: issue the node its server material, add it to Raft (one change at a time), wait until it
        has caught up, then record its new role. Every step is a no-op when already done, so a repeated or
        interrupted promotion (a new leader, a timeout) is finished by running it again."""
        self.member.require_member()
        if not self.member.is_leader():
            return self.router.forward("PromoteNode", request, timeout=90)
        on_record = {n["id"]: n for n in self._store().query("member.list", {})}
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
        if sum(1 for n in on_record.values() if n["role"] == "server" and n["liveness"] != "left") >= MAX_SERVERS:
            raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"the cluster already has {MAX_SERVERS} voting servers; remove one first")
        if not self._promote_lock.acquire(timeout=30):
            raise AgentError(grpc.StatusCode.UNAVAILABLE, "another promotion is in progress; retry")
        try:
            return self._promote_locked(node, request.raft_address)
        finally:
            self._promote_lock.release()

    def _promote_locked(self, node: dict, raft_address: str) -> pb.PromoteNodeResponse:
        stub = self._stub_for(node["grpc_address"])
        raft = self._raft

        def call(req: pb.BecomeServerRequest) -> pb.BecomeServerResponse:
            try:
                return stub.BecomeServer(req, timeout=30)
            except grpc.RpcError as exc:
                raise AgentError(exc.code(), f"{node['id']}: {exc.details()}") from None

        try:
            level = stub.Status(pb.StatusRequest(), timeout=10).state_machine_level
        except grpc.RpcError as exc:
            raise AgentError(exc.code(), f"{node['id']}: {exc.details()}") from None
        self._require_level(node["id"], level)
        checked = call(pb.BecomeServerRequest(raft_address=raft_address, check_only=True))
        address = checked.raft_address
        taken = next((n["id"] for n in self._store().query("member.list", {})
                      if n["raft_address"] == address and n["id"] != node["id"]), None)
        if taken:
            raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"raft address {address} is {taken}'s; pass another (`--raft HOST:PORT`)")
        log.info("promoting", extra=fields(node=node["id"], raft=address))
        raft_call(lambda: raft.start_add_member(address))  # no-op when already a member
        call(pb.BecomeServerRequest(raft_address=address, raft_secret=self.member.identity.raft_secret,
                                    raft_peers=sorted(set(raft.members()) | {address}),
                                    ca_key_pem=self.member.certs.ca()[1],
                                    server_grpc_addresses=self.member.server_grpc_addresses() + [node["grpc_address"]]))

        def caught_up() -> bool:
            status = raft.status()
            return (address in raft.members() and status.connected.get(address, False)
                    and status.match_index.get(address, 0) >= status.commit_index)

        if not wait_until(caught_up, PROMOTION_CATCH_UP, 0.05):
            raise AgentError(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"{node['id']} runs Raft at {address} but has not caught up within "
                             f"{PROMOTION_CATCH_UP:.0f} s; run the same promotion again to finish it "
                             "(it changes nothing twice)")
        self.router.propose("member.set_role", {"node_id": node["id"], "role": "server", "raft_address": address},
                            internal=True)
        log.info("promoted", extra=fields(node=node["id"], raft=address))
        return pb.PromoteNodeResponse(node_id=node["id"], raft_address=address, changed=True)

    def handle_become_server(self, request: pb.BecomeServerRequest) -> pb.BecomeServerResponse:
        """The node being promoted: take the server material, start Raft, open the enrollment port."""
        self.member.require_member()
        member = self.member
        with member.lock:
            ident, config = member.identity, member.config
            address = request.raft_address or default_raft_address(config.grpc_address)
            if ident.role == "server":
                if member.raft is not None and config.raft_address == address:
                    return pb.BecomeServerResponse(raft_address=address, already=True)
                raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"{config.node_id} is already a server with Raft at {config.raft_address}")
            problem = unbindable(address) or unbindable(authz.enroll_address(config.grpc_address))
            if problem:
                raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"cannot serve as a server: {problem}; pass another --raft address or free the port")
            if request.check_only:
                return pb.BecomeServerResponse(raft_address=address)
            if not request.raft_secret or not request.ca_key_pem:
                raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, "a promotion needs the raft secret and CA key")
            try:
                member.certs.become_server(request.ca_key_pem, ident.cluster_id)
            except (tls.TLSError, ValueError) as exc:
                raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, f"promotion: {exc}") from None
            ident = dataclasses.replace(
                ident, role="server", raft_secret=request.raft_secret, raft_peers=list(request.raft_peers),
                server_grpc_addresses=list(request.server_grpc_addresses), raft_address=address)
            identity.save(member.data_dir, ident)
            member.config = dataclasses.replace(config, role="server", raft_address=address)
            member.start_replica(ident)
            member.publish(ident)
            member.peers.reset()  # outgoing calls present the server certificate from now on
            # After this answer is on its way: serve the enrollment port too (restarting the listener now
            # would cut this very call)
            threading.Timer(0.3, self._restart_network).start()
            log.info("became a server", extra=fields(raft=address, peers=list(request.raft_peers)))
            return pb.BecomeServerResponse(raft_address=address)

    # --- heartbeats and liveness -----------------------------------------------------------------------------
    def handle_heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        self.member.require_member()
        if not self.member.is_leader():
            return self.router.forward("Heartbeat", request)
        if self.member.node(request.node_id) is None:
            # removed by an operator (or never admitted): tell it, instead of tracking a ghost
            raise AgentError(grpc.StatusCode.NOT_FOUND, f"node {request.node_id!r} is not a member of this cluster "
                             "(removed?); on that node: cortex leave, then join again")
        self.liveness.heard(request.node_id, time.monotonic())
        if self.liveness.state(request.node_id) not in (None, "alive"):
            self._revive(request.node_id)  # back from suspect/offline: say so now, not at the next tick
        return pb.HeartbeatResponse(server_grpc_addresses=self.member.server_grpc_addresses())

    def _revive(self, node_id: str) -> None:
        """Leader: replicate the return of one node heard from again, and nothing else. The whole round
        (liveness_step) reads every node's record: run for each returning heartbeat, a fleet that comes back
        together (the leader stalled past suspect_after) would cost the leader the square of its size. Nor
        does a heartbeat wait for a round under way, which replicates one transition after another: the gRPC
        threads would all wait behind it, and the heartbeats queued behind them time out and make more nodes
        suspect. Skipped, the return is replicated by the next round, within a heartbeat interval."""
        if not self._liveness_lock.acquire(blocking=False):
            return
        try:
            replica = self.member.replica
            if replica is None or not replica.raft.is_leader() or self._liveness_term != replica.raft.term():
                return  # not tracking in this term yet: the next round starts from the replicated states
            old = self.liveness.state(node_id)
            if old in (None, "alive"):
                return  # another heartbeat of the same node was first
            self.router.propose("node.liveness", {"node_id": node_id, "state": "alive"}, internal=True)
            self.liveness.apply(Transition(node_id, old, "alive"))
        finally:
            self._liveness_lock.release()

    def liveness_step(self) -> None:
        """Leader only: decide suspect/offline/alive from heartbeats and replicate the transitions."""
        with self._liveness_lock:
            self._liveness_step_locked()

    def _liveness_step_locked(self) -> None:
        replica = self.member.replica
        if replica is None or not replica.raft.is_leader():
            self._liveness_term = -1
            return
        now, term = time.monotonic(), replica.raft.term()
        nodes = [n for n in replica.store.query("nodes", {}) if n["id"] != self.member.config.node_id]
        if self._liveness_term != term:
            self.liveness.start({n["id"]: n["liveness"] for n in nodes}, now)
            self._liveness_term = term
        raft = replica.raft.status()
        for n in nodes:
            self.liveness.track(n["id"], n["liveness"], now)
            if n["role"] == "server" and raft.connected.get(n["raft_address"]):
                self.liveness.heard(n["id"], now)
        # Replicated together: a rack that loses power makes hundreds of nodes suspect in the same round
        transitions = self.liveness.evaluate(now)
        if transitions:
            outcomes = self.router.propose_all("node.liveness", [{"node_id": t.node_id, "state": t.new}
                                                                 for t in transitions])
            for transition, outcome in zip(transitions, outcomes):
                if not isinstance(outcome, AgentError):
                    self.liveness.apply(transition)
            failed = next((o for o in outcomes if isinstance(o, AgentError)), None)
            if failed is not None:  # the others are decided again next round
                raise failed
        self._forget_step()
        self._expire_step()

    def _forget_step(self) -> None:
        """Leader: drop the records of nodes that left more than liveness.forget_left_after ago."""
        now, keep = time.time(), self.member.config.liveness.forget_left_after
        if now < self._next_forget:
            return
        self._next_forget = now + min(60.0, max(0.5, keep / 4))
        for node in self._store().query("member.list", {"left_only": True}):
            if node["left_at"] is not None and node["left_at"] < now - keep:
                self.router.propose("member.forget", {"node_id": node["id"]}, internal=True)
                log.info("forgot a node that left", extra=fields(node=node["id"], left_at=node["left_at"]))

    # --- leadership, tokens, certificates --------------------------------------------------------------------
    def handle_transfer(self, request: pb.TransferLeadershipRequest) -> pb.TransferLeadershipResponse:
        self.member.require_member()
        if not self.member.is_leader():
            return self.router.forward("TransferLeadership", request, timeout=20)
        target = None
        if request.target_node_id:
            node = next((n for n in self.member.nodes() if n["id"] == request.target_node_id), None)
            if node is None or node["role"] != "server":
                raise AgentError(grpc.StatusCode.NOT_FOUND,
                                 f"no server named {request.target_node_id!r}; see `cortex nodes`")
            target = node["raft_address"]
        raft = self._raft
        try:
            raft.transfer_leadership_to(target)
        except ProposalError as exc:
            # still leading: the target is the problem (down, behind); else an election is deciding, retry
            code = grpc.StatusCode.FAILED_PRECONDITION if raft.is_leader() else grpc.StatusCode.UNAVAILABLE
            message = str(exc)
            for node in self.member.nodes():  # name servers as the operator knows them
                if node["raft_address"]:
                    message = message.replace(node["raft_address"], node["id"])
            raise AgentError(code, f"leadership not transferred: {message}") from None
        if not wait_until(lambda: bool(raft.leader_address()) and not raft.is_leader(), 10):
            raise AgentError(grpc.StatusCode.UNAVAILABLE,
                             "the target did not take over within 10 s (its election failed) and this server still "
                             "leads; check `cortex status` for a server that is up to date, then retry")
        leader = self.member.node_by_raft(raft.leader_address())
        return pb.TransferLeadershipResponse(new_leader_id=leader["id"] if leader else "", term=raft.term())

    def handle_create_token(self, request: pb.CreateTokenRequest) -> pb.CreateTokenResponse:
        self.member.require_member()
        if request.role not in ("worker", "server"):
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, "role must be worker or server")
        if request.ttl_seconds < 0 or request.uses < 0:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, "ttl and uses must not be negative")
        if not self.member.is_leader():
            return self.router.forward("CreateToken", request)
        token = identity.new_join_token(tls.ca_pin(self.member.certs.ca()[0]))
        expires_at = time.time() + request.ttl_seconds if request.ttl_seconds else None
        token_hash = identity.token_hash(token)
        self.router.propose("token.add", {"token_hash": token_hash, "role": request.role, "expires_at": expires_at,
                                          "uses": request.uses or None}, internal=True)
        log.info("join token created", extra=fields(token_id=token_hash[:12], role=request.role,
                                                     ttl=request.ttl_seconds, uses=request.uses))
        return pb.CreateTokenResponse(token=token, token_id=token_hash[:12], expires_at=expires_at or 0)

    def handle_revoke_token(self, request: pb.RevokeTokenRequest) -> pb.RevokeTokenResponse:
        self.member.require_member()
        if not self.member.is_leader():
            return self.router.forward("RevokeToken", request)
        result = self.router.propose("token.revoke", {"token_id": request.token_id}, internal=True)
        if not result["revoked"]:
            raise AgentError(grpc.StatusCode.NOT_FOUND,
                             f"no active token with id {request.token_id}; see `cortex token list`")
        return pb.RevokeTokenResponse(revoked=True)

    def handle_renew(self, request: pb.RenewCertificateRequest, peer: tls.Peer | None) -> pb.RenewCertificateResponse:
        """Sign a new certificate for the caller: same name, role and cluster as the one it presented."""
        ident = self.member.require_member()
        certs = self.member.certs
        if peer is None:
            raise AgentError(grpc.StatusCode.UNAUTHENTICATED, "renewal needs the current certificate (mTLS)")
        if not certs.can_sign():
            raise AgentError(grpc.StatusCode.FAILED_PRECONDITION, "only servers sign certificates; ask a server")
        if peer.role in authz.NODES and not any(n["id"] == peer.name for n in self.member.nodes()):
            raise AgentError(grpc.StatusCode.PERMISSION_DENIED,
                             f"node {peer.name!r} is not a member any more; it gets no new certificate")
        try:
            cert, ca = certs.sign(request.csr_pem, peer.name, peer.role, ident.cluster_id)
        except tls.TLSError as exc:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        log.info("certificate renewed for", extra=fields(name=peer.name, role=peer.role))
        return pb.RenewCertificateResponse(cert_pem=cert, ca_cert_pem=ca)


def default_raft_address(grpc_address: str) -> str:
    """A promoted worker's Raft address unless given: its gRPC host, port + 1 (as servers are laid out)."""
    host, _, port = grpc_address.rpartition(":")
    return f"{host}:{int(port) + 1}"


def unbindable(address: str) -> str:
    """Why `address` cannot be listened on here ('' when it can)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host.strip("[]"), int(port)))
    except (OSError, ValueError) as exc:
        return f"cannot listen on {address} ({exc})"
    return ""

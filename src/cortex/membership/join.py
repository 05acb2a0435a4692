"""The joining node's side of membership: create a cluster, join one (with a token, or as a request an
operator approves), finish a server's two-step join, and leave.

A join goes to a server's enrollment port (`enroll.call_join`, the one network call here, which the agent
passes in): this node has no certificate yet, so the server is checked against the CA its token pins before
the token is sent.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import grpc

from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex.client import channel_options
from cortex.core import domain, durable
from cortex.membership import enroll, identity
from cortex.membership.admission import Admission
from cortex.membership.identity import Identity
from cortex.node.logs import fields
from cortex.node.member import NOT_IN_A_CLUSTER, AgentError, Member
from cortex.node.peers import FORWARD_TIMEOUT
from cortex.node.router import Router, retry_while_unavailable
from cortex.raft.consensus import wait_until
from cortex.security import tls

log = logging.getLogger("cortex.agent")

APPROVAL_POLL = 1.0  # how often a node whose join awaits an operator asks again
JOIN_REQUEST_FILE = "join-request.json"  # the pending request's address and secret (mode 0600)
CONFIG_JOIN_FOR = 300.0  # how long a join from the config file keeps trying


class EnrollCall(Protocol):
    def __call__(self, address: str, request: pb.JoinRequest, pin: str, options: list,
                 timeout: float) -> tuple[pb.JoinResponse, str]: ...


# A join is one call that may take long anyway: its connection gets time for a slow handshake (a small board,
# an emulated appliance booting beside others), which the agent's short per-attempt limit would never allow.
JOIN_CONNECT_TIMEOUT_MS = 10_000


class Joiner:
    """`restart_network()` serves the ports with the credentials that apply after a membership change;
    `on_changed()` tells the rest of the node (health) that this node's membership changed."""

    def __init__(self, member: Member, router: Router, admission: Admission, restart_network: Callable[[], None],
                 on_changed: Callable[[], None], enroll_call: EnrollCall = enroll.call_join):
        self.member = member
        self.router = router
        self.admission = admission
        self._restart_network = restart_network
        self._on_changed = on_changed
        self._enroll_call = enroll_call
        self._approval_poller: threading.Thread | None = None

    @property
    def _config(self):
        return self.member.config

    @property
    def _data_dir(self) -> Path:
        return self.member.data_dir

    # --- starting without an identity ------------------------------------------------------------------------
    def announce_wait(self) -> None:
        """A node that will wait for an operator says what for before its ports answer `cortex status`."""
        boot = self._config.bootstrap
        if self.pending_request() is None and not boot.init and boot.join is None:
            self.member.wait_for(boot.wait_reason or NOT_IN_A_CLUSTER)

    def bootstrap_from_config(self) -> None:
        boot = self._config.bootstrap
        pending = self.pending_request()
        if pending is not None:  # restarted while an operator had not yet decided: keep asking
            self._start_approval_poller(pending["address"])
            return
        if boot.init:
            token = self.init_cluster()[1]  # for the nodes that join first; expires like every token
            (self._data_dir / "join-token").write_text(token + "\n")
            (self._data_dir / "join-token").chmod(0o600)
        elif boot.join is not None:
            threading.Thread(target=self._join_from_config, name="bootstrap-join", daemon=True).start()
        else:
            self.announce_wait()
            if boot.wait_reason:
                log.warning("waiting", extra=fields(reason=boot.wait_reason))

    def _join_from_config(self) -> None:
        join = self._config.bootstrap.join
        deadline = time.monotonic() + CONFIG_JOIN_FOR
        while not self.member.stopping.is_set() and self.member.identity is None and time.monotonic() < deadline:
            token = join.token
            if not token and join.token_file:
                try:
                    token = Path(join.token_file).read_text().strip()
                except OSError:
                    self.member.wait_for(f"join token file {join.token_file}")
                    time.sleep(0.2)
                    continue
            try:
                self.join_cluster(join.address, token, insecure_skip_ca_pin=join.insecure_skip_ca_pin)
                return
            except AgentError as exc:
                self.member.wait_for(f"joining {join.address}: {exc}")
                log.warning("join attempt failed", extra=fields(address=join.address, error=str(exc)))
                if exc.code == grpc.StatusCode.PERMISSION_DENIED:
                    return  # a refused token does not get better by retrying
                time.sleep(0.5)

    # --- a new cluster ---------------------------------------------------------------------------------------
    def init_cluster(self, token_ttl: float = 0.0) -> tuple[str, str, float]:
        """Create a new cluster with this node as its first server. Returns (cluster id, join token, when the
        token expires). The token admits servers, so it lives `token_ttl` seconds (membership.init_token_ttl
        when 0): long enough to join the first nodes, not a standing key to the cluster."""
        if token_ttl < 0:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, "the init token's lifetime must not be negative")
        member, config = self.member, self._config
        with member.lock:
            if member.identity is not None:
                raise AgentError(grpc.StatusCode.ALREADY_EXISTS,
                                 f"this node already belongs to cluster {member.identity.cluster_id}; "
                                 "run `cortex leave` first to start another")
            if config.role != "server":
                raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                                 "only a server can create a cluster; set node.role: server")
            cluster_id = identity.new_cluster_id()
            ident = Identity(cluster_id=cluster_id, node_id=config.node_id, role="server",
                             raft_secret=identity.new_secret(), raft_peers=[config.raft_address],
                             server_grpc_addresses=[config.grpc_address])
            member.wipe_state()
            member.certs.create_cluster(cluster_id)
            identity.save(self._data_dir, ident)
            member.start_replica(ident)
            member.publish(ident)
            self._restart_network()
            if not wait_until(member.is_leader, 15):
                raise AgentError(grpc.StatusCode.UNAVAILABLE, "the new cluster did not elect this node in 15 s")
            token = identity.new_join_token(tls.ca_pin(member.certs.ca()[0]))
            expires_at = time.time() + (token_ttl or config.membership.init_token_ttl)
            for command_type, args in (
                ("cluster.init", {"cluster_id": cluster_id}),
                ("node.register", {"node_id": config.node_id, "role": "server",
                                   "grpc_address": config.grpc_address, "raft_address": config.raft_address}),
                ("token.add", {"token_hash": identity.token_hash(token), "role": "server", "expires_at": expires_at}),
            ):
                self.router.propose(command_type, args, internal=True)
            log.info("cluster created", extra=fields(cluster_id=cluster_id))
            self._on_changed()
            return cluster_id, token, expires_at

    # --- joining ---------------------------------------------------------------------------------------------
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
        member, config = self.member, self._config
        with member.lock:
            if member.identity is not None:
                raise AgentError(grpc.StatusCode.ALREADY_EXISTS,
                                 f"this node already belongs to cluster {member.identity.cluster_id}")
            secret = "" if token else self._request_secret(address)
            key = tls.new_key_pem()
            response = self._call_join(address, token, secret, csr=tls.new_csr(key, config.node_id),
                                       insecure_skip_ca_pin=insecure_skip_ca_pin)
            if response.admission == "pending":
                member.wait_for(f"approval of this node's join request to {address}: on a member run "
                                f"`cortex nodes approve {config.node_id}` once `cortex secrets ca` there "
                                f"shows the CA pin this node saw: {member.enroll_pin}")
                return ""
            if response.admission == "rejected":
                (self._data_dir / JOIN_REQUEST_FILE).unlink(missing_ok=True)
                member.wait_for("an operator rejected this node's join request; ask them, then join again")
                raise AgentError(grpc.StatusCode.PERMISSION_DENIED, "the join request was rejected by an operator")
            ident = Identity(cluster_id=response.cluster_id, node_id=config.node_id, role=config.role,
                             raft_secret=response.raft_secret, raft_peers=list(response.raft_peers),
                             server_grpc_addresses=list(response.server_grpc_addresses),
                             pending_token="" if response.admitted else token,
                             pending_request_secret="" if response.admitted else secret,
                             join_address="" if response.admitted else address)
            if not response.cert_pem:
                raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"{address} admitted this node but returned no certificate (a cluster older than "
                                 "mTLS?); upgrade its servers first")
            member.wipe_state()
            try:
                member.certs.install(key, response.cert_pem, response.ca_cert_pem, response.ca_key_pem,
                                     response.cluster_id)
            except tls.TLSError as exc:
                raise AgentError(grpc.StatusCode.FAILED_PRECONDITION, f"join: {exc}") from None
            identity.save(self._data_dir, ident)
            (self._data_dir / JOIN_REQUEST_FILE).unlink(missing_ok=True)
            member.server_addresses = list(ident.server_grpc_addresses)
            member.start_replica(ident)
            member.publish(ident)
            self._restart_network()
            if not response.admitted:
                self.finish_join(timeout)
            log.info("joined cluster", extra=fields(cluster_id=ident.cluster_id, via=address, role=ident.role))
            self._on_changed()
            return ident.cluster_id

    def pending_request(self) -> dict | None:
        """The join request this node sent and an operator has not decided yet, if any."""
        try:
            return json.loads((self._data_dir / JOIN_REQUEST_FILE).read_text())
        except (OSError, ValueError):
            return None

    def _record_request_pin(self, pin: str) -> None:
        pending = self.pending_request() or {}
        path = self._data_dir / JOIN_REQUEST_FILE
        durable.write_atomic(path, json.dumps({**pending, "ca_pin": pin}).encode(), 0o600)

    def _request_secret(self, address: str) -> str:
        """This node's join-request secret, kept on disk so a restart keeps its place in the queue."""
        pending = self.pending_request()
        if pending is not None and pending.get("address") == address:
            return pending["secret"]
        secret = identity.new_secret()
        path = self._data_dir / JOIN_REQUEST_FILE
        fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"address": address, "secret": secret}, f)
        os.replace(path.with_suffix(".tmp"), path)
        return secret

    def _start_approval_poller(self, address: str) -> None:
        with self.member.lock:
            if self._approval_poller is not None and self._approval_poller.is_alive():
                return
            self._approval_poller = threading.Thread(target=self._await_approval, args=(address,),
                                                     name="join-approval", daemon=True)
            self._approval_poller.start()

    def _await_approval(self, address: str) -> None:
        while not self.member.stopping.wait(APPROVAL_POLL) and self.member.identity is None:
            try:
                if self._join_once(address, "", timeout=60):
                    return
            except AgentError as exc:
                if exc.code == grpc.StatusCode.PERMISSION_DENIED:
                    log.warning("join request rejected", extra=fields(address=address))
                    return
                log.info("join request not answered yet", extra=fields(address=address, error=str(exc)))

    def join_request(self, token: str, secret: str = "", csr: bytes = b"") -> pb.JoinRequest:
        config = self._config
        return pb.JoinRequest(node_id=config.node_id, role=config.role, grpc_address=config.grpc_address,
                              raft_address=config.raft_address if config.role == "server" else "",
                              token=token, request_secret=secret, csr_pem=csr,
                              state_machine_level=domain.level())

    def _call_join(self, address: str, token: str, secret: str = "", csr: bytes = b"",
                   insecure_skip_ca_pin: bool = False) -> pb.JoinResponse:
        """Join goes to the server's enrollment port (TLS; this node has no certificate yet), verified against
        the CA its token pins (enroll.py) before the token is sent."""
        member = self.member
        request = self.join_request(token, secret, csr)
        # After the first step of a join the node has the CA; an approval join pins what it saw first.
        known = tls.ca_pin(member.certs.ca()[0]) if member.identity is not None and member.certs.ready() else \
            (self.pending_request() or {}).get("ca_pin", "") if secret else ""
        try:
            pin = enroll.pin_for(token, known, insecure_skip_ca_pin)
            response, member.enroll_pin = self._enroll_call(address, request, pin,
                                                            channel_options(self._config.max_message_bytes,
                                                                            JOIN_CONNECT_TIMEOUT_MS),
                                                            FORWARD_TIMEOUT * 2)
        except enroll.EnrollError as exc:
            raise AgentError(exc.code, str(exc)) from None
        if secret and not known and self.pending_request() is not None:
            self._record_request_pin(member.enroll_pin)
        return response

    def joining(self) -> bool:
        """A server's join whose second step has not been answered yet (the background loop finishes it)."""
        ident = self.member.identity
        return ident is not None and bool(ident.pending_token or ident.pending_request_secret)

    def finish_join(self, timeout: float) -> None:
        """Second step of a server's join: ask again (Raft now running) until the cluster registers us."""
        member = self.member
        ident = member.identity
        deadline = time.monotonic() + timeout
        while True:
            try:
                if member.is_leader():
                    # A joiner votes, and can be elected, from its first step on (a new server that timed out
                    # before the leader reached it, or a leadership transfer). Then no one else can register it:
                    # they forward joins to the leader and find no record of it (VM cluster, CI). So do it here.
                    response = self.admission.handle_join(self.join_request(ident.pending_token,
                                                                            ident.pending_request_secret))
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
        ident = Identity(**{**ident.__dict__, "pending_token": "", "pending_request_secret": "", "join_address": "",
                            "raft_peers": list(response.raft_peers)})
        member.publish(ident)
        identity.save(self._data_dir, ident)

    # --- leaving ---------------------------------------------------------------------------------------------
    def leave_cluster(self) -> None:
        member = self.member
        with member.lock:
            if member.identity is None:
                raise AgentError(grpc.StatusCode.FAILED_PRECONDITION, "this node is not in a cluster")
            member.hand_over_leadership(timeout=10.0)
            request = pb.LeaveRequest(node_id=self._config.node_id, reason="left (cortex leave)")
            raft = member.raft
            if raft is None or len(raft.members()) != 1:  # the last server: the cluster ends with it
                retry_while_unavailable(lambda: self.admission.handle_leave(request))
            member.stop_replica()
            identity.remove(self._data_dir)
            member.wipe_state()
            member.certs.remove()
            member.config = member.file_config  # a promoted node joins again as its config file says
            member.publish(None, NOT_IN_A_CLUSTER)
            member.peers.reset()
            self._restart_network()
            self._on_changed()
            log.info("left the cluster")

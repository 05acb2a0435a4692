"""The write and read path: every write goes to the leader, where it is stamped (id, time, term) and
replicated; a read is answered at the level asked (stale: any replica; leader: the leader's; linearizable: any
server's replica once it has applied the commit index the leader confirmed after the read arrived, ReadIndex).

A node that is not the leader forwards the request (servers: to the leader; workers: to a server), bounded by
a hop count so that a request cannot bounce between nodes during an election.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc

from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex.core import domain
from cortex.core.commands import CommandError, Envelope, parse_args_json, validate
from cortex.node.levels import ServerLevels
from cortex.node.member import AgentError, Member
from cortex.node.peers import FORWARD_TIMEOUT
from cortex.raft.consensus import NotLeader, ProposalError, ReadUnconfirmed, wait_until
from cortex.security import authz
from cortex.security.tls import Peer

MAX_HOPS = 3
MAX_BATCH = 10_000
MAX_IDEMPOTENCY_KEY = 128
# Sent once more when the leader they were forwarded to was unavailable and another server leads now: a
# write with an idempotency key applies once however often it arrives, a read changes nothing.
SENT_AGAIN_WHEN_MOVED = ("Write", "Read")  # a batch's held commands: _resend_batch
INTERNAL_QUERIES = ("token.check", "join_request.secret")  # secrets' hashes: never answered to a caller


def write_refusal(command_type: str, args: dict, peer: Peer | None) -> str:
    """Why `peer` may not write this command ('' when it may): each domain's own rule (core.domain.refusal),
    and commands the cluster decides itself are never a client's."""
    return domain.refusal(command_type, args, peer, internal=False)


def raft_call(fn):
    """A Raft membership or leadership change; its failure is the caller's to retry."""
    try:
        return fn()
    except ProposalError as exc:
        raise AgentError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None


def retry_while_unavailable(fn, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except AgentError as exc:
            if exc.code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class LeadershipMoved(AgentError):
    """A proposal this node refused because it is handing leadership over or no longer leads: it was never
    appended, so it may go on to the new leader as it is (Router.after_hand_over)."""


class Router:
    """`stub_for(address)` is the network edge: the Cluster stub of another node."""

    def __init__(self, member: Member, stub_for: Callable[[str], Any] | None = None):
        self.member = member
        self._stub_for = stub_for or member.peers.stub
        # which state-machine level each server runs: a command only some replicas know is never proposed
        self.levels = ServerLevels(
            member.config.node_id,
            servers=lambda: member.replica.roster.servers(),  # members only: nodes that left are not in it
            ask=lambda address: self._stub_for(address).Status(pb.StatusRequest(), timeout=2),
            is_leader=member.is_leader)
        # the Cluster RPCs this node answers itself when it turns out to be the leader (membership adds its own)
        self.handlers: dict[str, Callable[[Any], Any]] = {
            "Write": lambda r: self.write(r.command, r.hops),
            "WriteBatch": self.write_batch,
            "Read": self.read,
        }

    def dispatch(self, method: str, request):
        """Run a Cluster RPC as if this node had received it (forwarded to the leader where it needs one)."""
        return self.handlers[method](request)

    # --- writes ------------------------------------------------------------------------------------------
    def write(self, command: pb.Command, hops: int = 0) -> pb.WriteResponse:
        self.member.require_member()
        try:
            args = validate(command.type, parse_args_json(command.args_json))
        except CommandError as exc:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        refused = write_refusal(command.type, args, authz.current_peer.get())
        if refused:
            raise AgentError(grpc.StatusCode.PERMISSION_DENIED, refused)
        if len(command.idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"idempotency_key is longer than {MAX_IDEMPOTENCY_KEY} characters")
        if not self.member.is_leader():
            return self.forward("Write", pb.WriteRequest(command=command, hops=hops))
        try:
            result, index, term = self._propose_checked(command.type, args, command.idempotency_key)
        except LeadershipMoved:
            # Never appended here (a hand-over held it, or this node stepped down first): the new leader takes
            # it, with the same idempotency key, instead of the caller getting an error for a routine hand-over.
            return self.after_hand_over("Write", pb.WriteRequest(command=command, hops=hops))
        return pb.WriteResponse(result_json=json.dumps(result).encode(), index=index, term=term,
                                duplicate=bool(result.pop("duplicate", False)))

    def propose(self, command_type: str, args: dict, internal: bool = False, idem: str = "") -> dict:
        """Leader-side: stamp and replicate a command; raise AgentError on failure. `internal` commands are
        the cluster's own (it is the caller's word that this one is; no check differs)."""
        try:
            args = validate(command_type, args)
        except CommandError as exc:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        return self._propose_checked(command_type, args, idem)[0]

    def propose_all(self, command_type: str, many: list[dict]) -> list[dict | AgentError]:
        """Leader-side: stamp and replicate the cluster's own commands of one type together (group commit
        puts them in a few log entries, where one propose after another takes a commit each). One outcome
        per command, in order: its result, or the AgentError that command met."""
        replica = self._replica_for(command_type)
        term = replica.raft.term()
        envelopes = []
        for args in many:
            try:
                args = validate(command_type, args)
            except CommandError as exc:
                raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            command_id = uuid.uuid4().hex
            envelopes.append(Envelope(type=command_type, args=args, id=command_id, ts=time.time(), term=term,
                                      idem=command_id).encode())
        out: list[dict | AgentError] = []
        for outcome in replica.committer.submit(envelopes, timeout=FORWARD_TIMEOUT):
            if isinstance(outcome, ProposalError):
                code = grpc.StatusCode.DEADLINE_EXCEEDED if outcome.maybe_applied else grpc.StatusCode.UNAVAILABLE
                out.append(AgentError(code, f"{outcome}; retry"))
            elif "error" in outcome[0]:
                stale = outcome[0]["error"].startswith("stale term")
                out.append(AgentError(grpc.StatusCode.UNAVAILABLE if stale else grpc.StatusCode.FAILED_PRECONDITION,
                                      outcome[0]["error"]))
            else:
                out.append(outcome[0])
        return out

    def _replica_for(self, command_type: str):
        """This node's replica, to propose `command_type` on: refused when it holds none, or while a server
        still runs a state-machine level below the command's (node/levels.py)."""
        replica = self.member.replica
        if replica is None:
            raise AgentError(grpc.StatusCode.UNAVAILABLE, "this node holds no replica (left, or a worker); retry")
        behind = self.levels.gate(command_type)
        if behind:
            raise AgentError(grpc.StatusCode.FAILED_PRECONDITION, behind)
        return replica

    def _propose_checked(self, command_type: str, args: dict, idem: str) -> tuple[dict, int, int]:
        replica = self._replica_for(command_type)
        term = replica.raft.term()
        command_id = uuid.uuid4().hex
        env = Envelope(type=command_type, args=args, id=command_id, ts=time.time(), term=term,
                       idem=idem or command_id)
        try:
            result, index = replica.committer.propose(env.encode(), timeout=FORWARD_TIMEOUT)
        except NotLeader:
            raise LeadershipMoved(grpc.StatusCode.UNAVAILABLE, "leadership changed; retry") from None
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
        self.member.require_member()
        if len(request.commands) > MAX_BATCH:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_BATCH} commands per batch")
        # Refusals are judged on the node the caller reached, as for a single write: a forwarding server's
        # own certificate must not lend the caller its role.
        peer = authz.current_peer.get()
        checked: list[dict | str] = []
        for command in request.commands:
            try:
                args = validate(command.type, parse_args_json(command.args_json))
            except CommandError as exc:
                checked.append(str(exc))
                continue
            checked.append(write_refusal(command.type, args, peer) or args)
        replica = self.member.replica
        if replica is None or not replica.raft.is_leader():
            return self._forward_batch(request, checked)
        prepared: list[bytes | str] = []
        term = replica.raft.term()
        for command, args in zip(request.commands, checked):
            if isinstance(args, str):
                prepared.append(args)
                continue
            behind = self.levels.gate(command.type)
            if behind:  # decided on the leader, which knows the servers' levels
                prepared.append(behind)
                continue
            command_id = uuid.uuid4().hex
            env = Envelope(type=command.type, args=args, id=command_id, ts=time.time(), term=term,
                           idem=command.idempotency_key or command_id)
            prepared.append(env.encode())
        outcomes = replica.committer.submit([p for p in prepared if isinstance(p, bytes)], timeout=FORWARD_TIMEOUT)
        results, errors, moved = [], [], []
        it = iter(outcomes)
        for command, item in zip(request.commands, prepared):
            if isinstance(item, str):
                results.append(pb.WriteResponse())
                errors.append(item)
                continue
            outcome = next(it)
            if isinstance(outcome, Exception):
                if isinstance(outcome, NotLeader):
                    moved.append((len(results), command))
                results.append(pb.WriteResponse())
                errors.append(str(outcome))
                continue
            result, index = outcome
            errors.append(result.get("error", ""))
            results.append(pb.WriteResponse(result_json=json.dumps(result).encode(), index=index, term=term,
                                            duplicate=bool(result.get("duplicate"))))
        if moved:
            self._resend_batch(request.hops, moved, results, errors)
        return pb.WriteBatchResponse(results=results, errors=errors)

    def _resend_batch(self, hops: int, moved: list, results: list, errors: list) -> None:
        """Commands this node refused once it no longer led (a hand-over held them; never appended) go on to
        the new leader as one batch. If that fails too, their errors say so and the caller retries them."""
        try:
            answered = self.after_hand_over("WriteBatch", pb.WriteBatchRequest(commands=[c for _, c in moved], hops=hops))
        except AgentError:
            return
        for (i, _), result, error in zip(moved, answered.results, answered.errors):
            results[i], errors[i] = result, error

    def _forward_batch(self, request: pb.WriteBatchRequest, checked: list[dict | str]) -> pb.WriteBatchResponse:
        """The commands this node refused answer here; the others go to the leader as one batch."""
        passed = [c for c, r in zip(request.commands, checked) if not isinstance(r, str)]
        if len(passed) == len(checked):
            return self.forward("WriteBatch", request)
        answered = self.forward("WriteBatch", pb.WriteBatchRequest(commands=passed, hops=request.hops)) \
            if passed else pb.WriteBatchResponse()
        leader = iter(zip(answered.results, answered.errors))
        results, errors = [], []
        for r in checked:
            result, error = (pb.WriteResponse(), r) if isinstance(r, str) else next(leader)
            results.append(result)
            errors.append(error)
        return pb.WriteBatchResponse(results=results, errors=errors)

    # --- reads -------------------------------------------------------------------------------------------
    def read(self, request: pb.ReadRequest) -> pb.ReadResponse:
        self.member.require_member()
        level = request.level or pb.LEADER
        try:
            args = parse_args_json(request.args_json)
        except CommandError as exc:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if not isinstance(args, dict):
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, "query arguments must be a JSON object")
        if request.query in INTERNAL_QUERIES:
            raise AgentError(grpc.StatusCode.PERMISSION_DENIED, f"{request.query} is internal")
        replica = self.member.replica
        if replica is None or (level == pb.LEADER and not replica.raft.is_leader()):
            return self.forward("Read", pb.ReadRequest(query=request.query, args_json=request.args_json,
                                                       level=level, hops=request.hops))
        if level == pb.LINEARIZABLE:
            if replica.raft.is_leader():
                try:
                    index = self._read_index(replica, propagate=request.index_only)
                except NotLeader:  # handing over, or deposed while confirming: the new leader answers
                    return self.after_hand_over("Read", request)
                if request.index_only:
                    return pb.ReadResponse(read_index=index, applied_index=replica.raft.raftLastApplied,
                                           served_by=self.member.config.node_id)
            else:
                asked = self.forward("Read", pb.ReadRequest(query=request.query, args_json=request.args_json,
                                                            level=level, hops=request.hops, index_only=True))
                if request.index_only or not asked.read_index:
                    return asked  # passed on to the asker; or a leader of an earlier version read for us
                index = asked.read_index
            if not replica.raft.wait_applied(index, FORWARD_TIMEOUT):
                raise AgentError(grpc.StatusCode.UNAVAILABLE,
                                 f"this server's replica has not applied the leader's commit index {index} "
                                 f"(applied {replica.raft.raftLastApplied}); retry, or read at the leader")
        try:
            result = replica.store.query(request.query, args)
        except (KeyError, ValueError, TypeError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, str(message)) from None
        return pb.ReadResponse(result_json=json.dumps(result).encode(), applied_index=replica.store.last_applied,
                               served_by=self.member.config.node_id)

    def read_query(self, query: str, args: dict | None = None, level: int = pb.STALE) -> Any:
        """A query's answer (this replica's, or forwarded), decoded."""
        request = pb.ReadRequest(query=query, args_json=json.dumps(args or {}).encode(), level=level)
        return json.loads(self.read(request).result_json)

    def _read_index(self, replica, propagate: bool) -> int:
        """Leader: the index a linearizable read must wait for (raft/readindex.py). When leadership cannot be
        confirmed by a read round (a majority of older servers, or no answer in time) a barrier entry is
        committed instead: its index serves as well, since it was committed after the read arrived."""
        try:
            return replica.raft.read_index(propagate=propagate)
        except ReadUnconfirmed:
            pass
        noop = Envelope(type="noop", args={}, id=uuid.uuid4().hex, ts=time.time(), term=replica.raft.term(), idem="")
        try:
            return replica.committer.propose(noop.encode(), timeout=FORWARD_TIMEOUT)[1]
        except NotLeader:
            raise
        except ProposalError as exc:
            raise AgentError(grpc.StatusCode.UNAVAILABLE, f"read barrier failed: {exc}; retry") from None

    # --- forwarding --------------------------------------------------------------------------------------
    def after_hand_over(self, method: str, request):
        """Send on a request whose proposal this node refused as leader (NotLeader: a hand-over holds
        proposals back, raft/consensus.py, or it stepped down). Never appended, it goes on to the leader that
        follows once the hand-over is over; back to this node when leadership did not move."""
        raft = self.member.raft
        if raft is not None:
            wait_until(lambda: not raft.handing_over(), FORWARD_TIMEOUT)
        return self.forward(method, request)

    def forward(self, method: str, request, timeout: float = FORWARD_TIMEOUT):
        """Send a request on to the leader (servers) or to a server (workers). Bounded by a hop count."""
        if hasattr(request, "hops"):
            if request.hops >= MAX_HOPS:
                raise AgentError(grpc.StatusCode.UNAVAILABLE,
                                 "request bounced between nodes during an election; retry")
            request.hops += 1
        if self.member.raft is None:
            return self.to_servers(lambda stub: getattr(stub, method)(request, timeout=timeout))
        address = self.leader_grpc(wait=self.member.config.raft.election_timeout_max * 2)
        if not address:  # we became leader while waiting
            return self.dispatch(method, request)
        try:
            return getattr(self._stub_for(address), method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or method not in SENT_AGAIN_WHEN_MOVED \
                    or (method == "Write" and not request.command.idempotency_key):
                raise AgentError(exc.code(), exc.details() or "") from None
            error = AgentError(exc.code(), exc.details() or "")
        # The leader did not take it (its port closed as it exited after a hand-over, or it had just handed
        # over): once more to the leader that followed, if one does within an election timeout.
        try:
            moved = self.leader_grpc(wait=self.member.config.raft.election_timeout_max, unlike=address)
        except AgentError:
            raise error from None
        if not moved:
            return self.dispatch(method, request)
        try:
            return getattr(self._stub_for(moved), method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise AgentError(exc.code(), exc.details() or "") from None

    def leader_grpc(self, wait: float, unlike: str | None = None) -> str:
        """The leader's gRPC address ("" when it is this node), waiting up to `wait` seconds for an election
        to settle (or, with `unlike`, for a leader other than the one at that address)."""
        deadline = time.monotonic() + wait
        me = self.member.config.raft_address
        while True:
            raft = self.member.raft
            if raft is None:
                raise AgentError(grpc.StatusCode.UNAVAILABLE, "this node no longer runs Raft; retry")
            raft_leader = raft.leader_address()
            if raft_leader and raft_leader != me:
                node = self.member.node_by_raft(raft_leader)
                if node and node["grpc_address"] != unlike:
                    return node["grpc_address"]
            elif raft_leader == me and raft.is_leader():
                return ""
            refused = raft.journal_failure()
            if refused and not raft_leader:  # this node cannot lead; say why rather than wait out an election
                raise AgentError(grpc.StatusCode.UNAVAILABLE, f"no leader; {refused}")
            if time.monotonic() >= deadline:
                raise AgentError(grpc.StatusCode.UNAVAILABLE,
                                 "no leader: the servers have no quorum right now; retry, or check `cortex status`")
            time.sleep(0.02)

    def to_servers(self, call) -> Any:
        """Workers: try the known servers in turn (the last one that answered first)."""
        errors = []
        servers = self.member.server_addresses
        for address in list(servers):
            try:
                result = call(self._stub_for(address))
                if servers and servers[0] != address:
                    servers.remove(address)
                    servers.insert(0, address)
                return result
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise AgentError(exc.code(), exc.details() or "") from None
                errors.append(f"{address}: {exc.details()}")
        raise AgentError(grpc.StatusCode.UNAVAILABLE, "no server reachable (" + "; ".join(errors) + ")")

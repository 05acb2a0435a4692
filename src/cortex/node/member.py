"""What every part of the agent shares about this node: its configuration, credentials and peers, whether it
is in a cluster (and what it waits for while it is not), and its replica of the state (servers).

Status is read while joins, leaves and promotions run on other threads, so the facts that are read together
are published together: `Standing` pairs the identity with the reason the node waits, `Replica` bundles the
state store with the Raft node that feeds it. Each is replaced whole, never edited field by field.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from cortex.config import Config
from cortex.core.events import Event, EventBus
from cortex.core.state import StateStore
from cortex.membership import identity
from cortex.membership.identity import Identity
from cortex.membership.roster import Roster
from cortex.node.logs import fields
from cortex.node.peers import Peers
from cortex.raft import transport as raft_transport
from cortex.raft.consensus import GroupCommitter, ProposalError, RaftNode, wait_until
from cortex.raft.keys import RotatingEncryptor
from cortex.security import revocation, rotation_driver, tls
from cortex.security.certs import NodeCerts

log = logging.getLogger("cortex.agent")

NOT_IN_A_CLUSTER = "cortex init (new cluster) or cortex join ADDRESS --token TOKEN"
# what a node's data directory holds of the cluster it belonged to (removed when it leaves or joins anew)
CLUSTER_FILES = ("state.db", "state.db-wal", "state.db-shm", "raft.journal", "raft.journal.meta",
                 "raft.snapshot", "raft-members.json", "join-token", raft_transport.MARKER)


class AgentError(Exception):
    """An error for the caller, carrying the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Standing:
    """Whether this node is in a cluster, and while it is not, what it waits for (shown by `cortex status`)."""

    identity: Identity | None
    waiting_for: str = ""


@dataclass(frozen=True)
class Replica:
    """A server's copy of the state and the Raft node that replicates it."""

    store: StateStore
    raft: RaftNode
    committer: GroupCommitter
    keys: RotatingEncryptor
    roster: Roster


class Member:
    """This node as a (would-be) member of a cluster: every part of the agent reads it, and membership
    transitions (init, join, leave, promotion) change it under `lock`."""

    def __init__(self, config: Config, events: EventBus):
        self.data_dir = config.data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ident = identity.load(self.data_dir)
        if ident is not None and ident.node_id != config.node_id:
            # The cluster knows this data directory under another name: running on would register a second
            # node with the same Raft address. Renaming is leave + join, never a config edit.
            raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"node.id is {config.node_id!r} but {self.data_dir / identity.FILE_NAME} says this node "
                             f"joined as {ident.node_id!r}; restore node.id, or `cortex leave` first "
                             f"and join again under the new name")
        self.file_config = config
        if ident is not None and ident.raft_address:
            # promoted from worker: the cluster's record of this node's role and Raft address wins over the file
            config = dataclasses.replace(config, role=ident.role, raft_address=ident.raft_address)
        self.config = config
        self.events = events
        self.certs = NodeCerts(self.data_dir, config.node_id)
        self.peers = Peers(config.max_message_bytes, self.certs.node_files)
        self.revoked = revocation.RevocationList()
        self.lock = threading.RLock()  # guards membership transitions (init/join/leave/promotion)
        self.stopping = threading.Event()
        self.standing = Standing(ident)
        self.replica: Replica | None = None
        self.server_addresses: list[str] = list(ident.server_grpc_addresses) if ident else []
        self.enroll_pin = ""  # the CA pin of the last enrollment port this node talked to (shown to operators)
        self.on_raft_state_change: Callable[[], None] = lambda: None

    # --- standing ------------------------------------------------------------------------------------------
    @property
    def identity(self) -> Identity | None:
        return self.standing.identity

    @property
    def waiting_for(self) -> str:
        return self.standing.waiting_for

    def publish(self, ident: Identity | None, waiting_for: str = "") -> None:
        self.standing = Standing(ident, waiting_for)

    def wait_for(self, reason: str) -> None:
        self.standing = Standing(self.standing.identity, reason)

    def require_member(self) -> Identity:
        ident = self.identity
        if ident is None:
            raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"node {self.config.node_id} is not in a cluster yet: {self.waiting_for}")
        return ident

    # --- the replica ---------------------------------------------------------------------------------------
    @property
    def store(self) -> StateStore | None:
        replica = self.replica
        return replica.store if replica is not None else None

    @property
    def raft(self) -> RaftNode | None:
        replica = self.replica
        return replica.raft if replica is not None else None

    @property
    def committer(self) -> GroupCommitter | None:
        replica = self.replica
        return replica.committer if replica is not None else None

    def is_leader(self) -> bool:
        raft = self.raft
        return raft is not None and raft.is_leader()

    def start_replica(self, ident: Identity) -> None:
        """Servers: open the state and start Raft (workers keep none)."""
        if ident.role != "server":
            return
        store = StateStore(self.data_dir / "state.db", listener=self._on_replicated_event)
        known = [n["raft_address"] for n in store.query("nodes", {}) if n["role"] == "server" and n["raft_address"]]
        peers = sorted(set(known or ident.raft_peers) - {self.config.raft_address})
        keys = RotatingEncryptor(ident.raft_secret, self.certs.ca()[1], self.raft_generation())
        rotation_driver.restore_raft_keys(self.certs, keys)
        rc = self.config.raft
        mode = raft_transport.resolve_mode(rc.transport, self.data_dir)
        if mode == "password":
            log.warning("Raft runs on the password transport (state from before mutual TLS); once every server "
                        "runs this version set raft.transport: mtls (docs/operations/raft-transport.md)")
        transport = raft_transport.Settings(mode, rc.max_frame_bytes, rc.max_inbound_connections, self.certs.dir,
                                  refusal=self.raft_peer_refusal, owner_of=self._raft_owner)
        raft = RaftNode(store, self.config.raft_address, peers, rc, keys, self.data_dir,
                        on_state_change=lambda: self.on_raft_state_change(), name=self.config.node_id,
                        transport=transport)
        self.replica = Replica(store, raft, GroupCommitter(raft), keys, Roster(store))

    def raft_peer_refusal(self, cert_pem: bytes) -> str | None:
        """Why the holder of `cert_pem` may not speak Raft with this server (None: a current server
        certificate of this cluster). Checked at each handshake and again every second (revocations)."""
        peer = tls.peer_of(cert_pem)
        ident = self.identity
        if peer is None:
            return "the certificate names no cortex identity"
        if ident is None or peer.cluster_id != ident.cluster_id:
            return f"a certificate of cluster {peer.cluster_id}, this is {ident.cluster_id if ident else 'none yet'}"
        if peer.role != "server":
            return f"{peer.name} holds a {peer.role} certificate; only servers speak Raft"
        return self.revoked.refusal(peer.name, cert_pem)

    def _raft_owner(self, raft_address: str) -> str | None:
        try:
            node = self.node_by_raft(raft_address)
        except Exception:  # noqa: BLE001 - the replica closing; the certificate check still holds
            return None
        return node["id"] if node else None

    def stop_replica(self) -> None:
        # Let go of it before destroying it: the background thread takes a tick thread that has ended under a
        # live raft for a crash and exits the agent (a server that left then stopped with an error, and its
        # unit stayed loaded as failed).
        replica, self.replica = self.replica, None
        if replica is None:
            return
        replica.committer.close()
        replica.raft.destroy()
        wait_until(lambda: not replica.raft.tick_thread_alive(), 5)
        replica.store.close()

    def raft_generation(self) -> int:
        try:
            return int((self.certs.dir / "raft-generation").read_text())
        except (OSError, ValueError):
            return 0

    def _on_replicated_event(self, event_type: str, data: dict, index: int) -> None:
        # event/index win over same-named keys in the payload (a keyword clash here would break apply)
        log.info("event", extra=fields(**{**data, "event": event_type, "index": index}))
        self.events.publish(Event(event_type, data, index=index))

    # --- what the replica says about the cluster -----------------------------------------------------------
    def nodes(self) -> list[dict]:
        return self.store.query("nodes", {})

    def node(self, node_id: str) -> dict | None:
        """A member's record from the in-memory roster (no table read while the nodes are unchanged)."""
        return self.replica.roster.node(node_id)

    def node_by_raft(self, raft_address: str) -> dict | None:
        """From the roster too: a follower looks the leader up for every request it forwards."""
        replica = self.replica
        if replica is None or not raft_address:
            return None
        return replica.roster.node_by_raft(raft_address)

    def server_grpc_addresses(self) -> list[str]:
        return self.replica.roster.server_grpc_addresses()

    def wipe_state(self) -> None:
        for name in CLUSTER_FILES:
            path = self.data_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def hand_over_leadership(self, timeout: float) -> bool:
        """Leader: make the most caught-up follower leader (Raft TimeoutNow; transfer_leadership_to holds
        proposals back, waits for the follower to catch up and asks again when it did not win) and wait
        until another server is known as leader."""
        raft = self.raft
        if raft is None or not raft.is_leader() or not any(raft.status().connected.values()):
            return False  # not the leader, or no follower to hand over to (alone, or the others are down)
        me = self.config.raft_address
        deadline = time.monotonic() + timeout
        try:
            raft.transfer_leadership_to(None, timeout=timeout)
        except ProposalError as exc:
            log.info("leadership hand-over refused", extra=fields(reason=str(exc)))
        if not raft.is_leader():  # stepped down: the new leader makes itself known with its first heartbeat
            wait_until(lambda: raft.leader_address() not in ("", me), max(0.0, deadline - time.monotonic()))
        leader = raft.leader_address()
        moved = bool(leader) and leader != me
        log.info("leadership handed over" if moved else "leadership hand-over did not complete",
                 extra=fields(new_leader=leader, term=raft.term()))
        return moved

    def sends_heartbeats(self) -> bool:
        """Workers do; so does a promoted node until the cluster records it as a server (the leader then
        hears it through its Raft connection)."""
        ident, replica = self.identity, self.replica
        if ident is None:
            return False
        if ident.role == "worker":
            return True
        if replica is None or not ident.raft_address:
            return False
        me = replica.roster.node(self.config.node_id)
        return me is not None and me["role"] == "worker"

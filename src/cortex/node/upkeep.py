"""The agent's background loop: a round a heartbeat interval (sooner after a wake) that keeps this node a
healthy member: health, the second step of a server's join, worker heartbeats, the Raft transport key,
certificate renewal, the revocation list, CA rotation, and (leader) the members' liveness and whether each
server's log keeps up. It also feeds systemd's watchdog while its rounds keep coming."""

from __future__ import annotations

import json
import logging
import threading
import time

from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex.appliance import notify
from cortex.membership.admission import Admission
from cortex.membership.join import Joiner
from cortex.node.logs import fields
from cortex.node.member import AgentError, Member
from cortex.node.replicas import ReplicaWatch
from cortex.node.router import Router
from cortex.node.serving import Health
from cortex.node.wake import Wake
from cortex.security import ca_rotation, rotation_driver, tls

log = logging.getLogger("cortex.agent")

WORKER_HEARTBEAT = 1.0
# A background round is bounded by its calls' timeouts (seconds each); one that has not ended in this long is
# stuck, and the agent stops feeding systemd's watchdog so that it gets restarted.
BACKGROUND_STALL_LIMIT = 120.0
CA_ROTATION_IDLE_CHECK = 5.0  # how often a node looks for a CA rotation while none is under way


class Upkeep:
    def __init__(self, member: Member, router: Router, admission: Admission, joiner: Joiner, health: Health,
                 wake: Wake, replicas: ReplicaWatch):
        self.member = member
        self.router = router
        self.admission = admission
        self.joiner = joiner
        self.health = health
        self.wake = wake
        self.replicas = replicas
        self.failed = threading.Event()  # set when the agent can no longer serve and must be restarted
        self._round_started = time.monotonic()  # when the background loop last started a round
        self._ca_next_check = 0.0

    # --- the loop --------------------------------------------------------------------------------------------
    def run(self, watchdog: float | None) -> None:
        """Worker heartbeats, health refresh, resume detection, certificate and key upkeep."""
        # A watchdog shorter than the heartbeat shortens the rounds too (a test's 10 ms watchdog runs them often)
        interval = WORKER_HEARTBEAT if watchdog is None else min(WORKER_HEARTBEAT, watchdog)
        stopping = self.member.stopping
        heartbeat_failing = False
        while not stopping.is_set():
            self._round_started = time.monotonic()
            woken = self.wake.now.wait(self.wake.next_round_in(interval))
            self.wake.now.clear()
            if stopping.is_set():
                return
            raft = self.member.raft
            if raft is not None and not raft.tick_thread_alive():
                # Raft stopped ticking (it should never): exit so the supervisor restarts a clean process
                # instead of leaving a node that answers gRPC but no longer takes part in consensus.
                log.critical("raft tick thread died; exiting for a restart")
                self.failed.set()
                return
            if woken:  # the clock watch, the sleep hook or logind may have said it woke
                self.wake.handle()
            try:
                self.round()
                if heartbeat_failing:
                    log.info("servers reachable again")
                heartbeat_failing = False
            except AgentError as exc:
                if not heartbeat_failing:  # say it once, not every second
                    log.warning("cannot reach the servers", extra=fields(error=str(exc)))
                heartbeat_failing = True
            except Exception:
                log.exception("background step failed")

    def round(self) -> None:
        member = self.member
        self.health.update()
        if self.joiner.joining() and member.lock.acquire(blocking=False):  # held: the joiner finishes it itself
            try:
                self.joiner.finish_join(timeout=5)
            finally:
                member.lock.release()
        if member.sends_heartbeats():
            self.worker_heartbeat()
        self.raft_key_step()
        self.renew_step()
        self.revocation_step()
        self.ca_rotation_step()
        self.replicas.step()  # local and cheap: before the liveness step, whose proposals may fail
        self.router.levels.step()
        self.admission.liveness_step()

    def feed_watchdog(self, interval: float) -> None:
        """Feed systemd's watchdog from a thread of its own. One slow background round must not get a healthy
        agent killed: a call to a frozen leader waits out its timeout, and a server's join waits for the cluster
        to commit it (an agent aborted by WatchdogSec=30 in the middle of a slow join, CI). A background loop
        that has not started a round for BACKGROUND_STALL_LIMIT is stuck: feeding stops and systemd restarts
        the agent, as it does within WatchdogSec for a process that is frozen whole."""
        said = False
        while not self.member.stopping.wait(interval):
            stalled = time.monotonic() - self._round_started
            if stalled <= BACKGROUND_STALL_LIMIT:
                notify.sd_notify("WATCHDOG=1")
                said = False
            elif not said:
                log.critical("background loop stuck; no longer feeding the systemd watchdog",
                             extra=fields(stuck_seconds=round(stalled)))
                said = True

    # --- the steps -------------------------------------------------------------------------------------------
    def worker_heartbeat(self) -> None:
        member = self.member
        request = pb.HeartbeatRequest(node_id=member.config.node_id)
        try:
            response = self.router.to_servers(lambda stub: stub.Heartbeat(request, timeout=2))
        except AgentError:
            self.wake.servers_unreachable()
            raise
        self.wake.servers_answered()
        if response.server_grpc_addresses:
            member.server_addresses = list(response.server_grpc_addresses)

    def raft_key_step(self) -> None:
        """Servers: switch the Raft transport key once this replica has applied a `cortex secrets rotate`."""
        from cortex.security.cli import RAFT_ROTATION_KEY

        replica = self.member.replica
        if replica is None:
            return
        row = replica.store.query("kv.get", {"key": RAFT_ROTATION_KEY})
        generation = int(row["value"]) if row and str(row["value"]).isdigit() else 0
        if generation > replica.keys.generation and replica.keys.set_generation(generation):
            tls.write_file(self.member.certs.dir / "raft-generation", str(generation).encode(), 0o644)
            log.info("raft transport key rotated", extra=fields(generation=generation))

    def renew_step(self, force: bool = False) -> None:
        """Renew this node's certificate before it expires; new connections use it at once, no restart."""
        member = self.member
        ident, certs = member.identity, member.certs
        if ident is None or not certs.ready():
            return

        def remote(csr: bytes) -> tuple[bytes, bytes]:
            r = self.router.to_servers(lambda stub: stub.RenewCertificate(pb.RenewCertificateRequest(csr_pem=csr),
                                                                          timeout=5))
            return r.cert_pem, r.ca_cert_pem

        def rotation() -> int:  # `cortex secrets rotate` bumps it
            from cortex.security.cli import ROTATION_KEY

            row = self.router.read_query("kv.get", {"key": ROTATION_KEY})
            return int(row["value"]) if row and str(row["value"]).isdigit() else 0

        if certs.renew_if_due(ident.cluster_id, remote, rotation, force=force):
            member.peers.reset()  # outgoing calls present the new certificate from now on
        while certs.superseded:  # revoke what was replaced (after a grace), with the new certificate
            args = certs.superseded[0]
            self.router.write(pb.Command(type="cert.revoke", args_json=json.dumps(args).encode(),
                                         idempotency_key=f"revoke-{args['name']}-{args['before']}"))
            certs.superseded.pop(0)

    def ca_rotation_step(self) -> None:
        """`cortex secrets rotate --ca` (ca_rotation.py): the leader moves the phases, every node does its part
        and acknowledges it."""
        member = self.member
        ident, certs = member.identity, member.certs
        if ident is None or not certs.ready() or time.monotonic() < self._ca_next_check:
            return
        doc = self.replica_query("ca.rotation")
        row = doc["rotation"]
        if row is None or row["phase"] == "done":
            self._ca_next_check = time.monotonic() + CA_ROTATION_IDLE_CHECK
            return
        replica = member.replica
        if replica is not None and replica.raft.is_leader():
            members = ca_rotation.active_members(replica.store.query("nodes", {}))
            action = rotation_driver.leader_action(doc, members, *certs.ca(), ident.cluster_id, replica.keys.generation)
            if action is not None:
                self.router.propose("ca.advance", action, internal=True)
            if row["phase"] == "reissue":  # move the Raft transport to the key of the new CA
                from cortex.security.cli import RAFT_ROTATION_KEY

                current = (replica.store.query("kv.get", {"key": RAFT_ROTATION_KEY}) or {}).get("value", "0")
                if int(current or 0) < row["raft_generation"]:
                    self.router.propose("kv.put", {"key": RAFT_ROTATION_KEY, "value": str(row["raft_generation"])})
        if row["phase"] not in ("trust", "reissue", "drop"):
            return
        if rotation_driver.needs_reissue(row, certs):
            self.renew_step(force=True)
        before = certs.ca()[0]
        done = rotation_driver.node_step(row, certs, replica.keys if replica is not None else None)
        if certs.ca()[0] != before:
            member.peers.reset()  # connect with the new trusted CAs
        ack = {"rot_id": row["rot_id"], "phase": row["phase"]}
        node_id = member.config.node_id
        if done and doc["acks"].get(node_id) != ack:
            self.router.write(pb.Command(type="ca.ack", args_json=json.dumps({"node": node_id, **ack}).encode(),
                                         idempotency_key=f"ca-ack-{node_id}-{row['rot_id']}-{row['phase']}"))

    def revocation_step(self) -> None:
        """Refresh this node's copy of the revoked certificates (servers: their replica; workers: a server)."""
        ident = self.member.identity
        if ident is None or not self.member.revoked.due():
            return
        self.member.revoked.update(self.replica_query("cert.revocations"), ident.role)

    def replica_query(self, name: str):
        """A query without arguments from this server's replica, or (workers) a server's."""
        store = self.member.store
        if store is not None:
            return store.query(name, {})
        return self.router.read_query(name)

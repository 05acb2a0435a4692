"""`cortex status`: what this node is, and (servers) what its replica knows of every member."""

from __future__ import annotations

import time
from pathlib import Path

from cortex import __version__
from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex.core import domain
from cortex.membership.liveness import LivenessTracker
from cortex.node.member import AgentError, Member
from cortex.node.replicas import ReplicaWatch
from cortex.node.router import Router


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


def node_status(member: Member, router: Router, liveness: LivenessTracker,
                replicas: ReplicaWatch | None = None) -> pb.StatusResponse:
    # Read once: a join, leave or promotion on another thread replaces these whole, never field by field.
    standing, replica, config = member.standing, member.replica, member.config
    ident = standing.identity
    if ident is None:
        return pb.StatusResponse(node_id=config.node_id, role=config.role, state="uninitialized",
                                 version=__version__, waiting_for=standing.waiting_for, image_version=IMAGE_VERSION,
                                 state_machine_level=domain.level())
    response = pb.StatusResponse(cluster_id=ident.cluster_id, node_id=config.node_id, role=ident.role,
                                 version=__version__, image_version=IMAGE_VERSION, state_machine_level=domain.level())
    if replica is None:
        response.state = "worker"
        response.has_quorum = True
        try:
            leader = router.to_servers(lambda stub: stub.Status(pb.StatusRequest(), timeout=2))
            response.leader_id, response.leader_grpc_address = leader.leader_id, leader.leader_grpc_address
            response.term, response.commit_index = leader.term, leader.commit_index
            response.nodes.extend(leader.nodes)
        except AgentError as exc:
            response.waiting_for = f"servers unreachable: {exc}"
        return response
    raft = replica.raft.status()
    nodes = replica.store.query("nodes", {})
    response.state = raft.state
    response.waiting_for = replica.raft.journal_failure()  # a disk that refuses the Raft log, until it takes it
    response.term, response.commit_index = raft.term, raft.commit_index
    response.applied_index, response.has_quorum = replica.store.last_applied, raft.has_quorum
    leader = next((n for n in nodes if n["raft_address"] == raft.leader), None) if raft.leader else None
    if leader:
        response.leader_id, response.leader_grpc_address = leader["id"], leader["grpc_address"]
    now = time.monotonic()
    for node in nodes:
        entry = pb.NodeStatus(id=node["id"], role=node["role"], grpc_address=node["grpc_address"],
                              raft_address=node["raft_address"], liveness=node["liveness"],
                              replication_lag=-1, last_seen_age=-1)
        if node["id"] == config.node_id:
            entry.liveness, entry.last_seen_age = "alive", 0
            if raft.state == "leader":
                entry.replication_lag = 0
        elif raft.state == "leader":
            if node["role"] == "server" and node["raft_address"] in raft.match_index:
                entry.replication_lag = max(0, raft.commit_index - raft.match_index[node["raft_address"]])
                if replicas is not None:
                    entry.replication = replicas.state(node["raft_address"])
                    entry.stuck_for = replicas.stuck_for(node["raft_address"], now)
            heard = liveness.last_heard(node["id"])
            if heard is not None:
                entry.last_seen_age = now - heard
        response.nodes.append(entry)
    return response

"""Cluster: three servers and a worker form one cluster from their credentials alone (node1 init, the
others join with a token, booting at once); a write on one node is read on every other."""

from __future__ import annotations

import json

from tests.qemu import infra, probes
from tests.qemu.conftest import CORTEX, wait_until


def test_cluster_forms_from_credentials(lab, cluster):
    status = json.loads(cluster["node2"].succeed(f"{CORTEX} status --json"))
    members = {n["id"]: n["role"] for n in status["nodes"]}
    assert members == {"node1": "server", "node2": "server", "node3": "server", "node4": "worker"}, status
    assert status["has_quorum"] and status["leader_id"]
    for name, vm in cluster.items():
        host = infra.host(vm)
        assert host.service("cortex-agent").is_running, name
        # the join token came in as a credential and is on no console
        assert "cx1." not in vm.serial_log.read_text(errors="replace"), f"{name}: token on the console"

    # a write through node3's CLI is read on every other node
    cluster["node3"].succeed(f"{CORTEX} kv put greeting hello-from-node3")
    def read(name: str) -> str:
        rc, out, _ = cluster[name].execute(f"{CORTEX} kv get greeting --level stale")
        return out.strip() if rc == 0 else ""

    for name in ("node1", "node2", "node4"):
        assert wait_until(lambda n=name: read(n), 30, f"greeting readable on {name}") == "hello-from-node3"

    # and from outside the VMs (the lab namespace), through each server's own replica
    for address in lab.grpc("node1", "node2", "node3"):
        values = probes.get(lab.netns, address, ["greeting"], level="stale")
        assert values == {"greeting": "hello-from-node3"}, (address, values)

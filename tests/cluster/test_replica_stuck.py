"""A server whose Raft traffic goes nowhere while its gRPC answers: the leader must call it stuck, not alive.

The follower's Raft port is cut with an nftables table of the test's own (root only, loopback only), so its
Raft connection looks open to the leader for a while and liveness still says alive: what a replica that never
converges looks like from outside. The table is deleted in a `finally`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from cortex.dev import portcut
from cortex.dev.portcut import PortCut
from tests.support.cluster import Cluster
from tests.support.wait import wait_until

pytestmark = pytest.mark.skipif(bool(portcut.available()), reason=portcut.available() or "runs")

WINDOW = 6.0  # raft.replica_stuck_after for this cluster
MARGIN = 30.0  # upkeep rounds, CLI start-up and a loaded 2-core machine


def cortex(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cortex", "--addr", address, "--timeout", "5", *args],
                          capture_output=True, text=True, timeout=60)


def leader_doc(c: Cluster) -> dict:
    proc = cortex(c.node(c.leader(timeout=60)).grpc_address, "--json", "status")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def alert_keys(c: Cluster) -> set[str]:
    proc = cortex(c.node(c.leader(timeout=60)).grpc_address, "tools", "call", "list_alerts")
    assert proc.returncode == 0, proc.stderr
    return {a["key"] for a in json.loads(proc.stdout)["alerts"]}


def node_entry(doc: dict, node_id: str) -> dict:
    return next(n for n in doc["nodes"] if n["id"] == node_id)


def test_a_follower_cut_off_from_raft_is_stuck_then_clears(make_cluster):
    c = make_cluster(servers=3, raft={"replica_stuck_after": WINDOW})
    c.settle()
    # pysyncobj connects from the server with the larger address to the smaller one, so the server with the
    # lowest Raft port only accepts: dropping that port in both directions cuts all of its Raft traffic.
    target = min(c.dc.servers, key=lambda n: n.raft_address)
    port = int(target.raft_address.rsplit(":", 1)[1])
    if c.leader() == target.id:
        other = next(n.id for n in c.dc.servers if n.id != target.id)
        with c.client(target.id) as client:
            client.transfer_leadership(other)
    assert c.leader(timeout=30) != target.id
    before = node_entry(leader_doc(c), target.id)
    assert before["liveness"] == "alive" and before.get("replication", "") != "stuck", before
    assert f"node.stuck:{target.id}" not in alert_keys(c)

    with PortCut(port, name="stuck"):
        cut = time.monotonic()
        deadline, seen, writes = cut + WINDOW + MARGIN, {}, 0
        while time.monotonic() < deadline:
            leader = c.leader(timeout=60)
            with c.client(leader) as client:  # the leader keeps committing while the follower stays behind
                for _ in range(5):
                    client.put(f"stuck/{writes}", "x")
                    writes += 1
            seen = node_entry(leader_doc(c), target.id)
            if seen.get("replication") == "stuck":
                break
            time.sleep(0.5)
        detected = time.monotonic() - cut
        assert seen.get("replication") == "stuck", f"not reported stuck within {WINDOW + MARGIN}s: {seen}"
        assert int(seen["replication_lag"]) > 0 and float(seen["stuck_for"]) >= WINDOW, seen
        print(f"stuck reported {detected:.1f}s after the cut; lag {seen['replication_lag']}; "
              f"liveness {seen['liveness']}; {writes} writes")
        assert f"node.stuck:{target.id}" in alert_keys(c)
        table_out = cortex(c.node(c.leader()).grpc_address, "status")
        assert table_out.returncode == 0, table_out.stderr
        row = next(line for line in table_out.stdout.splitlines() if line.split() and line.split()[0] == target.id)
        assert "stuck" in row, table_out.stdout

    healed = time.monotonic()

    def cleared() -> dict | None:
        last = node_entry(leader_doc(c), target.id)
        if last.get("replication") != "stuck" and last["liveness"] == "alive" \
                and f"node.stuck:{target.id}" not in alert_keys(c):
            return last
        return None

    # an election after the cut heals may refuse a call for a while: ask the next leader
    wait_until(cleared, 90, f"{target.id} no longer stuck and its alert gone after the cut healed",
               interval=0.5, ignore=(AssertionError, StopIteration))
    print(f"cleared {time.monotonic() - healed:.1f}s after the cut healed")
    assert len(set(c.wait_converged(timeout=60).values())) == 1

"""Failover: power loss (QMP system_reset) of the leader while a client writes through a follower. A new
leader is elected, every write acknowledged before, during and after the crash is there, and the crashed
VM boots again, rejoins and catches up."""

from __future__ import annotations

from tests.qemu import probes, timings
from tests.qemu.conftest import BOOT_TIMEOUT, READY, wait_until


def leader_of(doc: dict) -> str:
    return doc.get("leader", "") if doc.get("state") in ("leader", "follower") else ""


# This test found two power-loss bugs: a torn Raft journal that stopped the agent from starting
# (journal.repair_journal), then a rebooted first server whose state store had rolled back to before the
# others joined and which elected itself leader of a cluster of one (split brain). Raft's log and vote are
# now fsynced and its configuration kept in raft-members.json (tests/cluster/test_journal_repair.py on loopback).
def test_failover_after_power_loss(lab, cluster):
    servers = ["node1", "node2", "node3"]
    watch = probes.watch(lab.netns, lab.grpc(*servers), log=lab.workdir / "failover-watch.jsonl")
    try:
        first = watch.wait_for(lambda d: d.get("state") == "leader", 60, "a leader")
        old = first["leader"]
        survivors = [n for n in servers if n != old]
        writer = probes.writer(lab.netns, lab.grpc(*survivors), "fo", log=lab.workdir / "failover-writer.jsonl")
        try:
            writer.wait_for(lambda d: d.get("acked") == "fo-20", 120, "20 writes acknowledged before the crash")
            crashed_at = cluster[old].crash()
            new = watch.wait_for(lambda d: d.get("state") == "leader" and d.get("leader") not in ("", old),
                                 60, f"a leader other than {old}", since=crashed_at)
            timings.record("failover", f"hard reset of leader {old} -> new leader {new['leader']} elected",
                           new["t"] - crashed_at)
            resumed = writer.wait_for(lambda d: "acked" in d, 60, "a write acknowledged after the election",
                                      since=new["t"])
            timings.record("failover", "hard reset -> first write acknowledged again", resumed["t"] - crashed_at)
            last = int(resumed["acked"].split("-")[1])
            writer.wait_for(lambda d: d.get("acked") == f"fo-{last + 20}", 120, "20 more writes after failover")
        finally:
            lines = writer.stop()
        acked = {d["acked"]: d["value"] for d in lines if "acked" in d}
        assert len(acked) >= 40

        # every acknowledged write is there (linearizable read through the new leader's cluster)
        values = probes.get(lab.netns, lab.grpc(survivors[0])[0], sorted(acked))
        missing = {k: v for k, v in acked.items() if values.get(k) != v}
        assert not missing, f"{len(missing)} acknowledged writes lost: {sorted(missing)[:10]}"

        # the crashed VM boots again, rejoins, and its own replica has every write
        _, back = cluster[old].wait_for_console(READY, timeout=BOOT_TIMEOUT)
        timings.record("failover", f"hard reset -> {old} rejoined (boot + catch-up)", back)
        # the journal is persistent (state partition): the boot the power loss cut short can still be read
        previous = cluster[old].execute("journalctl -b -1 -q --no-pager -o cat -n 20")
        assert previous[0] == 0 and previous[1].strip(), f"no journal of {old}'s boot before the reset: {previous}"
        def replica_complete() -> bool:
            replica = probes.get(lab.netns, lab.grpc(old)[0], sorted(acked), level="stale")
            return all(replica.get(k) == v for k, v in acked.items())

        try:
            wait_until(replica_complete, 60, f"{old}'s own replica has every acknowledged write", interval=1)
            address = lab.grpc(old)[0]
            watch.wait_for(lambda d: d.get("addr") == address and d.get("state") == "follower"
                           and d.get("leader") not in ("", old) and len(d.get("nodes", {})) == 4,
                           30, f"{old} following the cluster's leader, seeing all four nodes", since=crashed_at)
        except AssertionError:
            journal = lab.workdir / f"failover-{old}-agent.log"
            journal.write_text(cluster[old].execute("journalctl -b --no-pager -u cortex-agent -n 400")[1])
            raise AssertionError(f"{old} did not catch up; its agent's log since the reset: {journal}") from None
    finally:
        watch.stop()

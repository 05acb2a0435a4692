"""A data directory that runs out of space: writes fail (or the agent stops for a restart), nothing that was
acknowledged is lost, and the store is intact once there is room again. A size-capped tmpfs stands in for a
full state partition (root only, as CI runs).

In a cluster, one server whose disk fills stays up (pysyncobj's mmap'd journal died of SIGBUS there): it
leaves the leadership to the others, says why in `cortex status` and in the error of a write sent to it,
and catches up by itself once there is room again."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from cortex.client import Client, CortexError
from cortex.dev import cluster as devcluster
from tests.support.cluster import Cluster, free_base_port
from tests.support.wait import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")


def fill(disk: Path) -> Path:
    """Take every free byte of the filesystem at `disk` (unbuffered writes); returns the file to delete."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    for block in (1 << 20, 4096, 1):
        try:
            while True:
                os.write(fd, b"\0" * block)
        except OSError:
            pass
    os.close(fd)
    return filler


def test_a_full_data_disk_loses_nothing_acknowledged(tmp_path: Path):
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "cortex-test-full", str(disk)], check=True)
    directory = disk / "cluster"
    try:
        dc = devcluster.up(directory, 1, 0, free_base_port(), timeout=90)
        node = dc.servers[0]
        acked: dict[str, str] = {}
        with Client(node.grpc_address, timeout=5) as c:
            for i in range(50):
                c.put(f"before-{i}", str(i))
                acked[f"before-{i}"] = str(i)

        filler = fill(disk)

        refusals: list[str] = []
        for i in range(40):
            try:
                with Client(node.grpc_address, timeout=3) as c:
                    c.put(f"full-{i}", "x" * 2000)
                acked[f"full-{i}"] = "x" * 2000
            except CortexError as exc:
                refusals.append(exc.details)
        refused = len(refusals)
        assert refused > 0, "a full disk must refuse writes, not pretend to keep them"
        assert devcluster.alive(node.pid), f"the agent died on a full disk:\n{devcluster.tail(node.log_path)}"
        assert any("no space left on device" in r for r in refusals), refusals  # the cause, not a timeout
        with Client(node.grpc_address, timeout=5) as c:
            assert "no space left on device" in c.status().waiting_for

        filler.unlink()
        if not devcluster.alive(node.pid):  # it stopped rather than run on without its disk: start it again
            devcluster.start_node(node)
            dc.save()  # the new pid, so devcluster.down stops this process too
        def put_after() -> bool:
            with Client(node.grpc_address, timeout=3) as c:
                c.put("after", "room again")
            return True

        wait_until(put_after, 90, f"a write through {node.id} once its disk has room", interval=0.5,
                   ignore=(CortexError,), detail=lambda: devcluster.tail(node.log_path))
        with Client(node.grpc_address, timeout=5) as c:
            for key, value in acked.items():
                assert c.get(key) == value, f"acknowledged write {key} lost"
        db = sqlite3.connect(f"file:{Path(node.dir) / 'data' / 'state.db'}?mode=ro", uri=True)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()
        print(f"{refused} of 40 writes refused while full; {len(acked)} acknowledged writes all there")
    finally:
        devcluster.down(directory)
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_server_whose_disk_fills_stays_up_and_catches_up(make_cluster, tmp_path: Path):
    cluster: Cluster = make_cluster(servers=3)
    cluster.settle()
    full = cluster.node(cluster.leader())  # the leader: it must also hand the leadership over
    others = [n for n in cluster.dc.servers if n.id != full.id]
    data = Path(full.dir) / "data"
    # Its data directory moves onto a small tmpfs (same contents), then the disk is filled.
    cluster.kill(full.id, 15)
    data.rename(data.with_name("data.before"))
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "cortex-test-full", str(data)], check=True)
    try:
        shutil.copytree(data.with_name("data.before"), data, dirs_exist_ok=True,
                        ignore=lambda _dir, names: [n for n in names if n.endswith(".sock")])
        cluster.start(full.id)
        cluster.wait_healthy(60)

        def leading() -> bool:
            if cluster.leader(timeout=30) == full.id:
                return True
            with cluster.client(others[0].id) as c:
                c.transfer_leadership(full.id)
            return False

        wait_until(leading, 60, f"{full.id} leading again", interval=1, ignore=(CortexError,))
        filler = fill(data)

        # Writes go on through the others (they hold a quorum); the full server stays up and says why.
        acked: dict[str, str] = {}
        for i in range(30):
            key = f"while-full-{i}"
            with cluster.client(others[i % 2].id, timeout=10) as c:
                c.write("kv.put", {"key": key, "value": "v" * 3000}, retry_for=60)
            acked[key] = "v" * 3000
        assert devcluster.alive(full.pid), f"{full.id} died on a full disk:\n{devcluster.tail(full.log_path)}"

        def refusal() -> str:
            with cluster.client(full.id, timeout=10) as c:
                waiting = c.status().waiting_for
            return waiting if "no space left on device" in waiting else ""

        shown = wait_until(refusal, 60, f"{full.id}'s status naming its full disk", interval=0.5,
                           ignore=(CortexError,), detail=lambda: devcluster.tail(full.log_path))
        assert str(data) in shown and f"node {full.id}" in shown, shown
        assert cluster.leader(timeout=30, exclude=(full.id,)) != full.id
        with cluster.client(full.id, timeout=10) as c:  # not its own to append: it goes to the leader
            c.write("kv.put", {"key": "through-the-full-one", "value": "x"}, retry_for=30)
        acked["through-the-full-one"] = "x"
        log_text = full.log_path.read_text(errors="replace")
        assert log_text.count("raft journal write failed") == 1, "the failure is logged once, not per attempt"
        assert "SIGBUS" not in log_text and "Traceback" not in log_text.split("raft journal write failed")[-1]

        # Room again: the server resumes by itself, catches up and agrees with the others.
        filler.unlink()
        wait_until(lambda: not refusal(), 60, f"{full.id} writing its journal again", interval=0.5,
                   ignore=(CortexError,))
        digests = cluster.wait_converged(60)
        assert len(set(digests.values())) == 1, digests
        with cluster.client(full.id, timeout=10) as c:
            c.write("kv.put", {"key": "after", "value": "room again"}, retry_for=30)
            for key, value in acked.items():
                assert c.get(key) == value, f"acknowledged write {key} lost"
    finally:
        cluster.kill(full.id, 9)  # before the unmount, so nothing holds the tmpfs
        subprocess.run(["umount", "-l", str(data)], check=False)

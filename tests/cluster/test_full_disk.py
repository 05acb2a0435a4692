"""A data directory that runs out of space: writes fail (or the agent stops for a restart), nothing that was
acknowledged is lost, and the store is intact once there is room again. A size-capped tmpfs stands in for a
full state partition (root only, as CI runs)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from cortex.client import Client, CortexError
from cortex.dev import cluster as devcluster
from tests.support.cluster import free_base_port
from tests.support.wait import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")


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

        filler = disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)  # take every free byte (unbuffered)
        for block in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * block)
            except OSError:
                pass
        os.close(fd)

        refused = 0
        for i in range(40):
            try:
                with Client(node.grpc_address, timeout=3) as c:
                    c.put(f"full-{i}", "x" * 2000)
                acked[f"full-{i}"] = "x" * 2000
            except CortexError:
                refused += 1
        assert refused > 0, "a full disk must refuse writes, not pretend to keep them"

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

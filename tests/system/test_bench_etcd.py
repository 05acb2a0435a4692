"""Quick check of the etcd side of the benchmark (bench/etcd.py).

Starts a real 3-member etcd cluster on 127.0.0.1, writes through the gRPC
client and reads the values back.  Skipped when the Debian etcd-server package
(/usr/bin/etcd) is not installed.
"""

import os
import sys
from pathlib import Path

import pytest

ETCD_BIN = "/usr/bin/etcd"

pytestmark = [
    pytest.mark.skipif(
        not os.path.exists(ETCD_BIN),
        reason=f"{ETCD_BIN} not installed (apt-get install -y etcd-server etcd-client)",
    ),
    pytest.mark.timeout(120),
]

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # `bench` is a top-level package at the repo root
    sys.path.insert(0, _ROOT)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is needed to compile bench/etcd_kv.proto")
    from bench.etcd import EtcdCluster

    with EtcdCluster(tmp_path_factory.mktemp("etcd"), members=3) as c:
        yield c
    assert c.pids(alive_only=True) == []


def test_put_and_linearizable_get(cluster):
    from bench.etcd import EtcdClient

    assert len(cluster.endpoints()) == 3
    assert all(ep.startswith("127.0.0.1:") for ep in cluster.endpoints())
    leader = cluster.leader_endpoint()
    follower = cluster.follower_endpoint()
    assert leader != follower

    with EtcdClient(leader) as lc, EtcdClient(follower) as fc:
        lc.put("t/hello", b"world")
        assert lc.get("t/hello", linearizable=True) == b"world"
        # A linearizable read through a follower must see the acknowledged write.
        assert fc.get("t/hello", linearizable=True) == b"world"
        assert fc.get("t/missing", linearizable=True) is None
        # Write via the follower (forwarded to the leader), read back on the leader.
        fc.put("t/via-follower", b"\x00\x01binary")
        assert lc.get("t/via-follower") == b"\x00\x01binary"
        assert fc.get("t/via-follower", linearizable=False) in (b"\x00\x01binary", None)


def test_pipelined_batch(cluster):
    from bench.etcd import EtcdClient

    items = [(f"p/{i:04d}", f"v{i}".encode()) for i in range(200)]
    with EtcdClient(cluster.follower_endpoint()) as c:
        assert c.put_many_pipelined(items, concurrency=16) == len(items)
        for key, value in items[::17] + items[-1:]:
            assert c.get(key) == value


def test_measure_helpers(cluster):
    from bench import measure
    from bench.etcd import EtcdClient

    with EtcdClient(cluster.leader_endpoint()) as c:
        lat = measure.sequential_put_latency(c, 5)
        assert len(lat) == 5 and all(x > 0 for x in lat)
        assert measure.pipelined_throughput(c, 50, 8) > 0
        assert len(measure.read_latency(c, 5, linearizable=True)) == 5
    p = measure.percentiles([1.0, 2.0, 3.0, 4.0])
    assert p["p50"] == pytest.approx(2.5) and p["max"] == 4.0
    rss, cpu = measure.idle_usage(cluster.pids(), 0.2)
    assert len(rss) == 3 and all(r > 0 for r in rss) and len(cpu) == 3
    assert cluster.rss_bytes(0) > 0
    text = measure.table([["etcd", 1.5, 10]], ["system", "ms", "n"])
    assert "etcd" in text and "1.500" in text

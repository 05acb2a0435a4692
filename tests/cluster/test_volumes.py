"""Volume pulls between real agents: the Volumes gRPC service every agent serves on its mutual-TLS port,
read by RemoteVolumeSync with a node certificate, as a node taking a service over does."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import grpc
import pytest

from cortex._proto.cortex.v1 import ha_pb2 as pb
from cortex._proto.cortex.v1 import ha_pb2_grpc as pb_grpc
from cortex.client import channel_options, secure_channel
from cortex.ha import volume_files as vf
from cortex.ha.volumes import RemoteVolumeSync, VolumeSyncError
from cortex.security import tls
from tests.support.cluster import module_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from module_cluster(tmp_path_factory.mktemp("volumes"), servers=1, workers=1)


def data_dir(cluster, node_id: str) -> Path:
    return Path(cluster.node(node_id).dir) / "data"


def node_files(cluster, node_id: str) -> tls.ClientFiles:
    files = tls.client_files(data_dir(cluster, node_id) / "tls", ("node",))
    assert files is not None
    return files


@pytest.fixture(scope="module")
def sync(cluster):
    """Pulls as the worker w1 makes them: its own node certificate, addresses from the dev cluster."""
    syncer = RemoteVolumeSync(lambda node: cluster.node(node).grpc_address, lambda: node_files(cluster, "w1"))
    yield syncer
    syncer.close()


def tree(root: Path) -> dict[str, tuple]:
    """Everything a pull must reproduce: kind, content, permission bits, modification time."""
    out = {}
    for entry in vf.scan(root):
        path = root / entry.path
        content = path.read_bytes() if entry.kind == "file" else b""
        out[entry.path] = (entry.kind, content, entry.mode, entry.mtime_ns)
    return out


def volume(cluster, service: str) -> Path:
    path = vf.volume_dir(data_dir(cluster, "n1"), service)
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_pulls_are_incremental_and_apply_deletions(cluster, sync, tmp_path):
    src = volume(cluster, "web")
    big = bytearray(os.urandom(6 * vf.BLOCK_SIZE + 123))
    (src / "big.bin").write_bytes(big)
    (src / "conf").mkdir()
    (src / "conf" / "app.yaml").write_text("port: 80\n")
    (src / "conf" / "secret").write_text("s3cr3t")
    os.chmod(src / "conf" / "secret", 0o600)
    (src / "old").mkdir()
    (src / "old" / "gone.txt").write_text("soon deleted")
    (src / "empty").write_bytes(b"")
    dest = tmp_path / "volume"

    first = sync.pull("web", "n1", dest)
    assert tree(dest) == tree(src)
    assert first.bytes_copied == len(big) + len("port: 80\n") + len("s3cr3t") + len("soon deleted")
    assert first.source_mtime == pytest.approx(max(os.stat(src / p).st_mtime for p in tree(src)), abs=1e-6)

    second = sync.pull("web", "n1", dest)
    assert (second.files_changed, second.bytes_copied) == (0, 0)

    big[vf.BLOCK_SIZE + 7] ^= 0xFF  # one byte of the second block
    with open(src / "big.bin", "r+b") as f:
        f.seek(vf.BLOCK_SIZE + 7)
        f.write(big[vf.BLOCK_SIZE + 7:vf.BLOCK_SIZE + 8])
    (src / "conf" / "new.txt").write_text("added")
    (src / "conf" / "app.yaml").unlink()
    (src / "old" / "gone.txt").unlink()
    (src / "old").rmdir()
    (dest / "stray").write_text("only at the destination")  # not in the source: deleted too

    third = sync.pull("web", "n1", dest)
    assert tree(dest) == tree(src)
    assert (dest / "big.bin").read_bytes() == bytes(big)
    assert third.bytes_copied == vf.BLOCK_SIZE + len("added")  # the changed block and the new file only
    assert third.files_changed == 6  # big.bin, new.txt written; app.yaml, old/gone.txt, old/, stray deleted
    assert not list(dest.rglob(".cortex-pull-*"))


def test_a_file_changed_while_it_is_read_is_consistent_at_the_end(cluster, sync, tmp_path):
    src = volume(cluster, "busy")
    path = src / "journal.bin"
    blocks = 32

    def block_of(index: int, version: int) -> bytes:
        return (index.to_bytes(4, "big") + version.to_bytes(4, "big")) * (vf.BLOCK_SIZE // 8)

    path.write_bytes(b"".join(block_of(i, 0) for i in range(blocks)))
    finished = threading.Event()

    def writer():  # rewrites blocks in place, half a block at a time, as a database does, while the pull reads
        half = vf.BLOCK_SIZE // 2
        with open(path, "r+b") as f:
            for version in range(1, 301):
                index = version % blocks
                data = block_of(index, version)
                for part in (0, 1):
                    f.seek(index * vf.BLOCK_SIZE + part * half)
                    f.write(data[part * half:(part + 1) * half])
                    f.flush()
                    time.sleep(0.001)
        finished.set()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        sync.pull("busy", "n1", tmp_path / "busy")
        writer_done_first = finished.is_set()
    finally:
        thread.join()
    pulled = (tmp_path / "busy" / "journal.bin").read_bytes()
    for index in range(blocks):  # never half of one write and half of another inside a block
        block = pulled[index * vf.BLOCK_SIZE:(index + 1) * vf.BLOCK_SIZE]
        assert block == block[:8] * (vf.BLOCK_SIZE // 8), f"block {index} is torn"
    if writer_done_first:  # the pull outlasted the writes: it ended on the final file
        assert pulled == path.read_bytes()
    sync.pull("busy", "n1", tmp_path / "busy")
    assert (tmp_path / "busy" / "journal.bin").read_bytes() == path.read_bytes()


def test_paths_leaving_the_volume_are_refused(cluster, sync, tmp_path):
    src = volume(cluster, "sneaky")
    (src / "fine.txt").write_text("ok")
    key_path = "../../../tls/node.key"  # from <data_dir>/services/sneaky/volume
    assert (src / key_path).resolve().exists()
    stub = pb_grpc.VolumesStub(secure_channel(cluster.node("n1").grpc_address, node_files(cluster, "w1"),
                                              channel_options()))
    for path in (key_path, "/etc/passwd", "fine.txt/../../x"):
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Read(pb.VolumeReadRequest(service="sneaky", path=path, block_size=vf.BLOCK_SIZE, blocks=[0]),
                           timeout=10))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Manifest(pb.VolumeManifestRequest(service="../../tls"), timeout=10))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    os.symlink(key_path, src / "link")  # a symlink is never followed by the source, nor installed by a pull
    os.symlink("../../..", src / "up")
    for path in ("link", "up/tls/node.key"):
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Read(pb.VolumeReadRequest(service="sneaky", path=path, block_size=vf.BLOCK_SIZE, blocks=[0]),
                           timeout=10))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(VolumeSyncError, match="is a symlink"):
        sync.pull("sneaky", "n1", tmp_path / "sneaky")
    assert not any(p.is_symlink() for p in (tmp_path / "sneaky").rglob("*"))


def test_only_node_certificates_read_volumes(cluster, tmp_path):
    volume(cluster, "web")
    admin = tls.client_files(data_dir(cluster, "n1") / "tls", ("admin",))
    assert admin is not None
    sync = RemoteVolumeSync(lambda node: cluster.node(node).grpc_address, lambda: admin)
    try:
        with pytest.raises(VolumeSyncError, match="PERMISSION_DENIED"):
            sync.pull("web", "n1", tmp_path / "web")
    finally:
        sync.close()


def test_the_benchmark_pulls_on_this_cluster(cluster, capsys):
    """bench/volumes.py end to end but for its own cluster: a tiny volume, its three pulls and its table."""
    from bench import volumes as bench_volumes

    result = bench_volumes.pulls(cluster.dc, mib=2, files=2, change=0.25)
    full, unchanged, incremental = result["results"]
    assert full["bytes_copied"] == result["volume_bytes"] == 2 * 1024 * 1024 and unchanged["bytes_copied"] == 0
    assert incremental["bytes_copied"] == incremental["blocks_rewritten"] * vf.BLOCK_SIZE > 0
    bench_volumes.report(result)
    assert "incremental (25% of blocks)" in capsys.readouterr().out

"""Volume pulls against the real Volumes servicer in this process (a real gRPC server on loopback with mutual
TLS and node certificates of a CA made here): what a faulty network or a hostile source can send, which real
agents never do. The agents' side is tests/cluster/test_volumes.py."""

from __future__ import annotations

import os
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from cortex._proto.cortex.v1 import ha_pb2 as pb
from cortex._proto.cortex.v1 import ha_pb2_grpc as pb_grpc
from cortex.ha import volume_files as vf
from cortex.ha.volume_service import VolumesService
from cortex.ha.volumes import RemoteVolumeSync, VolumeSyncError
from cortex.security import tls


class Flaky(VolumesService):
    """Corrupts the first piece of every block the first time it is sent."""

    def __init__(self, data_dir: Path):
        super().__init__(data_dir)
        self.corrupted: set[tuple[str, int]] = set()

    def Read(self, request, context):
        for chunk in super().Read(request, context):
            key = (request.path, chunk.block)
            if key not in self.corrupted and chunk.data:
                self.corrupted.add(key)
                data = bytearray(chunk.data)
                data[0] ^= 0xFF
                chunk = pb.VolumeChunk(block=chunk.block, data=bytes(data), end=chunk.end)
            yield chunk


class Hostile(VolumesService):
    """A source whose manifest names a path outside the volume."""

    def Manifest(self, request, context):
        yield pb.VolumeEntry(path="../escaped", kind="file", size=0, mode=0o644, exists=True,
                             block_size=vf.BLOCK_SIZE, digest=vf.digest_of([]))


CA = tls.new_ca("c-1")


def node_files(name: str, role: str) -> tls.ClientFiles:
    cert, key = tls.issue(*CA, name, role, "c-1")
    return tls.ClientFiles(CA[0], cert, key)


def serve(servicer) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_VolumesServicer_to_server(servicer, server)
    files = node_files("n1", "server")
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(files.key, files.cert)], root_certificates=files.ca, require_client_auth=True))
    server.start()
    return server, f"127.0.0.1:{port}"


def syncer(address: str, role: str = "worker") -> RemoteVolumeSync:
    files = node_files("w1", role)
    return RemoteVolumeSync(lambda node: address, lambda: files)


def test_a_corrupted_block_is_refused_and_fetched_again(tmp_path):
    volume = vf.volume_dir(tmp_path / "src", "db")
    volume.mkdir(parents=True)
    content = os.urandom(3 * vf.BLOCK_SIZE + 1000)
    (volume / "data.bin").write_bytes(content)
    servicer = Flaky(tmp_path / "src")
    server, address = serve(servicer)
    try:
        sync = syncer(address)
        report = sync.pull("db", "a", tmp_path / "dest")
        sync.close()
    finally:
        server.stop(0)
    assert len(servicer.corrupted) == 4  # every block arrived corrupted once ...
    assert (tmp_path / "dest" / "data.bin").read_bytes() == content  # ... and none of them was installed
    assert report.bytes_copied == 2 * len(content)  # each block crossed twice
    assert report.files_changed == 1


def test_a_path_outside_the_volume_is_refused(tmp_path):
    vf.volume_dir(tmp_path / "src", "db").mkdir(parents=True)
    server, address = serve(Hostile(tmp_path / "src"))
    try:
        sync = syncer(address)
        with pytest.raises(VolumeSyncError, match="outside the volume"):
            sync.pull("db", "a", tmp_path / "dest" / "volume")
        sync.close()
    finally:
        server.stop(0)
    assert not (tmp_path / "dest" / "escaped").exists()


def test_a_missing_volume_says_so(tmp_path):
    server, address = serve(VolumesService(tmp_path / "src"))
    try:
        sync = syncer(address)
        with pytest.raises(VolumeSyncError, match="has no volume for service db"):
            sync.pull("db", "a", tmp_path / "dest")
        with pytest.raises(ValueError, match="service name"):
            sync.pull("../db", "a", tmp_path / "dest")
        sync.close()
    finally:
        server.stop(0)


@pytest.mark.parametrize("path", ["", "/etc/passwd", "a/../../b", "./a", "a//b", "a\x00b", "..", "a/.."])
def test_relative_paths_that_could_leave_the_volume_are_refused(path):
    with pytest.raises(vf.VolumePathError):
        vf.check_relative(path)


def test_block_sizes_keep_a_manifest_entry_small():
    assert vf.block_size_for(0) == vf.BLOCK_SIZE
    assert vf.block_size_for(vf.BLOCK_SIZE * vf.MAX_BLOCKS) == vf.BLOCK_SIZE
    big = vf.block_size_for(vf.BLOCK_SIZE * vf.MAX_BLOCKS + 1)
    assert big == 2 * vf.BLOCK_SIZE and vf.block_count(vf.BLOCK_SIZE * vf.MAX_BLOCKS + 1, big) <= vf.MAX_BLOCKS


def test_only_node_certificates_may_call_the_volumes_service():
    from cortex.security import authz, tls

    for role in ("server", "worker"):
        assert authz.refusal("/cortex.v1.Volumes/Read", tls.Peer("n1", role, "c-1"), "c-1") is None
    for role in ("admin", "operator", "reader"):
        code, message = authz.refusal("/cortex.v1.Volumes/Manifest", tls.Peer("a", role, "c-1"), "c-1")
        assert code == grpc.StatusCode.PERMISSION_DENIED and "server, worker" in message


def test_a_destination_that_is_not_a_directory_is_refused(tmp_path):
    (tmp_path / "file").write_text("keep me")
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    sync = RemoteVolumeSync(lambda node: "127.0.0.1:1", lambda: None)
    for dest in ("file", "link"):
        with pytest.raises(VolumeSyncError, match="not a plain directory"):
            sync.pull("db", "a", tmp_path / dest)
    assert (tmp_path / "file").read_text() == "keep me" and not (tmp_path / "elsewhere").exists()


def test_the_servicer_itself_refuses_callers_without_a_node_certificate(tmp_path):
    """Defence in depth: where no role interceptor runs (a node serving plaintext), the servicer refuses."""
    vf.volume_dir(tmp_path / "src", "db").mkdir(parents=True)
    server, address = serve(VolumesService(tmp_path / "src"))
    try:
        sync = syncer(address, role="admin")
        with pytest.raises(VolumeSyncError, match="PERMISSION_DENIED.*node certificates"):
            sync.pull("db", "n1", tmp_path / "dest")
        sync.close()
        plain = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_VolumesServicer_to_server(VolumesService(tmp_path / "src"), plain)
        port = plain.add_insecure_port("127.0.0.1:0")
        plain.start()
        try:
            stub = pb_grpc.VolumesStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Manifest(pb.VolumeManifestRequest(service="db"), timeout=10))
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            plain.stop(0)
    finally:
        server.stop(0)


class Restless(VolumesService):
    """A source whose service writes between any two manifests."""

    def Manifest(self, request, context):
        path = vf.volume_dir(self.data_dir, request.service) / "wal"
        with open(path, "r+b") as f:
            f.write(os.urandom(64))
        yield from super().Manifest(request, context)


def test_a_volume_that_never_settles_fails_after_its_rounds_and_says_what_to_do(tmp_path):
    volume = vf.volume_dir(tmp_path / "src", "db")
    volume.mkdir(parents=True)
    (volume / "wal").write_bytes(os.urandom(4 * vf.BLOCK_SIZE))
    server, address = serve(Restless(tmp_path / "src"))
    try:
        sync = RemoteVolumeSync(lambda node: address, lambda: node_files("w1", "worker"), max_rounds=2)
        with pytest.raises(VolumeSyncError, match="kept changing during 2 rounds.*shut the service down on n1"):
            sync.pull("db", "n1", tmp_path / "dest")
        sync.close()
    finally:
        server.stop(0)
    assert [p.name for p in (tmp_path / "dest").iterdir()] == ["wal"]  # a whole file, no leftovers

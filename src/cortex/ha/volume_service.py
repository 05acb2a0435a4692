"""The `cortex.v1.Volumes` gRPC service every agent serves: the manifest of a service's volume and streamed
reads of the blocks a peer is missing. Read-only: it never changes the volume it serves.

Only node certificates reach it (security/authz.py, NODE_SERVICES), since a volume is a service's data.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import grpc

from cortex._proto.cortex.v1 import ha_pb2 as pb
from cortex._proto.cortex.v1 import ha_pb2_grpc as pb_grpc
from cortex.ha import volume_files as vf
from cortex.security import authz

log = logging.getLogger("cortex.ha")


def to_message(entry: vf.Entry) -> pb.VolumeEntry:
    return pb.VolumeEntry(path=entry.path, kind=entry.kind, size=entry.size, mode=entry.mode,
                          mtime_ns=entry.mtime_ns, block_size=entry.block_size, blocks=entry.blocks,
                          digest=entry.digest, exists=True)


class VolumesService(pb_grpc.VolumesServicer):
    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.cache = vf.HashCache()  # hashes survive between manifests: a second pull rereads nothing

    def _root(self, service: str, context: grpc.ServicerContext) -> Path:
        # RoleCheck already refused other roles on the mutual-TLS port; a node serving plaintext (not in a
        # cluster yet, or a cluster made before mTLS) has no interceptor, and no certificate proves anything
        peer = authz.peer_from_context(context)
        if peer is None or peer.role not in authz.NODES:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          "volumes are served to node certificates of this cluster only, over mutual TLS")
        try:
            return vf.volume_dir(self.data_dir, service)
        except vf.VolumePathError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # not reached: abort raises

    def Manifest(self, request, context):
        root = self._root(request.service, context)
        try:
            st = os.stat(root, follow_symlinks=False)
        except FileNotFoundError:
            yield pb.VolumeEntry(exists=False)
            return
        if not stat.S_ISDIR(st.st_mode):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"{root} is not a directory (a symlink?); a volume must be a plain directory")
        for entry in vf.scan(root, self.cache, (request.service,)):
            yield to_message(entry)

    def Read(self, request, context):
        root = self._root(request.service, context)
        try:
            fd = vf.open_beneath(root, request.path)
        except vf.VolumePathError as exc:
            log.warning("volume read refused: service %s path %r", request.service, request.path)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except FileNotFoundError:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"{request.path} is no longer in the volume of {request.service}; ask for the manifest again")
        except OSError as exc:  # ELOOP/ENOTDIR: a symlink on the way
            log.warning("volume read refused: service %s path %r", request.service, request.path)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{request.path}: cannot be read inside the volume ({os.strerror(exc.errno or 0)}); "
                          "symlinks are never followed")
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{request.path} is not a regular file")
            block = request.block_size
            if block < vf.BLOCK_SIZE or block & (block - 1):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"block_size {block}: a power of two of at least {vf.BLOCK_SIZE}, as the manifest says")
            for index in request.blocks:
                offset, end = index * block, (index + 1) * block
                while True:
                    want = min(vf.PIECE, end - offset)
                    data = os.pread(fd, want, offset)
                    offset += len(data)
                    last = len(data) < want or offset >= end  # a short read: the file ends in this block
                    yield pb.VolumeChunk(block=index, data=data, end=last)
                    if last:
                        break
                if not context.is_active():
                    return
        finally:
            os.close(fd)


def add_to_server(server: grpc.Server, data_dir: Path) -> None:
    """Serve the volumes below `data_dir` on `server` (node/serving.py)."""
    pb_grpc.add_VolumesServicer_to_server(VolumesService(data_dir), server)

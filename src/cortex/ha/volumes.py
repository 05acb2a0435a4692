"""Pulling a service's volume from the node that ran it: the takeover's and the giveback's copy of a
service's data.

`RemoteVolumeSync.pull(service, source_node, dest)` makes `dest` equal to the source node's
<data_dir>/services/<service>/volume over the `cortex.v1.Volumes` gRPC service (volume_service.py):

- incremental: files are compared block by block (SHA-256 per block) and only differing blocks move;
  entries the source no longer has are deleted;
- checked end to end: every block is hashed on arrival and compared with the manifest before it counts; a
  block that does not match is fetched again, and a file that keeps not matching has changed at the source,
  so the round ends and a fresh manifest decides;
- atomic per file: a changed file is built in a temporary file next to it (the unchanged blocks copied from
  the current one), fsynced and renamed over it, so a crash leaves the old or the new file, never a mix;
- consistent: after a round the manifest is asked again, and the pull ends only when it equals the one the
  round installed (a service still writing is retried, up to `max_rounds`);
- confined: paths with '..', absolute paths and symlinks are refused (a symlink could point anywhere on
  the node that installs it), and nothing is written through a symlink in `dest`;
- bounded in memory: one piece of one block (<= 1 MiB) at a time, whatever the file's size.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from cortex._proto.cortex.v1 import ha_pb2 as pb
from cortex._proto.cortex.v1 import ha_pb2_grpc as pb_grpc
from cortex.client import channel_options, secure_channel
from cortex.ha import volume_files as vf
from cortex.security import tls

TEMP_PREFIX = ".cortex-pull-"
BLOCK_TRIES = 3  # a block that does not match its hash this often: the file changed at the source
MANIFEST_TIMEOUT = 600.0  # hashing a large volume the first time takes a while
MIN_READ_TIMEOUT = 60.0
MIN_RATE = 1024 * 1024  # bytes/s a read is given time for, beyond MIN_READ_TIMEOUT
ROUND_PAUSE, ROUND_PAUSE_MAX = 0.1, 2.0  # between rounds of a volume that is still changing (doubling)


class VolumeSyncError(Exception):
    """A pull that could not finish; the message says why and what to do. `dest` holds whole files only."""


@dataclass(frozen=True)
class SyncReport:
    files_changed: int  # files written (new or changed) plus entries deleted
    bytes_copied: int  # block bytes received over the network
    seconds: float
    source_mtime: float  # the newest modification time in the source volume (seconds since the epoch; 0: empty)


def from_message(msg: pb.VolumeEntry) -> vf.Entry:
    return vf.Entry(msg.path, msg.kind, msg.size, msg.mode, msg.mtime_ns, msg.block_size, list(msg.blocks),
                    msg.digest)


class _SourceMoved(Exception):
    """The file changed at the source while it was read."""


def nodes_addresses(read: Callable[..., list[dict]]) -> Callable[[str], str]:
    """`address_of` from a cluster read (ClusterAPI.read): the gRPC address the `nodes` table lists."""
    def address_of(node: str) -> str:
        for row in read("nodes", {}, level="stale"):
            if row.get("id") == node:
                return row["grpc_address"]
        raise VolumeSyncError(f"node {node!r} is not a member of this cluster (`cortex nodes` lists them)")
    return address_of


class RemoteVolumeSync:
    """`address_of(node) -> "host:port"` names a node's gRPC address; `credentials()` gives this node's own
    certificate (NodeCerts.node_files): only node certificates may read volumes."""

    def __init__(self, address_of: Callable[[str], str], credentials: Callable[[], tls.ClientFiles | None],
                 max_rounds: int = 10, max_message_bytes: int = 4 * 1024 * 1024):
        self._address_of = address_of
        self._credentials = credentials
        self._max_rounds = max_rounds
        self._max_message = max_message_bytes
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()

    def abandon(self, node: str) -> None:
        """End the pulls from `node` in flight at once: its channel is closed, so their calls fail (cancelled)
        instead of waiting out their deadlines on a node that accepts connections but never answers (a frozen
        agent). The next pull from it opens a new channel."""
        try:
            address = self._address_of(node)
        except Exception:  # noqa: BLE001 - no address known: no channel to it either
            return
        with self._lock:
            channel = self._channels.pop(address, None)
        if channel is not None:
            channel.close()

    def _stub(self, node: str) -> pb_grpc.VolumesStub:
        address = self._address_of(node)
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                files = self._credentials()
                if files is None:
                    raise VolumeSyncError("this node has no certificate yet: volumes are read with a node "
                                          "certificate; join the cluster first")
                channel = secure_channel(address, files, channel_options(self._max_message))
                self._channels[address] = channel
            return pb_grpc.VolumesStub(channel)

    # --- the pull ------------------------------------------------------------------------------------------
    def pull(self, service: str, source_node: str, dest: Path) -> SyncReport:
        vf.check_service(service)
        started = time.monotonic()
        dest = Path(dest)
        if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
            raise VolumeSyncError(f"{dest} is not a plain directory (a file or a symlink); pull into a directory")
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VolumeSyncError(f"cannot create {dest}: {exc.strerror}; fix the permissions there") from None
        stub = self._stub(source_node)
        # one pull per destination at a time: a retry that overlaps the pull it retries waits for it instead of
        # deleting its temporary files
        lock = os.open(dest.parent / f".{dest.name}.pull-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._pull(stub, service, source_node, dest, started)
        except OSError as exc:
            raise VolumeSyncError(f"pulling {service} from {source_node} into {dest}: {exc}; make room or fix the "
                                  "permissions there and pull again (whole files already copied stay)") from None
        finally:
            os.close(lock)

    def _pull(self, stub, service: str, source_node: str, dest: Path, started: float) -> SyncReport:
        changed = copied = 0
        manifest = self._manifest(stub, service, source_node)
        for round_ in range(self._max_rounds):
            if round_:  # the volume moved under the last round: give the service a moment to finish writing
                time.sleep(min(ROUND_PAUSE_MAX, ROUND_PAUSE * 2 ** (round_ - 1)))
            round_changed, round_copied, complete = self._apply(stub, service, source_node, manifest, dest)
            changed += round_changed
            copied += round_copied
            again = self._manifest(stub, service, source_node)
            if complete and _same(manifest, again):
                newest = max((e.mtime_ns for e in manifest), default=0)
                return SyncReport(changed, copied, time.monotonic() - started, newest / 1e9)
            manifest = again
        raise VolumeSyncError(f"the volume of {service} on {source_node} kept changing during {self._max_rounds} "
                              f"rounds; {dest} holds whole files of several moments: shut the service down on "
                              f"{source_node} (or let it settle) and pull again")

    def _manifest(self, stub, service: str, node: str) -> list[vf.Entry]:
        try:
            messages = list(stub.Manifest(pb.VolumeManifestRequest(service=service), timeout=MANIFEST_TIMEOUT))
        except grpc.RpcError as exc:
            raise _rpc_error(exc, f"the manifest of {service} on {node}") from None
        if len(messages) == 1 and not messages[0].exists:
            raise VolumeSyncError(f"{node} has no volume for service {service} "
                                  f"(<data_dir>/services/{service}/volume); check the service and node names")
        entries = [from_message(m) for m in messages]
        for entry in entries:
            try:
                vf.check_relative(entry.path)
            except vf.VolumePathError as exc:
                raise VolumeSyncError(f"{node} sent a path outside the volume, refused: {exc}") from None
            if entry.kind == "symlink":
                raise VolumeSyncError(f"{service} on {node}: {entry.path} is a symlink; a volume holds files and "
                                      "directories only (a symlink may point anywhere on the node that installs "
                                      "it): replace it with what it points to, then pull again")
            if entry.kind not in ("file", "dir"):
                raise VolumeSyncError(f"{node} sent an entry of unknown kind {entry.kind!r} ({entry.path})")
            if entry.kind == "file" and (entry.block_size < vf.BLOCK_SIZE
                                         or len(entry.blocks) != vf.block_count(entry.size, entry.block_size)):
                raise VolumeSyncError(f"{node} sent an inconsistent manifest entry for {entry.path}")
        return entries

    def _apply(self, stub, service: str, node: str, manifest: list[vf.Entry], dest: Path) -> tuple[int, int, bool]:
        """One round: directories, then files, then deletions, then directory metadata. Returns (entries
        changed, bytes received, whether every file now matches the manifest)."""
        changed = copied = 0
        complete = True
        wanted = {e.path: e for e in manifest}
        for entry in manifest:
            if entry.kind == "dir":
                target = _safe_target(dest, entry.path)
                if target.is_symlink() or (target.exists() and not target.is_dir()):
                    target.unlink()
                    changed += 1
                if not target.exists():
                    target.mkdir(mode=0o700)
                    changed += 1
        touched: set[Path] = set()
        for entry in manifest:
            if entry.kind != "file":
                continue
            try:
                wrote, received = self._file(stub, service, entry, dest)
            except _SourceMoved:
                complete = False
                continue
            copied += received
            if wrote:
                changed += 1
                touched.add(_safe_target(dest, entry.path).parent)
        changed += _delete_extra(dest, wanted, touched)
        for entry in sorted((e for e in manifest if e.kind == "dir"), key=lambda e: e.path.count("/"),
                            reverse=True):
            target = _safe_target(dest, entry.path)
            os.chmod(target, entry.mode, follow_symlinks=False)
            os.utime(target, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)
        for directory in touched | {dest}:
            _fsync_dir(directory)
        return changed, copied, complete

    def _file(self, stub, service: str, entry: vf.Entry, dest: Path) -> tuple[bool, int]:
        target = _safe_target(dest, entry.path)
        if target.is_symlink():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
        local = None
        if target.exists():
            fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                local = vf.file_entry(fd, target.name, entry.path, block=entry.block_size)
            finally:
                os.close(fd)
        if local is not None and local.same_content(entry):
            if (local.mode, local.mtime_ns) != (entry.mode, entry.mtime_ns):
                os.chmod(target, entry.mode)
                os.utime(target, ns=(entry.mtime_ns, entry.mtime_ns))
            return False, 0
        have = local.blocks if local is not None else []
        needed = [i for i, h in enumerate(entry.blocks) if i >= len(have) or have[i] != h]
        temp = target.parent / f"{TEMP_PREFIX}{target.name[:100]}.{uuid.uuid4().hex[:8]}"
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if local is not None and len(needed) < len(entry.blocks):
                with open(target, "rb") as src:
                    _copy_into(src.fileno(), fd, min(local.size, entry.size))
            os.ftruncate(fd, entry.size)
            received = self._fetch(stub, service, entry, fd, needed)
            os.fsync(fd)
            os.fchmod(fd, entry.mode)
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
            os.close(fd)
            fd = -1
            os.rename(temp, target)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            temp.unlink(missing_ok=True)
            raise
        return True, received

    def _fetch(self, stub, service: str, entry: vf.Entry, fd: int, needed: list[int]) -> int:
        """Write the `needed` blocks into fd, each checked against the manifest; refetch the ones that fail."""
        received = 0
        for _ in range(BLOCK_TRIES):
            if not needed:
                return received
            failed, got = self._read_blocks(stub, service, entry, fd, needed)
            received += got
            needed = failed
        if needed:
            raise _SourceMoved(entry.path)
        return received

    def _read_blocks(self, stub, service: str, entry: vf.Entry, fd: int, blocks: list[int]) -> tuple[list[int], int]:
        block = entry.block_size
        timeout = MIN_READ_TIMEOUT + len(blocks) * block / MIN_RATE
        request = pb.VolumeReadRequest(service=service, path=entry.path, block_size=block, blocks=blocks)
        pending = set(blocks)
        bad: set[int] = set()
        received = 0
        current, digest, written = -1, hashlib.sha256(), 0
        try:
            for chunk in stub.Read(request, timeout=timeout):
                index = chunk.block
                if index != current:
                    if index not in pending:
                        raise VolumeSyncError(f"the source sent block {index} of {entry.path}, not asked for")
                    current, digest, written = index, hashlib.sha256(), 0
                length = vf.block_length(entry.size, block, index)
                data = chunk.data
                received += len(data)
                if written + len(data) > length:
                    bad.add(index)  # longer than the manifest's file: the file changed
                else:
                    os.pwrite(fd, data, index * block + written)
                    written += len(data)
                    digest.update(data)
                if chunk.end:
                    pending.discard(index)
                    if written != length or digest.digest() != entry.blocks[index]:
                        bad.add(index)  # never counted as installed: fetched again or the round ends
                    current = -1
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise _SourceMoved(entry.path) from None
            raise _rpc_error(exc, f"reading {entry.path}") from None
        return sorted(bad | pending), received


def _same(a: list[vf.Entry], b: list[vf.Entry]) -> bool:
    return len(a) == len(b) and all(x.path == y.path and x.same(y) for x, y in zip(a, b))


def _safe_target(dest: Path, rel: str) -> Path:
    """dest/rel, refused when any directory on the way inside dest is not a plain directory (a symlink
    planted in dest would lead a write out of it)."""
    parts = vf.check_relative(rel)
    here = dest
    for part in parts[:-1]:
        here = here / part
        if here.is_symlink() or not here.is_dir():
            raise VolumeSyncError(f"{here} is not a plain directory; refusing to write {rel} through it")
    return here / parts[-1]


def _delete_extra(dest: Path, wanted: dict[str, vf.Entry], touched: set[Path]) -> int:
    """Remove what dest holds and the manifest does not (deepest first); count the entries removed."""
    removed = 0
    for root, dirs, files in os.walk(dest, topdown=False):
        base = Path(root)
        rel_base = base.relative_to(dest).as_posix()
        for name in files + dirs:
            rel = name if rel_base == "." else f"{rel_base}/{name}"
            path = base / name
            entry = wanted.get(rel)
            st = os.lstat(path)
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
            if entry is not None and entry.kind == kind:
                continue
            if kind == "dir":
                shutil.rmtree(path)
            else:
                path.unlink()
            touched.add(base)
            if not name.startswith(TEMP_PREFIX):
                removed += 1
    return removed


def _copy_into(src: int, dst: int, size: int) -> None:
    offset = 0
    while offset < size:
        try:
            done = os.copy_file_range(src, dst, size - offset, offset, offset)
        except OSError:
            done = 0
        if done <= 0:  # not supported here: plain reads, one piece at a time
            data = os.pread(src, min(vf.PIECE, size - offset), offset)
            if not data:
                return
            done = os.pwrite(dst, data, offset)
        offset += done


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rpc_error(exc: grpc.RpcError, what: str) -> VolumeSyncError:
    code = exc.code()
    hint = {
        grpc.StatusCode.UNAVAILABLE: "the source node does not answer; check it is running and reachable, then "
                                     "pull again",
        grpc.StatusCode.DEADLINE_EXCEEDED: "the source node answered too slowly; pull again (what was copied "
                                           "stays and is not sent again)",
        grpc.StatusCode.PERMISSION_DENIED: "volumes are read with a node certificate (server or worker)",
        grpc.StatusCode.UNIMPLEMENTED: "the source node runs a version without volume pulls; update it",
    }.get(code, "")
    return VolumeSyncError(f"{what}: {code.name}: {exc.details()}" + (f"; {hint}" if hint else ""))

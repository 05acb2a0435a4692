"""A service volume's files as both ends of a volume pull see them: where a volume lives, which relative
paths are acceptable, how a file is cut into hashed blocks, and how a file is opened without following a
symlink anywhere on the way (a volume is data a service wrote, so nothing in it is trusted to point
somewhere sensible)."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BLOCK_SIZE = 256 * 1024  # the unit that moves when part of a file changed
MAX_BLOCKS = 16384  # per file: larger files get larger blocks, so one manifest entry stays < 1 MiB
PIECE = 1024 * 1024  # the largest piece of a block in one gRPC message
SERVICE_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
MODE_BITS = 0o7777


class VolumePathError(ValueError):
    """A service name or a path inside a volume that cannot be used; the message says why."""


def check_service(service: str) -> str:
    if not SERVICE_RE.match(service or "") or ".." in service:
        raise VolumePathError(f"service name {service!r}: use 1-63 lowercase letters, digits, '.', '_' and '-', "
                              "starting alphanumeric")
    return service


def volume_dir(data_dir: Path, service: str) -> Path:
    """Where a node keeps the volume of `service`."""
    return Path(data_dir) / "services" / check_service(service) / "volume"


def check_relative(path: str) -> tuple[str, ...]:
    """The components of a path relative to a volume; refuses absolute paths, '..', '.', empty components and
    NUL bytes, which could name something outside the volume."""
    if not path or path.startswith("/") or "\x00" in path or "\\" in path:
        raise VolumePathError(f"{path!r}: not a relative path inside the volume")
    parts = tuple(path.split("/"))
    if any(p in ("", ".", "..") for p in parts):
        raise VolumePathError(f"{path!r}: '..', '.' and empty components would leave the volume")
    return parts


def block_size_for(size: int) -> int:
    block = BLOCK_SIZE
    while size > block * MAX_BLOCKS:
        block *= 2
    return block


def block_count(size: int, block: int) -> int:
    return (size + block - 1) // block


def block_length(size: int, block: int, index: int) -> int:
    return max(0, min(block, size - index * block))


def digest_of(blocks: list[bytes]) -> bytes:
    return hashlib.sha256(b"".join(blocks)).digest()


def hash_blocks(fd: int, size: int, block: int) -> list[bytes]:
    """SHA-256 of each block of the open file, reading at most one block at a time."""
    out = []
    for index in range(block_count(size, block)):
        length = block_length(size, block, index)
        data = os.pread(fd, length, index * block)
        out.append(hashlib.sha256(data).digest())
        if len(data) < length:  # shrank while being read: what was read is what is hashed
            break
    return out


@dataclass
class Entry:
    """One entry of a manifest (the wire's VolumeEntry)."""

    path: str
    kind: str  # file | dir | symlink
    size: int = 0
    mode: int = 0
    mtime_ns: int = 0
    block_size: int = 0
    blocks: list[bytes] = field(default_factory=list)
    digest: bytes = b""

    def same_content(self, other: Entry) -> bool:
        return (self.kind, self.size, self.block_size, self.digest) == \
            (other.kind, other.size, other.block_size, other.digest)

    def same(self, other: Entry) -> bool:
        return self.same_content(other) and (self.mode, self.mtime_ns) == (other.mode, other.mtime_ns)


def open_beneath(root: Path, path: str, flags: int = os.O_RDONLY) -> int:
    """A descriptor of `path` inside `root`, opened one component at a time with O_NOFOLLOW: a symlink
    anywhere on the way is refused (ELOOP/ENOTDIR), so the open can never land outside the volume."""
    parts = check_relative(path)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


class HashCache:
    """Block hashes of files already hashed, keyed by what changes whenever the content may have: size,
    mtime, ctime and inode. A second manifest of an unchanged volume then reads nothing but directories."""

    def __init__(self, limit: int = 100_000):
        self._entries: dict[tuple, tuple[tuple, list[bytes]]] = {}
        self._limit = limit

    def get(self, key: tuple, st: os.stat_result, block: int) -> list[bytes] | None:
        found = self._entries.get(key)
        stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, block)
        return found[1] if found and found[0] == stamp else None

    def put(self, key: tuple, st: os.stat_result, block: int, blocks: list[bytes]) -> None:
        if len(self._entries) >= self._limit:
            self._entries.clear()
        self._entries[key] = ((st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, block), blocks)


def file_entry(dir_fd: int, name: str, rel: str, cache: HashCache | None = None,
               cache_key: tuple = (), block: int = 0) -> Entry | None:
    """The entry of a regular file, hashed in blocks (`block`: that size, else the size's own); None when it
    vanished or stopped being a regular file meanwhile."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except (FileNotFoundError, OSError):
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        block = block or block_size_for(st.st_size)
        blocks = cache.get(cache_key, st, block) if cache else None
        if blocks is None:
            blocks = hash_blocks(fd, st.st_size, block)
            after = os.fstat(fd)
            if cache and (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
                cache.put(cache_key, st, block, blocks)
        return Entry(rel, "file", st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns, block, blocks,
                     digest_of(blocks))
    finally:
        os.close(fd)


def scan(root: Path, cache: HashCache | None = None, cache_prefix: tuple = ()) -> Iterator[Entry]:
    """Every entry below `root` in path order, parents first; symlinks are reported, never followed."""
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        yield from _scan_dir(top, "", cache, cache_prefix)
    finally:
        os.close(top)


def _scan_dir(fd: int, prefix: str, cache: HashCache | None, cache_prefix: tuple) -> Iterator[Entry]:
    try:
        names = sorted(os.listdir(fd))
    except OSError:
        return
    for name in names:
        rel = f"{prefix}{name}"
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            yield Entry(rel, "symlink", mode=stat.S_IMODE(st.st_mode), mtime_ns=st.st_mtime_ns)
        elif stat.S_ISDIR(st.st_mode):
            try:
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                continue
            try:
                yield Entry(rel, "dir", mode=stat.S_IMODE(st.st_mode), mtime_ns=st.st_mtime_ns)
                yield from _scan_dir(sub, rel + "/", cache, cache_prefix)
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            entry = file_entry(fd, name, rel, cache, (*cache_prefix, rel))
            if entry is not None:
                yield entry
        # sockets, fifos and devices are not data a volume carries: left out

"""Netboot artifacts (the image build's `cortex-netboot_V.vmlinuz` + `cortex-netboot_V.cpio.zst`, or the
`cortex-netboot.*` symlinks to the newest build): served with SHA-256 checksums, and fetched with checks.

Only the files the profiles name are served (an artifacts directory such as `image/.build/out/` also holds
disk images that have no business on the network). Names are resolved at each request, so a rebuild that
moves the `cortex-netboot.*` symlinks is picked up without a restart; checksums are cached per inode, size
and mtime.
"""

from __future__ import annotations

import hashlib
import os
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cortex.netboot.profiles import ARTIFACT_RE

CHUNK = 1024 * 1024
SUMS_NAME = "SHA256SUMS"


class ArtifactError(RuntimeError):
    """An artifact is missing, unreadable or does not match its checksum; the message says which and why."""


@dataclass(frozen=True)
class Artifact:
    name: str
    path: Path  # resolved
    size: int
    sha256: str


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class ArtifactStore:
    def __init__(self, directory: str | Path, names: set[str]):
        self.directory = Path(directory)
        self.names = set(names)
        self._cache: dict[tuple, str] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Artifact:
        if name not in self.names or not ARTIFACT_RE.match(name):
            raise ArtifactError(f"{name!r} is not a served artifact (served: {', '.join(sorted(self.names))})")
        path = self.directory / name  # a plain name in our directory: no traversal possible
        try:
            resolved = path.resolve(strict=True)
            st = resolved.stat()
        except OSError:
            raise ArtifactError(f"{path} is missing: build the netboot image (`just image`) or point "
                                "--artifacts at its output directory") from None
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            digest = self._cache.get(key)
        if digest is None:
            digest = file_sha256(resolved)
            with self._lock:
                self._cache = {k: v for k, v in self._cache.items() if k[:2] != key[:2]}
                self._cache[key] = digest
        return Artifact(name, resolved, st.st_size, digest)

    def missing(self) -> list[str]:
        return sorted(n for n in self.names if not (self.directory / n).exists())

    def sums(self) -> str:
        """SHA256SUMS of the artifacts present (sha256sum's format: `HEX  NAME`)."""
        lines = []
        for name in sorted(self.names):
            try:
                lines.append(f"{self.get(name).sha256}  {name}\n")
            except ArtifactError:
                continue
        return "".join(lines)


def parse_sums(text: str) -> dict[str, str]:
    sums = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or len(parts[0]) != 64 or not ARTIFACT_RE.match(parts[1].lstrip("*")):
            raise ArtifactError(f"{SUMS_NAME} line {number} is not 'SHA256  NAME'")
        sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def fetch(url: str, dest: Path, expected_sha256: str, timeout: float = 30.0) -> Path:
    """Download `url` to `dest`, verifying length and SHA-256; a short or corrupt download is deleted and
    raised as ArtifactError (nothing half-written is left under `dest`'s name)."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.part")
    h = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            length = response.headers.get("Content-Length")
            while True:
                try:
                    chunk = response.read(CHUNK)
                except Exception as exc:  # http.client.IncompleteRead and friends: the server hung up early
                    raise ArtifactError(f"{url}: download cut off after {received} bytes ({exc})") from None
                if not chunk:
                    break
                h.update(chunk)
                out.write(chunk)
                received += len(chunk)
        if length is not None and received != int(length):
            raise ArtifactError(f"{url}: truncated download: {received} of {length} bytes")
        if h.hexdigest() != expected_sha256:
            raise ArtifactError(f"{url}: checksum mismatch (got sha256 {h.hexdigest()[:16]}…, expected "
                                f"{expected_sha256[:16]}…, {received} bytes): truncated or corrupted; "
                                "nothing was kept, retry the download")
        os.replace(tmp, dest)
        return dest
    except urllib.error.URLError as exc:
        raise ArtifactError(f"{url}: {exc.reason}") from None
    finally:
        tmp.unlink(missing_ok=True)


def fetch_all(base_url: str, dest_dir: Path, timeout: float = 30.0) -> list[Path]:
    """Mirror every artifact a provisioning service offers (its SHA256SUMS), each one verified."""
    base = base_url.rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/artifacts/{SUMS_NAME}", timeout=timeout) as response:
            sums = parse_sums(response.read().decode())
    except urllib.error.URLError as exc:
        raise ArtifactError(f"{base}/artifacts/{SUMS_NAME}: {exc.reason}") from None
    Path(dest_dir).mkdir(parents=True, exist_ok=True)
    return [fetch(f"{base}/artifacts/{name}", Path(dest_dir) / name, digest, timeout) for name, digest in sums.items()]

"""Update payloads: publish a version into a channel directory, list what is there, verify before use.

Layout (what `cortex update publish` writes and any HTTP server can serve as is):

    <root>/<channel>/<version>/
        cortex_<version>.usr-x86-64.<uuid>.raw.xz          the /usr slot image   (sysupdate 10-usr.conf)
        cortex_<version>.usr-x86-64-verity.<uuid>.raw.xz   its dm-verity data     (11-usr-verity.conf)
        cortex_<version>.efi                               the boot entry (UKI)   (20-uki.conf)
        manifest.json                                      version, channel, files, sizes, when
        SHA256SUMS                                         sha256sum format, every file above
        SHA256SUMS.sig                                     Ed25519 signature of SHA256SUMS

A node never hands an unverified byte to systemd-sysupdate: it checks the signature against the
cluster's trusted publisher keys and every checksum, then lets sysupdate install from the verified local
copy. Versions are dotted integers (`0.1.0.202611241200`: the package version plus the build's UTC time),
so they compare without ambiguity.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where keys are made or checked: the agent loads this module, rarely updates
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

VERSION_RE = re.compile(r"^\d+(\.\d+){1,5}$")
CHANNEL_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
PAYLOAD_PATTERNS = (
    # the partition UUID as mkosi writes it (32 hex digits) or dashed; sysupdate's @u reads both
    re.compile(r"^cortex_(?P<v>[\d.]+)\.usr-x86-64\.(?:[0-9a-f]{32}|[0-9a-f-]{36})\.raw\.xz$"),
    re.compile(r"^cortex_(?P<v>[\d.]+)\.usr-x86-64-verity\.(?:[0-9a-f]{32}|[0-9a-f-]{36})\.raw\.xz$"),
    re.compile(r"^cortex_(?P<v>[\d.]+)\.efi$"),
)


class UpdateError(ValueError):
    """The payload, its signature or the request is wrong; nothing was published or installed."""


def parse_version(text: str) -> tuple[int, ...]:
    if not VERSION_RE.match(text):
        raise UpdateError(f"version {text!r} must be dotted integers, like 0.1.0.202611241200")
    return tuple(int(p) for p in text.split("."))


# --- keys -------------------------------------------------------------------------------------------------

def generate_key(private_path: Path) -> str:
    """Create a publisher key (PEM, mode 0600); return the public key to trust, as `ed25519:<base64>`."""
    if private_path.exists():
        raise UpdateError(f"{private_path} exists; refusing to overwrite a signing key")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    private_path.touch(mode=0o600)
    private_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return public_key_text(key.public_key())


def public_key_text(public: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + base64.b64encode(raw).decode()


def load_private_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise UpdateError(f"{path}: not a usable signing key ({exc}); create one with `cortex update keygen`") \
            from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UpdateError(f"{path}: not an Ed25519 key")
    return key


def load_public_key(text: str) -> Ed25519PublicKey:
    if not text.startswith("ed25519:"):
        raise UpdateError(f"trusted key {text[:20]!r}... must look like ed25519:<base64>")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text.removeprefix("ed25519:"), validate=True))
    except ValueError as exc:
        raise UpdateError(f"trusted key is malformed: {exc}") from None


# --- publish ----------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def payload_files(source: Path) -> tuple[str, list[Path]]:
    """The version and the three payload files in an image build's update directory."""
    files = sorted(p for p in source.iterdir() if any(rx.match(p.name) for rx in PAYLOAD_PATTERNS))
    kinds = [next(i for i, rx in enumerate(PAYLOAD_PATTERNS) if rx.match(p.name)) for p in files]
    if sorted(kinds) != [0, 1, 2]:
        raise UpdateError(f"{source}: need exactly one /usr image, one verity image and one .efi of one version "
                          f"(found {', '.join(p.name for p in files) or 'nothing'}); run `just image` first")
    versions = {next(rx.match(p.name) for rx in PAYLOAD_PATTERNS if rx.match(p.name)).group("v") for p in files}
    if len(versions) != 1:
        raise UpdateError(f"{source}: payload files carry different versions: {', '.join(sorted(versions))}")
    version = versions.pop()
    parse_version(version)
    return version, files


def publish(source: Path, root: Path, channel: str, key: Ed25519PrivateKey, now: float | None = None) -> Path:
    """Copy a build's payload into <root>/<channel>/<version>/ with manifest, SHA256SUMS and signature.
    Publishing the same version again with the same bytes is a no-op; with other bytes it is refused."""
    if not CHANNEL_RE.match(channel):
        raise UpdateError(f"channel {channel!r}: use lowercase letters, digits and '-'")
    version, files = payload_files(source)
    target = root / channel / version
    sums = "".join(f"{_sha256(p)}  {p.name}\n" for p in files)
    if target.exists():
        published = [line for line in (target / "SHA256SUMS").read_text().splitlines(keepends=True)
                     if not line.endswith("  manifest.json\n")]
        if "".join(published) == sums:
            return target
        raise UpdateError(f"{channel}/{version} is already published with other content; "
                          "a version is immutable: build a new one")
    staging = root / channel / f".{version}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for p in files:
        shutil.copyfile(p, staging / p.name)
    manifest = {"version": version, "channel": channel, "published_at": now if now is not None else time.time(),
                "files": {p.name: p.stat().st_size for p in files}}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    sums += f"{_sha256(staging / 'manifest.json')}  manifest.json\n"
    (staging / "SHA256SUMS").write_text(sums)
    (staging / "SHA256SUMS.sig").write_text(base64.b64encode(key.sign(sums.encode())).decode() + "\n")
    staging.rename(target)  # readers never see a half-published version
    return target


# --- read and verify --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Release:
    channel: str
    version: str
    path: Path
    published_at: float
    size: int


def list_releases(root: Path, channel: str | None = None) -> list[Release]:
    out = []
    for manifest_path in sorted(root.glob(f"{channel or '*'}/*/manifest.json")):
        try:
            doc = json.loads(manifest_path.read_text())
            parse_version(doc["version"])
        except (OSError, ValueError, KeyError, UpdateError):
            continue  # half-written or foreign directories are not releases
        out.append(Release(doc["channel"], doc["version"], manifest_path.parent, doc["published_at"],
                           sum(doc["files"].values())))
    return sorted(out, key=lambda r: (r.channel, parse_version(r.version)))


def verify(release_dir: Path, trusted: list[str]) -> dict:
    """Check the signature against the trusted keys and every checksum; return the manifest."""
    sums = verify_signature(release_dir, trusted)
    for line in sums.decode().splitlines():
        digest, _, name = line.partition("  ")
        path = release_dir / name
        if "/" in name or not path.is_file():
            raise UpdateError(f"{release_dir}: {name} listed in SHA256SUMS is missing")
        if _sha256(path) != digest:
            raise UpdateError(f"{release_dir}: {name} does not match its checksum (truncated or tampered)")
    return json.loads((release_dir / "manifest.json").read_text())


def verify_signature(release_dir: Path, trusted: list[str]) -> bytes:
    """SHA256SUMS, once its signature checks out against one of the trusted keys (nothing else is read)."""
    try:
        sums = (release_dir / "SHA256SUMS").read_bytes()
        signature = base64.b64decode((release_dir / "SHA256SUMS.sig").read_text().strip(), validate=True)
    except (OSError, ValueError) as exc:
        raise UpdateError(f"{release_dir}: unsigned or unreadable ({exc}); publish it with `cortex update publish`") \
            from None
    if not trusted:
        raise UpdateError("no trusted publisher keys configured (plugins.updater.trusted_keys); refusing unsigned trust")
    from cryptography.exceptions import InvalidSignature

    for key_text in trusted:
        try:
            load_public_key(key_text).verify(signature, sums)
            break
        except InvalidSignature:
            continue
    else:
        raise UpdateError(f"{release_dir}: SHA256SUMS is not signed by a trusted key (tampered, or another "
                          "publisher's); nothing installed")
    return sums

"""Cluster identity in X.509: the cluster CA, node and client certificates, and gRPC credentials from them.

`cortex init` creates the CA; servers keep its key (as they keep the Raft secret) so any server can sign.
A certificate names its holder in the subject CN and in SAN URIs:

    cortex://node/<id>      who (a node id, or a client name such as "admin@n1")
    cortex://role/<role>    server | worker (nodes), admin | operator | reader (clients)
    cortex://cluster/<id>   which cluster (a certificate of another cluster is refused even with the same CA)

Every certificate also carries DNS:cortex, the name clients verify (`grpc.ssl_target_name_override`):
nodes move between addresses, what matters is that the peer holds a certificate of this cluster's CA.

Files in <data_dir>/tls/: ca.crt, ca.key (servers), node.crt/node.key (the node's own identity, used for
every call between nodes), admin.crt/admin.key (servers: an admin client certificate for the local `cortex`
CLI), enroll.crt/enroll.key (signed by the CA, serverAuth only; the enrollment listener where
not-yet-certified nodes join, checked against the CA pin in their token).
Everything here is pure except the file helpers at the bottom.

What the agent reads on every RPC and at start (who a certificate names, when it was issued and expires, the
CA pin, whether a key matches its certificate) needs no cryptography package (der.py; the ssl module's OpenSSL
for the key check). Issuing and signing do, and import cryptography (about 11 MB resident once imported, never
given back) on first use. With ISSUE_IN_SUBPROCESS (an agent started with CORTEX_ISSUE_IN_SUBPROCESS=1) they
run in a short-lived `python -m cortex.security.issuer` instead, so cryptography stays out of the long-running
process; issuance is rare (joins, renewals, rotations) but then takes an interpreter's start more, seconds on
a slow machine. A process that has cryptography loaded anyway (the CLI, tests) calls them in-process.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import functools
import hashlib
import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cortex.core import durable
from cortex.security import der

if TYPE_CHECKING:
    from cryptography import x509

TLS_DIR = "tls"
SERVER_NAME = "cortex"  # the DNS SAN every certificate carries and every client verifies
ENROLL_NAME = "cortex-enroll"
NODE_ROLES = ("server", "worker")
CLIENT_ROLES = ("reader", "operator", "admin")
DEFAULT_CERT_DAYS = 30.0
CA_DAYS = 3650.0
# Renew once less than this share of a certificate's lifetime is left.
RENEW_AT_REMAINING = 1 / 3
_URI_PREFIX = "cortex://"
BACKDATE = datetime.timedelta(seconds=60)  # tolerate clocks a little behind the signer's


class TLSError(Exception):
    pass


@dataclass(frozen=True)
class Peer:
    """Who a certificate says its holder is."""

    name: str
    role: str
    cluster_id: str


# Set by the agent (cli/agent.py): issue and sign in a subprocess unless cryptography is loaded already.
ISSUE_IN_SUBPROCESS = False
ISSUE_TIMEOUT = 60.0  # seconds for one issuance in the subprocess (an interpreter start and one signature)


def _crypto():
    """The cryptography names issuance uses, imported on first use (see the module notes)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    return x509, InvalidSignature, hashes, serialization, ec, NameOID


def _encode(value):
    if isinstance(value, bytes):
        return {"b": base64.b64encode(value).decode()}
    if isinstance(value, datetime.datetime):
        return {"t": value.isoformat()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value):
    if isinstance(value, dict) and "b" in value:
        return base64.b64decode(value["b"])
    if isinstance(value, dict) and "t" in value:
        return datetime.datetime.fromisoformat(value["t"])
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    return value


ISSUING: dict[str, object] = {}  # name -> the in-process function (what the subprocess runs)


def _issuing(fn):
    """Runs `fn` in `python -m cortex.security.issuer` when ISSUE_IN_SUBPROCESS and cryptography is not loaded."""
    ISSUING[fn.__name__] = fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not ISSUE_IN_SUBPROCESS or "cryptography.x509" in sys.modules:
            return fn(*args, **kwargs)
        return _in_subprocess(fn.__name__, args, kwargs)

    return wrapper


def _in_subprocess(name: str, args: tuple, kwargs: dict):
    request = json.dumps({"call": name, "args": _encode(list(args)),
                          "kwargs": {k: _encode(v) for k, v in kwargs.items()}})
    try:  # the environment goes along: CORTEX_CERT_DAYS, the interpreter's paths
        done = subprocess.run([sys.executable, "-m", "cortex.security.issuer"], input=request.encode(),
                              capture_output=True, timeout=ISSUE_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TLSError(f"{name}: the issuer process failed: {exc}") from None
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        raise TLSError(f"{name}: the issuer process exited {done.returncode}: "
                       f"{done.stderr.decode(errors='replace').strip()[-500:]}") from None
    if "error" in answer:
        raise (ValueError if answer["error"] == "ValueError" else TLSError)(answer["message"])
    return _decode(answer["result"])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def cert_lifetime_days() -> float:
    """Node certificate lifetime; CORTEX_CERT_DAYS shortens it (tests of renewal use seconds)."""
    try:
        return float(os.environ.get("CORTEX_CERT_DAYS", DEFAULT_CERT_DAYS))
    except ValueError:
        return DEFAULT_CERT_DAYS


@_issuing
def new_key_pem() -> bytes:
    x509, _, hashes, serialization, ec, NameOID = _crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_key(key_pem: bytes):
    x509, _, hashes, serialization, ec, NameOID = _crypto()
    return serialization.load_pem_private_key(key_pem, password=None)


@_issuing
def new_ca(cluster_id: str) -> tuple[bytes, bytes]:
    """A new cluster CA: (certificate PEM, key PEM)."""
    x509, _, hashes, serialization, ec, NameOID = _crypto()
    key_pem = new_key_pem()
    key = _load_key(key_pem)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"cortex cluster CA {cluster_id}"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_id)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@_issuing
def new_csr(key_pem: bytes, name: str) -> bytes:
    """A certificate signing request for `name`; the signer decides the role and cluster, not the requester."""
    x509, _, hashes, serialization, ec, NameOID = _crypto()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .sign(_load_key(key_pem), hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


@_issuing
def sign(ca_cert_pem: bytes, ca_key_pem: bytes, csr_pem: bytes, name: str, role: str, cluster_id: str,
         days: float | None = None, now: datetime.datetime | None = None) -> bytes:
    """Sign a CSR as `name` with `role` in `cluster_id`. The CSR only contributes its public key."""
    x509, _, hashes, serialization, ec, NameOID = _crypto()
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise TLSError(f"not a PEM certificate signing request: {exc}") from None
    if not csr.is_signature_valid:
        raise TLSError("the certificate signing request's signature is invalid")
    if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
        raise TLSError("the certificate signing request must carry an EC P-256 key")
    return _issue(ca_cert_pem, ca_key_pem, csr.public_key(), name, role, cluster_id, days, now)


def _issue(ca_cert_pem: bytes, ca_key_pem: bytes, public_key, name: str, role: str, cluster_id: str,
           days: float | None, now: datetime.datetime | None) -> bytes:
    x509, _, hashes, serialization, ec, NameOID = _crypto()
    if role not in NODE_ROLES + CLIENT_ROLES:
        raise TLSError(f"unknown role {role!r}")
    ca = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = _load_key(ca_key_pem)
    now = now or _now()
    lifetime = datetime.timedelta(days=cert_lifetime_days() if days is None else days)
    sans: list[x509.GeneralName] = [
        x509.DNSName(SERVER_NAME),
        x509.UniformResourceIdentifier(f"{_URI_PREFIX}node/{name}"),
        x509.UniformResourceIdentifier(f"{_URI_PREFIX}role/{role}"),
        x509.UniformResourceIdentifier(f"{_URI_PREFIX}cluster/{cluster_id}"),
    ]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)]))
            .issuer_name(ca.subject).public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                  x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


@_issuing
def issue(ca_cert_pem: bytes, ca_key_pem: bytes, name: str, role: str, cluster_id: str,
          days: float | None = None, now: datetime.datetime | None = None) -> tuple[bytes, bytes]:
    """A fresh key and its certificate, signed here (admin client certificates): (cert PEM, key PEM)."""
    key_pem = new_key_pem()
    cert = _issue(ca_cert_pem, ca_key_pem, _load_key(key_pem).public_key(), name, role, cluster_id, days, now)
    return cert, key_pem


@_issuing
def self_signed(name: str = ENROLL_NAME, days: float = 365.0) -> tuple[bytes, bytes]:
    """The enrollment listener's certificate: it proves nothing (the joiner has no CA yet), it encrypts."""
    x509, _, hashes, serialization, ec, NameOID = _crypto()
    key_pem = new_key_pem()
    key = _load_key(key_pem)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name), x509.IPAddress(
                ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@_issuing
def issue_enrollment(ca_cert_pem: bytes, ca_key_pem: bytes, days: float = 365.0) -> tuple[bytes, bytes]:
    """The enrollment listener's certificate, signed by the cluster CA: a joiner that pins the CA (the hash
    in its token) can check the server before it sends its token. It names no cortex identity and is for
    server authentication only, so it can never act as a member's client certificate."""
    x509, _, hashes, serialization, ec, NameOID = _crypto()
    key_pem = new_key_pem()
    key = _load_key(key_pem)
    ca = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = _load_key(ca_key_pem)
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ENROLL_NAME)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(ENROLL_NAME)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def split_pems(bundle: bytes) -> list[bytes]:
    """The certificates of a PEM bundle (ca.crt holds two while the CA is being rotated), each as PEM."""
    try:
        return [der.to_pem(der.Certificate(block).der) for block in der.pem_blocks(bundle)]
    except ValueError:
        return []


def ca_pin(cert_pem: bytes) -> str:
    """SHA-256 (hex) of a CA certificate's DER SubjectPublicKeyInfo: the pin a join token carries, as
    kubeadm's --discovery-token-ca-cert-hash. For a bundle: the first certificate (the signing CA)."""
    return hashes_sha256(der.load_pem(cert_pem).spki)


def hashes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_ca(cert_pem: bytes) -> bool:
    try:
        return der.load_pem(cert_pem).is_ca()
    except ValueError:
        return False


@_issuing
def issued_by(cert_pem: bytes, ca_pem: bytes) -> bool:
    """Whether `ca_pem` signed `cert_pem` (signature and issuer name; validity is the TLS stack's job)."""
    x509, invalid_signature, *_ = _crypto()
    try:
        x509.load_pem_x509_certificate(cert_pem).verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
        return True
    except (ValueError, TypeError, invalid_signature):
        return False


# Certificates remembered by peer_of and issued_at, which every RPC calls with its caller's certificate. It must
# hold every member's current certificate (and the one it replaced, during a renewal): in a fleet with more
# members than entries, one round of heartbeats evicts each entry before its next use, and every call parses an
# X.509 certificate again (bench/fleet.py). An entry is about 1 KB and only certificates in use fill it.
CERT_CACHE = 16_384


@functools.lru_cache(maxsize=CERT_CACHE)
def peer_of(cert_pem: bytes) -> Peer | None:
    """The holder a certificate names (None when it names none). Cached: called on every RPC."""
    try:
        uris = der.load_pem(cert_pem).san_uris()
    except (ValueError, UnicodeDecodeError):
        return None
    values: dict[str, str] = {}
    for uri in uris:
        if uri.startswith(_URI_PREFIX):
            kind, _, value = uri[len(_URI_PREFIX):].partition("/")
            values[kind] = value
    if not all(k in values for k in ("node", "role", "cluster")):
        return None
    return Peer(name=values["node"], role=values["role"], cluster_id=values["cluster"])


@functools.lru_cache(maxsize=CERT_CACHE)
def issued_at(cert_pem: bytes) -> float:
    """When the signer issued the certificate (unix seconds): its not-before plus the backdating. Cached:
    the revocation check (revocation.py) reads it on every RPC."""
    return (der.load_pem(cert_pem).not_before + BACKDATE).timestamp()


def not_after(cert_pem: bytes) -> datetime.datetime:
    return der.load_pem(cert_pem).not_after


def needs_renewal(cert_pem: bytes, now: datetime.datetime | None = None) -> bool:
    cert = der.load_pem(cert_pem)
    now = now or _now()
    lifetime = cert.not_after - cert.not_before - BACKDATE
    return cert.not_after - now < lifetime * RENEW_AT_REMAINING


def fingerprint(cert_pem: bytes) -> str:
    return hashlib.sha256(der.load_pem(cert_pem).der).hexdigest()


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path to `data` that never touches a disk (the ssl module loads keys from paths only)."""
    fd = os.memfd_create("cortex-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def key_matches(cert_pem: bytes, key_pem: bytes) -> bool:
    """Whether `key_pem` is the private key of (the first certificate of) `cert_pem`: OpenSSL's own check,
    through the ssl module the Raft transport loads anyway. Unreadable input does not match."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        with _memory_file(cert_pem) as cert_path, _memory_file(key_pem) as key_path:
            try:
                context.load_cert_chain(cert_path, key_path)
            except (ssl.SSLError, ValueError):
                return False
    except OSError:  # no memfd_create (an old kernel, a stricter seccomp filter): the same check by cryptography
        x509, *_ = _crypto()
        try:
            public = x509.load_pem_x509_certificate(cert_pem).public_key().public_numbers()
            return public == _load_key(key_pem).public_key().public_numbers()
        except (ValueError, TypeError, AttributeError):
            return False
    return True


# --- files ------------------------------------------------------------------------------------------------

def tls_dir(data_dir: Path) -> Path:
    return Path(data_dir) / TLS_DIR


def write_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Atomically replace `path`: a reader (the credentials fetcher) sees the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    durable.write_atomic(path, data, mode)


def files_stamp(directory: Path, names: tuple[str, ...]) -> tuple:
    """What changes when any of these files is replaced (renewal, rotation): reload when it differs."""
    out = []
    for name in names:
        try:
            st = os.stat(directory / name)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


def read(directory: Path, name: str) -> bytes | None:
    try:
        return (Path(directory) / name).read_bytes()
    except OSError:
        return None


@dataclass(frozen=True)
class ClientFiles:
    """What a client needs to open an mTLS channel: the CA to trust, its certificate and key."""

    ca: bytes
    cert: bytes
    key: bytes


def client_files(directory: Path, stems: tuple[str, ...] = ("admin", "client", "node")) -> ClientFiles | None:
    """admin.* (servers issue it for the local CLI) else node.* (workers: the node's own identity)."""
    ca = read(directory, "ca.crt")
    if ca is None:
        return None
    for stem in stems:
        cert, key = read(directory, f"{stem}.crt"), read(directory, f"{stem}.key")
        if cert and key:
            return ClientFiles(ca=ca, cert=cert, key=key)
    return None

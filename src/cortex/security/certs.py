"""A node's certificates on disk (<data_dir>/tls): created at `cortex init`, installed at join, renewed
before they expire. The X.509 work itself is in cortex.security.tls; this is the node's bookkeeping around it."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cortex.node.logs import fields
from cortex.security import tls

log = logging.getLogger("cortex.certs")

RENEW_CHECK_SECONDS = 5.0
RENEW_GRACE = 15.0  # a replaced certificate keeps working this long: calls begun with it finish


class NodeCerts:
    def __init__(self, data_dir: Path, node_id: str):
        self.dir = tls.tls_dir(data_dir)
        self.node_id = node_id
        self._lock = threading.Lock()
        self._next_check = 0.0
        # Certificates replaced here, to revoke cluster-wide (revocation.py): cert.revoke arguments.
        self.superseded: list[dict] = []

    # --- state ------------------------------------------------------------------------------------------
    def ready(self) -> bool:
        return all((self.dir / n).exists() for n in ("ca.crt", "node.crt", "node.key"))

    def can_sign(self) -> bool:
        return (self.dir / "ca.key").exists() and (self.dir / "ca.crt").exists()

    def node_files(self) -> tls.ClientFiles | None:
        """The node's own identity, for calls to other nodes (never the admin certificate)."""
        return tls.client_files(self.dir, ("node",)) if self.ready() else None

    def ca(self) -> tuple[bytes, bytes]:
        return tls.read(self.dir, "ca.crt") or b"", tls.read(self.dir, "ca.key") or b""

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- creating and installing -----------------------------------------------------------------------
    def create_cluster(self, cluster_id: str) -> None:
        """`cortex init`: a new CA, this server's certificate, the local CLI's admin certificate."""
        ca_cert, ca_key = tls.new_ca(cluster_id)
        self.remove()
        tls.write_file(self.dir / "ca.key", ca_key)
        tls.write_file(self.dir / "ca.crt", ca_cert, 0o644)
        key = tls.new_key_pem()
        cert = tls.sign(ca_cert, ca_key, tls.new_csr(key, self.node_id), self.node_id, "server", cluster_id)
        self._write_pair("node", cert, key)
        self.issue_admin(cluster_id)

    def issue_admin(self, cluster_id: str) -> None:
        ca_cert, ca_key = self.ca()
        cert, key = tls.issue(ca_cert, ca_key, f"admin@{self.node_id}", "admin", cluster_id)
        self._write_pair("admin", cert, key)

    def install(self, key_pem: bytes, cert_pem: bytes, ca_cert_pem: bytes, ca_key_pem: bytes = b"",
                cluster_id: str = "") -> None:
        """What admission returned: the node's certificate, the CA (and its key for a server)."""
        if not tls.key_matches(cert_pem, key_pem):
            raise tls.TLSError("the certificate the cluster returned is not for this node's key")
        self.remove()
        tls.write_file(self.dir / "ca.crt", ca_cert_pem, 0o644)
        if ca_key_pem:
            tls.write_file(self.dir / "ca.key", ca_key_pem)
        self._write_pair("node", cert_pem, key_pem)
        if ca_key_pem and cluster_id:
            self.issue_admin(cluster_id)

    def become_server(self, ca_key_pem: bytes, cluster_id: str) -> None:
        """A promoted worker: keep the CA key as servers do, sign itself a server certificate, issue the
        local admin certificate. The worker key and certificate are replaced (key first, as in renewal)."""
        ca_cert = tls.read(self.dir, "ca.crt") or b""
        key = tls.new_key_pem()
        cert = tls.sign(ca_cert, ca_key_pem, tls.new_csr(key, self.node_id), self.node_id, "server", cluster_id)
        tls.write_file(self.dir / "ca.key", ca_key_pem)
        self._supersede(tls.read(self.dir, "node.crt"), cert, "renewed")  # the worker certificate: revoked
        self._write_pair("node", cert, key)
        self.issue_admin(cluster_id)

    def _write_pair(self, stem: str, cert: bytes, key: bytes) -> None:
        # Key first: the serving fetcher skips a pair that does not match, so it never serves half a renewal.
        tls.write_file(self.dir / f"{stem}.key", key)
        tls.write_file(self.dir / f"{stem}.crt", cert, 0o644)

    def sign(self, csr_pem: bytes, name: str, role: str, cluster_id: str) -> tuple[bytes, bytes]:
        """Servers: sign a CSR. Returns (certificate, CA certificate)."""
        ca_cert, ca_key = self.ca()
        if not ca_key:
            raise tls.TLSError("this node holds no CA key (only servers sign certificates)")
        return tls.sign(ca_cert, ca_key, csr_pem, name, role, cluster_id), ca_cert

    # --- renewal ----------------------------------------------------------------------------------------
    def _supersede(self, old: bytes | None, new: bytes, reason: str) -> None:
        peer = tls.peer_of(old) if old else None
        if peer is None:
            return
        self.superseded.append({"name": peer.name, "before": tls.issued_at(new), "reason": reason,
                                "until": tls.not_after(old).timestamp(), "grace": RENEW_GRACE})

    def rotated_generation(self) -> int:
        try:
            return int((self.dir / "rotation").read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def renew_if_due(self, cluster_id: str, remote: Callable[[bytes], tuple[bytes, bytes]] | None,
                     rotation: Callable[[], int] = lambda: 0, force: bool = False) -> bool:
        """Renew node.* (and admin.* on servers) once a third of the lifetime is left, or when `rotation()`
        (`cortex secrets rotate`) is past the generation this node last rotated for. Servers sign their
        own; workers call `remote(csr) -> (cert, ca)` (RenewCertificate on a server). True when renewed."""
        now = time.monotonic()
        if (now < self._next_check and not force) or not self.ready():
            return False
        self._next_check = now + RENEW_CHECK_SECONDS
        generation = rotation()
        replace = generation > self.rotated_generation()
        rotate = replace or force  # force: a CA rotation reissues every certificate (ca_rotation.py)
        with self._lock:
            renewed = False
            if rotate or tls.needs_renewal(tls.read(self.dir, "node.crt")):
                key = tls.new_key_pem()
                csr = tls.new_csr(key, self.node_id)
                if self.can_sign():
                    peer = tls.peer_of(tls.read(self.dir, "node.crt"))
                    cert, _ = self.sign(csr, self.node_id, peer.role if peer else "server", cluster_id)
                elif remote is not None:
                    cert, _ = remote(csr)
                else:
                    return False
                if not tls.key_matches(cert, key):
                    raise tls.TLSError("renewed certificate does not match the new key")
                self._supersede(tls.read(self.dir, "node.crt"), cert, "rotated" if rotate else "renewed")
                self._write_pair("node", cert, key)
                log.info("certificate renewed", extra=fields(not_after=str(tls.not_after(cert))))
                renewed = True
            admin = tls.read(self.dir, "admin.crt")
            if self.can_sign() and (rotate or admin is None or tls.needs_renewal(admin)):
                self.issue_admin(cluster_id)
                if admin is not None:
                    self._supersede(admin, tls.read(self.dir, "admin.crt"), "rotated" if rotate else "renewed")
            if replace:
                tls.write_file(self.dir / "rotation", str(generation).encode(), 0o644)
                log.info("certificates rotated", extra=fields(generation=generation))
            return renewed

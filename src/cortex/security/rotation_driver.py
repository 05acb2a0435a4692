"""CA rotation at run time: the leader's next step and each node's part of a phase (ca_rotation.py).

The leader makes the new CA and hands its key to the servers wrapped with a key derived from the current CA
key (which only servers hold); every node then rewrites its trust bundle, keys and certificates in its own
certificate directory as the phases move. Everything here is idempotent: a node repeats its step until it
holds, and acknowledges it then.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from typing import TYPE_CHECKING

from cortex.security import tls
from cortex.security.ca_rotation import NEXT, pending

if TYPE_CHECKING:
    from cryptography.fernet import Fernet

log = logging.getLogger("cortex.ca_rotation")

RAFT_FILE = "ca-rotation-raft-generation"  # servers, during a rotation: G, the first generation of the new key


# --- the new CA's key, for servers only ---------------------------------------------------------------------

def _wrapping_key(ca_key_pem: bytes, rot_id: str) -> Fernet:
    from cryptography.fernet import Fernet  # only during a CA rotation: the idle agent does without

    digest = hmac.new(ca_key_pem, f"cortex ca rotation {rot_id}".encode(), hashlib.sha256).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def wrap_key(old_ca_key: bytes, rot_id: str, new_key: bytes) -> str:
    return _wrapping_key(old_ca_key, rot_id).encrypt(new_key).decode()


def unwrap_key(ca_key: bytes, rot_id: str, key_enc: str) -> bytes | None:
    from cryptography.fernet import InvalidToken

    try:
        return _wrapping_key(ca_key, rot_id).decrypt(key_enc.encode())
    except InvalidToken:
        return None


# --- the leader's part ------------------------------------------------------------------------------------

def leader_action(doc: dict, members: list[str], ca_cert: bytes, ca_key: bytes, cluster_id: str,
                  raft_generation: int) -> dict | None:
    """The ca.advance to propose now (None: nothing to do). Pure but for making the new CA."""
    row = doc.get("rotation")
    if row is None or row["phase"] == "done":
        return None
    if row["phase"] == "requested":
        new_ca, new_key = tls.new_ca(cluster_id)
        return {"rot_id": row["rot_id"], "phase": "trust", "new_ca": new_ca.decode(),
                "key_enc": wrap_key(ca_key, row["rot_id"], new_key), "old_pin": tls.ca_pin(ca_cert),
                "new_pin": tls.ca_pin(new_ca), "raft_generation": raft_generation + 1}
    if pending(doc, members):
        return None
    return {"rot_id": row["rot_id"], "phase": NEXT[row["phase"]]}


# --- each node's part -------------------------------------------------------------------------------------

def bundle(*pems: bytes) -> bytes:
    """CA certificates in this order, each once."""
    out: list[bytes] = []
    for pem in pems:
        for cert in tls.split_pems(pem):
            if cert not in out:
                out.append(cert)
    return b"".join(out)


def node_step(row: dict, certs, raft_keys=None) -> bool:
    """Do this node's part of `row`'s phase (idempotent); True once it is done (acknowledge it).
    `certs` is the node's certs.NodeCerts; `raft_keys` its RotatingEncryptor (servers)."""
    directory, phase = certs.dir, row["phase"]
    new_ca = row["new_ca"].encode()
    current = tls.read(directory, "ca.crt") or b""
    server = certs.can_sign()
    key = b""
    if server and phase in ("trust", "reissue"):
        key = _new_key(certs, row)
        if key is None:
            return False
        if raft_keys is not None:  # accept the Raft generation derived from the new key from now on
            raft_keys.add_ca_key(row["raft_generation"], key)
        tls.write_file(directory / RAFT_FILE, str(row["raft_generation"]).encode())
    if phase == "trust":
        _write_ca(certs, bundle(current, new_ca))
        return True
    if phase == "reissue":
        if server:
            old_key = tls.read(directory, "ca.key")
            if old_key != key:
                tls.write_file(directory / "ca-prev.key", old_key or b"")  # lower Raft generations, after a restart
                tls.write_file(directory / "ca.key", key)  # sign with the new CA from now on
        _write_ca(certs, bundle(new_ca, current))
        node_ok = tls.issued_by(tls.read(directory, "node.crt") or b"", new_ca)
        admin = tls.read(directory, "admin.crt")
        admin_ok = not server or (admin is not None and tls.issued_by(admin, new_ca))
        raft_ok = raft_keys is None or raft_keys.generation >= row["raft_generation"]
        return node_ok and admin_ok and raft_ok
    if phase == "drop":
        _write_ca(certs, new_ca)
        for name in ("ca-next.key", "ca-prev.key", RAFT_FILE):
            (directory / name).unlink(missing_ok=True)
        return True
    return False


def restore_raft_keys(certs, raft_keys) -> None:
    """After a restart in the middle of a rotation: which CA key each Raft generation derives from."""
    try:
        generation = int((certs.dir / RAFT_FILE).read_text())
    except (OSError, ValueError):
        return
    prev, current, nxt = (tls.read(certs.dir, n) for n in ("ca-prev.key", "ca.key", "ca-next.key"))
    if prev:  # reissued: ca.key is already the new key
        raft_keys.add_ca_key(0, prev)
        raft_keys.add_ca_key(generation, current)
    elif nxt:
        raft_keys.add_ca_key(generation, nxt)


def _new_key(certs, row: dict) -> bytes | None:
    directory = certs.dir
    new_ca = row["new_ca"].encode()
    for candidate in (tls.read(directory, "ca-next.key"), tls.read(directory, "ca.key")):
        if candidate and tls.key_matches(new_ca, candidate):
            return candidate  # kept from an earlier step, or a server that joined after the switch
    key = unwrap_key(tls.read(directory, "ca.key") or b"", row["rot_id"], row["key_enc"])
    if key is None or not tls.key_matches(new_ca, key):
        log.error("cannot unwrap the new CA key (this server's CA key is not the one it was wrapped with)")
        return None
    tls.write_file(directory / "ca-next.key", key)
    return key


def _write_ca(certs, pem: bytes) -> None:
    if tls.read(certs.dir, "ca.crt") != pem:
        tls.write_file(certs.dir / "ca.crt", pem, 0o644)
        log.info("trusted CAs changed", extra={"cas": [tls.ca_pin(c)[:16] for c in tls.split_pems(pem)]})


def needs_reissue(row: dict | None, certs) -> bool:
    """In the reissue phase, once this node signs with (or trusts first) the new CA: renew now."""
    if row is None or row["phase"] != "reissue":
        return False
    new_ca = row["new_ca"].encode()
    ca_first = tls.split_pems(tls.read(certs.dir, "ca.crt") or b"")[:1]
    if ca_first != [tls.split_pems(new_ca)[0]]:
        return False
    admin = tls.read(certs.dir, "admin.crt")
    return not tls.issued_by(tls.read(certs.dir, "node.crt") or b"", new_ca) or (
        certs.can_sign() and admin is not None and not tls.issued_by(admin, new_ca))

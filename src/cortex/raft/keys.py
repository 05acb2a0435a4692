"""Rotating the Raft transport secret without stopping Raft (`cortex secrets rotate`).

pysyncobj encrypts every frame with one Fernet key derived from the cluster's Raft secret. Generation 0 is
exactly that key (so nothing changes for a cluster that never rotates). Generation g >= 1 is derived from the
CA key, which every server holds and no worker does: HMAC-SHA256(CA key, "cortex raft secret g"). So the
rotation itself carries no secret: `cortex secrets rotate` only raises a generation number in the
replicated state, and each server switches when it applies it.

A server encrypts with its current generation and accepts the previous one and the next few. A server
that switches first is therefore understood by the others at once, in-flight frames of the previous
generation still decode, and a server that was down during a rotation can read the leader, apply the
entry and switch too. No frame is refused during a rotation, so it costs no election.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
from typing import TYPE_CHECKING

from pysyncobj.encryptor import getEncryptor

if TYPE_CHECKING:
    from cryptography.fernet import Fernet

LOOKAHEAD = 3  # generations accepted ahead of the current one


def derive(base_secret: str, ca_key_pem: bytes, generation: int) -> Fernet:
    if generation == 0 or not ca_key_pem:
        return getEncryptor(base_secret)
    from cryptography.fernet import Fernet

    digest = hmac.new(ca_key_pem, f"cortex raft secret {generation}".encode(), hashlib.sha256).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


class RotatingEncryptor:
    """What pysyncobj calls on each connection: encrypt_at_time, extract_timestamp, decrypt.

    Keys are derived on first use: only the password transport encrypts with them, and on mutual TLS (every
    cluster begun on this version) deriving them would load cryptography into the agent for nothing."""

    def __init__(self, base_secret: str, ca_key_pem: bytes, generation: int = 0):
        self._base, self._ca_key = base_secret, ca_key_pem
        self._lock = threading.Lock()
        self._keys: dict[int, Fernet] = {}
        self._ca_keys: list[tuple[int, bytes]] = [(0, ca_key_pem)]  # (from generation, CA key)
        self.generation = -1
        self.set_generation(generation if ca_key_pem else 0)

    def _key(self, generation: int) -> Fernet:
        if generation not in self._keys:
            ca_key = [k for start, k in self._ca_keys if start <= generation][-1]
            self._keys[generation] = derive(self._base, ca_key, generation)
        return self._keys[generation]

    def add_ca_key(self, from_generation: int, ca_key_pem: bytes) -> None:
        """A CA rotation: generations from `from_generation` on derive from the new CA key (accepted at
        once within the lookahead; encrypted with once the generation is raised to it)."""
        with self._lock:
            if (from_generation, ca_key_pem) in self._ca_keys:
                return
            self._ca_keys = sorted([(s, k) for s, k in self._ca_keys if s < from_generation]
                                   + [(from_generation, ca_key_pem)])
            self._keys = {g: k for g, k in self._keys.items() if g < from_generation}
            current, self.generation = self.generation, -1
        self.set_generation(current)

    def set_generation(self, generation: int) -> bool:
        """Encrypt with `generation` from now on; True when it changed."""
        if not self._ca_key and generation:
            return False  # a cluster from before the CA: nothing to derive from
        with self._lock:
            if generation == self.generation:
                return False
            accepted = [generation, generation - 1] + [generation + i for i in range(1, LOOKAHEAD + 1)]
            self._accepted = [g for g in accepted if g >= 0]
            self._accept: list[Fernet] | None = None  # derived by _keys_in_use
            self._keys = {g: k for g, k in self._keys.items() if g in accepted}
            self.generation = generation
            return True

    def _keys_in_use(self) -> list[Fernet]:
        """The accepted keys, the current generation's first."""
        with self._lock:
            if self._accept is None:
                self._accept = [self._key(g) for g in self._accepted]
            return self._accept

    def encrypt_at_time(self, data: bytes, current_time: int) -> bytes:
        return self._keys_in_use()[0].encrypt_at_time(data, current_time)

    def _first(self, op: str, token: bytes):
        from cryptography.fernet import InvalidToken

        for key in self._keys_in_use():
            try:
                return getattr(key, op)(token)
            except InvalidToken:
                continue
        raise InvalidToken

    def extract_timestamp(self, token: bytes) -> int:
        return self._first("extract_timestamp", token)

    def decrypt(self, token: bytes) -> bytes:
        return self._first("decrypt", token)

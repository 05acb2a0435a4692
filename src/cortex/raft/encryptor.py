"""pysyncobj's `encryptor` module, with cryptography imported when a key is first made.

pysyncobj imports cryptography as it loads (for its password transport), which put about 11 MB into every
agent although a cluster on mutual TLS never encrypts a frame with it. The raft package registers this module
as `pysyncobj.encryptor` before pysyncobj loads; the key derivation is pysyncobj's own, unchanged, so a cluster
still on the password transport reads the same frames.
"""

from __future__ import annotations

import base64
import importlib.util

HAS_CRYPTO = importlib.util.find_spec("cryptography") is not None

SALT = b'\x15%q\xe6\xbb\x02\xa6\xf8\x13q\x90\xcf6+\x1e\xeb'  # pysyncobj's


def getEncryptor(password):  # noqa: N802 (pysyncobj's name)
    from cryptography.fernet import Fernet
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

    if not isinstance(password, bytes):
        password = bytes(password.encode())
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=SALT, iterations=100000)
    return Fernet(base64.urlsafe_b64encode(kdf.derive(password)))

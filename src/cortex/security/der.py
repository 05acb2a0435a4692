"""What the agent reads from certificates on every RPC and at start, without the cryptography package.

Every call names its caller by the SAN URIs of its certificate, the revocation check reads when it was issued,
renewal reads how long it has left, and a join token pins the CA's public key. gRPC's TLS stack has verified
the chain by then; what is left is reading a few fields of DER. cryptography (with its Rust bindings about
11 MB of each process's memory) is imported only to issue and sign (tls.py), which an idle server never does.

Only DER as X.509 uses it: definite lengths, tags below 31. Anything else is a ValueError, as cryptography
raises for a certificate it cannot read.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import re

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.*?)\s*-----END CERTIFICATE-----", re.S)
_SEQUENCE, _VERSION = 0x30, 0xA0  # [0] EXPLICIT version
_INTEGER, _BIT_STRING, _OCTET_STRING, _OID, _BOOLEAN = 0x02, 0x03, 0x04, 0x06, 0x01
_UTC_TIME, _GENERALIZED_TIME = 0x17, 0x18
_URI = 0x86  # GeneralName uniformResourceIdentifier [6] IMPLICIT IA5String
_SAN = bytes.fromhex("551d11")  # 2.5.29.17 subjectAltName
_BASIC_CONSTRAINTS = bytes.fromhex("551d13")  # 2.5.29.19


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the element at `pos`."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag, first = data[pos], data[pos + 1]
    if tag & 0x1F == 0x1F:
        raise ValueError("DER tag numbers above 30 are not used by X.509")
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tag, value start, value end, element start) of each element between start and end."""
    out = []
    while start < end:
        tag, vs, ve = _tlv(data, start)
        out.append((tag, vs, ve, start))
        start = ve
    return out


def _expect(tag: int, want: int, what: str) -> None:
    if tag != want:
        raise ValueError(f"not an X.509 certificate: {what}")


class Certificate:
    """The fields of one DER certificate the agent reads."""

    def __init__(self, der: bytes):
        self.der = der
        tag, s, e = _tlv(der, 0)
        _expect(tag, _SEQUENCE, "outer SEQUENCE")
        if e != len(der):
            raise ValueError("trailing data after the certificate")
        parts = _children(der, s, e)
        if len(parts) != 3:
            raise ValueError("not an X.509 certificate: 3 parts expected")
        tag, s, e, _ = parts[0]
        _expect(tag, _SEQUENCE, "tbsCertificate")
        fields = _children(der, s, e)
        if fields and fields[0][0] == _VERSION:
            fields = fields[1:]
        if len(fields) < 6:
            raise ValueError("not an X.509 certificate: tbsCertificate too short")
        _expect(fields[0][0], _INTEGER, "serialNumber")
        tag, vs, ve, _ = fields[3]
        _expect(tag, _SEQUENCE, "validity")
        times = _children(der, vs, ve)
        if len(times) != 2:
            raise ValueError("not an X.509 certificate: validity")
        self.not_before, self.not_after = (_time(der[t[1]:t[2]], t[0]) for t in times)
        tag, vs, ve, start = fields[5]
        _expect(tag, _SEQUENCE, "subjectPublicKeyInfo")
        self.spki = der[start:ve]  # the whole element, as the CA pin hashes it
        self.extensions: dict[bytes, bytes] = {}
        for tag, vs, _ve, _ in fields[6:]:
            if tag == 0xA3:  # [3] extensions
                tag, s2, e2 = _tlv(der, vs)
                _expect(tag, _SEQUENCE, "extensions")
                for tag, xs, xe, _ in _children(der, s2, e2):
                    _expect(tag, _SEQUENCE, "extension")
                    items = _children(der, xs, xe)
                    _expect(items[0][0], _OID, "extnID")
                    value = items[-1]
                    _expect(value[0], _OCTET_STRING, "extnValue")
                    self.extensions[der[items[0][1]:items[0][2]]] = der[value[1]:value[2]]

    def san_uris(self) -> list[str]:
        """The uniformResourceIdentifier entries of the subjectAltName extension (empty without one)."""
        value = self.extensions.get(_SAN)
        if value is None:
            return []
        tag, s, e = _tlv(value, 0)
        _expect(tag, _SEQUENCE, "subjectAltName")
        return [value[vs:ve].decode("ascii") for tag, vs, ve, _ in _children(value, s, e) if tag == _URI]

    def is_ca(self) -> bool:
        """basicConstraints cA (False without the extension)."""
        value = self.extensions.get(_BASIC_CONSTRAINTS)
        if value is None:
            return False
        tag, s, e = _tlv(value, 0)
        _expect(tag, _SEQUENCE, "basicConstraints")
        items = _children(value, s, e)
        return bool(items) and items[0][0] == _BOOLEAN and value[items[0][1]:items[0][2]] != b"\x00"


def _time(raw: bytes, tag: int) -> datetime.datetime:
    text = raw.decode("ascii")
    if tag == _UTC_TIME and len(text) == 13 and text.endswith("Z"):
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"  # RFC 5280 4.1.2.5.1
    elif not (tag == _GENERALIZED_TIME and len(text) == 15 and text.endswith("Z")):
        raise ValueError(f"not an X.509 time: {text!r}")
    return datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=datetime.UTC)


def pem_blocks(bundle: bytes) -> list[bytes]:
    """The DER of each CERTIFICATE block of a PEM bundle, in order."""
    out = []
    for match in _PEM_CERT.finditer(bundle):
        try:
            out.append(base64.b64decode(b"".join(match.group(1).split()), validate=True))
        except binascii.Error as exc:
            raise ValueError(f"bad base64 in a PEM certificate: {exc}") from None
    return out


def load_pem(cert_pem: bytes) -> Certificate:
    """The first certificate of a PEM bundle (as cryptography's load_pem_x509_certificate reads it)."""
    blocks = pem_blocks(cert_pem)
    if not blocks:
        raise ValueError("no PEM certificate")
    return Certificate(blocks[0])


def to_pem(der: bytes) -> bytes:
    """DER as OpenSSL writes a PEM certificate: base64 in lines of 64, newline-terminated."""
    text = base64.b64encode(der)
    lines = b"\n".join(text[i:i + 64] for i in range(0, len(text), 64))
    return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n"

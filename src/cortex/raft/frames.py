"""The typed encoding of pysyncobj's messages on the mutual-TLS Raft transport (raft/transport.py).

pysyncobj sends plain dicts (message type, terms, indexes, log entries as (bytes, index, term) tuples). Its
own transport pickles them; here each value is a tag byte and its payload, so decoding a frame can only ever
build str/int/float/bool/None/bytes/list/tuple/dict, never call anything. Log entries stay opaque bytes.

Every length and count is checked against what is left of the frame before anything is allocated, and
nesting is bounded, so a hostile frame costs at most its own (already bounded) size.
"""

from __future__ import annotations

import struct

MAX_DEPTH = 16  # pysyncobj nests three levels (message -> entries -> entry); room to spare, no recursion bomb

_NONE, _TRUE, _FALSE, _INT, _FLOAT, _STR, _BYTES, _LIST, _TUPLE, _DICT = b"NTFifsbltd"
_U32 = struct.Struct(">I")
_F64 = struct.Struct(">d")


class FrameError(ValueError):
    """A frame that is not a well-formed message: the connection that sent it is closed."""


def encode(value) -> bytes:
    out = bytearray()
    _encode(value, out, 0)
    return bytes(out)


def _encode(value, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise FrameError(f"message nested deeper than {MAX_DEPTH}")
    if value is None:
        out.append(_NONE)
    elif value is True:
        out.append(_TRUE)
    elif value is False:
        out.append(_FALSE)
    elif isinstance(value, int):
        raw = value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)
        out.append(_INT)
        out.append(len(raw))
        out += raw
    elif isinstance(value, float):
        out.append(_FLOAT)
        out += _F64.pack(value)
    elif isinstance(value, str):
        raw = value.encode()
        out.append(_STR)
        out += _U32.pack(len(raw))
        out += raw
    elif isinstance(value, bytes | bytearray | memoryview):
        out.append(_BYTES)
        out += _U32.pack(len(value))
        out += value
    elif isinstance(value, list | tuple):
        out.append(_LIST if isinstance(value, list) else _TUPLE)
        out += _U32.pack(len(value))
        for item in value:
            _encode(item, out, depth + 1)
    elif isinstance(value, dict):
        out.append(_DICT)
        out += _U32.pack(len(value))
        for key, item in value.items():
            _encode(key, out, depth + 1)
            _encode(item, out, depth + 1)
    else:
        # A pysyncobj message of another shape would be a bug on this side, not a peer's: say which type.
        raise FrameError(f"cannot encode a {type(value).__name__} in a Raft frame")


def decode(data: bytes):
    view = memoryview(data)
    try:
        value, pos = _decode(view, 0, 0)
    except TypeError:  # a tuple holding a list as a dict key: unhashable
        raise FrameError("a dict key that cannot be hashed") from None
    if pos != len(view):
        raise FrameError(f"{len(view) - pos} bytes after the message")
    return value


def _take(view: memoryview, pos: int, size: int) -> int:
    end = pos + size
    if end > len(view):
        raise FrameError("frame ends inside a value")
    return end


def _count(view: memoryview, pos: int) -> tuple[int, int]:
    end = _take(view, pos, 4)
    (n,) = _U32.unpack(view[pos:end])
    if n > len(view) - end:  # every element takes at least one byte: a larger count is a lie
        raise FrameError("a length beyond the end of the frame")
    return n, end


def _decode(view: memoryview, pos: int, depth: int):
    if depth > MAX_DEPTH:
        raise FrameError(f"message nested deeper than {MAX_DEPTH}")
    end = _take(view, pos, 1)
    tag = view[pos]
    pos = end
    if tag == _NONE:
        return None, pos
    if tag == _TRUE:
        return True, pos
    if tag == _FALSE:
        return False, pos
    if tag == _INT:
        end = _take(view, pos, 1)
        size = view[pos]
        start, end = end, _take(view, end, size)
        return int.from_bytes(view[start:end], "big", signed=True), end
    if tag == _FLOAT:
        end = _take(view, pos, 8)
        return _F64.unpack(view[pos:end])[0], end
    if tag in (_STR, _BYTES):
        n, start = _count(view, pos)
        end = start + n
        raw = bytes(view[start:end])
        if tag == _BYTES:
            return raw, end
        try:
            return raw.decode(), end
        except UnicodeDecodeError:
            raise FrameError("a string that is not UTF-8") from None
    if tag in (_LIST, _TUPLE):
        n, pos = _count(view, pos)
        items = []
        for _ in range(n):
            item, pos = _decode(view, pos, depth + 1)
            items.append(item)
        return (items if tag == _LIST else tuple(items)), pos
    if tag == _DICT:
        n, pos = _count(view, pos)
        out = {}
        for _ in range(n):
            key, pos = _decode(view, pos, depth + 1)
            if isinstance(key, list | dict):
                raise FrameError("a dict key that is a list or dict")
            out[key], pos = _decode(view, pos, depth + 1)
        return out, pos
    raise FrameError(f"unknown value tag {tag:#04x}")

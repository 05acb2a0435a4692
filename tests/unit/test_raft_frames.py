"""The typed Raft frame encoding (raft/frames.py): pysyncobj's messages round-trip; anything else is refused
without building more than the frame itself."""

from __future__ import annotations

import pickle

import pytest

from cortex.raft import frames

MESSAGES = [
    {"type": "append_entries", "term": 7, "commit_index": 41, "prevLogIdx": 40, "prevLogTerm": 7,
     "entries": [(b"\x00cortex-command", 41, 7), (b"\x01", 42, 7)]},
    {"type": "append_entries", "term": 7, "commit_index": 41, "serialized": (b"snapshot-part", True, False)},
    {"type": "append_entries", "transmission": "start", "data": b"x" * 70000, "term": 2, "commit_index": -1,
     "prevLogIdx": 0, "prevLogTerm": 0},
    {"type": "request_vote", "term": 9, "last_log_index": 120, "last_log_term": 8},
    {"type": "response_vote", "term": 9, "vote": True},
    {"type": "next_node_idx", "next_node_idx": 121, "success": False, "term": 9},
    {"type": "apply_command_response", "request_id": 3, "error": 5},
    {"type": "apply_command", "command": b"\x00" + bytes(range(256)), "request_id": 2**40},
    "127.0.0.1:7401",
    {"float": 0.25, "none": None, "negative": -(2**70), "unicode": "z\u00fcrich"},
]


@pytest.mark.parametrize("message", MESSAGES, ids=range(len(MESSAGES)))
def test_pysyncobj_messages_round_trip(message):
    assert frames.decode(frames.encode(message)) == message


@pytest.mark.parametrize("frame, why", [
    (b"", "ends inside"),
    (b"\xee", "unknown value tag"),
    (pickle.dumps({"type": "request_vote"}), "unknown value tag"),
    (b"l\xff\xff\xff\xff", "beyond the end"),  # a count of 4 billion in a five-byte frame
    (b"b\x7f\xff\xff\xff" + b"x", "beyond the end"),
    (b"s\x00\x00\x00\x02\xff\xfe", "not UTF-8"),
    (b"d\x00\x00\x00\x01l\x00\x00\x00\x00N", "dict key"),
    (b"d\x00\x00\x00\x01t\x00\x00\x00\x01l\x00\x00\x00\x00N", "dict key"),
    (b"NN", "after the message"),
    (b"l\x00\x00\x00\x01" * 40 + b"N", "nested deeper"),
])
def test_malformed_frames_are_refused(frame, why):
    with pytest.raises(frames.FrameError, match=why):
        frames.decode(frame)


def test_only_plain_data_is_encoded():
    with pytest.raises(frames.FrameError, match="cannot encode a set"):
        frames.encode({"type": "x", "nodes": {1, 2}})

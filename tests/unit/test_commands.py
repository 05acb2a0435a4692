"""Command validation and envelope encoding."""

import json

import pytest

from cortex.core import commands
from cortex.core.commands import CommandError, Envelope


def test_envelope_round_trip_is_byte_stable():
    env = Envelope(type="kv.put", args={"value": "v", "key": "k"}, id="abc", ts=1.5, term=3, idem="abc")
    data = env.encode()
    assert Envelope.decode(data) == env
    assert Envelope.decode(data).encode() == data  # canonical: sorted keys, no spaces


@pytest.mark.parametrize(
    "command_type, args, message",
    [
        ("kv.frob", {}, "unknown command type"),
        ("kv.put", {"key": "k"}, "missing argument 'value'"),
        ("kv.put", {"key": "k", "value": 3}, "must be str"),
        ("kv.put", {"key": "", "value": "v"}, "must be 1..512 bytes"),
        ("kv.put", {"key": "k", "value": "v", "ttl": 3}, "unknown argument(s) ttl"),
        ("kv.put", {"key": "k", "value": "x" * (commands.MAX_VALUE_BYTES + 1)}, "the limit is"),
        ("kv.put", ["k", "v"], "must be a JSON object"),
        ("node.register", {"node_id": "Bad!", "role": "server", "grpc_address": "a:1"}, "not a valid node id"),
        ("token.add", {"token_hash": "zz", "role": "worker"}, "hex SHA-256"),
    ],
)
def test_bad_commands_are_refused_with_a_reason(command_type, args, message):
    with pytest.raises(CommandError) as info:
        commands.validate(command_type, args)
    assert message in str(info.value)


def test_args_json_parsing():
    assert commands.parse_args_json(b"") == {}
    assert commands.parse_args_json(json.dumps({"a": 1}).encode()) == {"a": 1}
    with pytest.raises(CommandError, match="not valid JSON"):
        commands.parse_args_json(b"{nope")
    with pytest.raises(CommandError, match="the limit is"):
        commands.parse_args_json(b" " * (commands.MAX_ENVELOPE_BYTES + 1))


def test_newer_schema_version_is_refused():
    data = json.dumps({"v": 99, "type": "noop", "args": {}, "id": "x", "ts": 0, "term": 1, "idem": "x"}).encode()
    with pytest.raises(CommandError, match="unsupported command schema version"):
        Envelope.decode(data)

"""Config parsing: every error names file, line and key."""

from pathlib import Path

import pytest

from cortex import config
from cortex.config import Config, ConfigError

GOOD = """\
node:
  id: n1
  role: server
data_dir: data
listen:
  grpc: 127.0.0.1:7400
  raft: 127.0.0.1:7401
raft:
  election_timeout_min: 1
  election_timeout_max: 2.0
log:
  level: debug
  format: text
bootstrap:
  init: true
"""


def test_good_config_parses_with_types(tmp_path: Path):
    path = tmp_path / "node.yaml"
    path.write_text(GOOD)
    cfg = config.load(path)
    assert cfg.node_id == "n1" and cfg.role == "server"
    assert cfg.data_dir == (tmp_path / "data").resolve()
    assert cfg.raft.election_timeout_min == 1.0 and isinstance(cfg.raft.election_timeout_min, float)
    assert cfg.raft.heartbeat_interval == 0.1  # default kept
    assert cfg.bootstrap.init is True and cfg.bootstrap.join is None
    assert cfg.log.format == "text"
    assert cfg.admin_socket_path == cfg.data_dir / "admin.sock"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("node:\n  id: n1\n  colour: blue\n", "node.yaml:3: node.colour: unknown key"),
        ("node:\n  id: n1\nlisten:\n  grpc: nowhere\n", "node.yaml:4: listen.grpc: must be HOST:PORT"),
        ("node:\n  id: n1\nlisten:\n  grpc: 1.2.3.4:99999\n", "listen.grpc: must be HOST:PORT with a port 1-65535"),
        ("node:\n  id: N_1\n", "node.yaml:2: node.id: use 1-63 lowercase"),
        ("node:\n  id: n1\n  role: boss\n", "node.yaml:3: node.role: must be one of server, worker"),
        ("node:\n  id: n1\nraft:\n  election_timeout_min: -1\n", "node.yaml:4: raft.election_timeout_min: must be > 0"),
        ("node:\n  id: n1\nraft:\n  election_timeout_min: fast\n", "raft.election_timeout_min: must be a float"),
        ("node:\n  id: n1\nraft:\n  leader_fallback_timeout: 5\n", "raft.leader_fallback_timeout: must be below"),
        ("node:\n  id: n1\nraft:\n  transport: tls\n", "raft.transport: must be auto, mtls or password, got 'tls'"),
        ("node:\n  id: n1\nraft:\n  max_frame_bytes: 100\n", "raft.max_frame_bytes: must be between 65536"),
        ("node:\n  id: n1\nraft:\n  max_inbound_connections: 0\n", "raft.max_inbound_connections: must be > 0"),
        ("node:\n  id: n1\nlog:\n  level: loud\n", "node.yaml:4: log.level: must be one of"),
        ("node: [1, 2\n", "node.yaml:2: not valid YAML"),
        ("", "node.yaml: empty config"),
        ("data_dir: x\n", "node: required"),
        ("node:\n  id: w1\n  role: worker\nbootstrap:\n  init: true\n", "a worker cannot create a cluster"),
        ("node:\n  id: n1\n  id: n2\n", "node.yaml:3: node.id: given twice"),
        ("max_message_bytes: 10\nnode:\n  id: n1\n", "node.yaml:1: max_message_bytes: must be between"),
    ],
)
def test_bad_config_names_file_line_and_key(tmp_path: Path, text: str, expected: str):
    path = tmp_path / "node.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert expected in str(info.value).replace(str(tmp_path) + "/", "")


def test_missing_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read config"):
        config.load(tmp_path / "nope.yaml")


def test_wait_reason_is_only_for_nodes_that_neither_init_nor_join(tmp_path: Path):
    cfg = config.parse("node:\n  id: n1\nbootstrap:\n  wait_reason: 'credentials: cortex.role: bad'\n")
    assert cfg.bootstrap.wait_reason == "credentials: cortex.role: bad"
    with pytest.raises(ConfigError, match="bootstrap.wait_reason: only for a node"):
        config.parse("node:\n  id: n1\nbootstrap:\n  init: true\n  wait_reason: x\n")


def test_loopback_address_added_only_when_the_grpc_address_is_a_lan_address():
    assert Config(node_id="a", grpc_address="10.0.0.5:7400").loopback_grpc_address == "127.0.0.1:7400"
    assert Config(node_id="a", grpc_address="127.0.0.1:7400").loopback_grpc_address is None
    assert Config(node_id="a", grpc_address="0.0.0.0:7400").loopback_grpc_address is None
    assert Config(node_id="a", grpc_address="[::]:7400").loopback_grpc_address is None

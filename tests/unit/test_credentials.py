"""cortex.appliance.credentials: systemd credentials -> agent config, for appliance nodes (image/)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from cortex import config
from cortex.appliance import credentials
from cortex.appliance.credentials import main, parse_env_file, read_directory, render, write_outputs
from tests.support import netlab as netns

TOKEN = "cx1.abcdefghijklmnopqrstuvwxyz012345"
FALLBACK = "node-0123abcd"


def write_creds(directory: Path, **values: str | bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in values.items():
        path = directory / (name if name.startswith("ssh.") else f"cortex.{name}")
        path.write_bytes(value if isinstance(value, bytes) else value.encode())
    return directory


def parsed(text: str) -> config.Config:
    return config.parse(text, source="rendered.yaml")


def test_join_set_renders_join_with_token_file_not_inline():
    creds = {"cortex.node_name": "node2\n", "cortex.role": "server", "cortex.join_address": "10.0.0.11:7400",
             "cortex.join_token": TOKEN + "\n", "cortex.address": "10.0.0.12"}
    result = render(creds, fallback_node_id=FALLBACK)
    assert result.problems == [] and result.bootstrap == "join"
    cfg = parsed(result.config_text)
    assert cfg.node_id == "node2" and cfg.role == "server"
    assert cfg.grpc_address == "10.0.0.12:7400" and cfg.raft_address == "10.0.0.12:7401"
    assert str(cfg.data_dir) == "/var/lib/cortex"
    assert cfg.bootstrap.join.address == "10.0.0.11:7400"
    assert cfg.bootstrap.join.token == "" and cfg.bootstrap.join.token_file == credentials.AGENT_TOKEN_PATH
    assert TOKEN not in result.config_text
    assert result.token == TOKEN


def test_init_set_renders_init_and_detected_address():
    result = render({"cortex.node_name": "node1", "cortex.init": "yes"}, fallback_node_id=FALLBACK,
                    detected_address="192.168.7.5")
    assert result.problems == [] and result.bootstrap == "init"
    cfg = parsed(result.config_text)
    assert cfg.bootstrap.init is True and cfg.bootstrap.join is None
    assert cfg.grpc_address == "192.168.7.5:7400"
    assert any("192.168.7.5" in n for n in result.notes)


def test_worker_join_and_log_level():
    result = render({"cortex.node_name": "w1", "cortex.role": "worker", "cortex.join_address": "10.0.0.11:7400",
                     "cortex.join_token": TOKEN, "cortex.address": "10.0.0.21", "cortex.log_level": "debug"},
                    fallback_node_id=FALLBACK)
    cfg = parsed(result.config_text)
    assert cfg.role == "worker" and cfg.log.level == "debug" and result.bootstrap == "join"


def test_no_credentials_waits_without_problem():
    result = render({}, fallback_node_id=FALLBACK, detected_address="10.0.2.15")
    assert result.problems == [] and result.bootstrap == "none" and result.waiting_for == ""
    cfg = parsed(result.config_text)
    assert cfg.node_id == FALLBACK and cfg.bootstrap.init is False and cfg.bootstrap.join is None
    assert cfg.bootstrap.wait_reason == credentials.NO_BOOTSTRAP_REASON


@pytest.mark.parametrize(
    "creds, credential",
    [
        ({"cortex.join_address": "10.0.0.11:7400"}, "cortex.join_token"),
        ({"cortex.join_token": TOKEN}, "cortex.join_address"),
        ({"cortex.join_address": "10.0.0.11:99999", "cortex.join_token": TOKEN}, "cortex.join_address"),
        ({"cortex.join_address": "not an address", "cortex.join_token": TOKEN}, "cortex.join_address"),
        ({"cortex.join_address": "10.0.0.11:7400", "cortex.join_token": "has spaces in it"}, "cortex.join_token"),
        ({"cortex.init": "maybe"}, "cortex.init"),
        ({"cortex.init": "yes", "cortex.role": "worker"}, "cortex.init"),
        ({"cortex.init": "yes", "cortex.join_address": "10.0.0.11:7400", "cortex.join_token": TOKEN}, "cortex.init"),
        ({"cortex.role": "leader", "cortex.init": "yes"}, "cortex.role"),
        ({"cortex.node_name": "Node_1!", "cortex.init": "yes"}, "cortex.node_name"),
        ({"cortex.node_name": "a\nb", "cortex.init": "yes"}, "cortex.node_name"),
        ({"cortex.address": "10.0.0.1 10.0.0.2", "cortex.init": "yes"}, "cortex.address"),
        ({"cortex.join_adress": "10.0.0.11:7400", "cortex.init": "yes"}, "cortex.join_adress"),
        ({"cortex.node_name": "\0binary", "cortex.init": "yes"}, "cortex.node_name"),
    ],
)
def test_bad_or_missing_credential_drops_bootstrap_and_names_it(creds, credential):
    creds = {"cortex.address": "10.0.0.5", **creds}
    result = render(creds, fallback_node_id=FALLBACK)
    assert result.bootstrap == "none"
    assert any(p.startswith(credential) or credential in p for p in result.problems), result.problems
    assert credential in result.waiting_for
    cfg = parsed(result.config_text)  # still a valid config: the agent starts and waits
    assert cfg.bootstrap.init is False and cfg.bootstrap.join is None
    assert credential in cfg.bootstrap.wait_reason  # shown as waiting_for in `cortex status`
    assert TOKEN not in cfg.bootstrap.wait_reason
    assert result.token == ""
    assert TOKEN not in result.config_text and TOKEN not in " ".join(result.problems)
    assert f"# problem: {result.problems[0]}" in result.config_text


def test_missing_address_listens_on_loopback_and_waits():
    result = render({"cortex.node_name": "n1", "cortex.init": "yes"}, fallback_node_id=FALLBACK)
    assert result.bootstrap == "none" and "cortex.address" in result.waiting_for
    assert parsed(result.config_text).grpc_address == "127.0.0.1:7400"


def test_bad_log_level_is_reported_but_keeps_bootstrap():
    result = render({"cortex.init": "1", "cortex.address": "10.0.0.5", "cortex.log_level": "loud"},
                    fallback_node_id=FALLBACK)
    assert result.bootstrap == "init" and any("cortex.log_level" in p for p in result.problems)
    assert parsed(result.config_text).bootstrap.wait_reason == "" and result.waiting_for == ""


def test_join_address_without_port_gets_default_port_and_ipv6_listen():
    result = render({"cortex.join_address": "node1.lab", "cortex.join_token": TOKEN, "cortex.address": "fd00::12"},
                    fallback_node_id=FALLBACK)
    cfg = parsed(result.config_text)
    assert cfg.bootstrap.join.address == "node1.lab:7400"
    assert cfg.grpc_address == "[fd00::12]:7400"


def test_ssh_keys_validated():
    good = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGVtcHR5IGtleSBmb3IgdGVzdHMgb25seQ== admin@lab"
    result = render({"ssh.authorized_keys.root": good + "\n# comment\n", "cortex.address": "10.0.0.5"},
                    fallback_node_id=FALLBACK)
    assert result.authorized_keys == good + "\n" and result.problems == []
    bad = render({"ssh.authorized_keys.root": "hello world", "cortex.address": "10.0.0.5"}, fallback_node_id=FALLBACK)
    assert bad.authorized_keys == "" and any("ssh.authorized_keys.root" in p for p in bad.problems)


def test_read_directory(tmp_path):
    assert read_directory(None) == {} and read_directory(tmp_path / "absent") == {}
    write_creds(tmp_path, node_name="n1", role="worker", **{"ssh.authorized_keys.root": "k"})
    (tmp_path / "other.credential").write_text("ignored")
    (tmp_path / "cortex.join_token").write_bytes(b"\xff\xfe")
    creds = read_directory(tmp_path)
    assert creds["cortex.node_name"] == "n1" and creds["cortex.role"] == "worker"
    assert "other.credential" not in creds and creds["ssh.authorized_keys.root"] == "k"
    result = render(creds, fallback_node_id=FALLBACK, detected_address="10.0.0.1")
    assert any(p.startswith("cortex.join_token: not UTF-8") for p in result.problems)


def test_parse_env_file():
    creds, problems = parse_env_file(
        "# ESP credentials\n\ncortex.node_name=node3\ncortex.join_address = '10.0.0.11:7400'\n"
        'cortex.join_token="' + TOKEN + '"\nssh.authorized_keys.root=ssh-ed25519 AAAA a\n'
        "ssh.authorized_keys.root=ssh-ed25519 BBBB b\nnot a line\nhostname=x\n")
    assert creds["cortex.node_name"] == "node3" and creds["cortex.join_address"] == "10.0.0.11:7400"
    assert creds["cortex.join_token"] == TOKEN
    assert creds["ssh.authorized_keys.root"] == "ssh-ed25519 AAAA a\nssh-ed25519 BBBB b"
    assert len(problems) == 2 and "line 8" in problems[0] and "'hostname'" in problems[1]


def test_merge_prefers_systemd_credentials():
    assert credentials.merge({"cortex.role": "worker"}, {"cortex.role": "server", "cortex.init": "1"}) == \
        {"cortex.role": "worker", "cortex.init": "1"}


def test_write_outputs_modes(tmp_path):
    result = render({"cortex.join_address": "10.0.0.11:7400", "cortex.join_token": TOKEN,
                     "cortex.address": "10.0.0.12"}, fallback_node_id=FALLBACK)
    out = tmp_path / "run" / "config.yaml"
    write_outputs(result, out)
    token_file = tmp_path / "run" / "join-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token_file.read_text() == TOKEN + "\n"
    assert (tmp_path / "run" / "agent.env").read_text() == "CORTEX_ADDR=10.0.0.12:7400\n"
    assert (tmp_path / "run" / "bootstrap-problem").read_text() == ""
    assert parsed(out.read_text()).bootstrap.join.token_file == credentials.AGENT_TOKEN_PATH
    # Rewritten at the next boot without a token: the file stays (LoadCredential= needs it), empty, 0600.
    write_outputs(render({}, fallback_node_id=FALLBACK, detected_address="10.0.0.12"), out)
    assert token_file.read_text() == "" and stat.S_IMODE(token_file.stat().st_mode) == 0o600


def test_main_end_to_end(tmp_path, capsys, monkeypatch):
    creds = write_creds(tmp_path / "creds", node_name="node9", join_address="10.0.0.11:7400", join_token=TOKEN,
                        address="10.0.0.19")
    esp = tmp_path / "credentials.conf"
    esp.write_text("cortex.node_name=ignored-because-systemd-wins\ncortex.role=worker\n")
    monkeypatch.setattr(os, "umask", os.umask)  # nothing global is changed by main
    out = tmp_path / "run" / "config.yaml"
    assert main(["render", "--credentials", str(creds), "--esp-file", str(esp), "--out", str(out),
                 "--authorized-keys", ""]) == 0
    cfg = config.load(out)
    assert cfg.node_id == "node9" and cfg.role == "worker" and cfg.bootstrap.join.address == "10.0.0.11:7400"
    assert stat.S_IMODE((tmp_path / "run" / "join-token").stat().st_mode) == 0o600
    assert "bootstrap join" in capsys.readouterr().out


def test_main_reports_problem_and_still_writes_config(tmp_path, capsys):
    creds = write_creds(tmp_path / "creds", node_name="node9", join_address="10.0.0.11:7400", address="10.0.0.19")
    out = tmp_path / "config.yaml"
    assert main(["render", "--credentials", str(creds), "--out", str(out), "--authorized-keys", ""]) == 0
    err = capsys.readouterr().err
    assert "PROBLEM: cortex.join_token: missing" in err
    cfg = config.load(out)
    assert cfg.bootstrap.join is None and cfg.bootstrap.init is False
    assert "cortex.join_token" in (tmp_path / "bootstrap-problem").read_text()
    doc = yaml.safe_load(out.read_text())
    assert set(doc["bootstrap"]) == {"wait_reason"} and "cortex.join_token" in doc["bootstrap"]["wait_reason"]


def test_install_authorized_keys(tmp_path):
    path = tmp_path / "root" / ".ssh" / "authorized_keys"
    assert credentials.install_authorized_keys("ssh-ed25519 AAAA a\n", path)
    assert not credentials.install_authorized_keys("ssh-ed25519 AAAA a\n", path)
    assert credentials.install_authorized_keys("ssh-ed25519 BBBB b\n", path)
    assert path.read_text() == "ssh-ed25519 AAAA a\nssh-ed25519 BBBB b\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_machine_node_id(tmp_path):
    mid = tmp_path / "machine-id"
    mid.write_text("0123abcd" * 4 + "\n")
    assert credentials.machine_node_id(str(mid)) == "node-0123abcd"
    mid.write_text("uninitialized\n")
    assert credentials.machine_node_id(str(mid)) == "node"
    assert config.NODE_ID_RE.match(credentials.machine_node_id(str(tmp_path / "absent")))


def test_member_keeps_its_node_id_without_credential(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    assert credentials.member_node_id(data) == ""
    (data / "cluster.json").write_text('{"cluster_id": "c-1", "node_id": "node2", "role": "server"}')
    assert credentials.member_node_id(data) == "node2"
    out = tmp_path / "run" / "config.yaml"
    assert main(["render", "--credentials", str(tmp_path / "none"), "--out", str(out), "--address", "10.0.0.9",
                 "--data-dir", str(data), "--authorized-keys", ""]) == 0
    assert config.load(out).node_id == "node2"
    (data / "cluster.json").write_text("not json")
    assert credentials.member_node_id(data) == ""


def test_update_source_and_keys_configure_the_updater_plugin():
    key = "ed25519:" + "A" * 43 + "="
    result = render({"cortex.node_name": "n1", "cortex.init": "yes", "cortex.address": "10.0.0.11",
                     "cortex.update_source": "http://10.0.0.11:8470/stable",
                     "cortex.update_keys": f"{key}\nnot-a-key"}, fallback_node_id=FALLBACK)
    doc = yaml.safe_load(result.config_text)
    assert doc["plugins"] == {"updater": {"source": "http://10.0.0.11:8470/stable", "trusted_keys": [key]}}
    assert result.bootstrap == "init"  # a bad key is a problem for updates only, never for joining
    assert any(p.startswith("cortex.update_keys:") for p in result.problems)
    cfg = parsed(result.config_text)
    assert cfg.plugins["updater"].options["trusted_keys"] == [key]


# --- address discovery, in a network namespace of its own ---------------------------------------------------

ADDRESSES_CODE = """
import dataclasses, json
from cortex.appliance.addresses import global_addresses
from cortex.appliance.credentials import detect_address
print(json.dumps({"detected": detect_address(),
                  "all": [dataclasses.asdict(a) for a in global_addresses()]}))
"""


@netns.requires_root
def test_detect_address_prefers_ipv4_and_skips_loopback_and_link_scope():
    addresses = [
        netns.Address("lo", "198.51.100.1/32"),  # global, but on loopback
        netns.Address("cxb0", "2001:db8::10/64"),
        netns.Address("cxb0", "169.254.7.7/16", scope=netns.RT_SCOPE_LINK),
        netns.Address("cxa0", "203.0.113.10/24"),
        netns.Address("cxa0", "203.0.113.11/24"),
    ]
    with netns.namespace_with([("cxa0", "cxb0")], addresses) as name:
        found = netns.run_in(name, ADDRESSES_CODE)
        order = netns.links_index_order(name)
    assert found["detected"] == "203.0.113.10"
    # every global address, grouped by interface in link order, each interface's in the order they were added
    expected = [a for ifname in order for a in addresses if a.interface == ifname and a.scope == 0]
    assert [(a["interface"], f"{a['address']}/{a['prefixlen']}") for a in found["all"]] == \
        [(a.interface, a.cidr) for a in expected]
    assert [a["loopback"] for a in found["all"]] == [a.interface == "lo" for a in expected]


@netns.requires_root
def test_detect_address_falls_back_to_ipv6_then_nothing():
    with netns.namespace_with([("cxa0", "cxb0")], [netns.Address("cxa0", "2001:db8::7/64"),
                                                   netns.Address("cxb0", "169.254.1.2/16",
                                                                 scope=netns.RT_SCOPE_LINK)]) as name:
        assert netns.run_in(name, ADDRESSES_CODE)["detected"] == "2001:db8::7"
    with netns.namespace_with([], [netns.Address("lo", "198.51.100.2/32")]) as name:
        assert netns.run_in(name, ADDRESSES_CODE) == {
            "detected": "",
            "all": [{"interface": "lo", "family": 2, "address": "198.51.100.2", "prefixlen": 32, "loopback": True}]}

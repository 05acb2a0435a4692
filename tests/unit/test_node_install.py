"""`cortex node install|uninstall` into a directory (`--root`): what it writes, that a second run changes
nothing, that bad input writes nothing, and that the unit is the appliance's own. The live path (systemd,
joining a real cluster) runs in an nspawn container: tests/system/test_ansible.py::test_node_install_without_the_role."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import yaml

from cortex import cli
from cortex.appliance import hostinstall

REPO = Path(__file__).resolve().parents[2]
APPLIANCE_UNIT = REPO / "image/tree/usr/lib/systemd/system/cortex-agent.service"
TOKEN = "cx1.abcdefgh.0123456789abcdef0123456789abcdef"


def service_section(text: str) -> list[str]:
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    return lines[lines.index("[Service]"):lines.index("[Install]")]


def install(root: Path, capsys, *extra: str) -> tuple[int, dict]:
    rc = cli.main(["--json", "node", "install", "--root", str(root), "--join", "10.0.0.5:7400", "--token", TOKEN,
                   "--address", "10.0.0.9", *extra])
    out = capsys.readouterr().out
    return rc, json.loads(out) if out.strip() else {}


def test_the_unit_is_the_appliances_with_host_paths():
    unit = hostinstall.host_unit(APPLIANCE_UNIT.read_text(), "/opt/cortex/venv/bin/cortex")
    appliance = service_section(APPLIANCE_UNIT.read_text())
    host = service_section(unit)
    differing = [(a, h) for a, h in zip(appliance, host) if a != h]
    assert len(appliance) == len(host) and differing == [
        ("ExecStart=/usr/bin/cortex agent --config /run/cortex/config.yaml",
         "ExecStart=/opt/cortex/venv/bin/cortex agent --config /etc/cortex/config.yaml"),
        ("LoadCredential=join-token:/run/cortex/join-token", "LoadCredential=join-token:/etc/cortex/join-token")]
    settings = [line for line in unit.splitlines() if not line.startswith("#")]
    assert not [line for line in settings if "cortex-config" in line]  # a host has no credentials to render
    assert "After=network-online.target time-sync.target" in unit
    assert hostinstall.shipped("hook") == (REPO / "image/tree/usr/lib/systemd/system-sleep/cortex").read_text()


def test_a_unit_of_another_shape_is_refused_not_guessed():
    with pytest.raises(hostinstall.InstallError, match="changed shape"):
        hostinstall.host_unit("[Service]\nExecStart=/x agent\n", "/c")


def test_install_writes_once_and_uninstall_removes(tmp_path, capsys):
    rc, doc = install(tmp_path, capsys, "--name", "laptop-1")
    assert rc == 0 and sorted(doc["changed"]) == sorted([hostinstall.UNIT_PATH, hostinstall.HOOK_PATH,
                                                         hostinstall.CONFIG_PATH, hostinstall.TOKEN_PATH])
    modes = {rel: stat.S_IMODE((tmp_path / rel).stat().st_mode) for rel in doc["changed"]}
    assert modes == {hostinstall.UNIT_PATH: 0o644, hostinstall.HOOK_PATH: 0o755, hostinstall.CONFIG_PATH: 0o644,
                     hostinstall.TOKEN_PATH: 0o600}
    config = yaml.safe_load((tmp_path / hostinstall.CONFIG_PATH).read_text())
    assert config["node"] == {"id": "laptop-1", "role": "worker"} and config["listen"] == {"grpc": "10.0.0.9:7400"}
    assert config["bootstrap"]["join"] == {"address": "10.0.0.5:7400", "token_file": hostinstall.TOKEN_CREDENTIAL}
    assert TOKEN not in (tmp_path / hostinstall.CONFIG_PATH).read_text()
    from cortex.config import parse

    assert parse((tmp_path / hostinstall.CONFIG_PATH).read_text()).node_id == "laptop-1"  # the agent accepts it

    rc, again = install(tmp_path, capsys, "--name", "laptop-1")
    assert rc == 0 and again["changed"] == []  # a second run changes nothing
    rc, renamed = install(tmp_path, capsys, "--name", "laptop-2", "--role", "server")
    assert renamed["changed"] == [hostinstall.CONFIG_PATH]
    assert yaml.safe_load((tmp_path / hostinstall.CONFIG_PATH).read_text())["listen"]["raft"] == "10.0.0.9:7401"

    state = tmp_path / "var/lib/private/cortex"
    state.mkdir(parents=True)
    (state / "cluster.json").write_text("{}")
    assert cli.main(["--json", "node", "uninstall", "--root", str(tmp_path)]) == 0
    gone = json.loads(capsys.readouterr().out)
    assert sorted(gone["removed"]) == sorted("/" + p for p in (hostinstall.UNIT_PATH, hostinstall.HOOK_PATH,
                                                               hostinstall.CONFIG_PATH, hostinstall.TOKEN_PATH))
    assert state.exists() and not (tmp_path / hostinstall.CONFIG_DIR).exists()
    # a file of the user's beside ours survives (and keeps its directory)
    install(tmp_path, capsys)
    (tmp_path / hostinstall.CONFIG_DIR / "dnsmasq.conf").write_text("port=0\n")
    assert cli.main(["node", "uninstall", "--root", str(tmp_path)]) == 0
    capsys.readouterr()
    assert [p.name for p in (tmp_path / hostinstall.CONFIG_DIR).iterdir()] == ["dnsmasq.conf"]
    assert cli.main(["node", "uninstall", "--root", str(tmp_path), "--purge"]) == 0
    assert "var/lib/private/cortex" in capsys.readouterr().out and not state.exists()
    assert cli.main(["node", "uninstall", "--root", str(tmp_path), "--purge"]) == 0
    assert "nothing to remove" in capsys.readouterr().out


@pytest.mark.parametrize("args, says", [
    (["--join", "nowhere", "--token", TOKEN], "--join 'nowhere': expected HOST:PORT"),
    (["--join", "10.0.0.5:7400", "--token", "short"], "--token: expected the single-word token"),
    (["--join", "10.0.0.5:7400", "--token", TOKEN, "--name", "Bad_Name"], "--name 'Bad_Name'"),
    (["--join", "10.0.0.5:7400", "--token", TOKEN, "--address", "a b"], "--address 'a b'"),
])
def test_bad_input_is_refused_and_writes_nothing(tmp_path, capsys, args, says):
    assert cli.main(["node", "install", "--root", str(tmp_path), *args]) == 2
    assert says in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("hostname, name", [("Dana's MacBook-Pro.local", "dana-s-macbook-pro"), ("DESK01", "desk01"),
                                            ("---", "node")])
def test_default_name_from_the_host_name(hostname, name):
    assert hostinstall.default_name(hostname) == name


def test_an_install_in_a_home_directory_is_refused_for_systemd(tmp_path):
    """ProtectHome=yes would hide it from the agent: say how to install system-wide instead."""
    home_bin = tmp_path / "home" / "dana" / ".local" / "bin"
    home_bin.mkdir(parents=True)
    (home_bin / "cortex").write_text("#!/bin/sh\n")
    python, hidden = str(home_bin / "python"), (str(tmp_path / "home"),)
    with pytest.raises(hostinstall.InstallError, match="sandbox hides.*pipx install"):
        hostinstall.cli_path(for_systemd=True, executable=python, hidden=hidden)
    assert hostinstall.cli_path(for_systemd=False, executable=python, hidden=hidden) == str(home_bin / "cortex")
    assert hostinstall.PROTECTED_HOME == ("/home", "/root", "/run/user")

"""The Redfish fence agent against a stand-in BMC (tests/support/fake_redfish.py: a real HTTPS server on
127.0.0.1 speaking Redfish's paths and JSON, modelled on the DMTF mockups), reached through the fence-agent
registry and the node's config, as a node that takes services over reaches it."""

from __future__ import annotations

import pytest

from cortex import config
from cortex.ha import fence
from cortex.ha.redfish import RedfishError
from tests.support.fake_redfish import SYSTEM_ID, FakeBMC

RESET_PATH = f"/redfish/v1/Systems/{SYSTEM_ID}/Actions/ComputerSystem.Reset"


@pytest.fixture
def bmc(tmp_path):
    with FakeBMC(tmp_path, transition=0.3) as bmc:
        yield bmc


def fencing(tmp_path, bmc: FakeBMC, **settings) -> fence.Fencing:
    """A node config with a fence section for n3, loaded the way the agent loads it."""
    (tmp_path / "bmc-n3.yaml").write_text(settings.pop("credentials", "username: fence\npassword: s3cret\n"))
    values = {"address": bmc.address, "credentials_file": "bmc-n3.yaml", "ca_file": bmc.ca, "power_timeout": 30,
              **settings}
    lines = [f"{k}: {v}" for k, v in values.items()]
    text = "node: {id: n1}\nfence:\n  n3:\n" + "".join(f"    {line}\n" for line in lines)
    (tmp_path / "node.yaml").write_text(text)
    return fence.Fencing.from_config(config.load(tmp_path / "node.yaml"))


def posts(bmc: FakeBMC) -> list[str]:
    return [path for method, path in bmc.requests if method == "POST"]


def test_power_off_waits_for_off_and_a_repeat_changes_nothing(tmp_path, bmc):
    agent = fencing(tmp_path, bmc)
    assert agent.power_state("n3") == "On"
    agent.power_off("n3")
    assert bmc.state() == "Off"  # returned only once the BMC said Off, not at PoweringOff
    assert posts(bmc) == [RESET_PATH]
    agent.power_off("n3")  # retried: already off, nothing sent
    assert posts(bmc) == [RESET_PATH]
    agent.power_on("n3")
    assert bmc.state() == "On" and posts(bmc) == [RESET_PATH, RESET_PATH]


def test_sessions_are_made_and_deleted(tmp_path, bmc):
    agent = fencing(tmp_path, bmc, auth="session", system_id=SYSTEM_ID)
    agent.power_off("n3")
    assert bmc.state() == "Off"
    assert ("POST", "/redfish/v1/SessionService/Sessions") in bmc.requests
    assert ("DELETE", "/redfish/v1/SessionService/Sessions/1") in bmc.requests
    assert bmc.sessions == {}  # no session left behind on the BMC
    assert ("GET", "/redfish/v1/Systems") not in bmc.requests  # the configured id is used as given


def test_bad_credentials_untrusted_certificates_and_unknown_systems_say_what_to_do(tmp_path, bmc):
    with pytest.raises(RedfishError, match=r"refused the credentials in .*bmc-n3.yaml \(401\)"):
        fencing(tmp_path, bmc, credentials="username: fence\npassword: wrong\n").power_off("n3")
    with pytest.raises(RedfishError, match=r"refused the credentials"):
        fencing(tmp_path, bmc, auth="session", credentials="username: x\npassword: y\n").power_off("n3")
    with pytest.raises(RedfishError, match="needs `username` and `password`"):
        fencing(tmp_path, bmc, credentials="user: fence\n").power_off("n3")
    other = tmp_path / "other"
    other.mkdir()
    with FakeBMC(other) as second:  # a CA that did not sign this BMC's certificate
        with pytest.raises(RedfishError, match="certificate is not trusted.*ca_file"):
            fencing(tmp_path, bmc, ca_file=second.ca).power_off("n3")
    fencing(tmp_path, bmc, ca_file="''", verify_tls="false").power_off("n3")  # accepted by choice
    assert bmc.state() == "Off"
    with pytest.raises(RedfishError, match="has no system /redfish/v1/Systems/nope.*system_id"):
        fencing(tmp_path, bmc, system_id="nope").power_on("n3")
    assert bmc.state() == "Off"  # nothing was switched by a failed call


def test_unreachable_bmcs_unknown_agents_and_nodes_without_settings(tmp_path, bmc):
    agent = fencing(tmp_path, bmc, timeout=2)
    agent.targets["n4"] = config.FenceTarget(address="https://127.0.0.1:1", timeout=2,
                                            credentials_file=str(tmp_path / "bmc-n3.yaml"))
    with pytest.raises(RedfishError, match="cannot reach the BMC of n4"):
        agent.power_off("n4")
    with pytest.raises(fence.FenceError, match="no fence settings for node 'n9'"):
        agent.power_off("n9")
    agent.targets["n5"] = config.FenceTarget(agent="ipmi", address="https://x", credentials_file="x")
    with pytest.raises(fence.FenceError, match="no fence agent named 'ipmi'.*installed: .*redfish"):
        agent.power_off("n5")
    assert bmc.requests == []


def test_fence_config_errors_name_the_line(tmp_path):
    (tmp_path / "node.yaml").write_text("node: {id: n1}\nfence:\n  n3:\n    address: bmc3\n    credentials_file: c\n")
    with pytest.raises(config.ConfigError, match=r"node.yaml:4: fence.n3.address: must be the BMC's base URL"):
        config.load(tmp_path / "node.yaml")


def test_the_fence_cli_shows_power_and_switches_only_when_confirmed(tmp_path, bmc, capsys):
    import json

    from cortex.cli.main import main

    fencing(tmp_path, bmc)  # writes node.yaml with n3's section
    conf = str(tmp_path / "node.yaml")
    assert main(["fence", "status", "--config", conf]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NODE", "AGENT", "ADDRESS", "POWER"] and out[1].split() == ["n3", "redfish",
                                                                                        bmc.address, "On"]
    assert main(["fence", "off", "--config", conf, "n3"]) == 2  # not without --yes
    assert "add --yes" in capsys.readouterr().err and posts(bmc) == []
    assert main(["fence", "off", "--config", conf, "--yes", "n3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"node": "n3", "power": "Off"} and bmc.state() == "Off"
    assert main(["fence", "status", "--config", conf, "n3", "n9", "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["power"] == "Off" and "no fence settings for node 'n9'" in rows[1]["error"]

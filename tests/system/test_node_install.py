"""`cortex node install|uninstall` on a real Debian system: a laptop or desktop that is not an appliance.

The target is the Debian 12 container of the Ansible test (tests/system/test_ansible.py: its cached
debootstrap rootfs, booted by systemd-nspawn read-only under a tmpfs overlay, systemd as PID 1, sshd on a
loopback port). There a user's steps run as written: a venv, the wheel installed with pip (offline, from a
wheelhouse: the rootfs has no network index), then `cortex node install --join ADDR --token TOKEN`, which
must leave the agent running under the appliance's hardened unit and joined to a real dev cluster on the
host; a second run changes nothing; `cortex node uninstall` leaves the cluster and removes everything,
`--purge` the data too, and a repeated uninstall has nothing to do.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from cortex.client import Client
from cortex.dev import cluster as devcluster
from tests.support.cluster import free_base_port
from tests.support.wait import wait_until
from tests.system.test_ansible import CACHE, REPO, Container, build_rootfs, checked, run

VENV_BIN = Path(sys.executable).parent
UNIT = "/etc/systemd/system/cortex-agent.service"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="boots a Debian container with systemd-nspawn: needs root"),
    pytest.mark.skipif(shutil.which("systemd-nspawn") is None, reason="systemd-nspawn not installed"),
    pytest.mark.timeout(600),
]


def wheelhouse(out: Path) -> Path:
    """This tree's wheel, its dependencies (the Ansible test's cached wheels, the index only for what is
    missing) and pip itself, which the target's venv has not."""
    pip = [VENV_BIN / "python", "-m", "pip", "-q", "--disable-pip-version-check"]
    house = out / "wheelhouse"
    checked(*pip, "wheel", "--no-build-isolation", "--no-deps", "-w", house, REPO)
    wheel, = house.glob("cortex-*.whl")
    deps = CACHE / "deps-wheelhouse"
    deps.mkdir(parents=True, exist_ok=True)
    if run(*pip, "wheel", "--no-index", "--find-links", deps, "-w", house, wheel).returncode != 0:
        checked(*pip, "wheel", "-w", house, wheel)
        for dep in house.glob("*.whl"):
            if not dep.name.startswith("cortex-"):
                shutil.copy2(dep, deps)
    if not list(deps.glob("pip-*.whl")):
        checked(*pip, "download", "--no-deps", "--only-binary", ":all:", "-d", deps, "pip")
    shutil.copy2(next(deps.glob("pip-*.whl")), house)
    return house


@pytest.fixture(scope="module")
def laptop(tmp_path_factory):
    work = tmp_path_factory.mktemp("node-install")
    rootfs = build_rootfs()
    house = wheelhouse(work)
    key = work / "id_ed25519"
    checked("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key)
    cluster_dir = work / "cluster"
    container = None
    try:
        dc = devcluster.up(cluster_dir, 1, 0, free_base_port(), timeout=60)
        base = free_base_port()
        container = Container("lap1", rootfs, work / "lap1", base, key, house)
        container.wait_ready()
        yield {"container": container, "join": dc.servers[0].grpc_address, "grpc": f"127.0.0.1:{base + 1}",
               "pip": next(house.glob("pip-*.whl")).name}
    finally:
        if container is not None:
            container.stop()
        devcluster.down(cluster_dir)


def sh(container: Container, command: str, timeout: float = 300) -> str:
    result = container.ssh(command, timeout=timeout)
    assert result.returncode == 0, f"{command}: exit {result.returncode}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout


def members(join: str) -> dict[str, dict]:
    """The cluster's own view, asked in-process (the dev cluster's trust note holds the certificate)."""
    with Client(join, timeout=15) as c:
        return {n.id: n for n in c.status().nodes}


def test_install_join_rerun_uninstall(laptop):
    lap, join = laptop["container"], laptop["join"]
    # The user's install: a venv outside any home directory (the unit hides /home and /root) and the wheel.
    # (pip runs from its own wheel: `python pip.whl/pip`; the rootfs has no pip and no ensurepip)
    start = time.monotonic()
    sh(lap, "python3 -m venv --without-pip /opt/cortex && "
            f"/opt/cortex/bin/python /srv/wheelhouse/{laptop['pip']}/pip install -q --no-index --find-links "
            "/srv/wheelhouse --disable-pip-version-check --no-compile cortex")
    print(f"\npip install in the container: {time.monotonic() - start:.1f} s")
    with Client(join, timeout=15) as c:
        token = c.create_token("worker", 1800, 1).token
    install = (f"/opt/cortex/bin/cortex --json node install --join {join} --token {token} "
               f"--address {laptop['grpc']} --wait 120")
    start = time.monotonic()
    first = json.loads(sh(lap, install))
    print(f"cortex node install until joined: {time.monotonic() - start:.1f} s")
    assert first["state"] == "worker" and first["node_id"] == "lap1", first
    assert len(first["changed"]) == 4
    assert members(join)["lap1"].role == "worker"
    # the appliance's sandbox really runs: a dynamic user, not root; the sleep hook is where systemd-sleep looks
    pid, user, enabled, hook, token_mode, dynamic = sh(lap, (
        "pid=$(systemctl show -p MainPID --value cortex-agent); echo $pid; stat -c %U /proc/$pid; "
        "systemctl is-enabled cortex-agent; stat -c %a /usr/lib/systemd/system-sleep/cortex; "
        f"stat -c %a /etc/cortex/join-token; grep -c '^DynamicUser=yes$' {UNIT}")).split()
    assert user != "root" and enabled == "enabled" and (hook, token_mode, dynamic) == ("755", "600", "1")

    again = json.loads(sh(lap, install))  # the same command again: nothing changes, the agent keeps running
    assert again["changed"] == [] and again["state"] == "worker", again
    assert sh(lap, "systemctl show -p MainPID --value cortex-agent").strip() == pid

    gone = json.loads(sh(lap, "/opt/cortex/bin/cortex --json node uninstall"))
    assert gone["leave"] == "left the cluster" and UNIT in gone["removed"], gone
    assert "lap1" not in members(join)
    after = sh(lap, f"systemctl is-active cortex-agent; ls {UNIT} /etc/cortex /usr/lib/systemd/system-sleep/cortex 2>&1; "
                    "test -d /var/lib/private/cortex && echo data-kept; true")
    assert after.splitlines()[0] in ("inactive", "unknown") and after.count("No such") == 3, after
    assert "data-kept" in after  # the data goes only with --purge
    purged = json.loads(sh(lap, "/opt/cortex/bin/cortex --json node uninstall --purge"))
    assert "/var/lib/private/cortex" in purged["removed"] and purged["leave"] == "not installed", purged
    assert sh(lap, "ls -d /var/lib/private/cortex /var/lib/cortex 2>&1; true").count("No such") == 2
    assert "nothing to remove" in sh(lap, "/opt/cortex/bin/cortex node uninstall --purge")
    wait_until(lambda: "lap1" not in members(join), 10, "lap1 stays removed")

"""VM tests: the built appliance image under QEMU (TCG), several VMs on a private bridge in a network
namespace. The image is built once per session (image/build.sh), VMs are shared by the tests of this
package and powered off when the last of them is done. Needs root (image build, namespace, taps).
Artifacts (serial logs, QEMU stderr, probe logs, timings) stay in image/.build/vm-tests/."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.qemu import images, probes, timings
from tests.qemu.labnet import SUBNET, LabNetwork
from tests.qemu.machine import Machine, MachineConfig
from tests.qemu.sshchannel import make_key

HERE = Path(__file__).parent
ARTIFACTS = images.REPO / "image/.build/vm-tests"
# The order the modules run in: cheap harness checks first; the PXE node boots alone (before any disk VM);
# the cluster grows from boot to suspend; the rolling update last.
MODULE_ORDER = ["test_harness", "test_netboot", "test_boot", "test_cluster", "test_failover", "test_suspend",
                "test_issu"]
GRPC_PORT = 7400
READY = r"cortex-ready: CORTEX-READY"
# The cortex CLI on a node, pointed at its agent (cortex-config writes the address; ssh runs no profile).
CORTEX = "env $(cat /run/cortex/agent.env) cortex"
# Power-on to agent ready with four TCG VMs on two cores takes ~2 min on a quiet machine; a hang fails here.
# CORTEX_VM_BOOT_TIMEOUT raises it on a machine busy with other work (seen: 5 min at load 10).
BOOT_TIMEOUT = float(os.environ.get("CORTEX_VM_BOOT_TIMEOUT", "420"))
# node1's root password, given as systemd's passwd.hashed-password.root credential (image/README.md, "A way
# in"); test_boot logs in with it. The hash: `openssl passwd -6 -salt cortexvm cortex-vm-tests`.
ROOT_PASSWORD = "cortex-vm-tests"
ROOT_PASSWORD_HASH = "$6$cortexvm$99rui/hYWcuwAFHywZgXiw8PaMkeoRewCfOiJFwt28M2LQNKUrhd3/V8lVxWLOyctfqHumHQO.CbPNJoMz47P1"


def why_impossible() -> str | None:
    if os.geteuid() != 0:
        return "VM tests need root (image build with mkosi, network namespace, tap devices): run as root"
    return None


def pytest_collection_modifyitems(config, items):
    """VM tests run last (and after each other, in MODULE_ORDER): their VMs would slow the rest."""
    ours = [i for i in items if HERE in Path(str(i.fspath)).parents]
    if not ours:
        return
    others = [i for i in items if i not in ours]
    ours.sort(key=lambda i: MODULE_ORDER.index(Path(str(i.fspath)).stem)
              if Path(str(i.fspath)).stem in MODULE_ORDER else len(MODULE_ORDER))
    reason = why_impossible()
    for item in ours:
        # The first test pays for the image build (minutes): the per-test default of 300 s is too short.
        item.add_marker(pytest.mark.timeout(3600))
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
    items[:] = others + ours


def pytest_terminal_summary(terminalreporter):
    rows = timings.rows(ARTIFACTS / "timings.jsonl")
    if rows:
        terminalreporter.section("VM test timings (TCG, this machine)")
        terminalreporter.write_line(timings.table(rows))
        terminalreporter.write_line(f"artifacts (serial logs, QEMU stderr, probe logs): {ARTIFACTS}")


@pytest.fixture(scope="session")
def vm_artifacts() -> Path:
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    timings.use(ARTIFACTS / "timings.jsonl")
    return ARTIFACTS


@pytest.fixture(scope="session")
def vm_images(vm_artifacts) -> images.Images:
    built = images.ensure_built(vm_artifacts / "image-build.log")
    if built.built_in:
        timings.record("setup", "image build (image/build.sh: disk + netboot + plain)", built.built_in)
        timings.record("setup", "... of which the netboot image (kernel + cpio)", built.netboot_built_in)
    for tool in ("qemu-system-x86_64", "qemu-img", "ssh", "ssh-keygen"):
        assert shutil.which(tool), f"{tool} is missing after image/build.sh"
    return built


class Lab:
    """The VMs of this test package and the network they share."""

    def __init__(self, workdir: Path, network: LabNetwork, images_: images.Images):
        self.workdir = workdir
        self.network = network
        self.images = images_
        self.key = make_key(workdir)
        self.machines: dict[str, Machine] = {}

    @property
    def netns(self) -> str:
        return self.network.name

    def machine(self, name: str, *, host: int | None = None, disk: Path | None = None,
                credentials: dict[str, str] | None = None, **config) -> Machine:
        """A VM on the lab bridge (not started). `host` is the last octet of its static address."""
        number = len(self.machines) + 1
        address = f"{SUBNET}.{host}" if host else ""
        creds = dict(credentials or {})
        # First boot grows the partition table in the initrd (systemd-repart); on a loaded machine that took
        # > 90 s (the default device timeout) and the VM fell into emergency mode waiting for cortex-state.
        config.setdefault("cmdline_extra", "systemd.default_device_timeout_sec=600")
        if address:
            creds.setdefault("ssh.authorized_keys.root", self.key.with_suffix(".pub").read_text().strip())
        vm = Machine(MachineConfig(name=name, disk=disk, address=address, credentials=creds, **config),
                     workdir=self.workdir, netns=self.netns, tap=self.network.add_tap(),
                     mac=f"52:54:00:33:00:{number:02x}", ssh_key=self.key)
        self.machines[name] = vm
        return vm

    def grpc(self, *names: str) -> list[str]:
        return [f"{self.machines[n].config.address}:{GRPC_PORT}" for n in names]

    def shutdown(self) -> None:
        for vm in self.machines.values():
            vm.kill()
        self.network.destroy()


@pytest.fixture(scope="package")
def lab(vm_artifacts, vm_images):
    network = LabNetwork().create()
    lab = Lab(vm_artifacts, network, vm_images)
    try:
        yield lab
    finally:
        lab.shutdown()


def boot_to_ready(vm: Machine, test: str, what: str, timeout: float = BOOT_TIMEOUT) -> float:
    """Wait for the agent-ready line of the current boot; record and return power-on -> ready."""
    _, seconds = vm.wait_for_console(READY, timeout=timeout)
    timings.record(test, what, seconds)
    return seconds


@pytest.fixture(scope="package")
def node1(lab) -> Machine:
    """The first server: creates the cluster from its credentials (cortex.init=yes). Boots alone, so its
    boot time is comparable with the plain image's."""
    vm = lab.machine("node1", host=11, disk=lab.images.disk,
                     credentials={"cortex.node_name": "node1", "cortex.role": "server", "cortex.init": "yes",
                                  "passwd.hashed-password.root": ROOT_PASSWORD_HASH})
    vm.start()
    _, login = vm.wait_for_console(r"login:", timeout=BOOT_TIMEOUT)
    timings.record("boot", "node1 (alone): power-on -> login prompt", login)
    boot_to_ready(vm, "boot", "node1 (alone): power-on -> agent ready (init)")
    # the host-side probes present the admin certificate node1 issued for its local CLI (mutual TLS)
    tls_dir = lab.workdir / "tls"
    tls_dir.mkdir(exist_ok=True)
    for name in ("ca.crt", "admin.crt", "admin.key"):
        (tls_dir / name).write_text(vm.succeed(f"cat /var/lib/cortex/tls/{name}"))
    (tls_dir / "admin.key").chmod(0o600)
    probes.use_credentials(tls_dir)
    return vm


@pytest.fixture(scope="package")
def cluster(lab, node1) -> dict[str, Machine]:
    """node1 plus two servers and a worker that join with tokens from their credentials alone; the three
    joiners boot concurrently."""
    server_token = node1.succeed("cat /var/lib/cortex/join-token").strip()
    worker_token = node1.succeed(
        f"{CORTEX} token create --role worker --ttl 1h --uses 1 --json | python3 -c "
        "'import json, sys; print(json.load(sys.stdin)[\"token\"])'").strip()
    join = f"{node1.config.address}:{GRPC_PORT}"
    joiners = {}
    for name, host, role, token in (("node2", 12, "server", server_token), ("node3", 13, "server", server_token),
                                    ("node4", 14, "worker", worker_token)):
        joiners[name] = lab.machine(name, host=host, disk=lab.images.disk, smp=1, credentials={
            "cortex.node_name": name, "cortex.role": role, "cortex.join_address": join,
            "cortex.join_token": token})
    for vm in joiners.values():
        vm.start()
    # Four guests share the host's cores here (node1 runs on), so each boots slower than one alone: the first
    # joiner gets half as long again; the others have booted alongside it meanwhile.
    for name, vm in joiners.items():
        boot_to_ready(vm, "cluster", f"{name} ({vm.config.credentials['cortex.role']}, 3 booting at once): "
                                     "power-on -> joined", timeout=BOOT_TIMEOUT * 1.5)
    return {"node1": node1, **joiners}


def wait_until(check, timeout: float, what: str, interval: float = 0.5):
    """Poll `check()` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(interval)
